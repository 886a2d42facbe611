"""HTTP/1.1 framing as a hostile or broken client sends it, over raw sockets to a real relay:
body timeouts, absurd chunk sizes, ambiguous framing, duplicate headers, requests h11 cannot
read (answered in OpenAI's error JSON), and a fuzz of all of it that must leave the relay
serving, with no 5xx and no traceback."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx2
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from .conftest import Relay, running_relay

BODY_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1.5
HELLO = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def server(sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(
        tmp_path_factory.mktemp("framing"), sim.url,
        body_read_timeout_s=BODY_TIMEOUT_S, keep_alive_timeout_s=KEEP_ALIVE_S,
        max_body_bytes=1024 * 1024,
    ) as relay:
        yield relay


def _connect(relay: Relay, timeout: float = 10) -> socket.socket:
    host, port = relay.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the relay closes the connection (or the socket's timeout)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        pass
    return data


def _exchange(relay: Relay, request: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send ``request``; what came back until the relay closed, and how long that took."""
    with _connect(relay, timeout) as sock:
        started = time.monotonic()
        sock.sendall(request)
        return _read_all(sock), time.monotonic() - started


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``data``: (status, headers, body), bodies by Content-Length."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        assert "chunked" not in headers.get("transfer-encoding", ""), data
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def _error(body: bytes) -> dict:
    """OpenAI's error shape, checked field by field."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def _head(relay: Relay, extra: bytes = b"", *, method: bytes = b"POST") -> bytes:
    return (
        method + b" /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + relay.key().encode() + b"\r\n"
        b"Content-Type: application/json\r\n" + extra
    )


def test_trickled_body_gets_408_and_the_connection_closes(server: Relay) -> None:
    body = json.dumps(HELLO).encode()
    with _connect(server) as sock:
        started = time.monotonic()
        sock.sendall(_head(server, b"Content-Length: %d\r\n\r\n" % len(body)))
        sent = 0
        sock.settimeout(0.25)
        data = b""
        while time.monotonic() - started < 10 and not data:
            if sent < len(body):
                sock.sendall(body[sent:sent + 1])  # 4 bytes a second
                sent += 1
            try:
                data = sock.recv(65536)
            except TimeoutError:
                pass
        sock.settimeout(5)
        data += _read_all(sock)
        elapsed = time.monotonic() - started
    [(status, headers, payload)] = _responses(data)
    assert status == 408
    assert _error(payload)["code"] == "request_timeout"
    assert headers.get("connection") == "close"
    assert BODY_TIMEOUT_S * 0.8 < elapsed < BODY_TIMEOUT_S + 4


def test_stalled_chunked_body_gets_408(server: Relay) -> None:
    data, elapsed = _exchange(
        server, _head(server, b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
    )
    [(status, _, payload)] = _responses(data)
    assert status == 408 and _error(payload)["code"] == "request_timeout"
    assert elapsed < BODY_TIMEOUT_S + 4


def test_absurd_chunk_size_is_refused_at_once(server: Relay) -> None:
    data, elapsed = _exchange(
        server, _head(server, b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\nabc")
    )
    [(status, headers, payload)] = _responses(data)
    assert status == 413 and _error(payload)["code"] == "request_too_large"
    assert headers["connection"] == "close"
    assert elapsed < BODY_TIMEOUT_S * 0.8  # not waited on


def test_trickled_request_head_is_closed_after_keep_alive_timeout(server: Relay) -> None:
    with _connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.3)
        closed = False
        while time.monotonic() - started < 8:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    assert closed
    assert time.monotonic() - started < KEEP_ALIVE_S + 3


def test_content_length_with_transfer_encoding_is_400_and_closes(server: Relay) -> None:
    body = json.dumps(HELLO).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    follow = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"  # would be smuggled
    data, _ = _exchange(
        server,
        _head(server, b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n")
        + chunked + follow,
    )
    [(status, headers, payload)] = _responses(data)  # and nothing for the smuggled request
    assert status == 400
    assert _error(payload)["code"] == "ambiguous_framing"
    assert headers["connection"] == "close"


@pytest.mark.parametrize("name", ["Authorization", "Content-Type", "Session-Id", "X-Api-Key"])
def test_singleton_header_twice_with_different_values_is_400(server: Relay, name: str) -> None:
    body = json.dumps(HELLO).encode()
    extra = b"%s: a\r\n%s: b\r\nContent-Length: %d\r\n\r\n" % (
        name.encode(), name.encode(), len(body)
    )
    data, _ = _exchange(server, _head(server, extra) + body)
    [(status, headers, payload)] = _responses(data)
    assert status == 400
    error = _error(payload)
    assert error["code"] == "duplicate_header" and error["param"] == name.lower()
    assert name.lower() in error["message"]
    assert headers["connection"] == "close"


def test_same_value_twice_and_list_headers_are_accepted(server: Relay) -> None:
    body = json.dumps(HELLO).encode()
    key = server.key().encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key
        + b"\r\nAuthorization: Bearer " + key + b"\r\nAccept: text/plain\r\nAccept: */*\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    data, _ = _exchange(server, request)
    [(status, _, payload)] = _responses(data)
    assert status == 200, payload
    assert json.loads(payload)["object"] == "chat.completion"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "malformed_request"),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            400, "unsupported_transfer_encoding",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
            431, "request_header_fields_too_large",
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\nzz\r\n", 400, "malformed_request",
        ),
    ],
    ids=["request-line", "header-line", "transfer-encoding", "huge-headers", "chunk-header"],
)
def test_unreadable_http_is_answered_in_openai_error_json(
    server: Relay, request_bytes: bytes, status: int, code: str
) -> None:
    data, _ = _exchange(server, request_bytes)
    [(got, headers, payload)] = _responses(data)
    assert got == status
    assert headers["content-type"] == "application/json"
    error = _error(payload)
    assert error["code"] == code and error["type"] == "invalid_request_error"


# -- fuzz ----------------------------------------------------------------------------------

_TOKENS = st.sampled_from(
    [b"GET", b"POST", b"PUT", b"\x00", b"G\xffT", b"", b" ", b"PRI", b"OPTIONS"]
)
_TARGETS = st.sampled_from(
    [b"/", b"/v1/chat/completions", b"/healthz", b"*", b"", b"/%ff", b"/a b", b"http://x/",
     b"/v1/models?x=\xff", b"/" + b"a" * 9000]
)
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"", b"http/1.1"])
_HEADER_LINES = st.sampled_from(
    [
        b"Host: x", b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999",
        b"Content-Length: 1, 2", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: chunked, identity", b"Connection: close", b"Connection: keep-alive",
        b"Content-Type: application/json", b"Authorization: Bearer nope", b"Bad header",
        b" leading: space", b"X-Null: a\x00b", b"X-Latin: \xe9", b"Expect: 100-continue",
        b"Upgrade: h2c", b"Upgrade: websocket", b"X-Big: " + b"b" * 20_000, b":", b"Session-Id: s",
    ]
)
_BODIES = st.sampled_from(
    [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"5\r\nhel", b"0\r\n\r\n",
     b"f" * 25 + b"\r\n", b"{}", b"3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"]
)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    line = b" ".join([draw(_TOKENS), draw(_TARGETS), draw(_VERSIONS)])
    headers = draw(st.lists(_HEADER_LINES, max_size=6))
    message = line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + draw(_BODIES)
    if draw(st.booleans()):  # pipelined: a second request right behind
        message += b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    return message


def _check_responses(data: bytes) -> None:
    """No 5xx; every response that has a body is JSON in OpenAI's shape (or the relay's own
    JSON for its health route)."""
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"incomplete response: {data[:200]!r}")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        assert status < 500, data[:500]
        headers = {}
        for text in lines[1:]:
            name, _, value = text.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            body, data = rest[:length], rest[length:]
        else:
            body, data = rest, b""  # read to close (an error answer with no length)
        if status == 100:
            continue
        if body:
            payload = json.loads(body)
            if status >= 400:
                _error(json.dumps(payload).encode())


def test_framing_fuzz_never_5xx_and_always_json(server: Relay) -> None:
    # Key lookups take a CLI call: made once, before the fuzz.
    server.key()

    @seed(20240612)
    @settings(
        max_examples=300, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(_requests())
    def run(message: bytes) -> None:
        with _connect(server, timeout=BODY_TIMEOUT_S + 4) as sock:
            try:
                sock.sendall(message)
                sock.shutdown(socket.SHUT_WR)  # the end of what this client sends
            except (BrokenPipeError, ConnectionResetError):
                pass
            _check_responses(_read_all(sock))

    run()
    # Still serving, and nothing left running.
    assert httpx2.get(server.url + "/healthz", timeout=5).status_code == 200
    state = server.wait_idle()
    assert state["active_requests"] == 0
    assert "Traceback" not in server.process.log.read_text()
