//! Quota usage from a relay's admin API (`GET /api/v1/quotas/{name}`), and the
//! SendQuota status computed from it.
//!
//! The counters live in the relays' shared store; any pod of a relay answers for
//! all of them, so the operator asks the relay's admin Service.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use mailrelay_admin_api::http::{HttpError, HttpTransport};
use mailrelay_admin_api::{Call, Client};

use crate::crd::QuotaWindowStatus;

pub use mailrelay_admin_api::{Connections, KeyUsage, QuotaUsage, WindowUsage};

#[derive(Debug, thiserror::Error)]
pub enum QuotaApiError {
    #[error("admin API at {url}: {message}")]
    Request { url: String, message: String },
    #[error("admin API at {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("admin API at {url} sent an unreadable quota: {source}")]
    Decode {
        url: String,
        source: serde_json::Error,
    },
}

/// How long one admin API request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read (100 keys of a few windows each fit easily).
const MAX_BODY: usize = 1 << 20;

/// Who the operator says it is on its admin calls ([`mailrelay::admin::auth::ACTOR_HEADER`],
/// logged by the relay as `actor`): its service account in the form the API
/// server's audit log uses, when the downward API tells namespace and account
/// (`POD_NAMESPACE`, `SERVICE_ACCOUNT_NAME`, set by the chart), else a plain name.
pub fn operator_actor(namespace: Option<&str>, service_account: Option<&str>) -> String {
    match (namespace, service_account) {
        (Some(ns), Some(sa)) if !ns.is_empty() && !sa.is_empty() => {
            mailrelay::admin::auth::audit_text(
                format!("system:serviceaccount:{ns}:{sa}").as_bytes(),
                mailrelay::admin::auth::MAX_ACTOR_LEN,
            )
        }
        _ => "mailrelay-operator".to_owned(),
    }
}

/// The operator's client for relay admin APIs (direct HTTP inside the cluster).
#[derive(Clone)]
pub struct AdminClient {
    actor: String,
}

impl Default for AdminClient {
    fn default() -> Self {
        Self::new()
    }
}

impl AdminClient {
    pub fn new() -> Self {
        let env = |k| std::env::var(k).ok();
        AdminClient {
            actor: operator_actor(
                env("POD_NAMESPACE").as_deref(),
                env("SERVICE_ACCOUNT_NAME").as_deref(),
            ),
        }
    }

    /// `GET {base}/api/v1/quotas/{name}` with the relay's admin token(s) (from its
    /// `NAME-admin-token` Secret, current first); `Ok(None)` when the relay does
    /// not know the quota (404: not in its config yet, or rejected by it).
    ///
    /// A 401 for the first token is retried with the next (by the client): right
    /// after a rotation the relay pods may not have the new token file yet (the
    /// kubelet updates a mounted Secret within about a minute), but still accept
    /// the previous one.
    pub async fn quota(
        &self,
        base: &str,
        name: &str,
        tokens: &[String],
    ) -> Result<Option<QuotaUsage>, QuotaApiError> {
        let call = Call::Quota {
            name: name.to_owned(),
            key: None,
        };
        let url = format!("{}{}", base.trim_end_matches('/'), call.path());
        let transport = HttpTransport::new(base, REQUEST_TIMEOUT)
            .map_err(|e| QuotaApiError::Request {
                url: url.clone(),
                message: format!("bad URL: {e}"),
            })?
            .with_max_body(MAX_BODY);
        let client = Client::new(transport)
            .with_tokens(tokens.iter().cloned())
            .with_actor(Some(self.actor.clone()));
        let resp = client
            .send(&call)
            .await
            .map_err(|e| QuotaApiError::Request {
                url: url.clone(),
                message: match e {
                    HttpError::Connect { source, .. } => source.to_string(),
                    HttpError::Timeout { after, .. } => format!("no answer within {after:?}"),
                    HttpError::Malformed { detail, .. } => detail,
                },
            })?;
        match resp.status {
            200 => resp
                .json()
                .map(Some)
                .map_err(|source| QuotaApiError::Decode { url, source }),
            404 => Ok(None),
            status => Err(QuotaApiError::Status {
                url,
                status,
                body: resp.body.chars().take(200).collect(),
            }),
        }
    }
}

/// Most window rows kept in a SendQuota status.
pub const MAX_STATUS_ROWS: usize = 20;

/// The summary and rows of a SendQuota status, from what each selected relay
/// reported (relays in name order).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageSummary {
    /// The window closest to its limit: least remaining relative to the limit.
    pub tightest: Option<QuotaWindowStatus>,
    pub rows: Vec<QuotaWindowStatus>,
}

fn parse_time(s: Option<&str>) -> Option<Time> {
    let ts: Timestamp = s?.parse().ok()?;
    // Whole seconds, as the API server keeps them.
    Timestamp::from_second(ts.as_second()).ok().map(Time)
}

/// Pure: rows per relay, key and window (in the order reported: most used keys
/// first), capped at [`MAX_STATUS_ROWS`], and the tightest window overall.
pub fn summarise(reports: &[(String, QuotaUsage)]) -> UsageSummary {
    let mut all = Vec::new();
    for (relay, usage) in reports {
        for k in &usage.keys {
            for w in &k.windows {
                all.push(QuotaWindowStatus {
                    relay: relay.clone(),
                    key: k.key.clone(),
                    limit: w.limit.clone(),
                    used: w.used,
                    remaining: w.remaining,
                    resets_at: parse_time(Some(&w.resets_at)),
                });
            }
        }
    }
    // Fill ratio compared without floats: used_a / cap_a > used_b / cap_b.
    let tightest = all
        .iter()
        .max_by(|a, b| {
            let cap = |w: &QuotaWindowStatus| u128::from(w.used) + u128::from(w.remaining);
            let lhs = u128::from(a.used) * cap(b).max(1);
            let rhs = u128::from(b.used) * cap(a).max(1);
            // On a tie prefer the earlier row (max_by keeps the last maximum).
            lhs.cmp(&rhs).then(std::cmp::Ordering::Greater)
        })
        .cloned();
    all.truncate(MAX_STATUS_ROWS);
    UsageSummary {
        tightest,
        rows: all,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact JSON agreed for the admin API (crd-shape.md).
    pub const SAMPLE: &str = r#"{"name": "tenant-a", "direction": "ingress", "scope": "per_key", "action": "reject",
 "limits": ["100/1m", "1000/1h"],
 "keys": [ {"key": "alice@a.example",
            "windows": [ {"limit": "100/1m", "window_seconds": 60, "used": 12, "remaining": 88,
                          "resets_at": "2026-11-29T05:01:00Z", "resets_in_seconds": 31} ]} ]}"#;

    #[test]
    fn the_operator_names_its_service_account() {
        assert_eq!(
            operator_actor(Some("mailrelay-system"), Some("mailrelay-operator")),
            "system:serviceaccount:mailrelay-system:mailrelay-operator"
        );
        for (ns, sa) in [
            (None, Some("sa")),
            (Some("ns"), None),
            (Some(""), Some("sa")),
        ] {
            assert_eq!(operator_actor(ns, sa), "mailrelay-operator");
        }
        assert_eq!(
            operator_actor(Some("ns"), Some("a b")),
            "system:serviceaccount:ns:a%20b",
            "always a valid header value"
        );
    }

    #[test]
    fn the_agreed_json_parses_and_summarises() {
        let u: QuotaUsage = serde_json::from_str(SAMPLE).unwrap();
        assert_eq!(u.keys[0].windows[0].used, 12);
        let s = summarise(&[("relay".into(), u)]);
        let t = s.tightest.unwrap();
        assert_eq!((t.limit.as_str(), t.used, t.remaining), ("100/1m", 12, 88));
        assert_eq!(t.resets_at.unwrap().0.to_string(), "2026-11-29T05:01:00Z");
    }

    #[test]
    fn the_fullest_window_is_the_tightest() {
        let w = |limit: &str, used, remaining| WindowUsage {
            limit: limit.into(),
            window_seconds: 60,
            used,
            remaining,
            scheduled: None,
            resets_at: String::new(),
            resets_in_seconds: 0,
        };
        let u = QuotaUsage {
            name: "q".into(),
            direction: mailrelay_admin_api::QuotaDirection::Egress,
            scope: mailrelay_admin_api::QuotaScope::Shared,
            action: None,
            limits: vec![],
            keys: vec![KeyUsage {
                key: "*".into(),
                windows: vec![
                    w("100/1m", 50, 50),
                    w("1000/1h", 900, 100),
                    w("5000/1d", 900, 4100),
                ],
                connections: Some(Connections { max: 5, open: 2 }),
            }],
        };
        let s = summarise(&[("r".into(), u)]);
        assert_eq!(s.tightest.unwrap().limit, "1000/1h");
        assert_eq!(s.rows.len(), 3);
        assert_eq!(summarise(&[]).tightest, None);
    }
}
