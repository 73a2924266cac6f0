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
//! Three tables: `envelopes` (id -> JSON of [`Envelope`]), `bodies` (id -> bytes) and
//! `stats` (`messages`, `bytes` -> u64), the last updated in the same transaction as the
//! first two so that [`Queue::stats`] is one lookup. `bytes` counts body bytes only,
//! the part that grows with traffic. Ids are time-ordered strings, so key order in
//! `envelopes` is arrival order.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use super::{Envelope, Queue, QueueError, QueueFuture, QueueId, QueueStats, QueuedMessage};

/// File name of the database inside the queue directory.
pub const DB_FILE: &str = "queue.redb";

const ENVELOPES: TableDefinition<&str, &[u8]> = TableDefinition::new("envelopes");
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
const STATS: TableDefinition<&str, u64> = TableDefinition::new("stats");
const STAT_MESSAGES: &str = "messages";
const STAT_BYTES: &str = "bytes";

/// Requests waiting for the writer; beyond this, `enqueue` waits for room, which
/// pushes back on SMTP sessions instead of buffering bodies without bound.
const CHANNEL_CAPACITY: usize = 1024;
/// A batch stops growing here so that one commit (and the latency of every request
/// in it) stays bounded however much is waiting.
const MAX_BATCH_OPS: usize = 512;
const MAX_BATCH_BYTES: usize = 64 << 20;

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum WriteOp {
    Enqueue {
        id: String,
        envelope: Vec<u8>,
        body: Vec<u8>,
        reply: Reply<()>,
    },
    Remove {
        id: String,
        reply: Reply<bool>,
    },
}

impl WriteOp {
    fn size(&self) -> usize {
        match self {
            WriteOp::Enqueue { envelope, body, .. } => envelope.len() + body.len(),
            WriteOp::Remove { .. } => 0,
        }
    }

    fn id(&self) -> &str {
        match self {
            WriteOp::Enqueue { id, .. } | WriteOp::Remove { id, .. } => id,
        }
    }

    fn fail(self, message: &str) {
        // A closed reply channel means the caller stopped waiting; nothing to tell.
        match self {
            WriteOp::Enqueue { reply, .. } => {
                let _ = reply.send(Err(QueueError::Unavailable(message.to_owned())));
            }
            WriteOp::Remove { reply, .. } => {
                let _ = reply.send(Err(QueueError::Unavailable(message.to_owned())));
            }
        }
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
    tx: Option<mpsc::Sender<WriteOp>>,
    writer: Option<JoinHandle<()>>,
    state: Arc<WriterState>,
}

impl std::fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedQueue")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedQueue {
    /// Opens (or creates) the queue in `dir`, creating the directory if needed; the
    /// database file is `dir/queue.redb`. Only one process may have it open.
    pub fn open(dir: &Path) -> Result<Self, QueueError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DB_FILE);
        let db = Database::create(&path).map_err(db_err)?;
        // Creating the tables up front lets readers assume they exist.
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(ENVELOPES).map_err(db_err)?;
            txn.open_table(BODIES).map_err(db_err)?;
            txn.open_table(STATS).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;

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
            tx: Some(tx),
            writer: Some(writer),
            state,
        })
    }

    /// Number of write transactions committed since open; with group commit this is
    /// at most the number of writes, usually fewer under load.
    pub fn commits(&self) -> u64 {
        self.state.commits.load(Ordering::Relaxed)
    }

    async fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> WriteOp) -> Result<T, QueueError> {
        let (reply, answer) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or_else(writer_gone)?;
        tx.send(make(reply)).await.map_err(|_| writer_gone())?;
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

impl Queue for EmbeddedQueue {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn enqueue<'a>(&'a self, msg: &'a QueuedMessage) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let id = valid_id(&msg.envelope.id)?.to_owned();
            let envelope = serde_json::to_vec(&msg.envelope)
                .map_err(|e| QueueError::Corrupt(format!("cannot encode envelope: {e}")))?;
            let body = msg.body.clone();
            self.submit(|reply| WriteOp::Enqueue {
                id,
                envelope,
                body,
                reply,
            })
            .await
        })
    }

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
                let envelope: Envelope = serde_json::from_slice(env.value())
                    .map_err(|e| QueueError::Corrupt(format!("envelope of {key}: {e}")))?;
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
                let key = key.value();
                ids.push(
                    QueueId::parse(key)
                        .ok_or_else(|| QueueError::Corrupt(format!("invalid queue id {key:?}")))?,
                );
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
            self.submit(|reply| WriteOp::Remove { id, reply }).await
        })
    }

    fn stats(&self) -> QueueFuture<'_, QueueStats> {
        Box::pin(self.read(|txn| {
            let stats = txn.open_table(STATS).map_err(db_err)?;
            Ok(QueueStats {
                messages: stat(&stats, STAT_MESSAGES)?,
                bytes: stat(&stats, STAT_BYTES)?,
            })
        }))
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
        redb::Error::Io(e) => QueueError::Io(e),
        other => QueueError::Unavailable(format!("embedded queue: {other}")),
    }
}

fn writer_loop(db: &Database, mut rx: mpsc::Receiver<WriteOp>, state: &WriterState) {
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(op) => {
                    bytes += op.size();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        process_batch(db, batch, state);
    }
    tracing::debug!("embedded queue writer stopped");
}

enum BatchError {
    /// A request could not be applied; nothing was committed.
    Apply(redb::Error),
    /// Starting or committing the transaction failed.
    Commit(redb::Error),
}

fn process_batch(db: &Database, batch: Vec<WriteOp>, state: &WriterState) {
    match commit_batch(db, &batch) {
        Ok(results) => {
            state.commits.fetch_add(1, Ordering::Relaxed);
            for (op, existed) in batch.into_iter().zip(results) {
                let delivered = match op {
                    WriteOp::Enqueue { reply, .. } => reply.send(Ok(())).is_ok(),
                    WriteOp::Remove { reply, .. } => reply.send(Ok(existed)).is_ok(),
                };
                if !delivered {
                    // The caller timed out or went away, but the write is durable: a
                    // client that was told to retry may now send the message again.
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
            tracing::error!(error = %e, id = op.id(), "queue write failed");
            op.fail(&format!("embedded queue: {e}"));
        }
        Err(BatchError::Commit(e)) => {
            let message = format!("embedded queue commit failed: {e}");
            tracing::error!(error = %e, ops = batch.len(), "queue commit failed");
            *state.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
            for op in batch {
                op.fail(&message);
            }
        }
    }
}

/// Applies and commits a batch; returns, per request, whether its id existed before.
fn commit_batch(db: &Database, batch: &[WriteOp]) -> Result<Vec<bool>, BatchError> {
    let mut txn = db.begin_write().map_err(|e| BatchError::Commit(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| BatchError::Commit(e.into()))?;
    let results = match apply(&txn, batch) {
        Ok(results) => results,
        Err(e) => {
            if let Err(abort) = txn.abort() {
                tracing::warn!(error = %abort, "aborting a failed queue transaction failed");
            }
            return Err(BatchError::Apply(e));
        }
    };
    txn.commit().map_err(|e| BatchError::Commit(e.into()))?;
    Ok(results)
}

fn apply(txn: &WriteTransaction, batch: &[WriteOp]) -> Result<Vec<bool>, redb::Error> {
    let mut envelopes = txn.open_table(ENVELOPES)?;
    let mut bodies = txn.open_table(BODIES)?;
    let mut stats = txn.open_table(STATS)?;
    let mut messages = stats.get(STAT_MESSAGES)?.map(|v| v.value()).unwrap_or(0);
    let mut bytes = stats.get(STAT_BYTES)?.map(|v| v.value()).unwrap_or(0);
    let mut results = Vec::with_capacity(batch.len());
    for op in batch {
        match op {
            WriteOp::Enqueue {
                id, envelope, body, ..
            } => {
                // Enqueueing an id again replaces it without counting it twice, so a
                // caller may retry a write whose outcome it did not learn.
                let existed = envelopes
                    .insert(id.as_str(), envelope.as_slice())?
                    .is_some();
                let old_len = bodies
                    .insert(id.as_str(), body.as_slice())?
                    .map_or(0, |old| old.value().len() as u64);
                if !existed {
                    messages += 1;
                }
                bytes = bytes.saturating_sub(old_len) + body.len() as u64;
                results.push(existed);
            }
            WriteOp::Remove { id, .. } => {
                let existed = envelopes.remove(id.as_str())?.is_some();
                let old_len = bodies
                    .remove(id.as_str())?
                    .map_or(0, |old| old.value().len() as u64);
                if existed {
                    messages = messages.saturating_sub(1);
                }
                bytes = bytes.saturating_sub(old_len);
                results.push(existed);
            }
        }
    }
    stats.insert(STAT_MESSAGES, messages)?;
    stats.insert(STAT_BYTES, bytes)?;
    Ok(results)
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
            tx.try_send(WriteOp::Enqueue {
                id: msg.envelope.id.as_str().to_owned(),
                envelope: serde_json::to_vec(&msg.envelope).unwrap(),
                body: msg.body,
                reply,
            })
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
}
