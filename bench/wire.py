"""A minimal HTTP/1.1 keep-alive client on trio sockets, for load generation.

Why not httpx2 here: at the concurrencies the benchmarks run, a full client costs the load
generator about as much CPU per request as the servers it measures (≈ 0.8 ms per request for
httpx2, stack-notes), and on a 2-core machine that CPU is taken from the servers. This client
sends a request prepared once as bytes and parses only what the benchmark needs (status,
``content-length`` or chunked framing, ``connection: close``), so the client's own cost per
request is a few tens of microseconds and the direct-to-upstream row measures the servers, not
the client. It is for loopback benchmarks against servers we start ourselves: no TLS, no
redirects, no proxies, no compression, one request at a time per connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

_RECV = 65536


class WireError(Exception):
    """The server closed the connection or sent something this client does not parse."""


def prepare(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of ``POST path`` with a JSON ``body`` to the server at ``url``."""
    host = urlsplit(url).netloc
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", "content-type: application/json"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True)
class Head:
    status: int
    content_length: int | None
    chunked: bool
    keep_alive: bool


class Connection:
    """One keep-alive connection; reconnects on the next request after the server closed it."""

    __slots__ = ("_buf", "_stream", "host", "port")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._stream: trio.SocketStream | None = None
        self._buf = bytearray()

    async def _connected(self) -> trio.SocketStream:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._buf.clear()
        return self._stream

    async def aclose(self) -> None:
        """Close the socket now (mid-response too: that is how a client disconnects)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    async def _fill(self) -> None:
        assert self._stream is not None
        data = await self._stream.receive_some(_RECV)
        if not data:
            await self.aclose()
            raise WireError("connection closed by the server")
        self._buf += data

    async def send(self, request: bytes) -> None:
        """Send a prepared request (opens the connection if needed)."""
        stream = await self._connected()
        await stream.send_all(request)

    async def head(self) -> Head:
        """Read the status line and headers of the response."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            await self._fill()
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise WireError(f"bad status line {lines[0]!r}") from None
        length: int | None = None
        chunked = False
        keep_alive = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
        return Head(status, length, chunked, keep_alive)

    async def body(self, head: Head) -> bytes:
        """The whole body of a response whose head was read."""
        parts = [piece async for piece in self.iter_body(head)]
        return b"".join(parts)

    async def iter_body(self, head: Head) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked framing removed)."""
        if head.chunked:
            async for piece in self._chunks():
                yield piece
        elif head.content_length is not None:
            remaining = head.content_length
            while remaining:
                if not self._buf:
                    await self._fill()
                piece = bytes(self._buf[:remaining])
                del self._buf[: len(piece)]
                remaining -= len(piece)
                yield piece
        else:  # the body ends when the server closes
            while True:
                if self._buf:
                    yield bytes(self._buf)
                    self._buf.clear()
                try:
                    await self._fill()
                except WireError:
                    return
        if not head.keep_alive:
            await self.aclose()

    async def _chunks(self) -> AsyncIterator[bytes]:
        buf = self._buf
        while True:
            line_end = await self._line_end()
            size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
            del buf[: line_end + 2]
            if size == 0:
                while (line_end := await self._line_end()) > 0:  # trailers (none expected)
                    del buf[: line_end + 2]
                del buf[:2]
                return
            pieces = []
            remaining = size
            while remaining:
                if not buf:
                    if pieces:  # hand over what arrived so far: the caller times events
                        yield b"".join(pieces)
                        pieces = []
                    await self._fill()
                piece = bytes(buf[:remaining])
                del buf[: len(piece)]
                remaining -= len(piece)
                pieces.append(piece)
            while len(buf) < 2:
                await self._fill()
            del buf[:2]
            yield b"".join(pieces)

    async def _line_end(self) -> int:
        while (end := self._buf.find(b"\r\n")) < 0:
            await self._fill()
        return end
