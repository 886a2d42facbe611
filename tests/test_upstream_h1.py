"""The upstream client's HTTP/1.1 framing (relay/upstream/h1.py), byte by byte.

h11 (hypercorn's parser, which framed the relay's answers before h1.py) is the oracle where
both accept an answer: the same bytes, fed in every split, must give the same body.
"""

from __future__ import annotations

import itertools

import h11
import pytest

from relay.upstream import h1


def frame(data: bytes, splits: list[int] | None = None) -> tuple[h1.Head, bytes, h1.ResponseReader]:
    """Feed ``data`` to a reader in pieces cut at ``splits``; return the head and the body."""
    reader = h1.ResponseReader()
    cuts = [0, *(splits or []), len(data)]
    head = None
    body = b""
    for start, end in itertools.pairwise(cuts):
        reader.feed(data[start:end])
        if head is None:
            head = reader.head()
        if head is not None:
            body += reader.read()
    if not reader.done:
        reader.feed(b"")
        if head is None:
            head = reader.head()
        body += reader.read()
    assert head is not None and reader.done
    return head, body, reader


def h11_body(data: bytes) -> bytes:
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="POST", target="/", headers=[("host", "x"),
                                                                     ("content-length", "0")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(data)
    connection.receive_data(b"")
    body = b""
    while True:
        event = connection.next_event()
        if type(event) is h11.Data:
            body += event.data
        elif type(event) is h11.EndOfMessage:
            return body


SSE = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (len(SSE), SSE)
    + b"5;name=value\r\nhello\r\n"
    + b"%x\r\n%s\r\n" % (len(SSE), SSE)
    + b"0\r\nx-trailer: yes\r\n\r\n"
)
LENGTH = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nx-a: 1\r\nX-A: 2\r\n\r\nhello world"


@pytest.mark.parametrize("answer", [CHUNKED, LENGTH], ids=["chunked", "content-length"])
def test_every_split_gives_h11s_body(answer: bytes) -> None:
    expected = h11_body(answer)
    assert expected  # the oracle read a body
    for cut in range(1, len(answer)):
        head, body, reader = frame(answer, [cut])
        assert (head.status_code, body) == (200, expected), cut
        assert reader.reusable
    _, body, _ = frame(answer, list(range(1, len(answer))))  # one byte at a time
    assert body == expected


def test_head_fields() -> None:
    head, _, _ = frame(LENGTH)
    assert head.headers == [(b"content-length", b"11"), (b"x-a", b"1"), (b"x-a", b"2")]


def test_informational_answers_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nlink: x\r\n\r\n" + LENGTH
    head, body, _ = frame(answer)
    assert (head.status_code, body) == (200, b"hello world")


def test_bare_line_feeds_end_head_lines_only() -> None:
    answer = b"HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n5\r\nhello\r\n0\r\n\r\n"
    assert frame(answer)[1] == h11_body(answer) == b"hello"
    reader = h1.ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n5\nhello\n0\n\n")
    assert reader.head() is not None
    with pytest.raises(h1.ProtocolError, match="chunk size"):
        reader.read()


def test_no_content_and_close_delimited() -> None:
    head, body, reader = frame(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert (head.status_code, body, reader.reusable) == (204, b"", True)
    _, body, reader = frame(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    assert (body, reader.reusable) == (b"until the end", False)


@pytest.mark.parametrize(
    "answer",
    [
        LENGTH + b"HTTP/1.1 200 OK\r\n",  # bytes past the end
        LENGTH.replace(b"x-a: 1", b"connection: keep-alive, close"),
        LENGTH.replace(b"HTTP/1.1", b"HTTP/1.0"),
        CHUNKED.replace(b"content-type", b"content-length: 3\r\ncontent-type"),
        b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n",
    ],
    ids=["trailing-bytes", "connection-close", "http-1.0", "length-and-chunked", "204-with-body"],
)
def test_answers_after_which_the_connection_is_not_reused(answer: bytes) -> None:
    reader = frame(answer)[2]
    assert not reader.reusable


@pytest.mark.parametrize(
    ("answer", "complaint"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\n\r\n", "folding"),
        (b"HTTP/1.1 200 OK\r\nbad name: 1\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\nabcd", "content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "content-length"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n", "does not end"),
        (b"HTTP/1.1 101 Switching\r\n\r\n", "switched"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "before the body's end"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel", "chunked body"),
        (b"HTTP/1.1 200 OK\r\ncontent-le", "before the answer's head"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "status code"),
        (CHUNKED.replace(b"5;name=value", b"5;" + b"x" * (h1.MAX_LINE_BYTES + 1)), "too long"),
        (CHUNKED.replace(b"x-trailer: yes", b"HTTP/1.1 200 OK"), "header line"),
        (CHUNKED.replace(b"x-trailer: yes", b"x-t: \x00"), "invalid value"),
    ],
)
def test_answers_that_cannot_be_framed(answer: bytes, complaint: str) -> None:
    reader = h1.ResponseReader()
    reader.feed(answer)
    reader.feed(b"")
    with pytest.raises(h1.ProtocolError, match=complaint):
        if reader.head() is not None:
            while not reader.done:
                reader.read()


def test_what_arrived_before_a_close_is_returned_first() -> None:
    reader = h1.ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nab")
    assert reader.head() is not None
    reader.feed(b"")
    assert reader.read() == b"helloab"
    with pytest.raises(h1.ProtocolError):
        reader.read()


def test_an_oversized_head_is_refused() -> None:
    reader = h1.ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * h1.MAX_HEAD_BYTES)
    with pytest.raises(h1.ProtocolError, match="exceeds"):
        reader.head()


def test_request_head() -> None:
    head = h1.request_head(b"POST", b"/v1/chat/completions?x=1",
                           [(b"host", b"example.com"), (b"authorization", b"Bearer sk-1")])
    assert head == (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: example.com\r\n"
                    b"authorization: Bearer sk-1\r\n\r\n")
    connection = h11.Connection(h11.SERVER)  # the oracle reads it as that request
    connection.receive_data(head)
    request = connection.next_event()
    assert (request.method, request.target) == (b"POST", b"/v1/chat/completions?x=1")


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/v1", [(b"x-session", b"abc\r\nx-injected: 1")]),
        (b"/v1", [(b"x-session", b"abc\n")]),
        (b"/v1", [(b"bad name", b"1")]),
        (b"/v1", [(b"x-a", b" leading space")]),
        (b"/v1 HTTP/1.1\r\nx: y", [(b"host", b"x")]),
    ],
)
def test_unsendable_request_heads(target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(h1.UnsendableHeader):
        h1.request_head(b"POST", target, headers)
