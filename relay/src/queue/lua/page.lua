-- KEYS: due set, leased set
-- ARGV: message key prefix, status key prefix, then ids
-- Returns id, envelope, status, due score, lease expiry per id (envelope nil for
-- an id no longer queued).
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  local envelope = false
  local head = redis.call('GETRANGE', key, 0, 1023)
  if head ~= '' then
    local env_len, _, hl = string.match(head, '^(%d+):(%d+):()')
    env_len = tonumber(env_len)
    envelope = string.sub(head, hl, hl + env_len - 1)
    if #envelope < env_len then
      envelope = redis.call('GETRANGE', key, hl - 1, hl + env_len - 2)
    end
  end
  table.insert(out, id)
  table.insert(out, envelope)
  table.insert(out, redis.call('GET', ARGV[2] .. id))
  table.insert(out, redis.call('ZSCORE', KEYS[1], id))
  table.insert(out, redis.call('ZSCORE', KEYS[2], id))
end
return out
