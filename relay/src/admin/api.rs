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
    Envelope, ListFilter, MessageStatus, QueueError, QueueFuture, QueueId, RetrySelector, now_ms,
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
                state: r.state,
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

// The API's view of the queue's records. The recipients' records, the envelope's
// parts and the TLS records are the API's own types (the queue stores them), so
// they pass as they are; only the queue ID is typed differently (a checked
// `QueueId` in the queue, its text on the wire). Each conversion destructures the
// record whole: a field added to the envelope or the status fails the compile here
// until the API decides whether to show it.

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
    wire::Envelope {
        id: id.to_string(),
        mail,
        recipients,
        client,
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
        rcpts,
        created_ms,
        next_attempt_ms,
        attempts,
        final_at_ms,
        leased_until_ms,
        delay_warned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{
        Attempt, AttemptResult, BodyType, ClientInfo, DsnNotify, DsnRet, MailParams, QueueId,
        RcptState, RcptStatus, Recipient, TlsInfo, TransportSecurity,
    };
    use serde_json::json;

    /// The JSON of `GET /api/v1/queue/messages/{id}`, every field set once, pinned:
    /// the queue's records are the API's types now, and this is what clients read.
    #[test]
    fn message_detail_json_is_pinned() {
        let id = QueueId::parse("06H2AAMFWWNZ5B3JQCBB").unwrap();
        let tls = TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
        };
        let envelope = Envelope {
            id: id.clone(),
            mail: MailParams {
                from: "alice@a.example".into(),
                size: Some(42),
                body: BodyType::EightBitMime,
                smtputf8: true,
                ret: Some(DsnRet::Hdrs),
                envid: Some("env-1".into()),
                requiretls: true,
            },
            recipients: vec![
                Recipient {
                    address: "bob@example.org".into(),
                    notify: Some(DsnNotify {
                        failure: true,
                        delay: true,
                        ..DsnNotify::default()
                    }),
                    orcpt: Some("rfc822;bob@example.org".into()),
                },
                Recipient {
                    address: "carol@other.test".into(),
                    notify: None,
                    orcpt: None,
                },
            ],
            client: ClientInfo {
                ip: "192.0.2.7".parse().unwrap(),
                port: 2525,
                helo: "client.test".into(),
                auth_user: Some("alice".into()),
                tls: Some(tls.clone()),
                listener: "submission".into(),
            },
            received_at_ms: 1_000,
            received_by: "relay.test".into(),
        };
        let status = MessageStatus {
            id,
            rcpts: vec![
                RcptStatus {
                    address: "bob@example.org".into(),
                    state: RcptState::Bounced,
                    attempts: vec![Attempt {
                        at_ms: 2_000,
                        result: AttemptResult::Bounced,
                        mx: Some("mx.example.org".into()),
                        ip: Some("198.51.100.1".into()),
                        tls: Some(tls),
                        security: Some(TransportSecurity {
                            policy: "mta-sts".into(),
                            mode: Some("enforce".into()),
                            policy_id: Some("p1".into()),
                            verified: Some(true),
                            failure: None,
                            dane: Some("no TLSA".into()),
                        }),
                        reply: "550 5.1.1 no such user".into(),
                        category: Some("invalid_recipient".into()),
                    }],
                    category: Some("invalid_recipient".into()),
                },
                RcptStatus {
                    address: "carol@other.test".into(),
                    state: RcptState::Pending,
                    attempts: vec![],
                    category: None,
                },
            ],
            created_ms: 1_000,
            next_attempt_ms: Some(3_000),
            attempts: 1,
            final_at_ms: None,
            leased_until_ms: Some(4_000),
            delay_warned: false,
        };
        let detail = MessageDetail {
            envelope: wire_envelope(envelope),
            status: wire_status(status),
        };
        let v = serde_json::to_value(&detail).unwrap();
        assert_eq!(
            v,
            json!({
                "envelope": {
                    "id": "06H2AAMFWWNZ5B3JQCBB",
                    "mail": {"from": "alice@a.example", "size": 42, "body": "8bitmime",
                             "smtputf8": true, "requiretls": true, "ret": "hdrs", "envid": "env-1"},
                    "recipients": [
                        {"address": "bob@example.org",
                         "notify": {"never": false, "success": false, "failure": true, "delay": true},
                         "orcpt": "rfc822;bob@example.org"},
                        {"address": "carol@other.test"}
                    ],
                    "client": {"ip": "192.0.2.7", "port": 2525, "helo": "client.test",
                               "auth_user": "alice",
                               "tls": {"version": "TLSv1.3", "cipher": "TLS13_AES_128_GCM_SHA256"},
                               "listener": "submission"},
                    "received_at_ms": 1000,
                    "received_by": "relay.test"
                },
                "status": {
                    "id": "06H2AAMFWWNZ5B3JQCBB",
                    "rcpts": [
                        {"address": "bob@example.org", "state": "bounced",
                         "attempts": [{"at_ms": 2000, "result": "bounced", "mx": "mx.example.org",
                                       "ip": "198.51.100.1",
                                       "tls": {"version": "TLSv1.3", "cipher": "TLS13_AES_128_GCM_SHA256"},
                                       "security": {"policy": "mta-sts", "mode": "enforce",
                                                    "policy_id": "p1", "verified": true,
                                                    "dane": "no TLSA"},
                                       "reply": "550 5.1.1 no such user",
                                       "category": "invalid_recipient"}],
                         "category": "invalid_recipient"},
                        {"address": "carol@other.test", "state": "pending", "attempts": []}
                    ],
                    "created_ms": 1000,
                    "next_attempt_ms": 3000,
                    "attempts": 1,
                    "leased_until_ms": 4000
                }
            })
        );
        // And clients read it back as it was.
        assert_eq!(serde_json::from_value::<MessageDetail>(v).unwrap(), detail);
    }
}
