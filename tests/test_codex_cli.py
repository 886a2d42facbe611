"""The real Codex CLI (npm @openai/codex, installed by scripts/test) against the relay."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from .conftest import Relay, Sim, running_relay
from .test_access_log import text_access_lines

CODEX = Path(__file__).parent / "node" / "node_modules" / ".bin" / "codex"
SESSION_HEADERS = ("session-id", "session_id", "conversation_id", "thread-id")


def codex_home(tmp_path: Path, relay: Relay, base_path: str) -> dict[str, str]:
    home = tmp_path / "home"
    codex_dir = home / ".codex"
    codex_dir.mkdir(parents=True)
    (codex_dir / "config.toml").write_text(
        f"""\
model = "gpt-5.5"
model_provider = "relay"

[model_providers.relay]
name = "relay"
base_url = "{relay.url}{base_path}"
wire_api = "responses"
experimental_bearer_token = "{relay.key()}"
request_max_retries = 0
stream_max_retries = 0
"""
    )
    return {
        **os.environ,
        "HOME": str(home),
        "CODEX_HOME": str(codex_dir),
        "NO_COLOR": "1",
        "RUST_LOG": "error",
    }


def codex_exec(
    tmp_path: Path, env: dict[str, str], *args: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """``codex exec ARGS`` in a fresh working folder; returns the run and the folder."""
    if not CODEX.exists():
        pytest.fail(f"the Codex CLI is not installed at {CODEX}: run scripts/test")
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", *args],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done, work


@pytest.mark.parametrize("base_path", ["/openai", "/v1"])
def test_codex_exec_prints_upstream_answer(
    tmp_path: Path, relay: Relay, sim: Sim, base_path: str
) -> None:
    before = len(sim.requests())
    done, _ = codex_exec(
        tmp_path, codex_home(tmp_path, relay, base_path), "Reply with pong. #sim tokens=3 text=pong"
    )
    assert "pong pong pong" in done.stdout, done.stdout + done.stderr

    upstream = [r for r in sim.requests()[before:] if r["path"].endswith("/responses")]
    assert upstream, "the relay sent nothing upstream"
    request = upstream[-1]
    session = next(
        (request["headers"][name] for name in SESSION_HEADERS if name in request["headers"]),
        None,
    )
    assert session, f"no session header reached the upstream: {sorted(request['headers'])}"
    assert request["body"]["prompt_cache_key"] == session
    assert request["body"]["stream"] is True
    assert request["headers"]["authorization"] == "Bearer sim-upstream-key"


CHAT_ONLY = """
[pools.p]

[packages.team]
pool = "p"

[[accounts]]
name = "deepseek"
pool = "p"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat"]
"""


@pytest.fixture(scope="module")
def chat_only(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("chat-only"), sim.url, body=CHAT_ONLY) as server:
        yield server


def test_codex_runs_a_shell_tool_call_from_a_chat_only_upstream(
    tmp_path: Path, chat_only: Relay, sim: Sim
) -> None:
    """Codex speaks Responses; the only account speaks Chat. The upstream asks for a shell
    command, the CLI runs it, and its output goes back upstream as a Chat tool message."""
    marker = f"tool-turn-{uuid.uuid4().hex[:8]}"
    # \\u0020 keeps the directive's JSON free of spaces (directive pairs split on whitespace).
    command = "echo\\u0020relay-tool-ok\\u0020>\\u0020proof.txt"
    prompt = (
        f"{marker} Write the proof file. "
        f'#sim tool=exec_command args={{"cmd":"{command}"}} tokens=2 text=written'
    )
    env = codex_home(tmp_path, chat_only, "/openai")
    config = Path(env["CODEX_HOME"]) / "config.toml"
    config.write_text(config.read_text().replace('model = "gpt-5.5"', 'model = "deepseek-chat"'))
    done, work = codex_exec(tmp_path, env, "--dangerously-bypass-approvals-and-sandbox", prompt)
    assert (work / "proof.txt").read_text().strip() == "relay-tool-ok"
    assert "written written" in done.stdout, done.stdout + done.stderr

    turn = [r for r in sim.requests() if marker in json.dumps(r["body"])]
    assert [r["path"] for r in turn] == ["/v1/chat/completions"] * 2, turn
    first, follow_up = (r["body"] for r in turn)
    assert first["stream"] is True and "input" not in first  # a Chat body, not Responses
    assert any(t["function"]["name"] == "exec_command" for t in first["tools"])
    calls = [m for m in follow_up["messages"] if m.get("tool_calls")]
    results = [m for m in follow_up["messages"] if m["role"] == "tool"]
    assert len(calls) == 1 and len(results) == 1
    call = calls[0]["tool_calls"][0]
    assert call["function"]["name"] == "exec_command"
    assert json.loads(call["function"]["arguments"])["cmd"] == "echo relay-tool-ok > proof.txt"
    assert results[0]["tool_call_id"] == call["id"]
    assert results[0]["content"], "the command's output went back upstream"


@pytest.mark.parametrize("case", ["unknown", "revoked", "expired"])
def test_codex_stops_at_once_on_a_bad_key(tmp_path: Path, relay: Relay, case: str) -> None:
    """With its default retries (5 turn retries, 4 transport retries) Codex re-sent a turn
    answered 401 six times; the relay's answer to a Codex client with a wrong key is final:
    one request reaches the relay and Codex exits with the relay's message."""
    if case == "unknown":
        key, expected = "sk-relay-" + uuid.uuid4().hex, "Incorrect API key provided"
    elif case == "revoked":
        key = relay.create_key(name="codex revoked")
        done = relay.cli("keys", "revoke", key, "--config", str(relay.config_path))
        assert done.returncode == 0, done.stderr
        expected = "has been revoked"
        # The running relay sees the CLI's change within a second: wait for it.
        deadline = time.monotonic() + 5
        while httpx2.get(relay.url + "/v1/models",
                         headers={"authorization": f"Bearer {key}"}).status_code != 401:
            assert time.monotonic() < deadline, "the relay never saw the revocation"
            time.sleep(0.05)
    else:
        done = relay.cli(
            "keys", "create", "--config", str(relay.config_path), "--package", "team",
            "--expires-in", "1s", "--json",
        )
        assert done.returncode == 0, done.stderr
        key, expected = json.loads(done.stdout)["key"], "expired"
        time.sleep(1.2)
    env = codex_home(tmp_path, relay, "/openai")
    config = Path(env["CODEX_HOME"]) / "config.toml"
    text = config.read_text().replace(relay.key(), key)
    config.write_text(text.replace("request_max_retries = 0\nstream_max_retries = 0\n", ""))
    assert "max_retries" not in config.read_text()  # Codex's own defaults

    def refused() -> int:
        log = relay.process.log.read_text()
        return sum(
            "path=/openai/responses" in line and "status=400" in line
            for line in log.splitlines()
        )

    before = refused()
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "hello"], env=env, cwd=work,
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr
    assert "Reconnecting" not in done.stderr, done.stderr
    time.sleep(0.2)  # the access line is written when the request ends
    assert refused() - before == 1


def _key_with_id(relay: Relay) -> tuple[str, str]:
    return relay.create_key_with_id(name="codex-ws")


def _key_access_lines(relay: Relay, key_id: str, turns: int) -> list[dict]:
    """The key's access lines (from the relay's log), once its ``turns`` POSTs are there."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            line for line in text_access_lines(relay.process.log.read_text()).values()
            if line["key_id"] == key_id
        ]
        posts = [line for line in lines if line["method"] == "POST"]
        if len(posts) >= turns or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize("websockets", [True, False])
def test_codex_over_websocket_runs_a_tool_turn_on_one_socket(
    tmp_path: Path, chat_only: Relay, sim: Sim, websockets: bool
) -> None:
    """``supports_websockets = true``: Codex prewarms a socket, then sends the turn and its
    tool round trip over it, each continuing the last by ``previous_response_id``; the relay
    serves every turn through its guards (one access line and usage row each) and the Chat
    upstream gets the whole conversation. With the option off, the same run is plain HTTP."""
    key, key_id = _key_with_id(chat_only)
    marker = f"ws-turn-{uuid.uuid4().hex[:8]}"
    command = "echo\\u0020relay-ws-ok\\u0020>\\u0020proof.txt"
    prompt = (
        f"{marker} Write the proof file. "
        f'#sim tool=exec_command args={{"cmd":"{command}"}} tokens=2 text=written'
    )
    env = codex_home(tmp_path, chat_only, "/v1")
    config = Path(env["CODEX_HOME"]) / "config.toml"
    text = config.read_text().replace('model = "gpt-5.5"', 'model = "deepseek-chat"')
    text = text.replace(chat_only.key(), key)
    config.write_text(text + f"supports_websockets = {str(websockets).lower()}\n")
    done, work = codex_exec(tmp_path, env, "--dangerously-bypass-approvals-and-sandbox", prompt)
    assert (work / "proof.txt").read_text().strip() == "relay-ws-ok"
    assert "written written" in done.stdout, done.stdout + done.stderr

    lines = _key_access_lines(chat_only, key_id, 2)
    sockets = [line for line in lines if line["method"] == "GET"]
    posts = [line for line in lines if line["method"] == "POST"]
    assert [p["status"] for p in posts] == ["200", "200"], lines
    assert all(p["path"] == "/v1/responses" and p["account"] == "deepseek" for p in posts)
    if websockets:
        assert [(s["path"], s["status"]) for s in sockets] == [("/v1/responses", "101")], lines
        # The socket's line is written when it closes: after both turns it carried.
        assert all(p["time"] <= sockets[0]["time"] for p in posts)
    else:
        assert sockets == []
    turn = [r for r in sim.requests() if marker in json.dumps(r["body"])]
    assert [r["path"] for r in turn] == ["/v1/chat/completions"] * 2, turn
    follow_up = turn[1]["body"]["messages"]
    assert [m["role"] for m in follow_up][-2:] == ["assistant", "tool"]
    assert marker in json.dumps(follow_up[1:])  # the user's turn, sent again in full
    rows = [r for r in chat_only.usage_rows() if r["key_id"] == key_id]
    assert len(rows) == 2 and all(r["status"] == 200 for r in rows)
