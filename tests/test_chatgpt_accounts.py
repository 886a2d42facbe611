"""ChatGPT-plan accounts (``provider = "codex-chatgpt"``) end to end: the real relay, its CLI and
real clients (the openai SDK, httpx) against the simulated upstream's ChatGPT-backend mode
(relay/testing/sim_chatgpt.py: the backend's route, OpenAI's token endpoint with rotating
refresh tokens and reuse detection, usage windows, usage_limit_reached)."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest
from cryptography.fernet import Fernet

from relay.testing import sim_chatgpt

from .conftest import ADMIN_TOKEN, ROOT, SIM_KEY, Relay, Sim, server_section, start_process
from .test_codex_cli import SESSION_HEADERS, codex_exec, codex_home

SECRET = Fernet.generate_key().decode()
MODEL = "gpt-5.5"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    """A simulated upstream of this module's own (its ChatGPT logins are this module's)."""
    log = tmp_path_factory.mktemp("sim-chatgpt") / "sim.log"
    process = start_process(
        ["-m", "relay.testing.upstream", "--port", "0", "--api-key", SIM_KEY,
         "--ttft", "0.01", "--token-delay", "0.002", "--tokens", "8"],
        r"listening on (\S+)",
        log,
    )
    yield Sim(process)
    process.stop()


def _env(**extra: str) -> dict:
    return {**os.environ, "RELAY_SECRET_KEY": SECRET, "RELAY_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
            **extra}


def _config(
    tmp: Path, sim_url: str, names: tuple[str, ...], priorities: dict | None = None,
    **server: object,
) -> Path:
    accounts = "".join(
        textwrap.dedent(
            f"""
            [[accounts]]
            name = "{name}"
            pool = "main"
            provider = "codex-chatgpt"
            base_url = "{sim_url}/backend-api/codex"
            token_url = "{sim_url}/oauth/token"
            models = ["{MODEL}"]
            priority = {(priorities or {}).get(name, 0)}
            """
        )
        for name in names
    )
    body = textwrap.dedent(
        """
        [pools.main]
        max_concurrency = 50

        [packages.team]
        pool = "main"

        [[accounts]]
        name = "api"
        pool = "main"
        provider = "openai-responses"
        base_url = "SIM_URL/v1"
        api_key_env = "SIM_UPSTREAM_KEY"
        models = ["other-model"]
        """
    ).replace("SIM_URL", sim_url)
    path = tmp / "relay.toml"
    path.write_text(server_section(tmp / "relay.db", **server) + body + accounts)
    return path


def _start(
    config: Path, tmp: Path, log_name: str = "relay.log", *, level: str = "INFO",
    secret: str = SECRET,
) -> Relay:
    process = start_process(
        ["-m", "relay", "serve", "--config", str(config)],
        r"relay listening on (\S+)",
        tmp / log_name,
        env={"RELAY_SECRET_KEY": secret, "RELAY_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
             "SIM_UPSTREAM_KEY": SIM_KEY, "RELAY_LOG_LEVEL": level},
    )
    return Relay(process, config, tmp / "relay.db", process.url)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, cwd=ROOT,
        timeout=60, env=env if env is not None else _env(),
    )


def _login(sim: Sim, account_id: str, lifetime_s: float = 3600) -> dict:
    response = sim.http.post(
        "/_sim/chatgpt/login", json={"account_id": account_id, "lifetime_s": lifetime_s}
    )
    response.raise_for_status()
    return response.json()


def _import(tmp: Path, config: Path, name: str, auth: dict) -> subprocess.CompletedProcess:
    path = tmp / f"{name}-auth.json"
    path.write_text(json.dumps(auth))
    return _cli("accounts", "import-codex-auth", "--config", str(config), name, str(path))


def _chatgpt(sim: Sim, **changes: object) -> dict:
    response = sim.http.post("/_sim/chatgpt", json=changes)
    response.raise_for_status()
    return response.json()


def _backend_requests(sim: Sim) -> list[dict]:
    return [r for r in sim.requests() if r["path"].startswith("/backend-api/codex/")]


def _ask(relay: Relay, text: str, session: str | None = None, **extra):
    client = openai.OpenAI(
        base_url=relay.url + "/v1", api_key=relay.key(), max_retries=0, timeout=30,
        default_headers={"session_id": session} if session else None,
    )
    return client.responses.create(model=MODEL, input=text, **extra)


def _accounts(relay: Relay) -> dict[str, dict]:
    response = relay.admin("GET", "/admin/accounts")
    assert response.status_code == 200, response.text
    return {account["name"]: account for account in response.json()["data"]}


def _expiry(auth: dict) -> float:
    """The ``exp`` of an auth.json's access token (read as the relay reads it)."""
    payload = auth["tokens"]["access_token"].split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]


def _secrets_of(*auths: dict) -> set[str]:
    return {
        auth["tokens"][name] for auth in auths for name in ("access_token", "refresh_token")
    }


def _sim_secrets(sim: Sim) -> set[str]:
    """Every access and refresh token the relay sent the simulated upstream."""
    found = set()
    for record in sim.requests():
        authorization = record["headers"].get("authorization", "")
        if authorization.startswith("Bearer ") and "." in authorization:
            found.add(authorization[7:])
        body = record.get("body") or {}
        if isinstance(body, dict) and isinstance(body.get("refresh_token"), str):
            found.add(body["refresh_token"])
    return found


# ------------------------------------------------------------------------------------------


def test_import_refuses_what_cannot_work(sim: Sim, tmp_path: Path) -> None:
    config = _config(tmp_path, sim.url, ("plus-a",))

    def refused(name: str, auth: object, *, env: dict | None = None) -> str:
        path = tmp_path / "auth.json"
        path.write_text(auth if isinstance(auth, str) else json.dumps(auth))
        done = _cli("accounts", "import-codex-auth", "--config", str(config), name, str(path),
                    env=env)
        assert done.returncode == 1, done.stdout
        return done.stderr

    good = _login(sim, "acct-import")
    assert "no \"tokens\"" in refused("plus-a", {"OPENAI_API_KEY": None, "tokens": None})
    assert "API key login" in refused("plus-a", {"OPENAI_API_KEY": "sk-x", "tokens": None})
    assert "lack refresh_token" in refused(
        "plus-a", {"tokens": {"access_token": good["tokens"]["access_token"]}}
    )
    assert "is not JSON" in refused("plus-a", "{not json")
    assert "openai-responses account" in refused("api", good)
    assert "no account named 'nobody'" in refused("nobody", good)
    no_key = {k: v for k, v in _env().items() if k != "RELAY_SECRET_KEY"}
    assert "set RELAY_SECRET_KEY" in refused("plus-a", good, env=no_key)
    missing = _cli("accounts", "import-codex-auth", "--config", str(config), "plus-a",
                   str(tmp_path / "nowhere.json"))
    assert missing.returncode == 1 and "file not found" in missing.stderr

    # A login whose access token expired is renewed at import; a dead refresh token is refused.
    expired = _login(sim, "acct-expired", lifetime_s=-10)
    _chatgpt(sim, token_endpoint="expire")
    try:
        message = refused("plus-a", expired)
    finally:
        _chatgpt(sim, token_endpoint=None)
    assert "expired beyond refresh (refresh_token_expired)" in message

    done = _import(tmp_path, config, "plus-a", good)
    assert done.returncode == 0, done.stderr
    assert "acct-imp" in done.stdout and "stored, encrypted" in done.stdout
    stored = (tmp_path / "relay.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("relay.db-*")
    )
    for secret in _secrets_of(good):
        assert secret not in done.stdout + done.stderr
        assert secret.encode() not in stored  # encrypted at rest, WAL included
    with sqlite3.connect(tmp_path / "relay.db") as db:
        (sealed,) = db.execute("SELECT sealed FROM account_tokens").fetchone()
    assert json.loads(Fernet(SECRET.encode()).decrypt(sealed.encode()))["account_id"] == (
        "acct-import"
    )


def test_backend_requests_are_normalized_and_answers_collected(sim: Sim, tmp_path: Path) -> None:
    config = _config(tmp_path, sim.url, ("plus-a",))
    assert _import(tmp_path, config, "plus-a", _login(sim, "acct-norm")).returncode == 0
    relay = _start(config, tmp_path)
    try:
        _chatgpt(sim, empty_completed_output=True)
        sim.reset()
        # Non-streamed, with fields the backend refuses: dropped, streamed, collected.
        answer = _ask(relay, "hello", temperature=0.5, max_output_tokens=200, store=True,
                      prompt_cache_key="conv-7")
        assert answer.status == "completed" and answer.output_text
        chat = openai.OpenAI(base_url=relay.url + "/v1", api_key=relay.key(), max_retries=0)
        completion = chat.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hi"}],
        )
        assert completion.choices[0].message.content
        streamed = list(
            chat.responses.create(model=MODEL, input="stream it", stream=True)
        )
        assert streamed[-1].type == "response.completed"
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(relay, "go on", previous_response_id="resp_earlier")
        assert refused.value.body["param"] == "previous_response_id"
        # The relay holds no response of that id (its state store answers first).
        assert refused.value.body["code"] == "previous_response_not_found"
        assert "resp_earlier" in refused.value.message
        backend = _backend_requests(sim)
        assert len(backend) == 3
        assert backend[0]["headers"]["session_id"] == "conv-7"
        for record in backend:
            body, headers = record["body"], record["headers"]
            assert body["stream"] is True and body["store"] is False
            assert isinstance(body["instructions"], str)
            assert "reasoning.encrypted_content" in body["include"]
            assert not {"temperature", "max_output_tokens"} & set(body)
            assert headers["chatgpt-account-id"] == "acct-norm"
            assert headers["originator"] == "codex_cli_rs"
            assert headers["accept"] == "text/event-stream"
            # The client's session id as it sent it (never the relay's per-key form).
            assert headers.get("session_id", body.get("prompt_cache_key")) == body.get(
                "prompt_cache_key"
            )
    finally:
        _chatgpt(sim, empty_completed_output=False)
        log = relay.process.stop()
    assert "Traceback" not in log


def test_expiry_mid_session_makes_one_refresh_for_concurrent_requests(
    sim: Sim, tmp_path: Path
) -> None:
    config = _config(tmp_path, sim.url, ("plus-a",), oauth_refresh_margin_s=1.0)
    auth = _login(sim, "acct-expiry", lifetime_s=8)
    _chatgpt(sim, lifetime_s={"acct-expiry": 3600})
    assert _import(tmp_path, config, "plus-a", auth).returncode == 0
    relay = _start(config, tmp_path)
    try:
        before, reused = (_chatgpt(sim)[k] for k in ("refresh_calls", "refresh_reused"))
        assert _ask(relay, "turn one", session="s-expiry").output_text
        assert _chatgpt(sim)["refresh_calls"] == before  # still valid: no refresh
        # Until the access token is within the margin (1 s) of its expiry.
        time.sleep(max(0.0, _expiry(auth) - 1 - time.time()) + 0.3)
        _chatgpt(sim, token_delay_s=1.0)  # a slow token endpoint: the requests meet there
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(
                lambda n: _ask(relay, f"turn {n}", session="s-expiry"), range(2, 6)
            ))
        assert all(answer.output_text for answer in answers)
        stats = _chatgpt(sim)
        assert stats["refresh_calls"] == before + 1 and stats["refresh_reused"] == reused
        account = _accounts(relay)["plus-a"]
        assert account["oauth"]["refreshes"] == 1
        assert account["oauth"]["access_expires_at"] > time.time() + 3000
        assert account["oauth"]["last_refresh"] > time.time() - 30
        assert not account["disabled"]
    finally:
        _chatgpt(sim, token_delay_s=0.0)
        log = relay.process.stop()
    assert "Traceback" not in log
    assert "account plus-a: access token refreshed" in log


def test_rotated_refresh_token_survives_a_kill_and_restart(sim: Sim, tmp_path: Path) -> None:
    """The refresh token is rotated at every refresh (the old one answers
    refresh_token_reused); the relay commits the new one before it uses the new access token,
    so a relay killed with SIGKILL right after restarts with the live one."""
    config = _config(tmp_path, sim.url, ("plus-a",), oauth_refresh_margin_s=1.0)
    auth = _login(sim, "acct-restart", lifetime_s=-1)  # expired: renewed at import
    _chatgpt(sim, lifetime_s={"acct-restart": 2})
    assert _import(tmp_path, config, "plus-a", auth).returncode == 0
    calls, reused = (_chatgpt(sim)[k] for k in ("refresh_calls", "refresh_reused"))
    relay = _start(config, tmp_path)
    try:
        time.sleep(1.5)
        assert _ask(relay, "before the restart").output_text  # refresh #2, rotated
    finally:
        relay.process.proc.kill()  # kill -9: nothing is flushed at exit
        relay.process.proc.wait()
    assert _chatgpt(sim)["refresh_calls"] == calls + 1
    time.sleep(1.5)
    _chatgpt(sim, lifetime_s={"acct-restart": 3600})
    relay = _start(config, tmp_path, "relay-2.log")
    try:
        assert _ask(relay, "after the restart").output_text  # refresh #3 with the rotated one
        stats = _chatgpt(sim)
        assert stats["refresh_calls"] == calls + 2 and stats["refresh_reused"] == reused
        assert not _accounts(relay)["plus-a"]["disabled"]
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log


def test_refresh_token_reused_takes_the_account_out_with_the_reason(
    sim: Sim, tmp_path: Path
) -> None:
    config = _config(tmp_path, sim.url, ("plus-a", "plus-b"), oauth_refresh_margin_s=1.0)
    stolen = _login(sim, "acct-reused", lifetime_s=2)
    assert _import(tmp_path, config, "plus-a", stolen).returncode == 0
    assert _import(tmp_path, config, "plus-b", _login(sim, "acct-spare")).returncode == 0
    # Someone else (the same login left in a Codex CLI) spends the refresh token first.
    spent = sim.http.post("/oauth/token", json={
        "client_id": "app_EMoamEEZ73f0CkXaXp7hrann", "grant_type": "refresh_token",
        "refresh_token": stolen["tokens"]["refresh_token"],
    })
    assert spent.status_code == 200
    reused = _chatgpt(sim)["refresh_reused"]
    relay = _start(config, tmp_path)
    try:
        time.sleep(1.5)
        for turn in range(3):  # every turn is served (by plus-b), none refreshes again
            assert _ask(relay, f"turn {turn}", session="s-reused").output_text
        stats = _chatgpt(sim)
        assert stats["refresh_reused"] == reused + 1
        account = _accounts(relay)["plus-a"]
        assert account["disabled"] is True
        assert "refresh_token_reused" in account["oauth"]["out_of_service_reason"]
        assert "refresh_token_reused" in account["last_error"]
        listing = _cli("accounts", "list", "--config", str(config), "--url", relay.url)
        assert listing.returncode == 0, listing.stderr
        assert "out of service: refresh failed: refresh_token_reused" in listing.stdout
        assert {r["headers"]["chatgpt-account-id"] for r in _backend_requests(sim)
                if "turn" in json.dumps(r["body"])} >= {"acct-spare"}
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log
    assert "account plus-a out of service" in log and "refresh_token_reused" in log


def test_usage_limit_moves_the_session_to_the_other_account(sim: Sim, tmp_path: Path) -> None:
    config = _config(tmp_path, sim.url, ("plus-a", "plus-b"))
    logins = {"plus-a": _login(sim, "acct-ua"), "plus-b": _login(sim, "acct-ub")}
    for name, auth in logins.items():
        assert _import(tmp_path, config, name, auth).returncode == 0
    _chatgpt(sim, usage={"acct-ua": {"primary": 40, "secondary": 12},
                         "acct-ub": {"primary": 5, "secondary": 1}})
    relay = _start(config, tmp_path)
    try:
        sim.reset()
        assert _ask(relay, "turn one", session="s-limit").output_text
        first = _backend_requests(sim)[-1]["headers"]["chatgpt-account-id"]
        name = {"acct-ua": "plus-a", "acct-ub": "plus-b"}[first]
        other = {"plus-a": "plus-b", "plus-b": "plus-a"}[name]
        windows = _accounts(relay)[name]["oauth"]["usage_windows"]
        assert windows["primary"]["window_minutes"] == 300
        assert windows["secondary"]["window_minutes"] == 10080
        assert windows["primary"]["resets_at"] > time.time()
        _chatgpt(sim, limit={first: 7200})  # the session's account hits its 5-hour limit
        sim.reset()
        assert _ask(relay, "turn two", session="s-limit").output_text
        served = [r["headers"]["chatgpt-account-id"] for r in _backend_requests(sim)]
        assert served[0] == first and len(served) == 2 and served[1] != first  # failed over
        accounts = _accounts(relay)
        cooling = accounts[name]["cooling_until"]
        assert cooling is not None and 7100 < cooling - time.time() <= 7200
        assert accounts[name]["oauth"]["usage_windows"]["primary"]["used_percent"] == 100
        assert accounts[other]["sessions"] == 1  # the session is bound to the other now
        sim.reset()
        assert _ask(relay, "turn three", session="s-limit").output_text
        assert [r["headers"]["chatgpt-account-id"] for r in _backend_requests(sim)] == [
            served[1]
        ]
        metrics = relay.admin("GET", "/metrics").text
        assert f'relay_account_usage_used_percent{{account="{other}",window="primary"}}' in metrics
        listing = _cli("accounts", "list", "--config", str(config), "--url", relay.url)
        assert "cooling until" in listing.stdout and "usage primary" in listing.stdout
    finally:
        _chatgpt(sim, limit={"acct-ua": None, "acct-ub": None})
        log = relay.process.stop()
    assert "Traceback" not in log
    assert f"account {name} cooling down" in log


def test_tokens_never_reach_logs_admin_answers_or_metrics(sim: Sim, tmp_path: Path) -> None:
    config = _config(tmp_path, sim.url, ("plus-a",), oauth_refresh_margin_s=1.0)
    auth = _login(sim, "acct-secret", lifetime_s=2)
    assert _import(tmp_path, config, "plus-a", auth).returncode == 0
    relay = _start(config, tmp_path, level="DEBUG")
    try:
        sim.reset()
        time.sleep(1.2)
        assert _ask(relay, "one").output_text  # a refresh
        forced = _cli("accounts", "refresh", "--config", str(config), "--url", relay.url,
                      "plus-a")
        assert forced.returncode == 0, forced.stderr
        assert _ask(relay, "two").output_text
        seen = _sim_secrets(sim) | _secrets_of(auth)
        assert len(seen) >= 4
        answers = [
            relay.admin("GET", "/admin/accounts").text,
            relay.admin("GET", "/admin/state").text,
            relay.admin("POST", "/admin/accounts/plus-a/refresh").text,
            relay.admin("GET", "/metrics").text,
            _cli("accounts", "list", "--config", str(config), "--url", relay.url).stdout,
            forced.stdout + forced.stderr,
        ]
        seen |= _sim_secrets(sim)
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log
    for secret in seen:
        assert secret not in log
        for answer in answers:
            assert secret not in answer
    assert _accounts_refreshes(answers[0]) >= 2


def _accounts_refreshes(listing: str) -> int:
    data = json.loads(listing)["data"]
    return next(a for a in data if a["name"] == "plus-a")["oauth"]["refreshes"]


def test_token_endpoint_down_keeps_the_account_serving_until_expiry(
    sim: Sim, tmp_path: Path
) -> None:
    config = _config(tmp_path, sim.url, ("plus-a",), oauth_refresh_margin_s=30.0)
    auth = _login(sim, "acct-down", lifetime_s=20)  # inside the margin: wants a refresh
    assert _import(tmp_path, config, "plus-a", auth).returncode == 0
    relay = _start(config, tmp_path)
    _chatgpt(sim, token_endpoint="down")
    try:
        before = _chatgpt(sim)["refresh_calls"]
        for turn in range(5):  # every turn served by the old token; one attempt, then backoff
            assert _ask(relay, f"turn {turn}").output_text
        assert _chatgpt(sim)["refresh_calls"] == before + 1
        account = _accounts(relay)["plus-a"]
        assert account["oauth"]["last_refresh_error"] == "http_503"
        assert not account["disabled"]
        time.sleep(5.5)  # the backoff (5 s) is over: one more attempt, now answered
        _chatgpt(sim, token_endpoint=None)
        assert _ask(relay, "after").output_text
        assert _chatgpt(sim)["refresh_calls"] == before + 2
        assert _accounts(relay)["plus-a"]["oauth"]["last_refresh_error"] is None
    finally:
        _chatgpt(sim, token_endpoint=None)
        log = relay.process.stop()
    assert "Traceback" not in log
    assert "token refresh failed (http_503)" in log


def test_admin_refresh_of_an_api_key_account_is_refused(sim: Sim, tmp_path: Path) -> None:
    config = _config(tmp_path, sim.url, ("plus-a",))
    relay = _start(config, tmp_path)
    try:
        refused = relay.admin("POST", "/admin/accounts/api/refresh")
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "not_an_oauth_account"
        # plus-a has no tokens yet: shown so, and requests for it fail over with a clear error.
        account = _accounts(relay)["plus-a"]
        assert account["missing_credentials"] and account["oauth"]["has_tokens"] is False
        with pytest.raises(openai.APIStatusError) as caught:
            _ask(relay, "no tokens")
        assert caught.value.status_code == 502
        assert "has no credentials yet" in caught.value.message
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log


@pytest.mark.parametrize("lock", ["redis", "ledger"])
def test_two_relays_make_exactly_one_refresh(
    sim: Sim, tmp_path: Path, request: pytest.FixtureRequest, lock: str
) -> None:
    """Two relay processes share one ledger (and one Redis, or none); their account's token
    expires while both serve it: the lock (Redis's, else the ledger's) lets one of them
    refresh, the other takes its tokens from the ledger, and the token endpoint sees a single
    refresh (a second one would spend a refresh token already spent: refresh_token_reused,
    the account dead for good)."""
    server = {"redis_url": request.getfixturevalue("redis_url")} if lock == "redis" else {}
    config = _config(tmp_path, sim.url, ("plus-a",), oauth_refresh_margin_s=1.0, **server)
    auth = _login(sim, "acct-shared", lifetime_s=8)
    _chatgpt(sim, lifetime_s={"acct-shared": 3600})
    assert _import(tmp_path, config, "plus-a", auth).returncode == 0
    relays = [_start(config, tmp_path, "relay-1.log"), _start(config, tmp_path, "relay-2.log")]
    try:
        before, reused = (_chatgpt(sim)[k] for k in ("refresh_calls", "refresh_reused"))
        for relay in relays:
            assert _ask(relay, "warm up").output_text
        time.sleep(max(0.0, _expiry(auth) - 1 - time.time()) + 0.3)
        _chatgpt(sim, token_delay_s=1.0)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(
                lambda n: _ask(relays[n % 2], f"turn {n}"), range(6)
            ))
        assert all(answer.output_text for answer in answers)
        stats = _chatgpt(sim)
        assert stats["refresh_calls"] == before + 1 and stats["refresh_reused"] == reused
        refreshed = [_accounts(relay)["plus-a"]["oauth"]["refreshes"] for relay in relays]
        assert sorted(refreshed) == [0, 1]
        for relay in relays:
            assert not _accounts(relay)["plus-a"]["disabled"]
            assert _accounts(relay)["plus-a"]["oauth"]["access_expires_at"] > time.time() + 3000
    finally:
        _chatgpt(sim, token_delay_s=0.0)
        logs = [relay.process.stop() for relay in relays]
    for log in logs:
        assert "Traceback" not in log


def _codex_tool_prompt(marker: str) -> str:
    """A prompt the simulated upstream answers with an exec_command call, then with text."""
    command = "echo\\u0020relay-tool-ok\\u0020>\\u0020proof.txt"
    return (
        f"{marker} Write the proof file. "
        f'#sim tool=exec_command args={{"cmd":"{command}"}} tokens=2 text=written'
    )


def _run_codex_turn(tmp_path: Path, relay: Relay, sim: Sim, marker: str) -> list[dict]:
    """``codex exec`` through the relay, one turn with a shell tool call; the backend requests
    of the turn."""
    env = codex_home(tmp_path, relay, "/openai")
    done, work = codex_exec(
        tmp_path, env, "--dangerously-bypass-approvals-and-sandbox", _codex_tool_prompt(marker)
    )
    assert (work / "proof.txt").read_text().strip() == "relay-tool-ok"
    assert "written written" in done.stdout, done.stdout + done.stderr
    return [r for r in _backend_requests(sim) if marker in json.dumps(r["body"])]


def _session_of(record: dict) -> str:
    return next(record["headers"][name] for name in SESSION_HEADERS if name in record["headers"])


def test_codex_cli_session_goes_on_when_its_access_token_expires(
    sim: Sim, tmp_path: Path
) -> None:
    """The real Codex CLI, one turn with a tool call, through a codex-chatgpt account whose
    access token the backend declares expired after the first answer: the relay refreshes once
    and the turn goes on."""
    config = _config(tmp_path, sim.url, ("plus-a",))
    auth = _login(sim, "acct-codex")
    auth["last_refresh"] = "2026-01-01T00:00:00Z"  # an older login (a fresh one refused is dead)
    assert _import(tmp_path, config, "plus-a", auth).returncode == 0
    relay = _start(config, tmp_path)
    try:
        before = _chatgpt(sim)["refresh_calls"]
        _chatgpt(sim, expire_after={"acct-codex": 1})
        turn = _run_codex_turn(tmp_path, relay, sim, "codex-expiry")
        assert [r["status"] for r in turn] == [200, 401, 200]
        assert _chatgpt(sim)["refresh_calls"] == before + 1
        first, refused, retried = turn
        assert refused["headers"]["authorization"] == first["headers"]["authorization"]
        assert retried["headers"]["authorization"] != first["headers"]["authorization"]
        assert len({_session_of(r) for r in turn}) == 1
        account = _accounts(relay)["plus-a"]
        assert account["oauth"]["refreshes"] == 1 and not account["disabled"]
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log


def test_codex_cli_session_moves_to_the_second_account_at_the_usage_limit(
    sim: Sim, tmp_path: Path
) -> None:
    """The real Codex CLI through two codex-chatgpt accounts; the one serving its session
    reaches its usage limit after the first answer: the tool result goes to the second account
    (failover before the first byte), and the session stays there."""
    config = _config(tmp_path, sim.url, ("plus-a", "plus-b"), priorities={"plus-a": 1})
    for name, account_id in (("plus-a", "acct-ca"), ("plus-b", "acct-cb")):
        assert _import(tmp_path, config, name, _login(sim, account_id)).returncode == 0
    relay = _start(config, tmp_path)
    try:
        _chatgpt(sim, limit_after={"acct-ca": 1})
        turn = _run_codex_turn(tmp_path, relay, sim, "codex-limit")
        served = [(r["headers"]["chatgpt-account-id"], r["status"]) for r in turn]
        assert served == [("acct-ca", 200), ("acct-ca", 429), ("acct-cb", 200)]
        accounts = _accounts(relay)
        assert accounts["plus-b"]["sessions"] == 1 and accounts["plus-a"]["sessions"] == 0
        assert 3500 < accounts["plus-a"]["cooling_until"] - time.time() <= 3600
        # The session's next request stays on the second account.
        sim.reset()
        assert _ask(relay, "next turn", session=_session_of(turn[0])).output_text
        assert [r["headers"]["chatgpt-account-id"] for r in _backend_requests(sim)] == ["acct-cb"]
    finally:
        _chatgpt(sim, limit={"acct-ca": None})
        log = relay.process.stop()
    assert "Traceback" not in log


# -- the pure parts ------------------------------------------------------------------------


def test_config_of_a_codex_chatgpt_account() -> None:
    from relay.config import CHATGPT_BASE_URL, CHATGPT_TOKEN_URL, ConfigError, parse_config

    table = {"pools": {"p": {}}, "accounts": [
        {"name": "c", "pool": "p", "provider": "codex-chatgpt", "models": ["gpt-5.5"]},
    ]}
    account = parse_config(table).accounts[0]
    assert (account.base_url, account.token_url) == (CHATGPT_BASE_URL, CHATGPT_TOKEN_URL)
    assert account.client_id == "app_EMoamEEZ73f0CkXaXp7hrann" and account.wire == (
        "openai-responses"
    )
    table["accounts"][0]["api_key_env"] = "SOME_KEY"
    with pytest.raises(ConfigError) as caught:
        parse_config(table)
    assert "a codex-chatgpt account has no API key" in str(caught.value)


def test_backend_body_and_collected_stream() -> None:
    from relay.protocol.chatgpt import backend_body, collect_stream, usage_windows

    body = backend_body({
        "model": "gpt-5.5", "input": [{"role": "system", "content": "x"}], "temperature": 1,
        "service_tier": "flex", "include": ["file_search_call.results"], "stream": False,
    })
    assert body["input"][0]["role"] == "developer" and "service_tier" not in body
    assert body["include"] == ["file_search_call.results", "reasoning.encrypted_content"]
    assert (body["stream"], body["store"], body["instructions"]) == (True, False, "")
    assert backend_body({"input": "hi"})["input"][0]["content"][0]["text"] == "hi"

    item = {"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": "ok"}]}
    stream = (
        b'event: response.output_item.done\ndata: {"type":"response.output_item.done",'
        b'"output_index":0,"item":' + json.dumps(item).encode() + b'}\n\n'
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"id":"resp_1","status":"completed","output":[]}}\n\n'
    )
    response, error = collect_stream(stream)
    assert error is None and response["output"] == [item]
    failed = b'data: {"type":"response.failed","response":{"error":{"code":"server_error"}}}\n\n'
    assert collect_stream(failed) == (None, {"code": "server_error"})
    assert collect_stream(b"data: {}\n\n") == (None, None)

    windows = usage_windows({
        "X-Codex-Primary-Used-Percent": "42.5", "x-codex-primary-window-minutes": "300",
        "x-codex-primary-reset-after-seconds": "60", "x-codex-secondary-used-percent": "nan",
    }, now=1000.0)
    assert list(windows) == ["primary"]
    assert windows["primary"].public() == {
        "used_percent": 42.5, "window_minutes": 300, "resets_at": 1060.0
    }


def test_a_wrong_secret_key_opens_no_tokens_and_says_so(sim: Sim, tmp_path: Path) -> None:
    config = _config(tmp_path, sim.url, ("plus-a",))
    assert _import(tmp_path, config, "plus-a", _login(sim, "acct-key")).returncode == 0
    relay = _start(config, tmp_path, secret=Fernet.generate_key().decode())
    try:
        oauth = _accounts(relay)["plus-a"]["oauth"]
        assert oauth["has_tokens"] is False
        assert "do not open with the key in RELAY_SECRET_KEY" in oauth["credentials_problem"]
        with pytest.raises(openai.APIStatusError) as caught:
            _ask(relay, "no usable tokens")
        assert caught.value.status_code == 502
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log
    assert "the stored tokens of account plus-a do not open" in log


async def test_a_responses_websocket_continues_on_a_chatgpt_account(
    sim: Sim, tmp_path: Path
) -> None:
    """Codex's WebSocket mode through a codex-chatgpt account: the second turn names the first
    response (``previous_response_id``); the relay expands it from the socket's state, so the
    backend (which keeps nothing) gets the whole conversation, normalized."""
    import trio
    from trio_websocket import open_websocket_url

    from .test_websocket import auth, create, turn, ws_url

    config = _config(tmp_path, sim.url, ("plus-a",))
    assert _import(tmp_path, config, "plus-a", _login(sim, "acct-ws")).returncode == 0
    relay = await trio.to_thread.run_sync(_start, config, tmp_path)
    try:
        key = await trio.to_thread.run_sync(relay.key)
        sim.reset()
        async with open_websocket_url(ws_url(relay), extra_headers=auth(key)) as ws:
            first = await turn(ws, create(MODEL, "ws turn one", store=False))
            assert first[-1]["type"] == "response.completed"
            # The account's usage windows come first, as the backend's WebSocket sends them.
            limits = first[0]
            assert limits["type"] == "codex.rate_limits", first[:2]
            primary = limits["rate_limits"]["primary"]
            assert primary["window_minutes"] == sim_chatgpt.PRIMARY_WINDOW_MINUTES
            assert isinstance(primary["used_percent"], float) and primary["reset_at"] > 0
            assert limits["rate_limits"]["secondary"]["window_minutes"] == (
                sim_chatgpt.SECONDARY_WINDOW_MINUTES)
            previous = first[-1]["response"]["id"]
            second = await turn(ws, create(
                MODEL, [{"role": "user", "content": "ws turn two"}],
                previous_response_id=previous, store=False,
            ))
            assert second[-1]["type"] == "response.completed"
        backend = _backend_requests(sim)
        assert len(backend) == 2
        # Over HTTP the same windows are the answer's x-codex-* headers (Codex reads both).
        answer = await trio.to_thread.run_sync(lambda: httpx2.post(
            relay.url + "/v1/responses", headers={"authorization": f"Bearer {key}"},
            json={"model": MODEL, "input": "over http"}, timeout=30,
        ))
        assert answer.status_code == 200
        assert float(answer.headers["x-codex-primary-used-percent"]) >= 0
        assert answer.headers["x-codex-secondary-window-minutes"] == str(
            sim_chatgpt.SECONDARY_WINDOW_MINUTES)
        text = json.dumps(backend[1]["body"]["input"])
        assert "ws turn one" in text and "ws turn two" in text
        assert "previous_response_id" not in backend[1]["body"]
        assert backend[1]["body"]["stream"] is True and backend[1]["body"]["store"] is False
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log


def test_the_console_shows_an_accounts_usage_windows(sim: Sim, tmp_path: Path) -> None:
    """The operator console's accounts view shows the windows the backend reported, in English
    and in Chinese (headless Chromium, as tests/test_console.py drives it)."""
    from .test_console import CHROMIUM, NODE_DIR

    config = _config(tmp_path, sim.url, ("plus-a",))
    assert _import(tmp_path, config, "plus-a", _login(sim, "acct-console")).returncode == 0
    relay = _start(config, tmp_path)
    try:
        assert _ask(relay, "fill the windows").status == "completed"
        windows = _accounts(relay)["plus-a"]["oauth"]["usage_windows"]
        primary = round(windows["primary"]["used_percent"])
        done = subprocess.run(
            ["node", "console_windows_check.mjs", relay.url, ADMIN_TOKEN],
            cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
            env={**os.environ, "RELAY_TEST_CHROMIUM": CHROMIUM},
        )
        assert done.returncode == 0, done.stderr
        cells = json.loads(done.stdout)
    finally:
        relay.process.stop()
    hours = sim_chatgpt.PRIMARY_WINDOW_MINUTES // 60
    days = sim_chatgpt.SECONDARY_WINDOW_MINUTES // 1440
    english, chinese = cells["en-US"]["plus-a"], cells["zh-CN"]["plus-a"]
    assert english.startswith(f"{hours} h: {primary}% used, resets "), english
    assert f" · {days} d: " in english and "UTC" in english
    assert chinese.startswith(f"{hours} 小时：已用 {primary}%"), chinese
    assert f"{days} 天：" in chinese and "used" not in chinese
