"""Every client protocol against every upstream kind, through the real relay and the SDK.

{Chat, Responses} client × {openai-chat, openai-responses, anthropic, gemini} upstream ×
{stream, non-stream} × {text, tool call, reasoning, image}. Each answer is parsed by the official
``openai`` SDK (the Responses stream by its strict ``responses.stream()`` helper) and checked
against what the simulated upstream says it sent: the text, the tool call, the reasoning and the
usage. For images, the upstream must also have received the picture in its own format.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from .conftest import Relay, Sim, running_relay
from .upstream_kinds import KINDS, kind_accounts

MATRIX_CONFIG = "[pools.p]\n\n[packages.team]\npool = \"p\"\n" + kind_accounts()

# A 1×1 PNG: what a user pastes is irrelevant to the relay, its form is what is translated.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360f80f00000101000518d84e0000000049454e44ae426082"
    )
).decode()
IMAGE_URL = f"data:image/png;base64,{PNG}"

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
WEATHER_ARGS = {"city": "Paris"}

CASES = {
    "text": "#sim tokens=5",
    "tool": "#sim tokens=2 tool=get_weather args=" + json.dumps(WEATHER_ARGS).replace(" ", ""),
    "reasoning": "#sim tokens=3 reasoning=4",
    "image": "#sim tokens=3",
}


@pytest.fixture(scope="module")
def matrix(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("matrix"), sim.url, body=MATRIX_CONFIG) as server:
        yield server


@pytest.fixture(scope="module")
def client(matrix: Relay) -> openai.OpenAI:
    return openai.OpenAI(base_url=matrix.url + "/v1", api_key=matrix.key(), max_retries=0)


@dataclass
class Answer:
    """What a client got, in protocol-neutral terms."""

    text: str
    reasoning: str
    tool_calls: list[tuple[str, dict]]
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    finish: str


def words(word: str, count: int) -> str:
    return " ".join([word] * count)


def upstream_record(sim: Sim, marker: str) -> dict:
    """The one upstream request that carries ``marker``, once the upstream has logged its usage
    (it does so just after its last write, which the client may see first)."""
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in sim.requests() if marker in json.dumps(r["body"])]
        assert len(found) == 1, f"{len(found)} upstream requests carry {marker}"
        if found[0]["usage"] is not None or time.monotonic() > deadline:
            return found[0]
        time.sleep(0.01)


# -- Chat client


def chat_messages(case: str, prompt: str) -> list[dict]:
    if case == "image":
        content = [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": IMAGE_URL}},
        ]
        return [{"role": "user", "content": content}]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]


def ask_chat(client: openai.OpenAI, model: str, case: str, prompt: str, stream: bool) -> Answer:
    options: dict = {}
    if case == "tool":
        options["tools"] = [{"type": "function", "function": WEATHER_TOOL}]
    if case == "reasoning":
        options["reasoning_effort"] = "high"
    messages = chat_messages(case, prompt)
    if not stream:
        completion = client.chat.completions.create(model=model, messages=messages, **options)
        assert completion.object == "chat.completion" and completion.model == model
        message = completion.choices[0].message
        usage = completion.usage
        calls = [
            (call.function.name, json.loads(call.function.arguments))
            for call in message.tool_calls or []
        ]
        return Answer(
            text=message.content or "",
            reasoning=(message.model_extra or {}).get("reasoning_content") or "",
            tool_calls=calls,
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            reasoning_tokens=usage.completion_tokens_details.reasoning_tokens,
            finish=completion.choices[0].finish_reason,
        )
    stream_chunks = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True},
        **options,
    )
    text, reasoning, finish, usage = [], [], None, None
    calls: dict[int, dict] = {}
    for chunk in stream_chunks:
        assert chunk.object == "chat.completion.chunk" and chunk.model == model
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            text.append(delta.content or "")
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                if call.id:
                    entry["id"] = call.id
                if call.function and call.function.name:
                    entry["name"] += call.function.name
                if call.function and call.function.arguments:
                    entry["arguments"] += call.function.arguments
            finish = choice.finish_reason or finish
    assert usage is not None, "include_usage asked for a usage chunk"
    assert all(entry.get("id") for entry in calls.values())
    return Answer(
        text="".join(text),
        reasoning="".join(reasoning),
        tool_calls=[
            (calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)
        ],
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        reasoning_tokens=usage.completion_tokens_details.reasoning_tokens,
        finish=finish,
    )


# -- Responses client


def responses_input(case: str, prompt: str) -> list[dict]:
    content = [{"type": "input_text", "text": prompt}]
    if case == "image":
        content.append({"type": "input_image", "image_url": IMAGE_URL})
    return [{"type": "message", "role": "user", "content": content}]


def ask_responses(
    client: openai.OpenAI, model: str, case: str, prompt: str, stream: bool
) -> Answer:
    options: dict = {"instructions": "Be brief."}
    if case == "tool":
        options["tools"] = [{"type": "function", **WEATHER_TOOL}]
    if case == "reasoning":
        options["reasoning"] = {"effort": "high", "summary": "auto"}
    items = responses_input(case, prompt)
    if stream:
        deltas: list[str] = []
        with client.responses.stream(model=model, input=items, **options) as events:
            for event in events:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
            response = events.get_final_response()
        assert "".join(deltas) == response.output_text
    else:
        response = client.responses.create(model=model, input=items, **options)
    assert response.object == "response" and response.model == model
    assert response.id.startswith("resp_")
    reasoning = []
    for item in response.output:
        if item.type == "reasoning":
            reasoning.extend(part.text for part in item.summary)
    calls = [
        (item.name, json.loads(item.arguments))
        for item in response.output
        if item.type == "function_call"
    ]
    for item in response.output:
        if item.type == "function_call":
            assert item.call_id
    usage = response.usage
    return Answer(
        text=response.output_text,
        reasoning="".join(reasoning),
        tool_calls=calls,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.output_tokens_details.reasoning_tokens,
        finish=response.status,
    )


# -- The matrix


def image_reached_upstream(kind: str, body: dict) -> bool:
    """Whether the upstream's request carries the PNG in that upstream's own image form."""
    text = json.dumps(body)
    if kind == "openai-chat":
        return '"image_url"' in text and IMAGE_URL in text
    if kind == "openai-responses":
        return '"input_image"' in text and IMAGE_URL in text
    if kind == "anthropic":
        images = [
            block
            for message in body["messages"]
            for block in message["content"]
            if isinstance(block, dict) and block.get("type") == "image"
        ]
        return images == [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
        ]
    parts = [part for content in body["contents"] for part in content["parts"]]
    return {"inlineData": {"mimeType": "image/png", "data": PNG}} in parts


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("protocol", ["chat", "responses"])
def test_client_protocol_on_upstream_kind(
    client: openai.OpenAI, sim: Sim, protocol: str, kind: str, stream: bool, case: str
) -> None:
    model = KINDS[kind][0]
    marker = f"m{uuid.uuid4().hex[:10]}"
    prompt = f"{marker} {CASES[case]}"
    ask = ask_chat if protocol == "chat" else ask_responses
    answer = ask(client, model, case, prompt, stream)

    record = upstream_record(sim, marker)
    sent = record["usage"]
    assert sent is not None and record["finished"]
    # Anthropic's usage does not split thinking out of output_tokens: the relay cannot either.
    reasoning_tokens = 0 if kind == "anthropic" else sent["reasoning_tokens"]
    assert (answer.input_tokens, answer.output_tokens, answer.reasoning_tokens) == (
        sent["input_tokens"], sent["output_tokens"], reasoning_tokens,
    )
    expected_text = {"text": 5, "tool": 2, "reasoning": 3, "image": 3}[case]
    assert answer.text == words("tok", expected_text)
    if case == "tool":
        assert answer.tool_calls == [("get_weather", WEATHER_ARGS)]
        assert answer.finish == ("tool_calls" if protocol == "chat" else "completed")
    else:
        assert answer.tool_calls == []
        assert answer.finish == ("stop" if protocol == "chat" else "completed")
    if case == "reasoning":
        assert answer.reasoning == words("think", 4)
    else:
        assert answer.reasoning == ""
    if case == "image":
        assert image_reached_upstream(kind, record["body"]), record["body"]


@pytest.fixture(scope="module")
def chatty(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """The matrix relay with keep-alives after 0.1 s of upstream silence."""
    with running_relay(
        tmp_path_factory.mktemp("keepalive"), sim.url, body=MATRIX_CONFIG, keepalive_event_s=0.1
    ) as server:
        yield server


def test_a_quiet_relayed_stream_gets_keepalive_comments(chatty: Relay) -> None:
    client = openai.OpenAI(base_url=chatty.url + "/v1", api_key=chatty.key(), max_retries=0)
    prompt = "#sim tokens=3 delay=0.45"
    with client.chat.completions.with_streaming_response.create(
        model="m-chat", messages=[{"role": "user", "content": prompt}], stream=True
    ) as response:
        raw = b"".join(response.iter_bytes())
    assert raw.count(b": keep-alive\n\n") >= 4  # two silences of 0.45 s
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in raw.splitlines()
        if line.startswith(b"data: {")
    )
    assert text == words("tok", 3)


def test_a_quiet_translated_responses_stream_gets_in_progress_events(chatty: Relay) -> None:
    client = openai.OpenAI(base_url=chatty.url + "/v1", api_key=chatty.key(), max_retries=0)
    kinds, numbers = [], []
    with client.responses.stream(model="m-chat", input="#sim tokens=3 delay=0.45") as events:
        for event in events:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
        response = events.get_final_response()
    assert response.output_text == words("tok", 3)
    assert numbers == list(range(len(numbers)))  # the keep-alives are numbered in line
    first_delta = kinds.index("response.output_text.delta")
    assert kinds[first_delta:].count("response.in_progress") >= 4
    assert kinds[-1] == "response.completed"


@pytest.mark.parametrize("kind", ["openai-chat", "anthropic"])
def test_files_other_than_images_and_pdfs_are_refused_before_any_upstream_call(
    matrix: Relay, sim: Sim, kind: str
) -> None:
    client = openai.OpenAI(base_url=matrix.url + "/v1", api_key=matrix.key(), max_retries=0)
    marker = f"zip-{uuid.uuid4().hex[:8]}"
    archive = "data:application/zip;base64," + base64.b64encode(b"PK\x03\x04").decode()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=KINDS[kind][0],
            messages=[{"role": "user", "content": [
                {"type": "text", "text": marker},
                {"type": "file", "file": {"filename": "code.zip", "file_data": archive}},
            ]}],
        )
    error = refused.value.body
    assert "only images and pdf" in error["message"].lower(), error
    assert error["type"] == "invalid_request_error" and error["param"]
    assert not [r for r in sim.requests() if marker in json.dumps(r["body"])]
