"""Admission's guarantees, without HTTP: slots are released on every exit, including a cancel
while waiting, and the layers' caps hold."""

from __future__ import annotations

import trio
import trio.testing

from relay.config import parse_config
from relay.guards.admission import Admission, KeyLimits, Ticket

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
