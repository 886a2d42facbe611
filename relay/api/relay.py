"""The relay routes: ``POST …/chat/completions``, ``POST …/responses`` (and
``…/responses/compact``) and ``POST …/messages``.

One way through for every request (README, "Architecture"):

authenticate → read and validate the body → resolve the model → [admission → account → upstream
call → relay the answer] → one usage record.

The bracketed part runs in the request's nursery. A sibling task watches the client: if it
disconnects, the nursery is cancelled, which closes the upstream response and releases every slot
on the way out. The upstream call is :func:`.calls.upstream_call`; a stream's relay is
:mod:`.streaming`, a plain answer's is here.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import TYPE_CHECKING

import trio

from ..errors import (
    AuthenticationFailed,
    InsufficientQuota,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    RelayError,
    ShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..guards.admission import KeyLimits, Ticket
from ..ledger.usage import UsageRecord
from ..protocol import compaction
from ..protocol.chatgpt import window_headers
from ..protocol.requests import (
    TOO_DEEP,
    Endpoint,
    decode_json_body,
    parse_request,
)
from ..protocol.sse import StreamMeter, error_event
from ..protocol.translate import (
    response_usage,
    translate_response,
)
from ..upstream import http11
from . import responses_state
from .calls import (
    SHUTDOWN_CUT,
    SHUTDOWN_REFUSAL,
    Call,
    collected_answer,
    too_large,
    upstream_call,
)
from .http import SSE_HEADERS, ClientDisconnected, Request, Responder
from .streaming import relay_stream

if TYPE_CHECKING:
    from ..config import PackageConfig
    from ..ledger.store import KeyRecord
    from ..runtime import Runtime

log = logging.getLogger("relay.api")

#: The usage records' endpoint of a v1 compaction request.
COMPACT_PATH = "responses/compact"


async def handle(
    runtime: Runtime,
    request: Request,
    responder: Responder,
    endpoint: Endpoint,
    *,
    compact: bool = False,
):
    """Serve one relay request end to end; errors before the answer starts become JSON errors.

    While the relay shuts down, new requests are refused with 503; one already running when
    the drain runs out is ended by :meth:`Runtime.cut`: a stream gets an error event in its
    protocol (a Chat stream then ``[DONE]``), code ``relay_shutdown``, and keeps status 200 in
    its usage record with ``error_code = "relay_shutdown"``, billed for what it produced; a
    request whose answer had not begun gets a 503 and a usage row with status 503.
    """
    if runtime.shutting_down:
        raise ShuttingDown(SHUTDOWN_REFUSAL)
    runtime.active_requests += 1
    try:
        await _handle(runtime, request, responder, endpoint, compact)
    finally:
        runtime.active_requests -= 1


async def chat(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``POST {base}/chat/completions``."""
    await handle(runtime, request, responder, Endpoint.CHAT)


async def responses(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``POST {base}/responses``."""
    await handle(runtime, request, responder, Endpoint.RESPONSES)


async def responses_compact(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``POST {base}/responses/compact``: remote compaction of a conversation, not streamed
    (protocols.md §2.10; relay/protocol/compaction.py says how each upstream kind serves it)."""
    await handle(runtime, request, responder, Endpoint.RESPONSES, compact=True)


async def messages(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``POST {base}/messages``: Anthropic's Messages API (Claude Code, the anthropic SDKs).
    The query string (Claude Code's ``?beta=true``) plays no part in routing."""
    await handle(runtime, request, responder, Endpoint.MESSAGES)


async def count_tokens(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``POST {base}/messages/count_tokens``: ``{"input_tokens": N}`` for a Messages body.

    The count is the relay's estimate (the one its guards reserve by: characters / 4), not a
    tokenizer's: the relay serves the model from upstreams of several kinds, most of which have
    no counting endpoint. It is free, leaves no usage record and uses no slot; the key must be
    valid and the model one its package may use (404 otherwise, as for a real request)."""
    key = await runtime.keys.authenticate(request.headers)
    request.key_id = key.id
    package = _package_of(runtime, key)
    request.require_json()
    raw = await request.read_body(runtime.config.server.max_body_bytes)
    try:
        body = decode_json_body(raw)
        if body.get("max_tokens") is None:
            body = {**body, "max_tokens": 1}  # count_tokens bodies have none
        client = parse_request(Endpoint.MESSAGES, body, request.headers)
    except RecursionError:
        raise InvalidRequest(TOO_DEEP) from None
    runtime.catalog.resolve(package, client.model)
    await responder.json(200, {"input_tokens": client.estimated_input_tokens})


async def _handle(
    runtime: Runtime, request: Request, responder: Responder, endpoint: Endpoint, compact: bool
):
    started = trio.current_time()
    try:
        key = await runtime.keys.authenticate(request.headers)
    except AuthenticationFailed as error:
        if endpoint is Endpoint.RESPONSES and _from_codex(request):
            raise _final_for_codex(error) from None
        if endpoint is Endpoint.MESSAGES and _from_claude_code(request):
            raise _final_for_claude_code(error) from None
        raise
    # Every request past authentication leaves one record, whatever it is refused for.
    record = UsageRecord(
        request_id=request.request_id,
        key_id=key.id,
        package=key.package,
        endpoint=COMPACT_PATH if compact else endpoint.value,
        model="",
    )
    request.key_id, request.usage = key.id, record
    call: Call | None = None
    try:
        package = _package_of(runtime, key)
        request.require_json()
        try:
            raw = await request.read_body(runtime.config.server.max_body_bytes)
        except ClientDisconnected:
            record.status, record.client_disconnected = 499, True
            raise
        try:
            client = parse_request(endpoint, decode_json_body(raw), request.headers)
        except RecursionError:  # parsed, but too deep to measure
            raise InvalidRequest(TOO_DEEP) from None
        del raw  # parsed: not held for the rest of the request
        if endpoint is Endpoint.RESPONSES:
            client.compaction = compaction.form_of(client.body, compact_route=compact)
            if compact:
                client.stream = False  # answered in one piece, as OpenAI answers it
        if client.session_key:
            # Sessions are the key's own: no key can steer another key's session's account.
            client.session_key = f"{key.id}:{client.session_key}"
        record.model = client.model
        record.stream = client.stream
        route = runtime.catalog.resolve(package, client.model)
        record.upstream_model = route.target
        candidates = runtime.scheduler.candidates(route, endpoint.upstream_kind)
        call = Call(
            runtime=runtime,
            request=request,
            responder=responder,
            client=client,
            route=route,
            ticket=Ticket(
                key_id=key.id,
                pool=route.pool,
                estimated_tokens=client.estimated_tokens,
                limits=KeyLimits.of(package, key.limits),
                limits_read_at=started,  # the key was looked up just after
                input_tokens=client.estimated_input_tokens,
                max_output_tokens=client.max_output_tokens,
            ),
            candidates=candidates,
            record=record,
            started=started,
            choices=_choices(client.body),
        )
        if endpoint is Endpoint.RESPONSES:
            await responses_state.prepare(call)  # earlier turns it refers to, and keeping it
        # Input no upstream could take is refused before it waits in a queue.
        call.upstream_request(candidates[0])
        responder.header_hook = functools.partial(_rate_limit_headers, call)
        runtime.drains.add(call.drain)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, call, nursery.cancel_scope)
            try:
                # 402 before admission and any upstream call; the estimate stays held until
                # the usage record is charged (inside this block on every path that costs).
                async with runtime.credits.hold(
                    key,
                    record,
                    input_tokens=client.estimated_input_tokens,
                    output_tokens=client.estimated_tokens - client.estimated_input_tokens,
                ):
                    if client.stream:
                        await relay_stream(call)
                    else:
                        await _relay_once(call)
            except RelayError as error:
                record.status = error.status
                record.error_code = error.code or error.type
                if not responder.started:
                    if isinstance(error, RateLimited | InsufficientQuota) and (
                        _wants_stream_failure(call)
                    ):
                        record.status = 200
                        await _codex_stream_failure(call, error)
                    else:
                        await responder.error(error)
            finally:
                nursery.cancel_scope.cancel()
    except RelayError as error:
        record.status = error.status
        record.error_code = error.code or error.type
        raise
    except Exception:
        # A bug: the route's last resort answers 500 (if nothing was answered yet); the row
        # says what the client got.
        if not responder.started:
            record.status = 500
            record.error_code = "server_error"
        raise
    finally:
        if not record.status and responder.started:
            record.status = responder.status
        if call is None:
            record.latency_ms = (trio.current_time() - started) * 1000
            runtime.usage.record(record)
        else:
            if not responder.started and record.client_disconnected:
                record.status = 499  # nginx's "client closed request": nothing was answered
            runtime.drains.discard(call.drain)
            call.commit()
            # The hook holds the call, which holds the responder: without this the whole
            # request (~40 objects) would wait as a reference cycle for the garbage collector.
            responder.header_hook = None


def _package_of(runtime: Runtime, key: KeyRecord) -> PackageConfig:
    """The key's package, or 403 ``package_not_found`` if the relay no longer offers it."""
    package = runtime.config.packages.get(key.package)
    if package is None:
        raise PermissionDenied(
            f"Your key belongs to package '{key.package}', which this relay no longer "
            "offers. Ask the operator for a new key.",
            code="package_not_found",
        )
    return package


def _choices(body: dict) -> int:
    """Chat's ``n`` when it is a sane integer, else 1 (the upstream refuses the rest)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1


def _rate_limit_headers(call: Call) -> list[tuple[bytes, bytes]]:
    """The key's ``x-ratelimit-*`` state (OpenAI's header names) and the time spent queued."""
    headers = [(b"x-relay-queue-ms", b"%d" % round(call.record.queue_ms))]
    for name, value in call.runtime.admission.key_rate_state(call.ticket).items():
        text = _duration(value) if name.startswith("reset-") else str(int(value))
        headers.append((b"x-ratelimit-" + name.encode(), text.encode()))
    account = call.runtime.scheduler.by_name.get(call.record.account)
    if account is not None and account.oauth is not None:
        # A ChatGPT-plan account's usage windows, as its backend reported them with this answer.
        headers.extend(window_headers(account.oauth.windows))
    return headers


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def _from_codex(request: Request) -> bool:
    """The Codex CLI sends ``originator: codex_…`` (and a ``codex…`` User-Agent)."""
    originator = request.headers.get("originator", "").lower()
    agent = request.headers.get("user-agent", "").lower()
    return originator.startswith("codex") or agent.startswith("codex")


def _final_for_codex(error: AuthenticationFailed) -> InvalidRequest:
    """A key the relay refuses, answered to the Codex CLI as a 400 with the same message and
    code. Codex re-sends a turn that got a 401 five times when it holds a plain bearer token
    (nothing to refresh), but treats a 400 as final and prints its body (protocols.md §2.6):
    a wrong key is then one request and one clear error instead of six."""
    return InvalidRequest(error.message, code=error.code, param=error.param)


def _from_claude_code(request: Request) -> bool:
    """Claude Code sends ``x-app: cli`` and a ``claude-cli/…`` User-Agent (docs/claude-code.md)."""
    agent = request.headers.get("user-agent", "").lower()
    return request.headers.get("x-app", "").lower() == "cli" or agent.startswith("claude-cli/")


def _final_for_claude_code(error: AuthenticationFailed) -> PermissionDenied:
    """A key the relay refuses, answered to Claude Code as a 403 ``permission_error`` with the
    same message and code. Claude Code retries a 401 with backoff for minutes (still retrying
    after 90 s in print mode) but stops at once on a 403 and prints "Failed to authenticate"
    with the message (docs/claude-code.md): one request and one clear error instead."""
    return PermissionDenied(error.message, code=error.code, param=error.param)


def _wants_stream_failure(call: Call) -> bool:
    """The Codex CLI never retries an HTTP 429 but waits and retries a ``response.failed`` with
    ``rate_limit_exceeded`` and "try again in Ns" (protocols.md §2.6): give it that form."""
    return (
        call.client.endpoint is Endpoint.RESPONSES
        and call.client.stream
        and _from_codex(call.request)
    )


async def _codex_stream_failure(call: Call, error: RateLimited | InsufficientQuota) -> None:
    """A refusal as one ``response.failed``: Codex retries ``rate_limit_exceeded`` after the
    delay in the message and stops at ``insufficient_quota`` (QuotaExceeded) instead of
    re-sending the turn five times, as it would after an HTTP 429 or 402."""
    event = error_event(
        Endpoint.RESPONSES,
        StreamMeter(Endpoint.RESPONSES),
        message=error.message,
        code="rate_limit_exceeded" if isinstance(error, RateLimited) else "insufficient_quota",
        type=error.type,
        fallback_id="resp_" + call.request.request_id.removeprefix("req_"),
    )
    headers = [*SSE_HEADERS, *((k.encode(), v.encode()) for k, v in error.headers.items())]
    await call.responder.start(200, headers)
    await call.responder.end(event)


async def _cancel_on_disconnect(call: Call, scope: trio.CancelScope) -> None:
    await call.request.wait_disconnect()
    if not call.responder.finished:
        call.record.client_disconnected = True
        if not call.record.status:
            call.record.status = call.responder.status or 499
    scope.cancel()


async def _relay_once(call: Call) -> None:
    with call.drain:
        body, content_type = await _answer_once(call)
    if call.drain.cancelled_caught:
        raise ShuttingDown(SHUTDOWN_CUT)
    # Slots and the upstream connection are released before the answer is written: a client
    # that is slow to read it holds nothing shared.
    call.record.status = 200
    call.record.ttft_ms = (trio.current_time() - call.started) * 1000
    call.commit()
    await responses_state.keep(call, call.answer, translated=call.translated)
    await call.responder.raw(200, body, content_type)


async def _answer_once(call: Call) -> tuple[bytes, bytes]:
    """The non-streamed answer for the client, and its content type."""
    async with upstream_call(call, stream=False) as (lease, account, response):
        try:
            body = await response.aread()
        except http11.ReadTimeout:
            raise UpstreamTimeout(
                f"The upstream account '{account.name}' did not finish its answer in time."
            ) from None
        except http11.ResponseTooLarge as exc:
            raise too_large(account.name, exc) from None
        except http11.TransportError as exc:
            log.warning("%s: upstream account %s: %s", call.request.request_id, account.name, exc)
            raise UpstreamUnavailable(
                f"The connection to upstream account '{account.name}' broke before "
                "its answer was complete."
            ) from None
        upstream, _ = call.upstream_request(account)
        kind = account.config.wire
        if account.oauth is not None:  # the ChatGPT backend streams every answer
            body = collected_answer(account.name, body)
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            answer = None
        usage = response_usage(kind, answer) if isinstance(answer, dict) else None
        if usage is None:
            log.warning("upstream answer for %s has no usage", call.request.request_id)
        lease.used_tokens = call.take_usage(usage, carried=len(body))
        lease.output_tokens = call.record.output_tokens if usage else None
        if not isinstance(answer, dict):
            # Relayed or not, the client gets JSON: never the upstream's text or its type.
            raise UpstreamError(
                f"The upstream account '{account.name}' answered with something other than a "
                "JSON object. Try again; if it persists, tell the relay's operator.",
                type="server_error",
                code="upstream_invalid_response",
            )
        if not upstream.context.passthrough:
            answer = translate_response(kind, upstream.context, answer)
            body = json.dumps(answer).encode()
        if call.keep_answer:
            call.answer, call.translated = answer, not upstream.context.passthrough
    return body, b"application/json"


