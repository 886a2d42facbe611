"""Gemini ``generateContent`` as an upstream: request writer and answer decoder (§5.2).

Decisions where the mapping leaves a choice:

* Leading system messages become ``systemInstruction``; later ones become user text in place.
* Tool results are matched to their call by function name (``functionResponse.name``), taken
  from the call with the same id earlier in the conversation; calls carry no ids upstream.
* Gemini 3 requires each replayed function call to carry the ``thoughtSignature`` it came with.
  The relay returns it in the call id (see :mod:`.events`) and puts it back on the call. When a
  model turn's calls carry none (history from another upstream, or from before the relay), the
  first call gets Google's documented placeholder :data:`SKIP_SIGNATURE`, so the request is not
  rejected.
* Schemas are reduced to the OpenAPI subset Gemini accepts (:func:`clean_schema`): ``$ref`` is
  inlined, ``["string", "null"]`` types become ``nullable``, unsupported keywords are dropped.
* Reasoning effort becomes ``thinkingConfig``: ``thinkingLevel`` for Gemini 3 models,
  ``thinkingBudget`` (:data:`THINKING_BUDGETS`) for earlier ones, with ``includeThoughts`` so
  the thoughts come back as reasoning. Without an effort the model's default applies.
* An http(s) image or file URL is passed as ``fileData`` (Gemini fetches only some URLs; the
  relay does no I/O to inline others).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..errors import InvalidRequest
from .anthropic import tool_input
from .conversation import (
    CUSTOM_TOOL_SCHEMA,
    Conversation,
    File,
    Image,
    Text,
    Tool,
    ToolCall,
    ToolResult,
    arrange_tool_results,
    custom_tool_description,
    data_url_media_type,
    data_url_payload,
    media_type_for_name,
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
from .sse import Usage, token_count

#: Placeholder signature Google documents for function calls whose real signature is unknown.
SKIP_SIGNATURE = "skip_thought_signature_validator"

#: ``thinkingBudget`` per effort for Gemini 2.5 (Flash accepts 0–24576, Pro 128–32768).
THINKING_BUDGETS = {
    "none": 0,
    "minimal": 512,
    "low": 1024,
    "medium": 8192,
    "high": 16384,
    "xhigh": 24576,
    "max": 24576,
}
#: ``thinkingLevel`` per effort for Gemini 3 (``low`` and ``high`` are accepted by every
#: Gemini 3 model).
THINKING_LEVELS = {
    "none": "low",
    "minimal": "low",
    "low": "low",
    "medium": "high",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


def gemini_path(model: str, stream: bool) -> str:
    model = model.removeprefix("models/")
    if stream:
        return f"models/{model}:streamGenerateContent?alt=sse"
    return f"models/{model}:generateContent"


# --------------------------------------------------------------------------------------------
# Request


def write_gemini_request(conv: Conversation, *, model: str, reasoning_effort: str | None) -> dict:
    system, rest = conv.split_system()
    names = conv.tool_names()
    items: list[tuple[str, list]] = []
    for message in arrange_tool_results(rest):
        if message.role == "system":
            items.append(("user", [{"text": t} for t in message.texts() if t]))
        elif message.role == "user":
            items.append(("user", _parts(message.parts)))
        elif message.role == "assistant":
            items.append(("model", _model_parts(message.parts)))
        else:
            items.append(("user", _function_response(message.parts[0], names)))
    body: dict[str, Any] = {
        "contents": [{"role": role, "parts": parts} for role, parts in merge_roles(items)]
    }
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    if conv.tools:
        body["tools"] = [{"functionDeclarations": [_declaration(t) for t in conv.tools]}]
        config = _tool_config(conv)
        if config:
            body["toolConfig"] = {"functionCallingConfig": config}
    generation = _generation_config(conv, model, reasoning_effort or conv.reasoning_effort)
    if generation:
        body["generationConfig"] = generation
    return body


def _no_file_ids() -> InvalidRequest:
    return InvalidRequest(
        "Files given by 'file_id' are stored at OpenAI and cannot be sent to this model's "
        "upstream; send the file inline as base64 data.",
        param="file_id",
    )


def _media(url: str | None, data: str | None, media: str) -> dict:
    if data:
        return {"inlineData": {"mimeType": media, "data": data}}
    return {"fileData": {"mimeType": media, "fileUri": url}}


def _parts(parts: list) -> list[dict]:
    out = []
    for part in parts:
        if isinstance(part, Text):
            if part.text:
                out.append({"text": part.text})
        elif isinstance(part, Image):
            if not part.url:
                raise _no_file_ids()
            if part.url.startswith("data:"):
                media = data_url_media_type(part.url) or "image/png"
                out.append(_media(None, data_url_payload(part.url), media))
            else:
                out.append(_media(part.url, None, media_type_for_name(part.url) or "image/jpeg"))
        elif isinstance(part, File):
            if part.file_id and not (part.data or part.url):
                raise _no_file_ids()
            out.append(_media(part.url, part.base64, part.media_type))
    return out


def _model_parts(parts: list) -> list[dict]:
    out = []
    calls = [p for p in parts if isinstance(p, ToolCall)]
    signed = any(c.signature_kind == "gemini" for c in calls)
    for part in parts:
        if isinstance(part, Text):
            if part.text:
                out.append({"text": part.text})
        elif isinstance(part, ToolCall):
            call: dict[str, Any] = {"functionCall": {"name": part.name, "args": tool_input(part)}}
            if part.signature_kind == "gemini":
                call["thoughtSignature"] = part.signature
            elif not signed and part is calls[0]:
                call["thoughtSignature"] = SKIP_SIGNATURE
            out.append(call)
        # Reasoning is not replayed: Gemini needs only the signatures, not the thoughts.
    return out


def _function_response(result: ToolResult, names: dict[str, str]) -> list[dict]:
    key = "error" if result.is_error else "result"
    parts: list[dict] = [
        {
            "functionResponse": {
                "name": names.get(result.call_id, "unknown_function"),
                "response": {key: result.text()},
            }
        }
    ]
    if not isinstance(result.content, str):
        parts.extend(_parts([p for p in result.content if not isinstance(p, Text)]))
    return parts


def _declaration(tool: Tool) -> dict:
    if tool.custom:
        declaration = {
            "name": tool.name,
            "description": custom_tool_description(tool),
            "parameters": clean_schema(CUSTOM_TOOL_SCHEMA),
        }
        return declaration
    declaration = {"name": tool.name}
    if tool.description:
        declaration["description"] = tool.description
    if tool.parameters:
        schema = clean_schema(tool.parameters)
        # Gemini rejects an OBJECT with no properties: a tool without parameters has none.
        if schema.get("properties") or schema.get("type") != "object":
            declaration["parameters"] = schema
    return declaration


def _tool_config(conv: Conversation) -> dict | None:
    if conv.tool_choice == "auto":
        return {"mode": "AUTO"}
    if conv.tool_choice == "none":
        return {"mode": "NONE"}
    if conv.tool_choice == "required":
        return {"mode": "ANY"}
    if conv.tool_choice == "function":
        return {"mode": "ANY", "allowedFunctionNames": [conv.tool_choice_name]}
    return None


def _generation_config(conv: Conversation, model: str, effort: str | None) -> dict:
    config: dict[str, Any] = {}
    if conv.temperature is not None:
        config["temperature"] = conv.temperature
    if conv.top_p is not None:
        config["topP"] = conv.top_p
    if conv.max_output_tokens:
        config["maxOutputTokens"] = conv.max_output_tokens
    if conv.stop:
        config["stopSequences"] = conv.stop[:5]
    fmt = conv.response_format
    if fmt:
        config["responseMimeType"] = "application/json"
        if fmt["type"] == "json_schema" and fmt.get("schema"):
            config["responseSchema"] = clean_schema(fmt["schema"])
    if effort:
        config["thinkingConfig"] = _thinking(model, effort)
    return config


def _thinking(model: str, effort: str) -> dict:
    if "gemini-3" in model:
        return {"thinkingLevel": THINKING_LEVELS.get(effort, "high"), "includeThoughts": True}
    budget = THINKING_BUDGETS.get(effort, THINKING_BUDGETS["medium"])
    if budget == 0:
        if "pro" in model:  # 2.5 Pro cannot turn thinking off; use its minimum
            return {"thinkingBudget": 128}
        return {"thinkingBudget": 0}
    return {"thinkingBudget": budget, "includeThoughts": True}


# --------------------------------------------------------------------------------------------
# Schema cleanup

_SCHEMA_KEYS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "example",
        "anyOf",
        "propertyOrdering",
        "items",
        "minimum",
        "maximum",
    }
)
_FORMATS = {"string": {"enum", "date-time"}, "number": {"float", "double"}}
_FORMATS["integer"] = {"int32", "int64"}
_MAX_DEPTH = 32


def clean_schema(schema: Any) -> dict:
    """A JSON schema reduced to what Gemini's ``Schema`` accepts.

    ``$ref`` to ``$defs``/``definitions`` are inlined (a recursive reference becomes a plain
    object), ``oneOf`` becomes ``anyOf``, ``allOf`` is merged, ``const`` becomes a one-value
    ``enum``, a type list with ``"null"`` becomes ``nullable``, ``required`` keeps only declared
    properties, and every other keyword ($schema, additionalProperties, exclusiveMinimum,
    unsupported formats…) is dropped.
    """
    if not isinstance(schema, dict):
        return {}
    defs = {
        **_object_or_empty(schema.get("definitions")),
        **_object_or_empty(schema.get("$defs")),
    }
    return _clean(schema, defs, 0, ())


def _object_or_empty(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list_or_empty(value: Any) -> list:
    return value if isinstance(value, list) else []


def _clean(schema: Any, defs: dict, depth: int, seen: tuple[str, ...]) -> dict:
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name in seen or name not in defs:
            return {"type": "object"}
        merged = {**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}}
        return _clean(merged, defs, depth + 1, (*seen, name))
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for sub in schema["allOf"]:
            sub = _clean(sub, defs, depth + 1, seen)
            for key, value in sub.items():
                if key == "properties":
                    merged["properties"] = {
                        **_object_or_empty(merged.get("properties")), **value
                    }
                elif key == "required":
                    merged["required"] = [*_list_or_empty(merged.get("required")), *value]
                else:
                    merged.setdefault(key, value)
        schema = merged
    out: dict[str, Any] = {}
    kind = schema.get("type")
    if isinstance(kind, list):
        types = [t for t in kind if t != "null"]
        if len(types) < len(kind):
            out["nullable"] = True
        if len(types) == 1:
            kind = types[0]
        elif types:
            out["anyOf"] = [{"type": t} for t in types]
            kind = None
        else:
            kind = None
    if isinstance(kind, str) and kind != "null":
        out["type"] = kind
    elif kind == "null":
        out["nullable"] = True
    variants = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(variants, list):
        cleaned = []
        for sub in variants:
            if isinstance(sub, dict) and sub.get("type") == "null":
                out["nullable"] = True
            else:
                cleaned.append(_clean(sub, defs, depth + 1, seen))
        if len(cleaned) == 1 and "type" not in out:
            out.update(cleaned[0])
        elif cleaned:
            out["anyOf"] = cleaned
    if "const" in schema:
        out["enum"] = [str(schema["const"])]
        out.setdefault("type", "string")
    for key, value in schema.items():
        if key not in _SCHEMA_KEYS or key in ("type", "anyOf") or key in out:
            continue
        if key == "properties" and isinstance(value, dict):
            out["properties"] = {
                name: _clean(sub, defs, depth + 1, seen) for name, sub in value.items()
            }
        elif key == "items":
            out["items"] = _clean(value, defs, depth + 1, seen)
        elif key == "enum" and isinstance(value, list):
            values = [v for v in value if v is not None]
            if all(isinstance(v, str) for v in values):
                out["enum"] = values
            if len(values) < len(value):
                out["nullable"] = True
        elif key == "format":
            if isinstance(value, str) and value in _FORMATS.get(out.get("type", ""), ()):
                out["format"] = value
        elif key == "required" and isinstance(value, list):
            names = set(_object_or_empty(schema.get("properties")))
            required = [name for name in value if isinstance(name, str) and name in names]
            if required:
                out["required"] = list(dict.fromkeys(required))
        elif key in ("properties", "required", "enum"):
            continue  # of the wrong type: dropped, as Gemini would reject it
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Answer

_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "LANGUAGE": "content_filter",
}


def gemini_usage(metadata: dict) -> Usage:
    """``usageMetadata`` in the relay's vocabulary (§5.2): thoughts are part of the output."""

    def number(name: str) -> int:
        return token_count(metadata.get(name))

    thoughts = number("thoughtsTokenCount")
    return Usage(
        input_tokens=number("promptTokenCount") + number("toolUsePromptTokenCount"),
        cached_tokens=number("cachedContentTokenCount"),
        output_tokens=number("candidatesTokenCount") + thoughts,
        reasoning_tokens=thoughts,
    )


class GeminiDecoder:
    """``GenerateContentResponse`` chunks (or one non-streamed body) → events.

    Gemini sends a function call whole, so each becomes start, one delta and end at once. Calls
    without an ``id`` get a relay-made ``call_…`` one.
    """

    def __init__(self) -> None:
        self.finished = False
        self._started = False
        self._calls = 0
        self._finished_reason: str | None = None
        self._prefix = uuid.uuid4().hex[:12]

    def feed(self, name: str | None, data: Any) -> list[Event]:
        if isinstance(data, list):  # the JSON-array stream form
            return [event for chunk in data for event in self.feed(name, chunk)]
        if not isinstance(data, dict):
            return []
        if isinstance(data.get("error"), dict):
            self.finished = True
            error = data["error"]
            return [Failure(str(error.get("message") or "upstream error"), error_code(error))]
        events: list[Event] = []
        if not self._started:
            self._started = True
            events.append(Start(data.get("responseId"), data.get("modelVersion")))
        candidates = data.get("candidates") or []
        candidate = candidates[0] if candidates and isinstance(candidates[0], dict) else {}
        for part in (candidate.get("content") or {}).get("parts") or []:
            if isinstance(part, dict):
                self._part(part, events)
        if isinstance(data.get("usageMetadata"), dict):
            events.append(UsageEvent(gemini_usage(data["usageMetadata"])))
        reason = candidate.get("finishReason")
        blocked = (data.get("promptFeedback") or {}).get("blockReason")
        if reason or (blocked and not candidates):
            self.finished = True
            self._finish(_FINISH.get(reason, "stop") if reason else "content_filter", events)
        return events

    def _part(self, part: dict, events: list[Event]) -> None:
        text = part.get("text")
        if isinstance(text, str) and text:
            events.append(ReasoningDelta(text) if part.get("thought") else TextDelta(text))
        call = part.get("functionCall")
        if isinstance(call, dict):
            index = self._calls
            self._calls += 1
            call_id = call.get("id") or f"call_{self._prefix}_{index}"
            arguments = json.dumps(call.get("args") or {}, ensure_ascii=False)
            events.append(
                ToolCallStart(
                    index,
                    str(call_id),
                    str(call.get("name") or ""),
                    signature=part.get("thoughtSignature"),
                )
            )
            events.append(ToolCallDelta(index, arguments))
            events.append(ToolCallEnd(index, arguments))

    def _finish(self, reason: str, events: list[Event]) -> None:
        if self._finished_reason is not None:
            return
        if reason == "stop" and self._calls:
            reason = "tool_calls"
        self._finished_reason = reason
        events.append(Finish(reason))

    def end(self) -> list[Event]:
        events: list[Event] = []
        self._finish("stop", events)
        return events

    def decode_body(self, body: dict) -> list[Event]:
        events = self.feed(None, body)
        events.extend(self.end())
        self.finished = True
        return events


#: Gemini (google.rpc) status → the OpenAI error code clients act on.
ERROR_CODES = {
    "RESOURCE_EXHAUSTED": "rate_limit_exceeded",
    "UNAVAILABLE": "server_is_overloaded",
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "PERMISSION_DENIED": "permission_denied",
    "UNAUTHENTICATED": "invalid_api_key",
    "NOT_FOUND": "model_not_found",
    "DEADLINE_EXCEEDED": "timeout",
    "INTERNAL": "server_error",
}


def error_code(error: dict) -> str:
    return ERROR_CODES.get(str(error.get("status")), "server_error")
