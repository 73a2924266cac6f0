//! Lease renewal with real parts: `mailrelay serve` processes on a real
//! `redis-server`, a slow real sink (aiosmtpd, `support::mx`) and a short
//! `delivery.lease`, so that every message is held longer than one lease and only
//! renewal keeps it. While renewal keeps up, two relays deliver every message exactly
//! once and neither says a lease was lost, though outcomes written while a renewal
//! is on its way end leases under it; a lease really taken by another owner is
//! still reported, by the renewal, while its message waits.

use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mailrelay::queue::{Ingest, Inspect, QueuedMessage, RedisQueue};
use support::deliver::relay_with;
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::mx::{Mx, rcpts};
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions};

/// The relays' queue key prefix (`support::relay`).
const PREFIX: &str = "mrtest";

fn message(i: usize) -> QueuedMessage {
    support::message::queued(
        "alice@sender.test",
        &format!("m{i}@a.test"),
        "relay.test",
        format!("Message-ID: <renew-{i}@client.test>\r\nSubject: {i}\r\n\r\nhello\r\n"),
    )
}

/// Queues `n` messages for a.test straight into Redis; returns their ids in order.
fn enqueue(redis: &RedisServer, n: usize) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let q = RedisQueue::connect(&redis.config(PREFIX)).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let m = message(i);
            q.enqueue(&m).await.unwrap();
            ids.push(m.envelope.id.to_string());
        }
        ids
    })
}

/// The Redis hash that holds a leased message's lease token (one hash per queue
/// shard, field = queue id), once the message is leased.
fn lease_hash(con: &mut redis::Connection, id: &str) -> Option<String> {
    mailrelay::queue::redis::shard_prefixes(PREFIX)
        .into_iter()
        .map(|base| format!("{base}lease"))
        .find(|key| {
            redis::cmd("HEXISTS")
                .arg(key)
                .arg(id)
                .query::<i64>(con)
                .unwrap()
                == 1
        })
}

/// Messages still queued, as the queue counts them.
fn queued(redis: &RedisServer) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let q = RedisQueue::connect(&redis.config(PREFIX)).await.unwrap();
        q.stats().await.unwrap().messages
    })
}

fn lost_lease_lines(relay: &Relay) -> Vec<String> {
    relay
        .log()
        .lines()
        .filter(|l| l.contains("lease lost"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn renewal_keeps_slow_deliveries_and_reports_no_lease_lost() {
    const MESSAGES: usize = 64;
    let redis = RedisServer::start();
    let dns = Dnsmasq::start(&[
        Record::mx("a.test", 10, "mx.a.test"),
        Record::host("mx.a.test", &["127.0.0.2"]),
    ]);
    let port = free_ports(1)[0];
    // 0.4 s per message, 8 messages per connection: a connection's batch is held
    // 3.2 s, longer than the 3 s lease, so each message lives on renewals alone.
    let sink = Mx::plain("127.0.0.2", port, 0.4);
    enqueue(&redis, MESSAGES);
    // Outcomes wait up to 0.9 s for their batch: most renewals run while some
    // held message's outcome is on its way (or just written).
    let extra = "  lease: 3s\n  per_destination_concurrency: 2\n  \
                 max_messages_per_connection: 8\n  \
                 outcome_batch: {max_messages: 32, max_delay: 900ms}\n";
    let opts = RelayOptions {
        redis_url: Some(redis.url()),
        ..RelayOptions::default()
    };
    let a = relay_with(&dns, port, extra, opts.clone());
    let b = relay_with(&dns, port, extra, opts);
    let recs = sink.wait_for(
        "every message",
        || format!("A:\n{}\nB:\n{}", a.log(), b.log()),
        |r| r.len() >= MESSAGES,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while queued(&redis) > 0 {
        assert!(Instant::now() < deadline, "messages still queued");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A lease that ran out would let the other relay send its message again.
    std::thread::sleep(Duration::from_secs(1));
    let recs = sink.records().len().max(recs.len());
    let mut per_rcpt: HashMap<String, usize> = HashMap::new();
    for r in sink.records() {
        for rc in rcpts(&r) {
            *per_rcpt.entry(rc).or_default() += 1;
        }
    }
    let twice: Vec<_> = per_rcpt.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!((recs, per_rcpt.len()), (MESSAGES, MESSAGES));
    for (name, r) in [("A", &a), ("B", &b)] {
        let lines = lost_lease_lines(r);
        assert!(
            lines.is_empty(),
            "relay {name} reported leases lost: {lines:#?}"
        );
    }
}

#[test]
fn a_lease_taken_by_another_owner_is_reported_lost_by_the_renewal() {
    const MESSAGES: usize = 5;
    let redis = RedisServer::start();
    let dns = Dnsmasq::start(&[
        Record::mx("a.test", 10, "mx.a.test"),
        Record::host("mx.a.test", &["127.0.0.2"]),
    ]);
    let port = free_ports(1)[0];
    // One connection, 1.5 s per message: the last one waits about 6 s.
    let sink = Mx::plain("127.0.0.2", port, 1.5);
    let ids = enqueue(&redis, MESSAGES);
    let relay = relay_with(
        &dns,
        port,
        "  lease: 3s\n  per_destination_concurrency: 1\n  max_messages_per_connection: 5\n",
        RelayOptions {
            redis_url: Some(redis.url()),
            ..RelayOptions::default()
        },
    );
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    // Once the relay holds every message, another owner takes the one queued last
    // (what a relay that found the lease run out would do).
    let victim = ids.last().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let key = loop {
        if let Some(k) = lease_hash(&mut con, victim) {
            break k;
        }
        assert!(Instant::now() < deadline, "message {victim} never leased");
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        let token: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg(victim)
            .query(&mut con)
            .unwrap();
        if token.is_some_and(|t| t.starts_with("relay.test:")) {
            break;
        }
        assert!(Instant::now() < deadline, "never leased:\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(victim)
        .arg("other.test:1#x")
        .query(&mut con)
        .unwrap();
    let taken_at = Instant::now();
    // The next renewal (a third of the lease apart) finds it, while its message
    // still waits behind the others on the one connection.
    let line = loop {
        if let Some(l) = lost_lease_lines(&relay)
            .into_iter()
            .find(|l| l.contains(victim.as_str()))
        {
            break l;
        }
        assert!(
            taken_at.elapsed() < Duration::from_secs(4),
            "no lost lease reported for {victim}:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        line.contains("lease lost while delivering") && line.contains("taken or removed"),
        "{line}"
    );
    let delivered: Vec<String> = sink.records().iter().flat_map(rcpts).collect();
    assert!(
        !delivered.contains(&format!("m{}@a.test", MESSAGES - 1)),
        "reported only after its delivery: {delivered:?}"
    );
    // No other lease was reported lost.
    let others: Vec<String> = lost_lease_lines(&relay)
        .into_iter()
        .filter(|l| !l.contains(victim.as_str()))
        .collect();
    assert!(others.is_empty(), "{others:#?}");
}
