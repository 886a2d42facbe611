"""Virtual token counters: the order in which backlogged flows are served.

Each flow (a key within a pool, or a pool at the global layer) has a counter that grows by the
tokens it is served divided by its weight (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024). The next request served is the head of the backlogged flow with the smallest
counter that may go now. A flow that becomes backlogged again after being idle has its counter
lifted to the smallest counter among the flows already backlogged, so idle time banks no credit:
it re-enters level with the others, not ahead of them.

What a counter is charged is the caller's choice; admission charges what a flow is served, as it
is served (the input when a request is granted, its output as it streams, the correction to the
real usage at its end). So a counter holds no provisional charge that a later refund takes
back, and the lift above is to real service, not to estimates.

This module is pure bookkeeping over counters and queues, with no clock and no I/O, so its
guarantees are tested with hypothesis directly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(eq=False)
class Flow(Generic[Item]):
    """One flow's queue, weight and virtual counter."""

    name: Hashable
    weight: float
    counter: float = 0.0
    queue: deque[Item] = field(default_factory=deque)


class FairQueue(Generic[Item]):
    """Queues of items per flow, served in virtual-token-counter order."""

    def __init__(self) -> None:
        self.flows: dict[Hashable, Flow[Item]] = {}

    def __len__(self) -> int:
        return sum(len(flow.queue) for flow in self.flows.values())

    def flow(self, name: Hashable, weight: float) -> Flow[Item]:
        found = self.flows.get(name)
        if found is None:
            found = self.flows[name] = Flow(name, weight)
        found.weight = weight
        return found

    def push(self, name: Hashable, weight: float, item: Item) -> Flow[Item]:
        """Queue ``item`` for its flow, lifting an idle flow's counter first."""
        flow = self.flow(name, weight)
        if not flow.queue:
            floor = self.min_backlogged_counter()
            if floor is not None and flow.counter < floor:
                flow.counter = floor
        flow.queue.append(item)
        return flow

    def remove(self, name: Hashable, item: Item) -> bool:
        """Take ``item`` out of its flow's queue (a waiter that gave up); False if not there."""
        flow = self.flows.get(name)
        if flow is None:
            return False
        try:
            flow.queue.remove(item)
        except ValueError:
            return False
        return True

    def min_backlogged_counter(self) -> float | None:
        counters = [flow.counter for flow in self.flows.values() if flow.queue]
        return min(counters) if counters else None

    def backlogged(self) -> Iterator[Flow[Item]]:
        """Backlogged flows, smallest counter first (ties by name, for determinism)."""
        flows = [flow for flow in self.flows.values() if flow.queue]
        flows.sort(key=lambda flow: (flow.counter, str(flow.name)))
        return iter(flows)

    def charge(self, name: Hashable, tokens: float) -> None:
        """Count ``tokens`` served to a flow (negative corrects an over-estimate)."""
        flow = self.flows.get(name)
        if flow is not None:
            flow.counter += tokens / flow.weight

    def pop_first(
        self, decide: Callable[[Flow[Item], Item], bool | None]
    ) -> tuple[Flow[Item], Item] | None:
        """Remove and return the head of the smallest-counter flow that may go now.

        ``decide(flow, head)`` answers True (serve it), False (this flow must wait: skip it, so a
        key over its own limits does not block the others) or None (nothing in this queue may go
        now: stop, so that a shared limit is given to the flows in counter order).
        """
        for flow in self.backlogged():
            head = flow.queue[0]
            verdict = decide(flow, head)
            if verdict is None:
                return None
            if verdict:
                flow.queue.popleft()
                return flow, head
        return None

    def forget_idle(self, keep: int = 10_000) -> None:
        """Drop idle flows beyond ``keep`` (oldest counters first) to bound memory."""
        idle = [flow for flow in self.flows.values() if not flow.queue]
        if len(idle) > keep:
            idle.sort(key=lambda flow: flow.counter)
            for flow in idle[: len(idle) - keep]:
                del self.flows[flow.name]
