"""Request translation, pair by pair: the upstream body is asserted field by field against the
mapping tables of protocols.md (§4.1 Chat→Responses, §4.3 Responses→Chat, §5.1 →Anthropic,
§5.2 →Gemini), plus the same-protocol rewrites, paths, headers and the inputs refused with 400."""

from __future__ import annotations

import pytest

from relay.errors import InvalidRequest
from relay.protocol.events import call_id_with_signature, encode_reasoning
from relay.protocol.gemini import SKIP_SIGNATURE, clean_schema
from relay.protocol.requests import Endpoint
from relay.protocol.translate import build_upstream_request

PNG = "data:image/png;base64,iVBORw0KGgo="
PDF = "data:application/pdf;base64,JVBERi0xLjQ="
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def build(body: dict, client: Endpoint, kind: str, **kw):
    kw.setdefault("model", "up-model")
    kw.setdefault("api_key", "sk-up")
    return build_upstream_request(body, client, kind, **kw)


def chat_body(**extra) -> dict:
    body = {
        "model": "my-alias",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
                    {"type": "file", "file": {"filename": "a.pdf", "file_data": PDF}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
            {"role": "assistant", "content": "It is 18°C."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather by city",
                    "parameters": WEATHER_SCHEMA,
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
        "reasoning_effort": "low",
        "max_completion_tokens": 2048,
        "temperature": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(extra)
    return body


# --------------------------------------------------------------------------------------------
# Chat client → Responses upstream (§4.1)


def test_chat_to_responses_maps_every_field() -> None:
    request = build(chat_body(), Endpoint.CHAT, "openai-responses")
    body = request.body
    assert request.path == "responses"
    assert request.headers == {"authorization": "Bearer sk-up"}
    assert request.stream is True
    assert body["model"] == "up-model"
    assert body["instructions"] == "You are terse."
    assert body["input"] == [
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in these?"},
                {"type": "input_image", "detail": "high", "image_url": PNG},
                {"type": "input_file", "file_data": PDF, "filename": "a.pdf"},
            ],
        },
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "18°C"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "It is 18°C."}],
        },
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather by city",
            "parameters": WEATHER_SCHEMA,
            "strict": False,
        }
    ]
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert body["parallel_tool_calls"] is False
    assert body["text"] == {
        "format": {
            "type": "json_schema",
            "name": "answer",
            "schema": {"type": "object"},
            "strict": True,
        }
    }
    assert body["reasoning"] == {"effort": "low", "summary": "auto"}
    assert body["include"] == ["reasoning.encrypted_content"]
    assert body["max_output_tokens"] == 2048
    assert body["temperature"] == 0.5
    assert body["store"] is False and body["stream"] is True
    assert "messages" not in body and "stream_options" not in body
    assert request.context.include_usage is True
    assert request.context.model == "my-alias"


def test_chat_to_responses_later_system_message_becomes_developer_item() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": "Now be formal."},
        ],
    }
    request = build(body, Endpoint.CHAT, "openai-responses")
    assert "instructions" not in request.body
    assert request.body["input"][1] == {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": "Now be formal."}],
    }
    assert "reasoning" not in request.body and "include" not in request.body


def test_alias_reasoning_effort_overrides_the_clients() -> None:
    request = build(chat_body(), Endpoint.CHAT, "openai-responses", reasoning_effort="high")
    assert request.body["reasoning"]["effort"] == "high"
    request = build(chat_body(), Endpoint.CHAT, "openai-chat", reasoning_effort="high")
    assert request.body["reasoning_effort"] == "high"


# --------------------------------------------------------------------------------------------
# Responses client (Codex) → Chat upstream (§4.3)


def codex_body(**extra) -> dict:
    body = {
        "model": "deepseek-chat",
        "instructions": "<Codex base prompt>",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "<permissions>"}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "fix it"}],
            },
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "plan"}],
                "content": None,
                "encrypted_content": encode_reasoning("raw plan", None, "openai-chat"),
            },
            {
                "type": "function_call",
                "name": "shell_command",
                "arguments": '{"cmd":"ls"}',
                "call_id": "call_1",
            },
            {
                "type": "custom_tool_call",
                "name": "apply_patch",
                "input": "*** Begin Patch",
                "call_id": "call_2",
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "a.py"},
            {"type": "custom_tool_call_output", "call_id": "call_2", "output": "Done"},
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Fixed."}],
                "phase": "final_answer",
            },
            {"type": "message", "role": "user", "content": "thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "name": "shell_command",
                "description": "Run a command",
                "strict": False,
                "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
            },
            {
                "type": "custom",
                "name": "apply_patch",
                "description": "Patch files",
                "format": {"type": "grammar", "syntax": "lark", "definition": "start: PATCH"},
            },
            {"type": "web_search"},
            {"type": "local_shell"},
            {
                "type": "namespace",
                "name": "mcp",
                "description": "MCP",
                "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"}}],
            },
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "thread-1",
        "text": {"verbosity": "low"},
        "client_metadata": {"x-codex-installation-id": "uuid"},
    }
    body.update(extra)
    return body


def test_codex_to_chat_maps_every_field() -> None:
    request = build(codex_body(), Endpoint.RESPONSES, "openai-chat")
    body = request.body
    assert request.path == "chat/completions"
    assert body["model"] == "up-model"
    assert body["messages"] == [
        {"role": "system", "content": "<Codex base prompt>"},
        {"role": "system", "content": "<permissions>"},
        {"role": "user", "content": "fix it"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "raw plan",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "shell_command", "arguments": '{"cmd":"ls"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "apply_patch", "arguments": '{"input":"*** Begin Patch"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a.py"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Done"},
        {"role": "assistant", "content": "Fixed."},
        {"role": "user", "content": "thanks"},
    ]
    names = [tool["function"]["name"] for tool in body["tools"]]
    assert names == ["shell_command", "apply_patch", "mcp__read"]
    patch_tool = body["tools"][1]["function"]
    assert patch_tool["parameters"]["required"] == ["input"]
    assert "start: PATCH" in patch_tool["description"]
    assert body["tool_choice"] == "auto"
    assert body["parallel_tool_calls"] is True
    assert body["reasoning_effort"] == "medium"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["verbosity"] == "low"
    assert body["prompt_cache_key"] == "thread-1"
    for dropped in ("client_metadata", "include", "store", "input", "instructions", "reasoning"):
        assert dropped not in body
    assert request.context.custom_tools == frozenset({"apply_patch"})
    assert request.context.namespaced == {"mcp__read": ("mcp", "read")}
    assert request.context.echo["prompt_cache_key"] == "thread-1"


def test_codex_messages_between_a_call_and_its_output_are_moved_after_it() -> None:
    body = codex_body(
        input=[
            {"type": "message", "role": "user", "content": "go"},
            {"type": "function_call", "name": "shell_command", "arguments": "{}", "call_id": "c1"},
            {"type": "message", "role": "user", "content": "(approved)"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            {"type": "function_call", "name": "shell_command", "arguments": "{}", "call_id": "c2"},
            {"type": "message", "role": "user", "content": "stop"},
        ]
    )
    messages = build(body, Endpoint.RESPONSES, "openai-chat").body["messages"]
    roles = [(m["role"], m.get("tool_call_id") or m.get("content")) for m in messages[1:]]
    assert roles == [
        ("user", "go"),
        ("assistant", None),
        ("tool", "c1"),
        ("user", "(approved)"),
        ("assistant", None),
        ("tool", "c2"),  # never answered: an "aborted" result keeps the upstream happy
        ("user", "stop"),
    ]
    assert messages[-2]["content"].startswith("aborted")


def test_orphan_tool_output_becomes_user_text() -> None:
    body = codex_body(input=[{"type": "function_call_output", "call_id": "gone", "output": "x"}])
    messages = build(body, Endpoint.RESPONSES, "openai-chat").body["messages"]
    assert messages[-1] == {"role": "user", "content": "Output of tool call gone:\nx"}


def test_codex_string_input_and_tool_choice_forms() -> None:
    body = codex_body(input="hello", tool_choice={"type": "custom", "name": "apply_patch"})
    chat = build(body, Endpoint.RESPONSES, "openai-chat").body
    assert chat["messages"][-1] == {"role": "user", "content": "hello"}
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "apply_patch"}}
    body = codex_body(tool_choice={"type": "web_search"})
    assert build(body, Endpoint.RESPONSES, "openai-chat").body["tool_choice"] == "auto"


def test_codex_json_schema_output_becomes_response_format() -> None:
    fmt = {
        "type": "json_schema",
        "name": "codex_output_schema",
        "schema": {"type": "object"},
        "strict": True,
    }
    body = codex_body(text={"format": fmt})
    chat = build(body, Endpoint.RESPONSES, "openai-chat").body
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "codex_output_schema",
            "schema": {"type": "object"},
            "strict": True,
        },
    }


# --------------------------------------------------------------------------------------------
# → Anthropic (§5.1)


def test_chat_to_anthropic_maps_every_field() -> None:
    request = build(
        chat_body(tool_choice="auto", reasoning_effort=None), Endpoint.CHAT, "anthropic"
    )
    body = request.body
    assert request.path == "messages"
    assert request.headers == {"x-api-key": "sk-up", "anthropic-version": "2023-06-01"}
    assert body["model"] == "up-model"
    assert body["system"].startswith("You are terse.\n\nRespond only with a JSON value")
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
                {
                    "type": "document",
                    "source": {
                        "type": "base64",
                        "media_type": "application/pdf",
                        "data": "JVBERi0xLjQ=",
                    },
                    "title": "a.pdf",
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18°C"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "It is 18°C."}]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather by city", "input_schema": WEATHER_SCHEMA}
    ]
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert body["max_tokens"] == 2048
    assert body["temperature"] == 0.5
    assert body["stream"] is True
    assert "thinking" not in body


def test_anthropic_reasoning_effort_becomes_a_thinking_budget() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}
    request = build({**body, "reasoning_effort": "high"}, Endpoint.CHAT, "anthropic")
    assert request.body["thinking"] == {"type": "enabled", "budget_tokens": 16384}
    assert request.body["max_tokens"] == 16384 + 4096
    assert "temperature" not in request.body  # Anthropic requires the default with thinking
    request = build(body, Endpoint.CHAT, "anthropic")
    assert request.body["max_tokens"] == 8192 and request.body["temperature"] == 0.2
    request = build(
        {**body, "max_tokens": 4000}, Endpoint.CHAT, "anthropic", reasoning_effort="high"
    )
    assert request.body["max_tokens"] == 4000
    assert request.body["thinking"]["budget_tokens"] == 4000 - 1024
    request = build(
        {**body, "max_tokens": 1500, "reasoning_effort": "low"}, Endpoint.CHAT, "anthropic"
    )
    assert "thinking" not in request.body  # no room for the minimum budget


def test_anthropic_thinking_is_off_when_tool_choice_forces_a_tool() -> None:
    request = build(chat_body(reasoning_effort="high"), Endpoint.CHAT, "anthropic")
    assert request.body["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }
    assert "thinking" not in request.body


def test_anthropic_merges_consecutive_roles_and_keeps_tool_results_first() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {
                "role": "assistant",
                "content": "calling",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "c2", "type": "function", "function": {"name": "f", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "one"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": "next"},
        ],
    }
    messages = build(body, Endpoint.CHAT, "anthropic").body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert messages[1]["content"][0] == {"type": "text", "text": "calling"}
    assert messages[1]["content"][2] == {"type": "tool_use", "id": "c2", "name": "f", "input": {}}
    assert [b["type"] for b in messages[2]["content"]] == ["tool_result", "tool_result", "text"]


def test_codex_to_anthropic_drops_metadata_and_builtins_and_wraps_custom_tools() -> None:
    request = build(codex_body(), Endpoint.RESPONSES, "anthropic")
    body = request.body
    assert "client_metadata" not in body
    # the developer message that opens the input is part of the leading instructions
    assert body["system"] == "<Codex base prompt>\n\n<permissions>"
    assert body["messages"][0] == {"role": "user", "content": [{"type": "text", "text": "fix it"}]}
    assistant = body["messages"][1]
    assert assistant["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "shell_command", "input": {"cmd": "ls"}},
        {
            "type": "tool_use",
            "id": "call_2",
            "name": "apply_patch",
            "input": {"input": "*** Begin Patch"},
        },
    ]
    assert [t["name"] for t in body["tools"]] == ["shell_command", "apply_patch", "mcp__read"]
    assert body["tools"][1]["input_schema"]["properties"] == {
        "input": {"type": "string", "description": "The raw input for the tool."}
    }
    # reasoning from another upstream is not replayed as a thinking block (it has no signature);
    # the tool loop is closed ("Fixed." came after it), so thinking can stay on
    assert all(b["type"] != "thinking" for m in body["messages"] for b in m["content"])
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 8192}
    assert body["tool_choice"] == {"type": "auto"}


def test_anthropic_tool_ids_are_sanitized_consistently() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call:1/x",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call:1/x", "content": "ok"},
        ],
    }
    messages = build(body, Endpoint.CHAT, "anthropic").body["messages"]
    assert messages[1]["content"][0]["id"] == "call_1_x"
    assert messages[2]["content"][0]["tool_use_id"] == "call_1_x"


# --------------------------------------------------------------------------------------------
# → Gemini (§5.2)


def test_chat_to_gemini_maps_every_field() -> None:
    request = build(chat_body(), Endpoint.CHAT, "gemini", model="gemini-2.5-pro", api_key="g-key")
    body = request.body
    assert request.path == "models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    assert request.headers == {"x-goog-api-key": "g-key"}
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "What is in these?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0xLjQ="}},
            ],
        },
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": SKIP_SIGNATURE,
                }
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"result": "18°C"}}}
            ],
        },
        {"role": "model", "parts": [{"text": "It is 18°C."}]},
        {"role": "user", "parts": [{"text": "Thanks"}]},
    ]
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather by city",
                    "parameters": WEATHER_SCHEMA,
                }
            ]
        }
    ]
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    assert body["generationConfig"] == {
        "temperature": 0.5,
        "maxOutputTokens": 2048,
        "responseMimeType": "application/json",
        "responseSchema": {"type": "object"},
        "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True},
    }
    non_stream = build(chat_body(stream=False), Endpoint.CHAT, "gemini", model="gemini-2.5-pro")
    assert non_stream.path == "models/gemini-2.5-pro:generateContent"
    assert non_stream.stream is False


def test_gemini_3_uses_thinking_levels() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "reasoning_effort": "medium",
    }
    request = build(body, Endpoint.CHAT, "gemini", model="gemini-3-pro-preview")
    assert request.body["generationConfig"]["thinkingConfig"] == {
        "thinkingLevel": "high",
        "includeThoughts": True,
    }


def test_codex_to_gemini_tools_and_function_responses() -> None:
    request = build(codex_body(), Endpoint.RESPONSES, "gemini", model="gemini-2.5-flash")
    body = request.body
    assert "client_metadata" not in body
    declarations = body["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in declarations] == ["shell_command", "apply_patch", "mcp__read"]
    assert "parameters" not in declarations[2]  # an OBJECT without properties is refused
    assert declarations[1]["parameters"] == {
        "type": "object",
        "properties": {"input": {"type": "string", "description": "The raw input for the tool."}},
        "required": ["input"],
    }
    user_turn = body["contents"][2]
    assert user_turn["parts"] == [
        {"functionResponse": {"name": "shell_command", "response": {"result": "a.py"}}},
        {"functionResponse": {"name": "apply_patch", "response": {"result": "Done"}}},
    ]
    assert body["contents"][1]["parts"][1] == {
        "functionCall": {"name": "apply_patch", "args": {"input": "*** Begin Patch"}}
    }


def test_gemini_schema_cleanup() -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "additionalProperties": False,
        "$defs": {
            "Point": {"type": "object", "properties": {"x": {"type": "number", "format": "double"}}}
        },
        "properties": {
            "where": {"$ref": "#/$defs/Point"},
            "name": {"type": ["string", "null"], "format": "uri", "minLength": 1},
            "kind": {"const": "fixed"},
            "mode": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "size": {"type": "integer", "exclusiveMinimum": 0, "minimum": 1},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "both": {"allOf": [{"properties": {"a": {"type": "string"}}}, {"required": ["a"]}]},
            "self": {"$ref": "#/definitions/Missing"},
        },
        "required": ["where", "ghost"],
    }
    assert clean_schema(schema) == {
        "type": "object",
        "properties": {
            "where": {
                "type": "object",
                "properties": {"x": {"type": "number", "format": "double"}},
            },
            "name": {"nullable": True, "type": "string", "minLength": 1},
            "kind": {"enum": ["fixed"], "type": "string"},
            "mode": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "size": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "both": {"properties": {"a": {"type": "string"}}},
            "self": {"type": "object"},
        },
        "required": ["where"],
    }


def test_gemini_recursive_refs_terminate() -> None:
    schema = {
        "type": "object",
        "properties": {"node": {"$ref": "#/$defs/Node"}},
        "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
    }
    cleaned = clean_schema(schema)
    assert cleaned["properties"]["node"]["properties"]["next"] == {"type": "object"}


# --------------------------------------------------------------------------------------------
# Same protocol: the body as is, with the relay's rewrites


def test_same_protocol_chat_keeps_the_body_and_forces_usage() -> None:
    body = chat_body(session_id="s-1", stream_options={"include_obfuscation": False})
    body.pop("parallel_tool_calls")
    request = build(body, Endpoint.CHAT, "openai-chat", reasoning_effort="xhigh")
    upstream = request.body
    assert upstream["model"] == "up-model"
    assert upstream["reasoning_effort"] == "xhigh"
    assert upstream["prompt_cache_key"] == "s-1" and "session_id" not in upstream
    assert upstream["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert upstream["messages"] == body["messages"]
    assert upstream["tools"] == body["tools"]
    assert request.context.include_usage is False
    assert body["model"] == "my-alias"  # the client's body is not modified


def test_same_protocol_responses_keeps_client_metadata_and_strips_relay_reasoning() -> None:
    body = codex_body()
    request = build(body, Endpoint.RESPONSES, "openai-responses", reasoning_effort="high")
    upstream = request.body
    assert upstream["client_metadata"] == {"x-codex-installation-id": "uuid"}
    assert upstream["reasoning"] == {"effort": "high", "summary": "auto"}
    assert upstream["tools"] == body["tools"] and upstream["include"] == body["include"]
    assert [i.get("type") for i in upstream["input"]] == [
        i.get("type") for i in body["input"] if i.get("type") != "reasoning"
    ]
    openai_reasoning = {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"}
    upstream = build(
        codex_body(input=[openai_reasoning]), Endpoint.RESPONSES, "openai-responses"
    ).body
    assert upstream["input"] == [openai_reasoning]


def test_missing_api_key_gives_no_auth_header() -> None:
    assert build(chat_body(), Endpoint.CHAT, "openai-chat", api_key=None).headers == {}
    assert build(chat_body(), Endpoint.CHAT, "anthropic", api_key=None).headers == {
        "anthropic-version": "2023-06-01"
    }


# --------------------------------------------------------------------------------------------
# Refused inputs


@pytest.mark.parametrize("kind", ["openai-chat", "openai-responses", "anthropic", "gemini"])
@pytest.mark.parametrize(
    "part",
    [
        {
            "type": "file",
            "file": {"filename": "notes.txt", "file_data": "data:text/plain;base64,aGk="},
        },
        {"type": "file", "file": {"filename": "report.docx", "file_data": "UEsDBA=="}},
        {"type": "image_url", "image_url": {"url": "data:application/zip;base64,UEsDBA=="}},
    ],
)
def test_chat_files_other_than_images_and_pdfs_are_refused(kind: str, part: dict) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    with pytest.raises(
        InvalidRequest, match="only images and PDF files are supported as file inputs"
    ) as info:
        build(body, Endpoint.CHAT, kind)
    assert info.value.status == 400
    assert info.value.param == "messages[0].content[0]"


@pytest.mark.parametrize("kind", ["openai-chat", "openai-responses", "anthropic", "gemini"])
@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_file", "filename": "data.csv", "file_data": "data:text/csv;base64,YQ=="},
        {"type": "input_file", "file_url": "https://example.com/archive.zip"},
        {"type": "input_file", "filename": "x.pdf", "file_data": "data:audio/wav;base64,UklGRg=="},
    ],
)
def test_responses_files_other_than_images_and_pdfs_are_refused(kind: str, part: dict) -> None:
    body = {"model": "m", "input": [{"type": "message", "role": "user", "content": [part]}]}
    with pytest.raises(
        InvalidRequest, match="only images and PDF files are supported as file inputs"
    ):
        build(body, Endpoint.RESPONSES, kind)


def test_files_in_tool_outputs_are_checked_too() -> None:
    output = [{"type": "input_file", "filename": "x.exe", "file_data": "TVo="}]
    body = {
        "model": "m",
        "input": [{"type": "function_call_output", "call_id": "c", "output": output}],
    }
    with pytest.raises(InvalidRequest, match="only images and PDF"):
        build(body, Endpoint.RESPONSES, "openai-responses")


def test_pdf_by_name_and_image_by_url_are_accepted() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "file", "file": {"filename": "paper.PDF", "file_data": "JVBERi0="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ],
    }
    content = build(body, Endpoint.CHAT, "anthropic").body["messages"][0]["content"]
    assert content[0]["source"] == {
        "type": "base64",
        "media_type": "application/pdf",
        "data": "JVBERi0=",
    }
    assert content[1] == {
        "type": "image",
        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
    }


def test_n_above_one_is_refused_when_translating() -> None:
    with pytest.raises(InvalidRequest, match="'n'") as info:
        build(chat_body(n=2), Endpoint.CHAT, "anthropic")
    assert info.value.param == "n"
    assert build(chat_body(n=2), Endpoint.CHAT, "openai-chat").body["n"] == 2


def test_a_reference_left_for_translation_is_refused_naming_it() -> None:
    """The relay writes out what it kept before translating (relay/protocol/state.py): a
    reference that reaches the translation is one it does not hold, never silently dropped."""
    with pytest.raises(InvalidRequest, match="resp_1") as info:
        build(codex_body(previous_response_id="resp_1"), Endpoint.RESPONSES, "openai-chat")
    assert (info.value.code, info.value.param) == (
        "previous_response_not_found", "previous_response_id"
    )
    body = codex_body()
    body["input"].append({"type": "item_reference", "id": "msg_gone"})
    where = f"input[{len(body['input']) - 1}]"
    with pytest.raises(InvalidRequest, match="msg_gone") as info:
        build(body, Endpoint.RESPONSES, "openai-chat")
    assert (info.value.code, info.value.param) == ("item_not_found", f"{where}.id")


def test_openai_file_ids_cannot_go_to_other_providers() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}
        ],
    }
    for kind in ("anthropic", "gemini"):
        with pytest.raises(InvalidRequest, match="file_id"):
            build(body, Endpoint.CHAT, kind)
    assert build(body, Endpoint.CHAT, "openai-responses").body["input"][0]["content"] == [
        {"type": "input_file", "file_id": "file-1"}
    ]


def test_audio_and_unknown_items_are_refused_with_a_message() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(InvalidRequest, match="Audio"):
        build(
            {"model": "m", "messages": [{"role": "user", "content": [audio]}]},
            Endpoint.CHAT,
            "gemini",
        )
    with pytest.raises(InvalidRequest, match="mystery"):
        build({"model": "m", "input": [{"type": "mystery"}]}, Endpoint.RESPONSES, "anthropic")


def test_unknown_upstream_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        build(chat_body(), Endpoint.CHAT, "cohere")


def test_signed_call_ids_are_decoded_for_every_upstream() -> None:
    signed = call_id_with_signature("call_9", "gemini", "c2ln")
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": signed, "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": signed, "content": "ok"},
        ],
    }
    responses_input = build(body, Endpoint.CHAT, "openai-responses").body["input"]
    assert responses_input[1]["call_id"] == "call_9" and responses_input[2]["call_id"] == "call_9"


def test_images_a_tool_returned_follow_the_tool_messages_on_chat_upstreams() -> None:
    output = [
        {"type": "input_text", "text": "screenshot: "},
        {"type": "input_image", "image_url": PNG},
    ]
    body = {
        "model": "m",
        "input": [
            {"type": "message", "role": "user", "content": "look"},
            {"type": "function_call", "call_id": "c1", "name": "view_image", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "view_image", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": output},
            {"type": "function_call_output", "call_id": "c2", "output": "none"},
            {"type": "message", "role": "user", "content": "and?"},
        ],
    }
    messages = build(body, Endpoint.RESPONSES, "openai-chat").body["messages"]
    assert messages[2] == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": "screenshot: [attached below]",
    }
    assert messages[3] == {"role": "tool", "tool_call_id": "c2", "content": "none"}
    assert messages[4] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Attachments returned by tool call c1:"},
            {"type": "image_url", "image_url": {"url": PNG}},
        ],
    }
    assert messages[5] == {"role": "user", "content": "and?"}
    anthropic = build(body, Endpoint.RESPONSES, "anthropic").body["messages"]
    assert anthropic[2]["content"][0]["content"][1]["type"] == "image"


def test_long_tool_call_ids_are_shortened_for_openai_upstreams_alike_in_calls_and_results() -> None:
    """A Messages history whose call id is longer than OpenAI accepts (40 characters for Chat,
    64 for Responses): the call and its result get the same short id; an Anthropic upstream
    gets the body as it was."""
    long_id = "toolu_" + "x" * 70
    body = {
        "model": "m", "max_tokens": 100,
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "read it"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": long_id, "name": "Read", "input": {"f": "a"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": long_id, "content": "ok"}]},
        ],
    }
    chat = build_upstream_request(body, Endpoint.MESSAGES, "openai-chat", model="m", api_key="k")
    call_id = chat.body["messages"][1]["tool_calls"][0]["id"]
    assert len(call_id) <= 40 and call_id.startswith("toolu_xxx")
    assert chat.body["messages"][2] == {"role": "tool", "tool_call_id": call_id, "content": "ok"}
    responses = build_upstream_request(
        body, Endpoint.MESSAGES, "openai-responses", model="m", api_key="k"
    )
    call, output = responses.body["input"][1:3]
    assert len(call["call_id"]) <= 64 and call["call_id"] == output["call_id"]
    native = build_upstream_request(body, Endpoint.MESSAGES, "anthropic", model="m", api_key="k")
    assert native.body["messages"][1]["content"][0]["id"] == long_id
