//! The one place that turns a [`RedisConfig`] into a connection: a standalone server,
//! Redis Cluster, or the master of a Redis Sentinel deployment. The queue (and the
//! quota counters it lends its connection to) and the egress store all connect here,
//! so they follow a failover the same way and redact the same secrets.
//!
//! # Sentinel URLs
//!
//! ```text
//! redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB]
//! rediss+sentinel://…   (TLS to the sentinels and to the master)
//! ```
//!
//! A host without a port means 26379. IPv6 hosts are bracketed (`[::1]:26379`). The
//! userinfo authenticates to the sentinels (percent-encoded; absent means the
//! sentinels are contacted without `AUTH`); the master and its replicas are
//! authenticated with `queue.redis.password`, as a standalone server is.
//!
//! # Following a failover
//!
//! The redis crate has no connection manager over Sentinel, so [`SentinelConn`] keeps
//! the current master's multiplexed connection and replaces it when a request fails
//! in a way a failover causes (the connection dropped or refused, a timeout, or a
//! `READONLY`/`MASTERDOWN` reply from a demoted master): it asks the sentinels for the
//! master again and connects to it. Only one caller looks up at a time; the others
//! wait for its result instead of asking again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, ServerErrorKind, TlsMode, Value,
};

use crate::config::RedisConfig;
use crate::config::redis::{SentinelUrl, is_sentinel_url, url_password};

pub mod script;
pub mod slots;

/// How long a caller that saw a failed master lookup waits before asking again: the
/// sentinels need a moment (`down-after-milliseconds`, the election) to name a new
/// master, and asking in a tight loop only loads them.
const LOOKUP_PAUSE: Duration = Duration::from_millis(200);

/// Timeouts and retries of one user of the connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// One attempt to open a TCP connection to a node.
    pub connect: Duration,
    /// One command's reply.
    pub response: Duration,
    /// The whole connect (or one operation), retries and reconnects included.
    pub deadline: Duration,
    /// Reconnect attempts after a connection broke, per failing request.
    pub retries: usize,
}

#[derive(Debug)]
pub(crate) enum ConnectError {
    /// Bad configuration or Redis refused us; the text is redacted.
    Failed(String),
    /// No connection within [`Timeouts::deadline`].
    Timeout(Duration),
}

/// A connection of any kind; all multiplex many requests over one socket per node and
/// reconnect by themselves.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

impl Conn {
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => Box::pin(c.command(cmd)),
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
            Conn::Sentinel(c) => Box::pin(c.pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.db,
        }
    }
}

/// Connects as `cfg` says (standalone, cluster or sentinel) and returns the connection
/// and the strings that must never reach an error message or a log line (every
/// password, as written in a URL and decoded). Errors are already redacted. Fails
/// within `t.deadline` when Redis is unreachable.
pub(crate) async fn connect(
    cfg: &RedisConfig,
    t: &Timeouts,
) -> Result<(Conn, Vec<String>), ConnectError> {
    let secrets = secrets_of(cfg);
    if cfg.key_prefix.is_empty() || cfg.key_prefix.contains(['{', '}', ' ']) {
        return Err(ConnectError::Failed(
            "redis key_prefix must be non-empty without braces or spaces".into(),
        ));
    }
    let password = cfg
        .password
        .as_ref()
        .map(|p| p.0.clone())
        .filter(|p| !p.is_empty());
    let failed = |e: RedisError| ConnectError::Failed(redact(&secrets, &format!("{e}")));

    // Boxed: the sentinel lookup's future type is deep, and callers that hold this
    // future inside their own async fns (the operator's reconciler) would otherwise
    // exceed the compiler's layout depth limit.
    let connecting: Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send + '_>> =
        Box::pin(async {
            if is_sentinel_url(&cfg.url) {
                if cfg.cluster {
                    return Err(ConnectError::Failed(
                        "queue.redis.url: a Redis Sentinel URL cannot be used with cluster: true"
                            .into(),
                    ));
                }
                let url = SentinelUrl::parse(&cfg.url).map_err(|e| {
                    ConnectError::Failed(redact(&secrets, &format!("queue.redis.url: {e}")))
                })?;
                let conn = SentinelConn::open(&url, password.as_deref(), t, secrets.clone().into())
                    .await
                    .map_err(|e| {
                        ConnectError::Failed(redact(
                            &secrets,
                            &format!("via the sentinels of master `{}`: {e}", url.master),
                        ))
                    })?;
                Ok(Conn::Sentinel(Arc::new(conn)))
            } else if cfg.cluster {
                let nodes: Vec<&str> = std::iter::once(cfg.url.as_str())
                    .chain(cfg.cluster_nodes.iter().map(String::as_str))
                    .collect();
                let mut builder = ClusterClientBuilder::new(nodes)
                    .connection_timeout(t.connect)
                    .response_timeout(t.response)
                    .overall_response_timeout(Some(t.deadline))
                    .retries(t.retries as u32);
                if let Some(pw) = &password {
                    builder = builder.password(pw);
                }
                let client = builder.build().map_err(failed)?;
                let conn = client.get_async_connection().await.map_err(failed)?;
                Ok(Conn::Cluster(conn))
            } else {
                let mut info = cfg.url.as_str().into_connection_info().map_err(failed)?;
                if let Some(pw) = &password {
                    let settings = info.redis_settings().clone().set_password(pw);
                    info = info.set_redis_settings(settings);
                }
                let client = Client::open(info).map_err(failed)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(t.connect))
                    .set_response_timeout(Some(t.response))
                    .set_number_of_retries(t.retries)
                    .set_max_delay(Duration::from_secs(1));
                let conn = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(failed)?;
                Ok(Conn::Single(conn))
            }
        });
    let conn = tokio::time::timeout(t.deadline, connecting)
        .await
        .map_err(|_| ConnectError::Timeout(t.deadline))??;
    Ok((conn, secrets))
}

/// Every password `cfg` holds: the configured one, and any in a URL's userinfo, both
/// as written (an unparsable URL may be echoed by an error) and percent-decoded.
fn secrets_of(cfg: &RedisConfig) -> Vec<String> {
    let mut secrets: Vec<String> = cfg
        .password
        .iter()
        .map(|p| p.0.clone())
        .filter(|p| !p.is_empty())
        .collect();
    for url in std::iter::once(&cfg.url).chain(&cfg.cluster_nodes) {
        secrets.extend(url_password(url).map(str::to_owned));
        if is_sentinel_url(url) {
            if let Ok(u) = SentinelUrl::parse(url)
                && let Some(pw) = u.password
            {
                secrets.push(pw.0);
            }
        } else if let Ok(info) = url.as_str().into_connection_info()
            && let Some(pw) = info.redis_settings().password()
        {
            secrets.push(pw.to_owned());
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets.sort();
    secrets.dedup();
    // Longest first, so a secret that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// The current master's connection, replaced after a failover.
pub(crate) struct SentinelConn {
    master: String,
    db: i64,
    /// The connection in use and its generation (bumped by every replacement).
    current: std::sync::Mutex<(u64, MultiplexedConnection)>,
    /// Held while asking the sentinels: lookups need `&mut`, and holding it makes a
    /// lookup single-flight.
    lookup: tokio::sync::Mutex<Lookup>,
    config: AsyncConnectionConfig,
    /// Bound on one lookup plus connect.
    lookup_timeout: Duration,
    secrets: Arc<[String]>,
}

struct Lookup {
    client: SentinelClient,
    /// When the last lookup failed; callers that were already waiting then do not ask
    /// again, they get their own error back.
    failed_at: Option<Instant>,
}

impl SentinelConn {
    async fn open(
        url: &SentinelUrl,
        password: Option<&str>,
        t: &Timeouts,
        secrets: Arc<[String]>,
    ) -> RedisResult<Self> {
        let addrs = url.sentinels.iter().map(|(host, port)| {
            if url.tls {
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.clone(), *port)
            }
        });
        let mut builder =
            SentinelClientBuilder::new(addrs, &url.master, SentinelServerType::Master)?
                .set_client_to_redis_db(url.db);
        if let Some(pw) = password {
            builder = builder.set_client_to_redis_password(pw);
        }
        if let Some(user) = &url.username {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(pw) = &url.password {
            builder = builder.set_client_to_sentinel_password(&pw.0);
        }
        if url.tls {
            builder = builder
                .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                .set_client_to_redis_tls_mode(TlsMode::Secure);
        }
        let mut client = builder.build()?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(t.connect))
            .set_response_timeout(Some(t.response));
        let conn = find_master(&mut client, &config).await?;
        tracing::info!(master = %url.master, "redis sentinel: connected to the master");
        Ok(SentinelConn {
            master: url.master.clone(),
            db: url.db,
            current: std::sync::Mutex::new((0, conn)),
            lookup: tokio::sync::Mutex::new(Lookup {
                client,
                failed_at: None,
            }),
            config,
            lookup_timeout: t.connect + t.response,
            secrets,
        })
    }

    fn current(&self) -> (u64, MultiplexedConnection) {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.current();
        let result = conn.req_packed_command(cmd).await;
        let Err(e) = &result else {
            return result;
        };
        if !is_failover_error(e) {
            return result;
        }
        let replaced = self.replace(generation).await;
        if replaced && is_demoted_error(e) {
            // A demoted master refused the command, so it did not run: run it on the
            // new master.
            return self.current().1.req_packed_command(cmd).await;
        }
        result
    }

    async fn pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.current();
        let result = conn.req_packed_commands(pipeline, offset, count).await;
        let demoted = match &result {
            Err(e) if is_failover_error(e) => is_demoted_error(e),
            Err(_) => return result,
            // Errors inside a pipeline come back as values.
            Ok(values) if values.iter().any(is_demoted_value) => true,
            Ok(_) => return result,
        };
        let replaced = self.replace(generation).await;
        if replaced && demoted {
            // A demoted master runs no write; the reads it ran are harmless to repeat,
            // and every write of ours is idempotent besides.
            return self
                .current()
                .1
                .req_packed_commands(pipeline, offset, count)
                .await;
        }
        result
    }

    /// Replaces the connection of `generation` (which just failed) with one to the
    /// master the sentinels name now. Returns whether a newer connection is in place.
    /// Callers that fail together wait for one lookup instead of each asking.
    async fn replace(&self, generation: u64) -> bool {
        let asked = Instant::now();
        let mut lookup = self.lookup.lock().await;
        if self.current().0 != generation {
            return true;
        }
        if lookup
            .failed_at
            .is_some_and(|t| t >= asked || t.elapsed() < LOOKUP_PAUSE)
        {
            return false;
        }
        let found = tokio::time::timeout(
            self.lookup_timeout,
            find_master(&mut lookup.client, &self.config),
        )
        .await;
        match found {
            Ok(Ok(conn)) => {
                lookup.failed_at = None;
                let mut current = self
                    .current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *current = (generation + 1, conn);
                tracing::info!(master = %self.master, "redis sentinel: reconnected to the current master");
                true
            }
            Ok(Err(e)) => {
                lookup.failed_at = Some(Instant::now());
                tracing::warn!(
                    master = %self.master,
                    error = %redact(&self.secrets, &e.to_string()),
                    "redis sentinel: no master to reconnect to yet"
                );
                false
            }
            Err(_) => {
                lookup.failed_at = Some(Instant::now());
                tracing::warn!(
                    master = %self.master,
                    timeout = ?self.lookup_timeout,
                    "redis sentinel: master lookup timed out"
                );
                false
            }
        }
    }
}

/// Asks the sentinels for the master (the crate checks that the node it names says it
/// is master) and connects to it.
async fn find_master(
    client: &mut SentinelClient,
    config: &AsyncConnectionConfig,
) -> RedisResult<MultiplexedConnection> {
    client
        .async_get_client()
        .await?
        .get_multiplexed_async_connection_with_config(config)
        .await
}

/// An error after which the master may have changed.
fn is_failover_error(e: &RedisError) -> bool {
    e.is_timeout() || is_connection_error(e) || e.is_io_error() || is_demoted_error(e)
}

/// The node no longer takes writes: it was demoted to replica (or lost its master).
fn is_demoted_error(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    )
}

fn is_demoted_value(v: &Value) -> bool {
    matches!(v, Value::ServerError(e)
        if matches!(e.kind(), Some(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)))
}

/// The connection broke or could not be made (not a timeout: the command may have
/// run).
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    !e.is_timeout()
        && (e.is_connection_dropped() || e.is_connection_refusal() || e.is_unrecoverable_error())
}

/// `text` with every secret replaced by `<redacted>`.
pub(crate) fn redact(secrets: &[String], text: &str) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "<redacted>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn secrets_include_every_password() {
        let cfg = RedisConfig {
            url: "redis+sentinel://u:s%40nt@h/m".into(),
            password: Some(Secret("datapw".into())),
            cluster: false,
            cluster_nodes: vec![],
            key_prefix: "mr".into(),
            wait_replicas: 0,
            wait_timeout: crate::config::default_wait_timeout(),
            fresh_list: true,
        };
        let s = secrets_of(&cfg);
        for want in ["s@nt", "s%40nt", "datapw"] {
            assert!(s.iter().any(|x| x == want), "{want} missing from {s:?}");
        }
        assert_eq!(
            redact(&s, "AUTH s%40nt / s@nt / datapw"),
            "AUTH <redacted> / <redacted> / <redacted>"
        );
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
    async fn sentinel_and_cluster_together_fail_without_panicking() {
        let cfg = RedisConfig {
            url: "redis+sentinel://:hunter2@127.0.0.1:1/m".into(),
            password: None,
            cluster: true,
            cluster_nodes: vec![],
            key_prefix: "mr".into(),
            wait_replicas: 0,
            wait_timeout: crate::config::default_wait_timeout(),
            fresh_list: true,
        };
        let t = Timeouts {
            connect: Duration::from_secs(1),
            response: Duration::from_secs(1),
            deadline: Duration::from_secs(3),
            retries: 1,
        };
        let Err(ConnectError::Failed(e)) = connect(&cfg, &t).await else {
            panic!("connected");
        };
        assert!(
            e.contains("queue.redis.url") && !e.contains("hunter2"),
            "{e}"
        );
    }
}
