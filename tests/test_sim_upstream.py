"""The simulated upstream speaks OpenAI's wire protocols well enough for the official SDK, obeys
its ``#sim`` directives, and notices a departing client within milliseconds.

Each test runs its own :class:`SimUpstream` in the test's trio nursery (the CLI test runs the real
``python -m relay.testing.upstream`` process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest
import trio

from relay.testing import sim_protocol as sp
from relay.testing.upstream import SimProfile, SimUpstream

ROOT = Path(__file__).resolve().parent.parent
TOOLS_CHAT = [{"type": "function", "function": {"name": "exec_command", "parameters": {}}}]
TOOLS_RESPONSES = [{"type": "function", "name": "exec_command", "parameters": {}}]


@dataclass
class Env:
    sim: SimUpstream
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def http(self, **kwargs: object) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            base_url=self.base, headers={"authorization": "Bearer x"}, timeout=10, **kwargs
        )

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base, api_key="x", max_retries=0)


@pytest.fixture
async def env(nursery: trio.Nursery) -> Env:
    sim = SimUpstream(SimProfile(ttft_s=0, token_delay_s=0, output_tokens=5))
    port = await nursery.start(sim.serve)
    return Env(sim, port)


def chat(content: str, **extra: object) -> dict:
    return {"model": "gpt-5.5", "messages": [{"role": "user", "content": content}], **extra}


async def wait_for(predicate, timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


# ------------------------------------------------------------------------------------------
# Chat Completions


async def test_chat_stream_through_sdk_without_usage(env: Env) -> None:
    async with env.sdk() as client:
        stream = await client.chat.completions.create(**chat("hi #sim tokens=6"), stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [
        c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content
    ]
    assert "".join(deltas) == "tok tok tok tok tok tok"
    assert len(deltas) == 6
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    record = env.sim.requests[-1]
    assert record.finished and record.events_sent == len(chunks) + 1  # + [DONE]
    assert record.usage["output_tokens"] == 6


async def test_chat_stream_include_usage_counts_content_chunks(env: Env) -> None:
    async with env.sdk() as client:
        stream = await client.chat.completions.create(
            **chat("hi #sim tokens=9 cached=3"), stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.completion_tokens == len(content_chunks) == 9
    body = chat("hi #sim tokens=9 cached=3")
    assert usage.prompt_tokens == max(1, len(json.dumps(body["messages"])) // 4)
    assert usage.prompt_tokens_details.cached_tokens == 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_chat_non_stream(env: Env) -> None:
    async with env.sdk() as client:
        completion = await client.chat.completions.create(**chat("hi #sim tokens=4 reasoning=2"))
    message = completion.choices[0].message
    assert message.content == "tok tok tok tok"
    assert message.model_extra["reasoning_content"] == "think think"
    assert message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 6
    assert completion.usage.completion_tokens_details.reasoning_tokens == 2
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert completion.model == "gpt-5.5"


async def test_chat_stream_reasoning_and_tool_call(env: Env) -> None:
    args = {"cmd": "ls", "workdir": "/tmp"}  # directive values have no spaces
    compact = json.dumps(args, separators=(",", ":"))
    prompt = f"run it #sim reasoning=3 tokens=2 tool=exec_command args={compact}"
    async with env.sdk() as client:
        stream = await client.chat.completions.create(
            **chat(prompt), tools=TOOLS_CHAT, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in deltas]
    reasoning = [r for r in reasoning if r]
    assert reasoning == ["think", " think", " think"]
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    assert calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].type == "function" and calls[0].function.name == "exec_command"
    assert calls[0].function.arguments == ""
    pieces = [c.function.arguments for c in calls[1:]]
    assert len(pieces) >= 3 and all(c.index == 0 and c.id is None for c in calls[1:])
    assert json.loads("".join(pieces)) == args
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["tool_calls"]
    usage = chunks[-1].usage
    assert usage.completion_tokens == 3 + 2 + len(pieces)
    assert usage.completion_tokens_details.reasoning_tokens == 3


async def test_chat_non_stream_tool_call_default_args(env: Env) -> None:
    async with env.sdk() as client:
        completion = await client.chat.completions.create(
            **chat("go #sim tool=exec_command tokens=0"), tools=TOOLS_CHAT
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "exec_command"
    assert json.loads(call.function.arguments) == {"cmd": "echo hi"}


async def test_tool_directive_needs_tools_and_is_spent_after_tool_output(env: Env) -> None:
    async with env.sdk() as client:
        no_tools = await client.chat.completions.create(**chat("go #sim tool=exec_command"))
        assert no_tools.choices[0].message.tool_calls is None
        follow_up = chat("go #sim tool=exec_command")
        follow_up["messages"] += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "exec_command", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "hi"},
        ]
        done = await client.chat.completions.create(**follow_up, tools=TOOLS_CHAT)
    assert done.choices[0].message.tool_calls is None
    assert done.choices[0].finish_reason == "stop"


async def test_chat_max_tokens_cuts_with_length(env: Env) -> None:
    async with env.sdk() as client:
        completion = await client.chat.completions.create(
            **chat("hi #sim tokens=10 reasoning=2"), max_completion_tokens=5
        )
        stream = await client.chat.completions.create(
            **chat("hi #sim tokens=10"),
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "tok tok tok"
    assert completion.usage.completion_tokens == 5
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"] and chunks[-1].usage.completion_tokens == 3


async def test_chat_text_parts_and_custom_word(env: Env) -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "#sim tokens=99"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "again\n#sim tokens=2 text=pöng"}],
            },
        ],
    }
    async with env.http() as http:
        response = await http.post("/chat/completions", json=body)
    assert response.json()["choices"][0]["message"]["content"] == "pöng pöng"


# ------------------------------------------------------------------------------------------
# Responses


async def test_responses_stream_helper(env: Env) -> None:
    deltas = []
    async with env.sdk() as client:
        async with client.responses.stream(
            model="gpt-5.5",
            input="hi #sim tokens=6 reasoning=2 cached=1",
            instructions="be brief",
            prompt_cache_key="thread-1",
        ) as stream:
            async for event in stream:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
            final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "tok tok tok tok tok tok"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].encrypted_content
    assert final.output[0].summary[0].text == "think think"
    assert final.usage.output_tokens == 8
    assert final.usage.output_tokens_details.reasoning_tokens == 2
    assert final.usage.input_tokens_details.cached_tokens == 1
    assert final.usage.input_tokens == max(
        1, len(json.dumps(["hi #sim tokens=6 reasoning=2 cached=1", "be brief"])) // 4
    )
    assert final.usage.total_tokens == final.usage.input_tokens + 8
    assert final.instructions == "be brief" and final.prompt_cache_key == "thread-1"
    assert final.id.startswith("resp_") and final.output[1].id.startswith("msg_")


async def test_responses_stream_wire_format(env: Env) -> None:
    body = {
        "model": "gpt-5.5",
        "stream": True,
        "tools": TOOLS_RESPONSES,
        "input": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_text",
                        "text": "do it #sim tokens=2 reasoning=1 tool=exec_command",
                    },
                ],
            }
        ],
    }
    async with env.http() as http, http.stream("POST", "/responses", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    events = []
    for block in raw.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {data['type']}"
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "reasoning"),
        (1, "message"),
        (2, "function_call"),
    ]
    fc = added[2]["item"]
    assert fc["id"].startswith("fc_") and fc["call_id"].startswith("call_")
    arg_deltas = [
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
    ]
    assert len(arg_deltas) >= 3 and json.loads("".join(arg_deltas)) == {"cmd": "echo hi"}
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["usage"]["output_tokens"] == 1 + 2 + len(arg_deltas)
    assert final["tools"] == TOOLS_RESPONSES


async def test_responses_non_stream_and_incomplete(env: Env) -> None:
    async with env.sdk() as client:
        response = await client.responses.create(model="gpt-5.5", input="hi #sim tokens=4")
        cut = await client.responses.create(
            model="gpt-5.5", input="hi #sim tokens=10", max_output_tokens=3
        )
    assert response.status == "completed" and response.output_text == "tok tok tok tok"
    assert response.usage.output_tokens == 4
    assert cut.status == "incomplete"
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3 and cut.output_text == "tok tok tok"


async def test_responses_stream_incomplete_event(env: Env) -> None:
    body = {"model": "m", "stream": True, "input": "#sim tokens=10", "max_output_tokens": 2}
    async with env.http() as http, http.stream("POST", "/responses", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    last = json.loads(lines[-1][6:])
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["usage"]["output_tokens"] == 2


# ------------------------------------------------------------------------------------------
# Faults, auth and errors


async def test_429_fault_raises_rate_limit_error(env: Env) -> None:
    async with env.sdk() as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**chat("#sim fault=429"))
    response = caught.value.response
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "2000"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "Please try again in 2s." in error["message"]
    assert env.sim.requests[-1].status == 429


@pytest.mark.parametrize(
    ("fault", "status", "exception"),
    [
        ("500", 500, openai.InternalServerError),
        ("401", 401, openai.AuthenticationError),
        ("400", 400, openai.BadRequestError),
    ],
)
async def test_error_faults(env: Env, fault: str, status: int, exception: type) -> None:
    async with env.sdk() as client:
        with pytest.raises(exception) as caught:
            await client.responses.create(model="m", input=f"#sim fault={fault}", stream=True)
    assert caught.value.status_code == status
    assert set(caught.value.response.json()["error"]) == {"message", "type", "param", "code"}


async def test_hostile_error_faults(env: Env) -> None:
    """``leak_secret`` quotes the credential and the host it was sent to; ``retry_forever`` asks
    for a 3-year rest; ``html`` is a proxy's HTML page."""
    async with env.http() as http:
        leak = await http.post("/chat/completions", json=chat("#sim fault=leak_secret"))
        forever = await http.post(
            "/responses", json={"model": "m", "input": "#sim fault=retry_forever"}
        )
        html = await http.post("/chat/completions", json=chat("#sim fault=html", stream=True))
    message = leak.json()["error"]["message"]
    assert leak.status_code == 500
    assert "Authorization: Bearer x" in message and f"127.0.0.1:{env.port}" in message
    assert sp.LEAKED_KEY in message
    assert forever.status_code == 429 and forever.headers["retry-after"] == "99999999"
    assert html.status_code == 502 and html.headers["content-type"].startswith("text/html")
    assert html.text.startswith("<html>")


@pytest.mark.parametrize("stream", [False, True])
async def test_huge_usage_fault_claims_1e15_tokens(env: Env, stream: bool) -> None:
    async with env.sdk() as client:
        if stream:
            chunks = await client.chat.completions.create(
                **chat("#sim fault=huge_usage tokens=3", stream=True,
                       stream_options={"include_usage": True})
            )
            usage = [chunk.usage async for chunk in chunks if chunk.usage][-1]
        else:
            usage = (await client.chat.completions.create(**chat("#sim fault=huge_usage"))).usage
    assert usage.prompt_tokens == usage.completion_tokens == sp.HUGE_USAGE
    assert env.sim.requests[-1].usage["output_tokens"] == sp.HUGE_USAGE


async def test_drop_fault_breaks_the_stream(env: Env) -> None:
    received = []
    async with env.http() as http:
        with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
            async with http.stream(
                "POST", "/chat/completions", json=chat("#sim fault=drop tokens=10", stream=True)
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        received.append(line)
        with pytest.raises(httpx2.RemoteProtocolError):
            await http.post("/responses", json={"model": "m", "input": "#sim fault=drop"})
    assert 0 < len(received) < 13
    stream_record, plain_record = env.sim.requests[-2:]
    assert not stream_record.finished and not stream_record.client_closed
    assert stream_record.events_sent == len(received)
    assert plain_record.status is None and not plain_record.finished


async def test_reset_fault(env: Env) -> None:
    async with env.http() as http:
        with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
            async with http.stream(
                "POST",
                "/responses",
                json={"model": "m", "stream": True, "input": "#sim fault=reset"},
            ) as response:
                async for _ in response.aiter_lines():
                    pass


async def test_stall_fault_holds_until_client_leaves(env: Env) -> None:
    async with env.http() as http:
        with pytest.raises(httpx2.ReadTimeout):
            async with http.stream(
                "POST",
                "/chat/completions",
                json=chat("#sim fault=stall", stream=True),
                timeout=httpx2.Timeout(10, read=0.3),
            ) as response:
                async for _ in response.aiter_lines():
                    pass
        await wait_for(lambda: env.sim.requests[-1].client_closed)
        record = env.sim.requests[-1]
        assert record.events_sent == 3 and not record.finished
        with pytest.raises(httpx2.ReadTimeout):
            await http.post(
                "/responses",
                json={"model": "m", "input": "#sim fault=stall"},
                timeout=httpx2.Timeout(10, read=0.2),
            )
        await wait_for(lambda: env.sim.requests[-1].client_closed)
    assert env.sim.active_streams == 0


async def test_slow_headers(env: Env) -> None:
    async with env.http() as http:
        started = time.monotonic()
        response = await http.post("/chat/completions", json=chat("#sim fault=slow_headers=0.3"))
        assert response.status_code == 200
        assert time.monotonic() - started >= 0.3


async def test_auth(env: Env) -> None:
    async with httpx2.AsyncClient(base_url=env.base) as http:
        missing = await http.post("/chat/completions", json=chat("hi"))
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        env.sim.profile.api_key = "secret"
        wrong = await http.get("/models", headers={"authorization": "Bearer nope"})
        right = await http.get("/models", headers={"authorization": "Bearer secret"})
    assert wrong.status_code == 401 and right.status_code == 200


async def test_errors_and_routes(env: Env) -> None:
    async with env.http() as http:
        unknown = await http.post("/embeddings", json={})
        bad_json = await http.post(
            "/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
        )
        no_messages = await http.post("/chat/completions", json={"model": "m"})
        wrong_method = await http.get("/chat/completions")
        root = await http.post(f"http://127.0.0.1:{env.port}/chat/completions", json=chat("hi"))
        model = await http.get("/models/deepseek-chat")
        missing_model = await http.get("/models/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    assert wrong_method.status_code == 405
    assert root.status_code == 200  # the /v1 prefix is optional
    assert model.json()["id"] == "deepseek-chat"
    assert missing_model.json()["error"]["code"] == "model_not_found"


async def test_models_list_includes_models_seen(env: Env) -> None:
    async with env.http() as http:
        await http.post("/chat/completions", json={**chat("hi"), "model": "my-model"})
        listing = (await http.get("/models")).json()
    assert listing["object"] == "list"
    ids = [m["id"] for m in listing["data"]]
    assert {"gpt-5.5", "deepseek-chat", "my-model"} <= set(ids)
    assert all(m["object"] == "model" for m in listing["data"])


async def test_control_endpoints(env: Env) -> None:
    async with env.http() as http:
        await http.post(
            "/chat/completions", json=chat("hi #sim tokens=2"), headers={"X-Trace": "a"}
        )
        records = (await http.get("/_sim/requests")).json()
        stats = (await http.get("/_sim/stats")).json()
        profile = (await http.post("/_sim/profile", json={"output_tokens": 3})).json()
        bad = await http.post("/_sim/profile", json={"nope": 1})
        bad_type = await http.post("/_sim/profile", json={"ttft_s": "soon"})
        plain = (await http.post("/chat/completions", json=chat("hi"))).json()
        await http.post("/_sim/reset")
        after = (await http.get("/_sim/stats")).json()
    assert len(records) == 1
    record = records[0]
    assert record["path"] == "/v1/chat/completions" and record["method"] == "POST"
    assert record["headers"]["x-trace"] == "a"
    assert record["body"]["messages"][0]["content"] == "hi #sim tokens=2"
    assert record["status"] == 200 and record["finished"] and not record["client_closed"]
    assert record["usage"]["output_tokens"] == 2
    assert record["received_at"] <= time.monotonic()
    assert stats == {"active_streams": 0, "peak_active_streams": 0, "total_requests": 1}
    assert profile["output_tokens"] == 3 and env.sim.profile.output_tokens == 3
    assert bad.status_code == 400 and bad_type.status_code == 400
    assert env.sim.profile.ttft_s == 0
    assert plain["usage"]["completion_tokens"] == 3
    assert after["total_requests"] == 0 and env.sim.requests == []


# ------------------------------------------------------------------------------------------
# Connections, disconnects and capacity


async def test_client_close_mid_stream_is_noticed_at_once(env: Env) -> None:
    body = chat("#sim tokens=1000 delay=0.01", stream=True)
    async with env.http() as http:
        async with http.stream("POST", "/chat/completions", json=body) as response:
            lines = 0
            async for line in response.aiter_lines():
                lines += line.startswith("data: ")
                if lines == 5:
                    break
            assert env.sim.active_streams == 1
            close_time = time.monotonic()
    record = env.sim.requests[-1]
    await wait_for(lambda: record.client_closed)
    assert record.closed_at - close_time < 0.05
    assert not record.finished and record.usage is None
    await wait_for(lambda: env.sim.active_streams == 0)


async def test_client_close_before_first_token(env: Env) -> None:
    body = {"model": "m", "stream": True, "input": "#sim ttft=30"}
    async with env.http() as http:
        with trio.move_on_after(0.2):
            async with http.stream("POST", "/responses", json=body) as response:
                async for _ in response.aiter_lines():
                    pass
        close_time = time.monotonic()
    record = env.sim.requests[-1]
    await wait_for(lambda: record.client_closed)
    assert record.closed_at - close_time < 0.05
    # created, in_progress, output_item.added, content_part.added: nothing waits on a token
    assert record.events_sent == 4


async def test_keep_alive_and_connection_close(env: Env) -> None:
    async with env.http() as http:
        for _ in range(3):
            await http.post("/chat/completions", json=chat("hi"))
            async with http.stream(
                "POST", "/responses", json={"model": "m", "input": "x", "stream": True}
            ) as r:
                await r.aread()
        closing = await http.post(
            "/chat/completions", json=chat("hi"), headers={"connection": "close"}
        )
    assert closing.headers["connection"] == "close"
    assert [r.status for r in env.sim.requests] == [200] * 7

    # Raw socket: two pipelined requests on one connection, then HTTP/1.0 (closes after).
    body = json.dumps(chat("hi #sim tokens=1")).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer x\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    stream = await trio.open_tcp_stream("127.0.0.1", env.port)
    await stream.send_all(request + request)
    data = b""
    with trio.fail_after(2):
        while data.count(b"HTTP/1.1 200 OK") < 2 or not data.endswith(b"}"):
            data += await stream.receive_some(65536)
    await stream.send_all(request.replace(b"HTTP/1.1", b"HTTP/1.0"))
    with trio.fail_after(2):
        while chunk := await stream.receive_some(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3  # and then the server closed the connection
    await stream.aclose()


async def test_chunked_request_body_and_expect_continue(env: Env) -> None:
    async def body():
        yield json.dumps(chat("hi #sim tokens=2"))[:10].encode()
        yield json.dumps(chat("hi #sim tokens=2"))[10:].encode()

    async with env.http() as http:
        response = await http.post("/chat/completions", content=body())
        expect = await http.post(
            "/chat/completions", json=chat("hi #sim tokens=1"), headers={"expect": "100-continue"}
        )
    assert response.json()["choices"][0]["message"]["content"] == "tok tok"
    assert expect.json()["choices"][0]["message"]["content"] == "tok"


async def test_malformed_http_gets_400(env: Env) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", env.port)
    await stream.send_all(b"GARBAGE\r\n\r\n")
    data = b""
    with trio.fail_after(2):
        while chunk := await stream.receive_some(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")


async def test_capacity_is_shared_by_all_streams(env: Env) -> None:
    env.sim.profile.capacity_tps = 200
    counts = []

    async def one(http: httpx2.AsyncClient) -> None:
        body = chat("#sim tokens=50 delay=0", stream=True)
        async with http.stream("POST", "/chat/completions", json=body) as response:
            n = 0
            async for line in response.aiter_lines():
                n += (
                    line.startswith("data: {")
                    and '"content":"' in line
                    and '"content":""' not in line
                )
            counts.append(n)

    started = time.monotonic()
    async with env.http() as http, trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one, http)
    elapsed = time.monotonic() - started
    assert counts == [50, 50, 50, 50]
    assert 0.8 <= elapsed < 5, elapsed


async def test_capacity_paces_non_stream_too(env: Env) -> None:
    env.sim.profile.capacity_tps = 100
    async with env.http() as http:
        started = time.monotonic()
        response = await http.post("/chat/completions", json=chat("#sim tokens=20"))
    assert response.json()["usage"]["completion_tokens"] == 20
    assert time.monotonic() - started >= 0.19


async def test_token_timing(env: Env) -> None:
    body = {"model": "m", "stream": True, "input": "#sim ttft=0.2 delay=0.05 tokens=4"}
    async with env.http() as http:
        started = time.monotonic()
        async with http.stream("POST", "/responses", json=body) as response:
            times = [
                time.monotonic() - started
                async for line in response.aiter_lines()
                if "output_text.delta" in line and line.startswith("data:")
            ]
    assert 0.2 <= times[0] < 0.4
    assert times[-1] - times[0] >= 3 * 0.05 * 0.9


# ------------------------------------------------------------------------------------------
# Anthropic Messages

ANTHROPIC_HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
TOOLS_ANTHROPIC = [{"name": "exec_command", "input_schema": {"type": "object"}}]
THINKING = {"type": "enabled", "budget_tokens": 1024}


def anthropic_http(env: Env, **headers: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=f"http://127.0.0.1:{env.port}",
        headers={**ANTHROPIC_HEADERS, **headers},
        timeout=10,
    )


def messages(content: object, **extra: object) -> dict:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def parse_anthropic_sse(raw: str) -> list[dict]:
    """A small Messages-stream parser: ``event:`` must name the data's ``type``."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) == {"event", "data"}, block
        data = json.loads(fields["data"])
        assert data["type"] == fields["event"]
        events.append(data)
    return events


def rebuild_anthropic(events: list[dict]) -> list[dict]:
    """Content blocks rebuilt from start/delta/stop events, checking the index discipline."""
    blocks: list[dict] = []
    json_parts: dict[int, str] = {}
    open_index = None
    for event in events:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_index is None and event["index"] == len(blocks)
            open_index = event["index"]
            blocks.append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            assert event["index"] == open_index
            block, delta = blocks[open_index], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] += delta["signature"]
            else:
                assert delta["type"] == "input_json_delta"
                json_parts[open_index] = json_parts.get(open_index, "") + delta["partial_json"]
        elif kind == "content_block_stop":
            assert event["index"] == open_index
            if open_index in json_parts:
                blocks[open_index]["input"] = json.loads(json_parts[open_index])
            open_index = None
    assert open_index is None
    return blocks


async def test_anthropic_non_stream_thinking_text_tool_use(env: Env) -> None:
    prompt = "go #sim reasoning=2 tokens=3 tool=exec_command cached=2"
    body = messages(prompt, thinking=THINKING, tools=TOOLS_ANTHROPIC, system="be brief")
    async with anthropic_http(env) as http:
        response = await http.post("/v1/messages", json=body)
    assert response.status_code == 200
    assert response.headers["request-id"].startswith("req_sim")
    message = response.json()
    assert message["id"].startswith("msg_") and message["type"] == "message"
    assert message["role"] == "assistant" and message["model"] == "claude-sonnet-4-5"
    thinking, text, tool_use = message["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "think think"
    assert thinking["signature"]
    assert text == {"type": "text", "text": "tok tok tok"}
    assert tool_use["type"] == "tool_use" and tool_use["id"].startswith("toolu_")
    assert tool_use["name"] == "exec_command" and tool_use["input"] == {"cmd": "echo hi"}
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    prompt_tokens = max(1, len(json.dumps([body["messages"], "be brief"])) // 4)
    output = 2 + 3 + len(sp.split_arguments(sp.DEFAULT_TOOL_ARGS))
    assert message["usage"] == {
        "input_tokens": prompt_tokens - 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 2,
        "output_tokens": output,
    }
    record = env.sim.requests[-1]
    assert record.body == body and record.path == "/v1/messages" and record.finished
    assert record.usage == {
        "input_tokens": prompt_tokens,
        "cached_tokens": 2,
        "cache_write_tokens": 0,
        "output_tokens": output,
        "reasoning_tokens": 2,
        "total_tokens": prompt_tokens + output,
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_cache_writes_are_reported_apart(env: Env, stream: bool) -> None:
    """``cache_write=N``: N of the prompt's tokens are cache writes, as Anthropic reports them
    (``cache_creation_input_tokens``, not part of its ``input_tokens``); at most the prompt
    left after the cache reads."""
    body = messages("go " * 40 + "#sim tokens=2 cached=5 cache_write=11", stream=stream)
    prompt_tokens = max(1, len(json.dumps([body["messages"], None])) // 4)
    async with anthropic_http(env) as http:
        response = await http.post("/v1/messages", json=body)
    assert response.status_code == 200
    if stream:
        usage = parse_anthropic_sse(response.text)[0]["message"]["usage"]
    else:
        usage = response.json()["usage"]
    assert usage["input_tokens"] == prompt_tokens - 5 - 11
    assert (usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (5, 11)
    assert env.sim.requests[-1].usage["input_tokens"] == prompt_tokens
    too_many = messages("hi #sim cache_write=100000")
    async with anthropic_http(env) as http:
        usage = (await http.post("/v1/messages", json=too_many)).json()["usage"]
    assert usage["input_tokens"] == 0 and usage["cache_creation_input_tokens"] > 0


async def test_anthropic_stream_events(env: Env) -> None:
    args = {"cmd": "ls", "workdir": "/tmp"}
    compact = json.dumps(args, separators=(",", ":"))
    prompt = f"go #sim reasoning=3 tokens=40 tool=exec_command args={compact}"
    body = messages(
        [{"type": "text", "text": prompt}], thinking=THINKING, tools=TOOLS_ANTHROPIC, stream=True
    )
    async with anthropic_http(env) as http, http.stream("POST", "/messages", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    events = parse_anthropic_sse(raw)
    types = [e["type"] for e in events if e["type"] != "ping"]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert events[1]["type"] == "ping"
    assert sum(e["type"] == "ping" for e in events) == 2  # after message_start, after 32 tokens
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == max(1, len(json.dumps([body["messages"], None])) // 4)
    assert start["usage"]["output_tokens"] == 0
    deltas = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    json_pieces = deltas.count("input_json_delta")
    assert deltas == (
        ["thinking_delta"] * 3
        + ["signature_delta"]
        + ["text_delta"] * 40
        + ["input_json_delta"] * json_pieces
    )
    assert json_pieces >= 3
    thinking, text, tool_use = rebuild_anthropic(events)
    assert thinking["type"] == "thinking" and thinking["thinking"] == "think think think"
    assert thinking["signature"]
    assert text["text"] == " ".join(["tok"] * 40)
    assert tool_use["name"] == "exec_command" and tool_use["id"].startswith("toolu_")
    assert tool_use["input"] == args
    final = events[-2]
    assert final["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == 3 + 40 + json_pieces
    record = env.sim.requests[-1]
    assert record.finished and record.events_sent == len(events)
    assert record.usage["output_tokens"] == final["usage"]["output_tokens"]
    assert record.usage["reasoning_tokens"] == 3


async def test_anthropic_thinking_policy_and_max_tokens(env: Env) -> None:
    env.sim.profile.reasoning_tokens = 2
    async with anthropic_http(env) as http:
        plain = (await http.post("/v1/messages", json=messages("hi"))).json()
        thinking = (await http.post("/v1/messages", json=messages("hi", thinking=THINKING))).json()
        forced = (await http.post("/v1/messages", json=messages("hi #sim reasoning=1"))).json()
        cut = await http.post(
            "/v1/messages", json={**messages("hi #sim tokens=10", stream=True), "max_tokens": 4}
        )
    assert [b["type"] for b in plain["content"]] == ["text"]
    assert [b["type"] for b in thinking["content"]] == ["thinking", "text"]
    assert thinking["usage"]["output_tokens"] == 2 + 5
    assert forced["content"][0]["thinking"] == "think"
    assert plain["stop_reason"] == "end_turn"
    events = parse_anthropic_sse(cut.text)
    (text,) = rebuild_anthropic(events)
    assert text["text"] == "tok tok tok tok"
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2]["usage"]["output_tokens"] == 4


async def test_anthropic_tool_result_turn(env: Env) -> None:
    body = messages("run #sim tool=exec_command tokens=2", tools=TOOLS_ANTHROPIC, thinking=THINKING)
    body["messages"] += [
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "c2ln"},
                {"type": "tool_use", "id": "toolu_1", "name": "exec_command", "input": {}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
    ]
    # Claude Code (for Opus 4.8) puts a mid-conversation system message after the results.
    reminder = {"role": "system", "content": [{"type": "text", "text": "<total_tokens>"}]}
    async with anthropic_http(env) as http:
        done = (await http.post("/v1/messages", json=body)).json()
        reminded = {**body, "messages": [*body["messages"], reminder]}
        after_system = (await http.post("/v1/messages", json=reminded)).json()
        del body["messages"][1]["content"][0]["signature"]
        unsigned = await http.post("/v1/messages", json=body)
    # The directives still come from the prompt; the tool call is spent after its result.
    assert done["content"] == [{"type": "text", "text": "tok tok"}]
    assert done["stop_reason"] == "end_turn"
    assert after_system["content"] == done["content"]
    assert unsigned.status_code == 400
    assert unsigned.json()["error"]["message"] == (
        "messages.1.content.0.thinking.signature: Field required"
    )


async def test_anthropic_auth_and_validation(env: Env) -> None:
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{env.port}/v1") as http:
        missing = await http.post("/messages", json=messages("hi"))
        bearer_only = await http.post(  # as the anthropic SDKs send an API key
            "/messages",
            json=messages("hi"),
            headers={"authorization": "Bearer k", "anthropic-version": "2023-06-01"},
        )
        not_bearer = await http.post(
            "/messages",
            json=messages("hi"),
            headers={"authorization": "Basic k", "anthropic-version": "2023-06-01"},
        )
        no_version = await http.post("/messages", json=messages("hi"), headers={"x-api-key": "k"})
        env.sim.profile.api_key = "secret"
        wrong = await http.post("/messages", json=messages("hi"), headers=ANTHROPIC_HEADERS)
        headers = {**ANTHROPIC_HEADERS, "x-api-key": "secret"}
        right = await http.post("/messages", json=messages("hi"), headers=headers)
        no_max = await http.post(
            "/messages",
            json={"model": "c", "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
        )
        small_budget = await http.post(
            "/messages",
            json=messages("hi", thinking={"type": "enabled", "budget_tokens": 100}),
            headers=headers,
        )
        bad_json = await http.post("/messages", content=b"{nope", headers=headers)
        wrong_method = await http.get("/messages", headers=headers)
    assert bearer_only.status_code == 200
    for response in (missing, not_bearer, wrong):
        assert response.status_code == 401
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "authentication_error"
    assert missing.json()["error"]["message"] == "x-api-key header is required"
    assert no_version.status_code == 400
    assert no_version.json()["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }
    assert right.status_code == 200
    assert no_max.status_code == 400
    assert no_max.json()["error"]["message"] == "max_tokens: Field required"
    assert small_budget.status_code == 400 and "budget_tokens" in small_budget.text
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"


@pytest.mark.parametrize(
    ("fault", "status", "error_type"),
    [
        ("429", 429, "rate_limit_error"),
        ("500", 500, "api_error"),
        ("529", 529, "overloaded_error"),
        ("503", 529, "overloaded_error"),
        ("401", 401, "authentication_error"),
        ("400", 400, "invalid_request_error"),
    ],
)
async def test_anthropic_error_faults(env: Env, fault: str, status: int, error_type: str) -> None:
    async with anthropic_http(env) as http:
        response = await http.post(
            "/v1/messages", json=messages(f"#sim fault={fault}", stream=True)
        )
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert body["error"]["message"]
    if fault == "429":
        assert response.headers["retry-after"] == "2"
    assert env.sim.requests[-1].status == status


async def test_anthropic_drop_and_stall(env: Env) -> None:
    received = []
    async with anthropic_http(env) as http:
        with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
            async with http.stream(
                "POST", "/v1/messages", json=messages("#sim fault=drop tokens=10", stream=True)
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        received.append(line)
        assert 0 < len(received) < 16
        with pytest.raises(httpx2.ReadTimeout):
            await http.post(
                "/v1/messages",
                json=messages("#sim fault=stall", stream=True),
                timeout=httpx2.Timeout(10, read=0.2),
            )
        await wait_for(lambda: env.sim.requests[-1].client_closed)
    drop_record, stall_record = env.sim.requests[-2:]
    assert not drop_record.finished and drop_record.events_sent == len(received)
    assert stall_record.events_sent == 3 and not stall_record.finished


async def test_anthropic_client_close_mid_stream(env: Env) -> None:
    body = messages("#sim tokens=1000 delay=0.01", stream=True)
    async with anthropic_http(env) as http:
        async with http.stream("POST", "/v1/messages", json=body) as response:
            deltas = 0
            async for line in response.aiter_lines():
                deltas += '"text_delta"' in line
                if deltas == 5:
                    break
            close_time = time.monotonic()
    record = env.sim.requests[-1]
    await wait_for(lambda: record.client_closed)
    assert record.closed_at - close_time < 0.05
    assert not record.finished and record.usage is None
    await wait_for(lambda: env.sim.active_streams == 0)


PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
PDF_B64 = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"


def claude_code_body(prompt: str) -> dict:
    """A request shaped like Claude Code's (docs/claude-code.md), with every kind of block the
    real API takes in a conversation: images, a PDF, replayed thinking, string and block tool
    results (one an error), a mid-conversation ``system`` message, ``cache_control`` all over."""
    cache = {"cache_control": {"type": "ephemeral"}}
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 32000,
        "stream": False,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.337;"},
            {"type": "text", "text": "You are Claude Code.", **cache},
        ],
        "tools": [*TOOLS_ANTHROPIC, {"name": "Read", "input_schema": {"type": "object"}, **cache}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
        "top_k": 40,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>env</system-reminder>"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://e.test/a.png"}},
                    {
                        "type": "document",
                        "source": {
                            "type": "base64", "media_type": "application/pdf", "data": PDF_B64
                        },
                        **cache,
                    },
                    {"type": "text", "text": "read both"},
                ],
            },
            {"role": "system", "content": [{"type": "text", "text": "Be terse.", **cache}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "", "signature": "c2ln"},
                    {"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"},
                    {"type": "text", "text": "Reading."},
                    {"type": "tool_use", "id": "toolu_a", "name": "Read", "input": {"p": "a"}},
                    {"type": "tool_use", "id": "toolu_b", "name": "Read", "input": {"p": "b"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_a", "content": "1\tfile a"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_b",
                        "is_error": True,
                        "content": [{"type": "text", "text": "File does not exist."}],
                        **cache,
                    },
                    {"type": "text", "text": prompt},
                ],
            },
        ],
    }


async def test_anthropic_takes_what_claude_code_sends(env: Env) -> None:
    body = claude_code_body("go on #sim tokens=2 reasoning=3")
    beta = "claude-code-20250219,interleaved-thinking-2025-05-14"
    async with anthropic_http(env, **{"anthropic-beta": beta, "x-app": "cli"}) as http:
        response = await http.post("/v1/messages?beta=true", json=body)
        streamed = await http.post("/v1/messages?beta=true", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    message = response.json()
    # display "omitted": the thinking block keeps its signature and loses its text.
    thinking, text = message["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == ""
    assert thinking["signature"]
    assert text == {"type": "text", "text": "tok tok"}
    assert message["usage"]["output_tokens"] == 3 + 2  # omitted thinking is still billed
    events = parse_anthropic_sse(streamed.text)
    deltas = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert deltas == ["signature_delta", "text_delta", "text_delta"]
    assert [b["type"] for b in rebuild_anthropic(events)] == ["thinking", "text"]
    assert events[-2]["usage"]["output_tokens"] == 5
    # What reached the upstream is recorded: target, query string and every header as sent.
    record = env.sim.requests[-2]
    assert record.path == "/v1/messages?beta=true" and record.query == "beta=true"
    assert record.headers["anthropic-beta"] == beta
    assert record.headers["anthropic-version"] == "2023-06-01"
    assert record.headers["x-api-key"] == "k" and record.headers["x-app"] == "cli"
    assert record.body == body


async def test_anthropic_adaptive_thinking_shows_signed_thinking(env: Env) -> None:
    adaptive = {"type": "adaptive"}
    env.sim.profile.reasoning_tokens = 2
    async with anthropic_http(env) as http:
        plain = (await http.post("/v1/messages", json=messages("hi", thinking=adaptive))).json()
        effort = await http.post(
            "/v1/messages",
            json=messages("hi", thinking=adaptive, output_config={"effort": "high"}, stream=True),
        )
        off = messages("hi", thinking={"type": "disabled"})
        disabled = await http.post("/v1/messages", json=off)
    thinking, _ = plain["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "think think"
    assert thinking["signature"]
    blocks = rebuild_anthropic(parse_anthropic_sse(effort.text))
    assert blocks[0]["thinking"] == "think think" and blocks[0]["signature"]
    assert [b["type"] for b in disabled.json()["content"]] == ["text"]


async def test_anthropic_tool_loop_validation(env: Env) -> None:
    call = {"type": "tool_use", "id": "toolu_1", "name": "exec_command", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}

    def conversation(*answer: dict) -> dict:
        body = messages("run", tools=TOOLS_ANTHROPIC)
        body["messages"] += [{"role": "assistant", "content": [call]}]
        if answer:
            body["messages"].append({"role": "user", "content": list(answer)})
        return body

    text = {"type": "text", "text": "and then"}
    async with anthropic_http(env) as http:
        answered = await http.post("/v1/messages", json=conversation(result, text))
        ends_on_call = await http.post("/v1/messages", json=conversation())
        unanswered = await http.post("/v1/messages", json=conversation(text))
        text_first = await http.post("/v1/messages", json=conversation(text, result))
        stray = messages([{**result, "tool_use_id": "toolu_x"}])
        unexpected = await http.post("/v1/messages", json=stray)
        redacted = messages("hi")
        redacted["messages"] += [
            {"role": "assistant", "content": [{"type": "redacted_thinking"}]},
            {"role": "user", "content": "more"},
        ]
        no_data = await http.post("/v1/messages", json=redacted)
        tool_role = await http.post(
            "/v1/messages", json={**messages("hi"), "messages": [{"role": "tool", "content": "x"}]}
        )
    assert answered.status_code == 200 and ends_on_call.status_code == 200
    for response in (unanswered, text_first):
        assert response.status_code == 400
        assert response.json()["error"] == {
            "type": "invalid_request_error",
            "message": "messages.2: `tool_use` ids were found without `tool_result` blocks "
            "immediately after: toolu_1. Each `tool_use` block must have a corresponding "
            "`tool_result` block in the next message.",
        }
    assert unexpected.status_code == 400
    assert unexpected.json()["error"]["message"].startswith(
        "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_x."
    )
    assert no_data.status_code == 400
    assert no_data.json()["error"]["message"] == (
        "messages.1.content.0.redacted_thinking.data: Field required"
    )
    assert tool_role.status_code == 400
    assert tool_role.json()["error"]["message"] == (
        "messages.0.role: Input should be 'user', 'assistant' or 'system'"
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_cache_reads_and_writes(env: Env, stream: bool) -> None:
    body = messages("x" * 400 + " #sim cached=30 cache_write=50 tokens=2", stream=stream)
    prompt = max(1, len(json.dumps([body["messages"], None])) // 4)
    async with anthropic_http(env) as http:
        response = await http.post("/v1/messages", json=body)
    if stream:
        usage = parse_anthropic_sse(response.text)[0]["message"]["usage"]
        assert usage["output_tokens"] == 0
    else:
        usage = response.json()["usage"]
        assert usage["output_tokens"] == 2
    assert usage["input_tokens"] == prompt - 30 - 50
    assert usage["cache_read_input_tokens"] == 30
    assert usage["cache_creation_input_tokens"] == 50
    record = env.sim.requests[-1].usage
    assert record["input_tokens"] == prompt  # all three parts of the prompt
    assert record["cached_tokens"] == 30 and record["cache_write_tokens"] == 50
    # No more is written than the prompt has; OpenAI kinds report no cache writes.
    async with anthropic_http(env) as http:
        capped = await http.post("/v1/messages", json=messages("hi #sim cache_write=99999"))
    assert capped.json()["usage"]["input_tokens"] == 0
    async with env.http() as http:
        await http.post("/chat/completions", json=chat("hi #sim cache_write=5"))
    assert env.sim.requests[-1].usage["cache_write_tokens"] == 0


async def test_anthropic_count_tokens(env: Env) -> None:
    body = {
        "model": "claude-sonnet-4-6",
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "count me"}],
        "tools": TOOLS_ANTHROPIC,
        "thinking": {"type": "enabled", "budget_tokens": 2048},  # no max_tokens to be below
    }
    async with anthropic_http(env) as http:
        counted = await http.post("/v1/messages/count_tokens?beta=true", json=body)
        no_messages = await http.post("/v1/messages/count_tokens", json={"model": "c"})
        get = await http.get("/v1/messages/count_tokens")
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{env.port}") as bare:
        no_key = await bare.post("/v1/messages/count_tokens", json=body)
    assert counted.status_code == 200
    expected = max(1, len(json.dumps([body["messages"], body["system"]])) // 4)
    assert counted.json() == {"input_tokens": expected}
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["message"] == "messages: Field required"
    assert get.status_code == 405 and get.json()["type"] == "error"
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    record = env.sim.requests[-4]
    assert record.path == "/v1/messages/count_tokens?beta=true" and record.body == body
    assert record.status == 200 and record.usage is None


async def test_anthropic_models_list(env: Env) -> None:
    async with anthropic_http(env) as http:
        await http.post("/v1/messages", json={**messages("hi"), "model": "claude-seen-1"})
        listed = (await http.get("/v1/models")).json()
        first = (await http.get("/v1/models?limit=1")).json()
        after = (await http.get(f"/v1/models?after_id={first['last_id']}&limit=1")).json()
        one = await http.get("/v1/models/claude-sonnet-4-6")
        missing = await http.get("/v1/models/claude-nope")
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{env.port}") as bare:
        no_key = await bare.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
    ids = [m["id"] for m in listed["data"]]
    assert ids[:3] == ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"]
    assert "claude-seen-1" in ids
    assert listed["has_more"] is False
    assert listed["first_id"] == ids[0] and listed["last_id"] == ids[-1]
    for model in listed["data"]:
        assert set(model) == {"type", "id", "display_name", "created_at"}
        assert model["type"] == "model" and model["created_at"].endswith("Z")
    assert first["has_more"] is True and [m["id"] for m in first["data"]] == ids[:1]
    assert [m["id"] for m in after["data"]] == ids[1:2]
    assert one.json() == {
        "type": "model",
        "id": "claude-sonnet-4-6",
        "display_name": "Claude Sonnet 4.6",
        "created_at": "2026-01-01T00:00:00Z",
    }
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    assert no_key.status_code == 401 and no_key.json()["type"] == "error"
    # Without anthropic-version the OpenAI list is answered, as before.
    async with env.http() as http:
        openai_list = (await http.get("/models")).json()
    assert openai_list["object"] == "list" and "claude-seen-1" in [
        m["id"] for m in openai_list["data"]
    ]


def anthropic_sdk(env: Env) -> anthropic.Anthropic:
    """The official SDK pointed straight at the sim (sync: it runs in a worker thread)."""
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{env.port}", api_key="k", max_retries=0, timeout=10
    )


async def test_anthropic_sdk_create_count_and_models(env: Env) -> None:
    def run() -> tuple:
        with anthropic_sdk(env) as client:
            created = client.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=2048,
                thinking={"type": "enabled", "budget_tokens": 1024},
                tools=TOOLS_ANTHROPIC,
                messages=[
                    {"role": "user", "content": "go #sim reasoning=2 tokens=3 tool=exec_command"}
                ],
            )
            counted = client.messages.count_tokens(
                model="claude-sonnet-4-6", messages=[{"role": "user", "content": "count me"}]
            )
            models = list(client.models.list())
            with pytest.raises(anthropic.BadRequestError) as bad:
                client.messages.create(
                    model="claude-sonnet-4-6",
                    max_tokens=100,
                    messages=[{"role": "tool", "content": "x"}],  # type: ignore[typeddict-item]
                )
        return created, counted, models, bad.value

    created, counted, models, bad = await trio.to_thread.run_sync(run)
    assert [b.type for b in created.content] == ["thinking", "text", "tool_use"]
    assert created.content[0].signature and created.content[1].text == "tok tok tok"
    assert created.content[2].name == "exec_command"
    assert created.content[2].input == {"cmd": "echo hi"}
    assert created.stop_reason == "tool_use"
    assert created.usage.cache_read_input_tokens == 0
    assert counted.input_tokens == max(
        1, len(json.dumps([[{"role": "user", "content": "count me"}], None])) // 4
    )
    assert "claude-sonnet-4-6" in [m.id for m in models]
    assert models[0].display_name.startswith("Claude")
    assert bad.status_code == 400 and "role" in bad.message
    record = env.sim.requests[0]
    # anthropic 2.17 sends its API key as a bearer token, with a newer version date.
    assert record.headers["authorization"] == "Bearer k" and "x-api-key" not in record.headers
    assert record.headers["anthropic-version"] == anthropic._constants.ANTHROPIC_API_VERSION


async def test_anthropic_sdk_stream_with_thinking_and_tool_use(env: Env) -> None:
    directive = 'reasoning=3 tokens=2 tool=exec_command args={"cmd":"ls"}'

    def run() -> tuple:
        with anthropic_sdk(env) as client:
            with client.messages.stream(
                model="claude-sonnet-4-6",
                max_tokens=4096,
                thinking={"type": "adaptive"},
                tools=TOOLS_ANTHROPIC,
                messages=[{"role": "user", "content": f"ls #sim {directive}"}],
            ) as stream:
                kinds = [event.type for event in stream]
                return kinds, stream.get_final_message()

    kinds, final = await trio.to_thread.run_sync(run)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "thinking" in kinds and "signature" in kinds and "input_json" in kinds
    thinking, text, tool_use = final.content
    assert thinking.thinking == "think think think" and thinking.signature
    assert text.text == "tok tok"
    assert tool_use.name == "exec_command" and tool_use.input == {"cmd": "ls"}
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 3 + 2 + len(sp.split_arguments('{"cmd":"ls"}'))


# ------------------------------------------------------------------------------------------
# Gemini

TOOLS_GEMINI = [{"functionDeclarations": [{"name": "exec_command", "parameters": {}}]}]
GEMINI = "/v1beta/models/gemini-3-pro-preview"


def gemini_http(env: Env, key: str | None = "k") -> httpx2.AsyncClient:
    headers = {"x-goog-api-key": key} if key else {}
    return httpx2.AsyncClient(base_url=f"http://127.0.0.1:{env.port}", headers=headers, timeout=10)


def contents(text: str, **extra: object) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


def parse_gemini_sse(raw: str) -> list[dict]:
    """``data:`` chunks of an ``alt=sse`` stream (Google ends each with CRLF CRLF)."""
    assert "[DONE]" not in raw
    blocks = [block for block in raw.split("\r\n\r\n") if block]
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks)
    return [json.loads(block[6:]) for block in blocks]


def rebuild_gemini(chunks: list[dict]) -> tuple[str, str, list[dict]]:
    """(thoughts, text, function-call parts) from the chunks' parts."""
    thoughts = text = ""
    calls = []
    for chunk in chunks:
        for part in chunk["candidates"][0]["content"]["parts"]:
            if "functionCall" in part:
                calls.append(part)
            elif part.get("thought"):
                thoughts += part["text"]
            else:
                text += part.get("text", "")
    return thoughts, text, calls


async def test_gemini_non_stream(env: Env) -> None:
    body = contents(
        "go #sim reasoning=2 tokens=3 tool=exec_command cached=1",
        systemInstruction={"parts": [{"text": "be brief"}]},
        tools=TOOLS_GEMINI,
        generationConfig={"maxOutputTokens": 100, "thinkingConfig": {"includeThoughts": True}},
    )
    async with gemini_http(env, key=None) as http:
        response = await http.post(f"{GEMINI}:generateContent?key=k", json=body)
    assert response.status_code == 200
    data = response.json()
    (candidate,) = data["candidates"]
    assert candidate["finishReason"] == "STOP" and candidate["index"] == 0
    assert candidate["content"]["role"] == "model"
    thought, text, call = candidate["content"]["parts"]
    assert thought == {"text": "think think", "thought": True}
    assert text == {"text": "tok tok tok"}
    assert call["functionCall"] == {"name": "exec_command", "args": {"cmd": "echo hi"}}
    assert call["thoughtSignature"]
    prompt = max(1, len(json.dumps([body["contents"], body["systemInstruction"]])) // 4)
    assert data["usageMetadata"] == {
        "promptTokenCount": prompt,
        "candidatesTokenCount": 4,
        "thoughtsTokenCount": 2,
        "totalTokenCount": prompt + 6,
        "cachedContentTokenCount": 1,
    }
    assert data["modelVersion"] == "gemini-3-pro-preview"
    record = env.sim.requests[-1]
    assert record.body == body and record.finished
    assert record.usage == {
        "input_tokens": prompt,
        "cached_tokens": 1,
        "cache_write_tokens": 0,
        "output_tokens": 6,
        "reasoning_tokens": 2,
        "total_tokens": prompt + 6,
    }


async def test_gemini_stream_sse(env: Env) -> None:
    body = contents(
        'go #sim reasoning=2 tokens=4 tool=exec_command args={"cmd":"ls"}',
        tools=TOOLS_GEMINI,
        generationConfig={"thinkingConfig": {"includeThoughts": True}},
    )
    async with gemini_http(env) as http:
        async with http.stream(
            "POST", "/v1/models/gemini-3-flash:streamGenerateContent?alt=sse", json=body
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = (await response.aread()).decode()
        array = await http.post("/models/gemini-3-flash:streamGenerateContent", json=body)
    chunks = parse_gemini_sse(raw)
    assert len(chunks) == 2 + 4 + 1  # one part per chunk
    thoughts, text, calls = rebuild_gemini(chunks)
    assert thoughts == "think think" and text == "tok tok tok tok"
    (call,) = calls
    assert call["functionCall"] == {"name": "exec_command", "args": {"cmd": "ls"}}
    assert call["thoughtSignature"]
    finishes = [c["candidates"][0].get("finishReason") for c in chunks]
    assert finishes == [None] * 6 + ["STOP"]
    usage = chunks[-1]["usageMetadata"]
    assert (usage["thoughtsTokenCount"], usage["candidatesTokenCount"]) == (2, 5)
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + 7
    assert "cachedContentTokenCount" not in usage
    assert all(c["modelVersion"] == "gemini-3-flash" for c in chunks)
    assert env.sim.requests[-2].usage["output_tokens"] == 7
    # Without alt=sse the same chunks come as one JSON array.
    assert array.headers["content-type"].startswith("application/json")
    assert rebuild_gemini(array.json())[:2] == (thoughts, text)


async def test_gemini_thinking_policy_and_max_tokens(env: Env) -> None:
    env.sim.profile.reasoning_tokens = 2
    include = {"thinkingConfig": {"includeThoughts": True}}
    async with gemini_http(env) as http:
        plain = (await http.post(f"{GEMINI}:generateContent", json=contents("hi"))).json()
        shown = await http.post(
            f"{GEMINI}:generateContent", json=contents("hi", generationConfig=include)
        )
        cut = await http.post(
            f"{GEMINI}:streamGenerateContent?alt=sse",
            json=contents("hi #sim tokens=10", generationConfig={"maxOutputTokens": 3}),
        )
    assert plain["candidates"][0]["content"]["parts"] == [{"text": "tok tok tok tok tok"}]
    assert "thoughtsTokenCount" not in plain["usageMetadata"]
    assert shown.json()["candidates"][0]["content"]["parts"][0]["thought"] is True
    assert shown.json()["usageMetadata"]["thoughtsTokenCount"] == 2
    chunks = parse_gemini_sse(cut.text)
    assert rebuild_gemini(chunks)[1] == "tok tok tok"
    assert chunks[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 3


async def test_gemini_thought_signature_round_trip(env: Env) -> None:
    prompt = "run #sim tool=exec_command tokens=2"
    async with gemini_http(env) as http:
        first = (
            await http.post(f"{GEMINI}:generateContent", json=contents(prompt, tools=TOOLS_GEMINI))
        ).json()
        call_part = first["candidates"][0]["content"]["parts"][-1]
        body = contents(prompt, tools=TOOLS_GEMINI)
        body["contents"] += [
            {"role": "model", "parts": [call_part]},
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "exec_command", "response": {"result": "hi"}}}
                ],
            },
        ]
        replayed = await http.post(f"{GEMINI}:generateContent", json=body)
        stripped = json.loads(json.dumps(body))
        del stripped["contents"][1]["parts"][0]["thoughtSignature"]
        missing = await http.post(f"{GEMINI}:streamGenerateContent?alt=sse", json=stripped)
        # An earlier turn (before a new user prompt) is not checked, as with Gemini 3.
        stripped["contents"].append({"role": "user", "parts": [{"text": "thanks #sim tokens=1"}]})
        older = await http.post(f"{GEMINI}:generateContent", json=stripped)
        nameless = json.loads(json.dumps(body))
        del nameless["contents"][2]["parts"][0]["functionResponse"]["name"]
        no_name = await http.post(f"{GEMINI}:generateContent", json=nameless)
    assert replayed.status_code == 200
    assert replayed.json()["candidates"][0]["content"]["parts"] == [{"text": "tok tok"}]
    assert missing.status_code == 400
    error = missing.json()["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["message"].startswith(
        "Function call is missing a thought_signature in functionCall parts"
    )
    assert older.status_code == 200
    assert older.json()["candidates"][0]["content"]["parts"] == [{"text": "tok"}]
    assert no_name.status_code == 400 and "function_response.name" in no_name.text


async def test_gemini_auth(env: Env) -> None:
    body = contents("hi")
    async with gemini_http(env, key=None) as http:
        missing = await http.post(f"{GEMINI}:generateContent", json=body)
        env.sim.profile.api_key = "secret"
        wrong = await http.post(f"{GEMINI}:generateContent?key=nope", json=body)
        header = await http.post(
            f"{GEMINI}:generateContent", json=body, headers={"x-goog-api-key": "secret"}
        )
        query = await http.post(f"{GEMINI}:generateContent?key=secret", json=body)
    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
    assert wrong.status_code == 401
    assert wrong.json()["error"]["status"] == "UNAUTHENTICATED"
    assert wrong.json()["error"]["code"] == 401
    assert header.status_code == 200 and query.status_code == 200


@pytest.mark.parametrize(
    ("fault", "status", "google_status"),
    [
        ("429", 429, "RESOURCE_EXHAUSTED"),
        ("500", 500, "INTERNAL"),
        ("503", 503, "UNAVAILABLE"),
        ("401", 401, "UNAUTHENTICATED"),
        ("400", 400, "INVALID_ARGUMENT"),
    ],
)
async def test_gemini_error_faults(env: Env, fault: str, status: int, google_status: str) -> None:
    async with gemini_http(env) as http:
        response = await http.post(
            f"{GEMINI}:streamGenerateContent?alt=sse", json=contents(f"#sim fault={fault}")
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (status, google_status) and error["message"]
    if fault == "429":
        retry = [d for d in error["details"] if d["@type"].endswith("google.rpc.RetryInfo")]
        assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}]


async def test_gemini_drop_stall_and_client_close(env: Env) -> None:
    url = f"{GEMINI}:streamGenerateContent?alt=sse"
    async with gemini_http(env) as http:
        with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
            async with http.stream(
                "POST", url, json=contents("#sim fault=drop tokens=10")
            ) as response:
                async for _ in response.aiter_lines():
                    pass
        assert env.sim.requests[-1].events_sent == 5 and not env.sim.requests[-1].finished
        with pytest.raises(httpx2.ReadTimeout):
            await http.post(
                url, json=contents("#sim fault=stall"), timeout=httpx2.Timeout(10, read=0.2)
            )
        await wait_for(lambda: env.sim.requests[-1].client_closed)
        assert env.sim.requests[-1].events_sent == 3

        body = contents("#sim tokens=1000 delay=0.01")
        async with http.stream("POST", url, json=body) as response:
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks == 5:
                    break
            close_time = time.monotonic()
    record = env.sim.requests[-1]
    await wait_for(lambda: record.client_closed)
    assert record.closed_at - close_time < 0.05
    assert not record.finished and record.usage is None
    await wait_for(lambda: env.sim.active_streams == 0)


async def test_openai_overloaded_fault(env: Env) -> None:
    async with env.http() as http:
        response = await http.post("/chat/completions", json=chat("#sim fault=529"))
    assert response.status_code == 503
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_directive_text_for_anthropic_and_gemini() -> None:
    anthropic = {
        "messages": [
            {"role": "user", "content": "#sim tokens=1"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "text", "text": "#sim tokens=2"},
                ],
            },
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
        ]
    }
    assert sp.directive_text("anthropic", anthropic) == "a\n#sim tokens=2"
    assert sp.ends_with_tool_output("anthropic", anthropic)
    gemini = {
        "contents": [
            {"parts": [{"text": "#sim tokens=3"}]},
            {"role": "model", "parts": [{"text": "#sim tokens=4"}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]},
        ]
    }
    assert sp.directive_text("gemini", gemini) == "#sim tokens=3"
    assert sp.ends_with_tool_output("gemini", gemini)
    assert sp.directive_text("gemini", {"contents": "bad"}) == ""


# ------------------------------------------------------------------------------------------
# Pure helpers and the standalone command


def test_parse_directives() -> None:
    d = sp.parse_directives(
        'hello\n#sim ttft=0.5 tokens=3 fault=slow_headers=2 args={"a":1} x\n#simulate tokens=9'
    )
    assert (d.ttft, d.tokens, d.fault, d.slow_headers, d.args) == (
        0.5,
        3,
        "slow_headers",
        2.0,
        '{"a":1}',
    )
    assert sp.parse_directives("#sim tokens=-1 ttft=abc fault=nope args={bad") == sp.Directives()
    assert sp.parse_directives("no directive") == sp.Directives()
    assert sp.parse_directives("#sim fault=429").fault == "429"


def test_split_arguments() -> None:
    for text in ('{"cmd": "echo hi"}', '{"a":1}', "{}", "x" * 100):
        pieces = sp.split_arguments(text)
        assert "".join(pieces) == text and all(pieces)
        assert len(pieces) >= min(3, len(text))


def test_standalone_command() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.testing.upstream", "--port", "0", "--tokens", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("sim-upstream listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        models = httpx2.get(url + "/v1/models", headers={"authorization": "Bearer k"})
        assert models.status_code == 200 and models.json()["object"] == "list"
        answer = httpx2.post(
            url + "/chat/completions", json=chat("hi"), headers={"authorization": "Bearer k"}
        )
        assert answer.json()["usage"]["completion_tokens"] == 3
        # A client still connected must not keep the server from stopping.
        idle = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        idle.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr, stderr


def test_standalone_command_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.testing.upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert "listening on" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()
