"""A bare ASGI echo on hypercorn's trio worker: the floor of the relay's own stack.

It reads the request body and answers 200 with a JSON body the size of the simulated upstream's
non-streamed chat answer, with no routing, no auth and no upstream call. The relay runs on the
same server, worker and settings, so "relay req/s ÷ echo req/s" says how much of one hypercorn
worker's capacity is left to the relay's own work (issue 6 target: ≥ 70%).

With ``--upstream URL`` it is a **bare proxy** instead: each request's body goes to the same
path at ``URL`` through the relay's upstream connection pool (``relay/upstream/http11.py``) and
the answer comes back as it is, with no parsing, routing, guards or accounting. That is the
floor of any relay on this stack that makes one upstream call per request.

    python -m bench.echo --port 0      # prints "echo listening on http://127.0.0.1:PORT"
    python -m bench.echo --port 0 --upstream http://127.0.0.1:8090 --upstream-key sk-sim
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

from relay.config import ServerConfig
from relay.server import make_listener
from relay.upstream.client import UpstreamClient

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


def proxy_app(upstream: str, key: str):
    """The bare proxy's ASGI app (see the module docstring)."""
    pool = UpstreamClient(ServerConfig()).pool  # the relay's own pool, with its defaults
    auth = ("authorization", f"Bearer {key}")

    async def proxy(scope, receive, send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)  # lifespan
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            auth,
        ]
        response = await pool.post(upstream + scope["path"], headers, body)
        try:
            answer = await response.aread()
        finally:
            await response.aclose()
        content_type = response.headers.get("content-type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", b"%d" % len(answer)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer, "more_body": False})

    return proxy


async def serve(host: str, port: int, asgi=app) -> None:
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
                wrap_app(asgi, None, "asgi"),
                config,
                sockets=sockets,
                shutdown_trigger=shutdown,
                task_status=task_status,
            )
        )
        name = "echo" if asgi is app else "proxy"
        print(f"{name} listening on http://{bound[0]}:{bound[1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8095)
    parser.add_argument("--upstream", help="be a bare proxy to this base URL instead")
    parser.add_argument("--upstream-key", default="", help="the upstream's API key")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asgi = proxy_app(args.upstream.rstrip("/"), args.upstream_key) if args.upstream else app
    trio.run(serve, args.host, args.port, asgi)


if __name__ == "__main__":
    main()
