"""Responses state over any upstream: ``previous_response_id`` and ``item_reference`` written
out from the answers the relay kept (per key, bounded), passed through to a Responses upstream
that stores, ``GET``/``DELETE /v1/responses/{id}``; with the real relay, the openai SDK and the
simulated upstream (what reached it is read from its request log)."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from .conftest import RedisServer, Relay, Sim, running_relay, start_relay

NODE_DIR = Path(__file__).parent / "node"

#: One Chat-only model, one Responses-only model (the upstream stores), one on both.
BODY = textwrap.dedent(
    """
    [pools.main]
    max_concurrency = 100

    [packages.team]
    pool = "main"

    [[accounts]]
    name = "sim-chat"
    pool = "main"
    provider = "openai-chat"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["chat-only"]

    [[accounts]]
    name = "sim-responses"
    pool = "main"
    provider = "openai-responses"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["responses-only"]
    """
)

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]


@pytest.fixture(scope="module")
def state_relay(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """Keeps at most 4 responses per key."""
    with running_relay(
        tmp_path_factory.mktemp("state"), sim.url, body=BODY, responses_store_max=4
    ) as server:
        yield server


def client_for(relay: Relay, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=relay.url + "/v1", api_key=key or relay.key(), max_retries=0
    )


def upstream_body(sim: Sim, marker: str, path_end: str = "/chat/completions") -> dict:
    """The body of the last upstream request that holds ``marker``."""
    for record in reversed(sim.requests()):
        if record["path"].endswith(path_end) and marker in json.dumps(record["body"]):
            return record["body"]
    raise AssertionError(f"no upstream request holds {marker!r}")


def upstream_count(sim: Sim, marker: str) -> int:
    return sum(marker in json.dumps(record["body"]) for record in sim.requests())


def chat_turns(body: dict) -> list[tuple[str, str]]:
    """A Chat body's messages as (role, text) pairs (tool calls as ``call:NAME``)."""
    turns = []
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        turns.append((message["role"], content or ""))
        for call in message.get("tool_calls") or ():
            turns.append((message["role"], "call:" + call["function"]["name"]))
    return turns


def marker() -> str:
    return "m" + uuid.uuid4().hex[:10]


# -- previous_response_id ----------------------------------------------------------------------


def test_previous_response_id_over_a_chat_upstream_sends_the_earlier_answer(
    state_relay: Relay, sim: Sim
) -> None:
    client, tag = client_for(state_relay), marker()
    first = client.responses.create(
        model="chat-only", instructions="Be brief.", input=f"{tag} #sim text=Paris tokens=3"
    )
    assert first.output_text == "Paris Paris Paris"
    assert first.store is True
    second = client.responses.create(
        model="chat-only", previous_response_id=first.id, input=f"{tag} and then?"
    )
    assert second.previous_response_id == first.id
    # The instructions are not carried over (as OpenAI does); the earlier turn is.
    assert chat_turns(upstream_body(sim, f"{tag} and then?")) == [
        ("user", f"{tag} #sim text=Paris tokens=3"),
        ("assistant", "Paris Paris Paris"),
        ("user", f"{tag} and then?"),
    ]


def test_a_streamed_chain_of_three_turns_reaches_the_upstream_whole(
    state_relay: Relay, sim: Sim
) -> None:
    client, tag = client_for(state_relay), marker()
    previous = None
    answers = []
    for turn, word in enumerate(("Alpha", "Beta", "Gamma")):
        extra = {"previous_response_id": previous} if previous else {}
        with client.responses.stream(
            model="chat-only", input=f"{tag} turn {turn} #sim text={word} tokens=2", **extra
        ) as stream:
            final = stream.get_final_response()
        answers.append(final.output_text)
        previous = final.id
    assert answers == ["Alpha Alpha", "Beta Beta", "Gamma Gamma"]
    assert chat_turns(upstream_body(sim, f"{tag} turn 2")) == [
        ("user", f"{tag} turn 0 #sim text=Alpha tokens=2"),
        ("assistant", "Alpha Alpha"),
        ("user", f"{tag} turn 1 #sim text=Beta tokens=2"),
        ("assistant", "Beta Beta"),
        ("user", f"{tag} turn 2 #sim text=Gamma tokens=2"),
    ]


def test_an_unknown_previous_response_id_is_a_400_naming_it(state_relay: Relay, sim: Sim) -> None:
    client, tag = client_for(state_relay), marker()
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="chat-only", previous_response_id="resp_nowhere123", input=f"{tag} hi"
        )
    error = caught.value.body
    assert error["code"] == "previous_response_not_found"
    assert error["param"] == "previous_response_id"
    assert "resp_nowhere123" in error["message"]
    assert upstream_count(sim, tag) == 0  # refused before any upstream call


def test_a_continued_conversation_is_estimated_whole(state_relay: Relay) -> None:
    """The guards and the credit hold reserve by what the upstream will read: the whole
    conversation, not the few words of the body. Seen in the usage row of a stream the client
    leaves before the upstream reported usage (billed by the estimate)."""
    key = state_relay.key()
    long_input = "word " * 1000 + "#sim tokens=1"  # about 1,250 tokens
    first = client_for(state_relay, key).responses.create(model="chat-only", input=long_input)
    body = {
        "model": "chat-only", "previous_response_id": first.id, "stream": True,
        "input": "go on #sim tokens=200 delay=0.05",
    }
    with httpx2.stream(
        "POST", state_relay.url + "/v1/responses", json=body, timeout=10,
        headers={"authorization": f"Bearer {key}"},
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            if b"output_text.delta" in chunk:
                break
        request_id = response.headers["x-request-id"]
    row = state_relay.usage_row(request_id)
    assert row["usage_source"] == "estimate"
    assert row["input_tokens"] >= 1200


# -- item_reference ----------------------------------------------------------------------------


def test_item_references_over_a_chat_upstream_are_written_out(
    state_relay: Relay, sim: Sim
) -> None:
    client, tag = client_for(state_relay), marker()
    prompt = f'{tag} weather? #sim tool=get_weather args={{"city":"Paris"}} text=Looking tokens=2'
    first = client.responses.create(model="chat-only", input=prompt, tools=TOOLS)
    message, call = first.output
    assert (message.type, call.type) == ("message", "function_call")
    second = client.responses.create(
        model="chat-only",
        tools=TOOLS,
        input=[
            {"role": "user", "content": prompt},
            {"type": "item_reference", "id": message.id},
            {"type": "item_reference", "id": call.id},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    assert second.output_text
    body = upstream_body(sim, '"sunny"')
    assert chat_turns(body) == [
        ("user", prompt),
        ("assistant", "Looking Looking"),
        ("assistant", "call:get_weather"),
        ("tool", "sunny"),
    ]
    assert body["messages"][1]["tool_calls"][0]["id"] == call.call_id


def test_an_unknown_item_reference_is_a_400_naming_it(state_relay: Relay, sim: Sim) -> None:
    client, tag = client_for(state_relay), marker()
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="chat-only",
            input=[
                {"role": "user", "content": f"{tag} hi"},
                {"type": "item_reference", "id": "msg_never_made"},
            ],
        )
    error = caught.value.body
    assert error["code"] == "item_not_found"
    assert error["param"] == "input[1].id"
    assert "msg_never_made" in error["message"]
    assert upstream_count(sim, tag) == 0


# -- what is kept ------------------------------------------------------------------------------


def test_store_false_keeps_nothing(state_relay: Relay) -> None:
    client = client_for(state_relay, state_relay.create_key())
    kept = state_relay.state()["responses_kept"]
    first = client.responses.create(model="chat-only", input="hi #sim tokens=1", store=False)
    assert first.store is False
    with client.responses.stream(model="chat-only", input="hi #sim tokens=1", store=False) as s:
        assert s.get_final_response().store is False
    assert state_relay.state()["responses_kept"] == kept
    client.responses.create(model="chat-only", input="hi #sim tokens=1")
    assert state_relay.state()["responses_kept"] == kept + 1
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match=first.id):
        client.responses.create(model="chat-only", previous_response_id=first.id, input="more")


def test_get_input_items_and_delete_a_kept_response(state_relay: Relay) -> None:
    client = client_for(state_relay)
    first = client.responses.create(model="chat-only", input="one #sim text=Uno tokens=1")
    second = client.responses.create(
        model="chat-only", previous_response_id=first.id, input="two #sim text=Dos tokens=1",
        stream=False,
    )
    kept = client.responses.retrieve(second.id)
    assert (kept.id, kept.output_text, kept.previous_response_id) == (second.id, "Dos", first.id)
    items = client.responses.input_items.list(second.id, order="asc")
    texts = [
        "".join(getattr(part, "text", "") for part in item.content) for item in items.data
    ]
    assert texts == ["one #sim text=Uno tokens=1", "Uno", "two #sim text=Dos tokens=1"]
    deleted = client.responses.delete(second.id)
    assert deleted is None  # the SDK returns nothing on success
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(second.id)
    assert caught.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(second.id)
    assert client.responses.retrieve(first.id).output_text == "Uno"


def test_delete_answers_in_openai_shape(state_relay: Relay) -> None:
    key = state_relay.key()
    client = client_for(state_relay, key)
    first = client.responses.create(model="chat-only", input="x #sim tokens=1")
    response = httpx2.delete(
        f"{state_relay.url}/v1/responses/{first.id}", headers={"authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200
    assert response.json() == {"id": first.id, "object": "response", "deleted": True}


def test_a_key_never_reads_another_keys_responses(state_relay: Relay, sim: Sim) -> None:
    owner = client_for(state_relay, state_relay.create_key())
    other = client_for(state_relay, state_relay.create_key())
    first = owner.responses.create(model="chat-only", input="secret #sim text=Hidden tokens=1")
    message = first.output[0]
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(first.id)
    with pytest.raises(openai.BadRequestError, match=first.id):
        other.responses.create(model="chat-only", previous_response_id=first.id, input="leak?")
    with pytest.raises(openai.BadRequestError, match=message.id):
        other.responses.create(
            model="chat-only",
            input=[{"role": "user", "content": "leak?"},
                   {"type": "item_reference", "id": message.id}],
        )
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(first.id)
    assert owner.responses.retrieve(first.id).output_text == "Hidden"


def test_a_key_keeps_its_newest_responses_up_to_the_bound(state_relay: Relay) -> None:
    client = client_for(state_relay, state_relay.create_key())
    ids = [
        client.responses.create(model="chat-only", input=f"n{i} #sim tokens=1").id
        for i in range(5)
    ]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])  # responses_store_max = 4: the oldest went
    assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


def test_kept_responses_expire(sim: Sim, tmp_path: Path) -> None:
    with running_relay(tmp_path, sim.url, body=BODY, responses_store_ttl_s=1.0) as relay:
        client = client_for(relay)
        first = client.responses.create(model="chat-only", input="soon gone #sim tokens=1")
        assert client.responses.retrieve(first.id).id == first.id
        time.sleep(1.3)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(first.id)
        with pytest.raises(openai.BadRequestError, match=first.id):
            client.responses.create(
                model="chat-only", previous_response_id=first.id, input="still there?"
            )


# -- Responses upstreams -----------------------------------------------------------------------


def test_a_responses_upstream_gets_its_own_references_untouched(
    state_relay: Relay, sim: Sim
) -> None:
    client, tag = client_for(state_relay), marker()
    first = client.responses.create(model="responses-only", input=f"{tag} first #sim tokens=1")
    # Kept by the relay too (GET), though the upstream stores it itself.
    assert client.responses.retrieve(first.id).id == first.id
    message_id = first.output[-1].id
    client.responses.create(
        model="responses-only",
        previous_response_id=first.id,
        input=[
            {"role": "user", "content": f"{tag} second"},
            {"type": "item_reference", "id": message_id},
        ],
    )
    body = upstream_body(sim, f"{tag} second", "/responses")
    assert body["previous_response_id"] == first.id
    assert body["input"] == [
        {"role": "user", "content": f"{tag} second"},
        {"type": "item_reference", "id": message_id},
    ]


def test_a_relayed_stream_is_kept_as_its_last_event_said(state_relay: Relay) -> None:
    client = client_for(state_relay)
    with client.responses.stream(
        model="responses-only", input="relayed #sim text=Kept tokens=2"
    ) as stream:
        final = stream.get_final_response()
    kept = client.responses.retrieve(final.id)
    assert (kept.id, kept.output_text) == (final.id, "Kept Kept")


def test_an_answer_the_relay_translated_is_written_out_for_a_responses_upstream(
    state_relay: Relay, sim: Sim
) -> None:
    """A conversation that moves from a Chat-only model to a Responses upstream: the upstream
    never saw the relay's ids, so the relay writes them out (without ids)."""
    client, tag = client_for(state_relay), marker()
    first = client.responses.create(model="chat-only", input=f"{tag} one #sim text=Ein tokens=2")
    client.responses.create(
        model="responses-only", previous_response_id=first.id, input=f"{tag} two"
    )
    body = upstream_body(sim, f"{tag} two", "/responses")
    assert "previous_response_id" not in body
    assert [item.get("role") for item in body["input"]] == ["user", "assistant", "user"]
    assert body["input"][1]["content"][0]["text"] == "Ein Ein"
    assert "id" not in body["input"][1]


# -- shared through Redis ----------------------------------------------------------------------


def test_responses_are_shared_by_the_processes_through_redis(
    sim: Sim, redis_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    database = tmp_path / "shared.db"
    relays = [
        start_relay(tmp_path / f"p{i}", sim.url, body=BODY, database=database,
                    redis_url=redis_url)
        for i in range(2)
        if (tmp_path / f"p{i}").mkdir() is None
    ]
    try:
        key = relays[0].create_key()
        one, two = (client_for(relay, key) for relay in relays)
        tag = marker()
        first = one.responses.create(model="chat-only", input=f"{tag} a #sim text=Shared tokens=2")
        second = two.responses.create(
            model="chat-only", previous_response_id=first.id, input=f"{tag} b"
        )
        assert chat_turns(upstream_body(sim, f"{tag} b"))[1] == ("assistant", "Shared Shared")
        assert one.responses.retrieve(second.id).id == second.id
        # Deleted on one process, gone for the other, though it kept it in its memory.
        two.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            one.responses.retrieve(first.id)
        assert b"rs:" in redis_server.command("KEYS", "relay:rs:*")
    finally:
        for relay in relays:
            log = relay.process.stop()
            assert "Traceback" not in log, log


# -- the Vercel AI SDK -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "stream"])
def test_vercel_ai_sdk_tool_loop_over_a_chat_upstream(
    state_relay: Relay, sim: Sim, mode: str, ai_sdk_run: dict
) -> None:
    """``ai`` + ``@ai-sdk/openai``'s Responses provider, ``store`` at its default, in a
    two-step tool loop (``generateText`` and ``streamText``): its second step sends the first
    step's text as an ``item_reference``, which the Chat upstream receives written out."""
    tag, seen = ai_sdk_run["tag"], ai_sdk_run[mode]
    assert seen["steps"] == 2
    assert seen["toolCalls"] == [{"toolName": "get_weather", "input": {"city": "Paris"}}]
    assert seen["text"] == "Checking Checking"
    assert seen["store"] == [None, None]  # left at its default
    first_text_id = seen["references"][1][0]
    assert first_text_id.startswith("msg_") and seen["references"][0] == []
    prompt = f'{tag}-{mode} #sim tool=get_weather args={{"city":"Paris"}} text=Checking tokens=2'
    second = upstream_body(sim, f"{tag}-{mode}", "/chat/completions")
    assert chat_turns(second) == [
        ("user", prompt),
        ("assistant", "Checking Checking"),
        ("assistant", "call:get_weather"),
        ("tool", "sunny in Paris"),
    ]


@pytest.fixture(scope="module")
def ai_sdk_run(state_relay: Relay) -> dict:
    """One run of tests/node/ai_sdk_check.mjs against the relay's Chat-only model."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@ai-sdk" / "openai").exists():
        pytest.fail("node and the npm 'ai' and '@ai-sdk/openai' packages are needed: scripts/test")
    tag = marker()
    done = subprocess.run(
        [node, "ai_sdk_check.mjs", state_relay.url + "/v1", state_relay.key(), "chat-only", tag],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return {"tag": tag, **json.loads(done.stdout)}
