"""``relay serve --workers N``: real worker processes on one listening socket (loopback).

Which worker served a request is read from the access log (``relay.access [worker N]``); the
parent and its workers are real processes, found through ``/proc``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from relay.config import cpu_count

from .conftest import ADMIN_TOKEN, ROOT, Relay, relay_config, start_relay

_SERVED_BY = re.compile(r"relay\.access \[worker (\d+)\]: request_id=(\S+) .*path=(\S+)")


def _chat(relay: Relay, key: str, prompt: str = "hello") -> httpx2.Response:
    # A connection per request, so that each one is accepted anew, by either worker.
    return httpx2.post(
        relay.url + "/v1/chat/completions",
        json={"model": "gpt-5.5", "messages": [{"role": "user", "content": prompt}]},
        headers={"authorization": f"Bearer {key}", "connection": "close"},
        timeout=20,
    )


def _served_by(relay: Relay, path: str = "/v1/chat/completions") -> dict[str, str]:
    """request id → the worker whose access log line it has."""
    return {
        match.group(2): match.group(1)
        for match in _SERVED_BY.finditer(relay.process.log.read_text())
        if match.group(3) == path
    }


def _workers(parent: int) -> set[int]:
    """The pids of ``parent``'s live children."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                children.add(int(entry.name))
    return children


def _numbered(parent: int) -> dict[str, int]:
    """``parent``'s workers: worker number → pid (from each one's command line)."""
    numbered = {}
    for pid in _workers(parent):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        numbered[args[args.index(b"--worker") + 1].decode()] = pid
    return numbered


@contextmanager
def _only(relay: Relay, worker: str) -> Iterator[None]:
    """Requests made in this block are served by ``worker``: the others are stopped
    (SIGSTOP) meanwhile, so they cannot accept. An idle worker otherwise often takes a burst of
    connections whole (the last to wait is woken first), so which one serves is left to
    chance."""
    others = [pid for number, pid in _numbered(relay.process.proc.pid).items() if number != worker]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def _wait_for(condition, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _metrics(relay: Relay) -> dict[str, dict[tuple, float]]:
    response = httpx2.get(
        relay.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200, response.text
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def _stop(relay: Relay) -> tuple[int, str]:
    relay.process.proc.send_signal(signal.SIGTERM)
    code = relay.process.proc.wait(20)
    return code, relay.process.log.read_text()


def test_two_workers_both_serve_write_every_usage_row_and_metrics_sum_them(
    tmp_path, sim, redis_url
) -> None:
    relay = start_relay(tmp_path, sim.url, workers=2, redis_url=redis_url)
    try:
        key = relay.create_key("team")
        responses = []
        with ThreadPoolExecutor(8) as pool:
            for worker in ("1", "2"):
                with _only(relay, worker):
                    responses += pool.map(lambda _: _chat(relay, key), range(6))
            # Both at once: both workers write usage at the same time.
            responses += pool.map(lambda _: _chat(relay, key), range(12))
        assert [r.status_code for r in responses] == [200] * 24
        _wait_for(lambda: len(_served_by(relay)) == 24, what="24 access lines")
        served = _served_by(relay)
        assert set(served.values()) == {"1", "2"}, served
        assert set(served) == {r.headers["x-request-id"] for r in responses}

        # Every usage row is written, whichever worker served it, and no lock reached anyone.
        _wait_for(lambda: len(relay.usage_rows()) == 24, what="24 usage rows")
        assert {row["status"] for row in relay.usage_rows()} == {200}

        # /metrics, whichever worker answers, counts the requests of both.
        def requests_counted() -> float:
            counts = _metrics(relay).get("relay_requests_total", {})
            return sum(v for labels, v in counts.items() if ("status", "200") in labels)

        _wait_for(lambda: requests_counted() == 24, what="relay_requests_total == 24")
        per_worker = {w: list(served.values()).count(w) for w in ("1", "2")}
        assert 0 < per_worker["1"] < 24 and 0 < per_worker["2"] < 24  # a sum of both
        _wait_for(
            lambda: _metrics(relay)["relay_admission_granted_total"][()] == 24,
            what="relay_admission_granted_total == 24 (published live state)",
        )
        # Admitted is counted before the request ends: a publish may show both in flight.
        _wait_for(lambda: _metrics(relay)["relay_active_requests"][()] == 0, what="idle")
        samples = _metrics(relay)
        assert samples["relay_tokens_total"]  # histograms and counters come through too
        assert sum(
            v for labels, v in samples["relay_request_duration_seconds_count"].items()
        ) == 24
        assert not any(
            dict(labels).get("guard") == "key" for labels in samples["relay_in_flight"]
        )  # idle keys are left out
    finally:
        code, log = _stop(relay)
    assert code == 0, log
    assert "Traceback" not in log and "database is locked" not in log, log
    assert not list(Path("/tmp").glob(f"relay-metrics-*/*_{relay.process.proc.pid}.db"))


def test_a_worker_killed_with_sigkill_is_restarted_and_the_relay_keeps_serving(
    tmp_path, sim, redis_url
) -> None:
    relay = start_relay(tmp_path, sim.url, workers=2, redis_url=redis_url, log_level="INFO")
    try:
        key = relay.create_key("team")
        parent = relay.process.proc.pid
        before = _workers(parent)
        assert len(before) == 2, before
        victim = _numbered(parent)["1"]
        with _only(relay, "1"):  # the victim serves one request first: its counts must stay
            assert _chat(relay, key).status_code == 200
        _wait_for(
            lambda: _metrics(relay).get("relay_admission_granted_total", {}).get(()) == 1,
            what="the victim's live state published",
        )
        os.kill(victim, signal.SIGKILL)
        # The other worker serves meanwhile.
        assert all(_chat(relay, key).status_code == 200 for _ in range(5))
        _wait_for(lambda: len(_workers(parent)) == 2 and victim not in _workers(parent),
                  what="a new worker")
        line = re.search(
            rf"worker (\d) \(pid {victim}\) was killed by SIGKILL; restarting it in ([\d.]+)s",
            relay.process.log.read_text(),
        )
        assert line, relay.process.log.read_text()
        assert line.group(2) == "0.5"
        restarted = line.group(1)
        # Killed again soon after its start: the next restart waits twice as long.
        (again,) = _workers(parent) - before
        os.kill(again, signal.SIGKILL)
        _wait_for(lambda: len(_workers(parent)) == 2 and again not in _workers(parent),
                  what="another new worker")
        assert re.search(
            rf"worker {restarted} \(pid {again}\) was killed by SIGKILL; restarting it in 1s",
            relay.process.log.read_text(),
        ), relay.process.log.read_text()
        # The restarted worker serves too.
        with _only(relay, restarted):
            response = _chat(relay, key)
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        _wait_for(lambda: request_id in _served_by(relay), what="the access line")
        assert _served_by(relay)[request_id] == restarted
        # The dead workers' counts stay in the sums (1 + 5 + 1 requests); their live gauges go.
        _wait_for(
            lambda: _metrics(relay)["relay_admission_granted_total"][()] == 7,
            what="the granted total of every worker, the dead one's included",
        )
        samples = _metrics(relay)
        assert sum(
            v for labels, v in samples["relay_requests_total"].items()
            if ("status", "200") in labels
        ) == 7
        _wait_for(lambda: _metrics(relay)["relay_active_requests"][()] == 0, what="idle")
    finally:
        code, log = _stop(relay)
    assert code == 0, log
    assert "Traceback" not in log, log


class _Stream(threading.Thread):
    def __init__(self, relay: Relay, key: str) -> None:
        super().__init__(daemon=True)
        self.relay, self.key = relay, key
        self.status = 0
        self.data = b""
        self.request_id = ""
        self.first_byte = threading.Event()

    def run(self) -> None:
        body = {
            "model": "gpt-5.5", "stream": True,
            "messages": [{"role": "user", "content": "#sim delay=0.05 tokens=20"}],
        }
        with httpx2.Client(timeout=30) as client, client.stream(
            "POST", self.relay.url + "/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {self.key}"},
        ) as response:
            self.status = response.status_code
            self.request_id = response.headers.get("x-request-id", "")
            for chunk in response.iter_raw():
                self.data += chunk
                self.first_byte.set()
        self.first_byte.set()


def test_sigterm_lets_every_worker_finish_its_streams_and_write_their_usage(
    tmp_path, sim, redis_url
) -> None:
    relay = start_relay(tmp_path, sim.url, workers=2, redis_url=redis_url, log_level="INFO")
    key = relay.create_key("team")
    streams = []
    for worker in ("1", "2"):
        with _only(relay, worker):  # five streams running on each worker
            started = [_Stream(relay, key) for _ in range(5)]
            for stream in started:
                stream.start()
            for stream in started:
                assert stream.first_byte.wait(10)
        streams += started
    code, log = _stop(relay)
    for stream in streams:
        stream.join(10)
        assert stream.status == 200
        assert stream.data.rstrip().endswith(b"data: [DONE]"), stream.data[-200:]
        assert b"relay_shutdown" not in stream.data
    assert code == 0, log
    assert "Traceback" not in log, log
    draining = dict(re.findall(r"relay \[worker (\d)\]: draining (\d+) running requests", log))
    assert set(draining) == {"1", "2"} and all(int(n) > 0 for n in draining.values()), log
    connection = sqlite3.connect(relay.database)
    rows = connection.execute("select request_id, status, error_code from usage").fetchall()
    connection.close()
    assert sorted(rows) == sorted((s.request_id, 200, "") for s in streams)


def _serve(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
        env={**os.environ, "SIM_UPSTREAM_KEY": "x"},
    )


def test_several_workers_without_redis_url_refuse_to_start(tmp_path, sim) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(relay_config(sim.url, tmp_path / "relay.db"))
    for done in (_serve(config, "--workers", "2"), _serve(config, "--workers", "auto")):
        if cpu_count() == 1 and "auto" in done.args:
            continue  # one CPU: "auto" is one worker, which needs no Redis
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "needs server.redis_url" in done.stderr
        assert "multiply" in done.stderr
    config.write_text(relay_config(sim.url, tmp_path / "relay.db", workers=3))
    done = _serve(config)
    assert done.returncode == 1 and "--workers 3 needs server.redis_url" in done.stderr

    done = _serve(config, "--workers", "none")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        'relay: --workers must be a positive integer or "auto", got \'none\''
    )


def test_workers_auto_starts_one_worker_per_cpu(tmp_path, sim, redis_url) -> None:
    relay = start_relay(tmp_path, sim.url, workers="auto", redis_url=redis_url, log_level="INFO")
    try:
        expected = cpu_count()
        if expected > 1:
            assert len(_workers(relay.process.proc.pid)) == expected
            assert f"{expected} workers serving on {relay.url}" in relay.process.log.read_text()
        key = relay.create_key("team")
        assert _chat(relay, key).status_code == 200
    finally:
        code, log = _stop(relay)
    assert code == 0, log


def test_the_workers_flag_overrides_the_config(tmp_path, sim, redis_url) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(relay_config(sim.url, tmp_path / "relay.db", workers=2))
    # workers = 2 without redis_url is refused, --workers 1 overrides it: one process serves.
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "SIM_UPSTREAM_KEY": "x"},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("relay listening on http://127.0.0.1:"), proc.stderr.read()
        assert _workers(proc.pid) == set()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


_WRITER = """
import sys, time
from relay.ledger.store import Store
from relay.ledger.usage import UsageRecord
store = Store(sys.argv[1])
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
for i in range(2000):
    store.insert_usage([UsageRecord(f"{sys.argv[2]}-{i}", "key_x", "team", "chat", "m").row()])
"""


def test_two_processes_writing_usage_at_once_both_get_every_row_in(tmp_path) -> None:
    """What two workers' usage writers do, without the relay around them: each commit waits
    for the other's (the busy timeout), none fails with "database is locked"."""
    database = tmp_path / "relay.db"
    from relay.ledger.store import Store

    Store(database).close()  # the parent's part: tables and WAL made once
    start = f"{time.time() + 1.0}"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(database), name, start],
            cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )
        for name in ("a", "b")
    ]
    errors = [writer.communicate(timeout=60)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], errors
    connection = sqlite3.connect(database)
    count = connection.execute("select count(*), count(distinct request_id) from usage").fetchone()
    connection.close()
    assert count == (4000, 4000)


def test_check_config_refuses_several_workers_without_redis_url(tmp_path, sim, redis_url) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(relay_config(sim.url, tmp_path / "relay.db", workers=2))
    done = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
        env={**os.environ, "SIM_UPSTREAM_KEY": "x"},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "server.workers: workers 2 needs server.redis_url" in done.stderr, done.stderr
    config.write_text(
        relay_config(sim.url, tmp_path / "relay.db", workers=2, redis_url=redis_url)
    )
    done = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
        env={**os.environ, "SIM_UPSTREAM_KEY": "x"},
    )
    assert done.returncode == 0, done.stderr


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_whose_parent_is_killed_shut_down_by_themselves(tmp_path, sim, redis_url) -> None:
    relay = start_relay(tmp_path, sim.url, workers=2, redis_url=redis_url, log_level="INFO")
    workers = _workers(relay.process.proc.pid)
    assert len(workers) == 2
    environ = Path(f"/proc/{min(workers)}/environ").read_bytes().split(b"\0")
    (metrics_dir,) = [
        entry.split(b"=", 1)[1].decode() for entry in environ
        if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
    ]
    relay.process.proc.kill()
    relay.process.proc.wait()
    _wait_for(lambda: all(_gone(pid) for pid in workers), what="the orphaned workers to exit")
    shutil.rmtree(metrics_dir)  # the parent's to remove, and it was killed
    log = relay.process.log.read_text()
    assert log.count("the relay's parent process is gone; shutting down") == 2, log
    assert "Traceback" not in log, log


def test_workers_that_cannot_start_make_the_parent_give_up_with_one_line(
    tmp_path, sim, redis_url, capfd
) -> None:
    """The parent's own checks passed, but its workers cannot load the file (here: it is gone
    by the time they start): the parent stops the others and reports why, instead of
    restarting them forever before it ever served."""
    import trio

    from relay.config import load_config
    from relay.workers import Supervisor, WorkersError

    path = tmp_path / "relay.toml"
    path.write_text(relay_config(sim.url, tmp_path / "relay.db", workers=2, redis_url=redis_url))
    config = load_config(path)
    supervisor = Supervisor(config, str(tmp_path / "gone.toml"), 2)
    try:
        trio.run(supervisor.run)
    except WorkersError as error:
        message = str(error)
    else:
        raise AssertionError("the supervisor served")
    assert re.fullmatch(
        r"worker \d exited with status 1 before it served \(its messages are above\)", message
    ), message
    assert not supervisor.processes
    err = capfd.readouterr().err
    assert "configuration is invalid" in err and "file not found" in err, err
    assert "Traceback" not in err, err


def test_server_workers_is_a_positive_integer_or_auto() -> None:
    from relay.config import ConfigError, parse_config

    def workers(value: object) -> int:
        return parse_config({"server": {"workers": value}}).server.workers

    assert parse_config({}).server.workers == 1
    assert workers(3) == 3
    assert workers("auto") == cpu_count() >= 1
    for bad in (0, -2, "many", True, 2.5):
        try:
            workers(bad)
        except ConfigError as error:
            (issue,) = error.issues
            assert str(issue).startswith('server.workers: must be a positive integer or "auto"')
        else:
            raise AssertionError(f"workers = {bad!r} accepted")
