//! Redis queue backend, for standalone Redis or Redis Cluster.
//!
//! # Key layout
//!
//! Messages are spread over [`SHARDS`] shards; a message's shard is FNV-1a of its id
//! modulo [`SHARDS`]. Every key of a shard carries the hash tag `{<prefix>:sNN}`, so a
//! shard lives in one Redis Cluster slot and one Lua script can touch all of its keys,
//! while the shards themselves spread over the masters. With the default prefix `mr`:
//!
//! | key                  | type       | content                                          |
//! |----------------------|------------|--------------------------------------------------|
//! | `mr:{mr:s07}:m:<id>` | hash       | `envelope` (JSON of [`Envelope`]), `body` (bytes) |
//! | `mr:{mr:s07}:due`    | sorted set | id scored by next attempt, ms since the epoch    |
//! | `mr:{mr:s07}:ids`    | sorted set | id, score 0: lexical order is arrival order      |
//! | `mr:{mr:s07}:stats`  | hash       | `messages`, `bytes` (body bytes) counters        |
//!
//! `due` is the delivery schedule and will be rescored on every retry, so arrival order
//! (for listing) has its own index rather than being read off the schedule.
//!
//! # Round trips and failure semantics
//!
//! `enqueue` is one round trip: a pipeline of `EVALSHA` (one script writes the hash,
//! both index entries and the counters atomically) and, when `wait_replicas > 0`,
//! `WAIT`. Only after Redis restarts or fails over does the first call see `NOSCRIPT`,
//! load the script and try again.
//!
//! An `enqueue` of an id that is already stored replaces it without counting it twice,
//! so retrying one whose outcome was not learned is safe. That is also why a dropped
//! connection is retried once inside the operation. An error after the script ran (a
//! response timeout, a `WAIT` that too few replicas acknowledged) still leaves the
//! message stored: the SMTP client is told to retry, and may then deliver a duplicate.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    Script, ServerErrorKind, Value,
};

use super::{Envelope, Queue, QueueError, QueueFuture, QueueId, QueueStats, QueuedMessage};
use crate::config::RedisConfig;

/// Number of shards. Part of the storage format: changing it moves ids to other shards
/// and orphans every message already queued.
pub const SHARDS: u16 = 16;

/// One attempt to open a TCP connection to a Redis node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One command's reply; must exceed `WAIT_TIMEOUT_MS`, which blocks the reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole operation, retries and reconnects included, so that a caller always gets
/// an answer even when Redis is unreachable.
const OP_DEADLINE: Duration = Duration::from_secs(8);
/// How long `WAIT` blocks for replica acknowledgements.
const WAIT_TIMEOUT_MS: u64 = 2000;
/// Reconnect attempts (with backoff) after a connection broke, per failing request.
const RECONNECT_RETRIES: usize = 2;
const RETRY_DELAY: Duration = Duration::from_millis(200);

const ENQUEUE_LUA: &str = r#"
-- KEYS: message hash, due set, ids set, stats hash
-- ARGV: id, envelope JSON, body, due score (ms)
local old_len = redis.call('HSTRLEN', KEYS[1], 'body')
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], 'envelope', ARGV[2], 'body', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
if existed == 0 then
  redis.call('HINCRBY', KEYS[4], 'messages', 1)
end
redis.call('HINCRBY', KEYS[4], 'bytes', string.len(ARGV[3]) - old_len)
return existed
"#;

const REMOVE_LUA: &str = r#"
-- KEYS: message hash, due set, ids set, stats hash
-- ARGV: id
local len = redis.call('HSTRLEN', KEYS[1], 'body')
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if existed == 1 then
  redis.call('HINCRBY', KEYS[4], 'messages', -1)
  redis.call('HINCRBY', KEYS[4], 'bytes', -len)
end
return existed
"#;

/// Either kind of connection; both multiplex many requests over one socket per node
/// and reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis queue. Cheap to share behind an `Arc`; all calls multiplex over the same
/// connection(s).
pub struct RedisQueue {
    conn: Conn,
    prefix: String,
    wait_replicas: u32,
    /// Strings that must never reach an error message or a log line.
    secrets: Vec<String>,
    enqueue_script: Script,
    remove_script: Script,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("cluster", &matches!(self.conn, Conn::Cluster(_)))
            .field("prefix", &self.prefix)
            .field("wait_replicas", &self.wait_replicas)
            .finish_non_exhaustive()
    }
}

impl RedisQueue {
    /// Connects (standalone or cluster, per `cfg.cluster`), loads the scripts and checks
    /// that Redis answers. Fails within a few seconds when Redis is unreachable.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, QueueError> {
        if cfg.key_prefix.is_empty() || cfg.key_prefix.contains(['{', '}', ' ']) {
            return Err(QueueError::Unavailable(
                "redis key_prefix must be non-empty without braces or spaces".into(),
            ));
        }
        let password = cfg
            .password
            .as_ref()
            .map(|p| p.0.clone())
            .filter(|p| !p.is_empty());
        let mut secrets: Vec<String> = password.iter().cloned().collect();
        for url in std::iter::once(&cfg.url).chain(&cfg.cluster_nodes) {
            // Both as written (an unparsable URL may be echoed) and percent-decoded.
            secrets.extend(url_password(url).map(str::to_owned));
            if let Ok(info) = url.as_str().into_connection_info()
                && let Some(pw) = info.redis_settings().password()
                && !pw.is_empty()
            {
                secrets.push(pw.to_owned());
            }
        }
        let connect_err = |e: RedisError| {
            QueueError::Unavailable(redact(&secrets, &format!("redis connect: {e}")))
        };

        let connecting = async {
            if cfg.cluster {
                let nodes: Vec<&str> = std::iter::once(cfg.url.as_str())
                    .chain(cfg.cluster_nodes.iter().map(String::as_str))
                    .collect();
                let mut builder = ClusterClientBuilder::new(nodes)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .overall_response_timeout(Some(OP_DEADLINE))
                    .retries(RECONNECT_RETRIES as u32);
                if let Some(pw) = &password {
                    builder = builder.password(pw);
                }
                let client = builder.build().map_err(connect_err)?;
                let conn = client.get_async_connection().await.map_err(connect_err)?;
                Ok::<_, QueueError>(Conn::Cluster(conn))
            } else {
                let mut info = cfg
                    .url
                    .as_str()
                    .into_connection_info()
                    .map_err(connect_err)?;
                if let Some(pw) = &password {
                    let settings = info.redis_settings().clone().set_password(pw);
                    info = info.set_redis_settings(settings);
                }
                let client = Client::open(info).map_err(connect_err)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(RECONNECT_RETRIES)
                    .set_max_delay(Duration::from_secs(1));
                let conn = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(connect_err)?;
                Ok(Conn::Single(conn))
            }
        };
        let conn = tokio::time::timeout(OP_DEADLINE, connecting)
            .await
            .map_err(|_| QueueError::Timeout(OP_DEADLINE))??;

        let queue = RedisQueue {
            conn,
            prefix: cfg.key_prefix.clone(),
            wait_replicas: cfg.wait_replicas,
            secrets,
            enqueue_script: Script::new(ENQUEUE_LUA),
            remove_script: Script::new(REMOVE_LUA),
        };
        // Loading now keeps the first enqueue to one round trip.
        queue
            .deadline("load scripts", async {
                let mut conn = queue.conn.clone();
                for script in [&queue.enqueue_script, &queue.remove_script] {
                    script
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| queue.unavailable("script load", e))?;
                }
                Ok(())
            })
            .await?;
        tracing::info!(
            cluster = cfg.cluster,
            prefix = %queue.prefix,
            wait_replicas = cfg.wait_replicas,
            "redis queue connected"
        );
        Ok(queue)
    }

    fn keys(&self, id: &str) -> ShardKeys {
        ShardKeys::new(&self.prefix, shard_of(id))
    }

    fn unavailable(&self, op: &str, e: RedisError) -> QueueError {
        QueueError::Unavailable(redact(&self.secrets, &format!("redis {op}: {e}")))
    }

    async fn deadline<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout(OP_DEADLINE, fut).await {
            Ok(result) => {
                if let Err(e) = &result {
                    tracing::warn!(op, error = %e, "redis queue operation failed");
                }
                result
            }
            Err(_) => {
                tracing::warn!(op, deadline = ?OP_DEADLINE, "redis queue operation timed out");
                Err(QueueError::Timeout(OP_DEADLINE))
            }
        }
    }

    /// Runs `attempt` again once if the connection was dropped or refused: the
    /// connection manager only starts reconnecting when a request fails, so the first
    /// request after an outage fails even when Redis is back. Safe because every write
    /// here is idempotent. A timeout is not retried: the command may have run.
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, RedisError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        match attempt(self.conn.clone()).await {
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %redact(&self.secrets, &e.to_string()), "redis connection lost; retrying once");
                tokio::time::sleep(RETRY_DELAY).await;
                attempt(self.conn.clone()).await
            }
            result => result,
        }
    }

    /// Runs a pipeline whose first command is `EVALSHA` of `script`, loading the script
    /// and running it again if Redis lost it (restart, failover, `SCRIPT FLUSH`).
    async fn run_script_pipeline(
        &self,
        pipe: &Pipeline,
        script: &Script,
    ) -> Result<Vec<Value>, RedisError> {
        self.retrying(|mut conn| async move {
            match pipe.query_async(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    tracing::info!("redis lost the queue scripts; loading them again");
                    script.load_async(&mut conn).await?;
                    pipe.query_async(&mut conn).await
                }
                result => result,
            }
        })
        .await
    }

    /// Runs one command per shard and returns the replies in shard order: one pipeline
    /// on a single server; in a cluster, concurrent requests because shards live on
    /// different nodes and a cluster pipeline must stay within one slot.
    async fn per_shard<T: FromRedisValue + Send + 'static>(
        &self,
        op: &'static str,
        make: impl Fn(&ShardKeys) -> Cmd,
    ) -> Result<Vec<T>, QueueError> {
        let cmds: Vec<Cmd> = (0..SHARDS)
            .map(|s| make(&ShardKeys::new(&self.prefix, s)))
            .collect();
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                for cmd in &cmds {
                    pipe.add_command(cmd.clone());
                }
                self.retrying(|mut conn| {
                    let pipe = &pipe;
                    async move { pipe.query_async(&mut conn).await }
                })
                .await
                .map_err(|e| self.unavailable(op, e))
            }
            Conn::Cluster(_) => {
                let mut tasks = tokio::task::JoinSet::new();
                for (i, cmd) in cmds.into_iter().enumerate() {
                    let conn = self.conn.clone();
                    tasks.spawn(async move {
                        let mut conn = conn;
                        (i, cmd.query_async::<T>(&mut conn).await)
                    });
                }
                let mut replies: Vec<(usize, T)> = Vec::with_capacity(SHARDS as usize);
                while let Some(joined) = tasks.join_next().await {
                    let (i, reply) = joined.map_err(|e| {
                        QueueError::Unavailable(format!("redis {op}: task failed: {e}"))
                    })?;
                    replies.push((i, reply.map_err(|e| self.unavailable(op, e))?));
                }
                replies.sort_by_key(|(i, _)| *i);
                Ok(replies.into_iter().map(|(_, r)| r).collect())
            }
        }
    }
}

impl Queue for RedisQueue {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn enqueue<'a>(&'a self, msg: &'a QueuedMessage) -> QueueFuture<'a, ()> {
        Box::pin(self.deadline("enqueue", async move {
            let id = valid_id(&msg.envelope.id)?;
            let envelope = serde_json::to_vec(&msg.envelope)
                .map_err(|e| QueueError::Corrupt(format!("cannot encode envelope: {e}")))?;
            let keys = self.keys(id);
            let mut pipe = redis::pipe();
            pipe.cmd("EVALSHA")
                .arg(self.enqueue_script.get_hash())
                .arg(4)
                .arg(keys.message(id))
                .arg(&keys.due)
                .arg(&keys.ids)
                .arg(&keys.stats)
                .arg(id)
                .arg(envelope.as_slice())
                .arg(msg.body.as_slice())
                .arg(msg.envelope.received_at_ms);
            if self.wait_replicas > 0 {
                // In the same pipeline, so it runs on the connection that wrote the
                // message (WAIT counts that connection's writes) and costs no extra
                // round trip. It blocks the multiplexed connection while it waits.
                pipe.cmd("WAIT").arg(self.wait_replicas).arg(WAIT_TIMEOUT_MS);
            }
            let replies = self
                .run_script_pipeline(&pipe, &self.enqueue_script)
                .await
                .map_err(|e| self.unavailable("enqueue", e))?;
            if self.wait_replicas > 0 {
                let acked = replies
                    .get(1)
                    .cloned()
                    .map(redis::from_redis_value::<i64>)
                    .transpose()
                    .map_err(|e| QueueError::Unavailable(format!("redis WAIT: {e}")))?
                    .unwrap_or(0);
                if acked < i64::from(self.wait_replicas) {
                    return Err(QueueError::Unavailable(format!(
                        "redis WAIT: {acked} of {} replicas acknowledged message {id} within {WAIT_TIMEOUT_MS} ms",
                        self.wait_replicas
                    )));
                }
            }
            Ok(())
        }))
    }

    fn get<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, Option<QueuedMessage>> {
        Box::pin(self.deadline("get", async move {
            if QueueId::parse(id.as_str()).is_none() {
                return Ok(None);
            }
            let key = self.keys(id.as_str()).message(id.as_str());
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key).arg("envelope").arg("body");
            let (envelope, body): (Option<Vec<u8>>, Option<Vec<u8>>) = self
                .retrying(|mut conn| {
                    let cmd = &cmd;
                    async move { cmd.query_async(&mut conn).await }
                })
                .await
                .map_err(|e| self.unavailable("get", e))?;
            match (envelope, body) {
                (None, None) => Ok(None),
                (Some(envelope), Some(body)) => {
                    let envelope: Envelope = serde_json::from_slice(&envelope)
                        .map_err(|e| QueueError::Corrupt(format!("envelope of {id}: {e}")))?;
                    Ok(Some(QueuedMessage { envelope, body }))
                }
                _ => Err(QueueError::Corrupt(format!(
                    "message {id} is incomplete in redis"
                ))),
            }
        }))
    }

    fn list_ids(&self, limit: usize) -> QueueFuture<'_, Vec<QueueId>> {
        Box::pin(self.deadline("list", async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            // Each shard's first `limit` ids include every one of the overall first
            // `limit` that lives in that shard; merge and cut.
            let count = i64::try_from(limit).unwrap_or(i64::MAX);
            let shards: Vec<Vec<String>> = self
                .per_shard("list", |keys| {
                    let mut cmd = redis::cmd("ZRANGEBYLEX");
                    cmd.arg(&keys.ids)
                        .arg("-")
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(count);
                    cmd
                })
                .await?;
            let mut ids = shards
                .into_iter()
                .flatten()
                .map(|s| {
                    QueueId::parse(&s).ok_or_else(|| {
                        QueueError::Corrupt(format!("invalid queue id {s:?} in redis"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            ids.sort_unstable();
            ids.truncate(limit);
            Ok(ids)
        }))
    }

    fn remove<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, bool> {
        Box::pin(self.deadline("remove", async move {
            if QueueId::parse(id.as_str()).is_none() {
                return Ok(false);
            }
            let id = id.as_str();
            let keys = self.keys(id);
            let mut invocation = self.remove_script.prepare_invoke();
            invocation
                .key(keys.message(id))
                .key(&keys.due)
                .key(&keys.ids)
                .key(&keys.stats)
                .arg(id);
            let existed: i64 = self
                .retrying(|mut conn| {
                    let invocation = &invocation;
                    async move { invocation.invoke_async(&mut conn).await }
                })
                .await
                .map_err(|e| self.unavailable("remove", e))?;
            Ok(existed == 1)
        }))
    }

    fn stats(&self) -> QueueFuture<'_, QueueStats> {
        Box::pin(self.deadline("stats", async move {
            let shards: Vec<(Option<i64>, Option<i64>)> = self
                .per_shard("stats", |keys| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(&keys.stats).arg("messages").arg("bytes");
                    cmd
                })
                .await?;
            let sum = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
            Ok(shards
                .into_iter()
                .fold(QueueStats::default(), |acc, (m, b)| QueueStats {
                    messages: acc.messages + sum(m),
                    bytes: acc.bytes + sum(b),
                }))
        }))
    }

    fn ping(&self) -> QueueFuture<'_, ()> {
        Box::pin(self.deadline("ping", async move {
            let cmd = redis::cmd("PING");
            self.retrying(|mut conn| {
                let cmd = &cmd;
                async move { cmd.query_async::<Value>(&mut conn).await }
            })
            .await
            .map_err(|e| self.unavailable("ping", e))?;
            Ok(())
        }))
    }
}

/// The keys of one shard. All share the shard's hash tag, so one cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShardKeys {
    base: String,
    due: String,
    ids: String,
    stats: String,
}

impl ShardKeys {
    fn new(prefix: &str, shard: u16) -> Self {
        let base = format!("{prefix}:{{{prefix}:s{shard:02}}}");
        ShardKeys {
            due: format!("{base}:due"),
            ids: format!("{base}:ids"),
            stats: format!("{base}:stats"),
            base,
        }
    }

    fn message(&self, id: &str) -> String {
        format!("{}:m:{id}", self.base)
    }
}

/// 32-bit FNV-1a: tiny, stable across versions and platforms (unlike std's hasher),
/// which the shard mapping must be.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

fn shard_of(id: &str) -> u16 {
    (fnv1a(id.as_bytes()) % u32::from(SHARDS)) as u16
}

fn valid_id(id: &QueueId) -> Result<&str, QueueError> {
    QueueId::parse(id.as_str())
        .map(|_| id.as_str())
        .ok_or_else(|| QueueError::Corrupt(format!("invalid queue id {:?}", id.as_str())))
}

fn is_connection_error(e: &RedisError) -> bool {
    !e.is_timeout()
        && (e.is_connection_dropped() || e.is_connection_refusal() || e.is_unrecoverable_error())
}

/// The password part of a URL's userinfo, as written (`redis://user:pw@host`).
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    let password = userinfo.split_once(':').map_or(userinfo, |(_, pw)| pw);
    (!password.is_empty()).then_some(password)
}

fn redact(secrets: &[String], text: &str) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "<redacted>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a(b"foobar"), 0xbf9c_f968);
    }

    /// The shard of an id is part of the storage format: if this changes, queued mail
    /// is orphaned after an upgrade.
    #[test]
    fn shard_mapping_is_stable() {
        assert_eq!(SHARDS, 16);
        assert_eq!(shard_of("01J9Z3V5W8X0000000AB"), 1);
        assert_eq!(shard_of("01J9Z3V5W8X0000000AC"), 14);
        assert_eq!(shard_of("7ZZZZZZZZZZZZZZZZZZZ"), 0);
        let counts = (0..1600).fold([0u32; SHARDS as usize], |mut c, _| {
            c[shard_of(QueueId::generate().as_str()) as usize] += 1;
            c
        });
        assert!(counts.iter().all(|&n| n > 40), "uneven spread {counts:?}");
    }

    #[test]
    fn keys_of_a_shard_share_one_slot_and_look_as_documented() {
        let keys = ShardKeys::new("mr", 7);
        assert_eq!(keys.message("ID"), "mr:{mr:s07}:m:ID");
        assert_eq!(keys.due, "mr:{mr:s07}:due");
        assert_eq!(keys.ids, "mr:{mr:s07}:ids");
        assert_eq!(keys.stats, "mr:{mr:s07}:stats");
        let slot = Slot::for_key(&keys.due);
        for k in [
            keys.message("01J9Z3V5W8X0000000AB"),
            keys.ids.clone(),
            keys.stats.clone(),
        ] {
            assert_eq!(Slot::for_key(&k), slot, "{k}");
        }
    }

    #[test]
    fn shards_spread_over_slots() {
        let slots: std::collections::HashSet<_> = (0..SHARDS)
            .map(|s| format!("{:?}", Slot::for_key(ShardKeys::new("mr", s).due)))
            .collect();
        assert_eq!(slots.len(), SHARDS as usize);
    }

    #[test]
    fn url_passwords_are_found() {
        assert_eq!(url_password("redis://:pw@h:1/0"), Some("pw"));
        assert_eq!(url_password("rediss://user:p%40ss@h"), Some("p%40ss"));
        assert_eq!(url_password("redis://h:6379"), None);
        assert_eq!(url_password("redis://user:@h"), None);
        assert_eq!(url_password("not a url"), None);
    }

    #[test]
    fn redaction_hides_every_secret() {
        let secrets = vec!["hunter2".to_owned(), String::new()];
        assert_eq!(
            redact(&secrets, "AUTH hunter2 failed for redis://:hunter2@h"),
            "AUTH <redacted> failed for redis://:<redacted>@h"
        );
    }

    #[tokio::test]
    async fn bad_prefix_and_unreachable_server_fail_without_leaking_the_password() {
        let mut cfg = RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            password: Some(crate::config::Secret("hunter2".into())),
            cluster: false,
            cluster_nodes: vec![],
            key_prefix: "{bad}".into(),
            wait_replicas: 0,
        };
        assert!(RedisQueue::connect(&cfg).await.is_err());
        cfg.key_prefix = "mr".into();
        let started = std::time::Instant::now();
        let err = RedisQueue::connect(&cfg).await.unwrap_err().to_string();
        assert!(
            started.elapsed() < OP_DEADLINE + Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}
