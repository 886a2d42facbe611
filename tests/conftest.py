"""Real servers on loopback for the tests: the simulated upstream and the relay, each in its own
process started through its command line (exactly as a user starts them), and helpers to talk
to them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest

from relay.testing.postgres import PG_PASSWORD, PostgresServer

ROOT = Path(__file__).resolve().parent.parent
SIM_KEY = "sim-upstream-key"
ADMIN_TOKEN = "test-admin-token"
#: Relays and the CLI read the test PostgreSQL's password from the variable
#: ``server.database_password_env`` names (set for this process and its children).
PG_PASSWORD_ENV = "RELAY_TEST_PG_PASSWORD"
os.environ[PG_PASSWORD_ENV] = PG_PASSWORD


@dataclass
class Process:
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()


def start_process(args: list[str], pattern: str, log: Path, env: dict | None = None) -> Process:
    """Start a server process and wait for the line that says where it listens."""
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=out,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return Process(proc, match.group(1), log)
    proc.kill()
    raise RuntimeError(f"{args} did not start:\n{log.read_text()}")


class Sim:
    """The simulated upstream, seen from a test: its URL and its request log."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.url = process.url
        self.http = httpx2.Client(base_url=self.url, timeout=10)

    def requests(self) -> list[dict]:
        return self.http.get("/_sim/requests").json()

    def reset(self) -> None:
        self.http.post("/_sim/reset").raise_for_status()

    def stats(self) -> dict:
        return self.http.get("/_sim/stats").json()


@dataclass
class Relay:
    """The relay process, its config and database, and handy clients."""

    process: Process
    config_path: Path
    database: Path
    url: str
    keys: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "relay", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )

    def create_key(self, package: str = "team", name: str = "test") -> str:
        done = self.cli(
            "keys", "create", "--config", str(self.config_path), "--package", package,
            "--name", name, "--json",
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["key"]

    def key(self, package: str = "team") -> str:
        if package not in self.keys:
            self.keys[package] = self.create_key(package)
        return self.keys[package]

    def usage_row(self, request_id: str) -> dict:
        """The usage row of one request, waiting for the writer to commit it."""
        rows = self.usage_rows(request_id)
        return next(row for row in rows if row["request_id"] == request_id)

    def state(self) -> dict:
        response = httpx2.get(
            self.url + "/admin/state", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        response.raise_for_status()
        return response.json()

    def admin(self, method: str, path: str, body: dict | None = None) -> httpx2.Response:
        """A call to the admin API with the admin token."""
        return httpx2.request(
            method, self.url + path, json=body, timeout=10,
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        )

    def create_paid_key(self, package: str = "paid", credits: str | None = None) -> tuple[str, str]:
        """A new key of ``package`` (optionally with ``credits``): ``(key, key id)``."""
        return self.create_key_with_id(package, "billing test", credits)

    def create_key_with_id(
        self, package: str = "team", name: str = "test", credits: str | None = None
    ) -> tuple[str, str]:
        """A new key of ``package``: ``(key, key id)`` (its usage rows are its own)."""
        args = ["--credits", credits] if credits is not None else []
        done = self.cli(
            "keys", "create", "--config", str(self.config_path), "--package", package,
            "--name", name, "--json", *args,
        )
        assert done.returncode == 0, done.stderr
        created = json.loads(done.stdout)
        return created["key"], created["id"]

    def enable_accounts(self) -> None:
        """Put every account back in service (an upstream 401/403 takes one out)."""
        for name in self.state()["accounts"]:
            httpx2.post(
                f"{self.url}/admin/accounts/{name}/enable",
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            ).raise_for_status()

    def wait_idle(self, timeout: float = 5.0) -> dict:
        """Poll until no relay request is in flight and no slot is held; return that state."""
        deadline = time.monotonic() + timeout
        state = self.state()
        while time.monotonic() < deadline:
            if _idle(state):
                return state
            time.sleep(0.02)
            state = self.state()
        return state

    def usage_rows(self, request_id: str | None = None, timeout: float = 5.0) -> list[dict]:
        """Usage rows (newest first), waiting for ``request_id``'s row when one is named."""
        deadline = time.monotonic() + timeout
        while True:
            connection = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
            connection.row_factory = sqlite3.Row
            try:
                rows = [dict(row) for row in connection.execute(
                    "select * from usage order by id desc"
                )]
            finally:
                connection.close()
            if request_id is None or any(r["request_id"] == request_id for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"no usage row for {request_id}")
            time.sleep(0.02)


def _idle(state: dict) -> bool:
    return (
        state["active_requests"] == 0
        and state["admission"]["total"] == 0
        and not any(account["in_flight"] for account in state["accounts"].values())
        and state["credits"]["holds"] == 0
    )


def server_section(database: Path, **server: object) -> str:
    extra = "".join(f"{name} = {json.dumps(value)}\n" for name, value in server.items())
    return textwrap.dedent(
        f"""\
        [server]
        listen = "127.0.0.1:0"
        database = "{database}"
        admin_token_env = "RELAY_TEST_ADMIN_TOKEN"
        """
    ) + extra


def relay_config(sim_url: str, database: Path, **server: object) -> str:
    return server_section(database, **server) + textwrap.dedent(
        f"""
        [pools.main]
        max_concurrency = 100

        [packages.team]
        pool = "main"
        max_concurrency = 50

        [packages.live]
        pool = "main"
        key_prefix = "sk-live-"

        [[accounts]]
        name = "sim-responses"
        pool = "main"
        provider = "openai-responses"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["gpt-5.5", "gpt-5"]

        [[accounts]]
        name = "sim-chat"
        pool = "main"
        provider = "openai-chat"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["gpt-5.5", "gpt-5", "deepseek-chat"]

        [[accounts]]
        name = "sim-anthropic"
        pool = "main"
        provider = "anthropic"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["claude-sim"]

        [[accounts]]
        name = "nowhere"
        pool = "main"
        provider = "openai-chat"
        base_url = "http://127.0.0.1:9/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["unreachable-model"]

        [models.gpt-5-high]
        target = "gpt-5"
        reasoning_effort = "high"
        """
    )


#: A relay that bills: prices high enough that every token shows in the credits (1 credit per
#: 1,000 input tokens), a small tight package for queue and balance tests, a free model.
BILLING_BODY = textwrap.dedent(
    """
    [pools.main]
    max_concurrency = 100

    [packages.paid]
    pool = "main"
    max_concurrency = 40
    initial_credits = 10

    [packages.tight]
    pool = "main"
    max_concurrency = 1
    max_queue = 8
    queue_timeout_s = 0.5
    initial_credits = 10

    [[accounts]]
    name = "sim-responses"
    pool = "main"
    provider = "openai-responses"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["gpt-5.5", "gpt-5", "gpt-free"]

    [[accounts]]
    name = "sim-chat"
    pool = "main"
    provider = "openai-chat"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["gpt-5.5", "gpt-5", "deepseek-chat", "gpt-free"]

    [models.gpt-5-high]
    target = "gpt-5"
    reasoning_effort = "high"

    [models.gpt-5-low]
    target = "gpt-5"
    reasoning_effort = "low"

    [prices.gpt-5]
    input = 1000
    cached_input = 100
    output = 2000

    [prices."gpt-5.5"]
    input = 1250.5
    output = 3000.25

    [prices.deepseek-chat]
    input = 270
    cached_input = 70
    output = 1100

    [prices.gpt-5-high]
    input = 3000
    cached_input = 300
    output = 6000
    """
)


def start_relay(
    tmp: Path, sim_url: str, *, body: str | None = None, log_level: str = "WARNING",
    database: Path | None = None, **server: object,
) -> Relay:
    """Start ``relay serve`` with the standard test config, or with [server] and ``body``;
    its database is ``tmp/relay.db`` unless ``database`` names another (one several relays
    share)."""
    database = database or tmp / "relay.db"
    config_path = tmp / "relay.toml"
    if body is None:
        text = relay_config(sim_url, database, **server)
    else:
        text = server_section(database, **server) + body.replace("SIM_URL", sim_url)
    config_path.write_text(text)
    process = start_process(
        ["-m", "relay", "serve", "--config", str(config_path)],
        r"relay listening on (\S+)",
        tmp / "relay.log",
        env={
            "SIM_UPSTREAM_KEY": SIM_KEY,
            "RELAY_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
            "RELAY_LOG_LEVEL": log_level,
        },
    )
    return Relay(process, config_path, database, process.url)


@contextmanager
def running_relay(tmp: Path, sim_url: str, **options: object) -> Iterator[Relay]:
    """``start_relay(tmp, sim_url, **options)`` for a block (a test module's fixture); when the
    relay stops, its log must hold no traceback."""
    server = start_relay(tmp, sim_url, **options)
    try:
        yield server
    finally:
        log = server.process.stop()
    assert "Traceback" not in log, log


class RedisServer:
    """A real ``redis-server`` (Debian's package) on a free loopback port, persistence off.

    ``stop`` and ``start`` keep the port, so a test can take Redis away under load and bring it
    back at the same URL."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (scripts/test installs Debian's package)"
        self.proc = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--protected-mode", "no",
            ],
            stdout=open(self.directory / "redis.log", "a"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.02)
        log = (self.directory / "redis.log").read_text()
        raise RuntimeError(f"redis-server did not start:\n{log}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command in Redis's inline protocol (tests only): the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
            conn.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
            return conn.recv(1 << 16)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real Redis for the session; tests that share it use their own key prefix or flush
    it first (:func:`redis_url`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test (and started again if a test stopped it)."""
    if not redis_server.ping():
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session; each test takes a database of its own
    (:func:`ledger_database`, :meth:`PostgresServer.create_database`)."""
    server = PostgresServer()
    server.start()
    yield server
    try:
        server.stop("immediate")
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's ledger lives, once per backend: an SQLite file, then a fresh PostgreSQL
    database (open it with :func:`open_ledger`)."""
    if request.param == "sqlite":
        return str(tmp_path / "r.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    if not server.running():
        server.start()
    return server.create_database()


def open_ledger(database: str):
    """The store of ``database`` (either backend), as the relay opens it."""
    from relay.ledger.backend import open_store

    return open_store(database, password_env=PG_PASSWORD_ENV)


@pytest.fixture(scope="session")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    process = start_process(
        [
            "-m", "relay.testing.upstream", "--port", "0", "--api-key", SIM_KEY,
            "--ttft", "0.01", "--token-delay", "0.002", "--tokens", "12",
        ],
        r"listening on (\S+)",
        log,
    )
    yield Sim(process)
    process.stop()


@pytest.fixture(scope="session")
def billed(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay with prices and credits (:data:`BILLING_BODY`)."""
    server = start_relay(tmp_path_factory.mktemp("billed"), sim.url, body=BILLING_BODY)
    yield server
    log = server.process.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="session")
def relay(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("relay"), sim.url, stall_timeout_s=2.0) as server:
        yield server
