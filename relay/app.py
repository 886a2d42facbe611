"""The relay's ASGI application: it composes the routes around the runtime, and nothing else.

:class:`RelayApp` is the ASGI entry point: it routes, gives every response an ``x-request-id``,
turns every failure into OpenAI's error JSON, and writes each request's access-log line when it
ends (:func:`log_request_end`, ``relay/logs.py``). The shared state is :mod:`relay.runtime`'s.

Routes: the relay routes (``relay/api/relay.py``, with ``calls.py`` and ``streaming.py``),
health, index and models (``relay/api/discovery.py``), the self-service routes of a key
(``relay/api/selfservice.py``) under every base path, the admin API (``relay/api/admin.py``),
``/metrics`` (``relay/api/metrics.py``) and the key workbench page (``relay/api/web.py``).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable

import trio

from .api import admin, admin_views, discovery, responses_state, selfservice
from .api import relay as relay_routes
from .api.discovery import ANTHROPIC_BASE, BASE_PATHS
from .api.http import ClientDisconnected, Receive, Request, Responder, Scope, Send
from .api.metrics import serve_metrics
from .api.web import Web
from .api.websocket import serve_socket
from .errors import InternalError, LedgerUnavailable, MethodNotAllowed, NotFound, RelayError
from .ledger.backend import StoreUnavailable
from .ledger.prices import format_credits
from .logs import log_access
from .runtime import Runtime

log = logging.getLogger("relay")


Handler = Callable[[Runtime, Request, Responder], Awaitable[None]]


class RelayApp:
    """The ASGI application: routes, request ids, and error rendering."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.web = Web()
        self._routes: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        for base in (*BASE_PATHS, ANTHROPIC_BASE):
            self._add(base + "/messages", "POST", relay_routes.messages)
            self._add(base + "/messages/count_tokens", "POST", relay_routes.count_tokens)
            self._add(base + "/models", "GET", discovery.list_models)
            self._add(base + "/models/{model}", "GET", discovery.get_model)
        for base in BASE_PATHS:
            self._add(base + "/chat/completions", "POST", relay_routes.chat)
            self._add(base + "/responses", "POST", relay_routes.responses)
            self._add(base + "/responses/compact", "POST", relay_routes.responses_compact)
            for method, path, handler in responses_state.ROUTES:
                self._add(base + path, method, handler)
            self._add(base, "GET", discovery.health)
            for path, handler in selfservice.ROUTES:
                self._add(base + path, "GET", handler)
        for path, handler in selfservice.ROOT_ROUTES:
            self._add(path, "GET", handler)
        # The Codex CLI appends "/responses" (and "/models") to a base URL given without "/v1".
        self._add("/openai/responses", "POST", relay_routes.responses)
        self._add("/openai/responses/compact", "POST", relay_routes.responses_compact)
        self._add("/openai/models", "GET", discovery.list_models)
        self._socket_paths = frozenset(
            [*(base + "/responses" for base in BASE_PATHS), "/openai/responses"]
        )
        self._add("/openai", "GET", discovery.health)
        self._add("/healthz", "GET", discovery.health)
        self._add("/", "GET", self._index)
        self._add("/workbench", "GET", self.web.page)
        self._add("/console", "GET", self.web.console)
        self._add("/web/{name}", "GET", self.web.asset)
        self._add("/metrics", "GET", serve_metrics)
        for method, path, handler in (*admin.ROUTES, *admin_views.ROUTES):
            self._add(path, method, handler)

    def _add(self, path: str, method: str, handler: Handler) -> None:
        """Route ``method path`` to ``handler``; ``{name}`` in ``path`` matches one segment
        (``/models/{model}`` the rest of the path), found in ``request.params``."""
        if "{" not in path:
            self._routes.setdefault(path, {})[method] = handler
            return
        pattern = _compile(path)
        for existing, methods in self._patterns:
            if existing.pattern == pattern.pattern:
                methods[method] = handler
                return
        self._patterns.append((pattern, {method: handler}))

    def _find(self, request: Request) -> Handler:
        path = request.path
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"
        methods = self._routes.get(path)
        if methods is None:
            for pattern, candidates in self._patterns:
                match = pattern.match(path)
                if match:
                    request.params = match.groupdict()
                    methods = candidates
                    break
        if methods is None:
            raise NotFound(
                f"Invalid URL ({request.method} {request.path}). The relay serves "
                "/v1/chat/completions, /v1/responses, /v1/messages and /v1/models (also under "
                "/openai/v1, /codex/v1 and /api/v1; Anthropic clients also /claude/v1); the key "
                "workbench page is at /workbench.",
                code="unknown_url",
            )
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")  # RFC 9110 §9.3.2: the GET answer, without its body
        if handler is None:
            allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            raise MethodNotAllowed(
                f"Method {request.method} is not allowed on {request.path}; use {allowed}.",
                headers={"allow": allowed},
            )
        return handler

    async def _index(self, runtime: Runtime, request: Request, responder: Responder) -> None:
        """The workbench page for a browser; the relay's self-description for anything else."""
        if self.web.wants_page(request):
            await self.web.page(runtime, request, responder)
        else:
            await discovery.index(runtime, request, responder)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket: the Responses API on ``{base}/responses`` (relay/api/websocket.py),
        each turn served as a ``POST`` of that path; any other path is refused with 404."""
        path = scope.get("path", "")
        if len(path) > 1:
            path = path.rstrip("/")
        if path in self._socket_paths:
            await serve_socket(self.runtime, scope, receive, send, self._http)
            return
        started = trio.current_time()
        request_id = await _refuse_websocket(receive, send, path)
        now = trio.current_time()
        log_access({
            "request_id": request_id, "key_id": "", "method": "GET",
            "path": scope.get("path", ""), "status": 404, "error": "unknown_url",
            "ttfb_ms": (now - started) * 1000, "duration_ms": (now - started) * 1000,
        })

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = trio.current_time()
        request_id = "req_" + uuid.uuid4().hex
        responder = Responder(send, request_id, head=scope.get("method") == "HEAD")
        try:
            request = Request(
                scope, receive, request_id, self.runtime.config.server.body_read_timeout_s
            )
        except RelayError as error:  # headers the relay cannot trust (see Request)
            await responder.error(error)
            log_request_end(scope, request_id, None, responder, error.code or error.type, started)
            return
        responder.anthropic = _speaks_anthropic(request)
        error_code = ""
        try:
            handler = self._find(request)
            await handler(self.runtime, request, responder)
        except RelayError as error:
            error_code = error.code or error.type
            if not responder.started:
                await responder.error(error)
        except ClientDisconnected:
            error_code = "client_disconnected"
        except StoreUnavailable as error:  # an admin or self-service read, the database away
            error_code = LedgerUnavailable.code
            log.warning("%s %s (%s): %s", request.method, request.path, request_id, error)
            if not responder.started:
                await responder.error(LedgerUnavailable(
                    "The relay's key and usage database cannot be reached right now; retry "
                    "in a moment."
                ))
        except Exception:
            error_code = "server_error"
            log.exception("unhandled error in %s %s (%s)", request.method, request.path, request_id)
            if not responder.started:
                await responder.error(InternalError(request_id))
            elif not responder.finished:
                await responder.end()
        finally:
            log_request_end(scope, request_id, request, responder, error_code, started)


def log_request_end(
    scope: Scope,
    request_id: str,
    request: Request | None,
    responder: Responder,
    error_code: str,
    started: float,
) -> None:
    """The access-log line of a request that has ended (relay/logs.py). A relay request's
    usage record says what it cost and how it went; any other request, what it was answered."""
    now = trio.current_time()
    record = request.usage if request is not None else None
    status = responder.status if responder.started else 0
    first_byte = responder.started_at
    fields: dict = {
        "request_id": request_id,
        "key_id": request.key_id if request is not None else "",
        "method": scope.get("method", ""),
        "path": scope.get("path", ""),
        "status": status or (499 if error_code == "client_disconnected" else 0),
        "error": error_code,
        "ttfb_ms": None if first_byte is None else (first_byte - started) * 1000,
        "duration_ms": (now - started) * 1000,
    }
    if record is not None:
        fields.update(
            model=record.model,
            served_model=record.upstream_model,
            account=record.account,
            status=record.status or fields["status"],
            error=record.error_code or error_code,
            tokens_in=record.input_tokens,
            tokens_out=record.output_tokens,
            credits=format_credits(record.cost_nano),
            queue_ms=record.queue_ms,
        )
    log_access(fields)


def _speaks_anthropic(request: Request) -> bool:
    """Whether the request's errors go out in Anthropic's shape: on a Messages route, under
    ``/claude/``, or from a client that names an Anthropic API version (the anthropic SDKs and
    Claude Code send ``anthropic-version`` with every request)."""
    path = request.path
    return (
        "anthropic-version" in request.headers
        or path.startswith("/claude/")
        or path.rstrip("/").endswith(("/messages", "/messages/count_tokens"))
    )


def _compile(path: str) -> re.Pattern[str]:
    """``/admin/keys/{key_id}`` as a regex; ``{model}`` may span segments (``org/model``)."""
    parts = []
    for segment in re.split(r"(\{\w+\})", path):
        name = re.fullmatch(r"\{(\w+)\}", segment)
        if name:
            parts.append(f"(?P<{name[1]}>{'.+' if name[1] == 'model' else '[^/]+'})")
        else:
            parts.append(re.escape(segment))
    return re.compile("".join(parts) + "$")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _refuse_websocket(receive: Receive, send: Send, path: str) -> str:
    """404 for a WebSocket upgrade on a path that serves none. Returns the answer's id."""
    request_id = "req_" + uuid.uuid4().hex
    await receive()  # websocket.connect
    body = NotFound(
        f"No WebSocket is served at {path[:200]}: the Responses API's is at "
        "{base}/responses (for example /v1/responses).",
        code="unknown_url",
    ).to_json()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 404,
            "headers": [
                (b"content-type", b"application/json"),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    return request_id
