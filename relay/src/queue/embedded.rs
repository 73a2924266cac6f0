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
//! message on its own without waiting for company.
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
//! | `envelopes`    | id           | JSON of [`Envelope`], for every queued message     |
//! | `bodies`       | id           | message bytes                                      |
//! | `status`       | id           | JSON of [`MessageStatus`]                          |
//! | `due`          | (ms, id)     | the schedule: queued, not leased, by next attempt  |
//! | `due_at`       | id           | the `due` key's ms, to find it by id               |
//! | `leased`       | (ms, id)     | in flight, by lease expiry                         |
//! | `leased_until` | id           | the `leased` key's ms                              |
//! | `tokens`       | id           | token of the message's latest lease                |
//! | `final`        | id           | (expiry ms, JSON of envelope and final status)     |
//! | `final_expiry` | (ms, id)     | final records by expiry, for purging               |
//! | `stats`        | name         | `messages`, `bytes` (body bytes), `deferred`;      |
//! |                |              | `delivered`, `bounced`, `expired` (recipients of   |
//! |                |              | finished messages, never decremented)              |
//! | `meta`         | name         | `layout`: version of this layout                   |
//!
//! A queued message is in exactly one of `due` and `leased`. Counters live in `stats`
//! and change in the same transaction as the records they count, so [`Queue::stats`]
//! is a few lookups. Ids are time-ordered strings, so key order in `envelopes` is
//! arrival order. Tuple keys order by time first, so "what is due" and "what has
//! expired" are range scans from the start.
//!
//! Every write (enqueue, lease, finish, ...) goes through the writer thread, so group
//! commit covers them all and one transaction sees the effects of the ones before
//! it: two `lease_due` calls can never take the same message.
//!
//! Expired final records are purged a few at a time by `lease_due` and `finish`
//! (a relay that delivers also purges); reads ignore expired ones meanwhile.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    Table, TableDefinition, WriteTransaction,
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

const ENVELOPES: TableDefinition<&str, &[u8]> = TableDefinition::new("envelopes");
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
const STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("status");
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
const DUE_AT: TableDefinition<&str, u64> = TableDefinition::new("due_at");
const LEASED: TableDefinition<(u64, &str), ()> = TableDefinition::new("leased");
const LEASED_UNTIL: TableDefinition<&str, u64> = TableDefinition::new("leased_until");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const FINAL: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("final");
const FINAL_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("final_expiry");
const STATS: TableDefinition<&str, u64> = TableDefinition::new("stats");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const STAT_MESSAGES: &str = "messages";
const STAT_BYTES: &str = "bytes";
const STAT_DEFERRED: &str = "deferred";
const STAT_DELIVERED: &str = "delivered";
const STAT_BOUNCED: &str = "bounced";
const STAT_EXPIRED: &str = "expired";
const META_LAYOUT: &str = "layout";
/// Version 1 had only `envelopes`, `bodies` and `stats`; its messages get a schedule
/// and a status when first opened by this version.
const LAYOUT_VERSION: u64 = 2;

/// Requests waiting for the writer; beyond this, `enqueue` waits for room, which
/// pushes back on SMTP sessions instead of buffering bodies without bound.
const CHANNEL_CAPACITY: usize = 1024;
/// A batch stops growing here so that one commit (and the latency of every request
/// in it) stays bounded however much is waiting.
const MAX_BATCH_OPS: usize = 512;
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Expired leases returned to due per `lease_due`, so one call after a long outage
/// does not hold the writer for a whole queue's worth of work.
const SWEEP_LIMIT: usize = 1000;
/// Expired final records purged per `lease_due` or `finish`, for the same reason.
const PURGE_LIMIT: usize = 256;

type Reply = oneshot::Sender<Result<Outcome, QueueError>>;

/// What a write asks for. Encoding to JSON happens on the caller's side, so the
/// writer thread spends its time on the database.
enum Request {
    Enqueue {
        id: String,
        envelope: Vec<u8>,
        body: Vec<u8>,
        status: Vec<u8>,
        due_ms: u64,
        /// The `accepted` event (JSON) and the event log's cap, written in the same
        /// transaction.
        event: Option<(Vec<u8>, u64)>,
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
}

impl Request {
    fn size(&self) -> usize {
        match self {
            Request::Enqueue { envelope, body, .. } => envelope.len() + body.len(),
            _ => 0,
        }
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
            let mut t = Tables::open(&txn)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let layout = meta.get(META_LAYOUT).map_err(db_err)?.map(|v| v.value());
            let migrated = if layout.unwrap_or(1) < LAYOUT_VERSION {
                t.schedule_unscheduled()?
            } else {
                0
            };
            meta.insert(META_LAYOUT, LAYOUT_VERSION).map_err(db_err)?;
            (migrated, t.release_all(now_ms())?)
        };
        txn.commit().map_err(db_err)?;
        if migrated > 0 {
            tracing::info!(
                messages = migrated,
                "scheduled messages queued by an older version"
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
        let envelope = encode("envelope", &msg.envelope)?;
        let status = encode("status", &MessageStatus::new(&msg.envelope))?;
        let req = Request::Enqueue {
            id,
            envelope,
            body: msg.body.clone(),
            status,
            due_ms: msg.envelope.received_at_ms,
            event,
        };
        match self.submit(req).await? {
            Outcome::Flag(_) => Ok(()),
            other => Err(unexpected("enqueue", other)),
        }
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
        Box::pin(async move {
            let now_ms = now_ms();
            let retention_ms = millis(self.options.status_retention);
            let mut out: Vec<Option<Result<FinishResult, QueueError>>> = Vec::new();
            let mut ops = Vec::new();
            let mut answers = Vec::new();
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
                answers.push((out.len() - 1, answer));
            }
            if !ops.is_empty() {
                let tx = self.tx.as_ref().ok_or_else(writer_gone)?;
                tx.send(ops).await.map_err(|_| writer_gone())?;
            }
            for (i, answer) in answers {
                out[i] = Some(match answer.await.map_err(|_| writer_gone())? {
                    Ok(Outcome::Finished(result)) => Ok(result),
                    Ok(other) => Err(unexpected("finish", other)),
                    Err(e) => Err(e),
                });
            }
            Ok(out
                .into_iter()
                .map(|r| r.expect("every item answered"))
                .collect())
        })
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
                let envelopes = txn.open_table(ENVELOPES).map_err(db_err)?;
                let Some(env) = envelopes.get(key.as_str()).map_err(db_err)? else {
                    return Ok(None);
                };
                let envelope: Envelope = decode("envelope", &key, env.value())?;
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
            let envelopes = txn.open_table(ENVELOPES).map_err(db_err)?;
            let mut ids = Vec::new();
            for entry in envelopes.iter().map_err(db_err)?.take(limit) {
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
            let leased = txn.open_table(LEASED).map_err(db_err)?;
            let envelopes = txn.open_table(ENVELOPES).map_err(db_err)?;
            let oldest_ms = match envelopes.first().map_err(db_err)? {
                Some((key, _)) => Some(parse_id(key.value())?.timestamp_ms()),
                None => None,
            };
            Ok(QueueStats {
                messages: stat(&stats, STAT_MESSAGES)?,
                bytes: stat(&stats, STAT_BYTES)?,
                leased: leased.len().map_err(db_err)?,
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
                let r = ReadTables::open(txn)?;
                if let Some(found) = r.queued_status(&key)? {
                    return Ok(Some(found));
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
            let r = ReadTables::open(txn)?;
            let mut out = Vec::new();
            if filter.limit == 0 {
                return Ok(out);
            }
            for entry in r.envelopes.iter().map_err(db_err)? {
                let (key, _) = entry.map_err(db_err)?;
                let Some((envelope, status)) = r.queued_status(key.value())? else {
                    continue;
                };
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

/// The tables a read of queued statuses needs.
struct ReadTables {
    envelopes: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    status: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    due_at: redb::ReadOnlyTable<&'static str, u64>,
    leased_until: redb::ReadOnlyTable<&'static str, u64>,
}

impl ReadTables {
    fn open(txn: &ReadTransaction) -> Result<Self, QueueError> {
        Ok(ReadTables {
            envelopes: txn.open_table(ENVELOPES).map_err(db_err)?,
            status: txn.open_table(STATUS).map_err(db_err)?,
            due_at: txn.open_table(DUE_AT).map_err(db_err)?,
            leased_until: txn.open_table(LEASED_UNTIL).map_err(db_err)?,
        })
    }

    /// Envelope and status of a queued message, the schedule filled in.
    fn queued_status(&self, id: &str) -> Result<Option<(Envelope, MessageStatus)>, QueueError> {
        let Some(env) = self.envelopes.get(id).map_err(db_err)? else {
            return Ok(None);
        };
        let envelope: Envelope = decode("envelope", id, env.value())?;
        let mut status = match self.status.get(id).map_err(db_err)? {
            Some(s) => decode("status", id, s.value())?,
            None => MessageStatus::new(&envelope),
        };
        if let Some(due) = self.due_at.get(id).map_err(db_err)? {
            status.next_attempt_ms = Some(due.value());
        }
        status.leased_until_ms = self
            .leased_until
            .get(id)
            .map_err(db_err)?
            .map(|v| v.value());
        Ok(Some((envelope, status)))
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
        process_batch(db, batch, state);
    }
    tracing::debug!("embedded queue writer stopped");
}

enum BatchError {
    /// A request could not be applied; nothing was committed.
    Apply(QueueError),
    /// Starting or committing the transaction failed.
    Commit(redb::Error),
}

fn process_batch(db: &Database, batch: Vec<WriteOp>, state: &WriterState) {
    match commit_batch(db, &batch) {
        Ok(outcomes) => {
            state.commits.fetch_add(1, Ordering::Relaxed);
            for (op, outcome) in batch.into_iter().zip(outcomes) {
                if op.reply.send(Ok(outcome)).is_err() {
                    // The caller timed out or went away, but the write is durable: a
                    // client that was told to retry may now send the message again; a
                    // lease nobody receives expires and the message comes back.
                    tracing::warn!("queue write committed after its caller stopped waiting");
                }
            }
        }
        Err(BatchError::Apply(e)) if batch.len() > 1 => {
            tracing::warn!(error = %e, ops = batch.len(), "queue batch failed to apply; retrying one by one");
            for op in batch {
                process_batch(db, vec![op], state);
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
fn commit_batch(db: &Database, batch: &[WriteOp]) -> Result<Vec<Outcome>, BatchError> {
    let mut txn = db.begin_write().map_err(|e| BatchError::Commit(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| BatchError::Commit(e.into()))?;
    let outcomes = match apply(&txn, batch) {
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

fn apply(txn: &WriteTransaction, batch: &[WriteOp]) -> Result<Vec<Outcome>, QueueError> {
    let mut t = Tables::open(txn)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for op in batch {
        outcomes.push(t.apply(&op.req)?);
    }
    t.save_counters()?;
    Ok(outcomes)
}

/// Every table, open in one write transaction, and the counters as they stand in it.
struct Tables<'t> {
    txn: &'t WriteTransaction,
    envelopes: Table<'t, &'static str, &'static [u8]>,
    bodies: Table<'t, &'static str, &'static [u8]>,
    status: Table<'t, &'static str, &'static [u8]>,
    due: Table<'t, (u64, &'static str), ()>,
    due_at: Table<'t, &'static str, u64>,
    leased: Table<'t, (u64, &'static str), ()>,
    leased_until: Table<'t, &'static str, u64>,
    tokens: Table<'t, &'static str, &'static str>,
    finals: Table<'t, &'static str, (u64, &'static [u8])>,
    final_expiry: Table<'t, (u64, &'static str), ()>,
    stats: Table<'t, &'static str, u64>,
    messages: u64,
    bytes: u64,
    deferred: u64,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, QueueError> {
        let stats = txn.open_table(STATS).map_err(db_err)?;
        let messages = stat(&stats, STAT_MESSAGES)?;
        let bytes = stat(&stats, STAT_BYTES)?;
        let deferred = stat(&stats, STAT_DEFERRED)?;
        Ok(Tables {
            txn,
            envelopes: txn.open_table(ENVELOPES).map_err(db_err)?,
            bodies: txn.open_table(BODIES).map_err(db_err)?,
            status: txn.open_table(STATUS).map_err(db_err)?,
            due: txn.open_table(DUE).map_err(db_err)?,
            due_at: txn.open_table(DUE_AT).map_err(db_err)?,
            leased: txn.open_table(LEASED).map_err(db_err)?,
            leased_until: txn.open_table(LEASED_UNTIL).map_err(db_err)?,
            tokens: txn.open_table(TOKENS).map_err(db_err)?,
            finals: txn.open_table(FINAL).map_err(db_err)?,
            final_expiry: txn.open_table(FINAL_EXPIRY).map_err(db_err)?,
            stats,
            messages,
            bytes,
            deferred,
        })
    }

    fn save_counters(&mut self) -> Result<(), QueueError> {
        self.stats
            .insert(STAT_MESSAGES, self.messages)
            .map_err(db_err)?;
        self.stats.insert(STAT_BYTES, self.bytes).map_err(db_err)?;
        self.stats
            .insert(STAT_DEFERRED, self.deferred)
            .map_err(db_err)?;
        Ok(())
    }

    fn apply(&mut self, req: &Request) -> Result<Outcome, QueueError> {
        Ok(match req {
            Request::Enqueue {
                id,
                envelope,
                body,
                status,
                due_ms,
                event,
            } => {
                let replaced = self.enqueue(id, envelope, body, status, *due_ms)?;
                if let Some((json, max_len)) = event {
                    crate::events::log::append_in(self.txn, &[json.as_slice()], *max_len)
                        .map_err(db_err)?;
                }
                Outcome::Flag(replaced)
            }
            Request::Remove { id } => Outcome::Flag(self.remove(id)?),
            Request::LeaseDue {
                now_ms,
                expires_ms,
                max,
                token,
            } => Outcome::Leased(self.lease_due(*now_ms, *expires_ms, *max, token)?),
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
        })
    }

    fn enqueue(
        &mut self,
        id: &str,
        envelope: &[u8],
        body: &[u8],
        status: &[u8],
        due_ms: u64,
    ) -> Result<bool, QueueError> {
        // Enqueueing an id again replaces it (fresh status, due again) without
        // counting it twice, so a caller may retry a write whose outcome it did not
        // learn.
        let existed = self
            .envelopes
            .insert(id, envelope)
            .map_err(db_err)?
            .is_some();
        let old_len = self
            .bodies
            .insert(id, body)
            .map_err(db_err)?
            .map_or(0, |old| old.value().len() as u64);
        let old_attempts = self.take_status(id)?;
        self.status.insert(id, status).map_err(db_err)?;
        self.unschedule(id)?;
        self.tokens.remove(id).map_err(db_err)?;
        self.drop_final(id)?;
        self.schedule_due(id, due_ms)?;
        if !existed {
            self.messages += 1;
        }
        if old_attempts > 0 {
            self.deferred = self.deferred.saturating_sub(1);
        }
        self.bytes = self.bytes.saturating_sub(old_len) + body.len() as u64;
        Ok(existed)
    }

    fn remove(&mut self, id: &str) -> Result<bool, QueueError> {
        let existed = self.envelopes.remove(id).map_err(db_err)?.is_some();
        let old_len = self
            .bodies
            .remove(id)
            .map_err(db_err)?
            .map_or(0, |old| old.value().len() as u64);
        let old_attempts = self.take_status(id)?;
        self.unschedule(id)?;
        self.tokens.remove(id).map_err(db_err)?;
        self.drop_final(id)?;
        if existed {
            self.messages = self.messages.saturating_sub(1);
            if old_attempts > 0 {
                self.deferred = self.deferred.saturating_sub(1);
            }
        }
        self.bytes = self.bytes.saturating_sub(old_len);
        Ok(existed)
    }

    fn lease_due(
        &mut self,
        now_ms: u64,
        expires_ms: u64,
        max: usize,
        token: &str,
    ) -> Result<Vec<Leased>, QueueError> {
        self.purge_finals(now_ms)?;
        // Expired leases first, so a dead worker's messages are among those taken.
        // They go back at their expiry time, ahead of messages that became due later.
        let expired = collect_keys(&self.leased, now_ms, SWEEP_LIMIT)?;
        for (at, id) in &expired {
            self.leased.remove((*at, id.as_str())).map_err(db_err)?;
            self.leased_until.remove(id.as_str()).map_err(db_err)?;
            self.schedule_due(id, *at)?;
        }
        let due = collect_keys(&self.due, now_ms, max)?;
        let mut out = Vec::with_capacity(due.len());
        for (at, id) in due {
            self.due.remove((at, id.as_str())).map_err(db_err)?;
            self.due_at.remove(id.as_str()).map_err(db_err)?;
            let Some(envelope) = self.envelopes.get(id.as_str()).map_err(db_err)? else {
                tracing::warn!(
                    id,
                    "dropping a schedule entry of a message that is not queued"
                );
                continue;
            };
            let envelope: Envelope = decode("envelope", &id, envelope.value())?;
            let body = self
                .bodies
                .get(id.as_str())
                .map_err(db_err)?
                .ok_or_else(|| QueueError::Corrupt(format!("message {id} has no body")))?
                .value()
                .to_vec();
            let mut status = match self.status.get(id.as_str()).map_err(db_err)? {
                Some(s) => decode("status", &id, s.value())?,
                None => MessageStatus::new(&envelope),
            };
            status.next_attempt_ms = Some(at);
            status.leased_until_ms = Some(expires_ms);
            self.leased
                .insert((expires_ms, id.as_str()), ())
                .map_err(db_err)?;
            self.leased_until
                .insert(id.as_str(), expires_ms)
                .map_err(db_err)?;
            self.tokens.insert(id.as_str(), token).map_err(db_err)?;
            out.push(Leased {
                lease: Lease {
                    id: envelope.id.clone(),
                    token: token.to_owned(),
                    expires_ms,
                },
                message: QueuedMessage { envelope, body },
                status,
            });
        }
        Ok(out)
    }

    /// Whether `token` is the latest lease of a queued message.
    fn holds(&self, id: &str, token: &str) -> Result<bool, QueueError> {
        let current = self.tokens.get(id).map_err(db_err)?;
        Ok(current.is_some_and(|t| t.value() == token)
            && self.envelopes.get(id).map_err(db_err)?.is_some())
    }

    fn finish(
        &mut self,
        id: &str,
        token: &str,
        status: &MessageStatus,
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<FinishResult, QueueError> {
        if !self.holds(id, token)? {
            return Ok(FinishResult::LeaseLost);
        }
        let old_attempts = self.take_status(id)?;
        self.unschedule(id)?;
        self.tokens.remove(id).map_err(db_err)?;
        let result = match status.next_attempt_ms {
            Some(next) => {
                self.status
                    .insert(id, encode("status", status)?.as_slice())
                    .map_err(db_err)?;
                self.schedule_due(id, next)?;
                match (old_attempts > 0, status.attempts > 0) {
                    (false, true) => self.deferred += 1,
                    (true, false) => self.deferred = self.deferred.saturating_sub(1),
                    _ => {}
                }
                FinishResult::Rescheduled
            }
            None => {
                let envelope = self
                    .envelopes
                    .remove(id)
                    .map_err(db_err)?
                    .ok_or_else(|| QueueError::Corrupt(format!("message {id} vanished")))?;
                let envelope: Envelope = decode("envelope", id, envelope.value())?;
                let len = self
                    .bodies
                    .remove(id)
                    .map_err(db_err)?
                    .map_or(0, |b| b.value().len() as u64);
                self.messages = self.messages.saturating_sub(1);
                self.bytes = self.bytes.saturating_sub(len);
                if old_attempts > 0 {
                    self.deferred = self.deferred.saturating_sub(1);
                }
                let totals = DeliveryTotals::of(status);
                for (name, n) in [
                    (STAT_DELIVERED, totals.delivered),
                    (STAT_BOUNCED, totals.bounced),
                    (STAT_EXPIRED, totals.expired),
                ] {
                    if n > 0 {
                        let v = stat(&self.stats, name)?.saturating_add(n);
                        self.stats.insert(name, v).map_err(db_err)?;
                    }
                }
                let expires_ms = now_ms.saturating_add(retention_ms);
                let record = encode(
                    "final record",
                    &FinalRecord {
                        envelope,
                        status: status.clone(),
                    },
                )?;
                self.finals
                    .insert(id, (expires_ms, record.as_slice()))
                    .map_err(db_err)?;
                self.final_expiry
                    .insert((expires_ms, id), ())
                    .map_err(db_err)?;
                FinishResult::Finalized
            }
        };
        self.purge_finals(now_ms)?;
        Ok(result)
    }

    fn renew(&mut self, id: &str, token: &str, expires_ms: u64) -> Result<bool, QueueError> {
        if !self.holds(id, token)? {
            return Ok(false);
        }
        // Also reclaims a lease that expired and was swept back to due but not taken
        // by anyone: the token says nobody else has tried since.
        self.unschedule(id)?;
        self.leased.insert((expires_ms, id), ()).map_err(db_err)?;
        self.leased_until.insert(id, expires_ms).map_err(db_err)?;
        Ok(true)
    }

    fn release(&mut self, id: &str, token: &str, due_ms: u64) -> Result<(), QueueError> {
        if !self.holds(id, token)? {
            return Ok(());
        }
        let until = self
            .leased_until
            .remove(id)
            .map_err(db_err)?
            .map(|v| v.value());
        // Not leased means swept back to due after expiry: already due, leave it.
        if let Some(until) = until {
            self.leased.remove((until, id)).map_err(db_err)?;
            self.schedule_due(id, due_ms)?;
        }
        self.tokens.remove(id).map_err(db_err)?;
        Ok(())
    }

    fn retry_now(&mut self, sel: &RetrySelector, now_ms: u64) -> Result<u64, QueueError> {
        let candidates: Vec<String> = match sel {
            RetrySelector::Id(id) => match self.due_at.get(id.as_str()).map_err(db_err)? {
                Some(at) if at.value() > now_ms => vec![id.as_str().to_owned()],
                _ => Vec::new(),
            },
            RetrySelector::All | RetrySelector::Domain(_) => {
                let mut ids = Vec::new();
                for entry in self
                    .due
                    .range::<(u64, &str)>((now_ms.saturating_add(1), "")..)
                    .map_err(db_err)?
                {
                    let (key, _) = entry.map_err(db_err)?;
                    let id = key.value().1.to_owned();
                    if let RetrySelector::Domain(domain) = sel {
                        let Some(status) = self.status.get(id.as_str()).map_err(db_err)? else {
                            continue;
                        };
                        let status: MessageStatus = decode("status", &id, status.value())?;
                        if !status.has_pending_in(domain) {
                            continue;
                        }
                    }
                    ids.push(id);
                }
                ids
            }
        };
        for id in &candidates {
            self.unschedule(id)?;
            self.schedule_due(id, now_ms)?;
        }
        Ok(candidates.len() as u64)
    }

    /// Removes a message's schedule entry, due or leased.
    fn unschedule(&mut self, id: &str) -> Result<(), QueueError> {
        if let Some(at) = self.due_at.remove(id).map_err(db_err)? {
            let at = at.value();
            self.due.remove((at, id)).map_err(db_err)?;
        }
        if let Some(until) = self.leased_until.remove(id).map_err(db_err)? {
            let until = until.value();
            self.leased.remove((until, id)).map_err(db_err)?;
        }
        Ok(())
    }

    fn schedule_due(&mut self, id: &str, at: u64) -> Result<(), QueueError> {
        self.due.insert((at, id), ()).map_err(db_err)?;
        self.due_at.insert(id, at).map_err(db_err)?;
        Ok(())
    }

    /// Removes a stored status; returns its attempt count (0 without one).
    fn take_status(&mut self, id: &str) -> Result<u32, QueueError> {
        let Some(old) = self.status.remove(id).map_err(db_err)? else {
            return Ok(0);
        };
        let old: StoredAttempts = decode("status", id, old.value())?;
        Ok(old.attempts)
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
        let mut leased = Vec::new();
        for entry in self.leased.iter().map_err(db_err)? {
            let (key, _) = entry.map_err(db_err)?;
            let (until, id) = key.value();
            leased.push((until, id.to_owned()));
        }
        for (until, id) in &leased {
            self.leased.remove((*until, id.as_str())).map_err(db_err)?;
            self.leased_until.remove(id.as_str()).map_err(db_err)?;
            self.tokens.remove(id.as_str()).map_err(db_err)?;
            self.schedule_due(id, now_ms)?;
        }
        Ok(leased.len() as u64)
    }

    /// Layout 1 queued messages without a schedule or status; give them both, due
    /// at arrival. Returns how many it scheduled.
    fn schedule_unscheduled(&mut self) -> Result<u64, QueueError> {
        let mut found = Vec::new();
        for entry in self.envelopes.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let id = key.value();
            if self.due_at.get(id).map_err(db_err)?.is_none()
                && self.leased_until.get(id).map_err(db_err)?.is_none()
            {
                let envelope: Envelope = decode("envelope", id, value.value())?;
                found.push(envelope);
            }
        }
        for envelope in &found {
            let id = envelope.id.as_str();
            if self.status.get(id).map_err(db_err)?.is_none() {
                self.status
                    .insert(
                        id,
                        encode("status", &MessageStatus::new(envelope))?.as_slice(),
                    )
                    .map_err(db_err)?;
            }
            self.schedule_due(id, envelope.received_at_ms)?;
        }
        Ok(found.len() as u64)
    }
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
                    envelope: serde_json::to_vec(&msg.envelope).unwrap(),
                    status: serde_json::to_vec(&MessageStatus::new(&msg.envelope)).unwrap(),
                    due_ms: msg.envelope.received_at_ms,
                    body: msg.body,
                    event: None,
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
                txn.open_table(ENVELOPES)
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
