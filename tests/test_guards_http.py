"""Guards through real HTTP: caps hold, queues answer 429s clients handle well, a client that
leaves the queue frees its place, and nothing is left held after a storm of mixed requests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from .conftest import Relay, Sim, start_relay
from .test_codex_cli import CODEX

GUARDED = """
[global]
max_concurrency = 400

[pools.shared]
max_concurrency = 40
max_queue = 600

[packages.crowd]
pool = "shared"
max_concurrency = 5
max_queue = 500
queue_timeout_s = 60

[packages.tiny]
pool = "shared"
max_concurrency = 1
max_queue = 1
queue_timeout_s = 0.5

[packages.metered]
pool = "shared"
tpm = 100000
rpm = 60

[packages.solo]                         # one at a time (keys of it made with --max-queue 0)
pool = "shared"
max_concurrency = 1

[packages.sparse]                       # two requests a minute (likewise)
pool = "shared"
rpm = 2

[packages.storm]
pool = "shared"
max_concurrency = 8
max_queue = 20                          # below the ~33 clients per key: some meet a full queue
queue_timeout_s = 1

[[accounts]]
name = "sim-chat"
pool = "shared"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat"]
max_concurrency = 30

[[accounts]]
name = "sim-responses"
pool = "shared"
provider = "openai-responses"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["gpt-5.5"]
"""

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def guarded(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    # Storms inject upstream 5xx on purpose: a short rest keeps the one chat account serving.
    server = start_relay(tmp_path_factory.mktemp("guarded"), sim.url, body=GUARDED,
                         error_cooldown_s=0.05)
    yield server
    log = server.process.stop()
    assert "Traceback" not in log, log


def chat(text: str, stream: bool = False) -> dict:
    return {"model": "deepseek-chat", "stream": stream,
            "messages": [{"role": "user", "content": text}]}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_concurrency_cap_holds_under_200_concurrent_clients(
    guarded: Relay, sim: Sim
) -> None:
    key = guarded.key("crowd")
    sim.reset()
    statuses: list[int] = []
    queued_ms: list[int] = []
    async with httpx2.AsyncClient(base_url=guarded.url, timeout=60,
                                  limits=httpx2.Limits(max_connections=250)) as client:

        async def one() -> None:
            response = await client.post(CHAT, json=chat("#sim tokens=5 delay=0.01", True),
                                         headers=auth(key))
            statuses.append(response.status_code)
            queued_ms.append(int(response.headers["x-relay-queue-ms"]))

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(one)
    assert statuses == [200] * 200
    peak = sim.stats()["peak_active_streams"]
    print(f"\npeak concurrent upstream streams: {peak} (key cap 5)")
    assert peak == 5
    assert max(queued_ms) > 100  # most of them waited their turn instead of failing
    state = guarded.wait_idle()
    assert state["admission"]["total"] == 0 and state["admission"]["queued"] == 0


async def test_queue_full_is_an_immediate_429_with_retry_after(guarded: Relay) -> None:
    key = guarded.key("tiny")
    results: dict[str, httpx2.Response] = {}
    async with httpx2.AsyncClient(base_url=guarded.url, timeout=10) as client:

        async def send(name: str, text: str) -> None:
            results[name] = await client.post(CHAT, json=chat(text), headers=auth(key))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "running", "#sim tokens=5 delay=0.1")
            await _wait_until(guarded, lambda s: s["admission"]["pools"]["shared"]["in_flight"])
            nursery.start_soon(send, "queued", "#sim tokens=1")
            await _wait_until(guarded, lambda s: s["admission"]["queued"] == 1)
            started = time.monotonic()
            full = await client.post(CHAT, json=chat("#sim tokens=1"), headers=auth(key))
            elapsed = time.monotonic() - started
    assert full.status_code == 429
    error = full.json()["error"]
    assert error["code"] == "queue_full" and "try again in" in error["message"]
    assert "its max_queue of 1" in error["message"], error
    assert int(full.headers["retry-after"]) >= 1
    assert int(full.headers["retry-after-ms"]) >= 1000
    assert elapsed < 0.4  # refused at once, not after waiting
    assert results["running"].status_code == 200


async def test_queue_timeout_is_429(guarded: Relay) -> None:
    key = guarded.key("tiny")
    async with httpx2.AsyncClient(base_url=guarded.url, timeout=10) as client, \
            trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: client.post(CHAT, json=chat("#sim tokens=10 delay=0.15"), headers=auth(key))
        )
        await _wait_until(guarded, lambda s: s["admission"]["pools"]["shared"]["in_flight"])
        started = time.monotonic()
        timed_out = await client.post(CHAT, json=chat("#sim tokens=1"), headers=auth(key))
        waited = time.monotonic() - started
    assert timed_out.status_code == 429
    assert timed_out.json()["error"]["code"] == "queue_timeout"
    message = timed_out.json()["error"]["message"]
    assert "waited 0.5s in the queue" in message, message
    assert "your key's max_concurrency of 1 (1 running) was still reached" in message, message
    assert "retry-after" in timed_out.headers
    assert 0.4 < waited < 3  # the key's queue_timeout_s is 0.5
    row = guarded.usage_row(timed_out.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["output_tokens"]) == (429, "queue_timeout", 0)


def unqueued_key(relay: Relay, package: str) -> str:
    """A key of ``package`` that may not queue (``--max-queue 0``): refused at once."""
    done = relay.cli(
        "keys", "create", "--config", str(relay.config_path), "--package", package,
        "--max-queue", "0", "--json",
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["key"]


async def test_concurrency_cap_refusal_names_max_concurrency(guarded: Relay) -> None:
    """A key that may not queue, at its max_concurrency: the 429 says so, and does not call
    a cap on requests at once "a rate limit"."""
    key = unqueued_key(guarded, "solo")
    async with httpx2.AsyncClient(base_url=guarded.url, timeout=10) as client, \
            trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: client.post(CHAT, json=chat("#sim tokens=10 delay=0.05"), headers=auth(key))
        )
        await _wait_until(guarded, lambda s: s["admission"]["pools"]["shared"]["in_flight"])
        refused = await client.post(CHAT, json=chat("#sim tokens=1"), headers=auth(key))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", "concurrency_limit_exceeded")
    assert error["message"].startswith(
        "Your key is at its max_concurrency of 1 (1 running), and it may not queue"
    ), error
    assert "rate limit" not in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert guarded.state()["admission"]["refused"]["concurrency_limited"] >= 1


async def test_rpm_refusal_names_the_rpm_limit(guarded: Relay) -> None:
    key = unqueued_key(guarded, "sparse")
    async with httpx2.AsyncClient(base_url=guarded.url, timeout=10) as client:
        for _ in range(2):
            done = await client.post(CHAT, json=chat("#sim tokens=1"), headers=auth(key))
            assert done.status_code == 200, done.text
        refused = await client.post(CHAT, json=chat("#sim tokens=1"), headers=auth(key))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert error["message"].startswith(
        "Your key is at its rpm limit of 2 requests per minute, and it may not queue"
    ), error
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # a request's worth refills in 30 s
    row = guarded.usage_row(refused.headers["x-request-id"])
    assert (row["status"], row["error_code"]) == (429, "rate_limit_exceeded")


async def test_disconnect_while_queued_frees_the_place(guarded: Relay, sim: Sim) -> None:
    key = guarded.key("tiny")
    marker = f"left-the-queue-{time.monotonic_ns()}"
    async with httpx2.AsyncClient(base_url=guarded.url, timeout=10) as client, \
            trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: client.post(CHAT, json=chat("#sim tokens=4 delay=0.1"), headers=auth(key))
        )
        await _wait_until(guarded, lambda s: s["admission"]["pools"]["shared"]["in_flight"] >= 1)
        with trio.move_on_after(0.15):
            await client.post(CHAT, json=chat(f"{marker} #sim tokens=1"), headers=auth(key))
        # The queue is empty again at once: another request may take the place.
        state = await trio.to_thread.run_sync(guarded.state)
        assert state["admission"]["queued"] == 0
        again = await client.post(CHAT, json=chat("#sim tokens=1"), headers=auth(key))
    assert again.status_code == 200, again.text  # it queued (place free) and was served
    assert not [r for r in sim.requests() if marker in json.dumps(r["body"])]  # never sent
    state = guarded.wait_idle()
    assert state["admission"]["total"] == 0 and state["admission"]["reserved_tokens"] == 0


def test_rate_limit_headers_on_every_relayed_response(guarded: Relay) -> None:
    key = guarded.key("metered")

    def remaining_while_streaming() -> int:
        with httpx2.stream("POST", guarded.url + CHAT, json=chat("#sim tokens=3", True),
                           headers=auth(key)) as streaming:
            remaining = int(streaming.headers["x-ratelimit-remaining-tokens"])
            streaming.read()
        return remaining

    # The key's first request holds the default expected output (1,024) while it runs.
    assert 100000 - 1200 < remaining_while_streaming() <= 100000 - 1024
    first = httpx2.post(guarded.url + CHAT, json=chat("#sim tokens=3"), headers=auth(key))
    second = httpx2.post(guarded.url + CHAT, json=chat("#sim tokens=3"), headers=auth(key))
    for response in (first, second):
        assert response.headers["x-ratelimit-limit-requests"] == "60"
        assert response.headers["x-ratelimit-limit-tokens"] == "100000"
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-relay-queue-ms" in response.headers
    assert int(second.headers["x-ratelimit-remaining-requests"]) < int(
        first.headers["x-ratelimit-remaining-requests"]
    )
    # Its answers were 3 tokens long: now a request holds its input and ~3 expected tokens.
    assert 100000 - 100 < remaining_while_streaming() < 100000
    error = httpx2.post(guarded.url + CHAT, json=chat("#sim fault=500"), headers=auth(key))
    assert error.status_code == 500 and "x-ratelimit-remaining-requests" in error.headers


async def test_storm_of_mixed_requests_leaves_nothing_held(guarded: Relay, sim: Sim) -> None:
    """1,000 requests: completions, streams, upstream errors, clients leaving while queued and
    while streaming, queue timeouts. Afterwards every slot, queue place and reservation is free."""
    keys = [guarded.create_key("storm", name=f"storm-{i}") for i in range(3)]
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    async with httpx2.AsyncClient(base_url=guarded.url, timeout=30,
                                  limits=httpx2.Limits(max_connections=120)) as client:
        # First, for certain (not left to how fast the storm's clients arrive): a key's 8 slots
        # held for 2 s, then 21 more requests: 20 queue and time out after 1 s, one finds the
        # queue full.
        full_key = guarded.create_key("storm", name="storm-full")
        refusals: list[tuple[int, str]] = []

        async def hold() -> None:
            async with client.stream("POST", CHAT, json=chat("#sim tokens=100 delay=0.02", True),
                                     headers=auth(full_key)) as response:
                async for _ in response.aiter_bytes():
                    pass

        async def refused() -> None:
            response = await client.post(CHAT, json=chat("#sim tokens=3"), headers=auth(full_key))
            refusals.append((response.status_code, response.json()["error"]["code"]))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(hold)
            deadline = trio.current_time() + 10
            while guarded.state()["admission"]["total"] < 8:
                assert trio.current_time() < deadline, "the 8 holders never all started"
                await trio.sleep(0.02)
            for _ in range(21):
                nursery.start_soon(refused)
        print(f"\nrefusals: {sorted(set(refusals))}")
        assert len(refusals) == 21 and {status for status, _ in refusals} == {429}
        codes = [code for _, code in refusals]
        assert codes.count("queue_full") == 1 and codes.count("queue_timeout") == 20, codes

        limit = trio.CapacityLimiter(100)

        async def one(index: int) -> None:
            kind = rng.choice(["ok", "ok", "stream", "stream", "error", "leave", "leave_stream"])
            key = keys[index % len(keys)]
            text = {
                "ok": "#sim tokens=3 delay=0.005",
                "stream": "#sim tokens=6 delay=0.01",
                # Not 429: an upstream 429 rests the account for its retry-after (health),
                # which would turn the rest of the storm into queue timeouts.
                "error": f"#sim fault={rng.choice(['500', 'drop', '400'])}",
                "leave": "#sim tokens=20 delay=0.02",
                "leave_stream": "#sim tokens=40 delay=0.02",
            }[kind]
            async with limit:
                with trio.move_on_after(rng.uniform(0.01, 0.3) if "leave" in kind else 30):
                    if kind in ("stream", "leave_stream"):
                        async with client.stream("POST", CHAT, json=chat(text, True),
                                                 headers=auth(key)) as response:
                            async for _ in response.aiter_bytes():
                                pass
                    else:
                        response = await client.post(CHAT, json=chat(text), headers=auth(key))
                    outcomes[str(response.status_code)] = outcomes.get(
                        str(response.status_code), 0) + 1
                    return
                outcomes["left"] = outcomes.get("left", 0) + 1

        async with trio.open_nursery() as nursery:
            for index in range(1000):
                nursery.start_soon(one, index)
    print(f"\nstorm outcomes: {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) == 1000
    assert outcomes.get("200", 0) > 100 and outcomes.get("left", 0) > 50
    state = guarded.wait_idle(timeout=10)
    admission = state["admission"]
    assert admission["total"] == 0
    assert admission["queued"] == 0
    assert admission["reserved_tokens"] == 0
    assert all(pool["queue_depth"] == 0 for pool in admission["pools"].values())
    assert not any(account["in_flight"] for account in state["accounts"].values())
    assert state["active_requests"] == 0


def test_codex_waits_and_retries_when_its_key_is_over_capacity(
    guarded: Relay, tmp_path: Path
) -> None:
    """The Codex CLI never retries an HTTP 429, so a Codex client gets response.failed with
    rate_limit_exceeded and "try again in Ns": it waits, retries, and the turn succeeds."""
    if not CODEX.exists():
        pytest.fail(f"the Codex CLI is not installed at {CODEX}: run scripts/test")
    key = guarded.key("tiny")
    home = tmp_path / "home" / ".codex"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        f'model = "gpt-5.5"\nmodel_provider = "relay"\n\n[model_providers.relay]\n'
        f'name = "relay"\nbase_url = "{guarded.url}/openai"\nwire_api = "responses"\n'
        f'experimental_bearer_token = "{key}"\nstream_max_retries = 5\n'
    )
    body = {"model": "gpt-5.5", "input": "#sim tokens=20 delay=0.1"}
    with httpx2.Client(base_url=guarded.url, timeout=30) as client:
        # Fill the key: one request running (2 s), one queued: Codex's first try is refused.
        holders = [
            subprocess.Popen(
                ["curl", "-s", "-o", "/dev/null", guarded.url + "/v1/responses",
                 "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
                 "-d", json.dumps(body)]
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 5
        while client.get("/admin/state", headers=auth("test-admin-token")).json()[
            "admission"]["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        done = subprocess.run(
            [str(CODEX), "exec", "--skip-git-repo-check", "Reply. #sim tokens=3 text=pong"],
            env={**os.environ, "HOME": str(home.parent), "CODEX_HOME": str(home),
                 "NO_COLOR": "1"},
            cwd=tmp_path, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        for holder in holders:
            holder.wait(30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pong pong pong" in done.stdout
    rows = guarded.usage_rows()
    refused = [r for r in rows if r["error_code"] in ("queue_full", "queue_timeout")
               and r["endpoint"] == "responses"]
    assert refused, "Codex's first attempt was not refused: the test did not fill the key"
    assert any(r["status"] == 200 and not r["error_code"] and r["output_tokens"] == 3
               for r in rows)


async def _wait_until(relay: Relay, predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(await trio.to_thread.run_sync(relay.state)):
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not reached")
