-- KEYS: due set, leased set, ids set
-- ARGV: new expiry, message key prefix, then id and token pairs
-- Returns the ids whose lease was lost.
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', ARGV[2] .. id, 'lease') == ARGV[i + 1] and redis.call('ZSCORE', KEYS[3], id) then
    -- Also reclaims a lease swept back to due but not taken, as RENEW does.
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], ARGV[1], id)
  else
    table.insert(lost, id)
  end
end
return lost
