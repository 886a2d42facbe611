"""Responses state for upstreams that keep none: what ``previous_response_id`` and
``item_reference`` mean, rebuilt from the answers the relay kept. Pure: no I/O, no clock.

A Responses client that leaves ``store`` at its default (true: the Vercel AI SDK, the Agents
SDKs) sends earlier turns as ``{"type": "item_reference", "id": …}`` or continues with
``previous_response_id``, trusting the server to remember. A Chat, Anthropic or Gemini upstream
remembers nothing, so the relay keeps each answer it gave (a :class:`StoredResponse`: the
Response object, and the whole conversation it answered, :attr:`StoredResponse.input`) and
:func:`expand` writes the references out before the request is translated. A reference the
relay cannot resolve is a 400 that names the id (:func:`expand`): never a silent drop, which
would make the model lose the previous answer without anyone knowing.

An ``openai-responses`` upstream keeps its own state (:data:`STATEFUL_UPSTREAMS`): what it made
is passed through untouched. Only what the relay made itself (answers it translated from
another upstream, :attr:`StoredResponse.translated`, whose ids no upstream knows) is written out
for it too, so a conversation can move between pools of both kinds (failover, mixed pools).

Why the whole conversation in each record, rather than its own turn and a link to the previous
one: a record is then enough on its own (one lookup, however long the chain; an older record
that expired or was evicted breaks nothing), and in memory the items are shared between the
records of one chain (the lists hold the same objects), so a turn costs its own items only.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest

#: Upstream kinds that keep Responses state themselves: references to what they made are
#: theirs to resolve. (The ChatGPT backend refuses ``store: true``: it keeps none.)
STATEFUL_UPSTREAMS = frozenset({"openai-responses"})

#: Fields of a kept item that only the store that made it understands: left out when the
#: relay writes the item out for an upstream (an upstream that stores would look the id up).
_ITEM_FIELDS_DROPPED = ("id", "status")


@dataclass
class StoredResponse:
    """One answer the relay kept for a key.

    ``response`` is the Response object the client was given (what ``GET /v1/responses/{id}``
    returns); ``input`` the conversation it answered, written out (previous responses and
    references resolved; ``instructions`` are not part of it, as OpenAI does not carry them
    over), or None when the relay does not know it all (a stateful upstream resolved a
    reference the relay did not hold); ``translated``: the answer came through the relay's
    translation, so its ids are the relay's own.
    """

    response: dict
    input: list[dict] | None
    translated: bool

    @property
    def id(self) -> str:
        return str(self.response.get("id") or "")

    @property
    def output(self) -> list[dict]:
        output = self.response.get("output")
        if not isinstance(output, list):
            return []
        return [item for item in output if isinstance(item, dict)]

    @functools.cached_property
    def _items(self) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for item in (*(self.input or ()), *self.output):
            item_id = item.get("id")
            if isinstance(item_id, str) and item_id:
                found[item_id] = item
        return found

    def items(self) -> dict[str, dict]:
        """Every item of the record that has an id (input and output), by id (worked out once:
        a record is not changed once made)."""
        return self._items

    def to_json(self) -> str:
        """The record as JSON in ASCII: a lone surrogate an upstream's answer carried (a
        ``\\ud800`` escape) stays an escape instead of failing the encoding for Redis."""
        return json.dumps(
            {"response": self.response, "input": self.input, "translated": self.translated},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> StoredResponse | None:
        """The record ``text`` holds, or None if it is not one (a foreign or damaged value)."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict) or not isinstance(value.get("response"), dict):
            return None
        items = value.get("input")
        return cls(
            response=value["response"],
            input=items if isinstance(items, list) else None,
            translated=value.get("translated") is True,
        )


@dataclass
class StoredItem:
    """One kept item, and whether the relay made it (see :attr:`StoredResponse.translated`)."""

    item: dict
    translated: bool


@dataclass
class Found:
    """What the relay holds of the references in one request body (see :func:`references`)."""

    previous: StoredResponse | None = None
    items: Mapping[str, StoredItem] | None = None


def keeps(body: Mapping[str, Any]) -> bool:
    """Whether the answer to ``body`` is kept: ``store`` defaults to true, as OpenAI's does."""
    return body.get("store") is not False


def references(body: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """The ``previous_response_id`` of a Responses body, and the ids of its item references."""
    previous = body.get("previous_response_id")
    ids: list[str] = []
    items = body.get("input")
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and item.get("type") == "item_reference":
            item_id = item.get("id")
            if isinstance(item_id, str) and item_id and item_id not in ids:
                ids.append(item_id)
    return (previous if isinstance(previous, str) and previous else None), ids


def input_items(body: Mapping[str, Any]) -> list[dict]:
    """The body's ``input`` as a list of items (a bare string is one user message)."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    return []


def expand(body: dict, found: Found, upstream_kind: str) -> dict:
    """``body`` with its references written out for an ``upstream_kind`` upstream.

    For an upstream that keeps no state: ``previous_response_id`` becomes the conversation it
    names (its input and output items) ahead of ``input``, and each ``item_reference`` the item
    it names; one the relay does not hold is a 400 naming the id (``previous_response_not_found``,
    ``item_not_found``). For a stateful upstream (:data:`STATEFUL_UPSTREAMS`) only what the relay
    made itself is written out; everything else is left for the upstream to resolve. Returns
    ``body`` itself when there is nothing to write out.
    """
    stateful = upstream_kind in STATEFUL_UPSTREAMS
    previous_id, ids = references(body)
    if previous_id is None and not ids:
        return body
    items = found.items or {}
    prefix: list[dict] = []
    out = dict(body)
    written = False
    if previous_id is not None:
        record = found.previous
        if record is not None and (record.translated or not stateful):
            if record.input is None:
                raise InvalidRequest(
                    f"Previous response with id '{previous_id}' cannot be continued through "
                    "this relay: it was answered by an upstream that keeps the conversation "
                    "itself, and the relay does not hold all of it. Send the full conversation "
                    "in 'input' instead.",
                    code="previous_response_not_found",
                    param="previous_response_id",
                )
            prefix = [_written_out(item) for item in (*record.input, *record.output)]
            del out["previous_response_id"]
            written = True
        elif not stateful:
            raise InvalidRequest(
                f"Previous response with id '{previous_id}' not found. The relay keeps a "
                "key's responses for a limited time and number (and none sent with "
                "store=false); send the full conversation in 'input' instead.",
                code="previous_response_not_found",
                param="previous_response_id",
            )
    current: list[dict] = []
    value = body.get("input")
    for index, item in enumerate(value if isinstance(value, list) else ()):
        if isinstance(item, dict) and item.get("type") == "item_reference":
            item_id = item.get("id")
            kept = items.get(item_id) if isinstance(item_id, str) else None
            if kept is not None and (kept.translated or not stateful):
                current.append(_written_out(kept.item))
                written = True
                continue
            if not stateful:
                raise InvalidRequest(
                    f"Item with id {json.dumps(item_id)} not found (input[{index}] refers to "
                    "it). The relay keeps a key's responses for a limited time and number "
                    "(and none sent with store=false); send the item itself instead of a "
                    "reference.",
                    code="item_not_found",
                    param=f"input[{index}].id",
                )
        current.append(item)
    if not written:
        return body  # a stateful upstream's own references, untouched
    if isinstance(value, str):
        current = input_items(body)
    out["input"] = prefix + current
    return out


def conversation(body: Mapping[str, Any], found: Found) -> list[dict] | None:
    """The whole conversation ``body`` continues, written out: what the record of its answer
    keeps as :attr:`StoredResponse.input`. None when a reference is one the relay does not
    hold (a stateful upstream resolves it)."""
    previous_id = references(body)[0]
    prefix: list[dict] = []
    if previous_id is not None:
        record = found.previous
        if record is None or record.input is None:
            return None
        prefix = [*record.input, *record.output]
    items = found.items or {}
    current: list[dict] = []
    for item in input_items(body):
        if item.get("type") == "item_reference":
            kept = items.get(item.get("id"))  # type: ignore[arg-type]
            if kept is None:
                return None
            item = kept.item
        current.append(item)
    return prefix + current


def listed_item(item: dict) -> dict:
    """A kept input item as OpenAI lists one (``GET /v1/responses/{id}/input_items``): a
    message whose content is a bare string gets it as one text part, typed by its role."""
    if item.get("type", "message") != "message" or not isinstance(item.get("content"), str):
        return item
    kind = "output_text" if item.get("role") == "assistant" else "input_text"
    return {"type": "message", **item, "content": [{"type": kind, "text": item["content"]}]}


def _written_out(item: dict) -> dict:
    """A kept item as a request's input item (without the fields only its store knew)."""
    if not any(name in item for name in _ITEM_FIELDS_DROPPED):
        return item
    return {name: value for name, value in item.items() if name not in _ITEM_FIELDS_DROPPED}
