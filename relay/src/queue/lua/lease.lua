-- KEYS: per shard to visit, in order: due set, leased set, lease hash, later set,
--       fresh list
-- ARGV: now, lease expiry, max, token, sweep limit (0: no sweep), fresh cutoff (the greatest
--       id made by now, plus a clock skew allowance: redis.rs, FRESH_SKEW_MS)
-- Per shard, what is due by now in `due` (retries, mail given back or swept
-- back) and the ids of `fresh` (never attempted, due at their arrival, in
-- arrival order) are taken in order of due time. An id of
-- `fresh` made after the cutoff (a relay's clock far ahead) is moved to `due`,
-- scored by its id's time, rather than taken early or left to block the list.
-- Returns id and due score pairs of the messages leased, shard after shard (the
-- score nil for an id of `fresh`: its due time is its arrival); the
-- caller reads their stored values and statuses itself (a plain MGET: a value
-- passed through Lua is copied and hashed byte by byte, which at 100 KB was most
-- of what a lease cost Redis). A value gone by then (removed meanwhile, or a
-- schedule entry without its message) is not delivered: see lease_drop.lua.
-- Visits shards until it has `max` messages, so one call serves every shard of
-- a single server (a call per shard cost a round trip each).
-- Expired leases (of every shard given, when the relay asks for a sweep) go back
-- to due at their expiry (which is <= now) first, so a dead worker's messages are
-- among those taken now; their tokens stay, so a late finish of a lease nobody
-- took since still counts.
local now, expires, token, sweep, cutoff = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6]
local CROCKFORD = '0123456789ABCDEFGHJKMNPQRSTVWXYZ'
local DIGIT = {}
for i = 1, 32 do DIGIT[string.byte(CROCKFORD, i)] = i - 1 end
-- An id's arrival in ms: its first 10 digits are the top 50 of its 100 bits.
local function arrival(id)
  local v = 0
  for _, b in ipairs({string.byte(id, 1, 10)}) do
    v = v * 32 + (DIGIT[b] or 0)
  end
  return math.floor(v / 4)
end
local left = tonumber(ARGV[3])
-- One variadic write per index for a shard's batch, in chunks that stay below
-- Lua's limit on unpacked values.
local function each_chunk(list, step, f)
  for i = 1, #list, step do
    f(unpack(list, i, math.min(i + step - 1, #list)))
  end
end
-- A sweep limit of 0: no sweep this time. The relay asks for one about once a
-- second (a command in a script costs Redis about as much as a small command
-- itself, and a sweep per shard was a third of a lease's commands); it then
-- covers every shard given, also those the take below does not reach, up to
-- the limit in all (so that a script stays short after a long outage; what is
-- left goes at the next sweep).
local budget = tonumber(sweep)
if budget > 0 then
  for k = 1, #KEYS, 5 do
    if budget <= 0 then break end
    local due, leased, later = KEYS[k], KEYS[k + 1], KEYS[k + 3]
    local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'WITHSCORES', 'LIMIT', 0, budget)
    budget = budget - #expired / 2
    for i = 1, #expired, 2 do
      redis.call('ZREM', leased, expired[i])
      redis.call('ZADD', due, expired[i + 1], expired[i])
      -- Due no longer at its arrival: `later` keeps it findable for the oldest age.
      redis.call('ZADD', later, 0, expired[i])
    end
  end
end
-- Lists are filled through counters: `#t` is a search each time (Lua 5.1),
-- several per message here.
local out, o = {}, 0
for k = 1, #KEYS, 5 do
  if left <= 0 then break end
  local due, leased, lease = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local got = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'WITHSCORES', 'LIMIT', 0, left)
  local scored, tokens, n = {}, {}, 0
  local function take(id, score)
    scored[2 * n + 1] = expires
    scored[2 * n + 2] = id
    tokens[2 * n + 1] = id
    tokens[2 * n + 2] = token
    n = n + 1
    out[o + 1] = id
    out[o + 2] = score
    o = o + 2
  end
  -- A fresh id taken (due at its arrival), or one made after the cutoff moved
  -- to `due` at its id's time.
  local function fresh_one(id)
    if id <= cutoff then
      take(id, false)
    else
      redis.call('ZADD', due, arrival(id), id)
    end
  end
  if #got == 0 then
    -- The common case, nothing but new mail: LPOP with a count answers nil
    -- (false) for an empty or missing list.
    for _, id in ipairs(redis.call('LPOP', KEYS[k + 4], left) or {}) do
      fresh_one(id)
    end
  else
    -- Both kinds due: taken in order of due time, as one sorted set would give
    -- them. Mail given back is due again at the time it was given back, so a
    -- busy destination's given-back backlog goes behind older new mail instead
    -- of coming back first at every lease and hiding it.
    local heads = redis.call('LRANGE', KEYS[k + 4], 0, left - 1)
    local i, j, from_due = 1, 1, {}
    while n < left and (i <= #got or j <= #heads) do
      if j <= #heads and (i > #got or heads[j] > cutoff or arrival(heads[j]) <= tonumber(got[i + 1])) then
        fresh_one(heads[j])
        j = j + 1
      else
        take(got[i], got[i + 1])
        from_due[#from_due + 1] = got[i]
        i = i + 2
      end
    end
    if j > 1 then redis.call('LPOP', KEYS[k + 4], j - 1) end
    if #from_due > 0 then
      each_chunk(from_due, 1000, function(...) redis.call('ZREM', due, ...) end)
    end
  end
  if n > 0 then
    each_chunk(scored, 1000, function(...) redis.call('ZADD', leased, ...) end)
    each_chunk(tokens, 1000, function(...) redis.call('HSET', lease, ...) end)
    left = left - n
  end
end
return out
