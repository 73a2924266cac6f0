//! Where TLS report counters are shared by the relays of a cluster.
//!
//! Redis (keys with `key_prefix: mr`, one period starting at Unix second `S`):
//! `mr:{tlsrpt:S}:d:<domain>` is a hash of counters and policy descriptions,
//! `mr:{tlsrpt:S}:domains` the set of domains counted, `mr:{tlsrpt:S}:claim`
//! the relay that sends the period's reports. The `{tlsrpt:S}` hash tag keeps a
//! period's keys in one cluster slot, so one script call adds a domain's counts
//! and lists the domain. Every key expires about three periods after it was last
//! written. Hash fields: `p:<type>` (the policy, JSON), `s:<type>` successful and
//! `f:<type>` failed sessions, `d:<type>:<detail JSON>` failed sessions by detail.
//!
//! The embedded queue runs one relay process: its counters stay in that process
//! ([`MemoryReports`]) and a restart loses the period's counts so far.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use super::{Counts, FailureDetail};

pub fn policy_field(t: &str) -> String {
    format!("p:{t}")
}
pub fn success_field(t: &str) -> String {
    format!("s:{t}")
}
pub fn failure_field(t: &str) -> String {
    format!("f:{t}")
}
pub fn detail_field(t: &str, d: &FailureDetail) -> String {
    format!(
        "d:{t}:{}",
        serde_json::to_string(d).expect("a failure detail serialises")
    )
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

pub trait ReportStore: Send + Sync {
    /// Adds `counts` to `domain`'s counters of the period starting at `start`.
    fn add<'a>(
        &'a self,
        start: u64,
        domain: &'a str,
        counts: &'a Counts,
        ttl: Duration,
    ) -> StoreFuture<'a, ()>;
    /// The domains counted in the period.
    fn domains(&self, start: u64) -> StoreFuture<'_, Vec<String>>;
    /// A domain's hash fields in the period.
    fn fields<'a>(
        &'a self,
        start: u64,
        domain: &'a str,
    ) -> StoreFuture<'a, HashMap<String, String>>;
    /// Claims the sending of the period's reports: true for exactly one caller.
    fn claim(&self, start: u64, ttl: Duration) -> StoreFuture<'_, bool>;
    fn backend(&self) -> &'static str;
}

/// Counters in this process.
#[derive(Default)]
pub struct MemoryReports {
    data: Mutex<HashMap<(u64, String), HashMap<String, String>>>,
    claimed: Mutex<HashSet<u64>>,
}

impl ReportStore for MemoryReports {
    fn add<'a>(
        &'a self,
        start: u64,
        domain: &'a str,
        counts: &'a Counts,
        _ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut data = self.data.lock().unwrap();
            // Periods long reported are dropped here (Redis expires them).
            let oldest = start.saturating_sub(7 * 86_400);
            data.retain(|(s, _), _| *s >= oldest);
            let h = data.entry((start, domain.to_owned())).or_default();
            for (k, v) in &counts.add {
                let n = h.get(k).and_then(|x| x.parse::<i64>().ok()).unwrap_or(0);
                h.insert(k.clone(), (n + v).to_string());
            }
            for (k, v) in &counts.set {
                h.insert(k.clone(), v.clone());
            }
            Ok(())
        })
    }

    fn domains(&self, start: u64) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut v: Vec<String> = self
                .data
                .lock()
                .unwrap()
                .keys()
                .filter(|(s, _)| *s == start)
                .map(|(_, d)| d.clone())
                .collect();
            v.sort();
            Ok(v)
        })
    }

    fn fields<'a>(
        &'a self,
        start: u64,
        domain: &'a str,
    ) -> StoreFuture<'a, HashMap<String, String>> {
        Box::pin(async move {
            Ok(self
                .data
                .lock()
                .unwrap()
                .get(&(start, domain.to_owned()))
                .cloned()
                .unwrap_or_default())
        })
    }

    fn claim(&self, start: u64, _ttl: Duration) -> StoreFuture<'_, bool> {
        Box::pin(async move { Ok(self.claimed.lock().unwrap().insert(start)) })
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

/// Counters in the queue's Redis (see the module docs for the keys).
pub struct RedisReports {
    redis: crate::queue::redis::SharedRedis,
    add: redis::Script,
}

const ADD_LUA: &str = r#"local ttl = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
local i = 4
for _ = 1, n do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i < #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"#;

/// The scripts by name (for the Lua lint).
pub fn lua_scripts() -> Vec<(&'static str, String)> {
    vec![("tlsrpt_add", ADD_LUA.to_owned())]
}

/// Redis calls are bounded: a slow store must not hold the flusher up for long.
const STORE_DEADLINE: Duration = Duration::from_secs(5);

async fn bounded<T>(f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(STORE_DEADLINE, f)
        .await
        .unwrap_or_else(|_| Err("redis: timed out".into()))
}

impl RedisReports {
    pub async fn new(redis: crate::queue::redis::SharedRedis) -> Result<Self, String> {
        let s = RedisReports {
            redis,
            add: redis::Script::new(ADD_LUA),
        };
        s.redis.load(&s.add).await?;
        Ok(s)
    }

    fn key(&self, start: u64, rest: &str) -> String {
        format!("{}:{{tlsrpt:{start}}}:{rest}", self.redis.prefix())
    }
}

impl ReportStore for RedisReports {
    fn add<'a>(
        &'a self,
        start: u64,
        domain: &'a str,
        counts: &'a Counts,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(bounded(async move {
            let mut inv = self.add.prepare_invoke();
            inv.key(self.key(start, &format!("d:{domain}")))
                .key(self.key(start, "domains"))
                .arg(ttl.as_millis().max(1) as u64)
                .arg(domain)
                .arg(counts.add.len());
            for (k, v) in &counts.add {
                inv.arg(k).arg(*v);
            }
            for (k, v) in &counts.set {
                inv.arg(k).arg(v);
            }
            self.redis.invoke::<i64>(&inv).await.map(|_| ())
        }))
    }

    fn domains(&self, start: u64) -> StoreFuture<'_, Vec<String>> {
        Box::pin(bounded(async move {
            let mut v: Vec<String> = self
                .redis
                .query(redis::cmd("SMEMBERS").arg(self.key(start, "domains")))
                .await?;
            v.sort();
            Ok(v)
        }))
    }

    fn fields<'a>(
        &'a self,
        start: u64,
        domain: &'a str,
    ) -> StoreFuture<'a, HashMap<String, String>> {
        Box::pin(bounded(async move {
            self.redis
                .query(redis::cmd("HGETALL").arg(self.key(start, &format!("d:{domain}"))))
                .await
        }))
    }

    fn claim(&self, start: u64, ttl: Duration) -> StoreFuture<'_, bool> {
        Box::pin(bounded(async move {
            let set: Option<String> = self
                .redis
                .query(
                    redis::cmd("SET")
                        .arg(self.key(start, "claim"))
                        .arg(std::process::id())
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl.as_millis().max(1) as u64),
                )
                .await?;
            Ok(set.is_some())
        }))
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}
