-- `local function finish_shard(sk, a0, n, o0, retention, counts, out)`: records
-- the outcomes of the `n` items of one shard of a batch (finish_main.lua), each
-- if its lease still holds.
-- The shard's keys are KEYS[sk ..]: due set, leased set, lease hash, later set,
-- stats hash; item j (1-based) has KEYS[sk + 5 + 3(j - 1) ..]: message, status,
-- final record; and ARGV[a0 + 9(j - 1) + 1 ..]: id, token, status JSON (a final
-- item with a body length: its whole final record, built by the relay from the
-- envelope it read with the lease), attempts, next attempt ms ('' when final),
-- delivered, bounced, expired recipient counts (added to the totals when final),
-- the stored body's length ('' when the relay has no envelope for it: the script
-- reads the envelope itself). Its answer goes to out[o0 + j]: 0 lease lost, 1
-- rescheduled, 2 final.
-- The shard's keys come once, not per item: a key or argument costs Redis about
-- 1,000 instructions, and a relay's batch is mostly of one shard (its home
-- shard, redis.rs).
-- The final record comes ready from the relay where it can: read here, the
-- envelope would be copied into a Lua string and hashed byte by byte, twice more
-- for the record built from it.
-- `retention` (ms) is the final record's; counter changes are added to
-- `counts` (stats key -> field -> delta), written once per batch.
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

local function finish_shard(sk, a0, n, o0, retention, counts, out)
  local due, leased, lease = KEYS[sk], KEYS[sk + 1], KEYS[sk + 2]
  local later, stats = KEYS[sk + 3], KEYS[sk + 4]
  local ids = {}
  for j = 1, n do ids[j] = ARGV[a0 + 9 * (j - 1) + 1] end
  local tokens = redis.call('HMGET', lease, unpack(ids))
  -- Ours: token equal, and the first item of its id (a second would finish a
  -- lease the first already ended).
  local mine, mine_ids, seen = {}, {}, {}
  for j = 1, n do
    local id = ids[j]
    if tokens[j] == ARGV[a0 + 9 * (j - 1) + 2] and not seen[id] then
      seen[id] = true
      mine[#mine + 1] = j
      mine_ids[#mine_ids + 1] = id
    else
      out[o0 + j] = 0
    end
  end
  if #mine == 0 then return end
  -- Leased, or swept back to due after expiry (still ours: nobody took it since).
  local all_leased = redis.call('ZREM', leased, unpack(mine_ids)) == #mine
  redis.call('HDEL', lease, unpack(mine_ids))
  local finals, final_ids, gone = {}, {}, {}
  for _, j in ipairs(mine) do
    local k, a = sk + 5 + 3 * (j - 1), a0 + 9 * (j - 1)
    local id, json, attempts, next_at = ARGV[a + 1], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
    if next_at ~= '' then
      local old, new = old_attempts(KEYS[k + 1]), tonumber(attempts)
      redis.call('ZADD', due, next_at, id)
      redis.call('ZADD', later, 0, id)
      redis.call('SET', KEYS[k + 1], attempts .. ':' .. json)
      if old == 0 and new > 0 then
        count(counts, stats, 'deferred', 1)
      elseif old > 0 and new == 0 then
        count(counts, stats, 'deferred', -1)
      end
      out[o0 + j] = 1
    else
      finals[#finals + 1] = j
      final_ids[#final_ids + 1] = id
      out[o0 + j] = 2
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
  for _, j in ipairs(finals) do
    local k, a = sk + 5 + 3 * (j - 1), a0 + 9 * (j - 1)
    local message, status = KEYS[k], KEYS[k + 1]
    local old = 0
    if retried then
      old = old_attempts(status)
      gone[#gone + 1] = status
    end
    local len = tonumber(ARGV[a + 9])
    if len then
      redis.call('SET', KEYS[k + 2], ARGV[a + 3], 'PX', retention)
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
      redis.call('SET', KEYS[k + 2], env_len .. ':' .. envelope .. ARGV[a + 3], 'PX', retention)
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
