"""``python -m bench profile``: where the relay's CPU goes per request and per streamed event.

Starts the sim and a relay (as ``bench all`` does), puts load on the relay and samples it with
py-spy (``pip install py-spy``, in the ``bench`` extra) for each load:

- ``nonstream``: non-streamed chat completions, 64 connections back to back;
- ``streams``: paced streams (as ``bench all``'s, 1,000 by default), counted in their window.

Writes py-spy's collapsed stacks to ``bench/results/profile-LOAD.txt`` (feed them to
flamegraph.pl or speedscope) and prints, per load, the functions with the most inclusive and
self time and the self time per package.

    .venv/bin/python -m bench profile            # 15 s per load
    .venv/bin/python -m bench profile --quick    # 6 s per load
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from .common import ROOT, machine_info, machine_line, raise_open_files_limit
from .compare import FULL, Target, chat_body, closed_loop, paced_streams
from .overhead import NONSTREAM_DIRECTIVE, start_servers

OUT_DIR = ROOT / "bench" / "results"
RATE_HZ = 200


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: scripts/setup bench (or pip install py-spy)")
    return found


def _frame(frame: str) -> str:
    """``func (path:line)`` → ``func (package/module.py)``: lines merged, paths shortened."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    path = re.sub(r".*site-packages/", "", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    path = path.replace(str(ROOT) + "/", "")
    return f"{name} ({path})"


def _samples(collapsed: Path) -> Iterator[tuple[list[str], int]]:
    """Each line of py-spy's collapsed stacks: its frames, outermost first, and its count.

    Only the event loop's thread: trio's worker threads (the usage writer's SQLite batches)
    spend their time waiting for the GIL, which py-spy counts as running, 16% of a
    non-stream profile for 1.4% of the process's CPU (per-thread CPU from /proc)."""
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and "Thread._bootstrap" not in stack and "WorkerThread._work" not in stack:
            yield stack.split(";"), int(count)


def summarise(collapsed: Path, top: int = 25) -> str:
    """Inclusive and self time per function, and self time per package, as text."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, n in _samples(collapsed):
        frames = [_frame(f) for f in stack]
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    packages: collections.Counter[str] = collections.Counter()
    for frame, n in own.items():
        match = re.search(r"\(([^/ )]+)", frame)
        packages[match.group(1) if match else frame] += n
    out = [f"samples: {total}", "", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "self, by package:"]
    out += [f"  {100 * n / total:5.1f}%  {p}" for p, n in packages.most_common(12)]
    return "\n".join(out)


#: Libraries a sample is charged to: the innermost frame of one of these (trio's own frames and
#: the standard library are charged to whichever of these called them).
OWNERS = ("relay/", "httpx2/", "httpcore2/", "hypercorn/", "h11/")


def by_owner(collapsed: Path) -> str:
    """Samples per owning library and, for the relay, per function: who caused the CPU use
    (a socket send that hypercorn makes counts for hypercorn, a cancel scope the relay opens
    for the relay)."""
    owners: collections.Counter[str] = collections.Counter()
    relay: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, n in _samples(collapsed):
        total += n
        owner = "trio run loop / other"
        for frame in reversed(stack):
            found = next((lib for lib in OWNERS if lib in frame), None)
            if found:
                owner = found.rstrip("/")
                if owner == "relay" and "relay/cli.py" in frame:
                    owner = "trio run loop / other"  # the run loop's root frame
                elif owner == "relay":
                    relay[_frame(frame)] += n
                break
        owners[owner] += n
    out = ["charged to the library that caused it:"]
    out += [f"  {100 * n / total:5.1f}%  {o}" for o, n in owners.most_common()]
    out += ["", "relay functions (with the trio and stdlib work they cause):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in relay.most_common(12)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="6 s per load instead of 15")
    parser.add_argument("--streams", type=int, default=1000, help="paced streams (1000)")
    parser.add_argument("--only", choices=("nonstream", "streams"), help="profile one load")
    args = parser.parse_args(argv)
    seconds = 6.0 if args.quick else 15.0
    spy = py_spy()
    raise_open_files_limit()
    print(machine_line(machine_info()), file=sys.stderr)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    loads = [args.only] if args.only else ["nonstream", "streams"]
    with tempfile.TemporaryDirectory(prefix="relay-bench-profile-") as tmp_name:
        sim, relay, key = start_servers(Path(tmp_name))
        try:
            target = Target("relay", relay.url, key, relay)
            for load in loads:
                out = OUT_DIR / f"profile-{load}.txt"
                settings = dataclasses.replace(FULL, stream_ramp_s=3.0, stream_window_s=seconds + 2)

                async def run(load: str = load, out: Path = out, settings=settings) -> str:
                    body = chat_body(NONSTREAM_DIRECTIVE, stream=False)
                    await closed_loop(target.pool(64), target.request(body), 2.0, None)
                    record = [spy, "record", "--pid", str(relay.pid), "--rate", str(RATE_HZ)]
                    record += ["--duration", str(int(seconds)), "--format", "raw"]
                    record += ["--nonblocking", "--output", str(out)]
                    async with trio.open_nursery() as nursery:
                        if load == "nonstream":
                            nursery.start_soon(
                                closed_loop,
                                target.pool(64),
                                target.request(body),
                                seconds + 1,
                                None,
                            )
                        else:
                            nursery.start_soon(
                                paced_streams, target, args.streams, settings, {"relay": relay}
                            )
                            await trio.sleep(settings.stream_ramp_s + 0.5)
                        started = time.perf_counter()
                        done = await trio.run_process(record, capture_stdout=True, check=False)
                        elapsed = time.perf_counter() - started
                        nursery.cancel_scope.cancel()
                    if done.returncode != 0:
                        raise SystemExit(f"py-spy failed: {done.stdout!r}")
                    return f"{elapsed:.0f} s"

                print(f"profiling {load} for {seconds:.0f} s…", file=sys.stderr, flush=True)
                trio.run(run)
                print(f"\n## {load}  ({out})\n")
                print(summarise(out))
                print()
                print(by_owner(out))
        finally:
            relay.stop()
            sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
