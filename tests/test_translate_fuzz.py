"""Translation never fails on what a client may send: every body the relay accepts for Chat,
Responses or Messages is either written for each upstream protocol or refused with a 400.

Pure (no I/O): the bodies of the fuzz suites (:mod:`tests.test_fuzz`,
:mod:`tests.test_fuzz_messages`), decoded and validated as the relay does
(:func:`decode_json_body`, :func:`parse_request`), then handed to :func:`build_upstream_request`
for all four upstream kinds (for Chat and Responses bodies also Anthropic and Gemini, which
:mod:`tests.test_fuzz`'s relay does not serve). Any exception other than a :class:`RelayError`
with a 4xx status would be a 500 at the relay. Derandomized.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relay.errors import RelayError
from relay.protocol.requests import Endpoint, decode_json_body, parse_request
from relay.protocol.translate import (
    UPSTREAM_KINDS,
    StreamTranslator,
    build_upstream_request,
    response_usage,
    translate_response,
)

from .test_fuzz import JSON, chat_bodies, encode, responses_bodies
from .test_fuzz_messages import messages_bodies
from .test_translate_streams import BODIES, UPSTREAMS, context_for, sse_events

FUZZ = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


def _translate_everywhere(endpoint: Endpoint, body: dict) -> None:
    try:
        accepted = parse_request(endpoint, decode_json_body(encode(body)), {})
    except RelayError as refused:
        assert refused.status < 500, refused
        assume(False)
    for kind in UPSTREAM_KINDS:
        for stream in (False, True):
            client_body = {**accepted.body, "stream": stream}
            try:
                request = build_upstream_request(
                    client_body, endpoint, kind, model="upstream-model", api_key="sk-test",
                    reasoning_effort=None,
                )
            except RelayError as refused:
                assert refused.status < 500, (kind, refused)
                continue
            assert isinstance(request.body, dict) and request.path, kind


@FUZZ
@given(body=chat_bodies())
def test_any_accepted_chat_body_translates_or_is_400(body: dict) -> None:
    _translate_everywhere(Endpoint.CHAT, body)


@FUZZ
@given(body=responses_bodies())
def test_any_accepted_responses_body_translates_or_is_400(body: dict) -> None:
    _translate_everywhere(Endpoint.RESPONSES, body)


@FUZZ
@given(body=messages_bodies())
def test_any_accepted_messages_body_translates_or_is_400(body: dict) -> None:
    _translate_everywhere(Endpoint.MESSAGES, body)


# -- upstream answers ---------------------------------------------------------------------------
# The other way: what an upstream answers, of a shape it should not have, fails the answer with
# the upstream's error; it never raises out of the translation (a 500 and a traceback at the
# relay, or a stream cut without its error event).

#: Every client protocol with every upstream kind, the relayed pairs included (their stream is
#: only metered, not decoded).
PAIRS = [(client, kind) for client in (Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.MESSAGES)
         for kind in UPSTREAM_KINDS]
UPSTREAM_FUZZ = settings(FUZZ, max_examples=60)
_GONE = object()


def _subtrees(value, path=()):
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, inner in items:
        yield from _subtrees(inner, (*path, key))


@st.composite
def _mutated(draw, value):
    """``value`` (JSON) with one to three of its subtrees replaced by anything, or removed."""
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_subtrees(value))))
        new = draw(st.one_of(JSON, st.just(_GONE)))
        if not path:
            value = {} if new is _GONE else new
            continue
        value = copy.deepcopy(value)
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        if new is _GONE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
    return value


def _as_decoded(value):
    """``value`` as the relay decodes an upstream's JSON (:class:`Raw` parts parsed)."""
    try:
        return json.loads(encode(value))
    except (ValueError, RecursionError):  # not JSON to Python: a 502 before any translation
        assume(False)


@st.composite
def upstream_streams(draw, kind: str) -> bytes:
    """One of :mod:`tests.test_translate_streams`'s upstream streams with some events'
    payloads mutated (or an event sent twice)."""
    events = [(name, data if data == "[DONE]" else json.loads(data))
              for name, data in sse_events(UPSTREAMS[kind]())]
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(events) - 1))
        name, payload = events[index]
        if payload != "[DONE]":
            events[index] = (name, draw(_mutated(payload)))
    if draw(st.integers(0, 4)) == 0:
        events.insert(draw(st.integers(0, len(events))), draw(st.sampled_from(events)))
    end = b"\r\n\r\n" if kind == "gemini" else b"\n\n"
    return b"".join(
        (f"event: {name}\n".encode() if name else b"")
        + b"data: " + (b"[DONE]" if payload == "[DONE]" else encode(payload)) + end
        for name, payload in events
    )


def _readable(out: bytes) -> None:
    """The client's bytes: UTF-8, and JSON in every ``data:`` line."""
    for _name, data in sse_events(out):
        if data and data != "[DONE]":
            json.loads(data)


@pytest.mark.parametrize(("client", "kind"), PAIRS, ids=lambda v: getattr(v, "value", v))
@UPSTREAM_FUZZ
@given(data=st.data())
def test_any_upstream_stream_is_translated_or_failed(client, kind, data) -> None:
    raw = data.draw(upstream_streams(kind))
    translator = StreamTranslator(kind, context_for(client, kind))
    try:
        out = translator.feed(raw) + translator.finish()
    except RelayError as refused:  # the stream's bounds: answered in the client's error form
        assert refused.status >= 500, refused
        return
    if kind != client.upstream_kind:  # a relayed stream's bytes are the upstream's own
        _readable(out)


@pytest.mark.parametrize(("client", "kind"), PAIRS, ids=lambda v: getattr(v, "value", v))
@UPSTREAM_FUZZ
@given(data=st.data())
def test_any_upstream_answer_is_translated_or_an_upstream_error(client, kind, data) -> None:
    body = _as_decoded(data.draw(_mutated(BODIES[kind])))
    assume(isinstance(body, dict))  # anything else is refused before (relay/api/relay.py)
    context = context_for(client, kind, stream=False)
    response_usage(kind, body)
    try:
        answer = translate_response(kind, context, body)
    except RelayError as refused:
        assert refused.status == 502 and refused.code == "upstream_invalid_response", refused
        return
    json.dumps(answer).encode()
