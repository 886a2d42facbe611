"""One relayed request's shared state (:class:`Call`) and its way to an upstream answer
(:func:`upstream_call`: admission, an account, the upstream response, with failover).

Both endpoints' relays, the plain answer (:mod:`.relay`) and the stream (:mod:`.streaming`),
take their upstream answer from here; nothing here writes to the client.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import (
    NoHealthyAccount,
    RateLimited,
    RelayError,
    SharedStateUnavailable,
    ShuttingDown,
    UpstreamResponseTooLarge,
)
from ..guards.admission import AdmissionRefused, Lease, Ticket
from ..ledger.usage import UsageRecord
from ..protocol.requests import (
    ClientRequest,
    unsendable_body,
)
from ..protocol.sse import Usage
from ..protocol.state import Found, expand
from ..protocol.translate import (
    StreamTranslator,
    UpstreamRequest,
    build_upstream_request,
)
from ..protocol.trust import bound_usage
from ..upstream import http11
from ..upstream.health import is_account_failure
from ..upstream.routing import Account, ModelRoute
from .http import Request, Responder

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("relay.api")

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
    #: A Messages stream the relay opened itself while the request waited (see _watch_stream).
    opened: bool = False
    #: Responses state (.responses_state): what the relay holds of the earlier turns the body
    #: refers to (None: it refers to none), whether the answer is kept, and the whole
    #: conversation it answers (kept with it).
    found: Found | None = None
    keep_answer: bool = False
    conversation: list[dict] | None = None
    #: A plain answer's Response object for keeping, and whether the relay translated it.
    answer: dict | None = None
    translated: bool = False

    @property
    def response_id(self) -> str:
        """The id the relay gives the answer when it must name it before the upstream does."""
        return "resp_" + self.request.request_id.removeprefix("req_")

    def upstream_request(self, account: Account) -> tuple[UpstreamRequest, bytes]:
        """What to send ``account``, in its protocol, and the body's bytes (built once).

        Raises :class:`~relay.errors.InvalidRequest` for input that account cannot be given
        (files other than images and PDFs; when translating, fields with no counterpart).
        """
        prepared = self.prepared.get(account.name)
        if prepared is None:
            body = self.client.body
            if self.found is not None:  # earlier turns, written out as the account needs
                body = expand(body, self.found, account.config.provider)
            try:
                request = build_upstream_request(
                    body,
                    self.client.endpoint,
                    account.config.provider,
                    model=self.route.target,
                    api_key=account.config.api_key(),
                    reasoning_effort=self.route.reasoning_effort,
                    compaction_form=self.client.compaction,
                )
                previous = self.client.body.get("previous_response_id")
                if previous and "previous_response_id" not in body:
                    # Written out for the upstream; the answer still names it, as OpenAI's does.
                    request.context.echo["previous_response_id"] = previous
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


@asynccontextmanager
async def upstream_call(
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


def too_large(account: str, exc: Exception) -> UpstreamResponseTooLarge:
    return UpstreamResponseTooLarge(
        f"The upstream account '{account}' sent more than the relay accepts ({exc}), so its "
        "answer was not relayed. Ask for a shorter answer; if it persists, tell the relay's "
        "operator."
    )

