-- KEYS per quota key: flight set, lease set, then one hash per window.
-- ARGV: now, lease id ('' = none), commit token ('' = none), commit end, number of
-- keys; per key: commit cost, number of windows, then per window: window ms, limit.
local now = clock(ARGV[1])
local lease, commit, commit_end = ARGV[2], ARGV[3], tonumber(ARGV[4])
local ki, ai = 1, 6
for _ = 1, tonumber(ARGV[5]) do
  local flight, conns = KEYS[ki], KEYS[ki + 1]
  local ccost, nwin = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
  ki = ki + 2
  ai = ai + 2
  local wins = {}
  for w = 1, nwin do
    wins[w] = window(KEYS[ki], tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]))
    ki = ki + 1
    ai = ai + 2
  end
  if commit ~= '' and nwin > 0 then
    redis.call('ZREM', flight, commit .. '|' .. ccost)
    charge(wins, commit_end, ccost, now)
  end
  if lease ~= '' then
    redis.call('ZREM', conns, lease)
  end
end
return 1
