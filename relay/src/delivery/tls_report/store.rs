//! Where TLS report counters, and the progress of sending a period's reports,
//! are shared by the relays of a cluster.
//!
//! Redis (keys with `key_prefix: mr`, one period starting at Unix second `S`):
//! `mr:{tlsrpt:S}:d:<domain>` is a hash of counters and policy descriptions,
//! `mr:{tlsrpt:S}:domains` the set of domains counted, `mr:{tlsrpt:S}:claim`
//! the relay sending the period's reports now (a lease, renewed while it works),
//! `mr:{tlsrpt:S}:progress` what has been sent (field `<domain>`: every report of
//! the domain done; `<domain> <rua>`: `done`, `failed` or `retry:<n>:<due ms>`)
//! and `mr:{tlsrpt:S}:finished` that nothing is left to send. The `{tlsrpt:S}` hash
//! tag keeps a period's keys in one cluster slot, so one script call adds a
//! domain's counts and lists the domain. Every key expires about three periods
//! after it was last written. Hash fields: `p:<key>` (the policy, JSON), `s:<key>`
//! successful and `f:<key>` failed sessions, `d:<key>:<detail JSON>` failed
//! sessions by detail, where the key is the policy type (`tlsa/<mx host>` for
//! DANE).
//!
//! The embedded queue runs one relay process: [`EmbeddedReports`] keeps the same
//! in two tables of the queue's redb file, so a restart (or a crash) loses
//! neither the period's counts nor what was already sent.

use std::collections::HashMap;
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
    /// Claims the sending of the period's reports for `lease` (or extends the
    /// caller's own claim, `token`): one holder at a time; a holder that dies
    /// leaves the rest to whoever claims after the lease.
    fn claim<'a>(&'a self, start: u64, token: &'a str, lease: Duration) -> StoreFuture<'a, Claim>;
    /// Ends the caller's claim (others may claim at once).
    fn release<'a>(&'a self, start: u64, token: &'a str) -> StoreFuture<'a, ()>;
    /// What has been sent of the period: item → state (see the module docs).
    fn progress(&self, start: u64) -> StoreFuture<'_, HashMap<String, String>>;
    fn set_progress<'a>(
        &'a self,
        start: u64,
        item: &'a str,
        state: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()>;
    /// Marks the period done: later claims answer [`Claim::Finished`].
    fn finish(&self, start: u64, ttl: Duration) -> StoreFuture<'_, ()>;
    fn backend(&self) -> &'static str;

    /// Adds several domains' counts; the errors by position. Stores that can
    /// do it in one transaction override it.
    fn add_batch<'a>(
        &'a self,
        batch: &'a [(u64, String, Counts)],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Result<(), String>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(batch.len());
            for (start, domain, counts) in batch {
                out.push(self.add(*start, domain, counts, ttl).await);
            }
            Ok(out)
        })
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the period.
    Won,
    /// Another relay does.
    Busy,
    /// Every report of the period is sent (or given up).
    Finished,
}

/// One period's sending state, as [`MemoryReports`] and [`EmbeddedReports`] keep it.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Sending {
    /// The holder's token and its lease's end (Unix ms).
    claim: Option<(String, u64)>,
    finished: bool,
    progress: HashMap<String, String>,
}

impl Sending {
    fn claim(&mut self, token: &str, lease: Duration) -> Claim {
        let now = crate::queue::now_ms();
        if self.finished {
            return Claim::Finished;
        }
        match &self.claim {
            Some((t, until)) if t != token && *until > now => Claim::Busy,
            _ => {
                self.claim = Some((token.to_owned(), now + lease.as_millis() as u64));
                Claim::Won
            }
        }
    }

    fn release(&mut self, token: &str) {
        if self.claim.as_ref().is_some_and(|(t, _)| t == token) {
            self.claim = None;
        }
    }
}

/// Counters in this process.
#[derive(Default)]
pub struct MemoryReports {
    data: Mutex<HashMap<(u64, String), HashMap<String, String>>>,
    sending: Mutex<HashMap<u64, Sending>>,
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

    fn claim<'a>(&'a self, start: u64, token: &'a str, lease: Duration) -> StoreFuture<'a, Claim> {
        Box::pin(async move {
            let mut s = self.sending.lock().unwrap();
            let oldest = start.saturating_sub(7 * 86_400);
            s.retain(|k, _| *k >= oldest);
            Ok(s.entry(start).or_default().claim(token, lease))
        })
    }

    fn release<'a>(&'a self, start: u64, token: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if let Some(s) = self.sending.lock().unwrap().get_mut(&start) {
                s.release(token);
            }
            Ok(())
        })
    }

    fn progress(&self, start: u64) -> StoreFuture<'_, HashMap<String, String>> {
        Box::pin(async move {
            Ok(self
                .sending
                .lock()
                .unwrap()
                .get(&start)
                .map(|s| s.progress.clone())
                .unwrap_or_default())
        })
    }

    fn set_progress<'a>(
        &'a self,
        start: u64,
        item: &'a str,
        state: &'a str,
        _ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.sending
                .lock()
                .unwrap()
                .entry(start)
                .or_default()
                .progress
                .insert(item.to_owned(), state.to_owned());
            Ok(())
        })
    }

    fn finish(&self, start: u64, _ttl: Duration) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.sending
                .lock()
                .unwrap()
                .entry(start)
                .or_default()
                .finished = true;
            Ok(())
        })
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

/// Counters in the queue's Redis (see the module docs for the keys).
pub struct RedisReports {
    redis: crate::queue::redis::SharedRedis,
    add: redis::Script,
    claim: redis::Script,
    release: redis::Script,
}

/// KEYS: claim, finished. ARGV: token, lease ms. 2: finished, 1: the caller holds
/// the claim (taken or extended), 0: another relay does.
const CLAIM_LUA: &str = r#"if redis.call('EXISTS', KEYS[2]) == 1 then
  return 2
end
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// KEYS: claim. ARGV: token. Deletes the claim if the caller holds it.
const RELEASE_LUA: &str = r#"if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
"#;

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
    vec![
        ("tlsrpt_add", ADD_LUA.to_owned()),
        ("tlsrpt_claim", CLAIM_LUA.to_owned()),
        ("tlsrpt_release", RELEASE_LUA.to_owned()),
    ]
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
            claim: redis::Script::new(CLAIM_LUA),
            release: redis::Script::new(RELEASE_LUA),
        };
        for script in [&s.add, &s.claim, &s.release] {
            s.redis.load(script).await?;
        }
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

    fn claim<'a>(&'a self, start: u64, token: &'a str, lease: Duration) -> StoreFuture<'a, Claim> {
        Box::pin(bounded(async move {
            let mut inv = self.claim.prepare_invoke();
            inv.key(self.key(start, "claim"))
                .key(self.key(start, "finished"))
                .arg(token)
                .arg(lease.as_millis().max(1) as u64);
            Ok(match self.redis.invoke::<i64>(&inv).await? {
                2 => Claim::Finished,
                1 => Claim::Won,
                _ => Claim::Busy,
            })
        }))
    }

    fn release<'a>(&'a self, start: u64, token: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(bounded(async move {
            let mut inv = self.release.prepare_invoke();
            inv.key(self.key(start, "claim")).arg(token);
            self.redis.invoke::<i64>(&inv).await.map(|_| ())
        }))
    }

    fn progress(&self, start: u64) -> StoreFuture<'_, HashMap<String, String>> {
        Box::pin(bounded(async move {
            self.redis
                .query(redis::cmd("HGETALL").arg(self.key(start, "progress")))
                .await
        }))
    }

    fn set_progress<'a>(
        &'a self,
        start: u64,
        item: &'a str,
        state: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(bounded(async move {
            let key = self.key(start, "progress");
            let mut pipe = redis::pipe();
            pipe.cmd("HSET").arg(&key).arg(item).arg(state).ignore();
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl.as_millis().max(1) as u64)
                .ignore();
            self.redis.pipeline::<()>(&pipe).await
        }))
    }

    fn finish(&self, start: u64, ttl: Duration) -> StoreFuture<'_, ()> {
        Box::pin(bounded(async move {
            self.redis
                .query::<()>(
                    redis::cmd("SET")
                        .arg(self.key(start, "finished"))
                        .arg(1)
                        .arg("PX")
                        .arg(ttl.as_millis().max(1) as u64),
                )
                .await
        }))
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

/// A domain's counters of a period: `(period start, domain)` → hash fields (JSON).
const COUNTS: redb::TableDefinition<(u64, &str), &[u8]> =
    redb::TableDefinition::new("tlsrpt_counts");
/// A period's sending state ([`Sending`], JSON) by period start.
const SENDING: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("tlsrpt_sending");

/// Counters and sending state in two tables of the embedded queue's redb file
/// (opened by this module; the queue's own tables are not touched), so a relay
/// that restarts, or is killed, keeps the period's counts and does not send a
/// report twice. The flusher's counts of one second go in one transaction
/// ([`ReportStore::add_batch`]): one fsync a second at most, whatever the mail
/// volume. Periods older than a week are dropped as counts are added.
#[derive(Clone)]
pub struct EmbeddedReports {
    db: std::sync::Arc<redb::Database>,
}

fn db_error(e: impl std::fmt::Display) -> String {
    format!("embedded TLS report store: {e}")
}

type Fields = HashMap<String, String>;

impl EmbeddedReports {
    /// Creates the tables if missing.
    pub fn open(db: std::sync::Arc<redb::Database>) -> Result<Self, String> {
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(COUNTS).map_err(db_error)?;
        txn.open_table(SENDING).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        Ok(EmbeddedReports { db })
    }

    /// Runs `f` on the blocking pool (redb reads and fsyncs block).
    fn blocking<'a, T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, String> + Send + 'static,
    ) -> StoreFuture<'a, T> {
        let db = std::sync::Arc::clone(&self.db);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&db))
                .await
                .map_err(db_error)?
        })
    }

    /// Changes a period's sending state in one transaction.
    fn with_sending<'a, T: Send + 'static>(
        &self,
        start: u64,
        f: impl FnOnce(&mut Sending) -> T + Send + 'static,
    ) -> StoreFuture<'a, T> {
        self.blocking(move |db| {
            use redb::ReadableTable;
            let txn = db.begin_write().map_err(db_error)?;
            let out = {
                let mut t = txn.open_table(SENDING).map_err(db_error)?;
                let mut s: Sending = match t.get(start).map_err(db_error)? {
                    Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
                    None => Sending::default(),
                };
                let out = f(&mut s);
                let json = serde_json::to_vec(&s).map_err(db_error)?;
                t.insert(start, json.as_slice()).map_err(db_error)?;
                out
            };
            txn.commit().map_err(db_error)?;
            Ok(out)
        })
    }
}

impl ReportStore for EmbeddedReports {
    fn add<'a>(
        &'a self,
        start: u64,
        domain: &'a str,
        counts: &'a Counts,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        let batch = vec![(start, domain.to_owned(), counts.clone())];
        Box::pin(async move {
            let mut r = self.add_batch(&batch, ttl).await?;
            r.pop().unwrap_or(Ok(()))
        })
    }

    fn add_batch<'a>(
        &'a self,
        batch: &'a [(u64, String, Counts)],
        _ttl: Duration,
    ) -> StoreFuture<'a, Vec<Result<(), String>>> {
        let batch = batch.to_vec();
        self.blocking(move |db| {
            use redb::ReadableTable;
            let n = batch.len();
            let txn = db.begin_write().map_err(db_error)?;
            {
                let mut t = txn.open_table(COUNTS).map_err(db_error)?;
                for (start, domain, counts) in &batch {
                    let mut h: Fields = match t.get((*start, domain.as_str())).map_err(db_error)? {
                        Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
                        None => Fields::new(),
                    };
                    for (k, v) in &counts.add {
                        let n = h.get(k).and_then(|x| x.parse::<i64>().ok()).unwrap_or(0);
                        h.insert(k.clone(), (n + v).to_string());
                    }
                    for (k, v) in &counts.set {
                        h.insert(k.clone(), v.clone());
                    }
                    let json = serde_json::to_vec(&h).map_err(db_error)?;
                    t.insert((*start, domain.as_str()), json.as_slice())
                        .map_err(db_error)?;
                }
                // Periods long reported go (Redis expires them).
                let oldest = (crate::queue::now_ms() / 1000).saturating_sub(7 * 86_400);
                let old: Vec<(u64, String)> = t
                    .range(..(oldest, ""))
                    .map_err(db_error)?
                    .filter_map(|r| r.ok())
                    .map(|(k, _)| {
                        let (s, d) = k.value();
                        (s, d.to_owned())
                    })
                    .collect();
                for (s, d) in &old {
                    t.remove((*s, d.as_str())).map_err(db_error)?;
                }
                let mut st = txn.open_table(SENDING).map_err(db_error)?;
                let old: Vec<u64> = st
                    .range(..oldest)
                    .map_err(db_error)?
                    .filter_map(|r| r.ok())
                    .map(|(k, _)| k.value())
                    .collect();
                for s in old {
                    st.remove(s).map_err(db_error)?;
                }
            }
            txn.commit().map_err(db_error)?;
            Ok(vec![Ok(()); n])
        })
    }

    fn domains(&self, start: u64) -> StoreFuture<'_, Vec<String>> {
        self.blocking(move |db| {
            use redb::ReadableDatabase;
            let txn = db.begin_read().map_err(db_error)?;
            let t = txn.open_table(COUNTS).map_err(db_error)?;
            let mut v = Vec::new();
            for row in t.range((start, "")..).map_err(db_error)? {
                let (k, _) = row.map_err(db_error)?;
                let (s, d) = k.value();
                if s != start {
                    break;
                }
                v.push(d.to_owned());
            }
            Ok(v)
        })
    }

    fn fields<'a>(&'a self, start: u64, domain: &'a str) -> StoreFuture<'a, Fields> {
        let domain = domain.to_owned();
        self.blocking(move |db| {
            use redb::ReadableDatabase;
            let txn = db.begin_read().map_err(db_error)?;
            let t = txn.open_table(COUNTS).map_err(db_error)?;
            Ok(match t.get((start, domain.as_str())).map_err(db_error)? {
                Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
                None => Fields::new(),
            })
        })
    }

    fn claim<'a>(&'a self, start: u64, token: &'a str, lease: Duration) -> StoreFuture<'a, Claim> {
        let token = token.to_owned();
        self.with_sending(start, move |s| s.claim(&token, lease))
    }

    fn release<'a>(&'a self, start: u64, token: &'a str) -> StoreFuture<'a, ()> {
        let token = token.to_owned();
        self.with_sending(start, move |s| s.release(&token))
    }

    fn progress(&self, start: u64) -> StoreFuture<'_, Fields> {
        self.blocking(move |db| {
            use redb::ReadableDatabase;
            let txn = db.begin_read().map_err(db_error)?;
            let t = txn.open_table(SENDING).map_err(db_error)?;
            Ok(match t.get(start).map_err(db_error)? {
                Some(v) => {
                    serde_json::from_slice::<Sending>(v.value())
                        .unwrap_or_default()
                        .progress
                }
                None => Fields::new(),
            })
        })
    }

    fn set_progress<'a>(
        &'a self,
        start: u64,
        item: &'a str,
        state: &'a str,
        _ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        let (item, state) = (item.to_owned(), state.to_owned());
        self.with_sending(start, move |s| {
            s.progress.insert(item, state);
        })
    }

    fn finish(&self, start: u64, _ttl: Duration) -> StoreFuture<'_, ()> {
        self.with_sending(start, |s| s.finished = true)
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: i64) -> Counts {
        let mut c = Counts::default();
        c.add.insert(success_field("sts"), n);
        c.set.insert(policy_field("sts"), "{}".into());
        c
    }

    #[tokio::test]
    async fn embedded_counts_and_sending_state_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.redb");
        let ttl = Duration::from_secs(60);
        let start = crate::queue::now_ms() / 1000;
        {
            let db = std::sync::Arc::new(redb::Database::create(&path).unwrap());
            let s = EmbeddedReports::open(db).unwrap();
            let batch = vec![
                (start, "a.test".to_owned(), counts(2)),
                (start, "b.test".to_owned(), counts(1)),
            ];
            assert!(
                s.add_batch(&batch, ttl)
                    .await
                    .unwrap()
                    .iter()
                    .all(|r| r.is_ok())
            );
            s.add(start, "a.test", &counts(3), ttl).await.unwrap();
            assert_eq!(
                s.claim(start, "one", Duration::from_secs(60))
                    .await
                    .unwrap(),
                Claim::Won
            );
            s.set_progress(start, "a.test mailto:x@r.test", "done", ttl)
                .await
                .unwrap();
        }
        let db = std::sync::Arc::new(redb::Database::create(&path).unwrap());
        let s = EmbeddedReports::open(db).unwrap();
        assert_eq!(s.domains(start).await.unwrap(), ["a.test", "b.test"]);
        let f = s.fields(start, "a.test").await.unwrap();
        assert_eq!(f[&success_field("sts")], "5");
        assert_eq!(
            s.fields(start, "b.test").await.unwrap()[&success_field("sts")],
            "1"
        );
        // The dead holder's lease still runs: another token waits; the same one
        // (or anyone after release) goes on.
        let lease = Duration::from_secs(60);
        assert_eq!(s.claim(start, "two", lease).await.unwrap(), Claim::Busy);
        assert_eq!(s.claim(start, "one", lease).await.unwrap(), Claim::Won);
        s.release(start, "one").await.unwrap();
        assert_eq!(s.claim(start, "two", lease).await.unwrap(), Claim::Won);
        assert_eq!(
            s.progress(start).await.unwrap()["a.test mailto:x@r.test"],
            "done"
        );
        s.finish(start, ttl).await.unwrap();
        assert_eq!(s.claim(start, "two", lease).await.unwrap(), Claim::Finished);
        // An expired lease is taken over.
        assert_eq!(
            s.claim(start + 1, "x", Duration::ZERO).await.unwrap(),
            Claim::Won
        );
        assert_eq!(s.claim(start + 1, "y", lease).await.unwrap(), Claim::Won);
    }
}
