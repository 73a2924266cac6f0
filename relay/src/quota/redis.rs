//! Quota counters in Redis, shared by every relay process on the same Redis: the
//! sliding window of [`super::window`], in Lua.
//!
//! # One round trip per message
//!
//! [`CHARGE_LUA`] checks every window of every quota a message falls under and, only
//! if all fit, charges them all: one `EVALSHA`, atomic, whatever the number of
//! quotas. With a standalone Redis it runs inside the queue's enqueue script
//! ([`RedisCounters::with_queue`]): checking, charging and storing a message is then
//! one round trip, the same as storing it without quotas, and a message is charged
//! if and only if it is stored. (In Redis Cluster the counters and the message are
//! in different slots: the check is its own round trip before the enqueue.)
//!
//! The clock is Redis `TIME`, so relays with skewed clocks still share one window.
//! Plain Redis (no modules), 5.0 or later (scripts that read `TIME` before writing
//! need effects replication, the default since 5.0).
//!
//! # Keys
//!
//! With `key_prefix: mr`, every quota key carries the hash tag `{mr:quota}`:
//!
//! | key                      | type       | content                                              |
//! |--------------------------|------------|------------------------------------------------------|
//! | `mr:{mr:quota}:c:<key>`  | hash       | every counter of one key (a sender, an AUTH user, `*` for shared quotas), see below |
//! | `mr:{mr:quota}:keys`     | sorted set | the keys, scored by when their counters all go stale (for the usage API) |
//!
//! A key's hash holds its state in two fields of little-endian doubles, one record
//! per quota window in the same order (see [`COMMON_LUA`]): `k` holds what changes
//! at most once a bucket (the window's tag, [`window_tag`], a hash of the quota's
//! name and window; its window and bucket length; when its lowest bucket kept
//! stops counting and when its latest bucket ends), `h` what every charge changes
//! (the total counted, the units in the latest bucket). Each older bucket that
//! still holds units is a field of its own, `<tag>:<bucket index>`
//! ([`bucket_field`]). A check of every window of every quota of a key reads two
//! fields and writes one; Lua unpacks and packs each in one C call, and the common
//! path of a window is a few comparisons and additions on its record in place.
//! Redis' Lua is slow per instruction and per value moved, so that is what the
//! cost of a quota comes down to (`bench/quota.sh`).
//!
//! All quotas of one key share a hash, so checking ten quotas of a sender is a
//! handful of hash commands, not ten times that. One hash tag for all quota keys puts
//! them in one Redis Cluster slot, so one script can charge quotas of different keys
//! (sender, AUTH user, shared) atomically; the price is that all quota counters live
//! on one cluster node, which serves tens of thousands of such checks a second, while
//! the queue itself stays spread over all nodes.
//!
//! A hash expires by itself a little over one window plus one bucket (of its
//! longest window) after its last charge, when every bucket has stopped counting;
//! index entries are dropped once stale, and the index expires like the
//! longest-lived hash. Expiry and index are refreshed only when the time they are
//! good until (kept in the state) comes within a window of now, about sixteen times
//! per window, not on every charge. The state of a window nothing counts in any
//! more (a quota removed from the config, or one the key no longer falls under) is
//! dropped, with its older buckets, the next time the key is charged.
//!
//! Counters written by versions before this layout (a field per quota window) are
//! not read: upgrading starts every window afresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis::Script;

use super::store::{
    ChargeOutcome, ChargeRequest, CounterStore, CounterUsage, MAX_KEYS_SCANNED, StoreError,
    StoreFuture, UsageReport,
};
use super::window::{WindowCheck, WindowSpec};
use crate::queue::QueuedMessage;
use crate::queue::redis::{EnqueueGuard, RedisQueue, SharedRedis};

/// Helpers shared by the scripts (prepended to each). The including code defines
/// `A0`, the offset of the script's own arguments in `ARGV` (non-zero when the check
/// rides in the enqueue script, after the enqueue's arguments), and `DS`, a struct
/// format of [`FORMAT_DOUBLES`] doubles (a constant of the script: building one per
/// call costs more than the window arithmetic).
///
/// Costs in this interpreter (Redis' Lua 5.1 with its hooks) are what shaped the
/// scripts: a VM instruction is tens of machine instructions, each value through
/// `struct` a few hundred, a table that grows rehashes. So a window's state is one
/// record in one packed string per key, the common path of a window is a handful of
/// instructions on that record in place, and the reply reuses the packed state.
const COMMON_LUA: &str = r#"
local tonumber, floor, min, sub = tonumber, math.floor, math.min, string.sub
local now
if ARGV[A0 + 1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[A0 + 1])
end
local pack, unpack4 = struct.pack, struct.unpack
-- A key's state is two fields of its hash, both little-endian doubles (exact for
-- integers below 2^53), one record per quota window in the same order:
-- `k`, what changes at most once a bucket: the time the hash's expiry and index
--   entry are good until, then per window REC: its tag (quota, window and bucket
--   length), window ms, bucket ms, when the lowest bucket kept stops counting,
--   when the latest bucket ends (times that stand for the bucket indexes lo,
--   (lo + 1) * b + W - 1, and cb, (cb + 1) * b, so the common path compares
--   instead of dividing);
-- `h`, what changes with every charge: the version of `k` (a new one whenever `k`
--   is written: a relay that remembers `k` of that version checks and charges
--   without reading it), then per window HOT: total counted, units in the latest
--   bucket.
local REC, HOT = 5, 2
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
local function check(key, nv, nh)
  if nv % 1 ~= 0 or (nv - 1) % REC ~= 0 or nh ~= (nv - 1) / REC * HOT + 1 then
    error('mailrelay: quota state of ' .. key .. ' does not add up')
  end
end
-- A key's state: records v (length nv), totals h (length nh), and `k` as stored.
-- A new key's `k` versions start from the clock, so that a relay's memory of a
-- key that expired since never matches its successor.
local function load(key)
  local r = redis.call('HMGET', key, 'k', 'h')
  if not r[1] then return {0}, 1, {now * 1024}, 1, nil end
  local v, nv = doubles(r[1])
  local h, nh = doubles(r[2] or '')
  check(key, nv, nh)
  return v, nv, h, nh, r[1]
end
-- Helpers off the common path, made on first use: each closure made costs on
-- every call of a script, and this interpreter makes that cost count.
local lower_of, find, hot, lo_of, cb_of, prefix, hdel, live, buckets, frees, used
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
  hot = function(o) return (o - 2) / REC * HOT + 2 end
  -- The bucket indexes a record's times stand for: lowest kept, latest.
  lo_of = function(v, o) return (v[o + 3] + 1 - v[o + 1]) / v[o + 2] - 1 end
  cb_of = function(v, o) return v[o + 4] / v[o + 2] - 1 end
  -- Older buckets are fields of their own, `<tag>:<bucket>`.
  prefix = function(q) return q .. ':' end
  hdel = function(key, fields, n)
    for i = 1, n, CHUNK do redis.call('HDEL', key, unpack(fields, i, min(n, i + CHUNK - 1))) end
  end
  -- The state without the records nothing counts in any more (quotas removed from
  -- the config, or ones the key no longer falls under); their older buckets go too.
  live = function(key, v, nv, h)
    local w, nw, x, nx, old, nold = {v[1]}, 1, {h[1]}, 1, {}, 0
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
"#;

/// Check and charge, as the body of `local function guard(KEYS, ARGV, K0, A0)`
/// (its keys from `KEYS[K0 + 1]`, its arguments from `ARGV[A0 + 1]`), so that it
/// can run alone or before an enqueue in the same call: see [`RedisCounters`]. The
/// Rust twin is [`super::window::WindowState`].
pub const CHARGE_LUA: &str = r#"
-- KEYS: one counter hash per key group, then the key index (the last key)
-- ARGV: now ('' = Redis TIME), then two lists of doubles, each as its struct format
--   and its bytes: the numbers of the check (group count, then per group: ttl ms,
--   request count, the version of `k` the caller remembers (0: none) and the
--   times from and until which that `k` needs no change here, then per request:
--   cost, window count, then per window: tag, limit, offset of its totals in `h`
--   of that version), and per window its window ms and bucket ms (read only for a
--   window the key has no record of). Then per group its key (the index member).
-- A group whose `k` the caller remembers, checked within those times, is checked
--   and charged from `h` alone: every window's latest bucket is current, none has
--   a bucket to drop, the expiry needs no push.
-- Returns whether all fit, and little-endian doubles, either
--   1, allowed (1/0), now, then per group, request and window: used, retry_at (0
--   fits, -1 never), free_at (0 when a unit is free); or, when all fit and every
--   window still has a unit free (retry_at and free_at all 0),
--   2, now, then per group: the lengths of its `k` (0: the version remembered) and
--   `h`, then `k` and `h` as stored (a window's used count is its total in `h`).
local index = KEYS[#KEYS]
local N = {unpack4(ARGV[A0 + 2], ARGV[A0 + 3])}
local S
-- Per group: records and their length, totals and their length, whether `k`
-- changed, `k` as stored, ttl, whether checked from `h` alone.
local G = {}
-- Windows whose record is not where the previous window's ended (by window
-- number, across all groups); those that did not fit; those whose charge started
-- a bucket (what it replaced) or went to an earlier one (Redis TIME went back).
local jump, over, moved = nil, nil, nil
-- Bucket fields to write once all fit: key, field, units, whether to add.
local fin, nfin = nil, 0
-- Windows are checked and charged in one pass (each pass over the windows costs);
-- if one does not fit, the charges before it are taken back, in memory.
local allowed, full, charged = true, false, 0
local n, p = 0, 2
for g = 1, N[1] do
  local key = KEYS[K0 + g]
  local ttl, nreq, kver = N[p], N[p + 1], N[p + 2]
  local fast = kver > 0 and now >= N[p + 3] and now < N[p + 4]
  p = p + 5
  local v, nv, h, nh, kb
  if fast then
    local hb = redis.call('HGET', key, 'h')
    if hb then h, nh = doubles(hb) end
    fast = hb and h[1] == kver
  end
  if not fast then v, nv, h, nh, kb = load(key) end
  local cold = not fast and kb == nil
  -- Records are kept in the order of the last check, so a window's record is
  -- usually where the previous one's ended.
  local o, oh = 2, 2
  for r = 1, fast and nreq or 0 do
    -- From the counts alone: every bucket current, none to drop (see above). The
    -- loop most checks run, so as few steps as it takes.
    local c, nw = N[p], N[p + 1]
    p = p + 2
    for w = 1, nw do
      n = n + 1
      local lim = N[p + 1]
      oh = N[p + 2]
      local t = h[oh] + c
      if t > lim then
        over = over or {}
        over[n] = true
        allowed = false
      elseif allowed then
        h[oh], h[oh + 1] = t, h[oh + 1] + c
        charged = n
        if t >= lim then full = true end
      end
      p = p + 3
    end
  end
  for r = 1, fast and 0 or nreq do
    local c, nw = N[p], N[p + 1]
    p = p + 2
    for w = 1, nw do
      n = n + 1
      local q, lim = N[p], N[p + 1]
      p = p + 3
      if o >= nv or v[o] ~= q then
        helpers()
        o = find(v, nv, q)
        if not o then
          -- A window the key has no record of (yet, or any more): an empty one,
          -- kept only if the state is written.
          S = S or {unpack4(ARGV[A0 + 4], ARGV[A0 + 5])}
          local Wi, bi = S[2 * n - 1], S[2 * n]
          o = nv + 1
          v[o], v[o + 1], v[o + 2], v[o + 3], v[o + 4] =
            q, Wi, bi, (lower_of(Wi, bi) + 1) * bi + Wi - 1, (floor(now / bi) + 1) * bi
          nv = nv + REC
          h[nh + 1], h[nh + 2] = 0, 0
          nh = nh + HOT
          cold = true
        end
        jump = jump or {}
        jump[n], oh = o, hot(o)
      end
      if now >= v[o + 3] then
        -- The lowest bucket kept stopped counting: drop all that did (older
        -- buckets are fields below the latest one; at most a window's worth).
        helpers()
        cold = true
        local W, b = v[o + 1], v[o + 2]
        local lower, pre, cb = lower_of(W, b), prefix(q), cb_of(v, o)
        local drop, nd = {}, 0
        for j = lo_of(v, o), min(lower, cb) - 1 do
          nd = nd + 1
          drop[nd] = pre .. j
        end
        local t = h[oh]
        for i = 1, nd, CHUNK do
          local part = redis.call('HMGET', key, unpack(drop, i, min(nd, i + CHUNK - 1)))
          for k = 1, #part do
            if part[k] then t = t - tonumber(part[k]) end
          end
        end
        hdel(key, drop, nd)
        if cb < lower then
          t = t - h[oh + 1]
          v[o + 4], h[oh + 1] = (lower + 1) * b, 0
        end
        h[oh], v[o + 3] = t, (lower + 1) * b + W - 1
      end
      local t = h[oh] + c
      if t > lim then
        over = over or {}
        over[n] = true
        allowed = false
      elseif allowed then
        local cbe = v[o + 4]
        if now < cbe and now >= cbe - v[o + 2] then
          h[oh + 1] = h[oh + 1] + c
        else
          helpers()
          moved = moved or {}
          fin = fin or {}
          if now >= cbe then
            -- The latest bucket is finished: it becomes a field of its own.
            moved[n] = {cbe, h[oh + 1]}
            if h[oh + 1] > 0 then
              fin[nfin + 1], fin[nfin + 2], fin[nfin + 3], fin[nfin + 4] =
                key, prefix(q) .. cb_of(v, o), h[oh + 1], false
              nfin = nfin + 4
            end
            local b = v[o + 2]
            v[o + 4], h[oh + 1] = (floor(now / b) + 1) * b, c
            cold = true
          else
            -- Redis TIME went back: charge the earlier bucket's field.
            moved[n] = false
            fin[nfin + 1], fin[nfin + 2], fin[nfin + 3], fin[nfin + 4] =
              key, prefix(q) .. floor(now / v[o + 2]), c, true
            nfin = nfin + 4
          end
        end
        h[oh] = t
        charged = n
        if t >= lim then full = true end
      end
      o, oh = o + REC, oh + HOT
    end
  end
  G[g] = {v, nv, h, nh, cold, kb, ttl, fast}
end

-- Takes back the charges made before a window did not fit.
local function undo()
  n, p = 0, 2
  for g = 1, N[1] do
    local v, h, fast = G[g][1], G[g][3], G[g][8]
    local nreq = N[p + 1]
    p = p + 5
    local o, oh = 2, 2
    for r = 1, nreq do
      local c, nw = N[p], N[p + 1]
      p = p + 2
      for w = 1, nw do
        n = n + 1
        if n > charged then return end
        if fast then
          oh = N[p + 2]
        elseif jump and jump[n] then
          o = jump[n]
          oh = hot(o)
        end
        h[oh] = h[oh] - c
        local m = moved and moved[n]
        if m then
          v[o + 4], h[oh + 1] = m[1], m[2]
        elseif m == nil then
          h[oh + 1] = h[oh + 1] - c
        end
        p = p + 3
        o, oh = o + REC, oh + HOT
      end
    end
  end
end
if not allowed and charged > 0 then
  helpers()
  undo()
end
if not allowed then full = true end

-- Write back.
for i = 1, nfin, 4 do
  if allowed then
    if fin[i + 3] then
      redis.call('HINCRBY', fin[i], fin[i + 1], fin[i + 2])
    else
      redis.call('HSET', fin[i], fin[i + 1], fin[i + 2])
    end
  end
end
local reply = not full and {pack('<dd', 2, now)}
for g = 1, N[1] do
  local key = KEYS[K0 + g]
  local v, nv, h, nh, cold, kb, ttl, fast = unpack(G[g], 1, 8)
  local hb
  if cold then kb = nil end
  if fast then
    if allowed then
      hb = encode(h, nh)
      redis.call('HSET', key, 'h', hb)
    end
    kb, nv = '', 0
  elseif allowed and v[1] < now + ttl then
    -- The hash must outlive its counters: until ttl after this charge. Its expiry
    -- (and index entry) are pushed a sixteenth further than needed, and the time
    -- they are good until is kept in the state, so that most charges skip this;
    -- so does dropping the records nothing counts in any more.
    local keep = ttl + floor(ttl / 16)
    v[1] = now + keep
    helpers()
    v, nv, h, nh = live(key, v, nv, h)
    h[1] = h[1] + 1
    kb, hb = encode(v, nv), encode(h, nh)
    redis.call('HSET', key, 'k', kb, 'h', hb)
    -- Never shorten: the hash may hold longer windows of other quotas.
    if redis.call('PTTL', key) < keep then
      redis.call('PEXPIRE', key, keep)
    end
    local member = ARGV[A0 + 5 + g]
    local old = redis.call('ZSCORE', index, member)
    if not old or tonumber(old) < now + keep then
      redis.call('ZADD', index, now + keep, member)
    end
    if redis.call('PTTL', index) < keep then
      redis.call('PEXPIRE', index, keep)
    end
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  elseif allowed or cold then
    if cold then h[1] = h[1] + 1 end
    hb = encode(h, nh)
    if cold then
      kb = encode(v, nv)
      redis.call('HSET', key, 'k', kb, 'h', hb)
    else
      redis.call('HSET', key, 'h', hb)
    end
  end
  if reply then
    reply[#reply + 1] = pack('<dd', nv, nh)
    reply[#reply + 1] = kb
    reply[#reply + 1] = hb
  end
end
if reply then return true, table.concat(reply) end

-- Somebody is at or over a limit: the caller needs when units free up.
helpers()
local out, no = {1, allowed and 1 or 0, now}, 3
n, p = 0, 2
for g = 1, N[1] do
  local key, v, h, fast = KEYS[K0 + g], G[g][1], G[g][3], G[g][8]
  if fast then
    local nv
    v, nv = doubles(redis.call('HGET', key, 'k'))
    check(key, nv, G[g][4])
  end
  local nreq = N[p + 1]
  p = p + 5
  local o = 2
  for r = 1, nreq do
    local c, nw = N[p], N[p + 1]
    p = p + 2
    for w = 1, nw do
      n = n + 1
      if fast then
        o = (N[p + 2] - 2) / HOT * REC + 2
      else
        o = jump and jump[n] or o
      end
      local t, lim = h[hot(o)], N[p + 1]
      local retry, free = 0, 0
      if over and over[n] then
        if c > lim then retry = -1 else retry = frees(key, v, o, h, t + c - lim) end
      end
      if t >= lim then
        free = frees(key, v, o, h, t + 1 - lim)
        if free < 0 then free = 0 end
      end
      out[no + 1], out[no + 2], out[no + 3] = t, retry, free
      no = no + 3
      p = p + 3
      o = o + REC
    end
  end
end
return allowed, pack(fmt(no), unpack(out, 1, no))
"#;

const REFUND_LUA: &str = r#"
-- KEYS: one counter hash per request
-- ARGV: charge time, then per request: cost, window count, then per window: tag
helpers()
local a = 2
for _, key in ipairs(KEYS) do
  local cost, nw = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local v, nv, h, nh = load(key)
  local changed = false
  for w = 1, nw do
    local q = tonumber(ARGV[a])
    a = a + 1
    local o = find(v, nv, q)
    if o then
      local oh = hot(o)
      local j, back = floor(now / v[o + 2]), 0
      if j == cb_of(v, o) then
        back = min(cost, h[oh + 1])
        h[oh + 1] = h[oh + 1] - back
      else
        local f = prefix(q) .. j
        local c = tonumber(redis.call('HGET', key, f) or '0')
        back = min(cost, c)
        if back == c then
          redis.call('HDEL', key, f)
        elseif back > 0 then
          redis.call('HINCRBY', key, f, -back)
        end
      end
      if back > 0 then
        h[oh] = h[oh] - back
        changed = true
      end
    end
  end
  if changed then redis.call('HSET', key, 'h', encode(h, nh)) end
end
return 0
"#;

const USAGE_LUA: &str = r#"
-- KEYS: one counter hash per key
-- ARGV: now ('' = Redis TIME), window count, then per window: its tag
-- Returns now, then per key and window: used, resets_at (now when nothing counts)
helpers()
local out = {now}
local nw = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  local v, nv, h = load(key)
  for w = 1, nw do
    local o = find(v, nv, tonumber(ARGV[2 + w]))
    local total, resets = 0, now
    if o then total, resets = used(key, v, o, h) end
    out[#out + 1] = total
    out[#out + 1] = resets
  end
end
return out
"#;

const ACTIVE_LUA: &str = r#"
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
  local v, nv, h = load(key)
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
"#;

/// The check as a Lua function `guard(KEYS, ARGV)` returning `allowed, reply`.
fn guard_lua() -> String {
    format!(
        "{}local function guard(KEYS, ARGV, K0, A0)\n{COMMON_LUA}{CHARGE_LUA}\nend\n",
        doubles_lua()
    )
}

/// A script that runs alone: its arguments start at `ARGV[1]`.
fn standalone_lua(body: &str) -> String {
    format!("local A0 = 0\n{}{COMMON_LUA}{body}", doubles_lua())
}

/// Doubles one struct format in the scripts covers (see [`COMMON_LUA`]).
const FORMAT_DOUBLES: usize = 4000;

fn doubles_lua() -> String {
    format!("local DS = '<{}'\n", "d".repeat(FORMAT_DOUBLES))
}

/// Quota windows one check may cover: the script unpacks its numbers (two per
/// window, plus two per request) and packs its reply (three per window) in one C
/// call each, bounded by [`FORMAT_DOUBLES`] and by Lua's C stack (8000 values).
pub const MAX_WINDOWS_PER_CHECK: usize = 1000;

/// The hash tag of every quota key.
fn tag(prefix: &str) -> String {
    format!("{prefix}:{{{prefix}:quota}}")
}

/// The counter hash of one key (every quota and window of it).
pub fn counter_key(prefix: &str, key: &str) -> String {
    format!("{}:c:{key}", tag(prefix))
}

/// The tag of a quota window in Redis: FNV-1a of the quota's name, window and bucket
/// length, cut to 46 bits so that Lua (whose numbers are doubles, printed with 14
/// digits) holds it and prints it exactly. With a thousand quota windows, the chance
/// that two share a tag is below one in ten million.
pub fn window_tag(quota: &str, w: &WindowSpec) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let (window, bucket) = (w.window_ms.to_le_bytes(), w.bucket_ms.to_le_bytes());
    let bytes = quota
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(&window)
        .chain(&bucket);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & ((1 << 46) - 1)
}

/// The field of one older bucket of a quota window in a key's hash.
pub fn bucket_field(quota: &str, w: &WindowSpec, bucket: i64) -> String {
    format!("{}:{bucket}", window_tag(quota, w))
}

/// The index of keys.
pub fn index_key(prefix: &str) -> String {
    format!("{}:keys", tag(prefix))
}

/// The counters in Redis. With the queue at hand ([`RedisCounters::with_queue`], a
/// standalone Redis), a message's check and its enqueue are one atomic script call:
/// one round trip per message, and a message is charged if and only if it is stored.
pub struct RedisCounters {
    redis: SharedRedis,
    charge: Script,
    refund: Script,
    usage: Script,
    active: Script,
    queue: Option<(Arc<RedisQueue>, EnqueueGuard)>,
    /// The `k` of keys this process charged lately, by counter hash: what lets a
    /// check skip reading and unpacking it (see [`CHARGE_LUA`]).
    remembered: Mutex<HashMap<String, Remembered>>,
}

/// A key's `k` as last seen: its version, the time its expiry is good until, and
/// per window: tag, window ms, bucket ms, when its lowest bucket stops counting,
/// when its latest bucket ends.
#[derive(Debug, Clone)]
struct Remembered {
    version: f64,
    sure: f64,
    records: Vec<[f64; STATE_RECORD]>,
}

/// Keys remembered at most; past that the memory starts afresh (a check of a key
/// not remembered is only slower).
const REMEMBERED_MAX: usize = 10_000;

impl std::fmt::Debug for RedisCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCounters")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: String) -> StoreError {
    StoreError::Unavailable(e)
}

impl RedisCounters {
    /// Uses the queue's connection; loads the scripts so that the first check is
    /// already a single round trip.
    pub async fn new(redis: SharedRedis) -> Result<Self, StoreError> {
        let script = |body: &str| Script::new(&standalone_lua(body));
        let store = RedisCounters {
            charge: Script::new(&format!(
                "{}local _, reply = guard(KEYS, ARGV, 0, 0)\nreturn reply\n",
                guard_lua()
            )),
            refund: script(REFUND_LUA),
            usage: script(USAGE_LUA),
            active: script(ACTIVE_LUA),
            redis,
            queue: None,
            remembered: Mutex::new(HashMap::new()),
        };
        for s in [&store.charge, &store.refund, &store.usage, &store.active] {
            store.redis.load(s).await.map_err(unavailable)?;
        }
        Ok(store)
    }

    /// [`RedisCounters::new`] on `queue`'s connection, checking and enqueueing a
    /// message in one call where Redis allows it (not in Redis Cluster, where the
    /// counters and the message live in different slots: there the check is its own
    /// round trip before the enqueue).
    pub async fn with_queue(queue: Arc<RedisQueue>) -> Result<Self, StoreError> {
        let mut store = Self::new(queue.shared()).await?;
        let guard = queue
            .enqueue_guard(&guard_lua())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        store.queue = guard.map(|g| (queue, g));
        Ok(store)
    }

    fn prefix(&self) -> &str {
        self.redis.prefix()
    }
}

fn at_arg(at: Option<u64>) -> String {
    at.map_or_else(String::new, |t| t.to_string())
}

fn int(v: &redis::Value) -> Result<i64, StoreError> {
    match v {
        redis::Value::Int(i) => Ok(*i),
        other => Err(StoreError::Corrupt(format!(
            "expected an integer, got {other:?}"
        ))),
    }
}

/// Requests grouped by key, in order of first appearance: `(key, indexes into the
/// requests)`.
fn groups(reqs: &[ChargeRequest]) -> Vec<(&str, Vec<usize>)> {
    let mut out: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (i, r) in reqs.iter().enumerate() {
        match at.get(r.key.as_str()) {
            Some(&g) => out[g].1.push(i),
            None => {
                at.insert(&r.key, out.len());
                out.push((&r.key, vec![i]));
            }
        }
    }
    out
}

/// A list of numbers for a script, as little-endian doubles (one C call unpacks
/// them all, where text would cost a conversion each).
struct Doubles {
    bytes: Vec<u8>,
}

impl Doubles {
    fn with_capacity(n: usize) -> Self {
        Doubles {
            bytes: Vec::with_capacity(8 * n),
        }
    }

    fn put(&mut self, v: u64) {
        self.put_f64(v as f64);
    }

    fn put_f64(&mut self, v: f64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    /// Its struct format: `<` and a `d` per number.
    fn format(&self) -> String {
        format!("<{}", "d".repeat(self.bytes.len() / 8))
    }
}

/// The keys and arguments of one check (see [`CHARGE_LUA`]).
struct ChargeCall<'r> {
    groups: Vec<(&'r str, Vec<usize>)>,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    /// Per group, for a key whose `k` is remembered: each window's record index.
    remembered: Vec<Option<Vec<usize>>>,
}

impl RedisCounters {
    fn charge_call<'r>(
        &self,
        reqs: &'r [ChargeRequest],
        at: Option<u64>,
    ) -> Result<ChargeCall<'r>, StoreError> {
        let windows: usize = reqs.iter().map(|r| r.windows.len()).sum();
        if windows > MAX_WINDOWS_PER_CHECK {
            return Err(StoreError::Unavailable(format!(
                "one message falls under {windows} quota windows; at most {MAX_WINDOWS_PER_CHECK} can be checked at once"
            )));
        }
        let groups = groups(reqs);
        let mut num = Doubles::with_capacity(1 + 5 * groups.len() + 2 * reqs.len() + 3 * windows);
        let mut shapes = Doubles::with_capacity(2 * windows);
        num.put(groups.len() as u64);
        let mut keys = Vec::with_capacity(groups.len() + 1);
        let mut members: Vec<Vec<u8>> = Vec::with_capacity(groups.len());
        let mut remembered = Vec::with_capacity(groups.len());
        let memory = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        for (key, group) in &groups {
            let ttl = group
                .iter()
                .map(|&i| reqs[i].index_ttl_ms())
                .max()
                .unwrap_or(1);
            let counter = counter_key(self.prefix(), key);
            let fast = memory
                .get(&counter)
                .and_then(|m| fast_path(m, group.iter().map(|&i| &reqs[i]), ttl));
            num.put(ttl);
            num.put(group.len() as u64);
            match &fast {
                Some((m, _, from, until)) => {
                    num.put_f64(m.version);
                    num.put_f64(*from);
                    num.put_f64(*until);
                }
                None => {
                    for _ in 0..3 {
                        num.put(0);
                    }
                }
            }
            keys.push(counter);
            members.push(key.as_bytes().to_vec());
            let mut windows = fast.as_ref().map(|(_, idx, _, _)| idx.iter());
            for &i in group {
                let r = &reqs[i];
                num.put(r.cost);
                num.put(r.windows.len() as u64);
                for w in &r.windows {
                    num.put(window_tag(&r.quota, w));
                    num.put(w.limit);
                    // The offset of the window's totals in `h` (Lua counts from 1,
                    // after the version).
                    let rec = windows.as_mut().and_then(Iterator::next);
                    num.put(rec.map_or(0, |&r| (2 + STATE_HOT * r) as u64));
                    shapes.put(w.window_ms);
                    shapes.put(w.bucket_ms);
                }
            }
            remembered.push(fast.map(|(_, idx, _, _)| idx));
        }
        drop(memory);
        keys.push(index_key(self.prefix()));
        let mut args = Vec::with_capacity(5 + members.len());
        args.push(at_arg(at).into_bytes());
        for list in [num, shapes] {
            args.push(list.format().into_bytes());
            args.push(list.bytes);
        }
        args.extend(members);
        Ok(ChargeCall {
            groups,
            keys,
            args,
            remembered,
        })
    }

    /// Remembers the `k` of the keys a check returned.
    fn remember(&self, call: &ChargeCall<'_>, outcome: &Parsed) {
        if outcome.states.is_empty() {
            return;
        }
        let mut memory = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if memory.len() >= REMEMBERED_MAX {
            memory.clear();
        }
        for (g, state) in outcome.states.iter().enumerate() {
            if let Some(m) = state {
                memory.insert(call.keys[g].clone(), m.clone());
            }
        }
    }
}

/// Whether a check of `reqs` (one key's) can go by the remembered `k` of the key:
/// every window has a record in it. If so, the record index of each window, and
/// the times from and until which the check needs no change to `k` (no bucket to
/// start, none to drop, no expiry to push).
fn fast_path<'m, 'r>(
    m: &'m Remembered,
    reqs: impl Iterator<Item = &'r ChargeRequest>,
    ttl: u64,
) -> Option<(&'m Remembered, Vec<usize>, f64, f64)> {
    let mut idx = Vec::new();
    let (mut from, mut until) = (0f64, m.sure - ttl as f64);
    let mut next = 0;
    for r in reqs {
        for w in &r.windows {
            let tag = window_tag(&r.quota, w) as f64;
            let rec = if m.records.get(next).is_some_and(|rec| rec[0] == tag) {
                next
            } else {
                m.records.iter().position(|rec| rec[0] == tag)?
            };
            next = rec + 1;
            let [_, _, b, lowest_stops, latest_ends] = m.records[rec];
            from = from.max(latest_ends - b);
            until = until.min(lowest_stops).min(latest_ends);
            idx.push(rec);
        }
    }
    (from < until).then_some((m, idx, from, until))
}

/// A check's reply: the outcome, and per group the `k` it returned (to remember).
struct Parsed {
    outcome: ChargeOutcome,
    states: Vec<Option<Remembered>>,
}

/// Reads the packed reply of [`CHARGE_LUA`] back into request order.
fn parse_outcome(
    reqs: &[ChargeRequest],
    call: &ChargeCall<'_>,
    blob: &[u8],
) -> Result<Parsed, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(format!("charge reply: {what}"));
    if !blob.len().is_multiple_of(8) || blob.len() < 16 {
        return Err(corrupt(format!("{} bytes", blob.len())));
    }
    let vals: Vec<f64> = blob
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let int = |v: f64| v as i64;
    let mut checks = vec![Vec::new(); reqs.len()];
    match vals[0] as i64 {
        // Detailed: allowed, now, then used, retry_at, free_at per window.
        1 => {
            let windows: usize = reqs.iter().map(|r| r.windows.len()).sum();
            if vals.len() != 3 + 3 * windows {
                return Err(corrupt(format!(
                    "{} values for {windows} windows",
                    vals.len()
                )));
            }
            let mut it = vals[3..].chunks_exact(3);
            for (_, members) in &call.groups {
                for &i in members {
                    for _ in &reqs[i].windows {
                        let c = it.next().expect("length checked");
                        let retry = int(c[1]);
                        checks[i].push(WindowCheck {
                            used: int(c[0]).max(0) as u64,
                            retry_at: (retry >= 0).then_some(retry as u64),
                            free_at: int(c[2]).max(0) as u64,
                        });
                    }
                }
            }
            let outcome = ChargeOutcome {
                allowed: int(vals[1]) == 1,
                now: int(vals[2]).max(0) as u64,
                checks,
            };
            Ok(Parsed {
                outcome,
                states: Vec::new(),
            })
        }
        // All fit with a unit to spare: now, then each group's `k` (none when the
        // one remembered was used) and `h`.
        2 => {
            let mut at = 2;
            let mut states = Vec::with_capacity(call.groups.len());
            for (g, (_, members)) in call.groups.iter().enumerate() {
                let (nk, nh) = match vals.get(at..at + 2) {
                    Some([k, h]) => (*k as usize, *h as usize),
                    _ => return Err(corrupt(format!("no state lengths at {at}"))),
                };
                let (Some(k), Some(h)) = (
                    vals.get(at + 2..at + 2 + nk),
                    vals.get(at + 2 + nk..at + 2 + nk + nh),
                ) else {
                    return Err(corrupt(format!("state of {nk} + {nh} values at {at}")));
                };
                at += 2 + nk + nh;
                let total = |rec: usize| {
                    h.get(1 + STATE_HOT * rec)
                        .map(|&t| int(t).max(0) as u64)
                        .ok_or_else(|| corrupt(format!("no totals of record {rec}")))
                };
                let push = |checks: &mut Vec<Vec<WindowCheck>>, i: usize, used: u64| {
                    checks[i].push(WindowCheck {
                        used,
                        retry_at: Some(0),
                        free_at: 0,
                    })
                };
                if nk == 0 {
                    // Checked by the remembered `k`: windows at the records it
                    // listed.
                    let idx = call.remembered[g]
                        .as_ref()
                        .ok_or_else(|| corrupt("no state of a key not remembered".into()))?;
                    let mut recs = idx.iter();
                    for &i in members {
                        for _ in &reqs[i].windows {
                            let rec = *recs.next().ok_or_else(|| corrupt("windows".into()))?;
                            push(&mut checks, i, total(rec)?);
                        }
                    }
                    states.push(None);
                    continue;
                }
                let records = (nk - 1) / STATE_RECORD;
                if (nk - 1) % STATE_RECORD != 0 || nh != 1 + STATE_HOT * records {
                    return Err(corrupt(format!("state of {nk} + {nh} values")));
                }
                let recs: Vec<[f64; STATE_RECORD]> = k[1..]
                    .chunks_exact(STATE_RECORD)
                    .map(|c| c.try_into().expect("record length"))
                    .collect();
                // Records come in the order the windows were checked: look where
                // the previous one ended first.
                let mut next = 0;
                for &i in members {
                    let r = &reqs[i];
                    for w in &r.windows {
                        let tag = window_tag(&r.quota, w) as f64;
                        let rec = if recs.get(next).is_some_and(|rec| rec[0] == tag) {
                            next
                        } else {
                            recs.iter()
                                .position(|rec| rec[0] == tag)
                                .ok_or_else(|| corrupt(format!("no record of quota {}", r.quota)))?
                        };
                        next = rec + 1;
                        push(&mut checks, i, total(rec)?);
                    }
                }
                states.push(Some(Remembered {
                    version: h[0],
                    sure: k[0],
                    records: recs,
                }));
            }
            if at != vals.len() {
                return Err(corrupt(format!("{} values, read {at}", vals.len())));
            }
            let outcome = ChargeOutcome {
                allowed: true,
                now: int(vals[1]).max(0) as u64,
                checks,
            };
            Ok(Parsed { outcome, states })
        }
        other => Err(corrupt(format!("kind {other}"))),
    }
}

/// Doubles per window in a key's state: its record in `k` and its totals in `h`
/// (see [`COMMON_LUA`]).
const STATE_RECORD: usize = 5;
const STATE_HOT: usize = 2;

impl CounterStore for RedisCounters {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn check_and_charge<'a>(
        &'a self,
        reqs: &'a [ChargeRequest],
        at: Option<u64>,
    ) -> StoreFuture<'a, ChargeOutcome> {
        Box::pin(async move {
            let call = self.charge_call(reqs, at)?;
            let mut inv = self.charge.prepare_invoke();
            for k in &call.keys {
                inv.key(k);
            }
            for a in &call.args {
                inv.arg(a.as_slice());
            }
            let blob: Vec<u8> = self.redis.invoke(&inv).await.map_err(unavailable)?;
            let parsed = parse_outcome(reqs, &call, &blob)?;
            self.remember(&call, &parsed);
            Ok(parsed.outcome)
        })
    }

    fn check_charge_enqueue<'a>(
        &'a self,
        reqs: &'a [ChargeRequest],
        msg: &'a QueuedMessage,
    ) -> Option<StoreFuture<'a, ChargeOutcome>> {
        let (queue, guard) = self.queue.as_ref()?;
        Some(Box::pin(async move {
            let call = self.charge_call(reqs, None)?;
            let (_, blob) = queue
                .enqueue_guarded(msg, guard, &call.keys, &call.args)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let parsed = parse_outcome(reqs, &call, &blob)?;
            self.remember(&call, &parsed);
            Ok(parsed.outcome)
        }))
    }

    fn refund<'a>(&'a self, reqs: &'a [ChargeRequest], charged_at: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut inv = self.refund.prepare_invoke();
            inv.arg(charged_at);
            for r in reqs {
                inv.key(counter_key(self.prefix(), &r.key))
                    .arg(r.cost)
                    .arg(r.windows.len());
                for w in &r.windows {
                    inv.arg(window_tag(&r.quota, w));
                }
            }
            let _: i64 = self.redis.invoke(&inv).await.map_err(unavailable)?;
            Ok(())
        })
    }

    fn usage<'a>(
        &'a self,
        quota: &'a str,
        keys: &'a [String],
        windows: &'a [WindowSpec],
        at: Option<u64>,
    ) -> StoreFuture<'a, UsageReport> {
        Box::pin(async move {
            let mut inv = self.usage.prepare_invoke();
            inv.arg(at_arg(at)).arg(windows.len());
            for w in windows {
                inv.arg(window_tag(quota, w));
            }
            for k in keys {
                inv.key(counter_key(self.prefix(), k));
            }
            let flat: Vec<i64> = self.redis.invoke(&inv).await.map_err(unavailable)?;
            if flat.len() != 1 + 2 * keys.len() * windows.len() {
                return Err(StoreError::Corrupt(format!(
                    "usage reply has {} fields",
                    flat.len()
                )));
            }
            let now = flat[0].max(0) as u64;
            let mut vals = flat[1..].chunks(2).map(|c| CounterUsage {
                used: c[0].max(0) as u64,
                resets_at: c[1].max(0) as u64,
            });
            let keys = keys
                .iter()
                .map(|_| vals.by_ref().take(windows.len()).collect())
                .collect();
            Ok(UsageReport { now, keys })
        })
    }

    fn active_keys<'a>(
        &'a self,
        quota: &'a str,
        window: WindowSpec,
        at: Option<u64>,
    ) -> StoreFuture<'a, Vec<(String, u64)>> {
        Box::pin(async move {
            let mut inv = self.active.prepare_invoke();
            inv.key(index_key(self.prefix()))
                .arg(at_arg(at))
                .arg(counter_key(self.prefix(), ""))
                .arg(window_tag(quota, &window))
                .arg(MAX_KEYS_SCANNED);
            let flat: Vec<redis::Value> = self.redis.invoke(&inv).await.map_err(unavailable)?;
            flat.chunks(2)
                .map(|c| match c {
                    [redis::Value::BulkString(k), n] => Ok((
                        String::from_utf8_lossy(k).into_owned(),
                        int(n)?.max(0) as u64,
                    )),
                    other => Err(StoreError::Corrupt(format!("active keys reply {other:?}"))),
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(key: &str) -> redis::cluster_routing::Slot {
        redis::cluster_routing::Slot::for_key(key)
    }

    #[test]
    fn every_quota_key_shares_one_slot() {
        let keys = [
            counter_key("mr", "alice@a.example"),
            counter_key("mr", "*"),
            counter_key("mr", "{weird}key"),
            index_key("mr"),
        ];
        assert_eq!(keys[0], "mr:{mr:quota}:c:alice@a.example");
        assert_eq!(keys[3], "mr:{mr:quota}:keys");
        assert!(keys.iter().all(|k| slot(k) == slot(&keys[0])));
    }

    #[test]
    fn window_tags_fit_lua_numbers_and_tell_windows_apart() {
        let minute = WindowSpec::new(10, 60_000);
        let hour = WindowSpec::new(10, 3_600_000);
        let tags = [
            window_tag("q1", &minute),
            window_tag("q1", &hour),
            window_tag("q2", &minute),
        ];
        // Lua prints numbers with 14 significant digits: a tag must print exactly.
        assert!(tags.iter().all(|&t| t.to_string().len() <= 14));
        assert!(tags[0] != tags[1] && tags[0] != tags[2] && tags[1] != tags[2]);
        // The limit is not part of the tag: changing it keeps the counters.
        assert_eq!(window_tag("q1", &WindowSpec::new(99, 60_000)), tags[0]);
        assert_eq!(bucket_field("q1", &minute, 42), format!("{}:42", tags[0]));
    }

    #[test]
    fn requests_are_grouped_by_key_in_order() {
        let r = |q: &str, k: &str| ChargeRequest {
            quota: q.into(),
            key: k.into(),
            cost: 1,
            windows: vec![],
        };
        let reqs = [r("a", "x"), r("b", "*"), r("c", "x")];
        assert_eq!(groups(&reqs), vec![("x", vec![0, 2]), ("*", vec![1])]);
    }
}
