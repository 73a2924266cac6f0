-- KEYS[1]: back-off hash. ARGV: now, base, max level, recover.
-- Returns the end of the pause and now.
local now = clock(ARGV[1])
local base, max_level, recover = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if recover < 1 then recover = 1 end
if max_level < 1 then max_level = 1 end
local bo = redis.call('HMGET', KEYS[1], 'level', 'hit')
local level = tonumber(bo[1] or '0')
local hit = tonumber(bo[2] or '0')
local until_ = 0
if level > 0 then until_ = hit + base * 2 ^ math.min(level - 1, 30) end
if level > 0 and now < until_ then
  return {until_, now}
end
local eff = level
if level > 0 then
  eff = level - math.floor((now - until_) / recover)
  if eff < 0 then eff = 0 end
end
level = math.min(eff + 1, max_level)
until_ = now + base * 2 ^ math.min(level - 1, 30)
redis.call('HSET', KEYS[1], 'level', level, 'hit', now)
redis.call('PEXPIRE', KEYS[1], until_ - now + level * recover + 1000)
return {until_, now}
