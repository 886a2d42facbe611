"""Self-service endpoints, authenticated by the key itself: the numbers equal the ledger's, the
legacy billing shapes IDE plugins read, limits with their current use, recent calls."""

from __future__ import annotations

import datetime as dt
import json
import time

import httpx2
import pytest

from relay.api.discovery import BASE_PATHS
from relay.ledger.prices import NANO

from .conftest import Relay
from .test_credits import chat, rows_of

ROUTES = ("balance", "dashboard/billing/subscription", "dashboard/billing/usage", "usage",
          "limits", "calls")


def get(relay: Relay, path: str, key: str, **params) -> httpx2.Response:
    return httpx2.get(
        relay.url + path, params=params, timeout=10, headers={"authorization": f"Bearer {key}"}
    )


@pytest.fixture(scope="module")
def used_key(billed: Relay) -> tuple[str, str, list[dict]]:
    """A key with calls on three models, a failed call and a streamed one."""
    key, key_id = billed.create_paid_key()
    for content, model in (
        ("one #sim tokens=7", "gpt-5"),
        ("two #sim tokens=9 reasoning=4", "gpt-5"),
        ("three " * 30 + "#sim tokens=5 cached=10", "deepseek-chat"),
        ("four #sim tokens=11", "gpt-5.5"),
        ("five #sim fault=400", "gpt-5"),
    ):
        chat(billed, key, content, model=model)
    with httpx2.stream(
        "POST", billed.url + "/v1/responses", headers={"authorization": f"Bearer {key}"},
        json={"model": "gpt-5.5", "input": "six #sim tokens=6", "stream": True}, timeout=10,
    ) as response:
        response.read()
    return key, key_id, rows_of(billed, key_id, count=6)


@pytest.mark.parametrize("base", BASE_PATHS)
def test_every_self_service_route_under_every_base_path(billed: Relay, used_key, base) -> None:
    key = used_key[0]
    for route in ROUTES:
        response = get(billed, f"{base}/{route}", key)
        assert response.status_code == 200, (route, response.text)
        assert response.json()["object"] in {
            "balance", "billing_subscription", "list", "usage", "limits"
        }


def test_balance_equals_the_ledger(billed: Relay, used_key) -> None:
    key, key_id, rows = used_key
    spent = sum(row["cost_nano"] for row in rows)
    body = get(billed, "/v1/balance", key).json()
    assert body["granted"] == 10 and body["used"] == spent / NANO
    assert body["balance"] == (10 * NANO - spent) / NANO == body["available"]
    assert body["held"] == 0
    assert body["key"]["id"] == key_id and body["key"]["package"] == "paid"


def test_usage_by_model_and_by_day_equals_the_ledger(billed: Relay, used_key) -> None:
    key, _, rows = used_key
    body = get(billed, "/v1/usage", key, group_by="model").json()
    assert body["group_by"] == "model"
    totals = body["totals"]
    assert totals["calls"] == len(rows) == 6
    assert totals["errors"] == 1
    assert totals["input_tokens"] == sum(r["input_tokens"] for r in rows)
    assert totals["cached_tokens"] == sum(r["cached_tokens"] for r in rows) == 10
    assert totals["output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert totals["reasoning_tokens"] == sum(r["reasoning_tokens"] for r in rows) == 4
    assert totals["credits"] == sum(r["cost_nano"] for r in rows) / NANO
    by_model = {entry["model"]: entry for entry in body["data"]}
    assert set(by_model) == {"gpt-5", "gpt-5.5", "deepseek-chat"}
    for model, entry in by_model.items():
        mine = [r for r in rows if r["model"] == model]
        assert entry["calls"] == len(mine)
        assert entry["output_tokens"] == sum(r["output_tokens"] for r in mine)
        assert entry["credits"] == sum(r["cost_nano"] for r in mine) / NANO
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    days = get(billed, "/v1/usage", key, group_by="day", to=today).json()
    assert [entry["day"] for entry in days["data"]] == [today]
    assert days["data"][0]["calls"] == 6
    # a window that ends before the calls sees none of them
    empty = get(billed, "/v1/usage", key, to="2001-01-01", **{"from": "2000-01-01"}).json()
    assert empty["totals"]["calls"] == 0 and empty["data"] == []


def test_recent_calls_are_the_ledgers_rows_newest_first(billed: Relay, used_key) -> None:
    key, _, rows = used_key
    calls = get(billed, "/v1/calls", key, limit="4").json()["data"]
    assert [c["request_id"] for c in calls] == [r["request_id"] for r in rows[:4]]
    newest = calls[0]
    row = rows[0]
    assert newest["endpoint"] == "responses" and newest["stream"] is True
    assert newest["output_tokens"] == row["output_tokens"]
    assert newest["credits"] == row["cost_nano"] / NANO
    assert newest["latency_ms"] == round(row["latency_ms"], 1)
    failed = next(c for c in get(billed, "/v1/calls", key).json()["data"] if c["status"] == 400)
    assert failed["error"] and failed["credits"] == 0


def test_legacy_billing_shapes(billed: Relay, used_key) -> None:
    """What IDE plugins and balance tools read: hard_limit_usd, and total_usage in cents."""
    key, _, rows = used_key
    spent = sum(row["cost_nano"] for row in rows)
    sub = get(billed, "/v1/dashboard/billing/subscription", key).json()
    assert sub["object"] == "billing_subscription" and sub["has_payment_method"] is True
    assert sub["hard_limit_usd"] == sub["soft_limit_usd"] == sub["system_hard_limit_usd"] == 10
    start = (dt.date.today() - dt.timedelta(days=99)).isoformat()
    end = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    usage = get(billed, "/v1/dashboard/billing/usage", key, start_date=start,
                end_date=end).json()
    assert usage["object"] == "list"
    assert usage["total_usage"] == pytest.approx(spent / NANO * 100, abs=1e-9)
    # the computation the tools do gives what is left
    assert sub["hard_limit_usd"] - usage["total_usage"] / 100 == pytest.approx(
        (10 * NANO - spent) / NANO, abs=1e-9
    )
    items = [item for day in usage["daily_costs"] for item in day["line_items"]]
    assert {item["name"] for item in items} == {"gpt-5", "gpt-5.5", "deepseek-chat"}
    assert sum(item["cost"] for item in items) == pytest.approx(usage["total_usage"], abs=1e-9)
    # also at the root, where OpenAI's own was
    assert get(billed, "/dashboard/billing/subscription", key).json() == sub


def test_limits_show_the_keys_limits_and_current_use(billed: Relay) -> None:
    done = billed.cli(
        "keys", "create", "--config", str(billed.config_path), "--package", "paid", "--json",
        "--tpm", "100000", "--rpm", "60", "--max-concurrency", "3", "--max-queue", "5",
    )
    assert done.returncode == 0, done.stderr
    key = json.loads(done.stdout)["key"]
    before = get(billed, "/v1/limits", key).json()
    assert before["tpm"] == {"limit": 100000, "remaining": 100000, "used": 0, "reset_s": 0}
    assert before["rpm"] == {"limit": 60, "remaining": 60, "used": 0, "reset_s": 0}
    assert before["concurrency"] == {"limit": 3, "in_flight": 0}
    assert before["queue"]["limit"] == 5 and before["queue"]["queued"] == 0
    assert before["overridden"] == ["max_concurrency", "max_queue", "rpm", "tpm"]
    with httpx2.Client(timeout=10) as client:
        with client.stream(
            "POST", billed.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "gpt-5", "stream": True,
                  "messages": [{"role": "user", "content": "#sim tokens=100 delay=0.01"}]},
        ) as response:
            lines = response.iter_lines()
            next(lines)
            during = get(billed, "/v1/limits", key).json()
            for _ in lines:
                pass
    assert during["concurrency"]["in_flight"] == 1
    assert during["rpm"]["limit"] == 60 and during["rpm"]["used"] == 1
    assert during["tpm"]["used"] > 0 and during["tpm"]["reset_s"] > 0
    assert during["package"] == "paid" and during["pool"] == "main"


def test_a_wrong_or_missing_key_is_401_and_a_key_in_the_url_is_not_read(billed: Relay) -> None:
    wrong = get(billed, "/v1/balance", "cr_not-a-real-key-at-all-0000")
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    key, _ = billed.create_paid_key()
    in_url = httpx2.get(billed.url + "/v1/balance", params={"key": key, "api_key": key})
    assert in_url.status_code == 401 and in_url.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize(
    ("route", "params", "param"),
    [
        ("usage", {"group_by": "week"}, "group_by"),
        ("usage", {"from": "yesterday"}, "from"),
        ("usage", {"from": "2025-02-01", "to": "2025-01-01"}, "to"),
        ("calls", {"limit": "0"}, "limit"),
        ("calls", {"limit": "many"}, "limit"),
        ("dashboard/billing/usage", {"start_date": "01/02/2025"}, "start_date"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(billed: Relay, route, params, param) -> None:
    key, _ = billed.create_paid_key()
    response = get(billed, f"/v1/{route}", key, **params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_usage_accepts_dates_iso_times_and_unix_seconds(billed: Relay, used_key) -> None:
    key = used_key[0]
    now = time.time()
    for start in ("2000-01-01", "2000-01-01T00:00:00Z", "946684800", str(int(now - 3600))):
        body = get(billed, "/v1/usage", key, **{"from": start}).json()
        assert body["totals"]["calls"] == 6, start
