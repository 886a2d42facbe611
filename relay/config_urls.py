"""Addresses in the configuration: ``listen``, an account's ``base_url`` and a proxy URL.

Pure string checks (no I/O, no DNS): each answers what is wrong, phrased to follow the TOML key
path (``accounts[0].base_url: must ...``), or accepts the value. What they accept, the upstream
client and the server can always use (``relay check-config`` promises no 500 from a bad URL).
A proxy URL may carry a password, so no message repeats it.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

__all__ = ["PROXY_SCHEMES", "base_url_problem", "check_proxy_url", "split_listen"]

_PORT_RE = re.compile(r"[0-9]{1,5}")


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6-host]:port``) or raise ValueError saying what is wrong."""
    if listen.startswith("["):
        end = listen.find("]")
        if end == -1:
            raise ValueError(
                f"must be 'host:port'; the '[' of an IPv6 host is not closed: {listen!r}"
            )
        host, rest = listen[1:end], listen[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"must be 'host:port', e.g. '[::1]:8080', got {listen!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = listen.rpartition(":")
        if not sep:
            raise ValueError(f"must be 'host:port', e.g. '127.0.0.1:8080', got {listen!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 host must be in brackets, e.g. '[::1]:8080', got {listen!r}")
    if not host:
        raise ValueError(f"must be 'host:port' with a non-empty host, got {listen!r}")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"must be 'host:port' with a port in 0..65535, got {listen!r}")
    return host, int(port_text)


_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_RE = re.compile(rf"(?:{_HOST_LABEL}\.)*{_HOST_LABEL}\.?")
_URL_PATH_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")


def base_url_problem(url: str) -> str | None:
    """What makes ``url`` unusable as an account's ``base_url``, or ``None`` if it is usable.

    Usable means what the upstream client can always send a request to: ``http`` or ``https``,
    a host (a DNS name, an IPv4 address or a bracketed IPv6 address), an optional port in
    1..65535, a path of URL characters, and no query, fragment or user info, because the relay
    appends the endpoint's path (``/chat/completions``) to it and reads the key from
    ``api_key_env``. Every problem is phrased to follow the key path ("must ...").
    """
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
        return "must not contain spaces or control characters"
    if not url.isascii():
        return (
            "must be ASCII: write an international host name in its xn-- form and "
            "percent-encode the path"
        )
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if "?" in rest or "#" in rest:
        return (
            "must have no query (?...) or fragment (#...): the relay appends the endpoint's "
            "path to it"
        )
    netloc, _, path = rest.partition("/")
    path = "/" + path if _ else ""
    if "@" in netloc:
        return (
            "must not carry credentials (user:password@): put the key in an environment "
            "variable and name it with api_key_env"
        )
    if netloc.startswith("["):
        host, bracket, port_part = netloc[1:].partition("]")
        if not bracket:
            return "must close the '[' of its IPv6 host"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"must have an IPv6 address in brackets, not {host!r}"
        if port_part and not port_part.startswith(":"):
            return "must have ':PORT' or '/' after the ']' of its IPv6 host"
        port_sep, port_text = port_part[:1], port_part[1:]
    else:
        host, port_sep, port_text = netloc.partition(":")
        if not host:
            return "must name a host (http(s)://HOST/...)"
        if not _HOST_RE.fullmatch(host):
            return f"must name a valid host name or IP address, not {host!r}"
    if port_sep:
        if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            return f"must have a port in 1..65535, not {port_text!r}"
    if not _URL_PATH_RE.fullmatch(path):
        return "must have a path of URL characters only (percent-encode the others, %XX)"
    return None


#: Proxy URL schemes: HTTP CONNECT, and SOCKS5 (the proxy resolves the name, either spelling).
PROXY_SCHEMES = ("http", "socks5", "socks5h")


def check_proxy_url(url: str) -> str | None:
    """What is wrong with a proxy URL, or None: ``SCHEME://[user:pass@]host:port`` with a
    scheme of :data:`PROXY_SCHEMES`, a host, a port in 1..65535 and nothing after it. The
    message never repeats the URL: it may carry a password."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in PROXY_SCHEMES:
        return f"must start with {', '.join(s + '://' for s in PROXY_SCHEMES)}"
    try:
        port = parts.port
    except ValueError:
        return "has a port that is not a number in 1..65535"
    if not parts.hostname:
        return "has no host"
    if port is None or port == 0:
        return "must name the proxy's port (host:port)"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be only scheme://[user:password@]host:port"
    return None
