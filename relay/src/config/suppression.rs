//! `suppression:`: recipients the relay refuses to send to again (see
//! `relay/src/events/suppression.rs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration_str;

/// Bounce categories by name (`relay/src/events/classify.rs` checks that this list
/// is its own).
pub const CATEGORY_NAMES: &[&str] = &[
    "invalid_recipient",
    "mailbox_full",
    "message_too_large",
    "content_rejected",
    "policy_auth",
    "reputation",
    "rate_limited",
    "dns_routing",
    "tls_failure",
    "transient",
    "expired",
    "other",
];

/// Whose list an automatic entry goes to, and which lists a recipient is checked
/// against (always the global list too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionScope {
    /// The domain of the envelope sender.
    #[default]
    SenderDomain,
    /// The SMTP AUTH user (the sender domain for unauthenticated clients).
    AuthUser,
    /// One list for everyone.
    Global,
}

/// What a suppressed recipient gets at `RCPT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSuppressed {
    /// `550 5.1.1` naming suppression.
    #[default]
    Reject,
    /// `250`, then the recipient is left out of the queued message.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuppressionConfig {
    /// Add recipients whose delivery failed permanently with one of `categories`.
    pub auto_add: bool,
    /// How long an automatic entry lasts (manual entries may set their own).
    #[serde(with = "duration_str")]
    pub ttl: Duration,
    pub scope: SuppressionScope,
    pub on_suppressed: OnSuppressed,
    /// Bounce categories that add the recipient (permanent failures only).
    pub categories: Vec<String>,
    /// Entries kept per list at most; the ones closest to expiry go first.
    pub max_entries: u64,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        SuppressionConfig {
            auto_add: true,
            ttl: Duration::from_secs(30 * 86_400),
            scope: SuppressionScope::SenderDomain,
            on_suppressed: OnSuppressed::Reject,
            categories: vec!["invalid_recipient".into()],
            max_entries: 1_000_000,
        }
    }
}

/// Longest `ttl`: an address that bounced a year ago may well exist again.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

impl SuppressionConfig {
    /// `(field, message)` of the first problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.ttl < Duration::from_secs(1) || self.ttl > MAX_TTL {
            return Err((
                "suppression.ttl".into(),
                format!("{} is outside 1s..365d", super::format_duration(self.ttl)),
            ));
        }
        for (i, c) in self.categories.iter().enumerate() {
            if !CATEGORY_NAMES.contains(&c.as_str()) {
                return Err((
                    format!("suppression.categories[{i}]"),
                    format!(
                        "unknown bounce category {c:?} (known: {})",
                        CATEGORY_NAMES.join(", ")
                    ),
                ));
            }
        }
        if self.max_entries == 0 {
            return Err((
                "suppression.max_entries".into(),
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
