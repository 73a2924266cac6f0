-- Gives back what a granted acquire took in one slot when another slot of the same
-- request refused (Redis Cluster only: see the module doc of redis.rs).
-- KEYS per quota key: flight set, lease set.
-- ARGV: lease id ('' = none), then per key: flight member ('' = none).
-- The GCRA step already taken stays: it only errs slow.
for q = 1, #KEYS / 2 do
  local member = ARGV[q + 1]
  if member ~= '' then
    redis.call('ZREM', KEYS[2 * q - 1], member)
  end
  if ARGV[1] ~= '' then
    redis.call('ZREM', KEYS[2 * q], ARGV[1])
  end
end
return 1
