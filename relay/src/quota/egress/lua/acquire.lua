-- KEYS[1]: back-off hash of the site; KEYS[2]: its response-rule states (hash:
-- scope field -> 'until|s or t|limits|rule|reply', see shaping::State); per quota key: flight set, lease set, key
-- index, then one hash per window.
-- ARGV: now ('' = TIME), max wait, flight ttl, lease ttl, token ('' = none),
-- commit token ('' = none), commit end, lease id ('' = none), back-off base,
-- back-off recover, number of keys; per key: key name, max connections (0 = none),
-- cost (0: the message does not count there, e.g. a tenant throttle's key for
-- another tenant's message), commit cost, number of windows, then per window: window ms, limit.
-- Returns {verdict, at, now, level, then field, value of every live rule state}:
-- 0 granted, 1 later, 2 backed off, 3 blocked, 4 no connection.
local now = clock(ARGV[1])
local max_wait = tonumber(ARGV[2])
local flight_ttl = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[4])
local token = ARGV[5]
local commit = ARGV[6]
local commit_end = tonumber(ARGV[7])
local lease = ARGV[8]
local bo_base = tonumber(ARGV[9])
local bo_recover = tonumber(ARGV[10])
local nkeys = tonumber(ARGV[11])

local qs = {}
local ki, ai = 3, 12
for q = 1, nkeys do
  local e = {flight = KEYS[ki], conns = KEYS[ki + 1], index = KEYS[ki + 2], name = ARGV[ai],
    maxc = tonumber(ARGV[ai + 1]), cost = tonumber(ARGV[ai + 2]), ccost = tonumber(ARGV[ai + 3]),
    wins = {}, maxw = 0}
  local nwin = tonumber(ARGV[ai + 4])
  ki = ki + 3
  ai = ai + 5
  for w = 1, nwin do
    local W = tonumber(ARGV[ai])
    e.wins[w] = window(KEYS[ki], W, tonumber(ARGV[ai + 1]))
    if W > e.maxw then e.maxw = W end
    ki = ki + 1
    ai = ai + 2
  end
  qs[q] = e
end

for _, e in ipairs(qs) do
  if #e.wins > 0 then
    local cm = nil
    if commit ~= '' then cm = commit .. '|' .. e.ccost end
    e.units = sweep(e.flight, e.wins, now, cm, e.ccost, commit_end)
  end
end

local bo = redis.call('HMGET', KEYS[1], 'level', 'hit')
local level = tonumber(bo[1] or '0')
local hit = tonumber(bo[2] or '0')
local until_ = 0
local eff = level
if level > 0 then
  until_ = hit + bo_base * 2 ^ math.min(level - 1, 30)
  if now >= until_ then
    local r = bo_recover
    if r < 1 then r = 1 end
    eff = level - math.floor((now - until_) / r)
    if eff < 0 then eff = 0 end
  end
end
-- Response-rule states: expired ones go; a site-wide suspension pauses like a
-- back-off, a site-wide throttle pauses, then slows the pacing; the rest goes back to the
-- relay, which applies tenant scopes per message.
local live = {}
local slow = 1
local sh = redis.call('HGETALL', KEYS[2])
for i = 1, #sh, 2 do
  local u, a, f = string.match(sh[i + 1], '^(%d+)|(%a)|([^|]*)|')
  u = tonumber(u or '0')
  if u <= now then
    redis.call('HDEL', KEYS[2], sh[i])
  else
    table.insert(live, sh[i])
    table.insert(live, sh[i + 1])
    if sh[i] == '*' then
      -- f: the factor, or 'factor;rate;max conns;duration;pause' (the relay paces
      -- rates and caps connections through keys of their own).
      local x = tonumber(string.match(f, '^[^;]*'))
      local dur, pause = string.match(f, '^[^;]*;[^;]*;[^;]*;(%d*);(%d*)')
      if a == 's' and u > until_ then
        until_ = u
      elseif a == 't' then
        if x and x > 0 and x < 1 and 1 / x > slow then
          slow = 1 / x
        end
        -- A throttle starts with a pause.
        pause = tonumber(pause or '')
        if pause and pause > 0 then
          local pe = u - tonumber(dur or '0') + pause
          if pe > u then pe = u end
          if pe > until_ then until_ = pe end
        end
      end
    end
  end
end
local function answer(code, at_)
  local r = {code, at_, now, eff}
  for _, v in ipairs(live) do table.insert(r, v) end
  return r
end

if until_ > now and until_ - now > max_wait then
  return answer(2, until_)
end

if lease ~= '' then
  for _, e in ipairs(qs) do
    if e.maxc > 0 then
      redis.call('ZREMRANGEBYSCORE', e.conns, '-inf', now)
      if not redis.call('ZSCORE', e.conns, lease) and redis.call('ZCARD', e.conns) >= e.maxc then
        return answer(4, 0)
      end
    end
  end
end

local at = now
if until_ > at then at = until_ end
if token ~= '' then
  local factor = 2 ^ math.min(eff, 30) * slow
  for _, e in ipairs(qs) do
    if #e.wins > 0 and e.cost > 0 then
      for _, w in ipairs(e.wins) do
        w.T = w.W * factor / w.N
        if w.tat > 0 then
          local tau = (w.b - 1) * w.T
          local need = w.tat - tau + (e.cost - 1) * w.T
          if w.tat < need then need = w.tat end
          if need > at then at = math.ceil(need) end
        end
      end
    end
  end
  for _, e in ipairs(qs) do
    if #e.wins > 0 and e.cost > 0 then
      for _, w in ipairs(e.wins) do
        local room = w.N - e.cost
        if room < 0 then room = 0 end
        if e.units > room then
          return answer(3, 0)
        end
        local first = first_counted(w, at)
        local total = e.units
        for _, bc in ipairs(w.buckets) do
          if bc[1] >= first then total = total + bc[2] end
        end
        for _, bc in ipairs(w.buckets) do
          if total <= room then break end
          if bc[1] >= first then
            total = total - bc[2]
            local t = (bc[1] + 1) * w.g + w.W
            if t > at then at = t end
          end
        end
      end
    end
  end
  if at - now > max_wait then
    return answer(1, at)
  end
  for _, e in ipairs(qs) do
    if #e.wins > 0 and e.cost > 0 then
      for _, w in ipairs(e.wins) do
        local base = w.tat
        if at > base then base = at end
        local tat = math.ceil(base + e.cost * w.T)
        redis.call('HSET', w.key, 'tat', tat)
        redis.call('PEXPIRE', w.key, math.max(tat - now, 0) + w.W + flight_ttl + max_wait + 1000)
      end
      redis.call('ZADD', e.flight, at + flight_ttl, token .. '|' .. e.cost)
      redis.call('PEXPIRE', e.flight, flight_ttl + max_wait + e.maxw + 1000)
    end
  end
end

for _, e in ipairs(qs) do
  if lease ~= '' and e.maxc > 0 then
    redis.call('ZADD', e.conns, now + lease_ttl, lease)
    redis.call('PEXPIRE', e.conns, lease_ttl + 1000)
  end
  redis.call('ZADD', e.index, now, e.name)
  redis.call('PEXPIRE', e.index, e.maxw + flight_ttl + 3600000)
end
return answer(0, at)
