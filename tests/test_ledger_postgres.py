"""The ledger on PostgreSQL (issue 18): migrations under a lock, the password from the
environment, every key command, ``relay ledger migrate`` from SQLite, two relays on one database
and one Redis, a PostgreSQL restart under load and a ``kill -9`` of a relay.

Real PostgreSQL only (:class:`tests.conftest.PostgresServer`: Debian's server in a temporary
folder); the store's own tests run on both backends in test_ledger*.py and test_credits.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import psycopg
import pytest
import trio
from psycopg.rows import dict_row

from relay.config import ConfigError, load_config
from relay.ledger.backend import StoreError
from relay.ledger.postgres import MIGRATION_LOCK, MIGRATIONS
from relay.ledger.prices import parse_credits
from relay.ledger.store import Store
from relay.ledger.usage import UsageRecord, UsageWriter
from relay.testing.postgres import PostgresServer

from .conftest import (
    BILLING_BODY,
    PG_PASSWORD_ENV,
    ROOT,
    Relay,
    Sim,
    open_ledger,
    server_section,
    start_relay,
)

CHAT = "/v1/chat/completions"
#: The billing config with an upstream that is never called (CLI tests).
OFFLINE_BODY = BILLING_BODY.replace("SIM_URL", "http://127.0.0.1:9")


def rows(url: str, sql: str, params: tuple | list = ()) -> list[dict]:
    """Rows of a query, read straight from PostgreSQL (the password from the environment)."""
    with psycopg.connect(url, password=os.environ[PG_PASSWORD_ENV], row_factory=dict_row) as conn:
        return list(conn.execute(sql, params))


def pg_relay(tmp: Path, sim: Sim, url: str, **server: object) -> Relay:
    tmp.mkdir(parents=True, exist_ok=True)
    return start_relay(
        tmp, sim.url, body=BILLING_BODY, database=url, database_password_env=PG_PASSWORD_ENV,
        **server,
    )


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, cwd=ROOT,
        timeout=60, env={**os.environ, **(env or {})},
    )


def chat(relay: Relay, key: str, text: str = "hi", timeout: float = 30) -> httpx2.Response:
    return httpx2.post(
        relay.url + CHAT, timeout=timeout, headers={"authorization": f"Bearer {key}"},
        json={"model": "gpt-5", "messages": [{"role": "user", "content": text}]},
    )


def wait_for_rows(url: str, request_ids: set[str], timeout: float = 30) -> list[dict]:
    """The usage rows of ``request_ids`` once all of them are written (or at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        found = rows(url, "select * from usage where request_id = any(%s)", [list(request_ids)])
        if {row["request_id"] for row in found} >= request_ids or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# -- the schema -----------------------------------------------------------------------------


def test_migrations_run_once_and_a_second_opener_waits(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    opened: list = []
    with postgres_server.connect(url.rsplit("/", 1)[1]) as holder:
        # Someone else is migrating (holds the lock): both openers wait, neither races.
        holder.execute("select pg_advisory_lock(%s)", [MIGRATION_LOCK])
        threads = [
            threading.Thread(target=lambda: opened.append(open_ledger(url))) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        assert opened == []
        holder.execute("select pg_advisory_unlock(%s)", [MIGRATION_LOCK])
        for thread in threads:
            thread.join(30)
    assert len(opened) == 2
    applied = rows(url, "select version, name from ledger_migrations order by version")
    assert [row["version"] for row in applied] == [version for version, _, _ in MIGRATIONS]
    for store in opened:
        store.close()
    # A later relay opens it again with nothing to do; a newer relay's database is refused.
    open_ledger(url).close()
    with psycopg.connect(url, password=os.environ[PG_PASSWORD_ENV]) as conn:
        conn.execute("insert into ledger_migrations values (99, 'from the future', 0)")
    with pytest.raises(StoreError, match=r"migration 99.*newer relay"):
        open_ledger(url)


def test_the_password_comes_from_the_environment_never_the_file(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    in_file = tmp_path / "in-file.toml"
    in_file.write_text(
        server_section(url.replace("relay@", "relay:secret@")) + OFFLINE_BODY  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError) as refused:
        load_config(in_file)
    assert "must not contain a password" in str(refused.value)
    assert "secret" not in str(refused.value)

    config = tmp_path / "relay.toml"
    config.write_text(
        server_section(url, database_password_env="RELAY_TEST_LEDGER_PW")  # type: ignore[arg-type]
        + OFFLINE_BODY
    )
    unset = cli("keys", "list", "--config", str(config))
    assert unset.returncode == 1
    assert "RELAY_TEST_LEDGER_PW, which is not set" in unset.stderr
    assert len(unset.stderr.splitlines()) == 1, unset.stderr
    wrong = cli("keys", "list", "--config", str(config), env={"RELAY_TEST_LEDGER_PW": "nope"})
    assert wrong.returncode == 1 and "password authentication failed" in wrong.stderr
    assert len(wrong.stderr.splitlines()) == 1, wrong.stderr
    checked = cli("check-config", str(config), env={"RELAY_TEST_LEDGER_PW": "nope"})
    assert checked.returncode == 1 and "server.database" in checked.stderr
    right = cli("keys", "list", "--config", str(config),
                env={"RELAY_TEST_LEDGER_PW": os.environ[PG_PASSWORD_ENV]})
    assert right.returncode == 0, right.stderr
    assert "no keys yet" in right.stdout


def test_every_key_command_and_check_config_work_on_postgres(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    config = tmp_path / "relay.toml"
    config.write_text(
        server_section(url, database_password_env=PG_PASSWORD_ENV)  # type: ignore[arg-type]
        + OFFLINE_BODY
    )
    c = ["--config", str(config)]
    created = cli("keys", "create", *c, "--package", "paid", "--name", "pg", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["credits_granted"] == 10
    assert cli("keys", "topup", *c, key["id"], "2.5", "--note", "more").returncode == 0
    assert cli("keys", "set-limits", *c, key["key"], "--tpm", "1000").returncode == 0
    assert cli("keys", "set-expiry", *c, key["id"], "--expires-in", "1d").returncode == 0
    rotated = cli("keys", "rotate", *c, key["id"], "--grace", "1h", "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = json.loads(rotated.stdout)["key"]
    listed = cli("keys", "list", *c, "--json")
    assert listed.returncode == 0, listed.stderr
    (shown,) = json.loads(listed.stdout)
    assert shown["id"] == key["id"] and shown["credits_granted"] == 12.5
    assert shown["limits"] == {"tpm": 1000} and shown["expires_at"] is not None
    assert shown["previous_secret"]["hint"] == key["hint"]
    assert cli("keys", "revoke", *c, new_secret).returncode == 0
    again = cli("keys", "revoke", *c, key["id"])
    assert again.returncode == 1 and "already revoked" in again.stderr
    missing = cli("keys", "topup", *c, "key_nothing", "1")
    assert missing.returncode == 1 and "no key matches" in missing.stderr
    checked = cli("check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    store = open_ledger(url)
    try:
        record = store.get_key(key["id"])
        assert not record.active and record.credits_granted_nano == parse_credits("12.5")
        assert [g["note"] for g in store.grants(key["id"])] == ["more", "initial credits"]
    finally:
        store.close()


def test_a_batch_is_written_once_however_often_it_is_retried(
    postgres_server: PostgresServer,
) -> None:
    """A retry after a lost commit answer (the commit went through) writes nothing twice."""
    store = open_ledger(postgres_server.create_database())
    try:
        _, key = store.create_key("p", prefix="cr_", credits_nano=10**9)
        batch = [
            UsageRecord(request_id=f"r{i}", key_id=key.id, package="p", endpoint="responses",
                        model="m", cost_nano=100).row()
            for i in range(50)
        ]
        for _ in range(3):
            assert store.insert_usage(batch) == 50
        assert len(store.usage_rows()) == 50
        assert store.get_key(key.id).credits_used_nano == 50 * 100
        store.insert_usage(batch[:10])  # another batch (the same records alone): its own key
        assert len(store.usage_rows()) == 60
    finally:
        store.close()


async def test_records_wait_in_memory_while_the_database_is_away_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay.ledger import usage as usage_module

    server = PostgresServer()
    server.start()
    try:
        store = open_ledger(server.create_database())
        _, key = store.create_key("p", prefix="cr_")
        monkeypatch.setattr(usage_module, "MAX_WAITING", 300)
        writer = UsageWriter(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.to_thread.run_sync(server.stop)
            for index in range(305):
                writer.record(UsageRecord(request_id=f"r{index}", key_id=key.id, package="p",
                                          endpoint="responses", model="m", output_tokens=1))
            with trio.fail_after(20):
                while not writer.unavailable:
                    await trio.sleep(0.05)
            assert writer.dropped == 5 and writer.queued == 300  # kept, and retried
            await trio.sleep(1.0)
            assert writer.written == 0 and writer.unavailable
            await trio.to_thread.run_sync(server.start)
            with trio.fail_after(30):
                await writer.flushed()
            writer.close()
        assert writer.written == 300 and not writer.unavailable
        assert len(store.usage_rows(limit=1000)) == 300
        store.close()
    finally:
        server.stop("immediate")
        server.remove()


# -- relay ledger migrate --------------------------------------------------------------------


async def test_migrate_copies_an_sqlite_ledger_and_the_relay_serves_from_it(
    postgres_server: PostgresServer, sim: Sim, tmp_path: Path
) -> None:
    source = tmp_path / "old.db"
    store = Store(source)
    plain, first = store.create_key("paid", prefix="cr_", name="first",
                                    credits_nano=parse_credits(10))
    _, second = store.create_key("paid", prefix="cr_", limits={"rpm": 5},
                                 expires_at=time.time() + 86_400)
    _, third = store.create_key("tight", prefix="sk-", credits_nano=3)
    store.top_up(first.id, parse_credits("1.5"), "bonus")
    store.rotate_key(second.id, grace_s=60)
    store.revoke_key(third.id)
    writer = UsageWriter(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for index in range(1500):
            writer.record(UsageRecord(
                request_id=f"old_{index}", key_id=(first, second)[index % 2].id, package="paid",
                endpoint="chat/completions", model="gpt-5", input_tokens=index, output_tokens=3,
                cost_nano=1000 + index, ttft_ms=None if index % 3 else 12.5,
            ))
        writer.close()
    url = postgres_server.create_database()
    done = cli("ledger", "migrate", "--from", str(source), "--to", url,
               "--password-env", PG_PASSWORD_ENV)
    assert done.returncode == 0, done.stderr
    assert "copied 3 keys, 3 credit grants and 1500 usage records" in done.stdout
    assert "verified" in done.stdout
    target = open_ledger(url)
    try:
        assert target.list_keys() == store.list_keys()
        for key in (first, second, third):
            assert target.grants(key.id) == store.grants(key.id)
        assert target.usage_rows(limit=5000) == store.usage_rows(limit=5000)
        assert target.usage_summary(None, 0, 2**40, "day") == store.usage_summary(
            None, 0, 2**40, "day"
        )
        assert target.usage_by_key() == store.usage_by_key()
        # New rows get ids after the copied ones.
        target.insert_usage([UsageRecord(
            request_id="new", key_id=first.id, package="paid", endpoint="responses", model="m",
        ).row()])
        assert target.usage_rows(limit=1)[0]["id"] == 1501
    finally:
        target.close()
        store.close()
    again = cli("ledger", "migrate", "--from", str(source), "--to", url,
                "--password-env", PG_PASSWORD_ENV)
    assert again.returncode == 1 and "already holds rows" in again.stderr
    # A relay on the copy knows the old key, its balance and its usage.
    relay = pg_relay(tmp_path / "served", sim, url)
    try:
        answer = httpx2.get(relay.url + "/v1/balance",
                            headers={"authorization": f"Bearer {plain}"})
        assert answer.status_code == 200, answer.text
        used = sum(1000 + i for i in range(0, 1500, 2)) / 1e9
        assert answer.json()["used"] == pytest.approx(used)
        assert answer.json()["granted"] == 11.5
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log, log


# -- several hosts -----------------------------------------------------------------------------


def test_two_relays_share_one_postgres_and_one_redis(
    sim: Sim, redis_url: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    a = pg_relay(tmp_path / "a", sim, url, redis_url=redis_url)
    b = pg_relay(tmp_path / "b", sim, url, redis_url=redis_url)
    try:
        assert a.url != b.url
        made = a.admin("POST", "/admin/keys", {"package": "paid", "credits": 5})
        assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["id"]
        # Made through a, used through b at once (b looks an unknown key up in the database).
        answers = [chat(b, key), chat(a, key), chat(b, key)]
        assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
        ids = {r.headers["x-request-id"] for r in answers}
        assert {row["request_id"] for row in wait_for_rows(url, ids)} == ids
        # b's own usage endpoint shows the calls made through both.
        usage = httpx2.get(
            b.url + "/v1/usage?group_by=day", headers={"authorization": f"Bearer {key}"}
        )
        assert usage.status_code == 200, usage.text
        assert usage.json()["totals"]["calls"] == 3, usage.text
        assert sum(day["calls"] for day in usage.json()["data"]) == 3

        # A top-up through a's admin API shows in b's balance within a second.
        assert a.admin("POST", f"/admin/keys/{key_id}/topup", {"credits": 7}).status_code == 200
        started = time.monotonic()
        while time.monotonic() - started < 3:
            balance = httpx2.get(b.url + "/v1/balance",
                                 headers={"authorization": f"Bearer {key}"}).json()
            if balance["granted"] == 12:
                break
            time.sleep(0.05)
        assert balance["granted"] == 12
        assert time.monotonic() - started < 1.6

        # A revocation by the CLI (on the shared database) stops the key on both hosts.
        assert a.cli("keys", "revoke", "--config", str(a.config_path), key_id).returncode == 0
        started = time.monotonic()
        while time.monotonic() - started < 3:
            statuses = {chat(relay, key).status_code for relay in (a, b)}
            if statuses == {401}:
                break
            time.sleep(0.05)
        assert statuses == {401}
        assert time.monotonic() - started < 1.6
    finally:
        logs = [relay.process.stop() for relay in (a, b)]
    for log in logs:
        assert "Traceback" not in log, log


def test_postgres_restarted_under_load_loses_no_record(sim: Sim, tmp_path: Path) -> None:
    server = PostgresServer()  # its own: this test stops it
    server.start()
    try:
        url = server.create_database()
        relay = pg_relay(tmp_path, sim, url)
        try:
            key, key_id = relay.create_paid_key(credits="1000")
            answers: list[httpx2.Response] = []
            stop = threading.Event()

            def load() -> None:
                with httpx2.Client(timeout=30) as client:
                    while not stop.is_set():
                        answers.append(client.post(
                            relay.url + CHAT, headers={"authorization": f"Bearer {key}"},
                            json={"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]},
                        ))

            with ThreadPoolExecutor(4) as pool:
                for _ in range(4):
                    pool.submit(load)
                time.sleep(1.0)
                server.stop("fast")
                during = len(answers)
                time.sleep(0.5)
                # What needs the database answers 503, in the error shape, saying why.
                for refused in (
                    relay.admin("GET", "/admin/keys"),
                    chat(relay, "cr_a-key-no-relay-has-seen-yet-0123456789", timeout=15),
                ):
                    assert refused.status_code == 503, refused.text
                    assert refused.json()["error"]["code"] == "ledger_unavailable"
                    assert refused.headers["retry-after"] == "1"
                time.sleep(2.0)
                answered_while_down = len(answers) - during
                server.start()
                time.sleep(1.5)
                stop.set()
            assert answered_while_down > 20  # the relay kept serving with the database down
            statuses = {r.status_code for r in answers}
            assert statuses == {200}, [r.text for r in answers if r.status_code != 200][:3]
            ids = {r.headers["x-request-id"] for r in answers}
            found = wait_for_rows(url, ids)
            assert len(found) == len(ids)  # every record, and none twice
            assert {row["request_id"] for row in found} == ids
            (key_row,) = rows(url, "select credits_used_nano from api_keys where id = %s",
                              [key_id])
            assert key_row["credits_used_nano"] == sum(row["cost_nano"] for row in found) > 0
            assert relay.state()["usage_records"]["queued"] == 0
        finally:
            log = relay.process.stop()
        assert "the usage writer cannot reach the database" in log  # logged once
        assert log.count("cannot reach the database") == 1
        assert "the usage writer reaches the database again" in log
        assert "Traceback" not in log, log
    finally:
        server.stop("immediate")
        server.remove()


def test_sigterm_writes_every_record_to_postgres(
    sim: Sim, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    relay = pg_relay(tmp_path, sim, url)
    try:
        key, _ = relay.create_paid_key(credits="1000")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: chat(relay, key), range(200)))
        assert {r.status_code for r in answers} == {200}
        relay.process.proc.send_signal(signal.SIGTERM)  # at once: records still queued
        assert relay.process.proc.wait(30) == 0
    finally:
        log = relay.process.stop()
    assert "Traceback" not in log, log
    ids = {r.headers["x-request-id"] for r in answers}
    stored = rows(url, "select request_id from usage")
    assert len(stored) == len(ids) and {row["request_id"] for row in stored} == ids


def test_kill_9_of_a_relay_loses_at_most_one_batch_window(
    sim: Sim, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    relay = pg_relay(tmp_path, sim, url)
    try:
        key, _ = relay.create_paid_key(credits="1000")
        answered: list[tuple[float, str]] = []
        with httpx2.Client(timeout=30) as client:
            ends = time.monotonic() + 2.0
            while time.monotonic() < ends:
                response = client.post(
                    relay.url + CHAT, headers={"authorization": f"Bearer {key}"},
                    json={"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]},
                )
                assert response.status_code == 200, response.text
                answered.append((time.monotonic(), response.headers["x-request-id"]))
        os.kill(relay.process.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        relay.process.proc.wait(10)
    finally:
        relay.process.stop()
    stored = {row["request_id"] for row in rows(url, "select request_id from usage")}
    # As with SQLite (bench.chaos.KILL_GRACE_S): an answer older than the batch window plus
    # its commit has its row.
    old = {request_id for at, request_id in answered if killed_at - at > 0.5}
    assert len(old) > 20 and old <= stored
    assert len(answered) - len(stored) <= sum(1 for at, _ in answered if killed_at - at <= 0.5)
