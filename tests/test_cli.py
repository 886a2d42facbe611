"""The ``relay`` command line: demo (its printed curl and Codex snippet work as printed), keys,
check-config."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, Relay
from .test_codex_cli import CODEX

EXAMPLE = ROOT / "config" / "relay.example.toml"


def relay_cli(*args: str, cwd: Path = ROOT, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True, text=True, cwd=cwd, timeout=60, env={**os.environ, **(env or {})},
    )


def test_demo_prints_commands_that_work_as_printed(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        banner = ""
        deadline = time.monotonic() + 30
        while "codex exec" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert "codex exec" in banner, proc.stderr.read() if proc.poll() is not None else banner
        key = re.search(r"API key:\s+(\S+)", banner).group(1)
        assert re.fullmatch(r"cr_[A-Za-z0-9_-]{32,}", key)
        assert (tmp_path / "relay-demo.db").exists()

        # The curl line, run exactly as printed, by a shell.
        curl = next(line.strip() for line in banner.splitlines() if line.strip().startswith("curl"))
        done = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=30)
        answer = json.loads(done.stdout)
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"].startswith("tok")

        # The config.toml snippet, pasted as printed, drives the real Codex CLI.
        snippet = banner.split("config.toml):", 1)[1].split("then:", 1)[0]
        toml = "\n".join(line[2:] for line in snippet.splitlines())
        home = tmp_path / "home" / ".codex"
        home.mkdir(parents=True)
        (home / "config.toml").write_text(toml)
        command = banner.split("then:", 1)[1].strip()
        assert command.startswith("codex exec")
        args = shlex.split(command)
        done = subprocess.run(
            [str(CODEX), *args[1:]], capture_output=True, text=True, timeout=120,
            cwd=tmp_path, stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": str(home.parent), "CODEX_HOME": str(home)},
        )
        assert done.returncode == 0, done.stderr
        assert "tok tok" in done.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "Traceback" not in stderr


def test_keys_create_list_revoke(relay: Relay) -> None:
    config = str(relay.config_path)
    done = relay_cli("keys", "create", "--config", config, "--package", "live", "--name", "ci")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert re.fullmatch(r"sk-live-[A-Za-z0-9_-]{32,}", key), key  # the package's prefix
    assert "shown only now" in done.stderr

    listing = json.loads(relay_cli("keys", "list", "--config", config, "--json").stdout)
    mine = [k for k in listing if k["name"] == "ci"]
    assert len(mine) == 1 and mine[0]["active"] and mine[0]["package"] == "live"
    assert key not in json.dumps(listing)  # only a hint, never the key
    assert mine[0]["hint"].startswith("sk-live-")

    table = relay_cli("keys", "list", "--config", config)
    assert mine[0]["id"] in table.stdout and key not in table.stdout

    revoked = relay_cli("keys", "revoke", mine[0]["id"], "--config", config)
    assert revoked.returncode == 0 and mine[0]["id"] in revoked.stdout
    listing = json.loads(relay_cli("keys", "list", "--config", config, "--json").stdout)
    assert not next(k for k in listing if k["id"] == mine[0]["id"])["active"]

    missing = relay_cli("keys", "revoke", "key_doesnotexist", "--config", config)
    assert missing.returncode == 1 and "no key matches" in missing.stderr


def test_keys_are_stored_as_hashes(relay: Relay) -> None:
    import hashlib
    import sqlite3

    key = relay.create_key(name="hash-check")
    connection = sqlite3.connect(relay.database)
    try:
        dump = "\n".join(connection.iterdump())
    finally:
        connection.close()
    assert key not in dump
    assert hashlib.sha256(key.encode()).hexdigest() in dump


def test_keys_create_unknown_package(relay: Relay) -> None:
    done = relay_cli("keys", "create", "--config", str(relay.config_path), "--package", "nope")
    assert done.returncode == 1
    assert "unknown package 'nope'" in done.stderr and "team" in done.stderr


def test_config_from_environment_variable(relay: Relay) -> None:
    done = relay_cli("keys", "list", "--json", env={"RELAY_CONFIG": str(relay.config_path)})
    assert done.returncode == 0 and isinstance(json.loads(done.stdout), list)
    missing = relay_cli("keys", "list", env={"RELAY_CONFIG": ""})
    assert missing.returncode == 1 and "RELAY_CONFIG" in missing.stderr


def test_check_config_accepts_the_example() -> None:
    done = relay_cli("check-config", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    assert "CODEX_1_KEY" in done.stdout  # unset secrets are reported as warnings


def test_check_config_reports_every_error_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nlisen = "x"\n\n[packages.p]\npool = "missing"\nmax_concurrency = -1\n\n'
        '[[accounts]]\nname = "a"\npool = "missing"\nprovider = "grpc"\n'
        'base_url = "ftp://x"\nmodels = ["m"]\n'
    )
    done = relay_cli("check-config", str(bad))
    assert done.returncode == 1
    for path in (
        "server.lisen",
        "packages.p.pool",
        "packages.p.max_concurrency",
        "accounts[0].pool",
        "accounts[0].provider",
        "accounts[0].base_url",
    ):
        assert path in done.stderr, (path, done.stderr)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv", [["keys"], []])
def test_usage_without_subcommand(argv: list[str]) -> None:
    done = relay_cli(*argv)
    assert done.returncode == 2
    assert "usage" in (done.stdout + done.stderr).lower()


# -- operator mistakes: one line on stderr, a non-zero exit, never a traceback --------------


def assert_one_line(done: subprocess.CompletedProcess, *needles: str, status: int = 1) -> None:
    """The command failed with ``status`` and said so in one line holding every needle."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def minimal_config(tmp_path: Path, listen: str = "127.0.0.1:0") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[server]\nlisten = "{listen}"\ndatabase = "{tmp_path / "relay.db"}"\n'
        'admin_token_env = "RELAY_TEST_ADMIN_TOKEN"\n\n'
        '[pools.main]\n\n[packages.team]\npool = "main"\n\n'
        '[[accounts]]\nname = "a"\npool = "main"\nprovider = "openai-chat"\n'
        'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "RELAY_TEST_UNSET_KEY"\n'
        'models = ["m"]\n'
    )
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_on_a_port_in_use(tmp_path: Path, busy_port: int) -> None:
    config = minimal_config(tmp_path, f"127.0.0.1:{busy_port}")
    done = relay_cli("serve", "--config", str(config))
    assert_one_line(done, f"127.0.0.1:{busy_port} is already in use")


def test_demo_on_a_port_in_use(tmp_path: Path, busy_port: int) -> None:
    done = relay_cli("demo", "--port", str(busy_port), cwd=tmp_path)
    assert_one_line(done, f"127.0.0.1:{busy_port} is already in use")


def test_serve_on_an_address_of_another_machine(tmp_path: Path) -> None:
    config = minimal_config(tmp_path, "192.0.2.1:8080")  # TEST-NET-1: never this host's
    done = relay_cli("serve", "--config", str(config))
    assert_one_line(done, "cannot listen on 192.0.2.1:8080", "not an address of this machine")


def unreadable(path: Path) -> list[str]:
    """``path`` made unreadable; the command prefix that runs ``relay`` without the power to
    read it anyway (root reads any file unless it gives up CAP_DAC_OVERRIDE)."""
    path.write_text("[server]\n")
    path.chmod(0)
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root, the test needs setpriv (util-linux) to drop privileges"
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


@pytest.mark.parametrize("via", ["--config", "RELAY_CONFIG"])
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "file not found"),
        ("directory", "cannot read the file: Is a directory"),
        ("unreadable", "cannot read the file: Permission denied"),
    ],
)
def test_config_missing_or_unreadable(tmp_path: Path, via: str, kind: str, message: str) -> None:
    path = tmp_path / "relay.toml"
    prefix: list[str] = []
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        prefix = unreadable(path)
    args = ["keys", "list"]
    env = {**os.environ, "RELAY_CONFIG": str(path)}
    if via == "--config":
        args += ["--config", str(path)]
        env.pop("RELAY_CONFIG")
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "relay", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env=env,
    )
    assert_one_line(done, f"relay: configuration {path}: {message}")


@pytest.mark.parametrize("args", [["keys", "list"], ["keys", "list", "--json"]])
def test_closed_pipe_ends_quietly(relay: Relay, args: list[str]) -> None:
    """``relay keys list | head -1``: the reader is gone before the listing is written."""
    relay.create_key(name="pipe")
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "relay", *args, "--config", str(relay.config_path)],
            stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60,
        )
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE
    assert done.stderr == ""  # no BrokenPipeError, no "Exception ignored"


@pytest.mark.parametrize(
    "command",
    [
        ["topup", "KEY", "5"],
        ["set-limits", "KEY", "--rpm", "5"],
        ["set-limits", "KEY", "--clear"],
        ["revoke", "KEY"],
    ],
)
@pytest.mark.parametrize("key", ["key_0000000000000000", "sk-no-such-key-0123456789"])
def test_unknown_key(relay: Relay, command: list[str], key: str) -> None:
    args = [key if part == "KEY" else part for part in command]
    done = relay_cli("keys", *args, "--config", str(relay.config_path))
    if key.startswith("key_"):
        assert_one_line(done, f"no key matches '{key}'")
    else:  # a plaintext is not echoed whole
        assert_one_line(done, f"no key matches '{key[:6]}…'")
        assert key[6:] not in done.stderr


def test_revoking_a_revoked_key(relay: Relay) -> None:
    key = relay.create_key(name="twice")
    config = str(relay.config_path)
    first = relay_cli("keys", "revoke", key, "--config", config)
    assert first.returncode == 0, first.stderr
    key_id = first.stdout.split()[1]
    again = relay_cli("keys", "revoke", key_id, "--config", config)
    assert_one_line(again, key_id, "is already revoked")


@pytest.mark.parametrize("command", [["accounts", "list"], ["queues"], ["accounts", "enable", "a"]])
def test_relay_not_reachable(tmp_path: Path, command: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = relay_cli(
        *command, "--config", str(minimal_config(tmp_path)), "--url", url,
        env={"RELAY_TEST_ADMIN_TOKEN": "x"},
    )
    assert_one_line(done, f"the relay at {url} is not reachable", "Connection refused")


def test_default_url_not_reachable(tmp_path: Path) -> None:
    """Without --url the configured listen address is asked, and named."""
    port = free_port()
    config = minimal_config(tmp_path, f"0.0.0.0:{port}")
    done = relay_cli("queues", "--config", str(config), env={"RELAY_TEST_ADMIN_TOKEN": "x"})
    assert_one_line(done, f"the relay at http://127.0.0.1:{port} is not reachable")


def test_url_that_is_not_http(tmp_path: Path) -> None:
    done = relay_cli(
        "queues", "--config", str(minimal_config(tmp_path)), "--url", "127.0.0.1:8080",
        env={"RELAY_TEST_ADMIN_TOKEN": "x"},
    )
    assert_one_line(done, "--url must be the relay's http:// or https:// address")


@pytest.mark.parametrize("command", [["keys", "list"], ["serve"]])
def test_database_that_is_not_sqlite(tmp_path: Path, command: list[str]) -> None:
    config = minimal_config(tmp_path)
    (tmp_path / "relay.db").write_text("not a database, " * 10)
    done = relay_cli(*command, "--config", str(config))
    assert_one_line(done, f"cannot open the database {tmp_path / 'relay.db'}", "not a database")
