"""Helpers shared by the benchmarks: server processes, CPU accounting, percentiles, machine info."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx2

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A server started as a subprocess (the simulated upstream or the relay)."""

    name: str
    proc: subprocess.Popen[str]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT, then SIGKILL if it has not exited within ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    name: str,
    args: list[str],
    pattern: str,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> Server:
    """Start ``python ARGS`` in ``cwd`` and wait for the line that says where it listens.

    The child runs in its own session so a Ctrl-C in the terminal reaches only this process,
    which then stops the children itself (one SIGINT each, no double interrupt). ``python -m``
    imports from ``cwd`` first: another directory with a ``relay`` package runs that code.
    """
    log_file = open(log, "w")  # handed to the child, then to the drain thread
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            match = re.search(pattern, line)
            if match:
                # Keep draining stdout so a chatty child can never block on a full pipe.
                threading.Thread(target=_drain, args=(proc.stdout, log_file), daemon=True).start()
                return Server(name, proc, match.group(1), log)
        raise RuntimeError(f"{name} did not start")
    except BaseException:  # also Ctrl-C while waiting: the child is in its own session
        proc.kill()
        proc.wait()
        log_file.close()
        print(log.read_text(), file=sys.stderr)
        raise


def _drain(stream: IO[str], sink: IO[str]) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may contain spaces; everything after its ")" is fixed.
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all processes of the machine used so far (every core; idle and iowait excluded)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def markdown_table(columns: Sequence[str], align: str, rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: ``columns`` as the header, ``align`` one letter per column (``l`` left,
    ``r`` right), each row's cells as ``str`` gives them."""
    rule = {"l": "---", "r": "---:"}
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(rule[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def machine_info() -> dict[str, object]:
    """CPU model, core count, Python version, kernel: what the figures were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
    }


# -- helpers for the benchmarks that start their own relay (bench.fairness, bench.tpm) ----------

BENCH_SIM_KEY = "bench-sim-key"
BENCH_ADMIN_TOKEN = "bench-admin-token"
BENCH_ADMIN_ENV = "RELAY_BENCH_ADMIN_TOKEN"


def machine_line(machine: dict[str, object]) -> str:
    """One line naming the machine, for the top of a report."""
    return (
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"Python {machine['python']} ({machine['implementation']}), Linux {machine['kernel']}"
    )


def start_sim(tmp: Path, *options: str) -> Server:
    """The simulated upstream on a free port, with ``options`` (``--capacity-tps``, …)."""
    args = ["-m", "relay.testing.upstream", "--port", "0", "--api-key", BENCH_SIM_KEY, *options]
    return start_server("sim", args, r"listening on (\S+)", tmp / "sim.log")


def create_key(config: Path, package: str, name: str, **limits: float) -> dict:
    """``python -m relay keys create``; ``limits`` are its per-key options (weight=3, tpm=…).
    Returns the CLI's JSON: ``key`` (the secret), ``id`` (as in /admin/state), ``limits``, …"""
    args = ["-m", "relay", "keys", "create", "--config", str(config), "--package", package]
    args += ["--name", name, "--json"]
    for option, value in limits.items():
        args += [f"--{option.replace('_', '-')}", f"{value:g}"]
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"keys create failed: {done.stderr}")
    return json.loads(done.stdout)


def start_relay(tmp: Path, config_text: str, log_name: str = "relay.log") -> Server:
    """Write ``config_text`` to ``tmp/relay.toml`` and serve it (keys must exist already, or be
    created with :func:`create_key` on ``tmp/relay.toml`` before calling this)."""
    env = {"SIM_UPSTREAM_KEY": BENCH_SIM_KEY, BENCH_ADMIN_ENV: BENCH_ADMIN_TOKEN}
    env["RELAY_LOG_LEVEL"] = "WARNING"
    args = ["-m", "relay", "serve", "--config", str(tmp / "relay.toml")]
    return start_server("relay", args, r"relay listening on (\S+)", tmp / log_name, env=env)


def admin_state(relay_url: str) -> dict:
    """``GET /admin/state`` of a relay started by :func:`start_relay`."""
    request = urllib.request.Request(
        relay_url + "/admin/state", headers={"authorization": f"Bearer {BENCH_ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class StreamFailed(Exception):
    """A relayed stream that did not end with its usage chunk and ``[DONE]``, or a non-200."""


def bench_client(base_url: str, connections: int, timeout_s: float = 180.0) -> httpx2.AsyncClient:
    """A keep-alive client with a connection for every concurrent request; the timeout is long
    because requests may wait in the relay's queue before the first byte."""
    return httpx2.AsyncClient(
        base_url=base_url,
        headers={"content-type": "application/json"},
        limits=httpx2.Limits(
            max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=600
        ),
        timeout=httpx2.Timeout(timeout_s),
    )


async def chat_stream_usage(
    client: httpx2.AsyncClient, key: str, body: dict
) -> tuple[dict, httpx2.Headers]:
    """POST a streaming chat request (``stream_options.include_usage`` must be set in ``body``);
    returns the usage chunk's ``usage`` and the response headers."""
    content = json.dumps(body).encode()
    headers = {"authorization": f"Bearer {key}"}
    async with client.stream("POST", "/chat/completions", content=content, headers=headers) as r:
        data = await r.aread()
        if r.status_code != 200:
            raise StreamFailed(f"HTTP {r.status_code}: {data[:200]!r}")
    events = [e.strip() for e in data.split(b"\n\n") if e.strip()]
    if not events or events[-1] != b"data: [DONE]":
        raise StreamFailed(f"stream ended without [DONE]: {data[-200:]!r}")
    for event in reversed(events[:-1]):
        chunk = json.loads(event.removeprefix(b"data: "))
        if chunk.get("usage"):
            return chunk["usage"], r.headers
    raise StreamFailed("stream without a usage chunk")


def process_rss_bytes(pid: int) -> int:
    """Resident memory of a process now (VmRSS, from /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def raise_open_files_limit() -> int:
    """Lift this process's soft limit on open files to the hard limit (children inherit it):
    a thousand concurrent streams need a few thousand sockets. Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
