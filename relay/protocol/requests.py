"""Validate and normalise a client's request body, without I/O.

The relay checks only what it needs to route, admit and bill a request, plus the fields whose
wrong type would otherwise come back from the upstream as a confusing error: everything else is
passed through untouched, so new OpenAI fields keep working without a relay release.

A :class:`ClientRequest` is what the rest of the relay sees: the endpoint, the model the client
asked for, whether it streams, its session key and a token estimate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..errors import InvalidRequest

#: Headers that carry a conversation id, in the spellings the Codex CLI has used
#: (protocols.md §2.4)..
SESSION_HEADERS = (
    "session-id",
    "session_id",
    "conversation_id",
    "thread-id",
    "thread_id",
    "x-claude-code-session-id",
)

#: Output tokens assumed for the estimate when the client sets no cap. Chosen near the median
#: answer length of coding assistants; the reservation is corrected to the real usage afterwards.
DEFAULT_EXPECTED_OUTPUT = 1024

#: Characters per token for the input estimate: the usual figure for English and code with
#: OpenAI's tokenizers. JSON punctuation makes real requests a little denser, which errs on the
#: side of reserving slightly more than is used.
CHARS_PER_TOKEN = 4


class Endpoint(Enum):
    """The client protocol, named by its path."""

    CHAT = "chat/completions"
    RESPONSES = "responses"
    MESSAGES = "messages"

    @property
    def upstream_kind(self) -> str:
        """The account provider kind that speaks this protocol natively."""
        return _NATIVE_KINDS[self]


_NATIVE_KINDS = {
    Endpoint.CHAT: "openai-chat",
    Endpoint.RESPONSES: "openai-responses",
    Endpoint.MESSAGES: "anthropic",
}


@dataclass
class ClientRequest:
    """A validated request body and what the relay derived from it."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool = False
    session_key: str | None = None
    max_output_tokens: int | None = None
    input_chars: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: A Responses request that compacts its conversation: ``"v1"`` (``responses/compact``)
    #: or ``"v2"`` (input ending with a ``compaction_trigger``); see :mod:`.compaction`.
    compaction: str | None = None

    @property
    def estimated_input_tokens(self) -> int:
        return max(1, self.input_chars // CHARS_PER_TOKEN)

    @property
    def estimated_tokens(self) -> int:
        """Input estimate plus expected output, capped by the client's own output cap."""
        expected = self.max_output_tokens or DEFAULT_EXPECTED_OUTPUT
        return self.estimated_input_tokens + expected


def decode_json_body(raw: bytes) -> dict[str, Any]:
    """Parse the body as one JSON object, or raise a 400 that says what is wrong."""
    if not raw.strip():
        raise InvalidRequest(
            "The request body is empty. Send a JSON object, for example "
            '{"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}.'
        )
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc.msg} at line {exc.lineno} "
            f"column {exc.colno}). The OpenAI API expects a JSON payload."
        ) from None
    except RecursionError:
        raise InvalidRequest(TOO_DEEP) from None
    except ValueError:  # Python's int limit: a number of more than 4,300 digits
        raise InvalidRequest(
            "We could not parse the JSON body of your request (a number in it has more than "
            "4,300 digits). The OpenAI API expects a JSON payload."
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, not {_json_type(value)}."
        )
    return value


#: The message for JSON nested deeper than the relay can take (Python's recursion limit, about
#: 1,000 levels, when parsing, less when the body is written for the upstream).
TOO_DEEP = (
    "The JSON body of your request is nested too deeply to be processed. The OpenAI API "
    "expects a JSON payload of reasonable depth."
)


def _no_constant(name: str) -> Any:
    """json accepts ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON (RFC 8259)
    and could not be sent upstream."""
    raise InvalidRequest(
        f"We could not parse the JSON body of your request ({name} is not a JSON value). "
        "The OpenAI API expects a JSON payload."
    )


def unsendable_body(body: Any, error: Exception) -> InvalidRequest:
    """The 400 for a parsed body that cannot be written as JSON for the upstream (``error`` is
    what ``json.dumps`` raised): the first value that is not valid Unicode or not a finite
    number, by its path; too deep a body as such. Walks the body, so only for the error path."""
    if isinstance(error, RecursionError):
        return InvalidRequest(TOO_DEEP)
    path = _first_unsendable(body, "")
    if path is None:
        return InvalidRequest(f"The request body cannot be sent upstream ({error}).")
    where, what = path
    return InvalidRequest(f"'{where or 'body'}' {what}.", param=where or None)


def _first_unsendable(value: Any, where: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            return where, (
                f"is not valid Unicode: it holds the lone surrogate "
                f"\\u{ord(value[exc.start]):04x}"
            )
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, f"is out of range ({value})")
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(name, str) and _first_unsendable(name, "") is not None:
                return where, f"has a key that is not valid Unicode ({name!r})"
            found = _first_unsendable(item, f"{where}.{name}" if where else str(name))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_unsendable(item, f"{where}[{index}]")
            if found:
                return found
    return None


def parse_request(
    endpoint: Endpoint, body: dict[str, Any], headers: Mapping[str, str]
) -> ClientRequest:
    """Validate ``body`` for ``endpoint`` and derive the fields the relay routes on."""
    model = _require(body, "model", str)
    if not model.strip():
        raise InvalidRequest("'model' must not be empty.", param="model")
    check_unicode(model, "model")  # it is stored with the usage record, and no model has one
    stream = _optional(body, "stream", bool) or False
    if endpoint is Endpoint.CHAT:
        request = _parse_chat(body, model, stream)
    elif endpoint is Endpoint.MESSAGES:
        request = _parse_messages(body, model, stream)
    else:
        request = _parse_responses(body, model, stream)
    request.session_key = session_key(body, headers)
    return request


def check_unicode(text: str, param: str) -> None:
    """400 naming ``param`` if ``text`` holds a lone UTF-16 surrogate (a JSON escape such as
    ``"\\ud800"`` without its pair decodes to one): it has no UTF-8 encoding, so it can be
    neither sent upstream nor stored."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"'{param}' is not valid Unicode: it holds the lone surrogate "
            f"\\u{ord(text[exc.start]):04x} (a \\ud800-\\udbff escape must be followed by its "
            "\\udc00-\\udfff pair).",
            param=param,
        ) from None


def session_key(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The conversation id used for account stickiness, from the body or the headers.

    ``session_id`` in the body is an alias of ``prompt_cache_key`` (seed documents 001/002).
    Claude Code names its session in ``X-Claude-Code-Session-Id`` and in the Messages body's
    ``metadata.user_id`` (``user_…_account_…_session_<uuid>``, or a JSON object with a
    ``session_id``).
    """
    for name in ("prompt_cache_key", "session_id"):
        value = body.get(name)
        if isinstance(value, str) and value:
            return value
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return value
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return _claude_code_session(user) if isinstance(user, str) else None


_SESSION_IN_USER_ID = re.compile(r"_session_([0-9A-Za-z-]{8,})$")


def _claude_code_session(user_id: str) -> str | None:
    match = _SESSION_IN_USER_ID.search(user_id)
    if match:
        return match.group(1)
    if user_id.startswith("{"):
        try:
            value = json.loads(user_id)
        except ValueError:
            return None
        session = value.get("session_id") if isinstance(value, dict) else None
        return session if isinstance(session, str) and session else None
    return None


def _parse_chat(body: dict[str, Any], model: str, stream: bool) -> ClientRequest:
    messages = _require(body, "messages", list)
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(
                f"'{where}' must be an object, not {_json_type(message)}.", param=where
            )
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"'{where}.role' is required and must be a string.", param=where)
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"'{where}.content' must be a string or an array of content parts, "
                f"not {_json_type(content)}.",
                param=f"{where}.content",
            )
        if isinstance(content, list):
            _check_parts(content, f"{where}.content")
        calls = _shape(message.get("tool_calls"), list, f"{where}.tool_calls")
        for k, call in enumerate(calls or ()):
            call = _object(call, f"{where}.tool_calls[{k}]")
            _shape(call.get("function"), dict, f"{where}.tool_calls[{k}].function")
        _shape(message.get("function_call"), dict, f"{where}.function_call")
    stream_options = _optional(body, "stream_options", dict)
    if stream_options is not None and not stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    include_usage = bool(stream_options and stream_options.get("include_usage") is True)
    _check_common(body, ("tools", "functions"))
    stop = _shape(body.get("stop"), (str, list), "stop")
    if isinstance(stop, list):
        for index, item in enumerate(stop):
            _shape(item, str, f"stop[{index}]")
    for index, tool in enumerate(body.get("tools") or ()):
        tool = _object(tool, f"tools[{index}]")
        _shape(tool.get("type"), str, f"tools[{index}].type")
        function = _shape(tool.get("function"), dict, f"tools[{index}].function")
        if function is not None:
            _shape(function.get("parameters"), dict, f"tools[{index}].function.parameters")
    for index, function in enumerate(body.get("functions") or ()):
        function = _object(function, f"functions[{index}]")
        _shape(function.get("parameters"), dict, f"functions[{index}].parameters")
    _shape(body.get("function_call"), (str, dict), "function_call")
    _shape(body.get("response_format"), dict, "response_format")
    max_output = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    return ClientRequest(
        endpoint=Endpoint.CHAT,
        body=body,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_output_tokens=max_output,
        input_chars=_text_size(messages) + _text_size(body.get("tools")),
    )


def _parse_responses(body: dict[str, Any], model: str, stream: bool) -> ClientRequest:
    if "input" not in body and "previous_response_id" not in body and "prompt" not in body:
        raise InvalidRequest("'input' is required.", param="input")
    value = body.get("input")
    if value is not None and not isinstance(value, str | list):
        raise InvalidRequest(
            f"'input' must be a string or an array of input items, not {_json_type(value)}.",
            param="input",
        )
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise InvalidRequest(
                    f"'input[{index}]' must be an object, not {_json_type(item)}.",
                    param=f"input[{index}]",
                )
            _check_item(item, f"input[{index}]")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str | list):
        raise InvalidRequest("'instructions' must be a string.", param="instructions")
    if isinstance(instructions, list):
        for index, item in enumerate(instructions):
            _check_item(_object(item, f"instructions[{index}]"), f"instructions[{index}]")
    _optional(body, "stream_options", dict)
    _check_common(body, ("tools", "include"))
    _check_responses_tools(body.get("tools"), "tools")
    choice = _shape(body.get("tool_choice"), (str, dict), "tool_choice")
    if isinstance(choice, dict):
        for name in ("type", "name", "mode"):
            _shape(choice.get(name), str, f"tool_choice.{name}")
    for name in ("reasoning", "text"):
        _optional(body, name, dict)
    for name in ("previous_response_id", "prompt_cache_key", "user", "safety_identifier"):
        _optional(body, name, str)
    return ClientRequest(
        endpoint=Endpoint.RESPONSES,
        body=body,
        model=model,
        stream=stream,
        max_output_tokens=_positive_int(body, "max_output_tokens"),
        input_chars=_text_size(value) + _text_size(instructions) + _text_size(body.get("tools")),
    )


#: Roles a Messages body may hold; ``system`` mid-conversation is Claude Code's (the API takes it).
_MESSAGES_ROLES = ("user", "assistant", "system")


def _parse_messages(body: dict[str, Any], model: str, stream: bool) -> ClientRequest:
    """A Messages body, checked as Anthropic checks it where a wrong shape would otherwise
    reach the upstream: ``max_tokens`` is required, as Anthropic requires it."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise InvalidRequest(
            "'max_tokens' is required: the Messages API needs the most tokens the answer may "
            "use, for example \"max_tokens\": 1024.",
            param="max_tokens",
        )
    max_tokens = _positive_int(body, "max_tokens")
    messages = _require(body, "messages", list)
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        message = _object(message, where)
        role = message.get("role")
        if role not in _MESSAGES_ROLES:
            raise InvalidRequest(
                f"'{where}.role' must be \"user\" or \"assistant\", not {json.dumps(role)}.",
                param=f"{where}.role",
            )
        content = message.get("content")
        if not isinstance(content, str | list):
            raise InvalidRequest(
                f"'{where}.content' must be a string or an array of content blocks, "
                f"not {_json_type(content)}.",
                param=f"{where}.content",
            )
        for k, block in enumerate(content if isinstance(content, list) else ()):
            block = _object(block, f"{where}.content[{k}]")
            _require_in(block, "type", str, f"{where}.content[{k}]")
            if block["type"] == "tool_use":
                _require_in(block, "id", str, f"{where}.content[{k}]")
                _require_in(block, "name", str, f"{where}.content[{k}]")
            elif block["type"] == "tool_result":
                _require_in(block, "tool_use_id", str, f"{where}.content[{k}]")
                _shape(block.get("content"), (str, list), f"{where}.content[{k}].content")
    system = _shape(body.get("system"), (str, list), "system")
    for index, block in enumerate(system if isinstance(system, list) else ()):
        _require_in(_object(block, f"system[{index}]"), "type", str, f"system[{index}]")
    for index, tool in enumerate(_shape(body.get("tools"), list, "tools") or ()):
        tool = _object(tool, f"tools[{index}]")
        _require_in(tool, "name", str, f"tools[{index}]")
        _shape(tool.get("input_schema"), dict, f"tools[{index}].input_schema")
    choice = _shape(body.get("tool_choice"), dict, "tool_choice")
    if choice is not None:
        _require_in(choice, "type", str, "tool_choice")
    for name in ("thinking", "metadata", "output_config", "context_management"):
        _optional(body, name, dict)
    stops = _shape(body.get("stop_sequences"), list, "stop_sequences")
    for index, stop in enumerate(stops or ()):
        _shape(stop, str, f"stop_sequences[{index}]")
    for name in ("temperature", "top_p"):
        _shape(body.get(name), (int, float), name)
    _shape(body.get("top_k"), int, "top_k")
    return ClientRequest(
        endpoint=Endpoint.MESSAGES,
        body=body,
        model=model,
        stream=stream,
        max_output_tokens=max_tokens,
        input_chars=_text_size(messages) + _text_size(system) + _text_size(body.get("tools")),
    )


def _require_in(value: dict, name: str, kind: type, where: str) -> Any:
    """``value[name]``, which must be there and of ``kind``, else a 400 naming it."""
    item = value.get(name)
    if not isinstance(item, kind) or isinstance(item, bool):
        raise InvalidRequest(
            f"'{where}.{name}' is required and must be {_KIND_NAMES[kind]}.",
            param=f"{where}.{name}",
        )
    return item


def _shape(value: Any, kinds: type | tuple[type, ...], where: str) -> Any:
    """``value`` if it is None or of one of ``kinds`` (a bool is no number), else a 400 naming
    ``where``: the readers that translate a body rely on the shapes checked with this."""
    if value is None:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    names = " or ".join(_KIND_NAMES[kind] for kind in kinds)
    raise InvalidRequest(f"'{where}' must be {names}, not {_json_type(value)}.", param=where)


def _object(value: Any, where: str) -> dict:
    """``value`` if it is an object, else a 400 naming ``where``."""
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"'{where}' must be an object, not {_json_type(value)}.", param=where
        )
    return value


def _check_parts(parts: list, where: str) -> None:
    """Content parts: objects with a string ``type`` (the readers look it up in sets). Kept
    to what a translating reader would trip on: this runs for every part of every request."""
    for index, part in enumerate(parts):
        if type(part) is not dict or type(part.get("type")) is not str:  # the common case
            _object(part, f"{where}[{index}]")
            _shape(part.get("type"), str, f"{where}[{index}].type")


def _check_item(item: dict, where: str) -> None:
    """A Responses input item: the fields the translating reader walks have their shapes."""
    for name in ("type", "role", "call_id", "name", "namespace", "id"):
        value = item.get(name)
        if value is not None and type(value) is not str:  # the check inline: every item
            _shape(value, str, f"{where}.{name}")
    content = _shape(item.get("content"), (str, list), f"{where}.content")
    if isinstance(content, list):
        _check_parts(content, f"{where}.content")
    output = item.get("output")
    if isinstance(output, list):
        _check_parts(output, f"{where}.output")
    summary = _shape(item.get("summary"), list, f"{where}.summary")
    for index, part in enumerate(summary or ()):
        _object(part, f"{where}.summary[{index}]")
    _check_responses_tools(item.get("tools"), f"{where}.tools")


def _check_responses_tools(tools: Any, where: str) -> None:
    for index, tool in enumerate(_shape(tools, list, where) or ()):
        tool = _object(tool, f"{where}[{index}]")
        for name in ("type", "name", "description"):
            _shape(tool.get(name), str, f"{where}[{index}].{name}")
        for name in ("parameters", "format"):
            _shape(tool.get(name), dict, f"{where}[{index}].{name}")
        _check_responses_tools(tool.get("tools"), f"{where}[{index}].tools")


def _check_common(body: Mapping[str, Any], lists: tuple[str, ...]) -> None:
    for name in lists:
        _optional(body, name, list)
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidRequest(
                f"'{name}' must be a number, not {_json_type(value)}.", param=name
            )
    _optional(body, "metadata", dict)


def _text_size(value: Any) -> int:
    """Rough size of the text a value carries, for the token estimate."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _require(body: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in body or body[name] is None:
        raise InvalidRequest(f"'{name}' is required.", param=name)
    return _optional(body, name, kind)


def _optional(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidRequest(
            f"'{name}' must be {_KIND_NAMES[kind]}, not {_json_type(value)}.", param=name
        )
    return value


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer, not {_json_type(value)}.", param=name)
    if value < 1:
        raise InvalidRequest(f"'{name}' must be at least 1, got {value}.", param=name)
    return value


_KIND_NAMES = {
    str: "a string",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    int: "an integer",
    float: "a number",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
