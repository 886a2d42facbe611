"""Property tests of the fair queue and the token bucket (no HTTP, no clock)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.guards.buckets import TokenBucket
from relay.guards.fair_queue import FairQueue

weights_st = st.lists(st.integers(min_value=1, max_value=8), min_size=2, max_size=6)
sizes_st = st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=40)


def serve(queue: FairQueue, rounds: int, sizes: list[int], served: dict, refill: bool = True):
    """Dispatch ``rounds`` requests; every flow stays backlogged when ``refill``."""
    for step in range(rounds):
        found = queue.pop_first(lambda flow, item: True)
        assert found is not None
        flow, size = found
        queue.charge(flow.name, size)
        served[flow.name] = served.get(flow.name, 0) + size
        if refill:
            queue.push(flow.name, flow.weight, sizes[step % len(sizes)])


@given(weights_st, sizes_st)
@settings(max_examples=150, deadline=None)
def test_backlogged_flows_are_served_in_proportion_to_their_weights(weights, sizes) -> None:
    queue: FairQueue[int] = FairQueue()
    for index, weight in enumerate(weights):
        for k in range(3):  # a deep queue: the flow stays backlogged while refilled
            queue.push(index, weight, sizes[k % len(sizes)])
    served: dict = {}
    serve(queue, 400, sizes, served)
    normalised = [served.get(i, 0) / w for i, w in enumerate(weights)]
    # VTC's bound: backlogged flows' weighted service differs by at most about one request.
    bound = 2 * max(sizes) / min(weights) + max(sizes)
    assert max(normalised) - min(normalised) <= bound


@given(weights_st, sizes_st, st.integers(min_value=0, max_value=200))
@settings(max_examples=100, deadline=None)
def test_a_flow_back_from_idle_gets_no_banked_credit(weights, sizes, idle_rounds) -> None:
    queue: FairQueue[int] = FairQueue()
    newcomer = "newcomer"
    for index, weight in enumerate(weights):
        for k in range(3):
            queue.push(index, weight, sizes[k % len(sizes)])
    served: dict = {}
    serve(queue, idle_rounds, sizes, served)
    floor = queue.min_backlogged_counter()
    for k in range(3):
        queue.push(newcomer, 1, sizes[k % len(sizes)])
    assert queue.flows[newcomer].counter >= floor  # lifted to the busy flows' level
    # From then on it is served no more than its share: it cannot burst past the others.
    before = dict(served)
    serve(queue, 200, sizes, served)
    gained = {name: served.get(name, 0) - before.get(name, 0) for name in queue.flows}
    weight_of = {name: flow.weight for name, flow in queue.flows.items()}
    others = [gained[name] / weight_of[name] for name in queue.flows if name != newcomer]
    assert gained[newcomer] / 1 <= max(others) + 2 * max(sizes)


@given(weights_st, sizes_st)
@settings(max_examples=100, deadline=None)
def test_no_flow_starves(weights, sizes) -> None:
    queue: FairQueue[int] = FairQueue()
    for index, weight in enumerate(weights):
        queue.push(index, weight, sizes[index % len(sizes)])
    served: dict = {}
    # Within this many dispatches every backlogged flow has been served at least once.
    rounds = len(weights) * math.ceil(max(weights) / min(weights)) * math.ceil(
        max(sizes) / min(sizes)
    ) + len(weights)
    serve(queue, rounds, sizes, served)
    assert set(served) == set(range(len(weights)))


@given(weights_st, st.integers(min_value=0, max_value=5))
def test_a_flow_over_its_own_limit_never_blocks_the_others(weights, blocked_index) -> None:
    blocked = blocked_index % len(weights)
    queue: FairQueue[int] = FairQueue()
    for index, weight in enumerate(weights):
        queue.push(index, 1 if index == blocked else weight, 10)
    queue.flows[blocked].counter = -1000  # first in line by far
    served = []
    for _ in range(len(weights) - 1):
        found = queue.pop_first(lambda flow, item: flow.name != blocked)
        assert found is not None
        served.append(found[0].name)
    assert blocked not in served and len(served) == len(weights) - 1
    assert len(queue.flows[blocked].queue) == 1


def test_stop_verdict_serves_nobody() -> None:
    queue: FairQueue[int] = FairQueue()
    queue.push("a", 1, 1)
    queue.push("b", 1, 1)
    assert queue.pop_first(lambda flow, item: None) is None
    assert len(queue) == 2


@given(
    st.floats(min_value=0.5, max_value=1000),
    st.floats(min_value=1, max_value=5000),
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=2), st.floats(min_value=0.1, max_value=800)),
        max_size=120,
    ),
)
@settings(max_examples=200, deadline=None)
def test_bucket_never_admits_more_than_rate_times_time_plus_burst(rate, capacity, steps):
    bucket = TokenBucket(rate, capacity)
    now = 0.0
    taken = []
    for dt, amount in steps:
        now += dt
        if bucket.can_take(amount, now):
            bucket.take(amount, now)
            taken.append((now, amount))
    # Every window [start, end] received at most capacity + rate × its length (+ the
    # oversize request a full bucket may let through).
    for i, (start, _) in enumerate(taken):
        total = 0.0
        for end, amount in taken[i:]:
            total += amount
            assert total <= capacity + rate * (end - start) + max(0.0, amount - capacity) + 1e-6


def test_bucket_debt_is_paid_off_by_refill() -> None:
    bucket = TokenBucket.per_minute(600)  # 10 tokens/s
    bucket.take(600, 0.0)
    bucket.give(-100, 0.0)  # the request used 100 more than reserved
    assert bucket.level(0.0) == -100
    assert bucket.wait_time(50, 0.0) == 15.0
    assert not bucket.can_take(50, 14.9)
    assert bucket.can_take(50, 15.0)


def test_a_flow_waiting_at_the_level_is_not_passed_by_newcomers() -> None:
    """Newcomers are lifted to the level a waiting flow is at; the tie goes to the one that
    waited first, whatever the names (by name, "zed" would wait for every "a…" arriving)."""
    queue: FairQueue[int] = FairQueue()
    queue.push("zed", 1.0, 1)
    served = []
    for n in range(5):
        queue.push(f"a{n}", 1.0, 1)
        flow, _ = queue.pop_first(lambda flow, item: True)
        served.append(flow.name)
    assert served[0] == "zed"
    assert served[1:] == ["a0", "a1", "a2", "a3"]
