"""Does a key's TPM limit hold minute by minute when the relay's token estimates are wrong?

One key whose package allows ``tpm = 60000``, driven well above it by closed-loop clients whose
requests mix prompt sizes and output lengths (``#sim tokens=N``, N random 50-400), half of them
with a ``max_tokens`` (so the relay's estimate is close) and half without (so the relay assumes
1024 output tokens). Each request's real ``total_tokens`` is attributed to the minute in which it
completed; every full minute after the first (warm-up: the bucket starts full) is compared with
the limit. The relay's estimate is recomputed here for every request and compared with the usage.

    .venv/bin/python -m bench.tpm                 # 4 minutes
    .venv/bin/python -m bench.tpm --quick         # 1.5 minutes (does not meet the 3-minute bar)

Prints Markdown tables, writes JSON and a PNG plot. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
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
    StreamFailed,
    admin_state,
    bench_client,
    chat_stream_usage,
    create_key,
    machine_info,
    machine_line,
    percentile,
    start_relay,
    start_sim,
)

MODEL = "gpt-5.5"
TPM = 60_000
CLIENTS = 16
OUTPUT_RANGE = (50, 400)  # #sim tokens=N
PROMPT_CHARS = (100, 8000)  # log-uniform padding of the prompt
MAX_TOKENS_SHARE = 0.5  # share of requests that set max_tokens (uniform in OUTPUT_RANGE)
SIM_OPTIONS = ("--ttft", "0.05", "--token-delay", "0.01")  # 100 tokens/s per stream
CHARS_PER_TOKEN, DEFAULT_OUTPUT = 4, 1024  # as relay/protocol/requests.py
TARGET_PCT = (97.0, 100.5)
MIN_MEASURED_MINUTES = 3
MAX_REQUESTS_PER_CLIENT = 5000
SEED = 20240611
DEFAULT_OUT = ROOT / "bench" / "results" / "tpm.json"


@dataclass
class Done:
    """One completed request (times in s since the load started)."""

    sent: float
    t: float
    queue_ms: float
    prompt_chars: int
    sim_tokens: int
    max_tokens: int | None
    estimate: int
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Load:
    done: list[Done] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    samples: list[dict] = field(default_factory=list)  # the key's guard, from /admin/state


def relay_config(sim_url: str, database: Path) -> str:
    return textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:0"
        database = "{database}"
        admin_token_env = "{BENCH_ADMIN_ENV}"
        keep_alive_timeout_s = 120.0

        [pools.bench]

        [packages.bench]
        pool = "bench"
        tpm = {TPM}
        queue_timeout_s = 600

        [[accounts]]
        name = "sim"
        pool = "bench"
        provider = "openai-chat"
        base_url = "{sim_url}/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["{MODEL}"]
        """)


def relay_estimate(messages: list[dict], max_tokens: int | None) -> int:
    """The relay's estimate (relay/protocol/requests.py): input chars / 4 + (max_tokens or
    1024), the chars being the messages as compact JSON."""
    chars = len(json.dumps(messages, ensure_ascii=False, separators=(",", ":")))
    return max(1, chars // CHARS_PER_TOKEN) + (max_tokens or DEFAULT_OUTPUT)


def make_request(rng: random.Random) -> tuple[dict, int, int, int | None]:
    """A request body, its prompt padding size, its output directive and its max_tokens."""
    chars = int(math.exp(rng.uniform(math.log(PROMPT_CHARS[0]), math.log(PROMPT_CHARS[1]))))
    padding = ("lorem ipsum dolor sit amet " * (chars // 27 + 1))[:chars]
    tokens = rng.randint(*OUTPUT_RANGE)
    body: dict = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"{padding}\n#sim tokens={tokens}"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    max_tokens = rng.randint(*OUTPUT_RANGE) if rng.random() < MAX_TOKENS_SHARE else None
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body, chars, tokens, max_tokens


async def drive(relay_url: str, key: dict, seconds: float) -> Load:
    """CLIENTS closed-loop clients until ``seconds``; what is still queued or running then is
    cancelled (the relay drops a cancelled queued request uncharged)."""
    load = Load()
    rng = random.Random(SEED)
    start = trio.current_time()

    async def client_loop(client: httpx2.AsyncClient) -> None:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            body, chars, tokens, max_tokens = make_request(rng)
            sent = trio.current_time() - start
            try:
                usage, headers = await chat_stream_usage(client, key["key"], body)
            except (httpx2.HTTPError, StreamFailed) as exc:
                load.errors += 1
                load.first_error = load.first_error or f"{type(exc).__name__}: {exc}"
                await trio.sleep(0.5)
                continue
            load.done.append(
                Done(
                    sent=round(sent, 4),
                    t=round(trio.current_time() - start, 4),
                    queue_ms=float(headers.get("x-relay-queue-ms", "nan")),
                    prompt_chars=chars,
                    sim_tokens=tokens,
                    max_tokens=max_tokens,
                    estimate=relay_estimate(body["messages"], max_tokens),
                    total_tokens=usage["total_tokens"],
                    prompt_tokens=usage["prompt_tokens"],
                    completion_tokens=usage["completion_tokens"],
                )
            )

    async def sample_state(client: httpx2.AsyncClient) -> None:
        """The key's bucket level and reservations every second (so at each minute boundary)."""
        admin = {"authorization": f"Bearer {BENCH_ADMIN_TOKEN}"}
        for tick in range(1, int(seconds) + 1):
            await trio.sleep_until(start + tick)
            state = (await client.get(relay_url + "/admin/state", headers=admin)).json()
            guard = state["admission"]["keys"].get(key["id"], {})
            load.samples.append(
                {
                    "t": round(trio.current_time() - start, 3),
                    "tpm_remaining": guard.get("tpm_remaining"),
                    "reserved_tokens": guard.get("reserved_tokens"),
                    "in_flight": guard.get("in_flight"),
                    "queued": guard.get("queued"),
                }
            )

    async with bench_client(relay_url + "/v1", CLIENTS + 4, timeout_s=600) as client:
        with trio.move_on_at(start + seconds + 0.5):  # after the sample at `seconds`
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample_state, client)
                for _ in range(CLIENTS):
                    nursery.start_soon(client_loop, client)
    load.done.sort(key=lambda d: d.t)
    return load


def stats(errors: list[float]) -> dict:
    absolute = [abs(e) for e in errors]
    return {
        "requests": len(errors),
        "mean_abs": round(sum(absolute) / len(absolute), 1) if errors else None,
        "p90_abs": round(percentile(absolute, 90) or 0, 1) if errors else None,
        "mean_signed": round(sum(errors) / len(errors), 1) if errors else None,
    }


def bucket_x(sample: dict | None) -> int | None:
    """The key's bucket level plus its reservations: grants do not change it, completions take
    their usage from it, time adds TPM/60 a second."""
    if not sample or sample["tpm_remaining"] is None:
        return None
    return sample["tpm_remaining"] + sample["reserved_tokens"]


def analyse(load: Load, seconds: float) -> dict:
    full = int(seconds // 60)
    level_at = {round(s["t"]): s for s in load.samples}
    minutes = []
    for m in range(math.ceil(seconds / 60)):
        length = min(60.0, seconds - m * 60)  # the last "minute" of a --quick run is partial
        rows = [d for d in load.done if m * 60 <= d.t < m * 60 + length]
        tokens = sum(d.total_tokens for d in rows)
        row: dict = {
            "minute": m + 1,
            "warm_up": m == 0,
            "seconds": length,
            "requests": len(rows),
            "tokens": tokens,
            "pct_of_limit": round(tokens / (TPM * length / 60) * 100, 2),
        }
        # Bucket identity: tokens completed in [a, b) = TPM + X(a) − X(b), X = level + reserved
        # (grants move tokens from the level to the reservations; completions take the usage).
        xa, xb = (bucket_x(level_at.get(round(edge))) for edge in (m * 60, m * 60 + length))
        if m > 0 and xa is not None and xb is not None:
            row |= {"x_start": xa, "x_end": xb, "predicted": round(TPM * length / 60) + xa - xb}
        if not row["warm_up"] and length == 60:
            row["target_met"] = TARGET_PCT[0] <= row["pct_of_limit"] <= TARGET_PCT[1]
        minutes.append(row)
    measured = [m for m in minutes if "target_met" in m]
    bins = [0] * math.ceil(seconds / 5)
    for d in load.done:
        if d.t < seconds:
            bins[int(d.t // 5)] += d.total_tokens
    errors = [d.estimate - d.total_tokens for d in load.done]
    with_cap = [d.estimate - d.total_tokens for d in load.done if d.max_tokens is not None]
    without = [d.estimate - d.total_tokens for d in load.done if d.max_tokens is None]
    after_warmup = [d for d in load.done if 60 <= d.t < full * 60]
    # The same figure for every 60 s window starting on a whole second after the warm-up.
    sliding = [
        sum(d.total_tokens for d in load.done if a <= d.t < a + 60) / TPM * 100
        for a in range(60, int(seconds) - 59)
    ]
    xs = [x for s in load.samples if s["t"] >= 60 and (x := bucket_x(s)) is not None]
    return {
        "minutes": minutes,
        "sliding_60s_pct": {
            "windows": len(sliding),
            "min": round(min(sliding), 2) if sliding else None,
            "max": round(max(sliding), 2) if sliding else None,
            "share_in_target": round(
                sum(TARGET_PCT[0] <= v <= TARGET_PCT[1] for v in sliding) / len(sliding), 3
            )
            if sliding
            else None,
        },
        "x_after_warmup": {
            "mean": round(statistics.fmean(xs)) if xs else None,
            "sd": round(statistics.pstdev(xs)) if xs else None,
            "min": min(xs, default=None),
            "max": max(xs, default=None),
            "level_mean": round(
                statistics.fmean(s["tpm_remaining"] for s in load.samples if s["t"] >= 60)
            )
            if xs
            else None,
        },
        "measured_minutes": len(measured),
        "meets_duration": len(measured) >= MIN_MEASURED_MINUTES,
        "all_minutes_in_target": bool(measured) and all(m["target_met"] for m in measured),
        "mean_pct_after_warmup": round(sum(m["pct_of_limit"] for m in measured) / len(measured), 2)
        if measured
        else None,
        "tokens_per_5s": bins,
        "estimator": {
            "all": stats(errors),
            "with_max_tokens": stats(with_cap),
            "without_max_tokens": stats(without),
            "mean_estimate": round(sum(d.estimate for d in load.done) / len(load.done), 1),
            "mean_usage": round(sum(d.total_tokens for d in load.done) / len(load.done), 1),
            "mean_prompt_estimate_minus_usage": round(
                sum(
                    d.estimate - (d.max_tokens or DEFAULT_OUTPUT) - d.prompt_tokens
                    for d in load.done
                )
                / len(load.done),
                2,
            ),
        },
        "queue_ms_p50": percentile([d.queue_ms for d in after_warmup], 50),
        "mean_in_flight": round(
            sum(s["in_flight"] or 0 for s in load.samples) / max(1, len(load.samples)), 2
        ),
        "errors": load.errors,
        "first_error": load.first_error,
    }


def plot(figures: dict, seconds: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    minutes = figures["minutes"]
    colours = ["lightgrey" if m["warm_up"] else "tab:blue" for m in minutes]
    left.bar([m["minute"] for m in minutes], [m["tokens"] for m in minutes], color=colours)
    left.axhline(TPM, color="red", label=f"limit {TPM} TPM")
    left.axhspan(TPM * TARGET_PCT[0] / 100, TPM * TARGET_PCT[1] / 100, color="green", alpha=0.2)
    left.set_xlabel("minute (grey: warm-up, the bucket starts full)")
    left.set_ylabel("tokens completed in the minute")
    left.legend(fontsize=8)
    bins = figures["tokens_per_5s"]
    right.step([i * 5 for i in range(len(bins))], bins, where="post")
    right.axhline(TPM / 12, color="red", label=f"{TPM // 12} per 5 s")
    right.set_xlabel("seconds")
    right.set_ylabel("tokens completed per 5 s")
    right.set_xlim(0, seconds)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(figures: dict) -> str:
    lines = [
        "| minute | requests | tokens | % of limit (target 97–100.5) | X start | X end "
        "| limit + X start − X end | met |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in figures["minutes"]:
        met = {True: "yes", False: "NO", None: "warm-up" if m["warm_up"] else "partial"}[
            m.get("target_met")
        ]
        label = str(m["minute"]) if m["seconds"] == 60 else f"{m['minute']} ({m['seconds']:.0f} s)"
        lines.append(
            f"| {label} | {m['requests']} | {m['tokens']} | {m['pct_of_limit']:.2f} "
            f"| {m.get('x_start', '–')} | {m.get('x_end', '–')} | {m.get('predicted', '–')} "
            f"| {met} |"
        )
    x, sliding = figures["x_after_warmup"], figures["sliding_60s_pct"]
    lines.append(
        "\nX = the key's TPM bucket level + its tokens reserved by requests in flight "
        "(/admin/state, sampled at the minute boundary). Tokens completed in a window = "
        "the limit's refill + X at its start − X at its end."
    )
    if x["mean"] is not None:
        lines.append(
            f"After the warm-up X was {x['mean']} on average (sd {x['sd']}, {x['min']}–"
            f"{x['max']}; bucket level {x['level_mean']} of it, the rest reserved)."
        )
    if sliding["windows"]:
        lines.append(
            f"Every 60 s window starting on a whole second after the warm-up "
            f"({sliding['windows']}): {sliding['min']:.2f}–{sliding['max']:.2f}% of the limit, "
            f"{sliding['share_in_target'] * 100:.0f}% of them within the target band."
        )
    if not figures["meets_duration"]:
        lines.append(
            f"\nNOTE: only {figures['measured_minutes']} full minute(s) after the warm-up: this "
            f"run does not meet the {MIN_MEASURED_MINUTES}-minute requirement."
        )
    est = figures["estimator"]
    lines += [
        "",
        "| requests | count | mean abs error | p90 abs error | mean signed (estimate − usage) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("all", "with_max_tokens", "without_max_tokens"):
        s = est[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {s['requests']} | {s['mean_abs']} | {s['p90_abs']} "
            f"| {s['mean_signed']} |"
        )
    lines.append(
        f"\nmean estimate {est['mean_estimate']} tokens, mean usage {est['mean_usage']}; the "
        f"input part of the estimate minus prompt_tokens: {est['mean_prompt_estimate_minus_usage']}"
        f" on average. Mean requests in flight {figures['mean_in_flight']}, queue wait p50 "
        f"{(figures['queue_ms_p50'] or 0) / 1000:.1f} s."
    )
    if figures["errors"]:
        lines.append(f"errors: {figures['errors']}, first: {figures['first_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tpm", description=__doc__)
    parser.add_argument("--minutes", type=float, default=4.0, help="length of the run")
    parser.add_argument("--quick", action="store_true", help="1.5 minutes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    seconds = 90.0 if args.quick else args.minutes * 60
    machine = machine_info()
    print(machine_line(machine), file=sys.stderr, flush=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="relay-bench-tpm-") as tmp_name:
        tmp = Path(tmp_name)
        sim = start_sim(tmp, *SIM_OPTIONS)
        try:
            (tmp / "relay.toml").write_text(relay_config(sim.url, tmp / "relay.db"))
            key = create_key(tmp / "relay.toml", "bench", "tpm")
            relay = start_relay(tmp, (tmp / "relay.toml").read_text())
            try:
                print(f"running {seconds:.0f} s…", file=sys.stderr, flush=True)
                load = trio.run(drive, relay.url, key, seconds)
                time.sleep(1.0)
                state = admin_state(relay.url)
            finally:
                relay.stop()
            tracebacks = "Traceback" in relay.log.read_text()
        finally:
            sim.stop()
    figures = analyse(load, seconds)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(figures, seconds, png)
    result = {
        "benchmark": "relay tpm",
        "started_at": started,
        "quick": args.quick,
        "machine": machine,
        "settings": {
            "tpm": TPM,
            "clients": CLIENTS,
            "seconds": seconds,
            "output_range": OUTPUT_RANGE,
            "prompt_chars": PROMPT_CHARS,
            "max_tokens_share": MAX_TOKENS_SHARE,
            "sim_options": SIM_OPTIONS,
            "seed": SEED,
            "target_pct": TARGET_PCT,
        },
        "figures": figures,
        "relay_state_after": state,
        "relay_log_has_traceback": tracebacks,
        "raw": {"done": [asdict(d) for d in load.done], "state_samples": load.samples},
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(machine_line(machine) + "\n")
    print(report(figures))
    print(f"\nJSON written to {out}, plot to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
