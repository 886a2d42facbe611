"""What a client asks to find out what the relay serves: health, the index, the models.

``GET {base}`` / ``/healthz`` (health), ``GET /`` for anything but a browser (the relay's
self-description: its base paths and the workbench), ``GET {base}/models`` and
``GET {base}/models/{model}`` in OpenAI's list and object shapes (Anthropic's for a request with
``anthropic-version``; Codex's ``{"models": [...]}`` with an ETag for the Codex CLI, which sends
``client_version``: :mod:`relay.protocol.codex_models`), with the models of the key's package
only (a model the key cannot use is 404 ``model_not_found``, as OpenAI answers it). The list
holds model ids, never a pattern alias; retrieving an id a pattern maps answers 200, as calling
it would.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ..config import PackageConfig
from ..errors import ModelNotFound, PermissionDenied
from ..protocol.codex_models import ListedModel, etag_matches, is_codex_client, models_body
from ..runtime import Runtime
from .http import Request, Responder

#: Every path prefix clients are told to use (seed documents): OpenAI-style, Codex relays,
#: multi-model gateways.
BASE_PATHS = ("/openai/v1", "/v1", "/codex/v1", "/api/v1")
#: The base path for Anthropic clients only (Messages, count_tokens, models):
#: ``ANTHROPIC_BASE_URL=http://relay/claude``.
ANTHROPIC_BASE = "/claude/v1"


async def health(runtime: Runtime, request: Request, responder: Responder) -> None:
    await responder.json(200, {"status": "ok", "object": "relay"})


async def index(runtime: Runtime, request: Request, responder: Responder) -> None:
    await responder.json(
        200,
        {
            "object": "relay",
            "status": "ok",
            "base_urls": [
                *BASE_PATHS,
                "/openai (Codex: appends /responses)",
                "/ or /claude (Anthropic clients: append /v1/messages)",
            ],
            "workbench": "/workbench",
        },
    )


async def _package_of(runtime: Runtime, request: Request) -> PackageConfig:
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


def _anthropic_model(runtime: Runtime, model: str) -> dict:
    created = datetime.fromtimestamp(int(runtime.started_at), UTC)
    return {
        "type": "model",
        "id": model,
        "display_name": model,
        "created_at": created.isoformat().replace("+00:00", "Z"),
    }


def _wants_anthropic(request: Request) -> bool:
    """Anthropic's shapes for its clients: they send ``anthropic-version`` (the SDKs always)."""
    return "anthropic-version" in request.headers


def _efforts_by_target(runtime: Runtime) -> dict[str, set[str]]:
    """The reasoning efforts the configured aliases fix, per model they map to."""
    efforts: dict[str, set[str]] = {}
    for alias in runtime.config.models.values():
        if alias.reasoning_effort is not None:
            efforts.setdefault(alias.target, set()).add(alias.reasoning_effort)
    return efforts


def codex_models(runtime: Runtime, package: PackageConfig) -> tuple[bytes, str]:
    """Codex's list of the package's models and its ETag (the one an ``x-models-etag``
    header on a ``/responses`` answer would carry to make Codex refresh its list)."""
    listed = []
    for model in runtime.catalog.models_for(package):
        route = runtime.catalog.resolve(package, model)
        listed.append(ListedModel(model, route.target, route.reasoning_effort))
    return models_body(listed, _efforts_by_target(runtime))


async def _codex_models(
    runtime: Runtime, request: Request, responder: Responder, package: PackageConfig
) -> None:
    """Codex's list, tagged; ``If-None-Match`` naming the current tag is a 304 with no body."""
    body, etag = codex_models(runtime, package)
    headers = {"etag": etag, "cache-control": "no-cache"}
    if etag_matches(request.headers.get("if-none-match", ""), etag):
        await responder.start(304, [(name.encode(), value.encode()) for name, value in
                                    headers.items()])
        await responder.end()
        return
    await responder.raw(200, body, headers=headers)


async def list_models(runtime: Runtime, request: Request, responder: Responder) -> None:
    """OpenAI's list; Anthropic's (``data``, ``has_more``, ``first_id``, ``last_id``; all
    models on one page) when the request carries ``anthropic-version``; Codex's when it is
    Codex's (``client_version`` in the query, or Codex's ``originator``)."""
    package = await _package_of(runtime, request)
    if is_codex_client(request.query_params(), request.headers):
        await _codex_models(runtime, request, responder, package)
        return
    models = runtime.catalog.models_for(package)
    if _wants_anthropic(request):
        await responder.json(
            200,
            {
                "data": [_anthropic_model(runtime, m) for m in models],
                "has_more": False,
                "first_id": models[0] if models else None,
                "last_id": models[-1] if models else None,
            },
        )
        return
    await responder.json(
        200, {"object": "list", "data": [_model_object(runtime, m) for m in models]}
    )


async def get_model(runtime: Runtime, request: Request, responder: Responder) -> None:
    package = await _package_of(runtime, request)
    model = request.params["model"]
    if not runtime.catalog.can_call(package, model):
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
        )
    if _wants_anthropic(request):
        await responder.json(200, _anthropic_model(runtime, model))
    else:
        await responder.json(200, _model_object(runtime, model))
