-- Stores a group of messages, each with its `accepted` event when it has one (on
-- standalone Redis and Sentinel: the stream is one key outside the shards' hash
-- tags, which Redis Cluster refuses in one script), so that a relay killed after
-- its `250` cannot lose the event.
-- KEYS: per shard of the group: due, stats, leased, lease, later; then per
--       message: message, status; then the events stream when a message has an
--       event
-- ARGV: shard count, message count, the stream's MAXLEN ~ cap, then per
--       message: its shard's place among the group's shards (1-based), id, stored
--       value ("<envelope len>:<body len>:" envelope body), body length, due score
--       (ms), event JSON ('' for none)
-- Returns per message 0 (stored), 1 (stored, replacing one of that id) or the
-- text of the error that stopped it: one message's failure (OOM before anything
-- was written, a key of the wrong type) leaves the others stored.
local n = tonumber(ARGV[2])
local out = {}
local a, m = 4, tonumber(ARGV[1]) * 5 + 1
for i = 1, n do
  local k = (tonumber(ARGV[a]) - 1) * 5 + 1
  local ok, replaced, msgs, bytes = pcall(enqueue, k, m, a + 1)
  if ok then
    count(k, msgs, bytes)
    out[i] = replaced
    if ARGV[a + 5] ~= '' then
      local sent, e = pcall(redis.call, 'XADD', KEYS[#KEYS], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[a + 5])
      if not sent then out[i] = why(e) end
    end
  else
    out[i] = why(replaced)
  end
  a, m = a + 6, m + 2
end
write_counts()
return out
