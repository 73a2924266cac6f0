-- Upgrade from the old layout: drops a message `take.lua` took, once the new
-- layout holds it, if the lease is still ours (else another relay has it now).
-- KEYS: old message hash, old due set, old leased set, old ids set, old stats hash
-- ARGV: id, token
-- Returns 1 dropped, 0 lease lost.
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[2] or not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  return 0
end
redis.call('HINCRBY', KEYS[5], 'messages', -1)
redis.call('HINCRBY', KEYS[5], 'bytes', -redis.call('HSTRLEN', KEYS[1], 'body'))
if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') > 0 then
  redis.call('HINCRBY', KEYS[5], 'deferred', -1)
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
