//! The Redis egress store: pacing, connection leases and back-off shared by every
//! relay process, with one Lua script per check (plain Redis, no modules).
//!
//! # Keys
//!
//! Every key carries the hash tag `{<prefix>:eg}`, so in Redis Cluster they share one
//! slot and one script can check all quotas a message falls under atomically. (Egress
//! checks are one small script per message; one slot carries that easily.) With the
//! default prefix `mr`:
//!
//! | key                                  | type       | content                                   |
//! |--------------------------------------|------------|-------------------------------------------|
//! | `mr:{mr:eg}:w:<quota>:<window_ms>:<key>` | hash   | `tat` (GCRA), and units per end bucket     |
//! | `mr:{mr:eg}:f:<quota>:<key>`         | sorted set | messages in flight `token|cost` by deadline |
//! | `mr:{mr:eg}:c:<quota>:<key>`         | sorted set | connection leases by expiry               |
//! | `mr:{mr:eg}:k:<quota>`               | sorted set | keys of the quota by last use (for usage) |
//! | `mr:{mr:eg}:bo:<site>`               | hash       | back-off `level` and `hit` (ms)           |
//!
//! Every key gets a `PEXPIRE` long enough for what it still has to count (a window
//! hash: its GCRA horizon plus one window; a flight set: the flight deadline plus the
//! longest window, so an expired flight is still charged), so idle destinations
//! leave nothing behind. Times come from Redis `TIME`: relay clocks never matter.

use std::future::Future;
use std::time::Duration;

use redis::{RedisError, Script, Value};

use super::backoff::BackoffPolicy;
use super::pacer::Window;
use super::store::{
    Acquire, AcquireReply, Close, EgressError, Extend, KeyRef, KeyUse, USAGE_SCAN, Verdict,
};
use crate::config::RedisConfig;
use crate::redis_conn::{self, Conn, ConnectError, Timeouts, redact};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole call, reconnects included: egress waits rather than sends when Redis
/// does not answer, so it must learn that quickly.
const OP_DEADLINE: Duration = Duration::from_secs(4);

/// Shared by the scripts: the clock, and reading one window's state.
const PRELUDE: &str = r#"
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function window(key, W, N)
  local g = math.floor(W / 60)
  if g < 1 then g = 1 end
  local b = math.ceil(N / 10)
  if b < 1 then b = 1 end
  if b > 10 then b = 10 end
  return {key = key, W = W, N = N, g = g, b = b}
end
local function first_counted(w, t)
  local d = t - w.W
  if d < 0 then d = 0 end
  return math.floor(d / w.g)
end
-- Units ending at `at`; the hash lives at least until that bucket leaves the window.
local function charge(wins, at, cost, now)
  for _, w in ipairs(wins) do
    redis.call('HINCRBY', w.key, tostring(math.floor(at / w.g)), cost)
    local keep = at - now
    if keep < 0 then keep = 0 end
    keep = keep + w.W + w.g + 1000
    if redis.call('PTTL', w.key) < keep then
      redis.call('PEXPIRE', w.key, keep)
    end
  end
end
local function cost_of(member)
  local c = string.match(member, '|(%d+)$')
  return tonumber(c or '1')
end
-- Commit (if any), then expired flights charged at their deadline, then buckets no
-- grant can count any more dropped. Returns units still in flight.
local function sweep(flight, wins, now, commit_member, commit_cost, commit_end)
  if commit_member then
    redis.call('ZREM', flight, commit_member)
    charge(wins, commit_end, commit_cost, now)
  end
  local expired = redis.call('ZRANGEBYSCORE', flight, '-inf', now, 'WITHSCORES')
  for i = 1, #expired, 2 do
    redis.call('ZREM', flight, expired[i])
    charge(wins, tonumber(expired[i + 1]), cost_of(expired[i]), now)
  end
  for _, w in ipairs(wins) do
    local h = redis.call('HGETALL', w.key)
    local first = first_counted(w, now)
    w.tat = 0
    w.buckets = {}
    for i = 1, #h, 2 do
      if h[i] == 'tat' then
        w.tat = tonumber(h[i + 1])
      else
        local b = tonumber(h[i])
        if b < first then
          redis.call('HDEL', w.key, h[i])
        else
          table.insert(w.buckets, {b, tonumber(h[i + 1])})
        end
      end
    end
    table.sort(w.buckets, function(x, y) return x[1] < y[1] end)
  end
  local units = 0
  for _, m in ipairs(redis.call('ZRANGE', flight, 0, -1)) do
    units = units + cost_of(m)
  end
  return units
end
"#;

const ACQUIRE_LUA: &str = r#"
-- KEYS[1]: back-off hash of the site; per quota key: flight set, lease set, key
-- index, then one hash per window.
-- ARGV: now ('' = TIME), max wait, flight ttl, lease ttl, token ('' = none),
-- commit token ('' = none), commit end, lease id ('' = none), back-off base,
-- back-off recover, number of keys; per key: key name, max connections (0 = none),
-- cost, commit cost, number of windows, then per window: window ms, limit.
-- Returns {verdict, at, now, level}: 0 granted, 1 later, 2 backed off, 3 blocked,
-- 4 no connection.
local now = clock(ARGV[1])
local max_wait = tonumber(ARGV[2])
local flight_ttl = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[4])
local token = ARGV[5]
local commit = ARGV[6]
local commit_end = tonumber(ARGV[7])
local lease = ARGV[8]
local bo_base = tonumber(ARGV[9])
local bo_recover = tonumber(ARGV[10])
local nkeys = tonumber(ARGV[11])

local qs = {}
local ki, ai = 2, 12
for q = 1, nkeys do
  local e = {flight = KEYS[ki], conns = KEYS[ki + 1], index = KEYS[ki + 2], name = ARGV[ai],
    maxc = tonumber(ARGV[ai + 1]), cost = tonumber(ARGV[ai + 2]), ccost = tonumber(ARGV[ai + 3]),
    wins = {}, maxw = 0}
  local nwin = tonumber(ARGV[ai + 4])
  ki = ki + 3
  ai = ai + 5
  for w = 1, nwin do
    local W = tonumber(ARGV[ai])
    e.wins[w] = window(KEYS[ki], W, tonumber(ARGV[ai + 1]))
    if W > e.maxw then e.maxw = W end
    ki = ki + 1
    ai = ai + 2
  end
  qs[q] = e
end

for _, e in ipairs(qs) do
  if #e.wins > 0 then
    local cm = nil
    if commit ~= '' then cm = commit .. '|' .. e.ccost end
    e.units = sweep(e.flight, e.wins, now, cm, e.ccost, commit_end)
  end
end

local bo = redis.call('HMGET', KEYS[1], 'level', 'hit')
local level = tonumber(bo[1] or '0')
local hit = tonumber(bo[2] or '0')
local until_ = 0
local eff = level
if level > 0 then
  until_ = hit + bo_base * 2 ^ math.min(level - 1, 30)
  if now >= until_ then
    local r = bo_recover
    if r < 1 then r = 1 end
    eff = level - math.floor((now - until_) / r)
    if eff < 0 then eff = 0 end
  end
end
if until_ > now and until_ - now > max_wait then
  return {2, until_, now, eff}
end

if lease ~= '' then
  for _, e in ipairs(qs) do
    if e.maxc > 0 then
      redis.call('ZREMRANGEBYSCORE', e.conns, '-inf', now)
      if not redis.call('ZSCORE', e.conns, lease) and redis.call('ZCARD', e.conns) >= e.maxc then
        return {4, 0, now, eff}
      end
    end
  end
end

local at = now
if until_ > at then at = until_ end
if token ~= '' then
  local factor = 2 ^ math.min(eff, 30)
  for _, e in ipairs(qs) do
    if #e.wins > 0 then
      for _, w in ipairs(e.wins) do
        w.T = w.W * factor / w.N
        if w.tat > 0 then
          local tau = (w.b - 1) * w.T
          local need = w.tat - tau + (e.cost - 1) * w.T
          if w.tat < need then need = w.tat end
          if need > at then at = math.ceil(need) end
        end
      end
    end
  end
  for _, e in ipairs(qs) do
    if #e.wins > 0 then
      for _, w in ipairs(e.wins) do
        local room = w.N - e.cost
        if room < 0 then room = 0 end
        if e.units > room then
          return {3, 0, now, eff}
        end
        local first = first_counted(w, at)
        local total = e.units
        for _, bc in ipairs(w.buckets) do
          if bc[1] >= first then total = total + bc[2] end
        end
        for _, bc in ipairs(w.buckets) do
          if total <= room then break end
          if bc[1] >= first then
            total = total - bc[2]
            local t = (bc[1] + 1) * w.g + w.W
            if t > at then at = t end
          end
        end
      end
    end
  end
  if at - now > max_wait then
    return {1, at, now, eff}
  end
  for _, e in ipairs(qs) do
    if #e.wins > 0 then
      for _, w in ipairs(e.wins) do
        local base = w.tat
        if at > base then base = at end
        local tat = math.ceil(base + e.cost * w.T)
        redis.call('HSET', w.key, 'tat', tat)
        redis.call('PEXPIRE', w.key, math.max(tat - now, 0) + w.W + flight_ttl + max_wait + 1000)
      end
      redis.call('ZADD', e.flight, at + flight_ttl, token .. '|' .. e.cost)
      redis.call('PEXPIRE', e.flight, flight_ttl + max_wait + e.maxw + 1000)
    end
  end
end

for _, e in ipairs(qs) do
  if lease ~= '' and e.maxc > 0 then
    redis.call('ZADD', e.conns, now + lease_ttl, lease)
    redis.call('PEXPIRE', e.conns, lease_ttl + 1000)
  end
  redis.call('ZADD', e.index, now, e.name)
  redis.call('PEXPIRE', e.index, e.maxw + flight_ttl + 3600000)
end
return {0, at, now, eff}
"#;

const EXTEND_LUA: &str = r#"
-- KEYS per quota key: flight set, lease set.
-- ARGV: now, lease id ('' = none), lease ttl, flight ttl, number of keys; per key:
-- max connections (0 = none), flight member ('' = none), longest window ms.
-- Returns the number of leases still held.
local now = clock(ARGV[1])
local lease, lease_ttl, flight_ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local held = 0
for q = 1, tonumber(ARGV[5]) do
  local flight, conns = KEYS[2 * q - 1], KEYS[2 * q]
  local maxc, member, maxw = tonumber(ARGV[3 * q + 3]), ARGV[3 * q + 4], tonumber(ARGV[3 * q + 5])
  if lease ~= '' and maxc > 0 then
    local exp = redis.call('ZSCORE', conns, lease)
    -- An expired lease is not revived: another relay may hold its place now.
    if exp and tonumber(exp) > now then
      redis.call('ZADD', conns, now + lease_ttl, lease)
      redis.call('PEXPIRE', conns, lease_ttl + 1000)
      held = held + 1
    end
  end
  if member ~= '' then
    local d = redis.call('ZSCORE', flight, member)
    if d and tonumber(d) < now + flight_ttl then
      redis.call('ZADD', flight, now + flight_ttl, member)
      -- Kept until the flight, charged at its deadline, no longer counts.
      if redis.call('PTTL', flight) < flight_ttl + maxw + 1000 then
        redis.call('PEXPIRE', flight, flight_ttl + maxw + 1000)
      end
    end
  end
end
return held
"#;

const CLOSE_LUA: &str = r#"
-- KEYS per quota key: flight set, lease set, then one hash per window.
-- ARGV: now, lease id ('' = none), commit token ('' = none), commit end, number of
-- keys; per key: commit cost, number of windows, then per window: window ms, limit.
local now = clock(ARGV[1])
local lease, commit, commit_end = ARGV[2], ARGV[3], tonumber(ARGV[4])
local ki, ai = 1, 6
for q = 1, tonumber(ARGV[5]) do
  local flight, conns = KEYS[ki], KEYS[ki + 1]
  local ccost, nwin = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
  ki = ki + 2
  ai = ai + 2
  local wins = {}
  for w = 1, nwin do
    wins[w] = window(KEYS[ki], tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]))
    ki = ki + 1
    ai = ai + 2
  end
  if commit ~= '' and nwin > 0 then
    redis.call('ZREM', flight, commit .. '|' .. ccost)
    charge(wins, commit_end, ccost, now)
  end
  if lease ~= '' then
    redis.call('ZREM', conns, lease)
  end
end
return 1
"#;

const RATE_LIMITED_LUA: &str = r#"
-- KEYS[1]: back-off hash. ARGV: now, base, max level, recover.
-- Returns the end of the pause and now.
local now = clock(ARGV[1])
local base, max_level, recover = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if recover < 1 then recover = 1 end
if max_level < 1 then max_level = 1 end
local bo = redis.call('HMGET', KEYS[1], 'level', 'hit')
local level = tonumber(bo[1] or '0')
local hit = tonumber(bo[2] or '0')
local until_ = 0
if level > 0 then until_ = hit + base * 2 ^ math.min(level - 1, 30) end
if level > 0 and now < until_ then
  return {until_, now}
end
local eff = level
if level > 0 then
  eff = level - math.floor((now - until_) / recover)
  if eff < 0 then eff = 0 end
end
level = math.min(eff + 1, max_level)
until_ = now + base * 2 ^ math.min(level - 1, 30)
redis.call('HSET', KEYS[1], 'level', level, 'hit', now)
redis.call('PEXPIRE', KEYS[1], until_ - now + level * recover + 1000)
return {until_, now}
"#;

const USAGE_LUA: &str = r#"
-- KEYS[1]: key index of the quota.
-- ARGV: now, key prefix (through the hash tag and ':'), quota, key ('' = all), keys
-- to scan at most, number of windows, then per window: window ms, limit; then the
-- flight ttl.
-- Returns now, then per key: key, open connections, units scheduled (granted for a
-- later time: deadline beyond now + flight ttl), then per window used, resets.
local now = clock(ARGV[1])
local prefix, quota, only, scan, nwin = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local keys
if only ~= '' then
  keys = {only}
else
  keys = redis.call('ZREVRANGE', KEYS[1], 0, scan - 1)
end
local out = {now}
for _, k in ipairs(keys) do
  local wins = {}
  for w = 1, nwin do
    local W = tonumber(ARGV[5 + 2 * w])
    wins[w] = window(prefix .. 'w:' .. quota .. ':' .. W .. ':' .. k, W, tonumber(ARGV[6 + 2 * w]))
  end
  local units = 0
  if nwin > 0 then
    units = sweep(prefix .. 'f:' .. quota .. ':' .. k, wins, now, nil, 0, 0)
  end
  local conns = redis.call('ZCOUNT', prefix .. 'c:' .. quota .. ':' .. k, '(' .. now, '+inf')
  local scheduled = 0
  local ttl = tonumber(ARGV[7 + 2 * nwin])
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', prefix .. 'f:' .. quota .. ':' .. k, '(' .. (now + ttl), '+inf')) do
    scheduled = scheduled + cost_of(m)
  end
  table.insert(out, k)
  table.insert(out, conns)
  table.insert(out, scheduled)
  for _, w in ipairs(wins) do
    local first = first_counted(w, now)
    local used = units
    local resets = now
    local oldest = nil
    for _, bc in ipairs(w.buckets) do
      if bc[1] >= first then
        used = used + bc[2]
        if not oldest then oldest = bc[1] end
      end
    end
    if oldest then resets = (oldest + 1) * w.g + w.W end
    table.insert(out, used)
    table.insert(out, resets)
  end
end
return out
"#;

struct Scripts {
    acquire: Script,
    extend: Script,
    close: Script,
    rate_limited: Script,
    usage: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            acquire: s(ACQUIRE_LUA),
            extend: s(EXTEND_LUA),
            close: s(CLOSE_LUA),
            rate_limited: s(RATE_LIMITED_LUA),
            usage: s(USAGE_LUA),
        }
    }
}

/// The Redis egress store; cheap to share, all calls multiplex over one connection.
pub struct RedisStore {
    conn: Conn,
    /// `<prefix>:{<prefix>:eg}:`
    base: String,
    secrets: Vec<String>,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects like the Redis queue does (same URL, password, cluster mode, key
    /// prefix). Fails within a few seconds when Redis is unreachable.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, EgressError> {
        let timeouts = Timeouts {
            connect: CONNECT_TIMEOUT,
            response: RESPONSE_TIMEOUT,
            deadline: OP_DEADLINE,
            retries: 2,
        };
        let (conn, secrets) = redis_conn::connect(cfg, &timeouts)
            .await
            .map_err(|e| match e {
                ConnectError::Failed(msg) => EgressError::Unavailable(msg),
                ConnectError::Timeout(d) => EgressError::Timeout(d),
            })?;
        let p = &cfg.key_prefix;
        Ok(RedisStore {
            conn,
            base: format!("{p}:{{{p}:eg}}:"),
            secrets,
            scripts: Scripts::new(),
        })
    }

    fn window_key(&self, k: &KeyRef, w: &Window) -> String {
        format!("{}w:{}:{}:{}", self.base, k.quota, w.window_ms, k.key)
    }

    fn flight_key(&self, k: &KeyRef) -> String {
        format!("{}f:{}:{}", self.base, k.quota, k.key)
    }

    fn conns_key(&self, k: &KeyRef) -> String {
        format!("{}c:{}:{}", self.base, k.quota, k.key)
    }

    fn index_key(&self, quota: &str) -> String {
        format!("{}k:{}", self.base, quota)
    }

    fn backoff_key(&self, site: &str) -> String {
        format!("{}bo:{}", self.base, site)
    }

    /// Runs one script invocation under the deadline. `EVALSHA`, and the script is
    /// loaded when Redis does not know it (start, restart, failover).
    async fn run<T: redis::FromRedisValue, F: Future<Output = Result<T, RedisError>>>(
        &self,
        op: &'static str,
        fut: F,
    ) -> Result<T, EgressError> {
        match tokio::time::timeout(OP_DEADLINE, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let msg = redact(&self.secrets, &format!("redis {op}: {e}"));
                tracing::debug!(op, error = %msg, "egress store call failed");
                Err(EgressError::Unavailable(msg))
            }
            Err(_) => Err(EgressError::Timeout(OP_DEADLINE)),
        }
    }

    pub async fn acquire(&self, req: &Acquire<'_>) -> Result<AcquireReply, EgressError> {
        let mut inv = self.scripts.acquire.prepare_invoke();
        inv.key(self.backoff_key(req.site));
        inv.arg(now_arg(req.now_ms))
            .arg(req.timing.max_wait_ms)
            .arg(req.timing.flight_ttl_ms)
            .arg(req.timing.lease_ttl_ms)
            .arg(req.token.unwrap_or(""))
            .arg(req.commit.map_or("", |c| c.token))
            .arg(req.commit.map_or(0, |c| c.end_ms))
            .arg(req.lease.unwrap_or(""))
            .arg(req.policy.base_ms)
            .arg(req.policy.recover_ms)
            .arg(req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            inv.key(self.flight_key(k))
                .key(self.conns_key(k))
                .key(self.index_key(&k.quota));
            inv.arg(&k.key)
                .arg(k.max_connections.unwrap_or(0))
                .arg(req.costs.get(i).copied().unwrap_or(1))
                .arg(
                    req.commit
                        .and_then(|c| c.costs.get(i).copied())
                        .unwrap_or(1),
                )
                .arg(k.windows.len());
            for w in &k.windows {
                inv.key(self.window_key(k, w));
                inv.arg(w.window_ms).arg(w.limit);
            }
        }
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .run("egress acquire", inv.invoke_async(&mut conn))
            .await?;
        let [code, at, now, level] = v[..] else {
            return Err(EgressError::Protocol(format!("acquire returned {v:?}")));
        };
        let (at, now) = (at.max(0) as u64, now.max(0) as u64);
        let verdict = match code {
            0 => Verdict::Granted { at_ms: at },
            1 => Verdict::Later { at_ms: at },
            2 => Verdict::BackedOff { until_ms: at },
            3 => Verdict::Blocked,
            4 => Verdict::NoConnection,
            other => return Err(EgressError::Protocol(format!("acquire verdict {other}"))),
        };
        Ok(AcquireReply {
            verdict,
            now_ms: now,
            level: level.clamp(0, 64) as u32,
        })
    }

    pub async fn extend(&self, req: &Extend<'_>) -> Result<(), EgressError> {
        let mut inv = self.scripts.extend.prepare_invoke();
        inv.arg(now_arg(req.now_ms))
            .arg(req.lease.unwrap_or(""))
            .arg(req.timing.lease_ttl_ms)
            .arg(req.timing.flight_ttl_ms)
            .arg(req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            inv.key(self.flight_key(k)).key(self.conns_key(k));
            inv.arg(k.max_connections.unwrap_or(0));
            match req.flight {
                Some((token, costs)) if k.paced() => {
                    inv.arg(format!("{token}|{}", costs.get(i).copied().unwrap_or(1)))
                }
                _ => inv.arg(""),
            };
            inv.arg(k.windows.iter().map(|w| w.window_ms).max().unwrap_or(0));
        }
        let mut conn = self.conn.clone();
        let _: i64 = self
            .run("egress extend", inv.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    pub async fn close(&self, req: &Close<'_>) -> Result<(), EgressError> {
        let mut inv = self.scripts.close.prepare_invoke();
        inv.arg(now_arg(req.now_ms))
            .arg(req.lease.unwrap_or(""))
            .arg(req.commit.map_or("", |c| c.token))
            .arg(req.commit.map_or(0, |c| c.end_ms))
            .arg(req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            inv.key(self.flight_key(k)).key(self.conns_key(k));
            inv.arg(
                req.commit
                    .and_then(|c| c.costs.get(i).copied())
                    .unwrap_or(1),
            )
            .arg(k.windows.len());
            for w in &k.windows {
                inv.key(self.window_key(k, w));
                inv.arg(w.window_ms).arg(w.limit);
            }
        }
        let mut conn = self.conn.clone();
        let _: i64 = self
            .run("egress close", inv.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    pub async fn rate_limited(
        &self,
        site: &str,
        policy: BackoffPolicy,
        now_ms: Option<u64>,
    ) -> Result<(u64, u64), EgressError> {
        let mut inv = self.scripts.rate_limited.prepare_invoke();
        inv.key(self.backoff_key(site))
            .arg(now_arg(now_ms))
            .arg(policy.base_ms)
            .arg(policy.max_level)
            .arg(policy.recover_ms);
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .run("egress rate_limited", inv.invoke_async(&mut conn))
            .await?;
        match v[..] {
            [until, now] => Ok((until.max(0) as u64, now.max(0) as u64)),
            _ => Err(EgressError::Protocol(format!(
                "rate_limited returned {v:?}"
            ))),
        }
    }

    pub async fn usage(
        &self,
        quota: &str,
        windows: &[Window],
        key: Option<&str>,
        flight_ttl_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<(u64, Vec<KeyUse>), EgressError> {
        let mut inv = self.scripts.usage.prepare_invoke();
        inv.key(self.index_key(quota))
            .arg(now_arg(now_ms))
            .arg(&self.base)
            .arg(quota)
            .arg(key.unwrap_or(""))
            .arg(USAGE_SCAN)
            .arg(windows.len());
        for w in windows {
            inv.arg(w.window_ms).arg(w.limit);
        }
        inv.arg(flight_ttl_ms);
        let mut conn = self.conn.clone();
        let v: Vec<Value> = self
            .run("egress usage", inv.invoke_async(&mut conn))
            .await?;
        let bad = || EgressError::Protocol("usage reply".into());
        let int = |v: &Value| -> Result<u64, EgressError> {
            match v {
                Value::Int(i) => Ok((*i).max(0) as u64),
                _ => Err(bad()),
            }
        };
        let mut it = v.iter();
        let now = int(it.next().ok_or_else(bad)?)?;
        let mut out = Vec::new();
        while let Some(k) = it.next() {
            let key = match k {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => return Err(bad()),
            };
            let open = int(it.next().ok_or_else(bad)?)?;
            let scheduled = int(it.next().ok_or_else(bad)?)?;
            let mut ws = Vec::with_capacity(windows.len());
            for _ in windows {
                let used = int(it.next().ok_or_else(bad)?)?;
                let resets = int(it.next().ok_or_else(bad)?)?;
                ws.push((used, resets));
            }
            out.push(KeyUse {
                key,
                windows: ws,
                scheduled,
                open_connections: open as u32,
            });
        }
        Ok((now, out))
    }
}

fn now_arg(now_ms: Option<u64>) -> String {
    now_ms.map(|n| n.to_string()).unwrap_or_default()
}
