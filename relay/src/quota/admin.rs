//! `GET /api/v1/quotas` and `GET /api/v1/quotas/{name}[?key=K]` on the admin
//! server: usage per quota and key (see [`super::usage`] for the JSON).
//!
//! Errors are JSON `{"error": "..."}`: `404` for an unknown quota, `503` when the
//! counters cannot be read (details in the log only).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mailrelay_admin_api::path::routes;
use mailrelay_admin_api::types::{ErrorBody, KeyQuery, Lifted, ShapingList, ShapingState};

use super::ingress::engine::Quotas;
use super::ingress::store::StoreError;
use super::usage::{QuotaList, QuotaUsage};

/// The quota routes, to merge into the admin router.
pub fn routes(quotas: Arc<Quotas>) -> Router {
    Router::new()
        .route(routes::QUOTAS, get(list))
        .route(routes::QUOTA, get(show))
        .route(routes::SHAPING, get(shaping))
        .route(routes::SHAPING_LIFT, axum::routing::post(lift))
        .with_state(quotas)
}

fn error(code: StatusCode, msg: String) -> Response {
    (code, Json(ErrorBody { error: msg })).into_response()
}

fn store_error(e: StoreError) -> Response {
    tracing::warn!(error = %e, "quota API: counter store error");
    let why = match e {
        StoreError::Timeout(d) => format!("no answer within {d:?}"),
        _ => "unavailable (see relay log)".to_owned(),
    };
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("quota counters: {why}"),
    )
}

async fn list(State(quotas): State<Arc<Quotas>>) -> Response {
    let set = quotas.set();
    let mut out = Vec::with_capacity(set.quotas.len());
    for q in &set.quotas {
        match quotas.usage(q, None).await {
            Ok(u) => out.push(u),
            Err(e) => return store_error(e),
        }
    }
    Json(QuotaList { quotas: out }).into_response()
}

/// `GET /api/v1/shaping`: response-rule states in force (none while delivery is
/// off in this relay: the states live with egress).
async fn shaping(State(quotas): State<Arc<Quotas>>) -> Response {
    let Some(e) = quotas.egress() else {
        return Json(ShapingList::default()).into_response();
    };
    match e.shaping().await {
        Ok(l) => Json(l).into_response(),
        Err(e) => store_error(e),
    }
}

/// `POST /api/v1/shaping/{id}/lift`: ends a state by hand (`404` when none).
async fn lift(State(quotas): State<Arc<Quotas>>, Path(id): Path<String>) -> Response {
    let Some((site, scope)) = ShapingState::parse_id(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a state id like <scope>@<site>"),
        );
    };
    let Some(e) = quotas.egress() else {
        return error(
            StatusCode::NOT_FOUND,
            "delivery is off in this relay".into(),
        );
    };
    match e.lift(site, scope).await {
        Ok(true) => {
            tracing::info!(%site, %scope, "admin API: response-rule state lifted");
            Json(Lifted { lifted: true }).into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no state {id} in force")),
        Err(e) => store_error(e),
    }
}

async fn show(
    State(quotas): State<Arc<Quotas>>,
    Path(name): Path<String>,
    Query(q): Query<KeyQuery>,
) -> Response {
    let set = quotas.set();
    let Some(quota) = set.get(&name) else {
        return error(StatusCode::NOT_FOUND, format!("quota {name} not found"));
    };
    match quotas.usage(quota, q.key.as_deref()).await {
        Ok(u) => Json::<QuotaUsage>(u).into_response(),
        Err(e) => store_error(e),
    }
}
