//! Group commit of the Redis queue's enqueues: messages of concurrent SMTP
//! sessions that arrive while an enqueue call is in flight go together in the
//! next call, one `EVALSHA` of a script that loops over them.
//!
//! Why: Redis spends 28–39 µs on an `EVALSHA` whose commands take 5–10 µs
//! (bench/redis-cost.sh), so the cost of an enqueue is the script call, not what
//! it writes. Grouping divides that by the group's size.
//!
//! How: each [`Lane`] has one task and at most one call in flight. The first
//! message goes at once; the next call takes everything that queued up meanwhile
//! (at most [`MAX_GROUP`] messages, [`MAX_GROUP_BYTES`] of values), so an idle
//! relay adds no latency and a busy one makes fewer, larger calls. Standalone
//! Redis and Sentinel have one lane for every shard (all shards' keys live on one
//! node, and the call declares each in KEYS); a cluster has one lane per shard
//! (one hash tag, one slot per call). With `wait_replicas > 0` one `WAIT` after
//! the call, in the same pipeline, covers the whole group.
//!
//! Each caller's answer comes only from the call that holds its message (and its
//! `WAIT`): a failed call answers every message in it with that error; a message
//! that fails alone inside the script (the script catches it: OOM before anything
//! was written, a key of the wrong type) gets its own error and the others are
//! stored. A caller that gave up before its message was sent (its SMTP client was
//! told to retry) is left out of the call, so the message is not stored behind a
//! `451`.

use redis::{ErrorKind, Pipeline, RedisError, Script, ServerErrorKind, Value};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

use super::{Conn, OP_DEADLINE, RETRY_DELAY, ShardKeys, is_out_of_memory};
use crate::queue::QueueError;
use crate::redis_conn::script::{Call, Layout};
use crate::redis_conn::{is_connection_error, redact};

/// Messages per call at most. A call blocks Redis while it runs (a few µs per
/// message), and the script's result is one Lua table: both stay small.
pub(super) const MAX_GROUP: usize = 128;
/// Stored bytes per call at most (at least one message always goes): large
/// bodies make small groups, so one call never holds Redis for long.
pub(super) const MAX_GROUP_BYTES: usize = 4 << 20;

/// KEYS/ARGV of `enqueue_group_main.lua` (with `enqueue.lua`).
pub(super) const ENQUEUE_GROUP: Layout = Layout {
    keys: &[
        "due, stats, leased, lease, later..",
        "message, status..",
        "stream..",
    ],
    args: &["shard count", "count", "max len", "per message.."],
};
/// KEYS/ARGV of `guarded_group_main.lua` (with a guard and `enqueue.lua`).
pub(super) const GUARDED_GROUP: Layout = Layout {
    keys: &[
        "due, stats, leased, lease, later..",
        "message, status, guard keys..",
        "guard index",
    ],
    args: &["clock", "shard count", "count", "per message.."],
};

/// A guard's part of one message: its keys but the last (the key index, the
/// same for every message of a lane), the last, and its arguments (the first is
/// its clock).
pub(super) struct GuardPart {
    pub keys: Vec<String>,
    pub index: String,
    pub args: Vec<Vec<u8>>,
}

/// One message waiting for its lane's next call.
pub(super) struct Item {
    pub shard: u16,
    pub id: String,
    /// `<envelope len>:<body len>:`, the envelope, the body.
    pub stored: Vec<u8>,
    pub body_len: usize,
    pub due: u64,
    /// The `accepted` event's JSON and the stream's `MAXLEN ~` cap (standalone
    /// and Sentinel only).
    pub event: Option<(Vec<u8>, u64)>,
    pub guard: Option<GuardPart>,
    pub reply: oneshot::Sender<Result<Outcome, QueueError>>,
}

impl Item {
    fn size(&self) -> usize {
        self.stored.len() + self.event.as_ref().map_or(0, |(e, _)| e.len())
    }
}

/// What happened to one message of a call.
#[derive(Debug)]
pub(super) struct Outcome {
    /// Stored (a guard may refuse it).
    pub stored: bool,
    /// The guard's reply (empty without a guard).
    pub guard_reply: Vec<u8>,
}

/// What a lane's task needs of the queue.
#[derive(Clone)]
pub(super) struct Runner {
    pub conn: Conn,
    pub secrets: Arc<[String]>,
    pub wait_replicas: u32,
    pub wait_timeout_ms: u64,
    pub shard_keys: Arc<[ShardKeys]>,
    /// The events stream (only used on standalone Redis and Sentinel).
    pub stream: String,
}

/// The script a lane runs.
#[derive(Clone)]
pub(super) enum Kind {
    /// Plain enqueues, some with their event ([`ENQUEUE_GROUP`]).
    Plain(Script),
    /// Guarded enqueues ([`GUARDED_GROUP`]).
    Guarded(Script),
}

impl Kind {
    fn script(&self) -> &Script {
        match self {
            Kind::Plain(s) | Kind::Guarded(s) => s,
        }
    }
}

/// A sequence of group calls, with its task started on first use (and again
/// if the runtime that ran it is gone: a queue used from a second runtime).
pub(super) struct Lane {
    tx: Mutex<Option<mpsc::UnboundedSender<Item>>>,
    runner: Runner,
    kind: Kind,
}

impl Lane {
    pub fn new(runner: Runner, kind: Kind) -> Self {
        Lane {
            tx: Mutex::new(None),
            runner,
            kind,
        }
    }

    /// The sender to the lane's task, started here if it is not running.
    fn sender(&self) -> mpsc::UnboundedSender<Item> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match &*tx {
            Some(t) if !t.is_closed() => t.clone(),
            _ => {
                let (t, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(self.runner.clone(), self.kind.clone(), rx));
                *tx = Some(t.clone());
                t
            }
        }
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// Queues `item` for the next call and waits for its answer.
    pub async fn submit(
        &self,
        item: impl FnOnce(oneshot::Sender<Result<Outcome, QueueError>>) -> Item,
    ) -> Result<Outcome, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.sender().send(item(reply)).map_err(|_| {
            QueueError::Unavailable("redis enqueue: the group writer stopped".into())
        })?;
        answer.await.map_err(|_| {
            QueueError::Unavailable("redis enqueue: the group writer dropped the message".into())
        })?
    }
}

/// A lane's task: one call at a time, each with what queued up meanwhile. Ends
/// when the queue (every sender) is dropped.
async fn run(runner: Runner, kind: Kind, mut rx: mpsc::UnboundedReceiver<Item>) {
    let mut carry: Option<Item> = None;
    loop {
        let first = match carry.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        let mut bytes = first.size();
        let index = first.guard.as_ref().map(|g| g.index.clone());
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            let Ok(item) = rx.try_recv() else { break };
            // A guard's key index is the script's last key, one per call.
            let other_index = item.guard.as_ref().map(|g| &g.index) != index.as_ref();
            if bytes + item.size() > MAX_GROUP_BYTES || other_index {
                carry = Some(item);
                break;
            }
            bytes += item.size();
            group.push(item);
        }
        // Callers that gave up (timed out and answered their client) are left out.
        group.retain(|i| !i.reply.is_closed());
        if !group.is_empty() {
            runner.call(&kind, group).await;
        }
    }
}

impl Runner {
    fn error(&self, e: &RedisError) -> QueueError {
        let text = redact(&self.secrets, &format!("redis enqueue: {e}"));
        if is_out_of_memory(e) {
            QueueError::Full(text)
        } else {
            QueueError::Unavailable(text)
        }
    }

    /// One message's own failure, as the script reported it.
    fn item_error(&self, text: &[u8]) -> QueueError {
        let text = String::from_utf8_lossy(text);
        let msg = redact(&self.secrets, &format!("redis enqueue: {text}"));
        if text.starts_with("OOM") {
            QueueError::Full(msg)
        } else {
            QueueError::Unavailable(msg)
        }
    }

    /// The pipeline of one group call: `EVALSHA` and, with `wait_replicas > 0`,
    /// `WAIT`.
    fn pipeline(&self, kind: &Kind, group: &[Item]) -> Pipeline {
        // The group's shards in order of first appearance, and each message's
        // shard's place among them (1-based).
        let mut shards: Vec<u16> = Vec::new();
        let places: Vec<usize> = group
            .iter()
            .map(|i| match shards.iter().position(|&s| s == i.shard) {
                Some(p) => p + 1,
                None => {
                    shards.push(i.shard);
                    shards.len()
                }
            })
            .collect();
        let guarded = matches!(kind, Kind::Guarded(_));
        let has_event = !guarded && group.iter().any(|i| i.event.is_some());
        let guard_keys: usize = group
            .iter()
            .filter_map(|i| i.guard.as_ref())
            .map(|g| g.keys.len())
            .sum();
        let numkeys = 5 * shards.len()
            + 2 * group.len()
            + guard_keys
            + usize::from(has_event)
            + usize::from(guarded);
        let mut pipe = redis::pipe();
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(kind.script().get_hash())
            .arg(numkeys);
        let layout = if guarded {
            &GUARDED_GROUP
        } else {
            &ENQUEUE_GROUP
        };
        let mut call = Call::onto(cmd, layout);
        for &s in &shards {
            let k = &self.shard_keys[usize::from(s)];
            for key in [&k.due, &k.stats, &k.leased, &k.lease, &k.later] {
                call.key("due, stats, leased, lease, later..", key);
            }
        }
        let item_keys = if guarded {
            "message, status, guard keys.."
        } else {
            "message, status.."
        };
        for item in group {
            let k = &self.shard_keys[usize::from(item.shard)];
            call.key(item_keys, k.message(&item.id))
                .key(item_keys, k.status(&item.id));
            if let Some(g) = &item.guard {
                for key in &g.keys {
                    call.key(item_keys, key);
                }
            }
        }
        if guarded {
            let index = group[0].guard.as_ref().map_or("", |g| g.index.as_str());
            call.key("guard index", index);
            let clock = group[0]
                .guard
                .as_ref()
                .and_then(|g| g.args.first())
                .map_or(&[][..], Vec::as_slice);
            call.arg("clock", clock);
        } else if has_event {
            call.key("stream..", &self.stream);
        }
        call.arg("shard count", shards.len())
            .arg("count", group.len());
        if !guarded {
            // Every event of a relay asks for the same cap.
            let max_len = group.iter().find_map(|i| i.event.as_ref().map(|(_, m)| *m));
            call.arg("max len", max_len.unwrap_or(u64::MAX));
        }
        for (item, place) in group.iter().zip(places) {
            call.arg("per message..", place)
                .arg("per message..", &item.id)
                .arg("per message..", &item.stored)
                .arg("per message..", item.body_len)
                .arg("per message..", item.due);
            match (&item.guard, guarded) {
                (_, false) => {
                    call.arg(
                        "per message..",
                        item.event.as_ref().map_or(&[][..], |(e, _)| e.as_slice()),
                    );
                }
                (Some(g), true) => {
                    call.arg("per message..", g.keys.len())
                        .arg("per message..", g.args.len());
                    for a in &g.args {
                        call.arg("per message..", a.as_slice());
                    }
                }
                (None, true) => {
                    call.arg("per message..", 0).arg("per message..", 0);
                }
            }
        }
        call.done();
        if self.wait_replicas > 0 {
            // On the connection that wrote the group (WAIT counts its writes),
            // in the same round trip.
            pipe.cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(self.wait_timeout_ms);
        }
        pipe
    }

    /// Runs the pipeline, loading the script again if Redis lost it, and once
    /// more after a dropped connection (safe: an enqueue of an id already stored
    /// replaces it).
    async fn query(&self, kind: &Kind, pipe: &Pipeline) -> Result<Vec<Value>, RedisError> {
        let attempt = |mut conn: Conn| async move {
            match pipe.query_async::<Vec<Value>>(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    tracing::info!("redis lost the queue scripts; loading them again");
                    kind.script().load_async(&mut conn).await?;
                    pipe.query_async(&mut conn).await
                }
                result => result,
            }
        };
        match attempt(self.conn.clone()).await {
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %redact(&self.secrets, &e.to_string()), "redis connection lost; retrying once");
                tokio::time::sleep(RETRY_DELAY).await;
                attempt(self.conn.clone()).await
            }
            result => result,
        }
    }

    /// Runs one group call and answers every message of it.
    async fn call(&self, kind: &Kind, group: Vec<Item>) {
        let pipe = self.pipeline(kind, &group);
        let replies = match tokio::time::timeout(OP_DEADLINE, self.query(kind, &pipe)).await {
            Ok(Ok(replies)) => replies,
            Ok(Err(e)) => {
                tracing::warn!(error = %redact(&self.secrets, &e.to_string()), messages = group.len(), "redis enqueue call failed");
                for item in group {
                    let _ = item.reply.send(Err(self.error(&e)));
                }
                return;
            }
            Err(_) => {
                for item in group {
                    let _ = item.reply.send(Err(QueueError::Timeout(OP_DEADLINE)));
                }
                return;
            }
        };
        let mut replies = replies.into_iter();
        let script: Vec<Value> = match replies.next().map(redis::from_redis_value) {
            Some(Ok(v)) => v,
            other => {
                let why = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "no reply".into(),
                };
                for item in group {
                    let _ = item.reply.send(Err(QueueError::Corrupt(format!(
                        "redis enqueue reply: {why}"
                    ))));
                }
                return;
            }
        };
        let replicated = self.replicated(replies.next());
        let guarded = matches!(kind, Kind::Guarded(_));
        let per = if guarded { 2 } else { 1 };
        if script.len() != per * group.len() {
            let expected = per * group.len();
            for item in group {
                let _ = item.reply.send(Err(QueueError::Corrupt(format!(
                    "redis enqueue reply has {} values where {expected} were expected",
                    script.len(),
                ))));
            }
            return;
        }
        let mut values = script.into_iter();
        for item in group {
            let outcome = if guarded {
                let (code, reply) = (values.next(), values.next());
                match (code, reply) {
                    (Some(Value::Int(-1)), Some(text)) => Err(self.item_error(&bytes_of(text))),
                    (Some(Value::Int(0)), Some(reply)) => Ok(Outcome {
                        stored: false,
                        guard_reply: bytes_of(reply),
                    }),
                    (Some(Value::Int(_)), Some(reply)) => Ok(Outcome {
                        stored: true,
                        guard_reply: bytes_of(reply),
                    }),
                    other => Err(QueueError::Corrupt(format!(
                        "guarded enqueue reply: {other:?}"
                    ))),
                }
            } else {
                match values.next() {
                    Some(Value::Int(_)) => Ok(Outcome {
                        stored: true,
                        guard_reply: Vec::new(),
                    }),
                    Some(text) => Err(self.item_error(&bytes_of(text))),
                    None => Err(QueueError::Corrupt("enqueue reply: missing".into())),
                }
            };
            // Stored, but not on enough replicas: the client must try again.
            let outcome = match (outcome, &replicated) {
                (Ok(o), Err(acked)) if o.stored => Err(self.unreplicated(*acked, &item.id)),
                (o, _) => o,
            };
            let _ = item.reply.send(outcome);
        }
    }

    /// Whether enough replicas acknowledged the call (the reply of its `WAIT`):
    /// `Err(acknowledged)` when not.
    fn replicated(&self, wait: Option<Value>) -> Result<(), i64> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let acked = wait
            .and_then(|v| redis::from_redis_value::<i64>(v).ok())
            .unwrap_or(0);
        if acked < i64::from(self.wait_replicas) {
            Err(acked)
        } else {
            Ok(())
        }
    }

    fn unreplicated(&self, acked: i64, id: &str) -> QueueError {
        QueueError::Unreplicated(format!(
            "redis WAIT: {acked} of {} replicas acknowledged message {id} within {} ms",
            self.wait_replicas, self.wait_timeout_ms
        ))
    }
}

fn bytes_of(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        other => format!("{other:?}").into_bytes(),
    }
}
