"""The relay's runtime: the shared state every request uses, and its background tasks.

:func:`open_runtime` builds everything a request needs — store, key ring, credits, usage writer,
metrics, guards, scheduler, upstream client — and runs the background tasks (usage writer, key
refresher, admission timer) in its own nursery for exactly as long as the relay serves; on exit
it stops taking usage records and writes every queued one.

This module sits below the routes: ``relay/api/*`` import it, it imports none of them, and
``relay/app.py`` only composes the routes around it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from .config import Config
from .guards.admission import Admission
from .guards.shared import SharedGuards
from .ledger.backend import LedgerStore, open_store
from .ledger.credits import Credits
from .ledger.keys import KeyRing
from .ledger.prices import PriceTable
from .ledger.responses_store import ResponsesStore
from .ledger.usage import UsageWriter
from .logs import log_missing_credentials
from .metrics import Metrics
from .upstream.chatgpt import ChatGPTAccounts
from .upstream.client import UpstreamClient
from .upstream.health import Health
from .upstream.routing import Catalog, Scheduler

SHUTDOWN_MESSAGE = "The relay is shutting down and did not serve this request; retry it."

@dataclass
class Runtime:
    config: Config
    store: LedgerStore
    keys: KeyRing
    credits: Credits
    metrics: Metrics
    usage: UsageWriter
    admission: Admission
    scheduler: Scheduler
    catalog: Catalog
    upstream: UpstreamClient
    health: Health
    started_at: float
    #: The Responses answers kept per key (previous_response_id, item_reference, GET).
    responses: ResponsesStore
    active_requests: int = 0  # relay requests (chat, responses) in progress
    #: Set on SIGTERM/SIGINT: relay requests are refused from then on (see :meth:`shut_down`).
    shutting_down: bool = False
    #: The drain scope of each relay request that may reach an upstream (see :meth:`cut`).
    drains: set[trio.CancelScope] = field(default_factory=set)
    #: Set with :attr:`shutting_down`: idle Responses WebSockets close (relay/api/websocket.py).
    stopping: trio.Event = field(default_factory=trio.Event)
    #: Open Responses WebSockets per key id (``server.websocket_max_per_key`` caps them).
    sockets: dict[str, int] = field(default_factory=dict)
    #: The ChatGPT-plan accounts' tokens and usage windows (relay/upstream/chatgpt.py).
    chatgpt: ChatGPTAccounts | None = None

    def shut_down(self) -> None:
        """Stop serving new relay requests: those still queued in admission are woken with a
        refusal (a 503 for their client), those that arrive from now on are refused at once;
        requests already admitted run on until :meth:`cut`."""
        self.shutting_down = True
        self.stopping.set()
        self.admission.refuse_waiting(SHUTDOWN_MESSAGE)

    def cut(self) -> int:
        """End every relay request still running, through its own nursery: each one's drain
        scope is cancelled, and the request ends its answer with an error in its protocol
        (``relay_shutdown``), is billed for what it produced and writes its usage record.
        Returns how many were cut."""
        for scope in self.drains:
            scope.cancel()
        return len(self.drains)

    def state(self) -> dict:
        """Live counters: what the admin endpoint shows and the leak tests check."""
        return {
            "active_requests": self.active_requests,
            "admission": self.admission.status(),
            "accounts": self.scheduler.status(),
            "sessions": {
                "bound": len(self.scheduler.sessions),
                "rebinds": self.scheduler.sessions.rebinds,
            },
            "usage_records": {"written": self.usage.written, "queued": self.usage.queued},
            "credits": self.credits.status(),
            "responses_kept": len(self.responses),  # in this process's memory
        }


@asynccontextmanager
async def open_runtime(config: Config) -> AsyncIterator[Runtime]:
    """Open the runtime; on exit, stop taking usage records and write every queued one."""
    store = open_store(
        config.server.database, password_env=config.server.database_password_env
    )
    keys = KeyRing(store)
    keys.load()
    shared = None
    if config.server.redis_url is not None:
        shared = SharedGuards(
            config.server.redis_url,
            failure_policy=config.server.redis_failure,
            lease_ttl_s=config.server.redis_lease_ttl_s,
        )
    credits = Credits(PriceTable(config.prices), keys.records(), shared)
    metrics = Metrics(config)
    # Priced and debited first, then counted (the metrics read the cost).
    usage = UsageWriter(store, observers=[credits.charge, metrics.observe])
    upstream = UpstreamClient(config.server, config.accounts)
    admission = Admission(config, shared)
    runtime = Runtime(
        config=config,
        store=store,
        keys=keys,
        credits=credits,
        metrics=metrics,
        usage=usage,
        admission=admission,
        scheduler=Scheduler(config),
        catalog=Catalog(config),
        upstream=upstream,
        health=Health(config.server, shared),
        started_at=time.time(),
        responses=ResponsesStore(
            max_per_key=config.server.responses_store_max,
            ttl_s=config.server.responses_store_ttl_s,
            shared=shared,
        ),
    )
    runtime.chatgpt = ChatGPTAccounts.open(config, store, upstream, runtime.health, shared)
    await runtime.chatgpt.load(runtime.scheduler.accounts)
    if shared is not None:
        accounts = [(account.guard, account.config) for account in runtime.scheduler.accounts]

        def follow_redis(degraded: bool) -> None:
            share = 1 / shared.live_processes if degraded else None
            admission.share_limits(share, accounts)

        shared.on_degraded = follow_redis
        shared.on_recovering = admission.register_local_leases
        shared.queue_depths = admission.queue_depths
    log_missing_credentials(config)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(usage.run)
            # Tasks that run for as long as the relay serves; the usage writer outlives them
            # to drain what is queued.
            async with trio.open_nursery() as background:
                background.start_soon(keys.refresh_forever)
                background.start_soon(admission.run)
                if shared is not None:
                    await background.start(shared.run)
                    background.start_soon(runtime.health.follow, runtime.scheduler.accounts)
                try:
                    yield runtime
                finally:
                    if shared is not None:
                        await shared.aclose()
                    background.cancel_scope.cancel()
                    usage.close()
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
        store.close()
