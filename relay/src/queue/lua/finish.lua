-- KEYS: message hash, due set, leased set, ids set, stats hash
-- ARGV: id, token, status JSON, attempts, next attempt ms ('' when final), retention ms,
--       then delivered, bounced, expired recipient counts (added to the totals when final)
-- Returns 0 lease lost, 1 rescheduled, 2 final.
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[2] or not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  return 0
end
local old = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local new = tonumber(ARGV[4])
-- Leased, or swept back to due after expiry (still ours: nobody took it since).
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[1], 'lease')
if ARGV[5] ~= '' then
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
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[1], 'body', 'attempts')
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'final', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('HINCRBY', KEYS[5], 'delivered', ARGV[7])
redis.call('HINCRBY', KEYS[5], 'bounced', ARGV[8])
redis.call('HINCRBY', KEYS[5], 'expired', ARGV[9])
redis.call('HINCRBY', KEYS[5], 'messages', -1)
redis.call('HINCRBY', KEYS[5], 'bytes', -len)
if old > 0 then
  redis.call('HINCRBY', KEYS[5], 'deferred', -1)
end
return 2
