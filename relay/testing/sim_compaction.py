"""The simulated upstream's remote compaction, as OpenAI's Responses API serves it.

* ``POST /v1/responses/compact`` answers, not streamed, a ``response.compaction`` object: the
  request's user messages, then one ``compaction`` item;
* ``POST /v1/responses`` whose ``input`` ends with ``{"type": "compaction_trigger"}`` answers
  (streamed or not) with exactly one output item, a ``compaction`` item.

The item's ``encrypted_content`` is opaque (``gAAAA…``, like OpenAI's); a later request that
carries a compaction item whose content is not of that form is refused with 400
``invalid_encrypted_content``, as OpenAI refuses content it did not encrypt: so a relay that
sent its own compaction token to an OpenAI upstream would be caught. The compaction's output
tokens are the plan's text tokens (``#sim tokens=N`` steers them); usage is reported as usual.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from relay.testing import sim_protocol as sp

#: How the simulated upstream's encrypted content begins (OpenAI's Fernet tokens do too).
OWN_PREFIX = "gAAAA"


def form(route_compact: bool, body: dict) -> str | None:
    """``"v1"`` on the compact route, ``"v2"`` for an input ending with the trigger."""
    if route_compact:
        return "v1"
    items = body.get("input")
    if isinstance(items, list) and items and isinstance(items[-1], dict):
        if items[-1].get("type") == "compaction_trigger":
            return "v2"
    return None


def foreign_item(body: dict) -> str | None:
    """The ``param`` of the first compaction item whose content this upstream did not make."""
    items = body.get("input")
    for index, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("type") in ("compaction", "compaction_summary"):
            content = item.get("encrypted_content")
            if not (isinstance(content, str) and content.startswith(OWN_PREFIX)):
                return f"input[{index}].encrypted_content"
    return None


def foreign_error(param: str) -> bytes:
    return sp.error_body(
        f"The encrypted content for item {param} could not be verified. Reason: Encrypted "
        "content could not be decrypted or parsed.",
        "invalid_request_error",
        "invalid_encrypted_content",
        param,
    )


def item(plan: sp.Plan) -> dict:
    return {
        "id": "cmp_" + plan.uid,
        "type": "compaction",
        "encrypted_content": f"{OWN_PREFIX}C{plan.uid}=simcompact",
    }


def _user_messages(body: dict) -> list[dict]:
    items = body.get("input")
    if isinstance(items, str):
        text = {"type": "input_text", "text": items}
        return [{"type": "message", "role": "user", "content": [text]}]
    return [
        i
        for i in (items if isinstance(items, list) else [])
        if isinstance(i, dict) and i.get("role") == "user"
    ]


def compacted_response(plan: sp.Plan) -> dict:
    """The v1 answer (openai-python ``CompactedResponse``)."""
    return {
        "id": plan.id,
        "object": "response.compaction",
        "created_at": plan.created,
        "output": [*_user_messages(plan.body), item(plan)],
        "usage": sp.responses_usage(plan),
    }


def final_response(plan: sp.Plan) -> dict:
    """The finished Response object of a v2 compaction: one compaction item."""
    return sp.response_object(plan, "completed", [item(plan)], sp.responses_usage(plan))


def nonstream_body(plan: sp.Plan) -> dict:
    return compacted_response(plan) if plan.compaction == "v1" else final_response(plan)


def stream(plan: sp.Plan) -> Iterator[tuple[bytes, bool]]:
    """The SSE events of a v2 compaction."""
    seq = 0

    def event(type_: str, fields: dict[str, Any]) -> bytes:
        nonlocal seq
        payload = {"type": type_, "sequence_number": seq, **fields}
        seq += 1
        return b"event: " + type_.encode() + b"\ndata: " + sp.dumps(payload) + b"\n\n"

    in_progress = sp.response_object(plan, "in_progress", [], None)
    yield event("response.created", {"response": in_progress}), sp.META
    yield event("response.in_progress", {"response": in_progress}), sp.META
    done = item(plan)
    added = {key: value for key, value in done.items() if key != "encrypted_content"}
    yield event("response.output_item.added", {"output_index": 0, "item": added}), sp.TOKEN
    yield event("response.output_item.done", {"output_index": 0, "item": done}), sp.META
    final = final_response(plan)
    final["completed_at"] = int(time.time())
    yield event("response.completed", {"response": final}), sp.META
