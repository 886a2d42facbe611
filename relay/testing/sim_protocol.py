"""Pure request interpretation and event building for the simulated upstream.

Kept free of I/O so the wire shapes can be reasoned about (and unit-tested) apart from the
server: :mod:`relay.testing.upstream` decides *when* bytes go out, this module decides *which*.

Four protocols ("kinds") share one :class:`Plan`: OpenAI ``chat`` and ``responses`` (built here),
Anthropic Messages (``anthropic``, wire shapes in :mod:`relay.testing.sim_anthropic`) and Gemini
(``gemini``, wire shapes in :mod:`relay.testing.sim_gemini`). How each kind's request is read
(directives, prompt size, output cap, tools, thinking) lives here, next to the others.

The central idea is the :class:`Plan`: everything a response will contain (reasoning deltas, text
deltas, tool-call argument deltas, truncation, token counts, ids) is fixed before the first byte is
written, so the streamed events, the non-stream body and the recorded usage can never disagree.
Usage is exact by construction: every delta is one token.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

TEXT_WORD = "tok"
"""Word used for each text delta (the first delta is ``tok``, later ones `` tok``)."""
REASONING_WORD = "think"
"""Word used for each reasoning delta."""
DEFAULT_TOOL_ARGS = '{"cmd": "echo hi"}'
"""Tool-call arguments when the directive names a tool but gives no ``args=``."""
BASE_MODELS = ("gpt-5.5", "deepseek-chat")
"""Models ``/v1/models`` always lists (request models are added as they are seen)."""
FAULTS = frozenset(
    {"429", "500", "503", "529", "401", "400", "drop", "reset", "stall", "slow_headers"}
    | {"huge_usage", "leak_secret", "retry_forever", "html", "malformed"}
)
"""``fault=`` values. ``503`` and ``529`` both mean "overloaded", answered in each protocol's own
way: OpenAI 503, Anthropic 529 ``overloaded_error``, Gemini 503 ``UNAVAILABLE``.

The hostile ones, a broken or malicious upstream a relay must not believe: ``huge_usage`` (a
normal answer whose usage claims :data:`HUGE_USAGE` input and output tokens), ``leak_secret`` (a
500 whose message quotes the request's credential, the host it was sent to and another key,
:data:`LEAKED_KEY`), ``retry_forever`` (a 429 with ``retry-after: 99999999``, about 3.2 years)
``html`` (a 502 HTML page with ``content-type: text/html``, as a proxy in front of an API
answers) and ``malformed`` (a 200 JSON answer or stream of the protocol's shape but for one
field of the wrong type: :func:`malformed_answer`)."""
HTTP_FAULTS = frozenset({"429", "500", "503", "529", "401", "400", "leak_secret", "retry_forever"})
"""Faults answered with an HTTP error in the protocol's own shape instead of a response (``html``
is answered with the same page in every protocol)."""
HUGE_USAGE = 10**15
"""The input and output tokens ``huge_usage`` claims."""
RETRY_FOREVER_S = 99_999_999
"""The ``retry-after`` of ``retry_forever``."""
LEAKED_KEY = "sk-proj-simLeaked0123456789abcdefXYZ"
"""A key-shaped secret ``leak_secret`` quotes besides the request's own credential."""
WIRE_FAULTS = frozenset({"huge_line", "gzip_bomb", "stale"})
"""``fault=`` values about the answer's bytes and the connection: :mod:`relay.testing.sim_wire`."""
KINDS = ("chat", "responses", "anthropic", "gemini")
SYSTEM_FINGERPRINT = "fp_sim"

# Token events and other events are distinguished so the server knows where to apply pacing.
TOKEN = True
META = False

# ASCII output: the C encoder's fastest path, and lone surrogates from a client cannot break it.
_dumps = json.JSONEncoder(separators=(",", ":")).encode

# `#sim` must be a word of its own (not `#simulate`); the pairs run to the end of the line.
_DIRECTIVE_RE = re.compile(r"#sim(?=[ \t]|$)([^\r\n]*)", re.MULTILINE)


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes (the form every body and SSE payload is written in)."""
    return _dumps(obj).encode("ascii")


# --------------------------------------------------------------------------------------------
# Directives


@dataclass(slots=True)
class Directives:
    """Per-request overrides parsed from ``#sim key=value …`` in the prompt (None = not given)."""

    ttft: float | None = None
    delay: float | None = None
    tokens: int | None = None
    reasoning: int | None = None
    cached: int | None = None
    cache_write: int | None = None
    tool: str | None = None
    args: str | None = None
    text: str | None = None
    fault: str | None = None
    slow_headers: float | None = None


def _non_negative_float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number >= 0 and number != float("inf") else None


def _non_negative_int(value: str) -> int | None:
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 0 else None


def _apply_directive(d: Directives, key: str, value: str) -> None:
    """Apply one ``key=value``; malformed values are ignored (a prompt is not a config file)."""
    if key in ("ttft", "delay"):
        setattr(d, key, _non_negative_float(value))
    elif key in ("tokens", "reasoning", "cached", "cache_write"):
        setattr(d, key, _non_negative_int(value))
    elif key in ("tool", "text"):
        if value:
            setattr(d, key, value)
    elif key == "args":
        try:
            json.loads(value)
        except ValueError:
            return
        d.args = value
    elif key == "slow_headers":
        seconds = _non_negative_float(value)
        if seconds is not None:
            d.fault, d.slow_headers = "slow_headers", seconds
    elif key == "fault":
        name, _, rest = value.lower().partition("=")
        if name == "slow_headers":
            _apply_directive(d, "slow_headers", rest or "0")
        elif name in FAULTS or name in WIRE_FAULTS:
            d.fault = name


def parse_directives(text: str) -> Directives:
    """Parse every ``#sim`` line of *text*; later pairs override earlier ones."""
    directives = Directives()
    if "#sim" not in text:
        return directives
    for match in _DIRECTIVE_RE.finditer(text):
        for pair in match.group(1).split():
            key, sep, value = pair.partition("=")
            if sep:
                _apply_directive(directives, key.lower(), value)
    return directives


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif (
                isinstance(part, dict)
                and part.get("type") in ("text", "input_text")
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
        return "\n".join(texts)
    return ""


def _has_text(content: Any) -> bool:
    """Whether an Anthropic message ``content`` holds text (a string or a ``text`` block)."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "text" for block in content
    )


def _gemini_text(content: Any) -> str | None:
    """The non-thought text parts of a Gemini user content joined, None if it has none."""
    if not isinstance(content, dict) or content.get("role", "user") != "user":
        return None
    parts = content.get("parts")
    if not isinstance(parts, list):
        return None
    texts = [
        part["text"]
        for part in parts
        if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought")
    ]
    return "\n".join(texts) if texts else None


def directive_text(kind: str, body: dict) -> str:
    """The text directives are read from.

    chat: the last user message; responses: the last user input; anthropic: the last user message
    that has text (a message holding only ``tool_result`` blocks is skipped, as chat skips
    ``tool`` messages); gemini: the text parts of the last user content that has any (so a
    content holding only ``functionResponse`` parts is skipped).
    """
    if kind == "anthropic":
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in reversed(messages):
                if (
                    isinstance(message, dict)
                    and message.get("role") == "user"
                    and _has_text(message.get("content"))
                ):
                    return _content_text(message.get("content"))
        return ""
    if kind == "gemini":
        contents = body.get("contents")
        if isinstance(contents, list):
            for content in reversed(contents):
                text = _gemini_text(content)
                if text is not None:
                    return text
        return ""
    if kind == "chat":
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    return _content_text(message.get("content"))
        return ""
    items = body.get("input")
    if isinstance(items, str):
        return items
    if isinstance(items, list):
        for item in reversed(items):
            if (
                isinstance(item, dict)
                and item.get("role") == "user"
                and item.get("type", "message") == "message"
            ):
                return _content_text(item.get("content"))
    return ""


def ends_with_tool_output(kind: str, body: dict) -> bool:
    """Whether the conversation's last item is a tool result.

    A ``tool=`` directive in the user prompt stays in every later request of the conversation;
    honouring it after the tool output came back would make an agent (Codex) loop forever, so the
    tool call is produced only for the turn that asks for it. (Mid-conversation ``system`` and
    ``developer`` messages after the results do not count; Claude Code sends them for Opus 4.8.)
    """
    if kind == "anthropic":
        messages = body.get("messages")
        turns = [
            m
            for m in (messages if isinstance(messages, list) else [])
            if not (isinstance(m, dict) and m.get("role") == "system")
        ]
        last = turns[-1] if turns else None
        content = last.get("content") if isinstance(last, dict) else None
        return isinstance(content, list) and any(
            isinstance(block, dict) and block.get("type") == "tool_result" for block in content
        )
    if kind == "gemini":
        contents = body.get("contents")
        last = contents[-1] if isinstance(contents, list) and contents else None
        parts = last.get("parts") if isinstance(last, dict) else None
        return isinstance(parts, list) and any(
            isinstance(part, dict) and "functionResponse" in part for part in parts
        )
    if kind == "chat":
        messages = body.get("messages")
        turns = [m for m in messages if not _instruction(m)] if isinstance(messages, list) else []
        last = turns[-1] if turns else None
        return isinstance(last, dict) and last.get("role") in ("tool", "function")
    items = body.get("input")
    turns = [item for item in items if not _instruction(item)] if isinstance(items, list) else []
    last = turns[-1] if turns else None
    return isinstance(last, dict) and str(last.get("type", "")).endswith("_output")


def _instruction(item: Any) -> bool:
    """A system or developer message (what a Messages client's mid-conversation ``system``
    message becomes upstream): it does not end a turn."""
    return isinstance(item, dict) and item.get("role") in ("system", "developer")


def estimate_input_tokens(kind: str, body: dict) -> int:
    """Deterministic prompt-size estimate, reproducible by tests in other processes.

    ``max(1, len(json.dumps(X)) // 4)`` with ``json.dumps`` default arguments, where X is
    ``messages`` for chat, ``[input, instructions]`` for responses, ``[messages, system]`` for
    anthropic and ``[contents, systemInstruction]`` for gemini (tools are not counted).
    """
    if kind == "chat":
        basis = body.get("messages")
    elif kind == "anthropic":
        basis = [body.get("messages"), body.get("system")]
    elif kind == "gemini":
        basis = [body.get("contents"), body.get("systemInstruction")]
    else:
        basis = [body.get("input"), body.get("instructions")]
    return max(1, len(json.dumps(basis)) // 4)


def thinking_requested(kind: str, body: dict) -> bool:
    """Whether an Anthropic/Gemini request asks to see the model's thinking.

    anthropic: ``thinking.type`` is ``enabled`` (or ``adaptive``); gemini:
    ``generationConfig.thinkingConfig.includeThoughts`` is true. (OpenAI kinds: always.)
    """
    if kind == "anthropic":
        thinking = body.get("thinking")
        return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    if kind == "gemini":
        config = body.get("generationConfig")
        thinking = config.get("thinkingConfig") if isinstance(config, dict) else None
        return isinstance(thinking, dict) and thinking.get("includeThoughts") is True
    return True


def _has_tools(kind: str, body: dict) -> bool:
    tools = body.get("tools")
    if kind == "gemini":
        return isinstance(tools, list) and any(
            isinstance(tool, dict) and tool.get("functionDeclarations") for tool in tools
        )
    return bool(tools)


def output_cap(kind: str, body: dict) -> Any:
    """The request's output-token limit as sent (validated by the caller)."""
    if kind == "chat":
        cap = body.get("max_completion_tokens")
        return body.get("max_tokens") if cap is None else cap
    if kind == "anthropic":
        return body.get("max_tokens")
    if kind == "gemini":
        config = body.get("generationConfig")
        return config.get("maxOutputTokens") if isinstance(config, dict) else None
    return body.get("max_output_tokens")


def _object_args(arguments: str | None) -> str:
    """Tool arguments for protocols whose tool input is an object (Anthropic, Gemini)."""
    if arguments is not None and isinstance(json.loads(arguments), dict):
        return arguments
    return DEFAULT_TOOL_ARGS


def split_arguments(arguments: str) -> list[str]:
    """Split tool arguments into at least 3 pieces (fewer only if the text is shorter)."""
    if not arguments:
        return [""]
    pieces = min(max(3, -(-len(arguments) // 8)), len(arguments))
    size, extra = divmod(len(arguments), pieces)
    out, pos = [], 0
    for i in range(pieces):
        end = pos + size + (1 if i < extra else 0)
        out.append(arguments[pos:end])
        pos = end
    return out


def _words(word: str, count: int) -> list[str]:
    return [word if i == 0 else " " + word for i in range(count)]


# --------------------------------------------------------------------------------------------
# Plan


@dataclass(slots=True)
class Plan:
    """Everything one response will contain, fixed before the first byte is sent."""

    kind: str  # "chat" | "responses" | "anthropic" | "gemini"
    body: dict
    model: str
    stream: bool
    ttft_s: float
    delay_s: float
    reasoning: list[str]
    text: list[str]
    tool_name: str | None
    tool_args: list[str]
    truncated: bool
    input_tokens: int
    cached_tokens: int
    include_usage: bool
    cache_write_tokens: int = 0  # anthropic only: prompt tokens written to the cache
    uid: str = field(default_factory=lambda: f"{random.getrandbits(96):024x}")
    created: int = field(default_factory=lambda: int(time.time()))
    sse: bool = True  # gemini only: False streams a JSON array (no ``alt=sse``)
    claimed: int | None = None  # huge_usage: the input and output tokens the usage claims
    compaction: str | None = None  # responses only: "v1" or "v2" (see sim_compaction)

    # One random part per response keeps ids unique without drawing five random numbers.
    @property
    def id(self) -> str:
        return _ID_PREFIX.get(self.kind, "") + self.uid

    @property
    def call_id(self) -> str:
        return "call_" + self.uid

    @property
    def rs_id(self) -> str:
        return "rs_" + self.uid

    @property
    def msg_id(self) -> str:
        return "msg_" + self.uid

    @property
    def fc_id(self) -> str:
        return "fc_" + self.uid

    @property
    def output_tokens(self) -> int:
        return len(self.reasoning) + len(self.text) + len(self.tool_args)

    @property
    def reported_input(self) -> int:
        """The input tokens the usage on the wire says (the claim of ``huge_usage``)."""
        return self.input_tokens if self.claimed is None else self.claimed

    @property
    def reported_output(self) -> int:
        """The output tokens the usage on the wire says (the claim of ``huge_usage``)."""
        return self.output_tokens if self.claimed is None else self.claimed

    @property
    def has_tool_call(self) -> bool:
        return self.tool_name is not None

    def usage(self) -> dict:
        """Protocol-neutral usage, as recorded on the RequestRecord (what the wire said)."""
        return {
            "input_tokens": self.reported_input,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "output_tokens": self.reported_output,
            "reasoning_tokens": len(self.reasoning),
            "total_tokens": self.reported_input + self.reported_output,
        }


_ID_PREFIX = {"chat": "chatcmpl-", "responses": "resp_", "anthropic": "msg_"}


def build_plan(
    kind: str,
    body: dict,
    directives: Directives,
    *,
    ttft_s: float,
    delay_s: float,
    output_tokens: int,
    reasoning_tokens: int,
    model: str | None = None,
    stream: bool | None = None,
    sse: bool = True,
) -> Plan:
    """Resolve directives over the profile values and apply the request's output-token cap.

    *model* and *stream* override the body's ``model``/``stream`` (Gemini carries both in the
    URL). Reasoning: the OpenAI kinds use the profile's ``reasoning_tokens`` for every request;
    anthropic and gemini use it only when the request asks to see thinking
    (:func:`thinking_requested`), while an explicit ``reasoning=N`` directive always applies.
    Tool calls: one per response; Anthropic streams the input JSON in pieces (one token each),
    Gemini sends the whole call as one part (one token).
    """
    text_count = directives.tokens if directives.tokens is not None else output_tokens
    if directives.reasoning is not None:
        reasoning_count = directives.reasoning
    elif thinking_requested(kind, body):
        reasoning_count = reasoning_tokens
    else:
        reasoning_count = 0
    reasoning = _words(REASONING_WORD, max(0, reasoning_count))
    text = _words(directives.text or TEXT_WORD, max(0, text_count))
    tool_name = None
    tool_args: list[str] = []
    if directives.tool and _has_tools(kind, body) and not ends_with_tool_output(kind, body):
        tool_name = directives.tool
        if kind == "gemini":
            tool_args = [_object_args(directives.args)]
        elif kind == "anthropic":
            tool_args = split_arguments(_object_args(directives.args))
        else:
            tool_args = split_arguments(directives.args or DEFAULT_TOOL_ARGS)

    cap = output_cap(kind, body)
    truncated = False
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
        budget = cap
        # Reasoning comes first on the wire, then text, then the tool call: cut in that order.
        for pieces in (reasoning, text, tool_args):
            if len(pieces) > budget:
                truncated = True
                del pieces[budget:]
            budget -= len(pieces)
        if tool_name is not None and not tool_args:
            tool_name = None  # the budget ran out before the call started

    input_tokens = estimate_input_tokens(kind, body)
    cached = min(directives.cached or 0, input_tokens)
    # Only Anthropic reports cache writes; they come out of the same prompt as the reads.
    cache_write = min(directives.cache_write or 0, input_tokens - cached)
    if kind != "anthropic":
        cache_write = 0
    stream_options = body.get("stream_options")
    include_usage = bool(
        kind == "chat" and isinstance(stream_options, dict) and stream_options.get("include_usage")
    )
    return Plan(
        kind=kind,
        body=body,
        model=str(body.get("model") or "") if model is None else model,
        stream=bool(body.get("stream")) if stream is None else stream,
        ttft_s=directives.ttft if directives.ttft is not None else ttft_s,
        delay_s=directives.delay if directives.delay is not None else delay_s,
        reasoning=reasoning,
        text=text,
        tool_name=tool_name,
        tool_args=tool_args,
        truncated=truncated,
        input_tokens=input_tokens,
        cached_tokens=cached,
        include_usage=include_usage,
        cache_write_tokens=cache_write,
        sse=sse,
    )


# --------------------------------------------------------------------------------------------
# Errors


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's error JSON (§3.4)."""
    return dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def leak_message(credential: str, host: str) -> str:
    """The ``leak_secret`` message: what a misconfigured gateway in front of an API says."""
    token = credential.split()[-1] if credential.split() else credential
    return (
        f"Upstream request to http://{host}/v1 failed: backend {host} rejected "
        f"'Authorization: {credential}' (key {token}, fallback key {LEAKED_KEY})."
    )


def malformed_answer(kind: str, stream: bool) -> bytes:
    """The ``malformed`` fault's answer: a body or stream of ``kind``'s shape whose one field
    has a type the protocol never gives it (a broken upstream or a proxy rewriting answers)."""
    sse_end = b"\r\n\r\n" if kind == "gemini" else b"\n\n"
    if kind == "chat":
        body = {"id": "chatcmpl-bad", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "tok", "tool_calls": [None]},
             "finish_reason": "stop"}]}
        events = [(None, {"id": "chatcmpl-bad", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": "tok"}, "finish_reason": ["stop"]}]})]
    elif kind == "responses":
        body = {"id": "resp_bad", "object": "response", "status": "completed",
                "output": [{"type": "message", "role": "assistant", "content": -1}]}
        events = [("response.reasoning_summary_part.added",
                   {"type": "response.reasoning_summary_part.added", "output_index": 0,
                    "summary_index": None})]
    elif kind == "anthropic":
        body = {"id": "msg_bad", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": {"tok": 1}}], "stop_reason": "end_turn"}
        events = [("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": ["end_turn"]},
                                     "usage": {"output_tokens": 1}})]
    else:
        body = {"candidates": [{"content": ["tok"]}]}
        events = [(None, {"candidates": {"0": {"content": {"parts": [{"text": "tok"}]}}}})]
    if not stream:
        return dumps(body)
    return b"".join(
        (f"event: {name}\n".encode() if name else b"") + b"data: " + dumps(data) + sse_end
        for name, data in events
    )


def html_page(host: str) -> bytes:
    """The ``html`` fault's body: a proxy's 502 page, naming the host as proxies do."""
    return (
        "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        f"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx at {host}</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def fault_response(
    fault: str, model: str, credential: str = "", host: str = ""
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, extra headers and body for the HTTP-error faults (429/500/503/529/401/400, and
    ``leak_secret`` / ``retry_forever``, which quote ``credential`` and ``host``)."""
    if fault == "retry_forever":
        headers = [("retry-after", str(RETRY_FOREVER_S)), ("x-ratelimit-reset-requests", "9999h")]
        message = f"Rate limit reached. Please try again in {RETRY_FOREVER_S}s."
        return 429, headers, error_body(message, "requests", "rate_limit_exceeded")
    if fault == "leak_secret":
        message = leak_message(credential, host)
        return 500, [], error_body(message, "server_error", "upstream_gateway_error")
    if fault == "429":
        message = (
            f"Rate limit reached for {model or 'the model'} in organization org-sim on requests "
            "per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 2s. Visit "
            "https://platform.openai.com/account/rate-limits to learn more."
        )
        headers = [
            ("retry-after", "2"),
            ("retry-after-ms", "2000"),
            ("x-ratelimit-limit-requests", "3"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "2s"),
        ]
        return 429, headers, error_body(message, "requests", "rate_limit_exceeded")
    if fault == "401":
        return 401, [], invalid_api_key_body()
    if fault == "400":
        return 400, [], error_body("Invalid request (simulated fault).", "invalid_request_error")
    if fault in ("503", "529"):
        message = "The engine is currently overloaded, please try again later."
        return 503, [], error_body(message, "server_error", "service_unavailable")
    return (
        500,
        [],
        error_body(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
        ),
    )


def invalid_api_key_body() -> bytes:
    return error_body(
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        "invalid_api_key",
    )


# --------------------------------------------------------------------------------------------
# Chat Completions


def chat_usage(plan: Plan) -> dict:
    return {
        "prompt_tokens": plan.reported_input,
        "completion_tokens": plan.reported_output,
        "total_tokens": plan.reported_input + plan.reported_output,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": len(plan.reasoning),
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_finish_reason(plan: Plan) -> str:
    if plan.truncated:
        return "length"
    return "tool_calls" if plan.has_tool_call else "stop"


def chat_completion(plan: Plan) -> dict:
    """The non-stream ``chat.completion`` object (§3.2)."""
    text = "".join(plan.text)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not plan.has_tool_call else None,
        "refusal": None,
        "annotations": [],
    }
    if plan.reasoning:
        message["reasoning_content"] = "".join(plan.reasoning)
    if plan.has_tool_call:
        message["tool_calls"] = [
            {
                "id": plan.call_id,
                "type": "function",
                "function": {"name": plan.tool_name, "arguments": "".join(plan.tool_args)},
            }
        ]
    return {
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": chat_finish_reason(plan),
            }
        ],
        "usage": chat_usage(plan),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chat_stream(plan: Plan) -> Iterator[tuple[bytes, bool]]:
    """``(sse_bytes, is_token)`` for each chunk of a chat stream, ending with ``[DONE]`` (§3.3)."""
    head = (
        b'{"id":'
        + dumps(plan.id)
        + b',"object":"chat.completion.chunk","created":'
        + str(plan.created).encode()
        + b',"model":'
        + dumps(plan.model)
        + b',"system_fingerprint":"'
        + SYSTEM_FINGERPRINT.encode()
        + b'","choices":['
    )
    tail = b'],"usage":null}\n\n' if plan.include_usage else b"]}\n\n"

    def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + head + dumps(choice) + tail

    yield chunk({"role": "assistant", "content": ""}), META
    for piece in plan.reasoning:
        yield chunk({"reasoning_content": piece}), TOKEN
    for piece in plan.text:
        yield chunk({"content": piece}), TOKEN
    if plan.has_tool_call:
        header = {
            "index": 0,
            "id": plan.call_id,
            "type": "function",
            "function": {"name": plan.tool_name, "arguments": ""},
        }
        yield chunk({"tool_calls": [header]}), META
        for piece in plan.tool_args:
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}), TOKEN
    yield chunk({}, chat_finish_reason(plan)), META
    if plan.include_usage:
        yield b"data: " + head + b'],"usage":' + dumps(chat_usage(plan)) + b"}\n\n", META
    yield b"data: [DONE]\n\n", META


# --------------------------------------------------------------------------------------------
# Responses


def responses_usage(plan: Plan) -> dict:
    return {
        "input_tokens": plan.reported_input,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens},
        "output_tokens": plan.reported_output,
        "output_tokens_details": {"reasoning_tokens": len(plan.reasoning)},
        "total_tokens": plan.reported_input + plan.reported_output,
    }


def _final_status(plan: Plan) -> str:
    return "incomplete" if plan.truncated else "completed"


def _reasoning_item(plan: Plan) -> dict:
    return {
        "id": plan.rs_id,
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "".join(plan.reasoning)}],
        "encrypted_content": "gAAAAB" + plan.rs_id.removeprefix("rs_") + "=sim",
    }


def _message_item(plan: Plan, status: str) -> dict:
    return {
        "id": plan.msg_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [_text_part("".join(plan.text))],
    }


def _function_call_item(plan: Plan, status: str) -> dict:
    return {
        "id": plan.fc_id,
        "type": "function_call",
        "status": status,
        "call_id": plan.call_id,
        "name": plan.tool_name,
        "arguments": "".join(plan.tool_args),
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_output(plan: Plan) -> list[dict]:
    """Final output items, in output_index order (reasoning, message, function call)."""
    status = _final_status(plan)
    items = []
    if plan.reasoning:
        items.append(_reasoning_item(plan))
    if plan.text:
        items.append(_message_item(plan, status))
    if plan.has_tool_call:
        items.append(_function_call_item(plan, status))
    return items


_RESPONSE_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("instructions", None),
    ("max_output_tokens", None),
    ("max_tool_calls", None),
    ("parallel_tool_calls", True),
    ("previous_response_id", None),
    ("prompt_cache_key", None),
    ("prompt_cache_retention", None),
    ("reasoning", {"effort": None, "summary": None}),
    ("safety_identifier", None),
    ("service_tier", "default"),
    ("store", True),
    ("temperature", 1.0),
    ("text", {"format": {"type": "text"}, "verbosity": "medium"}),
    ("tool_choice", "auto"),
    ("tools", []),
    ("top_logprobs", 0),
    ("top_p", 1.0),
    ("truncation", "disabled"),
    ("user", None),
    ("metadata", {}),
)


def response_object(plan: Plan, status: str, output: list[dict], usage: dict | None) -> dict:
    """The Response object (§1.6), echoing the request's settings as OpenAI does."""
    body = plan.body
    obj: dict[str, Any] = {
        "id": plan.id,
        "object": "response",
        "created_at": plan.created,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": plan.model,
        "output": output,
    }
    for key, default in _RESPONSE_DEFAULTS:
        value = body.get(key, default)
        obj[key] = default if value is None and default is not None else value
    if "reasoning" in body and body["reasoning"] is None:
        obj["reasoning"] = None  # Codex sends an explicit null for non-reasoning models
    obj["usage"] = usage
    return obj


def final_response(plan: Plan) -> dict:
    """The finished Response object: the non-stream body and the ``response.completed`` payload."""
    return response_object(plan, _final_status(plan), response_output(plan), responses_usage(plan))


def responses_stream(plan: Plan) -> Iterator[tuple[bytes, bool]]:
    """``(sse_bytes, is_token)`` for each event of a Responses stream, in §1.4/§1.5 order."""
    seq = 0

    def event(type_: str, fields: dict) -> bytes:
        nonlocal seq
        payload = {"type": type_, "sequence_number": seq}
        payload.update(fields)
        seq += 1
        return b"event: " + type_.encode() + b"\ndata: " + dumps(payload) + b"\n\n"

    status = _final_status(plan)
    in_progress = response_object(plan, "in_progress", [], None)
    yield event("response.created", {"response": in_progress}), META
    yield event("response.in_progress", {"response": in_progress}), META
    index = 0

    if plan.reasoning:
        rid = plan.rs_id
        text = "".join(plan.reasoning)
        where = {"item_id": rid, "output_index": index, "summary_index": 0}
        added = {"id": rid, "type": "reasoning", "summary": [], "encrypted_content": None}
        yield event("response.output_item.added", {"output_index": index, "item": added}), META
        yield (
            event(
                "response.reasoning_summary_part.added",
                {**where, "part": {"type": "summary_text", "text": ""}},
            ),
            META,
        )
        for piece in plan.reasoning:
            yield event("response.reasoning_summary_text.delta", {**where, "delta": piece}), TOKEN
        yield event("response.reasoning_summary_text.done", {**where, "text": text}), META
        yield (
            event(
                "response.reasoning_summary_part.done",
                {**where, "part": {"type": "summary_text", "text": text}},
            ),
            META,
        )
        yield (
            event(
                "response.output_item.done", {"output_index": index, "item": _reasoning_item(plan)}
            ),
            META,
        )
        index += 1

    if plan.text:
        mid = plan.msg_id
        text = "".join(plan.text)
        where = {"item_id": mid, "output_index": index, "content_index": 0}
        added = {
            "id": mid,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        yield event("response.output_item.added", {"output_index": index, "item": added}), META
        yield event("response.content_part.added", {**where, "part": _text_part("")}), META
        for piece in plan.text:
            yield (
                event("response.output_text.delta", {**where, "delta": piece, "logprobs": []}),
                TOKEN,
            )
        yield event("response.output_text.done", {**where, "text": text, "logprobs": []}), META
        yield event("response.content_part.done", {**where, "part": _text_part(text)}), META
        yield (
            event(
                "response.output_item.done",
                {"output_index": index, "item": _message_item(plan, status)},
            ),
            META,
        )
        index += 1

    if plan.has_tool_call:
        where = {"item_id": plan.fc_id, "output_index": index}
        added = {**_function_call_item(plan, "in_progress"), "arguments": ""}
        yield event("response.output_item.added", {"output_index": index, "item": added}), META
        for piece in plan.tool_args:
            yield event("response.function_call_arguments.delta", {**where, "delta": piece}), TOKEN
        yield (
            event(
                "response.function_call_arguments.done",
                {**where, "name": plan.tool_name, "arguments": "".join(plan.tool_args)},
            ),
            META,
        )
        yield (
            event(
                "response.output_item.done",
                {"output_index": index, "item": _function_call_item(plan, status)},
            ),
            META,
        )

    yield event(f"response.{status}", {"response": final_response(plan)}), META


def stream_events(plan: Plan) -> Iterator[tuple[bytes, bool]]:
    """The SSE events of *plan*'s stream, whichever protocol it speaks."""
    if plan.compaction:
        from relay.testing import sim_compaction

        return sim_compaction.stream(plan)
    if plan.kind == "anthropic":
        from relay.testing import sim_anthropic

        return sim_anthropic.stream_events(plan)
    if plan.kind == "gemini":
        from relay.testing import sim_gemini

        return sim_gemini.stream_events(plan)
    return chat_stream(plan) if plan.kind == "chat" else responses_stream(plan)


def nonstream_body(plan: Plan) -> dict:
    """The non-stream body of *plan*, whichever protocol it speaks."""
    if plan.compaction:
        from relay.testing import sim_compaction

        return sim_compaction.nonstream_body(plan)
    if plan.kind == "anthropic":
        from relay.testing import sim_anthropic

        return sim_anthropic.message(plan)
    if plan.kind == "gemini":
        from relay.testing import sim_gemini

        return sim_gemini.response(plan)
    return chat_completion(plan) if plan.kind == "chat" else final_response(plan)


def stream_content_type(plan: Plan) -> str:
    """Content type of *plan*'s stream (Gemini without ``alt=sse`` streams a JSON array)."""
    if plan.kind == "gemini" and not plan.sse:
        return "application/json; charset=UTF-8"
    return "text/event-stream; charset=utf-8"


def models_list(models: list[str]) -> dict:
    """OpenAI's ``/v1/models`` list shape (§6)."""
    return {"object": "list", "data": [model_object(m) for m in models]}


def model_object(model: str) -> dict:
    owner = "deepseek" if model.startswith("deepseek") else "openai"
    return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": owner}
