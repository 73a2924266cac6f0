//! Group commit of the Redis queue's enqueues: messages of concurrent SMTP
//! sessions that arrive while an enqueue call is in flight go together in the
//! next call.
//!
//! How: each [`Lane`] has one task and at most one call in flight. The first
//! message goes at once; the next call takes everything that queued up meanwhile
//! (at most [`MAX_GROUP`] messages, [`MAX_GROUP_BYTES`] of values), so an idle
//! relay adds no latency and a busy one makes fewer, larger calls. Standalone
//! Redis and Sentinel have one lane for every shard (all shards' keys live on one
//! node); a cluster has one lane per shard (one hash tag, one slot per call).
//! With `wait_replicas > 0` one `WAIT` after the call, in the same pipeline,
//! covers the whole group.
//!
//! A plain group is one `MULTI`/`EXEC` of native commands, no script: one
//! `MSETNX` of every message's stored value, one `RPUSH` to each shard's `fresh`
//! (with `queue.redis.fresh_list: false` a `ZADD` to its `due`),
//! each `accepted` event's `XADD` (standalone and Sentinel), then each shard's
//! `HINCRBY`s. Why not a
//! script: Redis 7's Lua hashes every byte of every string it is handed, and a
//! script's `SET` copies the value once more, so a body sent through Lua cost
//! Redis more than everything else the enqueue does (bench/README.md, "Enqueue
//! without Lua"). A transaction is all or nothing at `maxmemory` too: a write
//! refused while queuing, or an `EXEC` refused, discards the whole group
//! (`EXECABORT`), so nothing is stored behind the `451`. In the rare group with
//! an id that is already stored, `MSETNX` stores none (the transaction still
//! added them to `fresh` and counted them): [`REPLACE_GROUP`]'s script, right
//! after, stores each, replacing that one as the trait asks (counted once, its
//! old lease, status and indexes gone), and takes the transaction's counts back;
//! those callers are answered from that call (and its `WAIT`). A relay that dies
//! between the two leaves that group's new messages unstored (their callers had
//! no `250`; their `fresh` entries are dropped as debris by the next lease), the
//! old copy queued, and the shards' counters too high by the group's size.
//!
//! Quota-guarded groups stay one `EVALSHA` (the guard decides inside the call
//! whether each message is stored; a transaction cannot make a `SET` depend on
//! it).
//!
//! Each caller's answer comes only from the call that holds its message (and its
//! `WAIT`): a failed call answers every message in it with that error; a message
//! that fails alone (a key of the wrong type) gets its own error and the others
//! are stored. A caller that gave up before its message was sent (its SMTP client
//! was told to retry) is left out of the call, so the message is not stored
//! behind a `451`.

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

/// KEYS/ARGV of `enqueue_replace_main.lua` (with `enqueue.lua`).
pub(super) const REPLACE_GROUP: Layout = Layout {
    keys: &[
        "due, stats, leased, lease, later, fresh..",
        "message, status..",
    ],
    args: &["shard count", "count", "per message.."],
};
/// KEYS/ARGV of `guarded_group_main.lua` (with a guard and `enqueue.lua`).
pub(super) const GUARDED_GROUP: Layout = Layout {
    keys: &[
        "due, stats, leased, lease, later, fresh..",
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
    /// Scheduled on its shard's `fresh` list (due at arrival, by now), not `due`.
    pub fresh: bool,
    /// The `accepted` event's JSON (standalone and Sentinel only).
    pub event: Option<Vec<u8>>,
    pub guard: Option<GuardPart>,
    pub reply: oneshot::Sender<Result<Outcome, QueueError>>,
}

impl Item {
    fn size(&self) -> usize {
        self.stored.len() + self.event.as_ref().map_or(0, Vec::len)
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
    /// New ids due by their enqueue go to each shard's `fresh` list, not `due`
    /// (`queue.redis.fresh_list`).
    pub fresh_list: bool,
    /// The events stream (only used on standalone Redis and Sentinel).
    pub stream: String,
}

/// The script a lane runs.
#[derive(Clone)]
pub(super) enum Kind {
    /// Plain enqueues, some with their event: a transaction, and this script
    /// ([`REPLACE_GROUP`]) for ids already stored.
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
            // An id twice in one `MSETNX` would be stored (and counted) twice:
            // the second goes in the next call, which replaces the first.
            let twice = group.iter().any(|g| g.id == item.id);
            if bytes + item.size() > MAX_GROUP_BYTES || other_index || twice {
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
        if text.starts_with("OOM") || text.contains("OOM command not allowed") {
            QueueError::Full(msg)
        } else {
            QueueError::Unavailable(msg)
        }
    }

    /// The group's shards in order of first appearance, and each message's
    /// shard's place among them (1-based).
    fn shards_of(group: &[&Item]) -> (Vec<u16>, Vec<usize>) {
        let mut shards: Vec<u16> = Vec::new();
        let places = group
            .iter()
            .map(|i| match shards.iter().position(|&s| s == i.shard) {
                Some(p) => p + 1,
                None => {
                    shards.push(i.shard);
                    shards.len()
                }
            })
            .collect();
        (shards, places)
    }

    /// Appends `WAIT` to `pipe` when `wait_replicas > 0`: on the connection that
    /// wrote the group (WAIT counts its writes), in the same round trip.
    fn wait(&self, pipe: &mut Pipeline) {
        if self.wait_replicas > 0 {
            pipe.cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(self.wait_timeout_ms);
        }
    }

    /// The pipeline of one script call: `EVALSHA` (guarded, or the replacement
    /// of ids already stored) and `WAIT`.
    fn script_pipeline(&self, kind: &Kind, group: &[&Item]) -> Pipeline {
        let (shards, places) = Self::shards_of(group);
        let guarded = matches!(kind, Kind::Guarded(_));
        let guard_keys: usize = group
            .iter()
            .filter_map(|i| i.guard.as_ref())
            .map(|g| g.keys.len())
            .sum();
        let numkeys = 6 * shards.len() + 2 * group.len() + guard_keys + usize::from(guarded);
        let mut pipe = redis::pipe();
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(kind.script().get_hash())
            .arg(numkeys);
        let layout = if guarded {
            &GUARDED_GROUP
        } else {
            &REPLACE_GROUP
        };
        let mut call = Call::onto(cmd, layout);
        for &s in &shards {
            let k = &self.shard_keys[usize::from(s)];
            for key in [&k.due, &k.stats, &k.leased, &k.lease, &k.later, &k.fresh] {
                call.key("due, stats, leased, lease, later, fresh..", key);
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
        }
        call.arg("shard count", shards.len())
            .arg("count", group.len());
        for (item, place) in group.iter().zip(places) {
            call.arg("per message..", place)
                .arg("per message..", &item.id)
                .arg("per message..", &item.stored)
                .arg("per message..", item.body_len);
            // No score: the id goes to `fresh`.
            if item.fresh {
                call.arg("per message..", "");
            } else {
                call.arg("per message..", item.due);
            }
            match (&item.guard, guarded) {
                (_, false) => {}
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
        self.wait(&mut pipe);
        pipe
    }

    /// The pipeline of a plain group: `MULTI`; every message's stored value in
    /// one `MSETNX` (all or none: any id already stored leaves them all to the
    /// replacement script); per shard one `RPUSH` of its ids to `fresh` (or `ZADD` to `due`); per
    /// event its `XADD`; per shard its counters; `EXEC`; `WAIT`. Few commands,
    /// so few replies: each costs the relay about a thousand instructions to
    /// parse (`QUEUED`, then its result). Errors come back in place.
    fn multi_pipeline(&self, group: &[&Item]) -> Pipeline {
        let shards = ShardGroups::of(group);
        let events = group.iter().filter(|i| i.event.is_some()).count();
        let mut pipe = Pipeline::with_capacity(4 + 4 * shards.len() + events);
        pipe.ignore_errors();
        pipe.cmd("MULTI");
        // Sized up front: the values are most of the call's bytes, and a buffer
        // grown as they were added copied them again at every doubling.
        let data = 6 + group
            .iter()
            .map(|i| {
                let k = &self.shard_keys[usize::from(i.shard)];
                k.message.len() + i.id.len() + i.stored.len()
            })
            .sum::<usize>();
        let mut values = redis::Cmd::with_capacity(1 + 2 * group.len(), data);
        values.arg("MSETNX");
        for item in group {
            let k = &self.shard_keys[usize::from(item.shard)];
            values.arg(k.message(&item.id)).arg(&item.stored);
        }
        pipe.add_command(values);
        for shard in &shards.0 {
            let keys = &self.shard_keys[usize::from(shard.shard)];
            // New ids due now are due at their arrival: in arrival order on
            // `fresh` (a list entry is a fraction of a sorted-set one); others
            // (`fresh_list: false`, or due later) scored on `due`.
            if shard.fresh > 0 {
                let fresh = pipe.cmd("RPUSH").arg(&keys.fresh);
                for item in shard.items.iter().filter(|i| i.fresh) {
                    fresh.arg(&item.id);
                }
            }
            if shard.fresh < shard.items.len() {
                let due = pipe.cmd("ZADD").arg(&keys.due);
                for item in shard.items.iter().filter(|i| !i.fresh) {
                    due.arg(item.due).arg(&item.id);
                }
            }
        }
        for item in group {
            if let Some(event) = &item.event {
                crate::events::log::push_xadd(&mut pipe, &self.stream, event);
            }
        }
        for shard in &shards.0 {
            let stats = &self.shard_keys[usize::from(shard.shard)].stats;
            pipe.cmd("HINCRBY")
                .arg(stats)
                .arg("messages")
                .arg(shard.items.len());
            if shard.bytes > 0 {
                pipe.cmd("HINCRBY").arg(stats).arg("bytes").arg(shard.bytes);
            }
        }
        pipe.cmd("EXEC");
        self.wait(&mut pipe);
        pipe
    }

    /// Runs the pipeline, loading the script again if Redis lost it, and once
    /// more after a dropped connection (safe: an enqueue of an id already stored
    /// replaces it, and a transaction cut off before its `EXEC` is discarded).
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
        let refs: Vec<&Item> = group.iter().collect();
        let outcomes = match kind {
            Kind::Plain(_) => self.outcomes_multi(kind, &refs).await,
            Kind::Guarded(_) => self.outcomes_script(kind, &refs).await,
        };
        for (item, outcome) in group.into_iter().zip(outcomes) {
            let _ = item.reply.send(outcome);
        }
    }

    /// The pipeline's replies, or its error for every message of `group`.
    async fn replies(
        &self,
        kind: &Kind,
        group: &[&Item],
        pipe: &Pipeline,
    ) -> Result<Vec<Value>, Vec<Result<Outcome, QueueError>>> {
        match tokio::time::timeout(OP_DEADLINE, self.query(kind, pipe)).await {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(e)) => {
                tracing::warn!(error = %redact(&self.secrets, &e.to_string()), messages = group.len(), "redis enqueue call failed");
                Err(group.iter().map(|_| Err(self.error(&e))).collect())
            }
            Err(_) => Err(group
                .iter()
                .map(|_| Err(QueueError::Timeout(OP_DEADLINE)))
                .collect()),
        }
    }

    /// A plain group: its transaction, then the script for ids already stored.
    async fn outcomes_multi(
        &self,
        kind: &Kind,
        group: &[&Item],
    ) -> Vec<Result<Outcome, QueueError>> {
        let pipe = self.multi_pipeline(group);
        let replies = match self.replies(kind, group, &pipe).await {
            Ok(r) => r,
            Err(answers) => return answers,
        };
        // MULTI, one reply per queued command, EXEC, WAIT.
        let queued = pipe.len() - 2 - usize::from(self.wait_replicas > 0);
        let mut replies = replies.into_iter();
        let multi = replies.next();
        let queued_replies: Vec<Value> = replies.by_ref().take(queued).collect();
        let exec = replies.next();
        let replicated = self.replicated(replies.next());
        let done = match exec {
            Some(Value::Array(done)) if done.len() == queued => done,
            other => {
                // Discarded as a whole: say why with the first refusal, OOM first.
                let errors: Vec<&redis::ServerError> = [multi.as_ref(), other.as_ref()]
                    .into_iter()
                    .flatten()
                    .chain(&queued_replies)
                    .filter_map(|v| match v {
                        Value::ServerError(e) => Some(e),
                        _ => None,
                    })
                    .collect();
                let why = match errors.iter().find(|e| is_oom(e)).or(errors.first()) {
                    Some(e) => server_text(e),
                    None => format!("the transaction's reply is {other:?}"),
                };
                return group
                    .iter()
                    .map(|_| {
                        Err(if errors.is_empty() {
                            QueueError::Corrupt(format!("redis enqueue: {why}"))
                        } else {
                            self.item_error(why.as_bytes())
                        })
                    })
                    .collect();
            }
        };
        // The replies in the order the pipeline queued the commands.
        let shards = ShardGroups::of(group);
        let mut done = done.into_iter();
        let stored_all = matches!(done.next(), Some(Value::Int(1)));
        // A shard whose `RPUSH`, `ZADD` or counters failed fails its messages.
        let mut shard_error: Vec<(u16, String)> = Vec::new();
        for shard in &shards.0 {
            // Its `RPUSH` and its `ZADD`, whichever it has.
            let index = usize::from(shard.fresh > 0) + usize::from(shard.fresh < shard.items.len());
            for _ in 0..index {
                if let Some(Value::ServerError(e)) = done.next() {
                    shard_error.push((shard.shard, server_text(&e)));
                }
            }
        }
        let event_errors: Vec<Option<String>> = group
            .iter()
            .map(|item| match item.event.as_ref().and_then(|_| done.next()) {
                Some(Value::ServerError(e)) => Some(server_text(&e)),
                _ => None,
            })
            .collect();
        for shard in &shards.0 {
            for _ in 0..1 + usize::from(shard.bytes > 0) {
                if let Some(Value::ServerError(e)) = done.next() {
                    shard_error.push((shard.shard, server_text(&e)));
                }
            }
        }
        let mut out: Vec<Result<Outcome, QueueError>> = if stored_all {
            group
                .iter()
                .zip(&event_errors)
                .map(|(item, event_error)| {
                    let failed = shard_error
                        .iter()
                        .find(|(s, _)| *s == item.shard)
                        .map(|(_, e)| e)
                        .or(event_error.as_ref());
                    match (failed, &replicated) {
                        (Some(e), _) => Err(self.item_error(e.as_bytes())),
                        // Stored, but not on enough replicas: the client must try again.
                        (None, Err(acked)) => Err(self.unreplicated(*acked, &item.id)),
                        (None, Ok(())) => Ok(Outcome {
                            stored: true,
                            guard_reply: Vec::new(),
                        }),
                    }
                })
                .collect()
        } else {
            // An id of the group was already stored, so `MSETNX` stored none
            // (the `ZADD`s and counters ran): the script stores each, replacing
            // those already there, and takes the transaction's counts back.
            self.outcomes_script(kind, group).await
        };
        if !stored_all {
            for (answer, event_error) in out.iter_mut().zip(event_errors) {
                if let (Ok(_), Some(e)) = (&answer, event_error) {
                    *answer = Err(self.item_error(e.as_bytes()));
                }
            }
        }
        out
    }

    /// A script call: guarded, or the replacement of ids already stored.
    async fn outcomes_script(
        &self,
        kind: &Kind,
        group: &[&Item],
    ) -> Vec<Result<Outcome, QueueError>> {
        let pipe = self.script_pipeline(kind, group);
        let replies = match self.replies(kind, group, &pipe).await {
            Ok(r) => r,
            Err(answers) => return answers,
        };
        let mut replies = replies.into_iter();
        let script: Vec<Value> = match replies.next().map(redis::from_redis_value) {
            Some(Ok(v)) => v,
            other => {
                let why = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "no reply".into(),
                };
                return group
                    .iter()
                    .map(|_| Err(QueueError::Corrupt(format!("redis enqueue reply: {why}"))))
                    .collect();
            }
        };
        let replicated = self.replicated(replies.next());
        let guarded = matches!(kind, Kind::Guarded(_));
        let per = if guarded { 2 } else { 1 };
        if script.len() != per * group.len() {
            let expected = per * group.len();
            return group
                .iter()
                .map(|_| {
                    Err(QueueError::Corrupt(format!(
                        "redis enqueue reply has {} values where {expected} were expected",
                        script.len(),
                    )))
                })
                .collect();
        }
        let mut values = script.into_iter();
        let mut out = Vec::with_capacity(group.len());
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
            out.push(match (outcome, &replicated) {
                (Ok(o), Err(acked)) if o.stored => Err(self.unreplicated(*acked, &item.id)),
                (o, _) => o,
            });
        }
        out
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

/// A plain group's messages by shard, shards in order of first appearance: what
/// its transaction writes per shard, found in one pass.
struct ShardGroups<'a>(Vec<ShardGroup<'a>>);

struct ShardGroup<'a> {
    shard: u16,
    /// In group order.
    items: Vec<&'a Item>,
    /// How many of `items` go to `fresh` (the others to `due`).
    fresh: usize,
    bytes: usize,
}

impl<'a> ShardGroups<'a> {
    fn of(group: &[&'a Item]) -> Self {
        let mut shards: Vec<ShardGroup<'a>> = Vec::new();
        for &item in group {
            let i = match shards.iter().position(|s| s.shard == item.shard) {
                Some(i) => i,
                None => {
                    shards.push(ShardGroup {
                        shard: item.shard,
                        items: Vec::new(),
                        fresh: 0,
                        bytes: 0,
                    });
                    shards.len() - 1
                }
            };
            let s = &mut shards[i];
            s.items.push(item);
            s.fresh += usize::from(item.fresh);
            s.bytes += item.body_len;
        }
        ShardGroups(shards)
    }

    fn len(&self) -> usize {
        self.0.len()
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

/// Redis at `maxmemory` refusing a write.
fn is_oom(e: &redis::ServerError) -> bool {
    e.code() == "OOM"
        || e.details()
            .is_some_and(|d| d.contains("OOM command not allowed"))
}

/// A server error as Redis wrote it: its code, then its text.
fn server_text(e: &redis::ServerError) -> String {
    match e.details() {
        Some(d) => format!("{} {d}", e.code()),
        None => e.code().to_owned(),
    }
}
