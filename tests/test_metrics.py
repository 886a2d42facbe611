"""``GET /metrics``: admin token, the text exposition format (read back with the reference
parser, prometheus_client's), and counters that move by exactly what a request did."""

from __future__ import annotations

import threading
import time
import tomllib
from collections.abc import Callable, Iterator

import httpx2
import prometheus_client
import pytest
from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families

from relay.config import parse_config
from relay.ledger.usage import UsageRecord
from relay.metrics import MAX_ERROR_CODES, Metrics

from .conftest import ADMIN_TOKEN, BILLING_BODY, Relay, Sim, running_relay
from .test_credits import chat


def scrape(relay: Relay) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, parsed by prometheus_client."""
    response = httpx2.get(
        relay.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_admin_token(billed: Relay) -> None:
    assert httpx2.get(billed.url + "/metrics").status_code == 401
    key, _ = billed.create_paid_key()
    assert httpx2.get(
        billed.url + "/metrics", headers={"authorization": f"Bearer {key}"}
    ).status_code == 401


def test_requests_tokens_credits_and_latency_move_by_what_a_request_did(billed: Relay) -> None:
    key, _ = billed.create_paid_key()
    before = scrape(billed)
    done = chat(billed, key, "#sim tokens=9 reasoning=3", model="deepseek-chat")
    assert done.status_code == 200
    row = billed.usage_row(done.headers["x-request-id"])
    deadline = time.monotonic() + 5
    after = scrape(billed)
    while value(after, "relay_requests_total", model="deepseek-chat", package="paid",
                status="200") == value(before, "relay_requests_total", model="deepseek-chat",
                                       package="paid", status="200"):
        assert time.monotonic() < deadline
        after = scrape(billed)

    def delta(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    labels = {"model": "deepseek-chat", "package": "paid"}
    assert delta("relay_requests_total", status="200", **labels) == 1
    assert delta("relay_tokens_total", kind="input", **labels) == row["input_tokens"]
    assert delta("relay_tokens_total", kind="output", **labels) == row["output_tokens"]
    assert delta("relay_tokens_total", kind="reasoning", **labels) == row["reasoning_tokens"] == 3
    assert abs(delta("relay_credits_charged_total", **labels) - row["cost_nano"] / 1e9) < 1e-12
    assert delta("relay_time_to_first_token_seconds_count", model="deepseek-chat") == 1
    assert delta("relay_time_to_first_token_seconds_bucket", model="deepseek-chat",
                 le="+Inf") == 1
    assert delta("relay_queue_wait_seconds_count", pool="main") == 1
    assert value(after, "relay_in_flight", guard="account", name="sim-chat") == 0
    assert value(after, "relay_account_healthy", account="sim-chat") == 1


def test_made_up_model_names_do_not_become_series(billed: Relay) -> None:
    key, _ = billed.create_paid_key()
    name = f"made-up-{time.monotonic_ns()}"
    assert chat(billed, key, "hi", model=name).status_code == 404
    time.sleep(0.2)
    samples = scrape(billed)
    assert not any(name in str(labels) for _, labels in samples)
    assert value(samples, "relay_requests_total", model="unknown", package="paid",
                 status="404") >= 1


def test_upstream_errors_are_counted_by_account(billed: Relay) -> None:
    key, _ = billed.create_paid_key()
    before = scrape(billed)
    failed = httpx2.post(
        billed.url + "/v1/responses", headers={"authorization": f"Bearer {key}"},
        json={"model": "gpt-5", "input": "#sim fault=500"}, timeout=10,
    )
    assert failed.status_code == 500
    with httpx2.stream(
        "POST", billed.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
        json={"model": "gpt-5", "stream": True,
              "messages": [{"role": "user", "content": "#sim tokens=20 fault=drop"}]},
        timeout=10,
    ) as dropped:
        dropped.read()
    billed.usage_row(dropped.headers["x-request-id"])
    time.sleep(0.1)
    after = scrape(billed)
    assert value(after, "relay_upstream_errors_total", account="sim-responses", status="500") - (
        value(before, "relay_upstream_errors_total", account="sim-responses", status="500")
    ) == 1
    assert value(after, "relay_upstream_stream_errors_total", account="sim-chat") - value(
        before, "relay_upstream_stream_errors_total", account="sim-chat"
    ) == 1


def test_queue_depth_and_in_flight_per_guard_while_a_key_waits(billed: Relay) -> None:
    key, key_id = billed.create_paid_key(package="tight")
    headers = {"authorization": f"Bearer {key}"}
    url = billed.url + "/v1/chat/completions"
    body = {"model": "gpt-5", "stream": True,
            "messages": [{"role": "user", "content": "#sim tokens=100 delay=0.01"}]}
    with httpx2.Client(timeout=10) as client:
        with client.stream("POST", url, json=body, headers=headers) as running:
            lines = running.iter_lines()
            next(lines)
            waiting = threading.Thread(
                target=lambda: httpx2.post(url, json=body, headers=headers, timeout=10)
            )
            waiting.start()
            deadline = time.monotonic() + 5
            samples = scrape(billed)
            while not value(samples, "relay_key_queued", key=key_id):
                assert time.monotonic() < deadline
                samples = scrape(billed)
            assert value(samples, "relay_queue_depth", pool="main") >= 1
            assert value(samples, "relay_in_flight", guard="key", name=key_id) == 1
            assert value(samples, "relay_in_flight", guard="pool", name="main") >= 1
            assert value(samples, "relay_in_flight", guard="global", name="global") >= 1
            assert value(samples, "relay_credit_holds") >= 2
            for _ in lines:
                pass
    waiting.join()
    billed.wait_idle()
    assert value(scrape(billed), "relay_key_queued", key=key_id) == 0


# A relay of this module's own, so that histograms and counters start at zero and every sample
# can be checked against exactly the requests made here.
@pytest.fixture(scope="module")
def fresh(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with running_relay(tmp_path_factory.mktemp("metrics"), sim.url, body=BILLING_BODY) as relay:
        yield relay


def families(relay: Relay) -> dict[str, Metric]:
    """Every metric family by name, parsed by prometheus_client."""
    response = httpx2.get(
        relay.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def scrape_when(relay: Relay, ready: Callable[[dict], bool]) -> dict:
    """Scrape until ``ready(samples)`` (the usage writer counts a request just after it ends)."""
    deadline = time.monotonic() + 5
    samples = scrape(relay)
    while not ready(samples):
        assert time.monotonic() < deadline, samples
        time.sleep(0.02)
        samples = scrape(relay)
    return samples


def test_histograms_put_each_request_in_its_bucket(fresh: Relay) -> None:
    key, _ = fresh.create_paid_key()
    # Not streamed, so the first byte to the client waits for the upstream's whole answer.
    fast = [chat(fresh, key, "#sim tokens=3") for _ in range(3)]
    slow = [chat(fresh, key, "#sim tokens=3 ttft=1.2") for _ in range(2)]
    assert [done.status_code for done in fast + slow] == [200] * 5
    samples = scrape_when(
        fresh, lambda s: value(s, "relay_requests_total", model="gpt-5", package="paid",
                               status="200") == 5,
    )
    ttft = {le: value(samples, "relay_time_to_first_token_seconds_bucket", model="gpt-5", le=le)
            for le in ("0.5", "1.0", "2.5", "+Inf")}
    assert ttft == {"0.5": 3, "1.0": 3, "2.5": 5, "+Inf": 5}
    assert value(samples, "relay_time_to_first_token_seconds_count", model="gpt-5") == 5
    assert 2.4 <= value(samples, "relay_time_to_first_token_seconds_sum", model="gpt-5") < 5
    duration = {le: value(samples, "relay_request_duration_seconds_bucket", model="gpt-5", le=le)
                for le in ("1.0", "2.5", "+Inf")}
    assert duration == {"1.0": 3, "2.5": 5, "+Inf": 5}
    assert value(samples, "relay_request_duration_seconds_count", model="gpt-5") == 5
    assert value(samples, "relay_queue_wait_seconds_count", pool="main") == 5
    assert value(samples, "relay_queue_wait_seconds_bucket", pool="main", le="+Inf") == 5
    assert value(samples, "relay_request_errors_total", status="200", code="none") == 0

    family = families(fresh)["relay_time_to_first_token_seconds"]
    assert family.type == "histogram"
    buckets = [s.value for s in family.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative, as the format requires
    assert not any(name.endswith("_created") for name, _ in samples)


def test_errors_are_counted_by_status_and_code(fresh: Relay) -> None:
    key, _ = fresh.create_paid_key()
    broke, _ = fresh.create_paid_key(credits="0")
    before = scrape(fresh)
    unknown = [chat(fresh, key, "hi", model="no-such-model") for _ in range(2)]
    assert [done.status_code for done in unknown] == [404] * 2
    assert chat(fresh, broke, "hi").status_code == 402
    failed = chat(fresh, key, "#sim fault=500")
    assert failed.status_code == 500
    code = failed.json()["error"]["code"] or failed.json()["error"]["type"]
    after = scrape_when(
        fresh, lambda s: value(s, "relay_requests_total", model="gpt-5", package="paid",
                               status="500") == 1,
    )

    def delta(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert delta("relay_request_errors_total", status="404", code="model_not_found") == 2
    assert delta("relay_request_errors_total", status="402", code="insufficient_quota") == 1
    assert delta("relay_request_errors_total", status="500", code=code) == 1
    assert delta("relay_requests_total", model="unknown", package="paid", status="404") == 2
    assert delta("relay_requests_total", model="gpt-5", package="paid", status="402") == 1
    assert sum(
        v - before.get(sample, 0) for sample, v in after.items()
        if sample[0] == "relay_request_errors_total"
    ) == 4


def test_gauges_show_a_request_in_flight_and_are_zero_when_idle(fresh: Relay) -> None:
    key, key_id = fresh.create_paid_key()
    body = {"model": "gpt-5", "stream": True,
            "messages": [{"role": "user", "content": "#sim tokens=50 delay=0.02"}]}
    with httpx2.stream("POST", fresh.url + "/v1/chat/completions", json=body, timeout=10,
                       headers={"authorization": f"Bearer {key}"}) as running:
        lines = running.iter_lines()
        next(lines)
        during = scrape(fresh)
        for _ in lines:
            pass
    assert value(during, "relay_active_requests") == 1
    assert value(during, "relay_in_flight", guard="key", name=key_id) == 1
    assert value(during, "relay_in_flight", guard="global", name="global") == 1
    assert value(during, "relay_reserved_tokens", guard="pool", name="main") > 0
    assert value(during, "relay_credit_holds") == 1
    assert value(during, "relay_credits_held") > 0
    fresh.wait_idle()
    idle = scrape(fresh)
    live = ("relay_active_requests", "relay_in_flight", "relay_reserved_tokens",
            "relay_queue_depth", "relay_queue_oldest_wait_seconds", "relay_key_queued",
            "relay_credit_holds", "relay_credits_held")
    assert {name: v for (name, _), v in idle.items() if name in live and v} == {}
    assert ("relay_in_flight", (("guard", "key"), ("name", key_id))) not in idle
    assert value(idle, "relay_account_healthy", account="sim-chat") == 1


def test_error_codes_stay_a_bounded_label() -> None:
    config = parse_config(tomllib.loads(BILLING_BODY.replace("SIM_URL", "http://127.0.0.1:9")))
    metrics = Metrics(config)
    for index in range(MAX_ERROR_CODES + 20):
        metrics.observe(UsageRecord("r", "k", "paid", "chat", "gpt-5", status=502,
                                    error_code=f"upstream_code_{index}"))
    metrics.observe(UsageRecord("r", "k", "paid", "chat", "gpt-5", status=400,
                                error_code="Not A Code\n{}"))
    codes = {sample.labels["code"] for family in metrics.errors.collect()
             for sample in family.samples}
    assert len(codes) == MAX_ERROR_CODES + 1
    assert "other" in codes
    assert "upstream_code_0" in codes and f"upstream_code_{MAX_ERROR_CODES}" not in codes
    # The relay's metrics live in its own registry, not prometheus_client's global one.
    assert not any(
        family.name.startswith("relay_") for family in prometheus_client.REGISTRY.collect()
    )
