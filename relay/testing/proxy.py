"""Test-only forward proxies: an HTTP CONNECT proxy and a SOCKS5 proxy, on loopback.

For the tests of the relay's upstream proxies (``tests/test_upstream_proxy.py``), not for use in
front of anything real: each checks the credentials it was started with (Basic
``Proxy-Authorization``, RFC 7617; SOCKS5 user name and password, RFC 1929), opens the tunnel
and copies bytes both ways. Every connection, tunnel and refusal is one line on stderr, which
the tests read to prove the traffic went through the proxy::

    proxy: connection 1
    proxy: refused connection 1: bad credentials
    proxy: tunnel 1 to 127.0.0.1:8443

Run: ``python -m relay.testing.proxy --kind http|socks5 [--auth USER:PASSWORD] [--port N]``.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import signal
import struct
import sys

import trio


def _note(text: str) -> None:
    print(f"proxy: {text}", file=sys.stderr, flush=True)


class _Buffered:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def until(self, marker: bytes, limit: int = 16384) -> bytes:
        while marker not in self.buffer:
            if len(self.buffer) > limit:
                raise EOFError
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buffer += data
        data, _, self.buffer = self.buffer.partition(marker)
        return data


class ForwardProxy:
    """One proxy of ``kind`` ("http" or "socks5"); ``auth`` ("user:password") or None."""

    def __init__(self, kind: str, auth: str | None) -> None:
        self.kind = kind
        self.auth = auth
        self._ids = itertools.count(1)

    async def serve(self, host: str, port: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, client: trio.SocketStream) -> None:
        number = next(self._ids)
        _note(f"connection {number}")
        reader = _Buffered(client)
        try:
            if self.kind == "http":
                target = await self._http_handshake(reader, number)
            else:
                target = await self._socks5_handshake(reader, number)
            if target is None:
                return
            host, port, upstream = target
            _note(f"tunnel {number} to {host}:{port}")
            try:
                if reader.buffer:
                    await upstream.send_all(reader.buffer)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_copy, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(_copy, upstream, client, nursery.cancel_scope)
            finally:
                upstream.socket.close()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            client.socket.close()

    async def _http_handshake(self, reader: _Buffered, number: int):
        head = (await reader.until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, _, rest = head[0].partition(" ")
        authority = rest.rpartition(" ")[0]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if self.auth is not None:
            expected = "Basic " + base64.b64encode(self.auth.encode()).decode()
            if headers.get("proxy-authorization") != expected:
                why = "bad credentials" if "proxy-authorization" in headers else "no credentials"
                _note(f"refused connection {number}: {why}")
                await reader.stream.send_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\ncontent-length: 0\r\n\r\n'
                )
                return None
        if method != "CONNECT":
            _note(f"refused connection {number}: {method} is not CONNECT")
            await reader.stream.send_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return None
        host, _, port = authority.rpartition(":")
        host = host.strip("[]")
        try:
            upstream = await trio.open_tcp_stream(host, int(port))
        except OSError:
            _note(f"refused connection {number}: {authority} unreachable")
            await reader.stream.send_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return None
        await reader.stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return host, int(port), upstream

    async def _socks5_handshake(self, reader: _Buffered, number: int):
        stream = reader.stream
        version, count = await reader.exactly(2)
        methods = await reader.exactly(count)
        if version != 5:
            return None
        wanted = 2 if self.auth is not None else 0
        if wanted not in methods:
            _note(f"refused connection {number}: no credentials")
            await stream.send_all(b"\x05\xff")
            return None
        await stream.send_all(bytes([5, wanted]))
        if self.auth is not None:
            _, user_length = await reader.exactly(2)
            user = await reader.exactly(user_length)
            (password_length,) = await reader.exactly(1)
            password = await reader.exactly(password_length)
            if f"{user.decode()}:{password.decode()}" != self.auth:
                _note(f"refused connection {number}: bad credentials")
                await stream.send_all(b"\x01\x01")
                return None
            await stream.send_all(b"\x01\x00")
        _, command, _, atyp = await reader.exactly(4)
        if atyp == 1:
            host = ".".join(str(b) for b in await reader.exactly(4))
        elif atyp == 3:
            (length,) = await reader.exactly(1)
            host = (await reader.exactly(length)).decode()
        else:
            raw = await reader.exactly(16)
            host = ":".join(raw[i : i + 2].hex() for i in range(0, 16, 2))
        (port,) = struct.unpack("!H", await reader.exactly(2))
        if command != 1:
            await stream.send_all(b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00")
            return None
        try:
            upstream = await trio.open_tcp_stream(host, port)
        except OSError:
            _note(f"refused connection {number}: {host}:{port} unreachable")
            await stream.send_all(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
            return None
        await stream.send_all(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00")
        return host, port, upstream


async def _copy(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope):
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    scope.cancel()


async def _run(proxy: ForwardProxy, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            actual = await nursery.start(proxy.serve, host, port)
            print(f"{proxy.kind} proxy listening on {host}:{actual}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relay.testing.proxy", description=__doc__)
    parser.add_argument("--kind", choices=("http", "socks5"), required=True)
    parser.add_argument("--auth", default=None, help="USER:PASSWORD the proxy requires")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        trio.run(_run, ForwardProxy(args.kind, args.auth), args.host, args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
