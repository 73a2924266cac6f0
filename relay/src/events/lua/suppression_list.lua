-- Unexpired entries of one suppression list, latest expiry first.
-- KEYS[1]: the list's zset; KEYS[2]: the list's hash
-- ARGV[1]: most entries returned
-- Returns {now, address, expiry (-1 = never), entry JSON, address, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
local rows = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
for i = 1, #rows, 2 do
  local score = rows[i + 1]
  if score == 'inf' then
    score = -1
  end
  out[#out + 1] = rows[i]
  out[#out + 1] = score
  out[#out + 1] = redis.call('HGET', KEYS[2], rows[i]) or '{}'
end
return out
