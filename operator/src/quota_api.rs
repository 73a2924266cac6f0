//! Quota usage from a relay's admin API (`GET /api/v1/quotas/{name}`), and the
//! SendQuota status computed from it.
//!
//! The counters live in the relays' shared store; any pod of a relay answers for
//! all of them, so the operator asks the relay's admin Service.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::QuotaWindowStatus;

/// One quota's usage as the admin API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    pub name: String,
    pub direction: String,
    pub scope: String,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub limits: Vec<String>,
    #[serde(default)]
    pub keys: Vec<KeyUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    pub key: String,
    #[serde(default)]
    pub windows: Vec<WindowUsage>,
    /// Egress quotas: shared connection slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Connections>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowUsage {
    pub limit: String,
    pub window_seconds: u64,
    pub used: u64,
    pub remaining: u64,
    #[serde(default)]
    pub resets_at: Option<String>,
    #[serde(default)]
    pub resets_in_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connections {
    pub max: u64,
    pub open: u64,
}

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

/// A small HTTP client for relay admin APIs (plain HTTP inside the cluster).
#[derive(Clone)]
pub struct AdminClient {
    http: Client<HttpConnector, Empty<Bytes>>,
    actor: String,
}

impl Default for AdminClient {
    fn default() -> Self {
        Self::new()
    }
}

impl AdminClient {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        let env = |k| std::env::var(k).ok();
        AdminClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
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
    /// A 401 for the first token is retried with the next: right after a rotation
    /// the relay pods may not have the new token file yet (the kubelet updates a
    /// mounted Secret within about a minute), but still accept the previous one.
    pub async fn quota(
        &self,
        base: &str,
        name: &str,
        tokens: &[String],
    ) -> Result<Option<QuotaUsage>, QuotaApiError> {
        let mut last = None;
        for token in tokens
            .iter()
            .map(Some)
            .chain(tokens.is_empty().then_some(None))
        {
            match self.quota_with(base, name, token.map(String::as_str)).await {
                Err(e @ QuotaApiError::Status { status: 401, .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn quota_with(
        &self,
        base: &str,
        name: &str,
        token: Option<&str>,
    ) -> Result<Option<QuotaUsage>, QuotaApiError> {
        let url = format!("{}/api/v1/quotas/{}", base.trim_end_matches('/'), name);
        let err = |message: String| QuotaApiError::Request {
            url: url.clone(),
            message,
        };
        let uri: hyper::Uri = url.parse().map_err(|e| err(format!("bad URL: {e}")))?;
        let mut req = hyper::Request::get(uri)
            .header("accept", "application/json")
            .header(mailrelay::admin::auth::ACTOR_HEADER, &self.actor);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Empty::new()).map_err(|e| err(e.to_string()))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| err(format!("no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Limited::new(resp.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| err(format!("body not complete within {REQUEST_TIMEOUT:?}")))?
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
        match status {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|source| QuotaApiError::Decode { url, source }),
            404 => Ok(None),
            _ => Err(QuotaApiError::Status {
                url,
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
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
                    resets_at: parse_time(w.resets_at.as_deref()),
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
            resets_at: None,
            resets_in_seconds: None,
        };
        let u = QuotaUsage {
            name: "q".into(),
            direction: "egress".into(),
            scope: "shared".into(),
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
