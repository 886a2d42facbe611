"""Token buckets: rates held over time, with debt.

A bucket refills at ``rate`` per second up to ``capacity``. Whoever uses it takes tokens as they
are spent (admission takes a request's input when it is granted and its output as it streams) and
gives back what was taken in excess, so the level may go below zero (debt) and later requests wait
for the refill to pay it off. That is what keeps a TPM limit accurate when estimates are wrong:
over any window the tokens taken equal ``rate`` × time plus the level at its start minus the level
at its end, and the level never exceeds ``capacity``.

A user may also *hold* tokens it has promised but not yet taken (the expected output of requests
in flight): ``can_take`` and ``wait_time`` accept ``held``, so an amount is admitted only when it
fits on top of the promises.

Time is passed in (``now``), so the bucket is a pure value that tests drive with any clock.
"""

from __future__ import annotations

import math

#: A TPM bucket refills at this share of its limit. Tokens are delivered in lumps (a prompt's
#: input arrives at once; at 60,000 TPM a 2,000-token prompt is 3.3% of a minute), so the tokens
#: delivered in a given minute swing around the refill by about 1% (bench/README.md,
#: ``bench.tpm``). Refilling 1% below the limit makes the limit a ceiling that a minute
#: rarely passes, instead of an average that half the minutes pass. The capacity (the burst
#: after idle) stays one full minute of the limit.
TPM_REFILL = 0.99


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
    def tokens_per_minute(cls, limit: float, now: float = 0.0) -> TokenBucket:
        """A TPM limit: one minute's worth may be used at once, refilled at ``TPM_REFILL``."""
        return cls(limit * TPM_REFILL / 60.0, limit, now)

    @classmethod
    def per_second(cls, limit: float, now: float = 0.0) -> TokenBucket:
        """A limit per second (TPS): at most one second's worth in a burst."""
        return cls(limit, limit, now)

    def resize(self, rate: float, capacity: float, now: float) -> None:
        """Change the rate and capacity in place (a limit changed): the level accrued so far
        at the old rate is kept, clamped to the new capacity; it is never refilled by the
        change (debt stays debt)."""
        if rate <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self._level = min(capacity, self.level(now))
        self.rate, self.capacity = rate, capacity

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled to its capacity: a new bucket would be the same."""
        return self.level(now) >= self.capacity

    def level(self, now: float) -> float:
        if now > self._updated:
            self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
            self._updated = now
        return self._level

    def fits(self, amount: float) -> bool:
        """Whether ``amount`` can ever be taken at once (it is within the capacity)."""
        return amount <= self.capacity

    def can_take(self, amount: float, now: float, held: float = 0.0) -> bool:
        """Whether ``amount`` fits now on top of ``held`` promised tokens. An amount above the
        capacity fits when the bucket is full and nothing is held (it could never fit else)."""
        return self.level(now) - held >= min(amount, self.capacity)

    def take(self, amount: float, now: float) -> None:
        self.level(now)
        self._level -= amount

    def give(self, amount: float, now: float) -> None:
        """Return ``amount`` (negative: take more); the level never exceeds the capacity."""
        self.level(now)
        self._level = min(self.capacity, self._level + amount)

    def wait_time(self, amount: float, now: float, held: float = 0.0) -> float:
        """Seconds until ``can_take(amount, held=held)`` if ``held`` stays: 0 if now, ``inf``
        never (the promises alone exceed the capacity: they must be kept or released first)."""
        missing = min(amount, self.capacity) + held - self.level(now)
        if missing <= 0:
            return 0.0
        if min(amount, self.capacity) + held > self.capacity:
            return math.inf
        return missing / self.rate

    def reset_time(self, now: float, held: float = 0.0) -> float:
        """Seconds until the bucket is full again with nothing held (``x-ratelimit-reset-*``)."""
        return max(0.0, (self.capacity - self.level(now) + held) / self.rate)
