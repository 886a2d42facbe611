"""Model-name patterns: ``[models."claude-sonnet-*"]`` aliases and globs in a package's ``models``.

A name that holds a glob character (``*``, ``?`` or ``[``) is a *pattern*, matched with
:func:`fnmatch.fnmatchcase` (case-sensitive, as model ids are; ``*`` also matches ``/`` and
``.``). Any other name is matched by equality only.

:class:`AliasTable` decides what a requested name means, in this order:

1. an exact alias (``[models.NAME]`` with no glob character) of that name;
2. the name itself, when the pool serves it directly;
3. the most specific pattern alias that matches it: the one with the most literal characters
   (characters outside ``*``, ``?`` and ``[...]``); on a tie, the first in the file.

So exact names always win over patterns, and a pattern only ever maps names nothing else
claims. Resolution takes one step: a pattern's ``target`` is sent as is, never matched again.

:func:`pattern_problem` refuses the globs fnmatch would read otherwise than the operator
meant: an unclosed ``[`` (fnmatch takes it as a literal ``[``, so the pattern silently matches
nothing Claude Code sends) and a ``[...]`` that can match no character (``[z-a]``).

Pure functions, no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ModelAlias

__all__ = [
    "AliasTable",
    "allowed",
    "is_pattern",
    "literal_length",
    "matches",
    "may_overlap",
    "pattern_problem",
]

_GLOB_CHARS = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """Whether ``name`` holds a glob character (``*``, ``?`` or ``[``)."""
    return not _GLOB_CHARS.isdisjoint(name)


def _class_end(pattern: str, start: int) -> int | None:
    """The index of the ``]`` closing the ``[`` at ``start``, as fnmatch reads it (a ``]``
    right after ``[`` or ``[!`` is a member), or ``None`` when nothing closes it."""
    index = start + 1
    if index < len(pattern) and pattern[index] == "!":
        index += 1
    if index < len(pattern) and pattern[index] == "]":
        index += 1
    end = pattern.find("]", index)
    return None if end < 0 else end


def _parts(pattern: str) -> Iterable[tuple[str, str, int]]:
    """The pattern as (kind, text, position) pieces, kind "literal" (one character), "any"
    (``*``), "one" (``?`` or a ``[...]``) or "unclosed" (a ``[`` nothing closes, which fnmatch
    reads as a literal)."""
    index = 0
    while index < len(pattern):
        char, start = pattern[index], index
        if char == "*":
            yield "any", char, start
        elif char == "?":
            yield "one", char, start
        elif char == "[":
            end = _class_end(pattern, index)
            if end is None:
                yield "unclosed", char, start
            else:
                yield "one", pattern[index : end + 1], start
                index = end
        else:
            yield "literal", char, start
        index += 1


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a glob to use, or ``None`` if it is fine (a plain name is)."""
    for kind, text, start in _parts(pattern):
        if kind == "unclosed":
            return (
                f"the '[' at position {start + 1} is never closed (fnmatch would read it as a "
                "literal '['; write [[] for one)"
            )
        if kind == "one" and text != "?" and _matches_nothing(text):
            return f"{text} matches no character (a reversed range?)"
    return None


#: What fnmatch makes of a class whose every range is reversed (it drops such ranges).
_EMPTY_CLASS = fnmatch.translate("[b-a]")


def _matches_nothing(char_class: str) -> bool:
    """Whether a ``[...]`` can match no character at all."""
    regex = fnmatch.translate(char_class)
    if regex == _EMPTY_CLASS:
        return True
    try:
        re.compile(regex)
    except re.error:  # an fnmatch that kept a reversed range in the regex
        return True
    return False


def literal_length(pattern: str) -> int:
    """How specific a pattern is: its characters outside ``*``, ``?`` and ``[...]``."""
    return sum(1 for kind, _, _ in _parts(pattern) if kind in ("literal", "unclosed"))


def matches(name: str, entry: str) -> bool:
    """Whether the model id ``name`` matches ``entry`` (a glob, or a name compared exactly)."""
    return fnmatch.fnmatchcase(name, entry) if is_pattern(entry) else name == entry


def allowed(allow_list: Collection[str] | None, name: str) -> bool:
    """Whether a package's ``models`` (``None``: everything) lets its keys ask for ``name``:
    ``name`` equals an entry or matches an entry that is a pattern."""
    return allow_list is None or any(matches(name, entry) for entry in allow_list)


def _literal_ends(pattern: str) -> tuple[str, str]:
    """The literal text before the first and after the last wildcard."""
    parts = list(_parts(pattern))
    head = ""
    for kind, text, _ in parts:
        if kind not in ("literal", "unclosed"):
            break
        head += text
    tail = ""
    for kind, text, _ in reversed(parts):
        if kind not in ("literal", "unclosed"):
            break
        tail = text + tail
    return head, tail


def may_overlap(first: str, second: str) -> bool:
    """``False`` only when no name can match both patterns: a name matching both starts with
    both literal heads and ends with both literal tails, so one head must be a prefix of the
    other and one tail a suffix of the other. ``True`` may be a false positive."""
    head1, tail1 = _literal_ends(first)
    head2, tail2 = _literal_ends(second)
    heads = head1.startswith(head2) or head2.startswith(head1)
    tails = tail1.endswith(tail2) or tail2.endswith(tail1)
    return heads and tails


class AliasTable:
    """``[models.*]`` split into exact aliases and patterns, best pattern first."""

    def __init__(self, aliases: Mapping[str, ModelAlias]) -> None:
        self.exact = {name: alias for name, alias in aliases.items() if not is_pattern(name)}
        ordered = [alias for name, alias in aliases.items() if is_pattern(name)]
        # sorted() is stable: on equal specificity the file's order stays.
        self.patterns = sorted(ordered, key=lambda alias: -literal_length(alias.name))

    def lookup(self, model: str, served: Collection[str]) -> ModelAlias | None:
        """The alias ``model`` resolves through, or ``None`` when it means itself: an exact
        alias, else nothing if ``served`` holds it, else the most specific matching pattern."""
        alias = self.exact.get(model)
        if alias is not None or model in served:
            return alias
        return next(
            (alias for alias in self.patterns if fnmatch.fnmatchcase(model, alias.name)), None
        )
