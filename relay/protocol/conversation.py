"""A request in one neutral shape, between the client's protocol and the upstream's.

The request side of translation follows the same rule as the answer side: one *reader* per
client protocol (:func:`.chat.read_chat_request`, :func:`.responses.read_responses_request`) turns
the body into a :class:`Conversation`, and one *writer* per upstream kind turns a
:class:`Conversation` into that upstream's body. Nothing here knows a wire format.

A conversation is a list of :class:`Message` s, each a role and a list of parts:

* ``system`` — instructions (Chat ``system``/``developer`` messages, Responses ``instructions`` and
  ``system``/``developer`` items). Writers put the *leading* ones where their protocol keeps
  instructions and handle later ones as their protocol allows.
* ``user`` — :class:`Text`, :class:`Image`, :class:`File`.
* ``assistant`` — :class:`Reasoning`, :class:`Text`, :class:`ToolCall`, in the order produced.
* ``tool`` — exactly one :class:`ToolResult`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidRequest

FILE_TYPES_MESSAGE = "only images and PDF files are supported as file inputs"

#: Placeholder result for a tool call the history never answered (an interrupted turn). Every
#: upstream rejects a call without a result; Codex itself writes "aborted" in that case.
MISSING_RESULT = "aborted: the tool call did not complete"


@dataclass
class Text:
    text: str


@dataclass
class Image:
    """An image by URL: a ``data:`` URL, an http(s) URL, or an OpenAI ``file_id``."""

    url: str | None = None
    detail: str | None = None
    file_id: str | None = None


@dataclass
class File:
    """A PDF (or image sent as a file): inline ``data`` URL, ``url``, or OpenAI ``file_id``."""

    data: str | None = None
    filename: str | None = None
    file_id: str | None = None
    url: str | None = None

    @property
    def media_type(self) -> str:
        if self.data:
            media = data_url_media_type(self.data)
            if media:
                return media
        name = self.filename or self.url or ""
        return media_type_for_name(name) or "application/pdf"

    @property
    def base64(self) -> str | None:
        """The data URL's payload (or ``data`` itself when it is bare base64)."""
        if not self.data:
            return None
        return data_url_payload(self.data) if self.data.startswith("data:") else self.data


@dataclass
class ToolCall:
    """A call the assistant made. ``signature`` is the upstream state the call id carried
    (``signature_kind`` names the upstream it belongs to)."""

    call_id: str
    name: str
    arguments: str
    custom: bool = False
    signature: str | None = None
    signature_kind: str | None = None


@dataclass
class ToolResult:
    call_id: str
    content: str | list[Text | Image | File]
    is_error: bool = False

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, Text))


@dataclass
class Reasoning:
    """Reasoning from an earlier answer; ``kind`` is the upstream kind that produced it."""

    text: str
    signature: str | None = None
    kind: str | None = None


Part = Text | Image | File | ToolCall | ToolResult | Reasoning


@dataclass
class Message:
    role: str
    parts: list[Any] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [part.text for part in self.parts if isinstance(part, Text)]

    def tool_calls(self) -> list[ToolCall]:
        return [part for part in self.parts if isinstance(part, ToolCall)]


@dataclass
class Tool:
    """A function tool. ``custom`` tools take raw text input (Responses freeform tools);
    writers for upstreams without them wrap the input as ``{"input": string}``."""

    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None
    custom: bool = False
    format: dict | None = None


#: The JSON schema a custom tool is given on upstreams that only have function tools
#: (CLIProxyAPI's choice; protocols.md §4.3).
CUSTOM_TOOL_SCHEMA = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The raw input for the tool."}},
    "required": ["input"],
    "additionalProperties": False,
}


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | None = None  # auto | none | required | function (see tool_choice_name)
    tool_choice_name: str | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    reasoning_effort: str | None = None
    reasoning_summary: str | None = None
    #: {"type": "json_schema", "name", "schema", "strict"} or {"type": "json_object"}
    response_format: dict | None = None
    verbosity: str | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    stream: bool = False

    def split_system(self) -> tuple[list[str], list[Message]]:
        """The leading system texts, and the messages after them."""
        system: list[str] = []
        index = 0
        while index < len(self.messages) and self.messages[index].role == "system":
            system.extend(text for text in self.messages[index].texts() if text)
            index += 1
        return system, self.messages[index:]

    def tool_names(self) -> dict[str, str]:
        """call id → function name, for upstreams whose results are matched by name (Gemini)."""
        names = {}
        for message in self.messages:
            for call in message.tool_calls():
                names[call.call_id] = call.name
        return names


def custom_tool_description(tool: Tool) -> str:
    """A custom tool's description for an upstream without freeform tools: its own description
    plus the input grammar, which the model needs to write valid input (Codex's apply_patch)."""
    description = tool.description or ""
    fmt = tool.format or {}
    if fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
        syntax = fmt.get("syntax") or "grammar"
        description += (
            f"\n\nPass the raw tool input as the string argument `input`. It must match this "
            f"{syntax} grammar:\n{fmt['definition']}"
        )
    else:
        description += "\n\nPass the raw tool input as the string argument `input`."
    return description.strip()


# --------------------------------------------------------------------------------------------
# Tool-result ordering


def arrange_tool_results(messages: list[Message]) -> list[Message]:
    """Order messages the way every upstream requires around tool calls.

    * An assistant message with tool calls is followed immediately by one result per call; a
      message that came between a call and its result is moved after the results (CLIProxyAPI
      does the same).
    * A call the history never answered gets :data:`MISSING_RESULT`, when a later assistant
      message or the end of the history shows it never will be.
    * A result whose call is not in the history (e.g. trimmed by the client) becomes a user
      text, because upstreams reject results without their call.
    """
    out: list[Message] = []
    deferred: list[Message] = []
    pending: list[str] = []

    def close_pending() -> None:
        for call_id in pending:
            out.append(Message("tool", [ToolResult(call_id, MISSING_RESULT, is_error=True)]))
        pending.clear()
        out.extend(deferred)
        deferred.clear()

    for message in messages:
        if message.role == "tool":
            result = message.parts[0]
            if result.call_id in pending:
                out.append(message)
                pending.remove(result.call_id)
                if not pending:
                    out.extend(deferred)
                    deferred.clear()
                continue
            message = Message(
                "user", [Text(f"Output of tool call {result.call_id}:\n{result.text()}")]
            )
        if pending:
            if message.role != "assistant":
                deferred.append(message)
                continue
            close_pending()
        out.append(message)
        if message.role == "assistant":
            pending = [call.call_id for call in message.tool_calls()]
    close_pending()
    return out


def merge_roles(items: list[tuple[str, list]]) -> list[tuple[str, list]]:
    """Join consecutive entries of the same role (Anthropic and Gemini require alternation)."""
    merged: list[tuple[str, list]] = []
    for role, parts in items:
        if not parts:
            continue
        if merged and merged[-1][0] == role:
            merged[-1][1].extend(parts)
        else:
            merged.append((role, list(parts)))
    return merged


# --------------------------------------------------------------------------------------------
# Media types

_DATA_URL = re.compile(r"data:([^;,]*)[^,]*,", re.ASCII)

_EXTENSIONS = {
    "pdf": "application/pdf",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "heic": "image/heic",
    "heif": "image/heif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "svg": "image/svg+xml",
}


#: URL "extensions" that name a script serving the file, not the file's type.
_PAGES = frozenset({"php", "asp", "aspx", "jsp", "cgi"})


def data_url_media_type(url: str) -> str | None:
    match = _DATA_URL.match(url)
    return match.group(1).strip().lower() or None if match else None


def data_url_payload(url: str) -> str:
    _, _, payload = url.partition(",")
    return payload


def media_type_for_name(name: str) -> str | None:
    """The media type a file name or URL path implies, if it has a known extension."""
    path = name.split("?", 1)[0].split("#", 1)[0]
    _, dot, extension = path.rpartition(".")
    if not dot or "/" in extension:
        return None
    return _EXTENSIONS.get(extension.lower())


def has_extension(name: str) -> bool:
    path = name.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[-1]
    return "." in path.strip(".")


def is_supported_media(media_type: str) -> bool:
    return media_type.startswith("image/") or media_type == "application/pdf"


def check_file(
    *, data: str | None, filename: str | None, url: str | None = None, where: str
) -> None:
    """Reject file inputs that are neither images nor PDFs (DESIGN.md "Parse and normalise").

    The data URL's media type is checked first, then the file name's extension, then the URL's.
    A file known only by ``file_id`` cannot be checked here and is let through.
    """
    media = None
    if isinstance(data, str) and data.startswith("data:"):
        media = data_url_media_type(data)
    if media is None and filename:
        media = media_type_for_name(filename)
        if media is None and has_extension(filename):
            media = "unknown"
    if media is None and url and not url.startswith("data:"):
        path = urlsplit(url).path
        media = media_type_for_name(path)
        extension = path.rsplit("/", 1)[-1].rpartition(".")[2].lower()
        if media is None and has_extension(path) and extension not in _PAGES:
            media = "unknown"
    if media is not None and not is_supported_media(media):
        shown = filename or (url if media == "unknown" else media)
        raise InvalidRequest(
            f"Invalid file input at '{where}' ({shown}): {FILE_TYPES_MESSAGE}.",
            param=where,
            code="unsupported_file_type",
        )


def check_image_url(url: str, where: str) -> None:
    if url.startswith("data:"):
        media = data_url_media_type(url) or ""
        if not is_supported_media(media):
            raise InvalidRequest(
                f"Invalid image input at '{where}' ({media or 'no media type'}): "
                f"{FILE_TYPES_MESSAGE}.",
                param=where,
                code="unsupported_file_type",
            )


def is_pdf_data_url(url: str | None) -> bool:
    return bool(url) and url.startswith("data:") and data_url_media_type(url) == "application/pdf"
