//! Quota counters in process memory, for a relay with the embedded queue: the same
//! sliding window as Redis, behind one mutex (a check is a few map lookups).
//!
//! Counters are not persisted: a restart forgets them, so right after one a sender
//! may send a full window's worth again. A single-process relay accepts that; run
//! with Redis for counters that survive restarts and are shared.

use std::collections::HashMap;
use std::sync::Mutex;

use super::store::{
    ChargeOutcome, ChargeRequest, CounterStore, CounterUsage, MAX_KEYS_SCANNED, StoreFuture,
    UsageReport,
};
use super::window::{WindowSpec, WindowState};
use crate::queue::now_ms;

/// Counter identity: quota, window length, key. The limit is not part of it, so a
/// reload that changes a limit keeps the usage.
type CounterId = (String, u64, String);

#[derive(Default)]
struct Inner {
    counters: HashMap<CounterId, WindowState>,
    /// Per quota: key to (last charge, how long it must be remembered).
    index: HashMap<String, HashMap<String, (u64, u64)>>,
    charges: u64,
}

/// Sweep stale counters every this many charges, so memory follows the active keys.
const SWEEP_EVERY: u64 = 4096;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn id(quota: &str, spec: &WindowSpec, key: &str) -> CounterId {
        (quota.to_owned(), spec.window_ms, key.to_owned())
    }

    /// The charge as one synchronous step (the trait wraps it in a future).
    pub fn charge_now(&self, reqs: &[ChargeRequest], now: u64) -> ChargeOutcome {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut checks = Vec::with_capacity(reqs.len());
        let mut allowed = true;
        for r in reqs {
            let mut per = Vec::with_capacity(r.windows.len());
            for spec in &r.windows {
                let state = inner
                    .counters
                    .entry(Self::id(&r.quota, spec, &r.key))
                    .or_default();
                let c = state.check(spec, now, r.cost);
                allowed &= c.fits();
                per.push(c);
            }
            checks.push(per);
        }
        if allowed {
            for (r, per) in reqs.iter().zip(checks.iter_mut()) {
                for (spec, c) in r.windows.iter().zip(per.iter_mut()) {
                    let state = inner
                        .counters
                        .entry(Self::id(&r.quota, spec, &r.key))
                        .or_default();
                    *c = state.charge(spec, now, r.cost);
                }
                inner
                    .index
                    .entry(r.quota.clone())
                    .or_default()
                    .insert(r.key.clone(), (now, r.index_ttl_ms()));
            }
            inner.charges += 1;
            if inner.charges.is_multiple_of(SWEEP_EVERY) {
                sweep(&mut inner, now);
            }
        } else {
            // Nothing charged: drop counters the check created empty.
            for r in reqs {
                for spec in &r.windows {
                    let id = Self::id(&r.quota, spec, &r.key);
                    if inner.counters.get(&id).is_some_and(WindowState::is_empty) {
                        inner.counters.remove(&id);
                    }
                }
            }
        }
        ChargeOutcome {
            allowed,
            now,
            checks,
        }
    }
}

fn sweep(inner: &mut Inner, now: u64) {
    inner.counters.retain(|(_, window_ms, _), state| {
        // The spec's bucket size depends only on the window; the limit is irrelevant
        // to rolling.
        state.roll(&WindowSpec::new(1, *window_ms), now);
        !state.is_empty()
    });
    for keys in inner.index.values_mut() {
        keys.retain(|_, (last, ttl)| *last + *ttl > now);
    }
    inner.index.retain(|_, keys| !keys.is_empty());
}

impl CounterStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn check_and_charge<'a>(
        &'a self,
        reqs: &'a [ChargeRequest],
        at: Option<u64>,
    ) -> StoreFuture<'a, ChargeOutcome> {
        let out = self.charge_now(reqs, at.unwrap_or_else(now_ms));
        Box::pin(async move { Ok(out) })
    }

    fn refund<'a>(&'a self, reqs: &'a [ChargeRequest], charged_at: u64) -> StoreFuture<'a, ()> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for r in reqs {
            for spec in &r.windows {
                if let Some(state) = inner.counters.get_mut(&Self::id(&r.quota, spec, &r.key)) {
                    state.refund(spec, charged_at, r.cost);
                }
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn usage<'a>(
        &'a self,
        quota: &'a str,
        keys: &'a [String],
        windows: &'a [WindowSpec],
        at: Option<u64>,
    ) -> StoreFuture<'a, UsageReport> {
        let now = at.unwrap_or_else(now_ms);
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let keys = keys
            .iter()
            .map(|k| {
                windows
                    .iter()
                    .map(|spec| {
                        let (used, resets_at) = inner
                            .counters
                            .get(&Self::id(quota, spec, k))
                            .map_or((0, now), |s| s.usage(spec, now));
                        CounterUsage { used, resets_at }
                    })
                    .collect()
            })
            .collect();
        Box::pin(async move { Ok(UsageReport { now, keys }) })
    }

    fn active_keys<'a>(
        &'a self,
        quota: &'a str,
        window: WindowSpec,
        at: Option<u64>,
    ) -> StoreFuture<'a, Vec<(String, u64)>> {
        let now = at.unwrap_or_else(now_ms);
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut recent: Vec<(&String, u64)> = inner
            .index
            .get(quota)
            .map(|keys| {
                keys.iter()
                    .filter(|(_, (last, _))| last + window.ttl_ms() > now)
                    .map(|(k, (last, _))| (k, *last))
                    .collect()
            })
            .unwrap_or_default();
        recent.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        recent.truncate(MAX_KEYS_SCANNED);
        let out = recent
            .into_iter()
            .filter_map(|(k, _)| {
                let used = inner
                    .counters
                    .get(&Self::id(quota, &window, k))
                    .map_or(0, |s| s.usage(&window, now).0);
                (used > 0).then(|| (k.clone(), used))
            })
            .collect();
        Box::pin(async move { Ok(out) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, cost: u64) -> ChargeRequest {
        ChargeRequest {
            quota: "q".into(),
            key: key.into(),
            cost,
            windows: vec![WindowSpec::new(3, 60_000), WindowSpec::new(5, 3_600_000)],
        }
    }

    #[test]
    fn all_or_nothing_across_requests() {
        let s = MemoryStore::new();
        let other = ChargeRequest {
            quota: "r".into(),
            key: "*".into(),
            cost: 1,
            windows: vec![WindowSpec::new(1, 60_000)],
        };
        assert!(s.charge_now(&[req("a", 1), other.clone()], 1_000).allowed);
        // `r` is full: `q` must not be charged either.
        let o = s.charge_now(&[req("a", 1), other], 2_000);
        assert!(!o.allowed);
        assert_eq!(o.checks[0][0].used, 1);
        assert!(o.checks[0][0].fits());
        assert_eq!(o.checks[1][0].retry_at, Some(61_999));
        assert!(s.charge_now(&[req("a", 2)], 3_000).allowed);
        let o = s.charge_now(&[req("a", 1)], 4_000);
        assert!(!o.allowed);
        assert_eq!(o.checks[0][0].free_at, 61_999);
    }

    #[tokio::test]
    async fn usage_and_active_keys() {
        let s = MemoryStore::new();
        s.charge_now(&[req("a", 2)], 1_000);
        s.charge_now(&[req("b", 1)], 2_000);
        let specs = req("a", 1).windows;
        let u = s
            .usage("q", &["a".into(), "zz".into()], &specs, Some(10_000))
            .await
            .unwrap();
        assert_eq!(
            u.keys[0][0],
            CounterUsage {
                used: 2,
                resets_at: 61_999
            }
        );
        assert_eq!(
            u.keys[1][1],
            CounterUsage {
                used: 0,
                resets_at: 10_000
            }
        );
        let mut keys = s.active_keys("q", specs[1], Some(10_000)).await.unwrap();
        keys.sort();
        assert_eq!(keys, vec![("a".into(), 2), ("b".into(), 1)]);
        s.refund(&[req("a", 2)], 1_000).await.unwrap();
        let keys = s.active_keys("q", specs[1], Some(10_000)).await.unwrap();
        assert_eq!(keys, vec![("b".into(), 1)]);
        // Sweeping forgets what no longer counts.
        let mut inner = s.inner.lock().unwrap();
        sweep(&mut inner, 100_000_000);
        assert!(inner.counters.is_empty() && inner.index.is_empty());
    }
}
