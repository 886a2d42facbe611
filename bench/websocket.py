"""Responses turns over a WebSocket against the same turns over HTTP, and the upstream direct.

Starts the simulated upstream and a relay (bench.overhead's set-up), then for each concurrency
runs the same streamed Responses turn (a 50-token stream from the relay's ``openai-responses``
account) three ways, back to back in one run: straight to the sim over HTTP (``direct``), to
the relay over HTTP (``relay-http``: a keep-alive connection per worker) and to the relay over a
WebSocket (``relay-ws``: one socket per worker, its turns one after another, as Codex sends
them). Prints a Markdown table and writes JSON.

    .venv/bin/python -m bench websocket            # ~1 minute
    .venv/bin/python -m bench websocket --quick    # ~20 s
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import trio
from trio_websocket import open_websocket_url

from .common import ROOT, machine_info, markdown_table, percentile
from .overhead import (
    RESPONSES_MODEL,
    SHARED_CPU_NOTE,
    SIM_KEY,
    STREAM_DIRECTIVE,
    interrupted,
    ms,
    start_servers,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "websocket.json"
CONCURRENCIES = (1, 16)  # 16: the sockets one key may hold by default (websocket_max_per_key)
BODY = {"model": RESPONSES_MODEL, "input": STREAM_DIRECTIVE, "stream": True}


@dataclass
class Samples:
    ttfb: list[float] = field(default_factory=list)  # turn sent → first event
    latency: list[float] = field(default_factory=list)  # turn sent → response.completed
    events: int = 0
    errors: int = 0
    first_error: str | None = None
    wall_s: float = 0.0


async def http_turns(base: str, key: str, turns: int, samples: Samples) -> None:
    """``turns`` streamed POSTs, one after another, on one keep-alive connection."""
    headers = {"authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(turns):
            started = time.perf_counter()
            first = None
            events = 0
            async with client.stream("POST", "/responses", json=BODY) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        first = first or time.perf_counter()
                        events += 1
                        if '"response.completed"' in line:
                            break
            samples.ttfb.append(first - started)
            samples.latency.append(time.perf_counter() - started)
            samples.events += events


async def ws_turns(base: str, key: str, turns: int, samples: Samples) -> None:
    """``turns`` ``response.create`` frames, one after another, on one socket."""
    url = base.replace("http://", "ws://") + "/responses"
    frame = json.dumps({"type": "response.create", **BODY})
    headers = [(b"authorization", f"Bearer {key}".encode())]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        for _ in range(turns):
            started = time.perf_counter()
            first = None
            events = 0
            await ws.send_message(frame)
            while True:
                message = await ws.get_message()
                first = first or time.perf_counter()
                events += 1
                if '"response.completed"' in message[:60]:
                    break
                if message.startswith('{"type": "error"') or '"type":"error"' in message[:20]:
                    raise RuntimeError(message[:200])
            samples.ttfb.append(first - started)
            samples.latency.append(time.perf_counter() - started)
            samples.events += events


async def run_target(run, base: str, key: str, concurrency: int, turns: int) -> Samples:
    samples = Samples()

    async def worker() -> None:
        try:
            await run(base, key, turns, samples)
        except Exception as exc:  # counted and reported, not fatal to the run
            samples.errors += 1
            samples.first_error = samples.first_error or f"{type(exc).__name__}: {exc}"

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    samples.wall_s = time.perf_counter() - started
    return samples


def row(target: str, concurrency: int, samples: Samples) -> dict:
    return {
        "target": target,
        "concurrency": concurrency,
        "turns": len(samples.latency),
        "ttfb_ms": {p: ms(percentile(samples.ttfb, p)) for p in (50, 90, 99)},
        "turn_ms_p50": ms(percentile(samples.latency, 50)),
        "events_per_s": round(samples.events / samples.wall_s, 1) if samples.wall_s else None,
        "errors": samples.errors,
        "first_error": samples.first_error,
    }


async def run_all(sim_url: str, relay_url: str, key: str, turns: int) -> list[dict]:
    targets = [
        ("direct", http_turns, sim_url + "/v1", SIM_KEY),
        ("relay-http", http_turns, relay_url + "/v1", key),
        ("relay-ws", ws_turns, relay_url + "/v1", key),
    ]
    for _, run, base, secret in targets:  # warm-up: connections, caches
        await run_target(run, base, secret, 4, 5)
    rows = []
    for concurrency in CONCURRENCIES:
        for name, run, base, secret in targets:
            samples = await run_target(run, base, secret, concurrency, turns)
            rows.append(row(name, concurrency, samples))
            print(f"  done: {name} c={concurrency}", file=sys.stderr, flush=True)
    return rows


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    http = {r["concurrency"]: r for r in rows if r["target"] == "relay-http"}
    body = []
    for r in rows:
        added = ""
        if r["target"] == "relay-ws":
            base = http[r["concurrency"]]["ttfb_ms"][50]
            mine = r["ttfb_ms"][50]
            added = "–" if base is None or mine is None else f"{mine - base:+.2f}"
        body.append([
            r["target"], str(r["concurrency"]), str(r["turns"]), fmt(r["ttfb_ms"][50]),
            fmt(r["ttfb_ms"][90]), fmt(r["ttfb_ms"][99]), added, fmt(r["turn_ms_p50"]),
            fmt(r["events_per_s"]), str(r["errors"]),
        ])
    return markdown_table(
        ["target", "c", "turns", "TTFB p50 ms", "p90", "p99", "ws − http p50", "turn p50 ms",
         "events/s", "errors"],
        "lrrrrrrrrr",
        body,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench websocket", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer turns, ~20 s")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    turns = 15 if args.quick else 60
    machine = machine_info()
    machine_line = (
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"Python {machine['python']} ({machine['implementation']}), Linux {machine['kernel']}"
    )
    print(f"{machine_line}\nnote: {SHARED_CPU_NOTE}", file=sys.stderr, flush=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-ws-") as tmp_name:
            sim, relay, key = start_servers(Path(tmp_name))
            try:
                rows = trio.run(run_all, sim.url, relay.url, key, turns)
            finally:
                for server in (relay, sim):
                    server.stop()
            tracebacks = [s.name for s in (relay, sim) if "Traceback" in s.log.read_text()]
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("interrupted: servers stopped, nothing written", file=sys.stderr)
        return 130
    result = {
        "benchmark": "responses over websocket",
        "started_at": started,
        "quick": args.quick,
        "machine": machine,
        "note": SHARED_CPU_NOTE,
        "settings": {"turns_per_worker": turns, "concurrencies": list(CONCURRENCIES),
                     "body": BODY},
        "scenarios": rows,
        "logs_with_tracebacks": tracebacks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{machine_line}\nNote: {SHARED_CPU_NOTE}.\n")
    print(table(rows))
    print("\nTTFB: turn sent → first event; turn: → response.completed. The sim paces its 50 "
          "tokens 10 ms apart, so a turn takes about half a second whatever the transport.")
    for r in rows:
        if r["errors"]:
            print(f"errors in {r['target']} c={r['concurrency']}: {r['errors']}, "
                  f"first: {r['first_error']}")
    if tracebacks:
        print(f"tracebacks in the logs of: {', '.join(tracebacks)}")
    print(f"\nwritten: {args.out}")
    return 1 if tracebacks or any(r["errors"] for r in rows) else 0
