"""The relay routes: ``POST …/chat/completions``, ``POST …/responses`` and ``POST …/messages``.

One way through for every request (README, "Architecture"):

authenticate → read and validate the body → resolve the model → [admission → account → upstream
call → relay the answer] → one usage record.

The bracketed part runs in the request's nursery. A sibling task watches the client: if it
disconnects, the nursery is cancelled, which closes the upstream response and releases every slot
on the way out. Streams are split in two tasks: the *pump* owns the slots and the upstream
response and feeds events into a small channel; the request task writes them to the client. If the
client stops reading (its socket full, hypercorn's shielded write blocked), a watchdog cancels the
pump after ``stall_timeout_s``: the upstream and the slots are released even though the write to
the dead reader cannot be interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import (
    AuthenticationFailed,
    InsufficientQuota,
    InvalidRequest,
    NoHealthyAccount,
    PermissionDenied,
    RateLimited,
    RelayError,
    SharedStateUnavailable,
    ShuttingDown,
    UpstreamError,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..guards.admission import AdmissionRefused, KeyLimits, Lease, Ticket
from ..ledger.usage import UsageRecord
from ..protocol.requests import (
    TOO_DEEP,
    ClientRequest,
    Endpoint,
    decode_json_body,
    parse_request,
    unsendable_body,
)
from ..protocol.sse import EventTooLarge, StreamMeter, Usage, error_event
from ..protocol.translate import (
    StreamTranslator,
    UpstreamRequest,
    build_upstream_request,
    response_usage,
    translate_response,
)
from ..protocol.trust import Confidential, bound_usage
from ..upstream import http11
from ..upstream.health import is_account_failure
from ..upstream.routing import Account, ModelRoute
from .http import SSE_HEADERS, ClientDisconnected, Request, Responder

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("relay.api")

#: Relayed chunks buffered between the pump and the client writer. Small: the buffer only
#: smooths scheduling; a slow client should push back on the upstream, not fill memory.
STREAM_BUFFER = 16

SHUTDOWN_REFUSAL = "The relay is shutting down and takes no new requests; retry it."
SHUTDOWN_CUT = (
    "The relay is shutting down and ended this request before its answer was complete; "
    "retry it."
)


@dataclass
class Call:
    """Everything about one relayed request that its parts share."""

    runtime: Runtime
    request: Request
    responder: Responder
    client: ClientRequest
    route: ModelRoute
    ticket: Ticket
    candidates: list[Account]
    record: UsageRecord
    started: float
    recorded: bool = False
    #: The upstream request built for each account tried (its protocol decides the body).
    prepared: dict[str, tuple[UpstreamRequest, bytes]] = dataclasses.field(default_factory=dict)
    #: The running stream's translator, once an account answered (keep-alives come from it).
    translator: StreamTranslator | None = None
    #: Cancelled by the runtime when the relay's drain runs out (Runtime.cut): wraps the
    #: request's wait for admission, its upstream call and the relay of its answer.
    drain: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    #: Answers the request asks for (Chat's ``n``): each may use the whole output allowance.
    choices: int = 1

    def upstream_request(self, account: Account) -> tuple[UpstreamRequest, bytes]:
        """What to send ``account``, in its protocol, and the body's bytes (built once).

        Raises :class:`~relay.errors.InvalidRequest` for input that account cannot be given
        (files other than images and PDFs; when translating, fields with no counterpart).
        """
        prepared = self.prepared.get(account.name)
        if prepared is None:
            try:
                request = build_upstream_request(
                    self.client.body,
                    self.client.endpoint,
                    account.config.provider,
                    model=self.route.target,
                    api_key=account.config.api_key(),
                    reasoning_effort=self.route.reasoning_effort,
                )
                # allow_nan=False: 1e999 parses as inf, which is not JSON. A lone surrogate
                # fails the encode: the upstream never gets invalid UTF-8.
                body = json.dumps(
                    request.body, ensure_ascii=False, allow_nan=False, separators=(",", ":")
                ).encode()
            except (UnicodeEncodeError, ValueError, RecursionError) as error:
                raise unsendable_body(self.client.body, error) from None
            prepared = self.prepared[account.name] = (request, body)
        return prepared

    def drop_bodies(self, account: Account) -> None:
        """``account`` answered, so no other account will be tried: let go of the request's
        bodies (the client's parsed JSON, and each encoded upstream body). A stream would hold
        them, about three times the request's size (agents resend whole conversations), for as
        long as it runs. What :meth:`upstream_request` returns for ``account`` from now on keeps
        its path, headers and context, which is all the answer's side reads."""
        upstream, _ = self.upstream_request(account)
        upstream.body = {}
        self.prepared = {account.name: (upstream, b"")}
        self.client.body = {}

    def commit(self) -> None:
        """Write the usage record: exactly once, never blocking (safe while cancelled)."""
        if self.recorded:
            return
        self.recorded = True
        self.record.latency_ms = (trio.current_time() - self.started) * 1000
        self.runtime.usage.record(self.record)

    def take_usage(self, usage: Usage | None, produced: int = 0, carried: int = 0) -> int:
        """Record what the request cost; returns its total tokens (for the guards).

        The upstream's ``usage`` is recorded within :func:`~relay.protocol.trust.bound_usage`'s
        bounds (``carried``: the bytes of its answer); a report outside them is logged, one
        line, and recorded as bounded.
        """
        record = self.record
        if usage is not None:
            usage, problem = bound_usage(
                usage,
                carried_bytes=carried,
                max_output_tokens=self.client.max_output_tokens,
                choices=self.choices,
            )
            if problem:
                log.warning(
                    "%s: upstream account %s reported implausible usage (%s); billed as "
                    "%d input, %d output tokens",
                    self.request.request_id, record.account, problem,
                    usage.input_tokens, usage.output_tokens,
                )
            record.input_tokens = usage.input_tokens
            record.cached_tokens = usage.cached_tokens
            record.cache_write_tokens = usage.cache_write_tokens
            record.output_tokens = usage.output_tokens
            record.reasoning_tokens = usage.reasoning_tokens
            record.usage_source = "upstream"
        else:
            # Cut short before the upstream reported usage: bill the estimate of the input and
            # what was produced (one token per streamed delta, the upstreams' usual granularity).
            record.input_tokens = self.client.estimated_input_tokens
            record.output_tokens = produced
            record.usage_source = "estimate"
        return record.input_tokens + record.output_tokens


async def handle(runtime: Runtime, request: Request, responder: Responder, endpoint: Endpoint):
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
        await _handle(runtime, request, responder, endpoint)
    finally:
        runtime.active_requests -= 1


async def chat(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``POST {base}/chat/completions``."""
    await handle(runtime, request, responder, Endpoint.CHAT)


async def responses(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``POST {base}/responses``."""
    await handle(runtime, request, responder, Endpoint.RESPONSES)


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
    package = runtime.config.packages.get(key.package)
    if package is None:
        raise PermissionDenied(
            f"Your key belongs to package '{key.package}', which this relay no longer "
            "offers. Ask the operator for a new key.",
            code="package_not_found",
        )
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


async def _handle(runtime: Runtime, request: Request, responder: Responder, endpoint: Endpoint):
    started = trio.current_time()
    try:
        key = await runtime.keys.authenticate(request.headers)
    except AuthenticationFailed as error:
        if endpoint is Endpoint.RESPONSES and _from_codex(request):
            raise _final_for_codex(error) from None
        raise
    # Every request past authentication leaves one record, whatever it is refused for.
    record = UsageRecord(
        request_id=request.request_id,
        key_id=key.id,
        package=key.package,
        endpoint=endpoint.value,
        model="",
    )
    request.key_id, request.usage = key.id, record
    call: Call | None = None
    try:
        package = runtime.config.packages.get(key.package)
        if package is None:
            raise PermissionDenied(
                f"Your key belongs to package '{key.package}', which this relay no longer "
                "offers. Ask the operator for a new key.",
                code="package_not_found",
            )
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
                        await _relay_stream(call)
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


@asynccontextmanager
async def _upstream_call(
    call: Call, *, stream: bool
) -> AsyncIterator[tuple[Lease, Account, http11.Response]]:
    """Admission, an account, and its upstream response, held for the caller's block.

    While nothing has reached the client, an attempt that fails in a way another account might
    not (connect error, 429, 5xx, 401/403) marks the account's health and is retried on another
    account of the request's candidates, up to ``failover_attempts``. A sticky session prefers
    its bound account and is (re)bound to the account that served it.

    The caller sets ``lease.used_tokens`` before leaving the block, so the guards reconcile
    their reservation to what the request really cost.
    """
    runtime, record = call.runtime, call.record
    scheduler = runtime.scheduler
    tried: set[str] = set()
    failure: RelayError | None = None
    shared = runtime.admission.shared
    session = call.client.session_key
    if shared is not None and session:
        # Bound by another process? Then this one follows that binding.
        bound = await shared.session_account(call.route.pool, session)
        if bound is not None:
            scheduler.sessions.adopt(call.route.pool, session, bound, trio.current_time())
    for _ in range(runtime.config.server.failover_attempts):
        accounts = [a for a in call.candidates if a.name not in tried and not a.guard.disabled]
        if not accounts:
            break
        ticket = dataclasses.replace(
            call.ticket,
            accounts=[account.guard for account in accounts],
            preferred=_bound_guard(call, accounts),
        )
        stack = AsyncExitStack()
        try:
            lease = await stack.enter_async_context(runtime.admission.enter(ticket))
        except AdmissionRefused as refused:
            if refused.reason == "shutting_down":
                raise ShuttingDown(refused.message) from None
            if refused.reason == "shared_unavailable":
                raise SharedStateUnavailable(refused.message) from None
            raise RateLimited(refused) from None
        account = scheduler.by_name[lease.account.name]
        record.queue_ms += lease.queued_s * 1000
        record.account = account.name
        lease.used_tokens = 0  # until the upstream answers, nothing was used
        try:
            upstream, payload = call.upstream_request(account)
            response = await stack.enter_async_context(
                runtime.upstream.post(
                    f"{account.config.base_url}/{upstream.path}",
                    payload,
                    kind=account.config.provider,
                    headers=upstream.headers,
                    client_headers=call.request.headers,
                    stream=stream,
                    account=account.name,
                )
            )
        except RelayError as error:
            await stack.aclose()
            if not is_account_failure(error):
                raise
            runtime.health.failed(account, error)
            tried.add(account.name)
            failure = error
            continue
        except BaseException:
            await stack.aclose()
            raise
        runtime.health.succeeded(account)
        del payload  # see drop_bodies
        call.drop_bodies(account)
        if session:
            scheduler.sessions.bind(call.route.pool, session, account.name, trio.current_time())
            if shared is not None:
                shared.bind_session(
                    call.route.pool, session, account.name, runtime.config.server.session_ttl_s
                )
        async with stack:
            yield lease, account, response
        return
    if failure is None:
        raise NoHealthyAccount(
            f"No upstream account can serve '{call.route.requested}' right now: every account "
            "for it is out of service. Tell the relay's operator."
        )
    try:
        raise failure
    finally:
        failure = None  # its traceback holds this frame: no reference cycle (see _relay_stream)


def _bound_guard(call: Call, accounts: list[Account]):
    """The guard of the account the request's session is bound to, if it is a candidate."""
    session = call.client.session_key
    if not session:
        return None
    name = call.runtime.scheduler.sessions.account_for(
        call.route.pool, session, trio.current_time()
    )
    for account in accounts:
        if account.name == name:
            return account.guard
    return None


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
    await call.responder.raw(200, body, content_type)


async def _answer_once(call: Call) -> tuple[bytes, bytes]:
    """The non-streamed answer for the client, and its content type."""
    async with _upstream_call(call, stream=False) as (lease, account, response):
        try:
            body = await response.aread()
        except http11.ReadTimeout:
            raise UpstreamTimeout(
                f"The upstream account '{account.name}' did not finish its answer in time."
            ) from None
        except http11.ResponseTooLarge as exc:
            raise _too_large(account.name, exc) from None
        except http11.TransportError as exc:
            log.warning("%s: upstream account %s: %s", call.request.request_id, account.name, exc)
            raise UpstreamUnavailable(
                f"The connection to upstream account '{account.name}' broke before "
                "its answer was complete."
            ) from None
        upstream, _ = call.upstream_request(account)
        kind = account.config.provider
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
            body = json.dumps(translate_response(kind, upstream.context, answer)).encode()
    return body, b"application/json"


class _ClientWriter:
    """Writes relayed bytes to the client and notes the times the stream's watcher needs: since
    when the current write has been going on (``writing_since``) and when the last one ended
    (``quiet_since``; None until the first write)."""

    __slots__ = ("call", "quiet_since", "writing_since")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.writing_since: float | None = None
        self.quiet_since: float | None = None

    async def write(self, data: bytes) -> None:
        self.writing_since = trio.current_time()
        if self.call.record.ttft_ms is None:
            self.call.record.ttft_ms = (self.writing_since - self.call.started) * 1000
        await self.call.responder.body(data)
        self.writing_since = None
        self.quiet_since = trio.current_time()


class _UpstreamWatch:
    """How the stream's watcher sees an upstream fall silent mid-answer, with no timeout per
    read: the pump notes when it last heard from the upstream (``heard_at``; None while it is
    not waiting on it: before the answer, or held up by a slow client), and the watcher cancels
    ``reading``, the pump's reading of the answer, once that is longer ago than ``timeout_s``
    (the pool's read timeout, which the pump's reads then do without)."""

    __slots__ = ("heard_at", "reading", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.heard_at: float | None = None
        self.reading = trio.CancelScope()


async def _relay_stream(call: Call) -> None:
    send_channel, receive_channel = trio.open_memory_channel[bytes | RelayError](STREAM_BUFFER)
    writer = _ClientWriter(call)
    upstream = _UpstreamWatch(call.runtime.config.server.upstream_read_timeout_s)
    pump_scope = trio.CancelScope()
    failure: RelayError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, call, send_channel, pump_scope, upstream)
        nursery.start_soon(_watch_stream, call, writer, upstream, send_channel, pump_scope)
        try:
            async with receive_channel:
                first = await _first_message(receive_channel)
                if isinstance(first, RelayError):
                    failure = first  # raised below: inside the nursery it would be grouped
                else:
                    await call.responder.start(200, SSE_HEADERS)
                    await writer.write(first)
                    async for data in receive_channel:  # keep-alives included
                        await writer.write(_with_backlog(data, receive_channel))
                    await call.responder.end()
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        try:
            raise failure
        finally:
            # The error's traceback holds this frame; a local still naming the error would
            # make a cycle that keeps the whole request for the garbage collector.
            failure = first = None


def _with_backlog(data: bytes, channel: trio.MemoryReceiveChannel) -> bytes:
    """``data`` and whatever else is already waiting, as one write: when the client side falls
    behind, fewer and larger writes let it catch up instead of paying per event."""
    parts = [data]
    while True:
        try:
            parts.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return data if len(parts) == 1 else b"".join(parts)


async def _first_message(channel: trio.MemoryReceiveChannel) -> bytes | RelayError:
    try:
        return await channel.receive()
    except trio.EndOfChannel:
        # The pump ended without a word: only possible if it was cancelled by the watchdog,
        # which cannot happen before the first write. Treat as an internal failure.
        return UpstreamUnavailable("The upstream ended the request without an answer.")


async def _watch_stream(
    call: Call,
    writer: _ClientWriter,
    upstream: _UpstreamWatch,
    out: trio.MemorySendChannel[bytes | RelayError],
    pump_scope: trio.CancelScope,
) -> None:
    """The stream's three timers, in one task that wakes only when one of them is due:

    - keep-alive: after each ``keepalive_event_s`` without a write, once the answer has begun
      (an agent's reasoning upstream may think for minutes; clients and proxies give up on a
      connection that says nothing). It is queued in the pump's channel, and only when that is
      empty and no write is in progress: the pump is then waiting on the upstream, so no event
      it encodes can be ahead of the keep-alive (a translated Responses stream numbers them).
    - stall: a client that accepted no data for ``stall_timeout_s`` gets the pump cancelled,
      which releases the upstream and the slots although the write to it cannot be interrupted.
    - silence: an upstream that sent nothing for ``upstream_read_timeout_s`` in the middle of
      its answer gets the pump's reading cancelled, which ends the stream with an error.

    Why not a timeout around each event's ``receive`` or write: a cancel scope per event was a
    visible share of the per-event CPU with a thousand streams; here the writer and the pump
    only note the time.
    """
    server = call.runtime.config.server
    stall, interval = server.stall_timeout_s, server.keepalive_event_s
    read_timeout = upstream.timeout_s
    poll = max(stall / 4, 0.05)
    while True:
        now = trio.current_time()
        heard = upstream.heard_at
        if heard is not None and now - heard > read_timeout:
            upstream.heard_at = heard = None
            upstream.reading.cancel()
        since = writer.writing_since
        if since is not None and now - since > stall:
            log.info("%s: client accepted no data for %.0fs", call.request.request_id, stall)
            call.record.error_code = "client_stalled"
            pump_scope.cancel()
            return
        wake = now + poll
        quiet = writer.quiet_since
        if quiet is None:  # the answer has not begun: look again in an interval
            wake = min(wake, now + interval)
        elif since is None:
            if now - quiet >= interval:
                _queue_keepalive(call, out)
                writer.quiet_since = quiet = now
            wake = min(wake, quiet + interval)
        # Not waiting on the upstream now, the pump may be soon: look again within a timeout.
        wake = min(wake, (now if heard is None else heard) + read_timeout)
        await trio.sleep_until(wake)


def _queue_keepalive(call: Call, out: trio.MemorySendChannel[bytes | RelayError]) -> None:
    """Queue the translator's keep-alive if nothing is waiting to be written (no checkpoint
    between the check and the queueing, so the pump cannot slip an event in between)."""
    if call.translator is None or out.statistics().current_buffer_used:
        return
    keepalive = call.translator.keepalive()
    if keepalive:
        try:
            out.send_nowait(keepalive)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the pump has finished: the stream is ending anyway


async def _pump(
    call: Call,
    out: trio.MemorySendChannel[bytes | RelayError],
    scope: trio.CancelScope,
    watch: _UpstreamWatch,
) -> None:
    """Own the slots and the upstream stream; feed the client's bytes into ``out``."""
    record = call.record
    translator: StreamTranslator | None = None
    async with out:
        with scope:
            try:
                with call.drain:
                    async with _upstream_call(call, stream=True) as (lease, account, response):
                        record.status = 200
                        upstream, _ = call.upstream_request(account)
                        translator = call.translator = StreamTranslator(
                            account.config.provider,
                            upstream.context,
                            Confidential.of_call(
                                f"{account.config.base_url}/{upstream.path}", upstream.headers
                            ),
                            max_event_bytes=call.runtime.config.server.upstream_max_event_bytes,
                        )
                        try:
                            await _relay_events(
                                response, translator, out, lease, account.name, watch
                            )
                        finally:
                            usage = translator.usage
                            lease.used_tokens = call.take_usage(
                                usage, translator.deltas, translator.received
                            )
                            lease.output_tokens = record.output_tokens if usage else None
                if call.drain.cancelled_caught:
                    raise ShuttingDown(SHUTDOWN_CUT)
            except RelayError as error:
                record.status = record.status or error.status
                record.error_code = error.code or error.type
                if translator is not None:
                    data = translator.fail(error.message, error.code or "server_error")
                    if isinstance(error, ShuttingDown) and call.client.endpoint is Endpoint.CHAT:
                        data += b"data: [DONE]\n\n"  # the stream is over: say so, as OpenAI does
                    await out.send(data)
                else:
                    await out.send(error)
            finally:
                call.commit()


async def _relay_events(
    response: http11.Response,
    translator: StreamTranslator,
    out: trio.MemorySendChannel[bytes | RelayError],
    lease: Lease,
    account: str,
    watch: _UpstreamWatch,
) -> None:
    response.timed_reads = False  # the stream's watcher times the upstream's silence
    late = b""
    try:
        with watch.reading:
            watch.heard_at = trio.current_time()
            async for chunk in response:
                watch.heard_at = trio.current_time()
                data = translator.feed(chunk)
                lease.produced(translator.deltas)  # the guards charge the output as it is served
                if data:
                    try:
                        # No checkpoint when there is room: the upstream read just made one,
                        # and send() would reschedule the pump once more for every event.
                        out.send_nowait(data)
                    except trio.WouldBlock:
                        if watch.reading.cancel_called:
                            # The watcher gave up on the upstream as this arrived: the bytes
                            # are the client's still (and billed), so send them outside.
                            late = data
                            break
                        watch.heard_at = None  # not waiting on the upstream meanwhile
                        await out.send(data)  # the client is behind: wait for it
                        watch.heard_at = trio.current_time()
            watch.heard_at = None
    except EventTooLarge as exc:
        raise _too_large(account, exc) from None
    except http11.TransportError as exc:
        log.warning("upstream account %s broke off its answer: %s", account, exc)
        raise UpstreamUnavailable(
            f"The connection to upstream account '{account}' broke in the middle of the "
            "answer. Try again; if it persists, tell the relay's operator."
        ) from None
    if late:
        await out.send(late)
    if late or watch.reading.cancelled_caught:
        raise UpstreamTimeout(
            f"The upstream account '{account}' went silent in the middle of the answer "
            f"(nothing for {watch.timeout_s:g}s)."
        )
    data = translator.flush()
    if not translator.finished:
        if data:
            await out.send(data)
        raise UpstreamUnavailable(
            f"The upstream account '{account}' ended the stream before the answer was complete."
        )
    data += translator.finish()
    if data:
        await out.send(data)


def _too_large(account: str, exc: Exception) -> UpstreamResponseTooLarge:
    return UpstreamResponseTooLarge(
        f"The upstream account '{account}' sent more than the relay accepts ({exc}), so its "
        "answer was not relayed. Ask for a shorter answer; if it persists, tell the relay's "
        "operator."
    )
