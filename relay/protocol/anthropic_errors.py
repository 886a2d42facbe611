"""Anthropic's error vocabulary for the relay's Messages clients: the error type of a status and
of the relay's (OpenAI's) error codes, and the ``event: error`` that ends a Messages stream.

One table each and one event builder, used wherever a Messages client hears of an error: the
JSON error of a refused request (:func:`.messages.anthropic_error`), the error event of a
translated stream (:class:`.messages.MessagesEncoder`), of a relayed Anthropic stream that fails
midway (:func:`.sse.error_event`) and of a stream the relay opened itself while the request
waited (:func:`.messages.error_event`). Imports nothing of the relay's but the standard library,
so that :mod:`.sse` can use it.
"""

from __future__ import annotations

import json

#: Relay status → Anthropic error type (platform.claude.com, "Errors").
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

#: Error codes (OpenAI's, as the relay and its decoders report them) → Anthropic error type.
CODE_TYPES = {
    "rate_limit_exceeded": "rate_limit_error",
    "server_is_overloaded": "overloaded_error",
    "invalid_request_error": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    "invalid_prompt": "invalid_request_error",
    "upstream_timeout": "timeout_error",
    "insufficient_quota": "billing_error",
}

_TYPES = frozenset(ERROR_TYPES.values())


def code_type(code: str) -> str:
    """The Anthropic error type for ``code``: from :data:`CODE_TYPES`, the code itself when it
    already is one of Anthropic's types (an Anthropic upstream's error event), else
    ``api_error``."""
    return CODE_TYPES.get(code, code if code in _TYPES else "api_error")


def error_event(kind: str, message: str) -> bytes:
    """``event: error`` with Anthropic's error object of type ``kind``. ASCII JSON: a message
    may quote an upstream's text, lone surrogates included, and must still encode."""
    payload = {"type": "error", "error": {"type": kind, "message": message}}
    data = json.dumps(payload, separators=(",", ":"))
    return f"event: error\ndata: {data}\n\n".encode()


def failure_event(message: str, code: str) -> bytes:
    """The ``event: error`` that ends a Messages stream that failed with the relay's ``code``."""
    return error_event(code_type(code), message)
