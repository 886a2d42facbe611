"""Every key's credit balance in memory, and the holds of the requests in progress.

The hot path never waits for the disk: a request's credit check reads this ledger, and its cost
is debited here the moment its usage record is handed to the writer, which then commits the
record and the debit in one SQLite transaction (``relay/ledger/store.py``).

Where the numbers come from:

* ``granted``: the key's record in the key ring (``credits_granted_nano``), which the ring
  reloads whenever the database changes, so a top-up made by the CLI counts within a second and
  one made through the admin API at once.
* ``used``: loaded from the database when the relay starts, then kept here: every usage record
  adds its cost (:meth:`Credits.charge`). The database catches up when the batch commits. This
  makes one relay process the owner of its database's balances; several processes sharing one
  ledger need the Redis backend, which is not built yet.
* ``held``: the estimates of the requests in progress (:meth:`Credits.hold`).

The overdraft bound. A request is let through only if the key's *available* credits (granted −
used − held) cover its estimate, and its estimate stays held until its real cost replaces it.
So concurrent requests never spend the same credits twice: the balance can go below zero only by
how much requests cost more than their estimates. Precisely, after every request has finished,

    balance ≥ − Σ max(0, cost_i − estimate_i)

summed over the requests that were in progress together when the last one was admitted: each
request overdraws by at most its own error of estimate, and concurrency adds nothing (a check
without holds lets N concurrent requests each spend the whole balance). Input is estimated at
the uncached price from the request's size, and output from its ``max_tokens`` /
``max_output_tokens`` (or the relay's default expectation), so a request that sets its output cap
can only overdraw by its input estimate's error. ``tests/test_credits.py`` proves the bound with
property tests and through HTTP with concurrent requests on a small balance.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import InsufficientQuota
from .prices import PriceTable, cost, format_credits, to_credits
from .store import KeyRecord
from .usage import UsageRecord


@dataclass(frozen=True)
class Balance:
    """One key's credits, in nanocredits."""

    granted: int
    used: int
    held: int

    @property
    def remaining(self) -> int:
        """Granted minus used: what the key has left once the running requests are billed at
        zero (negative when it overdrew)."""
        return self.granted - self.used

    @property
    def available(self) -> int:
        """What a new request may still be estimated at: remaining minus the holds."""
        return self.remaining - self.held

    def as_credits(self) -> dict[str, float]:
        return {
            "granted": to_credits(self.granted),
            "used": to_credits(self.used),
            "held": to_credits(self.held),
            "remaining": to_credits(self.remaining),
            "available": to_credits(self.available),
        }


class Credits:
    """Balances, holds and charges of one relay process (nothing here does I/O)."""

    def __init__(self, prices: PriceTable, keys: Iterable[KeyRecord] = ()) -> None:
        self.prices = prices
        self._used: dict[str, int] = {key.id: key.credits_used_nano for key in keys}
        self._held: dict[str, int] = {}
        self._holds: dict[str, tuple[str, int]] = {}  # request id → (key id, amount held)

    def balance(self, key: KeyRecord) -> Balance:
        return Balance(
            granted=key.credits_granted_nano,
            used=self._used.get(key.id, 0),
            held=self._held.get(key.id, 0),
        )

    @contextmanager
    def hold(
        self, key: KeyRecord, record: UsageRecord, *, input_tokens: int, output_tokens: int
    ) -> Iterator[int]:
        """Check that the key covers the request's estimate and hold it for the block.

        Raises :class:`InsufficientQuota` (402) when the key's available credits are below the
        estimate; a request to a model without a price is estimated at 0 and always passes.
        The hold ends when the request's usage record is charged (:meth:`charge`) or when the
        block exits, whichever comes first; so a request's cost should be recorded before the
        block exits (if it is recorded after, nothing may checkpoint in between). Neither this
        method nor its exit checkpoints, so no other task can see a half-taken hold.
        """
        estimate = self.prices.estimate(
            record.model,
            record.upstream_model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        if estimate > 0:
            balance = self.balance(key)
            if balance.available < estimate:
                raise InsufficientQuota(_refusal(key, balance, estimate))
            self._held[key.id] = self._held.get(key.id, 0) + estimate
            self._holds[record.request_id] = (key.id, estimate)
        try:
            yield estimate
        finally:
            self._release(record.request_id)

    def charge(self, record: UsageRecord) -> None:
        """Price ``record`` from its tokens (sets ``record.cost_nano``), debit its key and end
        its hold. Called by the usage writer for every record, exactly once."""
        self._release(record.request_id)
        rate = self.prices.rate_for(record.model, record.upstream_model)
        record.cost_nano = cost(
            rate,
            input_tokens=record.input_tokens,
            cached_tokens=record.cached_tokens,
            output_tokens=record.output_tokens,
            reasoning_tokens=record.reasoning_tokens,
        )
        if record.cost_nano:
            self._used[record.key_id] = self._used.get(record.key_id, 0) + record.cost_nano

    def status(self) -> dict:
        """Holds in progress: what the leak tests check returns to zero."""
        return {"holds": len(self._holds), "held": to_credits(sum(self._held.values()))}

    def _release(self, request_id: str) -> None:
        entry = self._holds.pop(request_id, None)
        if entry is None:
            return
        key_id, amount = entry
        left = self._held[key_id] - amount
        if left:
            self._held[key_id] = left
        else:
            del self._held[key_id]


def _refusal(key: KeyRecord, balance: Balance, estimate: int) -> str:
    held = (
        f" ({format_credits(balance.held)} more are held by your requests in progress)"
        if balance.held
        else ""
    )
    return (
        f"Your key {key.hint} does not have enough credits for this request: "
        f"{format_credits(max(balance.available, 0))} credits available{held}, and this request "
        f"is estimated at {format_credits(estimate)} credits. Ask the relay's operator to top up "
        "the key, or send a smaller request (a lower max_tokens lowers the estimate)."
    )
