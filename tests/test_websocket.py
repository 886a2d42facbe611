"""The Responses API over a WebSocket, frame by frame, with trio-websocket as the client against
the real relay: prewarm, turns continuing by ``previous_response_id``, error frames, one
response at a time, a client close that frees everything, handshake refusals, the per-key cap,
the socket's age limit and shutdown."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from .conftest import Relay, Sim, running_relay, start_relay
from .test_disconnect import wait_upstream_closed


def ws_url(relay: Relay, path: str = "/v1/responses") -> str:
    return relay.url.replace("http://", "ws://") + path


def new_key(relay: Relay) -> tuple[str, str]:
    return relay.create_key_with_id(name="ws")


def auth(key: str, *extra: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode()),
            *((name.encode(), value.encode()) for name, value in extra)]


def create(model: str, input: object, **fields: object) -> str:
    return json.dumps({"type": "response.create", "model": model, "input": input, **fields})


async def turn(ws, frame: str) -> list[dict]:
    """Send one ``response.create``; the frames up to its end (completed, failed or error)."""
    await ws.send_message(frame)
    frames = []
    with trio.fail_after(20):
        while True:
            frames.append(json.loads(await ws.get_message()))
            if frames[-1]["type"] in ("response.completed", "response.failed", "error"):
                return frames


def key_rows(relay: Relay, key_id: str, count: int) -> list[dict]:
    """The key's usage rows (oldest first), once there are ``count``."""
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in relay.usage_rows() if r["key_id"] == key_id]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows[::-1]
        time.sleep(0.02)


async def test_prewarm_then_turns_continue_from_the_socket_state(relay: Relay, sim: Sim) -> None:
    """Codex's incremental mode: a prewarm (``generate: false``) costs nothing and reaches no
    upstream; each next turn names the last response and sends only the new items, and the
    Chat upstream still gets the whole conversation, its earlier answer included."""
    key, key_id = new_key(relay)
    marker = f"ws-continue-{time.monotonic_ns()}"
    developer = {"type": "message", "role": "developer",
                 "content": [{"type": "input_text", "text": f"{marker} be brief"}]}
    before = len(sim.requests())
    async with open_websocket_url(ws_url(relay), extra_headers=auth(key)) as ws:
        prewarm = await turn(ws, create("deepseek-chat", [developer], generate=False))
        assert [f["type"] for f in prewarm] == ["response.created", "response.completed"]
        assert prewarm[-1]["response"]["output"] == []
        assert not [r for r in sim.requests()[before:] if marker in json.dumps(r["body"])]

        first = await turn(ws, create(
            "deepseek-chat", [{"role": "user", "content": "one #sim tokens=3 text=alpha"}],
            previous_response_id=prewarm[-1]["response"]["id"],
        ))
        assert first[-1]["type"] == "response.completed", first[-1]
        answer = "".join(f["delta"] for f in first if f["type"] == "response.output_text.delta")
        assert answer == "alpha alpha alpha"

        second = await turn(ws, create(
            "deepseek-chat", [{"role": "user", "content": "two #sim tokens=2 text=beta"}],
            previous_response_id=first[-1]["response"]["id"],
        ))
        assert second[-1]["type"] == "response.completed", second[-1]
    upstream = [r for r in sim.requests()[before:] if marker in json.dumps(r["body"])]
    assert [r["path"] for r in upstream] == ["/v1/chat/completions"] * 2
    messages = upstream[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"], messages
    assert "alpha alpha alpha" in json.dumps(messages[2])
    assert "two" in json.dumps(messages[3])
    rows = key_rows(relay, key_id, 2)
    assert [(r["endpoint"], r["status"], r["stream"]) for r in rows] == [("responses", 200, 1)] * 2
    assert all(r["output_tokens"] > 0 for r in rows)


async def test_frames_the_relay_cannot_use_get_error_frames(relay: Relay) -> None:
    """A bad frame is answered with an error frame and the socket goes on serving."""
    key, _ = new_key(relay)
    async with open_websocket_url(ws_url(relay), extra_headers=auth(key)) as ws:
        for frame, code in [
            (b"\x00\x01", "invalid_frame"),
            ("not json", "invalid_json"),
            ("[1, 2]", "invalid_json"),
            (json.dumps({"type": "response.bogus"}), "unknown_frame_type"),
        ]:
            await ws.send_message(frame)
            error = json.loads(await ws.get_message())
            assert (error["type"], error["status"], error["error"]["code"]) == (
                "error", 400, code), error
            assert error["error"]["message"]
        # Frames Codex sends after a response are accepted without an answer.
        await ws.send_message(json.dumps({"type": "response.processed", "response_id": "x"}))

        unknown = await turn(ws, create("no-such-model", "hi"))
        assert len(unknown) == 1 and unknown[0]["type"] == "error"
        assert (unknown[0]["status"], unknown[0]["error"]["code"]) == (404, "model_not_found")
        assert unknown[0]["headers"]["x-request-id"].startswith("req_")

        missing = await turn(ws, create(
            "deepseek-chat", "hi", previous_response_id="resp_never_made"))
        assert missing[-1]["type"] == "error" and missing[-1]["status"] == 400
        assert missing[-1]["error"]["param"] == "previous_response_id"

        ok = await turn(ws, create("deepseek-chat", "after errors #sim tokens=2 text=fine"))
        assert ok[-1]["type"] == "response.completed"


async def test_one_response_at_a_time(relay: Relay) -> None:
    key, _ = new_key(relay)
    async with open_websocket_url(ws_url(relay), extra_headers=auth(key)) as ws:
        await ws.send_message(create("deepseek-chat", "slow #sim tokens=40 delay=0.01"))
        first = json.loads(await ws.get_message())
        assert first["type"] == "response.created"
        await ws.send_message(create("deepseek-chat", "too soon"))
        frames = []
        with trio.fail_after(20):
            while not frames or frames[-1]["type"] != "response.completed":
                frames.append(json.loads(await ws.get_message()))
        errors = [f for f in frames if f["type"] == "error"]
        assert [e["error"]["code"] for e in errors] == ["response_in_progress"]
        deltas = [f for f in frames if f["type"] == "response.output_text.delta"]
        assert len(deltas) == 40  # the running response was not disturbed
        again = await turn(ws, create("deepseek-chat", "now #sim tokens=1 text=ok"))
        assert again[-1]["type"] == "response.completed"


@pytest.mark.parametrize("model", ["gpt-5.5", "deepseek-chat"])
async def test_client_close_mid_stream_cancels_upstream_and_frees_slots(
    relay: Relay, sim: Sim, model: str
) -> None:
    """Relayed (gpt-5.5 may go to a Responses account) and translated (deepseek-chat: Chat)."""
    key, key_id = new_key(relay)
    marker = f"ws-close-{model}-{time.monotonic_ns()}"
    async with open_websocket_url(ws_url(relay), extra_headers=auth(key)) as ws:
        await ws.send_message(create(model, f"{marker} #sim tokens=400 delay=0.01"))
        deltas = 0
        while deltas < 5:
            if json.loads(await ws.get_message())["type"] == "response.output_text.delta":
                deltas += 1
        assert relay.state()["active_requests"] == 1
        closed_at = time.monotonic()
    record = wait_upstream_closed(sim, marker)
    assert record["client_closed"] and not record["finished"]
    assert record["closed_at"] - closed_at < 1.0
    state = relay.wait_idle()
    assert state["active_requests"] == 0 and state["admission"]["total"] == 0
    assert not any(a["in_flight"] for a in state["accounts"].values())
    assert state["credits"]["holds"] == 0
    (row,) = key_rows(relay, key_id, 1)
    assert (row["status"], row["client_disconnected"]) == (200, 1)
    assert 0 < row["output_tokens"] < 400


async def test_handshake_refusals_are_http_errors(relay: Relay) -> None:
    with pytest.raises(ConnectionRejected) as missing:
        async with open_websocket_url(ws_url(relay)):
            pass
    assert missing.value.status_code == 401
    assert json.loads(missing.value.body)["error"]["type"] == "invalid_request_error"
    with pytest.raises(ConnectionRejected) as wrong:
        async with open_websocket_url(ws_url(relay), extra_headers=auth("sk-relay-wrong")):
            pass
    assert wrong.value.status_code == 401
    with pytest.raises(ConnectionRejected) as elsewhere:
        async with open_websocket_url(ws_url(relay, "/v1/models"), extra_headers=auth("x")):
            pass
    assert elsewhere.value.status_code == 404


@pytest.mark.parametrize(
    "path", ["/openai/v1/responses", "/openai/responses", "/codex/v1/responses"]
)
async def test_every_base_path_serves_the_socket_and_echoes_turn_state(
    relay: Relay, sim: Sim, path: str
) -> None:
    """The turns carry the handshake's session headers upstream, not its WebSocket ones."""
    key, _ = new_key(relay)
    marker = f"ws-headers-{time.monotonic_ns()}"
    headers = auth(
        key, ("x-codex-turn-state", "ts-42"), ("session-id", marker),
        ("openai-beta", "responses_websockets=2026-02-06"),
    )
    async with open_websocket_url(ws_url(relay, path), extra_headers=headers) as ws:
        assert dict(ws.handshake_headers)[b"x-codex-turn-state"] == b"ts-42"
        done = await turn(ws, create("deepseek-chat", f"{marker} #sim tokens=1 text=ok"))
        assert done[-1]["type"] == "response.completed"
    (upstream,) = [r for r in sim.requests() if marker in json.dumps(r["body"])]
    assert upstream["headers"]["session-id"] == marker
    assert "openai-beta" not in upstream["headers"] and "upgrade" not in upstream["headers"]
    assert not any(name.startswith("sec-websocket") for name in upstream["headers"])


LIMITED = dict(websocket_max_per_key=1, websocket_max_age_s=1.5)


@pytest.fixture(scope="module")
def limited(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("ws-limited"), sim.url, **LIMITED) as server:
        yield server


async def test_a_key_holds_at_most_its_socket_cap_and_a_socket_ages_out(limited: Relay) -> None:
    key, _ = new_key(limited)
    async with open_websocket_url(ws_url(limited), extra_headers=auth(key)) as ws:
        with pytest.raises(ConnectionRejected) as second:
            async with open_websocket_url(ws_url(limited), extra_headers=auth(key)):
                pass
        assert second.value.status_code == 429
        assert json.loads(second.value.body)["error"]["code"] == "websocket_limit_reached"
        other, _ = new_key(limited)  # another key is not affected
        async with open_websocket_url(ws_url(limited), extra_headers=auth(other)) as ws2:
            done = await turn(ws2, create("deepseek-chat", "hi #sim tokens=1 text=ok"))
            assert done[-1]["type"] == "response.completed"
        await trio.sleep(LIMITED["websocket_max_age_s"])
        aged = await turn(ws, create("deepseek-chat", "hi"))
        assert aged[-1]["error"]["code"] == "websocket_connection_limit_reached"
        with pytest.raises(ConnectionClosed):
            with trio.fail_after(5):
                await ws.get_message()
    # The closed socket no longer counts against the key.
    async with open_websocket_url(ws_url(limited), extra_headers=auth(key)) as ws:
        done = await turn(ws, create("deepseek-chat", "hi #sim tokens=1 text=ok"))
        assert done[-1]["type"] == "response.completed"


async def test_shutdown_closes_an_idle_socket_going_away(sim: Sim, tmp_path: Path) -> None:
    relay = start_relay(tmp_path, sim.url)
    try:
        key, _ = new_key(relay)
        async with open_websocket_url(ws_url(relay), extra_headers=auth(key)) as ws:
            done = await turn(ws, create("deepseek-chat", "hi #sim tokens=1 text=ok"))
            assert done[-1]["type"] == "response.completed"
            stopped_at = time.monotonic()
            relay.process.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                with trio.fail_after(5):
                    await ws.get_message()
            assert closed.value.reason.code == 1001
        with trio.fail_after(10):
            while relay.process.proc.poll() is None:
                await trio.sleep(0.05)
        assert relay.process.proc.returncode == 0
        assert time.monotonic() - stopped_at < 5  # not held until the graceful timeout
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log, log
