-- KEYS: due set, leased set, lease hash, later set
-- ARGV: now, lease expiry, max, token, message key prefix, sweep limit, status
--       key prefix
-- Returns id, due score, stored value, status (nil if none) per leased message.
-- Expired leases first go back to due at their expiry (which is <= now), so a dead
-- worker's messages are among those taken now; their tokens stay, so a late
-- finish of a lease nobody took since still counts.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[6])
for i = 1, #expired, 2 do
  redis.call('ZREM', KEYS[2], expired[i])
  redis.call('ZADD', KEYS[1], expired[i + 1], expired[i])
  -- Due no longer at its arrival: `later` keeps it findable for the oldest age.
  redis.call('ZADD', KEYS[4], 0, expired[i])
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[3])
if #due == 0 then return {} end
local out, taken, leased, tokens = {}, {}, {}, {}
for i = 1, #due, 2 do
  local id = due[i]
  table.insert(taken, id)
  -- One read for the message and its status (absent until a first retry).
  local m = redis.call('MGET', ARGV[5] .. id, ARGV[7] .. id)
  -- A schedule entry without its message is debris; dropping it is all we can do.
  if m[1] then
    table.insert(leased, ARGV[2])
    table.insert(leased, id)
    table.insert(tokens, id)
    table.insert(tokens, ARGV[4])
    table.insert(out, id)
    table.insert(out, due[i + 1])
    table.insert(out, m[1])
    table.insert(out, m[2])
  end
end
-- One variadic write per index for the whole batch, in chunks that stay below
-- Lua's limit on unpacked values.
local function each_chunk(list, step, f)
  for i = 1, #list, step do
    f(unpack(list, i, math.min(i + step - 1, #list)))
  end
end
each_chunk(taken, 1000, function(...) redis.call('ZREM', KEYS[1], ...) end)
each_chunk(leased, 1000, function(...) redis.call('ZADD', KEYS[2], ...) end)
each_chunk(tokens, 1000, function(...) redis.call('HSET', KEYS[3], ...) end)
return out
