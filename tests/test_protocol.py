"""The pure protocol layer: SSE framing, usage capture, request validation and rewriting."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import InvalidRequest
from relay.protocol.events import TranslationContext
from relay.protocol.messages import MessagesEncoder
from relay.protocol.requests import (
    DEFAULT_EXPECTED_OUTPUT,
    Endpoint,
    decode_json_body,
    parse_request,
    session_key,
)
from relay.protocol.sse import EventSplitter, StreamMeter, Usage, error_event, event_data
from relay.protocol.translate import build_upstream_request


def chat_chunk(content: str | None, usage: dict | None = None, choices: bool = True) -> bytes:
    payload = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}] if choices else [],
        "usage": usage,
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


CHAT_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 3,
    "total_tokens": 14,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 1},
}
CHAT_STREAM = (
    chat_chunk("a") + chat_chunk("b") + chat_chunk(None, CHAT_USAGE, choices=False)
    + b"data: [DONE]\n\n"
)


@given(st.lists(st.integers(min_value=1, max_value=len(CHAT_STREAM)), max_size=20))
def test_splitter_yields_the_same_events_for_any_chunking(cuts: list[int]) -> None:
    splitter = EventSplitter()
    events: list[bytes] = []
    start = 0
    for cut in sorted(set(cuts)):
        events += splitter.feed(CHAT_STREAM[start:cut])
        start = cut
    events += splitter.feed(CHAT_STREAM[start:])
    assert b"".join(events) == CHAT_STREAM
    assert len(events) == 4
    assert splitter.tail() == b""


def _split_by_regex(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """The reference: every event ends at the first blank line, ``\n`` or ``\r\n`` style."""
    events, buffer = [], b""
    for chunk in chunks:
        buffer += chunk
        start = 0
        for match in re.finditer(rb"\r?\n\r?\n", buffer):
            events.append(buffer[start : match.end()])
            start = match.end()
        buffer = buffer[start:]
    return events, buffer


@given(
    st.lists(
        st.sampled_from([b"a", b"data: x", b"\n", b"\r", b"\n\n", b"\r\n\r\n"]), max_size=30
    ),
    st.lists(st.integers(min_value=0, max_value=200), max_size=6),
    st.booleans(),
)
def test_splitter_cuts_any_bytes_in_any_chunking_like_the_reference(
    parts: list[bytes], cuts: list[int], lf_only: bool
) -> None:
    stream = b"".join(parts)
    if lf_only:  # the fast path: no "\r" anywhere
        stream = stream.replace(b"\r", b"")
    bounds = [0, *sorted({cut for cut in cuts if cut <= len(stream)}), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    splitter = EventSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    assert (events, splitter.tail()) == _split_by_regex(chunks)


def test_splitter_handles_crlf_and_keeps_the_tail() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"event: x\r\ndata: 1\r\n\r\ndata: 2") == [b"event: x\r\ndata: 1\r\n\r\n"]
    assert splitter.tail() == b"data: 2"


def test_event_data_joins_data_lines() -> None:
    assert event_data(b"event: e\ndata: {\"a\":\ndata: 1}\n\n") == b'{"a":\n1}'
    assert event_data(b"data:[DONE]\n\n") == b"[DONE]"


def test_meter_captures_chat_usage_and_drops_the_usage_chunk_when_asked() -> None:
    meter = StreamMeter(Endpoint.CHAT, drop_usage_chunk=True)
    forwarded = meter.forwardable(EventSplitter().feed(CHAT_STREAM))
    assert b'"usage": {' not in forwarded
    assert forwarded.endswith(b"data: [DONE]\n\n")
    assert meter.usage == Usage(11, 4, 3, 1)
    assert meter.finished
    kept = StreamMeter(Endpoint.CHAT).forwardable(EventSplitter().feed(CHAT_STREAM))
    assert kept == CHAT_STREAM


def test_meter_keeps_usage_on_a_content_chunk() -> None:
    meter = StreamMeter(Endpoint.CHAT, drop_usage_chunk=True)
    event = chat_chunk("x", CHAT_USAGE)
    assert meter.forwardable([event]) == event  # it has choices: never dropped
    assert meter.usage.output_tokens == 3


def test_deepseek_cache_hits_count_as_cached() -> None:
    usage = Usage.from_chat({"prompt_tokens": 10, "completion_tokens": 2,
                             "prompt_cache_hit_tokens": 6})
    assert (usage.input_tokens, usage.cached_tokens, usage.total_tokens) == (10, 6, 12)


def responses_event(kind: str, seq: int, **fields) -> bytes:
    payload = {"type": kind, "sequence_number": seq, **fields}
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()


def test_meter_reads_responses_usage_and_sequence() -> None:
    usage = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 5},
             "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 4},
             "total_tokens": 29}
    stream = [
        responses_event("response.created", 0, response={"id": "resp_1", "usage": None}),
        responses_event("response.output_text.delta", 1, delta="hi"),
        responses_event("response.completed", 2, response={"id": "resp_1", "usage": usage}),
    ]
    meter = StreamMeter(Endpoint.RESPONSES)
    assert meter.forwardable(stream) == b"".join(stream)
    assert meter.usage == Usage(20, 5, 9, 4)
    assert meter.finished and meter.deltas == 1
    assert meter.next_sequence_number() == 3
    assert meter.response_id() == "resp_1"


def test_error_event_in_each_protocol() -> None:
    meter = StreamMeter(Endpoint.RESPONSES)
    meter.forwardable([responses_event("response.created", 0, response={"id": "resp_9"})])
    failed = error_event(Endpoint.RESPONSES, meter, message="lost", code="upstream_unreachable")
    assert failed.startswith(b"event: response.failed\n")
    payload = json.loads(event_data(failed))
    assert payload["sequence_number"] == 1
    assert payload["response"]["id"] == "resp_9"
    assert payload["response"]["status"] == "failed"
    assert payload["response"]["error"] == {"code": "upstream_unreachable", "message": "lost"}

    chat = error_event(Endpoint.CHAT, StreamMeter(Endpoint.CHAT), message="lost", code="x")
    assert json.loads(event_data(chat)) == {
        "error": {"message": "lost", "type": "server_error", "param": None, "code": "x"}
    }


@pytest.mark.parametrize(
    ("code", "kind"),
    [("rate_limit_exceeded", "rate_limit_error"), ("server_is_overloaded", "overloaded_error"),
     ("upstream_timeout", "timeout_error"), ("upstream_unreachable", "api_error"),
     ("relay_shutdown", "api_error"), ("overloaded_error", "overloaded_error")],
)
def test_a_messages_stream_ends_with_one_error_event_relayed_or_translated(
    code: str, kind: str
) -> None:
    """The relayed Anthropic stream's error event is the translated stream's, byte for byte,
    and encodes whatever the message quotes (a lone surrogate of an upstream's text)."""
    message = "lost \ud800 é"
    relayed = error_event(
        Endpoint.MESSAGES, StreamMeter(Endpoint.MESSAGES), message=message, code=code
    )
    context = TranslationContext(Endpoint.MESSAGES, "openai-chat", "m")
    translated = MessagesEncoder(context, "openai-chat").fail(message, code)
    assert translated.endswith(relayed)
    assert relayed.startswith(b"event: error\ndata: ")
    assert json.loads(event_data(relayed)) == {
        "type": "error", "error": {"type": kind, "message": message}
    }


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "could not parse"),
        (b"[]", "must be a JSON object"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_decode_json_body_errors(raw: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_json_body(raw)
    assert fragment in caught.value.message
    assert caught.value.status == 400


def test_parse_chat_estimates_and_flags() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x" * 400}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
    }
    request = parse_request(Endpoint.CHAT, body, {})
    assert request.stream and request.include_usage
    assert request.max_output_tokens == 50
    assert 100 <= request.estimated_input_tokens <= 120
    assert request.estimated_tokens == request.estimated_input_tokens + 50


def test_parse_responses_without_cap_expects_default_output() -> None:
    request = parse_request(Endpoint.RESPONSES, {"model": "m", "input": "hello"}, {})
    assert request.estimated_tokens == request.estimated_input_tokens + DEFAULT_EXPECTED_OUTPUT
    assert not request.stream


def test_session_key_precedence() -> None:
    assert session_key({"prompt_cache_key": "a", "session_id": "b"}, {"session-id": "c"}) == "a"
    assert session_key({"session_id": "b"}, {"session-id": "c"}) == "b"
    for header in ("session-id", "session_id", "conversation_id", "thread-id"):
        assert session_key({}, {header: "h"}) == "h"
    assert session_key({}, {}) is None


def _passthrough_body(request, model: str, effort: str | None) -> dict:
    """The body the relay sends an upstream that speaks the client's own protocol."""
    built = build_upstream_request(
        request.body, request.endpoint, request.endpoint.upstream_kind,
        model=model, api_key="k", reasoning_effort=effort,
    )
    assert built.context.passthrough
    return built.body


def test_same_protocol_upstream_body_has_only_the_relays_rewrites() -> None:
    chat = parse_request(
        Endpoint.CHAT,
        {"model": "gpt-5-high", "messages": [{"role": "user", "content": "x"}], "stream": True,
         "session_id": "s1", "reasoning_effort": "low"},
        {},
    )
    body = _passthrough_body(chat, "gpt-5", "high")
    assert body["model"] == "gpt-5"
    assert body["reasoning_effort"] == "high"  # the alias names the effort
    assert body["prompt_cache_key"] == "s1" and "session_id" not in body
    assert body["stream_options"] == {"include_usage": True}

    responses = parse_request(
        Endpoint.RESPONSES,
        {"model": "a", "input": "x", "reasoning": {"summary": "auto"}, "prompt_cache_key": "k",
         "session_id": "other"},
        {},
    )
    body = _passthrough_body(responses, "gpt-5", "low")
    assert body["reasoning"] == {"summary": "auto", "effort": "low"}
    assert body["prompt_cache_key"] == "k"
    assert "stream_options" not in body

    plain = parse_request(Endpoint.CHAT, {"model": "m", "messages": [{"role": "user"}]}, {})
    assert _passthrough_body(plain, "m", None) == {
        "model": "m", "messages": [{"role": "user"}]
    }
