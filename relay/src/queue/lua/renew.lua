-- KEYS: message hash, due set, leased set, ids set
-- ARGV: id, token, new expiry
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[2] or not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  return 0
end
-- Also reclaims a lease swept back to due but not taken: the token says nobody has.
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
