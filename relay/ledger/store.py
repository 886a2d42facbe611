"""The SQLite store: API keys (as hashes), their credits, usage records, the sealed OAuth
tokens of ``codex-chatgpt`` accounts (encrypted before they get here: relay/ledger/vault.py),
and leased locks (one process of those sharing the file refreshes an account's tokens).

sqlite-utils is synchronous, so every method here is a plain function meant to be called through
``trio.to_thread.run_sync`` (or from the CLI directly). One connection is shared behind a lock;
WAL mode lets the CLI create, top up or revoke keys while a relay process is serving, and
several processes (``relay serve --workers N``) write one file: readers never wait for a
writer, and a writer waits up to :data:`BUSY_TIMEOUT_S` for another's transaction instead of
failing with "database is locked". Every write transaction begins with its first write
(``sqlite3``'s implicit ``BEGIN`` comes right before it), so it never has to upgrade a read
snapshot, the one case where SQLite answers "locked" without waiting.

Credits are integers of nanocredits (``relay/ledger/prices.py``). A key's row carries
``credits_granted_nano`` (every grant: the initial credits and each top-up, each also a row of
``credit_grants``) and ``credits_used_nano`` (the sum of its usage rows' ``cost_nano``). The
second is only ever changed by :meth:`Store.insert_usage`, in the same transaction that inserts
the usage rows, so ``credits_used_nano`` equals the sum of the key's ``usage.cost_nano`` at
every commit; the first only by :meth:`Store.create_key` and :meth:`Store.top_up`, each in one
transaction with its ``credit_grants`` row.

Expiry and rotation (``relay/ledger/expiry.py`` reads the times): ``expires_at`` (unix seconds,
NULL: never) applies to the key, whichever of its secrets is offered. :meth:`Store.rotate_key`
gives the key a new secret and keeps the replaced one's hash in ``previous_key_hash`` with
``previous_expires_at`` (the end of its grace, which may be the moment of rotation): only the
most recent previous secret is kept, so rotating again within a grace ends the older secret at
once (it then answers as an unknown key). The key's id, limits, credits and usage rows stay.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

from .prices import to_credits

#: Random characters after the prefix: 32 URL-safe characters carry 192 bits.
KEY_RANDOM_CHARS = 32


#: Seconds a write waits for another connection's (another process's) transaction to end.
BUSY_TIMEOUT_S = 30.0


def hash_key(plaintext: str) -> str:
    """SHA-256 of the key: keys are random and long, so a fast unsalted hash is enough."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_plaintext_key(prefix: str) -> str:
    random_part = secrets.token_urlsafe(KEY_RANDOM_CHARS)[:KEY_RANDOM_CHARS]
    return prefix + random_part


def key_hint(plaintext: str, prefix: str) -> str:
    """What identifies a key without giving it away: its prefix, 4 characters, …, the last 4."""
    return f"{plaintext[: len(prefix) + 4]}…{plaintext[-4:]}"


def prefix_of(hint: str) -> str:
    """The prefix a key was made with, read back from its :func:`key_hint`."""
    return hint.partition("…")[0][:-4]


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
    credits_granted_nano: int = 0  # initial credits plus every top-up
    credits_used_nano: int = 0  # as of the last committed usage batch
    expires_at: float | None = None  # None: never
    rotated_at: float | None = None  # when the current secret replaced the previous one
    previous_key_hash: str | None = None  # the replaced secret, kept for its grace
    previous_hint: str | None = None
    previous_expires_at: float | None = None  # when the replaced secret stops (or stopped)

    @property
    def active(self) -> bool:
        """Not revoked (an expired key is still active: see :meth:`expired`)."""
        return self.revoked_at is None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def hashes(self) -> tuple[str, ...]:
        """The hashes a request may present for this key: the secret and the previous one."""
        if self.previous_key_hash:
            return (self.key_hash, self.previous_key_hash)
        return (self.key_hash,)

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
            credits_granted_nano=row.get("credits_granted_nano") or 0,
            credits_used_nano=row.get("credits_used_nano") or 0,
            expires_at=row.get("expires_at"),
            rotated_at=row.get("rotated_at"),
            previous_key_hash=row.get("previous_key_hash"),
            previous_hint=row.get("previous_hint"),
            previous_expires_at=row.get("previous_expires_at"),
        )

    def public(self, now: float | None = None) -> dict:
        """What the CLI and admin API may show: everything except the hashes (credits as
        stored, in credits; ``expired`` as of ``now``, by default the present)."""
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "hint": self.hint,
            "name": self.name,
            "package": self.package,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "active": self.active,
            "limits": self.limits,
            "credits_granted": to_credits(self.credits_granted_nano),
            "credits_used": to_credits(self.credits_used_nano),
            "expires_at": self.expires_at,
            "expired": self.expired(now),
            "rotated_at": self.rotated_at,
            "previous_secret": None if self.previous_key_hash is None else {
                "hint": self.previous_hint,
                "expires_at": self.previous_expires_at,
                "expired": self.previous_expires_at is None or now >= self.previous_expires_at,
            },
        }


#: The columns of ``api_keys`` that expiry and rotation added (all NULL when unused).
EXPIRY_COLUMNS = {
    "expires_at": float,
    "rotated_at": float,
    "previous_key_hash": str,
    "previous_hint": str,
    "previous_expires_at": float,
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
    "cache_write_tokens": int,
    "usage_source": str,
    "latency_ms": float,
    "ttft_ms": float,
    "queue_ms": float,
    "client_disconnected": int,
    "cost_nano": int,
}

#: The columns of ``usage`` added after its first version, in the order they came.
USAGE_ADDED_COLUMNS = ("cost_nano", "cache_write_tokens")

#: Aggregates of usage rows, as SQL over the ``usage`` table (one row per request).
USAGE_TOTALS_SQL = (
    "count(*) as calls, "
    "coalesce(sum(case when status >= 400 or error_code != '' then 1 else 0 end), 0) as errors, "
    "coalesce(sum(input_tokens), 0) as input_tokens, "
    "coalesce(sum(cached_tokens), 0) as cached_tokens, "
    "coalesce(sum(output_tokens), 0) as output_tokens, "
    "coalesce(sum(reasoning_tokens), 0) as reasoning_tokens, "
    "coalesce(sum(cache_write_tokens), 0) as cache_write_tokens, "
    "coalesce(sum(cost_nano), 0) as cost_nano"
)

#: ``group_by`` values of :meth:`Store.usage_summary` and the SQL expression of each group.
USAGE_GROUPS = {
    "model": "model",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "hour": "strftime('%Y-%m-%dT%H:00:00Z', ts, 'unixepoch')",
}


#: SQLite's INTEGER range: a larger Python int cannot be bound at all.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
#: Lone surrogates (SQLite text is UTF-8, which has no encoding for them) and NUL (PostgreSQL
#: text cannot hold it).
_SURROGATE = re.compile("[\ud800-\udfff\x00]")
#: Usage columns that may be NULL (every other one has a value in every row).
_NULLABLE = {"ttft_ms"}


def storable_usage_row(row: dict) -> tuple[dict, list[str]]:
    """``row`` with every value SQLite could not store replaced, and the names of the columns
    that were changed: lone surrogates (and NUL) in text become U+FFFD (SQLite text is UTF-8,
    which has no encoding for them; PostgreSQL's text has no NUL), integers are clamped to 64
    bits, non-finite floats become 0, and a value of the wrong type is converted (or zeroed).
    The result always binds."""
    fixed = dict(row)
    changed = []
    for name, kind in USAGE_COLUMNS.items():
        value = row.get(name)
        if value is None and name in _NULLABLE:
            new = None
        elif kind is str:
            new = _SURROGATE.sub("\ufffd", value if isinstance(value, str) else str(value or ""))
        elif kind is int:
            try:
                new = min(max(int(value or 0), _INT64_MIN), _INT64_MAX)
            except (TypeError, ValueError, OverflowError):  # inf, nan, a string, …
                new = 0
        else:
            try:
                new = float(value or 0.0)
            except (TypeError, ValueError, OverflowError):
                new = 0.0
            if not math.isfinite(new):
                new = 0.0
        if new != value or isinstance(new, str) != isinstance(value, str):
            changed.append(name)
        fixed[name] = new
    return fixed, changed


_INSERT_USAGE = (
    f"insert into usage ({', '.join(USAGE_COLUMNS)}) "
    f"values ({', '.join('?' for _ in USAGE_COLUMNS)})"
)


class Store:
    """Keys and usage in one SQLite file (or ``:memory:``)."""

    backend = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, check_same_thread=False, timeout=BUSY_TIMEOUT_S
        )
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
            columns = keys.columns_dict
            if "limits" not in columns:
                keys.add_column("limits", str)
            for column in ("credits_granted_nano", "credits_used_nano"):
                if column not in columns:
                    keys.add_column(column, int, not_null_default=0)
            # Expiry and rotation (NULL in every key made before: they never expire).
            for column, kind in EXPIRY_COLUMNS.items():
                if column not in columns:
                    keys.add_column(column, kind)
            if "previous_key_hash" not in columns:
                keys.create_index(["previous_key_hash"], if_not_exists=True)
            usage = self.db["usage"]
            if not usage.exists():
                usage.create({"id": int, **USAGE_COLUMNS}, pk="id")
                usage.create_index(["key_id", "ts"])
            else:
                # Columns added since the table's first version: 0 in every older row.
                columns = usage.columns_dict
                for column in USAGE_ADDED_COLUMNS:
                    if column not in columns:
                        usage.add_column(column, int, not_null_default=0)
            grants = self.db["credit_grants"]
            if not grants.exists():
                grants.create(
                    {"id": int, "ts": float, "key_id": str, "amount_nano": int, "note": str},
                    pk="id",
                )
                grants.create_index(["key_id", "ts"])
            tokens = self.db["account_tokens"]
            if not tokens.exists():
                tokens.create({"account": str, "sealed": str, "updated_at": float}, pk="account")
            locks = self.db["locks"]
            if not locks.exists():
                locks.create({"name": str, "owner": str, "until": float}, pk="name")

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # -- keys -----------------------------------------------------------------------------

    def create_key(
        self,
        package: str,
        *,
        prefix: str,
        name: str = "",
        limits: dict | None = None,
        credits_nano: int = 0,
        expires_at: float | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create a key with ``credits_nano`` granted (expiring at ``expires_at``, None:
        never); return ``(plaintext, record)``.

        The plaintext is not kept. The key and its initial grant are one transaction.
        """
        plaintext = new_plaintext_key(prefix)
        record = KeyRecord(
            id="key_" + secrets.token_hex(8),
            key_hash=hash_key(plaintext),
            hint=key_hint(plaintext, prefix),
            name=name,
            package=package,
            created_at=time.time(),
            limits=dict(limits or {}),
            credits_granted_nano=credits_nano,
            expires_at=expires_at,
        )
        row = {
            "id": record.id,
            "key_hash": record.key_hash,
            "hint": record.hint,
            "name": record.name,
            "package": record.package,
            "created_at": record.created_at,
            "revoked_at": None,
            "limits": json.dumps(record.limits),
            "credits_granted_nano": credits_nano,
            "credits_used_nano": 0,
            "expires_at": expires_at,
        }
        # Plain SQL inside one ``with conn``: sqlite-utils' insert commits on its own, which
        # would split the key from its grant.
        with self._lock, self.db.conn:
            self.db.conn.execute(
                f"insert into api_keys ({', '.join(row)}) values ({', '.join('?' for _ in row)})",
                list(row.values()),
            )
            if credits_nano:
                self._grant_row(record.id, credits_nano, "initial credits", record.created_at)
        return plaintext, record

    def _grant_row(self, key_id: str, amount_nano: int, note: str, ts: float) -> None:
        self.db.conn.execute(
            "insert into credit_grants (ts, key_id, amount_nano, note) values (?, ?, ?, ?)",
            (ts, key_id, amount_nano, note),
        )

    def top_up(self, key_or_id: str, amount_nano: int, note: str = "") -> KeyRecord | None:
        """Grant ``amount_nano`` more (negative takes credits back) to a key, by id or
        plaintext; None if no such key. The grant row and the new total are one transaction."""
        with self._lock, self.db.conn:
            row = self._find_row(key_or_id)
            if row is None:
                return None
            self._grant_row(row["id"], amount_nano, note or "top-up", time.time())
            self.db.conn.execute(
                "update api_keys set credits_granted_nano = credits_granted_nano + ? "
                "where id = ?",
                (amount_nano, row["id"]),
            )
            row = self._find_row(row["id"])
        return KeyRecord.from_row(row)

    def grants(self, key_id: str, limit: int = 100) -> list[dict]:
        """A key's grants, newest first."""
        with self._lock:
            return list(
                self.db["credit_grants"].rows_where(
                    "key_id = ?", [key_id], order_by="id desc", limit=limit
                )
            )

    def _find_row(self, key_or_id: str) -> dict | None:
        rows = list(
            self.db["api_keys"].rows_where(
                "id = ? or key_hash = ?", [key_or_id, hash_key(key_or_id)], limit=1
            )
        )
        return rows[0] if rows else None

    def get_key(self, key_or_id: str) -> KeyRecord | None:
        """A key by id or plaintext."""
        with self._lock:
            row = self._find_row(key_or_id)
        return KeyRecord.from_row(row) if row else None

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = list(self.db["api_keys"].rows_where(order_by="created_at"))
        return [KeyRecord.from_row(row) for row in rows]

    def find_key(self, key_hash: str) -> KeyRecord | None:
        """The key whose secret, or previous secret, hashes to ``key_hash``."""
        with self._lock:
            rows = list(
                self.db["api_keys"].rows_where(
                    "key_hash = ? or previous_key_hash = ?", [key_hash, key_hash], limit=1
                )
            )
        return KeyRecord.from_row(rows[0]) if rows else None

    def set_expiry(self, key_or_id: str, expires_at: float | None) -> KeyRecord | None:
        """Make a key (by id or plaintext) expire at ``expires_at`` (None: never); None if no
        such key. A previous secret's grace is not changed (it ends at the key's expiry, if
        that comes first)."""
        with self._lock, self.db.conn:
            row = self._find_row(key_or_id)
            if row is None:
                return None
            self.db.conn.execute(
                "update api_keys set expires_at = ? where id = ?", (expires_at, row["id"])
            )
            row = self._find_row(row["id"])
        return KeyRecord.from_row(row)

    def rotate_key(self, key_or_id: str, grace_s: float = 0.0) -> tuple[str, KeyRecord] | None:
        """Give a key (by id or plaintext) a new secret; return ``(new plaintext, record)``,
        None if no such key. The replaced secret keeps working for ``grace_s`` seconds (0: it
        stops now); a secret replaced before it is forgotten. Id, name, package, limits,
        expiry, credits and usage stay the key's. The caller refuses a revoked key."""
        now = time.time()
        with self._lock, self.db.conn:
            row = self._find_row(key_or_id)
            if row is None:
                return None
            prefix = prefix_of(row["hint"])
            plaintext = new_plaintext_key(prefix)
            self.db.conn.execute(
                "update api_keys set key_hash = ?, hint = ?, rotated_at = ?, "
                "previous_key_hash = ?, previous_hint = ?, previous_expires_at = ? "
                "where id = ?",
                (
                    hash_key(plaintext), key_hint(plaintext, prefix), now,
                    row["key_hash"], row["hint"], now + grace_s, row["id"],
                ),
            )
            row = self._find_row(row["id"])
        return plaintext, KeyRecord.from_row(row)

    def set_limits(self, key_or_id: str, limits: dict) -> KeyRecord | None:
        """Replace a key's own limit overrides (by id or plaintext); None if no such key."""
        with self._lock:
            row = self._find_row(key_or_id)
            if row is None:
                return None
            row["limits"] = json.dumps(limits)
            self.db["api_keys"].update(row["id"], {"limits": row["limits"]})
        return KeyRecord.from_row(row)

    def revoke_key(self, key_or_id: str) -> KeyRecord | None:
        """Revoke by id (``key_…``) or by the plaintext key; None when no such key exists."""
        with self._lock:
            row = self._find_row(key_or_id)
            if row is None:
                return None
            if row["revoked_at"] is None:
                row["revoked_at"] = time.time()
                self.db["api_keys"].update(row["id"], {"revoked_at": row["revoked_at"]})
        return KeyRecord.from_row(row)

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap "did anything change?"."""
        with self._lock:
            return self.db.execute("PRAGMA data_version").fetchone()[0]

    # -- OAuth tokens of upstream accounts (sealed: relay/ledger/vault.py) -----------------

    def sealed_tokens(self, account: str) -> str | None:
        """The account's sealed tokens as last written (by any process), or None."""
        with self._lock:
            row = self.db.execute(
                "SELECT sealed FROM account_tokens WHERE account = ?", [account]
            ).fetchone()
        return row[0] if row else None

    def put_sealed_tokens(self, account: str, sealed: str) -> None:
        """Replace the account's sealed tokens; committed when this returns (WAL: a process
        killed right after keeps them)."""
        with self._lock, self.db.conn:
            self.db.execute(
                "INSERT INTO account_tokens (account, sealed, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(account) DO UPDATE SET sealed = excluded.sealed, "
                "updated_at = excluded.updated_at",
                [account, sealed, time.time()],
            )

    def take_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the lock ``name`` for ``owner`` unless another owner holds it unexpired: one
        atomic statement, so of the processes sharing this file exactly one gets it."""
        now = time.time()
        with self._lock, self.db.conn:
            cursor = self.db.execute(
                "INSERT INTO locks (name, owner, until) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET owner = excluded.owner, until = excluded.until "
                "WHERE locks.until < ? OR locks.owner = excluded.owner",
                [name, owner, now + ttl_s, now],
            )
            return cursor.rowcount > 0

    def release_lock(self, name: str, owner: str) -> None:
        with self._lock, self.db.conn:
            self.db.execute("DELETE FROM locks WHERE name = ? AND owner = ?", [name, owner])

    # -- usage ----------------------------------------------------------------------------

    def insert_usage(self, records: Iterable[dict]) -> int:
        """Insert usage rows (dicts with :data:`USAGE_COLUMNS`) and debit each row's
        ``cost_nano`` from its key, all in one transaction: either every row is written and
        charged, or none is.

        A prepared ``executemany`` rather than sqlite-utils' ``insert_all``, which re-reads the
        schema on every call: this runs for every batch the writer flushes.
        """
        records = list(records)
        rows = [tuple(row[name] for name in USAGE_COLUMNS) for row in records]
        debits: dict[str, int] = {}
        for row in records:
            if row["cost_nano"]:
                debits[row["key_id"]] = debits.get(row["key_id"], 0) + row["cost_nano"]
        if rows:
            with self._lock:
                with self.db.conn:
                    self.db.conn.executemany(_INSERT_USAGE, rows)
                    self.db.conn.executemany(
                        "update api_keys set credits_used_nano = credits_used_nano + ? "
                        "where id = ?",
                        [(amount, key_id) for key_id, amount in debits.items()],
                    )
        return len(rows)

    def usage_summary(
        self, key_id: str | None, start: float, end: float, group_by: str | None = None
    ) -> tuple[dict, list[dict]]:
        """Totals (:data:`USAGE_TOTALS_SQL`) of the usage rows with ``start <= ts < end``,
        of one key (or all), and the same per group (:data:`USAGE_GROUPS`), groups sorted."""
        where = "ts >= ? and ts < ?"
        params: list = [start, end]
        if key_id is not None:
            where = "key_id = ? and " + where
            params.insert(0, key_id)
        with self._lock:
            conn = self.db.conn
            conn_rows = conn.execute(f"select {USAGE_TOTALS_SQL} from usage where {where}", params)
            names = [d[0] for d in conn_rows.description]
            totals = dict(zip(names, conn_rows.fetchone(), strict=True))
            groups: list[dict] = []
            if group_by is not None:
                expression = USAGE_GROUPS[group_by]
                cursor = conn.execute(
                    f"select {expression} as grp, {USAGE_TOTALS_SQL} from usage "
                    f"where {where} group by grp order by grp",
                    params,
                )
                names = [d[0] for d in cursor.description]
                groups = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        return totals, groups

    def daily_costs(self, key_id: str, start: float, end: float) -> list[tuple[str, str, int]]:
        """``(day, model, cost_nano)`` of one key's usage rows with ``start <= ts < end``
        (days in UTC), by day then model."""
        day = USAGE_GROUPS["day"]
        with self._lock:
            return [
                tuple(row)
                for row in self.db.conn.execute(
                    f"select {day} as day, model, coalesce(sum(cost_nano), 0) from usage "
                    "where key_id = ? and ts >= ? and ts < ? group by day, model "
                    "order by day, model",
                    [key_id, start, end],
                )
            ]

    def usage_by_key(self) -> dict[str, dict]:
        """All-time totals per key id (with the time of its last request)."""
        with self._lock:
            cursor = self.db.conn.execute(
                f"select key_id, max(ts) as last_used_at, {USAGE_TOTALS_SQL} "
                "from usage group by key_id"
            )
            names = [d[0] for d in cursor.description]
            return {row[0]: dict(zip(names, row, strict=True)) for row in cursor.fetchall()}

    def usage_rows(self, *, key_id: str | None = None, limit: int = 1000) -> list[dict]:
        with self._lock:
            if key_id is None:
                return list(self.db["usage"].rows_where(order_by="id desc", limit=limit))
            return list(
                self.db["usage"].rows_where(
                    "key_id = ?", [key_id], order_by="id desc", limit=limit
                )
            )
