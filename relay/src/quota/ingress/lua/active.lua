-- KEYS: the key index
-- ARGV: now ('' = Redis TIME), counter hash prefix (up to the key), the window's
--   tag, most keys to look at
-- Returns key, used pairs for keys with units of the quota counted in the window,
-- from the ones charged last. The hash keys are built here: they share the
-- index's hash tag, so its slot.
helpers()
local q = tonumber(ARGV[3])
local members = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. now,
  'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, m in ipairs(members) do
  local key = ARGV[2] .. m
  local v, nv, h, _, A = load(key)
  settle(v, nv, h, A)
  local o = find(v, nv, q)
  if o then
    local total = used(key, v, o, h)
    if total > 0 then
      out[#out + 1] = m
      out[#out + 1] = total
    end
  end
end
return out
