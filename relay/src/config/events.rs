//! `events:` (the delivery event log) and `webhooks:` (per-tenant HTTPS endpoints
//! that receive those events). The code acting on them is `crate::events`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, duration_str, invalid};

/// Every event kind, as written in `webhooks[].kinds` and `mailrelay events --kind`.
pub const EVENT_KINDS: &[&str] = &[
    "accepted",
    "delivered",
    "deferred",
    "bounced",
    "expired",
    "suppressed",
    "dsn_sent",
];

/// Largest `events.max_len`: 100 million events is ~30 GB of Redis memory (about
/// 300 bytes each), far beyond any sane cap; a bigger number is a typo.
pub const MAX_EVENTS_LEN: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Record delivery events at all.
    pub enabled: bool,
    /// About how many events are kept (Redis: `XTRIM MAXLEN ~` by each relay
    /// about once a second, so up to a second's events more; the embedded store
    /// trims to the same number with each write). The oldest go first.
    pub max_len: u64,
    /// Events are written in batches: one store round trip per batch, once this
    /// many are waiting or the first of them has waited `batch_delay`.
    pub batch_max: usize,
    #[serde(with = "duration_str")]
    pub batch_delay: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            enabled: true,
            max_len: 200_000,
            batch_max: 512,
            batch_delay: Duration::from_millis(20),
        }
    }
}

impl EventsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_len == 0 || self.max_len > MAX_EVENTS_LEN {
            return Err(invalid(
                "events.max_len",
                format!("{} is not between 1 and {MAX_EVENTS_LEN}", self.max_len),
            ));
        }
        if self.batch_max == 0 || self.batch_max > 10_000 {
            return Err(invalid(
                "events.batch_max",
                format!("{} is not between 1 and 10000", self.batch_max),
            ));
        }
        if self.batch_delay.is_zero() || self.batch_delay > Duration::from_secs(10) {
            return Err(invalid(
                "events.batch_delay",
                "must be greater than zero and at most 10s",
            ));
        }
        Ok(())
    }
}

/// Whose events an endpoint receives.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookTenants {
    /// Every tenant (an operator's own endpoint); the lists must then be empty.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Mail submitted by these AUTH users.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub auth_users: Vec<String>,
    /// Mail whose envelope sender is in one of these domains (ASCII
    /// case-insensitive, exact: `example.com` does not take `mail.example.com`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sender_domains: Vec<String>,
}

impl WebhookTenants {
    /// Whether mail of `auth_user` from `sender` belongs to these tenants.
    pub fn matches(&self, auth_user: Option<&str>, sender: &str) -> bool {
        if self.all {
            return true;
        }
        if let Some(u) = auth_user
            && self.auth_users.iter().any(|a| a == u)
        {
            return true;
        }
        let domain = sender.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        let domain = domain.trim_end_matches('.');
        !domain.is_empty()
            && self
                .sender_domains
                .iter()
                .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(domain))
    }
}

/// Retries of one event at one endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookRetry {
    /// Wait before the first retry; doubled after each failure.
    #[serde(with = "duration_str")]
    pub initial: Duration,
    /// Longest wait between two tries.
    #[serde(with = "duration_str")]
    pub max: Duration,
    /// Tries of one event before it is dead-lettered (counted, then skipped so
    /// the endpoint's later events flow again).
    pub max_attempts: u32,
}

impl Default for WebhookRetry {
    fn default() -> Self {
        WebhookRetry {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            max_attempts: 12,
        }
    }
}

/// Most events one batched POST carries.
pub const MAX_WEBHOOK_BATCH: usize = 1000;

/// How an endpoint's events are grouped into POSTs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookBatch {
    /// Most events per POST. Above 1 the body is a CloudEvents batch (a JSON array,
    /// `application/cloudevents-batch+json`); 1 sends each event alone
    /// (`application/cloudevents+json`), as before batching existed.
    pub max_events: usize,
    /// After a POST that was not full, wait this long before reading again, so the
    /// next POST carries more events (the latency it adds to an event at most).
    #[serde(with = "duration_str")]
    pub linger: Duration,
}

impl Default for WebhookBatch {
    fn default() -> Self {
        WebhookBatch {
            max_events: 100,
            linger: Duration::from_millis(50),
        }
    }
}

impl WebhookBatch {
    fn is_default(&self) -> bool {
        *self == WebhookBatch::default()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the endpoint in metrics, logs and its cursor in the event store;
    /// renaming it starts a new cursor (at the newest event).
    pub name: String,
    /// `https://host[:port]/path`.
    pub url: String,
    /// The HMAC-SHA256 key, inline (prefer `secret_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// A file holding the HMAC-SHA256 key (a mounted Secret); surrounding
    /// whitespace is ignored. Read at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    pub tenants: WebhookTenants,
    /// Only these kinds (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    /// Allow `http://` (tests only: the events and their signature travel in clear).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    /// CA certificates (PEM) the endpoint's certificate must chain to; default the
    /// system store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// One POST, connect to answer.
    #[serde(default = "default_webhook_timeout", with = "duration_str")]
    pub timeout: Duration,
    #[serde(default)]
    pub retry: WebhookRetry,
    /// Retries, backoff and dead-lettering apply to a POST: a batch as a whole.
    #[serde(default, skip_serializing_if = "WebhookBatch::is_default")]
    pub batch: WebhookBatch,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The parts of a webhook URL the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl WebhookUrl {
    /// Parses `http(s)://host[:port][/path]`; the message says what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?} contains whitespace"));
        }
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?} is not an http(s):// URL"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!("{url:?} carries credentials; use the secret"));
        }
        if path.contains('#') {
            return Err(format!("{url:?} has a fragment"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?} has an unclosed IPv6 address"))?;
            (h.to_owned(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
        {
            return Err(format!("{url:?} has an invalid host {host:?}"));
        }
        let port = match port {
            None => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url:?} has an invalid port {p:?}"))?,
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        Ok(WebhookUrl {
            https,
            host,
            port,
            path,
        })
    }
}

impl WebhookConfig {
    pub fn parsed_url(&self) -> Result<WebhookUrl, String> {
        WebhookUrl::parse(&self.url)
    }

    /// Whether events of `kind` go to this endpoint.
    pub fn wants(&self, kind: &str) -> bool {
        self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind)
    }
}

pub(super) fn validate_webhooks(hooks: &[WebhookConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for (i, h) in hooks.iter().enumerate() {
        let f = |s: &str| format!("webhooks[{i}].{s}");
        if h.name.is_empty()
            || h.name.len() > 63
            || !h
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                f("name"),
                format!(
                    "{:?} must be 1-63 letters, digits, '-' or '_' (it names the endpoint's cursor)",
                    h.name
                ),
            ));
        }
        if !names.insert(h.name.as_str()) {
            return Err(invalid(
                f("name"),
                format!("{:?} is used by two webhooks", h.name),
            ));
        }
        let url = h.parsed_url().map_err(|m| invalid(f("url"), m))?;
        if !url.https && !h.allow_http {
            return Err(invalid(
                f("url"),
                format!(
                    "{:?} is not HTTPS: events and their signatures would travel in clear (set allow_http: true only for tests)",
                    h.url
                ),
            ));
        }
        match (&h.secret, &h.secret_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(f("secret"), "give secret or secret_file, not both"));
            }
            (None, None) => {
                return Err(invalid(
                    f("secret_file"),
                    "a webhook needs a signing key: secret_file (or secret)",
                ));
            }
            (Some(s), None) if s.0.trim().len() < 16 => {
                return Err(invalid(
                    f("secret"),
                    "is shorter than 16 characters: too weak for HMAC",
                ));
            }
            _ => {}
        }
        let t = &h.tenants;
        if t.all && (!t.auth_users.is_empty() || !t.sender_domains.is_empty()) {
            return Err(invalid(
                f("tenants.all"),
                "is true, so auth_users and sender_domains must be empty",
            ));
        }
        if !t.all && t.auth_users.is_empty() && t.sender_domains.is_empty() {
            return Err(invalid(
                f("tenants"),
                "names no tenant: give auth_users or sender_domains (or all: true)",
            ));
        }
        for (j, d) in t.sender_domains.iter().enumerate() {
            if d.is_empty() || d.contains('@') || d.contains(char::is_whitespace) {
                return Err(invalid(
                    f(&format!("tenants.sender_domains[{j}]")),
                    format!("{d:?} is not a domain"),
                ));
            }
        }
        for (j, k) in h.kinds.iter().enumerate() {
            if !EVENT_KINDS.contains(&k.as_str()) {
                return Err(invalid(
                    f(&format!("kinds[{j}]")),
                    format!(
                        "unknown event kind {k:?}; known: {}",
                        EVENT_KINDS.join(", ")
                    ),
                ));
            }
        }
        if h.timeout.is_zero() {
            return Err(invalid(f("timeout"), "must be greater than zero"));
        }
        if h.retry.initial.is_zero() || h.retry.max < h.retry.initial {
            return Err(invalid(
                f("retry.initial"),
                "must be greater than zero and at most retry.max",
            ));
        }
        if h.retry.max_attempts == 0 {
            return Err(invalid(f("retry.max_attempts"), "must be at least 1"));
        }
        if h.batch.max_events == 0 || h.batch.max_events > MAX_WEBHOOK_BATCH {
            return Err(invalid(
                f("batch.max_events"),
                format!(
                    "{} is not between 1 and {MAX_WEBHOOK_BATCH}",
                    h.batch.max_events
                ),
            ));
        }
        if h.batch.linger > Duration::from_secs(10) {
            return Err(invalid(f("batch.linger"), "must be at most 10s"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayConfig;

    fn err(yaml: &str) -> String {
        RelayConfig::from_yaml(yaml).unwrap_err().to_string()
    }

    const BASE: &str = "webhooks:\n  - name: a\n    secret: 0123456789abcdef0123\n    tenants: {auth_users: [u]}\n";

    #[test]
    fn urls_parse_and_bad_ones_name_the_field() {
        let u = WebhookUrl::parse("https://h.example:8443/x?y=1").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port),
            (true, "h.example", 8443)
        );
        assert_eq!(u.path, "/x?y=1");
        let u = WebhookUrl::parse("https://[::1]").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 443, "/")
        );
        for bad in [
            "ftp://x",
            "https://",
            "https://h:0/",
            "https://h:99999/",
            "https://u:p@h/",
            "https://h /",
            "https://h/#f",
            "https://h!/",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
        let e = err(&format!("{BASE}    url: 'https://h:x/'\n"));
        assert!(e.contains("field `webhooks[0].url`"), "{e}");
        assert!(e.contains("invalid port"), "{e}");
    }

    #[test]
    fn plain_http_is_refused_unless_allowed() {
        let e = err(&format!("{BASE}    url: http://h/\n"));
        assert!(e.contains("field `webhooks[0].url`"), "{e}");
        assert!(e.contains("not HTTPS"), "{e}");
        let ok =
            RelayConfig::from_yaml(&format!("{BASE}    url: http://h/\n    allow_http: true\n"))
                .unwrap();
        assert_eq!(ok.webhooks[0].parsed_url().unwrap().port, 80);
    }

    #[test]
    fn kinds_tenants_and_secrets_are_checked() {
        let e = err(&format!(
            "{BASE}    url: https://h/\n    kinds: [delivered, sent]\n"
        ));
        assert!(e.contains("field `webhooks[0].kinds[1]`"), "{e}");
        assert!(e.contains("unknown event kind \"sent\""), "{e}");
        let e = err(
            "webhooks:\n  - name: a\n    url: https://h/\n    secret: 0123456789abcdef0123\n    tenants: {}\n",
        );
        assert!(e.contains("field `webhooks[0].tenants`"), "{e}");
        let e = err("webhooks:\n  - name: a\n    url: https://h/\n    tenants: {all: true}\n");
        assert!(e.contains("field `webhooks[0].secret_file`"), "{e}");
        let e = err(
            "webhooks:\n  - name: a\n    url: https://h/\n    secret: short\n    tenants: {all: true}\n",
        );
        assert!(e.contains("field `webhooks[0].secret`"), "{e}");
        let e = err(&format!(
            "{BASE}    url: https://h/\n  - name: a\n    url: https://h/\n    secret: 0123456789abcdef0123\n    tenants: {{all: true}}\n"
        ));
        assert!(e.contains("field `webhooks[1].name`"), "{e}");
        let e = err("events:\n  max_len: 0\n");
        assert!(e.contains("field `events.max_len`"), "{e}");
    }

    #[test]
    fn batches_default_and_bad_sizes_name_the_field() {
        let ok = RelayConfig::from_yaml(&format!("{BASE}    url: https://h/\n")).unwrap();
        assert_eq!(ok.webhooks[0].batch, WebhookBatch::default());
        let one = RelayConfig::from_yaml(&format!(
            "{BASE}    url: https://h/\n    batch: {{max_events: 1, linger: 0s}}\n"
        ))
        .unwrap();
        assert_eq!(one.webhooks[0].batch.max_events, 1);
        assert!(one.webhooks[0].batch.linger.is_zero());
        for (bad, field) in [
            ("{max_events: 0}", "batch.max_events"),
            ("{max_events: 5000}", "batch.max_events"),
            ("{linger: 1m}", "batch.linger"),
        ] {
            let e = err(&format!("{BASE}    url: https://h/\n    batch: {bad}\n"));
            assert!(
                e.contains(&format!("field `webhooks[0].{field}`")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn tenants_match_by_auth_user_or_sender_domain() {
        let t = WebhookTenants {
            all: false,
            auth_users: vec!["alice".into()],
            sender_domains: vec!["Example.COM".into()],
        };
        assert!(t.matches(Some("alice"), "x@other.test"));
        assert!(t.matches(None, "x@example.com"));
        assert!(t.matches(None, "x@EXAMPLE.com."));
        assert!(!t.matches(None, "x@mail.example.com"));
        assert!(!t.matches(Some("bob"), "x@other.test"));
        assert!(!t.matches(None, ""));
    }
}
