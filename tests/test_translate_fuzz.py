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

from hypothesis import HealthCheck, assume, given, settings

from relay.errors import RelayError
from relay.protocol.requests import Endpoint, decode_json_body, parse_request
from relay.protocol.translate import UPSTREAM_KINDS, build_upstream_request

from .test_fuzz import chat_bodies, encode, responses_bodies
from .test_fuzz_messages import messages_bodies

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
