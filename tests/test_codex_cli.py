"""The real Codex CLI (npm @openai/codex, installed by scripts/test) against the relay."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import Relay, Sim

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


@pytest.mark.parametrize("base_path", ["/openai", "/v1"])
def test_codex_exec_prints_upstream_answer(
    tmp_path: Path, relay: Relay, sim: Sim, base_path: str
) -> None:
    if not CODEX.exists():
        pytest.fail(f"the Codex CLI is not installed at {CODEX}: run scripts/test")
    work = tmp_path / "work"
    work.mkdir()
    before = len(sim.requests())
    done = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "Reply with pong. #sim tokens=3 text=pong"],
        env=codex_home(tmp_path, relay, base_path),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
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
