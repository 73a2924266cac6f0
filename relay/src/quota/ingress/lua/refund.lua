-- KEYS: one counter hash per request
-- ARGV: charge time, then per request: cost, window count, then per window: tag
helpers()
local a = 2
for _, key in ipairs(KEYS) do
  local cost, nw = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local v, nv, h, nh, A = load(key)
  settle(v, nv, h, A)
  local changed = false
  for _ = 1, nw do
    local q = tonumber(ARGV[a])
    a = a + 1
    local o = find(v, nv, q)
    if o then
      local oh = hot(o)
      local j = floor(now / v[o + 2])
      local back
      if j == cb_of(v, o) then
        back = min(cost, h[oh + 1])
        h[oh + 1] = h[oh + 1] - back
      else
        local f = prefix(q) .. j
        local c = tonumber(redis.call('HGET', key, f) or '0')
        back = min(cost, c)
        if back == c then
          redis.call('HDEL', key, f)
        elseif back > 0 then
          redis.call('HINCRBY', key, f, -back)
        end
      end
      if back > 0 then
        h[oh] = h[oh] - back
        changed = true
      end
    end
  end
  if changed then
    local t, nt = tallies(v, nv, A[1] + 1)
    redis.call('HSET', key, 'h', encode(h, nh), 'a', encode(t, nt))
  end
end
return 0
