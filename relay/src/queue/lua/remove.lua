-- KEYS: message hash, due set, ids set, stats hash, leased set
-- ARGV: id
local queued = redis.call('ZREM', KEYS[3], ARGV[1])
if queued == 1 then
  redis.call('HINCRBY', KEYS[4], 'messages', -1)
  redis.call('HINCRBY', KEYS[4], 'bytes', -redis.call('HSTRLEN', KEYS[1], 'body'))
  if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') > 0 then
    redis.call('HINCRBY', KEYS[4], 'deferred', -1)
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return queued
