-- A group of guarded enqueues: per message, its guard (quota check and charge)
-- and, only if the guard allowed it, the enqueue. Messages run in order, so each
-- guard sees what the ones before charged, as separate calls would.
-- KEYS: per shard of the group: due, stats, leased, lease, later, fresh; then per
--       message: message, status, its guard's keys but the last; then the last
--       key of every guard (one key: the same for all, see redis_enqueue.rs)
-- ARGV: the guards' clock ('' = Redis TIME), shard count, message count, then per
--       message: its shard's place among the group's shards (1-based), id,
--       stored value, body length, due score (ms; empty: `fresh`), its guard's key count (but
--       the last), its guard's argument count, then its guard's arguments
-- Returns per message two values: 1 stored (2: replacing one of that id) or 0
-- refused, and the guard's reply; or -1 and the text of the error that stopped
-- it (the others are unaffected).
local n = tonumber(ARGV[3])
local out = {}
local a, m = 4, tonumber(ARGV[2]) * 6 + 1
for i = 1, n do
  local k = (tonumber(ARGV[a]) - 1) * 6 + 1
  local nkeys, nargs = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  A0 = a + 6
  local ok, allowed, reply = pcall(guard, m + 1)
  if not ok then
    out[2 * i - 1], out[2 * i] = -1, why(allowed)
  elseif not allowed then
    out[2 * i - 1], out[2 * i] = 0, reply
  else
    local stored, replaced, msgs, bytes = pcall(enqueue, k, m, a + 1)
    if stored then
      count(k, msgs, bytes)
      out[2 * i - 1], out[2 * i] = 1 + replaced, reply
    else
      out[2 * i - 1], out[2 * i] = -1, why(replaced)
    end
  end
  a, m = a + 7 + nargs, m + 2 + nkeys
end
write_counts()
return out
