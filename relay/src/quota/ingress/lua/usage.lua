-- KEYS: one counter hash per key
-- ARGV: now ('' = Redis TIME), window count, then per window: its tag
-- Returns now, then per key and window: used, resets_at (now when nothing counts)
helpers()
local out = {now}
local nw = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  local v, nv, h, _, A = load(key)
  settle(v, nv, h, A)
  for w = 1, nw do
    local o = find(v, nv, tonumber(ARGV[2 + w]))
    local total, resets = 0, now
    if o then total, resets = used(key, v, o, h) end
    out[#out + 1] = total
    out[#out + 1] = resets
  end
end
return out
