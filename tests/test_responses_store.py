"""The pure side of Responses state (relay/protocol/state.py: what a reference is written out
as, for each upstream kind) and the store of kept answers (relay/ledger/responses_store.py:
per key, bounded in count and age; in memory, and in a real Redis shared by two stores)."""

from __future__ import annotations

import pytest
import trio

from relay.errors import InvalidRequest
from relay.guards.shared import SharedGuards
from relay.ledger.responses_store import ResponsesStore
from relay.protocol.state import Found, StoredItem, StoredResponse, conversation, expand

from .conftest import RedisServer


def answer(response_id: str, text: str, *, inputs: list | None = None,
           translated: bool = True) -> StoredResponse:
    message = {
        "id": f"msg_{response_id}", "type": "message", "status": "completed",
        "role": "assistant", "content": [{"type": "output_text", "text": text}],
    }
    response = {"id": response_id, "object": "response", "status": "completed",
                "output": [message]}
    if inputs is None:
        inputs = [{"type": "message", "role": "user", "content": f"asked {response_id}"}]
    return StoredResponse(response, inputs, translated)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- expand -----------------------------------------------------------------------------------


def test_previous_response_id_becomes_the_conversation_for_a_stateless_upstream() -> None:
    kept = answer("resp_a", "Hello")
    body = {"model": "m", "previous_response_id": "resp_a", "input": "and you?"}
    out = expand(body, Found(previous=kept, items={}), "openai-chat")
    assert "previous_response_id" not in out
    assert out["input"] == [
        {"type": "message", "role": "user", "content": "asked resp_a"},
        # Without the fields only the store that made the item knows.
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello"}]},
        {"type": "message", "role": "user", "content": "and you?"},
    ]
    assert body["previous_response_id"] == "resp_a"  # the client's body is left as it was


def test_a_stateful_upstream_gets_what_it_made_untouched() -> None:
    theirs = answer("resp_up", "Upstream's", translated=False)
    body = {
        "model": "m", "previous_response_id": "resp_up",
        "input": [{"type": "item_reference", "id": "msg_up"},
                  {"type": "item_reference", "id": "msg_unknown"}],
    }
    found = Found(previous=theirs, items={"msg_up": StoredItem(theirs.output[0], False)})
    assert expand(body, found, "openai-responses") is body
    short = {"model": "m", "previous_response_id": "resp_up", "input": "go on"}
    assert expand(short, found, "openai-responses") is short
    assert expand({"model": "m", "input": "hi"}, Found(), "openai-chat") == {
        "model": "m", "input": "hi"
    }


def test_a_stateful_upstream_gets_the_relays_own_ids_written_out() -> None:
    ours = answer("resp_ours", "Ours")
    body = {"model": "m", "input": [{"type": "item_reference", "id": "msg_resp_ours"},
                                    {"type": "item_reference", "id": "msg_theirs"}]}
    found = Found(items={"msg_resp_ours": StoredItem(ours.output[0], True)})
    out = expand(body, found, "openai-responses")
    assert out["input"][0]["content"][0]["text"] == "Ours" and "id" not in out["input"][0]
    assert out["input"][1] == {"type": "item_reference", "id": "msg_theirs"}


def test_a_conversation_the_relay_does_not_hold_whole_cannot_continue_translated() -> None:
    partial = StoredResponse(answer("resp_p", "x").response, None, translated=False)
    body = {"model": "m", "previous_response_id": "resp_p", "input": "more"}
    with pytest.raises(InvalidRequest, match="resp_p") as caught:
        expand(body, Found(previous=partial), "anthropic")
    assert caught.value.code == "previous_response_not_found"
    assert conversation(body, Found(previous=partial)) is None


# -- the store in memory ----------------------------------------------------------------------


async def test_the_store_keeps_a_keys_newest_answers_within_the_count() -> None:
    store = ResponsesStore(max_per_key=2, ttl_s=60, clock=Clock())
    for name in ("resp_1", "resp_2", "resp_3"):
        await store.put("key-a", answer(name, name))
    assert await store.get("key-a", "resp_1") is None
    assert [(await store.get("key-a", n)).id for n in ("resp_2", "resp_3")] == [
        "resp_2", "resp_3"
    ]
    assert len(store) == 2


async def test_the_store_forgets_answers_past_their_age() -> None:
    clock = Clock()
    store = ResponsesStore(max_per_key=10, ttl_s=5, clock=clock)
    await store.put("key-a", answer("resp_1", "old"))
    clock.now += 4
    await store.put("key-a", answer("resp_2", "new"))
    clock.now += 2  # resp_1 is 6 s old, resp_2 2 s
    assert await store.get("key-a", "resp_1") is None
    assert (await store.get("key-a", "resp_2")).id == "resp_2"
    clock.now += 10
    store.sweep()
    assert len(store) == 0


async def test_an_item_outlives_its_answer_in_a_newer_answer_that_holds_it() -> None:
    store = ResponsesStore(max_per_key=1, ttl_s=60, clock=Clock())
    first = answer("resp_1", "one")
    await store.put("key-a", first)
    # The next turn's conversation holds the first answer's message (same object, as the
    # relay builds it): the first answer may go, its message stays findable.
    await store.put("key-a", answer("resp_2", "two", inputs=[*first.input, *first.output]))
    found = await store.find("key-a", None, ["msg_resp_1", "msg_resp_2"])
    assert sorted(found.items) == ["msg_resp_1", "msg_resp_2"]
    assert found.items["msg_resp_1"].item["content"][0]["text"] == "one"


async def test_the_store_never_answers_one_key_with_anothers() -> None:
    store = ResponsesStore(max_per_key=10, ttl_s=60, clock=Clock())
    await store.put("key-a", answer("resp_1", "a's"))
    found = await store.find("key-b", "resp_1", ["msg_resp_1"])
    assert found.previous is None and not found.items
    assert not await store.delete("key-b", "resp_1")
    assert await store.delete("key-a", "resp_1")
    assert await store.get("key-a", "resp_1") is None


# -- the store shared through Redis ------------------------------------------------------------


async def test_redis_decides_while_it_answers_and_memory_while_it_does_not(
    redis_url: str, redis_server: RedisServer
) -> None:
    shared = SharedGuards(redis_url)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(shared.run)
            here = ResponsesStore(max_per_key=10, ttl_s=60, shared=shared)
            there = ResponsesStore(max_per_key=10, ttl_s=60, shared=shared)  # another process
            await here.put("key-a", answer("resp_1", "one"))
            await here.put("key-a", answer("resp_2", "two"))
            assert len(there) == 0
            assert (await there.get("key-a", "resp_1")).output[0]["content"][0]["text"] == "one"
            found = await there.find("key-a", None, ["msg_resp_2"])
            assert found.items["msg_resp_2"].translated
            assert await there.get("key-b", "resp_1") is None
            # Deleted by the other process: gone here too, though this one still holds it.
            assert await there.delete("key-a", "resp_1")
            assert await here.get("key-a", "resp_1") is None
            redis_server.stop()
            assert (await here.get("key-a", "resp_2")).id == "resp_2"  # from memory
            assert await there.get("key-a", "resp_2") is None  # it never held it
            nursery.cancel_scope.cancel()
    finally:
        redis_server.start()


async def test_redis_holds_the_bounds_too(redis_url: str) -> None:
    shared = SharedGuards(redis_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(shared.run)
        here = ResponsesStore(max_per_key=2, ttl_s=0.3, shared=shared)
        there = ResponsesStore(max_per_key=2, ttl_s=0.3, shared=shared)
        for name in ("resp_1", "resp_2", "resp_3"):
            await here.put("key-a", answer(name, name))
        assert await there.get("key-a", "resp_1") is None  # over the count: the oldest went
        assert (await there.get("key-a", "resp_3")).id == "resp_3"
        await trio.sleep(0.4)
        assert await there.get("key-a", "resp_3") is None  # past its age
        # An upstream's answer may carry a lone surrogate (a JSON escape): kept, Redis still up.
        await here.put("key-a", answer("resp_s", "odd \ud800 text"))
        kept = await there.get("key-a", "resp_s")
        assert kept.output[0]["content"][0]["text"] == "odd \ud800 text"
        assert not shared.degraded
        nursery.cancel_scope.cancel()
