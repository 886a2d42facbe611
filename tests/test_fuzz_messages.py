"""The fuzz suite for ``POST /v1/messages``: nothing an Anthropic client sends gets a 5xx, a
traceback or a broken ledger, whichever upstream kind serves the model.

One real relay with an account of each upstream kind (``anthropic``, relayed as it is;
``openai-responses``, ``openai-chat`` and ``gemini``, translated) on a simulated upstream, and
generated Messages bodies through one persistent httpx2 client: well-formed conversations
(system as a string or blocks, thinking blocks signed by Anthropic or by the relay, tool_use and
tool_result pairs, images and documents) and malformed ones (every field of the body missing or
of any type, ``max_tokens`` absent, odd content blocks, tool results that answer no call, deep
JSON, 5,000-digit integers, ``NaN``, lone surrogate escapes), streamed or not, and the
``count_tokens`` route with the same bodies.

Each answer must be below 500; an error is Anthropic's error JSON
(``{"type": "error", "error": {"type", "message"}}``) with a message; a 200 is a Message
object, or a stream of Anthropic's events that begins with ``message_start``, keeps its content
blocks in order and ends with ``message_stop`` (or an ``error`` event of the same shape). At the
end, as in :mod:`tests.test_fuzz`: no traceback, no slot or credit hold left, one usage row per
authenticated request with the status the client got, balances the same in database and memory.

Derandomized; ``python -m bench fuzz`` runs this file too, with the share ``messages`` of
:data:`tests.test_fuzz.SHARES`.
"""

from __future__ import annotations

import base64
import json
import textwrap
from collections.abc import Iterator

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.protocol.events import call_id_with_signature, encode_reasoning

from .test_fuzz import (
    JSON,
    NUMBERS,
    RAWS,
    STRINGS,
    Target,
    _settings,
    check_anthropic_error,
    check_log_and_ledger,
    encode,
    mutate,
    running_target,
)

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
    name = "sim-anthropic"
    pool = "main"
    provider = "anthropic"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["anth-only"]

    [[accounts]]
    name = "sim-responses"
    pool = "main"
    provider = "openai-responses"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["resp-only"]

    [[accounts]]
    name = "sim-chat"
    pool = "main"
    provider = "openai-chat"
    base_url = "SIM_URL/v1"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["chat-only"]

    [[accounts]]
    name = "sim-gemini"
    pool = "main"
    provider = "gemini"
    base_url = "SIM_URL/v1beta"
    api_key_env = "SIM_UPSTREAM_KEY"
    models = ["gem-only"]

    [models."claude-sonnet-*"]
    target = "resp-only"

    [models.anth-high]
    target = "anth-only"
    reasoning_effort = "high"

    [prices.anth-only]
    input = 100
    output = 200

    [prices.resp-only]
    input = 100
    output = 200

    [prices.chat-only]
    input = 100
    output = 200

    [prices.gem-only]
    input = 100
    output = 200
    """
)

MODELS = ["anth-only", "resp-only", "chat-only", "gem-only", "claude-sonnet-4-5-20250929",
          "anth-high", "no-such-model"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with running_target(tmp_path_factory.mktemp("fuzz-messages"), BODY) as started:
        yield started


# -- values -------------------------------------------------------------------------------------

PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNg+M/AAAADAQEAGNhOAAAAAElFTkSu"
    "QmCC"
)
PDF = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


#: Text any upstream takes (no lone surrogates, no NUL): the well-formed bodies' strings.
CLEAN_TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
    st.sampled_from(["hi", "é" * 3, "😀", "a" * 5000, " "]),
)
#: Call ids: plain, carrying a signature the relay made (``~sa.``/``~sg.``), or a broken one.
CALL_IDS = st.sampled_from([
    "toolu_01", "toolu_02", "call_1", " ", "toolu_01~s", "toolu_01~sa.", "toolu_01~sa.!!",
    "toolu_01~sz." + _b64("sig"), "toolu_01~sg." + _b64("é"),
    call_id_with_signature("toolu_01", "anthropic", "sig-a"),
    call_id_with_signature("toolu_02", "gemini", "sig-g"),
    "x" * 300,
])
ODD_CALL_IDS = st.one_of(CALL_IDS, st.sampled_from(["", "\ud800", "toolu_01~sa.\udc00"]))
#: Thinking signatures: Anthropic's (opaque), the relay's (``rly1.`` + base64 JSON), or broken.
SIGNATURES = st.sampled_from([
    "EqQBCkgIARABGAIiQL", "rly1.", "rly1.!!", "rly1." + _b64("[]"), "rly1." + _b64('{"t":1}'),
    "rly1." + _b64('{"t":"x","k":7,"s":[]}'),
    encode_reasoning("thought", "gAAAABenc", "openai-responses"),
    encode_reasoning("thought", "sig-g", "gemini"),
    encode_reasoning("thought", None, "openai-chat"),
    encode_reasoning("\ud800", "\udfff", "nope"),  # lone surrogates inside the base64
    encode_reasoning("", "EqQBCkgIARABGAIiQL", "anthropic"),
])
TOOL_NAMES = st.sampled_from(["Read", "Bash", "get_weather", "a" * 200,
                              "mcp__server__" + "tool_" * 20, "a.b/c"])
ODD_TOOL_NAMES = st.one_of(TOOL_NAMES, st.sampled_from(["", "\ud800", "a b"]))
MEDIA_TYPES = st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp",
                               "application/pdf"])
ODD_MEDIA_TYPES = st.one_of(MEDIA_TYPES, st.sampled_from(["text/plain", "image/svg+xml", "",
                                                          "\ud800", "application/zip"]))
URLS = st.sampled_from([
    "https://example.invalid/a.png", "https://example.invalid/a.pdf", "file:///etc/passwd",
    "data:image/png;base64," + PNG, "http://127.0.0.1:1/x", "ftp://x/y.zip",
])
EFFORTS = st.sampled_from(["low", "medium", "high", "max", "xhigh"])
BLOCK_TYPES = ["text", "image", "document", "tool_use", "tool_result", "thinking",
               "redacted_thinking", "server_tool_use", "web_search_tool_result", "search_result",
               "container_upload", "mcp_tool_use"]
MEDIA_CONTENT = [
    {"type": "text", "text": "look"},
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                    "data": PDF}, "title": "spec.pdf"},
]


def seldom_weird(*plausible):
    """A plausible value, or (one time in five) anything at all."""
    return st.one_of(*(plausible * 4), JSON)


class Parts:
    """The strategies of a Messages body's parts, well-formed (``odd=False``: every value
    one the API takes, so that the body reaches an upstream) or not (``odd=True``: a value
    of any type now and then, odd strings, ids and media types, roles and block types the
    API does not know)."""

    def __init__(self, odd: bool) -> None:
        vary = seldom_weird if odd else st.one_of
        text = STRINGS if odd else CLEAN_TEXT
        call_ids = ODD_CALL_IDS if odd else CALL_IDS
        names = ODD_TOOL_NAMES if odd else TOOL_NAMES
        self.text, self.call_ids, self.names = text, call_ids, names
        self.signatures = st.one_of(SIGNATURES, STRINGS) if odd else SIGNATURES
        source = st.fixed_dictionaries(
            {"type": vary(st.sampled_from(["base64", "url", "file", "text", "content"]
                                          if odd else ["base64", "url", "file"]))},
            optional={
                "media_type": vary(ODD_MEDIA_TYPES if odd else MEDIA_TYPES),
                "data": vary(st.sampled_from([PNG, PDF, "", "!!!not base64", "AAAA"])),
                "url": vary(URLS),
                "file_id": vary(text),
                **({"content": JSON} if odd else {}),
            },
        )
        fields = {
            "text": vary(text),
            "source": vary(source),
            "id": vary(call_ids),
            "name": vary(names),
            "input": JSON if odd else st.just({"file_path": "/tmp/a"}),
            "tool_use_id": vary(call_ids),
            "is_error": vary(st.booleans()),
            "thinking": vary(text),
            "signature": vary(self.signatures),
            "data": vary(text),
            "cache_control": vary(st.sampled_from([{"type": "ephemeral"},
                                                   {"type": "ephemeral", "ttl": "1h"}])),
            "title": vary(text),
            **({"citations": JSON} if odd else {}),
        }
        types = BLOCK_TYPES if odd else ["text", "image", "document", "thinking",
                                         "redacted_thinking"]
        inner = st.fixed_dictionaries(
            {"type": vary(st.sampled_from(["text", "image", "document", "search_result"]))},
            optional=fields,
        )
        self.inner_block = inner
        block = st.fixed_dictionaries(
            {"type": vary(st.sampled_from(types))},
            optional={**fields, "content": vary(text, st.lists(vary(inner), max_size=2))},
        )
        roles = ["user", "assistant", "system", "tool", "developer"] if odd else [
            "user", "assistant", "system"]
        self.message = st.fixed_dictionaries(
            {"role": vary(st.sampled_from(roles)),
             "content": vary(text, st.lists(vary(block), max_size=3))},
        )
        tool_types = ["custom", "web_search_20250305", "bash_20250124", "text_editor_20250728"]
        self.tool = st.fixed_dictionaries(
            {"name": vary(names),
             "input_schema": vary(st.just({"type": "object", "properties": {}}), st.just(
                 {"type": "object", "properties": {"file_path": {"type": "string"}},
                  "required": ["file_path"]}))},
            optional={
                "type": vary(st.sampled_from(tool_types)),
                "description": vary(text),
                "cache_control": vary(st.just({"type": "ephemeral"})),
                **({"max_uses": JSON} if odd else {}),
            },
        )
        self.system = vary(text, st.lists(vary(st.fixed_dictionaries(
            {"type": vary(st.just("text")), "text": vary(text)},
            optional={"cache_control": vary(st.just({"type": "ephemeral"}))},
        )), max_size=3))
        self.thinking = vary(st.fixed_dictionaries(
            {"type": vary(st.sampled_from(["enabled", "adaptive", "disabled"]))},
            optional={
                "budget_tokens": vary(st.sampled_from([0, 1024, 2000, 16000, 40000, 10**30])
                                      if odd else st.sampled_from([1024, 2000, 3000])),
                "display": vary(st.sampled_from(["omitted", "summarized"])),
            },
        ))
        self.tool_choice = vary(st.fixed_dictionaries(
            {"type": vary(st.sampled_from(["auto", "any", "tool", "none"]))},
            optional={"name": vary(names), "disable_parallel_tool_use": vary(st.booleans())},
        ))
        self.output_config = vary(st.fixed_dictionaries({}, optional={"effort": vary(EFFORTS)}))
        self.stop_sequences = vary(st.lists(text, max_size=2))
        self.user_id = vary(st.just(
            "user_abc_account_def_session_0f1e2d3c-aaaa-bbbb-cccc-0123456789ab"
        ), text)


ODD, WELL_FORMED = Parts(odd=True), Parts(odd=False)


@st.composite
def tool_exchange(draw, parts: Parts) -> list:
    """A tool round trip (question; thinking, text and tool_use blocks; the tool results),
    whose ids may not match: a result for no call, a call with no result, two results for one
    call, results after text."""
    uses = draw(st.lists(parts.call_ids, min_size=1, max_size=3))
    results = draw(st.one_of(
        st.just(list(uses)), st.permutations(uses), st.lists(parts.call_ids, max_size=3),
    ))
    assistant: list = []
    if draw(st.booleans()):
        assistant.append({"type": "thinking", "thinking": draw(parts.text),
                          "signature": draw(parts.signatures)})
    if draw(st.integers(0, 3)) == 0:
        assistant.append({"type": "redacted_thinking", "data": draw(parts.text)})
    if draw(st.booleans()):
        assistant.append({"type": "text", "text": draw(parts.text)})
    for call_id in uses:
        assistant.append({"type": "tool_use", "id": call_id, "name": draw(parts.names),
                          "input": draw(seldom_weird(st.just({"file_path": "/tmp/a"})))})
    answer: list = []
    if draw(st.integers(0, 4)) == 0:
        answer.append({"type": "text", "text": "first"})
    for call_id in results:
        content = draw(st.one_of(
            parts.text,
            st.lists(parts.inner_block, max_size=2),
            st.just(MEDIA_CONTENT[1:2]),
        ))
        result = {"type": "tool_result", "tool_use_id": call_id, "content": content}
        if draw(st.booleans()):
            result["is_error"] = draw(st.booleans())
        answer.append(result)
    conversation = [{"role": "user", "content": "read the file"},
                    {"role": "assistant", "content": assistant},
                    {"role": "user", "content": answer}]
    if draw(st.booleans()):
        conversation.append({"role": "assistant", "content": "done"})
        conversation.append({"role": "user", "content": "and now?"})
    return conversation


MESSAGES_FIELDS = [
    "model", "max_tokens", "messages", "system", "stream", "metadata", "stop_sequences",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "output_config",
    "context_management", "service_tier", "container", "mcp_servers",
]


@st.composite
def messages_bodies(draw) -> dict:
    """Half well-formed bodies (which reach an upstream unless the upstream refuses them),
    half odd ones, some fields of which are anything at all."""
    odd = draw(st.booleans())
    parts = ODD if odd else WELL_FORMED
    body = {
        "model": draw(st.sampled_from(MODELS)),
        "max_tokens": draw(st.one_of(st.integers(1, 8192), st.sampled_from([4096, 64000]))),
        "messages": draw(st.one_of(
            st.just([{"role": "user", "content": "hi"}]),
            st.just([{"role": "user", "content": MEDIA_CONTENT}]),
            tool_exchange(parts),
            st.lists(parts.message, min_size=1, max_size=4),
        )),
    }
    if draw(st.booleans()):
        body["stream"] = True
    for name, values in (("system", parts.system),
                         ("tools", st.lists(parts.tool, max_size=2)),
                         ("thinking", parts.thinking), ("tool_choice", parts.tool_choice),
                         ("output_config", parts.output_config),
                         ("stop_sequences", parts.stop_sequences)):
        if draw(st.integers(0, 3)) == 0:
            body[name] = draw(values)
    if draw(st.integers(0, 5)) == 0:
        body["metadata"] = {"user_id": draw(parts.user_id)}
    if draw(st.integers(0, 5)) == 0:
        number = st.one_of(NUMBERS, st.sampled_from(RAWS)) if odd else st.floats(0, 1)
        body[draw(st.sampled_from(["temperature", "top_p"]))] = draw(number)
    return draw(mutate(body, MESSAGES_FIELDS)) if odd else body


HEADERS = st.sampled_from([
    {},
    {"anthropic-version": "2023-06-01"},
    {"anthropic-version": "2023-06-01",
     "anthropic-beta": "interleaved-thinking-2025-05-14,context-management-2025-06-27"},
    {"anthropic-version": "2023-06-01", "x-app": "cli",
     "user-agent": "claude-cli/2.0.0 (external, cli)"},
])


# -- the answers --------------------------------------------------------------------------------


def check_message(message: dict, where: str) -> None:
    """A Message object as the anthropic SDKs read it."""
    assert message["type"] == "message" and message["role"] == "assistant", where
    assert isinstance(message["id"], str) and isinstance(message["model"], str), where
    assert isinstance(message["content"], list), where
    for block in message["content"]:
        assert isinstance(block, dict) and isinstance(block.get("type"), str), where
    usage = message["usage"]
    for name in ("input_tokens", "output_tokens"):
        assert isinstance(usage[name], int) and usage[name] >= 0, where


def check_stream(text: str, where: str) -> None:
    """Anthropic's event stream: ``message_start``, blocks opened, filled and closed one at a
    time in index order, ``message_delta``, ``message_stop``; or an ``error`` event last."""
    events = []
    for chunk in text.split("\n\n"):
        lines = [line for line in chunk.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), where
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name, where
        events.append((name, data))
    names = [name for name, _ in events]
    assert names and names[0] == "message_start", where
    check_message({**events[0][1]["message"], "usage": events[0][1]["message"]["usage"]}, where)
    if names[-1] == "error":
        check_anthropic_error(events[-1][1], where)
        events = events[:-1]
    else:
        assert names[-2:] == ["message_delta", "message_stop"], where
    open_index, count = None, 0
    for name, data in events[1:]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == count, where
            open_index, count = data["index"], count + 1
        elif name == "content_block_delta":
            assert data["index"] == open_index, where
        elif name == "content_block_stop":
            assert data["index"] == open_index, where
            open_index = None
        elif name == "message_delta":
            assert open_index is None, where
            assert isinstance(data["usage"]["output_tokens"], int), where
        else:
            assert name in ("ping", "message_stop"), where
    assert names.count("message_start") == 1, where


def send_messages(target: Target, path: str, body: dict, headers: dict) -> httpx2.Response:
    counting = path.endswith("count_tokens")
    response = target.send(
        "POST", path, content=encode(body), relayed=not counting,
        headers={"x-api-key": target.key, "content-type": "application/json", **headers},
    )
    if response.status_code == 200:
        where = f"{path} {body!r:.300}: {response.text[:300]!r}"
        if counting:
            assert isinstance(response.json()["input_tokens"], int), where
        elif response.headers["content-type"].startswith("text/event-stream"):
            check_stream(response.text, where)
        else:
            check_message(response.json(), where)
    return response


@_settings("messages")
@given(body=messages_bodies(), headers=HEADERS,
       path=st.sampled_from(["/v1/messages"] * 8 + ["/claude/v1/messages?beta=true",
                                                     "/v1/messages/count_tokens"]))
def test_fuzz_messages_bodies(target: Target, body: dict, headers: dict, path: str) -> None:
    send_messages(target, path, body, headers)


def test_zz_log_and_ledger_are_intact(target: Target) -> None:
    """Runs last: what the cases above left (:func:`tests.test_fuzz.check_log_and_ledger`)."""
    check_log_and_ledger(target)
