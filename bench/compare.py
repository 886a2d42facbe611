"""``python -m bench all``: the relay side by side with the direct upstream, LiteLLM's proxy and a
bare hypercorn-trio echo, on one simulated upstream, in one run, with issue 6's targets.

    .venv/bin/python -m bench all            # about 6 minutes
    .venv/bin/python -m bench all --quick    # about 2 minutes (fewer, shorter phases)

Prints a Markdown report (progress goes to stderr), writes every figure and the machine to
``bench/results/all.json`` and the report to ``bench/results/all.md`` (or next to ``--out``).
See bench/README.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import trio

from . import litellm_peer
from .common import (
    ROOT,
    Server,
    machine_busy_seconds,
    machine_info,
    machine_line,
    markdown_table,
    percentile,
    process_rss_bytes,
    raise_open_files_limit,
    start_relay,
    start_server,
)
from .overhead import (
    ADMIN_TOKEN,
    MODEL,
    NONSTREAM_DIRECTIVE,
    SIM_KEY,
    create_key,
    interrupted,
    relay_config,
    start_servers,
)
from .wire import Connection, WireError, prepare

DEFAULT_OUT = ROOT / "bench" / "results" / "all.json"
TARGET_ORDER = ("direct", "relay", "litellm", "echo", "proxy")
REQUEST_TIMEOUT_S = 30.0
NOTE = (
    "the load generator, the relay, the simulated upstream and the peers share this machine's "
    "cores, and other people's jobs may run on it too (see 'other CPU'): compare the rows of one "
    "run (differences and ratios), not absolute numbers across runs or machines"
)


@dataclass(frozen=True)
class Settings:
    concurrencies: tuple[int, ...]
    slice_s: float  # one measured slice of a (target, concurrency) non-stream phase
    slices: int  # slices per target, alternating between targets
    warmup_s: float  # unmeasured load before every slice
    stream_counts: tuple[int, ...]
    stream_delay_s: float  # the sim's pace: one token event per stream every this many seconds
    stream_ramp_s: float  # streams start spread over this long; not measured
    stream_window_s: float  # events are counted in this window after the ramp
    idle_streams: int
    disconnects: int
    disconnect_concurrency: int


FULL = Settings(
    concurrencies=(1, 16, 64, 256),
    slice_s=3.0,
    slices=2,
    warmup_s=0.5,
    stream_counts=(200, 1000),
    stream_delay_s=0.2,
    stream_ramp_s=3.0,
    stream_window_s=10.0,
    idle_streams=1000,
    disconnects=200,
    disconnect_concurrency=8,
)
QUICK = Settings(
    concurrencies=(1, 16, 64, 256),
    slice_s=1.5,
    slices=1,
    warmup_s=0.3,
    stream_counts=(200, 1000),
    stream_delay_s=0.2,
    stream_ramp_s=2.0,
    stream_window_s=4.0,
    idle_streams=1000,
    disconnects=60,
    disconnect_concurrency=8,
)


@dataclass
class Target:
    """Where load goes, and the process whose CPU and memory count as the target's own."""

    name: str
    url: str
    key: str
    process: Server
    connections: list[Connection] = field(default_factory=list)

    def request(self, body: dict, path: str = "/v1/chat/completions") -> bytes:
        return prepare(
            self.url, path, json.dumps(body).encode(), {"authorization": f"Bearer {self.key}"}
        )

    def pool(self, size: int) -> list[Connection]:
        """``size`` keep-alive connections, reused from phase to phase."""
        while len(self.connections) < size:
            self.connections.append(Connection(self.url))
        return self.connections[:size]


def chat_body(content: str, *, stream: bool) -> dict:
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
        # Asked on every path, so every target sends the same events (the relay asks anyway).
        body["stream_options"] = {"include_usage": True}
    return body


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- CPU and load accounting ------------------------------------------------------------------


class CpuMeter:
    """CPU seconds used by each started process, by this (client) process and by the whole
    machine, between :meth:`start` and :meth:`stop`."""

    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers = servers
        self._before: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.wall_s = 0.0
        self._t0 = 0.0

    def _snapshot(self) -> dict[str, float]:
        snap = {name: server.cpu_seconds() for name, server in self.servers.items()}
        snap["client"] = time.process_time()
        snap["machine"] = machine_busy_seconds()
        return snap

    def start(self) -> None:
        self._before = self._snapshot()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        after = self._snapshot()
        self.wall_s += time.perf_counter() - self._t0
        for name, value in after.items():
            self.used[name] = self.used.get(name, 0.0) + value - self._before[name]

    def figures(self) -> dict[str, float]:
        """Utilisation of each process (1.0 = one core) and of everything else on the machine."""
        wall = self.wall_s or 1.0
        ours = sum(v for k, v in self.used.items() if k != "machine")
        util = {f"{k}_util": round(v / wall, 3) for k, v in self.used.items() if k != "machine"}
        util["other_util"] = round(max(0.0, self.used.get("machine", 0.0) - ours) / wall, 3)
        util["wall_s"] = round(wall, 3)
        return util


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": ms(percentile(values, 50)),
        "p90": ms(percentile(values, 90)),
        "p99": ms(percentile(values, 99)),
        "max": ms(max(values)) if values else None,
    }


# -- non-streamed requests: latency and throughput -------------------------------------------


@dataclass
class Samples:
    latency: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    def fail(self, error: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or error


async def exchange(conn: Connection, request: bytes) -> tuple[int, bytes]:
    await conn.send(request)
    head = await conn.head()
    return head.status, await conn.body(head)


async def closed_loop(
    connections: list[Connection], request: bytes, seconds: float, samples: Samples | None
) -> None:
    """Each connection sends ``request`` back to back until ``seconds`` are up (requests in
    flight then finish); latencies go to ``samples`` (None: a warm-up)."""
    deadline = time.perf_counter() + seconds

    async def worker(conn: Connection) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            error = None
            with trio.move_on_after(REQUEST_TIMEOUT_S) as timeout:
                try:
                    status, body = await exchange(conn, request)
                    if status != 200:
                        error = f"HTTP {status}: {body[:200]!r}"
                except (WireError, OSError, trio.BrokenResourceError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
            if timeout.cancelled_caught:
                error = f"no answer within {REQUEST_TIMEOUT_S:g} s"
            if error is not None:
                await conn.aclose()
                if samples is not None:
                    samples.fail(error)
                await trio.sleep(0.01)  # a failing target must not become a busy loop
            elif samples is not None:
                samples.latency.append(time.perf_counter() - started)

    async with trio.open_nursery() as nursery:
        for conn in connections:
            nursery.start_soon(worker, conn)


async def nonstream_sweep(
    targets: list[Target], settings: Settings, meters: dict[str, Server]
) -> list[dict]:
    body = chat_body(NONSTREAM_DIRECTIVE, stream=False)
    rows = []
    for concurrency in settings.concurrencies:
        samples = {t.name: Samples() for t in targets}
        cpu = {t.name: CpuMeter(meters) for t in targets}
        for _ in range(settings.slices):
            for target in targets:  # A B C D A B C D: background load hits all alike
                conns = target.pool(concurrency)
                request = target.request(body)
                await closed_loop(conns, request, settings.warmup_s, None)
                cpu[target.name].start()
                await closed_loop(conns, request, settings.slice_s, samples[target.name])
                cpu[target.name].stop()
        for target in targets:
            s, meter = samples[target.name], cpu[target.name]
            own = meter.used.get(target.process.name, 0.0)
            done = len(s.latency)
            rows.append(
                {
                    "target": target.name,
                    "concurrency": concurrency,
                    "requests": done,
                    "errors": s.errors,
                    "first_error": s.first_error,
                    "req_per_s": round(done / meter.wall_s, 1) if meter.wall_s else 0.0,
                    "latency_ms": summary(s.latency),
                    "cpu_ms_per_request": round(own * 1000 / done, 3) if done else None,
                    "cpu": meter.figures(),
                }
            )
        log(f"  non-stream c={concurrency} done")
    return rows


# -- paced streams: events/s and inter-event delay -------------------------------------------


async def paced_streams(
    target: Target, streams: int, settings: Settings, meters: dict[str, Server]
) -> dict:
    """``streams`` concurrent streams paced by the sim; every stream lasts the whole phase.

    Streams start spread over the ramp; events are counted, and the gaps between consecutive
    events of a stream taken, only in the window after it, when every stream is open.
    """
    delay = settings.stream_delay_s
    tail_s = 1.0
    tokens = math.ceil((settings.stream_ramp_s + settings.stream_window_s + tail_s) / delay)
    request = target.request(chat_body(f"#sim tokens={tokens} ttft=0 delay={delay:g}", stream=True))
    start = time.perf_counter()
    window_start = start + settings.stream_ramp_s + 0.5
    window_end = window_start + settings.stream_window_s
    gaps: list[float] = []
    counts = {"events": 0, "completed": 0, "opened": 0}
    samples = Samples()
    opening = trio.CapacityLimiter(64)  # no SYN flood: the listen backlogs are finite

    async def stream(index: int) -> None:
        await trio.sleep(index * settings.stream_ramp_s / streams)
        conn = Connection(target.url)
        last: float | None = None
        pending = b""
        try:
            async with opening:
                await conn.send(request)
                head = await conn.head()
            if head.status != 200:
                samples.fail(f"HTTP {head.status}: {(await conn.body(head))[:200]!r}")
                return
            counts["opened"] += 1
            async for piece in conn.iter_body(head):
                now = time.perf_counter()
                pending += piece
                complete = pending.count(b"\n\n")
                if not complete:
                    continue
                last_end = pending.rfind(b"\n\n")
                final, pending = pending[:last_end], pending[last_end + 2 :]
                if window_start <= now < window_end:
                    counts["events"] += complete
                    if last is not None:
                        gaps.append(now - last)
                    gaps.extend([0.0] * (complete - 1))
                last = now
            if b"[DONE]" in final.rsplit(b"\n\n", 1)[-1]:
                counts["completed"] += 1
            else:
                samples.fail("stream ended without [DONE]")
        except (WireError, OSError, trio.BrokenResourceError) as exc:
            samples.fail(f"{type(exc).__name__}: {exc}")
        finally:
            await conn.aclose()

    meter = CpuMeter(meters)
    async with trio.open_nursery() as nursery:
        for index in range(streams):
            nursery.start_soon(stream, index)
        await trio.sleep_until(trio.current_time() + (window_start - time.perf_counter()))
        meter.start()
        await trio.sleep(settings.stream_window_s)
        meter.stop()
        nursery.cancel_scope.deadline = trio.current_time() + tail_s + 30  # bounded drain
    own = meter.used.get(target.process.name, 0.0)
    events = counts["events"]
    return {
        "target": target.name,
        "streams": streams,
        "opened": counts["opened"],
        "completed": counts["completed"],
        "errors": samples.errors,
        "first_error": samples.first_error,
        "delay_ms": delay * 1000,
        "offered_events_per_s": round(streams / delay, 1),
        "events_per_s": round(events / settings.stream_window_s, 1),
        "gap_ms": summary(gaps),
        "cpu_ms_per_1000_events": round(own * 1e6 / events, 2) if events else None,
        "cpu": meter.figures(),
    }


# -- memory per open stream --------------------------------------------------------------------


#: The prompt of the second memory measurement: agents resend their whole conversation with
#: every turn, so real requests are tens or hundreds of KiB, and what a relay keeps of them for
#: as long as the stream runs is part of its memory per stream.
LARGE_PROMPT_BYTES = 32 * 1024


async def idle_streams(target: Target, streams: int, prompt_bytes: int = 0) -> dict:
    """Open ``streams`` streams that get their first event and then nothing; the target's RSS
    with all of them open minus its RSS before, per stream. Then every client leaves at once.
    ``prompt_bytes`` of filler text go before the directive in the prompt."""
    filler = "lorem ipsum " * (prompt_bytes // 12)
    content = f"{filler}#sim tokens=2 ttft=0 delay=3600"
    request = target.request(chat_body(content, stream=True))
    pid = target.process.pid
    opened = 0
    all_open = trio.Event()
    leave = trio.Event()
    samples = Samples()
    opening = trio.CapacityLimiter(64)

    async def stream() -> None:
        nonlocal opened
        conn = Connection(target.url)
        try:
            async with opening:
                await conn.send(request)
                head = await conn.head()
                if head.status != 200:
                    samples.fail(f"HTTP {head.status}")
                    return
                seen = b""
                async for piece in conn.iter_body(head):
                    seen += piece
                    if b"\n\n" in seen:
                        break
            opened += 1
            if opened == streams:
                all_open.set()
            await leave.wait()
        except (WireError, OSError, trio.BrokenResourceError) as exc:
            samples.fail(f"{type(exc).__name__}: {exc}")
        finally:
            await conn.aclose()

    await trio.sleep(0.5)
    before = process_rss_bytes(pid)
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(stream)
        with trio.move_on_after(60):
            await all_open.wait()
        await trio.sleep(1.0)  # let what the opening allocated settle
        during = process_rss_bytes(pid)
        leave.set()
    await trio.sleep(2.0)  # the target cleans up after a thousand disconnects
    after = process_rss_bytes(pid)
    return {
        "target": target.name,
        "streams": streams,
        "prompt_bytes": len(content),
        "opened": opened,
        "errors": samples.errors,
        "first_error": samples.first_error,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_open_mib": round(during / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "kib_per_stream": round((during - before) / 1024 / opened, 1) if opened else None,
    }


# -- time from client disconnect to upstream close --------------------------------------------


def _sim_get(sim: Server, path: str, method: str = "GET") -> object:
    request = urllib.request.Request(
        sim.url + path, method=method, data=b"" if method == "POST" else None
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


async def disconnects(target: Target, sim: Server, count: int, concurrency: int) -> dict:
    """Streams that the client closes mid-answer; the sim records when it saw each upstream
    connection close (``closed_at``, CLOCK_MONOTONIC like this process's ``time.monotonic``)."""
    await trio.to_thread.run_sync(_sim_get, sim, "/_sim/reset", "POST")
    closed_by_client: dict[str, float] = {}
    samples = Samples()
    queue = list(range(count))

    async def worker() -> None:
        while queue:
            marker = f"disconnect-{target.name}-{queue.pop()}"
            body = chat_body(f"{marker} #sim tokens=2000 ttft=0 delay=0.01", stream=True)
            conn = Connection(target.url)
            try:
                await conn.send(target.request(body))
                head = await conn.head()
                if head.status != 200:
                    samples.fail(f"HTTP {head.status}")
                    continue
                seen = b""
                async for piece in conn.iter_body(head):
                    seen += piece
                    if seen.count(b"\n\n") >= 3:  # mid-answer: a few tokens in
                        break
                closed_by_client[marker] = time.monotonic()
            except (WireError, OSError, trio.BrokenResourceError) as exc:
                samples.fail(f"{type(exc).__name__}: {exc}")
            finally:
                await conn.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    delays: list[float] = []
    open_after: int = 0
    for _ in range(10):  # wait up to 5 s for the stragglers
        await trio.sleep(0.5)
        records = await trio.to_thread.run_sync(_sim_get, sim, "/_sim/requests")
        delays, open_after = [], 0
        for record in records:  # type: ignore[union-attr]
            messages = (record.get("body") or {}).get("messages") or [{}]
            content = messages[0].get("content", "")
            marker = content.split(" ", 1)[0] if isinstance(content, str) else ""
            if marker not in closed_by_client:
                continue
            if record["closed_at"] is None:
                open_after += 1
            else:
                delays.append(record["closed_at"] - closed_by_client[marker])
        if not open_after:
            break
    return {
        "target": target.name,
        "disconnects": len(closed_by_client),
        "errors": samples.errors,
        "first_error": samples.first_error,
        "upstream_still_open": open_after,
        "delay_ms": summary(delays),
    }


# -- the run -----------------------------------------------------------------------------------


async def warm(targets: list[Target], settings: Settings) -> None:
    """A first second of load at the smallest concurrency (each slice has its own warm-up).

    Not at the largest: the targets would keep those upstream connections idle in their pools
    for the phases that follow, and a pool that probes every idle connection on each request
    (httpx2's did, when the relay used it) would make the concurrency-1 figures those of a
    target after a burst (bench/README.md, "Caveats").
    """
    body = chat_body(NONSTREAM_DIRECTIVE, stream=False)
    size = min(settings.concurrencies)
    for target in targets:
        await closed_loop(target.pool(size), target.request(body), 1.0, None)


async def run_all(
    targets: list[Target],
    sim: Server,
    settings: Settings,
    meters: dict[str, Server],
    fresh: list[Target],
) -> dict:
    """Every phase, in order. ``fresh`` are a second relay and LiteLLM, started only for the
    memory figure with large prompts and stopped after it: a process that has had a thousand
    streams keeps the memory they freed and reuses it, so the second figure needs a heap that
    has not grown yet, as the first one does."""
    by_name = {t.name: t for t in targets}
    stream_targets = [by_name[n] for n in ("direct", "relay", "litellm") if n in by_name]
    results: dict = {}
    log("warming up every connection")
    await warm(targets, settings)
    warm_body = chat_body(NONSTREAM_DIRECTIVE, stream=False)

    async def phase(name: str, fn: Callable[[], Awaitable[object]]) -> None:
        log(f"{name}…")
        results[name] = await fn()

    async def memory() -> list[dict]:
        rows = []
        for target in stream_targets:
            rows.append(await idle_streams(target, settings.idle_streams))
            log(f"  idle streams {target.name} done")
        for target in fresh:
            await closed_loop(target.pool(1), target.request(warm_body), 1.0, None)
            rows.append(await idle_streams(target, settings.idle_streams, LARGE_PROMPT_BYTES))
            log(f"  idle streams with {LARGE_PROMPT_BYTES} B prompts {target.name} done")
            await trio.to_thread.run_sync(target.process.stop)
        return rows

    async def streaming() -> list[dict]:
        rows = []
        for count in settings.stream_counts:
            for target in stream_targets:
                rows.append(await paced_streams(target, count, settings, meters))
                log(f"  {count} streams {target.name} done")
                await trio.sleep(1.0)  # the last streams' sockets close
        return rows

    async def cancellation() -> list[dict]:
        rows = []
        for target in stream_targets:
            rows.append(
                await disconnects(
                    target, sim, settings.disconnects, settings.disconnect_concurrency
                )
            )
        return rows

    # Memory first: later phases grow the heaps, and freed memory would be reused.
    await phase("memory", memory)
    await phase("nonstream", lambda: nonstream_sweep(targets, settings, meters))
    await phase("streams", streaming)
    await phase("disconnect", cancellation)
    return results


# -- figures, targets and the report -----------------------------------------------------------


def _row(rows: list[dict], target: str, **match: object) -> dict | None:
    for row in rows:
        if row["target"] == target and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def figures(results: dict, peer_available: bool) -> list[dict]:
    """Every figure of issue 6 §3 with each target's value, relay ÷ LiteLLM and the target."""
    out: list[dict] = []
    nonstream, streams = results["nonstream"], results["streams"]

    def add(name, unit, values, target=None, met=None, better="lower"):
        relay, peer = values.get("relay"), values.get("litellm")
        ratio = round(relay / peer, 3) if relay is not None and peer else None
        out.append(
            {
                "figure": name,
                "unit": unit,
                "values": values,
                "relay_over_litellm": ratio,
                "better": better,
                "target": target,
                "met": met,
            }
        )

    direct = {r["concurrency"]: r for r in nonstream if r["target"] == "direct"}
    for concurrency in sorted(direct):
        for p in ("p50", "p99"):
            values = {}
            for name in TARGET_ORDER:
                row = _row(nonstream, name, concurrency=concurrency)
                base = direct[concurrency]["latency_ms"][p]
                if row is None or row["latency_ms"][p] is None or base is None:
                    continue
                values[name] = 0.0 if name == "direct" else round(row["latency_ms"][p] - base, 3)
            target = met = None
            if concurrency == 1:
                limit = 1.5 if p == "p50" else 4.0
                target = f"≤ {limit} ms"
                met = values.get("relay") is not None and values["relay"] <= limit
            add(
                f"added latency {p}, non-stream, concurrency {concurrency}",
                "ms",
                values,
                target,
                met,
            )
    values = {
        name: row["req_per_s"]
        for name in TARGET_ORDER
        if (row := _row(nonstream, name, concurrency=64)) is not None
    }
    if values:
        values_rps = values
        relay, peer, echo = values.get("relay"), values.get("litellm"), values.get("echo")
        met_peer = bool(relay and peer and relay >= 3 * peer) if peer_available else None
        add(
            "requests/s, non-stream, concurrency 64",
            "req/s",
            values,
            "≥ 3× LiteLLM",
            met_peer,
            better="higher",
        )
        out[-1]["relay_over_echo"] = round(relay / echo, 3) if relay and echo else None
        add(
            "relay ÷ echo requests/s at concurrency 64",
            "ratio",
            {"relay": out[-1]["relay_over_echo"]},
            "≥ 0.70",
            bool(out[-1]["relay_over_echo"] and out[-1]["relay_over_echo"] >= 0.7),
            "higher",
        )
        values = {
            name: row["cpu_ms_per_request"]
            for name in TARGET_ORDER
            if (row := _row(nonstream, name, concurrency=64)) is not None
        }
        add("CPU per request (the target's own process), concurrency 64", "ms", values)
        proxy = values_rps.get("proxy")
        if proxy and echo:
            add(
                "bare proxy ÷ echo requests/s at concurrency 64 (the ceiling of relay ÷ echo)",
                "ratio",
                {"proxy": round(proxy / echo, 3)},
                better="higher",
            )
        if proxy and relay:
            add(
                "relay ÷ bare proxy requests/s at concurrency 64",
                "ratio",
                {"relay": round(relay / proxy, 3)},
                better="higher",
            )
    for count in sorted({r["streams"] for r in streams}):
        base = _row(streams, "direct", streams=count)
        values = {
            n: r["events_per_s"] for n in TARGET_ORDER if (r := _row(streams, n, streams=count))
        }
        offered = base["offered_events_per_s"] if base else None
        add(
            f"relayed events/s, {count} paced streams (offered {offered:g}/s)",
            "events/s",
            values,
            better="higher",
        )
        gap_values = {}
        for name in TARGET_ORDER:
            row = _row(streams, name, streams=count)
            if row is None or base is None or row["gap_ms"]["p99"] is None:
                continue
            gap_values[name] = round(row["gap_ms"]["p99"] - base["gap_ms"]["p99"], 3)
        target = met = None
        if count == 1000:
            target = "≤ 20 ms"
            met = gap_values.get("relay") is not None and gap_values["relay"] <= 20
        add(f"added inter-event delay p99, {count} paced streams", "ms", gap_values, target, met)
        values = {
            n: r["cpu_ms_per_1000_events"]
            for n in TARGET_ORDER
            if (r := _row(streams, n, streams=count))
        }
        add(f"CPU per 1,000 events, {count} paced streams", "ms", values)
    small = [r for r in results["memory"] if r["prompt_bytes"] < LARGE_PROMPT_BYTES]
    large = [r for r in results["memory"] if r["prompt_bytes"] >= LARGE_PROMPT_BYTES]
    values = {r["target"]: r["kib_per_stream"] for r in small}
    relay_kib = values.get("relay")
    count = small[0]["streams"] if small else 0
    add(
        f"memory per open stream ({count} idle streams)",
        "KiB",
        values,
        "≤ 64 KiB",
        relay_kib is not None and relay_kib <= 64,
    )
    if large:
        values = {r["target"]: r["kib_per_stream"] for r in large}
        kib = large[0]["prompt_bytes"] // 1024
        add(f"memory per open stream, {kib} KiB prompts ({count} idle streams)", "KiB", values)
    for p in ("p50", "p99"):
        values = {
            r["target"]: r["delay_ms"][p]
            for r in results["disconnect"]
            if r["delay_ms"][p] is not None
        }
        target = met = None
        if p == "p99":
            relay_row = _row(results["disconnect"], "relay")
            target = "≤ 50 ms"
            met = bool(
                relay_row
                and not relay_row["upstream_still_open"]
                and values.get("relay") is not None
                and values["relay"] <= 50
            )
        add(f"client disconnect → upstream close {p}", "ms", values, target, met)
    return out


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def figures_table(rows: list[dict], peer_available: bool) -> str:
    peer = "LiteLLM" if peer_available else "LiteLLM (unavailable)"
    columns = ["figure", "direct (floor)", "relay", peer, "echo", "bare proxy", "relay ÷ LiteLLM"]
    cells = []
    for row in rows:
        v = row["values"]
        ratio = row["relay_over_litellm"]
        cells.append([
            f"{row['figure']} ({row['unit']})",
            *(fmt(v.get(name)) for name in ("direct", "relay", "litellm", "echo", "proxy")),
            "–" if ratio is None else f"{ratio:.2f} ({row['better']} is better)",
            row["target"] or "",
            {True: "**yes**", False: "**no**", None: ""}[row["met"]],
        ])
    return markdown_table([*columns, "target", "met"], "lrrrrrrll", cells)


def nonstream_table(rows: list[dict]) -> str:
    columns = ["target", "conc", "requests", "errors", "req/s", "p50 ms", "p99 ms",
               "own CPU ms/req", "client CPU %", "other CPU %"]
    cells = []
    for r in sorted(rows, key=lambda r: (r["concurrency"], TARGET_ORDER.index(r["target"]))):
        lat, cpu = r["latency_ms"], r["cpu"]
        cells.append([
            r["target"], r["concurrency"], r["requests"], r["errors"], f"{r['req_per_s']:.0f}",
            fmt(lat["p50"]), fmt(lat["p99"]), fmt(r["cpu_ms_per_request"], 3),
            f"{cpu.get('client_util', 0) * 100:.0f}", f"{cpu['other_util'] * 100:.0f}",
        ])
    return markdown_table(columns, "l" + "r" * 9, cells)


def streams_table(rows: list[dict]) -> str:
    columns = ["target", "streams", "completed", "errors", "offered ev/s", "events/s",
               "gap p50 ms", "gap p99 ms", "own CPU ms/1k events", "own CPU %",
               "client CPU %", "other CPU %"]
    cells = []
    for r in rows:
        cpu = r["cpu"]
        own = cpu.get(f"{_process_name(r['target'])}_util", 0)
        cells.append([
            r["target"], r["streams"], r["completed"], r["errors"],
            f"{r['offered_events_per_s']:.0f}", f"{r['events_per_s']:.0f}",
            fmt(r["gap_ms"]["p50"]), fmt(r["gap_ms"]["p99"]),
            fmt(r["cpu_ms_per_1000_events"]), f"{own * 100:.0f}",
            f"{cpu.get('client_util', 0) * 100:.0f}", f"{cpu['other_util'] * 100:.0f}",
        ])
    return markdown_table(columns, "l" + "r" * 11, cells)


def _process_name(target: str) -> str:
    return "sim" if target == "direct" else target


def memory_table(rows: list[dict]) -> str:
    columns = ["target", "prompt bytes", "streams opened", "errors", "RSS before MiB",
               "RSS open MiB", "RSS after MiB", "KiB per stream"]
    cells = [
        [r["target"], r["prompt_bytes"], r["opened"], r["errors"], r["rss_before_mib"],
         r["rss_open_mib"], r["rss_after_mib"], fmt(r["kib_per_stream"], 1)]
        for r in rows
    ]
    return markdown_table(columns, "l" + "r" * 7, cells)


def disconnect_table(rows: list[dict]) -> str:
    columns = ["target", "disconnects", "errors", "upstream still open", "p50 ms", "p99 ms",
               "max ms"]
    cells = [
        [r["target"], r["disconnects"], r["errors"], r["upstream_still_open"],
         fmt(r["delay_ms"]["p50"]), fmt(r["delay_ms"]["p99"]), fmt(r["delay_ms"]["max"])]
        for r in rows
    ]
    return markdown_table(columns, "l" + "r" * 6, cells)


def report(result: dict) -> str:
    r = result["results"]
    peer = result["peer"]
    parts = [
        f"# relay side by side ({'quick' if result['quick'] else 'full'} run, "
        f"{result['started_at']})",
        "",
        machine_line(result["machine"]),
        f"Load on the machine from others during the run: {result['other_load_cores']:.2f} cores "
        "on average (outside the benchmark's own processes).",
        f"Note: {NOTE}.",
        "",
        f"LiteLLM: {peer['description']}",
        "",
        figures_table(result["figures"], peer["available"]),
        "",
        "added = target − direct at the same percentile. relay ÷ LiteLLM: the ratio of the two "
        "figures (for latencies lower is better, for rates higher). echo: a bare ASGI app on "
        "the same hypercorn trio worker (no upstream call), the floor of the relay's stack. "
        "bare proxy: the same app forwarding each body to the sim through the relay's upstream "
        "pool and returning the answer untouched (no parsing, guards or accounting), the floor "
        "of any relay on this stack with one upstream call per request.",
        "",
        "## Non-streamed chat completions",
        "",
        nonstream_table(r["nonstream"]),
        "",
        "## Paced streams",
        "",
        streams_table(r["streams"]),
        "",
        "## Memory per open stream",
        "",
        memory_table(r["memory"]),
        "",
        "## Client disconnect → upstream close",
        "",
        disconnect_table(r["disconnect"]),
        "",
        f"relay state after the run: {json.dumps(result['relay_state_after'])}",
    ]
    for section in ("nonstream", "streams", "memory", "disconnect"):
        for row in r[section]:
            if row.get("errors"):
                parts.append(
                    f"errors in {section} {row['target']}: {row['errors']}, "
                    f"first: {row['first_error']}"
                )
    if result["logs_with_tracebacks"]:
        parts.append(
            f"tracebacks in the logs of: {', '.join(result['logs_with_tracebacks'])} "
            f"(kept in {result['logs_dir']})"
        )
    return "\n".join(parts) + "\n"


def start_fresh(tmp: Path, sim: Server, targets: list[Target]) -> list[Target]:
    """A second relay (and LiteLLM, if the first one started) on the same sim, for the memory
    figure with large prompts (see :func:`run_all`)."""
    home = tmp / "fresh"
    home.mkdir()
    fresh = [Target("relay", *_start_relay(home, sim))]
    if any(t.name == "litellm" for t in targets):
        try:
            litellm, master_key = litellm_peer.start(home, sim.url, MODEL, SIM_KEY)
            fresh.append(Target("litellm", litellm.url, master_key, litellm))
        except litellm_peer.PeerUnavailable as exc:
            log(f"second LiteLLM unavailable: {exc}")
    return fresh  # not metered: they are stopped after the memory phase


def _start_relay(home: Path, sim: Server) -> tuple[str, str, Server]:
    config = home / "relay.toml"
    config.write_text(relay_config(sim.url, home / "relay.db"))
    key = create_key(config)
    relay = start_relay(home, config.read_text(), "relay-fresh.log")
    return relay.url, key, relay


def relay_state(relay: Server) -> dict:
    request = urllib.request.Request(
        relay.url + "/admin/state", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench all", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter phases, about 2 minutes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer")
    parser.add_argument(
        "--stream-delay",
        type=float,
        help=f"seconds between two events of a paced stream (default {FULL.stream_delay_s:g})",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.stream_delay:
        settings = dataclasses.replace(settings, stream_delay_s=args.stream_delay)
    machine = machine_info()
    log(machine_line(machine))
    raise_open_files_limit()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    peer = {"available": False, "version": litellm_peer.VERSION, "description": ""}
    wall_start = time.perf_counter()
    servers: dict[str, Server] = {}
    fresh: list[Target] = []
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-all-") as tmp_name:
            tmp = Path(tmp_name)
            try:
                sim, relay, key = start_servers(tmp)
                servers = {"sim": sim, "relay": relay}
                echo = start_server(
                    "echo",
                    ["-m", "bench.echo", "--port", "0"],
                    r"echo listening on (\S+)",
                    tmp / "echo.log",
                )
                servers["echo"] = echo
                proxy = start_server(
                    "proxy",
                    [
                        *("-m", "bench.echo", "--port", "0"),
                        *("--upstream", sim.url, "--upstream-key", SIM_KEY),
                    ],
                    r"proxy listening on (\S+)",
                    tmp / "proxy.log",
                )
                servers["proxy"] = proxy
                targets = [
                    Target("direct", sim.url, SIM_KEY, sim),
                    Target("relay", relay.url, key, relay),
                ]
                if args.no_litellm:
                    peer["description"] = "skipped (--no-litellm)"
                else:
                    try:
                        log(f"starting LiteLLM {litellm_peer.VERSION}…")
                        litellm, master_key = litellm_peer.start(tmp, sim.url, MODEL, SIM_KEY)
                        servers["litellm"] = litellm
                        targets.append(Target("litellm", litellm.url, master_key, litellm))
                        peer["available"] = True
                        peer["description"] = (
                            f"litellm[proxy]=={litellm_peer.VERSION} in {litellm_peer.VENV}, "
                            "one uvicorn worker, no database, callbacks and logging off "
                            "(configuration: bench/README.md)."
                        )
                    except litellm_peer.PeerUnavailable as exc:
                        peer["description"] = f"**unavailable**: {exc}. No LiteLLM figures."
                        log(f"LiteLLM unavailable: {exc}")
                targets.append(Target("echo", echo.url, "none", echo))
                targets.append(Target("proxy", proxy.url, "none", proxy))
                fresh += start_fresh(tmp, sim, targets)
                log(", ".join(f"{n} pid {s.pid} at {s.url}" for n, s in servers.items()))
                results = trio.run(run_all, targets, sim, settings, servers, fresh)
                state = relay_state(relay)
            finally:
                codes = {name: server.stop() for name, server in servers.items()}
                for target in fresh:
                    target.process.stop()
            logs = {name: server.log.read_text() for name, server in servers.items()}
            kept = args.out.parent / f"{args.out.stem}-logs"  # the temporary directory goes
            kept.mkdir(parents=True, exist_ok=True)
            for name, text in logs.items():
                (kept / f"{name}.log").write_text(text)
    except BaseException as exc:
        if not interrupted(exc):
            raise
        log("interrupted: servers stopped, nothing written")
        return 130
    wall = time.perf_counter() - wall_start
    result = {
        "benchmark": "relay side by side (issue 6)",
        "started_at": started,
        "quick": args.quick,
        "machine": machine,
        "note": NOTE,
        "settings": asdict(settings),
        "peer": peer,
        "wall_s": round(wall, 1),
        "other_load_cores": 0.0,
        "results": results,
        "figures": figures(results, peer["available"]),
        "relay_state_after": state,
        "exit_codes": codes,
        "logs_with_tracebacks": [name for name, text in logs.items() if "Traceback" in text],
        "logs_dir": str(args.out.parent / f"{args.out.stem}-logs"),
    }
    others = [
        row["cpu"]["other_util"] for section in ("nonstream", "streams") for row in results[section]
    ]
    result["other_load_cores"] = round(sum(others) / len(others), 2) if others else 0.0
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    log(f"JSON written to {out}, report to {out.with_suffix('.md')} ({wall:.0f} s)")
    return 0
