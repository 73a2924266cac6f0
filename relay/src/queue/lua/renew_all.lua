-- KEYS: due set, leased set, lease hash
-- ARGV: new expiry, then id and token pairs
-- Returns the ids whose lease was lost.
local lost = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[i + 1] then
    -- Also reclaims a lease swept back to due but not taken, as RENEW does.
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], ARGV[1], id)
  else
    table.insert(lost, id)
  end
end
return lost
