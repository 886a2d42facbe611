"""The admin API and its CLI: keys (create, list with usage, top up, limits, revoke), accounts
(health, disable, enable) and live queues, each change seen by the running relay at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx2
import pytest

from .conftest import ADMIN_TOKEN, ROOT, Relay
from .test_credits import balance, chat, rows_of


def test_the_admin_api_needs_the_admin_token(billed: Relay) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "wrong"}):
        response = httpx2.get(billed.url + "/admin/keys", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_admin_token"
    key, _ = billed.create_paid_key()
    # a relay key is not an admin token
    assert httpx2.get(
        billed.url + "/admin/keys", headers={"authorization": f"Bearer {key}"}
    ).status_code == 401


def test_create_a_key_and_use_it_at_once(billed: Relay) -> None:
    created = billed.admin(
        "POST", "/admin/keys",
        {"package": "paid", "name": "from the API", "credits": "3.5", "limits": {"rpm": 5}},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith("cr_") and body["id"].startswith("key_")
    assert body["credits"]["granted"] == 3.5 and body["limits"] == {"rpm": 5}
    assert "key_hash" not in body
    assert chat(billed, body["key"], "#sim tokens=3").status_code == 200
    default = billed.admin("POST", "/admin/keys", {"package": "paid"}).json()
    assert default["credits"]["granted"] == 10  # the package's initial_credits


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"package": "nope"}, "package"),
        ({}, "package"),
        ({"package": "paid", "credits": "lots"}, "credits"),
        ({"package": "paid", "limits": {"tpm": -1}}, "tpm"),
        ({"package": "paid", "limits": {"speed": 3}}, "speed"),
        ({"package": "paid", "colour": "red"}, "colour"),
    ],
)
def test_bad_key_requests_are_400_naming_the_field(billed: Relay, body, param) -> None:
    response = billed.admin("POST", "/admin/keys", body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_list_keys_with_their_usage_and_live_credits(billed: Relay) -> None:
    key, key_id = billed.create_paid_key()
    chat(billed, key, "#sim tokens=4")
    rows = rows_of(billed, key_id, count=1)
    listed = {entry["id"]: entry for entry in billed.admin("GET", "/admin/keys").json()["data"]}
    entry = listed[key_id]
    assert entry["usage"]["calls"] == 1
    assert entry["usage"]["output_tokens"] == rows[0]["output_tokens"]
    assert entry["usage"]["credits"] == rows[0]["cost_nano"] / 1e9
    assert entry["credits"]["used"] == rows[0]["cost_nano"] / 1e9
    assert entry["credits"]["remaining"] == balance(billed, key)["balance"]


def test_top_up_counts_at_once_and_is_kept_as_a_grant(billed: Relay) -> None:
    key, key_id = billed.create_paid_key(credits="0")
    assert chat(billed, key, "#sim tokens=3").status_code == 402
    topped = billed.admin("POST", f"/admin/keys/{key_id}/topup", {"credits": 4, "note": "promo"})
    assert topped.status_code == 200, topped.text
    assert topped.json()["credits"]["granted"] == 4
    assert balance(billed, key)["granted"] == 4
    assert chat(billed, key, "#sim tokens=3").status_code == 200
    back = billed.admin("POST", f"/admin/keys/{key_id}/topup", {"credits": "-1.5"}).json()
    assert back["credits"]["granted"] == 2.5
    grants = billed.admin("GET", f"/admin/keys/{key_id}").json()["grants"]
    assert [(g["credits"], g["note"]) for g in grants] == [(-1.5, "top-up"), (4, "promo")]
    assert billed.admin("POST", f"/admin/keys/{key_id}/topup", {"credits": 0}).status_code == 400


def test_set_limits_merges_drops_and_clears(billed: Relay) -> None:
    _, key_id = billed.create_paid_key()
    path = f"/admin/keys/{key_id}/limits"
    assert billed.admin("POST", path, {"tpm": 1000, "rpm": 10}).json()["limits"] == {
        "tpm": 1000, "rpm": 10
    }
    assert billed.admin("POST", path, {"rpm": None, "max_queue": 0}).json()["limits"] == {
        "tpm": 1000, "max_queue": 0
    }
    assert billed.admin("POST", path, {"clear": True, "weight": 2}).json()["limits"] == {
        "weight": 2.0
    }
    bad = billed.admin("POST", path, {"max_concurrency": 1.5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_concurrency"


def test_revoke_takes_effect_at_once_and_keys_are_named_by_id_only(billed: Relay) -> None:
    key, key_id = billed.create_paid_key()
    assert chat(billed, key, "#sim tokens=2").status_code == 200
    by_plaintext = billed.admin("POST", f"/admin/keys/{key}/revoke")
    assert by_plaintext.status_code == 404
    assert "never by the key itself" in by_plaintext.json()["error"]["message"]
    revoked = billed.admin("POST", f"/admin/keys/{key_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["active"] is False
    refused = chat(billed, key, "#sim tokens=2")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "revoked_api_key"
    assert billed.admin("GET", "/admin/keys/key_0000000000000000").status_code == 404


def test_accounts_health_disable_and_enable(billed: Relay) -> None:
    accounts = {a["name"]: a for a in billed.admin("GET", "/admin/accounts").json()["data"]}
    assert set(accounts) == {"sim-responses", "sim-chat"}
    chat_account = accounts["sim-chat"]
    assert chat_account["healthy"] is True and chat_account["pool"] == "main"
    assert chat_account["provider"] == "openai-chat" and "gpt-5" in chat_account["models"]
    key, _ = billed.create_paid_key()
    try:
        disabled = billed.admin("POST", "/admin/accounts/sim-chat/disable").json()
        assert disabled["disabled"] is True and disabled["healthy"] is False
        # The Responses account serves gpt-5 too: the Chat request is translated for it.
        moved = chat(billed, key, "#sim tokens=2")
        assert moved.status_code == 200
        assert billed.usage_row(moved.headers["x-request-id"])["account"] == "sim-responses"
        billed.admin("POST", "/admin/accounts/sim-responses/disable")
        refused = chat(billed, key, "#sim tokens=2")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "no_healthy_account"
    finally:
        billed.admin("POST", "/admin/accounts/sim-responses/enable")
        enabled = billed.admin("POST", "/admin/accounts/sim-chat/enable").json()
    assert enabled["healthy"] is True
    assert chat(billed, key, "#sim tokens=2").status_code == 200
    assert billed.admin("POST", "/admin/accounts/nope/enable").status_code == 404


def test_live_queues_per_pool(billed: Relay) -> None:
    key, key_id = billed.create_paid_key(package="tight")
    # The package's 0.5 s queue timeout is shorter than the CLI takes to start on a busy
    # machine: this key's second request waits up to 30 s.
    changed = billed.admin("POST", f"/admin/keys/{key_id}/limits", {"queue_timeout_s": 30})
    assert changed.status_code == 200, changed.text
    headers = {"authorization": f"Bearer {key}"}
    # The running stream lasts up to 30 s (it is closed once the queue has been seen), so the
    # second request is still queued when the CLI, slow to start on a busy machine, looks.
    body = {"model": "gpt-5", "stream": True,
            "messages": [{"role": "user", "content": "#sim tokens=3000 delay=0.01"}]}
    short = {**body, "messages": [{"role": "user", "content": "#sim tokens=5"}]}
    url = billed.url + "/v1/chat/completions"
    with httpx2.Client(timeout=10) as first:
        with first.stream("POST", url, json=body, headers=headers) as running:
            lines = running.iter_lines()
            next(lines)
            # max_concurrency 1: a second request of the key waits in the pool's queue
            waiting = threading.Thread(
                target=lambda: httpx2.post(url, json=short, headers=headers, timeout=30)
            )
            waiting.start()
            queues = _wait_for_queue(billed, key_id)
            pool = queues["pools"]["main"]
            assert pool["queue_depth"] >= 1 and pool["oldest_wait_s"] >= 0
            assert pool["keys"][key_id] == {"queued": 1, "in_flight": 1}
            listed = cli(billed, "queues", "--url", billed.url, "--json")
            assert listed.returncode == 0, listed.stderr
            assert json.loads(listed.stdout)["pools"]["main"]["keys"][key_id]["queued"] == 1
    waiting.join()
    billed.wait_idle()


def _wait_for_queue(relay: Relay, key_id: str) -> dict:
    deadline = time.monotonic() + 5
    while True:
        queues = relay.admin("GET", "/admin/queues").json()
        if queues["pools"]["main"]["keys"].get(key_id, {}).get("queued"):
            return queues
        assert time.monotonic() < deadline, queues
        time.sleep(0.01)


# -- the same through the CLI ----------------------------------------------------------------


def cli(relay: Relay, *args: str, token: str = ADMIN_TOKEN):
    env = {**os.environ, "RELAY_TEST_ADMIN_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args, "--config", str(relay.config_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=30, env=env,
    )


def test_cli_keys_list_shows_credits_and_usage(billed: Relay) -> None:
    key, key_id = billed.create_paid_key(credits="5")
    chat(billed, key, "#sim tokens=3")
    rows = rows_of(billed, key_id, count=1)
    listed = cli(billed, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(key_id))
    left = (5 * 10**9 - rows[0]["cost_nano"]) / 1e9
    assert "CREDITS LEFT" in listed.stdout and f"{left:g}" in line
    as_json = {e["id"]: e for e in json.loads(cli(billed, "keys", "list", "--json").stdout)}
    assert as_json[key_id]["usage"]["calls"] == 1
    assert as_json[key_id]["credits_left"] == left
    refused = cli(billed, "keys", "topup", key_id, "nothing")
    assert refused.returncode == 1 and "not a number" in refused.stderr


def test_cli_accounts_and_queues_talk_to_the_running_relay(billed: Relay) -> None:
    listed = cli(billed, "accounts", "list", "--url", billed.url)
    assert listed.returncode == 0, listed.stderr
    assert "sim-chat" in listed.stdout and "healthy" in listed.stdout
    try:
        done = cli(billed, "accounts", "disable", "sim-responses", "--url", billed.url)
        assert done.returncode == 0 and "out of service" in done.stdout
        accounts = json.loads(cli(billed, "accounts", "list", "--url", billed.url,
                                  "--json").stdout)
        assert next(a for a in accounts if a["name"] == "sim-responses")["disabled"] is True
    finally:
        done = cli(billed, "accounts", "enable", "sim-responses", "--url", billed.url)
    assert done.returncode == 0 and "in service" in done.stdout
    queues = cli(billed, "queues", "--url", billed.url)
    assert queues.returncode == 0 and "main" in queues.stdout
    unreachable = cli(billed, "queues", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "is it running?" in unreachable.stderr
    wrong = cli(billed, "accounts", "list", "--url", billed.url, token="wrong")
    assert wrong.returncode == 1 and "401" in wrong.stderr and "admin token" in wrong.stderr
