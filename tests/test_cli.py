"""The ``relay`` command line: demo (its printed curl and Codex snippet work as printed), keys,
check-config."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
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
