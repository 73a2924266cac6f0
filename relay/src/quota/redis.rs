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
//! A key's hash holds its state in three fields of little-endian doubles (see
//! `COMMON_LUA`): `k`, one record per quota window of what changes at most once
//! a bucket (the window's tag, [`window_tag`], a hash of the quota's name and
//! window; its window and bucket length; when its lowest bucket kept stops
//! counting and when its latest bucket ends; its quota's id, [`quota_id`]); `h`,
//! per window the total counted and the units in the latest bucket; `a`, a version
//! of `k` and `h` and per quota a tally of what was charged to all its windows
//! since. Each older bucket that still holds units is a field of its own,
//! `<tag>:<bucket index>` ([`bucket_field`]).
//!
//! # Checking by tallies
//!
//! Redis' Lua is slow per instruction and per value moved (tens of machine
//! instructions per VM step, hundreds per number through `struct`), so the cost of
//! a quota is the work per window per check. A relay remembers `k` and `h` of each
//! key it charged (from the reply) and, until a window of the key needs a new
//! bucket or an old one dropped, checks the key by its tallies: it sends, per
//! quota, how many units still fit (the tightest window's limit minus its
//! remembered total), and the script reads and writes only `a`, one number per
//! quota, after checking its version. Everything else (a key not remembered, a
//! version moved on by another relay or a refund, a bucket boundary) reads the
//! state whole, adds the tallies into `h` and works per window, as the model in
//! [`super::window`] does; the answers are the same either way (tested against the
//! model on random sequences).
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
"#;

/// Check and charge, as the body of `local function guard(KEYS, ARGV, K0, A0)`
/// (its keys from `KEYS[K0 + 1]`, its arguments from `ARGV[A0 + 1]`), so that it
/// can run alone or before an enqueue in the same call: see [`RedisCounters`]. The
/// Rust twin is [`super::window::WindowState`].
pub const CHARGE_LUA: &str = r#"
-- KEYS: one counter hash per key group, then the key index (the last key)
-- ARGV: now ('' = Redis TIME), then three lists of doubles, each as its struct
--   format and its bytes:
--   F, read by every check: group count, then per group: the version of the key's
--     state the caller remembers (0: none), the times from and until which that
--     state needs no change here (no bucket to start or drop, no expiry to push),
--     request count, then per request: cost, its quota's place among the tallies,
--     its headroom (the least, over its windows, of limit minus remembered total);
--   N, read when a key's state is read whole: per group: ttl ms, request count,
--     then per request: cost, quota id, window count, then per window: tag, limit;
--   S, read for a window the key has no record of: per window: window ms, bucket
--     ms.
--   Then per group its key (the index member).
-- Returns whether all fit, and little-endian doubles, either
--   1, allowed (1/0), now, then per group, request and window: used, retry_at (0
--   fits, -1 never), free_at (0 when a unit is free); or, when all fit and every
--   window still has a unit free (retry_at and free_at all 0),
--   2, now, then per group: the lengths of its `k`, `h` and `a`, then those as
--   stored (`k` and `h` empty when the remembered ones were used): a window's used
--   count is its total plus its quota's tally.
local index = KEYS[#KEYS]
local F = {unpack4(ARGV[A0 + 2], ARGV[A0 + 3])}
local N, S
-- Per group: {true, tallies, their length} when checked from its tallies, else
-- {false, records, length, totals, length, tallies, whether `k` changed, `k` as
-- stored, ttl, `h` as stored, tallies' length, what each request adds (quota id,
-- cost), each quota's place among the tallies}.
local G = {}
local allowed, full, slow = true, false, false
-- Charges to take back if a later check fails: by tally (tallies, place, cost), and
-- by window: the last one charged, those whose charge started a bucket (what it
-- replaced) or went to an earlier one (false: Redis TIME went back).
local done, nd, charged, moved = {}, 0, 0, nil
-- Windows whose record is not where the previous window's ended (by window number).
local jump
-- Bucket fields to write once all fit: key, field, units, whether to add.
local fin, nfin = nil, 0
local p = 2
-- The keys checked from their tallies alone: the loop most checks run, so as few
-- steps as it takes.
for g = 1, F[1] do
  local kver, nreq = F[p], F[p + 3]
  local A, nA
  if kver > 0 and now >= F[p + 1] and now < F[p + 2] then
    local ab = redis.call('HGET', KEYS[K0 + g], 'a')
    if ab then
      A, nA = doubles(ab)
      if A[1] ~= kver then A = nil end
    end
  end
  p = p + 4
  if A then
    for r = 1, nreq do
      local s, c, H = F[p + 1] + 2, F[p], F[p + 2]
      local t = A[s] + c
      if t > H then
        allowed = false
      elseif allowed then
        A[s] = t
        done[nd + 1], done[nd + 2], done[nd + 3] = A, s, c
        nd = nd + 3
        if t == H then full = true end
      end
      p = p + 3
    end
    G[g] = {true, A, nA}
  else
    p = p + 3 * nreq
    slow = true
  end
end

-- The other keys: their state whole, tallies settled, every window checked.
if slow then
  helpers()
  N = {unpack4(ARGV[A0 + 4], ARGV[A0 + 5])}
  local q, n = 1, 0
  for g = 1, F[1] do
    local ttl, nreq = N[q], N[q + 1]
    q = q + 2
    if G[g] then
      for r = 1, nreq do
        local nw = N[q + 2]
        q, n = q + 3 + 2 * nw, n + nw
      end
    else
      local key = KEYS[K0 + g]
      local v, nv, h, nh, A, nA, kb, hb = load(key)
      local slots = settle(v, nv, h, A)
      local cold = kb == nil
      -- What this check adds to each quota's tally (quota id, cost), if `k` stays
      -- as it is: then only `a` is written, under the same version, so that
      -- checks by tallies already on their way still match.
      local add = {}
      -- Records are kept in the order of the last check, so a window's record is
      -- usually where the previous one's ended.
      local o = 2
      for r = 1, nreq do
        local c, qid, nw = N[q], N[q + 1], N[q + 2]
        q = q + 3
        add[2 * r - 1], add[2 * r] = qid, c
        for w = 1, nw do
          n = n + 1
          local tag, lim = N[q], N[q + 1]
          q = q + 2
          if o >= nv or v[o] ~= tag then
            o = find(v, nv, tag)
            if not o then
              -- A window the key has no record of (yet, or any more): an empty
              -- one, kept only if the state is written.
              S = S or {unpack4(ARGV[A0 + 6], ARGV[A0 + 7])}
              local Wi, bi = S[2 * n - 1], S[2 * n]
              o = nv + 1
              v[o], v[o + 1], v[o + 2], v[o + 3], v[o + 4], v[o + 5] =
                tag, Wi, bi, (lower_of(Wi, bi) + 1) * bi + Wi - 1, (floor(now / bi) + 1) * bi, qid
              nv = nv + REC
              h[nh + 1], h[nh + 2] = 0, 0
              nh = nh + HOT
              cold = true
            end
            jump = jump or {}
            jump[n] = o
          end
          local oh = (o - 2) / REC * HOT + 1
          if now >= v[o + 3] then
            -- The lowest bucket kept stopped counting: drop all that did (older
            -- buckets are fields below the latest one; at most a window's worth).
            cold = true
            local W, b = v[o + 1], v[o + 2]
            local lower, pre, cb = lower_of(W, b), prefix(tag), cb_of(v, o)
            local drop, ndrop = {}, 0
            for j = lo_of(v, o), min(lower, cb) - 1 do
              ndrop = ndrop + 1
              drop[ndrop] = pre .. j
            end
            local t = h[oh]
            for i = 1, ndrop, CHUNK do
              local part = redis.call('HMGET', key, unpack(drop, i, min(ndrop, i + CHUNK - 1)))
              for k = 1, #part do
                if part[k] then t = t - tonumber(part[k]) end
              end
            end
            hdel(key, drop, ndrop)
            if cb < lower then
              t = t - h[oh + 1]
              v[o + 4], h[oh + 1] = (lower + 1) * b, 0
            end
            h[oh], v[o + 3] = t, (lower + 1) * b + W - 1
          end
          local t = h[oh] + c
          if t > lim then
            allowed = false
          elseif allowed then
            local cbe = v[o + 4]
            if now < cbe and now >= cbe - v[o + 2] then
              h[oh + 1] = h[oh + 1] + c
            else
              moved = moved or {}
              fin = fin or {}
              if now >= cbe then
                -- The latest bucket is finished: it becomes a field of its own.
                moved[n] = {cbe, h[oh + 1]}
                if h[oh + 1] > 0 then
                  fin[nfin + 1], fin[nfin + 2], fin[nfin + 3], fin[nfin + 4] =
                    key, prefix(tag) .. cb_of(v, o), h[oh + 1], false
                  nfin = nfin + 4
                end
                local b = v[o + 2]
                v[o + 4], h[oh + 1] = (floor(now / b) + 1) * b, c
                cold = true
              else
                -- Redis TIME went back: charge the earlier bucket's field, or the
                -- oldest bucket kept if it went back further (as the model does).
                -- Not a tally (tallies count in the latest bucket): `h` is written.
                moved[n] = false
                cold = true
                local j = math.max(floor(now / v[o + 2]), lo_of(v, o))
                if j >= cb_of(v, o) then
                  moved[n] = nil
                  h[oh + 1] = h[oh + 1] + c
                else
                  fin[nfin + 1], fin[nfin + 2], fin[nfin + 3], fin[nfin + 4] =
                    key, prefix(tag) .. j, c, true
                  nfin = nfin + 4
                end
              end
            end
            h[oh] = t
            charged = n
            if t >= lim then full = true end
          end
          o = o + REC
        end
      end
      G[g] = {false, v, nv, h, nh, A, cold, kb, ttl, hb, nA, add, slots}
    end
  end
end

if not allowed then
  -- Take back what was charged before a window did not fit (in memory: nothing
  -- was written yet).
  full = true
  for i = 1, nd, 3 do
    local A, s = done[i], done[i + 1]
    A[s] = A[s] - done[i + 2]
  end
  if charged > 0 then
    local q, n = 1, 0
    for g = 1, F[1] do
      local Gg, nreq = G[g], N[q + 1]
      q = q + 2
      local o = 2
      for r = 1, nreq do
        local c, nw = N[q], N[q + 2]
        q = q + 3
        for w = 1, nw do
          n = n + 1
          if not Gg[1] and n <= charged then
            o = jump and jump[n] or o
            local v, h, oh = Gg[2], Gg[4], hot(o)
            h[oh] = h[oh] - c
            local m = moved and moved[n]
            if m then
              v[o + 4], h[oh + 1] = m[1], m[2]
            elseif m == nil then
              h[oh + 1] = h[oh + 1] - c
            end
          end
          q = q + 2
          o = o + REC
        end
      end
    end
  end
end

-- Write back.
if allowed then
  for i = 1, nfin, 4 do
    if fin[i + 3] then
      redis.call('HINCRBY', fin[i], fin[i + 1], fin[i + 2])
    else
      redis.call('HSET', fin[i], fin[i + 1], fin[i + 2])
    end
  end
end
local reply = not full and {pack('<dd', 2, now)}
for g = 1, F[1] do
  local key, Gg = KEYS[K0 + g], G[g]
  if Gg[1] then
    if allowed then
      local ab = encode(Gg[2], Gg[3])
      redis.call('HSET', key, 'a', ab)
      if reply then
        reply[#reply + 1] = pack('<ddd', 0, 0, Gg[3])
        reply[#reply + 1] = ab
      end
    end
  elseif allowed or Gg[7] then
    local v, nv, h, nh, A, cold, kb, ttl, hb, nA, add, slots = unpack(Gg, 2, 13)
    local refresh = allowed and v[1] < now + ttl
    local keep = ttl + floor(ttl / 16)
    if refresh then
      -- The hash must outlive its counters: until ttl after this charge. Its expiry
      -- (and index entry) are pushed a sixteenth further than needed, and the time
      -- they are good until is kept in the state, so that most charges skip this;
      -- so does dropping the records nothing counts in any more.
      v[1] = now + keep
      v, nv, h, nh = live(key, v, nv, h)
      cold = true
    end
    local a, na, ab
    if cold then
      kb, hb = encode(v, nv), encode(h, nh)
      a, na = tallies(v, nv, A[1] + 1)
      ab = encode(a, na)
      redis.call('HSET', key, 'k', kb, 'h', hb, 'a', ab)
    else
      -- `k` and `h` as they were: the charges go to the tallies.
      a, na = A, nA
      for i = 1, #add, 2 do
        local s = slots[add[i]] + 1
        a[s] = (a[s] or 0) + add[i + 1]
      end
      for i = 2, na do a[i] = a[i] or 0 end
      ab = encode(a, na)
      redis.call('HSET', key, 'a', ab)
    end
    if refresh then
      -- Never shorten: the hash may hold longer windows of other quotas.
      if redis.call('PTTL', key) < keep then
        redis.call('PEXPIRE', key, keep)
      end
      local member = ARGV[A0 + 7 + g]
      local old = redis.call('ZSCORE', index, member)
      if not old or tonumber(old) < now + keep then
        redis.call('ZADD', index, now + keep, member)
      end
      if redis.call('PTTL', index) < keep then
        redis.call('PEXPIRE', index, keep)
      end
      redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
    end
    if reply then
      reply[#reply + 1] = pack('<ddd', nv, nh, na)
      reply[#reply + 1] = kb
      reply[#reply + 1] = hb
      reply[#reply + 1] = ab
    end
  end
end
if reply then return true, table.concat(reply) end

-- Somebody is at or over a limit: the caller needs when units free up. Keys
-- checked from their tallies are read whole here, tallies settled (as stored).
helpers()
N = N or {unpack4(ARGV[A0 + 4], ARGV[A0 + 5])}
local out, no = {1, allowed and 1 or 0, now}, 3
local q, n = 1, 0
for g = 1, F[1] do
  local key, Gg, nreq = KEYS[K0 + g], G[g], N[q + 1]
  q = q + 2
  local v, nv, h
  if Gg[1] then
    local nh, A
    v, nv, h, nh, A = load(key)
    settle(v, nv, h, A)
  else
    v, nv, h = Gg[2], Gg[3], Gg[4]
  end
  local o = 2
  for r = 1, nreq do
    local c, nw = N[q], N[q + 2]
    q = q + 3
    for w = 1, nw do
      n = n + 1
      local tag, lim = N[q], N[q + 1]
      q = q + 2
      if Gg[1] then
        o = find(v, nv, tag)
      else
        o = jump and jump[n] or o
      end
      local t = h[hot(o)]
      local retry, free = 0, 0
      if not allowed and t + c > lim then
        if c > lim then retry = -1 else retry = frees(key, v, o, h, t + c - lim) end
      end
      if t >= lim then
        free = frees(key, v, o, h, t + 1 - lim)
        if free < 0 then free = 0 end
      end
      out[no + 1], out[no + 2], out[no + 3] = t, retry, free
      no = no + 3
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
  local v, nv, h, nh, A = load(key)
  settle(v, nv, h, A)
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
  if changed then
    local t, nt = tallies(v, nv, A[1] + 1)
    redis.call('HSET', key, 'h', encode(h, nh), 'a', encode(t, nt))
  end
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
  local v, nv, h, nh, A = load(key)
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
  local v, nv, h, nh, A = load(key)
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
/// call each, bounded by `FORMAT_DOUBLES` and by Lua's C stack (8000 values).
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

/// The id of a quota in Redis (its windows' tallies are kept under it): FNV-1a of
/// its name, cut to 46 bits like [`window_tag`].
pub fn quota_id(quota: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in quota.as_bytes().iter().chain(&[0xfe]) {
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

/// A key's `k` and `h` as last written, and their version: what a check of the key
/// by its tallies alone is reckoned against.
#[derive(Debug, Clone)]
struct Remembered {
    version: f64,
    /// The time the key's expiry is good until.
    sure: f64,
    /// Per window: tag, window ms, bucket ms, when its lowest bucket stops counting,
    /// when its latest bucket ends, quota id.
    records: Vec<[f64; STATE_RECORD]>,
    /// Per window: total counted, units in its latest bucket.
    totals: Vec<[f64; STATE_HOT]>,
}

impl Remembered {
    /// The place of a quota among the key's tallies: quotas in order of their
    /// first window (as the script counts them).
    fn slot(&self, qid: f64) -> Option<usize> {
        let mut seen: Vec<f64> = Vec::new();
        for r in &self.records {
            if r[5] == qid {
                return Some(seen.len());
            }
            if !seen.contains(&r[5]) {
                seen.push(r[5]);
            }
        }
        None
    }
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
    /// Per group checked by its tallies: per window, its remembered total and its
    /// quota's place among the tallies.
    remembered: Vec<Option<Vec<(f64, usize)>>>,
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
        let mut fast = Doubles::with_capacity(1 + 4 * groups.len() + 3 * reqs.len());
        let mut num = Doubles::with_capacity(2 * groups.len() + 3 * reqs.len() + 2 * windows);
        let mut shapes = Doubles::with_capacity(2 * windows);
        fast.put(groups.len() as u64);
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
            let plan = memory
                .get(&counter)
                .and_then(|m| tally_plan(m, group.iter().map(|&i| &reqs[i]), ttl));
            match &plan {
                Some(plan) => {
                    fast.put_f64(plan.version);
                    fast.put_f64(plan.from);
                    fast.put_f64(plan.until);
                    fast.put(group.len() as u64);
                    for (&i, &(slot, headroom)) in group.iter().zip(&plan.requests) {
                        fast.put(reqs[i].cost);
                        fast.put(slot as u64);
                        fast.put_f64(headroom);
                    }
                }
                None => {
                    for _ in 0..3 {
                        fast.put(0);
                    }
                    fast.put(group.len() as u64);
                    for _ in 0..3 * group.len() {
                        fast.put(0);
                    }
                }
            }
            num.put(ttl);
            num.put(group.len() as u64);
            keys.push(counter);
            members.push(key.as_bytes().to_vec());
            for &i in group {
                let r = &reqs[i];
                num.put(r.cost);
                num.put(quota_id(&r.quota));
                num.put(r.windows.len() as u64);
                for w in &r.windows {
                    num.put(window_tag(&r.quota, w));
                    num.put(w.limit);
                    shapes.put(w.window_ms);
                    shapes.put(w.bucket_ms);
                }
            }
            remembered.push(plan.map(|p| p.windows));
        }
        drop(memory);
        keys.push(index_key(self.prefix()));
        let mut args = Vec::with_capacity(7 + members.len());
        args.push(at_arg(at).into_bytes());
        for list in [fast, num, shapes] {
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

/// How a check of one key's requests goes by its tallies alone (see [`CHARGE_LUA`]).
struct TallyPlan {
    version: f64,
    /// From and until when (Redis clock) the check needs no change to `k`: no bucket
    /// to start or drop, no expiry to push.
    from: f64,
    until: f64,
    /// Per request: its quota's place among the tallies, and the units it may
    /// still charge (its tightest window's limit minus that window's remembered
    /// total).
    requests: Vec<(usize, f64)>,
    /// Per window: its remembered total and its quota's place.
    windows: Vec<(f64, usize)>,
}

/// Whether a check of `reqs` (one key's) can go by the key's remembered state: each
/// request's quota has records for exactly its windows (so its tally is theirs).
fn tally_plan<'r>(
    m: &Remembered,
    reqs: impl Iterator<Item = &'r ChargeRequest>,
    ttl: u64,
) -> Option<TallyPlan> {
    let (mut from, mut until) = (0f64, m.sure - ttl as f64);
    let mut requests = Vec::new();
    let mut windows = Vec::new();
    for r in reqs {
        let qid = quota_id(&r.quota) as f64;
        let slot = m.slot(qid)?;
        if m.records.iter().filter(|rec| rec[5] == qid).count() != r.windows.len() {
            return None;
        }
        let mut headroom = f64::INFINITY;
        for w in &r.windows {
            let tag = window_tag(&r.quota, w) as f64;
            let rec = m.records.iter().position(|rec| rec[0] == tag)?;
            let [_, _, b, lowest_stops, latest_ends, q] = m.records[rec];
            if q != qid {
                return None;
            }
            let total = m.totals[rec][0];
            from = from.max(latest_ends - b);
            until = until.min(lowest_stops).min(latest_ends);
            headroom = headroom.min(w.limit as f64 - total);
            windows.push((total, slot));
        }
        requests.push((slot, headroom));
    }
    (from < until).then_some(TallyPlan {
        version: m.version,
        from,
        until,
        requests,
        windows,
    })
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
        // All fit with a unit to spare: now, then each group's `k`, `h` (none when
        // checked by its tallies) and `a`.
        2 => {
            let mut at = 2;
            let mut states = Vec::with_capacity(call.groups.len());
            for (g, (_, members)) in call.groups.iter().enumerate() {
                let (nk, nh, na) = match vals.get(at..at + 3) {
                    Some([k, h, a]) => (*k as usize, *h as usize, *a as usize),
                    _ => return Err(corrupt(format!("no state lengths at {at}"))),
                };
                let start = at + 3;
                let (Some(k), Some(h), Some(a)) = (
                    vals.get(start..start + nk),
                    vals.get(start + nk..start + nk + nh),
                    vals.get(start + nk + nh..start + nk + nh + na),
                ) else {
                    return Err(corrupt(format!(
                        "state of {nk} + {nh} + {na} values at {at}"
                    )));
                };
                at = start + nk + nh + na;
                let tally = |slot: usize| a.get(1 + slot).copied().unwrap_or(0.0);
                if nk == 0 {
                    let plan = call.remembered[g]
                        .as_ref()
                        .ok_or_else(|| corrupt("no state of a key not remembered".into()))?;
                    let mut windows = plan.iter();
                    for &i in members {
                        for _ in &reqs[i].windows {
                            let &(total, slot) =
                                windows.next().ok_or_else(|| corrupt("windows".into()))?;
                            push_fitting(&mut checks, i, total + tally(slot));
                        }
                    }
                    states.push(None);
                    continue;
                }
                let records = (nk - 1) / STATE_RECORD;
                if (nk - 1) % STATE_RECORD != 0 || nh != STATE_HOT * records || na == 0 {
                    return Err(corrupt(format!("state of {nk} + {nh} + {na} values")));
                }
                let m = Remembered {
                    version: a[0],
                    sure: k[0],
                    records: k[1..]
                        .chunks_exact(STATE_RECORD)
                        .map(|c| c.try_into().expect("record length"))
                        .collect(),
                    totals: h
                        .chunks_exact(STATE_HOT)
                        .map(|c| c.try_into().expect("totals length"))
                        .collect(),
                };
                for &i in members {
                    let r = &reqs[i];
                    let slot = m.slot(quota_id(&r.quota) as f64);
                    for w in &r.windows {
                        let tag = window_tag(&r.quota, w) as f64;
                        let rec = m
                            .records
                            .iter()
                            .position(|rec| rec[0] == tag)
                            .ok_or_else(|| corrupt(format!("no record of quota {}", r.quota)))?;
                        let total = m.totals[rec][0] + slot.map_or(0.0, tally);
                        push_fitting(&mut checks, i, total);
                    }
                }
                states.push(Some(m));
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

/// A window that fit, with a unit to spare: `used` units.
fn push_fitting(checks: &mut [Vec<WindowCheck>], i: usize, used: f64) {
    checks[i].push(WindowCheck {
        used: (used as i64).max(0) as u64,
        retry_at: Some(0),
        free_at: 0,
    });
}

/// Doubles per window in a key's state: its record in `k` and its totals in `h`
/// (see [`COMMON_LUA`]).
const STATE_RECORD: usize = 6;
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
                .map_err(|e| match e {
                    crate::queue::QueueError::Full(m) => StoreError::Full(m),
                    e => StoreError::Unavailable(e.to_string()),
                })?;
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
