"""``python -m bench workers``: how ``relay serve --workers 2`` spreads load over its workers.

The relay runs on the simulated upstream (non-streamed chat completions), once as one process
and once with two workers sharing the parent's listening socket (``relay/workers.py``), under
two loads from ``bench/wire.py``: **keep-alive**, ``--connections`` connections opened at once
and each used for request after request (a load balancer's pattern), and **new connection per
request**, ``--connections`` clients each opening a connection per request. It reports req/s and
each worker's share of the requests, counted from the access log (``[worker N]``).

When the shared socket was chosen, the comparison arm (each worker binding its own
``SO_REUSEPORT`` socket) ran with ``RELAY_WORKER_SOCKETS=reuseport`` at commit f3dd493; the
figures of both are in bench/README.md and ``relay/workers.py``.
Two workers need ``server.redis_url``: the bench starts Debian's ``redis-server`` on a free
loopback port with persistence off.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio

from . import wire
from .common import BENCH_ADMIN_ENV, create_key, markdown_table, start_relay, start_sim

MODEL = "gpt-5.5"
BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
).encode()
_WORKER = re.compile(r"relay\.access(?: \[worker (\d+)\])?:")


def relay_config(sim_url: str, database: Path, workers: int, redis_url: str) -> str:
    return textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:0"
        database = "{database}"
        admin_token_env = "{BENCH_ADMIN_ENV}"
        keep_alive_timeout_s = 120.0
        workers = {workers}
        redis_url = "{redis_url}"

        [pools.bench]

        [packages.bench]
        pool = "bench"

        [[accounts]]
        name = "sim-chat"
        pool = "bench"
        provider = "openai-chat"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["{MODEL}"]
        """)


async def load(url: str, key: str, connections: int, seconds: float, keep_alive: bool) -> dict:
    headers = {"authorization": f"Bearer {key}"}
    if not keep_alive:
        headers["connection"] = "close"
    request = wire.prepare(url, "/v1/chat/completions", BODY, headers)
    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done, errors
        conn = wire.Connection(url)
        try:
            while time.perf_counter() < deadline:
                try:
                    await conn.send(request)
                    head = await conn.head()
                    await conn.body(head)
                    if head.status == 200:
                        done += 1
                    else:
                        errors += 1
                    if not head.keep_alive:
                        await conn.aclose()
                except (wire.WireError, OSError):
                    errors += 1
                    await conn.aclose()
        finally:
            await conn.aclose()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(client)
    return {"requests": done, "errors": errors, "rps": done / (time.perf_counter() - started)}


def shares(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.read_text().splitlines():
        match = _WORKER.search(line)
        if match and "path=/v1/chat/completions" in line:
            name = match.group(1) or "1"
            counts[name] = counts.get(name, 0) + 1
    return counts


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("bench workers: redis-server is missing (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench workers")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as name:
        tmp = Path(name)
        redis, redis_url = start_redis(tmp)
        sim = start_sim(tmp, "--ttft", "0", "--token-delay", "0", "--tokens", "8")
        try:
            for workers in (1, 2):
                run = tmp / f"w{workers}"
                run.mkdir()
                config = relay_config(sim.url, run / "relay.db", workers, redis_url)
                (run / "relay.toml").write_text(config)
                key = create_key(run / "relay.toml", "bench", "bench")["key"]
                relay = start_relay(run, config)
                try:
                    for connections, keep_alive in [
                        (c, k) for c in args.connections for k in (True, False)
                    ]:
                        before = shares(relay.log)
                        figures = trio.run(
                            load, relay.url, key, connections, args.seconds, keep_alive
                        )
                        time.sleep(0.3)  # the last access lines
                        after = shares(relay.log)
                        served = {w: after.get(w, 0) - before.get(w, 0) for w in after}
                        total = sum(served.values()) or 1
                        rows.append({
                            "workers": workers,
                            "load": "keep-alive" if keep_alive else "new connection each",
                            "connections": connections,
                            **figures,
                            "share": {w: round(n / total, 3) for w, n in sorted(served.items())},
                        })
                        print(
                            f"  done: workers={workers} c={connections} keep_alive={keep_alive}",
                            file=sys.stderr, flush=True,
                        )
                finally:
                    relay.stop()
        finally:
            sim.stop()
            redis.terminate()
            redis.wait()
    print(markdown_table(
        ("workers", "load", "connections", "req/s", "errors", "share per worker"), "rllrrl",
        [
            (row["workers"], row["load"], row["connections"], f"{row['rps']:.0f}",
             row["errors"], " / ".join(f"{s:.0%}" for s in row["share"].values()))
            for row in rows
        ],
    ))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0
