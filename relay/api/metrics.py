"""Prometheus metrics: what is counted, and ``GET /metrics`` through ``prometheus_client``.

Two sources, so that the hot path does no extra work for metrics:

* **Usage records**, counted as they are written by :class:`relay.metrics.Metrics` (requests,
  errors, tokens, credits, durations, time to first byte, queue wait, stream failures).
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

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..runtime import Runtime
from .admin import check_admin
from .http import Request, Responder

#: The classic text format. ``prometheus_client`` now labels its output 1.0.0 (the version that
#: allows UTF-8 names); every name here is a legacy one, so the bytes are 0.0.4's, and every
#: Prometheus since 2.0 reads that label.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


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
