"""The store and the usage writer: keys kept as hashes, records never lost on shutdown."""

from __future__ import annotations

import trio

from relay.ledger.keys import KeyRing, key_from_headers
from relay.ledger.store import Store, hash_key
from relay.ledger.usage import UsageRecord, UsageWriter


def test_key_from_headers_forms() -> None:
    assert key_from_headers({"authorization": "Bearer abc"}) == "abc"
    assert key_from_headers({"authorization": "bearer   abc "}) == "abc"
    assert key_from_headers({"authorization": "abc"}) == "abc"
    assert key_from_headers({"x-api-key": "abc"}) == "abc"
    assert key_from_headers({"authorization": "Bearer "}) is None
    assert key_from_headers({}) is None


def test_create_find_revoke(tmp_path) -> None:
    store = Store(tmp_path / "r.db")
    key, record = store.create_key("team", prefix="sk-live-", name="n")
    assert key.startswith("sk-live-") and len(key) >= len("sk-live-") + 32
    assert store.find_key(hash_key(key)) == record
    assert store.revoke_key(key).revoked_at is not None  # by plaintext
    _, other = store.create_key("team", prefix="cr_")
    assert store.revoke_key(other.id).id == other.id  # by id
    assert store.revoke_key("nothing") is None
    assert [r.active for r in store.list_keys()] == [False, False]
    store.close()


async def test_key_ring_sees_keys_created_after_start(tmp_path) -> None:
    store = Store(tmp_path / "r.db")
    ring = KeyRing(store)
    ring.load()
    key, record = store.create_key("team", prefix="cr_")
    assert (await ring.authenticate({"authorization": f"Bearer {key}"})).id == record.id


async def test_writer_drains_every_record_on_close(tmp_path) -> None:
    store = Store(tmp_path / "r.db")
    writer = UsageWriter(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for index in range(1234):
            writer.record(UsageRecord(request_id=f"r{index}", key_id="k", package="p",
                                      endpoint="chat/completions", model="m", output_tokens=1))
        writer.close()
    rows = store.usage_rows(limit=5000)
    assert len(rows) == 1234
    assert {row["request_id"] for row in rows} == {f"r{i}" for i in range(1234)}
    assert writer.queued == 0 and writer.written == 1234
