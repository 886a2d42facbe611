"""The store and the usage writer: keys kept as hashes, records never lost on shutdown."""

from __future__ import annotations

import sqlite3
import time

import pytest
import trio

from relay.ledger.keys import KeyRing, key_from_headers
from relay.ledger.store import Store, hash_key
from relay.ledger.usage import UsageRecord, UsageWriter

from .conftest import open_ledger


def test_key_from_headers_forms() -> None:
    assert key_from_headers({"authorization": "Bearer abc"}) == "abc"
    assert key_from_headers({"authorization": "bearer   abc "}) == "abc"
    assert key_from_headers({"authorization": "abc"}) == "abc"
    assert key_from_headers({"x-api-key": "abc"}) == "abc"
    assert key_from_headers({"authorization": "Bearer "}) is None
    assert key_from_headers({}) is None


def test_create_find_revoke(ledger_database) -> None:
    store = open_ledger(ledger_database)
    key, record = store.create_key("team", prefix="sk-live-", name="n")
    assert key.startswith("sk-live-") and len(key) >= len("sk-live-") + 32
    assert store.find_key(hash_key(key)) == record
    assert store.revoke_key(key).revoked_at is not None  # by plaintext
    _, other = store.create_key("team", prefix="cr_")
    assert store.revoke_key(other.id).id == other.id  # by id
    assert store.revoke_key("nothing") is None
    assert [r.active for r in store.list_keys()] == [False, False]
    store.close()


async def test_key_ring_sees_keys_created_after_start(ledger_database) -> None:
    store = open_ledger(ledger_database)
    ring = KeyRing(store)
    ring.load()
    key, record = store.create_key("team", prefix="cr_")
    assert (await ring.authenticate({"authorization": f"Bearer {key}"})).id == record.id


async def test_writer_drains_every_record_on_close(ledger_database) -> None:
    store = open_ledger(ledger_database)
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


async def test_cache_writes_are_stored_and_summed_with_the_record(ledger_database) -> None:
    store = open_ledger(ledger_database)
    writer = UsageWriter(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for index, (cached, written) in enumerate([(300, 500), (0, 1200), (40, 0)]):
            writer.record(UsageRecord(
                request_id=f"r{index}", key_id="k", package="p", endpoint="chat/completions",
                model="claude", input_tokens=2000, cached_tokens=cached,
                cache_write_tokens=written, output_tokens=7,
            ))
        writer.close()
    rows = {row["request_id"]: row for row in store.usage_rows()}
    assert [rows[f"r{i}"]["cache_write_tokens"] for i in range(3)] == [500, 1200, 0]
    assert [rows[f"r{i}"]["cached_tokens"] for i in range(3)] == [300, 0, 40]
    totals, groups = store.usage_summary("k", 0, 2**40, group_by="model")
    assert totals["cache_write_tokens"] == 1700 and totals["cached_tokens"] == 340
    assert groups[0]["grp"] == "claude" and groups[0]["cache_write_tokens"] == 1700
    assert store.usage_by_key()["k"]["cache_write_tokens"] == 1700
    store.close()


#: The ``usage`` table as the relay first made it (no ``cost_nano``), and as it was made from
#: credits (issue 4) until cache writes were counted apart: both must open and gain the columns.
USAGE_FIRST_COLUMNS = (
    '"id" INTEGER PRIMARY KEY, "ts" REAL, "request_id" TEXT, "key_id" TEXT, "package" TEXT, '
    '"endpoint" TEXT, "model" TEXT, "upstream_model" TEXT, "account" TEXT, "stream" INTEGER, '
    '"status" INTEGER, "error_code" TEXT, "input_tokens" INTEGER, "cached_tokens" INTEGER, '
    '"output_tokens" INTEGER, "reasoning_tokens" INTEGER, "usage_source" TEXT, '
    '"latency_ms" REAL, "ttft_ms" REAL, "queue_ms" REAL, "client_disconnected" INTEGER'
)


@pytest.mark.parametrize("extra", ["", ', "cost_nano" INTEGER'], ids=["first", "with-credits"])
async def test_a_usage_table_from_before_cache_writes_gains_the_column(tmp_path, extra) -> None:
    database = tmp_path / "old.db"
    connection = sqlite3.connect(database)
    with connection:
        connection.execute(f'CREATE TABLE "usage" ({USAGE_FIRST_COLUMNS}{extra})')
        connection.execute(
            "insert into usage (ts, request_id, key_id, package, endpoint, model, status, "
            "error_code, input_tokens, cached_tokens, output_tokens) "
            "values (1000, 'req_old', 'k', 'p', 'chat', 'claude', 200, '', 900, 100, 20)"
        )
    connection.close()

    store = Store(database)
    columns = {column.name: column for column in store.db["usage"].columns}
    assert columns["cache_write_tokens"].notnull and "cost_nano" in columns
    writer = UsageWriter(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        writer.record(UsageRecord(
            request_id="req_new", key_id="k", package="p", endpoint="chat/completions",
            model="claude", input_tokens=3000, cached_tokens=1000, cache_write_tokens=1500,
            output_tokens=5,
        ))
        writer.close()
    rows = {row["request_id"]: row for row in store.usage_rows()}
    assert rows["req_old"]["cache_write_tokens"] == 0
    assert (rows["req_old"]["input_tokens"], rows["req_old"]["cached_tokens"]) == (900, 100)
    assert rows["req_new"]["cache_write_tokens"] == 1500
    totals, _ = store.usage_summary("k", 0, 2**40)
    assert (totals["calls"], totals["input_tokens"], totals["cache_write_tokens"]) == (
        2, 3900, 1500
    )
    store.close()
    Store(database).close()  # opening again migrates nothing twice


def test_sealed_tokens_and_leased_locks(ledger_database) -> None:
    """What codex-chatgpt accounts keep in the ledger (either backend): sealed tokens replaced
    in place, and a lock only one owner holds until it is released or its lease runs out."""
    store = open_ledger(ledger_database)
    other = open_ledger(ledger_database)  # another process on the same ledger
    try:
        assert store.sealed_tokens("acct") is None
        store.put_sealed_tokens("acct", "sealed-1")
        store.put_sealed_tokens("acct", "sealed-2")
        assert other.sealed_tokens("acct") == "sealed-2"
        assert store.take_lock("refresh:acct", "p1", 30) is True
        assert other.take_lock("refresh:acct", "p2", 30) is False
        assert store.take_lock("refresh:acct", "p1", 30) is True  # its own, renewed
        store.release_lock("refresh:acct", "p1")
        assert other.take_lock("refresh:acct", "p2", 0.01) is True
        time.sleep(0.05)
        assert store.take_lock("refresh:acct", "p1", 30) is True  # p2's lease ran out
    finally:
        store.close()
        other.close()
