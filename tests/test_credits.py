"""Credits: holds and charges (the overdraft bound as a property), the debit in the usage
record's own transaction, and, through a real relay, 402 before any upstream call, concurrent
requests on a small balance, a cut-short stream billed for what it delivered, and holds released
on every path."""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
import threading
import time

import httpx2
import openai
import psycopg
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Price, load_config
from relay.errors import InsufficientQuota
from relay.ledger.credits import Credits
from relay.ledger.prices import NANO, PriceTable, cost, parse_credits
from relay.ledger.store import KeyRecord, Store
from relay.ledger.usage import UsageRecord, UsageWriter
from relay.protocol.requests import Endpoint, parse_request

from .conftest import Relay, Sim, open_ledger

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
        with credits.hold_local(key, usage("r1"), input_tokens=0, output_tokens=11):
            pass
    assert refused.value.status == 402 and refused.value.code == "insufficient_quota"
    assert "10 credits available" in refused.value.message
    assert "estimated at 11 credits" in refused.value.message
    with credits.hold_local(key, usage("r2"), input_tokens=0, output_tokens=10) as estimate:
        assert estimate == 10 * NANO
        assert credits.balance(key).available == 0
        # what is held cannot be spent twice
        with pytest.raises(InsufficientQuota, match="held by your requests in progress"):
            with credits.hold_local(key, usage("r3"), input_tokens=0, output_tokens=1):
                pass
    assert credits.status() == {"holds": 0, "held": 0.0}


def test_the_charge_replaces_the_hold_and_the_exit_releases_it_only_once() -> None:
    credits = Credits(PER_TOKEN)
    key = key_record(10)
    record = usage("r1")
    with credits.hold_local(key, record, input_tokens=0, output_tokens=4):
        assert credits.balance(key).held == 4 * NANO
        record.output_tokens = 3
        credits.charge(record)  # as the usage writer does when the request ends
        assert record.cost_nano == 3 * NANO
        assert (credits.balance(key).held, credits.balance(key).used) == (0, 3 * NANO)
    assert credits.balance(key).available == 7 * NANO
    # an exception inside the block releases the hold too
    with pytest.raises(RuntimeError):
        with credits.hold_local(key, usage("r2"), input_tokens=0, output_tokens=5):
            raise RuntimeError("upstream broke")
    assert credits.status()["holds"] == 0 and credits.balance(key).available == 7 * NANO


def test_free_models_are_neither_held_nor_charged() -> None:
    credits = Credits(PER_TOKEN)
    key = key_record(0)
    record = UsageRecord(request_id="r", key_id="key_1", package="p", endpoint="responses",
                         model="other", upstream_model="other", output_tokens=10**6)
    with credits.hold_local(key, record, input_tokens=10**6, output_tokens=10**6) as estimate:
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
            block = credits.hold_local(key, record, input_tokens=0, output_tokens=estimate)
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


async def test_debits_are_written_with_the_usage_rows_and_add_up_exactly(
    ledger_database,
) -> None:
    store = open_ledger(ledger_database)
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


def test_a_batch_that_fails_writes_neither_rows_nor_debits(ledger_database) -> None:
    store = open_ledger(ledger_database)
    _, key = store.create_key("p", prefix="cr_", credits_nano=NANO)
    # A real failure inside the transaction: the database refuses the second row.
    if store.backend == "sqlite":
        store.db.conn.execute(
            "create trigger refuse before insert on usage when new.request_id = 'boom' "
            "begin select raise(abort, 'refused'); end"
        )
    else:
        with store.transaction() as conn:
            conn.execute(
                "create function refuse() returns trigger language plpgsql as $$ begin "
                "if new.request_id = 'boom' then raise exception 'refused'; end if; "
                "return new; end $$"
            )
            conn.execute(
                "create trigger refuse before insert on usage for each row "
                "execute function refuse()"
            )
    rows = [usage(name, key_id=key.id).row() | {"cost_nano": 5} for name in ("ok", "boom")]
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error)):
        store.insert_usage(rows)
    assert store.usage_rows() == []
    assert store.get_key(key.id).credits_used_nano == 0
    store.close()


def test_a_database_from_before_credits_is_migrated(tmp_path) -> None:
    """Keys made before credits existed start at zero credits; old usage rows cost nothing."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        create table api_keys (id text primary key, key_hash text not null, hint text,
            name text, package text not null, created_at float not null, revoked_at float,
            limits text);
        create table usage (id integer primary key, ts float, request_id text, key_id text,
            output_tokens integer);
        insert into api_keys values ('key_old', 'h', 'cr_…', '', 'p', 1.0, null, '{}');
        insert into usage (ts, request_id, key_id, output_tokens) values (1.0, 'r', 'key_old', 5);
        """
    )
    old.close()
    store = Store(path)
    record = store.get_key("key_old")
    assert (record.credits_granted_nano, record.credits_used_nano) == (0, 0)
    assert store.usage_rows()[0]["cost_nano"] == 0
    assert store.top_up("key_old", NANO).credits_granted_nano == NANO
    store.close()


# -- through a real relay ------------------------------------------------------------------


def rates(relay: Relay) -> PriceTable:
    return PriceTable(load_config(relay.config_path).prices)


def estimate(relay: Relay, endpoint: Endpoint, body: dict) -> int:
    """The relay's own estimate of a request (its pure parser and price table)."""
    client = parse_request(endpoint, body, {})
    model = body["model"]
    config = load_config(relay.config_path)
    alias = config.models.get(model)
    target = alias.target if alias else model
    return rates(relay).estimate(
        model, target, input_tokens=client.estimated_input_tokens,
        output_tokens=client.estimated_tokens - client.estimated_input_tokens,
    )


def balance(relay: Relay, key: str) -> dict:
    response = httpx2.get(relay.url + "/v1/balance", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def stored_key(relay: Relay, key_id: str) -> dict:
    connection = sqlite3.connect(f"file:{relay.database}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        return dict(connection.execute("select * from api_keys where id = ?", [key_id]).fetchone())
    finally:
        connection.close()


def rows_of(relay: Relay, key_id: str, count: int = 0) -> list[dict]:
    """The key's usage rows, once there are at least ``count`` (the writer batches)."""
    deadline = time.monotonic() + 5
    while True:
        rows = [row for row in relay.usage_rows() if row["key_id"] == key_id]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def chat(relay: Relay, key: str, content: str, model: str = "gpt-5", **extra) -> httpx2.Response:
    return httpx2.post(
        relay.url + "/v1/chat/completions", timeout=30,
        headers={"authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": content}], **extra},
    )


def test_each_request_is_billed_from_its_usage_record(billed: Relay, sim: Sim) -> None:
    key, key_id = billed.create_paid_key()
    prompt = "x " * 120 + "#sim tokens=40 reasoning=10 cached=20"
    done = chat(billed, key, prompt)
    assert done.status_code == 200, done.text
    request_id = done.headers["x-request-id"]
    row = billed.usage_row(request_id)
    upstream = next(r for r in reversed(sim.requests()) if prompt in json.dumps(r["body"]))
    seen = upstream["usage"]
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"],
            row["reasoning_tokens"]) == (seen["input_tokens"], seen["cached_tokens"],
                                         seen["output_tokens"], seen["reasoning_tokens"])
    assert row["cached_tokens"] == 20 and row["reasoning_tokens"] == 10
    # gpt-5: 1000 per M uncached input, 100 cached, 2000 output (reasoning included)
    expected = (
        (row["input_tokens"] - 20) * 1_000_000 + 20 * 100_000 + row["output_tokens"] * 2_000_000
    )
    assert row["cost_nano"] == expected
    left = balance(billed, key)
    assert left["used"] == expected / NANO
    assert left["balance"] == (10 * NANO - expected) / NANO
    assert stored_key(billed, key_id)["credits_used_nano"] == expected


def test_aliases_take_their_own_price_or_their_targets_and_unpriced_models_are_free(
    billed: Relay,
) -> None:
    key, _ = billed.create_paid_key()
    table = rates(billed)
    for model, priced_as in (("gpt-5-high", "gpt-5-high"), ("gpt-5-low", "gpt-5")):
        done = chat(billed, key, "#sim tokens=5", model=model)
        assert done.status_code == 200, done.text
        row = billed.usage_row(done.headers["x-request-id"])
        assert row["cost_nano"] == cost(
            table.rate_for(priced_as), input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
        ) > 0
    # a key with nothing left still uses a free model
    empty, _ = billed.create_paid_key(credits="0")
    done = chat(billed, empty, "#sim tokens=5", model="gpt-free")
    assert done.status_code == 200, done.text
    assert billed.usage_row(done.headers["x-request-id"])["cost_nano"] == 0


def test_402_before_any_upstream_call_through_the_openai_sdk(billed: Relay, sim: Sim) -> None:
    key, key_id = billed.create_paid_key(credits="0.001")
    marker = f"broke-{time.monotonic_ns()}"
    client = openai.OpenAI(base_url=billed.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": marker}],
        )
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "insufficient_quota"
    assert refused.value.body["type"] == "insufficient_quota"
    assert "top up" in refused.value.body["message"]
    with pytest.raises(openai.APIStatusError) as streamed:
        with client.responses.stream(model="gpt-5.5", input=marker) as stream:
            for _ in stream:
                pass
    assert streamed.value.status_code == 402
    assert not any(marker in json.dumps(r["body"]) for r in sim.requests()), "upstream was called"
    rows = [
        billed.usage_row(error.response.headers["x-request-id"])
        for error in (refused.value, streamed.value)
    ]
    assert [row["status"] for row in rows] == [402, 402]
    assert all(row["cost_nano"] == 0 and row["error_code"] == "insufficient_quota" for row in rows)
    assert all(row["key_id"] == key_id and row["account"] == "" for row in rows)
    assert balance(billed, key)["used"] == 0


def test_codex_gets_insufficient_quota_as_response_failed(billed: Relay) -> None:
    """Codex re-sends a turn after any HTTP 4xx but 400/429; ``response.failed`` with
    ``insufficient_quota`` is its QuotaExceeded, which it does not retry."""
    key, _ = billed.create_paid_key(credits="0")
    with httpx2.stream(
        "POST", billed.url + "/openai/responses", timeout=10,
        headers={"authorization": f"Bearer {key}", "originator": "codex_exec"},
        json={"model": "gpt-5.5", "input": "hi", "stream": True},
    ) as response:
        assert response.status_code == 200
        text = response.read().decode()
    event = json.loads(next(line[5:] for line in text.splitlines() if line.startswith("data:")))
    assert event["type"] == "response.failed"
    assert event["response"]["error"]["code"] == "insufficient_quota"


def test_concurrent_requests_on_a_small_balance_overdraw_only_by_their_estimate_errors(
    billed: Relay, sim: Sim
) -> None:
    """20 requests at once, each estimated at about 2.06 credits (1,024 expected output
    tokens) but producing 2,000: a balance of 7 credits admits exactly 3 of them (the holds),
    refuses 17 with 402, and ends no lower than minus the three requests' estimate errors.
    Without holds all 20 would have passed the check and spent about 80 credits."""
    key, key_id = billed.create_paid_key(credits="7")
    marker = f"crowd-{time.monotonic_ns()}"
    body = {"model": "gpt-5", "stream": True,
            "messages": [{"role": "user", "content": f"{marker} #sim tokens=2000 delay=0.0005"}]}
    each = estimate(billed, Endpoint.CHAT, body)
    admitted_at_most = 7 * NANO // each
    assert admitted_at_most == 3
    start = threading.Barrier(20)

    def one(_: int) -> int:
        with httpx2.Client(timeout=60) as client:
            start.wait()
            with client.stream(
                "POST", billed.url + "/v1/chat/completions", json=body,
                headers={"authorization": f"Bearer {key}"},
            ) as response:
                response.read()
                return response.status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(20)))
    assert sorted(statuses) == [200] * 3 + [402] * 17
    assert sum(marker in json.dumps(r["body"]) for r in sim.requests()) == 3  # 402: no call
    billed.wait_idle()
    rows = rows_of(billed, key_id, count=20)
    served = [row for row in rows if row["status"] == 200]
    assert len(served) == 3 and all(row["output_tokens"] == 2000 for row in served)
    errors = sum(max(0, row["cost_nano"] - each) for row in served)
    left = balance(billed, key)
    spent = sum(row["cost_nano"] for row in rows)
    assert left["used"] == spent / NANO and left["held"] == 0
    assert left["balance"] < 0, "the test must make the estimates err"
    assert 7 * NANO - spent >= -errors
    print(f"\nestimate {each / NANO:.4f}, cost {served[0]['cost_nano'] / NANO:.4f}, "
          f"balance {left['balance']:.4f} >= bound {-errors / NANO:.4f}")


def test_a_disconnected_stream_is_billed_for_the_tokens_it_delivered(billed: Relay) -> None:
    key, _ = billed.create_paid_key()
    with httpx2.Client(timeout=10) as client:
        with client.stream(
            "POST", billed.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "gpt-5", "stream": True,
                  "messages": [{"role": "user", "content": "#sim tokens=400 delay=0.01"}]},
        ) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            delivered = 0
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data:") and '"content"' in line:
                    delivered += 1
                if delivered == 30:
                    break
            lines.close()
    billed.wait_idle()
    row = billed.usage_row(request_id)
    assert row["client_disconnected"] == 1
    assert row["usage_source"] == "estimate"  # the upstream never reported usage
    # what reached the client, plus at most what was in flight in the relay's small buffer
    assert 30 <= row["output_tokens"] <= 30 + 40, row["output_tokens"]
    expected = row["input_tokens"] * 1_000_000 + row["output_tokens"] * 2_000_000
    assert row["cost_nano"] == expected
    assert balance(billed, key)["used"] == expected / NANO


def test_holds_are_released_on_every_path(billed: Relay) -> None:
    """Success, an upstream error, a client that leaves mid-stream, a queue timeout and a
    client that leaves while queued: afterwards nothing is held and the key's balance is
    exactly its grant minus what its rows were charged."""
    key, key_id = billed.create_paid_key(package="tight")
    headers = {"authorization": f"Bearer {key}"}

    def body(content: str, stream: bool = False) -> dict:
        return {"model": "gpt-5", "stream": stream,
                "messages": [{"role": "user", "content": content}]}

    url = billed.url + "/v1/chat/completions"
    assert httpx2.post(url, json=body("#sim tokens=3"), headers=headers).status_code == 200
    assert httpx2.post(url, json=body("#sim fault=400"), headers=headers).status_code == 400

    with httpx2.Client(timeout=10) as client:
        with client.stream("POST", url, json=body("#sim tokens=300 delay=0.01", True),
                           headers=headers) as response:
            lines = response.iter_lines()
            next(lines)
            assert billed.state()["credits"]["holds"] == 1
            lines.close()  # the client leaves mid-stream
    billed.wait_idle()

    # max_concurrency 1 and a 0.5 s queue timeout: a long request makes the next one wait
    with httpx2.Client(timeout=10) as holder, httpx2.Client(timeout=10) as waiter:
        with holder.stream("POST", url, json=body("#sim tokens=200 delay=0.01", True),
                           headers=headers) as response:
            lines = response.iter_lines()
            next(lines)
            queued = waiter.post(url, json=body("#sim tokens=3"), headers=headers)
            assert queued.status_code == 429 and queued.json()["error"]["code"] == "queue_timeout"
            assert billed.state()["credits"]["holds"] == 1  # the streaming one still holds
            try:
                waiter.post(url, json=body("#sim tokens=3"), headers=headers, timeout=0.2)
            except httpx2.TimeoutException:
                pass  # left while queued
            for _ in lines:
                pass
    state = billed.wait_idle()
    assert state["credits"] == {"holds": 0, "held": 0.0}
    rows = rows_of(billed, key_id, count=6)
    assert len(rows) == 6
    left = balance(billed, key)
    assert left["held"] == 0
    assert left["balance"] == (10 * NANO - sum(row["cost_nano"] for row in rows)) / NANO
    assert stored_key(billed, key_id)["credits_used_nano"] == sum(r["cost_nano"] for r in rows)


def test_top_up_by_cli_is_seen_by_the_running_relay(billed: Relay) -> None:
    key, key_id = billed.create_paid_key(credits="0")
    assert chat(billed, key, "#sim tokens=3").status_code == 402
    done = billed.cli("keys", "topup", "--config", str(billed.config_path), key_id, "2.5",
                      "--note", "test")
    assert done.returncode == 0, done.stderr
    assert "granted 2.5" in done.stdout
    deadline = time.monotonic() + 5
    while balance(billed, key)["granted"] != 2.5:
        assert time.monotonic() < deadline, "the relay never saw the top-up"
        time.sleep(0.05)
    assert chat(billed, key, "#sim tokens=3").status_code == 200
