"""Sticky sessions: a conversation stays on the account that holds its prompt cache.

A session key (``prompt_cache_key``, body ``session_id``, or the Codex CLI's session headers) is
bound to an account per pool. The binding holds while the account can take the request; when it
is at its limit or unhealthy, admission picks another account and the session is rebound there
(and the rebind counted). Bindings unused for ``ttl_s`` expire.
"""

from __future__ import annotations

from collections import OrderedDict


class SessionBindings:
    def __init__(self, ttl_s: float, max_sessions: int = 200_000) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        # (pool, session) → (account name, last used); oldest use first.
        self._bindings: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self.rebinds = 0

    def __len__(self) -> int:
        return len(self._bindings)

    def account_for(self, pool: str, session: str, now: float) -> str | None:
        found = self._bindings.get((pool, session))
        if found is None:
            return None
        account, used = found
        if now - used > self.ttl_s:
            del self._bindings[(pool, session)]
            return None
        return account

    def bind(self, pool: str, session: str, account: str, now: float) -> None:
        key = (pool, session)
        previous = self._bindings.pop(key, None)
        if previous is not None and previous[0] != account and now - previous[1] <= self.ttl_s:
            self.rebinds += 1
        self._bindings[key] = (account, now)
        self._expire(now)

    def adopt(self, pool: str, session: str, account: str, now: float) -> None:
        """Take the binding another process made (shared state): no rebind is counted."""
        self._bindings.pop((pool, session), None)
        self._bindings[(pool, session)] = (account, now)
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._bindings:
            key, (_, used) = next(iter(self._bindings.items()))
            if now - used <= self.ttl_s and len(self._bindings) <= self.max_sessions:
                return
            del self._bindings[key]

    def per_account(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for account, _ in self._bindings.values():
            counts[account] = counts.get(account, 0) + 1
        return counts
