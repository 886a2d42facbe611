"""The in-memory key ring that authenticates requests without touching the disk.

Keys are read from the store at start-up and refreshed by a background task whenever the store's
``data_version`` says another connection (the CLI, another relay process, with PostgreSQL another
host) changed something. A key
that is not in memory yet is looked up once in the store, so a key created a moment ago works at
once; a revocation, a new expiry or a rotation made by another process takes effect within
:data:`REFRESH_INTERVAL_S`. Expiry is checked against the clock on every request, so a key stops
at its ``expires_at`` to the second, refreshed or not.

A key is found by its secret or, after a rotation, by its previous secret: the ring maps both
hashes to the key's one record, and replaces both when the record changes.

While the database cannot be reached (``StoreUnavailable``), the ring keeps the keys it has and
keeps trying; a key it has never seen is answered with a 503 (``ledger_unavailable``), not 401.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import trio

from ..errors import AuthenticationFailed, LedgerUnavailable
from .backend import LedgerStore, StoreUnavailable
from .expiry import format_moment
from .store import KeyRecord, hash_key

log = logging.getLogger("relay.ledger")

REFRESH_INTERVAL_S = 1.0


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer KEY``, bare ``Authorization: KEY`` or ``x-api-key``."""
    authorization = headers.get("authorization", "").strip()
    if authorization:
        scheme, _, rest = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return rest.strip() or None
        return authorization
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


class KeyRing:
    def __init__(self, store: LedgerStore) -> None:
        self._store = store
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._version = -1

    def load(self) -> None:
        """Read every key (synchronously; used at start-up and from the refresher's thread)."""
        version = self._store.data_version()
        records = self._store.list_keys()
        self._by_id = {record.id: record for record in records}
        self._by_hash = {
            key_hash: record for record in records for key_hash in record.hashes()
        }
        self._version = version

    def records(self) -> list[KeyRecord]:
        """Every key known in memory (all of the store's as of the last load)."""
        return list(self._by_id.values())

    def update(self, record: KeyRecord) -> None:
        """Take a record this process just changed in the store (its own writes do not change
        ``data_version``, so the refresher would not see them). Hashes the key no longer
        answers to (a secret rotated away) are dropped."""
        old = self._by_id.get(record.id)
        if old is not None:
            for key_hash in old.hashes():
                if self._by_hash.get(key_hash) is old:
                    del self._by_hash[key_hash]
        self._by_id[record.id] = record
        for key_hash in record.hashes():
            self._by_hash[key_hash] = record

    async def refresh_forever(self) -> None:
        unreachable = False
        while True:
            await trio.sleep(REFRESH_INTERVAL_S)
            try:
                version = await trio.to_thread.run_sync(self._store.data_version)
                if version != self._version:
                    await trio.to_thread.run_sync(self.load)
            except StoreUnavailable as error:
                if not unreachable:
                    log.warning("cannot refresh the keys (%s); keeping the ones in memory", error)
                unreachable = True
                continue
            if unreachable:
                log.warning("the keys are refreshed again: the ledger database is back")
                unreachable = False

    async def authenticate(self, headers: Mapping[str, str]) -> KeyRecord:
        """The active key the request carries, or :class:`AuthenticationFailed` (401)."""
        plaintext = key_from_headers(headers)
        if plaintext is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
                "(or in an 'x-api-key' header).",
                code="missing_api_key",
            )
        key_hash = hash_key(plaintext)
        record = self._by_hash.get(key_hash)
        if record is None:
            try:
                record = await trio.to_thread.run_sync(self._store.find_key, key_hash)
            except StoreUnavailable:
                raise LedgerUnavailable(
                    "The relay cannot check this API key right now: its key database is "
                    "unreachable. Retry in a moment."
                ) from None
            if record is not None:
                self.update(record)
        if record is None:
            raise AuthenticationFailed(f"Incorrect API key provided: {_redact(plaintext)}.")
        if not record.active:
            raise AuthenticationFailed(
                f"The API key {record.hint} has been revoked.", code="revoked_api_key"
            )
        now = time.time()
        if record.expired(now):
            raise AuthenticationFailed(
                f"The API key {_hint_of(record, key_hash)} expired at "
                f"{format_moment(record.expires_at)}. Ask the relay's operator for a new "
                "key or a later expiry.",
                code="key_expired",
            )
        if key_hash != record.key_hash and now >= (record.previous_expires_at or 0):
            raise AuthenticationFailed(
                f"The API key {record.previous_hint} expired at "
                f"{format_moment(record.previous_expires_at or 0)}: it was rotated, and "
                "replaced by a new key. Use the new key.",
                code="key_expired",
            )
        return record


def _hint_of(record: KeyRecord, key_hash: str) -> str:
    """The hint of the secret that hashes to ``key_hash``: the key's, or its previous one's."""
    return record.hint if key_hash == record.key_hash else (record.previous_hint or record.hint)


def _redact(plaintext: str) -> str:
    if len(plaintext) <= 8:
        return "***"
    return f"{plaintext[:6]}***{plaintext[-4:]}"
