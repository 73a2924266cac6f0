-- KEYS[1]: key index of the quota.
-- ARGV: now, key prefix (through the hash tag and ':'), quota, key ('' = all), keys
-- to scan at most, number of windows, then per window: window ms, limit; then the
-- flight ttl.
-- Returns now, then per key: key, open connections, units scheduled (granted for a
-- later time: deadline beyond now + flight ttl), then per window used, resets.
local now = clock(ARGV[1])
local prefix, quota, only, scan, nwin = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local keys
if only ~= '' then
  keys = {only}
else
  keys = redis.call('ZREVRANGE', KEYS[1], 0, scan - 1)
end
local out = {now}
for _, k in ipairs(keys) do
  local wins = {}
  for w = 1, nwin do
    local W = tonumber(ARGV[5 + 2 * w])
    wins[w] = window(prefix .. 'w:' .. quota .. ':' .. W .. ':' .. k, W, tonumber(ARGV[6 + 2 * w]))
  end
  local units = 0
  if nwin > 0 then
    units = sweep(prefix .. 'f:' .. quota .. ':' .. k, wins, now, nil, 0, 0)
  end
  local conns = redis.call('ZCOUNT', prefix .. 'c:' .. quota .. ':' .. k, '(' .. now, '+inf')
  local scheduled = 0
  local ttl = tonumber(ARGV[7 + 2 * nwin])
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', prefix .. 'f:' .. quota .. ':' .. k, '(' .. (now + ttl), '+inf')) do
    scheduled = scheduled + cost_of(m)
  end
  table.insert(out, k)
  table.insert(out, conns)
  table.insert(out, scheduled)
  for _, w in ipairs(wins) do
    local first = first_counted(w, now)
    local used = units
    local resets = now
    local oldest = nil
    for _, bc in ipairs(w.buckets) do
      if bc[1] >= first then
        used = used + bc[2]
        if not oldest then oldest = bc[1] end
      end
    end
    if oldest then resets = (oldest + 1) * w.g + w.W end
    table.insert(out, used)
    table.insert(out, resets)
  end
end
return out
