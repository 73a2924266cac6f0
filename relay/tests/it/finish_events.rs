//! A batch of delivery outcomes is finished in one script call on standalone
//! Redis (one per shard involved in a cluster), each item against its own lease,
//! and its delivery events are written in that same call (standalone, Sentinel)
//! or the same redb transaction (embedded): once each, and only with the
//! outcomes. Counted with `INFO commandstats` on a private `redis-server`.

use crate::support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mailrelay::config::{EventsConfig, OutcomeBatchConfig};
use mailrelay::delivery::outcomes::OutcomeWriter;
use mailrelay::events::log::{
    EmbeddedEvents, EventMetrics, EventSink, EventStore, OutcomeEvents, RedisEvents, event_for,
    stream_key,
};
use mailrelay::metrics::Metrics;
use mailrelay::queue::{
    Attempt, AttemptResult, EmbeddedQueue, FinishResult, Ingest, Inspect, Lease, Leased, Leasing,
    MessageStatus, QueueError, QueueId, QueuedMessage, RcptState, RedisQueue, now_ms,
};
use mailrelay_admin_api::{Event, EventKind, EventQuery};
use support::message::queued;
use support::redis::{RedisCluster, RedisServer};

const LEASE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;

/// `calls` of every command in `INFO commandstats` output.
fn command_calls(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn calls_of(server: &RedisServer) -> HashMap<String, u64> {
    command_calls(&server.cli(&["INFO", "commandstats"]).unwrap())
}

fn reset_stats(server: &RedisServer) {
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
}

fn attempt(result: AttemptResult, reply: &str) -> Attempt {
    Attempt {
        at_ms: now_ms(),
        result,
        mx: Some("mx.example.net".into()),
        ip: Some("192.0.2.7".into()),
        tls: None,
        security: None,
        reply: reply.into(),
        category: None,
    }
}

fn delivered(mut s: MessageStatus) -> MessageStatus {
    for r in &mut s.rcpts {
        r.state = RcptState::Delivered;
        r.record(attempt(AttemptResult::Delivered, "250 2.0.0 Ok"));
    }
    s.attempts += 1;
    s.next_attempt_ms = None;
    s
}

fn deferred(mut s: MessageStatus) -> MessageStatus {
    for r in &mut s.rcpts {
        r.record(attempt(AttemptResult::Deferred, "451 4.7.1 later"));
    }
    s.attempts += 1;
    s.next_attempt_ms = Some(now_ms() + HOUR_MS);
    s
}

/// The event of `kind` for the message of `leased`.
fn event(kind: EventKind, leased: &Leased, msg: &QueuedMessage) -> Event {
    let mut e = event_for(kind, msg, None);
    e.queue_id = leased.lease.id.to_string();
    e.recipient = Some(msg.envelope.recipients[0].address.clone());
    e
}

/// Each of `leased` delivered, with its `delivered` event: a batch's outcomes and
/// their events, item by item, and those events as the queue takes them.
fn delivered_batch(
    leased: &[(Leased, QueuedMessage)],
) -> (Vec<(Lease, MessageStatus)>, Vec<Vec<Event>>, OutcomeEvents) {
    let (items, events): (Vec<_>, Vec<_>) = leased
        .iter()
        .map(|(l, m)| {
            (
                (l.lease.clone(), delivered(l.status.clone())),
                vec![event(EventKind::Delivered, l, m)],
            )
        })
        .unzip();
    let encoded = outcome_events(&events);
    (items, events, encoded)
}

async fn enqueue_and_lease(q: &(impl Ingest + Leasing), n: usize) -> Vec<(Leased, QueuedMessage)> {
    let mut msgs = HashMap::new();
    for i in 0..n {
        let m = queued(
            "sender@shop.test",
            &format!("r{i}@example.net"),
            "finish-test",
            format!("Subject: {i}\r\n\r\nbody {i}\r\n"),
        );
        q.enqueue(&m).await.unwrap();
        msgs.insert(m.envelope.id.clone(), m);
    }
    let leased = q
        .lease_due(now_ms() + 1000, LEASE_MS, n * 2, "finish-test")
        .await
        .unwrap();
    assert_eq!(leased.len(), n);
    let mut out: Vec<_> = leased
        .into_iter()
        .map(|l| {
            let m = msgs.remove(&l.lease.id).unwrap();
            (l, m)
        })
        .collect();
    out.sort_by(|a, b| a.0.lease.id.cmp(&b.0.lease.id));
    out
}

/// Items 0..: a stale lease (`LeaseLost`), a delivery (`Finalized`), a deferral
/// (`Rescheduled`), an invalid status (pending, no next attempt), then deliveries;
/// each with its event. Returns the items, their events and the answers expected.
type Batch = (
    Vec<(Lease, MessageStatus)>,
    Vec<Vec<Event>>,
    Vec<Result<FinishResult, ()>>,
);

fn mixed_batch(leased: &[(Leased, QueuedMessage)]) -> Batch {
    let mut items = Vec::new();
    let mut events = Vec::new();
    let mut want = Vec::new();
    for (i, (l, m)) in leased.iter().enumerate() {
        let (lease, status, kind, answer) = match i {
            0 => {
                let mut lease = l.lease.clone();
                lease.token.push_str("-stale");
                (
                    lease,
                    delivered(l.status.clone()),
                    EventKind::Delivered,
                    Ok(FinishResult::LeaseLost),
                )
            }
            2 => (
                l.lease.clone(),
                deferred(l.status.clone()),
                EventKind::Deferred,
                Ok(FinishResult::Rescheduled),
            ),
            3 => {
                let mut s = l.status.clone();
                s.next_attempt_ms = None;
                (l.lease.clone(), s, EventKind::Deferred, Err(()))
            }
            _ => (
                l.lease.clone(),
                delivered(l.status.clone()),
                EventKind::Delivered,
                Ok(FinishResult::Finalized),
            ),
        };
        items.push((lease, status));
        events.push(vec![event(kind, l, m)]);
        want.push(answer);
    }
    (items, events, want)
}

fn assert_all_finalized(got: &[Result<FinishResult, QueueError>]) {
    assert!(
        got.iter().all(|r| matches!(r, Ok(FinishResult::Finalized))),
        "{got:?}"
    );
}

fn check_answers(got: &[Result<FinishResult, QueueError>], want: &[Result<FinishResult, ()>]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        match (g, w) {
            (Ok(a), Ok(b)) if a == b => {}
            (Err(QueueError::Invalid(_)), Err(())) => {}
            _ => panic!("item {i}: got {g:?}, want {w:?}"),
        }
    }
}

/// `(queue id, kind)` of every event in the log, with how often it is there.
async fn stored_events(store: &EventStore) -> HashMap<(String, EventKind), usize> {
    let q = EventQuery {
        limit: Some(1000),
        ..Default::default()
    };
    let (found, truncated) = store.query(&q.check().unwrap()).await.unwrap();
    assert!(!truncated);
    let mut out = HashMap::new();
    for e in found {
        *out.entry((e.queue_id, e.kind)).or_insert(0) += 1;
    }
    out
}

fn expected_events(events: &[Vec<Event>]) -> HashMap<(String, EventKind), usize> {
    let mut out = HashMap::new();
    for e in events.iter().flatten() {
        *out.entry((e.queue_id.clone(), e.kind)).or_insert(0) += 1;
    }
    out
}

fn outcome_events(events: &[Vec<Event>]) -> OutcomeEvents {
    OutcomeEvents::new(events.iter().map(Vec::as_slice), 10_000).unwrap()
}

/// A private redis-server, a queue on it and the event log beside the queue.
async fn started() -> (RedisServer, RedisQueue, EventStore) {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&server.config("mrfin")).await.unwrap();
    let store = EventStore::Redis(RedisEvents::new(q.shared(), 10_000));
    (server, q, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_finishes_a_mixed_batch_and_writes_its_events_in_one_call() {
    let (server, q, store) = started().await;
    assert!(q.writes_outcome_events());
    // Enough messages to span many of the 16 shards.
    let leased = enqueue_and_lease(&q, 24).await;
    let (items, events, want) = mixed_batch(&leased);
    let encoded = outcome_events(&events);
    reset_stats(&server);
    let got = q
        .finish_batch_with_events(items.clone(), &encoded)
        .await
        .unwrap();
    check_answers(&got, &want);
    let calls = calls_of(&server);
    assert_eq!(calls.get("evalsha"), Some(&1), "{calls:?}");
    // Every event once, the lost lease's and the invalid item's too (they report
    // deliveries that happened), as plain XADDs in the finish call's round trip.
    assert_eq!(calls.get("xadd"), Some(&(items.len() as u64)), "{calls:?}");
    assert_eq!(stored_events(&store).await, expected_events(&events));

    // The outcomes are stored as answered.
    for ((lease, _), w) in items.iter().zip(&want) {
        let (_, status) = q.status(&lease.id).await.unwrap().unwrap();
        match w {
            Ok(FinishResult::Finalized) => {
                assert!(status.is_final());
                assert_eq!(q.get(&lease.id).await.unwrap(), None);
            }
            Ok(FinishResult::Rescheduled) => {
                assert_eq!(status.attempts, 1);
                assert!(status.next_attempt_ms.unwrap() > now_ms());
            }
            // Left as leased: untouched.
            _ => {
                assert!(!status.is_final());
                assert_eq!(status.attempts, 0);
                assert!(q.get(&lease.id).await.unwrap().is_some());
            }
        }
    }
    let stats = q.stats().await.unwrap();
    // The stale lease, the deferral and the invalid item stay queued.
    assert_eq!(stats.messages, 3);
    assert_eq!(stats.deferred, 1);
    let finals = want
        .iter()
        .filter(|w| matches!(w, Ok(FinishResult::Finalized)))
        .count() as u64;
    assert_eq!(q.delivery_totals().await.unwrap().delivered, finals);

    // The single finish is a batch of one, in one call, and writes no event.
    let (l, _) = &leased[1];
    reset_stats(&server);
    assert_eq!(
        q.finish(&l.lease, delivered(l.status.clone()))
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    let (l, _) = &leased[0];
    assert_eq!(
        q.finish(&l.lease, delivered(l.status.clone()))
            .await
            .unwrap(),
        FinishResult::Finalized
    );
    let calls = calls_of(&server);
    assert_eq!(calls.get("evalsha"), Some(&2), "{calls:?}");
    assert_eq!(calls.get("xadd"), None, "{calls:?}");
    assert_eq!(q.stats().await.unwrap().messages, 2);
}

/// An append that fails does not stop the outcomes sent with it (the mail comes
/// first, as when events are written apart): they are stored, and the call says
/// the events were not, so that the caller appends them on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stores_outcomes_whose_events_cannot_be_written_and_says_so() {
    let (server, q, store) = started().await;
    let leased = enqueue_and_lease(&q, 6).await;
    let (items, _, encoded) = delivered_batch(&leased);
    // A stream key of the wrong type: XADD fails. The mail's
    // outcomes still count; the caller is told to append the events itself.
    let stream = stream_key("mrfin");
    server.cli(&["SET", &stream, "not a stream"]).unwrap();
    let got = q
        .finish_batch_with_events(items.clone(), &encoded)
        .await
        .unwrap();
    assert_all_finalized(&got);
    assert!(encoded.unwritten());
    assert_eq!(q.stats().await.unwrap().messages, 0);
    assert_eq!(q.delivery_totals().await.unwrap().delivered, 6);

    // The same batch with the stream in order: its events are written in the
    // call, and the flag stays clear.
    server.cli(&["DEL", &stream]).unwrap();
    let leased = enqueue_and_lease(&q, 3).await;
    let (items, events, encoded) = delivered_batch(&leased);
    let got = q.finish_batch_with_events(items, &encoded).await.unwrap();
    assert_all_finalized(&got);
    assert!(!encoded.unwritten());
    assert_eq!(stored_events(&store).await, expected_events(&events));
}

/// Scripts Redis lost (a restart or failover) are loaded again and only the
/// finish calls sent again: the events, sent ahead of them in the same round
/// trip, are written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_finishes_after_losing_its_scripts_and_writes_each_event_once() {
    let (server, q, store) = started().await;
    let leased = enqueue_and_lease(&q, 5).await;
    let (items, events, encoded) = delivered_batch(&leased);
    server.cli(&["SCRIPT", "FLUSH"]).unwrap();
    reset_stats(&server);
    let got = q
        .finish_batch_with_events(items.clone(), &encoded)
        .await
        .unwrap();
    assert_all_finalized(&got);
    assert!(!encoded.unwritten());
    let calls = calls_of(&server);
    assert_eq!(calls.get("xadd"), Some(&5), "{calls:?}");
    assert_eq!(stored_events(&store).await, expected_events(&events));
    assert_eq!(q.stats().await.unwrap().messages, 0);
    assert_eq!(q.delivery_totals().await.unwrap().delivered, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_still_finishes_outcomes_which_free_its_memory() {
    // noeviction at maxmemory refuses a script's first write when it may grow
    // memory (XADD); the finishes must still go through, since they are what frees
    // memory (the relay would otherwise deliver the same mail again and again).
    let (server, q, _store) = started().await;
    let leased = enqueue_and_lease(&q, 4).await;
    // Below what Redis already uses, without eviction: every write that may grow
    // memory is refused from now on, as at the bundled Redis's limit.
    server
        .cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .unwrap();
    server
        .cli(&["CONFIG", "SET", "maxmemory", "100kb"])
        .unwrap();
    // redis-cli may print an error reply and still exit 0: read its text.
    let full = match server.cli(&["SET", "probe", "1"]) {
        Ok(t) | Err(t) => t.contains("OOM"),
    };
    assert!(full, "Redis never reached maxmemory");
    let (items, _, encoded) = delivered_batch(&leased);
    let got = q.finish_batch_with_events(items, &encoded).await.unwrap();
    assert_all_finalized(&got);
    assert!(encoded.unwritten());
    assert_eq!(q.stats().await.unwrap().messages, 0);
}

fn sink(store: EventStore) -> EventSink {
    EventSink::start(
        store,
        &EventsConfig {
            max_len: 10_000,
            ..EventsConfig::default()
        },
        EventMetrics::default(),
    )
}

/// Submits one delivered outcome with its event for each of `leased` to a writer
/// whose batch holds them all, and waits for the answers.
async fn write_through_the_outcome_writer(
    queue: Arc<dyn Leasing>,
    sink: EventSink,
    leased: &[(Leased, QueuedMessage)],
) -> Vec<Vec<Event>> {
    let writer = OutcomeWriter::start(
        queue,
        OutcomeBatchConfig {
            max_messages: leased.len(),
            max_delay: Duration::from_secs(3600),
        },
        Arc::new(Metrics::new()),
    );
    writer.record_events_with(sink);
    let mut pending = Vec::new();
    let mut events = Vec::new();
    for (l, m) in leased {
        let e = vec![event(EventKind::Delivered, l, m)];
        events.push(e.clone());
        pending.push(
            writer
                .submit_with_events(l.lease.clone(), delivered(l.status.clone()), e)
                .await,
        );
    }
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap(), FinishResult::Finalized);
    }
    events
}

/// Through the outcome writer, as delivery uses it: a batch bigger than one
/// script call takes (128 items) goes in a few calls of one pipeline, with every
/// event once, in that pipeline (no append of the sink's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outcome_writer_writes_events_inside_the_finish_calls() {
    let (server, q, store) = started().await;
    let q = Arc::new(q);
    let leased = enqueue_and_lease(&*q, 300).await;
    let sink = sink(store.clone());
    reset_stats(&server);
    let events = write_through_the_outcome_writer(q.clone(), sink.clone(), &leased).await;
    let calls = calls_of(&server);
    // 300 items: 128 + 128 + 44.
    assert_eq!(calls.get("evalsha"), Some(&3), "{calls:?}");
    assert_eq!(calls.get("xadd"), Some(&300), "{calls:?}");
    assert_eq!(stored_events(&store).await, expected_events(&events));
    assert_eq!(sink.appended(), 300);
    assert_eq!(q.stats().await.unwrap().messages, 0);
    assert_eq!(q.delivery_totals().await.unwrap().delivered, 300);
}

/// On a real three-master cluster: the stream is in another slot, so the events
/// are appended on their own (once each), and the finishes take one call per
/// shard involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_finishes_per_shard_and_appends_events_apart() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let q = RedisQueue::connect(&cluster.config("mrfin")).await.unwrap();
    assert!(!q.writes_outcome_events());
    let store = EventStore::Redis(RedisEvents::new(q.shared(), 10_000));
    let leased = enqueue_and_lease(&q, 40).await;

    // Asked anyway, the queue refuses and writes nothing.
    let one = &leased[..1];
    let events: Vec<Vec<Event>> = one
        .iter()
        .map(|(l, m)| vec![event(EventKind::Delivered, l, m)])
        .collect();
    let refused = q
        .finish_batch_with_events(
            vec![(one[0].0.lease.clone(), delivered(one[0].0.status.clone()))],
            &outcome_events(&events),
        )
        .await;
    assert!(
        matches!(refused, Err(QueueError::Invalid(_))),
        "{refused:?}"
    );
    assert_eq!(q.stats().await.unwrap().messages, 40);

    // A mixed batch answers per item.
    let (items, _, want) = mixed_batch(&leased[..8]);
    let masters = cluster.master_ports();
    for &p in &masters {
        cluster.cli(p, &["CONFIG", "RESETSTAT"]).unwrap();
    }
    check_answers(&q.finish_batch(items.clone()).await.unwrap(), &want);
    // Item 3 (invalid) is refused before Redis.
    let shards: std::collections::HashSet<usize> = items
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, (l, _))| mailrelay::queue::redis::shard_of_id(l.id.as_str()))
        .collect();
    let evalsha: u64 = masters
        .iter()
        .map(|&p| {
            command_calls(&cluster.cli(p, &["INFO", "commandstats"]).unwrap())
                .get("evalsha")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(evalsha, shards.len() as u64);

    // The rest through the outcome writer: every event once.
    let q = Arc::new(q);
    let sink = sink(store.clone());
    let events = write_through_the_outcome_writer(q.clone(), sink, &leased[8..]).await;
    assert_eq!(stored_events(&store).await, expected_events(&events));
    assert_eq!(q.stats().await.unwrap().messages, 3);
}

/// The embedded queue writes the events in the finishes' write transaction: one
/// commit for both, and each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_writes_events_in_the_finish_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(EmbeddedQueue::open(dir.path()).unwrap());
    assert!(q.writes_outcome_events());
    let store = EventStore::Embedded(EmbeddedEvents::open(q.database(), 10_000).unwrap());
    let leased = enqueue_and_lease(&*q, 12).await;
    let (items, events, want) = mixed_batch(&leased);
    let encoded = outcome_events(&events);
    let commits = q.commits();
    let got = q
        .finish_batch_with_events(items.clone(), &encoded)
        .await
        .unwrap();
    check_answers(&got, &want);
    assert_eq!(
        q.commits() - commits,
        1,
        "events and finishes in one commit"
    );
    assert_eq!(stored_events(&store).await, expected_events(&events));
    assert_eq!(q.stats().await.unwrap().messages, 3);

    // A batch of invalid items alone still writes its events (one commit).
    let (l, m) = &leased[3];
    let mut s = l.status.clone();
    s.next_attempt_ms = None;
    let again = vec![vec![event(EventKind::Bounced, l, m)]];
    let commits = q.commits();
    let got = q
        .finish_batch_with_events(vec![(l.lease.clone(), s)], &outcome_events(&again))
        .await
        .unwrap();
    assert!(matches!(got[..], [Err(QueueError::Invalid(_))]), "{got:?}");
    assert_eq!(q.commits() - commits, 1);
    let mut want_events = expected_events(&events);
    want_events.extend(expected_events(&again));
    assert_eq!(stored_events(&store).await, want_events);

    // Through the outcome writer: the events' own transaction is gone.
    let more = enqueue_and_lease(&*q, 20).await;
    let sink = sink(store.clone());
    let commits = q.commits();
    let events = write_through_the_outcome_writer(q.clone(), sink.clone(), &more).await;
    assert_eq!(q.commits() - commits, 1);
    assert_eq!(sink.appended(), 20);
    let stored = stored_events(&store).await;
    for (k, n) in expected_events(&events) {
        assert_eq!(stored.get(&k), Some(&n), "{k:?}");
    }
}

/// A backend that cannot write events with its outcomes refuses them rather than
/// drop them, and finishes nothing.
#[tokio::test]
async fn a_queue_that_cannot_write_events_refuses_them() {
    struct Plain;
    impl mailrelay::queue::Store for Plain {
        fn backend(&self) -> &'static str {
            "plain"
        }
        fn ping(&self) -> mailrelay::queue::QueueFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }
    impl Leasing for Plain {
        fn lease_due(
            &self,
            _: u64,
            _: u64,
            _: usize,
            _: &str,
        ) -> mailrelay::queue::QueueFuture<'_, Vec<Leased>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn finish<'a>(
            &'a self,
            _: &'a Lease,
            _: MessageStatus,
        ) -> mailrelay::queue::QueueFuture<'a, FinishResult> {
            panic!("nothing may be finished")
        }
        fn renew<'a>(&'a self, _: &'a Lease, _: u64) -> mailrelay::queue::QueueFuture<'a, bool> {
            Box::pin(async { Ok(false) })
        }
        fn give_back<'a>(&'a self, _: &'a [(Lease, u64)]) -> mailrelay::queue::QueueFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }
    let q = Plain;
    assert!(!q.writes_outcome_events());
    let id = QueueId::generate();
    let lease = Lease {
        id: id.clone(),
        token: "t".into(),
        expires_ms: 0,
        head: Default::default(),
    };
    let status = MessageStatus {
        id,
        rcpts: Vec::new(),
        created_ms: 0,
        next_attempt_ms: None,
        attempts: 1,
        final_at_ms: None,
        leased_until_ms: None,
        delay_warned: false,
    };
    let r = q
        .finish_batch_with_events(vec![(lease, status)], &outcome_events(&[]))
        .await;
    assert!(matches!(r, Err(QueueError::Invalid(_))), "{r:?}");
}

/// The queue's `XADD`s carry no cap (a `MAXLEN` on each cost Redis a fifth of
/// the command): the event sink trims the stream to about `events.max_len`
/// about once a second, for every writer of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_sink_trims_what_the_queue_writes_uncapped() {
    const N: usize = 600;
    const MAX_LEN: u64 = 10;
    let (server, q, _) = started().await;
    let events = RedisEvents::new(q.shared(), MAX_LEN);
    let key = events.key().to_owned();
    let xlen = || -> usize { server.cli(&["XLEN", &key]).unwrap().trim().parse().unwrap() };
    for i in 0..N {
        let msg = queued(
            "s@sender.test",
            "r@rcpt.test",
            "relay.test",
            format!("Subject: {i}\r\n\r\nhi\r\n"),
        );
        let json = format!(r#"{{"kind":"accepted","queue_id":"{}"}}"#, msg.envelope.id);
        assert!(
            q.enqueue_with_event(&msg, json.as_bytes(), MAX_LEN)
                .await
                .unwrap()
        );
    }
    assert_eq!(xlen(), N, "the enqueues trim nothing");
    let _sink = EventSink::start(
        EventStore::Redis(events),
        &EventsConfig {
            max_len: MAX_LEN,
            ..EventsConfig::default()
        },
        EventMetrics::default(),
    );
    // `MAXLEN ~` drops whole stream nodes (100 entries each by default), so
    // up to a node's worth stays.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while xlen() > 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream still holds {} events",
            xlen()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(xlen() >= MAX_LEN as usize, "trimmed below the cap");
}

/// One approximate `XTRIM` drops at most 10,000 entries, fewer than a busy
/// relay writes in the second between trims: one trim still brings a stream
/// far over its cap back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trim_brings_a_stream_far_over_its_cap_back() {
    const N: usize = 35_000;
    const MAX_LEN: u64 = 10;
    let (server, q, _) = started().await;
    let events = RedisEvents::new(q.shared(), MAX_LEN);
    let key = events.key().to_owned();
    let xlen = || -> usize { server.cli(&["XLEN", &key]).unwrap().trim().parse().unwrap() };
    server
        .cli(&[
            "EVAL",
            "for i = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], '*', 'e', '{}') end",
            "1",
            &key,
            &N.to_string(),
        ])
        .unwrap();
    assert_eq!(xlen(), N);
    EventStore::Redis(events).trim().await.unwrap();
    // `MAXLEN ~` drops whole stream nodes (100 entries each by default), so
    // up to a node's worth stays.
    let left = xlen();
    assert!(
        (MAX_LEN as usize..=MAX_LEN as usize + 100).contains(&left),
        "{left} events left"
    );
}
