"""Simulated LLM upstream: a real HTTP/1.1 server for tests, benchmarks and ``relay demo``.

It speaks OpenAI Chat Completions and Responses (stream and non-stream) closely enough for the
official SDKs and the Codex CLI, and also Anthropic Messages and Gemini ``generateContent`` (see
:mod:`relay.testing.sim_anthropic` and :mod:`relay.testing.sim_gemini`), and lets a test steer each
request through ``#sim key=value`` directives in the prompt (timing, token counts, tool calls,
faults; see :mod:`relay.testing.sim_protocol`).

Routes (every one also without the ``/v1`` prefix):

- ``POST /v1/chat/completions``, ``POST /v1/responses``, ``GET /v1/models[/{id}]``: OpenAI, auth
  ``Authorization: Bearer``; ``POST /v1/responses/compact`` and a ``compaction_trigger`` at the
  end of a Responses input compact (:mod:`relay.testing.sim_compaction`);
- ``POST /v1/messages[?beta=true]``: Anthropic, auth ``x-api-key`` or ``Authorization: Bearer``,
  header ``anthropic-version`` required, streams when the body has ``"stream": true``;
  ``POST /v1/messages/count_tokens``
  answers ``{"input_tokens": N}``, and ``GET /v1/models[/{id}]`` with ``anthropic-version`` answers
  in Anthropic's shape (the same auth);
- ``POST /v1beta/models/{model}:generateContent`` and ``…:streamGenerateContent[?alt=sse]`` (also
  under ``/v1/``): Gemini, auth ``x-goog-api-key`` or ``?key=``;
- ``POST /backend-api/codex/responses`` and ``POST /oauth/token``: the ChatGPT backend and
  OpenAI's token endpoint, with their own OAuth tokens (:mod:`relay.testing.sim_chatgpt`;
  steered by ``/_sim/chatgpt/login`` and ``/_sim/chatgpt``).

The key rule is the same everywhere: ``profile.api_key`` if set, else any non-empty key. Errors
come in each protocol's own shape.

Why it is written directly on trio + h11 (one task per connection, no framework): benchmarks use it
as the "direct" floor the relay is compared against, so its own overhead must be negligible, and
the tests about disconnects need to know *exactly* when a client went away. While a response is in
progress a watcher task keeps reading the socket, so a client's EOF/RST is noticed within about a
millisecond and recorded on the :class:`RequestRecord` (``client_closed``, ``closed_at``).

Run standalone with ``python -m relay.testing.upstream --port 8090``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http
import json
import signal
import socket
import ssl
import struct
import sys
import time
import traceback
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import h11
import trio

from relay.testing import sim_anthropic as sa
from relay.testing import sim_chatgpt, sim_wire
from relay.testing import sim_compaction as sc
from relay.testing import sim_gemini as sg
from relay.testing import sim_protocol as sp

__all__ = ["RequestRecord", "SimProfile", "SimUpstream", "main"]

MAX_RECORDS = 10_000
_RECV_SIZE = 65536
_STALL_EVENTS = 3
_BATCH_BYTES = 65536
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)
#: The ChatGPT backend's route (under its /backend-api/codex base) and OpenAI's token endpoint.
CHATGPT_RESPONSES = "/backend-api/codex/responses"
CHATGPT_TOKEN = "/oauth/token"


@dataclass
class SimProfile:
    """Defaults used when a request gives no directive. Mutable: tests may change it any time."""

    ttft_s: float = 0.05
    token_delay_s: float = 0.01
    output_tokens: int = 20
    reasoning_tokens: int = 0
    capacity_tps: float | None = None
    api_key: str | None = None
    fault: str | None = None  # a fault for every request without its own (e.g. "429")


# Accepted JSON types of each profile field for POST /_sim/profile, and whether null is allowed.
_PROFILE_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "ttft_s": ((int, float), False),
    "token_delay_s": ((int, float), False),
    "output_tokens": ((int,), False),
    "reasoning_tokens": ((int,), False),
    "capacity_tps": ((int, float), True),
    "api_key": ((str,), True),
    "fault": ((str,), True),
}


@dataclass
class RequestRecord:
    """What the upstream saw and did for one API request (``/_sim/*`` calls are not recorded).

    ``path`` is the request target as sent (with its query string, also in ``query``);
    ``headers`` has every header, names lower-cased, values as sent (credentials included: a test
    asserts what reached the upstream). ``usage`` is protocol-neutral (``input_tokens``,
    ``cached_tokens``, ``cache_write_tokens``, ``output_tokens``, ``reasoning_tokens``,
    ``total_tokens``) and is set only once the complete response, and with it the usage, has been
    written.
    """

    id: int
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None
    received_at: float
    query: str = ""
    status: int | None = None
    events_sent: int = 0
    finished: bool = False
    client_closed: bool = False
    closed_at: float | None = None
    usage: dict | None = None


class _ClientGone(Exception):
    """The client closed the connection (noticed by the watcher or by a failed send)."""


class _Pacer:
    """One shared pacing bucket: every token of every stream takes the next 1/capacity slot.

    Reservations are made in arrival order, so N concurrent streams interleave and each gets
    about capacity/N tokens/s. Idle time is not banked (no bursts after a quiet period).
    """

    def __init__(self) -> None:
        self._next = 0.0

    def reserve(self, rate: float | None, tokens: int = 1) -> float:
        """Book *tokens* slots; returns the trio time at which they may be emitted."""
        now = trio.current_time()
        if not rate or rate <= 0 or tokens <= 0:
            return now
        self._next = max(now, self._next) + tokens / rate
        return self._next


def _head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """Status line and headers. Written by hand: h11's send path cost more than the rest of a
    request, and the output here is fixed and simple (h11 still parses every request)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class _Request(NamedTuple):
    """The parts of a request head the server uses (h11's ``Request`` has the same attributes)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: bytes


_NEED_MORE = object()
_MAX_HEAD = 65536
_UNSIMPLE_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


def _parse_simple(buf: bytearray) -> tuple[_Request, bytes, int] | object | None:
    """Parse one complete, plain HTTP/1.1 request from the start of *buf*.

    Returns ``(request, body, bytes_consumed)``, ``_NEED_MORE`` when the request is plain but
    not all here yet, or None when h11 should handle it. Why not h11 for everything: parsing was
    the largest cost of a request (~100 µs of ~250 µs on a small VM), and the benchmarks use this
    server as the floor. Only the common, unambiguous shape is handled here; any doubt goes to
    h11, which also produces the proper error responses.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > _MAX_HEAD or b"\n\n" in buf:
            return None
        return _NEED_MORE
    lines = bytes(buf[:end]).split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
        return None
    if not parts[0].isalpha() or not parts[0].isupper():
        return None
    headers = []
    length = -1
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or b" " in name or b"\t" in name or b"\n" in line:
            return None
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or length >= 0:
                return None
            length = int(value)
        elif name in _UNSIMPLE_HEADERS:
            return None
        headers.append((name, value))
    start = end + 4
    stop = start + max(length, 0)
    if len(buf) < stop:
        return _NEED_MORE
    request = _Request(parts[0], parts[1], headers, b"1.1")
    return request, bytes(buf[start:stop]), stop


class _Exchange:
    """One request/response on a connection: owns the sends and the disconnect bookkeeping."""

    __slots__ = (
        "chatgpt", "chunked", "closed", "keep_alive", "pending", "rec", "reused", "stream",
    )

    def __init__(
        self, stream: trio.SocketStream, *, keep_alive: bool, chunked: bool, reused: bool = False
    ) -> None:
        self.stream = stream
        self.reused = reused  # the connection carried an answer before this one
        self.rec: RequestRecord | None = None
        self.keep_alive = keep_alive  # False: close after this response (Connection: close)
        self.chunked = chunked  # HTTP/1.1 streams are chunked; HTTP/1.0 ones end at close
        self.pending = bytearray()  # bytes of a pipelined next request read by the watcher
        self.closed = False
        self.chatgpt = False  # answered as the ChatGPT backend (relay.testing.sim_chatgpt)

    def mark_closed(self) -> None:
        """Record that the client went away; only counts as a client close if we were not done."""
        if self.closed:
            return
        self.closed = True
        rec = self.rec
        if rec is not None and not rec.finished:
            rec.client_closed = True
            rec.closed_at = time.monotonic()

    async def _send(self, data: bytes) -> None:
        if self.closed:
            raise _ClientGone
        try:
            await self.stream.send_all(data)
        except _GONE:
            self.mark_closed()
            raise _ClientGone from None

    def _connection_header(self) -> list[tuple[str, str]]:
        return [] if self.keep_alive else [("connection", "close")]

    async def send_full(
        self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Send a complete response with one write (status line, headers and body together)."""
        headers = list(headers)
        typed = any(name == "content-type" for name, _ in headers)
        head = _head(
            status,
            [
                *([] if typed else [("content-type", "application/json")]),
                ("content-length", str(len(body))),
                *headers,
                *self._connection_header(),
            ],
        )
        if self.rec is not None:
            self.rec.status = status
        await self._send(head + body)
        if self.rec is not None:
            self.rec.finished = True

    async def start_stream(
        self,
        headers: Iterable[tuple[str, str]],
        content_type: str = "text/event-stream; charset=utf-8",
    ) -> None:
        framing = [("transfer-encoding", "chunked")] if self.chunked else []
        head = _head(
            200,
            [
                ("content-type", content_type),
                ("cache-control", "no-cache"),
                ("x-accel-buffering", "no"),
                *framing,
                *headers,
                *self._connection_header(),
            ],
        )
        if self.rec is not None:
            self.rec.status = 200
        await self._send(head)

    def frame(self, event: bytes) -> bytes:
        """One SSE event as written on the wire (its own chunk when chunked)."""
        return b"%x\r\n%b\r\n" % (len(event), event) if self.chunked else event

    async def send_events(self, frames: list[bytes], count: int) -> None:
        """Write framed events (and possibly the terminator) in one write; count the events."""
        await self._send(b"".join(frames))
        if self.rec is not None:
            self.rec.events_sent += count

    def terminator(self) -> bytes:
        return b"0\r\n\r\n" if self.chunked else b""

    def abort(self, *, reset: bool) -> None:
        """Close the socket now, mid-message: FIN for ``drop``, RST for ``reset``.

        ``closed`` is set first so the watcher, woken by the close, does not take our own close
        for the client's.
        """
        self.closed = True
        sock = self.stream.socket
        if reset:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        sock.close()

    async def watch(self, cancel_scope: trio.CancelScope) -> None:
        """Read the socket while we respond: EOF or an error means the client left."""
        try:
            while True:
                data = await self.stream.receive_some(_RECV_SIZE)
                if not data:
                    break
                self.pending += data
        except _GONE:
            pass
        self.mark_closed()
        cancel_scope.cancel()


class SimUpstream:
    """The simulated upstream server. ``await nursery.start(sim.serve)`` returns the bound port."""

    def __init__(self, profile: SimProfile | None = None) -> None:
        self.profile: SimProfile = profile if profile is not None else SimProfile()
        self.requests: list[RequestRecord] = []
        self.active_streams: int = 0
        self.peak_active_streams: int = 0  # since the last reset: what concurrency caps bound
        self.total_requests: int = 0
        self._next_id = 1
        self._pacer = _Pacer()
        self._models_seen: dict[str, None] = {}
        self.chatgpt = sim_chatgpt.ChatGPTBackend()

    def reset(self) -> None:
        """Forget recorded requests (the profile and the models seen are kept; the ChatGPT
        backend's logins are kept too)."""
        self.requests.clear()
        self.total_requests = 0
        self.peak_active_streams = self.active_streams

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, report the actual port through ``task_status.started``, serve until cancelled
        (HTTPS with ``ssl_context``, as a real API is reached)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        actual_port = listeners[0].socket.getsockname()[1]
        if ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, ssl_context, https_compatible=True)
                for listener in listeners
            ]
        async with trio.open_nursery() as nursery:
            task_status.started(actual_port)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    # ---------------------------------------------------------------------------------------
    # Connection loop

    async def _connection(self, stream: trio.SocketStream) -> None:
        """Serve keep-alive requests on one connection until either side closes it.

        Plain, complete requests are parsed by :func:`_parse_simple`; anything else (chunked
        bodies, ``Expect``, HTTP/1.0, malformed input) goes through h11 with the same bytes.
        """
        buf = bytearray()
        eof = False
        served = 0
        try:
            while True:
                parsed = _parse_simple(buf)
                if parsed is _NEED_MORE and not eof:
                    data = await stream.receive_some(_RECV_SIZE)
                    if not data:
                        if not buf:
                            return  # clean close between requests
                        eof = True
                    buf += data
                    continue
                if isinstance(parsed, tuple):
                    request, raw_body, consumed = parsed
                    del buf[:consumed]
                else:
                    conn = h11.Connection(h11.SERVER)
                    conn.receive_data(bytes(buf))
                    if eof:
                        conn.receive_data(b"")
                    buf.clear()
                    try:
                        h11_request = await self._read_request(stream, conn)
                    except h11.RemoteProtocolError as exc:
                        await self._bad_request(stream, exc)
                        return
                    if h11_request is None:
                        return
                    request, raw_body = h11_request
                    leftover, eof = conn.trailing_data
                    buf += leftover
                ex = _Exchange(
                    stream,
                    keep_alive=_keep_alive(request),
                    chunked=request.http_version == b"1.1",
                    reused=served > 0,
                )
                served += 1
                keep = await self._dispatch(ex, request, raw_body)
                if not (keep and ex.keep_alive) or ex.closed:
                    return
                buf += ex.pending
        except (_ClientGone, *_GONE):
            pass  # the client went away: nothing to report
        except Exception:
            # A bug in the simulator, not a client problem: say so once, keep serving others.
            sys.stderr.write("sim-upstream: internal error\n" + traceback.format_exc())
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _bad_request(stream: trio.SocketStream, exc: h11.RemoteProtocolError) -> None:
        ex = _Exchange(stream, keep_alive=False, chunked=False)
        body = sp.error_body(f"Malformed HTTP request: {exc}", "invalid_request_error")
        with contextlib.suppress(_ClientGone):
            await ex.send_full(exc.error_status_hint, body)

    @staticmethod
    async def _read_request(
        stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                conn.receive_data(await stream.receive_some(_RECV_SIZE))
            elif type(event) is h11.Request:
                request = event
            elif type(event) is h11.Data:
                chunks.append(event.data)
            elif type(event) is h11.EndOfMessage:
                assert request is not None
                return request, b"".join(chunks)
            else:  # ConnectionClosed (or PAUSED, which cannot happen before EndOfMessage)
                return None

    # ---------------------------------------------------------------------------------------
    # Routing

    async def _dispatch(self, ex: _Exchange, request: _Request, raw_body: bytes) -> bool:
        """Handle one request; returns False when the connection must be closed afterwards."""
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        if path.startswith("/v1/"):
            route = path[3:]
        elif path.startswith("/v1beta/"):
            route = path[7:]
        else:
            route = path
        if len(route) > 1:
            route = route.rstrip("/")

        if route.startswith("/_sim/"):
            await self._control(ex, method, route, raw_body)
            return True
        chatgpt_route = route in (CHATGPT_RESPONSES, CHATGPT_TOKEN)

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        rec = RequestRecord(
            id=self._next_id,
            method=method,
            path=target,
            headers=headers,
            body=None,
            received_at=time.monotonic(),
            query=query,
        )
        self._next_id += 1
        self.total_requests += 1
        requests = self.requests
        requests.append(rec)
        if len(requests) > MAX_RECORDS:
            del requests[0]
        ex.rec = rec
        req_headers = [("x-request-id", f"req_sim{rec.id}")]

        if chatgpt_route:
            return await self._chatgpt(ex, method, route, headers, raw_body, req_headers)
        gemini = _gemini_route(route)
        if route == "/chat/completions":
            kind = "chat"
        elif route in ("/responses", "/responses/compact"):
            kind = "responses"
        elif route in ("/messages", "/messages/count_tokens"):
            kind = "anthropic"
            req_headers.append(("request-id", f"req_sim{rec.id}"))
        elif gemini is not None:
            kind = "gemini"
        elif route == "/models" or route.startswith("/models/"):
            # Anthropic's SDKs list models with their version header and x-api-key.
            kind = "anthropic_models" if headers.get("anthropic-version") else "models"
        else:
            await ex.send_full(404, _not_found(method, path), req_headers)
            return True
        allowed = "GET" if kind in ("models", "anthropic_models") else "POST"
        if method != allowed:
            message = f"Method {method} not allowed for {path}; use {allowed}."
            body = _error("anthropic" if kind == "anthropic_models" else kind, 405, message)
            await ex.send_full(405, body, [*req_headers, ("allow", allowed)])
            return True
        auth_error = self._auth_error(kind, headers, query)
        if auth_error is not None:
            status, error = auth_error
            await ex.send_full(status, error, req_headers)
            return True
        if kind == "models":
            await self._models(ex, route, req_headers)
            return True
        if kind == "anthropic_models":
            await self._anthropic_models(ex, route, query, req_headers)
            return True
        if kind == "anthropic" and not headers.get("anthropic-version"):
            error = sa.error_body(400, "anthropic-version: header is required")
            await ex.send_full(400, error, req_headers)
            return True

        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError as exc:
            if kind == "gemini":
                msg = f"Invalid JSON payload received. ({exc})"
            else:
                msg = f"We could not parse the JSON body of your request. ({exc})"
            await ex.send_full(400, _error(kind, 400, msg), req_headers)
            return True
        if not isinstance(body, dict):
            msg = "The request body must be a JSON object."
            await ex.send_full(400, _error(kind, 400, msg), req_headers)
            return True
        rec.body = body
        counting = route == "/messages/count_tokens"
        if kind == "anthropic" or kind == "gemini":
            if kind == "anthropic":
                message = sa.validate(body, count_tokens=counting)
            else:
                message = sg.validate(body)
            if message is not None:
                await ex.send_full(400, _error(kind, 400, message), req_headers)
                return True
            if counting:
                await ex.send_full(200, sp.dumps(sa.count_tokens(body)), req_headers)
                return True
        else:
            problem = _validate(kind, body)
            if problem is not None:
                message, param = problem
                error = sp.error_body(message, "invalid_request_error", None, param)
                await ex.send_full(400, error, req_headers)
                return True
            foreign = sc.foreign_item(body) if kind == "responses" else None
            if foreign is not None:
                await ex.send_full(400, sc.foreign_error(foreign), req_headers)
                return True
        if gemini is not None:
            model, action = gemini
            alt = urllib.parse.parse_qs(query).get("alt", [""])[-1]
            stream = action == "streamGenerateContent"
            return await self._generate(
                ex, kind, body, req_headers, model=model, stream=stream, sse=alt == "sse"
            )
        compaction = sc.form(route == "/responses/compact", body) if kind == "responses" else None
        return await self._generate(ex, kind, body, req_headers, compaction=compaction)

    async def _chatgpt(
        self, ex: _Exchange, method: str, route: str, headers: dict[str, str], raw_body: bytes,
        req_headers: list[tuple[str, str]],
    ) -> bool:
        """The ChatGPT backend's responses route and OpenAI's token endpoint
        (:mod:`relay.testing.sim_chatgpt`)."""
        if method != "POST":
            await ex.send_full(405, _error("responses", 405, "Use POST."), req_headers)
            return True
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = None
        ex.rec.body = body if isinstance(body, dict) else None
        backend = self.chatgpt
        if route == CHATGPT_TOKEN:
            if backend.token_delay_s:
                await trio.sleep(backend.token_delay_s)
            status, answer = backend.token(body)
            await ex.send_full(status, answer, req_headers)
            return True
        refused = backend.check(headers, body)
        if refused is not None:
            status, answer, extra = refused
            await ex.send_full(status, answer, [*req_headers, *extra])
            return True
        ex.chatgpt = True
        return await self._generate(
            ex, "responses", body, [*req_headers, *backend.answered(headers)]
        )

    def _key_ok(self, key: str | None) -> bool:
        """The key rule of every protocol: the profile's key if set, else any non-empty key."""
        if not key:
            return False
        expected = self.profile.api_key
        return expected is None or key == expected

    def _authorized(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return self._key_ok(token.strip())

    def _auth_error(
        self, kind: str, headers: dict[str, str], query: str
    ) -> tuple[int, bytes] | None:
        """Status and body of the auth failure for *kind*'s credentials, or None if they pass."""
        if kind in ("anthropic", "anthropic_models"):
            # x-api-key, or an API key as a bearer token: the anthropic SDKs (Python 2.17) send
            # ``Authorization: Bearer``, Claude Code sends ANTHROPIC_API_KEY as x-api-key and
            # ANTHROPIC_AUTH_TOKEN as a bearer token.
            key = headers.get("x-api-key", "").strip()
            if not key:
                scheme, _, token = headers.get("authorization", "").partition(" ")
                key = token.strip() if scheme.lower() == "bearer" else ""
            if self._key_ok(key):
                return None
            message = "invalid x-api-key" if key else "x-api-key header is required"
            return 401, sa.error_body(401, message)
        if kind == "gemini":
            key = headers.get("x-goog-api-key", "").strip()
            if not key:
                key = urllib.parse.parse_qs(query).get("key", [""])[-1].strip()
            if self._key_ok(key):
                return None
            return sg.auth_error(missing=not key)
        if self._authorized(headers.get("authorization")):
            return None
        return 401, sp.invalid_api_key_body()

    async def _models(self, ex: _Exchange, route: str, headers: list[tuple[str, str]]) -> None:
        models = list(dict.fromkeys([*sp.BASE_MODELS, *self._models_seen]))
        if route == "/models":
            await ex.send_full(200, sp.dumps(sp.models_list(models)), headers)
            return
        model = route[len("/models/") :]
        if model in models:
            await ex.send_full(200, sp.dumps(sp.model_object(model)), headers)
        else:
            body = sp.error_body(
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
            await ex.send_full(404, body, headers)

    async def _anthropic_models(
        self, ex: _Exchange, route: str, query: str, headers: list[tuple[str, str]]
    ) -> None:
        models = list(dict.fromkeys([*sa.BASE_MODELS, *self._models_seen]))
        if route == "/models":
            await ex.send_full(200, sp.dumps(sa.models_list(models, query)), headers)
            return
        model = urllib.parse.unquote(route[len("/models/") :])
        if model in models:
            await ex.send_full(200, sp.dumps(sa.model_object(model)), headers)
        else:
            await ex.send_full(404, sa.error_body(404, f"model: {model}"), headers)

    async def _control(self, ex: _Exchange, method: str, route: str, raw_body: bytes) -> None:
        """``/_sim/*``: inspection and steering for tests in another process."""
        if route == "/_sim/requests" and method == "GET":
            # vars() rather than dataclasses.asdict: same JSON, without deep-copying every body.
            payload: Any = [vars(r) for r in self.requests]
        elif route == "/_sim/reset" and method == "POST":
            self.reset()
            payload = {"ok": True}
        elif route == "/_sim/stats" and method == "GET":
            payload = {
                "active_streams": self.active_streams,
                "peak_active_streams": self.peak_active_streams,
                "total_requests": self.total_requests,
            }
        elif route == "/_sim/chatgpt/login" and method == "POST":
            spec = json.loads(raw_body or b"{}")
            payload = self.chatgpt.login(
                spec["account_id"], spec.get("plan", "plus"), float(spec.get("lifetime_s", 3600))
            )
        elif route == "/_sim/chatgpt" and method in ("GET", "POST"):
            if method == "POST":
                error = self.chatgpt.configure(json.loads(raw_body or b"{}"))
                if error is not None:
                    await ex.send_full(400, sp.error_body(error, "invalid_request_error"))
                    return
            payload = self.chatgpt.stats()
        elif route == "/_sim/profile" and method in ("GET", "POST"):
            if method == "POST":
                error = self._update_profile(raw_body)
                if error is not None:
                    await ex.send_full(400, sp.error_body(error, "invalid_request_error"))
                    return
            payload = dataclasses.asdict(self.profile)
        else:
            await ex.send_full(404, _not_found(method, route))
            return
        await ex.send_full(200, sp.dumps(payload))

    def _update_profile(self, raw_body: bytes) -> str | None:
        try:
            changes = json.loads(raw_body or b"{}")
        except ValueError:
            return "The profile must be a JSON object."
        if not isinstance(changes, dict):
            return "The profile must be a JSON object."
        unknown = sorted(set(changes) - set(_PROFILE_TYPES))
        if unknown:
            return f"Unknown profile fields: {', '.join(unknown)}."
        for key, value in changes.items():
            kind, nullable = _PROFILE_TYPES[key]
            ok = (value is None and nullable) or (
                isinstance(value, kind) and not isinstance(value, bool)
            )
            if not ok:
                return f"Profile field {key} must be {kind[-1].__name__}."
        for key, value in changes.items():
            if value is not None and float in _PROFILE_TYPES[key][0]:
                value = float(value)
            setattr(self.profile, key, value)
        return None

    # ---------------------------------------------------------------------------------------
    # Generation

    async def _generate(
        self,
        ex: _Exchange,
        kind: str,
        body: dict,
        headers: list[tuple[str, str]],
        *,
        model: str | None = None,
        stream: bool | None = None,
        sse: bool = True,
        compaction: str | None = None,
    ) -> bool:
        profile = self.profile
        directives = sp.parse_directives(sp.directive_text(kind, body))
        plan = sp.build_plan(
            kind,
            body,
            directives,
            ttft_s=profile.ttft_s,
            delay_s=profile.token_delay_s,
            output_tokens=profile.output_tokens,
            reasoning_tokens=profile.reasoning_tokens,
            model=model,
            stream=False if compaction == "v1" else stream,
            sse=sse,
        )
        if compaction:
            plan.compaction = compaction
            plan.reasoning, plan.tool_name, plan.tool_args = [], None, []
        if plan.model:
            self._models_seen.setdefault(plan.model, None)
        fault = directives.fault or profile.fault
        slow = directives.slow_headers or 0.0
        host = ex.rec.headers.get("host", "") if ex.rec is not None else ""
        if fault == "stale":  # see relay.testing.sim_wire
            if ex.reused:
                ex.abort(reset=False)
                return False
            fault = None  # a new connection: answered as usual
        elif fault in sim_wire.FAULTS:
            return await self._watched(ex, self._send_unbounded, ex, fault, plan.stream, headers)
        if fault in sp.HTTP_FAULTS:
            credential = _credential(ex.rec.headers if ex.rec is not None else {})
            if kind == "anthropic":
                status, extra, error = sa.fault_response(fault, plan.model, credential, host)
            elif kind == "gemini":
                status, extra, error = sg.fault_response(fault, credential, host)
            else:
                status, extra, error = sp.fault_response(fault, plan.model, credential, host)
            await ex.send_full(status, error, [*headers, *extra])
            return True
        if fault == "html":
            html = [("content-type", "text/html; charset=utf-8")]
            await ex.send_full(502, sp.html_page(host), [*headers, *html])
            return True
        if fault == "malformed":
            answer = sp.malformed_answer(kind, plan.stream)
            if not plan.stream:
                await ex.send_full(200, answer, [*headers, ("content-type", "application/json")])
                return True
            await ex.start_stream(headers)
            await ex.send_events([ex.frame(answer), ex.terminator()], 1)
            ex.rec.finished = True
            return True
        if fault == "huge_usage":
            plan.claimed = sp.HUGE_USAGE
        if fault in ("drop", "reset") and not plan.stream:
            ex.abort(reset=fault == "reset")
            return False
        if kind in ("chat", "responses"):
            headers.append(("openai-model", plan.model))

        if not plan.stream:
            wait = plan.ttft_s + plan.delay_s * max(0, plan.output_tokens - 1)
            if not (wait or fault or profile.capacity_tps):
                return await self._respond_json(ex, plan, headers, 0.0, None, 0.0)  # fast path
            return await self._watched(ex, self._respond_json, ex, plan, headers, wait, fault, slow)
        self.active_streams += 1
        self.peak_active_streams = max(self.peak_active_streams, self.active_streams)
        try:
            return await self._watched(ex, self._respond_stream, ex, plan, headers, fault, slow)
        finally:
            self.active_streams -= 1

    async def _send_unbounded(
        self, ex: _Exchange, fault: str, stream: bool, headers: list[tuple[str, str]]
    ) -> bool:
        """A line that never ends, plain (``huge_line``) or as a gzip bomb (``gzip_bomb``),
        until it is all sent or the client hangs up."""
        prefix = sim_wire.STREAM_LINE if stream else sim_wire.BODY_LINE
        if fault == "gzip_bomb":
            headers = [*headers, ("content-encoding", "gzip")]
            pieces: Iterable[bytes] = [sim_wire.gzip_bomb(prefix)]
        else:
            pieces = sim_wire.huge_line(prefix)
        content_type = "text/event-stream; charset=utf-8" if stream else "application/json"
        await ex.start_stream(headers, content_type)  # chunked: no length announces the size
        for piece in pieces:
            await ex.send_events([ex.frame(piece)], 0)
        await ex.send_events([ex.terminator()], 0)
        ex.rec.finished = True
        return True

    async def _watched(self, ex: _Exchange, fn: Any, *args: Any) -> bool:
        """Run a response while a watcher reads the socket; a client close cancels the response."""
        keep = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ex.watch, nursery.cancel_scope)
            try:
                keep = await fn(*args)
            except _ClientGone:
                keep = False
            finally:
                nursery.cancel_scope.cancel()
        return keep and not ex.closed

    async def _respond_json(
        self,
        ex: _Exchange,
        plan: sp.Plan,
        headers: list[tuple[str, str]],
        wait: float,
        fault: str | None,
        slow: float,
    ) -> bool:
        if slow > 0:
            await trio.sleep(slow)
        if fault == "stall":
            await trio.sleep_forever()  # until the watcher sees the client leave
        rate = self.profile.capacity_tps
        if wait > 0 or rate:
            due = trio.current_time() + wait
            await trio.sleep_until(max(due, self._pacer.reserve(rate, plan.output_tokens)))
        body = sp.dumps(sp.nonstream_body(plan))
        await ex.send_full(200, body, headers)
        ex.rec.usage = plan.usage()
        return True

    async def _respond_stream(
        self,
        ex: _Exchange,
        plan: sp.Plan,
        headers: list[tuple[str, str]],
        fault: str | None,
        slow: float,
    ) -> bool:
        """Stream the plan's events with its timing.

        Tokens are due on an absolute schedule (first at ttft, then every delay, no earlier than
        their capacity slot), so a busy loop does not stretch a stream. Events that are already
        due go out together in one write: per-write cost dominates on small machines, and a
        zero-delay stream then costs a few writes instead of one per event.
        """
        if slow > 0:
            await trio.sleep(slow)
        await ex.start_stream(headers, sp.stream_content_type(plan))
        events: Any = sp.stream_events(plan)
        if ex.chatgpt and self.chatgpt.empty_completed_output:
            events = sim_chatgpt.empty_completed(events)
        limit: int | None = None
        if fault in ("drop", "reset"):
            events = list(events)
            limit = len(events) // 2
        elif fault == "stall":
            limit = _STALL_EVENTS
        pacer, rate = self._pacer, self.profile.capacity_tps
        if plan.output_tokens == 0 and plan.ttft_s > 0:
            await trio.sleep(plan.ttft_s)  # no token to hang the wait on: wait before the events
        due = trio.current_time() + plan.ttft_s
        first = True
        frames: list[bytes] = []
        size = sent = 0
        for data, is_token in events:
            if sent == limit:
                break
            if is_token:
                if not first:
                    due += plan.delay_s
                first = False
                if rate:
                    due = max(due, pacer.reserve(rate))
                if due > trio.current_time():
                    if frames:
                        await ex.send_events(frames, len(frames))
                        frames, size = [], 0
                    await trio.sleep_until(due)
            frame = ex.frame(data)
            frames.append(frame)
            size += len(frame)
            sent += 1
            if size >= _BATCH_BYTES:
                await ex.send_events(frames, len(frames))
                frames, size = [], 0
        if fault in ("drop", "reset", "stall"):
            if frames:
                await ex.send_events(frames, len(frames))
            if fault == "stall":
                await trio.sleep_forever()  # until the watcher sees the client leave
            ex.abort(reset=fault == "reset")
            return False
        await ex.send_events([*frames, ex.terminator()], len(frames))
        ex.rec.usage = plan.usage()
        ex.rec.finished = True
        return True


def _credential(headers: dict[str, str]) -> str:
    """The credential a request carried, as sent (for the ``leak_secret`` fault to quote)."""
    for name in ("authorization", "x-api-key", "x-goog-api-key"):
        if headers.get(name):
            return headers[name]
    return ""


def _keep_alive(request: _Request) -> bool:
    """HTTP/1.1 keeps the connection unless told ``close``; HTTP/1.0 and HEAD always close."""
    if request.http_version != b"1.1" or request.method == b"HEAD":
        return False
    for name, value in request.headers:
        if name == b"connection" and b"close" in value.lower():
            return False
    return True


def _not_found(method: str, path: str) -> bytes:
    return sp.error_body(f"Invalid URL ({method} {path})", "invalid_request_error")


def _gemini_route(route: str) -> tuple[str, str] | None:
    """``(model, action)`` of a ``/models/{model}:generateContent``-style route, else None."""
    if not route.startswith("/models/"):
        return None
    model, sep, action = route[len("/models/") :].rpartition(":")
    if not sep or not model or action not in sg.ACTIONS:
        return None
    return urllib.parse.unquote(model), action


def _error(kind: str, status: int, message: str) -> bytes:
    """An error body in *kind*'s protocol shape."""
    if kind == "anthropic":
        return sa.error_body(status, message)
    if kind == "gemini":
        return sg.error_body(status, message)
    return sp.error_body(message, "invalid_request_error")


def _validate(kind: str, body: dict) -> tuple[str, str] | None:
    """The few checks the real API makes that clients depend on (message, param)."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter", "model"
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "Missing required parameter: 'messages'.", "messages"
    return None


# -------------------------------------------------------------------------------------------
# Standalone


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m relay.testing.upstream",
        description=(
            "Simulated LLM upstream (OpenAI Chat Completions and Responses, Anthropic Messages, "
            "Gemini generateContent)."
        ),
    )
    defaults = SimProfile()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--ttft", type=float, default=defaults.ttft_s, help="seconds")
    parser.add_argument("--token-delay", type=float, default=defaults.token_delay_s)
    parser.add_argument("--tokens", type=int, default=defaults.output_tokens)
    parser.add_argument("--reasoning-tokens", type=int, default=defaults.reasoning_tokens)
    parser.add_argument("--capacity-tps", type=float, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    return parser.parse_args(argv)


async def _run(
    sim: SimUpstream, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            actual = await nursery.start(
                functools.partial(sim.serve, ssl_context=ssl_context), host, port
            )
            shown = f"[{host}]" if ":" in host else host
            scheme = "http" if ssl_context is None else "https"
            print(f"sim-upstream listening on {scheme}://{shown}:{actual}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m relay.testing.upstream``: serve until Ctrl-C or SIGTERM."""
    args = _parse_args(argv)
    profile = SimProfile(
        ttft_s=args.ttft,
        token_delay_s=args.token_delay,
        output_tokens=args.tokens,
        reasoning_tokens=args.reasoning_tokens,
        capacity_tps=args.capacity_tps,
        api_key=args.api_key,
    )
    try:
        ssl_context = None
        if args.tls_cert:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        trio.run(_run, SimUpstream(profile), args.host, args.port, ssl_context)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass


if __name__ == "__main__":
    main()
