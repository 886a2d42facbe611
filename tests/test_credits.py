"""Credits: holds and charges (the overdraft bound as a property) and the debit in the usage
record's own transaction."""

from __future__ import annotations

import sqlite3

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Price
from relay.errors import InsufficientQuota
from relay.ledger.credits import Credits
from relay.ledger.prices import NANO, PriceTable, cost, parse_credits
from relay.ledger.store import KeyRecord, Store
from relay.ledger.usage import UsageRecord, UsageWriter

# -- the ledger alone ----------------------------------------------------------------------

#: One credit per output token, input free: estimates and costs are easy to read.
PER_TOKEN = PriceTable({"m": Price("m", input=0, output=1_000_000)})


def key_record(granted_credits: int, key_id: str = "key_1") -> KeyRecord:
    return KeyRecord(
        id=key_id, key_hash="h" + key_id, hint="cr_…", name="", package="p", created_at=0,
        credits_granted_nano=granted_credits * NANO,
    )


def usage(request_id: str, output_tokens: int = 0, key_id: str = "key_1") -> UsageRecord:
    return UsageRecord(
        request_id=request_id, key_id=key_id, package="p", endpoint="chat/completions",
        model="m", upstream_model="m", output_tokens=output_tokens,
    )


def test_a_request_the_balance_cannot_cover_is_refused_with_402() -> None:
    credits = Credits(PER_TOKEN)
    key = key_record(10)
    with pytest.raises(InsufficientQuota) as refused:
        with credits.hold(key, usage("r1"), input_tokens=0, output_tokens=11):
            pass
    assert refused.value.status == 402 and refused.value.code == "insufficient_quota"
    assert "10 credits available" in refused.value.message
    assert "estimated at 11 credits" in refused.value.message
    with credits.hold(key, usage("r2"), input_tokens=0, output_tokens=10) as estimate:
        assert estimate == 10 * NANO
        assert credits.balance(key).available == 0
        # what is held cannot be spent twice
        with pytest.raises(InsufficientQuota, match="held by your requests in progress"):
            with credits.hold(key, usage("r3"), input_tokens=0, output_tokens=1):
                pass
    assert credits.status() == {"holds": 0, "held": 0.0}


def test_the_charge_replaces_the_hold_and_the_exit_releases_it_only_once() -> None:
    credits = Credits(PER_TOKEN)
    key = key_record(10)
    record = usage("r1")
    with credits.hold(key, record, input_tokens=0, output_tokens=4):
        assert credits.balance(key).held == 4 * NANO
        record.output_tokens = 3
        credits.charge(record)  # as the usage writer does when the request ends
        assert record.cost_nano == 3 * NANO
        assert (credits.balance(key).held, credits.balance(key).used) == (0, 3 * NANO)
    assert credits.balance(key).available == 7 * NANO
    # an exception inside the block releases the hold too
    with pytest.raises(RuntimeError):
        with credits.hold(key, usage("r2"), input_tokens=0, output_tokens=5):
            raise RuntimeError("upstream broke")
    assert credits.status()["holds"] == 0 and credits.balance(key).available == 7 * NANO


def test_free_models_are_neither_held_nor_charged() -> None:
    credits = Credits(PER_TOKEN)
    key = key_record(0)
    record = UsageRecord(request_id="r", key_id="key_1", package="p", endpoint="responses",
                         model="other", upstream_model="other", output_tokens=10**6)
    with credits.hold(key, record, input_tokens=10**6, output_tokens=10**6) as estimate:
        assert estimate == 0 and credits.status()["holds"] == 0
    credits.charge(record)
    assert record.cost_nano == 0 and credits.balance(key).used == 0


@st.composite
def schedules(draw):
    """Requests (estimate, real cost, in output tokens) and an order of arrivals and finishes."""
    count = draw(st.integers(min_value=1, max_value=25))
    requests = [
        (draw(st.integers(1, 30)), draw(st.integers(0, 60))) for _ in range(count)
    ]
    steps = draw(st.lists(st.booleans(), min_size=count * 2, max_size=count * 4))
    return draw(st.integers(0, 100)), requests, steps


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_concurrent_requests_overdraw_by_at_most_their_own_estimate_errors(schedule) -> None:
    """The bound of relay/ledger/credits.py: after all requests finished, the balance is at
    least minus the sum of (cost − estimate)⁺ over the requests in flight together at the last
    admission; concurrency adds nothing to it."""
    granted, requests, steps = schedule
    credits = Credits(PER_TOKEN)
    key = key_record(granted)
    pending = list(enumerate(requests))
    running: dict[int, tuple] = {}
    at_last_admission: set[int] = set()

    def finish(index: int) -> None:
        block, record, (_, real) = running.pop(index)
        record.output_tokens = real
        credits.charge(record)
        block.__exit__(None, None, None)

    for arrive in [*steps, *[False] * len(requests) * 2]:
        if arrive and pending:
            index, (estimate, real) = pending.pop(0)
            record = usage(f"r{index}")
            block = credits.hold(key, record, input_tokens=0, output_tokens=estimate)
            try:
                block.__enter__()
            except InsufficientQuota:
                continue
            running[index] = (block, record, (estimate, real))
            at_last_admission = set(running)
        elif running:
            finish(next(iter(running)))
    assert not running and credits.status()["holds"] == 0
    errors = sum(
        max(0, requests[i][1] - requests[i][0]) for i in at_last_admission
    )
    assert credits.balance(key).remaining >= -errors * NANO


# -- the store and the writer --------------------------------------------------------------


async def test_debits_are_written_with_the_usage_rows_and_add_up_exactly(tmp_path) -> None:
    store = Store(tmp_path / "r.db")
    rate_table = PriceTable({"m": Price("m", input=1.25, cached_input=0.125, output=10)})
    _, key = store.create_key("p", prefix="cr_", credits_nano=parse_credits("3.5"))
    credits = Credits(rate_table, store.list_keys())
    writer = UsageWriter(store, observers=[credits.charge])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for index in range(300):
            writer.record(UsageRecord(
                request_id=f"r{index}", key_id=key.id, package="p", endpoint="responses",
                model="m", upstream_model="m", input_tokens=100 + index, cached_tokens=index,
                output_tokens=7 * index, reasoning_tokens=index,
            ))
        writer.close()
    rows = store.usage_rows(key_id=key.id, limit=1000)
    costs = [row["cost_nano"] for row in rows]
    assert all(
        row["cost_nano"] == cost(
            rate_table.rate_for("m"), input_tokens=row["input_tokens"],
            cached_tokens=row["cached_tokens"], output_tokens=row["output_tokens"],
        )
        for row in rows
    )
    stored = store.get_key(key.id)
    assert stored.credits_used_nano == sum(costs) == credits.balance(stored).used
    assert credits.balance(stored).remaining == parse_credits("3.5") - sum(costs)
    # a top-up is a grant row and a new total, together
    topped = store.top_up(key.id, parse_credits("1.25"), "more")
    assert topped.credits_granted_nano == parse_credits("4.75")
    assert [(g["amount_nano"], g["note"]) for g in store.grants(key.id)] == [
        (parse_credits("1.25"), "more"), (parse_credits("3.5"), "initial credits"),
    ]
    store.close()


def test_a_batch_that_fails_writes_neither_rows_nor_debits(tmp_path) -> None:
    store = Store(tmp_path / "r.db")
    _, key = store.create_key("p", prefix="cr_", credits_nano=NANO)
    # A real failure inside the transaction: SQLite refuses the second row.
    store.db.conn.execute(
        "create trigger refuse before insert on usage when new.request_id = 'boom' "
        "begin select raise(abort, 'refused'); end"
    )
    rows = [usage(name, key_id=key.id).row() | {"cost_nano": 5} for name in ("ok", "boom")]
    with pytest.raises(sqlite3.DatabaseError):
        store.insert_usage(rows)
    assert store.usage_rows() == []
    assert store.get_key(key.id).credits_used_nano == 0
    store.close()
