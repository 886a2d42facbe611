"""``GET /metrics``: admin token, the text exposition format (read back with the reference
parser, prometheus_client's), and counters that move by exactly what a request did."""

from __future__ import annotations

import threading
import time

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ADMIN_TOKEN, Relay
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
