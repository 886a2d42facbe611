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
* three failures in a row (5xx, connect errors, timeouts) → rest ``error_cooldown_s``.

Each change is an operator event (``relay/logs.py``), logged once when it happens: an account
taken out of service (with the upstream's answer, or "by the operator"), put back, and a
cool-down beginning (its length and reason; a cool-down extended while it runs is not logged
again).
"""

from __future__ import annotations

import time

import trio

from ..config import ServerConfig
from ..errors import RelayBusy, RelayError, UpstreamTimeout, UpstreamUnavailable
from ..logs import event, redact
from .routing import Account

#: Failures in a row after which an account rests.
FAILURES_BEFORE_COOLDOWN = 3


def is_account_failure(error: RelayError) -> bool:
    """Whether another account might succeed where this one failed (so fail over)."""
    if isinstance(error, RelayBusy):
        return False  # the relay's own limit: every account would meet it
    if isinstance(error, UpstreamUnavailable | UpstreamTimeout):
        return True
    return error.status in (401, 403, 429) or error.status >= 500


class Health:
    def __init__(self, server: ServerConfig) -> None:
        self._server = server
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
