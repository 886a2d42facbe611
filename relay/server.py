"""Run the relay under hypercorn's trio worker, with the runtime around it.

The listening socket is made here rather than by hypercorn (or, with several workers, by their
parent, ``relay/workers.py``, and handed to :func:`serve`) so that port 0 works (tests and the
demo learn the real port from ``task_status``) and so that it carries ``TCP_USER_TIMEOUT``: a
client that stops reading leaves hypercorn's shielded write blocked, and the kernel is the one
party that can end it. With the option set, a connection whose sent data stays unacknowledged
(a full receive window included) for twice ``stall_timeout_s`` is aborted, which unblocks the
write and ends the request; the relay's own watchdog (which releases the upstream and the slots
at ``stall_timeout_s``) always acts first.

Two things hypercorn does not do the relay's way, and how they are changed without forking it:

- *Requests h11 cannot read* (a garbage request line, a bad header or chunk, headers over
  64 KiB, a Transfer-Encoding other than chunked) got an empty 400, 431 or 501. The relay's
  :class:`RelayH11Protocol` (installed where hypercorn's worker looks up its HTTP/1.1
  protocol) answers them in OpenAI's error JSON, and answers an unsupported Transfer-Encoding
  with 400 instead of 501: a client's malformed request is not a server fault (RFC 9112
  §6.1 says SHOULD 501; the relay keeps "5xx means the relay or its upstream failed"). It also
  refuses at once (413) a chunk that announces more than ``max_body_bytes``, instead of
  waiting for it.
- *Shutdown* (SIGTERM/SIGINT, or ``shutdown_trigger``): the relay stops accepting connections
  at once, answers requests still queued in admission with 503, lets running requests finish
  for up to ``drain_timeout_s``, then ends the rest through their own nurseries, each with an
  error event in its protocol (:meth:`relay.runtime.Runtime.cut`); hypercorn's graceful timeout is
  a few seconds longer, so those last events are written. Then every usage record is written
  and the process exits 0. A second signal during the drain is not caught: it stops the
  process at once, as an operator who presses Ctrl-C twice expects.

Request heads are timed by hypercorn's keep-alive timer (it runs until a request's headers are
complete, so a client trickling them is closed after ``keep_alive_timeout_s``); bodies by the
relay (``body_read_timeout_s``, 408). hypercorn's own ``read_timeout`` stays unset: it times
every read of the connection, including the long silence of a client waiting for its stream,
and would cut every stream longer than it.
"""

from __future__ import annotations

import errno
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import hypercorn.protocol
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from .api.metrics import LiveMirror, multiprocess_dir
from .app import RelayApp
from .config import Config
from .errors import RelayError
from .runtime import Runtime, open_runtime

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


class ListenError(Exception):
    """The listen address cannot be taken; the message says why in the operator's terms
    ("127.0.0.1:8080 is already in use"), for the command line to print as it is."""


def make_listener(host: str, port: int, user_timeout_s: float | None = None) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), or :class:`ListenError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if user_timeout_s is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        # Inherited by every accepted connection on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_s * 1000))
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ListenError(_listen_failure(host, port, error)) from None
    sock.set_inheritable(True)
    return sock


def listen_url(listener: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket (the port the OS picked, for port 0)."""
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _listen_failure(host: str, port: int, error: OSError) -> str:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return f"{address} is already in use (another relay or program listens there)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address}: {host} is not an address of this machine"
    if error.errno == errno.EACCES:
        return f"cannot listen on {address}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on {address}: {error.strerror or error}"


#: Seconds hypercorn waits for handlers after the drain timeout: room for the error events
#: of the requests the drain ended to be written.
CUT_GRACE_S = 5.0

#: What a client is told about a request h11 could not read, by h11's status hint.
_FRAMING_ERRORS = {
    400: ("The request is not valid HTTP/1.1 and could not be read.", "malformed_request"),
    431: (
        "The request's headers are larger than this relay accepts (64 KiB).",
        "request_header_fields_too_large",
    ),
    501: (
        "The request's Transfer-Encoding is not supported: send a Content-Length, or "
        "'Transfer-Encoding: chunked' alone.",
        "unsupported_transfer_encoding",
    ),
}


class RelayH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, answering what it cannot read in OpenAI's error JSON and
    refusing an absurd chunk size at once (see the module docstring).

    Two races of hypercorn's are closed too. When h11 fails to read what follows a request (a
    bad chunk, a garbage pipelined request) while the application answers it, the reader's
    error answer and the application's were interleaved, and the reader's close cut the
    application's answer short or raised ``BusyResourceError`` (``send_eof`` while another
    task sends). Now the error answer, once begun, is the only one (the application's is
    dropped), it is written in one piece, and a close waits for the write in progress; while
    the application's answer is being written, the reader's close waits for it to end
    (hypercorn then closes the connection, as the request was not read cleanly).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._transport_send: Callable[[Event], Awaitable[None]]
        super().__init__(*args, **kwargs)
        self._writes = 0  # RawData sends in progress
        self._took_over = False  # the reader answered with an error: the app's answer is dropped

    # hypercorn's protocol stores the worker's send callable as ``self.send`` and calls it; the
    # property puts _send in between. (Storing the bound ``self._send`` on the instance instead
    # would make every connection a reference cycle, freed only by the collector.)
    @property
    def send(self) -> Callable[[Event], Awaitable[None]]:
        return self._send

    @send.setter
    def send(self, transport_send: Callable[[Event], Awaitable[None]]) -> None:
        self._transport_send = transport_send

    async def _send(self, event: Event) -> None:
        if isinstance(event, RawData):
            self._writes += 1
            try:
                await self._transport_send(event)
            finally:
                self._writes -= 1
            return
        if isinstance(event, Closed):
            if self.stream is not None and self.connection.our_state is h11.SEND_BODY:
                return  # an answer is being written: _maybe_recycle closes once it has ended
            while self._writes:  # rare: a close racing a write
                await trio.sleep(0.005)
        await self._transport_send(event)

    async def stream_send(self, event: StreamEvent) -> None:
        if self._took_over and not isinstance(event, StreamClosed):
            return
        await super().stream_send(event)

    async def handle(self, event: Event) -> None:
        await super().handle(event)
        if isinstance(event, RawData):
            # h11 keeps the size of the chunk it is reading privately; without it (another h11)
            # such a body is still bounded, by the relay's body timeout and size limit.
            reader = getattr(self.connection, "_reader", None)
            if getattr(reader, "_bytes_in_chunk", 0) > self.config.relay_max_body_bytes:
                if self.connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                    limit = self.config.relay_max_body_bytes // (1024 * 1024)
                    await self._send_json_error(
                        413,
                        f"A chunk of the request body is larger than this relay accepts "
                        f"({limit} MiB).",
                        "request_too_large",
                    )
                await self.send(Closed())

    async def _create_stream(self, request: h11.Request) -> None:
        # RFC 9112 §6.3: a request with both is a smuggling attempt or a broken intermediary;
        # h11 would read it by Transfer-Encoding. Refused here, before the application sees
        # it, and the connection closed: what follows on it cannot be framed with confidence.
        names = {name for name, _ in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            await self._send_json_error(
                400,
                "The request has both Content-Length and Transfer-Encoding headers, which "
                "makes its length ambiguous; send only one of them.",
                "ambiguous_framing",
            )
            await self.send(Closed())
            return
        await super()._create_stream(request)

    async def _send_error_response(self, status_code: int) -> None:
        message, code = _FRAMING_ERRORS.get(status_code, _FRAMING_ERRORS[400])
        await self._send_json_error(
            400 if status_code == 501 else status_code, message, code
        )

    async def _send_json_error(self, status: int, message: str, code: str) -> None:
        self._took_over = True
        body = RelayError(
            message, status=status, type="invalid_request_error", code=code
        ).to_json()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        try:
            data = b"".join(
                self.connection.send(event) or b""
                for event in (
                    h11.Response(status_code=status, headers=headers),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                )
            )
        except h11.LocalProtocolError:
            return  # an answer had begun after all: the close that follows ends it
        await self.send(RawData(data=data))


def install_protocol() -> None:
    """Make hypercorn's workers speak HTTP/1.1 through :class:`RelayH11Protocol` (its
    ``ProtocolWrapper`` looks the class up in ``hypercorn.protocol`` for each connection)."""
    hypercorn.protocol.H11Protocol = RelayH11Protocol  # type: ignore[misc]


def hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    hc.keep_alive_timeout = config.server.keep_alive_timeout_s
    hc.graceful_timeout = config.server.drain_timeout_s + CUT_GRACE_S
    hc.relay_max_body_bytes = config.server.max_body_bytes  # read by RelayH11Protocol
    # A WebSocket's response.create may be as large as a request body (a whole conversation).
    hc.websocket_max_message_size = config.server.max_body_bytes
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    # Request bodies are capped by the relay itself (413 in OpenAI's shape), not by hypercorn.
    hc.h11_max_incomplete_size = 64 * 1024
    return hc


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    listener: socket.socket | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (or SIGINT/SIGTERM), then drain (see the
    module docstring); reports the base URL. ``listener``: a listening socket to serve on (a
    worker's, inherited from its parent: ``relay/workers.py``) instead of one made here."""
    install_protocol()
    server = config.server
    if listener is None:
        listener = make_listener(server.host, server.port, 2 * server.stall_timeout_s)
        listener.listen(1024)
    url = listen_url(listener)
    async with open_runtime(config) as runtime:
        app = wrap_app(RelayApp(runtime), None, "asgi")
        tune_gc()

        async def shut_down() -> None:
            await (shutdown_trigger or wait_for_signal)()
            runtime.shut_down()
            nursery.start_soon(drain, runtime, server.drain_timeout_s)
            # Returning makes hypercorn stop accepting and close idle connections.

        async def started(*, task_status=trio.TASK_STATUS_IGNORED):
            await worker_serve(
                app,
                hypercorn_config(config),
                sockets=Sockets(secure_sockets=[], insecure_sockets=[listener], quic_sockets=[]),
                shutdown_trigger=shut_down,
                task_status=task_status,
            )

        async with trio.open_nursery() as background:
            if multiprocess_dir():  # one of several workers: its live state for /metrics
                background.start_soon(LiveMirror(runtime).run)
            async with trio.open_nursery() as nursery:
                await nursery.start(started)
                task_status.started(url)
            background.cancel_scope.cancel()


async def drain(runtime: Runtime, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for running relay requests to finish, then cut the rest."""
    deadline = trio.current_time() + timeout_s
    log.info("draining %d running requests (up to %gs)", runtime.active_requests, timeout_s)
    while runtime.active_requests and trio.current_time() < deadline:
        await trio.sleep(0.05)  # only while shutting down
    cut = runtime.cut()
    if cut:
        log.warning("drain timeout: ended %d requests still running", cut)


async def wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            return
