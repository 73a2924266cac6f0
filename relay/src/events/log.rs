//! The delivery event log: where events are stored ([`EventStore`]: a capped Redis
//! stream beside the Redis queue, tables in the embedded queue's redb file), and
//! how they get there ([`EventSink`]).
//!
//! # Cost and durability
//!
//! Events are written in batches, one store round trip per batch, never one per
//! message:
//!
//! - delivery outcomes (`delivered`, `deferred`, `bounced`, `expired`, `dsn_sent`)
//!   ride with the outcome batch of `delivery::outcomes`. Where the queue can
//!   ([`crate::queue::Leasing::writes_outcome_events`]: the embedded queue, in the
//!   finish's redb transaction, stored if and only if the outcomes are;
//!   standalone Redis and Sentinel, as plain `XADD`s ahead of the finish calls in
//!   their one round trip, so never an outcome without its events, and at worst
//!   the events without the outcomes, a duplicate once the messages are
//!   delivered again), the batch's events go with its outcomes
//!   ([`OutcomeEvents`]): a relay killed before leaves the messages leased,
//!   whoever delivers them again writes their events; when that write fails, the events are appended
//!   on their own afterwards (the deliveries did happen), and the messages, not
//!   finished, are delivered and reported again. When only the events' part fails
//!   (a Redis at `maxmemory` refuses the `XADD`, while the finishes free memory),
//!   the outcomes are stored and the events appended on their own, as here
//!   apart. Where the queue cannot (Redis
//!   Cluster: the stream's slot is not the shards'), the events are appended
//!   *before* the batch's `finish` is written: a relay killed between the two
//!   writes leaves the messages leased, and they and their events are written
//!   again. Either way an outcome event is written at least once, and never lost to a
//!   crash (a duplicate is possible; webhooks consumers dedupe by the event's
//!   `queue_id`, `recipient` and `kind`);
//! - `accepted` is written by the queue in the same atomic write as the message
//!   ([`crate::queue::Ingest::enqueue_with_event`]): in the enqueue's redb
//!   transaction on the embedded queue, by the enqueue script on standalone Redis
//!   and Sentinel. So it is there before the `250`, and a crash cannot lose it.
//!   Where the queue cannot (Redis Cluster: the stream's slot is not the
//!   message's shard's; a Redis enqueue combined with the ingress quota charge),
//!   it goes the way of the rest below;
//! - whatever [`EventSink::record`] is given (`suppressed`, a batched `accepted`)
//!   goes through a bounded channel to a batching task, written within
//!   `events.batch_delay`; a relay killed inside that window loses those events
//!   (the message itself is safe, and its outcome events still come). The SMTP
//!   session never waits for it: a full channel drops the event and counts it
//!   (`mailrelay_events_dropped_total`).
//!
//! A failing store never holds mail back: the outcome batch retries the append a
//! few times, then writes the `finish` anyway and counts the events as lost.
//!
//! # Reading
//!
//! Event IDs are `<ms>-<seq>` in write order (Redis stream IDs; the embedded store
//! makes the same), so a time range is an ID range. A query walks the range from
//! its newest end and stops at `limit` matches or after [`MAX_SCAN`] events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mailrelay_admin_api::events::{Event, EventFilter, EventKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redis::Value;
use tokio::sync::mpsc;

use crate::config::EventsConfig;
use crate::queue::redis::SharedRedis;
use crate::queue::{QueuedMessage, now_ms};

/// Most events one query reads before it gives up (and says so).
pub const MAX_SCAN: usize = 200_000;
/// IDs are write times, a little after the event's own time (the outcome batch,
/// a store retry): an `until` bound reads this much further.
const WRITE_SLACK_MS: u64 = 600_000;
/// Events read per Redis request while scanning.
const PAGE: usize = 1000;
/// Capacity of the channel of [`EventSink::record`].
const CHANNEL: usize = 65_536;
/// How often the [`EventSink`] trims the Redis stream to `events.max_len`: it
/// may hold that long's events more than the cap (the queue and this sink write
/// without `MAXLEN`; see [`push_xadd`]).
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(1);
/// `XTRIM` calls per trim at most: up to a million events dropped a tick at
/// Redis's default node size; the next tick goes on where a stream is further
/// over its cap.
const TRIM_ROUNDS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    #[error("stored event is corrupt: {0}")]
    Corrupt(String),
}

/// Counters of the event log (registered into the relay's registry).
#[derive(Clone, Default)]
pub struct EventMetrics {
    written: Family<[(&'static str, &'static str); 1], Counter>,
    dropped: Counter,
    lost: Counter,
}

impl EventMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = EventMetrics::default();
        registry.register(
            "events_written",
            "Delivery events written to the event store, by kind",
            m.written.clone(),
        );
        registry.register(
            "events_dropped",
            "Events not recorded because the event writer's queue was full (the store is slower than the mail)",
            m.dropped.clone(),
        );
        registry.register(
            "events_lost",
            "Events not written because the event store failed after retries",
            m.lost.clone(),
        );
        m
    }

    /// Counts `events` as written; returns how many there were.
    fn written<'a>(&self, events: impl IntoIterator<Item = &'a Event>) -> u64 {
        // Counted by kind first: one look-up in the family per kind, not per event.
        let mut n = [0u64; EventKind::ALL.len()];
        let mut total = 0;
        for e in events {
            total += 1;
            if let Some(i) = EventKind::ALL.iter().position(|k| *k == e.kind) {
                n[i] += 1;
            }
        }
        for (kind, n) in EventKind::ALL.into_iter().zip(n) {
            if n > 0 {
                self.written
                    .get_or_create(&[("kind", kind.as_str())])
                    .inc_by(n);
            }
        }
        total
    }
}

/// Where events live.
#[derive(Clone)]
pub enum EventStore {
    Redis(RedisEvents),
    Embedded(EmbeddedEvents),
}

impl EventStore {
    pub fn backend(&self) -> &'static str {
        match self {
            EventStore::Redis(_) => "redis",
            EventStore::Embedded(_) => "embedded",
        }
    }

    /// Writes `events` in one round trip (one pipeline, one commit) and returns
    /// their IDs.
    pub async fn append(&self, events: &[Event]) -> Result<Vec<String>, EventError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = Encoded::new(events)?;
        match self {
            EventStore::Redis(r) => r.append(&encoded).await,
            EventStore::Embedded(e) => e.append(encoded).await,
        }
    }

    /// Trims the log to its cap, where writes leave that to a later step: the
    /// Redis stream (its `XADD`s carry no `MAXLEN`). The embedded store trims in
    /// each write's own transaction, so nothing is left to do there.
    pub async fn trim(&self) -> Result<(), EventError> {
        match self {
            EventStore::Redis(r) => r.trim().await,
            EventStore::Embedded(_) => Ok(()),
        }
    }

    /// Events matching `filter`, oldest first; `true` when the scan stopped at
    /// [`MAX_SCAN`] before the range was read through.
    pub async fn query(&self, filter: &EventFilter) -> Result<(Vec<Event>, bool), EventError> {
        match self {
            EventStore::Redis(r) => r.query(filter).await,
            EventStore::Embedded(e) => e.query(filter.clone()).await,
        }
    }
}

/// Events as stored (JSON, as [`Event`] serializes), one after another in one
/// buffer: one allocation for a batch, the events themselves neither copied nor
/// encoded twice.
pub(crate) struct Encoded {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

/// About what one stored event takes (a `delivered` event with TLS details is
/// 300-450 bytes), so that a batch's buffer rarely grows.
const EVENT_SIZE_HINT: usize = 448;

impl Encoded {
    pub(crate) fn new(events: &[Event]) -> Result<Self, EventError> {
        let mut buf = Vec::with_capacity(events.len() * EVENT_SIZE_HINT);
        let mut ends = Vec::with_capacity(events.len());
        for e in events {
            serde_json::to_writer(&mut buf, e).map_err(|e| EventError::Corrupt(e.to_string()))?;
            ends.push(buf.len());
        }
        Ok(Encoded { buf, ends })
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.range(0..self.ends.len())
    }

    /// Events `range` (by position in the batch).
    fn range(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &[u8]> {
        let ends = &self.ends[range.clone()];
        let start = if range.start == 0 {
            0
        } else {
            self.ends[range.start - 1]
        };
        let starts = std::iter::once(start).chain(ends.iter().copied());
        starts.zip(ends.iter()).map(|(a, &b)| &self.buf[a..b])
    }
}

/// The delivery events of a batch of outcomes, encoded as stored and grouped by
/// the outcome they belong to, with the event log's cap: what a queue writes in
/// the same atomic write as the outcomes
/// ([`crate::queue::Leasing::finish_batch_with_events`]).
pub struct OutcomeEvents {
    encoded: Encoded,
    /// Per outcome, where its events end among `encoded`'s.
    items: Vec<usize>,
    max_len: u64,
    /// Set by a backend that stored the outcomes but could not append (all of)
    /// these events: the caller then appends them on its own.
    unwritten: AtomicBool,
}

impl OutcomeEvents {
    /// Encodes `per_item` (the events of each outcome, in the batch's order), for
    /// an event log capped at `max_len` (the embedded store trims to it in the
    /// same write).
    pub fn new<'a>(
        per_item: impl ExactSizeIterator<Item = &'a [Event]> + Clone,
        max_len: u64,
    ) -> Result<Self, EventError> {
        let n: usize = per_item.clone().map(<[Event]>::len).sum();
        let mut buf = Vec::with_capacity(n * EVENT_SIZE_HINT);
        let mut ends = Vec::with_capacity(n);
        let mut items = Vec::with_capacity(per_item.len());
        for events in per_item {
            for e in events {
                serde_json::to_writer(&mut buf, e)
                    .map_err(|e| EventError::Corrupt(e.to_string()))?;
                ends.push(buf.len());
            }
            items.push(ends.len());
        }
        Ok(OutcomeEvents {
            encoded: Encoded { buf, ends },
            items,
            max_len,
            unwritten: AtomicBool::new(false),
        })
    }

    /// Records that the outcomes were stored without (all of) these events.
    pub fn mark_unwritten(&self) {
        self.unwritten.store(true, Ordering::Relaxed);
    }

    /// Whether a backend stored the outcomes without (all of) these events.
    pub fn unwritten(&self) -> bool {
        self.unwritten.load(Ordering::Relaxed)
    }

    /// Number of events, over all outcomes.
    pub fn len(&self) -> usize {
        self.encoded.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.encoded.ends.is_empty()
    }

    /// Number of outcomes (some may have no events).
    pub fn items(&self) -> usize {
        self.items.len()
    }

    /// The events (JSON) of outcome `i`; none for an outcome past the last.
    pub fn of_item(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let range = match i {
            _ if i >= self.items.len() => 0..0,
            0 => 0..self.items[0],
            _ => self.items[i - 1]..self.items[i],
        };
        self.encoded.range(range)
    }

    /// Every event (JSON), in the batch's order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.encoded.iter()
    }

    /// The event log's cap.
    pub fn max_len(&self) -> u64 {
        self.max_len
    }

    /// Every event as one owned batch, for a writer on another thread.
    pub(crate) fn to_encoded(&self) -> Encoded {
        Encoded {
            buf: self.encoded.buf.clone(),
            ends: self.encoded.ends.clone(),
        }
    }
}

// ------------------------------------------------------------------ Redis

/// The events stream beside the Redis queue: `<prefix>:events`, trimmed to
/// about `max_len` by the [`EventSink`] ([`RedisEvents::trim`]). One key, so one
/// slot in a cluster.
#[derive(Clone)]
pub struct RedisEvents {
    redis: SharedRedis,
    key: String,
    max_len: u64,
}

impl RedisEvents {
    pub fn new(redis: SharedRedis, max_len: u64) -> Self {
        let key = stream_key(redis.prefix());
        RedisEvents {
            redis,
            key,
            max_len,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn redis(&self) -> &SharedRedis {
        &self.redis
    }

    async fn append(&self, events: &Encoded) -> Result<Vec<String>, EventError> {
        let mut pipe = redis::pipe();
        for json in events.iter() {
            push_xadd(&mut pipe, &self.key, json);
        }
        self.redis
            .pipeline::<Vec<String>>(&pipe)
            .await
            .map_err(EventError::Unavailable)
    }

    /// Trims the stream to about `max_len` events (`XTRIM MAXLEN ~`: whole
    /// stream nodes only, so it may keep up to a node more).
    ///
    /// Since Redis 6.2 one approximate `XTRIM` drops at most 100 nodes'
    /// entries (10,000 with the default `stream-node-max-entries`), fewer than
    /// a busy relay writes in a [`TRIM_EVERY`]: a single call a tick would let
    /// the stream grow without end, so calls repeat until one drops nothing.
    /// No `LIMIT` of our own: Redis before 6.2 refuses it (and has no bound).
    pub(crate) async fn trim(&self) -> Result<(), EventError> {
        for _ in 0..TRIM_ROUNDS {
            let mut cmd = redis::cmd("XTRIM");
            cmd.arg(&self.key).arg("MAXLEN").arg("~").arg(self.max_len);
            let dropped: u64 = self
                .redis
                .query(&cmd)
                .await
                .map_err(EventError::Unavailable)?;
            if dropped == 0 {
                break;
            }
        }
        Ok(())
    }

    async fn query(&self, f: &EventFilter) -> Result<(Vec<Event>, bool), EventError> {
        let mut end = f.until_ms.map_or_else(
            || "+".to_owned(),
            |u| format!("{}-0", u.saturating_add(WRITE_SLACK_MS)),
        );
        let start = f
            .since_ms
            .map_or_else(|| "-".to_owned(), |s| format!("{s}-0"));
        let mut out = Vec::new();
        let mut scanned = 0;
        loop {
            let mut cmd = redis::cmd("XREVRANGE");
            cmd.arg(&self.key)
                .arg(&end)
                .arg(&start)
                .arg("COUNT")
                .arg(PAGE);
            let page: Value = self
                .redis
                .query(&cmd)
                .await
                .map_err(EventError::Unavailable)?;
            let entries = parse_entries(page)?;
            let n = entries.len();
            scanned += n;
            let mut last = None;
            for (id, e) in entries {
                if f.matches(&e) && out.len() < f.limit {
                    out.push(e);
                }
                last = Some(id);
            }
            if out.len() >= f.limit || n < PAGE {
                out.reverse();
                return Ok((out, false));
            }
            if scanned >= MAX_SCAN {
                out.reverse();
                return Ok((out, true));
            }
            match last {
                Some(id) => end = format!("({id}"),
                None => {
                    out.reverse();
                    return Ok((out, false));
                }
            }
        }
    }
}

/// The events stream of the queue with key prefix `prefix` (the Redis queue's
/// enqueue writes `accepted` events there too).
/// Queues one event's `XADD` onto `pipe`: the stream's entry form (field `e`, the
/// event's JSON), for every writer of the stream (this log's appends, the Redis
/// queue's enqueue and finish).
/// No `MAXLEN`: a trim argument on every `XADD` cost Redis about a fifth of the
/// command (it checks the length and rewrites the arguments it propagates to the
/// AOF and replicas), twice per message. The [`EventSink`] trims the stream
/// instead, once per [`TRIM_EVERY`] ([`RedisEvents::trim`]).
pub(crate) fn push_xadd(pipe: &mut redis::Pipeline, stream: &str, json: &[u8]) {
    pipe.cmd("XADD").arg(stream).arg("*").arg("e").arg(json);
}

pub fn stream_key(prefix: &str) -> String {
    format!("{prefix}:events")
}

/// `[[id, [field, value, …]], …]` of XRANGE/XREVRANGE/XREADGROUP into events
/// (their `id` set). An entry without an `e` field is skipped (not ours).
pub(crate) fn parse_entries(v: Value) -> Result<Vec<(String, Event)>, EventError> {
    parse_raw_entries(v)?
        .into_iter()
        .map(|(id, json)| {
            let mut e: Event = serde_json::from_slice(&json)
                .map_err(|e| EventError::Corrupt(format!("event {id}: {e}")))?;
            e.id = id.clone();
            Ok((id, e))
        })
        .collect()
}

/// [`parse_entries`] without decoding the events: `(id, stored JSON)`.
pub(crate) fn parse_raw_entries(v: Value) -> Result<Vec<(String, Vec<u8>)>, EventError> {
    let corrupt = |what: &str| EventError::Corrupt(format!("stream entry: {what}"));
    let items = match v {
        Value::Array(a) => a,
        Value::Nil => return Ok(Vec::new()),
        _ => return Err(corrupt("not an array")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            // XAUTOCLAIM reports entries deleted meanwhile as nil.
            continue;
        };
        if pair.len() != 2 {
            return Err(corrupt("not [id, fields]"));
        }
        let fields = pair.pop().unwrap_or(Value::Nil);
        let id = text(pair.pop().unwrap_or(Value::Nil)).ok_or_else(|| corrupt("no id"))?;
        let Value::Array(fields) = fields else {
            continue;
        };
        let mut it = fields.into_iter();
        while let (Some(k), Some(val)) = (it.next(), it.next()) {
            if text(k).as_deref() == Some("e") {
                let bytes = match val {
                    Value::BulkString(b) => b,
                    Value::SimpleString(s) => s.into_bytes(),
                    _ => return Err(corrupt("event field is not a string")),
                };
                out.push((id, bytes));
                break;
            }
        }
    }
    Ok(out)
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

// --------------------------------------------------------------- embedded

/// Events by `(write ms, sequence)`.
pub(crate) const EVENTS: redb::TableDefinition<(u64, u64), &[u8]> =
    redb::TableDefinition::new("events");
/// A webhook's cursor: the last event it is done with.
pub(crate) const CURSORS: redb::TableDefinition<&str, (u64, u64)> =
    redb::TableDefinition::new("event_cursors");

/// Events in the embedded queue's redb file (their own tables), committed with an
/// fsync per batch. The queue's writer adds `accepted` events in its enqueue
/// transactions too ([`append_in`]).
#[derive(Clone)]
pub struct EmbeddedEvents {
    db: Arc<Database>,
    max_len: u64,
}

/// Appends events (JSON) inside a write transaction of the embedded queue's file,
/// keyed after the table's last key (so keys increase in commit order, whichever of
/// the event writer and the queue's writer commits), and trims the table like
/// `MAXLEN ~`: only once 1 % over, back to `max_len`. Returns the keys.
pub(crate) fn append_in(
    txn: &redb::WriteTransaction,
    events: &[&[u8]],
    max_len: u64,
) -> Result<Vec<(u64, u64)>, redb::Error> {
    let mut t = txn.open_table(EVENTS)?;
    let mut last = t.last()?.map_or((0, 0), |(k, _)| k.value());
    let now = now_ms();
    let mut keys = Vec::with_capacity(events.len());
    for json in events {
        last = if now > last.0 {
            (now, 0)
        } else {
            (last.0, last.1 + 1)
        };
        t.insert(last, *json)?;
        keys.push(last);
    }
    let len = t.len()?;
    if len > max_len + max_len / 100 {
        let excess = len - max_len;
        let mut n = 0;
        t.retain_in::<(u64, u64), _>(.., |_, _| {
            n += 1;
            n > excess
        })?;
    }
    Ok(keys)
}

impl EmbeddedEvents {
    pub fn open(db: Arc<Database>, max_len: u64) -> Result<Self, EventError> {
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(EVENTS).map_err(unavailable)?;
        txn.open_table(CURSORS).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(EmbeddedEvents { db, max_len })
    }

    pub(crate) fn db(&self) -> &Arc<Database> {
        &self.db
    }

    async fn append(&self, events: Encoded) -> Result<Vec<String>, EventError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let json: Vec<&[u8]> = events.iter().collect();
            let mut txn = this.db.begin_write().map_err(unavailable)?;
            txn.set_durability(Durability::Immediate)
                .map_err(unavailable)?;
            let keys = append_in(&txn, &json, this.max_len).map_err(unavailable)?;
            txn.commit().map_err(unavailable)?;
            Ok(keys.iter().map(|(a, b)| format!("{a}-{b}")).collect())
        })
        .await
        .map_err(|e| EventError::Unavailable(format!("event writer: {e}")))?
    }

    async fn query(&self, f: EventFilter) -> Result<(Vec<Event>, bool), EventError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(EVENTS).map_err(unavailable)?;
            let lo = (f.since_ms.unwrap_or(0), 0);
            let hi = (
                f.until_ms
                    .map_or(u64::MAX, |u| u.saturating_add(WRITE_SLACK_MS)),
                u64::MAX,
            );
            let mut out = Vec::new();
            let mut truncated = false;
            for (scanned, row) in t.range(lo..=hi).map_err(unavailable)?.rev().enumerate() {
                if scanned >= MAX_SCAN {
                    truncated = true;
                    break;
                }
                let (k, v) = row.map_err(unavailable)?;
                let (ms, seq) = k.value();
                let mut e: Event = serde_json::from_slice(v.value())
                    .map_err(|e| EventError::Corrupt(format!("event {ms}-{seq}: {e}")))?;
                if f.matches(&e) {
                    e.id = format!("{ms}-{seq}");
                    out.push(e);
                    if out.len() >= f.limit {
                        break;
                    }
                }
            }
            out.reverse();
            Ok((out, truncated))
        })
        .await
        .map_err(|e| EventError::Unavailable(format!("event reader: {e}")))?
    }
}

fn unavailable(e: impl std::fmt::Display) -> EventError {
    EventError::Unavailable(format!("embedded event store: {e}"))
}

/// Parses `<ms>-<seq>`.
pub(crate) fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (a, b) = id.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

// ------------------------------------------------------------------- sink

/// Where the relay records events: cheap to clone, never blocks mail.
///
/// This is the API other parts of the relay use (suppression emits `suppressed`
/// with [`EventSink::record`]; delivery hands its outcome events to
/// `delivery::outcomes`, which calls [`EventSink::append_now`]).
#[derive(Clone)]
pub struct EventSink {
    store: EventStore,
    tx: mpsc::Sender<Event>,
    metrics: EventMetrics,
    flush_tx: mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
    appended: Arc<AtomicU64>,
    max_len: u64,
}

impl EventSink {
    /// Starts the batching task over `store`.
    pub fn start(store: EventStore, cfg: &EventsConfig, metrics: EventMetrics) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        let appended = Arc::new(AtomicU64::new(0));
        tokio::spawn(batch_loop(
            store.clone(),
            cfg.batch_max.max(1),
            cfg.batch_delay,
            metrics.clone(),
            Arc::clone(&appended),
            rx,
            flush_rx,
        ));
        EventSink {
            store,
            tx,
            metrics,
            flush_tx,
            appended,
            max_len: cfg.max_len,
        }
    }

    /// The event log's cap, for a queue that writes an `accepted` event with the
    /// message ([`crate::queue::Ingest::enqueue_with_event`]).
    pub fn max_len(&self) -> u64 {
        self.max_len
    }

    /// Counts `event` as written by someone else (the queue, with its message).
    pub fn written_elsewhere(&self, event: &Event) {
        self.written_elsewhere_all(std::slice::from_ref(event));
    }

    /// Counts `events` as written by someone else (the queue, with the outcomes
    /// they report).
    pub fn written_elsewhere_all<'a>(&self, events: impl IntoIterator<Item = &'a Event>) {
        let n = self.metrics.written(events);
        self.appended.fetch_add(n, Ordering::Relaxed);
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Records `event` in the next batch; never waits. Dropped (and counted) when
    /// the writer is that far behind.
    pub fn record(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            self.metrics.dropped.inc();
        }
    }

    /// Writes `events` now, in one round trip, trying up to three times; what still
    /// fails is counted as lost. For callers that order the event before a state
    /// change (delivery outcomes).
    pub async fn append_now(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        // What was recorded before (an `accepted`) goes first, so one message's
        // events stay in order in the store.
        self.flush().await;
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=3 {
            match self.store.append(events).await {
                Ok(_) => {
                    self.metrics.written(events);
                    self.appended
                        .fetch_add(events.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) if attempt == 3 => {
                    tracing::warn!(error = %e, events = events.len(), "writing delivery events failed; they are lost");
                    self.metrics.lost.inc_by(events.len() as u64);
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "writing delivery events failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
    }

    /// Writes what [`EventSink::record`] holds, and returns once it is written.
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.flush_tx.send(done).is_ok() {
            let _ = wait.await;
        }
    }

    /// Events written by this process (for tests and logs).
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }
}

async fn batch_loop(
    store: EventStore,
    max: usize,
    delay: Duration,
    metrics: EventMetrics,
    appended: Arc<AtomicU64>,
    mut rx: mpsc::Receiver<Event>,
    mut flush_rx: mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
) {
    let mut batch: Vec<Event> = Vec::with_capacity(max);
    // The cap is kept here for every writer of the stream, also the queue's
    // enqueues and finishes, which never pass through this loop.
    let mut trim = tokio::time::interval(TRIM_EVERY);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut waiters = Vec::new();
        tokio::select! {
            e = rx.recv() => match e {
                Some(e) => batch.push(e),
                None => return,
            },
            Some(done) = flush_rx.recv() => waiters.push(done),
            _ = trim.tick() => {
                if let Err(e) = store.trim().await {
                    tracing::debug!(error = %e, "trimming the event log failed; the next tick tries again");
                }
                continue;
            }
        }
        if waiters.is_empty() {
            let deadline = tokio::time::Instant::now() + delay;
            while batch.len() < max {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    e = rx.recv() => match e {
                        Some(e) => batch.push(e),
                        None => break,
                    },
                    Some(done) = flush_rx.recv() => { waiters.push(done); break; }
                }
            }
        }
        while let Ok(e) = rx.try_recv() {
            if batch.len() >= max * 4 {
                break;
            }
            batch.push(e);
        }
        if !batch.is_empty() {
            let events = std::mem::take(&mut batch);
            let mut wait = Duration::from_millis(50);
            for attempt in 1..=3 {
                match store.append(&events).await {
                    Ok(_) => {
                        metrics.written(&events);
                        appended.fetch_add(events.len() as u64, Ordering::Relaxed);
                        break;
                    }
                    Err(e) if attempt == 3 => {
                        tracing::warn!(error = %e, events = events.len(), "writing delivery events failed; they are lost");
                        metrics.lost.inc_by(events.len() as u64);
                    }
                    Err(_) => {
                        tokio::time::sleep(wait).await;
                        wait *= 4;
                    }
                }
            }
        }
        for w in waiters {
            let _ = w.send(());
        }
    }
}

// ----------------------------------------------------------- making events

/// The `Message-ID:` of a message (angle brackets and folding removed), from its
/// header section.
pub fn message_id_of(body: &[u8]) -> Option<String> {
    let end = CRLFCRLF.find(body).unwrap_or(body.len());
    let head = &body[..end];
    let mut i = 0;
    while i < head.len() {
        let line_end = crlf_at_or_after(head, i);
        let line = &head[i..line_end];
        if line.len() >= 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            let mut value = std::borrow::Cow::Borrowed(&line[11..]);
            // Folded onto the next line(s).
            let mut j = line_end + 2;
            while j < head.len() && (head[j] == b' ' || head[j] == b'\t') {
                let e = crlf_at_or_after(head, j);
                value.to_mut().extend_from_slice(&head[j..e]);
                j = e + 2;
            }
            let v = value.trim_ascii();
            let v = &v[v.iter().take_while(|&&b| b == b'<').count()..];
            let v = v
                .split(|&b| b == b'>')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if v.is_empty() {
                return None;
            }
            let v = String::from_utf8_lossy(v);
            // Bytes bound characters: only a long one needs counting.
            return Some(if v.len() <= MAX_MESSAGE_ID {
                v.into_owned()
            } else {
                v.chars().take(MAX_MESSAGE_ID).collect()
            });
        }
        i = line_end + 2;
    }
    None
}

/// Where the line starting at `from` ends: its CRLF, or the end of `head`. A lone
/// LF is part of the line.
fn crlf_at_or_after(head: &[u8], from: usize) -> usize {
    memchr::memchr_iter(b'\n', &head[from..])
        .map(|n| from + n)
        .find(|&n| n > from && head[n - 1] == b'\r')
        .map_or(head.len(), |n| n - 1)
}

// Built once: `memmem::find` builds its searcher on every call, which was most of the
// ~6,000 instructions per call (twice per message).
static CRLFCRLF: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));

/// Longest Message-ID kept in an event.
const MAX_MESSAGE_ID: usize = 256;

/// An event about `msg` (recipient, reply and the rest unset).
pub fn event_for(kind: EventKind, msg: &QueuedMessage, message_id: Option<&str>) -> Event {
    let env = &msg.envelope;
    let auth_user = env.client.auth_user.clone();
    let sender = env.mail.from.clone();
    let tenant = auth_user.clone().unwrap_or_else(|| {
        sender
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default()
    });
    Event {
        id: String::new(),
        kind,
        at_ms: now_ms(),
        queue_id: env.id.to_string(),
        message_id: message_id.map(str::to_owned),
        sender,
        recipient: None,
        auth_user,
        tenant,
        category: None,
        reply: None,
        mx: None,
        tls_version: None,
        tls_cipher: None,
        dsn_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_read_from_the_header_section_only() {
        let b = b"Subject: x\r\nMessage-Id: <abc@example.com>\r\n\r\nMessage-ID: <no@x>\r\n";
        assert_eq!(message_id_of(b).as_deref(), Some("abc@example.com"));
        let folded = b"Message-ID:\r\n <folded@example.com>\r\nTo: y\r\n\r\nbody";
        assert_eq!(message_id_of(folded).as_deref(), Some("folded@example.com"));
        assert_eq!(message_id_of(b"To: y\r\n\r\nMessage-ID: <b@x>\r\n"), None);
        assert_eq!(message_id_of(b"Message-ID: <>\r\n\r\n"), None);
        // A lone LF stays inside its line; the value ends at its CRLF.
        let lf = b"X-A: 1\nMessage-ID: <no@x>\r\nMessage-Id:  <<yes@x> trailing\r\n\r\n";
        assert_eq!(message_id_of(lf).as_deref(), Some("yes@x"));
        let long = format!("Message-ID: <{}@x>\r\n\r\n", "\u{e9}".repeat(300));
        let got = message_id_of(long.as_bytes()).unwrap();
        assert_eq!(got.chars().count(), MAX_MESSAGE_ID);
        assert!(got.chars().all(|c| c == '\u{e9}'));
        // Without a blank line, the whole message is the header section.
        assert_eq!(
            message_id_of(b"Message-ID: <end@x>").as_deref(),
            Some("end@x")
        );
    }

    #[test]
    fn a_batch_is_encoded_as_each_event_alone() {
        let mut e = Event {
            id: String::new(),
            kind: EventKind::Delivered,
            at_ms: 17,
            queue_id: "Q".into(),
            message_id: None,
            sender: "s@x".into(),
            recipient: Some("r\"@y".into()),
            auth_user: None,
            tenant: "x".into(),
            category: None,
            reply: Some("250 \u{e9}\n".into()),
            mx: None,
            tls_version: None,
            tls_cipher: None,
            dsn_id: None,
        };
        let mut events = vec![e.clone()];
        e.kind = EventKind::Bounced;
        e.category = Some("invalid_recipient".into());
        events.push(e);
        let enc = Encoded::new(&events).unwrap();
        let parts: Vec<&[u8]> = enc.iter().collect();
        assert_eq!(parts.len(), 2);
        for (p, e) in parts.iter().zip(&events) {
            assert_eq!(*p, serde_json::to_vec(e).unwrap().as_slice());
        }
        assert_eq!(Encoded::new(&[]).unwrap().iter().count(), 0);
    }

    #[test]
    fn outcome_events_keep_each_outcomes_events_apart() {
        let mut e = Event {
            id: String::new(),
            kind: EventKind::Delivered,
            at_ms: 1,
            queue_id: "Q0".into(),
            message_id: None,
            sender: "s@x".into(),
            recipient: None,
            auth_user: None,
            tenant: "x".into(),
            category: None,
            reply: None,
            mx: None,
            tls_version: None,
            tls_cipher: None,
            dsn_id: None,
        };
        let mut per_item: Vec<Vec<Event>> = Vec::new();
        for (i, n) in [2, 0, 1, 3].into_iter().enumerate() {
            per_item.push(
                (0..n)
                    .map(|j| {
                        e.queue_id = format!("Q{i}-{j}");
                        e.clone()
                    })
                    .collect(),
            );
        }
        let enc = OutcomeEvents::new(per_item.iter().map(Vec::as_slice), 77).unwrap();
        assert_eq!((enc.len(), enc.items(), enc.max_len()), (6, 4, 77));
        for (i, events) in per_item.iter().enumerate() {
            let got: Vec<&[u8]> = enc.of_item(i).collect();
            let want: Vec<Vec<u8>> = events
                .iter()
                .map(|e| serde_json::to_vec(e).unwrap())
                .collect();
            assert_eq!(
                got,
                want.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                "item {i}"
            );
        }
        assert_eq!(enc.of_item(4).count(), 0);
        let all: Vec<&[u8]> = enc.iter().collect();
        assert_eq!(all.len(), 6);
        assert_eq!(enc.to_encoded().iter().collect::<Vec<_>>(), all);
        assert!(
            OutcomeEvents::new(std::iter::empty(), 1)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn ids_parse() {
        assert_eq!(parse_id("17-3"), Some((17, 3)));
        assert_eq!(parse_id("17"), None);
    }

    #[tokio::test]
    async fn the_embedded_store_finds_by_recipient_and_time_and_trims() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(redb::Database::create(dir.path().join("e.redb")).unwrap());
        let store = EventStore::Embedded(EmbeddedEvents::open(db, 100).unwrap());
        let mut events = Vec::new();
        for i in 0..150u64 {
            events.push(Event {
                id: String::new(),
                kind: if i % 2 == 0 {
                    EventKind::Delivered
                } else {
                    EventKind::Deferred
                },
                at_ms: 1000 + i,
                queue_id: format!("Q{i}"),
                message_id: Some(format!("m{i}@x")),
                sender: "s@x.test".into(),
                recipient: Some(format!("r{}@y.test", i % 10)),
                auth_user: None,
                tenant: "x.test".into(),
                category: None,
                reply: Some("250 ok".into()),
                mx: None,
                tls_version: None,
                tls_cipher: None,
                dsn_id: None,
            });
        }
        let ids = store.append(&events).await.unwrap();
        assert_eq!(ids.len(), 150);
        assert!(ids.windows(2).all(|w| parse_id(&w[0]) < parse_id(&w[1])));
        let q = mailrelay_admin_api::EventQuery {
            to: Some("R3@Y.test".into()),
            limit: Some(3),
            ..Default::default()
        };
        let (found, truncated) = store.query(&q.check().unwrap()).await.unwrap();
        assert!(!truncated);
        // 150 written, trimmed back to the newest 100 (ids 50..150): the newest
        // three of r3 are 143, 133, 123, oldest first.
        let qids: Vec<_> = found.iter().map(|e| e.queue_id.as_str()).collect();
        assert_eq!(qids, ["Q123", "Q133", "Q143"]);
        let all = mailrelay_admin_api::EventQuery {
            limit: Some(1000),
            ..Default::default()
        };
        let (found, _) = store.query(&all.check().unwrap()).await.unwrap();
        assert_eq!(found.len(), 100);
        assert_eq!(found[0].queue_id, "Q50");
    }
}
