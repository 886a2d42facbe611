"""Gemini (``models/{model}:generateContent`` / ``:streamGenerateContent``) wire shapes (§5.2).

Pure functions over a :class:`~relay.testing.sim_protocol.Plan` (kind ``gemini``):

- non-stream: a ``GenerateContentResponse`` with one candidate whose parts are, in order, the
  thought part (``{"text": …, "thought": true}``), the text part, and the function call as one
  complete part ``{"functionCall": {"name", "args"}, "thoughtSignature": "<opaque>"}`` (Gemini 3
  style: the signature sits on the call's part);
- stream: one chunk per token (each thought or text delta is its own part, the function call one
  part), each carrying the running ``usageMetadata``; the last chunk carries ``finishReason`` and
  the final usage (authoritative). With ``alt=sse`` each chunk is ``data: <json>`` followed by
  ``\\r\\n\\r\\n`` (CRLF, as Google sends it; no ``[DONE]``); without it the chunks form one JSON
  array streamed piece by piece, as the real API does.

Usage: each thought delta counts in ``thoughtsTokenCount``, each text delta and the function call
(one token) in ``candidatesTokenCount``; ``promptTokenCount`` includes the ``cached=`` tokens,
reported as ``cachedContentTokenCount``. Zero ``thoughtsTokenCount`` / ``cachedContentTokenCount``
are omitted, as Google omits zero fields.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

from relay.testing import sim_protocol as sp
from relay.testing.sim_protocol import META, TOKEN, Plan, dumps

STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
MISSING_SIGNATURE = "Function call is missing a thought_signature in functionCall parts"
ACTIONS = ("generateContent", "streamGenerateContent")
_NAMED_PARTS = (("functionResponse", "function_response"), ("functionCall", "function_call"))


# --------------------------------------------------------------------------------------------
# Errors and validation


def error_body(code: int, message: str, details: list[dict] | None = None) -> bytes:
    """Google's error JSON: ``{"error":{"code","message","status"[,"details"]}}``."""
    error: dict = {"code": code, "message": message, "status": STATUSES.get(code, "UNKNOWN")}
    if details:
        error["details"] = details
    return dumps({"error": error})


def auth_error(missing: bool) -> tuple[int, bytes]:
    """403 ``PERMISSION_DENIED`` without a key, 401 ``UNAUTHENTICATED`` for a wrong one."""
    if missing:
        message = (
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API."
        )
        return 403, error_body(403, message)
    details = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"},
        }
    ]
    return 401, error_body(401, "API key not valid. Please pass a valid API key.", details)


def fault_response(
    fault: str, credential: str = "", host: str = ""
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, extra headers and body for the HTTP-error faults, in Google's shape."""
    if fault == "retry_forever":
        details = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "99999999s"}
        ]
        return 429, [], error_body(429, "Resource has been exhausted.", details)
    if fault == "leak_secret":
        return 500, [], error_body(500, sp.leak_message(credential, host))
    if fault == "429":
        message = (
            "You exceeded your current quota, please check your plan and billing details. For "
            "more information on this error, head to: "
            "https://ai.google.dev/gemini-api/docs/rate-limits."
        )
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": "generativelanguage.googleapis.com/"
                        "generate_content_free_tier_requests",
                        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"},
        ]
        return 429, [], error_body(429, message, details)
    if fault == "401":
        status, body = auth_error(missing=False)
        return status, [], body
    if fault == "400":
        return 400, [], error_body(400, "Invalid request (simulated fault).")
    if fault in ("503", "529"):
        return 503, [], error_body(503, "The model is overloaded. Please try again later.")
    message = (
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting"
    )
    return 500, [], error_body(500, message)


def _missing_signature(name: object, position: int) -> str:
    return (
        f"{MISSING_SIGNATURE}. This is required for tools to work correctly, and missing "
        "thought_signature may lead to degraded model performance. Additional data, function "
        f"call `default_api:{name}` , position {position}. Please refer to "
        "https://ai.google.dev/gemini-api/docs/thought-signatures for more details."
    )


def validate(body: dict) -> str | None:
    """The checks the real API makes that a relay must satisfy; the 400 message, or None.

    ``contents`` must be a non-empty list of ``user``/``model`` contents with non-empty
    ``parts``; a ``functionResponse`` (and a ``functionCall``) must have a ``name``. Thought
    signatures, as Gemini 3 enforces them: in the current turn (the contents after the last user
    content that is not only function responses), the first ``functionCall`` part of each model
    content must carry its ``thoughtSignature`` (any non-empty string; Google also accepts the
    ``skip_thought_signature_validator`` placeholder). Earlier turns are not checked.
    """
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified\n"
    turn_start = 0
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            return f"Invalid value at 'contents[{i}]' (type.googleapis.com/google.ai.Content)"
        role = content.get("role", "user")
        if role not in ("user", "model"):
            return "Please use a valid role: user, model."
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            where = f"* GenerateContentRequest.contents[{i}].parts"
            return f"{where}: contents.parts must not be empty.\n"
        for j, part in enumerate(parts):
            where = f"* GenerateContentRequest.contents[{i}].parts[{j}]"
            if not isinstance(part, dict):
                return f"{where}: invalid part\n"
            for key, field in _NAMED_PARTS:
                value = part.get(key)
                if key in part and not (isinstance(value, dict) and value.get("name")):
                    return f"{where}.{field}.name: Name cannot be empty.\n"
        if role == "user" and not all("functionResponse" in part for part in parts):
            turn_start = i
    for i in range(turn_start + 1, len(contents)):
        content = contents[i]
        if content.get("role") != "model":
            continue
        call = next((part for part in content["parts"] if "functionCall" in part), None)
        if call is None:
            continue
        signature = call.get("thoughtSignature")
        if not (isinstance(signature, str) and signature):
            return _missing_signature(call["functionCall"]["name"], i + 1)
    return None


# --------------------------------------------------------------------------------------------
# Response


def thought_signature(plan: Plan) -> str:
    """The opaque signature sent on the function-call part (base64, like the real one)."""
    return base64.b64encode(b"sim-thought-signature:" + plan.uid.encode()).decode()


def finish_reason(plan: Plan) -> str:
    return "MAX_TOKENS" if plan.truncated else "STOP"


def usage_metadata(plan: Plan, thoughts: int | None = None, candidates: int | None = None) -> dict:
    """``usageMetadata`` after *thoughts* thought and *candidates* answer tokens (default: all)."""
    if thoughts is None:
        thoughts = len(plan.reasoning)
    if candidates is None:
        candidates = plan.reported_output - len(plan.reasoning)
    usage = {
        "promptTokenCount": plan.reported_input,
        "candidatesTokenCount": candidates,
        "totalTokenCount": plan.reported_input + thoughts + candidates,
    }
    if plan.cached_tokens:
        usage["cachedContentTokenCount"] = plan.cached_tokens
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _call_part(plan: Plan) -> dict:
    return {
        "functionCall": {"name": plan.tool_name, "args": json.loads("".join(plan.tool_args))},
        "thoughtSignature": thought_signature(plan),
    }


def _chunk(plan: Plan, parts: list[dict], usage: dict, finish: str | None) -> dict:
    candidate: dict = {"content": {"parts": parts, "role": "model"}}
    if finish is not None:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": plan.model,
        "responseId": plan.id,
    }


def response(plan: Plan) -> dict:
    """The non-stream ``GenerateContentResponse``."""
    parts: list[dict] = []
    if plan.reasoning:
        parts.append({"text": "".join(plan.reasoning), "thought": True})
    if plan.text:
        parts.append({"text": "".join(plan.text)})
    if plan.has_tool_call:
        parts.append(_call_part(plan))
    if not parts:
        parts.append({"text": ""})
    return _chunk(plan, parts, usage_metadata(plan), finish_reason(plan))


def stream_events(plan: Plan) -> Iterator[tuple[bytes, bool]]:
    """``(bytes, is_token)`` for each chunk of a ``streamGenerateContent`` response."""
    pieces: list[tuple[dict, bool]] = [({"text": p, "thought": True}, True) for p in plan.reasoning]
    pieces += [({"text": p}, False) for p in plan.text]
    if plan.has_tool_call:
        pieces.append((_call_part(plan), False))
    thoughts = candidates = 0
    first = True

    def frame(chunk: dict) -> bytes:
        nonlocal first
        data = dumps(chunk)
        if plan.sse:
            return b"data: " + data + b"\r\n\r\n"
        prefix, first = (b"[" if first else b",\r\n"), False
        return prefix + data

    if not pieces:
        yield frame(_chunk(plan, [{"text": ""}], usage_metadata(plan), finish_reason(plan))), META
    for n, (part, is_thought) in enumerate(pieces, 1):
        if is_thought:
            thoughts += 1
        else:
            candidates += 1
        finish = finish_reason(plan) if n == len(pieces) else None
        usage = usage_metadata(plan, thoughts, candidates)
        yield frame(_chunk(plan, [part], usage, finish)), TOKEN
    if not plan.sse:
        yield b"]", META
