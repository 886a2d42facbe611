"""The one HTTP client the relay uses to reach upstream accounts.

httpx2 over HTTP/1.1 (stack-notes): its pool stays cheap with hundreds of open streams, and
closing an HTTP/1.1 response closes the socket, so the upstream sees a cancelled request at once.
Every response is owned by an ``async with`` so a cancelled request can never leave a pool slot
behind. Transport failures become :mod:`relay.errors` exceptions here, and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx2

from ..config import ServerConfig
from ..errors import RelayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable

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

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def post(
        self,
        url: str,
        body: bytes,
        *,
        api_key: str | None,
        client_headers: Mapping[str, str],
        stream: bool,
        account: str,
    ) -> AsyncIterator[httpx2.Response]:
        """POST ``body`` and yield the open response once it answered 2xx.

        A non-2xx answer is raised as a :class:`RelayError` with the upstream's status, before
        the caller sends anything to its client.
        """
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if stream:
            headers["accept"] = "text/event-stream"
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        for name in FORWARDED_HEADERS:
            value = client_headers.get(name)
            if value is not None:
                headers[name] = value
        request = self._client.build_request("POST", url, content=body, headers=headers)
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
                raise await _error_from_response(response, account)
            yield response
        except httpx2.TimeoutException as exc:
            raise _timeout(exc, account) from None
        finally:
            await response.aclose()


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _timeout(exc: httpx2.TimeoutException, account: str) -> RelayError:
    if isinstance(exc, httpx2.ConnectTimeout | httpx2.PoolTimeout):
        return UpstreamUnavailable(
            f"The upstream account '{account}' could not be reached in time ({_describe(exc)})."
        )
    return UpstreamTimeout(f"The upstream account '{account}' did not answer in time.")


async def _error_from_response(response: httpx2.Response, account: str) -> RelayError:
    """The upstream's error status and OpenAI error fields, with a message a user can act on."""
    body = b""
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) >= ERROR_BODY_LIMIT:
                break
    except httpx2.HTTPError:
        pass
    status = response.status_code
    upstream_message, error_type, code, param = "", None, None, None
    try:
        payload = json.loads(body)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            upstream_message = str(error.get("message") or "")
            error_type = error.get("type") if isinstance(error.get("type"), str) else None
            code = error.get("code") if isinstance(error.get("code"), str) else None
            param = error.get("param") if isinstance(error.get("param"), str) else None
        elif isinstance(error, str):
            upstream_message = error
    except ValueError:
        upstream_message = body[:500].decode("utf-8", "replace").strip()
    headers = {}
    for name in ("retry-after", "retry-after-ms"):
        if name in response.headers:
            headers[name] = response.headers[name]
    if status in (401, 403):
        # The upstream refused the relay's own credential: not the client's key's fault.
        message = (
            f"The upstream account '{account}' rejected the relay's credentials ({status}). "
            "This is a relay configuration problem, not your API key; tell the operator."
        )
        error_type = "upstream_auth_error"
        code = "upstream_credentials_rejected"
    else:
        message = upstream_message or f"The upstream answered HTTP {status}."
        if error_type is None:
            error_type = _default_type(status)
    if status < 400:  # a redirect: nothing a client can follow through the relay
        status = 502
    return UpstreamError(
        message, status=status, type=error_type, code=code, param=param, headers=headers
    )


def _default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"
