"""The relay's runtime (shared state and background tasks) and its ASGI application.

:func:`open_runtime` builds everything a request needs — store, key ring, credits, usage writer,
metrics, guards, scheduler, upstream client — and runs the background tasks (usage writer, key
refresher, admission timer) in its own nursery for exactly as long as the relay serves.
:class:`RelayApp` is the ASGI entry point: it routes, gives every response an ``x-request-id``,
turns every failure into OpenAI's error JSON, and writes each request's access-log line when it
ends (:func:`log_request_end`, ``relay/logs.py``).

Routes: the relay routes (``relay/api/relay.py``), the self-service routes of a key
(``relay/api/selfservice.py``) under every base path, the admin API (``relay/api/admin.py``),
``/metrics`` (``relay/api/metrics.py``) and the key workbench page (``relay/api/web.py``).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from .api import admin, selfservice
from .api import relay as relay_routes
from .api.http import ClientDisconnected, Receive, Request, Responder, Scope, Send
from .api.metrics import Metrics, serve_metrics
from .api.web import Web
from .config import Config
from .errors import (
    InternalError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    RelayError,
)
from .guards.admission import Admission
from .ledger.credits import Credits
from .ledger.keys import KeyRing
from .ledger.prices import PriceTable, format_credits
from .ledger.store import Store
from .ledger.usage import UsageWriter
from .logs import log_access, log_missing_credentials
from .protocol.requests import Endpoint
from .upstream.client import UpstreamClient
from .upstream.health import Health
from .upstream.routing import Catalog, Scheduler

log = logging.getLogger("relay")

SHUTDOWN_MESSAGE = "The relay is shutting down and did not serve this request; retry it."

#: Every path prefix clients are told to use (seed documents): OpenAI-style, Codex relays,
#: multi-model gateways.
BASE_PATHS = ("/openai/v1", "/v1", "/codex/v1", "/api/v1")


@dataclass
class Runtime:
    config: Config
    store: Store
    keys: KeyRing
    credits: Credits
    metrics: Metrics
    usage: UsageWriter
    admission: Admission
    scheduler: Scheduler
    catalog: Catalog
    upstream: UpstreamClient
    health: Health
    started_at: float
    active_requests: int = 0  # relay requests (chat, responses) in progress
    #: Set on SIGTERM/SIGINT: relay requests are refused from then on (see :meth:`shut_down`).
    shutting_down: bool = False
    #: The drain scope of each relay request that may reach an upstream (see :meth:`cut`).
    drains: set[trio.CancelScope] = field(default_factory=set)

    def shut_down(self) -> None:
        """Stop serving new relay requests: those still queued in admission are woken with a
        refusal (a 503 for their client), those that arrive from now on are refused at once;
        requests already admitted run on until :meth:`cut`."""
        self.shutting_down = True
        self.admission.refuse_waiting(SHUTDOWN_MESSAGE)

    def cut(self) -> int:
        """End every relay request still running, through its own nursery: each one's drain
        scope is cancelled, and the request ends its answer with an error in its protocol
        (``relay_shutdown``), is billed for what it produced and writes its usage record.
        Returns how many were cut."""
        for scope in self.drains:
            scope.cancel()
        return len(self.drains)

    def state(self) -> dict:
        """Live counters: what the admin endpoint shows and the leak tests check."""
        return {
            "active_requests": self.active_requests,
            "admission": self.admission.status(),
            "accounts": self.scheduler.status(),
            "sessions": {
                "bound": len(self.scheduler.sessions),
                "rebinds": self.scheduler.sessions.rebinds,
            },
            "usage_records": {"written": self.usage.written, "queued": self.usage.queued},
            "credits": self.credits.status(),
        }


@asynccontextmanager
async def open_runtime(config: Config) -> AsyncIterator[Runtime]:
    """Open the runtime; on exit, stop taking usage records and write every queued one."""
    store = Store(config.server.database)
    keys = KeyRing(store)
    keys.load()
    credits = Credits(PriceTable(config.prices), keys.records())
    metrics = Metrics(config)
    # Priced and debited first, then counted (the metrics read the cost).
    usage = UsageWriter(store, observers=[credits.charge, metrics.observe])
    upstream = UpstreamClient(config.server, config.accounts)
    admission = Admission(config)
    runtime = Runtime(
        config=config,
        store=store,
        keys=keys,
        credits=credits,
        metrics=metrics,
        usage=usage,
        admission=admission,
        scheduler=Scheduler(config),
        catalog=Catalog(config),
        upstream=upstream,
        health=Health(config.server),
        started_at=time.time(),
    )
    log_missing_credentials(config)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(usage.run)
            # Tasks that run for as long as the relay serves; the usage writer outlives them
            # to drain what is queued.
            async with trio.open_nursery() as background:
                background.start_soon(keys.refresh_forever)
                background.start_soon(admission.run)
                try:
                    yield runtime
                finally:
                    background.cancel_scope.cancel()
                    usage.close()
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
        store.close()


Handler = Callable[[Runtime, Request, Responder], Awaitable[None]]


class RelayApp:
    """The ASGI application: routes, request ids, and error rendering."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.web = Web()
        self._routes: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        for base in BASE_PATHS:
            self._add(base + "/chat/completions", "POST", _chat)
            self._add(base + "/responses", "POST", _responses)
            self._add(base + "/models", "GET", _list_models)
            self._add(base + "/models/{model}", "GET", _get_model)
            self._add(base, "GET", _health)
            for path, handler in selfservice.ROUTES:
                self._add(base + path, "GET", handler)
        for path, handler in selfservice.ROOT_ROUTES:
            self._add(path, "GET", handler)
        # The Codex CLI appends "/responses" to a base URL given without "/v1".
        self._add("/openai/responses", "POST", _responses)
        self._add("/openai", "GET", _health)
        self._add("/healthz", "GET", _health)
        self._add("/", "GET", self._index)
        self._add("/workbench", "GET", self.web.page)
        self._add("/web/{name}", "GET", self.web.asset)
        self._add("/metrics", "GET", serve_metrics)
        for method, path, handler in admin.ROUTES:
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
                "/v1/chat/completions, /v1/responses and /v1/models (also under /openai/v1, "
                "/codex/v1 and /api/v1); the key workbench page is at /workbench.",
                code="unknown_url",
            )
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
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
            await _index(runtime, request, responder)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            started = trio.current_time()
            request_id = await _refuse_websocket(receive, send)
            now = trio.current_time()
            log_access({
                "request_id": request_id, "key_id": "", "method": "GET",
                "path": scope.get("path", ""), "status": 426, "error": "websocket_not_supported",
                "ttfb_ms": (now - started) * 1000, "duration_ms": (now - started) * 1000,
            })
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = trio.current_time()
        request_id = "req_" + uuid.uuid4().hex
        responder = Responder(send, request_id)
        try:
            request = Request(
                scope, receive, request_id, self.runtime.config.server.body_read_timeout_s
            )
        except RelayError as error:  # headers the relay cannot trust (see Request)
            await responder.error(error)
            log_request_end(scope, request_id, None, responder, error.code or error.type, started)
            return
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


async def _refuse_websocket(receive: Receive, send: Send) -> str:
    """426 for a WebSocket upgrade: the Codex CLI then falls back to HTTP for the session.
    Returns the answer's request id."""
    request_id = "req_" + uuid.uuid4().hex
    await receive()  # websocket.connect
    body = RelayError(
        "This relay serves the Responses API over HTTP (server-sent events), not WebSocket.",
        status=426,
        type="invalid_request_error",
        code="websocket_not_supported",
    ).to_json()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 426,
            "headers": [
                (b"content-type", b"application/json"),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    return request_id


async def _chat(runtime: Runtime, request: Request, responder: Responder) -> None:
    await relay_routes.handle(runtime, request, responder, Endpoint.CHAT)


async def _responses(runtime: Runtime, request: Request, responder: Responder) -> None:
    await relay_routes.handle(runtime, request, responder, Endpoint.RESPONSES)


async def _health(runtime: Runtime, request: Request, responder: Responder) -> None:
    await responder.json(200, {"status": "ok", "object": "relay"})


async def _index(runtime: Runtime, request: Request, responder: Responder) -> None:
    await responder.json(
        200,
        {
            "object": "relay",
            "status": "ok",
            "base_urls": [*BASE_PATHS, "/openai (Codex: appends /responses)"],
            "workbench": "/workbench",
        },
    )


async def _package_of(runtime: Runtime, request: Request):
    key = await runtime.keys.authenticate(request.headers)
    request.key_id = key.id  # for the access log
    package = runtime.config.packages.get(key.package)
    if package is None:
        raise PermissionDenied(
            f"Your key belongs to package '{key.package}', which this relay no longer offers.",
            code="package_not_found",
        )
    return package


def _model_object(runtime: Runtime, model: str) -> dict:
    return {
        "id": model,
        "object": "model",
        "created": int(runtime.started_at),
        "owned_by": "relay",
    }


async def _list_models(runtime: Runtime, request: Request, responder: Responder) -> None:
    package = await _package_of(runtime, request)
    models = runtime.catalog.models_for(package)
    await responder.json(
        200, {"object": "list", "data": [_model_object(runtime, m) for m in models]}
    )


async def _get_model(runtime: Runtime, request: Request, responder: Responder) -> None:
    package = await _package_of(runtime, request)
    model = request.params["model"]
    if model not in runtime.catalog.models_for(package):
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
        )
    await responder.json(200, _model_object(runtime, model))
