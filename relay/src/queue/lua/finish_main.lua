-- Records the outcomes of a batch of leased deliveries (one script call for the
-- batch: a call costs Redis far more than the commands in it), each checked
-- against its own lease.
-- KEYS: per item its eight (see finish.lua)
-- ARGV: retention ms, item count, per item its nine (finish.lua)
-- Returns per item 0 lease lost, 1 rescheduled, 2 final.
-- The batch's delivery events are not written here: the relay sends them as
-- plain XADDs ahead of this call in the same pipeline (an event passed through
-- Lua is copied and hashed byte by byte, which cost more than the XADD itself).
local n = tonumber(ARGV[2])
-- The items by shard (their lease hash), in the order they first appear.
local shards, order = {}, {}
for i = 0, n - 1 do
  local lease = KEYS[8 * i + 4]
  local items = shards[lease]
  if not items then
    items = {}
    shards[lease] = items
    order[#order + 1] = lease
  end
  items[#items + 1] = i
end
local out, counts = {}, {}
for _, lease in ipairs(order) do
  finish_shard(shards[lease], ARGV[1], counts, out)
end
-- Counts of 0 (most messages have only one of delivered, bounced, expired)
-- change nothing.
for stats, fields in pairs(counts) do
  for field, delta in pairs(fields) do
    if delta ~= 0 then redis.call('HINCRBY', stats, field, delta) end
  end
end
return out
