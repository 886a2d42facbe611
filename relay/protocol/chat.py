"""OpenAI Chat Completions: request reader and writer, answer decoder and encoder.

* :func:`read_chat_request` — a client's Chat body → :class:`Conversation`;
* :func:`write_chat_request` — :class:`Conversation` → the body for an ``openai-chat`` upstream
  (DeepSeek, Qwen, vLLM, … when the client speaks Responses);
* :class:`ChatDecoder` — an ``openai-chat`` upstream's chunks or body → events;
* :class:`ChatEncoder` — events → Chat chunks or a ``chat.completion`` body for the client.

Shapes follow protocols.md §3; mappings §4.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidRequest
from .conversation import (
    CUSTOM_TOOL_SCHEMA,
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
    custom_tool_description,
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
    split_call_id,
)
from .sse import Usage, json_data

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse_data(payload: Any) -> bytes:
    return b"data: " + json_data(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"

# --------------------------------------------------------------------------------------------
# Request: Chat body → Conversation


def check_chat_files(body: dict) -> None:
    """Reject file inputs other than images and PDFs anywhere in a Chat body."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict):
                _check_chat_part(part, f"messages[{i}].content[{j}]")


def _check_chat_part(part: dict, where: str) -> None:
    kind = part.get("type")
    if kind == "image_url":
        url = _image_url(part)
        if url:
            check_image_url(url, where)
    elif kind == "file":
        file = part.get("file") if isinstance(part.get("file"), dict) else {}
        check_file(data=file.get("file_data"), filename=file.get("filename"), where=where)


def _image_url(part: dict) -> str | None:
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else None


def read_chat_request(body: dict) -> Conversation:
    """The Conversation a Chat Completions body describes.

    Raises :class:`InvalidRequest` for what no other upstream can do: ``n`` > 1, audio input,
    custom tools, files that are neither images nor PDFs.
    """
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise InvalidRequest(
            "'n' greater than 1 is not supported for this model: its upstream returns one "
            "choice per request.",
            param="n",
        )
    conv = Conversation(stream=body.get("stream") is True)
    for i, message in enumerate(body.get("messages") or []):
        conv.messages.append(_read_message(message, f"messages[{i}]"))
    conv.messages = [m for m in conv.messages if m.parts]
    _read_tools(body, conv)
    effort = body.get("reasoning_effort")
    if effort is None and isinstance(body.get("reasoning"), dict):  # Cursor sends this shape
        effort = body["reasoning"].get("effort")
    conv.reasoning_effort = effort if isinstance(effort, str) else None
    conv.max_output_tokens = _int(body.get("max_completion_tokens")) or _int(body.get("max_tokens"))
    conv.temperature = _number(body.get("temperature"))
    conv.top_p = _number(body.get("top_p"))
    stop = body.get("stop")
    conv.stop = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    conv.response_format = _read_response_format(body.get("response_format"))
    conv.verbosity = body.get("verbosity") if isinstance(body.get("verbosity"), str) else None
    conv.user = body.get("user") if isinstance(body.get("user"), str) else None
    key = body.get("prompt_cache_key") or body.get("session_id")
    conv.prompt_cache_key = key if isinstance(key, str) and key else None
    if isinstance(body.get("parallel_tool_calls"), bool):
        conv.parallel_tool_calls = body["parallel_tool_calls"]
    return conv


def _read_message(message: dict, where: str) -> Message:
    role = message.get("role")
    content = message.get("content")
    if role in ("system", "developer"):
        return Message("system", [Text(_plain_text(content))])
    if role == "user":
        return Message("user", _read_user_content(content, where))
    if role == "assistant":
        return _read_assistant(message, where)
    if role in ("tool", "function"):
        call_id = message.get("tool_call_id")
        if role == "function" or not isinstance(call_id, str):
            call_id = _legacy_call_id(message.get("name"))
        return Message(
            "tool", [ToolResult(split_call_id(call_id).id, _read_tool_content(content, where))]
        )
    raise InvalidRequest(
        f"'{where}.role' must be one of system, developer, user, assistant, tool; got {role!r}.",
        param=f"{where}.role",
    )


def _legacy_call_id(name: Any) -> str:
    return f"call_{name if isinstance(name, str) else 'function'}"


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict):
                value = part.get("text") if part.get("type") != "refusal" else part.get("refusal")
                if isinstance(value, str):
                    texts.append(value)
        return "".join(texts)
    return ""


def _read_user_content(content: Any, where: str) -> list:
    if isinstance(content, str):
        return [Text(content)] if content else []
    parts: list = []
    for j, part in enumerate(content or []):
        if not isinstance(part, dict):
            continue
        part_where = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind == "text":
            if isinstance(part.get("text"), str):
                parts.append(Text(part["text"]))
        elif kind == "image_url":
            url = _image_url(part)
            if not url:
                raise InvalidRequest(f"'{part_where}.image_url.url' is required.", param=part_where)
            check_image_url(url, part_where)
            detail = (
                part["image_url"].get("detail") if isinstance(part["image_url"], dict) else None
            )
            if is_pdf_data_url(url):
                parts.append(File(data=url, filename="document.pdf"))
            else:
                parts.append(Image(url=url, detail=detail))
        elif kind == "file":
            file = part.get("file") if isinstance(part.get("file"), dict) else {}
            data, filename = file.get("file_data"), file.get("filename")
            check_file(data=data, filename=filename, where=part_where)
            if not data and not file.get("file_id"):
                raise InvalidRequest(
                    f"'{part_where}.file' needs 'file_data' or 'file_id'.", param=part_where
                )
            parts.append(File(data=data, filename=filename, file_id=file.get("file_id")))
        elif kind == "input_audio":
            raise InvalidRequest(
                f"Audio input ('{part_where}') is not supported for this model: its upstream "
                "does not accept audio.",
                param=part_where,
            )
        else:
            raise InvalidRequest(
                f"'{part_where}.type' {kind!r} is not a supported content part type.",
                param=part_where,
            )
    return parts


def _read_tool_content(content: Any, where: str) -> str | list:
    if isinstance(content, str) or content is None:
        return content or ""
    parts = _read_user_content(content, where)
    if all(isinstance(part, Text) for part in parts):
        return "".join(part.text for part in parts)
    return parts


def _read_assistant(message: dict, where: str) -> Message:
    parts: list = []
    calls = []
    for k, call in enumerate(message.get("tool_calls") or []):
        if not isinstance(call, dict):
            continue
        if call.get("type", "function") != "function":
            raise InvalidRequest(
                f"'{where}.tool_calls[{k}]' has type {call.get('type')!r}; only function tool "
                "calls can be relayed to this model's upstream.",
                param=f"{where}.tool_calls[{k}]",
            )
        function = call.get("function") or {}
        carried = split_call_id(str(call.get("id") or f"call_{k}"))
        arguments = function.get("arguments")
        calls.append(
            ToolCall(
                carried.id,
                str(function.get("name") or ""),
                arguments if isinstance(arguments, str) else _dumps(arguments or {}),
                signature=carried.signature,
                signature_kind=carried.signature_kind,
            )
        )
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and not calls:
        calls.append(
            ToolCall(
                _legacy_call_id(legacy.get("name")),
                str(legacy.get("name") or ""),
                str(legacy.get("arguments") or "{}"),
            )
        )
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = message.get("reasoning") if isinstance(message.get("reasoning"), str) else ""
    # Anthropic's thinking signature travels in the first call id of the turn (ChatEncoder).
    signed = next((c for c in calls if c.signature_kind == "anthropic"), None)
    if reasoning or signed:
        parts.append(
            Reasoning(
                reasoning,
                signature=signed.signature if signed else None,
                kind="anthropic" if signed else None,
            )
        )
    text = _plain_text(message.get("content"))
    if text:
        parts.append(Text(text))
    parts.extend(calls)
    return Message("assistant", parts)


def _read_tools(body: dict, conv: Conversation) -> None:
    for k, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "function":
            function = tool.get("function") or {}
            conv.tools.append(
                Tool(
                    name=str(function.get("name") or ""),
                    description=function.get("description"),
                    parameters=function.get("parameters"),
                    strict=function.get("strict"),
                )
            )
        else:
            raise InvalidRequest(
                f"'tools[{k}]' has type {tool.get('type')!r}; only function tools can be relayed "
                "to this model's upstream.",
                param=f"tools[{k}]",
            )
    for function in body.get("functions") or []:  # legacy
        if isinstance(function, dict):
            conv.tools.append(
                Tool(
                    name=str(function.get("name") or ""),
                    description=function.get("description"),
                    parameters=function.get("parameters"),
                )
            )
    choice = body.get("tool_choice", body.get("function_call"))
    if isinstance(choice, str):
        conv.tool_choice = choice
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if isinstance(name, str):
            conv.tool_choice, conv.tool_choice_name = "function", name


def _read_response_format(value: Any) -> dict | None:
    if not isinstance(value, dict):
        return None
    if value.get("type") == "json_schema":
        schema = value.get("json_schema") or {}
        return {
            "type": "json_schema",
            "name": schema.get("name") or "response",
            "schema": schema.get("schema") or {},
            "strict": schema.get("strict"),
        }
    if value.get("type") == "json_object":
        return {"type": "json_object"}
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Request: Conversation → Chat body (for openai-chat upstreams)


def write_chat_request(conv: Conversation, *, model: str, reasoning_effort: str | None) -> dict:
    """The Chat Completions body for an OpenAI-compatible upstream.

    Decisions: a ``developer`` (or later ``system``) message stays in place with role
    ``system``, which every OpenAI-compatible server accepts (DeepSeek and Qwen reject
    ``developer``); the output cap is sent as ``max_tokens``, the name third-party servers
    know; reasoning from earlier turns is sent back as ``reasoning_content`` on its assistant
    message, which DeepSeek's thinking mode requires on tool-call turns (protocols.md §5.3).
    """
    body: dict[str, Any] = {"model": model, "messages": _chat_messages(conv)}
    if conv.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if conv.tools:
        body["tools"] = [_chat_tool(tool) for tool in conv.tools]
        if conv.tool_choice == "function":
            body["tool_choice"] = {"type": "function", "function": {"name": conv.tool_choice_name}}
        elif conv.tool_choice:
            body["tool_choice"] = conv.tool_choice
        if conv.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = conv.parallel_tool_calls
    effort = reasoning_effort or conv.reasoning_effort
    if effort:
        body["reasoning_effort"] = effort
    if conv.max_output_tokens:
        body["max_tokens"] = conv.max_output_tokens
    for name in ("temperature", "top_p"):
        if getattr(conv, name) is not None:
            body[name] = getattr(conv, name)
    if conv.stop:
        body["stop"] = conv.stop
    fmt = conv.response_format
    if fmt and fmt["type"] == "json_schema":
        schema = {"name": fmt["name"], "schema": fmt["schema"]}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt:
        body["response_format"] = {"type": "json_object"}
    if conv.verbosity:
        body["verbosity"] = conv.verbosity
    if conv.user:
        body["user"] = conv.user
    if conv.prompt_cache_key:
        body["prompt_cache_key"] = conv.prompt_cache_key
    return body


def _chat_messages(conv: Conversation) -> list[dict]:
    messages: list[dict] = []
    # Chat tool messages carry text only: images and files a tool returned (Codex's view_image)
    # follow the tool messages of the turn as one user message.
    attachments: list = []
    for message in arrange_tool_results(conv.messages):
        if message.role != "tool" and attachments:
            messages.append({"role": "user", "content": _chat_user_content(attachments)})
            attachments = []
        if message.role == "system":
            messages.append({"role": "system", "content": "\n\n".join(message.texts())})
        elif message.role == "user":
            messages.append({"role": "user", "content": _chat_user_content(message.parts)})
        elif message.role == "assistant":
            messages.append(_chat_assistant(message))
        else:
            result = message.parts[0]
            content = [] if isinstance(result.content, str) else result.content
            media = [part for part in content if not isinstance(part, Text)]
            if media:
                attachments.append(Text(f"Attachments returned by tool call {result.call_id}:"))
                attachments.extend(media)
            messages.append(
                {"role": "tool", "tool_call_id": result.call_id, "content": _tool_text(result)}
            )
    if attachments:
        messages.append({"role": "user", "content": _chat_user_content(attachments)})
    return messages


def _chat_user_content(parts: list) -> str | list:
    if all(isinstance(part, Text) for part in parts):
        return "".join(part.text for part in parts)
    content = []
    for part in parts:
        if isinstance(part, Text):
            content.append({"type": "text", "text": part.text})
        elif isinstance(part, Image):
            if part.file_id and not part.url:
                content.append({"type": "file", "file": {"file_id": part.file_id}})
                continue
            image: dict[str, Any] = {"url": part.url}
            if part.detail:
                image["detail"] = part.detail
            content.append({"type": "image_url", "image_url": image})
        elif isinstance(part, File):
            content.append({"type": "file", "file": _chat_file(part)})
    return content


def _chat_file(part: File) -> dict:
    if part.file_id:
        return {"file_id": part.file_id}
    if part.url and not part.data:
        raise InvalidRequest(
            "A file given by URL cannot be relayed to a Chat Completions upstream; send it "
            "inline as base64 data.",
            param="input",
        )
    data = part.data or ""
    if not data.startswith("data:"):
        data = f"data:{part.media_type};base64,{data}"
    return {"filename": part.filename or "document.pdf", "file_data": data}


def _tool_text(result: ToolResult) -> str:
    if isinstance(result.content, str):
        return result.content
    texts = []
    for part in result.content:
        if isinstance(part, Text):
            texts.append(part.text)
        else:
            texts.append("[attached below]")
    return "".join(texts)


def _chat_assistant(message: Message) -> dict:
    out: dict[str, Any] = {"role": "assistant"}
    texts = message.texts()
    out["content"] = "\n\n".join(texts) if texts else None
    reasoning = "".join(p.text for p in message.parts if isinstance(p, Reasoning))
    if reasoning:
        out["reasoning_content"] = reasoning
    calls = message.tool_calls()
    if calls:
        out["tool_calls"] = [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": wrapped_arguments(call)},
            }
            for call in calls
        ]
    return out


def wrapped_arguments(call: ToolCall) -> str:
    """A call's arguments as a function's JSON arguments (custom input wrapped)."""
    if call.custom:
        return _dumps({"input": call.arguments})
    return call.arguments or "{}"


def _chat_tool(tool: Tool) -> dict:
    if tool.custom:
        function = {
            "name": tool.name,
            "description": custom_tool_description(tool),
            "parameters": CUSTOM_TOOL_SCHEMA,
        }
    else:
        function = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = tool.parameters or {"type": "object", "properties": {}}
        if tool.strict is not None:
            function["strict"] = tool.strict
    return {"type": "function", "function": function}


# --------------------------------------------------------------------------------------------
# Answer: openai-chat upstream → events

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


class ChatDecoder:
    """Chat chunks (or a ``chat.completion`` body) → events. Only choice 0 is read."""

    def __init__(self) -> None:
        self.finished = False
        self._started = False
        self._calls: dict[int, tuple[int, str]] = {}  # upstream index → (our index, id)
        self._arguments: dict[int, list[str]] = {}
        self._open: list[int] = []
        self._finish: str | None = None

    def feed(self, name: str | None, data: Any) -> list[Event]:
        if data == "[DONE]":
            self.finished = True
            return []
        if not isinstance(data, dict):
            return []
        if isinstance(data.get("error"), dict):
            error = data["error"]
            self.finished = True
            return [Failure(str(error.get("message") or "upstream error"), _code(error))]
        events: list[Event] = []
        if not self._started:
            self._started = True
            events.append(Start(data.get("id"), data.get("model")))
        choices = data.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else None
        if choice is not None:
            self._delta(choice.get("delta") or {}, events)
            if choice.get("finish_reason"):
                self._finished_choice(choice["finish_reason"], events)
        if isinstance(data.get("usage"), dict):
            events.append(UsageEvent(Usage.from_chat(data["usage"])))
        return events

    def _delta(self, delta: dict, events: list[Event]) -> None:
        reasoning = delta.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning = delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            events.append(ReasoningDelta(reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            events.append(TextDelta(content))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            events.append(TextDelta(refusal))
        for position, call in enumerate(delta.get("tool_calls") or []):
            if isinstance(call, dict):
                self._tool_delta(position, call, events)

    def _tool_delta(self, position: int, call: dict, events: list[Event]) -> None:
        key = call.get("index") if isinstance(call.get("index"), int) else position
        function = call.get("function") or {}
        call_id = call.get("id")
        known = self._calls.get(key)
        # A new id at a known index is a new call (some upstreams number every call 0).
        if known is None or (call_id and call_id != known[1] and function.get("name")):
            index = self._new_index()
            call_id = call_id or f"call_{index}"
            self._calls[key] = (index, call_id)
            self._arguments[index] = []
            self._open.append(index)
            events.append(ToolCallStart(index, call_id, str(function.get("name") or "")))
        index = self._calls[key][0]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._arguments[index].append(arguments)
            events.append(ToolCallDelta(index, arguments))

    def _new_index(self) -> int:
        return max(self._arguments, default=-1) + 1

    def _close_calls(self, events: list[Event]) -> None:
        for index in self._open:
            events.append(ToolCallEnd(index, "".join(self._arguments[index]) or "{}"))
        self._open.clear()

    def _finished_choice(self, reason: str, events: list[Event]) -> None:
        self._close_calls(events)
        if self._finish is None:
            self._finish = _FINISH.get(reason, "stop")
            if self._finish == "stop" and self._arguments:
                self._finish = "tool_calls"
            events.append(Finish(self._finish))

    def end(self) -> list[Event]:
        events: list[Event] = []
        self._finished_choice("stop", events)
        return events

    def decode_body(self, body: dict) -> list[Event]:
        events: list[Event] = [Start(body.get("id"), body.get("model"))]
        self._started = True
        choices = body.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        delta = {k: v for k, v in message.items() if k != "tool_calls"}
        delta["tool_calls"] = [
            {**call, "index": k} for k, call in enumerate(message.get("tool_calls") or [])
        ]
        self._delta(delta, events)
        self._finished_choice(choice.get("finish_reason") or "stop", events)
        if isinstance(body.get("usage"), dict):
            events.append(UsageEvent(Usage.from_chat(body["usage"])))
        self.finished = True
        return events


def _code(error: dict) -> str:
    code = error.get("code") or error.get("type")
    return str(code) if code else "server_error"


# --------------------------------------------------------------------------------------------
# Answer: events → Chat chunks / body


def chat_usage(usage: Usage | None) -> dict:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


class ChatEncoder:
    """Events → ``chat.completion.chunk`` SSE (and, collected, a ``chat.completion`` body).

    Provider state for replay travels in tool-call ids (see :mod:`.events`): a call's own
    signature (Gemini), or else the signature of the reasoning just before it (Anthropic thinking;
    only the first call of the turn carries it).
    """

    def __init__(self, context: TranslationContext, upstream_kind: str) -> None:
        self._context = context
        self._kind = upstream_kind
        suffix = context.response_id.removeprefix("resp_")
        self.id = f"chatcmpl-{suffix}"
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._pending_signature: str | None = None
        self._calls: dict[int, dict] = {}
        self._streamed_arguments: set[int] = set()
        self.usage: Usage | None = None
        self._finish: str | None = None
        self._finish_sent = False
        self._started = False
        self.closed = False

    # -- stream

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self._context.created,
            "model": self._context.model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self._context.include_usage:
            payload["usage"] = None
        return sse_data(payload)

    def encode(self, event: Event) -> bytes:
        if self.closed:
            return b""
        out = b""
        if not self._started and not isinstance(event, Failure):
            self._started = True
            out = self._chunk({"role": "assistant", "content": ""})
        if isinstance(event, TextDelta):
            self._text.append(event.text)
            return out + self._chunk({"content": event.text})
        if isinstance(event, ReasoningDelta):
            if event.signature:
                self._pending_signature = event.signature
            if not event.text:
                return out
            self._reasoning.append(event.text)
            return out + self._chunk({"reasoning_content": event.text})
        if isinstance(event, ToolCallStart):
            signature = event.signature or self._pending_signature
            self._pending_signature = None
            call_id = call_id_with_signature(event.call_id, self._kind, signature)
            self._calls[event.index] = {
                "id": call_id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            header = {
                "index": event.index,
                "id": call_id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return out + self._chunk({"tool_calls": [header]})
        if isinstance(event, ToolCallDelta):
            self._streamed_arguments.add(event.index)
            return out + self._arguments_chunk(event.index, event.arguments)
        if isinstance(event, ToolCallEnd):
            call = self._calls.get(event.index)
            if call is None:
                return out
            call["function"]["arguments"] = event.arguments
            if event.index not in self._streamed_arguments and event.arguments:
                self._streamed_arguments.add(event.index)
                return out + self._arguments_chunk(event.index, event.arguments)
            return out
        if isinstance(event, UsageEvent):
            self.usage = event.usage
            return out
        if isinstance(event, Finish):
            return out + self._send_finish(event.reason)
        if isinstance(event, Failure):
            return out + self.fail(event.message, event.code)
        return out

    def _arguments_chunk(self, index: int, arguments: str) -> bytes:
        return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})

    def _finish_reason(self, reason: str) -> str:
        return "tool_calls" if self._calls and reason == "stop" else reason

    def _send_finish(self, reason: str) -> bytes:
        self._finish = self._finish_reason(reason)
        if self._finish_sent:
            return b""
        self._finish_sent = True
        return self._chunk({}, self._finish)

    def finish(self) -> bytes:
        if self.closed:
            return b""
        out = b""
        if not self._started:
            self._started = True
            out += self._chunk({"role": "assistant", "content": ""})
        out += self._send_finish(self._finish or "stop")
        if self._context.include_usage:
            out += sse_data(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self._context.created,
                    "model": self._context.model,
                    "choices": [],
                    "usage": chat_usage(self.usage),
                }
            )
        self.closed = True
        return out + DONE

    def fail(self, message: str, code: str) -> bytes:
        if self.closed:
            return b""
        self.closed = True
        error_type = "rate_limit_error" if code == "rate_limit_exceeded" else "server_error"
        return sse_data(
            {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        )

    # -- body

    def body(self) -> dict:
        """The ``chat.completion`` for the events encoded so far."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self._text) if self._text or not self._calls else None,
            "refusal": None,
            "annotations": [],
        }
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._calls:
            message["tool_calls"] = [self._calls[index] for index in sorted(self._calls)]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self._context.created,
            "model": self._context.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self._finish_reason(self._finish or "stop"),
                }
            ],
            "usage": chat_usage(self.usage),
        }
