//! Quota counters in Redis, shared by every relay process on the same Redis: the
//! sliding window of [`super::window`], in Lua.
//!
//! # One round trip per message
//!
//! [`CHARGE_LUA`] checks every window of every quota a message falls under and, only
//! if all fit, charges them all: one `EVALSHA`, atomic, whatever the number of
//! quotas. The clock is Redis `TIME`, so relays with skewed clocks still share one
//! window. Plain Redis (no modules), 5.0 or later (scripts that read `TIME` before
//! writing need effects replication, the default since 5.0).
//!
//! # Keys
//!
//! With `key_prefix: mr`, every quota key carries the hash tag `{mr:quota}`:
//!
//! | key                                     | type       | content                                  |
//! |-----------------------------------------|------------|------------------------------------------|
//! | `mr:{mr:quota}:c:<quota>:<window ms>:<key>` | hash   | `t` counted total, `l` lowest bucket kept, and one field per bucket index |
//! | `mr:{mr:quota}:k:<quota>`               | sorted set | keys charged, scored by the last charge (for the usage API) |
//!
//! One hash tag for all quota counters puts them in one Redis Cluster slot, so one
//! script can charge a message's quotas of different keys (sender, AUTH user,
//! shared) atomically. The price is that all quota counters live on one cluster
//! node: a check costs that node a few dozen hash operations, far below what one
//! Redis node serves, while the queue itself stays spread over all nodes.
//!
//! A counter expires by itself one window plus one bucket after its last charge
//! (by then every bucket has stopped counting); the key index expires likewise after
//! the quota's longest window, and each charge drops index entries older than that.

use redis::Script;

use super::store::{
    ChargeOutcome, ChargeRequest, CounterStore, CounterUsage, MAX_KEYS_SCANNED, StoreError,
    StoreFuture, UsageReport,
};
use super::window::{WindowCheck, WindowSpec};
use crate::queue::redis::SharedRedis;

/// Helpers shared by the scripts (prepended to each).
const COMMON_LUA: &str = r#"
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local function fmt(n) return string.format('%d', n) end
-- The oldest bucket counted now: the one holding now - W + 1.
local function lower_of(W, b) return math.floor((now + 1 - W) / b) end
-- The counted buckets lo .. now as {index, count} (count false when empty).
local function buckets(key, from, b)
  local cur = math.floor(now / b)
  local fields = {}
  for j = from, cur do fields[#fields + 1] = fmt(j) end
  if #fields == 0 then return {}, from end
  return redis.call('HMGET', key, unpack(fields)), from
end
-- When `need` units will have stopped counting: walks the buckets from the oldest.
-- -1: never (fewer than `need` are counted).
local function frees(key, lo, W, b, need)
  if not lo or need <= 0 then return 0 end
  local vals, from = buckets(key, lo, b)
  local acc = 0
  for i = 1, #vals do
    local v = vals[i]
    if v then
      acc = acc + tonumber(v)
      if acc >= need then return (from + i) * b + W - 1 end
    end
  end
  return -1
end
"#;

/// Check and charge; the Rust twin is [`super::window::WindowState`].
pub const CHARGE_LUA: &str = r#"
-- KEYS: per request: the quota's key index, then one counter hash per window
-- ARGV: now ('' = Redis TIME), request count, then per request: cost, key, index
--   ttl ms, window count, then per window: limit, window ms, bucket ms
-- Returns allowed (1/0), now, then per request and window: used, retry_at (0 fits,
--   -1 never), free_at (0 when a unit is free)
-- Drops the buckets that no longer count; returns the total and lo (nil: none kept).
local function roll(key, W, b)
  local h = redis.call('HMGET', key, 't', 'l')
  local lo = tonumber(h[2])
  if not lo then return 0, nil end
  local total = tonumber(h[1]) or 0
  local lower = lower_of(W, b)
  if lower <= lo then return total, lo end
  if lower - lo > math.ceil(W / b) + 2 then
    -- Idle for longer than a window: everything is stale.
    redis.call('DEL', key)
    return 0, nil
  end
  local fields = {}
  for j = lo, lower - 1 do fields[#fields + 1] = fmt(j) end
  local vals = redis.call('HMGET', key, unpack(fields))
  for i = 1, #vals do
    if vals[i] then total = total - tonumber(vals[i]) end
  end
  redis.call('HDEL', key, unpack(fields))
  redis.call('HSET', key, 't', fmt(total), 'l', fmt(lower))
  return total, lower
end

local n = tonumber(ARGV[2])
local a, k = 3, 1
local reqs = {}
local allowed = true
for r = 1, n do
  local req = {cost = tonumber(ARGV[a]), member = ARGV[a + 1], ttl = ARGV[a + 2],
               index = KEYS[k], wins = {}}
  local nw = tonumber(ARGV[a + 3])
  a = a + 4
  k = k + 1
  for w = 1, nw do
    local win = {limit = tonumber(ARGV[a]), W = tonumber(ARGV[a + 1]),
                 b = tonumber(ARGV[a + 2]), key = KEYS[k]}
    a = a + 3
    k = k + 1
    win.total, win.lo = roll(win.key, win.W, win.b)
    if req.cost > win.limit then
      win.retry = -1
    elseif win.total + req.cost <= win.limit then
      win.retry = 0
    else
      win.retry = frees(win.key, win.lo, win.W, win.b, win.total + req.cost - win.limit)
    end
    if win.retry ~= 0 then allowed = false end
    req.wins[w] = win
  end
  reqs[r] = req
end

local out = {allowed and 1 or 0, now}
for _, req in ipairs(reqs) do
  for _, win in ipairs(req.wins) do
    if allowed then
      if not win.lo then
        win.lo = lower_of(win.W, win.b)
        redis.call('HSET', win.key, 'l', fmt(win.lo))
      end
      redis.call('HINCRBY', win.key, fmt(math.floor(now / win.b)), req.cost)
      win.total = redis.call('HINCRBY', win.key, 't', req.cost)
      redis.call('PEXPIRE', win.key, win.W + win.b)
    end
    local free = 0
    if win.total >= win.limit then
      free = frees(win.key, win.lo, win.W, win.b, win.total + 1 - win.limit)
      if free < 0 then free = 0 end
    end
    out[#out + 1] = win.total
    out[#out + 1] = win.retry
    out[#out + 1] = free
  end
  if allowed then
    redis.call('ZADD', req.index, now, req.member)
    redis.call('ZREMRANGEBYSCORE', req.index, '-inf', fmt(now - tonumber(req.ttl)))
    redis.call('PEXPIRE', req.index, req.ttl)
  end
end
return out
"#;

const REFUND_LUA: &str = r#"
-- KEYS: counter hashes
-- ARGV: charge time, then per key: cost, bucket ms
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[2 * i])
  local f = fmt(math.floor(now / tonumber(ARGV[2 * i + 1])))
  local c = tonumber(redis.call('HGET', key, f) or '0')
  if c > 0 then
    local back = math.min(cost, c)
    if back == c then
      redis.call('HDEL', key, f)
    else
      redis.call('HINCRBY', key, f, -back)
    end
    redis.call('HINCRBY', key, 't', -back)
  end
end
return 0
"#;

const USAGE_LUA: &str = r#"
-- KEYS: counter hashes
-- ARGV: now ('' = Redis TIME), then per key: window ms, bucket ms
-- Returns now, then per key: used, resets_at (now when nothing is counted)
local out = {now}
for i, key in ipairs(KEYS) do
  local W, b = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local used, resets = 0, nil
  local lo = tonumber(redis.call('HGET', key, 'l'))
  if lo then
    local vals, from = buckets(key, math.max(lo, lower_of(W, b)), b)
    for j = 1, #vals do
      local v = tonumber(vals[j] or '0')
      if v > 0 then
        used = used + v
        if not resets then resets = (from + j) * b + W - 1 end
      end
    end
  end
  out[#out + 1] = used
  out[#out + 1] = resets or now
end
return out
"#;

const ACTIVE_LUA: &str = r#"
-- KEYS: the quota's key index
-- ARGV: now ('' = Redis TIME), counter key prefix (up to the key), window ms,
--   bucket ms, most keys to look at
-- Returns key, used pairs for keys with units counted in the window, most
-- recently charged first. The counter keys are built here: they share the index's
-- hash tag, so its slot.
local W, b = tonumber(ARGV[3]), tonumber(ARGV[4])
local members = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. fmt(now - W - b),
  'LIMIT', 0, tonumber(ARGV[5]))
local out = {}
for _, m in ipairs(members) do
  local key = ARGV[2] .. m
  local lo = tonumber(redis.call('HGET', key, 'l'))
  if lo then
    local vals = buckets(key, math.max(lo, lower_of(W, b)), b)
    local used = 0
    for j = 1, #vals do used = used + tonumber(vals[j] or '0') end
    if used > 0 then
      out[#out + 1] = m
      out[#out + 1] = used
    end
  end
end
return out
"#;

/// The hash tag of every quota key.
fn tag(prefix: &str) -> String {
    format!("{prefix}:{{{prefix}:quota}}")
}

/// Counter hash of one quota, window and key.
pub fn counter_key(prefix: &str, quota: &str, window_ms: u64, key: &str) -> String {
    format!("{}:c:{quota}:{window_ms}:{key}", tag(prefix))
}

/// Key index of one quota.
pub fn index_key(prefix: &str, quota: &str) -> String {
    format!("{}:k:{quota}", tag(prefix))
}

pub struct RedisCounters {
    redis: SharedRedis,
    charge: Script,
    refund: Script,
    usage: Script,
    active: Script,
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
            charge: script(CHARGE_LUA),
            refund: script(REFUND_LUA),
            usage: script(USAGE_LUA),
            active: script(ACTIVE_LUA),
            redis,
        };
        for s in [&store.charge, &store.refund, &store.usage, &store.active] {
            store.redis.load(s).await.map_err(unavailable)?;
        }
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
        other => Err(StoreError::Corrupt(format!("expected an integer, got {other:?}"))),
    }
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
            let mut inv = self.charge.prepare_invoke();
            inv.arg(at_arg(at)).arg(reqs.len());
            for r in reqs {
                inv.key(index_key(self.prefix(), &r.quota))
                    .arg(r.cost)
                    .arg(&r.key)
                    .arg(r.index_ttl_ms())
                    .arg(r.windows.len());
                for w in &r.windows {
                    inv.key(counter_key(self.prefix(), &r.quota, w.window_ms, &r.key))
                        .arg(w.limit)
                        .arg(w.window_ms)
                        .arg(w.bucket_ms);
                }
            }
            let flat: Vec<redis::Value> = self.redis.invoke(&inv).await.map_err(unavailable)?;
            let expected = 2 + 3 * reqs.iter().map(|r| r.windows.len()).sum::<usize>();
            if flat.len() != expected {
                return Err(StoreError::Corrupt(format!(
                    "charge reply has {} fields, expected {expected}",
                    flat.len()
                )));
            }
            let mut it = flat.iter();
            let allowed = int(it.next().unwrap())? == 1;
            let now = int(it.next().unwrap())?.max(0) as u64;
            let mut checks = Vec::with_capacity(reqs.len());
            for r in reqs {
                let mut per = Vec::with_capacity(r.windows.len());
                for _ in &r.windows {
                    let used = int(it.next().unwrap())?.max(0) as u64;
                    let retry = int(it.next().unwrap())?;
                    let free = int(it.next().unwrap())?.max(0) as u64;
                    per.push(WindowCheck {
                        used,
                        retry_at: (retry >= 0).then_some(retry as u64),
                        free_at: free,
                    });
                }
                checks.push(per);
            }
            Ok(ChargeOutcome {
                allowed,
                now,
                checks,
            })
        })
    }

    fn refund<'a>(&'a self, reqs: &'a [ChargeRequest], charged_at: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut inv = self.refund.prepare_invoke();
            inv.arg(charged_at);
            for r in reqs {
                for w in &r.windows {
                    inv.key(counter_key(self.prefix(), &r.quota, w.window_ms, &r.key))
                        .arg(r.cost)
                        .arg(w.bucket_ms);
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
            inv.arg(at_arg(at));
            for k in keys {
                for w in windows {
                    inv.key(counter_key(self.prefix(), quota, w.window_ms, k))
                        .arg(w.window_ms)
                        .arg(w.bucket_ms);
                }
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
            inv.key(index_key(self.prefix(), quota))
                .arg(at_arg(at))
                .arg(counter_key(self.prefix(), quota, window.window_ms, ""))
                .arg(window.window_ms)
                .arg(window.bucket_ms)
                .arg(MAX_KEYS_SCANNED);
            let flat: Vec<redis::Value> = self.redis.invoke(&inv).await.map_err(unavailable)?;
            flat.chunks(2)
                .map(|c| match c {
                    [redis::Value::BulkString(k), n] => {
                        Ok((String::from_utf8_lossy(k).into_owned(), int(n)?.max(0) as u64))
                    }
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
            counter_key("mr", "tenant-a", 60_000, "alice@a.example"),
            counter_key("mr", "tenant-b", 3_600_000, "*"),
            counter_key("mr", "x", 1000, "{weird}key"),
            index_key("mr", "tenant-a"),
        ];
        assert_eq!(keys[0], "mr:{mr:quota}:c:tenant-a:60000:alice@a.example");
        assert_eq!(keys[3], "mr:{mr:quota}:k:tenant-a");
        assert!(keys.iter().all(|k| slot(k) == slot(&keys[0])));
    }
}
