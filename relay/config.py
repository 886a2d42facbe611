"""The relay's configuration: one TOML file, parsed and validated once into frozen dataclasses.

The file is read once at start-up; after :func:`load_config` returns, every value has the right
type and range, every cross-reference (a package's pool, an account's pool) resolves, and the hot
path never re-checks any of it — the httpx habit of validating configuration at construction.

Validation collects *every* problem before it raises, each with the TOML key path that holds it
(``packages.startup.max_concurrency``, ``accounts[1].provider``), so an operator fixes a broken
file in one pass instead of one error per restart. Unknown keys are errors too: a typo such as
``lisen`` would otherwise silently fall back to the default, which is the worst kind of mistake to
find in production.

Decisions worth knowing:

- ``[[accounts]]`` entries are addressed by their 0-based index (``accounts[0]`` is the first), as
  the array appears in the parsed file.
- Keys that are not bare TOML keys are quoted in paths the way TOML would write them
  (``prices."gpt-5.5".input``), so a path can be pasted back into the file.
- Secrets are never in the file. An account names the environment variable that holds its key
  (``api_key_env``) and the key is read when it is needed (:meth:`AccountConfig.api_key`), so it
  can be rotated without editing the file and the file can be committed.
  ``config_checks.check_environment`` reports missing variables separately from
  :func:`parse_config`, because a file can be valid on a machine that does not run it (CI, a
  config linter). Whether a valid file can serve is :mod:`relay.config_checks`; the address
  checks (``listen``, ``base_url``, proxy URLs) are :mod:`relay.config_urls`.
- ``server.database`` is resolved against the directory of the config file, not the working
  directory, so ``relay serve -c /etc/relay/relay.toml`` finds the same database from anywhere.
- Aliases do not chain: an alias's ``target`` may not be another alias. One level is all a client
  needs (``gpt-5-high`` → ``gpt-5`` with effort ``high``) and it rules out cycles.
- A ``[models.NAME]`` whose NAME holds ``*``, ``?`` or ``[`` is a pattern alias
  (``[models."claude-sonnet-*"]``), and a package's ``models`` entries may be patterns too; both
  are fnmatch globs, and one that fnmatch would misread (an unclosed ``[``, an empty ``[z-a]``)
  is refused here. What a name resolves to, exact names first: :mod:`relay.model_names`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import ssl
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .config_urls import base_url_problem, check_proxy_url, split_listen
from .model_names import pattern_problem

__all__ = [
    "PROVIDERS",
    "REASONING_EFFORTS",
    "AccountConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "GlobalConfig",
    "ModelAlias",
    "PackageConfig",
    "PoolConfig",
    "Price",
    "ServerConfig",
    "load_config",
    "parse_config",
]

PROVIDERS = ("openai-chat", "openai-responses", "anthropic", "gemini", "codex-chatgpt")
"""Upstream kinds an account can be; each has its own adapter in ``relay/upstream/``.

``codex-chatgpt`` is a ChatGPT-plan account reached through the Codex backend: it speaks the
Responses protocol (its :attr:`AccountConfig.wire`), authenticates with OAuth tokens kept in the
ledger (imported from a Codex ``auth.json``, refreshed by the relay: relay/upstream/chatgpt.py)
and has no ``api_key_env``."""

CHATGPT_BASE_URL = "https://chatgpt.com/backend-api/codex"
CHATGPT_TOKEN_URL = "https://auth.openai.com/oauth/token"
#: The Codex CLI's OAuth client id: the one its refresh tokens were issued to.
CODEX_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
"""Reasoning efforts an alias may set; the union of what the supported upstreams accept."""

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,16}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_MEMORY_DATABASE = ":memory:"
#: A ``server.database`` that is a PostgreSQL URL, not a path (``relay/ledger/backend.py``).
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


# --------------------------------------------------------------------------------------------
# The typed configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: where the relay listens, where it keeps state, and its timeouts."""

    listen: str = "127.0.0.1:8080"
    database: str = "relay.db"  # an SQLite path, or a postgresql://user@host:port/db URL
    #: The environment variable holding the PostgreSQL password (never in the file).
    database_password_env: str | None = None
    admin_token_env: str = "RELAY_ADMIN_TOKEN"
    #: The variable holding the key that encrypts OAuth tokens in the ledger (codex-chatgpt).
    secret_key_env: str = "RELAY_SECRET_KEY"
    #: An OAuth access token is refreshed this long before its expiry (its JWT's ``exp``).
    oauth_refresh_margin_s: float = 300.0
    redis_url: str | None = None
    #: Redis unreachable: "local" (each process enforces the limits alone) or "closed" (503).
    redis_failure: str = "local"
    redis_lease_ttl_s: float = 10.0  # a process's leases outlive its last heartbeat this long
    max_body_bytes: int = 64 * 1024 * 1024
    stall_timeout_s: float = 60.0
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 300.0
    upstream_max_connections: int = 1000
    upstream_max_body_bytes: int = 64 * 1024 * 1024  # a non-streamed answer, decoded
    upstream_max_event_bytes: int = 16 * 1024 * 1024  # one event of a streamed answer
    keep_alive_timeout_s: float = 5.0
    body_read_timeout_s: float = 30.0  # the whole request body must arrive within this
    drain_timeout_s: float = 25.0  # on SIGTERM, running requests may finish within this
    keepalive_event_s: float = 15.0
    session_ttl_s: float = 3600.0  # an unused sticky session's binding expires after this
    failover_attempts: int = 3  # accounts tried for one request before its error is returned
    #: Responses answers kept per key for previous_response_id / item_reference (README,
    #: "Responses state"): at most this many, each for at most this long.
    responses_store_max: int = 100
    responses_store_ttl_s: float = 3600.0
    error_cooldown_s: float = 10.0  # rest for an account after repeated 5xx/connect failures
    rate_limit_cooldown_s: float = 30.0  # rest after an upstream 429 with no retry hint
    max_retry_after_s: float = 300.0  # the longest rest an upstream's retry hint can impose
    websocket_max_per_key: int = 16  # Responses WebSockets one key may hold open (per process)
    websocket_max_age_s: float = 3600.0  # a socket's turns end after this; the client reconnects
    # Every account's proxy unless it names its own (see README); out of repr: a password.
    proxy: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # a private CA's certificates, trusted besides the system's
    trust_env: bool = False  # no proxy set: take it from HTTPS_PROXY / HTTP_PROXY / NO_PROXY
    log_format: str = "text"  # "text" or "json" (JSON Lines): relay/logs.py
    access_log: bool = True  # one line per request when it ends (relay/logs.py)
    workers: int = 1  # serving processes (relay/workers.py); "auto" in the file: the CPU count

    @property
    def host(self) -> str:
        """The host part of ``listen``, without the brackets of an IPv6 address."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The port part of ``listen`` (0 asks the OS for a free port)."""
        return split_listen(self.listen)[1]


@dataclass(frozen=True)
class GlobalConfig:
    """``[global]``: what the whole relay may sell; ``None`` means unlimited."""

    tpm: int | None = None
    tps: int | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True)
class PoolConfig:
    """``[pools.NAME]``: an isolated slice of capacity, with its own accounts and fair queue."""

    name: str
    tpm: int | None = None
    tps: int | None = None
    max_concurrency: int | None = None
    max_queue: int | None = None
    weight: float = 1.0
    queue: str = "fair"  # "fair" (virtual token counters) or "fifo" (first come, first served)


QUEUE_DISCIPLINES = ("fair", "fifo")


@dataclass(frozen=True)
class PackageConfig:
    """``[packages.NAME]``: the limits and pricing terms a key is sold with."""

    name: str
    pool: str
    tpm: int | None = None
    rpm: int | None = None
    max_concurrency: int | None = None
    max_queue: int | None = None
    queue_timeout_s: float = 60.0
    weight: float = 1.0
    key_prefix: str = "cr_"
    initial_credits: float = 0.0
    models: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AccountConfig:
    """``[[accounts]]``: one upstream credential, the models it serves and its own limits."""

    name: str
    pool: str
    provider: str
    base_url: str
    api_key_env: str | None = None
    models: tuple[str, ...] = ()
    max_concurrency: int | None = None
    tpm: int | None = None
    rpm: int | None = None
    priority: int = 0
    # Overrides server.proxy; "direct" for none at all. Out of repr: it may hold a password.
    proxy: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # overrides server.ca_file
    token_url: str | None = None  # codex-chatgpt: the OAuth token endpoint
    client_id: str | None = None  # codex-chatgpt: the OAuth client the tokens belong to

    @property
    def wire(self) -> str:
        """The protocol the account's upstream speaks (the translators' upstream kind)."""
        return "openai-responses" if self.provider == "codex-chatgpt" else self.provider

    def api_key(self) -> str | None:
        """The key from the environment, read now so a rotated key is picked up.

        ``None`` when the account names no variable or the variable is unset or empty: an empty
        key can only earn a 401, so it is treated as missing.
        """
        if self.api_key_env is None:
            return None
        return os.environ.get(self.api_key_env) or None


@dataclass(frozen=True)
class ModelAlias:
    """``[models.ALIAS]``: a model id clients may use that maps to ``target`` (and an effort).

    A ``name`` holding ``*``, ``?`` or ``[`` is a pattern: every requested id it matches maps
    to ``target``, unless an exact name claims it first (:mod:`relay.model_names`).
    """

    name: str
    target: str
    reasoning_effort: str | None = None


@dataclass(frozen=True)
class Price:
    """``[prices.MODEL]``: credits per million input, cached-input, cache-write and output
    tokens.

    ``cached_input`` of ``None`` means cached input tokens are billed at the ``input`` price;
    ``cache_write`` of ``None`` the same for input tokens written to the prompt cache.
    """

    model: str
    input: float
    cached_input: float | None = None
    output: float = 0.0
    cache_write: float | None = None


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Config:
    """The whole configuration. Mappings are read-only views; keys are the table names."""

    server: ServerConfig = field(default_factory=ServerConfig)
    global_: GlobalConfig = field(default_factory=GlobalConfig)
    pools: Mapping[str, PoolConfig] = field(default_factory=_empty_mapping)
    packages: Mapping[str, PackageConfig] = field(default_factory=_empty_mapping)
    accounts: tuple[AccountConfig, ...] = ()
    models: Mapping[str, ModelAlias] = field(default_factory=_empty_mapping)
    prices: Mapping[str, Price] = field(default_factory=_empty_mapping)
    source: str | None = None


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in the file: the TOML key path that holds it and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(Exception):
    """The file cannot be used. ``issues`` lists every problem found; ``str()`` is one per line."""

    def __init__(self, issues: Sequence[ConfigIssue], *, source: str | None = None) -> None:
        self.issues: list[ConfigIssue] = list(issues)
        self.source = source
        super().__init__("\n".join(str(issue) for issue in self.issues))


# --------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------

_MISSING: Any = object()


def _key(name: str) -> str:
    """A key as TOML would write it: bare when it can be, else a quoted (JSON-escaped) string."""
    return name if _BARE_KEY_RE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _join(path: str, name: str) -> str:
    return f"{path}.{_key(name)}" if path else _key(name)


def _show(value: Any) -> str:
    """A value as an operator would recognise it from the file (TOML spelling, short)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    text = repr(value) if isinstance(value, str | int | float) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but `max_concurrency = true` is a mistake, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


class _Table:
    """A TOML table being read into a dataclass.

    Each accessor records the key as known, checks type and range, appends an issue and returns
    the default when the value is wrong, so reading carries on and every problem is collected.
    :meth:`finish` reports the keys nothing asked for.
    """

    def __init__(self, data: Mapping[str, Any], path: str, issues: list[ConfigIssue]) -> None:
        self.data = data
        self.path = path
        self.issues = issues
        self.known: set[str] = set()

    def error(self, key: str, message: str) -> None:
        self.issues.append(ConfigIssue(_join(self.path, key), message))

    def raw(self, key: str, *, required: bool = False) -> Any:
        self.known.add(key)
        if key not in self.data:
            if required:
                self.error(key, "is required")
            return _MISSING
        return self.data[key]

    def integer(self, key: str, default: Any = None, *, positive: bool = False) -> Any:
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not _is_int(value) or (positive and value <= 0):
            kind = "a positive integer" if positive else "an integer"
            self.error(key, f"must be {kind}, got {_show(value)}")
            return default
        return value

    def number(
        self,
        key: str,
        default: Any = None,
        *,
        positive: bool = False,
        non_negative: bool = False,
        required: bool = False,
    ) -> Any:
        value = self.raw(key, required=required)
        if value is _MISSING:
            return default
        if not _is_number(value) or (positive and value <= 0) or (non_negative and value < 0):
            if positive:
                kind = "a positive number"
            elif non_negative:
                kind = "a non-negative number"
            else:
                kind = "a number"
            self.error(key, f"must be {kind}, got {_show(value)}")
            return default
        return float(value)

    def string(
        self, key: str, default: Any = None, *, required: bool = False, empty_ok: bool = False
    ) -> Any:
        value = self.raw(key, required=required)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or (not value and not empty_ok):
            self.error(key, f"must be a non-empty string, got {_show(value)}")
            return default
        return value

    def choice(self, key: str, choices: Sequence[str], *, required: bool = False) -> Any:
        value = self.raw(key, required=required)
        if value is _MISSING:
            return None
        if value not in choices or not isinstance(value, str):
            self.error(key, f"must be one of {', '.join(choices)}, got {_show(value)}")
            return None
        return value

    def env_name(self, key: str, default: Any = None) -> Any:
        value = self.string(key, _MISSING)
        if value is _MISSING:
            return default
        if not _ENV_NAME_RE.fullmatch(value):
            self.error(
                key,
                "must be the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*), "
                f"got {_show(value)}",
            )
            return default
        return value

    def string_list(self, key: str, *, required: bool = False) -> tuple[str, ...] | None:
        """A non-empty array of non-empty, distinct strings (``None`` when absent or wrong)."""
        value = self.raw(key, required=required)
        if value is _MISSING:
            return None
        if not isinstance(value, list | tuple) or not value:
            self.error(key, f"must be a non-empty array of strings, got {_show(value)}")
            return None
        items: list[str] = []
        ok = True
        for index, item in enumerate(value):
            item_path = f"{_join(self.path, key)}[{index}]"
            if not isinstance(item, str) or not item:
                self.issues.append(
                    ConfigIssue(item_path, f"must be a non-empty string, got {_show(item)}")
                )
                ok = False
            elif item in items:
                self.issues.append(ConfigIssue(item_path, f"duplicate entry {item!r}"))
                ok = False
            else:
                items.append(item)
        return tuple(items) if ok else None

    def finish(self, hints: Mapping[str, str] | None = None) -> None:
        """Report every key no accessor asked for; ``hints`` gives a better message for some."""
        hints = hints or {}
        for key in self.data:
            if key in self.known:
                continue
            path = _join(self.path, key)
            if key in hints:
                self.issues.append(ConfigIssue(path, hints[key]))
                continue
            message = f"unknown key {path!r}"
            close = difflib.get_close_matches(key, sorted(self.known), n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]!r}?)"
            self.issues.append(ConfigIssue(path, message))


def _table_at(parent: _Table, key: str) -> Mapping[str, Any] | None:
    """The sub-table ``key``: ``{}`` when absent, ``None`` (and an issue) when not a table."""
    value = parent.raw(key)
    if value is _MISSING:
        return {}
    if not isinstance(value, Mapping):
        parent.error(key, f"must be a table, got {_show(value)}")
        return None
    return value


def _named_tables(parent: _Table, key: str, *, check_name: bool) -> list[tuple[str, _Table]]:
    """The entries of a table of tables (``[pools.NAME]``), each as (name, reader)."""
    issues = parent.issues
    tables = _table_at(parent, key)
    if not tables:
        return []
    entries = []
    section = _join(parent.path, key)
    for name, value in tables.items():
        path = _join(section, name)
        if check_name and not _NAME_RE.fullmatch(name):
            issues.append(ConfigIssue(path, f"name must match [A-Za-z0-9_.-]+, got {_show(name)}"))
        if not isinstance(value, Mapping):
            issues.append(ConfigIssue(path, f"must be a table, got {_show(value)}"))
            continue
        entries.append((name, _Table(value, path, issues)))
    return entries


def _postgres_url(table: _Table, url: str) -> str:
    """A PostgreSQL ``server.database``: a password in it is refused (it would sit in the file
    and in every message that names the database)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing it validates it)
    except ValueError as exc:
        table.error("database", f"is not a valid PostgreSQL URL: {exc}")
        return ServerConfig.database
    if parts.password is not None:
        table.error(
            "database",
            "must not contain a password: write postgresql://USER@HOST:PORT/DB and put the "
            "password in an environment variable named by server.database_password_env",
        )
        return ServerConfig.database
    return url


def _read_server(table: _Table, base_dir: Path | None) -> ServerConfig:
    defaults = ServerConfig()
    listen = table.string("listen", defaults.listen)
    try:
        split_listen(listen)
    except ValueError as exc:
        table.error("listen", str(exc))
        listen = defaults.listen

    database = table.string("database", defaults.database)
    if database.startswith(_POSTGRES_SCHEMES):
        database = _postgres_url(table, database)
    elif database != _MEMORY_DATABASE:
        path = Path(database).expanduser()
        if not path.is_absolute():
            path = (base_dir if base_dir is not None else Path.cwd()) / path
        # abspath, not resolve(): normalise `..` without following symlinks the operator chose.
        database = os.path.abspath(path)

    redis_url = table.string("redis_url")
    if redis_url is not None and not redis_url.startswith(_REDIS_SCHEMES):
        table.error(
            "redis_url",
            f"must start with {', '.join(_REDIS_SCHEMES)}, got {_show(redis_url)}",
        )
        redis_url = None

    server = ServerConfig(
        listen=listen,
        database=database,
        database_password_env=table.env_name("database_password_env"),
        admin_token_env=table.env_name("admin_token_env", defaults.admin_token_env),
        secret_key_env=table.env_name("secret_key_env", defaults.secret_key_env),
        oauth_refresh_margin_s=table.number(
            "oauth_refresh_margin_s", defaults.oauth_refresh_margin_s, non_negative=True
        ),
        redis_url=redis_url,
        redis_failure=table.choice("redis_failure", ("local", "closed"))
        or defaults.redis_failure,
        redis_lease_ttl_s=table.number(
            "redis_lease_ttl_s", defaults.redis_lease_ttl_s, positive=True
        ),
        max_body_bytes=table.integer("max_body_bytes", defaults.max_body_bytes, positive=True),
        stall_timeout_s=table.number("stall_timeout_s", defaults.stall_timeout_s, positive=True),
        upstream_connect_timeout_s=table.number(
            "upstream_connect_timeout_s", defaults.upstream_connect_timeout_s, positive=True
        ),
        upstream_read_timeout_s=table.number(
            "upstream_read_timeout_s", defaults.upstream_read_timeout_s, positive=True
        ),
        upstream_max_connections=table.integer(
            "upstream_max_connections", defaults.upstream_max_connections, positive=True
        ),
        upstream_max_body_bytes=table.integer(
            "upstream_max_body_bytes", defaults.upstream_max_body_bytes, positive=True
        ),
        upstream_max_event_bytes=table.integer(
            "upstream_max_event_bytes", defaults.upstream_max_event_bytes, positive=True
        ),
        keep_alive_timeout_s=table.number(
            "keep_alive_timeout_s", defaults.keep_alive_timeout_s, positive=True
        ),
        body_read_timeout_s=table.number(
            "body_read_timeout_s", defaults.body_read_timeout_s, positive=True
        ),
        drain_timeout_s=table.number(
            "drain_timeout_s", defaults.drain_timeout_s, positive=True
        ),
        keepalive_event_s=table.number(
            "keepalive_event_s", defaults.keepalive_event_s, positive=True
        ),
        session_ttl_s=table.number("session_ttl_s", defaults.session_ttl_s, positive=True),
        failover_attempts=table.integer(
            "failover_attempts", defaults.failover_attempts, positive=True
        ),
        responses_store_max=table.integer(
            "responses_store_max", defaults.responses_store_max, positive=True
        ),
        responses_store_ttl_s=table.number(
            "responses_store_ttl_s", defaults.responses_store_ttl_s, positive=True
        ),
        error_cooldown_s=table.number(
            "error_cooldown_s", defaults.error_cooldown_s, positive=True
        ),
        rate_limit_cooldown_s=table.number(
            "rate_limit_cooldown_s", defaults.rate_limit_cooldown_s, positive=True
        ),
        max_retry_after_s=table.number(
            "max_retry_after_s", defaults.max_retry_after_s, positive=True
        ),
        websocket_max_per_key=table.integer(
            "websocket_max_per_key", defaults.websocket_max_per_key, positive=True
        ),
        websocket_max_age_s=table.number(
            "websocket_max_age_s", defaults.websocket_max_age_s, positive=True
        ),
        proxy=_read_proxy(table, allow_direct=False),
        ca_file=_read_ca_file(table, base_dir),
        trust_env=_read_bool(table, "trust_env", defaults.trust_env),
        workers=_read_workers(table, defaults.workers),
        **_read_logging(table, defaults),
    )
    table.finish()
    return server


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or a taskset's share,
    not the machine's), what ``workers = "auto"`` means."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_workers(value: object) -> int:
    """``workers`` as given (a positive integer, or ``"auto"``) as a count; ``ValueError``
    saying what is accepted otherwise."""
    if value == "auto":
        return cpu_count()
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not _is_int(value) or value <= 0:
        raise ValueError(f'must be a positive integer or "auto", got {_show(value)}')
    return value


def _read_workers(table: _Table, default: int) -> int:
    value = table.raw("workers")
    if value is _MISSING:
        return default
    try:
        return parse_workers(value)
    except ValueError as exc:
        table.error("workers", str(exc))
        return default


def _read_proxy(table: _Table, *, allow_direct: bool) -> str | None:
    proxy = table.string("proxy")
    if proxy is None or (allow_direct and proxy == "direct"):
        return proxy
    problem = check_proxy_url(proxy)
    if problem is not None:
        hint = ', or "direct" for none' if allow_direct else ""
        table.error("proxy", f"{problem}{hint}")
        return None
    return proxy


def _read_ca_file(table: _Table, base_dir: Path | None) -> str | None:
    """``ca_file``: a PEM file of CA certificates, resolved like ``server.database``; it must
    exist and hold at least one certificate (a wrong path would fail every request)."""
    ca_file = table.string("ca_file")
    if ca_file is None:
        return None
    path = Path(ca_file).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        table.error("ca_file", f"file not found: {path}")
        return None
    except (OSError, ssl.SSLError) as exc:
        table.error("ca_file", f"{path} is not a readable PEM file of CA certificates ({exc})")
        return None
    return os.path.abspath(path)


def _read_bool(table: _Table, key: str, default: bool) -> bool:
    value = table.raw(key)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        table.error(key, f"must be true or false, got {_show(value)}")
        return default
    return value


def _read_logging(table: _Table, defaults: ServerConfig) -> dict[str, Any]:
    """``log_format`` and ``access_log`` of ``[server]`` (relay/logs.py)."""
    log_format = table.choice("log_format", ("text", "json")) or defaults.log_format
    access_log = table.raw("access_log")
    if access_log is _MISSING:
        access_log = defaults.access_log
    elif not isinstance(access_log, bool):
        table.error("access_log", f"must be true or false, got {_show(access_log)}")
        access_log = defaults.access_log
    return {"log_format": log_format, "access_log": access_log}


def _read_global(table: _Table) -> GlobalConfig:
    config = GlobalConfig(
        tpm=table.integer("tpm", positive=True),
        tps=table.integer("tps", positive=True),
        max_concurrency=table.integer("max_concurrency", positive=True),
    )
    table.finish()
    return config


def _read_pool(name: str, table: _Table) -> PoolConfig:
    pool = PoolConfig(
        name=name,
        tpm=table.integer("tpm", positive=True),
        tps=table.integer("tps", positive=True),
        max_concurrency=table.integer("max_concurrency", positive=True),
        max_queue=table.integer("max_queue", positive=True),
        weight=table.number("weight", 1.0, positive=True),
        queue=table.choice("queue", QUEUE_DISCIPLINES) or "fair",
    )
    table.finish()
    return pool


def _check_pool_ref(table: _Table, pool: str | None, pools: Mapping[str, Any]) -> None:
    if pool is None or pool in pools:
        return
    defined = ", ".join(pools) if pools else "none"
    table.error("pool", f"unknown pool {pool!r} (defined pools: {defined})")


def _read_package(name: str, table: _Table, pools: Mapping[str, Any]) -> PackageConfig:
    pool = table.string("pool", required=True)
    _check_pool_ref(table, pool, pools)
    key_prefix = table.string("key_prefix", "cr_")
    if not _KEY_PREFIX_RE.fullmatch(key_prefix):
        table.error(
            "key_prefix", f"must be 1-16 characters of [A-Za-z0-9_-], got {_show(key_prefix)}"
        )
        key_prefix = "cr_"
    package = PackageConfig(
        name=name,
        pool=pool or "",
        tpm=table.integer("tpm", positive=True),
        rpm=table.integer("rpm", positive=True),
        max_concurrency=table.integer("max_concurrency", positive=True),
        max_queue=table.integer("max_queue", positive=True),
        queue_timeout_s=table.number("queue_timeout_s", 60.0, positive=True),
        weight=table.number("weight", 1.0, positive=True),
        key_prefix=key_prefix,
        initial_credits=table.number("initial_credits", 0.0, non_negative=True),
        models=_read_model_list(table),
    )
    table.finish()
    return package


def _read_model_list(table: _Table) -> tuple[str, ...] | None:
    """A package's ``models``: names or fnmatch patterns, each pattern a glob fnmatch reads as
    written."""
    models = table.string_list("models")
    for index, model in enumerate(models or ()):
        problem = pattern_problem(model)
        if problem is not None:
            path = f"{_join(table.path, 'models')}[{index}]"
            table.issues.append(ConfigIssue(path, f"pattern {model!r}: {problem}"))
    return models


_SECRET_HINT = (
    "secrets are not written in the file: put the key in an environment variable and name it "
    "with api_key_env"
)


def _read_account(
    table: _Table,
    pools: Mapping[str, Any],
    seen_names: dict[str, str],
    base_dir: Path | None = None,
) -> AccountConfig:
    name = table.string("name", required=True)
    if name is not None:
        if not _NAME_RE.fullmatch(name):
            table.error("name", f"must match [A-Za-z0-9_.-]+, got {_show(name)}")
        elif name in seen_names:
            table.error("name", f"duplicate account name {name!r} (also {seen_names[name]})")
        else:
            seen_names[name] = table.path
    pool = table.string("pool", required=True)
    _check_pool_ref(table, pool, pools)
    provider = table.choice("provider", PROVIDERS, required=True)

    chatgpt = provider == "codex-chatgpt"
    base_url = table.string("base_url", CHATGPT_BASE_URL if chatgpt else None, required=not chatgpt)
    if base_url is not None:
        problem = base_url_problem(base_url)
        if problem is not None:
            table.error("base_url", f"{problem}, got {_show(base_url)}")
        base_url = base_url.rstrip("/")

    account = AccountConfig(
        name=name or "",
        pool=pool or "",
        provider=provider or "",
        base_url=base_url or "",
        api_key_env=table.env_name("api_key_env"),
        models=table.string_list("models", required=True) or (),
        max_concurrency=table.integer("max_concurrency", positive=True),
        tpm=table.integer("tpm", positive=True),
        rpm=table.integer("rpm", positive=True),
        priority=table.integer("priority", 0),
        proxy=_read_proxy(table, allow_direct=True),
        ca_file=_read_ca_file(table, base_dir),
        **_read_oauth(table, chatgpt),
    )
    if chatgpt and account.api_key_env is not None:
        table.error(
            "api_key_env",
            "a codex-chatgpt account has no API key: its OAuth tokens are imported with "
            "`relay accounts import-codex-auth`",
        )
    table.finish({"api_key": _SECRET_HINT})
    return account


def _read_oauth(table: _Table, chatgpt: bool) -> dict[str, Any]:
    """``token_url`` and ``client_id`` of a codex-chatgpt account (defaults: OpenAI's)."""
    if not chatgpt:
        return {}
    token_url = table.string("token_url", CHATGPT_TOKEN_URL)
    problem = base_url_problem(token_url)
    if problem is not None:
        table.error("token_url", f"{problem}, got {_show(token_url)}")
    return {"token_url": token_url, "client_id": table.string("client_id", CODEX_CLIENT_ID)}


def _read_alias(name: str, table: _Table) -> ModelAlias:
    problem = pattern_problem(name)
    if problem is not None:
        table.issues.append(ConfigIssue(table.path, f"pattern {name!r}: {problem}"))
    alias = ModelAlias(
        name=name,
        target=table.string("target", required=True) or "",
        reasoning_effort=table.choice("reasoning_effort", REASONING_EFFORTS),
    )
    table.finish()
    return alias


def _read_price(model: str, table: _Table) -> Price:
    price = Price(
        model=model,
        input=table.number("input", 0.0, non_negative=True, required=True),
        cached_input=table.number("cached_input", None, non_negative=True),
        output=table.number("output", 0.0, non_negative=True, required=True),
        cache_write=table.number("cache_write", None, non_negative=True),
    )
    table.finish()
    return price


def parse_config(
    data: Mapping[str, Any], *, base_dir: Path | None = None, source: str | None = None
) -> Config:
    """Validate an already-parsed TOML document and build the :class:`Config`.

    ``base_dir`` is the directory relative paths (``server.database``) are resolved against;
    ``None`` means the working directory. Raises :class:`ConfigError` listing every problem.
    """
    issues: list[ConfigIssue] = []
    if not isinstance(data, Mapping):
        raise ConfigError(
            [ConfigIssue(source or "<config>", f"must be a table, got {_show(data)}")],
            source=source,
        )
    root = _Table(data, "", issues)

    server_data = _table_at(root, "server")
    server = _read_server(_Table(server_data or {}, "server", issues), base_dir)
    global_data = _table_at(root, "global")
    global_ = _read_global(_Table(global_data or {}, "global", issues))

    pools = {
        name: _read_pool(name, table)
        for name, table in _named_tables(root, "pools", check_name=True)
    }
    packages = {
        name: _read_package(name, table, pools)
        for name, table in _named_tables(root, "packages", check_name=True)
    }

    accounts: list[AccountConfig] = []
    raw_accounts = root.raw("accounts")
    if raw_accounts is not _MISSING:
        if not isinstance(raw_accounts, list | tuple):
            message = f"must be an array of tables ([[accounts]]), got {_show(raw_accounts)}"
            root.error("accounts", message)
        else:
            seen_names: dict[str, str] = {}
            for index, entry in enumerate(raw_accounts):
                path = f"accounts[{index}]"
                if not isinstance(entry, Mapping):
                    issues.append(ConfigIssue(path, f"must be a table, got {_show(entry)}"))
                    continue
                accounts.append(
                    _read_account(_Table(entry, path, issues), pools, seen_names, base_dir)
                )

    alias_tables = _named_tables(root, "models", check_name=False)
    aliases = {name: _read_alias(name, table) for name, table in alias_tables}
    for name, table in alias_tables:
        target = aliases[name].target
        if target != name and target in aliases:
            table.error(
                "target",
                f"{target!r} is itself an alias; aliases do not chain, name the model directly",
            )

    prices = {
        model: _read_price(model, table)
        for model, table in _named_tables(root, "prices", check_name=False)
    }
    root.finish()

    if issues:
        raise ConfigError(issues, source=source)
    return Config(
        server=server,
        global_=global_,
        pools=MappingProxyType(pools),
        packages=MappingProxyType(packages),
        accounts=tuple(accounts),
        models=MappingProxyType(aliases),
        prices=MappingProxyType(prices),
        source=source,
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the TOML file at ``path``.

    A missing or unreadable file and a TOML syntax error are :class:`ConfigError` too, with the
    file as the issue's path (tomllib's message carries the line and column), so callers handle
    one exception for every way the configuration can be unusable.
    """
    file = Path(path)
    source = str(file)
    try:
        with file.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(source, "file not found")], source=source) from None
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror or exc}"
        raise ConfigError([ConfigIssue(source, message)], source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue(source, f"invalid TOML: {exc}")], source=source) from None
    except UnicodeDecodeError as exc:
        message = f"invalid TOML: the file is not UTF-8 ({exc.reason} at byte {exc.start})"
        raise ConfigError([ConfigIssue(source, message)], source=source) from None
    return parse_config(data, base_dir=file.resolve().parent, source=source)
