//! One conformance suite for every [`Queue`] backend: each check is written once
//! against `dyn Queue` and run on the embedded queue (temp dir), a standalone
//! `redis-server`, and a three-master Redis Cluster. Backend-specific behaviour
//! (reopen, restart, outage, spread over masters) follows the suite.

mod support;

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mailrelay::queue::{
    BodyType, ClientInfo, DsnNotify, DsnRet, EmbeddedQueue, Envelope, MailParams, Queue,
    QueueError, QueueId, QueueStats, QueuedMessage, Recipient, RedisQueue, TlsInfo,
};
use support::redis::{RedisCluster, RedisServer};

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
        assert_eq!(
            q.stats().await.unwrap(),
            QueueStats {
                messages: i as u64 + 1,
                bytes: want_bytes
            }
        );
    }
    assert!(q.remove(&msgs[2].envelope.id).await.unwrap());
    assert_eq!(
        q.stats().await.unwrap(),
        QueueStats {
            messages: 2,
            bytes: 10
        }
    );
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
        q.stats().await.unwrap(),
        QueueStats {
            messages: 1,
            bytes: keep.body.len() as u64
        },
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
    assert_eq!(
        q.stats().await.unwrap(),
        QueueStats {
            messages: 1,
            bytes: 40
        }
    );
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
    assert_eq!(
        q.stats().await.unwrap(),
        QueueStats {
            messages: all.len() as u64,
            bytes
        }
    );
    let listed = q.list_ids(10_000).await.unwrap();
    let mut want: Vec<QueueId> = all.iter().map(|m| m.envelope.id.clone()).collect();
    want.sort();
    assert_eq!(listed, want, "every message listed once, in id order");
}

// ---------------------------------------------------------------------------------
// Backends

/// A queue plus whatever must outlive it (temp dir, server processes). Fields drop in
/// order: the queue first, then its store.
struct Fixture {
    queue: Arc<dyn Queue>,
    _store: Box<dyn Any + Send>,
}

async fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let queue = EmbeddedQueue::open(dir.path()).unwrap();
    Fixture {
        queue: Arc::new(queue),
        _store: Box::new(dir),
    }
}

async fn redis_standalone() -> Fixture {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let queue = RedisQueue::connect(&server.config("mrtest")).await.unwrap();
    Fixture {
        queue: Arc::new(queue),
        _store: Box::new(server),
    }
}

async fn redis_cluster() -> Fixture {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let queue = RedisQueue::connect(&cluster.config("mrtest"))
        .await
        .unwrap();
    Fixture {
        queue: Arc::new(queue),
        _store: Box::new(cluster),
    }
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_trip_is_byte_identical() {
                let f = super::$backend().await;
                check_round_trip_is_byte_identical(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unknown_ids_are_absent() {
                let f = super::$backend().await;
                check_unknown_ids_are_absent(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn list_ids_in_arrival_order() {
                let f = super::$backend().await;
                check_list_ids_in_arrival_order(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stats_count_messages_and_bytes() {
                let f = super::$backend().await;
                check_stats_count_messages_and_bytes(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn remove_is_idempotent() {
                let f = super::$backend().await;
                check_remove_is_idempotent(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn enqueue_again_replaces() {
                let f = super::$backend().await;
                check_enqueue_again_replaces(&*f.queue).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_enqueues() {
                let f = super::$backend().await;
                check_concurrent_enqueues(f.queue.clone()).await;
            }
        }
    };
}

conformance!(embedded);
conformance!(redis_standalone);
conformance!(redis_cluster);

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
    assert_eq!(q.stats().await.unwrap(), QueueStats { messages: 2, bytes });
    // Still writable after reopen.
    let more = message(b"after reopen\r\n".to_vec());
    q.enqueue(&more).await.unwrap();
    assert_stored(&q, "written after reopen", &more).await;
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
    assert_eq!(
        q.stats().await.unwrap(),
        QueueStats {
            messages: 1,
            bytes: msg.body.len() as u64
        }
    );
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
        Err(QueueError::Unavailable(m)) => assert!(m.contains("0 of 1 replicas"), "{m}"),
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
