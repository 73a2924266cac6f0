-- What every quota script starts with (each uses some of it): the clock, the
-- packed state of a key, and the helpers.
-- luacheck: push ignore 211 231
local tonumber, floor, min, sub = tonumber, math.floor, math.min, string.sub
local now
if ARGV[A0 + 1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[A0 + 1])
end
local pack, unpack4 = struct.pack, struct.unpack
-- A key's state is three fields of its hash, each little-endian doubles (exact for
-- integers below 2^53):
-- `k`, what changes at most once a bucket: the time the hash's expiry and index
--   entry are good until, then per window REC: its tag (quota, window and bucket
--   length), window ms, bucket ms, when the lowest bucket kept stops counting, when
--   the latest bucket ends (times that stand for the bucket indexes lo,
--   (lo + 1) * b + W - 1, and cb, (cb + 1) * b, so the common path compares instead
--   of dividing), its quota's id;
-- `h`, per window HOT (same order): total counted, units in the latest bucket, as
--   of the last time `k` or `h` was written;
-- `a`, a version of `k` and `h` (a new one whenever either is written), then per
--   quota of `k` (in order of first appearance) its tally: units charged to every
--   window of the quota since. A check by a caller that remembers `k` and `h` of
--   that version, within times when no window needs a new bucket, reads and writes
--   only `a`: one number per quota.
local REC, HOT = 6, 2
-- Values one struct call handles: results go through Lua's C stack (8000 slots).
local CHUNK = 4000
local function fmt(n) return sub(DS, 1, n + 1) end
local function doubles(blob)
  local n = #blob / 8
  if n <= CHUNK then return {unpack4(fmt(n), blob)}, n end
  local v, got, pos = {}, 0, 1
  while got < n do
    local m = min(n - got, CHUNK)
    local part = {unpack4(fmt(m), blob, pos)}
    for i = 1, m do v[got + i] = part[i] end
    got, pos = got + m, part[m + 1]
  end
  return v, n
end
local function encode(v, n)
  if n <= CHUNK then return pack(fmt(n), unpack(v, 1, n)) end
  local parts = {}
  for i = 1, n, CHUNK do
    local j = min(n, i + CHUNK - 1)
    parts[#parts + 1] = pack(fmt(j - i + 1), unpack(v, i, j))
  end
  return table.concat(parts)
end
-- A key's state whole: records v (length nv), totals h (length nh), version and
-- tallies A (length nA), and `k` and `h` as stored. A new key's versions start from the
-- clock, so that a relay's memory of a key that expired since never matches.
local function load(key)
  local r = redis.call('HMGET', key, 'k', 'h', 'a')
  if not r[1] then return {0}, 1, {}, 0, {now * 1024}, 1, nil, nil end
  local v, nv = doubles(r[1])
  local h, nh = doubles(r[2] or '')
  local A, nA = doubles(r[3] or pack('<d', now * 1024))
  if nv % 1 ~= 0 or (nv - 1) % REC ~= 0 or nh ~= (nv - 1) / REC * HOT then
    error('mailrelay: quota state of ' .. key .. ' does not add up')
  end
  return v, nv, h, nh, A, nA, r[1], r[2]
end
-- Helpers off the common path, made on first use: each closure made costs on
-- every call of a script, and this interpreter makes that cost count.
local lower_of, find, hot, lo_of, cb_of, prefix, hdel, live, buckets, frees, used
local settle, tallies
local made = false
local function helpers()
  if made then return end
  made = true
  -- The oldest bucket counted now: the one holding now - W + 1.
  lower_of = function(W, b) return floor((now + 1 - W) / b) end
  -- The offset of the record with tag q in v.
  find = function(v, n, q)
    for o = 2, n, REC do
      if v[o] == q then return o end
    end
    return nil
  end
  -- The offset in h of the totals of the record at o in v.
  hot = function(o) return (o - 2) / REC * HOT + 1 end
  -- The bucket indexes a record's times stand for: lowest kept, latest.
  lo_of = function(v, o) return (v[o + 3] + 1 - v[o + 1]) / v[o + 2] - 1 end
  cb_of = function(v, o) return v[o + 4] / v[o + 2] - 1 end
  -- Adds the tallies A to the totals of every window of their quota (its latest
  -- bucket is where they were charged): h as it would be without tallies. Returns
  -- the place of each quota among the tallies, by quota id.
  settle = function(v, nv, h, A)
    local slot, ns = {}, 0
    for o = 2, nv, REC do
      local q = v[o + 5]
      local s = slot[q]
      if not s then
        ns = ns + 1
        s = ns
        slot[q] = s
      end
      local t = A[s + 1] or 0
      if t ~= 0 then
        local oh = hot(o)
        h[oh], h[oh + 1] = h[oh] + t, h[oh + 1] + t
      end
    end
    return slot
  end
  -- Tallies at zero for the quotas of v, after the version.
  tallies = function(v, nv, version)
    local A, nA, seen = {version}, 1, {}
    for o = 2, nv, REC do
      if not seen[v[o + 5]] then
        seen[v[o + 5]] = true
        nA = nA + 1
        A[nA] = 0
      end
    end
    return A, nA
  end
  -- Older buckets are fields of their own, `<tag>:<bucket>`.
  prefix = function(q) return q .. ':' end
  hdel = function(key, fields, n)
    for i = 1, n, CHUNK do redis.call('HDEL', key, unpack(fields, i, min(n, i + CHUNK - 1))) end
  end
  -- The state without the records nothing counts in any more (quotas removed from
  -- the config, or ones the key no longer falls under); their older buckets go too.
  live = function(key, v, nv, h)
    local w, nw, x, nx, old, nold = {v[1]}, 1, {}, 0, {}, 0
    for o = 2, nv, REC do
      if now < v[o + 4] + v[o + 1] - 1 then
        for k = 0, REC - 1 do w[nw + 1 + k] = v[o + k] end
        nw = nw + REC
        local oh = hot(o)
        x[nx + 1], x[nx + 2] = h[oh], h[oh + 1]
        nx = nx + HOT
      else
        local pre = prefix(v[o])
        for j = lo_of(v, o), cb_of(v, o) - 1 do
          nold = nold + 1
          old[nold] = pre .. j
        end
      end
    end
    hdel(key, old, nold)
    return w, nw, x, nx
  end
  -- Units per bucket j = from .. cb: older ones from their fields, cb from the state.
  buckets = function(key, pre, from, cb, cv)
    local fields, n = {}, 0
    for j = from, cb - 1 do
      n = n + 1
      fields[n] = pre .. j
    end
    local vals = {}
    if n > 0 then vals = redis.call('HMGET', key, unpack(fields)) end
    local out = {}
    for i = 1, n do out[i] = tonumber(vals[i]) or 0 end
    if cb >= from then out[n + 1] = cv end
    return out
  end
  -- When `need` units of the record at o will have stopped counting: walks its
  -- buckets from the oldest. -1: never (fewer than `need` are counted).
  frees = function(key, v, o, h, need)
    if need <= 0 then return 0 end
    local W, b, lo = v[o + 1], v[o + 2], lo_of(v, o)
    local acc = 0
    for i, u in ipairs(buckets(key, prefix(v[o]), lo, cb_of(v, o), h[hot(o) + 1])) do
      acc = acc + u
      if u > 0 and acc >= need then return (lo + i) * b + W - 1 end
    end
    return -1
  end
  -- What a window has counted now, and when that first goes down (now if nothing
  -- counts).
  used = function(key, v, o, h)
    local W, b = v[o + 1], v[o + 2]
    local from = math.max(lo_of(v, o), lower_of(W, b))
    local total, resets = 0, nil
    for i, u in ipairs(buckets(key, prefix(v[o]), from, cb_of(v, o), h[hot(o) + 1])) do
      if u > 0 then
        total = total + u
        if not resets then resets = (from + i) * b + W - 1 end
      end
    end
    return total, resets or now
  end
end
-- luacheck: pop
