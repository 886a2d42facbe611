"""Anthropic Messages as a *client* protocol (Claude Code, the anthropic SDKs): the request
reader and the answer encoder (protocols.md §5.4).

The upstream side of Anthropic lives in :mod:`.anthropic`; this module is the other end: a
``POST /v1/messages`` body becomes a :class:`~.conversation.Conversation` for any upstream kind
(:func:`read_messages_request`), and the events of any upstream's answer become Anthropic's
stream or Message object (:class:`MessagesEncoder`). An ``anthropic`` upstream gets neither:
its bytes pass through (:mod:`.translate`).

What a translated upstream cannot take is dropped on purpose, never refused:

* ``cache_control`` (OpenAI, DeepSeek and Gemini cache by prefix on their own),
  ``context_management``, ``top_k``, ``metadata`` (its ``user_id`` is a session key for the
  relay, see :func:`.requests.session_key`), ``service_tier``, ``container`` and ``mcp_servers``;
* server tools (``web_search_…``, ``bash_…``, ``text_editor_…``: a tool with a ``type`` and no
  ``input_schema``), which only Anthropic runs;
* ``redacted_thinking`` blocks, which only Anthropic can read.

Thinking maps to reasoning effort: ``budget_tokens`` by :data:`BUDGET_EFFORTS`, ``adaptive``
by ``output_config.effort`` (``medium`` when it says none), ``max`` effort to ``xhigh``.

Reasoning round-trips through the client: a thinking block the relay encodes from a non-Anthropic
upstream carries, in its ``signature``, the reasoning text, the upstream's own state (a Responses
reasoning item's ``encrypted_content``) and the upstream kind (:func:`.events.encode_reasoning`).
Claude Code returns thinking blocks unchanged, so the next turn gives the upstream back the same
reasoning item. A signature that is not the relay's is Anthropic's own.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidRequest, RelayError, UpstreamError
from .anthropic_errors import ERROR_TYPES, failure_event
from .anthropic_errors import error_event as _error_event
from .conversation import (
    FILE_TYPES_MESSAGE,
    Conversation,
    File,
    Image,
    Message,
    Reasoning,
    Text,
    Tool,
    ToolCall,
    ToolResult,
    check_file,
    check_image_url,
)
from .events import (
    Event,
    Failure,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    TranslationContext,
    UsageEvent,
    call_id_with_signature,
    decode_reasoning,
    encode_reasoning,
    split_call_id,
)
from .sse import Usage, json_data

#: ``thinking.budget_tokens`` → reasoning effort: the first bound the budget is under.
BUDGET_EFFORTS = ((2048, "low"), (12288, "medium"), (28672, "high"))

#: ``output_config.effort`` → the OpenAI reasoning effort of the same name, ``max`` → ``xhigh``.
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "xhigh", "xhigh": "xhigh"}

#: Chat finish reason → Anthropic ``stop_reason``.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}

PING = b'event: ping\ndata: {"type":"ping"}\n\n'


# --------------------------------------------------------------------------------------------
# Errors


def anthropic_error(error: RelayError, request_id: str | None = None) -> tuple[int, dict]:
    """``error`` as (status, body) in Anthropic's shape:
    ``{"type": "error", "error": {"type", "message"}, "request_id"}``.

    The status is the relay's, except that an overloaded upstream (Anthropic's 529, an OpenAI
    or Gemini 503) is a 529, the status the anthropic SDKs and Claude Code retry as
    "overloaded". The relay's own 503s (no healthy account, shutting down) stay 503s.
    Anthropic's shape has no code field: the relay's own code (``concurrency_limit_exceeded``,
    ``key_expired`` …) ends the message, in brackets.
    """
    status = error.status
    if isinstance(error, UpstreamError) and (status == 503 or error.upstream_status == 529):
        status = 529
    kind = ERROR_TYPES.get(status)
    if kind is None:
        kind = "api_error" if status >= 500 else "invalid_request_error"
    message = error.message
    if error.code and error.code not in message:
        message = f"{message} [{error.code}]"
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return status, body


def opening(message_id: str, model: str, input_tokens: int) -> bytes:
    """``message_start`` and a ``ping``: how the relay opens a Messages stream itself while the
    request still waits for admission (see :mod:`relay.api.streaming`), so that the client and the
    proxies between hear something. ``input_tokens`` is the relay's estimate; the real usage
    follows in ``message_delta``."""
    message = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 0,
        },
    }
    return _event("message_start", {"type": "message_start", "message": message}) + PING


def error_event(error: RelayError) -> bytes:
    """A relay error (a refusal, an upstream's error status) as the ``event: error`` that ends
    a stream the relay opened before it could answer: Anthropic's type for the error's status,
    and its message."""
    _, body = anthropic_error(error)
    return _error_event(body["error"]["type"], body["error"]["message"])


def _event(name: str, payload: dict) -> bytes:
    return f"event: {name}\ndata: ".encode() + json_data(payload) + b"\n\n"


# --------------------------------------------------------------------------------------------
# Request


def check_messages_files(body: dict) -> None:
    """Reject documents other than PDFs (and images other than images) anywhere in the body,
    for every upstream (DESIGN.md "Parse and normalise")."""
    for i, message in enumerate(body.get("messages") or ()):
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            continue
        for j, block in enumerate(message["content"]):
            where = f"messages[{i}].content[{j}]"
            _check_block(block, where)
            if isinstance(block, dict) and isinstance(block.get("content"), list):
                for k, inner in enumerate(block["content"]):
                    _check_block(inner, f"{where}.content[{k}]")


def _check_block(block: Any, where: str) -> None:
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    source = block.get("source")
    if kind not in ("image", "document") or not isinstance(source, dict):
        return
    source_type = source.get("type")
    media = source.get("media_type")
    if kind == "document" and source_type in ("text", "content"):
        raise InvalidRequest(
            f"Invalid document at '{where}' (a {source_type} document): {FILE_TYPES_MESSAGE}.",
            param=where,
            code="unsupported_file_type",
        )
    if source_type == "base64":
        if isinstance(media, str):
            check_image_url(f"data:{media};base64,", where)
    elif source_type == "url" and isinstance(source.get("url"), str):
        check_file(data=None, filename=None, url=source["url"], where=where)


def read_messages_request(body: dict) -> Conversation:
    """The Conversation a validated Messages body describes (see the module's docstring for
    what is dropped)."""
    conv = Conversation()
    system = body.get("system")
    texts = _texts(system)
    if texts:
        conv.messages.append(Message("system", [Text(text) for text in texts]))
    for index, message in enumerate(body.get("messages") or ()):
        _read_message(message, f"messages[{index}]", conv)
    for tool in body.get("tools") or ():
        if isinstance(tool, dict) and _is_function_tool(tool):
            conv.tools.append(
                Tool(
                    name=str(tool.get("name") or ""),
                    description=tool.get("description")
                    if isinstance(tool.get("description"), str)
                    else None,
                    parameters=tool.get("input_schema")
                    if isinstance(tool.get("input_schema"), dict)
                    else None,
                )
            )
    _read_tool_choice(body.get("tool_choice"), conv)
    conv.max_output_tokens = body.get("max_tokens")
    conv.stop = [s for s in body.get("stop_sequences") or () if isinstance(s, str)]
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            setattr(conv, name, float(value))
    conv.reasoning_effort = thinking_effort(body)
    if conv.reasoning_effort:
        conv.reasoning_summary = "auto"
    return conv


def thinking_effort(body: dict) -> str | None:
    """The reasoning effort a Messages body's ``thinking`` and ``output_config`` ask for."""
    thinking = body.get("thinking")
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    said = EFFORTS.get(effort) if isinstance(effort, str) else None
    if not isinstance(thinking, dict):
        return said
    kind = thinking.get("type")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and not isinstance(budget, bool):
            for bound, name in BUDGET_EFFORTS:
                if budget < bound:
                    return said or name
            return said or "xhigh"
        return said or "medium"
    if kind == "adaptive":
        return said or "medium"
    return None


def _is_function_tool(tool: dict) -> bool:
    """A client tool (name, description, input_schema); not a server tool that only
    Anthropic runs."""
    kind = tool.get("type")
    return kind in (None, "custom") or ("input_schema" in tool and not kind)


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [
            block["text"]
            for block in value
            if isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
            and block["text"]
        ]
    return []


def _read_message(message: dict, where: str, conv: Conversation) -> None:
    role = message.get("role")
    content = message.get("content")
    if role == "system":
        texts = _texts(content)
        if texts:
            conv.messages.append(Message("system", [Text(text) for text in texts]))
        return
    if isinstance(content, str):
        if content:
            conv.messages.append(Message(role, [Text(content)]))
        return
    blocks = [block for block in content or () if isinstance(block, dict)]
    if role == "assistant":
        conv.messages.append(Message("assistant", _assistant_parts(blocks)))
        return
    parts: list = []
    for index, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "tool_result":
            conv.messages.append(Message("tool", [_tool_result(block)]))
        else:
            part = _user_part(block, f"{where}.content[{index}]")
            if part is not None:
                parts.append(part)
    if parts:
        conv.messages.append(Message("user", parts))


def _user_part(block: dict, where: str) -> Text | Image | File | None:
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return Text(text) if isinstance(text, str) and text else None
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if kind == "image":
        if source.get("type") == "base64":
            media = source.get("media_type") or "image/png"
            return Image(url=f"data:{media};base64,{source.get('data') or ''}")
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return Image(url=source["url"])
        if source.get("type") == "file":
            return Image(file_id=str(source.get("file_id") or ""))
    elif kind == "document":
        title = block.get("title") if isinstance(block.get("title"), str) else None
        if source.get("type") == "base64":
            media = source.get("media_type") or "application/pdf"
            return File(data=f"data:{media};base64,{source.get('data') or ''}", filename=title)
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return File(url=source["url"], filename=title)
        if source.get("type") == "file":
            return File(file_id=str(source.get("file_id") or ""), filename=title)
    elif kind in ("thinking", "redacted_thinking", "tool_use"):
        raise InvalidRequest(
            f"'{where}' is a {kind} block in a user message; it belongs in an assistant "
            "message.",
            param=where,
        )
    return None


def _tool_result(block: dict) -> ToolResult:
    content = block.get("content")
    value: str | list
    if isinstance(content, list):
        value = []
        for index, inner in enumerate(content):
            if isinstance(inner, dict):
                part = _user_part(inner, f"tool_result.content[{index}]")
                if part is not None:
                    value.append(part)
    else:
        value = content if isinstance(content, str) else ""
    call = split_call_id(str(block.get("tool_use_id") or ""))
    return ToolResult(call.id, value, is_error=block.get("is_error") is True)


def _assistant_parts(blocks: list[dict]) -> list:
    parts: list = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            if isinstance(block.get("text"), str) and block["text"]:
                parts.append(Text(block["text"]))
        elif kind == "thinking":
            text = block.get("thinking") if isinstance(block.get("thinking"), str) else ""
            signature = block.get("signature") if isinstance(block.get("signature"), str) else None
            carried = decode_reasoning(signature)
            if carried is not None:
                parts.append(Reasoning(carried.text, carried.signature, carried.kind))
            elif text or signature:
                parts.append(Reasoning(text, signature, "anthropic"))
        elif kind == "tool_use":
            call = split_call_id(str(block.get("id") or ""))
            arguments = block.get("input")
            parts.append(
                ToolCall(
                    call.id,
                    str(block.get("name") or ""),
                    json.dumps(arguments if arguments is not None else {}, ensure_ascii=False),
                    signature=call.signature,
                    signature_kind=call.signature_kind,
                )
            )
    return parts


def _read_tool_choice(choice: Any, conv: Conversation) -> None:
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "any":
        conv.tool_choice = "required"
    elif kind == "tool":
        conv.tool_choice = "function"
        conv.tool_choice_name = str(choice.get("name") or "")
    elif kind in ("auto", "none"):
        conv.tool_choice = kind
    if choice.get("disable_parallel_tool_use") is True:
        conv.parallel_tool_calls = False


# --------------------------------------------------------------------------------------------
# Answer


def messages_usage(usage: Usage | None) -> dict:
    """Usage in Anthropic's terms: ``input_tokens`` excludes the cache reads and writes, which
    are reported apart (protocols.md §5.4)."""
    if usage is None:
        usage = Usage()
    cached = usage.cached_tokens
    written = usage.cache_write_tokens
    return {
        "input_tokens": max(0, usage.input_tokens - cached - written),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.output_tokens,
    }


class MessagesEncoder:
    """Events → Anthropic's Messages stream (``event:`` + ``data:``) or Message object.

    Blocks are opened as the model produces them and closed when it moves on: a thinking block
    ends with one ``signature_delta`` (the relay's encoding of the reasoning, see the module's
    docstring), a tool call is a ``tool_use`` block whose input comes as ``input_json_delta``
    pieces. ``message_delta`` (the stop reason and the usage) and ``message_stop`` come at
    :meth:`finish`, after the upstream's last usage report. A :class:`Failure` is an ``event:
    error`` and nothing follows it.
    """

    def __init__(self, context: TranslationContext, upstream_kind: str) -> None:
        self._context = context
        self._kind = upstream_kind
        self._id = message_id(context.response_id)
        self._index = -1
        self._open: str | None = None  # "text" | "thinking" | "tool_use"
        self._open_call: int | None = None  # the call whose tool_use block is open
        self._thinking: list[str] = []
        self._signature: str | None = None
        self._calls: dict[int, int] = {}  # our call index → block index
        self._content: list[dict] = []  # the non-streamed Message's blocks
        self._arguments: dict[int, list[str]] = {}
        self._usage: Usage | None = None
        self._reason = "stop"
        self._started = context.opened  # message_start already sent by the relay (opening)
        self.closed = False

    # -- stream ------------------------------------------------------------------------------

    def encode(self, event: Event) -> bytes:
        if self.closed:
            return b""
        out = b"" if self._started else self._start()
        if isinstance(event, TextDelta):
            if self._open != "text":
                out += self._close() + self._open_block("text", {"type": "text", "text": ""})
                self._content.append({"type": "text", "text": ""})
            self._content[-1]["text"] += event.text
            out += self._delta({"type": "text_delta", "text": event.text})
        elif isinstance(event, ReasoningDelta):
            if self._open != "thinking":
                out += self._close() + self._open_block(
                    "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                )
                self._thinking, self._signature = [], None
            if event.signature:
                self._signature = event.signature
            if event.text:
                self._thinking.append(event.text)
                out += self._delta({"type": "thinking_delta", "thinking": event.text})
        elif isinstance(event, ToolCallStart):
            out += self._close()
            name = self._context.tool_names.get(event.name, event.name)
            call_id = event.call_id
            if event.signature:
                call_id = call_id_with_signature(call_id, self._kind, event.signature)
            block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
            out += self._open_block("tool_use", block)
            self._content.append(dict(block))
            self._calls[event.index] = len(self._content) - 1
            self._arguments[event.index] = []
            self._open_call = event.index
        elif isinstance(event, ToolCallDelta):
            # A block cannot be reopened: pieces of a call whose block was closed (an upstream
            # interleaving parallel calls) reach the client whole, in the Message object only.
            if event.index in self._arguments and event.arguments:
                self._arguments[event.index].append(event.arguments)
                if self._open_call == event.index:
                    out += self._delta(
                        {"type": "input_json_delta", "partial_json": event.arguments}
                    )
        elif isinstance(event, ToolCallEnd):
            position = self._calls.get(event.index)
            if position is not None:
                streamed = "".join(self._arguments.get(event.index, ()))
                if self._open_call == event.index:
                    if not streamed and event.arguments and event.arguments != "{}":
                        out += self._delta(
                            {"type": "input_json_delta", "partial_json": event.arguments}
                        )
                    out += self._close()
                self._content[position]["input"] = _parsed_input(event.arguments or streamed)
        elif isinstance(event, UsageEvent):
            self._usage = event.usage
        elif isinstance(event, Finish):
            self._reason = event.reason
            if self._calls and event.reason == "stop":
                self._reason = "tool_calls"
        elif isinstance(event, Failure):
            out += self._close()
            self.closed = True
            out += failure_event(event.message, event.code)
        return out if self._context.stream else b""

    def _start(self) -> bytes:
        self._started = True
        message = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._context.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": messages_usage(None),
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _open_block(self, kind: str, block: dict) -> bytes:
        self._index += 1
        self._open = kind
        return _event(
            "content_block_start",
            {"type": "content_block_start", "index": self._index, "content_block": block},
        )

    def _delta(self, delta: dict) -> bytes:
        return _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self._index, "delta": delta},
        )

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            text = "".join(self._thinking)
            if self._kind == "anthropic":
                signature = self._signature or ""
            else:
                signature = encode_reasoning(text, self._signature, self._kind)
            out += self._delta({"type": "signature_delta", "signature": signature})
            self._content.append({"type": "thinking", "thinking": text, "signature": signature})
        self._open = self._open_call = None
        return out + _event(
            "content_block_stop", {"type": "content_block_stop", "index": self._index}
        )

    def finish(self) -> bytes:
        """``message_delta`` and ``message_stop``: the answer ended as the upstream said."""
        if self.closed:
            return b""
        out = b"" if self._started else self._start()
        out += self._close()
        self.closed = True
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
            "usage": messages_usage(self._usage),
        }
        out += _event("message_delta", delta)
        out += _event("message_stop", {"type": "message_stop"})
        return out if self._context.stream else b""

    def fail(self, message: str, code: str) -> bytes:
        """End the stream with an error the relay met (the upstream broke off, a shutdown)."""
        if self.closed:
            return b""
        out = b"" if self._started else self._start()
        out += self._close()
        self.closed = True
        return out + failure_event(message, code)

    def keepalive(self) -> bytes:
        return PING

    @property
    def stop_reason(self) -> str:
        return STOP_REASONS.get(self._reason, "end_turn")

    # -- body ----------------------------------------------------------------------------------

    def body(self) -> dict:
        """The non-streamed Message object (call after the events and :meth:`finish`)."""
        if self._open is not None:
            self._close()
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._context.model,
            "content": self._content,
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": messages_usage(self._usage),
        }


def _parsed_input(arguments: str) -> Any:
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"input": arguments}
    return value if isinstance(value, dict) else {"input": value}



def message_id(response_id: str) -> str:
    """The Message id for a request's ``response_id`` (``resp_…`` → ``msg_…``)."""
    return "msg_" + response_id.removeprefix("resp_")
