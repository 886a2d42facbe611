"""The real Claude Code CLI (2.1.337) against the simulated Anthropic upstream directly, no relay:
the simulated upstream takes what Claude Code sends and answers so that Claude Code can use it,
in a plain answer and in a turn where the model calls Claude Code's Read tool.

The same :func:`tests.claude_code.run_claude` runs it against the relay (base URL the relay's,
token a relay key, ``sim_url`` the upstream's to see what the relay sent on)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from .claude_code import CLAUDE, MODEL, run_claude
from .conftest import SIM_KEY, Relay, Sim, running_relay


def test_claude_code_version_is_the_pinned_one() -> None:
    done = subprocess.run([str(CLAUDE), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "2.1.337"


@pytest.mark.parametrize("auth", ["auth_token", "api_key"])
def test_claude_code_prints_the_answer(tmp_path: Path, sim: Sim, auth: str) -> None:
    run = run_claude(
        sim.url, SIM_KEY, "Say pong. #sim tokens=3 text=pong", tmp_path, sim_url=sim.url, auth=auth
    )
    assert run.returncode == 0, run.describe()
    assert run.output["result"] == "pong pong pong" and run.output["is_error"] is False

    (request,) = run.requests  # nothing but the one Messages call (no HEAD /, no telemetry)
    assert request["method"] == "POST" and request["path"] == "/v1/messages?beta=true"
    assert request["query"] == "beta=true" and request["status"] == 200
    headers = request["headers"]
    if auth == "auth_token":
        assert headers["authorization"] == f"Bearer {SIM_KEY}" and "x-api-key" not in headers
    else:
        assert headers["x-api-key"] == SIM_KEY and "authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"
    assert "claude-code-20250219" in headers["anthropic-beta"].split(",")
    assert headers["x-app"] == "cli"
    assert headers["user-agent"].startswith("claude-cli/2.1.337 ")

    body = request["body"]
    assert body["model"] == MODEL and body["stream"] is True
    assert isinstance(body["max_tokens"], int) and body["max_tokens"] > 0
    assert body["thinking"]["type"] == "adaptive"
    assert "effort" in body["output_config"]
    assert isinstance(body["context_management"]["edits"], list)
    user_id = json.loads(body["metadata"]["user_id"])  # a JSON object in a string
    assert user_id["session_id"] == headers["x-claude-code-session-id"]
    assert any("cache_control" in block for block in body["system"])
    assert {"Read", "Bash", "Edit", "Write"} <= {tool["name"] for tool in body["tools"]}
    assert body["messages"][0]["role"] == "user"


@pytest.mark.parametrize("model", [MODEL, "claude-opus-4-8"])
def test_claude_code_reads_a_file_through_a_tool_call(tmp_path: Path, sim: Sim, model: str) -> None:
    note = tmp_path / "note.txt"
    note.write_text("the secret word is avocado\n")
    args = json.dumps({"file_path": str(note)}, separators=(",", ":"))
    # The directive stays in the prompt for every turn; the sim spends the tool call once the
    # tool's result has come back, so the second request is answered with text.
    prompt = f"Read note.txt and answer. #sim tool=Read args={args} tokens=2 text=done"
    run = run_claude(sim.url, SIM_KEY, prompt, tmp_path, sim_url=sim.url, model=model)
    assert run.returncode == 0, run.describe()
    assert run.output["result"] == "done done" and run.output["num_turns"] == 2

    first, second = run.messages_requests
    assert first["status"] == second["status"] == 200
    assert first["headers"]["x-claude-code-session-id"] == (
        second["headers"]["x-claude-code-session-id"]
    )
    # The second request replays the call and carries Read's result for it.
    turns = second["body"]["messages"]
    roles = [m["role"] for m in turns]
    if model == "claude-opus-4-8":
        # For Opus 4.8 it sends mid-conversation system messages, one after each user turn.
        assert roles == ["user", "system", "assistant", "user", "system"]
    else:
        assert roles == ["user", "assistant", "user"]
    *_, call_turn, result_turn = [m for m in turns if m["role"] != "system"]
    assert call_turn["role"] == "assistant"
    (tool_use,) = [b for b in call_turn["content"] if b["type"] == "tool_use"]
    assert tool_use["name"] == "Read" and tool_use["input"] == {"file_path": str(note)}
    assert tool_use["id"].startswith("toolu_")
    assert result_turn["role"] == "user"
    result = result_turn["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == tool_use["id"]
    text = result["content"] if isinstance(result["content"], str) else json.dumps(result)
    assert "the secret word is avocado" in text
    assert not result.get("is_error")


# --------------------------------------------------------------------------------------------
# Through the relay: an Anthropic account (relayed), a Responses and a Chat account (translated,
# the Claude ids mapped by pattern aliases, as an operator serving Claude Code from GPT or
# DeepSeek accounts writes them).

RELAY_CONFIG = """
[pools.p]

[packages.team]
pool = "p"

[[accounts]]
name = "anthropic"
pool = "p"
provider = "anthropic"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["claude-sonnet-4-6"]

[[accounts]]
name = "responses"
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

[models."claude-opus-*"]
target = "gpt-5.5"

[models."claude-haiku-*"]
target = "deepseek-chat"
"""

#: Claude Code's model → the account that serves it through the relay.
THROUGH = {
    "claude-sonnet-4-6": "anthropic",
    "claude-opus-4-8": "responses",  # Opus 4.8 also gets mid-conversation system messages
    "claude-haiku-4-5": "chat",
}


@pytest.fixture(scope="module")
def claude_relay(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    tmp = tmp_path_factory.mktemp("claude-relay")
    with running_relay(tmp, sim.url, body=RELAY_CONFIG) as server:
        yield server


@pytest.mark.parametrize("model", list(THROUGH))
def test_claude_code_through_the_relay_answers(
    tmp_path: Path, sim: Sim, claude_relay: Relay, model: str
) -> None:
    key = claude_relay.key()
    marker = f"cc-plain-{model}"
    run = run_claude(
        claude_relay.url, key, f"Say pong. {marker} #sim tokens=3 text=pong", tmp_path,
        sim_url=sim.url, model=model,
    )
    assert run.returncode == 0, run.describe()
    assert run.output["result"] == "pong pong pong" and run.output["is_error"] is False
    (upstream,) = [r for r in run.requests if marker in json.dumps(r["body"])]
    account = THROUGH[model]
    expected_path = {"anthropic": "/v1/messages", "responses": "/v1/responses",
                     "chat": "/v1/chat/completions"}[account]
    assert upstream["path"].partition("?")[0] == expected_path
    # The upstream got the relay's credential, never the client's key.
    assert key not in json.dumps(upstream["headers"])
    if account == "anthropic":
        assert "claude-code-20250219" in upstream["headers"]["anthropic-beta"].split(",")
        assert upstream["body"]["context_management"]  # relayed natively, kept
    deadline = time.monotonic() + 5
    while not (rows := [r for r in claude_relay.usage_rows()  # newest first
                        if r["account"] == account and r["model"] == model]):
        assert time.monotonic() < deadline, "no usage row for the run"
        time.sleep(0.05)
    row = rows[0]
    assert (row["status"], row["endpoint"], row["stream"]) == (200, "messages", 1)
    assert row["output_tokens"] == 3


@pytest.mark.parametrize("model", list(THROUGH))
def test_claude_code_through_the_relay_reads_a_file(
    tmp_path: Path, sim: Sim, claude_relay: Relay, model: str
) -> None:
    note = tmp_path / "note.txt"
    note.write_text("the secret word is avocado\n")
    args = json.dumps({"file_path": str(note)}, separators=(",", ":"))
    marker = f"cc-tool-{model}"
    prompt = f"Read note.txt and answer. {marker} #sim tool=Read args={args} tokens=2 text=done"
    run = run_claude(claude_relay.url, claude_relay.key(), prompt, tmp_path,
                     sim_url=sim.url, model=model)
    assert run.returncode == 0, run.describe()
    assert run.output["result"] == "done done" and run.output["num_turns"] == 2
    first, second = [r for r in run.requests if marker in json.dumps(r["body"])]
    # The second upstream request carries Read's result, in the upstream's own protocol.
    assert "the secret word is avocado" in json.dumps(second["body"])
    assert "the secret word is avocado" not in json.dumps(first["body"])
    state = claude_relay.wait_idle()
    assert state["admission"]["total"] == 0


def test_claude_code_stops_at_once_on_a_bad_relay_key(
    tmp_path: Path, claude_relay: Relay
) -> None:
    """Claude Code retries a 401 for minutes; to it the relay answers a refused key with a 403
    permission_error, which it treats as final: one request, the relay's message, exit 1."""
    def refused() -> int:
        log = claude_relay.process.log.read_text()
        return sum("path=/v1/messages" in line and "status=403" in line
                   for line in log.splitlines())

    before = refused()
    started = time.monotonic()
    run = run_claude(claude_relay.url, "cr_not_a_key_of_this_relay", "hello", tmp_path)
    assert run.returncode == 1, run.describe()
    assert run.output["is_error"] is True and run.output["api_error_status"] == 403
    assert "Incorrect API key provided" in run.output["result"]
    assert time.monotonic() - started < 30  # no retries with backoff
    time.sleep(0.2)  # the access line is written when the request ends
    assert refused() - before == 1
    # Other clients keep Anthropic's 401 (the SDKs raise AuthenticationError on it).
    plain = httpx2.post(claude_relay.url + "/v1/messages", headers={"x-api-key": "cr_no"},
                        json={"model": "claude-sonnet-4-6", "max_tokens": 5,
                              "messages": [{"role": "user", "content": "hi"}]})
    assert plain.status_code == 401
    assert plain.json()["error"]["type"] == "authentication_error"
