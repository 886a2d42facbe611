"""Translated streams: every upstream kind's stream, cut at random places, comes out as a stream
the client's SDK accepts, with the same text, reasoning, tool calls and usage.

Upstream streams are built here from the shapes in protocols.md (§1.4/§1.5 Responses, §3.3 Chat,
§5.1 Anthropic, §5.2 Gemini). Chat output is rebuilt from its ``data:`` lines; Responses output is
fed through the openai-python ``responses.stream()`` accumulator (``ResponseStreamState``) and its
ordering rules are also checked one by one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from relay.errors import UpstreamError
from relay.protocol.events import decode_reasoning, split_call_id
from relay.protocol.requests import Endpoint
from relay.protocol.translate import (
    StreamTranslator,
    TranslationContext,
    build_upstream_request,
    response_usage,
    translate_response,
)
from relay.protocol.trust import Confidential

# --------------------------------------------------------------------------------------------
# Upstream streams


def sse(data: dict | str, event: str | None = None, end: bytes = b"\n\n") -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    payload = data if isinstance(data, str) else json.dumps(data)
    return head + b"data: " + payload.encode() + end


def chat_chunk(delta: dict, finish: str | None = None) -> bytes:
    return sse(
        {
            "id": "chatcmpl-up",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "deepseek-v4",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
    )


CHAT_USAGE = {
    "prompt_tokens": 50,
    "completion_tokens": 20,
    "total_tokens": 70,
    "prompt_cache_hit_tokens": 32,
    "completion_tokens_details": {"reasoning_tokens": 7},
}


def chat_upstream(finish: str = "tool_calls", usage: bool = True) -> bytes:
    """§3.3: reasoning, text, two parallel tool calls, finish, usage chunk, [DONE]."""
    parts = [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"reasoning_content": "Let me "}),
        chat_chunk({"reasoning_content": "think."}),
        chat_chunk({"content": "Hel"}),
        chat_chunk({"content": "lo ✓"}),
        chat_chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chat_chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
                    }
                ]
            }
        ),
        chat_chunk({}, finish),
    ]
    if usage:
        parts.append(sse({"id": "chatcmpl-up", "choices": [], "usage": CHAT_USAGE}))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


RESPONSES_USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"cached_tokens": 32},
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 7},
    "total_tokens": 70,
}


def responses_upstream(status: str = "completed") -> bytes:
    """§1.4/§1.5: reasoning summary, message, two function calls, response.completed."""
    seq = iter(range(1000))

    def ev(kind: str, **fields) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    response = {"id": "resp_up", "object": "response", "status": "in_progress", "output": []}
    rs = {"id": "rs_1", "type": "reasoning", "summary": []}
    msg = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant"}
    out = [
        ev("response.created", response=response),
        ev("response.in_progress", response=response),
        ev("response.output_item.added", output_index=0, item=rs),
        ev(
            "response.reasoning_summary_part.added",
            item_id="rs_1",
            output_index=0,
            summary_index=0,
            part={"type": "summary_text", "text": ""},
        ),
        ev(
            "response.reasoning_summary_text.delta",
            item_id="rs_1",
            output_index=0,
            summary_index=0,
            delta="Let me ",
        ),
        ev(
            "response.reasoning_summary_text.delta",
            item_id="rs_1",
            output_index=0,
            summary_index=0,
            delta="think.",
        ),
        ev(
            "response.output_item.done",
            output_index=0,
            item={**rs, "summary": [{"type": "summary_text", "text": "Let me think."}]},
        ),
        ev("response.output_item.added", output_index=1, item={**msg, "content": []}),
        ev(
            "response.output_text.delta",
            item_id="msg_1",
            output_index=1,
            content_index=0,
            delta="Hel",
        ),
        ev(
            "response.output_text.delta",
            item_id="msg_1",
            output_index=1,
            content_index=0,
            delta="lo ✓",
        ),
        ev(
            "response.output_item.done",
            output_index=1,
            item={**msg, "status": "completed", "content": [{"type": "output_text"}]},
        ),
    ]
    calls = [
        ("fc_1", "call_1", "get_weather", ['{"city":', '"Paris"}']),
        ("fc_2", "call_2", "get_time", ['{"tz":"CET"}']),
    ]
    for offset, (item_id, call_id, name, pieces) in enumerate(calls):
        index = 2 + offset
        item = {"id": item_id, "type": "function_call", "call_id": call_id, "name": name}
        out.append(
            ev(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            )
        )
        for piece in pieces:
            out.append(
                ev(
                    "response.function_call_arguments.delta",
                    item_id=item_id,
                    output_index=index,
                    delta=piece,
                )
            )
        full = "".join(pieces)
        out.append(
            ev(
                "response.output_item.done",
                output_index=index,
                item={**item, "arguments": full, "status": "completed"},
            )
        )
    final = {**response, "status": status, "usage": RESPONSES_USAGE}
    if status == "incomplete":
        final["incomplete_details"] = {"reason": "max_output_tokens"}
    out.append(ev(f"response.{status}", response=final))
    return b"".join(out)


def anthropic_upstream(stop_reason: str = "tool_use") -> bytes:
    """§5.1: thinking with signature, text, two tool_use blocks, message_delta, message_stop."""

    def ev(kind: str, **fields) -> bytes:
        return sse({"type": kind, **fields}, event=kind)

    def delta(index: int, **fields) -> bytes:
        return ev("content_block_delta", index=index, delta=fields)

    return b"".join(
        [
            ev(
                "message_start",
                message={
                    "id": "msg_up",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5",
                    "content": [],
                    "usage": {
                        "input_tokens": 10,
                        "cache_read_input_tokens": 32,
                        "cache_creation_input_tokens": 8,
                        "output_tokens": 1,
                    },
                },
            ),
            ev("ping"),
            ev(
                "content_block_start",
                index=0,
                content_block={"type": "thinking", "thinking": "", "signature": ""},
            ),
            delta(0, type="thinking_delta", thinking="Let me "),
            delta(0, type="thinking_delta", thinking="think."),
            delta(0, type="signature_delta", signature="SIG+/abc=="),
            ev("content_block_stop", index=0),
            ev("content_block_start", index=1, content_block={"type": "text", "text": ""}),
            delta(1, type="text_delta", text="Hel"),
            delta(1, type="text_delta", text="lo ✓"),
            ev("content_block_stop", index=1),
            ev(
                "content_block_start",
                index=2,
                content_block={
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {},
                },
            ),
            delta(2, type="input_json_delta", partial_json=""),
            delta(2, type="input_json_delta", partial_json='{"city":'),
            delta(2, type="input_json_delta", partial_json='"Paris"}'),
            ev("content_block_stop", index=2),
            ev(
                "content_block_start",
                index=3,
                content_block={
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_time",
                    "input": {},
                },
            ),
            delta(3, type="input_json_delta", partial_json='{"tz":"CET"}'),
            ev("content_block_stop", index=3),
            ev(
                "message_delta",
                delta={"stop_reason": stop_reason, "stop_sequence": None},
                usage={"output_tokens": 20},
            ),
            ev("message_stop"),
        ]
    )


def gemini_upstream(finish: str = "STOP") -> bytes:
    """§5.2: a thought, text, two whole function calls (the first signed), usage on chunks.
    Gemini separates events with CRLF pairs."""

    def chunk(parts: list, **extra) -> bytes:
        body = {
            "candidates": [{"content": {"role": "model", "parts": parts}, "index": 0, **extra}],
            "modelVersion": "gemini-2.5-pro",
            "responseId": "gem_up",
        }
        return sse(body, end=b"\r\n\r\n")

    usage = {
        "promptTokenCount": 50,
        "cachedContentTokenCount": 32,
        "candidatesTokenCount": 13,
        "thoughtsTokenCount": 7,
        "totalTokenCount": 70,
    }
    last = {"finishReason": finish}
    return b"".join(
        [
            chunk([{"text": "Let me ", "thought": True}]),
            chunk([{"text": "think.", "thought": True}]),
            chunk([{"text": "Hel"}]),
            chunk([{"text": "lo ✓"}]),
            chunk(
                [
                    {
                        "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                        "thoughtSignature": "R0VNSU5JLVNJRw==",
                    },
                    {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
                ]
            ),
            sse(
                {
                    "candidates": [{"content": {"role": "model", "parts": []}, **last}],
                    "usageMetadata": usage,
                },
                end=b"\r\n\r\n",
            ),
        ]
    )


UPSTREAMS = {
    "openai-chat": chat_upstream,
    "openai-responses": responses_upstream,
    "anthropic": anthropic_upstream,
    "gemini": gemini_upstream,
}

EXPECTED_ARGS = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
TOOLS_CHAT = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "get_time")
]
TOOLS_RESPONSES = [
    {"type": "function", "name": n, "parameters": {"type": "object"}}
    for n in ("get_weather", "get_time")
]


def context_for(client: Endpoint, kind: str, **body_fields) -> TranslationContext:
    if client is Endpoint.MESSAGES:
        body = {
            "model": "alias-model",
            "max_tokens": 1000,
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"name": n, "input_schema": {"type": "object"}}
                      for n in ("get_weather", "get_time")],
            "stream": True,
        }
    elif client is Endpoint.CHAT:
        body = {
            "model": "alias-model",
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": TOOLS_CHAT,
            "stream": True,
        }
    else:
        body = {
            "model": "alias-model",
            "input": "weather?",
            "tools": TOOLS_RESPONSES,
            "stream": True,
        }
    body.update(body_fields)
    return build_upstream_request(body, client, kind, model="up-model", api_key="k").context


def run(
    kind: str, context: TranslationContext, raw: bytes, cuts: list[int] = ()
) -> tuple[bytes, StreamTranslator]:
    translator = StreamTranslator(kind, context)
    out = []
    start = 0
    for cut in sorted(set(cuts)):
        out.append(translator.feed(raw[start:cut]))
        start = cut
    out.append(translator.feed(raw[start:]))
    out.append(translator.finish())
    return b"".join(out), translator


def cut_points(raw: bytes):
    return st.lists(st.integers(min_value=1, max_value=max(1, len(raw) - 1)), max_size=25)


# --------------------------------------------------------------------------------------------
# Client-side parsers


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.decode().split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        events.append((name, "\n".join(data)))
    return events


@dataclass
class ChatResult:
    content: str = ""
    reasoning: str = ""
    calls: dict[int, dict] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None
    done: bool = False
    role: str | None = None


def parse_chat(raw: bytes) -> ChatResult:
    """Rebuild a Chat stream the way the SDKs do, checking the rules of §3.3 on the way."""
    result = ChatResult()
    events = sse_events(raw)
    for position, (name, data) in enumerate(events):
        assert name is None, "Chat streams have no event: lines"
        assert not result.done, "nothing may follow [DONE]"
        if data == "[DONE]":
            result.done = True
            assert position == len(events) - 1
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = chunk["error"]
            continue
        assert chunk["object"] == "chat.completion.chunk"
        if chunk.get("usage"):
            assert chunk["choices"] == []
            result.usage = chunk["usage"]
            continue
        (choice,) = chunk["choices"]
        assert choice["index"] == 0
        assert result.finish_reason is None, "no delta after the finish chunk"
        delta = choice["delta"]
        if "role" in delta:
            result.role = delta["role"]
        result.content += delta.get("content") or ""
        result.reasoning += delta.get("reasoning_content") or ""
        for call in delta.get("tool_calls") or []:
            index = call["index"]
            if index not in result.calls:
                assert index == len(result.calls), "tool call indexes are 0, 1, 2…"
                assert call["type"] == "function" and call["id"]
                assert call["function"]["arguments"] == ""
                result.calls[index] = {
                    "id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": "",
                }
            else:
                assert "id" not in call
                result.calls[index]["arguments"] += call["function"]["arguments"]
        if choice["finish_reason"]:
            result.finish_reason = choice["finish_reason"]
    return result


@dataclass
class ResponsesResult:
    events: list[dict]
    final: dict
    response: object  # the SDK's ParsedResponse (completed) or None


def parse_responses(raw: bytes, tools: list | None = None) -> ResponsesResult:
    """Check the ordering rules of §1.4/§2.5 and run the SDK's stream accumulator."""
    events = []
    for name, data in sse_events(raw):
        payload = json.loads(data)
        assert name == payload["type"], "event: must equal data.type"
        events.append(payload)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[1]["type"] == "response.in_progress"
    terminal = events[-1]
    assert terminal["type"] in ("response.completed", "response.incomplete", "response.failed")
    assert all(
        e["type"] not in ("response.completed", "response.incomplete", "response.failed")
        for e in events[:-1]
    )
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = {
        e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.done"
    }
    assert [e["output_index"] for e in added] == list(range(len(added)))
    if terminal["type"] != "response.failed":
        assert set(done) == set(range(len(added))), "every item gets output_item.done"
        assert terminal["response"]["output"] == [done[i] for i in range(len(added))]
        usage = terminal["response"]["usage"]
        assert set(usage) >= {
            "input_tokens",
            "input_tokens_details",
            "output_tokens",
            "output_tokens_details",
            "total_tokens",
        }
        assert "cached_tokens" in usage["input_tokens_details"]
        assert "reasoning_tokens" in usage["output_tokens_details"]
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(ids) == 1
    state = ResponseStreamState(input_tools=tools if tools is not None else omit, text_format=omit)
    for payload in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=payload))
    return ResponsesResult(events, terminal["response"], state._completed_response)


def output_summary(final: dict) -> dict:
    """Reasoning, text and calls of a Response object."""
    summary = {"reasoning": "", "text": "", "calls": []}
    for item in final["output"]:
        if item["type"] == "reasoning":
            summary["reasoning"] += "".join(p["text"] for p in item["summary"])
        elif item["type"] == "message":
            summary["text"] += "".join(p["text"] for p in item["content"])
        elif item["type"] == "function_call":
            summary["calls"].append((item["name"], json.loads(item["arguments"])))
        elif item["type"] == "custom_tool_call":
            summary["calls"].append((item["name"], item["input"]))
    return summary


# --------------------------------------------------------------------------------------------
# Every upstream kind → Chat client


@pytest.mark.parametrize("kind", ["openai-responses", "anthropic", "gemini"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_upstream_stream_becomes_a_valid_chat_stream(kind: str, data) -> None:
    raw = UPSTREAMS[kind]()
    cuts = data.draw(cut_points(raw))
    context = context_for(Endpoint.CHAT, kind, stream_options={"include_usage": True})
    out, translator = run(kind, context, raw, cuts)
    result = parse_chat(out)
    assert result.role == "assistant"
    assert result.content == "Hello ✓"
    assert result.reasoning == "Let me think."
    assert [(c["name"], json.loads(c["arguments"])) for c in result.calls.values()] == EXPECTED_ARGS
    assert result.finish_reason == "tool_calls"
    assert result.done and result.error is None
    assert result.usage["prompt_tokens"] == 50
    assert result.usage["prompt_tokens_details"]["cached_tokens"] == 32
    assert result.usage["completion_tokens"] == 20
    assert result.usage["total_tokens"] == 70
    assert translator.finished
    assert translator.usage.input_tokens == 50
    # Anthropic's cache writes (cache_creation_input_tokens) are part of the input, kept apart
    assert translator.usage.cache_write_tokens == (8 if kind == "anthropic" else 0)
    assert translator.deltas >= 6


def test_chat_stream_has_no_usage_chunk_unless_asked() -> None:
    context = context_for(Endpoint.CHAT, "anthropic")
    out, translator = run("anthropic", context, anthropic_upstream())
    result = parse_chat(out)
    assert result.usage is None and result.done
    assert b'"usage"' not in out
    assert translator.usage.output_tokens == 20  # still known for billing


def test_chat_stream_model_is_the_name_the_client_asked_for() -> None:
    out, _ = run("gemini", context_for(Endpoint.CHAT, "gemini"), gemini_upstream())
    chunks = [json.loads(d) for _, d in sse_events(out) if d != "[DONE]"]
    assert {c["model"] for c in chunks} == {"alias-model"}
    assert len({c["id"] for c in chunks}) == 1


@pytest.mark.parametrize(
    ("kind", "raw", "reason"),
    [
        ("anthropic", lambda: anthropic_upstream("max_tokens"), "length"),
        ("anthropic", lambda: anthropic_upstream("refusal"), "content_filter"),
        ("anthropic", lambda: anthropic_upstream("end_turn"), "tool_calls"),
        ("gemini", lambda: gemini_upstream("MAX_TOKENS"), "length"),
        ("gemini", lambda: gemini_upstream("SAFETY"), "content_filter"),
        ("openai-responses", lambda: responses_upstream("incomplete"), "length"),
    ],
)
def test_stop_reasons_map_to_chat_finish_reasons(kind, raw, reason) -> None:
    out, _ = run(kind, context_for(Endpoint.CHAT, kind), raw())
    assert parse_chat(out).finish_reason == reason


def test_anthropic_thinking_signature_rides_in_the_first_chat_tool_call_id() -> None:
    out, _ = run("anthropic", context_for(Endpoint.CHAT, "anthropic"), anthropic_upstream())
    calls = parse_chat(out).calls
    first, second = split_call_id(calls[0]["id"]), split_call_id(calls[1]["id"])
    assert (first.id, first.signature_kind, first.signature) == (
        "toolu_1",
        "anthropic",
        "SIG+/abc==",
    )
    assert (second.id, second.signature) == ("toolu_2", None)


def test_gemini_thought_signature_rides_in_its_chat_tool_call_id() -> None:
    out, _ = run("gemini", context_for(Endpoint.CHAT, "gemini"), gemini_upstream())
    calls = parse_chat(out).calls
    first, second = split_call_id(calls[0]["id"]), split_call_id(calls[1]["id"])
    assert first.signature_kind == "gemini" and first.signature == "R0VNSU5JLVNJRw=="
    assert first.id.startswith("call_") and second.signature is None
    assert first.id != second.id


# --------------------------------------------------------------------------------------------
# Every upstream kind → Responses client


@pytest.mark.parametrize("kind", ["openai-chat", "anthropic", "gemini"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_upstream_stream_becomes_a_valid_responses_stream(kind: str, data) -> None:
    raw = UPSTREAMS[kind]()
    cuts = data.draw(cut_points(raw))
    context = context_for(Endpoint.RESPONSES, kind)
    out, translator = run(kind, context, raw, cuts)
    result = parse_responses(out, TOOLS_RESPONSES)
    assert result.final["status"] == "completed"
    assert result.response is not None  # the SDK accepted the whole stream
    summary = output_summary(result.final)
    assert summary == {"reasoning": "Let me think.", "text": "Hello ✓", "calls": EXPECTED_ARGS}
    assert [o.type for o in result.response.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert result.response.output_text == "Hello ✓"
    usage = result.final["usage"]
    assert usage["input_tokens"] == 50
    assert usage["input_tokens_details"]["cached_tokens"] == 32
    assert usage["output_tokens"] == 20
    assert usage["total_tokens"] == 70
    assert result.final["model"] == "alias-model"
    assert translator.finished and translator.usage.output_tokens == 20


def test_reasoning_item_carries_the_raw_text_for_replay() -> None:
    out, _ = run("openai-chat", context_for(Endpoint.RESPONSES, "openai-chat"), chat_upstream())
    final = parse_responses(out).final
    reasoning = final["output"][0]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    carried = decode_reasoning(reasoning["encrypted_content"])
    assert (carried.text, carried.kind, carried.signature) == ("Let me think.", "openai-chat", None)
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 7


def test_length_becomes_response_incomplete() -> None:
    for kind, raw in [
        ("openai-chat", chat_upstream("length")),
        ("anthropic", anthropic_upstream("max_tokens")),
        ("gemini", gemini_upstream("MAX_TOKENS")),
    ]:
        out, _ = run(kind, context_for(Endpoint.RESPONSES, kind), raw)
        final = parse_responses(out).final
        assert final["status"] == "incomplete"
        assert final["incomplete_details"] == {"reason": "max_output_tokens"}
        assert final["usage"]["total_tokens"] == 70


def test_content_filter_becomes_response_incomplete() -> None:
    out, _ = run("gemini", context_for(Endpoint.RESPONSES, "gemini"), gemini_upstream("SAFETY"))
    final = parse_responses(out).final
    assert final["incomplete_details"] == {"reason": "content_filter"}


def test_custom_tool_calls_are_unwrapped_into_custom_tool_call_items() -> None:
    tools = [
        {"type": "custom", "name": "apply_patch", "description": "Patch files."},
        {"type": "function", "name": "shell", "parameters": {"type": "object"}},
    ]
    context = context_for(Endpoint.RESPONSES, "openai-chat", tools=tools)
    patch = "*** Begin Patch\n*** End Patch"
    wrapped = json.dumps({"input": patch})
    raw = b"".join(
        [
            chat_chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_p",
                            "type": "function",
                            "function": {"name": "apply_patch", "arguments": wrapped[:9]},
                        }
                    ]
                }
            ),
            chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": wrapped[9:]}}]}),
            chat_chunk({}, "tool_calls"),
            b"data: [DONE]\n\n",
        ]
    )
    out, _ = run("openai-chat", context, raw)
    result = parse_responses(out, tools)
    (item,) = result.final["output"]
    assert item["type"] == "custom_tool_call"
    assert item["name"] == "apply_patch" and item["input"] == patch and item["call_id"] == "call_p"
    deltas = [e for e in result.events if e["type"] == "response.custom_tool_call_input.delta"]
    assert "".join(e["delta"] for e in deltas) == patch


def test_namespace_tool_calls_come_back_with_their_namespace() -> None:
    tools = [
        {
            "type": "namespace",
            "name": "mcp",
            "description": "MCP tools",
            "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"}}],
        }
    ]
    context = context_for(Endpoint.RESPONSES, "anthropic", tools=tools)
    assert context.namespaced == {"mcp__read": ("mcp", "read")}
    raw = b"".join(
        [
            sse({"type": "message_start", "message": {"id": "m", "usage": {}}}),
            sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "tool_use", "id": "toolu_9", "name": "mcp__read"},
                }
            ),
            sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": "{}"},
                }
            ),
            sse({"type": "content_block_stop", "index": 0}),
            sse({"type": "message_delta", "delta": {"stop_reason": "tool_use"}}),
            sse({"type": "message_stop"}),
        ]
    )
    out, _ = run("anthropic", context, raw)
    (item,) = parse_responses(out).final["output"]
    assert (item["name"], item["namespace"], item["call_id"]) == ("read", "mcp", "toolu_9")


def test_plain_text_answer_without_usage_still_completes_with_zero_usage() -> None:
    raw = chat_chunk({"content": "hi"}) + chat_chunk({}, "stop") + b"data: [DONE]\n\n"
    out, translator = run("openai-chat", context_for(Endpoint.RESPONSES, "openai-chat"), raw)
    final = parse_responses(out).final
    assert final["output"][0]["content"][0]["text"] == "hi"
    assert final["usage"] == {
        "input_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 0,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 0,
    }
    assert translator.usage is None


# --------------------------------------------------------------------------------------------
# Failures


def test_fail_midway_gives_a_chat_error_chunk_and_nothing_after() -> None:
    context = context_for(Endpoint.CHAT, "anthropic")
    translator = StreamTranslator("anthropic", context)
    raw = anthropic_upstream()
    out = translator.feed(raw[: len(raw) // 2])
    out += translator.fail("upstream connection reset", "server_error")
    assert translator.finish() == b"" and translator.feed(raw) == b""
    result = parse_chat(out)
    assert result.error == {
        "message": "upstream connection reset",
        "type": "server_error",
        "param": None,
        "code": "server_error",
    }
    assert not result.done and not translator.finished
    assert translator.deltas > 0


def test_fail_midway_gives_response_failed_with_the_next_sequence_number() -> None:
    context = context_for(Endpoint.RESPONSES, "gemini")
    translator = StreamTranslator("gemini", context)
    raw = gemini_upstream()
    out = translator.feed(raw[: len(raw) // 2]) + translator.fail(
        "Rate limit. Please try again in 3s.", "rate_limit_exceeded"
    )
    result = parse_responses(out)
    assert result.final["status"] == "failed"
    assert result.final["error"] == {
        "code": "rate_limit_exceeded",
        "message": "Rate limit. Please try again in 3s.",
    }
    assert translator.finish() == b""


def test_fail_before_any_byte_still_starts_with_response_created() -> None:
    translator = StreamTranslator("anthropic", context_for(Endpoint.RESPONSES, "anthropic"))
    result = parse_responses(translator.fail("boom", "server_error"))
    assert [e["type"] for e in result.events] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]


@pytest.mark.parametrize(
    ("kind", "error_event", "code"),
    [
        (
            "anthropic",
            sse(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                "error",
            ),
            "server_is_overloaded",
        ),
        (
            "openai-chat",
            sse(
                {
                    "error": {
                        "message": "Overloaded",
                        "type": "server_error",
                        "code": "server_is_overloaded",
                    }
                }
            ),
            "server_is_overloaded",
        ),
        (
            "gemini",
            sse({"error": {"code": 503, "message": "Overloaded", "status": "UNAVAILABLE"}}),
            "server_is_overloaded",
        ),
        (
            "openai-responses",
            sse(
                {
                    "type": "response.failed",
                    "sequence_number": 9,
                    "response": {
                        "id": "r",
                        "status": "failed",
                        "error": {"code": "server_is_overloaded", "message": "Overloaded"},
                    },
                },
                "response.failed",
            ),
            "server_is_overloaded",
        ),
    ],
)
def test_upstream_error_events_become_the_clients_error_form(kind, error_event, code) -> None:
    head = {
        "anthropic": sse({"type": "message_start", "message": {"id": "m", "usage": {}}}),
        "openai-chat": chat_chunk({"content": "partial"}),
        "gemini": sse({"candidates": [{"content": {"parts": [{"text": "partial"}]}}]}),
        "openai-responses": responses_upstream().split(b"event: response.output_item.added")[0],
    }[kind]
    if kind != "openai-responses":
        client = Endpoint.RESPONSES
        out, translator = run(kind, context_for(client, kind), head + error_event)
        result = parse_responses(out)
        assert result.final["error"] == {"code": code, "message": "Overloaded"}
        assert translator.finished
    out, translator = run(kind, context_for(Endpoint.CHAT, kind), head + error_event)
    if kind != "openai-chat":
        assert parse_chat(out).error["code"] == code
        assert not parse_chat(out).done


# --------------------------------------------------------------------------------------------
# Same protocol: bytes pass through


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_same_protocol_passes_bytes_through_and_drops_only_the_unasked_usage_chunk(data) -> None:
    raw = chat_upstream()
    cuts = data.draw(cut_points(raw))
    asked, _ = run(
        "openai-chat",
        context_for(Endpoint.CHAT, "openai-chat", stream_options={"include_usage": True}),
        raw,
        cuts,
    )
    assert asked == raw
    unasked, translator = run("openai-chat", context_for(Endpoint.CHAT, "openai-chat"), raw, cuts)
    assert b'"usage"' not in unasked and unasked.endswith(b"data: [DONE]\n\n")
    assert translator.usage.input_tokens == 50 and translator.usage.cached_tokens == 32
    assert translator.finished


def test_same_protocol_responses_passthrough_and_fail_sequence() -> None:
    raw = responses_upstream()
    out, translator = run(
        "openai-responses", context_for(Endpoint.RESPONSES, "openai-responses"), raw
    )
    assert out == raw and translator.finished and translator.usage.output_tokens == 20
    translator = StreamTranslator(
        "openai-responses", context_for(Endpoint.RESPONSES, "openai-responses")
    )
    head = raw.split(b"event: response.output_item.added")[0]
    out = translator.feed(head) + translator.fail("reset", "server_error")
    events = [json.loads(d) for _, d in sse_events(out)]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["sequence_number"] == events[-2]["sequence_number"] + 1
    assert events[-1]["response"]["id"] == "resp_up"


def test_passthrough_flushes_a_last_event_without_its_blank_line() -> None:
    raw = chat_upstream()[: -len(b"\n\n")]
    out, translator = run("openai-chat", context_for(Endpoint.CHAT, "openai-chat"), raw)
    assert out.rstrip().endswith(b"data: [DONE]") and translator.finished


# --------------------------------------------------------------------------------------------
# Non-streamed answers

CHAT_BODY = {
    "id": "chatcmpl-up",
    "object": "chat.completion",
    "model": "deepseek-v4",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello ✓",
                "reasoning_content": "Let me think.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
                    },
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": CHAT_USAGE,
}
RESPONSES_BODY = {
    "id": "resp_up",
    "object": "response",
    "status": "completed",
    "output": [
        {
            "id": "rs_1",
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": "Let me think."}],
        },
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello ✓"}],
        },
        {
            "id": "fc_1",
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {
            "id": "fc_2",
            "type": "function_call",
            "call_id": "call_2",
            "name": "get_time",
            "arguments": '{"tz":"CET"}',
        },
    ],
    "usage": RESPONSES_USAGE,
}
ANTHROPIC_BODY = {
    "id": "msg_up",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {"type": "thinking", "thinking": "Let me think.", "signature": "SIG"},
        {"type": "text", "text": "Hello ✓"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"tz": "CET"}},
    ],
    "stop_reason": "tool_use",
    "usage": {
        "input_tokens": 10,
        "cache_read_input_tokens": 32,
        "cache_creation_input_tokens": 8,
        "output_tokens": 20,
    },
}
GEMINI_BODY = {
    "candidates": [
        {
            "content": {
                "role": "model",
                "parts": [
                    {"text": "Let me think.", "thought": True},
                    {"text": "Hello ✓"},
                    {
                        "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                        "thoughtSignature": "GSIG",
                    },
                    {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
                ],
            },
            "finishReason": "STOP",
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 50,
        "cachedContentTokenCount": 32,
        "candidatesTokenCount": 13,
        "thoughtsTokenCount": 7,
        "totalTokenCount": 70,
    },
}
BODIES = {
    "openai-chat": CHAT_BODY,
    "openai-responses": RESPONSES_BODY,
    "anthropic": ANTHROPIC_BODY,
    "gemini": GEMINI_BODY,
}


@pytest.mark.parametrize("kind", ["openai-responses", "anthropic", "gemini"])
def test_non_stream_answers_become_chat_completions(kind: str) -> None:
    context = context_for(Endpoint.CHAT, kind, stream=False)
    body = translate_response(kind, context, BODIES[kind])
    assert body["object"] == "chat.completion" and body["model"] == "alias-model"
    (choice,) = body["choices"]
    message = choice["message"]
    assert message["content"] == "Hello ✓"
    assert message["reasoning_content"] == "Let me think."
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ] == EXPECTED_ARGS
    assert choice["finish_reason"] == "tool_calls"
    assert body["usage"]["prompt_tokens"] == 50 and body["usage"]["total_tokens"] == 70
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}


@pytest.mark.parametrize("kind", ["openai-chat", "anthropic", "gemini"])
def test_non_stream_answers_become_response_objects(kind: str) -> None:
    from openai.types.responses import Response

    context = context_for(Endpoint.RESPONSES, kind, stream=False)
    body = translate_response(kind, context, BODIES[kind])
    assert body["object"] == "response" and body["status"] == "completed"
    assert output_summary(body) == {
        "reasoning": "Let me think.",
        "text": "Hello ✓",
        "calls": EXPECTED_ARGS,
    }
    assert body["usage"]["input_tokens"] == 50 and body["usage"]["total_tokens"] == 70
    parsed = Response.model_validate(body)  # the SDK's own model accepts it
    assert parsed.output_text == "Hello ✓"


def test_same_protocol_non_stream_is_unchanged() -> None:
    context = context_for(Endpoint.CHAT, "openai-chat", stream=False)
    assert translate_response("openai-chat", context, CHAT_BODY) is CHAT_BODY


@pytest.mark.parametrize("kind", list(BODIES))
def test_response_usage_reads_every_upstream_kind(kind: str) -> None:
    usage = response_usage(kind, BODIES[kind])
    assert (usage.input_tokens, usage.cached_tokens, usage.output_tokens) == (50, 32, 20)
    assert usage.total_tokens == 70
    assert response_usage(kind, {}) is None


LEAK = "key up-secret-123 (Authorization: Bearer sk-proj-LeakedKey0123456789) at 10.1.2.3:8080"


@pytest.mark.parametrize(
    ("kind", "client"),
    [
        ("openai-chat", Endpoint.CHAT),  # relayed
        ("openai-responses", Endpoint.RESPONSES),  # relayed
        ("openai-chat", Endpoint.RESPONSES),
        ("openai-responses", Endpoint.CHAT),
        ("anthropic", Endpoint.CHAT),
        ("gemini", Endpoint.RESPONSES),
    ],
)
def test_an_upstream_error_event_reaches_the_client_redacted(kind, client) -> None:
    """Issue 12, finding 3: an error inside the stream is redacted like an error status."""
    error_event = {
        "anthropic": sse(
            {"type": "error", "error": {"type": "api_error", "message": LEAK}}, "error"
        ),
        "openai-chat": sse({"error": {"message": LEAK, "type": "server_error", "code": "x"}}),
        "gemini": sse({"error": {"code": 500, "message": LEAK, "status": "INTERNAL"}}),
        "openai-responses": sse(
            {
                "type": "response.failed",
                "sequence_number": 9,
                "response": {
                    "id": "r", "status": "failed", "error": {"code": "x", "message": LEAK}
                },
            },
            "response.failed",
        ),
    }[kind]
    head = {
        "anthropic": sse({"type": "message_start", "message": {"id": "m", "usage": {}}}),
        "openai-chat": chat_chunk({"content": "the model may say sk-proj-NotASecret0123456789"}),
        "gemini": sse({"candidates": [{"content": {"parts": [{"text": "partial"}]}}]}),
        "openai-responses": responses_upstream().split(b"event: response.output_item.added")[0],
    }[kind]
    confidential = Confidential.of_call(
        "http://10.1.2.3:8080/v1/x", {"authorization": "Bearer up-secret-123"}
    )
    translator = StreamTranslator(kind, context_for(client, kind), confidential)
    raw = head + error_event
    out = translator.feed(raw[:len(head) + 20]) + translator.feed(raw[len(head) + 20:])
    out += translator.finish()
    for secret in ("up-secret-123", "sk-proj-LeakedKey", "10.1.2.3"):
        assert secret.encode() not in out, out
    assert b"[redacted]" in out
    if kind == "openai-chat" and client is Endpoint.CHAT:
        assert b"sk-proj-NotASecret0123456789" in out  # the model's own words are not touched


# --------------------------------------------------------------------------------------------
# Every other upstream kind → Messages client (Claude Code), through the anthropic SDK's own
# stream accumulator


def parse_messages(raw: bytes):
    """The final Message the anthropic SDK builds from ``raw`` (its ``accumulate_event``), and
    the event names in order."""
    from anthropic.lib.streaming._messages import accumulate_event

    snapshot, names, buffers = None, [], {}
    for name, data in sse_events(raw):
        names.append(name)
        payload = json.loads(data)
        assert payload["type"] == name  # Anthropic's framing: the event name is the type
        if name in ("ping", "error"):
            continue
        snapshot = accumulate_event(event=payload, current_snapshot=snapshot, json_bufs=buffers)
    return snapshot, names


@pytest.mark.parametrize("kind", ["openai-chat", "openai-responses", "gemini"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_upstream_stream_becomes_a_valid_messages_stream(kind: str, data) -> None:
    raw = UPSTREAMS[kind]()
    cuts = data.draw(cut_points(raw))
    context = context_for(Endpoint.MESSAGES, kind)
    out, translator = run(kind, context, raw, cuts)
    message, names = parse_messages(out)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert message.model == "alias-model"
    thinking = [b for b in message.content if b.type == "thinking"]
    assert [b.thinking for b in thinking] == ["Let me think."]
    assert decode_reasoning(thinking[0].signature).text == "Let me think."
    assert "".join(b.text for b in message.content if b.type == "text") == "Hello ✓"
    # Parallel calls are several tool_use blocks, each with its whole input.
    calls = [(b.name, b.input) for b in message.content if b.type == "tool_use"]
    assert calls == EXPECTED_ARGS
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == 20
    assert message.usage.cache_read_input_tokens == 32
    assert message.usage.input_tokens == 50 - 32  # Anthropic's input excludes cache reads
    assert translator.finished and translator.usage.input_tokens == 50


# --------------------------------------------------------------------------------------------
# An upstream's lone surrogate (found by the Messages fuzz, issue 14)


@pytest.mark.parametrize(
    ("client", "kind"),
    [(client, kind) for client in (Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.MESSAGES)
     for kind in UPSTREAMS if kind != client.upstream_kind],
)
def test_a_lone_surrogate_from_the_upstream_reaches_the_client_as_its_escape(
    client: Endpoint, kind: str
) -> None:
    """An upstream's ``"\\ud800"`` escape (Python decodes it to a lone surrogate, which has no
    UTF-8 form) failed every translated stream with a UnicodeEncodeError: it is written back as
    the same escape, and the client's SDK reads the text the upstream sent."""
    raw = UPSTREAMS[kind]()
    assert raw.count(b"\\u2713") == 1
    raw = raw.replace(b"\\u2713", b"\\ud800")
    out, translator = run(kind, context_for(client, kind), raw)
    out.decode("utf-8")  # strictly: no surrogate bytes went out
    if client is Endpoint.CHAT:
        assert parse_chat(out).content == "Hello \ud800"
    elif client is Endpoint.RESPONSES:
        assert output_summary(parse_responses(out, TOOLS_RESPONSES).final)["text"] == (
            "Hello \ud800"
        )
    else:
        message, names = parse_messages(out)
        assert names[-1] == "message_stop"
        assert "".join(b.text for b in message.content if b.type == "text") == "Hello \ud800"
    assert translator.finished


# --------------------------------------------------------------------------------------------
# An upstream answer of the wrong shape (found by the upstream-answer fuzz of
# tests/test_translate_fuzz.py, issue 14)


#: Upstream events each decoder raised on (or passed a list on as text), before the fix.
WRONG_SHAPES = {
    "gemini-candidates-object": ("gemini", sse({"candidates": {"0": {}}}, end=b"\r\n\r\n")),
    "gemini-signature-object": ("gemini", sse(
        {"candidates": [{"content": {"parts": [
            {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": {"a": 1}}
        ]}}]},
        end=b"\r\n\r\n",
    )),
    "chat-finish-list": ("openai-chat", sse(
        {"choices": [{"index": 0, "delta": {}, "finish_reason": ["stop"]}]}
    )),
    "chat-choices-object": ("openai-chat", sse({"choices": {"0": 1}})),
    "anthropic-stop-reason-list": ("anthropic", sse(
        {"type": "message_delta", "delta": {"stop_reason": ["end_turn"]},
         "usage": {"output_tokens": 1}},
        event="message_delta",
    )),
    "anthropic-text-list": ("anthropic", sse(
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "text", "text": ""}},
        event="content_block_start",
    ) + sse(
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": ["x"]}},
        event="content_block_delta",
    )),
    "responses-index-list": ("openai-responses", sse(
        {"type": "response.function_call_arguments.delta", "output_index": [], "delta": "x"},
        event="response.function_call_arguments.delta",
    )),
    "responses-summary-index-null": ("openai-responses", sse(
        {"type": "response.reasoning_summary_part.added", "output_index": 0,
         "summary_index": None},
        event="response.reasoning_summary_part.added",
    )),
}


@pytest.mark.parametrize(
    ("client", "kind", "event"),
    [pytest.param(client, kind, event, id=f"{client.value}-{name}")
     for name, (kind, event) in WRONG_SHAPES.items()
     for client in (Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.MESSAGES)
     if kind != client.upstream_kind],  # a relayed stream's bytes are the upstream's own
)
def test_an_upstream_event_of_the_wrong_shape_fails_the_stream_in_the_clients_form(
    client: Endpoint, kind: str, event: bytes
) -> None:
    """A decoder used to raise (KeyError, TypeError…) or hand an encoder a list for text: a
    traceback at the relay and the client's stream cut. The stream now ends with the client's
    own error event, code ``upstream_invalid_response``, and nothing after it."""
    out, translator = run(kind, context_for(client, kind), event + event)
    events = [(name, json.loads(data)) for name, data in sse_events(out) if data != "[DONE]"]
    last_name, last = events[-1]
    if client is Endpoint.CHAT:
        assert last["error"]["code"] == "upstream_invalid_response"
    elif client is Endpoint.RESPONSES:
        assert last_name == "response.failed"
        assert last["response"]["error"]["code"] == "upstream_invalid_response"
    else:
        assert last_name == "error" and last["error"]["type"] == "api_error"
        assert "not of the" in last["error"]["message"]
    assert translator.finish() == b""  # closed: nothing follows the error


@pytest.mark.parametrize("kind", ["openai-chat", "openai-responses", "anthropic", "gemini"])
def test_a_non_stream_answer_of_the_wrong_shape_is_a_502_upstream_error(kind: str) -> None:
    body = {"openai-chat": {"choices": [{"message": {"tool_calls": [None]}}]},
            "openai-responses": {"output": [{"type": "message", "content": -1}]},
            "anthropic": {"content": [{"type": "text", "text": {"a": 1}}]},
            "gemini": {"candidates": [{"content": ["x"]}]}}[kind]
    client = Endpoint.MESSAGES if kind != "anthropic" else Endpoint.CHAT
    with pytest.raises(UpstreamError) as caught:
        translate_response(kind, context_for(client, kind, stream=False), body)
    assert (caught.value.status, caught.value.code) == (502, "upstream_invalid_response")


@pytest.mark.parametrize("details", [[1], 7, "x"])
def test_usage_details_of_the_wrong_type_count_as_none(details) -> None:
    """A relayed Chat stream's usage chunk (and a Responses answer's usage) with ``…_details``
    that is not an object: the stream meter raised AttributeError."""
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": details,
             "completion_tokens_details": details}
    raw = chat_chunk({"content": "x"}) + sse({"choices": [], "usage": usage}) + b"data: [DONE]\n\n"
    _, translator = run("openai-chat", context_for(Endpoint.CHAT, "openai-chat"), raw)
    assert translator.usage.input_tokens == 5 and translator.usage.output_tokens == 2
    answer = {"output": [], "usage": {"input_tokens": 5, "output_tokens": 2,
                                      "input_tokens_details": details,
                                      "output_tokens_details": details}}
    assert response_usage("openai-responses", answer).cached_tokens == 0


def test_an_upstream_event_too_deep_to_decode_is_skipped_like_any_non_json_event() -> None:
    """``json.loads`` raised RecursionError out of the stream (only ValueError was caught)."""
    deep = sse("[" * 5000 + "]" * 5000, end=b"\r\n\r\n")
    raw = UPSTREAMS["gemini"]()
    out, translator = run("gemini", context_for(Endpoint.MESSAGES, "gemini"), deep + raw)
    message, names = parse_messages(out)
    assert names[-1] == "message_stop" and translator.finished
    assert "".join(b.text for b in message.content if b.type == "text") == "Hello ✓"
