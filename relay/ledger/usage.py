"""Usage records and the one task that writes them.

Every relayed request leaves exactly one :class:`UsageRecord`. Handlers hand it to
:meth:`UsageWriter.record`, which never blocks and never checkpoints, so it is safe to call in a
``finally`` block of a cancelled request; the writer task batches records into SQLite off the
request's path.

:meth:`UsageWriter.record` first shows the record to its observers, in order: the credit ledger
prices it and debits the key in memory (``relay/ledger/credits.py``), the metrics count it. The
batch the writer then commits carries each record's ``cost_nano``, and the store debits the keys
in the same transaction that inserts the rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from .store import Store

log = logging.getLogger("relay.ledger")

#: Records written per SQLite transaction at most, and how long a record may wait for company.
BATCH_SIZE = 500
BATCH_WINDOW_S = 0.05


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
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
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
        self, store: Store, observers: Sequence[Callable[[UsageRecord], None]] = ()
    ) -> None:
        self._store = store
        self._observers = list(observers)
        self._send, self._receive = trio.open_memory_channel[UsageRecord](math.inf)
        self.written = 0
        self.queued = 0

    def record(self, record: UsageRecord) -> None:
        """Price, count and queue one record; never raises, never checkpoints."""
        for observe in self._observers:
            try:
                observe(record)
            except Exception:  # a bug in pricing or metrics must not lose the record
                log.exception("observer %r failed on %s", observe, record.request_id)
        self.queued += 1
        self._send.send_nowait(record)

    def close(self) -> None:
        """Stop accepting records; :meth:`run` returns once the queue is written."""
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
        # Shielded: a shutdown that cancels the writer mid-batch must not lose the batch.
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self._store.insert_usage, rows)
            except Exception:
                log.exception("could not write %d usage records", len(rows))
                return
        self.written += len(rows)
        self.queued -= len(rows)

    async def flushed(self) -> None:
        """Wait until every record handed over so far is in the database (for tests and CLI)."""
        while self.queued:
            await trio.sleep(0.005)
