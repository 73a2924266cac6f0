//! Ids of messages never attempted live in each shard's `fresh` list, not the
//! `due` sorted set (issue 21, Redis memory per queued message): enqueues push
//! them there (or, with `queue.redis.fresh_list: false`, score them in `due` as
//! releases before it did), a lease takes a shard's due retries first and then
//! its fresh ids, each delivered once; replacing or removing a fresh id leaves
//! no entry behind; status, listing and stats see fresh messages; and a list
//! entry costs Redis a fraction of a sorted-set one.

use crate::redis_enqueue_group::enqueue_all;
use crate::support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use mailrelay::queue::redis::shard_prefixes;
use mailrelay::queue::{
    FinishResult, Ingest, Inspect, Leasing, ListFilter, MessageStatus, QueuedMessage, RcptState,
    RedisQueue, now_ms,
};
use support::redis::{RedisCluster, RedisServer};

fn message(i: usize, body_len: usize) -> QueuedMessage {
    let mut body = format!("Subject: {i}\r\n\r\n");
    while body.len() < body_len {
        body.push('x');
    }
    support::message::queued(
        &format!("sender{i}@example.test"),
        &format!("rcpt{i}@example.test"),
        "relay.test",
        body,
    )
}

async fn start() -> RedisServer {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap()
}

async fn queue(server: &RedisServer, prefix: &str, fresh_list: bool) -> Arc<RedisQueue> {
    let mut cfg = server.config(prefix);
    cfg.fresh_list = fresh_list;
    Arc::new(RedisQueue::connect(&cfg).await.unwrap())
}

/// Every entry of every shard's `fresh` list.
fn fresh_entries(server: &RedisServer, prefix: &str) -> Vec<String> {
    shard_prefixes(prefix)
        .iter()
        .flat_map(|b| {
            server
                .cli(&["LRANGE", &format!("{b}fresh"), "0", "-1"])
                .unwrap()
                .lines()
                .map(str::to_owned)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `cmd` (ZCARD, LLEN, HLEN) of one index of every shard, summed.
pub(crate) fn index_total(server: &RedisServer, prefix: &str, index: &str, cmd: &str) -> u64 {
    shard_prefixes(prefix)
        .iter()
        .map(|b| {
            server
                .cli(&[cmd, &format!("{b}{index}")])
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

fn delivered(mut status: MessageStatus) -> MessageStatus {
    for r in &mut status.rcpts {
        r.state = RcptState::Delivered;
    }
    status.attempts += 1;
    status.next_attempt_ms = None;
    status
}

/// Leases everything due at `at` and finishes each as delivered; the ids taken,
/// with the body each was leased with.
async fn drain(queue: &RedisQueue, at: u64) -> Vec<(String, Vec<u8>)> {
    let mut taken = Vec::new();
    loop {
        let leased = queue.lease_due(at, 60_000, 50, "test").await.unwrap();
        if leased.is_empty() {
            return taken;
        }
        for l in leased {
            assert_eq!(
                queue
                    .finish(&l.lease, delivered(l.status.clone()))
                    .await
                    .unwrap(),
                FinishResult::Finalized
            );
            taken.push((l.lease.id.as_str().to_owned(), l.message.body));
        }
    }
}

fn assert_each_once(msgs: &[QueuedMessage], taken: &[(String, Vec<u8>)]) {
    let mut seen = HashSet::new();
    for (id, _) in taken {
        assert!(seen.insert(id.clone()), "{id} delivered twice");
    }
    let expected: HashSet<String> = msgs
        .iter()
        .map(|m| m.envelope.id.as_str().to_owned())
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_ids_go_to_fresh_and_with_the_switch_off_to_due() {
    let server = start().await;
    let on = queue(&server, "fon", true).await;
    let off = queue(&server, "foff", false).await;
    let msgs: Vec<QueuedMessage> = (0..40).map(|i| message(i, 200)).collect();
    let (a, b) = msgs.split_at(20);
    for r in enqueue_all(&on, a).await {
        r.unwrap();
    }
    for r in enqueue_all(&off, b).await {
        r.unwrap();
    }
    // Default: in `fresh`, once each, nothing in `due`.
    let mut fresh = fresh_entries(&server, "fon");
    fresh.sort();
    let mut ids: Vec<String> = a.iter().map(|m| m.envelope.id.to_string()).collect();
    ids.sort();
    assert_eq!(fresh, ids);
    assert_eq!(index_total(&server, "fon", "due", "ZCARD"), 0);
    // Switched off: as releases before it, in `due`, nothing in `fresh`.
    assert_eq!(index_total(&server, "foff", "due", "ZCARD"), 20);
    assert_eq!(index_total(&server, "foff", "fresh", "LLEN"), 0);
    // Each prefix delivers its own, once, whoever enqueued: readers read both.
    let now = now_ms() + 1;
    assert_each_once(a, &drain(&on, now).await);
    assert_each_once(b, &drain(&off, now).await);
    for p in ["fon", "foff"] {
        assert_eq!(index_total(&server, p, "fresh", "LLEN"), 0);
        assert_eq!(index_total(&server, p, "due", "ZCARD"), 0);
        assert_eq!(index_total(&server, p, "leased", "ZCARD"), 0);
    }
    assert_eq!(on.stats().await.unwrap().messages, 0);
    assert_eq!(off.stats().await.unwrap().messages, 0);
}

/// Retries (in `due`), messages scored in `due` by a relay with the switch off
/// (a rolling upgrade) and fresh ids: one lease call takes them all, each once,
/// a shard's due ones before its fresh ones, each with its own due time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_takes_retries_and_fresh_ids_each_once() {
    let server = start().await;
    let q = queue(&server, "fmix", true).await;
    let old = queue(&server, "fmix", false).await;
    let msgs: Vec<QueuedMessage> = (0..60).map(|i| message(i, 100)).collect();
    for r in enqueue_all(&q, &msgs[..20]).await {
        r.unwrap();
    }
    // Lease 20 and fail each once: due again in `due` at `retry_at`.
    let now = now_ms();
    let first = q.lease_due(now, 60_000, 100, "a").await.unwrap();
    assert_eq!(first.len(), 20);
    for l in &first {
        assert_eq!(l.status.attempts, 0);
        assert_eq!(
            l.status.next_attempt_ms,
            Some(l.message.envelope.received_at_ms),
            "a fresh id is due at its arrival"
        );
    }
    let retry_at = now + 5_000;
    for l in &first {
        let mut s = l.status.clone();
        s.attempts += 1;
        s.next_attempt_ms = Some(retry_at);
        assert_eq!(
            q.finish(&l.lease, s).await.unwrap(),
            FinishResult::Rescheduled
        );
    }
    assert_eq!(index_total(&server, "fmix", "due", "ZCARD"), 20);
    for r in enqueue_all(&old, &msgs[20..40]).await {
        r.unwrap();
    }
    for r in enqueue_all(&q, &msgs[40..]).await {
        r.unwrap();
    }
    assert_eq!(index_total(&server, "fmix", "due", "ZCARD"), 40);
    assert_eq!(index_total(&server, "fmix", "fresh", "LLEN"), 20);

    // Not due yet: the retries stay, everything else is taken. A second on: a
    // lease that visits every shard, so it finds what the other relay wrote
    // outside its home shard (between, it would visit only the shards it knows
    // may have mail).
    let early = q.lease_due(now + 1_000, 60_000, 1000, "b").await.unwrap();
    let early_ids: HashSet<String> = early.iter().map(|l| l.lease.id.to_string()).collect();
    let want: HashSet<String> = msgs[20..]
        .iter()
        .map(|m| m.envelope.id.to_string())
        .collect();
    assert_eq!(early_ids, want);
    for l in &early {
        assert_eq!(
            l.status.next_attempt_ms,
            Some(l.message.envelope.received_at_ms)
        );
        assert_eq!(
            q.finish(&l.lease, delivered(l.status.clone()))
                .await
                .unwrap(),
            FinishResult::Finalized
        );
    }
    // Then the retries, due at `retry_at`, each once.
    let late = drain(&q, retry_at).await;
    assert_each_once(&msgs[..20], &late);
    let by_id: HashMap<String, &QueuedMessage> = msgs
        .iter()
        .map(|m| (m.envelope.id.to_string(), m))
        .collect();
    for (id, body) in &late {
        assert_eq!(*body, by_id[id].body);
    }
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.messages, stats.deferred, stats.leased), (0, 0, 0));
    for idx in ["fresh", "due", "leased", "later"] {
        let cmd = if idx == "fresh" { "LLEN" } else { "ZCARD" };
        assert_eq!(index_total(&server, "fmix", idx, cmd), 0, "{idx}");
    }

    // Within one call a shard's retries and fresh ids come in order of due
    // time: a retry due long ago before a message that just arrived.
    let a = message(100, 10);
    let b = message(101, 10);
    q.enqueue(&a).await.unwrap();
    let l = q.lease_due(now_ms(), 60_000, 1, "c").await.unwrap();
    let mut s = l[0].status.clone();
    s.attempts += 1;
    s.next_attempt_ms = Some(1);
    q.finish(&l[0].lease, s).await.unwrap();
    q.enqueue(&b).await.unwrap();
    let both = q.lease_due(now_ms(), 60_000, 10, "c").await.unwrap();
    assert_eq!(both.len(), 2);
    if mailrelay::queue::redis::shard_of_id(a.envelope.id.as_str())
        == mailrelay::queue::redis::shard_of_id(b.envelope.id.as_str())
    {
        assert_eq!(both[0].lease.id, a.envelope.id);
    }
    let retried = both.iter().find(|l| l.lease.id == a.envelope.id).unwrap();
    assert_eq!(retried.status.next_attempt_ms, Some(1));
}

/// Replacing a fresh id (alone, in a group with new ids, and one already
/// leased) and removing one leave exactly one entry or none: an id twice in
/// `fresh` would be leased twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replacing_or_removing_a_fresh_id_leaves_one_entry_or_none() {
    let server = start().await;
    let q = queue(&server, "frep", true).await;
    let a = message(1, 300);
    q.enqueue(&a).await.unwrap();
    // The same id again, alone: the group's transaction stores nothing, the
    // replacement script stores it.
    let mut a2 = a.clone();
    a2.body = b"Subject: again\r\n\r\nnew body\r\n".to_vec();
    q.enqueue(&a2).await.unwrap();
    let id = a.envelope.id.to_string();
    assert_eq!(fresh_entries(&server, "frep"), vec![id.clone()]);
    // Again, in a group with new ids.
    let mut group: Vec<QueuedMessage> = (10..20).map(|i| message(i, 50)).collect();
    group.push(a2.clone());
    for r in enqueue_all(&q, &group).await {
        r.unwrap();
    }
    let mut fresh = fresh_entries(&server, "frep");
    fresh.sort();
    let mut want: Vec<String> = group.iter().map(|m| m.envelope.id.to_string()).collect();
    want.sort();
    assert_eq!(fresh, want, "each id once");
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.messages, 11);
    assert_eq!(
        stats.bytes,
        group.iter().map(|m| m.body.len() as u64).sum::<u64>()
    );

    // Removing a fresh id takes its entry.
    assert!(q.remove(&group[0].envelope.id).await.unwrap());
    assert!(
        !fresh_entries(&server, "frep").contains(&group[0].envelope.id.to_string()),
        "removed, still in fresh"
    );
    assert_eq!(q.stats().await.unwrap().messages, 10);

    // Replacing a leased one: its lease ends, the new copy is fresh once.
    let b = message(30, 40);
    q.enqueue(&b).await.unwrap();
    let leased = q.lease_due(now_ms(), 60_000, 1000, "x").await.unwrap();
    assert_eq!(leased.len(), 11);
    assert!(fresh_entries(&server, "frep").is_empty());
    q.enqueue(&b).await.unwrap();
    assert_eq!(
        fresh_entries(&server, "frep"),
        vec![b.envelope.id.to_string()]
    );
    assert_eq!(index_total(&server, "frep", "leased", "ZCARD"), 10);

    // Everything left is delivered once, the replacement with its new body.
    for l in &leased {
        let r = q
            .finish(&l.lease, delivered(l.status.clone()))
            .await
            .unwrap();
        let want = if l.lease.id == b.envelope.id {
            FinishResult::LeaseLost
        } else {
            FinishResult::Finalized
        };
        assert_eq!(r, want);
        if l.lease.id == a.envelope.id {
            assert_eq!(l.message.body, a2.body);
        }
    }
    let rest = drain(&q, now_ms() + 1).await;
    assert_eq!(
        rest.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>(),
        vec![b.envelope.id.to_string()]
    );
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.messages, stats.bytes, stats.leased), (0, 0, 0));
    assert!(fresh_entries(&server, "frep").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_listing_and_stats_see_fresh_messages() {
    let server = start().await;
    let q = queue(&server, "fsee", true).await;
    let msgs: Vec<QueuedMessage> = (0..5).map(|i| message(i, 100)).collect();
    for m in &msgs {
        q.enqueue(m).await.unwrap();
    }
    assert_eq!(index_total(&server, "fsee", "fresh", "LLEN"), 5);
    for m in &msgs {
        let (env, status) = q.status(&m.envelope.id).await.unwrap().expect("queued");
        assert_eq!(env.id, m.envelope.id);
        assert_eq!(status.next_attempt_ms, Some(m.envelope.received_at_ms));
        assert_eq!(status.leased_until_ms, None);
        assert!(q.get(&m.envelope.id).await.unwrap().is_some());
    }
    let mut ids: Vec<_> = msgs.iter().map(|m| m.envelope.id.clone()).collect();
    ids.sort();
    assert_eq!(q.list_ids(100).await.unwrap(), ids);
    assert_eq!(q.list_ids(2).await.unwrap(), ids[..2].to_vec());
    let listed = q.list(ListFilter::default()).await.unwrap();
    assert_eq!(
        listed.iter().map(|(e, _)| e.id.clone()).collect::<Vec<_>>(),
        ids
    );
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.messages, 5);
    assert_eq!(
        stats.oldest_ms,
        Some(ids.iter().map(|i| i.timestamp_ms()).min().unwrap())
    );
}

/// Redis memory per queued message beyond its body, fresh list against `due`
/// (same messages, same server): the list entry saves most of the zset one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_entry_costs_less_memory_than_a_due_one() {
    let server = start().await;
    let used = || -> i64 {
        let info = server.cli(&["INFO", "memory"]).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let mut per_msg = Vec::new();
    for (prefix, fresh_list) in [("mdue", false), ("mfresh", true)] {
        let q = queue(&server, prefix, fresh_list).await;
        let warm: Vec<QueuedMessage> = (0..64).map(|i| message(i, 1024)).collect();
        for r in enqueue_all(&q, &warm).await {
            r.unwrap();
        }
        let before = used();
        // Enough for every shard's `due` to pass Redis's 128-entry listpack limit:
        // at 2,000 (125 a shard on average) some shards converted to a skiplist and
        // some did not, a different mix each run, and the figure moved by ±20 B.
        let n = 4_000;
        let msgs: Vec<QueuedMessage> = (0..n).map(|i| message(100 + i, 1024)).collect();
        for chunk in msgs.chunks(200) {
            for r in enqueue_all(&q, chunk).await {
                r.unwrap();
            }
        }
        let after = used();
        let body: i64 = msgs.iter().map(|m| m.body.len() as i64).sum();
        per_msg.push((after - before - body) / n as i64);
    }
    let (due, fresh) = (per_msg[0], per_msg[1]);
    println!("redis memory per queued 1 KB message beyond its body: due {due} B, fresh {fresh} B");
    assert!(
        fresh > 0 && fresh + 50 < due,
        "due {due} B, fresh {fresh} B"
    );
    // The index alone: a shard's list against its sorted set.
    let usage = |key: String| -> i64 {
        server
            .cli(&["MEMORY", "USAGE", &key, "SAMPLES", "0"])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let due_bytes: i64 = shard_prefixes("mdue")
        .iter()
        .map(|b| usage(format!("{b}due")))
        .sum();
    let fresh_bytes: i64 = shard_prefixes("mfresh")
        .iter()
        .map(|b| usage(format!("{b}fresh")))
        .sum();
    println!(
        "index memory for 2,064 messages: due zsets {due_bytes} B, fresh lists {fresh_bytes} B"
    );
    assert!(
        fresh_bytes * 2 < due_bytes,
        "due {due_bytes} B, fresh {fresh_bytes} B"
    );
}

/// In a cluster each shard's list shares its slot with the shard's other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_fresh_ids_are_delivered_once() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let q = Arc::new(RedisQueue::connect(&cluster.config("fcl")).await.unwrap());
    let msgs: Vec<QueuedMessage> = (0..48).map(|i| message(i, 100)).collect();
    for r in enqueue_all(&q, &msgs).await {
        r.unwrap();
    }
    assert_eq!(q.stats().await.unwrap().messages, 48);
    assert_eq!(q.list_ids(1000).await.unwrap().len(), 48);
    assert!(q.remove(&msgs[0].envelope.id).await.unwrap());
    assert_each_once(&msgs[1..], &drain(&q, now_ms() + 1).await);
    assert_eq!(q.stats().await.unwrap().messages, 0);
}
