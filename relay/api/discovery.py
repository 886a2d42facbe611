"""What a client asks to find out what the relay serves: health, the index, the models.

``GET {base}`` / ``/healthz`` (health), ``GET /`` for anything but a browser (the relay's
self-description: its base paths and the workbench), ``GET {base}/models`` and
``GET {base}/models/{model}`` in OpenAI's list and object shapes, with the models of the key's
package only (a model the key cannot use is 404 ``model_not_found``, as OpenAI answers it). The
list holds model ids, never a pattern alias; retrieving an id a pattern maps answers 200, as
calling it would.
"""

from __future__ import annotations

from ..config import PackageConfig
from ..errors import ModelNotFound, PermissionDenied
from ..runtime import Runtime
from .http import Request, Responder

#: Every path prefix clients are told to use (seed documents): OpenAI-style, Codex relays,
#: multi-model gateways.
BASE_PATHS = ("/openai/v1", "/v1", "/codex/v1", "/api/v1")


async def health(runtime: Runtime, request: Request, responder: Responder) -> None:
    await responder.json(200, {"status": "ok", "object": "relay"})


async def index(runtime: Runtime, request: Request, responder: Responder) -> None:
    await responder.json(
        200,
        {
            "object": "relay",
            "status": "ok",
            "base_urls": [*BASE_PATHS, "/openai (Codex: appends /responses)"],
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


async def list_models(runtime: Runtime, request: Request, responder: Responder) -> None:
    package = await _package_of(runtime, request)
    models = runtime.catalog.models_for(package)
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
    await responder.json(200, _model_object(runtime, model))
