"""Token buckets: rates held over time, with debt.

A bucket refills at ``rate`` per second up to ``capacity``. Admission takes a request's estimate
from it; when the request ends, the difference between estimate and real use is given back or
taken on top, so the level may go below zero (debt) and later requests wait for the refill to pay
it off. That is what keeps a TPM limit accurate when estimates are wrong: over any long window the
tokens delivered equal ``rate`` × time, plus at most one ``capacity`` of burst.

Time is passed in (``now``), so the bucket is a pure value that tests drive with any clock.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` banked.

    Guarantee: over any interval of length ``t`` the amount taken (net of what was given back)
    never exceeds ``capacity + rate * t``.
    """

    __slots__ = ("_level", "_updated", "capacity", "rate")

    def __init__(self, rate: float, capacity: float, now: float = 0.0) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self.rate = rate
        self.capacity = capacity
        self._level = capacity
        self._updated = now

    @classmethod
    def per_minute(cls, limit: float, now: float = 0.0) -> TokenBucket:
        """A limit per minute (TPM, RPM): one minute's worth may be used at once."""
        return cls(limit / 60.0, limit, now)

    @classmethod
    def per_second(cls, limit: float, now: float = 0.0) -> TokenBucket:
        """A limit per second (TPS): at most one second's worth in a burst."""
        return cls(limit, limit, now)

    def level(self, now: float) -> float:
        if now > self._updated:
            self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
            self._updated = now
        return self._level

    def fits(self, amount: float) -> bool:
        """Whether ``amount`` can ever be taken at once (it is within the capacity)."""
        return amount <= self.capacity

    def can_take(self, amount: float, now: float) -> bool:
        return self.level(now) >= min(amount, self.capacity)

    def take(self, amount: float, now: float) -> None:
        self.level(now)
        self._level -= amount

    def give(self, amount: float, now: float) -> None:
        """Return ``amount`` (negative: take more); the level never exceeds the capacity."""
        self.level(now)
        self._level = min(self.capacity, self._level + amount)

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until ``can_take(amount)``: 0 if now, ``inf`` never."""
        missing = min(amount, self.capacity) - self.level(now)
        if missing <= 0:
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf

    def reset_time(self, now: float) -> float:
        """Seconds until the bucket is full again (for ``x-ratelimit-reset-*``)."""
        return max(0.0, (self.capacity - self.level(now)) / self.rate)
