"""The Responses API over a WebSocket (``GET {base}/responses`` with an upgrade), as the Codex
CLI and the Agents SDK's WebSocket model speak it (protocols.md §2.7).

A socket carries many turns, one at a time. Each ``response.create`` frame is served as a
``POST {base}/responses`` through the relay's one way for every request (the HTTP request's
handler, guards, scheduler, credits, usage record and access line all unchanged): its body is
the frame's fields with ``stream`` forced on, and its answer's server-sent events are written
back as one text frame each (an error answer as ``{"type":"error","status":…,"error":{…}}``).

Guarantees:

- The socket's handler owns a nursery: the reader of client frames, the running turn and the
  shutdown watcher. A client that closes the socket (or whose connection drops) ends its
  running turn as an HTTP client's disconnect does: the upstream call is cancelled and every
  slot released before the handler returns.
- The key is checked at the handshake (a refused key gets the HTTP error, never a socket) and
  again by each turn; a key holds at most ``server.websocket_max_per_key`` sockets in this
  process (429 at the handshake beyond it).
- A turn may name the socket's last completed response in ``previous_response_id``: the relay
  sends its input and output, then the new input (Codex's incremental mode), whatever the
  upstream. An id the socket does not know goes on to the HTTP request as it came.
- ``generate: false`` (a prewarm) is answered by the relay alone (``response.created`` and
  ``response.completed``, no output, no usage): no upstream call, no usage record, nothing
  billed; the next turn may continue from it.
- After ``server.websocket_max_age_s`` a new ``response.create`` gets the error
  ``websocket_connection_limit_reached`` and the socket closes (Codex then reconnects). On
  shutdown an idle socket closes at once (1001); a running turn is drained like an HTTP one.
- A frame the relay cannot use (binary, not JSON, an unknown type, a second
  ``response.create`` while a turn runs) gets an error frame; the socket stays open.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..errors import InvalidRequest, RelayError
from ..logs import log_access
from ..protocol.chatgpt import rate_limits_event
from ..protocol.sse import EventSplitter, event_data
from .http import Message, Receive, Request, Scope, Send

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("relay.api")

#: Serves one HTTP request given its scope, receive and send (the app's own HTTP path).
ServeHttp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Frames a client may send besides ``response.create``: acknowledged by being accepted.
ACCEPTED_FRAMES = frozenset({"response.processed", "response.append"})
#: Response headers an error frame carries (``retry-after`` and the rate-limit state).
_ERROR_FRAME_SKIPS = frozenset({b"content-type", b"content-length"})
#: Handshake headers a turn's HTTP request does not carry.
_SOCKET_HEADERS = frozenset({
    b"connection", b"upgrade", b"content-length", b"content-type", b"transfer-encoding",
})
#: Close codes (RFC 6455 §7.4.1).
NORMAL_CLOSE, GOING_AWAY = 1000, 1001


async def serve_socket(runtime: Runtime, scope: Scope, receive: Receive, send: Send,
                       serve_http: ServeHttp) -> None:
    """Serve one Responses WebSocket from its ``websocket.connect`` to its end."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    handshake_id = "req_" + uuid.uuid4().hex
    started = trio.current_time()
    line = {"request_id": handshake_id, "key_id": "", "method": "GET",
            "path": scope.get("path", ""), "status": 101, "error": ""}
    try:
        handshake = Request({**scope, "method": "GET"}, receive, handshake_id)
        key = await runtime.keys.authenticate(handshake.headers)
        open_now = runtime.sockets.get(key.id, 0)
        if open_now >= runtime.config.server.websocket_max_per_key:
            raise RelayError(
                f"This key already holds {open_now} open Responses WebSockets, the most this "
                "relay allows (server.websocket_max_per_key); close one, or send the request "
                "over HTTP.",
                status=429,
                type="rate_limit_error",
                code="websocket_limit_reached",
                headers={"retry-after": "5"},
            )
    except RelayError as error:
        await _deny(send, handshake_id, error)
        line.update(status=error.status, error=error.code or error.type)
        _log_socket(line, started, started)
        return
    line["key_id"] = key.id
    runtime.sockets[key.id] = open_now + 1
    accepted: float | None = None
    try:
        socket = ResponsesSocket(runtime, scope, send, serve_http)
        accept: list[tuple[bytes, bytes]] = [(b"x-request-id", handshake_id.encode())]
        turn_state = handshake.headers.get("x-codex-turn-state")
        if turn_state:
            accept.append((b"x-codex-turn-state", turn_state.encode("latin-1")))
        await send({"type": "websocket.accept", "headers": accept})
        accepted = trio.current_time()
        await socket.run(receive)
    finally:
        _log_socket(line, started, accepted)
        left = runtime.sockets.get(key.id, 1) - 1
        if left > 0:
            runtime.sockets[key.id] = left
        else:
            runtime.sockets.pop(key.id, None)


class ResponsesSocket:
    """One accepted socket: its turns, its last completed response and its sends."""

    def __init__(self, runtime: Runtime, scope: Scope, send: Send, serve_http: ServeHttp) -> None:
        self.runtime = runtime
        self.serve_http = serve_http
        self._send = send
        self._send_lock = trio.Lock()
        self.closed = trio.Event()  # the client's side is gone: nothing more is sent
        self.turn_done = trio.Event()
        self.turn_done.set()  # no turn running
        #: The running turn's last frame (its end, or its error) has been sent.
        self.answered = False
        self.opened_at = trio.current_time()
        # The turns' HTTP scope: the handshake's path and headers, as a JSON POST, without
        # what is about the socket itself (the upgrade, and Codex's WebSocket beta flag, which
        # must not reach an upstream over HTTP).
        turn_headers = [
            (name, value) for name, value in scope["headers"]
            if name not in _SOCKET_HEADERS and not name.startswith(b"sec-websocket-")
            and not (name == b"openai-beta" and value.startswith(b"responses_websockets"))
        ]
        turn_headers.append((b"content-type", b"application/json"))
        self.turn_scope: Scope = {
            **scope, "type": "http", "method": "POST", "scheme": "http",
            "http_version": "1.1", "headers": turn_headers, "query_string": b"",
        }
        #: The last completed response: its id, and the input and output a continuation
        #: from it stands for.
        self.last: tuple[str, list, list] | None = None

    async def run(self, receive: Receive) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._close_on_shutdown, nursery.cancel_scope)
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    self.closed.set()  # a running turn sees its client gone, and ends
                    break
                if kind != "websocket.receive":
                    continue
                text = message.get("text")
                if text is None:
                    await self.error_frame(_frame_error(
                        "Binary frames are not part of the Responses WebSocket protocol: send "
                        "each event as a JSON text frame.", "invalid_frame"))
                    continue
                if not await self._client_frame(nursery, text):
                    break
            await self.turn_done.wait()
            nursery.cancel_scope.cancel()

    async def _client_frame(self, nursery: trio.Nursery, text: str) -> bool:
        """Act on one client text frame; ``False`` once the relay has closed the socket."""
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError):
            frame = None
        if not isinstance(frame, dict):
            await self.error_frame(_frame_error(
                "A frame must be one JSON object with a 'type', such as "
                '{"type":"response.create","model":…,"input":[…]}.', "invalid_json"))
            return True
        kind = frame.get("type")
        if kind in ACCEPTED_FRAMES:
            return True
        if kind != "response.create":
            await self.error_frame(_frame_error(
                f"Unknown frame type {json.dumps(kind)[:80]}: this relay accepts "
                "'response.create', 'response.processed' and 'response.append'.",
                "unknown_frame_type", param="type"))
            return True
        if not self.turn_done.is_set() and self.answered:
            await self.turn_done.wait()  # its answer is out; its record is being written
        if not self.turn_done.is_set():
            await self.error_frame(_frame_error(
                "A response is already in progress on this socket: wait for its "
                "'response.completed' (one response at a time per socket), or open another "
                "socket.", "response_in_progress"))
            return True
        age = trio.current_time() - self.opened_at
        if age >= self.runtime.config.server.websocket_max_age_s:
            await self.error_frame(_frame_error(
                f"Responses websocket connection limit reached ({age / 60:.0f} minutes). "
                "Create a new websocket connection to continue.",
                "websocket_connection_limit_reached"))
            await self.close(NORMAL_CLOSE)
            return False
        self.turn_done = trio.Event()
        self.answered = False
        nursery.start_soon(self._turn, frame)
        return True

    async def _turn(self, frame: dict) -> None:
        """One ``response.create``: a prewarm answered here, or a POST through the relay."""
        try:
            body = {k: v for k, v in frame.items() if k not in ("type", "generate")}
            body["stream"] = True
            input_items = self._continue(body)
            if frame.get("generate") is False:
                await self._prewarm(body, input_items)
                return
            sink = FrameSink(self)
            payload = json.dumps(body, ensure_ascii=False).encode()
            await self.serve_http(self.turn_scope, self._turn_receive(payload), sink)
            if sink.completed is not None:
                response_id, output = sink.completed
                self.last = (response_id, input_items, output) if input_items is not None else None
        finally:
            self.turn_done.set()

    def _continue(self, body: dict) -> list | None:
        """Expand a continuation of the socket's last response into the whole input (in
        ``body``); returns the turn's whole input, or ``None`` if the relay cannot know it (a
        ``previous_response_id`` it does not hold, left for the request to resolve)."""
        items = body.get("input", [])
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if not isinstance(items, list):
            return None  # the request's own validation names the problem
        previous = body.get("previous_response_id")
        if previous is None:
            return items
        last = self.last
        if last is None or previous != last[0]:
            return None
        del body["previous_response_id"]
        body["input"] = [*last[1], *last[2], *items]
        return body["input"]

    async def _prewarm(self, body: dict, input_items: list | None) -> None:
        """``generate: false``: the relay acknowledges without calling an upstream."""
        response_id = "resp_" + uuid.uuid4().hex
        response = {
            "id": response_id, "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": body.get("model"), "output": [],
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
        }
        created = {**response, "status": "in_progress", "usage": None}
        await self.text(json.dumps(
            {"type": "response.created", "sequence_number": 0, "response": created}))
        await self.text(json.dumps(
            {"type": "response.completed", "sequence_number": 1, "response": response}))
        if input_items is not None:
            self.last = (response_id, input_items, [])

    def _turn_receive(self, payload: bytes) -> Receive:
        """The turn's ASGI ``receive``: its body once, then ``http.disconnect`` when the
        socket closes (which cancels the turn, as for an HTTP client)."""
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await self.closed.wait()
            return {"type": "http.disconnect"}

        return receive

    async def _close_on_shutdown(self, scope: trio.CancelScope) -> None:
        """On shutdown, close the socket once no turn runs (a running one drains first)."""
        await self.runtime.stopping.wait()
        await self.turn_done.wait()
        await self.close(GOING_AWAY)
        scope.cancel()

    async def text(self, data: str) -> None:
        """One text frame, unless the client is gone."""
        if self.closed.is_set():
            return
        async with self._send_lock:
            await self._send({"type": "websocket.send", "text": data})

    async def error_frame(self, error: dict) -> None:
        await self.text(json.dumps(error))

    async def close(self, code: int) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                await self._send({"type": "websocket.close", "code": code})


class FrameSink:
    """The ASGI ``send`` of a turn's HTTP answer, written to the socket as frames: each
    server-sent event's data as one text frame, an error answer as one error frame. Notes
    the completed response (its id and output items) for the socket's next turn."""

    def __init__(self, socket: ResponsesSocket) -> None:
        self.socket = socket
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.streaming = False
        self.splitter = EventSplitter()
        self.error_body = bytearray()
        self.items: dict[int, Any] = {}  # output_item.done, by output_index
        #: ``(response id, output items)`` once ``response.completed`` was relayed.
        self.completed: tuple[str, list] | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
            content_type = dict(self.headers).get(b"content-type", b"")
            self.streaming = self.status == 200 and content_type.startswith(b"text/event-stream")
            if self.streaming:
                limits = rate_limits_event({
                    name.decode("latin-1"): value.decode("latin-1")
                    for name, value in self.headers if name.startswith(b"x-codex-")
                })
                if limits is not None:  # a ChatGPT-plan account's usage windows, first
                    await self.socket.text(json.dumps(limits))
            return
        body = message.get("body", b"")
        if self.streaming:
            for event in self.splitter.feed(body) if body else ():
                await self._event(event)
            if not message.get("more_body", False):
                for event in self.splitter.end():
                    await self._event(event)
            return
        self.error_body += body
        if not message.get("more_body", False):
            self.socket.answered = True
            await self.socket.error_frame(self._error_frame())

    async def _event(self, event: bytes) -> None:
        data = event_data(event)
        if not data or data == b"[DONE]":
            return  # a comment (keep-alive) or Chat's end marker: nothing to frame
        kind = _event_type(event, data)
        if kind in _TERMINAL:
            self.socket.answered = True  # set before the send: the client may answer at once
        await self.socket.text(data.decode("utf-8", "replace"))
        if kind in ("response.output_item.done", "response.completed"):
            self._note(data)

    def _note(self, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except ValueError:
            return
        kind = payload.get("type")
        if kind == "response.output_item.done" and isinstance(payload.get("item"), dict):
            self.items[payload.get("output_index", len(self.items))] = payload["item"]
        elif kind == "response.completed" and isinstance(payload.get("response"), dict):
            response = payload["response"]
            output = response.get("output")
            if not output:  # some upstreams send the items only as output_item.done
                output = [self.items[index] for index in sorted(self.items, key=str)]
            if isinstance(response.get("id"), str):
                self.completed = (response["id"], list(output))

    def _error_frame(self) -> dict:
        try:
            body = json.loads(self.error_body)
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            error = {"type": "server_error", "code": "server_error",
                     "message": self.error_body.decode("utf-8", "replace")[:500]}
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in self.headers if name not in _ERROR_FRAME_SKIPS
        }
        return {"type": "error", "status": self.status, "error": error, "headers": headers}


#: Events that end a response: the client may send its next ``response.create`` after one.
_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


def _event_type(event: bytes, data: bytes) -> str:
    """An event's type: its ``event:`` line's, else the ``type`` its data begins with."""
    if event.startswith(b"event:"):
        return event[6:event.find(b"\n")].strip().decode("latin-1")
    match = _LEADING_TYPE.match(data)
    return match[1].decode("latin-1") if match else ""


_LEADING_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"]{1,80})"')


def _log_socket(line: dict, started: float, first_byte: float | None) -> None:
    """The socket's own access line, when it ends (each turn has its own, as a POST)."""
    now = trio.current_time()
    log_access({
        **line,
        "ttfb_ms": None if first_byte is None else (first_byte - started) * 1000,
        "duration_ms": (now - started) * 1000,
    })


def _frame_error(message: str, code: str, *, param: str | None = None) -> dict:
    """An error frame about a client frame (a 400: the frame, not the socket, is refused)."""
    error = InvalidRequest(message, code=code, param=param)
    return {"type": "error", "status": 400, "error": json.loads(error.to_json())["error"]}


async def _deny(send: Send, request_id: str, error: RelayError) -> None:
    """Refuse the handshake with ``error``'s HTTP answer (the socket is never opened)."""
    body = error.to_json()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"x-request-id", request_id.encode()),
        *((name.lower().encode(), str(value).encode()) for name, value in error.headers.items()),
    ]
    await send({"type": "websocket.http.response.start", "status": error.status,
                "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
