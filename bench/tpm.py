"""Does a key's TPM limit hold minute by minute when the relay's token estimates are wrong?

One key whose package allows ``tpm = 60000``, driven well above it by closed-loop clients whose
requests mix prompt sizes and output lengths (``#sim tokens=N``, N random 50-400), half of them
with a ``max_tokens`` and half without (the relay then expects the key's usual answer length, or
1024 before it has seen one). Tokens count when the client receives them: a request's prompt
tokens when its stream begins (the upstream has read the prompt), each output token when its
delta arrives. Every full minute after the first (warm-up: the bucket starts full) is compared
with the limit, and so is every 60 s window. The relay's estimates are recomputed here for every
request and compared with the usage.

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

from relay.guards.buckets import TPM_REFILL
from relay.guards.estimates import OutputEstimate

from .common import (
    BENCH_ADMIN_ENV,
    BENCH_ADMIN_TOKEN,
    ROOT,
    StreamFailed,
    admin_state,
    bench_client,
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
class Flight:
    """One request as the client saw it (times in s since the load started). ``t`` and the
    usage are None for a request still running (or queued) when the load stopped."""

    sent: float
    prompt_chars: int
    sim_tokens: int
    max_tokens: int | None
    estimate: int  # the protocol layer's: input + (max_tokens or 1024)
    input_estimate: int
    first_byte: float | None = None
    deltas: list[tuple[float, int]] = field(default_factory=list)  # (arrival, output tokens)
    t: float | None = None
    queue_ms: float | None = None
    total_tokens: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class Load:
    flights: list[Flight] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    samples: list[dict] = field(default_factory=list)  # the key's guard, from /admin/state

    @property
    def done(self) -> list[Flight]:
        return [f for f in self.flights if f.t is not None]


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


def input_estimate(messages: list[dict]) -> int:
    """The relay's input estimate (relay/protocol/requests.py): chars of the messages as compact
    JSON / 4."""
    chars = len(json.dumps(messages, ensure_ascii=False, separators=(",", ":")))
    return max(1, chars // CHARS_PER_TOKEN)


async def timed_stream(
    client: httpx2.AsyncClient, key: str, body: dict, start: float, flight: Flight
) -> tuple[dict, httpx2.Headers]:
    """POST a streaming chat request, recording in ``flight`` when the stream began and when
    each output delta arrived (as it goes, so a cancelled request keeps what it received).
    Returns the usage chunk's ``usage`` and the headers."""
    content = json.dumps(body).encode()
    headers = {"authorization": f"Bearer {key}"}
    usage, done, pending = None, False, b""
    async with client.stream("POST", "/chat/completions", content=content, headers=headers) as r:
        if r.status_code != 200:
            raise StreamFailed(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for chunk in r.aiter_bytes():
            now = round(trio.current_time() - start, 4)
            if flight.first_byte is None:
                flight.first_byte = now
            *events, pending = (pending + chunk).split(b"\n\n")
            tokens = 0
            for event in events:
                data = event.strip().removeprefix(b"data: ")
                if data == b"[DONE]":
                    done = True
                elif data:
                    payload = json.loads(data)
                    usage = payload.get("usage") or usage
                    for choice in payload.get("choices", ()):
                        tokens += bool(choice.get("delta", {}).get("content"))
            if tokens:
                flight.deltas.append((now, tokens))
    if not done or usage is None:
        raise StreamFailed("stream ended without its usage chunk and [DONE]")
    return usage, r.headers


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
            estimate = input_estimate(body["messages"])
            flight = Flight(
                sent=round(trio.current_time() - start, 4),
                prompt_chars=chars,
                sim_tokens=tokens,
                max_tokens=max_tokens,
                estimate=estimate + (max_tokens or DEFAULT_OUTPUT),
                input_estimate=estimate,
            )
            load.flights.append(flight)
            try:
                usage, headers = await timed_stream(client, key["key"], body, start, flight)
            except (httpx2.HTTPError, StreamFailed) as exc:
                load.flights.remove(flight)
                load.errors += 1
                load.first_error = load.first_error or f"{type(exc).__name__}: {exc}"
                await trio.sleep(0.5)
                continue
            flight.t = round(trio.current_time() - start, 4)
            flight.queue_ms = float(headers.get("x-relay-queue-ms", "nan"))
            flight.total_tokens = usage["total_tokens"]
            flight.prompt_tokens = usage["prompt_tokens"]
            flight.completion_tokens = usage["completion_tokens"]

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
                    "expected_output": guard.get("expected_output"),
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
    """The key's TPM bucket level: what new requests may reserve (``tpm_remaining``) plus what
    requests in flight hold. Tokens delivered are taken from it, time adds TPM/60 a second."""
    if not sample or sample["tpm_remaining"] is None:
        return None
    return sample["tpm_remaining"] + sample["reserved_tokens"]


def deliveries(load: Load) -> list[tuple[float, float]]:
    """(time, tokens) as the client received them: each request's prompt tokens when its stream
    began, its output tokens as their deltas arrived. A finished request's output is scaled to
    its usage (the sim sends one token per delta, so the scale is 1); a request cut off by the
    stop counts its input estimate and the deltas it received."""
    events: list[tuple[float, float]] = []
    for f in load.flights:
        if f.first_byte is None:
            continue
        events.append((f.first_byte, f.prompt_tokens if f.t is not None else f.input_estimate))
        seen = sum(n for _, n in f.deltas)
        scale = f.completion_tokens / seen if f.t is not None and seen else 1.0
        events += [(t, n * scale) for t, n in f.deltas]
    events.sort()
    return events


def per_window(events: list[tuple[float, float]], start: float, length: float) -> float:
    return sum(x for t, x in events if start <= t < start + length)


def replay_estimates(done: list[Flight]) -> list[int]:
    """What the relay reserved for each request, replayed: input estimate + the key's expected
    output when it was granted (relay/guards/estimates.py, learned in completion order, capped
    by max_tokens)."""
    estimate, reserved = OutputEstimate(), {}
    granted = sorted(done, key=lambda f: f.sent + f.queue_ms / 1000)
    finished = iter(sorted(done, key=lambda f: f.t))
    upcoming = next(finished, None)
    for f in granted:
        while upcoming is not None and upcoming.t <= f.sent + f.queue_ms / 1000:
            estimate.learn(upcoming.completion_tokens, upcoming.max_tokens)
            upcoming = next(finished, None)
        expected = estimate.expected(DEFAULT_OUTPUT if f.max_tokens is None else f.max_tokens,
                                     f.max_tokens)
        reserved[id(f)] = f.input_estimate + expected
    return [reserved[id(f)] for f in done]


def analyse(load: Load, seconds: float) -> dict:
    full = int(seconds // 60)
    level_at = {round(s["t"]): s for s in load.samples}
    events = deliveries(load)
    done = load.done
    minutes = []
    for m in range(math.ceil(seconds / 60)):
        length = min(60.0, seconds - m * 60)  # the last "minute" of a --quick run is partial
        delivered = per_window(events, m * 60, length)
        completed = [d for d in done if m * 60 <= d.t < m * 60 + length]
        completed_tokens = sum(d.total_tokens for d in completed)
        row: dict = {
            "minute": m + 1,
            "warm_up": m == 0,
            "seconds": length,
            "requests_completed": len(completed),
            "tokens": round(delivered),
            "pct_of_limit": round(delivered / (TPM * length / 60) * 100, 2),
            "completed_tokens": completed_tokens,
            "completed_pct": round(completed_tokens / (TPM * length / 60) * 100, 2),
        }
        # Bucket identity: tokens delivered in [a, b) = refill + X(a) − X(b), X = level.
        xa, xb = (bucket_x(level_at.get(round(edge))) for edge in (m * 60, m * 60 + length))
        if m > 0 and xa is not None and xb is not None:
            refill = round(TPM * TPM_REFILL * length / 60)
            row |= {"x_start": xa, "x_end": xb, "predicted": refill + xa - xb}
        if not row["warm_up"] and length == 60:
            row["target_met"] = TARGET_PCT[0] <= row["pct_of_limit"] <= TARGET_PCT[1]
        minutes.append(row)
    measured = [m for m in minutes if "target_met" in m]
    bins = [0.0] * math.ceil(seconds / 5)
    per_second = [0.0] * (math.ceil(seconds) + 1)
    for t, x in events:
        if t < seconds:
            bins[int(t // 5)] += x
            per_second[int(t)] += x
    # Every 60 s window that starts on a whole second after the warm-up (1 s resolution).
    sliding = [sum(per_second[a : a + 60]) / TPM * 100 for a in range(60, int(seconds) - 59)]
    sliding_completed = [
        sum(d.total_tokens for d in done if a <= d.t < a + 60) / TPM * 100
        for a in range(60, int(seconds) - 59)
    ]
    xs = [x for s in load.samples if s["t"] >= 60 and (x := bucket_x(s)) is not None]
    static = [d.estimate - d.total_tokens for d in done]
    learned = [r - d.total_tokens for r, d in zip(replay_estimates(done), done, strict=True)]
    capped = [d.max_tokens is not None for d in done]
    after_warmup = [d for d in done if 60 <= d.t < full * 60]

    def window_stats(values: list[float]) -> dict:
        if not values:
            return {"windows": 0}
        return {
            "windows": len(values),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
            "mean": round(statistics.fmean(values), 2),
            "sd": round(statistics.pstdev(values), 2),
            "share_in_target": round(
                sum(TARGET_PCT[0] <= v <= TARGET_PCT[1] for v in values) / len(values), 3
            ),
            "share_above": round(sum(v > TARGET_PCT[1] for v in values) / len(values), 3),
        }

    def split(errors: list[float]) -> dict:
        return {
            "all": stats(errors),
            "with_max_tokens": stats([e for e, c in zip(errors, capped, strict=True) if c]),
            "without_max_tokens": stats([e for e, c in zip(errors, capped, strict=True) if not c]),
        }

    return {
        "minutes": minutes,
        "sliding_60s_pct": window_stats(sliding),
        "sliding_60s_completed_pct": window_stats(sliding_completed),
        "sliding_60s_series": {
            "delivered": [round(v, 2) for v in sliding],
            "completed": [round(v, 2) for v in sliding_completed],
        },
        "x_after_warmup": {
            "mean": round(statistics.fmean(xs)) if xs else None,
            "sd": round(statistics.pstdev(xs)) if xs else None,
            "min": min(xs, default=None),
            "max": max(xs, default=None),
            "held_mean": round(
                statistics.fmean(s["reserved_tokens"] for s in load.samples if s["t"] >= 60)
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
        "tokens_per_5s": [round(b) for b in bins],
        "estimator": {
            "static": split(static),
            "learned": split(learned),
            "mean_static_estimate": round(statistics.fmean(d.estimate for d in done), 1),
            "mean_learned_estimate": round(statistics.fmean(replay_estimates(done)), 1),
            "mean_usage": round(statistics.fmean(d.total_tokens for d in done), 1),
            "mean_input_estimate_minus_prompt_tokens": round(
                statistics.fmean(d.input_estimate - d.prompt_tokens for d in done), 2
            ),
            "expected_output_at_end": next(
                (s["expected_output"] for s in reversed(load.samples) if s["expected_output"]),
                None,
            ),
        },
        "requests_completed": len(done),
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

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    low, high = 94.0, 104.0
    for ax in (left, middle):
        ax.axhspan(*TARGET_PCT, color="green", alpha=0.15, label="target band")
        ax.axhline(100, color="red", linewidth=1, label="limit")
        ax.set_ylim(low, high)
        ax.set_ylabel("% of the limit")
    minutes = [m for m in figures["minutes"] if m["seconds"] == 60]
    xs = [m["minute"] for m in minutes]
    left.bar(xs, [min(m["pct_of_limit"], high) for m in minutes], width=0.5,
             color=["lightgrey" if m["warm_up"] else "tab:blue" for m in minutes],
             label="delivered")
    left.plot(xs, [min(m["completed_pct"], high) for m in minutes], "o", color="tab:orange",
              label="usage of the requests completed in it")
    for m in minutes:
        if m["warm_up"]:
            left.text(m["minute"], high - 0.6, f"warm-up\n{m['pct_of_limit']:.0f}%",
                      ha="center", va="top", fontsize=8)
    left.set_xticks(xs)
    left.set_xlabel("minute")
    left.set_title("tokens per minute", fontsize=10)
    left.legend(fontsize=7, loc="upper right")
    sliding = figures["sliding_60s_series"]
    starts = list(range(60, 60 + len(sliding["delivered"])))
    middle.plot(starts, sliding["delivered"], label="delivered")
    middle.plot(starts, sliding["completed"], color="tab:orange", alpha=0.6, linewidth=1,
                label="usage of the requests completed")
    middle.set_xlabel("window start, seconds (every 60 s window after the warm-up)")
    middle.set_title("sliding 60 s windows", fontsize=10)
    middle.legend(fontsize=7, loc="lower left")
    bins = figures["tokens_per_5s"]
    right.step([i * 5 for i in range(len(bins))], bins, where="post")
    right.axhline(TPM / 12, color="red", linewidth=1, label=f"{TPM // 12} per 5 s")
    right.set_xlabel("seconds")
    right.set_ylabel("tokens delivered per 5 s")
    right.set_xlim(0, seconds)
    right.set_title("delivery over time (the bucket starts full)", fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(figures: dict) -> str:
    lines = [
        "| minute | tokens delivered | % of limit (target 97–100.5) | X start | X end "
        "| refill + X start − X end | met | requests completed | their usage, % of limit |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for m in figures["minutes"]:
        met = {True: "yes", False: "NO", None: "warm-up" if m["warm_up"] else "partial"}[
            m.get("target_met")
        ]
        label = str(m["minute"]) if m["seconds"] == 60 else f"{m['minute']} ({m['seconds']:.0f} s)"
        lines.append(
            f"| {label} | {m['tokens']} | {m['pct_of_limit']:.2f} "
            f"| {m.get('x_start', '–')} | {m.get('x_end', '–')} | {m.get('predicted', '–')} "
            f"| {met} | {m['requests_completed']} | {m['completed_pct']:.2f} |"
        )
    x = figures["x_after_warmup"]
    lines.append(
        "\nDelivered: prompt tokens when the stream began, output tokens as they arrived. "
        "X = the key's TPM bucket level (tpm_remaining + reserved_tokens in /admin/state, "
        f"sampled at the minute's edges): tokens delivered in a window = the refill "
        f"({TPM_REFILL:.0%} of the limit) + X at its start − X at its end."
    )
    if x["mean"] is not None:
        lines.append(
            f"After the warm-up X was {x['mean']} on average (sd {x['sd']}, {x['min']}–{x['max']};"
            f" {x['held_mean']} of it held for the expected output of requests in flight)."
        )
    for name, label in (("sliding_60s_pct", "delivered"),
                        ("sliding_60s_completed_pct", "usage of the requests completed")):
        w = figures[name]
        if w["windows"]:
            lines.append(
                f"Every 60 s window starting on a whole second after the warm-up ({w['windows']}),"
                f" {label}: {w['min']:.2f}–{w['max']:.2f}% of the limit (mean {w['mean']:.2f}, "
                f"sd {w['sd']:.2f}); {w['share_in_target'] * 100:.0f}% within the target band, "
                f"{w['share_above'] * 100:.0f}% above it."
            )
    if not figures["meets_duration"]:
        lines.append(
            f"\nNOTE: only {figures['measured_minutes']} full minute(s) after the warm-up: this "
            f"run does not meet the {MIN_MEASURED_MINUTES}-minute requirement."
        )
    est = figures["estimator"]
    lines += [
        "",
        "| estimate | requests | count | mean abs error | p90 abs error "
        "| mean signed (estimate − usage) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind, label in (("static", "input + (max_tokens or 1024)"),
                        ("learned", "input + the key's expected output (what the relay holds)")):
        for name in ("all", "with_max_tokens", "without_max_tokens"):
            s = est[kind][name]
            lines.append(
                f"| {label} | {name.replace('_', ' ')} | {s['requests']} | {s['mean_abs']} "
                f"| {s['p90_abs']} | {s['mean_signed']} |"
            )
    lines.append(
        f"\nmean usage {est['mean_usage']} tokens; mean estimate {est['mean_static_estimate']} "
        f"(static), {est['mean_learned_estimate']} (learned; the key's expected output at the "
        f"end: {est['expected_output_at_end']}). Input estimate minus prompt_tokens: "
        f"{est['mean_input_estimate_minus_prompt_tokens']} on average. "
        f"{figures['requests_completed']} requests completed, mean in flight "
        f"{figures['mean_in_flight']}, queue wait p50 "
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
            "tpm_refill": TPM_REFILL,
        },
        "figures": figures,
        "relay_state_after": state,
        "relay_log_has_traceback": tracebacks,
        "raw": {"flights": [asdict(f) for f in load.flights], "state_samples": load.samples},
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(machine_line(machine) + "\n")
    print(report(figures))
    print(f"\nJSON written to {out}, plot to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
