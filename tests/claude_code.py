"""Run the real Claude Code CLI (npm @anthropic-ai/claude-code, installed by scripts/test)
headless against an Anthropic Messages endpoint: the simulated upstream directly, or the relay.

:func:`run_claude` is the one way the tests start it: ``claude -p PROMPT`` in print mode, JSON
output, a fresh HOME and CLAUDE_CONFIG_DIR (nothing of the machine's own setup or login is read),
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` and a clean environment (no ANTHROPIC_* variable of
the caller leaks in), so the only traffic is to ``base_url``. It always returns: a run that
outlives its timeout is killed and reported with ``timed_out`` (Claude Code retries some errors
for minutes).

Run as a script, ``.venv/bin/python -m tests.claude_code``, it starts a simulated upstream, runs
the two flows of tests/test_claude_code.py and prints what Claude Code sent, secrets redacted: the
material of docs/claude-code.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

CLAUDE = Path(__file__).parent / "node" / "node_modules" / ".bin" / "claude"
MODEL = "claude-sonnet-4-6"
"""A current model name (2.1.337 warns about retired ones, such as claude-sonnet-4-5)."""
SECRET_HEADERS = ("authorization", "x-api-key")


@dataclass
class ClaudeRun:
    """One ``claude -p`` run: its exit, its output and the requests the simulated upstream saw."""

    returncode: int | None  # None when it was killed at the timeout
    stdout: str
    stderr: str
    timed_out: bool = False
    requests: list[dict] = field(default_factory=list)  # sim records (``/_sim/requests``)

    @property
    def output(self) -> dict:
        """The ``--output-format json`` result object (``result``, ``is_error``, ``num_turns``…)."""
        return json.loads(self.stdout)

    @property
    def messages_requests(self) -> list[dict]:
        """The recorded ``POST …/messages`` calls, in order."""
        return [r for r in self.requests if r["path"].partition("?")[0].endswith("/messages")]

    def describe(self) -> str:
        """Exit, output and error text, for assertion messages."""
        return f"exit {self.returncode} (timed out: {self.timed_out})\n{self.stdout}\n{self.stderr}"


def claude_env(
    base_url: str, token: str, home: Path, *, auth: str = "auth_token", model: str = MODEL
) -> dict[str, str]:
    """The environment of a headless run: only what Claude Code needs, nothing of the caller's.

    ``auth="auth_token"`` sends the token as ``Authorization: Bearer`` (ANTHROPIC_AUTH_TOKEN, as a
    relay's users set it), ``auth="api_key"`` as ``x-api-key`` (ANTHROPIC_API_KEY).
    """
    if auth not in ("auth_token", "api_key"):
        raise ValueError(f"auth must be auth_token or api_key, not {auth!r}")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        "LANG": "C.UTF-8",
        "NO_COLOR": "1",
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    env["ANTHROPIC_AUTH_TOKEN" if auth == "auth_token" else "ANTHROPIC_API_KEY"] = token
    return env


def _sim_records(sim_url: str | None, after_id: int) -> list[dict]:
    if sim_url is None:
        return []
    records = httpx2.get(sim_url.rstrip("/") + "/_sim/requests", timeout=10).json()
    return [r for r in records if r["id"] > after_id]


def _last_id(sim_url: str | None) -> int:
    records = _sim_records(sim_url, 0)
    return records[-1]["id"] if records else 0


def run_claude(
    base_url: str,
    token: str,
    prompt: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    *,
    sim_url: str | None = None,
    auth: str = "auth_token",
    model: str = MODEL,
    args: tuple[str, ...] = (),
    timeout: float = 120,
) -> ClaudeRun:
    """``claude -p PROMPT --output-format json --max-turns 4 ARGS`` in *cwd* against *base_url*.

    *base_url* is the root Claude Code appends ``/v1/messages`` to (the sim's or the relay's URL,
    no ``/v1``). *env* adds to or overrides :func:`claude_env` (``ANTHROPIC_SMALL_FAST_MODEL``…).
    With *sim_url*, the requests the simulated upstream recorded during the run come back in
    ``requests`` (direct runs: the sim's own URL; through the relay: what the relay sent on).
    """
    if not CLAUDE.exists():
        raise FileNotFoundError(f"Claude Code is not installed at {CLAUDE}: run scripts/test")
    before = _last_id(sim_url)
    home = Path(tempfile.mkdtemp(prefix="claude-home-"))
    try:
        full_env = {**claude_env(base_url, token, home, auth=auth, model=model), **(env or {})}
        command = [
            str(CLAUDE), "-p", prompt, "--model", model,
            "--output-format", "json", "--max-turns", "4", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            run = ClaudeRun(proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            run = ClaudeRun(None, stdout, stderr, timed_out=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    run.requests = _sim_records(sim_url, before)
    return run


# --------------------------------------------------------------------------------------------
# What Claude Code sent, for docs/claude-code.md


def redacted_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers with credentials cut to their scheme and host names generalised."""
    out = {}
    for name, value in headers.items():
        if name in SECRET_HEADERS:
            scheme = value.split(" ", 1)[0] + " " if name == "authorization" else ""
            value = scheme + "<redacted>"
        out[name] = value
    return out


def shape(value: Any, depth: int = 0) -> Any:
    """A short description of a JSON value: strings by length, long lists by count."""
    if isinstance(value, str):
        return value if len(value) <= 60 else f"<str {len(value)} chars>"
    if isinstance(value, list):
        if depth >= 2 or len(value) > 6:
            return f"<list of {len(value)}>"
        return [shape(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if depth >= 3:
            return "{" + ", ".join(value) + "}"
        return {k: shape(v, depth + 1) for k, v in value.items()}
    return value


def summary(record: dict) -> dict:
    """One recorded request as the doc shows it."""
    body = record.get("body") or {}
    messages = body.get("messages") or []
    tools = body.get("tools") or []
    return {
        "request": f"{record['method']} {record['path']} -> {record['status']}",
        "headers": redacted_headers(record["headers"]),
        "top_level": {k: type(v).__name__ for k, v in body.items()},
        "max_tokens": body.get("max_tokens"),
        "stream": body.get("stream"),
        "thinking": body.get("thinking"),
        "output_config": body.get("output_config"),
        "context_management": body.get("context_management"),
        "metadata": body.get("metadata"),
        "system": shape(body.get("system")),
        "tools": [t.get("name") for t in tools],
        "tools_deferred": [t.get("name") for t in tools if t.get("defer_loading")],
        "tool_keys": sorted({k for t in tools for k in t}),
        "tool_choice": body.get("tool_choice"),
        "messages": [{"role": m.get("role"), "blocks": blocks(m.get("content"))} for m in messages],
    }


def blocks(content: Any) -> list[str] | str:
    """A message's content as block types (``+cache`` where a block has ``cache_control``)."""
    if isinstance(content, str):
        return f"<str {len(content)} chars>"
    out = []
    for block in content or []:
        kind = str(block.get("type"))
        if kind == "text" and block.get("text", "").startswith("<system-reminder>"):
            kind = "text(system-reminder)"
        if kind == "tool_result":
            inner = block.get("content")
            kind += f"(content {'str' if isinstance(inner, str) else 'blocks'})"
        out.append(kind + ("+cache" if "cache_control" in block else ""))
    return out


def _capture() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.testing.upstream", "--port", "0", "--ttft", "0",
         "--token-delay", "0", "--tokens", "3", "--api-key", "sim-capture-key"],
        cwd=root, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = proc.stdout.readline().split()[-1]
        with tempfile.TemporaryDirectory() as work:
            note = Path(work) / "note.txt"
            note.write_text("the secret word is avocado\n")
            read = json.dumps({"file_path": str(note)}, separators=(",", ":"))
            flows = {
                "plain answer": "Say pong. #sim tokens=3 text=pong",
                "Read tool": f"Read note.txt #sim tool=Read args={read} tokens=2 text=done",
            }
            for name, prompt in flows.items():
                run = run_claude(url, "sim-capture-key", prompt, Path(work), sim_url=url)
                print(f"## {name}: {run.describe().splitlines()[0]}")
                print(json.dumps({k: run.output.get(k) for k in ("result", "num_turns", "usage")}))
                print(json.dumps([summary(r) for r in run.requests], indent=1))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    _capture()
