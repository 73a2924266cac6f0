-- KEYS: due set
-- ARGV: now, limit
-- Makes up to `limit` messages due later than now due now; returns how many.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[1], id)
end
return #ids
