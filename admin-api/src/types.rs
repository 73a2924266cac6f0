//! The JSON of every admin API request and answer, defined once: the relay's
//! handlers serialize these, the CLI, the operator and the kubectl plugin read them.
//!
//! Reading is lenient where a client may meet an older or newer relay (optional
//! fields default, unknown enum values read as `Other`); writing is exact.
//! Errors are `{"error": "..."}` ([`ErrorBody`]) with a fitting status code.
//!
//! The message detail mirrors the queue's stored records (envelope and delivery
//! status) field for field; the relay converts its records with exhaustive
//! destructuring, so a field added there fails the compile until the API decides
//! whether to show it.

use serde::{Deserialize, Serialize};

/// Every error answer: `{"error": "one line for the user"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

// ---------------------------------------------------------------- queue

/// `GET /api/v1/queue/stats`: the queue's counts and the age of its oldest message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsBody {
    pub messages: u64,
    pub bytes: u64,
    pub leased: u64,
    pub deferred: u64,
    pub oldest_ms: Option<u64>,
    pub oldest_age_seconds: Option<u64>,
}

/// The query of `GET /api/v1/queue/messages`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListQuery {
    /// Only messages that have had at least one delivery attempt.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deferred: bool,
    /// Only messages with a pending recipient in this domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// At most this many (the relay's default is 1000, its maximum
    /// [`MAX_LIST_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// Most messages one list request returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// `GET /api/v1/queue/messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageList {
    pub messages: Vec<MessageSummary>,
}

/// One message in a [`MessageList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSummary {
    pub id: String,
    pub from: String,
    /// The size the client declared (`MAIL FROM … SIZE=`), when it did. The
    /// stored size is not read for a list: that would mean loading every body.
    pub declared_size: Option<u64>,
    pub received_at_ms: u64,
    pub attempts: u32,
    pub next_attempt_ms: Option<u64>,
    pub leased_until_ms: Option<u64>,
    pub rcpts: Vec<RcptSummary>,
}

/// One recipient in a list entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptSummary {
    pub address: String,
    pub state: RcptState,
    pub attempts: usize,
    pub last_reply: Option<String>,
}

/// `GET /api/v1/queue/messages/{id}`: envelope and full delivery status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDetail {
    pub envelope: Envelope,
    pub status: MessageStatus,
}

/// The envelope and metadata of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The queue ID: 20 Crockford base-32 characters.
    pub id: String,
    pub mail: MailParams,
    pub recipients: Vec<Recipient>,
    pub client: ClientInfo,
    /// Milliseconds since the Unix epoch when the message was accepted.
    pub received_at_ms: u64,
    /// Relay hostname (EHLO name) of the process that accepted it.
    pub received_by: String,
}

// The envelope's parts are the SMTP crate's own types (what the queue stores):
// one definition, so the API shows what is stored, field for field.
pub use mailrelay_smtp::envelope::{
    BodyType, ClientInfo, DsnNotify, DsnRet, MailParams, Recipient, TlsInfo,
};

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    /// Not yet delivered: due, in flight or deferred.
    Pending,
    Delivered,
    /// Rejected permanently (5xx) or undeliverable (null MX, no such domain).
    Bounced,
    /// Gave up after the maximum queue lifetime.
    Expired,
}

impl RcptState {
    pub fn is_final(self) -> bool {
        self != RcptState::Pending
    }
}

/// What one delivery attempt to one recipient achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptResult {
    Delivered,
    /// A temporary failure (4xx, connection or DNS trouble): tried again later.
    Deferred,
    Bounced,
}

/// One delivery attempt to one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// When the attempt ended, ms since the epoch.
    pub at_ms: u64,
    pub result: AttemptResult,
    /// The MX (or smarthost) name tried, if it got that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    /// The address connected to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The TLS session, if the connection was encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
    /// The outbound TLS policy the attempt followed and what it found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<TransportSecurity>,
    /// The remote reply, or the relay's description of why there was none.
    pub reply: String,
    /// The bounce category of a failed attempt (`invalid_recipient`, `transient`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

/// Which transport security policy a delivery attempt followed (the relay's
/// `delivery::tls_policy` makes it; the queue stores it with the attempt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSecurity {
    /// `mta-sts`, or the configured `opportunistic`, `required`, `disabled`.
    pub policy: String,
    /// The MTA-STS mode: `enforce` or `testing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The MTA-STS policy id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    /// Whether the server's certificate chained to a trusted root and matched the
    /// host name; absent without a TLS session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// What the policy found wrong (a `testing` policy delivers anyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// What DANE (RFC 7672) said about the host: `tlsa 3 1 1` (its usable
    /// records; the policy is then `dane`), `tlsa unusable: …`, `insecure`,
    /// `no TLSA`, `unavailable` (the resolver does not pass DNSSEC), or why the host
    /// was not used (bogus or failed lookups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dane: Option<String>,
}

/// Most recent attempts kept per recipient; older ones are dropped so that a message
/// retried for days keeps a bounded record.
pub const MAX_ATTEMPTS_KEPT: usize = 20;

/// Status and attempt history of one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptStatus {
    pub address: String,
    pub state: RcptState,
    /// The most recent [`MAX_ATTEMPTS_KEPT`] attempts, oldest first.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// Why a bounced or expired recipient failed: its bounce category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

impl RcptStatus {
    /// Appends an attempt, dropping the oldest beyond [`MAX_ATTEMPTS_KEPT`].
    pub fn record(&mut self, attempt: Attempt) {
        self.attempts.push(attempt);
        self.trim_attempts();
    }

    /// Drops the oldest attempts beyond [`MAX_ATTEMPTS_KEPT`].
    pub fn trim_attempts(&mut self) {
        let excess = self.attempts.len().saturating_sub(MAX_ATTEMPTS_KEPT);
        self.attempts.drain(..excess);
    }

    /// The domain part of the address (after the last `@`), or `""` without one.
    pub fn domain(&self) -> &str {
        self.address.rsplit_once('@').map_or("", |(_, d)| d)
    }
}

/// Delivery status of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatus {
    pub id: String,
    pub rcpts: Vec<RcptStatus>,
    /// When the message was accepted.
    pub created_ms: u64,
    /// When the message is next due; `None` once it is final.
    pub next_attempt_ms: Option<u64>,
    /// Delivery attempts of the message as a whole (one per lease that tried).
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_at_ms: Option<u64>,
    /// While the message is in delivery: when that lease expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_until_ms: Option<u64>,
    /// The sender was sent the one delay warning, or was not to get one.
    #[serde(default, skip_serializing_if = "is_false")]
    pub delay_warned: bool,
}

/// Which messages `retry` makes due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetrySelector {
    /// `POST /api/v1/queue/messages/{id}/retry`
    Id(String),
    /// `POST /api/v1/queue/retry?all=true`
    All,
    /// `POST /api/v1/queue/retry?domain=D`
    Domain(String),
}

/// The query of `POST /api/v1/queue/retry`: exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryQuery {
    #[serde(default, skip_serializing_if = "is_false")]
    pub all: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// The answer of both retry endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retried {
    pub retried: u64,
}

// ---------------------------------------------------------------- quotas

/// `GET /api/v1/quotas`.
///
/// ```json
/// {"name": "tenant-a", "direction": "ingress", "scope": "per_key", "action": "reject",
///  "limits": ["100/1m", "1000/1h"],
///  "keys": [{"key": "alice@a.example",
///            "windows": [{"limit": "100/1m", "window_seconds": 60, "used": 12,
///                         "remaining": 88, "resets_at": "2026-11-29T05:01:00Z",
///                         "resets_in_seconds": 31}]}]}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaList {
    pub quotas: Vec<QuotaUsage>,
}

/// The query of `GET /api/v1/quotas/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyQuery {
    /// Only this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `GET /api/v1/quotas/{name}`: one quota's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    pub name: String,
    #[serde(default)]
    pub direction: QuotaDirection,
    #[serde(default)]
    pub scope: QuotaScope,
    /// What an exhausted quota does; `null` where it has no meaning to a client.
    #[serde(default)]
    pub action: Option<QuotaAction>,
    /// As configured, e.g. `100/1m`.
    #[serde(default)]
    pub limits: Vec<String>,
    /// `scope: shared`: one key `*`. `per_key`: keys with units counted in the
    /// longest window, most used first, at most 100 (or the one asked for).
    #[serde(default)]
    pub keys: Vec<KeyUsage>,
}

/// The quota's direction as the API shows it. The relay's configuration enum
/// converts into it (an exhaustive match there); `Other` reads a value this
/// client does not know yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaDirection {
    #[default]
    Ingress,
    Egress,
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    #[default]
    PerKey,
    Shared,
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaAction {
    Reject,
    Defer,
    #[serde(other)]
    Other,
}

macro_rules! wire_name {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            /// The value as it appears in the JSON.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
wire_name!(QuotaDirection { Ingress => "ingress", Egress => "egress", Other => "other" });
wire_name!(QuotaScope { PerKey => "per_key", Shared => "shared", Other => "other" });
wire_name!(QuotaAction { Reject => "reject", Defer => "defer", Other => "other" });
wire_name!(RcptState { Pending => "pending", Delivered => "delivered", Bounced => "bounced", Expired => "expired" });
wire_name!(AttemptResult { Delivered => "delivered", Deferred => "deferred", Bounced => "bounced" });

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    pub key: String,
    #[serde(default)]
    pub windows: Vec<WindowUsage>,
    /// Egress quotas: outbound connections open now against `max_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Connections>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowUsage {
    pub limit: String,
    #[serde(default)]
    pub window_seconds: u64,
    /// Units counted in the window ending now. Egress: what the receiver may have
    /// seen (sent and ended within the window, or being sent), never more than the
    /// limit; grants for a later time are in `scheduled`.
    pub used: u64,
    /// What may still be taken now: the limit less `used` and `scheduled`.
    pub remaining: u64,
    /// Egress only: units granted a slot later than now, not sent yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<u64>,
    /// RFC 3339, UTC, whole seconds: when the oldest units counted now leave the
    /// window, so that `remaining` grows (now, when nothing is counted).
    #[serde(default)]
    pub resets_at: String,
    #[serde(default)]
    pub resets_in_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connections {
    pub max: u32,
    pub open: u32,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_json_matches_the_agreed_shape() {
        let u = QuotaUsage {
            name: "tenant-a".into(),
            direction: QuotaDirection::Ingress,
            scope: QuotaScope::PerKey,
            action: Some(QuotaAction::Reject),
            limits: vec!["100/1m".into(), "1000/1h".into()],
            keys: vec![KeyUsage {
                key: "alice@a.example".into(),
                windows: vec![WindowUsage {
                    limit: "100/1m".into(),
                    window_seconds: 60,
                    used: 12,
                    remaining: 88,
                    scheduled: None,
                    resets_at: "2026-11-29T05:01:00Z".into(),
                    resets_in_seconds: 31,
                }],
                connections: None,
            }],
        };
        let v = serde_json::to_value(&u).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "tenant-a", "direction": "ingress", "scope": "per_key", "action": "reject",
             "limits": ["100/1m", "1000/1h"],
             "keys": [ {"key": "alice@a.example",
                        "windows": [ {"limit": "100/1m", "window_seconds": 60, "used": 12, "remaining": 88,
                                      "resets_at": "2026-11-29T05:01:00Z", "resets_in_seconds": 31} ]} ]})
        );
        assert_eq!(serde_json::from_value::<QuotaUsage>(v).unwrap(), u);
        let e = KeyUsage {
            key: "*".into(),
            windows: vec![],
            connections: Some(Connections { max: 5, open: 2 }),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"key": "*", "windows": [], "connections": {"max": 5, "open": 2}})
        );
    }

    #[test]
    fn clients_read_older_and_newer_relays() {
        // `action: null` (egress, as first agreed), a direction from a newer relay,
        // and a window without the reset fields.
        let q: QuotaUsage = serde_json::from_value(serde_json::json!({
            "name": "q", "direction": "sideways", "scope": "shared", "action": null,
            "keys": [{"key": "*", "windows": [{"limit": "5/1s", "used": 1, "remaining": 4}]}]
        }))
        .unwrap();
        assert_eq!(q.direction, QuotaDirection::Other);
        assert_eq!(q.action, None);
        assert_eq!(q.keys[0].windows[0].resets_in_seconds, 0);
        for (s, v) in [
            ("ingress", QuotaDirection::Ingress),
            ("egress", QuotaDirection::Egress),
        ] {
            assert_eq!(serde_json::to_value(v).unwrap(), s);
            assert_eq!(v.as_str(), s);
        }
        assert_eq!(
            serde_json::to_value(BodyType::EightBitMime).unwrap(),
            "8bitmime"
        );
        assert_eq!(
            serde_json::to_value(RcptState::Pending).unwrap(),
            RcptState::Pending.as_str()
        );
    }
}

// ---------------------------------------------------------------- shaping

/// `GET /api/v1/shaping`: the response-rule states in force across the relays
/// sharing the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapingList {
    pub states: Vec<ShapingState>,
}

/// One state a `suspend` or `throttle` rule started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapingState {
    /// What `POST /api/v1/shaping/{id}/lift` takes: `<scope>@<site>`.
    pub id: String,
    /// The MX site (MX host names joined by `,`, or the smarthost).
    pub site: String,
    /// `*` (the whole site) or `<tenant_key>:<value>`.
    pub scope: String,
    pub rule: String,
    /// `suspend` or `throttle`.
    pub action: String,
    /// Rate factor of a throttle (1 = none), as text (`0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<String>,
    /// Absolute pace of a throttle (`100/1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Connections open at once to the site under a throttle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// End, ms since the epoch (the relay's clock).
    pub until_ms: u64,
    pub remaining_seconds: u64,
    /// The reply that started it.
    pub reply: String,
}

impl ShapingState {
    /// The action with a throttle's limits, as tables show it:
    /// `throttle x0.5 100/1m max 2 conns`.
    pub fn action_label(&self) -> String {
        action_label(
            &self.action,
            self.factor.as_deref(),
            self.rate.as_deref(),
            self.max_connections,
        )
    }

    /// The id of a state: `<scope>@<site>` (a site never holds `@`).
    pub fn id_of(scope: &str, site: &str) -> String {
        format!("{scope}@{site}")
    }

    /// `(site, scope)` of an id.
    pub fn parse_id(id: &str) -> Option<(&str, &str)> {
        let (scope, site) = id.rsplit_once('@')?;
        (!scope.is_empty() && !site.is_empty()).then_some((site, scope))
    }
}

/// The answer of `POST /api/v1/shaping/{id}/lift`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifted {
    pub lifted: bool,
}

// ---------------------------------------------------------------- suppression

/// The query of `GET /api/v1/suppression`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionQuery {
    /// Only this list (`global`, `domain:<domain>`, `user:<AUTH user>`); all lists
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Only this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// At most this many entries per list (default 100, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// The query of `POST /api/v1/suppression/{scope}/{address}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionAddQuery {
    /// `30d`, `12h`, … or `never`; the relay's `suppression.ttl` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// One suppressed recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionEntry {
    pub scope: String,
    pub address: String,
    /// `null`: never expires.
    pub expires_ms: Option<u64>,
    /// `manual`, or the bounce category that listed it.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    pub added_ms: u64,
}

/// `GET /api/v1/suppression`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionList {
    pub entries: Vec<SuppressionEntry>,
}

/// `POST /api/v1/suppression/{scope}/{address}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionAdded {
    /// False when the address was listed already (its expiry is renewed).
    pub new: bool,
    pub entry: SuppressionEntry,
}

/// See [`ShapingState::action_label`] (also for the operator's status rows).
pub fn action_label(
    action: &str,
    factor: Option<&str>,
    rate: Option<&str>,
    max_connections: Option<u32>,
) -> String {
    let mut out = action.to_owned();
    if let Some(f) = factor {
        out.push_str(" x");
        out.push_str(f);
    }
    if let Some(r) = rate {
        out.push(' ');
        out.push_str(r);
    }
    if let Some(m) = max_connections {
        out.push_str(&format!(" max {m} conns"));
    }
    out
}
