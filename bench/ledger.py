"""What billing adds to each request, in CPU time: the credit check and hold, pricing and debiting
the usage record, counting it for the metrics, and writing usage batches with their debits; and
both ledger backends side by side (SQLite, PostgreSQL): usage rows written per second, and the
p50 of a relayed request with each, against the simulated upstream called directly.

The CPU figures are in-process and single-threaded (no servers): the ledger's own cost per
request, to set against the ~1-2 ms a relayed request costs the relay (bench.overhead). The
backends part starts a real PostgreSQL (``relay/testing/postgres.py``, Debian's server in a
temporary folder) unless ``--postgres URL`` names one (its password in ``PGPASSWORD``).

    .venv/bin/python -m bench.ledger [--requests N] [--calls N] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import httpx2

from relay.config import parse_config
from relay.ledger.backend import LedgerStore, open_store
from relay.ledger.credits import Credits
from relay.ledger.prices import PriceTable, parse_credits
from relay.ledger.usage import UsageRecord
from relay.metrics import Metrics
from relay.testing.postgres import PG_PASSWORD, PostgresServer

from .common import (
    BENCH_ADMIN_ENV,
    BENCH_SIM_KEY,
    create_key,
    machine_info,
    machine_line,
    percentile,
    start_relay,
    start_sim,
)

#: The variable the benchmark's relays read the PostgreSQL password from.
PASSWORD_ENV = "RELAY_BENCH_PG_PASSWORD"

CONFIG = {
    "pools": {"p": {}},
    "packages": {"k": {"pool": "p"}},
    "accounts": [{"name": "a", "pool": "p", "provider": "openai-chat",
                  "base_url": "http://127.0.0.1:9/v1", "models": ["gpt-5"]}],
    "prices": {"gpt-5": {"input": 1.25, "cached_input": 0.125, "output": 10.0}},
}


def record(index: int, key_id: str) -> UsageRecord:
    return UsageRecord(
        request_id=f"req_{index}", key_id=key_id, package="k", endpoint="chat/completions",
        model="gpt-5", upstream_model="gpt-5", status=200, account="a", input_tokens=1200,
        cached_tokens=300, output_tokens=450, reasoning_tokens=120, ttft_ms=230.0,
        queue_ms=1.5,
    )


def per_request_us(started: float, count: int) -> float:
    return (time.perf_counter() - started) / count * 1e6


def insert_rate(store: LedgerStore, rows: list[dict]) -> float:
    """Rows per second of the usage writer's batches of 500 (with the keys' debits)."""
    started = time.perf_counter()
    for start in range(0, len(rows), 500):
        store.insert_usage(rows[start : start + 500])
    return len(rows) / (time.perf_counter() - started)


def request_p50_ms(url: str, key: str, calls: int) -> float:
    """p50 of ``calls`` sequential non-streamed chat completions (keep-alive), in ms."""
    text = "#sim tokens=8 ttft=0 delay=0"
    body = {"model": "gpt-5", "messages": [{"role": "user", "content": text}]}
    headers = {"authorization": f"Bearer {key}"}
    times = []
    with httpx2.Client(timeout=30) as client:
        for index in range(calls + calls // 5):
            started = time.perf_counter()
            response = client.post(url + "/v1/chat/completions", json=body, headers=headers)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if index >= calls // 5:  # the first fifth warms up
                times.append(elapsed * 1000)
    return percentile(times, 0.5) or 0.0


def relay_config(sim_url: str, database: str) -> str:
    return textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:0"
        database = "{database}"
        database_password_env = "{PASSWORD_ENV}"
        admin_token_env = "{BENCH_ADMIN_ENV}"

        [pools.p]

        [packages.k]
        pool = "p"
        initial_credits = 1000000

        [[accounts]]
        name = "sim"
        pool = "p"
        provider = "openai-chat"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["gpt-5"]

        [prices.gpt-5]
        input = 1.25
        output = 10
        """)


def backends(tmp: Path, postgres_url: str | None, calls: int) -> list[tuple[str, float, float]]:
    """``(backend, usage rows/s, request p50 ms)`` for SQLite and PostgreSQL, and the sim
    called directly (``direct``, no rows)."""
    results = []
    with ExitStack() as stack:
        if postgres_url is None:
            server = PostgresServer()
            stack.callback(server.remove)
            server.start()
            stack.callback(server.stop, "immediate")
            os.environ[PASSWORD_ENV] = PG_PASSWORD
            make_pg = server.create_database
        else:
            os.environ[PASSWORD_ENV] = os.environ.get("PGPASSWORD", "")
            make_pg = lambda: postgres_url  # noqa: E731
        sim = start_sim(tmp)
        stack.callback(sim.stop)
        results.append(("direct", 0.0, request_p50_ms(sim.url, BENCH_SIM_KEY, calls)))
        for backend, database in (("sqlite", str(tmp / "relay.db")), ("postgresql", make_pg())):
            store = open_store(database, password_env=PASSWORD_ENV)
            _, key = store.create_key("k", prefix="cr_", credits_nano=parse_credits(10**9))
            rows = [record(index, key.id).row() | {"cost_nano": 7} for index in range(50_000)]
            rate = insert_rate(store, rows)
            store.close()
            folder = tmp / backend
            folder.mkdir()
            (folder / "relay.toml").write_text(relay_config(sim.url, database))
            plaintext = create_key(folder / "relay.toml", "k", "bench")["key"]
            relay = start_relay(folder, relay_config(sim.url, database))
            try:
                p50 = request_p50_ms(relay.url, plaintext, calls)
            finally:
                relay.stop()
            results.append((backend, rate, p50))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=1000, help="requests per backend's p50")
    parser.add_argument("--postgres", default=None, metavar="URL",
                        help="an empty PostgreSQL database to use (default: start one)")
    args = parser.parse_args(argv)
    count = args.requests
    config = parse_config(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "bench.db")
        _, key = store.create_key("k", prefix="cr_", credits_nano=parse_credits(10**9))
        credits = Credits(PriceTable(config.prices), store.list_keys())
        metrics = Metrics(config)
        records = [record(index, key.id) for index in range(count)]

        started = time.perf_counter()
        for item in records:
            with credits.hold_local(key, item, input_tokens=1300, output_tokens=1024):
                pass
        hold_us = per_request_us(started, count)

        started = time.perf_counter()
        for item in records:
            credits.charge(item)
        charge_us = per_request_us(started, count)

        started = time.perf_counter()
        for item in records:
            metrics.observe(item)
        observe_us = per_request_us(started, count)

        rows = [item.row() for item in records[:50_000]]
        started = time.perf_counter()
        for start in range(0, len(rows), 500):
            store.insert_usage(rows[start : start + 500])
        insert_rows_s = len(rows) / (time.perf_counter() - started)
        for row in rows:
            row["cost_nano"] = 0
        started = time.perf_counter()
        for start in range(0, len(rows), 500):
            store.insert_usage(rows[start : start + 500])
        insert_free_rows_s = len(rows) / (time.perf_counter() - started)
        store.close()
        compared = backends(Path(tmp), args.postgres, args.calls)

    print(machine_line(machine_info()))
    print()
    print("| step (per request) | µs |")
    print("|---|---|")
    print(f"| credit check + hold + release (priced model) | {hold_us:.2f} |")
    print(f"| price the usage record + debit in memory | {charge_us:.2f} |")
    print(f"| count it for the metrics | {observe_us:.2f} |")
    print()
    print("| usage batches of 500 into SQLite (WAL) | rows/s |")
    print("|---|---|")
    print(f"| with the key debits in the same transaction | {insert_rows_s:,.0f} |")
    print(f"| rows that cost nothing (no debit statement) | {insert_free_rows_s:,.0f} |")
    print()
    direct = compared[0][2]
    print("| ledger backend | usage rows/s (batches of 500) | request p50 ms | added p50 ms |")
    print("|---|---|---|---|")
    for backend, rate, p50 in compared:
        rows_s = "–" if backend == "direct" else f"{rate:,.0f}"
        added = "–" if backend == "direct" else f"{p50 - direct:.2f}"
        name = "simulated upstream, directly" if backend == "direct" else backend
        print(f"| {name} | {rows_s} | {p50:.2f} | {added} |")


if __name__ == "__main__":
    main()
