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
//! A key's hash holds one packed state, field `s`: for each quota window that still
//! counts, the quota's id ([`quota_id`], a hash of its name), the window and bucket
//! length, the total counted, the lowest bucket kept, the latest bucket and the units
//! in it (little-endian doubles), after the time the hash's expiry is good until.
//! Each older bucket that still holds units is a field of its own,
//! `<quota id>:<window ms>:<bucket index>` ([`bucket_field`]). The latest bucket lives
//! inside the state, so a check of every window of every quota of a key reads one
//! field and writes one (plus, once per bucket, the bucket just finished), and Lua
//! unpacks and packs all of them in one C call each: the cost per window is a few
//! arithmetic steps, which is what keeps ten quotas cheap.
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
use std::sync::Arc;

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
/// rides in the enqueue script, after the enqueue's arguments).
const COMMON_LUA: &str = r#"
local tonumber, floor, min = tonumber, math.floor, math.min
local now
if ARGV[A0 + 1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[A0 + 1])
end
-- The oldest bucket counted now: the one holding now - W + 1.
local function lower_of(W, b) return floor((now + 1 - W) / b) end
local pack, unpack4, rep = struct.pack, struct.unpack, string.rep
-- A key's state, field `s` of its hash: little-endian doubles (exact for integers
-- below 2^53; one C call reads or writes them all, several times cheaper than text
-- or a field per window): the time the hash's expiry and index entry are good
-- until, then REC per quota window: quota id, window ms, bucket ms, total counted,
-- lowest bucket kept, latest bucket, units in the latest bucket.
local REC = 7
-- Values one struct call handles: results go through Lua's C stack (8000 slots).
local CHUNK = 4000
local function decode(blob)
  if not blob then return {0}, 1 end
  local n = #blob / 8
  if n % 1 ~= 0 or (n - 1) % REC ~= 0 then
    error('mailrelay: quota state of ' .. #blob .. ' bytes is not a whole record')
  end
  if n <= CHUNK then return {unpack4('<' .. rep('d', n), blob)}, n end
  local v, got, pos = {}, 0, 1
  while got < n do
    local m = min(n - got, CHUNK)
    local part = {unpack4('<' .. rep('d', m), blob, pos)}
    for i = 1, m do v[got + i] = part[i] end
    got, pos = got + m, part[m + 1]
  end
  return v, n
end
local function encode(v, n)
  if n <= CHUNK then return pack('<' .. rep('d', n), unpack(v, 1, n)) end
  local parts = {}
  for i = 1, n, CHUNK do
    local j = min(n, i + CHUNK - 1)
    parts[#parts + 1] = pack('<' .. rep('d', j - i + 1), unpack(v, i, j))
  end
  return table.concat(parts)
end
-- The offset of the record of quota q's window W in v, looking at `hint` first
-- (records are kept in the order they were last checked in).
local function find(v, n, q, W, hint)
  if hint and hint < n and v[hint] == q and v[hint + 1] == W then return hint end
  for o = 2, n, REC do
    if v[o] == q and v[o + 1] == W then return o end
  end
  return nil
end
-- Older buckets are fields of their own, `<quota id>:<window ms>:<bucket>`.
local function prefix(q, W) return q .. ':' .. W .. ':' end
local function hdel(key, fields, n)
  for i = 1, n, CHUNK do redis.call('HDEL', key, unpack(fields, i, min(n, i + CHUNK - 1))) end
end
-- The state without the records nothing counts in any more (quotas removed from
-- the config, or ones the key no longer falls under); their older buckets go too.
local function live(key, v, n)
  local w, nw, old, nold = {v[1]}, 1, {}, 0
  for o = 2, n, REC do
    local W, b, c = v[o + 1], v[o + 2], v[o + 5]
    if now < (c + 1) * b + W - 1 then
      for k = 0, REC - 1 do w[nw + 1 + k] = v[o + k] end
      nw = nw + REC
    else
      local pre = prefix(v[o], W)
      for j = v[o + 4], c - 1 do
        nold = nold + 1
        old[nold] = pre .. j
      end
    end
  end
  hdel(key, old, nold)
  return w, nw
end
-- Units per bucket j = from .. cb: older ones from their fields, cb from the state.
local function buckets(key, pre, from, cb, cv)
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
-- When `need` units will have stopped counting: walks the buckets from the oldest.
-- -1: never (fewer than `need` are counted).
local function frees(key, pre, lo, cb, cv, W, b, need)
  if not lo or need <= 0 then return 0 end
  local acc = 0
  for i, v in ipairs(buckets(key, pre, lo, cb, cv)) do
    acc = acc + v
    if v > 0 and acc >= need then return (lo + i) * b + W - 1 end
  end
  return -1
end
"#;

/// Check and charge, as the body of `local function guard(KEYS, ARGV, K0, A0)`
/// (its keys from `KEYS[K0 + 1]`, its arguments from `ARGV[A0 + 1]`), so that it
/// can run alone or before an enqueue in the same call: see [`RedisCounters`]. The
/// Rust twin is [`super::window::WindowState`]. Written for speed (it runs once per
/// message, over every window of every matching quota): per key one `HGET` and one
/// `HSET` of a packed state, one C call to unpack the arguments, flat arrays.
pub const CHARGE_LUA: &str = r#"
-- KEYS: one counter hash per key group, then the key index (the last key)
-- ARGV: now ('' = Redis TIME), the struct format of the numbers, the numbers
--   (doubles): group count, then per group: ttl ms, request count, then per
--   request: cost, window count, then per window: quota id, limit, window ms,
--   bucket ms. Then per group its key (the index member).
-- Returns whether all fit, and little-endian doubles: allowed (1/0), now, then per
--   group, request and window: used, retry_at (0 fits, -1 never), free_at (0 when a
--   unit is free)
local index = KEYS[#KEYS]
local N = {unpack4(ARGV[A0 + 2], ARGV[A0 + 3])}
local ngroups, p = N[1], 2
-- Per window i (numbered across all groups): where its numbers start in N (quota
-- id, limit, window ms, bucket ms), its cost, the offset of its record in its key's
-- state, when it could be charged (0 now, -1 never). Records are read and updated
-- in place, and each window is visited twice (check, then charge and report): in
-- this interpreter every table write and every pass counts, times the windows.
local arg, cost, rec, retry = {}, {}, {}, {}
-- Per group: first and last window, ttl, state and its length, whether old
-- buckets were dropped.
local gfirst, glast, gttl, gstate, gn, grolled = {}, {}, {}, {}, {}, {}
local allowed = true
local n = 0
for g = 1, ngroups do
  local key = KEYS[K0 + g]
  local nreq
  gttl[g], nreq, p = N[p], N[p + 1], p + 2
  gfirst[g] = n + 1
  local v, nv = decode(redis.call('HGET', key, 's'))
  -- Buckets that no longer count are dropped for every window of the key at once.
  local drop, nd, rolled = nil, 0, nil
  -- Records are kept in the order of the last check, so the next one is usually
  -- where the previous one ended.
  local o = 2
  for r = 1, nreq do
    local c, nw = N[p], N[p + 1]
    p = p + 2
    for w = 1, nw do
      n = n + 1
      local q, lim, Wi, bi = N[p], N[p + 1], N[p + 2], N[p + 3]
      arg[n], cost[n] = p, c
      p = p + 4
      local x = (now + 1 - Wi) / bi
      local lower = x - x % 1
      if not (o < nv and v[o] == q and v[o + 1] == Wi) then
        o = find(v, nv, q, Wi)
        if not o then
          -- A window the key has no record of (yet, or any more): an empty one,
          -- kept only if the state is written.
          o = nv + 1
          x = now / bi
          v[o], v[o + 1], v[o + 2], v[o + 3], v[o + 4], v[o + 5], v[o + 6] =
            q, Wi, bi, 0, lower, x - x % 1, 0
          nv = nv + REC
        end
      end
      rec[n] = o
      if lower > v[o + 4] then
        drop = drop or {}
        rolled = rolled or {}
        local pre, from = prefix(q, Wi), nd + 1
        -- Older buckets are fields below the latest one; the state holds at most
        -- one window's worth of them, so this stays short after any idle time.
        for j = v[o + 4], min(lower, v[o + 5]) - 1 do
          nd = nd + 1
          drop[nd] = pre .. j
        end
        rolled[#rolled + 1] = {n, from, nd, lower}
      elseif c > lim then
        retry[n] = -1
        allowed = false
      elseif v[o + 3] + c <= lim then
        retry[n] = 0
      else
        retry[n] = -2
      end
      o = o + REC
    end
  end
  glast[g] = n
  if rolled then
    local dv = {}
    for i = 1, nd, CHUNK do
      local part = redis.call('HMGET', key, unpack(drop, i, min(nd, i + CHUNK - 1)))
      for k = 1, #part do dv[i + k - 1] = part[k] end
    end
    hdel(key, drop, nd)
    for _, r in ipairs(rolled) do
      local i, lower = r[1], r[4]
      local ro = rec[i]
      local t = v[ro + 3]
      for j = r[2], r[3] do
        if dv[j] then t = t - tonumber(dv[j]) end
      end
      if v[ro + 5] < lower then
        t = t - v[ro + 6]
        v[ro + 5], v[ro + 6] = lower, 0
      end
      v[ro + 3], v[ro + 4] = t, lower
      local c, lim = cost[i], N[arg[i] + 1]
      if c > lim then
        retry[i] = -1
        allowed = false
      elseif t + c <= lim then
        retry[i] = 0
      else
        retry[i] = -2
      end
    end
  end
  -- Over the limit now: when will enough have stopped counting? (Reads buckets.)
  for i = gfirst[g], n do
    if retry[i] == -2 then
      local a, ro = arg[i], rec[i]
      retry[i] = frees(key, prefix(N[a], N[a + 2]), v[ro + 4], v[ro + 5], v[ro + 6],
        N[a + 2], N[a + 3], v[ro + 3] + cost[i] - N[a + 1])
      allowed = false
    end
  end
  gstate[g], gn[g], grolled[g] = v, nv, rolled ~= nil
end

local out, no = {allowed and 1 or 0, now}, 2
for g = 1, ngroups do
  local key, ttl, v, nv = KEYS[K0 + g], gttl[g], gstate[g], gn[g]
  for i = gfirst[g], glast[g] do
    local a, o = arg[i], rec[i]
    if allowed then
      local c, x = cost[i], now / N[a + 3]
      local cur = x - x % 1
      if cur == v[o + 5] then
        v[o + 6] = v[o + 6] + c
      elseif cur > v[o + 5] then
        -- The latest bucket is finished: it becomes a field of its own (before
        -- `frees` below reads the buckets).
        if v[o + 6] > 0 then
          redis.call('HSET', key, prefix(N[a], N[a + 2]) .. v[o + 5], v[o + 6])
        end
        v[o + 5], v[o + 6] = cur, c
      else
        -- Redis TIME went back: charge the earlier bucket's field.
        redis.call('HINCRBY', key, prefix(N[a], N[a + 2]) .. cur, c)
      end
      v[o + 3] = v[o + 3] + c
    end
    local t, lim, free = v[o + 3], N[a + 1], 0
    if t >= lim then
      free = frees(key, prefix(N[a], N[a + 2]), v[o + 4], v[o + 5], v[o + 6],
        N[a + 2], N[a + 3], t + 1 - lim)
      if free < 0 then free = 0 end
    end
    out[no + 1], out[no + 2], out[no + 3] = t, retry[i], free
    no = no + 3
  end
  if allowed and v[1] < now + ttl then
    -- The hash must outlive its counters: until ttl after this charge. Its expiry
    -- (and index entry) are pushed a sixteenth further than needed, and the time
    -- they are good until is kept in the state, so that most charges skip this;
    -- so does dropping the records nothing counts in any more.
    local keep = ttl + floor(ttl / 16)
    v[1] = now + keep
    redis.call('HSET', key, 's', encode(live(key, v, nv)))
    -- Never shorten: the hash may hold longer windows of other quotas.
    if redis.call('PTTL', key) < keep then
      redis.call('PEXPIRE', key, keep)
    end
    local member = ARGV[A0 + 3 + g]
    local old = redis.call('ZSCORE', index, member)
    if not old or tonumber(old) < now + keep then
      redis.call('ZADD', index, now + keep, member)
    end
    if redis.call('PTTL', index) < keep then
      redis.call('PEXPIRE', index, keep)
    end
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  elseif allowed or grolled[g] then
    redis.call('HSET', key, 's', encode(v, nv))
  end
end
return allowed, pack('<' .. rep('d', no), unpack(out, 1, no))
"#;

const REFUND_LUA: &str = r#"
-- KEYS: one counter hash per request
-- ARGV: charge time, then per request: cost, window count, then per window: quota
--   id, window ms, bucket ms
local a = 2
for _, key in ipairs(KEYS) do
  local cost, nw = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local v, nv = decode(redis.call('HGET', key, 's'))
  local changed = false
  for w = 1, nw do
    local q, Ww, bw = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    local o = find(v, nv, q, Ww, 2)
    if o then
      local j, back = floor(now / bw), 0
      if j == v[o + 5] then
        back = min(cost, v[o + 6])
        v[o + 6] = v[o + 6] - back
      else
        local f = prefix(q, Ww) .. j
        local c = tonumber(redis.call('HGET', key, f) or '0')
        back = min(cost, c)
        if back == c then
          redis.call('HDEL', key, f)
        elseif back > 0 then
          redis.call('HINCRBY', key, f, -back)
        end
      end
      if back > 0 then
        v[o + 3] = v[o + 3] - back
        changed = true
      end
    end
  end
  if changed then redis.call('HSET', key, 's', encode(v, nv)) end
end
return 0
"#;

const USAGE_LUA: &str = r#"
-- KEYS: one counter hash per key
-- ARGV: now ('' = Redis TIME), window count, then per window: window ms, bucket ms,
--   quota id
-- Returns now, then per key and window: used, resets_at (now when nothing counts)
local out = {now}
local nw = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  local v, nv = decode(redis.call('HGET', key, 's'))
  for w = 0, nw - 1 do
    local Ww, bw, q = tonumber(ARGV[3 + 3 * w]), tonumber(ARGV[4 + 3 * w]), tonumber(ARGV[5 + 3 * w])
    local used, resets = 0, nil
    local o = find(v, nv, q, Ww, 2)
    if o then
      local from = math.max(v[o + 4], lower_of(Ww, bw))
      for i, u in ipairs(buckets(key, prefix(q, Ww), from, v[o + 5], v[o + 6])) do
        if u > 0 then
          used = used + u
          if not resets then resets = (from + i) * bw + Ww - 1 end
        end
      end
    end
    out[#out + 1] = used
    out[#out + 1] = resets or now
  end
end
return out
"#;

const ACTIVE_LUA: &str = r#"
-- KEYS: the key index
-- ARGV: now ('' = Redis TIME), counter hash prefix (up to the key), quota id,
--   window ms, bucket ms, most keys to look at
-- Returns key, used pairs for keys with units of the quota counted in the window,
-- from the ones charged last. The hash keys are built here: they share the
-- index's hash tag, so its slot.
local q, Ww, bw = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local pre = prefix(q, Ww)
local members = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. now,
  'LIMIT', 0, tonumber(ARGV[6]))
local out = {}
for _, m in ipairs(members) do
  local key = ARGV[2] .. m
  local v, nv = decode(redis.call('HGET', key, 's'))
  local o = find(v, nv, q, Ww, 2)
  if o then
    local used = 0
    for _, u in ipairs(buckets(key, pre, math.max(v[o + 4], lower_of(Ww, bw)), v[o + 5], v[o + 6])) do
      used = used + u
    end
    if used > 0 then
      out[#out + 1] = m
      out[#out + 1] = used
    end
  end
end
return out
"#;

/// The check as a Lua function `guard(KEYS, ARGV)` returning `allowed, reply`.
fn guard_lua() -> String {
    format!("local function guard(KEYS, ARGV, K0, A0)\n{COMMON_LUA}{CHARGE_LUA}\nend\n")
}

/// A script that runs alone: its arguments start at `ARGV[1]`.
fn standalone_lua(body: &str) -> String {
    format!("local A0 = 0\n{COMMON_LUA}{body}")
}

/// Quota windows one check may cover: the script unpacks its numbers (four per
/// window) and packs its reply (three per window) in one C call each, bounded by
/// Lua's C stack (8000 values).
pub const MAX_WINDOWS_PER_CHECK: usize = 1000;

/// The hash tag of every quota key.
fn tag(prefix: &str) -> String {
    format!("{prefix}:{{{prefix}:quota}}")
}

/// The counter hash of one key (every quota and window of it).
pub fn counter_key(prefix: &str, key: &str) -> String {
    format!("{}:c:{key}", tag(prefix))
}

/// The id of a quota in Redis: FNV-1a of its name, cut to 40 bits so that Lua (whose
/// numbers are doubles, printed with 14 digits) holds it and prints it exactly. With a
/// thousand quotas, the chance that two share an id is below one in a million.
pub fn quota_id(quota: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in quota.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & ((1 << 40) - 1)
}

/// The field of one older bucket of a quota window in a key's hash.
pub fn bucket_field(quota: &str, w: &WindowSpec, bucket: i64) -> String {
    format!("{}:{}:{bucket}", quota_id(quota), w.window_ms)
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
}

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

/// The keys and arguments of one check (see [`CHARGE_LUA`]).
struct ChargeCall<'r> {
    groups: Vec<(&'r str, Vec<usize>)>,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
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
        let count = 1 + 2 * groups.len() + 2 * reqs.len() + 4 * windows;
        let mut num: Vec<u8> = Vec::with_capacity(8 * count);
        let mut put = |v: u64| num.extend_from_slice(&(v as f64).to_le_bytes());
        put(groups.len() as u64);
        let mut keys = Vec::with_capacity(groups.len() + 1);
        let mut members: Vec<Vec<u8>> = Vec::with_capacity(groups.len());
        for (key, group) in &groups {
            let ttl = group
                .iter()
                .map(|&i| reqs[i].index_ttl_ms())
                .max()
                .unwrap_or(1);
            keys.push(counter_key(self.prefix(), key));
            put(ttl);
            put(group.len() as u64);
            members.push(key.as_bytes().to_vec());
            for &i in group {
                let r = &reqs[i];
                let id = quota_id(&r.quota);
                put(r.cost);
                put(r.windows.len() as u64);
                for w in &r.windows {
                    put(id);
                    put(w.limit);
                    put(w.window_ms);
                    put(w.bucket_ms);
                }
            }
        }
        keys.push(index_key(self.prefix()));
        let mut args = Vec::with_capacity(3 + members.len());
        args.push(at_arg(at).into_bytes());
        args.push(format!("<{}", "d".repeat(count)).into_bytes());
        args.push(num);
        args.extend(members);
        Ok(ChargeCall { groups, keys, args })
    }
}

/// Reads the packed reply of [`CHARGE_LUA`] back into request order.
fn parse_outcome(
    reqs: &[ChargeRequest],
    groups: &[(&str, Vec<usize>)],
    blob: &[u8],
) -> Result<ChargeOutcome, StoreError> {
    let expected = 2 + 3 * reqs.iter().map(|r| r.windows.len()).sum::<usize>();
    if blob.len() != 8 * expected {
        return Err(StoreError::Corrupt(format!(
            "charge reply has {} bytes, expected {}",
            blob.len(),
            8 * expected
        )));
    }
    let mut it = blob
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as i64);
    let mut next = || it.next().expect("length checked");
    let allowed = next() == 1;
    let now = next().max(0) as u64;
    let mut checks = vec![Vec::new(); reqs.len()];
    for (_, members) in groups {
        for &i in members {
            for _ in &reqs[i].windows {
                let used = next().max(0) as u64;
                let retry = next();
                let free = next().max(0) as u64;
                checks[i].push(WindowCheck {
                    used,
                    retry_at: (retry >= 0).then_some(retry as u64),
                    free_at: free,
                });
            }
        }
    }
    Ok(ChargeOutcome {
        allowed,
        now,
        checks,
    })
}

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
            parse_outcome(reqs, &call.groups, &blob)
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
            parse_outcome(reqs, &call.groups, &blob)
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
                let id = quota_id(&r.quota);
                for w in &r.windows {
                    inv.arg(id).arg(w.window_ms).arg(w.bucket_ms);
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
            let id = quota_id(quota);
            for w in windows {
                inv.arg(w.window_ms).arg(w.bucket_ms).arg(id);
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
                .arg(quota_id(quota))
                .arg(window.window_ms)
                .arg(window.bucket_ms)
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
