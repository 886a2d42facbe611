"""The access log and the operator events, read from the log of a real ``relay serve``.

Each test makes real requests, then parses the relay's standard error (text lines as
``name=value`` pairs, JSON lines with ``json.loads``) and checks every access line against the
request it records (by ``x-request-id``), its usage row, and that no key or upstream secret
is anywhere in the log.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from relay.testing.sim_protocol import LEAKED_KEY

from .conftest import (
    ADMIN_TOKEN,
    ROOT,
    SIM_KEY,
    Process,
    Relay,
    Sim,
    server_section,
    start_process,
)

WRONG_KEY = "sk-wrong-upstream-secret-4242"
UNSET_VARIABLE = "RELAY_TEST_NEVER_SET_KEY"

BODY = f"""
[pools.main]
max_concurrency = 100

[packages.team]
pool = "main"
initial_credits = 100

[[accounts]]
name = "chat"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["gpt-5", "deepseek-chat"]

[[accounts]]
name = "flaky"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["flaky-model"]

[[accounts]]
name = "wrongkey"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "RELAY_TEST_WRONG_KEY"
models = ["wrong-model"]

[[accounts]]
name = "nokey"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "{UNSET_VARIABLE}"
models = ["nokey-model"]

[models.fast]
target = "gpt-5"

[prices.gpt-5]
input = 1000
output = 2000
"""

CHAT = "/v1/chat/completions"
#: One ``name=value`` of a text access line: a bare word, or a JSON string.
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def start(tmp: Path, sim: Sim, *args: str, **server: object) -> Relay:
    """``relay serve`` on :data:`BODY` with extra ``[server]`` settings and CLI ``args``."""
    database = tmp / "relay.db"
    config = tmp / "relay.toml"
    config.write_text(server_section(database, **server) + BODY.replace("SIM_URL", sim.url))
    env = {
        "SIM_UPSTREAM_KEY": SIM_KEY,
        "RELAY_TEST_WRONG_KEY": WRONG_KEY,
        "RELAY_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
        "RELAY_LOG_LEVEL": "INFO",
    }
    process = start_process(
        ["-m", "relay", "serve", "--config", str(config), *args],
        r"relay listening on (\S+)",
        tmp / "relay.log",
        env=env,
    )
    assert UNSET_VARIABLE not in os.environ
    return Relay(process, config, database, process.url)


@pytest.fixture(scope="module")
def text_relay(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    relay = start(tmp_path_factory.mktemp("access-text"), sim)
    yield relay
    log = relay.process.stop()
    assert "Traceback" not in log, log


def log_text(process: Process) -> str:
    return process.log.read_text()


def wait_for(process: Process, *needles: str, timeout: float = 5.0) -> str:
    """The log once it holds every one of ``needles`` (an access line is written as its
    request ends, which may be a moment after the client has its answer)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_text(process)
        if all(needle in text for needle in needles) or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def ids(*responses: httpx2.Response) -> list[str]:
    return [response.headers["x-request-id"] for response in responses]


def text_access_lines(text: str) -> dict[str, dict[str, str]]:
    """Every text access line, parsed, by request id."""
    lines = {}
    for line in text.splitlines():
        head, sep, rest = line.partition(" INFO relay.access: ")
        if not sep:
            continue
        assert head.endswith("Z") and "T" in head, line  # ISO 8601 UTC
        fields = {
            name: json.loads(value) if value.startswith('"') else value
            for name, value in FIELD.findall(rest)
        }
        assert " ".join(f"{n}={v}" for n, v in FIELD.findall(rest)) == rest, line  # no leftovers
        fields["time"] = head
        lines[fields["request_id"]] = fields
    return lines


def events(text: str) -> list[str]:
    return [line for line in text.splitlines() if " relay.events: " in line]


def chat(relay: Relay, model: str, prompt: str = "hello", key: str | None = None,
         **extra: object) -> httpx2.Response:
    return httpx2.post(
        relay.url + CHAT,
        json={"model": model, "messages": [{"role": "user", "content": prompt}], **extra},
        headers={"authorization": f"Bearer {key or relay.key()}"},
        timeout=20,
    )


def dash(value: object) -> str:
    return "-" if value in (None, "") else str(value)


def check_line(line: dict, response: httpx2.Response, method: str, path: str, *,
               key_id: str) -> None:
    """What every access line must say about the request it records."""
    assert line["method"] == method
    assert line["path"] == path
    assert line["key_id"] == key_id
    assert int(line["status"]) == response.status_code
    if response.status_code >= 400:
        assert line["error"] == response.json()["error"]["code"]
    else:
        assert line["error"] == "-"
    duration = float(line["duration_ms"])
    assert duration > 0
    assert 0 <= float(line["ttfb_ms"]) <= duration


def test_access_lines_match_each_request(text_relay: Relay) -> None:
    relay = text_relay
    key, key_id = relay.create_paid_key("team")
    made = []
    plain = chat(relay, "fast", key=key)
    streamed = chat(relay, "fast", key=key, stream=True)
    unknown = chat(relay, "no-such-model", key=key)
    bad_key = chat(relay, "fast", key="cr_" + "x" * 40)
    models = httpx2.get(relay.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    missing = httpx2.get(relay.url + "/v1/nothing-here")
    made = [plain, streamed, unknown, bad_key, models, missing]
    assert [r.status_code for r in made] == [200, 200, 404, 401, 200, 404]

    lines = text_access_lines(wait_for(relay.process, *ids(*made)))
    for response in made:
        assert response.headers["x-request-id"] in lines, response.headers["x-request-id"]

    for response in (plain, streamed):
        line = lines[response.headers["x-request-id"]]
        check_line(line, response, "POST", CHAT, key_id=key_id)
        row = relay.usage_row(response.headers["x-request-id"])
        assert line["model"] == "fast" and line["served_model"] == "gpt-5"
        assert line["account"] == "chat" == row["account"]
        assert int(line["tokens_in"]) == row["input_tokens"] > 0
        assert int(line["tokens_out"]) == row["output_tokens"] > 0
        assert float(line["credits"]) == pytest.approx(row["cost_nano"] / 1e9)
        assert float(line["credits"]) > 0
        assert float(line["queue_ms"]) == pytest.approx(row["queue_ms"], abs=0.1)
    # A stream's first byte comes before its end.
    streamed_line = lines[streamed.headers["x-request-id"]]
    assert float(streamed_line["ttfb_ms"]) < float(streamed_line["duration_ms"])

    line = lines[unknown.headers["x-request-id"]]
    check_line(line, unknown, "POST", CHAT, key_id=key_id)
    assert line["model"] == "no-such-model" and line["served_model"] == "-"
    assert line["account"] == "-" and line["tokens_in"] == "0" and line["credits"] == "0"

    check_line(lines[bad_key.headers["x-request-id"]], bad_key, "POST", CHAT, key_id="-")
    check_line(lines[models.headers["x-request-id"]], models, "GET", "/v1/models", key_id=key_id)
    check_line(lines[missing.headers["x-request-id"]], missing, "GET", "/v1/nothing-here",
               key_id="-")

    text = log_text(relay.process)
    for secret in (key, "cr_" + "x" * 40, SIM_KEY, WRONG_KEY, ADMIN_TOKEN):
        assert secret not in text


def test_path_is_logged_without_query_and_line_breaks_cannot_forge_lines(
    text_relay: Relay,
) -> None:
    relay = text_relay
    response = httpx2.get(
        relay.url + "/v1/models/a%0Aforged%20INFO%20relay.access:%20request_id=fake",
        params={"key": "query-secret-1234"},
        headers={"authorization": f"Bearer {relay.key()}"},
    )
    assert response.status_code == 404
    request_id = response.headers["x-request-id"]
    text = wait_for(relay.process, request_id)
    lines = text_access_lines(text)
    assert "fake" not in lines
    assert lines[request_id]["path"] == "/v1/models/a\nforged INFO relay.access: request_id=fake"
    assert "query-secret-1234" not in text


def test_missing_credentials_logged_at_start_naming_the_variable(text_relay: Relay) -> None:
    found = [line for line in events(log_text(text_relay.process)) if "nokey" in line]
    assert len(found) == 1, found
    assert UNSET_VARIABLE in found[0] and "is not set" in found[0]
    assert " WARNING " in found[0]
    # Its first request is refused upstream: the account goes out of service, said once.
    first, second = chat(text_relay, "nokey-model"), chat(text_relay, "nokey-model")
    assert first.status_code >= 400 and second.status_code >= 400
    text = wait_for(text_relay.process, *ids(first, second))
    out = [line for line in events(text) if "account nokey out of service" in line]
    assert len(out) == 1, events(text)
    assert text_access_lines(text)[ids(first)[0]]["account"] == "nokey"


def test_account_out_of_service_and_back_logged_once_each(text_relay: Relay) -> None:
    relay = text_relay
    first = chat(relay, "wrong-model")
    second = chat(relay, "wrong-model")  # the account is out of service: not tried again
    assert first.status_code >= 400 and second.status_code >= 400
    text = wait_for(relay.process, *ids(first, second))
    out = [line for line in events(text) if "account wrongkey out of service" in line]
    assert len(out) == 1, events(text)
    assert "401 upstream_credentials_rejected" in out[0]
    lines = text_access_lines(text)
    assert lines[first.headers["x-request-id"]]["account"] == "wrongkey"
    assert int(lines[first.headers["x-request-id"]]["status"]) == first.status_code

    for _ in range(2):
        relay.admin("POST", "/admin/accounts/wrongkey/enable").raise_for_status()
    back = [line for line in events(log_text(relay.process)) if "wrongkey back in service" in line]
    assert len(back) == 1, events(log_text(relay.process))
    assert WRONG_KEY not in log_text(relay.process)


def test_cooldown_logged_once_with_its_reason(text_relay: Relay) -> None:
    relay = text_relay
    first = chat(relay, "flaky-model", "#sim fault=429")
    assert first.status_code == 429
    text = wait_for(relay.process, first.headers["x-request-id"])  # after the event
    found = [line for line in events(text) if "account flaky cooling down" in line]
    assert len(found) == 1, events(text)
    assert "for 2s" in found[0] and "429" in found[0] and "rate_limit_exceeded" in found[0]
    line = text_access_lines(text)[first.headers["x-request-id"]]
    assert line["account"] == "flaky" and line["error"] == first.json()["error"]["code"]


def test_upstream_secret_quoted_by_upstream_is_not_logged(text_relay: Relay) -> None:
    relay = text_relay
    for _ in range(3):  # three failures in a row: a cool-down, whose reason quotes the error
        chat(relay, "deepseek-chat", "#sim fault=leak_secret")
    text = wait_for(relay.process, "account chat cooling down")
    assert any("account chat cooling down" in line for line in events(text))
    assert SIM_KEY not in text and LEAKED_KEY not in text


def test_usage_writer_falling_behind_is_logged(text_relay: Relay) -> None:
    relay = text_relay
    chat(relay, "fast").raise_for_status()  # the database exists and is idle
    blocker = sqlite3.connect(
        relay.database, timeout=10, isolation_level=None, check_same_thread=False
    )
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the writer's insert waits
    released = threading.Event()

    def release() -> None:
        time.sleep(3.5)
        blocker.execute("COMMIT")
        released.set()

    threading.Thread(target=release, daemon=True).start()
    try:
        chat(relay, "fast").raise_for_status()  # its record starts a write that waits
        time.sleep(2.5)
        chat(relay, "fast").raise_for_status()  # arrives while that write has taken > 2 s
    finally:
        released.wait(10)
        blocker.close()
    text = wait_for(relay.process, "caught up")
    behind = [line for line in events(text) if "usage writer is falling behind" in line]
    caught_up = [line for line in events(text) if "usage writer has caught up" in line]
    assert len(behind) == 1 and len(caught_up) == 1, events(text)


def test_json_lines(sim: Sim, tmp_path: Path) -> None:
    relay = start(tmp_path, sim, log_format="json")
    try:
        key, key_id = relay.create_paid_key("team")
        plain = chat(relay, "fast", key=key)
        refused = chat(relay, "fast", key="cr_" + "y" * 40)
        assert (plain.status_code, refused.status_code) == (200, 401)
        text = wait_for(relay.process, *ids(plain, refused))
    finally:
        relay.process.stop()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # all JSON
    access = {r["request_id"]: r for r in records if r.get("type") == "access"}
    line = access[plain.headers["x-request-id"]]
    row = relay.usage_row(plain.headers["x-request-id"])
    assert line["logger"] == "relay.access" and line["time"].endswith("Z")
    assert (line["key_id"], line["method"], line["path"]) == (key_id, "POST", CHAT)
    assert (line["model"], line["served_model"], line["account"]) == ("fast", "gpt-5", "chat")
    assert line["status"] == 200 and line["error"] == ""
    assert (line["tokens_in"], line["tokens_out"]) == (row["input_tokens"], row["output_tokens"])
    assert float(line["credits"]) == pytest.approx(row["cost_nano"] / 1e9)
    assert line["ttfb_ms"] <= line["duration_ms"]
    line = access[refused.headers["x-request-id"]]
    assert line["status"] == 401 and line["error"] == "invalid_api_key" and line["key_id"] == ""
    missing = [r for r in records if r.get("event") == "account_missing_credentials"]
    assert [(r["account"], r["variable"]) for r in missing] == [("nokey", UNSET_VARIABLE)]
    for secret in (key, "cr_" + "y" * 40, SIM_KEY, WRONG_KEY):
        assert secret not in text


def test_access_log_off(sim: Sim, tmp_path: Path) -> None:
    relay = start(tmp_path, sim, access_log=False)
    try:
        response = chat(relay, "fast")
        assert response.status_code == 200
        time.sleep(0.3)
        text = relay.process.stop()
    finally:
        relay.process.stop()
    assert "relay.access" not in text
    assert response.headers["x-request-id"] not in text
    assert UNSET_VARIABLE in text  # operator events are still logged


def test_log_level_option(sim: Sim, tmp_path: Path) -> None:
    relay = start(tmp_path, sim, "--log-level", "error")
    try:
        response = chat(relay, "fast")
        text = wait_for(relay.process, response.headers["x-request-id"])
    finally:
        relay.process.stop()
    assert response.headers["x-request-id"] in text  # the access log does not follow the level
    assert UNSET_VARIABLE not in text  # a warning, below "error"
    bad = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(relay.config_path),
         "--log-level", "loud"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert bad.returncode == 2 and "--log-level" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("setting", "named"),
    [('log_format = "xml"', "server.log_format"), ('access_log = "yes"', "server.access_log")],
)
def test_check_config_refuses_bad_log_settings(
    sim: Sim, tmp_path: Path, setting: str, named: str
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        server_section(tmp_path / "relay.db") + setting + "\n" + BODY.replace("SIM_URL", sim.url)
    )
    done = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert done.returncode != 0
    assert named in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_websocket_refusal_is_logged(text_relay: Relay) -> None:
    """A Responses WebSocket handshake without a key is refused with a 401, and logged."""
    relay = text_relay
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/responses HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        data = b""
        while b"invalid_api_key" not in data and b"missing" not in data.lower():
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    request_id = re.search(rb"x-request-id: (req_\w+)", data, re.IGNORECASE)[1].decode()
    line = text_access_lines(wait_for(relay.process, request_id))[request_id]
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/responses", "401")
    assert line["error"] == json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"]
