"""The relay through the official ``openai`` Python SDK, against the simulated upstream."""

from __future__ import annotations

import openai
import pytest

from .conftest import Relay, Sim


@pytest.fixture
def client(relay: Relay) -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.url + "/v1", api_key=relay.key(), max_retries=0)


def last_upstream_request(sim: Sim, path_end: str) -> dict:
    return [r for r in sim.requests() if r["path"].endswith(path_end)][-1]


def test_chat_non_stream(client: openai.OpenAI, relay: Relay, sim: Sim) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hello #sim tokens=7"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == " ".join(["tok"] * 7)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 7
    upstream = last_upstream_request(sim, "/chat/completions")
    assert upstream["headers"]["authorization"] == "Bearer sim-upstream-key"
    row = relay.usage_row(raw.headers["x-request-id"])
    assert (row["status"], row["output_tokens"], row["account"]) == (200, 7, "sim-chat")
    assert row["input_tokens"] == completion.usage.prompt_tokens
    assert row["usage_source"] == "upstream"


def test_chat_stream_with_include_usage(client: openai.OpenAI, relay: Relay) -> None:
    stream = client.chat.completions.create(
        model="gpt-5.5",
        messages=[{"role": "user", "content": "count #sim tokens=9"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage_chunks, finish = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage_chunks.append(chunk.usage)
            assert chunk.choices == []
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(text) == " ".join(["tok"] * 9)
    assert finish == "stop"
    assert len(usage_chunks) == 1 and usage_chunks[0].completion_tokens == 9


def test_chat_stream_without_include_usage_gets_no_usage_chunk(
    client: openai.OpenAI, relay: Relay, sim: Sim
) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "count #sim tokens=5"}],
        stream=True,
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " ".join(
        ["tok"] * 5
    )
    # The relay still asked the upstream for usage, to bill the request.
    upstream = last_upstream_request(sim, "/chat/completions")
    assert upstream["body"]["stream_options"] == {"include_usage": True}
    row = relay.usage_row(request_id)
    assert (row["output_tokens"], row["usage_source"], row["stream"]) == (5, "upstream", 1)


def test_responses_create(client: openai.OpenAI) -> None:
    response = client.responses.create(model="gpt-5.5", input="hi #sim tokens=4 reasoning=3")
    assert response.status == "completed"
    assert response.output_text == " ".join(["tok"] * 4)
    assert response.usage.output_tokens == 7
    assert response.usage.output_tokens_details.reasoning_tokens == 3


def test_responses_stream_helper(client: openai.OpenAI, relay: Relay) -> None:
    deltas = []
    with client.responses.stream(
        model="gpt-5.5", input="hi #sim tokens=6 reasoning=2"
    ) as stream:
        request_id = stream._response.headers["x-request-id"]
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == " ".join(["tok"] * 6)
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.usage.output_tokens == 8
    row = relay.usage_row(request_id)
    assert (row["endpoint"], row["output_tokens"], row["reasoning_tokens"]) == (
        "responses", 8, 2,
    )


def test_alias_resolves_to_target_and_effort(client: openai.OpenAI, sim: Sim) -> None:
    client.responses.create(model="gpt-5-high", input="hi #sim tokens=2")
    upstream = last_upstream_request(sim, "/responses")
    assert upstream["body"]["model"] == "gpt-5"
    assert upstream["body"]["reasoning"]["effort"] == "high"


def test_bad_key_raises_authentication_error(relay: Relay) -> None:
    client = openai.OpenAI(base_url=relay.url + "/v1", api_key="cr_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "invalid_api_key"
    assert "cr_not-a-key" not in str(caught.value)  # the key is redacted


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_found"
    assert "no-such-model" in caught.value.message


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == sorted(
        ["gpt-5.5", "gpt-5", "deepseek-chat", "claude-sim", "gpt-5-high", "unreachable-model"]
    )
    assert client.models.retrieve("gpt-5-high").id == "gpt-5-high"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_upstream_gets_the_request_body_with_its_length_not_chunked(
    client: openai.OpenAI, sim: Sim
) -> None:
    """The relay hands the body to httpx2 as a stream (so it is not kept for the whole answer)
    but declares its length: upstreams may refuse a chunked request body."""
    content = "long " * 20_000 + "#sim tokens=2"
    stream = client.chat.completions.create(
        model="gpt-5.5", messages=[{"role": "user", "content": content}], stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    upstream = last_upstream_request(sim, "/chat/completions")
    assert upstream["body"]["messages"][0]["content"] == content
    assert "transfer-encoding" not in upstream["headers"]
    assert int(upstream["headers"]["content-length"]) > len(content)
