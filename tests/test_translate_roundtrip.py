"""Round trips: what the relay gives a client in one turn, the client gives back in the next, and
the next upstream request must carry the provider's state again — DeepSeek's
``reasoning_content``, Anthropic's signed thinking, Gemini's ``thoughtSignature``.

The client side is played the way the real clients behave: Codex keeps only the items of
``response.output_item.done`` and replays them without ``id``s (protocols.md §1.1, §2.5); a Chat
client keeps the assistant message it rebuilt from the chunks (with ``reasoning_content``, as
DeepSeek-aware clients do).
"""

from __future__ import annotations

import json

from relay.protocol.requests import Endpoint
from relay.protocol.translate import build_upstream_request

from .test_translate_streams import (
    TOOLS_CHAT,
    TOOLS_RESPONSES,
    anthropic_upstream,
    chat_upstream,
    gemini_upstream,
    parse_chat,
    parse_responses,
    run,
)


def codex_turn(kind: str, raw: bytes, effort: str | None = "high") -> tuple[list[dict], dict]:
    """Run one Codex turn through the relay; returns the items Codex keeps and the request."""
    first = {
        "model": "alias",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "weather?"}],
            }
        ],
        "tools": TOOLS_RESPONSES,
        "reasoning": {"effort": effort, "summary": "auto"} if effort else None,
        "stream": True,
        "store": False,
    }
    request = build_upstream_request(first, Endpoint.RESPONSES, kind, model="up", api_key="k")
    out, _ = run(kind, request.context, raw)
    events = parse_responses(out, TOOLS_RESPONSES).events
    kept = [
        {k: v for k, v in e["item"].items() if k not in ("id", "status")}
        for e in events
        if e["type"] == "response.output_item.done"
    ]
    return kept, first


def codex_next(kind: str, first: dict, kept: list[dict]) -> dict:
    outputs = [
        {
            "type": "function_call_output",
            "call_id": item["call_id"],
            "output": f"result of {item['name']}",
        }
        for item in kept
        if item["type"] == "function_call"
    ]
    body = {**first, "input": [*first["input"], *kept, *outputs]}
    return build_upstream_request(body, Endpoint.RESPONSES, kind, model="up", api_key="k").body


def test_codex_on_deepseek_gives_reasoning_content_back_on_the_tool_call_turn() -> None:
    kept, first = codex_turn("openai-chat", chat_upstream())
    assert [item["type"] for item in kept] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    body = codex_next("openai-chat", first, kept)
    assistant = body["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["reasoning_content"] == "Let me think."
    assert assistant["content"] == "Hello ✓"
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_1", "call_2"]
    assert [(m["role"], m["tool_call_id"]) for m in body["messages"][2:]] == [
        ("tool", "call_1"),
        ("tool", "call_2"),
    ]


def test_reasoning_survives_a_client_that_replays_only_content_or_only_encrypted_content() -> None:
    kept, first = codex_turn("openai-chat", chat_upstream())
    without_content = [
        {**item, "content": None} if item["type"] == "reasoning" else item for item in kept
    ]
    body = codex_next("openai-chat", first, without_content)
    assert body["messages"][1]["reasoning_content"] == "Let me think."
    without_blob = [
        {**item, "encrypted_content": None} if item["type"] == "reasoning" else item
        for item in kept
    ]
    body = codex_next("openai-chat", first, without_blob)
    assert body["messages"][1]["reasoning_content"] == "Let me think."


def test_codex_on_anthropic_replays_the_signed_thinking_block() -> None:
    kept, first = codex_turn("anthropic", anthropic_upstream())
    body = codex_next("anthropic", first, kept)
    assistant = body["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["content"][0] == {
        "type": "thinking",
        "thinking": "Let me think.",
        "signature": "SIG+/abc==",
    }
    assert [b["type"] for b in assistant["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert [b["id"] for b in assistant["content"][2:]] == ["toolu_1", "toolu_2"]
    results = body["messages"][2]["content"]
    assert [(b["type"], b["tool_use_id"]) for b in results] == [
        ("tool_result", "toolu_1"),
        ("tool_result", "toolu_2"),
    ]
    assert body["thinking"]["type"] == "enabled"


def test_codex_on_anthropic_without_the_reasoning_item_turns_thinking_off() -> None:
    kept, first = codex_turn("anthropic", anthropic_upstream())
    body = codex_next("anthropic", first, [item for item in kept if item["type"] != "reasoning"])
    assert "thinking" not in body  # Anthropic would refuse a tool loop without its thinking
    assert body["messages"][1]["content"][0]["type"] == "text"


def test_codex_on_gemini_replays_thought_signatures_and_names_the_responses() -> None:
    kept, first = codex_turn("gemini", gemini_upstream())
    calls = [item for item in kept if item["type"] == "function_call"]
    assert calls[0]["call_id"] != calls[1]["call_id"]
    body = codex_next("gemini", first, kept)
    model_turn = body["contents"][1]
    assert model_turn["role"] == "model"
    assert model_turn["parts"][0] == {"text": "Hello ✓"}
    assert model_turn["parts"][1] == {
        "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
        "thoughtSignature": "R0VNSU5JLVNJRw==",
    }
    assert model_turn["parts"][2] == {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}}
    assert body["contents"][2] == {
        "role": "user",
        "parts": [
            {
                "functionResponse": {
                    "name": "get_weather",
                    "response": {"result": "result of get_weather"},
                }
            },
            {
                "functionResponse": {
                    "name": "get_time",
                    "response": {"result": "result of get_time"},
                }
            },
        ],
    }


def test_a_codex_conversation_can_move_from_gemini_to_deepseek() -> None:
    kept, first = codex_turn("gemini", gemini_upstream())
    body = codex_next("openai-chat", first, kept)
    ids = [c["id"] for c in body["messages"][1]["tool_calls"]]
    assert all("~" not in call_id for call_id in ids)  # the Gemini signature stays behind
    assert [m["tool_call_id"] for m in body["messages"][2:]] == ids
    assert body["messages"][1]["reasoning_content"] == "Let me think."


# --------------------------------------------------------------------------------------------
# Chat clients


def chat_turn(kind: str, raw: bytes) -> tuple[dict, dict]:
    first = {
        "model": "alias",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": TOOLS_CHAT,
        "reasoning_effort": "medium",
        "stream": True,
    }
    request = build_upstream_request(first, Endpoint.CHAT, kind, model="up", api_key="k")
    out, _ = run(kind, request.context, raw)
    result = parse_chat(out)
    assistant = {
        "role": "assistant",
        "content": result.content,
        "reasoning_content": result.reasoning,
        "tool_calls": [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in result.calls.values()
        ],
    }
    return assistant, first


def chat_next(kind: str, first: dict, assistant: dict) -> dict:
    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": f"result of {c['function']['name']}"}
        for c in assistant["tool_calls"]
    ]
    body = {**first, "messages": [*first["messages"], assistant, *results]}
    return build_upstream_request(body, Endpoint.CHAT, kind, model="up", api_key="k").body


def test_chat_client_on_anthropic_replays_thinking_from_reasoning_content_and_call_id() -> None:
    assistant, first = chat_turn("anthropic", anthropic_upstream())
    body = chat_next("anthropic", first, assistant)
    blocks = body["messages"][1]["content"]
    assert blocks[0] == {"type": "thinking", "thinking": "Let me think.", "signature": "SIG+/abc=="}
    assert [b.get("id") for b in blocks[2:]] == ["toolu_1", "toolu_2"]
    assert [b["tool_use_id"] for b in body["messages"][2]["content"]] == ["toolu_1", "toolu_2"]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 8192}


def test_chat_client_that_drops_reasoning_content_gets_thinking_off_not_an_error() -> None:
    assistant, first = chat_turn("anthropic", anthropic_upstream())
    assistant.pop("reasoning_content")
    body = chat_next("anthropic", first, assistant)
    assert "thinking" not in body
    assert body["messages"][1]["content"][0] == {"type": "text", "text": "Hello ✓"}


def test_chat_client_on_gemini_replays_thought_signatures() -> None:
    assistant, first = chat_turn("gemini", gemini_upstream())
    body = chat_next("gemini", first, assistant)
    parts = body["contents"][1]["parts"]
    assert parts[1]["thoughtSignature"] == "R0VNSU5JLVNJRw=="
    assert "thoughtSignature" not in parts[2]
    names = [p["functionResponse"]["name"] for p in body["contents"][2]["parts"]]
    assert names == ["get_weather", "get_time"]


def test_chat_client_on_responses_upstream_sends_plain_call_ids() -> None:
    assistant, first = chat_turn("gemini", gemini_upstream())
    body = chat_next("openai-responses", first, assistant)
    calls = [i for i in body["input"] if i["type"] == "function_call"]
    outputs = [i for i in body["input"] if i["type"] == "function_call_output"]
    assert [c["call_id"] for c in calls] == [o["call_id"] for o in outputs]
    assert all("~" not in c["call_id"] for c in calls)
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
