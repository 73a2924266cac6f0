-- Stores a message, as `enqueue()`: alone (enqueue_main.lua) or after a guard
-- (guarded_enqueue_main.lua).
-- KEYS: message, due set, stats hash, leased set, lease hash, later set, status
-- ARGV: id, stored value ("<envelope len>:<body len>:" envelope body), body
--       length, due score (ms)
local function enqueue()
  -- The header of a message stored under this id already ('' when none).
  local old = redis.call('GETRANGE', KEYS[1], 0, 23)
  if old ~= '' then
    -- A replacement: counted once, and what the old one left behind (its
    -- lease, its status, its place in the indexes) goes.
    local _, old_len = string.match(old, '^(%d+):(%d+):')
    redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(old_len or 0))
    redis.call('ZREM', KEYS[4], ARGV[1])
    redis.call('HDEL', KEYS[5], ARGV[1])
    if redis.call('ZREM', KEYS[6], ARGV[1]) == 1 then
      local s = redis.call('GET', KEYS[7])
      if s and tonumber(string.match(s, '^(%d+):')) > 0 then
        redis.call('HINCRBY', KEYS[3], 'deferred', -1)
      end
      redis.call('DEL', KEYS[7])
    end
  else
    redis.call('HINCRBY', KEYS[3], 'messages', 1)
  end
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[3])
  if old ~= '' then return 1 end
  return 0
end
