"""The relay through the official OpenAI Node SDK (npm ``openai``, installed by scripts/test)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import Relay

NODE_DIR = Path(__file__).parent / "node"


def test_node_sdk_chat_responses_and_errors(relay: Relay) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").exists():
        pytest.fail("node and the npm 'openai' package are needed: run scripts/test")
    done = subprocess.run(
        [node, "sdk_check.mjs", relay.url + "/v1", relay.key()],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["chat"] == "tok tok tok tok"
    assert seen["chatStream"] == "tok tok tok"
    assert seen["chatStreamUsage"] == 3
    assert seen["responses"] == "tok tok"
    events = seen["responsesEvents"]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.reasoning_summary_text.delta" in events
    assert seen["notFound"] == {"status": 404, "code": "model_not_found"}
