"""Prometheus metrics: what is counted, and ``GET /metrics`` in the text exposition format.

Two sources, so that the hot path does no extra work for metrics:

* **Usage records.** :meth:`Metrics.observe` runs for every record the usage writer takes (one
  per request, ``relay/ledger/usage.py``): requests by model / package / status, tokens by kind,
  credits charged, time to first token per model, queue wait per pool, and failures in the
  middle of a stream per account.
* **Live state, read at scrape time**: queue depth and oldest wait per pool, in-flight requests
  per guard (global, pool, account, and each key with requests in flight or queued), account
  health, admission totals, credit holds, and failed upstream attempts per account and status
  (``Health.failures``, failed-over attempts included).

Label values are bounded: ``model`` is the requested model only once it resolved to an upstream
model (``unknown`` otherwise, so a client cannot mint series by sending made-up names), packages,
pools and accounts come from the configuration, and keys appear only while they have requests in
flight or queued.

``/metrics`` takes the admin token (``Authorization: Bearer …``, README "Metrics"): it names
accounts, packages and key ids, which are the operator's business.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..config import Config
from ..ledger.prices import to_credits
from ..ledger.usage import UsageRecord
from .admin import check_admin
from .http import Request, Responder

if TYPE_CHECKING:
    from ..app import Runtime

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Seconds. Time to first token spans fast chat models to slow reasoning ones.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Seconds. Most admitted requests do not wait; the tail is the queue timeout (60 s default).
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

TOKEN_KINDS = ("input", "cached_input", "output", "reasoning")

#: Error codes a usage record can carry that are the client's doing, not the upstream's.
_CLIENT_SIDE = {"client_stalled", "insufficient_quota", "rate_limit_exceeded"}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(str(value))}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Counter:
    """A monotonically growing value per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, values: tuple[str, ...] = (), amount: float = 1) -> None:
        self.values[values] = self.values.get(values, 0) + amount

    def samples(self) -> Iterable[str]:
        for values, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labels, values)} {_number(value)}"


class Gauge(Counter):
    """A value read at scrape time (set, not accumulated)."""

    kind = "gauge"

    def set(self, values: tuple[str, ...], value: float) -> None:
        self.values[values] = value


class Histogram:
    """Cumulative buckets, sum and count per label set (Prometheus' histogram)."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.bounds = (*buckets, math.inf)
        self.series: dict[tuple[str, ...], list] = {}  # values → [bucket counts, sum, count]

    def observe(self, values: tuple[str, ...], value: float) -> None:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = [[0] * len(self.bounds), 0.0, 0]
        counts = series[0]
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                counts[index] += 1
                break
        series[1] += value
        series[2] += 1

    def samples(self) -> Iterable[str]:
        for values, (counts, total, count) in sorted(self.series.items()):
            cumulative = 0
            for bound, bucket in zip(self.bounds, counts, strict=True):
                cumulative += bucket
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labels, values, le)} {cumulative}"
            yield f"{self.name}_sum{_labels(self.labels, values)} {_number(total)}"
            yield f"{self.name}_count{_labels(self.labels, values)} {count}"


Metric = Counter | Histogram


def exposition(metrics: Iterable[Metric]) -> str:
    """The text exposition format (version 0.0.4) of ``metrics``."""
    lines = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        lines.extend(metric.samples())
    return "\n".join(lines) + "\n"


class Metrics:
    """What the relay counts from usage records (the live gauges are read in :func:`render`)."""

    def __init__(self, config: Config) -> None:
        self._pool_of = {name: package.pool for name, package in config.packages.items()}
        self.requests = Counter(
            "relay_requests_total",
            "Requests relayed, by model, key package and HTTP status (499: the client left).",
            ("model", "package", "status"),
        )
        self.tokens = Counter(
            "relay_tokens_total",
            "Tokens billed, by model, key package and kind (output includes reasoning).",
            ("model", "package", "kind"),
        )
        self.credits = Counter(
            "relay_credits_charged_total",
            "Credits charged to keys, by model and key package.",
            ("model", "package"),
        )
        self.ttft = Histogram(
            "relay_time_to_first_token_seconds",
            "Seconds from the request's arrival to its first byte to the client, by model.",
            ("model",),
            TTFT_BUCKETS,
        )
        self.queue_wait = Histogram(
            "relay_queue_wait_seconds",
            "Seconds admitted requests waited in their pool's fair queue, by pool.",
            ("pool",),
            QUEUE_BUCKETS,
        )
        self.stream_errors = Counter(
            "relay_upstream_stream_errors_total",
            "Upstream streams that failed after the answer had started, by account.",
            ("account",),
        )

    def observe(self, record: UsageRecord) -> None:
        """Count one request (an observer of the usage writer: never blocks)."""
        model = record.model if record.upstream_model else "unknown"
        package = record.package
        self.requests.inc((model, package, str(record.status)))
        for kind, count in (
            ("input", record.input_tokens),
            ("cached_input", record.cached_tokens),
            ("output", record.output_tokens),
            ("reasoning", record.reasoning_tokens),
        ):
            if count:
                self.tokens.inc((model, package, kind), count)
        if record.cost_nano:
            self.credits.inc((model, package), to_credits(record.cost_nano))
        if record.ttft_ms is not None:
            self.ttft.observe((model,), record.ttft_ms / 1000)
        if record.account:  # admitted: it had its place in the queue
            self.queue_wait.observe((self._pool_of.get(package, ""),), record.queue_ms / 1000)
            if (
                record.status == 200
                and record.error_code
                and not record.client_disconnected
                and record.error_code not in _CLIENT_SIDE
            ):
                self.stream_errors.inc((record.account,))

    def recorded(self) -> list[Metric]:
        return [
            self.requests,
            self.tokens,
            self.credits,
            self.ttft,
            self.queue_wait,
            self.stream_errors,
        ]


def live(runtime: Runtime) -> list[Metric]:
    """Gauges and totals read from the guards, the scheduler and the ledger right now."""
    admission = runtime.admission.status()
    accounts = runtime.scheduler.status()

    active = Gauge("relay_active_requests", "Relay requests (chat, responses) in progress.")
    active.set((), runtime.active_requests)

    depth = Gauge("relay_queue_depth", "Requests waiting in each pool's queue.", ("pool",))
    oldest = Gauge(
        "relay_queue_oldest_wait_seconds", "Wait of the oldest queued request, by pool.", ("pool",)
    )
    reserved = Gauge(
        "relay_reserved_tokens",
        "Tokens reserved by requests in flight, by guard (global, pool).",
        ("guard", "name"),
    )
    in_flight = Gauge(
        "relay_in_flight",
        "Requests holding a slot, by guard: global, pool, account, and keys with requests.",
        ("guard", "name"),
    )
    queued_keys = Gauge(
        "relay_key_queued", "Requests waiting, by key (keys with requests only).", ("key",)
    )
    glob = admission.get("global", {})
    in_flight.set(("global", "global"), glob.get("in_flight", 0))
    reserved.set(("global", "global"), glob.get("reserved_tokens", 0))
    for name, pool in admission.get("pools", {}).items():
        depth.set((name,), pool.get("queue_depth", 0))
        oldest.set((name,), pool.get("oldest_wait_s", 0))
        in_flight.set(("pool", name), pool.get("in_flight", 0))
        reserved.set(("pool", name), pool.get("reserved_tokens", 0))
    for key_id, key in admission.get("keys", {}).items():
        if key.get("in_flight") or key.get("queued"):
            in_flight.set(("key", key_id), key.get("in_flight", 0))
            queued_keys.set((key_id,), key.get("queued", 0))

    healthy = Gauge(
        "relay_account_healthy", "1 if the account takes requests now, else 0.", ("account",)
    )
    disabled = Gauge(
        "relay_account_disabled", "1 if the account is out of service.", ("account",)
    )
    cooldown = Gauge(
        "relay_account_cooldown_seconds", "Seconds left of the account's rest.", ("account",)
    )
    missing_credentials = Gauge(
        "relay_account_missing_credentials",
        "1 if the account's api_key_env variable is unset or empty.",
        ("account",),
    )
    for name, account in accounts.items():
        missing_credentials.set((name,), int(bool(account.get("missing_credentials"))))
        in_flight.set(("account", name), account.get("in_flight", 0))
        healthy.set((name,), int(bool(account.get("healthy"))))
        disabled.set((name,), int(bool(account.get("disabled"))))
        cooldown.set((name,), account.get("cooling_down_s", 0))

    errors = Counter(
        "relay_upstream_errors_total",
        "Failed upstream attempts before the answer started, by account and upstream status "
        "(502: unreachable, 504: timeout); failed-over attempts included.",
        ("account", "status"),
    )
    for (account, status), count in runtime.health.failures.items():
        errors.inc((account, str(status)), count)

    granted = Counter("relay_admission_granted_total", "Requests admitted by the guards.")
    granted.inc((), admission.get("granted", 0))
    refused = Counter(
        "relay_admission_refused_total", "Requests the guards refused, by reason.", ("reason",)
    )
    for reason, count in admission.get("refused", {}).items():
        refused.inc((reason,), count)

    credits = runtime.credits.status()
    held = Gauge("relay_credits_held", "Credits held by requests in progress.")
    held.set((), credits["held"])
    holds = Gauge("relay_credit_holds", "Requests in progress holding credits.")
    holds.set((), credits["holds"])
    queued_records = Gauge(
        "relay_usage_records_queued", "Usage records waiting to be written to the database."
    )
    queued_records.set((), runtime.usage.queued)
    return [
        active, depth, oldest, in_flight, queued_keys, reserved, healthy, disabled, cooldown,
        missing_credentials, errors, granted, refused, held, holds, queued_records,
    ]


def render(runtime: Runtime) -> str:
    return exposition([*runtime.metrics.recorded(), *live(runtime)])


async def serve_metrics(runtime: Runtime, request: Request, responder: Responder) -> None:
    """``GET /metrics`` (admin token required)."""
    check_admin(runtime, request)
    await responder.raw(200, render(runtime).encode(), CONTENT_TYPE)
