"""One layer's guard for one subject (the relay, a pool, a key or an account): its concurrency
cap and token buckets, changed in place when its limits change; and a key's effective limits.
:mod:`.admission` takes and gives back what requests hold in these; nothing here knows about
HTTP or the queue."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..config import PackageConfig
from .buckets import TokenBucket

if TYPE_CHECKING:
    from .admission import Lease


#: What a bucket's limit counts (the bucket holds one period's worth: its capacity is the limit).
LIMIT_UNITS = {
    "tpm": "tokens per minute", "tps": "tokens per second", "rpm": "requests per minute",
}

#: The error code of a refusal by each kind of limit: a concurrency cap is not a rate limit.
LIMIT_CODES = {
    "max_concurrency": "concurrency_limit_exceeded",
    "tpm": "rate_limit_exceeded",
    "tps": "rate_limit_exceeded",
    "rpm": "rate_limit_exceeded",
}


class Guard:
    """One layer's limits for one subject (the relay, a pool, a key or an account).

    Concurrency is a ``trio.CapacityLimiter``; TPM/RPM/TPS are token buckets. A guard answers how
    long a request must wait (0: it may go now) and takes and gives back what a request holds.
    """

    def __init__(
        self,
        name: str,
        *,
        max_concurrency: int | None = None,
        tpm: int | None = None,
        tps: int | None = None,
        rpm: int | None = None,
        priority: int = 0,
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.priority = priority
        self.limiter = trio.CapacityLimiter(
            max_concurrency if max_concurrency is not None else math.inf
        )
        self.max_concurrency = max_concurrency
        self.tpm = TokenBucket.tokens_per_minute(tpm, now) if tpm else None
        self.tps = TokenBucket.per_second(tps, now) if tps else None
        self.rpm = TokenBucket.per_minute(rpm, now) if rpm else None
        self.reserved = 0  # expected tokens of requests in flight, not yet charged (held)
        # Set by whoever knows the subject's health (the upstream layer, for accounts):
        self.unavailable_until = 0.0  # resting (cool-down) until this trio time
        self.disabled = False  # out of service until re-enabled
        self.limits: KeyLimits | None = None  # for a key's guard: the limits it enforces
        self.limits_read_at = -math.inf  # for a key's guard: when those limits were read
        self.last_used = now  # a request arrived or ended (for forgetting an idle key's state)

    @property
    def in_flight(self) -> int:
        return self.limiter.borrowed_tokens

    def reconfigure(
        self,
        *,
        max_concurrency: int | None,
        tpm: int | None,
        rpm: int | None,
        now: float,
        tps: int | object | None = ...,
    ) -> None:
        """Change the limits in place, keeping what requests in flight hold.

        Guarantees: requests in flight keep their slots, and no slot is granted while the new
        cap is taken (so at most max(in flight, new cap) at any time); a bucket keeps its
        level (clamped to the new capacity, never refilled by the change); a bucket that is
        new starts full, as a new key's would, with the output still expected of the requests
        in flight held against it (``reserved``); a dropped limit's bucket is dropped.
        """
        self.max_concurrency = max_concurrency
        # trio lets total_tokens go below what is borrowed: no one more is admitted until the
        # borrowers are under it again.
        self.limiter.total_tokens = max_concurrency if max_concurrency is not None else math.inf
        self.tpm = _rebucket(self.tpm, tpm, TokenBucket.tokens_per_minute, now)
        self.rpm = _rebucket(self.rpm, rpm, TokenBucket.per_minute, now)
        if tps is not ...:  # given (None drops it), else kept as it is
            self.tps = _rebucket(self.tps, tps, TokenBucket.per_second, now)

    def idle(self, now: float) -> bool:
        """Nothing in flight or held, and every bucket full again: a new guard with the same
        limits would behave exactly the same."""
        return (
            self.in_flight == 0
            and self.reserved == 0
            and not self.disabled
            and self.unavailable_until <= now
            and all(b is None or b.full(now) for b in (self.tpm, self.tps, self.rpm))
        )

    def wait_time(self, tokens: int, now: float) -> float:
        """0 if a request reserving ``tokens`` may go now; else seconds to wait (``inf``: until
        a concurrency slot frees or requests in flight end, which is signalled, not timed)."""
        if self.disabled or self.limiter.available_tokens < 1:
            return math.inf
        wait = max(0.0, self.unavailable_until - now)
        if self.tpm is not None:
            wait = max(wait, self.tpm.wait_time(tokens, now, held=self.reserved))
        if self.tps is not None:
            wait = max(wait, self.tps.wait_time(tokens, now))
        if self.rpm is not None:
            wait = max(wait, self.rpm.wait_time(1, now))
        return wait

    def limit_reached(self, tokens: int, now: float) -> str | None:
        """Which of this guard's limits holds back a request reserving ``tokens``: the first
        of "disabled", "max_concurrency", "cooling_down", "tpm", "tps", "rpm" that does (the
        checks of :meth:`wait_time`), or None when it may go."""
        if self.disabled:
            return "disabled"
        if self.limiter.available_tokens < 1:
            return "max_concurrency"
        if self.unavailable_until > now:
            return "cooling_down"
        if self.tpm is not None and self.tpm.wait_time(tokens, now, held=self.reserved):
            return "tpm"
        if self.tps is not None and self.tps.wait_time(tokens, now):
            return "tps"
        if self.rpm is not None and self.rpm.wait_time(1, now):
            return "rpm"
        return None

    def describe(self, limit: str) -> str:
        """One of :meth:`limit_reached`'s answers in words, with the limit's value."""
        if limit == "max_concurrency":
            return f"max_concurrency of {self.max_concurrency} ({self.in_flight} running)"
        bucket = getattr(self, limit, None)
        if isinstance(bucket, TokenBucket):
            unit = LIMIT_UNITS[limit]
            return f"{limit} limit of {math.floor(bucket.capacity)} {unit}"
        return {"disabled": "being out of service", "cooling_down": "cool-down"}[limit]

    def take(self, lease: Lease, charged: int, held: int, now: float) -> None:
        """Take a slot, charge ``charged`` tokens now and hold ``held`` more for the request."""
        self.limiter.acquire_on_behalf_of_nowait(lease)
        self.charge(charged, 0, now)
        if self.rpm is not None:
            self.rpm.take(1, now)
        self.reserved += held

    def charge(self, tokens: int, released: int, now: float) -> None:
        """Charge ``tokens`` served (negative: give back), ``released`` of them from what is
        held for the request."""
        for bucket in (self.tpm, self.tps):
            if bucket is not None:
                bucket.give(-tokens, now)
        self.reserved -= released

    def settle(self, lease: Lease, correction: int, released: int, now: float) -> None:
        """Correct the charges by ``correction``, release what is still held for the request
        (``released``) and free the concurrency slot."""
        self.charge(correction, released, now)
        self.limiter.release_on_behalf_of(lease)

    def status(self, now: float) -> dict:
        state: dict = {"in_flight": self.in_flight, "reserved_tokens": self.reserved}
        if self.disabled:
            state["disabled"] = True
        if self.unavailable_until > now:
            state["cooling_down_s"] = round(self.unavailable_until - now, 3)
        if self.max_concurrency is not None:
            state["max_concurrency"] = self.max_concurrency
        if self.tpm is not None:
            # What a new request may still reserve: the level minus what is held. Plus
            # reserved_tokens, it is the bucket's level (tokens delivered are taken from it).
            state["tpm_remaining"] = math.floor(self.tpm.level(now) - self.reserved)
        for name in ("tps", "rpm"):
            bucket = getattr(self, name)
            if bucket is not None:
                state[f"{name}_remaining"] = math.floor(bucket.level(now))
        return state

    def tokens_remaining(self, now: float) -> float:
        """The TPM bucket's room for new reservations (for ``x-ratelimit-remaining-tokens``)."""
        assert self.tpm is not None
        return self.tpm.level(now) - self.reserved


@dataclass(frozen=True)
class KeyLimits:
    """A key's effective limits: its package's, or the key's own overrides."""

    tpm: int | None = None
    rpm: int | None = None
    max_concurrency: int | None = None
    max_queue: int | None = None
    queue_timeout_s: float = 60.0
    weight: float = 1.0

    @classmethod
    def of(cls, package: PackageConfig, overrides: Mapping[str, Any] | None = None) -> KeyLimits:
        """The package's limits, with a key's own ``overrides`` (same names) on top."""
        limits = cls(
            tpm=package.tpm,
            rpm=package.rpm,
            max_concurrency=package.max_concurrency,
            max_queue=package.max_queue,
            queue_timeout_s=package.queue_timeout_s,
            weight=package.weight,
        )
        return dataclasses.replace(limits, **overrides) if overrides else limits




def _rebucket(bucket: TokenBucket | None, limit: int | None, make, now: float):
    """``bucket`` resized to ``limit`` (per ``make``: rate and capacity), a new one if there
    was none, None if the limit is gone."""
    if not limit:
        return None
    if bucket is None:
        return make(limit, now)
    shape = make(limit, now)
    bucket.resize(shape.rate, shape.capacity, now)
    return bucket
