//! `RelayConfig`: the one configuration format of a relay process, read from YAML
//! (unknown fields rejected, errors name the field) with environment overrides for
//! secrets. The operator renders the same format into a ConfigMap.

//!
//! One module per section; [`duration`] is the leaf they all parse durations with.
//! This module imports no other part of the relay: the sections' types, defaults
//! and validation live here, and the code that acts on them (delivery, queue,
//! quotas) uses them from here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub mod admin;
pub mod auth;
pub mod delivery;
pub mod dkim;
pub mod duration;
pub mod events;
pub mod glob;
pub mod limits;
pub mod listeners;
pub mod log;
pub mod queue;
pub mod quota;
pub mod redis;
pub mod rules;
pub mod runtime;
pub mod sender_binding;
pub mod suppression;
pub mod tls_reporting;

pub use admin::AdminConfig;
pub use auth::{AuthConfig, AuthThrottleConfig};
pub use delivery::{
    DEFAULT_LEASE, DeliveryConfig, MtaStsConfig, OutcomeBatchConfig, RemoteHost, ResolverConfig,
    RetryPolicy, RouteConfig, TlsPolicy, TlsPolicyEntry, route_of,
};
pub use duration::{duration_str, format_duration, parse_duration};
pub use events::{EventsConfig, WebhookConfig};
pub use limits::Limits;
pub use listeners::{ListenerConfig, TlsConfig, TlsMode};
pub use log::{LogConfig, LogFormat};
pub use queue::{
    DEFAULT_CACHE_SIZE, DEFAULT_STATUS_RETENTION, MIN_QUEUE_CACHE_SIZE, QueueBackendKind,
    QueueConfig,
};
pub use redis::{MAX_WAIT_TIMEOUT, RedisConfig, default_fresh_list, default_wait_timeout};
pub use runtime::RuntimeConfig;
pub use sender_binding::{NetworkSenders, SenderBindingConfig};

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
    /// Worker threads (absent: one per CPU the process may use).
    #[serde(skip_serializing_if = "RuntimeConfig::is_default")]
    pub runtime: RuntimeConfig,
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
    pub quotas: Vec<quota::QuotaConfig>,
    /// Which senders each AUTH user and relay network may use (absent: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_binding: Option<SenderBindingConfig>,
    /// DKIM signing of accepted mail (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dkim: Option<dkim::DkimConfig>,
    /// Shipped provider presets to enable, and overrides of their values.
    #[serde(skip_serializing_if = "rules::ProvidersConfig::is_empty")]
    pub providers: rules::ProvidersConfig,
    /// Rules turning remote replies into suspend / throttle / reclassify / bounce;
    /// evaluated before the presets' rules; reloaded without a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub response_rules: Vec<rules::ResponseRule>,
    /// Suppression lists: recipients refused at `RCPT` after a hard bounce (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppression: Option<suppression::SuppressionConfig>,
    /// The delivery event log (`mailrelay events`, webhooks).
    #[serde(skip_serializing_if = "events_is_default")]
    pub events: EventsConfig,
    /// Per-tenant HTTPS endpoints that receive delivery events, signed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookConfig>,
    /// SMTP TLS reports (RFC 8460) to the domains that ask for them; off unless
    /// configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_reporting: Option<tls_reporting::TlsReportingConfig>,
}

fn events_is_default(e: &EventsConfig) -> bool {
    *e == EventsConfig::default()
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            hostname: default_hostname(),
            listeners: vec![ListenerConfig::default()],
            relay_networks: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            sender_binding: None,
            dkim: None,
            suppression: None,
            tls: None,
            auth: None,
            limits: Limits::default(),
            queue: QueueConfig::default(),
            delivery: DeliveryConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
            shutdown_grace: Duration::from_secs(30),
            shutdown_settle: Duration::ZERO,
            add_missing_headers: true,
            quotas: Vec::new(),
            providers: rules::ProvidersConfig::default(),
            response_rules: Vec::new(),
            events: EventsConfig::default(),
            webhooks: Vec::new(),
            tls_reporting: None,
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
                        key_prefix: redis::default_prefix(),
                        wait_replicas: 0,
                        wait_timeout: default_wait_timeout(),
                        fresh_list: default_fresh_list(),
                    })
                }
            }
        }
        if let Some(v) = get("MAILRELAY_REDIS_FRESH_LIST") {
            let on = match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(invalid(
                        "MAILRELAY_REDIS_FRESH_LIST",
                        format!("must be true or false, not {v:?}"),
                    ));
                }
            };
            match &mut self.queue.redis {
                Some(r) => r.fresh_list = on,
                None => {
                    return Err(invalid(
                        "MAILRELAY_REDIS_FRESH_LIST",
                        "set, but no Redis is configured (queue.redis.url or MAILRELAY_REDIS_URL)",
                    ));
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
                    Some(pw) => route.remote.password = Some(Secret(pw)),
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

    /// `quotas:` and the egress quotas the enabled presets' pacing adds
    /// (`preset-<name>`, keyed by MX site).
    pub fn effective_quotas(&self) -> Vec<quota::QuotaConfig> {
        let mut q = self.quotas.clone();
        q.extend(rules::preset_quotas(&self.providers));
        q
    }

    /// Checks every section; the error names the first offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.auth {
            a.throttle.validate()?;
        }
        if !is_valid_hostname(&self.hostname) {
            return Err(invalid(
                "hostname",
                format!("{:?} is not a valid host name", self.hostname),
            ));
        }
        listeners::validate(&self.listeners, self.tls.as_ref())?;
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
        self.limits.validate()?;
        self.queue.validate()?;
        self.runtime.validate()?;
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
        self.delivery.validate()?;
        if let Some(t) = &self.tls_reporting {
            t.validate()?;
        }
        if let Some(d) = &self.dkim {
            dkim::validate(d).map_err(|e| invalid(e.field, e.message))?;
        }
        self.events.validate()?;
        if !self.events.enabled && !self.webhooks.is_empty() {
            return Err(invalid(
                "events.enabled",
                "is false, but webhooks are configured and read the event log",
            ));
        }
        events::validate_webhooks(&self.webhooks)?;
        quota::validate(&self.quotas).map_err(|(f, m)| invalid(f, m))?;
        if let Some(s) = &self.suppression {
            s.validate().map_err(|(f, m)| invalid(f, m))?;
        }
        quota::validate_reach(&self.quotas, &self.delivery).map_err(|(f, m)| invalid(f, m))?;
        rules::validate(&self.response_rules, &self.providers).map_err(|(f, m)| invalid(f, m))?;
        let presets = rules::preset_quotas(&self.providers);
        if !presets.is_empty() {
            quota::validate(&self.effective_quotas()).map_err(|(f, m)| {
                invalid(
                    "providers.presets",
                    format!("the presets' pacing as egress quotas: {f}: {m}"),
                )
            })?;
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

#[cfg(test)]
mod tests;
