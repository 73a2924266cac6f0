-- Stores one message of a group (redis_enqueue.rs): a group's messages go in
-- one script call, since an `EVALSHA` costs Redis several times the commands it
-- runs. k: the place in KEYS of its shard's due set (stats, leased, lease, later,
-- fresh follow), m: the place of its message key (its status key follows), a:
-- the place in ARGV of its id (stored value, body length, due score follow).
-- A due score of '' puts the id on the shard's `fresh` list (never attempted,
-- due at arrival) rather than in `due` (`queue.redis.fresh_list`; older relays
-- read only `due`).
-- Returns whether it replaced a message stored under this id (1/0), and what it
-- adds to its shard's `messages` and `bytes` counters (the caller writes those
-- once per shard for the whole group).
local function schedule(k, id, score)
  if score == '' then
    redis.call('RPUSH', KEYS[k + 5], id)
  else
    redis.call('ZADD', KEYS[k], score, id)
  end
end
local function enqueue(k, m, a)
  local id = ARGV[a]
  -- The common case, a new id, in one command.
  if redis.call('SET', KEYS[m], ARGV[a + 1], 'NX') then
    schedule(k, id, ARGV[a + 3])
    return 0, 1, tonumber(ARGV[a + 2])
  end
  -- A replacement: counted once, and what the old one left behind (its lease,
  -- its status, its place in the indexes) goes.
  local old = redis.call('GETRANGE', KEYS[m], 0, 23)
  local _, old_len = string.match(old, '^(%d+):(%d+):')
  -- Exactly one schedule entry afterwards: one in `fresh` twice would be
  -- leased twice.
  redis.call('ZREM', KEYS[k], id)
  redis.call('LREM', KEYS[k + 5], 0, id)
  redis.call('ZREM', KEYS[k + 2], id)
  redis.call('HDEL', KEYS[k + 3], id)
  if redis.call('ZREM', KEYS[k + 4], id) == 1 then
    local s = redis.call('GET', KEYS[m + 1])
    if s and tonumber(string.match(s, '^(%d+):')) > 0 then
      redis.call('HINCRBY', KEYS[k + 1], 'deferred', -1)
    end
    redis.call('DEL', KEYS[m + 1])
  end
  redis.call('SET', KEYS[m], ARGV[a + 1])
  schedule(k, id, ARGV[a + 3])
  return 1, 0, tonumber(ARGV[a + 2]) - tonumber(old_len or 0)
end
-- The text of a Redis error caught by pcall (a table with `err`) or of a Lua one.
local function why(e)
  if type(e) == 'table' then return tostring(e.err) end
  return tostring(e)
end
-- The counters each shard's messages add to, written once per shard.
local added_msgs, added_bytes = {}, {}
local function count(k, msgs, bytes)
  added_msgs[k] = (added_msgs[k] or 0) + msgs
  added_bytes[k] = (added_bytes[k] or 0) + bytes
end
local function write_counts()
  for k, msgs in pairs(added_msgs) do
    if msgs ~= 0 then redis.call('HINCRBY', KEYS[k + 1], 'messages', msgs) end
    if added_bytes[k] ~= 0 then redis.call('HINCRBY', KEYS[k + 1], 'bytes', added_bytes[k]) end
  end
end
