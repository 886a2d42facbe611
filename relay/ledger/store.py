"""The SQLite store: API keys (as hashes) and usage records.

sqlite-utils is synchronous, so every method here is a plain function meant to be called through
``trio.to_thread.run_sync`` (or from the CLI directly). One connection is shared behind a lock;
WAL mode lets the CLI create or revoke keys while a relay process is serving.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

#: Random characters after the prefix: 32 URL-safe characters carry 192 bits.
KEY_RANDOM_CHARS = 32


def hash_key(plaintext: str) -> str:
    """SHA-256 of the key: keys are random and long, so a fast unsalted hash is enough."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_plaintext_key(prefix: str) -> str:
    random_part = secrets.token_urlsafe(KEY_RANDOM_CHARS)[:KEY_RANDOM_CHARS]
    return prefix + random_part


@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored: never the plaintext, only its hash and a recognisable hint."""

    id: str
    key_hash: str
    hint: str
    name: str
    package: str
    created_at: float
    revoked_at: float | None = None
    limits: dict = field(default_factory=dict)  # the key's own overrides of its package's

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @classmethod
    def from_row(cls, row: dict) -> KeyRecord:
        return cls(
            id=row["id"],
            key_hash=row["key_hash"],
            hint=row["hint"],
            name=row["name"] or "",
            package=row["package"],
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
            limits=json.loads(row.get("limits") or "{}"),
        )

    def public(self) -> dict:
        """What the CLI and admin API may show: everything except the hash."""
        return {
            "id": self.id,
            "hint": self.hint,
            "name": self.name,
            "package": self.package,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "active": self.active,
            "limits": self.limits,
        }


USAGE_COLUMNS = {
    "ts": float,
    "request_id": str,
    "key_id": str,
    "package": str,
    "endpoint": str,
    "model": str,
    "upstream_model": str,
    "account": str,
    "stream": int,
    "status": int,
    "error_code": str,
    "input_tokens": int,
    "cached_tokens": int,
    "output_tokens": int,
    "reasoning_tokens": int,
    "usage_source": str,
    "latency_ms": float,
    "ttft_ms": float,
    "queue_ms": float,
    "client_disconnected": int,
}


_INSERT_USAGE = (
    f"insert into usage ({', '.join(USAGE_COLUMNS)}) "
    f"values ({', '.join('?' for _ in USAGE_COLUMNS)})"
)


class Store:
    """Keys and usage in one SQLite file (or ``:memory:``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        self.db = sqlite_utils.Database(connection)
        if self.path != ":memory:":
            self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            keys = self.db["api_keys"]
            if not keys.exists():
                keys.create(
                    {
                        "id": str,
                        "key_hash": str,
                        "hint": str,
                        "name": str,
                        "package": str,
                        "created_at": float,
                        "revoked_at": float,
                    },
                    pk="id",
                    not_null={"key_hash", "package", "created_at"},
                )
                keys.create_index(["key_hash"], unique=True)
            if "limits" not in keys.columns_dict:
                keys.add_column("limits", str)
            usage = self.db["usage"]
            if not usage.exists():
                usage.create({"id": int, **USAGE_COLUMNS}, pk="id")
                usage.create_index(["key_id", "ts"])

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # -- keys -----------------------------------------------------------------------------

    def create_key(
        self, package: str, *, prefix: str, name: str = "", limits: dict | None = None
    ) -> tuple[str, KeyRecord]:
        """Create a key and return ``(plaintext, record)``; the plaintext is not kept."""
        plaintext = new_plaintext_key(prefix)
        record = KeyRecord(
            id="key_" + secrets.token_hex(8),
            key_hash=hash_key(plaintext),
            hint=f"{plaintext[: len(prefix) + 4]}…{plaintext[-4:]}",
            name=name,
            package=package,
            created_at=time.time(),
            limits=dict(limits or {}),
        )
        with self._lock:
            self.db["api_keys"].insert(
                {
                    "id": record.id,
                    "key_hash": record.key_hash,
                    "hint": record.hint,
                    "name": record.name,
                    "package": record.package,
                    "created_at": record.created_at,
                    "revoked_at": None,
                    "limits": json.dumps(record.limits),
                }
            )
        return plaintext, record

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = list(self.db["api_keys"].rows_where(order_by="created_at"))
        return [KeyRecord.from_row(row) for row in rows]

    def find_key(self, key_hash: str) -> KeyRecord | None:
        with self._lock:
            rows = list(self.db["api_keys"].rows_where("key_hash = ?", [key_hash], limit=1))
        return KeyRecord.from_row(rows[0]) if rows else None

    def set_limits(self, key_or_id: str, limits: dict) -> KeyRecord | None:
        """Replace a key's own limit overrides (by id or plaintext); None if no such key."""
        with self._lock:
            rows = list(
                self.db["api_keys"].rows_where(
                    "id = ? or key_hash = ?", [key_or_id, hash_key(key_or_id)], limit=1
                )
            )
            if not rows:
                return None
            row = rows[0]
            row["limits"] = json.dumps(limits)
            self.db["api_keys"].update(row["id"], {"limits": row["limits"]})
        return KeyRecord.from_row(row)

    def revoke_key(self, key_or_id: str) -> KeyRecord | None:
        """Revoke by id (``key_…``) or by the plaintext key; None when no such key exists."""
        with self._lock:
            rows = list(
                self.db["api_keys"].rows_where(
                    "id = ? or key_hash = ?", [key_or_id, hash_key(key_or_id)], limit=1
                )
            )
            if not rows:
                return None
            row = rows[0]
            if row["revoked_at"] is None:
                row["revoked_at"] = time.time()
                self.db["api_keys"].update(row["id"], {"revoked_at": row["revoked_at"]})
        return KeyRecord.from_row(row)

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap "did anything change?"."""
        with self._lock:
            return self.db.execute("PRAGMA data_version").fetchone()[0]

    # -- usage ----------------------------------------------------------------------------

    def insert_usage(self, records: Iterable[dict]) -> int:
        """Insert usage rows (dicts with :data:`USAGE_COLUMNS`) in one transaction.

        A prepared ``executemany`` rather than sqlite-utils' ``insert_all``, which re-reads the
        schema on every call: this runs for every batch the writer flushes.
        """
        rows = [tuple(row[name] for name in USAGE_COLUMNS) for row in records]
        if rows:
            with self._lock:
                with self.db.conn:
                    self.db.conn.executemany(_INSERT_USAGE, rows)
        return len(rows)

    def usage_rows(self, *, key_id: str | None = None, limit: int = 1000) -> list[dict]:
        with self._lock:
            if key_id is None:
                return list(self.db["usage"].rows_where(order_by="id desc", limit=limit))
            return list(
                self.db["usage"].rows_where(
                    "key_id = ?", [key_id], order_by="id desc", limit=limit
                )
            )
