//! Webhooks end to end, on both queue backends: a relay delivers mail to a real
//! SMTP sink and pushes the events to real HTTPS receivers (Python, certificate
//! from a test CA), which check every signature themselves.

use crate::support;

use std::collections::HashMap;

use serde_json::{Value, json};
use support::deliver::{metric, swaks, wait_until};
use support::mx::Mx;
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions};
use support::webhook::Receiver;

fn relay(sink: &Mx, redis_url: Option<String>, webhooks: &str) -> Relay {
    Relay::start(RelayOptions {
        redis_url,
        extra_yaml: format!(
            "delivery:\n  smarthost: {{host: 127.0.0.1, port: {}, tls: disabled}}\n  \
             poll_interval: 100ms\n  retry: {{first: 1s, max_backoff: 2s, jitter: 0.0}}\n\
             events: {{batch_delay: 10ms}}\nwebhooks:\n{webhooks}",
            sink.port
        ),
        ..RelayOptions::default()
    })
}

fn kind(e: &Value) -> &str {
    e["type"].as_str().unwrap()
}

fn data<'a>(e: &'a Value, field: &str) -> &'a str {
    e["data"][field].as_str().unwrap_or("")
}

/// Tenant A's endpoint fails its first three requests; tenant B's answers at once.
/// Each gets every event of its own tenant (accepted and delivered of each
/// message, accepted first), signed over the whole body, and nothing of the other
/// tenant's. A takes batches (the default), B one event per POST (`max_events: 1`):
/// both see the same events.
fn tenants_get_their_events_signed_and_retried(redis: Option<&RedisServer>) {
    let sink = Mx::start(json!({}));
    let a = Receiver::start(3);
    let b = Receiver::start(0);
    let hooks = a.config("tenant-a", "{sender_domains: [a.test]}")
        + &b.config_with(
            "tenant-b",
            "{sender_domains: [B.TEST]}",
            "    batch: {max_events: 1}\n",
        );
    let relay = relay(&sink, redis.map(RedisServer::url), &hooks);
    let mut ids: HashMap<&str, Vec<String>> = HashMap::new();
    for i in 0..4 {
        let data = format!("Message-ID: <a-{i}@a.test>\r\nSubject: a\r\n\r\nbody\r\n");
        ids.entry("a")
            .or_default()
            .push(swaks(&relay, "x@a.test", &["rcpt@dest.test"], Some(&data)).to_string());
        let data = format!("Message-ID: <b-{i}@b.test>\r\nSubject: b\r\n\r\nbody\r\n");
        ids.entry("b")
            .or_default()
            .push(swaks(&relay, "y@b.test", &["rcpt@dest.test"], Some(&data)).to_string());
    }
    for (recv, tenant, domain) in [(&a, "a", "a.test"), (&b, "b", "b.test")] {
        let want = &ids[tenant];
        let got = recv.wait_for(
            &format!("accepted and delivered events of tenant {tenant}"),
            || relay.log(),
            |d| {
                want.iter().all(|q| {
                    ["io.mailrelay.accepted", "io.mailrelay.delivered"]
                        .iter()
                        .all(|k| d.iter().any(|e| kind(e) == *k && data(e, "queue_id") == q))
                })
            },
        );
        for e in &got {
            assert_eq!(e["specversion"], "1.0");
            assert_eq!(e["source"], "mailrelay://relay.test");
            assert_eq!(
                data(e, "sender").rsplit('@').next().unwrap(),
                domain,
                "another tenant's event reached {tenant}: {e:#}"
            );
            assert_eq!(e["subject"], e["data"]["queue_id"]);
        }
        // In order per message: accepted before delivered.
        for q in want {
            let pos = |k: &str| {
                got.iter()
                    .position(|e| kind(e) == k && data(e, "queue_id") == q)
                    .unwrap()
            };
            assert!(pos("io.mailrelay.accepted") < pos("io.mailrelay.delivered"));
            let delivered = &got[pos("io.mailrelay.delivered")];
            assert_eq!(data(delivered, "recipient"), "rcpt@dest.test");
            assert!(data(delivered, "reply").starts_with("250"), "{delivered:#}");
            assert!(data(delivered, "message_id").starts_with(&format!("{tenant}-")));
        }
        let reqs = recv.requests();
        assert!(
            reqs.iter().all(|r| r["sig_ok"] == true),
            "a signature did not verify: {reqs:#?}"
        );
        assert!(
            reqs.iter().all(|r| r["shape_ok"] == true),
            "a body or webhook-id was not what its content type says: {reqs:#?}"
        );
        let want_type = if tenant == "a" {
            "application/cloudevents-batch+json"
        } else {
            "application/cloudevents+json"
        };
        assert!(
            reqs.iter().all(|r| r["content_type"] == want_type),
            "{reqs:#?}"
        );
    }
    // A's first three answers were 500: the same POST (same events, same
    // webhook-id) came again until a 200.
    let reqs = a.requests();
    assert_eq!(
        reqs.iter().filter(|r| r["status"] == 500).count(),
        3,
        "{reqs:#?}"
    );
    let first = reqs[0]["id"].clone();
    assert!(
        reqs[..4].iter().all(|r| r["id"] == first),
        "retries must repeat the same event before any later one: {reqs:#?}"
    );
    assert_eq!(reqs[3]["status"], 200);
    assert!(b.requests().iter().all(|r| r["status"] == 200));
    let failed = metric(
        &relay,
        "mailrelay_webhook_posts_total{endpoint=\"tenant-a\",result=\"failed\"}",
    );
    assert_eq!(failed, Some(3.0));
}

#[test]
fn tenants_get_their_events_signed_and_retried_embedded() {
    tenants_get_their_events_signed_and_retried(None);
}

#[test]
fn tenants_get_their_events_signed_and_retried_redis() {
    let redis = RedisServer::start();
    tenants_get_their_events_signed_and_retried(Some(&redis));
}

/// A dead endpoint (every answer `500`) beside a live one: all mail is delivered
/// and the live endpoint gets every event, while the dead one's failures and
/// pending events grow and none of its events is lost (they are still pending).
fn a_dead_endpoint_slows_nothing(redis: Option<&RedisServer>) {
    const MESSAGES: usize = 20;
    let sink = Mx::start(json!({}));
    let dead = Receiver::start(0);
    dead.set_failing(true);
    let live = Receiver::start(0);
    let hooks = dead.config("dead", "{all: true}") + &live.config("live", "{all: true}");
    let relay = relay(&sink, redis.map(RedisServer::url), &hooks);
    for i in 0..MESSAGES {
        let data = format!("Message-ID: <m-{i}@t.test>\r\n\r\nbody\r\n");
        swaks(&relay, "s@t.test", &["r@dest.test"], Some(&data));
    }
    sink.wait_for("every message", || relay.log(), |r| r.len() == MESSAGES);
    live.wait_for(
        "every event at the live endpoint",
        || relay.log(),
        |d| d.len() == 2 * MESSAGES,
    );
    let delivered = metric(
        &relay,
        "mailrelay_delivery_recipients_total{result=\"delivered\",reason=\"ok\"}",
    );
    assert_eq!(delivered, Some(MESSAGES as f64));
    // The dead endpoint is still on its first event: retried, never skipped.
    let failures = wait_until("the dead endpoint to be retried", &relay, || {
        let n = metric(
            &relay,
            "mailrelay_webhook_posts_total{endpoint=\"dead\",result=\"failed\"}",
        )?;
        (n >= 3.0).then_some(n)
    });
    assert!(failures >= 3.0);
    let reqs = dead.requests();
    assert!(reqs.iter().all(|r| r["status"] == 500));
    assert!(
        reqs.iter().all(|r| r["id"] == reqs[0]["id"]),
        "the dead endpoint must not move past its first event"
    );
    let pending = metric(
        &relay,
        "mailrelay_webhook_pending_events{endpoint=\"dead\"}",
    )
    .unwrap();
    assert!(pending >= 1.0, "{pending}");
    assert_eq!(
        metric(
            &relay,
            "mailrelay_webhook_events_delivered_total{endpoint=\"dead\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
    // Once it answers again, it gets all of them; the backlog in batches (its
    // first POST held a few events, the other ~37 were waiting behind it).
    dead.set_failing(false);
    dead.wait_for(
        "the revived endpoint's backlog",
        || relay.log(),
        |d| d.len() == 2 * MESSAGES,
    );
    let ok: Vec<_> = dead
        .requests()
        .into_iter()
        .filter(|r| r["status"] == 200)
        .collect();
    assert!(
        ok.len() < MESSAGES,
        "{} POSTs for {} events: the backlog was not batched",
        ok.len(),
        2 * MESSAGES
    );
    assert!(
        ok.iter()
            .all(|r| r["sig_ok"] == true && r["shape_ok"] == true)
    );
}

#[test]
fn a_dead_endpoint_slows_nothing_embedded() {
    a_dead_endpoint_slows_nothing(None);
}

#[test]
fn a_dead_endpoint_slows_nothing_redis() {
    let redis = RedisServer::start();
    a_dead_endpoint_slows_nothing(Some(&redis));
}
