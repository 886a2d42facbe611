"""No request can erase other requests' usage records (issue 12, finding 1).

A usage batch is one SQLite transaction: a single row SQLite cannot store used to fail every
key's rows in it, while their debits stayed in memory (so a restart refunded them).
"""

from __future__ import annotations

import json
import math
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx2
import trio

from relay.ledger.prices import to_credits
from relay.ledger.usage import UsageRecord, UsageWriter

from .conftest import ADMIN_TOKEN, BILLING_BODY, open_ledger, start_relay


def _record(index: int, key: str, **fields) -> UsageRecord:
    fields = {"model": "m", "output_tokens": 1, "cost_nano": 10, **fields}
    return UsageRecord(
        request_id=f"r{index}", key_id=key, package="p", endpoint="chat/completions", **fields
    )


async def test_a_record_sqlite_cannot_store_keeps_its_batch_and_itself(ledger_database) -> None:
    store = open_ledger(ledger_database)
    _, good = store.create_key("p", prefix="cr_")
    _, bad = store.create_key("p", prefix="cr_")
    writer = UsageWriter(store)
    records = [_record(i, good.id) for i in range(100)]
    records[10:10] = [
        _record(1000, bad.id, model="\ud800x"),  # a lone surrogate: no UTF-8 for it
        _record(1001, bad.id, input_tokens=2**70),  # wider than SQLite's INTEGER
        _record(1002, bad.id, ttft_ms=math.nan, latency_ms=math.inf),  # SQLite takes these
        _record(1003, bad.id, error_code="a\x00b"),  # PostgreSQL's text cannot hold NUL
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for record in records:
            writer.record(record)
        writer.close()
    rows = {row["request_id"]: row for row in store.usage_rows(limit=5000)}
    assert set(rows) == {record.request_id for record in records}
    assert writer.written == len(records) and writer.queued == 0
    assert rows["r1000"]["model"] == "\ufffdx"
    assert rows["r1001"]["input_tokens"] == 2**63 - 1
    assert rows["r1003"]["error_code"] == (
        "a\x00b" if store.backend == "sqlite" else "a\ufffdb"
    )
    # Every row's debit is in the same transaction as the row.
    assert store.get_key(good.id).credits_used_nano == 100 * 10
    assert store.get_key(bad.id).credits_used_nano == 4 * 10
    store.close()


def _used_in_memory(url: str, key_id: str) -> float:
    response = httpx2.get(
        f"{url}/admin/keys/{key_id}", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    response.raise_for_status()
    return response.json()["credits"]["used"]


def _used_in_db(database, key_id: str) -> tuple[int, int]:
    """(the key's ``credits_used_nano``, the sum of its usage rows' cost)."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        (used,) = connection.execute(
            "select credits_used_nano from api_keys where id = ?", [key_id]
        ).fetchone()
        (summed,) = connection.execute(
            "select coalesce(sum(cost_nano), 0) from usage where key_id = ?", [key_id]
        ).fetchone()
    finally:
        connection.close()
    return used, summed


def test_lone_surrogate_model_erases_no_other_keys_records(sim, tmp_path) -> None:
    relay = start_relay(tmp_path, sim.url, body=BILLING_BODY)
    try:
        # Enough credits for its 40 calls however many run at once (each holds its estimate).
        good_key, good_id = relay.create_paid_key(credits="1000")
        bad_key, _ = relay.create_paid_key()
        # The escape stays an escape on the wire: json.loads makes it a lone surrogate.
        bad_body = b'{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}'
        good_body = json.dumps(
            {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
        ).encode()

        def send(index: int) -> tuple[str, httpx2.Response]:
            kind, key, body = (
                ("bad", bad_key, bad_body) if index % 2 else ("good", good_key, good_body)
            )
            response = httpx2.post(
                relay.url + "/v1/chat/completions", content=body, timeout=10,
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            )
            return kind, response

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, range(80)))
        good = [r for kind, r in answers if kind == "good"]
        bad = [r for kind, r in answers if kind == "bad"]
        assert all(r.status_code == 200 for r in good), [
            (r.status_code, r.text[:300]) for r in good if r.status_code != 200]
        # Every request that passed authentication has its row (each is written as its request
        # ends: the threads' last answers need not be the last rows).
        for response in good + bad:
            rows = relay.usage_rows(response.headers["x-request-id"])
        # Not a model that could exist: refused as invalid, naming the field.
        assert {r.status_code for r in bad} == {400}
        assert all(r.json()["error"]["param"] == "model" for r in bad)
        assert {row["status"] for row in rows if row["key_id"] == good_id} == {200}
        used_nano, summed = _used_in_db(relay.database, good_id)
        assert used_nano == summed > 0
        in_memory = _used_in_memory(relay.url, good_id)
        assert in_memory == to_credits(used_nano)
    finally:
        assert "Traceback" not in relay.process.stop()
    # After a restart the balance is read from the database: it is the same.
    relay = start_relay(tmp_path, sim.url, body=BILLING_BODY)
    try:
        assert _used_in_memory(relay.url, good_id) == in_memory
    finally:
        relay.process.stop()
