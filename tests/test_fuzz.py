"""The fuzz suite: nothing a client sends gets a 5xx, a traceback or a broken ledger.

One real relay (with a simulated upstream that has a Chat-only and a Responses-only model, so
translation is exercised both ways) takes 4,100 generated requests through one persistent
httpx2 client: every route and method of ``relay/app.py`` with and without credentials,
malformed bodies for every field of Chat and Responses (wrong types, missing, huge, nested,
lone surrogate escapes, huge integers, deep nesting, ``NaN``), headers and query strings.
Messages bodies, over every upstream kind, are :mod:`tests.test_fuzz_messages`'s (its own relay,
the helpers of this file). Raw HTTP framing (``Content-Length`` mismatches, chunking) is not
fuzzed here.

Each answer must be below 500, and every error the endpoint's JSON error shape with a message:
OpenAI's, or Anthropic's on a Messages route, under ``/claude/`` or with ``anthropic-version``.
At the end: the relay's log holds no traceback, no slot, account call or credit hold is left,
every request that reached a relay route past authentication has exactly one usage row carrying
the status the client got, and every key's balance in the database equals the one in the
relay's memory.

Hypothesis is derandomized (the same cases on every run). ``python -m bench fuzz --examples N``
runs this file and the Messages one with N cases in all (and, with ``--seed``, cases of that
seed): the examples are spread over the tests in the proportions of :data:`SHARES`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from relay.ledger.prices import to_credits

from .conftest import ADMIN_TOKEN, SIM_KEY, Process, start_process, start_relay

#: Cases of each test, of 5,100 in all (scaled by RELAY_FUZZ_EXAMPLES); ``messages`` are
#: :mod:`tests.test_fuzz_messages`'s.
SHARES = {"chat": 1200, "responses": 1200, "messages": 1000, "routes": 800, "headers": 450,
          "queries": 450}
_TOTAL = int(os.environ.get("RELAY_FUZZ_EXAMPLES", sum(SHARES.values())))
_SEED = os.environ.get("RELAY_FUZZ_SEED")


def _settings(name: str):
    examples = max(1, round(SHARES[name] * _TOTAL / sum(SHARES.values())))
    configured = settings(
        max_examples=examples,
        derandomize=_SEED is None,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )

    def apply(test):
        test = configured(test)
        return hypothesis_seed(int(_SEED))(test) if _SEED is not None else test

    return apply


# -- the relay under test -----------------------------------------------------------------------

BODY = textwrap.dedent(
    """
    [pools.main]
    max_concurrency = 100

    [packages.fuzz]
    pool = "main"
    max_concurrency = 50
    max_queue = 50
    tpm = 1_000_000_000
    rpm = 1_000_000
    initial_credits = 1_000_000

    [[accounts]]
    name = "sim-responses"
    pool = "main"
    provider = "openai-responses"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["resp-only", "both"]

    [[accounts]]
    name = "sim-chat"
    pool = "main"
    provider = "openai-chat"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["chat-only", "both"]

    [[accounts]]
    name = "spare"
    pool = "main"
    provider = "openai-chat"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["spare-model"]

    [models.resp-high]
    target = "resp-only"
    reasoning_effort = "high"

    [models.chat-high]
    target = "chat-only"
    reasoning_effort = "high"

    [prices.resp-only]
    input = 100
    output = 200

    [prices.chat-only]
    input = 100
    output = 200

    [prices.both]
    input = 100
    output = 200
    """
)

MODELS = ["chat-only", "resp-only", "both", "chat-high", "resp-high", "no-such-model"]


#: A key refused: no usage row (nobody to bill). The Codex CLI gets these as a 400, which it
#: treats as final (a fuzzed User-Agent may say ``codex``), every other client as a 401.
REFUSED_KEY_CODES = {"missing_api_key", "invalid_api_key", "key_revoked", "key_expired"}


def _refused_key(response: httpx2.Response) -> bool:
    """A refused key's error: OpenAI's carries the code, Anthropic's ends its message with it
    (``… [invalid_api_key]``), and Claude Code gets it as a 403."""
    try:
        error = response.json().get("error")
    except ValueError:
        return False
    if not isinstance(error, dict):
        return False
    if error.get("code") in REFUSED_KEY_CODES:
        return True
    message = error.get("message")
    return "code" not in error and isinstance(message, str) and any(
        message.endswith(f"[{code}]") for code in REFUSED_KEY_CODES
    )


#: Anthropic's error types (platform.claude.com, "Errors").
ANTHROPIC_ERROR_TYPES = {
    "invalid_request_error", "authentication_error", "billing_error", "permission_error",
    "not_found_error", "request_too_large", "rate_limit_error", "api_error", "overloaded_error",
    "timeout_error",
}


def speaks_anthropic(path: str, headers: dict) -> bool:
    """Whether the relay must answer errors in Anthropic's shape (README, "Anthropic
    clients"): a Messages route, anything under ``/claude/``, or a request naming an
    ``anthropic-version``."""
    path = path.partition("?")[0]
    return (
        "anthropic-version" in {name.lower() for name in headers}
        or path.startswith("/claude/")
        or path.rstrip("/").endswith(("/messages", "/messages/count_tokens"))
    )


@dataclass
class Target:
    """The relay under test, its client, and what the ledger check needs to know."""

    relay_url: str
    log: Path
    database: Path
    http: httpx2.Client
    key: str
    key_id: str
    other_key_id: str  # the admin routes are fuzzed on this one, never on ``key``
    #: request id → status the client got, for every request a relay route authenticated.
    relayed: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    reconnects: int = 0

    def __repr__(self) -> str:  # not the thousands of request ids, in hypothesis' reports
        return f"Target({self.relay_url})"

    def send(self, method: str, path: str, *, headers=None, content=None, relayed=False):
        headers = {name: value.encode("latin-1", "replace") if isinstance(value, str) else value
                   for name, value in (headers or {}).items()}
        try:
            response = self.http.request(method, path, headers=headers, content=content)
        except httpx2.RemoteProtocolError:
            # A pooled keep-alive connection the relay closed as the request went out (seen
            # rarely after an error answered before the body was read: hypercorn keeps no
            # connection whose request body is unread). Nothing reached a handler; once more
            # on a fresh connection. Connection handling is tested elsewhere.
            self.reconnects += 1
            response = self.http.request(method, path, headers=headers, content=content)
        self.sent += 1
        check_answer(response, method, anthropic=speaks_anthropic(path, headers))
        if relayed and response.status_code != 401 and not _refused_key(response):
            self.relayed[response.headers["x-request-id"]] = response.status_code
        return response


@contextmanager
def running_target(tmp: Path, body: str) -> Iterator[Target]:
    """A relay with config ``body`` over a fast simulated upstream, two keys of package
    ``fuzz``, and a client."""
    sim: Process = start_process(
        [
            "-m", "relay.testing.upstream", "--port", "0", "--api-key", SIM_KEY,
            "--ttft", "0", "--token-delay", "0", "--tokens", "3",
        ],
        r"listening on (\S+)",
        tmp / "sim.log",
    )
    relay = start_relay(tmp, sim.url, body=body)
    try:
        key, key_id = relay.create_paid_key("fuzz")
        _, other_id = relay.create_paid_key("fuzz")
        with httpx2.Client(base_url=relay.url, timeout=30) as http:
            yield Target(relay.url, relay.process.log, relay.database, http, key, key_id, other_id)
    finally:
        relay.process.stop()
        sim.stop()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with running_target(tmp_path_factory.mktemp("fuzz"), BODY) as started:
        yield started


def check_answer(response: httpx2.Response, method: str, *, anthropic: bool = False) -> None:
    """Below 500; an error is the endpoint's error JSON with a message: OpenAI's, or
    Anthropic's (``{"type": "error", "error": {"type", "message"}, "request_id"}``)."""
    status = response.status_code
    where = f"{method} {response.request.url} -> {status}: {response.text[:300]!r}"
    assert status < 500, where
    if status >= 400 and method != "HEAD":
        assert response.headers["content-type"].startswith("application/json"), where
        if anthropic:
            check_anthropic_error(response.json(), where)
            return
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"].strip(), where
        assert isinstance(error["type"], str) and error["type"], where


def check_anthropic_error(body: dict, where: str) -> None:
    """Anthropic's error object, with a message and one of Anthropic's types."""
    assert body["type"] == "error" and set(body) <= {"type", "error", "request_id"}, where
    error = body["error"]
    assert set(error) == {"type", "message"}, where
    assert error["type"] in ANTHROPIC_ERROR_TYPES, where
    assert isinstance(error["message"], str) and error["message"].strip(), where


# -- values -------------------------------------------------------------------------------------


class Raw(str):
    """JSON text put into the body as is: what json.dumps cannot write (deep nesting, a
    5,000-digit number, NaN)."""


RAWS = [
    Raw("[" * 1200 + "]" * 1200),
    Raw('{"a":' * 1100 + "1" + "}" * 1100),
    Raw("[" * 300 + "]" * 300),
    Raw("9" * 5000),
    Raw("-" + "1" * 4400),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw('"\\ud800"'),
    Raw('"a\\udfffb"'),
    Raw('"\\ud83d\\ude00"'),
    Raw('"\\u0000"'),
]

STRINGS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["", " ", "\ud800", "x\udc00", "\udbff\udbff", "😀", "\x00", "\u2028", "é" * 3,
         "data:image/png;base64,AAAA", "data:application/pdf;base64,JVBERi0=",
         "data:text/plain;base64,aGk=", "https://example.invalid/a.png", "a" * 5000]
    ),
)
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 10**30, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324]),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS, st.sampled_from(RAWS))
JSON = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(STRINGS, inner, max_size=3)
    ),
    max_leaves=6,
)


def weird_or(*plausible):
    """A plausible value for a field, or anything at all."""
    return st.one_of(*plausible, JSON)


def encode(value) -> bytes:
    """``value`` as JSON text, with :class:`Raw` parts inserted verbatim; lone surrogates
    become ``\\udXXX`` escapes (ensure_ascii), as a client would send them."""
    raws: list[str] = []

    def mark(item):
        if isinstance(item, Raw):
            raws.append(item)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(item, dict):
            return {mark(k) if isinstance(k, Raw) else k: mark(v) for k, v in item.items()}
        if isinstance(item, list):
            return [mark(v) for v in item]
        return item

    text = json.dumps(mark(value))
    for index, raw in enumerate(raws):
        text = text.replace(f'"@@raw{index}@@"', raw, 1)
    return text.encode()


def mutate(base: dict, fields: list[str]) -> st.SearchStrategy[dict]:
    """``base`` with some of ``fields`` set to anything, or removed."""

    @st.composite
    def build(draw):
        body = dict(base)
        for name in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
            if draw(st.integers(0, 5)) == 0:
                body.pop(name, None)
            else:
                body[name] = draw(JSON)
        return body

    return build()


# -- Chat ---------------------------------------------------------------------------------------

CHAT_FIELDS = [
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "n", "stop", "tools", "tool_choice", "functions", "function_call",
    "response_format", "reasoning_effort", "reasoning", "user", "prompt_cache_key", "session_id",
    "parallel_tool_calls", "logprobs", "top_logprobs", "seed", "metadata", "verbosity", "store",
    "modalities", "audio", "presence_penalty", "frequency_penalty", "logit_bias", "prediction",
    "service_tier", "web_search_options",
]

CHAT_PART = st.fixed_dictionaries(
    {"type": weird_or(st.sampled_from(["text", "image_url", "file", "input_audio", "refusal"]))},
    optional={
        "text": weird_or(STRINGS),
        "refusal": weird_or(STRINGS),
        "image_url": weird_or(
            STRINGS, st.fixed_dictionaries({"url": weird_or(STRINGS)},
                                           optional={"detail": weird_or(STRINGS)})
        ),
        "file": weird_or(st.fixed_dictionaries(
            {}, optional={"file_data": weird_or(STRINGS), "filename": weird_or(STRINGS),
                          "file_id": weird_or(STRINGS)},
        )),
        "input_audio": JSON,
    },
)
TOOL_CALL = st.fixed_dictionaries(
    {},
    optional={
        "id": weird_or(STRINGS),
        "type": weird_or(st.just("function"), STRINGS),
        "function": weird_or(st.fixed_dictionaries(
            {}, optional={"name": weird_or(STRINGS), "arguments": weird_or(STRINGS)}
        )),
    },
)
CHAT_MESSAGE = st.fixed_dictionaries(
    {
        "role": weird_or(
            st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])
        ),
    },
    optional={
        "content": weird_or(STRINGS, st.lists(weird_or(CHAT_PART), max_size=3)),
        "tool_calls": weird_or(st.lists(weird_or(TOOL_CALL), max_size=2)),
        "tool_call_id": weird_or(STRINGS),
        "name": weird_or(STRINGS),
        "function_call": JSON,
        "reasoning_content": weird_or(STRINGS),
    },
)
CHAT_TOOL = st.fixed_dictionaries(
    {"type": weird_or(st.just("function"), STRINGS)},
    optional={
        "function": weird_or(st.fixed_dictionaries(
            {}, optional={"name": weird_or(STRINGS), "description": weird_or(STRINGS),
                          "parameters": JSON, "strict": JSON},
        )),
    },
)


@st.composite
def chat_bodies(draw) -> dict:
    body = {
        "model": draw(st.sampled_from(MODELS)),
        "messages": draw(
            st.one_of(
                st.just([{"role": "user", "content": "hi"}]),
                st.lists(weird_or(CHAT_MESSAGE), min_size=1, max_size=4),
            )
        ),
    }
    if draw(st.booleans()):
        body["stream"] = True
    if draw(st.integers(0, 3)) == 0:
        body["tools"] = draw(st.lists(weird_or(CHAT_TOOL), max_size=2))
    return draw(mutate(body, CHAT_FIELDS))


@_settings("chat")
@given(body=chat_bodies())
def test_fuzz_chat_bodies(target: Target, body: dict) -> None:
    target.send(
        "POST", "/v1/chat/completions", content=encode(body), relayed=True,
        headers={"authorization": f"Bearer {target.key}", "content-type": "application/json"},
    )


# -- Responses ----------------------------------------------------------------------------------

RESPONSES_FIELDS = [
    "model", "input", "instructions", "tools", "tool_choice", "text", "reasoning",
    "max_output_tokens", "previous_response_id", "store", "include", "metadata", "truncation",
    "parallel_tool_calls", "stream", "stream_options", "prompt_cache_key", "temperature",
    "top_p", "user", "background", "conversation", "prompt", "service_tier", "max_tool_calls",
    "top_logprobs", "safety_identifier",
]

INPUT_PART = st.fixed_dictionaries(
    {
        "type": weird_or(st.sampled_from(
            ["input_text", "input_image", "input_file", "output_text", "refusal", "text",
             "summary_text", "reasoning_text"]
        )),
    },
    optional={
        "text": weird_or(STRINGS),
        "image_url": weird_or(STRINGS),
        "file_data": weird_or(STRINGS),
        "file_id": weird_or(STRINGS),
        "filename": weird_or(STRINGS),
        "detail": weird_or(STRINGS),
        "refusal": weird_or(STRINGS),
    },
)
INPUT_ITEM = st.fixed_dictionaries(
    {
        "type": weird_or(st.sampled_from(
            ["message", "function_call", "function_call_output", "reasoning", "item_reference",
             "custom_tool_call", "custom_tool_call_output", "local_shell_call",
             "web_search_call", "compaction"]
        )),
    },
    optional={
        "role": weird_or(st.sampled_from(["user", "assistant", "system", "developer"])),
        "content": weird_or(STRINGS, st.lists(weird_or(INPUT_PART), max_size=3)),
        "call_id": weird_or(STRINGS),
        "name": weird_or(STRINGS),
        "arguments": weird_or(STRINGS),
        "input": weird_or(STRINGS),
        "output": weird_or(STRINGS, st.lists(weird_or(INPUT_PART), max_size=2)),
        "id": weird_or(STRINGS),
        "summary": weird_or(st.lists(weird_or(INPUT_PART), max_size=2)),
        "encrypted_content": weird_or(STRINGS),
        "status": weird_or(STRINGS),
    },
)
RESPONSES_TOOL = st.fixed_dictionaries(
    {"type": weird_or(st.sampled_from(["function", "custom", "web_search", "local_shell"]))},
    optional={
        "name": weird_or(STRINGS),
        "description": weird_or(STRINGS),
        "parameters": JSON,
        "strict": JSON,
        "format": JSON,
    },
)


@st.composite
def responses_bodies(draw) -> dict:
    body = {
        "model": draw(st.sampled_from(MODELS)),
        "input": draw(
            st.one_of(
                st.just("hi"),
                st.lists(weird_or(INPUT_ITEM), min_size=1, max_size=4),
            )
        ),
    }
    if draw(st.booleans()):
        body["stream"] = True
    if draw(st.integers(0, 3)) == 0:
        body["tools"] = draw(st.lists(weird_or(RESPONSES_TOOL), max_size=2))
    if draw(st.integers(0, 3)) == 0:
        body["text"] = draw(weird_or(st.fixed_dictionaries(
            {}, optional={"format": JSON, "verbosity": weird_or(STRINGS)}
        )))
    if draw(st.integers(0, 3)) == 0:
        body["reasoning"] = draw(weird_or(st.fixed_dictionaries(
            {}, optional={"effort": weird_or(STRINGS), "summary": weird_or(STRINGS)}
        )))
    return draw(mutate(body, RESPONSES_FIELDS))


@_settings("responses")
@given(body=responses_bodies())
def test_fuzz_responses_bodies(target: Target, body: dict) -> None:
    target.send(
        "POST", "/v1/responses", content=encode(body), relayed=True,
        headers={"authorization": f"Bearer {target.key}", "content-type": "application/json"},
    )


# -- routes, methods, credentials ---------------------------------------------------------------

BASES = ["/v1", "/openai/v1", "/codex/v1", "/api/v1"]
SELF_SERVICE = ["/balance", "/dashboard/billing/subscription", "/dashboard/billing/usage",
                "/usage", "/limits", "/calls"]
RELAY_ROUTES = ["/chat/completions", "/responses", "/messages"]
#: Anthropic clients' base (``ANTHROPIC_BASE_URL=…/claude``): Messages and models only.
CLAUDE_BASE = "/claude/v1"


def _paths(target: Target) -> list[str]:
    other = target.other_key_id
    return [
        *(base + route for base in BASES for route in RELAY_ROUTES),
        *(base + route for base in BASES for route in SELF_SERVICE),
        *(base + "/models" for base in BASES),
        *(base + "/messages/count_tokens" for base in (*BASES, CLAUDE_BASE)),
        CLAUDE_BASE + "/messages", CLAUDE_BASE + "/models", CLAUDE_BASE + "/models/chat-only",
        CLAUDE_BASE + "/chat/completions", "/claude", "/claude/nothing",
        "/v1/models/chat-only", "/v1/models/org/name", "/v1/models/%00", "/v1",
        "/openai/responses", "/openai", "/healthz", "/", "/workbench", "/web/app.js",
        "/web/%2e%2e%2fsecret", "/web/nothing.css", "/metrics",
        "/dashboard/billing/subscription", "/dashboard/billing/usage",
        "/admin/state", "/admin/keys", f"/admin/keys/{other}", "/admin/keys/key_nothing",
        "/admin/keys/sk-plaintext", f"/admin/keys/{other}/topup", f"/admin/keys/{other}/limits",
        f"/admin/keys/{other}/revoke", "/admin/accounts", "/admin/accounts/spare/enable",
        "/admin/accounts/spare/disable", "/admin/accounts/nothing/enable", "/admin/queues",
        "/nothing", "/v1/nothing", "/v2/chat/completions", "//v1//models", "/v1/chat/completions/",
    ]


def _auth(target: Target):
    key = target.key
    return st.sampled_from([
        {},
        {"authorization": f"Bearer {key}"},
        {"authorization": key},
        {"x-api-key": key},
        {"authorization": f"bearer   {key}"},
        {"authorization": "Bearer sk-wrong"},
        {"authorization": "Bearer"},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": f"Bearer {ADMIN_TOKEN}"},
        {"authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"x-api-key": "\xe9\xff"},
        {"x-api-key": key, "anthropic-version": "2023-06-01"},
        {"x-api-key": "sk-wrong", "anthropic-version": "2023-06-01"},
        {"x-api-key": "sk-wrong", "user-agent": "claude-cli/2.0.0 (external, cli)"},
    ])


CONTENT_TYPES = st.sampled_from([
    None, "application/json", "application/json; charset=utf-8", "text/plain",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/ld+json",
    "", ";;;", "application/json; charset=latin-1",
])
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=64),
    JSON.map(encode),
    st.builds(
        lambda model, rest: encode({"model": model, "input": "hi",
                                    "messages": [{"role": "user", "content": "hi"}], **rest}),
        st.sampled_from(MODELS), st.dictionaries(st.sampled_from(CHAT_FIELDS), JSON, max_size=2),
    ),
    st.builds(
        lambda model, stream: encode({"model": model, "max_tokens": 16, "stream": stream,
                                      "messages": [{"role": "user", "content": "hi"}]}),
        st.sampled_from(MODELS), st.booleans(),
    ),
    st.sampled_from([b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b"{}" * 1000, b" " * 100]),
)
QUERY = st.lists(
    st.tuples(
        st.sampled_from(["limit", "from", "to", "group_by", "start_date", "end_date", "x", ""]),
        STRINGS,
    ),
    max_size=3,
)


def _query(pairs) -> str:
    if not pairs:
        return ""
    return "?" + "&".join(
        f"{quote(name)}={quote(value.encode('utf-8', 'surrogatepass'))}" for name, value in pairs
    )


#: The paths the relay routes serve (a trailing slash is the same route).
RELAY_PATHS = {
    *(base + route + slash for base in BASES for route in RELAY_ROUTES for slash in ("", "/")),
    CLAUDE_BASE + "/messages", CLAUDE_BASE + "/messages/",
    "/openai/responses",
}


@_settings("routes")
@given(data=st.data())
def test_fuzz_routes_methods_and_credentials(target: Target, data) -> None:
    method = data.draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD",
                                        "OPTIONS"]))
    path = data.draw(st.sampled_from(_paths(target)))
    headers = dict(data.draw(_auth(target)))
    content_type = data.draw(CONTENT_TYPES)
    if content_type is not None:
        headers["content-type"] = content_type
    body = data.draw(BODIES)
    query = _query(data.draw(QUERY))
    relayed = method == "POST" and path in RELAY_PATHS
    target.send(method, path + query, headers=headers, content=body, relayed=relayed)


# -- headers of the relay routes ----------------------------------------------------------------

HEADER_NAMES = ["session-id", "session_id", "conversation_id", "thread-id", "thread_id",
                "originator", "user-agent", "openai-beta", "accept", "content-encoding",
                "x-request-id", "openai-organization", "chatgpt-account-id", "version",
                "accept-encoding", "anthropic-version", "anthropic-beta", "x-app",
                "x-claude-code-session-id"]
HEADER_VALUES = st.one_of(
    # h11 (the client's) refuses values with leading or trailing blanks: framing is not ours.
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(str.strip),
    st.sampled_from(["codex_cli_rs", "codex/1.0", "gzip", "identity", "br", "\xe9\xe8",
                     "a" * 4000, "text/event-stream", "*/*", "responses=experimental",
                     "2023-06-01", "cli", "claude-cli/2.0.0 (external, cli)",
                     "interleaved-thinking-2025-05-14,context-1m-2025-08-07"]),
)


@_settings("headers")
@given(data=st.data())
def test_fuzz_relay_route_headers(target: Target, data) -> None:
    path = data.draw(st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/messages"]))
    headers = dict(data.draw(_auth(target)))
    headers.update(data.draw(st.dictionaries(st.sampled_from(HEADER_NAMES), HEADER_VALUES,
                                             max_size=3)))
    content_type = data.draw(CONTENT_TYPES)
    if content_type is not None:
        headers["content-type"] = content_type
    body = {"model": data.draw(st.sampled_from(MODELS)), "stream": data.draw(st.booleans())}
    if path.endswith("responses"):
        body["input"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    if path.endswith("messages"):
        body["max_tokens"] = 16
    target.send("POST", path, headers=headers, content=encode(body), relayed=True)


# -- self-service query strings -----------------------------------------------------------------

QUERY_VALUES = st.one_of(
    STRINGS,
    NUMBERS.map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e300", "-1e300", "9999-12-31", "0001-01-01",
                     "2025-02-30", "2025-01-31T12:00:00Z", "2025-01-31T12:00:00+14:00",
                     "2025-W01-1", "²", "٣", "1_000", " 5 ", "0x10", "500", "501", "0", "-0",
                     "1" * 5000, "day", "hour", "model", "DAY", ""]),
)


@_settings("queries")
@given(data=st.data())
def test_fuzz_self_service_queries(target: Target, data) -> None:
    path = data.draw(st.sampled_from(
        [f"{base}{route}" for base in ("/v1", "/api/v1") for route in SELF_SERVICE]
        + ["/dashboard/billing/usage"]
    ))
    pairs = data.draw(st.lists(
        st.tuples(st.sampled_from(["limit", "from", "to", "group_by", "start_date",
                                   "end_date"]), QUERY_VALUES),
        max_size=3,
    ))
    target.send("GET", path + _query(pairs),
                headers={"authorization": f"Bearer {target.key}"})


# -- the findings of issue 12, each once ---------------------------------------------------------

FOUND = [
    ("/v1/chat/completions",
     b'{"model":"resp-only","messages":[{"role":"user","content":"hi"}],"stop":true}'),
    ("/v1/responses", b'{"model":"chat-only","input":[{"type":{}}]}'),
    ("/v1/chat/completions", b'{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}'),
    ("/v1/chat/completions",
     b'{"model":"chat-only","messages":[{"role":"user","content":"\\ud800"}]}'),
    ("/v1/responses", b'{"model":"resp-only","input":"a\\udfff"}'),
    ("/v1/chat/completions", b'{"model":"chat-only","messages":[{"role":"user","content":"hi"}]'
     b',"x":' + b"[" * 1200 + b"]" * 1200 + b"}"),
    ("/v1/chat/completions", b'{"model":"chat-only","messages":[{"role":"user","content":"hi"}]'
     b',"seed":' + b"9" * 5000 + b"}"),
    ("/v1/chat/completions", b'{"model":"chat-only","messages":[{"role":"user","content":"hi"}]'
     b',"temperature":1e999}'),
    ("/v1/responses", b'{"model":"resp-only","input":"hi","temperature":NaN}'),
]


@pytest.mark.parametrize("path,body", FOUND)
def test_issue_12_findings_are_4xx(target: Target, path: str, body: bytes) -> None:
    response = target.send(
        "POST", path, content=body, relayed=True,
        headers={"authorization": f"Bearer {target.key}", "content-type": "application/json"},
    )
    assert 400 <= response.status_code < 500


@pytest.mark.parametrize(
    "query,param",
    [("/v1/calls?limit=%C2%B2", "limit"), ("/v1/usage?from=nan", "from"),
     ("/v1/usage?to=1e300", "to"), ("/v1/usage?to=9999-12-31", "to")],
)
def test_issue_12_self_service_queries_are_400(target: Target, query: str, param: str) -> None:
    response = target.send("GET", query, headers={"authorization": f"Bearer {target.key}"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


# -- afterwards: the log and the ledger ----------------------------------------------------------


def test_zz_log_and_ledger_are_intact(target: Target) -> None:
    """Runs last (pytest keeps the file's order): checks what all the cases above left."""
    check_log_and_ledger(target)


def check_log_and_ledger(target: Target) -> None:
    """No traceback in the log, no slot or credit hold left, and for every relayed request
    one usage row with the status the client got; every key's balance the same in the
    database and in the relay's memory."""
    assert target.relayed, "no request reached a relay route"
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    deadline = time.monotonic() + 10
    while True:
        state = target.http.get("/admin/state", headers=admin).json()
        busy = {
            "usage records queued": state["usage_records"]["queued"],
            "requests active": state["active_requests"],
            "slots held": state["admission"]["total"],
            "accounts in flight": sum(a["in_flight"] for a in state["accounts"].values()),
            "credit holds": state["credits"]["holds"],
        }
        if not any(busy.values()):
            break
        assert time.monotonic() < deadline, f"left behind: {busy}"
        time.sleep(0.05)
    log = target.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-5000:]

    connection = sqlite3.connect(f"file:{target.database}?mode=ro", uri=True)
    try:
        rows: dict[str, list[int]] = {}
        for request_id, status in connection.execute("select request_id, status from usage"):
            rows.setdefault(request_id, []).append(status)
        stored = dict(connection.execute(
            "select id, credits_used_nano from api_keys"
        ).fetchall())
        summed = dict(connection.execute(
            "select key_id, sum(cost_nano) from usage group by key_id"
        ).fetchall())
    finally:
        connection.close()
    missing = {rid: status for rid, status in target.relayed.items() if rid not in rows}
    assert not missing, (
        f"{len(missing)} of {len(target.relayed)} requests have no usage row: "
        f"{list(missing.items())[:5]}"
    )
    assert all(len(rows[rid]) == 1 for rid in target.relayed)
    wrong = {rid: (status, rows[rid][0]) for rid, status in target.relayed.items()
             if rows[rid][0] != status}
    assert not wrong, f"rows whose status is not what the client got: {list(wrong.items())[:5]}"
    assert 0 not in {status for statuses in rows.values() for status in statuses}

    keys = target.http.get("/admin/keys", headers=admin).json()["data"]
    for key in keys:
        assert key["credits"]["used"] == to_credits(stored[key["id"]]), key
        assert stored[key["id"]] == (summed.get(key["id"]) or 0), key
    assert stored[target.key_id] > 0
    print(
        f"fuzz: {target.sent} requests, {len(target.relayed)} relayed with a usage row each, "
        f"{target.reconnects} sent again on a fresh connection"
    )
