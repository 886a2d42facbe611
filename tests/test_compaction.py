"""Remote compaction (the Codex CLI's, protocols.md §2.10) through the relay, in both forms:
``POST /v1/responses/compact`` (v1) and a streamed ``/v1/responses`` whose input ends with a
``compaction_trigger`` (v2). A Responses upstream compacts by itself; for a Chat or Anthropic
upstream the relay runs a summary turn and seals the summary in a ``compaction`` item it can
expand on the next turn (relay/protocol/compaction.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from relay.protocol.compaction import (
    PREFIX,
    SUMMARY_HEADING,
    SUMMARY_INSTRUCTION,
    V1,
    V2,
    expand_relay_items,
    form_of,
    seal,
    summary_turn_body,
    unseal,
)

from .conftest import Relay, Sim, running_relay

BODY = """
[pools.p]

[packages.team]
pool = "p"
initial_credits = 1000

[[accounts]]
name = "resp"
pool = "p"
provider = "openai-responses"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["gpt-5.5"]

[[accounts]]
name = "chat"
pool = "p"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat"]

[[accounts]]
name = "claude"
pool = "p"
provider = "anthropic"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["claude-sim"]

[[accounts]]
name = "gemini"
pool = "p"
provider = "gemini"
base_url = "SIM_URL/v1beta"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["gemini-sim"]

[prices.gemini-sim]
input = 1000
output = 2000

[prices."gpt-5.5"]
input = 1000
output = 2000

[prices.deepseek-chat]
input = 1000
output = 2000

[prices.claude-sim]
input = 1000
output = 2000
"""

TOOLS = [
    {
        "type": "function",
        "name": "exec_command",
        "description": "Run a shell command.",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
        "strict": False,
    }
]


@pytest.fixture(scope="module")
def server(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("compaction"), sim.url, body=BODY) as relay:
        yield relay


def history(marker: str) -> list[dict]:
    """A Codex-like conversation: a task, a tool call and its output, an answer."""
    return [
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "<permissions instructions>"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": f"{marker} fix the failing test"}]},
        {"type": "function_call", "call_id": "call_1", "name": "exec_command",
         "arguments": '{"cmd":"pytest -q"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "1 failed: test_x"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "test_x fails on an off-by-one."}]},
    ]


def turn(marker: str, model: str, *, trigger: bool, stream: bool = True) -> dict:
    items = history(marker) + ([{"type": "compaction_trigger"}] if trigger else [])
    return {
        "model": model, "instructions": "You are a coding agent.", "input": items,
        "tools": TOOLS, "tool_choice": "auto", "stream": stream, "store": False,
    }


def sim_requests(sim: Sim, marker: str) -> list[dict]:
    return [r for r in sim.requests() if marker in json.dumps(r["body"])]


def stream_events(relay: Relay, body: dict) -> tuple[str, list[dict]]:
    """POST /v1/responses streamed: the request id and its events' data."""
    with httpx2.stream(
        "POST", relay.url + "/v1/responses", json=body, timeout=30,
        headers={"authorization": f"Bearer {relay.key()}"},
    ) as response:
        assert response.status_code == 200, response.read()
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
        ]
        return response.headers["x-request-id"], events


def compaction_items(events: list[dict]) -> list[dict]:
    return [
        e["item"] for e in events
        if e["type"] == "response.output_item.done" and e["item"]["type"] == "compaction"
    ]


def billed_as_upstream(relay: Relay, request_id: str, upstream: dict) -> dict:
    """The request's usage row, which must hold the tokens the upstream reported, priced."""
    row = relay.usage_row(request_id)
    usage = upstream["usage"]
    assert row["status"] == 200
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage["input_tokens"], usage["output_tokens"]
    )
    assert row["usage_source"] == "upstream"
    expected = (usage["input_tokens"] * 1000 + usage["output_tokens"] * 2000) * 1000
    assert row["cost_nano"] == expected
    return row


# --- The relay's token and the summary turn, without I/O ----------------------------------


def test_a_relay_token_carries_its_summary_and_nothing_else_is_one() -> None:
    summary = "Fix test_x — the off-by-one in range(n) ✓\nnext: run pytest"
    token = seal(summary)
    assert token.startswith(PREFIX) and unseal(token) == summary
    for other in (None, 42, "gAAAAB" + token, PREFIX, PREFIX + "e30", PREFIX + "!!", token[:-3]):
        assert unseal(other) is None, other  # e30 is "{}": no summary in it


def test_the_form_of_a_compaction_request() -> None:
    trigger = {"type": "compaction_trigger"}
    user = {"type": "message", "role": "user", "content": "hi"}
    assert form_of({"input": [user, trigger]}, compact_route=False) == V2
    assert form_of({"input": [trigger, user]}, compact_route=False) is None
    assert form_of({"input": "hi"}, compact_route=False) is None
    assert form_of({"input": [user]}, compact_route=True) == V1


def test_the_summary_turn_keeps_the_history_and_asks_for_a_summary() -> None:
    body = turn("m", "deepseek-chat", trigger=True)
    body["text"] = {"format": {"type": "json_schema", "name": "x", "schema": {}}}
    summary_turn = summary_turn_body(body, V2)
    assert summary_turn["input"][:-1] == history("m")  # the trigger is gone
    assert summary_turn["input"][-1] == {
        "type": "message", "role": "user", "content": SUMMARY_INSTRUCTION}
    assert summary_turn["tools"] == TOOLS and summary_turn["tool_choice"] == "none"
    assert "text" not in summary_turn and summary_turn["stream"] is True
    assert summary_turn_body({**body, "stream": False}, V2)["stream"] is False
    assert summary_turn_body(body, V1)["stream"] is False
    assert body["input"][-1] == {"type": "compaction_trigger"}  # the client's body is intact


def test_relay_items_are_expanded_and_openai_items_kept() -> None:
    ours = {"type": "compaction", "encrypted_content": seal("the summary")}
    theirs = {"type": "compaction_summary", "encrypted_content": "gAAAAB-openai"}
    user = {"type": "message", "role": "user", "content": "go on"}
    assert expand_relay_items([ours, theirs, user]) == [
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": SUMMARY_HEADING + "the summary"}]},
        theirs,
        user,
    ]


# --- A Responses upstream compacts by itself -----------------------------------------------


@pytest.mark.parametrize("base", ["/v1", "/openai", "/codex/v1"])
def test_compact_endpoint_is_relayed_to_a_responses_upstream(
    server: Relay, sim: Sim, base: str
) -> None:
    marker = f"v1-resp-{uuid.uuid4().hex[:8]}"
    client = openai.OpenAI(base_url=server.url + base, api_key=server.key(), max_retries=0)
    raw = client.responses.with_raw_response.compact(
        model="gpt-5.5", input=history(marker), instructions="You are a coding agent."
    )
    compacted = raw.parse()
    assert compacted.object == "response.compaction"
    assert compacted.output[-1].type == "compaction"
    assert compacted.output[-1].encrypted_content.startswith("gAAAA")  # OpenAI's, untouched

    (upstream,) = sim_requests(sim, marker)
    assert upstream["path"] == "/v1/responses/compact"
    assert upstream["body"]["input"] == history(marker)
    assert "stream" not in upstream["body"]
    row = billed_as_upstream(server, raw.headers["x-request-id"], upstream)
    assert (row["endpoint"], row["account"], row["stream"]) == ("responses/compact", "resp", 0)


def test_trigger_is_relayed_to_a_responses_upstream_and_its_item_comes_back(
    server: Relay, sim: Sim
) -> None:
    marker = f"v2-resp-{uuid.uuid4().hex[:8]}"
    request_id, events = stream_events(server, turn(marker, "gpt-5.5", trigger=True))
    (item,) = compaction_items(events)
    assert item["encrypted_content"].startswith("gAAAA")
    assert events[-1]["type"] == "response.completed"
    (upstream,) = sim_requests(sim, marker)
    assert upstream["path"] == "/v1/responses"
    assert upstream["body"]["input"][-1] == {"type": "compaction_trigger"}
    row = billed_as_upstream(server, request_id, upstream)
    assert (row["endpoint"], row["account"]) == ("responses", "resp")

    # The next turn starts from the compaction item: OpenAI's own, so it goes up untouched.
    follow = f"next-{marker}"
    body = {"model": "gpt-5.5", "stream": True, "input": [
        item, {"type": "message", "role": "user", "content": follow}]}
    stream_events(server, body)
    (upstream,) = sim_requests(sim, follow)
    assert upstream["body"]["input"][0] == item


# --- Any other upstream: the relay compacts with a summary turn ----------------------------


@pytest.mark.parametrize(
    ("model", "path"),
    [
        ("deepseek-chat", "/v1/chat/completions"),
        ("claude-sim", "/v1/messages"),
        ("gemini-sim", "/v1beta/models/gemini-sim:streamGenerateContent?alt=sse"),
    ],
)
def test_trigger_on_a_translated_upstream_is_a_summary_turn_sealed_in_one_item(
    server: Relay, sim: Sim, model: str, path: str
) -> None:
    marker = f"v2-{model}-{uuid.uuid4().hex[:8]}"
    request_id, events = stream_events(server, turn(marker, model, trigger=True))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["item"]["type"] for e in added] == ["compaction"]  # nothing else is streamed
    assert not any("delta" in kind for kind in kinds)
    (item,) = compaction_items(events)
    assert item["encrypted_content"].startswith(PREFIX)
    assert events[-1]["response"]["output"] == [item]
    summary = unseal(item["encrypted_content"])
    assert summary and summary.startswith("tok")  # the sim's words

    (upstream,) = sim_requests(sim, marker)
    assert upstream["path"] == path
    sent = json.dumps(upstream["body"])
    assert "compaction_trigger" not in sent
    assert json.dumps(SUMMARY_INSTRUCTION)[1:-1] in sent  # the summary turn's last user words
    assert "test_x fails on an off-by-one." in sent  # with the whole history
    if path.endswith("chat/completions"):
        assert upstream["body"]["tool_choice"] == "none"
        assert upstream["body"]["messages"][-1]["content"] == SUMMARY_INSTRUCTION
    elif path.endswith("messages"):
        assert upstream["body"]["tool_choice"] == {"type": "none"}
    else:
        assert upstream["body"]["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}
    usage = events[-1]["response"]["usage"]
    assert usage["output_tokens"] == upstream["usage"]["output_tokens"]
    row = billed_as_upstream(server, request_id, upstream)
    assert (row["endpoint"], row["stream"]) == ("responses", 1)

    # The next turn carries the item; the upstream gets the summary in its place.
    follow = f"next-{marker}"
    body = {"model": model, "stream": True, "input": [
        item, {"type": "message", "role": "user", "content": follow}]}
    _, events = stream_events(server, body)
    assert events[-1]["type"] == "response.completed"
    (upstream,) = sim_requests(sim, follow)
    assert json.dumps(SUMMARY_HEADING + summary)[1:-1] in json.dumps(upstream["body"])


def test_compact_endpoint_on_a_chat_upstream(server: Relay, sim: Sim) -> None:
    marker = f"v1-chat-{uuid.uuid4().hex[:8]}"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key(), max_retries=0)
    raw = client.responses.with_raw_response.compact(model="deepseek-chat", input=history(marker))
    compacted = raw.parse()
    assert compacted.object == "response.compaction"
    # OpenAI's shape: the request's user messages, then one compaction item.
    *kept, item = compacted.output
    assert [m.role for m in kept] == ["user"]
    assert kept[0].content[0].text == f"{marker} fix the failing test"
    assert item.type == "compaction" and item.encrypted_content.startswith(PREFIX)
    assert unseal(item.encrypted_content).startswith("tok")
    assert compacted.usage.output_tokens > 0

    (upstream,) = sim_requests(sim, marker)
    assert upstream["path"] == "/v1/chat/completions"
    assert upstream["body"].get("stream") is not True
    assert upstream["body"]["messages"][-1]["content"] == SUMMARY_INSTRUCTION
    row = billed_as_upstream(server, raw.headers["x-request-id"], upstream)
    assert (row["endpoint"], row["account"], row["stream"]) == ("responses/compact", "chat", 0)


def test_trigger_without_stream_on_a_chat_upstream_answers_a_response(
    server: Relay, sim: Sim
) -> None:
    marker = f"v2-plain-{uuid.uuid4().hex[:8]}"
    response = httpx2.post(
        server.url + "/v1/responses", json=turn(marker, "deepseek-chat", trigger=True,
                                                stream=False),
        headers={"authorization": f"Bearer {server.key()}"}, timeout=30,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["object"], answer["status"]) == ("response", "completed")
    (item,) = answer["output"]
    assert item["type"] == "compaction" and unseal(item["encrypted_content"])
    (upstream,) = sim_requests(sim, marker)
    assert upstream["body"].get("stream") is not True


@pytest.mark.parametrize("compact_route", [False, True])
def test_an_empty_summary_fails_the_compaction(
    server: Relay, sim: Sim, compact_route: bool
) -> None:
    """An upstream that writes no summary must not compact the conversation to nothing."""
    marker = f"empty-{uuid.uuid4().hex[:8]}"
    profile = sim.http.get("/_sim/profile").json()
    sim.http.post("/_sim/profile", json={"output_tokens": 0}).raise_for_status()
    try:
        if compact_route:
            response = httpx2.post(
                server.url + "/v1/responses/compact", timeout=30,
                json={"model": "deepseek-chat", "input": history(marker)},
                headers={"authorization": f"Bearer {server.key()}"},
            )
            assert response.status_code == 502, response.text
            assert response.json()["error"]["code"] == "compaction_failed"
            request_id = response.headers["x-request-id"]
        else:
            request_id, events = stream_events(server, turn(marker, "deepseek-chat",
                                                            trigger=True))
            assert events[-1]["type"] == "response.failed"
            assert events[-1]["response"]["error"]["code"] == "compaction_failed"
            assert not compaction_items(events)
    finally:
        sim.http.post(
            "/_sim/profile", json={"output_tokens": profile["output_tokens"]}
        ).raise_for_status()
    row = server.usage_row(request_id)
    (upstream,) = sim_requests(sim, marker)
    assert row["input_tokens"] == upstream["usage"]["input_tokens"]  # the turn ran: billed
    assert server.wait_idle()["credits"]["holds"] == 0


def test_relay_item_going_to_a_responses_upstream_is_expanded(server: Relay, sim: Sim) -> None:
    """OpenAI cannot read the relay's token (the sim refuses content it did not make, as
    OpenAI does): a session whose compaction a Chat upstream served, moved to a Responses
    upstream, sends it the summary as a message."""
    marker = f"moved-{uuid.uuid4().hex[:8]}"
    summary = f"The user wants test_x fixed ({marker})."
    body = {"model": "gpt-5.5", "stream": True, "input": [
        {"type": "compaction", "encrypted_content": seal(summary)},
        {"type": "message", "role": "user", "content": "go on"}]}
    _, events = stream_events(server, body)
    assert events[-1]["type"] == "response.completed"
    (upstream,) = sim_requests(sim, marker)
    assert upstream["body"]["input"][0] == {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": SUMMARY_HEADING + summary}],
    }


@pytest.mark.parametrize("content", ["gAAAAB-openai-made", PREFIX + "!!not-base64!!"])
def test_a_compaction_item_the_relay_did_not_make_is_refused_for_a_chat_upstream(
    server: Relay, sim: Sim, content: str
) -> None:
    marker = f"forged-{uuid.uuid4().hex[:8]}"
    before = len(sim.requests())
    response = httpx2.post(
        server.url + "/v1/responses", timeout=10,
        headers={"authorization": f"Bearer {server.key()}"},
        json={"model": "deepseek-chat", "stream": True, "input": [
            {"type": "compaction", "encrypted_content": content},
            {"type": "message", "role": "user", "content": marker}]},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_encrypted_content"
    assert error["param"] == "input[0].encrypted_content"
    assert "did not make" in error["message"]
    assert len(sim.requests()) == before  # refused before any upstream call
    row = server.usage_row(response.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["cost_nano"]) == (
        400, "invalid_encrypted_content", 0
    )
    assert server.wait_idle()["credits"]["holds"] == 0


def test_a_summary_turn_cut_by_the_client_frees_everything(server: Relay, sim: Sim) -> None:
    """A compaction is a request like any other: a client that leaves while the summary turn
    runs cancels the upstream call and leaves no slot or credit hold behind."""
    marker = f"cut-{uuid.uuid4().hex[:8]}"
    profile = sim.http.get("/_sim/profile").json()
    sim.http.post("/_sim/profile", json={"ttft_s": 5}).raise_for_status()
    try:
        with pytest.raises(httpx2.ReadTimeout):
            stream_events_with_timeout(server, turn(marker, "deepseek-chat", trigger=True))
    finally:
        sim.http.post("/_sim/profile", json={"ttft_s": profile["ttft_s"]}).raise_for_status()
    state = server.wait_idle()
    assert state["active_requests"] == 0 and state["credits"]["holds"] == 0
    (upstream,) = sim_requests(sim, marker)
    assert upstream["client_closed"] and not upstream["finished"]


def stream_events_with_timeout(relay: Relay, body: dict) -> None:
    with httpx2.stream(
        "POST", relay.url + "/v1/responses", json=body,
        timeout=httpx2.Timeout(10, read=0.5),
        headers={"authorization": f"Bearer {relay.key()}"},
    ) as response:
        for _ in response.iter_lines():
            pass


# --- The real Codex CLI (npm @openai/codex, installed by scripts/test) ----------------------

CODEX = Path(__file__).parent / "node" / "node_modules" / ".bin" / "codex"


def codex_config(relay: Relay, model: str, websockets: bool = False) -> str:
    """A Codex config that compacts after the first turn: the provider is named ``OpenAI``
    (Codex compacts remotely only for a provider of that name, protocols.md §2.10) and the
    auto-compaction limit is far below what one turn uses."""
    return f"""\
model = "{model}"
model_provider = "relay"
model_auto_compact_token_limit = 500

[model_providers.relay]
name = "OpenAI"
base_url = "{relay.url}/openai"
wire_api = "responses"
experimental_bearer_token = "{relay.key()}"
request_max_retries = 0
stream_max_retries = 0
supports_websockets = {str(websockets).lower()}
"""


def codex_session(
    tmp_path: Path, relay: Relay, model: str, prompts: list[str], websockets: bool = False
) -> list[str]:
    """Run ``codex exec`` with the first prompt, then ``codex exec resume --last`` with each
    next one, in one Codex home and folder; returns each run's output."""
    if not CODEX.exists():
        pytest.fail(f"the Codex CLI is not installed at {CODEX}: run scripts/test")
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(codex_config(relay, model, websockets))
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ, "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
        "NO_COLOR": "1", "RUST_LOG": "error",
    }
    outputs = []
    log_start = len(relay.process.log.read_text())
    for index, prompt in enumerate(prompts):
        resume = ["resume", "--last"] if index else []
        done = subprocess.run(
            [str(CODEX), "exec", "--skip-git-repo-check", *resume, prompt], env=env, cwd=work,
            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ERROR" not in done.stderr, done.stderr  # Codex logs a failed compaction so
        outputs.append(done.stdout)
    deadline = time.monotonic() + 5  # a socket's access line is written when it closes
    while True:
        sockets = relay.process.log.read_text()[log_start:].count(
            "path=/openai/responses model=- served_model=- account=- status=101"
        )
        if sockets >= len(prompts) or not websockets or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sockets == (len(prompts) if websockets else 0)  # one socket per codex exec
    return outputs


@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_codex_compacts_over_a_responses_upstream(
    tmp_path: Path, server: Relay, sim: Sim, websockets: bool
) -> None:
    """Codex 0.169.0 compacts with a compaction_trigger (v2); the Responses upstream compacts
    and the next turn carries its item back. Over HTTP and over the WebSocket alike."""
    marker = f"codex-resp-{uuid.uuid4().hex[:8]}"
    first, second = codex_session(tmp_path, server, "gpt-5.5", [
        f"{marker} say pong. #sim tokens=3 text=pong",
        f"{marker} again. #sim tokens=2 text=again",
    ], websockets)
    assert "pong pong pong" in first and "again again" in second

    turns = sim_requests(sim, marker)
    assert {r["path"] for r in turns} == {"/v1/responses"}
    triggers = [r for r in turns if r["body"]["input"][-1] == {"type": "compaction_trigger"}]
    assert len(triggers) == 1
    assert triggers[0]["headers"]["x-codex-beta-features"] == "remote_compaction_v2"
    after = turns[turns.index(triggers[0]) + 1:]
    assert after, "no turn followed the compaction"
    items = [i for i in after[-1]["body"]["input"] if i.get("type") == "compaction"]
    assert len(items) == 1 and items[0]["encrypted_content"].startswith("gAAAA")
    assert "pong pong pong" not in json.dumps(after[-1]["body"])  # compacted away
    rows = [r for r in server.usage_rows() if r["account"] == "resp"][: len(turns)]
    assert all(r["status"] == 200 and r["output_tokens"] > 0 for r in rows)


@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_codex_compacts_over_a_chat_only_upstream(
    tmp_path: Path, server: Relay, sim: Sim, websockets: bool
) -> None:
    """The same session on a Chat-only upstream: the relay runs the summary turn, Codex gets
    one compaction item, and the next turn reaches the Chat upstream with the summary."""
    marker = f"codex-chat-{uuid.uuid4().hex[:8]}"
    outputs = codex_session(tmp_path, server, "deepseek-chat", [
        f"{marker} say pong. #sim tokens=3 text=pong",
        f"{marker} again. #sim tokens=2 text=again",
        f"{marker} third. #sim tokens=2 text=third",
    ], websockets)
    assert ["pong pong pong" in outputs[0], "again again" in outputs[1]] == [True, True]
    assert "third third" in outputs[2]

    turns = sim_requests(sim, marker)
    assert {r["path"] for r in turns} == {"/v1/chat/completions"}
    summaries = [r for r in turns if r["body"]["messages"][-1]["content"] == SUMMARY_INSTRUCTION]
    assert len(summaries) == 2, [r["body"]["messages"][-1] for r in turns]
    summary_turn = summaries[0]
    assert f"{marker} say pong." in json.dumps(summary_turn["body"])  # the history went along
    # What the sim wrote as the summary reaches the next turn, where the history was.
    words = summary_turn["usage"]["output_tokens"]
    summary = " ".join(["tok"] * words)
    expanded = json.dumps(SUMMARY_HEADING + summary)[1:-1]
    after = turns[turns.index(summary_turn) + 1]
    sent = json.dumps(after["body"])
    assert after["body"]["messages"][-1]["content"] == f"{marker} again. #sim tokens=2 text=again"
    assert expanded in sent
    assert "pong pong pong" not in sent  # the compacted answer is gone; the summary stands in
    # The second compaction summarises a history that holds the first summary.
    assert expanded in json.dumps(summaries[1]["body"])
    rows = server.usage_rows()
    summary_row = next(
        r for r in rows if r["account"] == "chat" and r["output_tokens"] == words
        and r["input_tokens"] == summary_turn["usage"]["input_tokens"]
    )
    assert summary_row["status"] == 200 and summary_row["cost_nano"] > 0
