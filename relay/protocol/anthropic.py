"""Anthropic Messages as an upstream: request writer and answer decoder (protocols.md §5.1).

Decisions where the mapping leaves a choice:

* Only the *leading* system messages become the top-level ``system``; a system or developer
  message later in the conversation becomes user text in place (Messages has no mid-conversation
  system role, and moving it to the top would change what it refers to).
* ``max_tokens`` is required: without a client cap it is :data:`DEFAULT_MAX_TOKENS`, or the
  thinking budget plus :data:`THINKING_ANSWER_TOKENS` when thinking is on.
* Reasoning effort becomes ``thinking: {type: enabled, budget_tokens}`` from
  :data:`THINKING_BUDGETS`. Thinking is left off when the request cannot carry it: a forced tool
  choice (Anthropic refuses both together), a client cap too small for the minimum budget, or a
  tool loop whose last assistant turn lacks its signed thinking block (Anthropic requires it,
  and it is lost when the client did not give back its ``reasoning_content``).
* A signed thinking block is replayed from the reasoning the client gives back: for Chat
  clients the text is the assistant message's ``reasoning_content`` and the signature rides in
  the first tool-call id of the turn; for Responses clients both ride in the reasoning item's
  ``encrypted_content`` (see :mod:`.events`). ``redacted_thinking`` blocks are not replayed.
* ``response_format`` has no equivalent: the JSON schema is added to the system prompt as an
  instruction.
* Sampling: ``temperature`` is clamped to Anthropic's 0–1; with thinking on, ``temperature`` and
  ``top_p`` are not sent (Anthropic requires their defaults).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import InvalidRequest
from .conversation import (
    CUSTOM_TOOL_SCHEMA,
    Conversation,
    File,
    Image,
    Reasoning,
    Text,
    Tool,
    ToolCall,
    ToolResult,
    arrange_tool_results,
    custom_tool_description,
    data_url_media_type,
    data_url_payload,
    merge_roles,
)
from .events import (
    Event,
    Failure,
    Finish,
    ReasoningDelta,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    UsageEvent,
)
from .sse import Usage

ANTHROPIC_VERSION = "2023-06-01"

#: ``max_tokens`` when the client sets no cap: the output limit of every current Claude model
#: since 3.5 is at least this.
DEFAULT_MAX_TOKENS = 8192
#: Room left for the answer above the thinking budget when the relay picks ``max_tokens``.
THINKING_ANSWER_TOKENS = 4096
#: ``budget_tokens`` per reasoning effort (1024 is Anthropic's minimum).
THINKING_BUDGETS = {
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 24576,
    "max": 28672,
}
MIN_THINKING_BUDGET = 1024

_TOOL_ID = re.compile(r"[^a-zA-Z0-9_-]")


def anthropic_id(call_id: str) -> str:
    """A call id in the alphabet Anthropic accepts for ``tool_use`` ids (applied to calls and
    results alike, so they keep matching)."""
    return _TOOL_ID.sub("_", call_id) or "toolu_relay"


# --------------------------------------------------------------------------------------------
# Request


def write_anthropic_request(
    conv: Conversation, *, model: str, reasoning_effort: str | None
) -> dict:
    system, rest = conv.split_system()
    messages = _messages(rest)
    body: dict[str, Any] = {"model": model}
    instruction = _format_instruction(conv.response_format)
    if instruction:
        system.append(instruction)
    if system:
        body["system"] = "\n\n".join(system)
    body["messages"] = messages
    forced = conv.tool_choice in ("required", "function") and bool(conv.tools)
    budget = _thinking_budget(reasoning_effort or conv.reasoning_effort)
    if budget and (forced or not _thinking_replayable(messages)):
        budget = None
    if conv.max_output_tokens:
        max_tokens = conv.max_output_tokens
        if budget:
            budget = min(budget, max_tokens - THINKING_ANSWER_TOKENS // 4)
            if budget < MIN_THINKING_BUDGET:
                budget = None
    else:
        max_tokens = max(DEFAULT_MAX_TOKENS, (budget or 0) + THINKING_ANSWER_TOKENS)
    body["max_tokens"] = max_tokens
    if budget:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    else:
        # Thinking blocks in history are allowed without thinking on, but useless: drop them.
        for message in messages:
            if message["role"] == "assistant":
                message["content"] = [b for b in message["content"] if b["type"] != "thinking"]
        body["messages"] = [m for m in messages if m["content"]]
    if conv.tools:
        body["tools"] = [_tool(tool) for tool in conv.tools]
        choice = _tool_choice(conv)
        if choice:
            body["tool_choice"] = choice
    if conv.stop:
        body["stop_sequences"] = conv.stop
    if not budget:
        if conv.temperature is not None:
            body["temperature"] = min(max(conv.temperature, 0), 1)
        if conv.top_p is not None:
            body["top_p"] = conv.top_p
    if conv.user:
        body["metadata"] = {"user_id": conv.user}
    if conv.stream:
        body["stream"] = True
    return body


def _thinking_budget(effort: str | None) -> int | None:
    if not effort or effort == "none":
        return None
    return THINKING_BUDGETS.get(effort, THINKING_BUDGETS["medium"])


def _thinking_replayable(messages: list[dict]) -> bool:
    """Whether thinking may be on: in a tool loop, the last assistant turn must start with
    its signed thinking block."""
    last = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
    if last is None or not any(b["type"] == "tool_use" for b in last["content"]):
        return True
    return last["content"][0]["type"] == "thinking"


def _format_instruction(fmt: dict | None) -> str | None:
    if not fmt:
        return None
    if fmt["type"] == "json_schema":
        schema = json.dumps(fmt.get("schema") or {}, ensure_ascii=False)
        return (
            "Respond only with a JSON value that conforms to this JSON schema, with no other "
            f"text: {schema}"
        )
    return "Respond only with a valid JSON object, with no other text."


def _messages(messages: list) -> list[dict]:
    items: list[tuple[str, list]] = []
    for message in arrange_tool_results(messages):
        if message.role == "system":
            text = "\n\n".join(t for t in message.texts() if t)
            items.append(("user", [{"type": "text", "text": text}] if text else []))
        elif message.role == "user":
            items.append(("user", _blocks(message.parts)))
        elif message.role == "assistant":
            items.append(("assistant", _assistant_blocks(message.parts)))
        else:
            items.append(("user", [_tool_result(message.parts[0])]))
    merged = merge_roles(items)
    if merged and merged[0][0] != "user":
        # Messages must open with a user turn.
        merged.insert(0, ("user", [{"type": "text", "text": "(continued conversation)"}]))
    return [{"role": role, "content": content} for role, content in merged]


def _blocks(parts: list) -> list[dict]:
    blocks = []
    for part in parts:
        if isinstance(part, Text):
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        elif isinstance(part, Image):
            blocks.append(_image(part.url, part.file_id))
        elif isinstance(part, File):
            blocks.append(_document(part))
    return blocks


def _no_file_ids() -> InvalidRequest:
    return InvalidRequest(
        "Files given by 'file_id' are stored at OpenAI and cannot be sent to this model's "
        "upstream; send the file inline as base64 data.",
        param="file_id",
    )


def _image(url: str | None, file_id: str | None) -> dict:
    if not url:
        raise _no_file_ids()
    if url.startswith("data:"):
        source = {
            "type": "base64",
            "media_type": data_url_media_type(url) or "image/png",
            "data": data_url_payload(url),
        }
    else:
        source = {"type": "url", "url": url}
    return {"type": "image", "source": source}


def _document(part: File) -> dict:
    if part.file_id and not (part.data or part.url):
        raise _no_file_ids()
    media = part.media_type
    if media.startswith("image/"):
        if part.data:
            return _image(f"data:{media};base64,{part.base64}", None)
        return _image(part.url, None)
    if part.data:
        source = {"type": "base64", "media_type": "application/pdf", "data": part.base64}
    else:
        source = {"type": "url", "url": part.url}
    block: dict[str, Any] = {"type": "document", "source": source}
    if part.filename:
        block["title"] = part.filename
    return block


def _assistant_blocks(parts: list) -> list[dict]:
    blocks = []
    for part in parts:
        if isinstance(part, Reasoning):
            if part.kind == "anthropic" and part.signature and part.text:
                blocks.append(
                    {"type": "thinking", "thinking": part.text, "signature": part.signature}
                )
        elif isinstance(part, Text):
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        elif isinstance(part, ToolCall):
            blocks.append(
                {
                    "type": "tool_use",
                    "id": anthropic_id(part.call_id),
                    "name": part.name,
                    "input": tool_input(part),
                }
            )
    return blocks


def tool_input(call: ToolCall) -> dict:
    """A call's arguments as the JSON object Anthropic and Gemini take."""
    if call.custom:
        return {"input": call.arguments}
    if not call.arguments.strip():
        return {}
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return {"input": call.arguments}
    return value if isinstance(value, dict) else {"input": value}


def _tool_result(result: ToolResult) -> dict:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": anthropic_id(result.call_id)}
    if isinstance(result.content, str):
        if result.content:
            block["content"] = result.content
    else:
        content = _blocks(result.content)
        if content:
            block["content"] = content
    if result.is_error:
        block["is_error"] = True
    return block


def _tool(tool: Tool) -> dict:
    if tool.custom:
        return {
            "name": tool.name,
            "description": custom_tool_description(tool),
            "input_schema": CUSTOM_TOOL_SCHEMA,
        }
    out: dict[str, Any] = {"name": tool.name}
    if tool.description:
        out["description"] = tool.description
    schema = tool.parameters or {}
    if schema.get("type") != "object":
        schema = {"properties": {}, **schema, "type": "object"}
    out["input_schema"] = schema
    return out


def _tool_choice(conv: Conversation) -> dict | None:
    choice: dict[str, Any] | None
    if conv.tool_choice == "required":
        choice = {"type": "any"}
    elif conv.tool_choice == "none":
        choice = {"type": "none"}
    elif conv.tool_choice == "function":
        choice = {"type": "tool", "name": conv.tool_choice_name}
    elif conv.tool_choice == "auto" or conv.parallel_tool_calls is False:
        choice = {"type": "auto"}
    else:
        choice = None
    if choice is not None and conv.parallel_tool_calls is False and choice["type"] != "none":
        choice["disable_parallel_tool_use"] = True
    return choice


# --------------------------------------------------------------------------------------------
# Answer

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "sensitive": "content_filter",
}

#: Anthropic error types → the codes OpenAI clients (and Codex, §2.6) act on.
ERROR_CODES = {
    "overloaded_error": "server_is_overloaded",
    "rate_limit_error": "rate_limit_exceeded",
    "api_error": "server_error",
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "invalid_api_key",
    "permission_error": "permission_denied",
    "not_found_error": "not_found",
    "request_too_large": "request_too_large",
}


def anthropic_usage(usage: dict) -> Usage:
    """Anthropic usage in the relay's vocabulary (§5.1): input counts cache reads and writes,
    which are also kept apart (cached, cache write)."""
    return Usage.from_messages(usage)


class AnthropicDecoder:
    """Messages stream events (or a message body) → events."""

    def __init__(self) -> None:
        self.finished = False
        self._usage: dict[str, int] = {}
        self._blocks: dict[int, int] = {}  # content block index → our call index
        self._arguments: dict[int, list[str]] = {}
        self._stop_reason: str | None = None
        self._ended = False

    def _merge_usage(self, usage: Any) -> None:
        # Some Anthropic-compatible gateways report input only in message_delta: keep the
        # largest value seen for each counter.
        if not isinstance(usage, dict):
            return
        for name, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool):
                self._usage[name] = max(value, self._usage.get(name, 0))

    def feed(self, name: str | None, data: Any) -> list[Event]:
        if not isinstance(data, dict):
            return []
        kind = data.get("type") or name
        events: list[Event] = []
        if kind == "message_start":
            message = data.get("message") or {}
            self._merge_usage(message.get("usage"))
            events.append(Start(message.get("id"), message.get("model")))
        elif kind == "content_block_start":
            self._block_start(data.get("index"), data.get("content_block") or {}, events)
        elif kind == "content_block_delta":
            self._block_delta(data.get("index"), data.get("delta") or {}, events)
        elif kind == "content_block_stop":
            call = self._blocks.pop(data.get("index"), None)
            if call is not None:
                events.append(ToolCallEnd(call, "".join(self._arguments[call]) or "{}"))
        elif kind == "message_delta":
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                self._stop_reason = reason
            self._merge_usage(data.get("usage"))
        elif kind == "message_stop":
            self.finished = True
            events.extend(self.end())
        elif kind == "error":
            self.finished = True
            self._ended = True
            error = data.get("error") or {}
            events.append(
                Failure(
                    str(error.get("message") or "upstream error"),
                    ERROR_CODES.get(error.get("type"), "server_error"),
                )
            )
        return events

    def _block_start(self, index: Any, block: dict, events: list[Event]) -> None:
        kind = block.get("type")
        if kind == "tool_use":
            call = len(self._arguments)
            self._blocks[index] = call
            self._arguments[call] = []
            events.append(
                ToolCallStart(call, str(block.get("id") or f"toolu_{call}"), str(block["name"]))
            )
            if block.get("input"):  # a non-streamed body, or a gateway sending it whole
                arguments = json.dumps(block["input"], ensure_ascii=False)
                self._arguments[call].append(arguments)
                events.append(ToolCallDelta(call, arguments))
        elif kind == "text" and block.get("text"):
            events.append(TextDelta(block["text"]))
        elif kind == "thinking" and (block.get("thinking") or block.get("signature")):
            events.append(ReasoningDelta(block.get("thinking") or "", block.get("signature")))

    def _block_delta(self, index: Any, delta: dict, events: list[Event]) -> None:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            events.append(TextDelta(delta["text"]))
        elif kind == "thinking_delta" and delta.get("thinking"):
            events.append(ReasoningDelta(delta["thinking"]))
        elif kind == "signature_delta" and delta.get("signature"):
            events.append(ReasoningDelta("", delta["signature"]))
        elif kind == "input_json_delta" and delta.get("partial_json"):
            call = self._blocks.get(index)
            if call is not None:
                self._arguments[call].append(delta["partial_json"])
                events.append(ToolCallDelta(call, delta["partial_json"]))

    def end(self) -> list[Event]:
        if self._ended:
            return []
        self._ended = True
        events: list[Event] = []
        for index in sorted(self._blocks):
            call = self._blocks[index]
            events.append(ToolCallEnd(call, "".join(self._arguments[call]) or "{}"))
        self._blocks.clear()
        if self._usage:
            events.append(UsageEvent(anthropic_usage(self._usage)))
        reason = _FINISH.get(self._stop_reason or "end_turn", "stop")
        if reason == "stop" and self._arguments:
            reason = "tool_calls"
        events.append(Finish(reason))
        return events

    def decode_body(self, body: dict) -> list[Event]:
        events: list[Event] = [Start(body.get("id"), body.get("model"))]
        self._merge_usage(body.get("usage"))
        for index, block in enumerate(body.get("content") or []):
            if not isinstance(block, dict):
                continue
            self._block_start(index, block, events)
            call = self._blocks.pop(index, None)
            if call is not None:
                events.append(ToolCallEnd(call, "".join(self._arguments[call]) or "{}"))
        self._stop_reason = body.get("stop_reason")
        self.finished = True
        events.extend(self.end())
        return events
