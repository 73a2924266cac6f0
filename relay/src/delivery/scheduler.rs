//! The delivery service: takes due mail from the queue under a lease, groups it by
//! destination, sends it (one connection carrying up to
//! `max_messages_per_connection` messages), records every attempt, and reschedules,
//! bounces or finalises each message.
//!
//! A destination is a recipient domain (its MX hosts), or a relay host: a route of
//! the transport map (`delivery.routes`, checked first) or the smarthost.
//!
//! Outcomes are recorded per message as soon as its transaction ends (the reply
//! after the content), while the connection goes on: [`OutcomeWriter`] writes them in
//! batches of one queue round trip. A relay killed mid-delivery so sends again only
//! what was in flight: at most one message per open connection plus the outcome
//! batch (`delivery.outcome_batch.max_messages`). A message with recipients at
//! several destinations is recorded when its last destination is done.
//!
//! Concurrency: one semaphore caps connections overall, one per destination caps
//! them per domain (or relay host).
//!
//! Leases: a relay takes only what it can send soon. A destination holds at most
//! `per_destination_concurrency × max_messages_per_connection` messages here (one
//! round of its connections), the relay at most `max_concurrency ×
//! max_messages_per_connection`; what a lease batch brought beyond that is given back
//! at once, untouched and due now, for other relays with room. Every
//! held lease is renewed together (one round trip) every third of `delivery.lease`,
//! so the lease can be short: a relay that dies loses its mail to the others after
//! one lease time.
//!
//! Egress pacing (`quota::egress`) hooks in twice: after MX resolution and before
//! connecting ([`Egress::open`]: connection caps, back-off, the first slot), and
//! before each message on the connection (the connection is the session's
//! [`MessageGate`](super::smtp_client::MessageGate)). Messages it holds back are
//! postponed: put back in the queue, due when egress says, with no attempt recorded
//! or counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use super::dsn::{self, DsnAction, DsnRecipient};
use super::mx::{MxResolver, Resolution, ResolverError};
use super::outcomes::{OutcomeWriter, Pending};
use super::smtp_client::{
    ClientConfig, ClientTimeouts, ClientTls, ClientTlsError, ConnectionResult, Credentials,
    MessageGate, MessageOutcome, Outcome, Stage, connect_failed, deliver_gated,
};
use crate::admin::Metrics;
use crate::config::{DeliveryConfig, RemoteHost, TlsPolicy};
use crate::queue::{
    Attempt, AttemptResult, FinishResult, Lease, Leased, Leasing, MessageStatus, Queue, QueueError,
    QueueId, QueuedMessage, RcptState, TlsInfo, now_ms,
};
use crate::quota::egress::{Destination, Egress, EgressConn, Postponement};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("delivery DNS resolver: {0}")]
    Resolver(#[from] ResolverError),
    #[error("delivery TLS: {0}")]
    Tls(#[from] ClientTlsError),
}

/// Destination key of relay host `i` (a domain cannot contain `[`), followed by
/// the recipient domain when its mail travels on connections of its own (an
/// egress quota names it: see [`Egress::names_domain`]).
fn relay_key(i: usize, domain: Option<&str>) -> String {
    format!("[relay:{i}]{}", domain.unwrap_or(""))
}

fn relay_index(dest: &str) -> Option<usize> {
    dest.strip_prefix("[relay:")?
        .split_once(']')?
        .0
        .parse()
        .ok()
}

/// The one recipient domain of a relay host destination, if it has one.
fn relay_domain(dest: &str) -> Option<&str> {
    dest.strip_prefix("[relay:")?
        .split_once(']')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
}

/// The transport map: which route (by index in `delivery.routes`) a domain takes.
#[derive(Debug, Default)]
struct RouteTable {
    exact: HashMap<String, usize>,
    /// By parent domain, for `.parent` patterns.
    parent: HashMap<String, usize>,
}

impl RouteTable {
    fn new(routes: &[crate::config::RouteConfig]) -> Self {
        let mut t = RouteTable::default();
        for (i, r) in routes.iter().enumerate() {
            for d in r.normalized_domains() {
                match d.strip_prefix('.') {
                    Some(parent) => t.parent.insert(parent.to_owned(), i),
                    None => t.exact.insert(d, i),
                };
            }
        }
        t
    }

    /// The route for `domain` (lower case, no trailing dot): listed exactly, else the
    /// nearest parent listed as `.parent` (`.example.com` covers `a.b.example.com`,
    /// not `example.com` itself).
    fn route_of(&self, domain: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(domain) {
            return Some(i);
        }
        if self.parent.is_empty() {
            return None;
        }
        domain
            .match_indices('.')
            .find_map(|(at, _)| self.parent.get(&domain[at + 1..]).copied())
    }
}

/// A host mail is handed to directly, without an MX lookup: a route or the smarthost.
struct RelayHost {
    host: String,
    port: u16,
    tls_policy: TlsPolicy,
    tls: ClientTls,
    auth: Option<Credentials>,
}

impl RelayHost {
    /// `tls`: the client for the host's `ca_file`.
    fn new(h: &RemoteHost, tls: ClientTls) -> Self {
        RelayHost {
            host: h.host.clone(),
            port: h.port,
            tls_policy: h.tls,
            tls,
            auth: h.username.as_ref().map(|u| Credentials {
                username: u.clone(),
                password: h.password.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
            }),
        }
    }
}

/// Messages taken per `lease_due` call, at most.
const LEASE_BATCH: usize = 200;

/// A running delivery service; [`Delivery::shutdown`] drains it.
/// Rung when mail is queued, so that idle delivery looks for it now rather than at
/// its next poll. Cheap to clone.
#[derive(Clone)]
pub struct Doorbell(Arc<Notify>);

impl Doorbell {
    pub fn ring(&self) {
        // A permit is kept when delivery is busy: it looks again once idle.
        self.0.notify_one();
    }
}

pub struct Delivery {
    inner: Arc<Inner>,
    main: tokio::task::JoinHandle<()>,
    renewer: tokio::task::JoinHandle<()>,
}

struct Inner {
    queue: Arc<dyn Queue>,
    cfg: DeliveryConfig,
    hostname: String,
    owner: String,
    resolver: MxResolver,
    mx_tls: ClientTls,
    /// Routes in config order, then the smarthost.
    relays: Vec<RelayHost>,
    routes: RouteTable,
    smarthost: Option<usize>,
    metrics: Arc<Metrics>,
    egress: Egress,
    timeouts: ClientTimeouts,
    total: Arc<Semaphore>,
    per_destination: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Every lease we hold, for renewal and for release on drain.
    held: Mutex<HashMap<QueueId, Lease>>,
    /// Parts (one message's recipients at one destination) held per destination,
    /// waiting for a connection or on one: what caps a destination's leases.
    in_hand: Mutex<HashMap<String, usize>>,
    /// Connection tasks spawned and not yet finished.
    running: AtomicUsize,
    stopping: AtomicBool,
    wake: Arc<Notify>,
    /// Sees leased mail before delivery (ingress `defer` quotas hold some back).
    hook: Option<Arc<dyn crate::quota::DispatchHook>>,
    /// Every `finish` goes through here, batched.
    outcomes: OutcomeWriter,
}

/// One leased message and what is left to do for it in this round.
struct Work {
    lease: Lease,
    message: QueuedMessage,
    status: Mutex<MessageStatus>,
    /// Destination groups not yet done; the last one to finish finalises the message.
    parts_left: AtomicUsize,
    /// Which recipients were already final when leased, so a DSN reports only the
    /// ones that failed in this round.
    final_before: Vec<bool>,
    /// Some part was really tried this round (an attempt was recorded).
    attempted: AtomicBool,
    /// Egress held some part back until then (relay clock, ms): the earliest.
    postponed_until: Mutex<Option<u64>>,
}

/// Where one connection is made: the name (for SNI and the attempt record) and address.
type Target = (String, SocketAddr);

/// The recipients of one message bound for one destination.
struct Part {
    work: Arc<Work>,
    rcpts: Vec<String>,
}

/// Outcomes a connection recorded while it was open.
struct Early {
    /// By part: recorded (and finished, if it was the message's last part) as its
    /// transaction ended, so the connection's result must not record it again.
    recorded: Vec<bool>,
    /// Finishes submitted, to await before the connection's task ends.
    pending: Vec<(QueueId, Pending)>,
}

impl Early {
    fn new(parts: usize) -> Self {
        Early {
            recorded: vec![false; parts],
            pending: Vec::new(),
        }
    }
}

/// The gate of a delivery connection: egress pacing, plus recording each message's
/// outcome as soon as its transaction ends.
struct Recorder<'a> {
    inner: &'a Arc<Inner>,
    egress: &'a mut EgressConn,
    /// In the order of the messages given to the connection.
    parts: &'a [Part],
    /// The host of the conversation under way.
    target: Option<Target>,
    early: &'a mut Early,
}

impl MessageGate for Recorder<'_> {
    async fn before_message(&mut self, index: usize) -> Result<(), crate::smtp::Reply> {
        self.egress.before_message(index).await
    }

    fn on_reply(&mut self, reply: &crate::smtp::Reply) {
        self.egress.on_reply(reply);
    }

    async fn on_message_done(
        &mut self,
        index: usize,
        outcome: MessageOutcome,
        tls: Option<TlsInfo>,
    ) {
        let (Some(part), Some(recorded)) =
            (self.parts.get(index), self.early.recorded.get_mut(index))
        else {
            return;
        };
        if *recorded {
            return;
        }
        *recorded = true;
        part.work.attempted.store(true, Ordering::SeqCst);
        self.inner.record(
            part,
            &outcome,
            self.target.as_ref(),
            tls.as_ref(),
            None,
            now_ms(),
        );
        if part.work.parts_left.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Awaited here, not spawned: while the batch window is full the
            // connection waits, which is what bounds the unwritten outcomes.
            let status = self.inner.conclude(&part.work).await;
            let pending = self
                .inner
                .outcomes
                .submit(part.work.lease.clone(), status)
                .await;
            self.early
                .pending
                .push((part.work.lease.id.clone(), pending));
        }
    }
}

impl Delivery {
    /// Builds the resolver and TLS clients (blocking file IO: call at start-up) and
    /// starts taking work, with in-process egress pacing and no quotas.
    pub fn start(
        queue: Arc<dyn Queue>,
        cfg: DeliveryConfig,
        hostname: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DeliveryError> {
        let egress = Egress::embedded(&[], cfg.lease);
        Self::start_with(queue, cfg, hostname, metrics, egress, None)
    }

    /// [`Delivery::start`] with egress pacing (quotas and their shared store) and a
    /// dispatch hook that sees every leased batch first (ingress `defer` quotas).
    pub fn start_with(
        queue: Arc<dyn Queue>,
        cfg: DeliveryConfig,
        hostname: String,
        metrics: Arc<Metrics>,
        egress: Egress,
        hook: Option<Arc<dyn crate::quota::DispatchHook>>,
    ) -> Result<Self, DeliveryError> {
        let resolver = MxResolver::new(&cfg.dns)?.with_local_names([hostname.clone()]);
        let mx_tls = load_tls(cfg.ca_file.as_deref())?;
        // One TLS client per trust store, however many hosts use it.
        let mut by_ca: HashMap<Option<std::path::PathBuf>, ClientTls> = HashMap::new();
        let mut tls_for = |ca: &Option<std::path::PathBuf>| -> Result<ClientTls, DeliveryError> {
            if let Some(t) = by_ca.get(ca) {
                return Ok(t.clone());
            }
            let t = load_tls(ca.as_deref())?;
            by_ca.insert(ca.clone(), t.clone());
            Ok(t)
        };
        let routes = RouteTable::new(&cfg.routes);
        let mut relays = Vec::new();
        for r in &cfg.routes {
            relays.push(RelayHost::new(&r.remote, tls_for(&r.remote.ca_file)?));
        }
        let smarthost = match &cfg.smarthost {
            Some(s) => {
                relays.push(RelayHost::new(s, tls_for(&s.ca_file)?));
                Some(relays.len() - 1)
            }
            None => None,
        };
        let timeouts = ClientTimeouts::default();
        let owner = format!("{hostname}:{}", std::process::id());
        let outcomes = OutcomeWriter::start(
            Arc::clone(&queue) as Arc<dyn Leasing>,
            cfg.outcome_batch.clone(),
            Arc::clone(&metrics),
        );
        let inner = Arc::new(Inner {
            total: Arc::new(Semaphore::new(cfg.max_concurrency)),
            outcomes,
            queue,
            cfg,
            hostname,
            owner,
            resolver,
            mx_tls,
            relays,
            routes,
            smarthost,
            metrics,
            egress,
            timeouts,
            per_destination: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            in_hand: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            hook,
        });
        let main = tokio::spawn(Arc::clone(&inner).run());
        let renewer = tokio::spawn(Arc::clone(&inner).renew_loop());
        info!(owner = %inner.owner, "delivery started");
        Ok(Delivery {
            inner,
            main,
            renewer,
        })
    }

    /// The doorbell to ring when mail is queued in this process.
    pub fn doorbell(&self) -> Doorbell {
        Doorbell(Arc::clone(&self.inner.wake))
    }

    /// Stops taking work, lets deliveries in flight finish until `deadline`, then
    /// gives every message still held back to the queue, due at once.
    pub async fn shutdown(self, deadline: Duration) {
        let inner = self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        inner.wake.notify_waiters();
        let _ = self.main.await;
        let until = tokio::time::Instant::now() + deadline;
        while inner.running.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.renewer.abort();
        // Outcomes still waiting for their batch are written before anything is
        // released: a released message whose delivery was not recorded would be
        // sent again.
        inner.outcomes.flush().await;
        let leases: Vec<Lease> = inner.held.lock().unwrap().drain().map(|(_, l)| l).collect();
        if !leases.is_empty() {
            match inner.queue.release(&leases).await {
                Ok(()) => info!(count = leases.len(), "released unfinished deliveries"),
                Err(e) => warn!(error = %e, "releasing leases failed; they expire on their own"),
            }
        }
        info!("delivery stopped");
    }
}

fn load_tls(ca_file: Option<&std::path::Path>) -> Result<ClientTls, ClientTlsError> {
    match ClientTls::new(ca_file) {
        Ok(t) => Ok(t),
        // Without a configured CA file, a missing system store only matters for
        // `required` TLS, which then fails per delivery (and defers) instead of
        // keeping the relay from starting.
        Err(e) if ca_file.is_none() => {
            warn!(error = %e, "no system CA store; verified TLS will fail");
            ClientTls::with_roots(rustls::RootCertStore::empty())
        }
        Err(e) => Err(e),
    }
}

impl Inner {
    fn lease_ms(&self) -> u64 {
        self.cfg.lease.as_millis() as u64
    }

    /// Parts one destination may hold here: one message per connection slot's
    /// worth of messages, over all the connections it may have at once.
    fn destination_capacity(&self) -> usize {
        self.cfg
            .per_destination_concurrency
            .min(self.cfg.max_concurrency)
            .saturating_mul(self.cfg.max_messages_per_connection)
    }

    /// Messages the relay may hold at once: every connection busy, each with a full
    /// connection's worth.
    fn relay_capacity(&self) -> usize {
        self.cfg
            .max_concurrency
            .saturating_mul(self.cfg.max_messages_per_connection)
    }

    async fn run(self: Arc<Self>) {
        while !self.stopping.load(Ordering::SeqCst) {
            // Counted from the connection tasks started, not from the semaphore:
            // tasks just spawned have not taken their permits yet, and leasing
            // against the semaphore alone would take the whole queue in a burst
            // and starve the other relays.
            let free = self
                .cfg
                .max_concurrency
                .saturating_sub(self.running.load(Ordering::SeqCst));
            if free == 0 {
                self.idle(Duration::from_millis(50)).await;
                continue;
            }
            let room = self
                .relay_capacity()
                .saturating_sub(self.held.lock().unwrap().len());
            // Due mail is not sorted by destination, so a batch could all be for
            // one: never ask for more than one destination can hold, or a relay
            // would hold (for the moment before giving back) far beyond it.
            let max = (free * self.cfg.max_messages_per_connection)
                .min(room)
                .min(self.destination_capacity())
                .min(LEASE_BATCH);
            if max == 0 {
                self.idle(self.cfg.poll_interval).await;
                continue;
            }
            let leased = match self
                .queue
                .lease_due(now_ms(), self.lease_ms(), max, &self.owner)
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "taking due mail failed");
                    self.idle(self.cfg.poll_interval).await;
                    continue;
                }
            };
            if leased.is_empty() {
                self.idle(self.cfg.poll_interval).await;
                continue;
            }
            debug!(count = leased.len(), "leased due mail");
            let leased = match &self.hook {
                Some(hook) => {
                    let admitted = hook.admit(leased).await;
                    self.expire_untried(admitted.expired);
                    admitted.go
                }
                None => leased,
            };
            let taken = leased.len();
            let excess = self.dispatch(leased);
            if !excess.is_empty() {
                let count = excess.len();
                match self.queue.give_back(&excess).await {
                    Ok(()) => debug!(count, "gave back mail for destinations at capacity"),
                    Err(e) => {
                        warn!(error = %e, count, "giving back mail failed; its leases expire on their own")
                    }
                }
                if count == taken {
                    // Everything due is for destinations busy here: wait for one of
                    // our connections to end (which rings) rather than take the
                    // same mail again at once.
                    self.idle(self.cfg.poll_interval).await;
                }
            }
        }
    }

    async fn idle(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.wake.notified() => {
                // Mail was just queued: let the rest of a burst arrive, so that it
                // is taken (and sent) in batches, not a message per lease.
                if !self.stopping.load(Ordering::SeqCst) {
                    tokio::time::sleep(self.cfg.wake_delay).await;
                }
            }
        }
    }

    /// The heartbeat: every held lease renewed at once, a third of the lease time
    /// apart, so two heartbeats can fail before a lease runs out.
    async fn renew_loop(self: Arc<Self>) {
        let every = self.cfg.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let leases: Vec<Lease> = self.held.lock().unwrap().values().cloned().collect();
            if leases.is_empty() {
                continue;
            }
            match self.queue.renew_all(&leases, self.lease_ms()).await {
                Ok(lost) => {
                    let mut held = self.held.lock().unwrap();
                    for id in lost {
                        // Finished meanwhile is not lost: only warn for what we hold.
                        if held.remove(&id).is_some() {
                            warn!(queue_id = %id, "lease lost while delivering");
                        }
                    }
                }
                Err(e) => warn!(count = leases.len(), error = %e, "renewing leases failed"),
            }
        }
    }

    /// Finalises messages held back (by an ingress `defer` quota) until their queue
    /// lifetime ran out: no attempt, so `finalize` expires and bounces them.
    fn expire_untried(self: &Arc<Self>, leased: Vec<Leased>) {
        for l in leased {
            self.held
                .lock()
                .unwrap()
                .insert(l.lease.id.clone(), l.lease.clone());
            let work = Work {
                final_before: l.status.rcpts.iter().map(|r| r.state.is_final()).collect(),
                attempted: AtomicBool::new(false),
                postponed_until: Mutex::new(Some(now_ms())),
                parts_left: AtomicUsize::new(0),
                lease: l.lease,
                message: l.message,
                status: Mutex::new(l.status),
            };
            let me = Arc::clone(self);
            self.running.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                me.finalize(&work).await;
                me.running.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    /// Splits leased messages into per-destination groups and starts one task per
    /// connection's worth of messages. Returns what would take a destination beyond
    /// its capacity here, to give back (with the time it is due again).
    fn dispatch(self: &Arc<Self>, leased: Vec<Leased>) -> Vec<(Lease, u64)> {
        let mut groups: HashMap<String, Vec<Part>> = HashMap::new();
        let mut excess = Vec::new();
        let capacity = self.destination_capacity();
        let now = now_ms();
        for l in leased {
            let mut by_dest: HashMap<String, Vec<String>> = HashMap::new();
            for r in l
                .status
                .rcpts
                .iter()
                .filter(|r| r.state == RcptState::Pending)
            {
                by_dest
                    .entry(self.destination_of(&r.address))
                    .or_default()
                    .push(r.address.clone());
            }
            {
                // A message goes back whole if any of its destinations is full: the
                // relay that takes it can send all of it.
                let mut in_hand = self.in_hand.lock().unwrap();
                // Counts this batch too: accepted parts are added as they come.
                if by_dest
                    .keys()
                    .any(|d| in_hand.get(d).copied().unwrap_or(0) >= capacity)
                {
                    // Due now, behind the mail already due: kept in its place, a
                    // backlog for a busy destination would be at the head of every
                    // batch and hide other destinations' mail behind it.
                    excess.push((l.lease, now));
                    continue;
                }
                for d in by_dest.keys() {
                    *in_hand.entry(d.clone()).or_default() += 1;
                }
            }
            self.held
                .lock()
                .unwrap()
                .insert(l.lease.id.clone(), l.lease.clone());
            let final_before = l.status.rcpts.iter().map(|r| r.state.is_final()).collect();
            let work = Arc::new(Work {
                final_before,
                attempted: AtomicBool::new(false),
                postponed_until: Mutex::new(None),
                parts_left: AtomicUsize::new(by_dest.len()),
                lease: l.lease,
                message: l.message,
                status: Mutex::new(l.status),
            });
            if by_dest.is_empty() {
                // Nothing pending (should not be queued): finalise as it stands.
                let me = Arc::clone(self);
                self.running.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    me.finalize(&work).await;
                    me.running.fetch_sub(1, Ordering::SeqCst);
                });
                continue;
            }
            for (dest, rcpts) in by_dest {
                groups.entry(dest).or_default().push(Part {
                    work: Arc::clone(&work),
                    rcpts,
                });
            }
        }
        for (dest, mut parts) in groups {
            while !parts.is_empty() {
                let rest = parts.split_off(parts.len().min(self.cfg.max_messages_per_connection));
                let chunk = std::mem::replace(&mut parts, rest);
                let me = Arc::clone(self);
                let dest = dest.clone();
                self.running.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let parts = chunk.len();
                    me.deliver_chunk(&dest, chunk).await;
                    me.running.fetch_sub(1, Ordering::SeqCst);
                    {
                        let mut in_hand = me.in_hand.lock().unwrap();
                        if let Some(n) = in_hand.get_mut(&dest) {
                            *n = n.saturating_sub(parts);
                            if *n == 0 {
                                in_hand.remove(&dest);
                            }
                        }
                    }
                    // Room for more: look for due mail now rather than at the poll.
                    me.wake.notify_one();
                });
            }
        }
        excess
    }

    fn destination_of(&self, address: &str) -> String {
        let domain = address
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let Some(i) = self.routes.route_of(&domain).or(self.smarthost) {
            let own = self.egress.names_domain(&domain);
            return relay_key(i, own.then_some(domain.as_str()));
        }
        domain
    }

    fn destination_semaphore(&self, dest: &str) -> Arc<Semaphore> {
        let mut map = self.per_destination.lock().unwrap();
        // Drop idle entries so a relay that saw a million domains does not keep a
        // million semaphores.
        if map.len() > 1000 {
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        Arc::clone(
            map.entry(dest.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.cfg.per_destination_concurrency))),
        )
    }

    async fn deliver_chunk(self: &Arc<Self>, dest: &str, parts: Vec<Part>) {
        let per_dest = self.destination_semaphore(dest);
        let Ok(_d) = per_dest.acquire_owned().await else {
            return;
        };
        let Ok(_t) = Arc::clone(&self.total).acquire_owned().await else {
            return;
        };
        if self.stopping.load(Ordering::SeqCst) {
            // Draining: these messages are released untouched.
            return;
        }
        // The SMTP client sends exactly the recipients it is given: only this
        // destination's pending ones.
        let messages: Vec<QueuedMessage> = parts
            .iter()
            .map(|p| {
                let mut m = p.work.message.clone();
                m.envelope
                    .recipients
                    .retain(|r| p.rcpts.contains(&r.address));
                m
            })
            .collect();
        let refs: Vec<&QueuedMessage> = messages.iter().collect();
        let mut early = Early::new(parts.len());
        let (result, target, reason, held) = self.send(dest, &refs, &parts, &mut early).await;
        let at_ms = now_ms();
        for (i, (part, outcome)) in parts.iter().zip(&result.messages).enumerate() {
            if early.recorded[i] {
                continue;
            }
            // Held back by egress: no attempt; due again when egress said.
            if let Some(due) = held.due(i, outcome) {
                debug!(queue_id = %part.work.lease.id, %dest, due_in_ms = due.saturating_sub(at_ms), "postponed by egress limits");
                let mut p = part.work.postponed_until.lock().unwrap();
                *p = Some(p.map_or(due, |t| t.min(due)));
                continue;
            }
            part.work.attempted.store(true, Ordering::SeqCst);
            self.record(
                part,
                outcome,
                target.as_ref(),
                result.tls.as_ref(),
                reason,
                at_ms,
            );
        }
        // Finished all at once rather than one after another: they share outcome
        // batches, where awaiting each in turn would pay a batch window per message
        // and keep this connection's slot, and so new leases, waiting meanwhile.
        let mut finishing = tokio::task::JoinSet::new();
        for (i, part) in parts.into_iter().enumerate() {
            if !early.recorded[i] && part.work.parts_left.fetch_sub(1, Ordering::SeqCst) == 1 {
                let me = Arc::clone(self);
                finishing.spawn(async move { me.finalize(&part.work).await });
            }
        }
        // This task counts as running until its outcomes are written, so a drain
        // does not release messages whose outcome is on its way.
        for (id, pending) in early.pending {
            self.finished(&id, pending.await);
        }
        while finishing.join_next().await.is_some() {}
    }

    /// Resolves and connects in order; returns the outcomes, where they came from,
    /// the metrics reason when no server was reached (DNS verdict, connect), and
    /// which messages egress held back.
    async fn send(
        self: &Arc<Self>,
        dest: &str,
        msgs: &[&QueuedMessage],
        parts: &[Part],
        early: &mut Early,
    ) -> (
        ConnectionResult,
        Option<Target>,
        Option<&'static str>,
        Postponement,
    ) {
        let (targets, mut client) = match self.targets(dest).await {
            Ok(t) => t,
            Err((reply, reason)) => {
                return (
                    synthetic(msgs, &reply),
                    None,
                    Some(reason),
                    Postponement::default(),
                );
            }
        };
        // Egress: the quotas of this destination can only be known after MX
        // resolution (mx_hosts patterns, the mx_site key). A relay host is known
        // by its name, and by the recipient domain when its connection carries
        // only that one.
        let mut hosts: Vec<String> = targets.iter().map(|(n, _)| n.clone()).collect();
        hosts.dedup();
        let relay = relay_index(dest);
        let route = self.egress.route(&Destination {
            domain: if relay.is_some() {
                relay_domain(dest)
            } else {
                Some(dest)
            },
            mx_hosts: &hosts,
            smarthost: relay.is_some() && relay == self.smarthost,
            relay_host: relay.is_some(),
        });
        let sizes: Vec<(usize, usize)> = msgs
            .iter()
            .map(|m| (m.envelope.recipients.len(), m.body.len()))
            .collect();
        let mut egress = match self.egress.open(route, &sizes).await {
            Ok(g) => g,
            Err(held) => {
                let res = ConnectionResult {
                    messages: connect_failed(msgs, "held back by egress limits"),
                    tls: None,
                    capabilities: None,
                    error: None,
                };
                return (res, None, None, held);
            }
        };
        client.pace_messages = true;
        let mut gate = Recorder {
            inner: self,
            egress: &mut egress,
            parts,
            target: None,
            early,
        };
        let (result, target, reason) = self
            .connect_and_deliver(dest, msgs, targets, &client, &mut gate)
            .await;
        (result, target, reason, egress.finish().await)
    }

    async fn connect_and_deliver(
        &self,
        dest: &str,
        msgs: &[&QueuedMessage],
        targets: Vec<Target>,
        client: &ClientConfig,
        gate: &mut Recorder<'_>,
    ) -> (ConnectionResult, Option<Target>, Option<&'static str>) {
        let tls = match relay_index(dest).and_then(|i| self.relays.get(i)) {
            Some(r) => &r.tls,
            None => &self.mx_tls,
        };
        let mut last_error = String::from("no address to connect to");
        // The last host that answered but could not take mail (4xx greeting, TLS
        // trouble): its reply says more than a later host's refused connection.
        let mut unusable: Option<(ConnectionResult, Target)> = None;
        for (name, addr) in targets {
            let stream = match self.connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    last_error = format!("{name}[{}]: {e}", addr.ip());
                    debug!(%dest, error = %last_error, "connect failed, trying next host");
                    continue;
                }
            };
            gate.target = Some((name.clone(), addr));
            let mut result = self.converse(stream, tls, &name, msgs, client, gate).await;
            if client.tls == TlsPolicy::Opportunistic && tls_failed(&result) {
                // Like Postfix at security level `may`: a server whose TLS cannot
                // be agreed on gets the mail in plain text, over a new connection.
                // WARN: the mail loses its transport encryption; operators should see
                // it (and the metric) without turning on debug logs.
                warn!(%dest, host = %name, ip = %addr.ip(), reason = result.error.as_deref().unwrap_or("unknown"), "opportunistic STARTTLS failed; falling back to plain text");
                self.metrics.tls_fallback();
                let mut plain = client.clone();
                plain.tls = TlsPolicy::Disabled;
                if let Ok(stream) = self.connect(addr).await {
                    result = self.converse(stream, tls, &name, msgs, &plain, gate).await;
                }
            }
            // A rate-limit reply speaks for the provider, not this one host.
            if worth_next_host(&result) && gate.egress.try_next_host() {
                debug!(%dest, host = %name, ip = %addr.ip(), error = ?result.error, "host unusable before MAIL, trying next");
                unusable = Some((result, (name, addr)));
                continue;
            }
            return (result, Some((name, addr)), None);
        }
        if let Some((result, target)) = unusable {
            return (result, Some(target), None);
        }
        let res = ConnectionResult {
            messages: connect_failed(msgs, &last_error),
            tls: None,
            capabilities: None,
            error: Some(last_error),
        };
        (res, None, Some("connect"))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, String> {
        match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }

    /// One SMTP conversation, counted in the open-connections gauge while it lasts.
    async fn converse(
        &self,
        stream: TcpStream,
        tls: &ClientTls,
        name: &str,
        msgs: &[&QueuedMessage],
        client: &ClientConfig,
        gate: &mut Recorder<'_>,
    ) -> ConnectionResult {
        let _open = OpenConnection::new(&self.metrics);
        deliver_gated(stream, tls, name, msgs, client, &self.timeouts, gate).await
    }

    /// The hosts to try for `dest`, or the final or temporary reply that ends it
    /// (with its metrics reason).
    async fn targets(
        &self,
        dest: &str,
    ) -> Result<(Vec<Target>, ClientConfig), (crate::smtp::Reply, &'static str)> {
        use crate::smtp::Reply;
        let mut client = ClientConfig::new(self.hostname.clone());
        if let Some(r) = relay_index(dest).and_then(|i| self.relays.get(i)) {
            client.tls = r.tls_policy;
            client.auth = r.auth.clone();
            // The system resolver, not the MX resolver: a relay host is often a
            // short cluster-internal name that needs resolv.conf's search list.
            let addrs = tokio::net::lookup_host((r.host.as_str(), r.port))
                .await
                .map_err(|e| {
                    let reply =
                        Reply::status(451, (4, 4, 3), format!("relay host {}: {e}", r.host));
                    (reply, "dns_tempfail")
                })?;
            return Ok((addrs.map(|a| (r.host.clone(), a)).collect(), client));
        }
        client.tls = self.cfg.tls;
        match self.resolver.resolve(dest).await {
            Resolution::Hosts(hosts) => Ok((
                hosts
                    .into_iter()
                    .flat_map(|h| h.addrs.into_iter().map(move |a| (h.name.clone(), a)))
                    .collect(),
                client,
            )),
            Resolution::NullMx => Err((
                Reply::status(
                    556,
                    (5, 1, 10),
                    format!("domain {dest} does not accept mail (null MX, RFC 7505)"),
                ),
                "null_mx",
            )),
            Resolution::NoSuchDomain => Err((
                Reply::status(
                    550,
                    (5, 1, 2),
                    format!("domain {dest} does not exist or has no mail server"),
                ),
                "nxdomain",
            )),
            Resolution::LoopsToSelf => Err((
                Reply::status(
                    554,
                    (5, 4, 6),
                    format!("mail for {dest} loops back to myself"),
                ),
                "loop",
            )),
            Resolution::TempFail(why) => Err((Reply::status(451, (4, 4, 3), why), "dns_tempfail")),
        }
    }

    /// Writes the outcome of one message's part into its status and logs it.
    fn record(
        &self,
        part: &Part,
        outcome: &MessageOutcome,
        target: Option<&Target>,
        tls: Option<&TlsInfo>,
        reason: Option<&'static str>,
        at_ms: u64,
    ) {
        let mut status = part.work.status.lock().unwrap();
        let queue_id = status.id.clone();
        for r in &outcome.recipients {
            let Some(rs) = status
                .rcpts
                .iter_mut()
                .find(|s| s.state == RcptState::Pending && s.address == r.address)
            else {
                continue;
            };
            let (result, state, word) = match r.result {
                Outcome::Delivered => (AttemptResult::Delivered, RcptState::Delivered, "delivered"),
                Outcome::Deferred => (AttemptResult::Deferred, RcptState::Pending, "deferred"),
                Outcome::Bounced => (AttemptResult::Bounced, RcptState::Bounced, "bounced"),
            };
            self.metrics
                .delivery_result(word, reason.unwrap_or_else(|| reason_of(r)));
            if r.result == Outcome::Delivered {
                let received = part.work.message.envelope.received_at_ms;
                self.metrics
                    .delivery_latency(Duration::from_millis(at_ms.saturating_sub(received)));
            }
            let reply = r.reply.to_string().trim_end().to_owned();
            let relay =
                target.map_or_else(|| "none".to_owned(), |(n, a)| format!("{n}[{}]", a.ip()));
            info!(
                queue_id = %queue_id, to = %r.address, relay = %relay, stage = r.stage.as_str(),
                reply = %reply, "{word}"
            );
            rs.state = state;
            rs.record(Attempt {
                at_ms,
                result,
                mx: target.map(|(n, _)| n.clone()),
                ip: target.map(|(_, a)| a.ip().to_string()),
                tls: tls.cloned(),
                reply,
            });
        }
    }

    /// After every part of a message is done: reschedule, expire, bounce and finish.
    async fn finalize(&self, work: &Work) {
        let status = self.conclude(work).await;
        let pending = self.outcomes.submit(work.lease.clone(), status).await;
        self.finished(&work.lease.id, pending.await);
    }

    /// What a finished round leaves a message with: its next attempt, or expired;
    /// the DSN it owes is queued here.
    async fn conclude(&self, work: &Work) -> MessageStatus {
        let now = now_ms();
        let mut status = work.status.lock().unwrap().clone();
        // A round that egress held back entirely is no attempt.
        let postponed = *work.postponed_until.lock().unwrap();
        let attempted = work.attempted.load(Ordering::SeqCst) || postponed.is_none();
        if attempted {
            status.attempts = status.attempts.saturating_add(1);
        }
        let pending = status.rcpts.iter().any(|r| r.state == RcptState::Pending);
        status.next_attempt_ms = None;
        if pending {
            let next = match postponed {
                // Held back only: due when egress said, until the lifetime ends.
                Some(due) if !attempted => {
                    let lifetime = self.cfg.retry.max_lifetime.as_millis() as u64;
                    (now < status.created_ms.saturating_add(lifetime)).then_some(due.max(now))
                }
                _ => self
                    .cfg
                    .retry
                    .next_attempt(status.attempts, status.created_ms, now, &mut rand::rng())
                    .map(|t| postponed.map_or(t, |p| t.min(p.max(now)))),
            };
            match next {
                Some(t) => status.next_attempt_ms = Some(t),
                None => {
                    for r in status
                        .rcpts
                        .iter_mut()
                        .filter(|r| r.state == RcptState::Pending)
                    {
                        info!(queue_id = %status.id, to = %r.address, "expired: maximum queue lifetime reached");
                        r.state = RcptState::Expired;
                        self.metrics.delivery_result("bounced", "expired");
                    }
                }
            }
        }
        let mut report_on = newly_failed(&status, &work.final_before);
        // One delay warning per message, once it has waited long enough (Postfix's
        // delay_warning_time); it rides along with any failure report of this round.
        let warn_delay = status.next_attempt_ms.is_some()
            && !status.delay_warned
            && self.cfg.retry.delay_warning_due(status.created_ms, now);
        if warn_delay {
            let until = status
                .created_ms
                .saturating_add(self.cfg.retry.max_lifetime.as_millis() as u64);
            report_on.extend(still_delayed(&status, until));
        }
        // `build_dsn` returns nothing for a null sender, NOTIFY=NEVER, or a delay
        // nobody asked to hear about; the warning then counts as given.
        let report = dsn::build_dsn(
            &work.message,
            &report_on,
            &self.hostname,
            time::OffsetDateTime::now_utc(),
        );
        if warn_delay {
            status.delay_warned = true;
        }
        if let Some(dsn) = report {
            let sender = &work.message.envelope.mail.from;
            match self.queue.enqueue(&dsn).await {
                Ok(()) => {
                    let kind = if report_on.iter().all(|r| r.action == DsnAction::Delayed) {
                        "delay warning"
                    } else {
                        "bounce report"
                    };
                    info!(queue_id = %status.id, dsn_id = %dsn.envelope.id, to = %sender, "{kind} queued")
                }
                Err(e) => {
                    // Without the report the sender would never learn. The failed
                    // recipients go back to pending (their attempts stay recorded):
                    // the next round fails them again and retries the report.
                    warn!(queue_id = %status.id, error = %e, "queueing the bounce failed; will retry");
                    status.delay_warned = false;
                    for (i, r) in status.rcpts.iter_mut().enumerate() {
                        if matches!(r.state, RcptState::Bounced | RcptState::Expired)
                            && !work.final_before.get(i).copied().unwrap_or(false)
                        {
                            r.state = RcptState::Pending;
                        }
                    }
                    let retry_in = self.cfg.retry.first.as_millis() as u64;
                    status.next_attempt_ms = Some(
                        status
                            .next_attempt_ms
                            .unwrap_or(now.saturating_add(retry_in)),
                    );
                    status.final_at_ms = None;
                }
            }
        }
        status
    }

    /// The written outcome of a message: it is no longer ours to renew or release.
    fn finished(
        &self,
        id: &QueueId,
        written: Result<Result<FinishResult, QueueError>, impl std::fmt::Debug>,
    ) {
        match written {
            Ok(Ok(FinishResult::LeaseLost)) => warn!(queue_id = %id, "lease lost before finish"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(queue_id = %id, error = %e, "finishing delivery failed"),
            Err(e) => warn!(queue_id = %id, error = ?e, "finishing delivery failed: writer gone"),
        }
        self.held.lock().unwrap().remove(id);
    }
}

/// Recipients that became bounced or expired in this round, for the DSN.
fn newly_failed(status: &MessageStatus, final_before: &[bool]) -> Vec<DsnRecipient> {
    status
        .rcpts
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            matches!(r.state, RcptState::Bounced | RcptState::Expired)
                && !final_before.get(*i).copied().unwrap_or(false)
        })
        .map(|(_, r)| r)
        .map(|r| {
            let last = r.attempts.last();
            let reply = last.map_or("", |a| a.reply.as_str());
            let status = if r.state == RcptState::Expired {
                (4, 4, 7)
            } else {
                enhanced_of(reply).unwrap_or((5, 0, 0))
            };
            DsnRecipient {
                address: r.address.clone(),
                orcpt: None,
                action: DsnAction::Failed,
                status,
                remote_mta: last.and_then(|a| a.mx.clone()),
                diagnostic: (!reply.is_empty()).then(|| format!("smtp; {reply}")),
                last_attempt_ms: last.map(|a| a.at_ms),
                will_retry_until_ms: None,
            }
        })
        .collect()
}

/// Pending recipients, for a delay warning: status and diagnostic of their last try.
fn still_delayed(status: &MessageStatus, until_ms: u64) -> Vec<DsnRecipient> {
    status
        .rcpts
        .iter()
        .filter(|r| r.state == RcptState::Pending)
        .map(|r| {
            let last = r.attempts.last();
            let reply = last.map_or("", |a| a.reply.as_str());
            DsnRecipient {
                address: r.address.clone(),
                orcpt: None,
                action: DsnAction::Delayed,
                status: enhanced_of(reply).filter(|s| s.0 == 4).unwrap_or((4, 0, 0)),
                remote_mta: last.and_then(|a| a.mx.clone()),
                diagnostic: (!reply.is_empty()).then(|| format!("smtp; {reply}")),
                last_attempt_ms: last.map(|a| a.at_ms),
                will_retry_until_ms: Some(until_ms),
            }
        })
        .collect()
}

/// The metrics reason of a recipient's outcome from a server conversation.
fn reason_of(r: &crate::smtp::client::RecipientOutcome) -> &'static str {
    match (r.result, r.stage, r.remote) {
        (Outcome::Delivered, _, _) => "ok",
        (_, Stage::StartTls, _) => "tls",
        (_, Stage::Auth, _) => "auth",
        (Outcome::Deferred, _, true) => "remote_4xx",
        (Outcome::Bounced, _, true) => "remote_5xx",
        // Our own verdicts: a connection that failed or broke, or a local check.
        (Outcome::Deferred, _, false) => "connect",
        (Outcome::Bounced, _, false) => match r.reply.enhanced.map(|e| (e.0, e.1, e.2)) {
            Some((5, 3, 4)) => "too_big",
            Some((5, 6, 7)) => "smtputf8",
            _ => "other",
        },
    }
}

/// Keeps the open-outbound-connections gauge right however the delivery ends.
struct OpenConnection<'a>(&'a Metrics);

impl<'a> OpenConnection<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.outbound_connection_opened();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.outbound_connection_closed();
    }
}

/// `5.1.1` out of `550 5.1.1 text`.
fn enhanced_of(reply: &str) -> Option<(u8, u16, u16)> {
    let mut it = reply.split_whitespace().nth(1)?.split('.');
    let class = it.next()?.parse().ok()?;
    let subject = it.next()?.parse().ok()?;
    let detail = it.next()?.parse().ok()?;
    (it.next().is_none() && matches!(class, 2 | 4 | 5)).then_some((class, subject, detail))
}

/// Outcomes for a destination that got no connection: every recipient gets `reply`.
fn synthetic(msgs: &[&QueuedMessage], reply: &crate::smtp::Reply) -> ConnectionResult {
    let mut messages = connect_failed(msgs, "");
    let result = Outcome::of_code(reply.code);
    for m in &mut messages {
        for r in &mut m.recipients {
            r.reply = reply.clone();
            r.result = result;
        }
    }
    ConnectionResult {
        messages,
        tls: None,
        capabilities: None,
        error: None,
    }
}

/// The TLS handshake failed (not a refusal of STARTTLS, which goes on in plain
/// text by itself): every recipient deferred at STARTTLS by our own verdict.
fn tls_failed(r: &ConnectionResult) -> bool {
    r.messages.iter().all(|m| {
        !m.attempted
            && m.recipients
                .iter()
                .all(|o| o.result == Outcome::Deferred && o.stage == Stage::StartTls && !o.remote)
    }) && r.messages.iter().any(|m| !m.recipients.is_empty())
}

/// A host that failed before any message was tried (4xx greeting, EHLO trouble,
/// failed TLS) says nothing about the next host: RFC 5321 §5.1 says try it.
fn worth_next_host(r: &ConnectionResult) -> bool {
    r.messages.iter().all(|m| {
        !m.attempted
            && m.recipients.iter().all(|o| {
                o.result == Outcome::Deferred
                    && matches!(o.stage, Stage::Greeting | Stage::Ehlo | Stage::StartTls)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::RcptStatus;

    fn rcpt(address: &str, state: RcptState, reply: &str) -> RcptStatus {
        RcptStatus {
            address: address.into(),
            state,
            attempts: vec![Attempt {
                at_ms: 1,
                result: AttemptResult::Bounced,
                mx: Some("mx.b.test".into()),
                ip: None,
                tls: None,
                reply: reply.into(),
            }],
        }
    }

    #[test]
    fn only_recipients_failed_in_this_round_are_reported() {
        let status = MessageStatus {
            id: QueueId::generate(),
            rcpts: vec![
                rcpt("old@b.test", RcptState::Bounced, "550 5.1.1 gone"),
                rcpt("new@b.test", RcptState::Bounced, "550 5.7.1 denied"),
                rcpt("late@b.test", RcptState::Expired, "451 4.4.1 down"),
                rcpt("ok@b.test", RcptState::Delivered, "250 ok"),
                rcpt("wait@b.test", RcptState::Pending, "451 later"),
            ],
            created_ms: 0,
            next_attempt_ms: None,
            attempts: 1,
            final_at_ms: None,
            leased_until_ms: None,
            delay_warned: false,
        };
        let failed = newly_failed(&status, &[true, false, false, false, false]);
        let got: Vec<(&str, (u8, u16, u16))> = failed
            .iter()
            .map(|f| (f.address.as_str(), f.status))
            .collect();
        assert_eq!(got, [("new@b.test", (5, 7, 1)), ("late@b.test", (4, 4, 7))]);
        assert_eq!(failed[0].remote_mta.as_deref(), Some("mx.b.test"));
    }

    #[test]
    fn routes_match_exact_domains_then_the_nearest_parent() {
        let cfg = crate::config::RelayConfig::from_yaml(
            "delivery: {routes: [\
             {domains: [example.com, .example.com], host: a}, \
             {domains: [.deep.example.com], host: b}, \
             {domains: [Other.TEST.], host: c}]}",
        )
        .unwrap();
        let t = RouteTable::new(&cfg.delivery.routes);
        for (domain, want) in [
            ("example.com", Some(0)),
            ("x.example.com", Some(0)),
            ("x.deep.example.com", Some(1)),
            ("deep.example.com", Some(0)),
            ("a.b.deep.example.com", Some(1)),
            ("other.test", Some(2)),
            ("x.other.test", None),
            ("notexample.com", None),
            ("com", None),
        ] {
            assert_eq!(t.route_of(domain), want, "{domain}");
        }
        assert_eq!(relay_index(&relay_key(7, None)), Some(7));
        assert_eq!(relay_index(&relay_key(7, Some("a.test"))), Some(7));
        assert_eq!(relay_domain(&relay_key(7, Some("a.test"))), Some("a.test"));
        assert_eq!(relay_domain(&relay_key(7, None)), None);
        assert_eq!(relay_domain("a.test"), None);
        assert_eq!(relay_index("example.com"), None);
    }

    #[test]
    fn enhanced_code_is_read_only_when_well_formed() {
        assert_eq!(enhanced_of("550 5.1.1 no"), Some((5, 1, 1)));
        assert_eq!(enhanced_of("556 5.1.10 null MX"), Some((5, 1, 10)));
        assert_eq!(enhanced_of("550 no such user"), None);
        assert_eq!(enhanced_of("550 5..1 x"), None);
    }

    #[test]
    fn dns_verdicts_become_per_recipient_replies() {
        let msg = QueuedMessage {
            envelope: crate::queue::Envelope {
                id: QueueId::generate(),
                mail: Default::default(),
                recipients: vec![crate::queue::Recipient {
                    address: "a@nullmx.test".into(),
                    notify: None,
                    orcpt: None,
                }],
                client: crate::queue::ClientInfo {
                    ip: std::net::Ipv4Addr::LOCALHOST.into(),
                    port: 1,
                    helo: "c".into(),
                    auth_user: None,
                    tls: None,
                    listener: "smtp".into(),
                },
                received_at_ms: 0,
                received_by: "relay.test".into(),
            },
            body: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
        };
        let reply = crate::smtp::Reply::status(556, (5, 1, 10), "null MX");
        let r = synthetic(&[&msg], &reply);
        assert_eq!(r.messages[0].recipients[0].result, Outcome::Bounced);
        assert!(!worth_next_host(&r), "a DNS verdict is not a host failure");
        let temp = synthetic(&[&msg], &crate::smtp::Reply::status(451, (4, 4, 3), "x"));
        assert_eq!(temp.messages[0].recipients[0].result, Outcome::Deferred);
    }
}
