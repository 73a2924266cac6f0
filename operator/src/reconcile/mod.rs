//! The controllers: MailRelay (objects, status), SendQuota (usage status) and
//! SenderDomain (DKIM keys, DNS checks).
//!
//! Each `reconcile` is idempotent: it reads what it needs, applies the desired
//! objects with server-side apply under the field manager [`MANAGER`], computes the
//! status with pure functions and patches it only when it changed. Problems with the
//! input (a missing Secret, an invalid spec) are reported on the resource and retried
//! later, never returned as errors; errors (API server trouble) requeue with
//! per-object exponential backoff.
//!
//! Cleanup needs no finalizer: every object carries a controller owner reference,
//! so the garbage collector removes them with the MailRelay. Queued mail in Redis is
//! deliberately never deleted by the operator.

pub mod conditions;
pub mod ownership;
pub mod quota;
pub mod relay;
pub mod secrets;
pub mod senderdomain;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use mailrelay::queue::{Queue, RedisQueue};
use tokio::sync::Mutex as AsyncMutex;

use crate::claims::{Claim, ClaimSettings, Claims};
use crate::crd::{MailRelay, SendQuota, SenderDomain};
use crate::quota_api::AdminClient;
use crate::telemetry::Metrics;

/// Field manager of every server-side apply.
pub const MANAGER: &str = "mailrelay-operator";
/// The default relay image (the chart and Dockerfile agree on it).
pub const DEFAULT_RELAY_IMAGE: &str = concat!(
    "ghcr.io/mailrelay-dev/mailrelay:",
    env!("CARGO_PKG_VERSION")
);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot publish event: {0}")]
    Event(kube::Error),
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// Label value for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Event(_) => "event",
            Error::NoNamespace(_) => "no_namespace",
        }
    }
}

/// Knobs of the controllers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Relay image when a MailRelay names none.
    pub relay_image: String,
    /// How often status is refreshed from the queue store and admin APIs.
    pub status_interval: Duration,
    /// How soon a relay blocked on a missing Secret is looked at again (the Secret
    /// watch usually triggers earlier).
    pub blocked_retry: Duration,
    /// Base URL of a relay's admin API; `{name}` and `{namespace}` are replaced.
    pub admin_url_template: String,
    /// Deadline of one queue-store read.
    pub queue_timeout: Duration,
    /// Who may reach the relays' admin port (their NetworkPolicies).
    pub network: crate::resources::network::NetworkSettings,
    /// SMTP Service types a MailRelay may ask for; the platform's choice, not
    /// the tenant's (default: ClusterIP only).
    pub allowed_service_types: Vec<crate::crd::ServiceType>,
    /// Namespaces to watch and reconcile in; empty: every namespace.
    pub watch_namespaces: Vec<String>,
    /// Namespace claims against overlapping installs ([`crate::claims`]); `None`:
    /// none (the binary always claims; tests of one install need not).
    pub claims: Option<ClaimSettings>,
    /// Nameservers for SenderDomain DNS checks; empty: `/etc/resolv.conf` (the
    /// cluster's resolver).
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// The time SenderDomain key rotation goes by (tests move it).
    pub clock: Clock,
}

/// A source of the current time.
#[derive(Clone)]
pub struct Clock(pub Arc<dyn Fn() -> k8s_openapi::jiff::Timestamp + Send + Sync>);

impl Clock {
    pub fn now(&self) -> k8s_openapi::jiff::Timestamp {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock(Arc::new(k8s_openapi::jiff::Timestamp::now))
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            relay_image: DEFAULT_RELAY_IMAGE.into(),
            status_interval: Duration::from_secs(30),
            blocked_retry: Duration::from_secs(30),
            admin_url_template: "http://{name}-admin.{namespace}.svc:9325".into(),
            queue_timeout: Duration::from_secs(10),
            network: crate::resources::network::NetworkSettings::default(),
            allowed_service_types: vec![crate::crd::ServiceType::ClusterIP],
            watch_namespaces: Vec::new(),
            claims: None,
            dns_servers: Vec::new(),
            clock: Clock::default(),
        }
    }
}

impl Settings {
    pub fn admin_url(&self, namespace: &str, name: &str) -> String {
        self.admin_url_template
            .replace("{name}", name)
            .replace("{namespace}", namespace)
    }
}

/// Open queue-store connections, one per relay, reused while its settings hold.
#[derive(Default)]
pub struct QueueConnections {
    conns: AsyncMutex<HashMap<String, (String, Arc<RedisQueue>)>>,
    /// The egress store (response-rule states) of the same Redis.
    egress: AsyncMutex<HashMap<String, (String, Arc<mailrelay::quota::egress::Egress>)>>,
}

fn fingerprint(cfg: &mailrelay::config::RedisConfig) -> String {
    format!(
        "{}|{}|{}|{}|{}",
        cfg.url,
        cfg.key_prefix,
        cfg.cluster,
        cfg.cluster_nodes.join(","),
        crate::resources::secret_digest(&[cfg
            .password
            .as_ref()
            .map_or(&b""[..], |p| p.0.as_bytes())])
    )
}

impl QueueConnections {
    /// The egress store of relay `key` for `cfg`, read-only use: the states
    /// response rules keep there (reconnecting when the settings changed).
    pub async fn egress(
        &self,
        key: &str,
        cfg: &mailrelay::config::RedisConfig,
    ) -> Result<Arc<mailrelay::quota::egress::Egress>, String> {
        let fp = fingerprint(cfg);
        let mut conns = self.egress.lock().await;
        if let Some((f, e)) = conns.get(key)
            && *f == fp
        {
            return Ok(e.clone());
        }
        let e = Arc::new(
            mailrelay::quota::egress::Egress::redis(cfg, &[], Duration::from_secs(30))
                .await
                .map_err(|e| e.to_string())?,
        );
        conns.insert(key.to_owned(), (fp, e.clone()));
        Ok(e)
    }

    /// The queue of relay `key` for `cfg` (reconnecting when the settings changed).
    pub async fn get(
        &self,
        key: &str,
        cfg: &mailrelay::config::RedisConfig,
    ) -> Result<Arc<dyn Queue>, mailrelay::queue::QueueError> {
        let fingerprint = fingerprint(cfg);
        let mut conns = self.conns.lock().await;
        if let Some((fp, q)) = conns.get(key)
            && *fp == fingerprint
        {
            return Ok(q.clone());
        }
        let q = Arc::new(RedisQueue::connect(cfg).await?);
        conns.insert(key.to_owned(), (fingerprint, q.clone()));
        Ok(q)
    }

    pub async fn forget(&self, key: &str) {
        self.conns.lock().await.remove(key);
        self.egress.lock().await.remove(key);
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub queues: QueueConnections,
    pub admin: AdminClient,
    pub metrics: Arc<Metrics>,
    /// Which namespaces this install may reconcile in (with claims on).
    pub claims: Option<Claims>,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Arc<Context> {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let claims = settings
            .claims
            .clone()
            .map(|c| Claims::new(client.clone(), c, metrics.clone()));
        Arc::new(Context {
            claims,
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            queues: QueueConnections::default(),
            admin: AdminClient::new(),
            metrics,
            failures: Mutex::new(HashMap::new()),
        })
    }

    fn record_failure(&self, key: &str) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn record_success(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// Delay before retrying after the `n`th consecutive failure (n >= 1): 5 s doubling
/// up to 5 minutes.
pub fn backoff(n: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << n.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(300))
}

fn object_key<K: kube::Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

pub fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: kube::Resource<DynamicType = ()>,
{
    let n = ctx.record_failure(&object_key(obj.as_ref()));
    let delay = backoff(n);
    tracing::warn!(object = %object_key(obj.as_ref()), %error, attempt = n, retry_in = ?delay, "reconcile failed");
    ctx.metrics
        .reconcile_error(&K::kind(&()), error.metric_label());
    Action::requeue(delay)
}

/// The relays to reconcile when a SendQuota changes: every relay in its namespace,
/// which covers those its selector picks now and those it picked before an edit.
pub fn relays_for_quota(relays: &[Arc<MailRelay>], sq: &SendQuota) -> Vec<ObjectRef<MailRelay>> {
    let ns = sq.namespace();
    relays
        .iter()
        .filter(|r| r.namespace() == ns)
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

/// The relays to reconcile when Secret `name` in `ns` changes: those referencing it.
pub fn relays_for_secret(
    relays: &[Arc<MailRelay>],
    ns: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<MailRelay>> {
    relays
        .iter()
        .filter(|r| {
            r.namespace().as_deref() == ns
                && secrets::needed(&r.spec).iter().any(|n| n.name == name)
        })
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

/// The relays to reconcile when a SenderDomain changes (its keys or selector):
/// every relay in its namespace.
pub fn relays_for_sender_domain(
    relays: &[Arc<MailRelay>],
    sd: &SenderDomain,
) -> Vec<ObjectRef<MailRelay>> {
    let ns = sd.namespace();
    relays
        .iter()
        .filter(|r| r.namespace() == ns)
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

/// The SenderDomains to reconcile when a relay changes (status lists relays).
pub fn sender_domains_for_relay(
    domains: &[Arc<SenderDomain>],
    relay: &MailRelay,
) -> Vec<ObjectRef<SenderDomain>> {
    let ns = relay.namespace();
    domains
        .iter()
        .filter(|d| d.namespace() == ns)
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

/// The SendQuotas to reconcile when a relay changes (its labels decide which
/// quotas select it): every quota in its namespace.
pub fn quotas_for_relay(quotas: &[Arc<SendQuota>], relay: &MailRelay) -> Vec<ObjectRef<SendQuota>> {
    let ns = relay.namespace();
    quotas
        .iter()
        .filter(|q| q.namespace() == ns)
        .map(|q| ObjectRef::from_obj(q.as_ref()))
        .collect()
}

/// `None` when `obj` may be reconciled; otherwise the requeue of an object in a
/// namespace another install claims (it is left untouched; one Event says why).
pub async fn claim_gate<K>(obj: &K, ctx: &Context) -> Result<Option<Action>, Error>
where
    K: kube::Resource<DynamicType = ()>,
{
    let (Some(claims), Some(ns)) = (&ctx.claims, obj.namespace()) else {
        return Ok(None);
    };
    let Claim::Refused { holder } = claims.check(&ns).await? else {
        return Ok(None);
    };
    if claims.first_refusal(&object_key(obj)) {
        ctx.recorder
            .publish(
                &Event {
                    type_: EventType::Warning,
                    reason: "NamespaceClaimed".into(),
                    note: Some(format!(
                        "namespace {ns} is reconciled by operator install {holder}; install {} leaves this object alone",
                        claims.settings().install
                    )),
                    action: "Reconcile".into(),
                    secondary: None,
                },
                &obj.object_ref(&()),
            )
            .await
            .map_err(Error::Event)?;
    }
    Ok(Some(Action::requeue(claims.settings().renew_every)))
}

/// `Api::all`, or `Api::namespaced` in `ns`.
fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers, over every namespace or one per watched namespace, until
/// `shutdown` completes.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let namespaces = ctx.settings.watch_namespaces.clone();
    let keep_claims = async {
        match &ctx.claims {
            Some(c) => c.keep(&namespaces).await,
            None => std::future::pending().await,
        }
    };
    let controllers = async {
        if namespaces.is_empty() {
            controllers(ctx.clone(), None, stop.clone()).await;
        } else {
            futures::future::join_all(
                namespaces
                    .iter()
                    .map(|ns| controllers(ctx.clone(), Some(ns.as_str()), stop.clone())),
            )
            .await;
        }
    };
    tokio::select! {
        _ = controllers => {}
        _ = keep_claims => {}
    }
    if let Some(c) = &ctx.claims {
        c.release_all().await;
    }
}

/// The MailRelay, SendQuota and SenderDomain controllers over `ns` (`None`: every namespace).
async fn controllers<F, S>(ctx: Arc<Context>, ns: Option<&str>, stop: S)
where
    S: Fn() -> F,
    F: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let client = ctx.client.clone();
    let owned =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=mailrelay-operator");

    let relays = Controller::new(scoped::<MailRelay>(&client, ns), watcher::Config::default());
    let relay_store = relays.store();
    let by_quota = relay_store.clone();
    let by_secret = relay_store.clone();
    let by_domain = relay_store.clone();
    let relays = relays
        .owns(scoped::<Deployment>(&client, ns), owned.clone())
        .owns(scoped::<ConfigMap>(&client, ns), owned.clone())
        .owns(scoped::<Service>(&client, ns), owned)
        .watches(
            scoped::<SendQuota>(&client, ns),
            watcher::Config::default(),
            move |sq| relays_for_quota(&by_quota.state(), &sq),
        )
        // Only metadata is used (which relays reference a Secret by name); the
        // values are fetched by the reconcile of the relays concerned.
        .watches(
            scoped::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |s| relays_for_secret(&by_secret.state(), s.namespace().as_deref(), &s.name_any()),
        )
        .watches(
            scoped::<SenderDomain>(&client, ns),
            watcher::Config::default(),
            move |sd| relays_for_sender_domain(&by_domain.state(), &sd),
        )
        .graceful_shutdown_on(stop())
        .run(relay::reconcile, error_policy::<MailRelay>, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "mailrelay controller");
            }
        });

    let quotas = Controller::new(scoped::<SendQuota>(&client, ns), watcher::Config::default());
    let quota_store = quotas.store();
    let quotas = quotas
        .watches(
            scoped::<MailRelay>(&client, ns),
            watcher::Config::default(),
            move |r| quotas_for_relay(&quota_store.state(), &r),
        )
        .graceful_shutdown_on(stop())
        .run(quota::reconcile, error_policy::<SendQuota>, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "sendquota controller");
            }
        });

    let domains = Controller::new(
        scoped::<SenderDomain>(&client, ns),
        watcher::Config::default(),
    );
    let domain_store = domains.store();
    let domains = domains
        .watches(
            scoped::<MailRelay>(&client, ns),
            watcher::Config::default(),
            move |r| sender_domains_for_relay(&domain_store.state(), &r),
        )
        .graceful_shutdown_on(stop())
        .run(senderdomain::reconcile, error_policy::<SenderDomain>, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "senderdomain controller");
            }
        });

    tokio::join!(relays, quotas, domains);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn admin_urls_follow_the_template() {
        let s = Settings::default();
        assert_eq!(
            s.admin_url("mail", "relay"),
            "http://relay-admin.mail.svc:9325"
        );
    }
}
