-- KEYS: ids set, due set, leased set
-- ARGV: message key prefix, lexical start ('-' or '(<last id>'), count
-- Returns id, envelope, status, due score, lease expiry per queued message.
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], '+', 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local m = redis.call('HMGET', ARGV[1] .. id, 'envelope', 'status')
  table.insert(out, id)
  table.insert(out, m[1])
  table.insert(out, m[2])
  table.insert(out, redis.call('ZSCORE', KEYS[2], id))
  table.insert(out, redis.call('ZSCORE', KEYS[3], id))
end
return out
