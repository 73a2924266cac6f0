-- Stores a message and appends its `accepted` event to the events stream in the
-- same atomic call, so a relay killed after its `250` cannot lose the event. Only
-- on standalone Redis and Sentinel: the stream is one key outside the shard's hash
-- tag, which Redis Cluster refuses in one script (CROSSSLOT).
-- KEYS: the enqueue's seven (ENQUEUE in redis.rs), then the events stream
-- ARGV: the enqueue's four (ENQUEUE), then the stream's MAXLEN ~ cap and the
-- event's JSON
local replaced = enqueue()
redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[6])
return replaced
