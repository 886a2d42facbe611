"""Upstream errors as OpenAI errors, and the cool-down hints read from them."""

from __future__ import annotations

import json
import time
from email.utils import formatdate

import pytest

from relay.protocol.translate import retry_after_hint, translate_error


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def test_openai_errors_keep_their_fields() -> None:
    body = dumps(
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    )
    assert translate_error("openai-chat", 400, body) == (
        400,
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    )


@pytest.mark.parametrize(
    ("status", "error_type", "client_status", "openai_type", "code"),
    [
        (529, "overloaded_error", 503, "service_unavailable_error", "server_is_overloaded"),
        (429, "rate_limit_error", 429, "rate_limit_error", "rate_limit_exceeded"),
        (400, "invalid_request_error", 400, "invalid_request_error", None),
        (401, "authentication_error", 401, "invalid_request_error", "invalid_api_key"),
        (403, "permission_error", 403, "permission_error", "permission_denied"),
        (404, "not_found_error", 404, "invalid_request_error", "not_found"),
        (413, "request_too_large", 413, "invalid_request_error", "request_too_large"),
        (500, "api_error", 500, "server_error", None),
    ],
)
def test_anthropic_errors_map_by_type(status, error_type, client_status, openai_type, code) -> None:
    body = dumps({"type": "error", "error": {"type": error_type, "message": "Something."}})
    out_status, error = translate_error("anthropic", status, body)
    assert out_status == client_status
    assert error == {
        "error": {"message": "Something.", "type": openai_type, "param": None, "code": code}
    }


def test_anthropic_prompt_too_long_is_a_context_length_error() -> None:
    body = dumps(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "prompt is too long: 210000 tokens > 200000 maximum",
            },
        }
    )
    assert translate_error("anthropic", 400, body)[1]["error"]["code"] == "context_length_exceeded"


def test_gemini_resource_exhausted_is_a_429_with_the_retry_delay_in_the_message() -> None:
    body = dumps(
        {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "29.5s"},
                ],
            }
        }
    )
    status, error = translate_error("gemini", 429, body)
    assert status == 429
    assert error["error"]["type"] == "rate_limit_error"
    assert error["error"]["code"] == "rate_limit_exceeded"
    assert error["error"]["message"] == "You exceeded your current quota. Please try again in 30s."
    assert retry_after_hint("gemini", 429, {}, body) == 29.5


@pytest.mark.parametrize(
    ("gstatus", "client_status", "code"),
    [
        ("INVALID_ARGUMENT", 400, None),
        ("PERMISSION_DENIED", 403, "permission_denied"),
        ("NOT_FOUND", 404, "model_not_found"),
        ("UNAVAILABLE", 503, "server_is_overloaded"),
        ("INTERNAL", 500, None),
        ("UNAUTHENTICATED", 401, "invalid_api_key"),
    ],
)
def test_gemini_errors_map_by_status(gstatus, client_status, code) -> None:
    body = dumps([{"error": {"code": 0, "message": "m", "status": gstatus}}])  # array form too
    status, error = translate_error("gemini", 400, body)
    assert (status, error["error"]["code"]) == (client_status, code)


def test_gemini_context_overflow_is_a_context_length_error() -> None:
    body = dumps(
        {
            "error": {
                "code": 400,
                "status": "INVALID_ARGUMENT",
                "message": "The input token count (1200000) exceeds the maximum number of "
                "tokens allowed (1048576).",
            }
        }
    )
    assert translate_error("gemini", 400, body)[1]["error"]["code"] == "context_length_exceeded"


def test_non_json_errors_get_the_relays_own_message_and_529_is_503() -> None:
    """A proxy's HTML page or plain text is not the API's error: its words (which may name
    hosts) never reach the client; the status is kept."""
    status, error = translate_error("anthropic", 529, b"<html>overloaded at 10.0.0.3</html>")
    assert status == 503
    assert error["error"]["message"].startswith("The upstream answered with HTTP 529 and no API")
    assert "<" not in error["error"]["message"] and "10.0.0.3" not in error["error"]["message"]
    assert error["error"]["type"] == "service_unavailable_error"
    assert error["error"]["code"] == "upstream_invalid_response"
    status, error = translate_error("openai-chat", 502, b"")
    assert status == 502 and "HTTP 502" in error["error"]["message"]
    assert error["error"]["type"] == "server_error"


def test_retry_hints_from_headers() -> None:
    assert (
        retry_after_hint("openai-chat", 429, {"Retry-After-Ms": "1500", "retry-after": "9"}, b"")
        == 1.5
    )
    assert retry_after_hint("anthropic", 429, {"retry-after": "12"}, b"") == 12.0
    date = formatdate(time.time() + 60, usegmt=True)
    hint = retry_after_hint("openai-chat", 429, {"retry-after": date}, b"")
    assert 55 <= hint <= 61


def test_retry_hints_from_the_body() -> None:
    body = dumps(
        {"error": {"type": "usage_limit_reached", "message": "limit", "resets_in_seconds": 300}}
    )
    assert retry_after_hint("openai-responses", 429, {}, body) == 300
    body = dumps({"error": {"type": "usage_limit_reached", "resets_at": int(time.time()) + 100}})
    assert 95 <= retry_after_hint("openai-responses", 429, {}, body) <= 101


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("Rate limit reached for gpt-5. Please try again in 20s.", 20.0),
        ("Rate limit reached. Please try again in 350ms.", 0.35),
        ("Please retry in 37.410505s.", 37.410505),
        ("Try again in 2 minutes.", 120.0),
        ("Slow down.", None),
    ],
)
def test_retry_hints_from_the_message(message: str, seconds) -> None:
    body = dumps({"error": {"message": message, "type": "rate_limit_error"}})
    assert retry_after_hint("openai-chat", 429, {}, body) == seconds


def test_no_hint_without_any_signal() -> None:
    assert retry_after_hint("anthropic", 429, {}, b"not json") is None


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
def test_retry_hints_are_finite(value: str) -> None:
    assert retry_after_hint("openai-chat", 429, {"retry-after": value}, b"") is None
    assert retry_after_hint("openai-chat", 429, {"retry-after-ms": value}, b"") is None
    assert retry_after_hint("openai-chat", 429, {"retry-after-ms": "-5000"}, b"") == 0.0
    body = dumps({"error": {"message": f"Please try again in {'9' * 400}s."}})
    assert retry_after_hint("openai-chat", 429, {}, body) is None


def test_retry_hints_from_the_exhausted_limits_reset() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m30.5s",
        "x-ratelimit-remaining-tokens": "1200",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert retry_after_hint("openai-chat", 429, headers, b"") == 90.5
    assert retry_after_hint("openai-chat", 429, {"x-ratelimit-reset-tokens": "20ms"}, b"") == 0.02
    assert retry_after_hint("openai-chat", 400, headers, b"") is None  # only a 429 rests
    assert retry_after_hint("openai-chat", 429, {"x-ratelimit-reset-tokens": "soon"}, b"") is None
