-- The rare end of a grouped enqueue (redis_enqueue.rs): the transaction of
-- this group found an id already stored, so its `MSETNX` stored no value, but
-- it still added each to `fresh` (or `due`) and counted it. Here each is stored as
-- `enqueue()` stores it (a new one, or a replacement: counted once, its old
-- lease, status and indexes gone), and the transaction's count of it is taken
-- back first.
-- KEYS: per shard of the group: due, stats, leased, lease, later, fresh; then
--       per message: message, status
-- ARGV: shard count, message count, then per message: its shard's place among
--       the group's shards (1-based), id, stored value ("<envelope len>:<body
--       len>:" envelope body), body length, due score (ms; empty: `fresh`)
-- Returns per message 0 (stored: the id was gone by now), 1 (stored, replacing
-- one of that id) or the text of the error that stopped it: one message's
-- failure leaves the others stored.
local n = tonumber(ARGV[2])
local out = {}
local a, m = 3, tonumber(ARGV[1]) * 6 + 1
for i = 1, n do
  local k = (tonumber(ARGV[a]) - 1) * 6 + 1
  local id = ARGV[a + 1]
  count(k, -1, -tonumber(ARGV[a + 3]))
  -- The transaction's own `fresh` entry (the last of this id) goes first, so
  -- that `enqueue()` leaves exactly one (a `due` entry is a set member anyway).
  if ARGV[a + 4] == '' then redis.call('LREM', KEYS[k + 5], -1, id) end
  local ok, replaced, msgs, bytes = pcall(enqueue, k, m, a + 1)
  if ok then
    count(k, msgs, bytes)
    out[i] = replaced
    if replaced == 0 then
      -- A lease taken of the transaction's entry before this call (its value
      -- was not stored yet, so it was not delivered) must not outlive it: the
      -- message would be scheduled twice once that lease expired.
      redis.call('ZREM', KEYS[k + 2], id)
      redis.call('HDEL', KEYS[k + 3], id)
    end
  else
    out[i] = why(replaced)
    -- Not a message (debris of another type, or gone): the transaction's due
    -- entry must not stay behind.
    if redis.call('TYPE', KEYS[m]).ok ~= 'string' then
      redis.call('ZREM', KEYS[k], id)
    end
  end
  a, m = a + 5, m + 2
end
write_counts()
return out
