"""What billing adds to each request, in CPU time: the credit check and hold, pricing and debiting
the usage record, counting it for the metrics, and writing usage batches with their debits.

In-process and single-threaded (no servers): the figures are the ledger's own cost per request,
to set against the ~1-2 ms a relayed request costs the relay (bench.overhead).

    .venv/bin/python -m bench.ledger [--requests N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from relay.config import parse_config
from relay.ledger.credits import Credits
from relay.ledger.prices import PriceTable, parse_credits
from relay.ledger.store import Store
from relay.ledger.usage import UsageRecord
from relay.metrics import Metrics

from .common import machine_info, machine_line

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    count = args.requests
    config = parse_config(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
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


if __name__ == "__main__":
    main()
