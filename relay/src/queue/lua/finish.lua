-- KEYS: message, due set, leased set, lease hash, later set, stats hash, status,
--       final record
-- ARGV: id, token, status JSON, attempts, next attempt ms ('' when final),
--       retention ms, then delivered, bounced, expired recipient counts (added to
--       the totals when final)
-- Returns 0 lease lost, 1 rescheduled, 2 final.
-- The lease hash holds the token of the latest lease until finish, release,
-- remove or a replacing enqueue: an equal token means still ours.
if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[2] then
  return 0
end
-- Leased, or swept back to due after expiry (still ours: nobody took it since).
local was_leased = redis.call('ZREM', KEYS[3], ARGV[1]) == 1
redis.call('HDEL', KEYS[4], ARGV[1])
local new = tonumber(ARGV[4])
-- Attempts before this finish: kept in the status, which only a message in
-- `later` can have.
local function old_attempts()
  local s = redis.call('GET', KEYS[7])
  if s then return tonumber(string.match(s, '^(%d+):')) end
  return 0
end
if ARGV[5] ~= '' then
  local old = old_attempts()
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
  redis.call('ZADD', KEYS[5], 0, ARGV[1])
  redis.call('SET', KEYS[7], ARGV[4] .. ':' .. ARGV[3])
  if old == 0 and new > 0 then
    redis.call('HINCRBY', KEYS[6], 'deferred', 1)
  elseif old > 0 and new == 0 then
    redis.call('HINCRBY', KEYS[6], 'deferred', -1)
  end
  return 1
end
if not was_leased then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local old = 0
if redis.call('ZREM', KEYS[5], ARGV[1]) == 1 then
  old = old_attempts()
  redis.call('DEL', KEYS[7])
end
-- The envelope, for the final record: it starts the stored value, after the
-- header, and is rarely longer than the first read.
local head = redis.call('GETRANGE', KEYS[1], 0, 1023)
local env_len, len, hl = string.match(head, '^(%d+):(%d+):()')
env_len, len = tonumber(env_len), tonumber(len)
local envelope = string.sub(head, hl, hl + env_len - 1)
if #envelope < env_len then
  envelope = redis.call('GETRANGE', KEYS[1], hl - 1, hl + env_len - 2)
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[8], env_len .. ':' .. envelope .. ARGV[3], 'PX', ARGV[6])
-- Counts of 0 (most messages have only one of the three) change nothing.
if ARGV[7] ~= '0' then redis.call('HINCRBY', KEYS[6], 'delivered', ARGV[7]) end
if ARGV[8] ~= '0' then redis.call('HINCRBY', KEYS[6], 'bounced', ARGV[8]) end
if ARGV[9] ~= '0' then redis.call('HINCRBY', KEYS[6], 'expired', ARGV[9]) end
redis.call('HINCRBY', KEYS[6], 'messages', -1)
redis.call('HINCRBY', KEYS[6], 'bytes', -len)
if old > 0 then
  redis.call('HINCRBY', KEYS[6], 'deferred', -1)
end
return 2
