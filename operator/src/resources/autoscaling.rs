//! `spec.autoscaling` -> a HorizontalPodAutoscaler (autoscaling/v2) or a KEDA
//! ScaledObject (keda.sh/v1alpha1) for the relay Deployment.
//!
//! Both scale on the queue gauges the operator exports per relay
//! ([`crate::telemetry::QUEUE_PENDING_METRIC`] and friends) rather than on the
//! relay pods' own: those exist while the Deployment has no pods at all (so KEDA
//! can wake a relay scaled to zero), and there is one series per relay instead of
//! one identical copy per pod. `max()` in the queries still guards against two
//! operator replicas overlapping for a moment at a leader change.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, ExternalMetricSource, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec, MetricTarget, ResourceMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::config::SpecError;
use crate::crd::{AutoscalingSpec, MailRelaySpec};
use crate::telemetry::{
    QUEUE_MESSAGES_METRIC, QUEUE_OLDEST_AGE_METRIC, QUEUE_PENDING_METRIC, RELAY_LABEL,
    RELAY_NAMESPACE_LABEL,
};

/// Kind names, as recorded in `status.autoscaler`.
pub const HPA_KIND: &str = "HorizontalPodAutoscaler";
pub const SCALED_OBJECT_KIND: &str = "ScaledObject";

/// KEDA's ScaledObject resource (a CRD that may not be installed).
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", SCALED_OBJECT_KIND),
        "scaledobjects",
    )
}

/// What sizes the relay Deployment when `spec.autoscaling` is set.
#[derive(Debug, Clone, PartialEq)]
pub enum Autoscaler {
    Hpa(Box<HorizontalPodAutoscaler>),
    Keda(Box<DynamicObject>),
}

impl Autoscaler {
    pub fn kind(&self) -> &'static str {
        match self {
            Autoscaler::Hpa(_) => HPA_KIND,
            Autoscaler::Keda(_) => SCALED_OBJECT_KIND,
        }
    }

    pub fn to_yaml(&self) -> String {
        match self {
            Autoscaler::Hpa(h) => serde_norway::to_string(h),
            Autoscaler::Keda(k) => serde_norway::to_string(k),
        }
        .expect("k8s objects serialise")
    }
}

/// Checks what the CRD's CEL rules check, for a CRD installed without them.
pub fn check(a: &AutoscalingSpec) -> Result<(), SpecError> {
    let err = |field: &str, message: &str| {
        Err(SpecError {
            field: format!("spec.autoscaling.{field}"),
            message: message.into(),
        })
    };
    if a.max_replicas < 1 {
        return err("maxReplicas", "must be at least 1");
    }
    if a.min_replicas < 0 || a.min_replicas > a.max_replicas {
        return err(
            "minReplicas",
            "must be between 0 and autoscaling.maxReplicas",
        );
    }
    if a.min_replicas == 0 && a.keda.is_none() {
        return err(
            "minReplicas",
            "0 (scale to zero) needs autoscaling.keda: a HorizontalPodAutoscaler cannot scale to zero",
        );
    }
    if a.target_cpu_utilization.is_none() && a.queue.is_none() {
        return err(
            "targetCPUUtilization",
            "autoscaling needs something to scale on: set autoscaling.targetCPUUtilization, autoscaling.queue or both",
        );
    }
    if let Some(q) = &a.queue
        && q.pending_messages_per_replica.is_none()
        && q.oldest_message_age_seconds.is_none()
    {
        return err(
            "queue",
            "needs pendingMessagesPerReplica, oldestMessageAgeSeconds or both",
        );
    }
    if a.keda.is_some() && a.queue.is_none() {
        return err(
            "queue",
            "autoscaling.keda scales on the shared queue: set autoscaling.queue",
        );
    }
    Ok(())
}

/// The Deployment's replicas when the operator creates it under an autoscaler:
/// `spec.replicas` kept within the autoscaler's bounds.
pub fn initial_replicas(spec: &MailRelaySpec) -> i32 {
    match &spec.autoscaling {
        Some(a) => spec
            .replicas
            .clamp(a.min_replicas, a.max_replicas.max(a.min_replicas)),
        None => spec.replicas,
    }
}

/// The autoscaler of relay `name`, or `None` without `spec.autoscaling`.
pub fn build(
    spec: &MailRelaySpec,
    name: &str,
    namespace: &str,
    meta: ObjectMeta,
) -> Result<Option<Autoscaler>, SpecError> {
    let Some(a) = &spec.autoscaling else {
        return Ok(None);
    };
    check(a)?;
    Ok(Some(match &a.keda {
        None => Autoscaler::Hpa(Box::new(hpa(a, name, meta))),
        Some(_) => Autoscaler::Keda(Box::new(scaled_object(a, name, namespace, meta))),
    }))
}

fn hpa(a: &AutoscalingSpec, name: &str, meta: ObjectMeta) -> HorizontalPodAutoscaler {
    let mut metrics = Vec::new();
    if let Some(cpu) = a.target_cpu_utilization {
        metrics.push(MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(cpu),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    // External metrics (an adapter such as prometheus-adapter serves the operator's
    // gauges, see docs/operations.md), selected by the relay's name; the adapter
    // maps `relay_namespace` to the HPA's namespace.
    let external = |metric: &str, target: MetricTarget| MetricSpec {
        type_: "External".into(),
        external: Some(ExternalMetricSource {
            metric: MetricIdentifier {
                name: metric.into(),
                selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(RELAY_LABEL.to_owned(), name.to_owned())])),
                    ..LabelSelector::default()
                }),
            },
            target,
        }),
        ..MetricSpec::default()
    };
    if let Some(q) = &a.queue {
        if let Some(n) = q.pending_messages_per_replica {
            // AverageValue: the metric divided by the pods, as the backlog is shared.
            metrics.push(external(
                QUEUE_PENDING_METRIC,
                MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(n.to_string())),
                    ..MetricTarget::default()
                },
            ));
        }
        if let Some(age) = q.oldest_message_age_seconds {
            // Value: the age is not a per-pod quantity; pods grow in proportion.
            metrics.push(external(
                QUEUE_OLDEST_AGE_METRIC,
                MetricTarget {
                    type_: "Value".into(),
                    value: Some(Quantity(age.to_string())),
                    ..MetricTarget::default()
                },
            ));
        }
    }
    HorizontalPodAutoscaler {
        metadata: meta,
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: name.into(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(metrics),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

/// PromQL for gauge `metric` of this relay, over however many operator pods report it.
fn query(metric: &str, name: &str, namespace: &str) -> String {
    format!("max({metric}{{{RELAY_NAMESPACE_LABEL}=\"{namespace}\",{RELAY_LABEL}=\"{name}\"}})")
}

fn scaled_object(
    a: &AutoscalingSpec,
    name: &str,
    namespace: &str,
    meta: ObjectMeta,
) -> DynamicObject {
    let keda = a.keda.as_ref().expect("called with autoscaling.keda");
    let server = keda.prometheus_server_address.as_str();
    let mut triggers = Vec::new();
    let q = a.queue.as_ref();
    if let Some(n) = q.and_then(|q| q.pending_messages_per_replica) {
        triggers.push(json!({
            "type": "prometheus",
            "name": "pending-messages",
            "metadata": {
                "serverAddress": server,
                "query": query(QUEUE_PENDING_METRIC, name, namespace),
                "threshold": n.to_string(),
            },
        }));
    }
    if let Some(age) = q.and_then(|q| q.oldest_message_age_seconds) {
        triggers.push(json!({
            "type": "prometheus",
            "name": "oldest-message-age",
            "metricType": "Value",
            "metadata": {
                "serverAddress": server,
                "query": query(QUEUE_OLDEST_AGE_METRIC, name, namespace),
                "threshold": age.to_string(),
            },
        }));
    }
    if a.min_replicas == 0 {
        // Scaled to zero, deferred mail still needs a pod to be retried by: one pod
        // while anything at all is queued (the query is 0 or 1, the threshold 1).
        triggers.push(json!({
            "type": "prometheus",
            "name": "mail-queued",
            "metadata": {
                "serverAddress": server,
                "query": format!("{} > bool 0", query(QUEUE_MESSAGES_METRIC, name, namespace)),
                "threshold": "1",
            },
        }));
    }
    if let Some(cpu) = a.target_cpu_utilization {
        triggers.push(json!({
            "type": "cpu",
            "metricType": "Utilization",
            "metadata": {"value": cpu.to_string()},
        }));
    }
    let mut spec = json!({
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicaCount": a.min_replicas,
        "maxReplicaCount": a.max_replicas,
        "triggers": triggers,
    });
    if let Some(c) = keda.cooldown_period {
        spec["cooldownPeriod"] = json!(c);
    }
    let mut obj = DynamicObject::new(name, &scaled_object_resource()).data(json!({"spec": spec}));
    obj.metadata = meta;
    obj
}
