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
//! | `mr:{mr:eg}:sh:<site>`               | hash       | response-rule states by scope field       |
//! | `mr:{mr:eg}:shi`                     | sorted set | sites with states, by latest end          |
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
use crate::redis_conn::script::{Call, Layout};
use crate::redis_conn::{self, Conn, ConnectError, Timeouts, redact};
use crate::shaping::State;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole call, reconnects included: egress waits rather than sends when Redis
/// does not answer, so it must learn that quickly.
const OP_DEADLINE: Duration = Duration::from_secs(4);

/// Shared by the scripts: the clock, and reading one window's state.
const PRELUDE: &str = include_str!("lua/prelude.lua");

const ACQUIRE_LUA: &str = include_str!("lua/acquire.lua");

const EXTEND_LUA: &str = include_str!("lua/extend.lua");

const CLOSE_LUA: &str = include_str!("lua/close.lua");

const RATE_LIMITED_LUA: &str = include_str!("lua/rate_limited.lua");

const USAGE_LUA: &str = include_str!("lua/usage.lua");

const SHAPING_SET_LUA: &str = include_str!("lua/shaping_set.lua");

const SHAPING_LIST_LUA: &str = include_str!("lua/shaping_list.lua");

const SHAPING_LIFT_LUA: &str = include_str!("lua/shaping_lift.lua");

/// Sites whose states `shaping list` reads at most.
const SHAPING_SCAN: usize = 1000;

/// The repeated group of every quota key (see each script's header).
const PER_KEY: &str = "per key..";
/// The repeated group of every window.
const PER_WINDOW: &str = "per window..";

/// KEYS/ARGV of `acquire.lua`; per key: flight set, lease set, key index, a hash
/// per window / key, max connections, cost, commit cost, window count, then per
/// window: window ms, limit.
const ACQUIRE: Layout = Layout {
    keys: &["back-off", "shaping", PER_KEY],
    args: &[
        "now",
        "max wait",
        "flight ttl",
        "lease ttl",
        "token",
        "commit token",
        "commit end",
        "lease id",
        "back-off base",
        "back-off recover",
        "key count",
        PER_KEY,
    ],
};
/// KEYS/ARGV of `extend.lua`; per key: flight set, lease set / max connections,
/// flight member, longest window ms.
const EXTEND: Layout = Layout {
    keys: &[PER_KEY],
    args: &[
        "now",
        "lease id",
        "lease ttl",
        "flight ttl",
        "key count",
        PER_KEY,
    ],
};
/// KEYS/ARGV of `close.lua`; per key: flight set, lease set, a hash per window /
/// commit cost, window count, then per window: window ms, limit.
const CLOSE: Layout = Layout {
    keys: &[PER_KEY],
    args: &[
        "now",
        "lease id",
        "commit token",
        "commit end",
        "key count",
        PER_KEY,
    ],
};
/// KEYS/ARGV of `rate_limited.lua`.
const RATE_LIMITED: Layout = Layout {
    keys: &["back-off"],
    args: &["now", "base", "max level", "recover"],
};
/// KEYS/ARGV of `shaping_set.lua`.
const SHAPING_SET: Layout = Layout {
    keys: &["states", "site index"],
    args: &["now", "site", "field", "value", "duration"],
};
/// KEYS/ARGV of `shaping_list.lua`.
const SHAPING_LIST: Layout = Layout {
    keys: &["site index"],
    args: &["now", "state prefix", "scan"],
};
/// KEYS/ARGV of `shaping_lift.lua`.
const SHAPING_LIFT: Layout = Layout {
    keys: &["states"],
    args: &["field"],
};
/// KEYS/ARGV of `usage.lua`; per window: window ms, limit.
const USAGE: Layout = Layout {
    keys: &["key index"],
    args: &[
        "now",
        "key prefix",
        "quota",
        "key",
        "scan",
        "window count",
        PER_WINDOW,
        "flight ttl",
    ],
};

/// Every script as Redis runs it, by name (for the Lua lint).
pub fn lua_scripts() -> Vec<(&'static str, String)> {
    [
        ("egress_acquire", ACQUIRE_LUA),
        ("egress_extend", EXTEND_LUA),
        ("egress_close", CLOSE_LUA),
        ("egress_rate_limited", RATE_LIMITED_LUA),
        ("egress_usage", USAGE_LUA),
        ("egress_shaping_set", SHAPING_SET_LUA),
        ("egress_shaping_list", SHAPING_LIST_LUA),
        ("egress_shaping_lift", SHAPING_LIFT_LUA),
    ]
    .into_iter()
    .map(|(name, body)| (name, [PRELUDE, body].concat()))
    .collect()
}

struct Scripts {
    acquire: Script,
    extend: Script,
    close: Script,
    rate_limited: Script,
    usage: Script,
    shaping_set: Script,
    shaping_list: Script,
    shaping_lift: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&[PRELUDE, body].concat());
        Scripts {
            acquire: s(ACQUIRE_LUA),
            extend: s(EXTEND_LUA),
            close: s(CLOSE_LUA),
            rate_limited: s(RATE_LIMITED_LUA),
            usage: s(USAGE_LUA),
            shaping_set: s(SHAPING_SET_LUA),
            shaping_list: s(SHAPING_LIST_LUA),
            shaping_lift: s(SHAPING_LIFT_LUA),
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

    fn shaping_key(&self, site: &str) -> String {
        format!("{}sh:{}", self.base, site)
    }

    fn shaping_index(&self) -> String {
        format!("{}shi", self.base)
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
        let mut call = Call::new(&self.scripts.acquire, &ACQUIRE);
        call.key("back-off", self.backoff_key(req.site))
            .key("shaping", self.shaping_key(req.site));
        call.arg("now", now_arg(req.now_ms))
            .arg("max wait", req.timing.max_wait_ms)
            .arg("flight ttl", req.timing.flight_ttl_ms)
            .arg("lease ttl", req.timing.lease_ttl_ms)
            .arg("token", req.token.unwrap_or(""))
            .arg("commit token", req.commit.map_or("", |c| c.token))
            .arg("commit end", req.commit.map_or(0, |c| c.end_ms))
            .arg("lease id", req.lease.unwrap_or(""))
            .arg("back-off base", req.policy.base_ms)
            .arg("back-off recover", req.policy.recover_ms)
            .arg("key count", req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            call.key(PER_KEY, self.flight_key(k))
                .key(PER_KEY, self.conns_key(k))
                .key(PER_KEY, self.index_key(&k.quota));
            call.arg(PER_KEY, &k.key)
                .arg(PER_KEY, k.max_connections.unwrap_or(0))
                .arg(PER_KEY, req.costs.get(i).copied().unwrap_or(1))
                .arg(
                    PER_KEY,
                    req.commit
                        .and_then(|c| c.costs.get(i).copied())
                        .unwrap_or(1),
                )
                .arg(PER_KEY, k.windows.len());
            for w in &k.windows {
                call.key(PER_KEY, self.window_key(k, w));
                call.arg(PER_KEY, w.window_ms).arg(PER_KEY, w.limit);
            }
        }
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let v: Vec<Value> = self
            .run("egress acquire", inv.invoke_async(&mut conn))
            .await?;
        let bad = || EgressError::Protocol(format!("acquire returned {v:?}"));
        let int = |x: &Value| match x {
            Value::Int(i) => Some(*i),
            _ => None,
        };
        let (Some(code), Some(at), Some(now), Some(level)) = (
            v.first().and_then(int),
            v.get(1).and_then(int),
            v.get(2).and_then(int),
            v.get(3).and_then(int),
        ) else {
            return Err(bad());
        };
        let mut states = Vec::new();
        for pair in v.get(4..).unwrap_or_default().chunks(2) {
            if let [f, val] = pair
                && let (Some(f), Some(val)) = (text(f), text(val))
                && let Some(s) = State::decode(&f, &val)
            {
                states.push(s);
            }
        }
        // As the embedded store answers: by scope field.
        states.sort_by(|a, b| a.field.cmp(&b.field));
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
            states,
        })
    }

    pub async fn extend(&self, req: &Extend<'_>) -> Result<(), EgressError> {
        let mut call = Call::new(&self.scripts.extend, &EXTEND);
        call.arg("now", now_arg(req.now_ms))
            .arg("lease id", req.lease.unwrap_or(""))
            .arg("lease ttl", req.timing.lease_ttl_ms)
            .arg("flight ttl", req.timing.flight_ttl_ms)
            .arg("key count", req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            call.key(PER_KEY, self.flight_key(k))
                .key(PER_KEY, self.conns_key(k));
            call.arg(PER_KEY, k.max_connections.unwrap_or(0));
            match req.flight {
                Some((token, costs)) if k.paced() => call.arg(
                    PER_KEY,
                    format!("{token}|{}", costs.get(i).copied().unwrap_or(1)),
                ),
                _ => call.arg(PER_KEY, ""),
            };
            call.arg(
                PER_KEY,
                k.windows.iter().map(|w| w.window_ms).max().unwrap_or(0),
            );
        }
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let _: i64 = self
            .run("egress extend", inv.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    pub async fn close(&self, req: &Close<'_>) -> Result<(), EgressError> {
        let mut call = Call::new(&self.scripts.close, &CLOSE);
        call.arg("now", now_arg(req.now_ms))
            .arg("lease id", req.lease.unwrap_or(""))
            .arg("commit token", req.commit.map_or("", |c| c.token))
            .arg("commit end", req.commit.map_or(0, |c| c.end_ms))
            .arg("key count", req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            call.key(PER_KEY, self.flight_key(k))
                .key(PER_KEY, self.conns_key(k));
            call.arg(
                PER_KEY,
                req.commit
                    .and_then(|c| c.costs.get(i).copied())
                    .unwrap_or(1),
            )
            .arg(PER_KEY, k.windows.len());
            for w in &k.windows {
                call.key(PER_KEY, self.window_key(k, w));
                call.arg(PER_KEY, w.window_ms).arg(PER_KEY, w.limit);
            }
        }
        let inv = call.invocation();
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
        let mut call = Call::new(&self.scripts.rate_limited, &RATE_LIMITED);
        call.key("back-off", self.backoff_key(site))
            .arg("now", now_arg(now_ms))
            .arg("base", policy.base_ms)
            .arg("max level", policy.max_level)
            .arg("recover", policy.recover_ms);
        let inv = call.invocation();
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

    pub async fn shaping_set(
        &self,
        site: &str,
        state: &State,
        duration_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<(u64, u64), EgressError> {
        let mut call = Call::new(&self.scripts.shaping_set, &SHAPING_SET);
        call.key("states", self.shaping_key(site))
            .key("site index", self.shaping_index())
            .arg("now", now_arg(now_ms))
            .arg("site", site)
            .arg("field", &state.field)
            .arg("value", state.encode_rest())
            .arg("duration", duration_ms);
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .run("egress shaping_set", inv.invoke_async(&mut conn))
            .await?;
        match v[..] {
            [until, now] => Ok((until.max(0) as u64, now.max(0) as u64)),
            _ => Err(EgressError::Protocol(format!("shaping_set returned {v:?}"))),
        }
    }

    pub async fn shaping_list(
        &self,
        now_ms: Option<u64>,
    ) -> Result<(u64, Vec<(String, State)>), EgressError> {
        let mut call = Call::new(&self.scripts.shaping_list, &SHAPING_LIST);
        call.key("site index", self.shaping_index())
            .arg("now", now_arg(now_ms))
            .arg("state prefix", format!("{}sh:", self.base))
            .arg("scan", SHAPING_SCAN);
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let v: Vec<Value> = self
            .run("egress shaping_list", inv.invoke_async(&mut conn))
            .await?;
        let now = match v.first() {
            Some(Value::Int(i)) => (*i).max(0) as u64,
            _ => return Err(EgressError::Protocol("shaping_list reply".into())),
        };
        let mut out = Vec::new();
        for t in v[1..].chunks(3) {
            if let [site, f, val] = t
                && let (Some(site), Some(f), Some(val)) = (text(site), text(f), text(val))
                && let Some(s) = State::decode(&f, &val)
            {
                out.push((site, s));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.field).cmp(&(&b.0, &b.1.field)));
        Ok((now, out))
    }

    pub async fn shaping_lift(&self, site: &str, field: &str) -> Result<bool, EgressError> {
        let mut call = Call::new(&self.scripts.shaping_lift, &SHAPING_LIFT);
        call.key("states", self.shaping_key(site))
            .arg("field", field);
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let n: i64 = self
            .run("egress shaping_lift", inv.invoke_async(&mut conn))
            .await?;
        Ok(n > 0)
    }

    pub async fn usage(
        &self,
        quota: &str,
        windows: &[Window],
        key: Option<&str>,
        flight_ttl_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<(u64, Vec<KeyUse>), EgressError> {
        let mut call = Call::new(&self.scripts.usage, &USAGE);
        call.key("key index", self.index_key(quota))
            .arg("now", now_arg(now_ms))
            .arg("key prefix", &self.base)
            .arg("quota", quota)
            .arg("key", key.unwrap_or(""))
            .arg("scan", USAGE_SCAN)
            .arg("window count", windows.len());
        for w in windows {
            call.arg(PER_WINDOW, w.window_ms).arg(PER_WINDOW, w.limit);
        }
        call.arg("flight ttl", flight_ttl_ms);
        let inv = call.invocation();
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

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn now_arg(now_ms: Option<u64>) -> String {
    now_ms.map(|n| n.to_string()).unwrap_or_default()
}
