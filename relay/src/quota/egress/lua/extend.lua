-- KEYS per quota key: flight set, lease set.
-- ARGV: now, lease id ('' = none), lease ttl, flight ttl, number of keys; per key:
-- max connections (0 = none), flight member ('' = none), longest window ms.
-- Returns the number of leases still held.
local now = clock(ARGV[1])
local lease, lease_ttl, flight_ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local held = 0
for q = 1, tonumber(ARGV[5]) do
  local flight, conns = KEYS[2 * q - 1], KEYS[2 * q]
  local maxc, member, maxw = tonumber(ARGV[3 * q + 3]), ARGV[3 * q + 4], tonumber(ARGV[3 * q + 5])
  if lease ~= '' and maxc > 0 then
    local exp = redis.call('ZSCORE', conns, lease)
    -- An expired lease is not revived: another relay may hold its place now.
    if exp and tonumber(exp) > now then
      redis.call('ZADD', conns, now + lease_ttl, lease)
      redis.call('PEXPIRE', conns, lease_ttl + 1000)
      held = held + 1
    end
  end
  if member ~= '' then
    local d = redis.call('ZSCORE', flight, member)
    if d and tonumber(d) < now + flight_ttl then
      redis.call('ZADD', flight, now + flight_ttl, member)
      -- Kept until the flight, charged at its deadline, no longer counts.
      if redis.call('PTTL', flight) < flight_ttl + maxw + 1000 then
        redis.call('PEXPIRE', flight, flight_ttl + maxw + 1000)
      end
    end
  end
end
return held
