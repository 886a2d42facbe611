"""Admission: the layered guards a request passes before an upstream account is chosen.

Today the layers are the concurrency caps of DESIGN.md (global → pool → key), each a
``trio.CapacityLimiter``; a request over a cap waits for a slot. The weighted-fair queue, token
buckets, queue caps and timeouts plug in behind the same ``enter`` call.

Guarantees:

* Every slot a request took is released when ``enter``'s block exits, however it exits
  (return, exception, cancellation), without a checkpoint between the exit and the release.
* A request cancelled while waiting for a slot holds nothing afterwards.
* Slots are taken on behalf of the :class:`Lease`, not the current task, so the task that
  enters and the task that leaves may differ without confusing trio's bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from ..config import Config


@dataclass(frozen=True)
class Ticket:
    """Who is asking and for how much: what admission decides on."""

    key_id: str
    package: str
    pool: str
    estimated_tokens: int


@dataclass(eq=False)
class Lease:
    """The slots one admitted request holds; it is also the borrower trio's limiters see."""

    ticket: Ticket
    queued_s: float = 0.0
    held: list[trio.CapacityLimiter] = field(default_factory=list)


def _limiter(limit: int | None) -> trio.CapacityLimiter:
    return trio.CapacityLimiter(limit if limit is not None else math.inf)


class Admission:
    """The global, pool and key concurrency guards for one relay process."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.global_limiter = _limiter(config.global_.max_concurrency)
        self.pool_limiters = {
            name: _limiter(pool.max_concurrency) for name, pool in config.pools.items()
        }
        self.key_limiters: dict[str, trio.CapacityLimiter] = {}

    def _key_limiter(self, ticket: Ticket) -> trio.CapacityLimiter:
        limiter = self.key_limiters.get(ticket.key_id)
        if limiter is None:
            package = self._config.packages.get(ticket.package)
            limiter = _limiter(package.max_concurrency if package else None)
            self.key_limiters[ticket.key_id] = limiter
        return limiter

    def _layers(self, ticket: Ticket) -> list[trio.CapacityLimiter]:
        pool = self.pool_limiters.get(ticket.pool)
        if pool is None:
            pool = self.pool_limiters.setdefault(ticket.pool, _limiter(None))
        # Innermost first: a request waits for its own key's slot before it occupies a place
        # in the shared layers, so one key's backlog cannot hold pool or global slots idle.
        return [self._key_limiter(ticket), pool, self.global_limiter]

    @asynccontextmanager
    async def enter(self, ticket: Ticket) -> AsyncIterator[Lease]:
        lease = Lease(ticket)
        started = trio.current_time()
        try:
            for limiter in self._layers(ticket):
                await limiter.acquire_on_behalf_of(lease)
                lease.held.append(limiter)
            lease.queued_s = trio.current_time() - started
            yield lease
        finally:
            while lease.held:
                lease.held.pop().release_on_behalf_of(lease)

    def in_flight(self) -> dict:
        """Slots in use per layer, for the admin endpoint and the leak tests."""
        return {
            "global": self.global_limiter.borrowed_tokens,
            "pools": {name: lim.borrowed_tokens for name, lim in self.pool_limiters.items()},
            "keys": {
                key: lim.borrowed_tokens
                for key, lim in self.key_limiters.items()
                if lim.borrowed_tokens
            },
            "total": self.global_limiter.borrowed_tokens
            + sum(lim.borrowed_tokens for lim in self.pool_limiters.values())
            + sum(lim.borrowed_tokens for lim in self.key_limiters.values()),
        }
