"""ChatGPT-plan accounts (``provider = "codex-chatgpt"``): their OAuth tokens, kept valid, and
their usage windows.

:class:`ChatGPTAccounts` gives every request to such an account a valid access token
(:meth:`~ChatGPTAccounts.post` wraps :meth:`.client.UpstreamClient.post` with the account's
headers), reads the usage windows of every answer, and refreshes the tokens. The refresh rules,
which follow the Codex CLI's own (codex-rs ``login/src/auth/manager.rs``):

* **When**: the access token's JWT ``exp`` is less than ``server.oauth_refresh_margin_s`` away,
  or the backend answered 401 to a token obtained more than :data:`MIN_401_REFRESH_S` ago (a
  fresh token refused is a dead account, not a reason to refresh again), or the operator asks
  (``relay accounts refresh``).
* **One at a time**: per account a trio lock; whoever waited for it re-reads the stored tokens
  first and uses the ones the refresh it waited for produced. Across processes a lock per
  account (:data:`LOCK_TTL_S`): Redis's with ``server.redis_url``, the ledger's (one SQLite
  statement) without it or while Redis cannot answer, so one process of all refreshes; the
  others wait for its tokens to appear in the ledger (the one all processes share).
* **Persist first**: the rotated refresh token is committed to the ledger before the new access
  token is used, and the exchange and the write are shielded from cancellation (a client going
  away mid-refresh must not spend the refresh token and lose its successor): a relay killed
  after the write keeps working after a restart; one killed between the endpoint's answer and
  the write loses the new tokens (the one window no client can open wider).
* **Permanent failures** (``refresh_token_expired`` / ``reused`` / ``invalidated``, OAuth's
  ``invalid_grant``): the account goes out of service with that reason, until the operator
  imports a new ``auth.json`` and enables it.
* **Transient failures** (the endpoint down, 5xx, a timeout): the account keeps serving with its
  access token until that token really expires; the next attempt waits a backoff (doubling from
  :data:`BACKOFF_FIRST_S` to :data:`BACKOFF_MAX_S`) whatever the requests do. So no client can
  make the relay refresh in a loop: a refresh needs an expiring token, a 401 to an old token,
  or the operator, and a failed one is not retried before its backoff.

Tokens never leave this module except in the ``Authorization`` header upstream: not in logs,
errors, the admin API or metrics (:meth:`OAuthState.public` shows times and counts only).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..config import Config
from ..errors import UpstreamError, UpstreamUnavailable
from ..ledger.vault import Vault, VaultError, secret_from_env
from ..logs import event
from ..protocol.chatgpt import OAuthTokens, UsageWindow, refresh_failure, usage_windows
from .http11 import Response, TransportError

if TYPE_CHECKING:
    from ..guards.shared import SharedGuards
    from .client import UpstreamClient
    from .health import Health
    from .routing import Account

log = logging.getLogger("relay.upstream")

#: A 401 to an access token younger than this does not trigger a refresh (the account's
#: credentials are rejected: it goes out of service like any account answered 401).
MIN_401_REFRESH_S = 60.0
#: Backoff after a refresh that failed for a transient reason.
BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 300.0
#: The whole exchange with the token endpoint, and the write of its answer.
REFRESH_TIMEOUT_S = 30.0
#: The cross-process refresh lock outlives a refresh that hangs by no more than this.
LOCK_TTL_S = REFRESH_TIMEOUT_S + 15.0
#: How often a process waiting for another's refresh looks for its tokens in the ledger.
LOCK_POLL_S = 0.1
#: An account with no tokens re-reads the ledger at most this often (an import while serving).
RELOAD_S = 5.0
#: The originator the backend sees when the client sent none (the Codex CLI's default).
ORIGINATOR = "codex_cli_rs"


class RefreshError(Exception):
    """A refresh that did not happen; ``permanent`` when the refresh token is dead."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass
class OAuthState:
    """One codex-chatgpt account's tokens and what the operator sees of them."""

    tokens: OAuthTokens | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    windows: dict[str, UsageWindow] = field(default_factory=dict)
    windows_at: float | None = None
    refreshes: int = 0
    refresh_failures: int = 0
    last_refresh_error: str | None = None
    #: Why the account is out of service for good (a dead refresh token), if it is.
    out_reason: str | None = None
    #: Why the stored tokens cannot be read (no secret key, the wrong one), if so.
    problem: str | None = None
    retry_at: float = 0.0  # trio clock: no refresh attempt before (backoff)
    backoff_s: float = 0.0
    reloaded_at: float = -RELOAD_S

    def no_room(self, now: float) -> bool:
        """A window is used up and has not reset yet (the account would answer 429)."""
        return any(
            window.used_percent >= 100 and (window.resets_at is None or window.resets_at > now)
            for window in self.windows.values()
        )

    def public(self) -> dict:
        """What the admin API shows: times and counts, never a token."""
        tokens = self.tokens
        return {
            "has_tokens": tokens is not None,
            "credentials_problem": self.problem,
            "chatgpt_account": _hint(tokens.account_id) if tokens else None,
            "plan_type": tokens.plan_type if tokens else None,
            "access_expires_at": tokens.expires_at if tokens else None,
            "last_refresh": (tokens.last_refresh or None) if tokens else None,
            "refreshes": self.refreshes,
            "refresh_failures": self.refresh_failures,
            "last_refresh_error": self.last_refresh_error,
            "out_of_service_reason": self.out_reason,
            "usage_windows": {name: window.public() for name, window in self.windows.items()},
            "usage_windows_at": self.windows_at,
        }


def _hint(account_id: str) -> str:
    """Enough of the ChatGPT account id to tell accounts apart."""
    return account_id[:8] + "…" if len(account_id) > 8 else account_id


class ChatGPTAccounts:
    """The codex-chatgpt accounts of this process (see the module's rules)."""

    def __init__(
        self,
        config: Config,
        vault: Vault | None,
        upstream: UpstreamClient,
        health: Health,
        shared: SharedGuards | None = None,
        vault_problem: str | None = None,
    ) -> None:
        self._margin_s = config.server.oauth_refresh_margin_s
        self._vault = vault
        self._vault_problem = vault_problem
        self._upstream = upstream
        self._health = health
        self._shared = shared
        #: Token-endpoint calls made (each one spends a refresh token): the tests' count.
        self.exchanges = 0
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this process, in ledger locks

    @classmethod
    def open(
        cls, config: Config, store, upstream: UpstreamClient, health: Health,
        shared: SharedGuards | None = None,
    ) -> ChatGPTAccounts:
        """The accounts' keeper; without a usable secret key it still opens (and every
        codex-chatgpt account is shown without tokens, with the reason logged once)."""
        vault, problem = None, None
        if any(account.provider == "codex-chatgpt" for account in config.accounts):
            env = config.server.secret_key_env
            try:
                vault = Vault(store, secret_from_env(env), env)
            except VaultError as error:
                problem = str(error)
                log.error("codex-chatgpt accounts cannot be used: %s", problem)
        return cls(config, vault, upstream, health, shared, problem)

    async def load(self, accounts: list[Account]) -> None:
        """Read every codex-chatgpt account's tokens from the ledger (at start)."""
        for account in accounts:
            if account.oauth is not None:
                await self._reload(account, force=True)

    async def _reload(self, account: Account, *, force: bool = False) -> OAuthTokens | None:
        state = account.oauth
        assert state is not None
        now = trio.current_time()
        if not force and now - state.reloaded_at < RELOAD_S:
            return state.tokens
        state.reloaded_at = now
        stored = await self._stored(account)
        if stored is not None:
            state.tokens = stored
        elif state.tokens is None and state.problem is None:
            log.warning(
                "account %s has no tokens in the ledger: import them with `relay accounts "
                "import-codex-auth`", account.name,
            )
        return state.tokens

    async def _stored(self, account: Account) -> OAuthTokens | None:
        state = account.oauth
        assert state is not None
        if self._vault is None:
            state.problem = self._vault_problem
            return None
        try:
            tokens = await trio.to_thread.run_sync(self._vault.load, account.name)
        except VaultError as error:
            if state.problem != str(error):
                log.error("account %s: %s", account.name, error)
            state.problem = str(error)
            return None
        state.problem = None
        return tokens

    # -- the upstream call -------------------------------------------------------------------

    @asynccontextmanager
    async def post(
        self,
        account: Account,
        url: str,
        body: bytes,
        *,
        headers: dict[str, str],
        client_headers: Mapping[str, str],
        session: str | None,
    ) -> AsyncIterator[Response]:
        """:meth:`.client.UpstreamClient.post` to the ChatGPT backend with the account's valid
        access token (always streamed: the backend serves SSE only). ``headers`` gets the
        account's headers (so the caller's redaction knows the token); ``session`` (the
        request's ``prompt_cache_key``) is sent as ``session_id`` when the client sent no
        session header. A 401 to a token that is not fresh is answered by one refresh and one
        more attempt."""
        tokens = await self.credentials(account)
        for attempt in range(2):
            headers.update(_account_headers(tokens, client_headers, session))
            stack = AsyncExitStack()
            try:
                response = await stack.enter_async_context(
                    self._upstream.post(
                        url, body, kind="openai-responses", headers=headers,
                        client_headers=client_headers, stream=True, account=account.name,
                    )
                )
            except UpstreamError as error:
                await stack.aclose()
                self.observe(account, error.usage_headers)  # a 429 reports its windows too
                if (
                    attempt == 0
                    and getattr(error, "upstream_status", None) == 401
                    and time.time() - tokens.last_refresh >= MIN_401_REFRESH_S
                ):
                    try:
                        tokens = await self.refresh(account, stale=tokens.access_token)
                        continue
                    except RefreshError:
                        pass  # the 401 stands: the account goes out of service
                raise
            async with stack:
                self.observe(account, response.headers)
                yield response
            return

    async def credentials(self, account: Account) -> OAuthTokens:
        """The account's tokens with an access token valid now, refreshed first if it is about
        to expire. Raises :class:`~relay.errors.UpstreamUnavailable` (the request fails over)
        when the account has none that work."""
        state = account.oauth
        assert state is not None
        tokens = state.tokens or await self._reload(account)
        if tokens is None:
            raise UpstreamUnavailable(
                f"The upstream account '{account.name}' has no credentials yet. Tell the "
                "relay's operator (relay accounts import-codex-auth)."
            )
        expires_at = tokens.expires_at or 0.0
        if expires_at - time.time() > self._margin_s:
            return tokens
        try:
            return await self.refresh(account, stale=tokens.access_token)
        except RefreshError as error:
            if not error.permanent and expires_at > time.time():
                return tokens  # the endpoint is down: serve until the token really ends
            raise UpstreamUnavailable(
                f"The upstream account '{account.name}' cannot be used: its login could not be "
                f"renewed ({error.reason}). Try again; if it persists, tell the relay's "
                "operator."
            ) from None

    def observe(self, account: Account, headers: Mapping[str, str]) -> None:
        """Keep the usage windows an answer reports."""
        state = account.oauth
        if state is None:
            return
        windows = usage_windows(headers, time.time())
        if windows:
            state.windows.update(windows)
            state.windows_at = time.time()

    # -- refresh -----------------------------------------------------------------------------

    async def refresh(
        self, account: Account, *, stale: str | None = None, forced: bool = False
    ) -> OAuthTokens:
        """New tokens for the account, single-flight (see the module's rules). ``stale`` is
        the access token the caller found wanting: if the tokens changed since (another
        refresh), those are returned without a new one. Raises :class:`RefreshError`."""
        state = account.oauth
        assert state is not None
        async with state.lock:
            current = await self._latest(account)
            if not forced and current.access_token != stale and self._fresh(current):
                return current
            if state.out_reason is not None and not forced:
                raise RefreshError(state.out_reason, permanent=True)
            now = trio.current_time()
            if not forced and now < state.retry_at:
                raise RefreshError(
                    f"the last refresh failed ({state.last_refresh_error}); the next attempt "
                    f"in {state.retry_at - now:.0f}s"
                )
            return await self._refresh_shared(account, current, forced)

    async def _latest(self, account: Account) -> OAuthTokens:
        """The newest tokens: the ledger's, if another process (or the CLI) rotated them."""
        state = account.oauth
        assert state is not None
        stored = await self._stored(account)
        if stored is not None and (
            state.tokens is None or stored.refresh_token != state.tokens.refresh_token
        ):
            state.tokens = stored
        if state.tokens is None:
            raise RefreshError(self._vault_problem or "no tokens imported", permanent=True)
        return state.tokens

    def _fresh(self, tokens: OAuthTokens) -> bool:
        return (tokens.expires_at or 0.0) - time.time() > self._margin_s

    async def _refresh_shared(
        self, account: Account, current: OAuthTokens, forced: bool
    ) -> OAuthTokens:
        """The refresh under the cross-process lock: Redis's when it is shared and answers,
        else the ledger's (every process serving the account shares its ledger: the tokens
        live there). While another process holds it, wait for its tokens in the ledger."""
        name = f"oauth:{account.name}"
        deadline = trio.current_time() + LOCK_TTL_S
        while True:
            release = await self._take_lock(name)
            if release is not None:
                break
            await trio.sleep(LOCK_POLL_S)
            latest = await self._latest(account)
            if latest.refresh_token != current.refresh_token:
                return latest
            if trio.current_time() > deadline:
                raise RefreshError("another relay process holds the refresh lock")
        try:
            # Another process may have finished just before the lock was ours.
            latest = await self._latest(account)
            if latest.refresh_token != current.refresh_token and not forced:
                return latest
            return await self._exchange(account, current)
        finally:
            with trio.CancelScope(shield=True):
                await release()

    async def _take_lock(self, name: str):
        """A coroutine function giving the lock back, once it is this process's; None while
        another process holds it."""
        shared = self._shared
        if shared is not None:
            token = await shared.try_lock(name, LOCK_TTL_S)
            if token is False:
                return None
            if token is not None:
                async def unlock_redis() -> None:
                    await shared.unlock(name, token)

                return unlock_redis
        # No Redis, or it cannot say: the ledger's lock (one SQLite statement).
        vault = self._vault
        assert vault is not None
        taken = await trio.to_thread.run_sync(vault.take_lock, name, self._owner, LOCK_TTL_S)
        if not taken:
            return None

        async def unlock_ledger() -> None:
            await trio.to_thread.run_sync(vault.release_lock, name, self._owner)

        return unlock_ledger

    async def _exchange(self, account: Account, current: OAuthTokens) -> OAuthTokens:
        """Spend the refresh token at the token endpoint and persist what comes back, shielded
        (see "Persist first")."""
        state = account.oauth
        assert state is not None and self._vault is not None
        config = account.config
        body = json.dumps(
            {
                "client_id": config.client_id,
                "grant_type": "refresh_token",
                "refresh_token": current.refresh_token,
            }
        ).encode()
        outcome: OAuthTokens | RefreshError = RefreshError("the token endpoint did not answer")
        with trio.CancelScope(shield=True), trio.move_on_after(REFRESH_TIMEOUT_S):
            self.exchanges += 1
            try:
                outcome = await self._post_token(account, body, current)
            except RefreshError as error:
                outcome = error
            if isinstance(outcome, OAuthTokens):
                await trio.to_thread.run_sync(self._vault.save, account.name, outcome)
        if isinstance(outcome, RefreshError):
            self._failed(account, outcome)
            raise outcome
        state.tokens = outcome
        state.refreshes += 1
        state.last_refresh_error = None
        state.backoff_s = 0.0
        state.retry_at = 0.0
        if state.out_reason is not None:  # forced after a new import: the login works again
            state.out_reason = None
            self._health.enable(account)
        event(
            "account_token_refreshed",
            "account %s: access token refreshed (valid until %s)",
            account.name, _when(outcome.expires_at),
            account=account.name, expires_at=outcome.expires_at,
        )
        return outcome

    async def _post_token(
        self, account: Account, body: bytes, current: OAuthTokens
    ) -> OAuthTokens:
        url = account.config.token_url or ""
        headers = [("content-type", "application/json"), ("accept", "application/json")]
        try:
            response = await self._upstream.pool.post(
                url, headers, body, self._upstream.route(account.name)
            )
            try:
                answer = await response.aread()
            finally:
                await response.aclose()
        except TransportError as error:
            log.warning("account %s: token endpoint unreachable: %s", account.name, error)
            raise RefreshError("the token endpoint is unreachable") from None
        if response.status_code >= 300:
            permanent, code = refresh_failure(response.status_code, answer)
            raise RefreshError(code, permanent=permanent)
        try:
            payload = json.loads(answer)
        except (ValueError, RecursionError):
            payload = None
        access = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(access, str) or not access:
            raise RefreshError("the token endpoint answered without an access_token")
        refresh = payload.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            refresh = current.refresh_token  # no new one: the old one stays valid (no rotation)
        id_token = payload.get("id_token")
        return OAuthTokens(
            access_token=access,
            refresh_token=refresh,
            id_token=id_token if isinstance(id_token, str) and id_token else current.id_token,
            account_id=current.account_id,
            last_refresh=time.time(),
        )

    def _failed(self, account: Account, error: RefreshError) -> None:
        state = account.oauth
        assert state is not None
        state.refresh_failures += 1
        state.last_refresh_error = error.reason
        if error.permanent:
            state.out_reason = f"refresh failed: {error.reason} (import a new auth.json)"
            self._health.take_out(account, state.out_reason)
            return
        state.backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, state.backoff_s * 2))
        state.retry_at = trio.current_time() + state.backoff_s
        log.warning(
            "account %s: token refresh failed (%s); next attempt in %gs, the current access "
            "token serves until %s", account.name, error.reason, state.backoff_s,
            _when(state.tokens.expires_at if state.tokens else None),
        )

    def enabled(self, account: Account) -> None:
        """The operator put the account back in service: a dead refresh token is forgotten
        (a new auth.json was imported) and the next request re-reads the ledger."""
        if account.oauth is not None:
            account.oauth.out_reason = None
            account.oauth.retry_at = 0.0
            account.oauth.reloaded_at = -RELOAD_S
            account.oauth.tokens = None


def _account_headers(
    tokens: OAuthTokens, client_headers: Mapping[str, str], session: str | None
) -> dict[str, str]:
    headers = {
        "authorization": f"Bearer {tokens.access_token}",
        "chatgpt-account-id": tokens.account_id,
        "originator": ORIGINATOR,  # the client's own, when it sent one, is forwarded over it
    }
    if session and not any(
        name in client_headers for name in ("session-id", "session_id", "conversation_id")
    ):
        headers["session_id"] = session
    return headers


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))
