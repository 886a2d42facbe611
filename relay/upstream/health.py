"""Account health: cool-downs after rate limits and errors, and accounts out of service.

Health is kept on each account's guard (``unavailable_until``, ``disabled``), so admission treats
a resting account like a busy one: requests go to another account, or wait for this one's
cool-down to end. The rules (DESIGN.md, "Account scheduling"):

* upstream 429 → rest for the upstream's hint (``retry-after``, ``resets_in_seconds``, Gemini's
  ``retryDelay``, "try again in Ns": :func:`relay.protocol.translate.retry_after_hint`, read
  by the upstream client), or ``rate_limit_cooldown_s`` when it gives none; never longer than
  ``max_retry_after_s`` (an upstream's ``retry-after: 99999999`` is 3 years);
* upstream 401/403 → out of service until an operator re-enables it (the relay's credential for
  it is wrong; retrying cannot help);
* three failures in a row (5xx, connect errors, timeouts) → rest ``error_cooldown_s``;
* a ChatGPT-plan account's 429 ``usage_limit_reached`` → rest until the window resets (its
  ``resets_at`` / ``resets_in_seconds``, up to :data:`USAGE_LIMIT_MAX_REST_S`: hours, not
  ``max_retry_after_s``), and its sessions move to another account on their next request;
* a ChatGPT-plan account whose refresh token died (:meth:`Health.take_out`) → out of service
  with that reason, until an operator re-enables it.

Each change is an operator event (``relay/logs.py``), logged once when it happens: an account
taken out of service (with the upstream's answer, or "by the operator"), put back, and a
cool-down beginning (its length and reason; a cool-down extended while it runs is not logged
again).

Several processes (``server.redis_url``): each change is also written to Redis, and every
process follows what the others wrote within :data:`FOLLOW_S` (:meth:`Health.follow`): a
cool-down lasts as long as the longest one any process set, an account out of service is out
everywhere, and an operator's enable on one process puts it back everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from ..config import ServerConfig
from ..errors import RelayBusy, RelayError, UpstreamTimeout, UpstreamUnavailable
from ..logs import event, redact
from .routing import Account

if TYPE_CHECKING:
    from ..guards.shared import SharedGuards

#: Failures in a row after which an account rests.
FAILURES_BEFORE_COOLDOWN = 3
#: How often a process reads the account health the other processes shared.
FOLLOW_S = 1.0
#: The longest rest a usage_limit_reached imposes (the weekly window, and a day to spare).
USAGE_LIMIT_MAX_REST_S = 8 * 24 * 3600.0


def is_usage_limit(error: RelayError) -> bool:
    """The ChatGPT backend's "this plan's usage window is used up" (429)."""
    return error.status == 429 and "usage_limit_reached" in (error.type, error.code)


def is_account_failure(error: RelayError) -> bool:
    """Whether another account might succeed where this one failed (so fail over)."""
    if isinstance(error, RelayBusy):
        return False  # the relay's own limit: every account would meet it
    if isinstance(error, UpstreamUnavailable | UpstreamTimeout):
        return True
    return error.status in (401, 403, 429) or error.status >= 500


class Health:
    def __init__(self, server: ServerConfig, shared: SharedGuards | None = None) -> None:
        self._server = server
        self.shared = shared
        self._seen_out: set[str] = set()  # accounts seen out of service in Redis
        #: Failed attempts per (account, upstream status), failed-over ones included: the
        #: metrics' upstream errors by account.
        self.failures: dict[tuple[str, int], int] = {}

    def succeeded(self, account: Account) -> None:
        account.consecutive_failures = 0

    def failed(self, account: Account, error: RelayError) -> None:
        now = trio.current_time()
        counted = (account.name, error.status)
        self.failures[counted] = self.failures.get(counted, 0) + 1
        account.last_error = f"{error.status} {error.code or error.type}: {error.message}"[:300]
        account.last_error_at = time.time()
        guard = account.guard
        if error.status == 429:
            hint = getattr(error, "retry_after_s", None)
            wait = hint if hint is not None else self._server.rate_limit_cooldown_s
            wait = min(wait, self._server.max_retry_after_s)
            rest = getattr(error, "upstream_rest_s", None)
            if is_usage_limit(error) and rest is not None:
                wait = min(max(rest, wait), USAGE_LIMIT_MAX_REST_S)
            if guard.unavailable_until <= now:
                _cooling(account, wait, f"the upstream answered {_reason(account, error)}")
            guard.unavailable_until = max(guard.unavailable_until, now + wait)
            account.rate_limited += 1
        elif error.status in (401, 403):
            if not guard.disabled:
                event(
                    "account_out_of_service",
                    "account %s out of service until an operator enables it: the upstream "
                    "answered %s (check its credentials)",
                    account.name, _reason(account, error),
                    account=account.name, reason=_reason(account, error),
                )
            guard.disabled = True
        else:
            account.consecutive_failures += 1
            if account.consecutive_failures >= FAILURES_BEFORE_COOLDOWN:
                wait = self._server.error_cooldown_s
                if guard.unavailable_until <= now:
                    _cooling(
                        account, wait,
                        f"{FAILURES_BEFORE_COOLDOWN} failures in a row, the last "
                        f"{_reason(account, error)}",
                    )
                guard.unavailable_until = now + wait
                account.consecutive_failures = 0
        if guard.disabled or guard.unavailable_until > now:
            self._share(account)

    def _share(self, account: Account) -> None:
        if self.shared is not None:
            rest = account.guard.unavailable_until - trio.current_time()
            self.shared.share_health(
                account.name, until=time.time() + max(rest, 0.0), disabled=account.guard.disabled
            )
            if account.guard.disabled:
                # Shared: an entry later found gone means another process enabled it.
                self._seen_out.add(account.name)

    async def follow(self, accounts: Iterable[Account]) -> None:
        """Adopt, every :data:`FOLLOW_S`, the cool-downs and outages other processes shared
        (runs for as long as the relay serves, with shared state only)."""
        assert self.shared is not None
        accounts = list(accounts)
        while True:
            await trio.sleep(FOLLOW_S)
            found = await self.shared.account_health()
            if found is not None:
                self._adopt(accounts, found)

    def _adopt(self, accounts: list[Account], found: dict[str, dict]) -> None:
        now, wall = trio.current_time(), time.time()
        for account in accounts:
            guard, entry = account.guard, found.get(account.name)
            if entry is None:
                if account.name in self._seen_out and guard.disabled:
                    # Another process's operator put it back (its entry is gone).
                    event(
                        "account_back_in_service",
                        "account %s back in service: enabled through another relay process",
                        account.name, account=account.name, reason="enabled elsewhere",
                    )
                    guard.disabled = False
                    guard.unavailable_until = 0.0
                self._seen_out.discard(account.name)
                continue
            rest = entry["until"] - wall
            if rest > 0 and now + rest > guard.unavailable_until + 0.5:
                if guard.unavailable_until <= now:
                    _cooling(account, round(rest, 1), "another relay process saw it fail")
                guard.unavailable_until = now + rest
            if entry["disabled"]:
                self._seen_out.add(account.name)
                if not guard.disabled:
                    event(
                        "account_out_of_service",
                        "account %s out of service: taken out by another relay process",
                        account.name, account=account.name, reason="out of service elsewhere",
                    )
                    guard.disabled = True

    def take_out(self, account: Account, reason: str) -> None:
        """Take an account out of service for a reason found by the relay itself (a ChatGPT
        login that can no longer be refreshed), shown to the operator as its last error."""
        account.last_error = reason[:300]
        account.last_error_at = time.time()
        if not account.guard.disabled:
            event(
                "account_out_of_service",
                "account %s out of service until an operator enables it: %s",
                account.name, reason, account=account.name, reason=reason,
            )
        account.guard.disabled = True
        self._share(account)

    def disable(self, account: Account) -> None:
        """Take an account out of service until it is enabled again (an operator's choice;
        like an upstream 401/403, it lasts until :meth:`enable` or a restart)."""
        if not account.guard.disabled:
            event(
                "account_out_of_service",
                "account %s out of service: disabled by the operator",
                account.name, account=account.name, reason="disabled by the operator",
            )
        account.guard.disabled = True
        self._share(account)

    def enable(self, account: Account) -> None:
        """Put an account back in service (an operator fixed its credential)."""
        if account.guard.disabled:
            event(
                "account_back_in_service",
                "account %s back in service: enabled by the operator",
                account.name, account=account.name, reason="enabled by the operator",
            )
        account.guard.disabled = False
        account.guard.unavailable_until = 0.0
        account.consecutive_failures = 0
        if self.shared is not None:
            self.shared.reset_health(account.name)
            self._seen_out.discard(account.name)


def _reason(account: Account, error: RelayError) -> str:
    """``429 rate_limit_exceeded: …`` with the account's own credential taken out."""
    text = f"{error.status} {error.code or error.type}: {error.message}"[:300]
    return redact(text, account.config.api_key())


def _cooling(account: Account, seconds: float, reason: str) -> None:
    event(
        "account_cooldown",
        "account %s cooling down for %gs: %s",
        account.name, seconds, reason,
        account=account.name, seconds=seconds, reason=reason,
    )
