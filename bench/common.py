"""Helpers shared by the benchmarks: server processes, CPU accounting, percentiles, machine info."""

from __future__ import annotations

import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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
    name: str, args: list[str], pattern: str, log: Path, env: dict[str, str] | None = None
) -> Server:
    """Start ``python ARGS`` and wait for the line that says where it listens.

    The child runs in its own session so a Ctrl-C in the terminal reaches only this process,
    which then stops the children itself (one SIGINT each, no double interrupt).
    """
    log_file = open(log, "w")  # handed to the child, then to the drain thread
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        cwd=ROOT,
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
