-- `local function finish(k, a)`: records the outcome of one leased delivery, one
-- item of a batch (finish_main.lua), if its lease still holds.
-- KEYS[k + 1 ..]: message, due set, leased set, lease hash, later set, stats hash,
--                 status, final record
-- ARGV[a + 1 ..]: id, token, status JSON, attempts, next attempt ms ('' when
--                 final), then delivered, bounced, expired recipient counts (added
--                 to the totals when final)
-- `retention` (ms) is the final record's; counter changes are added to `counts`
-- (stats key -> field -> delta), written once per batch.
-- Returns 0 lease lost, 1 rescheduled, 2 final.
-- The lease hash holds the token of the latest lease until finish, release,
-- remove or a replacing enqueue: an equal token means still ours.
local function count(counts, stats, field, n)
  local c = counts[stats]
  if not c then
    c = {}
    counts[stats] = c
  end
  c[field] = (c[field] or 0) + n
end

local function finish(k, a, retention, counts)
  local message, due, leased, lease = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local later, stats, status, final = KEYS[k + 5], KEYS[k + 6], KEYS[k + 7], KEYS[k + 8]
  local id, json, attempts, next_at = ARGV[a + 1], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  if redis.call('HGET', lease, id) ~= ARGV[a + 2] then
    return 0
  end
  -- Leased, or swept back to due after expiry (still ours: nobody took it since).
  local was_leased = redis.call('ZREM', leased, id) == 1
  redis.call('HDEL', lease, id)
  local new = tonumber(attempts)
  -- Attempts before this finish: kept in the status, which only a message in
  -- `later` can have.
  local function old_attempts()
    local s = redis.call('GET', status)
    if s then return tonumber(string.match(s, '^(%d+):')) end
    return 0
  end
  if next_at ~= '' then
    local old = old_attempts()
    redis.call('ZADD', due, next_at, id)
    redis.call('ZADD', later, 0, id)
    redis.call('SET', status, attempts .. ':' .. json)
    if old == 0 and new > 0 then
      count(counts, stats, 'deferred', 1)
    elseif old > 0 and new == 0 then
      count(counts, stats, 'deferred', -1)
    end
    return 1
  end
  if not was_leased then
    redis.call('ZREM', due, id)
  end
  local old = 0
  if redis.call('ZREM', later, id) == 1 then
    old = old_attempts()
    redis.call('DEL', status)
  end
  -- The envelope, for the final record: it starts the stored value, after the
  -- header, and is rarely longer than the first read.
  local head = redis.call('GETRANGE', message, 0, 1023)
  local env_len, len, hl = string.match(head, '^(%d+):(%d+):()')
  env_len, len = tonumber(env_len), tonumber(len)
  local envelope = string.sub(head, hl, hl + env_len - 1)
  if #envelope < env_len then
    envelope = redis.call('GETRANGE', message, hl - 1, hl + env_len - 2)
  end
  redis.call('DEL', message)
  redis.call('SET', final, env_len .. ':' .. envelope .. json, 'PX', retention)
  count(counts, stats, 'delivered', tonumber(ARGV[a + 6]))
  count(counts, stats, 'bounced', tonumber(ARGV[a + 7]))
  count(counts, stats, 'expired', tonumber(ARGV[a + 8]))
  count(counts, stats, 'messages', -1)
  count(counts, stats, 'bytes', -len)
  if old > 0 then
    count(counts, stats, 'deferred', -1)
  end
  return 2
end
