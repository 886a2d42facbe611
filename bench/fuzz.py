"""``python -m bench fuzz [--examples N] [--seed S]``: the fuzz suite, longer.

Runs ``tests/test_fuzz.py`` and ``tests/test_fuzz_messages.py`` (a real relay each, a simulated
upstream) with N generated requests in all instead of the test run's 5,100, spread over their
tests in the same proportions (``SHARES`` in ``tests/test_fuzz.py``). Without
``--seed`` the cases are the derandomized ones of the test run, only more of them; with it,
hypothesis explores from that seed (print it, and a failure can be replayed with the same seed).
Exit status: pytest's (0 when every case passed and the ledger check held).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz", description=__doc__)
    parser.add_argument("--examples", type=int, default=20_000, help="cases in all")
    parser.add_argument("--seed", type=int, default=None, help="explore from this seed")
    args = parser.parse_args(argv)
    env = {**os.environ, "RELAY_FUZZ_EXAMPLES": str(args.examples)}
    if args.seed is not None:
        env["RELAY_FUZZ_SEED"] = str(args.seed)
    print(f"fuzz: {args.examples} cases, seed {args.seed if args.seed is not None else '(fixed)'}")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/test_fuzz.py", "tests/test_fuzz_messages.py"],
        cwd=ROOT, env=env,
    )
    print(f"fuzz: {time.monotonic() - started:.0f} s, exit status {done.returncode}")
    return done.returncode
