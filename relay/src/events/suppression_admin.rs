//! The suppression endpoints of the admin API (behind its token):
//! `GET /api/v1/suppression[?scope=S&address=A&limit=N]`,
//! `POST /api/v1/suppression/{scope}/{address}[?ttl=30d|never]`,
//! `DELETE /api/v1/suppression/{scope}/{address}`.
//!
//! Errors are JSON `{"error": "..."}`: `400` naming the bad field, `404` for an
//! entry that is not there, `503` when the store cannot be reached.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mailrelay_admin_api::path::routes;
use mailrelay_admin_api::types::{
    ErrorBody, SuppressionAddQuery, SuppressionAdded, SuppressionEntry, SuppressionList,
    SuppressionQuery,
};

use super::suppression::{
    Entry, EntryInfo, Suppression, SuppressionError, normalize_address, normalize_scope,
};
use crate::config::parse_duration;
use crate::config::suppression::MAX_TTL;
use crate::queue::now_ms;

/// Entries returned per list at most.
pub const MAX_LIMIT: usize = 10_000;

pub fn routes(s: Arc<Suppression>) -> Router {
    Router::new()
        .route(routes::SUPPRESSION, get(list))
        .route(
            routes::SUPPRESSION_ENTRY,
            get(show).post(add).delete(remove),
        )
        .with_state(s)
}

fn error(code: StatusCode, msg: String) -> Response {
    (code, Json(ErrorBody { error: msg })).into_response()
}

fn store_error(e: SuppressionError) -> Response {
    match e {
        SuppressionError::Invalid { .. } => error(StatusCode::BAD_REQUEST, e.to_string()),
        _ => {
            tracing::warn!(error = %e, "suppression API: store error");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "suppression store unavailable (see relay log)".into(),
            )
        }
    }
}

fn wire(e: Entry) -> SuppressionEntry {
    SuppressionEntry {
        scope: e.scope,
        address: e.address,
        expires_ms: e.expires_ms,
        reason: e.info.reason,
        detail: e.info.detail,
        queue_id: e.info.queue_id,
        added_ms: e.info.added_ms,
    }
}

/// `limit` checked: 1..=MAX_LIMIT, default 100; else the message.
fn limit(l: Option<usize>) -> Result<usize, String> {
    match l {
        None => Ok(100),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(format!("invalid limit: {n} is outside 1..={MAX_LIMIT}")),
    }
}

/// The ttl of a manual entry: `never`, a duration, or the configured default.
pub fn parse_ttl(ttl: Option<&str>, default: Duration) -> Result<Option<Duration>, String> {
    match ttl {
        None => Ok(Some(default)),
        Some("never") => Ok(None),
        Some(t) => {
            let d = parse_duration(t).map_err(|e| format!("invalid ttl: {e}"))?;
            if d < Duration::from_secs(1) || d > MAX_TTL {
                return Err(format!(
                    "invalid ttl: {t:?} is outside 1s..365d (or use never)"
                ));
            }
            Ok(Some(d))
        }
    }
}

async fn list(State(s): State<Arc<Suppression>>, Query(q): Query<SuppressionQuery>) -> Response {
    let limit = match limit(q.limit) {
        Ok(l) => l,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let address = match q.address.as_deref().map(normalize_address).transpose() {
        Ok(a) => a,
        Err(e) => return store_error(e),
    };
    let scopes = match q.scope.as_deref() {
        Some(sc) => match normalize_scope(sc) {
            Ok(sc) => vec![sc],
            Err(e) => return store_error(e),
        },
        None => match s.store().scopes().await {
            Ok(all) => all,
            Err(e) => return store_error(e),
        },
    };
    let mut entries = Vec::new();
    for sc in &scopes {
        // With an address, the whole list is read to find it (bounded by the cap).
        let n = if address.is_some() {
            s.config().max_entries.min(usize::MAX as u64) as usize
        } else {
            limit
        };
        match s.store().list(sc, n).await {
            Ok(found) => entries.extend(
                found
                    .into_iter()
                    .filter(|e| address.as_ref().is_none_or(|a| &e.address == a))
                    .map(wire),
            ),
            Err(e) => return store_error(e),
        }
    }
    Json(SuppressionList { entries }).into_response()
}

async fn show(
    State(s): State<Arc<Suppression>>,
    Path((scope, address)): Path<(String, String)>,
) -> Response {
    let (scope, address) = match (normalize_scope(&scope), normalize_address(&address)) {
        (Ok(s), Ok(a)) => (s, a),
        (Err(e), _) | (_, Err(e)) => return store_error(e),
    };
    match s
        .store()
        .check(std::slice::from_ref(&scope), &address)
        .await
    {
        Ok(Some(_)) => {
            let all = s
                .store()
                .list(&scope, s.config().max_entries as usize)
                .await;
            match all {
                Ok(v) => match v.into_iter().find(|e| e.address == address) {
                    Some(e) => Json(wire(e)).into_response(),
                    None => error(
                        StatusCode::NOT_FOUND,
                        format!("{address} is not on {scope}"),
                    ),
                },
                Err(e) => store_error(e),
            }
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("{address} is not on {scope}"),
        ),
        Err(e) => store_error(e),
    }
}

async fn add(
    State(s): State<Arc<Suppression>>,
    Path((scope, address)): Path<(String, String)>,
    Query(q): Query<SuppressionAddQuery>,
) -> Response {
    let (scope, address) = match (normalize_scope(&scope), normalize_address(&address)) {
        (Ok(s), Ok(a)) => (s, a),
        (Err(e), _) | (_, Err(e)) => return store_error(e),
    };
    let ttl = match parse_ttl(q.ttl.as_deref(), s.config().ttl) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let info = EntryInfo {
        reason: "manual".into(),
        detail: None,
        queue_id: None,
        added_ms: now_ms(),
    };
    match s
        .store()
        .add(&scope, &address, ttl, &info, s.config().max_entries)
        .await
    {
        Ok(new) => {
            tracing::info!(scope = %scope, to = %address, ttl = ?ttl, "suppression entry added through the admin API");
            let expires_ms = ttl.map(|t| info.added_ms + t.as_millis() as u64);
            Json(SuppressionAdded {
                new,
                entry: wire(Entry {
                    scope,
                    address,
                    expires_ms,
                    info,
                }),
            })
            .into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn remove(
    State(s): State<Arc<Suppression>>,
    Path((scope, address)): Path<(String, String)>,
) -> Response {
    let (scope, address) = match (normalize_scope(&scope), normalize_address(&address)) {
        (Ok(s), Ok(a)) => (s, a),
        (Err(e), _) | (_, Err(e)) => return store_error(e),
    };
    match s.store().remove(&scope, &address).await {
        Ok(true) => {
            tracing::info!(scope = %scope, to = %address, "suppression entry removed through the admin API");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("{address} is not on {scope}"),
        ),
        Err(e) => store_error(e),
    }
}
