"""Self-service endpoints: what a key holder may see about their own key, authenticated by the
key itself (the same header forms as the relay routes; never a query parameter, which would put
the key in URLs and logs). Served under every base path (``/v1``, ``/openai/v1``, ``/codex/v1``,
``/api/v1``); the two legacy billing routes also at the root (``/dashboard/billing/…``), where
some tools look for them.

| Route | What |
|---|---|
| ``GET …/balance`` | credits granted, used, held by requests in progress, left |
| ``GET …/dashboard/billing/subscription`` | OpenAI's legacy shape: ``hard_limit_usd`` = granted |
| ``GET …/dashboard/billing/usage?start_date=&end_date=`` | legacy shape: ``total_usage`` in cents |
| ``GET …/usage?from=&to=&group_by=model|day|hour`` | calls, tokens by kind and credits |
| ``GET …/limits`` | the key's limits and their current use (TPM, RPM, concurrency, queue) |
| ``GET …/calls?limit=N`` | the key's most recent calls (newest first, at most 500) |

Decisions where the legacy billing API leaves room: one credit is shown as one "USD" (the
relay's unit is the credit; plugins only display the number); ``hard_limit_usd`` is the key's
total grant, so a tool that computes ``hard_limit_usd - total_usage / 100`` over a window that
covers the key's whole life (OpenAI's tools asked for 90-100 days) shows what is left;
``total_usage`` is over the asked window (all time when none is given), ``end_date`` exclusive,
days in UTC; ``access_until`` is the key's expiry in unix seconds, 0 for a key that never
expires. Balances come from memory; usage and calls from the database, so a call shows up
there once its record is written (about 50 ms).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING

import trio

from ..errors import InvalidRequest
from ..guards.admission import KeyLimits, Ticket
from ..ledger.prices import NANO, to_credits
from ..ledger.store import USAGE_GROUPS, KeyRecord
from .http import Request, Responder

if TYPE_CHECKING:
    from ..runtime import Runtime

DAY_S = 86_400
#: Default window of ``…/usage``.
DEFAULT_USAGE_DAYS = 30
MAX_CALLS = 500
DEFAULT_CALLS = 50


async def _key(runtime: Runtime, request: Request) -> KeyRecord:
    key = await runtime.keys.authenticate(request.headers)
    request.key_id = key.id  # for the access log
    return key


def _key_summary(key: KeyRecord) -> dict:
    return {
        "id": key.id,
        "hint": key.hint,
        "name": key.name,
        "package": key.package,
        "expires_at": key.expires_at,
    }


async def balance(runtime: Runtime, request: Request, responder: Responder) -> None:
    key = await _key(runtime, request)
    credits = runtime.credits.balance(key).as_credits()
    await responder.json(
        200,
        {
            "object": "balance",
            "unit": "credits",
            "balance": credits["remaining"],
            "granted": credits["granted"],
            "used": credits["used"],
            "held": credits["held"],
            "available": credits["available"],
            "key": _key_summary(key),
        },
    )


async def subscription(runtime: Runtime, request: Request, responder: Responder) -> None:
    key = await _key(runtime, request)
    credits = runtime.credits.balance(key).as_credits()
    granted = credits["granted"]
    await responder.json(
        200,
        {
            "object": "billing_subscription",
            "has_payment_method": True,
            "canceled": False,
            "canceled_at": None,
            "delinquent": None,
            "access_until": 0 if key.expires_at is None else int(key.expires_at),
            "soft_limit_usd": granted,
            "hard_limit_usd": granted,
            "system_hard_limit_usd": granted,
            "plan": {"title": key.package, "id": key.package},
            "account_name": key.name or key.hint,
            "balance": credits["remaining"],  # not OpenAI's: what is left, exactly
        },
    )


def _date(text: str, param: str) -> float:
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"'{param}' must be a date as YYYY-MM-DD, got {text!r}.", param=param
        ) from None
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


async def billing_usage(runtime: Runtime, request: Request, responder: Responder) -> None:
    key = await _key(runtime, request)
    query = request.query_params()
    start = _date(query["start_date"], "start_date") if query.get("start_date") else 0.0
    end = _date(query["end_date"], "end_date") if query.get("end_date") else time.time() + 1
    if end < start:
        raise InvalidRequest("'end_date' is before 'start_date'.", param="end_date")
    rows = await trio.to_thread.run_sync(runtime.store.daily_costs, key.id, start, end)
    days: dict[str, list[dict]] = {}
    total = 0
    for day, model, cost_nano in rows:
        total += cost_nano
        days.setdefault(day, []).append({"name": model, "cost": _cents(cost_nano)})
    daily = [
        {"timestamp": _date(day, "day"), "line_items": items} for day, items in days.items()
    ]
    await responder.json(
        200, {"object": "list", "daily_costs": daily, "total_usage": _cents(total)}
    )


def _cents(nanocredits: int) -> float:
    """Credits in hundredths, as the legacy billing API gives amounts (one division: no
    ``0.10452499999999999``)."""
    return nanocredits / (NANO // 100)


#: The span a usage window's bounds may lie in: from the epoch to the last day a date-time
#: can show (a window's end is shown as a date-time, and a date as an end means the day after).
EARLIEST = 0.0
LATEST = dt.datetime(9999, 12, 31, tzinfo=dt.UTC).timestamp()


def parse_time(text: str, param: str, *, end: bool = False) -> float:
    """A bound of a usage window: unix seconds, an ISO date-time (UTC unless it says), or a
    date (its first second; as an ``end``, the day after it, so the day is included); 400
    naming ``param`` unless it is one of these, from 1970-01-01 to 9999-12-30."""
    text = text.strip()
    try:
        moment = float(text)
    except ValueError:
        moment = None
    if moment is None:
        try:
            if len(text) == 10:
                day = dt.date.fromisoformat(text)
                start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()
                moment = start + DAY_S if end else start
            else:
                parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=dt.UTC)
                moment = parsed.timestamp()
        except (ValueError, OverflowError):
            raise InvalidRequest(
                f"'{param}' must be a date (2025-01-31), an ISO date-time "
                f"(2025-01-31T12:00:00Z) or unix seconds, got {text!r}.",
                param=param,
            ) from None
    if not EARLIEST <= moment <= LATEST:  # also false for nan
        raise InvalidRequest(
            f"'{param}' must lie between 1970-01-01 and 9999-12-30, got {text!r}.", param=param
        )
    return moment


def iso(ts: float) -> str:
    """Unix seconds as ISO 8601 UTC (``…Z``)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def usage_totals(row: dict) -> dict:
    """A usage aggregate (the store's ``USAGE_TOTALS_SQL`` columns) as the API shows it."""
    return {
        "calls": row["calls"],
        "errors": row["errors"],
        "input_tokens": row["input_tokens"],
        "cached_tokens": row["cached_tokens"],
        "cache_write_tokens": row["cache_write_tokens"],
        "output_tokens": row["output_tokens"],
        "reasoning_tokens": row["reasoning_tokens"],
        "total_tokens": row["input_tokens"] + row["output_tokens"],
        "credits": to_credits(row["cost_nano"]),
    }


async def usage(runtime: Runtime, request: Request, responder: Responder) -> None:
    key = await _key(runtime, request)
    query = request.query_params()
    now = time.time()
    end = parse_time(query["to"], "to", end=True) if query.get("to") else now + 1
    start = (
        parse_time(query["from"], "from")
        if query.get("from")
        else end - DEFAULT_USAGE_DAYS * DAY_S
    )
    if end < start:
        raise InvalidRequest("'to' is before 'from'.", param="to")
    group_by = query.get("group_by") or None
    if group_by is not None and group_by not in USAGE_GROUPS:
        raise InvalidRequest(
            f"'group_by' must be one of {', '.join(USAGE_GROUPS)}, got {group_by!r}.",
            param="group_by",
        )
    totals, groups = await trio.to_thread.run_sync(
        runtime.store.usage_summary, key.id, start, end, group_by
    )
    data = [{group_by: row["grp"], **usage_totals(row)} for row in groups]
    await responder.json(
        200,
        {
            "object": "usage",
            "unit": "credits",
            "from": iso(start),
            "to": iso(end),
            "group_by": group_by,
            "totals": usage_totals(totals),
            "data": data,
        },
    )


def _limit_state(limit: int | float | None, remaining: float | None, reset_s) -> dict:
    used = None if limit is None or remaining is None else max(0, int(limit) - int(remaining))
    return {"limit": limit, "remaining": remaining, "used": used, "reset_s": reset_s}


async def limits(runtime: Runtime, request: Request, responder: Responder) -> None:
    read_at = trio.current_time()
    key = await _key(runtime, request)
    package = runtime.config.packages.get(key.package)
    if package is None:
        await responder.json(
            200,
            {"object": "limits", "package": key.package, "pool": None, "limits": None,
             "message": "This key's package is no longer offered by the relay."},
        )
        return
    key_limits = KeyLimits.of(package, key.limits)
    ticket = Ticket(
        key_id=key.id, pool=package.pool, estimated_tokens=0, limits=key_limits,
        limits_read_at=read_at,
    )
    rate = runtime.admission.key_rate_state(ticket)
    state = runtime.admission.status().get("keys", {}).get(key.id, {})
    await responder.json(
        200,
        {
            "object": "limits",
            "package": package.name,
            "pool": package.pool,
            "overridden": sorted(key.limits),
            "tpm": _limit_state(
                key_limits.tpm, rate.get("remaining-tokens"), rate.get("reset-tokens")
            ),
            "rpm": _limit_state(
                key_limits.rpm, rate.get("remaining-requests"), rate.get("reset-requests")
            ),
            "concurrency": {
                "limit": key_limits.max_concurrency,
                "in_flight": state.get("in_flight", 0),
            },
            "queue": {
                "limit": key_limits.max_queue,
                "queued": state.get("queued", 0),
                "timeout_s": key_limits.queue_timeout_s,
            },
            "weight": key_limits.weight,
        },
    )


def _call(row: dict) -> dict:
    return {
        "request_id": row["request_id"],
        "ts": row["ts"],
        "time": iso(row["ts"]),
        "endpoint": row["endpoint"],
        "model": row["model"],
        "stream": bool(row["stream"]),
        "status": row["status"],
        "error": row["error_code"] or None,
        "input_tokens": row["input_tokens"],
        "cached_tokens": row["cached_tokens"],
        "cache_write_tokens": row["cache_write_tokens"],
        "output_tokens": row["output_tokens"],
        "reasoning_tokens": row["reasoning_tokens"],
        "credits": to_credits(row["cost_nano"]),
        "latency_ms": round(row["latency_ms"] or 0, 1),
        "ttft_ms": None if row["ttft_ms"] is None else round(row["ttft_ms"], 1),
        "queue_ms": round(row["queue_ms"] or 0, 1),
        "client_disconnected": bool(row["client_disconnected"]),
    }


async def calls(runtime: Runtime, request: Request, responder: Responder) -> None:
    key = await _key(runtime, request)
    text = request.query_params().get("limit", str(DEFAULT_CALLS))
    # isdigit() alone would take "²" and other digits int() refuses.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_CALLS:
        raise InvalidRequest(
            f"'limit' must be a whole number from 1 to {MAX_CALLS}, got {text!r}.",
            param="limit",
        )
    rows = await trio.to_thread.run_sync(
        lambda: runtime.store.usage_rows(key_id=key.id, limit=int(text))
    )
    await responder.json(200, {"object": "list", "data": [_call(row) for row in rows]})


#: (path under each base, handler)
ROUTES = [
    ("/balance", balance),
    ("/dashboard/billing/subscription", subscription),
    ("/dashboard/billing/usage", billing_usage),
    ("/usage", usage),
    ("/limits", limits),
    ("/calls", calls),
]

#: Also at the root: where OpenAI's own legacy billing API was (and some tools still look).
ROOT_ROUTES = [
    ("/dashboard/billing/subscription", subscription),
    ("/dashboard/billing/usage", billing_usage),
]
