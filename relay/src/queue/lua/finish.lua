-- KEYS: message hash, due set, leased set, ids set, stats hash
-- ARGV: id, token, status JSON, attempts, next attempt ms ('' when final), retention ms,
--       then delivered, bounced, expired recipient counts (added to the totals when final)
-- Returns 0 lease lost, 1 rescheduled, 2 final.
local m = redis.call('HMGET', KEYS[1], 'lease', 'attempts')
if m[1] ~= ARGV[2] or not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  return 0
end
local old = tonumber(m[2] or '0')
local new = tonumber(ARGV[4])
-- Leased, or swept back to due after expiry (still ours: nobody took it since).
local was_leased = redis.call('ZREM', KEYS[3], ARGV[1]) == 1
if ARGV[5] ~= '' then
  redis.call('HDEL', KEYS[1], 'lease')
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
  redis.call('HSET', KEYS[1], 'status', ARGV[3], 'attempts', ARGV[4])
  if old == 0 and new > 0 then
    redis.call('HINCRBY', KEYS[5], 'deferred', 1)
  elseif old > 0 and new == 0 then
    redis.call('HINCRBY', KEYS[5], 'deferred', -1)
  end
  return 1
end
local len = redis.call('HSTRLEN', KEYS[1], 'body')
if not was_leased then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[1], 'lease', 'body', 'attempts')
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'final', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
-- Counts of 0 (most messages have only one of the three) change nothing.
if ARGV[7] ~= '0' then redis.call('HINCRBY', KEYS[5], 'delivered', ARGV[7]) end
if ARGV[8] ~= '0' then redis.call('HINCRBY', KEYS[5], 'bounced', ARGV[8]) end
if ARGV[9] ~= '0' then redis.call('HINCRBY', KEYS[5], 'expired', ARGV[9]) end
redis.call('HINCRBY', KEYS[5], 'messages', -1)
redis.call('HINCRBY', KEYS[5], 'bytes', -len)
if old > 0 then
  redis.call('HINCRBY', KEYS[5], 'deferred', -1)
end
return 2
