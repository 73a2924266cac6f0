//! [`Quotas`]: the quotas in force (reloadable), the counter store, and what this
//! process last learned from it. The SMTP session asks it at MAIL/RCPT (no IO), the
//! connection task before queueing a message (one store round trip), the delivery
//! scheduler before sending a held message, and the admin API for usage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::metrics::QuotaMetrics;
use super::model::{
    self, Applies, CompiledQuota, IngressFacts, QuotaSet, Refusal, SHARED_KEY, Subject,
};
use super::store::{ChargeOutcome, ChargeRequest, CounterStore, StoreError, StoreFuture};
use crate::queue::{QueuedMessage, now_ms};
use crate::quota::config::{Action, Direction, QuotaConfig, Scope, Unit};
use crate::quota::usage::{KeyUsage, QuotaUsage, WindowUsage};

/// Keys a per-key quota's usage lists at most.
pub const MAX_KEYS_LISTED: usize = 100;

/// Entries of the learned-state map before stale ones are swept.
const KNOWN_MAX: usize = 10_000;

/// What the last check told this process about one quota and key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    /// Units left in the tightest window after that check.
    remaining: u64,
    /// Which limit of the quota is the tightest.
    limit_idx: usize,
    /// Local ms until which `remaining` may be relied on: a full window stays full
    /// until its oldest bucket frees (other relays can only add); a partly used one
    /// is trusted for one bucket, after which units may have freed.
    valid_until: u64,
    /// Local ms when a unit frees, when `remaining` is 0.
    free_at: u64,
}

/// A charge made for a message, kept so it can be taken back if the message is
/// not queued after all.
#[derive(Debug, Clone)]
pub struct Charged {
    reqs: Vec<ChargeRequest>,
    at: u64,
}

/// The verdict on a complete message before it is queued.
#[derive(Debug)]
pub enum Admission {
    Accept {
        /// What was charged (reject-action quotas), for a refund on a failed write.
        charged: Option<Charged>,
        /// `defer` quotas the message falls under: it waits in the queue for them.
        held: Vec<String>,
    },
    /// Checked, charged and stored in the queue in one atomic call (standalone
    /// Redis): nothing is left to do but answer `250`.
    Queued {
        held: Vec<String>,
    },
    Refuse(Refusal),
}

/// The verdict on a held message about to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// Send it; `charged_at` is the store clock of the charge, if one was made.
    Go {
        charged_at: Option<u64>,
        quotas: Vec<String>,
    },
    /// A window is full: due again at `until` (local ms). `spacing_ms` is the
    /// average gap between units at the quota's full rate (window / limit), to
    /// spread a backlog out instead of waking it all at once.
    Wait {
        until: u64,
        quota: String,
        /// The counter key that is full (per-key backlogs are spread apart).
        key: String,
        spacing_ms: u64,
    },
    /// The counters could not be read: try again soon, send nothing meanwhile.
    Unavailable,
}

/// Usage of egress quotas, supplied by the egress side (its counters are its own).
pub trait EgressUsage: Send + Sync {
    /// A reload changed the quotas; the egress side takes its own from them.
    fn set_quotas(&self, _quotas: &[QuotaConfig]) {}

    fn usage<'a>(
        &'a self,
        quota: &'a QuotaConfig,
        key: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<KeyUsage>>;

    /// A reload: the response rules to apply from now on.
    fn set_rules(&self, _rules: crate::shaping::Rules) {}

    /// Response-rule states in force (`GET /api/v1/shaping`).
    fn shaping(&self) -> StoreFuture<'_, mailrelay_admin_api::types::ShapingList> {
        Box::pin(std::future::ready(Ok(Default::default())))
    }

    /// Ends one state by hand.
    fn lift<'a>(&'a self, _site: &'a str, _scope: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(false)))
    }
}

pub struct Quotas {
    set: RwLock<Arc<QuotaSet>>,
    store: Arc<dyn CounterStore>,
    /// Quota name, then key: looked up by `&str` on every command.
    known: Mutex<HashMap<String, HashMap<String, Known>>>,
    metrics: QuotaMetrics,
    timeout: Duration,
    egress: RwLock<Option<Arc<dyn EgressUsage>>>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("backend", &self.store.backend())
            .field("quotas", &self.set().quotas.len())
            .finish_non_exhaustive()
    }
}

fn facts(msg: &QueuedMessage) -> (IngressFacts<'_>, Vec<&str>) {
    let e = &msg.envelope;
    (
        IngressFacts {
            sender: &e.mail.from,
            auth_user: e.client.auth_user.as_deref(),
            client_ip: e.client.ip,
        },
        e.recipients.iter().map(|r| r.address.as_str()).collect(),
    )
}

fn request(set: &QuotaSet, a: &Applies) -> ChargeRequest {
    let q = &set.quotas[a.index];
    ChargeRequest {
        quota: q.name().to_owned(),
        key: a.key.clone(),
        cost: a.cost,
        windows: q.windows.clone(),
    }
}

/// The average gap between units at a window's full rate.
fn spacing(w: &super::window::WindowSpec) -> u64 {
    w.window_ms / w.limit.max(1)
}

/// Store clock to local clock.
fn local(store_ms: u64, outcome_now: u64, local_now: u64) -> u64 {
    (store_ms as i64 - outcome_now as i64 + local_now as i64).max(0) as u64
}

impl Quotas {
    /// `timeout` bounds every store call (a check that takes longer is answered
    /// `451 4.3.0`).
    pub fn new(
        cfgs: &[QuotaConfig],
        store: Arc<dyn CounterStore>,
        metrics: QuotaMetrics,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Quotas {
            set: RwLock::new(Arc::new(QuotaSet::compile(cfgs))),
            store,
            known: Mutex::new(HashMap::new()),
            metrics,
            timeout,
            egress: RwLock::new(None),
        })
    }

    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    pub fn store(&self) -> &Arc<dyn CounterStore> {
        &self.store
    }

    /// The quotas in force now.
    pub fn set(&self) -> Arc<QuotaSet> {
        Arc::clone(&self.set.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The configured quotas as given (for the egress side and for reload).
    pub fn configs(&self) -> Vec<QuotaConfig> {
        self.set().quotas.iter().map(|q| q.cfg.clone()).collect()
    }

    /// Puts a new config in force; counters are keyed by quota name, so a quota
    /// that keeps its name keeps its usage. Returns whether anything changed.
    pub fn reload(&self, cfgs: &[QuotaConfig]) -> bool {
        if self.configs() == cfgs {
            return false;
        }
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(QuotaSet::compile(cfgs));
        let egress = self
            .egress
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(e) = egress {
            e.set_quotas(cfgs);
        }
        // What was learned under the old limits may not hold under the new ones.
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clear();
        true
    }

    /// The egress side, once delivery started (response rules live there).
    pub fn egress(&self) -> Option<Arc<dyn EgressUsage>> {
        self.egress
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_egress_usage(&self, provider: Arc<dyn EgressUsage>) {
        *self.egress.write().unwrap_or_else(|p| p.into_inner()) = Some(provider);
    }

    fn known(&self, quota: &str, key: &str, now: u64) -> Option<Known> {
        let map = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        map.get(quota)
            .and_then(|keys| keys.get(key))
            .filter(|k| k.valid_until > now)
            .copied()
    }

    /// The state of a window known to be full now, if it is.
    fn known_full(&self, quota: &str, key: &str, now: u64) -> Option<Known> {
        self.known(quota, key, now).filter(|k| k.remaining == 0)
    }

    /// Remembers what a check said, for the cheap checks at MAIL and RCPT: that a
    /// window is full (until when), and for recipients quotas how many units are
    /// left. Nothing else is kept, so while no quota is full the map stays empty and
    /// the checks at MAIL and RCPT cost no lookup at all.
    fn learn(&self, reqs: &[ChargeRequest], outcome: &ChargeOutcome, local_now: u64) {
        let set = self.set();
        let mut map = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for keys in map.values_mut() {
            if keys.len() >= KNOWN_MAX {
                keys.retain(|_, k| k.valid_until > local_now);
                if keys.len() >= KNOWN_MAX {
                    keys.clear();
                }
            }
        }
        for (r, checks) in reqs.iter().zip(&outcome.checks) {
            let Some((limit_idx, remaining)) = r
                .windows
                .iter()
                .zip(checks)
                .map(|(w, c)| w.limit.saturating_sub(c.used))
                .enumerate()
                .min_by_key(|(_, rem)| *rem)
            else {
                continue;
            };
            let recipients = set.counts_recipients(&r.quota);
            let known = if remaining == 0 {
                // Every full window must free a unit before one more fits.
                let free = r
                    .windows
                    .iter()
                    .zip(checks)
                    .filter(|(w, c)| c.used >= w.limit)
                    .map(|(_, c)| c.free_at)
                    .max()
                    .unwrap_or(outcome.now);
                let free_at = local(free, outcome.now, local_now);
                Known {
                    remaining,
                    limit_idx,
                    valid_until: free_at,
                    free_at,
                }
            } else if recipients {
                let bucket = r.windows.iter().map(|w| w.bucket_ms).min().unwrap_or(0);
                Known {
                    remaining,
                    limit_idx,
                    valid_until: local_now + bucket.min(1000),
                    free_at: 0,
                }
            } else {
                // Not full: forget a full state learned earlier (a refund, say).
                if let Some(keys) = map.get_mut(&r.quota) {
                    keys.remove(&r.key);
                }
                continue;
            };
            let keys = match map.get_mut(&r.quota) {
                Some(keys) => keys,
                None => map.entry(r.quota.clone()).or_default(),
            };
            match keys.get_mut(&r.key) {
                Some(k) => *k = known,
                None => {
                    keys.insert(r.key.clone(), known);
                }
            }
        }
        map.retain(|_, keys| !keys.is_empty());
    }

    /// One check-and-charge against the store, timed and counted.
    async fn charge(&self, reqs: &[ChargeRequest]) -> Result<ChargeOutcome, StoreError> {
        self.timed(reqs, self.store.check_and_charge(reqs, None))
            .await
    }

    /// Runs a check (alone, or with the enqueue), bounded by the timeout; counts
    /// it, and learns from its answer.
    async fn timed(
        &self,
        reqs: &[ChargeRequest],
        fut: StoreFuture<'_, ChargeOutcome>,
    ) -> Result<ChargeOutcome, StoreError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        let elapsed = started.elapsed();
        match &result {
            Ok(o) if o.allowed => self.metrics.check("allowed", Some(elapsed)),
            Ok(_) => self.metrics.check("denied", Some(elapsed)),
            Err(e) => {
                self.metrics.check("error", Some(elapsed));
                warn!(backend = self.store.backend(), error = %e, "quota check failed");
            }
        }
        if let Ok(o) = &result {
            self.learn(reqs, o, now_ms());
        }
        result
    }

    /// The refusal for a denied check: the first window that did not fit names the
    /// quota; the retry time is when every denied window fits.
    fn denial(
        &self,
        set: &QuotaSet,
        applies: &[&Applies],
        o: &ChargeOutcome,
        local_now: u64,
    ) -> Refusal {
        let mut first: Option<(&CompiledQuota, usize, u64)> = None;
        let mut retry = 0;
        for (a, checks) in applies.iter().zip(&o.checks) {
            let q = &set.quotas[a.index];
            for (i, c) in checks.iter().enumerate() {
                if c.fits() {
                    continue;
                }
                let Some(at) = c.retry_at else {
                    // Only if the config changed under us: the cost alone is too much.
                    return model::never_fits(q, &q.cfg.limits[i]);
                };
                retry = retry.max(at);
                first.get_or_insert((q, i, c.used));
            }
        }
        let Some((q, i, used)) = first else {
            return model::unavailable(self.store.backend());
        };
        let limit = &q.cfg.limits[i];
        if q.cfg.unit == Unit::Recipients && used < limit.count {
            model::too_many_recipients(q, limit, limit.count - used)
        } else {
            model::exceeded(q, limit, local(retry, o.now, local_now), local_now)
        }
    }

    fn refused(&self, r: Refusal) -> Admission {
        if let Some(q) = &r.quota {
            self.metrics.rejected(q);
        }
        Admission::Refuse(r)
    }

    /// The authoritative check of a complete message, before it is queued: every
    /// `reject` quota it falls under is checked and charged in one store call.
    pub async fn admit(&self, msg: &QueuedMessage) -> Admission {
        let set = self.set();
        if !set.has_ingress() {
            return Admission::Accept {
                charged: None,
                held: Vec::new(),
            };
        }
        let (f, rcpts) = facts(msg);
        let applies = set.ingress(&f, &rcpts, msg.body.len() as u64);
        for a in &applies {
            if let Some((q, l)) = set.oversized(a) {
                return self.refused(model::never_fits(q, l));
            }
        }
        let held: Vec<String> = applies
            .iter()
            .filter(|a| a.action == Action::Defer)
            .map(|a| set.quotas[a.index].name().to_owned())
            .collect();
        for q in &held {
            self.metrics.held(q);
        }
        let reject: Vec<&Applies> = applies
            .iter()
            .filter(|a| a.action == Action::Reject)
            .collect();
        if reject.is_empty() {
            return Admission::Accept {
                charged: None,
                held,
            };
        }
        let now = now_ms();
        for a in &reject {
            let q = &set.quotas[a.index];
            if let Some(k) = self.known_full(q.name(), &a.key, now) {
                self.metrics.check("cached", None);
                return self.refused(model::exceeded(
                    q,
                    &q.cfg.limits[k.limit_idx],
                    k.free_at,
                    now,
                ));
            }
        }
        let reqs: Vec<ChargeRequest> = reject.iter().map(|a| request(&set, a)).collect();
        if let Some(fut) = self.store.check_charge_enqueue(&reqs, msg) {
            return match self.timed(&reqs, fut).await {
                Ok(o) if o.allowed => Admission::Queued { held },
                Ok(o) => self.refused(self.denial(&set, &reject, &o, now_ms())),
                Err(StoreError::Full(_)) => Admission::Refuse(model::queue_full()),
                Err(_) => Admission::Refuse(model::unavailable(self.store.backend())),
            };
        }
        match self.charge(&reqs).await {
            Ok(o) if o.allowed => Admission::Accept {
                charged: Some(Charged { reqs, at: o.now }),
                held,
            },
            Ok(o) => self.refused(self.denial(&set, &reject, &o, now_ms())),
            Err(_) => Admission::Refuse(model::unavailable(self.store.backend())),
        }
    }

    /// Takes back a charge whose message was not queued (best effort: a failure is
    /// logged; the units then age out with the window).
    pub async fn refund(&self, c: Charged) {
        match tokio::time::timeout(self.timeout, self.store.refund(&c.reqs, c.at)).await {
            Ok(Ok(())) => debug!("quota charge refunded after a failed queue write"),
            Ok(Err(e)) => {
                warn!(error = %e, "quota refund failed; the charge stays until it ages out")
            }
            Err(_) => warn!("quota refund timed out; the charge stays until it ages out"),
        }
    }

    /// Whether some ingress quota holds mail (`action: defer`): if not, delivery
    /// needs no check at all.
    pub fn holds_mail(&self) -> bool {
        self.set()
            .quotas
            .iter()
            .any(|q| q.is_ingress() && q.cfg.action == Action::Defer)
    }

    /// The check of a held message before its first delivery: every `defer` quota it
    /// falls under must allow it, and is charged then.
    pub async fn release(&self, msg: &QueuedMessage) -> Release {
        let set = self.set();
        let (f, rcpts) = facts(msg);
        let applies: Vec<Applies> = set
            .ingress(&f, &rcpts, msg.body.len() as u64)
            .into_iter()
            .filter(|a| a.action == Action::Defer)
            .collect();
        if applies.is_empty() {
            return Release::Go {
                charged_at: None,
                quotas: Vec::new(),
            };
        }
        let names: Vec<String> = applies
            .iter()
            .map(|a| set.quotas[a.index].name().to_owned())
            .collect();
        if let Some((q, l)) = applies.iter().find_map(|a| set.oversized(a)) {
            // Accepted before the quota shrank below this message: holding it would
            // hold it until it expires. It goes uncounted.
            warn!(queue_id = %msg.envelope.id, quota = q.name(), limit = %l, "held message exceeds its quota on its own; released uncounted");
            return Release::Go {
                charged_at: None,
                quotas: names,
            };
        }
        let now = now_ms();
        for a in &applies {
            let q = &set.quotas[a.index];
            if let Some(k) = self.known_full(q.name(), &a.key, now) {
                self.metrics.check("cached", None);
                self.metrics.deferred(q.name());
                return Release::Wait {
                    until: k.free_at,
                    quota: q.name().to_owned(),
                    key: a.key.clone(),
                    spacing_ms: spacing(&q.windows[k.limit_idx]),
                };
            }
        }
        let reqs: Vec<ChargeRequest> = applies.iter().map(|a| request(&set, a)).collect();
        match self.charge(&reqs).await {
            Ok(o) if o.allowed => {
                for n in &names {
                    self.metrics.released(n);
                }
                Release::Go {
                    charged_at: Some(o.now),
                    quotas: names,
                }
            }
            Ok(o) => {
                let local_now = now_ms();
                let mut until = local_now;
                let mut first: Option<(String, String)> = None;
                let mut spacing_ms = 0;
                for (a, checks) in applies.iter().zip(&o.checks) {
                    let q = &set.quotas[a.index];
                    for (w, c) in q.windows.iter().zip(checks).filter(|(_, c)| !c.fits()) {
                        until = until.max(local(c.retry_at.unwrap_or(o.now), o.now, local_now));
                        spacing_ms = spacing_ms.max(spacing(w));
                        first.get_or_insert_with(|| (q.name().to_owned(), a.key.clone()));
                    }
                }
                let (quota, key) = first.unwrap_or_default();
                self.metrics.deferred(&quota);
                Release::Wait {
                    until,
                    quota,
                    key,
                    spacing_ms,
                }
            }
            Err(_) => Release::Unavailable,
        }
    }

    /// Usage of one quota: every key with units counted in its longest window (most
    /// used first, at most [`MAX_KEYS_LISTED`]), or just `key`.
    pub async fn usage(
        &self,
        q: &CompiledQuota,
        key: Option<&str>,
    ) -> Result<QuotaUsage, StoreError> {
        let mut out = QuotaUsage {
            name: q.name().to_owned(),
            direction: q.cfg.direction.into(),
            scope: q.cfg.scope.into(),
            action: q.cfg.action.into(),
            limits: q.cfg.limits.iter().map(ToString::to_string).collect(),
            keys: Vec::new(),
        };
        if q.cfg.direction == Direction::Egress {
            let provider = self
                .egress
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(p) = provider {
                out.keys = self.bounded(p.usage(&q.cfg, key)).await?;
            }
            return Ok(out);
        }
        let keys: Vec<String> = match (q.cfg.scope, key) {
            (Scope::Shared, _) => vec![SHARED_KEY.to_owned()],
            (Scope::PerKey, Some(k)) => vec![k.to_lowercase()],
            (Scope::PerKey, None) => {
                let Some(longest) = q.windows.iter().max_by_key(|w| w.window_ms) else {
                    return Ok(out);
                };
                let mut active = self
                    .bounded(self.store.active_keys(q.name(), *longest, None))
                    .await?;
                active.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                active.truncate(MAX_KEYS_LISTED);
                active.into_iter().map(|(k, _)| k).collect()
            }
        };
        if keys.is_empty() {
            return Ok(out);
        }
        let report = self
            .bounded(self.store.usage(q.name(), &keys, &q.windows, None))
            .await?;
        out.keys = keys
            .into_iter()
            .zip(report.keys)
            .map(|(key, per)| KeyUsage {
                key,
                windows: q
                    .cfg
                    .limits
                    .iter()
                    .zip(&q.windows)
                    .zip(per)
                    .map(|((l, w), u)| WindowUsage {
                        limit: l.to_string(),
                        window_seconds: w.window_ms / 1000,
                        used: u.used,
                        remaining: w.limit.saturating_sub(u.used),
                        scheduled: None,
                        resets_at: crate::quota::usage::rfc3339(u.resets_at),
                        resets_in_seconds: u.resets_at.saturating_sub(report.now).div_ceil(1000),
                    })
                    .collect(),
                connections: None,
            })
            .collect();
        Ok(out)
    }

    async fn bounded<T>(&self, fut: StoreFuture<'_, T>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}

/// The cheap checks the SMTP session makes while a transaction runs (through its
/// `IngressPolicy` adapter): against limits alone and against what this process
/// last learned from the counters. The authoritative check-and-charge is
/// [`Quotas::admit`], when the message is complete.
impl Quotas {
    /// At MAIL FROM, with the `SIZE=` the client declared.
    pub fn at_mail(&self, f: &IngressFacts, declared_size: Option<u64>) -> Option<Refusal> {
        let set = self.set();
        if !set.has_ingress() {
            return None;
        }
        let now = now_ms();
        let f = &Subject::new(f);
        for q in set
            .quotas
            .iter()
            .filter(|q| q.is_ingress() && q.matches_client(f))
        {
            if let (Unit::Bytes, Some(size)) = (q.cfg.unit, declared_size)
                && let Some(l) = q.cfg.limits.iter().find(|l| size > l.count)
            {
                self.metrics.rejected(q.name());
                return Some(model::too_big(q, l));
            }
            if q.needs_recipients() || q.cfg.action != Action::Reject {
                continue;
            }
            if let Some(k) = self.known_full(q.name(), &q.key(f), now) {
                self.metrics.check("cached", None);
                self.metrics.rejected(q.name());
                return Some(model::exceeded(
                    q,
                    &q.cfg.limits[k.limit_idx],
                    k.free_at,
                    now,
                ));
            }
        }
        None
    }

    /// At RCPT TO: `accepted` are the recipients of this transaction so far.
    pub fn at_rcpt(&self, f: &IngressFacts, accepted: &[&str], new: &str) -> Option<Refusal> {
        let set = self.set();
        if !set.has_ingress() {
            return None;
        }
        let now = now_ms();
        let f = &Subject::new(f);
        for q in set
            .quotas
            .iter()
            .filter(|q| q.is_ingress() && q.counts_recipient(new) && q.matches_client(f))
        {
            let before = accepted.iter().filter(|r| q.counts_recipient(r)).count() as u64;
            if q.cfg.unit == Unit::Recipients
                && let Some(l) = q.cfg.limits.iter().find(|l| before + 1 > l.count)
            {
                self.metrics.rejected(q.name());
                return Some(model::too_many_recipients(
                    q,
                    l,
                    l.count.saturating_sub(before),
                ));
            }
            if q.cfg.action != Action::Reject {
                continue;
            }
            let Some(k) = self.known(q.name(), &q.key(f), now) else {
                continue;
            };
            let limit = &q.cfg.limits[k.limit_idx];
            if k.remaining == 0 {
                self.metrics.check("cached", None);
                self.metrics.rejected(q.name());
                return Some(model::exceeded(q, limit, k.free_at, now));
            }
            if q.cfg.unit == Unit::Recipients && before + 1 > k.remaining {
                self.metrics.rejected(q.name());
                return Some(model::too_many_recipients(
                    q,
                    limit,
                    k.remaining.saturating_sub(before),
                ));
            }
        }
        None
    }

    /// Whether complete messages must be checked before they are queued.
    pub fn check_before_queueing(&self) -> bool {
        self.set().has_ingress()
    }
}

#[cfg(test)]
mod tests {
    use super::super::memory::MemoryStore;
    use super::*;
    use crate::queue::{ClientInfo, Envelope, MailParams, QueueId, Recipient};

    fn quotas(yaml: &str) -> Arc<Quotas> {
        let cfgs: Vec<QuotaConfig> = serde_norway::from_str(yaml).unwrap();
        crate::quota::config::validate(&cfgs).unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        Quotas::new(
            &cfgs,
            Arc::new(MemoryStore::new()),
            QuotaMetrics::register(&mut reg),
            Duration::from_secs(5),
        )
    }

    fn msg(from: &str, rcpts: &[&str], user: Option<&str>) -> QueuedMessage {
        QueuedMessage {
            envelope: Envelope {
                id: QueueId::generate(),
                mail: MailParams {
                    from: from.into(),
                    ..MailParams::default()
                },
                recipients: rcpts
                    .iter()
                    .map(|a| Recipient {
                        address: (*a).into(),
                        notify: None,
                        orcpt: None,
                    })
                    .collect(),
                client: ClientInfo {
                    ip: "192.0.2.1".parse().unwrap(),
                    port: 1,
                    helo: "c".into(),
                    auth_user: user.map(Into::into),
                    tls: None,
                    listener: "smtp".into(),
                },
                received_at_ms: 0,
                received_by: "relay.test".into(),
            },
            body: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
        }
    }

    fn f<'a>(sender: &'a str) -> IngressFacts<'a> {
        IngressFacts {
            sender,
            auth_user: None,
            client_ip: "192.0.2.1".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn exactly_n_pass_then_mail_is_refused_early() {
        let q = quotas(
            "- {name: t, direction: ingress, limits: [3/1h], match: {senders: ['*@a.example']}}",
        );
        for _ in 0..3 {
            assert!(matches!(
                q.admit(&msg("x@a.example", &["r@b.example"], None)).await,
                Admission::Accept {
                    charged: Some(_),
                    ..
                }
            ));
        }
        let Admission::Refuse(r) = q.admit(&msg("x@a.example", &["r@b.example"], None)).await
        else {
            panic!("fourth message accepted");
        };
        assert_eq!((r.reply.code, r.reason), (451, "quota_exceeded"));
        // Another sender has its own counter; another domain is not matched.
        assert!(matches!(
            q.admit(&msg("y@a.example", &["r@b.example"], None)).await,
            Admission::Accept { .. }
        ));
        assert!(q.at_mail(&f("z@c.example"), None).is_none());
        // What the last check said now refuses at MAIL, with no store call.
        let r = q.at_mail(&f("X@A.example"), None).expect("known full");
        assert!(
            r.reply.text.contains("Sending quota t exceeded (3/1h)"),
            "{r:?}"
        );
        // A reload keeps the counters (same name) but forgets the learned state.
        assert!(
            q.reload(&[serde_norway::from_str(
                "{name: t, direction: ingress, limits: [4/1h], match: {senders: ['*@a.example']}}"
            )
            .unwrap()])
        );
        assert!(q.at_mail(&f("x@a.example"), None).is_none());
        assert!(matches!(
            q.admit(&msg("x@a.example", &["r@b.example"], None)).await,
            Admission::Accept { .. }
        ));
        assert!(matches!(
            q.admit(&msg("x@a.example", &["r@b.example"], None)).await,
            Admission::Refuse(_)
        ));
    }

    #[tokio::test]
    async fn refunds_give_the_unit_back() {
        let q = quotas("- {name: t, direction: ingress, limits: [1/1h], scope: shared}");
        let Admission::Accept {
            charged: Some(c), ..
        } = q.admit(&msg("x@a.example", &["r@b.example"], None)).await
        else {
            panic!()
        };
        q.refund(c).await;
        q.known.lock().unwrap().clear();
        assert!(matches!(
            q.admit(&msg("y@a.example", &["r@b.example"], None)).await,
            Admission::Accept { .. }
        ));
    }

    #[tokio::test]
    async fn recipients_are_limited_at_rcpt_and_at_data() {
        let q = quotas(
            "- {name: r, direction: ingress, limits: [3/1h], unit: recipients, match: {recipient_domains: ['*.test']}}",
        );
        let f = f("s@x.example");
        assert!(q.at_rcpt(&f, &[], "a@one.test").is_none());
        assert!(
            q.at_rcpt(&f, &["a@one.test", "b@two.test"], "c@x.example")
                .is_none()
        );
        assert!(
            q.at_rcpt(&f, &["a@one.test", "b@two.test"], "c@three.test")
                .is_none()
        );
        let r = q
            .at_rcpt(
                &f,
                &["a@one.test", "b@two.test", "c@three.test"],
                "d@four.test",
            )
            .expect("a fourth counted recipient can never fit");
        assert_eq!(r.reply.code, 452);
        assert!(matches!(
            q.admit(&msg("s@x.example", &["a@one.test", "b@two.test"], None))
                .await,
            Admission::Accept { .. }
        ));
        // One left: a second recipient at RCPT is over.
        assert!(q.at_rcpt(&f, &[], "a@one.test").is_none());
        let r = q.at_rcpt(&f, &["a@one.test"], "b@two.test").unwrap();
        assert_eq!(r.reply.code, 452);
        assert!(r.reply.text.contains("0 allowed now"), "{r:?}");
        // At DATA the check says 452 too while some room is left.
        let Admission::Refuse(r) = q
            .admit(&msg("s@x.example", &["a@one.test", "b@two.test"], None))
            .await
        else {
            panic!()
        };
        assert_eq!(r.reply.code, 452);
    }

    #[tokio::test]
    async fn defer_quotas_hold_and_release() {
        let q = quotas("- {name: d, direction: ingress, limits: [2/1h], action: defer}");
        assert!(q.holds_mail());
        let m = msg("x@a.example", &["r@b.example"], None);
        let Admission::Accept { charged, held } = q.admit(&m).await else {
            panic!()
        };
        assert!(charged.is_none());
        assert_eq!(held, vec!["d".to_owned()]);
        for _ in 0..2 {
            assert!(matches!(
                q.release(&m).await,
                Release::Go {
                    charged_at: Some(_),
                    ..
                }
            ));
        }
        let Release::Wait {
            until,
            quota,
            spacing_ms,
            ..
        } = q.release(&m).await
        else {
            panic!()
        };
        assert_eq!((quota.as_str(), spacing_ms), ("d", 1_800_000));
        assert!(until > now_ms() + 3_000_000);
        // Oversized bytes quota at MAIL.
        let b = quotas("- {name: b, direction: ingress, limits: [1000/1h], unit: bytes}");
        assert_eq!(b.at_mail(&f("x@y"), Some(5000)).unwrap().reply.code, 552);
        assert!(b.at_mail(&f("x@y"), Some(500)).is_none());
    }

    #[tokio::test]
    async fn usage_lists_busiest_keys() {
        let q = quotas(
            "- {name: t, direction: ingress, limits: [10/1m, 100/1h]}\n- {name: s, direction: ingress, limits: [10/1m], scope: shared}",
        );
        for (from, n) in [("a@x", 3), ("b@x", 1), ("c@x", 2)] {
            for _ in 0..n {
                q.admit(&msg(from, &["r@y"], None)).await;
            }
        }
        let set = q.set();
        let u = q.usage(set.get("t").unwrap(), None).await.unwrap();
        let keys: Vec<(&str, u64)> = u
            .keys
            .iter()
            .map(|k| (k.key.as_str(), k.windows[1].used))
            .collect();
        assert_eq!(keys, [("a@x", 3), ("c@x", 2), ("b@x", 1)]);
        assert_eq!(u.keys[0].windows[0].remaining, 7);
        assert_eq!(u.keys[0].windows[0].window_seconds, 60);
        let one = q.usage(set.get("t").unwrap(), Some("B@X")).await.unwrap();
        assert_eq!(one.keys[0].windows[0].used, 1);
        let s = q.usage(set.get("s").unwrap(), None).await.unwrap();
        assert_eq!(s.keys.len(), 1);
        assert_eq!(
            (s.keys[0].key.as_str(), s.keys[0].windows[0].used),
            ("*", 6)
        );
    }
}
