"""Account scheduling through real HTTP: sticky sessions, rebinding, failover and health."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx2
import pytest

from .conftest import SIM_KEY, Relay, Sim, running_relay, start_process

ACCOUNTS = """
[pools.p]

[packages.team]
pool = "p"

[[accounts]]
name = "dead"
pool = "p"
provider = "openai-chat"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat"]
priority = 10

[[accounts]]
name = "a"
pool = "p"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat", "sticky-model"]
max_concurrency = 1

[[accounts]]
name = "b"
pool = "p"
provider = "openai-chat"
base_url = "SIM_B_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat", "sticky-model"]
"""

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def sim_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    log = tmp_path_factory.mktemp("sim-b") / "sim.log"
    process = start_process(
        ["-m", "relay.testing.upstream", "--port", "0", "--api-key", SIM_KEY,
         "--ttft", "0.01", "--token-delay", "0.002", "--tokens", "4"],
        r"listening on (\S+)", log,
    )
    yield Sim(process)
    process.stop()


@pytest.fixture(scope="module")
def scheduled(sim: Sim, sim_b: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    body = ACCOUNTS.replace("SIM_B_URL", sim_b.url)
    with running_relay(tmp_path_factory.mktemp("scheduled"), sim.url, body=body) as server:
        yield server


def ask(relay: Relay, text: str, *, model: str = "deepseek-chat", session: str | None = None,
        timeout: float = 20) -> httpx2.Response:
    headers = {"authorization": f"Bearer {relay.key()}"}
    if session:
        headers["session-id"] = session
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx2.post(relay.url + CHAT, json=body, headers=headers, timeout=timeout)


def account_of(relay: Relay, response: httpx2.Response) -> str:
    return relay.usage_row(response.headers["x-request-id"])["account"]


def test_failover_past_an_account_that_refuses_connections(scheduled: Relay) -> None:
    response = ask(scheduled, "hi #sim tokens=2")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "tok tok"
    assert account_of(scheduled, response) in ("a", "b")
    dead = scheduled.state()["accounts"]["dead"]
    assert dead["last_error"].startswith("502 upstream_unreachable")
    assert dead["in_flight"] == 0


def test_a_session_stays_on_its_account(scheduled: Relay, sim: Sim, sim_b: Sim) -> None:
    """Bind a session to b (a is busy at that moment); with a free again, every later request of
    the session still goes to b, while requests without a session go to a."""
    busy = threading.Thread(target=ask, args=(scheduled, "#sim tokens=10 delay=0.1"),
                            kwargs={"model": "sticky-model"})
    busy.start()
    try:
        deadline = time.monotonic() + 5
        while scheduled.state()["accounts"]["a"]["in_flight"] == 0:
            assert time.monotonic() < deadline
        first = ask(scheduled, "hi #sim tokens=1", model="sticky-model", session="conv-1")
    finally:
        busy.join()
    assert account_of(scheduled, first) == "b"
    landed = [
        account_of(scheduled, ask(scheduled, "hi #sim tokens=1", model="sticky-model",
                                  session="conv-1"))
        for _ in range(20)
    ]
    assert landed == ["b"] * 20
    unbound = ask(scheduled, "hi #sim tokens=1", model="sticky-model")
    assert account_of(scheduled, unbound) == "a"
    assert scheduled.state()["accounts"]["b"]["sessions"] >= 1


def test_claude_code_sessions_stick_and_are_each_keys_own(scheduled: Relay) -> None:
    """Claude Code's session header binds a Messages session to an account (b, while a is
    busy); the same session id from another key is another session: it goes where an unbound
    request goes (a), not to the first key's account."""
    def message(key: str, session: str) -> httpx2.Response:
        body = {"model": "sticky-model", "max_tokens": 50,
                "messages": [{"role": "user", "content": "hi #sim tokens=1"}]}
        return httpx2.post(
            scheduled.url + "/v1/messages", json=body, timeout=20,
            headers={"x-api-key": key, "x-claude-code-session-id": session},
        )

    owner, other = scheduled.key(), scheduled.create_key("team", "other")
    busy = threading.Thread(target=ask, args=(scheduled, "#sim tokens=10 delay=0.1"),
                            kwargs={"model": "sticky-model"})
    busy.start()
    try:
        deadline = time.monotonic() + 5
        while scheduled.state()["accounts"]["a"]["in_flight"] == 0:
            assert time.monotonic() < deadline
        first = message(owner, "cc-session-1")
    finally:
        busy.join()
    assert first.status_code == 200, first.text
    assert account_of(scheduled, first) == "b"
    assert [account_of(scheduled, message(owner, "cc-session-1")) for _ in range(5)] == ["b"] * 5
    assert account_of(scheduled, message(other, "cc-session-1")) == "a"


def test_rate_limited_account_rebinds_the_session_without_an_error(
    scheduled: Relay, sim: Sim, sim_b: Sim
) -> None:
    """The session's account (b) starts answering 429: the request fails over to a, the
    session is rebound there, the client sees only normal answers, and b rests."""
    session = "conv-rebind"
    assert account_of(scheduled, ask(scheduled, "#sim tokens=1", session=session)) in ("a", "b")
    bound = scheduled.state()
    first_account = account_of(
        scheduled, ask(scheduled, "#sim tokens=1", session=session)
    )
    other_sim = sim_b if first_account == "b" else sim
    rebinds = bound["sessions"]["rebinds"]
    other_sim.http.post("/_sim/profile", json={"fault": "429"}).raise_for_status()
    try:
        answers = [ask(scheduled, "#sim tokens=2", session=session) for _ in range(3)]
    finally:
        other_sim.http.post("/_sim/profile", json={"fault": None}).raise_for_status()
    assert [r.status_code for r in answers] == [200, 200, 200]
    landed = {account_of(scheduled, r) for r in answers}
    assert landed == {"a" if first_account == "b" else "b"}
    state = scheduled.state()
    assert state["sessions"]["rebinds"] == rebinds + 1
    resting = state["accounts"][first_account]
    assert resting["rate_limited"] >= 1 and resting["cooling_down_s"] > 0
    assert not resting["healthy"]
    scheduled.enable_accounts()
