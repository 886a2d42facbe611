"""HTTP behaviour through real requests: paths, auth forms, headers and the malformed-request
table, each answered with OpenAI's error JSON."""

from __future__ import annotations

import json
import socket
import time

import httpx2
import pytest

from .conftest import Relay

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
HELLO = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi #sim tokens=2"}]}


def post(relay: Relay, path: str, body: object = None, *, key: str | None = "", **kwargs):
    headers = kwargs.pop("headers", {})
    if key == "":
        key = relay.key()
    if key is not None:
        headers.setdefault("authorization", f"Bearer {key}")
    if body is not None and "content" not in kwargs:
        kwargs["content"] = json.dumps(body)
        headers.setdefault("content-type", "application/json")
    return httpx2.post(relay.url + path, headers=headers, timeout=10, **kwargs)


MALFORMED = [
    # (case, path, body (bytes or JSON), extra headers, status, error type, error code)
    ("bad json", CHAT, b'{"model": "x",', {}, 400, "invalid_request_error", None),
    ("empty body", CHAT, b"", {}, 400, "invalid_request_error", None),
    ("body is an array", CHAT, [1, 2], {}, 400, "invalid_request_error", None),
    ("missing model", CHAT, {"messages": [{"role": "user", "content": "x"}]}, {}, 400,
     "invalid_request_error", None),
    ("model not a string", CHAT, {"model": 5, "messages": []}, {}, 400,
     "invalid_request_error", None),
    ("missing messages", CHAT, {"model": "deepseek-chat"}, {}, 400, "invalid_request_error",
     None),
    ("messages not a list", CHAT, {"model": "deepseek-chat", "messages": "hi"}, {}, 400,
     "invalid_request_error", None),
    ("empty messages", CHAT, {"model": "deepseek-chat", "messages": []}, {}, 400,
     "invalid_request_error", None),
    ("message without role", CHAT, {"model": "deepseek-chat", "messages": [{"content": "x"}]},
     {}, 400, "invalid_request_error", None),
    ("stream not a boolean", CHAT, {**HELLO, "stream": "yes"}, {}, 400,
     "invalid_request_error", None),
    ("max_tokens negative", CHAT, {**HELLO, "max_tokens": -1}, {}, 400,
     "invalid_request_error", None),
    ("temperature a string", CHAT, {**HELLO, "temperature": "hot"}, {}, 400,
     "invalid_request_error", None),
    ("tools not a list", CHAT, {**HELLO, "tools": {}}, {}, 400, "invalid_request_error", None),
    ("stream_options without stream", CHAT, {**HELLO, "stream_options": {"include_usage": True}},
     {}, 400, "invalid_request_error", None),
    ("responses without input", RESPONSES, {"model": "gpt-5.5"}, {}, 400,
     "invalid_request_error", None),
    ("responses input a number", RESPONSES, {"model": "gpt-5.5", "input": 3}, {}, 400,
     "invalid_request_error", None),
    ("unknown model", CHAT, {**HELLO, "model": "gpt-nope"}, {}, 404, "invalid_request_error",
     "model_not_found"),
    ("upstream unreachable", CHAT, {**HELLO, "model": "unreachable-model"},
     {}, 502, "upstream_error", "upstream_unreachable"),
    ("text/plain body", CHAT, HELLO, {"content-type": "text/plain"}, 415,
     "invalid_request_error", "unsupported_media_type"),
    ("gzip body", CHAT, HELLO, {"content-encoding": "gzip"}, 415, "invalid_request_error",
     "unsupported_media_type"),
]


@pytest.mark.parametrize(
    ("case", "path", "body", "headers", "status", "error_type", "code"),
    MALFORMED,
    ids=[row[0] for row in MALFORMED],
)
def test_malformed_request(relay, case, path, body, headers, status, error_type, code) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {}
    response = post(relay, path, body, headers=dict(headers), **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]
    assert response.headers["x-request-id"].startswith("req_")


def test_malformed_field_is_named_in_param(relay: Relay) -> None:
    error = post(relay, CHAT, {**HELLO, "max_tokens": "10"}).json()["error"]
    assert error["param"] == "max_tokens"
    assert "'max_tokens' must be an integer" in error["message"]


def test_oversized_body_is_413(tmp_path, sim) -> None:
    from .conftest import start_relay

    small = start_relay(tmp_path, sim.url, max_body_bytes=1024)
    try:
        big = {**HELLO, "messages": [{"role": "user", "content": "x" * 5000}]}
        response = post(small, CHAT, big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        # Without Content-Length (chunked upload) the cap holds too.
        chunked = post(small, CHAT, None, content=iter([json.dumps(big).encode()]),
                       headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert post(small, CHAT, HELLO).status_code == 200
    finally:
        small.process.stop()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": "Basic Zm9vOmJhcg=="}, 401),
    ],
)
def test_bad_credentials_are_401(relay: Relay, headers, status) -> None:
    response = post(relay, CHAT, HELLO, key=None, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("form", ["bearer", "bare", "x-api-key"])
def test_key_accepted_in_every_form(relay: Relay, form: str) -> None:
    key = relay.key()
    headers = {
        "bearer": {"authorization": f"Bearer {key}"},
        "bare": {"authorization": key},
        "x-api-key": {"x-api-key": key},
    }[form]
    response = post(relay, CHAT, HELLO, key=None, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "tok tok"


@pytest.mark.parametrize("base", ["/openai/v1", "/v1", "/codex/v1", "/api/v1"])
def test_every_base_path_serves_every_endpoint(relay: Relay, base: str) -> None:
    assert httpx2.get(relay.url + base).status_code == 200
    assert post(relay, base + "/chat/completions", HELLO).status_code == 200
    response = post(relay, base + "/responses", {"model": "gpt-5.5", "input": "hi #sim tokens=1"})
    assert response.json()["output"][-1]["content"][0]["text"] == "tok"
    models = httpx2.get(
        relay.url + base + "/models", headers={"authorization": f"Bearer {relay.key()}"}
    ).json()
    assert models["object"] == "list" and "gpt-5.5" in [m["id"] for m in models["data"]]


def test_codex_base_without_v1(relay: Relay) -> None:
    response = post(relay, "/openai/responses", {"model": "gpt-5.5", "input": "hi #sim tokens=1"})
    assert response.status_code == 200
    assert response.json()["object"] == "response"


def test_healthz_and_unknown_path_and_method(relay: Relay) -> None:
    assert httpx2.get(relay.url + "/healthz").json()["status"] == "ok"
    missing = httpx2.get(relay.url + "/v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    wrong = httpx2.get(relay.url + CHAT)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["type"] == "invalid_request_error"


#: Headers that differ between any two answers: when, and which request.
PER_ANSWER = {"date", "x-request-id"}


def stable_headers(response: httpx2.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name not in PER_ANSWER}


@pytest.mark.parametrize(
    ("path", "accept", "keyed"),
    [
        ("/", "application/json", False),
        ("/", "text/html", False),  # the workbench page for a browser
        ("/workbench", "", False),
        ("/web/app.js", "", False),
        ("/healthz", "", False),
        ("/openai", "", False),
        *((base + "/models", "", True) for base in ("/v1", "/openai/v1", "/codex/v1", "/api/v1")),
        ("/v1/models", "", False),  # 401 without a key: the same refusal, without its body
        ("/v1/models/gpt-5", "", True),
        ("/v1/models/nope", "", True),  # 404
    ],
)
def test_head_answers_as_get_without_the_body(
    relay: Relay, path: str, accept: str, keyed: bool
) -> None:
    headers = {"accept": accept} if accept else {}
    if keyed:
        headers["authorization"] = f"Bearer {relay.key()}"
    with httpx2.Client(base_url=relay.url, headers=headers, timeout=10) as client:
        got = client.get(path)
        head = client.head(path)
    assert head.status_code == got.status_code
    assert head.content == b"" and got.content
    assert int(head.headers["content-length"]) == len(got.content)
    assert stable_headers(head) == stable_headers(got)
    assert head.headers["x-request-id"] != got.headers["x-request-id"]


def test_head_on_a_post_route_is_405_naming_post(relay: Relay) -> None:
    response = httpx2.head(relay.url + CHAT)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.content == b""
    assert httpx2.post(relay.url + "/healthz").headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("path", [CHAT, RESPONSES])
def test_upstream_errors_keep_their_status(relay: Relay, path: str, stream: bool) -> None:
    for fault, status in (("429", 429), ("500", 500), ("400", 400), ("401", 401)):
        relay.enable_accounts()  # the 401 takes the account out of service; 429 rests it
        text = f"hi #sim fault={fault}"
        if path == CHAT:
            body = {**HELLO, "stream": stream, "messages": [{"role": "user", "content": text}]}
        else:
            body = {"model": "gpt-5.5", "stream": stream, "input": text}
        response = post(relay, path, body)
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        if fault == "429":
            assert response.headers["retry-after"] == "2"
        row = relay.usage_row(response.headers["x-request-id"])
        assert row["status"] == status and row["output_tokens"] == 0
    relay.enable_accounts()


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_unreachable_upstream_is_502_before_streaming(relay: Relay, stream: bool) -> None:
    response = post(relay, CHAT, {**HELLO, "model": "unreachable-model", "stream": stream})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


def test_upstream_401_is_not_blamed_on_the_client_key(relay: Relay) -> None:
    body = {**HELLO, "messages": [{"role": "user", "content": "#sim fault=401"}]}
    response = post(relay, CHAT, body)
    state = relay.state()["accounts"]["sim-chat"]
    relay.enable_accounts()
    assert state["disabled"] and not state["healthy"]  # out of service until re-enabled
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "upstream_credentials_rejected"
    assert "not your API key" in error["message"]


def test_upstream_unreachable_is_502_and_recorded(relay: Relay) -> None:
    response = post(relay, CHAT, {**HELLO, "model": "unreachable-model"})
    assert response.status_code == 502
    row = relay.usage_row(response.headers["x-request-id"])
    assert (row["status"], row["account"], row["output_tokens"]) == (502, "nowhere", 0)


def test_upstream_silence_is_504(tmp_path, sim) -> None:
    from .conftest import start_relay

    impatient = start_relay(tmp_path, sim.url, upstream_read_timeout_s=0.5)
    try:
        body = {**HELLO, "messages": [{"role": "user", "content": "#sim fault=stall"}]}
        started = time.monotonic()
        response = post(impatient, CHAT, body)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started < 5
        assert impatient.wait_idle()["admission"]["total"] == 0
    finally:
        impatient.process.stop()


def test_upstream_silence_mid_stream_ends_with_error_event(tmp_path, sim) -> None:
    """The stream's watcher, not a timeout per read, notices the upstream stopped sending."""
    from .conftest import start_relay

    impatient = start_relay(tmp_path, sim.url, upstream_read_timeout_s=0.5)
    headers = {"authorization": f"Bearer {impatient.key()}"}
    try:
        chat = {**HELLO, "stream": True,
                "messages": [{"role": "user", "content": "#sim fault=stall tokens=10"}]}
        started = time.monotonic()
        with httpx2.stream("POST", impatient.url + CHAT, json=chat, headers=headers) as response:
            assert response.status_code == 200
            datas = [line[6:] for line in response.iter_lines() if line.startswith("data:")]
        assert time.monotonic() - started < 5
        assert any(json.loads(d).get("choices") for d in datas[:-1])  # the answer had begun
        last = json.loads(datas[-1])
        assert last["error"]["code"] == "upstream_timeout"
        assert "went silent" in last["error"]["message"]
        row = impatient.usage_row(response.headers["x-request-id"])
        assert (row["status"], row["error_code"]) == (200, "upstream_timeout")
        assert row["output_tokens"] > 0

        codex = {"model": "gpt-5.5", "stream": True, "input": "#sim fault=stall tokens=10"}
        with httpx2.stream("POST", impatient.url + RESPONSES, json=codex,
                           headers=headers) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data:")]
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["error"]["code"] == "upstream_timeout"
        assert impatient.wait_idle()["admission"]["total"] == 0
    finally:
        impatient.process.stop()


def test_upstream_drop_mid_stream_ends_with_error_event(relay: Relay) -> None:
    body = {**HELLO, "stream": True,
            "messages": [{"role": "user", "content": "#sim fault=drop tokens=10"}]}
    with httpx2.stream("POST", relay.url + CHAT, json=body,
                       headers={"authorization": f"Bearer {relay.key()}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_unreachable"
    row = relay.usage_row(response.headers["x-request-id"])
    assert row["error_code"] == "upstream_unreachable" and row["usage_source"] == "estimate"
    assert row["output_tokens"] > 0


def test_responses_drop_mid_stream_ends_with_response_failed(relay: Relay) -> None:
    body = {"model": "gpt-5.5", "stream": True, "input": "#sim fault=drop tokens=10"}
    with httpx2.stream("POST", relay.url + RESPONSES, json=body,
                       headers={"authorization": f"Bearer {relay.key()}"}) as response:
        datas = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data:")]
    assert datas[-1]["type"] == "response.failed"
    assert datas[-1]["sequence_number"] == datas[-2]["sequence_number"] + 1
    assert datas[-1]["response"]["id"] == datas[0]["response"]["id"]


def test_sse_headers(relay: Relay) -> None:
    with httpx2.stream("POST", relay.url + CHAT, json={**HELLO, "stream": True},
                       headers={"authorization": f"Bearer {relay.key()}"}) as response:
        response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"].startswith("req_")


def test_revoked_key_is_refused(relay: Relay) -> None:
    key = relay.create_key(name="to revoke")
    assert post(relay, CHAT, HELLO, key=key).status_code == 200
    done = relay.cli("keys", "revoke", key, "--config", str(relay.config_path))
    assert done.returncode == 0 and "revoked key_" in done.stdout
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        response = post(relay, CHAT, HELLO, key=key)
        if response.status_code == 401:
            break
        time.sleep(0.1)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "revoked_api_key"


def _raw_exchange(relay: Relay, request: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send raw bytes; return what came back and when the server closed (or timeout)."""
    host, port = relay.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        started = time.monotonic()
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, time.monotonic() - started
            data += chunk


def _chat_request(relay: Relay, version: bytes, extra: bytes = b"") -> bytes:
    body = json.dumps(HELLO).encode()
    return (
        b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: x\r\n" + extra
        + b"Authorization: Bearer " + relay.key().encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


def test_connection_close_is_honoured(relay: Relay) -> None:
    data, elapsed = _raw_exchange(relay, _chat_request(relay, b"1.1", b"Connection: close\r\n"))
    assert data.startswith(b"HTTP/1.1 200")
    assert b"tok tok" in data
    assert elapsed < 2.0  # closed at once, not after the keep-alive timeout


def test_http10_connection_is_closed(relay: Relay) -> None:
    data, elapsed = _raw_exchange(relay, _chat_request(relay, b"1.0"))
    assert b" 200 " in data.split(b"\r\n")[0]
    assert elapsed < 2.0


def test_idle_keepalive_connection_is_closed_but_long_streams_are_not(tmp_path, sim) -> None:
    from .conftest import start_relay

    quick = start_relay(tmp_path, sim.url, keep_alive_timeout_s=0.5)
    try:
        data, elapsed = _raw_exchange(quick, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200")
        assert 0.3 < elapsed < 3.0
        # A stream far longer than any idle timeout runs to its end.
        body = {**HELLO, "stream": True,
                "messages": [{"role": "user", "content": "#sim tokens=20 delay=0.1"}]}
        with httpx2.stream("POST", quick.url + CHAT, json=body, timeout=10,
                           headers={"authorization": f"Bearer {quick.key()}"}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        text = "".join(
            (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
            for line in lines[:-1]
        )
        assert text == " ".join(["tok"] * 20)
    finally:
        quick.process.stop()


def test_websocket_upgrade_elsewhere_gets_404(relay: Relay) -> None:
    """Only ``{base}/responses`` serves a WebSocket; an upgrade anywhere else is a JSON 404."""
    data, _ = _raw_exchange(
        relay,
        b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 404")
    assert b"x-request-id: req_" in data.lower()
    assert b"unknown_url" in data and b"/v1/responses" in data
