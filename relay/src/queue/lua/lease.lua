-- KEYS: per shard to visit, in order: due set, leased set, lease hash, later set
-- ARGV: now, lease expiry, max, token, sweep limit
-- Returns id and due score pairs of the messages leased, shard after shard; the
-- caller reads their stored values and statuses itself (a plain MGET: a value
-- passed through Lua is copied and hashed byte by byte, which at 100 KB was most
-- of what a lease cost Redis). A value gone by then (removed meanwhile, or a
-- schedule entry without its message) is not delivered: see lease_drop.lua.
-- Visits shards until it has `max` messages, so one call serves every shard of
-- a single server (a call per shard cost a round trip each).
-- Expired leases of a shard visited first go back to due at their expiry (which
-- is <= now), so a dead worker's messages are among those taken now; their
-- tokens stay, so a late finish of a lease nobody took since still counts.
local now, expires, token, sweep = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
local left = tonumber(ARGV[3])
-- One variadic write per index for a shard's batch, in chunks that stay below
-- Lua's limit on unpacked values.
local function each_chunk(list, step, f)
  for i = 1, #list, step do
    f(unpack(list, i, math.min(i + step - 1, #list)))
  end
end
local out = {}
for k = 1, #KEYS, 4 do
  if left <= 0 then break end
  local due, leased, lease, later = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'WITHSCORES', 'LIMIT', 0, sweep)
  for i = 1, #expired, 2 do
    redis.call('ZREM', leased, expired[i])
    redis.call('ZADD', due, expired[i + 1], expired[i])
    -- Due no longer at its arrival: `later` keeps it findable for the oldest age.
    redis.call('ZADD', later, 0, expired[i])
  end
  local got = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'WITHSCORES', 'LIMIT', 0, left)
  if #got > 0 then
    local taken, scored, tokens = {}, {}, {}
    for i = 1, #got, 2 do
      local id = got[i]
      taken[#taken + 1] = id
      scored[#scored + 1] = expires
      scored[#scored + 1] = id
      tokens[#tokens + 1] = id
      tokens[#tokens + 1] = token
      out[#out + 1] = id
      out[#out + 1] = got[i + 1]
    end
    each_chunk(taken, 1000, function(...) redis.call('ZREM', due, ...) end)
    each_chunk(scored, 1000, function(...) redis.call('ZADD', leased, ...) end)
    each_chunk(tokens, 1000, function(...) redis.call('HSET', lease, ...) end)
    left = left - #taken
  end
end
return out
