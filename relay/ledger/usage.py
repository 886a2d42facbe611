"""Usage records and the one task that writes them.

Every relayed request leaves exactly one :class:`UsageRecord`. Handlers hand it to
:meth:`UsageWriter.record`, which never blocks and never checkpoints, so it is safe to call in a
``finally`` block of a cancelled request; the writer task batches records into SQLite off the
request's path.

:meth:`UsageWriter.record` first shows the record to its observers, in order: the credit ledger
prices it and debits the key in memory (``relay/ledger/credits.py``), the metrics count it. The
batch the writer then commits carries each record's ``cost_nano``, and the store debits the keys
in the same transaction that inserts the rows.

A batch is one transaction, so a row the database refuses would take every key's rows with it:
when a batch fails, its rows are written one by one, and a row that still fails is written with
the values the database cannot store replaced (``store.storable_usage_row``) and logged.

A database that cannot be reached (``StoreUnavailable``: a PostgreSQL server restarting, a lost
connection) loses nothing either: the writer keeps the batch and retries it (every
:data:`RETRY_FIRST_S`, doubling to :data:`RETRY_MAX_S`; a PostgreSQL batch is written at most
once, so a retry after a commit whose answer was lost writes nothing twice) while new records
wait in memory, logged once as ``usage_writer_database_unavailable`` and once when it is back,
and shown by ``relay_usage_records_queued``. At most :data:`MAX_WAITING` records wait: beyond
that a record is logged whole and counted (``relay_usage_records_dropped_total``) instead of
growing memory without bound. After :meth:`UsageWriter.close` (SIGTERM) the writer retries for
:data:`SHUTDOWN_RETRY_S` more, then logs what it could not write, whole. A record is lost only
then, or if the database refuses a row even with its values replaced.

The writer is *behind* when a write has been going on for :data:`BEHIND_S` as records keep
arriving, or :data:`BEHIND_RECORDS` wait: logged once as an operator event (``relay/logs.py``),
and once again when it has caught up (the queue written down to a tenth of that).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from ..logs import event
from .backend import LedgerStore, StoreUnavailable
from .store import storable_usage_row

log = logging.getLogger("relay.ledger")

#: Records written per SQLite transaction at most, and how long a record may wait for company.
BATCH_SIZE = 500
BATCH_WINDOW_S = 0.05

#: When the writer counts as behind: a write this long, or this many records waiting.
BEHIND_S = 2.0
BEHIND_RECORDS = 10_000

#: Records that may wait in memory for the database at most (~1 KB each); more are dropped.
MAX_WAITING = 500_000
#: Seconds between tries of a batch while the database cannot be reached (doubling).
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
#: Once closed (shutdown), how long an unreachable database is still retried.
SHUTDOWN_RETRY_S = 15.0


@dataclass
class UsageRecord:
    """What one request cost and how it went (one row of the ``usage`` table)."""

    request_id: str
    key_id: str
    package: str
    endpoint: str
    model: str
    ts: float = dataclasses.field(default_factory=time.time)
    upstream_model: str = ""
    account: str = ""
    stream: bool = False
    status: int = 0
    error_code: str = ""
    input_tokens: int = 0  # all the input, cache reads and writes included
    cached_tokens: int = 0  # input tokens read from the prompt cache
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0  # input tokens written to the prompt cache (part of input)
    usage_source: str = "none"  # upstream | estimate | none
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    queue_ms: float = 0.0
    client_disconnected: bool = False
    cost_nano: int = 0  # what the key was charged (relay/ledger/prices.py), set when recorded

    def row(self) -> dict:
        row = dict(self.__dict__)  # every field is a scalar: asdict's deep copy cost ~16 us
        row["stream"] = int(self.stream)
        row["client_disconnected"] = int(self.client_disconnected)
        return row


class UsageWriter:
    """Batches usage records into the store from one task.

    ``record`` appends to an unbounded in-memory channel: a slow disk delays rows, it never
    drops them or slows a request. Closing the writer (leaving :meth:`run`'s caller) drains
    what is queued before returning.
    """

    def __init__(
        self, store: LedgerStore, observers: Sequence[Callable[[UsageRecord], None]] = ()
    ) -> None:
        self._store = store
        self._observers = list(observers)
        self._send, self._receive = trio.open_memory_channel[UsageRecord](math.inf)
        self.written = 0
        self.queued = 0
        #: Whether the writer is behind now (logged when it changes), and since when (monotonic)
        #: the write in progress has been going on.
        self.behind = False
        self._writing_since: float | None = None
        #: Records dropped because :data:`MAX_WAITING` were waiting already.
        self.dropped = 0
        #: Whether the database cannot be reached now (the batch in hand is being retried).
        self.unavailable = False
        self._closed_at: float | None = None

    def record(self, record: UsageRecord) -> None:
        """Price, count and queue one record; never raises, never checkpoints."""
        for observe in self._observers:
            try:
                observe(record)
            except Exception:  # a bug in pricing or metrics must not lose the record
                log.exception("observer %r failed on %s", observe, record.request_id)
        if self.queued >= MAX_WAITING:
            self.dropped += 1
            log.error(
                "lost usage record (%d records already wait for the database, the most kept "
                "in memory): %r", self.queued, record.row(),
            )
            return
        self.queued += 1
        self._send.send_nowait(record)
        if not self.behind:
            since = self._writing_since
            if self.queued >= BEHIND_RECORDS or (
                since is not None and time.monotonic() - since >= BEHIND_S
            ):
                self.behind = True
                event(
                    "usage_writer_behind",
                    "the usage writer is falling behind: %d records waiting, the database has "
                    "taken %.1fs for the write in progress (slow or locked disk?); nothing is "
                    "lost, balances in memory are current",
                    self.queued, 0.0 if since is None else time.monotonic() - since,
                    queued=self.queued,
                )

    def close(self) -> None:
        """Stop accepting records; :meth:`run` returns once the queue is written."""
        self._closed_at = time.monotonic()
        self._send.close()

    async def run(self) -> None:
        async with self._receive:
            while True:
                try:
                    first = await self._receive.receive()
                except trio.EndOfChannel:
                    return
                batch = [first]
                with trio.move_on_after(BATCH_WINDOW_S):
                    while len(batch) < BATCH_SIZE:
                        try:
                            # What is queued already is taken without a checkpoint: under load
                            # each checkpoint waits a whole scheduling round (milliseconds),
                            # so awaiting every record capped a batch at ~10 records per
                            # window, slower than they arrived: the backlog grew without bound.
                            batch.append(self._receive.receive_nowait())
                            continue
                        except trio.WouldBlock:
                            pass
                        except trio.EndOfChannel:
                            break
                        try:
                            batch.append(await self._receive.receive())
                        except trio.EndOfChannel:
                            break
                await self._write(batch)

    async def _write(self, batch: list[UsageRecord]) -> None:
        rows = [record.row() for record in batch]
        self._writing_since = time.monotonic()
        try:
            await self._write_rows(rows)
        finally:
            self._writing_since = None
        if self.behind and self.queued <= BEHIND_RECORDS // 10:
            self.behind = False
            event(
                "usage_writer_caught_up",
                "the usage writer has caught up (%d records waiting)", self.queued,
                queued=self.queued,
            )

    async def _write_rows(self, rows: list[dict]) -> None:
        # Shielded: a shutdown that cancels the writer mid-batch must not lose the batch.
        with trio.CancelScope(shield=True):
            delay = RETRY_FIRST_S
            while True:
                try:
                    written = await trio.to_thread.run_sync(self._write_batch, rows)
                    break
                except StoreUnavailable as error:
                    closed = self._closed_at
                    if closed is not None and time.monotonic() - closed >= SHUTDOWN_RETRY_S:
                        for row in rows:
                            log.error("lost usage record (%s): %r", error, row)
                        written = 0
                        break
                    if not self.unavailable:
                        self.unavailable = True
                        event(
                            "usage_writer_database_unavailable",
                            "the usage writer cannot reach the database (%s); %d records wait "
                            "in memory and are retried, nothing is lost",
                            error, self.queued, queued=self.queued,
                        )
                    await trio.sleep(delay)
                    delay = min(2 * delay, RETRY_MAX_S)
            if self.unavailable:
                self.unavailable = False
                event(
                    "usage_writer_database_back",
                    "the usage writer reaches the database again (%d records waiting)",
                    self.queued, queued=self.queued,
                )
        self.written += written
        self.queued -= len(rows)  # handled, written or (logged) not: flushed() must not wait

    def _write_batch(self, rows: list[dict]) -> int:
        """Write ``rows`` as one transaction, else one by one (in the writer's thread);
        :class:`StoreUnavailable` when the database cannot be reached (nothing is lost: the
        caller retries the whole batch)."""
        try:
            return self._store.insert_usage(rows)
        except StoreUnavailable:
            raise
        except Exception as error:
            # The batch is one transaction, so one row the database cannot take (a lone
            # surrogate, a 70-bit integer) fails every key's rows with it: write them one by one.
            log.warning(
                "could not write %d usage records as one batch (%s: %s); writing them "
                "one by one", len(rows), type(error).__name__, error,
            )
            return self._write_each(rows)

    def _write_each(self, rows: list[dict]) -> int:
        """Write ``rows`` one transaction each (in the writer's thread); a row that fails is
        written again with :func:`storable_usage_row`'s replacements, and logged once. Returns
        how many were written: fewer only if the database itself fails (disk, lock), and then
        each lost row is in the log, whole."""
        written = 0
        for row in rows:
            try:
                written += self._store.insert_usage([row])
                continue
            except StoreUnavailable:
                raise
            except Exception:
                pass
            fixed, changed = storable_usage_row(row)
            try:
                written += self._store.insert_usage([fixed])
            except StoreUnavailable:
                raise
            except Exception as error:
                log.error("lost usage record (%s: %s): %r", type(error).__name__, error, row)
                continue
            log.warning(
                "usage record %s stored with %s replaced (the database could not store them "
                "as they were)", fixed["request_id"], ", ".join(changed) or "nothing",
            )
        return written

    async def flushed(self) -> None:
        """Wait until every record handed over so far is in the database (for tests and CLI)."""
        while self.queued:
            await trio.sleep(0.005)
