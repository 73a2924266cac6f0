-- KEYS: message, due set, stats hash, leased set, lease hash, later set, status,
--       final record, fresh list
-- ARGV: id
-- Returns 1 if it was queued. A final record goes too.
redis.call('DEL', KEYS[8])
local head = redis.call('GETRANGE', KEYS[1], 0, 23)
if head == '' then return 0 end
local _, len = string.match(head, '^(%d+):(%d+):')
redis.call('HINCRBY', KEYS[3], 'messages', -1)
redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(len))
local s = redis.call('GET', KEYS[7])
if s and tonumber(string.match(s, '^(%d+):')) > 0 then
  redis.call('HINCRBY', KEYS[3], 'deferred', -1)
end
redis.call('DEL', KEYS[1], KEYS[7])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('LREM', KEYS[9], 0, ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
return 1
