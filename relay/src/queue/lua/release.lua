-- KEYS: due set, leased set, ids set
-- ARGV: message key prefix, then id, token and due score (ms) triples
local n = 0
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  if redis.call('HGET', key, 'lease') == ARGV[i + 1] and redis.call('ZSCORE', KEYS[3], id) then
    -- Not in the leased set means swept back to due already: leave it there.
    if redis.call('ZREM', KEYS[2], id) == 1 then
      redis.call('ZADD', KEYS[1], ARGV[i + 2], id)
    end
    redis.call('HDEL', key, 'lease')
    n = n + 1
  end
end
return n
