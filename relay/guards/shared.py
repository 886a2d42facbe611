"""Guard state shared by every relay process that points at one Redis (``server.redis_url``).

Each process keeps its own :class:`~.admission.Admission` (its queue, its local guards); what
must hold across processes lives in Redis and is changed only by the Lua scripts below, each one
atomic and one round trip (loaded once, called by SHA):

* **Leases owned by a live process.** Every concurrency slot a request holds (global, pool, key,
  account) is a member ``owner|lease`` of the subject's sorted set ``{prefix}l:{subject}``; its
  score is the output still *held* for the request (expected, not yet charged), which the TPM
  check counts as a promise. Each process keeps a heartbeat key ``{prefix}hb:{owner}`` with a TTL
  (``server.redis_lease_ttl_s``, renewed every third of it). An acquire counts only the leases
  whose owner's heartbeat exists and removes the others: a killed process's slots come back
  within one TTL, with no sweeper and no bulk delete; a process removes its own leases by id
  and never anyone else's live ones.
* **Buckets charged as served, in batches.** TPM, TPS and RPM buckets are hashes
  ``{prefix}b:{subject}:{kind}`` (level, time) refilled by Redis's own ``TIME``, with the same
  rules as :class:`~.buckets.TokenBucket` (a request needs its input and expected output to fit
  on top of what is held; debt is kept). Admission takes the input (and one request of RPM) in
  the acquire; the output a stream produces is summed locally and flushed every
  :attr:`SharedGuards.FLUSH_S` (one call for every lease of the process), so a stream does not
  cost a round trip per event. A bucket key expires once it would have refilled to full (a
  missing bucket is a full one).
* **Freed capacity wakes the other processes**: a release publishes on ``{prefix}freed``
  while anyone waits (every refused acquire marks ``{prefix}wanted`` for 2 s, and a waiter
  retries at least every :attr:`RETRY_FLOOR_S`; an uncontended release publishes nothing); a
  process whose request waits for shared capacity retries when that arrives, or when the
  bucket it waits for has refilled (the acquire says when), or after :attr:`RETRY_FLOOR_S`.

The limits themselves travel with every call (each process's configuration and key limits), so
a limit change needs nothing in Redis.

Guarantees:

* A request holds shared capacity only between a successful :meth:`SharedGuards.acquire` and
  its :meth:`SharedGuards.release`. A release costs the request no round trip: it goes with
  the process's next acquire (applied first, in the same script, so the process's own finished
  requests never count against the one it admits) or its next flush, so it frees the slot for
  the other processes within :attr:`SharedGuards.FLUSH_S`. A release that fails is kept and
  retried by the flush task until Redis takes it (nothing is lost while the process lives; if
  it dies, its leases expire with its heartbeat). A release is idempotent: subjects that no
  longer hold the lease are left untouched.
* No call waits on Redis longer than ``call_timeout_s`` (250 ms). When a call fails, the
  process goes *degraded*: with ``redis_failure = "local"`` requests are admitted by the
  process's own guards alone (logged once, and once when Redis is back), with ``"closed"``
  they are refused (:class:`SharedUnavailable`); the heartbeat task probes Redis every
  second and ends the degraded state by itself.
* Without ``redis_url`` none of this exists: admission is purely in-process, as before.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import coredis
import coredis.retry
import trio

from . import shared_lua as scripts
from .resp import RespConnection, supported

log = logging.getLogger("relay")

class SharedUnavailable(Exception):
    """Redis cannot be reached and ``redis_failure = "closed"``: the request is refused (503)."""


class SharedWaitExpired(Exception):
    """The request's deadline passed while it waited for shared capacity."""


@dataclass(frozen=True)
class Subject:
    """One layer's shared limits for one subject: ``name`` is unique across layers
    (``g``, ``p:POOL``, ``k:KEY_ID``, ``a:ACCOUNT``); buckets are (rate per second, capacity)."""

    name: str
    cap: int | None = None
    tpm: tuple[float, float] | None = None
    tps: tuple[float, float] | None = None
    rpm: tuple[float, float] | None = None

    def spec(self) -> dict:
        spec: dict = {"name": self.name}
        for attr in ("cap", "tpm", "tps", "rpm"):
            value = getattr(self, attr)
            if value is not None:
                spec[attr] = value
        return spec

    def buckets(self) -> dict:
        spec: dict = {"name": self.name}
        if self.tpm is not None:
            spec["tpm"] = self.tpm
        if self.tps is not None:
            spec["tps"] = self.tps
        return spec


@dataclass(frozen=True)
class Fairness:
    """Where a request stands in its pool's shared fair order: its flow (the key, or ``*`` in
    a first-come-first-served pool) and the flow's weight."""

    pool: str
    flow: str
    weight: float


@dataclass(eq=False)
class SharedLease:
    """What one request holds in Redis, as this process knows it."""

    id: str
    subjects: Sequence[Subject]
    charged: int  # tokens charged so far (flushed or pending)
    held: int  # expected output still held for it
    fair: Fairness | None = None
    left_wait: bool = False  # its acquire took its flow off the waiting flows
    pending_tokens: int = 0  # charged locally, not yet flushed
    pending_released: int = 0


class _Contender:
    def __init__(self) -> None:
        self.lock = trio.Lock()  # FIFO: the flow's requests contend in arrival order
        self.users = 0


@dataclass
class _Totals:
    acquired: int = 0
    waits: int = 0
    deferred: int = 0  # attempts that left the capacity to a flow with a smaller counter
    released: int = 0
    failures: int = 0
    local_admissions: int = 0  # admitted by local guards alone while degraded
    refused_closed: int = 0


class SharedGuards:
    """This process's side of the shared guard state (see the module docstring)."""

    #: How often a process flushes the output its streams produced to the shared buckets.
    FLUSH_S = 0.05
    #: A request waiting for shared capacity retries at least this often (besides the
    #: notifications of freed capacity and the refill time the acquire names).
    RETRY_FLOOR_S = 0.25
    #: While degraded, Redis is probed this often.
    PROBE_S = 1.0
    #: Once Redis is back, the divided limits stay this long: every live process finds it
    #: within PROBE_S and registers what it admitted alone (see _recover).
    RECOVERY_GRACE_S = 2.5
    #: Settlements kept for Redis while it is unreachable; beyond this the oldest are dropped
    #: (counted in ``dropped``): their leases are reclaimed with this process's heartbeat
    #: anyway, only their bucket charges are lost.
    MAX_UNSENT = 10_000

    def __init__(
        self,
        url: str,
        *,
        failure_policy: str = "local",
        lease_ttl_s: float = 10.0,
        call_timeout_s: float = 0.25,
        prefix: str = "relay:",
    ) -> None:
        self.url = url
        self.failure_policy = failure_policy
        self.lease_ttl_s = lease_ttl_s
        self.call_timeout_s = call_timeout_s
        self.prefix = prefix
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.degraded = False
        self.degraded_reason = ""
        self.live_processes = 1  # as last seen in Redis
        self.totals = _Totals()
        #: Called with True when Redis is lost and False when it is back (the runtime makes
        #: the local guards enforce their share of the limits meanwhile).
        self.on_degraded: Callable[[bool], None] | None = None
        #: Awaited when Redis answers again, before this process uses it (see _recover).
        self.on_recovering: Callable[[], Awaitable[bool]] | None = None
        #: This process's queue depth per pool, published with each heartbeat.
        self.queue_depths: Callable[[], dict[str, int]] | None = None
        self._nursery: trio.Nursery | None = None
        self._client: coredis.Redis | None = None
        self._scripts: dict[str, object] = {}
        # The hot path's own connection (acquire, settle): see .resp; None: coredis's.
        self._fast: RespConnection | None = None
        self._fast_sha: dict[str, str] = {}
        self._freed = trio.Event()
        self._backlog: dict[tuple[str, str], int] = {}  # (pool, flow) → requests waiting here
        # (pool, flow) → the one request of the flow that contends for shared capacity at a
        # time on this process (the others wait behind it, in order).
        self._contenders: dict[tuple[str, str], _Contender] = {}
        self._pending: dict[str, SharedLease] = {}  # leases with output not yet flushed
        self._unsent: list[dict] = []  # settlements that did not reach Redis yet, in order
        self.dropped = 0  # settlements dropped over MAX_UNSENT during a long outage
        # Settlements reach Redis in the order they were made (a lease's last charges before
        # its release), one call at a time.
        self._settling = trio.Lock()

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the client open and run the heartbeat, the freed-capacity listener and the
        flush of batched charges, for as long as the relay serves. Started before the relay
        takes requests; a Redis that is down at start leaves the process degraded (it does
        not stop it from starting)."""
        client = coredis.Redis.from_url(
            self.url,
            decode_responses=True,
            stream_timeout=self.call_timeout_s,
            connect_timeout=self.call_timeout_s,
            retry_policy=coredis.retry.NoRetryPolicy(),
        )
        async with client:
            self._client = client
            self._scripts = {
                "acquire": client.register_script(scripts.LUA_ACQUIRE),
                "settle": client.register_script(scripts.LUA_SETTLE),
                "credit_hold": client.register_script(scripts.LUA_CREDIT_HOLD),
                "status": client.register_script(scripts.LUA_STATUS),
            }
            if supported(self.url):
                self._fast = RespConnection(self.url)
                self._fast_sha = {
                    "acquire": self._fast.script(scripts.LUA_ACQUIRE),
                    "settle": self._fast.script(scripts.LUA_SETTLE),
                }
            await self._heartbeat_once()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._heartbeat)
                    nursery.start_soon(self._listen)
                    nursery.start_soon(self._flush_forever)
                    task_status.started()
            finally:
                if self._fast is not None:
                    await self._fast.aclose()

    async def aclose(self) -> None:
        """At shutdown, after the last request: flush what is unsent and end this process's
        heartbeat (its leases stop counting at once). Shielded, bounded by the call timeout."""
        with trio.CancelScope(shield=True):
            await self._flush_once()
            if self._client is not None and not self.degraded:
                client = self._client
                await self._call(lambda: client.delete([self.prefix + "hb:" + self.owner]))

    # -- the request's side ---------------------------------------------------------------

    async def acquire(
        self,
        subjects: Sequence[Subject],
        charged: int,
        held: int,
        deadline: float,
        fair: Fairness | None = None,
    ) -> SharedLease | None:
        """Take a lease on every subject, waiting (until the trio time ``deadline``) while any
        of them is full. Returns the lease, or None when Redis is unreachable under
        ``redis_failure = "local"`` (the local guards alone then admit the request). Raises
        :class:`SharedWaitExpired` when the deadline passed first, :class:`SharedUnavailable`
        when Redis is unreachable under ``"closed"``.

        With ``fair`` (the request's pool, flow and weight), the pool's capacity goes to the
        flow with the smallest shared virtual counter among those waiting in any process (see
        the acquire script); the lease's charges count on that counter.

        Cancelled while waiting, nothing is held; an acquire whose outcome is unknown (the call
        timed out) is released, so a lease never outlives its request."""
        lease = SharedLease(uuid.uuid4().hex[:16], tuple(subjects), charged, held, fair)
        if fair is None:
            return await self._acquire(lease, deadline, None, None)
        flow = (fair.pool, fair.flow)
        lock = self._contenders.get(flow)
        if lock is None:
            lock = self._contenders[flow] = _Contender()
        lock.users += 1
        try:
            async with lock.lock:
                return await self._acquire(lease, deadline, fair, lock)
        finally:
            lock.users -= 1
            if not lock.users:
                del self._contenders[flow]
                if not lease.left_wait:
                    # The flow's last contender here left without taking capacity: others
                    # need not defer to it any more.
                    self._unsent.append({"unwait": fair.pool, "flow": fair.flow})

    async def _acquire(
        self,
        lease: SharedLease,
        deadline: float,
        fair: Fairness | None,
        contender: _Contender | None,
    ) -> SharedLease | None:
        spec: dict = {
            "subjects": [s.spec() for s in lease.subjects],
            "charged": lease.charged,
            "held": lease.held,
        }
        while True:
            if self.degraded:
                return self._unavailable()
            if fair is not None and contender is not None:
                spec["fair"] = {
                    "pool": fair.pool, "flow": fair.flow, "weight": fair.weight,
                    # No other request of the flow waits to contend here: on success the
                    # flow leaves the waiting flows.
                    "last": contender.lock.statistics().tasks_waiting == 0,
                    # The flow's only request here: it comes back from idle (lifted).
                    "fresh": self._backlog.get((fair.pool, fair.flow), 0) <= 1,
                }
            payload = json.dumps(spec)
            freed = self._freed
            with trio.CancelScope(shield=True):
                result = await self._acquire_call(lease.id, payload)
            if result is None:  # failed, maybe after Redis took it: release by id
                self._unsent.append(self._settle_item(lease, done=True))
                return self._unavailable()
            if result[0] == 1:
                self.totals.acquired += 1
                if fair is not None and spec["fair"]["last"]:
                    lease.left_wait = True
                return lease
            if result[1] == 0:
                self.totals.deferred += 1
            self.totals.waits += 1
            await self._wait_for_room(result[2], freed, deadline)

    def join_backlog(self, fair: Fairness) -> None:
        """A request of the flow waits on this process (in its local queue or for shared
        capacity). A flow's first such request is one back from idle."""
        flow = (fair.pool, fair.flow)
        self._backlog[flow] = self._backlog.get(flow, 0) + 1

    def leave_backlog(self, fair: Fairness) -> None:
        """That request got its capacity or left."""
        flow = (fair.pool, fair.flow)
        left = self._backlog[flow] - 1
        if left:
            self._backlog[flow] = left
        else:
            del self._backlog[flow]

    async def _wait_for_room(self, wait_ms: int, freed: trio.Event, deadline: float) -> None:
        """Sleep until capacity is freed anywhere, the bucket refill the acquire named, or the
        retry floor; :class:`SharedWaitExpired` at ``deadline``."""
        wait = self.RETRY_FLOOR_S if wait_ms < 0 else min(wait_ms / 1000, self.RETRY_FLOOR_S)
        wake = min(deadline, trio.current_time() + max(wait, 0.001))
        with trio.move_on_at(wake):
            await freed.wait()
        if trio.current_time() >= deadline:
            raise SharedWaitExpired()

    def produced(self, lease: SharedLease, tokens: int, released: int) -> None:
        """``tokens`` more were served (``released`` of them from what was held): charged to
        the shared buckets with the next flush (cheap: no I/O)."""
        lease.charged += tokens
        lease.held -= released
        lease.pending_tokens += tokens
        lease.pending_released += released
        self._pending[lease.id] = lease

    def release(self, lease: SharedLease, used_tokens: int) -> None:
        """Give the lease back: charges corrected to ``used_tokens``, whatever is still held
        released, every subject's slot freed. No I/O here: the release reaches Redis with this
        process's next call that settles, its next acquire (which applies it before it takes
        its own lease, in the same script) or its next flush, whichever comes first, so within
        :attr:`FLUSH_S` (the lease is this process's own: nobody else removes it, and it is
        never lost while the process lives; if it dies, the lease expires with its
        heartbeat). This process's requests waiting for shared capacity retry at once (their
        acquire carries the release)."""
        self._pending.pop(lease.id, None)
        lease.pending_tokens += used_tokens - lease.charged
        lease.charged = used_tokens
        self._unsent.append(self._settle_item(lease, done=True))
        self.totals.released += 1
        self._freed.set()
        self._freed = trio.Event()

    # -- credits --------------------------------------------------------------------------

    async def hold_credits(
        self, key_id: str, request_id: str, granted: int, seed_used: int, estimate: int
    ) -> tuple[bool, int, int] | None:
        """Hold ``estimate`` nanocredits of the key for the request if its shared balance
        (granted − used − held by every live process) covers it: (held?, used, held before).
        None when Redis is unreachable under ``"local"`` (the process's own ledger decides);
        raises :class:`SharedUnavailable` under ``"closed"``. The hold ends with
        :meth:`charge_credits` for the same request (or a process's death)."""
        if self.degraded:
            return self._unavailable()
        args = [self.prefix, self.owner, request_id, key_id, str(granted), str(seed_used),
                str(estimate)]
        with trio.CancelScope(shield=True):
            result = await self._call(lambda: self._scripts["credit_hold"](args=args))
        if result is None:
            self.charge_credits(key_id, request_id, 0, seed_used)  # maybe held: end it
            return self._unavailable()
        return result[0] == 1, int(result[1]), int(result[2])

    def charge_credits(self, key_id: str, request_id: str, cost: int, seed_used: int) -> None:
        """Add ``cost`` to the key's shared credits used and end the request's hold, with the
        next flush (ordered after everything this process settled before; no I/O here)."""
        self._unsent.append(
            {"credit": key_id, "request": request_id, "cost": cost, "seed": str(seed_used)}
        )

    # -- sessions and account health -------------------------------------------------------

    async def session_account(self, pool: str, session: str) -> str | None:
        """The account a sticky session is bound to by any process (None: unbound, or Redis
        unreachable: then this process's own binding decides)."""
        if self.degraded or self._client is None:
            return None
        client = self._client
        return await self._call(lambda: client.get(f"{self.prefix}s:{pool}\x00{session}"))

    def bind_session(self, pool: str, session: str, account: str, ttl_s: float) -> None:
        """Bind the session for every process, with the next flush (no I/O here)."""
        self._unsent.append(
            {"session": f"{pool}\x00{session}", "account": account,
             "ttl_ms": max(1, int(ttl_s * 1000))}
        )

    def share_health(self, account: str, *, until: float, disabled: bool) -> None:
        """An account rests until the wall-clock time ``until`` or is out of service
        (``disabled``), for every process, with the next flush; the longer rest wins."""
        self._unsent.append({"health": account, "until": until, "disabled": disabled})

    def reset_health(self, account: str) -> None:
        """An operator put the account back in service: for every process."""
        self._unsent.append({"health": account, "reset": True})

    async def account_health(self) -> dict[str, dict] | None:
        """Every account's shared health: {name: {"until": wall-clock s, "disabled": bool}}
        (None when Redis is unreachable). Read after this process's own shared health."""
        if self.degraded or self._client is None:
            return None
        # What this process shared reaches Redis before it reads back, so that an entry found
        # missing was removed (an operator's enable elsewhere), not yet to be written.
        await self._send([])
        if any("health" in item for item in self._unsent):
            return None
        client = self._client
        found = await self._call(lambda: client.hgetall(self.prefix + "health"))
        if found is None:
            return None
        return {name: json.loads(value) for name, value in found.items()}

    # -- other shared state ------------------------------------------------------------------

    async def command(self, make: Callable[[coredis.Redis], Awaitable]) -> object | None:
        """One call, made by ``make`` on this process's client, for shared state other than
        the guards' (the Responses store, ``relay/ledger/responses_store.py``): within the call
        timeout; None when Redis is unreachable (a degraded process does not try: its
        heartbeat probe ends the degraded state)."""
        if self.degraded or self._client is None:
            return None
        client = self._client
        return await self._call(lambda: make(client))

    # -- locks (one process at a time does a thing: an account's token refresh) ----------

    async def try_lock(self, name: str, ttl_s: float) -> str | bool | None:
        """Take the lock ``name`` for at most ``ttl_s``: its token if this process holds it
        now, False if another process does, None if Redis cannot say (unreachable)."""
        if self.degraded or self._client is None:
            return None
        client, token = self._client, uuid.uuid4().hex
        taken = await self._call(
            lambda: client.set(
                f"{self.prefix}lock:{name}", token,
                condition=coredis.PureToken.NX, px=max(1, int(ttl_s * 1000)),
            )
        )
        if taken is None and self.degraded:
            return None
        return token if taken else False

    async def unlock(self, name: str, token: str) -> None:
        """Give the lock back, if this process still holds it (its TTL may have run out)."""
        if self._client is None:
            return
        client = self._client
        await self._call(
            lambda: client.eval(
                "if redis.call('get', KEYS[1]) == ARGV[1] then "
                "return redis.call('del', KEYS[1]) end return 0",
                keys=[f"{self.prefix}lock:{name}"], args=[token],
            )
        )

    # -- status ---------------------------------------------------------------------------

    async def status(self, subjects: Sequence[str]) -> dict:
        """The shared view: live processes and live leases per subject (admin API)."""
        if not self.degraded:
            await self._send([])  # this process's releases first: its view is the current one
        state: dict = {
            "url": redacted(self.url),
            "owner": self.owner,
            "failure_policy": self.failure_policy,
            "degraded": self.degraded,
            "totals": dict(vars(self.totals)),
            "unsent_settlements": len(self._unsent),
            "dropped_settlements": self.dropped,
            "waiting_flows": len(self._backlog),  # flows with requests waiting here
        }
        if self.degraded:
            state["degraded_reason"] = self.degraded_reason
            return state
        result = await self._call(
            lambda: self._scripts["status"](
                args=[self.prefix, self.owner, json.dumps(list(subjects))]
            )
        )
        if result is not None:
            counts, procs = result
            state["processes"] = sorted(procs)
            state["leases"] = dict(zip(subjects, counts, strict=True))
            client = self._client
            assert client is not None
            queued = await self._call(lambda: client.hgetall(self.prefix + "queued"))
            if queued is not None:
                # As of each process's last heartbeat (every third of the lease TTL).
                state["queued_per_process"] = {
                    owner: json.loads(depths) for owner, depths in sorted(queued.items())
                    if owner in procs
                }
        return state

    # -- internals ------------------------------------------------------------------------

    def _unavailable(self) -> None:
        if self.failure_policy == "closed":
            self.totals.refused_closed += 1
            raise SharedUnavailable(
                "The relay cannot reach the Redis that holds its shared limits "
                f"({self.degraded_reason or 'no answer'}); retry shortly."
            )
        self.totals.local_admissions += 1
        return None

    def _settle_item(self, lease: SharedLease, *, done: bool) -> dict:
        item = {
            "lease": lease.id,
            "subjects": [s.buckets() for s in lease.subjects],
            "tokens": lease.pending_tokens,
            "released": lease.pending_released,
            "done": done,
        }
        if lease.fair is not None and item["tokens"]:
            fair = lease.fair
            item["fair"] = {"pool": fair.pool, "flow": fair.flow, "weight": fair.weight}
        lease.pending_tokens = lease.pending_released = 0
        return item

    async def _send(self, items: list[dict]) -> None:
        """Send ``items`` after whatever is still unsent, in one call; keep them all for the
        next flush if Redis does not take them (while degraded, without trying)."""
        async with self._settling:
            batch = self._unsent + items
            self._unsent = []
            if not batch:
                return
            sent = None
            if not self.degraded:
                sent = await self._call(
                    lambda: self._script("settle", [self.prefix, self.owner, json.dumps(batch)])
                )
            if sent is None:
                self._keep(batch)

    async def _acquire_call(self, lease_id: str, payload: str):
        """One acquire call (None if it failed), carrying the settlements still unsent (this
        process's releases since its last call): Redis applies them first, in order, in the
        same script. They wait for a settlement in flight (one call at a time keeps their
        order), within the same call timeout; none unsent, the acquire goes at once."""

        def args(batch: str) -> list[str]:
            return [self.prefix, self.owner, lease_id, payload, batch]

        async def carrying() -> object:
            if not self._unsent:
                return await self._script("acquire", args("[]"))
            async with self._settling:
                batch, self._unsent = self._unsent, []
                try:
                    return await self._script(
                        "acquire", args(json.dumps(batch) if batch else "[]")
                    )
                except BaseException:  # failed or timed out: they go with the next call
                    self._keep(batch)
                    raise

        return await self._call(carrying)

    def _script(self, name: str, args: list[str]) -> Awaitable:
        """Call the script ``name`` (acquire or settle) on the hot path's connection."""
        if self._fast is not None:
            return self._fast.evalsha(self._fast_sha[name], args)
        return self._scripts[name](args=args)

    def _keep(self, batch: list[dict]) -> None:
        """Settlements Redis did not take: first in line for the next call."""
        self._unsent = batch + self._unsent
        excess = len(self._unsent) - self.MAX_UNSENT
        if excess > 0:
            del self._unsent[:excess]
            self.dropped += excess

    async def _flush_once(self) -> None:
        pending, self._pending = self._pending, {}
        await self._send([self._settle_item(lease, done=False) for lease in pending.values()])

    async def _flush_forever(self) -> None:
        while True:
            await trio.sleep(self.FLUSH_S)
            await self._flush_once()

    async def _heartbeat_once(self) -> bool:
        client = self._client
        assert client is not None
        ttl_ms = int(self.lease_ttl_s * 1000)

        async def beat() -> bool:
            await client.set(self.prefix + "hb:" + self.owner, "1", px=ttl_ms)
            await client.zadd(self.prefix + "procs", {self.owner: trio.current_time()})
            if self.queue_depths is not None:
                await client.hset(
                    self.prefix + "queued", {self.owner: json.dumps(self.queue_depths())}
                )
            return True

        ok = await self._call(beat, probe=True)
        return ok is not None

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.PROBE_S if self.degraded else self.lease_ttl_s / 3)
            was_degraded = self.degraded
            if await self._heartbeat_once():
                if was_degraded and self.degraded:
                    await self._recover()
                await self._count_processes()

    async def _recover(self) -> None:
        """Redis answers again. Before this process uses it, the requests it admitted alone
        meanwhile are registered there (:attr:`on_recovering`), so the others count them;
        the divided limits stay for :attr:`RECOVERY_GRACE_S` more, until every live process
        has found Redis and done the same."""
        registered = True if self.on_recovering is None else await self.on_recovering()
        if self.degraded and registered:
            self._back()

    def _back(self) -> None:
        self.degraded = False
        log.warning("Redis at %s is back: limits are shared again", redacted(self.url))
        assert self._nursery is not None
        self._nursery.start_soon(self._restore_after_grace)

    async def _restore_after_grace(self) -> None:
        await trio.sleep(self.RECOVERY_GRACE_S)
        if not self.degraded and self.on_degraded is not None:
            self.on_degraded(False)

    async def register(self, subjects: Sequence[Subject], held: int) -> SharedLease | None:
        """Count a request admitted while Redis was lost as a lease there, whatever the limits
        say (it runs already); None if Redis did not take it."""
        lease = SharedLease(uuid.uuid4().hex[:16], tuple(subjects), 0, held)
        payload = json.dumps({"subjects": [s.spec() for s in lease.subjects], "charged": 0,
                              "held": held, "force": True})
        with trio.CancelScope(shield=True):
            result = await self._call(
                lambda: self._script("acquire", [self.prefix, self.owner, lease.id, payload, "[]"]),
                probe=True,
            )
        return lease if result is not None and result[0] == 1 else None

    async def _count_processes(self) -> None:
        result = await self._call(
            lambda: self._scripts["status"](args=[self.prefix, self.owner, "[]"])
        )
        if result is not None:
            self.live_processes = max(1, len(result[1]))

    async def _listen(self) -> None:
        """Wake this process's waiters whenever any process frees capacity."""
        client = self._client
        assert client is not None
        while True:
            try:
                async with client.pubsub(channels=[self.prefix + "freed"]) as pubsub:
                    async for message in pubsub:
                        if message["type"] == "message":
                            self._freed.set()
                            self._freed = trio.Event()
            except* Exception:
                # The connection failed (the next call says so, once), or closed under the
                # subscription's own clean-up at shutdown (the cancellation goes on).
                pass
            await trio.sleep(self.PROBE_S)  # reconnect after a failure, without spinning

    async def _call(self, make, *, probe: bool = False):
        """One Redis call within the call timeout; None if it failed (the process is then
        degraded until a call succeeds)."""
        reason = ""
        with trio.move_on_after(self.call_timeout_s) as scope:
            try:
                result = await make()
            except Exception as error:  # any failure of the client: Redis is not usable now
                reason = describe(error)
            else:
                if self.degraded and not probe:
                    self._back()
                return result
        if scope.cancelled_caught:
            reason = f"no answer within {self.call_timeout_s * 1000:g} ms"
        self.totals.failures += 1
        if not self.degraded:
            self.degraded = True
            self.degraded_reason = reason
            enforcement = (
                f"each process enforces 1/{self.live_processes} of every limit alone"
                if self.failure_policy == "local"
                else "requests are refused with 503 (redis_failure = \"closed\")"
            )
            log.warning(
                "Redis at %s is unreachable (%s): %s until it is back",
                redacted(self.url), reason, enforcement,
            )
            if self.on_degraded is not None:
                self.on_degraded(True)
        return None


def reach(url: str, timeout_s: float = 2.0) -> str | None:
    """Whether a Redis answers PING at ``url`` within ``timeout_s`` (run outside trio, for
    ``relay check-config``): None if it does, else why not, in a line."""

    async def ping() -> str | None:
        client = coredis.Redis.from_url(
            url, connect_timeout=timeout_s, stream_timeout=timeout_s,
            retry_policy=coredis.retry.NoRetryPolicy(),
        )
        with trio.move_on_after(timeout_s):
            try:
                async with client:
                    await client.ping()
                return None
            except Exception as error:  # any failure of the client: say what it was
                return describe(error)
        return f"no answer within {timeout_s:g} s"

    return trio.run(ping)


def subjects_of(guards: Sequence, layers: Sequence[str]) -> list[Subject]:
    """The shared subjects of a lease's local guards (``layers`` gives each one's prefix)."""
    subjects = []
    for guard, layer in zip(guards, layers, strict=True):
        cap = guard.max_concurrency
        subjects.append(
            Subject(
                name=f"{layer}{guard.name}" if layer != "g" else "g",
                cap=cap if cap is not None and cap != math.inf else None,
                tpm=(guard.tpm.rate, guard.tpm.capacity) if guard.tpm is not None else None,
                tps=(guard.tps.rate, guard.tps.capacity) if guard.tps is not None else None,
                rpm=(guard.rpm.rate, guard.rpm.capacity) if guard.rpm is not None else None,
            )
        )
    return subjects


def describe(error: BaseException) -> str:
    """An exception in a line (the first of a group: trio groups the client's failures)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def redacted(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


