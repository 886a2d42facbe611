"""What an upstream sends cannot grow the relay's memory without bound, and a keep-alive
connection the upstream closed as the request went out is retried, not blamed on the account.

Through the real relay and the simulated upstream's wire faults (relay/testing/sim_wire.py): a
stream line that never ends, a non-streamed body that never ends, gzip bombs (streamed and not),
a stale pooled connection. Each overflow is a clean error in the endpoint's own form, promptly,
with the slots released, a usage row, and the relay's peak memory barely moved. Then the SSE
splitter's bound on its own (pure, no I/O)."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.protocol.sse import EventSplitter, EventTooLarge

from .conftest import ADMIN_TOKEN, Relay, Sim, running_relay

MAX_EVENT_BYTES = 1 << 20
MAX_BODY_BYTES = 4 << 20
#: An overflow must be answered this fast (the upstream would send 1 GiB otherwise).
PROMPT_S = 10.0
#: How much the relay's peak memory may grow for one hostile answer (the upstream offers
#: 1 GiB; the bounds hold 1 MiB and 4 MiB).
PEAK_GROWTH_BYTES = 64 << 20

BODY = """
[pools.main]
max_concurrency = 20

[packages.team]
pool = "main"

[[accounts]]
name = "bounded-chat"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["bound-chat"]

[[accounts]]
name = "bounded-responses"
pool = "main"
provider = "openai-responses"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["bound-responses"]
"""


@pytest.fixture(scope="module")
def bounded(sim: Sim, tmp_path_factory: pytest.TempPathFactory):
    with running_relay(
        tmp_path_factory.mktemp("bounds"),
        sim.url,
        body=BODY,
        upstream_max_event_bytes=MAX_EVENT_BYTES,
        upstream_max_body_bytes=MAX_BODY_BYTES,
    ) as server:
        yield server


def peak_rss(relay: Relay) -> int:
    """The relay process's peak resident memory so far, in bytes."""
    status = Path(f"/proc/{relay.process.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def chat(model: str, prompt: str, *, stream: bool) -> tuple[str, dict]:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/chat/completions", body


def responses(model: str, prompt: str, *, stream: bool) -> tuple[str, dict]:
    return "/v1/responses", {"model": model, "stream": stream, "input": prompt}


def send(relay: Relay, path: str, body: dict) -> tuple[httpx2.Response, bytes, float]:
    """POST through the relay; the answer, its whole body and the seconds it took."""
    started = time.monotonic()
    with httpx2.Client(timeout=30) as client:
        with client.stream(
            "POST", relay.url + path, json=body,
            headers={"authorization": f"Bearer {relay.key()}"},
        ) as response:
            data = response.read()
    return response, data, time.monotonic() - started


def assert_clean_end(relay: Relay, response: httpx2.Response, status: int, code: str) -> None:
    """The request's usage row says how it ended, and nothing is left held."""
    row = relay.usage_row(response.headers["x-request-id"])
    assert (row["status"], row["error_code"]) == (status, code)
    state = relay.wait_idle()
    assert state["active_requests"] == 0 and state["admission"]["total"] == 0, state


def stream_error(data: bytes) -> dict:
    """The error a stream ended with: Chat's error chunk or Responses' response.failed."""
    for line in data.splitlines():
        if line.startswith(b"data: {"):
            payload = json.loads(line[6:])
            if "error" in payload:
                return payload["error"]
            if payload.get("type") == "response.failed":
                return payload["response"]["error"]
    raise AssertionError(f"no error event in {data[:500]!r}")


STREAMED = {
    "chat": lambda prompt: chat("bound-chat", prompt, stream=True),
    "responses": lambda prompt: responses("bound-responses", prompt, stream=True),
    "responses-on-chat": lambda prompt: responses("bound-chat", prompt, stream=True),
}


@pytest.mark.parametrize("fault", ["huge_line", "gzip_bomb"])
@pytest.mark.parametrize("endpoint", list(STREAMED))
def test_a_stream_line_that_never_ends_is_an_error_event_not_memory(
    bounded: Relay, endpoint: str, fault: str
) -> None:
    before = peak_rss(bounded)
    path, body = STREAMED[endpoint](f"#sim fault={fault}")
    response, data, took = send(bounded, path, body)
    assert response.status_code == 200
    error = stream_error(data)
    assert error["code"] == "upstream_response_too_large", error
    assert "server.upstream_max_event_bytes" in error["message"]
    assert took < PROMPT_S
    assert_clean_end(bounded, response, 200, "upstream_response_too_large")
    assert peak_rss(bounded) - before < PEAK_GROWTH_BYTES


@pytest.mark.parametrize("fault", ["huge_line", "gzip_bomb"])
@pytest.mark.parametrize("make", [chat, responses], ids=["chat", "responses"])
def test_a_body_beyond_the_bound_is_a_502_not_memory(bounded: Relay, make, fault: str) -> None:
    before = peak_rss(bounded)
    model = "bound-chat" if make is chat else "bound-responses"
    path, body = make(model, f"#sim fault={fault}", stream=False)
    response, data, took = send(bounded, path, body)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    error = json.loads(data)["error"]
    assert error["code"] == "upstream_response_too_large"
    assert error["type"] == "upstream_error"
    assert "server.upstream_max_body_bytes" in error["message"]
    assert took < PROMPT_S
    assert_clean_end(bounded, response, 502, "upstream_response_too_large")
    assert peak_rss(bounded) - before < PEAK_GROWTH_BYTES


def account_failures(relay: Relay, name: str) -> dict:
    accounts = httpx2.get(
        relay.url + "/admin/accounts", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ).json()["data"]
    return next(account for account in accounts if account["name"] == name)["failures"]


def upstream_records(sim: Sim, marker: str) -> list[dict]:
    return [r for r in sim.requests() if marker in json.dumps(r.get("body"))]


@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
def test_a_stale_pooled_connection_is_retried_once_on_a_new_one(
    bounded: Relay, sim: Sim, stream: bool
) -> None:
    warm, _, _ = send(bounded, *chat("bound-chat", "warm the pool", stream=False))
    assert warm.status_code == 200  # its connection is now idle in the relay's pool
    failures = account_failures(bounded, "bounded-chat")
    marker = f"stale-{time.monotonic_ns()}"
    prompt = f"{marker} #sim fault=stale"
    response, data, _ = send(bounded, *chat("bound-chat", prompt, stream=stream))
    assert response.status_code == 200, data
    assert (b"[DONE]" in data) if stream else json.loads(data)["choices"]
    # The upstream saw the request twice: closed unanswered on the reused connection, then
    # answered on a new one; the account is not blamed for the upstream's idle close.
    records = upstream_records(sim, marker)
    assert [r["status"] for r in records] == [None, 200]
    assert account_failures(bounded, "bounded-chat") == failures
    assert_clean_end(bounded, response, 200, "")


def test_a_failure_on_the_new_connection_too_is_an_upstream_error(
    bounded: Relay, sim: Sim
) -> None:
    warm, _, _ = send(bounded, *chat("bound-chat", "warm the pool", stream=False))
    assert warm.status_code == 200
    failures = account_failures(bounded, "bounded-chat")
    marker = f"dropped-{time.monotonic_ns()}"
    prompt = f"{marker} #sim fault=drop"
    response, data, _ = send(bounded, *chat("bound-chat", prompt, stream=False))
    assert response.status_code == 502
    assert json.loads(data)["error"]["code"] == "upstream_unreachable"
    assert len(upstream_records(sim, marker)) == 2  # retried exactly once
    after = account_failures(bounded, "bounded-chat")
    assert after.get("502", 0) == failures.get("502", 0) + 1
    assert_clean_end(bounded, response, 502, "upstream_unreachable")


# ------------------------------------------------------------------------------------------
# The SSE splitter's bound, pure


def test_a_line_that_never_ends_raises_once_past_the_bound() -> None:
    splitter = EventSplitter(max_event_bytes=1000)
    assert splitter.feed(b"data: " + b"x" * 900) == []
    with pytest.raises(EventTooLarge, match="longer than 1000 bytes"):
        splitter.feed(b"x" * 200)


def test_a_whole_event_beyond_the_bound_in_one_chunk_raises() -> None:
    splitter = EventSplitter(max_event_bytes=1000)
    assert splitter.feed(b"data: 1\n\n") == [b"data: 1\n\n"]
    with pytest.raises(EventTooLarge):
        splitter.feed(b"data: " + b"x" * 1000 + b"\n\n")


def test_events_up_to_the_bound_pass_and_the_bound_is_per_event() -> None:
    event = b"data: " + b"x" * 992 + b"\n\n"  # exactly 1000 bytes
    splitter = EventSplitter(max_event_bytes=1000)
    assert splitter.feed(event) == [event]
    # Many events in one chunk, far more than the bound together: each is within it.
    assert splitter.feed(event * 50) == [event] * 50
    # An event cut across chunks, each cut anywhere.
    events = [e for piece in (event[:10], event[10:999], event[999:]) for e in splitter.feed(piece)]
    assert events == [event]


def test_a_tail_at_the_bound_still_ends_as_a_last_event() -> None:
    splitter = EventSplitter(max_event_bytes=1000)
    assert splitter.feed(b"data: " + b"x" * 994) == []
    assert splitter.end() == [b"data: " + b"x" * 994 + b"\n\n"]


def test_a_long_event_in_small_chunks_is_not_rescanned_per_chunk() -> None:
    """Linear time: 8 MiB in 4 KiB chunks (2,048 feeds) in well under a second; rescanning the
    whole buffer per chunk would copy and search about 8 GiB."""
    splitter = EventSplitter(max_event_bytes=16 << 20)
    chunk = b"x" * 4096
    started = time.perf_counter()
    assert splitter.feed(b"data: ") == []
    for _ in range(2048):
        assert splitter.feed(chunk) == []
    assert len(splitter.feed(b"\n\n")[0]) == 6 + 8 * 1024 * 1024 + 2
    assert time.perf_counter() - started < 1.0


def _reference(chunks: list[bytes], limit: int) -> tuple[list[bytes], int | None]:
    """Events as the reference cuts them, and the chunk at which the bound is crossed: an
    event longer than ``limit`` completed, or more than ``limit`` bytes held unfinished."""
    events, buffer = [], b""
    for number, chunk in enumerate(chunks):
        buffer += chunk
        start = 0
        for match in re.finditer(rb"\r?\n\r?\n", buffer):
            event = buffer[start : match.end()]
            if len(event) > limit:
                return events, number
            events.append(event)
            start = match.end()
        buffer = buffer[start:]
        if len(buffer) > limit:
            return events, number
    return events, None


@given(
    st.lists(
        st.sampled_from([b"a", b"data: xxxx", b"\n", b"\r", b"\n\n", b"\r\n\r\n"]), max_size=40
    ),
    st.lists(st.integers(min_value=0, max_value=300), max_size=8),
    st.integers(min_value=4, max_value=40),
)
def test_the_bound_is_crossed_exactly_where_the_reference_says(
    parts: list[bytes], cuts: list[int], limit: int
) -> None:
    stream = b"".join(parts)
    bounds = [0, *sorted({cut for cut in cuts if cut <= len(stream)}), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    expected, crossed_at = _reference(chunks, limit)
    splitter = EventSplitter(max_event_bytes=limit)
    events: list[bytes] = []
    for number, chunk in enumerate(chunks):
        try:
            events += splitter.feed(chunk)
        except EventTooLarge:
            assert number == crossed_at
            break
    else:
        assert crossed_at is None
        assert events == expected
