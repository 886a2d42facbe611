"""How much latency and CPU the relay adds over calling the upstream directly.

Starts one simulated upstream and one relay (subprocesses, like the tests), then, for each
scenario, runs the same requests against the sim directly and through the relay, back to back,
from this process (trio + httpx2, keep-alive). Prints a Markdown table and writes JSON.

    .venv/bin/python -m bench.overhead            # full run, ~4 minutes
    .venv/bin/python -m bench.overhead --quick    # smoke run, ~1 minute

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import subprocess
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
    ROOT,
    Server,
    machine_busy_seconds,
    machine_info,
    markdown_table,
    percentile,
    start_server,
)

SIM_KEY = "bench-sim-key"
ADMIN_TOKEN = "bench-admin-token"
ADMIN_ENV = "RELAY_BENCH_ADMIN_TOKEN"
MODEL = "gpt-5.5"
#: Served only by the relay's ``openai-responses`` account (and MODEL only by its ``openai-chat``
#: one), so that every request is relayed in its own protocol: with one model on both accounts
#: the least-loaded account is taken, and under load half the requests would be translated.
RESPONSES_MODEL = "gpt-5.5-responses"
#: Served only by the relay's ``anthropic`` account: Claude Code's path, relayed natively.
MESSAGES_MODEL = "claude-bench"
CONCURRENCIES = (1, 64)
DEFAULT_OUT = ROOT / "bench" / "results" / "overhead.json"
IDLE_SECONDS = 2.0  # the relay's own background CPU is measured this long before the load
NONSTREAM_DIRECTIVE = "#sim tokens=20 ttft=0 delay=0"  # the sim answers at once (its fast path)
STREAM_TOKENS, STREAM_DELAY_S = 50, 0.01
STREAM_DIRECTIVE = f"#sim tokens={STREAM_TOKENS} ttft=0 delay={STREAM_DELAY_S}"
SHARED_CPU_NOTE = (
    "client, relay and simulated upstream share this machine's cores: compare the direct and "
    "relay rows of one run (ratios), not absolute numbers across runs or machines"
)


@dataclass(frozen=True)
class Settings:
    nonstream_requests: int
    stream_requests: int
    phase_seconds: float  # per target and scenario, split into `slices` alternating slices
    warmup_requests: int
    slices: int


FULL = Settings(
    nonstream_requests=5000,
    stream_requests=3000,
    phase_seconds=15,
    warmup_requests=200,
    slices=3,
)
QUICK = Settings(
    nonstream_requests=1000,
    stream_requests=500,
    phase_seconds=3,
    warmup_requests=100,
    slices=1,
)


@dataclass(frozen=True)
class Mode:
    name: str
    path: str
    body: bytes
    stream: bool
    done_marker: bytes  # the last event of a complete stream contains this
    headers: tuple[tuple[str, str], ...] = ()  # besides the client's own


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


MODES = (
    Mode(
        "chat",
        "/chat/completions",
        _json({"model": MODEL, "messages": [{"role": "user", "content": NONSTREAM_DIRECTIVE}]}),
        stream=False,
        done_marker=b"",
    ),
    Mode(
        "chat-stream",
        "/chat/completions",
        _json(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": STREAM_DIRECTIVE}],
                "stream": True,
                # Asked for on both paths so the client sees the same events either way.
                "stream_options": {"include_usage": True},
            }
        ),
        stream=True,
        done_marker=b"[DONE]",
    ),
    Mode(
        "responses-stream",
        "/responses",
        _json({"model": RESPONSES_MODEL, "input": STREAM_DIRECTIVE, "stream": True}),
        stream=True,
        done_marker=b"response.completed",
    ),
    Mode(
        "messages-stream",
        "/messages",
        _json(
            {
                "model": MESSAGES_MODEL,
                "max_tokens": 1000,
                "messages": [{"role": "user", "content": STREAM_DIRECTIVE}],
                "stream": True,
            }
        ),
        stream=True,
        done_marker=b"message_stop",
        headers=(("anthropic-version", "2023-06-01"),),
    ),
)


@dataclass
class Target:
    """Where the load goes: the sim directly, or the relay."""

    name: str
    client: httpx2.AsyncClient


class BenchError(Exception):
    """A request that did not complete as expected (status, truncated stream)."""


@dataclass
class Phase:
    """Raw samples of one (target, mode, concurrency) run; times in seconds."""

    latency: list[float] = field(default_factory=list)  # request start → last byte
    ttfb: list[float] = field(default_factory=list)  # request start → first body byte (streams)
    gaps: list[float] = field(default_factory=list)  # between consecutive events of a stream
    events: int = 0
    errors: int = 0
    first_error: str | None = None
    wall_s: float = 0.0

    def absorb(self, other: Phase) -> None:
        """Add another slice of the same scenario to this one."""
        self.latency += other.latency
        self.ttfb += other.ttfb
        self.gaps += other.gaps
        self.events += other.events
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        self.wall_s += other.wall_s


async def one_request(client: httpx2.AsyncClient, mode: Mode, phase: Phase) -> None:
    started = time.perf_counter()
    if not mode.stream:
        response = await client.post(mode.path, content=mode.body, headers=dict(mode.headers))
        if response.status_code != 200:
            raise BenchError(f"HTTP {response.status_code}: {response.text[:200]}")
        phase.latency.append(time.perf_counter() - started)
        return
    ttfb: float | None = None
    last: float | None = None
    gaps: list[float] = []
    events = 0
    buffer = final = b""
    async with client.stream(
        "POST", mode.path, content=mode.body, headers=dict(mode.headers)
    ) as response:
        if response.status_code != 200:
            await response.aread()
            raise BenchError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for chunk in response.aiter_raw():
            now = time.perf_counter()
            if ttfb is None:
                ttfb = now - started
            buffer += chunk
            complete = buffer.count(b"\n\n")
            if not complete:
                continue
            last_event_end = buffer.rfind(b"\n\n")
            final = buffer[:last_event_end]
            buffer = buffer[last_event_end + 2 :]
            events += complete
            for _ in range(complete):
                if last is not None:
                    gaps.append(now - last)
                last = now
    if ttfb is None or mode.done_marker not in final.rsplit(b"\n\n", 1)[-1]:
        raise BenchError("stream ended before its last event")
    phase.latency.append(time.perf_counter() - started)
    phase.ttfb.append(ttfb)
    phase.gaps.extend(gaps)
    phase.events += events


async def run_phase(
    client: httpx2.AsyncClient, mode: Mode, concurrency: int, requests: int, seconds: float
) -> Phase:
    """``concurrency`` workers issue requests until ``requests`` were started or time is up."""
    phase = Phase()
    issued = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            try:
                await one_request(client, mode, phase)
            except (httpx2.HTTPError, BenchError) as exc:
                phase.errors += 1
                phase.first_error = phase.first_error or f"{type(exc).__name__}: {exc}"

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    phase.wall_s = time.perf_counter() - started
    return phase


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": ms(percentile(values, 50)),
        "p90": ms(percentile(values, 90)),
        "p99": ms(percentile(values, 99)),
        "max": ms(max(values)) if values else None,
        "mean": ms(sum(values) / len(values)) if values else None,
    }


def describe(
    target: Target, mode: Mode, concurrency: int, phase: Phase, cpu: dict[str, float]
) -> dict:
    done = len(phase.latency)
    return {
        "target": target.name,
        "mode": mode.name,
        "concurrency": concurrency,
        "requests": done,
        "errors": phase.errors,
        "first_error": phase.first_error,
        "wall_s": round(phase.wall_s, 3),
        "req_per_s": round(done / phase.wall_s, 1) if phase.wall_s else 0.0,
        "latency_ms": summary(phase.latency),
        "ttfb_ms": summary(phase.ttfb) if mode.stream else None,
        "gap_ms": summary(phase.gaps) if mode.stream else None,
        "events": phase.events,
        "events_per_s": round(phase.events / phase.wall_s, 1) if mode.stream else None,
        "cpu": cpu,
        "raw_ms": {
            "latency": [round(v * 1000, 3) for v in phase.latency],
            "ttfb": [round(v * 1000, 3) for v in phase.ttfb],
        },
    }


def add_overhead(relay_row: dict, direct_row: dict) -> None:
    """Relay minus direct at the same percentile: latency (non-stream) or TTFB, and gaps."""
    key = "ttfb_ms" if relay_row["ttfb_ms"] else "latency_ms"
    added: dict[str, float | None] = {}
    for p in ("p50", "p99"):
        relay, direct = relay_row[key][p], direct_row[key][p]
        added[p] = None if relay is None or direct is None else round(relay - direct, 3)
    if relay_row["gap_ms"]:
        relay_gap, direct_gap = relay_row["gap_ms"]["p99"], direct_row["gap_ms"]["p99"]
        if relay_gap is not None and direct_gap is not None:
            added["gap_p99"] = round(relay_gap - direct_gap, 3)
    relay_row["added_ms"] = {"of": key, **added}
    if direct_row["req_per_s"]:
        relay_row["throughput_ratio"] = round(relay_row["req_per_s"] / direct_row["req_per_s"], 3)


def cpu_snapshot(servers: list[Server]) -> dict[str, float]:
    """CPU seconds used so far by each server, this (client) process and the whole machine."""
    return {
        **{server.name: server.cpu_seconds() for server in servers},
        "client": time.process_time(),
        "machine": machine_busy_seconds(),
    }


def cpu_figures(target: Target, phase: Phase, used: dict[str, float]) -> dict[str, float]:
    cpu: dict[str, float] = {}
    for name, seconds in used.items():
        cpu[f"{name}_s"] = round(seconds, 3)
        cpu[f"{name}_util"] = round(seconds / phase.wall_s, 3)
    # Whatever else ran on the machine meanwhile (other users' jobs): the noise to watch for.
    others = used["machine"] - used["relay"] - used["sim"] - used["client"]
    cpu["others_util"] = round(max(0.0, others) / phase.wall_s, 3)
    if target.name == "relay" and phase.latency:
        cpu["relay_ms_per_request"] = round(used["relay"] * 1000 / len(phase.latency), 3)
        if phase.events:
            cpu["relay_ms_per_event"] = round(used["relay"] * 1000 / phase.events, 4)
    return cpu


async def measure(
    targets: list[Target], mode: Mode, concurrency: int, settings: Settings, servers: list[Server]
) -> list[dict]:
    """Alternate between the targets slice by slice (A B A B …), so a change in the machine's
    background load hits both alike. Each slice is preceded by an unmeasured warm-up: the
    relay's upstream pool drops connections idle for 90 s, so without it a slice after a pause
    would start by reconnecting. CPU is read around each slice."""
    warm = settings.warmup_requests if not mode.stream else max(3, concurrency)
    requests = settings.stream_requests if mode.stream else settings.nonstream_requests
    phases = {target.name: Phase() for target in targets}
    used = {target.name: dict.fromkeys(cpu_snapshot(servers), 0.0) for target in targets}
    for _ in range(settings.slices):
        for target in targets:
            await run_phase(target.client, mode, concurrency, warm, settings.phase_seconds)
            before = cpu_snapshot(servers)
            part = await run_phase(
                target.client,
                mode,
                concurrency,
                requests // settings.slices,
                settings.phase_seconds / settings.slices,
            )
            after = cpu_snapshot(servers)
            phases[target.name].absorb(part)
            for name, start in before.items():
                used[target.name][name] += after[name] - start
    return [
        describe(
            target,
            mode,
            concurrency,
            phases[target.name],
            cpu_figures(target, phases[target.name], used[target.name]),
        )
        for target in targets
    ]


def new_client(base_url: str, key: str, connections: int) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=base_url,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        limits=httpx2.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=600,  # never drop connections between phases (default: 5 s)
        ),
        timeout=httpx2.Timeout(30.0),
    )


async def run_all(sim: Server, relay: Server, key: str, settings: Settings) -> list[dict]:
    connections = max(CONCURRENCIES) + 8
    async with (
        new_client(sim.url + "/v1", SIM_KEY, connections) as direct_client,
        new_client(relay.url + "/v1", key, connections) as relay_client,
    ):
        direct = Target("direct", direct_client)
        via_relay = Target("relay", relay_client)
        for target in (direct, via_relay):  # open every connection once, relay→sim included
            await run_phase(target.client, MODES[0], max(CONCURRENCIES), 200, 30)
        rows = []
        for mode in MODES:
            for concurrency in CONCURRENCIES:
                direct_row, relay_row = await measure(
                    [direct, via_relay], mode, concurrency, settings, [sim, relay]
                )
                add_overhead(relay_row, direct_row)
                rows += [direct_row, relay_row]
                print(f"  done: {mode.name} c={concurrency}", file=sys.stderr, flush=True)
        return rows


def relay_config(sim_url: str, database: Path) -> str:
    """One pool and one package without any limit, one account per protocol on the sim, each
    with its own model (see RESPONSES_MODEL)."""
    accounts = ""
    for name, provider, model in (
        ("sim-chat", "openai-chat", MODEL),
        ("sim-responses", "openai-responses", RESPONSES_MODEL),
        ("sim-anthropic", "anthropic", MESSAGES_MODEL),
    ):
        accounts += textwrap.dedent(f"""
            [[accounts]]
            name = "{name}"
            pool = "bench"
            provider = "{provider}"
            base_url = "{sim_url}/v1"
            api_key_env = "SIM_UPSTREAM_KEY"
            models = ["{model}"]
            """)
    return (
        textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:0"
        database = "{database}"
        admin_token_env = "{ADMIN_ENV}"
        keep_alive_timeout_s = 120.0

        [pools.bench]

        [packages.bench]
        pool = "bench"
        """)
        + accounts
    )


def create_key(config: Path) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "keys",
            "create",
            "--config",
            str(config),
            "--package",
            "bench",
            "--name",
            "bench",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"keys create failed: {done.stderr}")
    return json.loads(done.stdout)["key"]


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    columns = ["target", "mode", "conc", "requests", "errors", "req/s", "p50 ms", "p99 ms",
               "added p50 ms", "added p99 ms", "events/s", "gap p99 ms", "added gap p99 ms",
               "relay CPU ms/req"]
    cells = []
    for row in rows:
        main = row["ttfb_ms"] or row["latency_ms"]
        added = row.get("added_ms", {})
        gap = row["gap_ms"] or {}
        cells.append([
            row["target"], row["mode"], row["concurrency"], row["requests"], row["errors"],
            f"{row['req_per_s']:.0f}", fmt(main["p50"]), fmt(main["p99"]),
            fmt(added.get("p50")), fmt(added.get("p99")), fmt(row["events_per_s"], 0),
            fmt(gap.get("p99")), fmt(added.get("gap_p99")),
            fmt(row["cpu"].get("relay_ms_per_request"), 3),
        ])
    return markdown_table(columns, "ll" + "r" * 12, cells)


def cpu_table(rows: list[dict]) -> str:
    columns = ["target", "mode", "conc", "relay CPU %", "sim CPU %", "client CPU %",
               "other CPU %", "relay ms/event"]
    cells = []
    for row in rows:
        cpu = row["cpu"]
        cells.append([
            row["target"], row["mode"], row["concurrency"],
            *(f"{cpu[name] * 100:.0f}" for name in ("relay_util", "sim_util", "client_util",
                                                     "others_util")),
            fmt(cpu.get("relay_ms_per_event"), 3),
        ])
    return markdown_table(columns, "ll" + "r" * 6, cells)


def admin_state(relay: Server) -> dict:
    response = httpx2.get(
        relay.url + "/admin/state", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    response.raise_for_status()
    return response.json()


def start_servers(tmp: Path) -> tuple[Server, Server, str]:
    """The sim, the relay on it (its config and database in ``tmp``) and a key for it."""
    sim_args = "-m relay.testing.upstream --port 0 --ttft 0 --token-delay 0 --tokens 20".split()
    sim = start_server(
        "sim", [*sim_args, "--api-key", SIM_KEY], r"listening on (\S+)", tmp / "sim.log"
    )
    try:
        config = tmp / "relay.toml"
        config.write_text(relay_config(sim.url, tmp / "relay.db"))
        key = create_key(config)
        env = {"SIM_UPSTREAM_KEY": SIM_KEY, ADMIN_ENV: ADMIN_TOKEN, "RELAY_LOG_LEVEL": "WARNING"}
        relay = start_server(
            "relay",
            ["-m", "relay", "serve", "--config", str(config)],
            r"relay listening on (\S+)",
            tmp / "relay.log",
            env=env,
        )
    except BaseException:
        sim.stop()
        raise
    return sim, relay, key


def report(result: dict, machine_line: str) -> str:
    rows, state = result["scenarios"], result["relay_state_after"]
    cores = result["machine"]["cores"] or 1
    busy = state.get("active_requests") or state.get("admission", {}).get("total")
    parts = [
        f"{machine_line}\nNote: {SHARED_CPU_NOTE}.\n",
        table(rows),
        "\np50/p99: whole-request latency for `chat`, time to first body byte for the streams. "
        "added = relay − direct at the same percentile. gap = time between consecutive SSE "
        f"events seen by the client (the sim paces tokens {STREAM_DELAY_S * 1000:.0f} ms "
        "apart).\n",
        cpu_table(rows),
        f"\nCPU % is of one core ({cores} cores = {100 * cores}%), measured around each phase "
        "from /proc/PID/stat (relay, sim), process_time (client) and /proc/stat (other = the "
        "rest of the machine: other users' jobs compete for the same cores). Relay idle CPU before "
        f"the load: {result['relay_idle_util'] * 100:.1f}%.",
        f"\nrelay state after the run: {'BUSY' if busy else 'idle'} {json.dumps(state)}",
    ]
    for row in rows:
        if row["errors"]:
            parts.append(
                f"errors in {row['target']} {row['mode']} c={row['concurrency']}: "
                f"{row['errors']}, first: {row['first_error']}"
            )
    if result["logs_with_tracebacks"]:
        parts.append(f"tracebacks in the logs of: {', '.join(result['logs_with_tracebacks'])}")
    return "\n".join(parts)


def interrupted(exc: BaseException) -> bool:
    """Ctrl-C, raised bare or (from inside trio's nurseries) in an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    machine = machine_info()
    machine_line = (
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"Python {machine['python']} ({machine['implementation']}), Linux {machine['kernel']}"
    )
    print(f"{machine_line}\nnote: {SHARED_CPU_NOTE}", file=sys.stderr, flush=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")

    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp_name:
            tmp = Path(tmp_name)
            sim, relay, key = start_servers(tmp)
            try:
                print(f"sim pid {sim.pid}, relay pid {relay.pid}", file=sys.stderr, flush=True)
                idle_start = relay.cpu_seconds()
                time.sleep(IDLE_SECONDS)
                relay_idle_util = (relay.cpu_seconds() - idle_start) / IDLE_SECONDS
                rows = trio.run(run_all, sim, relay, key, settings)
                state = admin_state(relay)
            finally:
                codes = {server.name: server.stop() for server in (relay, sim)}
            logs = {server.name: server.log.read_text() for server in (relay, sim)}
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("interrupted: servers stopped, nothing written", file=sys.stderr)
        return 130

    result = {
        "benchmark": "relay overhead",
        "started_at": started,
        "quick": args.quick,
        "machine": machine,
        "note": SHARED_CPU_NOTE,
        "settings": {
            **asdict(settings),
            "concurrencies": list(CONCURRENCIES),
            "model": MODEL,
            "responses_model": RESPONSES_MODEL,
            "nonstream_directive": NONSTREAM_DIRECTIVE,
            "stream_directive": STREAM_DIRECTIVE,
        },
        "relay_idle_util": round(relay_idle_util, 4),
        "scenarios": rows,
        "relay_state_after": state,
        "exit_codes": codes,
        "logs_with_tracebacks": [name for name, text in logs.items() if "Traceback" in text],
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result, machine_line))
    print(f"JSON written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
