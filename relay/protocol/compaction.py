"""Remote compaction of a Responses conversation (the Codex CLI's), for every upstream kind.

Codex shortens a long conversation by asking the provider to compact it, in one of two forms
(protocols.md §2.10, docs/codex-compaction.md):

* **v1**: ``POST {base}/responses/compact``, a Responses body answered, not streamed, by
  ``{"object": "response.compaction", "output": [… user messages, {"type": "compaction",
  "encrypted_content": …}], "usage": …}``;
* **v2**: a streamed ``POST {base}/responses`` whose ``input`` ends with
  ``{"type": "compaction_trigger"}``, whose output must be exactly one ``compaction`` item
  (the form Codex 0.169.0 uses).

Either way the later turns carry the ``compaction`` item at the head of their input instead of
the history it replaced.

An ``openai-responses`` upstream compacts by itself: both forms are relayed to it (v1 to its
``responses/compact``). Any other upstream cannot, so the relay compacts for it: the request
becomes a **summary turn** (:func:`summary_turn_body`, the history plus an instruction to write
a hand-over summary, tools not to be called), and its answer is encoded by
:class:`.compaction_answer.CompactionEncoder` as one ``compaction`` item whose
``encrypted_content`` is a relay token (:func:`seal`). When the token comes back in a later
request, the relay expands it into a user message holding the summary (:func:`expanded_item`),
for a translated upstream and for an OpenAI one alike (OpenAI cannot read the relay's token). A
``compaction`` item the relay did not make (OpenAI's own, encrypted) can go only to an OpenAI
upstream: for any other it is a 400.

The token is the summary in base64url, not encrypted and not signed: its content only ever
becomes the input of the same client's next turn, which the client could write freely anyway,
so a forged token gains nothing that editing the input would not; and an unsigned token keeps
working across relay restarts, secret rotation and several relays behind one address.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ..errors import InvalidRequest

#: The start of every compaction token the relay makes.
PREFIX = "rlyc1."

#: The two forms of a compaction request (see the module docstring).
V1 = "v1"
V2 = "v2"

#: The instruction that ends a summary turn. Written for a model that will not see the history
#: again: what the next assistant needs, in what detail, and nothing else.
SUMMARY_INSTRUCTION = (
    "The conversation above is about to be replaced by a summary, because it no longer fits "
    "in the context window. Write that summary now, for another assistant who will see only "
    "your summary and must carry on the work without asking the user to repeat anything.\n\n"
    "Cover, in this order:\n"
    "1. What the user wants: their goals, requests, constraints and stated preferences.\n"
    "2. What has been done: files read or changed, commands run and the results that matter, "
    "decisions taken and why.\n"
    "3. Where things stand: what works, what is unfinished or failing, open questions.\n"
    "4. The next steps, in order.\n\n"
    "Keep exact file paths, names, identifiers, commands and error messages. Leave out "
    "pleasantries and anything already resolved that has no bearing on the rest. Answer "
    "with the summary only, as plain text; do not call any tool."
)

#: How an expanded compaction item introduces the summary to the upstream model.
SUMMARY_HEADING = (
    "Summary of the earlier part of this conversation (its history was compacted; this "
    "summary replaces it):\n\n"
)


def seal(summary: str) -> str:
    """The ``encrypted_content`` that carries ``summary`` (see the module docstring)."""
    payload = json.dumps({"s": summary}, ensure_ascii=False, separators=(",", ":"))
    return PREFIX + base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def unseal(value: object) -> str | None:
    """The summary a relay token carries; None for anything the relay did not make."""
    if not isinstance(value, str) or not value.startswith(PREFIX):
        return None
    text = value[len(PREFIX) :]
    try:
        payload = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError):
        return None
    summary = payload.get("s") if isinstance(payload, dict) else None
    return summary if isinstance(summary, str) else None


def is_compaction_item(item: Any) -> bool:
    """A ``compaction`` input item (``compaction_summary`` is its older name)."""
    return isinstance(item, dict) and item.get("type") in ("compaction", "compaction_summary")


def is_trigger(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "compaction_trigger"


def form_of(body: dict, *, compact_route: bool) -> str | None:
    """The compaction form a validated Responses body asks for: :data:`V1` on the
    ``responses/compact`` route, :data:`V2` when its input ends with a ``compaction_trigger``,
    else None."""
    if compact_route:
        return V1
    items = body.get("input")
    if isinstance(items, list) and items and is_trigger(items[-1]):
        return V2
    return None


def summary_text_of(item: dict, where: str) -> str:
    """The summary of a relay-made compaction item at ``where``; a 400 for any other (the
    upstream it would go to cannot read it)."""
    summary = unseal(item.get("encrypted_content"))
    if summary is None:
        raise InvalidRequest(
            f"'{where}' is a compaction item this relay did not make: its encrypted_content "
            "is OpenAI's (or not valid), which only an OpenAI upstream can read, and this "
            "model is served by another kind of upstream. Continue the conversation with a "
            "model an OpenAI account serves, or start a new one.",
            param=f"{where}.encrypted_content",
            code="invalid_encrypted_content",
        )
    return summary


def expanded_item(summary: str) -> dict:
    """A relay-made compaction item, as the Responses message that stands for it upstream."""
    return {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": SUMMARY_HEADING + summary}],
    }


def expand_relay_items(items: list) -> list:
    """``items`` (a Responses input) with each relay-made compaction item replaced by its
    summary message, for an ``openai-responses`` upstream; OpenAI's own stay as they are."""
    if not any(is_compaction_item(item) for item in items):
        return items
    out = []
    for item in items:
        summary = unseal(item.get("encrypted_content")) if is_compaction_item(item) else None
        out.append(expanded_item(summary) if summary is not None else item)
    return out


def summary_turn_body(body: dict, form: str) -> dict:
    """The Responses body of the summary turn that compacts ``body``'s conversation for an
    upstream that cannot compact: its history (the trigger removed) and the summary
    instruction as the last user message; tools stay declared (the history's calls refer to
    them) but may not be called; no structured output. Streamed as the client streams (v2);
    never for v1."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    history = [item for item in items or [] if not is_trigger(item)]
    turn = {
        key: value
        for key, value in body.items()
        if key not in ("input", "stream", "stream_options", "tool_choice", "text")
    }
    turn["input"] = [
        *history,
        {"type": "message", "role": "user", "content": SUMMARY_INSTRUCTION},
    ]
    if body.get("tools"):
        turn["tool_choice"] = "none"
    turn["stream"] = form == V2 and body.get("stream") is True
    return turn


def retained_user_messages(body: dict) -> list[dict]:
    """The user messages of a v1 request's input, which a ``response.compaction`` answer
    repeats before its compaction item (OpenAI's documented shape)."""
    items = body.get("input")
    if isinstance(items, str):
        return [{"type": "message", "role": "user", "content": [_input_text(items)]}]
    kept = []
    for item in items or []:
        if isinstance(item, dict) and item.get("role") == "user" and (
            item.get("type", "message") == "message"
        ):
            content = item.get("content")
            if isinstance(content, str):
                content = [_input_text(content)]
            kept.append({"type": "message", "role": "user", "content": content})
    return kept


def _input_text(text: str) -> dict:
    return {"type": "input_text", "text": text}
