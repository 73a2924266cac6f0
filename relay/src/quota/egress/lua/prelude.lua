-- Helpers every egress script starts with (each uses some of them): the clock,
-- and reading one window's state.
-- luacheck: push ignore 211
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function window(key, W, N)
  local g = math.floor(W / 60)
  if g < 1 then g = 1 end
  local b = math.ceil(N / 10)
  if b < 1 then b = 1 end
  if b > 10 then b = 10 end
  return {key = key, W = W, N = N, g = g, b = b}
end
local function first_counted(w, t)
  local d = t - w.W
  if d < 0 then d = 0 end
  return math.floor(d / w.g)
end
-- Units ending at `at`; the hash lives at least until that bucket leaves the window.
local function charge(wins, at, cost, now)
  for _, w in ipairs(wins) do
    redis.call('HINCRBY', w.key, tostring(math.floor(at / w.g)), cost)
    local keep = at - now
    if keep < 0 then keep = 0 end
    keep = keep + w.W + w.g + 1000
    if redis.call('PTTL', w.key) < keep then
      redis.call('PEXPIRE', w.key, keep)
    end
  end
end
local function cost_of(member)
  local c = string.match(member, '|(%d+)$')
  return tonumber(c or '1')
end
-- Commit (if any), then expired flights charged at their deadline, then buckets no
-- grant can count any more dropped. Returns units still in flight.
local function sweep(flight, wins, now, commit_member, commit_cost, commit_end)
  if commit_member then
    redis.call('ZREM', flight, commit_member)
    charge(wins, commit_end, commit_cost, now)
  end
  local expired = redis.call('ZRANGEBYSCORE', flight, '-inf', now, 'WITHSCORES')
  for i = 1, #expired, 2 do
    redis.call('ZREM', flight, expired[i])
    charge(wins, tonumber(expired[i + 1]), cost_of(expired[i]), now)
  end
  for _, w in ipairs(wins) do
    local h = redis.call('HGETALL', w.key)
    local first = first_counted(w, now)
    w.tat = 0
    w.buckets = {}
    for i = 1, #h, 2 do
      if h[i] == 'tat' then
        w.tat = tonumber(h[i + 1])
      else
        local b = tonumber(h[i])
        if b < first then
          redis.call('HDEL', w.key, h[i])
        else
          table.insert(w.buckets, {b, tonumber(h[i + 1])})
        end
      end
    end
    table.sort(w.buckets, function(x, y) return x[1] < y[1] end)
  end
  local units = 0
  for _, m in ipairs(redis.call('ZRANGE', flight, 0, -1)) do
    units = units + cost_of(m)
  end
  return units
end
-- luacheck: pop
