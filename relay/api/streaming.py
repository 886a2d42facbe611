"""The relay of a streamed answer: the *pump* owns the slots and the upstream response and
feeds the client's bytes into a small channel; the request task writes them to the client; a
watcher keeps the stream's timers (keep-alives, a stalled client, a silent upstream).

If the client stops reading (its socket full, hypercorn's shielded write blocked), the watcher
cancels the pump after ``stall_timeout_s``: the upstream and the slots are released even though
the write to the dead reader cannot be interrupted.
"""

from __future__ import annotations

import logging

import trio

from ..errors import (
    RelayError,
    ShuttingDown,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..guards.admission import Lease
from ..protocol import messages as anthropic_messages
from ..protocol.requests import (
    Endpoint,
)
from ..protocol.sse import EventTooLarge
from ..protocol.translate import (
    StreamTranslator,
)
from ..protocol.trust import Confidential
from ..upstream import http11
from . import responses_state
from .calls import SHUTDOWN_CUT, Call, too_large, upstream_call
from .http import SSE_HEADERS

log = logging.getLogger("relay.api")

#: Relayed chunks buffered between the pump and the client writer. Small: the buffer only
#: smooths scheduling; a slow client should push back on the upstream, not fill memory.
STREAM_BUFFER = 16


class _ClientWriter:
    """Writes relayed bytes to the client and notes the times the stream's watcher needs: since
    when the current write has been going on (``writing_since``) and when the last one ended
    (``quiet_since``; None until the first write)."""

    __slots__ = ("call", "quiet_since", "writing_since")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.writing_since: float | None = None
        self.quiet_since: float | None = None

    async def write(self, data: bytes) -> None:
        self.writing_since = trio.current_time()
        if self.call.record.ttft_ms is None:
            self.call.record.ttft_ms = (self.writing_since - self.call.started) * 1000
        await self.call.responder.body(data)
        self.writing_since = None
        self.quiet_since = trio.current_time()


class _UpstreamWatch:
    """How the stream's watcher sees an upstream fall silent mid-answer, with no timeout per
    read: the pump notes when it last heard from the upstream (``heard_at``; None while it is
    not waiting on it: before the answer, or held up by a slow client), and the watcher cancels
    ``reading``, the pump's reading of the answer, once that is longer ago than ``timeout_s``
    (the pool's read timeout, which the pump's reads then do without)."""

    __slots__ = ("heard_at", "reading", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.heard_at: float | None = None
        self.reading = trio.CancelScope()


async def relay_stream(call: Call) -> None:
    send_channel, receive_channel = trio.open_memory_channel[bytes | RelayError](STREAM_BUFFER)
    writer = _ClientWriter(call)
    upstream = _UpstreamWatch(call.runtime.config.server.upstream_read_timeout_s)
    pump_scope = trio.CancelScope()
    failure: RelayError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, call, send_channel, pump_scope, upstream)
        nursery.start_soon(_watch_stream, call, writer, upstream, send_channel, pump_scope)
        try:
            async with receive_channel:
                first = await _first_message(receive_channel)
                if isinstance(first, RelayError):
                    failure = first  # raised below: inside the nursery it would be grouped
                else:
                    await call.responder.start(200, SSE_HEADERS)
                    await writer.write(first)
                    async for data in receive_channel:  # keep-alives included
                        await writer.write(_with_backlog(data, receive_channel))
                    await call.responder.end()
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        try:
            raise failure
        finally:
            # The error's traceback holds this frame; a local still naming the error would
            # make a cycle that keeps the whole request for the garbage collector.
            failure = first = None


def _with_backlog(data: bytes, channel: trio.MemoryReceiveChannel) -> bytes:
    """``data`` and whatever else is already waiting, as one write: when the client side falls
    behind, fewer and larger writes let it catch up instead of paying per event."""
    parts = [data]
    while True:
        try:
            parts.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return data if len(parts) == 1 else b"".join(parts)


async def _first_message(channel: trio.MemoryReceiveChannel) -> bytes | RelayError:
    try:
        return await channel.receive()
    except trio.EndOfChannel:
        # The pump ended without a word: only possible if it was cancelled by the watchdog,
        # which cannot happen before the first write. Treat as an internal failure.
        return UpstreamUnavailable("The upstream ended the request without an answer.")


async def _watch_stream(
    call: Call,
    writer: _ClientWriter,
    upstream: _UpstreamWatch,
    out: trio.MemorySendChannel[bytes | RelayError],
    pump_scope: trio.CancelScope,
) -> None:
    """The stream's three timers, in one task that wakes only when one of them is due:

    - keep-alive: after each ``keepalive_event_s`` without a write, once the answer has begun
      (an agent's reasoning upstream may think for minutes; clients and proxies give up on a
      connection that says nothing). A Messages stream still waiting for admission (or for the
      upstream's first byte) after ``keepalive_event_s`` is opened by the relay itself: 200,
      ``message_start``, then a ``ping`` every interval (Anthropic's own keep-alive); a refusal
      after that ends the stream with an ``event: error`` (``rate_limit_error`` …) instead of
      an HTTP 429. Refusals within the first interval (a full queue, a key that may not queue)
      stay real 429s with ``Retry-After``. It is queued in the pump's channel, and only when that is
      empty and no write is in progress: the pump is then waiting on the upstream, so no event
      it encodes can be ahead of the keep-alive (a translated Responses stream numbers them).
    - stall: a client that accepted no data for ``stall_timeout_s`` gets the pump cancelled,
      which releases the upstream and the slots although the write to it cannot be interrupted.
    - silence: an upstream that sent nothing for ``upstream_read_timeout_s`` in the middle of
      its answer gets the pump's reading cancelled, which ends the stream with an error.

    Why not a timeout around each event's ``receive`` or write: a cancel scope per event was a
    visible share of the per-event CPU with a thousand streams; here the writer and the pump
    only note the time.
    """
    server = call.runtime.config.server
    stall, interval = server.stall_timeout_s, server.keepalive_event_s
    read_timeout = upstream.timeout_s
    poll = max(stall / 4, 0.05)
    while True:
        now = trio.current_time()
        heard = upstream.heard_at
        if heard is not None and now - heard > read_timeout:
            upstream.heard_at = heard = None
            upstream.reading.cancel()
        since = writer.writing_since
        if since is not None and now - since > stall:
            log.info("%s: client accepted no data for %.0fs", call.request.request_id, stall)
            call.record.error_code = "client_stalled"
            pump_scope.cancel()
            return
        wake = now + poll
        quiet = writer.quiet_since
        if quiet is None:  # the answer has not begun: look again in an interval
            if now - call.started >= interval:
                _open_waiting_stream(call, out)
            wake = min(wake, now + interval)
        elif since is None:
            if now - quiet >= interval:
                _queue_keepalive(call, out)
                writer.quiet_since = quiet = now
            wake = min(wake, quiet + interval)
        # Not waiting on the upstream now, the pump may be soon: look again within a timeout.
        wake = min(wake, (now if heard is None else heard) + read_timeout)
        await trio.sleep_until(wake)


def _open_waiting_stream(call: Call, out: trio.MemorySendChannel[bytes | RelayError]) -> None:
    """Open a waiting Messages stream with the relay's own ``message_start`` and a ping, once.
    Only before the pump made its translator: it sees :attr:`Call.opened` when it does (no
    checkpoint between the check, the queueing and the flag), and tells the translator not to
    open the stream again."""
    if (
        call.opened
        or call.translator is not None
        or call.client.endpoint is not Endpoint.MESSAGES
        or out.statistics().current_buffer_used
    ):
        return
    opening = anthropic_messages.opening(
        anthropic_messages.message_id(call.response_id),
        call.route.requested,
        call.client.estimated_input_tokens,
    )
    try:
        out.send_nowait(opening)
    except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
        return
    call.opened = True


def _queue_keepalive(call: Call, out: trio.MemorySendChannel[bytes | RelayError]) -> None:
    """Queue the translator's keep-alive if nothing is waiting to be written (no checkpoint
    between the check and the queueing, so the pump cannot slip an event in between)."""
    if out.statistics().current_buffer_used:
        return
    if call.translator is None:
        keepalive = anthropic_messages.PING if call.opened else b""
    else:
        keepalive = call.translator.keepalive()
    if keepalive:
        try:
            out.send_nowait(keepalive)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the pump has finished: the stream is ending anyway


async def _pump(
    call: Call,
    out: trio.MemorySendChannel[bytes | RelayError],
    scope: trio.CancelScope,
    watch: _UpstreamWatch,
) -> None:
    """Own the slots and the upstream stream; feed the client's bytes into ``out``."""
    record = call.record
    translator: StreamTranslator | None = None
    async with out:
        with scope:
            try:
                with call.drain:
                    async with upstream_call(call, stream=True) as (lease, account, response):
                        record.status = 200
                        upstream, _ = call.upstream_request(account)
                        if call.opened:
                            upstream.context.opened = True
                            upstream.context.response_id = call.response_id
                            record.ttft_ms = None  # the opening was no token
                        translator = call.translator = StreamTranslator(
                            account.config.provider,
                            upstream.context,
                            Confidential.of_call(
                                f"{account.config.base_url}/{upstream.path}", upstream.headers
                            ),
                            max_event_bytes=call.runtime.config.server.upstream_max_event_bytes,
                        )
                        try:
                            await _relay_events(
                                call, response, translator, out, lease, account.name, watch
                            )
                        finally:
                            usage = translator.usage
                            lease.used_tokens = call.take_usage(
                                usage, translator.deltas, translator.received
                            )
                            lease.output_tokens = record.output_tokens if usage else None
                if call.drain.cancelled_caught:
                    raise ShuttingDown(SHUTDOWN_CUT)
            except RelayError as error:
                record.status = record.status or error.status
                record.error_code = error.code or error.type
                if translator is not None:
                    data = translator.fail(error.message, error.code or "server_error")
                    if isinstance(error, ShuttingDown) and call.client.endpoint is Endpoint.CHAT:
                        data += b"data: [DONE]\n\n"  # the stream is over: say so, as OpenAI does
                    await out.send(data)
                elif call.opened:
                    record.status = 200  # what the client got: the error is in the stream
                    await out.send(anthropic_messages.error_event(error))
                else:
                    await out.send(error)
            finally:
                call.commit()


async def _relay_events(
    call: Call,
    response: http11.Response,
    translator: StreamTranslator,
    out: trio.MemorySendChannel[bytes | RelayError],
    lease: Lease,
    account: str,
    watch: _UpstreamWatch,
) -> None:
    response.timed_reads = False  # the stream's watcher times the upstream's silence
    late = b""
    try:
        with watch.reading:
            watch.heard_at = trio.current_time()
            async for chunk in response:
                watch.heard_at = trio.current_time()
                data = translator.feed(chunk)
                lease.produced(translator.deltas)  # the guards charge the output as it is served
                if data:
                    try:
                        # No checkpoint when there is room: the upstream read just made one,
                        # and send() would reschedule the pump once more for every event.
                        out.send_nowait(data)
                    except trio.WouldBlock:
                        if watch.reading.cancel_called:
                            # The watcher gave up on the upstream as this arrived: the bytes
                            # are the client's still (and billed), so send them outside.
                            late = data
                            break
                        watch.heard_at = None  # not waiting on the upstream meanwhile
                        await out.send(data)  # the client is behind: wait for it
                        watch.heard_at = trio.current_time()
            watch.heard_at = None
    except EventTooLarge as exc:
        raise too_large(account, exc) from None
    except http11.TransportError as exc:
        log.warning("upstream account %s broke off its answer: %s", account, exc)
        raise UpstreamUnavailable(
            f"The connection to upstream account '{account}' broke in the middle of the "
            "answer. Try again; if it persists, tell the relay's operator."
        ) from None
    if late:
        await out.send(late)
    if late or watch.reading.cancelled_caught:
        raise UpstreamTimeout(
            f"The upstream account '{account}' went silent in the middle of the answer "
            f"(nothing for {watch.timeout_s:g}s)."
        )
    data = translator.flush()
    if not translator.finished:
        if data:
            await out.send(data)
        raise UpstreamUnavailable(
            f"The upstream account '{account}' ended the stream before the answer was complete."
        )
    data += translator.finish()
    if call.keep_answer:  # kept before the client has the end: its next turn may come at once
        await responses_state.keep(
            call, translator.final_response(), translated=not translator.passthrough
        )
    if data:
        await out.send(data)


