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
//! In a key's hash, each quota and window has a state field `<quota>:<window ms>`
//! holding the total counted, the lowest bucket kept, the latest bucket and the
//! units in it (four little-endian doubles, 32 bytes), and one field
//! `<quota>:<window ms>:<bucket index>` per older bucket that still holds units. The
//! latest bucket lives inside the state, so a check of a quota window reads one field
//! and writes one (plus, once per bucket, the bucket just finished): all windows of
//! all quotas of a key in one `HMGET` and one `HSET`.
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
//! good until (kept in the hash's field `~`) comes within a window of now, about
//! sixteen times per window, not on every charge. Fields of a quota
//! that was removed from the config stay in the hashes of keys that keep sending
//! until those keys go quiet.

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

/// Helpers shared by the scripts (prepended to each).
const COMMON_LUA: &str = r#"
local tonumber, floor = tonumber, math.floor
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
-- The oldest bucket counted now: the one holding now - W + 1.
local function lower_of(W, b) return floor((now + 1 - W) / b) end
-- A window's state: total, lowest bucket kept, latest bucket, units in it, as four
-- little-endian doubles (exact for integers below 2^53; packing is several times
-- cheaper than formatting numbers as text, and this runs for every window).
local pack, unpack4 = struct.pack, struct.unpack
local function parse(s)
  if not s then return nil end
  local t, lo, cb, cv = unpack4('<dddd', s)
  return t, lo, cb, cv
end
local function state(t, lo, cb, cv) return pack('<dddd', t, lo, cb, cv) end
-- Units per bucket j = from .. cb: older ones from their fields, cb from the state.
local function buckets(key, sf, from, cb, cv)
  local fields, n = {}, 0
  for j = from, cb - 1 do
    n = n + 1
    fields[n] = sf .. ':' .. j
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
local function frees(key, sf, lo, cb, cv, W, b, need)
  if not lo or need <= 0 then return 0 end
  local acc = 0
  for i, v in ipairs(buckets(key, sf, lo, cb, cv)) do
    acc = acc + v
    if v > 0 and acc >= need then return (lo + i) * b + W - 1 end
  end
  return -1
end
"#;

/// Check and charge, as the body of `local function guard(KEYS, ARGV)` (so that it
/// can run alone, or before an enqueue in the same call: see [`RedisCounters`]);
/// the Rust twin is [`super::window::WindowState`]. Written for speed (it runs once
/// per message, over every window of every matching quota): per-window state in flat
/// arrays, per key one `HMGET` and one `HSET`.
pub const CHARGE_LUA: &str = r#"
-- KEYS: one counter hash per key group, then the key index
-- ARGV: now ('' = Redis TIME), the numbers, then the strings. The numbers are
--   little-endian doubles (one C call to read, instead of parsing text): group
--   count, then per group: ttl ms, request count, then per request: cost, window
--   count, then per window: limit, window ms, bucket ms. The strings: per group
--   the key, then per window its state field name (`<quota>:<window ms>`).
-- Returns whether all fit, and little-endian doubles: allowed (1/0), now, then per
--   group, request and window: used, retry_at (0 fits, -1 never), free_at (0 when a
--   unit is free)
local index = KEYS[#KEYS]
local num, pos = ARGV[2], 1
local ngroups
ngroups, pos = unpack4('<d', num, pos)
-- Per window i (numbered across all groups): state field, cost, limit, window,
-- bucket size, and the state: total, lowest bucket, latest bucket, units in it.
local sf, cost, limit, W, b, total, lo, cb, cv, retry, rolled_at =
  {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}
local gfirst, glast, gmember, gttl, gsure = {}, {}, {}, {}, {}
local allowed = true
local si = 3
local n = 0
for g = 1, ngroups do
  local key = KEYS[g]
  local nreq
  gttl[g], nreq, pos = unpack4('<dd', num, pos)
  gmember[g] = ARGV[si]
  si = si + 1
  gfirst[g] = n + 1
  for r = 1, nreq do
    local c, nw
    c, nw, pos = unpack4('<dd', num, pos)
    for w = 1, nw do
      n = n + 1
      cost[n], sf[n] = c, ARGV[si]
      limit[n], W[n], b[n], pos = unpack4('<ddd', num, pos)
      si = si + 1
    end
  end
  glast[g] = n
  sf[n + 1] = '~'
  local vals = redis.call('HMGET', key, unpack(sf, gfirst[g], n + 1))
  sf[n + 1] = nil
  gsure[g] = tonumber(vals[n - gfirst[g] + 2]) or 0
  -- Drop the buckets that no longer count, for every window of the key at once.
  local drop, nd, rolled = nil, 0, nil
  for i = gfirst[g], n do
    local t, l, c, v = parse(vals[i - gfirst[g] + 1])
    total[i], lo[i], cb[i], cv[i] = t or 0, l, c, v
    if l then
      local lower = lower_of(W[i], b[i])
      if lower > l then
        drop = drop or {}
        rolled = rolled or {}
        local from = nd + 1
        -- Older buckets are fields below the latest one; the state holds at most
        -- one window's worth of them, so this stays short after any idle time.
        for j = l, math.min(lower, c) - 1 do
          nd = nd + 1
          drop[nd] = sf[i] .. ':' .. j
        end
        rolled[#rolled + 1] = {i, from, nd, lower}
      end
    end
  end
  if rolled then
    local dv = {}
    if nd > 0 then
      dv = redis.call('HMGET', key, unpack(drop))
      redis.call('HDEL', key, unpack(drop))
    end
    for _, r in ipairs(rolled) do
      local i, lower = r[1], r[4]
      local t = total[i]
      for j = r[2], r[3] do
        if dv[j] then t = t - tonumber(dv[j]) end
      end
      if cb[i] < lower then
        t = t - cv[i]
        cb[i], cv[i] = lower, 0
      end
      total[i], lo[i] = t, lower
      rolled_at[i] = true
    end
  end
  for i = gfirst[g], n do
    local c = cost[i]
    if c > limit[i] then
      retry[i] = -1
    elseif total[i] + c <= limit[i] then
      retry[i] = 0
    else
      retry[i] = frees(key, sf[i], lo[i], cb[i], cv[i], W[i], b[i], total[i] + c - limit[i])
    end
    if retry[i] ~= 0 then allowed = false end
  end
end

local out, no = {allowed and 1 or 0, now}, 2
for g = 1, ngroups do
  local key, ttl = KEYS[g], gttl[g]
  local first, last = gfirst[g], glast[g]
  local set, ns = {}, 0
  for i = first, last do
    if allowed then
      local c, cur = cost[i], floor(now / b[i])
      if not lo[i] then
        lo[i], cb[i], cv[i] = lower_of(W[i], b[i]), cur, 0
      end
      if cur > cb[i] then
        -- The latest bucket is finished: it becomes a field of its own.
        if cv[i] > 0 then
          set[ns + 1], set[ns + 2] = sf[i] .. ':' .. cb[i], cv[i]
          ns = ns + 2
        end
        cb[i], cv[i] = cur, 0
      end
      if cur == cb[i] then
        cv[i] = cv[i] + c
      else
        -- Redis TIME went back: charge the earlier bucket's field.
        redis.call('HINCRBY', key, sf[i] .. ':' .. cur, c)
      end
      total[i] = total[i] + c
    end
    if lo[i] and (allowed or rolled_at[i]) then
      set[ns + 1], set[ns + 2] = sf[i], state(total[i], lo[i], cb[i], cv[i])
      ns = ns + 2
    end
  end
  if allowed and gsure[g] < now + ttl then
    -- The hash must outlive its counters: until ttl after this charge. Its expiry
    -- (and index entry) are pushed a sixteenth further than needed, and the time
    -- they are good until is kept in the field `~`, so that most charges skip this.
    local keep = ttl + floor(ttl / 16)
    set[ns + 1], set[ns + 2] = '~', now + keep
    ns = ns + 2
    redis.call('HSET', key, unpack(set))
    ns = 0
    -- Never shorten: the hash may hold longer windows of other quotas.
    if redis.call('PTTL', key) < keep then
      redis.call('PEXPIRE', key, keep)
    end
    local old = redis.call('ZSCORE', index, gmember[g])
    if not old or tonumber(old) < now + keep then
      redis.call('ZADD', index, now + keep, gmember[g])
    end
    if redis.call('PTTL', index) < keep then
      redis.call('PEXPIRE', index, keep)
    end
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  end
  if ns > 0 then redis.call('HSET', key, unpack(set)) end
  for i = first, last do
    local free = 0
    if total[i] >= limit[i] then
      free = frees(key, sf[i], lo[i], cb[i], cv[i], W[i], b[i], total[i] + 1 - limit[i])
      if free < 0 then free = 0 end
    end
    out[no + 1], out[no + 2], out[no + 3] = total[i], retry[i], free
    no = no + 3
  end
end
return allowed, pack('<' .. string.rep('d', no), unpack(out))
"#;

const REFUND_LUA: &str = r#"
-- KEYS: one counter hash per request
-- ARGV: charge time, then per request: cost, window count, then per window: bucket
--   ms, state field name
local a = 2
for _, key in ipairs(KEYS) do
  local cost, nw = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for w = 1, nw do
    local j, sf = floor(now / tonumber(ARGV[a])), ARGV[a + 1]
    a = a + 2
    local t, lo, cb, cv = parse(redis.call('HGET', key, sf))
    if t then
      local back = 0
      if j == cb then
        back = math.min(cost, cv)
        cv = cv - back
      else
        local f = sf .. ':' .. j
        local c = tonumber(redis.call('HGET', key, f) or '0')
        back = math.min(cost, c)
        if back == c then
          redis.call('HDEL', key, f)
        elseif back > 0 then
          redis.call('HINCRBY', key, f, -back)
        end
      end
      if back > 0 then
        redis.call('HSET', key, sf, state(t - back, lo, cb, cv))
      end
    end
  end
end
return 0
"#;

const USAGE_LUA: &str = r#"
-- KEYS: one counter hash per key
-- ARGV: now ('' = Redis TIME), window count, then per window: window ms, bucket ms,
--   state field name
-- Returns now, then per key and window: used, resets_at (now when nothing counts)
local out = {now}
local nw = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  for w = 0, nw - 1 do
    local W, b, sf = tonumber(ARGV[3 + 3 * w]), tonumber(ARGV[4 + 3 * w]), ARGV[5 + 3 * w]
    local used, resets = 0, nil
    local t, lo, cb, cv = parse(redis.call('HGET', key, sf))
    if t then
      local from = math.max(lo, lower_of(W, b))
      for i, v in ipairs(buckets(key, sf, from, cb, cv)) do
        if v > 0 then
          used = used + v
          if not resets then resets = (from + i) * b + W - 1 end
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
-- ARGV: now ('' = Redis TIME), counter hash prefix (up to the key), state field
--   name, window ms, bucket ms, most keys to look at
-- Returns key, used pairs for keys with units of the quota counted in the window,
-- from the ones charged last. The hash keys are built here: they share the
-- index's hash tag, so its slot.
local sf, W, b = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local members = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. now,
  'LIMIT', 0, tonumber(ARGV[6]))
local out = {}
for _, m in ipairs(members) do
  local key = ARGV[2] .. m
  local t, lo, cb, cv = parse(redis.call('HGET', key, sf))
  if t then
    local used = 0
    for _, v in ipairs(buckets(key, sf, math.max(lo, lower_of(W, b)), cb, cv)) do
      used = used + v
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
    format!("local function guard(KEYS, ARGV)\n{COMMON_LUA}{CHARGE_LUA}\nend\n")
}

/// Quota windows one check may cover: the script hands each key's fields to one
/// `HMGET` and packs its reply in one call, both bounded by Lua's stack (8000).
pub const MAX_WINDOWS_PER_CHECK: usize = 2000;

/// The hash tag of every quota key.
fn tag(prefix: &str) -> String {
    format!("{prefix}:{{{prefix}:quota}}")
}

/// The counter hash of one key (every quota and window of it).
pub fn counter_key(prefix: &str, key: &str) -> String {
    format!("{}:c:{key}", tag(prefix))
}

/// The state field of one quota window in a key's hash.
pub fn state_field(quota: &str, w: &WindowSpec) -> String {
    format!("{quota}:{}", w.window_ms)
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
        let script = |body: &str| Script::new(&format!("{COMMON_LUA}{body}"));
        let store = RedisCounters {
            charge: Script::new(&format!(
                "{}local _, reply = guard(KEYS, ARGV)\nreturn reply\n",
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
        let mut num: Vec<u8> =
            Vec::with_capacity(8 * (1 + 2 * reqs.len() + 2 * groups.len() + 3 * windows));
        let mut put = |v: u64| num.extend_from_slice(&(v as f64).to_le_bytes());
        put(groups.len() as u64);
        let mut keys = Vec::with_capacity(groups.len() + 1);
        let mut strings: Vec<Vec<u8>> = Vec::with_capacity(groups.len() + windows);
        for (key, members) in &groups {
            let ttl = members
                .iter()
                .map(|&i| reqs[i].index_ttl_ms())
                .max()
                .unwrap_or(1);
            keys.push(counter_key(self.prefix(), key));
            put(ttl);
            put(members.len() as u64);
            strings.push(key.as_bytes().to_vec());
            for &i in members {
                let r = &reqs[i];
                put(r.cost);
                put(r.windows.len() as u64);
                for w in &r.windows {
                    put(w.limit);
                    put(w.window_ms);
                    put(w.bucket_ms);
                    strings.push(state_field(&r.quota, w).into_bytes());
                }
            }
        }
        keys.push(index_key(self.prefix()));
        let mut args = Vec::with_capacity(2 + strings.len());
        args.push(at_arg(at).into_bytes());
        args.push(num);
        args.extend(strings);
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
                for w in &r.windows {
                    inv.arg(w.bucket_ms).arg(state_field(&r.quota, w));
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
                inv.arg(w.window_ms)
                    .arg(w.bucket_ms)
                    .arg(state_field(quota, w));
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
                .arg(state_field(quota, &window))
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
