"""The in-memory key ring that authenticates requests without touching the disk.

Keys are read from the store at start-up and refreshed by a background task whenever SQLite's
``data_version`` says another connection (the CLI, another relay process) changed something. A key
that is not in memory yet is looked up once in the store, so a key created a moment ago works at
once; a revocation takes effect within :data:`REFRESH_INTERVAL_S`.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from ..errors import AuthenticationFailed
from .store import KeyRecord, Store, hash_key

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
    def __init__(self, store: Store) -> None:
        self._store = store
        self._by_hash: dict[str, KeyRecord] = {}
        self._version = -1

    def load(self) -> None:
        """Read every key (synchronously; used at start-up and from the refresher's thread)."""
        version = self._store.data_version()
        self._by_hash = {record.key_hash: record for record in self._store.list_keys()}
        self._version = version

    def records(self) -> list[KeyRecord]:
        """Every key known in memory (all of the store's as of the last load)."""
        return list(self._by_hash.values())

    def update(self, record: KeyRecord) -> None:
        """Take a record this process just changed in the store (its own writes do not change
        ``data_version``, so the refresher would not see them)."""
        self._by_hash[record.key_hash] = record

    async def refresh_forever(self) -> None:
        while True:
            await trio.sleep(REFRESH_INTERVAL_S)
            version = await trio.to_thread.run_sync(self._store.data_version)
            if version != self._version:
                await trio.to_thread.run_sync(self.load)

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
            record = await trio.to_thread.run_sync(self._store.find_key, key_hash)
            if record is not None:
                self._by_hash[key_hash] = record
        if record is None:
            raise AuthenticationFailed(f"Incorrect API key provided: {_redact(plaintext)}.")
        if not record.active:
            raise AuthenticationFailed(
                f"The API key {record.hint} has been revoked.", code="revoked_api_key"
            )
        return record


def _redact(plaintext: str) -> str:
    if len(plaintext) <= 8:
        return "***"
    return f"{plaintext[:6]}***{plaintext[-4:]}"
