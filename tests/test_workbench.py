"""The key workbench page in a real browser: headless Chromium (Debian's ``chromium``, which
scripts/test installs) driven by Playwright (npm ``playwright-core``) through
``tests/node/workbench_check.mjs``. The numbers the page shows are the ledger's; the key is
gone after a reload and was never stored, put in a URL or logged; a wrong key says so; the
setup snippets, copied as shown, work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from relay.ledger.prices import NANO

from .conftest import ROOT, Relay, Sim, start_relay
from .test_cache_writes import CACHE_BODY
from .test_codex_cli import CODEX
from .test_credits import chat, rows_of

NODE_DIR = Path(__file__).parent / "node"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def credits_text(value: float) -> str:
    """The page's credit format (app.js fmtCredits): six decimals, grouped thousands."""
    return f"{value:,.6f}"


def int_text(value: int) -> str:
    return f"{value:,}"


@pytest.fixture(scope="module")
def logged(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A billing relay that logs everything (DEBUG), to show the key never reaches its log."""
    server = start_relay(
        tmp_path_factory.mktemp("workbench"), sim.url, body=CACHE_BODY, log_level="DEBUG"
    )
    yield server
    server.process.stop()


def run_page(relay: Relay, key: str, wrong_key: str) -> dict:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "playwright-core").exists():
        pytest.fail("node and the npm package playwright-core are needed: run scripts/test")
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is needed at {CHROMIUM}: scripts/test installs Debian's package "
            "(apt-get install chromium)"
        )
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "workbench.png"
    done = subprocess.run(
        [node, "workbench_check.mjs", relay.url, key, wrong_key, str(screenshot)],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
        env={**os.environ, "RELAY_TEST_CHROMIUM": CHROMIUM},
    )
    assert done.returncode == 0, done.stderr
    print(f"\nscreenshot of the filled workbench page: {screenshot}")
    return json.loads(done.stdout)


def test_the_workbench_page_in_chromium(logged: Relay, tmp_path: Path) -> None:
    relay = logged
    key, key_id = relay.create_paid_key()
    for content, model in (
        ("alpha #sim tokens=12", "gpt-5"),
        ("beta #sim tokens=30 reasoning=8", "gpt-5"),
        ("gamma " * 40 + "#sim tokens=20 cached=16", "deepseek-chat"),
        ("delta #sim tokens=25", "gpt-5.5"),
        ("epsilon #sim fault=400", "gpt-5.5"),
        ("zeta " * 60 + "#sim tokens=6 cached=20 cache_write=48", "claude-cache"),
    ):
        chat(relay, key, content, model=model)
    rows = rows_of(relay, key_id, count=6)
    assert len(rows) == 6
    wrong = key[:-4] + ("0000" if not key.endswith("0000") else "1111")
    expiry = relay.admin(
        "POST", f"/admin/keys/{key_id}/expiry", {"expires_at": "2099-01-02T03:04:00Z"}
    )
    assert expiry.status_code == 200, expiry.text

    seen = run_page(relay, key, wrong)
    assert seen["errors"] == [], seen["errors"]  # no script error
    # the one refused request of the wrong key is the only thing the browser complains about
    assert len(seen["consoleErrors"]) == 1 and "401" in seen["consoleErrors"][0]
    assert "stays in this page's memory only" in seen["privacyNote"]
    for place in ("localStorage", "sessionStorage", "cookies", "URL"):
        assert place in seen["privacyNote"]

    # -- the numbers shown are the ledger's -----------------------------------------------
    spent = sum(row["cost_nano"] for row in rows)
    balance = seen["balance"]
    assert float(balance["granted"]["value"]) == 10
    assert float(balance["used"]["value"]) == spent / NANO
    assert float(balance["remaining"]["value"]) == (10 * NANO - spent) / NANO
    assert balance["used"]["text"] == credits_text(spent / NANO)
    assert balance["remaining"]["text"] == credits_text((10 * NANO - spent) / NANO)
    assert balance["held"]["text"] == credits_text(0)
    totals = seen["totals"]
    assert totals["calls"]["text"] == "6" and totals["errors"]["text"] == "1"
    for name, column in (("input", "input_tokens"), ("cached", "cached_tokens"),
                         ("cache-write", "cache_write_tokens"), ("output", "output_tokens"),
                         ("reasoning", "reasoning_tokens")):
        assert totals[name]["text"] == int_text(sum(row[column] for row in rows)), name
    assert totals["credits"]["text"] == credits_text(spent / NANO)

    models = {row["id"]: row["cells"] for row in seen["models"]}
    assert set(models) == {"gpt-5", "deepseek-chat", "gpt-5.5", "claude-cache"}
    for model, cells in models.items():
        mine = [row for row in rows if row["model"] == model]
        assert cells["calls"]["text"] == str(len(mine))
        assert cells["output"]["text"] == int_text(sum(r["output_tokens"] for r in mine))
        assert cells["credits"]["text"] == credits_text(sum(r["cost_nano"] for r in mine) / NANO)
    assert models["deepseek-chat"]["cached"]["text"] == "16"
    assert models["claude-cache"]["cache-write"]["text"] == "48"
    assert models["deepseek-chat"]["cache-write"]["text"] == "0"  # only Anthropic writes

    calls = seen["calls"]
    assert [call["id"] for call in calls] == [row["request_id"] for row in rows]
    for call, row in zip(calls, rows, strict=True):
        assert call["cells"]["credits"]["text"] == credits_text(row["cost_nano"] / NANO)
        assert call["cells"]["output"]["text"] == int_text(row["output_tokens"])
        assert call["cells"]["status"]["text"].startswith(str(row["status"]))

    assert len(seen["chart"]) == 14
    assert sum(bar["value"] for bar in seen["chart"]) == pytest.approx(spent / NANO)
    limits = {entry["name"]: entry["text"] for entry in seen["limits"]}
    assert set(limits) == {"tpm", "rpm", "concurrency", "queue"}
    assert "0 of 40" in limits["concurrency"]  # the paid package's max_concurrency
    assert key_id not in seen["keyIdentity"] and "package paid" in seen["keyIdentity"]
    assert seen["keyExpiry"].startswith("Expires 2099-01-02 03:04 UTC (in "), seen["keyExpiry"]

    # -- the limits and queue order, with this key's own limits; the Codex tutorial ----------
    queue = seen["queueSteps"]
    assert len(queue) == 5 and queue[0].startswith("The relay's global capacity")
    assert "The pool main:" in queue[1] and "(this key's: 1)" in queue[1]
    assert queue[2] == (
        "Your key (package paid): 40 requests at once, each waiting up to 60 s, no limit on "
        "tokens per minute, requests per minute, queue places. Past these the answer is 429, "
        "with the time to retry."
    ), queue[2]
    assert queue[3].startswith("The account scheduler")
    tutorial = seen["tutorial"]
    assert [step["code"].splitlines()[0] for step in tutorial[:2]] == [
        "node --version   # v20 or later", "npm install -g @openai/codex"]
    assert f'base_url = "{relay.url}/openai"' in tutorial[2]["code"]
    assert f'experimental_bearer_token = "{key}"' in tutorial[2]["code"]
    assert "VS Code" in tutorial[4]["text"] and f"{relay.url}/openai/v1" in tutorial[4]["code"]
    assert f'base_url="{relay.url}/v1"' in tutorial[5]["code"]

    # -- Chinese: by the switch, and by itself in a Chinese browser at phone width ----------
    zh = seen["zh"]
    assert zh["lang"] == "zh-CN" and zh["title"] == "API 密钥工作台 · relay"
    assert zh["heading"] == "API 密钥工作台"
    assert zh["english"] == [], zh["english"]
    assert seen["lowContrast"] == [] and zh["lowContrast"] == [], (  # WCAG AA, both languages
        seen["lowContrast"], zh["lowContrast"])
    assert zh["keyExpiry"].startswith("2099-01-02 03:04 UTC 到期（还有 "), zh["keyExpiry"]
    assert any("0 / 40" in row and "并发请求" in row for row in zh["limits"]), zh["limits"]
    assert "同时最多 40 个请求" in zh["queueSteps"][2] and "账号池 main" in zh["queueSteps"][1]
    assert zh["tutorial"][1] == "用 npm 安装 Codex CLI："
    assert "Codex CLI / IDE 插件 — ~/.codex/config.toml（Responses API）" in zh["snippetTitles"]
    assert tomllib.loads(zh["codex"]) == tomllib.loads(snippets_en := seen["snippets"]["codex"])
    assert "# Codex 只对名为 OpenAI 的提供方使用远程压缩" in zh["codex"]
    assert "# Codex sends remote compaction" in snippets_en
    assert seen["backInEnglish"] == "Quota"
    browser = seen["zhBrowser"]
    assert browser["lang"] == "zh-CN" and browser["heading"] == "API 密钥工作台"
    assert browser["english"] == [] and browser["englishWithKey"] == [], browser
    assert browser["overflow"] is False
    assert seen["zhProfileFilesWithKey"] == []

    # -- the key: only in page memory and the Authorization header --------------------------
    assert all(key not in request["url"] for request in seen["requests"])
    assert all(wrong not in request["url"] for request in seen["requests"])
    api_calls = [r for r in seen["requests"] if "/v1/" in r["url"]]
    assert api_calls and all(r["authorization"] in (f"Bearer {key}", f"Bearer {wrong}")
                             for r in api_calls)
    assert all(r["url"].startswith(relay.url) for r in seen["requests"]), "a request left"
    assert seen["storageWhileShown"] == {"localStorage": 0, "sessionStorage": 0, "cookie": ""}
    assert seen["cookiesWhileShown"] == 0
    after = seen["afterReload"]
    assert after["input"] == "" and after["dashboardHidden"] is True
    assert after["keyInPage"] is False
    assert (after["localStorage"], after["sessionStorage"], after["cookie"]) == (0, 0, "")
    assert after["url"] == relay.url + "/"
    assert seen["cookiesAfterReload"] == 0
    assert seen["profileFilesWithKey"] == [], "the browser kept the key on disk"
    log = (relay.process.log).read_text()
    assert key not in log and wrong not in log

    # -- a wrong key says so ------------------------------------------------------------------
    assert "This key was not accepted" in seen["wrongKey"]["message"]
    assert "Incorrect API key provided" in seen["wrongKey"]["message"]
    assert seen["wrongKey"]["dashboardHidden"] is True
    assert wrong not in seen["wrongKey"]["snippet"]

    # -- the setup snippets, with the key filled in, work as shown ----------------------------
    assert "cr_…" in seen["placeholderSnippet"] and key not in seen["placeholderSnippet"]
    snippets = seen["snippets"]
    codex = tomllib.loads(snippets["codex"])
    provider = codex["model_providers"]["relay"]
    assert provider["wire_api"] == "responses"
    assert provider["name"] == "OpenAI"  # Codex compacts remotely only at "OpenAI" (§2.10)
    assert provider["supports_websockets"] is True
    assert provider["base_url"] == relay.url + "/openai"
    assert provider["experimental_bearer_token"] == key
    builtin = tomllib.loads(snippets["codex-openai"])
    assert builtin == {"openai_base_url": relay.url + "/v1", "model": codex["model"]}
    assert f"Base URL:  {relay.url}/openai/v1" in snippets["ide"]
    assert f"API key:   {key}" in snippets["ide"]
    assert f'apiKey: "{key}"' in snippets["node"] and f'{relay.url}/v1' in snippets["node"]
    curl = subprocess.run(snippets["curl"], shell=True, capture_output=True, text=True,
                          timeout=30)
    assert json.loads(curl.stdout)["object"] == "chat.completion", curl.stdout + curl.stderr
    python = subprocess.run([sys.executable, "-c", snippets["python"]], capture_output=True,
                            text=True, timeout=60)
    assert python.returncode == 0, python.stderr
    assert python.stdout.startswith("tok")
    anthropic_sdk = subprocess.run([sys.executable, "-c", snippets["anthropic-python"]],
                                   capture_output=True, text=True, timeout=60)
    assert anthropic_sdk.returncode == 0, anthropic_sdk.stderr
    assert anthropic_sdk.stdout.startswith("tok")
    claude_env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in snippets["claude-code"].splitlines() if line.startswith("export ")
    )
    assert claude_env["ANTHROPIC_BASE_URL"] == f'"{relay.url}"'
    assert claude_env["ANTHROPIC_AUTH_TOKEN"] == f'"{key}"'
    balance_now = subprocess.run(snippets["curl-balance"], shell=True, capture_output=True,
                                 text=True, timeout=30)
    assert json.loads(balance_now.stdout)["object"] == "balance"
    if not CODEX.exists():
        pytest.fail(f"the Codex CLI is not installed at {CODEX}: run scripts/test")
    # Codex's first request carries ~38 KB of instructions and tools: at these test prices it
    # is estimated above what is left (Codex would say "Quota exceeded"), so top up first.
    assert relay.admin("POST", f"/admin/keys/{key_id}/topup", {"credits": 300}).status_code == 200
    # The Codex snippet as shown: its turns over a WebSocket (supports_websockets).
    log_start = len(relay.process.log.read_text())
    assert "pong" in codex_turn(tmp_path / "as-shown", snippets["codex"])
    assert socket_lines(relay, log_start, key_id, "/openai/responses") == ["status=101"]
    # Its commented alternative: the key from a command, and Codex reads the relay's models.
    token_line = f'experimental_bearer_token = "{key}"\n'
    auth_line = next(line for line in snippets["codex"].splitlines() if "auth = {" in line)
    with_command = snippets["codex"].replace(token_line, auth_line.removeprefix("# ") + "\n")
    log_start = len(relay.process.log.read_text())
    assert "pong" in codex_turn(tmp_path / "command", with_command, RELAY_API_KEY=key)
    models_asked = [line for line in relay.process.log.read_text()[log_start:].splitlines()
                    if "path=/openai/models" in line and f"key_id={key_id}" in line]
    assert models_asked and "status=200" in models_asked[0], models_asked
    # The built-in provider pointed at the relay, after the login line of the snippet.
    login = next(line.strip("# ") for line in snippets["codex-openai"].splitlines()
                 if "codex login" in line)
    log_start = len(relay.process.log.read_text())
    assert "pong" in codex_turn(tmp_path / "builtin", snippets["codex-openai"], login=login)
    # The built-in provider speaks WebSocket by default: to the relay too.
    assert socket_lines(relay, log_start, key_id, "/v1/responses") == ["status=101"]


def socket_lines(relay: Relay, start: int, key_id: str, path: str) -> list[str]:
    """The statuses of the key's WebSocket access lines on ``path`` logged after ``start``
    (a socket's line is written when it closes, a moment after Codex exits)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            line for line in relay.process.log.read_text()[start:].splitlines()
            if f"key_id={key_id}" in line and " method=GET " in line and f"path={path} " in line
        ]
        if lines or time.monotonic() > deadline:
            return [f for line in lines for f in line.split() if f.startswith("status=")]
        time.sleep(0.05)


def codex_turn(folder: Path, config: str, login: str | None = None, **env: str) -> str:
    """``codex exec`` with ``config`` as ``~/.codex/config.toml`` (after the ``login`` shell
    command, if any, with ``codex`` on the PATH); its output."""
    home = folder / "home" / ".codex"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(config)
    work = folder / "work"
    work.mkdir()
    environment = {
        **os.environ, "HOME": str(home.parent), "CODEX_HOME": str(home), "NO_COLOR": "1",
        "PATH": f"{CODEX.parent}{os.pathsep}{os.environ['PATH']}", **env,
    }
    if login is not None:
        logged_in = subprocess.run(login, shell=True, capture_output=True, text=True,
                                   timeout=60, env=environment, cwd=work)
        assert logged_in.returncode == 0, logged_in.stdout + logged_in.stderr
    codex_run = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "Say pong. #sim tokens=2 text=pong"],
        capture_output=True, text=True, timeout=180, cwd=work, stdin=subprocess.DEVNULL,
        env=environment,
    )
    assert codex_run.returncode == 0, codex_run.stderr
    return codex_run.stdout


def test_the_page_is_served_with_a_strict_policy_and_no_outside_resources(billed: Relay) -> None:
    page = httpx2.get(billed.url + "/workbench")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "connect-src 'self'" in policy and "script-src 'self'" in policy
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"
    for name in ("app.js", "style.css"):
        asset = httpx2.get(f"{billed.url}/web/{name}")
        assert asset.status_code == 200
        assert "http://" not in asset.text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in asset.text
    assert "https://" not in page.text and "http://" not in page.text
    for forbidden in ("localStorage.setItem", "sessionStorage.setItem", "document.cookie ="):
        assert forbidden not in httpx2.get(f"{billed.url}/web/app.js").text
    # a browser gets the page at /, a script the relay's JSON as before
    assert httpx2.get(billed.url + "/", headers={"accept": "text/html"}).text == page.text
    assert httpx2.get(billed.url + "/").json()["object"] == "relay"
    assert httpx2.get(billed.url + "/web/nothing.js").status_code == 404
