//! Leases under failure, with real parts: three `mailrelay serve` processes on one
//! real `redis-server`, a backlog for one destination and a slow real sink
//! (aiosmtpd, `support::mx`). Each relay holds only what its connections to that
//! destination can send soon; the one killed with `kill -9` while holding mail loses
//! it to the other two within one lease time, and nothing is lost.

use crate::support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use mailrelay::queue::{Ingest, Inspect, QueuedMessage, RedisQueue};
use support::deliver::relay_with;
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::mx::{Mx, distinct_rcpts};
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions};

/// The relays' queue key prefix (`support::relay`).
const PREFIX: &str = "mrtest";
const MESSAGES: usize = 400;
/// `delivery.lease` of the relays under test: short, so the test is.
const LEASE: Duration = Duration::from_secs(3);
const PER_DESTINATION: usize = 2;
const PER_CONNECTION: usize = 20;
/// What one relay may hold for the one destination: a round of its connections.
const CAPACITY: usize = PER_DESTINATION * PER_CONNECTION;

fn message(i: usize) -> QueuedMessage {
    message_to(i, &format!("m{i}@a.test"))
}

fn message_to(i: usize, rcpt: &str) -> QueuedMessage {
    support::message::queued(
        "alice@sender.test",
        rcpt,
        "relay.test",
        format!("Message-ID: <lease-{i}@client.test>\r\nSubject: {i}\r\n\r\nhello\r\n"),
    )
}

/// Queued ids in flight, by the owner named in their lease token (`host:pid`), read
/// straight from Redis.
fn holders(con: &mut redis::Connection) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for base in mailrelay::queue::redis::shard_prefixes(PREFIX) {
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{base}leased"))
            .arg(0)
            .arg(-1)
            .query(con)
            .unwrap();
        if ids.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGET").arg(format!("{base}lease")).arg(id);
        }
        let tokens: Vec<Option<String>> = pipe.query(con).unwrap();
        for (id, token) in ids.into_iter().zip(tokens) {
            if let Some(owner) = token.as_deref().and_then(|t| t.split_once('#')) {
                out.entry(owner.0.to_owned()).or_default().push(id);
            }
        }
    }
    out
}

fn owner(relay: &Relay) -> String {
    format!("relay.test:{}", relay.pid())
}

/// How many messages each relay holds now; panics if one holds more than a lease
/// batch beyond its capacity (the moment between taking a batch and giving back what
/// does not fit is the only time it may hold more than `CAPACITY`).
fn sample(con: &mut redis::Connection, relays: &[&Relay], peak: &mut BTreeMap<String, usize>) {
    let now = holders(con);
    for r in relays {
        let o = owner(r);
        let held = now.get(&o).map_or(0, Vec::len);
        assert!(
            held <= 2 * CAPACITY,
            "{o} holds {held} messages for one destination whose {PER_DESTINATION} \
             connections take {CAPACITY} at a time"
        );
        let p = peak.entry(o).or_default();
        *p = (*p).max(held);
    }
}

#[test]
fn killed_relay_backlog_is_delivered_by_the_others_within_one_lease() {
    let redis = RedisServer::start();
    let dns = Dnsmasq::start(&[
        Record::mx("a.test", 10, "mx.a.test"),
        Record::host("mx.a.test", &["127.0.0.2"]),
    ]);
    let port = free_ports(1)[0];
    // 50 ms per message: a connection sends 20 a second, so the backlog lasts
    // seconds, and every relay holds mail while the test looks.
    let sink = Mx::plain("127.0.0.2", port, 0.05);

    let rcpt_of: HashMap<String, String> = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let q = RedisQueue::connect(&redis.config(PREFIX)).await.unwrap();
            let mut map = HashMap::new();
            for i in 0..MESSAGES {
                let m = message(i);
                q.enqueue(&m).await.unwrap();
                map.insert(
                    m.envelope.id.to_string(),
                    m.envelope.recipients[0].address.clone(),
                );
            }
            assert_eq!(q.stats().await.unwrap().messages, MESSAGES as u64);
            map
        })
    };

    let extra = format!(
        "  lease: {}s\n  per_destination_concurrency: {PER_DESTINATION}\n  \
         max_messages_per_connection: {PER_CONNECTION}\n",
        LEASE.as_secs()
    );
    let opts = RelayOptions {
        redis_url: Some(redis.url()),
        ..RelayOptions::default()
    };
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut peak = BTreeMap::new();

    // The first relay alone, with the whole backlog due: it takes a round's worth.
    let mut a = relay_with(&dns, port, &extra, opts.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.records().len() < 5 {
        sample(&mut con, &[&a], &mut peak);
        assert!(Instant::now() < deadline, "no delivery:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = relay_with(&dns, port, &extra, opts.clone());
    sample(&mut con, &[&a, &b], &mut peak);
    let c = relay_with(&dns, port, &extra, opts);
    let others = [&b, &c];

    // Kill the first relay while all three hold mail and a backlog is still due.
    let held_by_a = loop {
        let now = holders(&mut con);
        sample(&mut con, &[&a, &b, &c], &mut peak);
        let count = |r: &Relay| now.get(&owner(r)).map_or(0, Vec::len);
        if count(&a) > 0 && count(&b) > 0 && count(&c) > 0 {
            a.signal("KILL");
            break now[&owner(&a)].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the three relays never held mail at once: {now:?}\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let killed_at = Instant::now();
    a.wait(Duration::from_secs(10));
    let before = sink.records().len();
    assert!(
        before < MESSAGES - held_by_a.len(),
        "the backlog was gone before the kill ({before} delivered)"
    );
    let stranded: HashSet<&str> = held_by_a
        .iter()
        .map(|id| rcpt_of[id.as_str()].as_str())
        .collect();

    // Its leases run out within LEASE of its last heartbeat; the others then take
    // that mail at their next poll, behind what of the backlog is still due (about
    // 2 s of sending at the sink's pace): the margin covers that and a loaded host.
    let margin = Duration::from_secs(7);
    let recovered = loop {
        sample(&mut con, &others, &mut peak);
        let got: HashSet<String> = distinct_rcpts(&sink.records()).into_iter().collect();
        if stranded.iter().all(|r| got.contains(*r)) {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < LEASE + margin,
            "{} of the {} messages the killed relay held were not delivered within \
             {LEASE:?} + {margin:?}\nB:\n{}",
            stranded.iter().filter(|r| !got.contains(**r)).count(),
            stranded.len(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    // Nothing lost: every message arrives, and the queue empties.
    let recs = sink.wait_for(
        "every message",
        || c.log(),
        |r| distinct_rcpts(r).len() == MESSAGES,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: u64 = mailrelay::queue::redis::shard_prefixes(PREFIX)
            .iter()
            .flat_map(|base| [format!("{base}due"), format!("{base}leased")])
            .map(|key| redis::cmd("ZCARD").arg(key).query::<u64>(&mut con).unwrap())
            .sum();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} messages still queued");
        std::thread::sleep(Duration::from_millis(100));
    }
    for r in [&b, &c] {
        let p = peak.get(&owner(r)).copied().unwrap_or(0);
        assert!(p > 0, "{} never held mail", owner(r));
    }
    eprintln!(
        "killed relay held {} messages; all delivered {recovered:?} after the kill \
         (lease {LEASE:?}); {} deliveries for {MESSAGES} messages; peak held per relay: {peak:?}",
        stranded.len(),
        recs.len()
    );
}

/// A backlog for one busy destination does not hold back mail for another one queued
/// after it: what a relay gives back goes behind the mail already due, so the other
/// destination's message reaches the head of the queue within a few lease rounds,
/// long before the backlog is sent.
#[test]
fn a_busy_destination_does_not_hide_other_mail_behind_its_backlog() {
    const BACKLOG: usize = 100;
    let redis = RedisServer::start();
    let dns = Dnsmasq::start(&[
        Record::mx("a.test", 10, "mx.a.test"),
        Record::host("mx.a.test", &["127.0.0.2"]),
        Record::mx("b.test", 10, "mx.b.test"),
        Record::host("mx.b.test", &["127.0.0.3"]),
    ]);
    let port = free_ports(1)[0];
    // One connection to a.test at 5 messages a second: the backlog lasts 20 s.
    let slow = Mx::plain("127.0.0.2", port, 0.2);
    let fast = Mx::plain("127.0.0.3", port, 0.0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let q = RedisQueue::connect(&redis.config(PREFIX)).await.unwrap();
        for i in 0..BACKLOG {
            q.enqueue(&message(i)).await.unwrap();
        }
        q.enqueue(&message_to(BACKLOG, "late@b.test"))
            .await
            .unwrap();
    });
    let relay = relay_with(
        &dns,
        port,
        "  per_destination_concurrency: 1
  max_messages_per_connection: 5
",
        RelayOptions {
            redis_url: Some(redis.url()),
            ..RelayOptions::default()
        },
    );
    let started = Instant::now();
    fast.wait_for("the b.test message", || relay.log(), |r| r.len() == 1);
    let waited = started.elapsed();
    let backlog_sent = slow.records().len();
    assert!(
        backlog_sent < BACKLOG / 2,
        "the b.test message waited for {backlog_sent} of the {BACKLOG} a.test messages ({waited:?})"
    );
    eprintln!("b.test delivered after {waited:?}, with {backlog_sent} of {BACKLOG} a.test sent");
}
