"""The simulated upstream's ChatGPT-backend mode: ``POST /backend-api/codex/responses`` (what
``codex-chatgpt`` accounts call) and OpenAI's OAuth token endpoint ``POST /oauth/token``.

What it models, and from where (docs/chatgpt-accounts.md has the full list):

* **Logins** (``POST /_sim/chatgpt/login {"account_id", "plan", "lifetime_s"}``) answer a Codex
  ``auth.json``: ``tokens.{id_token, access_token, refresh_token, account_id}`` and
  ``last_refresh``, the shape codex-rs ``login`` writes. Access tokens are JWTs (unsigned here:
  the relay reads, never verifies them) with ``exp`` and the ``https://api.openai.com/auth``
  claim holding ``chatgpt_account_id`` and ``chatgpt_plan_type``.
* **The token endpoint** takes OAuth's refresh grant as codex-rs sends it (JSON ``client_id``,
  ``grant_type: "refresh_token"``, ``refresh_token``) and answers new ``access_token``,
  ``refresh_token``, ``id_token``. Refresh tokens **rotate**: a spent one answers 401
  ``refresh_token_reused`` (a permanent failure for codex-rs, protocols.md §2.10), and its whole
  family is revoked then (reuse detection); an unknown one
  ``refresh_token_invalidated``; ``/_sim/chatgpt {"token_endpoint": "down"}`` makes it answer
  503, ``"expire"`` makes every refresh token ``refresh_token_expired``.
* **The backend** refuses an expired or unknown access token with 401, a
  ``chatgpt-account-id`` that is not the token's with 403; a body that is not ``stream: true``,
  ``store: false`` with a string ``instructions``, or that carries a field the backend does not
  take (CLIProxyAPI's list), with 400 ``{"detail": "…"}``. ``expire_after`` / ``limit_after``
  (``{ACCOUNT: N}``) end the account's access tokens, or reach its usage limit, after N more
  answers: a session's token expiring, or its plan running out, between two of its requests.
  It streams like the Responses API (the simulated upstream's usual plans and directives)
  with the usage-window headers
  ``x-codex-{primary,secondary}-{used-percent,window-minutes,reset-at}`` (codex-api
  ``rate_limits.rs``); each answer adds ``usage_step`` percent to the primary window. At 100%
  (or ``/_sim/chatgpt {"limit": {ACCOUNT: SECONDS}}``) it answers 429 ``usage_limit_reached``
  with ``resets_at`` and ``resets_in_seconds``. ``empty_completed_output`` sends
  ``response.completed`` with an empty ``output``, as the backend does at times
  (CLIProxyAPI's codex executor rebuilds it from ``output_item.done``).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

#: Fields of the public Responses API the backend refuses (CLIProxyAPI's codex executor
#: deletes each one before sending).
UNSUPPORTED_FIELDS = (
    "max_output_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "truncation",
    "user",
    "safety_identifier",
    "previous_response_id",
    "prompt_cache_retention",
    "stream_options",
)

PRIMARY_WINDOW_MINUTES = 300  # the 5-hour window
SECONDARY_WINDOW_MINUTES = 10080  # the weekly window


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def make_jwt(claims: dict) -> str:
    """An unsigned-looking JWT (the signature is random: nobody here verifies it)."""
    return f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.{secrets.token_urlsafe(16)}"


@dataclass
class _Account:
    account_id: str
    plan: str = "plus"
    lifetime_s: float = 3600.0
    primary: float = 0.0
    secondary: float = 0.0
    limited_until: float = 0.0
    #: After this many more answers: every access token expires / the usage limit is reached.
    expire_after: int | None = None
    limit_after: int | None = None


@dataclass
class ChatGPTBackend:
    """The backend's and the token endpoint's state (one per simulated upstream)."""

    accounts: dict[str, _Account] = field(default_factory=dict)
    #: access token → (account id, exp)
    access: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: refresh token → (account id, family, spent)
    refresh: dict[str, list] = field(default_factory=dict)
    revoked_families: set[str] = field(default_factory=set)
    token_endpoint: str | None = None  # None (up), "down" (503), "expire", "slow"
    token_delay_s: float = 0.0
    usage_step: float = 0.0
    empty_completed_output: bool = False
    refresh_calls: int = 0
    refresh_ok: int = 0
    refresh_reused: int = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def stats(self) -> dict:
        return {
            "refresh_calls": self.refresh_calls,
            "refresh_ok": self.refresh_ok,
            "refresh_reused": self.refresh_reused,
            "accounts": {
                name: {"primary": a.primary, "secondary": a.secondary,
                       "limited_until": a.limited_until}
                for name, a in self.accounts.items()
            },
        }

    # -- steering ------------------------------------------------------------------------

    def login(self, account_id: str, plan: str = "plus", lifetime_s: float = 3600.0) -> dict:
        """A new login for ``account_id``: the auth.json ``codex login`` would write."""
        account = self.accounts.setdefault(account_id, _Account(account_id))
        account.plan, account.lifetime_s = plan, lifetime_s
        tokens = self._issue(account, family=secrets.token_hex(8))
        return {
            "OPENAI_API_KEY": None,
            "tokens": {**tokens, "account_id": account_id},
            "last_refresh": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def configure(self, changes: dict) -> str | None:
        """``POST /_sim/chatgpt``: an error message, or None when applied."""
        for key, value in changes.items():
            if key == "token_endpoint":
                self.token_endpoint = value
            elif key == "token_delay_s":
                self.token_delay_s = float(value)
            elif key == "usage_step":
                self.usage_step = float(value)
            elif key == "empty_completed_output":
                self.empty_completed_output = bool(value)
            elif key == "lifetime_s":  # of the tokens refreshes issue, per account
                for account_id, seconds in value.items():
                    self.accounts.setdefault(account_id, _Account(account_id)).lifetime_s = (
                        float(seconds)
                    )
            elif key == "usage":  # {account: {"primary": %, "secondary": %}}
                for account_id, windows in value.items():
                    account = self.accounts.setdefault(account_id, _Account(account_id))
                    account.primary = float(windows.get("primary", account.primary))
                    account.secondary = float(windows.get("secondary", account.secondary))
            elif key == "limit":  # {account: seconds until the reset, or null: lifted}
                for account_id, seconds in value.items():
                    account = self.accounts.setdefault(account_id, _Account(account_id))
                    account.limited_until = time.time() + seconds if seconds else 0.0
                    if not seconds and account.primary >= 100:
                        account.primary = 0.0
            elif key in ("expire_after", "limit_after"):  # {account: answers, or null}
                for account_id, count in value.items():
                    setattr(self.accounts.setdefault(account_id, _Account(account_id)), key,
                            count)
            elif key == "expire_access":  # every access token of these accounts ends now
                for token, (account_id, _exp) in list(self.access.items()):
                    if account_id in value:
                        self.access[token] = (account_id, time.time() - 1)
            else:
                return f"Unknown chatgpt setting: {key}."
        return None

    def _issue(self, account: _Account, family: str) -> dict:
        exp = time.time() + account.lifetime_s
        auth = {"chatgpt_account_id": account.account_id, "chatgpt_plan_type": account.plan}
        access = make_jwt(
            {"exp": int(exp) if account.lifetime_s >= 1 else exp,
             "https://api.openai.com/auth": auth, "jti": secrets.token_hex(8)}
        )
        id_token = make_jwt(
            {"exp": int(exp), "email": f"{account.account_id}@example.com",
             "https://api.openai.com/auth": auth}
        )
        refresh = "rt_" + secrets.token_urlsafe(24)
        self.access[access] = (account.account_id, exp)
        self.refresh[refresh] = [account.account_id, family, False]
        return {"id_token": id_token, "access_token": access, "refresh_token": refresh}

    # -- the token endpoint ----------------------------------------------------------------

    def token(self, body: object) -> tuple[int, bytes]:
        """``POST /oauth/token``: (status, JSON body)."""
        self.refresh_calls += 1
        if self.token_endpoint == "down":
            return 503, _json({"error": {"message": "upstream connect error", "code": None}})
        if not isinstance(body, dict) or body.get("grant_type") != "refresh_token":
            return 400, _json({"error": "unsupported_grant_type",
                               "error_description": "grant_type must be refresh_token"})
        if not body.get("client_id"):
            return 400, _json({"error": "invalid_request",
                               "error_description": "client_id is required"})
        entry = self.refresh.get(body.get("refresh_token") or "")
        if entry is None:
            return 401, _refresh_error("refresh_token_invalidated",
                                       "Your refresh token has been invalidated.")
        account_id, family, spent = entry
        if spent or family in self.revoked_families:
            self.refresh_reused += 1
            self.revoked_families.add(family)  # reuse detection: the whole family is dead
            return 401, _refresh_error("refresh_token_reused",
                                       "Your refresh token has already been used to generate "
                                       "a new access token. Please try signing in again.")
        if self.token_endpoint == "expire":
            return 401, _refresh_error("refresh_token_expired",
                                       "Your refresh token has expired.")
        entry[2] = True
        self.refresh_ok += 1
        tokens = self._issue(self.accounts[account_id], family)
        return 200, _json({**tokens, "token_type": "Bearer", "expires_in": 3600,
                           "scope": "openid profile email"})

    # -- the backend -----------------------------------------------------------------------

    def check(self, headers: dict[str, str], body: object) -> tuple[int, bytes, list] | None:
        """What the backend refuses before answering: (status, body, headers), or None."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        found = self.access.get(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            return 401, _json({"error": {
                "message": "Could not parse your authentication token. Please try signing "
                "in again.", "type": "invalid_request_error", "code": "invalid_jwt"}}), []
        account_id, exp = found
        if exp <= time.time():
            return 401, _json({"error": {
                "message": "Provided authentication token is expired. Please try signing in "
                "again.", "type": "invalid_request_error", "code": "token_expired"}}), []
        if headers.get("chatgpt-account-id") != account_id:
            return 403, _json({"detail": "chatgpt-account-id does not match the token"}), []
        if not isinstance(body, dict):
            return 400, _json({"detail": "The request body must be a JSON object."}), []
        if body.get("stream") is not True:
            return 400, _json({"detail": "Stream must be set to true"}), []
        if body.get("store") is not False:
            return 400, _json({"detail": "Store must be set to false"}), []
        if not isinstance(body.get("instructions"), str):
            return 400, _json({"detail": "Instructions are required"}), []
        for name in UNSUPPORTED_FIELDS:
            if name in body:
                return 400, _json({"detail": f"Unsupported parameter: {name}"}), []
        account = self.accounts[account_id]
        now = time.time()
        if account.primary >= 100 and not account.limited_until:
            account.limited_until = now + 3600
        if account.limited_until > now:
            resets_at = int(account.limited_until)
            error = {"error": {
                "type": "usage_limit_reached",
                "message": "The usage limit has been reached",
                "plan_type": account.plan,
                "resets_at": resets_at,
                "resets_in_seconds": max(0, resets_at - int(now)),
            }}
            usage = self.usage_headers(account_id, primary=100.0)
            return 429, _json(error), usage
        return None

    def answered(self, headers: dict[str, str]) -> list[tuple[str, str]]:
        """The usage headers of a 200 answer (and the window it uses up)."""
        token = headers.get("authorization", "").partition(" ")[2]
        account_id, _ = self.access[token.strip()]
        account = self.accounts[account_id]
        account.primary = min(100.0, account.primary + self.usage_step)
        if account.expire_after is not None:
            account.expire_after -= 1
            if account.expire_after <= 0:
                account.expire_after = None
                self.configure({"expire_access": [account_id]})
        if account.limit_after is not None:
            account.limit_after -= 1
            if account.limit_after <= 0:
                account.limit_after = None
                account.limited_until = time.time() + 3600
        return self.usage_headers(account_id)

    def usage_headers(self, account_id: str, primary: float | None = None) -> list:
        account = self.accounts[account_id]
        now = int(time.time())
        used = account.primary if primary is None else primary
        primary_reset = int(account.limited_until) if account.limited_until > now else now + 3600
        return [
            ("x-codex-primary-used-percent", f"{used:g}"),
            ("x-codex-primary-window-minutes", str(PRIMARY_WINDOW_MINUTES)),
            ("x-codex-primary-reset-at", str(primary_reset)),
            ("x-codex-secondary-used-percent", f"{account.secondary:g}"),
            ("x-codex-secondary-window-minutes", str(SECONDARY_WINDOW_MINUTES)),
            ("x-codex-secondary-reset-at", str(now + 5 * 86400)),
            ("x-codex-credits-has-credits", "false"),
            ("x-codex-credits-unlimited", "false"),
        ]


def empty_completed(events: Iterable[tuple[bytes, bool]]) -> Iterator[tuple[bytes, bool]]:
    """A Responses stream whose ``response.completed`` carries ``output: []``."""
    for data, is_token in events:
        if b'"response.completed"' in data:
            payload = json.loads(data.split(b"data: ", 1)[1]) if b"data: " in data else None
            if isinstance(payload, dict) and isinstance(payload.get("response"), dict):
                payload["response"]["output"] = []
                data = b"event: response.completed\ndata: %b\n\n" % json.dumps(payload).encode()
        yield data, is_token


def _json(payload: object) -> bytes:
    return json.dumps(payload).encode()


def _refresh_error(code: str, message: str) -> bytes:
    return _json({"error": {"message": message, "type": "invalid_request_error",
                            "param": None, "code": code}})
