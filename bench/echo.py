"""A bare ASGI echo on hypercorn's trio worker: the floor of the relay's own stack.

It reads the request body and answers 200 with a JSON body the size of the simulated upstream's
non-streamed chat answer, with no routing, no auth and no upstream call. The relay runs on the
same server, worker and settings, so "relay req/s ÷ echo req/s" says how much of one hypercorn
worker's capacity is left to the relay's own work (issue 6 target: ≥ 70%).

    python -m bench.echo --port 0      # prints "echo listening on http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import json
import logging
import signal

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from relay.server import make_listener

#: About the size of the sim's answer to a 20-token chat completion (642 bytes).
BODY = json.dumps({"object": "echo", "padding": "x" * 600}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY, "more_body": False})


async def serve(host: str, port: int) -> None:
    listener = make_listener(host, port)
    listener.listen(1024)
    config = Config()
    config.keep_alive_timeout = 120.0  # as the benchmark's relay
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    bound = listener.getsockname()
    sockets = Sockets(secure_sockets=[], insecure_sockets=[listener], quic_sockets=[])

    async def shutdown() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: worker_serve(
                wrap_app(app, None, "asgi"),
                config,
                sockets=sockets,
                shutdown_trigger=shutdown,
                task_status=task_status,
            )
        )
        print(f"echo listening on http://{bound[0]}:{bound[1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8095)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trio.run(serve, args.host, args.port)


if __name__ == "__main__":
    main()
