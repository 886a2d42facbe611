"""Anthropic Messages (``POST /v1/messages``) wire shapes for the simulated upstream (§5.1).

Pure functions over a :class:`~relay.testing.sim_protocol.Plan` (kind ``anthropic``), like the
OpenAI builders in :mod:`relay.testing.sim_protocol`:

- non-stream: the Message object, content blocks in wire order ``thinking`` (with ``signature``),
  ``text``, ``tool_use`` (``input`` is the parsed arguments object);
- stream: ``event: <type>`` + ``data:`` framing: ``message_start`` (usage with the input side and
  ``output_tokens: 0``), a ``ping``, per block ``content_block_start`` / ``…_delta`` /
  ``content_block_stop`` (``thinking_delta``×N then one ``signature_delta``; ``text_delta``;
  ``input_json_delta`` pieces), a ``ping`` after every :data:`PING_EVERY` token deltas,
  ``message_delta`` (``stop_reason`` and the cumulative ``output_tokens``), ``message_stop``.

Usage: every thinking/text/input-JSON delta is one output token; the signature is not a token.
``input_tokens`` is the prompt estimate minus the ``cached=`` tokens, reported as
``cache_read_input_tokens``, and minus the ``cache_write=`` tokens, reported as
``cache_creation_input_tokens`` (Anthropic counts both apart), so the three add up to the recorded
``usage["input_tokens"]``. With ``thinking.display: "omitted"`` (as Claude Code asks) a thinking
block comes with an empty ``thinking`` and its signature only, as the real API sends it; its tokens
are still output tokens.

Also here: ``POST /v1/messages/count_tokens`` (:func:`count_tokens`, the same prompt estimate)
and ``GET /v1/models`` in Anthropic's list shape (:func:`models_list`), answered when the request
carries ``anthropic-version``.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

from relay.testing import sim_protocol as sp
from relay.testing.sim_protocol import META, TOKEN, Plan, dumps

PING_EVERY = 32
"""A ``ping`` event goes out after ``message_start`` and then after every this many tokens."""
MIN_THINKING_BUDGET = 1024
BASE_MODELS = ("claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5")
"""Models the Anthropic ``/v1/models`` list always has (models seen in requests are added)."""
MODEL_CREATED_AT = "2026-01-01T00:00:00Z"
ROLES = ("user", "assistant", "system")
"""``messages[].role`` values the API takes: ``system`` is a mid-conversation system message
(platform.claude.com, "Mid-conversation system messages"), which Claude Code sends."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


# --------------------------------------------------------------------------------------------
# Errors and validation


def error_body(status: int, message: str) -> bytes:
    """Anthropic's error JSON: ``{"type":"error","error":{"type":…,"message":…}}``."""
    error_type = ERROR_TYPES.get(status, "api_error")
    return dumps({"type": "error", "error": {"type": error_type, "message": message}})


def fault_response(
    fault: str, model: str, credential: str = "", host: str = ""
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, extra headers and body for the HTTP-error faults, in Anthropic's shape."""
    if fault == "retry_forever":
        headers = [("retry-after", str(sp.RETRY_FOREVER_S))]
        return 429, headers, error_body(429, "Rate limited. Please try again later.")
    if fault == "leak_secret":
        return 500, [], error_body(500, sp.leak_message(credential, host))
    if fault == "429":
        message = (
            "This request would exceed the rate limit for your organization of 3 requests per "
            f"minute for {model or 'the model'}. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits. You can see the response headers for "
            "current usage. Please reduce the prompt length or the maximum tokens requested, or "
            "try again later."
        )
        headers = [
            ("retry-after", "2"),
            ("anthropic-ratelimit-requests-limit", "3"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "1970-01-01T00:00:02Z"),
        ]
        return 429, headers, error_body(429, message)
    if fault == "401":
        return 401, [], error_body(401, "invalid x-api-key")
    if fault == "400":
        return 400, [], error_body(400, "Invalid request (simulated fault).")
    if fault in ("503", "529"):
        return 529, [], error_body(529, "Overloaded")
    return 500, [], error_body(500, "Internal server error")


def validate(body: dict, *, count_tokens: bool = False) -> str | None:
    """The checks the real API makes that a relay must satisfy; the 400 message, or None.

    ``model``, ``max_tokens`` (not for ``count_tokens``) and a non-empty ``messages`` list are
    required; a role is ``user``, ``assistant`` or ``system``; a replayed ``thinking`` block
    must carry its ``signature`` (any non-empty string is accepted) and a ``redacted_thinking``
    block its ``data``; every ``tool_use`` of an assistant message must be answered by a
    ``tool_result`` at the start of the next message, and every ``tool_result`` must answer a
    ``tool_use`` of the message before (platform.claude.com, "Handle tool calls"); with
    ``thinking.type == "enabled"``, ``budget_tokens`` must be ≥ 1024 and below ``max_tokens``.
    Everything else (``system`` blocks, ``cache_control`` anywhere, ``output_config``,
    ``context_management``, ``metadata``, ``tool_choice``, ``top_k``, images, documents) is
    taken as sent.
    """
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if count_tokens:
        max_tokens = None
    elif max_tokens is None:
        return "max_tokens: Field required"
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Input should be a valid integer greater than or equal to 1"
    messages = body.get("messages")
    if not isinstance(messages, list):
        return "messages: Field required"
    if not messages:
        return "messages: at least one message is required"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages.{i}.role: Input should be 'user', 'assistant' or 'system'"
        problem = _check_blocks(i, message.get("content"))
        if problem is None:
            following = messages[i + 1] if i + 1 < len(messages) else None
            problem = _check_tool_pairing(i, message, following, messages[i - 1] if i else None)
        if problem is not None:
            return problem
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool):
            return "thinking.enabled.budget_tokens: Field required"
        if budget < MIN_THINKING_BUDGET:
            return (
                "thinking.enabled.budget_tokens: Input should be greater than or equal to "
                f"{MIN_THINKING_BUDGET}"
            )
        if max_tokens is not None and budget >= max_tokens:
            return (
                "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our "
                "documentation at https://docs.claude.com/en/docs/build-with-claude/"
                "extended-thinking#max-tokens-and-context-window-size"
            )
    return None


def _check_blocks(i: int, content: Any) -> str | None:
    """Replayed thinking must keep what makes it verifiable: a signature, or the redacted data."""
    if not isinstance(content, list):
        return None
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "thinking" and not _non_empty(block.get("signature")):
            return f"messages.{i}.content.{j}.thinking.signature: Field required"
        if kind == "redacted_thinking" and not _non_empty(block.get("data")):
            return f"messages.{i}.content.{j}.redacted_thinking.data: Field required"
    return None


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _blocks(message: Any, kind: str) -> list[dict]:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return []
    return [b for b in content if isinstance(b, dict) and b.get("type") == kind]


def _check_tool_pairing(i: int, message: dict, following: Any, previous: Any) -> str | None:
    """Anthropic's two tool-loop errors, worded as the API words them.

    An assistant ``tool_use`` needs a ``tool_result`` for its id among the leading blocks of the
    next message (checked when a next message exists: a conversation may end on the call); a
    ``tool_result`` needs a ``tool_use`` with its id in the message before.
    """
    if message.get("role") == "assistant" and following is not None:
        ids = [b.get("id") for b in _blocks(message, "tool_use")]
        answered = set()
        content = following.get("content") if isinstance(following, dict) else None
        if isinstance(following, dict) and following.get("role") == "user":
            for block in content if isinstance(content, list) else []:
                if not (isinstance(block, dict) and block.get("type") == "tool_result"):
                    break  # results must come first; text may follow them
                answered.add(block.get("tool_use_id"))
        missing = [str(tool_id) for tool_id in ids if tool_id not in answered]
        if missing:
            return (
                f"messages.{i + 1}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(missing)}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message."
            )
    if message.get("role") == "user":
        asked = {b.get("id") for b in _blocks(previous, "tool_use")}
        for j, block in enumerate(message.get("content") or []):
            if not (isinstance(block, dict) and block.get("type") == "tool_result"):
                continue
            if block.get("tool_use_id") not in asked:
                return (
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                    f"blocks: {block.get('tool_use_id')}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
    return None


# --------------------------------------------------------------------------------------------
# Response


def tool_use_id(plan: Plan) -> str:
    return "toolu_" + plan.uid


def signature(plan: Plan) -> str:
    """The thinking block's opaque signature (base64, like the real one)."""
    return base64.b64encode(b"sim-thinking-signature:" + plan.uid.encode()).decode()


def stop_reason(plan: Plan) -> str:
    if plan.truncated:
        return "max_tokens"
    return "tool_use" if plan.has_tool_call else "end_turn"


def usage(plan: Plan) -> dict:
    return {
        "input_tokens": plan.reported_input - plan.cached_tokens - plan.cache_write_tokens,
        "cache_creation_input_tokens": plan.cache_write_tokens,
        "cache_read_input_tokens": plan.cached_tokens,
        "output_tokens": plan.reported_output,
    }


def _tool_input(plan: Plan) -> Any:
    """The tool_use ``input`` object (``{}`` if max_tokens cut the JSON short)."""
    try:
        value = json.loads("".join(plan.tool_args))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def thinking_omitted(plan: Plan) -> bool:
    """Whether the request asked for the thinking text to be left out (``display: "omitted"``)."""
    thinking = plan.body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("display") == "omitted"


def _thinking_block(plan: Plan) -> dict:
    text = "" if thinking_omitted(plan) else "".join(plan.reasoning)
    return {"type": "thinking", "thinking": text, "signature": signature(plan)}


def _tool_use_block(plan: Plan, tool_input: Any) -> dict:
    return {
        "type": "tool_use",
        "id": tool_use_id(plan),
        "name": plan.tool_name,
        "input": tool_input,
    }


def _message(plan: Plan, content: list, stop: str | None, usage_: dict) -> dict:
    return {
        "id": plan.id,
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage_,
    }


def message(plan: Plan) -> dict:
    """The non-stream Message object."""
    content: list[dict] = []
    if plan.reasoning:
        content.append(_thinking_block(plan))
    if plan.text:
        content.append({"type": "text", "text": "".join(plan.text)})
    if plan.has_tool_call:
        content.append(_tool_use_block(plan, _tool_input(plan)))
    return _message(plan, content, stop_reason(plan), usage(plan))


def _event(type_: str, payload: dict) -> bytes:
    return b"event: " + type_.encode() + b"\ndata: " + dumps({"type": type_, **payload}) + b"\n\n"


_PING = _event("ping", {})


def stream_events(plan: Plan) -> Iterator[tuple[bytes, bool]]:
    """``(sse_bytes, is_token)`` for each event of a Messages stream."""
    start_usage = {**usage(plan), "output_tokens": 0}
    yield _event("message_start", {"message": _message(plan, [], None, start_usage)}), META
    yield _PING, META
    tokens = 0

    def deltas(
        index: int, kind: str, field: str, pieces: list[str]
    ) -> Iterator[tuple[bytes, bool]]:
        nonlocal tokens
        for piece in pieces:
            delta = {"index": index, "delta": {"type": kind, field: piece}}
            yield _event("content_block_delta", delta), TOKEN
            tokens += 1
            if tokens % PING_EVERY == 0:
                yield _PING, META

    def start(index: int, block: dict) -> bytes:
        return _event("content_block_start", {"index": index, "content_block": block})

    def stop(index: int) -> bytes:
        return _event("content_block_stop", {"index": index})

    index = 0
    if plan.reasoning:
        yield start(index, {"type": "thinking", "thinking": "", "signature": ""}), META
        if not thinking_omitted(plan):
            yield from deltas(index, "thinking_delta", "thinking", plan.reasoning)
        sig = {"index": index, "delta": {"type": "signature_delta", "signature": signature(plan)}}
        yield _event("content_block_delta", sig), META
        yield stop(index), META
        index += 1
    if plan.text:
        yield start(index, {"type": "text", "text": ""}), META
        yield from deltas(index, "text_delta", "text", plan.text)
        yield stop(index), META
        index += 1
    if plan.has_tool_call:
        yield start(index, _tool_use_block(plan, {})), META
        yield from deltas(index, "input_json_delta", "partial_json", plan.tool_args)
        yield stop(index), META
    final = {
        "delta": {"stop_reason": stop_reason(plan), "stop_sequence": None},
        "usage": {"output_tokens": plan.reported_output},
    }
    yield _event("message_delta", final), META
    yield _event("message_stop", {}), META


# --------------------------------------------------------------------------------------------
# Token counting and models


def count_tokens(body: dict) -> dict:
    """``POST /v1/messages/count_tokens``: the prompt estimate the Messages usage reports."""
    return {"input_tokens": sp.estimate_input_tokens("anthropic", body)}


def model_object(model: str) -> dict:
    """One model in Anthropic's shape (``display_name`` made from the id)."""
    words = model.removeprefix("claude-").split("-")
    version = ".".join(w for w in words if w.isdigit() and len(w) < 3)
    names = [w.capitalize() for w in words if not w.isdigit()]
    display = " ".join(["Claude", *names, *([version] if version else [])])
    return {"type": "model", "id": model, "display_name": display, "created_at": MODEL_CREATED_AT}


def models_list(models: list[str], query: str = "") -> dict:
    """Anthropic's ``/v1/models`` page: ``limit`` (default 20) and ``after_id`` are honoured."""
    params = urllib.parse.parse_qs(query)
    try:
        limit = min(max(int(params.get("limit", ["20"])[-1]), 1), 1000)
    except ValueError:
        limit = 20
    after = params.get("after_id", [""])[-1]
    if after in models:
        models = models[models.index(after) + 1 :]
    page = [model_object(m) for m in models[:limit]]
    return {
        "data": page,
        "has_more": len(models) > limit,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
