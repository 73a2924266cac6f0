-- The lease of a webhook endpoint's consumer: only its holder reads the stream, so
-- one relay posts an endpoint's events, in order.
-- KEYS[1]: the lease key
-- ARGV[1]: this consumer's owner name; ARGV[2]: the lease length (ms)
-- Takes the lease if free, or renews it if ours: 1 when held after the call.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
