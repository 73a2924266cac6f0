-- KEYS[1]: the site's response-rule states (hash); KEYS[2]: index of sites with
-- states (sorted set by latest end). ARGV: now ('' = TIME), site, scope field,
-- value without its end ('s or t|factor|rule|reply'), duration (ms).
-- A longer state of the same kind already in force is kept. Returns {until, now}.
local now = clock(ARGV[1])
local site, field = ARGV[2], ARGV[3]
local until_ = now + tonumber(ARGV[5])
local value = until_ .. '|' .. ARGV[4]
local old = redis.call('HGET', KEYS[1], field)
if old then
  local u, a = string.match(old, '^(%d+)|(%a)|')
  if u and tonumber(u) > until_ and a == string.match(value, '^%d+|(%a)|') then
    return {tonumber(u), now}
  end
end
redis.call('HSET', KEYS[1], field, value)
if redis.call('PTTL', KEYS[1]) < until_ - now + 1000 then
  redis.call('PEXPIRE', KEYS[1], until_ - now + 1000)
end
local s = redis.call('ZSCORE', KEYS[2], site)
if not s or tonumber(s) < until_ then
  redis.call('ZADD', KEYS[2], until_, site)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return {until_, now}
