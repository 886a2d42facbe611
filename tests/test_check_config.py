"""``relay check-config`` means it: what it refuses is named by its TOML key (and ``relay serve``
refuses it too), what it accepts the relay serves without a 500, and an account whose key
variable is unset shows as "missing credentials" in the CLI, the admin API and ``/metrics``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from .conftest import ADMIN_TOKEN, ROOT, Relay, Sim, running_relay
from .test_admin import cli as admin_cli
from .test_metrics import scrape, value

UNSET_KEY_ENV = "RELAY_TEST_NEVER_SET_KEY"


def relay_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, **(env or {})}
    environ.pop(UNSET_KEY_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env=environ,
    )


def config_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(textwrap.dedent(body))
    return path


def one_account(base_url: str = "https://api.example.com/v1", extra: str = "") -> str:
    """A servable file with one account; ``extra`` is appended (aliases, prices, ...)."""
    # A JSON string is a TOML basic string for every URL of the table below.
    return textwrap.dedent(
        """\
        [pools.main]

        [packages.team]
        pool = "main"

        [[accounts]]
        name = "a"
        pool = "main"
        provider = "openai-chat"
        base_url = BASE_URL
        models = ["gpt-5", "deepseek-chat"]
        """
    ).replace("BASE_URL", json.dumps(base_url, ensure_ascii=False)) + textwrap.dedent(extra)


def assert_refused(done: subprocess.CompletedProcess, *paths: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    for path in paths:
        assert f"  {path}: " in done.stderr, (path, done.stderr)


# Each is refused by check-config at accounts[0].base_url; before, most of them passed and
# several answered every request with a 500.
MALFORMED_BASE_URLS = [
    "",
    "api.openai.com/v1",
    "ftp://api.example.com/v1",
    "mailto:ops@example.com",
    "https//api.example.com/v1",
    "http:/api.example.com",
    "http://",
    "https:///v1",
    "http://:8080/v1",
    "http://api.example.com:0/v1",
    "http://api.example.com:65536/v1",
    "http://api.example.com:99999/v1",
    "http://api.example.com:-1/v1",
    "http://api.example.com:http/v1",
    "http://api.example.com:/v1",
    "http://api.example.com:8080:9090/v1",
    "http://api.example.com/v1?api-version=2024",
    "http://api.example.com/v1?",
    "http://api.example.com/v1#top",
    "http://[::1/v1",
    "http://[not-an-ip]/v1",
    "http://[::1]8080/v1",
    "http://api .example.com/v1",
    " https://api.example.com/v1",
    "https://api.example.com/v1 ",
    "https://api.example.com/v 1",
    "https://api.example.com/v1\n",
    "https://user:secret@api.example.com/v1",
    "https://api.exämple.com/v1",
    "https://api.example.com/vé",
    "https://api.example.com/%zz",
    "https://api..example.com/v1",
    "https://-api.example.com/v1",
]


@pytest.mark.parametrize("base_url", MALFORMED_BASE_URLS)
def test_check_config_refuses_a_malformed_base_url_naming_its_key(
    tmp_path: Path, base_url: str
) -> None:
    done = relay_cli("check-config", str(config_file(tmp_path, one_account(base_url))))
    assert_refused(done, "accounts[0].base_url")
    assert "OK" not in done.stdout


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (one_account("http://api.example.com:0/v1"), "accounts[0].base_url"),
        (one_account(extra='[models.fast]\ntarget = "gpt-9"\n'), "models.fast.target"),
        ("", "accounts"),
    ],
    ids=["base-url", "alias", "empty"],
)
def test_serve_refuses_what_check_config_refuses(tmp_path: Path, body: str, path: str) -> None:
    done = relay_cli("serve", "--config", str(config_file(tmp_path, body)))
    assert_refused(done, path)
    assert "listening" not in done.stdout


def test_an_empty_file_is_refused_at_accounts(tmp_path: Path) -> None:
    done = relay_cli("check-config", str(config_file(tmp_path, "")))
    assert_refused(done, "accounts")
    assert "defines nothing to serve" in done.stderr


def test_a_file_without_accounts_is_refused_at_accounts(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[pools.main]\n\n[packages.team]\npool = "main"\n')
    done = relay_cli("check-config", str(path))
    assert_refused(done, "accounts")
    assert "no [[accounts]] entry" in done.stderr


def test_an_alias_or_pattern_to_a_model_no_account_serves_is_refused(tmp_path: Path) -> None:
    extra = """
    [models.gpt-5-high]
    target = "gpt-5"
    reasoning_effort = "high"

    [models."claude.fast"]
    target = "claude-sonnet"

    [models."claude-*"]
    target = "gemini-pro"
    """
    done = relay_cli("check-config", str(config_file(tmp_path, one_account(extra=extra))))
    # A pattern-like name ("claude-*") is an alias like any other: its target is checked too.
    assert_refused(done, 'models."claude.fast".target', 'models."claude-*".target')
    assert "no account serves 'gemini-pro'" in done.stderr
    assert "no account serves 'claude-sonnet'" in done.stderr
    assert "served: deepseek-chat, gpt-5" in done.stderr
    assert "gpt-5-high" not in done.stderr  # its target is served


def test_package_models_that_no_account_of_its_pool_serves_are_refused(tmp_path: Path) -> None:
    body = one_account(
        extra="""
        [pools.other]

        [packages.other-team]
        pool = "other"
        models = ["qwen-max"]

        [packages.picky]
        pool = "main"
        models = ["gpt-5", "gpt-5-high", "deepseek-chat", "qwen-max", "shadow"]

        [models.gpt-5-high]
        target = "gpt-5"

        [models.shadow]
        target = "qwen-max"

        [[accounts]]
        name = "qwen"
        pool = "other"
        provider = "openai-chat"
        base_url = "https://dashscope.example.com/compatible-mode/v1"
        models = ["qwen-max"]
        """
    )
    done = relay_cli("check-config", str(config_file(tmp_path, body)))
    # qwen-max is served, but in pool "other": the picky package (pool "main") cannot reach it.
    assert_refused(done, "packages.picky.models[3]", "packages.picky.models[4]")
    assert "no account of pool 'main' serves 'qwen-max'" in done.stderr
    assert "'shadow' (an alias of 'qwen-max')" in done.stderr
    for fine in ("packages.picky.models[0]", "packages.picky.models[1]",
                 "packages.picky.models[2]", "packages.other-team"):
        assert fine not in done.stderr, done.stderr


def test_pattern_aliases_a_target_nobody_serves_or_a_misread_glob_are_refused(
    tmp_path: Path,
) -> None:
    extra = """
    [models."claude-sonnet-*"]
    target = "gpt-5"
    reasoning_effort = "high"

    [models."claude-opus-*"]
    target = "gpt-9"

    [models."claude-[haiku-*"]
    target = "deepseek-chat"

    [packages.claude-code]
    pool = "main"
    models = ["claude-sonnet-*", "claude-[0-9-*", "mistral-*"]
    """
    done = relay_cli("check-config", str(config_file(tmp_path, one_account(extra=extra))))
    # The globs fnmatch would misread are parse errors: reported first, each at its key.
    assert_refused(done, 'models."claude-[haiku-*"', "packages.claude-code.models[1]")
    lines = done.stderr.splitlines()
    assert any(
        line.startswith("  models.\"claude-[haiku-*\": pattern 'claude-[haiku-*': the '[' at "
                        "position 8 is never closed")
        for line in lines
    ), lines

    # Globs fixed: a pattern whose target nobody serves, and an allow-list pattern nothing can
    # match, are refused on one line each.
    extra = extra.replace("claude-[haiku-*", "claude-*haiku*").replace("[0-9-*", "[0-9]*")
    done = relay_cli("check-config", str(config_file(tmp_path, one_account(extra=extra))))
    assert_refused(done, 'models."claude-opus-*".target', "packages.claude-code.models[2]")
    lines = done.stderr.splitlines()
    assert (
        "  models.\"claude-opus-*\".target: no account serves 'gpt-9' "
        "(served: deepseek-chat, gpt-5)"
    ) in lines, lines
    assert (
        "  packages.claude-code.models[2]: no account of pool 'main' serves a model matching "
        "'mistral-*' (served: deepseek-chat, gpt-5)"
    ) in lines, lines
    assert "claude-sonnet-*" not in done.stderr  # its target is served
    assert len(lines) == 3, lines  # the heading and the two issues

    # Fixed, with a pattern that shadows nothing (fine): OK.
    extra = extra.replace('"gpt-9"', '"gpt-5"').replace(', "mistral-*"', "") + """
    [models."mistral-*"]
    target = "deepseek-chat"
    """
    done = relay_cli("check-config", str(config_file(tmp_path, one_account(extra=extra))))
    assert done.returncode == 0, done.stderr
    assert "4 model aliases" in done.stdout


def test_unused_prices_and_unset_key_variables_are_warnings_not_errors(tmp_path: Path) -> None:
    body = one_account(
        extra=f"""
        [[accounts]]
        name = "locked"
        pool = "main"
        provider = "openai-responses"
        base_url = "https://api.example.com/v1"
        api_key_env = "{UNSET_KEY_ENV}"
        models = ["gpt-5"]

        [models.gpt-5-high]
        target = "gpt-5"

        [prices.gpt-5]
        input = 1
        output = 2

        [prices.gpt-5-high]
        input = 3
        output = 6

        [prices.gpt-4o]
        input = 1
        output = 2
        """
    )
    done = relay_cli("check-config", str(config_file(tmp_path, body)))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: ")]
    assert any(
        line.startswith("warning: prices.gpt-4o: ") and "never applies" in line
        for line in warnings
    ), warnings
    assert any(
        line.startswith("warning: accounts[1].api_key_env: ")
        and UNSET_KEY_ENV in line and "missing credentials" in line
        for line in warnings
    ), warnings
    assert not any("prices.gpt-5" in line for line in warnings), warnings  # served, an alias
    assert "OK" in done.stdout


# -- what check-config accepts, the relay serves ------------------------------------------------

# Spellings check-config accepts: each account serves its own model, so a request reaches it.
# {sim} is the simulated upstream's host:port; the last one is valid but nothing listens there.
ACCEPTED = [
    ("plain", "http://{sim}/v1", 200),
    ("trailing-slash", "http://{sim}/v1/", 200),
    ("upper-case-scheme", "HTTP://{sim}/v1", 200),
    ("localhost", "http://localhost:{port}/v1", 200),
    ("percent-encoded", "http://{sim}/v1/%2e%2e/v1", 404),
    ("ipv6-loopback", "http://[::1]:{port}/v1", None),
    ("nobody-listens", "http://127.0.0.1:9/v1", 502),
    ("unresolvable", "https://relay-test.invalid/v1", 502),
]


def _accepted_body(sim: Sim) -> str:
    hostport = sim.url.removeprefix("http://")
    port = hostport.rsplit(":", 1)[1]
    accounts = "".join(
        textwrap.dedent(
            f"""
            [[accounts]]
            name = "{name}"
            pool = "main"
            provider = "openai-chat"
            base_url = "{url.format(sim=hostport, port=port)}"
            api_key_env = "SIM_UPSTREAM_KEY"
            models = ["model-{name}"]
            """
        )
        for name, url, _ in ACCEPTED
    )
    missing = textwrap.dedent(
        f"""
        [[accounts]]
        name = "locked"
        pool = "main"
        provider = "openai-chat"
        base_url = "{sim.url}/v1"
        api_key_env = "{UNSET_KEY_ENV}"
        models = ["model-locked"]
        """
    )
    return '[pools.main]\n\n[packages.team]\npool = "main"\n' + accounts + missing


@pytest.fixture(scope="module")
def accepting(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    tmp = tmp_path_factory.mktemp("accepting")
    os.environ.pop(UNSET_KEY_ENV, None)
    body = _accepted_body(sim)
    check = relay_cli("check-config", str(config_file(tmp, body)))
    assert check.returncode == 0, check.stderr
    with running_relay(tmp, sim.url, body=body) as server:
        yield server


@pytest.mark.parametrize(("name", "status"), [(name, status) for name, _, status in ACCEPTED])
def test_what_check_config_accepts_is_served_without_a_500(
    accepting: Relay, name: str, status: int | None
) -> None:
    response = httpx2.post(
        accepting.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {accepting.key()}"},
        json={"model": f"model-{name}", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code < 500 or response.status_code in (502, 503, 504), response.text
    if status is not None:
        assert response.status_code == status, response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["message"]


def test_an_account_with_an_unset_key_variable_shows_missing_credentials(
    accepting: Relay,
) -> None:
    listed = admin_cli(accepting, "accounts", "list", "--url", accepting.url)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "missing credentials" in rows["locked"], listed.stdout
    assert "missing credentials" not in rows["plain"], listed.stdout

    response = httpx2.get(
        accepting.url + "/admin/accounts", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200
    accounts = {account["name"]: account for account in response.json()["data"]}
    assert accounts["locked"]["missing_credentials"] is True
    assert accounts["locked"]["healthy"] is False
    assert accounts["plain"]["missing_credentials"] is False

    samples = scrape(accepting)
    assert value(samples, "relay_account_missing_credentials", account="locked") == 1
    assert ("relay_account_missing_credentials", (("account", "plain"),)) in samples
    assert value(samples, "relay_account_missing_credentials", account="plain") == 0
    assert value(samples, "relay_account_healthy", account="locked") == 0


def test_check_config_reaches_the_redis_url(tmp_path: Path, redis_url: str) -> None:
    reachable = config_file(tmp_path, f'[server]\nredis_url = "{redis_url}"\n' + one_account())
    done = relay_cli("check-config", str(reachable))
    assert done.returncode == 0, done.stderr
    assert ": OK (" in done.stdout
    unreachable = tmp_path / "down.toml"
    unreachable.write_text(
        '[server]\nredis_url = "redis://:secret@127.0.0.1:1/0"\n' + one_account()
    )
    done = relay_cli("check-config", str(unreachable))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "server.redis_url: cannot reach Redis at redis://***@127.0.0.1:1/0" in done.stderr
    assert "ConnectionError" in done.stderr and "secret" not in done.stderr
