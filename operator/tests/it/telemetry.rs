//! The operator's `/healthz` and `/metrics` over real HTTP.

use std::sync::Arc;
use std::time::Duration;

use mailrelay_operator::telemetry::{Metrics, serve};

use crate::support;

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    support::http_get_text(addr, path).await
}

#[tokio::test]
async fn health_and_metrics_are_served_until_shutdown() {
    let metrics = Arc::new(Metrics::new());
    metrics.reconciled("MailRelay", 0.02);
    metrics.reconcile_error("MailRelay", "kube");
    metrics.status_patched("SendQuota");
    metrics.set_leader(true);
    let oldest =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(120);
    let queue = |queued, deferred, oldest_queued_at| mailrelay_operator::crd::QueueSummary {
        queued,
        deferred,
        oldest_queued_at,
        ..Default::default()
    };
    metrics.set_relay_queue(
        "mail",
        "relay",
        &queue(
            10,
            3,
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(oldest)),
        ),
    );
    metrics.set_relay_queue("other", "gone", &queue(1, 0, None));
    metrics.forget_relay("other", "gone");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, metrics, async move {
        let _ = rx.await;
    }));

    let health = get(addr, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok"),
        "{health}"
    );
    let m = get(addr, "/metrics").await;
    assert!(m.contains("application/openmetrics-text"), "{m}");
    for line in [
        "mailrelay_operator_reconciles_total{controller=\"MailRelay\"} 1",
        "mailrelay_operator_reconcile_errors_total{controller=\"MailRelay\",error=\"kube\"} 1",
        "mailrelay_operator_status_patches_total{controller=\"SendQuota\"} 1",
        "mailrelay_operator_leader 1",
        "mailrelay_operator_reconcile_duration_seconds_count{controller=\"MailRelay\"} 1",
        // The per-relay queue gauges autoscalers read.
        "mailrelay_operator_relay_queue_messages{relay_namespace=\"mail\",relay=\"relay\"} 10",
        "mailrelay_operator_relay_queue_pending_messages{relay_namespace=\"mail\",relay=\"relay\"} 7",
    ] {
        assert!(m.contains(line), "missing {line}:\n{m}");
    }
    let age: f64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "mailrelay_operator_relay_queue_oldest_age_seconds{relay_namespace=\"mail\",relay=\"relay\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no oldest age:\n{m}"))
        .parse()
        .unwrap();
    assert!((120.0..180.0).contains(&age), "{age}");
    assert!(
        !m.contains("relay=\"gone\""),
        "a deleted relay's gauges go:\n{m}"
    );
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("stops on shutdown")
        .unwrap()
        .unwrap();
}
