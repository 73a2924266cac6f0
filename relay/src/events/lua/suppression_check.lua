-- Is an address on any of the given suppression lists?
-- KEYS: zset of each list to look at, in order (the tenant's, then the global one)
-- ARGV[1]: the address (lower case)
-- Returns the 1-based index of the first list that holds it unexpired, else 0.
-- Read-only: expired members are dropped by the next add or list of that list.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  local s = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if s and tonumber(s) > now then
    return i
  end
end
return 0
