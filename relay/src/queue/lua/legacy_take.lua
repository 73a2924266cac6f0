-- Upgrade from the layout before 2026-12 (hash per message, `{<prefix>:sNN}`
-- shards): takes up to `max` queued messages of one old shard for moving to the
-- new layout, due or not, leasing them with `token` so that no relay of the old
-- version delivers them meanwhile, and sweeping expired leases back to due first
-- (their holders are gone, maybe with the old version).
-- KEYS: old due set, old leased set
-- ARGV: now, lease expiry, max, token, old message key prefix, sweep limit
-- Returns id, due score, envelope, body, status, attempts per message taken.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[6])
for i = 1, #expired, 2 do
  redis.call('ZREM', KEYS[2], expired[i])
  redis.call('ZADD', KEYS[1], expired[i + 1], expired[i])
end
local due = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #due, 2 do
  local id = due[i]
  local key = ARGV[5] .. id
  redis.call('ZREM', KEYS[1], id)
  local m = redis.call('HMGET', key, 'envelope', 'body', 'status', 'attempts')
  -- A schedule entry without its message is debris; dropping it is all we can do.
  if m[1] and m[2] then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    redis.call('HSET', key, 'lease', ARGV[4])
    table.insert(out, id)
    table.insert(out, due[i + 1])
    table.insert(out, m[1])
    table.insert(out, m[2])
    table.insert(out, m[3])
    table.insert(out, m[4] or '0')
  end
end
return out
