//! The delivery side of the Redis queue on a real redis-server: one lease script
//! call visits every shard of a single server, the stored values are read outside
//! the script (a value gone by then is not delivered and its lease is dropped),
//! expired leases of every shard come back in that one call, and a finish is
//! still refused once its lease was lost.

use crate::support;

use std::collections::HashSet;

use mailrelay::queue::redis::{shard_of_id, shard_prefixes};
use mailrelay::queue::{
    FinishResult, Ingest, Inspect, Leasing, MessageStatus, QueueId, QueuedMessage, RcptState,
    RedisQueue, now_ms,
};
use support::redis::RedisServer;

const PREFIX: &str = "lse";

fn message(i: usize) -> QueuedMessage {
    support::message::queued(
        &format!("sender{i}@example.test"),
        &format!("rcpt{i}@example.test"),
        "relay.test",
        format!("Subject: {i}\r\n\r\nbody:{i}\r\n"),
    )
}

/// `calls` of `cmdstat_<cmd>` in INFO commandstats.
fn calls(server: &RedisServer, cmd: &str) -> u64 {
    let info = server.cli(&["INFO", "commandstats"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

fn reset_stats(server: &RedisServer) {
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
}

fn delivered(mut status: MessageStatus) -> MessageStatus {
    for r in &mut status.rcpts {
        r.state = RcptState::Delivered;
    }
    status.attempts += 1;
    status.next_attempt_ms = None;
    status
}

/// `ZCARD`/`HLEN` of one index of every shard, summed.
fn index_total(server: &RedisServer, index: &str, cmd: &str) -> u64 {
    shard_prefixes(PREFIX)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_call_visits_every_shard_of_a_single_server() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config(PREFIX)).await.unwrap();
    let msgs: Vec<QueuedMessage> = (0..64).map(message).collect();
    let shards: HashSet<usize> = msgs
        .iter()
        .map(|m| shard_of_id(m.envelope.id.as_str()))
        .collect();
    assert!(shards.len() >= 12, "64 ids fell in {} shards", shards.len());
    for m in &msgs {
        q.enqueue(m).await.unwrap();
    }

    // The first lease also looks for messages of the old layout (then every 30 s
    // while it is empty): out of the counts below.
    assert!(q.lease_due(1, 60_000, 100, "relay-a").await.unwrap().is_empty());
    // An idle poll is one call, not one per shard.
    reset_stats(&server);
    let none = q.lease_due(1, 60_000, 100, "relay-a").await.unwrap();
    assert!(none.is_empty());
    assert_eq!(calls(&server, "evalsha"), 1, "an empty poll");
    assert_eq!(calls(&server, "mget"), 0, "nothing leased, nothing read");

    // Part of the queue: exactly `max`, in one call and one read.
    reset_stats(&server);
    let now = now_ms();
    let first = q.lease_due(now, 60_000, 10, "relay-a").await.unwrap();
    assert_eq!(first.len(), 10);
    assert_eq!(calls(&server, "evalsha"), 1, "a lease of 10");
    assert_eq!(calls(&server, "mget"), 1, "a lease of 10");

    // The rest, spread over every shard: still one call and one read.
    reset_stats(&server);
    let rest = q.lease_due(now, 60_000, 1000, "relay-a").await.unwrap();
    assert_eq!(rest.len(), 54);
    assert_eq!(calls(&server, "evalsha"), 1, "a lease over every shard");
    assert_eq!(calls(&server, "mget"), 1, "a lease over every shard");

    // Each message leased once, with its own envelope and body.
    let mut seen = HashSet::new();
    for l in first.iter().chain(&rest) {
        assert!(seen.insert(l.lease.id.clone()), "{} twice", l.lease.id);
        let sent = msgs
            .iter()
            .find(|m| m.envelope.id == l.lease.id)
            .expect("a queued id");
        assert_eq!(l.message, *sent);
        assert_eq!(l.status.leased_until_ms, Some(now + 60_000));
        assert_eq!(
            l.status.next_attempt_ms,
            Some(sent.envelope.received_at_ms),
            "the due score"
        );
    }
    assert_eq!(index_total(&server, "leased", "ZCARD"), 64);
    assert_eq!(index_total(&server, "lease", "HLEN"), 64);
    assert_eq!(index_total(&server, "due", "ZCARD"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_of_every_shard_come_back_in_one_call_and_their_old_finish_is_refused() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config(PREFIX)).await.unwrap();
    for i in 0..40 {
        q.enqueue(&message(i)).await.unwrap();
    }
    let now = now_ms();
    let dead = q.lease_due(now, 1_000, 1000, "relay-dead").await.unwrap();
    assert_eq!(dead.len(), 40);

    // After the dead relay's leases ran out, one call takes all of them back.
    reset_stats(&server);
    let later = now + 2_000;
    let taken = q.lease_due(later, 60_000, 1000, "relay-b").await.unwrap();
    assert_eq!(taken.len(), 40);
    assert_eq!(calls(&server, "evalsha"), 1);
    for l in &taken {
        // Due at the old lease's expiry, where the sweep put it back.
        assert_eq!(l.status.next_attempt_ms, Some(now + 1_000));
        assert!(l.lease.token.starts_with("relay-b#"));
    }

    // The dead relay's late finish is refused; the new holder's counts.
    let old = &dead[0];
    assert_eq!(
        q.finish(&old.lease, delivered(old.status.clone()))
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    let new = taken.iter().find(|l| l.lease.id == old.lease.id).unwrap();
    assert_eq!(
        q.finish(&new.lease, delivered(new.status.clone()))
            .await
            .unwrap(),
        FinishResult::Finalized
    );
    assert!(q.get(&old.lease.id).await.unwrap().is_none());
}

/// A due entry whose stored value is gone when the relay reads it (debris, or a
/// message removed between the lease and the read) is not delivered, and its
/// lease is dropped rather than left to come back at every expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_gone_before_its_read_is_not_delivered_and_its_lease_is_dropped() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config(PREFIX)).await.unwrap();
    let kept: Vec<QueuedMessage> = (0..8).map(message).collect();
    for m in &kept {
        q.enqueue(m).await.unwrap();
    }
    // Schedule entries of messages that are not stored, in several shards.
    let gone: Vec<QueueId> = (100..106).map(|i| message(i).envelope.id).collect();
    for id in &gone {
        let base = &shard_prefixes(PREFIX)[shard_of_id(id.as_str())];
        server
            .cli(&["ZADD", &format!("{base}due"), "1", id.as_str()])
            .unwrap();
        server
            .cli(&["ZADD", &format!("{base}later"), "0", id.as_str()])
            .unwrap();
    }
    let now = now_ms();
    let leased = q.lease_due(now, 1_000, 1000, "relay-a").await.unwrap();
    let ids: HashSet<QueueId> = leased.iter().map(|l| l.lease.id.clone()).collect();
    assert_eq!(ids.len(), kept.len(), "only the stored messages");
    for m in &kept {
        assert!(ids.contains(&m.envelope.id));
    }
    // Nothing of the gone ones is left in any index.
    assert_eq!(index_total(&server, "leased", "ZCARD"), kept.len() as u64);
    assert_eq!(index_total(&server, "lease", "HLEN"), kept.len() as u64);
    assert_eq!(index_total(&server, "due", "ZCARD"), 0);
    assert_eq!(index_total(&server, "later", "ZCARD"), 0);
    // Long after every lease ran out, only the stored messages come back.
    let again = q
        .lease_due(now + 10_000, 60_000, 1000, "relay-b")
        .await
        .unwrap();
    assert_eq!(again.len(), kept.len());

    // Removed while leased: the value and the lease go together; the holder's
    // finish is refused.
    let victim = &again[0];
    assert!(q.remove(&victim.lease.id).await.unwrap());
    assert_eq!(
        q.finish(&victim.lease, delivered(victim.status.clone()))
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    assert!(
        q.lease_due(now + 100_000, 60_000, 1000, "relay-c")
            .await
            .unwrap()
            .iter()
            .all(|l| l.lease.id != victim.lease.id),
        "a removed message is never leased again"
    );
}

/// The debris drop only drops a lease that is still ours over a value still
/// absent: a message stored again under the id (a replacing enqueue, which drops
/// the old lease) stays queued and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stored_again_under_a_gone_id_is_still_delivered() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config(PREFIX)).await.unwrap();
    let m = message(7);
    let id = m.envelope.id.as_str().to_owned();
    q.enqueue(&m).await.unwrap();
    let first = q.lease_due(now_ms(), 60_000, 10, "relay-a").await.unwrap();
    assert_eq!(first.len(), 1);
    // Stored again while leased: the old lease is gone, the new copy due.
    q.enqueue(&m).await.unwrap();
    let second = q.lease_due(now_ms(), 60_000, 10, "relay-b").await.unwrap();
    assert_eq!(second.len(), 1, "the replacement is delivered");
    assert_eq!(second[0].lease.id.as_str(), id);
    // The drop of a gone value, run for it now, leaves a stored one alone.
    let (_, lua) = mailrelay::queue::redis::lua_scripts()
        .into_iter()
        .find(|(name, _)| *name == "queue_lease_drop")
        .unwrap();
    let base = &shard_prefixes(PREFIX)[shard_of_id(&id)];
    let keys = ["due", "leased", "lease", "later"].map(|k| format!("{base}{k}"));
    let message_key = format!("{base}m:{id}");
    let token = &second[0].lease.token;
    let dropped = server
        .cli(&[
            "EVAL", &lua, "5", &keys[0], &keys[1], &keys[2], &keys[3], &message_key, token, &id,
        ])
        .unwrap();
    assert_eq!(dropped.trim(), "0", "a stored value's lease stays");
    assert_eq!(index_total(&server, "lease", "HLEN"), 1);
    assert_eq!(
        q.finish(&first[0].lease, delivered(first[0].status.clone()))
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    assert_eq!(
        q.finish(&second[0].lease, delivered(second[0].status.clone()))
            .await
            .unwrap(),
        FinishResult::Finalized
    );
}
