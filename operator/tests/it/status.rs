//! MailRelay status computed by the reconciler from a real Redis that a real
//! `mailrelay` process filled: mail delivered, bounced and deferred through a
//! scripted smarthost (aiosmtpd).

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailrelay::config::RelayConfig;
use mailrelay_operator::crd::MailRelay;
use mailrelay_operator::reconcile::{Context, Settings, relay};
use mailrelay_operator::telemetry::Metrics;
use serde_json::{Value, json};
use support::fake_api::FakeApi;
use support::redis::RedisServer;
use support::relay::{RelayProcess, localise};
use support::smtp::{Sink, smtplib_null_sender, swaks};

const RELAY: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/mailrelays/relay";
const CONFIG_MAP: &str = "/api/v1/namespaces/mail/configmaps/relay-config";

async fn reconcile(api: &FakeApi, ctx: &Arc<Context>) -> Value {
    let obj: MailRelay = serde_json::from_value(api.get(RELAY).unwrap()).unwrap();
    relay::reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    api.get(RELAY).unwrap()["status"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_what_a_real_relay_queued_delivered_and_bounced() {
    let redis = RedisServer::start();
    let sink = Sink::start();
    let api = FakeApi::start();
    api.set_deployment_status(
        json!({"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}),
    );
    api.put(
        RELAY,
        json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
               "metadata": {"name": "relay", "namespace": "mail"},
               "spec": {"replicas": 1, "hostname": "relay.example.com",
                        "relayNetworks": ["127.0.0.0/8"],
                        "redis": {"url": redis.url(), "keyPrefix": "status"},
                        "delivery": {"smarthost": {"host": "127.0.0.1", "port": sink.addr.port(), "tls": "disabled"}}}}),
    );
    let ctx = Context::new(
        api.client.clone(),
        Settings::default(),
        Arc::new(Metrics::new()),
    );
    let first = reconcile(&api, &ctx).await;
    assert_eq!(first["queue"]["queued"], 0);

    // The relay runs with exactly the rendered config, moved to local ports.
    let yaml = api.get(CONFIG_MAP).unwrap()["data"]["mailrelay.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut cfg = RelayConfig::from_yaml(&yaml).unwrap();
    let (smtp, admin) = localise(&mut cfg, None);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailrelay.yaml");
    std::fs::write(&path, serde_norway::to_string(&cfg).unwrap()).unwrap();
    let relay = RelayProcess::start(&path, smtp[0], admin, &[], dir.path().join("relay.log"));

    swaks(relay.smtp, "app@example.com", "ok@dest.example", &[]);
    // The null sender, so the bounce produces no DSN (which would be delivered too).
    smtplib_null_sender(relay.smtp, "rcpt550@dest.example");
    swaks(relay.smtp, "app@example.com", "rcpt451@slow.example", &[]);

    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        let st = reconcile(&api, &ctx).await;
        if st["delivery"]["delivered"] == 1
            && st["delivery"]["bounced"] == 1
            && st["queue"]["deferred"] == 1
            && st["queue"]["inFlight"] == 0
        {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed 1 delivered, 1 bounced, 1 deferred: {st:#}\nrelay log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(sink.received(), 1);
    assert_eq!(status["queue"]["queued"], 1, "{status:#}");
    assert!(status["queue"]["bytes"].as_u64().unwrap() > 0);
    assert!(status["queue"]["oldestQueuedAt"].is_string());
    assert_eq!(status["delivery"]["expired"], 0);
    let top = &status["topDeferred"][0];
    assert_eq!(top["destination"], "slow.example", "{status:#}");
    assert_eq!(top["recipients"], 1);
    assert!(top["lastError"].as_str().unwrap().contains("451"), "{top}");
    assert!(top["lastAttemptAt"].is_string());
    assert_eq!(status["topDeferred"].as_array().unwrap().len(), 1);
}
