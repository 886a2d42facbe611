"""OpenAI Responses: request reader and writer, answer decoder and encoder.

* :func:`read_responses_request` — a client's Responses body (Codex's, protocols.md §2.3) →
  :class:`Conversation`;
* :func:`write_responses_request` — :class:`Conversation` → the body for an
  ``openai-responses`` upstream (when the client speaks Chat);
* :class:`ResponsesDecoder` — an ``openai-responses`` upstream's events or body → events;
* :class:`ResponsesEncoder` — events → Responses SSE events or a Response object.

The encoder's output is what the openai-python ``responses.stream()`` helper and the Codex CLI
accept (protocols.md §1.4, §1.5, §2.5): ``response.created`` first, then
``response.in_progress``; ``event:`` equal to ``data.type``; ``sequence_number`` 0, 1, 2…;
``output_index`` 0, 1, 2… in ``output_item.added`` order; an ``output_item.done`` for every item
(Codex builds its history only from those); a terminal ``response.completed`` (or
``response.incomplete`` / ``response.failed``) whose usage always has both details objects.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidRequest
from .compaction import SUMMARY_HEADING, summary_text_of
from .conversation import (
    Conversation,
    File,
    Image,
    Message,
    Reasoning,
    Text,
    Tool,
    ToolCall,
    ToolResult,
    arrange_tool_results,
    check_file,
    check_image_url,
    is_pdf_data_url,
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
    TranslationContext,
    UsageEvent,
    call_id_with_signature,
    decode_reasoning,
    encode_reasoning,
    split_call_id,
)
from .sse import Usage

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: Separator of a flattened namespace tool name (``namespace__tool``), protocols.md §4.3.
NAMESPACE_SEPARATOR = "__"

#: Input item types that only mean something to OpenAI's hosted tools or server-side state;
#: they are dropped when the conversation goes to another upstream.
_DROPPED_ITEMS = frozenset(
    {
        "local_shell_call",
        "local_shell_call_output",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "web_search_call",
        "image_generation_call",
        "file_search_call",
        "code_interpreter_call",
        "computer_call",
        "computer_call_output",
        "tool_search_call",
        "tool_search_output",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
    }
)

# --------------------------------------------------------------------------------------------
# Request: Responses body → Conversation


def check_responses_files(body: dict) -> None:
    """Reject file inputs other than images and PDFs anywhere in a Responses body."""
    items = body.get("input")
    if not isinstance(items, list):
        return
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        content = item.get("content")
        if item.get("type") in ("function_call_output", "custom_tool_call_output"):
            content = item.get("output")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict):
                    _check_part(part, f"input[{i}].content[{j}]")


def _check_part(part: dict, where: str) -> None:
    if part.get("type") == "input_file":
        check_file(
            data=part.get("file_data"),
            filename=part.get("filename"),
            url=part.get("file_url"),
            where=where,
        )
    elif part.get("type") == "input_image" and isinstance(part.get("image_url"), str):
        check_image_url(part["image_url"], where)


def read_responses_request(body: dict) -> tuple[Conversation, dict[str, tuple[str, str]]]:
    """The Conversation a Responses body describes, and the flattened namespace tool names.

    Built-in tools and the items they produced are dropped; ``custom`` tools become
    :class:`Tool` with ``custom=True``; reasoning items become :class:`Reasoning` on the
    assistant message that follows them.
    """
    # The relay writes out what it kept before translating (.state.expand): a reference left
    # here is one it does not hold, which must not vanish without a word.
    if body.get("previous_response_id"):
        raise InvalidRequest(
            f"Previous response with id {json.dumps(body['previous_response_id'])} not found: "
            "this model's upstream keeps no conversation state, and the relay holds no "
            "response with that id. Send the full conversation in 'input'.",
            code="previous_response_not_found",
            param="previous_response_id",
        )
    conv = Conversation(stream=body.get("stream") is True)
    namespaced: dict[str, tuple[str, str]] = {}
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        conv.messages.append(Message("system", [Text(instructions)]))
    items: list = []
    if isinstance(instructions, list):
        items.extend(instructions)
    value = body.get("input")
    if isinstance(value, str):
        items.append({"type": "message", "role": "user", "content": value})
    elif isinstance(value, list):
        items.extend(value)
    tools = list(body.get("tools") or [])
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if item.get("type") == "additional_tools":
                tools.extend(item.get("tools") or [])
            else:
                _read_item(item, f"input[{i}]", conv)
    # An assistant turn that kept only reasoning (an interrupted one) says nothing upstreams
    # accept.
    conv.messages = [
        m
        for m in conv.messages
        if m.parts and (m.role != "assistant" or m.texts() or m.tool_calls())
    ]
    for tool in tools:
        if isinstance(tool, dict):
            _read_tool(tool, conv, namespaced)
    _read_tool_choice(body.get("tool_choice"), conv)
    if isinstance(body.get("parallel_tool_calls"), bool):
        conv.parallel_tool_calls = body["parallel_tool_calls"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        effort, summary = reasoning.get("effort"), reasoning.get("summary")
        conv.reasoning_effort = effort if isinstance(effort, str) else None
        conv.reasoning_summary = summary if isinstance(summary, str) else None
    text = body.get("text")
    if isinstance(text, dict):
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            conv.response_format = {
                "type": "json_schema",
                "name": fmt.get("name") or "response",
                "schema": fmt.get("schema") or {},
                "strict": fmt.get("strict"),
            }
        elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
            conv.response_format = {"type": "json_object"}
        if isinstance(text.get("verbosity"), str):
            conv.verbosity = text["verbosity"]
    maximum = body.get("max_output_tokens")
    if isinstance(maximum, int) and not isinstance(maximum, bool):
        conv.max_output_tokens = maximum
    for name in ("temperature", "top_p"):
        number = body.get(name)
        if isinstance(number, int | float) and not isinstance(number, bool):
            setattr(conv, name, number)
    key = body.get("prompt_cache_key") or body.get("session_id")
    conv.prompt_cache_key = key if isinstance(key, str) and key else None
    user = body.get("user") or body.get("safety_identifier")
    conv.user = user if isinstance(user, str) else None
    return conv, namespaced


def _assistant(conv: Conversation) -> Message:
    """The assistant message the next output item belongs to (consecutive output items —
    reasoning, message, calls — form one assistant turn)."""
    if conv.messages and conv.messages[-1].role == "assistant":
        return conv.messages[-1]
    message = Message("assistant", [])
    conv.messages.append(message)
    return message


def _read_item(item: dict, where: str, conv: Conversation) -> None:
    kind = item.get("type")
    if kind is None and "role" in item:
        kind = "message"
    if kind == "message":
        role = item.get("role")
        content = item.get("content")
        if role in ("system", "developer"):
            conv.messages.append(Message("system", [Text(_text_of(content))]))
        elif role == "assistant":
            text = _text_of(content)
            if text:
                _assistant(conv).parts.append(Text(text))
        elif role == "user":
            parts = _read_content(content, where)
            if parts:
                conv.messages.append(Message("user", parts))
        else:
            raise InvalidRequest(
                f"'{where}.role' must be one of user, assistant, system, developer; got {role!r}.",
                param=f"{where}.role",
            )
    elif kind in ("function_call", "custom_tool_call"):
        carried = split_call_id(str(item.get("call_id") or item.get("id") or ""))
        name = str(item.get("name") or "")
        if item.get("namespace"):
            name = f"{item['namespace']}{NAMESPACE_SEPARATOR}{name}"
        custom = kind == "custom_tool_call"
        arguments = item.get("input") if custom else item.get("arguments")
        _assistant(conv).parts.append(
            ToolCall(
                carried.id,
                name,
                arguments if isinstance(arguments, str) else _dumps(arguments or {}),
                custom=custom,
                signature=carried.signature,
                signature_kind=carried.signature_kind,
            )
        )
    elif kind in ("function_call_output", "custom_tool_call_output"):
        carried = split_call_id(str(item.get("call_id") or ""))
        output = item.get("output")
        if isinstance(output, list):
            content: str | list = _read_content(output, where)
        else:
            content = output if isinstance(output, str) else _dumps(output)
        conv.messages.append(Message("tool", [ToolResult(carried.id, content)]))
    elif kind == "reasoning":
        reasoning = _read_reasoning(item)
        if reasoning is not None:
            _assistant(conv).parts.append(reasoning)
    elif kind in ("compaction", "compaction_summary"):
        summary = summary_text_of(item, where)
        conv.messages.append(Message("user", [Text(SUMMARY_HEADING + summary)]))
    elif kind in _DROPPED_ITEMS:
        return
    elif kind == "item_reference":
        raise InvalidRequest(
            f"Item with id {json.dumps(item.get('id'))} not found ({where} refers to it): this "
            "model's upstream keeps no conversation state, and the relay holds no item with "
            "that id. Send the item itself instead of a reference.",
            code="item_not_found",
            param=f"{where}.id",
        )
    else:
        raise InvalidRequest(
            f"'{where}.type' {kind!r} is not an input item type this relay can translate.",
            param=f"{where}.type",
        )


def _read_reasoning(item: dict) -> Reasoning | None:
    carried = decode_reasoning(item.get("encrypted_content"))
    if carried is not None:
        return Reasoning(carried.text, carried.signature, carried.kind)
    texts = [
        part.get("text", "")
        for part in item.get("content") or []
        if isinstance(part, dict) and part.get("type") == "reasoning_text"
    ]
    if not texts:
        texts = [
            part.get("text", "")
            for part in item.get("summary") or []
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        texts = ["\n\n".join(texts)]
    text = "".join(t for t in texts if isinstance(t, str))
    return Reasoning(text) if text else None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content or []:
        if isinstance(part, dict):
            value = part.get("refusal") if part.get("type") == "refusal" else part.get("text")
            if isinstance(value, str):
                texts.append(value)
    return "".join(texts)


def _read_content(content: Any, where: str) -> list:
    if isinstance(content, str):
        return [Text(content)] if content else []
    parts: list = []
    for j, part in enumerate(content or []):
        if not isinstance(part, dict):
            continue
        part_where = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            if isinstance(part.get("text"), str):
                parts.append(Text(part["text"]))
        elif kind == "input_image":
            url = part.get("image_url")
            if isinstance(url, str):
                check_image_url(url, part_where)
                if is_pdf_data_url(url):
                    parts.append(File(data=url, filename="document.pdf"))
                    continue
            parts.append(
                Image(
                    url=url if isinstance(url, str) else None,
                    detail=part.get("detail"),
                    file_id=part.get("file_id"),
                )
            )
        elif kind == "input_file":
            _check_part(part, part_where)
            parts.append(
                File(
                    data=part.get("file_data"),
                    filename=part.get("filename"),
                    file_id=part.get("file_id"),
                    url=part.get("file_url"),
                )
            )
        else:
            raise InvalidRequest(
                f"'{part_where}.type' {kind!r} is not a content type this relay can translate.",
                param=part_where,
            )
    return parts


def _read_tool(tool: dict, conv: Conversation, namespaced: dict, namespace: str = "") -> None:
    kind = tool.get("type")
    name = str(tool.get("name") or "")
    qualified = f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name
    if namespace:
        namespaced[qualified] = (namespace, name)
    if kind == "function":
        conv.tools.append(
            Tool(
                name=qualified,
                description=tool.get("description"),
                parameters=tool.get("parameters"),
                strict=tool.get("strict"),
            )
        )
    elif kind == "custom":
        conv.tools.append(
            Tool(
                name=qualified,
                description=tool.get("description"),
                custom=True,
                format=tool.get("format"),
            )
        )
    elif kind == "namespace" and not namespace:
        for child in tool.get("tools") or []:
            if isinstance(child, dict):
                _read_tool(child, conv, namespaced, name)
    # Built-in tools (web_search, image_generation, local_shell, tool_search, file_search, mcp,
    # …) run inside OpenAI; no other upstream can run them, so they are dropped.


def _read_tool_choice(choice: Any, conv: Conversation) -> None:
    names = {tool.name for tool in conv.tools}
    if isinstance(choice, str):
        conv.tool_choice = choice
    elif isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom") and choice.get("name") in names:
            conv.tool_choice, conv.tool_choice_name = "function", choice["name"]
        elif kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
            conv.tool_choice = choice["mode"]
        else:  # a built-in tool that was dropped
            conv.tool_choice = "auto"


# --------------------------------------------------------------------------------------------
# Request: Conversation → Responses body (for openai-responses upstreams)


def write_responses_request(
    conv: Conversation, *, model: str, reasoning_effort: str | None
) -> dict:
    """The Responses body for an OpenAI Responses upstream (protocols.md §4.1).

    Leading system messages become ``instructions``; later ones stay in place as ``developer``
    messages (the ChatGPT backend rejects ``system`` in input). Reasoning is sent back only when
    it is a Responses upstream's own (its ``encrypted_content``, which a Messages client carries
    in a thinking block's signature): OpenAI accepts only its own encrypted reasoning. ``stop``
    and ``user`` have no Responses equivalent that every Responses upstream accepts and are
    dropped.
    """
    system, rest = conv.split_system()
    body: dict[str, Any] = {"model": model}
    if system:
        body["instructions"] = "\n\n".join(system)
    body["input"] = _responses_input(rest)
    if conv.tools:
        body["tools"] = [_responses_tool(tool) for tool in conv.tools]
        if conv.tool_choice == "function":
            custom = any(t.custom and t.name == conv.tool_choice_name for t in conv.tools)
            body["tool_choice"] = {
                "type": "custom" if custom else "function",
                "name": conv.tool_choice_name,
            }
        elif conv.tool_choice:
            body["tool_choice"] = conv.tool_choice
        if conv.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = conv.parallel_tool_calls
    text: dict[str, Any] = {}
    fmt = conv.response_format
    if fmt and fmt["type"] == "json_schema":
        text["format"] = {"type": "json_schema", "name": fmt["name"], "schema": fmt["schema"]}
        if fmt.get("strict") is not None:
            text["format"]["strict"] = fmt["strict"]
    elif fmt:
        text["format"] = {"type": "json_object"}
    if conv.verbosity:
        text["verbosity"] = conv.verbosity
    if text:
        body["text"] = text
    effort = reasoning_effort or conv.reasoning_effort
    if effort == "none":
        body["reasoning"] = {"effort": "none"}
    elif effort:
        body["reasoning"] = {"effort": effort, "summary": conv.reasoning_summary or "auto"}
        body["include"] = ["reasoning.encrypted_content"]
    if conv.max_output_tokens:
        body["max_output_tokens"] = conv.max_output_tokens
    for name in ("temperature", "top_p"):
        if getattr(conv, name) is not None:
            body[name] = getattr(conv, name)
    if conv.prompt_cache_key:
        body["prompt_cache_key"] = conv.prompt_cache_key
    body["store"] = False
    body["stream"] = conv.stream
    return body


def _responses_input(messages: list[Message]) -> list[dict]:
    items: list[dict] = []
    custom_calls: set[str] = set()
    for message in arrange_tool_results(messages):
        if message.role == "system":
            items.append(
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "\n\n".join(message.texts())}],
                }
            )
        elif message.role == "user":
            items.append(
                {"type": "message", "role": "user", "content": _input_content(message.parts)}
            )
        elif message.role == "assistant":
            for part in message.parts:
                if isinstance(part, Reasoning) and part.kind == "openai-responses":
                    if part.signature:
                        items.append(_reasoning_item(part))
            texts = message.texts()
            if texts:
                items.append(
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "\n\n".join(texts)}],
                    }
                )
            for call in message.tool_calls():
                if call.custom:
                    custom_calls.add(call.call_id)
                    items.append(
                        {
                            "type": "custom_tool_call",
                            "call_id": call.call_id,
                            "name": call.name,
                            "input": call.arguments,
                        }
                    )
                else:
                    items.append(
                        {
                            "type": "function_call",
                            "call_id": call.call_id,
                            "name": call.name,
                            "arguments": call.arguments or "{}",
                        }
                    )
        else:
            result: ToolResult = message.parts[0]
            output: Any = result.content
            if not isinstance(output, str):
                output = _input_content(output)
            kind = (
                "custom_tool_call_output"
                if result.call_id in custom_calls
                else "function_call_output"
            )
            items.append({"type": kind, "call_id": result.call_id, "output": output})
    return items


def _reasoning_item(part: Reasoning) -> dict:
    """A reasoning item an OpenAI Responses upstream made, given back: its encrypted content
    (the state it reasons on from), with the summary the client saw (a Messages client's
    thinking block carried both, see :mod:`.messages`)."""
    summary = [{"type": "summary_text", "text": part.text}] if part.text else []
    return {"type": "reasoning", "summary": summary, "encrypted_content": part.signature}


def _input_content(parts: list) -> list[dict]:
    content = []
    for part in parts:
        if isinstance(part, Text):
            content.append({"type": "input_text", "text": part.text})
        elif isinstance(part, Image):
            image: dict[str, Any] = {"type": "input_image", "detail": part.detail or "auto"}
            if part.url:
                image["image_url"] = part.url
            if part.file_id:
                image["file_id"] = part.file_id
            content.append(image)
        elif isinstance(part, File):
            file: dict[str, Any] = {"type": "input_file"}
            if part.file_id:
                file["file_id"] = part.file_id
            elif part.data:
                data = part.data
                if not data.startswith("data:"):
                    data = f"data:{part.media_type};base64,{data}"
                file["file_data"] = data
                file["filename"] = part.filename or "document.pdf"
            elif part.url:
                file["file_url"] = part.url
            content.append(file)
    return content


def _responses_tool(tool: Tool) -> dict:
    if tool.custom:
        out: dict[str, Any] = {"type": "custom", "name": tool.name}
        if tool.description:
            out["description"] = tool.description
        if tool.format:
            out["format"] = tool.format
        return out
    out = {"type": "function", "name": tool.name}
    if tool.description:
        out["description"] = tool.description
    out["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    # Chat's default is non-strict, Responses' is strict: keep the Chat meaning.
    out["strict"] = bool(tool.strict)
    return out


# --------------------------------------------------------------------------------------------
# Answer: openai-responses upstream → events


class ResponsesDecoder:
    """Responses stream events (or a Response object) → events."""

    def __init__(self) -> None:
        self.finished = False
        self._started = False
        self._calls: dict[int, int] = {}  # output_index → our call index
        self._arguments: dict[int, list[str]] = {}
        self._open: set[int] = set()
        self._streamed: set[int] = set()  # output indexes whose text came as deltas

    def feed(self, name: str | None, data: Any) -> list[Event]:
        if not isinstance(data, dict):
            return []
        kind = data.get("type") or name
        events: list[Event] = []
        if not self._started and kind != "error":
            self._started = True
            response = data.get("response") if isinstance(data.get("response"), dict) else {}
            events.append(Start(response.get("id"), response.get("model")))
        index = data.get("output_index")
        if kind == "response.output_item.added":
            item = data.get("item") or {}
            if item.get("type") in ("function_call", "custom_tool_call"):
                self._start_call(index, item, events)
        elif kind in (
            "response.function_call_arguments.delta",
            "response.custom_tool_call_input.delta",
        ):
            call = self._calls.get(index)
            delta = data.get("delta")
            if call is not None and isinstance(delta, str) and delta:
                self._arguments[call].append(delta)
                events.append(ToolCallDelta(call, delta))
        elif kind == "response.output_item.done":
            self._item_done(index, data.get("item") or {}, events)
        elif kind in ("response.output_text.delta", "response.refusal.delta"):
            if isinstance(data.get("delta"), str) and data["delta"]:
                self._streamed.add(index)
                events.append(TextDelta(data["delta"]))
        elif kind == "response.reasoning_summary_part.added":
            if data.get("summary_index", 0) > 0:
                events.append(ReasoningDelta("\n\n"))
        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            if isinstance(data.get("delta"), str) and data["delta"]:
                self._streamed.add(index)
                events.append(ReasoningDelta(data["delta"]))
        elif kind in ("response.completed", "response.incomplete"):
            self.finished = True
            self._terminal(data.get("response") or {}, events)
        elif kind == "response.failed":
            self.finished = True
            error = (data.get("response") or {}).get("error") or {}
            events.append(
                Failure(
                    str(error.get("message") or "The upstream response failed."),
                    str(error.get("code") or "server_error"),
                )
            )
        elif kind == "error":
            self.finished = True
            error = data.get("error") if isinstance(data.get("error"), dict) else data
            events.append(
                Failure(
                    str(error.get("message") or "upstream error"),
                    str(error.get("code") or "server_error"),
                )
            )
        return events

    def _start_call(self, index: int | None, item: dict, events: list[Event]) -> int:
        call = len(self._arguments)
        self._calls[index if isinstance(index, int) else -1 - call] = call
        self._arguments[call] = []
        self._open.add(call)
        custom = item.get("type") == "custom_tool_call"
        name = str(item.get("name") or "")
        if item.get("namespace"):
            name = f"{item['namespace']}{NAMESPACE_SEPARATOR}{name}"
        call_id = str(item.get("call_id") or item.get("id") or f"call_{call}")
        events.append(ToolCallStart(call, call_id, name, custom=custom))
        return call

    def _item_done(self, index: int | None, item: dict, events: list[Event]) -> None:
        kind = item.get("type")
        if kind in ("function_call", "custom_tool_call"):
            call = self._calls.get(index) if isinstance(index, int) else None
            if call is None:
                call = self._start_call(index, item, events)
            if call in self._open:
                self._open.discard(call)
                value = item.get("input" if kind == "custom_tool_call" else "arguments")
                arguments = value if isinstance(value, str) else "".join(self._arguments[call])
                events.append(
                    ToolCallEnd(call, arguments or ("" if kind != "function_call" else "{}"))
                )
        else:
            if index not in self._streamed:
                # An item that arrived whole (no deltas): take its text from the done item.
                if kind == "message":
                    text = _text_of(item.get("content"))
                    if text:
                        events.append(TextDelta(text))
                elif kind == "reasoning":
                    reasoning = _read_reasoning(item)
                    if reasoning is not None:
                        events.append(ReasoningDelta(reasoning.text))
            encrypted = item.get("encrypted_content") if kind == "reasoning" else None
            if isinstance(encrypted, str) and encrypted:
                # The reasoning's state, for a client that can carry it to the next turn.
                events.append(ReasoningDelta("", signature=encrypted))

    def _terminal(self, response: dict, events: list[Event]) -> None:
        for call in sorted(self._open):
            events.append(ToolCallEnd(call, "".join(self._arguments[call]) or "{}"))
        self._open.clear()
        if isinstance(response.get("usage"), dict):
            events.append(UsageEvent(Usage.from_responses(response["usage"])))
        if response.get("status") == "incomplete":
            reason = (response.get("incomplete_details") or {}).get("reason")
            events.append(Finish("content_filter" if reason == "content_filter" else "length"))
        else:
            events.append(Finish("tool_calls" if self._arguments else "stop"))

    def end(self) -> list[Event]:
        events: list[Event] = []
        if not self.finished:
            self._terminal({}, events)
        return events

    def decode_body(self, body: dict) -> list[Event]:
        events: list[Event] = [Start(body.get("id"), body.get("model"))]
        self._started = True
        for index, item in enumerate(body.get("output") or []):
            if isinstance(item, dict):
                self._item_done(index, item, events)
        self._terminal(body, events)
        self.finished = True
        return events


# --------------------------------------------------------------------------------------------
# Answer: events → Responses events / Response object


def responses_usage(usage: Usage | None) -> dict:
    """Usage with every field Codex requires (protocols.md §1.6 "parse hazard")."""
    usage = usage or Usage()
    return {
        "input_tokens": usage.input_tokens,
        # cache_write_tokens: required by the newest SDK types (Anthropic upstreams report it).
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


class _Item:
    """An output item being streamed."""

    __slots__ = ("arguments", "call", "id", "index", "kind", "signature", "text")

    def __init__(self, kind: str, index: int, id: str) -> None:
        self.kind = kind  # reasoning | message | function_call | custom_tool_call | wrapped
        self.index = index
        self.id = id
        self.text: list[str] = []
        self.signature: str | None = None
        self.arguments: list[str] = []
        self.call: dict = {}


class ResponsesEncoder:
    """Events → Responses SSE events (and, at the end, a Response object).

    Reasoning becomes a ``reasoning`` item streamed as a summary; its ``output_item.done``
    carries the raw text twice, as ``content[reasoning_text]`` and inside a relay-encoded
    ``encrypted_content`` (with the upstream's signature, if any), so that the next request can
    give it back to the upstream (see :mod:`.events`). A tool call the upstream made to a wrapped
    custom tool is unwrapped into a ``custom_tool_call`` item; its input is sent as one delta at
    the end, because it arrives JSON-encoded.
    """

    def __init__(self, context: TranslationContext, upstream_kind: str) -> None:
        self._context = context
        self._kind = upstream_kind
        self._sequence = 0
        self._started = False
        self._output: list[dict | None] = []
        self._reasoning: _Item | None = None
        self._message: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self.usage: Usage | None = None
        self._finish: str | None = None
        self.closed = False
        self.final: dict | None = None

    # -- framing

    def _event(self, kind: str, fields: dict) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: ".encode() + _dumps(payload).encode() + b"\n\n"

    def _response(self, status: str, **fields: Any) -> dict:
        context, echo = self._context, self._context.echo
        response = {
            "id": context.response_id,
            "object": "response",
            "created_at": context.created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": echo.get("instructions"),
            "max_output_tokens": echo.get("max_output_tokens"),
            "model": context.model,
            "output": [],
            "parallel_tool_calls": echo.get("parallel_tool_calls", True),
            "previous_response_id": echo.get("previous_response_id"),
            "prompt_cache_key": echo.get("prompt_cache_key"),
            "reasoning": echo.get("reasoning") or {"effort": None, "summary": None},
            "service_tier": "default",
            "store": echo.get("store") is not False,  # OpenAI's default; the relay keeps it
            "temperature": echo.get("temperature", 1.0),
            "text": echo.get("text") or {"format": {"type": "text"}},
            "tool_choice": echo.get("tool_choice", "auto"),
            "tools": echo.get("tools", []),
            "top_p": echo.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None,
            "user": None,
            "metadata": echo.get("metadata") or {},
        }
        response.update(fields)
        return response

    def _begin(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        response = self._response("in_progress")
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def _add(self, kind: str, prefix: str, item: dict) -> tuple[_Item, bytes]:
        index = len(self._output)
        self._output.append(None)
        suffix = self._context.response_id.removeprefix("resp_")
        entry = _Item(kind, index, f"{prefix}_{suffix}_{index}")
        item = {"id": entry.id, **item}
        return entry, self._event(
            "response.output_item.added", {"output_index": index, "item": item}
        )

    def _done(self, entry: _Item, item: dict) -> bytes:
        self._output[entry.index] = item
        return self._event("response.output_item.done", {"output_index": entry.index, "item": item})

    # -- events

    def encode(self, event: Event) -> bytes:
        if self.closed:
            return b""
        out = self._begin()
        if isinstance(event, ReasoningDelta):
            return out + self._reasoning_delta(event)
        if isinstance(event, TextDelta):
            return out + self._text_delta(event.text)
        if isinstance(event, ToolCallStart):
            return out + self._call_start(event)
        if isinstance(event, ToolCallDelta):
            return out + self._call_delta(event)
        if isinstance(event, ToolCallEnd):
            entry = self._calls.pop(event.index, None)
            return out + (self._close_call(entry, event.arguments) if entry else b"")
        if isinstance(event, UsageEvent):
            self.usage = event.usage
        elif isinstance(event, Finish):
            self._finish = event.reason
        elif isinstance(event, Failure):
            return out + self.fail(event.message, event.code)
        return out

    def _reasoning_delta(self, event: ReasoningDelta) -> bytes:
        out = b""
        if self._reasoning is None:
            out += self._close_message() + self._close_calls()
            self._reasoning, added = self._add(
                "reasoning", "rs", {"type": "reasoning", "summary": []}
            )
            out += added + self._event(
                "response.reasoning_summary_part.added",
                {
                    "item_id": self._reasoning.id,
                    "output_index": self._reasoning.index,
                    "summary_index": 0,
                    "part": {"type": "summary_text", "text": ""},
                },
            )
        entry = self._reasoning
        if event.signature:
            entry.signature = event.signature
        if event.text:
            entry.text.append(event.text)
            out += self._event(
                "response.reasoning_summary_text.delta",
                {
                    "item_id": entry.id,
                    "output_index": entry.index,
                    "summary_index": 0,
                    "delta": event.text,
                },
            )
        return out

    def _close_reasoning(self) -> bytes:
        entry, self._reasoning = self._reasoning, None
        if entry is None:
            return b""
        text = "".join(entry.text)
        where = {"item_id": entry.id, "output_index": entry.index, "summary_index": 0}
        part = {"type": "summary_text", "text": text}
        item = {
            "id": entry.id,
            "type": "reasoning",
            "summary": [part],
            "content": [{"type": "reasoning_text", "text": text}],
            "encrypted_content": encode_reasoning(text, entry.signature, self._kind),
            "status": "completed",
        }
        return (
            self._event("response.reasoning_summary_text.done", {**where, "text": text})
            + self._event("response.reasoning_summary_part.done", {**where, "part": part})
            + self._done(entry, item)
        )

    def _text_delta(self, text: str) -> bytes:
        out = b""
        if self._message is None:
            out += self._close_reasoning() + self._close_calls()
            self._message, added = self._add(
                "message",
                "msg",
                {"type": "message", "status": "in_progress", "role": "assistant", "content": []},
            )
            out += added + self._event(
                "response.content_part.added",
                {
                    "item_id": self._message.id,
                    "output_index": self._message.index,
                    "content_index": 0,
                    "part": _output_text(""),
                },
            )
        entry = self._message
        entry.text.append(text)
        return out + self._event(
            "response.output_text.delta",
            {
                "item_id": entry.id,
                "output_index": entry.index,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            },
        )

    def _close_message(self) -> bytes:
        entry, self._message = self._message, None
        if entry is None:
            return b""
        text = "".join(entry.text)
        where = {"item_id": entry.id, "output_index": entry.index, "content_index": 0}
        item = {
            "id": entry.id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [_output_text(text)],
        }
        return (
            self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
            + self._event("response.content_part.done", {**where, "part": _output_text(text)})
            + self._done(entry, item)
        )

    def _call_start(self, event: ToolCallStart) -> bytes:
        out = self._close_reasoning() + self._close_message()
        name, namespace = event.name, None
        if event.name in self._context.namespaced:
            namespace, name = self._context.namespaced[event.name]
        call_id = call_id_with_signature(event.call_id, self._kind, event.signature)
        if event.custom or event.name in self._context.custom_tools:
            kind = "custom_tool_call" if event.custom else "wrapped"
            call = {"type": "custom_tool_call", "call_id": call_id, "name": name}
            entry, added = self._add(kind, "ctc", {**call, "status": "in_progress", "input": ""})
        else:
            kind = "function_call"
            call = {"type": "function_call", "call_id": call_id, "name": name}
            if namespace:
                call["namespace"] = namespace
            entry, added = self._add(kind, "fc", {**call, "status": "in_progress", "arguments": ""})
        entry.call = call
        self._calls[event.index] = entry
        return out + added

    def _call_delta(self, event: ToolCallDelta) -> bytes:
        entry = self._calls.get(event.index)
        if entry is None:
            return b""
        entry.arguments.append(event.arguments)
        if entry.kind == "wrapped":  # JSON-wrapped input: unwrapped once complete
            return b""
        kind = (
            "response.custom_tool_call_input.delta"
            if entry.kind == "custom_tool_call"
            else "response.function_call_arguments.delta"
        )
        return self._event(
            kind, {"item_id": entry.id, "output_index": entry.index, "delta": event.arguments}
        )

    def _close_call(self, entry: _Item, arguments: str | None = None) -> bytes:
        if arguments is None:
            arguments = "".join(entry.arguments)
        where = {"item_id": entry.id, "output_index": entry.index}
        out = b""
        if entry.kind == "function_call":
            arguments = arguments or "{}"
            if not entry.arguments:
                out += self._event(
                    "response.function_call_arguments.delta", {**where, "delta": arguments}
                )
            item = {"id": entry.id, **entry.call, "arguments": arguments, "status": "completed"}
            out += self._event(
                "response.function_call_arguments.done",
                {**where, "name": entry.call["name"], "arguments": arguments},
            )
            return out + self._done(entry, item)
        text = _unwrap_input(arguments) if entry.kind == "wrapped" else arguments
        if entry.kind == "wrapped" or not entry.arguments:
            if text:
                out += self._event(
                    "response.custom_tool_call_input.delta", {**where, "delta": text}
                )
        item = {"id": entry.id, **entry.call, "input": text, "status": "completed"}
        out += self._event("response.custom_tool_call_input.done", {**where, "input": text})
        return out + self._done(entry, item)

    def _close_calls(self) -> bytes:
        out = b""
        for index in sorted(self._calls):
            out += self._close_call(self._calls[index])
        self._calls.clear()
        return out

    def _close_all(self) -> bytes:
        return self._close_reasoning() + self._close_message() + self._close_calls()

    def _items(self) -> list[dict]:
        return [item for item in self._output if item is not None]

    # -- end

    def finish(self) -> bytes:
        if self.closed:
            return b""
        out = self._begin() + self._close_all()
        self.closed = True
        usage = responses_usage(self.usage)
        if self._finish in ("length", "content_filter"):
            reason = "max_output_tokens" if self._finish == "length" else "content_filter"
            self.final = self._response(
                "incomplete",
                output=self._items(),
                usage=usage,
                incomplete_details={"reason": reason},
            )
            return out + self._event("response.incomplete", {"response": self.final})
        self.final = self._response(
            "completed",
            output=self._items(),
            usage=usage,
            completed_at=self._context.created,
        )
        return out + self._event("response.completed", {"response": self.final})

    def keepalive(self) -> bytes:
        """A repeated ``response.in_progress`` (once the stream has begun): a harmless event
        that resets clients' idle timers while the upstream is silent."""
        if self.closed or not self._started:
            return b""
        return self._event("response.in_progress", {"response": self._response("in_progress")})

    def fail(self, message: str, code: str) -> bytes:
        if self.closed:
            return b""
        out = self._begin()
        self.closed = True
        self.final = self._response(
            "failed",
            output=self._items(),
            usage=responses_usage(self.usage) if self.usage else None,
            error={"code": code, "message": message},
        )
        return out + self._event("response.failed", {"response": self.final})

    def body(self) -> dict:
        """The Response object (after :meth:`finish` or :meth:`fail`)."""
        if self.final is None:
            self.finish()
        assert self.final is not None
        return self.final


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _unwrap_input(arguments: str) -> str:
    """A wrapped custom tool's raw input: the ``input`` string of ``{"input": …}``."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return value["input"]
    if isinstance(value, str):
        return value
    return arguments
