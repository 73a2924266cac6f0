//! The queue API under `/api/v1/queue`: list, show, retry and delete messages.
//!
//! Errors are JSON `{"error": "..."}` with a fitting status code; backend error
//! text is logged, never returned (it can carry a store URL with a password).

use axum::Extension;
use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mailrelay_admin_api::types as wire;
pub use mailrelay_admin_api::types::{
    ListQuery, MAX_LIST_LIMIT, MessageDetail, MessageList, MessageSummary, RcptSummary, Retried,
    RetryQuery, StatsBody,
};

use super::auth::{self, Identity};
use super::{AdminState, READY_PING_TIMEOUT, public_reason};
use crate::queue::{
    self, Envelope, ListFilter, MessageStatus, QueueError, QueueFuture, QueueId, RetrySelector,
    now_ms,
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

/// An API error: status code and a public one-line message.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(wire::ErrorBody { error: self.1 })).into_response()
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

fn summary(env: &Envelope, st: &MessageStatus) -> MessageSummary {
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
                state: rcpt_state(r.state),
                attempts: r.attempts.len(),
                last_reply: r.attempts.last().map(|a| a.reply.clone()),
            })
            .collect(),
    }
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
        messages: items.iter().map(|(e, s)| summary(e, s)).collect(),
    }))
}

pub async fn show(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<MessageDetail>, ApiError> {
    let id = parse_id(&id)?;
    match call(state.queue.status(&id)).await? {
        Some((envelope, status)) => Ok(Json(MessageDetail {
            envelope: wire_envelope(envelope),
            status: wire_status(status),
        })),
        None => Err(not_found(&id)),
    }
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

// The API's view of the queue's records. Each conversion destructures the record
// whole: a field added to the store fails the compile here until the API decides
// whether to show it, instead of changing the JSON users script against.

fn rcpt_state(s: queue::RcptState) -> wire::RcptState {
    match s {
        queue::RcptState::Pending => wire::RcptState::Pending,
        queue::RcptState::Delivered => wire::RcptState::Delivered,
        queue::RcptState::Bounced => wire::RcptState::Bounced,
        queue::RcptState::Expired => wire::RcptState::Expired,
    }
}

fn transport_security(t: queue::TransportSecurity) -> wire::TransportSecurity {
    let queue::TransportSecurity {
        policy,
        mode,
        policy_id,
        verified,
        failure,
        dane,
    } = t;
    wire::TransportSecurity {
        policy,
        mode,
        policy_id,
        verified,
        failure,
        dane,
    }
}

fn tls(t: queue::TlsInfo) -> wire::TlsInfo {
    let queue::TlsInfo { version, cipher } = t;
    wire::TlsInfo { version, cipher }
}

/// The envelope as `GET /api/v1/queue/messages/{id}` shows it.
pub fn wire_envelope(e: Envelope) -> wire::Envelope {
    let Envelope {
        id,
        mail,
        recipients,
        client,
        received_at_ms,
        received_by,
    } = e;
    let queue::MailParams {
        from,
        size,
        body,
        smtputf8,
        ret,
        envid,
        requiretls,
    } = mail;
    let queue::ClientInfo {
        ip,
        port,
        helo,
        auth_user,
        tls: client_tls,
        listener,
    } = client;
    wire::Envelope {
        id: id.to_string(),
        mail: wire::MailParams {
            from,
            size,
            body: match body {
                queue::BodyType::SevenBit => wire::BodyType::SevenBit,
                queue::BodyType::EightBitMime => wire::BodyType::EightBitMime,
                queue::BodyType::BinaryMime => wire::BodyType::BinaryMime,
            },
            smtputf8,
            requiretls,
            ret: ret.map(|r| match r {
                queue::DsnRet::Full => wire::DsnRet::Full,
                queue::DsnRet::Hdrs => wire::DsnRet::Hdrs,
            }),
            envid,
        },
        recipients: recipients
            .into_iter()
            .map(|r| {
                let queue::Recipient {
                    address,
                    notify,
                    orcpt,
                } = r;
                wire::Recipient {
                    address,
                    notify: notify.map(|n| {
                        let queue::DsnNotify {
                            never,
                            success,
                            failure,
                            delay,
                        } = n;
                        wire::DsnNotify {
                            never,
                            success,
                            failure,
                            delay,
                        }
                    }),
                    orcpt,
                }
            })
            .collect(),
        client: wire::ClientInfo {
            ip,
            port,
            helo,
            auth_user,
            tls: client_tls.map(tls),
            listener,
        },
        received_at_ms,
        received_by,
    }
}

/// The delivery status as `GET /api/v1/queue/messages/{id}` shows it.
pub fn wire_status(s: MessageStatus) -> wire::MessageStatus {
    let MessageStatus {
        id,
        rcpts,
        created_ms,
        next_attempt_ms,
        attempts,
        final_at_ms,
        leased_until_ms,
        delay_warned,
    } = s;
    wire::MessageStatus {
        id: id.to_string(),
        rcpts: rcpts
            .into_iter()
            .map(|r| {
                let queue::RcptStatus {
                    address,
                    state,
                    attempts,
                    category,
                } = r;
                wire::RcptStatus {
                    address,
                    state: rcpt_state(state),
                    attempts: attempts
                        .into_iter()
                        .map(|a| {
                            let queue::Attempt {
                                at_ms,
                                result,
                                mx,
                                ip,
                                tls: attempt_tls,
                                security,
                                reply,
                                category,
                            } = a;
                            wire::Attempt {
                                at_ms,
                                result: match result {
                                    queue::AttemptResult::Delivered => {
                                        wire::AttemptResult::Delivered
                                    }
                                    queue::AttemptResult::Deferred => wire::AttemptResult::Deferred,
                                    queue::AttemptResult::Bounced => wire::AttemptResult::Bounced,
                                },
                                mx,
                                ip,
                                tls: attempt_tls.map(tls),
                                security: security.map(transport_security),
                                reply,
                                category,
                            }
                        })
                        .collect(),
                    category,
                }
            })
            .collect(),
        created_ms,
        next_attempt_ms,
        attempts,
        final_at_ms,
        leased_until_ms,
        delay_warned,
    }
}
