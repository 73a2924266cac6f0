//! Mail postponed for a response-rule state, remembered so that it comes back
//! when the state goes early (lifted by hand, through this relay or another).
//!
//! A postponed message is due at its suspension's end, or spread at a throttle's
//! pace up to the throttle's end ([`super::Stop::recover`]): right when the state
//! runs its course. Lifted early, that mail would still wait. So each relay
//! remembers, per (site, scope field), the recipient domains whose mail it
//! postponed for the state and the state's end, and makes that mail due again
//! when the state is gone before its end: at once for a lift through this relay,
//! else when its watcher ([`WATCH`]) no longer finds the state in the store.
//! Waking a domain makes all of its waiting mail due (the queue's `retry_now`);
//! pacing then takes it again, so what other rules or quotas hold is postponed
//! anew.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a relay with postponed mail looks whether its states are still in
/// force.
pub const WATCH: Duration = Duration::from_secs(3);
/// Entries (site, scope) remembered at most; more are not remembered (their mail
/// waits out its due time).
const MAX_ENTRIES: usize = 4096;
/// Domains remembered per entry at most.
const MAX_DOMAINS: usize = 256;

/// Makes the waiting mail of these recipient domains due now.
pub type Waker = Arc<dyn Fn(Vec<String>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Debug, Default)]
struct Entry {
    /// The state's end (relay clock).
    until_ms: u64,
    domains: BTreeSet<String>,
}

/// The registry (pure; the clock is passed in).
#[derive(Debug, Default)]
pub struct Waiting {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

impl Waiting {
    /// Mail for `domain` was postponed for the state `field` at `site`, which
    /// ends at `until_ms`.
    pub fn note(&self, site: &str, field: &str, until_ms: u64, domain: &str) {
        let mut e = self.entries.lock().unwrap();
        let key = (site.to_owned(), field.to_owned());
        if !e.contains_key(&key) && e.len() >= MAX_ENTRIES {
            return;
        }
        let entry = e.entry(key).or_default();
        entry.until_ms = entry.until_ms.max(until_ms);
        if entry.domains.len() < MAX_DOMAINS {
            entry.domains.insert(domain.to_owned());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.lock().unwrap().is_empty()
    }

    /// The domains of the state `field` at `site` (forgotten).
    pub fn take(&self, site: &str, field: &str) -> Vec<String> {
        self.entries
            .lock()
            .unwrap()
            .remove(&(site.to_owned(), field.to_owned()))
            .map(|e| e.domains.into_iter().collect())
            .unwrap_or_default()
    }

    /// With the states in force `live` (site, field) at `now`: the domains of the
    /// states gone before their end (forgotten), and entries past their end
    /// forgotten (their mail is due by then anyway).
    pub fn gone(&self, live: &HashSet<(String, String)>, now: u64) -> Vec<String> {
        let mut out = BTreeSet::new();
        self.entries.lock().unwrap().retain(|k, e| {
            if e.until_ms <= now {
                return false;
            }
            if live.contains(k) {
                return true;
            }
            out.extend(std::mem::take(&mut e.domains));
            false
        });
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_gone_early_gives_its_domains_back_once() {
        let w = Waiting::default();
        w.note("mx.a", "sender_domain:a.test", 10_000, "inbox.test");
        w.note("mx.a", "sender_domain:a.test", 12_000, "other.test");
        w.note("mx.a", "*", 5_000, "inbox.test");
        w.note("mx.b", "rule:q.r", 20_000, "b.test");
        let live: HashSet<(String, String)> = [("mx.b".to_owned(), "rule:q.r".to_owned())]
            .into_iter()
            .collect();
        // At 6 s the site state is over (its mail is due), a.test's is gone early.
        assert_eq!(w.gone(&live, 6_000), ["inbox.test", "other.test"]);
        assert!(w.gone(&live, 6_000).is_empty());
        assert_eq!(w.take("mx.b", "rule:q.r"), ["b.test"]);
        assert!(w.is_empty());
        assert!(w.take("mx.b", "rule:q.r").is_empty());
    }
}
