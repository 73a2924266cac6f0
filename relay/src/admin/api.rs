//! The queue API under `/api/v1/queue`: list, show, retry and delete messages.
//!
//! Errors are JSON `{"error": "..."}` with a fitting status code; backend error
//! text is logged, never returned (it can carry a store URL with a password).

use axum::Extension;
use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::auth::{self, Identity};
use super::{AdminState, READY_PING_TIMEOUT, public_reason};
use crate::queue::{
    Envelope, ListFilter, MessageStatus, QueueError, QueueFuture, QueueId, RcptState,
    RetrySelector, now_ms,
};

/// Who asked for a queue action, for the audit log line every change leaves: the
/// identity that passed [`super::auth`] ("token:file", "token:env", or
/// "anonymous" when no token is configured), the peer address, the user agent as
/// the client named itself, and `actor`: the person the client says it acts for
/// ([`auth::ACTOR_HEADER`]), a claim authenticated only through the token. Both
/// client-supplied texts pass [`auth::audit_text`].
pub struct Actor {
    peer: std::net::SocketAddr,
    user_agent: String,
    identity: &'static str,
    actor: String,
}

impl Actor {
    fn new(
        ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
        headers: &HeaderMap,
        Extension(Identity(identity)): Extension<Identity>,
    ) -> Self {
        let text = |name: &str, max: usize| {
            headers
                .get(name)
                .map(|v| auth::audit_text(v.as_bytes(), max))
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "-".to_owned())
        };
        Actor {
            peer,
            user_agent: text(axum::http::header::USER_AGENT.as_str(), 100),
            identity,
            actor: text(auth::ACTOR_HEADER, auth::MAX_ACTOR_LEN),
        }
    }
}

/// Most messages one list request returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// An API error: status code and a public one-line message.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        tracing::warn!(error = %e, "queue API: store error");
        let code = match e {
            QueueError::Invalid(_) => StatusCode::BAD_REQUEST,
            QueueError::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, format!("queue store: {}", public_reason(&e)))
    }
}

async fn call<T>(fut: QueueFuture<'_, T>) -> Result<T, ApiError> {
    match tokio::time::timeout(READY_PING_TIMEOUT * 5, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("queue store: no answer within {:?}", READY_PING_TIMEOUT * 5),
        )),
    }
}

fn parse_id(id: &str) -> Result<QueueId, ApiError> {
    QueueId::parse(id).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "malformed queue id (expected 20 Crockford base32 characters)".to_owned(),
        )
    })
}

fn not_found(id: &QueueId) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("message {id} not found"))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    deferred: bool,
    domain: Option<String>,
    limit: Option<usize>,
}

/// One recipient in a list entry.
#[derive(Debug, Serialize, Deserialize)]
pub struct RcptSummary {
    pub address: String,
    pub state: RcptState,
    pub attempts: usize,
    pub last_reply: Option<String>,
}

/// One message in `GET /api/v1/queue/messages`.
#[derive(Debug, Serialize, Deserialize)]
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

impl MessageSummary {
    fn new(env: &Envelope, st: &MessageStatus) -> Self {
        MessageSummary {
            id: env.id.to_string(),
            from: env.mail.from.clone(),
            declared_size: env.mail.size,
            received_at_ms: env.received_at_ms,
            attempts: st.attempts,
            next_attempt_ms: st.next_attempt_ms,
            leased_until_ms: st.leased_until_ms,
            rcpts: st
                .rcpts
                .iter()
                .map(|r| RcptSummary {
                    address: r.address.clone(),
                    state: r.state,
                    attempts: r.attempts.len(),
                    last_reply: r.attempts.last().map(|a| a.reply.clone()),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MessageList {
    pub messages: Vec<MessageSummary>,
}

pub async fn list(
    State(state): State<AdminState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<MessageList>, ApiError> {
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_LIST_LIMIT}"),
        ));
    }
    let filter = ListFilter {
        deferred_only: q.deferred,
        domain: q.domain.filter(|d| !d.is_empty()),
        limit,
    };
    let items = call(state.queue.list(filter)).await?;
    Ok(Json(MessageList {
        messages: items
            .iter()
            .map(|(e, s)| MessageSummary::new(e, s))
            .collect(),
    }))
}

/// `GET /api/v1/queue/messages/{id}`: envelope and full status.
#[derive(Debug, Serialize, Deserialize)]
pub struct MessageDetail {
    pub envelope: Envelope,
    pub status: MessageStatus,
}

pub async fn show(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<MessageDetail>, ApiError> {
    let id = parse_id(&id)?;
    match call(state.queue.status(&id)).await? {
        Some((envelope, status)) => Ok(Json(MessageDetail { envelope, status })),
        None => Err(not_found(&id)),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Retried {
    pub retried: u64,
}

pub async fn retry_one(
    State(state): State<AdminState>,
    peer: ConnectInfo<std::net::SocketAddr>,
    identity: Extension<Identity>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Retried>, ApiError> {
    let who = Actor::new(peer, &headers, identity);
    let id = parse_id(&id)?;
    let n = call(state.queue.retry_now(RetrySelector::Id(id.clone()))).await?;
    tracing::info!(action = "retry", queue_id = %id, retried = n, peer = %who.peer, user_agent = who.user_agent.as_str(), identity = who.identity, actor = who.actor.as_str(), "admin: queue retry");
    if n == 0 && call(state.queue.status(&id)).await?.is_none() {
        return Err(not_found(&id));
    }
    Ok(Json(Retried { retried: n }))
}

#[derive(Debug, Deserialize)]
pub struct RetryQuery {
    #[serde(default)]
    all: bool,
    domain: Option<String>,
}

pub async fn retry_many(
    State(state): State<AdminState>,
    peer: ConnectInfo<std::net::SocketAddr>,
    identity: Extension<Identity>,
    headers: HeaderMap,
    Query(q): Query<RetryQuery>,
) -> Result<Json<Retried>, ApiError> {
    let who = Actor::new(peer, &headers, identity);
    let sel = match (q.all, q.domain.filter(|d| !d.is_empty())) {
        (true, None) => RetrySelector::All,
        (false, Some(d)) => RetrySelector::Domain(d),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give exactly one of all=true or domain=D".to_owned(),
            ));
        }
    };
    let what = match &sel {
        RetrySelector::All => "all".to_owned(),
        RetrySelector::Domain(d) => format!("domain={d}"),
        RetrySelector::Id(id) => id.to_string(),
    };
    let n = call(state.queue.retry_now(sel)).await?;
    tracing::info!(action = "retry", selector = ?what, retried = n, peer = %who.peer, user_agent = who.user_agent.as_str(), identity = who.identity, actor = who.actor.as_str(), "admin: queue retry");
    Ok(Json(Retried { retried: n }))
}

pub async fn delete(
    State(state): State<AdminState>,
    peer: ConnectInfo<std::net::SocketAddr>,
    identity: Extension<Identity>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = Actor::new(peer, &headers, identity);
    let id = parse_id(&id)?;
    let removed = call(state.queue.remove(&id)).await?;
    tracing::info!(action = "delete", queue_id = %id, removed, peer = %who.peer, user_agent = who.user_agent.as_str(), identity = who.identity, actor = who.actor.as_str(), "admin: queue delete");
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&id))
    }
}

/// `GET /api/v1/queue/stats`: the backend's [`crate::queue::QueueStats`] plus
/// `oldest_age_seconds`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsBody {
    pub messages: u64,
    pub bytes: u64,
    pub leased: u64,
    pub deferred: u64,
    pub oldest_ms: Option<u64>,
    pub oldest_age_seconds: Option<u64>,
}

pub async fn stats(State(state): State<AdminState>) -> Result<Json<StatsBody>, ApiError> {
    let s = match tokio::time::timeout(READY_PING_TIMEOUT, state.queue.stats()).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("queue store unreachable: no answer within {READY_PING_TIMEOUT:?}"),
            ));
        }
    };
    Ok(Json(StatsBody {
        messages: s.messages,
        bytes: s.bytes,
        leased: s.leased,
        deferred: s.deferred,
        oldest_ms: s.oldest_ms,
        oldest_age_seconds: s.oldest_ms.map(|o| now_ms().saturating_sub(o) / 1000),
    }))
}
