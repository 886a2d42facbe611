"""A real PostgreSQL server for tests and benchmarks (not a simulation: Debian's own server
binaries, ``initdb`` and ``pg_ctl``, in a temporary folder on a free loopback port).

Used by ``tests/conftest.py`` (the ``postgres_server`` fixture) and ``bench/ledger.py``.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

#: The superuser ``initdb`` makes, and its password (password authentication over TCP).
PG_USER = "relay"
PG_PASSWORD = "relay-test-password"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pg_binary(name: str) -> str:
    """A PostgreSQL server program (Debian keeps them under /usr/lib/postgresql/VERSION/bin)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    path = found[-1] if found else shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} not found: scripts/test installs Debian's postgresql package")
    return path


class PostgresServer:
    """A real PostgreSQL (Debian's server) in a temporary folder, on a free loopback port,
    password authentication over TCP. As root, ``initdb`` and ``pg_ctl`` run as the ``postgres``
    user (``initdb`` refuses root). ``stop`` and ``start`` keep the port and the data, so a test
    can restart the server under load at the same URL."""

    _names = itertools.count(1)

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = free_port()
        self.as_owner: list[str] = []
        password_file = self.directory / "password"
        password_file.write_text(PG_PASSWORD + "\n")
        if os.geteuid() == 0:
            self.as_owner = ["runuser", "-u", "postgres", "--"]
            for path in (self.directory, password_file):
                shutil.chown(path, "postgres", "postgres")
        self._run(
            pg_binary("initdb"), "-D", str(self.data), "-U", PG_USER, "-E", "UTF8",
            "--pwfile", str(password_file), "--auth-host=scram-sha-256", "--auth-local=trust",
            "--no-sync",
        )

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self.as_owner, *args], capture_output=True, text=True, timeout=120
        )
        log = self.log.read_text() if self.log.exists() else ""
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed:\n{done.stdout}{done.stderr}\n{log}")

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.directory} -c fsync=off "
            "-c max_connections=200"
        )
        self._run(
            pg_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
            "-o", options, "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(pg_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, password=PG_PASSWORD,
            dbname=database, autocommit=True,
        )

    def create_database(self) -> str:
        """A new, empty database: its ``postgresql://`` URL (no password in it)."""
        name = f"relay_test_{os.getpid()}_{next(self._names)}"
        with self.connect() as conn:
            conn.execute(f"create database {name}")
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
