"""A key's guard state survives limit changes and is forgotten when idle.

Through the real relay: changing a key's limits (admin API or ``relay keys set-limits``) while
requests are in flight or queued lets none of them past the old or the new cap, and refills no
bucket. In virtual time: per-key state of keys gone idle is forgotten, so memory stays flat with
any number of distinct keys, and forgetting gives a key no allowance it would not have had.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx2
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import parse_config
from relay.guards.admission import Admission, KeyLimits, Ticket
from relay.guards.fair_queue import FairQueue

from .conftest import Relay, Sim, start_relay

BODY = """
[pools.shared]

[packages.solo]
pool = "shared"
max_concurrency = 1
max_queue = 10
queue_timeout_s = 30

[packages.ten]
pool = "shared"
rpm = 10
max_queue = 1
queue_timeout_s = 0.2

[[accounts]]
name = "sim-chat"
pool = "shared"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat"]
"""

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    relay = start_relay(tmp_path_factory.mktemp("guards-state"), sim.url, body=BODY)
    yield relay
    log = relay.process.stop()
    assert "Traceback" not in log, log


def chat(text: str, stream: bool = False) -> dict:
    return {"model": "deepseek-chat", "stream": stream,
            "messages": [{"role": "user", "content": text}]}


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = trio.current_time() + timeout
    while not condition():
        assert trio.current_time() < deadline, "timed out"
        await trio.sleep(0.02)


async def test_limit_change_with_a_stream_running_and_one_queued_keeps_the_cap(
    server: Relay, sim: Sim
) -> None:
    key = server.create_key("solo")
    ident = server.admin("GET", "/admin/keys").json()
    ident = next(k["id"] for k in ident["data"] if k["package"] == "solo")
    sim.reset()
    statuses: list[int] = []
    headers = {"authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(base_url=server.url, timeout=30) as client:

        async def one() -> None:
            response = await client.post(
                CHAT, json=chat("#sim tokens=10 delay=0.06", True), headers=headers
            )
            statuses.append(response.status_code)

        def key_state() -> dict:
            return server.state()["admission"]["keys"].get(ident, {})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await wait_for(lambda: key_state().get("in_flight") == 1)
            nursery.start_soon(one)
            await wait_for(lambda: key_state().get("queued") == 1)
            # Through the admin API (applied at once), then as `relay keys set-limits` does
            # (written to the database, seen by the relay within a second).
            changed = server.admin("POST", f"/admin/keys/{ident}/limits", {"tpm": 500000})
            assert changed.status_code == 200, changed.text
            for _ in range(2):
                nursery.start_soon(one)
            done = server.cli("keys", "set-limits", ident, "--config",
                              str(server.config_path), "--tpm", "400000")
            assert done.returncode == 0, done.stderr
            await trio.sleep(1.5)
            nursery.start_soon(one)
    assert statuses == [200] * 5
    assert sim.stats()["peak_active_streams"] == 1
    assert server.wait_idle()["admission"]["total"] == 0


async def test_weight_change_lets_no_extra_request_past_rpm(server: Relay) -> None:
    key = server.create_key("ten")
    ident = next(k["id"] for k in server.admin("GET", "/admin/keys").json()["data"]
                 if k["package"] == "ten")
    headers = {"authorization": f"Bearer {key}"}
    started = time.monotonic()
    statuses: list[int] = []
    async with httpx2.AsyncClient(base_url=server.url, timeout=30) as client:

        async def burst(n: int) -> None:
            for _ in range(n):
                response = await client.post(CHAT, json=chat("hi"), headers=headers)
                statuses.append(response.status_code)

        await burst(12)
        assert statuses.count(200) == 10 and statuses.count(429) == 2
        done = server.cli("keys", "set-limits", ident, "--config", str(server.config_path),
                          "--weight", "2")
        assert done.returncode == 0, done.stderr

        async def weight() -> float:
            return (await client.get("/v1/limits", headers=headers)).json()["weight"]

        deadline = trio.current_time() + 5
        while await weight() != 2:
            assert trio.current_time() < deadline
            await trio.sleep(0.05)
            await burst(1)
        changed = server.admin("POST", f"/admin/keys/{ident}/limits", {"weight": 3})
        assert changed.status_code == 200, changed.text
        await burst(10)
    elapsed = time.monotonic() - started
    refilled = int(elapsed * 10 / 60)  # RPM 10: one more request every 6 s
    assert statuses.count(200) <= 10 + refilled, (statuses, elapsed)


# -- the same guarantees without HTTP, in virtual time -------------------------------------

STATE = parse_config(
    {
        "pools": {"p": {"max_concurrency": 4}},
        "packages": {"m": {"pool": "p", "rpm": 10, "tpm": 6000, "max_concurrency": 1,
                           "queue_timeout_s": 600}},
    }
)


def metered(key: str, read_at: float = 0.0, **overrides: object) -> Ticket:
    limits = KeyLimits.of(STATE.packages["m"], overrides)
    return Ticket(key_id=key, pool="p", estimated_tokens=110, input_tokens=10,
                  max_output_tokens=100, limits=limits, limits_read_at=read_at)


async def test_changed_limits_keep_what_is_in_flight_and_queued(autojump_clock) -> None:
    admission = Admission(STATE)
    inside, peak, granted = 0, 0, 0

    async def use(ticket: Ticket, hold: float) -> None:
        nonlocal inside, peak, granted
        async with admission.enter(ticket) as lease:
            inside += 1
            granted += 1
            peak = max(peak, inside)
            await trio.sleep(hold)
            lease.used_tokens = lease.output_tokens = 10
            inside -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        async with trio.open_nursery() as clients:
            clients.start_soon(use, metered("k", 0.0), 10)
            await trio.testing.wait_all_tasks_blocked()
            clients.start_soon(use, metered("k", 0.0), 10)  # queued behind the cap of 1
            await trio.testing.wait_all_tasks_blocked()
            guard = admission.keys["k"]
            # Newer limits (another TPM, another weight) keep the guard and what it holds.
            clients.start_soon(use, metered("k", 1.0, tpm=5000, weight=2.0), 10)
            await trio.testing.wait_all_tasks_blocked()
            assert admission.keys["k"] is guard and guard.limits.tpm == 5000
            assert guard.in_flight == 1 and peak == 1
            tpm_level = guard.tpm.level(trio.current_time())
            assert tpm_level == 5000 and guard.rpm.level(trio.current_time()) == 9  # not refilled
            # An older ticket (the first request's headers) does not put its limits back.
            admission.key_rate_state(metered("k", 0.0))
            assert admission.keys["k"] is guard and guard.limits.tpm == 5000
            # A raised cap lets the queue go at once; lowered again, no one more is let in
            # until the requests in flight are under the new cap.
            admission.set_key_limits("k", metered("k", tpm=5000, max_concurrency=3).limits, 2.0)
            await trio.testing.wait_all_tasks_blocked()
            assert guard.in_flight == 3
            admission.set_key_limits("k", metered("k", tpm=5000).limits, 3.0)
            clients.start_soon(use, metered("k", 3.0, tpm=5000), 1)
            await trio.sleep(5)
            assert guard.in_flight == 3 and inside == 3  # the fourth waits
        nursery.cancel_scope.cancel()
    assert peak == 3 and granted == 4 and admission.status()["total"] == 0


async def test_rpm_is_not_refilled_by_a_weight_change(autojump_clock) -> None:
    admission = Admission(STATE)
    read_at = 0.0
    for weight in (1.0, 2.0, 3.0, 1.0):
        for _ in range(5):
            read_at += 1
            with trio.move_on_after(1):  # over the RPM: it would wait for the refill
                async with admission.enter(metered("k", read_at, weight=weight)) as lease:
                    lease.used_tokens = 10
    # 10 banked at once, then one every 6 s (each refused attempt waited 1 s).
    assert 10 <= admission.granted <= 10 + int(trio.current_time() / 6)


async def test_memory_stays_flat_with_100000_distinct_keys(autojump_clock) -> None:
    admission = Admission(STATE)
    remembered: dict[int, tuple[int, int, int]] = {}  # keys seen → (guards, flows, waiting)

    async def worker(first: int, step: int) -> None:
        for n in range(first, 100_000, step):
            async with admission.enter(metered(f"key-{n}")) as lease:
                await trio.sleep(0.05)
                lease.produced(5)
                lease.used_tokens, lease.output_tokens = 15, 5
            if first == 0 and n % 10_000 == 0:
                remembered[n] = (len(admission.keys), len(admission.pools["p"].queue.flows),
                                 len(admission._waiting))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        async with trio.open_nursery() as clients:
            for first in range(8):  # twice the pool's slots: a queue all along
                clients.start_soon(worker, first, 8)
        nursery.cancel_scope.cancel()
    # 160 requests a second, each of a new key: a key is remembered until its RPM bucket is
    # full again and it has been unused for FORGIVE_AFTER_S (30 s), so about 5,000 keys at
    # any time, whatever the number seen.
    rate = 8 / 0.05
    bound = rate * (Admission.FORGIVE_AFTER_S + 5)
    print(f"\nremembered (guards, flows, waiting) by keys seen: {remembered}")
    plateau = remembered[30_000]
    for seen, (guards, flows, waiting) in remembered.items():
        assert guards <= bound and flows <= bound and waiting <= 8, (seen, remembered)
        if seen >= 30_000:  # flat: no growth once the first keys could be forgotten
            assert guards <= plateau[0] * 1.05 and flows <= plateau[1] * 1.05, remembered
    assert len(admission.estimates) <= Admission.MAX_ESTIMATES
    assert admission.status()["total"] == 0


async def test_a_key_served_ahead_is_forgotten_only_after_it_is_unused(autojump_clock) -> None:
    """A key served ahead of the others keeps its counter while it pauses between requests
    (or its next one would jump the queue), and is forgiven only once unused for 30 s."""
    admission = Admission(STATE)
    queue = admission.pools["p"].queue

    async def use(ticket: Ticket, hold: float, output: int) -> None:
        async with admission.enter(ticket) as lease:
            await trio.sleep(hold)
            lease.produced(output)
            lease.used_tokens, lease.output_tokens = 10 + output, output

    async def busy(n: int) -> None:  # unlimited keys keeping a queue in front of 4 slots
        while True:
            await use(metered(f"busy-{n}", rpm=None, tpm=None), 1, 50)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        for n in range(8):
            nursery.start_soon(busy, n)
        await trio.sleep(5)
        await use(metered("ahead"), 0.1, 2000)
        ahead = queue.flows["ahead"].counter
        assert ahead > queue.level + 1500
        await trio.sleep(25)  # its buckets are full again; unused for 25 s
        assert admission.keys["ahead"].idle(trio.current_time())
        assert queue.flows["ahead"].counter == ahead > queue.level  # still ahead: kept
        await trio.sleep(10)  # unused for 35 s
        assert "ahead" not in admission.keys and "ahead" not in queue.flows
        nursery.cancel_scope.cancel()


async def test_a_key_is_not_forgotten_before_its_buckets_are_full(autojump_clock) -> None:
    admission = Admission(STATE)
    for _ in range(10):
        async with admission.enter(metered("spent")) as lease:
            lease.used_tokens = 10
    await trio.sleep(30)  # half refilled
    for n in range(20):  # other keys' arrivals sweep the idle ones
        async with admission.enter(metered(f"other-{n}")) as lease:
            lease.used_tokens = 10
    assert "spent" in admission.keys
    before = admission.granted
    for _ in range(10):
        with trio.move_on_after(0.1):
            async with admission.enter(metered("spent")) as lease:
                lease.used_tokens = 10
    assert admission.granted - before == 5  # the 5 its bucket refilled, not 10
    await trio.sleep(120)
    for n in range(40):
        async with admission.enter(metered(f"later-{n}")) as lease:
            lease.used_tokens = 10
    assert "spent" not in admission.keys and "spent" not in admission.pools["p"].queue.flows


ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 5), st.integers(1, 300)),
        st.tuples(st.just("pop")),
    ),
    max_size=200,
)


@given(ops_st)
@settings(max_examples=300, deadline=None)
def test_forgetting_idle_flows_changes_no_one_s_turn(ops) -> None:
    kept: FairQueue[int] = FairQueue()
    forgetful: FairQueue[int] = FairQueue()
    for op in ops:
        for queue in (kept, forgetful):
            if op[0] == "push":
                queue.push(op[1], 1 + op[1] % 3, op[2])
        if op[0] == "pop":
            served = []
            for queue in (kept, forgetful):
                found = queue.pop_first(lambda flow, item: True)
                if found is not None:
                    queue.charge(found[0].name, found[1])
                    served.append((found[0].name, found[1]))
                else:
                    served.append(None)
            assert served[0] == served[1]
        for name in list(forgetful.flows):
            forgetful.forget(name)
    assert len(kept) == len(forgetful)
