//! Conditions and status, computed as pure functions of what the reconciler saw.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::relay::AutoscalerOutcome;
use crate::crd::MailRelayStatus;
use crate::status::QueueReport;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Present while `spec.autoscaling` is set (or an autoscaler was rendered before).
pub const AUTOSCALING: &str = "Autoscaling";
pub const KEDA_MISSING: &str = "KedaNotInstalled";
pub const KEDA_MISSING_MESSAGE: &str = "spec.autoscaling.keda asks for a KEDA ScaledObject, but the API server does not serve keda.sh/v1alpha1 ScaledObjects: install KEDA, or remove autoscaling.keda to get a HorizontalPodAutoscaler; meanwhile the Deployment keeps its replicas";

/// Adds what the autoscaler reconcile found to `st`: the pod selector (for the
/// `scale` subresource), the autoscaler kind applied, and the `Autoscaling`
/// condition (dropped when autoscaling is off).
pub fn autoscaling_status(
    st: &mut MailRelayStatus,
    old: Option<&MailRelayStatus>,
    name: &str,
    outcome: &AutoscalerOutcome,
    generation: Option<i64>,
    now: &Time,
) {
    let oc = old.map(|o| o.conditions.as_slice()).unwrap_or_default();
    st.selector = Some(
        crate::resources::selector_labels(name)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    );
    st.conditions.retain(|c| c.type_ != AUTOSCALING);
    match outcome {
        AutoscalerOutcome::None => st.autoscaler = None,
        AutoscalerOutcome::Applied(kind) => {
            st.autoscaler = Some((*kind).to_owned());
            st.conditions.push(condition(
                oc,
                AUTOSCALING,
                true,
                &format!("{kind}Applied"),
                format!("a {kind} named {name:?} sizes the relay Deployment"),
                generation,
                now,
            ));
        }
        AutoscalerOutcome::KedaMissing => {
            // Nothing of KEDA exists to remove later.
            st.autoscaler = None;
            st.conditions.push(condition(
                oc,
                AUTOSCALING,
                false,
                KEDA_MISSING,
                KEDA_MISSING_MESSAGE,
                generation,
                now,
            ));
        }
    }
}

/// The current time, in whole seconds (the API server's precision, so a condition
/// read back compares equal).
pub fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A condition that keeps its `lastTransitionTime` from `old` while its status
/// stays the same.
pub fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Where a relay's Deployment stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rollout {
    pub desired: i32,
    pub ready: i32,
    pub updated: i32,
    pub available: i32,
    /// The Deployment controller has seen the latest Deployment spec.
    pub observed: bool,
    /// Why the Deployment controller gave up (progress deadline exceeded, replica
    /// failure), if it did.
    pub failure: Option<String>,
}

impl Rollout {
    pub fn of(d: &Deployment) -> Rollout {
        let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let st = d.status.as_ref();
        let observed = match (
            d.metadata.generation,
            st.and_then(|s| s.observed_generation),
        ) {
            (Some(g), Some(o)) => o >= g,
            (None, _) => true,
            (Some(_), None) => false,
        };
        Rollout {
            desired,
            ready: st.and_then(|s| s.ready_replicas).unwrap_or(0),
            updated: st.and_then(|s| s.updated_replicas).unwrap_or(0),
            available: st.and_then(|s| s.available_replicas).unwrap_or(0),
            observed,
            failure: st
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .find(|c| {
                    (c.type_ == "Progressing"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
                        || (c.type_ == "ReplicaFailure" && c.status == "True")
                })
                .map(|c| {
                    format!(
                        "{}: {}",
                        c.reason.as_deref().unwrap_or(&c.type_),
                        c.message.as_deref().unwrap_or("")
                    )
                }),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready >= self.desired
    }

    pub fn is_complete(&self) -> bool {
        self.observed && self.updated >= self.desired && self.ready >= self.desired
    }
}

/// What one reconcile of a MailRelay achieved.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The objects were applied.
    Applied {
        rollout: Rollout,
        config_hash: String,
        quotas: Vec<String>,
    },
    /// Nothing was applied: a referenced Secret is missing or the spec is invalid.
    Blocked { reason: String, message: String },
}

/// The new status of a MailRelay. Fields the reconcile could not observe keep
/// their old values (a blocked rollout leaves the running pods as they were).
pub fn relay_status(
    old: Option<&MailRelayStatus>,
    generation: Option<i64>,
    outcome: &Outcome,
    queue: Option<&Result<QueueReport, String>>,
    now: &Time,
) -> MailRelayStatus {
    let old = old.cloned().unwrap_or_default();
    let oc = &old.conditions;
    let mut st = MailRelayStatus {
        observed_generation: generation,
        ..old.clone()
    };
    let degraded_queue = match queue {
        Some(Ok(report)) => {
            st.queue = Some(report.queue.clone());
            st.delivery = Some(report.delivery.clone());
            if let Some(top) = &report.top_deferred {
                st.top_deferred = top.clone();
            }
            None
        }
        Some(Err(e)) => Some(e.clone()),
        None => None,
    };
    match outcome {
        Outcome::Applied {
            rollout,
            config_hash,
            quotas,
        } => {
            st.replicas = Some(rollout.desired);
            st.ready_replicas = Some(rollout.ready);
            st.config_hash = Some(config_hash.clone());
            st.quotas = quotas.clone();
            let pods = format!("{}/{} relay pods ready", rollout.ready, rollout.desired);
            st.conditions = vec![
                if rollout.is_ready() {
                    condition(oc, READY, true, "Available", pods.clone(), generation, now)
                } else {
                    condition(
                        oc,
                        READY,
                        false,
                        "PodsNotReady",
                        pods.clone(),
                        generation,
                        now,
                    )
                },
                if rollout.is_complete() {
                    condition(
                        oc,
                        PROGRESSING,
                        false,
                        "RolloutComplete",
                        pods,
                        generation,
                        now,
                    )
                } else {
                    condition(
                        oc,
                        PROGRESSING,
                        true,
                        "RollingOut",
                        format!(
                            "{}/{} relay pods updated, {} ready",
                            rollout.updated, rollout.desired, rollout.ready
                        ),
                        generation,
                        now,
                    )
                },
                match degraded_queue {
                    Some(e) => condition(
                        oc,
                        DEGRADED,
                        true,
                        "QueueStoreUnreachable",
                        e,
                        generation,
                        now,
                    ),
                    None => match &rollout.failure {
                        Some(why) => condition(
                            oc,
                            DEGRADED,
                            true,
                            "RolloutFailed",
                            format!(
                                "{why} ({}/{} relay pods available)",
                                rollout.available, rollout.desired
                            ),
                            generation,
                            now,
                        ),
                        None => condition(oc, DEGRADED, false, "AsExpected", "", generation, now),
                    },
                },
            ];
        }
        Outcome::Blocked { reason, message } => {
            st.conditions = vec![
                condition(oc, READY, false, reason, message.clone(), generation, now),
                condition(
                    oc,
                    PROGRESSING,
                    false,
                    reason,
                    "rollout held until the problem is fixed; running pods are left as they are",
                    generation,
                    now,
                ),
                condition(oc, DEGRADED, true, reason, message.clone(), generation, now),
            ];
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn applied(ready: i32, updated: i32) -> Outcome {
        Outcome::Applied {
            rollout: Rollout {
                desired: 2,
                ready,
                updated,
                available: ready,
                observed: true,
                failure: None,
            },
            config_hash: "h".into(),
            quotas: vec![],
        }
    }

    fn get<'a>(st: &'a MailRelayStatus, type_: &str) -> &'a Condition {
        st.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn transition_times_move_only_on_a_change() {
        let s1 = relay_status(None, Some(1), &applied(0, 2), None, &t(100));
        assert_eq!(get(&s1, READY).status, "False");
        assert_eq!(get(&s1, PROGRESSING).status, "True");
        let s2 = relay_status(Some(&s1), Some(1), &applied(0, 2), None, &t(200));
        assert_eq!(s1, s2, "nothing changed: same status, nothing to patch");
        let s3 = relay_status(Some(&s2), Some(1), &applied(2, 2), None, &t(300));
        assert_eq!(get(&s3, READY).status, "True");
        assert_eq!(get(&s3, READY).last_transition_time, t(300));
        assert_eq!(get(&s3, DEGRADED).last_transition_time, t(100));
        assert_eq!(get(&s3, READY).observed_generation, Some(1));
    }

    #[test]
    fn blocked_keeps_what_it_cannot_see_and_unreachable_store_degrades() {
        let s1 = relay_status(None, Some(1), &applied(2, 2), None, &t(1));
        let blocked = Outcome::Blocked {
            reason: "SecretNotFound".into(),
            message: "Secret \"x\" does not exist".into(),
        };
        let s2 = relay_status(Some(&s1), Some(2), &blocked, None, &t(2));
        assert_eq!(s2.ready_replicas, Some(2));
        assert_eq!(get(&s2, READY).reason, "SecretNotFound");
        assert_eq!(get(&s2, DEGRADED).status, "True");
        assert_eq!(s2.observed_generation, Some(2));
        let s3 = relay_status(
            Some(&s1),
            Some(1),
            &applied(2, 2),
            Some(&Err("connection refused".into())),
            &t(3),
        );
        assert_eq!(get(&s3, DEGRADED).reason, "QueueStoreUnreachable");
        assert_eq!(get(&s3, READY).status, "True");
    }
}
