"""The shared guards' hot path to Redis: one plain RESP2 connection on a trio socket, for the
scripts every request calls (acquire, settle). Everything else goes through coredis.

Why: a coredis call costs about 200 µs of CPU on loopback (its writer and reader tasks, pool
checkout, retry policy, telemetry span), this one about 60 µs, and every request makes one
(measured: ``bench/README.md``, "bench scaleout"). It speaks only what those calls need:
``EVALSHA`` (``EVAL`` once when Redis does not know the script), ``AUTH`` and ``SELECT`` from the
URL; replies are integers, bulk strings, arrays and errors.

Guarantees:

* One call at a time on the connection (a lock, in arrival order); a call that fails or is
  cancelled half-way closes the connection (its replies could no longer be matched), and the
  next call opens a new one. The caller bounds every call with its timeout.
* Only ``redis://`` URLs over TCP (:func:`supported`); any other (TLS, a unix socket) keeps
  coredis for these calls too.
"""

from __future__ import annotations

import hashlib
from urllib.parse import unquote, urlsplit

import trio


class RespError(Exception):
    """Redis answered with an error."""


def supported(url: str) -> bool:
    """Whether this client can reach the Redis at ``url`` (plain TCP)."""
    parts = urlsplit(url)
    return parts.scheme == "redis" and bool(parts.hostname) and not parts.query


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class RespConnection:
    """A lazily opened connection to the Redis at ``url`` (see the module docstring)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self.db = int(path) if path else 0
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()
        self._lock = trio.Lock()
        self._scripts: dict[str, bytes] = {}  # sha → source

    def script(self, source: str) -> str:
        """Know ``source`` by its SHA1 (what :meth:`evalsha` takes)."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._scripts[sha] = source.encode()
        return sha

    async def evalsha(self, sha: str, args: list[str]) -> object:
        """Run a known script with no keys and ``args``; its reply."""
        encoded = [arg.encode() for arg in args]
        async with self._lock:
            try:
                if self._stream is None:
                    await self._open()
                reply = await self._round_trip(
                    _command(b"EVALSHA", sha.encode(), b"0", *encoded)
                )
                if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT"):
                    reply = await self._round_trip(
                        _command(b"EVAL", self._scripts[sha], b"0", *encoded)
                    )
            except BaseException:
                await self.aclose()
                raise
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        self._buffer.clear()
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _open(self) -> None:
        self._stream = await trio.open_tcp_stream(self.host, self.port)
        if self.password is not None:
            auth = [b"AUTH"] + ([self.username.encode()] if self.username else [])
            reply = await self._round_trip(_command(*auth, self.password.encode()))
            if isinstance(reply, RespError):
                raise reply
        if self.db:
            reply = await self._round_trip(_command(b"SELECT", str(self.db).encode()))
            if isinstance(reply, RespError):
                raise reply

    async def _round_trip(self, request: bytes) -> object:
        assert self._stream is not None
        await self._stream.send_all(request)
        return await self._reply()

    async def _line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            await self._fill()

    async def _fill(self) -> None:
        assert self._stream is not None
        data = await self._stream.receive_some(65536)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self._buffer += data

    async def _reply(self) -> object:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode())
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buffer) < size + 2:
                await self._fill()
            value = bytes(self._buffer[:size]).decode()
            del self._buffer[: size + 2]
            return value
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [await self._reply() for _ in range(count)]
        raise ConnectionError(f"unexpected reply from Redis: {line[:40]!r}")
