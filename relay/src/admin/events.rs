//! `GET /api/v1/events`: delivery events by queue ID, Message-ID, sender,
//! recipient, kind and time range (behind the admin token, like the queue API:
//! events carry envelopes).

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mailrelay_admin_api::path::routes;
use mailrelay_admin_api::types::ErrorBody;
use mailrelay_admin_api::{EventList, EventQuery};

use crate::events::log::{EventError, EventStore};

/// The event routes, to merge into the admin router.
pub fn routes(store: EventStore) -> Router {
    Router::new()
        .route(routes::EVENTS, get(list))
        .with_state(store)
}

fn error(code: StatusCode, msg: String) -> Response {
    (code, Json(ErrorBody { error: msg })).into_response()
}

/// How long one query may take before the client is told to narrow it.
const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

async fn list(State(store): State<EventStore>, Query(q): Query<EventQuery>) -> Response {
    let filter = match q.check() {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("events filter {e}")),
    };
    match tokio::time::timeout(QUERY_TIMEOUT, store.query(&filter)).await {
        Ok(Ok((events, truncated))) => Json(EventList { events, truncated }).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "events API: store error");
            let why = match e {
                EventError::Corrupt(_) => "a stored event is corrupt (see relay log)",
                EventError::Unavailable(_) => "unavailable (see relay log)",
            };
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("event store: {why}"),
            )
        }
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("event store: no answer within {QUERY_TIMEOUT:?}; narrow the time range"),
        ),
    }
}
