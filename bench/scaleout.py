"""``python -m bench scaleout``: one relay process without Redis, one with Redis, two workers with
Redis, on the same simulated upstream under the same loads, in one run.

For each arm:

* **req/s at c=64**: 64 keep-alive connections of non-streamed chat completions
  (``bench/wire.py``), and the relay's CPU per request (parent and workers, from /proc);
* **added latency at c=1**: one connection, request after request; p50 and p99 minus the same
  figures measured straight against the simulated upstream;
* **concurrency peak**: 64 streaming clients on a key capped at 8: the most streams the upstream
  saw at once;
* **fairness**: two keys of weights 1 and 3 keep eight streams each waiting on a pool capped at
  4 concurrent; the tokens served to the heavy key over the light one (3.0 is exact);
* **TPM accuracy** (the two-worker arm; every arm with ``--tpm-all``): 16 closed-loop clients on
  a key with ``tpm = 20000``; every full minute after the first (the bucket starts full) as a
  percentage of the limit, counted from the usage rows.

    .venv/bin/python -m bench scaleout             # about 5 minutes
    .venv/bin/python -m bench scaleout --quick     # about 3 minutes (one TPM minute)

Prints a Markdown table and writes JSON (``bench/results/scaleout.json`` or ``--out``).
Redis is Debian's ``redis-server``, started on a free loopback port with persistence off.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx2
import trio

from . import wire
from .common import (
    BENCH_ADMIN_ENV,
    BENCH_SIM_KEY,
    ROOT,
    create_key,
    machine_info,
    machine_line,
    markdown_table,
    percentile,
    process_cpu_seconds,
    start_relay,
    start_sim,
)
from .workers import load, start_redis

MODEL = "gpt-5.5"
TPM_LIMIT = 20_000
ARMS = (("1 process", 1, False), ("1 process + Redis", 1, True), ("2 workers + Redis", 2, True))


def relay_config(sim_url: str, database: Path, workers: int, redis_url: str | None) -> str:
    redis = f'redis_url = "{redis_url}"\n' if redis_url else ""
    return textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:0"
        database = "{database}"
        admin_token_env = "{BENCH_ADMIN_ENV}"
        keep_alive_timeout_s = 120.0
        access_log = false
        workers = {workers}
        """) + redis + textwrap.dedent(f"""
        [pools.bench]

        [pools.fair]
        max_concurrency = 4

        [packages.bench]
        pool = "bench"

        [packages.capped]
        pool = "bench"
        max_concurrency = 8
        max_queue = 200

        [packages.metered]
        pool = "bench"
        tpm = {TPM_LIMIT}
        max_queue = 200
        queue_timeout_s = 120

        [packages.light]
        pool = "fair"
        weight = 1
        max_queue = 100

        [packages.heavy]
        pool = "fair"
        weight = 3
        max_queue = 100

        [[accounts]]
        name = "sim-chat"
        pool = "bench"
        provider = "openai-chat"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["{MODEL}"]

        [[accounts]]
        name = "sim-fair"
        pool = "fair"
        provider = "openai-chat"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["{MODEL}"]
        """)


def chat(text: str, stream: bool = False) -> dict:
    return {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": text}]}


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants (a parent and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += process_cpu_seconds(current)
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return total


async def latencies(url: str, key: str, count: int) -> list[float]:
    """``count`` requests one after another on one keep-alive connection: their seconds."""
    request = wire.prepare(url, "/v1/chat/completions", json.dumps(
        {**chat("hello"), "max_tokens": 8}).encode(), {"authorization": f"Bearer {key}"})
    conn = wire.Connection(url)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            await conn.send(request)
            head = await conn.head()
            await conn.body(head)
            if head.status != 200:
                raise RuntimeError(f"latency phase: status {head.status}")
            times.append(time.perf_counter() - started)
    finally:
        await conn.aclose()
    return times


def sim_stats(sim_url: str) -> dict:
    return httpx2.get(sim_url + "/_sim/stats", timeout=10).json()


async def stream_clients(url: str, keys: dict[str, str], clients: int, seconds: float,
                         text: str) -> dict[str, int]:
    """``clients`` streaming loops per key for ``seconds``: requests completed per key."""
    served = {name: 0 for name in keys}
    body = chat(text, stream=True)
    async with httpx2.AsyncClient(base_url=url, timeout=120,
                                  limits=httpx2.Limits(max_connections=200)) as client:

        async def loop(name: str) -> None:
            while True:
                async with client.stream("POST", "/v1/chat/completions", json=body,
                                         headers={"authorization": f"Bearer {keys[name]}"}) as r:
                    async for _ in r.aiter_bytes():
                        pass
                    if r.status_code == 200:
                        served[name] += 1

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for name in keys:
                    for _ in range(clients):
                        nursery.start_soon(loop, name)
    return served


async def tpm_load(url: str, key: str, seconds: float) -> None:
    body = {**chat("#sim tokens=120"), "max_tokens": 200}
    async with httpx2.AsyncClient(base_url=url, timeout=180,
                                  limits=httpx2.Limits(max_connections=32)) as client:

        async def loop() -> None:
            while True:
                await client.post("/v1/chat/completions", json=body,
                                  headers={"authorization": f"Bearer {key}"})

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(loop)


def minutes_of_tokens(database: Path, key_id: str, started: float, minutes: int) -> list[float]:
    """Tokens served to the key in each full minute after the first, as % of the limit, each
    request counted when it was delivered: a row's ``ts`` is when its request arrived, and under
    a TPM limit requests wait queued for a good part of a minute (counted at arrival, the
    requests cut by the end of the run would make the last minute look under-served)."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "select ts + latency_ms / 1000.0, input_tokens + output_tokens from usage "
            "where key_id = ? and status = 200",
            (key_id,),
        ).fetchall()
    finally:
        connection.close()
    shares = []
    for minute in range(1, minutes):
        start, end = started + 60 * minute, started + 60 * (minute + 1)
        tokens = sum(n for ts, n in rows if start <= ts < end)
        shares.append(round(100 * tokens / TPM_LIMIT, 2))
    return shares


def run_arm(tmp: Path, sim, direct: dict, name: str, workers: int, redis_url: str | None,
            args: argparse.Namespace) -> dict:
    run = tmp / name.replace(" ", "-").replace("+", "")
    run.mkdir()
    config = relay_config(sim.url, run / "relay.db", workers, redis_url)
    (run / "relay.toml").write_text(config)
    keys = {package: create_key(run / "relay.toml", package, package)
            for package in ("bench", "capped", "metered", "light", "heavy")}
    relay = start_relay(run, config)
    row: dict = {"arm": name, "workers": workers, "redis": bool(redis_url)}
    try:
        say(f"{name}: latency at c=1")
        trio.run(latencies, relay.url, keys["bench"]["key"], 50)  # warm-up
        times = trio.run(latencies, relay.url, keys["bench"]["key"], args.latency_requests)
        row["p50_ms"] = percentile(times, 50) * 1000
        row["p99_ms"] = percentile(times, 99) * 1000
        row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
        row["added_p99_ms"] = row["p99_ms"] - direct["p99_ms"]

        say(f"{name}: req/s at c=64")
        cpu = tree_cpu_seconds(relay.pid)
        figures = trio.run(load, relay.url, keys["bench"]["key"], 64, args.seconds, True)
        cpu = tree_cpu_seconds(relay.pid) - cpu
        row["rps"] = figures["rps"]
        row["errors"] = figures["errors"]
        row["cpu_ms_per_request"] = 1000 * cpu / max(1, figures["requests"])

        say(f"{name}: concurrency peak (cap 8, 64 clients)")
        httpx2.post(sim.url + "/_sim/reset", timeout=10)
        trio.run(stream_clients, relay.url, {"capped": keys["capped"]["key"]}, 64,
                 args.seconds, "#sim tokens=10 delay=0.01")
        row["concurrency_peak"] = sim_stats(sim.url)["peak_active_streams"]

        say(f"{name}: fairness (weights 1:3, pool cap 4)")
        served = trio.run(
            stream_clients, relay.url,
            {"light": keys["light"]["key"], "heavy": keys["heavy"]["key"]}, 8,
            args.fair_seconds, "#sim tokens=12 delay=0.004",
        )
        row["fairness_ratio"] = served["heavy"] / max(1, served["light"])

        if args.tpm_seconds and (workers > 1 or args.tpm_all):
            say(f"{name}: TPM accuracy over {args.tpm_seconds:g} s")
            started = time.time()
            trio.run(tpm_load, relay.url, keys["metered"]["key"], args.tpm_seconds)
            time.sleep(1.5)  # the last usage rows
            row["tpm_percent_per_minute"] = minutes_of_tokens(
                run / "relay.db", keys["metered"]["id"], started, int(args.tpm_seconds // 60)
            )
    finally:
        relay.stop()
    return row


def say(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def report(rows: list[dict], machine: dict) -> str:
    def fmt(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    table = markdown_table(
        ("arm", "req/s c=64", "CPU ms/req", "added p50 ms", "added p99 ms", "peak (cap 8)",
         "fairness 1:3", "TPM % per minute"),
        "lrrrrrrl",
        [
            (row["arm"], f"{row['rps']:.0f}", fmt(row["cpu_ms_per_request"]),
             fmt(row["added_p50_ms"]), fmt(row["added_p99_ms"]), row["concurrency_peak"],
             fmt(row["fairness_ratio"], 3),
             ", ".join(f"{p:.1f}" for p in row.get("tpm_percent_per_minute", [])) or "–")
            for row in rows
        ],
    )
    return f"{machine_line(machine)}\n\n{table}\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scaleout")
    parser.add_argument("--seconds", type=float, default=6.0, help="req/s and peak phases")
    parser.add_argument("--fair-seconds", type=float, default=8.0)
    parser.add_argument("--latency-requests", type=int, default=400)
    parser.add_argument("--tpm-seconds", type=float, default=None,
                        help="TPM phase (full minutes after the first count; default 180, "
                        "--quick 120); 0: none")
    parser.add_argument("--tpm-all", action="store_true", help="TPM phase in every arm")
    parser.add_argument("--quick", action="store_true", help="shorter phases, one TPM minute")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaleout.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.fair_seconds, args.latency_requests = 4.0, 6.0, 200
    if args.tpm_seconds is None:
        args.tpm_seconds = 120.0 if args.quick else 180.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as name:
        tmp = Path(name)
        redis, redis_url = start_redis(tmp)
        sim = start_sim(tmp, "--ttft", "0", "--token-delay", "0", "--tokens", "8")
        try:
            say("direct: latency at c=1 against the simulated upstream")
            trio.run(latencies, sim.url, BENCH_SIM_KEY, 50)
            times = trio.run(latencies, sim.url, BENCH_SIM_KEY, args.latency_requests)
            direct = {"p50_ms": percentile(times, 50) * 1000,
                      "p99_ms": percentile(times, 99) * 1000}
            for arm, workers, shared in ARMS:
                rows.append(run_arm(tmp, sim, direct, arm, workers,
                                    redis_url if shared else None, args))
        finally:
            sim.stop()
            redis.terminate()
            redis.wait()
    machine = machine_info()
    text = report(rows, machine)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "direct": direct, "rows": rows}, indent=2))
    return 0
