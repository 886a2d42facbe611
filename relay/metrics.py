"""What the relay counts from usage records, as ``prometheus_client`` metrics.

:meth:`Metrics.observe` runs for every record the usage writer takes (one per request,
``relay/ledger/usage.py``): requests by model / package / status, failed requests by status and
error code, tokens by kind, credits charged, request duration and time to first byte per model,
queue wait per pool, and failures in the middle of a stream per account. These are
``prometheus_client``'s own ``Counter`` and ``Histogram``, owned by the relay's :class:`Metrics`
(never the client's global default registry); ``GET /metrics`` (``relay/api/metrics.py``) adds
the live state read at scrape time and renders both.

Label values are bounded: ``model`` is the requested model only once it resolved to an upstream
model (``unknown`` otherwise, so a client cannot mint series by sending made-up names), packages,
pools and accounts come from the configuration, and error codes are the relay's own or an
upstream's, at most :data:`MAX_ERROR_CODES` distinct ones (later ones, and anything that does not
look like a code, count as ``other``).
"""

from __future__ import annotations

import re
from typing import Any

import prometheus_client
from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector

from .config import Config
from .ledger.prices import to_credits
from .ledger.usage import UsageRecord

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
_CLIENT_SIDE = {
    "client_stalled", "insufficient_quota", "rate_limit_exceeded", "concurrency_limit_exceeded",
    "queue_full", "queue_timeout",
}


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
            ("cache_write", record.cache_write_tokens),
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
