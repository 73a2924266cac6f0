-- Records the outcomes of a batch of leased deliveries (one script call for the
-- batch: a call costs Redis far more than the commands in it), each checked
-- against its own lease.
-- KEYS: per shard of the batch, its five, then its items' three each (see
-- finish.lua)
-- ARGV: retention ms, then per shard its item count, its five totals and its
-- items' six each (finish.lua)
-- Returns per item, in the order given, 0 lease lost, 1 rescheduled, 2 final.
-- The batch's delivery events are not written here: the relay sends them as
-- plain XADDs ahead of this call in the same pipeline (an event passed through
-- Lua is copied and hashed byte by byte, which cost more than the XADD itself).
local out, counts = {}, {}
local sk, c, o = 1, 2, 0
while c <= #ARGV do
  local n = tonumber(ARGV[c])
  finish_shard(sk, c, n, o, ARGV[1], counts, out)
  sk, c, o = sk + 5 + 3 * n, c + 6 + 6 * n, o + n
end
-- Counts of 0 (most messages have only one of delivered, bounced, expired)
-- change nothing.
for stats, fields in pairs(counts) do
  for field, delta in pairs(fields) do
    if delta ~= 0 then redis.call('HINCRBY', stats, field, delta) end
  end
end
return out
