"""Hostile answers of the simulated upstream about bytes and connections, not protocol: the
``fault=`` values that test the relay's bounds on what an upstream sends (README, "Upstream
bounds") and its handling of a keep-alive connection the upstream closed.

- ``huge_line``: the answer is one line that never ends, :data:`HUGE_LINE_BYTES` long: a
  stream's ``data:`` line without its newline, a non-streamed JSON body that never closes
  (chunked, so no length warns the client).
- ``gzip_bomb``: the answer is gzip coded (despite the client's ``accept-encoding: identity``)
  and inflates to :data:`BOMB_BYTES` from about a thousandth of that: a stream whose one
  ``data:`` line never ends, a non-streamed JSON body that never closes.
- ``stale``: on a connection that has carried an answer already, the request gets no answer
  and the connection is closed, as by an upstream whose idle timeout ran out just as the
  request came; on a new connection the request is answered as usual. As the profile's fault
  it makes every reused connection stale.
"""

from __future__ import annotations

import functools
import struct
import zlib

from relay.testing import sim_protocol

FAULTS = sim_protocol.WIRE_FAULTS

#: Length of ``huge_line``'s line; the simulator stops sending when the client hangs up.
HUGE_LINE_BYTES = 1 << 30
#: What ``gzip_bomb`` inflates to.
BOMB_BYTES = 1 << 30
#: The start of a line that never ends, per answer form.
STREAM_LINE = b"data: "
BODY_LINE = b'{"object":"chat.completion","padding":"'

_BLOCK = 1 << 20
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, no mtime


@functools.cache
def gzip_bomb(prefix: bytes, size: int = BOMB_BYTES) -> bytes:
    """A valid gzip member of ``prefix`` and then ``"0"`` bytes up to ``size``, about 1/1000 of
    ``size``. Built without compressing ``size`` bytes: after a full flush deflate starts afresh,
    so every 1 MiB block of zeros packs to the same bytes, which are repeated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = packer.compress(prefix) + packer.flush(zlib.Z_FULL_FLUSH)
    block = b"0" * _BLOCK
    packed = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    count = max(0, size - len(prefix)) // _BLOCK
    crc = zlib.crc32(prefix)
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    total = len(prefix) + count * _BLOCK
    trailer = struct.pack("<II", crc, total & 0xFFFFFFFF)
    return b"".join([_GZIP_HEADER, head, packed * count, packer.flush(), trailer])


def huge_line(prefix: bytes, size: int = HUGE_LINE_BYTES, piece: int = 65536):
    """``prefix`` and then ``"0"`` bytes up to ``size``, in pieces of ``piece`` bytes."""
    yield prefix
    filler = b"0" * piece
    for _ in range(max(0, size - len(prefix)) // piece):
        yield filler
