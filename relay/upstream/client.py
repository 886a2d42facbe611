"""The one HTTP client the relay uses to reach upstream accounts.

httpx2 over HTTP/1.1 (stack-notes): its pool stays cheap with hundreds of open streams, and
closing an HTTP/1.1 response closes the socket, so the upstream sees a cancelled request at once.
Every response is owned by an ``async with`` so a cancelled request can never leave a pool slot
behind. Transport failures become :mod:`relay.errors` exceptions here, and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx2

from ..config import ServerConfig
from ..errors import RelayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from ..protocol.translate import retry_after_hint, translate_error

#: Provider kinds that speak OpenAI's protocols and get the client's conversation headers.
OPENAI_KINDS = ("openai-chat", "openai-responses")

#: Idle upstream connections are kept this long (real APIs keep theirs for 60 s or more).
KEEPALIVE_EXPIRY_S = 90.0

#: How much of an upstream error body is read to build the client's error message.
ERROR_BODY_LIMIT = 64 * 1024

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
)


class UpstreamClient:
    def __init__(self, server: ServerConfig) -> None:
        self._client = httpx2.AsyncClient(
            http1=True,
            http2=False,
            timeout=httpx2.Timeout(
                connect=server.upstream_connect_timeout_s,
                read=server.upstream_read_timeout_s,
                write=server.upstream_read_timeout_s,
                pool=server.upstream_connect_timeout_s,
            ),
            limits=httpx2.Limits(
                max_connections=server.upstream_max_connections,
                max_keepalive_connections=min(server.upstream_max_connections, 200),
                # httpx's 5 s default would redo TCP+TLS for every agent turn after a pause.
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            follow_redirects=False,
            trust_env=False,
        )
        # build_request takes 38 us with a URL string and 22 us with a parsed URL; the relay
        # calls a few URLs (accounts' base URLs and paths, from the config): parse each once.
        self._urls: dict[str, httpx2.URL] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

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
    ) -> AsyncIterator[httpx2.Response]:
        """POST ``body`` to an upstream of provider ``kind`` and yield the open response once it
        answered 2xx.

        ``headers`` are the upstream's own (authentication, API version). A non-2xx answer is
        raised as a :class:`UpstreamError` with the status and OpenAI error fields the client
        should see (translated from Anthropic's or Gemini's error shapes) and the cool-down the
        upstream asked for, before the caller sends anything to its client.
        """
        sent = {
            "content-type": "application/json",
            "content-length": str(len(body)),  # httpx2 sends a body stream chunked otherwise
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
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = httpx2.URL(url)
        request = self._client.build_request("POST", parsed, content=_Once(body), headers=sent)
        del body  # only the stream holds it now, until it is sent
        try:
            response = await self._client.send(request, stream=True)
        except httpx2.TimeoutException as exc:
            raise _timeout(exc, account) from None
        except httpx2.TransportError as exc:
            raise UpstreamUnavailable(
                f"The upstream account '{account}' could not be reached ({_describe(exc)}). "
                "Try again; if it persists, tell the relay's operator."
            ) from None
        try:
            if response.status_code >= 300:
                raise await _error_from_response(response, kind, account)
            yield response
        except httpx2.TimeoutException as exc:
            raise _timeout(exc, account) from None
        finally:
            await response.aclose()


class _Once:
    """``body`` as a one-chunk stream. An httpx2 request keeps the ``content`` it was given for
    as long as its response lives, which for a stream is the whole answer; this one lets go of
    the bytes as soon as they have been handed over for sending (agents' requests are tens to
    hundreds of KiB). A class rather than an async generator: smaller, and not tracked by
    trio's async-generator hooks."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        body, self._body = self._body, None
        if body is None:
            raise StopAsyncIteration
        return body


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _timeout(exc: httpx2.TimeoutException, account: str) -> RelayError:
    if isinstance(exc, httpx2.ConnectTimeout | httpx2.PoolTimeout):
        return UpstreamUnavailable(
            f"The upstream account '{account}' could not be reached in time ({_describe(exc)})."
        )
    return UpstreamTimeout(f"The upstream account '{account}' did not answer in time.")


async def _error_from_response(response: httpx2.Response, kind: str, account: str) -> UpstreamError:
    """The upstream's error as the client should see it, with a message a user can act on."""
    body = b""
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) >= ERROR_BODY_LIMIT:
                break
    except httpx2.HTTPError:
        pass
    upstream_status = response.status_code
    status, payload = translate_error(kind, upstream_status, body)
    error = payload["error"]
    message, error_type, code = error["message"], error["type"], error["code"]
    retry_after = retry_after_hint(kind, upstream_status, response.headers, body)
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
        message, status=status, type=error_type, code=code, param=error["param"], headers=headers
    )
    failure.upstream_status = upstream_status
    failure.retry_after_s = retry_after
    return failure
