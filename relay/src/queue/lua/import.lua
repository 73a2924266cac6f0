-- Upgrade from the old layout: stores a message `legacy_take.lua` took, unless
-- this layout has it already (queued, or final: a move that stopped between this
-- script and `legacy_forget.lua` is being done again), so it is delivered once.
-- KEYS: message, due set, stats hash, later set, status, final record
-- ARGV: id, stored value, body length, due score, "<attempts>:<status JSON>" or ''
-- Returns 1 stored, 0 already here.
if redis.call('EXISTS', KEYS[1], KEYS[6]) > 0 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
-- Its due score may not be its arrival: `later` keeps it findable for the oldest age.
redis.call('ZADD', KEYS[4], 0, ARGV[1])
redis.call('HINCRBY', KEYS[3], 'messages', 1)
redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[5])
  if tonumber(string.match(ARGV[5], '^(%d+):')) > 0 then
    redis.call('HINCRBY', KEYS[3], 'deferred', 1)
  end
end
return 1
