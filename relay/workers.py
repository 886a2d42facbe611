"""Several worker processes on one host: ``relay serve --workers N`` (``server.workers``).

**One parent, N workers, one listening socket.** The parent makes the listening socket (the
same one a single relay makes, ``TCP_USER_TIMEOUT`` included), opens the database once (so its
tables and WAL mode exist before several processes open it at once), and starts each worker as
``python -m relay.workers``, handing it the socket's file descriptor (``pass_fds``). Every
worker runs the whole relay (``relay.server.serve``) on that socket; the kernel gives each new
connection to whichever worker accepts it first. The parent serves nothing itself.

Why a shared socket rather than one ``SO_REUSEPORT`` socket per worker: measured on this 2-core
machine (``python -m bench workers``: non-streamed chat completions through the simulated
upstream, 3-4 s per row, two or three runs per row, while other sessions' test suites kept the load
average between 2 and 15), both spread sustained load evenly, and neither was measurably faster
(the machine's noise, 98-598 req/s for the same row, was larger than any difference):

================================  ========================  ========================
2 workers, share of requests      shared socket             SO_REUSEPORT
================================  ========================  ========================
keep-alive, 32 connections        53/47, 49/51, 51/49 %     52/48, 55/45, 51/49 %
new connection each, 32 clients   50/50, 50/50, 51/49 %     47/53, 54/46, 53/47 %
keep-alive, 8 connections         49/51, 55/45 %            50/50, 56/44 %
new connection each, 8 clients    47/53, 52/48 %            53/47, 51/49 %
new connection each, 1 client     54/46, 54/46 %            49/51, 50/50 %
================================  ========================  ========================

(One keep-alive connection is served by one worker in both, as it must be.) What the shared
socket does unevenly is a burst reaching idle workers: the worker woken first accepts every
connection waiting, so eight connections opened at once on an idle relay often all land on one
worker (seen in ``tests/test_workers.py``, which therefore pauses the other worker when it needs
a given one to serve). That costs nothing at light load, and under load a busy worker is slower
to accept, so the other takes the next connections.

So the simpler one wins on what the figures do not show: with a shared socket, connections
waiting to be accepted belong to the socket, not to a worker, so a worker that dies loses none
of them (Linux resets the connections queued on a closed ``SO_REUSEPORT`` socket, and a
restarted worker would join the group anew); ``SO_REUSEPORT`` hands every worker its hash's
share whatever its load (the kernel's documented behaviour, not measured here); and the port
(0 included) is bound once, by the parent.
The ``SO_REUSEPORT`` arm was measured with commit f3dd493 (``RELAY_WORKER_SOCKETS=reuseport``).

**Readiness.** The parent prints ``relay listening on URL`` once, when every worker has
started serving (each writes one byte to a pipe the parent gave it); a worker that exits before
it ever served makes the parent stop the others and exit 1, as a single relay that cannot start
does.

**Restarts.** A worker that exits while the relay runs is logged (``worker 2 (pid 4711) was
killed by SIGKILL; restarting it in 0.5s``) and started again after a back-off that doubles
from :data:`FIRST_RESTART_DELAY_S` to :data:`MAX_RESTART_DELAY_S` while it keeps dying soon
after its start, and goes back to the first delay once a worker has run
:data:`STABLE_AFTER_S`: a worker that crashes at start costs a start every 30 s, not a spin.

**Signals.** SIGTERM or SIGINT to the parent is forwarded as SIGTERM to every worker: each
drains as a single relay does (``relay/server.py``: stops accepting, lets running requests
finish, writes every usage record), and the parent exits 0 once all have exited. A second
signal is forwarded too, and stops the workers at once. Workers run in their own process
group, so a Ctrl-C at a terminal reaches the parent alone and each worker gets one SIGTERM;
a worker whose parent is gone (``kill -9`` of the parent) shuts down the same way by itself.

**Metrics.** The parent makes a fresh directory for ``prometheus_client``'s multiprocess mode,
names it to the workers in ``PROMETHEUS_MULTIPROC_DIR``, marks each dead worker's live gauges
dead (``multiprocess.mark_process_dead``) and removes the directory when it exits (a parent
killed with SIGKILL leaves it in the temporary directory); what a scrape shows is in
``relay/api/metrics.py``.

**Limits.** Each worker keeps its guards in its own memory unless ``server.redis_url`` makes
them shared, so more than one worker without it would multiply every limit by the number of
workers: :func:`check_workers` refuses that.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio

from .config import Config
from .ledger.backend import open_store

log = logging.getLogger("relay.workers")

#: Seconds before the first restart of a worker that died, doubled while it keeps dying.
FIRST_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
#: A worker that ran this long before it died is restarted after the first delay again.
STABLE_AFTER_S = 30.0
#: How often a worker checks that its parent is still there.
PARENT_CHECK_S = 1.0


class WorkersError(Exception):
    """The workers could not be started (one exited before it served); a one-line reason."""


def check_workers(config: Config, workers: int) -> str | None:
    """Why ``workers`` processes cannot serve ``config``, in one line; ``None`` if they can."""
    if workers > 1 and config.server.database == ":memory:":
        return (
            f'--workers {workers} cannot share server.database = ":memory:" (each process '
            f"would have its own keys and usage); set server.database to a file"
        )
    if workers > 1 and not config.server.redis_url:
        return (
            f"--workers {workers} needs server.redis_url: without a shared Redis each worker "
            f"enforces every limit (TPM, RPM, concurrency, credits) on its own, so the limits "
            f"would silently multiply by {workers}; set server.redis_url (README, \"Running "
            f"several processes\") or run one worker"
        )
    return None


def describe_exit(returncode: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class Supervisor:
    """The parent of ``workers`` worker processes serving ``config_path`` (see the module
    docstring). :meth:`run` returns when every worker has exited after a signal."""

    def __init__(
        self, config: Config, config_path: str, workers: int, log_level: str | None = None
    ) -> None:
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.workers = workers
        self.log_level = log_level
        self.stopping = False
        self.processes: dict[int, trio.Process] = {}  # worker number → its live process
        self.failed: list[str] = []  # why workers could not start (then the relay does not)
        self._metrics_dir = ""
        self._listener: socket.socket | None = None

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        from .server import listen_url, make_listener

        server = self.config.server
        self._listener = make_listener(server.host, server.port, 2 * server.stall_timeout_s)
        self._listener.listen(1024)
        url = listen_url(self._listener)
        # Tables and WAL (or migrations) made once, before N processes open it.
        open_store(server.database, password_env=server.database_password_env).close()
        self._metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-")
        failure = ""
        try:
            async with trio.open_nursery() as signals:
                signals.start_soon(self._forward_signals)
                async with trio.open_nursery() as nursery:
                    ready = [trio.Event() for _ in range(self.workers)]
                    for number in range(1, self.workers + 1):
                        nursery.start_soon(self._keep_running, number, ready[number - 1])
                    for event in ready:
                        await event.wait()
                    if self.failed or self.stopping:
                        failure = self.failed[0] if self.failed else "stopped before serving"
                        self.stopping = True
                        self._signal_all(signal.SIGTERM)
                    else:
                        log.info("%d workers serving on %s", self.workers, url)
                        task_status.started(url)
                # Each worker's task returns once it exited after a signal: the relay stopped.
                signals.cancel_scope.cancel()
        finally:
            self._listener.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if failure:  # raised here, not in a nursery, so that it is not an exception group
            raise WorkersError(failure)

    async def _forward_signals(self) -> None:
        """On SIGTERM/SIGINT, tell every worker to stop (SIGTERM). A second signal is forwarded
        too: a worker stops at once on its second."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if not self.stopping:
                    log.info(
                        "received %s, stopping %d workers", signal.Signals(signum).name,
                        len(self.processes),
                    )
                    self.stopping = True
                self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for process in list(self.processes.values()):
            if process.returncode is None:
                process.send_signal(signum)

    async def _keep_running(self, number: int, ready: trio.Event) -> None:
        """Run worker ``number``, and run it again whenever it dies, until the relay stops;
        ``ready`` is set once its first start served (or failed: :attr:`failed` says why)."""
        delay = FIRST_RESTART_DELAY_S
        while True:
            started = time.monotonic()
            process, served = await self._start(number)
            if not ready.is_set():
                if not served and not self.stopping:
                    await process.wait()
                    self.failed.append(
                        f"worker {number} {describe_exit(process.returncode)} before it "
                        "served (its messages are above)"
                    )
                ready.set()
            returncode = await process.wait()
            del self.processes[number]
            self._mark_dead(process.pid)
            if self.stopping or self.failed:
                if returncode and not self.failed:
                    log.warning(
                        "worker %d (pid %d) %s", number, process.pid, describe_exit(returncode)
                    )
                return
            if time.monotonic() - started >= STABLE_AFTER_S:
                delay = FIRST_RESTART_DELAY_S
            log.warning(
                "worker %d (pid %d) %s; restarting it in %gs",
                number, process.pid, describe_exit(returncode), delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY_S)
            if self.stopping:
                return

    async def _start(self, number: int) -> tuple[trio.Process, bool]:
        """Start worker ``number``; returns it and whether it started serving (``False``: it
        exited first)."""
        assert self._listener is not None
        read_end, write_end = os.pipe()
        fd = self._listener.fileno()
        command = [
            sys.executable, "-m", "relay.workers", "--config", self.config_path,
            "--worker", str(number), "--listen-fd", str(fd), "--ready-fd", str(write_end),
        ]
        if self.log_level:
            command += ["--log-level", self.log_level]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        try:
            process = await trio.lowlevel.open_process(
                command, pass_fds=(fd, write_end), env=env, process_group=0
            )
        finally:
            os.close(write_end)
        self.processes[number] = process
        if self.stopping:  # the signal came while it was being started
            process.send_signal(signal.SIGTERM)
        async with trio.lowlevel.FdStream(read_end) as readiness:
            served = bool(await readiness.receive_some(1))
        return process, served

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self._metrics_dir)


# -- the worker's side ----------------------------------------------------------------------


async def _parent_gone(parent: int) -> None:
    """Return once this process's parent has exited (it is then re-parented)."""
    while os.getppid() == parent:
        await trio.sleep(PARENT_CHECK_S)
    log.warning("the relay's parent process is gone; shutting down")


async def _until_stopped(parent: int) -> None:
    """Return on SIGTERM/SIGINT, or once the parent is gone: a worker's shutdown trigger."""
    from .server import wait_for_signal

    async with trio.open_nursery() as nursery:
        for wait in (wait_for_signal, functools.partial(_parent_gone, parent)):
            nursery.start_soon(_then_cancel, wait, nursery.cancel_scope)


async def _then_cancel(wait: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


def worker_main(argv: list[str] | None = None) -> int:
    """One worker: serve the configuration on the inherited socket until SIGTERM (or until its
    parent is gone); exit 1 with one line if the configuration no longer loads."""
    parser = argparse.ArgumentParser(prog="python -m relay.workers")
    parser.add_argument("--config", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--log-level", default=None)
    args = parser.parse_args(argv)

    from .config import ConfigError
    from .config_checks import load_servable_config
    from .logs import setup_logging
    from .server import serve

    try:
        config = load_servable_config(args.config)
    except ConfigError as error:  # changed since the parent read it
        issues = "; ".join(str(issue) for issue in error.issues)
        print(f"relay: worker {args.worker}: configuration is invalid: {issues}", file=sys.stderr)
        return 1
    server = config.server
    setup_logging(
        args.log_level or os.environ.get("RELAY_LOG_LEVEL") or "INFO",
        server.log_format, server.access_log, worker=args.worker,
    )
    listener = socket.socket(fileno=args.listen_fd)
    serving = functools.partial(
        serve, config, listener=listener,
        shutdown_trigger=functools.partial(_until_stopped, os.getppid()),
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serving)
            os.write(args.ready_fd, b"1")
            os.close(args.ready_fd)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
