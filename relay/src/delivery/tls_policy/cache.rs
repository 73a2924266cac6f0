//! The MTA-STS policy cache (RFC 8461 §5.1): by domain, the policy with its `id` and
//! expiry (`max_age` after the fetch).
//!
//! Two levels. In this process, an entry also remembers until when its `_mta-sts`
//! TXT answer is good (the record's TTL): until then a delivery to that domain costs
//! no DNS or HTTP round trip at all. Behind it, a [`SharedPolicies`] store (the
//! queue's Redis: one key per domain expiring with the policy) shared by every relay
//! process, read only on a miss, so one fetch serves the whole cluster; a claim key
//! keeps relays that miss at the same moment from all fetching.
//!
//! A TXT id that differs from the cached policy's triggers a refetch; a refetch that
//! fails keeps the cached policy until it expires, as does a TXT lookup that fails or
//! finds no record (RFC 8461 §3.3, §5.1).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::fetch::Fetcher;
use super::mta_sts::{Policy, StsError, parse_policy, parse_txt_records};
use crate::queue::now_ms;

/// How long "this domain publishes no `_mta-sts` record" is believed.
const NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// After a failed TXT lookup (timeout, SERVFAIL), the next delivery asks again
/// after this.
const TEMPFAIL_TTL: Duration = Duration::from_secs(60);
/// TXT TTLs are clamped to this range: a TTL of 0 must not turn every message into
/// a query, and a week-long TTL must not hide a changed id that long.
const MIN_TXT_TTL: Duration = Duration::from_secs(30);
const MAX_TXT_TTL: Duration = Duration::from_secs(3600);

/// A policy as cached (in memory and in the shared store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    pub id: String,
    pub policy: Policy,
    /// When it stops being usable (fetch time + max_age), ms since the epoch.
    pub expires_at_ms: u64,
}

/// What a lookup found for a domain.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    /// The policy in force (any mode), if there is one.
    pub policy: Option<Arc<Cached>>,
    /// Trouble met on the way (failed fetch, bad syntax), for the attempt record.
    pub note: Option<String>,
}

type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Where policies are shared between relay processes.
pub trait SharedPolicies: Send + Sync {
    /// The JSON of [`Cached`] stored for `domain`.
    fn get<'a>(&'a self, domain: &'a str) -> StoreFuture<'a, Option<String>>;
    /// Stores `json` for `domain`, expiring after `ttl`.
    fn put<'a>(&'a self, domain: &'a str, json: String, ttl: Duration) -> StoreFuture<'a, ()>;
    /// Claims the right to fetch `domain`'s policy for `ttl`: false when another
    /// relay holds the claim.
    fn claim<'a>(&'a self, domain: &'a str, ttl: Duration) -> StoreFuture<'a, bool>;
}

struct Entry {
    policy: Option<Arc<Cached>>,
    note: Option<String>,
    /// The TXT answer behind this entry is good until then.
    fresh_until: Instant,
}

/// Counts, for metrics and tests.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub txt_lookups: std::sync::atomic::AtomicU64,
    pub fetches: std::sync::atomic::AtomicU64,
    pub shared_hits: std::sync::atomic::AtomicU64,
}

pub struct StsCache {
    resolver: hickory_resolver::TokioResolver,
    fetcher: Fetcher,
    mem: Mutex<HashMap<String, Entry>>,
    /// One refresh per domain at a time in this process.
    refreshing: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shared: OnceLock<Arc<dyn SharedPolicies>>,
    pub stats: CacheStats,
    metrics: OnceLock<super::metrics::TlsMetrics>,
}

impl std::fmt::Debug for StsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsCache")
            .field("fetcher", &self.fetcher)
            .finish_non_exhaustive()
    }
}

enum Txt {
    Id(String, Instant),
    NoRecord,
    Invalid(StsError),
    TempFail(String),
}

impl StsCache {
    pub fn new(resolver: hickory_resolver::TokioResolver, fetcher: Fetcher) -> Self {
        StsCache {
            resolver,
            fetcher,
            mem: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(HashMap::new()),
            shared: OnceLock::new(),
            stats: CacheStats::default(),
            metrics: OnceLock::new(),
        }
    }

    /// Counts lookups and fetches in `m` from now on (once).
    pub fn count_with(&self, m: super::metrics::TlsMetrics) {
        let _ = self.metrics.set(m);
    }

    fn count(&self, f: impl FnOnce(&super::metrics::TlsMetrics)) {
        if let Some(m) = self.metrics.get() {
            f(m);
        }
    }

    /// Shares policies through `store` from now on (once; later calls are ignored).
    pub fn share_with(&self, store: Arc<dyn SharedPolicies>) {
        let _ = self.shared.set(store);
    }

    /// The policy of `domain` (lower case, no trailing dot).
    pub async fn lookup(&self, domain: &str) -> Lookup {
        if let Some(hit) = self.fresh(domain) {
            self.count(|m| m.sts_lookup("memory"));
            return hit;
        }
        let gate = {
            let mut map = self.refreshing.lock().await;
            if map.len() > 1000 {
                map.retain(|_, m| Arc::strong_count(m) > 1);
            }
            Arc::clone(map.entry(domain.to_owned()).or_default())
        };
        let _one = gate.lock().await;
        // Another task may have refreshed it while we waited.
        if let Some(hit) = self.fresh(domain) {
            self.count(|m| m.sts_lookup("memory"));
            return hit;
        }
        self.count(|m| m.sts_lookup("dns"));
        let (found, fresh_for) = self.refresh(domain).await;
        let mut mem = self.mem.lock().unwrap();
        if mem.len() > 100_000 {
            let now = Instant::now();
            mem.retain(|_, e| e.fresh_until > now);
        }
        mem.insert(
            domain.to_owned(),
            Entry {
                policy: found.policy.clone(),
                note: found.note.clone(),
                fresh_until: Instant::now() + fresh_for,
            },
        );
        found
    }

    fn fresh(&self, domain: &str) -> Option<Lookup> {
        let mem = self.mem.lock().unwrap();
        let e = mem.get(domain)?;
        if Instant::now() >= e.fresh_until {
            return None;
        }
        let policy = e.policy.clone().filter(|c| c.expires_at_ms > now_ms());
        if e.policy.is_some() && policy.is_none() {
            return None;
        }
        Some(Lookup {
            policy,
            note: e.note.clone(),
        })
    }

    /// The cached policy (memory, then the shared store) that has not expired.
    async fn cached(&self, domain: &str) -> Option<Arc<Cached>> {
        let now = now_ms();
        let mem = self
            .mem
            .lock()
            .unwrap()
            .get(domain)
            .and_then(|e| e.policy.clone())
            .filter(|c| c.expires_at_ms > now);
        if mem.is_some() {
            return mem;
        }
        let store = self.shared.get()?;
        match store.get(domain).await {
            Ok(Some(json)) => match serde_json::from_str::<Cached>(&json) {
                Ok(c) if c.expires_at_ms > now => {
                    self.stats
                        .shared_hits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.count(|m| m.sts_lookup("shared"));
                    Some(Arc::new(c))
                }
                Ok(_) => None,
                Err(e) => {
                    warn!(%domain, error = %e, "ignoring an unreadable shared MTA-STS policy");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                debug!(%domain, error = %e, "shared MTA-STS cache unavailable");
                None
            }
        }
    }

    async fn txt(&self, domain: &str) -> Txt {
        self.stats
            .txt_lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self
            .resolver
            .txt_lookup(format!("_mta-sts.{domain}."))
            .await
        {
            Ok(lookup) => {
                // A record's strings are one value (RFC 8461 §3.1).
                let records = super::txt_values(lookup.answers());
                let until = lookup.valid_until();
                match parse_txt_records(records.iter().map(Vec::as_slice)) {
                    Ok(id) => Txt::Id(id, until),
                    Err(StsError::NoRecord) => Txt::NoRecord,
                    Err(e) => Txt::Invalid(e),
                }
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Txt::NoRecord,
            Err(e) => Txt::TempFail(e.to_string()),
        }
    }

    /// Asks DNS (and maybe HTTPS): the lookup and how long to trust it.
    async fn refresh(&self, domain: &str) -> (Lookup, Duration) {
        let keep = |cached: Option<Arc<Cached>>, note: Option<String>, ttl| {
            (
                Lookup {
                    policy: cached,
                    note,
                },
                ttl,
            )
        };
        let (id, txt_until) = match self.txt(domain).await {
            Txt::Id(id, until) => (id, until),
            Txt::NoRecord => return keep(self.cached(domain).await, None, NEGATIVE_TTL),
            Txt::Invalid(e) => {
                let note = format!("MTA-STS TXT record of {domain}: {e}");
                return keep(self.cached(domain).await, Some(note), NEGATIVE_TTL);
            }
            Txt::TempFail(e) => {
                let note = format!("MTA-STS TXT lookup for {domain}: {e}");
                return keep(self.cached(domain).await, Some(note), TEMPFAIL_TTL);
            }
        };
        let ttl = txt_until
            .saturating_duration_since(Instant::now())
            .clamp(MIN_TXT_TTL, MAX_TXT_TTL);
        let cached = self.cached(domain).await;
        if let Some(c) = cached.as_ref().filter(|c| c.id == id) {
            return keep(Some(Arc::clone(c)), None, ttl);
        }
        // A new id: fetch, unless another relay is fetching it right now, in which
        // case its result is waited for in the shared store.
        if let Some(store) = self.shared.get() {
            let claimed = store
                .claim(domain, self.fetcher.timeout + Duration::from_secs(1))
                .await
                .unwrap_or(true);
            if !claimed {
                let deadline = Instant::now() + self.fetcher.timeout;
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Some(c) = self.cached(domain).await.filter(|c| c.id == id) {
                        return keep(Some(c), None, ttl);
                    }
                }
            }
        }
        self.stats
            .fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fetched = match self.fetcher.fetch(domain).await {
            Ok(body) => parse_policy(&body).map_err(|e| {
                self.count(|m| m.sts_fetch("invalid"));
                e.to_string()
            }),
            Err(e) => {
                self.count(|m| m.sts_fetch("failed"));
                Err(e)
            }
        };
        match fetched {
            Ok(policy) => {
                self.count(|m| m.sts_fetch("ok"));
                let c = Cached {
                    id: id.clone(),
                    expires_at_ms: now_ms() + policy.max_age * 1000,
                    policy,
                };
                info!(%domain, id = %c.id, mode = c.policy.mode.as_str(), max_age = c.policy.max_age, "MTA-STS policy fetched");
                if let Some(store) = self.shared.get()
                    && c.policy.max_age > 0
                {
                    let json = serde_json::to_string(&c).expect("a policy serialises");
                    if let Err(e) = store
                        .put(domain, json, Duration::from_secs(c.policy.max_age))
                        .await
                    {
                        warn!(%domain, error = %e, "could not share the MTA-STS policy");
                    }
                }
                keep(Some(Arc::new(c)), None, ttl)
            }
            Err(e) => {
                // RFC 8461 §5.1: a policy that cannot be refreshed is used until it
                // expires; with none cached the domain is treated as having none.
                let what = if cached.is_some() {
                    "keeping the cached policy"
                } else {
                    "no policy cached: delivering as without MTA-STS"
                };
                warn!(%domain, error = %e, "MTA-STS policy fetch failed; {what}");
                let note = format!("MTA-STS policy fetch failed ({what}): {e}");
                // Retried sooner than the TXT TTL: the server may be back soon.
                keep(cached, Some(note), TEMPFAIL_TTL.min(ttl))
            }
        }
    }
}

/// [`SharedPolicies`] in the queue's Redis. Keys (with `key_prefix: mr`):
/// `mr:sts:<domain>` holds the JSON of [`Cached`] and expires with the policy;
/// `mr:sts-claim:<domain>` marks a fetch under way. Each call touches one key, so
/// the keys spread over a cluster's slots by domain.
pub struct RedisPolicies {
    redis: crate::queue::redis::SharedRedis,
    get: redis::Script,
    put: redis::Script,
    claim: redis::Script,
}

const GET_LUA: &str = "return redis.call('GET', KEYS[1])";
const PUT_LUA: &str = "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])\nreturn 1";
const CLAIM_LUA: &str =
    "if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 1 end\nreturn 0";

/// The scripts by name (for the Lua lint).
pub fn lua_scripts() -> Vec<(&'static str, String)> {
    vec![
        ("sts_get", GET_LUA.to_owned()),
        ("sts_put", PUT_LUA.to_owned()),
        ("sts_claim", CLAIM_LUA.to_owned()),
    ]
}

impl RedisPolicies {
    pub async fn new(redis: crate::queue::redis::SharedRedis) -> Result<Self, String> {
        let s = RedisPolicies {
            redis,
            get: redis::Script::new(GET_LUA),
            put: redis::Script::new(PUT_LUA),
            claim: redis::Script::new(CLAIM_LUA),
        };
        for script in [&s.get, &s.put, &s.claim] {
            s.redis.load(script).await?;
        }
        Ok(s)
    }

    fn key(&self, kind: &str, domain: &str) -> String {
        format!("{}:{kind}:{domain}", self.redis.prefix())
    }
}

/// Redis calls for the cache are bounded: a slow store must not hold mail up.
const STORE_DEADLINE: Duration = Duration::from_secs(2);

async fn bounded<T>(f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(STORE_DEADLINE, f)
        .await
        .unwrap_or_else(|_| Err("redis: timed out".into()))
}

impl SharedPolicies for RedisPolicies {
    fn get<'a>(&'a self, domain: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(bounded(async move {
            let mut inv = self.get.prepare_invoke();
            inv.key(self.key("sts", domain));
            self.redis.invoke::<Option<String>>(&inv).await
        }))
    }

    fn put<'a>(&'a self, domain: &'a str, json: String, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(bounded(async move {
            let mut inv = self.put.prepare_invoke();
            inv.key(self.key("sts", domain))
                .arg(json)
                .arg(ttl.as_millis().max(1) as u64);
            self.redis.invoke::<i64>(&inv).await.map(|_| ())
        }))
    }

    fn claim<'a>(&'a self, domain: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(bounded(async move {
            let mut inv = self.claim.prepare_invoke();
            inv.key(self.key("sts-claim", domain))
                .arg(ttl.as_millis().max(1) as u64);
            self.redis.invoke::<i64>(&inv).await.map(|v| v == 1)
        }))
    }
}
