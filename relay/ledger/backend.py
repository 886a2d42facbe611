"""The ledger's store: one interface, two backends, chosen by ``server.database``.

A path (or ``:memory:``) is an SQLite file (``relay/ledger/store.py``: embedded, the default);
a ``postgresql://user@host:port/db`` URL is a PostgreSQL database several relay hosts share
(``relay/ledger/postgres.py``), its password read from the environment variable that
``server.database_password_env`` names, never from the file. Both have the same tables, the same
queries and the same guarantees (a usage batch and its debits are one transaction; a key and its
grant are one transaction); nothing outside ``relay/ledger/`` knows which one is in use: it calls
:func:`open_store` and the methods of :class:`LedgerStore`.

Every method is synchronous (sqlite-utils and psycopg's synchronous API): the relay calls them
through ``trio.to_thread.run_sync``, the CLI directly. A store raises :class:`StoreUnavailable`
when its database cannot be reached right now (a lost connection, a server restarting): the
usage writer keeps the records in memory and retries, the key ring keeps its keys.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from .store import KeyRecord

#: What a PostgreSQL ``server.database`` starts with.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoreError(Exception):
    """The ledger's database cannot be opened or used; the message says why, to show as is."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now (connection lost or refused, server restarting, pool
    exhausted): nothing was written by the call that raised it, or it is safe to repeat."""


def is_postgres_url(database: str | os.PathLike[str]) -> bool:
    return isinstance(database, str) and database.startswith(POSTGRES_SCHEMES)


class LedgerStore(Protocol):
    """What the relay, the admin API and the CLI use of a store (both backends)."""

    #: ``"sqlite"`` or ``"postgresql"`` (for messages and benchmarks only).
    backend: str
    #: The file or URL, as messages may show it (never a password).
    path: str

    def close(self) -> None: ...

    def create_key(
        self, package: str, *, prefix: str, name: str = "", limits: dict | None = None,
        credits_nano: int = 0, expires_at: float | None = None,
    ) -> tuple[str, KeyRecord]: ...

    def top_up(self, key_or_id: str, amount_nano: int, note: str = "") -> KeyRecord | None: ...

    def grants(self, key_id: str, limit: int = 100) -> list[dict]: ...

    def get_key(self, key_or_id: str) -> KeyRecord | None: ...

    def list_keys(self) -> list[KeyRecord]: ...

    def find_key(self, key_hash: str) -> KeyRecord | None: ...

    def set_expiry(self, key_or_id: str, expires_at: float | None) -> KeyRecord | None: ...

    def rotate_key(
        self, key_or_id: str, grace_s: float = 0.0
    ) -> tuple[str, KeyRecord] | None: ...

    def set_limits(self, key_or_id: str, limits: dict) -> KeyRecord | None: ...

    def revoke_key(self, key_or_id: str) -> KeyRecord | None: ...

    def data_version(self) -> int:
        """Changes whenever another connection (process, host) changed a key."""
        ...

    def sealed_tokens(self, account: str) -> str | None:
        """A ``codex-chatgpt`` account's sealed OAuth tokens (relay/ledger/vault.py), or None."""
        ...

    def put_sealed_tokens(self, account: str, sealed: str) -> None: ...

    def take_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """A leased lock among the processes sharing the ledger (the refresh of a token)."""
        ...

    def release_lock(self, name: str, owner: str) -> None: ...

    def insert_usage(self, records: Iterable[dict]) -> int: ...

    def usage_summary(
        self, key_id: str | None, start: float, end: float, group_by: str | None = None
    ) -> tuple[dict, list[dict]]: ...

    def daily_costs(
        self, key_id: str, start: float, end: float
    ) -> list[tuple[str, str, int]]: ...

    def usage_by_key(self) -> dict[str, dict]: ...

    def usage_rows(self, *, key_id: str | None = None, limit: int = 1000) -> list[dict]: ...


def open_store(
    database: str | os.PathLike[str], *, password_env: str | None = None
) -> LedgerStore:
    """The store ``database`` names, its tables made or migrated; :class:`StoreError` (with a
    message to show) when it cannot be opened. ``password_env``: the environment variable that
    holds a PostgreSQL password (unused for SQLite)."""
    if is_postgres_url(database):
        from .postgres import PostgresStore

        password = None
        if password_env:
            password = os.environ.get(password_env)
            if password is None:
                raise StoreError(
                    f"server.database_password_env names {password_env}, which is not set: "
                    f"export {password_env} with the database user's password"
                )
        return PostgresStore(str(database), password=password)
    from .store import Store

    try:
        return Store(database)
    except (sqlite3.DatabaseError, OSError) as error:
        raise StoreError(f"cannot open the database {Path(database)}: {error}") from None
