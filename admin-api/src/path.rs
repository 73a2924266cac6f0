//! Endpoint paths: the route templates the relay's router serves, and [`Call`],
//! which builds the method and the encoded path of one request.
//!
//! Path segments (queue IDs, quota names) are percent-encoded with everything but
//! the RFC 3986 unreserved characters escaped, so `/`, `%`, `?`, `#`, spaces and
//! non-ASCII can never change which route answers. Query strings are written by
//! `serde_urlencoded` from the same structs the relay's `Query` extractor reads,
//! so the two sides cannot disagree on a parameter's name or encoding.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;

use crate::types::{
    KeyQuery, ListQuery, RetryQuery, RetrySelector, SuppressionAddQuery, SuppressionQuery,
};

/// The route templates (axum syntax), for the relay's router.
pub mod routes {
    pub const QUEUE_STATS: &str = "/api/v1/queue/stats";
    pub const QUEUE_MESSAGES: &str = "/api/v1/queue/messages";
    pub const QUEUE_MESSAGE: &str = "/api/v1/queue/messages/{id}";
    pub const QUEUE_MESSAGE_RETRY: &str = "/api/v1/queue/messages/{id}/retry";
    pub const QUEUE_RETRY: &str = "/api/v1/queue/retry";
    pub const QUOTAS: &str = "/api/v1/quotas";
    pub const QUOTA: &str = "/api/v1/quotas/{name}";
    pub const SHAPING: &str = "/api/v1/shaping";
    pub const SHAPING_LIFT: &str = "/api/v1/shaping/{id}/lift";
    pub const SUPPRESSION: &str = "/api/v1/suppression";
    pub const SUPPRESSION_ENTRY: &str = "/api/v1/suppression/{scope}/{address}";
    pub const EVENTS: &str = "/api/v1/events";
}

/// Everything but `A-Z a-z 0-9 - . _ ~` is escaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One path segment, percent-encoded. A segment of only dots is escaped too:
/// `..` would otherwise be a path step to a proxy that normalizes paths.
pub fn segment(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b == b'.') {
        return "%2E".repeat(s.len());
    }
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// One admin API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `GET /api/v1/queue/stats`
    Stats,
    /// `GET /api/v1/queue/messages[?deferred=true&domain=D&limit=N]`
    List(ListQuery),
    /// `GET /api/v1/queue/messages/{id}`
    Show(String),
    /// `DELETE /api/v1/queue/messages/{id}`
    Delete(String),
    /// `POST /api/v1/queue/messages/{id}/retry` or `POST /api/v1/queue/retry?…`
    Retry(RetrySelector),
    /// `GET /api/v1/quotas`
    Quotas,
    /// `GET /api/v1/quotas/{name}[?key=K]`
    Quota { name: String, key: Option<String> },
    /// `GET /api/v1/shaping`: response-rule states in force.
    Shaping,
    /// `POST /api/v1/shaping/{id}/lift`: ends one by hand.
    ShapingLift(String),
    /// `GET /api/v1/suppression[?scope=S&address=A&limit=N]`
    Suppressions(SuppressionQuery),
    /// `POST /api/v1/suppression/{scope}/{address}[?ttl=T]`
    SuppressionAdd {
        scope: String,
        address: String,
        ttl: Option<String>,
    },
    /// `DELETE /api/v1/suppression/{scope}/{address}`
    SuppressionRemove { scope: String, address: String },
    /// `GET /api/v1/events?…`
    Events(crate::events::EventQuery),
}

/// The HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }

    /// Whether the request changes the queue (the relay audits those, so
    /// clients name the person they act for only on them).
    pub fn is_change(self) -> bool {
        self != Method::Get
    }
}

impl Call {
    pub fn method(&self) -> Method {
        match self {
            Call::Stats
            | Call::List(_)
            | Call::Show(_)
            | Call::Quotas
            | Call::Quota { .. }
            | Call::Shaping
            | Call::Suppressions(_)
            | Call::Events(_) => Method::Get,
            Call::Delete(_) | Call::SuppressionRemove { .. } => Method::Delete,
            Call::Retry(_) | Call::ShapingLift(_) | Call::SuppressionAdd { .. } => Method::Post,
        }
    }

    /// The path and query, encoded, starting with `/`.
    pub fn path(&self) -> String {
        let messages = routes::QUEUE_MESSAGES;
        match self {
            Call::Stats => routes::QUEUE_STATS.to_owned(),
            Call::List(q) => with_query(messages, q),
            Call::Show(id) | Call::Delete(id) => format!("{messages}/{}", segment(id)),
            Call::Retry(RetrySelector::Id(id)) => format!("{messages}/{}/retry", segment(id)),
            Call::Retry(RetrySelector::All) => with_query(
                routes::QUEUE_RETRY,
                &RetryQuery {
                    all: true,
                    domain: None,
                },
            ),
            Call::Retry(RetrySelector::Domain(d)) => with_query(
                routes::QUEUE_RETRY,
                &RetryQuery {
                    all: false,
                    domain: Some(d.clone()),
                },
            ),
            Call::Quotas => routes::QUOTAS.to_owned(),
            Call::Shaping => routes::SHAPING.to_owned(),
            Call::ShapingLift(id) => format!("{}/{}/lift", routes::SHAPING, segment(id)),
            Call::Quota { name, key } => with_query(
                &format!("{}/{}", routes::QUOTAS, segment(name)),
                &KeyQuery { key: key.clone() },
            ),
            Call::Suppressions(q) => with_query(routes::SUPPRESSION, q),
            Call::SuppressionAdd {
                scope,
                address,
                ttl,
            } => with_query(
                &format!(
                    "{}/{}/{}",
                    routes::SUPPRESSION,
                    segment(scope),
                    segment(address)
                ),
                &SuppressionAddQuery { ttl: ttl.clone() },
            ),
            Call::SuppressionRemove { scope, address } => format!(
                "{}/{}/{}",
                routes::SUPPRESSION,
                segment(scope),
                segment(address)
            ),
            Call::Events(q) => with_query(routes::EVENTS, q),
        }
    }

    /// The path without its query, for messages ("GET /api/v1/quotas/x").
    pub fn route(&self) -> String {
        let p = self.path();
        p.split('?').next().unwrap_or_default().to_owned()
    }
}

fn with_query(path: &str, query: &impl Serialize) -> String {
    // The query structs hold strings, numbers and booleans only, which
    // serde_urlencoded always writes.
    let q = serde_urlencoded::to_string(query).unwrap_or_default();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(deferred: bool, domain: Option<&str>, limit: Option<usize>) -> String {
        Call::List(ListQuery {
            deferred,
            domain: domain.map(str::to_owned),
            limit,
        })
        .path()
    }

    #[test]
    fn paths_as_the_relay_routes_them() {
        assert_eq!(Call::Stats.path(), "/api/v1/queue/stats");
        assert_eq!(list(false, None, None), "/api/v1/queue/messages");
        assert_eq!(
            list(true, Some("example.org"), Some(5)),
            "/api/v1/queue/messages?deferred=true&domain=example.org&limit=5"
        );
        assert_eq!(
            Call::Retry(RetrySelector::Id("X".into())).path(),
            "/api/v1/queue/messages/X/retry"
        );
        assert_eq!(
            Call::Retry(RetrySelector::All).path(),
            "/api/v1/queue/retry?all=true"
        );
        assert_eq!(
            Call::Retry(RetrySelector::Domain("example.org".into())).path(),
            "/api/v1/queue/retry?domain=example.org"
        );
        assert_eq!(Call::Delete("ID".into()).method(), Method::Delete);
        assert_eq!(Call::Quotas.path(), "/api/v1/quotas");
        let add = Call::SuppressionAdd {
            scope: "domain:a.test".into(),
            address: "x@b.test".into(),
            ttl: Some("1d".into()),
        };
        assert_eq!(
            add.path(),
            "/api/v1/suppression/domain%3Aa.test/x%40b.test?ttl=1d"
        );
        assert_eq!(add.method(), Method::Post);
        assert_eq!(
            Call::Suppressions(SuppressionQuery {
                scope: Some("global".into()),
                address: None,
                limit: Some(5),
            })
            .path(),
            "/api/v1/suppression?scope=global&limit=5"
        );
    }

    #[test]
    fn hostile_values_stay_in_their_segment_or_parameter() {
        assert_eq!(segment("a b/é"), "a%20b%2F%C3%A9");
        assert_eq!(segment("../%2e?x=1#f@h"), "..%2F%252e%3Fx%3D1%23f%40h");
        assert_eq!(segment(".."), "%2E%2E");
        let q = Call::Quota {
            name: "t/a b%".into(),
            key: Some("al ice+1@exämple/&key=x".into()),
        };
        assert_eq!(
            q.path(),
            "/api/v1/quotas/t%2Fa%20b%25?key=al+ice%2B1%40ex%C3%A4mple%2F%26key%3Dx"
        );
        assert_eq!(q.route(), "/api/v1/quotas/t%2Fa%20b%25");
        // What the relay's `Query` extractor reads back is what was meant.
        let back: KeyQuery =
            serde_urlencoded::from_str(q.path().split_once('?').unwrap().1).unwrap();
        assert_eq!(back.key.as_deref(), Some("al ice+1@exämple/&key=x"));
        let l = list(false, Some("a&deferred=true"), None);
        let back: ListQuery = serde_urlencoded::from_str(l.split_once('?').unwrap().1).unwrap();
        assert!(!back.deferred);
        assert_eq!(back.domain.as_deref(), Some("a&deferred=true"));
        // A segment decodes back to the original, byte for byte.
        for s in ["a b", "x/y", "100%", "ünï©ødé", "u@h", ".."] {
            let enc = segment(s);
            assert!(!enc.contains('/') && !enc.contains(' '), "{enc}");
            assert_eq!(
                percent_encoding::percent_decode_str(&enc)
                    .decode_utf8()
                    .unwrap(),
                s
            );
        }
    }
}
