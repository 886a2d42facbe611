"""HTTP/1.1 for the upstream hop's client side, as bytes: the request head the pool sends, a
reader that frames the answer the pool feeds it, and a decoder of a compressed body (in bounded
steps). No I/O (``http11.py`` does that).

Why not h11, which did this until issue 6's second profile: h11 is general (both roles, every
state and event of RFC 9112) and costs for that on every exchange, about 78 us of CPU per
non-streamed request and 7 us per streamed event on the benchmark machine, a sixth of what the
relay spent on a request besides its server's work. The client side needs much less: write
one POST with a known length, then read one answer framed by ``content-length``, chunked
transfer coding or the connection's close. This reader does that, strictly (a bare LF ends a
line of the head, as RFC 9112 allows, but chunked framing wants CRLF): anything it cannot
frame with certainty (obsolete line folding, a bad chunk size, conflicting lengths, a coding
other than chunked, bytes past the end) is a :class:`ProtocolError` or makes the connection
unfit for reuse, never a guess. The relay's server side is still h11, inside hypercorn.
"""

from __future__ import annotations

import re
import zlib

#: An answer's head larger than this is refused (h11's default limit was 16 KiB).
MAX_HEAD_BYTES = 65536

#: A chunk-size line (with extensions) or a trailer line longer than this is refused.
MAX_LINE_BYTES = 8192

#: Most bytes one step of :class:`BodyDecoder` produces: what one socket read gives, so a
#: compressed answer reaches the relay in the same sizes as a plain one.
DECODE_STEP_BYTES = 65536

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Field values: visible characters and obs-text, inner spaces and tabs; no CR, LF or NUL.
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
# The end of the head: the LF of its last line, then an empty line (CRLF, or a bare LF).
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?")


class ProtocolError(Exception):
    """The upstream's answer is not HTTP/1.1 this reader can frame."""


class UnsendableHeader(ValueError):
    """A request header (or the target) that cannot be written as HTTP/1.1."""


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and ``headers`` as bytes, each name and value checked: a value with CR
    or LF would otherwise let a forwarded client header add headers of its own."""
    if not _TARGET.fullmatch(target):
        raise UnsendableHeader(f"the request target {target!r} is not valid")
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise UnsendableHeader(f"the header name {name!r} is not valid")
        if not _VALUE.fullmatch(value):
            raise UnsendableHeader(f"the value of header {name.decode('latin-1')!r} is not valid")
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


class Head:
    """An answer's status and headers (names lower-cased, in the order received)."""

    __slots__ = ("headers", "status_code")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.headers = headers


# Body framings.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2
# Where a chunked body's reader is: in a chunk's data, at the CRLF after it, at a size line,
# in the trailer section.
_DATA, _DATA_END, _SIZE_LINE, _TRAILERS = 0, 1, 2, 3


class ResponseReader:
    """Frames one answer to one request from the bytes the connection received.

    ``feed`` the bytes read (``b""`` at end of file), then call ``head()`` until it returns the
    final head (1xx answers are skipped), then ``read()`` for the body as it arrives: every
    decoded byte available so far, and ``done`` once the body is complete. ``reusable`` says
    whether the connection may carry another request afterwards.
    """

    __slots__ = (
        "_buffer",
        "_chunk",
        "_eof",
        "_framing",
        "_keep_alive",
        "_remaining",
        "_scanned",
        "_started",
        "_trailer_bytes",
        "done",
    )

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._started = False  # the final head has been parsed
        self._framing = _LENGTH
        self._remaining = 0  # bytes of body (content-length) or of the current chunk left
        self._chunk = _SIZE_LINE
        self._keep_alive = False
        self._scanned = 0  # how far the search for the head's end got (no rescan per read)
        self._trailer_bytes = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    @property
    def reusable(self) -> bool:
        """The answer ended as framed, the upstream allows another request, and nothing was
        sent past the end (an upstream that sent more than it framed would otherwise answer
        the next request with it)."""
        return self.done and self._keep_alive and not self._buffer and not self._eof

    def head(self) -> Head | None:
        """The answer's head once it has arrived whole, else None (feed more)."""
        while True:
            buffer = self._buffer
            blank = _BLANK_LINE.search(buffer, max(0, self._scanned - 2))
            if blank is None:
                self._scanned = len(buffer)
                if len(buffer) > MAX_HEAD_BYTES:
                    raise ProtocolError(f"the answer's head exceeds {MAX_HEAD_BYTES} bytes")
                if self._eof:
                    raise ProtocolError("the connection closed before the answer's head")
                return None
            if blank.start() > MAX_HEAD_BYTES:
                raise ProtocolError(f"the answer's head exceeds {MAX_HEAD_BYTES} bytes")
            block = bytes(buffer[: blank.start()])
            del buffer[: blank.end()]
            self._scanned = 0
            head, version = _parse_head(block)
            status = head.status_code
            if status < 100:
                raise ProtocolError(f"invalid status code {status}")
            if status < 200:
                if status == 101:
                    raise ProtocolError("the upstream switched protocols")
                continue  # 100 Continue, 103 Early Hints: the answer follows
            self._frame(head, version)
            return head

    def _frame(self, head: Head, version: bytes) -> None:
        """How the body is delimited (RFC 9112 §6.3; the request is always a POST)."""
        encodings: list[bytes] = []
        lengths: set[bytes] = set()
        close = version != b"1"
        for name, value in head.headers:
            if name == b"transfer-encoding":
                encodings.extend(v.strip().lower() for v in value.split(b","))
            elif name == b"content-length":
                lengths.update(v.strip() for v in value.split(b","))
            elif name == b"connection":
                close = close or b"close" in (v.strip().lower() for v in value.split(b","))
        self._started = True
        self._keep_alive = not close
        if head.status_code in (204, 304):
            self._framing, self._remaining = _LENGTH, 0
            if encodings or lengths - {b"0"}:  # a body may follow after all: not on this socket
                self._keep_alive = False
        elif encodings:
            if encodings != [b"chunked"]:
                raise ProtocolError(f"unsupported transfer-encoding {b', '.join(encodings)!r}")
            self._framing, self._chunk = _CHUNKED, _SIZE_LINE
            if lengths:  # both: the coding frames it (RFC 9112 §6.3), but trust it once only
                self._keep_alive = False
        elif lengths:
            value = lengths.pop()
            if lengths or not value.isdigit() or len(value) > 18:
                raise ProtocolError("the answer's content-length is not one valid number")
            self._framing, self._remaining = _LENGTH, int(value)
        else:
            self._framing, self._keep_alive = _UNTIL_CLOSE, False
        if self._framing == _LENGTH and self._remaining == 0:
            self.done = True

    def read(self) -> bytes:
        """The body's bytes decoded so far and not yet returned (possibly none)."""
        buffer = self._buffer
        if self.done or not self._started or not (buffer or self._eof):
            return b""  # the common case between two streamed events: nothing new yet
        framing = self._framing
        if framing == _LENGTH:
            take = min(len(buffer), self._remaining)
            if not take and self._eof:
                raise ProtocolError("the connection closed before the body's end")
            data = bytes(buffer[:take])
            del buffer[:take]
            self._remaining -= take
            self.done = not self._remaining
            return data
        if framing == _UNTIL_CLOSE:
            data = bytes(buffer)
            buffer.clear()
            self.done = self._eof
            return data
        return self._read_chunks(buffer)

    def _read_chunks(self, buffer: bytearray) -> bytes:
        pieces: list[bytes] = []
        position = 0
        size = len(buffer)
        while True:
            state = self._chunk
            if state == _DATA:
                take = min(size - position, self._remaining)
                if not take:
                    break
                pieces.append(buffer[position : position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._chunk = _DATA_END
            elif state == _DATA_END:
                if buffer.startswith(b"\r\n", position):
                    position += 2
                elif size - position >= 2 or (size > position and buffer[position] != 13):
                    raise ProtocolError("a chunk does not end where its size says")
                else:
                    break
                self._chunk = _SIZE_LINE
            else:
                end = buffer.find(b"\n", position)
                if end < 0:
                    if size - position > MAX_LINE_BYTES:
                        raise ProtocolError("a chunk-size or trailer line is too long")
                    break
                if end - position > MAX_LINE_BYTES:
                    raise ProtocolError("a chunk-size or trailer line is too long")
                line = bytes(buffer[position:end])
                position = end + 1
                if state == _TRAILERS:
                    field = line.removesuffix(b"\r")
                    if not field:
                        self.done = True
                        break
                    self._trailer_bytes += len(line)
                    if self._trailer_bytes > MAX_HEAD_BYTES:
                        raise ProtocolError(f"the trailers exceed {MAX_HEAD_BYTES} bytes")
                    _parse_field(field)  # nothing the relay uses, but it must be a field
                    continue
                match = _CHUNK_SIZE.fullmatch(line[:-1]) if line[-1:] == b"\r" else None
                if match is None:
                    raise ProtocolError(f"invalid chunk size line {line[:40]!r}")
                self._remaining = int(match.group(1), 16)
                self._chunk = _DATA if self._remaining else _TRAILERS
        del buffer[:position]
        if not pieces:
            if self._eof and not self.done:  # what came before the close was returned already
                raise ProtocolError("the connection closed in the middle of a chunked body")
            return b""
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)


def _parse_head(block: bytes) -> tuple[Head, bytes]:
    """The head's status line and header lines (without the blank line ending them)."""
    lines = block.split(b"\n")
    status_line = lines[0].removesuffix(b"\r")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise ProtocolError(f"invalid status line {status_line[:60]!r}")
    headers = [_parse_field(raw.removesuffix(b"\r")) for raw in lines[1:]]
    return Head(int(match.group(2)), headers), match.group(1)


def _parse_field(line: bytes) -> tuple[bytes, bytes]:
    """One ``name: value`` line of the head or the trailers: the lower-cased name, the value."""
    if line[:1] in (b" ", b"\t"):
        raise ProtocolError("the answer uses obsolete line folding")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise ProtocolError(f"invalid header line {line[:60]!r}")
    value = value.strip(b" \t")
    if not _VALUE.fullmatch(value):
        raise ProtocolError(f"invalid value in header {name[:40]!r}")
    return name.lower(), value


class BodyDecoder:
    """Undoes a ``gzip`` or ``deflate`` content coding as the body arrives, in bounded steps.

    ``feed`` the body's bytes (as framed by :class:`ResponseReader`), then call ``read()`` until
    it returns ``b""`` before feeding more: each call gives at most ``DECODE_STEP_BYTES``, the
    rest of the input waiting inside, so a compression bomb (a few KiB that inflate to
    gigabytes) is never inflated at once; whoever reads the steps bounds the total.
    ``finish()`` at the body's end raises if the coded data was cut short. Bytes after the
    end of the coded data are ignored, as ``zlib.decompress`` does. Undecodable data raises
    :class:`ProtocolError`.
    """

    __slots__ = ("_encoding", "_input", "_more", "_zlib")

    #: The codings this decoder knows (``x-gzip`` is gzip's old name, RFC 9110 §8.4.1.3).
    CODINGS = frozenset({"gzip", "x-gzip", "deflate"})

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        wbits = zlib.MAX_WBITS | 16 if encoding != "deflate" else zlib.MAX_WBITS
        self._zlib = zlib.decompressobj(wbits)
        self._input = b""
        # The last step was full: zlib may hold output for it still, with no input left
        # (the rest of a back-reference).
        self._more = False

    def feed(self, data: bytes) -> None:
        self._input = self._input + data if self._input else data

    def read(self) -> bytes:
        """The next decoded bytes, at most ``DECODE_STEP_BYTES``; ``b""``: feed more."""
        if not (self._input or self._more) or self._zlib.eof:
            self._input = b""
            return b""
        try:
            data = self._zlib.decompress(self._input, DECODE_STEP_BYTES)
        except zlib.error as exc:
            raise ProtocolError(f"the {self._encoding} body does not decompress: {exc}") from None
        self._input = self._zlib.unconsumed_tail
        self._more = len(data) == DECODE_STEP_BYTES
        return data

    def finish(self) -> None:
        if not self._zlib.eof:
            raise ProtocolError(f"the {self._encoding} body ends before its compressed data does")
