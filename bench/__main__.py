"""``python -m bench COMMAND``: one entry point for the benchmarks.

python -m bench all [--quick]        relay vs direct upstream, LiteLLM and a hypercorn echo
python -m bench profile [--quick]    py-spy profile of the relay's hot paths
python -m bench ab REF               the relay at git REF against the working tree
python -m bench overhead [--quick]   relay vs direct upstream (httpx2 client)
python -m bench fairness [--quick]   weighted fair queueing under saturation
python -m bench tpm [--quick]        a key's TPM limit, minute by minute
python -m bench ledger               what credit holds, pricing and metrics cost per request
python -m bench chaos [--requests N] hang-ups, upstream faults, SIGTERM and kill -9 under load
python -m bench fuzz [--examples N]  the fuzz suite with N cases (--seed S to explore)
python -m bench workers              how relay serve --workers 2 spreads load over its workers
python -m bench websocket [--quick]  Responses turns over a WebSocket vs HTTP vs direct
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "all": "bench.compare",
    "profile": "bench.profile",
    "ab": "bench.ab",
    "overhead": "bench.overhead",
    "fairness": "bench.fairness",
    "tpm": "bench.tpm",
    "ledger": "bench.ledger",
    "chaos": "bench.chaos",
    "fuzz": "bench.fuzz",
    "workers": "bench.workers",
    "scaleout": "bench.scaleout",
    "websocket": "bench.websocket",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[sys.argv[1]])
    return module.main(sys.argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main())
