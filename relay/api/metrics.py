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

**Several workers** (``relay serve --workers N``, ``relay/workers.py``) use the client's
multiprocess mode: the parent names a directory in ``PROMETHEUS_MULTIPROC_DIR``, so every
worker's usage counters and histograms are written there (``prometheus_client`` picks its
file-backed values when it is imported), and a scrape, whichever worker answers it, renders a
``MultiProcessCollector`` over the directory: counters and histograms summed over every worker
that ever ran (a dead worker's counts stay), live state combined as :data:`MULTIPROCESS_MODES`
says. A worker's live state reaches the directory through its :class:`LiveMirror`, which writes
what :class:`LiveState` reads into multiprocess gauges (and its totals into counters) every
:data:`PUBLISH_INTERVAL_S`: a scrape shows each worker's live state as of at most that long
ago. In-flight and queued series of keys with nothing in flight or queued are left out of the
combined view (a multiprocess gauge cannot be removed once set, only set to 0).

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

import os
from collections.abc import Iterator

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
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
        yield from _oauth_metrics(accounts)

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
        yield GaugeMetricFamily(
            "relay_usage_writer_unavailable",
            "1 while the usage writer cannot reach the database (records wait in memory).",
            value=int(runtime.usage.unavailable),
        )
        yield CounterMetricFamily(
            "relay_usage_records_dropped",
            "Usage records dropped (logged whole) because too many waited for the database.",
            value=runtime.usage.dropped,
        )


def _oauth_metrics(accounts: dict[str, dict]) -> Iterator[Metric]:
    """ChatGPT-plan accounts: their usage windows and their tokens' life (no token)."""
    used = GaugeMetricFamily(
        "relay_account_usage_used_percent",
        "Used share of a ChatGPT-plan account's usage window (primary: 5 h, secondary: "
        "weekly), as the backend last reported it.",
        labels=("account", "window"),
    )
    resets = GaugeMetricFamily(
        "relay_account_usage_resets_at",
        "When a ChatGPT-plan account's usage window resets (unix seconds).",
        labels=("account", "window"),
    )
    expires = GaugeMetricFamily(
        "relay_account_token_expires_at",
        "When a ChatGPT-plan account's access token expires (unix seconds).",
        labels=("account",),
    )
    refreshes = CounterMetricFamily(
        "relay_account_token_refreshes",
        "Token refreshes of a ChatGPT-plan account, by result.",
        labels=("account", "result"),
    )
    for name, account in accounts.items():
        oauth = account.get("oauth")
        if not oauth:
            continue
        for window, values in oauth["usage_windows"].items():
            used.add_metric((name, window), values["used_percent"])
            if values.get("resets_at") is not None:
                resets.add_metric((name, window), values["resets_at"])
        if oauth["access_expires_at"] is not None:
            expires.add_metric((name,), oauth["access_expires_at"])
        refreshes.add_metric((name, "ok"), oauth["refreshes"])
        refreshes.add_metric((name, "failed"), oauth["refresh_failures"])
    yield from (used, resets, expires, refreshes)


#: How each live-state gauge of several workers is combined (``prometheus_client``'s
#: ``multiprocess_mode``; ``live…``: dead workers' values are dropped). Sums for what adds up
#: across processes (requests, queued requests, tokens and credits held, records waiting); the
#: worst case for what each worker judges on its own until guard state is shared: an account
#: counts as healthy only if every worker takes requests on it, disabled or cooling down if any
#: worker has it so (with the longest rest left), and a queue's oldest wait is the longest.
#: A gauge not named here is shown per worker (``liveall``: a ``pid`` label per live worker),
#: which is never wrong, until it is given its mode here.
MULTIPROCESS_MODES = {
    "relay_active_requests": "livesum",
    "relay_queue_depth": "livesum",
    "relay_queue_oldest_wait_seconds": "livemax",
    "relay_in_flight": "livesum",
    "relay_key_queued": "livesum",
    "relay_reserved_tokens": "livesum",
    "relay_account_healthy": "livemin",
    "relay_account_disabled": "livemax",
    "relay_account_cooldown_seconds": "livemax",
    "relay_account_missing_credentials": "livemax",
    "relay_account_usage_used_percent": "livemax",
    "relay_account_usage_resets_at": "livemax",
    "relay_account_token_expires_at": "livemax",
    "relay_credits_held": "livesum",
    "relay_credit_holds": "livesum",
    "relay_usage_records_queued": "livesum",
    "relay_usage_writer_unavailable": "livemax",
}

#: Seconds between two writes of a worker's live state to the multiprocess directory.
PUBLISH_INTERVAL_S = 1.0


def multiprocess_dir() -> str | None:
    """The directory of ``prometheus_client``'s multiprocess mode, when this process is one of
    several workers (the variable the client itself reads)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class LiveMirror:
    """This worker's :class:`LiveState`, written into multiprocess metrics: gauges set to the
    values read (a series that was published and is gone is set to 0), totals as counters
    increased by what they grew since the last write."""

    def __init__(self, runtime: Runtime) -> None:
        self.state = LiveState(runtime)
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._series: dict[str, set[tuple[str, ...]]] = {}  # gauge series published last time
        self._totals: dict[tuple[str, tuple[str, ...]], float] = {}  # counters' published totals

    async def run(self) -> None:
        """Publish every :data:`PUBLISH_INTERVAL_S` until cancelled."""
        while True:
            self.publish()
            await trio.sleep(PUBLISH_INTERVAL_S)

    def publish(self) -> None:
        series: dict[str, set[tuple[str, ...]]] = {}
        for family in self.state.collect():
            for sample in family.samples:
                names, values = tuple(sample.labels), tuple(sample.labels.values())
                if family.type == "counter":
                    self._count(family, names, values, sample.value)
                    continue
                gauge = self._gauge(family, names)
                (gauge.labels(*values) if values else gauge).set(sample.value)
                series.setdefault(family.name, set()).add(values)
        for name, published in self._series.items():
            for values in published - series.get(name, set()):
                self._gauges[name].labels(*values).set(0)  # gone (a key with nothing left)
        self._series = series

    def _gauge(self, family: Metric, names: tuple[str, ...]) -> Gauge:
        gauge = self._gauges.get(family.name)
        if gauge is None:
            gauge = self._gauges[family.name] = Gauge(
                family.name, family.documentation, names, registry=None,
                multiprocess_mode=MULTIPROCESS_MODES.get(  # type: ignore[arg-type]
                    family.name, "liveall"
                ),
            )
        return gauge

    def _count(
        self, family: Metric, names: tuple[str, ...], values: tuple[str, ...], total: float
    ) -> None:
        counter = self._counters.get(family.name)
        if counter is None:
            counter = self._counters[family.name] = Counter(
                family.name, family.documentation, names, registry=None
            )
        key = (family.name, values)
        grown = total - self._totals.get(key, 0.0)
        if grown > 0:
            (counter.labels(*values) if values else counter).inc(grown)
            self._totals[key] = total


class WorkersCollector(Collector):
    """Every worker's metrics from the multiprocess directory, without the in-flight and queued
    series of keys that have nothing in flight or queued."""

    def __init__(self, path: str) -> None:
        self.collector = MultiProcessCollector(None, path)

    def collect(self) -> Iterator[Metric]:
        for metric in self.collector.collect():
            if metric.name in ("relay_in_flight", "relay_key_queued"):
                metric.samples = [
                    sample for sample in metric.samples
                    if sample.value or not (
                        metric.name == "relay_key_queued" or sample.labels.get("guard") == "key"
                    )
                ]
            yield metric


def build_registry(runtime: Runtime) -> CollectorRegistry:
    """A registry of this relay's metrics alone: its usage metrics and its live state (with
    several workers, every worker's: see the module docstring).

    Never the client's global default registry, so two relays in one process (the tests) or a
    library's own metrics do not mix in.
    """
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path:
        registry.register(WorkersCollector(path))
        return registry
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
