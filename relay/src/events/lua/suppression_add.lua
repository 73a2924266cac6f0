-- Adds (or renews) an address on one suppression list.
-- KEYS[1]: the list's zset (member: address, score: expiry in ms, inf = never)
-- KEYS[2]: the list's hash (address -> entry JSON)
-- KEYS[3]: set of list names
-- ARGV[1]: address; ARGV[2]: ttl in ms (0 = never expires); ARGV[3]: entry JSON
-- ARGV[4]: list name; ARGV[5]: most entries the list keeps
-- Returns {1 if the address was new, the expiry in ms (-1 = never), now in ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Expired entries go first, a bounded number per call so one call stays short.
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
local ttl = tonumber(ARGV[2])
local expiry = '+inf'
local shown = -1
if ttl > 0 then
  expiry = now + ttl
  shown = expiry
end
local new = redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
-- Over the cap: the entries closest to expiry make room.
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #popped, 2 do
    redis.call('HDEL', KEYS[2], popped[i])
  end
end
return {new, shown, now}
