"""The Anthropic Messages API as a client protocol, through the official ``anthropic`` SDK and
raw HTTP, over every upstream kind: relayed to an Anthropic account, translated to the others."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import anthropic
import httpx2
import pytest

from .conftest import SIM_KEY, Relay, Sim, running_relay
from .upstream_kinds import KINDS, kind_accounts

CONFIG = """
[pools.p]

[packages.team]
pool = "p"

[packages.once]
pool = "p"
rpm = 1

[packages.paid]
pool = "p"
initial_credits = 0

[models.m-priced]
target = "m-chat"

[models."claude-sonnet-*"]
target = "m-responses"

[prices.m-priced]
input = 1000
output = 1000
""" + kind_accounts()

READ_TOOL = {
    "name": "Read",
    "description": "Reads a file from the local filesystem.",
    "input_schema": {
        "type": "object",
        "properties": {"file_path": {"type": "string"}},
        "required": ["file_path"],
    },
}


@pytest.fixture(scope="module")
def messages_relay(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("messages"), sim.url, body=CONFIG) as server:
        yield server


@pytest.fixture
def client(messages_relay: Relay) -> anthropic.Anthropic:
    # The SDK appends /v1/messages to the base URL, as Claude Code does.
    return anthropic.Anthropic(
        base_url=messages_relay.url, api_key=messages_relay.key(), max_retries=0
    )


def upstream_requests(sim: Sim, marker: str) -> list[dict]:
    return [r for r in sim.requests() if marker in json.dumps(r.get("body"))]


@pytest.mark.parametrize("kind", list(KINDS))
def test_create_over_every_upstream(
    client: anthropic.Anthropic, messages_relay: Relay, sim: Sim, kind: str
) -> None:
    model = KINDS[kind][0]
    raw = client.messages.with_raw_response.create(
        model=model,
        max_tokens=200,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": f"create-{kind} #sim tokens=5"}],
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.model == model
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == " ".join(["tok"] * 5)
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 5
    assert message.usage.input_tokens > 0
    row = messages_relay.usage_row(raw.headers["x-request-id"])
    assert (row["status"], row["account"], row["endpoint"]) == (200, kind, "messages")
    assert row["output_tokens"] == 5 and row["usage_source"] == "upstream"
    assert row["input_tokens"] == (
        message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_stream_with_thinking_in_anthropic_event_order(
    client: anthropic.Anthropic, messages_relay: Relay, kind: str
) -> None:
    model = KINDS[kind][0]
    with client.messages.stream(
        model=model,
        max_tokens=4000,
        thinking={"type": "enabled", "budget_tokens": 2000},
        messages=[{"role": "user", "content": f"stream-{kind} #sim tokens=6 reasoning=4"}],
    ) as stream:
        names = [event.type for event in stream]
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert names[0] == "message_start"
    assert names[-1] == "message_stop" and names[-2] == "message_delta"
    blocks = [block.type for block in final.content]
    assert blocks == ["thinking", "text"], blocks
    assert final.content[0].thinking and final.content[0].signature
    assert final.content[1].text == " ".join(["tok"] * 6)
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens >= 6
    row = messages_relay.usage_row(request_id)
    assert (row["status"], row["stream"], row["account"]) == (200, 1, kind)
    assert row["output_tokens"] == final.usage.output_tokens


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_tool_round_trip(
    client: anthropic.Anthropic, sim: Sim, kind: str
) -> None:
    model = KINDS[kind][0]
    marker = f"tool-{kind}"
    args = json.dumps({"file_path": "/tmp/notes.txt"}, separators=(",", ":"))
    question = {"role": "user", "content": f"{marker} #sim tool=Read args={args}"}
    with client.messages.stream(
        model=model, max_tokens=500, tools=[READ_TOOL], messages=[question]
    ) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.name == "Read" and call.input == {"file_path": "/tmp/notes.txt"}
    answer = client.messages.create(
        model=model,
        max_tokens=500,
        tools=[READ_TOOL],
        messages=[
            question,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id,
                     "content": "the notes say: 42"},
                ],
            },
        ],
    )
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].type == "text"
    upstream = json.dumps(upstream_requests(sim, marker)[-1]["body"])
    assert "the notes say: 42" in upstream  # the result reached the model, in its protocol


def test_thinking_from_a_responses_upstream_comes_back_as_its_reasoning_item(
    client: anthropic.Anthropic, sim: Sim
) -> None:
    """The thinking block's signature carries the Responses reasoning item's encrypted content:
    the next turn gives the upstream back the same encrypted content."""
    question = {"role": "user", "content": "reasoning-trip #sim tokens=3 reasoning=3"}
    first = client.messages.create(
        model="m-responses", max_tokens=4000, messages=[question],
        thinking={"type": "enabled", "budget_tokens": 2000},
    )
    thinking = first.content[0]
    assert thinking.type == "thinking" and thinking.signature.startswith("rly1.")
    client.messages.create(
        model="m-responses",
        max_tokens=4000,
        thinking={"type": "enabled", "budget_tokens": 2000},
        messages=[
            question,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": "and then? #sim tokens=2"},
        ],
    )
    requests = upstream_requests(sim, "reasoning-trip")
    sent = requests[0]["body"]
    assert sent["reasoning"]["effort"] == "low"  # budget 2000 → low
    replayed = [item for item in requests[-1]["body"]["input"] if item["type"] == "reasoning"]
    assert len(replayed) == 1
    assert replayed[0]["encrypted_content"].startswith("gAAAAB")
    assert replayed[0]["summary"][0]["text"] == thinking.thinking


def test_a_long_tool_name_is_shortened_upstream_and_restored(
    client: anthropic.Anthropic, sim: Sim
) -> None:
    name = "mcp__a_very_long_server_name_for_tests__" + "look_up_the_thing_" * 3
    assert len(name) > 64
    tool = {**READ_TOOL, "name": name}
    message = client.messages.create(
        model="m-responses",
        max_tokens=300,
        tools=[tool],
        messages=[{"role": "user", "content": f"long-name #sim tool={name} args={{}}"}],
    )
    call = next(block for block in message.content if block.type == "tool_use")
    assert call.name == name
    sent = upstream_requests(sim, "long-name")[-1]["body"]
    upstream_name = sent["tools"][0]["name"]
    assert len(upstream_name) <= 64 and upstream_name != name


def test_beta_headers_and_query_reach_an_anthropic_upstream(
    client: anthropic.Anthropic, sim: Sim
) -> None:
    client.beta.messages.create(
        model="m-anthropic",
        max_tokens=100,
        betas=["context-management-2025-06-27", "interleaved-thinking-2025-05-14"],
        context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
        messages=[{"role": "user", "content": "betas #sim tokens=2"}],
    )
    record = upstream_requests(sim, "betas")[-1]
    headers = record["headers"]
    assert headers["anthropic-beta"] == (
        "context-management-2025-06-27,interleaved-thinking-2025-05-14"
    )
    # The client's API version, unchanged (the relay's own default is 2023-06-01).
    assert headers["anthropic-version"] == client.default_headers["anthropic-version"]
    assert headers["x-api-key"] == SIM_KEY  # the relay's credential, not the client's key
    # Relayed natively: what Chat-based peers drop is there.
    assert record["body"]["context_management"] == {
        "edits": [{"type": "clear_tool_uses_20250919"}]
    }


def test_claude_code_model_names_reach_the_mapped_upstream(
    client: anthropic.Anthropic, messages_relay: Relay, sim: Sim
) -> None:
    with client.messages.stream(
        model="claude-sonnet-4-5-20250929",
        max_tokens=300,
        messages=[{"role": "user", "content": "mapped-name #sim tokens=3"}],
    ) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert final.model == "claude-sonnet-4-5-20250929"  # the name the client asked for
    assert final.content[0].text == "tok tok tok"
    assert upstream_requests(sim, "mapped-name")[-1]["body"]["model"] == "m-responses"
    row = messages_relay.usage_row(request_id)
    assert (row["model"], row["upstream_model"], row["account"]) == (
        "claude-sonnet-4-5-20250929", "m-responses", "openai-responses"
    )
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="claude-opus-4-1-20250805", max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
        )


def test_count_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(
        model="m-chat", messages=[{"role": "user", "content": "x" * 400}]
    )
    assert 100 <= counted.input_tokens <= 110
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.count_tokens(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_models_in_anthropic_shape_for_anthropic_clients(
    client: anthropic.Anthropic, messages_relay: Relay
) -> None:
    models = client.models.list()
    assert {model.id for model in models.data} == {m for m, _ in KINDS.values()} | {"m-priced"}
    assert all(model.type == "model" for model in models.data)
    one = client.models.retrieve("m-chat")
    assert one.id == "m-chat" and one.display_name == "m-chat"
    plain = httpx2.get(
        messages_relay.url + "/v1/models",
        headers={"authorization": f"Bearer {messages_relay.key()}"},
    ).json()
    assert plain["object"] == "list"  # OpenAI's shape without anthropic-version


def test_claude_base_path_and_head(messages_relay: Relay) -> None:
    client = anthropic.Anthropic(
        base_url=messages_relay.url + "/claude", api_key=messages_relay.key(), max_retries=0
    )
    message = client.messages.create(
        model="m-chat", max_tokens=50, messages=[{"role": "user", "content": "#sim tokens=2"}]
    )
    assert message.content[0].text == "tok tok"
    assert httpx2.head(messages_relay.url + "/").status_code == 200


def test_typed_errors_from_the_relays_error_paths(messages_relay: Relay) -> None:
    def sdk(key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=messages_relay.url, api_key=key, max_retries=0)

    hello = [{"role": "user", "content": "hello #sim tokens=1"}]
    with pytest.raises(anthropic.AuthenticationError) as caught:
        sdk("sk-wrong").messages.create(model="m-chat", max_tokens=10, messages=hello)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert "Incorrect API key" in caught.value.body["error"]["message"]

    client = sdk(messages_relay.key())
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-nope", max_tokens=10, messages=hello)
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert "claude-nope" in caught.value.body["error"]["message"]

    done = messages_relay.cli(
        "keys", "create", "--config", str(messages_relay.config_path), "--package", "once",
        "--max-queue", "0", "--json",
    )
    limited = sdk(json.loads(done.stdout)["key"])  # may not queue: refused at once
    limited.messages.create(model="m-chat", max_tokens=10, messages=hello)
    with pytest.raises(anthropic.RateLimitError) as caught:
        limited.messages.create(model="m-chat", max_tokens=10, messages=hello)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) >= 1

    broke = sdk(messages_relay.create_key("paid"))
    with pytest.raises(anthropic.PaymentRequiredError) as caught:
        broke.messages.create(model="m-priced", max_tokens=10, messages=hello)
    assert caught.value.body["error"]["type"] == "billing_error"

    for model in ("m-anthropic", "m-chat"):  # Anthropic's 529 and OpenAI's 503 alike
        with pytest.raises(anthropic.OverloadedError) as caught:
            client.messages.create(
                model=model, max_tokens=10,
                messages=[{"role": "user", "content": "#sim fault=529"}],
            )
        assert caught.value.status_code == 529
        assert caught.value.body["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"model": "m-chat", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"model": "m-chat", "max_tokens": 5, "messages": "hi"}, "messages"),
        ({"model": "m-chat", "max_tokens": 5,
          "messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
        ({"model": "m-chat", "max_tokens": 5,
          "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
         "messages[0].content[0].tool_use_id"),
        ({"model": "m-chat", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "document",
             "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]},
         "messages[0].content[0]"),
    ],
)
def test_malformed_bodies_get_anthropic_400s(
    messages_relay: Relay, body: dict, names: str
) -> None:
    response = httpx2.post(
        messages_relay.url + "/v1/messages?beta=true", json=body,
        headers={"x-api-key": messages_relay.key(), "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert names in error["error"]["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_an_upstream_that_breaks_off_ends_the_stream_with_an_error_event(
    messages_relay: Relay,
) -> None:
    body = {"model": "m-chat", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "#sim tokens=50 fault=drop"}]}
    with httpx2.stream(
        "POST", messages_relay.url + "/v1/messages", json=body, timeout=10,
        headers={"x-api-key": messages_relay.key()},
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("event:")]
    assert events[0] == "event: message_start"
    assert events[-1] == "event: error"
    assert "message_stop" not in " ".join(events)


@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
@pytest.mark.parametrize("kind", ["openai-responses", "openai-chat", "gemini"])
def test_an_upstream_answer_of_the_wrong_shape_is_an_anthropic_error_not_a_crash(
    messages_relay: Relay, kind: str, stream: bool
) -> None:
    """A translated upstream's 200 with a field of the wrong type (the sim's ``malformed``
    fault) used to raise in the relay's decoder: a 500 and a traceback, or a stream cut short.
    The client gets Anthropic's error (a 502 ``api_error``, or the stream's error event); the
    usage row says so; no slot is left held (and the module's relay logs no traceback)."""
    body = {"model": KINDS[kind][0], "max_tokens": 50, "stream": stream,
            "messages": [{"role": "user", "content": "#sim fault=malformed"}]}
    response = httpx2.post(messages_relay.url + "/v1/messages", json=body, timeout=10,
                           headers={"x-api-key": messages_relay.key()})
    row = messages_relay.usage_row(response.headers["x-request-id"])
    assert row["error_code"] == "upstream_invalid_response"
    if stream:
        assert response.status_code == 200 and row["status"] == 200
        name, data = response.text.strip().split("\n\n")[-1].split("\n")
        assert name == "event: error"
        error = json.loads(data.removeprefix("data: "))["error"]
    else:
        assert response.status_code == row["status"] == 502
        error = response.json()["error"]
    assert error["type"] == "api_error" and f"not of the {kind} protocol" in error["message"]
    assert messages_relay.wait_idle()["admission"]["total"] == 0


@pytest.mark.parametrize("kind", ["anthropic", "openai-responses", "openai-chat"])
def test_usage_in_anthropic_terms_excludes_cached_tokens(
    client: anthropic.Anthropic, messages_relay: Relay, kind: str
) -> None:
    """``input_tokens`` excludes cache reads (and writes), reported apart, from every upstream:
    the record keeps the relay's sum, the client sees Anthropic's split."""
    writes = " cache_write=5" if kind == "anthropic" else ""
    raw = client.messages.with_raw_response.create(
        model=KINDS[kind][0], max_tokens=100,
        messages=[{"role": "user", "content": "x " * 200 + f"#sim tokens=2 cached=40{writes}"}],
    )
    usage = raw.parse().usage
    assert usage.cache_read_input_tokens == 40
    assert usage.cache_creation_input_tokens == (5 if writes else 0)
    row = messages_relay.usage_row(raw.headers["x-request-id"])
    assert row["cached_tokens"] == 40
    assert row["cache_write_tokens"] == usage.cache_creation_input_tokens
    assert row["input_tokens"] == (
        usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    )


PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNg+M/AAAADAQEAGNhOAAAAAElFTkSu"
    "QmCC"
)
PDF = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"


def test_a_claude_code_shaped_body_reaches_a_responses_upstream_whole(
    client: anthropic.Anthropic, sim: Sim
) -> None:
    """What Claude Code sends (system blocks with cache_control, a system message mid-way,
    adaptive thinking with an effort, context_management, metadata, tool_choice), with an image
    and a PDF: each becomes its Responses counterpart or is dropped as documented."""
    client.messages.create(
        model="m-responses",
        max_tokens=2000,
        system=[{"type": "text", "text": "You are a coding agent.",
                 "cache_control": {"type": "ephemeral"}}],
        thinking={"type": "adaptive"},
        extra_body={
            "output_config": {"effort": "high"},
            "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
            "top_k": 5,
        },
        metadata={"user_id": "user_abc_account_def_session_0f1e2d3c-aaaa-bbbb-cccc-0123456789ab"},
        tools=[READ_TOOL, {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "whole-body look at these"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}},
                {"type": "document", "source": {"type": "base64",
                                                "media_type": "application/pdf", "data": PDF},
                 "title": "spec.pdf"},
            ]},
            {"role": "assistant", "content": "Looking."},
            {"role": "system", "content": "The user switched to plan mode."},
            {"role": "user", "content": "go on #sim tokens=2"},
        ],
    )
    sent = upstream_requests(sim, "whole-body")[-1]["body"]
    assert sent["instructions"] == "You are a coding agent."
    assert sent["reasoning"]["effort"] == "high"
    assert [tool["name"] for tool in sent["tools"]] == ["Read"]  # the server tool is Anthropic's
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    for dropped in ("context_management", "metadata", "top_k", "cache_control"):
        assert dropped not in json.dumps(sent)
    parts = sent["input"][0]["content"]
    assert [part["type"] for part in parts] == ["input_text", "input_image", "input_file"]
    assert parts[1]["image_url"] == f"data:image/png;base64,{PNG}"
    assert parts[2]["file_data"].endswith(PDF) and parts[2]["filename"] == "spec.pdf"
    roles = [(item.get("role"), item["type"]) for item in sent["input"]]
    assert roles == [("user", "message"), ("assistant", "message"), ("developer", "message"),
                     ("user", "message")]


# --------------------------------------------------------------------------------------------
# A Messages stream that waits in the queue hears pings (the relay opens it itself).

WAITING_CONFIG = """
[pools.p]

[packages.single]
pool = "p"
max_concurrency = 1
queue_timeout_s = 5

[packages.brief]
pool = "p"
max_concurrency = 1
queue_timeout_s = 1
""" + kind_accounts()


@pytest.fixture(scope="module")
def waiting_relay(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    tmp = tmp_path_factory.mktemp("waiting")
    with running_relay(tmp, sim.url, body=WAITING_CONFIG, keepalive_event_s=0.3) as server:
        yield server


def hold_the_slot(relay: Relay, key: str, seconds: float) -> threading.Thread:
    """A request of ``key`` that holds its one slot for about ``seconds``."""
    tokens = int(seconds / 0.05)
    body = {"model": "m-chat", "max_tokens": 1000,
            "messages": [{"role": "user", "content": f"#sim tokens={tokens} delay=0.05"}]}
    thread = threading.Thread(target=httpx2.post, args=(relay.url + "/v1/messages",),
                              kwargs={"json": body, "timeout": 30, "headers": {"x-api-key": key}})
    thread.start()
    deadline = time.monotonic() + 5
    while relay.state()["active_requests"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return thread


def stream_events(relay: Relay, key: str, body: dict) -> tuple[str, list[tuple[str, dict]]]:
    with httpx2.stream("POST", relay.url + "/v1/messages", json=body, timeout=30,
                       headers={"x-api-key": key}) as response:
        assert response.status_code == 200
        events, name = [], None
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.removeprefix("data:"))))
        return response.headers["x-request-id"], events


@pytest.mark.parametrize("model", ["m-anthropic", "m-responses"])
def test_a_queued_stream_hears_pings_then_gets_its_answer(
    waiting_relay: Relay, model: str
) -> None:
    key = waiting_relay.create_key("single")
    holder = hold_the_slot(waiting_relay, key, 1.5)
    body = {"model": model, "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "queued #sim tokens=4"}]}
    request_id, events = stream_events(waiting_relay, key, body)
    holder.join()
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names.count("message_start") == 1
    first_content = names.index("content_block_start")
    assert names[1:first_content].count("ping") >= 2  # heard while it waited (~1.5 s, 0.3 s)
    assert names[-2:] == ["message_delta", "message_stop"]
    start, delta = events[0][1], events[-2][1]
    assert start["message"]["model"] == model
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == "tok tok tok tok"
    row = waiting_relay.usage_row(request_id)
    assert row["status"] == 200 and row["queue_ms"] > 900
    assert row["output_tokens"] == delta["usage"]["output_tokens"] == 4
    # The real input count reaches the client in message_delta, relayed or translated.
    assert delta["usage"]["input_tokens"] + delta["usage"]["cache_read_input_tokens"] == (
        row["input_tokens"]
    )


def test_a_queued_stream_that_times_out_ends_with_a_rate_limit_error_event(
    waiting_relay: Relay,
) -> None:
    key = waiting_relay.create_key("brief")
    holder = hold_the_slot(waiting_relay, key, 2.5)
    body = {"model": "m-chat", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "never served #sim tokens=4"}]}
    request_id, events = stream_events(waiting_relay, key, body)
    holder.join()
    names = [name for name, _ in events]
    assert names[0] == "message_start" and "ping" in names
    assert names[-1] == "error" and "content_block_start" not in names
    error = events[-1][1]["error"]
    assert error["type"] == "rate_limit_error" and "queue" in error["message"]
    row = waiting_relay.usage_row(request_id)
    assert (row["status"], row["error_code"], row["output_tokens"]) == (200, "queue_timeout", 0)
    assert waiting_relay.wait_idle()["admission"]["total"] == 0


def test_the_keys_own_call_list_shows_messages_calls(messages_relay: Relay) -> None:
    """What the workbench's per-call view reads (``GET /v1/calls``) has the Messages calls,
    with what they cost."""
    key = messages_relay.create_key("team", "calls")
    client = anthropic.Anthropic(base_url=messages_relay.url, api_key=key, max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="m-anthropic", max_tokens=50, messages=[{"role": "user", "content": "#sim tokens=3"}]
    )
    messages_relay.usage_row(raw.headers["x-request-id"])
    calls = httpx2.get(messages_relay.url + "/v1/calls",
                       headers={"authorization": f"Bearer {key}"}).json()
    (call,) = calls["data"]
    assert (call["request_id"], call["endpoint"], call["model"]) == (
        raw.headers["x-request-id"], "messages", "m-anthropic"
    )
    assert call["status"] == 200 and call["output_tokens"] == 3
