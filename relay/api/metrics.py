"""Prometheus metrics: what is counted, and ``GET /metrics`` through ``prometheus_client``.

Two sources, so that the hot path does no extra work for metrics:

* **Usage records.** :meth:`Metrics.observe` runs for every record the usage writer takes (one
  per request, ``relay/ledger/usage.py``): requests by model / package / status, failed requests
  by status and error code, tokens by kind, credits charged, request duration and time to first
  byte per model, queue wait per pool, and failures in the middle of a stream per account. These
  are ``prometheus_client``'s own ``Counter`` and ``Histogram``, owned by the relay's
  :class:`Metrics` (never the client's global default registry).
* **Live state, read at scrape time** by :class:`LiveState`, a custom collector: queue depth and
  oldest wait per pool, in-flight requests per guard (global, pool, account, and each key with
  requests in flight or queued), reserved tokens, account health, admission totals, credit holds,
  and failed upstream attempts per account and status (``Health.failures``, failed-over attempts
  included).

:func:`build_registry` is the one place that puts the two together in a fresh
``CollectorRegistry``; ``/metrics`` renders it with ``prometheus_client``'s text encoder.
Several workers (``relay serve --workers N``, not built yet) would need the client's multiprocess
mode: the usage metrics written to ``PROMETHEUS_MULTIPROC_DIR`` and read by a
``MultiProcessCollector`` in this function, and the live state summed across workers. That is
not done: today one process serves, and its registry is the whole truth.

Label values are bounded: ``model`` is the requested model only once it resolved to an upstream
model (``unknown`` otherwise, so a client cannot mint series by sending made-up names), packages,
pools and accounts come from the configuration, keys appear only while they have requests in
flight or queued, and error codes are the relay's own or an upstream's, at most
:data:`MAX_ERROR_CODES` distinct ones (later ones, and anything that does not look like a code,
count as ``other``).

``/metrics`` takes the admin token (``Authorization: Bearer …``, README "Metrics"): it names
accounts, packages and key ids, which are the operator's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..config import Config
from ..ledger.prices import to_credits
from ..ledger.usage import UsageRecord
from .admin import check_admin
from .http import Request, Responder

if TYPE_CHECKING:
    from ..app import Runtime

#: The classic text format. ``prometheus_client`` now labels its output 1.0.0 (the version that
#: allows UTF-8 names); every name here is a legacy one, so the bytes are 0.0.4's, and every
#: Prometheus since 2.0 reads that label.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Seconds. Time to first byte spans fast chat models to slow reasoning ones.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Seconds. A whole request: refusals take milliseconds, long reasoning streams minutes.
DURATION_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0
)
#: Seconds. Most admitted requests do not wait; the tail is the queue timeout (60 s default).
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Distinct ``code`` label values at most; an upstream's codes are its own vocabulary.
MAX_ERROR_CODES = 64
_CODE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

#: Error codes a usage record can carry that are the client's doing, not the upstream's.
_CLIENT_SIDE = {"client_stalled", "insufficient_quota", "rate_limit_exceeded"}


class Metrics:
    """What the relay counts from usage records (the live state is :class:`LiveState`'s)."""

    def __init__(self, config: Config) -> None:
        # The relay's series are the ones the README lists; ``_created`` twins of every counter
        # and histogram would double them for a timestamp Prometheus does not use by default.
        prometheus_client.disable_created_metrics()
        self._pool_of = {name: package.pool for name, package in config.packages.items()}
        self._codes: set[str] = set()
        self._children: dict[tuple, Any] = {}
        self.requests = Counter(
            "relay_requests_total",
            "Requests relayed, by model, key package and HTTP status (499: the client left).",
            ("model", "package", "status"),
            registry=None,
        )
        self.errors = Counter(
            "relay_request_errors_total",
            "Requests that failed, by the HTTP status the client got (200: a stream that failed "
            "after it started) and the error code.",
            ("status", "code"),
            registry=None,
        )
        self.tokens = Counter(
            "relay_tokens_total",
            "Tokens billed, by model, key package and kind (output includes reasoning).",
            ("model", "package", "kind"),
            registry=None,
        )
        self.credits = Counter(
            "relay_credits_charged_total",
            "Credits charged to keys, by model and key package.",
            ("model", "package"),
            registry=None,
        )
        self.duration = Histogram(
            "relay_request_duration_seconds",
            "Seconds from the request's arrival to its last byte to the client, by model.",
            ("model",),
            registry=None,
            buckets=DURATION_BUCKETS,
        )
        self.ttft = Histogram(
            "relay_time_to_first_token_seconds",
            "Seconds from the request's arrival to its first byte to the client, by model.",
            ("model",),
            registry=None,
            buckets=TTFT_BUCKETS,
        )
        self.queue_wait = Histogram(
            "relay_queue_wait_seconds",
            "Seconds admitted requests waited in their pool's fair queue, by pool.",
            ("pool",),
            registry=None,
            buckets=QUEUE_BUCKETS,
        )
        self.stream_errors = Counter(
            "relay_upstream_stream_errors_total",
            "Upstream streams that failed after the answer had started, by account.",
            ("account",),
            registry=None,
        )

    def observe(self, record: UsageRecord) -> None:
        """Count one request (an observer of the usage writer: never blocks)."""
        child = self._child
        model = record.model if record.upstream_model else "unknown"
        package = record.package
        status = str(record.status)
        child(self.requests, model, package, status).inc()
        if record.error_code or record.status >= 400:
            child(self.errors, status, self._code_label(record.error_code)).inc()
        for kind, count in (
            ("input", record.input_tokens),
            ("cached_input", record.cached_tokens),
            ("output", record.output_tokens),
            ("reasoning", record.reasoning_tokens),
        ):
            if count:
                child(self.tokens, model, package, kind).inc(count)
        if record.cost_nano:
            child(self.credits, model, package).inc(to_credits(record.cost_nano))
        child(self.duration, model).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            child(self.ttft, model).observe(record.ttft_ms / 1000)
        if record.account:  # admitted: it had its place in the queue
            pool = self._pool_of.get(package, "")
            child(self.queue_wait, pool).observe(record.queue_ms / 1000)
            if (
                record.status == 200
                and record.error_code
                and not record.client_disconnected
                and record.error_code not in _CLIENT_SIDE
            ):
                child(self.stream_errors, record.account).inc()

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: the client validates and locks on every call
        (~3 us each, most of what counting a request cost)."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def _code_label(self, code: str) -> str:
        """``code`` as a label value: one of at most :data:`MAX_ERROR_CODES`, else ``other``."""
        if not code:
            return "none"  # a status >= 400 that carried no code (a client that left: 499)
        if code in self._codes:
            return code
        if len(self._codes) < MAX_ERROR_CODES and _CODE.fullmatch(code):
            self._codes.add(code)
            return code
        return "other"

    def collectors(self) -> list[Collector]:
        return [
            self.requests,
            self.errors,
            self.tokens,
            self.credits,
            self.duration,
            self.ttft,
            self.queue_wait,
            self.stream_errors,
        ]


class LiveState(Collector):
    """Gauges and totals read from the guards, the scheduler and the ledger at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        admission = runtime.admission.status()
        accounts = runtime.scheduler.status()

        yield GaugeMetricFamily(
            "relay_active_requests",
            "Relay requests (chat, responses) in progress.",
            value=runtime.active_requests,
        )
        depth = GaugeMetricFamily(
            "relay_queue_depth", "Requests waiting in each pool's queue.", labels=("pool",)
        )
        oldest = GaugeMetricFamily(
            "relay_queue_oldest_wait_seconds",
            "Wait of the oldest queued request, by pool.",
            labels=("pool",),
        )
        reserved = GaugeMetricFamily(
            "relay_reserved_tokens",
            "Tokens reserved by requests in flight, by guard (global, pool).",
            labels=("guard", "name"),
        )
        in_flight = GaugeMetricFamily(
            "relay_in_flight",
            "Requests holding a slot, by guard: global, pool, account, and keys with requests.",
            labels=("guard", "name"),
        )
        queued_keys = GaugeMetricFamily(
            "relay_key_queued",
            "Requests waiting, by key (keys with requests only).",
            labels=("key",),
        )
        glob = admission.get("global", {})
        in_flight.add_metric(("global", "global"), glob.get("in_flight", 0))
        reserved.add_metric(("global", "global"), glob.get("reserved_tokens", 0))
        for name, pool in admission.get("pools", {}).items():
            depth.add_metric((name,), pool.get("queue_depth", 0))
            oldest.add_metric((name,), pool.get("oldest_wait_s", 0))
            in_flight.add_metric(("pool", name), pool.get("in_flight", 0))
            reserved.add_metric(("pool", name), pool.get("reserved_tokens", 0))
        for key_id, key in admission.get("keys", {}).items():
            if key.get("in_flight") or key.get("queued"):
                in_flight.add_metric(("key", key_id), key.get("in_flight", 0))
                queued_keys.add_metric((key_id,), key.get("queued", 0))

        healthy = GaugeMetricFamily(
            "relay_account_healthy",
            "1 if the account takes requests now, else 0.",
            labels=("account",),
        )
        disabled = GaugeMetricFamily(
            "relay_account_disabled", "1 if the account is out of service.", labels=("account",)
        )
        cooldown = GaugeMetricFamily(
            "relay_account_cooldown_seconds",
            "Seconds left of the account's rest.",
            labels=("account",),
        )
        missing_credentials = GaugeMetricFamily(
            "relay_account_missing_credentials",
            "1 if the account's api_key_env variable is unset or empty.",
            labels=("account",),
        )
        for name, account in accounts.items():
            in_flight.add_metric(("account", name), account.get("in_flight", 0))
            healthy.add_metric((name,), int(bool(account.get("healthy"))))
            disabled.add_metric((name,), int(bool(account.get("disabled"))))
            cooldown.add_metric((name,), account.get("cooling_down_s", 0))
            missing_credentials.add_metric(
                (name,), int(bool(account.get("missing_credentials")))
            )
        yield from (
            depth, oldest, in_flight, queued_keys, reserved, healthy, disabled, cooldown,
            missing_credentials,
        )

        errors = CounterMetricFamily(
            "relay_upstream_errors_total",
            "Failed upstream attempts before the answer started, by account and upstream status "
            "(502: unreachable, 504: timeout); failed-over attempts included.",
            labels=("account", "status"),
        )
        for (account, status), count in sorted(runtime.health.failures.items()):
            errors.add_metric((account, str(status)), count)
        yield errors
        yield CounterMetricFamily(
            "relay_admission_granted_total",
            "Requests admitted by the guards.",
            value=admission.get("granted", 0),
        )
        refused = CounterMetricFamily(
            "relay_admission_refused_total",
            "Requests the guards refused, by reason.",
            labels=("reason",),
        )
        for reason, count in sorted(admission.get("refused", {}).items()):
            refused.add_metric((reason,), count)
        yield refused

        credits = runtime.credits.status()
        yield GaugeMetricFamily(
            "relay_credits_held", "Credits held by requests in progress.", value=credits["held"]
        )
        yield GaugeMetricFamily(
            "relay_credit_holds", "Requests in progress holding credits.", value=credits["holds"]
        )
        yield GaugeMetricFamily(
            "relay_usage_records_queued",
            "Usage records waiting to be written to the database.",
            value=runtime.usage.queued,
        )


def build_registry(runtime: Runtime) -> CollectorRegistry:
    """A registry of this relay's metrics alone: its usage metrics and its live state.

    Never the client's global default registry, so two relays in one process (the tests) or a
    library's own metrics do not mix in. This is where multiprocess mode would plug in.
    """
    registry = CollectorRegistry(auto_describe=False)
    for collector in runtime.metrics.collectors():
        registry.register(collector)
    registry.register(LiveState(runtime))
    return registry


def render(runtime: Runtime) -> bytes:
    """The text exposition of every metric, as a scrape sees it now."""
    return generate_latest(build_registry(runtime))


async def serve_metrics(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``GET /metrics`` (admin token required)."""
    check_admin(runtime, request)
    await responder.raw(200, render(runtime), CONTENT_TYPE)
