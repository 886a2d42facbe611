"""Chaos: mixed load with hang-ups and upstream faults, then SIGTERM and ``kill -9`` under load,
and the relay's promises checked after each (issue 12).

    .venv/bin/python -m bench chaos                    # 10,000 requests, about ten minutes
    .venv/bin/python -m bench chaos --requests 1000    # shorter
    .venv/bin/python -m bench chaos --hostile on       # also the hostile-upstream faults

One simulated upstream and one relay process (then a second and a third on the same database),
on loopback. The relay has two pools, four packages, six keys (one nearly out of credits),
chat-only and responses-only accounts (so about half the requests are translated), and prices.

1. **Mixed load** (``--requests``, in rounds of ``--round``): chat and responses, streamed and
   not, over every key, at most ``--concurrency`` at a time, each on its own connection (raw
   sockets: the client decides exactly when it leaves). A request may hang up while queued (the
   ``tight`` pool has 3 slots), before the first byte, mid-stream or mid-upload (the head and
   half the body, then close), and may ask the sim for a fault (``#sim fault=…``: 429, 500, 503,
   drop, reset, stall, slow headers, slow first token, slow tokens; and, with ``--hostile``, the
   hostile faults the sim knows: huge usage, a secret in an error, an absurd retry-after, an HTML
   answer). Between rounds the relay must fall idle; the sim's request log is read and reset.
2. **SIGTERM** with long streams running and requests queued: no record lost, every stream ends
   with an event, queued requests answered (503).
3. **kill -9** under load: every request whose answer the client had fully received more than
   :data:`KILL_GRACE_S` before the kill has its row; the database is intact; each key's stored
   balance equals its grants minus its rows; a restarted relay reports and serves those balances.

Every check is a :class:`Check` (name, passed, detail); checks that wait for another part of
issue 12 are marked with the fix they wait for (:data:`PENDING`) and reported, not failed.
``tests/test_chaos.py`` runs the same code with small counts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import trio

from relay.ledger.usage import BATCH_WINDOW_S
from relay.testing import sim_protocol

from .common import (
    BENCH_ADMIN_ENV,
    BENCH_ADMIN_TOKEN,
    BENCH_SIM_KEY,
    ROOT,
    Server,
    admin_state,
    machine_info,
    machine_line,
    markdown_table,
    start_relay,
    start_sim,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "chaos.json"

#: Faults every sim has; the hostile ones are used only if the sim knows them
#: (``relay.testing.sim_protocol.FAULTS``) and ``--hostile`` allows it.
BASIC_FAULTS = ("429", "500", "503", "drop", "reset", "stall", "slow_headers", "ttft", "delay")
HOSTILE_FAULTS = ("huge_usage", "leak_secret", "retry_forever", "html")
#: Faults that make accounts rest: sent only to the model of two accounts of their own, so a
#: rate-limited account does not stall the rest of the load (it would, honestly, for minutes
#: with ``retry_forever``).
RESTING_FAULTS = frozenset({"429", "retry_forever"})
#: Faults the sim answers with a 500, which the relay passes on with the upstream's status
#: (as it should: the status and code are kept, the message redacted); any other 5xx from a
#: fault must be the relay's own mapping, 502/503/504, never its internal error.
UPSTREAM_500_FAULTS = frozenset({"500", "leak_secret"})
INTERNAL_ERROR = "The relay had an internal error"
#: Faults that are timing, not failure: the answer must be a normal one.
TIMING_FAULTS = frozenset({"ttft", "delay", "slow_headers"})
#: What must never reach a client, by the name :func:`run_suite` gives it → its check.
LEAK_CHECKS = {
    "sim_key": "no upstream credential in any response",
    "sim_address": "no upstream address in any response",
    "traceback": "no traceback in any response",
}

#: Checks that wait for another part of issue 12; the lead empties this once it is merged.
PENDING: dict[str, str] = {}

MODEL = "gpt-5.5"
RESTING_MODEL = "gpt-5-rl"
KILL_GRACE_S = 0.5  # answers received this long before a kill -9 must have their rows
REQUEST_TIMEOUT_S = 40.0  # a request still unanswered after this has hung: a failure
IDLE_TIMEOUT_S = 30.0
_RECV = 65536

#: The keys: name → (package, credits). ``poor`` runs out during the load (402s).
KEYS = {
    "alpha-1": ("alpha", None),
    "alpha-2": ("alpha", None),
    "beta-1": ("beta", None),
    "tight-1": ("tight", None),
    "tight-2": ("tight", None),
    "poor-1": ("alpha", "0.02"),
}


def relay_config(sim_url: str, database: Path) -> str:
    accounts = [
        ("chat-1", "main", "openai-chat", [MODEL, "gpt-5"]),
        ("chat-2", "main", "openai-chat", [MODEL, "gpt-5"]),
        ("resp-1", "main", "openai-responses", [MODEL, "gpt-5"]),
        ("resp-2", "main", "openai-responses", [MODEL, "gpt-5"]),
        ("chat-rl", "main", "openai-chat", [RESTING_MODEL]),
        ("resp-rl", "main", "openai-responses", [RESTING_MODEL]),
        ("chat-t", "tight", "openai-chat", [MODEL, "gpt-5"]),
        ("resp-t", "tight", "openai-responses", [MODEL, "gpt-5"]),
    ]
    text = textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:0"
        database = "{database}"
        admin_token_env = "{BENCH_ADMIN_ENV}"
        upstream_read_timeout_s = 1.0
        stall_timeout_s = 5.0
        error_cooldown_s = 0.2
        rate_limit_cooldown_s = 1.0

        [pools.main]
        max_concurrency = 48
        max_queue = 2000

        [pools.tight]
        max_concurrency = 3
        max_queue = 200

        [packages.alpha]
        pool = "main"
        max_concurrency = 24
        max_queue = 500
        queue_timeout_s = 8
        initial_credits = 100000

        [packages.beta]
        pool = "main"
        max_concurrency = 12
        max_queue = 500
        queue_timeout_s = 8
        weight = 2
        initial_credits = 100000

        [packages.tight]
        pool = "tight"
        max_concurrency = 2
        max_queue = 40
        queue_timeout_s = 4
        initial_credits = 100000

        [prices."{MODEL}"]
        input = 1.25
        cached_input = 0.125
        output = 10

        [prices.gpt-5]
        input = 1
        output = 8

        [prices.{RESTING_MODEL}]
        input = 2
        output = 4
        """)
    for name, pool, provider, models in accounts:
        text += textwrap.dedent(f"""
            [[accounts]]
            name = "{name}"
            pool = "{pool}"
            provider = "{provider}"
            base_url = "{sim_url}/v1"
            api_key_env = "SIM_UPSTREAM_KEY"
            models = {json.dumps(models)}
            """)
    return text


# -- what each request does ------------------------------------------------------------------


@dataclass
class Shot:
    """One client request, decided before it is sent."""

    cid: str  # sent as x-client-request-id, which the relay forwards: the sim records it
    key: str  # a name of KEYS
    endpoint: str  # "chat" | "responses"
    stream: bool
    model: str
    fault: str | None = None
    hangup: str | None = None
    hangup_after_s: float = 0.0  # queued / before first byte / mid-upload: when to leave
    hangup_events: int = 0  # mid-stream: leave after this many events
    directives: str = ""

    def body(self) -> bytes:
        prompt = f"chaos {self.cid}\n#sim {self.directives}".rstrip()
        if self.endpoint == "chat":
            body: dict = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
            if self.stream:
                body["stream_options"] = {"include_usage": True}
        else:
            body = {"model": self.model, "input": prompt}
        body["stream"] = self.stream
        return json.dumps(body).encode()


def available_faults(hostile: bool) -> list[str]:
    """The faults to draw from: the basic ones, and the hostile ones the sim knows (checked at
    run time, so a sim without them is not sent directives it would ignore)."""
    faults = list(BASIC_FAULTS)
    if hostile:
        faults += [f for f in HOSTILE_FAULTS if f in sim_protocol.FAULTS]
    return faults


def plan_shots(rng: random.Random, count: int, faults: list[str], start: int = 0) -> list[Shot]:
    """``count`` random requests: about a third with a fault, a quarter with a hang-up."""
    shots = []
    for n in range(start, start + count):
        key = rng.choices(list(KEYS), weights=[3, 3, 3, 2, 2, 1])[0]
        shot = Shot(
            cid=f"chaos-{n}",
            key=key,
            endpoint=rng.choice(("chat", "responses")),
            stream=rng.random() < 0.5,
            model=MODEL if rng.random() < 0.8 else "gpt-5",
        )
        directives = [f"tokens={rng.randint(3, 24)}"]
        if rng.random() < 0.35:
            shot.fault = rng.choice(faults)
        if shot.fault in RESTING_FAULTS:
            shot.model = RESTING_MODEL
            if key.startswith("tight"):
                shot.key = "alpha-1"  # the resting accounts are in the main pool
        if shot.fault == "ttft":
            directives.append(f"ttft={rng.uniform(0.2, 0.8):.2f}")
        elif shot.fault == "delay":
            directives.append(f"delay={rng.uniform(0.01, 0.04):.3f}")
        elif shot.fault == "slow_headers":
            directives.append(f"slow_headers={rng.uniform(0.1, 0.5):.2f}")
        elif shot.fault is not None:
            directives.append(f"fault={shot.fault}")
        roll = rng.random()
        if shot.key.startswith("tight") and rng.random() < 0.15:  # 3 slots: it waits
            shot.hangup, shot.hangup_after_s = "queued", rng.uniform(0.05, 0.4)
        elif roll < 0.06:
            shot.hangup, shot.hangup_after_s = "before_first_byte", rng.uniform(0.02, 0.25)
            directives.append("ttft=0.4")
        elif roll < 0.16 and shot.stream:
            shot.hangup, shot.hangup_events = "mid_stream", rng.randint(1, 6)
            directives[0] = "tokens=40 delay=0.01"
        elif 0.16 <= roll < 0.21:
            shot.hangup, shot.hangup_after_s = "mid_upload", rng.uniform(0.0, 0.2)
        shot.directives = " ".join(directives)
        shots.append(shot)
    return shots


# -- the client: raw sockets, so it decides exactly when it leaves ---------------------------


@dataclass
class Outcome:
    """What the client saw of one request."""

    cid: str
    sent: bool = False  # the whole body was sent
    status: int | None = None
    request_id: str | None = None  # the relay's x-request-id, if the head arrived
    complete: bool = False  # the whole response arrived, framing included
    hung_up: str | None = None  # the hang-up that happened (None: it was answered first)
    ending: str | None = None  # a stream's last event: done | completed | error | None
    error: str | None = None  # connection failure or timeout
    done_at: float | None = None  # time.monotonic() when the response was complete
    leaks: list[str] = field(default_factory=list)
    body_head: str = ""  # the first bytes of the body, for reports
    content_type: str = ""


async def exchange(url: str, secret: str, shot: Shot, secrets_: dict[str, str]) -> Outcome:
    """Send ``shot`` on a new connection, hang up where it says, read the rest."""
    out = Outcome(shot.cid)
    parts = urlsplit(url)
    body = shot.body()
    path = "/v1/chat/completions" if shot.endpoint == "chat" else "/v1/responses"
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {secret}\r\nx-client-request-id: {shot.cid}\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    data = bytearray()
    with trio.move_on_after(REQUEST_TIMEOUT_S) as deadline:
        try:
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        except OSError as exc:
            out.error = f"connect: {exc}"
            return out
        try:
            if shot.hangup == "mid_upload":
                await stream.send_all(head + body[: len(body) // 2])
                await trio.sleep(shot.hangup_after_s)
                out.hung_up = "mid_upload"
                return out
            await stream.send_all(head + body)
            out.sent = True
            if shot.hangup in ("queued", "before_first_byte"):
                with trio.move_on_after(shot.hangup_after_s):
                    data += await stream.receive_some(_RECV)
                if not data:
                    out.hung_up = shot.hangup
                    return out
            while not _complete(data):
                if shot.hangup == "mid_stream" and _events_after_head(data) >= shot.hangup_events:
                    out.hung_up = "mid_stream"
                    break
                chunk = await stream.receive_some(_RECV)
                if not chunk:
                    break
                data += chunk
        except (OSError, trio.BrokenResourceError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        finally:
            await trio.aclose_forcefully(stream)
    if deadline.cancelled_caught:
        out.error = f"no answer within {REQUEST_TIMEOUT_S:g}s"
    _read_response(out, bytes(data), secrets_)
    return out


def _complete(data: bytearray) -> bool:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = bytes(data[:end]).lower()
    if b"transfer-encoding: chunked" in head:
        return data.endswith(b"\r\n0\r\n\r\n") or data[end + 4 :].startswith(b"0\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(data) - end - 4 >= int(line.split(b":", 1)[1])
    return False


def _events_after_head(data: bytearray) -> int:
    end = data.find(b"\r\n\r\n")
    return -1 if end < 0 else data.count(b"\n\n", end + 4)


def _read_response(out: Outcome, data: bytes, secrets_: dict[str, str]) -> None:
    for name, secret in secrets_.items():
        if secret.encode() in data:
            out.leaks.append(name)
    if b"Traceback" in data:
        out.leaks.append("traceback")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return
    lines = data[:end].decode("latin-1").split("\r\n")
    out.status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    out.request_id = headers.get("x-request-id")
    raw = data[end + 4 :]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = _dechunk(raw)
    else:
        length = int(headers.get("content-length", "-1"))
        body, complete = raw[: max(length, 0)], length >= 0 and len(raw) >= length
    out.complete = complete and out.hung_up is None
    if out.complete:
        out.done_at = time.monotonic()
    out.body_head = body[:160].decode("utf-8", "replace")
    out.content_type = headers.get("content-type", "")
    if headers.get("content-type", "").startswith("text/event-stream"):
        out.ending = stream_ending(body)


def _dechunk(raw: bytes) -> tuple[bytes, bool]:
    body, pos = bytearray(), 0
    while True:
        line_end = raw.find(b"\r\n", pos)
        if line_end < 0:
            return bytes(body), False
        try:
            size = int(raw[pos:line_end].split(b";")[0], 16)
        except ValueError:
            return bytes(body), False
        if size == 0:
            return bytes(body), True
        start = line_end + 2
        body += raw[start : start + size]
        if len(raw) < start + size + 2:
            return bytes(body), False
        pos = start + size + 2


def stream_ending(body: bytes) -> str | None:
    """How an SSE body ends: ``done`` (chat's ``[DONE]``), ``completed`` (a Responses
    ``response.completed``/``incomplete``), ``error`` (an error event, chat or Responses), or
    None (cut without a last event)."""
    events = [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    for event in reversed(events):
        name, data = b"", b""
        for line in event.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        if not name and not data:
            continue  # a comment (keep-alive)
        if data == b"[DONE]":
            return "done"
        if name in (b"response.completed", b"response.incomplete"):
            return "completed"
        if name in (b"response.failed", b"error"):
            return "error"
        try:
            payload = json.loads(data)
        except ValueError:
            return None
        if isinstance(payload, dict) and "error" in payload:
            return "error"
        return None
    return None


async def run_shots(
    url: str, shots: list[Shot], secrets_: dict[str, str], keys: dict[str, str], concurrency: int
) -> list[Outcome]:
    """Every shot, at most ``concurrency`` at a time; outcomes in the shots' order."""
    outcomes: list[Outcome | None] = [None] * len(shots)
    limiter = trio.CapacityLimiter(concurrency)

    async def one(index: int, shot: Shot) -> None:
        async with limiter:
            outcomes[index] = await exchange(url, keys[shot.key], shot, secrets_)

    async with trio.open_nursery() as nursery:
        for index, shot in enumerate(shots):
            await limiter.acquire()  # start no more tasks than may run
            limiter.release()
            nursery.start_soon(one, index, shot)
    return [o for o in outcomes if o is not None]


# -- reading the relay, the sim and the database ---------------------------------------------


def admin(url: str, method: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "authorization": f"Bearer {BENCH_ADMIN_TOKEN}",
            "content-type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def sim_call(sim_url: str, method: str, path: str) -> object:
    request = urllib.request.Request(sim_url + path, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def idle_problems(state: dict) -> list[str]:
    """What in ``/admin/state`` is not back to zero (empty when idle)."""
    problems = []
    admission = state["admission"]
    for name, value in (
        ("active_requests", state["active_requests"]),
        ("admission.total (slots held)", admission["total"]),
        ("admission.reserved_tokens", admission["reserved_tokens"]),
        ("admission.queued", admission["queued"]),
        ("credits.holds", state["credits"]["holds"]),
        ("usage_records.queued", state["usage_records"]["queued"]),
    ):
        if value:
            problems.append(f"{name} = {value}")
    for name, pool in admission["pools"].items():
        if pool["queue_depth"] or pool["in_flight"] or pool["reserved_tokens"]:
            problems.append(f"pool {name}: {pool}")
    for name, account in state["accounts"].items():
        if account.get("in_flight") or account.get("reserved_tokens"):
            problems.append(f"account {name}: in_flight {account.get('in_flight')}")
    return problems


def wait_idle(url: str, timeout: float = IDLE_TIMEOUT_S) -> tuple[dict, list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        state = admin_state(url)
        problems = idle_problems(state)
        if not problems or time.monotonic() > deadline:
            return state, problems
        time.sleep(0.1)


def db_connect(database: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    connection.row_factory = sqlite3.Row
    return connection


def usage_rows(database: Path, after_id: int = 0) -> list[dict]:
    with db_connect(database) as connection:
        rows = connection.execute("select * from usage where id > ? order by id", [after_id])
        return [dict(row) for row in rows]


def ledger_problems(database: Path, live: dict[str, dict] | None = None) -> tuple[list[str], dict]:
    """Each key's stored balance against its grants and rows, and (``live``: the admin API's
    key views by id) the relay's balance in memory against the database."""
    problems = []
    figures = {}
    with db_connect(database) as connection:
        keys = connection.execute(
            "select id, credits_granted_nano, credits_used_nano from api_keys"
        ).fetchall()
        cost = dict(connection.execute("select key_id, sum(cost_nano) from usage group by key_id"))
        grants = dict(
            connection.execute("select key_id, sum(amount_nano) from credit_grants group by key_id")
        )
    for key_id, granted, used in keys:
        rows_cost = cost.get(key_id) or 0
        figures[key_id] = {"granted_nano": granted, "used_nano": used, "rows_cost_nano": rows_cost}
        if used != rows_cost:
            problems.append(f"{key_id}: credits_used_nano {used} != sum of its rows {rows_cost}")
        if granted != (grants.get(key_id) or 0):
            problems.append(f"{key_id}: granted {granted} != sum of grants {grants.get(key_id)}")
        if live is not None:
            view = live.get(key_id)
            if view is None:
                problems.append(f"{key_id}: not in the relay's key list")
                continue
            credits = view["credits"]
            live_used, live_granted = round(credits["used"] * 1e9), round(credits["granted"] * 1e9)
            if (live_used, live_granted) != (used, granted) or credits["held"]:
                problems.append(
                    f"{key_id}: relay says granted {live_granted} used {live_used} held "
                    f"{credits['held']}, database granted {granted} used {used}"
                )
    return problems, figures


def live_keys(url: str) -> dict[str, dict]:
    return {view["id"]: view for view in admin(url, "GET", "/admin/keys")["data"]}


# -- checks and the report --------------------------------------------------------------------


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""
    pending: str | None = None  # the fix this check waits for (PENDING)


@dataclass
class Report:
    settings: dict
    checks: list[Check] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks.append(Check(name, bool(passed), detail, PENDING.get(name)))

    def failed(self, *, include_pending: bool = False) -> list[Check]:
        return [c for c in self.checks if not c.passed and (include_pending or not c.pending)]


def _sample(items: Iterable[object], limit: int = 3) -> str:
    items = list(items)
    shown = "; ".join(str(i) for i in items[:limit])
    return f"{len(items)}: {shown}" if items else ""


# -- phase 1: mixed load ---------------------------------------------------------------------


class Totals:
    """Figures summed over the rounds of the mixed load."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.by_fault: dict[str, Counter[str]] = {}
        self.hangups: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.upstream_attempts = 0
        self.reached_upstream = 0
        self.translated = 0
        self.left_before_an_account = 0  # rows: 499 with no account (hung up while queued)
        self.requests = 0
        self.bad: dict[str, list[str]] = {}

    def bad_case(self, check: str, detail: str) -> None:
        self.bad.setdefault(check, []).append(detail)


def outcome_label(outcome: Outcome) -> str:
    if outcome.hung_up:
        return f"hung up {outcome.hung_up.replace('_', ' ')}"
    if outcome.error:
        return "no answer" if outcome.status is None else f"{outcome.status}, then cut"
    if outcome.status is None:
        return "no answer"
    if outcome.ending:
        return f"{outcome.status} stream, ends {outcome.ending or 'with no event'}"
    return str(outcome.status) if outcome.complete else f"{outcome.status}, incomplete"


def judge_round(
    shots: list[Shot],
    outcomes: list[Outcome],
    rows: list[dict],
    sim_records: list[dict],
    accounts: dict[str, str],
    totals: Totals,
) -> None:
    """Compare one round's client outcomes, usage rows and sim records; note what is wrong."""
    by_request = {}
    for row in rows:
        if row["request_id"] in by_request:
            totals.bad_case("one usage record per request", f"two rows for {row['request_id']}")
        by_request[row["request_id"]] = row
    reached: dict[str, list[dict]] = {}
    for record in sim_records:
        cid = record["headers"].get("x-client-request-id")
        if cid:
            reached.setdefault(cid, []).append(record)
    totals.upstream_attempts += len(sim_records)
    totals.reached_upstream += len(reached)
    totals.requests += len(shots)
    # Every request carries a valid key, so each has its row: a hang-up mid-upload too (499,
    # nothing billed), as the relay records a request from the moment it is authenticated.
    if len(rows) != len(shots):
        uploads = sum(1 for o in outcomes if o.hung_up == "mid_upload")
        totals.bad_case(
            "one usage record per request",
            f"{len(rows)} rows for {len(shots)} requests ({uploads} hung up mid-upload)",
        )
    unjoined_reached = 0
    for shot, outcome in zip(shots, outcomes, strict=True):
        label = outcome_label(outcome)
        totals.outcomes[label] += 1
        totals.by_fault.setdefault(shot.fault or "none", Counter())[label] += 1
        if shot.hangup:
            totals.hangups[f"{shot.hangup} planned"] += 1
        if outcome.hung_up:
            totals.hangups[outcome.hung_up] += 1
        for leak in outcome.leaks:
            totals.bad_case(LEAK_CHECKS[leak], f"{shot.cid} ({label})")
        if outcome.error and not outcome.hung_up:
            totals.bad_case("every request answered", f"{shot.cid}: {outcome.error}")
        status = outcome.status or 0
        if status >= 500:
            allowed = {502, 503, 504} | ({500} if shot.fault in UPSTREAM_500_FAULTS else set())
            if shot.fault is None or shot.fault in TIMING_FAULTS:
                totals.bad_case(
                    "no 5xx except upstream-fault mappings",
                    f"{shot.cid} no fault asked, got {status}: {outcome.body_head}",
                )
            elif status not in allowed or INTERNAL_ERROR in outcome.body_head:
                totals.bad_case(
                    "no 5xx except upstream-fault mappings",
                    f"{shot.cid} fault {shot.fault} got {status}: {outcome.body_head}",
                )
        if outcome.status is not None and not outcome.content_type.startswith(
            ("application/json", "text/event-stream")
        ):
            totals.bad_case(
                "every answer is JSON or an event stream",
                f"{shot.cid} fault {shot.fault}: {status} {outcome.content_type!r}",
            )
        if outcome.complete and status == 200 and shot.stream and outcome.ending is None:
            totals.bad_case("every stream ends with an event", f"{shot.cid}")
        row = by_request.get(outcome.request_id) if outcome.request_id else None
        if outcome.request_id and row is None and outcome.sent:
            totals.bad_case("one usage record per request", f"no row for {outcome.request_id}")
        if shot.cid in reached and outcome.request_id is None:
            unjoined_reached += 1
        if row is None:
            continue
        if outcome.complete and row["status"] != status:
            totals.bad_case(
                "usage row status = what the client got",
                f"{shot.cid}: client {status}, row {row['status']}",
            )
        attempts = reached.get(shot.cid, [])
        finished = [a for a in attempts if a.get("usage")]
        if row["account"] and accounts.get(row["account"]) != shot.endpoint:
            totals.translated += 1
        if finished and outcome.complete and status == 200 and shot.fault != "huge_usage":
            usage = finished[-1]["usage"]
            billed = (row["input_tokens"], row["output_tokens"])
            if billed != (usage["input_tokens"], usage["output_tokens"]):
                totals.bad_case(
                    "billed tokens = upstream-reported usage",
                    f"{shot.cid}: row {billed}, upstream {usage}",
                )
        if not row["status"]:
            totals.bad_case("no usage row with status 0", f"{shot.cid} {row['request_id']}")
    joined = {o.request_id for o in outcomes if o.request_id}
    unjoined_rows = sum(1 for row in rows if row["request_id"] not in joined)
    if unjoined_rows < unjoined_reached:
        totals.bad_case(
            "one usage record per request",
            f"{unjoined_reached} requests reached the upstream without an answer head, but only "
            f"{unjoined_rows} rows are not matched to an answered request",
        )
    for row in rows:
        totals.rows[f"{row['status']}{' client gone' if row['client_disconnected'] else ''}"] += 1
        if row["status"] == 499 and not row["account"]:
            totals.left_before_an_account += 1


async def mixed_load(
    url: str,
    sim_url: str,
    database: Path,
    report: Report,
    keys: dict[str, str],
    secrets_: dict[str, str],
    accounts: dict[str, str],
) -> Totals:
    settings = report.settings
    rng = random.Random(settings["seed"])
    faults = available_faults(settings["hostile"])
    report.figures["faults_used"] = faults
    report.figures["hostile_faults_skipped"] = [
        f for f in HOSTILE_FAULTS if f not in faults
    ]
    totals = Totals()
    last_id = max((row["id"] for row in usage_rows(database)), default=0)
    idle_issues: list[str] = []
    done = 0
    while done < settings["requests"]:
        count = min(settings["round"], settings["requests"] - done)
        shots = plan_shots(rng, count, faults, start=done)
        outcomes = await run_shots(url, shots, secrets_, keys, settings["concurrency"])
        _, problems = await trio.to_thread.run_sync(wait_idle, url)
        idle_issues += [f"after round {done // settings['round'] + 1}: {p}" for p in problems]
        rows = usage_rows(database, last_id)
        last_id = max((row["id"] for row in rows), default=last_id)
        sim_records = sim_call(sim_url, "GET", "/_sim/requests")
        sim_call(sim_url, "POST", "/_sim/reset")
        judge_round(shots, outcomes, rows, sim_records, accounts, totals)
        done += count
        print(f"  {done:,} requests, {sum(totals.rows.values()):,} rows", file=sys.stderr)
    report.check("slots, reservations, holds back to zero, queues empty", not idle_issues,
                 _sample(idle_issues))
    for name in (
        "one usage record per request",
        "usage row status = what the client got",
        "no usage row with status 0",
        "billed tokens = upstream-reported usage",
        "no 5xx except upstream-fault mappings",
        "every request answered",
        "every stream ends with an event",
        "every answer is JSON or an event stream",
        *LEAK_CHECKS.values(),
    ):
        cases = totals.bad.get(name, [])
        report.check(name, not cases, _sample(cases))
    return totals


# -- phase 2: SIGTERM under load --------------------------------------------------------------


def long_shots(prefix: str, streams: int, queued: int, short: int) -> list[Shot]:
    """Streams that outlast the graceful timeout, requests queued behind the tight pool's
    slots, and short ones: the mix a SIGTERM meets."""
    shots = []
    for n in range(streams):
        shots.append(Shot(f"{prefix}-s{n}", ("alpha-1", "alpha-2", "beta-1")[n % 3],
                          ("chat", "responses")[n % 2], True, MODEL,
                          directives="tokens=400 delay=0.03 ttft=0"))
    for n in range(queued):  # the first three take the tight pool's slots for the whole run
        shots.append(Shot(f"{prefix}-q{n}", ("tight-1", "tight-2")[n % 2],
                          ("chat", "responses")[n % 2], n < 3, MODEL,
                          directives="tokens=400 delay=0.03 ttft=0" if n < 3 else "tokens=5"))
    for n in range(short):
        shots.append(Shot(f"{prefix}-n{n}", "beta-1", ("chat", "responses")[n % 2], False,
                          MODEL, directives="tokens=5 ttft=0.5"))
    return shots


async def sigterm_under_load(
    relay: Server, database: Path, report: Report, keys: dict[str, str], secrets_: dict[str, str]
) -> None:
    settings = report.settings
    shots = long_shots("term", settings["term_streams"], 8, 6)
    before = max((row["id"] for row in usage_rows(database)), default=0)
    exit_code: list[int] = []

    holders = [s for s in shots if s.cid.startswith("term-q") and s.stream]
    rest = [s for s in shots if s not in holders]
    results: dict[int, list[Outcome]] = {}

    async def load(part: int, group: list[Shot]) -> None:
        results[part] = await run_shots(relay.url, group, secrets_, keys, len(group))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load, 0, holders)  # the tight pool's slots taken first, so the
        await trio.sleep(0.5)  # requests after them are the ones queued
        nursery.start_soon(load, 1, rest)
        await trio.sleep(1.0)  # every stream running, the queued ones waiting
        state = admin_state(relay.url)
        report.figures["sigterm_in_flight"] = {
            "active_requests": state["active_requests"], "queued": state["admission"]["queued"],
        }
        signalled = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        exit_code.append(await trio.to_thread.run_sync(relay.proc.wait, 30))
        report.figures["sigterm_exit_s"] = round(time.monotonic() - signalled, 2)
    shots = holders + rest
    outcomes = results[0] + results[1]
    rows = usage_rows(database, before)
    by_request = {row["request_id"]: row for row in rows}
    sent = [o for o in outcomes if o.sent]
    missing = [o.cid for o in sent if o.request_id and o.request_id not in by_request]
    report.check(
        "sigterm: no record lost",
        len(rows) == len(sent) and not missing,
        f"{len(rows)} rows for {len(sent)} requests; no row for {_sample(missing)}",
    )
    streams = [o for o, s in zip(outcomes, shots, strict=True) if s.stream and o.status == 200]
    endings = Counter(o.ending or ("cut, no last event" if o.complete else "connection cut")
                      for o in streams)
    report.figures["sigterm_stream_endings"] = dict(endings)
    cut = [o.cid for o in streams if o.ending is None]
    report.check("sigterm: every stream ends with an event", not cut,
                 f"{len(cut)} of {len(streams)} streams: {dict(endings)}")
    queued = [o for o, s in zip(outcomes, shots, strict=True)
              if s.cid.startswith("term-q") and not s.stream]
    answers = Counter(str(o.status) if o.status else (o.error or "closed") for o in queued)
    report.figures["sigterm_queued_answers"] = dict(answers)
    report.check("sigterm: queued requests answered 503",
                 all(o.status == 503 for o in queued), str(dict(answers)))
    cut_rows = [by_request[o.request_id] for o in streams
                if o.ending is None and o.request_id in by_request]
    report.figures["sigterm_cut_stream_rows"] = dict(
        Counter(f"{r['status']} {r['error_code'] or '(no error code)'}" for r in cut_rows))
    report.figures["sigterm_exit_code"] = exit_code[0] if exit_code else None
    leaks = [f"{o.cid}: {o.leaks}" for o in outcomes if o.leaks]
    report.check("sigterm: nothing secret in any response", not leaks, _sample(leaks))


# -- phase 3: kill -9 under load --------------------------------------------------------------


async def kill_under_load(
    relay: Server, report: Report, keys: dict[str, str], secrets_: dict[str, str]
) -> list[Outcome]:
    """Closed-loop short requests (and a few long streams) for ``kill_after_s``, then SIGKILL.
    Only keys of the ``main`` pool: a closed loop on the ``tight`` pool's 3 slots would end with
    every client waiting there, and few requests completing near the kill."""
    settings = report.settings
    rng = random.Random(settings["seed"] + 9)
    outcomes: list[Outcome] = []
    killed = trio.Event()
    counter = iter(range(10**9))

    async def loop(worker: int) -> None:
        while not killed.is_set():
            n = next(counter)
            shot = Shot(f"kill-{n}", rng.choice(["alpha-1", "alpha-2", "beta-1"]),
                        rng.choice(("chat", "responses")), rng.random() < 0.5, MODEL,
                        directives="tokens=6 delay=0.002 ttft=0")
            if worker < 4:
                shot.stream, shot.directives = True, "tokens=300 delay=0.02 ttft=0"
            outcomes.append(await exchange(relay.url, keys[shot.key], shot, secrets_))

    backlog: list[int] = []

    async def sample() -> None:  # the usage writer's backlog: records handed over, not written
        while not killed.is_set():
            try:
                state = await trio.to_thread.run_sync(admin_state, relay.url)
            except (OSError, http.client.HTTPException):  # killed while asking or answering
                return
            backlog.append(state["usage_records"]["queued"])
            await trio.sleep(0.25)

    async with trio.open_nursery() as nursery:
        for worker in range(settings["kill_concurrency"]):
            nursery.start_soon(loop, worker)
        nursery.start_soon(sample)
        await trio.sleep(settings["kill_after_s"])
        report.figures["kill_writer_backlog"] = backlog
        report.figures["kill_at"] = time.monotonic()
        os.kill(relay.pid, signal.SIGKILL)
        killed.set()
        await trio.to_thread.run_sync(relay.proc.wait, 10)
    return outcomes


def judge_kill(database: Path, outcomes: list[Outcome], report: Report) -> None:
    kill_at = report.figures.pop("kill_at")
    rows = {row["request_id"]: row for row in usage_rows(database)}
    answered = [o for o in outcomes if o.complete and o.request_id]
    due = [o for o in answered if o.done_at is not None and o.done_at < kill_at - KILL_GRACE_S]
    late = [o for o in answered if o not in due]
    lost = [o.cid for o in due if o.request_id not in rows]
    ages = [kill_at - o.done_at for o in answered if o.request_id not in rows and o.done_at]
    report.figures["kill"] = {
        "requests": len(outcomes),
        "answered": len(answered),
        f"answered > {KILL_GRACE_S}s before the kill": len(due),
        f"answered in the last {KILL_GRACE_S}s": len(late),
        "of those, rows lost": sum(1 for o in late if o.request_id not in rows),
        "cut by the kill": len(outcomes) - len(answered),
        "oldest answer without a row, s before the kill": round(max(ages, default=0), 3),
        "batch window s": BATCH_WINDOW_S,
    }
    report.check(
        f"kill -9: every request answered > {KILL_GRACE_S}s before has its row",
        not lost, f"{len(due)} answered in time; rows missing for {_sample(lost)}",
    )
    with sqlite3.connect(database) as connection:
        integrity = connection.execute("pragma integrity_check").fetchall()
    report.check("kill -9: database opens cleanly (integrity_check)",
                 integrity == [("ok",)], str(integrity[:3]))
    problems, _ = ledger_problems(database)
    report.check("kill -9: stored balances = grants - rows", not problems, _sample(problems))


def judge_restart(relay: Server, database: Path, report: Report, keys: dict[str, str],
                  secrets_: dict[str, str], key_ids: dict[str, str]) -> None:
    problems, _ = ledger_problems(database, live_keys(relay.url))
    report.check("restart: relay reports the stored balances", not problems, _sample(problems))
    before = live_keys(relay.url)[key_ids["alpha-1"]]["credits"]["used"]
    shot = Shot("restart-0", "alpha-1", "chat", False, MODEL, directives="tokens=5")
    outcome = trio.run(exchange, relay.url, keys["alpha-1"], shot, secrets_)
    _, problems = wait_idle(relay.url)
    row = next((r for r in usage_rows(database) if r["request_id"] == outcome.request_id), None)
    after = live_keys(relay.url)[key_ids["alpha-1"]]["credits"]["used"]
    charged = round((after - before) * 1e9)
    report.check(
        "restart: relay serves and bills from the stored balance",
        outcome.status == 200 and row is not None and charged == row["cost_nano"] > 0
        and not problems,
        f"status {outcome.status}, charged {charged} nano, row cost "
        f"{row['cost_nano'] if row else None}; {_sample(problems)}",
    )
    problems, figures = ledger_problems(database, live_keys(relay.url))
    report.check("restart: stored balances = grants - rows", not problems, _sample(problems))
    report.figures["balances_nano"] = {
        name: figures[key_id] for name, key_id in key_ids.items() if key_id in figures
    }


# -- the whole suite --------------------------------------------------------------------------


def log_check(report: Report, name: str, relay: Server) -> None:
    log = relay.log.read_text()
    tracebacks = log.count("Traceback")
    report.check(f"no traceback in the relay's log ({name})", tracebacks == 0,
                 f"{tracebacks} in {relay.log}" if tracebacks else "")


def run_suite(tmp: Path, settings: dict) -> Report:
    """Run the three phases in ``tmp`` (the sim's and the relays' logs and database stay there)
    and return the report. ``settings``: requests, round, concurrency, seed, hostile,
    term_streams, kill_concurrency, kill_after_s."""
    report = Report(settings=settings)
    sim = start_sim(tmp, "--ttft", "0.01", "--token-delay", "0.003", "--tokens", "12")
    secrets_ = {"sim_key": BENCH_SIM_KEY, "sim_address": urlsplit(sim.url).netloc}
    database = tmp / "relay.db"
    (tmp / "relay.toml").write_text(relay_config(sim.url, database))
    accounts = {"chat-1": "chat", "chat-2": "chat", "chat-rl": "chat", "chat-t": "chat",
                "resp-1": "responses", "resp-2": "responses", "resp-rl": "responses",
                "resp-t": "responses"}
    relays: list[Server] = []
    try:
        started = time.monotonic()
        relay = start_relay(tmp, "", "relay-1.log")
        relays.append(relay)
        keys, key_ids = {}, {}
        for name, (package, credits) in KEYS.items():
            created = admin(relay.url, "POST", "/admin/keys",
                            {"package": package, "name": name, "credits": credits})
            keys[name], key_ids[name] = created["key"], created["id"]

        print(f"mixed load: {settings['requests']:,} requests", file=sys.stderr)
        totals = trio.run(mixed_load, relay.url, sim.url, database, report, keys, secrets_,
                          accounts)
        report.phases["mixed load s"] = round(time.monotonic() - started, 1)
        problems, _ = ledger_problems(database, live_keys(relay.url))
        report.check("credits = grants - sum of records (database and relay)", not problems,
                     _sample(problems))
        report.figures["mixed"] = {
            "requests": totals.requests,
            "reached the upstream": totals.reached_upstream,
            "upstream attempts (failovers included)": totals.upstream_attempts,
            "translated": totals.translated,
            "left before an account (499, queued)": totals.left_before_an_account,
            "outcomes": dict(totals.outcomes.most_common()),
            "by fault": {k: dict(v.most_common()) for k, v in sorted(totals.by_fault.items())},
            "hang-ups": dict(totals.hangups),
            "usage rows by status": dict(totals.rows.most_common()),
        }

        print("SIGTERM under load", file=sys.stderr)
        started = time.monotonic()
        trio.run(sigterm_under_load, relay, database, report, keys, secrets_)
        log_check(report, "mixed load and SIGTERM", relay)
        problems, _ = ledger_problems(database)
        report.check("sigterm: stored balances = grants - rows", not problems, _sample(problems))
        report.phases["sigterm s"] = round(time.monotonic() - started, 1)

        print("kill -9 under load", file=sys.stderr)
        started = time.monotonic()
        relay = start_relay(tmp, "", "relay-2.log")
        relays.append(relay)
        outcomes = trio.run(kill_under_load, relay, report, keys, secrets_)
        judge_kill(database, outcomes, report)
        log_check(report, "kill -9", relay)
        relay = start_relay(tmp, "", "relay-3.log")
        relays.append(relay)
        judge_restart(relay, database, report, keys, secrets_, key_ids)
        relay.stop()
        log_check(report, "restart", relay)
        report.phases["kill -9 and restart s"] = round(time.monotonic() - started, 1)
    finally:
        for server in relays:
            server.stop()
        sim.stop()
    return report


# -- output -----------------------------------------------------------------------------------


def render(report: Report) -> str:
    mixed = report.figures.get("mixed", {})
    lines = [f"settings: {json.dumps(report.settings)}"]
    skipped = report.figures.get("hostile_faults_skipped")
    if skipped:
        lines.append(f"hostile faults not used (the sim does not know them, or --hostile off): "
                     f"{', '.join(skipped)}")
    lines += ["", markdown_table(
        ["mixed load", "count"], "lr",
        [(name, f"{mixed.get(name, 0):,}") for name in
         ("requests", "reached the upstream", "upstream attempts (failovers included)",
          "translated", "left before an account (499, queued)")])]
    lines += ["", markdown_table(["client outcome", "count"], "lr",
                                 mixed.get("outcomes", {}).items())]
    faults = mixed.get("by fault", {})
    lines += ["", markdown_table(
        ["fault", "requests", "outcomes"], "lrl",
        [(name, sum(c.values()), ", ".join(f"{k}: {v}" for k, v in c.items()))
         for name, c in faults.items()])]
    lines += ["", markdown_table(["hang-up", "count"], "lr", mixed.get("hang-ups", {}).items())]
    lines += ["", markdown_table(["usage rows", "count"], "lr",
                                 mixed.get("usage rows by status", {}).items())]
    other = {k: v for k, v in report.figures.items()
             if k.startswith(("sigterm", "kill"))}
    lines += ["", markdown_table(["SIGTERM / kill -9", "figure"], "ll",
                                 ((k, json.dumps(v)) for k, v in other.items()))]
    lines += ["", markdown_table(["phase", "s"], "lr", report.phases.items())]
    rows = []
    for check in report.checks:
        verdict = "pass" if check.passed else (
            f"**fail** (waits for {check.pending})" if check.pending else "**FAIL**")
        rows.append((check.name, verdict, check.detail.replace("|", "/")[:300]))
    lines += ["", markdown_table(["invariant", "result", "detail"], "lll", rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--round", type=int, default=1000, help="requests between idle checks")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--hostile", choices=("auto", "on", "off"), default="auto",
                        help="hostile-upstream faults: auto = those the sim knows")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    settings = {
        "requests": args.requests, "round": args.round, "concurrency": args.concurrency,
        "seed": args.seed, "hostile": args.hostile != "off", "term_streams": 24,
        "kill_concurrency": 32, "kill_after_s": 4.0,
    }
    machine = machine_info()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relay-bench-chaos-") as tmp:
        report = run_suite(Path(tmp), settings)
        if report.failed(include_pending=True):
            logs = args.out.parent / "chaos-logs"
            logs.mkdir(parents=True, exist_ok=True)
            for log in Path(tmp).glob("*.log"):
                (logs / log.name).write_text(log.read_text())
    wall_s = round(time.monotonic() - wall, 1)
    report.phases["total s"] = wall_s
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "relay chaos", "started_at": started_at, "wall_s": wall_s,
        "machine": machine, "settings": settings, "figures": report.figures,
        "phases": report.phases, "checks": [asdict(c) for c in report.checks],
    }, indent=1) + "\n")
    print(machine_line(machine) + "\n")
    print(render(report))
    print(f"\nJSON written to {args.out}")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
