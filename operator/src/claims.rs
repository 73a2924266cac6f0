//! Namespace claims: of two operator installs whose scopes overlap, exactly one
//! reconciles each namespace.
//!
//! Leader election decides which replica of one install runs; it cannot stop a
//! second install (another Helm release, cluster-wide or watching some of the same
//! namespaces) from reconciling the same MailRelays with the same field manager,
//! each undoing the other. So an install claims every namespace it reconciles in
//! with a Lease named [`CLAIM_LEASE`] in that namespace, held under the install's
//! identity (`RELEASE_NAMESPACE/LEASE_NAME` of its leader Lease, the same for all
//! its replicas) by the same protocol as the leader Lease ([`crate::leader`]):
//! first come, first served; taken over only once the holder stopped renewing.
//! An install that finds a namespace claimed by another live install refuses it:
//! it leaves the objects there untouched, logs it, sets
//! `mailrelay_operator_namespace_refused{watched_namespace}` to 1, publishes a
//! `NamespaceClaimed` Warning Event on each object it skips, and retries, so it
//! takes over once the other install is gone.
//!
//! A namespaced install claims its watched namespaces at start; a cluster-wide
//! install claims a namespace when it first reconciles an object there. Claims
//! are renewed in the background and released on a clean shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::leader::{ElectorConfig, LeaderElector};
use crate::telemetry::Metrics;

/// Name of the claim Lease in each namespace an install reconciles.
pub const CLAIM_LEASE: &str = "mailrelay-operator-claim";

#[derive(Debug, Clone)]
pub struct ClaimSettings {
    /// This install's identity: the same for all its replicas, different for
    /// every other install (`RELEASE_NAMESPACE/LEASE_NAME`).
    pub install: String,
    /// How long a claim stays valid without renewal (then another install may
    /// take the namespace over).
    pub lease_duration: Duration,
    /// How often held claims are renewed and refused ones retried.
    pub renew_every: Duration,
}

impl ClaimSettings {
    pub fn new(install: &str) -> Self {
        ClaimSettings {
            install: install.into(),
            lease_duration: Duration::from_secs(60),
            renew_every: Duration::from_secs(20),
        }
    }
}

/// Whether this install may reconcile in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Held,
    /// Another live install holds the namespace.
    Refused {
        holder: String,
    },
}

pub struct Claims {
    client: kube::Client,
    settings: ClaimSettings,
    metrics: Arc<Metrics>,
    /// Last answer per namespace, and when it was had.
    state: Mutex<BTreeMap<String, (Claim, Instant)>>,
    /// Objects already told (by an Event) that they are skipped.
    told: std::sync::Mutex<BTreeSet<String>>,
}

impl Claims {
    pub fn new(client: kube::Client, settings: ClaimSettings, metrics: Arc<Metrics>) -> Self {
        Claims {
            client,
            settings,
            metrics,
            state: Mutex::new(BTreeMap::new()),
            told: std::sync::Mutex::new(BTreeSet::new()),
        }
    }

    pub fn settings(&self) -> &ClaimSettings {
        &self.settings
    }

    fn elector(&self, ns: &str) -> LeaderElector {
        let mut cfg = ElectorConfig::new(ns, &self.settings.install);
        cfg.name = CLAIM_LEASE.into();
        cfg.lease_duration = self.settings.lease_duration;
        LeaderElector::new(self.client.clone(), cfg)
    }

    /// Whether this install may reconcile in `ns`; asks the API server only when
    /// the last answer is older than the renewal interval.
    pub async fn check(&self, ns: &str) -> Result<Claim, kube::Error> {
        if let Some((c, at)) = self.state.lock().await.get(ns)
            && at.elapsed() < self.settings.renew_every
        {
            return Ok(c.clone());
        }
        self.refresh(ns).await
    }

    /// Claims (or renews the claim of) `ns` now.
    pub async fn refresh(&self, ns: &str) -> Result<Claim, kube::Error> {
        let elector = self.elector(ns);
        let claim = if elector.try_lead().await? {
            Claim::Held
        } else {
            // Losing a race to ourselves (two reconciles in one namespace at once)
            // is holding it.
            match elector.holder().await? {
                Some(h) if h != self.settings.install => Claim::Refused { holder: h },
                _ => Claim::Held,
            }
        };
        let before = self
            .state
            .lock()
            .await
            .insert(ns.to_owned(), (claim.clone(), Instant::now()))
            .map(|(c, _)| c);
        if before.as_ref() != Some(&claim) {
            match &claim {
                Claim::Held => {
                    tracing::info!(namespace = %ns, install = %self.settings.install, "namespace claimed");
                    // A later refusal is news again.
                    let infix = format!("/{ns}/");
                    self.told
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|k| !k.contains(&infix));
                }
                Claim::Refused { holder } => tracing::error!(
                    namespace = %ns,
                    install = %self.settings.install,
                    %holder,
                    "namespace is claimed by another operator install: leaving it alone"
                ),
            }
            self.metrics
                .set_namespace_refused(ns, matches!(claim, Claim::Refused { .. }));
        }
        Ok(claim)
    }

    /// Whether `key` (an object skipped in a refused namespace) is new, so that
    /// one Event is published per object, not one per retry.
    pub fn first_refusal(&self, key: &str) -> bool {
        self.told
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned())
    }

    /// Claims `namespaces` (a namespaced install's scope) and renews them and
    /// every namespace claimed since, until dropped.
    pub async fn keep(&self, namespaces: &[String]) {
        loop {
            let known: BTreeSet<String> = self
                .state
                .lock()
                .await
                .keys()
                .cloned()
                .chain(namespaces.iter().cloned())
                .collect();
            for ns in known {
                if let Err(e) = self.refresh(&ns).await {
                    tracing::warn!(namespace = %ns, error = %e, "cannot renew the namespace claim");
                }
            }
            tokio::time::sleep(self.settings.renew_every).await;
        }
    }

    /// Gives up every claim held (a clean shutdown), so that another install may
    /// take the namespaces over at once.
    pub async fn release_all(&self) {
        let held: Vec<String> = self
            .state
            .lock()
            .await
            .iter()
            .filter(|(_, (c, _))| *c == Claim::Held)
            .map(|(ns, _)| ns.clone())
            .collect();
        for ns in held {
            self.elector(&ns).release().await;
        }
        self.state.lock().await.clear();
    }
}
