"""Run the relay under hypercorn's trio worker, with the runtime around it.

The listening socket is made here rather than by hypercorn so that port 0 works (tests and the
demo learn the real port from ``task_status``) and so that it carries ``TCP_USER_TIMEOUT``: a
client that stops reading leaves hypercorn's shielded write blocked, and the kernel is the one
party that can end it. With the option set, a connection whose sent data stays unacknowledged
(a full receive window included) for twice ``stall_timeout_s`` is aborted, which unblocks the
write and ends the request; the relay's own watchdog (which releases the upstream and the slots
at ``stall_timeout_s``) always acts first.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from .app import RelayApp, open_runtime
from .config import Config

log = logging.getLogger("relay")

#: CPython's collector thresholds for the serving process (the defaults are 700, 10, 10).
GC_THRESHOLDS = (50_000, 50, 20)


def tune_gc() -> None:
    """Keep the cyclic garbage collector out of the relay's latency.

    A relay holds long-lived objects for every open stream (connections, tasks, parser state).
    With CPython's default thresholds the collector scanned them every few hundred
    allocations, and with a thousand open streams its full collections paused the event loop
    for 100-180 ms, the relay's worst inter-event delays. So the objects made at start-up
    (modules, configuration, the runtime) are frozen out of every scan, and the young
    generation is collected after 50,000 allocations instead of 700: collections are rarer,
    and the full ones shorter (15 ms with a thousand streams). Nearly everything a request
    allocates is freed by reference counting anyway; what waits for the collector is bounded
    by the threshold (a few MB).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def make_listener(host: str, port: int, user_timeout_s: float | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if user_timeout_s is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        # Inherited by every accepted connection on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_s * 1000))
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    hc.keep_alive_timeout = config.server.keep_alive_timeout_s
    hc.graceful_timeout = 5.0
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    # Request bodies are capped by the relay itself (413 in OpenAI's shape), not by hypercorn.
    hc.h11_max_incomplete_size = 64 * 1024
    return hc


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (or SIGINT/SIGTERM); reports the base URL."""
    server = config.server
    listener = make_listener(server.host, server.port, 2 * server.stall_timeout_s)
    listener.listen(1024)
    host, port = listener.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    async with open_runtime(config) as runtime:
        app = wrap_app(RelayApp(runtime), None, "asgi")
        tune_gc()

        async def started(*, task_status=trio.TASK_STATUS_IGNORED):
            await worker_serve(
                app,
                hypercorn_config(config),
                sockets=Sockets(secure_sockets=[], insecure_sockets=[listener], quic_sockets=[]),
                shutdown_trigger=shutdown_trigger or wait_for_signal,
                task_status=task_status,
            )

        async with trio.open_nursery() as nursery:
            await nursery.start(started)
            task_status.started(url)


async def wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            return
