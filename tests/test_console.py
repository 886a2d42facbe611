"""The operator console (``/console``) in a real browser, and the admin API views it draws.

The page runs in headless Chromium (Debian's ``chromium``) driven by Playwright (npm
``playwright-core``) through ``tests/node/console_check.mjs``, against a real relay whose one
upstream is the simulator: a wrong token and no token are refused, an account that the upstream
answered 429 shows as cooling down and is put back, a key is created (shown once), used, topped
up, given limits and revoked, the usage just made is charted and exported as CSV, the relay
unreachable says so, every view is walked in Chinese for English left in its labels, and
neither the token nor the key reaches the browser's storage, cookies or profile. Screenshots of
every view in both languages go to ``test-artifacts/console/``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from relay.ledger.prices import NANO

from .conftest import ADMIN_TOKEN, BILLING_BODY, ROOT, Relay, Sim, start_relay
from .test_credits import chat, rows_of

NODE_DIR = Path(__file__).parent / "node"
SHOTS = ROOT / "test-artifacts" / "console"
CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

#: The billing relay, with an account of its own for one model: the one the test makes answer 429.
BODY = BILLING_BODY + """
[[accounts]]
name = "flaky"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["flaky-model"]

[[accounts]]
name = "gone"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["gone-model"]

[[accounts]]
name = "nokey"
pool = "main"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "RELAY_TEST_NEVER_SET_KEY"
models = ["nokey-model"]
"""


@pytest.fixture(scope="module")
def operated(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A billing relay whose retry hints may rest an account up to ten minutes."""
    server = start_relay(
        tmp_path_factory.mktemp("console"), sim.url, body=BODY, log_level="DEBUG",
        max_retry_after_s=600,
    )
    yield server
    server.process.stop()


def get(relay: Relay, path: str, token: str | None = ADMIN_TOKEN) -> httpx2.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx2.get(relay.url + path, headers=headers, timeout=10)


def run_console(relay: Relay, idle_key_id: str) -> dict:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "playwright-core").exists():
        pytest.fail("node and the npm package playwright-core are needed: run scripts/test")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is needed at {CHROMIUM}: apt-get install chromium")
    SHOTS.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [node, "console_check.mjs", relay.url, ADMIN_TOKEN, str(SHOTS), idle_key_id],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=240,
        env={**os.environ, "RELAY_TEST_CHROMIUM": CHROMIUM},
    )
    assert done.returncode == 0, done.stderr
    print(f"\nscreenshots of the console: {SHOTS}")
    return json.loads(done.stdout)


def test_the_console_in_chromium(operated: Relay) -> None:
    relay = operated
    key, key_id = relay.create_paid_key()
    assert chat(relay, key, "warm #sim tokens=9").status_code == 200
    cooled = chat(relay, key, "#sim fault=retry_forever", model="flaky-model")
    assert cooled.status_code == 429, cooled.text
    gone = chat(relay, key, "#sim fault=401", model="gone-model")
    assert gone.status_code >= 400, gone.text
    rows_of(relay, key_id, count=3)
    _, idle_id = relay.create_paid_key()  # never used: the usage view's empty state

    seen = run_console(relay, idle_id)
    assert seen["errors"] == [], seen["errors"]
    assert seen["lang"] == "en" and seen["title"] == "Operator console · relay"

    # -- the token: none, a wrong one, then the right one ------------------------------------
    assert seen["noToken"] == "Enter the admin token first."
    assert seen["wrongToken"]["message"].startswith("The admin token was not accepted")
    assert seen["wrongToken"]["appHidden"] is True
    assert seen["tokenInputAfter"] == ""  # the field is emptied once signed in
    assert seen["overviewRefreshes"] >= 1  # the overview follows by itself
    assert seen["overview"]["pools"] == ["main"]
    assert int(seen["overview"]["cooling"]) == 1 and int(seen["overview"]["out"]) == 2
    assert "no Redis" in seen["overview"]["processes"]

    assert seen["focusedTab"] == "tab-accounts"  # reached with the arrow key

    # -- accounts: flaky answered 429 with a (capped) ten-minute hint -------------------------
    flaky = seen["accounts"]["flaky"]
    assert flaky["health"] == "cooling" and flaky["action"] == "enable"
    assert flaky["text"].startswith("Cooling down until ") and "UTC" in flaky["text"]
    seconds = int(flaky["text"].rsplit("(", 1)[1].split()[0])
    assert 590 <= seconds <= 600, flaky["text"]
    assert seen["accounts"]["sim-chat"]["health"] == "ok"
    revoked_upstream = seen["accounts"]["gone"]  # the upstream answered 401
    assert revoked_upstream["health"] == "out" and revoked_upstream["action"] == "enable"
    assert revoked_upstream["text"].startswith(
        "Out of service: the upstream refused its credential (401)"), revoked_upstream
    assert "upstream_credentials_rejected" in revoked_upstream["lastError"]
    nokey = seen["accounts"]["nokey"]
    assert nokey["health"] == "out" and nokey["action"] is None
    assert nokey["text"].startswith("Out of service: its credential is missing")
    assert seen["accountTakenOut"]["text"] == "Out of service: taken out by the operator"
    assert seen["accountsAfter"]["flaky"]["health"] == "ok"  # put back from the page
    accounts = {a["name"]: a for a in get(relay, "/admin/accounts").json()["data"]}
    assert accounts["flaky"]["healthy"] and not accounts["sim-chat"]["disabled"]

    # -- the key created on the page: shown once, used, topped up, limited, revoked -------------
    new_key, new_id = seen["newKey"], seen["newKeyId"]
    assert new_key.startswith("cr_") and new_id.startswith("key_")
    assert f'experimental_bearer_token = "{new_key}"' in seen["newKeySnippets"]["codex"]
    assert f'base_url = "{relay.url}/openai"' in seen["newKeySnippets"]["codex"]
    assert seen["keyInPageAfterHide"] is False
    assert seen["createdRow"] == {"credits": "5", "calls": "0", "status": "ok",
                                  "lastUsed": "never"}
    assert seen["searchEmpty"] == "No key matches the search." and seen["searchRows"] == 1
    assert seen["calls"] == [200, 200]
    used = sum(row["cost_nano"] for row in rows_of(relay, new_id, count=2))
    assert float(seen["afterTopUp"]["credits"]) == pytest.approx(25 - used / NANO)
    assert seen["afterTopUp"]["calls"] == "2" and seen["afterTopUp"]["lastUsed"].endswith("UTC")
    assert "was topped up" in seen["topUpMessage"]
    assert seen["badLimit"] is True  # a negative limit is refused in the dialog
    stored = get(relay, f"/admin/keys/{new_id}").json()
    assert stored["limits"] == {"tpm": 50000}
    assert [g["note"] for g in stored["grants"]][-1:] == ["from the console"] or any(
        g["note"] == "from the console" for g in stored["grants"])
    assert stored["revoked_at"] is not None and seen["afterRevoke"] == 401
    assert seen["revokedRow"] == {"status": "revoked", "buttons": 0}

    # -- the usage just made, charted and exported ------------------------------------------
    usage = seen["usage"]
    assert usage["emptyHidden"] is True and len(usage["day"]) == 14
    assert sum(bar["value"] for bar in usage["day"]) > 0
    models = {bar["label"]: bar["value"] for bar in usage["model"]}
    assert set(models) == {"gpt-5", "gpt-5.5", "flaky-model", "gone-model"}
    credits = {bar["label"]: bar["value"] for bar in usage["modelCredits"]}
    billed = rows_of(relay, key_id, count=3) + rows_of(relay, new_id, count=2)
    assert sum(credits.values()) == pytest.approx(sum(r["cost_nano"] for r in billed) / NANO)
    assert any("console test" in bar["label"] for bar in usage["key"])
    lines = list(csv.DictReader(io.StringIO(seen["csv"])))
    assert seen["csvName"] == "relay-usage-model.csv"
    assert {line["model"] for line in lines} == set(models)
    assert sum(float(line["credits"]) for line in lines) == pytest.approx(sum(credits.values()))

    # -- unreachable ----------------------------------------------------------------------------
    assert seen["unreachable"]["live"] == "Relay unreachable: retrying…"
    assert "could not be reached" in seen["unreachable"]["message"]

    # -- Chinese ------------------------------------------------------------------------------
    zh = seen["zh"]
    assert zh["lang"] == "zh-CN" and zh["title"] == "运维控制台 · relay"
    for view, heading in (("overview", "流量（最近一分钟）"), ("accounts", "上游账号"),
                          ("keys", "创建密钥"), ("usage", "用量")):
        assert zh[view]["heading"] == heading
        assert zh[view]["english"] == [], (view, zh[view]["english"])
    assert zh["dialog"]["title"] == "充值额度" and zh["dialog"]["english"] == []
    assert zh["login"]["message"] == "已退出：令牌已从页面中清除。" and zh["login"]["english"] == []
    browser = seen["zhBrowser"]
    assert browser["lang"] == "zh-CN" and browser["heading"] == "运维控制台"
    assert browser["english"] == []
    assert browser["overflow"] is False and browser["signedInOverflow"] is False
    empty = browser["emptyUsage"]
    assert empty["text"].startswith("该时间范围内还没有用量") and empty["model"] == "暂无用量。"
    assert empty["english"] == []

    # -- the token and the key: only in memory and the Authorization header -----------------
    for where in ("storageWhileShown", "storageAtEnd", "storageAfterReload"):
        assert seen[where] == {"localStorage": [], "sessionStorage": [], "cookie": "",
                               "cookies": []}, where
    assert seen["afterReload"] == {"appHidden": False, "input": "", "tokenInPage": False} or (
        seen["afterReload"]["input"] == "" and not seen["afterReload"]["tokenInPage"])
    assert seen["profileFilesWithSecrets"] == [], "the browser kept a secret on disk"
    admin_calls = [r for r in seen["requests"] if "/admin/" in r["url"]]
    assert admin_calls and all(r["authorization"] in (f"Bearer {ADMIN_TOKEN}",
                                                       f"Bearer {ADMIN_TOKEN}-wrong")
                               for r in admin_calls)
    assert all(ADMIN_TOKEN not in r["url"] and new_key not in r["url"] for r in seen["requests"])
    assert all(r["url"].startswith(relay.url) for r in seen["requests"]), "a request left"
    log = relay.process.log.read_text()
    assert ADMIN_TOKEN not in log and new_key not in log
    assert seen["lowContrast"].keys() >= {"console-overview-en", "console-usage-zh"}
    for shot, found in seen["lowContrast"].items():
        assert found == [], (shot, found)  # every text at WCAG AA contrast or better
    for name in ("overview", "accounts", "keys", "usage"):
        for lang in ("en", "zh"):
            assert (SHOTS / f"console-{name}-{lang}.png").stat().st_size > 10_000


def test_the_console_views_of_the_admin_api(operated: Relay) -> None:
    relay = operated
    key, key_id = relay.create_paid_key()
    for content, model in (("a #sim tokens=10", "gpt-5"), ("b #sim tokens=20", "gpt-5"),
                           ("c #sim tokens=5", "deepseek-chat"), ("d #sim fault=400", "gpt-5")):
        chat(relay, key, content, model=model)
    rows = rows_of(relay, key_id, count=4)

    for path in ("/admin/overview", "/admin/packages", "/admin/usage"):
        assert get(relay, path, token=None).status_code == 401
        refused = get(relay, path, token="wrong")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_admin_token"

    overview = get(relay, "/admin/overview").json()
    assert overview["object"] == "overview" and overview["window_s"] == 60
    assert overview["recent"]["calls"] >= 4 and overview["recent"]["errors"] >= 1
    assert overview["pools"]["main"]["max_concurrency"] == 100
    assert overview["pools"]["main"]["queued"] == 0 and overview["shared"] is None
    assert sum(overview["accounts"].values()) == 5
    assert overview["accounts"]["out_of_service"] >= 1  # nokey: its variable is unset

    packages = {p["name"]: p for p in get(relay, "/admin/packages").json()["data"]}
    assert set(packages) == {"paid", "tight"}
    assert packages["tight"]["limits"]["max_concurrency"] == 1
    assert packages["paid"]["initial_credits"] == 10 and packages["paid"]["key_prefix"] == "cr_"

    mine = get(relay, f"/admin/usage?from=0&group_by=model&key_id={key_id}").json()
    by_model = {row["model"]: row for row in mine["data"]}
    assert set(by_model) == {"gpt-5", "deepseek-chat"}
    assert by_model["gpt-5"]["calls"] == 3 and by_model["gpt-5"]["errors"] == 1
    assert mine["totals"]["credits"] == sum(r["cost_nano"] for r in rows) / NANO
    assert mine["totals"]["output_tokens"] == sum(r["output_tokens"] for r in rows)
    per_key = get(relay, "/admin/usage?from=0&group_by=key").json()["data"]
    row = next(r for r in per_key if r["key"] == key_id)
    assert row["calls"] == 4 and row["package"] == "paid" and "key_hash" not in row
    days = get(relay, f"/admin/usage?group_by=day&key_id={key_id}").json()
    assert len(days["data"]) == 1 and days["data"][0]["calls"] == 4

    exported = get(relay, f"/admin/usage?from=0&group_by=model&key_id={key_id}&format=csv")
    assert exported.headers["content-type"].startswith("text/csv")
    assert "relay-usage-model.csv" in exported.headers["content-disposition"]
    lines = list(csv.DictReader(io.StringIO(exported.text)))
    assert [line["model"] for line in lines] == ["deepseek-chat", "gpt-5"]
    assert int(lines[1]["calls"]) == 3

    total = get(relay, f"/admin/usage?from=0&key_id={key_id}&format=csv").text.splitlines()
    assert total[0].startswith("calls,errors,") and total[1].startswith("4,1,")
    assert len(total) == 2  # no group: the one total line

    for query, param in (("group_by=week", "group_by"), ("format=xml", "format"),
                         ("from=2026-13-01", "from"), ("from=2026-02-01&to=2026-01-01", "to")):
        bad = get(relay, "/admin/usage?" + query)
        assert bad.status_code == 400, query
        assert bad.json()["error"]["param"] == param, bad.text
    unknown = get(relay, "/admin/usage?key_id=key_nothing")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "key_not_found"


def test_the_console_is_served_with_a_strict_policy(operated: Relay) -> None:
    page = httpx2.get(operated.url + "/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert "https://" not in page.text and "http://" not in page.text
    for name in ("console.js", "console.css", "i18n.js"):
        asset = httpx2.get(f"{operated.url}/web/{name}")
        assert asset.status_code == 200, name
        assert "https://" not in asset.text
        assert "http://" not in asset.text.replace("http://www.w3.org/2000/svg", "")
        for forbidden in ("localStorage.setItem", "sessionStorage.setItem", "document.cookie ="):
            assert forbidden not in asset.text
    assert httpx2.get(operated.url + "/web/console.html").status_code == 404


def test_the_overview_lists_the_live_processes_sharing_redis(
    sim: Sim, redis_url: str, tmp_path: Path
) -> None:
    database = tmp_path / "relay.db"
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
    relays = [
        start_relay(tmp_path / f"p{i}", sim.url, body=BODY, database=database,
                    redis_url=redis_url, redis_lease_ttl_s=1.0)
        for i in range(2)
    ]
    try:
        first, second = relays
        deadline = time.monotonic() + 5  # each process registers at its first heartbeat
        while True:
            seen = get(first, "/admin/overview").json()["shared"]
            if len(seen.get("processes", [])) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert seen["degraded"] is False
        assert len(seen["processes"]) == 2, seen  # both, whichever answers
        assert get(second, "/admin/overview").json()["shared"]["processes"] == seen["processes"]
    finally:
        for relay in relays:
            relay.process.stop()
