-- KEYS: due set, leased set
-- ARGV: now, lease expiry, max, token, message key prefix, sweep limit
-- Returns id, due score, envelope, body, status (nil if none) per leased message.
-- Expired leases first go back to due at their expiry (which is <= now), so a dead
-- worker's messages are among those taken now.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[6])
for i = 1, #expired, 2 do
  redis.call('ZREM', KEYS[2], expired[i])
  redis.call('ZADD', KEYS[1], expired[i + 1], expired[i])
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[3])
local out = {}
for i = 1, #due, 2 do
  local id = due[i]
  local key = ARGV[5] .. id
  redis.call('ZREM', KEYS[1], id)
  local m = redis.call('HMGET', key, 'envelope', 'body', 'status')
  -- A schedule entry without its message is debris; dropping it is all we can do.
  if m[1] and m[2] then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    redis.call('HSET', key, 'lease', ARGV[4])
    table.insert(out, id)
    table.insert(out, due[i + 1])
    table.insert(out, m[1])
    table.insert(out, m[2])
    table.insert(out, m[3])
  end
end
return out
