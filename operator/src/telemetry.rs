//! The operator's own `/metrics` (OpenMetrics) and `/healthz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: String,
}

/// Labels of the per-relay queue gauges. Not `namespace`: Prometheus sets that
/// label to the operator's own namespace when it scrapes the operator.
pub const RELAY_NAMESPACE_LABEL: &str = "relay_namespace";
pub const RELAY_LABEL: &str = "relay";
/// Per-relay queue gauges, refreshed at each reconcile (every status interval)
/// from the queue store, for autoscalers: present while a relay has no pods, and
/// one series per relay (the relay pods each report the whole shared queue).
pub const QUEUE_MESSAGES_METRIC: &str = "mailrelay_operator_relay_queue_messages";
pub const QUEUE_PENDING_METRIC: &str = "mailrelay_operator_relay_queue_pending_messages";
pub const QUEUE_OLDEST_AGE_METRIC: &str = "mailrelay_operator_relay_queue_oldest_age_seconds";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    relay_namespace: String,
    relay: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: String,
    error: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<ControllerLabel, Histogram>,
    status_patches: Family<ControllerLabel, Counter>,
    leader: Gauge<i64, AtomicI64>,
    queue_messages: Family<RelayLabels, Gauge<i64, AtomicI64>>,
    queue_pending: Family<RelayLabels, Gauge<i64, AtomicI64>>,
    queue_oldest_age: Family<RelayLabels, Gauge<f64, AtomicU64>>,
    namespace_refused: Family<NamespaceLabel, Gauge<i64, AtomicI64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabel {
    watched_namespace: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mailrelay_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let durations = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let status_patches = Family::<ControllerLabel, Counter>::default();
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were requeued with backoff",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            durations.clone(),
        );
        registry.register(
            "status_patches",
            "Status updates written (only changed statuses are)",
            status_patches.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        let queue_messages = Family::<RelayLabels, Gauge<i64, AtomicI64>>::default();
        let queue_pending = Family::<RelayLabels, Gauge<i64, AtomicI64>>::default();
        let queue_oldest_age = Family::<RelayLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "relay_queue_messages",
            "Messages in a relay's shared queue (due, deferred and in flight)",
            queue_messages.clone(),
        );
        registry.register(
            "relay_queue_pending_messages",
            "Messages in a relay's shared queue that have had no delivery attempt yet",
            queue_pending.clone(),
        );
        registry.register(
            "relay_queue_oldest_age_seconds",
            "Age of the oldest message in a relay's shared queue (0 when empty)",
            queue_oldest_age.clone(),
        );
        let namespace_refused = Family::<NamespaceLabel, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "namespace_refused",
            "1 while a namespace in scope is claimed by another operator install, which this one leaves alone",
            namespace_refused.clone(),
        );
        Metrics {
            namespace_refused,
            registry,
            queue_messages,
            queue_pending,
            queue_oldest_age,
            reconciles,
            errors,
            durations,
            status_patches,
            leader,
        }
    }

    pub fn reconciled(&self, controller: &str, seconds: f64) {
        let l = ControllerLabel {
            controller: controller.into(),
        };
        self.reconciles.get_or_create(&l).inc();
        self.durations.get_or_create(&l).observe(seconds);
    }

    pub fn reconcile_error(&self, controller: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                controller: controller.into(),
                error: error.into(),
            })
            .inc();
    }

    pub fn status_patched(&self, controller: &str) {
        self.status_patches
            .get_or_create(&ControllerLabel {
                controller: controller.into(),
            })
            .inc();
    }

    /// Whether this install leaves `namespace` to another install that claims it.
    pub fn set_namespace_refused(&self, namespace: &str, refused: bool) {
        self.namespace_refused
            .get_or_create(&NamespaceLabel {
                watched_namespace: namespace.into(),
            })
            .set(i64::from(refused));
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The queue of relay `namespace/name` as last read.
    pub fn set_relay_queue(&self, namespace: &str, name: &str, q: &crate::crd::QueueSummary) {
        let l = RelayLabels {
            relay_namespace: namespace.into(),
            relay: name.into(),
        };
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.queue_messages.get_or_create(&l).set(clamp(q.queued));
        self.queue_pending
            .get_or_create(&l)
            .set(clamp(q.queued.saturating_sub(q.deferred)));
        let age = q.oldest_queued_at.as_ref().map_or(0.0, |t| {
            (k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second()).max(0) as f64
        });
        self.queue_oldest_age.get_or_create(&l).set(age);
    }

    /// Drops the gauges of a deleted relay.
    pub fn forget_relay(&self, namespace: &str, name: &str) {
        let l = RelayLabels {
            relay_namespace: namespace.into(),
            relay: name.into(),
        };
        self.queue_messages.remove(&l);
        self.queue_pending.remove(&l);
        self.queue_oldest_age.remove(&l);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                ([(header::CONTENT_TYPE, OPENMETRICS)], m.encode()).into_response()
            }),
        )
        .with_state(metrics)
}

/// Serves `/healthz` and `/metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}
