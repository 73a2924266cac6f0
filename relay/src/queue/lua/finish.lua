-- `local function finish_shard(items, retention, counts, out)`: records the
-- outcomes of the items of one shard of a batch (finish_main.lua), each if its
-- lease still holds.
-- Item i (0-based) has KEYS[8i + 1 ..]: message, due set, leased set, lease
-- hash, later set, stats hash, status, final record; and ARGV[2 + 9i + 1 ..]:
-- id, token, status JSON (a final item with a body length: its whole final
-- record, built by the relay from the envelope it read with the lease), attempts,
-- next attempt ms ('' when final), delivered, bounced, expired recipient counts
-- (added to the totals when final), the stored body's length ('' when the relay
-- has no envelope for it: the script reads the envelope itself).
-- The final record comes ready from the relay where it can: read here, the
-- envelope would be copied into a Lua string and hashed byte by byte, twice more
-- for the record built from it.
-- `items`: the item numbers of one shard (they share due, leased, lease, later,
-- stats); `retention` (ms) is the final record's; counter changes are added to
-- `counts` (stats key -> field -> delta), written once per batch; out[i + 1] is
-- set to 0 lease lost, 1 rescheduled, 2 final.
-- The lease hash holds the token of the latest lease until finish, release,
-- remove or a replacing enqueue: an equal token means still ours.
-- The shard's index writes go in one variadic command each for its items (a
-- command costs Redis about as much as a script call's own overhead, so per
-- message they were most of a finish); what only some items need (a status, a
-- lease swept back to due) stays per item.
local function count(counts, stats, field, n)
  local c = counts[stats]
  if not c then
    c = {}
    counts[stats] = c
  end
  c[field] = (c[field] or 0) + n
end

-- Attempts before this finish: kept in the status, which only a message in
-- `later` can have.
local function old_attempts(status)
  local s = redis.call('GET', status)
  if s then return tonumber(string.match(s, '^(%d+):')) end
  return 0
end

local function finish_shard(items, retention, counts, out)
  local k0 = 8 * items[1]
  local due, leased, lease = KEYS[k0 + 2], KEYS[k0 + 3], KEYS[k0 + 4]
  local later, stats = KEYS[k0 + 5], KEYS[k0 + 6]
  local ids = {}
  for j, i in ipairs(items) do ids[j] = ARGV[2 + 9 * i + 1] end
  local tokens = redis.call('HMGET', lease, unpack(ids))
  -- Ours: token equal, and the first item of its id (a second would finish a
  -- lease the first already ended).
  local mine, mine_ids, seen = {}, {}, {}
  for j, i in ipairs(items) do
    local id = ids[j]
    if tokens[j] == ARGV[2 + 9 * i + 2] and not seen[id] then
      seen[id] = true
      mine[#mine + 1] = i
      mine_ids[#mine_ids + 1] = id
    else
      out[i + 1] = 0
    end
  end
  if #mine == 0 then return end
  -- Leased, or swept back to due after expiry (still ours: nobody took it since).
  local all_leased = redis.call('ZREM', leased, unpack(mine_ids)) == #mine
  redis.call('HDEL', lease, unpack(mine_ids))
  local finals, final_ids, gone = {}, {}, {}
  for _, i in ipairs(mine) do
    local k, a = 8 * i, 2 + 9 * i
    local id, json, attempts, next_at = ARGV[a + 1], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
    if next_at ~= '' then
      local old, new = old_attempts(KEYS[k + 7]), tonumber(attempts)
      redis.call('ZADD', due, next_at, id)
      redis.call('ZADD', later, 0, id)
      redis.call('SET', KEYS[k + 7], attempts .. ':' .. json)
      if old == 0 and new > 0 then
        count(counts, stats, 'deferred', 1)
      elseif old > 0 and new == 0 then
        count(counts, stats, 'deferred', -1)
      end
      out[i + 1] = 1
    else
      finals[#finals + 1] = i
      final_ids[#final_ids + 1] = id
      out[i + 1] = 2
    end
  end
  if #finals == 0 then return end
  if not all_leased then
    -- Some were swept back: a final message must leave `due` too.
    redis.call('ZREM', due, unpack(final_ids))
  end
  -- In `later` (retried, given back, swept): its status goes, after its attempts
  -- are read for the `deferred` count. Most finals were never there.
  local retried = redis.call('ZREM', later, unpack(final_ids)) > 0
  for _, i in ipairs(finals) do
    local k, a = 8 * i, 2 + 9 * i
    local message, status = KEYS[k + 1], KEYS[k + 7]
    local old = 0
    if retried then
      old = old_attempts(status)
      gone[#gone + 1] = status
    end
    local len = tonumber(ARGV[a + 9])
    if len then
      redis.call('SET', KEYS[k + 8], ARGV[a + 3], 'PX', retention)
    else
      -- The envelope, for the final record: it starts the stored value, after the
      -- header, and is rarely longer than the first read (a compact envelope
      -- with one recipient is about 100 bytes).
      local head = redis.call('GETRANGE', message, 0, 255)
      local env_len, body_len, hl = string.match(head, '^(%d+):(%d+):()')
      env_len, len = tonumber(env_len), tonumber(body_len)
      local envelope = string.sub(head, hl, hl + env_len - 1)
      if #envelope < env_len then
        envelope = redis.call('GETRANGE', message, hl - 1, hl + env_len - 2)
      end
      redis.call('SET', KEYS[k + 8], env_len .. ':' .. envelope .. ARGV[a + 3], 'PX', retention)
    end
    gone[#gone + 1] = message
    count(counts, stats, 'delivered', tonumber(ARGV[a + 6]))
    count(counts, stats, 'bounced', tonumber(ARGV[a + 7]))
    count(counts, stats, 'expired', tonumber(ARGV[a + 8]))
    count(counts, stats, 'messages', -1)
    count(counts, stats, 'bytes', -len)
    if old > 0 then
      count(counts, stats, 'deferred', -1)
    end
  end
  redis.call('DEL', unpack(gone))
end
