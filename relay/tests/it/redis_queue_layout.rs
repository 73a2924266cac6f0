//! The Redis queue's key layout: its shards spread over every master of a
//! 3-master cluster, and messages written by the layout before 2026-12 (a hash per
//! message under `{<prefix>:sNN}` shards) are moved over and delivered exactly once,
//! on standalone Redis and on the cluster, while a relay of the old version may
//! still be writing them (a rolling upgrade).

use crate::support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use mailrelay::queue::redis::{legacy_shard_prefixes, shard_of_id, shard_prefixes};
use mailrelay::queue::{
    FinishResult, Ingest, Inspect, Leasing, MessageStatus, QueueId, QueuedMessage, RcptState,
    RedisQueue, now_ms,
};
use support::redis::{RedisCluster, RedisServer};

const PREFIX: &str = "mrtest";

fn message(i: usize) -> QueuedMessage {
    support::message::queued(
        &format!("sender{i}@example.test"),
        &format!("rcpt{i}@example.test"),
        "relay-old.test",
        format!("Subject: {i}\r\n\r\nbody:{i}\r\n"),
    )
}

/// Runs raw commands, as a relay of the old version would, on a standalone server
/// or (following redirections) on a cluster.
enum Raw<'a> {
    Single(&'a RedisServer),
    Cluster(&'a RedisCluster),
}

impl Raw<'_> {
    fn run(&self, args: &[&str]) -> String {
        match self {
            Raw::Single(s) => s.cli(args),
            Raw::Cluster(c) => {
                let mut all = vec!["-c"];
                all.extend_from_slice(args);
                c.cli(c.ports()[0], &all)
            }
        }
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// Writes `msg` as the old layout's enqueue did; `deferred` as after one
    /// finish that rescheduled it (status and attempts stored, due in an hour).
    fn old_enqueue(&self, msg: &QueuedMessage, deferred: bool) {
        let id = msg.envelope.id.as_str();
        let base = &legacy_shard_prefixes(PREFIX)[shard_of_id(id)];
        let key = format!("{base}m:{id}");
        let envelope = serde_json::to_string(&msg.envelope).unwrap();
        let body = String::from_utf8(msg.body.clone()).unwrap();
        self.run(&["HSET", &key, "envelope", &envelope, "body", &body]);
        let mut due = msg.envelope.received_at_ms;
        if deferred {
            let mut status = MessageStatus::new(&msg.envelope);
            status.attempts = 2;
            let status = serde_json::to_string(&status).unwrap();
            self.run(&["HSET", &key, "status", &status, "attempts", "2"]);
            self.run(&["HINCRBY", &format!("{base}stats"), "deferred", "1"]);
            due += 3_600_000;
        }
        self.run(&["ZADD", &format!("{base}due"), &due.to_string(), id]);
        self.run(&["ZADD", &format!("{base}ids"), "0", id]);
        self.run(&["HINCRBY", &format!("{base}stats"), "messages", "1"]);
        self.run(&[
            "HINCRBY",
            &format!("{base}stats"),
            "bytes",
            &body.len().to_string(),
        ]);
    }

    /// A message an old relay holds in flight, its lease expired at `expired_ms`.
    fn old_in_flight(&self, msg: &QueuedMessage, expired_ms: u64) {
        self.old_enqueue(msg, false);
        let id = msg.envelope.id.as_str();
        let base = &legacy_shard_prefixes(PREFIX)[shard_of_id(id)];
        self.run(&["ZREM", &format!("{base}due"), id]);
        self.run(&[
            "ZADD",
            &format!("{base}leased"),
            &expired_ms.to_string(),
            id,
        ]);
        self.run(&[
            "HSET",
            &format!("{base}m:{id}"),
            "lease",
            "relay-old.test:1#x",
        ]);
    }

    /// A final record of the old layout (kept for the status retention).
    fn old_final(&self, msg: &QueuedMessage) -> MessageStatus {
        let id = msg.envelope.id.as_str();
        let base = &legacy_shard_prefixes(PREFIX)[shard_of_id(id)];
        let key = format!("{base}m:{id}");
        let mut status = MessageStatus::new(&msg.envelope);
        status.attempts = 1;
        status.rcpts[0].state = RcptState::Delivered;
        status.next_attempt_ms = None;
        let envelope = serde_json::to_string(&msg.envelope).unwrap();
        let json = serde_json::to_string(&status).unwrap();
        self.run(&[
            "HSET", &key, "envelope", &envelope, "status", &json, "final", "1",
        ]);
        self.run(&["PEXPIRE", &key, "600000"]);
        status
    }

    /// Keys of the old layout's shards that still hold queued messages.
    fn old_queued(&self) -> u64 {
        legacy_shard_prefixes(PREFIX)
            .iter()
            .flat_map(|b| [format!("{b}due"), format!("{b}leased"), format!("{b}ids")])
            .map(|k| self.run(&["ZCARD", &k]).trim().parse::<u64>().unwrap())
            .sum()
    }
}

/// Leases everything due (moving old messages over first), delivers it and
/// counts every lease per id. `now` may lie in the future to take deferred ones.
async fn deliver_all(q: &RedisQueue, now: u64, seen: &mut HashMap<QueueId, u32>) -> usize {
    let leased = q
        .lease_due(now, 60_000, 1000, "relay-new.test:1")
        .await
        .unwrap();
    let n = leased.len();
    for l in leased {
        *seen.entry(l.lease.id.clone()).or_default() += 1;
        let mut status = l.status.clone();
        for r in &mut status.rcpts {
            r.state = RcptState::Delivered;
        }
        status.attempts += 1;
        status.next_attempt_ms = None;
        assert_eq!(
            q.finish(&l.lease, status).await.unwrap(),
            FinishResult::Finalized
        );
    }
    n
}

async fn old_messages_are_moved_and_delivered_once(q: &RedisQueue, raw: &Raw<'_>) {
    let now = now_ms();
    // Written by the old version before this one started: due, deferred, one held
    // by a dead old relay (lease expired), and a final record.
    let due: Vec<QueuedMessage> = (0..40).map(message).collect();
    let deferred: Vec<QueuedMessage> = (40..45).map(message).collect();
    let in_flight = message(45);
    let fin = message(46);
    for m in &due {
        raw.old_enqueue(m, false);
    }
    for m in &deferred {
        raw.old_enqueue(m, true);
    }
    raw.old_in_flight(&in_flight, now - 1000);
    let fin_status = raw.old_final(&fin);
    // And one in the new layout.
    let fresh = message(47);
    q.enqueue(&fresh).await.unwrap();

    let stats = q.stats().await.unwrap();
    assert_eq!(stats.messages, 47, "both layouts counted: {stats:?}");
    assert_eq!(stats.deferred, 5, "{stats:?}");

    // The old final record reads through this version.
    let (env, status) = q
        .status(&fin.envelope.id)
        .await
        .unwrap()
        .expect("old final record");
    assert_eq!(env, fin.envelope);
    assert_eq!(status, fin_status);

    // Delivery moves everything over, each message taken once.
    let mut seen: HashMap<QueueId, u32> = HashMap::new();
    q.migrate_legacy_now().await.unwrap();
    deliver_all(q, now_ms(), &mut seen).await;
    // An old relay still enqueues (mixed pods), and one move stops after storing
    // in the new layout but before deleting the old copy (a relay killed between
    // the two): the copy is written back as it was.
    let late = message(48);
    raw.old_enqueue(&late, false);
    let crashed = message(49);
    raw.old_enqueue(&crashed, false);
    q.migrate_legacy_now().await.unwrap();
    raw.old_enqueue(&crashed, false);
    // Delivered from the new layout; the old copy must not come back.
    deliver_all(q, now_ms(), &mut seen).await;
    q.migrate_legacy_now().await.unwrap();
    deliver_all(q, now_ms(), &mut seen).await;
    // The deferred ones, an hour later.
    q.migrate_legacy_now().await.unwrap();
    deliver_all(q, now_ms() + 3_700_000, &mut seen).await;

    let mut want: HashSet<QueueId> = due
        .iter()
        .chain(&deferred)
        .chain([&in_flight, &fresh, &late, &crashed])
        .map(|m| m.envelope.id.clone())
        .collect();
    for (id, n) in &seen {
        assert_eq!(*n, 1, "{id} delivered {n} times");
        assert!(want.remove(id), "{id} was never queued");
    }
    assert!(want.is_empty(), "never delivered: {want:?}");
    assert_eq!(raw.old_queued(), 0, "the old layout still holds messages");
    let stats = q.stats().await.unwrap();
    assert_eq!(
        (stats.messages, stats.deferred, stats.leased, stats.bytes),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    // Moved messages keep their envelope and get a new-layout final record.
    let (env, status) = q.status(&deferred[0].envelope.id).await.unwrap().unwrap();
    assert_eq!(env, deferred[0].envelope);
    assert_eq!(status.attempts, 3, "the old attempts count carried over");
    assert!(q.get(&deferred[0].envelope.id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_layout_messages_are_moved_and_delivered_once_on_standalone_redis() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config(PREFIX)).await.unwrap();
    old_messages_are_moved_and_delivered_once(&q, &Raw::Single(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_layout_messages_are_moved_and_delivered_once_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&cluster.config(PREFIX)).await.unwrap();
    old_messages_are_moved_and_delivered_once(&q, &Raw::Cluster(&cluster)).await;
}

/// `INFO commandstats` calls of one command on one node.
fn calls(cluster: &RedisCluster, port: u16, cmd: &str) -> u64 {
    let info = cluster.cli(port, &["INFO", "commandstats"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_shards_spread_over_every_master_of_a_three_master_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&cluster.config(PREFIX)).await.unwrap();
    let masters = cluster.ports();
    assert_eq!(masters.len(), 3);
    // Which master holds each shard: where its `stats` key lives once written.
    for base in shard_prefixes(PREFIX) {
        let key = format!("{base}stats");
        cluster
            .cli(masters[0], &["-c", "HSET", &key, "probe", "1"])
            .unwrap();
    }
    let shards: Vec<usize> = masters
        .iter()
        .map(|&p| {
            let keys = cluster
                .cli(p, &["KEYS", &format!("{PREFIX}:*stats")])
                .unwrap();
            keys.lines().filter(|l| !l.trim().is_empty()).count()
        })
        .collect();
    let mut sorted = shards.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [5, 5, 6], "shards per master {shards:?}");

    // The queue's own commands spread as evenly: enqueue, lease, finish 600.
    let before: Vec<u64> = masters
        .iter()
        .map(|&p| calls(&cluster, p, "evalsha"))
        .collect();
    for i in 0..600 {
        q.enqueue(&message(i)).await.unwrap();
    }
    let mut seen = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 600 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 600 delivered",
            seen.len()
        );
        deliver_all(&q, now_ms(), &mut seen).await;
    }
    let per_master: Vec<u64> = masters
        .iter()
        .zip(&before)
        .map(|(&p, b)| calls(&cluster, p, "evalsha") - b)
        .collect();
    let (min, max) = (
        *per_master.iter().min().unwrap(),
        *per_master.iter().max().unwrap(),
    );
    eprintln!("queue EVALSHA per master: {per_master:?}");
    assert!(min > 0 && max * 10 < min * 16, "uneven: {per_master:?}");
}
