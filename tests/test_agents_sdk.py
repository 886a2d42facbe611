"""The OpenAI Agents SDK's WebSocket model (``OpenAIResponsesWSModel``, which never falls back to
HTTP) runs an agent turn with a tool through the relay, over a Chat-only upstream."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest
from agents import Agent, OpenAIResponsesWSModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

from .conftest import Relay, Sim, running_relay
from .test_codex_cli import CHAT_ONLY, _key_access_lines, _key_with_id


@pytest.fixture(scope="module")
def chat_only(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    set_tracing_disabled(True)  # the SDK would try to send traces to OpenAI
    with running_relay(tmp_path_factory.mktemp("agents"), sim.url, body=CHAT_ONLY) as server:
        yield server


def test_agents_sdk_websocket_model_runs_a_tool_turn(chat_only: Relay, sim: Sim) -> None:
    key, key_id = _key_with_id(chat_only)
    marker = f"agents-ws-{uuid.uuid4().hex[:8]}"
    called: list[str] = []

    @function_tool
    def lookup_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return f"sunny in {city}"

    async def run() -> str:
        client = AsyncOpenAI(base_url=chat_only.url + "/v1", api_key=key, max_retries=0)
        model = OpenAIResponsesWSModel("deepseek-chat", client)
        agent = Agent(name="weather", instructions="Answer briefly.", model=model,
                      tools=[lookup_weather])
        try:
            result = await Runner.run(
                agent,
                f'{marker} Weather in Paris? #sim tool=lookup_weather args={{"city":"Paris"}} '
                "tokens=2 text=done",
            )
        finally:
            await model.close()
            await client.close()
        return result.final_output

    assert asyncio.run(run()) == "done done"
    assert called == ["Paris"]
    lines = _key_access_lines(chat_only, key_id, 2)
    assert [line["status"] for line in lines if line["method"] == "GET"] == ["101"]
    assert [line["status"] for line in lines if line["method"] == "POST"] == ["200", "200"]
    turn = [r for r in sim.requests() if marker in json.dumps(r["body"])]
    assert [r["path"] for r in turn] == ["/v1/chat/completions"] * 2
    tool_result = [m for m in turn[1]["body"]["messages"] if m["role"] == "tool"]
    assert len(tool_result) == 1 and "sunny in Paris" in json.dumps(tool_result[0])
