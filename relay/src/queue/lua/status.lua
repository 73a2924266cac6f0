-- KEYS: message, due set, leased set, status, final record
-- ARGV: id
-- Returns envelope, status (with its "<attempts>:" prefix), final record, due
-- score, lease expiry: the first two for a queued message, the third for a
-- final one.
local head = redis.call('GETRANGE', KEYS[1], 0, 1023)
if head == '' then
  return {false, false, redis.call('GET', KEYS[5]), false, false}
end
local env_len, _, hl = string.match(head, '^(%d+):(%d+):()')
env_len = tonumber(env_len)
local envelope = string.sub(head, hl, hl + env_len - 1)
if #envelope < env_len then
  envelope = redis.call('GETRANGE', KEYS[1], hl - 1, hl + env_len - 2)
end
return {envelope, redis.call('GET', KEYS[4]), false,
  redis.call('ZSCORE', KEYS[2], ARGV[1]),
  redis.call('ZSCORE', KEYS[3], ARGV[1])}
