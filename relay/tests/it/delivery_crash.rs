//! Duplicates after a crash are bounded by what was in flight: a relay delivering
//! to a slow real sink (aiosmtpd, tens of milliseconds per message) over 10 open
//! connections is killed with SIGKILL mid-delivery, a fresh relay on the same queue
//! finishes the work, and the sink counts every Message-ID it received.
//!
//! Outcomes are written per message, at most `outcome_batch.max_messages` unwritten
//! at a time, so the copies sent twice are at most one per open connection (its
//! reply not yet read) plus that batch. Writing outcomes when a connection ends
//! instead resends everything the open connections had delivered: here that is
//! every message delivered before the kill, several times the bound.

use crate::support;

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use support::deliver::{api_stats, metric};
use support::mx::{Mx, content};
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions, SmtpConn, code};

const MESSAGES: usize = 400;
const CONNECTIONS: usize = 10;
const BATCH: usize = 8;
/// Messages the sink must have before the kill: far above the bound, so the test
/// would fail if outcomes waited for connections to end.
const KILL_AFTER: usize = 100;

/// A relay that delivers everything to `sink` over up to [`CONNECTIONS`] connections
/// of 20 messages, with a 3 s lease (so a successor takes a dead relay's mail soon),
/// delivery off until [`enable_delivery`].
fn relay(sink: &Mx, redis_url: Option<String>) -> Relay {
    Relay::start(RelayOptions {
        redis_url,
        extra_yaml: format!(
            "delivery:\n  enabled: false\n  \
             smarthost: {{host: 127.0.0.1, port: {}, tls: disabled}}\n  \
             max_concurrency: {CONNECTIONS}\n  per_destination_concurrency: {CONNECTIONS}\n  \
             max_messages_per_connection: 20\n  lease: 3s\n  poll_interval: 100ms\n  \
             retry: {{first: 1s, max_backoff: 2s, jitter: 0.0}}\n  \
             outcome_batch: {{max_messages: {BATCH}, max_delay: 50ms}}\n",
            sink.port
        ),
        ..RelayOptions::default()
    })
}

fn enable_delivery(relay: &Relay) {
    let cfg = std::fs::read_to_string(&relay.config_path).unwrap();
    let on = cfg.replace("  enabled: false\n", "  enabled: true\n");
    assert_ne!(cfg, on);
    std::fs::write(&relay.config_path, on).unwrap();
}

/// Queues `n` messages (Message-ID `<crash-N@test>`) over 4 SMTP sessions.
fn inject(relay: &Relay, n: usize) {
    let sessions = 4;
    thread::scope(|s| {
        for k in 0..sessions {
            s.spawn(move || {
                let mut c = SmtpConn::connect(relay.smtp);
                assert_eq!(code(&c.cmd("EHLO client.test")), 250);
                for i in (k..n).step_by(sessions) {
                    assert_eq!(code(&c.cmd("MAIL FROM:<sender@client.test>")), 250);
                    assert_eq!(code(&c.cmd("RCPT TO:<someone@dest.test>")), 250);
                    assert_eq!(code(&c.cmd("DATA")), 354);
                    c.send(
                        format!(
                            "Message-ID: <crash-{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n.\r\n"
                        )
                        .as_bytes(),
                    );
                    let r = c.reply();
                    assert_eq!(code(&r), 250, "message {i}: {r}");
                }
                c.cmd("QUIT");
            });
        }
    });
}

/// Copies received per Message-ID.
fn copies(sink: &Mx) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for rec in sink.records() {
        let text = String::from_utf8_lossy(&content(&rec)).into_owned();
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .unwrap_or_else(|| panic!("no Message-ID in {text}"))
            .trim()
            .to_owned();
        *out.entry(id).or_default() += 1;
    }
    out
}

fn wait(what: &str, relay: &Relay, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nrelay log:\n{}",
            relay.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn kill_mid_delivery(redis_url: Option<String>) {
    // 30 ms before each DATA reply: ~330 messages/s over 10 connections.
    let sink = Mx::start(json!({"sleep": 0.03}));
    let mut relay = relay(&sink, redis_url);
    inject(&relay, MESSAGES);
    assert_eq!(relay.stop().code(), Some(0));
    assert!(sink.records().is_empty());

    enable_delivery(&relay);
    relay.restart();
    wait(
        "deliveries before the kill",
        &relay,
        Duration::from_secs(60),
        || sink.records().len() >= KILL_AFTER,
    );
    let open = sink.stats()["active"].as_u64().unwrap();
    relay.kill(); // SIGKILL
    let before_kill = sink.records().len();
    assert!(
        open >= CONNECTIONS as u64 - 2,
        "expected about {CONNECTIONS} open connections at the kill, saw {open}"
    );
    assert!(
        before_kill < MESSAGES,
        "the kill came too late: {before_kill}"
    );

    // A fresh relay on the same queue finishes the work.
    relay.restart();
    wait(
        "the queue to drain",
        &relay,
        Duration::from_secs(90),
        || copies(&sink).len() == MESSAGES && api_stats(&relay)["messages"] == 0,
    );
    let flushes = metric(
        &relay,
        "mailrelay_delivery_outcome_flushes_total{trigger=\"size\"}",
    )
    .unwrap_or(0.0)
        + metric(
            &relay,
            "mailrelay_delivery_outcome_flushes_total{trigger=\"interval\"}",
        )
        .unwrap_or(0.0);
    assert!(flushes > 0.0, "outcome batches are counted");
    assert_eq!(relay.stop().code(), Some(0));

    let copies = copies(&sink);
    let missing: Vec<String> = (0..MESSAGES)
        .map(|i| format!("<crash-{i}@test>"))
        .filter(|id| !copies.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert_eq!(copies.len(), MESSAGES, "unexpected Message-IDs");
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    // One message per open connection may have been delivered with its reply
    // unread; at most BATCH outcomes were waiting to be written.
    let bound = CONNECTIONS + BATCH;
    eprintln!(
        "delivered before the kill: {before_kill}, open connections: {open}, \
         duplicates: {duplicates} (bound {bound})"
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates after one kill, bound {bound}; {before_kill} were delivered before it"
    );
}

#[test]
fn kill_9_mid_delivery_redis_resends_only_what_was_in_flight() {
    let redis = RedisServer::start();
    kill_mid_delivery(Some(redis.url()));
}

#[test]
fn kill_9_mid_delivery_embedded_resends_only_what_was_in_flight() {
    kill_mid_delivery(None);
}
