//! Delivery events on both queue backends: written durably (they survive a
//! kill -9 of the relay, and a webhook that could not take them before the kill
//! gets them after the restart), and found again with `mailrelay events` by
//! Message-ID and by recipient.

use crate::support;

use std::process::Command;

use serde_json::{Value, json};
use support::deliver::{swaks, wait_until};
use support::mx::Mx;
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions, binary};
use support::webhook::Receiver;

fn events_cli(relay: &Relay, args: &[&str]) -> Result<String, String> {
    let out = Command::new(binary())
        .arg("events")
        .arg("--admin")
        .arg(format!("http://{}", relay.admin))
        .args(args)
        .env_remove("MAILRELAY_ADMIN")
        .output()
        .expect("run mailrelay events");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8(out.stderr).unwrap())
    }
}

fn events_json(relay: &Relay, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let text = events_cli(relay, &a).unwrap_or_else(|e| panic!("mailrelay events {args:?}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap();
    v["events"].as_array().unwrap().clone()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap()).collect()
}

fn survive_kill_and_are_found(redis: Option<&RedisServer>) {
    let sink = Mx::start(json!({}));
    let hook = Receiver::start(0);
    hook.set_failing(true);
    let mut relay = Relay::start(RelayOptions {
        redis_url: redis.map(RedisServer::url),
        extra_yaml: format!(
            "delivery:\n  smarthost: {{host: 127.0.0.1, port: {}, tls: disabled}}\n  \
             poll_interval: 100ms\n  retry: {{first: 1s, max_backoff: 2s, jitter: 0.0}}\n\
             webhooks:\n{}",
            sink.port,
            hook.config("ops", "{all: true}")
        ),
        ..RelayOptions::default()
    });
    let body = "Message-ID: <where-is-it@shop.test>\r\nSubject: order\r\n\r\nhi\r\n";
    let id = swaks(
        &relay,
        "orders@shop.test",
        &["user@example.net", "rcpt550@example.net"],
        Some(body),
    );
    let other = swaks(&relay, "orders@shop.test", &["someone@example.org"], None);
    let id = id.to_string();
    // accepted, delivered (user@), bounced (rcpt550@), dsn_sent; and the other
    // message's accepted and delivered.
    let before = wait_until("the events of both messages", &relay, || {
        let all = events_json(&relay, &["--limit", "1000"]);
        let mine: Vec<_> = all
            .iter()
            .filter(|e| e["queue_id"] == id.as_str())
            .cloned()
            .collect();
        let k = kinds(&mine);
        (["accepted", "delivered", "bounced", "dsn_sent"]
            .iter()
            .all(|w| k.contains(w))
            && all
                .iter()
                .filter(|e| e["queue_id"] == other.to_string().as_str())
                .count()
                >= 2)
            .then_some(all)
    });
    assert!(
        hook.delivered().is_empty(),
        "the endpoint refused everything so far"
    );

    // kill -9: the events are in the store, and the webhook's cursor still has
    // them all pending.
    relay.kill();
    hook.set_failing(false);
    relay.restart();
    let after = events_json(&relay, &["--limit", "1000"]);
    for e in &before {
        assert!(
            after.iter().any(|a| a["id"] == e["id"]),
            "event lost in the kill: {e:#}"
        );
    }
    let pushed = hook.wait_for(
        "the events held back before the kill",
        || relay.log(),
        |d| {
            before.iter().all(|e| {
                d.iter()
                    .any(|p| p["id"] == e["id"] && p["data"]["kind"] == e["kind"])
            })
        },
    );
    assert!(pushed.len() >= before.len());

    // Found by Message-ID (with or without brackets) and by recipient.
    let by_mid = events_json(&relay, &["--message-id", "<where-is-it@shop.test>"]);
    assert!(
        by_mid.iter().all(|e| e["queue_id"] == id.as_str()),
        "{by_mid:#?}"
    );
    assert_eq!(kinds(&by_mid)[0], "accepted");
    let by_to = events_json(&relay, &["--to", "USER@example.net", "--since", "1h"]);
    assert_eq!(kinds(&by_to), ["delivered"], "{by_to:#?}");
    assert_eq!(by_to[0]["message_id"], "where-is-it@shop.test");
    assert!(by_to[0]["reply"].as_str().unwrap().starts_with("250"));
    let bounced = events_json(&relay, &["--kind", "bounced", "--from", "orders@shop.test"]);
    assert_eq!(bounced.len(), 1);
    assert_eq!(bounced[0]["recipient"], "rcpt550@example.net");
    assert!(bounced[0]["reply"].as_str().unwrap().starts_with("550"));
    let text = events_cli(&relay, &["--queue-id", &id]).unwrap();
    assert!(
        text.contains("delivered") && text.contains("<orders@shop.test> -> user@example.net"),
        "{text}"
    );
    assert!(
        text.contains("message-id=<where-is-it@shop.test>"),
        "{text}"
    );
    // Nothing yet in the future.
    let none = events_json(&relay, &["--since", "4102444800000"]);
    assert!(none.is_empty());

    // Oversized and unknown filters are refused, naming the field.
    let e = events_cli(&relay, &["--limit", "5000"]).unwrap_err();
    assert!(e.contains("--limit"), "{e}");
    let e = events_cli(&relay, &["--kind", "sent"]).unwrap_err();
    assert!(
        e.contains("--kind") && e.contains("unknown event kind"),
        "{e}"
    );
    let e = events_cli(&relay, &["--since", "yesterday"]).unwrap_err();
    assert!(e.contains("--since"), "{e}");
    let (status, body) = relay.admin_get(&format!("/api/v1/events?to={}", "x".repeat(1200)));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("to: 1200 bytes is longer than 998"), "{body}");
}

#[test]
fn events_survive_kill_and_are_found_embedded() {
    survive_kill_and_are_found(None);
}

#[test]
fn events_survive_kill_and_are_found_redis() {
    let redis = RedisServer::start();
    survive_kill_and_are_found(Some(&redis));
}

/// `accepted` is written in the same write as the message: a kill -9 right after
/// the `250` (with a batch delay long enough that a batched event would surely
/// still be in memory) leaves it in the store.
fn accepted_survives_a_kill_right_after_the_250(redis: Option<&RedisServer>) {
    let mut relay = Relay::start(RelayOptions {
        redis_url: redis.map(RedisServer::url),
        extra_yaml: "events: {batch_delay: 10s}\ndelivery: {enabled: false}\n".into(),
        ..RelayOptions::default()
    });
    let mut c = relay.connect();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<orders@shop.test>");
    c.cmd("RCPT TO:<user@example.net>");
    c.cmd("DATA");
    c.send(b"Message-ID: <killed-at-once@shop.test>\r\nSubject: x\r\n\r\nx\r\n.\r\n");
    let r = c.reply();
    relay.kill();
    assert!(r.starts_with("250"), "{r}");
    let id = r
        .split("queued as ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no queue id in {r}"))
        .to_owned();
    relay.restart();
    let found = events_json(&relay, &["--queue-id", &id]);
    assert_eq!(kinds(&found), ["accepted"], "{found:#?}\n{}", relay.log());
    assert_eq!(found[0]["message_id"], "killed-at-once@shop.test");
    assert_eq!(found[0]["sender"], "orders@shop.test");
}

#[test]
fn accepted_survives_a_kill_right_after_the_250_embedded() {
    accepted_survives_a_kill_right_after_the_250(None);
}

#[test]
fn accepted_survives_a_kill_right_after_the_250_redis() {
    let redis = RedisServer::start();
    accepted_survives_a_kill_right_after_the_250(Some(&redis));
}
