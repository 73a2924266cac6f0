-- KEYS[1]: index of sites with response-rule states. ARGV: now ('' = TIME), key
-- prefix of the state hashes, most sites to read. Returns {now, then site, field,
-- value of every live state}; expired fields and sites go.
local now = clock(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {now}
for _, site in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)) do
  local h = redis.call('HGETALL', ARGV[2] .. site)
  for i = 1, #h, 2 do
    local u = tonumber(string.match(h[i + 1], '^(%d+)|') or '0')
    if u <= now then
      redis.call('HDEL', ARGV[2] .. site, h[i])
    else
      table.insert(out, site)
      table.insert(out, h[i])
      table.insert(out, h[i + 1])
    end
  end
end
return out
