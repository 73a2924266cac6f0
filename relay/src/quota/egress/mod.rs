//! Egress pacing: outbound mail leaves no faster than the `direction: egress` quotas
//! allow and never over their connection caps, across every relay process sharing
//! one store; a destination that answers with a rate-limit reply is backed off by
//! itself. Mail held back waits in the queue: no failure, no bounce, and no retry
//! attempt counted.
//!
//! # The promise and how it is kept
//!
//! `N/W` means: the receiving server never sees more than `N` units (messages,
//! recipients or bytes) in any rolling window of length `W`, measured with its own
//! clock, whatever the number of relay processes. Two mechanisms work together
//! ([`pacer`] has the details and the proofs in its tests):
//!
//! - **GCRA** (evenly spaced, emission interval `W/N`, a small burst of a tenth of
//!   `N`, at most 10) spreads the traffic out, which is what providers like.
//! - **A sliding cap that counts messages in flight.** GCRA at exactly `W/N` lets
//!   `N + 1` messages land inside one window at the receiver as soon as the time
//!   between our decision and the server's timestamp varies (the fencepost), and its
//!   burst adds more. So a message counts from the moment its slot is granted until
//!   the relay reports when its transaction ended, and then at that end time (in
//!   buckets of `W/60`, the oldest counted in full). A slot is granted only when
//!   that count leaves room. Since the server sees a message between its grant and
//!   its reported end, any `N + 1` messages at the server are more than `W` apart —
//!   with no assumption about network or server delays. The price: each window
//!   carries `N` per `W` plus about one transaction time plus `W/60`.
//!
//! The report of a message's end rides on the next message's request (or the
//! connection's close), so pacing costs one store round trip per message, plus
//! one per connection. A relay that dies with messages in flight cannot report
//! them: they count until their deadline (renewed while the connection lives) and
//! then at their deadline, which errs on the safe side.
//!
//! # Where the checks happen
//!
//! After MX resolution (so `mx_hosts` patterns and the `mx_site` key can be
//! evaluated) and before connecting, [`Egress::open`] takes, in one atomic step, a
//! connection lease in every matching quota with `max_connections` and the pacing
//! slot of the first message. Before each later message on the connection, the
//! connection's [`EgressConn`] (the delivery session's gate, through an adapter)
//! takes that message's slot. A slot
//! due within [`INLINE_WAIT`] is waited for in-process, the connection open; a later
//! one ends the connection politely (QUIT) and the remaining messages go back to the
//! queue, due when their slot is (spread by the pacing interval so they do not
//! return as one herd). A full connection cap is waited for the same way, then the
//! messages are postponed by a few seconds.
//!
//! # Back-off
//!
//! A `421` or any `4.7.x` temporary reply ([`backoff::is_rate_limit_reply`]) pauses
//! the destination's MX site (the set of its MX hosts, or the smarthost) for every
//! relay: 15 s, doubling with each further complaint up to 8 min; afterwards paced
//! quotas run at half rate per level, recovering one level a minute. The message
//! that got the reply is deferred as usual (an attempt, with the reply recorded);
//! messages not yet attempted wait, unattempted, for the pause to end, and no other
//! MX host is tried. A `421` greeting without `4.7.x` ("too busy") speaks for its
//! host only: the next MX host is tried (RFC 5321 §5.1), and the site backs off only
//! when no host got as far as a transaction.
//!
//! # When the store cannot be read
//!
//! Nothing is sent over a limit because a counter could not be read: paced mail
//! waits (postponed, unattempted) until the store answers. Mail that no quota
//! matches goes on without its back-off check.

pub mod backoff;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod pacer;
pub mod redis;
pub mod store;
pub mod usage;
pub mod waiting;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::backoff::{BackoffPolicy, is_rate_limit_reply};
use self::memory::MemoryStore;
use self::metrics::{EgressMetrics, WaitReason};
use self::pacer::Window;
use self::redis::RedisStore;
use self::store::{
    Acquire, AcquireReply, Close, Commit, EgressError, Extend, KeyRef, PacingStore, Timing, Verdict,
};
use self::usage::QuotaUsage;
use crate::config::RedisConfig;
use crate::config::rules::{RuleAction, TenantKey};
use crate::queue::now_ms;
use crate::quota::config::{Direction, KeyBy, QuotaConfig, Scope, Unit};
use crate::quota::glob::{Glob, normalize_name};
use crate::quota::reply::Reply;
use crate::shaping::{
    Dest, RULE_FIELD, ReplyFacts, Rule, Rules, SITE, SenderFilters, State, Tenant,
};

/// Longest in-process wait for a slot or a connection permit; later ones go back to
/// the queue. Short enough that no server times out an idle connection.
pub const INLINE_WAIT: Duration = Duration::from_secs(5);
/// How often a full connection cap or window is looked at again while waiting.
const POLL: Duration = Duration::from_millis(250);
/// Messages that found the connection cap full or the store silent come back after
/// this, plus up to as much again at random.
const RETRY_LATER: Duration = Duration::from_secs(5);
/// Longest connection lease / flight without renewal (also bounded by
/// `delivery.lease`): a dead relay's connections free themselves after this.
const MAX_LEASE: Duration = Duration::from_secs(60);

/// One `direction: egress` quota, compiled.
#[derive(Debug, Clone)]
struct EgressQuota {
    name: Arc<str>,
    cfg: QuotaConfig,
    windows: Vec<Window>,
    /// `match.destination_domains` and `match.mx_hosts`, compiled.
    destination_domains: Vec<Glob>,
    mx_hosts: Vec<Glob>,
}

/// Where a connection goes, as egress matching needs it.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// The recipient domain every message on the connection is for. `None` when a
    /// connection to a relay host (a route or the smarthost) carries several
    /// domains: mail for a domain some `destination_domains` pattern names travels
    /// on connections of its own (see [`Egress::names_domain`]), so it is known.
    pub domain: Option<&'a str>,
    /// The MX host names tried for it, in any order (the relay host's name).
    pub mx_hosts: &'a [String],
    /// Mail goes through the configured smarthost.
    pub smarthost: bool,
    /// Mail goes to a host given in the config (a route or the smarthost), not to
    /// the domain's MX.
    pub relay_host: bool,
}

/// The quotas one destination falls under, with its key in each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The MX site: sorted, distinct MX host names joined by `,` (the smarthost's
    /// name through a smarthost). Also the back-off record.
    pub site: String,
    pub keys: Vec<KeyRef>,
    units: Vec<Unit>,
    /// What response rules select destinations by.
    domain: Option<String>,
    hosts: Vec<String>,
    smarthost: bool,
    /// Per key: `None` for a quota's key, else the scope field and rule of the
    /// throttle whose rate or connection cap the key carries (see [`rule_key`]);
    /// those keys come after every quota key.
    throttle_of: Vec<Option<(String, String)>>,
    /// The rules' sender filters: a state of a filtered rule concerns only the
    /// mail its filter takes.
    filters: SenderFilters,
}

/// The quota name of the keys throttle states pace and cap through (not a name a
/// quota can have: quota names are plain words).
pub const THROTTLE_QUOTA: &str = "~throttle";

/// The key through which `state` (a throttle in force) paces or caps `route`'s
/// connections, if it needs one: an absolute `rate`, a `factor` of the route's own
/// quota rates (for a tenant; a site-wide factor slows the quotas themselves in the
/// store), or `max_connections`. The key lives with the counters of the quotas, so
/// every relay sharing the store paces the scope as one.
fn rule_key(route: &Route, state: &State) -> Option<KeyRef> {
    let mut windows = Vec::new();
    if let Some(r) = state.rate {
        windows.push(Window {
            window_ms: r.window_ms,
            limit: r.count,
        });
    }
    if state.field != SITE && state.factor > 0.0 && state.factor < 1.0 {
        for k in &route.keys[..route.quota_keys()] {
            for w in &k.windows {
                if windows.iter().all(|o: &Window| o.window_ms != w.window_ms) {
                    windows.push(Window {
                        window_ms: w.window_ms,
                        limit: ((w.limit as f64 * state.factor).floor() as u64).max(1),
                    });
                }
            }
        }
    }
    // A connection cap is site-wide (config validation refuses one per tenant).
    let max_connections = state.max_connections.filter(|_| state.field == SITE);
    if windows.is_empty() && max_connections.is_none() {
        return None;
    }
    windows.sort_by_key(|w| w.window_ms);
    Some(KeyRef {
        quota: Arc::from(THROTTLE_QUOTA),
        key: format!("{}|{}", route.site, state.field),
        windows,
        max_connections,
    })
}

impl Route {
    fn dest(&self) -> Dest<'_> {
        Dest {
            domain: self.domain.as_deref(),
            hosts: &self.hosts,
            smarthost: self.smarthost,
        }
    }

    /// `egress_key` of tenant-scoped rules: the first quota key.
    fn egress_key(&self) -> Option<&str> {
        self.keys[..self.quota_keys()]
            .first()
            .map(|k| k.key.as_str())
    }

    /// How many keys are quotas' (the throttles' keys follow).
    fn quota_keys(&self) -> usize {
        self.throttle_of.iter().take_while(|t| t.is_none()).count()
    }

    /// Whether a state of scope `field` that `rule` started concerns the mail of
    /// `tenant`.
    fn concerns(&self, field: &str, rule: &str, tenant: Option<&Tenant>) -> bool {
        if !self.filters.admits(rule, tenant) {
            return false;
        }
        if let Some(r) = field.strip_prefix(RULE_FIELD) {
            // The filter admitted the tenant; a rule that lost its filter on a
            // reload holds no one.
            return r == rule && self.filters.get(rule).is_some();
        }
        field == SITE
            || tenant.is_some_and(|t| {
                field
                    .split_once(':')
                    .and_then(|(k, _)| tenant_key_named(k))
                    .and_then(|k| t.field(k, self.egress_key()))
                    .is_some_and(|f| f == field)
            })
    }

    /// The route with the keys of the throttles in `states` that concern some of
    /// `tenants` (the quota keys unchanged).
    fn with_throttles(&self, states: &[State], tenants: &[Tenant], now: u64) -> Route {
        let n = self.quota_keys();
        let mut r = self.clone();
        r.keys.truncate(n);
        r.units.truncate(n);
        r.throttle_of.truncate(n);
        for s in states.iter().filter(|s| s.throttles(now)) {
            if s.field != SITE
                && !tenants
                    .iter()
                    .any(|t| self.concerns(&s.field, &s.rule, Some(t)))
            {
                continue;
            }
            if let Some(k) = rule_key(&r, s)
                && !r.keys.iter().any(|o| o.key == k.key && o.quota == k.quota)
            {
                r.keys.push(k);
                r.units.push(Unit::Messages);
                r.throttle_of.push(Some((s.field.clone(), s.rule.clone())));
            }
        }
        r
    }

    /// Whether `states` hold a throttle concerning `tenant` whose key this route
    /// lacks (it started after the connection opened).
    fn lacks_throttle(&self, states: &[State], tenant: Option<&Tenant>, now: u64) -> bool {
        states.iter().any(|s| {
            s.throttles(now)
                && self.concerns(&s.field, &s.rule, tenant)
                && rule_key(self, s).is_some_and(|k| !self.keys.contains(&k))
        })
    }

    /// The scope field a message of `tenant` falls under for a state of `rule`.
    fn field(&self, rule: &Rule, tenant: Option<&Tenant>) -> Option<String> {
        rule.field(tenant, self.egress_key())
    }

    /// Until when `tenant`'s mail is held by a tenant-scoped state: a suspension,
    /// or a throttle's pause (site-wide ones the store reports as a back-off).
    fn suspended_until(&self, states: &[State], tenant: Option<&Tenant>, now: u64) -> Option<u64> {
        tenant?;
        states
            .iter()
            .filter(|s| s.field != SITE && self.concerns(&s.field, &s.rule, tenant))
            .filter_map(|s| s.holds_until(now))
            .max()
    }

    pub fn paced(&self) -> bool {
        self.keys.iter().any(KeyRef::paced)
    }

    /// The names of the quotas, for logs.
    pub fn quota_names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| &*k.quota).collect()
    }

    /// Per key: what a message of `rcpts` recipients and `bytes` octets from
    /// `tenant` costs (0 on a tenant throttle's key for another tenant's message).
    fn costs(&self, rcpts: usize, bytes: usize, tenant: Option<&Tenant>) -> Vec<u64> {
        self.units
            .iter()
            .zip(&self.throttle_of)
            .map(|(u, t)| match (u, t) {
                (_, Some((field, rule))) => u64::from(self.concerns(field, rule, tenant)),
                (Unit::Messages, None) => 1,
                (Unit::Recipients, None) => rcpts.max(1) as u64,
                (Unit::Bytes, None) => bytes.max(1) as u64,
            })
            .collect()
    }

    /// The slowest pacing interval of the route (ms per unit), to spread postponed
    /// messages.
    fn spacing_ms(&self, level: u32) -> u64 {
        Self::slowest(&self.keys, level)
    }

    fn slowest(keys: &[KeyRef], level: u32) -> u64 {
        let f = f64::from(1u32 << level.min(30));
        keys.iter()
            .flat_map(|k| &k.windows)
            .map(|w| w.spacing_ms(f).ceil() as u64)
            .max()
            .unwrap_or(0)
    }

    /// When the throttles whose keys the route carries end, by `states` (clock
    /// `now`); `None` when it carries none in force.
    fn throttles_end(&self, states: &[State], now: u64) -> Option<u64> {
        states
            .iter()
            .filter(|s| s.throttles(now))
            .filter(|s| rule_key(self, s).is_some_and(|k| self.keys.contains(&k)))
            .map(|s| s.until_ms)
            .max()
    }

    /// Messages from `index` on postponed from `until_ms` at the route's pace
    /// (back-off `level`); when that pace is a throttle's, they come back at the
    /// quotas' own pace once the throttle ends (`states` on clock `now`; `local`:
    /// the relay clock then).
    fn stop(
        &self,
        index: usize,
        until_ms: u64,
        level: u32,
        states: &[State],
        now: u64,
        local: u64,
    ) -> Stop {
        let spacing_ms = self.spacing_ms(level);
        let own = Self::slowest(&self.keys[..self.quota_keys()], level);
        let recover = (spacing_ms > own)
            .then(|| self.throttles_end(states, now))
            .flatten()
            .map(|end| (local.saturating_add(end.saturating_sub(now)), own));
        Stop {
            index,
            until_ms,
            spacing_ms,
            recover,
        }
    }
}

/// Which quotas match `d`, and the key of each (pure).
fn tenant_key_named(k: &str) -> Option<TenantKey> {
    [
        TenantKey::SenderDomain,
        TenantKey::FromDomain,
        TenantKey::DkimDomain,
        TenantKey::AuthUser,
        TenantKey::EgressKey,
    ]
    .into_iter()
    .find(|t| t.as_str() == k)
}

fn route_for(quotas: &[EgressQuota], d: &Destination<'_>) -> Route {
    let domain = d.domain.map(normalize_name);
    let mut hosts: Vec<String> = d.mx_hosts.iter().map(|h| normalize_name(h)).collect();
    hosts.sort();
    hosts.dedup();
    let site = hosts.join(",");
    let mut keys = Vec::new();
    let mut units = Vec::new();
    for q in quotas {
        if q.cfg.matcher.smarthost && !d.smarthost {
            continue;
        }
        if !q.destination_domains.is_empty()
            && !domain
                .as_deref()
                .is_some_and(|dom| q.destination_domains.iter().any(|g| g.is_match(dom)))
        {
            continue;
        }
        if !q.mx_hosts.is_empty()
            && !hosts
                .iter()
                .any(|h| q.mx_hosts.iter().any(|g| g.is_match(h)))
        {
            continue;
        }
        let key = match (q.cfg.scope, q.cfg.key, &domain) {
            (Scope::Shared, _, _) => "*".to_owned(),
            (Scope::PerKey, KeyBy::MxSite, _) | (Scope::PerKey, _, None) => site.clone(),
            // A relay host carries many domains on its connections: unless the
            // quota names domains, its host is the destination.
            (Scope::PerKey, KeyBy::Auto, Some(_))
                if d.relay_host && q.destination_domains.is_empty() =>
            {
                site.clone()
            }
            (Scope::PerKey, _, Some(dom)) => dom.clone(),
        };
        keys.push(KeyRef {
            quota: Arc::clone(&q.name),
            key,
            windows: q.windows.clone(),
            max_connections: q.cfg.max_connections,
        });
        units.push(q.cfg.unit);
    }
    Route {
        site,
        throttle_of: vec![None; keys.len()],
        filters: SenderFilters::default(),
        keys,
        units,
        domain,
        hosts,
        smarthost: d.smarthost,
    }
}

/// When a message held back by egress is due again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// The first message (index into the connection's messages) not attempted.
    pub index: usize,
    /// Its due time (relay clock, ms).
    pub until_ms: u64,
    /// Added per later message, so they come back spread out.
    pub spacing_ms: u64,
    /// When `spacing_ms` is a throttle's pace: `(end, spacing)`, the throttle's
    /// end (relay clock) and the pace without it. No message is due later than
    /// `end` plus its turn at that pace, so mail postponed during a throttle
    /// comes back when it ends instead of waiting out the throttle's spread.
    pub recover: Option<(u64, u64)>,
}

impl Stop {
    /// When message `index` (at or after [`Stop::index`]) is due.
    pub fn due(&self, index: usize) -> u64 {
        let k = index.saturating_sub(self.index) as u64;
        let spread = self
            .until_ms
            .saturating_add(k.saturating_mul(self.spacing_ms));
        match self.recover {
            Some((end, spacing)) => spread.min(
                end.max(self.until_ms)
                    .saturating_add(k.saturating_mul(spacing)),
            ),
            None => spread,
        }
    }
}

/// What egress did to a connection's messages: which ones it held back, unattempted,
/// and until when. Every other message went its normal way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Postponement {
    pub stop: Option<Stop>,
    /// The destination backed off (relay clock, ms): messages the server's
    /// rate-limit reply left unattempted wait until then.
    pub backoff_until_ms: Option<u64>,
    /// Messages (by index) whose tenant a response rule suspended, and until when
    /// (relay clock): they wait that long whatever `stop` says.
    pub held: Vec<(usize, u64)>,
}

impl Postponement {
    fn all(until_ms: u64, spacing_ms: u64) -> Self {
        Postponement {
            stop: Some(Stop {
                index: 0,
                until_ms,
                spacing_ms,
                recover: None,
            }),
            backoff_until_ms: None,
            held: Vec::new(),
        }
    }

    /// Every message postponed from `until_ms` at `route`'s pace (back-off
    /// `level`), recovering when its throttles end (`states` on clock `now`,
    /// `local` the relay clock then).
    fn paced(
        route: &Route,
        until_ms: u64,
        level: u32,
        states: &[State],
        now: u64,
        local: u64,
    ) -> Self {
        Postponement {
            stop: Some(route.stop(0, until_ms, level, states, now, local)),
            backoff_until_ms: None,
            held: Vec::new(),
        }
    }
}

struct Inner {
    store: Box<dyn PacingStore>,
    quotas: RwLock<Arc<Vec<EgressQuota>>>,
    /// Response rules, matched in-process.
    rules: RwLock<Arc<Rules>>,
    policy: BackoffPolicy,
    timing: Timing,
    metrics: EgressMetrics,
    /// Makes tokens and lease ids unique across processes.
    owner: String,
    next: AtomicU64,
    /// Rule states by site as the store last reported them, ends on the relay
    /// clock: a connection opens with the keys of the throttles in force (the
    /// store says which on every call; this saves asking twice).
    known: Mutex<HashMap<String, Vec<State>>>,
    /// `known` is not empty (read without the lock on every message).
    known_any: AtomicBool,
    /// Mail postponed for rule states, to wake if they go early.
    waiting: waiting::Waiting,
    /// Set by the relay (the queue's `retry_now`); nothing is remembered without.
    waker: std::sync::OnceLock<waiting::Waker>,
}

/// Egress pacing for one relay process. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("store", &self.inner.store.backend())
            .finish_non_exhaustive()
    }
}

fn compile(quotas: &[QuotaConfig]) -> Vec<EgressQuota> {
    quotas
        .iter()
        .filter(|q| q.direction == Direction::Egress)
        .map(|q| EgressQuota {
            name: Arc::from(q.name.as_str()),
            windows: q.limits.iter().map(Window::from_limit).collect(),
            destination_domains: q
                .matcher
                .destination_domains
                .iter()
                .map(|p| Glob::new(p))
                .collect(),
            mx_hosts: q.matcher.mx_hosts.iter().map(|p| Glob::new(p)).collect(),
            cfg: q.clone(),
        })
        .collect()
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Egress {
    fn with_store(store: Box<dyn PacingStore>, quotas: &[QuotaConfig], lease: Duration) -> Self {
        let ttl = ms(lease.min(MAX_LEASE)).max(1_000);
        let owner = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        Egress {
            inner: Arc::new(Inner {
                store,
                quotas: RwLock::new(Arc::new(compile(quotas))),
                rules: RwLock::new(Arc::new(Rules::default())),
                policy: BackoffPolicy::default(),
                timing: Timing {
                    max_wait_ms: ms(INLINE_WAIT),
                    flight_ttl_ms: ttl,
                    lease_ttl_ms: ttl,
                },
                metrics: EgressMetrics::default(),
                owner,
                next: AtomicU64::new(0),
                known: Mutex::new(HashMap::new()),
                known_any: AtomicBool::new(false),
                waiting: waiting::Waiting::default(),
                waker: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Makes mail postponed for a rule state due again when the state goes
    /// early (see [`waiting`]): `waker` makes a domain's waiting mail due. Starts
    /// the watcher; call once, inside the runtime.
    pub fn set_waker(&self, waker: waiting::Waker) {
        if self.inner.waker.set(waker).is_err() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(waiting::WATCH).await;
                let Some(inner) = weak.upgrade() else { return };
                let egress = Egress { inner };
                if egress.inner.waiting.is_empty() {
                    continue;
                }
                match egress.shaping_list().await {
                    Ok(list) => {
                        let live: std::collections::HashSet<(String, String)> =
                            list.into_iter().map(|a| (a.site, a.state.field)).collect();
                        let domains = egress.inner.waiting.gone(&live, now_ms());
                        egress.wake(domains).await;
                    }
                    Err(e) => {
                        debug!(error = %e, "egress: cannot read rule states to wake postponed mail")
                    }
                }
            }
        });
    }

    async fn wake(&self, domains: Vec<String>) {
        if domains.is_empty() {
            return;
        }
        if let Some(w) = self.inner.waker.get() {
            info!(domains = ?domains, "response-rule state gone early: its postponed mail is due again");
            w(domains).await;
        }
    }

    /// Remembers that mail for `route`'s domain was postponed while `states`
    /// (clock `now`; `local`: the relay clock then) held or throttled it: the
    /// site's states and those concerning one of `tenants`.
    fn note_postponed<'t>(
        &self,
        route: &Route,
        states: &[State],
        now: u64,
        local: u64,
        tenants: impl Iterator<Item = &'t Tenant> + Clone,
    ) {
        if self.inner.waker.get().is_none() {
            return;
        }
        let Some(domain) = route.domain.as_deref() else {
            return;
        };
        for s in states {
            if s.holds_until(now).is_none() && !s.throttles(now) {
                continue;
            }
            if s.field == SITE
                || tenants
                    .clone()
                    .any(|t| route.concerns(&s.field, &s.rule, Some(t)))
            {
                let until = local.saturating_add(s.until_ms.saturating_sub(now));
                self.inner
                    .waiting
                    .note(&route.site, &s.field, until, domain);
            }
        }
    }

    /// In-process pacing (a single relay with the embedded queue). `lease` is
    /// `delivery.lease`: connection leases last that long (at most 60 s) unrenewed.
    pub fn embedded(quotas: &[QuotaConfig], lease: Duration) -> Self {
        Self::with_store(Box::new(MemoryStore::new()), quotas, lease)
    }

    /// Pacing shared through Redis by every relay using it.
    pub async fn redis(
        cfg: &RedisConfig,
        quotas: &[QuotaConfig],
        lease: Duration,
    ) -> Result<Self, EgressError> {
        let store = RedisStore::connect(cfg).await?;
        Ok(Self::with_store(Box::new(store), quotas, lease))
    }

    /// The store that fits the relay config: Redis when the queue is in Redis (the
    /// relays share it), else in-process.
    pub async fn from_config(cfg: &crate::config::RelayConfig) -> Result<Self, EgressError> {
        match (cfg.queue.effective_backend(), &cfg.queue.redis) {
            (crate::config::QueueBackendKind::Redis, Some(r)) => {
                Self::redis(r, &cfg.effective_quotas(), cfg.delivery.lease).await
            }
            _ => Ok(Self::embedded(&cfg.effective_quotas(), cfg.delivery.lease)),
        }
    }

    /// Replaces the quotas (config reload). Counters live in the store under the
    /// quota names, so a quota that keeps its name keeps its usage.
    pub fn set_quotas(&self, quotas: &[QuotaConfig]) {
        *self.inner.quotas.write().unwrap() = Arc::new(compile(quotas));
    }

    /// Replaces the response rules (start-up and config reload). States already
    /// in the store stay until they end.
    pub fn set_rules(&self, rules: Rules) {
        *self.inner.rules.write().unwrap() = Arc::new(rules);
    }

    pub fn rules(&self) -> Arc<Rules> {
        Arc::clone(&self.inner.rules.read().unwrap())
    }

    /// Records into `m` (the admin registry's egress families) from now on. Call
    /// right after construction, before the pacer is shared.
    pub fn with_metrics(mut self, m: EgressMetrics) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.metrics = m,
            None => tracing::warn!("egress already shared; its metrics stay unregistered"),
        }
        self
    }

    pub fn metrics(&self) -> &EgressMetrics {
        &self.inner.metrics
    }

    pub fn backend(&self) -> &'static str {
        self.inner.store.backend()
    }

    fn quotas(&self) -> Arc<Vec<EgressQuota>> {
        Arc::clone(&self.inner.quotas.read().unwrap())
    }

    /// Remembers `site`'s states from a store reply (clock `store_now`).
    fn learn(&self, site: &str, states: &[State], store_now: u64) {
        if states.is_empty() && !self.inner.known_any.load(Ordering::Relaxed) {
            return;
        }
        let local = now_ms();
        let mut known = self.inner.known.lock().unwrap();
        if states.is_empty() {
            known.remove(site);
        } else {
            let states = states
                .iter()
                .map(|s| State {
                    until_ms: local + s.until_ms.saturating_sub(store_now),
                    ..s.clone()
                })
                .collect();
            known.insert(site.to_owned(), states);
        }
        self.inner
            .known_any
            .store(!known.is_empty(), Ordering::Relaxed);
    }

    /// Adds a state this relay just started (end on the relay clock).
    fn learn_one(&self, site: &str, state: &State) {
        let mut known = self.inner.known.lock().unwrap();
        let v = known.entry(site.to_owned()).or_default();
        v.retain(|o| o.field != state.field);
        v.push(state.clone());
        self.inner.known_any.store(true, Ordering::Relaxed);
    }

    /// `site`'s states as last known (relay clock).
    fn known(&self, site: &str) -> Vec<State> {
        if !self.inner.known_any.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let now = now_ms();
        let known = self.inner.known.lock().unwrap();
        known
            .get(site)
            .map(|v| v.iter().filter(|s| s.until_ms > now).cloned().collect())
            .unwrap_or_default()
    }

    fn unique(&self, what: &str) -> String {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        format!("{what}{}-{n}", self.inner.owner)
    }

    /// The quotas `d` falls under. Call after MX resolution.
    /// Whether some egress quota names `domain` (lower case) in
    /// `destination_domains`. Mail for such a domain that goes to a relay host
    /// (a route or the smarthost) must travel on connections of its own, so that
    /// the quota knows the domain of every message it paces.
    pub fn names_domain(&self, domain: &str) -> bool {
        let domain = normalize_name(domain);
        self.quotas()
            .iter()
            .any(|q| q.destination_domains.iter().any(|g| g.is_match(&domain)))
    }

    /// Tenant keys of the tenant-scoped rules about `d` (see
    /// [`Rules::tenant_keys_for`]).
    pub fn tenant_keys(&self, d: &Destination<'_>) -> Vec<TenantKey> {
        let rules = self.rules();
        if rules.tenant_keys.is_empty() {
            return Vec::new();
        }
        let domain = d.domain.map(normalize_name);
        let hosts: Vec<String> = d.mx_hosts.iter().map(|h| normalize_name(h)).collect();
        rules.tenant_keys_for(&Dest {
            domain: domain.as_deref(),
            hosts: &hosts,
            smarthost: d.smarthost,
        })
    }

    pub fn route(&self, d: &Destination<'_>) -> Route {
        let mut r = route_for(&self.quotas(), d);
        r.filters = self.rules().filters();
        r
    }

    /// Asks to open a connection along `route` for messages of the given
    /// (recipients, octets): takes its connection leases and the first message's
    /// slot, waiting up to [`INLINE_WAIT`]. `Err` says when the messages are due
    /// again (the connection must not be opened).
    pub async fn open(
        &self,
        route: Route,
        messages: &[(usize, usize)],
        tenants: Vec<Tenant>,
    ) -> Result<EgressConn, Postponement> {
        let inner = &self.inner;
        // The throttles in force pace and cap through keys of their own.
        let route = route.with_throttles(&self.known(&route.site), &tenants, now_ms());
        let mut route = Arc::new(route);
        let costs_of = |route: &Route| -> Vec<Vec<u64>> {
            messages
                .iter()
                .enumerate()
                .map(|(i, &(r, b))| route.costs(r, b, tenants.get(i)))
                .collect()
        };
        let mut costs = costs_of(&route);
        let mut lease = None;
        let mut token = None;
        let mut rerouted = false;
        let no_costs: Vec<u64> = Vec::new();
        let started = Instant::now();
        loop {
            if lease.is_none() && route.keys.iter().any(|k| k.max_connections.is_some()) {
                lease = Some(self.unique("c"));
            }
            if token.is_none() && route.paced() && !messages.is_empty() {
                token = Some(self.unique("m"));
            }
            let sent_from = Instant::now();
            let req = Acquire {
                site: &route.site,
                keys: &route.keys,
                costs: costs.first().unwrap_or(&no_costs),
                token: token.as_deref(),
                commit: None,
                lease: lease.as_deref(),
                timing: inner.timing,
                policy: inner.policy,
                now_ms: None,
            };
            let waited_enough = started.elapsed() + POLL > INLINE_WAIT;
            match inner.store.acquire(&req).await {
                Ok(reply) => {
                    let got = Instant::now();
                    let local = now_ms();
                    let to_local = |t: u64| local + t.saturating_sub(reply.now_ms);
                    self.learn(&route.site, &reply.states, reply.now_ms);
                    // A throttle this relay did not know of: give back what was
                    // taken and ask again with its keys (once).
                    let fresh = route.with_throttles(&reply.states, &tenants, reply.now_ms);
                    if !rerouted && fresh.keys != route.keys {
                        rerouted = true;
                        if matches!(reply.verdict, Verdict::Granted { .. }) {
                            let first_costs = costs.first().cloned().unwrap_or_default();
                            let close = Close {
                                site: &route.site,
                                keys: &route.keys,
                                lease: lease.as_deref(),
                                commit: token.as_deref().map(|t| Commit {
                                    token: t,
                                    costs: &first_costs,
                                    end_ms: reply.now_ms,
                                }),
                                now_ms: None,
                            };
                            if let Err(e) = inner.store.close(&close).await {
                                warn!(site = %route.site, error = %e, "releasing egress leases failed");
                            }
                        }
                        route = Arc::new(fresh);
                        costs = costs_of(&route);
                        token = None;
                        continue;
                    }
                    // Messages of suspended tenants wait for their suspension,
                    // whatever the verdict for the others.
                    let held: Vec<(usize, u64)> = (0..messages.len())
                        .filter_map(|i| {
                            route
                                .suspended_until(&reply.states, tenants.get(i), reply.now_ms)
                                .map(|u| (i, to_local(u)))
                        })
                        .collect();
                    if !held.is_empty() {
                        inner
                            .metrics
                            .postponed(WaitReason::Suspended, held.len() as u64);
                    }
                    let with_held = |mut p: Postponement| {
                        p.held = held.clone();
                        p
                    };
                    if !held.is_empty() || !matches!(reply.verdict, Verdict::Granted { .. }) {
                        self.note_postponed(
                            &route,
                            &reply.states,
                            reply.now_ms,
                            local,
                            tenants.iter(),
                        );
                    }
                    if !held.is_empty() && matches!(reply.verdict, Verdict::Granted { .. }) {
                        // Give back what was taken; the others come back at once
                        // on connections without the suspended tenants' mail.
                        let end = reply.now_ms;
                        let first_costs = costs.first().cloned().unwrap_or_default();
                        let close = Close {
                            site: &route.site,
                            keys: &route.keys,
                            lease: lease.as_deref(),
                            commit: token.as_deref().map(|t| Commit {
                                token: t,
                                costs: &first_costs,
                                end_ms: end,
                            }),
                            now_ms: None,
                        };
                        if let Err(e) = inner.store.close(&close).await {
                            warn!(site = %route.site, error = %e, "releasing egress leases failed");
                        }
                        debug!(site = %route.site, held = held.len(), "tenants suspended; their mail waits");
                        return Err(with_held(Postponement::all(now_ms(), 0)));
                    }
                    match reply.verdict {
                        Verdict::Granted { at_ms } => {
                            let go =
                                got + Duration::from_millis(at_ms.saturating_sub(reply.now_ms));
                            let granted = token.map(|t| Granted {
                                token: t,
                                index: 0,
                                store_now: reply.now_ms,
                                sent_from,
                            });
                            if granted.is_none() && go > Instant::now() {
                                // Unpaced: only the tail of a back-off to wait out.
                                inner.metrics.waited(WaitReason::Backoff);
                                tokio::time::sleep_until(go).await;
                            }
                            let mut conn = EgressConn::new(
                                self.clone(),
                                route,
                                costs,
                                lease,
                                granted.map(|g| (g, go)),
                            );
                            conn.tenants = tenants;
                            conn.states = reply.states;
                            conn.states_now = reply.now_ms;
                            return Ok(conn);
                        }
                        Verdict::BackedOff { until_ms } => {
                            inner
                                .metrics
                                .postponed(WaitReason::Backoff, messages.len() as u64);
                            debug!(site = %route.site, until_ms, "destination backed off; postponing");
                            return Err(with_held(Postponement::paced(
                                &route,
                                to_local(until_ms),
                                reply.level,
                                &reply.states,
                                reply.now_ms,
                                local,
                            )));
                        }
                        Verdict::Later { at_ms } => {
                            inner
                                .metrics
                                .postponed(WaitReason::Slot, messages.len() as u64);
                            return Err(with_held(Postponement::paced(
                                &route,
                                to_local(at_ms),
                                reply.level,
                                &reply.states,
                                reply.now_ms,
                                local,
                            )));
                        }
                        Verdict::Blocked | Verdict::NoConnection => {
                            let why = if reply.verdict == Verdict::Blocked {
                                WaitReason::InFlight
                            } else {
                                WaitReason::Connection
                            };
                            if waited_enough {
                                inner.metrics.postponed(why, messages.len() as u64);
                                return Err(with_held(Postponement::paced(
                                    &route,
                                    retry_later(),
                                    reply.level,
                                    &reply.states,
                                    reply.now_ms,
                                    local,
                                )));
                            }
                            inner.metrics.waited(why);
                            tokio::time::sleep(POLL).await;
                        }
                    }
                }
                Err(e) if route.keys.is_empty() => {
                    // Nothing to exceed: only the back-off check is skipped.
                    debug!(site = %route.site, error = %e, "egress store unavailable; sending without the back-off check");
                    let mut conn = EgressConn::new(self.clone(), route, costs, None, None);
                    conn.tenants = tenants;
                    return Ok(conn);
                }
                Err(e) => {
                    if waited_enough {
                        warn!(site = %route.site, error = %e, "egress store unavailable; paced mail waits");
                        inner
                            .metrics
                            .postponed(WaitReason::Store, messages.len() as u64);
                        return Err(Postponement::all(retry_later(), 0));
                    }
                    inner.metrics.waited(WaitReason::Store);
                    tokio::time::sleep(POLL * 4).await;
                }
            }
        }
    }

    /// Usage of the egress quota `name` (or `None` when there is no such egress
    /// quota), for the admin API: per key and window used / remaining / reset, and
    /// `connections` where capped. `key` selects one key.
    pub async fn usage(
        &self,
        name: &str,
        key: Option<&str>,
    ) -> Result<Option<QuotaUsage>, EgressError> {
        let quotas = self.quotas();
        let Some(q) = quotas.iter().find(|q| &*q.name == name) else {
            return Ok(None);
        };
        let (now, uses) = self
            .inner
            .store
            .usage(
                &q.name,
                &q.windows,
                key,
                self.inner.timing.flight_ttl_ms,
                None,
            )
            .await?;
        // Reset times are on the store's clock; the API speaks the relay's.
        let local = now_ms();
        let uses = uses
            .into_iter()
            .map(|mut u| {
                for w in &mut u.windows {
                    w.1 = local + w.1.saturating_sub(now);
                }
                u
            })
            .collect();
        Ok(Some(usage::quota_usage(&q.cfg, local, uses)))
    }

    /// Usage of every egress quota, in configuration order.
    pub async fn usage_all(&self) -> Result<Vec<QuotaUsage>, EgressError> {
        let mut out = Vec::new();
        for q in self.quotas().iter() {
            if let Some(u) = self.usage(&q.name, None).await? {
                out.push(u);
            }
        }
        Ok(out)
    }

    /// Records a rate-limit reply from `site`; returns the end of its pause on the
    /// relay clock.
    async fn report_rate_limit(&self, site: &str, reply: &str) -> u64 {
        self.inner.metrics.rate_limited();
        match self
            .inner
            .store
            .rate_limited(site, self.inner.policy, None)
            .await
        {
            Ok((until, now)) => {
                info!(%site, %reply, pause_ms = until.saturating_sub(now), "destination rate-limits us; backing off");
                now_ms() + until.saturating_sub(now)
            }
            Err(e) => {
                warn!(%site, error = %e, "egress store unavailable; backing off locally only");
                now_ms() + self.inner.policy.base_ms
            }
        }
    }
}

/// One response-rule state in force, for the CLI and the admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveState {
    pub site: String,
    pub state: State,
    /// The end on the relay's clock (ms since the epoch).
    pub until_ms: u64,
}

impl Egress {
    /// Records a state a rule started; returns its end on the relay clock.
    async fn report_state(&self, site: &str, state: &State, duration_ms: u64) -> u64 {
        let s = state;
        match self
            .inner
            .store
            .shaping_set(site, s, duration_ms, None)
            .await
        {
            Ok((until, now)) => {
                info!(%site, scope = %s.field, rule = %s.rule, action = s.action.as_str(), reply = %s.reply, duration_ms, "response rule: state starts");
                now_ms() + until.saturating_sub(now)
            }
            Err(e) => {
                warn!(%site, scope = %s.field, rule = %s.rule, error = %e, "egress store unavailable; response-rule state kept on this connection only");
                now_ms() + duration_ms
            }
        }
    }

    /// Every response-rule state in force across the relays sharing the store.
    pub async fn shaping_list(&self) -> Result<Vec<ActiveState>, EgressError> {
        let (now, states) = self.inner.store.shaping_list(None).await?;
        let local = now_ms();
        let out: Vec<ActiveState> = states
            .into_iter()
            .map(|(site, state)| ActiveState {
                until_ms: local + state.until_ms.saturating_sub(now),
                site,
                state,
            })
            .collect();
        self.inner.metrics.set_active_states(&out);
        Ok(out)
    }

    /// Ends a state by hand; whether there was one.
    pub async fn shaping_lift(&self, site: &str, field: &str) -> Result<bool, EgressError> {
        let lifted = self.inner.store.shaping_lift(site, field).await?;
        if lifted {
            info!(%site, scope = %field, "response-rule state lifted by hand");
        }
        // Whether or not it was still in force: what this relay postponed for it
        // may go.
        let domains = self.inner.waiting.take(site, field);
        self.wake(domains).await;
        Ok(lifted)
    }
}

fn retry_later() -> u64 {
    let base = ms(RETRY_LATER);
    now_ms() + base + rand::random_range(0..=base)
}

/// A message granted its slot and not yet reported ended.
#[derive(Debug, Clone)]
struct Granted {
    token: String,
    index: usize,
    /// The store's clock at the grant.
    store_now: u64,
    /// Local instant just before the grant was asked for (so never after the
    /// store's `now`): elapsed time from here bounds the end from above.
    sent_from: Instant,
}

impl Granted {
    /// An upper bound of when the message's transaction ended, on the store's clock.
    fn end_ms(&self, ended: Instant) -> u64 {
        self.store_now + ms(ended.saturating_duration_since(self.sent_from)) + 1
    }
}

/// The flight the renewer keeps alive: token and its costs per key.
type Live = Arc<Mutex<Option<(String, Vec<u64>)>>>;

/// One paced connection: holds its leases (renewed in the background), takes each
/// message's slot, watches replies for rate limiting. End it with
/// [`EgressConn::finish`].
pub struct EgressConn {
    egress: Egress,
    route: Arc<Route>,
    costs: Vec<Vec<u64>>,
    lease: Option<String>,
    reserved: Option<(Granted, Instant)>,
    last: Option<Granted>,
    live: Live,
    renewer: Option<tokio::task::JoinHandle<()>>,
    /// A rate-limit reply that speaks for the site (a `4.7.x`, or a `421` once a
    /// transaction started).
    rate_limited: Option<String>,
    /// A `421` without `4.7.x` before any transaction on a host: that host is busy
    /// (RFC 5321 §5.1: try the next MX). Backs the site off only if no host of
    /// the site got as far as a transaction.
    busy: Option<String>,
    /// A message was started on the current host / on any host.
    started_here: bool,
    reached_mail: bool,
    backoff_until: Option<u64>,
    stop: Option<Stop>,
    finished: bool,
    /// Per message: who sent it (tenant-scoped rules).
    tenants: Vec<Tenant>,
    /// The site's rule states as the store last reported them.
    states: Vec<State>,
    /// The message under way (replies at MAIL/RCPT/DATA concern it).
    current: Option<usize>,
    /// States rules started on this connection, not yet reported, with their
    /// durations.
    pending: Vec<(State, u64)>,
    /// States rules started on this connection (relay clock).
    local_states: Vec<State>,
    /// The store's clock when `states` was read.
    states_now: u64,
    /// Messages left unattempted for a suspension, and until when.
    held: Vec<(usize, u64)>,
}

impl EgressConn {
    fn new(
        egress: Egress,
        route: Arc<Route>,
        costs: Vec<Vec<u64>>,
        lease: Option<String>,
        reserved: Option<(Granted, Instant)>,
    ) -> Self {
        let live: Live = Arc::new(Mutex::new(
            reserved
                .as_ref()
                .map(|(g, _)| (g.token.clone(), costs[g.index].clone())),
        ));
        if let Some((_, _)) = &reserved {
            for k in route.keys.iter().filter(|k| k.paced()) {
                egress.inner.metrics.paced(&k.quota);
            }
        }
        if lease.is_some() {
            for k in route.keys.iter().filter(|k| k.max_connections.is_some()) {
                egress.inner.metrics.connection_opened(&k.quota);
            }
        }
        let renewer = (lease.is_some() || route.paced()).then(|| {
            let (egress, route, lease, live) = (
                egress.clone(),
                Arc::clone(&route),
                lease.clone(),
                Arc::clone(&live),
            );
            tokio::spawn(async move {
                let every = Duration::from_millis(egress.inner.timing.lease_ttl_ms / 3);
                loop {
                    tokio::time::sleep(every).await;
                    let flight = live.lock().unwrap().clone();
                    let req = Extend {
                        site: &route.site,
                        keys: &route.keys,
                        lease: lease.as_deref(),
                        flight: flight.as_ref().map(|(t, c)| (t.as_str(), c.as_slice())),
                        timing: egress.inner.timing,
                        now_ms: None,
                    };
                    if let Err(e) = egress.inner.store.extend(&req).await {
                        warn!(site = %route.site, error = %e, "renewing egress leases failed");
                    }
                }
            })
        });
        EgressConn {
            egress,
            route,
            costs,
            lease,
            reserved,
            last: None,
            live,
            renewer,
            local_states: Vec::new(),
            states_now: 0,
            rate_limited: None,
            busy: None,
            started_here: false,
            reached_mail: false,
            backoff_until: None,
            stop: None,
            finished: false,
            tenants: Vec::new(),
            states: Vec::new(),
            current: None,
            pending: Vec::new(),
            held: Vec::new(),
        }
    }

    /// Reports the states rules started (one store call each; rare).
    async fn flush_states(&mut self) {
        for (mut s, duration) in std::mem::take(&mut self.pending) {
            let until = self
                .egress
                .report_state(&self.route.site, &s, duration)
                .await;
            s.until_ms = until;
            if s.field == SITE
                && let Some(hold) = s.holds_until(now_ms())
            {
                self.backoff_until = Some(self.backoff_until.map_or(hold, |b| b.max(hold)));
            }
            self.egress.learn_one(&self.route.site, &s);
            self.local_states.retain(|o| o.field != s.field);
            self.local_states.push(s);
        }
    }

    /// Until when message `index` must wait for a suspension of its tenant (or
    /// the site) that this connection knows of (relay clock).
    fn suspended(&self, index: usize) -> Option<u64> {
        let local = now_ms();
        let tenant = self.tenants.get(index);
        let mine = self
            .local_states
            .iter()
            .filter(|s| self.route.concerns(&s.field, &s.rule, tenant))
            .filter_map(|s| s.holds_until(local))
            .max();
        let shared = self
            .route
            .suspended_until(&self.states, tenant, self.states_now)
            .map(|u| local + u.saturating_sub(self.states_now));
        mine.max(shared)
    }

    /// How a rule reclassifies a reply to message `index`: `Some(true)` bounce,
    /// `Some(false)` retry.
    pub fn classify(
        &self,
        index: usize,
        code: u16,
        enhanced: Option<(u8, u16, u16)>,
        text: &str,
        stage: crate::config::rules::ReplyStage,
    ) -> Option<bool> {
        let rules = self.egress.rules();
        if rules.is_empty() {
            return None;
        }
        rules.classify(
            &self.route.dest(),
            &ReplyFacts {
                code,
                enhanced,
                text,
                stage,
            },
            self.tenants.get(index),
        )
    }

    /// The host failed before any message (greeting, EHLO, TLS): whether the next
    /// MX host may be tried. Not after a rate-limit reply, which speaks for the
    /// whole provider; a plain `421` greeting ("too busy") only for its host.
    pub fn try_next_host(&mut self) -> bool {
        self.started_here = false;
        self.rate_limited.is_none()
    }

    /// Ends the session before message `index`: it and the later ones are due
    /// from `until_ms`, spread at the route's pace for back-off `level` (`None`:
    /// not spread).
    fn refuse(
        &mut self,
        index: usize,
        until_ms: u64,
        level: Option<u32>,
        why: WaitReason,
    ) -> Reply {
        let left = self.costs.len().saturating_sub(index) as u64;
        self.egress.inner.metrics.postponed(why, left);
        self.stop = Some(match level {
            Some(level) => self.route.stop(
                index,
                until_ms,
                level,
                &self.states,
                self.states_now,
                now_ms(),
            ),
            None => Stop {
                index,
                until_ms,
                spacing_ms: 0,
                recover: None,
            },
        });
        Reply::status(
            451,
            (4, 7, 0),
            format!(
                "egress limit ({}): not before {} ms from now",
                why.as_str(),
                until_ms.saturating_sub(now_ms())
            ),
        )
    }

    /// Takes message `index`'s slot, reporting the previous message's end.
    async fn take_slot(&mut self, index: usize) -> Result<(), Reply> {
        let inner = Arc::clone(&self.egress.inner);
        let ended = Instant::now();
        let started = ended;
        let token = self.egress.unique("m");
        let no_costs: Vec<u64> = Vec::new();
        loop {
            let sent_from = Instant::now();
            let commit_end = self.last.as_ref().map(|g| g.end_ms(ended));
            let commit = self.last.as_ref().map(|g| Commit {
                token: &g.token,
                costs: &self.costs[g.index],
                end_ms: commit_end.unwrap_or(0),
            });
            let req = Acquire {
                site: &self.route.site,
                keys: &self.route.keys,
                costs: self.costs.get(index).unwrap_or(&no_costs),
                token: Some(&token),
                commit,
                lease: None,
                timing: inner.timing,
                policy: inner.policy,
                now_ms: None,
            };
            let waited_enough = started.elapsed() + POLL > INLINE_WAIT;
            match inner.store.acquire(&req).await {
                Ok(reply) => {
                    // The report is in; whatever the verdict, it is not sent again.
                    self.last = None;
                    *self.live.lock().unwrap() = None;
                    self.states = reply.states.clone();
                    self.states_now = reply.now_ms;
                    self.egress
                        .learn(&self.route.site, &reply.states, reply.now_ms);
                    self.on_reply_verdict(index, token.clone(), sent_from, &reply)?;
                    match reply.verdict {
                        Verdict::Granted { .. } => return Ok(()),
                        _ => {
                            inner.metrics.waited(WaitReason::InFlight);
                            if waited_enough {
                                let until = retry_later();
                                return Err(self.refuse(
                                    index,
                                    until,
                                    Some(reply.level),
                                    WaitReason::InFlight,
                                ));
                            }
                            tokio::time::sleep(POLL).await;
                        }
                    }
                }
                Err(e) => {
                    // The report may or may not have been applied: it stays, and is
                    // sent again (counting twice errs on the safe side).
                    if waited_enough {
                        warn!(site = %self.route.site, error = %e, "egress store unavailable; paced mail waits");
                        return Err(self.refuse(index, retry_later(), None, WaitReason::Store));
                    }
                    inner.metrics.waited(WaitReason::Store);
                    tokio::time::sleep(POLL * 4).await;
                }
            }
        }
    }

    /// Acts on a verdict for message `index`: waits for a granted slot, refuses
    /// for a far one. `Ok` for a grant (slept) or for "ask again" (blocked).
    fn on_reply_verdict(
        &mut self,
        index: usize,
        token: String,
        sent_from: Instant,
        reply: &AcquireReply,
    ) -> Result<(), Reply> {
        let local = now_ms();
        let to_local = |t: u64| local + t.saturating_sub(reply.now_ms);
        let level = Some(reply.level);
        match reply.verdict {
            Verdict::Granted { at_ms } => {
                let go = Instant::now() + Duration::from_millis(at_ms.saturating_sub(reply.now_ms));
                *self.live.lock().unwrap() = Some((token.clone(), self.costs[index].clone()));
                for k in self.route.keys.iter().filter(|k| k.paced()) {
                    self.egress.inner.metrics.paced(&k.quota);
                }
                let granted = Granted {
                    token,
                    index,
                    store_now: reply.now_ms,
                    sent_from,
                };
                self.reserved = Some((granted, go));
                Ok(())
            }
            Verdict::Later { at_ms } => {
                Err(self.refuse(index, to_local(at_ms), level, WaitReason::Slot))
            }
            Verdict::BackedOff { until_ms } => {
                Err(self.refuse(index, to_local(until_ms), level, WaitReason::Backoff))
            }
            Verdict::Blocked | Verdict::NoConnection => Ok(()),
        }
    }

    /// Ends the connection: reports the last message's end and returns the leases.
    /// Says which messages egress held back, and until when.
    pub async fn finish(mut self) -> Postponement {
        self.finished = true;
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        self.flush_states().await;
        // Every host tried was busy: that too is the site asking for less.
        let busy = self.busy.take().filter(|_| !self.reached_mail);
        if let Some(reply) = self.rate_limited.take().or(busy)
            && self.backoff_until.is_none()
        {
            self.backoff_until = Some(
                self.egress
                    .report_rate_limit(&self.route.site, &reply)
                    .await,
            );
        }
        // A slot granted but never used (the connection failed first) ends now.
        let last = self.last.take().or(self.reserved.take().map(|(g, _)| g));
        let end = last.as_ref().map(|g| g.end_ms(Instant::now()));
        let req = Close {
            site: &self.route.site,
            keys: &self.route.keys,
            lease: self.lease.as_deref(),
            commit: last.as_ref().map(|g| Commit {
                token: &g.token,
                costs: &self.costs[g.index],
                end_ms: end.unwrap_or(0),
            }),
            now_ms: None,
        };
        if (req.lease.is_some() || req.commit.is_some())
            && let Err(e) = self.egress.inner.store.close(&req).await
        {
            // Leases and flights expire by themselves; until then they count.
            warn!(site = %self.route.site, error = %e, "releasing egress leases failed");
        }
        if self.lease.is_some() {
            for k in self
                .route
                .keys
                .iter()
                .filter(|k| k.max_connections.is_some())
            {
                self.egress.inner.metrics.connection_closed(&k.quota);
            }
        }
        if self.stop.is_some() || !self.held.is_empty() {
            let local = now_ms();
            let from = self.stop.map_or(0, |s| s.index);
            let held: Vec<usize> = self.held.iter().map(|(i, _)| *i).collect();
            let tenants = self
                .tenants
                .iter()
                .enumerate()
                .filter(|(i, _)| *i >= from || held.contains(i))
                .map(|(_, t)| t);
            self.egress.note_postponed(
                &self.route,
                &self.states,
                self.states_now,
                local,
                tenants.clone(),
            );
            self.egress
                .note_postponed(&self.route, &self.local_states, local, local, tenants);
        }
        Postponement {
            stop: self.stop,
            backoff_until_ms: self.backoff_until,
            held: std::mem::take(&mut self.held),
        }
    }
}

impl Drop for EgressConn {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        if self.finished {
            return;
        }
        // Dropped without finish (a cancelled task): give the leases back if a
        // runtime is there to do it; otherwise they expire by themselves.
        if self.lease.is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            for k in self
                .route
                .keys
                .iter()
                .filter(|k| k.max_connections.is_some())
            {
                self.egress.inner.metrics.connection_closed(&k.quota);
            }
            let (egress, route, lease) = (
                self.egress.clone(),
                Arc::clone(&self.route),
                self.lease.take(),
            );
            rt.spawn(async move {
                let req = Close {
                    site: &route.site,
                    keys: &route.keys,
                    lease: lease.as_deref(),
                    commit: None,
                    now_ms: None,
                };
                let _ = egress.inner.store.close(&req).await;
            });
        }
    }
}

impl EgressConn {
    /// Message `index` is ready to start: `Ok` once its slot is due, or the reply
    /// with which it and every later message are left unattempted.
    pub async fn before_message(&mut self, index: usize) -> Result<(), Reply> {
        self.current = Some(index);
        self.flush_states().await;
        if let Some(until) = self.suspended(index) {
            // The session ends here (it cannot skip one message): the suspended
            // tenants' messages wait for the suspension, the others come back now.
            let now = now_ms();
            for i in index..self.costs.len() {
                if let Some(u) = self.suspended(i) {
                    self.held.push((i, u));
                }
            }
            self.egress
                .inner
                .metrics
                .postponed(WaitReason::Suspended, self.held.len() as u64);
            self.stop = Some(Stop {
                index,
                until_ms: now,
                spacing_ms: 0,
                recover: None,
            });
            return Err(Reply::status(
                451,
                (4, 7, 0),
                format!(
                    "suspended by a response rule: not before {} ms from now",
                    until.saturating_sub(now)
                ),
            ));
        }
        // A throttle that started after the connection opened, for this message:
        // it and the rest come back at once, on a connection with its keys.
        let tenant = self.tenants.get(index);
        if self
            .route
            .lacks_throttle(&self.local_states, tenant, now_ms())
            || self
                .route
                .lacks_throttle(&self.states, tenant, self.states_now)
        {
            return Err(self.refuse(index, now_ms(), None, WaitReason::Slot));
        }
        if let Some(reply) = self.rate_limited.take() {
            let until = self
                .egress
                .report_rate_limit(&self.route.site, &reply)
                .await;
            self.backoff_until = Some(until);
            return Err(self.refuse(index, until, Some(1), WaitReason::Backoff));
        }
        self.started_here = true;
        self.reached_mail = true;
        if !self.route.paced() {
            return Ok(());
        }
        if self.reserved.is_none() {
            self.take_slot(index).await?;
        }
        // The slot keeps the cost it was granted with (the first one is taken before
        // connecting, for the first message; the session may skip messages refused
        // locally): the report must name the flight exactly as it was taken.
        let (g, go) = self.reserved.take().expect("a slot was granted");
        self.last = Some(g);
        tokio::time::sleep_until(go).await;
        Ok(())
    }

    /// Every reply read from the server: its code, enhanced code and (asked for
    /// only when the reply matters) its text as on the wire.
    pub fn on_reply(
        &mut self,
        code: u16,
        enhanced: Option<(u8, u16, u16)>,
        text: impl FnOnce() -> String,
        stage: crate::config::rules::ReplyStage,
    ) {
        if code < 400 {
            return;
        }
        let rules = self.egress.rules();
        let mut text = Some(text);
        let mut got: Option<String> = None;
        if !rules.is_empty() {
            let t = (text.take().expect("once"))();
            let facts = ReplyFacts {
                code,
                enhanced,
                text: &t,
                stage,
            };
            // Replies before any message (greeting, EHLO) concern no tenant: a
            // tenant-scoped rule has no one to scope to then, and a sender
            // filter takes no such reply.
            let tenant = self.current.and_then(|i| self.tenants.get(i));
            if let Some(rule) = rules.first_match(&self.route.dest(), &facts, tenant) {
                self.egress
                    .inner
                    .metrics
                    .rule_hit(&rule.name, rule.action.as_str());
                if matches!(rule.action, RuleAction::Suspend | RuleAction::Throttle) {
                    match self.route.field(rule, tenant) {
                        Some(field) => self.pending.push((
                            State::started_by(rule, field, t.replace('\n', " ")),
                            rule.duration_ms,
                        )),
                        None => {
                            debug!(site = %self.route.site, rule = %rule.name, "reply matched a tenant-scoped rule, but its tenant is unknown")
                        }
                    }
                }
                // The rule decides: no generic back-off for this reply. A
                // throttle pauses its scope first (the built-in back-off's first
                // step), then paces it.
                return;
            }
            got = Some(t);
        }
        if !is_rate_limit_reply(code, enhanced)
            || self.rate_limited.is_some()
            || self.backoff_until.is_some()
        {
            return;
        }
        let text = match (got, text) {
            (Some(t), _) => t,
            (None, Some(f)) => f(),
            (None, None) => String::new(),
        };
        let says_rate = enhanced.is_some_and(|e| e.0 == 4 && e.1 == 7);
        if says_rate || self.started_here {
            self.rate_limited = Some(text);
        } else {
            self.busy = Some(text);
        }
    }
}

#[cfg(test)]
mod tests;

/// Egress counters answer the admin API's quota usage (`GET /api/v1/quotas`).
impl crate::quota::ingress::engine::EgressUsage for Egress {
    fn set_quotas(&self, quotas: &[QuotaConfig]) {
        Egress::set_quotas(self, quotas);
    }

    fn set_rules(&self, rules: Rules) {
        Egress::set_rules(self, rules);
    }

    fn shaping(
        &self,
    ) -> crate::quota::ingress::store::StoreFuture<'_, mailrelay_admin_api::types::ShapingList>
    {
        Box::pin(async move {
            let now = now_ms();
            match self.shaping_list().await {
                Ok(list) => Ok(mailrelay_admin_api::types::ShapingList {
                    states: list
                        .into_iter()
                        .map(|a| mailrelay_admin_api::types::ShapingState {
                            id: mailrelay_admin_api::types::ShapingState::id_of(
                                &a.state.field,
                                &a.site,
                            ),
                            scope: a.state.field,
                            rule: a.state.rule,
                            action: a.state.action.as_str().to_owned(),
                            // A throttle's factor of 1 (none) is not shown.
                            factor: (a.state.action == RuleAction::Throttle
                                && a.state.factor < 1.0)
                                .then(|| a.state.factor.to_string()),
                            rate: (a.state.action == RuleAction::Throttle)
                                .then_some(a.state.rate)
                                .flatten()
                                .map(crate::shaping::rate_text),
                            max_connections: (a.state.action == RuleAction::Throttle)
                                .then_some(a.state.max_connections)
                                .flatten(),
                            until_ms: a.until_ms,
                            remaining_seconds: a.until_ms.saturating_sub(now).div_ceil(1000),
                            reply: a.state.reply,
                            site: a.site,
                        })
                        .collect(),
                }),
                Err(e) => Err(crate::quota::ingress::store::StoreError::Unavailable(
                    e.to_string(),
                )),
            }
        })
    }

    fn lift<'a>(
        &'a self,
        site: &'a str,
        scope: &'a str,
    ) -> crate::quota::ingress::store::StoreFuture<'a, bool> {
        Box::pin(async move {
            self.shaping_lift(site, scope)
                .await
                .map_err(|e| crate::quota::ingress::store::StoreError::Unavailable(e.to_string()))
        })
    }

    fn usage<'a>(
        &'a self,
        quota: &'a QuotaConfig,
        key: Option<&'a str>,
    ) -> crate::quota::ingress::store::StoreFuture<'a, Vec<usage::KeyUsage>> {
        Box::pin(async move {
            match Egress::usage(self, &quota.name, key).await {
                Ok(u) => Ok(u.map(|u| u.keys).unwrap_or_default()),
                Err(e) => Err(crate::quota::ingress::store::StoreError::Unavailable(
                    e.to_string(),
                )),
            }
        })
    }
}
