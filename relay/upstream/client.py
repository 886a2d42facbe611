"""The one HTTP client the relay uses to reach upstream accounts.

HTTP/1.1 through the relay's own connection pool (:mod:`.http11`, why there), so closing a
response closes the socket and the upstream sees a cancelled request at once (stack-notes).
Every response is owned by an ``async with`` so a cancelled request can never leave a pool slot
behind. Failures before the answer begins become :mod:`relay.errors` exceptions here; the
callers map the ones in the middle of an answer (:class:`.http11.TransportError`).

What reaches a client from here never names the upstream's address or credential: an upstream
error's text is redacted (:func:`relay.protocol.trust.redact`) with its status and code kept,
a body that is no API error (an HTML page) gets the relay's own message, a connect failure's
details (host, port, errno) go to the operator's log only, and a rest the upstream asks for is
at most ``server.max_retry_after_s``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import httpx2
import trio

from .. import __version__
from ..config import AccountConfig, ServerConfig
from ..errors import (
    InvalidRequest,
    RelayBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..protocol.translate import retry_after_hint, translate_error
from ..protocol.trust import Confidential, redact, redact_all
from .http11 import (
    CertificateUntrusted,
    ConnectionPool,
    ConnectTimeout,
    PoolTimeout,
    ProxyError,
    ReadTimeout,
    Response,
    TransportError,
    UnsendableRequest,
)
from .proxy import DIRECT, Route, route_for

log = logging.getLogger("relay.upstream")

#: Provider kinds that speak OpenAI's protocols and get the client's conversation headers.
OPENAI_KINDS = ("openai-chat", "openai-responses")

#: Idle upstream connections are kept this long (real APIs keep theirs for 60 s or more).
KEEPALIVE_EXPIRY_S = 90.0

#: How much of an upstream error body is read to build the client's error message, and for
#: how long at most.
ERROR_BODY_LIMIT = 64 * 1024
ERROR_BODY_TIMEOUT_S = 5.0

# Client headers forwarded upstream: the conversation ids (accounts' prompt caches are keyed on
# them) and the Codex CLI's routing hints. Everything else, above all the client's credentials,
# stays at the relay.
FORWARDED_HEADERS = (
    "session-id",
    "session_id",
    "conversation_id",
    "thread-id",
    "thread_id",
    "x-client-request-id",
    "originator",
    "openai-beta",
    "x-codex-turn-state",
    "x-openai-subagent",
    # The Codex CLI's beta features (``remote_compaction_v2``: a compaction_trigger turn).
    "x-codex-beta-features",
)

#: Client headers an Anthropic upstream gets unchanged: the betas the client asked for (Claude
#: Code's list) and its API version, which replaces the relay's default.
ANTHROPIC_FORWARDED_HEADERS = ("anthropic-beta", "anthropic-version")

#: Content types of a 2xx answer that are a web page, not an API's answer (a captive portal,
#: a proxy's or CDN's page): refused before any byte reaches the client.
DOCUMENT_TYPES = ("text/html", "application/xhtml+xml")


class UpstreamClient:
    def __init__(self, server: ServerConfig, accounts: Sequence[AccountConfig] = ()) -> None:
        self._max_rest_s = server.max_retry_after_s
        # Each account's proxy and CA, settled once (the environment's proxy too, trust_env).
        self._routes: dict[str, Route] = {a.name: route_for(a, server) for a in accounts}
        self._pool = ConnectionPool(
            max_connections=server.upstream_max_connections,
            max_idle_connections=min(server.upstream_max_connections, 200),
            # A 5 s expiry (httpx's default) would redo TCP+TLS for every agent turn after a pause.
            keepalive_expiry_s=KEEPALIVE_EXPIRY_S,
            connect_timeout_s=server.upstream_connect_timeout_s,
            read_timeout_s=server.upstream_read_timeout_s,
            pool_timeout_s=server.upstream_connect_timeout_s,
            max_body_bytes=server.upstream_max_body_bytes,
            # The certificate stores httpx2 trusts, without the environment's overrides.
            ssl_context_factory=lambda: httpx2.create_ssl_context(trust_env=False),
            user_agent=f"relay/{__version__}",
        )

    def route(self, account: str) -> Route:
        """How the account's upstream is reached (its proxy, its CAs)."""
        return self._routes.get(account, DIRECT)

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    async def aclose(self) -> None:
        await self._pool.aclose()

    @asynccontextmanager
    async def post(
        self,
        url: str,
        body: bytes,
        *,
        kind: str,
        headers: Mapping[str, str],
        client_headers: Mapping[str, str],
        stream: bool,
        account: str,
    ) -> AsyncIterator[Response]:
        """POST ``body`` to an upstream of provider ``kind`` and yield the open response once it
        answered 2xx.

        ``headers`` are the upstream's own (authentication, API version). A non-2xx answer is
        raised as a :class:`UpstreamError` with the status and OpenAI error fields the client
        should see (translated from Anthropic's or Gemini's error shapes) and the cool-down the
        upstream asked for, before the caller sends anything to its client.
        """
        sent = {  # the pool writes the host and the length itself
            "content-type": "application/json",
            "accept-encoding": "identity",
            **headers,
        }
        if stream:
            sent["accept"] = "text/event-stream"
        if kind in OPENAI_KINDS:
            for name in FORWARDED_HEADERS:
                value = client_headers.get(name)
                if value is not None:
                    sent[name] = value
        elif kind == "anthropic":
            for name in ANTHROPIC_FORWARDED_HEADERS:
                value = client_headers.get(name)
                if value is not None:
                    sent[name] = value
        confidential = Confidential.of_call(url, headers)
        try:
            response = await self._pool.post(url, list(sent.items()), body, self.route(account))
        except PoolTimeout as exc:
            raise RelayBusy(
                f"The relay is at its limit of upstream connections ({exc}). Try again shortly; "
                "if it persists, tell the relay's operator (server.upstream_max_connections).",
                headers={"retry-after": "1"},
            ) from None
        except ConnectTimeout as exc:
            log.warning("upstream account %s: %s", account, exc)
            raise UpstreamUnavailable(
                f"The upstream account '{account}' could not be reached in time. Try again; if "
                "it persists, tell the relay's operator."
            ) from None
        except ReadTimeout as exc:
            raise UpstreamTimeout(
                f"The upstream account '{account}' did not answer in time "
                f"({redact(str(exc), confidential)})."
            ) from None
        except ProxyError as exc:
            log.warning("upstream account %s: %s", account, exc)
            raise UpstreamUnavailable(
                f"The upstream account '{account}' could not be reached through its proxy: "
                f"{exc.reason}. Tell the relay's operator (the account's proxy setting)."
            ) from None
        except CertificateUntrusted as exc:
            log.warning("upstream account %s: %s", account, exc)
            raise UpstreamUnavailable(
                f"The upstream account '{account}' could not be reached: its TLS certificate "
                f"is not trusted ({exc.reason}). Tell the relay's operator (if the upstream "
                "uses a private CA, its certificate goes in ca_file)."
            ) from None
        except UnsendableRequest as exc:
            raise InvalidRequest(
                f"The request cannot be forwarded upstream: {redact(str(exc), confidential)}. "
                "Check the request's headers."
            ) from None
        except TransportError as exc:
            log.warning("upstream account %s: %s", account, exc)
            raise UpstreamUnavailable(
                f"The upstream account '{account}' could not be reached. "
                "Try again; if it persists, tell the relay's operator."
            ) from None
        del body  # sent: a stream's request is not held for the whole answer
        try:
            if response.status_code >= 300:
                raise await _error_from_response(
                    response, kind, account, confidential, self._max_rest_s
                )
            media_type = response.headers.get("content-type", "").partition(";")[0]
            if media_type.strip().lower() in DOCUMENT_TYPES:
                log.warning(
                    "upstream account %s answered %d with a web page (%s), not an API answer",
                    account, response.status_code, media_type,
                )
                raise UpstreamError(
                    f"The upstream account '{account}' answered with a web page instead of an "
                    "API answer. Try again; if it persists, tell the relay's operator.",
                    code="upstream_invalid_response",
                    type="server_error",
                )
            yield response
        finally:
            await response.aclose()


async def _error_from_response(
    response: Response, kind: str, account: str, confidential: Confidential, max_rest_s: float
) -> UpstreamError:
    """The upstream's error as the client should see it, with a message a user can act on:
    its status and code, its words redacted, and a rest hint of at most ``max_rest_s``."""
    body = b""
    with trio.move_on_after(ERROR_BODY_TIMEOUT_S):  # a stalled error body must not hold failover
        try:
            async for chunk in response:
                body += chunk
                if len(body) >= ERROR_BODY_LIMIT:
                    break
        except TransportError:
            pass
    upstream_status = response.status_code
    status, payload = translate_error(kind, upstream_status, body)
    error = payload["error"]
    if error["code"] == "upstream_invalid_response":  # the operator may want to see the page
        log.warning(
            "upstream account %s answered %d with no API error (%s): %r",
            account, upstream_status, response.headers.get("content-type", "no content type"),
            redact(body[:200].decode("utf-8", "replace")),
        )
    message, error_type, code, param = redact_all(
        (error["message"], error["type"], error["code"], error["param"]), confidential
    )
    retry_after = retry_after_hint(kind, upstream_status, response.headers, body)
    upstream_rest = retry_after  # as the upstream said (a usage window's reset: hours)
    if retry_after is not None and retry_after > max_rest_s:
        log.warning(
            "upstream account %s asked to rest %.0fs; it rests %gs (server.max_retry_after_s)",
            account, retry_after, max_rest_s,
        )
        retry_after = max_rest_s
    headers = {}
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(round(retry_after * 1000))
    if upstream_status in (401, 403):
        # The upstream refused the relay's own credential: not the client's key's fault.
        message = (
            f"The upstream account '{account}' rejected the relay's credentials "
            f"({upstream_status}). This is a relay configuration problem, not your API key; "
            "tell the operator."
        )
        error_type = "upstream_auth_error"
        code = "upstream_credentials_rejected"
    if status < 400:  # a redirect: nothing a client can follow through the relay
        status = 502
    failure = UpstreamError(
        message or "", status=status, type=error_type, code=code, param=param, headers=headers
    )
    failure.upstream_status = upstream_status
    failure.retry_after_s = retry_after
    failure.upstream_rest_s = upstream_rest
    # A ChatGPT plan's usage windows ride on its 429 too (relay/upstream/chatgpt.py).
    failure.usage_headers = {
        name: value for name, value in response.headers.items() if name.startswith("x-codex-")
    }
    return failure
