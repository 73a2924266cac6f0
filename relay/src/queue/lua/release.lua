-- KEYS: due set, leased set, lease hash, later set
-- ARGV: id, token and due score (ms) triples
local n = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[i + 1] then
    -- Not in the leased set means swept back to due already: leave it there.
    if redis.call('ZREM', KEYS[2], id) == 1 then
      redis.call('ZADD', KEYS[1], ARGV[i + 2], id)
      redis.call('ZADD', KEYS[4], 0, id)
    end
    redis.call('HDEL', KEYS[3], id)
    n = n + 1
  end
end
return n
