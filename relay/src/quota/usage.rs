//! The quota usage API's JSON (`GET /api/v1/quotas[/{name}]`), shared by the admin
//! server, `mailrelay quota`, the operator and the kubectl plugin.
//!
//! ```json
//! {"name": "tenant-a", "direction": "ingress", "scope": "per_key", "action": "reject",
//!  "limits": ["100/1m", "1000/1h"],
//!  "keys": [{"key": "alice@a.example",
//!            "windows": [{"limit": "100/1m", "window_seconds": 60, "used": 12,
//!                         "remaining": 88, "resets_at": "2026-11-29T05:01:00Z",
//!                         "resets_in_seconds": 31}]}]}
//! ```
//!
//! `resets_at` is when the oldest units counted now leave the window, so that
//! `remaining` grows (now, when nothing is counted).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::config::{Action, Direction, Scope};

/// `2026-11-29T05:01:00Z` (rounded up to the second).
pub fn rfc3339(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp(ms.div_ceil(1000) as i64)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaList {
    pub quotas: Vec<QuotaUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    pub name: String,
    pub direction: Direction,
    pub scope: Scope,
    pub action: Action,
    /// As configured, e.g. `100/1m`.
    pub limits: Vec<String>,
    /// `scope: shared`: one key `*`. `per_key`: keys with units counted in the
    /// longest window, most used first, at most 100 (or the one asked for).
    pub keys: Vec<KeyUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    pub key: String,
    pub windows: Vec<WindowUsage>,
    /// Egress quotas: outbound connections open now against `max_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Connections>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowUsage {
    pub limit: String,
    pub window_seconds: u64,
    /// Units counted in the window ending now. Egress: what the receiver may have
    /// seen (sent and ended within the window, or being sent), never more than the
    /// limit; grants for a later time are in `scheduled`.
    pub used: u64,
    /// What may still be taken now: the limit less `used` and `scheduled`.
    pub remaining: u64,
    /// Egress only: units granted a slot later than now, not sent yet. The pacer
    /// counts them against the window already, so that they never land in it
    /// together with more than the limit allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<u64>,
    /// RFC 3339, UTC, whole seconds.
    pub resets_at: String,
    pub resets_in_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connections {
    pub max: u32,
    pub open: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_matches_the_agreed_shape() {
        let u = QuotaUsage {
            name: "tenant-a".into(),
            direction: Direction::Ingress,
            scope: Scope::PerKey,
            action: Action::Reject,
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
}
