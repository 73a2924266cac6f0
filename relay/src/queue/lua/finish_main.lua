-- Records the outcomes of a batch of leased deliveries (one script call for the
-- batch: a call costs Redis far more than the commands in it), each checked
-- against its own lease, and appends the batch's delivery events to the events
-- stream in the same atomic call (standalone Redis and Sentinel; in a cluster
-- every item is of one shard and there are no events: the stream is in another
-- slot).
-- KEYS: per item its eight (see finish.lua), then the events stream if there are
--       events
-- ARGV: retention ms, item count, the stream's MAXLEN ~ cap ('' without events),
--       per item its eight (finish.lua), then the events' JSON
-- Returns per item 0 lease lost, 1 rescheduled, 2 final; then, only when the
-- events could not all be appended, the error's text (the caller appends them on
-- their own).
-- An event that cannot be written must not stop the outcomes: at `maxmemory`
-- (noeviction) the XADD, the call's first write, is refused, while the finishes
-- are what frees memory. Mail goes before events, as when they are written apart.
local n = tonumber(ARGV[2])
local first_event = 4 + 8 * n
local events_error
if #ARGV >= first_event then
  local stream = KEYS[8 * n + 1]
  for j = first_event, #ARGV do
    local ok, e = pcall(redis.call, 'XADD', stream, 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[j])
    if not ok then
      events_error = type(e) == 'table' and tostring(e.err) or tostring(e)
      break
    end
  end
end
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
if events_error then out[n + 1] = events_error end
return out
