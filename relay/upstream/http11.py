"""The upstream hop's HTTP/1.1 client: trio's sockets and one connection pool.

Why the relay has its own and no longer uses httpx2 here: on the relay's hot path httpx2 and
httpcore2 were the largest single cost (issue 6's profile): 37% of a non-streamed request's CPU,
and for every relayed stream event six nested async iterators, a ``fail_after`` and an
exception-mapping context manager per read. The relay needs a small part of what they offer: POST
a body to a few known origins, HTTP/1.1 only (closing a response must close the socket so the
upstream stops generating, stack-notes), keep-alive, a connection cap, and the timeouts below.
This module does that and nothing else; ``h1.py`` writes the requests and frames the answers
(h11 did, until it was measured: see there).

Timeouts: ``connect`` covers TCP and TLS set-up (and a proxy's tunnel, :mod:`.proxy`),
``pool`` the wait for a free connection when ``max_connections`` are in use, ``read`` every
wait for the upstream (sending the request, each gap between received bytes), as httpx's
``read`` timeout did; a caller that watches a response for silence itself turns the last off
for that response (``Response.timed_reads``).

Connections: a response read to its end goes back to its origin's idle list (newest first) and
is reused while it is younger than ``keepalive_expiry_s``; an idle connection the upstream has
closed (readable while idle) is dropped when met. A response closed early closes its socket at
once, synchronously, so no cancellation can leave a socket or a pool slot behind.

A reused connection can still be one the upstream closed as the request went out (its idle
timeout ran out then: the check above sees nothing yet). If such an exchange fails before one
byte of the answer arrived (the write fails, or the connection ends or is reset before the
status line), the request is sent once more, on a new connection, and the first failure is not
the caller's to see: on a reused connection this is nearly always keep-alive's race, not the
upstream failing, and nothing of an answer was produced (browsers retry the same case; an
upstream that crashed on the request looks the same and gets it once more). A read timeout is
never retried (the upstream may be working on the request), nor a new connection's failure.

Bounds: a body the caller reads whole (``Response.aread``) may be at most ``max_body_bytes``,
decoded; a gzip or deflate coded body (sent despite the pool's ``identity``) is decoded as it
arrives in steps no larger than a read (``h1.BodyDecoder``), so a compression bomb inflates no
further than its reader lets it.
"""

from __future__ import annotations

import os
import select
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from . import h1
from .proxy import DIRECT, Proxy, Route, TunnelRefused, open_tunnel

#: Idle connections are kept per origin and route (:class:`.proxy.Route`).
_PoolKey = tuple[tuple[str, str, int], Route]

#: Bytes asked of the socket per read: a whole burst of events arrives in one read.
READ_SIZE = 65536

#: Bodies up to this size are sent in the same write as the request head.
COALESCE_BODY_BYTES = 16384

#: Larger bodies are sent in slices of this size, each with its own read (send) timeout.
SEND_SLICE_BYTES = 65536

#: Headers the pool writes itself; a caller's are dropped.
_POOL_HEADERS = frozenset({"host", "content-length"})
#: Headers about the connection or the framing, which a request must not bring (a
#: ``transfer-encoding`` next to the pool's length would make the upstream read another body).
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
    | {"upgrade"}
)


class TransportError(Exception):
    """The upstream could not be reached, or the connection broke or spoke no valid HTTP/1.1."""


class ConnectTimeout(TransportError):
    """TCP or TLS set-up took longer than the connect timeout."""


class ProxyError(TransportError):
    """The route's proxy could not be reached or refused the tunnel. ``reason`` is fit for a
    client (the message, for the operator's log, names the proxy but never its credentials)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class CertificateUntrusted(TransportError):
    """The upstream's TLS certificate did not verify against the route's CAs. ``reason`` is
    the verifier's (an expired or self-signed certificate, a wrong host name)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PoolTimeout(TransportError):
    """Every one of the pool's ``max_connections`` stayed busy for the pool timeout."""


class ReadTimeout(TransportError):
    """The upstream sent nothing (or accepted nothing) for the read timeout."""


class ResponseTooLarge(TransportError):
    """The answer is longer (decoded) than the pool's ``max_body_bytes``."""


class _Unanswered(TransportError):
    """The exchange failed before one byte of the answer arrived (see the module docstring)."""


class UnsendableRequest(ValueError):
    """The request cannot be put on the wire (a header value HTTP/1.1 cannot carry): the
    caller's input, not the upstream's fault."""


@dataclass(frozen=True, slots=True)
class _Target:
    """A parsed URL: the pool key, the ``host`` header and the request target."""

    origin: tuple[str, str, int]  # scheme, host, port
    host_header: bytes
    path: bytes


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default_port = 443 if scheme == "https" else 80
    port = parts.port or default_port
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default_port else f"{shown}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target((scheme, host, port), host_header.encode("idna"), path.encode("ascii"))


class _Connection:
    """One socket to an upstream origin and the reader of its current answer."""

    __slots__ = (
        "_plain_fd",
        "_read",
        "drained",
        "idle_since",
        "origin",
        "reader",
        "reusable",
        "socket",
        "stream"
    )

    def __init__(
        self, origin: _PoolKey, stream: trio.abc.Stream, socket: trio.socket.SocketType
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.socket = socket
        # Plain TCP reads the socket itself: trio's SocketStream adds a conflict detector and
        # an error-translating context manager to every read, a visible share per stream event.
        plain = isinstance(stream, trio.SocketStream)
        self._read = socket.recv if plain else stream.receive_some
        # A plain TCP socket on POSIX: its descriptor is waited on and read or written directly.
        self._plain_fd = plain and os.name == "posix"
        self.drained = True  # the last read left nothing behind (nothing was read yet)
        self.reader = h1.ResponseReader()
        self.idle_since = 0.0
        self.reusable = True  # False once the exchange went wrong in a way the reader cannot see

    async def receive(self, size: int) -> bytes:
        """The next bytes from the upstream, waiting for them if need be.

        After a short read the socket is empty, and the next read would only fail with EAGAIN
        before trio waits: for a streamed answer that is every event. So a plain TCP socket is
        waited on first and then read (``os.read`` on its non-blocking descriptor), one system
        call and one exception fewer per event. Closing the socket wakes the wait with
        ``ClosedResourceError``, as trio's own read does; a socket closed by another task
        after the wake has no descriptor (-1), and its read fails instead of reading another's.
        """
        if self.drained and self._plain_fd:
            await trio.lowlevel.wait_readable(self.socket)
            try:
                data = os.read(self.socket.fileno(), size)
            except BlockingIOError:  # woken without data after all: trio's read waits again
                data = await self._read(size)
        else:
            data = await self._read(size)
        self.drained = len(data) < size
        return data

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Write what the socket takes at once (plain TCP; 0 for TLS): a request that fits in
        the socket's buffer, which is nearly every one, needs no timeout scope and no wait."""
        if not self._plain_fd:
            return 0
        try:
            return os.write(self.socket.fileno(), data)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Close the socket now (no checkpoint: safe in any cleanup, cancelled or not). For TLS
        this skips close_notify, as a reset does; HTTP/1.1 framing makes that harmless."""
        self.socket.close()

    def looks_closed(self) -> bool:
        """An idle connection with something to read has been closed (or broken) by the peer."""
        if self.socket.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))


class ConnectionPool:
    """HTTP/1.1 connections to upstream origins, at most ``max_connections`` in use at once."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_idle_connections: int,
        keepalive_expiry_s: float,
        connect_timeout_s: float,
        read_timeout_s: float,
        pool_timeout_s: float,
        max_body_bytes: int = 64 * 1024 * 1024,
        ssl_context_factory: Callable[[], ssl.SSLContext] = ssl.create_default_context,
        user_agent: str = "relay",
    ) -> None:
        self._max_connections = max_connections
        self._slots = trio.Semaphore(max_connections)
        self._max_idle = max_idle_connections
        self._idle: dict[_PoolKey, list[_Connection]] = {}
        self._keepalive_expiry = keepalive_expiry_s
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._pool_timeout = pool_timeout_s
        #: The longest body ``Response.aread`` returns (decoded).
        self.max_body_bytes = max_body_bytes
        self._ssl_context_factory = ssl_context_factory
        # Made at a route's first https connection: one per ca_file (None: the system's CAs).
        self._ssl_contexts: dict[str | None, ssl.SSLContext] = {}
        self._user_agent = user_agent.encode()
        self._targets: dict[str, _Target] = {}  # a few URLs from the config: parse each once
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())  # a few origins: the accounts

    @property
    def busy_connections(self) -> int:
        return self._max_connections - self._slots.value

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        await trio.lowlevel.checkpoint()

    async def post(
        self, url: str, headers: list[tuple[str, str]], body: bytes, route: Route = DIRECT
    ) -> Response:
        """Send ``POST url`` with ``body`` and return the response once its head has arrived.

        ``route`` says how to reach the origin (a proxy, a private CA); connections of one
        route are reused only for that route. The caller must ``aclose()`` the response (or
        read it to the end); until then it holds one of the pool's connections.
        """
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _parse_url(url)
        await self._take_slot()
        try:
            key = (target.origin, route)
            connection = self._checkout(key)
            reused = connection is not None
            while True:
                if connection is None:
                    connection = await self._connect(key)
                try:
                    head = await self._exchange(connection, target, headers, body)
                    break
                except _Unanswered:
                    connection.close()
                    if not reused:
                        raise
                    # Closed by the upstream as the request went out: once more, on a new one.
                    connection, reused = None, False
                except BaseException:
                    connection.close()
                    raise
        except BaseException:
            self._slots.release()
            raise
        encoding = _content_coding(head)
        if encoding is None:
            return Response(self, connection, head)
        return _DecodedResponse(self, connection, head, encoding)

    async def _exchange(
        self,
        connection: _Connection,
        target: _Target,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> h1.Head:
        """Send the request and wait for the answer's head.

        An upstream may answer before it has read the whole body (413 to an oversized request,
        401) and close: the write then fails, but the answer is there to read, and it is what
        the client must see, not "unreachable". The connection is not reused after that.
        """
        try:
            await self._send(connection, target, headers, body)
        except ReadTimeout:
            raise
        except TransportError as failure:
            connection.reusable = False
            try:
                return await self._receive_head(connection)
            except _Unanswered:
                raise _Unanswered(str(failure)) from None
            except TransportError:
                raise failure from None
        return await self._receive_head(connection)

    async def _take_slot(self) -> None:
        if self._closed:
            raise TransportError("the relay is shutting down")
        try:
            self._slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self._pool_timeout):
            await self._slots.acquire()
            return
        raise PoolTimeout(
            f"all {self._max_connections} upstream connections stayed busy for "
            f"{self._pool_timeout:g}s"
        )

    def _checkout(self, origin: _PoolKey) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_usable = trio.current_time() - self._keepalive_expiry
        while idle:
            connection = idle.pop()
            if connection.idle_since >= oldest_usable and not connection.looks_closed():
                return connection
            connection.close()
        return None

    def _checkin(self, connection: _Connection) -> None:
        """Keep a connection whose exchange ended cleanly, or close it.

        Not reused: anything received beyond the answer's end (an upstream that sent more than
        it framed would otherwise answer the next request with it). At the idle cap, expired
        connections of every origin go first, then the one idle the longest, so one account's
        idle connections cannot deny keep-alive to the others.
        """
        if (
            self._closed
            or self._max_idle <= 0
            or not connection.reusable
            or not connection.reader.reusable
        ):
            connection.close()
            return
        connection.reader = h1.ResponseReader()
        now = connection.idle_since = trio.current_time()
        if self.idle_connections >= self._max_idle:
            self._drop_expired(now)
        if self.idle_connections >= self._max_idle:
            self._drop_longest_idle()
        self._idle.setdefault(connection.origin, []).append(connection)

    def _drop_expired(self, now: float) -> None:
        oldest_usable = now - self._keepalive_expiry
        for idle in self._idle.values():
            while idle and idle[0].idle_since < oldest_usable:  # oldest first
                idle.pop(0).close()

    def _drop_longest_idle(self) -> None:
        idle = min((i for i in self._idle.values() if i), key=lambda i: i[0].idle_since)
        idle.pop(0).close()

    async def _connect(self, key: _PoolKey) -> _Connection:
        """A new connection for ``key``: TCP to the origin or its route's proxy, the proxy's
        tunnel, then TLS for https (verified against the route's CAs)."""
        (scheme, host, port), route = key
        proxy = route.proxy
        where = f"{host}:{port}" if proxy is None else f"{host}:{port} via proxy {proxy.shown}"
        tcp: trio.SocketStream | None = None
        with trio.move_on_after(self._connect_timeout):
            try:
                if proxy is None:
                    tcp = await trio.open_tcp_stream(host, port)
                else:
                    tcp = await self._open_proxy(proxy, host, port)
                stream: trio.abc.Stream = tcp
                if scheme == "https":
                    stream = trio.SSLStream(
                        tcp,
                        self._ssl_context_for(route.ca_file),
                        server_hostname=host,
                        https_compatible=True,
                    )
                    await stream.do_handshake()
                return _Connection(key, stream, tcp.socket)
            except (OSError, trio.BrokenResourceError) as exc:
                if tcp is not None:
                    tcp.socket.close()
                untrusted = _certificate_error(exc)
                if untrusted is not None:
                    raise CertificateUntrusted(
                        f"{where}: the TLS certificate is not trusted: {_describe(exc)}",
                        untrusted,
                    ) from None
                raise TransportError(f"{where}: {_describe(exc)}") from None
            except BaseException:
                if tcp is not None:
                    tcp.socket.close()
                raise
        if tcp is not None:
            tcp.socket.close()
        raise ConnectTimeout(f"{where}: no connection within {self._connect_timeout:g}s")

    async def _open_proxy(self, proxy: Proxy, host: str, port: int) -> trio.SocketStream:
        """TCP to ``proxy`` and its tunnel to ``host:port``; :class:`ProxyError` if either
        fails (a timeout is the caller's)."""
        try:
            tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
        except OSError as exc:
            raise ProxyError(
                f"proxy {proxy.shown} cannot be reached: {_describe(exc)}",
                "the proxy cannot be reached",
            ) from None
        try:
            await open_tunnel(tcp, proxy, host, port)
        except TunnelRefused as exc:
            tcp.socket.close()
            raise ProxyError(str(exc), exc.reason) from None
        except (OSError, trio.BrokenResourceError) as exc:
            tcp.socket.close()
            raise ProxyError(
                f"proxy {proxy.shown}: the connection broke during the handshake: "
                f"{_describe(exc)}",
                "the connection to the proxy broke during its handshake",
            ) from None
        except BaseException:
            tcp.socket.close()
            raise
        return tcp

    def _ssl_context_for(self, ca_file: str | None) -> ssl.SSLContext:
        context = self._ssl_contexts.get(ca_file)
        if context is None:
            context = self._ssl_context_factory()
            if ca_file is not None:
                context.load_verify_locations(cafile=ca_file)
            self._ssl_contexts[ca_file] = context
        return context

    async def _send(
        self,
        connection: _Connection,
        target: _Target,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        try:
            # Values as latin-1 bytes: what the relay's server decoded a client's header with.
            # The host and the length are the pool's to write (the length frames the body).
            encoded = []
            for name, value in headers:
                lowered = name.lower()
                if lowered in _POOL_HEADERS:
                    continue
                if lowered in _HOP_HEADERS:
                    raise h1.UnsendableHeader(f"{name!r} is the connection's, not the request's")
                encoded.append((name.encode("ascii"), value.encode("latin-1")))
            head = h1.request_head(
                b"POST",
                target.path,
                [
                    (b"host", target.host_header),
                    (b"user-agent", self._user_agent),
                    *encoded,
                    (b"content-length", b"%d" % len(body)),
                ],
            )
        except (h1.UnsendableHeader, UnicodeEncodeError) as exc:
            connection.reusable = False
            raise UnsendableRequest(f"a header cannot be sent as HTTP/1.1: {exc}") from None
        writes = [head + body] if len(body) <= COALESCE_BODY_BYTES else [head, body]
        if any(len(data) > SEND_SLICE_BYTES for data in writes):
            writes = [
                memoryview(data)[start : start + SEND_SLICE_BYTES]
                for data in writes
                for start in range(0, len(data), SEND_SLICE_BYTES)
            ]
        try:
            for data in writes:
                written = connection.send_nowait(data)
                if written == len(data):
                    continue
                with trio.move_on_after(self._read_timeout) as slice_scope:
                    await connection.stream.send_all(memoryview(data)[written:])
                if slice_scope.cancelled_caught:
                    raise ReadTimeout(f"the upstream accepted no data for {self._read_timeout:g}s")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportError(f"sending the request failed: {_describe(exc)}") from None

    async def _receive_head(self, connection: _Connection) -> h1.Head:
        """The answer's head; :class:`_Unanswered` if the connection ended or broke before
        one byte of it came."""
        reader = connection.reader
        heard = False
        while True:
            try:
                head = reader.head()
            except h1.ProtocolError as exc:
                raise TransportError(f"the answer is not valid HTTP/1.1: {exc}") from None
            if head is not None:
                return head
            try:
                received = await self._receive(connection)
            except ReadTimeout:
                raise
            except TransportError as exc:
                raise (TransportError if heard else _Unanswered)(str(exc)) from None
            if not received:
                failure = TransportError if heard else _Unanswered
                raise failure("the upstream closed the connection before answering")
            heard = True

    async def _receive(self, connection: _Connection, timed: bool = True) -> bool:
        """Feed the reader the next bytes from the socket; False at end of file. ``timed=False``: no
        read timeout, the caller keeps the time (see ``Response.timed_reads``)."""
        if not timed:
            return await self._receive_untimed(connection)
        with trio.move_on_after(self._read_timeout):
            return await self._receive_untimed(connection)
        raise ReadTimeout(f"the upstream sent nothing for {self._read_timeout:g}s")

    async def _receive_untimed(self, connection: _Connection) -> bool:
        try:
            data = await connection.receive(READ_SIZE)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportError(f"the connection broke: {_describe(exc)}") from None
        connection.reader.feed(data)
        return bool(data)


class Response:
    """An upstream answer whose head has arrived. Iterate it for the body as it arrives (bytes
    as sent, chunked framing removed; whatever arrived together comes as one piece), or
    ``aread()`` it whole. ``aclose()`` it when done: idempotent, and what frees its connection
    if the body was not read to the end."""

    __slots__ = (
        "_connection",
        "_max_body_bytes",
        "_pool",
        "headers",
        "status_code",
        "timed_reads",
    )

    def __init__(self, pool: ConnectionPool, connection: _Connection, head: h1.Head) -> None:
        self._pool: ConnectionPool | None = pool
        self._max_body_bytes = pool.max_body_bytes
        self._connection = connection
        #: Each read waits at most the pool's read timeout. A caller that watches a long stream
        #: for silence itself (one timer for all its reads; a cancel scope per read was a
        #: visible share of the CPU per event) sets this to False.
        self.timed_reads = True
        self.status_code: int = head.status_code
        headers: dict[str, str] = {}
        for name, value in head.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.headers = headers

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        pool = self._pool
        if pool is None:
            raise StopAsyncIteration
        connection = self._connection
        reader = connection.reader
        try:
            while True:
                data = reader.read()
                if reader.done:
                    self._pool = None
                    pool._slots.release()
                    pool._checkin(connection)
                    if not data:
                        raise StopAsyncIteration
                    return data
                if data:
                    return data
                await pool._receive(connection, self.timed_reads)
        except h1.ProtocolError as exc:
            self._release()
            raise TransportError(f"the upstream's answer broke off: {exc}") from None
        except BaseException:
            if self._pool is not None:
                self._release()
            raise

    async def aread(self) -> bytes:
        """The whole body, decoded if the upstream compressed it despite ``identity``.

        A body longer than the pool's ``max_body_bytes`` raises :class:`ResponseTooLarge` as
        soon as its reading passes that (no more than one read or decoding step beyond it is
        ever held) and closes the connection.
        """
        limit = self._max_body_bytes
        pieces = []
        size = 0
        async for piece in self:
            size += len(piece)
            if size > limit:
                self._release()
                raise ResponseTooLarge(
                    f"the answer is longer than {limit} bytes (server.upstream_max_body_bytes)"
                )
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _release(self) -> None:
        """Close the connection (its state is unknown) and free its slot."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._connection.close()
            pool._slots.release()

    async def aclose(self) -> None:
        self._release()


class _DecodedResponse(Response):
    """A response whose body came gzip or deflate coded: iterated decoded, in steps no larger
    than ``h1.DECODE_STEP_BYTES`` whatever the compression ratio."""

    __slots__ = ("_decoder", "_raw_done")

    def __init__(
        self, pool: ConnectionPool, connection: _Connection, head: h1.Head, encoding: str
    ) -> None:
        super().__init__(pool, connection, head)
        self._decoder = h1.BodyDecoder(encoding)
        self._raw_done = False

    async def __anext__(self) -> bytes:
        decoder = self._decoder
        try:
            while True:
                data = decoder.read()
                if data:
                    return data
                if self._raw_done:
                    raise StopAsyncIteration
                try:
                    decoder.feed(await super().__anext__())
                except StopAsyncIteration:
                    self._raw_done = True
                    decoder.finish()
        except h1.ProtocolError as exc:
            self._release()
            raise TransportError(f"the upstream's answer cannot be decoded: {exc}") from None


def _content_coding(head: h1.Head) -> str | None:
    """The answer's ``content-encoding`` if it is one the pool decodes, else None (identity,
    or a coding it does not know, whose body is left as it came)."""
    for name, value in head.headers:
        if name == b"content-encoding":
            coding = value.strip().lower().decode("latin-1")
            return coding if coding in h1.BodyDecoder.CODINGS else None
    return None


def _certificate_error(exc: BaseException) -> str | None:
    """The verifier's words if ``exc`` is (or wraps) a failed certificate check."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return cause.verify_message or str(cause)
    return None


def _describe(exc: BaseException) -> str:
    """What went wrong, for a message: the underlying socket or TLS error where trio wraps it."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):  # trio tried each address: say why the first failed
        return f"{exc} ({_describe(cause.exceptions[0])})"
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
