"""The internal event model every upstream answer is decoded into, and every client answer is
encoded from.

Decoders (one per upstream kind: :mod:`.chat`, :mod:`.responses`, :mod:`.anthropic`,
:mod:`.gemini`) turn an upstream stream or body into these events; encoders (one per client
protocol: :class:`.chat.ChatEncoder`, :class:`.responses.ResponsesEncoder`) turn them into the
client's bytes. N decoders + M encoders instead of N×M translators.

The events say what the model produced, in the order it produced it, and nothing about framing:

* :class:`Start` comes first (once), then any mix of text, reasoning and tool calls;
* a tool call is :class:`ToolCallStart`, zero or more :class:`ToolCallDelta`, then
  :class:`ToolCallEnd` carrying the complete arguments (decoders always close the calls they
  open, so an encoder never has to guess);
* :class:`UsageEvent` may come several times (the last one wins) and may follow :class:`Finish`;
* :class:`Failure` ends the answer: nothing meaningful follows it.

Tool-call ``index`` values are the decoder's own count, 0, 1, 2… in the order calls started,
whatever the upstream numbered them.

Every field of an event has its declared type (:func:`well_typed`): the translator reads an
upstream's answer through :func:`decoded`, which turns an answer of a shape its protocol does
not have (a decoder raising on it, or copying a list where text belongs) into one
:class:`Failure`, code ``upstream_invalid_response``. Encoders see well-formed events only.

This module also holds the two small encodings that carry provider state through clients that
know nothing of it (see :func:`call_id_with_signature` and :func:`encode_reasoning`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from .requests import Endpoint
from .sse import Usage

#: Chat finish reasons, the vocabulary of :class:`Finish`.
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")


@dataclass(frozen=True, slots=True)
class Start:
    """The answer began. ``id``/``model`` are the upstream's, when it said."""

    id: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Reasoning text; ``signature`` is set (with or without text) when the upstream signed it
    (Anthropic ``signature_delta``), and must be returned with the reasoning on replay."""

    text: str
    signature: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A tool call began. ``signature`` is a per-call signature to return on replay (Gemini's
    ``thoughtSignature``); ``custom`` marks a freeform (Responses ``custom``) tool call whose
    arguments are raw input, not JSON."""

    index: int
    call_id: str
    name: str
    custom: bool = False
    signature: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """The call is complete; ``arguments`` is the whole argument string."""

    index: int
    arguments: str


@dataclass(frozen=True, slots=True)
class UsageEvent:
    usage: Usage


@dataclass(frozen=True, slots=True)
class Finish:
    """The model stopped: ``stop``, ``length``, ``tool_calls`` or ``content_filter``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The upstream reported an error inside its answer."""

    message: str
    code: str = "server_error"


Event = (
    Start
    | TextDelta
    | ReasoningDelta
    | ToolCallStart
    | ToolCallDelta
    | ToolCallEnd
    | UsageEvent
    | Finish
    | Failure
)


_TEXT, _MAYBE_TEXT = (str,), (str, type(None))

#: Each event's fields and the types their values may have.
_FIELD_TYPES: dict[type, dict[str, tuple[type, ...]]] = {
    Start: {"id": _MAYBE_TEXT, "model": _MAYBE_TEXT},
    TextDelta: {"text": _TEXT},
    ReasoningDelta: {"text": _TEXT, "signature": _MAYBE_TEXT},
    ToolCallStart: {"index": (int,), "call_id": _TEXT, "name": _TEXT, "custom": (bool,),
                    "signature": _MAYBE_TEXT},
    ToolCallDelta: {"index": (int,), "arguments": _TEXT},
    ToolCallEnd: {"index": (int,), "arguments": _TEXT},
    UsageEvent: {"usage": (Usage,)},
    Finish: {"reason": _TEXT},
    Failure: {"message": _TEXT, "code": _TEXT},
}


def well_typed(event: Event) -> bool:
    """Whether every field of ``event`` holds a value of its declared type. Decoders copy the
    upstream's values into events; one of the wrong type (a list where text belongs) means
    the upstream's answer is not of its protocol's shape, and must not reach an encoder."""
    fields = _FIELD_TYPES.get(type(event))
    return fields is not None and all(
        isinstance(getattr(event, name), kinds) for name, kinds in fields.items()
    )


#: What a decoder raises on an upstream answer of a shape its protocol does not have (an object
#: where a list belongs, a key missing, nesting too deep): that answer fails as the upstream's.
_MALFORMED = (AttributeError, KeyError, IndexError, TypeError, ValueError, ArithmeticError,
              RecursionError)

#: The :class:`Failure` code of an upstream answer no decoder can read.
MALFORMED_CODE = "upstream_invalid_response"


def decoded(decode: Callable[[], list[Event]], upstream_kind: str) -> list[Event]:
    """The events ``decode`` (a decoder's ``feed``, ``end`` or ``decode_body``) reads from an
    upstream's answer; one :class:`Failure` with :data:`MALFORMED_CODE` instead when the answer
    is malformed (the decoder raises, or gives a field a value of the wrong type), so that no
    encoder sees what the upstream got wrong and the client gets an error in its protocol."""
    try:
        events = decode()
    except _MALFORMED:
        events = None
    if events is None or not all(well_typed(event) for event in events):
        message = (
            f"The upstream's answer is not of the {upstream_kind} protocol's shape, so the "
            "relay cannot translate it. Try again; if it persists, tell the relay's operator."
        )
        return [Failure(message, MALFORMED_CODE)]
    return events


def counts_as_delta(event: Event) -> bool:
    """Whether ``event`` is produced output (what a cut-short stream is billed for)."""
    if isinstance(event, TextDelta | ToolCallDelta):
        return True
    return isinstance(event, ReasoningDelta) and bool(event.text)


# --------------------------------------------------------------------------------------------
# Provider state carried through clients
#
# A reasoning model's next turn may need state the client has no field for: Anthropic's thinking
# signature, Gemini's per-call thoughtSignature, or DeepSeek's reasoning text. Rather than keep a
# server-side cache (which would break statelessness and scale-out), the relay puts that state in
# fields every client returns verbatim:
#
# * a Chat tool call's ``id`` (and a Responses ``call_id``): ``<id>~s<tag>.<base64url>``. Clients
#   echo it in the assistant message and in the tool result, so both sides can be decoded.
# * a Responses reasoning item's ``encrypted_content``: ``rly1.<base64url(JSON)>`` with the raw
#   reasoning text, its signature and the upstream kind that produced it. Codex replays
#   ``encrypted_content`` untouched (protocols.md §1.1).

_CALL_MARK = "~s"
_SIGNATURE_TAGS = {"anthropic": "a", "gemini": "g"}
_TAG_KINDS = {tag: kind for kind, tag in _SIGNATURE_TAGS.items()}
REASONING_PREFIX = "rly1."


def _b64encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _b64decode(text: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def call_id_with_signature(call_id: str, kind: str, signature: str | None) -> str:
    """``call_id`` carrying ``signature`` from upstream ``kind`` (unchanged without one)."""
    tag = _SIGNATURE_TAGS.get(kind)
    if not signature or tag is None:
        return call_id
    return f"{call_id}{_CALL_MARK}{tag}.{_b64encode(signature)}"


@dataclass(frozen=True, slots=True)
class CallId:
    """A client-side call id split into the upstream's id and the signature it carried."""

    id: str
    signature_kind: str | None = None
    signature: str | None = None


def split_call_id(value: str) -> CallId:
    head, mark, tail = value.partition(_CALL_MARK)
    if mark and len(tail) > 2 and tail[1] == ".":
        kind = _TAG_KINDS.get(tail[0])
        signature = _b64decode(tail[2:])
        if kind is not None and signature is not None:
            return CallId(head, kind, signature)
    return CallId(value)


@dataclass(frozen=True, slots=True)
class CarriedReasoning:
    """What a relay-made reasoning item carries: the raw text, its signature, its source."""

    text: str
    signature: str | None = None
    kind: str | None = None


def encode_reasoning(text: str, signature: str | None, kind: str) -> str:
    payload = {"k": kind, "t": text}
    if signature:
        payload["s"] = signature
    return REASONING_PREFIX + _b64encode(json.dumps(payload, separators=(",", ":")))


def decode_reasoning(value: object) -> CarriedReasoning | None:
    """The reasoning a relay-made ``encrypted_content`` carries; None for anything else
    (including OpenAI's own encrypted reasoning)."""
    if not isinstance(value, str) or not value.startswith(REASONING_PREFIX):
        return None
    raw = _b64decode(value[len(REASONING_PREFIX) :])
    if raw is None:
        return None
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("t"), str):
        return None
    signature = payload.get("s")
    kind = payload.get("k")
    return CarriedReasoning(
        payload["t"],
        signature if isinstance(signature, str) else None,
        kind if isinstance(kind, str) else None,
    )


# --------------------------------------------------------------------------------------------
# What the answer side needs to know about the request


@dataclass
class TranslationContext:
    """What the response side of a translation needs from the request.

    ``model`` is the model name shown to the client (the one it asked for: an alias stays an
    alias). ``custom_tools`` are the names of Responses ``custom`` tools the upstream was given as
    wrapped functions, and ``namespaced`` maps a flattened ``namespace__name`` back to its parts;
    both are used to give the client back the tool calls in the form it declared them.
    ``echo`` holds the request fields a Responses object repeats (instructions, tools, …).
    """

    client: Endpoint
    upstream_kind: str
    model: str
    stream: bool = False
    include_usage: bool = False
    response_id: str = "resp_relay"
    created: int = 0
    custom_tools: frozenset[str] = frozenset()
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)
    echo: dict = field(default_factory=dict)
    #: The client's stream was opened before the upstream answered (a Messages stream that
    #: waited in the queue got ``message_start`` and pings): the encoder does not open it again.
    opened: bool = False
    #: Tool names shortened for the upstream (see :func:`.translate.shorten_tool_names`):
    #: the upstream's name → the client's.
    tool_names: dict[str, str] = field(default_factory=dict)
    #: A compaction request's form (``"v1"`` or ``"v2"``, see :mod:`.compaction`), if it is one;
    #: a v1 answer repeats the request's user messages (``retained``) before its item.
    compaction: str | None = None
    retained: list[dict] = field(default_factory=list)

    @property
    def passthrough(self) -> bool:
        """Client and upstream speak the same protocol: bytes are relayed as they are."""
        return self.client.upstream_kind == self.upstream_kind
