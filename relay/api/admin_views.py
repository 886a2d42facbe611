"""The admin API's summary views, which the operator console (``/console``) draws.

Like every admin route they take the admin token (:func:`relay.api.admin.check_admin`); they
only read.

| Route | What |
|---|---|
| ``GET /admin/overview`` | the last minute's requests, errors and tokens (from the ledger),
  in flight and queued per pool, account health counts, live processes when Redis is shared |
| ``GET /admin/packages`` | the configured packages (pool, limits, initial credits, prefix) |
| ``GET /admin/usage`` | ``?from&to&group_by=day|hour|model|key&key_id&format=csv``: tokens
  and credits of the usage rows in the window, in total and per group; CSV on request |

The ledger's figures are the usage rows written so far (the usage writer commits every
moment), of every process that shares the database; the live ones are this process's, plus
what Redis holds for all of them when it is shared.
"""

from __future__ import annotations

import csv
import io
import time
from typing import TYPE_CHECKING

import trio

from ..errors import InvalidRequest, NotFound
from ..ledger.store import USAGE_GROUPS
from .admin import check_admin
from .selfservice import iso, parse_time, usage_totals

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .http import Request, Responder

#: The window ``/admin/overview`` counts requests and tokens over.
RECENT_S = 60

#: ``/admin/usage`` covers the last 14 days unless ``from`` says otherwise.
DEFAULT_USAGE_S = 14 * 86_400

#: The columns of a usage CSV after the group's own.
CSV_COLUMNS = (
    "calls", "errors", "input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens",
    "reasoning_tokens", "total_tokens", "credits",
)


def account_health(status: dict) -> str:
    """``ok``, ``cooling`` or ``out_of_service`` for one account of the scheduler's status."""
    if status.get("disabled") or status.get("missing_credentials"):
        return "out_of_service"
    if status.get("cooling_down_s"):
        return "cooling"
    return "ok"


async def overview(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    now = time.time()
    recent, _ = await trio.to_thread.run_sync(
        runtime.store.usage_summary, None, now - RECENT_S, now + 1, None
    )
    admission = runtime.admission.status()
    pools = {
        name: {
            "in_flight": pool.get("in_flight", 0),
            "max_concurrency": pool.get("max_concurrency"),
            "queued": pool.get("queue_depth", 0),
            "oldest_wait_s": pool.get("oldest_wait_s", 0),
        }
        for name, pool in admission.get("pools", {}).items()
    }
    accounts = {"ok": 0, "cooling": 0, "out_of_service": 0}
    for status in runtime.scheduler.status().values():
        accounts[account_health(status)] += 1
    body: dict = {
        "object": "overview",
        "time": iso(now),
        "window_s": RECENT_S,
        "recent": usage_totals(recent),
        "active_requests": runtime.active_requests,
        "queued": admission.get("queued", 0),
        "pools": pools,
        "accounts": accounts,
        "keys": len([r for r in runtime.keys.records() if r.active]),
        "shared": None,
    }
    shared = runtime.admission.shared
    if shared is not None:
        state = await shared.status(["g", *(f"p:{name}" for name in runtime.admission.pools)])
        body["shared"] = {
            "degraded": state.get("degraded", False),
            "processes": state.get("processes", []),
            "queued_per_process": state.get("queued_per_process", {}),
        }
    await responder.json(200, body)


async def packages(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    data = [
        {
            "name": package.name,
            "pool": package.pool,
            "key_prefix": package.key_prefix,
            "initial_credits": package.initial_credits,
            "models": list(package.models) if package.models is not None else None,
            "limits": {
                "tpm": package.tpm,
                "rpm": package.rpm,
                "max_concurrency": package.max_concurrency,
                "max_queue": package.max_queue,
                "queue_timeout_s": package.queue_timeout_s,
                "weight": package.weight,
            },
        }
        for package in runtime.config.packages.values()
    ]
    await responder.json(200, {"object": "list", "data": data})


async def usage(runtime: Runtime, request: Request, responder: Responder) -> None:
    check_admin(runtime, request)
    query = request.query_params()
    end = parse_time(query["to"], "to", end=True) if query.get("to") else time.time() + 1
    start = parse_time(query["from"], "from") if query.get("from") else end - DEFAULT_USAGE_S
    if end < start:
        raise InvalidRequest("'to' is before 'from'.", param="to")
    group_by = query.get("group_by") or None
    groups_known = (*USAGE_GROUPS, "key")
    if group_by is not None and group_by not in groups_known:
        raise InvalidRequest(
            f"'group_by' must be one of {', '.join(groups_known)}, got {group_by!r}.",
            param="group_by",
        )
    output = query.get("format") or "json"
    if output not in ("json", "csv"):
        raise InvalidRequest(f"'format' must be json or csv, got {output!r}.", param="format")
    key_id = query.get("key_id") or None
    listed = await trio.to_thread.run_sync(runtime.store.list_keys)
    records = {record.id: record for record in listed}
    if key_id is not None and key_id not in records:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    totals, groups = await trio.to_thread.run_sync(
        runtime.store.usage_summary, key_id, start, end,
        group_by if group_by in USAGE_GROUPS else None,
    )
    if group_by == "key":
        data = []
        for record in sorted(records.values(), key=lambda r: r.id):
            if key_id is not None and record.id != key_id:
                continue
            row, _ = await trio.to_thread.run_sync(
                runtime.store.usage_summary, record.id, start, end, None
            )
            if row["calls"]:
                data.append({"key": record.id, "name": record.name, "hint": record.hint,
                             "package": record.package, **usage_totals(row)})
    else:
        data = [{group_by: row["grp"], **usage_totals(row)} for row in groups]
    if output == "csv":
        name = f"relay-usage-{group_by or 'total'}.csv"
        await responder.raw(
            200, usage_csv(group_by, data, totals), b"text/csv; charset=utf-8",
            {"content-disposition": f'attachment; filename="{name}"'},
        )
        return
    await responder.json(200, {
        "object": "usage", "unit": "credits", "from": iso(start), "to": iso(end),
        "group_by": group_by, "key_id": key_id, "totals": usage_totals(totals), "data": data,
    })


def usage_csv(group_by: str | None, data: list[dict], totals: dict) -> bytes:
    """The groups as CSV (a header line, one line per group), or the one total line."""
    first = [] if group_by is None else (["key", "name", "hint", "package"]
                                          if group_by == "key" else [group_by])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*first, *CSV_COLUMNS])
    rows = data if group_by is not None else [usage_totals(totals)]
    for row in rows:
        writer.writerow([*(row[name] for name in first), *(row[name] for name in CSV_COLUMNS)])
    return out.getvalue().encode()


#: (method, path, handler), as in :data:`relay.api.admin.ROUTES`.
ROUTES = [
    ("GET", "/admin/overview", overview),
    ("GET", "/admin/packages", packages),
    ("GET", "/admin/usage", usage),
]
