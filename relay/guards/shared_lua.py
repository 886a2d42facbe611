"""The Lua scripts of the shared guard state (:mod:`.shared`): each one atomic in Redis and one
round trip, loaded once and called by SHA. What each takes and returns is said above it; the
keys they use are described in :mod:`.shared`."""

# The scripts share these helpers (prepended to each). ``now`` is Redis's clock, in seconds.
LUA_COMMON = r"""
local prefix, owner = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local alive = {}
local function live(o)
  local v = alive[o]
  if v == nil then
    v = redis.call('EXISTS', prefix .. 'hb:' .. o) == 1
    alive[o] = v
  end
  return v
end
-- A subject's live leases: how many and what they hold; dead owners' leases are removed.
local function leases(name)
  local key = prefix .. 'l:' .. name
  local items = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local count, held = 0, 0
  for i = 1, #items, 2 do
    local o = string.match(items[i], '^([^|]+)|')
    if o and live(o) then
      count = count + 1
      held = held + tonumber(items[i + 1])
    else
      redis.call('ZREM', key, items[i])
    end
  end
  return count, held
end
-- A bucket ({rate per second, capacity}) at ``now``.
local function level(name, kind, b)
  local v = redis.call('HMGET', prefix .. 'b:' .. name .. ':' .. kind, 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil then return b[2] end
  return math.min(b[2], lvl + math.max(0, now - ts) * b[1])
end
-- Someone waits for shared capacity: every refused acquire says so, for 2 s (a waiter
-- retries at least every RETRY_FLOOR_S, 250 ms, so the mark lasts while anyone waits).
local function want()
  redis.call('SET', prefix .. 'wanted', '1', 'PX', 2000)
end
-- Capacity was freed: wake the waiters of every process, if anyone waits (an uncontended
-- release publishes nothing: no message for every process to read per request).
local function notify()
  if redis.call('EXISTS', prefix .. 'wanted') == 1 then
    redis.call('PUBLISH', prefix .. 'freed', owner)
  end
end
-- Take ``amount`` from a bucket (negative: give back, never above its capacity).
local function take(name, kind, b, amount)
  local key = prefix .. 'b:' .. name .. ':' .. kind
  local lvl = math.min(b[2], level(name, kind, b) - amount)
  if lvl >= b[2] then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'level', lvl, 'ts', now)
  redis.call('PEXPIRE', key, math.ceil((b[2] - lvl) / b[1] * 1000) + 1000)
end
"""

# The settlements (a function of LUA_ACQUIRE and LUA_SETTLE; its items are described above
# LUA_SETTLE).
LUA_SETTLE_FN = r"""
-- Apply a list of settlements, in the order they were made (see LUA_SETTLE); publishes on
-- {prefix}freed when a lease was removed. Returns how many leases were removed.
local function settle(list)
  local removed = 0
  for _, item in ipairs(list) do
    if item.credit then
      if item.cost ~= 0 then
        local used_key = prefix .. 'cu:' .. item.credit
        redis.call('SET', used_key, item.seed, 'NX')
        redis.call('INCRBY', used_key, item.cost)
      end
      redis.call('ZREM', prefix .. 'l:c:' .. item.credit, owner .. '|' .. item.request)
    end
    if item.session then
      redis.call('SET', prefix .. 's:' .. item.session, item.account, 'PX', item.ttl_ms)
    end
    if item.health then
      local field = item.health
      if item.reset then
        redis.call('HDEL', prefix .. 'health', field)
      else
        local old = redis.call('HGET', prefix .. 'health', field)
        local until_s, disabled = item['until'], item.disabled
        if old then
          local o = cjson.decode(old)
          until_s = math.max(until_s, o['until'])
          disabled = disabled or o.disabled
        end
        redis.call('HSET', prefix .. 'health', field,
                   cjson.encode({['until'] = until_s, disabled = disabled}))
      end
    end
    if item.unwait then
      redis.call('ZREM', prefix .. 'w:' .. item.unwait, owner .. '|' .. item.flow)
      notify()
    end
    local member = owner .. '|' .. (item.lease or '')
    if item.fair and item.tokens ~= 0 then
      redis.call('ZINCRBY', prefix .. 'vc:' .. item.fair.pool, item.tokens / item.fair.weight,
                 item.fair.flow)
    end
    for _, s in ipairs(item.subjects or {}) do
      local key = prefix .. 'l:' .. s.name
      if redis.call('ZSCORE', key, member) then
        if item.tokens ~= 0 then
          if s.tpm then take(s.name, 'tpm', s.tpm, item.tokens) end
          if s.tps then take(s.name, 'tps', s.tps, item.tokens) end
        end
        if item.done then
          redis.call('ZREM', key, member)
          removed = removed + 1
        elseif item.released ~= 0 then
          redis.call('ZINCRBY', key, -item.released, member)
        end
      end
    end
  end
  if removed > 0 then notify() end
  return removed
end
"""

# ARGV: prefix, owner, lease id, JSON {subjects: [{name, cap, tpm, tps, rpm}], charged, held,
# fair: {pool, flow, weight, contended, last} or absent}, JSON list of settlements (as
# LUA_SETTLE's, applied first: the releases this process made since its last call, so that its
# own finished requests do not count against the one it admits now). Subjects 1 and 2 are the
# global and the pool layer (the capacity flows of a pool compete for).
#
# The shared fair order (``fair``): {prefix}vc:{pool} holds every flow's virtual counter (tokens
# served / weight), {prefix}w:{pool} the flows waiting for the pool's capacity, as owner|flow.
# A flow whose counter is above the lowest counter of a flow waiting elsewhere (a live owner)
# defers to it; a flow back from idle (``fresh``) is first lifted to that lowest counter (idle
# time banks no credit). A flow that fails on the global or pool layer, or defers, is
# registered as waiting; on success (``last``: no other request of the flow waits to contend
# on this process) or on failure at its own key or account layer, it is no longer.
#
# Returns {1} when every subject took the lease, else {0, subject index (1-based; 0: deferred
# to a flow with a smaller counter), wait ms} where wait ms is -1 when only a release can help.
LUA_ACQUIRE = LUA_COMMON + LUA_SETTLE_FN + r"""
if ARGV[5] and ARGV[5] ~= '[]' then settle(cjson.decode(ARGV[5])) end
local member = owner .. '|' .. ARGV[3]
local spec = cjson.decode(ARGV[4])
local amount = spec.charged + spec.held
local fair = spec.fair
if spec.force then fair = nil end  -- a request admitted while Redis was lost: count it
local vkey, wkey, me, mine
local waiting = false
if fair then
  vkey = prefix .. 'vc:' .. fair.pool
  wkey = prefix .. 'w:' .. fair.pool
  me = owner .. '|' .. fair.flow
  mine = tonumber(redis.call('ZSCORE', vkey, fair.flow) or '0')
  local lowest = nil
  local others = redis.call('ZRANGE', wkey, 0, -1)
  for _, m in ipairs(others) do
    local o, f = string.match(m, '^([^|]+)|(.*)$')
    if not (o and live(o)) then
      redis.call('ZREM', wkey, m)
    elseif f == fair.flow then
      waiting = true
    else
      local c = tonumber(redis.call('ZSCORE', vkey, f) or '0')
      if lowest == nil or c < lowest then lowest = c end
    end
  end
  if lowest ~= nil then
    if not waiting and fair.fresh and mine < lowest then
      mine = lowest
      redis.call('ZADD', vkey, mine, fair.flow)
    end
    if mine > lowest then
      redis.call('ZADD', wkey, 0, me)
      want()
      return {0, 0, -1}
    end
  elseif redis.call('ZCARD', vkey) > 2000 then
    redis.call('DEL', vkey)  -- nobody waits: the counters order nothing until someone does
  end
end
local function refused(i, wait)
  want()
  if fair then
    if i <= 2 then redis.call('ZADD', wkey, 0, me) else redis.call('ZREM', wkey, me) end
  end
  return {0, i, wait}
end
for i, s in ipairs(spec.force and {} or spec.subjects) do
  local count, held = 0, 0
  if s.cap or s.tpm then count, held = leases(s.name) end  -- (only a cap or a TPM counts them)
  if s.cap and count >= s.cap then return refused(i, -1) end
  if s.tpm then
    local need = math.min(amount, s.tpm[2]) + held
    local lvl = level(s.name, 'tpm', s.tpm)
    if need > lvl then
      if need > s.tpm[2] then return refused(i, -1) end
      return refused(i, math.ceil((need - lvl) / s.tpm[1] * 1000))
    end
  end
  if s.tps then
    local need = math.min(amount, s.tps[2])
    local lvl = level(s.name, 'tps', s.tps)
    if need > lvl then return refused(i, math.ceil((need - lvl) / s.tps[1] * 1000)) end
  end
  if s.rpm then
    local lvl = level(s.name, 'rpm', s.rpm)
    if lvl < 1 then return refused(i, math.ceil((1 - lvl) / s.rpm[1] * 1000)) end
  end
end
for _, s in ipairs(spec.subjects) do
  local key = prefix .. 'l:' .. s.name
  redis.call('ZADD', key, spec.held, member)
  redis.call('PEXPIRE', key, 86400000)
  if s.tpm then take(s.name, 'tpm', s.tpm, spec.charged) end
  if s.tps then take(s.name, 'tps', s.tps, spec.charged) end
  if s.rpm and not spec.force then take(s.name, 'rpm', s.rpm, 1) end
end
if fair then
  redis.call('ZINCRBY', vkey, spec.charged / fair.weight, fair.flow)
  if fair.last then redis.call('ZREM', wkey, me) end
  -- Flows that deferred to this one may go now, if capacity is left.
  if waiting then redis.call('PUBLISH', prefix .. 'freed', owner) end
end
return {1}
"""

# ARGV: prefix, owner, request id, key id, granted, seed, estimate (nanocredits). A key's
# credits used are {prefix}cu:{key} (set from ``seed``, the database's figure, when missing);
# its holds are leases of subject c:{key} whose score is the amount held. Holds the estimate if
# granted - used - held covers it. Returns {1 or 0, used, held}.
LUA_CREDIT_HOLD = LUA_COMMON + r"""
local used_key = prefix .. 'cu:' .. ARGV[4]
redis.call('SET', used_key, ARGV[6], 'NX')
local used = tonumber(redis.call('GET', used_key))
local _, held = leases('c:' .. ARGV[4])
local estimate = tonumber(ARGV[7])
if tonumber(ARGV[5]) - used - held < estimate then return {0, tostring(used), tostring(held)} end
redis.call('ZADD', prefix .. 'l:c:' .. ARGV[4], estimate, owner .. '|' .. ARGV[3])
return {1, tostring(used), tostring(held)}
"""

# ARGV: prefix, owner, JSON list of settlements, in the order they were made:
# * a lease's {lease, subjects: [{name, tpm, tps}], tokens, released, done}: charges ``tokens``
#   (negative: gives back) to the buckets of the subjects that still hold the lease, takes
#   ``released`` off what the lease holds, and removes the lease when ``done``;
# * a credit charge {credit: key id, request, cost, seed}: adds ``cost`` to the key's credits
#   used (set from ``seed`` if missing) and ends the request's hold, if any.
# Publishes on {prefix}freed when a lease was removed and someone waits. Returns how many
# leases were removed.
LUA_SETTLE = LUA_COMMON + LUA_SETTLE_FN + r"""
return settle(cjson.decode(ARGV[3]))
"""

# ARGV: prefix, owner, JSON [subject names]. Live leases per subject, and live processes.
LUA_STATUS = LUA_COMMON + r"""
local result = {}
for _, name in ipairs(cjson.decode(ARGV[3])) do
  local count = leases(name)
  table.insert(result, count)
end
local procs = redis.call('ZRANGE', prefix .. 'procs', 0, -1)
local live_procs = {}
for _, o in ipairs(procs) do
  if live(o) then
    table.insert(live_procs, o)
  else
    redis.call('ZREM', prefix .. 'procs', o)
    redis.call('HDEL', prefix .. 'queued', o)
  end
end
return {result, live_procs}
"""
