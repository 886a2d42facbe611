"""Admission: the layered guards a request passes before it may call an upstream account.

Layers, in the order of DESIGN.md: global (TPM, TPS, concurrency) → pool (TPM, TPS, concurrency,
queue cap) → key (TPM, RPM, concurrency, queue cap, queue timeout) → account (concurrency, TPM,
RPM, chosen among the request's candidates). A request that cannot go at once waits in its pool's
weighted-fair queue (:mod:`.fair_queue`); pools share the global layer by pool weight the same way.

How a request goes through (``async with admission.enter(ticket) as lease``):

1. It is queued in its pool under its key's flow (429 ``queue_full`` at once if the key's or the
   pool's queue is full).
2. The dispatcher grants queued requests in fair order whenever capacity frees up: a concurrency
   slot is released, a token bucket refills (a timer), or a request arrives. Granting takes every
   layer's concurrency slot, charges the request's input (estimate) to every token bucket and to
   its virtual counters, and *holds* its expected output (see :mod:`.estimates`) in every guard.
3. While the answer streams, the caller reports the output produced so far
   (:meth:`Lease.produced`): each new token is charged to the buckets and the counters and taken
   off what the guard holds. A request is therefore charged what it is served, when it is served.
4. A request not granted within its key's ``queue_timeout_s`` leaves with 429 ``queue_timeout``.
5. When the block exits, the charges are corrected to ``lease.used_tokens`` (what the request
   really cost, which the caller sets; a failed or cancelled request sets what was produced),
   whatever is still held for it is released, and every slot is released.

Why charge as served rather than the whole estimate at grant. The fair queue: a counter charged
an over-estimate (1,024 expected output for an answer of 40) carries it while the request runs;
a key that arrives meanwhile is lifted to counters that will be refunded, and starts behind. A
counter charged as served holds no provisional charge, so the lift is to real service (VTC,
Sheng et al., charge output as it is generated). The token buckets: tokens are charged when they
are delivered, so the tokens delivered in any window are the refill plus the level at its start
minus the level at its end; admission, which requires the input *and* the expected output of
every request in flight to fit (``held``), keeps that level within about one request of steady
(a TPM bucket refills 1% below its limit to absorb that swing: :data:`.buckets.TPM_REFILL`).

Guarantees:

* Every slot and reservation a request took is released or reconciled when ``enter``'s block
  exits, however it exits, with no checkpoint between the exit and the release.
* A request cancelled while queued (its client left) is removed from the queue at once and was
  never charged.
* A key over its own limits is skipped, never allowed to block other keys of its pool.
* Admitting a request needs its reservation (input + expected output) to fit in each TPM
  bucket on top of what the guard already holds for requests in flight. A per-second bucket
  (TPS) is checked for the reservation alone: a one-second cap cannot hold back the rest of a
  stream that lasts many seconds; it limits how fast work is started.

Concurrency caps are ``trio.CapacityLimiter``\\s taken on behalf of the :class:`Lease`, so the
task that enters and the task that exits may differ. Nothing here knows about HTTP.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ..config import Config
from .estimates import OutputEstimate
from .fair_queue import FairQueue
from .guard import LIMIT_CODES, LIMIT_UNITS, Guard, KeyLimits  # noqa: F401 (re-exported)
from .shared import (
    Fairness,
    SharedGuards,
    SharedLease,
    SharedUnavailable,
    SharedWaitExpired,
    subjects_of,
)


class AdmissionRefused(Exception):
    """The request was not admitted; ``reason`` is queue_full, queue_timeout, rate_limited,
    concurrency_limited, shared_unavailable or shutting_down (see
    :meth:`Admission.refuse_waiting`). ``code`` is
    the error code a client is told: the reason, or for a key that may not queue
    (``max_queue = 0``) the kind of limit it is at (``rate_limit_exceeded`` for a TPM/TPS/RPM
    bucket, ``concurrency_limit_exceeded`` for its max_concurrency). The message names the
    limit and its value."""

    def __init__(
        self, reason: str, message: str, retry_after_s: float, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s
        self.code = code or reason


@dataclass(frozen=True)
class Ticket:
    """Who is asking, for how much, and which accounts could serve it (preferred first).

    ``estimated_tokens`` is the protocol layer's estimate (input + the client's output cap, else
    a default). With ``input_tokens`` (its input part) the request is charged as it is served:
    the input at grant, the output as reported, and the expected output (the key's recent mean,
    within ``max_output_tokens``) is held meanwhile. Without it, the whole estimate is charged at
    grant (for callers that report no progress).
    """

    key_id: str
    pool: str
    estimated_tokens: int
    limits: KeyLimits = KeyLimits()  # noqa: RUF009 (frozen: one shared default is safe)
    accounts: Sequence[Guard] = ()
    preferred: Guard | None = None  # a sticky session's account: taken whenever it has room
    input_tokens: int | None = None
    max_output_tokens: int | None = None
    #: When ``limits`` were read (any clock that only goes forward; the relay uses the trio
    #: time its request started). A key's guard takes a ticket's limits only if they were read
    #: no earlier than the ones it enforces, so a ticket of an older request never puts back
    #: the limits it was admitted under.
    limits_read_at: float = 0.0


@dataclass(eq=False)
class Lease:
    """What one admitted request holds; also the borrower trio's limiters see.

    While the answer streams, the caller reports the output tokens produced so far with
    :meth:`produced` (cheap: no I/O, no dispatch). Before the block exits it sets
    ``used_tokens`` to the request's real cost and, if the answer is complete,
    ``output_tokens`` to its real output (the key's expected output learns from it). If
    ``used_tokens`` stays None, the reservation is kept as the cost (the safe side for limits).
    """

    ticket: Ticket
    account: Guard | None = None
    queued_s: float = 0.0
    used_tokens: int | None = None
    output_tokens: int | None = None
    held: list[Guard] = field(default_factory=list)
    charged: int = 0  # tokens charged so far: the input at grant, then the output reported
    expected: int = 0  # expected output still held (reserved, not charged yet)
    output_seen: int = 0  # output tokens reported with produced()
    admission: Admission | None = field(default=None, repr=False)
    shared: SharedLease | None = None  # what it holds in Redis (several processes)
    local_only: bool = False  # admitted by this process alone while Redis was lost

    def produced(self, output_tokens: int) -> None:
        """The answer has produced ``output_tokens`` so far (a running total): charge the new
        ones to every guard's buckets and the fair queue's counters now."""
        new = output_tokens - self.output_seen
        if new > 0 and self.admission is not None and self.held:
            self.output_seen = output_tokens
            self.admission._serve(self, new)


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    enqueued_at: float
    event: trio.Event = field(default_factory=trio.Event)
    lease: Lease | None = None


class _Pool:
    def __init__(
        self, name: str, guard: Guard, weight: float, max_queue: int | None, fifo: bool = False
    ) -> None:
        self.name = name
        self.guard = guard
        self.weight = weight
        self.max_queue = max_queue
        self.fifo = fifo  # one flow for every key: first come, first served (a baseline)
        self.queue: FairQueue[_Waiter] = FairQueue()
        self.counter = 0.0  # virtual tokens at the global layer, per pool weight

    def flow_of(self, ticket: Ticket) -> str:
        return "*" if self.fifo else ticket.key_id


class Admission:
    """The guards of one relay process and the fair queue in front of them."""

    #: Keys whose output estimate is kept (the most recently used ones), to bound memory. A
    #: key without one reserves its requests' defaults (more than needed: the safe side).
    MAX_ESTIMATES = 10_000
    #: Keys at the head of the idle-state sweep examined per arrival (see :meth:`_forget_idle`).
    SWEEP_PER_ARRIVAL = 2
    #: An idle key unused this long is forgotten even if it was served ahead of its queue's
    #: level (what it was served beyond the level is then forgiven).
    FORGIVE_AFTER_S = 30.0

    def __init__(self, config: Config, shared: SharedGuards | None = None) -> None:
        now = trio.current_time() if _in_trio() else 0.0
        self._config = config
        #: The guard state shared with other processes through Redis (``server.redis_url``):
        #: a request granted here also takes its leases there before it goes (see
        #: :mod:`.shared`); None: this process's guards are the only ones.
        self.shared = shared
        self._share: float | None = None  # see share_limits
        self._local_leases: set[Lease] = set()  # in flight, admitted while Redis was lost
        self._released = trio.Event()  # set (and replaced) whenever a lease is released
        self._share_waiting: list[Lease] = []  # waiting to fit this process's share alone
        g = config.global_
        self.global_guard = Guard(
            "global", max_concurrency=g.max_concurrency, tpm=g.tpm, tps=g.tps, now=now
        )
        self.pools: dict[str, _Pool] = {}
        for name, pool in config.pools.items():
            guard = Guard(
                name, max_concurrency=pool.max_concurrency, tpm=pool.tpm, tps=pool.tps, now=now
            )
            self.pools[name] = _Pool(
                name, guard, pool.weight, pool.max_queue, fifo=pool.queue == "fifo"
            )
        if shared is not None:
            # The global and pool caps are leases in Redis, taken in the shared fair order:
            # held back here too, a process's requests would wait in front of its own
            # slots, out of that order (and capacity free elsewhere would go unused).
            for guard in (self.global_guard, *(pool.guard for pool in self.pools.values())):
                guard.limiter.total_tokens = math.inf
        self.keys: dict[str, Guard] = {}  # least recently examined or arrived first
        self.estimates: dict[str, OutputEstimate] = {}
        self._waiting: dict[str, int] = {}  # key id → queued requests
        self._wake_at = math.inf
        self._rearm = trio.Event()
        self.granted = 0
        self.refused: dict[str, int] = {
            "queue_full": 0, "queue_timeout": 0, "rate_limited": 0, "concurrency_limited": 0,
        }
        self._refusal: str | None = None  # set by refuse_waiting: no one is admitted any more

    # -- the public surface ---------------------------------------------------------------

    @asynccontextmanager
    async def enter(self, ticket: Ticket) -> AsyncIterator[Lease]:
        """Wait for admission (fairly), hold the slots for the block, then reconcile."""
        if self._refusal is not None:
            raise AdmissionRefused("shutting_down", self._refusal, retry_after_s=1.0)
        now = trio.current_time()
        self._forget_idle(now)
        pool = self._pool(ticket.pool)
        key = self._key_guard(ticket, now)
        self.keys[ticket.key_id] = self.keys.pop(ticket.key_id)  # last in the sweep's order
        key.last_used = now
        limits = key.limits
        assert limits is not None
        self._check_queue_room(ticket, pool, key, now)
        waiter = _Waiter(ticket, now)
        fair = self._fairness(pool, ticket, limits)
        if self.shared is not None:
            self.shared.join_backlog(fair)
        pool.queue.push(pool.flow_of(ticket), limits.weight, waiter)
        self._lift_pool(pool)
        self._waiting[ticket.key_id] = self._waiting.get(ticket.key_id, 0) + 1
        try:
            self._dispatch()
            # Granted at once, the usual case: no cancel scope and no extra trip through the
            # scheduler (the upstream call that follows checkpoints anyway).
            if waiter.lease is None:
                with trio.move_on_after(limits.queue_timeout_s):
                    await waiter.event.wait()
        except BaseException:
            # Cancelled (the client left) just as it was granted: nothing reached an upstream,
            # so give everything back, uncharged.
            if waiter.lease is not None:
                waiter.lease.used_tokens = 0
                self._release(waiter.lease)
                if self.shared is not None:
                    self.shared.leave_backlog(fair)
            raise
        finally:
            left = self._waiting[ticket.key_id] - 1
            if left:
                self._waiting[ticket.key_id] = left
            else:
                del self._waiting[ticket.key_id]
            if waiter.lease is None:
                # Not granted (timed out or cancelled): leave the queue, uncharged.
                pool.queue.remove(pool.flow_of(ticket), waiter)
                if self.shared is not None:
                    self.shared.leave_backlog(fair)
        lease = waiter.lease
        if lease is None and self._refusal is not None:
            raise AdmissionRefused("shutting_down", self._refusal, retry_after_s=1.0)
        if lease is None:
            self.refused["queue_timeout"] += 1
            holding = self._holding_back(ticket, pool, key, trio.current_time())
            still = (
                f"{holding[1]} was still reached" if holding is not None
                else "its turn did not come (other keys' requests were served first)"
            )
            raise AdmissionRefused(
                "queue_timeout",
                f"Your request waited {limits.queue_timeout_s:g}s in the queue (the key's "
                f"queue_timeout_s) and {still}.",
                retry_after_s=self._retry_after(ticket, pool, key),
            )
        if self.shared is not None:
            try:
                await self._acquire_shared(
                    lease, waiter.enqueued_at + limits.queue_timeout_s, fair
                )
            except BaseException:
                lease.used_tokens = 0  # nothing reached an upstream
                self._release(lease)
                raise
            finally:
                self.shared.leave_backlog(fair)
            lease.queued_s = trio.current_time() - waiter.enqueued_at
            if lease.shared is None:
                lease.local_only = True
                self._local_leases.add(lease)
        try:
            yield lease
        finally:
            used = self._release(lease)
            self._local_leases.discard(lease)
            if lease.shared is not None:
                assert self.shared is not None
                self.shared.release(lease.shared, used)

    async def _within_share(self, lease: Lease, deadline: float) -> bool:
        """Wait (in arrival order) until the lease fits this process's share of every layer
        it holds, counting the leases that run, not those waiting here as it does: True when
        it may go on this process's say alone, False as soon as Redis is back (the caller
        then takes the lease there instead). :class:`SharedWaitExpired` at ``deadline``."""
        assert self.shared is not None
        self._share_waiting.append(lease)
        try:
            while self.shared.degraded:
                first = next(
                    (w for w in self._share_waiting if self._fits_share(w)), None
                )
                if first is lease:
                    return True
                released = self._released
                with trio.move_on_at(min(deadline, trio.current_time() + 0.25)):
                    await released.wait()
                if trio.current_time() >= deadline:
                    raise SharedWaitExpired()
            return False
        finally:
            self._share_waiting.remove(lease)
            self._released.set()  # the next one may fit now (or stop waiting)
            self._released = trio.Event()

    def _fits_share(self, lease: Lease) -> bool:
        for guard in lease.held:
            waiting = sum(1 for w in self._share_waiting if guard in w.held)
            if guard.in_flight - waiting >= guard.limiter.total_tokens:
                return False
        return True

    def _fairness(self, pool: _Pool, ticket: Ticket, limits: KeyLimits) -> Fairness:
        """The request's place in its pool's fair order across processes."""
        return Fairness(pool.name, pool.flow_of(ticket), 1.0 if pool.fifo else limits.weight)

    async def _acquire_shared(self, lease: Lease, deadline: float, fair: Fairness) -> None:
        """Take the lease's shared capacity too (every layer it holds here, in Redis), waiting
        until ``deadline`` if another process holds it; refused like a local wait that ran
        out, or, when Redis is unreachable under ``redis_failure = "closed"``, with reason
        ``shared_unavailable``."""
        assert self.shared is not None
        subjects = _shared_subjects(lease)
        try:
            while True:
                lease.shared = await self.shared.acquire(
                    subjects, lease.charged, lease.expected, deadline, fair
                )
                # None: Redis is lost ("local"); this process's share of each cap holds alone.
                # The request may have been granted here under the whole caps, before Redis
                # went: it waits until it fits within that share, or for Redis to be back.
                if lease.shared is not None or await self._within_share(lease, deadline):
                    break
        except SharedUnavailable as error:
            raise AdmissionRefused("shared_unavailable", str(error), retry_after_s=1.0) from None
        except SharedWaitExpired:
            self.refused["queue_timeout"] += 1
            limits = self.keys[lease.ticket.key_id].limits
            assert limits is not None
            raise AdmissionRefused(
                "queue_timeout",
                f"Your request waited {limits.queue_timeout_s:g}s in the queue (the key's "
                "queue_timeout_s) and the limits shared with the relay's other processes "
                "stayed reached.",
                retry_after_s=1.0,
            ) from None

    def refuse_waiting(self, message: str) -> None:
        """Admit no one any more (the relay is shutting down): every queued request is woken
        and, like every later one, refused with reason ``shutting_down`` and ``message``.
        They leave the queue uncharged, as a timed-out waiter does; leases already granted
        are untouched."""
        self._refusal = message
        for pool in self.pools.values():
            for flow in pool.queue.flows.values():
                for waiter in flow.queue:
                    waiter.event.set()

    def status(self) -> dict:
        """Queues, in-flight slots and reservations per guard: for the admin endpoint."""
        now = trio.current_time()
        pools = {}
        for name, pool in self.pools.items():
            waiting = [w for flow in pool.queue.flows.values() for w in flow.queue]
            pools[name] = {
                **pool.guard.status(now),
                "queue_depth": len(waiting),
                "oldest_wait_s": round(max((now - w.enqueued_at for w in waiting), default=0), 3),
                "virtual_counter": round(pool.counter, 1),
            }
        keys = {}
        for key_id, guard in self.keys.items():
            keys[key_id] = {**guard.status(now), "queued": self._waiting.get(key_id, 0)}
            estimate = self.estimates.get(key_id)
            if estimate is not None and estimate.count:
                keys[key_id]["expected_output"] = round(estimate.mean, 1)
            for pool in self.pools.values():
                flow = pool.queue.flows.get(key_id)
                if flow is not None:
                    keys[key_id]["virtual_counter"] = round(flow.counter, 1)
        in_flight = self.global_guard.in_flight + sum(
            pool.guard.in_flight for pool in self.pools.values()
        ) + sum(guard.in_flight for guard in self.keys.values())
        reserved = self.global_guard.reserved + sum(
            pool.guard.reserved for pool in self.pools.values()
        ) + sum(guard.reserved for guard in self.keys.values())
        return {
            "global": self.global_guard.status(now),
            "pools": pools,
            "keys": keys,
            "total": in_flight,
            "reserved_tokens": reserved,
            "queued": sum(len(pool.queue) for pool in self.pools.values()),
            "granted": self.granted,
            "refused": dict(self.refused),
        }

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting in each pool's queue of this process."""
        return {name: len(pool.queue) for name, pool in self.pools.items()}

    def key_rate_state(self, ticket: Ticket) -> dict[str, float]:
        """The key's limits and what remains of them, for ``x-ratelimit-*`` headers.

        The limits are the key's current ones: the ticket's if they are newer than the guard's
        (they are then applied, as :meth:`set_key_limits` does), else the guard's. A key with
        no guard (idle, or never seen) is reported as a new guard would be, without making
        one."""
        now = trio.current_time()
        key = self.set_key_limits(ticket.key_id, ticket.limits, ticket.limits_read_at)
        if key is None:
            limits = ticket.limits
            key = Guard(ticket.key_id, tpm=limits.tpm, rpm=limits.rpm, now=now)
            key.limits = limits
        assert key.limits is not None
        state: dict[str, float] = {}
        if key.rpm is not None:
            state["limit-requests"] = key.limits.rpm or 0
            state["remaining-requests"] = max(0, math.floor(key.rpm.level(now)))
            state["reset-requests"] = key.rpm.reset_time(now)
        if key.tpm is not None:
            state["limit-tokens"] = key.limits.tpm or 0
            state["remaining-tokens"] = max(0, math.floor(key.tokens_remaining(now)))
            state["reset-tokens"] = key.tpm.reset_time(now, held=key.reserved)
        return state

    def set_key_limits(self, key_id: str, limits: KeyLimits, read_at: float) -> Guard | None:
        """Apply a key's ``limits``, read at ``read_at``, to its guard if it has one and they
        are no older than the limits it enforces; the guard (None if the key has none).

        The guard is changed in place (:meth:`Guard.reconfigure`): requests in flight and
        queued stay counted, so a change lets no request past the old or the new cap and
        refills no bucket. The key's fair-queue counter is kept; a new weight applies to what
        the key is served from now on. A raised cap lets queued requests go at once."""
        guard = self.keys.get(key_id)
        if guard is None or read_at < guard.limits_read_at:
            return guard
        guard.limits_read_at = read_at
        if limits != guard.limits:
            now = trio.current_time()
            guard.reconfigure(
                max_concurrency=self._scaled(limits.max_concurrency),
                tpm=self._scaled(limits.tpm),
                rpm=self._scaled(limits.rpm),
                now=now,
            )
            guard.limits = limits
            self._dispatch()
        return guard

    async def register_local_leases(self) -> bool:
        """Redis is back: count in it every request this process admitted alone while it was
        lost and that still runs, so that the other processes see them (their release then
        goes to Redis as any other's)."""
        assert self.shared is not None
        while self._local_leases:  # until none is left (more may be admitted meanwhile)
            lease = next(iter(self._local_leases))
            shared = await self.shared.register(_shared_subjects(lease), lease.expected)
            if shared is None:
                return False  # Redis is gone again
            self._local_leases.discard(lease)
            if lease.held:
                lease.shared, lease.local_only = shared, False
            else:  # it ended meanwhile
                self.shared.release(shared, 0)
        return True

    def share_limits(self, share: float | None, accounts: Sequence[tuple[Guard, Any]] = ()) -> None:
        """Enforce ``share`` of every limit in this process alone (Redis is lost under
        ``redis_failure = "local"``: 1 / the live processes last seen), or, with None, the
        whole limits again with their shared part in Redis. ``accounts`` are the accounts'
        (guard, config) pairs. A divided cap is at least 1 (so a cap of 1 may admit one
        request per process while Redis is lost). Requests in flight keep their slots
        (:meth:`Guard.reconfigure`)."""
        self._share = share
        now = trio.current_time()
        g = self._config.global_
        layers: list[tuple[Guard, Any]] = [(self.global_guard, g)]
        for name, pool in self.pools.items():
            config = self._config.pools.get(name)
            if config is not None:
                layers.append((pool.guard, config))
        for guard, config in layers:
            guard.reconfigure(
                max_concurrency=self._scaled(config.max_concurrency),
                tpm=self._scaled(config.tpm),
                tps=self._scaled(config.tps),
                rpm=None,
                now=now,
            )
            if self.shared is not None and share is None:
                guard.limiter.total_tokens = math.inf  # the cap is Redis's (see __init__)
        for guard in self.keys.values():
            limits = guard.limits
            assert limits is not None
            guard.reconfigure(
                max_concurrency=self._scaled(limits.max_concurrency),
                tpm=self._scaled(limits.tpm),
                rpm=self._scaled(limits.rpm),
                now=now,
            )
        for guard, config in accounts:
            guard.reconfigure(
                max_concurrency=self._scaled(config.max_concurrency),
                tpm=self._scaled(config.tpm),
                rpm=self._scaled(config.rpm),
                now=now,
            )
        self._dispatch()

    def _scaled(self, limit: int | None) -> int | None:
        """``limit`` under the current share (see :meth:`share_limits`)."""
        if limit is None or self._share is None:
            return limit
        return max(1, math.floor(limit * self._share))

    async def run(self) -> None:
        """Wake the dispatcher when a token bucket has refilled enough for a queued request.

        Releases and arrivals dispatch synchronously; only the passage of time needs a task.
        """
        while True:
            with trio.move_on_at(self._wake_at):
                await self._rearm.wait()
                self._rearm = trio.Event()
                continue
            self._wake_at = math.inf
            self._dispatch()

    # -- internals ------------------------------------------------------------------------

    def _pool(self, name: str) -> _Pool:
        pool = self.pools.get(name)
        if pool is None:
            pool = self.pools[name] = _Pool(name, Guard(name), 1.0, None)
        return pool

    def _key_guard(self, ticket: Ticket, now: float) -> Guard:
        """The key's one guard: made on the key's first request (or after it was forgotten),
        changed in place when the ticket's limits are newer (:meth:`set_key_limits`)."""
        guard = self.set_key_limits(ticket.key_id, ticket.limits, ticket.limits_read_at)
        if guard is None:
            limits = ticket.limits
            guard = self.keys[ticket.key_id] = Guard(
                ticket.key_id,
                max_concurrency=self._scaled(limits.max_concurrency),
                tpm=self._scaled(limits.tpm),
                rpm=self._scaled(limits.rpm),
                now=now,
            )
            guard.limits, guard.limits_read_at = limits, ticket.limits_read_at
        return guard

    def _forget_idle(self, now: float) -> None:
        """Forget the per-key state of keys gone idle, a few per arrival, so that memory is
        bounded by the keys active in about the last :attr:`FORGIVE_AFTER_S` seconds, not by
        every key ever seen.

        A key is forgotten when it has nothing in flight and nothing queued and its buckets
        have refilled to full (:meth:`Guard.idle`): a key that comes back then gets a new
        guard that behaves exactly as the old one would have, so no limit is loosened. Its
        fair-queue flows are dropped with it if they are at or below their queue's level (a
        new flow is lifted there too: nothing changes, :meth:`.FairQueue.forget`), or, once the
        key has been unused for :attr:`FORGIVE_AFTER_S`, whatever their counters: what the key
        was served beyond the level (its last requests' worth at most, since the queue serves
        the lowest counter first) is forgiven, as deficit round robin resets an emptied flow.
        Keys are examined from the head of :attr:`keys` (the one least recently arrived or
        examined); one that cannot be forgotten yet goes to the back."""
        for _ in range(min(self.SWEEP_PER_ARRIVAL, len(self.keys))):
            key_id = next(iter(self.keys))
            guard = self.keys.pop(key_id)
            if key_id not in self._waiting and guard.idle(now):
                forgive = now - guard.last_used >= self.FORGIVE_AFTER_S
                fair = [pool.queue for pool in self.pools.values() if not pool.fifo]
                if forgive or all(queue.forgettable(key_id) for queue in fair):
                    for queue in fair:
                        queue.forget(key_id, forgive=True)
                    continue
            self.keys[key_id] = guard

    def _check_queue_room(self, ticket: Ticket, pool: _Pool, key: Guard, now: float) -> None:
        limits = key.limits
        assert limits is not None
        if limits.max_queue is not None and self._waiting.get(ticket.key_id, 0) >= max(
            limits.max_queue, 0
        ):
            if limits.max_queue == 0:
                limit = key.limit_reached(self._reservation(ticket), now)
                if limit is None:
                    return  # no queueing allowed, but nothing to wait for either
                code = LIMIT_CODES.get(limit, "rate_limit_exceeded")
                reason = (
                    "concurrency_limited" if code == "concurrency_limit_exceeded"
                    else "rate_limited"
                )
                self.refused[reason] += 1
                raise AdmissionRefused(
                    reason,
                    f"Your key is at its {key.describe(limit)}, and it may not queue "
                    "(its max_queue is 0).",
                    retry_after_s=self._retry_after(ticket, pool, key),
                    code=code,
                )
            self.refused["queue_full"] += 1
            raise AdmissionRefused(
                "queue_full",
                f"Your key already has {limits.max_queue} requests waiting (its max_queue of "
                f"{limits.max_queue}).",
                retry_after_s=self._retry_after(ticket, pool, key),
            )
        if pool.max_queue is not None and len(pool.queue) >= pool.max_queue:
            self.refused["queue_full"] += 1
            raise AdmissionRefused(
                "queue_full",
                f"The '{pool.name}' pool's queue is full ({len(pool.queue)} requests waiting, "
                f"its max_queue of {pool.max_queue}).",
                retry_after_s=self._retry_after(ticket, pool, key),
            )

    def _holding_back(
        self, ticket: Ticket, pool: _Pool, key: Guard, now: float
    ) -> tuple[str, str] | None:
        """The limit that keeps ``ticket`` waiting, as (error code, words naming it and its
        value), looking at the key, its pool, the relay and the accounts in turn; None when
        none does (the request only waits for its fair turn)."""
        tokens = self._reservation(ticket)
        layers = ((key, "your key"), (pool.guard, f"the '{pool.name}' pool"),
                  (self.global_guard, "the relay"))
        for guard, whose in layers:
            limit = guard.limit_reached(tokens, now)
            if limit is not None:
                return LIMIT_CODES.get(limit, "rate_limit_exceeded"), (
                    f"{whose}'s {guard.describe(limit)}"
                )
        reached = {guard.limit_reached(tokens, now) for guard in ticket.accounts}
        if ticket.accounts and None not in reached:
            if reached == {"max_concurrency"}:
                return "concurrency_limit_exceeded", (
                    "the max_concurrency of every account that serves the model"
                )
            return "rate_limit_exceeded", (
                "the limits of every account that serves the model (busy, over its rates, "
                "resting or out of service)"
            )
        return None

    def _retry_after(self, ticket: Ticket, pool: _Pool, key: Guard) -> float:
        """A useful Retry-After: when the limiting bucket will have room, at least 1 s."""
        now = trio.current_time()
        tokens = self._reservation(ticket)
        waits = [guard.wait_time(tokens, now) for guard in (key, pool.guard, self.global_guard)]
        finite = [wait for wait in waits if wait != math.inf]
        return float(max(1, math.ceil(max(finite, default=1.0))))

    def _lift_pool(self, pool: _Pool) -> None:
        """A pool that was idle re-enters the global share level with the busy ones."""
        if len(pool.queue) == 1:
            busy = [p.counter for p in self.pools.values() if p is not pool and len(p.queue)]
            if busy and pool.counter < min(busy):
                pool.counter = min(busy)

    def _dispatch(self) -> None:
        """Grant every queued request that may go now, in fair order; arm the refill timer."""
        now = trio.current_time()
        soonest = math.inf
        while True:
            pools = sorted(
                (pool for pool in self.pools.values() if len(pool.queue)),
                key=lambda pool: (pool.counter, pool.name),
            )
            granted = False
            for pool in pools:
                global_wait = self.global_guard.wait_time(0, now)
                if global_wait:
                    soonest = min(soonest, global_wait)
                    return self._arm(now, soonest)
                blocked: list[float] = []

                def decide(
                    flow, waiter: _Waiter, pool: _Pool = pool, blocked: list[float] = blocked
                ) -> bool | None:
                    ticket = waiter.ticket
                    tokens = self._reservation(ticket)
                    wait = self.global_guard.wait_time(tokens, now)
                    if wait:
                        blocked.append(wait)
                        return None
                    wait = pool.guard.wait_time(tokens, now)
                    if wait:
                        blocked.append(wait)
                        return None
                    wait = self.keys[ticket.key_id].wait_time(tokens, now)
                    if wait:
                        blocked.append(wait)
                        return False
                    if ticket.accounts and self._pick_account(ticket, tokens, now) is None:
                        # Every account for it is busy (a release will wake us) or resting
                        # (the timer will).
                        blocked.append(min(g.wait_time(tokens, now) for g in ticket.accounts))
                        return False
                    return True

                found = pool.queue.pop_first(decide)
                soonest = min([soonest, *blocked])
                if found is not None:
                    self._grant(pool, found[1], now)
                    granted = True
                    break  # counters changed: recompute the order
            if not granted:
                return self._arm(now, soonest)

    def _pick_account(self, ticket: Ticket, tokens: int, now: float) -> Guard | None:
        """The least-loaded account that can take the request (reserving ``tokens``), among
        those of the best priority that have room (``ticket.accounts`` is sorted by priority,
        best first)."""
        preferred = ticket.preferred
        if preferred is not None and preferred.wait_time(tokens, now) == 0:
            return preferred
        best: Guard | None = None
        for guard in ticket.accounts:
            if best is not None and guard.priority != best.priority:
                break
            if guard.wait_time(tokens, now) == 0:
                if best is None or _load(guard) < _load(best):
                    best = guard
        return best

    def _split(self, ticket: Ticket) -> tuple[int, int]:
        """(tokens charged at grant, expected output held meanwhile) for a request."""
        if ticket.input_tokens is None:
            return ticket.estimated_tokens, 0
        default = max(0, ticket.estimated_tokens - ticket.input_tokens)
        estimate = self.estimates.get(ticket.key_id)
        if estimate is None:
            return ticket.input_tokens, default
        return ticket.input_tokens, estimate.expected(default, ticket.max_output_tokens)

    def _reservation(self, ticket: Ticket) -> int:
        """What must fit for the request to be admitted: its input plus its expected output."""
        charged, held = self._split(ticket)
        return charged + held

    def _grant(self, pool: _Pool, waiter: _Waiter, now: float) -> None:
        ticket = waiter.ticket
        lease = Lease(ticket, queued_s=now - waiter.enqueued_at, admission=self)
        charged, expected = self._split(ticket)
        guards = [self.global_guard, pool.guard, self.keys[ticket.key_id]]
        if ticket.accounts:
            lease.account = self._pick_account(ticket, charged + expected, now)
            guards.append(lease.account)
        for guard in guards:
            guard.take(lease, charged, expected, now)
            lease.held.append(guard)
        lease.charged, lease.expected = charged, expected
        self._count(pool, ticket, charged)
        waiter.lease = lease
        waiter.event.set()
        self.granted += 1

    def _serve(self, lease: Lease, tokens: int) -> None:
        """``tokens`` more of the answer were produced: charge them now (Lease.produced)."""
        now = trio.current_time()
        released = min(tokens, lease.expected)
        for guard in lease.held:
            guard.charge(tokens, released, now)
        lease.charged += tokens
        lease.expected -= released
        self._count(self.pools[lease.ticket.pool], lease.ticket, tokens)
        if lease.shared is not None:
            assert self.shared is not None
            self.shared.produced(lease.shared, tokens, released)

    def _count(self, pool: _Pool, ticket: Ticket, tokens: int) -> None:
        """Add ``tokens`` served to the key's virtual counter and its pool's."""
        pool.queue.charge(pool.flow_of(ticket), tokens)
        pool.counter += tokens / pool.weight

    def _release(self, lease: Lease) -> int:
        """Settle and free everything the lease holds here; the tokens it was charged in all
        (what the shared guards are corrected to)."""
        now = trio.current_time()
        ticket = lease.ticket
        reserved = lease.charged + lease.expected
        used = reserved if lease.used_tokens is None else lease.used_tokens
        correction = used - lease.charged
        for guard in lease.held:
            guard.settle(lease, correction, lease.expected, now)
            guard.last_used = now
        lease.held.clear()
        lease.charged, lease.expected = used, 0
        self._released.set()
        self._released = trio.Event()
        if correction:
            self._count(self.pools[ticket.pool], ticket, correction)
        if lease.output_tokens is not None and ticket.input_tokens is not None:
            self._estimate(ticket.key_id).learn(lease.output_tokens, ticket.max_output_tokens)
        self._dispatch()
        return used

    def _estimate(self, key_id: str) -> OutputEstimate:
        estimate = self.estimates.pop(key_id, None)
        if estimate is None:
            estimate = OutputEstimate()
            if len(self.estimates) >= self.MAX_ESTIMATES:
                del self.estimates[next(iter(self.estimates))]  # the least recently used
        self.estimates[key_id] = estimate  # (re)inserted last: most recently used
        return estimate

    def _arm(self, now: float, wait: float) -> None:
        if wait == math.inf:
            return
        wake = now + max(wait, 0.001)
        if wake < self._wake_at:
            self._wake_at = wake
            self._rearm.set()


def _shared_subjects(lease: Lease) -> list:
    """The Redis subjects of the layers a lease holds here, in their order: global, pool,
    key, and the account if it has one."""
    layers = ["g", "p:", "k:"] + (["a:"] if lease.account is not None else [])
    return subjects_of(lease.held, layers)


def _load(guard: Guard) -> tuple[float, int]:
    fraction = guard.in_flight / guard.max_concurrency if guard.max_concurrency else 0.0
    return (fraction, guard.in_flight)


def _in_trio() -> bool:
    try:
        trio.current_time()
    except RuntimeError:
        return False
    return True
