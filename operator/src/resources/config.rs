//! MailRelay + SendQuotas -> the relay's own config ([`RelayConfig`]).
//!
//! Everything secret stays out: the Redis password (and the Redis URL when it comes
//! from a Secret) and smarthost credentials reach the pods as environment variables
//! from their Secrets (`RelayConfig::apply_env`), TLS and AUTH files as mounted
//! Secret volumes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{Resource, ResourceExt};
use mailrelay::config::rules::{self, DestinationSelector, ResponseRule, RuleScope, TenantKey};
use mailrelay::config::runtime::MAX_WORKER_THREADS;
use mailrelay::config::{
    AdminConfig, AuthConfig, ListenerConfig, LogFormat, NetworkSenders, QueueBackendKind,
    RedisConfig, RelayConfig, RemoteHost, RouteConfig, SenderBindingConfig, TlsConfig,
    parse_duration,
};
use mailrelay::quota::config as q;

use crate::crd::{self, ADMIN_PORT, MailRelay, SendQuota, TlsPolicy};

/// Where the pods find what the operator mounts.
pub const CONFIG_DIR: &str = "/etc/mailrelay";
pub const CONFIG_FILE: &str = "mailrelay.yaml";
pub const TLS_DIR: &str = "/var/run/mailrelay/tls";
pub const AUTH_DIR: &str = "/var/run/mailrelay/auth";
/// The CA bundle of `spec.delivery.caBundle`, mounted as the one file `CA_FILE`.
pub const CA_DIR: &str = "/var/run/mailrelay/ca";
pub const CA_FILE: &str = "ca.crt";
/// Defaults of `spec.shutdown`: `settle` long enough for endpoint removal to reach
/// kube-proxy and load balancers, `grace` the relay's own default.
pub const DEFAULT_SHUTDOWN_SETTLE: Duration = Duration::from_secs(10);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const MAX_SHUTDOWN_SETTLE: Duration = Duration::from_secs(300);
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);
/// Added to `settle + grace` for `terminationGracePeriodSeconds`: after the grace
/// the relay closes what is left with `421` (up to 5 s) and hands its delivery
/// leases back to Redis before it exits.
pub const TERMINATION_MARGIN: Duration = Duration::from_secs(15);

/// Always in the rendered `relay_networks`, whatever `spec.relayNetworks` says.
/// Loopback inside a pod is reachable only from the pod itself and through
/// `kubectl port-forward`, which needs RBAC `pods/portforward` on the relay's
/// namespace: whoever has that may relay, as the README's quickstart needs
/// (`swaks --server 127.0.0.1` through a port-forward). Two things could make
/// loopback mean more, and both are dealt with: a PROXY protocol header claiming
/// a loopback source gets no relay rights from the relay (anyone can write one);
/// and a service-mesh sidecar that intercepts inbound traffic would connect from
/// loopback on every client's behalf, so the pods tell the known meshes to leave
/// the SMTP ports alone (see `MESH_SKIP_INBOUND` in `resources`).
pub const LOOPBACK_NETWORKS: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// The Redis URL in the ConfigMap when `spec.redis.urlSecret` is set: the relay
/// needs one in its config file, and `MAILRELAY_REDIS_URL` (from the Secret)
/// replaces it at start-up. `.invalid` never resolves (RFC 6761), so a pod that
/// somehow ran without the variable fails to connect instead of reaching a real host.
pub const REDIS_URL_PLACEHOLDER: &str = "redis://redis-url-from-secret.invalid:6379";

/// URL schemes a Redis URL may have (the relay's `queue.redis.url`).
const REDIS_SCHEMES: [&str; 6] = [
    "redis://",
    "rediss://",
    "unix://",
    "redis+unix://",
    "redis+sentinel://",
    "rediss+sentinel://",
];

/// Whether `url` names Redis Sentinel (`redis+sentinel://`, `rediss+sentinel://`).
pub fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
}

/// What is wrong with Redis URL `url` used with `redis` (its scheme, or Sentinel
/// with `cluster`), as a message that never repeats the URL: one from a Secret may
/// carry a password. The CRD schema checks an inline URL the same way.
pub fn redis_url_problem(url: &str, redis: &crd::RedisSpec) -> Option<String> {
    let rest = REDIS_SCHEMES
        .iter()
        .find_map(|s| url.strip_prefix(s))
        .filter(|rest| !rest.is_empty());
    if rest.is_none() {
        return Some(
            "must be a URL starting with redis://, rediss://, unix://, redis+unix://, \
             redis+sentinel:// or rediss+sentinel://"
                .into(),
        );
    }
    if is_sentinel_url(url) && (redis.cluster || !redis.cluster_nodes.is_empty()) {
        return Some(
            "a redis+sentinel:// URL names a Sentinel-managed primary: it cannot be \
             combined with spec.redis.cluster: true or spec.redis.clusterNodes"
                .into(),
        );
    }
    None
}

/// Checks `spec.redis` on its own: exactly one of `url` and `urlSecret`, and an
/// inline URL that fits the other fields.
pub fn check_redis(redis: &crd::RedisSpec) -> Result<(), SpecError> {
    match (&redis.url, &redis.url_secret) {
        (Some(_), Some(_)) => Err(spec_err(
            "spec.redis.urlSecret",
            "set exactly one of spec.redis.url and spec.redis.urlSecret, not both",
        )),
        (None, None) => Err(spec_err(
            "spec.redis.url",
            "set exactly one of spec.redis.url (inline) and spec.redis.urlSecret (the URL from a Secret)",
        )),
        (Some(url), None) => match redis_url_problem(url, redis) {
            Some(m) if is_sentinel_url(url) => Err(spec_err("spec.redis.cluster", m)),
            Some(m) => Err(spec_err("spec.redis.url", m)),
            None => Ok(()),
        },
        (None, Some(_)) => Ok(()),
    }
}

/// A spec the operator cannot turn into a relay config (the CRD schema catches most
/// of these at `kubectl apply`; this is the backstop). `field` is the path in the
/// resource, like `spec.relayNetworks[2]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn spec_err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

/// The relay config of `relay` with `quotas` (already converted, see [`quota_config`]).
pub fn relay_config(
    relay: &MailRelay,
    quotas: Vec<q::QuotaConfig>,
) -> Result<RelayConfig, SpecError> {
    relay_config_with_rules(relay, quotas, Vec::new())
}

/// [`relay_config`] with the SendQuotas' response rules ([`select_quota_rules`]),
/// after the relay's own.
pub fn relay_config_with_rules(
    relay: &MailRelay,
    quotas: Vec<q::QuotaConfig>,
    quota_rules: Vec<ResponseRule>,
) -> Result<RelayConfig, SpecError> {
    let spec = &relay.spec;
    let mut cfg = RelayConfig {
        hostname: spec.hostname.clone(),
        ..RelayConfig::default()
    };
    cfg.listeners = spec
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let port = u16::try_from(l.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| spec_err(format!("spec.listeners[{i}].port"), "must be 1-65535"))?;
            Ok(ListenerConfig {
                name: l.name.clone(),
                address: SocketAddr::from(([0, 0, 0, 0], port)),
                tls: l.tls,
                proxy_protocol: l.proxy_protocol,
            })
        })
        .collect::<Result<_, SpecError>>()?;
    cfg.relay_networks = spec
        .relay_networks
        .iter()
        .enumerate()
        .map(|(i, n)| {
            n.parse::<IpNet>().map_err(|_| {
                spec_err(
                    format!("spec.relayNetworks[{i}]"),
                    format!("{n:?} is not a network like 10.0.0.0/8"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    for lo in LOOPBACK_NETWORKS {
        let lo: IpNet = lo.parse().expect("a valid network");
        if !cfg.relay_networks.iter().any(|n| n.contains(&lo)) {
            cfg.relay_networks.push(lo);
        }
    }
    cfg.runtime.worker_threads = worker_threads(spec);
    let (settle, grace) = shutdown_durations(relay)?;
    cfg.shutdown_settle = settle;
    cfg.shutdown_grace = grace;
    if spec.tls.is_some() {
        cfg.tls = Some(TlsConfig {
            cert_file: format!("{TLS_DIR}/tls.crt").into(),
            key_file: format!("{TLS_DIR}/tls.key").into(),
            reload_interval: std::time::Duration::from_secs(10),
        });
    }
    if spec.auth.is_some() {
        cfg.auth = Some(AuthConfig {
            users_file: format!("{AUTH_DIR}/users").into(),
            throttle: Default::default(),
        });
    }
    check_redis(&spec.redis)?;
    cfg.queue.backend = Some(QueueBackendKind::Redis);
    cfg.queue.redis = Some(RedisConfig {
        url: spec
            .redis
            .url
            .clone()
            .unwrap_or_else(|| REDIS_URL_PLACEHOLDER.into()),
        password: None,
        cluster: spec.redis.cluster,
        cluster_nodes: spec.redis.cluster_nodes.clone(),
        key_prefix: spec.redis.key_prefix.clone().unwrap_or_else(|| "mr".into()),
        wait_replicas: spec.redis.wait_replicas,
        wait_timeout: match &spec.redis.wait_timeout {
            Some(t) => parse_duration(t).map_err(|m| spec_err("spec.redis.waitTimeout", m))?,
            None => mailrelay::config::default_wait_timeout(),
        },
        fresh_list: mailrelay::config::default_fresh_list(),
    });
    if let Some(d) = &spec.delivery {
        if let Some(t) = d.tls {
            cfg.delivery.tls = t;
        }
        if let Some(s) = &d.smarthost {
            let port = u16::try_from(s.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| spec_err("spec.delivery.smarthost.port", "must be 1-65535"))?;
            cfg.delivery.smarthost = Some(RemoteHost {
                host: s.host.clone(),
                port,
                tls: s.tls,
                ca_file: ca_file(relay),
                username: None,
                password: None,
            });
        }
        if let Some(n) = d.max_concurrency {
            cfg.delivery.max_concurrency = n as usize;
        }
        if let Some(n) = d.per_destination_concurrency {
            cfg.delivery.per_destination_concurrency = n as usize;
        }
        if let Some(n) = d.max_messages_per_connection {
            cfg.delivery.max_messages_per_connection = n as usize;
        }
        if let Some(t) = &d.connect_timeout {
            cfg.delivery.connect_timeout =
                parse_duration(t).map_err(|m| spec_err("spec.delivery.connectTimeout", m))?;
        }
        if let Some(t) = &d.lease {
            let lease = parse_duration(t).map_err(|m| spec_err("spec.delivery.lease", m))?;
            if lease < Duration::from_secs(2) {
                return Err(spec_err("spec.delivery.lease", "must be at least 2s"));
            }
            cfg.delivery.lease = lease;
        }
        cfg.delivery.routes = d
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| route_config(i, r, ca_file(relay)))
            .collect::<Result<_, _>>()?;
        if let Some(r) = &d.retry {
            let retry = &mut cfg.delivery.retry;
            for (field, value, slot) in [
                ("first", &r.first, &mut retry.first),
                ("max", &r.max, &mut retry.max_backoff),
                ("maxLifetime", &r.max_lifetime, &mut retry.max_lifetime),
            ] {
                if let Some(v) = value {
                    *slot = parse_duration(v)
                        .map_err(|m| spec_err(format!("spec.delivery.retry.{field}"), m))?;
                }
            }
        }
        if let Some(w) = &d.delay_warning {
            let w = parse_duration(w).map_err(|m| spec_err("spec.delivery.delayWarning", m))?;
            // Checked here rather than left to the relay, whose message names its
            // own `retry.delay_warning`.
            if w.is_zero() || w >= cfg.delivery.retry.max_lifetime {
                return Err(spec_err(
                    "spec.delivery.delayWarning",
                    format!(
                        "must be greater than zero and shorter than spec.delivery.retry.maxLifetime ({})",
                        d.retry
                            .as_ref()
                            .and_then(|r| r.max_lifetime.as_deref())
                            .unwrap_or("5d")
                    ),
                ));
            }
            cfg.delivery.retry.delay_warning = Some(w);
        }
    }
    if let Some(l) = &spec.limits {
        if let Some(n) = l.max_message_size {
            cfg.limits.max_message_size = n;
        }
        if let Some(n) = l.max_recipients {
            cfg.limits.max_recipients = n as usize;
        }
        if let Some(n) = l.max_connections {
            cfg.limits.max_connections = n as usize;
        }
    }
    cfg.admin = AdminConfig {
        address: Some(SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT as u16))),
        // The operator's `NAME-admin-token` Secret, mounted by the Deployment (see
        // `admin_token`): without it a relay on 0.0.0.0 would refuse `/api/`.
        token_file: Some(PathBuf::from(crate::admin_token::token_file())),
    };
    cfg.log.format = LogFormat::Json;
    cfg.quotas = quotas;
    if let Some(b) = &spec.sender_binding {
        cfg.sender_binding = Some(sender_binding(b, &cfg.relay_networks)?);
    }
    cfg.dkim = Some(super::dkim::relay_dkim(spec)?);
    cfg.providers = spec.providers.clone().unwrap_or_default();
    cfg.response_rules = spec.response_rules.clone();
    cfg.response_rules.extend(quota_rules);
    cfg.webhooks = spec
        .webhooks
        .iter()
        .enumerate()
        .map(|(i, w)| webhook_config(i, w))
        .collect::<Result<_, _>>()?;
    if let Some(e) = &spec.events {
        if let Some(on) = e.enabled {
            cfg.events.enabled = on;
        }
        if let Some(n) = e.max_len {
            cfg.events.max_len = n;
        }
    }
    cfg.validate().map_err(|e| match e {
        mailrelay::config::ConfigError::Invalid { field, message } => {
            spec_err(relay_field(&field), message)
        }
        other => spec_err("spec", other.to_string()),
    })?;
    Ok(cfg)
}

/// Where the Deployment mounts the webhooks' signing keys, one file per webhook
/// (named like it).
pub const WEBHOOK_DIR: &str = "/var/run/mailrelay/webhooks";

/// One `spec.webhooks` entry as the relay's `webhooks[]`: the key is the file the
/// `webhooks` volume projects from the entry's Secret key.
fn webhook_config(
    i: usize,
    w: &crate::crd::WebhookSpec,
) -> Result<mailrelay::config::WebhookConfig, SpecError> {
    use mailrelay::config::events::{WebhookRetry, WebhookTenants};
    let field = |f: &str| format!("spec.webhooks[{i}].{f}");
    let duration = |f: &str, v: &Option<String>, default: Duration| match v {
        Some(v) => parse_duration(v).map_err(|m| spec_err(field(f), m)),
        None => Ok(default),
    };
    let defaults = WebhookRetry::default();
    let r = w.retry.clone().unwrap_or_default();
    let retry = WebhookRetry {
        initial: duration("retry.initial", &r.initial, defaults.initial)?,
        max: duration("retry.max", &r.max, defaults.max)?,
        max_attempts: r.max_attempts.unwrap_or(defaults.max_attempts),
    };
    // Checked here so that the message names the fields as the spec spells them.
    if retry.max < retry.initial {
        return Err(spec_err(
            field("retry.max"),
            format!(
                "{} is shorter than retry.initial ({})",
                mailrelay::config::format_duration(retry.max),
                mailrelay::config::format_duration(retry.initial)
            ),
        ));
    }
    Ok(mailrelay::config::WebhookConfig {
        name: w.name.clone(),
        url: w.url.clone(),
        secret: None,
        secret_file: Some(PathBuf::from(format!("{WEBHOOK_DIR}/{}", w.name))),
        tenants: WebhookTenants {
            all: w.tenants.all,
            auth_users: w.tenants.auth_users.clone(),
            sender_domains: w.tenants.sender_domains.clone(),
        },
        kinds: w.kinds.iter().map(|k| k.as_str().to_owned()).collect(),
        allow_http: false,
        ca_file: None,
        timeout: duration("timeout", &w.timeout, Duration::from_secs(10))?,
        retry,
        batch: webhook_batch(&w.batch, &field)?,
    })
}

/// `spec.webhooks[].batch` with the relay's defaults for what it leaves out; the
/// bounds are the relay's (its check names the spec's field).
fn webhook_batch(
    b: &Option<crate::crd::WebhookBatchSpec>,
    field: &dyn Fn(&str) -> String,
) -> Result<mailrelay::config::events::WebhookBatch, SpecError> {
    let mut batch = mailrelay::config::events::WebhookBatch::default();
    let Some(b) = b else {
        return Ok(batch);
    };
    if let Some(n) = b.max_events {
        batch.max_events = n as usize;
    }
    if let Some(l) = &b.linger {
        batch.linger = parse_duration(l).map_err(|m| spec_err(field("batch.linger"), m))?;
    }
    Ok(batch)
}

/// `spec.senderBinding` as the relay's `sender_binding`, checked here so that each
/// problem names its MailRelay field (the relay's own messages name users by name,
/// the spec's list by index).
fn sender_binding(
    b: &crd::SenderBindingSpec,
    relay_networks: &[IpNet],
) -> Result<SenderBindingConfig, SpecError> {
    const FIELD: &str = "spec.senderBinding";
    let patterns = |field: String, senders: &[String]| {
        if senders.is_empty() {
            return Err(spec_err(field, "needs at least one sender pattern"));
        }
        for (j, p) in senders.iter().enumerate() {
            let ok = p == "<>"
                || (!p.is_empty()
                    && !p.contains(['<', '>', ','])
                    && !p.contains(char::is_whitespace)
                    && p.matches('@').count() <= 1);
            if !ok {
                return Err(spec_err(
                    format!("{field}[{j}]"),
                    format!(
                        "{p:?} is not a domain glob (a.example, *.a.example), an address glob \
                         (*@a.example, app@a.example) or \"<>\""
                    ),
                ));
            }
        }
        Ok(senders.to_vec())
    };
    let mut users = std::collections::BTreeMap::new();
    for (i, u) in b.users.iter().enumerate() {
        let field = format!("{FIELD}.users[{i}]");
        if u.user.is_empty() || u.user.contains(':') || u.user.contains(char::is_whitespace) {
            return Err(spec_err(
                format!("{field}.user"),
                "must be an AUTH user name (no spaces or colons)",
            ));
        }
        let senders = patterns(format!("{field}.senders"), &u.senders)?;
        if users.insert(u.user.clone(), senders).is_some() {
            return Err(spec_err(
                format!("{field}.user"),
                format!("{:?} is bound twice", u.user),
            ));
        }
    }
    let mut networks = Vec::new();
    for (i, n) in b.networks.iter().enumerate() {
        let field = format!("{FIELD}.networks[{i}]");
        let network: IpNet = n.network.parse().map_err(|_| {
            spec_err(
                format!("{field}.network"),
                format!("{:?} is not a network like 10.1.0.0/16", n.network),
            )
        })?;
        // A binding for clients that may not relay would never apply.
        if !relay_networks.iter().any(|r| r.contains(&network)) {
            return Err(spec_err(
                format!("{field}.network"),
                format!("{network} is not inside spec.relayNetworks"),
            ));
        }
        networks.push(NetworkSenders {
            network,
            senders: patterns(format!("{field}.senders"), &n.senders)?,
        });
    }
    Ok(SenderBindingConfig {
        required: b.required,
        check_from_header: b.check_from_header,
        users,
        networks,
    })
}

/// The environment variable that carries the password of route `i` (set from
/// `spec.delivery.routes[i].auth.passwordSecret`).
pub fn route_password_env(i: usize) -> String {
    format!("MAILRELAY_ROUTE_{i}_PASSWORD")
}

fn route_config(
    i: usize,
    r: &crd::RouteSpec,
    ca_file: Option<PathBuf>,
) -> Result<RouteConfig, SpecError> {
    let field = |f: &str| format!("spec.delivery.routes[{i}].{f}");
    let port = u16::try_from(r.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| spec_err(field("port"), "must be 1-65535"))?;
    if r.auth.is_some() && r.tls == TlsPolicy::Disabled {
        return Err(spec_err(
            field("tls"),
            "credentials are only ever sent over TLS: tls cannot be disabled with auth",
        ));
    }
    Ok(RouteConfig {
        domains: r.domains.clone(),
        remote: RemoteHost {
            host: r.host.clone(),
            port,
            tls: r.tls,
            ca_file,
            username: r.auth.as_ref().map(|a| a.username.clone()),
            password: None,
        },
        password_env: r.auth.as_ref().map(|_| route_password_env(i)),
    })
}

/// The file the relay reads `spec.delivery.caBundle` from, when there is one: the
/// smarthost's and the routes' `ca_file` (not the MX hosts': they have public
/// certificates, and a `ca_file` replaces the system store).
pub fn ca_file(relay: &MailRelay) -> Option<PathBuf> {
    relay
        .spec
        .delivery
        .as_ref()
        .and_then(|d| d.ca_bundle.as_ref())
        .map(|_| PathBuf::from(format!("{CA_DIR}/{CA_FILE}")))
}

/// Worker threads for the CPU the relay container asks for: its CPU limit, else its
/// request, rounded up (the default request of 100m: one). Without either, tokio's
/// default (the node's CPUs, fewer under a cgroup limit). A thread per core the pod
/// may not get costs more than it brings: tasks handed between threads and threads
/// woken from sleep took a quarter of a relay's CPU per message where other busy
/// processes shared its cores (docs/capacity.md, "Worker threads").
pub fn worker_threads(spec: &crd::MailRelaySpec) -> Option<usize> {
    let r = super::deployment::container_resources(spec);
    let cpu = |m: &Option<std::collections::BTreeMap<String, Quantity>>| {
        m.as_ref()?.get("cpu").and_then(|q| millicores(&q.0))
    };
    let milli = cpu(&r.limits).or_else(|| cpu(&r.requests))?;
    let threads = milli.div_ceil(1000).max(1);
    Some(usize::try_from(threads).map_or(MAX_WORKER_THREADS, |t| t.min(MAX_WORKER_THREADS)))
}

/// A CPU quantity (`2`, `1.5`, `250m`) in millicores; `None` for a form a CPU
/// quantity does not take in practice (exponents, binary suffixes): the relay then
/// keeps tokio's default.
fn millicores(q: &str) -> Option<u64> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<u64>().ok();
    }
    let (whole, frac) = q.split_once('.').unwrap_or((q, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().ok()?
    };
    whole.checked_mul(1000)?.checked_add(frac)
}

/// `spec.shutdown` as (settle, grace), defaults filled in and bounds checked.
pub fn shutdown_durations(relay: &MailRelay) -> Result<(Duration, Duration), SpecError> {
    let sh = relay.spec.shutdown.clone().unwrap_or_default();
    let mut out = [DEFAULT_SHUTDOWN_SETTLE, DEFAULT_SHUTDOWN_GRACE];
    for ((field, value, max), slot) in [
        ("settle", &sh.settle, MAX_SHUTDOWN_SETTLE),
        ("grace", &sh.grace, MAX_SHUTDOWN_GRACE),
    ]
    .into_iter()
    .zip(&mut out)
    {
        if let Some(v) = value {
            let d = parse_duration(v).map_err(|m| spec_err(format!("spec.shutdown.{field}"), m))?;
            if d > max {
                return Err(spec_err(
                    format!("spec.shutdown.{field}"),
                    format!(
                        "{v:?} is longer than {}",
                        mailrelay::config::format_duration(max)
                    ),
                ));
            }
            *slot = d;
        }
    }
    Ok((out[0], out[1]))
}

/// Names a relay config field in MailRelay terms, for the few checks only the relay
/// makes: `relay_networks[0]` -> `spec.relayNetworks[0]`.
fn relay_field(field: &str) -> String {
    let split = field.find(['.', '[']).unwrap_or(field.len());
    let (head, rest) = field.split_at(split);
    let (mapped, rest) = match head {
        "hostname" => ("spec.hostname", rest),
        "relay_networks" => ("spec.relayNetworks", rest),
        "listeners" => ("spec.listeners", rest),
        "limits" => ("spec.limits", rest),
        "webhooks" => (
            "spec.webhooks",
            // The secret comes from a Secret: name the field the user writes.
            if rest.ends_with(".secret_file") || rest.ends_with(".secret") {
                return format!(
                    "spec.webhooks{}.secretRef",
                    rest.rsplit_once('.').map_or("", |(a, _)| a)
                );
            } else {
                rest
            },
        ),
        "delivery" => {
            // Route credentials are spelt differently in the spec.
            let rest = if rest.starts_with(".routes[") {
                rest.replace(".password_env", ".auth.passwordSecret")
                    .replace(".username", ".auth.username")
            } else {
                rest.to_owned()
            };
            return format!("spec.delivery{}", camel_path(&rest));
        }
        "queue" => ("spec.redis", rest.strip_prefix(".redis").unwrap_or("")),
        "response_rules" => ("spec.responseRules", rest),
        "providers" => ("spec.providers", rest),
        "events" => ("spec.events", rest),
        _ => return format!("spec ({field})"),
    };
    format!("{mapped}{}", camel_path(rest))
}

/// One SendQuota as a relay quota, checked on its own so that one bad quota never
/// keeps a relay from getting the others.
pub fn quota_config(sq: &SendQuota) -> Result<q::QuotaConfig, SpecError> {
    let s = &sq.spec;
    let limits = s
        .limits
        .iter()
        .enumerate()
        .map(|(i, l)| q::Limit::parse(l).map_err(|m| spec_err(format!("spec.limits[{i}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    let m = s.match_.clone().unwrap_or_default();
    let client_networks = m
        .client_networks
        .iter()
        .enumerate()
        .map(|(i, n)| {
            n.parse::<IpNet>().map_err(|_| {
                spec_err(
                    format!("spec.match.clientNetworks[{i}]"),
                    format!("{n:?} is not a network like 10.1.0.0/16"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = q::QuotaConfig {
        name: sq.name_any(),
        direction: s.direction,
        matcher: q::QuotaMatch {
            senders: m.senders,
            auth_users: m.auth_users,
            client_networks,
            recipient_domains: m.recipient_domains,
            destination_domains: m.destination_domains,
            mx_hosts: m.mx_hosts,
            smarthost: m.smarthost,
        },
        limits,
        unit: s.unit,
        scope: s.scope,
        key: s.key,
        action: s.action.unwrap_or_default(),
        max_connections: s.max_connections,
    };
    q::validate(std::slice::from_ref(&cfg)).map_err(|(field, message)| {
        // `quotas[0].match.senders[1]` -> `spec.match.senders[1]`
        let field = field
            .strip_prefix("quotas[0]")
            .unwrap_or(&field)
            .trim_start_matches('.');
        let field = camel_path(field);
        spec_err(
            if field.is_empty() || field == "name" {
                "metadata.name".to_owned()
            } else {
                format!("spec.{field}")
            },
            message,
        )
    })?;
    Ok(cfg)
}

/// The name a SendQuota's rule has in the relay config: `<quota>.<rule>` (rule
/// names are one namespace per relay; the prefix also tells which SendQuota a
/// shaping state came from).
pub fn quota_rule_name(quota: &str, rule: &str) -> String {
    format!("{quota}.{rule}")
}

/// A SendQuota's `spec.responseRules` as the relay gets them, checked on their
/// own: names prefixed ([`quota_rule_name`]); a rule without destination takes
/// the egress quota's `match`; an ingress quota's `match.senders` /
/// `match.authUsers` become every rule's sender filter (the relay's
/// `match.senders` / `match.auth_users`), so its rules take replies to that
/// mail only and hold only that mail; with `scope: tenant` and no `tenantKey`,
/// tenants are told apart as the quota tells them (`key: authUser`: by AUTH
/// user; else the relay's default, the sender domain).
pub fn quota_rules(sq: &SendQuota) -> Result<Vec<ResponseRule>, SpecError> {
    let s = &sq.spec;
    let quota = sq.name_any();
    let m = s.match_.clone().unwrap_or_default();
    // CEL keeps senders and authUsers off egress quotas; checked here all the
    // same, as an egress quota's rules are about every sender.
    let (senders, auth_users) = if s.direction == q::Direction::Ingress {
        (m.senders.clone(), m.auth_users.clone())
    } else {
        (Vec::new(), Vec::new())
    };
    let filtered = !senders.is_empty() || !auth_users.is_empty();
    let inherited = if s.direction == q::Direction::Egress {
        DestinationSelector {
            mx_hosts: m.mx_hosts,
            destination_domains: m.destination_domains,
            smarthost: m.smarthost,
        }
    } else {
        DestinationSelector::default()
    };
    let mut out: Vec<ResponseRule> = Vec::with_capacity(s.response_rules.len());
    for (i, r) in s.response_rules.iter().enumerate() {
        let f = format!("spec.responseRules[{i}]");
        if out
            .iter()
            .any(|o| o.name == quota_rule_name(&quota, &r.name))
        {
            return Err(spec_err(
                format!("{f}.name"),
                format!("{:?} is used twice", r.name),
            ));
        }
        let mut r = r.clone();
        if r.destination.is_empty() {
            if inherited.is_empty() {
                return Err(spec_err(
                    format!("{f}.destination"),
                    "give mxHosts, destinationDomains or smarthost: true (only an egress quota whose match names a destination lends it to its rules)",
                ));
            }
            r.destination = inherited.clone();
        }
        if r.scope == RuleScope::Tenant && r.tenant_key.is_none() && s.key == q::KeyBy::AuthUser {
            r.tenant_key = Some(TenantKey::AuthUser);
        }
        if filtered {
            if r.matcher.has_sender_filter() {
                let field = if r.matcher.senders.is_empty() {
                    "match.authUsers"
                } else {
                    "match.senders"
                };
                return Err(spec_err(
                    format!("{f}.{field}"),
                    "the quota's match.senders / match.authUsers already limit its rules; leave it out",
                ));
            }
            if r.throttle.is_some_and(|t| t.max_connections.is_some()) {
                return Err(spec_err(
                    format!("{f}.throttle.maxConnections"),
                    "not in a quota whose match names senders or authUsers: its rules act on that mail only, and connections carry every tenant's mail",
                ));
            }
            r.matcher.senders = senders.clone();
            r.matcher.auth_users = auth_users.clone();
        }
        rules::validate_rule(&f, &r).map_err(|(field, message)| {
            spec_err(
                camel_path(&field),
                message
                    .replace("max_connections", "maxConnections")
                    .replace("auth_users", "authUsers"),
            )
        })?;
        let full = quota_rule_name(&quota, &r.name);
        if full.len() > 63 {
            return Err(spec_err(
                format!("{f}.name"),
                format!(
                    "the relay knows the rule as {full:?}: the SendQuota's name, '.' and the rule's name must fit 63 characters"
                ),
            ));
        }
        r.name = full;
        out.push(r);
    }
    Ok(out)
}

/// The response rules of the SendQuotas selecting `relay` (valid quotas only, in
/// name order), to follow the relay's own in its config; and the quotas whose
/// rules were left out, with why (their rules go in whole or not at all, so
/// first-match-wins stays as written).
pub fn select_quota_rules(
    relay: &MailRelay,
    all: &[SendQuota],
) -> (Vec<ResponseRule>, Vec<(String, SpecError)>) {
    let mut chosen: Vec<&SendQuota> = all
        .iter()
        .filter(|q| {
            q.meta().deletion_timestamp.is_none()
                && !q.spec.response_rules.is_empty()
                && selects(q, relay)
                && quota_config(q).is_ok()
        })
        .collect();
    chosen.sort_by_key(|q| q.name_any());
    let providers = relay.spec.providers.clone().unwrap_or_default();
    let own = relay.spec.response_rules.len();
    let mut rules = relay.spec.response_rules.clone();
    // A relay whose own rules are refused is reported on the MailRelay; the
    // quotas' rules cannot be judged against it.
    let relay_ok = rules::validate(&rules, &providers).is_ok();
    let mut bad = Vec::new();
    for sq in chosen {
        let converted = quota_rules(sq).and_then(|qr| {
            if !relay_ok {
                return Ok(qr);
            }
            let mut trial = rules.clone();
            trial.extend(qr.iter().cloned());
            match rules::validate(&trial, &providers) {
                Ok(()) => Ok(qr),
                Err((field, message)) => {
                    // `response_rules[N].x` -> the quota's own index.
                    let index = field
                        .strip_prefix("response_rules[")
                        .and_then(|r| r.split_once(']'))
                        .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)));
                    let field = match index {
                        Some((n, rest)) if n >= rules.len() => {
                            format!(
                                "spec.responseRules[{}]{}",
                                n - rules.len(),
                                camel_path(rest)
                            )
                        }
                        _ => "spec.responseRules".to_owned(),
                    };
                    Err(spec_err(
                        field,
                        format!("on MailRelay {}: {message}", relay.name_any()),
                    ))
                }
            }
        });
        match converted {
            Ok(qr) => rules.extend(qr),
            Err(e) => bad.push((sq.name_any(), e)),
        }
    }
    (rules.split_off(own), bad)
}

/// Whether egress quota `q` can match any mail along `relay`'s delivery paths
/// (see [`mailrelay::quota::config::never_matches`]): a quota that cannot is
/// left out of that relay's config (the relay would refuse it) and reported on
/// the SendQuota. A relay whose own spec is invalid is reported on the relay.
pub fn quota_reach(q: &q::QuotaConfig, relay: &MailRelay) -> Result<(), SpecError> {
    let Ok(cfg) = relay_config(relay, Vec::new()) else {
        return Ok(());
    };
    match q::never_matches(q, &cfg.delivery) {
        None => Ok(()),
        Some((field, message)) => Err(spec_err(
            format!("spec.{}", camel_path(field)),
            format!("on MailRelay {}: {message}", relay.name_any()),
        )),
    }
}

/// `match.auth_users[0]` -> `match.authUsers[0]`.
fn camel_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut upper = false;
    for c in path.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a SendQuota's `relaySelector` selects `relay` (same namespace assumed).
pub fn selects(sq: &SendQuota, relay: &MailRelay) -> bool {
    relay_selected(sq.spec.relay_selector.as_ref(), relay)
}

/// Whether a `relaySelector` (none: every relay) selects `relay`.
pub fn relay_selected(
    sel: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    relay: &MailRelay,
) -> bool {
    let Some(sel) = sel else {
        return true;
    };
    let labels = relay.labels();
    if let Some(ml) = &sel.match_labels
        && !ml.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // An operator the API server would have refused: select nothing rather
            // than apply a quota to relays it was not meant for.
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_in_millicores() {
        for (q, m) in [
            ("2", Some(2000)),
            ("1.5", Some(1500)),
            ("0.25", Some(250)),
            (".5", Some(500)),
            ("250m", Some(250)),
            ("1500m", Some(1500)),
            ("0.0005", None),
            ("1e3", None),
            ("1Ki", None),
            ("-1", None),
            ("", None),
            (".", None),
            ("m", None),
        ] {
            assert_eq!(millicores(q), m, "{q:?}");
        }
    }

    fn spec_with(resources: &str) -> crd::MailRelaySpec {
        serde_norway::from_str(&format!(
            "hostname: mail.example.com\nredis: {{url: 'redis://r:6379'}}\n{resources}"
        ))
        .unwrap()
    }

    #[test]
    fn worker_threads_follow_the_cpu_the_container_asks_for() {
        // No resources: the default request of 100m.
        assert_eq!(worker_threads(&spec_with("")), Some(1));
        let r = |y: &str| worker_threads(&spec_with(&format!("resources: {y}\n")));
        assert_eq!(r("{requests: {cpu: 500m}}"), Some(1));
        assert_eq!(r("{requests: {cpu: '2'}}"), Some(2));
        assert_eq!(r("{requests: {cpu: 2001m}}"), Some(3));
        // A limit is what the pod may use at most: it wins over the request.
        assert_eq!(r("{requests: {cpu: '1'}, limits: {cpu: '4'}}"), Some(4));
        assert_eq!(r("{limits: {cpu: 1500m}}"), Some(2));
        assert_eq!(r("{requests: {cpu: '100000'}}"), Some(MAX_WORKER_THREADS));
        // Memory only, or a quantity read no further: tokio's default.
        assert_eq!(r("{requests: {memory: 1Gi}}"), None);
        assert_eq!(r("{requests: {cpu: '1e3'}}"), None);
    }

    #[test]
    fn the_rendered_config_carries_the_worker_threads() {
        let relay = MailRelay::new("r", spec_with("resources: {requests: {cpu: '3'}}\n"));
        let cfg = relay_config(&relay, Vec::new()).unwrap();
        assert_eq!(cfg.runtime.worker_threads, Some(3));
        let text = serde_norway::to_string(&cfg).unwrap();
        let back = RelayConfig::from_yaml(&text).unwrap();
        assert_eq!(back.runtime.worker_threads, Some(3));
    }

    #[test]
    fn camel_paths() {
        assert_eq!(camel_path("match.auth_users[0]"), "match.authUsers[0]");
        assert_eq!(camel_path("max_connections"), "maxConnections");
        assert_eq!(relay_field("relay_networks[2]"), "spec.relayNetworks[2]");
        assert_eq!(
            relay_field("limits.max_recipients"),
            "spec.limits.maxRecipients"
        );
        assert_eq!(relay_field("queue.redis.url"), "spec.redis.url");
        assert_eq!(relay_field("shutdown_grace"), "spec (shutdown_grace)");
        assert_eq!(
            relay_field("delivery.routes[3].domains"),
            "spec.delivery.routes[3].domains"
        );
        assert_eq!(
            relay_field("delivery.routes[0].password_env"),
            "spec.delivery.routes[0].auth.passwordSecret"
        );
        assert_eq!(
            relay_field("delivery.routes[1].username"),
            "spec.delivery.routes[1].auth.username"
        );
        assert_eq!(
            relay_field("delivery.smarthost.username"),
            "spec.delivery.smarthost.username"
        );
    }

    fn redis(yaml: &str) -> crd::RedisSpec {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn exactly_one_redis_url_and_sentinel_without_cluster() {
        for ok in [
            "url: redis://r:6379/0",
            "url: 'unix:///run/redis.sock'",
            "{url: 'redis://r:6379', cluster: true, clusterNodes: ['redis://s:6379']}",
            "url: 'redis+sentinel://s1:26379,s2:26379/mymaster/2'",
            "url: 'rediss+sentinel://:pw@s1:26379/mymaster'",
            "urlSecret: {name: redis-url, key: url}",
            // Only the Secret's value can tell whether this is Sentinel.
            "{urlSecret: {name: redis-url, key: url}, cluster: true}",
        ] {
            assert_eq!(check_redis(&redis(ok)), Ok(()), "{ok}");
        }
        for (bad, field, needle) in [
            (
                "{url: 'redis://r', urlSecret: {name: u, key: url}}",
                "spec.redis.urlSecret",
                "not both",
            ),
            ("{cluster: true}", "spec.redis.url", "exactly one"),
            ("url: 'http://r'", "spec.redis.url", "redis+sentinel://"),
            ("url: 'redis://'", "spec.redis.url", "starting with"),
            (
                "{url: 'redis+sentinel://s:26379/m', cluster: true}",
                "spec.redis.cluster",
                "Sentinel",
            ),
            (
                "{url: 'redis+sentinel://s:26379/m', clusterNodes: ['redis://x']}",
                "spec.redis.cluster",
                "clusterNodes",
            ),
        ] {
            let e = check_redis(&redis(bad)).unwrap_err();
            assert_eq!(e.field, field, "{bad}: {e}");
            assert!(e.message.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn url_problems_never_quote_the_url() {
        let r = redis("urlSecret: {name: u, key: url}");
        let m = redis_url_problem("http://user:hunter2@r", &r).unwrap();
        assert!(!m.contains("hunter2"), "{m}");
        let cluster = redis("{urlSecret: {name: u, key: url}, cluster: true}");
        let m = redis_url_problem("redis+sentinel://:hunter2@s:26379/m", &cluster).unwrap();
        assert!(!m.contains("hunter2") && m.contains("cluster"), "{m}");
        assert_eq!(redis_url_problem("redis://:pw@r:6379", &cluster), None);
    }
}
