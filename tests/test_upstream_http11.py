"""The upstream hop's HTTP/1.1 client (relay/upstream/http11.py) against the simulated upstream,
in process, and against small servers that behave as real upstreams sometimes do (close idle
connections, compress, serve TLS)."""

from __future__ import annotations

import contextlib
import gzip
import json
import ssl
import subprocess
from pathlib import Path

import h11
import httpx2
import pytest
import trio

from relay.testing.sim_wire import gzip_bomb
from relay.testing.upstream import SimProfile, SimUpstream
from relay.upstream.h1 import DECODE_STEP_BYTES
from relay.upstream.http11 import (
    ConnectionPool,
    PoolTimeout,
    ReadTimeout,
    ResponseTooLarge,
    TransportError,
    UnsendableRequest,
)
from relay.upstream.proxy import DIRECT

from .conftest import Sim, running_relay

HEADERS = [("content-type", "application/json"), ("authorization", "Bearer sk-sim")]


def pool(**options) -> ConnectionPool:
    settings = {
        "max_connections": 10,
        "max_idle_connections": 10,
        "keepalive_expiry_s": 90.0,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 5.0,
        "pool_timeout_s": 2.0,
        **options,
    }
    return ConnectionPool(**settings)


def chat(content: str, *, stream: bool = False) -> bytes:
    body = {"model": "gpt-5", "messages": [{"role": "user", "content": content}], "stream": stream}
    return json.dumps(body).encode()


def with_length(body: bytes) -> list[tuple[str, str]]:
    return [*HEADERS, ("content-length", str(len(body)))]


async def post(client: ConnectionPool, url: str, body: bytes):
    return await client.post(url, with_length(body), body)


@pytest.fixture
async def local_sim(nursery: trio.Nursery) -> tuple[SimUpstream, str]:
    upstream = SimUpstream(SimProfile(ttft_s=0, token_delay_s=0, output_tokens=5))
    port = await nursery.start(upstream.serve)
    return upstream, f"http://127.0.0.1:{port}/v1/chat/completions"


async def wait_for(predicate, timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_finished_answer_leaves_its_connection_for_the_next_request(local_sim) -> None:
    upstream, url = local_sim
    client = pool()
    answers = []
    for _ in range(3):
        response = await post(client, url, chat("hello"))
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        answers.append(json.loads(await response.aread()))
        assert (client.idle_connections, client.busy_connections) == (1, 0)
    assert [a["usage"]["completion_tokens"] for a in answers] == [5, 5, 5]
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions"] * 3
    await client.aclose()


async def test_a_stream_arrives_as_sent_and_closing_it_early_frees_everything(local_sim) -> None:
    upstream, url = local_sim
    client = pool()
    response = await post(client, url, chat("#sim tokens=50 delay=0.02", stream=True))
    assert response.headers["content-type"].startswith("text/event-stream")
    first = await response.__anext__()
    assert first.startswith(b"data: {")
    assert client.busy_connections == 1
    await response.aclose()
    assert (client.idle_connections, client.busy_connections) == (0, 0)
    await wait_for(lambda: upstream.requests[-1].client_closed)
    assert not upstream.requests[-1].finished
    assert upstream.active_streams == 0
    # The whole stream, read to the end, ends with [DONE] and returns its connection.
    response = await post(client, url, chat("#sim tokens=8", stream=True))
    body = b"".join([piece async for piece in response])
    assert body.rstrip().endswith(b"data: [DONE]")
    await wait_for(lambda: upstream.requests[-1].finished)
    assert body.count(b"data: ") == upstream.requests[-1].events_sent  # [DONE] included
    assert (client.idle_connections, client.busy_connections) == (1, 0)


async def test_a_stream_cut_by_the_upstream_is_a_transport_error(local_sim) -> None:
    _, url = local_sim
    client = pool()
    for fault in ("drop", "reset"):
        response = await post(client, url, chat(f"#sim fault={fault} tokens=10", stream=True))
        with pytest.raises(TransportError):
            async for _ in response:
                pass
        assert (client.idle_connections, client.busy_connections) == (0, 0)
    with pytest.raises(TransportError, match="closed the connection before answering"):
        await post(client, url, chat("#sim fault=drop"))


async def test_silence_beyond_the_read_timeout(local_sim) -> None:
    upstream, url = local_sim
    client = pool(read_timeout_s=0.3)
    response = await post(client, url, chat("#sim fault=stall", stream=True))
    started = trio.current_time()
    with pytest.raises(ReadTimeout):
        async for _ in response:
            pass
    assert 0.25 < trio.current_time() - started < 2.0
    await wait_for(lambda: upstream.requests[-1].client_closed)
    assert client.busy_connections == 0
    with pytest.raises(ReadTimeout):
        await post(client, url, chat("#sim slow_headers=1"))


async def test_every_connection_busy_waits_for_the_pool_timeout_then_fails(local_sim) -> None:
    _, url = local_sim
    client = pool(max_connections=1, pool_timeout_s=0.2)
    first = await post(client, url, chat("#sim tokens=100 delay=0.05", stream=True))
    with pytest.raises(PoolTimeout, match="all 1 upstream connections stayed busy"):
        await post(client, url, chat("hello"))

    async def close_soon() -> None:
        await trio.sleep(0.05)
        await first.aclose()

    client = pool(max_connections=1, pool_timeout_s=2.0)
    first = await post(client, url, chat("#sim tokens=100 delay=0.05", stream=True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_soon)
        second = await post(client, url, chat("hello"))  # waits for the slot first frees
        assert json.loads(await second.aread())["object"] == "chat.completion"


async def test_an_upstream_that_is_not_there() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens on the port now
    client = pool()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}: .*Connection refused"):
        await post(client, f"http://127.0.0.1:{port}/v1/chat/completions", chat("hi"))
    assert client.busy_connections == 0


async def serve_raw(nursery: trio.Nursery, answer: bytes, *, close_after_s: float | None) -> int:
    """A server that answers every request on a connection with ``answer`` and, like an upstream
    with a short keep-alive timeout, closes the connection ``close_after_s`` after an answer
    (without saying so in a header). Returns its port."""

    async def connection(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # a client that hung up
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif type(event) is h11.EndOfMessage:
                        await stream.send_all(answer)
                        if close_after_s is not None:
                            await trio.sleep(close_after_s)
                            return
                        conn = h11.Connection(h11.SERVER)

    listeners = await nursery.start(trio.serve_tcp, connection, 0)
    return listeners[0].socket.getsockname()[1]


def raw_answer(body: bytes, *headers: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_an_idle_connection_the_upstream_closed_is_not_reused(nursery) -> None:
    port = await serve_raw(nursery, raw_answer(b'{"ok":1}'), close_after_s=0.05)
    client = pool()
    url = f"http://127.0.0.1:{port}/x"
    assert await (await post(client, url, b"{}")).aread() == b'{"ok":1}'
    assert client.idle_connections == 1
    await trio.sleep(0.2)  # the upstream has closed it meanwhile
    assert await (await post(client, url, b"{}")).aread() == b'{"ok":1}'
    assert client.idle_connections == 1  # the closed one was dropped, the new one kept


async def test_a_connection_past_its_keepalive_expiry_is_not_reused(nursery) -> None:
    port = await serve_raw(nursery, raw_answer(b"{}"), close_after_s=None)
    client = pool(keepalive_expiry_s=0.05)
    url = f"http://127.0.0.1:{port}/x"
    first = await post(client, url, b"{}")
    await first.aread()
    kept = client._idle[(("http", "127.0.0.1", port), DIRECT)][0]
    await trio.sleep(0.1)
    await (await post(client, url, b"{}")).aread()
    assert kept.socket.fileno() == -1  # closed when it was found expired
    assert client.idle_connections == 1


async def test_a_compressed_answer_is_read_decompressed(nursery) -> None:
    packed = gzip.compress(b'{"object":"chat.completion"}')
    answer = raw_answer(packed, "content-encoding: gzip")
    port = await serve_raw(nursery, answer, close_after_s=None)
    response = await post(pool(), f"http://127.0.0.1:{port}/x", b"{}")
    assert await response.aread() == b'{"object":"chat.completion"}'


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_an_https_upstream_with_its_certificate_checked(nursery, certificate) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    upstream = SimUpstream(SimProfile(ttft_s=0, token_delay_s=0, output_tokens=3))
    listeners = await nursery.start(
        trio.serve_ssl_over_tcp, upstream._connection, 0, server_context
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    url = f"https://localhost:{port}/v1/chat/completions"

    trusting = pool(ssl_context_factory=lambda: ssl.create_default_context(cafile=str(cert)))
    for _ in range(2):
        response = await post(trusting, url, chat("#sim tokens=4", stream=True))
        body = b"".join([piece async for piece in response])
        assert body.rstrip().endswith(b"data: [DONE]")
    assert trusting.idle_connections == 1  # reused over TLS too
    await wait_for(lambda: upstream.requests[-1].finished)

    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        await post(pool(), url, chat("hi"))  # the system's trust store does not know it


async def serve_early_answer(nursery: trio.Nursery) -> int:
    """An upstream that refuses an oversized body as soon as it has read the head: 413 and
    close, without reading the rest (as proxies and APIs in front of size limits do)."""

    async def connection(stream: trio.SocketStream) -> None:
        head = b""
        async with stream:
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            await stream.send_all(
                raw_answer(b'{"error":{"message":"too large"}}', "connection: close")
                .replace(b"200 OK", b"413 Payload Too Large")
            )

    listeners = await nursery.start(trio.serve_tcp, connection, 0)
    return listeners[0].socket.getsockname()[1]


async def test_an_answer_sent_before_the_body_was_read_is_what_the_caller_gets(nursery) -> None:
    port = await serve_early_answer(nursery)
    client = pool()
    big = b'{"pad": "' + b"x" * (8 * 2**20) + b'"}'  # more than the socket buffers hold
    response = await post(client, f"http://127.0.0.1:{port}/x", big)
    assert response.status_code == 413
    assert b"too large" in await response.aread()
    assert (client.idle_connections, client.busy_connections) == (0, 0)


async def test_bytes_beyond_the_answer_are_never_served_to_the_next_request(nursery) -> None:
    # The upstream sends its answer and, in the same write, one nobody asked for.
    port = await serve_raw(
        nursery, raw_answer(b"first") + raw_answer(b"stale"), close_after_s=None
    )
    client = pool()
    url = f"http://127.0.0.1:{port}/x"
    assert await (await post(client, url, b"{}")).aread() == b"first"
    assert client.idle_connections == 0  # not kept: it holds bytes past the answer
    assert await (await post(client, url, b"{}")).aread() == b"first"


async def test_the_idle_cap_evicts_the_longest_idle_not_the_newcomer(nursery) -> None:
    a = await serve_raw(nursery, raw_answer(b"a"), close_after_s=None)
    b = await serve_raw(nursery, raw_answer(b"b"), close_after_s=None)
    client = pool(max_idle_connections=1)
    await (await post(client, f"http://127.0.0.1:{a}/x", b"{}")).aread()
    kept_a = client._idle[(("http", "127.0.0.1", a), DIRECT)][0]
    await (await post(client, f"http://127.0.0.1:{b}/x", b"{}")).aread()
    assert kept_a.socket.fileno() == -1  # closed to make room
    assert len(client._idle[(("http", "127.0.0.1", b), DIRECT)]) == 1
    assert client.idle_connections == 1


@pytest.mark.parametrize(
    ("header", "complaint"),
    [(("x-note", "bad\r\nx-injected: 1"), "header"),
     (("transfer-encoding", "chunked"), "connection's"),
     (("Connection", "upgrade"), "connection's")],
)
async def test_a_header_http11_cannot_carry_is_the_callers_error(
    local_sim, header: tuple[str, str], complaint: str
) -> None:
    _, url = local_sim
    client = pool()
    with pytest.raises(UnsendableRequest, match=complaint):
        await client.post(url, [*with_length(b"{}"), header], b"{}")
    assert client.busy_connections == 0


async def test_all_connections_busy_is_a_503_that_blames_no_account(
    sim: Sim, tmp_path
) -> None:
    with running_relay(
        tmp_path, sim.url, upstream_max_connections=1, upstream_connect_timeout_s=0.3
    ) as relay:
        key = relay.key()
        headers = {"authorization": f"Bearer {key}"}
        long = {
            "model": "gpt-5",
            "stream": True,
            "messages": [{"role": "user", "content": "#sim tokens=200 delay=0.01"}],
        }
        async with httpx2.AsyncClient(base_url=relay.url + "/v1", headers=headers) as http:
            async with http.stream("POST", "/chat/completions", json=long) as holding:
                assert holding.status_code == 200
                busy = await http.post(
                    "/chat/completions",
                    json={"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]},
                )
        assert busy.status_code == 503
        error = busy.json()["error"]
        assert error["code"] == "relay_busy"
        assert "upstream_max_connections" in error["message"]
        assert busy.headers["retry-after"] == "1"
        accounts = relay.state()["accounts"]
        assert all(a["healthy"] and not a["last_error"] for a in accounts.values()), accounts


def chunked_answer(body: bytes, *headers: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "transfer-encoding: chunked", *headers]
    framed = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    return ("\r\n".join(head) + "\r\n\r\n").encode() + framed


async def test_a_gzip_bomb_is_decoded_in_steps_no_larger_than_a_read(nursery) -> None:
    bomb = gzip_bomb(b"data: ", 64 << 20)  # 64 KiB that inflate to 64 MiB
    port = await serve_raw(
        nursery, chunked_answer(bomb, "content-encoding: gzip"), close_after_s=None
    )
    response = await post(pool(), f"http://127.0.0.1:{port}/x", b"{}")
    sizes = [len(piece) async for piece in response]
    assert max(sizes) <= DECODE_STEP_BYTES
    assert sum(sizes) == len(gzip.decompress(bomb))


@pytest.mark.parametrize("coded", [False, True], ids=["identity", "gzip"])
async def test_a_body_over_max_body_bytes_is_refused_and_its_connection_closed(
    nursery, coded: bool
) -> None:
    body = b"0" * 300_000
    answer = (
        chunked_answer(gzip.compress(body), "content-encoding: gzip")
        if coded
        else raw_answer(body)
    )
    port = await serve_raw(nursery, answer, close_after_s=None)
    client = pool(max_body_bytes=200_000)
    response = await post(client, f"http://127.0.0.1:{port}/x", b"{}")
    with pytest.raises(ResponseTooLarge, match="longer than 200000 bytes"):
        await response.aread()
    assert client.busy_connections == 0
    client = pool(max_body_bytes=300_000)  # exactly at the bound: read whole
    assert await (await post(client, f"http://127.0.0.1:{port}/x", b"{}")).aread() == body


async def test_a_stale_reused_connection_is_retried_once_and_a_read_timeout_never(
    local_sim,
) -> None:
    upstream, url = local_sim
    client = pool(read_timeout_s=0.3)
    await (await post(client, url, chat("warm"))).aread()
    answer = json.loads(await (await post(client, url, chat("#sim fault=stale"))).aread())
    assert answer["object"] == "chat.completion"
    assert [r.status for r in upstream.requests[1:]] == [None, 200]  # unanswered, then a new one
    assert client.idle_connections == 1
    with pytest.raises(ReadTimeout):  # the upstream may be working on it: not sent twice
        await post(client, url, chat("#sim fault=stall"))
    assert len(upstream.requests) == 4
    assert client.busy_connections == 0
