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

/// `n` messages (`message(0..n)`), enqueued one by one.
async fn enqueued(q: &RedisQueue, n: usize) -> Vec<QueuedMessage> {
    let msgs: Vec<QueuedMessage> = (0..n).map(message).collect();
    for m in &msgs {
        q.enqueue(m).await.unwrap();
    }
    msgs
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

/// `ZCARD`/`HLEN` of one index of every shard of this module's queue, summed.
fn index_total(server: &RedisServer, index: &str, cmd: &str) -> u64 {
    crate::redis_fresh::index_total(server, PREFIX, index, cmd)
}

/// A private redis-server and a queue on it.
async fn started() -> (RedisServer, RedisQueue) {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config(PREFIX)).await.unwrap();
    (server, q)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_call_visits_every_shard_of_a_single_server() {
    let (server, q) = started().await;
    let msgs: Vec<QueuedMessage> = (0..64).map(message).collect();
    let shards: HashSet<usize> = msgs
        .iter()
        .map(|m| shard_of_id(m.envelope.id.as_str()))
        .collect();
    assert!(shards.len() >= 12, "64 ids fell in {} shards", shards.len());

    // The first lease also looks for messages of the old layout (then every 30 s
    // while it is empty): out of the counts below. Both polls run before the
    // enqueue: a lease whose `now` is far behind the ids' time moves fresh ids to
    // `due`, scored by the id's time rather than the arrival the status holds.
    assert!(
        q.lease_due(1, 60_000, 100, "relay-a")
            .await
            .unwrap()
            .is_empty()
    );
    // An idle poll is one call, not one per shard.
    reset_stats(&server);
    let none = q.lease_due(1, 60_000, 100, "relay-a").await.unwrap();
    assert!(none.is_empty());
    assert_eq!(calls(&server, "evalsha"), 1, "an empty poll");
    assert_eq!(calls(&server, "mget"), 0, "nothing leased, nothing read");

    for m in &msgs {
        q.enqueue(m).await.unwrap();
    }

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
    // The reads: one pipeline of an MGET per 16 messages.
    assert_eq!(calls(&server, "mget"), 4, "a lease over every shard");

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
    let (server, q) = started().await;
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
    let (server, q) = started().await;
    let kept = enqueued(&q, 8).await;
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
    let (server, q) = started().await;
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
            "EVAL",
            &lua,
            "5",
            &keys[0],
            &keys[1],
            &keys[2],
            &keys[3],
            &message_key,
            token,
            &id,
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

fn rescheduled(mut status: MessageStatus, at_ms: u64) -> MessageStatus {
    status.attempts += 1;
    status.next_attempt_ms = Some(at_ms);
    status
}

/// One finish call writes the indexes of a shard's items with one command each:
/// every item is still checked against its own lease (a lost one and a second
/// finish of the same lease are refused), a lease swept back to due but still
/// ours finishes and leaves `due`, a retried message's status and `deferred`
/// count go with it, and a rescheduled item stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_one_shard_finishes_each_item_by_its_own_lease() {
    let (server, q) = started().await;
    // Five messages of one shard.
    let mut msgs: Vec<QueuedMessage> = Vec::new();
    let shard = shard_of_id(message(0).envelope.id.as_str());
    let mut i = 0;
    while msgs.len() < 5 {
        let m = message(i);
        if shard_of_id(m.envelope.id.as_str()) == shard {
            msgs.push(m);
        }
        i += 1;
    }
    // Due in this order.
    for (n, m) in msgs.iter_mut().enumerate() {
        m.envelope.received_at_ms = 1_000 + n as u64;
        q.enqueue(m).await.unwrap();
    }
    let now = now_ms();
    let a = q.lease_due(now, 1_000, 100, "relay-a").await.unwrap();
    assert_eq!(a.len(), 5);
    let lease_a = |n: usize| {
        a.iter()
            .find(|l| l.lease.id == msgs[n].envelope.id)
            .unwrap()
    };
    // m2 fails once: deferred, due before the others' leases run out.
    assert_eq!(
        q.finish(
            &lease_a(2).lease,
            rescheduled(lease_a(2).status.clone(), now + 500)
        )
        .await
        .unwrap(),
        FinishResult::Rescheduled
    );
    assert_eq!(q.stats().await.unwrap().deferred, 1);
    // Relay b, after relay a's leases ran out: its sweep puts m0, m1, m3, m4 back
    // in due (still under a's tokens: nobody took them since), and it takes m2.
    let b = q
        .lease_due(now + 1_500, 60_000, 1, "relay-b")
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].lease.id, msgs[2].envelope.id);

    let mut wrong = lease_a(3).lease.clone();
    wrong.token.push('x');
    let items = vec![
        (
            lease_a(0).lease.clone(),
            delivered(lease_a(0).status.clone()),
        ),
        (
            lease_a(1).lease.clone(),
            delivered(lease_a(1).status.clone()),
        ),
        (
            lease_a(0).lease.clone(),
            delivered(lease_a(0).status.clone()),
        ),
        (wrong, delivered(lease_a(3).status.clone())),
        (
            lease_a(4).lease.clone(),
            rescheduled(lease_a(4).status.clone(), now + 3_600_000),
        ),
        (b[0].lease.clone(), delivered(b[0].status.clone())),
    ];
    reset_stats(&server);
    let answers: Vec<FinishResult> = q
        .finish_batch(items)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        answers,
        [
            FinishResult::Finalized,
            FinishResult::Finalized,
            FinishResult::LeaseLost,
            FinishResult::LeaseLost,
            FinishResult::Rescheduled,
            FinishResult::Finalized,
        ]
    );
    assert_eq!(calls(&server, "evalsha"), 1);
    // Per shard, not per item: one HMGET for the tokens, one HDEL.
    assert_eq!(calls(&server, "hmget"), 1);
    assert_eq!(calls(&server, "hdel"), 1);
    assert_eq!(calls(&server, "hget"), 0);

    let stats = q.stats().await.unwrap();
    assert_eq!(stats.messages, 2, "m3 and m4 stay queued");
    assert_eq!(stats.deferred, 1, "m2 finished, m4 deferred");
    assert_eq!(stats.leased, 0);
    for n in [0, 1, 2] {
        let (_, status) = q.status(&msgs[n].envelope.id).await.unwrap().unwrap();
        assert!(status.final_at_ms.is_some(), "m{n} final");
        assert!(q.get(&msgs[n].envelope.id).await.unwrap().is_none());
    }
    let base = &shard_prefixes(PREFIX)[shard];
    let status_of_m2 = server
        .cli(&[
            "EXISTS",
            &format!("{base}s:{}", msgs[2].envelope.id.as_str()),
        ])
        .unwrap();
    assert_eq!(status_of_m2.trim(), "0", "a finished message's status goes");
    // Only m3 and m4 are ever due again: the swept finals left `due` (a leftover
    // would be dropped when leased, so look at the index itself).
    let due = server.cli(&["ZCARD", &format!("{base}due")]).unwrap();
    assert_eq!(due.trim(), "2", "m3 and m4 only");
    let rest: HashSet<QueueId> = q
        .lease_due(now + 86_400_000, 60_000, 100, "relay-c")
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.lease.id)
        .collect();
    assert_eq!(
        rest,
        HashSet::from([msgs[3].envelope.id.clone(), msgs[4].envelope.id.clone()])
    );
}

/// A final record is `<envelope len>:`, the envelope as stored, the status JSON:
/// built by the relay from the envelope its lease read, or (a lease without it)
/// read by the script itself, also for an envelope longer than the script's
/// first read of the stored value's head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_record_is_the_same_whether_the_lease_brought_its_envelope_or_not() {
    let (_server, q) = started().await;
    let redis = q.shared();
    let mut msgs: Vec<QueuedMessage> = (0..4).map(message).collect();
    // Two with an envelope far over the script's first read (256 bytes).
    for m in &mut msgs[2..] {
        let rcpt = m.envelope.recipients[0].clone();
        m.envelope.recipients = (0..40)
            .map(|i| mailrelay::queue::Recipient {
                address: format!("recipient-number-{i}@a-long-domain-name.example.test"),
                ..rcpt.clone()
            })
            .collect();
    }
    let mut stored_heads = Vec::new();
    for m in &msgs {
        q.enqueue(m).await.unwrap();
        let id = m.envelope.id.as_str();
        let base = &shard_prefixes(PREFIX)[shard_of_id(id)];
        let value: Vec<u8> = redis
            .query(redis::cmd("GET").arg(format!("{base}m:{id}")))
            .await
            .unwrap();
        // `<envelope len>:<body len>:<envelope><body>`
        let text = String::from_utf8_lossy(&value);
        let mut parts = text.splitn(3, ':');
        let env_len: usize = parts.next().unwrap().parse().unwrap();
        let body_len = parts.next().unwrap();
        let at = env_len.to_string().len() + 1 + body_len.len() + 1;
        stored_heads.push((base.clone(), value[at..at + env_len].to_vec()));
    }
    assert!(stored_heads[2].1.len() > 300, "{}", stored_heads[2].1.len());
    let mut leased = q.lease_due(now_ms(), 60_000, 10, "relay-a").await.unwrap();
    assert_eq!(leased.len(), 4);
    leased.sort_by_key(|l| msgs.iter().position(|m| m.envelope.id == l.lease.id));
    let items: Vec<_> = leased
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut lease = l.lease.clone();
            if i % 2 == 1 {
                lease.head = Default::default();
            }
            (lease, delivered(l.status.clone()))
        })
        .collect();
    let answers = q.finish_batch(items).await.unwrap();
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Ok(FinishResult::Finalized))),
        "{answers:?}"
    );
    for ((m, (base, envelope)), l) in msgs.iter().zip(&stored_heads).zip(&leased) {
        let id = m.envelope.id.as_str();
        let record: Vec<u8> = redis
            .query(redis::cmd("GET").arg(format!("{base}f:{id}")))
            .await
            .unwrap();
        let mut want = format!("{}:", envelope.len()).into_bytes();
        want.extend_from_slice(envelope);
        assert!(record.starts_with(&want), "the record of {id}");
        let (got_envelope, status) = q.status(&l.lease.id).await.unwrap().unwrap();
        assert_eq!(got_envelope, m.envelope);
        assert!(status.is_final());
    }
    // The body bytes left the counters whichever way the length came.
    assert_eq!(q.stats().await.unwrap().messages, 0);
    assert_eq!(q.stats().await.unwrap().bytes, 0);
}

/// A relay sweeps expired leases about once a second by the lease's clock, not at
/// every lease (a command in a script costs Redis about as much as a small
/// command itself), and a sweep covers every shard, also those the lease stops
/// short of once it has what it asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_are_swept_about_once_a_second_over_every_shard() {
    let (server, q) = started().await;
    enqueued(&q, 48).await;
    let t = now_ms();
    assert_eq!(
        q.lease_due(t, 1_000, 100, "relay-a").await.unwrap().len(),
        48
    );
    // Every shard's `leased` (16) and `due` (16) read once: a sweep.
    reset_stats(&server);
    assert!(
        q.lease_due(t, 1_000, 100, "relay-b")
            .await
            .unwrap()
            .is_empty()
    );
    // One `due` read per shard visited (between full rounds, those that may have
    // mail); a sweep would read every `leased` too.
    assert!(
        calls(&server, "zrangebyscore") <= 16,
        "within the second: no sweep"
    );

    // Past the leases' expiry: one sweep returns every shard's expired leases to
    // due, although a lease of one message stops at the first shard with one.
    reset_stats(&server);
    let one = q.lease_due(t + 2_000, 60_000, 1, "relay-b").await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(
        calls(&server, "zrangebyscore"),
        16 + 1,
        "a sweep, then one due read"
    );
    assert_eq!(index_total(&server, "leased", "ZCARD"), 1);
    assert_eq!(index_total(&server, "due", "ZCARD"), 47);

    // The rest within the same second: taken without another sweep.
    reset_stats(&server);
    let rest = q
        .lease_due(t + 2_500, 60_000, 100, "relay-b")
        .await
        .unwrap();
    assert_eq!(rest.len(), 47);
    assert!(
        calls(&server, "zrangebyscore") <= 16,
        "no sweep within the second"
    );
}

/// Between full rounds (about once a second) a lease on a single server visits
/// only the shards that may have mail due: the relay's home shard, those it wrote
/// to or took from, and those where a retry it scheduled is due by now. Mail
/// another relay wrote elsewhere is found at the next full round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn between_full_rounds_a_lease_visits_only_shards_that_may_have_mail() {
    let (server, q) = started().await;
    let home = usize::from(q.home_shard().expect("a single server"));
    // One `due` read per shard visited, and one `leased` read per shard swept.
    let visits = || {
        let n = calls(&server, "zrangebyscore");
        reset_stats(&server);
        n
    };
    let t = now_ms();
    // The first lease visits every shard (and looks for the old layout's).
    assert!(q.lease_due(t, 60_000, 100, "a").await.unwrap().is_empty());
    reset_stats(&server);
    assert!(
        q.lease_due(t + 1, 60_000, 100, "a")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(visits(), 1, "nothing known: the home shard alone");

    // Mail this relay wrote, in any shard, is taken at once.
    let msgs = enqueued(&q, 4).await;
    let mut written: HashSet<usize> = msgs
        .iter()
        .map(|m| shard_of_id(m.envelope.id.as_str()))
        .collect();
    written.insert(home);
    let leased = q.lease_due(t + 2, 60_000, 100, "a").await.unwrap();
    assert_eq!(leased.len(), 4);
    assert_eq!(
        visits(),
        written.len() as u64,
        "home and the shards written"
    );
    // A shard that gave mail is visited once more, then known empty.
    assert!(
        q.lease_due(t + 3, 60_000, 100, "a")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(visits(), written.len() as u64);
    assert!(
        q.lease_due(t + 4, 60_000, 100, "a")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(visits(), 1);

    // A retry this relay scheduled: its shard is visited from its due time on.
    let retry = &leased[0];
    let retry_shard = shard_of_id(retry.lease.id.as_str());
    let mut status = retry.status.clone();
    status.attempts += 1;
    status.next_attempt_ms = Some(t + 500);
    assert_eq!(
        q.finish(&retry.lease, status).await.unwrap(),
        FinishResult::Rescheduled
    );
    assert!(
        q.lease_due(t + 499, 60_000, 100, "a")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(visits(), 1, "not due yet: the home shard alone");
    let again = q.lease_due(t + 500, 60_000, 100, "a").await.unwrap();
    assert_eq!(
        again.len(),
        1,
        "leased when due, not at the next full round"
    );
    assert_eq!(again[0].lease.id, retry.lease.id);
    assert_eq!(visits(), 1 + u64::from(retry_shard != home));

    // Another relay's new mail, in its home shard: found by the next full round
    // at the latest.
    let other = RedisQueue::connect(&server.config(PREFIX)).await.unwrap();
    let mut theirs = message(9);
    theirs.envelope.id = other.new_id();
    other.enqueue(&theirs).await.unwrap();
    let mut got = q.lease_due(t + 501, 60_000, 100, "a").await.unwrap();
    assert!(visits() <= 2, "home and the retry's shard");
    if got.is_empty() {
        assert_ne!(shard_of_id(theirs.envelope.id.as_str()), home);
        got = q.lease_due(t + 1_600, 60_000, 100, "a").await.unwrap();
        assert_eq!(visits(), 32, "a full round, swept");
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].lease.id, theirs.envelope.id);
}

/// One sweep returns at most 1,000 expired leases over all shards (a script
/// blocks its Redis node while it runs); the rest go at the next sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sweep_returns_at_most_its_limit_over_all_shards() {
    let (server, q) = started().await;
    enqueued(&q, 1_100).await;
    let t = now_ms();
    let mut taken = 0;
    while taken < 1_100 {
        let got = q.lease_due(t, 1_000, 500, "relay-a").await.unwrap();
        assert!(!got.is_empty());
        taken += got.len();
    }
    let one = q.lease_due(t + 2_000, 60_000, 1, "relay-b").await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(
        index_total(&server, "due", "ZCARD"),
        999,
        "1,000 swept, one taken"
    );
    assert_eq!(index_total(&server, "leased", "ZCARD"), 101);
    // The next second's sweep takes the rest.
    let one = q.lease_due(t + 3_100, 60_000, 1, "relay-b").await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(index_total(&server, "due", "ZCARD"), 999 + 99);
    assert_eq!(index_total(&server, "leased", "ZCARD"), 2);
}
