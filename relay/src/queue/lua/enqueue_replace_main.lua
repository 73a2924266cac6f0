-- The rare end of a grouped enqueue (redis_enqueue.rs): the transaction of
-- this group found an id already stored, so its `MSETNX` stored no value, but
-- it still added each to `due` and counted it. Here each is stored as
-- `enqueue()` stores it (a new one, or a replacement: counted once, its old
-- lease, status and indexes gone), and the transaction's count of it is taken
-- back first.
-- KEYS: per shard of the group: due, stats, leased, lease, later; then per
--       message: message, status
-- ARGV: shard count, message count, then per message: its shard's place among
--       the group's shards (1-based), id, stored value ("<envelope len>:<body
--       len>:" envelope body), body length, due score (ms)
-- Returns per message 0 (stored: the id was gone by now), 1 (stored, replacing
-- one of that id) or the text of the error that stopped it: one message's
-- failure leaves the others stored.
local n = tonumber(ARGV[2])
local out = {}
local a, m = 3, tonumber(ARGV[1]) * 5 + 1
for i = 1, n do
  local k = (tonumber(ARGV[a]) - 1) * 5 + 1
  count(k, -1, -tonumber(ARGV[a + 3]))
  local ok, replaced, msgs, bytes = pcall(enqueue, k, m, a + 1)
  if ok then
    count(k, msgs, bytes)
    out[i] = replaced
  else
    out[i] = why(replaced)
    -- Not a message (debris of another type, or gone): the transaction's due
    -- entry must not stay behind.
    if redis.call('TYPE', KEYS[m]).ok ~= 'string' then
      redis.call('ZREM', KEYS[k], ARGV[a + 1])
    end
  end
  a, m = a + 5, m + 2
end
write_counts()
return out
