"""Responses state on the request's way through (README, "Responses state"), and the routes
that read it: ``GET``/``DELETE {base}/responses/{id}``, ``GET {base}/responses/{id}/input_items``.

A Responses request that names earlier turns (``previous_response_id``, ``item_reference``
items) has them looked up in the key's kept answers (:mod:`relay.ledger.responses_store`) by
:func:`prepare`, before any upstream is chosen; :meth:`.calls.Call.upstream_request` then
writes them out for each account as its kind needs (:func:`relay.protocol.state.expand`). Once
the answer is complete, :func:`keep` stores it, before its last bytes reach the client: a
client that continues the conversation at once (an agent's tool loop) finds it, on any process.
``store: false`` keeps nothing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from ..errors import NotFound
from ..protocol.state import (
    StoredResponse,
    conversation,
    input_items,
    keeps,
    listed_item,
    references,
)
from .http import Request, Responder

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .calls import Call

#: Statuses of an answer worth keeping: one that ended (a failed answer continues nothing).
_KEPT_STATUSES = ("completed", "incomplete")


async def prepare(call: Call) -> None:
    """Look up what the request's body refers to, and note whether its answer is kept (with
    the whole conversation it answers, which the body alone may not hold).

    A body that refers to earlier turns is estimated (for the guards and the credit hold) by
    the whole conversation the relay holds: that is what the upstream reads, whichever kind it
    is, though the body itself may be a few words."""
    client = call.client
    body = client.body
    previous_id, item_ids = references(body)
    whole = None
    if previous_id is not None or item_ids:
        call.found = await call.runtime.responses.find(call.request.key_id, previous_id, item_ids)
        whole = conversation(body, call.found)
        if whole is not None:
            chars = len(json.dumps(whole, ensure_ascii=False, separators=(",", ":")))
            added = max(0, chars - len(json.dumps(body.get("input"), ensure_ascii=False)))
            client.input_chars += added
            call.ticket = dataclasses.replace(
                call.ticket,
                estimated_tokens=client.estimated_tokens,
                input_tokens=client.estimated_input_tokens,
            )
    if keeps(body):
        call.keep_answer = True
        call.conversation = whole if call.found is not None else input_items(body)


async def keep(call: Call, response: dict | None, *, translated: bool) -> None:
    """Keep ``response``, the Response object the client is being given, if the request asked
    for it (``store`` not false) and it ended (completed or incomplete)."""
    if not call.keep_answer or not isinstance(response, dict):
        return
    if response.get("status") not in _KEPT_STATUSES or not isinstance(response.get("id"), str):
        return
    record = StoredResponse(response, call.conversation, translated=translated)
    call.conversation = None  # held for this only
    await call.runtime.responses.put(call.request.key_id, record)


async def get_response(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``GET {base}/responses/{response_id}``: a Response object the relay kept for the key."""
    record = await _record(runtime, request)
    await responder.json(200, record.response)


async def list_input_items(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``GET {base}/responses/{response_id}/input_items``: the conversation the response
    answered, in OpenAI's list shape (``order``: ``desc``, the default, or ``asc``; one page)."""
    record = await _record(runtime, request)
    items = [listed_item(item) for item in record.input or ()]
    if request.query_params().get("order", "desc") != "asc":
        items.reverse()
    ids = [item.get("id") for item in items]
    await responder.json(200, {
        "object": "list",
        "data": items,
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
        "has_more": False,
    })


async def delete_response(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``DELETE {base}/responses/{response_id}``: forget a kept response."""
    key = await runtime.keys.authenticate(request.headers)
    request.key_id = key.id
    response_id = request.params["response_id"]
    if not await runtime.responses.delete(key.id, response_id):
        raise _not_found(response_id)
    await responder.json(200, {"id": response_id, "object": "response", "deleted": True})


async def _record(runtime: Runtime, request: Request) -> StoredResponse:
    key = await runtime.keys.authenticate(request.headers)
    request.key_id = key.id
    response_id = request.params["response_id"]
    record = await runtime.responses.get(key.id, response_id)
    if record is None:
        raise _not_found(response_id)
    return record


def _not_found(response_id: str) -> NotFound:
    return NotFound(
        f"Response with id '{response_id}' not found. The relay keeps a key's responses for a "
        "limited time and number, and none sent with store=false.",
        code="response_not_found",
        param="response_id",
    )


#: The routes, under every base path (``relay/app.py``).
ROUTES = (
    ("GET", "/responses/{response_id}", get_response),
    ("DELETE", "/responses/{response_id}", delete_response),
    ("GET", "/responses/{response_id}/input_items", list_input_items),
)
