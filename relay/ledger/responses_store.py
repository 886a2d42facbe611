"""The Responses answers the relay keeps, per key (see :mod:`relay.protocol.state` for what
they are for): in this process's memory and, when ``server.redis_url`` is set, in Redis, so
that every process of the relay finds what any of them answered.

Guarantees:

* A key reads only its own answers: every lookup is by (key id, response or item id), in
  memory and in Redis; there is no lookup by id alone.
* Bounded per key in count and age (``server.responses_store_max``,
  ``server.responses_store_ttl_s``): past the count the oldest answer goes first; an answer
  older than the age is not found (memory: dropped when seen or when its key stores again, and
  by a sweep every :attr:`ResponsesStore.SWEEP_EVERY` stores; Redis: each value expires). An
  item stays findable for as long as the newest kept answer of its conversation that holds it.
* With Redis, Redis decides what is found whenever it answers (an answer another process kept,
  or deleted, is seen at once); when it does not (``SharedGuards`` degraded, no call waits
  longer than its call timeout), this process's own memory answers instead, so a conversation
  that stays on one process goes on through a Redis outage.
* Nothing here blocks without a bound: memory calls are synchronous, each Redis call is one
  round trip (the store is one Lua script) within the shared client's timeout.

Redis keys (with the shared prefix, ``relay:``): ``rs:{key}:r:{response id}`` the record's JSON,
``rs:{key}:i:{item id}`` ``[translated, item]`` for each item with an id, ``rs:{key}:order`` a
sorted set of the key's response ids by time stored (for the count bound). Every one has the
age bound as its TTL, renewed when the conversation stores again.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..protocol.state import Found, StoredItem, StoredResponse

if TYPE_CHECKING:
    from ..guards.shared import SharedGuards

#: Keep one answer: ARGV = prefix, key id, response id, record JSON, TTL ms, max count, then
#: (item id, item JSON) pairs. Trims the key's answers to the max count, oldest first.
LUA_PUT = r"""
local base = ARGV[1] .. 'rs:' .. ARGV[2] .. ':'
local id, ttl, max = ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', base .. 'r:' .. id, ARGV[4], 'PX', ttl)
for i = 7, #ARGV, 2 do
  redis.call('SET', base .. 'i:' .. ARGV[i], ARGV[i + 1], 'PX', ttl)
end
local order = base .. 'order'
redis.call('ZADD', order, now, id)
redis.call('ZREMRANGEBYSCORE', order, '-inf', now - ttl)
local excess = redis.call('ZCARD', order) - max
if excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', order, 0, excess - 1)) do
    redis.call('DEL', base .. 'r:' .. old)
  end
  redis.call('ZREMRANGEBYRANK', order, 0, excess - 1)
end
redis.call('PEXPIRE', order, ttl)
return 1
"""

#: Forget one answer: ARGV = prefix, key id, response id. Returns 1 if it was kept.
LUA_DELETE = r"""
local base = ARGV[1] .. 'rs:' .. ARGV[2] .. ':'
redis.call('ZREM', base .. 'order', ARGV[3])
return redis.call('DEL', base .. 'r:' .. ARGV[3])
"""


@dataclass
class _KeyAnswers:
    """One key's answers in memory, oldest first, and where each item id is found."""

    records: OrderedDict[str, tuple[StoredResponse, float]] = field(default_factory=OrderedDict)
    items: dict[str, str] = field(default_factory=dict)  # item id → newest record holding it


class ResponsesStore:
    """One key's kept Responses answers, by id (see the module docstring)."""

    #: Every this many stores, expired answers of every key are dropped from memory.
    SWEEP_EVERY = 1000

    def __init__(
        self,
        *,
        max_per_key: int,
        ttl_s: float,
        shared: SharedGuards | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_per_key = max_per_key
        self.ttl_s = ttl_s
        self.shared = shared
        self._clock = clock
        self._keys: dict[str, _KeyAnswers] = {}
        self._stores = 0
        self._scripts: dict[str, object] = {}
        self._scripts_client: object = None

    def __len__(self) -> int:
        """Answers held in this process's memory (expired ones not yet dropped included)."""
        return sum(len(answers.records) for answers in self._keys.values())

    # -- keeping ---------------------------------------------------------------------------

    async def put(self, key_id: str, record: StoredResponse) -> None:
        """Keep ``record`` for ``key_id`` (replacing one with the same id)."""
        self._put_local(key_id, record)
        if self.shared is None:
            return
        args: list[str] = [
            self.shared.prefix, key_id, record.id, record.to_json(),
            str(max(1, int(self.ttl_s * 1000))), str(self.max_per_key),
        ]
        for item_id, item in record.items().items():
            args += [item_id, json.dumps([record.translated, item], separators=(",", ":"))]
        await self._script("put", LUA_PUT, args)

    def _put_local(self, key_id: str, record: StoredResponse) -> None:
        now = self._clock()
        answers = self._keys.setdefault(key_id, _KeyAnswers())
        self._drop(answers, record.id)
        answers.records[record.id] = (record, now)
        for item_id in record.items():
            answers.items[item_id] = record.id
        self._expire(answers, now)
        while len(answers.records) > self.max_per_key:
            self._drop(answers, next(iter(answers.records)))
        self._stores += 1
        if self._stores % self.SWEEP_EVERY == 0:
            self.sweep()

    def sweep(self) -> None:
        """Drop every key's expired answers from memory (and keys left with none)."""
        now = self._clock()
        for key_id in list(self._keys):
            answers = self._keys[key_id]
            self._expire(answers, now)
            if not answers.records:
                del self._keys[key_id]

    def _expire(self, answers: _KeyAnswers, now: float) -> None:
        while answers.records:
            first, (_, stored_at) = next(iter(answers.records.items()))
            if now - stored_at <= self.ttl_s:
                break
            self._drop(answers, first)

    @staticmethod
    def _drop(answers: _KeyAnswers, response_id: str) -> bool:
        entry = answers.records.pop(response_id, None)
        if entry is None:
            return False
        for item_id in entry[0].items():
            if answers.items.get(item_id) == response_id:
                del answers.items[item_id]
        return True

    # -- finding ---------------------------------------------------------------------------

    async def find(
        self, key_id: str, previous_id: str | None = None, item_ids: list[str] | None = None
    ) -> Found:
        """What ``key_id`` has kept of a response and of items, by their ids."""
        item_ids = item_ids or []
        if self.shared is not None:
            found = await self._find_shared(key_id, previous_id, item_ids)
            if found is not None:
                return found
        return self._find_local(key_id, previous_id, item_ids)

    def _find_local(self, key_id: str, previous_id: str | None, item_ids: list[str]) -> Found:
        answers = self._keys.get(key_id)
        if answers is None:
            return Found(items={})
        now = self._clock()
        self._expire(answers, now)
        previous = None
        if previous_id is not None and previous_id in answers.records:
            previous = answers.records[previous_id][0]
        items: dict[str, StoredItem] = {}
        for item_id in item_ids:
            holder = answers.items.get(item_id)
            if holder is not None:
                record = answers.records[holder][0]
                items[item_id] = StoredItem(record.items()[item_id], record.translated)
        return Found(previous=previous, items=items)

    async def _find_shared(
        self, key_id: str, previous_id: str | None, item_ids: list[str]
    ) -> Found | None:
        assert self.shared is not None
        base = f"{self.shared.prefix}rs:{key_id}:"
        names = [f"{base}r:{previous_id}"] if previous_id is not None else []
        names += [f"{base}i:{item_id}" for item_id in item_ids]
        if not names:
            return Found(items={})
        values = await self.shared.command(lambda client: client.mget(names))
        if values is None:
            return None  # Redis unreachable: this process's memory answers
        values = list(values)
        previous = None
        if previous_id is not None:
            text = values.pop(0)
            previous = StoredResponse.from_json(text) if text is not None else None
        items: dict[str, StoredItem] = {}
        for item_id, text in zip(item_ids, values, strict=True):
            item = _item_from_json(text) if text is not None else None
            if item is not None:
                items[item_id] = item
        return Found(previous=previous, items=items)

    async def get(self, key_id: str, response_id: str) -> StoredResponse | None:
        """The answer ``key_id`` kept under ``response_id``, or None."""
        return (await self.find(key_id, response_id)).previous

    async def delete(self, key_id: str, response_id: str) -> bool:
        """Forget an answer; whether there was one to forget."""
        answers = self._keys.get(key_id)
        local = answers is not None and self._drop(answers, response_id)
        if self.shared is None:
            return local
        deleted = await self._script("delete", LUA_DELETE, [
            self.shared.prefix, key_id, response_id,
        ])
        return local if deleted is None else bool(deleted)

    async def _script(self, name: str, source: str, args: list[str]):
        assert self.shared is not None
        scripts = self._scripts

        def call(client):
            if self._scripts_client is not client:  # registered once per client
                scripts.clear()
                self._scripts_client = client
            if name not in scripts:
                scripts[name] = client.register_script(source)
            return scripts[name](args=args)

        return await self.shared.command(call)


def _item_from_json(text: str) -> StoredItem | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[1], dict)
    ):
        return StoredItem(value[1], value[0] is True)
    return None
