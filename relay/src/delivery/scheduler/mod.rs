//! The delivery service: takes due mail from the queue under a lease, groups it by
//! destination, sends it (one connection carrying up to
//! `max_messages_per_connection` messages), records every attempt, and reschedules,
//! bounces or finalises each message.
//!
//! One [`Delivery`] runs four stages, each in its own module:
//!
//! - `routes`: which destination a recipient goes to (its domain's MX hosts, a
//!   route of the transport map, or the smarthost) and the hosts to try for it.
//! - `lease`: taking due mail (only what this relay can send soon), renewing the
//!   leases held, giving back what a destination at capacity cannot take.
//! - `dispatch`: per-destination groups, connections and their SMTP sessions,
//!   with the concurrency caps and egress pacing.
//! - `finalize`: attempt results into recipient states, the next attempt or
//!   expiry, the DSNs owed, and the queue outcome.
//!
//! The shared state is `Inner`; each stage adds its methods to it.

mod dispatch;
mod finalize;
mod lease;
mod routes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use self::routes::{RelayHost, RouteTable};
use super::mx::{MxResolver, ResolverError};
use super::outcomes::OutcomeWriter;
use super::smtp_client::{ClientTimeouts, ClientTls, ClientTlsError};
use crate::config::DeliveryConfig;
use crate::delivery::gate::{DispatchHook, Pacing, Unpaced};
use crate::metrics::Metrics;
use crate::queue::{Lease, Leasing, MessageStatus, Queue, QueueId, QueuedMessage};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("delivery DNS resolver: {0}")]
    Resolver(#[from] ResolverError),
    #[error("delivery TLS: {0}")]
    Tls(#[from] ClientTlsError),
    #[error("MTA-STS HTTPS client: {0}")]
    StsClient(rustls::Error),
    #[error(transparent)]
    Dane(#[from] crate::delivery::tls_policy::dane::DaneError),
}

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

/// A running delivery service; [`Delivery::shutdown`] drains it.
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
    /// MTA-STS policies of recipient domains.
    sts: crate::delivery::tls_policy::StsCache,
    /// `None` with `delivery.dane.enabled: false`.
    dane: Option<crate::delivery::tls_policy::dane::Dane>,
    /// Routes in config order, then the smarthost.
    relays: Vec<RelayHost>,
    routes: RouteTable,
    smarthost: Option<usize>,
    metrics: Arc<Metrics>,
    egress: Arc<dyn Pacing>,
    timeouts: ClientTimeouts,
    total: Arc<Semaphore>,
    per_destination: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Every lease we hold, for renewal and for release on drain.
    held: Mutex<HashMap<QueueId, Held>>,
    /// Parts (one message's recipients at one destination) held per destination,
    /// waiting for a connection or on one: what caps a destination's leases.
    in_hand: Mutex<HashMap<String, usize>>,
    /// Connection tasks spawned and not yet finished.
    running: AtomicUsize,
    stopping: AtomicBool,
    wake: Arc<Notify>,
    /// Sees leased mail before delivery (ingress `defer` quotas hold some back).
    hook: Option<Arc<dyn DispatchHook>>,
    /// Signs the DSNs this relay writes (set when `dkim:` is configured).
    dsn_signer: std::sync::OnceLock<Arc<crate::dkim::Dkim>>,
    /// Lists recipients whose delivery failed for good (set when `suppression:` is configured).
    suppression: std::sync::OnceLock<Arc<crate::events::suppression::Suppression>>,
    /// Every `finish` goes through here, batched.
    outcomes: OutcomeWriter,
    /// Counts MX sessions for TLS reports (set when `tls_reporting:` is on).
    tls_report: std::sync::OnceLock<Arc<crate::delivery::tls_report::TlsReporter>>,
    tls_metrics: std::sync::OnceLock<crate::delivery::tls_policy::metrics::TlsMetrics>,
}

/// A lease we hold.
struct Held {
    /// Its `expires_ms` is moved on by every renewal that found it.
    lease: Lease,
    /// Its outcome went to the writer: a renewal that finds the lease gone ran,
    /// most likely, after that outcome was written (a finished message has no
    /// lease), so it is not reported lost; the finish's own answer tells whether
    /// the lease was still ours.
    finishing: bool,
}

impl Held {
    fn new(lease: Lease) -> Self {
        Held {
            lease,
            finishing: false,
        }
    }
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
    /// Recipients delivered this round to a server without the DSN extension: an
    /// RFC 3461 `relayed` notice is owed to those that asked for NOTIFY=SUCCESS.
    relayed: Mutex<Vec<String>>,
    /// Delivery events of this round, written with its outcome.
    events: Mutex<Vec<mailrelay_admin_api::Event>>,
}

/// The recipients of one message bound for one destination.
struct Part {
    work: Arc<Work>,
    rcpts: Vec<String>,
}

impl Delivery {
    /// Builds the resolver and TLS clients (blocking file IO: call at start-up) and
    /// starts taking work, unpaced and with no quotas.
    pub fn start(
        queue: Arc<dyn Queue>,
        cfg: DeliveryConfig,
        hostname: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DeliveryError> {
        Self::start_with(queue, cfg, hostname, metrics, Arc::new(Unpaced), None)
    }

    /// [`Delivery::start`] with egress pacing (quotas and their shared store) and a
    /// dispatch hook that sees every leased batch first (ingress `defer` quotas).
    pub fn start_with(
        queue: Arc<dyn Queue>,
        cfg: DeliveryConfig,
        hostname: String,
        metrics: Arc<Metrics>,
        egress: Arc<dyn Pacing>,
        hook: Option<Arc<dyn DispatchHook>>,
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
        let sts = sts_cache(&cfg, &resolver)?;
        let dane = dane(&cfg, &mx_tls)?;
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
            sts,
            dane,
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
            dsn_signer: std::sync::OnceLock::new(),
            suppression: std::sync::OnceLock::new(),
            tls_report: std::sync::OnceLock::new(),
            tls_metrics: std::sync::OnceLock::new(),
        });
        if inner.dane.is_some() {
            // DS trust anchors become keys now, not at the first delivery.
            let i = Arc::clone(&inner);
            tokio::spawn(async move {
                if let Some(d) = &i.dane {
                    d.prepare().await;
                }
            });
        }
        let main = tokio::spawn(Arc::clone(&inner).run());
        let renewer = tokio::spawn(Arc::clone(&inner).renew_loop());
        info!(owner = %inner.owner, "delivery started");
        Ok(Delivery {
            inner,
            main,
            renewer,
        })
    }

    /// Records delivery events into `sink` from now on (once; later calls are
    /// ignored).
    pub fn record_events_with(&self, sink: crate::events::log::EventSink) {
        self.inner.outcomes.record_events_with(sink);
    }

    /// Signs every DSN written from now on with `dkim` (once; later calls are ignored).
    pub fn sign_dsns_with(&self, dkim: Arc<crate::dkim::Dkim>) {
        let _ = self.inner.dsn_signer.set(dkim);
    }

    /// Lists recipients that bounce (by category, see `suppression:`) with `s`.
    pub fn suppress_with(&self, s: Arc<crate::events::suppression::Suppression>) {
        let _ = self.inner.suppression.set(s);
    }

    /// Shares MTA-STS policies with the other relays through `store` (once).
    pub fn share_policies_with(&self, store: Arc<dyn crate::delivery::tls_policy::SharedPolicies>) {
        self.inner.sts.share_with(store);
    }

    /// Counts MX sessions into `r` for TLS reports (once).
    pub fn report_tls_with(&self, r: Arc<crate::delivery::tls_report::TlsReporter>) {
        let _ = self.inner.tls_report.set(r);
    }

    /// Records MTA-STS metrics into `m` (once).
    pub fn count_tls_with(&self, m: crate::delivery::tls_policy::metrics::TlsMetrics) {
        self.inner.sts.count_with(m.clone());
        let _ = self.inner.tls_metrics.set(m);
    }

    /// The resolver MX lookups use (for `_smtp._tls` lookups).
    pub fn dns_resolver(&self) -> hickory_resolver::TokioResolver {
        self.inner.resolver.dns().clone()
    }

    /// How often the MTA-STS cache went to DNS, HTTPS and the shared store.
    pub fn sts_stats(&self) -> &crate::delivery::tls_policy::cache::CacheStats {
        &self.inner.sts.stats
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
        let leases: Vec<Lease> = inner
            .held
            .lock()
            .unwrap()
            .drain()
            .map(|(_, h)| h.lease)
            .collect();
        if !leases.is_empty() {
            match inner.queue.release(&leases).await {
                Ok(()) => info!(count = leases.len(), "released unfinished deliveries"),
                Err(e) => warn!(error = %e, "releasing leases failed; they expire on their own"),
            }
        }
        info!("delivery stopped");
    }
}

/// The MTA-STS cache, its HTTPS client trusting `mta_sts.ca_file`, else
/// `delivery.ca_file`, else the system store. Blocking file IO: call at start-up.
fn sts_cache(
    cfg: &DeliveryConfig,
    resolver: &MxResolver,
) -> Result<crate::delivery::tls_policy::StsCache, DeliveryError> {
    use crate::delivery::tls_policy::{StsCache, fetch::Fetcher};
    let configured = cfg.mta_sts.ca_file.as_deref().or(cfg.ca_file.as_deref());
    let path = configured.unwrap_or(std::path::Path::new(super::smtp_client::SYSTEM_CA_FILE));
    let roots = match super::smtp_client::load_roots(path) {
        Ok(r) => r,
        Err(e) if configured.is_none() => {
            warn!(error = %e, "no system CA store; MTA-STS policy fetches will fail");
            rustls::RootCertStore::empty()
        }
        Err(e) => return Err(e.into()),
    };
    let fetcher = Fetcher::new(
        roots,
        resolver.dns().clone(),
        cfg.mta_sts.port_override.unwrap_or(443),
        cfg.mta_sts.fetch_timeout,
    )
    .map_err(DeliveryError::StsClient)?;
    Ok(StsCache::new(resolver.dns().clone(), fetcher))
}

/// The DANE resolver: `delivery.dane.nameservers`, else the MX lookups' resolvers.
/// Blocking file IO (the trust anchor): call at start-up.
fn dane(
    cfg: &DeliveryConfig,
    base: &ClientTls,
) -> Result<Option<crate::delivery::tls_policy::dane::Dane>, DeliveryError> {
    use crate::delivery::tls_policy::dane::{Dane, load_trust_anchor};
    if !cfg.dane.enabled {
        return Ok(None);
    }
    let anchor = match &cfg.dane.trust_anchor {
        Some(p) => Some(load_trust_anchor(p)?),
        None => None,
    };
    let servers = if cfg.dane.nameservers.is_empty() {
        &cfg.dns.nameservers
    } else {
        &cfg.dane.nameservers
    };
    Ok(Some(Dane::new(
        servers,
        anchor,
        cfg.dns.timeout,
        cfg.dns.attempts,
        base.clone(),
    )?))
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
