//! One conformance suite for every [`Queue`] backend: each check is written once
//! against `dyn Queue` and run on the embedded queue (temp dir), a standalone
//! `redis-server`, a three-master Redis Cluster, and a master found through Redis
//! Sentinel. Backend-specific behaviour
//! (reopen, restart, outage, spread over masters) follows the suite.

use crate::support;

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mailrelay::queue::{
    Attempt, AttemptResult, BodyType, ClientInfo, DeliveryTotals, DsnNotify, DsnRet, EmbeddedQueue,
    Envelope, FinishResult, Ingest, Inspect, Lease, Leased, ListFilter, MAX_ATTEMPTS_KEPT,
    MailParams, MessageStatus, Queue, QueueError, QueueId, QueueOptions, QueueStats, QueuedMessage,
    RcptState, Recipient, RedisQueue, RetrySelector, Store, TlsInfo, now_ms,
};
use support::redis::{RedisCluster, RedisSentinel, RedisServer};

// ---------------------------------------------------------------------------------
// Messages

/// An envelope with every optional field set, so a lossy encoding shows.
fn envelope(id: QueueId, received_at_ms: u64) -> Envelope {
    Envelope {
        id,
        mail: MailParams {
            from: "sender+tag@example.test".into(),
            size: Some(12345),
            body: BodyType::EightBitMime,
            smtputf8: true,
            ret: Some(DsnRet::Hdrs),
            envid: Some("env-id-ü".into()),
            requiretls: true,
        },
        recipients: vec![
            Recipient {
                address: "rcpt1@example.test".into(),
                notify: Some(DsnNotify {
                    never: false,
                    success: true,
                    failure: true,
                    delay: false,
                }),
                orcpt: Some("rfc822;rcpt1@example.test".into()),
            },
            Recipient {
                address: "rcpt2@other.test".into(),
                notify: None,
                orcpt: None,
            },
        ],
        client: ClientInfo {
            ip: "2001:db8::25".parse().unwrap(),
            port: 54321,
            helo: "client.example.test".into(),
            auth_user: Some("alice".into()),
            tls: Some(TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_256_GCM_SHA384".into(),
            }),
            listener: "submission".into(),
        },
        received_at_ms,
        received_by: "relay-0.example.test".into(),
    }
}

fn message(body: Vec<u8>) -> QueuedMessage {
    QueuedMessage {
        envelope: envelope(QueueId::generate(), mailrelay::queue::now_ms()),
        body,
    }
}

/// `n` ids in arrival order. Ids made within one millisecond differ in random bits,
/// so sorting is what defines their order.
fn ids_in_order(n: usize) -> Vec<QueueId> {
    let mut ids: Vec<QueueId> = (0..n).map(|_| QueueId::generate()).collect();
    ids.sort();
    ids
}

/// Deterministic pseudo-random bytes (xorshift), so a corrupted byte cannot hide in a
/// repeating pattern.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// Compares bodies without printing megabytes on failure.
fn assert_same_body(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: body differs: got {} bytes, want {}, first difference at byte {at}",
            got.len(),
            want.len()
        );
    }
}

/// (messages, bytes) from `stats`, for checks that are about those two only.
async fn counts(q: &dyn Queue) -> (u64, u64) {
    let stats = q.stats().await.unwrap();
    (stats.messages, stats.bytes)
}

async fn assert_stored(q: &dyn Queue, what: &str, msg: &QueuedMessage) {
    let got = q
        .get(&msg.envelope.id)
        .await
        .unwrap_or_else(|e| panic!("{what}: get failed: {e}"))
        .unwrap_or_else(|| panic!("{what}: message {} not found", msg.envelope.id));
    assert_eq!(got.envelope, msg.envelope, "{what}: envelope differs");
    assert_same_body(what, &got.body, &msg.body);
}

// ---------------------------------------------------------------------------------
// The checks, written once

async fn check_round_trip_is_byte_identical(q: &dyn Queue) {
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(256 * 16).collect();
    let crlf = b"Received: from client\r\nSubject: dots\r\n\r\n.\r\n..leading dots\r\n\r\n\r\nlast line no CRLF"
        .to_vec();
    let cases = [
        ("all 256 byte values", all_bytes),
        ("CRLF text with dots", crlf),
        ("NUL only", vec![0u8; 1000]),
        ("empty", Vec::new()),
        (
            "5 MB of noise",
            noise(5 * 1024 * 1024, 0x9e37_79b9_7f4a_7c15),
        ),
    ];
    let mut stored = Vec::new();
    for (what, body) in cases {
        let msg = message(body);
        q.enqueue(&msg)
            .await
            .unwrap_or_else(|e| panic!("{what}: enqueue failed: {e}"));
        assert_stored(q, what, &msg).await;
        stored.push((what, msg));
    }
    // Earlier messages are untouched by later ones.
    for (what, msg) in &stored {
        assert_stored(q, what, msg).await;
    }
}

async fn check_unknown_ids_are_absent(q: &dyn Queue) {
    let id = QueueId::generate();
    assert_eq!(q.get(&id).await.unwrap(), None);
    assert!(!q.remove(&id).await.unwrap());
    assert!(q.list_ids(10).await.unwrap().is_empty());
    assert_eq!(q.stats().await.unwrap(), QueueStats::default());
    q.ping().await.unwrap();
}

async fn check_list_ids_in_arrival_order(q: &dyn Queue) {
    let ids = ids_in_order(40);
    let base = mailrelay::queue::now_ms();
    for (i, id) in ids.iter().enumerate() {
        // Schedule times run against arrival, as they will once retries reschedule
        // messages: the listing must follow arrival, not the schedule.
        let msg = QueuedMessage {
            envelope: envelope(id.clone(), base - i as u64 * 1000),
            body: format!("message {i}\r\n").into_bytes(),
        };
        q.enqueue(&msg).await.unwrap();
    }
    assert_eq!(q.list_ids(1000).await.unwrap(), ids, "full listing");
    assert_eq!(q.list_ids(7).await.unwrap(), ids[..7], "limited listing");
    assert_eq!(q.list_ids(0).await.unwrap(), Vec::<QueueId>::new());
    assert!(q.remove(&ids[3]).await.unwrap());
    let mut rest = ids.clone();
    rest.remove(3);
    assert_eq!(q.list_ids(1000).await.unwrap(), rest, "after a removal");
}

async fn check_stats_count_messages_and_bytes(q: &dyn Queue) {
    assert_eq!(q.stats().await.unwrap(), QueueStats::default());
    let msgs = [
        message(vec![b'a'; 10]),
        message(Vec::new()),
        message(vec![0xff; 1000]),
    ];
    for (i, msg) in msgs.iter().enumerate() {
        q.enqueue(msg).await.unwrap();
        let want_bytes: u64 = msgs[..=i].iter().map(|m| m.body.len() as u64).sum();
        assert_eq!(counts(q).await, (i as u64 + 1, want_bytes));
    }
    assert!(q.remove(&msgs[2].envelope.id).await.unwrap());
    assert_eq!(counts(q).await, (2, 10));
}

async fn check_remove_is_idempotent(q: &dyn Queue) {
    let keep = message(b"keep\r\n".to_vec());
    let gone = message(b"remove me\r\n".to_vec());
    q.enqueue(&keep).await.unwrap();
    q.enqueue(&gone).await.unwrap();
    assert!(
        q.remove(&gone.envelope.id).await.unwrap(),
        "first remove finds it"
    );
    assert!(
        !q.remove(&gone.envelope.id).await.unwrap(),
        "second remove finds nothing"
    );
    assert!(
        !q.remove(&gone.envelope.id).await.unwrap(),
        "third remove finds nothing"
    );
    assert_eq!(q.get(&gone.envelope.id).await.unwrap(), None);
    assert_eq!(
        q.list_ids(10).await.unwrap(),
        vec![keep.envelope.id.clone()]
    );
    assert_eq!(
        counts(q).await,
        (1, keep.body.len() as u64),
        "stats change once"
    );
    assert_stored(q, "kept message", &keep).await;
}

/// A caller that retries an enqueue whose outcome it did not learn must not leave
/// the message counted twice.
async fn check_enqueue_again_replaces(q: &dyn Queue) {
    let mut msg = message(vec![1; 100]);
    q.enqueue(&msg).await.unwrap();
    msg.body = vec![2; 40];
    msg.envelope.received_by = "relay-1.example.test".into();
    q.enqueue(&msg).await.unwrap();
    assert_stored(q, "replaced message", &msg).await;
    assert_eq!(counts(q).await, (1, 40));
    assert_eq!(q.list_ids(10).await.unwrap(), vec![msg.envelope.id.clone()]);
}

async fn check_concurrent_enqueues(q: Arc<dyn Queue>) {
    const TASKS: usize = 50;
    const PER_TASK: usize = 10;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let q = q.clone();
        tasks.spawn(async move {
            let mut mine = Vec::new();
            for i in 0..PER_TASK {
                let msg = message(noise(100 + t * 31 + i, (t * PER_TASK + i + 1) as u64));
                q.enqueue(&msg)
                    .await
                    .unwrap_or_else(|e| panic!("task {t} enqueue {i}: {e}"));
                mine.push(msg);
            }
            mine
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("enqueue task panicked"));
    }
    assert_eq!(all.len(), TASKS * PER_TASK);
    for msg in &all {
        assert_stored(&*q, "concurrent message", msg).await;
    }
    let bytes: u64 = all.iter().map(|m| m.body.len() as u64).sum();
    assert_eq!(counts(&*q).await, (all.len() as u64, bytes));
    let listed = q.list_ids(10_000).await.unwrap();
    let mut want: Vec<QueueId> = all.iter().map(|m| m.envelope.id.clone()).collect();
    want.sort();
    assert_eq!(listed, want, "every message listed once, in id order");
}

// ---------------------------------------------------------------------------------
// Delivery's side: leases, finish, release, status, list, retry

/// Long enough that no lease in these checks expires unless the check says so.
const LEASE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;

/// A message to `rcpts`, received (and so first due) at `at`.
fn message_to(id: QueueId, at: u64, rcpts: &[&str]) -> QueuedMessage {
    let mut env = envelope(id, at);
    env.recipients = rcpts
        .iter()
        .map(|a| Recipient {
            address: (*a).to_owned(),
            notify: None,
            orcpt: None,
        })
        .collect();
    QueuedMessage {
        body: format!("Subject: to {}\r\n\r\nhello\r\n", rcpts.join(", ")).into_bytes(),
        envelope: env,
    }
}

fn attempt(at_ms: u64, result: AttemptResult, reply: &str) -> Attempt {
    Attempt {
        at_ms,
        result,
        mx: Some("mx1.example.test".into()),
        ip: Some("192.0.2.25".into()),
        tls: Some(TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
        }),
        security: Some(mailrelay::queue::TransportSecurity {
            policy: "mta-sts".into(),
            mode: Some("testing".into()),
            policy_id: Some("20260101".into()),
            verified: Some(false),
            failure: Some("MTA-STS: certificate not valid".into()),
            dane: Some("insecure".into()),
        }),
        reply: reply.into(),
        // Stored and read back like the rest of the attempt.
        category: (!matches!(result, AttemptResult::Delivered)).then(|| "transient".into()),
    }
}

/// One attempt that deferred every pending recipient; due again at `next`.
fn deferred(mut status: MessageStatus, at: u64, next: u64) -> MessageStatus {
    for r in &mut status.rcpts {
        if r.state == RcptState::Pending {
            r.record(attempt(
                at,
                AttemptResult::Deferred,
                "451 4.7.1 try again later",
            ));
        }
    }
    status.attempts += 1;
    status.next_attempt_ms = Some(next);
    status
}

/// One attempt that delivered every pending recipient: final.
fn delivered(mut status: MessageStatus, at: u64) -> MessageStatus {
    for r in &mut status.rcpts {
        if r.state == RcptState::Pending {
            r.state = RcptState::Delivered;
            r.record(attempt(
                at,
                AttemptResult::Delivered,
                "250 2.0.0 Ok: queued as X",
            ));
        }
    }
    status.attempts += 1;
    status.next_attempt_ms = None;
    status
}

/// Leases what is due at `now`, which must be exactly the message `id`.
async fn lease_id(q: &dyn Queue, now: u64, owner: &str, id: &QueueId) -> Leased {
    let mut leased = q.lease_due(now, LEASE_MS, 1000, owner).await.unwrap();
    assert_eq!(ids_of(&leased), vec![id.clone()], "due at {now}");
    leased.pop().unwrap()
}

/// Leases what is due at `now`, which must be exactly `ids`; returns the leases in
/// the order of `ids`.
async fn lease_ids(q: &dyn Queue, now: u64, owner: &str, ids: &[&QueueId]) -> Vec<Leased> {
    let mut leased = q.lease_due(now, LEASE_MS, 1000, owner).await.unwrap();
    let mut want: Vec<QueueId> = ids.iter().map(|&id| id.clone()).collect();
    want.sort();
    assert_eq!(ids_of(&leased), want, "due at {now}");
    ids.iter()
        .map(|&id| {
            let pos = leased.iter().position(|l| &l.lease.id == id).unwrap();
            leased.swap_remove(pos)
        })
        .collect()
}

fn ids_of(leased: &[Leased]) -> Vec<QueueId> {
    let mut ids: Vec<QueueId> = leased.iter().map(|l| l.lease.id.clone()).collect();
    ids.sort();
    ids
}

async fn status_of(q: &dyn Queue, id: &QueueId) -> MessageStatus {
    q.status(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no status for {id}"))
        .1
}

async fn check_enqueue_creates_a_pending_status(q: &dyn Queue) {
    let t = now_ms();
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test", "b@beta.test"]);
    q.enqueue(&msg).await.unwrap();
    let (env, status) = q.status(&msg.envelope.id).await.unwrap().expect("status");
    assert_eq!(env, msg.envelope);
    assert_eq!(status, MessageStatus::new(&msg.envelope));
    assert_eq!(status.next_attempt_ms, Some(t));
    assert_eq!(status.created_ms, t);
    assert!(status.rcpts.iter().all(|r| r.state == RcptState::Pending));
    assert_eq!(
        q.stats().await.unwrap(),
        QueueStats {
            messages: 1,
            bytes: msg.body.len() as u64,
            leased: 0,
            deferred: 0,
            oldest_ms: Some(msg.envelope.id.timestamp_ms()),
        }
    );
    assert_eq!(q.status(&QueueId::generate()).await.unwrap(), None);
}

async fn check_lease_takes_due_messages_once(q: &dyn Queue) {
    let t = now_ms();
    let due: Vec<QueuedMessage> = (0..3)
        .map(|i| message_to(QueueId::generate(), t - i, &["a@alpha.test"]))
        .collect();
    let later = message_to(QueueId::generate(), t + HOUR_MS, &["a@alpha.test"]);
    for msg in due.iter().chain([&later]) {
        q.enqueue(msg).await.unwrap();
    }

    let first = q.lease_due(t, LEASE_MS, 2, "worker-a").await.unwrap();
    assert_eq!(first.len(), 2, "max is respected");
    let rest = q.lease_due(t, LEASE_MS, 10, "worker-a").await.unwrap();
    assert_eq!(rest.len(), 1, "the third due message, not the later one");
    let all: Vec<Leased> = first.into_iter().chain(rest).collect();
    let mut want: Vec<QueueId> = due.iter().map(|m| m.envelope.id.clone()).collect();
    want.sort();
    assert_eq!(ids_of(&all), want);
    for l in &all {
        let msg = due.iter().find(|m| m.envelope.id == l.lease.id).unwrap();
        assert_eq!(l.message.envelope, msg.envelope);
        assert_same_body("leased", &l.message.body, &msg.body);
        assert_eq!(l.lease.expires_ms, t + LEASE_MS);
        assert!(l.lease.token.starts_with("worker-a#"), "{}", l.lease.token);
        assert_eq!(l.status.id, l.lease.id);
        assert_eq!(l.status.attempts, 0);
        assert_eq!(l.status.next_attempt_ms, Some(msg.envelope.received_at_ms));
        assert_eq!(l.status.leased_until_ms, Some(t + LEASE_MS));
    }
    let tokens: HashSet<&str> = all.iter().map(|l| l.lease.token.as_str()).collect();
    assert_eq!(tokens.len(), 2, "one token per lease_due call");

    assert!(
        q.lease_due(t + 1000, LEASE_MS, 10, "worker-b")
            .await
            .unwrap()
            .is_empty(),
        "leased messages are not taken again before their lease expires"
    );
    assert!(
        q.lease_due(t, LEASE_MS, 0, "worker-b")
            .await
            .unwrap()
            .is_empty()
    );
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.messages, stats.leased), (4, 3));
    let shown = status_of(q, &due[0].envelope.id).await;
    assert_eq!(shown.leased_until_ms, Some(t + LEASE_MS));

    // By then the other leases have expired too and come back with it.
    let taken = q
        .lease_due(t + HOUR_MS, LEASE_MS, 10, "worker-b")
        .await
        .unwrap();
    assert_eq!(taken.len(), 4);
    let later = taken
        .iter()
        .find(|l| l.lease.id == later.envelope.id)
        .unwrap();
    assert_eq!(later.status.next_attempt_ms, Some(t + HOUR_MS));
    let swept = taken
        .iter()
        .find(|l| l.lease.id == due[0].envelope.id)
        .unwrap();
    assert_eq!(
        swept.status.next_attempt_ms,
        Some(t + LEASE_MS),
        "an expired lease is due from its expiry"
    );
}

async fn check_expired_lease_comes_back_to_another_owner(q: &dyn Queue) {
    let t = now_ms();
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test", "b@beta.test"]);
    q.enqueue(&msg).await.unwrap();
    let id = &msg.envelope.id;
    let old = q.lease_due(t, 1000, 10, "dead-worker").await.unwrap();
    assert_eq!(ids_of(&old), vec![id.clone()]);
    assert!(
        q.lease_due(t + 999, 1000, 10, "worker-b")
            .await
            .unwrap()
            .is_empty()
    );

    // The lease runs out at t + 1000: the message is due again for anyone.
    let new = lease_id(q, t + 1000, "worker-b", id).await;
    assert_ne!(new.lease.token, old[0].lease.token);
    assert_eq!(new.message.envelope, msg.envelope);
    let before = q.status(id).await.unwrap();

    // The dead worker wakes up: it must not overwrite what worker-b will record.
    let stale = &old[0].lease;
    let result = q
        .finish(stale, delivered(old[0].status.clone(), t + 5))
        .await
        .unwrap();
    assert_eq!(result, FinishResult::LeaseLost);
    assert!(!q.renew(stale, LEASE_MS).await.unwrap());
    q.release(std::slice::from_ref(stale)).await.unwrap();
    assert_eq!(q.status(id).await.unwrap(), before, "nothing changed");
    assert_stored(q, "after a stale finish", &msg).await;
    assert!(
        q.lease_due(t + 2000, 1000, 10, "worker-c")
            .await
            .unwrap()
            .is_empty(),
        "the stale release did not hand worker-b's lease back"
    );

    // worker-b still holds it: renewing and finishing work.
    assert!(q.renew(&new.lease, LEASE_MS).await.unwrap());
    let result = q
        .finish(&new.lease, delivered(new.status.clone(), t + 10))
        .await
        .unwrap();
    assert_eq!(result, FinishResult::Finalized);
    assert!(
        !q.renew(&new.lease, LEASE_MS).await.unwrap(),
        "finish ends the lease"
    );
}

/// A lease that expired but that nobody took over still belongs to its worker: a
/// slow delivery may still be recorded (and so not be repeated).
async fn check_expired_but_untaken_lease_can_still_finish(q: &dyn Queue) {
    let t = now_ms();
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test"]);
    let other = message_to(QueueId::generate(), t + HOUR_MS, &["a@alpha.test"]);
    q.enqueue(&msg).await.unwrap();
    q.enqueue(&other).await.unwrap();
    let slow = lease_id(q, t, "slow", &msg.envelope.id).await;
    // Sweeps expired leases back to due without taking anything (max reached by
    // nothing: `other` is not due; the sweep itself happens on every call).
    let none = q.lease_due(t + 500, 100, 10, "sweeper").await.unwrap();
    assert!(none.is_empty());
    let result = q
        .finish(&slow.lease, deferred(slow.status.clone(), t, t + HOUR_MS))
        .await
        .unwrap();
    assert_eq!(result, FinishResult::Rescheduled);
    let status = status_of(q, &msg.envelope.id).await;
    assert_eq!(status.attempts, 1);
    assert_eq!(status.next_attempt_ms, Some(t + HOUR_MS));
}

/// A batch of finishes: each item checked against its own lease, delivered ones
/// final, deferred ones rescheduled, a lost lease and an invalid status answered
/// alone, the totals counted once.
async fn check_finish_batch_answers_each_item(q: &dyn Queue) {
    let t = now_ms();
    let before = q.delivery_totals().await.unwrap();
    // Enough messages to span many Redis shards; bodies of different lengths, so
    // that the byte count says which ones left.
    let msgs: Vec<QueuedMessage> = (0..40)
        .map(|i| {
            let mut m = message_to(QueueId::generate(), t, &["a@alpha.test"]);
            m.body.extend(std::iter::repeat_n(b'x', i * 7));
            m.body.extend_from_slice(b"\r\n");
            m
        })
        .collect();
    for m in &msgs {
        q.enqueue(m).await.unwrap();
    }
    let mut leased = q.lease_due(t, LEASE_MS, 1000, "batch").await.unwrap();
    assert_eq!(leased.len(), msgs.len());
    leased.sort_by(|a, b| a.lease.id.cmp(&b.lease.id));
    let mut items = Vec::new();
    for (i, l) in leased.iter().enumerate() {
        let status = match i % 4 {
            0 => deferred(l.status.clone(), t, t + HOUR_MS),
            // A stale token: this item alone must come back `LeaseLost`.
            3 if i == 3 => {
                let mut lease = l.lease.clone();
                lease.token.push_str("-stale");
                items.push((lease, delivered(l.status.clone(), t)));
                continue;
            }
            // A lease without the head read with it (one made by hand): the
            // queue reads what it needs itself.
            _ if i == 5 => {
                let mut lease = l.lease.clone();
                lease.head = Default::default();
                items.push((lease, delivered(l.status.clone(), t)));
                continue;
            }
            _ => delivered(l.status.clone(), t),
        };
        items.push((l.lease.clone(), status));
    }
    // An invalid status (pending without a next attempt) fails alone.
    let invalid = {
        let l = &leased[7];
        let mut s = l.status.clone();
        s.next_attempt_ms = None;
        (l.lease.clone(), s)
    };
    let (bad_lease, bad_status) = invalid;
    let i7 = items
        .iter()
        .position(|(l, _)| l.id == bad_lease.id)
        .unwrap();
    items[i7] = (bad_lease, bad_status);
    let results = q.finish_batch(items.clone()).await.unwrap();
    assert_eq!(results.len(), items.len());
    let mut delivered_n = 0;
    for (i, ((lease, status), result)) in items.iter().zip(&results).enumerate() {
        match (i, result) {
            (3, Ok(FinishResult::LeaseLost)) => {}
            (7, Err(QueueError::Invalid(_))) => {}
            (i, Ok(FinishResult::Rescheduled)) if i % 4 == 0 => {
                assert_eq!(
                    status_of(q, &lease.id).await.next_attempt_ms,
                    Some(t + HOUR_MS)
                );
            }
            (i, Ok(FinishResult::Finalized)) if i != 3 && i != 7 && i % 4 != 0 => {
                assert!(status_of(q, &lease.id).await.is_final());
                assert_eq!(
                    q.get(&lease.id).await.unwrap(),
                    None,
                    "body of {}",
                    lease.id
                );
                delivered_n += 1;
            }
            (i, r) => panic!("item {i} ({}): {r:?}", status.id),
        }
    }
    let after = q.delivery_totals().await.unwrap();
    assert_eq!(after.delivered - before.delivered, delivered_n);
    // Only the finished messages left the counts: not the one whose lease was
    // lost, nor the rescheduled or refused ones.
    let finalized: Vec<&str> = items
        .iter()
        .zip(&results)
        .filter(|(_, r)| matches!(r, Ok(FinishResult::Finalized)))
        .map(|((l, _), _)| l.id.as_str())
        .collect();
    let left: Vec<&QueuedMessage> = msgs
        .iter()
        .filter(|m| !finalized.contains(&m.envelope.id.as_str()))
        .collect();
    let left_counts = (
        left.len() as u64,
        left.iter().map(|m| m.body.len() as u64).sum::<u64>(),
    );
    assert_eq!(counts(q).await, left_counts);
    // Finishing again is refused per item (the leases are spent), not as a batch,
    // and changes no count.
    let again = q.finish_batch(items[..2].to_vec()).await.unwrap();
    assert!(
        again
            .iter()
            .all(|r| matches!(r, Ok(FinishResult::LeaseLost))),
        "{again:?}"
    );
    assert_eq!(counts(q).await, left_counts);
    assert_eq!(q.delivery_totals().await.unwrap(), after);
    assert!(q.finish_batch(Vec::new()).await.unwrap().is_empty());
}

async fn check_finish_reschedules_with_attempts(q: &dyn Queue) {
    let t = now_ms();
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test", "b@beta.test"]);
    q.enqueue(&msg).await.unwrap();
    let id = &msg.envelope.id;
    let leased = lease_id(q, t, "worker", id).await;

    // a@ delivered, b@ deferred; b@ already has a long history, of which only the
    // most recent attempts are kept.
    let mut status = leased.status.clone();
    status.rcpts[0].state = RcptState::Delivered;
    status.rcpts[0].record(attempt(t, AttemptResult::Delivered, "250 2.0.0 Ok"));
    for i in 0..(MAX_ATTEMPTS_KEPT as u64 + 5) {
        status.rcpts[1].record(attempt(
            t + i,
            AttemptResult::Deferred,
            &format!("451 #{i}"),
        ));
    }
    status.rcpts[1]
        .attempts
        .push(attempt(t + 99, AttemptResult::Deferred, "451 last"));
    status.attempts = 1;
    status.next_attempt_ms = Some(t + HOUR_MS);
    let result = q.finish(&leased.lease, status.clone()).await.unwrap();
    assert_eq!(result, FinishResult::Rescheduled);

    let (_, stored) = q.status(id).await.unwrap().unwrap();
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.next_attempt_ms, Some(t + HOUR_MS));
    assert_eq!(stored.leased_until_ms, None);
    assert_eq!(stored.final_at_ms, None);
    assert_eq!(stored.rcpts[0], status.rcpts[0]);
    assert_eq!(stored.rcpts[1].state, RcptState::Pending);
    let history = &stored.rcpts[1].attempts;
    assert_eq!(
        history.len(),
        MAX_ATTEMPTS_KEPT,
        "only the most recent are kept"
    );
    assert_eq!(history.last().unwrap().reply, "451 last");
    assert_eq!(history[0].reply, "451 #6");
    assert_eq!(history[0].mx.as_deref(), Some("mx1.example.test"));
    assert_eq!(history[0].ip.as_deref(), Some("192.0.2.25"));
    assert_eq!(history[0].tls.as_ref().unwrap().version, "TLSv1.3");

    assert_stored(q, "rescheduled message keeps its body", &msg).await;
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.messages, stats.leased, stats.deferred), (1, 0, 1));
    assert!(
        q.lease_due(t + HOUR_MS - 1, LEASE_MS, 10, "w")
            .await
            .unwrap()
            .is_empty()
    );
    let again = lease_id(q, t + HOUR_MS, "w", id).await;
    assert_eq!(again.status.attempts, 1);
    assert_eq!(again.status.rcpts, stored.rcpts);

    // A finish whose status was for another message, or that would drop a pending
    // recipient, is refused and changes nothing.
    let mut wrong = again.status.clone();
    wrong.id = QueueId::generate();
    assert!(matches!(
        q.finish(&again.lease, wrong).await,
        Err(QueueError::Invalid(_))
    ));
    let mut losing = again.status.clone();
    losing.next_attempt_ms = None;
    assert!(matches!(
        q.finish(&again.lease, losing).await,
        Err(QueueError::Invalid(_))
    ));
    assert!(
        q.renew(&again.lease, LEASE_MS).await.unwrap(),
        "still leased"
    );
    assert_eq!(q.stats().await.unwrap().deferred, 1);
}

async fn check_finish_final_keeps_only_a_status_record(q: &dyn Queue) {
    let t = now_ms();
    let keep = message_to(QueueId::generate(), t + HOUR_MS, &["k@alpha.test"]);
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test", "b@beta.test"]);
    q.enqueue(&keep).await.unwrap();
    q.enqueue(&msg).await.unwrap();
    let id = &msg.envelope.id;
    let first = lease_id(q, t, "worker", id).await;
    q.finish(&first.lease, deferred(first.status.clone(), t, t + 10))
        .await
        .unwrap();
    assert_eq!(q.stats().await.unwrap().deferred, 1);
    assert_eq!(
        q.delivery_totals().await.unwrap(),
        DeliveryTotals::default(),
        "nothing final yet"
    );
    let second = lease_id(q, t + 10, "worker", id).await;
    let mut status = second.status.clone();
    status.rcpts[1].state = RcptState::Bounced;
    status.rcpts[1].record(attempt(
        t + 10,
        AttemptResult::Bounced,
        "550 5.1.1 no such user",
    ));
    let status = delivered(status, t + 11);
    assert_eq!(
        q.finish(&second.lease, status.clone()).await.unwrap(),
        FinishResult::Finalized
    );

    assert_eq!(q.get(id).await.unwrap(), None, "the body is gone");
    let (env, stored) = q.status(id).await.unwrap().expect("status record kept");
    assert_eq!(env, msg.envelope);
    assert_eq!(stored.next_attempt_ms, None);
    assert!(stored.final_at_ms.is_some());
    assert_eq!(stored.attempts, 2);
    assert_eq!(stored.rcpts[0].state, RcptState::Delivered);
    assert_eq!(stored.rcpts[1].state, RcptState::Bounced);
    assert_eq!(stored.rcpts[1].attempts.len(), 2);
    assert_eq!(
        q.stats().await.unwrap(),
        QueueStats {
            messages: 1,
            bytes: keep.body.len() as u64,
            leased: 0,
            deferred: 0,
            oldest_ms: Some(keep.envelope.id.timestamp_ms()),
        }
    );
    assert_eq!(
        q.list_ids(10).await.unwrap(),
        vec![keep.envelope.id.clone()]
    );
    let listed = q.list(ListFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 1, "final messages are not listed");
    assert!(
        q.lease_due(t + 2 * HOUR_MS, LEASE_MS, 10, "w")
            .await
            .unwrap()
            .len()
            == 1
    );
    assert_eq!(
        q.finish(&second.lease, status).await.unwrap(),
        FinishResult::LeaseLost,
        "finishing twice"
    );
    assert_eq!(
        q.delivery_totals().await.unwrap(),
        DeliveryTotals {
            delivered: 1,
            bounced: 1,
            expired: 0
        },
        "counted once, when the message became final"
    );
    assert_eq!(q.retry_now(RetrySelector::Id(id.clone())).await.unwrap(), 0);

    // Deleting a final message removes its record; it was no longer queued.
    assert!(!q.remove(id).await.unwrap());
    assert_eq!(q.status(id).await.unwrap(), None);
}

async fn check_release_makes_work_due_at_once(q: &dyn Queue) {
    let t = now_ms();
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test"]);
    q.enqueue(&msg).await.unwrap();
    let id = &msg.envelope.id;
    let first = lease_id(q, t, "worker-a", id).await;
    q.finish(&first.lease, deferred(first.status.clone(), t, t + 1))
        .await
        .unwrap();
    let leased = lease_id(q, t + 1, "worker-a", id).await;
    assert_eq!(leased.status.attempts, 1);

    // Draining: hand back without recording anything.
    let unknown = Lease {
        id: QueueId::generate(),
        token: "nobody#0".into(),
        expires_ms: t,
        head: Default::default(),
    };
    q.release(&[leased.lease.clone(), unknown]).await.unwrap();
    q.release(&[]).await.unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.leased, stats.deferred), (0, 1));
    let status = status_of(q, id).await;
    assert_eq!(status.attempts, 1, "status kept");
    assert_eq!(status.leased_until_ms, None);
    assert!(status.next_attempt_ms.unwrap() <= now_ms());
    assert_eq!(
        q.finish(&leased.lease, delivered(leased.status.clone(), t))
            .await
            .unwrap(),
        FinishResult::LeaseLost,
        "a released lease is gone"
    );
    let again = lease_id(q, now_ms(), "worker-b", id).await;
    assert_eq!(again.status.attempts, 1);
    assert_eq!(again.status.rcpts, status.rcpts);
}

/// The heartbeat of a worker holding a batch: one call renews every lease still held
/// (over every shard) and names the ones that were lost, without touching them.
async fn check_renew_all_extends_held_leases_and_names_lost_ones(q: &dyn Queue) {
    const HELD: usize = 40;
    let t = now_ms();
    let mut msgs = Vec::new();
    for i in 0..HELD + 3 {
        let msg = message_to(QueueId::generate(), t - i as u64, &["a@alpha.test"]);
        q.enqueue(&msg).await.unwrap();
        msgs.push(msg);
    }
    // Short leases: without renewal they run out at t + 1000.
    let leased = q.lease_due(t, 1000, 1000, "worker-a").await.unwrap();
    assert_eq!(leased.len(), HELD + 3);
    let lease_of = |id: &QueueId| {
        leased
            .iter()
            .find(|l| &l.lease.id == id)
            .unwrap()
            .lease
            .clone()
    };
    let finished = &msgs[HELD].envelope.id;
    let removed = &msgs[HELD + 1].envelope.id;
    let taken_over = &msgs[HELD + 2].envelope.id;
    let done = leased.iter().find(|l| &l.lease.id == finished).unwrap();
    assert_eq!(
        q.finish(&done.lease, delivered(done.status.clone(), t))
            .await
            .unwrap(),
        FinishResult::Finalized
    );
    assert!(q.remove(removed).await.unwrap());
    // `taken_over`'s lease is handed back, then another worker takes it.
    q.release(&[lease_of(taken_over)]).await.unwrap();
    let other = lease_id(q, now_ms(), "worker-b", taken_over).await;
    let unknown = Lease {
        id: QueueId::generate(),
        token: "worker-a#0".into(),
        expires_ms: t,
        head: Default::default(),
    };

    let mut all: Vec<Lease> = msgs.iter().map(|m| lease_of(&m.envelope.id)).collect();
    all.push(unknown.clone());
    let before = now_ms();
    let mut lost = q.renew_all(&all, LEASE_MS).await.unwrap();
    lost.sort();
    let mut want = vec![
        finished.clone(),
        removed.clone(),
        taken_over.clone(),
        unknown.id.clone(),
    ];
    want.sort();
    assert_eq!(lost, want, "exactly the leases no longer held");
    assert!(q.renew_all(&[], LEASE_MS).await.unwrap().is_empty());

    // Every held lease now runs to about now + LEASE_MS, far past t + 1000.
    for m in &msgs[..HELD] {
        let until = status_of(q, &m.envelope.id).await.leased_until_ms;
        assert!(
            until.is_some_and(|u| u >= before + LEASE_MS),
            "{}: leased until {until:?}",
            m.envelope.id
        );
    }
    assert!(
        q.lease_due(t + 5000, LEASE_MS, 1000, "worker-c")
            .await
            .unwrap()
            .is_empty(),
        "renewed leases are not taken by another worker"
    );
    // The lost lease of worker-b's message was not renewed or disturbed.
    assert_eq!(
        status_of(q, taken_over).await.leased_until_ms,
        Some(other.lease.expires_ms)
    );
    assert_eq!(
        q.finish(&other.lease, delivered(other.status.clone(), t))
            .await
            .unwrap(),
        FinishResult::Finalized
    );
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.messages, stats.leased), (HELD as u64, HELD as u64));
}

/// What a worker took but will not start goes back untouched, each message due when
/// it was (its place in line) or when the worker says; the lease ends with it.
async fn check_give_back_keeps_each_message_in_its_place(q: &dyn Queue) {
    let t = now_ms();
    let ids = ids_in_order(3);
    let msgs: Vec<QueuedMessage> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| message_to(id.clone(), t - 3000 + 1000 * i as u64, &["a@alpha.test"]))
        .collect();
    for m in &msgs {
        q.enqueue(m).await.unwrap();
    }
    let leased = lease_ids(q, t, "worker-a", &[&ids[0], &ids[1], &ids[2]]).await;
    let due_then: Vec<u64> = leased
        .iter()
        .map(|l| l.status.next_attempt_ms.unwrap())
        .collect();
    assert_eq!(due_then, [t - 3000, t - 2000, t - 1000]);

    // The first two go back in their place; the third is held back for an hour.
    q.give_back(&[
        (leased[0].lease.clone(), due_then[0]),
        (leased[1].lease.clone(), due_then[1]),
        (leased[2].lease.clone(), t + HOUR_MS),
    ])
    .await
    .unwrap();
    q.give_back(&[]).await.unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.messages, stats.leased, stats.deferred), (3, 0, 0));
    for (i, want) in [t - 3000, t - 2000, t + HOUR_MS].into_iter().enumerate() {
        let st = status_of(q, &ids[i]).await;
        assert_eq!(st.next_attempt_ms, Some(want), "message {i}");
        assert_eq!(st.leased_until_ms, None, "message {i}");
        assert_eq!(st.attempts, 0, "no attempt recorded for message {i}");
        assert_eq!(st.rcpts, leased[i].status.rcpts, "message {i}");
    }
    assert_eq!(
        q.finish(&leased[0].lease, delivered(leased[0].status.clone(), t))
            .await
            .unwrap(),
        FinishResult::LeaseLost,
        "a lease given back is gone"
    );
    assert_eq!(
        q.renew_all(&[leased[1].lease.clone()], LEASE_MS)
            .await
            .unwrap(),
        [ids[1].clone()],
        "nor can it be renewed"
    );

    // Another worker takes the two due now (the third waits for its hour), each
    // still due from when it first was.
    let again = lease_ids(q, t, "worker-b", &[&ids[0], &ids[1]]).await;
    assert_eq!(again[0].status.next_attempt_ms, Some(t - 3000));
    assert_eq!(again[1].status.next_attempt_ms, Some(t - 2000));
    // A stale give-back (worker-a's old lease) leaves worker-b's lease alone.
    q.give_back(&[(leased[0].lease.clone(), t)]).await.unwrap();
    assert_eq!(
        status_of(q, &ids[0]).await.leased_until_ms,
        Some(t + LEASE_MS)
    );
    assert_eq!(
        q.finish(&again[0].lease, delivered(again[0].status.clone(), t))
            .await
            .unwrap(),
        FinishResult::Finalized
    );
}

/// `delete` of a message in flight: the worker learns on finish that it is gone.
async fn check_remove_clears_lease_and_status(q: &dyn Queue) {
    let t = now_ms();
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test"]);
    q.enqueue(&msg).await.unwrap();
    let id = &msg.envelope.id;
    let first = lease_id(q, t, "w", id).await;
    q.finish(&first.lease, deferred(first.status.clone(), t, t))
        .await
        .unwrap();
    let leased = lease_id(q, t, "w", id).await;
    assert!(q.remove(id).await.unwrap());
    assert_eq!(q.status(id).await.unwrap(), None);
    assert!(!q.renew(&leased.lease, LEASE_MS).await.unwrap());
    assert_eq!(
        q.finish(&leased.lease, delivered(leased.status.clone(), t))
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    assert_eq!(q.stats().await.unwrap(), QueueStats::default());
    assert!(
        q.lease_due(t + 2 * LEASE_MS, LEASE_MS, 10, "w")
            .await
            .unwrap()
            .is_empty()
    );
}

/// Enqueueing an id again (a retried write) starts the message over: fresh status,
/// due at arrival, any lease void, counted once.
async fn check_enqueue_again_resets_status_and_lease(q: &dyn Queue) {
    let t = now_ms();
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test"]);
    q.enqueue(&msg).await.unwrap();
    let id = &msg.envelope.id;
    let first = lease_id(q, t, "w", id).await;
    q.finish(&first.lease, deferred(first.status.clone(), t, t))
        .await
        .unwrap();
    let held = lease_id(q, t, "w", id).await;
    assert_eq!(q.stats().await.unwrap().deferred, 1);

    q.enqueue(&msg).await.unwrap();
    assert_eq!(status_of(q, id).await, MessageStatus::new(&msg.envelope));
    let stats = q.stats().await.unwrap();
    assert_eq!(
        (stats.messages, stats.leased, stats.deferred),
        (1, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        q.finish(&held.lease, delivered(held.status.clone(), t))
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    let again = lease_id(q, t, "w", id).await;
    assert_eq!(again.status.attempts, 0);

    // And after it went final, the same id is a new queued message again.
    q.finish(&again.lease, delivered(again.status.clone(), t))
        .await
        .unwrap();
    q.enqueue(&msg).await.unwrap();
    assert_stored(q, "enqueued again after final", &msg).await;
    assert_eq!(counts(q).await, (1, msg.body.len() as u64));
    assert_eq!(status_of(q, id).await.final_at_ms, None);
    lease_id(q, t, "w", id).await;
}

async fn check_concurrent_leases_take_each_message_once(q: Arc<dyn Queue>) {
    const MESSAGES: usize = 300;
    const TASKS: usize = 5;
    let t = now_ms();
    let mut want = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let msg = message_to(QueueId::generate(), t - i as u64, &["a@alpha.test"]);
        q.enqueue(&msg).await.unwrap();
        want.push(msg.envelope.id);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let q = q.clone();
        tasks.spawn(async move {
            let owner = format!("worker-{task}");
            let mut mine = Vec::new();
            loop {
                let got = q.lease_due(t, LEASE_MS, 7, &owner).await.unwrap();
                if got.is_empty() {
                    break;
                }
                mine.extend(got.into_iter().map(|l| l.lease.id));
            }
            mine
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("lease task panicked"));
    }
    let distinct: HashSet<&QueueId> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "a message was leased twice");
    all.sort();
    want.sort();
    assert_eq!(all, want, "every message leased");
    let stats = q.stats().await.unwrap();
    assert_eq!(
        (stats.messages, stats.leased),
        (MESSAGES as u64, MESSAGES as u64)
    );
}

/// Three deferred messages: to alpha only, to beta only, and to both with alpha
/// already delivered. Returns them in that order.
async fn deferred_trio(q: &dyn Queue, t: u64) -> Vec<QueuedMessage> {
    let ids = ids_in_order(3);
    let msgs = vec![
        message_to(ids[0].clone(), t, &["a@alpha.test"]),
        message_to(ids[1].clone(), t, &["b@beta.test"]),
        message_to(ids[2].clone(), t, &["a@ALPHA.test", "b@beta.test"]),
    ];
    for msg in &msgs {
        q.enqueue(msg).await.unwrap();
    }
    let leases = lease_ids(q, t, "w", &[&ids[0], &ids[1], &ids[2]]).await;
    for leased in leases {
        let mut status = leased.status.clone();
        if status.rcpts.len() == 2 {
            status.rcpts[0].state = RcptState::Delivered;
        }
        let result = q
            .finish(&leased.lease, deferred(status, t, t + HOUR_MS))
            .await
            .unwrap();
        assert_eq!(result, FinishResult::Rescheduled);
    }
    msgs
}

async fn check_retry_now_by_id_domain_and_all(q: &dyn Queue) {
    let t = now_ms();
    let msgs = deferred_trio(q, t).await;
    let [alpha, beta, both] = [0, 1, 2].map(|i| msgs[i].envelope.id.clone());

    assert_eq!(
        q.retry_now(RetrySelector::Id(alpha.clone())).await.unwrap(),
        1
    );
    assert!(status_of(q, &alpha).await.next_attempt_ms.unwrap() <= now_ms());
    assert_eq!(
        status_of(q, &beta).await.next_attempt_ms,
        Some(t + HOUR_MS),
        "others untouched"
    );
    assert_eq!(
        q.retry_now(RetrySelector::Id(alpha.clone())).await.unwrap(),
        0,
        "already due"
    );
    assert_eq!(
        q.retry_now(RetrySelector::Id(QueueId::generate()))
            .await
            .unwrap(),
        0
    );
    // `both` has no pending recipient at alpha any more.
    assert_eq!(
        q.retry_now(RetrySelector::Domain("ALPHA.test".into()))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        q.retry_now(RetrySelector::Domain("beta.test".into()))
            .await
            .unwrap(),
        2
    );
    for id in [&beta, &both] {
        assert!(status_of(q, id).await.next_attempt_ms.unwrap() <= now_ms());
    }
    let taken = q.lease_due(now_ms(), LEASE_MS, 10, "w").await.unwrap();
    assert_eq!(
        ids_of(&taken),
        vec![alpha.clone(), beta.clone(), both.clone()]
    );

    // Messages in flight are not touched; `All` takes the rest.
    let later = message_to(QueueId::generate(), t + HOUR_MS, &["c@gamma.test"]);
    q.enqueue(&later).await.unwrap();
    assert_eq!(q.retry_now(RetrySelector::All).await.unwrap(), 1);
    assert_eq!(q.retry_now(RetrySelector::All).await.unwrap(), 0);
    assert_eq!(
        q.retry_now(RetrySelector::Id(alpha.clone())).await.unwrap(),
        0
    );
    let taken = q.lease_due(now_ms(), LEASE_MS, 10, "w").await.unwrap();
    assert_eq!(ids_of(&taken), vec![later.envelope.id.clone()]);
}

async fn check_list_filters(q: &dyn Queue) {
    let t = now_ms();
    let msgs = deferred_trio(q, t).await;
    let ids: Vec<QueueId> = msgs.iter().map(|m| m.envelope.id.clone()).collect();
    let fresh = message_to(QueueId::generate(), t, &["f@alpha.test"]);
    let in_flight = message_to(QueueId::generate(), t, &["i@beta.test"]);
    let done = message_to(QueueId::generate(), t, &["d@alpha.test"]);
    for msg in [&fresh, &in_flight, &done] {
        q.enqueue(msg).await.unwrap();
    }
    let [fresh_lease, leased, finished]: [Leased; 3] = lease_ids(
        q,
        t,
        "w",
        &[
            &fresh.envelope.id,
            &in_flight.envelope.id,
            &done.envelope.id,
        ],
    )
    .await
    .try_into()
    .unwrap();
    q.finish(&finished.lease, delivered(finished.status.clone(), t))
        .await
        .unwrap();
    q.release(&[fresh_lease.lease]).await.unwrap();

    let listed = |filter: ListFilter| async move {
        q.list(filter)
            .await
            .unwrap()
            .into_iter()
            .map(|(env, status)| {
                assert_eq!(env.id, status.id);
                env.id
            })
            .collect::<Vec<_>>()
    };
    let mut everything = ids.clone();
    everything.extend([fresh.envelope.id.clone(), in_flight.envelope.id.clone()]);
    everything.sort();
    assert_eq!(listed(ListFilter::default()).await, everything);
    assert_eq!(
        listed(ListFilter {
            limit: 2,
            ..Default::default()
        })
        .await,
        everything[..2]
    );
    assert!(
        listed(ListFilter {
            limit: 0,
            ..Default::default()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        listed(ListFilter {
            deferred_only: true,
            ..Default::default()
        })
        .await,
        ids
    );
    let mut alpha = vec![ids[0].clone(), fresh.envelope.id.clone()];
    alpha.sort();
    assert_eq!(
        listed(ListFilter {
            domain: Some("Alpha.Test".into()),
            ..Default::default()
        })
        .await,
        alpha
    );
    assert_eq!(
        listed(ListFilter {
            deferred_only: true,
            domain: Some("beta.test".into()),
            limit: 1,
        })
        .await,
        vec![ids[1].clone()]
    );
    let all = q.list(ListFilter::default()).await.unwrap();
    let (_, flying) = all
        .iter()
        .find(|(env, _)| env.id == in_flight.envelope.id)
        .unwrap();
    assert_eq!(flying.leased_until_ms, Some(leased.lease.expires_ms));
    let (_, waiting) = all.iter().find(|(env, _)| env.id == ids[1]).unwrap();
    assert_eq!(waiting.next_attempt_ms, Some(t + HOUR_MS));
    assert_eq!(waiting.attempts, 1);
    assert_eq!(waiting.rcpts[0].attempts.len(), 1);
}

/// Run with a short status retention: a final record disappears after it.
async fn check_final_status_expires(q: &dyn Queue, retention: Duration) {
    let t = now_ms();
    let msg = message_to(QueueId::generate(), t, &["a@alpha.test"]);
    q.enqueue(&msg).await.unwrap();
    let id = &msg.envelope.id;
    let leased = lease_id(q, t, "w", id).await;
    let finished_at = std::time::Instant::now();
    q.finish(&leased.lease, delivered(leased.status.clone(), t))
        .await
        .unwrap();
    if finished_at.elapsed() < retention / 2 {
        assert!(q.status(id).await.unwrap().is_some(), "readable at first");
    }
    let deadline = finished_at + retention + Duration::from_secs(10);
    loop {
        // Leasing is what purges on the embedded queue; reads ignore expired ones.
        q.lease_due(now_ms(), LEASE_MS, 1, "w").await.unwrap();
        if q.status(id).await.unwrap().is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "final record still there {:?} after finish",
            finished_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        finished_at.elapsed() >= retention,
        "expired after {:?}, before the retention",
        finished_at.elapsed()
    );
    assert_eq!(q.stats().await.unwrap(), QueueStats::default());
}

/// State to carry across a reopen or restart: a leased message, a deferred one and
/// a final one.
struct Durable {
    t: u64,
    leased: Leased,
    deferred: QueuedMessage,
    done: QueuedMessage,
}

async fn prepare_durable_state(q: &dyn Queue) -> Durable {
    let t = now_ms();
    let ids = ids_in_order(3);
    let msgs: Vec<QueuedMessage> = ids
        .iter()
        .map(|id| message_to(id.clone(), t, &["a@alpha.test"]))
        .collect();
    for msg in &msgs {
        q.enqueue(msg).await.unwrap();
    }
    let [leased, d, f]: [Leased; 3] = lease_ids(q, t, "w", &[&ids[0], &ids[1], &ids[2]])
        .await
        .try_into()
        .unwrap();
    q.finish(&d.lease, deferred(d.status.clone(), t, t + HOUR_MS))
        .await
        .unwrap();
    q.finish(&f.lease, delivered(f.status.clone(), t))
        .await
        .unwrap();
    Durable {
        t,
        leased,
        deferred: msgs[1].clone(),
        done: msgs[2].clone(),
    }
}

/// How leases taken before a reopen or restart come out of it.
#[derive(PartialEq)]
enum LeasesAfter {
    /// Still held (Redis: other relays may be delivering them).
    Held,
    /// Due again at once (embedded: only one process can open the file, so leases
    /// found on open are a dead process's).
    Due,
}

async fn check_durable_state(q: &dyn Queue, d: &Durable, leases: LeasesAfter) {
    let t = d.t;
    let stats = q.stats().await.unwrap();
    let leased = u64::from(leases == LeasesAfter::Held);
    assert_eq!(
        (stats.messages, stats.leased, stats.deferred),
        (2, leased, 1),
        "{stats:?}"
    );
    let status = status_of(q, &d.deferred.envelope.id).await;
    assert_eq!(status.attempts, 1);
    assert_eq!(status.next_attempt_ms, Some(t + HOUR_MS));
    assert_eq!(status.rcpts[0].attempts.len(), 1);
    assert_stored(q, "deferred", &d.deferred).await;
    let (_, done) = q
        .status(&d.done.envelope.id)
        .await
        .unwrap()
        .expect("final record");
    assert_eq!(done.rcpts[0].state, RcptState::Delivered);
    assert_eq!(q.get(&d.done.envelope.id).await.unwrap(), None);

    let lease = match leases {
        LeasesAfter::Held => {
            assert!(
                q.lease_due(t + 1, LEASE_MS, 10, "after")
                    .await
                    .unwrap()
                    .is_empty(),
                "the lease held and the deferred message waits"
            );
            assert!(q.renew(&d.leased.lease, LEASE_MS).await.unwrap());
            d.leased.lease.clone()
        }
        LeasesAfter::Due => {
            let status = status_of(q, &d.leased.lease.id).await;
            assert_eq!(status.leased_until_ms, None);
            assert!(!q.renew(&d.leased.lease, LEASE_MS).await.unwrap());
            lease_id(q, now_ms(), "after", &d.leased.lease.id)
                .await
                .lease
        }
    };
    let result = q
        .finish(&lease, delivered(d.leased.status.clone(), t))
        .await
        .unwrap();
    assert_eq!(result, FinishResult::Finalized);
    let later = lease_id(q, t + HOUR_MS, "after", &d.deferred.envelope.id).await;
    assert_eq!(later.status.attempts, 1);
    assert_eq!(q.stats().await.unwrap().messages, 1);
}

// ---------------------------------------------------------------------------------
// Backends

/// A queue plus whatever must outlive it (temp dir, server processes). Fields drop in
/// order: the queue first, then its store.
struct Fixture {
    queue: Arc<dyn Queue>,
    _store: Box<dyn Any + Send>,
}

async fn embedded(options: QueueOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let queue = EmbeddedQueue::open_with(dir.path(), options).unwrap();
    Fixture {
        queue: Arc::new(queue),
        _store: Box::new(dir),
    }
}

async fn redis_standalone(options: QueueOptions) -> Fixture {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let queue = RedisQueue::connect_with(&server.config("mrtest"), options)
        .await
        .unwrap();
    Fixture {
        queue: Arc::new(queue),
        _store: Box::new(server),
    }
}

async fn redis_cluster(options: QueueOptions) -> Fixture {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let queue = RedisQueue::connect_with(&cluster.config("mrtest"), options)
        .await
        .unwrap();
    Fixture {
        queue: Arc::new(queue),
        _store: Box::new(cluster),
    }
}

/// The master of a master + replica pair, found through one sentinel.
async fn redis_sentinel(options: QueueOptions) -> Fixture {
    let sentinel = tokio::task::spawn_blocking(|| RedisSentinel::start(1, None, None))
        .await
        .unwrap();
    let queue = RedisQueue::connect_with(&sentinel.config("mrtest"), options)
        .await
        .unwrap();
    Fixture {
        queue: Arc::new(queue),
        _store: Box::new(sentinel),
    }
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_trip_is_byte_identical() {
                let f = super::$backend(QueueOptions::default()).await;
                check_round_trip_is_byte_identical(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unknown_ids_are_absent() {
                let f = super::$backend(QueueOptions::default()).await;
                check_unknown_ids_are_absent(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn list_ids_in_arrival_order() {
                let f = super::$backend(QueueOptions::default()).await;
                check_list_ids_in_arrival_order(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stats_count_messages_and_bytes() {
                let f = super::$backend(QueueOptions::default()).await;
                check_stats_count_messages_and_bytes(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn remove_is_idempotent() {
                let f = super::$backend(QueueOptions::default()).await;
                check_remove_is_idempotent(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn enqueue_again_replaces() {
                let f = super::$backend(QueueOptions::default()).await;
                check_enqueue_again_replaces(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_enqueues() {
                let f = super::$backend(QueueOptions::default()).await;
                check_concurrent_enqueues(f.queue.clone()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn enqueue_creates_a_pending_status() {
                let f = super::$backend(QueueOptions::default()).await;
                check_enqueue_creates_a_pending_status(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lease_takes_due_messages_once() {
                let f = super::$backend(QueueOptions::default()).await;
                check_lease_takes_due_messages_once(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expired_lease_comes_back_to_another_owner() {
                let f = super::$backend(QueueOptions::default()).await;
                check_expired_lease_comes_back_to_another_owner(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expired_but_untaken_lease_can_still_finish() {
                let f = super::$backend(QueueOptions::default()).await;
                check_expired_but_untaken_lease_can_still_finish(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn finish_reschedules_with_attempts() {
                let f = super::$backend(QueueOptions::default()).await;
                check_finish_reschedules_with_attempts(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn finish_final_keeps_only_a_status_record() {
                let f = super::$backend(QueueOptions::default()).await;
                check_finish_final_keeps_only_a_status_record(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn release_makes_work_due_at_once() {
                let f = super::$backend(QueueOptions::default()).await;
                check_release_makes_work_due_at_once(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn renew_all_extends_held_leases_and_names_lost_ones() {
                let f = super::$backend(QueueOptions::default()).await;
                check_renew_all_extends_held_leases_and_names_lost_ones(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn give_back_keeps_each_message_in_its_place() {
                let f = super::$backend(QueueOptions::default()).await;
                check_give_back_keeps_each_message_in_its_place(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn remove_clears_lease_and_status() {
                let f = super::$backend(QueueOptions::default()).await;
                check_remove_clears_lease_and_status(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn enqueue_again_resets_status_and_lease() {
                let f = super::$backend(QueueOptions::default()).await;
                check_enqueue_again_resets_status_and_lease(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_leases_take_each_message_once() {
                let f = super::$backend(QueueOptions::default()).await;
                check_concurrent_leases_take_each_message_once(f.queue.clone()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retry_now_by_id_domain_and_all() {
                let f = super::$backend(QueueOptions::default()).await;
                check_retry_now_by_id_domain_and_all(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn finish_batch_answers_each_item() {
                let f = super::$backend(QueueOptions::default()).await;
                check_finish_batch_answers_each_item(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn list_filters() {
                let f = super::$backend(QueueOptions::default()).await;
                check_list_filters(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn final_status_expires() {
                let retention = Duration::from_millis(1500);
                let f = super::$backend(QueueOptions {
                    status_retention: retention,
                    ..QueueOptions::default()
                })
                .await;
                check_final_status_expires(&*f.queue, retention).await;
            }
        }
    };
}

conformance!(embedded);
conformance!(redis_standalone);
conformance!(redis_cluster);
conformance!(redis_sentinel);

// ---------------------------------------------------------------------------------
// Backend-specific behaviour

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let kept = [message(noise(300_000, 7)), message(b"second\r\n".to_vec())];
    let removed = message(b"removed\r\n".to_vec());
    {
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        for msg in kept.iter().chain([&removed]) {
            q.enqueue(msg).await.unwrap();
        }
        assert!(q.remove(&removed.envelope.id).await.unwrap());
    }
    let q = EmbeddedQueue::open(dir.path()).unwrap();
    for msg in &kept {
        assert_stored(&q, "after reopen", msg).await;
    }
    assert_eq!(q.get(&removed.envelope.id).await.unwrap(), None);
    let mut want: Vec<QueueId> = kept.iter().map(|m| m.envelope.id.clone()).collect();
    want.sort();
    assert_eq!(q.list_ids(10).await.unwrap(), want);
    let bytes = kept.iter().map(|m| m.body.len() as u64).sum();
    assert_eq!(counts(&q).await, (2, bytes));
    // Still writable after reopen.
    let more = message(b"after reopen\r\n".to_vec());
    q.enqueue(&more).await.unwrap();
    assert_stored(&q, "written after reopen", &more).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_leases_statuses_and_final_records_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let state = {
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        prepare_durable_state(&q).await
    };
    let q = EmbeddedQueue::open(dir.path()).unwrap();
    check_durable_state(&q, &state, LeasesAfter::Due).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_leases_statuses_and_final_records_survive_restart() {
    let mut server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config("mrtest")).await.unwrap();
    let state = prepare_durable_state(&q).await;
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    // The same handle: it reconnects and reloads every script by itself.
    check_durable_state(&q, &state, LeasesAfter::Held).await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_leases_after_script_flush() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&cluster.config("mrtest"))
        .await
        .unwrap();
    let state = prepare_durable_state(&q).await;
    for &p in &cluster.ports() {
        assert_eq!(cluster.cli(p, &["SCRIPT", "FLUSH"]).unwrap(), "OK");
    }
    check_durable_state(&q, &state, LeasesAfter::Held).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_message_survives_restart_with_aof() {
    let mut server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config("mrtest")).await.unwrap();
    let msg = message(noise(1_000_000, 11));
    let removed = message(b"removed\r\n".to_vec());
    q.enqueue(&msg).await.unwrap();
    q.enqueue(&removed).await.unwrap();
    assert!(q.remove(&removed.envelope.id).await.unwrap());

    let mut server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    assert!(server.dir().join("appendonlydir").exists(), "AOF is on");

    // The same queue handle: it reconnects and reloads its scripts by itself.
    assert_stored(&q, "after restart", &msg).await;
    assert_eq!(q.get(&removed.envelope.id).await.unwrap(), None);
    assert_eq!(counts(&q).await, (1, msg.body.len() as u64));
    let more = message(b"after restart\r\n".to_vec());
    q.enqueue(&more).await.unwrap();
    assert!(
        q.remove(&more.envelope.id).await.unwrap(),
        "remove script reloaded too"
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_promptly_then_recovers() {
    let mut server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config("mrtest")).await.unwrap();
    let before = message(b"before\r\n".to_vec());
    q.enqueue(&before).await.unwrap();

    let mut server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();

    let during = message(b"during\r\n".to_vec());
    let result = tokio::time::timeout(Duration::from_secs(10), q.enqueue(&during))
        .await
        .expect("enqueue must answer within 10 s while Redis is down");
    match result {
        Err(QueueError::Unavailable(_) | QueueError::Timeout(_)) => {}
        other => panic!("enqueue while Redis is down: {other:?}"),
    }
    let ping = tokio::time::timeout(Duration::from_secs(10), q.ping())
        .await
        .expect("ping must answer within 10 s while Redis is down");
    assert!(ping.is_err(), "ping while Redis is down");

    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    // No reconnect by hand: the same handle works again on its first try.
    let after = message(b"after\r\n".to_vec());
    q.enqueue(&after)
        .await
        .expect("first enqueue after restart");
    q.ping().await.unwrap();
    assert_stored(&q, "written before the outage", &before).await;
    assert_stored(&q, "written after the outage", &after).await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_password_is_used_and_never_shown() {
    const PASSWORD: &str = "s3cret-Pa55word";
    let server = tokio::task::spawn_blocking(|| RedisServer::start_with_password(PASSWORD))
        .await
        .unwrap();
    let cfg = server.config("mrtest");
    let q = RedisQueue::connect(&cfg).await.unwrap();
    let msg = message(b"authenticated\r\n".to_vec());
    q.enqueue(&msg).await.unwrap();
    assert_stored(&q, "with password", &msg).await;
    assert!(!format!("{q:?}").contains(PASSWORD));

    let mut wrong = cfg.clone();
    wrong.password = Some(mailrelay::config::Secret("wrong-Pa55word".into()));
    let err = RedisQueue::connect(&wrong).await.unwrap_err().to_string();
    assert!(!err.contains("wrong-Pa55word"), "{err}");

    let mut in_url = cfg.clone();
    in_url.password = None;
    in_url.url = format!("redis://:{}@127.0.0.1:{}", "url-Pa55word", server.port());
    let err = RedisQueue::connect(&in_url).await.unwrap_err().to_string();
    assert!(!err.contains("url-Pa55word"), "{err}");
}

/// With no replica attached, a required acknowledgement cannot arrive: the enqueue
/// must fail rather than claim durability it does not have.
async fn check_wait_replicas_fails_without_replicas(mut cfg: mailrelay::config::RedisConfig) {
    cfg.wait_replicas = 1;
    let q = RedisQueue::connect(&cfg).await.unwrap();
    let msg = message(b"needs a replica\r\n".to_vec());
    let result = tokio::time::timeout(Duration::from_secs(10), q.enqueue(&msg))
        .await
        .expect("enqueue must answer within 10 s");
    match result {
        Err(QueueError::Unreplicated(m)) => assert!(m.contains("0 of 1 replicas"), "{m}"),
        other => panic!("enqueue without replicas: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wait_replicas_fails_without_replicas() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    check_wait_replicas_fails_without_replicas(server.config("mrtest")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_wait_replicas_fails_without_replicas() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    check_wait_replicas_fails_without_replicas(cluster.config("mrtest")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_spreads_messages_over_masters() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&cluster.config("mrtest"))
        .await
        .unwrap();
    let msgs: Vec<QueuedMessage> = (0..64)
        .map(|i| message(format!("m{i}\r\n").into_bytes()))
        .collect();
    for msg in &msgs {
        q.enqueue(msg).await.unwrap();
    }
    let ports = cluster.ports();
    let sizes: Vec<u64> = ports.iter().map(|&p| cluster.dbsize(p)).collect();
    let used = sizes.iter().filter(|&&n| n > 0).count();
    assert!(used >= 2, "keys per master {sizes:?}: all on one node");
    // Each message hash lives on exactly one master, beside its shard's keys.
    let messages_found: usize = ports
        .iter()
        .map(|&p| {
            let keys = cluster
                .cli(p, &["--scan", "--pattern", "mrtest:*:m:*"])
                .unwrap();
            keys.lines().filter(|l| !l.is_empty()).count()
        })
        .sum();
    assert_eq!(messages_found, msgs.len());
    let distinct: HashSet<QueueId> = q.list_ids(1000).await.unwrap().into_iter().collect();
    assert_eq!(distinct.len(), msgs.len());

    // A failover or restart empties a node's script cache; every node must recover.
    for &p in &ports {
        assert_eq!(cluster.cli(p, &["SCRIPT", "FLUSH"]).unwrap(), "OK");
    }
    let more: Vec<QueuedMessage> = (0..16)
        .map(|i| message(format!("after flush {i}\r\n").into_bytes()))
        .collect();
    for msg in &more {
        q.enqueue(msg).await.unwrap();
        assert_stored(&q, "after SCRIPT FLUSH", msg).await;
    }
    for &p in &ports {
        assert_eq!(cluster.cli(p, &["SCRIPT", "FLUSH"]).unwrap(), "OK");
    }
    for msg in &more {
        assert!(q.remove(&msg.envelope.id).await.unwrap());
    }
    assert_eq!(q.stats().await.unwrap().messages, msgs.len() as u64);
}
