//! Embedded durable queue on [redb], for single-node relays without Redis.
//!
//! # Durability and group commit
//!
//! `enqueue` answers only after a redb commit with [`Durability::Immediate`] (an fsync)
//! that contains the message. An fsync costs milliseconds, so one commit per message
//! would cap a relay at a few hundred messages per second. Instead one OS thread owns
//! the write side: it takes every request that is already waiting in its channel,
//! applies them all in one write transaction, commits once, and then answers each
//! request. Under load many messages share one fsync; an idle queue still commits each
//! message on its own without waiting for company. A batch of leases, renewals and
//! give-backs alone commits without the fsync (see `Request::needs_fsync`): the
//! durability of a lease buys nothing, since opening the queue voids them all.
//!
//! A transaction is atomic, so a failed commit stores none of its batch, and every
//! request in it is answered with an error. A request that cannot be applied (as
//! opposed to a commit that fails) makes the thread retry the batch one request per
//! transaction, so one bad message cannot fail its neighbours.
//!
//! # Layout
//!
//! | table          | key          | value                                              |
//! |----------------|--------------|----------------------------------------------------|
//! | `messages`     | id           | [`Record`]: schedule, lease token, envelope and    |
//! |                |              | status JSON, for every queued message              |
//! | `bodies`       | id           | message bytes                                      |
//! | `due`          | (ms, id)     | the schedule: every queued message by the `at` of  |
//! |                |              | its record (next attempt, or lease expiry)         |
//! | `final`        | id           | (expiry ms, JSON of envelope and final status)     |
//! | `final_expiry` | (ms, id)     | final records by expiry, for purging               |
//! | `stats`        | name         | `messages`, `bytes` (body bytes), `deferred`,      |
//! |                |              | `leased`; `delivered`, `bounced`, `expired`        |
//! |                |              | (recipients of finished messages, never            |
//! |                |              | decremented)                                       |
//! | `meta`         | name         | `layout`: version of this layout                   |
//!
//! Each step of a message's life reads and rewrites its one record and moves its one
//! schedule entry: a lease is a record with `leased` set whose `at` is the lease's
//! expiry, so "what can be leased now" (due messages and expired leases alike) is one
//! range scan from the start of `due`. The body is apart so that leases and renewals
//! do not copy it. Counters live in `stats` and change in the same transaction as the
//! records they count, so [`Queue::stats`] is a few lookups. Ids are time-ordered
//! strings, so key order in `messages` is arrival order.
//!
//! Layouts 1 and 2 kept the envelope, status, schedule and lease of a message in seven
//! tables; opening such a file moves its messages into this layout once (see
//! [`migrate_legacy`]).
//!
//! Every write (enqueue, lease, finish, ...) goes through the writer thread, so group
//! commit covers them all and one transaction sees the effects of the ones before
//! it: two `lease_due` calls can never take the same message.
//!
//! Expired final records are purged a few at a time by batches that lease or finish
//! (a relay that delivers also purges); reads ignore expired ones meanwhile.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition,
    TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{
    DeliveryTotals, Envelope, FinishResult, Ingest, Inspect, Lease, Leased, Leasing, ListFilter,
    MessageStatus, QueueError, QueueFuture, QueueId, QueueOptions, QueueStats, QueuedMessage,
    RetrySelector, Store, lease_token, now_ms,
};

/// File name of the database inside the queue directory.
pub const DB_FILE: &str = "queue.redb";

const MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("messages");
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
/// Layout 2's table of due messages; from layout 3 on it also holds the leased ones
/// (by lease expiry).
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
const FINAL: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("final");
const FINAL_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("final_expiry");
const STATS: TableDefinition<&str, u64> = TableDefinition::new("stats");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const STAT_MESSAGES: &str = "messages";
const STAT_BYTES: &str = "bytes";
const STAT_DEFERRED: &str = "deferred";
const STAT_LEASED: &str = "leased";
const STAT_DELIVERED: &str = "delivered";
const STAT_BOUNCED: &str = "bounced";
const STAT_EXPIRED: &str = "expired";
const META_LAYOUT: &str = "layout";
/// Version 1 had only `envelopes`, `bodies` and `stats`; version 2 spread a message
/// over seven tables ([`legacy`]). Both are moved to this layout when first opened.
const LAYOUT_VERSION: u64 = 3;

/// The tables of layouts 1 and 2 that layout 3 replaced; only [`migrate_legacy`]
/// (and tests that write an old file) use them.
mod legacy {
    use redb::TableDefinition;

    pub(super) const ENVELOPES: TableDefinition<&str, &[u8]> = TableDefinition::new("envelopes");
    pub(super) const STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("status");
    pub(super) const DUE_AT: TableDefinition<&str, u64> = TableDefinition::new("due_at");
    pub(super) const LEASED: TableDefinition<(u64, &str), ()> = TableDefinition::new("leased");
    pub(super) const LEASED_UNTIL: TableDefinition<&str, u64> =
        TableDefinition::new("leased_until");
    pub(super) const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
}

/// Requests waiting for the writer; beyond this, `enqueue` waits for room, which
/// pushes back on SMTP sessions instead of buffering bodies without bound.
const CHANNEL_CAPACITY: usize = 1024;
/// A batch stops growing here so that one commit (and the latency of every request
/// in it) stays bounded however much is waiting.
const MAX_BATCH_OPS: usize = 512;
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Expired final records purged per batch that leases or finishes, so one batch after
/// a long pause does not hold the writer for a whole retention's worth of work.
const PURGE_LIMIT: usize = 256;

type Reply = oneshot::Sender<Result<Outcome, QueueError>>;

/// What a write asks for. Encoding to JSON happens on the caller's side, so the
/// writer thread spends its time on the database.
enum Request {
    Enqueue {
        id: String,
        /// The message's [`Record`], built by the caller.
        record: Vec<u8>,
        body: Vec<u8>,
        /// The `accepted` event (JSON) and the event log's cap, written in the same
        /// transaction.
        event: Option<(Vec<u8>, u64)>,
        /// The envelope as accepted, kept with the body in [`Fresh`] once committed.
        envelope: Box<Envelope>,
    },
    Remove {
        id: String,
    },
    LeaseDue {
        now_ms: u64,
        expires_ms: u64,
        max: usize,
        token: String,
    },
    Finish {
        id: String,
        token: String,
        /// Already checked by `MessageStatus::prepared_for_finish`.
        status: MessageStatus,
        now_ms: u64,
        retention_ms: u64,
    },
    Renew {
        id: String,
        token: String,
        expires_ms: u64,
    },
    RenewAll {
        leases: Vec<(String, String)>,
        expires_ms: u64,
    },
    /// Id, token, and when the message is due again.
    Release {
        leases: Vec<(String, String, u64)>,
    },
    RetryNow {
        sel: RetrySelector,
        now_ms: u64,
    },
    /// Outcome events (JSON) and the event log's cap, sent first in the same batch
    /// as the finishes they report: in their transaction, or, should the batch be
    /// applied one by one, committed before them.
    Events {
        events: crate::events::log::Encoded,
        max_len: u64,
    },
}

impl Request {
    fn size(&self) -> usize {
        match self {
            Request::Enqueue { record, body, .. } => record.len() + body.len(),
            _ => 0,
        }
    }

    /// Whether the answer promises something that must survive a crash. A lease does
    /// not: opening the queue voids every lease in it (their holder is gone) and makes
    /// the messages due, which is all a lost lease, renewal or give-back can come to.
    /// So a batch of those alone commits without an fsync, and the next durable commit
    /// makes it durable with everything else.
    fn needs_fsync(&self) -> bool {
        !matches!(
            self,
            Request::LeaseDue { .. }
                | Request::Renew { .. }
                | Request::RenewAll { .. }
                | Request::Release { .. }
        )
    }

    fn name(&self) -> &'static str {
        match self {
            Request::Enqueue { .. } => "enqueue",
            Request::Remove { .. } => "remove",
            Request::LeaseDue { .. } => "lease_due",
            Request::Finish { .. } => "finish",
            Request::Renew { .. } => "renew",
            Request::RenewAll { .. } => "renew_all",
            Request::Release { .. } => "release",
            Request::RetryNow { .. } => "retry_now",
            Request::Events { .. } => "events",
        }
    }
}

/// A write's answer; each [`Queue`] method knows which variant its request yields.
#[derive(Debug)]
enum Outcome {
    Done,
    Flag(bool),
    Leased(Vec<Leased>),
    Finished(FinishResult),
    Count(u64),
    Ids(Vec<String>),
}

struct WriteOp {
    req: Request,
    reply: Reply,
}

impl WriteOp {
    fn fail(self, error: QueueError) {
        // A closed reply channel means the caller stopped waiting; nothing to tell.
        let _ = self.reply.send(Err(error));
    }
}

/// State the writer thread shares with readers (for `ping` and tests).
#[derive(Default)]
struct WriterState {
    /// Set when a commit failed: redb then refuses further writes until the database
    /// is reopened, so readiness must fail rather than accept mail it cannot store.
    failure: Mutex<Option<String>>,
    commits: AtomicU64,
}

/// The embedded queue. Dropping it stops the writer thread after it has committed
/// and answered everything already sent to it, and closes the database.
pub struct EmbeddedQueue {
    db: Arc<Database>,
    path: PathBuf,
    options: QueueOptions,
    /// Each item is committed in one transaction (with whatever else is waiting).
    tx: Option<mpsc::Sender<Vec<WriteOp>>>,
    writer: Option<JoinHandle<()>>,
    state: Arc<WriterState>,
}

impl std::fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedQueue")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl EmbeddedQueue {
    /// Opens (or creates) the queue in `dir` with default [`QueueOptions`], creating
    /// the directory if needed; the database file is `dir/queue.redb`. Only one
    /// process may have it open, so leases found in it belong to a process that is
    /// gone (a crash or restart mid-delivery): their messages are due again at once
    /// rather than after their leases expire.
    pub fn open(dir: &Path) -> Result<Self, QueueError> {
        Self::open_with(dir, QueueOptions::default())
    }

    /// [`EmbeddedQueue::open`] with explicit options.
    pub fn open_with(dir: &Path, options: QueueOptions) -> Result<Self, QueueError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DB_FILE);
        let db = redb::Builder::new()
            .set_cache_size(options.cache_size)
            .create(&path)
            .map_err(db_err)?;
        // Creating the tables up front lets readers assume they exist.
        let txn = db.begin_write().map_err(db_err)?;
        let (migrated, orphaned) = {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let layout = meta.get(META_LAYOUT).map_err(db_err)?.map(|v| v.value());
            let migrated = if layout.unwrap_or(1) < LAYOUT_VERSION {
                migrate_legacy(&txn, now_ms())?
            } else {
                0
            };
            meta.insert(META_LAYOUT, LAYOUT_VERSION).map_err(db_err)?;
            let mut counters = Counters::read(&txn.open_table(STATS).map_err(db_err)?)?;
            let mut t = Tables::open(&txn, &mut counters)?;
            let orphaned = t.release_all(now_ms())?;
            t.save_counters()?;
            (migrated, orphaned)
        };
        txn.commit().map_err(db_err)?;
        if migrated > 0 {
            tracing::info!(
                messages = migrated,
                "moved messages queued by an older version to the current layout"
            );
        }
        if orphaned > 0 {
            tracing::info!(
                messages = orphaned,
                "messages in flight when the queue was last closed are due again"
            );
        }

        let db = Arc::new(db);
        let state = Arc::new(WriterState::default());
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let writer = {
            let db = db.clone();
            let state = state.clone();
            std::thread::Builder::new()
                .name("queue-writer".into())
                .spawn(move || writer_loop(&db, rx, &state))?
        };
        tracing::info!(path = %path.display(), "embedded queue opened");
        Ok(EmbeddedQueue {
            db,
            path,
            options,
            tx: Some(tx),
            writer: Some(writer),
            state,
        })
    }

    /// The database, for stores that keep their data beside the queue in their own
    /// tables (delivery events): the same file, fsync and crash safety.
    pub fn database(&self) -> Arc<Database> {
        Arc::clone(&self.db)
    }

    /// Number of write transactions committed since open; with group commit this is
    /// at most the number of writes, usually fewer under load.
    pub fn commits(&self) -> u64 {
        self.state.commits.load(Ordering::Relaxed)
    }

    async fn submit(&self, req: Request) -> Result<Outcome, QueueError> {
        let (reply, answer) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or_else(writer_gone)?;
        tx.send(vec![WriteOp { req, reply }])
            .await
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Runs a read on the blocking pool: redb reads are file I/O, and a 5 MB body
    /// should not stall the async workers.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            f(&txn)
        })
        .await
        .map_err(|e| QueueError::Unavailable(format!("embedded queue read task failed: {e}")))?
    }
}

impl Drop for EmbeddedQueue {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop once the requests already in it
        // are committed; joining makes the database file free to reopen on return.
        drop(self.tx.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("embedded queue writer thread panicked");
        }
    }
}

fn unexpected(op: &str, outcome: Outcome) -> QueueError {
    QueueError::Unavailable(format!(
        "embedded queue: {op} got an unexpected answer {outcome:?}"
    ))
}

impl Store for EmbeddedQueue {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn ping(&self) -> QueueFuture<'_, ()> {
        Box::pin(async move {
            if let Some(failure) = self
                .state
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Err(QueueError::Unavailable(failure));
            }
            if self.tx.as_ref().is_none_or(|tx| tx.is_closed()) {
                return Err(writer_gone());
            }
            self.read(|txn| {
                txn.open_table(STATS).map_err(db_err)?;
                Ok(())
            })
            .await
        })
    }
}

impl EmbeddedQueue {
    async fn enqueue_inner(
        &self,
        msg: &QueuedMessage,
        event: Option<(Vec<u8>, u64)>,
    ) -> Result<(), QueueError> {
        let id = valid_id(&msg.envelope.id)?.to_owned();
        let req = Request::Enqueue {
            id,
            record: Record::new_message(&msg.envelope)?,
            body: msg.body.clone(),
            event,
            envelope: Box::new(msg.envelope.clone()),
        };
        match self.submit(req).await? {
            Outcome::Flag(_) => Ok(()),
            other => Err(unexpected("enqueue", other)),
        }
    }
}

impl EmbeddedQueue {
    /// [`Leasing::finish_batch`], with the batch's outcome events in the same
    /// write when given.
    async fn finish_many(
        &self,
        items: Vec<(Lease, MessageStatus)>,
        events: Option<&crate::events::log::OutcomeEvents>,
    ) -> Result<Vec<Result<FinishResult, QueueError>>, QueueError> {
        let now_ms = now_ms();
        let retention_ms = millis(self.options.status_retention);
        let mut out: Vec<Option<Result<FinishResult, QueueError>>> = Vec::new();
        let mut ops = Vec::new();
        let mut answers = Vec::new();
        if let Some(events) = events.filter(|e| !e.is_empty()) {
            let (reply, answer) = oneshot::channel();
            ops.push(WriteOp {
                req: Request::Events {
                    events: events.to_encoded(),
                    max_len: events.max_len(),
                },
                reply,
            });
            answers.push((None, answer));
        }
        for (lease, status) in items {
            out.push(None);
            let status = match status.prepared_for_finish(&lease, now_ms) {
                Ok(s) => s,
                Err(e) => {
                    *out.last_mut().expect("just pushed") = Some(Err(e));
                    continue;
                }
            };
            if QueueId::parse(lease.id.as_str()).is_none() {
                *out.last_mut().expect("just pushed") = Some(Ok(FinishResult::LeaseLost));
                continue;
            }
            let (reply, answer) = oneshot::channel();
            ops.push(WriteOp {
                req: Request::Finish {
                    id: lease.id.as_str().to_owned(),
                    token: lease.token,
                    status,
                    now_ms,
                    retention_ms,
                },
                reply,
            });
            answers.push((Some(out.len() - 1), answer));
        }
        if !ops.is_empty() {
            let tx = self.tx.as_ref().ok_or_else(writer_gone)?;
            tx.send(ops).await.map_err(|_| writer_gone())?;
        }
        for (i, answer) in answers {
            let answer = answer.await.map_err(|_| writer_gone())?;
            let Some(i) = i else {
                // The events. Not stored (alone: the writer retried the batch one by
                // one, so finishes may be): the batch fails, and the caller writes
                // them on their own.
                match answer {
                    Ok(Outcome::Done) => continue,
                    Ok(other) => return Err(unexpected("events", other)),
                    Err(e) => return Err(e),
                }
            };
            out[i] = Some(match answer {
                Ok(Outcome::Finished(result)) => Ok(result),
                Ok(other) => Err(unexpected("finish", other)),
                Err(e) => Err(e),
            });
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every item answered"))
            .collect())
    }
}

impl Ingest for EmbeddedQueue {
    fn enqueue<'a>(&'a self, msg: &'a QueuedMessage) -> QueueFuture<'a, ()> {
        Box::pin(self.enqueue_inner(msg, None))
    }

    /// The event goes into the event log's table in the message's own transaction
    /// (and so shares its group commit: no extra fsync).
    fn enqueue_with_event<'a>(
        &'a self,
        msg: &'a QueuedMessage,
        event: &'a [u8],
        max_len: u64,
    ) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            self.enqueue_inner(msg, Some((event.to_vec(), max_len)))
                .await
                .map(|()| true)
        })
    }
}

impl Leasing for EmbeddedQueue {
    fn lease_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        max: usize,
        owner: &str,
    ) -> QueueFuture<'_, Vec<Leased>> {
        let req = Request::LeaseDue {
            now_ms,
            expires_ms: now_ms.saturating_add(lease_ms),
            max,
            token: lease_token(owner),
        };
        Box::pin(async move {
            if max == 0 {
                return Ok(Vec::new());
            }
            match self.submit(req).await? {
                Outcome::Leased(leased) => Ok(leased),
                other => Err(unexpected("lease_due", other)),
            }
        })
    }

    fn finish<'a>(
        &'a self,
        lease: &'a Lease,
        status: MessageStatus,
    ) -> QueueFuture<'a, FinishResult> {
        Box::pin(async move {
            let now_ms = now_ms();
            let status = status.prepared_for_finish(lease, now_ms)?;
            if QueueId::parse(lease.id.as_str()).is_none() {
                return Ok(FinishResult::LeaseLost);
            }
            let req = Request::Finish {
                id: lease.id.as_str().to_owned(),
                token: lease.token.clone(),
                status,
                now_ms,
                retention_ms: millis(self.options.status_retention),
            };
            match self.submit(req).await? {
                Outcome::Finished(result) => Ok(result),
                other => Err(unexpected("finish", other)),
            }
        })
    }

    /// One write transaction for the whole batch: the finishes go to the writer
    /// together, so they share one commit (one fsync) whatever else is waiting. A
    /// finish that cannot be applied fails alone (the writer retries one by one).
    fn finish_batch(
        &self,
        items: Vec<(Lease, MessageStatus)>,
    ) -> QueueFuture<'_, Vec<Result<FinishResult, QueueError>>> {
        Box::pin(self.finish_many(items, None))
    }

    fn writes_outcome_events(&self) -> bool {
        true
    }

    /// The events go to the writer with the finishes, first, and are appended to
    /// the event log's table in the finishes' write transaction (so they share its
    /// commit: no transaction and fsync of their own).
    fn finish_batch_with_events<'a>(
        &'a self,
        items: Vec<(Lease, MessageStatus)>,
        events: &'a crate::events::log::OutcomeEvents,
    ) -> QueueFuture<'a, Vec<Result<FinishResult, QueueError>>> {
        Box::pin(self.finish_many(items, Some(events)))
    }

    fn renew<'a>(&'a self, lease: &'a Lease, lease_ms: u64) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            if QueueId::parse(lease.id.as_str()).is_none() {
                return Ok(false);
            }
            let req = Request::Renew {
                id: lease.id.as_str().to_owned(),
                token: lease.token.clone(),
                expires_ms: now_ms().saturating_add(lease_ms),
            };
            match self.submit(req).await? {
                Outcome::Flag(renewed) => Ok(renewed),
                other => Err(unexpected("renew", other)),
            }
        })
    }

    fn renew_all<'a>(
        &'a self,
        leases: &'a [Lease],
        lease_ms: u64,
    ) -> QueueFuture<'a, Vec<QueueId>> {
        Box::pin(async move {
            let mut lost = Vec::new();
            let mut held = Vec::new();
            for l in leases {
                if QueueId::parse(l.id.as_str()).is_some() {
                    held.push((l.id.as_str().to_owned(), l.token.clone()));
                } else {
                    lost.push(l.id.clone());
                }
            }
            if held.is_empty() {
                return Ok(lost);
            }
            let req = Request::RenewAll {
                leases: held,
                expires_ms: now_ms().saturating_add(lease_ms),
            };
            match self.submit(req).await? {
                Outcome::Ids(ids) => {
                    for id in ids {
                        lost.push(QueueId::parse(&id).ok_or_else(|| {
                            QueueError::Corrupt(format!("renew_all returned id {id:?}"))
                        })?);
                    }
                    Ok(lost)
                }
                other => Err(unexpected("renew_all", other)),
            }
        })
    }

    fn give_back<'a>(&'a self, leases: &'a [(Lease, u64)]) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let leases: Vec<(String, String, u64)> = leases
                .iter()
                .filter(|(l, _)| QueueId::parse(l.id.as_str()).is_some())
                .map(|(l, due)| (l.id.as_str().to_owned(), l.token.clone(), *due))
                .collect();
            if leases.is_empty() {
                return Ok(());
            }
            match self.submit(Request::Release { leases }).await? {
                Outcome::Done => Ok(()),
                other => Err(unexpected("release", other)),
            }
        })
    }
}

impl Inspect for EmbeddedQueue {
    fn get<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, Option<QueuedMessage>> {
        Box::pin(async move {
            if QueueId::parse(id.as_str()).is_none() {
                return Ok(None);
            }
            let key = id.as_str().to_owned();
            self.read(move |txn| {
                let messages = txn.open_table(MESSAGES).map_err(db_err)?;
                let Some(record) = messages.get(key.as_str()).map_err(db_err)? else {
                    return Ok(None);
                };
                let envelope = Record::parse(&key, record.value())?.envelope(&key)?;
                let bodies = txn.open_table(BODIES).map_err(db_err)?;
                let body = bodies
                    .get(key.as_str())
                    .map_err(db_err)?
                    .ok_or_else(|| QueueError::Corrupt(format!("message {key} has no body")))?
                    .value()
                    .to_vec();
                Ok(Some(QueuedMessage { envelope, body }))
            })
            .await
        })
    }

    fn list_ids(&self, limit: usize) -> QueueFuture<'_, Vec<QueueId>> {
        Box::pin(self.read(move |txn| {
            let messages = txn.open_table(MESSAGES).map_err(db_err)?;
            let mut ids = Vec::new();
            for entry in messages.iter().map_err(db_err)?.take(limit) {
                let (key, _) = entry.map_err(db_err)?;
                ids.push(parse_id(key.value())?);
            }
            Ok(ids)
        }))
    }

    fn remove<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            if QueueId::parse(id.as_str()).is_none() {
                return Ok(false);
            }
            let id = id.as_str().to_owned();
            match self.submit(Request::Remove { id }).await? {
                Outcome::Flag(existed) => Ok(existed),
                other => Err(unexpected("remove", other)),
            }
        })
    }

    fn stats(&self) -> QueueFuture<'_, QueueStats> {
        Box::pin(self.read(|txn| {
            let stats = txn.open_table(STATS).map_err(db_err)?;
            let messages = txn.open_table(MESSAGES).map_err(db_err)?;
            let oldest_ms = match messages.first().map_err(db_err)? {
                Some((key, _)) => Some(parse_id(key.value())?.timestamp_ms()),
                None => None,
            };
            Ok(QueueStats {
                messages: stat(&stats, STAT_MESSAGES)?,
                bytes: stat(&stats, STAT_BYTES)?,
                leased: stat(&stats, STAT_LEASED)?,
                deferred: stat(&stats, STAT_DEFERRED)?,
                oldest_ms,
            })
        }))
    }

    fn delivery_totals(&self) -> QueueFuture<'_, DeliveryTotals> {
        Box::pin(self.read(|txn| {
            let stats = txn.open_table(STATS).map_err(db_err)?;
            Ok(DeliveryTotals {
                delivered: stat(&stats, STAT_DELIVERED)?,
                bounced: stat(&stats, STAT_BOUNCED)?,
                expired: stat(&stats, STAT_EXPIRED)?,
            })
        }))
    }

    fn status<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, Option<(Envelope, MessageStatus)>> {
        Box::pin(async move {
            if QueueId::parse(id.as_str()).is_none() {
                return Ok(None);
            }
            let key = id.as_str().to_owned();
            self.read(move |txn| {
                let messages = txn.open_table(MESSAGES).map_err(db_err)?;
                if let Some(record) = messages.get(key.as_str()).map_err(db_err)? {
                    return Record::parse(&key, record.value())?
                        .queued_status(&key)
                        .map(Some);
                }
                let finals = txn.open_table(FINAL).map_err(db_err)?;
                let Some(record) = finals.get(key.as_str()).map_err(db_err)? else {
                    return Ok(None);
                };
                let (expires_ms, json) = record.value();
                if expires_ms <= now_ms() {
                    // Expired but not purged yet: gone as far as anyone can tell.
                    return Ok(None);
                }
                let record: FinalRecord = decode("final record", &key, json)?;
                Ok(Some((record.envelope, record.status)))
            })
            .await
        })
    }

    fn list(&self, filter: ListFilter) -> QueueFuture<'_, Vec<(Envelope, MessageStatus)>> {
        Box::pin(self.read(move |txn| {
            let messages = txn.open_table(MESSAGES).map_err(db_err)?;
            let mut out = Vec::new();
            if filter.limit == 0 {
                return Ok(out);
            }
            for entry in messages.iter().map_err(db_err)? {
                let (key, record) = entry.map_err(db_err)?;
                let id = key.value();
                let (envelope, status) = Record::parse(id, record.value())?.queued_status(id)?;
                if filter.matches(&status) {
                    out.push((envelope, status));
                    if out.len() >= filter.limit {
                        break;
                    }
                }
            }
            Ok(out)
        }))
    }

    fn retry_now(&self, sel: RetrySelector) -> QueueFuture<'_, u64> {
        Box::pin(async move {
            if let RetrySelector::Id(id) = &sel
                && QueueId::parse(id.as_str()).is_none()
            {
                return Ok(0);
            }
            let req = Request::RetryNow {
                sel,
                now_ms: now_ms(),
            };
            match self.submit(req).await? {
                Outcome::Count(n) => Ok(n),
                other => Err(unexpected("retry_now", other)),
            }
        })
    }
}

/// A final message as kept for the status retention.
#[derive(Serialize, Deserialize)]
struct FinalRecord {
    envelope: Envelope,
    status: MessageStatus,
}

/// Just the attempt count of a stored status, to keep the `deferred` counter.
#[derive(Deserialize)]
struct StoredAttempts {
    #[serde(default)]
    attempts: u32,
}

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(value).map_err(|e| QueueError::Corrupt(format!("cannot encode {what}: {e}")))
}

fn decode<'de, T: Deserialize<'de>>(
    what: &str,
    id: &str,
    bytes: &'de [u8],
) -> Result<T, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| QueueError::Corrupt(format!("{what} of {id}: {e}")))
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn parse_id(key: &str) -> Result<QueueId, QueueError> {
    QueueId::parse(key).ok_or_else(|| QueueError::Corrupt(format!("invalid queue id {key:?}")))
}

/// A queued message's row in `messages`: where it is in the schedule, its latest
/// lease's token, and the JSON of its envelope and status. One row per message means
/// each step of its life is one read and one write here (plus the schedule entry),
/// where layout 2 touched up to seven tables.
///
/// Encoded as `[3][leased: u8][at: u64 LE][attempts: u32 LE][token length: u16 LE]
/// [token][envelope length: u32 LE][envelope JSON][status JSON]`. `at` is when the
/// message is due or, while leased, when the lease expires; `attempts` repeats the
/// status's so the `deferred` counter needs no JSON; an empty status stands for the
/// fresh one ([`MessageStatus::new`]), which enqueue does not encode.
#[derive(Clone, Copy)]
struct Record<'a> {
    leased: bool,
    at: u64,
    attempts: u32,
    /// The token of the latest lease; empty once finished or given back.
    token: &'a str,
    envelope: &'a [u8],
    status: &'a [u8],
}

const RECORD_TAG: u8 = 3;
/// Bytes before the token.
const RECORD_HEAD: usize = 16;

impl<'a> Record<'a> {
    /// The record of a message just accepted: due at arrival, never tried.
    fn new_message(envelope: &Envelope) -> Result<Vec<u8>, QueueError> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&[RECORD_TAG, 0]);
        out.extend_from_slice(&envelope.received_at_ms.to_le_bytes());
        out.extend_from_slice(&[0; 4 + 2 + 4]);
        let start = out.len();
        serde_json::to_writer(&mut out, envelope)
            .map_err(|e| QueueError::Corrupt(format!("cannot encode envelope: {e}")))?;
        let len = envelope_len(out.len() - start)?;
        out[start - 4..start].copy_from_slice(&len.to_le_bytes());
        Ok(out)
    }

    fn parse(id: &str, bytes: &'a [u8]) -> Result<Self, QueueError> {
        let bad = || QueueError::Corrupt(format!("record of {id} is malformed"));
        if bytes.len() < RECORD_HEAD || bytes[0] != RECORD_TAG {
            return Err(bad());
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
        let token_len = usize::from(u16::from_le_bytes([bytes[14], bytes[15]]));
        let rest = &bytes[RECORD_HEAD..];
        if rest.len() < token_len + 4 {
            return Err(bad());
        }
        let token = std::str::from_utf8(&rest[..token_len]).map_err(|_| bad())?;
        let rest = &rest[token_len..];
        let env_len = u32_at(rest) as usize;
        let rest = &rest[4..];
        if rest.len() < env_len {
            return Err(bad());
        }
        Ok(Record {
            leased: bytes[1] != 0,
            at: u64_at(2),
            attempts: u32_at(&bytes[10..14]),
            token,
            envelope: &rest[..env_len],
            status: &rest[env_len..],
        })
    }

    fn to_vec(self) -> Result<Vec<u8>, QueueError> {
        let token_len = u16::try_from(self.token.len())
            .map_err(|_| QueueError::Invalid("lease token is too long".into()))?;
        let mut out = Vec::with_capacity(
            RECORD_HEAD + self.token.len() + 4 + self.envelope.len() + self.status.len(),
        );
        out.extend_from_slice(&[RECORD_TAG, u8::from(self.leased)]);
        out.extend_from_slice(&self.at.to_le_bytes());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&token_len.to_le_bytes());
        out.extend_from_slice(self.token.as_bytes());
        out.extend_from_slice(&envelope_len(self.envelope.len())?.to_le_bytes());
        out.extend_from_slice(self.envelope);
        out.extend_from_slice(self.status);
        Ok(out)
    }

    fn envelope(&self, id: &str) -> Result<Envelope, QueueError> {
        decode("envelope", id, self.envelope)
    }

    fn status(&self, id: &str, envelope: &Envelope) -> Result<MessageStatus, QueueError> {
        if self.status.is_empty() {
            Ok(MessageStatus::new(envelope))
        } else {
            decode("status", id, self.status)
        }
    }

    /// Envelope and status as reads show them, the schedule filled in.
    fn queued_status(&self, id: &str) -> Result<(Envelope, MessageStatus), QueueError> {
        let envelope = self.envelope(id)?;
        let mut status = self.status(id, &envelope)?;
        if self.leased {
            status.leased_until_ms = Some(self.at);
        } else {
            status.next_attempt_ms = Some(self.at);
            status.leased_until_ms = None;
        }
        Ok((envelope, status))
    }

    /// The JSON of a [`FinalRecord`] with this envelope and `status`, without
    /// decoding the envelope to encode it again.
    fn final_json(&self, status: &MessageStatus) -> Result<Vec<u8>, QueueError> {
        let mut out = Vec::with_capacity(self.envelope.len() + 512);
        out.extend_from_slice(b"{\"envelope\":");
        out.extend_from_slice(self.envelope);
        out.extend_from_slice(b",\"status\":");
        serde_json::to_writer(&mut out, status)
            .map_err(|e| QueueError::Corrupt(format!("cannot encode status: {e}")))?;
        out.push(b'}');
        Ok(out)
    }
}

fn envelope_len(len: usize) -> Result<u32, QueueError> {
    u32::try_from(len).map_err(|_| QueueError::Invalid("envelope is too large".into()))
}

/// The `stats` counters. The writer thread is their only writer, so it keeps them in
/// memory between batches and writes the ones a batch changed in that batch's
/// transaction (reads come from the table).
#[derive(Clone, Copy, Default, PartialEq, Debug)]
struct Counters {
    messages: u64,
    bytes: u64,
    deferred: u64,
    leased: u64,
    delivered: u64,
    bounced: u64,
    expired: u64,
}

impl Counters {
    fn read(table: &impl ReadableTable<&'static str, u64>) -> Result<Self, QueueError> {
        Ok(Counters {
            messages: stat(table, STAT_MESSAGES)?,
            bytes: stat(table, STAT_BYTES)?,
            deferred: stat(table, STAT_DEFERRED)?,
            leased: stat(table, STAT_LEASED)?,
            delivered: stat(table, STAT_DELIVERED)?,
            bounced: stat(table, STAT_BOUNCED)?,
            expired: stat(table, STAT_EXPIRED)?,
        })
    }

    /// As committed; all zero in a file without a `stats` table yet.
    fn load(db: &Database) -> Result<Self, QueueError> {
        let txn = db.begin_read().map_err(db_err)?;
        match txn.open_table(STATS) {
            Ok(table) => Counters::read(&table),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(Counters::default()),
            Err(e) => Err(db_err(e)),
        }
    }

    fn fields(&self) -> [(&'static str, u64); 7] {
        [
            (STAT_MESSAGES, self.messages),
            (STAT_BYTES, self.bytes),
            (STAT_DEFERRED, self.deferred),
            (STAT_LEASED, self.leased),
            (STAT_DELIVERED, self.delivered),
            (STAT_BOUNCED, self.bounced),
            (STAT_EXPIRED, self.expired),
        ]
    }
}

/// Messages committed by this process and not leased since, as their enqueue
/// brought them: the envelope and the body. Most messages are leased moments after
/// they are queued, and the lease then takes them from here instead of decoding the
/// stored envelope and reading the body back (about 12 k instructions a message).
///
/// Only the writer thread uses it. An entry is added only after its enqueue
/// committed, and dropped by any later enqueue or removal of the same id, so what is
/// here is always what is stored. Losing entries is harmless (the lease reads the
/// database): a lease takes its entries even if its transaction then fails. Bounded,
/// since a relay that does not deliver never takes them.
#[derive(Default)]
struct Fresh {
    kept: std::collections::HashMap<String, (Box<Envelope>, Vec<u8>)>,
    bytes: usize,
}

const FRESH_MAX_MESSAGES: usize = 4096;
const FRESH_MAX_BYTES: usize = 16 << 20;

impl Fresh {
    fn keep(&mut self, id: String, envelope: Box<Envelope>, body: Vec<u8>) {
        self.forget(&id);
        if self.kept.len() >= FRESH_MAX_MESSAGES || self.bytes + body.len() > FRESH_MAX_BYTES {
            return;
        }
        self.bytes += body.len();
        self.kept.insert(id, (envelope, body));
    }

    fn take(&mut self, id: &str) -> Option<(Box<Envelope>, Vec<u8>)> {
        let kept = self.kept.remove(id)?;
        self.bytes -= kept.1.len();
        Some(kept)
    }

    fn forget(&mut self, id: &str) {
        self.take(id);
    }
}

fn writer_gone() -> QueueError {
    QueueError::Unavailable("embedded queue writer has stopped".into())
}

/// Keys are built from ids and listed back as ids, so refuse anything that is not one.
fn valid_id(id: &QueueId) -> Result<&str, QueueError> {
    QueueId::parse(id.as_str())
        .map(|_| id.as_str())
        .ok_or_else(|| QueueError::Corrupt(format!("invalid queue id {:?}", id.as_str())))
}

fn stat(table: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, QueueError> {
    Ok(table
        .get(key)
        .map_err(db_err)?
        .map(|v| v.value())
        .unwrap_or(0))
}

fn db_err(e: impl Into<redb::Error>) -> QueueError {
    match e.into() {
        redb::Error::Corrupted(m) => QueueError::Corrupt(format!("embedded queue: {m}")),
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => {
            QueueError::Full(format!("embedded queue: {e}"))
        }
        redb::Error::Io(e) => QueueError::Io(e),
        other => QueueError::Unavailable(format!("embedded queue: {other}")),
    }
}

fn writer_loop(db: &Database, mut rx: mpsc::Receiver<Vec<WriteOp>>, state: &WriterState) {
    let mut counters = match Counters::load(db) {
        Ok(c) => c,
        Err(e) => {
            // Without the counters no write can keep them right: refuse them all.
            let message = format!("embedded queue: cannot read the counters: {e}");
            tracing::error!("{message}");
            *state.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
            while let Some(batch) = rx.blocking_recv() {
                for op in batch {
                    op.fail(QueueError::Unavailable(message.clone()));
                }
            }
            return;
        }
    };
    let mut fresh = Fresh::default();
    while let Some(mut batch) = rx.blocking_recv() {
        let mut bytes: usize = batch.iter().map(|op| op.req.size()).sum();
        while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(ops) => {
                    bytes += ops.iter().map(|op| op.req.size()).sum::<usize>();
                    batch.extend(ops);
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        process_batch(db, batch, state, &mut counters, &mut fresh);
    }
    tracing::debug!("embedded queue writer stopped");
}

/// Which of a committed batch's requests are enqueues of messages that no later
/// request of the batch leased, removed or enqueued again: those are stored as the
/// enqueue brought them and not leased yet, so [`Fresh`] may keep them.
fn still_fresh(batch: &[WriteOp], outcomes: &[Outcome]) -> Vec<bool> {
    let mut keep = vec![false; batch.len()];
    if !batch
        .iter()
        .any(|op| matches!(op.req, Request::Enqueue { .. }))
    {
        return keep;
    }
    let mut later: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, (op, outcome)) in batch.iter().zip(outcomes).enumerate().rev() {
        match (&op.req, outcome) {
            (Request::Enqueue { id, .. }, _) => keep[i] = later.insert(id.as_str()),
            (Request::Remove { id }, _) => {
                later.insert(id.as_str());
            }
            (_, Outcome::Leased(leased)) => {
                later.extend(leased.iter().map(|l| l.lease.id.as_str()));
            }
            _ => {}
        }
    }
    keep
}

enum BatchError {
    /// A request could not be applied; nothing was committed.
    Apply(QueueError),
    /// Starting or committing the transaction failed.
    Commit(redb::Error),
}

fn process_batch(
    db: &Database,
    batch: Vec<WriteOp>,
    state: &WriterState,
    counters: &mut Counters,
    fresh: &mut Fresh,
) {
    // The batch works on a copy: a transaction that is not committed leaves the
    // counters as they were.
    let mut working = *counters;
    match commit_batch(db, &batch, &mut working, fresh) {
        Ok(outcomes) => {
            *counters = working;
            state.commits.fetch_add(1, Ordering::Relaxed);
            let keep = still_fresh(&batch, &outcomes);
            for ((op, outcome), keep) in batch.into_iter().zip(outcomes).zip(keep) {
                if op.reply.send(Ok(outcome)).is_err() {
                    // The caller timed out or went away, but the write is durable: a
                    // client that was told to retry may now send the message again; a
                    // lease nobody receives expires and the message comes back.
                    tracing::warn!("queue write committed after its caller stopped waiting");
                }
                // Only what is committed is kept: a lease may then take it as stored.
                if keep
                    && let Request::Enqueue {
                        id, body, envelope, ..
                    } = op.req
                {
                    fresh.keep(id, envelope, body);
                }
            }
        }
        Err(BatchError::Apply(e)) if batch.len() > 1 => {
            tracing::warn!(error = %e, ops = batch.len(), "queue batch failed to apply; retrying one by one");
            for op in batch {
                process_batch(db, vec![op], state, counters, fresh);
            }
        }
        Err(BatchError::Apply(e)) => {
            let op = batch.into_iter().next().expect("batch is not empty");
            tracing::error!(error = %e, op = op.req.name(), "queue write failed");
            op.fail(e);
        }
        Err(BatchError::Commit(e)) => {
            let message = format!("embedded queue commit failed: {e}");
            tracing::error!(error = %e, ops = batch.len(), "queue commit failed");
            *state.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
            for op in batch {
                op.fail(QueueError::Unavailable(message.clone()));
            }
        }
    }
}

/// Applies and commits a batch; returns each request's outcome.
fn commit_batch(
    db: &Database,
    batch: &[WriteOp],
    counters: &mut Counters,
    fresh: &mut Fresh,
) -> Result<Vec<Outcome>, BatchError> {
    let mut txn = db.begin_write().map_err(|e| BatchError::Commit(e.into()))?;
    let durability = if batch.iter().any(|op| op.req.needs_fsync()) {
        Durability::Immediate
    } else {
        Durability::None
    };
    txn.set_durability(durability)
        .map_err(|e| BatchError::Commit(e.into()))?;
    let outcomes = match apply(&txn, batch, counters, fresh) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            if let Err(abort) = txn.abort() {
                tracing::warn!(error = %abort, "aborting a failed queue transaction failed");
            }
            return Err(BatchError::Apply(e));
        }
    };
    txn.commit().map_err(|e| BatchError::Commit(e.into()))?;
    Ok(outcomes)
}

fn apply(
    txn: &WriteTransaction,
    batch: &[WriteOp],
    counters: &mut Counters,
    fresh: &mut Fresh,
) -> Result<Vec<Outcome>, QueueError> {
    let mut t = Tables::open(txn, counters)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    // The batch's events (`accepted` ones of enqueues, outcome events of finishes),
    // appended together: one look at the event table's end and length for all of
    // them.
    let mut events: Vec<&[u8]> = Vec::new();
    let mut events_cap = 0;
    let mut purge_at = None;
    for op in batch {
        match &op.req {
            Request::Enqueue {
                event: Some((json, max_len)),
                ..
            } => {
                events.push(json);
                events_cap = *max_len;
            }
            Request::Events {
                events: encoded,
                max_len,
            } => {
                events.extend(encoded.iter());
                events_cap = *max_len;
            }
            Request::LeaseDue { now_ms, .. } | Request::Finish { now_ms, .. } => {
                purge_at = purge_at.max(Some(*now_ms));
            }
            _ => {}
        }
        outcomes.push(t.apply(&op.req, fresh)?);
    }
    if let Some(now_ms) = purge_at {
        t.purge_finals(now_ms)?;
    }
    t.save_counters()?;
    if !events.is_empty() {
        crate::events::log::append_in(txn, &events, events_cap).map_err(db_err)?;
    }
    Ok(outcomes)
}

/// The queue's tables, open in one write transaction, and the counters as they stand
/// in it.
struct Tables<'t, 'c> {
    messages: Table<'t, &'static str, &'static [u8]>,
    bodies: Table<'t, &'static str, &'static [u8]>,
    due: Table<'t, (u64, &'static str), ()>,
    finals: Table<'t, &'static str, (u64, &'static [u8])>,
    final_expiry: Table<'t, (u64, &'static str), ()>,
    stats: Table<'t, &'static str, u64>,
    c: &'c mut Counters,
    /// As in the table when the transaction began.
    saved: Counters,
}

impl<'t, 'c> Tables<'t, 'c> {
    fn open(txn: &'t WriteTransaction, counters: &'c mut Counters) -> Result<Self, QueueError> {
        Ok(Tables {
            messages: txn.open_table(MESSAGES).map_err(db_err)?,
            bodies: txn.open_table(BODIES).map_err(db_err)?,
            due: txn.open_table(DUE).map_err(db_err)?,
            finals: txn.open_table(FINAL).map_err(db_err)?,
            final_expiry: txn.open_table(FINAL_EXPIRY).map_err(db_err)?,
            stats: txn.open_table(STATS).map_err(db_err)?,
            saved: *counters,
            c: counters,
        })
    }

    fn save_counters(&mut self) -> Result<(), QueueError> {
        for ((name, now), (_, before)) in self.c.fields().into_iter().zip(self.saved.fields()) {
            if now != before {
                self.stats.insert(name, now).map_err(db_err)?;
            }
        }
        self.saved = *self.c;
        Ok(())
    }

    fn apply(&mut self, req: &Request, fresh: &mut Fresh) -> Result<Outcome, QueueError> {
        Ok(match req {
            Request::Enqueue {
                id, record, body, ..
            } => {
                // What `fresh` holds of an earlier enqueue of this id is stale now
                // (this one is kept there once committed).
                fresh.forget(id);
                Outcome::Flag(self.enqueue(id, record, body)?)
            }
            Request::Remove { id } => {
                fresh.forget(id);
                Outcome::Flag(self.remove(id)?)
            }
            Request::LeaseDue {
                now_ms,
                expires_ms,
                max,
                token,
            } => Outcome::Leased(self.lease_due(*now_ms, *expires_ms, *max, token, fresh)?),
            Request::Finish {
                id,
                token,
                status,
                now_ms,
                retention_ms,
            } => Outcome::Finished(self.finish(id, token, status, *now_ms, *retention_ms)?),
            Request::Renew {
                id,
                token,
                expires_ms,
            } => Outcome::Flag(self.renew(id, token, *expires_ms)?),
            Request::RenewAll { leases, expires_ms } => {
                let mut lost = Vec::new();
                for (id, token) in leases {
                    if !self.renew(id, token, *expires_ms)? {
                        lost.push(id.clone());
                    }
                }
                Outcome::Ids(lost)
            }
            Request::Release { leases } => {
                for (id, token, due_ms) in leases {
                    self.release(id, token, *due_ms)?;
                }
                Outcome::Done
            }
            Request::RetryNow { sel, now_ms } => Outcome::Count(self.retry_now(sel, *now_ms)?),
            // Appended with the batch's other events, in `apply`.
            Request::Events { .. } => Outcome::Done,
        })
    }

    /// Stores a record that replaces `old`, moving its schedule entry and keeping the
    /// `leased` and `deferred` counters.
    fn put(&mut self, id: &str, old: &Record<'_>, new: &Record<'_>) -> Result<(), QueueError> {
        self.due.remove((old.at, id)).map_err(db_err)?;
        self.counted_out(old);
        self.messages
            .insert(id, new.to_vec()?.as_slice())
            .map_err(db_err)?;
        self.due.insert((new.at, id), ()).map_err(db_err)?;
        self.counted_in(new);
        Ok(())
    }

    fn counted_out(&mut self, r: &Record<'_>) {
        if r.leased {
            self.c.leased = self.c.leased.saturating_sub(1);
        }
        if r.attempts > 0 {
            self.c.deferred = self.c.deferred.saturating_sub(1);
        }
    }

    fn counted_in(&mut self, r: &Record<'_>) {
        if r.leased {
            self.c.leased += 1;
        }
        if r.attempts > 0 {
            self.c.deferred += 1;
        }
    }

    fn enqueue(&mut self, id: &str, record: &[u8], body: &[u8]) -> Result<bool, QueueError> {
        // Enqueueing an id again replaces it (fresh status, due again) without
        // counting it twice, so a caller may retry a write whose outcome it did not
        // learn. A final record left from a try that did finish is replaced when the
        // message is final again (reads look at queued messages first).
        let new = Record::parse(id, record)?;
        let old = match self.messages.insert(id, record).map_err(db_err)? {
            Some(old) => {
                let old = Record::parse(id, old.value())?;
                Some((old.at, old.leased, old.attempts))
            }
            None => None,
        };
        match old {
            Some((at, leased, attempts)) => {
                self.due.remove((at, id)).map_err(db_err)?;
                let gone = Record {
                    leased,
                    attempts,
                    ..new
                };
                self.counted_out(&gone);
            }
            None => self.c.messages += 1,
        }
        self.due.insert((new.at, id), ()).map_err(db_err)?;
        self.counted_in(&new);
        let old_len = self
            .bodies
            .insert(id, body)
            .map_err(db_err)?
            .map_or(0, |old| old.value().len() as u64);
        self.c.bytes = self.c.bytes.saturating_sub(old_len) + body.len() as u64;
        Ok(old.is_some())
    }

    fn remove(&mut self, id: &str) -> Result<bool, QueueError> {
        let old = self
            .messages
            .remove(id)
            .map_err(db_err)?
            .map(|g| g.value().to_vec());
        if let Some(old) = &old {
            let old = Record::parse(id, old)?;
            self.due.remove((old.at, id)).map_err(db_err)?;
            self.counted_out(&old);
            self.c.messages = self.c.messages.saturating_sub(1);
        }
        let old_len = self
            .bodies
            .remove(id)
            .map_err(db_err)?
            .map_or(0, |old| old.value().len() as u64);
        self.c.bytes = self.c.bytes.saturating_sub(old_len);
        self.drop_final(id)?;
        Ok(old.is_some())
    }

    fn lease_due(
        &mut self,
        now_ms: u64,
        expires_ms: u64,
        max: usize,
        token: &str,
        fresh: &mut Fresh,
    ) -> Result<Vec<Leased>, QueueError> {
        // Due messages and expired leases alike, by time: a dead worker's messages
        // come back at their lease's expiry, ahead of messages that became due later.
        let due = collect_keys(&self.due, now_ms, max)?;
        let mut out = Vec::with_capacity(due.len());
        for (at, id) in due {
            let Some(bytes) = self.record(&id)? else {
                tracing::warn!(
                    id,
                    "dropping a schedule entry of a message that is not queued"
                );
                self.due.remove((at, id.as_str())).map_err(db_err)?;
                continue;
            };
            let old = Record::parse(&id, &bytes)?;
            // A message leased for the first time since this process queued it is
            // still in `fresh`, as stored: no JSON to decode, no body to read and copy.
            let (envelope, kept_body) = match fresh.take(&id) {
                Some((envelope, body)) => (*envelope, Some(body)),
                None => (old.envelope(&id)?, None),
            };
            let mut status = old.status(&id, &envelope)?;
            let new = Record {
                leased: true,
                at: expires_ms,
                token,
                ..old
            };
            self.put(&id, &old, &new)?;
            let body = match kept_body {
                Some(body) => body,
                None => self
                    .bodies
                    .get(id.as_str())
                    .map_err(db_err)?
                    .ok_or_else(|| QueueError::Corrupt(format!("message {id} has no body")))?
                    .value()
                    .to_vec(),
            };
            status.next_attempt_ms = Some(at);
            status.leased_until_ms = Some(expires_ms);
            out.push(Leased {
                lease: Lease {
                    id: envelope.id.clone(),
                    token: token.to_owned(),
                    expires_ms,
                    head: Default::default(),
                },
                message: QueuedMessage { envelope, body },
                status,
            });
        }
        Ok(out)
    }

    /// The stored record of a queued message.
    fn record(&self, id: &str) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(self
            .messages
            .get(id)
            .map_err(db_err)?
            .map(|r| r.value().to_vec()))
    }

    /// The record of a queued message whose latest lease is `token`.
    fn held(&self, id: &str, token: &str) -> Result<Option<Vec<u8>>, QueueError> {
        let Some(bytes) = self.record(id)? else {
            return Ok(None);
        };
        let held = {
            let r = Record::parse(id, &bytes)?;
            r.leased && r.token == token
        };
        Ok(held.then_some(bytes))
    }

    fn finish(
        &mut self,
        id: &str,
        token: &str,
        status: &MessageStatus,
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<FinishResult, QueueError> {
        let Some(bytes) = self.held(id, token)? else {
            return Ok(FinishResult::LeaseLost);
        };
        let old = Record::parse(id, &bytes)?;
        let Some(next) = status.next_attempt_ms else {
            self.finalize(id, &old, status, now_ms, retention_ms)?;
            return Ok(FinishResult::Finalized);
        };
        let json = encode("status", status)?;
        let new = Record {
            leased: false,
            at: next,
            attempts: status.attempts,
            token: "",
            envelope: old.envelope,
            status: &json,
        };
        self.put(id, &old, &new)?;
        Ok(FinishResult::Rescheduled)
    }

    /// Moves a message from the queue to the final records.
    fn finalize(
        &mut self,
        id: &str,
        old: &Record<'_>,
        status: &MessageStatus,
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<(), QueueError> {
        self.messages.remove(id).map_err(db_err)?;
        self.due.remove((old.at, id)).map_err(db_err)?;
        self.counted_out(old);
        self.c.messages = self.c.messages.saturating_sub(1);
        let len = self
            .bodies
            .remove(id)
            .map_err(db_err)?
            .map_or(0, |b| b.value().len() as u64);
        self.c.bytes = self.c.bytes.saturating_sub(len);
        let totals = DeliveryTotals::of(status);
        self.c.delivered = self.c.delivered.saturating_add(totals.delivered);
        self.c.bounced = self.c.bounced.saturating_add(totals.bounced);
        self.c.expired = self.c.expired.saturating_add(totals.expired);
        let expires_ms = now_ms.saturating_add(retention_ms);
        let record = old.final_json(status)?;
        let replaced = self
            .finals
            .insert(id, (expires_ms, record.as_slice()))
            .map_err(db_err)?
            .map(|old| old.value().0);
        if let Some(old_expiry) = replaced {
            self.final_expiry.remove((old_expiry, id)).map_err(db_err)?;
        }
        self.final_expiry
            .insert((expires_ms, id), ())
            .map_err(db_err)?;
        Ok(())
    }

    fn renew(&mut self, id: &str, token: &str, expires_ms: u64) -> Result<bool, QueueError> {
        // A lease that expired but that nobody took since still belongs to its
        // holder: the token says nobody else has tried.
        let Some(bytes) = self.held(id, token)? else {
            return Ok(false);
        };
        let old = Record::parse(id, &bytes)?;
        let new = Record {
            at: expires_ms,
            ..old
        };
        self.put(id, &old, &new)?;
        Ok(true)
    }

    fn release(&mut self, id: &str, token: &str, due_ms: u64) -> Result<(), QueueError> {
        let Some(bytes) = self.held(id, token)? else {
            return Ok(());
        };
        let old = Record::parse(id, &bytes)?;
        let new = Record {
            leased: false,
            at: due_ms,
            token: "",
            ..old
        };
        self.put(id, &old, &new)
    }

    fn retry_now(&mut self, sel: &RetrySelector, now_ms: u64) -> Result<u64, QueueError> {
        let waiting = |id: &str, r: &Record<'_>| -> Result<bool, QueueError> {
            if r.leased || r.at <= now_ms {
                return Ok(false);
            }
            Ok(match sel {
                RetrySelector::Domain(domain) => {
                    let envelope = r.envelope(id)?;
                    r.status(id, &envelope)?.has_pending_in(domain)
                }
                RetrySelector::All | RetrySelector::Id(_) => true,
            })
        };
        let mut candidates = Vec::new();
        match sel {
            RetrySelector::Id(id) => {
                if let Some(bytes) = self.record(id.as_str())? {
                    let r = Record::parse(id.as_str(), &bytes)?;
                    if waiting(id.as_str(), &r)? {
                        candidates.push((id.as_str().to_owned(), bytes));
                    }
                }
            }
            RetrySelector::All | RetrySelector::Domain(_) => {
                for entry in self.messages.iter().map_err(db_err)? {
                    let (key, value) = entry.map_err(db_err)?;
                    let id = key.value();
                    if waiting(id, &Record::parse(id, value.value())?)? {
                        candidates.push((id.to_owned(), value.value().to_vec()));
                    }
                }
            }
        }
        for (id, bytes) in &candidates {
            let old = Record::parse(id, bytes)?;
            self.put(id, &old, &Record { at: now_ms, ..old })?;
        }
        Ok(candidates.len() as u64)
    }

    fn drop_final(&mut self, id: &str) -> Result<(), QueueError> {
        if let Some(record) = self.finals.remove(id).map_err(db_err)? {
            let (expires_ms, _) = record.value();
            self.final_expiry.remove((expires_ms, id)).map_err(db_err)?;
        }
        Ok(())
    }

    fn purge_finals(&mut self, now_ms: u64) -> Result<(), QueueError> {
        for (_, id) in collect_keys(&self.final_expiry, now_ms, PURGE_LIMIT)? {
            self.drop_final(&id)?;
        }
        Ok(())
    }

    /// Returns every leased message to due at `now_ms`, voiding the leases; returns
    /// how many there were.
    fn release_all(&mut self, now_ms: u64) -> Result<u64, QueueError> {
        if self.c.leased == 0 {
            return Ok(0);
        }
        let mut leased = Vec::new();
        for entry in self.messages.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let id = key.value();
            if Record::parse(id, value.value())?.leased {
                leased.push((id.to_owned(), value.value().to_vec()));
            }
        }
        for (id, bytes) in &leased {
            let old = Record::parse(id, bytes)?;
            let new = Record {
                leased: false,
                at: now_ms,
                token: "",
                ..old
            };
            self.put(id, &old, &new)?;
        }
        Ok(leased.len() as u64)
    }
}

/// Moves the messages of a layout 1 or 2 file into `messages` and rebuilds `due` from
/// them, then deletes the old tables. Leased messages are due at `now_ms` (their
/// holder is gone); layout 1's messages had no schedule and are due at arrival.
/// `bodies`, `final`, `final_expiry` and `stats` keep their layout; `leased` counts
/// the layout 3 records already there (released right after). Returns how many
/// messages it moved.
fn migrate_legacy(txn: &WriteTransaction, now_ms: u64) -> Result<u64, QueueError> {
    let names: Vec<String> = txn
        .list_tables()
        .map_err(db_err)?
        .map(|t| t.name().to_owned())
        .collect();
    let exists = |name: &str| names.iter().any(|n| n == name);
    if !exists("envelopes") {
        return Ok(0);
    }
    let mut moved = 0;
    {
        let envelopes = txn.open_table(legacy::ENVELOPES).map_err(db_err)?;
        let statuses = txn.open_table(legacy::STATUS).map_err(db_err)?;
        let due_at = txn.open_table(legacy::DUE_AT).map_err(db_err)?;
        let mut messages = txn.open_table(MESSAGES).map_err(db_err)?;
        let mut due = txn.open_table(DUE).map_err(db_err)?;
        due.retain(|_, _| false).map_err(db_err)?;
        // A file moved once and then opened by an older relay (a rollback) also has
        // layout 3 records, which that relay could not see: keep them scheduled.
        let mut leased = 0;
        for entry in messages.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let record = Record::parse(key.value(), value.value())?;
            due.insert((record.at, key.value()), ()).map_err(db_err)?;
            leased += u64::from(record.leased);
        }
        for entry in envelopes.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let id = key.value();
            let envelope = value.value();
            let status = statuses.get(id).map_err(db_err)?;
            let status = status.as_ref().map_or(&[][..], |s| s.value());
            let attempts = if status.is_empty() {
                0
            } else {
                decode::<StoredAttempts>("status", id, status)?.attempts
            };
            let at = match due_at.get(id).map_err(db_err)? {
                Some(at) => at.value(),
                // Leased (layout 2) or never scheduled (layout 1).
                None if !status.is_empty() => now_ms,
                None => decode::<Envelope>("envelope", id, envelope)?.received_at_ms,
            };
            let record = Record {
                leased: false,
                at,
                attempts,
                token: "",
                envelope,
                status,
            };
            messages
                .insert(id, record.to_vec()?.as_slice())
                .map_err(db_err)?;
            due.insert((at, id), ()).map_err(db_err)?;
            moved += 1;
        }
        txn.open_table(STATS)
            .map_err(db_err)?
            .insert(STAT_LEASED, leased)
            .map_err(db_err)?;
    }
    txn.delete_table(legacy::ENVELOPES).map_err(db_err)?;
    txn.delete_table(legacy::STATUS).map_err(db_err)?;
    txn.delete_table(legacy::DUE_AT).map_err(db_err)?;
    txn.delete_table(legacy::LEASED).map_err(db_err)?;
    txn.delete_table(legacy::LEASED_UNTIL).map_err(db_err)?;
    txn.delete_table(legacy::TOKENS).map_err(db_err)?;
    Ok(moved)
}

/// The first `limit` keys of a (time, id) index with time at or before `until`.
fn collect_keys(
    table: &impl ReadableTable<(u64, &'static str), ()>,
    until: u64,
    limit: usize,
) -> Result<Vec<(u64, String)>, QueueError> {
    let mut keys = Vec::new();
    // (until + 1, "") is the first key after every key at `until`.
    for entry in table
        .range::<(u64, &str)>(..(until.saturating_add(1), ""))
        .map_err(db_err)?
        .take(limit)
    {
        let (key, _) = entry.map_err(db_err)?;
        let (at, id) = key.value();
        keys.push((at, id.to_owned()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{ClientInfo, MailParams, Recipient};
    use redb::ReadableTableMetadata;

    fn message(body: &[u8]) -> QueuedMessage {
        QueuedMessage {
            envelope: Envelope {
                id: QueueId::generate(),
                mail: MailParams {
                    from: "a@example.test".into(),
                    ..Default::default()
                },
                recipients: vec![Recipient {
                    address: "b@example.test".into(),
                    notify: None,
                    orcpt: None,
                }],
                client: ClientInfo {
                    ip: "127.0.0.1".parse().unwrap(),
                    port: 2525,
                    helo: "client.test".into(),
                    auth_user: None,
                    tls: None,
                    listener: "smtp".into(),
                },
                received_at_ms: 1,
                received_by: "relay.test".into(),
            },
            body: body.to_vec(),
        }
    }

    /// Requests that are waiting when the writer looks share one transaction; this
    /// sets that up deterministically by queueing them before the writer runs.
    #[test]
    fn waiting_requests_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join(DB_FILE)).unwrap();
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let mut answers = Vec::new();
        for i in 0..20u8 {
            let msg = message(&[i; 100]);
            let (reply, answer) = oneshot::channel();
            tx.try_send(vec![WriteOp {
                req: Request::Enqueue {
                    id: msg.envelope.id.as_str().to_owned(),
                    record: Record::new_message(&msg.envelope).unwrap(),
                    body: msg.body,
                    event: None,
                    envelope: Box::new(msg.envelope),
                },
                reply,
            }])
            .unwrap_or_else(|_| panic!("channel full"));
            answers.push(answer);
        }
        drop(tx);
        let state = WriterState::default();
        writer_loop(&db, rx, &state);
        assert_eq!(state.commits.load(Ordering::Relaxed), 1);
        for mut answer in answers {
            answer.try_recv().unwrap().unwrap();
        }
        let txn = db.begin_read().unwrap();
        let stats = txn.open_table(STATS).unwrap();
        assert_eq!(stat(&stats, STAT_MESSAGES).unwrap(), 20);
        assert_eq!(stat(&stats, STAT_BYTES).unwrap(), 2000);
    }

    fn enqueue_op(
        msg: &QueuedMessage,
    ) -> (WriteOp, oneshot::Receiver<Result<Outcome, QueueError>>) {
        let (reply, answer) = oneshot::channel();
        let op = WriteOp {
            req: Request::Enqueue {
                id: msg.envelope.id.as_str().to_owned(),
                record: Record::new_message(&msg.envelope).unwrap(),
                body: msg.body.clone(),
                event: None,
                envelope: Box::new(msg.envelope.clone()),
            },
            reply,
        };
        (op, answer)
    }

    fn lease_op(max: usize) -> (WriteOp, oneshot::Receiver<Result<Outcome, QueueError>>) {
        let (reply, answer) = oneshot::channel();
        let op = WriteOp {
            req: Request::LeaseDue {
                now_ms: now_ms() + 1000,
                expires_ms: now_ms() + 60_000,
                max,
                token: lease_token("test"),
            },
            reply,
        };
        (op, answer)
    }

    /// The writer's state as `writer_loop` keeps it, on a new file.
    fn writer_parts() -> (tempfile::TempDir, Arc<Database>, Counters, Fresh) {
        let dir = tempfile::tempdir().unwrap();
        let queue = EmbeddedQueue::open(dir.path()).unwrap();
        let db = queue.database();
        drop(queue);
        let counters = Counters::load(&db).unwrap();
        (dir, db, counters, Fresh::default())
    }

    fn leased(mut answer: oneshot::Receiver<Result<Outcome, QueueError>>) -> Vec<Leased> {
        match answer.try_recv().unwrap().unwrap() {
            Outcome::Leased(l) => l,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A lease takes a message it finds in `fresh` from there, and what it takes is
    /// what is stored: an enqueue of the same id again, in the lease's own batch,
    /// is what the lease gets, not what `fresh` kept of the first one.
    #[test]
    fn a_lease_gets_the_message_as_last_stored_whether_kept_in_memory_or_not() {
        let (_dir, db, mut counters, mut fresh) = writer_parts();
        let state = WriterState::default();
        let first = message(b"first body\r\n");
        let (op, answer) = enqueue_op(&first);
        process_batch(&db, vec![op], &state, &mut counters, &mut fresh);
        drop(answer);
        assert_eq!(fresh.kept.len(), 1, "a committed enqueue is kept");
        assert_eq!(fresh.bytes, first.body.len());

        let mut second = first.clone();
        second.body = b"second body, longer\r\n".to_vec();
        second.envelope.mail.from = "other@example.test".into();
        let (enq, _a) = enqueue_op(&second);
        let (lease, answer) = lease_op(10);
        process_batch(&db, vec![enq, lease], &state, &mut counters, &mut fresh);
        let got = leased(answer);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message, second, "the lease sees the second enqueue");
        // Leased in its own batch (from the database: the commit comes after), so it
        // is not kept: nothing would ever take it.
        assert!(fresh.kept.is_empty());

        // Given back and leased again: kept entries are gone after a lease, so this
        // one comes from the database, and equals what a fresh lease returned.
        let third = message(b"third\r\n");
        let (enq, _a) = enqueue_op(&third);
        process_batch(&db, vec![enq], &state, &mut counters, &mut fresh);
        assert_eq!(fresh.kept.len(), 1);
        let (lease, answer) = lease_op(10);
        process_batch(&db, vec![lease], &state, &mut counters, &mut fresh);
        let got = leased(answer);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message, third, "taken from memory, as stored");
        assert_eq!(got[0].status, {
            let mut s = MessageStatus::new(&third.envelope);
            s.next_attempt_ms = got[0].status.next_attempt_ms;
            s.leased_until_ms = got[0].status.leased_until_ms;
            s
        });
        assert!(fresh.kept.is_empty(), "a lease takes what it uses");
        assert_eq!(fresh.bytes, 0);
    }

    /// `fresh` is bounded (a relay that never delivers never takes from it), and a
    /// removed message is dropped from it.
    #[test]
    fn messages_kept_in_memory_are_bounded_and_dropped_on_removal() {
        let mut fresh = Fresh::default();
        let msg = message(b"x");
        for i in 0..FRESH_MAX_MESSAGES + 10 {
            fresh.keep(
                format!("id{i}"),
                Box::new(msg.envelope.clone()),
                vec![0; 10],
            );
        }
        assert_eq!(fresh.kept.len(), FRESH_MAX_MESSAGES);
        assert_eq!(fresh.bytes, FRESH_MAX_MESSAGES * 10);
        let mut fresh = Fresh::default();
        fresh.keep(
            "big".into(),
            Box::new(msg.envelope.clone()),
            vec![0; FRESH_MAX_BYTES + 1],
        );
        assert!(
            fresh.kept.is_empty(),
            "a body past the byte bound is not kept"
        );

        let (_dir, db, mut counters, mut fresh) = writer_parts();
        let state = WriterState::default();
        let (op, _a) = enqueue_op(&msg);
        process_batch(&db, vec![op], &state, &mut counters, &mut fresh);
        assert_eq!(fresh.kept.len(), 1);
        let (reply, _answer) = oneshot::channel();
        let remove = WriteOp {
            req: Request::Remove {
                id: msg.envelope.id.as_str().to_owned(),
            },
            reply,
        };
        process_batch(&db, vec![remove], &state, &mut counters, &mut fresh);
        assert!(fresh.kept.is_empty());
        // Enqueued and removed in one batch: not kept either.
        let (op, _a) = enqueue_op(&msg);
        let (reply, _answer) = oneshot::channel();
        let remove = WriteOp {
            req: Request::Remove {
                id: msg.envelope.id.as_str().to_owned(),
            },
            reply,
        };
        process_batch(&db, vec![op, remove], &state, &mut counters, &mut fresh);
        assert!(fresh.kept.is_empty());
        let (lease, answer) = lease_op(10);
        process_batch(&db, vec![lease], &state, &mut counters, &mut fresh);
        assert!(leased(answer).is_empty());
    }

    #[tokio::test]
    async fn rejects_ids_that_could_not_have_been_generated() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        let mut msg = message(b"x");
        msg.envelope.id = serde_json::from_str("\"../../etc/passwd\"").unwrap();
        assert!(matches!(q.enqueue(&msg).await, Err(QueueError::Corrupt(_))));
        assert_eq!(q.get(&msg.envelope.id).await.unwrap(), None);
        assert!(!q.remove(&msg.envelope.id).await.unwrap());
        assert_eq!(q.stats().await.unwrap(), QueueStats::default());
    }

    #[tokio::test]
    async fn dropping_the_queue_stops_the_writer_and_frees_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let msg = message(b"hello\r\n");
        {
            let q = EmbeddedQueue::open(dir.path()).unwrap();
            q.enqueue(&msg).await.unwrap();
            q.ping().await.unwrap();
            assert!(q.commits() >= 1);
        }
        // Opening again would fail with "already open" if the first handle lingered.
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        assert_eq!(q.get(&msg.envelope.id).await.unwrap(), Some(msg));
    }

    /// Finishes every one of `taken` as delivered to its (first) recipient.
    async fn finish_delivered(q: &EmbeddedQueue, taken: &[Leased]) {
        for l in taken {
            let mut s = l.status.clone();
            s.rcpts[0].state = crate::queue::RcptState::Delivered;
            s.next_attempt_ms = None;
            assert_eq!(
                q.finish(&l.lease, s).await.unwrap(),
                FinishResult::Finalized
            );
        }
    }

    /// A queue written before leases existed has messages but no schedule; opening
    /// it with this version makes them due (at arrival) with a fresh status.
    #[tokio::test]
    async fn messages_of_layout_1_are_scheduled_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let msg = message(b"from layout 1\r\n");
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let id = msg.envelope.id.as_str();
                let env = serde_json::to_vec(&msg.envelope).unwrap();
                txn.open_table(legacy::ENVELOPES)
                    .unwrap()
                    .insert(id, env.as_slice())
                    .unwrap();
                txn.open_table(BODIES)
                    .unwrap()
                    .insert(id, msg.body.as_slice())
                    .unwrap();
                let mut stats = txn.open_table(STATS).unwrap();
                stats.insert(STAT_MESSAGES, 1).unwrap();
                stats.insert(STAT_BYTES, msg.body.len() as u64).unwrap();
            }
            txn.commit().unwrap();
        }
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        let (_, status) = q.status(&msg.envelope.id).await.unwrap().unwrap();
        assert_eq!(status, MessageStatus::new(&msg.envelope));
        let leased = q.lease_due(now_ms(), 1000, 10, "w").await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].message, msg);
        let mut later = leased[0].status.clone();
        later.next_attempt_ms = Some(now_ms() + 3_600_000);
        q.finish(&leased[0].lease, later).await.unwrap();
        drop(q);
        // The migration runs once: a second open does not make the message due again.
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        assert!(
            q.lease_due(now_ms(), 1000, 10, "w")
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A queue written by layout 2 (seven tables per message) opens with this version:
    /// its messages move to `messages` keeping their schedule, status and counters, a
    /// leased one is due at once, final records stay readable, the old tables are
    /// gone, and everything drains.
    #[tokio::test]
    async fn messages_of_layout_2_move_on_open_and_drain() {
        let dir = tempfile::tempdir().unwrap();
        let now = now_ms();
        let later = now + 3_600_000;
        let due = message(b"due\r\n");
        let leased = message(b"leased\r\n");
        let deferred = message(b"deferred\r\n");
        let done = message(b"done\r\n");
        let mut deferred_status = MessageStatus::new(&deferred.envelope);
        deferred_status.attempts = 1;
        deferred_status.next_attempt_ms = Some(later);
        let mut done_status = MessageStatus::new(&done.envelope);
        done_status.rcpts[0].state = crate::queue::RcptState::Delivered;
        done_status.next_attempt_ms = None;
        let bytes = (due.body.len() + leased.body.len() + deferred.body.len()) as u64;
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut envelopes = txn.open_table(legacy::ENVELOPES).unwrap();
                let mut bodies = txn.open_table(BODIES).unwrap();
                let mut status = txn.open_table(legacy::STATUS).unwrap();
                for (m, s) in [
                    (&due, MessageStatus::new(&due.envelope)),
                    (&leased, MessageStatus::new(&leased.envelope)),
                    (&deferred, deferred_status.clone()),
                ] {
                    let id = m.envelope.id.as_str();
                    let env = serde_json::to_vec(&m.envelope).unwrap();
                    envelopes.insert(id, env.as_slice()).unwrap();
                    bodies.insert(id, m.body.as_slice()).unwrap();
                    let s = serde_json::to_vec(&s).unwrap();
                    status.insert(id, s.as_slice()).unwrap();
                }
                let mut due_t = txn.open_table(DUE).unwrap();
                let mut due_at = txn.open_table(legacy::DUE_AT).unwrap();
                for (m, at) in [(&due, 1), (&deferred, later)] {
                    due_t.insert((at, m.envelope.id.as_str()), ()).unwrap();
                    due_at.insert(m.envelope.id.as_str(), at).unwrap();
                }
                let id = leased.envelope.id.as_str();
                txn.open_table(legacy::LEASED)
                    .unwrap()
                    .insert((later, id), ())
                    .unwrap();
                txn.open_table(legacy::LEASED_UNTIL)
                    .unwrap()
                    .insert(id, later)
                    .unwrap();
                txn.open_table(legacy::TOKENS)
                    .unwrap()
                    .insert(id, "gone#1")
                    .unwrap();
                let record = serde_json::to_vec(&FinalRecord {
                    envelope: done.envelope.clone(),
                    status: done_status.clone(),
                })
                .unwrap();
                let id = done.envelope.id.as_str();
                txn.open_table(FINAL)
                    .unwrap()
                    .insert(id, (later, record.as_slice()))
                    .unwrap();
                txn.open_table(FINAL_EXPIRY)
                    .unwrap()
                    .insert((later, id), ())
                    .unwrap();
                let mut stats = txn.open_table(STATS).unwrap();
                stats.insert(STAT_MESSAGES, 3).unwrap();
                stats.insert(STAT_BYTES, bytes).unwrap();
                stats.insert(STAT_DEFERRED, 1).unwrap();
                stats.insert(STAT_DELIVERED, 1).unwrap();
                txn.open_table(META)
                    .unwrap()
                    .insert(META_LAYOUT, 2)
                    .unwrap();
            }
            txn.commit().unwrap();
        }

        let q = EmbeddedQueue::open(dir.path()).unwrap();
        let stats = q.stats().await.unwrap();
        assert_eq!(
            (stats.messages, stats.bytes, stats.leased, stats.deferred),
            (3, bytes, 0, 1)
        );
        let (_, s) = q.status(&deferred.envelope.id).await.unwrap().unwrap();
        assert_eq!((s.attempts, s.next_attempt_ms), (1, Some(later)));
        let (_, s) = q.status(&done.envelope.id).await.unwrap().unwrap();
        assert!(s.is_final());
        {
            let txn = q.db.begin_read().unwrap();
            let names: Vec<String> = txn
                .list_tables()
                .unwrap()
                .map(|t| t.name().to_owned())
                .collect();
            for old in [
                "envelopes",
                "status",
                "due_at",
                "leased",
                "leased_until",
                "tokens",
            ] {
                assert!(!names.iter().any(|n| n == old), "{old} left in {names:?}");
            }
        }

        // The due one and the one whose holder is gone; the deferred one waits.
        let mut taken = q.lease_due(now_ms(), 60_000, 10, "w").await.unwrap();
        taken.sort_by(|a, b| a.lease.id.cmp(&b.lease.id));
        let mut want = [due.clone(), leased.clone()];
        want.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        assert_eq!(
            taken.iter().map(|l| &l.message).collect::<Vec<_>>(),
            want.iter().collect::<Vec<_>>()
        );
        assert_eq!(
            q.retry_now(RetrySelector::Id(deferred.envelope.id.clone()))
                .await
                .unwrap(),
            1
        );
        taken.extend(q.lease_due(now_ms(), 60_000, 10, "w").await.unwrap());
        assert_eq!(taken.len(), 3);
        assert_eq!(taken[2].message, deferred);
        assert_eq!(taken[2].status.attempts, 1);
        finish_delivered(&q, &taken).await;
        assert_eq!(q.stats().await.unwrap(), QueueStats::default());
        assert_eq!(q.delivery_totals().await.unwrap().delivered, 4);
        drop(q);
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        assert!(
            q.lease_due(now_ms(), 1000, 10, "w")
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(q.stats().await.unwrap(), QueueStats::default());
    }

    /// A `queue.redb` written by the release before layout 3 (db524c3, made with
    /// `mailrelay serve`: one message delivered, one deferred after a refused
    /// connection, then two queued with delivery off) opens, shows what it held, and
    /// drains.
    #[tokio::test]
    async fn a_queue_written_by_the_layout_2_release_opens_and_drains() {
        use std::io::Read as _;
        let dir = tempfile::tempdir().unwrap();
        let gz: &[u8] = include_bytes!("../../tests/data/queue-layout2.redb.gz");
        let mut file = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut file)
            .unwrap();
        std::fs::write(dir.path().join(DB_FILE), file).unwrap();
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        let stats = q.stats().await.unwrap();
        assert_eq!((stats.messages, stats.deferred, stats.leased), (3, 1, 0));
        assert_eq!(q.delivery_totals().await.unwrap().delivered, 1);
        {
            // The delivered one's final record (read raw: it expires a day after
            // the file was made, and reads hide expired ones).
            let txn = q.db.begin_read().unwrap();
            let finals = txn.open_table(FINAL).unwrap();
            assert!(finals.get("06H4Z0V612HKG18Q471G").unwrap().is_some());
        }
        let queued = [
            (
                "06H4Z0VMTQQS0B1K1243",
                "rcpt@example.net",
                "fixture deferred",
                1,
            ),
            ("06H4Z0W30PJR76KXE7PD", "a@example.net", "fixture due-1", 0),
            ("06H4Z0W48JB53TCZZQB0", "b@example.org", "fixture due-2", 0),
        ];
        let ids = q.list_ids(10).await.unwrap();
        assert_eq!(
            ids.iter().map(QueueId::as_str).collect::<Vec<_>>(),
            queued.iter().map(|q| q.0).collect::<Vec<_>>()
        );
        // The deferred one's retry was due minutes after the file was made.
        let mut taken = q.lease_due(now_ms(), 60_000, 10, "w").await.unwrap();
        taken.sort_by(|a, b| a.lease.id.cmp(&b.lease.id));
        assert_eq!(taken.len(), 3);
        for (l, (id, rcpt, text, attempts)) in taken.iter().zip(queued) {
            assert_eq!(l.lease.id.as_str(), id);
            assert_eq!(l.message.envelope.recipients[0].address, rcpt);
            let body = String::from_utf8_lossy(&l.message.body);
            assert!(body.contains(text), "{id}: {body}");
            assert_eq!(l.status.attempts, attempts, "{id}");
        }
        finish_delivered(&q, &taken).await;
        assert_eq!(q.stats().await.unwrap(), QueueStats::default());
        assert_eq!(q.delivery_totals().await.unwrap().delivered, 4);
    }

    /// Rolled back and forward again: a layout 3 file opened by a layout 2 relay gets
    /// that relay's tables and `layout: 2` beside its records; the next open keeps
    /// both sets of messages scheduled.
    #[tokio::test]
    async fn a_file_written_by_both_layouts_keeps_every_message() {
        let dir = tempfile::tempdir().unwrap();
        let new = message(b"layout 3\r\n");
        let old = message(b"layout 2\r\n");
        {
            let q = EmbeddedQueue::open(dir.path()).unwrap();
            q.enqueue(&new).await.unwrap();
            // Leased when the relay went away.
            assert_eq!(
                q.lease_due(now_ms(), 60_000, 10, "w").await.unwrap().len(),
                1
            );
        }
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let id = old.envelope.id.as_str();
                let env = serde_json::to_vec(&old.envelope).unwrap();
                let status = serde_json::to_vec(&MessageStatus::new(&old.envelope)).unwrap();
                txn.open_table(legacy::ENVELOPES)
                    .unwrap()
                    .insert(id, env.as_slice())
                    .unwrap();
                txn.open_table(BODIES)
                    .unwrap()
                    .insert(id, old.body.as_slice())
                    .unwrap();
                txn.open_table(legacy::STATUS)
                    .unwrap()
                    .insert(id, status.as_slice())
                    .unwrap();
                txn.open_table(legacy::DUE_AT)
                    .unwrap()
                    .insert(id, 1)
                    .unwrap();
                txn.open_table(DUE).unwrap().insert((1, id), ()).unwrap();
                let mut stats = txn.open_table(STATS).unwrap();
                let n = stats.get(STAT_MESSAGES).unwrap().unwrap().value();
                stats.insert(STAT_MESSAGES, n + 1).unwrap();
                let mut meta = txn.open_table(META).unwrap();
                meta.insert(META_LAYOUT, 2).unwrap();
            }
            txn.commit().unwrap();
        }
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        let stats = q.stats().await.unwrap();
        assert_eq!((stats.messages, stats.leased), (2, 0));
        let mut taken = q.lease_due(now_ms(), 60_000, 10, "w").await.unwrap();
        taken.sort_by(|a, b| a.lease.id.cmp(&b.lease.id));
        let mut want = [&new, &old];
        want.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        assert_eq!(taken.iter().map(|l| &l.message).collect::<Vec<_>>(), want);
    }

    /// Expired final records are purged by later writes, not only hidden.
    #[tokio::test]
    async fn expired_final_records_are_purged() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open_with(
            dir.path(),
            QueueOptions {
                status_retention: std::time::Duration::from_millis(1),
                ..QueueOptions::default()
            },
        )
        .unwrap();
        let msg = message(b"x\r\n");
        q.enqueue(&msg).await.unwrap();
        let leased = q.lease_due(now_ms(), 1000, 10, "w").await.unwrap();
        let mut status = leased[0].status.clone();
        status.rcpts[0].state = crate::queue::RcptState::Delivered;
        status.next_attempt_ms = None;
        q.finish(&leased[0].lease, status).await.unwrap();
        // A clock past the retention, rather than waiting for it: purging goes by
        // the time `lease_due` is given.
        q.lease_due(now_ms() + 5, 1000, 10, "w").await.unwrap();
        let txn = q.db.begin_read().unwrap();
        assert_eq!(txn.open_table(FINAL).unwrap().len().unwrap(), 0);
        assert_eq!(txn.open_table(FINAL_EXPIRY).unwrap().len().unwrap(), 0);
    }
}
