"""Every key's credit balance in memory, and the holds of the requests in progress.

The hot path never waits for the disk: a request's credit check reads this ledger, and its cost
is debited here the moment its usage record is handed to the writer, which then commits the
record and the debit in one SQLite transaction (``relay/ledger/store.py``).

Where the numbers come from:

* ``granted``: the key's record in the key ring (``credits_granted_nano``), which the ring
  reloads whenever the database changes, so a top-up made by the CLI counts within a second and
  one made through the admin API at once.
* ``used``: loaded from the database when the relay starts, then kept here: every usage record
  adds its cost (:meth:`Credits.charge`). The database catches up when the batch commits.
* ``held``: the estimates of the requests in progress (:meth:`Credits.hold`).

Several processes (``server.redis_url``): the check and the hold are made in Redis, atomically,
against every process's holds and charges (:meth:`relay.guards.shared.SharedGuards.hold_credits`);
each charge is added there too, and ends its hold in the same step. The balance a process shows
(admin API, workbench) is its own view: the database's figure and what it last saw in Redis.
When Redis is unreachable under ``redis_failure = "local"``, each process checks its own view
(which then misses the other processes' charges since the last one it saw).

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

from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InsufficientQuota, SharedStateUnavailable
from .prices import PriceTable, cost, format_credits, to_credits
from .store import KeyRecord
from .usage import UsageRecord

if TYPE_CHECKING:
    from ..guards.shared import SharedGuards


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

    def __init__(
        self,
        prices: PriceTable,
        keys: Iterable[KeyRecord] = (),
        shared: SharedGuards | None = None,
    ) -> None:
        self.prices = prices
        self.shared = shared
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
    def hold_local(
        self, key: KeyRecord, record: UsageRecord, *, input_tokens: int, output_tokens: int
    ) -> Iterator[int]:
        """Check that the key covers the request's estimate and hold it for the block, in this
        process alone (no shared state).

        Raises :class:`InsufficientQuota` (402) when the key's available credits are below the
        estimate; a request to a model without a price is estimated at 0 and always passes.
        The hold ends when the request's usage record is charged (:meth:`charge`) or when the
        block exits, whichever comes first; so a request's cost should be recorded before the
        block exits (if it is recorded after, nothing may checkpoint in between). Neither this
        method nor its exit checkpoints, so no other task can see a half-taken hold.
        """
        estimate = self._estimate(record, input_tokens, output_tokens)
        if estimate > 0:
            balance = self.balance(key)
            if balance.available < estimate:
                raise InsufficientQuota(_refusal(key, balance, estimate))
        with self._held_for(key, record, estimate):
            yield estimate

    @asynccontextmanager
    async def hold(
        self, key: KeyRecord, record: UsageRecord, *, input_tokens: int, output_tokens: int
    ) -> AsyncIterator[int]:
        """:meth:`hold_local`, or with shared state, the same check and hold made in Redis
        against every process's holds and charges (one call, shielded and bounded; the local
        check when Redis is lost under ``"local"``, 503 under ``"closed"``)."""
        if self.shared is None:
            with self.hold_local(
                key, record, input_tokens=input_tokens, output_tokens=output_tokens
            ) as estimate:
                yield estimate
            return
        estimate = self._estimate(record, input_tokens, output_tokens)
        if estimate > 0 and await self._shared_balance(key, record.request_id, estimate) is None:
            balance = self.balance(key)  # Redis lost, "local": this process decides
            if balance.available < estimate:
                raise InsufficientQuota(_refusal(key, balance, estimate))
        with self._held_for(key, record, estimate):
            yield estimate

    def _estimate(self, record: UsageRecord, input_tokens: int, output_tokens: int) -> int:
        return self.prices.estimate(
            record.model,
            record.upstream_model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )

    @contextmanager
    def _held_for(self, key: KeyRecord, record: UsageRecord, estimate: int) -> Iterator[None]:
        if estimate > 0:
            self._held[key.id] = self._held.get(key.id, 0) + estimate
            self._holds[record.request_id] = (key.id, estimate)
        try:
            yield
        finally:
            self._release(record.request_id)

    def charge(self, record: UsageRecord) -> None:
        """Price ``record`` from its tokens (sets ``record.cost_nano``), debit its key and end
        its hold. Called by the usage writer for every record, exactly once."""
        self._release(record.request_id, shared=False)  # the shared charge ends it
        rate = self.prices.rate_for(record.model, record.upstream_model)
        record.cost_nano = cost(
            rate,
            input_tokens=record.input_tokens,
            cached_tokens=record.cached_tokens,
            output_tokens=record.output_tokens,
            reasoning_tokens=record.reasoning_tokens,
            cache_write_tokens=record.cache_write_tokens,
        )
        seed = self._used.get(record.key_id, 0)
        if record.cost_nano:
            self._used[record.key_id] = seed + record.cost_nano
        if self.shared is not None and record.key_id:
            self.shared.charge_credits(record.key_id, record.request_id, record.cost_nano, seed)

    async def _shared_balance(
        self, key: KeyRecord, request_id: str, estimate: int
    ) -> Balance | None:
        """With shared state: hold ``estimate`` in Redis and return the key's balance as Redis
        saw it (:class:`InsufficientQuota` if it does not cover the estimate); None without
        shared state or when Redis is lost under ``"local"``."""
        if self.shared is None:
            return None
        from ..guards.shared import SharedUnavailable

        try:
            result = await self.shared.hold_credits(
                key.id, request_id, key.credits_granted_nano, self._used.get(key.id, 0), estimate
            )
        except SharedUnavailable as error:
            raise SharedStateUnavailable(str(error)) from None
        if result is None:
            return None
        held_ok, used, held = result
        # Redis counts every process's charges; this process's view catches up.
        self._used[key.id] = max(self._used.get(key.id, 0), used)
        balance = Balance(granted=key.credits_granted_nano, used=used, held=held)
        if not held_ok:
            raise InsufficientQuota(_refusal(key, balance, estimate))
        return balance

    def status(self) -> dict:
        """Holds in progress: what the leak tests check returns to zero."""
        return {"holds": len(self._holds), "held": to_credits(sum(self._held.values()))}

    def _release(self, request_id: str, *, shared: bool = True) -> None:
        entry = self._holds.pop(request_id, None)
        if entry is None:
            return
        key_id, amount = entry
        if shared and self.shared is not None:
            # Ended without a charge (none was recorded before the block exited): end the
            # shared hold too. (A charge ends it itself.)
            self.shared.charge_credits(key_id, request_id, 0, self._used.get(key_id, 0))
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
