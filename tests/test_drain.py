"""SIGTERM with streams running and requests queued: a real relay process drains (queued
requests get 503, short streams finish, long ones are ended with an error event in their
protocol), writes a usage row for each, and exits 0 within its drain timeout."""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time

import httpx2

from .conftest import start_relay

DRAIN_S = 2.0

BODY = textwrap.dedent(
    """
    [pools.main]
    max_concurrency = 100

    [packages.drain]
    pool = "main"
    max_concurrency = 3
    max_queue = 8
    queue_timeout_s = 60

    [[accounts]]
    name = "sim-responses"
    pool = "main"
    provider = "openai-responses"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["gpt-5.5"]

    [[accounts]]
    name = "sim-chat"
    pool = "main"
    provider = "openai-chat"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["gpt-5.5"]
    """
)


class Client(threading.Thread):
    """One request in its own thread: the status, headers and every byte of the answer."""

    def __init__(self, url: str, key: str, path: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.path, self.body = url, key, path, body
        self.status = 0
        self.headers: dict[str, str] = {}
        self.data = b""
        self.first_byte = threading.Event()

    def run(self) -> None:
        with httpx2.Client(timeout=30) as client, client.stream(
            "POST", self.url + self.path, json=self.body,
            headers={"authorization": f"Bearer {self.key}"},
        ) as response:
            self.status = response.status_code
            self.headers = dict(response.headers)
            try:
                for chunk in response.iter_raw():
                    self.data += chunk
                    self.first_byte.set()
            except httpx2.HTTPError as exc:  # recorded: a cut without an event fails below
                self.data += f"<<{exc!r}>>".encode()
        self.first_byte.set()


def _chat(prompt: str, stream: bool) -> dict:
    return {"model": "gpt-5.5", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


def test_sigterm_drains_then_ends_every_stream_with_an_event(tmp_path, sim) -> None:
    relay = start_relay(tmp_path, sim.url, body=BODY, drain_timeout_s=DRAIN_S)
    key = relay.create_key("drain")
    long = "#sim delay=0.05 tokens=2000"
    short_stream = Client(
        relay.url, key, "/v1/chat/completions", _chat("#sim delay=0.05 tokens=20", True)
    )
    long_chat = Client(relay.url, key, "/v1/chat/completions", _chat(long, True))
    long_responses = Client(
        relay.url, key, "/v1/responses", {"model": "gpt-5.5", "stream": True, "input": long}
    )
    running = [short_stream, long_chat, long_responses]
    for client in running:
        client.start()
    for client in running:
        assert client.first_byte.wait(10)
    queued = [
        Client(relay.url, key, "/v1/chat/completions", _chat("#sim tokens=2", stream))
        for stream in (False, True)
    ]
    for client in queued:
        client.start()
    deadline = time.monotonic() + 10
    while relay.state()["admission"]["queued"] < 2:
        assert time.monotonic() < deadline, relay.state()["admission"]
        time.sleep(0.02)

    started = time.monotonic()
    relay.process.proc.send_signal(signal.SIGTERM)
    code = relay.process.proc.wait(DRAIN_S + 8)
    elapsed = time.monotonic() - started
    for client in [*running, *queued]:
        client.join(5)
        assert not client.is_alive()
    log = relay.process.log.read_text()
    assert code == 0, log
    assert elapsed < DRAIN_S + 5, elapsed
    assert "Traceback" not in log, log

    # Queued: 503 in OpenAI's shape, with Retry-After.
    for client in queued:
        assert client.status == 503, client.data
        error = json.loads(client.data)["error"]
        assert error["code"] == "relay_shutdown" and "shutting down" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        assert client.headers["retry-after"] == "1"
    # Finished within the drain: complete.
    assert short_stream.data.rstrip().endswith(b"data: [DONE]"), short_stream.data[-300:]
    assert b"relay_shutdown" not in short_stream.data
    # Cut: a Chat error chunk then [DONE]; a Responses response.failed, last.
    events = [e for e in long_chat.data.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]", events[-3:]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "relay_shutdown"
    assert len(events) > 10  # it had streamed before it was cut
    events = [e for e in long_responses.data.decode().split("\n\n") if e.strip()]
    last = events[-1]
    assert last.startswith("event: response.failed"), events[-2:]
    failed = json.loads(last.split("data: ", 1)[1])
    assert failed["response"]["error"]["code"] == "relay_shutdown"

    # Every request has its usage row, saying what happened; the cut ones billed.
    rows = {row["request_id"]: row for row in relay.usage_rows()}
    by_id = {c: rows[c.headers["x-request-id"]] for c in [*running, *queued]}
    assert len(rows) == 5
    for client in queued:
        assert (by_id[client]["status"], by_id[client]["error_code"]) == (503, "relay_shutdown")
    assert by_id[short_stream]["status"] == 200
    assert not by_id[short_stream]["error_code"]
    assert by_id[short_stream]["output_tokens"] == 20
    for client in (long_chat, long_responses):
        row = by_id[client]
        assert (row["status"], row["error_code"]) == (200, "relay_shutdown"), row
        assert 10 < row["output_tokens"] < 2000, row
