"""``python -m bench ab REF``: the relay at git REF against the working tree, in one run.

Both relays run at once on one simulated upstream, each with its own config and database; the
same load goes to each in alternating slices (REF, tree, REF, tree, …), so the machine's
background load hits both alike. This is how the optimisation commits measured their
before/after figures.

    .venv/bin/python -m bench ab HEAD~1              # 3 slices per figure
    .venv/bin/python -m bench ab HEAD~1 --slices 5

Figures: memory per open stream (1,000 idle streams, on fresh relays), non-stream latency at
concurrency 1 (p50, p99, relay CPU per request), throughput and CPU per request at
concurrency 64, and paced streams (relay CPU per 1,000 events, gap p99).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import trio

from .common import (
    ROOT,
    Server,
    machine_info,
    machine_line,
    percentile,
    raise_open_files_limit,
    start_server,
)
from .compare import (
    FULL,
    LARGE_PROMPT_BYTES,
    CpuMeter,
    Samples,
    Target,
    chat_body,
    closed_loop,
    idle_streams,
    paced_streams,
)
from .overhead import (
    ADMIN_ENV,
    ADMIN_TOKEN,
    NONSTREAM_DIRECTIVE,
    SIM_KEY,
    create_key,
    relay_config,
)


def export(ref: str, into: Path) -> Path:
    """``relay/`` as it is at ``ref``, unpacked into ``into``."""
    archive = subprocess.run(
        ["git", "archive", ref, "relay"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def start_relay(tmp: Path, name: str, sim_url: str, code: Path) -> tuple[Server, str]:
    home = tmp / name
    home.mkdir()
    config = home / "relay.toml"
    config.write_text(relay_config(sim_url, home / "relay.db"))
    key = create_key(config)
    env = {"SIM_UPSTREAM_KEY": SIM_KEY, ADMIN_ENV: ADMIN_TOKEN, "RELAY_LOG_LEVEL": "WARNING"}
    server = start_server(
        name,
        ["-m", "relay", "serve", "--config", str(config)],
        r"relay listening on (\S+)",
        home / "relay.log",
        env=env,
        cwd=code,
    )
    return server, key


async def compare(
    targets: list[Target], fresh: list[Target], slices: int, servers: dict[str, Server]
) -> list[str]:
    request_body = chat_body(NONSTREAM_DIRECTIVE, stream=False)
    rows: list[tuple[str, dict[str, float | None]]] = []
    for target in targets:  # at concurrency 1: see compare.warm
        await closed_loop(target.pool(1), target.request(request_body), 1.0, None)
    # Memory first, on heaps that have not yet grown (see bench/README.md); large prompts on
    # fresh relays, which are stopped afterwards.
    memory = {t.name: (await idle_streams(t, 1000))["kib_per_stream"] or 0.0 for t in targets}
    rows.append(("memory per open stream, 1,000 idle streams (KiB)", memory))
    memory = {}
    for target in fresh:
        await closed_loop(target.pool(1), target.request(request_body), 1.0, None)
        row = await idle_streams(target, 1000, LARGE_PROMPT_BYTES)
        memory[target.name] = row["kib_per_stream"] or 0.0
        await trio.to_thread.run_sync(target.process.stop)
    label = f"memory per open stream, 1,000 idle streams, {LARGE_PROMPT_BYTES // 1024} KiB prompts"
    rows.append((f"{label} (KiB)", memory))
    print("  memory done", file=sys.stderr, flush=True)

    for concurrency, seconds in ((1, 2.0), (64, 2.0)):
        samples = {t.name: Samples() for t in targets}
        meters = {t.name: CpuMeter(servers) for t in targets}
        for _ in range(slices):
            for target in targets:
                conns = target.pool(concurrency)
                request = target.request(request_body)
                await closed_loop(conns, request, 0.3, None)
                meters[target.name].start()
                await closed_loop(conns, request, seconds, samples[target.name])
                meters[target.name].stop()
        values = {}
        for target in targets:
            s, m = samples[target.name], meters[target.name]
            cpu = m.used[target.process.name] * 1000 / max(1, len(s.latency))
            if concurrency == 1:
                values[f"{target.name} p50"] = percentile(s.latency, 50) * 1000
                values[f"{target.name} p99"] = percentile(s.latency, 99) * 1000
            else:
                values[f"{target.name} req/s"] = len(s.latency) / m.wall_s
            values[f"{target.name} cpu"] = cpu
        if concurrency == 1:
            rows.append(("latency p50, concurrency 1 (ms)", _pair(values, "p50")))
            rows.append(("latency p99, concurrency 1 (ms)", _pair(values, "p99")))
            rows.append(("relay CPU per request, concurrency 1 (ms)", _pair(values, "cpu")))
        else:
            rows.append(("requests/s, concurrency 64", _pair(values, "req/s")))
            rows.append(("relay CPU per request, concurrency 64 (ms)", _pair(values, "cpu")))
        print(f"  non-stream c={concurrency} done", file=sys.stderr, flush=True)

    settings = dataclasses.replace(FULL, stream_delay_s=0.1, stream_ramp_s=2.0, stream_window_s=4.0)
    per_event: dict[str, list[float]] = {t.name: [] for t in targets}
    gaps: dict[str, list[float]] = {t.name: [] for t in targets}
    for _ in range(slices):
        for target in targets:
            row = await paced_streams(target, 200, settings, servers)
            per_event[target.name].append(row["cpu_ms_per_1000_events"] or 0.0)
            gaps[target.name].append(row["gap_ms"]["p99"] or 0.0)
    rows.append(
        (
            "relay CPU per 1,000 events, 200 streams at 100 ms (ms)",
            {t.name: sum(per_event[t.name]) / slices for t in targets},
        )
    )
    rows.append(
        (
            "gap p99, 200 streams at 100 ms (ms)",
            {t.name: sum(gaps[t.name]) / slices for t in targets},
        )
    )
    names = [t.name for t in targets]
    lines = [f"| figure | {' | '.join(names)} | {names[1]} ÷ {names[0]} |", "|---|---:|---:|---:|"]
    for figure, values in rows:
        a, b = values[names[0]], values[names[1]]
        ratio = f"{b / a:.3f}" if a else "–"
        lines.append(f"| {figure} | {a:.3f} | {b:.3f} | {ratio} |")
    return lines


def _pair(values: dict[str, float], suffix: str) -> dict[str, float]:
    return {k.rsplit(" ", 1)[0]: v for k, v in values.items() if k.endswith(" " + suffix)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ab", description=__doc__)
    parser.add_argument("ref", help="git revision to compare the working tree with")
    parser.add_argument("--slices", type=int, default=3)
    args = parser.parse_args(argv)
    raise_open_files_limit()
    print(machine_line(machine_info()), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="relay-bench-ab-") as tmp_name:
        tmp = Path(tmp_name)
        code = export(args.ref, tmp / "code")
        sim = start_server(
            "sim",
            ["-m", "relay.testing.upstream", "--port", "0", "--api-key", SIM_KEY],
            r"listening on (\S+)",
            tmp / "sim.log",
        )
        servers = {"sim": sim}
        fresh: list[Target] = []
        try:
            before, before_key = start_relay(tmp, "before", sim.url, code)
            servers["before"] = before
            after, after_key = start_relay(tmp, "after", sim.url, ROOT)
            servers["after"] = after
            targets = [
                Target("before", before.url, before_key, before),
                Target("after", after.url, after_key, after),
            ]
            for name, at in (("before", code), ("after", ROOT)):
                server, key = start_relay(tmp, f"{name}-fresh", sim.url, at)
                fresh.append(Target(name, server.url, key, server))
            lines = trio.run(compare, targets, fresh, args.slices, servers)
        finally:
            for server in [*servers.values(), *(t.process for t in fresh)]:
                server.stop()
    print(f"before = {args.ref}, after = working tree; {args.slices} alternating slices each\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
