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

/// The Redis consumer reads the stream from its group's cursor and moves the
/// cursor once per batch. A relay killed with -9 and started again resumes from
/// there: no event lost, each message's events in order. An event an older relay
/// read with `XREADGROUP` and never acknowledged (it died) goes out first, then
/// the rest from the cursor, and the group ends with nothing pending and its
/// cursor on the newest event (so an older relay taking over would go on from
/// there).
#[test]
fn a_restarted_consumer_resumes_in_order_and_finishes_an_old_pods_pending_event() {
    let redis = RedisServer::start();
    let sink = Mx::start(json!({}));
    let hook = Receiver::start(0);
    let mut relay = relay(&sink, Some(redis.url()), &hook.config("ops", "{all: true}"));
    let send = |relay: &Relay, i: usize| {
        let data = format!("Message-ID: <r-{i}@t.test>\r\n\r\nbody\r\n");
        swaks(relay, "s@t.test", &["r@dest.test"], Some(&data)).to_string()
    };
    let mut queued: Vec<String> = (0..3).map(|i| send(&relay, i)).collect();
    let before = hook.wait_for(
        "the first messages' events",
        || relay.log(),
        |d| d.len() == 6,
    );

    relay.kill();
    let key = redis.cli(&["KEYS", "*:events"]).unwrap();
    let key = key.lines().next().expect("the events stream").to_owned();
    // Two events written while no relay runs: the first read (and left pending)
    // by an older relay's consumer "old-pod", the second not read at all.
    let template = before[0]["data"].clone();
    let event = |queue_id: &str| {
        let mut e = template.clone();
        let o = e.as_object_mut().unwrap();
        o.remove("id");
        o.insert("queue_id".into(), json!(queue_id));
        serde_json::to_string(&e).unwrap()
    };
    redis
        .cli(&["XADD", &key, "*", "e", &event("OLD-PENDING")])
        .unwrap();
    let read = redis
        .cli(&[
            "XREADGROUP",
            "GROUP",
            "hook:ops",
            "old-pod",
            "COUNT",
            "10",
            "STREAMS",
            &key,
            ">",
        ])
        .unwrap();
    assert!(read.contains("OLD-PENDING"), "{read}");
    redis
        .cli(&["XADD", &key, "*", "e", &event("UNREAD")])
        .unwrap();

    relay.restart();
    queued.extend((3..5).map(|i| send(&relay, i)));
    let got = hook.wait_for(
        "the pending event, the unread one and the new messages' events",
        || relay.log(),
        |d| d.len() == 6 + 2 + 4,
    );
    for e in &before {
        assert!(got.iter().any(|g| g["id"] == e["id"]), "lost: {e:#}");
    }
    let pos = |pred: &dyn Fn(&Value) -> bool| got.iter().position(pred).unwrap();
    let pending = pos(&|e| data(e, "queue_id") == "OLD-PENDING");
    let unread = pos(&|e| data(e, "queue_id") == "UNREAD");
    assert!(pending < unread, "{got:#?}");
    for q in &queued {
        let at = |k: &str| pos(&|e| kind(e) == k && data(e, "queue_id") == q);
        assert!(at("io.mailrelay.accepted") < at("io.mailrelay.delivered"));
    }
    for q in &queued[3..] {
        let accepted = pos(&|e| kind(e) == "io.mailrelay.accepted" && data(e, "queue_id") == q);
        assert!(unread < accepted, "{got:#?}");
    }
    assert!(hook.requests().iter().all(|r| r["sig_ok"] == true));

    // Nothing left pending, and the group's cursor on the newest event.
    let newest = redis
        .cli(&["XREVRANGE", &key, "+", "-", "COUNT", "1"])
        .unwrap();
    let newest = newest.lines().next().unwrap().to_owned();
    wait_until("the group's cursor on the newest event", &relay, || {
        let pending = redis.cli(&["XPENDING", &key, "hook:ops"]).ok()?;
        let groups = redis.cli(&["XINFO", "GROUPS", &key]).ok()?;
        (pending.lines().next() == Some("0") && groups.contains(&newest)).then_some(())
    });
}
