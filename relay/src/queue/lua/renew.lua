-- KEYS: due set, leased set, lease hash, later set
-- ARGV: id, token, new expiry
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then
  return 0
end
-- Also reclaims a lease swept back to due but not taken: the token says nobody
-- has. (Its `later` entry stays: harmless, `later` only widens the oldest search.)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
