"""How far the relay believes an upstream: its error text redacted, its usage bounded.

An upstream is another party's server, or a proxy in front of one, and what it says goes to
the relay's clients (error messages) and into the ledger (usage). Neither is taken as it comes:

* **Error text** is passed on only after :func:`redact`: the account's own credential and the
  upstream's address (base URL, ``host:port``, host) literally, and anything credential-shaped
  (``Authorization``/``x-api-key`` values, bearer tokens, ``sk-…``/``AIza…``/JWT-like keys,
  ``?key=`` in URLs, private IP addresses). What is left is the upstream's own explanation,
  which is usually what a user needs ("maximum context length is 128000 tokens").
* **Usage** is passed to billing only through :func:`bound_usage`: no negative count, no more
  input than any context window holds, no more output than the request allowed, and no more
  visible output than the answer's bytes could carry (every token is at least one byte of
  text, and the wire form only adds to it). Hidden reasoning (OpenAI reasoning models stream
  none of it) is bounded by the output allowance only.

Pure functions over strings and :class:`~.sse.Usage`: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .sse import Usage

REDACTED = "[redacted]"
UPSTREAM = "[upstream]"

#: No API offers a larger context window than Gemini 1.5 Pro's 2,097,152 tokens: more input
#: than that in one request is not a count but a fault (or a lie).
MAX_INPUT_TOKENS = 2**21
#: Output allowed when the request sets no cap: twice the longest answer any API allows today
#: (128k), so no honest answer is cut while a claim of 10¹⁵ tokens is.
MAX_OUTPUT_TOKENS = 2**18
#: Visible output tokens allowed beyond the answer's bytes: the few formatting tokens a tool
#: call or a stop costs that show as no text.
CARRIED_SLACK_TOKENS = 64
#: Request headers whose values are credentials.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "api-key"}
)
#: Longest upstream error message passed on (a hostile one may send 64 KiB).
MAX_MESSAGE_CHARS = 2000

# Header-like "name: value" / "name=value" pairs whose value is a credential. The value may
# carry its scheme ("Bearer sk-…"); quotes around name or value are allowed (JSON, repr).
_CREDENTIAL_FIELD = re.compile(
    r"""(?ix)
    \b((?:proxy-)?authorization|x-api-key|x-goog-api-key|api[-_]?key|access[-_]token
       |refresh[-_]token|id[-_]token|client[-_]secret|password|secret)
    (["']?\s*[:=]\s*["']?)
    (?:(?:bearer|basic|token)\s+)?[^\s"',;&()\[\]{}]+
    """
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}")
_KEY_SHAPED = re.compile(
    r"""(?x)
    \b(?:sk|rk|pk)[-_][A-Za-z0-9_-]{12,}        # OpenAI, Anthropic (sk-ant-), DeepSeek, Stripe-like
    | \bAIza[0-9A-Za-z_-]{20,}                   # Google API keys
    | \bya29\.[0-9A-Za-z_.-]{10,}                # Google OAuth access tokens
    | \beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*  # JWTs (OAuth tokens)
    | \b(?:ghp|gho|ghs|github_pat|glpat|xox[abpr])[-_][A-Za-z0-9_-]{10,}
    """
)
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:key|api_key|apikey|access_token|token|sig|signature|code)=)[^&\s\"'#]+"
)
# Loopback and private IPv4 addresses (all four parts: "10.5" is a number), with a port if
# given: an internal hop's address.
_PRIVATE_ADDRESS = re.compile(
    r"\b(?:(?:127|10)(?:\.\d{1,3}){3}|(?:192\.168|172\.(?:1[6-9]|2\d|3[01]))(?:\.\d{1,3}){2})"
    r"(?::\d{1,5})?\b"
)


@dataclass(frozen=True)
class Confidential:
    """What must not leave the relay about one upstream call: the credentials sent with it
    and the addresses it was sent to (longest first, so a base URL goes before its host)."""

    secrets: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()

    @classmethod
    def of_call(cls, url: str, headers: Mapping[str, str]) -> Confidential:
        """The confidential parts of a POST to ``url`` with the upstream's own ``headers``:
        the credential headers' values (API keys, OAuth tokens; a value's scheme, "Bearer",
        is not secret) and the URL's base, origin, ``host:port`` and host."""
        secrets = set()
        for name, value in headers.items():
            words = value.split()
            if name.lower() in CREDENTIAL_HEADERS and words and len(words[-1]) >= 4:
                secrets.add(words[-1])
        parts = urlsplit(url)
        addresses = set()
        if parts.hostname:
            origin = f"{parts.scheme}://{parts.netloc}"
            addresses.update({parts.hostname, parts.netloc, origin})
            path = ""
            for segment in parts.path.strip("/").split("/"):  # the base URL is one of these
                path += "/" + segment
                addresses.add(origin + path)
        return cls(
            secrets=tuple(sorted(secrets, key=len, reverse=True)),
            addresses=tuple(sorted((a for a in addresses if len(a) >= 3), key=len, reverse=True)),
        )


def redact(text: str, confidential: Confidential | None = None) -> str:
    """``text`` with the call's secrets and addresses, and anything credential-shaped, replaced
    by ``[redacted]`` / ``[upstream]``, cut to :data:`MAX_MESSAGE_CHARS`.

    Guarantees: no secret or address of ``confidential`` survives (matched literally; addresses
    case-insensitively), nor any value of an ``Authorization``-like field, bearer token or
    key-shaped string; ordinary prose, public URLs and numbers are left as they were.
    """
    text = _CREDENTIAL_FIELD.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + " " + REDACTED, text)
    if confidential is not None:
        for secret in confidential.secrets:
            text = text.replace(secret, REDACTED)
        for address in confidential.addresses:
            text = re.sub(re.escape(address), UPSTREAM, text, flags=re.IGNORECASE)
    text = _KEY_SHAPED.sub(REDACTED, text)
    text = _QUERY_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    text = _PRIVATE_ADDRESS.sub(UPSTREAM, text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


def redact_all(values: Iterable[str | None], confidential: Confidential) -> list[str | None]:
    """:func:`redact` over several fields (``None`` stays ``None``)."""
    return [None if value is None else redact(value, confidential) for value in values]


def bound_usage(
    usage: Usage, *, carried_bytes: int, max_output_tokens: int | None = None, choices: int = 1
) -> tuple[Usage, str | None]:
    """``usage`` within sane bounds, and what was wrong with it (None if nothing was).

    - every count at least 0; cached input at most the input, cache writes at most the input
      left uncached, reasoning at most the output;
    - input at most :data:`MAX_INPUT_TOKENS`;
    - output at most what the request allowed: its ``max_output_tokens`` per choice
      (``choices``: Chat's ``n``), else :data:`MAX_OUTPUT_TOKENS` per choice;
    - the visible part of the output (output minus reasoning) at most ``carried_bytes`` (the
      answer's bytes as received) plus :data:`CARRIED_SLACK_TOKENS`: a report far above what
      the answer carried is cut to what it could have carried.
    """
    problems = []
    counts = {
        "input": usage.input_tokens,
        "cached": usage.cached_tokens,
        "output": usage.output_tokens,
        "reasoning": usage.reasoning_tokens,
    }
    negative = [name for name, value in counts.items() if value < 0]
    if negative:
        problems.append(f"negative {', '.join(negative)} tokens")
    input_tokens, cached, output, reasoning = (max(0, value) for value in counts.values())
    if input_tokens > MAX_INPUT_TOKENS:
        problems.append(f"{input_tokens} input tokens (more than any context window)")
        input_tokens = MAX_INPUT_TOKENS
    allowed = (max_output_tokens or MAX_OUTPUT_TOKENS) * max(1, choices)
    if output > allowed:
        problems.append(f"{output} output tokens (the request allowed {allowed})")
        output = allowed
    reasoning = min(reasoning, output)
    carried = max(0, carried_bytes) + CARRIED_SLACK_TOKENS
    if output - reasoning > carried:
        problems.append(
            f"{output - reasoning} visible output tokens in an answer of {carried_bytes} bytes"
        )
        output = reasoning + carried
    bounded = Usage(
        input_tokens=input_tokens,
        cached_tokens=min(cached, input_tokens),
        output_tokens=output,
        reasoning_tokens=reasoning,
    )
    bounded.cache_write_tokens = min(
        max(0, usage.cache_write_tokens), input_tokens - bounded.cached_tokens
    )
    return bounded, "; ".join(problems) or None
