"""Several relay processes, one set of limits (issue 13): two real ``relay serve`` processes on one
real Redis and one database, in front of the simulated upstream, which counts what it serves."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx2
import pytest
import trio

from .conftest import ADMIN_TOKEN, RedisServer, Relay, Sim, start_relay

SHARED = """
[pools.shared]
max_concurrency = 100

[packages.four]
pool = "shared"
max_concurrency = 4
max_queue = 100
queue_timeout_s = 30

[packages.metered]
pool = "shared"
rpm = 6
max_queue = 100
queue_timeout_s = 1.5

[packages.paid]
pool = "shared"
initial_credits = 40

[prices.deepseek-chat]
input = 0
output = 1000000                         # one credit per output token

[[accounts]]
name = "sim-chat"
pool = "shared"
provider = "openai-chat"
base_url = "SIM_URL/v1"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["deepseek-chat"]
"""

CHAT = "/v1/chat/completions"


def chat(text: str, stream: bool = True) -> dict:
    return {"model": "deepseek-chat", "stream": stream,
            "messages": [{"role": "user", "content": text}]}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def redis(redis_server: RedisServer) -> RedisServer:
    if not redis_server.ping():
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server


@pytest.fixture(scope="module")
def pair(sim: Sim, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Relay, Relay]]:
    """Two relays sharing one Redis and one database (leases outlive a dead process 1 s)."""
    database = tmp_path_factory.mktemp("shared-db") / "relay.db"
    relays = [
        start_relay(tmp_path_factory.mktemp(f"shared-{i}"), sim.url, body=SHARED,
                    database=database, redis_url=redis.url, redis_lease_ttl_s=1.0)
        for i in range(2)
    ]
    yield relays[0], relays[1]
    for relay in relays:
        log = relay.process.stop()
        assert "Traceback" not in log, log


def shared_leases(relay: Relay) -> dict:
    state = httpx2.get(relay.url + "/admin/state",
                       headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    return state["admission"]["shared"]


async def hammer(relays: tuple[Relay, ...], key: str, count: int, text: str) -> list[int]:
    """``count`` concurrent streamed requests, alternating between the relays: their statuses."""
    statuses: list[int] = []
    async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=100)) as client:

        async def one(i: int) -> None:
            relay = relays[i % len(relays)]
            response = await client.post(relay.url + CHAT, json=chat(text), headers=auth(key))
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    return statuses


async def test_a_concurrency_cap_holds_across_two_processes(
    pair: tuple[Relay, Relay], sim: Sim
) -> None:
    key, key_id = pair[0].create_paid_key("four")
    sim.reset()
    statuses = await hammer(pair, key, 24, "#sim tokens=6 delay=0.03")
    assert statuses == [200] * 24
    # Each process alone would allow 4: together they reach the upstream 4 at a time, not 8.
    assert sim.stats()["peak_active_streams"] == 4
    for relay in pair:
        relay.wait_idle()
    shared = shared_leases(pair[0])
    assert shared["leases"][f"k:{key_id}"] == 0 and shared["leases"]["g"] == 0
    assert len(shared["processes"]) == 2


async def test_rpm_is_shared_by_the_processes(pair: tuple[Relay, Relay], sim: Sim) -> None:
    key = pair[0].create_key("metered")
    sim.reset()
    statuses = await hammer(pair, key, 16, "#sim tokens=2")
    served = statuses.count(200)
    # RPM 6: a full bucket's burst (6) plus what refills in the 1.5 s wait (0.15 request),
    # summed over both processes; the rest wait out their queue timeout and get 429.
    assert served == 6, statuses
    assert statuses.count(429) == 10
    assert len(sim.requests()) == 6


async def test_two_processes_cannot_both_spend_the_last_credits(
    pair: tuple[Relay, Relay], sim: Sim
) -> None:
    key, key_id = pair[0].create_paid_key("paid")
    sim.reset()
    body = {**chat("#sim tokens=10 delay=0.05"), "max_tokens": 10}  # estimated at 10 credits
    statuses: list[int] = []
    async with httpx2.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:

        async def one(relay: Relay) -> None:
            response = await client.post(relay.url + CHAT, json=body, headers=auth(key))
            statuses.append(response.status_code)

        for i in range(8):
            nursery.start_soon(one, pair[i % 2])
    # 40 credits cover four requests estimated at 10: the other four get 402 wherever they
    # land (each process alone would have let four through: eight in all, 40 credits over).
    assert sorted(statuses) == [200] * 4 + [402] * 4, statuses
    assert len(sim.requests()) == 4
    for relay in pair:
        relay.wait_idle()
    rows = [row for row in pair[0].usage_rows() if row["key_id"] == key_id]
    spent = sum(row["cost_nano"] for row in rows) / 1e9
    assert spent == 40  # the overdraft bound: cost = estimate here, so never below zero
    view = pair[1].admin("GET", f"/admin/keys/{key_id}").json()
    assert view["credits"]["remaining"] >= 0


async def test_a_killed_process_slots_come_back_within_the_lease_ttl(
    sim: Sim, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    database = tmp_path_factory.mktemp("kill-db") / "relay.db"
    doomed = start_relay(tmp_path_factory.mktemp("doomed"), sim.url, body=SHARED,
                         database=database, redis_url=redis.url, redis_lease_ttl_s=1.0)
    survivor = start_relay(tmp_path_factory.mktemp("survivor"), sim.url, body=SHARED,
                           database=database, redis_url=redis.url, redis_lease_ttl_s=1.0)
    try:
        key = doomed.create_key("four")
        sim.reset()
        async with httpx2.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:

            async def slow() -> None:
                try:
                    await client.post(doomed.url + CHAT, json=chat("#sim tokens=400 delay=0.05"),
                                      headers=auth(key))
                except httpx2.HTTPError:
                    pass  # its relay is killed under it

            for _ in range(4):
                nursery.start_soon(slow)
            deadline = time.monotonic() + 5
            while sim.stats()["active_streams"] < 4 and time.monotonic() < deadline:
                await trio.sleep(0.02)
            assert sim.stats()["active_streams"] == 4
            os.kill(doomed.process.proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # The survivor's request waits for the dead process's leases to lapse (TTL 1 s).
            response = await client.post(survivor.url + CHAT, json=chat("#sim tokens=2"),
                                         headers=auth(key))
            waited = time.monotonic() - killed_at
            nursery.cancel_scope.cancel()
        assert response.status_code == 200
        assert waited < 2.5, waited
        assert int(response.headers["x-relay-queue-ms"]) > 300  # it did wait for them
    finally:
        doomed.process.stop()
        log = survivor.process.stop()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("policy", ["local", "closed"])
async def test_redis_lost_and_back(
    policy: str, sim: Sim, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp(f"lost-{policy}")
    relay = start_relay(tmp, sim.url, body=SHARED, redis_url=redis.url,
                        redis_failure=policy, log_level="WARNING")
    try:
        key = relay.create_key("four")
        async with httpx2.AsyncClient(base_url=relay.url, timeout=10) as client:
            before = await client.post(CHAT, json=chat("#sim tokens=2", False), headers=auth(key))
            assert before.status_code == 200
            redis.stop()
            started = time.monotonic()
            during = await client.post(CHAT, json=chat("#sim tokens=2", False), headers=auth(key))
            assert time.monotonic() - started < 2  # no hang on a dead Redis
            if policy == "local":
                assert during.status_code == 200
            else:
                assert during.status_code == 503
                error = during.json()["error"]
                assert error["code"] == "shared_state_unavailable"
                assert "Redis" in error["message"]
                assert during.headers["retry-after"] == "1"
            redis.start()
            deadline = time.monotonic() + 5
            while shared_leases(relay)["degraded"] and time.monotonic() < deadline:
                await trio.sleep(0.1)
            assert not shared_leases(relay)["degraded"]
            after = await client.post(CHAT, json=chat("#sim tokens=2", False), headers=auth(key))
            assert after.status_code == 200
        assert relay.wait_idle()["admission"]["total"] == 0
    finally:
        if not redis.ping():
            redis.start()
        log = relay.process.stop()
    assert "Traceback" not in log, log
    assert log.count("is unreachable") == 1, log
    assert log.count("is back: limits are shared again") == 1, log
