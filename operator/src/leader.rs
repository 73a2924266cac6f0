//! Leader election over a `coordination.k8s.io/v1` Lease, so that two or more
//! operator replicas can run and exactly one reconciles.
//!
//! The protocol is client-go's: the leader renews `renewTime` every
//! [`ElectorConfig::renew_every`]; others take the Lease over only once
//! `renewTime + leaseDurationSeconds` has passed. Every write goes through the
//! Lease's `resourceVersion`, so of two replicas racing for it exactly one wins (the
//! other gets 409 Conflict). A leader that cannot renew within
//! [`ElectorConfig::renew_deadline`] (shorter than the lease duration) steps down
//! before anybody else may take over. [`decide`] is the pure part.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

#[derive(Debug, Clone)]
pub struct ElectorConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often a follower tries to take the Lease.
    pub retry_every: Duration,
}

impl ElectorConfig {
    pub fn new(namespace: &str, identity: &str) -> Self {
        ElectorConfig {
            name: "mailrelay-operator".into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// What to do with the Lease as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder let it expire: take it over.
    TakeOver,
    /// Someone else holds a valid Lease.
    Wait { holder: String },
}

/// Pure: decides from the Lease spec (`None`: no Lease object).
pub fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .map(|s| SignedDuration::from_secs(i64::from(s.max(1))))
        .unwrap_or_else(|| {
            SignedDuration::try_from(default_duration).unwrap_or(SignedDuration::MAX)
        });
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(t) if t.saturating_add(duration).is_ok_and(|exp| exp > now) => Decision::Wait {
            holder: holder.to_owned(),
        },
        _ => Decision::TakeOver,
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: ElectorConfig,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    pub fn new(client: kube::Client, cfg: ElectorConfig) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: acquires or renews the Lease if it may. `Ok(true)` while leading.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.cfg.name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.cfg.identity,
            now,
            self.cfg.lease_duration,
        );
        let result = match (decision, current) {
            (Decision::Wait { .. }, _) => return Ok(false),
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Decision::Renew, Some(mut lease)) => {
                let old = lease.spec.take().unwrap_or_default();
                lease.spec =
                    Some(self.spec(now, old.acquire_time, old.lease_transitions.unwrap_or(0)));
                self.api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await
            }
            (Decision::TakeOver, Some(mut lease)) => {
                let old = lease.spec.take().unwrap_or_default();
                lease.spec = Some(self.spec(now, None, old.lease_transitions.unwrap_or(0) + 1));
                self.api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Another replica wrote first (created it, or changed it since we read).
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Who holds the Lease now (`None`: no Lease, or nobody).
    pub async fn holder(&self) -> Result<Option<String>, kube::Error> {
        Ok(self
            .api
            .get_opt(&self.cfg.name)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty()))
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_lead().await {
                Ok(true) => {
                    tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot read or write the Lease")
                }
            }
            tokio::time::sleep(self.cfg.retry_every).await;
        }
    }

    /// Renews while leading; returns when leadership is lost (another holder, or no
    /// successful renewal within the renew deadline).
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.cfg.renew_every).await;
            match tokio::time::timeout(self.cfg.renew_deadline, self.try_lead()).await {
                Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!("leader election: the Lease is held by another replica");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election: renewal failed"),
                Err(_) => tracing::warn!("leader election: renewal timed out"),
            }
            if last_ok.elapsed() >= self.cfg.renew_deadline {
                tracing::error!("leader election: no renewal within the deadline");
                return;
            }
        }
    }

    /// Gives the Lease up on a clean shutdown, so a successor need not wait for it
    /// to expire.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(e) = self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "leader election: could not release the Lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", at(100), d), Decision::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), 0, 15)), "a", at(100), d),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 90, 15)), "a", at(100), d),
            Decision::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 80, 15)), "a", at(100), d),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(None, 99, 15)), "a", at(100), d),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(Some(""), 99, 15)), "a", at(100), d),
            Decision::TakeOver
        );
        let mut never_renewed = lease(Some("b"), 0, 15);
        never_renewed.renew_time = None;
        assert_eq!(
            decide(Some(&never_renewed), "a", at(100), d),
            Decision::TakeOver
        );
    }
}
