//! The admin HTTP server: liveness, readiness, Prometheus metrics and the queue API.
//!
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness).
//! - `GET /readyz`: 200 when the queue store answers a ping within
//!   [`READY_PING_TIMEOUT`] and the relay is not draining; otherwise 503 with a
//!   one-line reason, so Kubernetes stops routing mail to a pod that could not
//!   queue it.
//! - `GET /metrics`: OpenMetrics text, including the queue size.
//! - `GET /api/v1/queue/stats`: counts and oldest age of the queue.
//! - `GET /api/v1/queue/messages[?deferred=true&domain=D&limit=N]`,
//!   `GET|DELETE /api/v1/queue/messages/{id}`, `POST /api/v1/queue/messages/{id}/retry`,
//!   `POST /api/v1/queue/retry?all=true|domain=D`: see [`api`].
//!
//! It binds to an admin address apart from the SMTP listeners. Everything under
//! `/api/` requires a bearer token once one is configured (see [`auth`]); the
//! probes and `/metrics` stay open.

pub mod api;
pub mod auth;
pub mod events;

#[cfg(test)]
mod client_tests;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mailrelay_admin_api::path::routes;

use crate::metrics::Metrics;
use crate::queue::{Inspect, QueueError};

/// How long `/readyz` waits for the queue store; below the usual probe timeout so
/// the probe gets our 503 and reason rather than its own timeout.
pub const READY_PING_TIMEOUT: Duration = Duration::from_secs(2);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
pub struct AdminState {
    pub queue: Arc<dyn Inspect>,
    pub metrics: Arc<Metrics>,
    /// Set on shutdown: the pod stays alive to finish sessions but reports not ready.
    pub draining: Arc<AtomicBool>,
    /// Guards `/api/`; with no token configured the API is open.
    pub auth: auth::AdminAuth,
}

/// Serves the admin API on `listener` until `shutdown` completes, then finishes
/// in-flight requests and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, Router::new(), shutdown).await
}

/// [`serve`], with more routes (the quota API) merged in.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AdminState,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The peer address is kept per request so queue actions can say who did them.
    let auth = state.auth.clone();
    let api =
        api_router(state.clone())
            .merge(extra)
            .route_layer(axum::middleware::from_fn_with_state(
                auth,
                auth::require_token,
            ));
    axum::serve(
        listener,
        open_router(state)
            .merge(api)
            .into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Probes and metrics: never behind the token, so kubelet and Prometheus need none.
fn open_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Everything that reads envelopes or changes state.
fn api_router(state: AdminState) -> Router {
    Router::new()
        .route(routes::QUEUE_STATS, get(api::stats))
        .route(routes::QUEUE_MESSAGES, get(api::list))
        .route(routes::QUEUE_MESSAGE, get(api::show).delete(api::delete))
        .route(routes::QUEUE_MESSAGE_RETRY, post(api::retry_one))
        .route(routes::QUEUE_RETRY, post(api::retry_many))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return unavailable("draining: shutting down".to_owned());
    }
    match tokio::time::timeout(READY_PING_TIMEOUT, state.queue.ping()).await {
        Ok(Ok(())) => "ok".into_response(),
        Ok(Err(e)) => {
            tracing::warn!(backend = state.queue.backend(), error = %e, "readiness: queue ping failed");
            unavailable(format!("queue store unreachable: {}", public_reason(&e)))
        }
        Err(_) => unavailable(format!(
            "queue store unreachable: no answer within {READY_PING_TIMEOUT:?}"
        )),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    // A scrape must not hang on a slow store; the gauges are then just left out.
    let stats = match tokio::time::timeout(READY_PING_TIMEOUT, state.queue.stats()).await {
        Ok(Ok(stats)) => Some(stats),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "metrics: queue stats unavailable");
            None
        }
        Err(_) => None,
    };
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        state.metrics.encode_with_queue_stats(stats),
    )
        .into_response()
}

fn unavailable(reason: String) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, reason).into_response()
}

/// The reason shown over HTTP (and in `kubectl describe pod` for a failed probe).
/// Backend error text is logged but not shown: a store client's message can echo
/// a connection URL, and with it a password.
pub(crate) fn public_reason(e: &QueueError) -> String {
    match e {
        QueueError::Unavailable(_) => "unavailable (see relay log)".to_owned(),
        QueueError::Full(_) => "full (see relay log)".to_owned(),
        QueueError::Timeout(d) => format!("timed out after {d:?}"),
        QueueError::Unreplicated(_) => {
            "replicas did not confirm in time (see relay log)".to_owned()
        }
        QueueError::Corrupt(_) => "corrupt record (see relay log)".to_owned(),
        QueueError::Io(io) => format!("I/O error: {}", io.kind()),
        QueueError::Invalid(_) => "invalid request (see relay log)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{QueueFuture, QueueId, QueueStats, QueuedMessage, Store};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Just enough of a queue to drive the endpoints; real backends have their own tests.
    #[derive(Default)]
    struct FakeQueue {
        failing: AtomicBool,
        hanging: AtomicBool,
    }

    impl FakeQueue {
        fn check(&self) -> Result<(), QueueError> {
            if self.failing.load(Ordering::SeqCst) {
                Err(QueueError::Unavailable(
                    "redis://user:hunter2@redis:6379 refused".into(),
                ))
            } else {
                Ok(())
            }
        }

        async fn maybe_hang(&self) {
            if self.hanging.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
    }

    impl Store for FakeQueue {
        fn backend(&self) -> &'static str {
            "fake"
        }
        fn ping(&self) -> QueueFuture<'_, ()> {
            Box::pin(async {
                self.maybe_hang().await;
                self.check()
            })
        }
    }

    impl Inspect for FakeQueue {
        fn get<'a>(&'a self, _id: &'a QueueId) -> QueueFuture<'a, Option<QueuedMessage>> {
            Box::pin(async { unimplemented!("not used by the admin API") })
        }
        fn list_ids(&self, _limit: usize) -> QueueFuture<'_, Vec<QueueId>> {
            Box::pin(async { unimplemented!("not used by the admin API") })
        }
        fn delivery_totals(&self) -> QueueFuture<'_, crate::queue::DeliveryTotals> {
            Box::pin(async { unimplemented!("not used by the admin API") })
        }
        fn remove<'a>(&'a self, _id: &'a QueueId) -> QueueFuture<'a, bool> {
            Box::pin(async {
                self.check()?;
                Ok(false)
            })
        }
        fn status<'a>(
            &'a self,
            _id: &'a QueueId,
        ) -> QueueFuture<'a, Option<(crate::queue::Envelope, crate::queue::MessageStatus)>>
        {
            Box::pin(async {
                self.check()?;
                Ok(None)
            })
        }
        fn list(
            &self,
            filter: crate::queue::ListFilter,
        ) -> QueueFuture<'_, Vec<(crate::queue::Envelope, crate::queue::MessageStatus)>> {
            Box::pin(async move {
                self.check()?;
                assert_eq!(filter.domain.as_deref(), Some("example.org"));
                assert!(filter.deferred_only);
                assert_eq!(filter.limit, 5);
                Ok(Vec::new())
            })
        }
        fn retry_now(&self, sel: crate::queue::RetrySelector) -> QueueFuture<'_, u64> {
            Box::pin(async move {
                self.check()?;
                Ok(match sel {
                    crate::queue::RetrySelector::All => 3,
                    crate::queue::RetrySelector::Domain(_) => 1,
                    crate::queue::RetrySelector::Id(_) => 0,
                })
            })
        }
        fn stats(&self) -> QueueFuture<'_, QueueStats> {
            Box::pin(async {
                self.check()?;
                Ok(QueueStats {
                    messages: 3,
                    bytes: 1234,
                    ..Default::default()
                })
            })
        }
    }

    struct Server {
        addr: std::net::SocketAddr,
        queue: Arc<FakeQueue>,
        state: AdminState,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start() -> Server {
        start_with(auth::AdminAuth::new(None, None).unwrap()).await
    }

    async fn start_with(auth: auth::AdminAuth) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let queue = Arc::new(FakeQueue::default());
        let state = AdminState {
            queue: queue.clone(),
            metrics: Arc::new(Metrics::new()),
            draining: Arc::new(AtomicBool::new(false)),
            auth,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            queue,
            state,
            stop: Some(stop),
            task,
        }
    }

    /// Returns (status, headers, body) of one `GET` over a fresh connection.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        request(addr, "GET", path).await
    }

    async fn request(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
    ) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("response within 10 s")
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn healthz_and_readyz_follow_queue_and_draining() {
        let srv = start().await;
        let (status, _, body) = get(srv.addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        let (status, _, body) = get(srv.addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));

        srv.queue.failing.store(true, Ordering::SeqCst);
        let (status, _, body) = get(srv.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.starts_with("queue store unreachable"), "{body}");
        assert!(!body.contains("hunter2"), "secret leaked: {body}");
        let (status, _, _) = get(srv.addr, "/healthz").await;
        assert_eq!(status, 200, "liveness does not depend on the queue");

        srv.queue.failing.store(false, Ordering::SeqCst);
        srv.state.draining.store(true, Ordering::SeqCst);
        let (status, _, body) = get(srv.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("draining"), "{body}");

        let (status, _, _) = get(srv.addr, "/nope").await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn readyz_gives_up_on_a_hanging_store() {
        let srv = start().await;
        srv.queue.hanging.store(true, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let (status, _, body) = get(srv.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("no answer within"), "{body}");
        assert!(started.elapsed() < READY_PING_TIMEOUT + Duration::from_secs(2));
    }

    #[tokio::test]
    async fn metrics_and_queue_stats() {
        let srv = start().await;
        srv.state.metrics.command("EHLO");
        srv.state.metrics.command("EHLO");
        srv.state.metrics.connection_opened("smtp");

        let (status, head, body) = get(srv.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains(&format!("content-type: {OPENMETRICS}")),
            "{head}"
        );
        for needle in [
            "# TYPE mailrelay_smtp_connections counter",
            "# TYPE mailrelay_queue_write_seconds histogram",
            "# TYPE mailrelay_tls_handshakes counter",
            "mailrelay_smtp_commands_total{command=\"EHLO\"} 2\n",
            "mailrelay_smtp_connections_active 1\n",
            "mailrelay_queue_messages 3\n",
            "mailrelay_queue_bytes 1234\n",
        ] {
            assert!(body.contains(needle), "{needle:?} missing:\n{body}");
        }
        assert!(body.ends_with("# EOF\n"));

        let (status, head, body) = get(srv.addr, "/api/v1/queue/stats").await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "messages": 3, "bytes": 1234, "leased": 0, "deferred": 0, "oldest_ms": null,
                "oldest_age_seconds": null
            })
        );

        // Stats unavailable: metrics still served without the queue gauges.
        srv.queue.failing.store(true, Ordering::SeqCst);
        let (status, _, body) = get(srv.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(!body.contains("mailrelay_queue_messages"), "{body}");
        assert!(body.contains("mailrelay_smtp_commands_total{command=\"EHLO\"} 2\n"));
        let (status, _, body) = get(srv.addr, "/api/v1/queue/stats").await;
        assert_eq!(status, 503);
        assert!(!body.contains("hunter2"), "{body}");
    }

    #[tokio::test]
    async fn queue_message_routes() {
        let srv = start().await;
        let id = QueueId::generate();
        let json = |b: &str| serde_json::from_str::<serde_json::Value>(b).unwrap();

        let (status, _, body) = get(srv.addr, "/api/v1/queue/messages/not-an-id").await;
        assert_eq!(status, 400);
        assert!(json(&body)["error"].as_str().unwrap().contains("malformed"));
        let (status, _, body) = get(srv.addr, &format!("/api/v1/queue/messages/{id}")).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(json(&body)["error"], format!("message {id} not found"));
        let (status, _, _) =
            request(srv.addr, "DELETE", &format!("/api/v1/queue/messages/{id}")).await;
        assert_eq!(status, 404);
        let (status, _, _) = request(
            srv.addr,
            "POST",
            &format!("/api/v1/queue/messages/{id}/retry"),
        )
        .await;
        assert_eq!(status, 404);

        let (status, _, body) = get(
            srv.addr,
            "/api/v1/queue/messages?deferred=true&domain=example.org&limit=5",
        )
        .await;
        assert_eq!(
            (status, json(&body)),
            (200, serde_json::json!({"messages": []}))
        );
        let (status, _, _) = get(srv.addr, "/api/v1/queue/messages?limit=0").await;
        assert_eq!(status, 400);

        let (status, _, body) = request(srv.addr, "POST", "/api/v1/queue/retry?all=true").await;
        assert_eq!(
            (status, json(&body)),
            (200, serde_json::json!({"retried": 3}))
        );
        let (status, _, body) =
            request(srv.addr, "POST", "/api/v1/queue/retry?domain=example.org").await;
        assert_eq!(
            (status, json(&body)),
            (200, serde_json::json!({"retried": 1}))
        );
        let (status, _, body) = request(srv.addr, "POST", "/api/v1/queue/retry").await;
        assert_eq!(status, 400);
        assert!(json(&body)["error"].is_string());

        srv.queue.failing.store(true, Ordering::SeqCst);
        let (status, _, body) = get(srv.addr, &format!("/api/v1/queue/messages/{id}")).await;
        assert_eq!(status, 503);
        assert!(!body.contains("hunter2"), "secret leaked: {body}");
        assert!(json(&body)["error"].is_string());
    }

    #[tokio::test]
    async fn without_a_token_a_non_loopback_listener_refuses_the_api() {
        // As `serve` would be set up for 0.0.0.0 (the test connects over loopback).
        let auth = auth::AdminAuth::new(None, None)
            .unwrap()
            .for_address("0.0.0.0:9325".parse().unwrap());
        let srv = start_with(auth).await;
        for (method, path) in [
            ("GET", "/api/v1/queue/stats"),
            ("POST", "/api/v1/queue/retry?all=true"),
            ("DELETE", "/api/v1/queue/messages/06H29YVZVR66DSV6D7BS"),
        ] {
            let (status, head, body) = request(srv.addr, method, path).await;
            assert_eq!(status, 403, "{method} {path}: {body}");
            assert!(head.contains("content-type: application/json"), "{head}");
            assert!(body.contains("no admin token is configured"), "{body}");
        }
        assert_eq!(get(srv.addr, "/metrics").await.0, 200);
        assert_eq!(get(srv.addr, "/readyz").await.0, 200);
    }

    #[tokio::test]
    async fn shutdown_stops_the_server() {
        let mut srv = start().await;
        assert_eq!(get(srv.addr, "/healthz").await.0, 200);
        srv.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), &mut srv.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}
