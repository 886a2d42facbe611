"""Reaching an upstream through a company's proxy, and which proxy and CA an account uses.

A :class:`Route` is how the pool (:mod:`.http11`) reaches an origin: directly or through a
:class:`Proxy`, trusting the system's CAs or also a private CA's (``ca_file``). The pool keeps
connections of different routes apart, so a connection made through one proxy (or trusting one
CA) never carries another route's request.

Tunnels: ``http://`` proxies get ``CONNECT host:port`` (RFC 9110 §9.3.6), with
``Proxy-Authorization: Basic`` when the URL has credentials, for ``https`` and plain ``http``
upstreams alike (a tunnel keeps the pool's one way of talking HTTP/1.1; plain forwarding would
need absolute-form targets and per-request proxy headers). ``socks5://`` (and ``socks5h://``)
proxies get the SOCKS5 handshake of RFC 1928/1929, written and parsed by ``socksio``; the
upstream's host name is passed to the proxy, which resolves it (what a company proxy in front of
a private DNS needs). TLS to the upstream then runs inside the tunnel.

Secrets: a proxy's user name and password appear only in the handshake. :attr:`Proxy.shown`,
every message of :class:`TunnelRefused` and the dataclasses' reprs leave them out.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment

import trio
from socksio import socks5
from socksio.exceptions import ProtocolError as SocksProtocolError

from ..config import AccountConfig, ServerConfig
from ..config_urls import check_proxy_url
from . import h1

log = logging.getLogger("relay.upstream")

#: A proxy's answer to CONNECT larger than this is refused.
MAX_CONNECT_REPLY_BYTES = 16384


@dataclass(frozen=True, slots=True)
class Proxy:
    """A proxy to tunnel through: ``http`` (CONNECT) or ``socks5``."""

    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        """The proxy of a URL :func:`.config_urls.check_proxy_url` accepts (else ValueError)."""
        problem = check_proxy_url(url)
        if problem is not None:
            raise ValueError(f"the proxy URL {problem}")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(
            "socks5" if scheme == "socks5h" else scheme,
            parts.hostname or "",
            parts.port or 0,
            username,
            "" if username is not None and password is None else password,
        )

    @property
    def shown(self) -> str:
        """The proxy for a log line: scheme, host and port, never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    """How to reach an origin: through ``proxy`` (None: directly), trusting ``ca_file``'s CAs
    besides the system's (None: the system's only)."""

    proxy: Proxy | None = None
    ca_file: str | None = None


DIRECT = Route()


class TunnelRefused(Exception):
    """The proxy refused the tunnel or broke off the handshake. ``reason`` is fit for a client
    (no proxy address, no credentials, none of the proxy's own words)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def route_for(
    account: AccountConfig, server: ServerConfig, environ: Mapping[str, str] = os.environ
) -> Route:
    """The route of ``account``: its own ``proxy`` and ``ca_file``, else ``[server]``'s, else
    (``server.trust_env``) the proxy the environment names for its ``base_url``."""
    url = account.proxy or server.proxy
    if url == "direct":
        url = None
    elif url is None and server.trust_env:
        url = environment_proxy(account.base_url, environ, account=account.name)
    return Route(Proxy.from_url(url) if url else None, account.ca_file or server.ca_file)


def environment_proxy(
    base_url: str, environ: Mapping[str, str], *, account: str = ""
) -> str | None:
    """The proxy URL the environment names for ``base_url``, as curl reads it: ``https_proxy``
    or ``HTTPS_PROXY`` for https, ``http_proxy`` or ``HTTP_PROXY`` for http, then ``ALL_PROXY``
    (lower case first); none when ``NO_PROXY`` lists the host. A URL without a scheme is an
    HTTP proxy; one the relay cannot use is logged (by variable name, not value) and skipped."""
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    no_proxy = environ.get("no_proxy", environ.get("NO_PROXY", ""))
    if no_proxy and proxy_bypass_environment(host, {"no": no_proxy}):
        return None
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        value = environ.get(name, "").strip()
        if not value:
            continue
        if "://" not in value:
            value = f"http://{value}"
        problem = check_proxy_url(value)
        if problem is None:
            return value
        log.warning(
            "account %s: the proxy in %s is not used: it %s", account or base_url, name, problem
        )
        return None
    return None


async def open_tunnel(stream: trio.abc.Stream, proxy: Proxy, host: str, port: int) -> None:
    """Ask ``proxy`` (``stream`` is connected to it) for a tunnel to ``host:port``; on return
    the stream carries the upstream's bytes. Raises :class:`TunnelRefused`, or the stream's
    own errors if the connection breaks."""
    if proxy.scheme == "http":
        await _http_connect(stream, proxy, host, port)
    else:
        await _socks5_connect(stream, proxy, host, port)


async def _http_connect(stream: trio.abc.Stream, proxy: Proxy, host: str, port: int) -> None:
    authority = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("idna")
    headers = [(b"host", authority)]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode())
        headers.append((b"proxy-authorization", b"Basic " + token))
    await stream.send_all(h1.request_head(b"CONNECT", authority, headers))
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = await stream.receive_some(4096)
        if not data:
            raise TunnelRefused(
                f"proxy {proxy.shown} closed the connection before answering CONNECT",
                "the proxy closed the connection before answering",
            )
        reply += data
        if len(reply) > MAX_CONNECT_REPLY_BYTES:
            raise TunnelRefused(
                f"proxy {proxy.shown} sent an oversized answer to CONNECT",
                "the proxy's answer is invalid",
            )
    head, _, rest = reply.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, status_reason = status_line.partition(" ")
    status, _, phrase = status_reason.partition(" ")
    if not version.startswith("HTTP/1.") or not (status.isdigit() and len(status) == 3):
        raise TunnelRefused(
            f"proxy {proxy.shown} answered CONNECT with no HTTP status ({status_line[:80]!r})",
            "the proxy's answer is not HTTP",
        )
    code = int(status)
    if not 200 <= code < 300:
        if code == 407:
            reason = (
                "the proxy refused the relay's proxy credentials (407)"
                if proxy.username is not None
                else "the proxy wants credentials the relay has none of (407)"
            )
        else:
            reason = f"the proxy refused the tunnel ({code})"
        raise TunnelRefused(
            f"proxy {proxy.shown} answered CONNECT {host}:{port} with {code} {phrase[:80]}", reason
        )
    if rest:  # the upstream speaks after the relay (TLS, HTTP): nothing may come yet
        raise TunnelRefused(
            f"proxy {proxy.shown} sent bytes after its CONNECT answer",
            "the proxy's answer is invalid",
        )


async def _socks5_connect(stream: trio.abc.Stream, proxy: Proxy, host: str, port: int) -> None:
    connection = socks5.SOCKS5Connection()
    methods = [socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED]
    if proxy.username is not None:
        methods = [socks5.SOCKS5AuthMethod.USERNAME_PASSWORD]
    reader = _Reader(stream, proxy)
    try:
        connection.send(socks5.SOCKS5AuthMethodsRequest(methods))
        await stream.send_all(connection.data_to_send())
        auth = connection.receive_data(await reader.exactly(2))
        if auth.method not in methods:
            wanted = "credentials" if proxy.username is None else "another way of logging in"
            raise TunnelRefused(
                f"proxy {proxy.shown} accepts none of the offered SOCKS5 methods",
                f"the SOCKS5 proxy wants {wanted} the relay does not offer",
            )
        if auth.method == socks5.SOCKS5AuthMethod.USERNAME_PASSWORD:
            connection.send(
                socks5.SOCKS5UsernamePasswordRequest(
                    (proxy.username or "").encode(), (proxy.password or "").encode()
                )
            )
            await stream.send_all(connection.data_to_send())
            if not connection.receive_data(await reader.exactly(2)).success:
                raise TunnelRefused(
                    f"proxy {proxy.shown} refused the relay's SOCKS5 credentials",
                    "the SOCKS5 proxy refused the relay's proxy credentials",
                )
        connection.send(
            socks5.SOCKS5CommandRequest.from_address(socks5.SOCKS5Command.CONNECT, (host, port))
        )
        await stream.send_all(connection.data_to_send())
        # VER REP RSV ATYP, then the bound address (4 or 16 bytes, or a length and a name)
        # and its port: read exactly that, so no upstream byte is taken for the reply.
        start = await reader.exactly(5)
        atyp = start[3]
        rest = {1: 3 + 2, 4: 15 + 2, 3: start[4] + 2}.get(atyp)
        if rest is None:
            raise SocksProtocolError(f"unknown address type {atyp}")
        reply = connection.receive_data(start + await reader.exactly(rest))
    except SocksProtocolError as exc:
        raise TunnelRefused(
            f"proxy {proxy.shown} does not speak SOCKS5 as expected: {exc}",
            "the proxy does not speak SOCKS5",
        ) from None
    if reply.reply_code != socks5.SOCKS5ReplyCode.SUCCEEDED:
        what = reply.reply_code.name.lower().replace("_", " ")
        raise TunnelRefused(
            f"proxy {proxy.shown} refused SOCKS5 CONNECT {host}:{port}: {what}",
            f"the SOCKS5 proxy refused the tunnel ({what})",
        )


class _Reader:
    """Exact reads of a handshake's replies."""

    def __init__(self, stream: trio.abc.Stream, proxy: Proxy) -> None:
        self._stream = stream
        self._proxy = proxy
        self._buffer = b""

    async def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = await self._stream.receive_some(size - len(self._buffer))
            if not data:
                raise TunnelRefused(
                    f"proxy {self._proxy.shown} closed the connection during the SOCKS5 handshake",
                    "the SOCKS5 proxy closed the connection during the handshake",
                )
            self._buffer += data
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data
