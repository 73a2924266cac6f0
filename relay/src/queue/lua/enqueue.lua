-- Stores a message, as `enqueue()`: alone (enqueue_main.lua) or after a guard
-- (guarded_enqueue_main.lua).
-- KEYS: message hash, due set, ids set, stats hash, leased set
-- ARGV: id, envelope JSON, body, due score (ms)
local function enqueue()
  local queued = redis.call('ZSCORE', KEYS[3], ARGV[1])
  local old_len = 0
  if queued then
    old_len = redis.call('HSTRLEN', KEYS[1], 'body')
    if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') > 0 then
      redis.call('HINCRBY', KEYS[4], 'deferred', -1)
    end
  else
    redis.call('HINCRBY', KEYS[4], 'messages', 1)
  end
  -- Starting from an empty hash drops what a replaced message or a final record of
  -- the same id left behind: its lease, its final flag, its expiry.
  redis.call('DEL', KEYS[1])
  -- No `status` or `attempts` until the first attempt: readers take their absence
  -- for a fresh status and 0, and writing them cost ~300 bytes per queued message.
  redis.call('HSET', KEYS[1], 'envelope', ARGV[2], 'body', ARGV[3])
  -- Only a queued id can be leased.
  if queued then redis.call('ZREM', KEYS[5], ARGV[1]) end
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('ZADD', KEYS[3], 0, ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'bytes', string.len(ARGV[3]) - old_len)
  if queued then return 1 end
  return 0
end
