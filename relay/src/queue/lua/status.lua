-- KEYS: message hash, due set, leased set, ids set
-- ARGV: id
-- Returns envelope, status, final flag, due score, lease expiry, queued (ids score).
local m = redis.call('HMGET', KEYS[1], 'envelope', 'status', 'final')
return {m[1], m[2], m[3],
  redis.call('ZSCORE', KEYS[2], ARGV[1]),
  redis.call('ZSCORE', KEYS[3], ARGV[1]),
  redis.call('ZSCORE', KEYS[4], ARGV[1])}
