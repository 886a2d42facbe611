"""Virtual token counters: the order in which backlogged flows are served.

Each flow (a key within a pool, or a pool at the global layer) has a counter that grows by the
tokens it is served divided by its weight (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024). The next request served is the head of the backlogged flow with the smallest
counter that may go now. A flow that becomes backlogged again after being idle has its counter
lifted to the smallest counter among the flows already backlogged, so idle time banks no credit:
it re-enters level with the others, not ahead of them. When no flow is backlogged, it is lifted
to the counter of the flow served last (VTC's rule for an empty queue), so a quiet spell banks
none either. The queue keeps the highest level any flow was lifted to (:attr:`FairQueue.level`,
its virtual time; it never goes down), and lifts to at least that.

Forgetting. A flow that is not backlogged and whose counter is at or below that level would be
lifted to the level (or higher) when it comes back, exactly as a new flow would: it can be
dropped and recreated later with no change in the order anyone is served (:meth:`forget`). A
flow above the level (served ahead of the others) is kept until the level passes it, unless
the caller chooses to forgive that excess (``forget(name, forgive=True)``; admission does so for
a key unused for a while, since with a steady stream of new flows the level need never pass it).
The caller must not forget a flow that is still being charged (requests in flight): charges to
an unknown flow are ignored.

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
        self.level = 0.0  # the virtual time: the least a flow becoming backlogged is lifted to
        self._last_served: Flow[Item] | None = None
        # The flows with items queued, and how many items: every operation costs what is
        # queued, not how many flows are remembered.
        self._backlogged: dict[Hashable, Flow[Item]] = {}
        self._items = 0

    def __len__(self) -> int:
        return self._items

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
            if floor is None and self._last_served is not None:
                floor = self._last_served.counter
            if floor is not None and floor > self.level:
                self.level = floor
            if flow.counter < self.level:
                flow.counter = self.level
        flow.queue.append(item)
        self._backlogged[name] = flow
        self._items += 1
        return flow

    def forgettable(self, name: Hashable) -> bool:
        """Whether the flow is unknown, or idle with its counter at or below :attr:`level`:
        coming back, it would be lifted to where a new flow is."""
        flow = self.flows.get(name)
        return flow is None or (not flow.queue and flow.counter <= self.level)

    def forget(self, name: Hashable, *, forgive: bool = False) -> bool:
        """Drop the flow if :meth:`forgettable` (True if it was dropped). A backlogged flow is
        always kept; so is one served ahead of the level, unless ``forgive``: then what it was
        served beyond the level is forgiven (it comes back level with a new flow, as a
        deficit-round-robin flow's deficit is reset when its queue empties)."""
        flow = self.flows.get(name)
        if flow is None or flow.queue or not (forgive or flow.counter <= self.level):
            return False
        del self.flows[name]
        if self._last_served is flow:
            if not self._backlogged:
                # The empty-queue rule would lift the next arrival to this counter.
                self.level = max(self.level, flow.counter)
            self._last_served = None
        return True

    def remove(self, name: Hashable, item: Item) -> bool:
        """Take ``item`` out of its flow's queue (a waiter that gave up); False if not there."""
        flow = self.flows.get(name)
        if flow is None:
            return False
        try:
            flow.queue.remove(item)
        except ValueError:
            return False
        self._items -= 1
        if not flow.queue:
            del self._backlogged[name]
        return True

    def min_backlogged_counter(self) -> float | None:
        return min((flow.counter for flow in self._backlogged.values()), default=None)

    def backlogged(self) -> Iterator[Flow[Item]]:
        """Backlogged flows, smallest counter first; ties in the order the flows became
        backlogged (so a flow waiting at the level is not passed by every newcomer lifted to
        the same level)."""
        return iter(sorted(self._backlogged.values(), key=lambda flow: flow.counter))

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
                self._items -= 1
                if not flow.queue:
                    del self._backlogged[flow.name]
                self._last_served = flow
                return flow, head
        return None
