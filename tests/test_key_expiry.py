"""Keys that expire and rotate (issue 16, part 6), through the real CLI and the real relay: an
expired key, or a rotated-away secret past its grace, is a 401 ``key_expired`` that says when;
a rotation keeps the key's id, limits, credits and usage; a database made before expiry
existed opens with its keys intact; the admin API and the legacy billing route show the expiry."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
import time
from pathlib import Path

import httpx2
import pytest

from .conftest import BILLING_BODY, Relay, Sim, start_relay
from .test_credits import chat, rows_of


def keys(relay: Relay, *args: str):
    """``relay keys …`` against ``relay``'s configuration."""
    return relay.cli("keys", *args, "--config", str(relay.config_path))


def create(relay: Relay, *args: str) -> dict:
    done = keys(relay, "create", "--package", "paid", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def listed(relay: Relay, key_id: str) -> dict:
    done = keys(relay, "list", "--json")
    assert done.returncode == 0, done.stderr
    return next(entry for entry in json.loads(done.stdout) if entry["id"] == key_id)


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(int(ts), dt.UTC).isoformat().replace("+00:00", "Z")


def get(relay: Relay, key: str, path: str = "/v1/balance") -> httpx2.Response:
    return httpx2.get(relay.url + path, headers={"authorization": f"Bearer {key}"}, timeout=10)


def wait_for_status(relay: Relay, key: str, status: int, timeout: float = 3.0) -> httpx2.Response:
    """Poll the key's balance until it answers ``status`` (a CLI change reaches the running
    relay within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        response = get(relay, key)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def assert_key_expired(response: httpx2.Response, when: float, *words: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "key_expired"
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert f"expired at {iso(when)}" in error["message"], error["message"]
    for word in words:
        assert word in error["message"], error["message"]


def test_a_key_created_with_an_expiry_works_until_it_expires(billed: Relay) -> None:
    created = create(billed, "--expires-in", "2s")
    key, expires_at = created["key"], created["expires_at"]
    assert expires_at == pytest.approx(time.time() + 2, abs=1.5)
    assert chat(billed, key, "#sim tokens=2").status_code == 200
    assert get(billed, key).json()["key"]["expires_at"] == expires_at
    assert listed(billed, created["id"])["expired"] is False

    time.sleep(max(0.0, expires_at - time.time()) + 0.05)
    refused = chat(billed, key, "#sim tokens=2")
    assert_key_expired(refused, expires_at, created["hint"])
    assert_key_expired(get(billed, key), expires_at)  # self-service too
    entry = listed(billed, created["id"])
    assert entry["expired"] is True and entry["expires_at"] == expires_at
    table = keys(billed, "list")
    line = next(row for row in table.stdout.splitlines() if created["id"] in row)
    assert " expired " in line and iso(expires_at)[:16].replace("T", " ") in line


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("2099-01-01", "2099-01-01T00:00:00Z"),  # a date: its first second, UTC
        ("2099-01-01T12:30:00", "2099-01-01T12:30:00Z"),  # no zone: UTC
        ("2099-01-01T12:30:00+02:00", "2099-01-01T10:30:00Z"),
        ("2099-01-01T12:30:00Z", "2099-01-01T12:30:00Z"),
    ],
)
def test_expires_at_takes_iso_dates_and_times_utc_unless_they_say(
    billed: Relay, option: str, expected: str
) -> None:
    created = create(billed, "--expires-at", option)
    assert iso(created["expires_at"]) == expected


def test_expires_in_takes_units() -> None:
    from relay.ledger.expiry import parse_duration

    assert parse_duration("45s") == 45
    assert parse_duration("90m") == 5400
    assert parse_duration("24h") == 86_400
    assert parse_duration("30d") == 30 * 86_400
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("1.5h") == 5400


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expires-in", "30"], "--expires-in must be a number with a unit s, m, h or d"),
        (["--expires-in", "3 weeks"], "--expires-in must be a number with a unit"),
        (["--expires-in", "0s"], "--expires-in must be more than 0s"),
        (["--expires-in=-1d"], "--expires-in must be a number with a unit"),
        (["--expires-in", "99999d"], "--expires-in must be at most 100 years"),
        (["--expires-at", "2020-01-01"], "--expires-at 2020-01-01T00:00:00Z is in the past"),
        (["--expires-at", "tomorrow"], "--expires-at must be an ISO 8601 date or date-time"),
        (["--expires-at", "2099-13-01"], "--expires-at must be an ISO 8601 date"),
    ],
)
def test_a_bad_or_past_expiry_is_one_clear_line(billed: Relay, args, message) -> None:
    done = keys(billed, "create", "--package", "paid", *args)
    assert done.returncode == 1
    assert message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    done = keys(billed, "set-expiry", "key_whatever", *args)
    assert done.returncode == 1 and message in done.stderr, done.stderr


def test_expires_in_and_at_together_is_a_usage_error(billed: Relay) -> None:
    done = keys(
        billed, "create", "--package", "paid", "--expires-in", "1d", "--expires-at", "2099-01-01"
    )
    assert done.returncode == 2 and "not allowed with" in done.stderr
    done = keys(billed, "set-expiry", "key_x")  # one of the three is required
    assert done.returncode == 2 and "--never" in done.stderr


def test_set_expiry_reaches_the_running_relay_and_never_lifts_it(billed: Relay) -> None:
    created = create(billed)
    key, key_id = created["key"], created["id"]
    assert created["expires_at"] is None
    assert chat(billed, key, "#sim tokens=2").status_code == 200

    done = keys(billed, "set-expiry", key_id, "--expires-in", "1s")
    assert done.returncode == 0, done.stderr
    expires_at = listed(billed, key_id)["expires_at"]
    assert f"{key_id} ({created['hint']}): expires at {iso(expires_at)}" in done.stdout
    assert_key_expired(wait_for_status(billed, key, 401), expires_at)

    done = keys(billed, "set-expiry", key, "--never")  # by the key itself
    assert done.returncode == 0 and "never expires" in done.stdout
    assert wait_for_status(billed, key, 200).status_code == 200
    assert listed(billed, key_id)["expires_at"] is None

    later = keys(billed, "set-expiry", key_id, "--expires-at", "2099-06-01", "--json")
    assert json.loads(later.stdout)["expires_at"] == dt.datetime(
        2099, 6, 1, tzinfo=dt.UTC
    ).timestamp()
    assert wait_for_status(billed, key, 200).status_code == 200

    missing = keys(billed, "set-expiry", "key_doesnotexist", "--never")
    assert missing.returncode == 1 and "no key matches 'key_doesnotexist'" in missing.stderr


def test_rotate_keeps_the_key_and_the_old_secret_works_for_its_grace(billed: Relay) -> None:
    created = create(billed, "--credits", "7", "--rpm", "500", "--expires-at", "2099-01-01")
    old, key_id = created["key"], created["id"]
    first = chat(billed, old, "#sim tokens=5")
    assert first.status_code == 200
    rows_of(billed, key_id, count=1)

    done = keys(billed, "rotate", key_id, "--grace", "2s", "--json")
    assert done.returncode == 0, done.stderr
    rotated = json.loads(done.stdout)
    new = rotated["key"]
    assert new != old and new.startswith("cr_") and rotated["id"] == key_id
    assert rotated["hint"] != created["hint"]
    assert rotated["previous_secret"]["hint"] == created["hint"]
    grace_end = rotated["previous_secret"]["expires_at"]
    assert grace_end == pytest.approx(time.time() + 2, abs=1.5)

    # both secrets work during the grace, as the same key
    assert chat(billed, new, "#sim tokens=5").status_code == 200
    assert chat(billed, old, "#sim tokens=5").status_code == 200
    rows = rows_of(billed, key_id, count=3)
    assert len(rows) == 3 and {row["key_id"] for row in rows} == {key_id}
    entry = listed(billed, key_id)
    assert entry["limits"] == {"rpm": 500} and entry["credits_granted"] == 7
    assert entry["usage"]["calls"] == 3
    assert entry["expires_at"] == created["expires_at"]  # the key's expiry stays
    spent = sum(row["cost_nano"] for row in rows) / 1e9
    assert get(billed, new).json()["used"] == pytest.approx(spent)
    calls = get(billed, new, "/v1/calls").json()["data"]
    assert first.headers["x-request-id"] in [call["request_id"] for call in calls]

    time.sleep(max(0.0, grace_end - time.time()) + 0.05)
    assert_key_expired(
        chat(billed, old, "#sim tokens=2"), grace_end, created["hint"], "rotated"
    )
    assert chat(billed, new, "#sim tokens=2").status_code == 200
    assert listed(billed, key_id)["previous_secret"]["expired"] is True


def test_rotate_without_grace_and_twice_within_a_grace(billed: Relay) -> None:
    created = create(billed)
    first, key_id = created["key"], created["id"]
    done = keys(billed, "rotate", key_id)  # no --grace: the old secret stops now
    assert done.returncode == 0, done.stderr
    second = done.stdout.strip()
    assert second.startswith("cr_") and "stopped working now" in done.stderr
    assert "shown only now" in done.stderr
    refused = wait_for_status(billed, first, 401)
    assert refused.json()["error"]["code"] == "key_expired"
    assert "rotated" in refused.json()["error"]["message"]
    assert get(billed, second).status_code == 200

    # Rotating again within a grace: only the most recent previous secret keeps it.
    done = keys(billed, "rotate", second, "--grace", "1h")  # by the key itself
    assert done.returncode == 0, done.stderr
    third = done.stdout.strip()
    assert "works until" in done.stderr
    done = keys(billed, "rotate", key_id, "--grace", "1h")
    fourth = done.stdout.strip()
    second_hint = f"{second[:7]}…{second[-4:]}"
    assert f"(and {second_hint}, rotated away before, stopped working now)" in done.stderr
    assert wait_for_status(billed, second, 401).json()["error"]["code"] == "invalid_api_key"
    assert get(billed, third).status_code == 200  # in its grace
    assert get(billed, fourth).status_code == 200
    # the first secret is unknown by now: today's answer to a wrong key
    assert get(billed, first).json()["error"]["code"] == "invalid_api_key"


def test_rotate_mistakes_are_one_clear_line_and_an_expired_key_is_told(billed: Relay) -> None:
    created = create(billed)
    for args, message in (
        (["key_doesnotexist"], "no key matches 'key_doesnotexist'"),
        ([created["id"], "--grace", "soon"], "--grace must be a number with a unit"),
    ):
        done = keys(billed, "rotate", *args)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    expiring = create(billed, "--expires-in", "1s")
    time.sleep(max(0.0, expiring["expires_at"] - time.time()) + 0.05)
    done = keys(billed, "rotate", expiring["id"])  # allowed, and it says what that means
    assert done.returncode == 0 and "neither secret works until" in done.stderr
    assert get(billed, done.stdout.strip()).json()["error"]["code"] == "key_expired"
    assert keys(billed, "revoke", created["id"]).returncode == 0
    done = keys(billed, "rotate", created["id"])
    assert done.returncode == 1 and "is revoked" in done.stderr


def test_the_admin_api_creates_expiring_keys_sets_expiry_and_rotates(billed: Relay) -> None:
    made = billed.admin("POST", "/admin/keys", {"package": "paid", "expires_in": "30d"})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["expires_at"] == pytest.approx(time.time() + 30 * 86_400, abs=5)
    key_id, key = body["id"], body["key"]
    listing = billed.admin("GET", "/admin/keys").json()["data"]
    assert next(k for k in listing if k["id"] == key_id)["expires_at"] == body["expires_at"]
    assert billed.admin("GET", f"/admin/keys/{key_id}").json()["expires_at"] == body["expires_at"]

    at = billed.admin("POST", f"/admin/keys/{key_id}/expiry", {"expires_at": "2099-03-04"})
    assert at.status_code == 200 and iso(at.json()["expires_at"]) == "2099-03-04T00:00:00Z"
    soon = billed.admin("POST", f"/admin/keys/{key_id}/expiry", {"expires_in": 1})
    assert soon.status_code == 200
    time.sleep(max(0.0, soon.json()["expires_at"] - time.time()) + 0.05)
    assert_key_expired(get(billed, key), soon.json()["expires_at"])  # at once: no refresh
    never = billed.admin("POST", f"/admin/keys/{key_id}/expiry", {"expires_at": None})
    assert never.status_code == 200 and never.json()["expires_at"] is None
    assert get(billed, key).status_code == 200

    rotated = billed.admin("POST", f"/admin/keys/{key_id}/rotate", {"grace": "1h"})
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["key"]
    assert rotated.json()["id"] == key_id
    assert rotated.json()["previous_secret"]["expires_at"] == pytest.approx(
        time.time() + 3600, abs=5
    )
    assert get(billed, new).status_code == 200 and get(billed, key).status_code == 200
    # no body: no grace, and this process's ring drops the old secret at once
    again = httpx2.post(
        f"{billed.url}/admin/keys/{key_id}/rotate",
        headers={"authorization": "Bearer test-admin-token"},
    )
    assert again.status_code == 200, again.text
    assert get(billed, new).json()["error"]["code"] == "key_expired"
    assert get(billed, key).json()["error"]["code"] == "invalid_api_key"
    assert get(billed, again.json()["key"]).status_code == 200
    assert billed.admin("POST", f"/admin/keys/{key_id}/revoke").status_code == 200
    refused = billed.admin("POST", f"/admin/keys/{key_id}/rotate", {})
    assert refused.status_code == 400 and "is revoked" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/admin/keys", {"package": "paid", "expires_in": "forever"}, "expires_in"),
        ("/admin/keys", {"package": "paid", "expires_at": "2001-01-01"}, "expires_at"),
        ("/admin/keys", {"package": "paid", "expires_in": "1d", "expires_at": 1}, "expires_at"),
        ("/admin/keys", {"package": "paid", "expires_at": ["x"]}, "expires_at"),
        ("KEY/expiry", {"expires_in": "-3h"}, "expires_in"),
        ("KEY/expiry", {"when": "2099-01-01"}, "when"),
        ("KEY/rotate", {"grace": "a while"}, "grace"),
        ("KEY/rotate", {"grace": True}, "grace"),
    ],
)
def test_bad_expiry_requests_are_400_naming_the_field(billed: Relay, path, body, param) -> None:
    if path.startswith("KEY"):
        key_id = billed.admin("POST", "/admin/keys", {"package": "paid"}).json()["id"]
        path = f"/admin/keys/{key_id}" + path.removeprefix("KEY")
    response = billed.admin("POST", path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_billing_route_reports_the_expiry_as_access_until(billed: Relay) -> None:
    never = create(billed)
    for path in ("/v1/dashboard/billing/subscription", "/dashboard/billing/subscription"):
        assert get(billed, never["key"], path).json()["access_until"] == 0
    expiring = create(billed, "--expires-at", "2099-01-01T00:00:00Z")
    for path in ("/v1/dashboard/billing/subscription", "/dashboard/billing/subscription"):
        answer = get(billed, expiring["key"], path).json()
        assert answer["access_until"] == int(expiring["expires_at"]) == 4070908800


#: The schema the relay made before keys could expire (as of issue 16, part 5), exactly.
SCHEMA_BEFORE_EXPIRY = """
CREATE TABLE "api_keys" (
   "id" TEXT PRIMARY KEY,
   "key_hash" TEXT NOT NULL,
   "hint" TEXT,
   "name" TEXT,
   "package" TEXT NOT NULL,
   "created_at" REAL NOT NULL,
   "revoked_at" REAL
, "limits" TEXT, "credits_granted_nano" INTEGER NOT NULL DEFAULT 0,
  "credits_used_nano" INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX "idx_api_keys_key_hash" ON "api_keys" ("key_hash");
CREATE TABLE "usage" (
   "id" INTEGER PRIMARY KEY, "ts" REAL, "request_id" TEXT, "key_id" TEXT, "package" TEXT,
   "endpoint" TEXT, "model" TEXT, "upstream_model" TEXT, "account" TEXT, "stream" INTEGER,
   "status" INTEGER, "error_code" TEXT, "input_tokens" INTEGER, "cached_tokens" INTEGER,
   "output_tokens" INTEGER, "reasoning_tokens" INTEGER, "usage_source" TEXT,
   "latency_ms" REAL, "ttft_ms" REAL, "queue_ms" REAL, "client_disconnected" INTEGER,
   "cost_nano" INTEGER
);
CREATE INDEX "idx_usage_key_id_ts" ON "usage" ("key_id", "ts");
CREATE TABLE "credit_grants" (
   "id" INTEGER PRIMARY KEY, "ts" REAL, "key_id" TEXT, "amount_nano" INTEGER, "note" TEXT
);
CREATE INDEX "idx_credit_grants_key_id_ts" ON "credit_grants" ("key_id", "ts");
"""


def test_a_database_from_before_expiry_opens_with_its_keys(sim: Sim, tmp_path: Path) -> None:
    old_key = "cr_" + "o" * 28 + "ldky"
    database = tmp_path / "relay.db"
    connection = sqlite3.connect(database)
    with connection:
        connection.executescript(SCHEMA_BEFORE_EXPIRY)
        connection.execute(
            "insert into api_keys values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ["key_00000000000000aa", hashlib.sha256(old_key.encode()).hexdigest(),
             "cr_oooo…ldky", "from before", "paid", time.time() - 86_400, None, '{"rpm": 900}',
             5 * 10**9, 10**9],
        )
        connection.execute(
            "insert into credit_grants (ts, key_id, amount_nano, note) values (?, ?, ?, ?)",
            [time.time() - 86_400, "key_00000000000000aa", 5 * 10**9, "initial credits"],
        )
        connection.execute(
            "insert into usage (ts, request_id, key_id, package, endpoint, model, status, "
            "error_code, input_tokens, output_tokens, cost_nano) "
            "values (?, 'req_old', 'key_00000000000000aa', 'paid', 'chat', 'gpt-5', 200, '', "
            "10, 20, ?)",
            [time.time() - 3600, 10**9],
        )
    connection.close()

    relay = start_relay(tmp_path, sim.url, body=BILLING_BODY)
    try:
        balance = get(relay, old_key)
        assert balance.status_code == 200, balance.text
        assert balance.json()["granted"] == 5 and balance.json()["used"] == 1
        assert balance.json()["key"]["expires_at"] is None
        assert chat(relay, old_key, "#sim tokens=2").status_code == 200
        entry = listed(relay, "key_00000000000000aa")
        assert entry["limits"] == {"rpm": 900} and entry["expires_at"] is None
        assert entry["name"] == "from before" and entry["usage"]["calls"] >= 1

        done = keys(relay, "rotate", "key_00000000000000aa", "--grace", "1h")
        assert done.returncode == 0, done.stderr
        new = done.stdout.strip()
        assert new.startswith("cr_")  # the prefix read back from the old hint
        assert wait_for_status(relay, new, 200).status_code == 200
        assert get(relay, old_key).status_code == 200  # in its grace
        calls = get(relay, new, "/v1/calls").json()["data"]
        assert "req_old" in [call["request_id"] for call in calls]
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log, log
    columns = {
        row[1] for row in sqlite3.connect(database).execute("pragma table_info(api_keys)")
    }
    assert {"expires_at", "rotated_at", "previous_key_hash", "previous_expires_at"} <= columns
