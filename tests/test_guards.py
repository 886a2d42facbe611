"""Admission's guarantees, without HTTP: slots are released on every exit, including a cancel
while waiting, and the layers' caps hold."""

from __future__ import annotations

import trio
import trio.testing

from relay.config import parse_config
from relay.guards.admission import Admission, AdmissionRefused, KeyLimits, Ticket

CONFIG = parse_config(
    {
        "global": {"max_concurrency": 3},
        "pools": {"p": {"max_concurrency": 2}},
        "packages": {"small": {"pool": "p", "max_concurrency": 1}, "big": {"pool": "p"}},
    }
)


def ticket(key: str, package: str = "big") -> Ticket:
    limits = KeyLimits.of(CONFIG.packages[package])
    return Ticket(key_id=key, pool="p", estimated_tokens=10, limits=limits)


async def test_slots_are_released_after_success_and_error() -> None:
    admission = Admission(CONFIG)  # no refill timer needed: these limits are concurrency only
    async with admission.enter(ticket("a")):
        assert admission.status()["total"] == 3  # key, pool, global
    try:
        async with admission.enter(ticket("a")):
            raise ValueError("boom")
    except ValueError:
        pass
    assert admission.status()["total"] == 0


async def test_key_cap_makes_the_second_request_wait() -> None:
    admission = Admission(CONFIG)  # no refill timer needed: these limits are concurrency only
    order: list[str] = []

    async def use(name: str, hold: float) -> None:
        async with admission.enter(ticket("k", "small")):
            order.append(f"{name} in")
            await trio.sleep(hold)
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(use, "first", 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(use, "second", 0)
    assert order == ["first in", "first out", "second in", "second out"]
    assert admission.status()["total"] == 0


async def test_cancel_while_waiting_leaves_nothing_behind() -> None:
    admission = Admission(CONFIG)  # no refill timer needed: these limits are concurrency only
    async with admission.enter(ticket("a")), admission.enter(ticket("b")):
        # The pool (2 slots) is full: a third request waits, holding its key slot only.
        with trio.move_on_after(0.05) as scope:
            async with admission.enter(ticket("c")):
                raise AssertionError("must not be admitted")
        assert scope.cancelled_caught
        assert admission.keys["c"].in_flight == 0
        assert admission.pools["p"].guard.in_flight == 2
        assert admission.status()["queued"] == 0
    assert admission.status()["total"] == 0


async def test_pool_cap_holds_under_many_concurrent_requests() -> None:
    admission = Admission(CONFIG)  # no refill timer needed: these limits are concurrency only
    peak = 0
    inside = 0

    async def use(index: int) -> None:
        nonlocal peak, inside
        async with admission.enter(ticket(f"k{index}")):
            inside += 1
            peak = max(peak, inside)
            await trio.sleep(0.001)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(use, index)
    assert peak == 2
    assert admission.status()["total"] == 0


METERED = parse_config(
    {
        "pools": {"p": {}},
        "packages": {"m": {"pool": "p", "tpm": 600, "max_queue": 5, "queue_timeout_s": 100}},
    }
)


def metered(key: str = "k", tokens: int = 300) -> Ticket:
    return Ticket(key_id=key, pool="p", estimated_tokens=tokens,
                  limits=KeyLimits.of(METERED.packages["m"]))


async def test_tpm_waits_for_the_refill(autojump_clock) -> None:
    admission = Admission(METERED)
    granted_at: list[float] = []

    async def use() -> None:
        async with admission.enter(metered()):
            granted_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        async with trio.open_nursery() as clients:
            for _ in range(4):
                clients.start_soon(use)
        nursery.cancel_scope.cancel()
    # 600 banked: two at once; then 10 tokens/s refill: one every 30 s.
    assert [round(t) for t in granted_at] == [0, 0, 30, 60]


async def test_reservation_is_reconciled_to_real_use(autojump_clock) -> None:
    admission = Admission(METERED)
    granted_at: list[float] = []

    async def use() -> None:
        async with admission.enter(metered()) as lease:
            granted_at.append(trio.current_time())
            await trio.sleep(1)
            lease.used_tokens = 100  # it cost a third of its estimate

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        async with trio.open_nursery() as clients:
            for _ in range(3):
                clients.start_soon(use)
        nursery.cancel_scope.cancel()
    # The first two give back 200 each at t=1, so the third goes then, not at t=30.
    assert [round(t) for t in granted_at] == [0, 0, 1]
    assert admission.status()["reserved_tokens"] == 0


async def test_queue_full_and_timeout_are_refused(autojump_clock) -> None:
    config = parse_config(
        {"pools": {"p": {}},
         "packages": {"t": {"pool": "p", "max_concurrency": 1, "max_queue": 1,
                            "queue_timeout_s": 5}}}
    )
    admission = Admission(config)
    limits = KeyLimits.of(config.packages["t"])
    ticket_ = Ticket(key_id="k", pool="p", estimated_tokens=1, limits=limits)
    reasons: list[str] = []

    async def attempt() -> None:
        try:
            async with admission.enter(ticket_):
                await trio.sleep(100)
        except AdmissionRefused as refused:
            reasons.append(refused.reason)
            assert refused.retry_after_s >= 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(attempt)
            await trio.testing.wait_all_tasks_blocked()
    assert reasons == ["queue_full", "queue_timeout"]
    assert admission.status()["total"] == 0 and admission.status()["queued"] == 0


async def test_pools_share_the_global_layer_by_weight(autojump_clock) -> None:
    config = parse_config(
        {
            "global": {"max_concurrency": 1},
            "pools": {"light": {"weight": 1}, "heavy": {"weight": 3}},
            "packages": {"a": {"pool": "light", "queue_timeout_s": 1000},
                         "b": {"pool": "heavy", "queue_timeout_s": 1000}},
        }
    )
    admission = Admission(config)
    order: list[str] = []

    async def backlog(pool: str, package: str) -> None:
        limits = KeyLimits.of(config.packages[package])
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one, Ticket(key_id=package, pool=pool, estimated_tokens=100,
                                               limits=limits))

    async def one(ticket_: Ticket) -> None:
        async with admission.enter(ticket_):
            order.append(ticket_.pool)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(backlog, "light", "a")
        nursery.start_soon(backlog, "heavy", "b")
    first = order[:40]  # while both pools are backlogged
    assert abs(first.count("heavy") / first.count("light") - 3) < 0.5


async def test_fifo_pool_serves_in_arrival_order_fair_pool_interleaves(autojump_clock) -> None:
    orders = {}
    for discipline in ("fifo", "fair"):
        config = parse_config(
            {"pools": {"p": {"max_concurrency": 1, "queue": discipline}},
             "packages": {"x": {"pool": "p", "queue_timeout_s": 1000}}}
        )
        admission = Admission(config)
        limits = KeyLimits.of(config.packages["x"])
        order: list[str] = []

        async def one(key: str, admission=admission, order=order, limits=limits) -> None:
            async with admission.enter(Ticket(key_id=key, pool="p", estimated_tokens=10,
                                              limits=limits)):
                order.append(key)
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            for key in ["flood"] * 6 + ["late"] * 2:  # the flood arrives first
                nursery.start_soon(one, key)
                await trio.testing.wait_all_tasks_blocked()
        orders[discipline] = order
    assert orders["fifo"] == ["flood"] * 6 + ["late"] * 2
    assert orders["fair"].index("late") <= 2  # served in turn, not after the whole flood
