"""Codex's own ``/models`` answer: ``{"models": [ModelInfo, …]}`` for the models a key may use.

The Codex CLI asks ``GET {base}/models?client_version=X.Y.Z`` (only with ChatGPT auth or a
provider's ``auth = { command = … }``, protocols.md §2.8) and expects its ``ModelsResponse``, not
OpenAI's list. What Codex does with each entry, observed with the installed CLI (0.169.0,
docs/codex-models.md):

- it decodes the whole list or none of it: one entry missing a required key or holding an enum
  value it does not know (a ``shell_type``, say) and Codex silently keeps its bundled catalog.
  Required in 0.169.0: ``slug``, ``display_name``, ``supported_reasoning_levels``,
  ``shell_type``, ``visibility``, ``supported_in_api``, ``priority``, ``base_instructions``,
  ``support_verbosity``, ``truncation_policy``, ``experimental_supported_tools``; older releases
  also require ``supports_reasoning_summaries`` and ``supports_parallel_tool_calls``, and know
  only six efforts (``none`` … ``xhigh``; 0.169.0 takes any). Every one of those keys is always
  written here, and only those six efforts;
- an entry replaces what Codex knows of that slug (bundled metadata included): its
  ``base_instructions`` become the first developer message of every turn, verbatim, so it must
  be a real prompt (an empty one leaves the model with no system prompt at all);
- ``default_reasoning_level`` is the effort it sends when the user chose none; with no levels it
  sends no effort.

What the relay knows goes in, the rest are documented defaults:

- levels come from the aliases. An alias that fixes an effort (``gpt-5-high``) offers that one
  effort, its default: the relay applies it whatever the client sends. Any other model offers
  the efforts the aliases onto it fix (``gpt-5`` with ``gpt-5-low`` and ``gpt-5-high``: low and
  high), by default ``medium`` when offered, else the lowest; a model no alias gives an effort
  offers none, and Codex then sends none (the upstream's default applies). ``max`` is never
  listed: Codex releases before its introduction refuse the whole list over it; an alias fixing
  ``max`` is listed with no levels (it is applied all the same).
- ``context_window`` is :data:`DEFAULT_CONTEXT_WINDOW` (the configuration does not know one):
  small enough for every upstream the relay speaks to, so Codex compacts before an upstream
  refuses the context; ``truncation_policy`` 10,000 bytes of tool output, as Codex's own
  fallback for models it does not know; ``shell_type`` ``shell_command`` (the bundled models');
  no ``apply_patch_tool_type`` (Codex then edits through the shell, as for a model it does not
  know: the freeform patch tool is a grammar only OpenAI's models are trained on); parallel tool
  calls on (every upstream kind and the translation carry several calls per turn).
- ``base_instructions`` is :data:`BASE_INSTRUCTIONS`, the relay's own short coding-agent
  prompt (Codex's bundled prompts are not the relay's to ship). A user who wants Codex's own
  prompt sets ``model_instructions_file`` in Codex's config.

The ETag is a hash of the body: the same models, aliases and defaults give the same tag in every
process of every replica. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "BASE_INSTRUCTIONS",
    "CODEX_EFFORTS",
    "DEFAULT_CONTEXT_WINDOW",
    "ListedModel",
    "etag_matches",
    "etag_of",
    "is_codex_client",
    "models_body",
    "models_response",
]

#: Efforts every Codex release with a ``/models`` client decodes, in Codex's order.
CODEX_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")

_EFFORT_TEXT = {
    "none": "No reasoning: fastest answers",
    "minimal": "Minimal reasoning: very fast answers",
    "low": "Light reasoning: fast answers",
    "medium": "Balanced reasoning for everyday tasks",
    "high": "Deep reasoning for complex problems",
    "xhigh": "Deepest reasoning for the hardest problems",
}

#: Tokens of context Codex is told a relayed model has (it compacts at 90 % of it).
DEFAULT_CONTEXT_WINDOW = 128_000

#: Bytes of a tool's output Codex keeps in the conversation (Codex's own fallback).
TRUNCATION_BYTES = 10_000

BASE_INSTRUCTIONS = """\
You are a coding agent working in the user's terminal through the Codex CLI. You and the user \
share one workspace: read the code before changing it, make the change the task needs, and \
check it.

- Use the tools you are given to read files, run commands and edit files; prefer fast search \
tools (rg) to explore.
- Keep changes small and in the style of the surrounding code; do not fix unrelated things.
- Respect instructions in AGENTS.md files that apply to the files you touch.
- Run the relevant tests or checks after a change when they exist, and report what you ran.
- Never run destructive commands (deleting data, rewriting history) unless the user asked.
- When the task is done, answer briefly: what changed, where, and how it was verified.
"""


@dataclass(frozen=True)
class ListedModel:
    """One model id of the key's list, as the relay resolves it.

    ``target`` is the upstream model it maps to (itself when it is no alias); ``effort`` the
    reasoning effort its alias fixes, if any.
    """

    slug: str
    target: str
    effort: str | None = None


def is_codex_client(query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    """Codex's models request: ``client_version`` in the query, or Codex's ``originator`` /
    ``User-Agent`` (``codex_cli_rs``, ``codex_exec``, ``codex_vscode``…)."""
    if "client_version" in query:
        return True
    originator = headers.get("originator", "").lower()
    agent = headers.get("user-agent", "").lower()
    return originator.startswith("codex") or agent.startswith("codex")


def _levels(efforts: Iterable[str]) -> list[str]:
    wanted = set(efforts)
    return [effort for effort in CODEX_EFFORTS if effort in wanted]


def _default_level(levels: Sequence[str]) -> str | None:
    if not levels:
        return None
    return "medium" if "medium" in levels else levels[0]


def model_info(
    model: ListedModel,
    priority: int,
    efforts_by_target: Mapping[str, Iterable[str]],
    *,
    base_instructions: str = BASE_INSTRUCTIONS,
    context_window: int = DEFAULT_CONTEXT_WINDOW,
) -> dict:
    """One ``ModelInfo``: every key Codex requires, with the values the module docstring
    gives."""
    if model.effort is not None:
        levels = _levels([model.effort])
        default = levels[0] if levels else None
        description = f"{model.target} with reasoning effort {model.effort}, set by the relay"
    else:
        levels = _levels(efforts_by_target.get(model.target, ()))
        default = _default_level(levels)
        description = (
            f"Served by the relay as {model.target}" if model.target != model.slug else None
        )
    info: dict = {
        "slug": model.slug,
        "display_name": model.slug,
        "description": description,
        "supported_reasoning_levels": [
            {"effort": effort, "description": _EFFORT_TEXT[effort]} for effort in levels
        ],
        "shell_type": "shell_command",
        "visibility": "list",
        "supported_in_api": True,
        "priority": priority,
        "upgrade": None,
        "base_instructions": base_instructions,
        "supports_reasoning_summaries": bool(levels),
        "support_verbosity": False,
        "default_verbosity": None,
        "apply_patch_tool_type": None,
        "truncation_policy": {"mode": "bytes", "limit": TRUNCATION_BYTES},
        "supports_parallel_tool_calls": True,
        "context_window": context_window,
        "experimental_supported_tools": [],
        "input_modalities": ["text", "image"],
    }
    if default is not None:
        info["default_reasoning_level"] = default
    return info


def models_response(
    models: Sequence[ListedModel], efforts_by_target: Mapping[str, Iterable[str]]
) -> dict:
    """``{"models": [...]}`` in the order given (``priority`` is the position: Codex lists the
    lowest first)."""
    return {
        "models": [
            model_info(model, priority, efforts_by_target)
            for priority, model in enumerate(models)
        ]
    }


def models_body(
    models: Sequence[ListedModel], efforts_by_target: Mapping[str, Iterable[str]]
) -> tuple[bytes, str]:
    """The answer's bytes and their ETag."""
    body = json.dumps(
        models_response(models, efforts_by_target), separators=(",", ":"), sort_keys=True
    ).encode()
    return body, etag_of(body)


def etag_of(body: bytes) -> str:
    """A strong ETag (quoted) that changes exactly when the bytes do."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` value names ``etag`` (RFC 9110 §13.1.2: weak comparison, a
    list of tags, or ``*``)."""
    wanted = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == wanted:
            return True
    return False
