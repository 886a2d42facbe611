"""Does the pool's fair queue share a saturated pool by key weight?

One pool whose ``max_concurrency`` is the bottleneck, one package, four keys with weights
1:2:3:4, each kept backlogged by closed-loop clients, in front of a simulated upstream whose
token rate (``--capacity-tps``) is shared by its concurrent streams. The same load runs against
a ``queue = "fair"`` pool, a ``queue = "fifo"`` pool and a fair pool where two keys start late;
then both fair runs again with ``max_tokens`` set on every request (so the relay's token
estimate is exact), as controls.

    .venv/bin/python -m bench.fairness            # 5 runs of 50 s, about 5 minutes
    .venv/bin/python -m bench.fairness --quick    # 5 runs of 15 s, about 2 minutes

Prints Markdown tables, writes JSON and a PNG plot. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import trio

from .common import (
    BENCH_ADMIN_ENV,
    BENCH_ADMIN_TOKEN,
    ROOT,
    Server,
    StreamFailed,
    admin_state,
    bench_client,
    chat_stream_usage,
    create_key,
    machine_info,
    machine_line,
    start_relay,
    start_sim,
)

MODEL = "gpt-5.5"
WEIGHTS = (1, 2, 3, 4)
POOL_CONCURRENCY = 8  # the bottleneck: the pool's slots
OUTSTANDING = 24  # requests each key keeps in flight or queued (closed loop)
SIM_CAPACITY_TPS = 1200  # the sim's token rate, shared by its concurrent streams
TOKENS = 40  # output tokens of every request
DIRECTIVE = f"#sim tokens={TOKENS} delay=0.002 ttft=0.01"
LATE_KEYS = (2, 3)  # indices of the keys that start late in the late-start run (weights 3, 4)
LATE_AT = 1 / 3  # … after this fraction of the run
JOIN_WINDOW_S = 5.0  # "right after they join"
SETTLE_S = 2.0  # the figures start this long after every key is backlogged (see analyse)
SLICE_S = 10.0  # the share of each key is also given per slice of this length
MAX_REQUESTS_PER_CLIENT = 2000  # every loop is bounded in count as well as in time
TARGET_JAIN = 0.99
TARGET_RATIO_ERROR_PCT = 3.0
DEFAULT_OUT = ROOT / "bench" / "results" / "fairness.json"


@dataclass(frozen=True)
class Run:
    name: str
    queue: str  # the pool's queue: "fair" or "fifo"
    late: tuple[int, ...] = ()  # keys (indices) that start at LATE_AT of the run
    max_tokens: int | None = None  # sent with every request (the relay's output estimate)
    targets: bool = True  # whether the fairness targets apply


RUNS = (
    Run("fair", "fair"),
    Run("fifo", "fifo", targets=False),
    Run("fair-late", "fair", late=LATE_KEYS),
    # Controls: the same fair runs with max_tokens = the real output, so the relay's estimate
    # (input + max_tokens, else input + 1024) is exact and in-flight requests are not overcharged.
    Run("fair+max_tokens", "fair", max_tokens=TOKENS),
    Run("fair-late+max_tokens", "fair", late=LATE_KEYS, max_tokens=TOKENS),
)


@dataclass
class Done:
    """One completed request: which key, when (s since the load started), what it cost."""

    key: int
    t: float
    total_tokens: int
    output_tokens: int
    queue_ms: float


@dataclass
class Load:
    done: list[Done] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    samples: list[dict] = field(default_factory=list)  # /admin/state during the run


def relay_config(sim_url: str, database: Path, queue: str) -> str:
    return textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:0"
        database = "{database}"
        admin_token_env = "{BENCH_ADMIN_ENV}"
        keep_alive_timeout_s = 120.0

        [pools.bench]
        max_concurrency = {POOL_CONCURRENCY}
        max_queue = 1000
        queue = "{queue}"

        [packages.bench]
        pool = "bench"
        queue_timeout_s = 300

        [[accounts]]
        name = "sim"
        pool = "bench"
        provider = "openai-chat"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["{MODEL}"]
        """)


def request_body(run: Run) -> dict:
    body: dict = {
        "model": MODEL,
        "messages": [{"role": "user", "content": DIRECTIVE}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if run.max_tokens is not None:
        body["max_tokens"] = run.max_tokens
    return body


async def drive(relay_url: str, keys: list[dict], run: Run, seconds: float) -> Load:
    """Closed-loop clients: OUTSTANDING per key, each sending the next request as soon as the
    previous one ends, until ``seconds`` have passed (late keys start at LATE_AT of them)."""
    load = Load()
    body = request_body(run)
    start = trio.current_time()
    stop = start + seconds
    ids = {key["id"]: index for index, key in enumerate(keys)}

    async def client_loop(client: httpx2.AsyncClient, index: int) -> None:
        if index in run.late:
            await trio.sleep_until(start + seconds * LATE_AT)
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if trio.current_time() >= stop:
                return
            try:
                usage, headers = await chat_stream_usage(client, keys[index]["key"], body)
            except (httpx2.HTTPError, StreamFailed) as exc:
                load.errors += 1
                load.first_error = load.first_error or f"{type(exc).__name__}: {exc}"
                await trio.sleep(0.1)
                continue
            load.done.append(
                Done(
                    index,
                    round(trio.current_time() - start, 4),
                    usage["total_tokens"],
                    usage["completion_tokens"],
                    float(headers.get("x-relay-queue-ms", "nan")),
                )
            )

    async def sample_state(client: httpx2.AsyncClient) -> None:
        admin = {"authorization": f"Bearer {BENCH_ADMIN_TOKEN}"}
        while trio.current_time() < stop:
            await trio.sleep(1.0)
            state = (await client.get(relay_url + "/admin/state", headers=admin)).json()
            admission = state.get("admission", state)
            pool = admission["pools"]["bench"]
            per_key = {ids[k]: v for k, v in admission["keys"].items() if k in ids}
            load.samples.append(
                {
                    "t": round(trio.current_time() - start, 2),
                    "pool_in_flight": pool["in_flight"],
                    "queue_depth": pool["queue_depth"],
                    "in_flight": [per_key.get(i, {}).get("in_flight", 0) for i in range(4)],
                    "queued": [per_key.get(i, {}).get("queued", 0) for i in range(4)],
                    "virtual_counter": [
                        per_key.get(i, {}).get("virtual_counter") for i in range(4)
                    ],
                }
            )

    async with bench_client(relay_url + "/v1", len(keys) * OUTSTANDING + 8) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_state, client)
            for index in range(len(keys)):
                for _ in range(OUTSTANDING):
                    nursery.start_soon(client_loop, client, index)
    load.done.sort(key=lambda d: d.t)
    return load


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def service(done: list[Done], t0: float, t1: float) -> list[int]:
    tokens = [0] * len(WEIGHTS)
    for d in done:
        if t0 <= d.t < t1:
            tokens[d.key] += d.total_tokens
    return tokens


def max_gap(done: list[Done], t0: float, t1: float) -> tuple[float, float]:
    """max over time of max_i,j |S_i/w_i − S_j/w_j|, with S counted from t0; and when."""
    cumulative = [0.0] * len(WEIGHTS)
    worst, when = 0.0, t0
    for d in done:
        if t0 <= d.t < t1:
            cumulative[d.key] += d.total_tokens / WEIGHTS[d.key]
            gap = max(cumulative) - min(cumulative)
            if gap > worst:
                worst, when = gap, d.t
    return worst, when


def share_errors(tokens: list[int]) -> list[float] | None:
    """Each key's share of the tokens vs its share of the weights, in % (0 = exact)."""
    total = sum(tokens)
    if not total:
        return None
    return [
        round((t / total) / (w / sum(WEIGHTS)) * 100 - 100, 1)
        for t, w in zip(tokens, WEIGHTS, strict=True)
    ]


def analyse(run: Run, load: Load, seconds: float) -> dict:
    """Figures over the window in which every key is backlogged, from SETTLE_S after the last
    key arrived until the clients stop. The settling time leaves out the requests that were
    already running when the last key's first requests were queued (they were granted while
    that key was absent, which is work-conserving, not unfair): one round of the pool's slots."""
    backlogged = seconds * LATE_AT if run.late else 0.0
    t0 = backlogged + SETTLE_S
    tokens = service(load.done, t0, seconds)
    ratios = [t / tokens[0] if tokens[0] else None for t in tokens]
    errors = [
        None if r is None else round((r / (w / WEIGHTS[0]) - 1) * 100, 2)
        for r, w in zip(ratios, WEIGHTS, strict=True)
    ]
    gap, gap_at = max_gap(load.done, t0, seconds)
    gap_all, gap_all_at = max_gap(load.done, backlogged, seconds)
    slices = [
        share_errors(service(load.done, a, min(a + SLICE_S, seconds)))
        for a in [backlogged + i * SLICE_S for i in range(int((seconds - backlogged) // SLICE_S))]
    ]
    in_window = [d for d in load.done if t0 <= d.t < seconds]
    samples = [s for s in load.samples if t0 <= s["t"] < seconds]
    held = [
        round(sum(s["in_flight"][i] for s in samples) / max(1, len(samples)), 2)
        for i in range(len(WEIGHTS))
    ]
    result: dict = {
        "window_s": [round(t0, 2), round(seconds, 2)],
        "requests": len(in_window),
        "tokens": tokens,
        "tokens_per_s": round(sum(tokens) / (seconds - t0), 1),
        "ratio_to_key1": [None if r is None else round(r, 4) for r in ratios],
        "weight_ratio": [w / WEIGHTS[0] for w in WEIGHTS],
        "ratio_error_pct": errors,
        "jain": round(jain([t / w for t, w in zip(tokens, WEIGHTS, strict=True)]), 5),
        "max_weighted_gap": round(gap, 1),
        "max_weighted_gap_at_s": gap_at,
        "max_weighted_gap_from_arrival": round(gap_all, 1),
        "max_weighted_gap_from_arrival_at_s": gap_all_at,
        "share_error_pct_per_slice": slices,
        "mean_queue_ms": [
            round(sum(d.queue_ms for d in in_window if d.key == i) / max(1, n), 1)
            for i, n in enumerate(sum(d.key == i for d in in_window) for i in range(4))
        ],
        "mean_slots_held": held,
        "errors": load.errors,
        "first_error": load.first_error,
    }
    if run.targets:
        worst = max(abs(e) for e in errors if e is not None) if all(tokens) else None
        result["targets_met"] = {
            "jain": result["jain"] >= TARGET_JAIN,
            "ratios": worst is not None and worst <= TARGET_RATIO_ERROR_PCT,
        }
    if run.late:
        result["join"] = join_figures(run, load, seconds * LATE_AT)
    return result


def join_figures(run: Run, load: Load, joined: float) -> dict:
    """Right after the late keys arrive: do they burst past the keys that were there?"""
    end = joined + JOIN_WINDOW_S
    tokens = service(load.done, joined, end)
    early = [i for i in range(len(WEIGHTS)) if i not in run.late]
    cumulative = [0.0] * len(WEIGHTS)
    lead = 0.0  # max over time of (late key's S/w) − (largest early key's S/w)
    for d in load.done:
        if joined <= d.t < end:
            cumulative[d.key] += d.total_tokens / WEIGHTS[d.key]
            late_best = max(cumulative[i] for i in run.late)
            lead = max(lead, late_best - max(cumulative[i] for i in early))
    late_share = sum(tokens[i] for i in run.late) / max(1, sum(tokens))
    fair_share = sum(WEIGHTS[i] for i in run.late) / sum(WEIGHTS)
    gap, _ = max_gap(load.done, joined, end)
    return {
        "joined_at_s": round(joined, 2),
        "window_s": JOIN_WINDOW_S,
        "tokens": tokens,
        "late_share": round(late_share, 4),
        "late_fair_share": round(fair_share, 4),
        "max_weighted_gap": round(gap, 1),
        "max_late_lead": round(lead, 1),
    }


async def run_one(sim: Server, tmp: Path, run: Run, seconds: float) -> tuple[Load, dict]:
    """A fresh relay (config, database, keys) for one run, the load, and its state after."""
    work = tmp / run.name
    work.mkdir()
    (work / "relay.toml").write_text(relay_config(sim.url, work / "relay.db", run.queue))
    keys = [create_key(work / "relay.toml", "bench", f"w{w}", weight=w) for w in WEIGHTS]
    relay = start_relay(work, (work / "relay.toml").read_text())
    try:
        load = await drive(relay.url, keys, run, seconds)
        await trio.sleep(0.5)
        state = admin_state(relay.url)
    finally:
        code = relay.stop()
    if "Traceback" in relay.log.read_text():
        print(f"traceback in the relay log of run {run.name}", file=sys.stderr)
    return load, {"state_after": state, "exit_code": code}


def timeline(load: Load, seconds: float) -> list[list[tuple[float, float]]]:
    """Per key: (t, cumulative tokens / weight) at each of its completions until the stop."""
    lines: list[list[tuple[float, float]]] = [[(0.0, 0.0)] for _ in WEIGHTS]
    for d in load.done:
        if d.t >= seconds:
            break
        last = lines[d.key][-1][1]
        lines[d.key].append((d.t, last + d.total_tokens / WEIGHTS[d.key]))
    return lines


def deviations(load: Load, start: float, seconds: float) -> list[list[tuple[float, float]]]:
    """Per key: (t, S_i/w_i − mean over keys of S_j/w_j) at every completion, with S counted
    from ``start`` (when every key is backlogged). 0 for all keys = exactly weighted."""
    cumulative = [0.0] * len(WEIGHTS)
    lines: list[list[tuple[float, float]]] = [[(start, 0.0)] for _ in WEIGHTS]
    for d in load.done:
        if start <= d.t < seconds:
            cumulative[d.key] += d.total_tokens / WEIGHTS[d.key]
            mean = sum(cumulative) / len(cumulative)
            for index, line in enumerate(lines):
                line.append((d.t, cumulative[index] - mean))
    return lines


def plot(results: list[dict], loads: list[Load], seconds: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(results)
    fig, grid = plt.subplots(2, columns, figsize=(4.4 * columns, 8), squeeze=False)
    top, bottom = grid
    starts = [seconds * LATE_AT if r["run"]["late"] else 0.0 for r in results]
    gaps = [deviations(load, start, seconds) for load, start in zip(loads, starts, strict=True)]
    # One scale for the fair runs' deviations, so they compare (FIFO's is far larger).
    shared = max(
        (abs(v) for result, lines in zip(results, gaps, strict=True)
         if result["run"]["queue"] == "fair" for line in lines for _, v in line),
        default=1.0,
    )
    for column, (result, load) in enumerate(zip(results, loads, strict=True)):
        ax, dev = top[column], bottom[column]
        for index, line in enumerate(timeline(load, seconds)):
            xs, ys = zip(*line, strict=True)
            ax.step(xs, ys, where="post", label=f"key {index + 1} (w={WEIGHTS[index]})")
        late, start = result["run"]["late"], starts[column]
        for line in gaps[column]:
            xs, ys = zip(*line, strict=True)
            dev.step(xs, ys, where="post", linewidth=1)
        if late:
            for axis in (ax, dev):
                axis.axvline(start, color="grey", linestyle="--", linewidth=1)
        figures = result["figures"]
        worst = max((abs(e) for e in figures["ratio_error_pct"] if e is not None), default=0)
        ax.set_title(
            f"{result['run']['name']}: Jain {figures['jain']:.3f}, worst ratio error {worst:.1f}%",
            fontsize=10,
        )
        dev.set_title(f"{result['run']['name']}: deviation from the keys' mean", fontsize=10)
        dev.set_xlim(0, seconds)
        dev.set_xlabel("seconds")
        for axis in (ax, dev):
            axis.grid(alpha=0.3)
    for column, result in enumerate(results):
        top[column].sharey(top[0])
        if result["run"]["queue"] == "fair":
            bottom[column].set_ylim(-shared * 1.1, shared * 1.1)
    top[0].set_ylabel("cumulative tokens / weight")
    bottom[0].set_ylabel("S/w − mean S/w, from the last key's arrival")
    top[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def report(results: list[dict]) -> str:
    lines = [
        "| run | window s | requests | tokens/s | Jain (≥ 0.99) | worst ratio error % (≤ 3) "
        "| max weighted gap (window) | max weighted gap (from arrival) | targets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        f = result["figures"]
        errors = [abs(e) for e in f["ratio_error_pct"] if e is not None]
        met = f.get("targets_met")
        verdict = "baseline" if met is None else ("met" if all(met.values()) else "MISSED")
        lines.append(
            f"| {result['run']['name']} | {f['window_s'][0]:.0f}–{f['window_s'][1]:.0f} "
            f"| {f['requests']} | {f['tokens_per_s']:.0f} | {f['jain']:.4f} "
            f"| {fmt(max(errors) if errors else None)} | {f['max_weighted_gap']:.0f} "
            f"| {f['max_weighted_gap_from_arrival']:.0f} | {verdict} |"
        )
    lines += [
        "",
        f"| run | worst share error % per {SLICE_S:.0f} s slice, from the last key's arrival |",
        "|---|---|",
    ]
    for result in results:
        worst = [
            "–" if e is None else f"{max(abs(x) for x in e):.1f}"
            for e in result["figures"]["share_error_pct_per_slice"]
        ]
        lines.append(f"| {result['run']['name']} | {' / '.join(worst)} |")
    lines += [
        "",
        "| run | key | weight | tokens | ratio to key 1 | weight ratio | error % "
        "| mean slots held | mean queue ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        f = result["figures"]
        for i, weight in enumerate(WEIGHTS):
            lines.append(
                f"| {result['run']['name']} | {i + 1} | {weight} | {f['tokens'][i]} "
                f"| {fmt(f['ratio_to_key1'][i], '.3f')} | {f['weight_ratio'][i]:.0f} "
                f"| {fmt(f['ratio_error_pct'][i], '+.2f')} | {f['mean_slots_held'][i]:.2f} "
                f"| {f['mean_queue_ms'][i]:.0f} |"
            )
    for result in results:
        join = result["figures"].get("join")
        if join:
            lines.append(
                f"\n{result['run']['name']}: keys {', '.join(str(i + 1) for i in LATE_KEYS)} "
                f"joined at {join['joined_at_s']:.1f} s. In the {join['window_s']:.0f} s after: "
                f"their share of tokens {join['late_share'] * 100:.1f}% (fair share "
                f"{join['late_fair_share'] * 100:.0f}%), max weighted gap "
                f"{join['max_weighted_gap']:.0f}, largest lead of a late key over the early "
                f"keys {join['max_late_lead']:.0f} tokens/weight (0 = never ahead)."
            )
    for result in results:
        if result["figures"]["errors"]:
            lines.append(
                f"errors in {result['run']['name']}: {result['figures']['errors']}, first: "
                f"{result['figures']['first_error']}"
            )
    return "\n".join(lines)


async def run_all(sim: Server, tmp: Path, seconds: float) -> tuple[list[dict], list[Load]]:
    results, loads = [], []
    for run in RUNS:
        print(f"  run {run.name} ({seconds:.0f} s)…", file=sys.stderr, flush=True)
        load, extra = await run_one(sim, tmp, run, seconds)
        results.append({"run": asdict(run), "figures": analyse(run, load, seconds), **extra})
        loads.append(load)
    return results, loads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="15 s per run instead of 50 s")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    seconds = 15.0 if args.quick else 50.0
    machine = machine_info()
    print(machine_line(machine), file=sys.stderr, flush=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relay-bench-fair-") as tmp_name:
        tmp = Path(tmp_name)
        sim_options = ["--capacity-tps", str(SIM_CAPACITY_TPS), "--ttft", "0.01"]
        sim = start_sim(tmp, *sim_options, "--token-delay", "0.002")
        try:
            results, loads = trio.run(run_all, sim, tmp, seconds)
        finally:
            sim.stop()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(results, loads, seconds, png)
    for result, load in zip(results, loads, strict=True):
        result["raw"] = {"done": [asdict(d) for d in load.done], "state_samples": load.samples}
    out.write_text(
        json.dumps(
            {
                "benchmark": "relay fairness",
                "started_at": started,
                "quick": args.quick,
                "wall_s": round(time.monotonic() - wall, 1),
                "machine": machine,
                "settings": {
                    "weights": WEIGHTS,
                    "pool_max_concurrency": POOL_CONCURRENCY,
                    "outstanding_per_key": OUTSTANDING,
                    "sim_capacity_tps": SIM_CAPACITY_TPS,
                    "directive": DIRECTIVE,
                    "seconds_per_run": seconds,
                    "late_keys": [i + 1 for i in LATE_KEYS],
                    "late_at_s": seconds * LATE_AT,
                },
                "runs": results,
            },
            indent=1,
        )
        + "\n"
    )
    print(machine_line(machine) + "\n")
    print(report(results))
    print(f"\nJSON written to {out}, plot to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
