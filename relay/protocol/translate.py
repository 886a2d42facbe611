"""The relay's one entry point for talking to any upstream in any client protocol.

The HTTP layer calls, for every relayed request:

1. :func:`build_upstream_request` — the upstream path, body and headers, plus the
   :class:`TranslationContext` the answer side needs;
2. for a stream, a :class:`StreamTranslator` fed the upstream's bytes; for a plain answer,
   :func:`translate_response` and :func:`response_usage`;
3. on an upstream error status, :func:`translate_error` (what the client sees) and
   :func:`retry_after_hint` (how long the account cools down).

When the client's protocol is the upstream's (Chat client on an ``openai-chat`` account,
Responses client on an ``openai-responses`` one) the body gets only the relay's few rewrites and
the answer's bytes are relayed unchanged. Otherwise the request goes through a
:class:`~.conversation.Conversation` (one reader per client protocol, one writer per upstream
kind) and the answer through the events of :mod:`.events` (one decoder per upstream kind, one
encoder per client protocol). Everything here is pure: no I/O, no clock except for the
``created`` timestamp and the ``resets_at`` retry hint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from . import anthropic, chat, compaction, compaction_answer, gemini, messages, responses
from .conversation import Conversation, ToolCall, ToolResult
from .events import (
    Event,
    Failure,
    ToolCallStart,
    TranslationContext,
    UsageEvent,
    counts_as_delta,
)
from .requests import Endpoint, unsendable_body
from .sse import MAX_EVENT_BYTES, EventSplitter, StreamMeter, Usage, error_event, event_data
from .trust import Confidential, redact

__all__ = [
    "UPSTREAM_KINDS",
    "StreamTranslator",
    "TranslationContext",
    "UpstreamRequest",
    "build_upstream_request",
    "response_usage",
    "retry_after_hint",
    "translate_error",
    "translate_response",
    "upstream_headers",
]

UPSTREAM_KINDS = ("openai-chat", "openai-responses", "anthropic", "gemini")

#: An SSE comment line: keeps a quiet stream's connection busy; clients dispatch nothing.
KEEPALIVE_COMMENT = b": keep-alive\n\n"

#: Responses request fields a Response object repeats back.
_ECHOED = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "prompt_cache_key",
    "reasoning",
    "store",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
)


@dataclass
class UpstreamRequest:
    """What to send upstream: ``POST {base_url}/{path}`` with ``body`` and ``headers``."""

    path: str
    body: dict
    headers: dict[str, str]
    stream: bool
    context: TranslationContext


def _check_echo(echo: dict) -> None:
    """The translated answer repeats these request fields: a value that cannot be written as
    JSON (a lone surrogate, an infinite number) is refused now, as a 400 naming it, rather
    than failing the answer. (The upstream body is checked the same way when it is encoded;
    these fields may not be in it.)"""
    try:
        json.dumps(echo, ensure_ascii=False, allow_nan=False).encode()
    except (UnicodeEncodeError, ValueError, RecursionError) as error:
        raise unsendable_body(echo, error) from None


def _check_kind(upstream_kind: str) -> None:
    if upstream_kind not in UPSTREAM_KINDS:
        raise ValueError(f"unknown upstream kind {upstream_kind!r}")


def build_upstream_request(
    client_body: dict,
    client: Endpoint,
    upstream_kind: str,
    *,
    model: str,
    api_key: str | None,
    reasoning_effort: str | None = None,
    compaction_form: str | None = None,
) -> UpstreamRequest:
    """The upstream request for a validated client body.

    ``model`` is the upstream model id (alias resolved); ``reasoning_effort`` (from an alias)
    wins over the client's. ``compaction_form`` (:mod:`.compaction`'s ``V1`` or ``V2``) marks a
    Responses request that compacts its conversation: relayed to an ``openai-responses``
    upstream (v1 to its ``responses/compact``), a summary turn for any other. Raises
    :class:`~relay.errors.InvalidRequest` for input the upstream cannot be given: files other
    than images and PDFs (for every upstream), and, when translating, ``n`` > 1, audio,
    ``previous_response_id``, OpenAI ``file_id`` references for non-OpenAI upstreams, item or
    part types with no counterpart, and compaction items the relay did not make.
    """
    _check_kind(upstream_kind)
    retained: list[dict] = []
    if compaction_form and upstream_kind != "openai-responses":
        if compaction_form == compaction.V1:
            retained = compaction.retained_user_messages(client_body)
        client_body = compaction.summary_turn_body(client_body, compaction_form)
    stream = client_body.get("stream") is True and compaction_form != compaction.V1
    options = client_body.get("stream_options")
    include_usage = (
        client is Endpoint.CHAT
        and stream
        and isinstance(options, dict)
        and options.get("include_usage") is True
    )
    requested = client_body.get("model")
    context = TranslationContext(
        client=client,
        upstream_kind=upstream_kind,
        model=requested if isinstance(requested, str) and requested else model,
        stream=stream,
        include_usage=include_usage,
        response_id=f"resp_{uuid.uuid4().hex}",
        created=int(time.time()),
        compaction=compaction_form,
        retained=retained,
    )
    if client is Endpoint.RESPONSES:
        context.echo = {name: client_body[name] for name in _ECHOED if name in client_body}
        if reasoning_effort:
            context.echo["reasoning"] = {
                **(client_body.get("reasoning") or {}),
                "effort": reasoning_effort,
            }
    if context.echo and not context.passthrough:
        _check_echo(context.echo)
    if context.passthrough:
        body = _same_protocol_body(client_body, client, model, reasoning_effort, stream)
    else:
        namespaced: dict[str, tuple[str, str]] = {}
        if client is Endpoint.CHAT:
            chat.check_chat_files(client_body)
            conv = chat.read_chat_request(client_body)
        elif client is Endpoint.MESSAGES:
            messages.check_messages_files(client_body)
            conv = messages.read_messages_request(client_body)
        else:
            responses.check_responses_files(client_body)
            conv, namespaced = responses.read_responses_request(client_body)
        conv.stream = stream
        context.tool_names = shorten_tool_names(conv)
        shorten_call_ids(conv, upstream_kind)
        writer = _WRITERS[upstream_kind]
        body = writer(conv, model=model, reasoning_effort=reasoning_effort)
        context.custom_tools = frozenset(tool.name for tool in conv.tools if tool.custom)
        context.namespaced = namespaced
    path = _path(upstream_kind, model, stream)
    if compaction_form == compaction.V1 and upstream_kind == "openai-responses":
        path = "responses/compact"
        body.pop("stream", None)
        body.pop("stream_options", None)
    return UpstreamRequest(
        path=path,
        body=body,
        headers=upstream_headers(upstream_kind, api_key),
        stream=stream,
        context=context,
    )


#: The longest tool name OpenAI, Anthropic and Gemini accept (``^[a-zA-Z0-9_-]{1,64}$``).
MAX_TOOL_NAME = 64

#: The longest tool-call id an upstream kind accepts: OpenAI's Chat Completions refuses a
#: ``tool_call_id`` over 40 characters, its Responses API a ``call_id`` over 64.
MAX_CALL_ID = {"openai-chat": 40, "openai-responses": 64}


def shorten_tool_names(conv: Conversation) -> dict[str, str]:
    """Shorten the conversation's tool names that are longer than :data:`MAX_TOOL_NAME` (an MCP
    server's ``mcp__server__tool`` names often are), in its tools, its tool calls and its tool
    choice alike. Returns the short name → the client's name, for the answer's way back.

    A short name is the name's head and 8 hex digits of its SHA-256: the same name always gets
    the same short name, so a conversation's calls keep matching its tools across turns."""
    long_names = {tool.name for tool in conv.tools if len(tool.name) > MAX_TOOL_NAME}
    for message in conv.messages:
        long_names.update(
            call.name for call in message.tool_calls() if len(call.name) > MAX_TOOL_NAME
        )
    if not long_names:
        return {}
    short = {name: _shortened(name, MAX_TOOL_NAME) for name in long_names}
    for tool in conv.tools:
        tool.name = short.get(tool.name, tool.name)
    for message in conv.messages:
        for call in message.tool_calls():
            call.name = short.get(call.name, call.name)
    if conv.tool_choice_name in short:
        conv.tool_choice_name = short[conv.tool_choice_name]
    return {value: name for name, value in short.items()}


def shorten_call_ids(conv: Conversation, upstream_kind: str) -> None:
    """Shorten the history's tool-call ids that are longer than ``upstream_kind`` accepts
    (:data:`MAX_CALL_ID`; ids another provider made, such as a Gemini call's carried
    signature, can be), in the calls and their results alike. Nothing is restored on the way
    back: the upstream names the calls it makes itself, and the same long id always gets the
    same short one, so a call and its result keep matching."""
    limit = MAX_CALL_ID.get(upstream_kind)
    if limit is None:
        return
    for message in conv.messages:
        for part in message.parts:
            if isinstance(part, ToolCall | ToolResult) and len(part.call_id) > limit:
                part.call_id = _shortened(part.call_id, limit)


def _shortened(name: str, limit: int) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9]}_{digest}"


_WRITERS = {
    "openai-chat": chat.write_chat_request,
    "openai-responses": responses.write_responses_request,
    "anthropic": anthropic.write_anthropic_request,
    "gemini": gemini.write_gemini_request,
}


def _same_protocol_body(
    client_body: dict,
    client: Endpoint,
    model: str,
    reasoning_effort: str | None,
    stream: bool,
) -> dict:
    """The client's body with the relay's rewrites only (see :func:`requests.upstream_payload`),
    plus two: reasoning items the relay made for another upstream (``rly1.`` encrypted content)
    are removed, and compaction items it made are expanded into their summary
    (:func:`.compaction.expand_relay_items`), because OpenAI accepts only its own encrypted
    content."""
    if client is Endpoint.CHAT:
        chat.check_chat_files(client_body)
    elif client is Endpoint.MESSAGES:
        messages.check_messages_files(client_body)
        return _same_messages_body(client_body, model, reasoning_effort)
    else:
        responses.check_responses_files(client_body)
    body = dict(client_body)
    body["model"] = model
    if reasoning_effort is not None:
        if client is Endpoint.CHAT:
            body["reasoning_effort"] = reasoning_effort
        else:
            reasoning = body.get("reasoning")
            body["reasoning"] = {
                **(reasoning if isinstance(reasoning, dict) else {}),
                "effort": reasoning_effort,
            }
    session_id = body.pop("session_id", None)
    if isinstance(session_id, str) and session_id and not body.get("prompt_cache_key"):
        body["prompt_cache_key"] = session_id
    if client is Endpoint.CHAT and stream:
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    if client is Endpoint.RESPONSES and isinstance(body.get("input"), list):
        items = [item for item in body["input"] if not _relay_reasoning(item)]
        body["input"] = compaction.expand_relay_items(items)
    return body


def _same_messages_body(client_body: dict, model: str, reasoning_effort: str | None) -> dict:
    """A Messages body for an Anthropic upstream: the client's, with the upstream model, and an
    alias's reasoning effort as a thinking budget when the client asked for no thinking and
    ``max_tokens`` leaves room for it (Anthropic requires ``budget_tokens < max_tokens``)."""
    body = dict(client_body)
    body["model"] = model
    budget = anthropic.THINKING_BUDGETS.get(reasoning_effort or "")
    max_tokens = body.get("max_tokens")
    if budget and "thinking" not in body and isinstance(max_tokens, int) and budget < max_tokens:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    return body


def _relay_reasoning(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("type") == "reasoning"
        and isinstance(item.get("encrypted_content"), str)
        and item["encrypted_content"].startswith("rly1.")
    )


def _path(upstream_kind: str, model: str, stream: bool) -> str:
    if upstream_kind == "openai-chat":
        return "chat/completions"
    if upstream_kind == "openai-responses":
        return "responses"
    if upstream_kind == "anthropic":
        return "messages"
    return gemini.gemini_path(model, stream)


def upstream_headers(upstream_kind: str, api_key: str | None) -> dict[str, str]:
    """The headers an upstream of ``upstream_kind`` authenticates and versions requests by."""
    if upstream_kind == "anthropic":
        headers = {"anthropic-version": anthropic.ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers
    if upstream_kind == "gemini":
        return {"x-goog-api-key": api_key} if api_key else {}
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


# --------------------------------------------------------------------------------------------
# Answers

_DECODERS = {
    "openai-chat": chat.ChatDecoder,
    "openai-responses": responses.ResponsesDecoder,
    "anthropic": anthropic.AnthropicDecoder,
    "gemini": gemini.GeminiDecoder,
}


def _encoder(context: TranslationContext, upstream_kind: str):
    if context.compaction:
        return compaction_answer.CompactionEncoder(context, upstream_kind, context.retained)
    if context.client is Endpoint.CHAT:
        return chat.ChatEncoder(context, upstream_kind)
    if context.client is Endpoint.MESSAGES:
        return messages.MessagesEncoder(context, upstream_kind)
    return responses.ResponsesEncoder(context, upstream_kind)


def _client_names(event: Event, context: TranslationContext) -> Event:
    """A tool call under the name the client gave its tool (see :func:`shorten_tool_names`)."""
    if isinstance(event, ToolCallStart) and event.name in context.tool_names:
        return dataclasses.replace(event, name=context.tool_names[event.name])
    return event


def _parse_event(event: bytes) -> tuple[str | None, Any]:
    """An SSE event's name and JSON data (``"[DONE]"`` for Chat's end marker; None if the
    event has no data or it is not JSON)."""
    name = None
    for line in event.splitlines():
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    data = event_data(event).strip()
    if not data:
        return name, None
    if data == b"[DONE]":
        return name, "[DONE]"
    try:
        return name, json.loads(data)
    except ValueError:
        return name, None


class StreamTranslator:
    """Upstream stream bytes in, client stream bytes out.

    Feed it the upstream's bytes in any chunking; each call returns the client bytes ready now
    (whole SSE events only). :meth:`finish` closes a stream the upstream ended cleanly;
    :meth:`fail` closes it with the client's error form. After either, the translator returns
    ``b""``. ``usage``, ``deltas`` and ``finished`` are kept current for billing. An upstream
    event longer than ``max_event_bytes`` raises :class:`~relay.protocol.sse.EventTooLarge`
    from :meth:`feed` (the stream cannot go on: :meth:`fail` it).

    An error the upstream reports inside its stream reaches the client redacted
    (:func:`.trust.redact`, with ``confidential``: the call's credential and address), relayed
    or translated; the rest of the stream (the model's own words) is untouched.
    """

    def __init__(
        self,
        upstream_kind: str,
        context: TranslationContext,
        confidential: Confidential | None = None,
        *,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        _check_kind(upstream_kind)
        self._context = context
        self._confidential = confidential
        self._splitter = EventSplitter(max_event_bytes)
        self._passthrough = upstream_kind == context.client.upstream_kind
        self._meter: StreamMeter | None = None
        self._closed = False
        if self._passthrough:
            self._meter = StreamMeter(
                context.client,
                drop_usage_chunk=context.client is Endpoint.CHAT and not context.include_usage,
                opened=context.opened,
            )
        else:
            self._decoder = _DECODERS[upstream_kind]()
            self._encoder = _encoder(context, upstream_kind)
        self._usage: Usage | None = None
        self._deltas = 0
        #: Bytes of the upstream's answer fed so far: what the usage it reports must fit in.
        self.received = 0

    @property
    def usage(self) -> Usage | None:
        return self._meter.usage if self._meter is not None else self._usage

    @property
    def deltas(self) -> int:
        return self._meter.deltas if self._meter is not None else self._deltas

    @property
    def finished(self) -> bool:
        return self._meter.finished if self._meter is not None else self._decoder.finished

    @property
    def passthrough(self) -> bool:
        """The upstream speaks the client's protocol: its bytes are relayed as they are."""
        return self._passthrough

    def final_response(self) -> dict | None:
        """A Responses stream's final Response object once it ended completed or incomplete
        (what the relay keeps for ``previous_response_id``): the one the relay encoded, or,
        relayed, the one the upstream's last event carried. None otherwise."""
        if self._context.client is not Endpoint.RESPONSES:
            return None
        if self._meter is None:
            final = self._encoder.final
        else:
            event = self._meter.last_event
            if event is None or not (
                b"response.completed" in event or b"response.incomplete" in event
            ):
                return None
            _, data = _parse_event(event)
            final = data.get("response") if isinstance(data, dict) else None
        if not isinstance(final, dict) or final.get("status") not in ("completed", "incomplete"):
            return None
        return final

    def feed(self, data: bytes) -> bytes:
        self.received += len(data)
        if self._closed:
            return b""
        return self._relay(self._splitter.feed(data), data)

    def _relay(self, events: list[bytes], data: bytes) -> bytes:
        """The client bytes of whole ``events``; ``data`` is the chunk they were split from
        (the stream's tail at its end)."""
        if self._meter is not None:
            if b"error" in data or (events and b"error" in events[0]):
                # A byte search per chunk (an event cut across chunks is searched whole as
                # the first event); only an error event is decoded.
                events = [_redacted_error_event(event, self._confidential) for event in events]
            return self._meter.forwardable(events)
        return self._translate(events)

    def _translate(self, raw_events: list[bytes]) -> bytes:
        out = []
        for raw in raw_events:
            name, data = _parse_event(raw)
            if data is None:
                continue
            out.append(self._emit(self._decoder.feed(name, data)))
        return b"".join(out)

    def _emit(self, events: list[Event]) -> bytes:
        out = []
        for event in events:
            if counts_as_delta(event):
                self._deltas += 1
            if isinstance(event, UsageEvent):
                self._usage = event.usage
            elif isinstance(event, Failure):
                event = Failure(
                    redact(event.message, self._confidential),
                    redact(event.code, self._confidential),
                )
            elif self._context.tool_names:
                event = _client_names(event, self._context)
            out.append(self._encoder.encode(event))
            if isinstance(event, Failure):
                self._closed = True
        return b"".join(out)

    def flush(self) -> bytes:
        """The client bytes of a last event the upstream ended without its blank line. Call it
        when the upstream's bytes end, before reading :attr:`finished`."""
        if self._closed:
            return b""
        return self._relay(self._splitter.end(), b"")

    def finish(self) -> bytes:
        if self._closed:
            return b""
        out = self._relay(self._splitter.end(), b"")  # a last event without its blank line
        if self._closed:
            return out
        self._closed = True
        if self._meter is not None:
            return out
        return out + self._emit(self._decoder.end()) + self._encoder.finish()

    def keepalive(self) -> bytes:
        """Bytes that tell the client the answer is still coming, during a long upstream silence.

        A relayed stream gets an SSE comment: it collides with nothing the upstream numbers, and
        SDKs skip it. A translated Responses stream, whose events the relay numbers itself, gets
        a real ``response.in_progress`` event: the Codex CLI restarts its idle timer on events,
        and may not on comments (protocols.md §2.5).
        """
        if self._closed:
            return b""
        if self._context.client is Endpoint.MESSAGES:
            return messages.PING  # Anthropic's own keep-alive, in a relayed stream too
        if self._meter is None and isinstance(self._encoder, responses.ResponsesEncoder):
            return self._encoder.keepalive()
        return KEEPALIVE_COMMENT

    def fail(self, message: str, code: str) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        if self._meter is not None:
            return error_event(
                self._context.client,
                self._meter,
                message=message,
                code=code,
                type="rate_limit_error" if code == "rate_limit_exceeded" else "server_error",
                fallback_id=self._context.response_id,
            )
        return self._encoder.fail(message, code)


# What only an error event of a relayed stream holds: Chat's top-level error object, a
# Responses `response.failed` or `error` event (`"error":null` in other events does not match).
_ERROR_HINT = re.compile(rb'"error"\s*:\s*\{|response\.failed|"type"\s*:\s*"error"|event:\s*error')


def _redacted_error_event(event: bytes, confidential: Confidential | None) -> bytes:
    """``event`` with the message, code and param of the error it carries redacted; any other
    event as it is."""
    if not _ERROR_HINT.search(event):
        return event
    try:
        payload = json.loads(event_data(event))
    except (ValueError, RecursionError):
        return event
    if not isinstance(payload, dict):
        return event
    errors = [payload.get("error")]
    response = payload.get("response")
    if isinstance(response, dict):
        errors.append(response.get("error"))
    if payload.get("type") == "error":
        errors.append(payload)
    for error in errors:
        if isinstance(error, dict):
            for name in ("message", "code", "param"):
                if isinstance(error.get(name), str):
                    error[name] = redact(error[name], confidential)
    head = b"".join(
        line + b"\n" for line in event.splitlines() if line and not line.startswith(b"data:")
    )
    return head + b"data: " + json.dumps(payload).encode() + b"\n\n"


def translate_response(upstream_kind: str, context: TranslationContext, body: dict) -> dict:
    """A non-streamed upstream answer as the client's non-streamed answer."""
    _check_kind(upstream_kind)
    if upstream_kind == context.client.upstream_kind:
        return body
    decoder = _DECODERS[upstream_kind]()
    encoder = _encoder(context, upstream_kind)
    for event in decoder.decode_body(body):
        encoder.encode(_client_names(event, context))
    if isinstance(encoder, chat.ChatEncoder):
        return encoder.body()
    if not encoder.closed:
        encoder.finish()
    return encoder.body()


def response_usage(upstream_kind: str, body: dict) -> Usage | None:
    """The usage a non-streamed upstream answer reports, or None."""
    _check_kind(upstream_kind)
    if not isinstance(body, dict):
        return None
    if upstream_kind == "openai-chat":
        return Usage.from_body(Endpoint.CHAT, body)
    if upstream_kind == "openai-responses":
        return Usage.from_body(Endpoint.RESPONSES, body)
    if upstream_kind == "anthropic":
        usage = body.get("usage")
        return anthropic.anthropic_usage(usage) if isinstance(usage, dict) else None
    metadata = body.get("usageMetadata")
    return gemini.gemini_usage(metadata) if isinstance(metadata, dict) else None


# --------------------------------------------------------------------------------------------
# Errors

_TYPES_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

#: Anthropic error type → (client status, OpenAI type, OpenAI code).
_ANTHROPIC_ERRORS = {
    "invalid_request_error": (400, "invalid_request_error", None),
    "authentication_error": (401, "invalid_request_error", "invalid_api_key"),
    "permission_error": (403, "permission_error", "permission_denied"),
    "not_found_error": (404, "invalid_request_error", "not_found"),
    "request_too_large": (413, "invalid_request_error", "request_too_large"),
    "rate_limit_error": (429, "rate_limit_error", "rate_limit_exceeded"),
    "api_error": (500, "server_error", None),
    "overloaded_error": (503, "service_unavailable_error", "server_is_overloaded"),
}

#: Gemini (google.rpc) status → (client status, OpenAI type, OpenAI code).
_GEMINI_ERRORS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "FAILED_PRECONDITION": (400, "invalid_request_error", None),
    "OUT_OF_RANGE": (400, "invalid_request_error", None),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "PERMISSION_DENIED": (403, "permission_error", "permission_denied"),
    "NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "CANCELLED": (499, "server_error", None),
    "INTERNAL": (500, "server_error", None),
    "UNAVAILABLE": (503, "service_unavailable_error", "server_is_overloaded"),
    "DEADLINE_EXCEEDED": (504, "timeout_error", "timeout"),
}

_CONTEXT_TOO_LONG = re.compile(
    r"prompt is too long|context.{0,20}(length|window)|exceeds the maximum number of tokens"
    r"|maximum context length|too many tokens",
    re.IGNORECASE,
)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def translate_error(upstream_kind: str, status: int, body: bytes) -> tuple[int, dict]:
    """An upstream error answer as (status for the client, OpenAI error body).

    OpenAI upstreams' errors keep their fields. Anthropic's and Gemini's are mapped by their
    error type/status (Anthropic 529 ``overloaded_error`` → 503 ``server_is_overloaded``; Gemini
    ``RESOURCE_EXHAUSTED`` → 429 with the RetryInfo delay as "Please try again in Ns.", the
    phrase the Codex CLI and other clients parse). A context overflow is reported with code
    ``context_length_exceeded`` whatever the upstream called it. A body with no error of the
    upstream's shape (HTML, plain text, empty) gets the relay's own message and code
    ``upstream_invalid_response``, never its text. The message is the upstream's words as they
    are: the caller redacts them (:func:`relay.protocol.trust.redact`).
    """
    _check_kind(upstream_kind)
    payload = _json(body)
    if isinstance(payload, list) and payload:  # Gemini sometimes wraps errors in an array
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    message: str | None = None
    kind: str | None = None
    code: str | None = None
    param: str | None = None
    out_status = 503 if status == 529 else status
    if upstream_kind in ("openai-chat", "openai-responses"):
        if isinstance(error, dict):
            message = _str(error.get("message"))
            kind = _str(error.get("type"))
            code = _str(error.get("code"))
            param = _str(error.get("param"))
        elif isinstance(error, str):
            message = error
    elif upstream_kind == "anthropic":
        if isinstance(error, dict):
            message = _str(error.get("message"))
            mapped = _ANTHROPIC_ERRORS.get(str(error.get("type")))
            if mapped:
                out_status, kind, code = mapped
    elif isinstance(error, dict):  # gemini
        message = _str(error.get("message"))
        mapped = _GEMINI_ERRORS.get(str(error.get("status")))
        if mapped:
            out_status, kind, code = mapped
        delay = _gemini_retry_delay(error)
        if out_status == 429 and delay is not None and message and "try again" not in message:
            message = f"{message.rstrip()} Please try again in {max(1, round(delay))}s."
    if message is None:
        # Not an API error (a proxy's HTML page, plain text, nothing): its words are not the
        # upstream API's, so the client gets the relay's own message, with the status kept.
        message = (
            f"The upstream answered with HTTP {status} and no API error (an empty or non-JSON "
            "body, such as a proxy's error page). Try again; if it persists, tell the relay's "
            "operator."
        )
        code = code or "upstream_invalid_response"
    if out_status == 400 and code is None and _CONTEXT_TOO_LONG.search(message):
        code = "context_length_exceeded"
    if kind is None:
        kind = _TYPES_BY_STATUS.get(out_status, "server_error" if out_status >= 500 else "")
        kind = kind or "invalid_request_error"
    return out_status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
_TRY_AGAIN = re.compile(
    r"(?:try again|retry)(?: after| in)?\s+(\d+(?:\.\d+)?)\s*"
    r"(ms|milliseconds?|s|secs?|seconds?|m|mins?|minutes?)\b",
    re.IGNORECASE,
)


def _gemini_retry_delay(error: dict) -> float | None:
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            delay = detail.get("retryDelay")
            match = _DURATION.match(delay) if isinstance(delay, str) else None
            if match:
                return float(match.group(1))
    return None


def retry_after_hint(
    upstream_kind: str, status: int, headers: Mapping[str, str], body: bytes
) -> float | None:
    """Seconds the account should cool down, if the upstream said.

    In order: ``retry-after-ms``, ``retry-after`` (seconds or an HTTP date), the body's
    ``resets_in_seconds`` / ``resets_at`` (ChatGPT backend), Gemini's RetryInfo ``retryDelay``,
    "try again in Ns" (or ms, minutes) in the message, and on a 429 the ``x-ratelimit-reset-*``
    of the exhausted limits (OpenAI's ``6m0s`` form). The value is finite and not negative, but
    it is the upstream's word: the caller bounds it (``server.max_retry_after_s``).
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    value = lowered.get("retry-after-ms")
    if value is not None:
        seconds = _float(value)
        if seconds is not None:
            return max(0.0, seconds / 1000)
    value = lowered.get("retry-after")
    if value is not None:
        seconds = _float(value)
        if seconds is None:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError):
                seconds = None
        if seconds is not None:
            return max(0.0, seconds)
    payload = _json(body)
    if isinstance(payload, list) and payload:
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        seconds = _float(error.get("resets_in_seconds"))
        if seconds is not None:
            return max(0.0, seconds)
        resets_at = _float(error.get("resets_at"))
        if resets_at is not None:
            return max(0.0, resets_at - time.time())
        delay = _gemini_retry_delay(error)
        if delay is not None:
            return delay
        message = error.get("message")
    else:
        message = body.decode("utf-8", "replace")
    if isinstance(message, str):
        match = _TRY_AGAIN.search(message)
        number = _float(match.group(1)) if match else None
        if match and number is not None:  # a thousand digits are no delay either
            unit = match.group(2).lower()
            if unit.startswith("ms") or unit.startswith("milli"):
                return number / 1000
            if unit.startswith("m"):
                return number * 60
            return number
    if status == 429:
        return _ratelimit_reset(lowered)
    return None


_RESET = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?"
                    r"(?:(\d+(?:\.\d+)?)ms)?$")


def _ratelimit_reset(headers: Mapping[str, str]) -> float | None:
    """The longest ``x-ratelimit-reset-{requests,tokens}`` among the limits that are exhausted
    (``remaining`` 0, or not said), in OpenAI's ``1h2m3.5s`` / ``20ms`` form."""
    resets = []
    for limit in ("requests", "tokens"):
        value = headers.get(f"x-ratelimit-reset-{limit}", "").strip()
        match = _RESET.match(value) if value else None
        if match is None or not any(match.groups()):
            continue
        if headers.get(f"x-ratelimit-remaining-{limit}", "0").strip() != "0":
            continue
        hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
        resets.append(hours * 3600 + minutes * 60 + seconds + millis / 1000)
    return max(resets) if resets else None


def _float(value: Any) -> float | None:
    """A finite number, or None (``inf`` and ``nan`` are no delay an account can rest)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None
