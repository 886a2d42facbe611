"""A thin ASGI request/response layer: just what the relay's routes need, nothing hidden.

The relay speaks ASGI directly (on hypercorn's trio worker) instead of through a framework, so
that each request's handler is one task that owns its nursery, reads the client's disconnect
itself and writes to ``send`` directly — the structure DESIGN.md asks for — with no framework
timeouts that cut long streams and no framework task boundaries between taking a slot and
releasing it (stack-notes: quart-trio's 60 s truncation, connection-close bug and task hops).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import trio

from ..errors import (
    InvalidRequest,
    PayloadTooLarge,
    RelayError,
    RequestTimeout,
    UnsupportedMediaType,
)
from ..protocol.messages import anthropic_error

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = b"application/json"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ClientDisconnected(Exception):
    """The client went away; there is nobody left to answer."""


#: Fields the relay reads as one value (RFC 9110 §5.3: a sender must not repeat them), among
#: them every header that picks the key, the body's framing and type, and the sticky session.
#: Sent twice with different values they are ambiguous (which key? which session?) and the
#: request is refused, naming the field; the same value twice is taken once.
SINGLETON_HEADERS = frozenset(
    {
        "authorization", "x-api-key", "content-type", "content-length", "content-encoding",
        "host", "session-id", "session_id", "conversation_id", "thread-id", "thread_id",
    }
)
#: Closes the connection after the answer: what follows a refused request on it cannot be
#: trusted to start where the relay thinks it does (RFC 9112 §6.3, request smuggling).
CLOSE = {"connection": "close"}


class Request:
    """One HTTP request: its scope, headers (lower-case, str) and a bounded body reader.

    Headers are read once, when the request is made. A field sent more than once is combined
    as RFC 9110 §5.3 says, its values joined with ", " in the order received, except the
    :data:`SINGLETON_HEADERS`: for those differing values are a 400 naming the field, which
    closes the connection. (Content-Length with Transfer-Encoding is refused before, by
    ``relay.server.RelayH11Protocol``.) The common case (no field repeated) costs one dict
    build and a length check.
    """

    __slots__ = (
        "_body_timeout_s", "_receive", "headers", "key_id", "method", "params", "path",
        "query", "request_id", "scope", "usage",
    )

    def __init__(
        self, scope: Scope, receive: Receive, request_id: str, body_timeout_s: float = 30.0
    ) -> None:
        self.scope = scope
        self._receive = receive
        self._body_timeout_s = body_timeout_s
        self.request_id = request_id
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: bytes = scope.get("query_string", b"")
        raw = scope["headers"]
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}
        if len(headers) != len(raw):
            headers = _combine(raw)
        self.headers = headers
        self.params: dict[str, str] = {}  # the route's path parameters ({key_id}, …)
        #: For the access log: the id of the key the request authenticated with, and the
        #: usage record of a relay request (relay/logs.py).
        self.key_id = ""
        self.usage: Any = None

    def query_params(self) -> dict[str, str]:
        """The query string's parameters (the last one wins when a name repeats)."""
        return dict(urllib.parse.parse_qsl(self.query.decode("latin-1")))

    async def receive(self) -> Message:
        return await self._receive()

    def require_json(self) -> None:
        """415 unless the body is declared as JSON (or not declared at all)."""
        content_type = self.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType(
                f"Unsupported Content-Type '{content_type}': send the body as JSON with "
                "'Content-Type: application/json' (with curl: -H 'Content-Type: application/json')."
            )
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UnsupportedMediaType(
                f"Unsupported Content-Encoding '{encoding}': send the body uncompressed."
            )

    async def read_body(self, limit: int) -> bytes:
        """The whole body, or 413 as soon as it is known to exceed ``limit`` bytes.

        The body must arrive within ``body_timeout_s`` (from the first call): a client that
        trickles it or stops midway gets a 408 and the connection is closed, so it holds
        neither a connection nor a handler for longer than that.
        """
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks = []
        size = 0
        with trio.move_on_after(self._body_timeout_s):
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        raise RequestTimeout(
            f"The request body did not arrive within {self._body_timeout_s:g}s "
            f"({size} bytes came); send the whole body at once.",
            headers=CLOSE,
        )

    async def wait_disconnect(self) -> None:
        """Return once the client has gone (after the body was read)."""
        while (await self._receive())["type"] != "http.disconnect":
            pass


def _combine(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers of a request that repeats a field (see :class:`Request`)."""
    headers: dict[str, str] = {}
    for name_bytes, value_bytes in raw:
        name, value = name_bytes.decode("latin-1"), value_bytes.decode("latin-1")
        seen = headers.get(name)
        if seen is None:
            headers[name] = value
        elif name in SINGLETON_HEADERS:
            if seen != value:
                raise InvalidRequest(
                    f"The '{name}' header was sent more than once with different values; "
                    "send it once.",
                    code="duplicate_header",
                    param=name,
                    headers=CLOSE,
                )
        else:
            headers[name] = f"{seen}, {value}"
    return headers


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than this relay accepts ({limit // (1024 * 1024)} MiB)."
    )


class Responder:
    """Wraps ``send``: adds ``x-request-id``, remembers whether the response started, and sends
    the final body message shielded.

    For a ``HEAD`` request (``head``) the body is dropped and everything else is sent as for
    ``GET``, ``content-length`` included (RFC 9110 §9.3.2): the routes answer HEAD by running
    their GET handler, and need not know.

    The shield matters: hypercorn delivers ``http.disconnect`` while the last ``send`` is in
    progress, and a disconnect watcher that cancels the request at that moment would land the
    cancellation inside hypercorn's connection bookkeeping, leaving ``Connection: close`` and
    idle connections open for ever (stack-notes, "quart-trio gotchas").
    """

    __slots__ = (
        "_send", "anthropic", "finished", "head", "header_hook", "request_id", "started",
        "started_at", "status",
    )

    def __init__(self, send: Send, request_id: str, *, head: bool = False) -> None:
        self._send = send
        self.head = head
        self.request_id = request_id.encode()
        self.started = False
        self.started_at: float | None = None  # trio time the response head was sent
        self.finished = False
        self.status = 0
        # Headers computed when the response starts (the key's rate-limit state, for one).
        self.header_hook: Callable[[], list[tuple[bytes, bytes]]] | None = None
        #: Errors go out in Anthropic's shape (a Messages route, or an Anthropic client).
        self.anthropic = False

    async def start(self, status: int, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.started = True
        self.started_at = trio.current_time()
        self.status = status
        all_headers = [(b"x-request-id", self.request_id), *headers]
        if self.header_hook is not None:
            all_headers.extend(self.header_hook())
        await self._send(
            {"type": "http.response.start", "status": status, "headers": all_headers}
        )

    async def body(self, data: bytes) -> None:
        if not self.head:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        # Set first: the disconnect that follows a complete response is not a client abort.
        self.finished = True
        if self.head:
            data = b""
        with trio.CancelScope(shield=True):
            await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def json(
        self,
        status: int,
        payload: Any,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        await self.raw(status, json.dumps(payload).encode(), JSON_TYPE, headers)

    async def raw(
        self,
        status: int,
        body: bytes,
        content_type: bytes = JSON_TYPE,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        header_list = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        for name, value in (headers or {}).items():
            header_list.append((name.lower().encode(), str(value).encode()))
        await self.start(status, header_list)
        await self.end(body)

    async def error(self, error: RelayError) -> None:
        if self.anthropic:
            status, body = anthropic_error(error, self.request_id.decode())
            await self.raw(status, json.dumps(body).encode(), JSON_TYPE, error.headers)
            return
        await self.raw(error.status, error.to_json(), JSON_TYPE, error.headers)
