-- KEYS: due set, leased set, lease hash, later set, then per id its message key
-- ARGV: token, then ids
-- Drops the leases (taken by lease.lua with `token`) of messages whose stored
-- value was gone when the leasing relay read it: a schedule entry without its
-- message is debris, and would otherwise come back at every lease expiry. Only
-- while the lease is still ours and the value still absent: a message removed
-- meanwhile has no lease left, and one stored again under its id (a replacing
-- enqueue) dropped our lease and is due again.
-- Returns how many were dropped.
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[1] and redis.call('EXISTS', KEYS[i + 3]) == 0 then
    -- In `due` if our lease ran out and was swept back meanwhile.
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    n = n + 1
  end
end
return n
