//! The embedded egress store: the pacing, lease and back-off state of one process,
//! behind one mutex. Used with the embedded queue (a single relay process), and the
//! reference the Redis scripts are checked against: each step here has its
//! counterpart, in the same order, in `redis.rs`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::backoff::{BackoffPolicy, BackoffState};
use super::lease::LeaseSet;
use super::pacer::{Decision, Demand, KeyState, Window, decide};
use super::store::{Acquire, AcquireReply, Close, Extend, KeyUse, USAGE_SCAN, Verdict};
use crate::config::rules::RuleAction;
use crate::queue::now_ms;
use crate::shaping::{SITE, State};

/// Calls between sweeps of idle state.
const GC_EVERY: u64 = 1024;

#[derive(Debug, Default)]
struct Entry {
    pace: KeyState,
    leases: LeaseSet,
    last_use: u64,
}

#[derive(Debug, Default)]
struct State_ {
    /// By (quota, key).
    keys: HashMap<(String, String), Entry>,
    backoff: HashMap<String, BackoffState>,
    /// Back-off policy last used, for expiring records in the sweep.
    policy: Option<BackoffPolicy>,
    /// Response-rule states by site, then scope field.
    shaping: HashMap<String, HashMap<String, State>>,
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State_>,
    calls: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn maybe_gc(&self, st: &mut State_, now: u64) {
        if !self
            .calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(GC_EVERY)
        {
            return;
        }
        st.keys
            .retain(|_, e| !(e.pace.is_idle(now) && e.leases.open(now) == 0));
        if let Some(p) = st.policy {
            st.backoff.retain(|_, b| p.expires_at(b) > now);
        }
        for states in st.shaping.values_mut() {
            states.retain(|_, s| s.until_ms > now);
        }
        st.shaping.retain(|_, m| !m.is_empty());
    }

    /// The site's live states (expired ones dropped), the end of a site-wide
    /// suspension (or throttle's pause) and the site-wide throttle's slow-down
    /// (as `acquire.lua`).
    fn shaping_at(st: &mut State_, site: &str, now: u64) -> (Vec<State>, u64, f64) {
        let Some(m) = st.shaping.get_mut(site) else {
            return (Vec::new(), 0, 1.0);
        };
        m.retain(|_, s| s.until_ms > now);
        let mut until = 0;
        let mut slow = 1.0f64;
        let mut live: Vec<State> = m.values().cloned().collect();
        live.sort_by(|a, b| a.field.cmp(&b.field));
        for s in &live {
            if s.field == SITE {
                if s.action == RuleAction::Suspend {
                    until = until.max(s.until_ms);
                } else {
                    if s.factor > 0.0 && s.factor < 1.0 {
                        slow = slow.max(1.0 / s.factor);
                    }
                    // A throttle starts with a pause.
                    if let Some(u) = s.holds_until(now) {
                        until = until.max(u);
                    }
                }
            }
        }
        (live, until, slow)
    }

    pub fn shaping_set(
        &self,
        site: &str,
        state: &State,
        duration_ms: u64,
        now_ms_: Option<u64>,
    ) -> (u64, u64) {
        let now = now_ms_.unwrap_or_else(now_ms);
        let until = now + duration_ms;
        let mut st = self.state.lock().unwrap();
        let m = st.shaping.entry(site.to_owned()).or_default();
        if let Some(old) = m.get(&state.field)
            && old.until_ms > until
            && old.action == state.action
        {
            return (old.until_ms, now);
        }
        let mut s = state.clone();
        s.until_ms = until;
        m.insert(state.field.clone(), s);
        (until, now)
    }

    pub fn shaping_list(&self, now_ms_: Option<u64>) -> (u64, Vec<(String, State)>) {
        let now = now_ms_.unwrap_or_else(now_ms);
        let mut st = self.state.lock().unwrap();
        let sites: Vec<String> = st.shaping.keys().cloned().collect();
        let mut out = Vec::new();
        for site in sites {
            for s in Self::shaping_at(&mut st, &site, now).0 {
                out.push((site.clone(), s));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.field).cmp(&(&b.0, &b.1.field)));
        (now, out)
    }

    pub fn shaping_lift(&self, site: &str, field: &str) -> bool {
        let mut st = self.state.lock().unwrap();
        st.shaping
            .get_mut(site)
            .is_some_and(|m| m.remove(field).is_some())
    }

    pub fn acquire(&self, req: &Acquire<'_>) -> AcquireReply {
        let now = req.now_ms.unwrap_or_else(now_ms);
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        st.policy = Some(req.policy);
        self.maybe_gc(st, now);
        // Reports first: whatever is decided below, the previous message has ended.
        for (i, k) in req.keys.iter().enumerate() {
            if !k.paced() {
                continue;
            }
            let e = st
                .keys
                .entry((k.quota.to_string(), k.key.clone()))
                .or_default();
            if let Some(c) = &req.commit {
                let cost = c.costs.get(i).copied().unwrap_or(1);
                e.pace.commit(c.token, cost, c.end_ms, &k.windows);
            }
            e.pace.sweep(now, &k.windows);
        }
        let bo = st.backoff.get(req.site).copied().unwrap_or_default();
        let (states, suspended_until, slow) = Self::shaping_at(st, req.site, now);
        let until = req.policy.until(&bo).max(suspended_until);
        let level = req.policy.level_at(&bo, now);
        let reply = |verdict| AcquireReply {
            verdict,
            now_ms: now,
            level,
            states: states.clone(),
        };
        if until > now && until - now > req.timing.max_wait_ms {
            return reply(Verdict::BackedOff { until_ms: until });
        }
        if let Some(id) = req.lease {
            for k in req.keys {
                let Some(max) = k.max_connections else {
                    continue;
                };
                let e = st
                    .keys
                    .entry((k.quota.to_string(), k.key.clone()))
                    .or_default();
                if !e.leases.can_take(id, now, max) {
                    return reply(Verdict::NoConnection);
                }
            }
        }
        let mut at = now.max(until);
        if let Some(token) = req.token {
            // Each (quota, key) once: a map borrow per key at a time.
            let names: Vec<(String, String)> = req
                .keys
                .iter()
                .map(|k| (k.quota.to_string(), k.key.clone()))
                .collect();
            let mut states: Vec<(usize, KeyState)> = Vec::new();
            for (i, k) in req.keys.iter().enumerate() {
                // Cost 0: the message does not count there (another tenant's key).
                if k.paced() && req.costs.get(i).copied().unwrap_or(1) > 0 {
                    let e = st.keys.entry(names[i].clone()).or_default();
                    states.push((i, std::mem::take(&mut e.pace)));
                }
            }
            let factor = req.policy.factor(&bo, now) * slow;
            let decision = {
                let mut demands: Vec<Demand<'_>> = states
                    .iter_mut()
                    .map(|(i, s)| Demand {
                        state: s,
                        windows: &req.keys[*i].windows,
                        cost: req.costs.get(*i).copied().unwrap_or(1),
                    })
                    .collect();
                decide(
                    &mut demands,
                    now,
                    until,
                    factor,
                    req.timing.max_wait_ms,
                    token,
                    req.timing.flight_ttl_ms,
                )
            };
            for (i, s) in states {
                st.keys.get_mut(&names[i]).expect("entry made above").pace = s;
            }
            match decision {
                Decision::Grant(t) => at = t,
                Decision::Later(t) => return reply(Verdict::Later { at_ms: t }),
                Decision::Blocked => return reply(Verdict::Blocked),
            }
        }
        for k in req.keys {
            let e = st
                .keys
                .entry((k.quota.to_string(), k.key.clone()))
                .or_default();
            if let (Some(id), Some(max)) = (req.lease, k.max_connections) {
                let took = e.leases.take(id, now, req.timing.lease_ttl_ms, max);
                debug_assert!(took, "checked above under the same lock");
            }
            e.last_use = now;
        }
        reply(Verdict::Granted { at_ms: at })
    }

    pub fn extend(&self, req: &Extend<'_>) {
        let now = req.now_ms.unwrap_or_else(now_ms);
        let mut st = self.state.lock().unwrap();
        for k in req.keys {
            let Some(e) = st.keys.get_mut(&(k.quota.to_string(), k.key.clone())) else {
                continue;
            };
            if let (Some(id), Some(_)) = (req.lease, k.max_connections) {
                e.leases.extend(id, now, req.timing.lease_ttl_ms);
            }
            if let Some((token, _)) = req.flight
                && let Some(f) = e.pace.inflight.get_mut(token)
            {
                f.deadline = f.deadline.max(now + req.timing.flight_ttl_ms);
            }
        }
    }

    pub fn close(&self, req: &Close<'_>) {
        let mut st = self.state.lock().unwrap();
        for (i, k) in req.keys.iter().enumerate() {
            let e = st
                .keys
                .entry((k.quota.to_string(), k.key.clone()))
                .or_default();
            if let Some(c) = &req.commit
                && k.paced()
            {
                let cost = c.costs.get(i).copied().unwrap_or(1);
                e.pace.commit(c.token, cost, c.end_ms, &k.windows);
            }
            if let Some(id) = req.lease {
                e.leases.release(id);
            }
        }
    }

    pub fn rate_limited(
        &self,
        site: &str,
        policy: BackoffPolicy,
        now_ms_: Option<u64>,
    ) -> (u64, u64) {
        let now = now_ms_.unwrap_or_else(now_ms);
        let mut st = self.state.lock().unwrap();
        st.policy = Some(policy);
        let bo = st.backoff.entry(site.to_owned()).or_default();
        *bo = policy.on_rate_limited(bo, now);
        (policy.until(bo), now)
    }

    pub fn usage(
        &self,
        quota: &str,
        windows: &[Window],
        key: Option<&str>,
        flight_ttl_ms: u64,
        now_ms_: Option<u64>,
    ) -> (u64, Vec<KeyUse>) {
        let now = now_ms_.unwrap_or_else(now_ms);
        let mut st = self.state.lock().unwrap();
        let mut names: Vec<(u64, String)> = st
            .keys
            .iter()
            // Like the Redis key index: keys that were granted something.
            .filter(|((q, k), e)| q == quota && e.last_use > 0 && key.is_none_or(|want| want == k))
            .map(|((_, k), e)| (e.last_use, k.clone()))
            .collect();
        names.sort_unstable_by(|a, b| b.cmp(a));
        names.truncate(USAGE_SCAN);
        let mut out = Vec::new();
        for (_, k) in names {
            let e = st
                .keys
                .get_mut(&(quota.to_owned(), k.clone()))
                .expect("listed");
            e.pace.sweep(now, windows);
            out.push(KeyUse {
                windows: windows
                    .iter()
                    .map(|w| (e.pace.used(w, now), e.pace.resets_at(w, now)))
                    .collect(),
                scheduled: e.pace.scheduled_units(now, flight_ttl_ms),
                open_connections: e.leases.open(now) as u32,
                key: k,
            });
        }
        (now, out)
    }
}
