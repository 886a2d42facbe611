"""The ``relay`` command: demo, serve, keys, ledger, accounts, queues and check-config.

Every subcommand that needs a configuration takes ``--config PATH`` or reads ``RELAY_CONFIG``.
Errors are printed as one line each, without a traceback, and the exit status says whether the
command did what was asked (0) or not (1; 2 for usage errors, as argparse does; 141 when the
reader of its output went away, as for a tool ended by SIGPIPE).

``keys …`` works on the database directly (SQLite or PostgreSQL), so it works whether or not the
relay runs (a running relay, on any host sharing the database, sees the change within a second).
``ledger migrate`` copies an SQLite ledger into PostgreSQL and verifies the copy. ``accounts …``
and ``queues`` show and change live state in the running relay, so they go through its admin API
(``--url``, by default the configured listen address; the token from the variable
``server.admin_token_env`` names).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx2
import trio

from . import cli_accounts
from .config import Config, ConfigError, ServerConfig, load_config, parse_config, parse_workers
from .config_checks import check_warnings, load_servable_config
from .ledger.backend import LedgerStore, StoreError, is_postgres_url, open_store
from .ledger.expiry import expiry, format_moment, parse_duration
from .ledger.prices import format_credits, parse_credits, to_credits, unpriced_models
from .logs import setup_logging

DEMO_UPSTREAM_KEY_ENV = "RELAY_DEMO_UPSTREAM_KEY"


class CommandError(Exception):
    """A failure the user can fix; printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        status = args.run(args) or 0
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except ConfigError as error:
        if len(error.issues) == 1 and error.issues[0].path == error.source:
            # The file itself (missing, unreadable, not TOML): one line says it.
            print(f"relay: configuration {error.issues[0]}", file=sys.stderr)
            return 1
        print(f"relay: configuration {error.source or ''} is invalid:", file=sys.stderr)
        for issue in error.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    except (CommandError, StoreError) as error:
        print(f"relay: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``relay keys list | head -1``): stop quietly, as Unix tools
        # do. Python would try to flush stdout again at exit and complain; point it at
        # /dev/null first. 141 is what a shell reports for a tool ended by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="Self-hosted, OpenAI-compatible LLM API relay."
    )
    commands = parser.add_subparsers(title="commands")

    demo = commands.add_parser(
        "demo", help="run the relay with a simulated upstream and a demo key (no config needed)"
    )
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080, help="relay port (0 picks a free one)")
    demo.add_argument("--database", default="relay-demo.db", help="SQLite file for keys/usage")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="serve with a configuration file")
    _config_option(serve)
    _log_level_option(serve)
    serve.add_argument(
        "--workers", default=None, metavar="N",
        help='serving processes: a number or "auto" (the CPU count); more than one needs '
        "server.redis_url (default: server.workers, 1)",
    )
    serve.set_defaults(run=_serve)

    keys = commands.add_parser(
        "keys", help="create, list, top up, limit, expire, rotate and revoke API keys"
    )
    key_commands = keys.add_subparsers(title="key commands")
    create = key_commands.add_parser("create", help="create a key; it is printed once")
    _config_option(create)
    create.add_argument("--package", required=True, help="package the key belongs to")
    create.add_argument("--name", default="", help="a note to recognise the key by")
    create.add_argument(
        "--credits", default=None, metavar="N",
        help="credits to start with (default: the package's initial_credits)",
    )
    create.add_argument("--json", action="store_true", help="print JSON")
    _expiry_options(create, required=False)
    _limit_options(create)
    create.set_defaults(run=_keys_create)
    topup = key_commands.add_parser(
        "topup", help="add credits to a key (by id or plaintext; negative takes some back)"
    )
    _config_option(topup)
    topup.add_argument("key", metavar="KEY_OR_ID")
    topup.add_argument("credits", metavar="CREDITS")
    topup.add_argument("--note", default="", help="why (kept with the grant)")
    topup.add_argument("--json", action="store_true", help="print JSON")
    topup.set_defaults(run=_keys_topup)
    limits = key_commands.add_parser(
        "set-limits", help="override a key's package limits (by id or plaintext)"
    )
    _config_option(limits)
    limits.add_argument("key", metavar="KEY_OR_ID")
    limits.add_argument("--clear", action="store_true", help="drop every override first")
    _limit_options(limits)
    limits.set_defaults(run=_keys_set_limits)
    listing = key_commands.add_parser("list", help="list keys (never their plaintext)")
    _config_option(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id or plaintext")
    _config_option(revoke)
    revoke.add_argument("key", metavar="KEY_OR_ID")
    revoke.set_defaults(run=_keys_revoke)
    set_expiry = key_commands.add_parser(
        "set-expiry", help="change when a key expires (by id or plaintext), or --never"
    )
    _config_option(set_expiry)
    set_expiry.add_argument("key", metavar="KEY_OR_ID")
    set_expiry.add_argument("--json", action="store_true", help="print JSON")
    _expiry_options(set_expiry, required=True)
    set_expiry.set_defaults(run=_keys_set_expiry)
    rotate = key_commands.add_parser(
        "rotate",
        help="give a key a new secret (same id, limits, credits and usage); printed once",
    )
    _config_option(rotate)
    rotate.add_argument("key", metavar="KEY_OR_ID")
    rotate.add_argument(
        "--grace", default="0s", metavar="DURATION",
        help="how long the old secret keeps working (30m, 24h, 7d; default 0s: it stops now)",
    )
    rotate.add_argument("--json", action="store_true", help="print JSON")
    rotate.set_defaults(run=_keys_rotate)

    accounts = commands.add_parser(
        "accounts", help="upstream accounts of the running relay: health, enable, disable"
    )
    account_commands = accounts.add_subparsers(title="account commands")
    listing = account_commands.add_parser("list", help="health, cool-downs and load")
    _admin_options(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_accounts_list)
    for action in ("enable", "disable"):
        command = account_commands.add_parser(
            action,
            help="put the account back in service" if action == "enable"
            else "take the account out of service (until enabled or restarted)",
        )
        _admin_options(command)
        command.add_argument("name", metavar="ACCOUNT")
        command.set_defaults(run=_accounts_change, action=action)
    command = account_commands.add_parser(
        "refresh", help="refresh a codex-chatgpt account's OAuth tokens now"
    )
    _admin_options(command)
    command.add_argument("name", metavar="ACCOUNT")
    command.set_defaults(run=_accounts_refresh)
    command = account_commands.add_parser(
        "import-codex-auth",
        help="store a Codex auth.json's tokens (ChatGPT login) as a codex-chatgpt account's, "
        "encrypted in the database",
    )
    _config_option(command)
    command.add_argument("name", metavar="ACCOUNT")
    command.add_argument("path", metavar="AUTH_JSON", help="e.g. ~/.codex/auth.json")
    command.set_defaults(run=_accounts_import)

    ledger = commands.add_parser("ledger", help="the keys-and-usage database")
    ledger_commands = ledger.add_subparsers(title="ledger commands")
    migrate = ledger_commands.add_parser(
        "migrate",
        help="copy an SQLite ledger (keys, grants, usage) into an empty PostgreSQL database "
        "and verify the counts and credit sums",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="SQLITE_FILE")
    migrate.add_argument("--to", dest="target", required=True, metavar="POSTGRESQL_URL")
    migrate.add_argument(
        "--password-env", default=None, metavar="NAME",
        help="environment variable holding the PostgreSQL password (as "
        "server.database_password_env; libpq's PGPASSWORD and ~/.pgpass work too)",
    )
    migrate.set_defaults(run=_ledger_migrate)

    queues = commands.add_parser("queues", help="live queues per pool of the running relay")
    _admin_options(queues)
    queues.add_argument("--json", action="store_true", help="print JSON")
    queues.set_defaults(run=_queues)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("path", nargs="?", help="config file (default: $RELAY_CONFIG)")
    check.set_defaults(run=_check_config)
    return parser


#: Per-key overrides of the package's limits: option → (key in the limits, type).
LIMIT_OPTIONS = {
    "tpm": ("tpm", int),
    "rpm": ("rpm", int),
    "max-concurrency": ("max_concurrency", int),
    "max-queue": ("max_queue", int),
    "queue-timeout": ("queue_timeout_s", float),
    "weight": ("weight", float),
}


def _limit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the key's own limits (override its package's)")
    for option, (name, kind) in LIMIT_OPTIONS.items():
        group.add_argument(f"--{option}", dest=name, type=kind, default=None, metavar="N")


def _limits_from(args: argparse.Namespace) -> dict:
    limits = {}
    for option, (name, _) in LIMIT_OPTIONS.items():
        value = getattr(args, name)
        if value is not None:
            low = 0 if name == "max_queue" else 0.0
            if value < low or (value == 0 and name != "max_queue"):
                raise CommandError(f"--{option} must be positive, got {value}")
            limits[name] = value
    return limits


def _expiry_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--expires-in", default=None, metavar="DURATION",
        help="expire this long from now: 30d, 24h, 90m, 45s (or 1d12h)",
    )
    group.add_argument(
        "--expires-at", default=None, metavar="TIME",
        help="expire at an ISO 8601 date or date-time (2027-01-31, 2027-01-31T12:00:00Z; "
        "UTC unless it says)",
    )
    if required:
        group.add_argument("--never", action="store_true", help="the key never expires")


def _expiry_from(args: argparse.Namespace) -> float | None:
    """The ``--expires-in`` / ``--expires-at`` moment (None: never), or a CommandError."""
    try:
        return expiry(expires_in=args.expires_in, expires_at=args.expires_at, now=time.time())
    except ValueError as error:
        message = str(error)
        raise CommandError(f"--{message}" if message.startswith("expires-") else message) from None


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", default=None, help="configuration file (default: $RELAY_CONFIG)"
    )


def _admin_options(parser: argparse.ArgumentParser) -> None:
    _config_option(parser)
    parser.add_argument(
        "--url", default=None,
        help="the running relay (default: http://HOST:PORT of server.listen)",
    )


def _load(path: str | None, loader: Callable[[str], Config] = load_config) -> Config:
    path = path or os.environ.get("RELAY_CONFIG")
    if not path:
        raise CommandError("no configuration given: pass --config PATH or set RELAY_CONFIG")
    return loader(path)


def _open_store(where: ServerConfig | str | os.PathLike[str]) -> LedgerStore:
    """The keys-and-usage database of a ``[server]`` (or an SQLite path), or
    :class:`CommandError` saying why it cannot be opened (not an SQLite file, a folder that
    cannot be made, no permission, a PostgreSQL server that cannot be reached)."""
    if isinstance(where, ServerConfig):
        database, password_env = where.database, where.database_password_env
    else:
        database, password_env = where, None
    try:
        return open_store(database, password_env=password_env)
    except StoreError as error:
        raise CommandError(str(error)) from None


def _load_servable(path: str | None) -> Config:
    """:func:`_load`, refusing a file that cannot serve (``check_serving``): what ``serve`` and
    ``check-config`` load, so a file ``check-config`` accepts is one ``serve`` starts with."""
    return _load(path, loader=load_servable_config)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", type=str.lower, choices=LOG_LEVELS, default=None,
        help="the relay's own messages from this level up (default: $RELAY_LOG_LEVEL or "
        "info); the access log is set in the config (server.access_log)",
    )


def _setup_logging(config: Config | None = None, level: str | None = None) -> None:
    """Logging as ``config``'s [server] says (format, access log), at ``level`` (else
    $RELAY_LOG_LEVEL, else INFO)."""
    level = level or os.environ.get("RELAY_LOG_LEVEL") or "INFO"
    if level.lower() not in LOG_LEVELS:
        raise CommandError(
            f"RELAY_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    server = config.server if config is not None else None
    setup_logging(
        level,
        server.log_format if server else "text",
        server.access_log if server else True,
    )


# -- serve --------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    config = _load_servable(args.config)
    workers = config.server.workers
    if args.workers is not None:
        try:
            workers = parse_workers(args.workers)
        except ValueError as error:
            raise CommandError(f"--workers {error}") from None
    from .workers import Supervisor, check_workers

    refusal = check_workers(config, workers)
    if refusal:
        raise CommandError(refusal)
    _setup_logging(config, args.log_level)
    _open_store(config.server).close()  # a bad database is one line, here
    # Accounts whose credentials variable is unset are logged by the runtime at start.
    from .server import serve

    if workers == 1:
        serving = functools.partial(serve, config)
    else:
        path = args.config or os.environ["RELAY_CONFIG"]
        serving = Supervisor(config, path, workers, args.log_level).run

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serving)
            print(f"relay listening on {url}", flush=True)

    _run_server(run)
    return 0


def _run_server(run: Callable[[], Awaitable[None]]) -> None:
    """``trio.run(run)``; a listen address that cannot be taken, or a :class:`CommandError`
    raised inside, is a :class:`CommandError` (it arrives wrapped in the nurseries' exception
    groups)."""
    from .server import ListenError
    from .workers import WorkersError

    try:
        trio.run(run)
    except BaseExceptionGroup as group:
        refused, rest = group.split((ListenError, CommandError, WorkersError))
        if refused is None or rest is not None:
            raise
        raise CommandError(str(_first_leaf(refused))) from None


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


# -- demo ---------------------------------------------------------------------------------


def demo_config(host: str, port: int, upstream_url: str, database: str) -> Config:
    """A configuration with two accounts on the simulated upstream, one per protocol."""
    chat_models = ["gpt-5.5", "gpt-5.4", "gpt-5", "deepseek-chat", "deepseek-reasoner"]
    responses_models = ["gpt-5.5", "gpt-5.4", "gpt-5", "gpt-5-codex"]
    aliases = {
        f"gpt-5-{effort}": {"target": "gpt-5", "reasoning_effort": effort}
        for effort in ("minimal", "low", "medium", "high")
    }
    aliases.update(
        {
            f"gpt-5-codex-{effort}": {"target": "gpt-5-codex", "reasoning_effort": effort}
            for effort in ("low", "medium", "high")
        }
    )
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    data = {
        "server": {"listen": listen, "database": database},
        "pools": {"demo-pool": {"max_concurrency": 64}},
        "packages": {
            "demo": {"pool": "demo-pool", "max_concurrency": 8, "initial_credits": 100}
        },
        "accounts": [
            {
                "name": "sim-responses",
                "pool": "demo-pool",
                "provider": "openai-responses",
                "base_url": upstream_url,
                "api_key_env": DEMO_UPSTREAM_KEY_ENV,
                "models": responses_models,
            },
            {
                "name": "sim-chat",
                "pool": "demo-pool",
                "provider": "openai-chat",
                "base_url": upstream_url,
                "api_key_env": DEMO_UPSTREAM_KEY_ENV,
                "models": chat_models,
            },
        ],
        "models": aliases,
        "prices": DEMO_PRICES,
    }
    return parse_config(data, base_dir=Path.cwd(), source="<demo>")


#: Credits per million tokens in the demo (illustrative figures).
DEMO_PRICES = {
    "gpt-5.5": {"input": 1.75, "cached_input": 0.175, "output": 14.0},
    "gpt-5.4": {"input": 1.5, "cached_input": 0.15, "output": 12.0},
    "gpt-5": {"input": 1.25, "cached_input": 0.125, "output": 10.0},
    "gpt-5-codex": {"input": 1.25, "cached_input": 0.125, "output": 10.0},
    "deepseek-chat": {"input": 0.27, "cached_input": 0.07, "output": 1.1},
    "deepseek-reasoner": {"input": 0.55, "cached_input": 0.14, "output": 2.19},
}


def demo_curl(base: str, key: str) -> str:
    """A curl command that works exactly as printed (tested)."""
    body = '{"model": "deepseek-chat", "messages": [{"role": "user", "content": "Say hello"}]}'
    return (
        f'curl {base}/v1/chat/completions -H "Authorization: Bearer {key}" '
        f"-H \"Content-Type: application/json\" -d '{body}'"
    )


def demo_banner(base: str, key: str) -> str:
    return f"""\
relay demo is running (simulated upstream; press Ctrl-C to stop)

  base URL (Chat Completions, SDKs, IDE plugins): {base}/v1
  base URL (Codex CLI, Responses):                {base}/openai
  API key:                                        {key}
  key workbench (usage, credits, setup):          {base}/workbench

Try it:

  {demo_curl(base, key)}

Codex CLI (~/.codex/config.toml):

  model = "gpt-5.5"
  model_provider = "relay"

  [model_providers.relay]
  name = "OpenAI"              # Codex sends remote compaction only to this name
  base_url = "{base}/openai"
  wire_api = "responses"
  supports_websockets = true   # its turns over one WebSocket per session
  experimental_bearer_token = "{key}"

then: codex exec --skip-git-repo-check "Say hello"
"""


def _demo(args: argparse.Namespace) -> int:
    _setup_logging()
    _open_store(args.database).close()  # a bad database is one line, here
    from .server import serve
    from .testing.upstream import SimProfile, SimUpstream

    upstream_key = os.environ.setdefault(DEMO_UPSTREAM_KEY_ENV, "sim-demo-upstream-key")

    async def run() -> None:
        simulated = SimUpstream(
            SimProfile(ttft_s=0.2, token_delay_s=0.02, output_tokens=30, api_key=upstream_key)
        )
        async with trio.open_nursery() as nursery:
            upstream_port = await nursery.start(simulated.serve, "127.0.0.1", 0)
            config = demo_config(
                args.host, args.port, f"http://127.0.0.1:{upstream_port}/v1", args.database
            )
            store = _open_store(config.server)
            try:
                key, _ = store.create_key(
                    "demo", prefix="cr_", name=f"demo {time.ctime()}",
                    credits_nano=parse_credits(config.packages["demo"].initial_credits),
                )
            finally:
                store.close()
            async with trio.open_nursery() as relay_nursery:
                url = await relay_nursery.start(serve, config)
                print(demo_banner(url, key), flush=True)
            # ``serve`` returned (SIGINT/SIGTERM): the simulated upstream goes with it.
            nursery.cancel_scope.cancel()

    _run_server(run)
    return 0


# -- keys ---------------------------------------------------------------------------------


def _keys_create(args: argparse.Namespace) -> int:
    config = _load(args.config)
    package = config.packages.get(args.package)
    if package is None:
        known = ", ".join(sorted(config.packages)) or "none"
        raise CommandError(f"unknown package '{args.package}' (packages in the config: {known})")
    credits = _credits_arg(args.credits if args.credits is not None else package.initial_credits)
    if credits < 0:
        raise CommandError("--credits must not be negative")
    limits = _limits_from(args)
    expires_at = _expiry_from(args)
    store = _open_store(config.server)
    try:
        key, record = store.create_key(
            package.name, prefix=package.key_prefix, name=args.name, limits=limits,
            credits_nano=credits, expires_at=expires_at,
        )
    finally:
        store.close()
    if args.json:
        print(json.dumps({"key": key, **record.public()}))
    else:
        print(key)
        print(
            f"created {record.id} in package '{package.name}' with "
            f"{format_credits(credits)} credits{_expiry_note(record.expires_at)}. "
            "The key is shown only now: store it safely.",
            file=sys.stderr,
        )
    return 0


def _expiry_note(expires_at: float | None) -> str:
    return "" if expires_at is None else f", expiring at {format_moment(expires_at)}"


def _keys_set_expiry(args: argparse.Namespace) -> int:
    config = _load(args.config)
    expires_at = None if args.never else _expiry_from(args)
    store = _open_store(config.server)
    try:
        record = store.set_expiry(args.key, expires_at)
    finally:
        store.close()
    if record is None:
        raise CommandError(f"no key matches '{_redact(args.key)}'")
    if args.json:
        print(json.dumps(record.public()))
    elif expires_at is None:
        print(f"{record.id} ({record.hint}): never expires")
    else:
        print(f"{record.id} ({record.hint}): expires at {format_moment(expires_at)}")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        grace = parse_duration(args.grace, "--grace")
    except ValueError as error:
        raise CommandError(str(error)) from None
    store = _open_store(config.server)
    try:
        current = _find_key(store, args.key)
        if not current.active:
            raise CommandError(f"{current.id} is revoked: a revoked key cannot be rotated")
        key, record = store.rotate_key(current.id, grace)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"key": key, **record.public()}))
        return 0
    print(key)
    old = (
        f"the old secret {record.previous_hint} stopped working now"
        if grace == 0
        else f"the old secret {record.previous_hint} works until "
        f"{format_moment(record.previous_expires_at)}"
    )
    if current.previous_key_hash and not current.public()["previous_secret"]["expired"]:
        # Only the most recent previous secret is kept: say that the older one's grace ended.
        old += f" (and {current.previous_hint}, rotated away before, stopped working now)"
    if record.expires_at is None:
        expiry_note = ""
    elif record.expired(time.time()):
        expiry_note = (
            f"; the key expired at {format_moment(record.expires_at)}, so neither secret "
            "works until 'relay keys set-expiry' gives it a later one"
        )
    else:
        expiry_note = f"; the key still expires at {format_moment(record.expires_at)}"
    print(
        f"rotated {record.id}: {old}{expiry_note}. The new key is shown only now: "
        "store it safely.",
        file=sys.stderr,
    )
    return 0


def _credits_arg(value: object) -> int:
    try:
        return parse_credits(value)  # type: ignore[arg-type]
    except ValueError as error:
        raise CommandError(str(error)) from None


def _keys_topup(args: argparse.Namespace) -> int:
    config = _load(args.config)
    amount = _credits_arg(args.credits)
    if amount == 0:
        raise CommandError("the amount of credits must not be zero")
    store = _open_store(config.server)
    try:
        record = store.top_up(args.key, amount, args.note)
    finally:
        store.close()
    if record is None:
        raise CommandError(f"no key matches '{_redact(args.key)}'")
    if args.json:
        print(json.dumps(record.public()))
    else:
        left = record.credits_granted_nano - record.credits_used_nano
        print(
            f"{record.id} ({record.hint}): {'+' if amount > 0 else ''}{format_credits(amount)} "
            f"credits; granted {format_credits(record.credits_granted_nano)}, "
            f"left {format_credits(left)}"
        )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    config = _load(args.config)
    store = _open_store(config.server)
    try:
        records = store.list_keys()
        usage = store.usage_by_key()
    finally:
        store.close()
    if args.json:
        print(json.dumps([_key_listing(record, usage.get(record.id)) for record in records]))
        return 0
    if not records:
        print("no keys yet: create one with 'relay keys create --package NAME'")
        return 0
    print(
        f"{'ID':<22} {'KEY':<16} {'PACKAGE':<14} {'STATUS':<8} {'CREATED':<20} "
        f"{'EXPIRES (UTC)':<20} {'CREDITS LEFT':>14} {'USED':>12} {'CALLS':>7} NAME"
    )
    now = time.time()
    for record in records:
        status = (
            "revoked" if not record.active else "expired" if record.expired(now) else "active"
        )
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created_at))
        expires = (
            "never" if record.expires_at is None
            else format_moment(record.expires_at).replace("T", " ").removesuffix("Z")
        )
        left = record.credits_granted_nano - record.credits_used_nano
        calls = (usage.get(record.id) or {}).get("calls", 0)
        print(
            f"{record.id:<22} {record.hint:<16} {record.package:<14} {status:<8} "
            f"{created:<20} {expires:<20} {format_credits(left):>14} "
            f"{format_credits(record.credits_used_nano):>12} {calls:>7} {record.name}"
        )
    return 0


def _key_listing(record, usage: dict | None) -> dict:
    """A key with its all-time usage, as ``keys list --json`` prints it."""
    usage = usage or {}
    return {
        **record.public(),
        "credits_left": to_credits(record.credits_granted_nano - record.credits_used_nano),
        "usage": {
            name: usage.get(name, 0)
            for name in (
                "calls", "errors", "input_tokens", "cached_tokens", "cache_write_tokens",
                "output_tokens", "reasoning_tokens",
            )
        },
    }


def _keys_set_limits(args: argparse.Namespace) -> int:
    config = _load(args.config)
    store = _open_store(config.server)
    try:
        key = _find_key(store, args.key)
        current = {} if args.clear else key.limits
        record = store.set_limits(key.id, {**current, **_limits_from(args)})
    finally:
        store.close()
    assert record is not None  # found just before; keys are never deleted
    print(f"{record.id}: limits {json.dumps(record.limits) if record.limits else 'of its package'}")
    return 0


def _find_key(store: LedgerStore, key_or_id: str):
    """The key by id or plaintext, or :class:`CommandError` naming what matched nothing."""
    record = store.get_key(key_or_id)
    if record is None:
        raise CommandError(f"no key matches '{_redact(key_or_id)}'")
    return record


def _keys_revoke(args: argparse.Namespace) -> int:
    config = _load(args.config)
    store = _open_store(config.server)
    try:
        record = _find_key(store, args.key)
        if not record.active:
            revoked = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.revoked_at))
            raise CommandError(f"{record.id} ({record.hint}) is already revoked (since {revoked})")
        record = store.revoke_key(record.id)
    finally:
        store.close()
    print(f"revoked {record.id} ({record.hint})")
    return 0


# -- ledger -------------------------------------------------------------------------------


def _ledger_migrate(args: argparse.Namespace) -> int:
    from .ledger.migrate import migrate

    if not is_postgres_url(args.target):
        raise CommandError(
            f"--to must be a postgresql://USER@HOST:PORT/DB URL, got {_redact(args.target)}"
        )
    if is_postgres_url(args.source) or not Path(args.source).is_file():
        raise CommandError(f"--from must be an existing SQLite file, got {args.source}")
    source = _open_store(args.source)
    try:
        target = open_store(args.target, password_env=args.password_env)
        shown = target.path  # without a password typed into the URL
        try:
            figures = migrate(source, target)
        finally:
            target.close()
    finally:
        source.close()
    keys, grants, usage = figures["api_keys"], figures["credit_grants"], figures["usage"]
    print(
        f"copied {keys.rows} keys, {grants.rows} credit grants and {usage.rows} usage records "
        f"from {args.source} to {shown}; verified: the counts and the sums match "
        f"(credits granted {format_credits(keys.sums['credits_granted_nano'])}, used "
        f"{format_credits(keys.sums['credits_used_nano'])}, usage cost "
        f"{format_credits(usage.sums['cost_nano'])})"
    )
    return 0


def _redact(text: str) -> str:
    return text if text.startswith("key_") else text[:6] + "…"


# -- accounts and queues (through the admin API) -------------------------------------------


def _admin_call(args: argparse.Namespace, method: str, path: str) -> dict:
    config = _load(args.config)
    url = args.url or _local_url(config)
    env_name = config.server.admin_token_env
    token = os.environ.get(env_name)
    if not token:
        raise CommandError(
            f"set {env_name} to the relay's admin token (the variable server.admin_token_env "
            "names)"
        )
    if not url.startswith(("http://", "https://")):
        raise CommandError(f"--url must be the relay's http:// or https:// address, got {url!r}")
    try:
        response = httpx2.request(
            method, url.rstrip("/") + path, headers={"authorization": f"Bearer {token}"},
            timeout=10,
        )
    except httpx2.HTTPError as error:
        raise CommandError(
            f"the relay at {url} is not reachable ({_reason(error)}); is it running?"
        ) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise CommandError(
            f"{method} {path}: {response.status_code} {message or response.text[:200]}"
        )
    if not isinstance(body, dict):
        raise CommandError(f"{url} answered {method} {path} with something else than the "
                           "relay's admin API (no JSON object): is it the relay?")
    return body


def _reason(error: Exception) -> str:
    """The socket's words for a failed connection ("Connection refused"), without errno."""
    text = str(error) or type(error).__name__
    return text.split("] ", 1)[1] if text.startswith("[Errno") and "] " in text else text


def _local_url(config: Config) -> str:
    host, port = config.server.host, config.server.port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _accounts_list(args: argparse.Namespace) -> int:
    accounts = _admin_call(args, "GET", "/admin/accounts")["data"]
    if args.json:
        print(json.dumps(accounts))
        return 0
    print(
        f"{'ACCOUNT':<20} {'POOL':<16} {'STATE':<22} {'IN FLIGHT':>9} {'FAILURES':<16} "
        "LAST ERROR"
    )
    for account in accounts:
        if account.get("missing_credentials"):
            state = "missing credentials"
        elif account.get("disabled"):
            state = "out of service"
        elif account.get("cooling_down_s"):
            state = f"cooling down {account['cooling_down_s']:.0f}s"
        else:
            state = "healthy"
        failures = ", ".join(f"{k}×{v}" for k, v in account.get("failures", {}).items()) or "-"
        print(
            f"{account['name']:<20} {account['pool']:<16} {state:<22} "
            f"{account.get('in_flight', 0):>9} {failures:<16} {account.get('last_error') or ''}"
        )
        for line in cli_accounts.oauth_lines(account):
            print(f"{'':<20} {line}")
    return 0


def _accounts_refresh(args: argparse.Namespace) -> int:
    account = _admin_call(args, "POST", f"/admin/accounts/{args.name}/refresh")
    for line in cli_accounts.oauth_lines(account)[:1]:
        print(f"{args.name}: refreshed; {line}")
    return 0


def _accounts_import(args: argparse.Namespace) -> int:
    config = _load(args.config)
    store = _open_store(config.server.database)
    try:
        tokens = cli_accounts.import_codex_auth(config, args.name, args.path, store)
    except cli_accounts.ImportRefused as error:
        raise CommandError(str(error)) from None
    finally:
        store.close()
    print(cli_accounts.describe_import(args.name, tokens))
    return 0


def _accounts_change(args: argparse.Namespace) -> int:
    account = _admin_call(args, "POST", f"/admin/accounts/{args.name}/{args.action}")
    state = "out of service" if account.get("disabled") else "in service"
    print(f"{args.name}: {state}")
    return 0


def _queues(args: argparse.Namespace) -> int:
    queues = _admin_call(args, "GET", "/admin/queues")
    if args.json:
        print(json.dumps(queues))
        return 0
    print(f"{'POOL':<20} {'QUEUED':>7} {'OLDEST WAIT':>12} {'IN FLIGHT':>10}  KEYS WAITING")
    for name, pool in queues["pools"].items():
        waiting = ", ".join(
            f"{key_id}×{entry['queued']}" for key_id, entry in pool["keys"].items()
            if entry["queued"]
        ) or "-"
        print(
            f"{name:<20} {pool.get('queue_depth', 0):>7} {pool.get('oldest_wait_s', 0):>11.1f}s "
            f"{pool.get('in_flight', 0):>10}  {waiting}"
        )
    shared = queues.get("shared")
    if shared is not None:
        _print_shared(shared)
    return 0


def _print_shared(shared: dict) -> None:
    """The Redis-shared view of ``relay queues`` (several relay processes)."""
    print()
    if shared.get("degraded"):
        print(f"shared state: Redis unreachable ({shared.get('degraded_reason', '')}); "
              "the figures above are this process's alone")
        return
    processes = shared.get("processes", [])
    print(f"shared through Redis: {len(processes)} live processes "
          f"(the one that answered: {shared.get('owner')})")
    leases = shared.get("leases", {})
    for subject, count in leases.items():
        name = "global" if subject == "g" else f"pool {subject.removeprefix('p:')}"
        print(f"  {name:<24} {count:>4} slots held (all processes)")
    for owner, depths in shared.get("queued_per_process", {}).items():
        waiting = ", ".join(f"{pool} {depth}" for pool, depth in depths.items() if depth) or "-"
        print(f"  process {owner:<16} queued: {waiting}")


# -- check-config -------------------------------------------------------------------------


def _check_config(args: argparse.Namespace) -> int:
    config = _load_servable(args.path)
    from .workers import check_workers

    refusal = check_workers(config, config.server.workers)
    if refusal:  # what ``serve`` refuses (unless its --workers says otherwise)
        raise CommandError(f"{config.source}: server.workers: {refusal.removeprefix('--')}")
    if config.server.redis_url is not None:
        from .guards.shared import reach, redacted

        failure = reach(config.server.redis_url)
        if failure is not None:
            raise CommandError(
                f"{config.source}: server.redis_url: cannot reach Redis at "
                f"{redacted(config.server.redis_url)} ({failure})"
            )
    if is_postgres_url(config.server.database):
        try:
            _open_store(config.server).close()
        except CommandError as error:
            raise CommandError(f"{config.source}: server.database: {error}") from None
    for issue in check_warnings(config):
        print(f"warning: {issue}")
    unpriced = unpriced_models(config)
    if unpriced:
        print(f"warning: no [prices] entry applies to {', '.join(unpriced)}: they are free")
    print(
        f"{config.source}: OK ({len(config.pools)} pools, {len(config.packages)} packages, "
        f"{len(config.accounts)} accounts, {len(config.models)} model aliases, "
        f"{len(config.prices)} prices)"
    )
    return 0
