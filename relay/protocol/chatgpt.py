"""The ChatGPT backend's side of the Responses protocol (``codex-chatgpt`` accounts): pure
functions over dicts and bytes, no I/O.

What the backend (``https://chatgpt.com/backend-api/codex``) is known to require and send, from
the Codex CLI's source (codex-rs ``login`` auth manager, ``codex-api`` ``rate_limits.rs``) and
CLIProxyAPI's codex executor (docs/chatgpt-accounts.md lists the sources):

* the body: ``stream: true`` and ``store: false`` always (the backend serves SSE only and keeps
  nothing), ``instructions`` present (a string, empty allowed), ``include`` asking for the
  reasoning's encrypted content (the only way to replay reasoning without ``store``); fields the
  public API has and the backend refuses are dropped (:data:`DROPPED_FIELDS`), a string
  ``input`` becomes one user message and ``role: system`` input messages become ``developer``
  (:func:`backend_body`);
* the answer: ``response.completed`` may carry an empty ``output`` while the items arrived as
  ``response.output_item.done`` events, so a collected answer rebuilds it from those
  (:func:`collect_stream`);
* the account's usage windows in headers of every answer, ``x-codex-primary-*`` and
  ``x-codex-secondary-*`` (:func:`usage_windows`);
* OAuth: access tokens are JWTs whose ``exp`` says when they end, and whose
  ``https://api.openai.com/auth`` claim names the ChatGPT account (:func:`jwt_claims`); a
  Codex ``auth.json`` holds them (:func:`read_codex_auth`); a refresh's permanent failures are
  ``refresh_token_expired``, ``refresh_token_reused`` and ``refresh_token_invalidated``
  (:func:`refresh_failure`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidRequest
from .sse import EventSplitter, event_data

__all__ = [
    "DROPPED_FIELDS",
    "PERMANENT_REFRESH_ERRORS",
    "OAuthTokens",
    "UsageWindow",
    "backend_body",
    "collect_stream",
    "jwt_claims",
    "read_codex_auth",
    "refresh_failure",
    "usage_windows",
]

#: Request fields of the public Responses API the ChatGPT backend refuses (CLIProxyAPI removes
#: each one; a ``previous_response_id`` naming a response is refused before, by
#: :func:`backend_body`: with ``store: false`` there is nothing to continue).
DROPPED_FIELDS = (
    "max_output_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "truncation",
    "prompt_cache_retention",
    "prompt_cache_options",
    "user",
    "safety_identifier",
    "stream_options",
    "previous_response_id",
    "generate",
    "context_management",
    "background",
    "metadata",
)

#: The refresh errors after which the refresh token can never work again: the account needs a
#: new login (a spent refresh token answers ``refresh_token_reused``: tokens rotate).
PERMANENT_REFRESH_ERRORS = (
    "refresh_token_expired",
    "refresh_token_reused",
    "refresh_token_invalidated",
)

_AUTH_CLAIM = "https://api.openai.com/auth"


@dataclass
class OAuthTokens:
    """One ChatGPT login's tokens (secrets: never logged, shown or put in an error)."""

    access_token: str
    refresh_token: str
    id_token: str = ""
    account_id: str = ""
    #: When these tokens were obtained (unix seconds): the import's ``last_refresh`` or the
    #: relay's last refresh.
    last_refresh: float = 0.0

    @property
    def expires_at(self) -> float | None:
        """The access token's ``exp`` (unix seconds), None when it carries none."""
        exp = jwt_claims(self.access_token).get("exp")
        return float(exp) if isinstance(exp, int | float) and math.isfinite(exp) else None

    @property
    def plan_type(self) -> str | None:
        for token in (self.id_token, self.access_token):
            plan = jwt_claims(token).get(_AUTH_CLAIM, {}).get("chatgpt_plan_type")
            if isinstance(plan, str):
                return plan
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> OAuthTokens:
        data = json.loads(text)
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    def __repr__(self) -> str:  # a token must not reach a log through a repr
        return f"OAuthTokens(account_id={self.account_id!r}, expires_at={self.expires_at})"


def jwt_claims(token: str) -> dict:
    """The claims of a JWT, read without checking its signature (the relay is not the token's
    audience: the backend checks it). ``{}`` for anything that is not a JWT."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _account_id_of(*tokens: str) -> str:
    for token in tokens:
        auth = jwt_claims(token).get(_AUTH_CLAIM)
        if isinstance(auth, dict) and isinstance(auth.get("chatgpt_account_id"), str):
            return auth["chatgpt_account_id"]
    return ""


def read_codex_auth(data: object) -> OAuthTokens:
    """The tokens of a Codex ``auth.json`` (already parsed), or ``ValueError`` saying what is
    wrong with it, in words an operator can act on (no token is quoted)."""
    if not isinstance(data, dict):
        raise ValueError("it is not a JSON object (a Codex auth.json is one)")
    tokens = data.get("tokens")
    if not isinstance(tokens, dict):
        if data.get("OPENAI_API_KEY"):
            raise ValueError(
                "it holds an API key login, not a ChatGPT login (no \"tokens\"); use an "
                "openai-responses account with api_key_env for an API key, or run `codex login` "
                "with a ChatGPT account and import its auth.json"
            )
        raise ValueError(
            "it has no \"tokens\" object; run `codex login` with a ChatGPT account and import "
            "the auth.json it writes (~/.codex/auth.json)"
        )
    missing = [
        name for name in ("access_token", "refresh_token")
        if not isinstance(tokens.get(name), str) or not tokens.get(name)
    ]
    if missing:
        raise ValueError(
            f"its \"tokens\" lack {' and '.join(missing)}; run `codex login` again and import "
            "the new auth.json"
        )
    access, id_token = tokens["access_token"], tokens.get("id_token")
    id_token = id_token if isinstance(id_token, str) else ""
    account_id = tokens.get("account_id")
    if not isinstance(account_id, str) or not account_id:
        account_id = _account_id_of(id_token, access)
    if not account_id:
        raise ValueError(
            "it names no ChatGPT account (no tokens.account_id, and the tokens carry no "
            "chatgpt_account_id); run `codex login` again and import the new auth.json"
        )
    result = OAuthTokens(
        access_token=access,
        refresh_token=tokens["refresh_token"],
        id_token=id_token,
        account_id=account_id,
        last_refresh=_timestamp(data.get("last_refresh")),
    )
    if result.expires_at is None:
        raise ValueError(
            "its access_token is not a JWT with an expiry (exp); it is not a ChatGPT login's "
            "token"
        )
    return result


def _timestamp(value: object) -> float:
    """``last_refresh`` as Codex writes it (RFC 3339), or 0."""
    if not isinstance(value, str):
        return 0.0
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def refresh_failure(status: int, body: bytes) -> tuple[bool, str]:
    """Whether a failed refresh is permanent, and its code (``refresh_token_reused``,
    ``http_503``…). OpenAI's token endpoint answers ``{"error": {"code": …}}`` or OAuth's
    ``{"error": "invalid_grant", "error_description": …}``."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    code = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
        elif isinstance(error, str):
            code = error
        if code is None and isinstance(payload.get("code"), str):
            code = payload["code"]
    code = code if isinstance(code, str) and code else f"http_{status}"
    permanent = code in PERMANENT_REFRESH_ERRORS or (status in (400, 401) and code in (
        "invalid_grant", "invalid_request", "unauthorized_client", "invalid_client"
    ))
    return permanent, code


def backend_body(body: dict) -> dict:
    """A Responses request body as the ChatGPT backend takes it (see the module's notes).

    Raises :class:`~relay.errors.InvalidRequest` for a ``previous_response_id``: the backend
    keeps nothing (``store: false``), so the conversation it names cannot be continued there
    (a Responses WebSocket's own continuation is expanded before this)."""
    if body.get("previous_response_id"):
        raise InvalidRequest(
            "'previous_response_id' is not supported for this model: its upstream (a ChatGPT "
            "plan) keeps no server-side state. Send the full conversation in 'input' (with "
            "store=false).",
            param="previous_response_id",
        )
    out = {key: value for key, value in body.items() if key not in DROPPED_FIELDS}
    out["stream"] = True
    out["store"] = False
    if not isinstance(out.get("instructions"), str):
        out["instructions"] = ""
    include = out.get("include")
    include = list(include) if isinstance(include, list) else []
    if "reasoning.encrypted_content" not in include:
        include.append("reasoning.encrypted_content")
    out["include"] = include
    if out.get("service_tier") not in (None, "priority"):
        del out["service_tier"]
    items = out.get("input")
    if isinstance(items, str):
        out["input"] = [
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": items}]}
        ]
    elif isinstance(items, list):
        out["input"] = [
            {**item, "role": "developer"}
            if isinstance(item, dict) and item.get("role") == "system" else item
            for item in items
        ]
    return out


@dataclass
class UsageWindow:
    """One of the account's usage windows, as the backend last reported it."""

    used_percent: float
    window_minutes: int | None = None
    resets_at: float | None = None  # unix seconds

    def public(self) -> dict:
        return asdict(self)


def usage_windows(headers: Mapping[str, str], now: float) -> dict[str, UsageWindow]:
    """The windows an answer's ``x-codex-{primary,secondary}-*`` headers report (``now``, unix
    seconds, turns the older ``reset-after-seconds`` into a time). Empty when it has none."""
    lowered = {key.lower(): value for key, value in headers.items()}
    windows = {}
    for name in ("primary", "secondary"):
        used = _number(lowered.get(f"x-codex-{name}-used-percent"))
        if used is None:
            continue
        minutes = _number(lowered.get(f"x-codex-{name}-window-minutes"))
        resets_at = _number(lowered.get(f"x-codex-{name}-reset-at"))
        if resets_at is None:
            after = _number(lowered.get(f"x-codex-{name}-reset-after-seconds"))
            resets_at = now + after if after is not None else None
        windows[name] = UsageWindow(
            used_percent=used,
            window_minutes=int(minutes) if minutes is not None else None,
            resets_at=resets_at,
        )
    return windows


def window_headers(windows: Mapping[str, UsageWindow]) -> list[tuple[bytes, bytes]]:
    """The windows as the backend's own ``x-codex-{primary,secondary}-*`` headers: what the
    relay passes on to its client (the Codex CLI shows them as its usage limits)."""
    headers = []
    for name in ("primary", "secondary"):
        window = windows.get(name)
        if window is None:
            continue
        prefix = f"x-codex-{name}-".encode()
        headers.append((prefix + b"used-percent", f"{window.used_percent:g}".encode()))
        if window.window_minutes is not None:
            headers.append((prefix + b"window-minutes", b"%d" % window.window_minutes))
        if window.resets_at is not None:
            headers.append((prefix + b"reset-at", b"%d" % int(window.resets_at)))
    return headers


def rate_limits_event(headers: Mapping[str, str]) -> dict | None:
    """Those headers as the ``codex.rate_limits`` event a Responses WebSocket carries (Codex
    reads the same windows from it), or None when they hold no window."""
    windows = usage_windows(headers, 0.0)
    if not windows:
        return None
    return {
        "type": "codex.rate_limits",
        "rate_limits": {
            name: {
                "used_percent": window.used_percent,
                "window_minutes": window.window_minutes,
                "reset_at": None if window.resets_at is None else int(window.resets_at),
            }
            for name, window in windows.items()
        },
    }


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def collect_stream(body: bytes) -> tuple[dict | None, dict | None]:
    """A whole SSE answer as ``(response, error)``: the terminal event's Response object, its
    ``output`` rebuilt from ``response.output_item.done`` events (by ``output_index``) when it
    came empty; or the error of a ``response.failed`` (or ``error``) event; ``(None, None)``
    when the stream ended without either."""
    items: dict[int, Any] = {}
    splitter = EventSplitter(max_event_bytes=max(len(body) + 16, 1024))
    for event in [*splitter.feed(body), *splitter.end()]:
        data = event_data(event)
        if not data or data == b"[DONE]":
            continue
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            continue
        if not isinstance(payload, dict):
            continue
        kind = payload.get("type")
        if kind == "response.output_item.done" and isinstance(payload.get("item"), dict):
            index = payload.get("output_index")
            items[index if isinstance(index, int) else len(items)] = payload["item"]
        elif kind in ("response.completed", "response.incomplete"):
            response = payload.get("response")
            if not isinstance(response, dict):
                return None, None
            if not response.get("output") and items:
                response = {**response, "output": [items[key] for key in sorted(items)]}
            return response, None
        elif kind == "response.failed":
            response = payload.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            return None, error if isinstance(error, dict) else {"message": "response.failed"}
        elif kind == "error":
            error = payload.get("error", payload)
            return None, error if isinstance(error, dict) else {"message": str(error)}
    return None, None
