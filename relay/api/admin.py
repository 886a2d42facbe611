"""The admin API under ``/admin``: keys, credits, accounts and live queues.

Every route takes ``Authorization: Bearer TOKEN`` where TOKEN is the value of the environment
variable named by ``server.admin_token_env``; with that variable unset the admin API answers
404 ``admin_disabled`` to everyone. Keys are named by their id (``key_…``) in URLs, never by the
key itself: a URL ends up in logs and histories.

| Route | What |
|---|---|
| ``GET /admin/state`` | live guard state (as the leak tests read it) |
| ``GET /admin/keys`` | every key with its live credits and all-time usage |
| ``POST /admin/keys`` | ``{"package", "name"?, "credits"?, "limits"?, "expires_in"? or
  "expires_at"?}`` → 201, with the key |
| ``GET /admin/keys/{id}`` | one key, with its grants |
| ``POST /admin/keys/{id}/topup`` | ``{"credits": N, "note"?}`` (negative takes credits back) |
| ``POST /admin/keys/{id}/limits`` | ``{"tpm": N, …}`` (null drops an override; ``"clear"``) |
| ``POST /admin/keys/{id}/expiry`` | ``{"expires_in": "30d"}``, ``{"expires_at": T}`` or
  ``{"expires_at": null}`` (never) |
| ``POST /admin/keys/{id}/rotate`` | ``{"grace"?: "24h"}`` → the key's new secret (shown once) |
| ``POST /admin/keys/{id}/revoke``, ``DELETE /admin/keys/{id}`` | revoke |
| ``GET /admin/accounts`` | health, cool-downs, in-flight and failures per account |
| ``POST /admin/accounts/{name}/enable`` / ``…/disable`` | put in / take out of service |
| ``POST /admin/accounts/{name}/refresh`` | refresh a codex-chatgpt account's tokens now |
| ``GET /admin/queues`` | per pool: depth, oldest wait, in-flight, and the keys waiting |

Changes made here take effect at once in this process: the key ring is given the changed
record (this process's own writes do not wake its refresher).
"""

from __future__ import annotations

import hmac
import math
import os
import time
from typing import TYPE_CHECKING, Any

import trio

from ..errors import AuthenticationFailed, InvalidRequest, NotFound, UpstreamError
from ..guards.admission import KeyLimits
from ..ledger.expiry import expiry, parse_duration
from ..ledger.prices import parse_credits, to_credits
from ..ledger.store import KeyRecord
from ..protocol.requests import decode_json_body
from ..upstream.chatgpt import RefreshError
from .http import Request, Responder

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..runtime import Runtime
    from ..upstream.routing import Account

#: Admin request bodies are small JSON objects.
MAX_ADMIN_BODY = 64 * 1024

#: A key's own limits (they override its package's) and the type of each.
LIMIT_TYPES: dict[str, type] = {
    "tpm": int,
    "rpm": int,
    "max_concurrency": int,
    "max_queue": int,
    "queue_timeout_s": float,
    "weight": float,
}


def check_admin(runtime: Runtime, request: Request) -> None:
    """404 when the admin API is disabled, 401 unless the request carries the admin token."""
    env_name = runtime.config.server.admin_token_env
    token = os.environ.get(env_name)
    if not token:
        raise NotFound(
            f"The admin API is disabled: set the environment variable {env_name} to enable it.",
            code="admin_disabled",
        )
    offered = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(offered.encode(), token.encode()):
        raise AuthenticationFailed(
            "The admin token is missing or wrong.", code="invalid_admin_token"
        )


async def _body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The JSON object the request carries (``{}`` for no body at all, when ``optional``)."""
    request.require_json()
    raw = await request.read_body(MAX_ADMIN_BODY)
    if optional and not raw.strip():
        return {}
    return decode_json_body(raw)


def validate_limits(changes: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``current`` with ``changes`` applied (a None value drops that override); 400 naming the
    field when a name is unknown or a value is not a positive number (``max_queue`` may be 0)."""
    limits = dict(current)
    for name, value in changes.items():
        kind = LIMIT_TYPES.get(name)
        if kind is None:
            raise InvalidRequest(
                f"Unknown limit '{name}'; a key's limits are {', '.join(LIMIT_TYPES)}.",
                param=name,
            )
        if value is None:
            limits.pop(name, None)
            continue
        number_ok = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int:
            number_ok = number_ok and float(value).is_integer()
        low_ok = number_ok and math.isfinite(value) and (
            value >= 0 if name == "max_queue" else value > 0
        )
        if not low_ok:
            what = (
                "a non-negative integer" if name == "max_queue" else f"a positive {kind.__name__}"
            )
            raise InvalidRequest(f"'{name}' must be {what}, got {value!r}.", param=name)
        limits[name] = kind(value)
    return limits


def _credits(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidRequest(f"'{param}' must be a number of credits.", param=param)
    try:
        return parse_credits(value)
    except ValueError as error:
        raise InvalidRequest(f"'{param}': {error}.", param=param) from None


def key_view(runtime: Runtime, record: KeyRecord, usage: dict | None = None) -> dict:
    """A key as the admin sees it: no hash, live credits, all-time usage."""
    view = record.public()
    del view["credits_granted"], view["credits_used"]  # the stored values; live ones below
    view["credits"] = runtime.credits.balance(record).as_credits()
    usage = usage or {}
    view["usage"] = {
        "calls": usage.get("calls", 0),
        "errors": usage.get("errors", 0),
        "input_tokens": usage.get("input_tokens", 0),
        "cached_tokens": usage.get("cached_tokens", 0),
        "cache_write_tokens": usage.get("cache_write_tokens", 0),
        "output_tokens": usage.get("output_tokens", 0),
        "reasoning_tokens": usage.get("reasoning_tokens", 0),
        "credits": to_credits(usage.get("cost_nano", 0)),
        "last_used_at": usage.get("last_used_at"),
    }
    return view


async def _key_by_id(runtime: Runtime, request: Request) -> KeyRecord:
    key_id = request.params["key_id"]
    if not key_id.startswith("key_"):
        raise NotFound(
            "Name a key by its id (key_…) in admin URLs, never by the key itself: "
            "`relay keys list` or GET /admin/keys shows the ids.",
            code="key_not_found",
        )
    record = await trio.to_thread.run_sync(runtime.store.get_key, key_id)
    if record is None:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    return record


async def state(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    body = runtime.state()
    shared = runtime.admission.shared
    if shared is not None:
        subjects = (
            ["g"]
            + [f"p:{name}" for name in runtime.admission.pools]
            + [f"k:{key_id}" for key_id in runtime.admission.keys]
            + [f"a:{name}" for name in runtime.scheduler.by_name]
        )
        body["admission"]["shared"] = await shared.status(subjects)
    await responder.json(200, body)


async def list_keys(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    records = await trio.to_thread.run_sync(runtime.store.list_keys)
    usage = await trio.to_thread.run_sync(runtime.store.usage_by_key)
    data = [key_view(runtime, record, usage.get(record.id)) for record in records]
    await responder.json(200, {"object": "list", "data": data})


async def create_key(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    body = await _body(request)
    unknown = set(body) - {"package", "name", "credits", "limits", "expires_in", "expires_at"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(
            f"Unknown field '{name}'; a new key takes package, name, credits, limits, "
            "expires_in and expires_at.",
            param=name,
        )
    package_name = body.get("package")
    package = runtime.config.packages.get(package_name) if isinstance(package_name, str) else None
    if package is None:
        known = ", ".join(sorted(runtime.config.packages)) or "none"
        raise InvalidRequest(
            f"'package' must name a package of the configuration ({known}).", param="package"
        )
    name = body.get("name", "")
    if not isinstance(name, str):
        raise InvalidRequest("'name' must be a string.", param="name")
    credits = (
        _credits(body["credits"], "credits")
        if body.get("credits") is not None
        else parse_credits(package.initial_credits)
    )
    limits_body = body.get("limits") or {}
    if not isinstance(limits_body, dict):
        raise InvalidRequest("'limits' must be an object.", param="limits")
    limits = validate_limits(limits_body, {})
    expires_at = _expiry(body)
    plaintext, record = await trio.to_thread.run_sync(
        lambda: runtime.store.create_key(
            package.name, prefix=package.key_prefix, name=name, limits=limits,
            credits_nano=credits, expires_at=expires_at,
        )
    )
    runtime.keys.update(record)
    await responder.json(201, {"key": plaintext, **key_view(runtime, record)})


async def get_key(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    record = await _key_by_id(runtime, request)
    usage = await trio.to_thread.run_sync(runtime.store.usage_by_key)
    grants = await trio.to_thread.run_sync(runtime.store.grants, record.id)
    view = key_view(runtime, record, usage.get(record.id))
    view["grants"] = [
        {"ts": g["ts"], "credits": to_credits(g["amount_nano"]), "note": g["note"]}
        for g in grants
    ]
    await responder.json(200, view)


async def top_up(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    record = await _key_by_id(runtime, request)
    body = await _body(request)
    amount = _credits(body.get("credits"), "credits")
    if amount == 0:
        raise InvalidRequest("'credits' must not be zero.", param="credits")
    note = body.get("note", "")
    if not isinstance(note, str):
        raise InvalidRequest("'note' must be a string.", param="note")
    record = await trio.to_thread.run_sync(runtime.store.top_up, record.id, amount, note)
    runtime.keys.update(record)
    await responder.json(200, key_view(runtime, record))


async def set_limits(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    record = await _key_by_id(runtime, request)
    body = await _body(request)
    clear = body.pop("clear", False)
    if not isinstance(clear, bool):
        raise InvalidRequest("'clear' must be true or false.", param="clear")
    limits = validate_limits(body, {} if clear else record.limits)
    record = await trio.to_thread.run_sync(runtime.store.set_limits, record.id, limits)
    runtime.keys.update(record)
    package = runtime.config.packages.get(record.package)
    if package is not None:
        # At once, not at the key's next request: a raised cap lets its queue go now.
        runtime.admission.set_key_limits(
            record.id, KeyLimits.of(package, record.limits), trio.current_time()
        )
    await responder.json(200, key_view(runtime, record))


def _expiry(body: dict[str, Any]) -> float | None:
    """The moment ``expires_in`` (``"30d"``, or seconds) or ``expires_at`` (ISO 8601, or
    unix seconds) names, None for neither or a null; 400 naming the field otherwise."""
    expires_in, expires_at = body.get("expires_in"), body.get("expires_at")
    if expires_in is not None and expires_at is not None:
        raise InvalidRequest(
            "Give either 'expires_in' or 'expires_at', not both.", param="expires_at"
        )
    param = "expires_in" if expires_in is not None else "expires_at"
    value = body.get(param)
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
        raise InvalidRequest(f"'{param}' must be a string or a number.", param=param)
    try:
        return expiry(expires_in=expires_in, expires_at=expires_at, now=time.time())
    except ValueError as error:
        raise InvalidRequest(f"'{param}': {error}.", param=param) from None


async def set_expiry(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    record = await _key_by_id(runtime, request)
    body = await _body(request)
    unknown = set(body) - {"expires_in", "expires_at"}
    if unknown or not body:
        name = sorted(unknown)[0] if unknown else None
        raise InvalidRequest(
            "Set a key's expiry with 'expires_in' (\"30d\"), 'expires_at' (an ISO 8601 time) "
            "or 'expires_at': null (never).",
            param=name,
        )
    expires_at = _expiry(body)
    record = await trio.to_thread.run_sync(runtime.store.set_expiry, record.id, expires_at)
    runtime.keys.update(record)
    await responder.json(200, key_view(runtime, record))


async def rotate(runtime: Runtime, request: Request, responder: Responder) -> None:
    """A new secret for the key (shown once); the old one works for ``grace`` (default 0)."""
    check_admin(runtime, request)
    record = await _key_by_id(runtime, request)
    body = await _body(request, optional=True)
    unknown = set(body) - {"grace"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(f"Unknown field '{name}'; a rotation takes grace.", param=name)
    grace = body.get("grace", 0)
    if isinstance(grace, bool) or not isinstance(grace, str | int | float):
        raise InvalidRequest("'grace' must be a duration such as \"24h\".", param="grace")
    try:
        grace_s = parse_duration(grace, "grace")
    except ValueError as error:
        raise InvalidRequest(f"'grace': {error}.", param="grace") from None
    if not record.active:
        raise InvalidRequest(
            f"{record.id} is revoked: a revoked key cannot be rotated.", code="key_revoked"
        )
    plaintext, record = await trio.to_thread.run_sync(
        runtime.store.rotate_key, record.id, grace_s
    )
    runtime.keys.update(record)
    await responder.json(200, {"key": plaintext, **key_view(runtime, record)})


async def revoke(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    record = await _key_by_id(runtime, request)
    record = await trio.to_thread.run_sync(runtime.store.revoke_key, record.id)
    runtime.keys.update(record)
    await responder.json(200, key_view(runtime, record))


def _account_view(runtime: Runtime, name: str, status: dict) -> dict:
    account = runtime.scheduler.by_name[name]
    config = account.config
    failures = {
        str(code): count
        for (account_name, code), count in sorted(runtime.health.failures.items())
        if account_name == name
    }
    rest = account.guard.unavailable_until - trio.current_time()
    return {
        "name": name,
        "pool": config.pool,
        "provider": config.provider,
        "models": list(config.models),
        "priority": config.priority,
        "disabled": bool(status.get("disabled")),
        "last_error_at": account.last_error_at,
        "cooling_until": time.time() + rest if rest > 0 else None,
        "failures": failures,
        **status,
    }


async def list_accounts(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    status = runtime.scheduler.status()
    data = [_account_view(runtime, name, entry) for name, entry in status.items()]
    await responder.json(200, {"object": "list", "data": data})


def _account(runtime: Runtime, request: Request) -> Account:
    name = request.params["name"]
    account = runtime.scheduler.by_name.get(name)
    if account is None:
        known = ", ".join(runtime.scheduler.by_name) or "none"
        raise NotFound(f"No account named '{name}' (accounts: {known}).", code="account_not_found")
    return account


async def enable_account(runtime: Runtime, request: Request, responder: Responder) -> None:
    """Put an account back in service (after an upstream 401/403, or a disable); a ChatGPT-plan
    account re-reads its tokens from the ledger (a new auth.json may have been imported)."""

    def enable(account: Account) -> None:
        runtime.health.enable(account)
        if runtime.chatgpt is not None:
            runtime.chatgpt.enabled(account)

    await _set_service(runtime, request, responder, enable)


async def refresh_account(runtime: Runtime, request: Request, responder: Responder) -> None:
    """Refresh a ChatGPT-plan account's OAuth tokens now (``relay accounts refresh``)."""
    check_admin(runtime, request)
    account = _account(runtime, request)
    if account.oauth is None or runtime.chatgpt is None:
        raise InvalidRequest(
            f"The account '{account.name}' is a {account.config.provider} account; only "
            "codex-chatgpt accounts have tokens to refresh.",
            code="not_an_oauth_account",
        )
    try:
        await runtime.chatgpt.refresh(account, forced=True)
    except RefreshError as error:
        raise UpstreamError(
            f"The refresh of account '{account.name}' failed: {error.reason}"
            + (" (the login is dead: import a new auth.json)" if error.permanent else
               " (the token endpoint may be down; the relay retries with backoff)"),
            status=502,
            type="server_error",
            code="refresh_failed",
        ) from None
    view = _account_view(runtime, account.name, runtime.scheduler.status()[account.name])
    await responder.json(200, {"account": account.name, **view})


async def disable_account(runtime: Runtime, request: Request, responder: Responder) -> None:
    """Take an account out of service until it is enabled again (or the relay restarts)."""
    await _set_service(runtime, request, responder, runtime.health.disable)


async def _set_service(
    runtime: Runtime, request: Request, responder: Responder, change: Callable[[Account], None]
) -> None:
    check_admin(runtime, request)
    account = _account(runtime, request)
    change(account)
    status = runtime.scheduler.status()[account.name]
    view = _account_view(runtime, account.name, status)
    await responder.json(200, {"account": account.name, **view})


async def queues(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    admission = runtime.admission.status()
    pool_of_key = {}
    for record in runtime.keys.records():
        package = runtime.config.packages.get(record.package)
        if package is not None:
            pool_of_key[record.id] = package.pool
    pools: dict[str, dict] = {}
    for name, pool in admission.get("pools", {}).items():
        pools[name] = {**pool, "keys": {}}
    for key_id, key in admission.get("keys", {}).items():
        pool = pools.get(pool_of_key.get(key_id, ""))
        if pool is not None and (key.get("queued") or key.get("in_flight")):
            pool["keys"][key_id] = {
                "queued": key.get("queued", 0),
                "in_flight": key.get("in_flight", 0),
            }
    body = {"pools": pools, "global": admission.get("global", {}),
            "queued": admission.get("queued", 0)}
    shared = runtime.admission.shared
    if shared is not None:
        # Several processes: what Redis holds for every one of them (this answer's pools and
        # keys are the process that took the request).
        subjects = ["g", *(f"p:{name}" for name in runtime.admission.pools)]
        body["shared"] = await shared.status(subjects)
    await responder.json(200, body)


#: (method, path, handler); ``{name}`` matches one path segment.
ROUTES = [
    ("GET", "/admin/state", state),
    ("GET", "/admin/keys", list_keys),
    ("POST", "/admin/keys", create_key),
    ("GET", "/admin/keys/{key_id}", get_key),
    ("DELETE", "/admin/keys/{key_id}", revoke),
    ("POST", "/admin/keys/{key_id}/revoke", revoke),
    ("POST", "/admin/keys/{key_id}/topup", top_up),
    ("POST", "/admin/keys/{key_id}/limits", set_limits),
    ("POST", "/admin/keys/{key_id}/expiry", set_expiry),
    ("POST", "/admin/keys/{key_id}/rotate", rotate),
    ("GET", "/admin/accounts", list_accounts),
    ("POST", "/admin/accounts/{name}/enable", enable_account),
    ("POST", "/admin/accounts/{name}/disable", disable_account),
    ("POST", "/admin/accounts/{name}/refresh", refresh_account),
    ("GET", "/admin/queues", queues),
]
