"""Server-sent events as bytes: framing, usage capture and error events, without I/O.

When client and upstream speak the same protocol the relay forwards the upstream's bytes as they
are. It still has to know where one event ends (so it never forwards half an event and can drop
the usage chunk a Chat client did not ask for) and what the usage was (to bill). Both are done
here on bytes: an event is decoded as JSON only when it carries a usage object, which in a normal
stream is one event out of hundreds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .anthropic_errors import failure_event
from .requests import Endpoint

# An event ends at a blank line; upstreams use "\n\n", a few "\r\n\r\n" (WHATWG allows "\r" too,
# which no LLM API uses, so it is not handled).
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_SEQUENCE_NUMBER = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
_DONE = b"[DONE]"
_ERROR_EVENT = re.compile(rb'^event:\s*error|"type"\s*:\s*"error"', re.MULTILINE)


#: Default bound of one event, blank line included (``server.upstream_max_event_bytes``). The
#: largest events real upstreams send are a Responses stream's ``response.completed``, which
#: repeats the whole answer (with ``instructions`` and ``tools``), and image-generation events
#: carrying base64 images of a few MiB; 16 MiB leaves room for those and still bounds what one
#: hostile upstream can make a stream hold.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class EventTooLarge(ValueError):
    """The upstream sent an event longer than the splitter's bound, or that many bytes without
    ending an event (a "line" of gigabytes): the stream cannot be relayed."""


class EventSplitter:
    """Cuts a byte stream into whole SSE events, each with its terminating blank line.

    Bytes that do not yet end an event stay buffered until more arrive; :meth:`tail` gives what
    is left when the stream ends, :meth:`end` the same as a last event. Memory is bounded: an
    event of more than ``max_event_bytes`` (blank line included), or that many bytes without an
    event's end, raises :class:`EventTooLarge` (the splitter is then unusable), so at most about
    ``max_event_bytes`` plus one chunk are ever held. Time is linear in the bytes fed, however
    an event is cut into chunks.
    """

    __slots__ = ("_max_event_bytes", "_pending")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._pending = bytearray()  # an unfinished event: no event end in it

    def feed(self, data: bytes) -> list[bytes]:
        pending = self._pending
        if pending:
            # Only the new bytes can end the event, with at most three held ones ("\r\n\r" of
            # a "\r\n\r\n"): search there, so a long event is not rescanned for every chunk.
            seam = max(0, len(pending) - 3)
            pending += data
            if _EVENT_END.search(pending, seam) is None:
                if len(pending) > self._max_event_bytes:
                    raise self._too_large()
                return []
            buffer = bytes(pending)
            pending.clear()
        else:
            buffer = data
        limit = self._max_event_bytes
        events = []
        start = 0
        if b"\r" in buffer:
            for match in _EVENT_END.finditer(buffer):
                events.append(buffer[start : match.end()])
                start = match.end()
        else:
            # The usual framing ("\n\n" only): find() is cheaper than the regex, and a chunk
            # that is exactly one event (most chunks of a paced stream) is returned as it is.
            end = buffer.find(b"\n\n")
            if end >= 0 and end == len(buffer) - 2 and end < limit - 1:
                return [buffer]
            while end >= 0:
                events.append(buffer[start : end + 2])
                start = end + 2
                end = buffer.find(b"\n\n", start)
        if start < len(buffer):
            pending += buffer[start:]
        if len(buffer) > limit and (
            len(pending) > limit or any(len(event) > limit for event in events)
        ):
            raise self._too_large()
        return events

    def _too_large(self) -> EventTooLarge:
        return EventTooLarge(
            f"an event longer than {self._max_event_bytes} bytes (server.upstream_max_event_bytes)"
        )

    def tail(self) -> bytes:
        return bytes(self._pending)

    def end(self) -> list[bytes]:
        """The unfinished event the stream ended with, cut as if its blank line had come
        (``[]`` if only whitespace is left). Call it once, when the stream's bytes end."""
        if not self._pending.strip():
            return []
        self._max_event_bytes += 2  # the blank line given here: the rest was bounded already
        return self.feed(b"\n\n")


_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_data(payload: object) -> bytes:
    """``payload`` as compact UTF-8 JSON, for an event the relay writes itself.

    A lone surrogate (an upstream may send ``"\\ud800"`` in its JSON, which Python decodes as
    one) has no UTF-8 form: it is written back as the same ``\\udXXX`` escape, which is what
    ``backslashreplace`` gives (a surrogate is always inside a JSON string), where plain
    encoding would fail the whole stream."""
    return _compact(payload).encode("utf-8", "backslashreplace")


def event_data(event: bytes) -> bytes:
    """The event's ``data:`` payload (several data lines joined by newlines, per the spec)."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


@dataclass
class Usage:
    """Token counts in one vocabulary for both protocols (reasoning is part of output).

    ``input_tokens`` is all the input; ``cached_tokens`` (read from the prompt cache) and
    ``cache_write_tokens`` (written to it: only Anthropic reports them) are parts of it.
    """

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def from_chat(cls, usage: dict) -> Usage:
        prompt_details = _details(usage, "prompt_tokens_details")
        completion_details = _details(usage, "completion_tokens_details")
        cached = prompt_details.get("cached_tokens")
        if cached is None:  # DeepSeek reports cache hits under its own name
            cached = usage.get("prompt_cache_hit_tokens", 0)
        return cls(
            input_tokens=token_count(usage.get("prompt_tokens")),
            cached_tokens=token_count(cached),
            output_tokens=token_count(usage.get("completion_tokens")),
            reasoning_tokens=token_count(completion_details.get("reasoning_tokens")),
        )

    @classmethod
    def from_responses(cls, usage: dict) -> Usage:
        input_details = _details(usage, "input_tokens_details")
        output_details = _details(usage, "output_tokens_details")
        return cls(
            input_tokens=token_count(usage.get("input_tokens")),
            cached_tokens=token_count(input_details.get("cached_tokens")),
            output_tokens=token_count(usage.get("output_tokens")),
            reasoning_tokens=token_count(output_details.get("reasoning_tokens")),
        )

    @classmethod
    def from_body(cls, endpoint: Endpoint, body: dict) -> Usage | None:
        """Usage of a non-streamed answer, or None when the upstream reported none."""
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return None
        if endpoint is Endpoint.MESSAGES:
            return cls.from_messages(usage)
        return cls.from_chat(usage) if endpoint is Endpoint.CHAT else cls.from_responses(usage)

    @classmethod
    def from_messages(cls, usage: dict) -> Usage:
        """Anthropic's usage (protocols.md §5.1): its ``input_tokens`` excludes the cache reads
        and writes, which the relay's input includes."""
        cached = token_count(usage.get("cache_read_input_tokens"))
        written = token_count(usage.get("cache_creation_input_tokens"))
        return cls(
            input_tokens=token_count(usage.get("input_tokens")) + cached + written,
            cached_tokens=cached,
            output_tokens=token_count(usage.get("output_tokens")),
            cache_write_tokens=written,
        )


def _details(usage: dict, name: str) -> dict:
    """A usage object's ``…_details`` object, or an empty one for anything else."""
    details = usage.get(name)
    return details if isinstance(details, dict) else {}


def token_count(value: object) -> int:
    """A token count from an upstream's usage object: the integer, or 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class StreamMeter:
    """Watches a relayed stream's events: usage, deltas produced, and whether it finished.

    ``drop_usage_chunk`` removes Chat's trailing usage-only chunk, which the relay always asks
    the upstream for (to bill) but forwards only to clients that asked for it.
    """

    __slots__ = (
        "_drop_usage_chunk",
        "_endpoint",
        "_messages_usage",
        "_opened",
        "deltas",
        "events",
        "finished",
        "first_event",
        "last_event",
        "usage",
    )

    def __init__(
        self, endpoint: Endpoint, *, drop_usage_chunk: bool = False, opened: bool = False
    ) -> None:
        self._endpoint = endpoint
        self._drop_usage_chunk = drop_usage_chunk
        self._opened = opened
        self.usage: Usage | None = None
        self.events = 0
        self.deltas = 0
        self.finished = False
        self.first_event: bytes | None = None
        self.last_event: bytes | None = None
        #: Anthropic's usage counters so far: ``message_start`` has the input side,
        #: ``message_delta`` the output (some gateways put the input there too).
        self._messages_usage: dict[str, int] = {}

    def forwardable(self, events: list[bytes]) -> bytes:
        """Account for ``events`` and return the bytes to send on to the client.

        ``opened`` (a Messages stream the relay opened with its own ``message_start`` while
        the request waited): the upstream's ``message_start`` is not forwarded (a client takes
        one only), and its input counters are added to ``message_delta``'s usage where that
        lacks them, so the client still learns them."""
        if self._opened:
            events = [kept for event in events if (kept := self._reopened(event))]
        keep = []
        for event in events:
            if self._observe(event):
                keep.append(event)
        return b"".join(keep)

    def _observe(self, event: bytes) -> bool:
        self.events += 1
        if self.first_event is None:
            self.first_event = event
        self.last_event = event
        if b"delta" in event:
            self.deltas += 1
        if b'"usage"' in event and _USAGE_OBJECT.search(event):  # the regex only if it may match
            return self._capture_usage(event)
        if self._endpoint is Endpoint.CHAT:
            if _DONE in event and event_data(event).strip() == _DONE:
                self.finished = True
        elif self._endpoint is Endpoint.MESSAGES:
            if b"message_stop" in event or (b"error" in event and _ERROR_EVENT.search(event)):
                self.finished = True
        elif (
            b"response.completed" in event
            or b"response.incomplete" in event
            or b"response.failed" in event
        ):
            self.finished = True
        return True

    def _merge_messages_usage(self, usage: object) -> None:
        """Keep the largest value seen of each Anthropic usage counter (some gateways report the
        input in ``message_delta`` only)."""
        if not isinstance(usage, dict):
            return
        counters = self._messages_usage
        for name, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool):
                counters[name] = max(value, counters.get(name, 0))

    def _reopened(self, event: bytes) -> bytes | None:
        if b"message_start" not in event and b"message_delta" not in event:
            return event
        try:
            payload = json.loads(event_data(event))
        except ValueError:
            return event
        if not isinstance(payload, dict):
            return event
        if payload.get("type") == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            self._merge_messages_usage(usage)
            return None
        if payload.get("type") == "message_delta":
            usage = payload.setdefault("usage", {})
            if isinstance(usage, dict):
                for name, value in self._messages_usage.items():
                    if name != "output_tokens" and usage.get(name) is None:
                        usage[name] = value
                data = json.dumps(payload, separators=(",", ":")).encode()
                return b"event: message_delta\ndata: " + data + b"\n\n"
        return event

    def _capture_usage(self, event: bytes) -> bool:
        try:
            payload = json.loads(event_data(event))
        except ValueError:
            return True
        if not isinstance(payload, dict):
            return True
        if self._endpoint is Endpoint.CHAT:
            usage = payload.get("usage")
            if isinstance(usage, dict):
                self.usage = Usage.from_chat(usage)
                if self._drop_usage_chunk and not payload.get("choices"):
                    return False
        elif self._endpoint is Endpoint.MESSAGES:
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else payload.get("usage")
            if isinstance(usage, dict):
                self._merge_messages_usage(usage)
                if payload.get("type") == "message_delta":
                    # The answer's usage is whole only here: a stream cut before it is billed
                    # as the other protocols' are (the estimate, and what was produced).
                    self.usage = Usage.from_messages(self._messages_usage)
            if payload.get("type") == "message_stop":
                self.finished = True
        else:
            response = payload.get("response")
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                self.usage = Usage.from_responses(response["usage"])
            if payload.get("type") in (
                "response.completed",
                "response.incomplete",
                "response.failed",
            ):
                self.finished = True
        return True

    def next_sequence_number(self) -> int:
        """The ``sequence_number`` an event appended to this Responses stream must carry."""
        if self.last_event is None:
            return 0
        found = _SEQUENCE_NUMBER.findall(self.last_event)
        return int(found[-1]) + 1 if found else self.events

    def response_id(self) -> str | None:
        """The id from the stream's ``response.created`` event, if it had one."""
        if self.first_event is None:
            return None
        try:
            payload = json.loads(event_data(self.first_event))
        except ValueError:
            return None
        response = payload.get("response") if isinstance(payload, dict) else None
        return response.get("id") if isinstance(response, dict) else None


def error_event(
    endpoint: Endpoint,
    meter: StreamMeter,
    *,
    message: str,
    code: str,
    type: str = "server_error",
    fallback_id: str = "resp_relay",
) -> bytes:
    """The event that tells a streaming client its answer failed midway, in its own protocol.

    Chat clients get a chunk with a top-level ``error`` (both SDKs raise on it); Messages clients
    an ``event: error``, as Anthropic ends a stream it cannot finish (the one a translated stream
    ends with: :func:`.anthropic_errors.failure_event`). Responses
    clients get ``response.failed``, which the Codex CLI reads as a failed turn and retries
    (protocols.md §2.6); it is the last event, as Codex expects.
    """
    if endpoint is Endpoint.CHAT:
        payload = {"error": {"message": message, "type": type, "param": None, "code": code}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"
    if endpoint is Endpoint.MESSAGES:
        return failure_event(message, code)
    payload = {
        "type": "response.failed",
        "sequence_number": meter.next_sequence_number(),
        "response": {
            "id": meter.response_id() or fallback_id,
            "object": "response",
            "status": "failed",
            "error": {"code": code, "message": message},
            "incomplete_details": None,
            "output": [],
            "usage": None,
        },
    }
    return b"event: response.failed\ndata: " + json.dumps(payload).encode() + b"\n\n"
