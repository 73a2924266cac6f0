-- `local function finish_shard(sk, a0, n, o0, retention, counts, out)`: records
-- the outcomes of the `n` items of one shard of a batch (finish_main.lua), each
-- if its lease still holds.
-- The shard's keys are KEYS[sk ..]: due set, leased set, lease hash, later set,
-- stats hash; item j (1-based) has KEYS[sk + 5 + 3(j - 1) ..]: message, status,
-- final record. ARGV[a0 + 1 .. a0 + 5] are the shard's totals over its final
-- items, as if every lease held: delivered, bounced, expired recipients, final
-- items, and body bytes of those with a body length. Item j has
-- ARGV[a0 + 5 + 6(j - 1) + 1 ..]: id, token, status JSON (a final
-- item with a body length: its whole final record, built by the relay from the
-- envelope it read with the lease), `<next attempt ms>:<attempts>` ('' when
-- final), `<delivered>:<bounced>:<expired>` recipient counts (in the totals
-- when final), the stored body's length ('' when the relay has no envelope for
-- it: the script reads the envelope itself). Its answer goes to out[o0 + j]: 0
-- lease lost, 1 rescheduled, 2 final.
-- The shard's keys come once, not per item: a key or argument costs Redis about
-- 1,000 instructions, and a relay's batch is mostly of one shard (its home
-- shard, redis.rs). For the same reason numbers only some items need (a
-- reschedule's, a lost final's) come joined in one argument each.
-- The totals come summed by the relay, and only a final item whose lease was
-- lost (rare) has its own counts taken back out: a `tonumber` costs Redis about
-- 850 instructions (it goes through strtod), and counting each item's numbers
-- here was a few thousand per message.
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
  local delivered, bounced = tonumber(ARGV[a0 + 1]), tonumber(ARGV[a0 + 2])
  local expired, final_count = tonumber(ARGV[a0 + 3]), tonumber(ARGV[a0 + 4])
  local bytes, deferred = tonumber(ARGV[a0 + 5]), 0
  a0 = a0 + 5
  local ids = {}
  for j = 1, n do ids[j] = ARGV[a0 + 6 * (j - 1) + 1] end
  local tokens = redis.call('HMGET', lease, unpack(ids))
  -- Ours: token equal, and the first item of its id (a second would finish a
  -- lease the first already ended).
  local mine, mine_ids, seen, m = {}, {}, {}, 0
  for j = 1, n do
    local id, a = ids[j], a0 + 6 * (j - 1)
    if tokens[j] == ARGV[a + 2] and not seen[id] then
      seen[id] = true
      m = m + 1
      mine[m] = j
      mine_ids[m] = id
    else
      out[o0 + j] = 0
      if ARGV[a + 4] == '' then
        -- A final item not ours: out of the relay's totals.
        local d, b, e = string.match(ARGV[a + 5], '^(%d+):(%d+):(%d+)$')
        delivered = delivered - tonumber(d)
        bounced = bounced - tonumber(b)
        expired = expired - tonumber(e)
        final_count = final_count - 1
        if ARGV[a + 6] ~= '' then bytes = bytes - tonumber(ARGV[a + 6]) end
      end
    end
  end
  if m > 0 then
    -- Leased, or swept back to due after expiry (still ours: nobody took it since).
    local all_leased = redis.call('ZREM', leased, unpack(mine_ids)) == m
    redis.call('HDEL', lease, unpack(mine_ids))
    local finals, final_ids, f = {}, {}, 0
    for _, j in ipairs(mine) do
      local k, a = sk + 5 + 3 * (j - 1), a0 + 6 * (j - 1)
      if ARGV[a + 4] ~= '' then
        local next_at, attempts = string.match(ARGV[a + 4], '^(%d+):(%d+)$')
        local old, new = old_attempts(KEYS[k + 1]), tonumber(attempts)
        redis.call('ZADD', due, next_at, ARGV[a + 1])
        redis.call('ZADD', later, 0, ARGV[a + 1])
        redis.call('SET', KEYS[k + 1], attempts .. ':' .. ARGV[a + 3])
        if old == 0 and new > 0 then
          deferred = deferred + 1
        elseif old > 0 and new == 0 then
          deferred = deferred - 1
        end
        out[o0 + j] = 1
      else
        f = f + 1
        finals[f] = j
        final_ids[f] = ARGV[a + 1]
        out[o0 + j] = 2
      end
    end
    if f > 0 then
      if not all_leased then
        -- Some were swept back: a final message must leave `due` too.
        redis.call('ZREM', due, unpack(final_ids))
      end
      -- In `later` (retried, given back, swept): its status goes, after its
      -- attempts are read for the `deferred` count. Most finals were never there.
      local retried = redis.call('ZREM', later, unpack(final_ids)) > 0
      local gone, g = {}, 0
      for _, j in ipairs(finals) do
        local k, a = sk + 5 + 3 * (j - 1), a0 + 6 * (j - 1)
        local message, status = KEYS[k], KEYS[k + 1]
        if retried then
          if old_attempts(status) > 0 then deferred = deferred - 1 end
          g = g + 1
          gone[g] = status
        end
        if ARGV[a + 6] ~= '' then
          redis.call('SET', KEYS[k + 2], ARGV[a + 3], 'PX', retention)
        else
          -- The envelope, for the final record: it starts the stored value, after
          -- the header, and is rarely longer than the first read (a compact
          -- envelope with one recipient is about 100 bytes).
          local head = redis.call('GETRANGE', message, 0, 255)
          local env_len, body_len, hl = string.match(head, '^(%d+):(%d+):()')
          env_len = tonumber(env_len)
          bytes = bytes + tonumber(body_len)
          local envelope = string.sub(head, hl, hl + env_len - 1)
          if #envelope < env_len then
            envelope = redis.call('GETRANGE', message, hl - 1, hl + env_len - 2)
          end
          redis.call('SET', KEYS[k + 2], env_len .. ':' .. envelope .. ARGV[a + 3], 'PX', retention)
        end
        g = g + 1
        gone[g] = message
      end
      redis.call('DEL', unpack(gone))
    end
  end
  count(counts, stats, 'delivered', delivered)
  count(counts, stats, 'bounced', bounced)
  count(counts, stats, 'expired', expired)
  count(counts, stats, 'messages', -final_count)
  count(counts, stats, 'bytes', -bytes)
  count(counts, stats, 'deferred', deferred)
end
