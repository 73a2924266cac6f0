//! `RelayConfig`: the one configuration format of a relay process, read from YAML
//! (unknown fields rejected, errors name the field) with environment overrides for
//! secrets. The operator renders the same format into a ConfigMap.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A string that never appears in logs or `Debug` output.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"<redacted>\""
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Name used in the greeting, EHLO reply and `Received:` headers.
    pub hostname: String,
    /// SMTP listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Client networks allowed to relay without authenticating.
    pub relay_networks: Vec<IpNet>,
    /// Server certificate for STARTTLS and implicit TLS.
    pub tls: Option<TlsConfig>,
    /// SMTP AUTH (offered only on TLS-protected sessions).
    pub auth: Option<AuthConfig>,
    pub limits: Limits,
    pub queue: QueueConfig,
    /// Outbound delivery of queued mail.
    pub delivery: DeliveryConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// On SIGTERM, how long sessions may run on before they are told `421`.
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    /// On SIGTERM, how long to go on accepting and serving new connections while
    /// `/readyz` already fails, before the `shutdown_grace` phase starts: load
    /// balancers and Kubernetes endpoints take a while to stop sending new clients,
    /// and a closed listener would refuse them meanwhile.
    #[serde(
        default,
        with = "duration_str",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub shutdown_settle: Duration,
    /// Add `Message-ID:` and `Date:` headers when a message has none (as Postfix does
    /// for local submissions).
    pub add_missing_headers: bool,
    /// Send quotas (ingress limits per tenant, egress pacing per destination);
    /// reloaded without a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<crate::quota::config::QuotaConfig>,
    /// Which senders each AUTH user and relay network may use (absent: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_binding: Option<SenderBindingConfig>,
    /// DKIM signing: keys from `keys_dir`, and what happens to mail without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dkim: Option<DkimConfig>,
}

/// Binds AUTH users and `relay_networks` clients to the senders they may use.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SenderBindingConfig {
    /// Refuse every sender of an AUTH user or relay-network client that has no
    /// binding (default: such clients may use any sender, as without this section).
    pub required: bool,
    /// Also check the addresses of the `From:` header after DATA.
    pub check_from_header: bool,
    /// User name to patterns: `a.example` / `*.a.example` (domain globs),
    /// `*@a.example` / `app@a.example` (address globs), `<>` (the null sender).
    pub users: std::collections::BTreeMap<String, Vec<String>>,
    /// The same for clients inside `relay_networks`; the most specific network wins.
    pub networks: Vec<NetworkSenders>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSenders {
    pub network: IpNet,
    pub senders: Vec<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            hostname: default_hostname(),
            listeners: vec![ListenerConfig::default()],
            relay_networks: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            sender_binding: None,
            tls: None,
            auth: None,
            limits: Limits::default(),
            queue: QueueConfig::default(),
            delivery: DeliveryConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            shutdown_grace: Duration::from_secs(30),
            shutdown_settle: Duration::ZERO,
            add_missing_headers: true,
            quotas: Vec::new(),
            dkim: None,
        }
    }
}

/// Upper bound of `shutdown_settle`. Endpoint removal takes seconds, so anything
/// near this is a mistake (a bare `300` means seconds, not milliseconds) that would
/// stall every rollout.
pub const MAX_SHUTDOWN_SETTLE: Duration = Duration::from_secs(300);

fn default_hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain SMTP; STARTTLS offered when a certificate is configured.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Implicit,
    /// Never TLS on this listener.
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Name used in logs, metrics and the stored client info.
    pub name: String,
    pub address: SocketAddr,
    pub tls: TlsMode,
    /// Expect a PROXY protocol v1 or v2 header first (behind a load balancer).
    pub proxy_protocol: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "smtp".into(),
            address: "127.0.0.1:2525".parse().unwrap(),
            tls: TlsMode::Starttls,
            proxy_protocol: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; re-read when the file changes.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often to check the files for changes.
    #[serde(default = "default_reload", with = "duration_str")]
    pub reload_interval: Duration,
}

fn default_reload() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File of `username:password` lines (a mounted Secret); re-read on change.
    pub users_file: PathBuf,
    /// Brakes on password guessing, shared by every relay on the same queue store.
    #[serde(default)]
    pub throttle: AuthThrottleConfig,
}

impl SenderBindingConfig {
    fn validate(&self, relay_networks: &[IpNet]) -> Result<(), ConfigError> {
        let check = |field: String, patterns: &[String]| {
            if patterns.is_empty() {
                return Err(invalid(field, "needs at least one sender pattern"));
            }
            for (i, p) in patterns.iter().enumerate() {
                let ok = p == crate::smtp::sender::NULL_SENDER
                    || (!p.is_empty()
                        && !p.contains(['<', '>', ' ', ','])
                        && p.matches('@').count() <= 1);
                if !ok {
                    return Err(invalid(
                        format!("{field}[{i}]"),
                        format!("{p:?} is not a domain or address glob (or \"<>\")"),
                    ));
                }
            }
            Ok(())
        };
        for (user, patterns) in &self.users {
            check(format!("sender_binding.users.{user}"), patterns)?;
        }
        for (i, n) in self.networks.iter().enumerate() {
            check(format!("sender_binding.networks[{i}].senders"), &n.senders)?;
            // A binding for clients that may not relay would never apply.
            if !relay_networks.iter().any(|r| r.contains(&n.network)) {
                return Err(invalid(
                    format!("sender_binding.networks[{i}].network"),
                    format!("{} is not inside relay_networks", n.network),
                ));
            }
        }
        Ok(())
    }
}

/// Failed AUTH attempts slow down and then lock out a client address (an IPv6
/// client's /64) and a user name, each counted on its own.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthThrottleConfig {
    /// Wait before checking an attempt after one earlier failure; doubles with each
    /// further failure of the address or user within `window`. 0 turns delays off.
    #[serde(with = "duration_str")]
    pub delay: Duration,
    #[serde(with = "duration_str")]
    pub max_delay: Duration,
    /// Failures within `window` that lock the address or the user out; 0 turns
    /// lockouts off.
    pub max_failures: u32,
    #[serde(with = "duration_str")]
    pub window: Duration,
    #[serde(with = "duration_str")]
    pub lockout: Duration,
}

impl Default for AuthThrottleConfig {
    fn default() -> Self {
        AuthThrottleConfig {
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_failures: 10,
            window: Duration::from_secs(15 * 60),
            lockout: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted, in bytes (advertised as SIZE).
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Longest text line in DATA, in octets including CRLF (RFC 5321: 1000).
    pub max_line_length: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Open sessions per client network (see the prefixes); 0 turns it off.
    /// Clients inside `relay_networks` are not counted.
    pub max_connections_per_network: usize,
    pub network_prefix_v4: u8,
    pub network_prefix_v6: u8,
    /// Slots of `max_connections` kept for clients inside `relay_networks` and
    /// addresses that authenticated lately; at most half of `max_connections` is
    /// kept, so a small `max_connections` needs no matching change here.
    pub reserved_connections: usize,
    /// When the relay is full, a session idle (outside a transaction) this long may
    /// be closed to admit a new client, the one idle longest first; 0 turns it off.
    #[serde(with = "duration_str")]
    pub evict_idle_after: Duration,
    /// Protocol errors in one session before `421` and close.
    pub max_errors: u32,
    /// Messages in one session before `421`.
    pub max_messages_per_connection: u32,
    /// Waiting for the next command (RFC 5321 4.5.3.2.7: at least 5 minutes).
    #[serde(with = "duration_str")]
    pub command_timeout: Duration,
    /// Waiting for the next chunk of message data (RFC 5321 4.5.3.2.6: 10 minutes
    /// for the terminator, 3 minutes per block).
    #[serde(with = "duration_str")]
    pub data_timeout: Duration,
    /// Whole-session ceiling, so a trickling client cannot hold a slot forever.
    #[serde(with = "duration_str")]
    pub session_timeout: Duration,
    /// Message content (DATA or BDAT chunks) must arrive at this many bytes per
    /// second or more, averaged over each `data_rate_window`; 0 turns it off.
    pub data_min_rate: u64,
    #[serde(with = "duration_str")]
    pub data_rate_window: Duration,
    /// One message's content, from `354` (or the first BDAT) to its end, must
    /// arrive within this.
    #[serde(with = "duration_str")]
    pub data_deadline: Duration,
    /// Octets of DATA read past `max_message_size` (to find the end and answer
    /// `552` in sync) before the connection is cut instead.
    pub data_oversize_drain: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_line_length: 1000,
            max_connections: 1000,
            max_connections_per_ip: 100,
            max_connections_per_network: 250,
            network_prefix_v4: 24,
            network_prefix_v6: 64,
            reserved_connections: 50,
            evict_idle_after: Duration::from_secs(10),
            max_errors: 10,
            max_messages_per_connection: 1000,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            session_timeout: Duration::from_secs(3600),
            data_min_rate: 256,
            data_rate_window: Duration::from_secs(60),
            data_deadline: Duration::from_secs(1800),
            data_oversize_drain: 1024 * 1024,
        }
    }
}

fn is_default_cache_size(n: &usize) -> bool {
    *n == crate::queue::DEFAULT_CACHE_SIZE
}

/// Smallest `queue.cache_size` accepted.
pub const MIN_QUEUE_CACHE_SIZE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackendKind {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `embedded` (default when no Redis is configured) or `redis`.
    pub backend: Option<QueueBackendKind>,
    /// Directory of the embedded queue.
    pub path: PathBuf,
    /// A queue write slower than this answers `451 4.3.0`.
    #[serde(with = "duration_str")]
    pub write_timeout: Duration,
    pub redis: Option<RedisConfig>,
    /// How long the status record of a delivered or bounced message stays readable
    /// (`queue show`).
    #[serde(with = "duration_str")]
    pub status_retention: Duration,
    /// Memory the embedded queue may use to cache its file, in bytes; the relay's
    /// resident memory stays about this much above its baseline however many messages
    /// pass through. Ignored with Redis.
    #[serde(skip_serializing_if = "is_default_cache_size")]
    pub cache_size: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: None,
            path: PathBuf::from("./mailrelay-data"),
            write_timeout: Duration::from_secs(10),
            redis: None,
            status_retention: crate::queue::DEFAULT_STATUS_RETENTION,
            cache_size: crate::queue::DEFAULT_CACHE_SIZE,
        }
    }
}

impl QueueConfig {
    pub fn effective_backend(&self) -> QueueBackendKind {
        self.backend.unwrap_or(if self.redis.is_some() {
            QueueBackendKind::Redis
        } else {
            QueueBackendKind::Embedded
        })
    }
}

#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://…`; for a cluster, any one node (or list
    /// them all in `cluster_nodes`). For Redis Sentinel:
    /// `redis+sentinel://[[user]:password@]host1[:port1][,host2[:port2]...]/MASTER_NAME[/DB]`
    /// (`rediss+sentinel://` for TLS to the sentinels and the master; port 26379 when
    /// omitted); its userinfo authenticates to the sentinels only, and no userinfo
    /// means the sentinels take no `AUTH`. Env: `MAILRELAY_REDIS_URL`.
    pub url: String,
    /// Password of the Redis data nodes (with Sentinel: the master and its
    /// replicas, not the sentinels). Env: `MAILRELAY_REDIS_PASSWORD`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Talk Redis Cluster protocol (not with a sentinel URL).
    #[serde(default)]
    pub cluster: bool,
    /// More seed nodes for cluster mode.
    #[serde(default)]
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key, so several relays can share one Redis.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// After each enqueue, wait for this many replicas to acknowledge (Redis `WAIT`).
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long `WAIT` blocks for those acknowledgements. When they do not come in
    /// time (a failover left a master without replicas), the client gets `451`
    /// naming the replicas, and retries; the message may be stored once more.
    #[serde(
        default = "default_wait_timeout",
        with = "duration_str",
        // Rendered configs (and the operator's config hash) stay as they were.
        skip_serializing_if = "is_default_wait_timeout"
    )]
    pub wait_timeout: Duration,
}

/// Longest `wait_timeout`: a command's reply must come within the store's
/// response timeout (5 s), and `WAIT` blocks the reply.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(4);

pub fn default_wait_timeout() -> Duration {
    Duration::from_secs(2)
}

fn is_default_wait_timeout(d: &Duration) -> bool {
    *d == default_wait_timeout()
}

/// Written out by hand so that a password in a URL (a sentinel URL carries the
/// sentinels' one) never reaches `Debug` output.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hide = |url: &str| match crate::redis_conn::url_password(url) {
            Some(pw) => url.replace(pw, "<redacted>"),
            None => url.to_owned(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &hide(&self.url))
            .field("password", &self.password)
            .field("cluster", &self.cluster)
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|u| hide(u))
                    .collect::<Vec<_>>(),
            )
            .field("key_prefix", &self.key_prefix)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .finish()
    }
}

fn default_prefix() -> String {
    "mr".into()
}

pub use crate::smtp::client::TlsPolicy;

/// Default `delivery.lease`: short, because it is renewed while held, and it is how
/// long the mail a killed relay held waits before the others take it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Run delivery workers in this process; `false` makes a receive-only relay
    /// (another process delivers from the shared queue).
    pub enabled: bool,
    /// Outbound SMTP connections open at once, over all destinations.
    pub max_concurrency: usize,
    /// Outbound connections open at once to one destination (domain or smarthost).
    pub per_destination_concurrency: usize,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: usize,
    /// TCP connect timeout per address.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// How long a taken message stays ours without renewal. Delivery renews every
    /// lease it holds a third of this apart (one round trip for all of them), and
    /// takes only what its connections can send soon; a relay that dies loses its
    /// messages to the other relays after this (the failover time of held mail).
    #[serde(with = "duration_str")]
    pub lease: Duration,
    /// How often to look for due mail when the queue had none. Mail this relay
    /// queues itself is looked at sooner (see `wake_delay`); mail queued by other
    /// relays on the same Redis, and retries coming due, within this.
    #[serde(with = "duration_str")]
    pub poll_interval: Duration,
    /// When this relay queues mail while delivery is idle, delivery looks for it
    /// after this pause (instead of at the next poll), so that a burst is taken in
    /// batches of many messages per connection rather than one by one; `0s` looks
    /// at once.
    #[serde(with = "duration_str")]
    pub wake_delay: Duration,
    /// MX lookups.
    pub dns: crate::delivery::mx::ResolverConfig,
    /// Send everything through this host instead of the recipients' MX.
    pub smarthost: Option<SmarthostConfig>,
    /// Per-domain routes (a transport map): mail for these domains goes to the given
    /// host instead of their MX, and ahead of any smarthost.
    pub routes: Vec<RouteConfig>,
    /// STARTTLS policy towards MX hosts.
    pub tls: TlsPolicy,
    /// PEM trust anchors for `required` TLS; default: the system store.
    pub ca_file: Option<PathBuf>,
    /// When to retry deferred mail and when to give up.
    pub retry: crate::delivery::retry::RetryPolicy,
    /// How delivery outcomes are written to the queue while connections are open.
    pub outcome_batch: OutcomeBatchConfig,
}

/// Outcomes (delivered, deferred, bounced) are written per message as their
/// transactions end, in batches of one queue round trip: a batch is written once it
/// holds `max_messages` or its first outcome waited `max_delay`, whichever comes
/// first. At most `max_messages` outcomes wait unwritten at any time (a connection
/// whose outcome finds the batch full waits), so a relay killed mid-delivery sends
/// again at most one message per open connection plus `max_messages`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutcomeBatchConfig {
    pub max_messages: usize,
    #[serde(with = "duration_str")]
    pub max_delay: Duration,
}

impl Default for OutcomeBatchConfig {
    fn default() -> Self {
        OutcomeBatchConfig {
            max_messages: 32,
            max_delay: Duration::from_millis(50),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            enabled: true,
            max_concurrency: 50,
            per_destination_concurrency: 10,
            max_messages_per_connection: 100,
            connect_timeout: Duration::from_secs(30),
            lease: DEFAULT_LEASE,
            poll_interval: Duration::from_secs(1),
            wake_delay: Duration::from_millis(20),
            dns: Default::default(),
            smarthost: None,
            routes: Vec::new(),
            tls: TlsPolicy::Opportunistic,
            ca_file: None,
            retry: Default::default(),
            outcome_batch: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SmarthostConfig {
    pub host: String,
    #[serde(default = "default_smarthost_port")]
    pub port: u16,
    /// STARTTLS policy; `required` verifies the certificate against `ca_file`.
    #[serde(default)]
    pub tls: TlsPolicy,
    /// PEM trust anchors for this host; default: the system store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// AUTH user (sent only over TLS).
    #[serde(default)]
    pub username: Option<String>,
    /// Env: `MAILRELAY_SMARTHOST_PASSWORD`.
    #[serde(default)]
    pub password: Option<Secret>,
}

fn default_smarthost_port() -> u16 {
    587
}

/// One entry of the transport map: where mail for some domains goes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `example.com` (that domain) or `.example.com` (every subdomain of it). A domain
    /// listed exactly wins over a subdomain pattern; a longer pattern over a shorter.
    pub domains: Vec<String>,
    /// Connected to directly: its addresses, no MX lookup (Postfix's `[host]`).
    pub host: String,
    #[serde(default = "default_route_port")]
    pub port: u16,
    /// STARTTLS policy; `required` verifies the certificate against `ca_file`.
    #[serde(default)]
    pub tls: TlsPolicy,
    /// PEM trust anchors for this host; default: the system store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// AUTH user (sent only over TLS).
    #[serde(default)]
    pub username: Option<String>,
    /// Better kept out of the file: see `password_env`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Name of an environment variable holding the password, read at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
}

fn default_route_port() -> u16 {
    25
}

impl RouteConfig {
    /// The patterns in canonical form: lower case, no trailing dot.
    pub fn normalized_domains(&self) -> impl Iterator<Item = String> + '_ {
        self.domains
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
    }
}

/// The route (index into `routes`) that takes `domain` (lower case, no trailing
/// dot): one listing it exactly, else the one listing its nearest parent as
/// `.parent`. The delivery scheduler's transport map answers the same, faster.
pub fn route_of(routes: &[RouteConfig], domain: &str) -> Option<usize> {
    let find = |want: &str| {
        routes
            .iter()
            .position(|r| r.normalized_domains().any(|d| d == want))
    };
    find(domain).or_else(|| {
        domain
            .match_indices('.')
            .find_map(|(at, _)| find(&format!(".{}", &domain[at + 1..])))
    })
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin HTTP (`/healthz`, `/readyz`, `/metrics`); `null` disables it.
    pub address: Option<SocketAddr>,
    /// A file holding the bearer token `/api/` requires (a mounted Secret: it is
    /// re-read when it changes). `MAILRELAY_ADMIN_TOKEN` works as well.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: Some("127.0.0.1:9325".parse().unwrap()),
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `mailrelay=debug`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl RelayConfig {
    /// Parses YAML text; an error names the offending field.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let cfg: RelayConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            invalid(
                if path == "." { "(root)".into() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Applies `MAILRELAY_*` environment overrides (secrets belong in env or files,
    /// not in a ConfigMap), then validates again.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(url) = get("MAILRELAY_REDIS_URL") {
            match &mut self.queue.redis {
                Some(r) => r.url = url,
                None => {
                    self.queue.redis = Some(RedisConfig {
                        url,
                        password: None,
                        cluster: false,
                        cluster_nodes: vec![],
                        key_prefix: default_prefix(),
                        wait_replicas: 0,
                        wait_timeout: default_wait_timeout(),
                    })
                }
            }
        }
        if let Some(pw) = get("MAILRELAY_REDIS_PASSWORD") {
            match &mut self.queue.redis {
                Some(r) => r.password = Some(Secret(pw)),
                None => {
                    return Err(invalid(
                        "MAILRELAY_REDIS_PASSWORD",
                        "set, but no Redis is configured (queue.redis.url or MAILRELAY_REDIS_URL)",
                    ));
                }
            }
        }
        if let Some(user) = get("MAILRELAY_SMARTHOST_USERNAME") {
            match &mut self.delivery.smarthost {
                Some(s) => s.username = Some(user),
                None => {
                    return Err(invalid(
                        "MAILRELAY_SMARTHOST_USERNAME",
                        "set, but no smarthost is configured (delivery.smarthost)",
                    ));
                }
            }
        }
        if let Some(pw) = get("MAILRELAY_SMARTHOST_PASSWORD") {
            match &mut self.delivery.smarthost {
                Some(s) => s.password = Some(Secret(pw)),
                None => {
                    return Err(invalid(
                        "MAILRELAY_SMARTHOST_PASSWORD",
                        "set, but no smarthost is configured (delivery.smarthost)",
                    ));
                }
            }
        }
        for (i, route) in self.delivery.routes.iter_mut().enumerate() {
            if let Some(var) = &route.password_env {
                match get(var) {
                    Some(pw) => route.password = Some(Secret(pw)),
                    None => {
                        return Err(invalid(
                            format!("delivery.routes[{i}].password_env"),
                            format!("environment variable {var} is not set"),
                        ));
                    }
                }
            }
        }
        if let Some(h) = get("MAILRELAY_HOSTNAME") {
            self.hostname = h;
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.auth {
            let t = &a.throttle;
            if t.max_delay < t.delay {
                return Err(invalid(
                    "auth.throttle.max_delay",
                    "must not be shorter than auth.throttle.delay",
                ));
            }
            if t.window.is_zero() {
                return Err(invalid("auth.throttle.window", "must be longer than 0"));
            }
            if t.max_failures > 0 && t.lockout.is_zero() {
                return Err(invalid("auth.throttle.lockout", "must be longer than 0"));
            }
        }
        if !is_valid_hostname(&self.hostname) {
            return Err(invalid(
                "hostname",
                format!("{:?} is not a valid host name", self.hostname),
            ));
        }
        if self.listeners.is_empty() {
            return Err(invalid("listeners", "at least one listener is required"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty() || !names.insert(&l.name) {
                return Err(invalid(
                    format!("listeners[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
            if l.tls == TlsMode::Implicit && self.tls.is_none() {
                return Err(invalid(
                    format!("listeners[{i}].tls"),
                    "implicit TLS needs a certificate: set tls.cert_file and tls.key_file",
                ));
            }
        }
        for (i, n) in self.relay_networks.iter().enumerate() {
            let too_wide = match n {
                IpNet::V4(v) => v.prefix_len() < 8,
                IpNet::V6(v) => v.prefix_len() < 16,
            };
            if too_wide {
                return Err(invalid(
                    format!("relay_networks[{i}]"),
                    format!(
                        "{n} is wider than /8 (IPv4) or /16 (IPv6) and would make an open relay; authenticate such clients with SMTP AUTH instead"
                    ),
                ));
            }
        }
        if let Some(b) = &self.sender_binding {
            b.validate(&self.relay_networks)?;
        }
        let l = &self.limits;
        if l.max_line_length < 80 || l.max_line_length > 1_000_000 {
            return Err(invalid(
                "limits.max_line_length",
                "must be between 80 and 1000000",
            ));
        }
        if l.max_message_size < 1024 {
            return Err(invalid(
                "limits.max_message_size",
                "must be at least 1024 bytes",
            ));
        }
        for (field, v) in [
            ("limits.max_recipients", l.max_recipients),
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if l.max_errors == 0 || l.max_messages_per_connection == 0 {
            return Err(invalid(
                "limits",
                "max_errors and max_messages_per_connection must be at least 1",
            ));
        }
        if !(1..=32).contains(&l.network_prefix_v4) {
            return Err(invalid(
                "limits.network_prefix_v4",
                "must be between 1 and 32",
            ));
        }
        if !(1..=128).contains(&l.network_prefix_v6) {
            return Err(invalid(
                "limits.network_prefix_v6",
                "must be between 1 and 128",
            ));
        }
        if l.data_min_rate > 0 && l.data_rate_window.is_zero() {
            return Err(invalid(
                "limits.data_rate_window",
                "must be greater than zero while limits.data_min_rate is set",
            ));
        }
        for (field, d) in [
            ("limits.data_deadline", l.data_deadline),
            ("limits.command_timeout", l.command_timeout),
            ("limits.data_timeout", l.data_timeout),
            ("limits.session_timeout", l.session_timeout),
            ("queue.write_timeout", self.queue.write_timeout),
            ("queue.status_retention", self.queue.status_retention),
            ("delivery.connect_timeout", self.delivery.connect_timeout),
            ("delivery.lease", self.delivery.lease),
            ("delivery.poll_interval", self.delivery.poll_interval),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        if self.queue.cache_size < MIN_QUEUE_CACHE_SIZE {
            return Err(invalid(
                "queue.cache_size",
                format!(
                    "{} bytes is below the minimum of {MIN_QUEUE_CACHE_SIZE} (1 MiB): \
                     every lookup would read the file",
                    self.queue.cache_size
                ),
            ));
        }
        if self.shutdown_settle > MAX_SHUTDOWN_SETTLE {
            return Err(invalid(
                "shutdown_settle",
                format!(
                    "{} is longer than {}: every rollout and node drain would wait that long per pod",
                    format_duration(self.shutdown_settle),
                    format_duration(MAX_SHUTDOWN_SETTLE)
                ),
            ));
        }
        self.validate_delivery()?;
        crate::quota::config::validate(&self.quotas).map_err(|(f, m)| invalid(f, m))?;
        crate::quota::config::validate_reach(&self.quotas, &self.delivery)
            .map_err(|(f, m)| invalid(f, m))?;
        match (self.queue.effective_backend(), &self.queue.redis) {
            (QueueBackendKind::Redis, None) => {
                return Err(invalid(
                    "queue.redis",
                    "backend is redis but queue.redis.url is not set",
                ));
            }
            (QueueBackendKind::Redis, Some(r)) => {
                if r.wait_timeout < Duration::from_millis(10) || r.wait_timeout > MAX_WAIT_TIMEOUT {
                    return Err(invalid(
                        "queue.redis.wait_timeout",
                        format!(
                            "must be between 10ms and {} (a reply must come within the \
                             store's 5 s response timeout)",
                            format_duration(MAX_WAIT_TIMEOUT)
                        ),
                    ));
                }
                if crate::redis_conn::is_sentinel_url(&r.url) {
                    crate::redis_conn::SentinelUrl::parse(&r.url)
                        .map_err(|e| invalid("queue.redis.url", e))?;
                    if r.cluster {
                        return Err(invalid(
                            "queue.redis.url",
                            "a Redis Sentinel URL (redis+sentinel://) cannot be used with \
                             queue.redis.cluster: true",
                        ));
                    }
                } else if !(r.url.starts_with("redis://")
                    || r.url.starts_with("rediss://")
                    || r.url.starts_with("redis+unix://")
                    || r.url.starts_with("unix://"))
                {
                    return Err(invalid(
                        "queue.redis.url",
                        "must start with redis://, rediss://, unix://, redis+sentinel:// or \
                         rediss+sentinel://",
                    ));
                }
                if r.key_prefix.is_empty() || r.key_prefix.contains(['{', '}', ' ']) {
                    return Err(invalid(
                        "queue.redis.key_prefix",
                        "must be non-empty without braces or spaces",
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl RelayConfig {
    fn validate_delivery(&self) -> Result<(), ConfigError> {
        let d = &self.delivery;
        for (field, v) in [
            ("delivery.max_concurrency", d.max_concurrency),
            (
                "delivery.per_destination_concurrency",
                d.per_destination_concurrency,
            ),
            (
                "delivery.max_messages_per_connection",
                d.max_messages_per_connection,
            ),
            ("delivery.dns.attempts", d.dns.attempts),
            (
                "delivery.outcome_batch.max_messages",
                d.outcome_batch.max_messages,
            ),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        // A lease shorter than a few seconds expires under a normal delivery and
        // invites duplicates; renewal runs at a third of it.
        if d.lease < Duration::from_secs(2) {
            return Err(invalid("delivery.lease", "must be at least 2s"));
        }
        // Outcomes must be written long before the lease that covers them runs out,
        // or another relay may take the message and send it again.
        if d.outcome_batch.max_delay.is_zero() || d.outcome_batch.max_delay * 3 > d.lease {
            return Err(invalid(
                "delivery.outcome_batch.max_delay",
                "must be greater than zero and at most a third of delivery.lease",
            ));
        }
        if d.wake_delay > d.poll_interval {
            return Err(invalid(
                "delivery.wake_delay",
                "must not be longer than delivery.poll_interval",
            ));
        }
        d.retry
            .validate()
            .map_err(|m| invalid("delivery.retry", m))?;
        if let Some(s) = &d.smarthost {
            if s.host.is_empty() {
                return Err(invalid("delivery.smarthost.host", "must not be empty"));
            }
            if s.port == 0 {
                return Err(invalid("delivery.smarthost.port", "must not be 0"));
            }
            if s.password.is_some() && s.username.is_none() {
                return Err(invalid(
                    "delivery.smarthost.username",
                    "a password is set but no username",
                ));
            }
            if s.username.is_some() && s.tls == TlsPolicy::Disabled {
                return Err(invalid(
                    "delivery.smarthost.tls",
                    "AUTH is only sent over TLS; it cannot be `disabled` with a username",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in d.routes.iter().enumerate() {
            let field = |f: &str| format!("delivery.routes[{i}].{f}");
            if r.domains.is_empty() {
                return Err(invalid(field("domains"), "at least one domain is required"));
            }
            for dom in r.normalized_domains() {
                let name = dom.strip_prefix('.').unwrap_or(&dom);
                if !is_valid_hostname(name) {
                    return Err(invalid(
                        field("domains"),
                        format!("{dom:?} is not a domain name or `.domain` pattern"),
                    ));
                }
                if !seen.insert(dom.clone()) {
                    return Err(invalid(
                        field("domains"),
                        format!("{dom} is already routed by an earlier route"),
                    ));
                }
            }
            if r.host.is_empty() {
                return Err(invalid(field("host"), "must not be empty"));
            }
            if r.port == 0 {
                return Err(invalid(field("port"), "must not be 0"));
            }
            if (r.password.is_some() || r.password_env.is_some()) && r.username.is_none() {
                return Err(invalid(
                    field("username"),
                    "a password is set but no username",
                ));
            }
            if r.username.is_some() && r.tls == TlsPolicy::Disabled {
                return Err(invalid(
                    field("tls"),
                    "AUTH is only sent over TLS; it cannot be `disabled` with a username",
                ));
            }
        }
        Ok(())
    }
}

fn is_valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `1d` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 2h"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(Duration::from_millis(ms))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    match ms {
        0 => "0s".into(),
        _ if ms.is_multiple_of(86_400_000) => format!("{}d", ms / 86_400_000),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

pub mod duration_str {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Duration::from_secs(n)),
            Raw::S(s) => parse_duration(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_safe_local_relay() {
        let c = RelayConfig::from_yaml("{}").unwrap();
        assert_eq!(c.listeners[0].address, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.admin.address, Some("127.0.0.1:9325".parse().unwrap()));
        assert_eq!(c.queue.effective_backend(), QueueBackendKind::Embedded);
        assert_eq!(c.queue.path, PathBuf::from("./mailrelay-data"));
        assert!(c.relay_networks.iter().all(|n| n.addr().is_loopback()));
    }

    #[test]
    fn connection_fairness_limits_parse() {
        let c = RelayConfig::from_yaml("{}").unwrap();
        assert_eq!(c.limits.reserved_connections, 50);
        assert_eq!(c.limits.evict_idle_after, Duration::from_secs(10));
        let c = RelayConfig::from_yaml(
            "limits: {max_connections: 4, reserved_connections: 9, evict_idle_after: 0s}\n",
        )
        .unwrap();
        assert_eq!(c.limits.reserved_connections, 9);
        assert!(c.limits.evict_idle_after.is_zero());
        let e = RelayConfig::from_yaml("limits: {evict_idle_after: soon}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.evict_idle_after"), "{e}");
    }

    #[test]
    fn auth_throttle_defaults_and_bad_values_are_named() {
        let c = RelayConfig::from_yaml("auth: {users_file: /u}\n").unwrap();
        let t = &c.auth.unwrap().throttle;
        assert_eq!(t.max_failures, 10);
        assert_eq!(t.delay, Duration::from_secs(1));
        assert_eq!(t.lockout, Duration::from_secs(900));
        let c = RelayConfig::from_yaml(
            "auth: {users_file: /u, throttle: {delay: 50ms, max_failures: 3, lockout: 2s}}\n",
        )
        .unwrap();
        let t = &c.auth.unwrap().throttle;
        assert_eq!((t.delay, t.max_failures), (Duration::from_millis(50), 3));
        assert_eq!(t.window, Duration::from_secs(900));
        for (yaml, field) in [
            ("{delay: 5s, max_delay: 1s}", "auth.throttle.max_delay"),
            ("{window: 0s}", "auth.throttle.window"),
            ("{lockout: 0s}", "auth.throttle.lockout"),
            ("{lockot: 1s}", "lockot"),
        ] {
            let e =
                RelayConfig::from_yaml(&format!("auth: {{users_file: /u, throttle: {yaml}}}\n"))
                    .unwrap_err()
                    .to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let e = RelayConfig::from_yaml("limits:\n  max_mesage_size: 10\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits"), "{e}");
        assert!(e.contains("max_mesage_size"), "{e}");
    }

    #[test]
    fn slow_client_limits_parse_and_are_checked() {
        let c = RelayConfig::from_yaml(
            "limits:\n  data_min_rate: 1000\n  data_rate_window: 10s\n  data_deadline: 5m\n  \
             data_oversize_drain: 0\n  max_connections_per_network: 0\n  network_prefix_v6: 48\n",
        )
        .unwrap();
        let l = &c.limits;
        assert_eq!(
            (l.data_min_rate, l.data_rate_window, l.data_deadline),
            (1000, Duration::from_secs(10), Duration::from_secs(300))
        );
        assert_eq!(
            (l.data_oversize_drain, l.max_connections_per_network),
            (0, 0)
        );
        assert_eq!((l.network_prefix_v4, l.network_prefix_v6), (24, 48));
        for (yaml, field) in [
            (
                "limits:\n  data_rate_window: 0s\n",
                "limits.data_rate_window",
            ),
            ("limits:\n  data_deadline: 0s\n", "limits.data_deadline"),
            (
                "limits:\n  network_prefix_v4: 33\n",
                "limits.network_prefix_v4",
            ),
            (
                "limits:\n  network_prefix_v6: 0\n",
                "limits.network_prefix_v6",
            ),
        ] {
            let e = RelayConfig::from_yaml(yaml).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
        // Without a minimum rate the window does not matter.
        RelayConfig::from_yaml("limits:\n  data_min_rate: 0\n  data_rate_window: 0s\n").unwrap();
    }

    #[test]
    fn invalid_values_are_named() {
        let e = RelayConfig::from_yaml("limits:\n  command_timeout: 5 parsecs\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.command_timeout"), "{e}");
        let e = RelayConfig::from_yaml("relay_networks: [0.0.0.0/0]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("relay_networks[0]") && e.contains("open relay"),
            "{e}"
        );
        let e =
            RelayConfig::from_yaml("listeners: [{name: a, address: '127.0.0.1:1', tls: implicit}]")
                .unwrap_err()
                .to_string();
        assert!(e.contains("listeners[0].tls"), "{e}");
        let e = RelayConfig::from_yaml("listeners: [{address: 'nope'}]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listeners[0].address"), "{e}");
        let e = RelayConfig::from_yaml("queue: {backend: redis}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue.redis"), "{e}");
    }

    #[test]
    fn env_overrides_secrets_and_redacts_them() {
        let mut c = RelayConfig::from_yaml("queue: {redis: {url: 'redis://127.0.0.1:1'}}").unwrap();
        c.apply_env(|k| match k {
            "MAILRELAY_REDIS_PASSWORD" => Some("hunter2".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            c.queue.redis.as_ref().unwrap().password.as_ref().unwrap().0,
            "hunter2"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn sentinel_urls_are_validated_at_load() {
        let c = RelayConfig::from_yaml(
            "queue: {redis: {url: 'redis+sentinel://:pw@s1,s2:26380/mymaster/2'}}",
        )
        .unwrap();
        assert_eq!(c.queue.effective_backend(), QueueBackendKind::Redis);
        for (yaml, want) in [
            ("url: 'redis+sentinel://:hunter2@/m'", "no sentinel hosts"),
            ("url: 'redis+sentinel://:hunter2@h'", "master name"),
            ("url: 'redis+sentinel://:hunter2@h:99999/m'", "bad port"),
            (
                "{url: 'redis+sentinel://:hunter2@h/m', cluster: true}",
                "cluster",
            ),
            ("url: 'sentinel://h/m'", "redis+sentinel://"),
        ] {
            let yaml = if yaml.starts_with('{') {
                format!("queue: {{redis: {yaml}}}")
            } else {
                format!("queue: {{redis: {{{yaml}}}}}")
            };
            let e = RelayConfig::from_yaml(&yaml).unwrap_err().to_string();
            assert!(
                e.contains("queue.redis.url") && e.contains(want),
                "{yaml}: {e}"
            );
            assert!(!e.contains("hunter2"), "{e}");
        }
        // The env override is validated too.
        let mut c = RelayConfig::from_yaml("{}").unwrap();
        let e = c
            .apply_env(|k| (k == "MAILRELAY_REDIS_URL").then(|| "redis+sentinel://h:0/m".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("queue.redis.url") && e.contains("bad port"),
            "{e}"
        );
        // Neither password shows in Debug output.
        let mut c = RelayConfig::from_yaml(
            "queue: {redis: {url: 'redis+sentinel://u:hunter2@h/m', cluster_nodes: ['redis://:hunter3@n']}}",
        )
        .unwrap();
        c.apply_env(|k| (k == "MAILRELAY_REDIS_PASSWORD").then(|| "hunter4".into()))
            .unwrap();
        let debug = format!("{c:?}");
        assert!(
            debug.contains("redis+sentinel://u:<redacted>@h/m"),
            "{debug}"
        );
        for pw in ["hunter2", "hunter3", "hunter4"] {
            assert!(!debug.contains(pw), "{debug}");
        }
    }

    #[test]
    fn queue_cache_size_is_small_by_default_and_bounded() {
        let c = RelayConfig::from_yaml("{}").unwrap();
        assert_eq!(c.queue.cache_size, 32 << 20);
        let yaml = serde_norway::to_string(&c).unwrap();
        assert!(!yaml.contains("cache_size"), "{yaml}");
        let c = RelayConfig::from_yaml("queue: {cache_size: 268435456}").unwrap();
        assert_eq!(c.queue.cache_size, 256 << 20);
        let yaml = serde_norway::to_string(&c).unwrap();
        assert!(yaml.contains("cache_size: 268435456"), "{yaml}");
        let e = RelayConfig::from_yaml("queue: {cache_size: 4096}")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("queue.cache_size") && e.contains("minimum"),
            "{e}"
        );
    }

    #[test]
    fn shutdown_settle_defaults_to_none_and_is_bounded() {
        let c = RelayConfig::from_yaml("{}").unwrap();
        assert_eq!(c.shutdown_settle, Duration::ZERO);
        let c = RelayConfig::from_yaml("shutdown_settle: 10s").unwrap();
        assert_eq!(c.shutdown_settle, Duration::from_secs(10));
        // Rendered back as it is written, so the operator's output round-trips; left
        // out when off, so configs rendered before it existed stay as they were.
        let yaml = serde_norway::to_string(&c).unwrap();
        assert!(yaml.contains("shutdown_settle: 10s"), "{yaml}");
        let yaml = serde_norway::to_string(&RelayConfig::default()).unwrap();
        assert!(!yaml.contains("shutdown_settle"), "{yaml}");
        let c = RelayConfig::from_yaml("shutdown_settle: 5m").unwrap();
        assert_eq!(c.shutdown_settle, MAX_SHUTDOWN_SETTLE);
        for (yaml, want) in [
            ("shutdown_settle: 301s", "longer than 5m"),
            ("shutdown_settle: 3600", "longer than 5m"),
            ("shutdown_settle: soon", "shutdown_settle"),
        ] {
            let e = RelayConfig::from_yaml(yaml).unwrap_err().to_string();
            assert!(
                e.contains("shutdown_settle") && e.contains(want),
                "{yaml}: {e}"
            );
        }
    }

    #[test]
    fn delivery_section_defaults_and_errors() {
        let c = RelayConfig::from_yaml("{}").unwrap();
        assert!(c.delivery.enabled);
        assert_eq!(c.delivery.max_concurrency, 50);
        assert_eq!(c.delivery.lease, Duration::from_secs(30));
        assert_eq!(c.delivery.wake_delay, Duration::from_millis(20));
        let e = RelayConfig::from_yaml("delivery: {poll_interval: 1s, wake_delay: 2s}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("delivery.wake_delay"), "{e}");
        assert_eq!(c.delivery.outcome_batch, OutcomeBatchConfig::default());
        assert_eq!(c.delivery.outcome_batch.max_messages, 32);
        let b =
            RelayConfig::from_yaml("delivery: {outcome_batch: {max_messages: 8, max_delay: 10ms}}")
                .unwrap()
                .delivery
                .outcome_batch;
        assert_eq!(
            (b.max_messages, b.max_delay),
            (8, Duration::from_millis(10))
        );
        for (yaml, field) in [
            ("{max_messages: 0}", "delivery.outcome_batch.max_messages"),
            ("{max_delay: 0s}", "delivery.outcome_batch.max_delay"),
            ("{max_delay: 2m}", "delivery.outcome_batch.max_delay"),
            ("{max_messgaes: 2}", "max_messgaes"),
        ] {
            let e = RelayConfig::from_yaml(&format!("delivery: {{outcome_batch: {yaml}}}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
        assert_eq!(c.delivery.tls, TlsPolicy::Opportunistic);
        let c = RelayConfig::from_yaml(
            "delivery: {smarthost: {host: smtp.example.com, username: u, tls: required}, retry: {first: 1s}}",
        )
        .unwrap();
        let s = c.delivery.smarthost.as_ref().unwrap();
        assert_eq!((s.port, s.tls), (587, TlsPolicy::Required));
        assert_eq!(c.delivery.retry.first, Duration::from_secs(1));
        let e = RelayConfig::from_yaml("delivery: {per_destination_concurrency: 0}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("delivery.per_destination_concurrency"), "{e}");
        let e = RelayConfig::from_yaml("delivery: {smarthost: {host: h, prot: 1}}")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("delivery.smarthost") && e.contains("prot"),
            "{e}"
        );
        let mut c = RelayConfig::from_yaml("delivery: {smarthost: {host: h}}").unwrap();
        c.apply_env(|k| (k == "MAILRELAY_SMARTHOST_USERNAME").then(|| "envuser".into()))
            .unwrap();
        assert_eq!(
            c.delivery.smarthost.as_ref().unwrap().username.as_deref(),
            Some("envuser")
        );
        let mut c =
            RelayConfig::from_yaml("delivery: {smarthost: {host: h, username: u}}").unwrap();
        c.apply_env(|k| (k == "MAILRELAY_SMARTHOST_PASSWORD").then(|| "pw".into()))
            .unwrap();
        assert!(!format!("{c:?}").contains("pw\""));
    }

    #[test]
    fn routes_are_checked_and_take_passwords_from_env() {
        let mut c = RelayConfig::from_yaml(
            "delivery: {routes: [{domains: [Partner.Example., .partner.example], host: 10.0.0.5, \
             username: u, password_env: PARTNER_PW, tls: required}]}",
        )
        .unwrap();
        let r = &c.delivery.routes[0];
        assert_eq!(r.port, 25);
        assert_eq!(
            r.normalized_domains().collect::<Vec<_>>(),
            ["partner.example", ".partner.example"]
        );
        let e = c.clone().apply_env(|_| None).unwrap_err().to_string();
        assert!(
            e.contains("delivery.routes[0].password_env") && e.contains("PARTNER_PW"),
            "{e}"
        );
        c.apply_env(|k| (k == "PARTNER_PW").then(|| "s3cret".into()))
            .unwrap();
        assert_eq!(
            c.delivery.routes[0].password.as_ref().map(|p| p.0.as_str()),
            Some("s3cret")
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        for (yaml, field) in [
            ("{domains: [], host: h}", "delivery.routes[0].domains"),
            ("{domains: ['a b'], host: h}", "delivery.routes[0].domains"),
            ("{domains: [a.test], host: ''}", "delivery.routes[0].host"),
            (
                "{domains: [a.test], host: h, port: 0}",
                "delivery.routes[0].port",
            ),
            (
                "{domains: [a.test], host: h, username: u, tls: disabled}",
                "delivery.routes[0].tls",
            ),
            (
                "{domains: [a.test], host: h, password: p}",
                "delivery.routes[0].username",
            ),
            (
                "{domains: [a.test], host: h}, {domains: [A.test], host: g}",
                "delivery.routes[1].domains",
            ),
            ("{domains: [a.test], hots: h}", "hots"),
        ] {
            let e = RelayConfig::from_yaml(&format!("delivery: {{routes: [{yaml}]}}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }

    #[test]
    fn durations_round_trip() {
        for s in ["250ms", "30s", "5m", "2h", "5d"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("1w").is_err());
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mailrelay.yaml");
        RelayConfig::from_file(&path).unwrap();
    }

    #[test]
    fn sender_binding_parses_and_bad_values_are_named() {
        let c = RelayConfig::from_yaml(
            "relay_networks: [10.1.0.0/16]\nsender_binding:\n  users: {alice: [a.example, '<>']}\n  networks: [{network: 10.1.2.0/24, senders: ['*@c.example']}]\n",
        )
        .unwrap();
        let b = c.sender_binding.unwrap();
        assert!(!b.required && !b.check_from_header);
        assert_eq!(b.users["alice"], ["a.example", "<>"]);
        for (yaml, field) in [
            ("users: {alice: []}", "sender_binding.users.alice"),
            ("users: {alice: ['<a@b>']}", "sender_binding.users.alice[0]"),
            ("users: {alice: ['a@b@c']}", "sender_binding.users.alice[0]"),
            (
                "networks: [{network: 10.2.0.0/16, senders: [x.example]}]",
                "sender_binding.networks[0].network",
            ),
            (
                "networks: [{network: 10.1.0.0/16, senders: ['']}]",
                "sender_binding.networks[0].senders[0]",
            ),
        ] {
            let e = RelayConfig::from_yaml(&format!(
                "relay_networks: [10.1.0.0/16]\nsender_binding: {{{yaml}}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }
}

// The `dkim:` section as the operator renders it (`keys_dir` holds `keys.yaml` and
// the PEM files; re-read on change). The relay's signer owns the full definition;
// these names are the agreed ones.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    /// Mail whose `From:` domain has no key: `allow` (sent unsigned) or `reject`.
    #[serde(default)]
    pub unsigned_policy: UnsignedPolicy,
    /// Per-domain exceptions to `unsigned_policy` (`*.bank.example`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsigned_overrides: Vec<UnsignedOverride>,
    /// Directory with `keys.yaml` and the PEM files it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnsignedPolicy {
    #[default]
    Allow,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnsignedOverride {
    pub domain: String,
    pub policy: UnsignedPolicy,
}
