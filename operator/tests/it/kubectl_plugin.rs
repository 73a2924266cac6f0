//! `kubectl-mailrelay` end to end, every verb and output format.
//!
//! No Kubernetes API server can run here, so the test serves a small stand-in for
//! the parts the plugin uses: `GET` of MailRelay objects (with bearer-token auth,
//! namespaces and kube-style `Status` errors), and the service proxy
//! `/api/v1/namespaces/{ns}/services/{NAME}-admin:admin/proxy/...`, which forwards
//! to a REAL relay (the mailrelay library's SMTP server, queue, delivery and admin
//! API, started in this process on free ports). Mail reaches it from swaks and is
//! delivered through a smarthost played by aiosmtpd, which defers some recipients,
//! so the queue holds messages with attempts and remote replies. The plugin runs
//! as its real binary with a kubeconfig pointing at the stand-in.
//!
//! The relay's quota usage API (`/api/v1/quotas`) is answered by the stand-in with
//! the JSON agreed in crd-shape.md (the relay's own endpoint is built elsewhere).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mailrelay::admin::{self, AdminState};
use mailrelay::config::RelayConfig;
use mailrelay::delivery::scheduler::Delivery;
use mailrelay::events::log::{EmbeddedEvents, EventMetrics, EventSink, EventStore};
use mailrelay::metrics::Metrics;
use mailrelay::queue::{EmbeddedQueue, Inspect, Queue};
use mailrelay::server::{self, Shared};

const TOKEN: &str = "plugin-test-token";

// ---------------------------------------------------------------------------
// The smarthost: aiosmtpd, scripted by recipient local part.

const SMARTHOST: &str = r#"
import asyncio, sys
from aiosmtpd.smtp import SMTP

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("busy"):
            return "450 4.2.1 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 OK accepted"

async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: SMTP(Handler(), hostname="smarthost.test"),
                                   "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

struct Smarthost {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Smarthost {
    fn start() -> Smarthost {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("smarthost.py");
        std::fs::write(&script, SMARTHOST).unwrap();
        let mut child = Command::new("python3")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 with aiosmtpd (from .ci/install-deps)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("aiosmtpd did not start (printed {line:?})"));
        Smarthost {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Smarthost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// A real relay, in process: the same library code `mailrelay serve` runs.

struct RealRelay {
    smtp: SocketAddr,
    admin: SocketAddr,
    /// The admin token the relay accepts (the operator's Secret in a cluster).
    token: String,
    /// The relay's `admin.token_file` (the mounted Secret in a pod).
    token_file: PathBuf,
    _delivery: Delivery,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_relay(smarthost_port: u16, token: &str) -> RealRelay {
    start_relay_with(smarthost_port, token, Router::new()).await
}

/// [`start_relay`] with more admin API routes (e.g. the quota and shaping ones).
async fn start_relay_with(smarthost_port: u16, token: &str, extra: Router) -> RealRelay {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin: SocketAddr = admin_listener.local_addr().unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Retries far off, so what the test sees changes only when it says `retry`.
    let yaml = format!(
        "hostname: relay.test\n\
         listeners: [{{name: smtp, address: '{smtp}'}}]\n\
         admin: {{address: '{admin}'}}\n\
         queue: {{path: '{}'}}\n\
         delivery:\n  poll_interval: 200ms\n  smarthost: {{host: 127.0.0.1, port: {smarthost_port}, tls: disabled}}\n  retry: {{first: 1h, max_backoff: 4h}}\n",
        dir.path().join("queue").display()
    );
    let cfg = RelayConfig::from_yaml(&yaml).expect("test relay config");
    let embedded = EmbeddedQueue::open(&cfg.queue.path).expect("open embedded queue");
    // Delivery events in the queue's own file, as `mailrelay serve` keeps them.
    let events = EventStore::Embedded(
        EmbeddedEvents::open(embedded.database(), 10_000).expect("open the event store"),
    );
    let sink = EventSink::start(
        events.clone(),
        &mailrelay::config::EventsConfig::default(),
        EventMetrics::default(),
    );
    let queue: Arc<dyn Queue> = Arc::new(embedded);
    let metrics = Arc::new(Metrics::new());
    let state = AdminState {
        queue: Arc::clone(&queue) as Arc<dyn Inspect>,
        metrics: Arc::clone(&metrics),
        draining: Arc::new(AtomicBool::new(false)),
        // As the operator configures it: the token file from the admin token Secret.
        auth: admin::auth::AdminAuth::new(Some(token_file.clone()), None).expect("token file"),
    };
    // Suppression lists in memory, so `suppression` has endpoints to reach.
    let suppression = Arc::new(mailrelay::events::suppression::Suppression::new(
        Box::new(mailrelay::events::suppression::MemorySuppression::new()),
        mailrelay::config::suppression::SuppressionConfig::default(),
    ));
    tokio::spawn(admin::serve_with(
        admin_listener,
        state,
        mailrelay::events::suppression_admin::routes(suppression)
            .merge(admin::events::routes(events))
            .merge(extra),
        std::future::pending::<()>(),
    ));
    let listeners = server::bind(&cfg).expect("bind SMTP");
    let delivery = Delivery::start(
        Arc::clone(&queue),
        cfg.delivery.clone(),
        cfg.hostname.clone(),
        Arc::clone(&metrics),
    )
    .expect("start delivery");
    delivery.record_events_with(sink.clone());
    let shared = Shared::new(cfg, queue, metrics, None, None, None);
    shared.set_events(sink);
    tokio::spawn(server::serve(
        shared,
        listeners,
        std::future::pending::<()>(),
    ));
    RealRelay {
        smtp,
        admin,
        token: token.to_owned(),
        token_file,
        _delivery: delivery,
        _dir: dir,
    }
}

/// One request to a plain HTTP server (the relay's admin API), with the admin
/// token in `X-Mailrelay-Admin-Token`: status, content type, body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String, Vec<u8>) {
    http_as(addr, method, path, token, None).await
}

/// [`http`], also claiming to act for `actor` (`X-Mailrelay-Actor`).
async fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    actor: Option<&str>,
) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let token = token
        .map(|t| format!("X-Mailrelay-Admin-Token: {t}\r\n"))
        .unwrap_or_default();
    let actor = actor
        .map(|a| format!("X-Mailrelay-Actor: {a}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{token}{actor}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("admin API answers")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, ctype, raw[split + 4..].to_vec())
}

async fn admin_json(relay: &RealRelay, path: &str) -> Value {
    let (code, _, body) = http(relay.admin, "GET", path, Some(&relay.token)).await;
    assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn swaks(relay: &RealRelay, from: &str, to: &str) {
    let out = Command::new("swaks")
        .args(["--server", &relay.smtp.to_string()])
        .args(["--from", from, "--to", to])
        .args(["--header", "Subject: plugin test"])
        .output()
        .expect("swaks (from .ci/install-deps)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("250 2.0.0 Ok: queued as"),
        "swaks failed: {text}"
    );
}

// ---------------------------------------------------------------------------
// The Kubernetes API stand-in.

#[derive(Clone)]
struct Stub {
    /// (namespace, name) -> MailRelay object.
    relays: Arc<BTreeMap<(String, String), Value>>,
    /// (namespace, admin service "NAME-admin:admin") -> admin API address; a relay
    /// without an entry has no ready endpoint.
    backends: Arc<BTreeMap<(String, String), SocketAddr>>,
    /// Every request: "METHOD path?query".
    log: Arc<Mutex<Vec<String>>>,
    /// Whether the MailRelay CRD is installed (served and in discovery).
    crd: bool,
    /// (namespace, Secret name) -> the `token` value of admin token Secrets.
    secrets: Arc<Mutex<BTreeMap<(String, String), String>>>,
    /// The user may not `get` Secrets (RBAC): 403 for each.
    forbid_secrets: Arc<AtomicBool>,
    /// The username a SelfSubjectReview answers; `None`: 403, as a cluster whose
    /// policy forbids it (an older one answers 404, which the plugin treats alike).
    review_user: Arc<Mutex<Option<String>>>,
}

/// What a real API server answers for a path nothing serves (a CRD not installed).
fn no_such_resource() -> Response {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

async fn discovery(State(stub): State<Stub>) -> Response {
    if !stub.crd {
        return no_such_resource();
    }
    axum::Json(json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": "mailrelay.io/v1alpha1", "resources": [
            {"name": "mailrelays", "singularName": "mailrelay", "namespaced": true,
             "kind": "MailRelay", "verbs": ["get", "list"], "shortNames": ["mr"]},
            {"name": "sendquotas", "singularName": "sendquota", "namespaced": true,
             "kind": "SendQuota", "verbs": ["get", "list"], "shortNames": ["sq"]}]}))
    .into_response()
}

async fn list_all_relays(State(stub): State<Stub>) -> Response {
    if !stub.crd {
        return no_such_resource();
    }
    let items: Vec<Value> = stub.relays.values().cloned().collect();
    axum::Json(
        json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelayList",
                      "metadata": {"resourceVersion": "1"}, "items": items}),
    )
    .into_response()
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code})
        .to_string(),
    )
        .into_response()
}

fn authorized(h: &HeaderMap) -> bool {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"))
}

async fn record(State(stub): State<Stub>, req: Request, next: axum::middleware::Next) -> Response {
    let line = format!("{} {}", req.method(), req.uri());
    stub.log.lock().unwrap().push(line);
    if !authorized(req.headers()) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    next.run(req).await
}

/// `GET` of a Secret, as the API server answers it for the user's RBAC.
async fn get_secret(
    State(stub): State<Stub>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    if stub
        .forbid_secrets
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return status(
            403,
            "Forbidden",
            &format!(
                "secrets \"{name}\" is forbidden: User \"tester\" cannot get resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
            ),
        );
    }
    match stub
        .secrets
        .lock()
        .unwrap()
        .get(&(ns.clone(), name.clone()))
    {
        Some(token) => {
            let data =
                serde_json::to_value(k8s_openapi::ByteString(token.as_bytes().to_vec())).unwrap();
            axum::Json(
                json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": ns}, "data": {"token": data}}),
            )
            .into_response()
        }
        None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
    }
}

/// `POST` of a SelfSubjectReview: who the API server says the caller is.
async fn self_subject_review(State(stub): State<Stub>) -> Response {
    match stub.review_user.lock().unwrap().clone() {
        Some(user) => (
            StatusCode::CREATED,
            axum::Json(json!({"apiVersion": "authentication.k8s.io/v1",
                "kind": "SelfSubjectReview", "metadata": {"creationTimestamp": null},
                "status": {"userInfo": {"username": user, "groups": ["system:authenticated"]}}})),
        )
            .into_response(),
        None => status(
            403,
            "Forbidden",
            "selfsubjectreviews.authentication.k8s.io is forbidden: User \"tester\" cannot create resource \"selfsubjectreviews\"",
        ),
    }
}

async fn get_relay(
    State(stub): State<Stub>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    if !stub.crd {
        return no_such_resource();
    }
    match stub.relays.get(&(ns, name.clone())) {
        Some(o) => axum::Json(o.clone()).into_response(),
        None => status(
            404,
            "NotFound",
            &format!("mailrelays.mailrelay.io \"{name}\" not found"),
        ),
    }
}

async fn list_relays(State(stub): State<Stub>, UrlPath(ns): UrlPath<String>) -> Response {
    if !stub.crd {
        return no_such_resource();
    }
    let items: Vec<Value> = stub
        .relays
        .iter()
        .filter(|((n, _), _)| *n == ns)
        .map(|(_, o)| o.clone())
        .collect();
    axum::Json(
        json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelayList",
                      "metadata": {"resourceVersion": "1"}, "items": items}),
    )
    .into_response()
}

/// Quota usage as the relay will serve it (crd-shape.md).
fn quota_usage() -> Value {
    json!({"quotas": [
        {"name": "tenant-a", "direction": "ingress", "scope": "per_key", "action": "reject",
         "limits": ["100/1m", "1000/1h"],
         "keys": [{"key": "alice@a.example", "windows": [
            {"limit": "100/1m", "window_seconds": 60, "used": 12, "remaining": 88,
             "resets_at": "2026-11-29T05:01:00Z", "resets_in_seconds": 31},
            {"limit": "1000/1h", "window_seconds": 3600, "used": 140, "remaining": 860,
             "resets_at": "2026-11-29T05:40:00Z", "resets_in_seconds": 2400}]}]},
        {"name": "gmail-pacing", "direction": "egress", "scope": "shared", "action": null,
         "limits": ["500/1h"],
         "keys": [{"key": "*", "connections": {"max": 5, "open": 2}, "windows": [
            {"limit": "500/1h", "window_seconds": 3600, "used": 42, "remaining": 458,
             "resets_at": "2026-11-29T05:30:00Z", "resets_in_seconds": 1800}]}]}
    ]})
}

async fn proxy(
    State(stub): State<Stub>,
    UrlPath((ns, svc, rest)): UrlPath<(String, String, String)>,
    method: Method,
    req: Request,
) -> Response {
    let known = stub
        .relays
        .keys()
        .any(|(n, name)| *n == ns && format!("{name}-admin:admin") == svc);
    if !known {
        let bare = svc.split(':').next().unwrap_or_default();
        return status(404, "NotFound", &format!("services \"{bare}\" not found"));
    }
    let Some(addr) = stub.backends.get(&(ns.clone(), svc.clone())).copied() else {
        let bare = svc.split(':').next().unwrap_or_default();
        return status(
            503,
            "ServiceUnavailable",
            &format!("no endpoints available for service \"{bare}\""),
        );
    };
    // The API server passes other headers on, but not `Authorization` (which
    // authenticated the user): so does the stand-in.
    let token = req
        .headers()
        .get("x-mailrelay-admin-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let path = format!("/{rest}");
    if path.starts_with("/api/v1/quotas") {
        // Answered here, but guarded like the relay's own: the relay's token.
        let relay = svc.trim_end_matches("-admin:admin");
        let want = stub
            .secrets
            .lock()
            .unwrap()
            .get(&(ns.clone(), format!("{relay}-admin-token")))
            .and_then(|t| t.lines().next().map(str::to_owned));
        if want.is_none() || token != want {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": "admin API: invalid admin token"})),
            )
                .into_response();
        }
    }
    if path == "/api/v1/quotas" {
        return axum::Json(quota_usage()).into_response();
    }
    if let Some(q) = path.strip_prefix("/api/v1/quotas/") {
        let all = quota_usage();
        return match all["quotas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == q)
        {
            Some(x) => axum::Json(x.clone()).into_response(),
            None => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": format!("quota {q} not found")})),
            )
                .into_response(),
        };
    }
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let actor = req
        .headers()
        .get("x-mailrelay-actor")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (code, ctype, body) = http_as(
        addr,
        method.as_str(),
        &pq,
        token.as_deref(),
        actor.as_deref(),
    )
    .await;
    let mut res = (StatusCode::from_u16(code).unwrap(), Bytes::from(body)).into_response();
    if !ctype.is_empty() {
        res.headers_mut()
            .insert(header::CONTENT_TYPE, ctype.parse().unwrap());
    }
    res
}

async fn start_stub(stub: Stub) -> SocketAddr {
    let app = Router::new()
        .route("/apis/mailrelay.io/v1alpha1", get(discovery))
        .route(
            "/apis/mailrelay.io/v1alpha1/mailrelays",
            get(list_all_relays),
        )
        .route(
            "/apis/mailrelay.io/v1alpha1/namespaces/{ns}/mailrelays",
            get(list_relays),
        )
        .route(
            "/apis/mailrelay.io/v1alpha1/namespaces/{ns}/mailrelays/{name}",
            get(get_relay),
        )
        .route(
            "/api/v1/namespaces/{ns}/services/{svc}/proxy/{*rest}",
            any(proxy),
        )
        .route("/api/v1/namespaces/{ns}/secrets/{name}", get(get_secret))
        .route(
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            axum::routing::post(self_subject_review),
        )
        .layer(axum::middleware::from_fn_with_state(stub.clone(), record))
        .with_state(stub);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

fn mailrelay(ns: &str, name: &str, ready: bool) -> Value {
    let (st, reason, msg, n) = if ready {
        ("True", "AllReplicasReady", "2/2 replicas ready", 2)
    } else {
        ("False", "NoReadyReplicas", "0/2 replicas ready", 0)
    };
    json!({
        "apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "resourceVersion": "7", "generation": 1},
        "spec": {"hostname": format!("{name}.example.com"), "replicas": 2,
                 "redis": {"url": "redis://redis:6379"}},
        "status": {"observedGeneration": 1, "readyReplicas": n,
                   "queue": {"queued": 7, "deferred": 3, "inFlight": 0, "bytes": 9000},
                   "conditions": [
            {"type": "Ready", "status": st, "reason": reason, "message": msg,
             "lastTransitionTime": "2026-11-29T05:00:00Z", "observedGeneration": 1}]}
    })
}

fn write_kubeconfig(dir: &Path, api: SocketAddr) -> PathBuf {
    let p = dir.join("kubeconfig");
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: stub\n\
             clusters:\n- name: stub\n  cluster: {{server: 'http://{api}'}}\n\
             contexts:\n\
             - name: stub\n  context: {{cluster: stub, user: tester, namespace: mail}}\n\
             - name: elsewhere\n  context: {{cluster: stub, user: tester, namespace: other}}\n\
             users:\n- name: tester\n  user: {{token: {TOKEN}}}\n"
        ),
    )
    .unwrap();
    p
}

// ---------------------------------------------------------------------------
// Running the plugin binary.

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "plugin failed: {}", self.stderr);
        &self.stdout
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }

    #[track_caller]
    fn yaml(&self) -> Value {
        serde_norway::from_str(self.ok()).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }

    #[track_caller]
    fn err(&self) -> &str {
        assert_eq!(self.code, 1, "expected failure, got: {}", self.stdout);
        assert!(self.stdout.is_empty(), "{}", self.stdout);
        &self.stderr
    }
}

async fn plugin(kubeconfig: &Path, args: &[&str]) -> Run {
    let kc = kubeconfig.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_kubectl-mailrelay"))
            .args(&args)
            .env("KUBECONFIG", &kc)
            .env("HOME", kc.parent().unwrap())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("run kubectl-mailrelay");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    })
    .await
    .unwrap()
}

/// Waits until the relay's admin API shows `n` deferred messages whose attempts
/// are all at least `attempts`.
async fn wait_deferred(relay: &RealRelay, n: usize, attempts: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = admin_json(relay, "/api/v1/queue/messages?deferred=true").await;
        let msgs = v["messages"].as_array().unwrap();
        if msgs.len() == n
            && msgs.iter().all(|m| {
                m["attempts"].as_u64().unwrap() >= attempts && m["leased_until_ms"].is_null()
            })
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} deferred message(s) with {attempts} attempt(s): {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct World {
    relay: RealRelay,
    /// ops/edge: a second relay, in another namespace, with an empty queue.
    _edge: RealRelay,
    _smarthost: Smarthost,
    stub: Stub,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let smarthost = Smarthost::start();
    let relay = start_relay(smarthost.port, "out-token-1").await;
    let edge = start_relay(smarthost.port, "edge-token-1").await;
    let mut relays = BTreeMap::new();
    for (ns, name, ready) in [
        ("mail", "out", true),
        ("mail", "down", false),
        ("ops", "edge", true),
    ] {
        relays.insert((ns.into(), name.into()), mailrelay(ns, name, ready));
    }
    let mut backends = BTreeMap::new();
    backends.insert(("mail".into(), "out-admin:admin".into()), relay.admin);
    backends.insert(("ops".into(), "edge-admin:admin".into()), edge.admin);
    let secrets = BTreeMap::from([
        (
            ("mail".to_owned(), "out-admin-token".to_owned()),
            format!("{}\n", relay.token),
        ),
        (
            ("ops".to_owned(), "edge-admin-token".to_owned()),
            format!("{}\n", edge.token),
        ),
    ]);
    let stub = Stub {
        relays: Arc::new(relays),
        backends: Arc::new(backends),
        log: Arc::default(),
        crd: true,
        secrets: Arc::new(Mutex::new(secrets)),
        forbid_secrets: Arc::default(),
        review_user: Arc::default(),
    };
    let api = start_stub(stub.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), api);
    World {
        relay,
        _edge: edge,
        _smarthost: smarthost,
        stub,
        kubeconfig,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_against_a_real_relay_through_the_service_proxy() {
    let w = world().await;
    let kc = &w.kubeconfig;
    // One recipient deferred by the smarthost, one message partly delivered.
    swaks(&w.relay, "alice@example.com", "busy1@example.org");
    swaks(
        &w.relay,
        "bob@example.com",
        "busy2@example.net,ok@example.net",
    );
    let listed = wait_deferred(&w.relay, 2, 1).await;
    let id_of = |from: &str| {
        listed["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["from"] == from)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (alice, bob) = (id_of("alice@example.com"), id_of("bob@example.com"));

    // queue: the postqueue -p format of `mailrelay queue list`, and the API's JSON.
    let out = plugin(kc, &["queue", "out"]).await;
    let text = out.ok();
    assert!(text.contains("-Queue ID-"), "{text}");
    for needle in [
        alice.as_str(),
        bob.as_str(),
        "alice@example.com",
        "busy1@example.org [pending]",
        "busy2@example.net [pending]",
        "ok@example.net [delivered]",
        "(450 4.2.1 mailbox busy, try again later)",
        "-- 0 Kbytes in 2 Requests.",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let j = plugin(kc, &["queue", "out", "-o", "json"]).await.json();
    assert_eq!(j, admin_json(&w.relay, "/api/v1/queue/messages").await);
    let y = plugin(kc, &["queue", "out", "-o", "yaml"]).await.yaml();
    assert_eq!(y, j);
    let j = plugin(
        kc,
        &[
            "queue",
            "out",
            "--deferred",
            "--domain",
            "example.org",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    let ids: Vec<&str> = j["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [alice.as_str()]);
    assert!(
        w.stub.log.lock().unwrap().iter().any(|l| l
            == "GET /api/v1/namespaces/mail/services/out-admin:admin/proxy/api/v1/queue/messages?deferred=true&domain=example.org"),
        "the plugin goes through the service proxy: {:#?}",
        w.stub.log.lock().unwrap()
    );
    let text = plugin(kc, &["queue", "out", "--domain", "nowhere.test"]).await;
    assert_eq!(text.ok(), "Mail queue is empty\n");

    // message: per-recipient attempts with the remote reply.
    let out = plugin(kc, &["message", "out", &bob]).await;
    let text = out.ok();
    for needle in [
        format!("Queue ID:     {bob}"),
        "Sender:       bob@example.com".to_owned(),
        "Recipient:    busy2@example.net [pending]".to_owned(),
        "Recipient:    ok@example.net [delivered]".to_owned(),
        "450 4.2.1 mailbox busy, try again later".to_owned(),
        "250 2.0.0 OK accepted".to_owned(),
        "mx=127.0.0.1".to_owned(),
    ] {
        assert!(text.contains(&needle), "{needle:?} missing:\n{text}");
    }
    let j = plugin(kc, &["message", "out", &bob, "-o", "json"])
        .await
        .json();
    assert_eq!(
        j,
        admin_json(&w.relay, &format!("/api/v1/queue/messages/{bob}")).await
    );
    assert_eq!(
        plugin(kc, &["message", "out", &bob, "-o", "yaml"])
            .await
            .yaml(),
        j
    );
    let e = plugin(kc, &["message", "out", "06H29YVZVR66DSV6D7BS"]).await;
    assert_eq!(
        e.err(),
        "error: message 06H29YVZVR66DSV6D7BS not found in the queue of MailRelay mail/out (already delivered, bounced or deleted?)\n"
    );
    let e = plugin(kc, &["message", "out", "not-an-id"]).await;
    assert!(
        e.err()
            .starts_with("error: mailrelay mail/out: malformed queue id"),
        "{}",
        e.stderr
    );

    // events: "where is my mail?" through the service proxy, of one relay or of
    // every relay in the namespace (the one that is down is named, not fatal).
    let out = plugin(kc, &["events", "--to", "ok@example.net", "--since", "1h"]).await;
    let text = out.ok();
    assert!(
        text.contains(&format!(
            "delivered  {bob}  <bob@example.com> -> ok@example.net"
        )),
        "{text}"
    );
    assert!(text.contains("relay mail/down:"), "{text}");
    let j = plugin(kc, &["events", "out", "--queue-id", &bob, "-o", "json"])
        .await
        .json();
    let kinds: Vec<&str> = j["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[0], "accepted", "{j:#}");
    assert!(
        kinds.contains(&"delivered") && kinds.contains(&"deferred"),
        "{j:#}"
    );
    let e = plugin(kc, &["events", "out", "--limit", "5000"]).await;
    assert_eq!(e.code, 2, "a usage error: {}", e.stderr);
    assert!(e.stderr.contains("--limit"), "{}", e.stderr);

    // status: conditions and replicas from the object, live queue and quota usage.
    let out = plugin(kc, &["status", "out"]).await;
    let text = out.ok();
    for needle in [
        "Name:       out",
        "Namespace:  mail",
        "Hostname:   out.example.com",
        "Replicas:   2 desired, 2 ready",
        "Ready   True     AllReplicasReady   2/2 replicas ready",
        "  messages:   2",
        "  deferred:   2",
        "tenant-a",
        "alice@a.example",
        "gmail-pacing",
        "2/5",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let j = plugin(kc, &["status", "out", "-o", "json"]).await.json();
    assert_eq!(j["replicas"], json!({"desired": 2, "ready": 2}));
    assert_eq!(j["conditions"][0]["type"], "Ready");
    assert_eq!(j["queue"]["messages"], 2);
    assert_eq!(j["queue"]["deferred"], 2);
    assert_eq!(j["quotas"], quota_usage()["quotas"]);
    let y = plugin(kc, &["status", "out", "-o", "yaml"]).await.yaml();
    assert_eq!(y["quotas"], j["quotas"]);
    assert_eq!(y["queue"]["messages"], 2);

    // quota: every relay in the namespace (one of which is not ready), or one.
    let out = plugin(kc, &["quota"]).await;
    let text = out.ok();
    assert!(
        text.starts_with("RELAY   QUOTA          DIRECTION   KEY               LIMIT     USED   REMAINING   RESETS IN   CONNECTIONS\n"),
        "{text}"
    );
    for needle in [
        "out     tenant-a       ingress     alice@a.example   100/1m    12     88          31s         -",
        "out     tenant-a       ingress     alice@a.example   1000/1h   140    860         40m         -",
        "out     gmail-pacing   egress      *                 500/1h    42     458         30m         2/5",
        "relay down: MailRelay mail/down is not ready: its admin API is unreachable: no endpoints available for service \"down-admin\"",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let j = plugin(kc, &["quota", "-o", "json"]).await.json();
    assert_eq!(j["quotas"].as_array().unwrap().len(), 2);
    assert_eq!(j["quotas"][0]["relay"], "out");
    assert_eq!(j["quotas"][1]["connections"], Value::Null);
    assert_eq!(
        j["quotas"][1]["keys"][0]["connections"],
        json!({"max": 5, "open": 2})
    );
    assert_eq!(j["errors"][0]["relay"], "down");
    let j = plugin(kc, &["quota", "tenant-a", "--relay", "out", "-o", "yaml"])
        .await
        .yaml();
    let mut expected = quota_usage()["quotas"][0].clone();
    expected["relay"] = "out".into();
    expected["namespace"] = "mail".into();
    assert_eq!(j, json!({"quotas": [expected]}));
    let e = plugin(kc, &["quota", "nope", "--relay", "out"]).await;
    assert_eq!(
        e.err(),
        "error: SendQuota nope is not applied by MailRelay out in namespace \"mail\" (is it declared, and does its relaySelector match?)\n"
    );

    // retry: one message, a domain, everything; the relay tries again at once.
    let r = plugin(kc, &["retry", "out", &alice]).await;
    assert_eq!(r.ok(), "1 message(s) scheduled for immediate retry\n");
    let r = plugin(
        kc,
        &["retry", "out", "--domain", "example.net", "-o", "json"],
    )
    .await;
    assert_eq!(r.json(), json!({"retried": 1}));
    wait_deferred(&w.relay, 2, 2).await;
    let r = plugin(kc, &["retry", "out", "--all", "-o", "yaml"]).await;
    assert_eq!(r.yaml(), json!({"retried": 2}));
    wait_deferred(&w.relay, 2, 3).await;
    let text = plugin(kc, &["message", "out", &alice]).await;
    assert_eq!(
        text.ok().matches("450 4.2.1 mailbox busy").count(),
        3,
        "{}",
        text.stdout
    );
    assert!(
        w.stub
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l == "POST /api/v1/namespaces/mail/services/out-admin:admin/proxy/api/v1/queue/retry?all=true")
    );
    let e = plugin(kc, &["retry", "out", "06H29YVZVR66DSV6D7BS"]).await;
    assert_eq!(
        e.err(),
        "error: message 06H29YVZVR66DSV6D7BS not found in the queue of MailRelay mail/out (already delivered, bounced or deleted?)\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_namespaces_and_contexts() {
    let w = world().await;
    let kc = &w.kubeconfig;

    // A MailRelay that does not exist.
    for args in [
        &["status", "nope"][..],
        &["queue", "nope"],
        &["message", "nope", "06H29YVZVR66DSV6D7BS"],
        &["retry", "nope", "--all"],
        &["quota", "--relay", "nope"],
    ] {
        let r = plugin(kc, args).await;
        assert_eq!(
            r.err(),
            "error: MailRelay \"nope\" not found in namespace \"mail\"\n",
            "{args:?}"
        );
    }

    // A MailRelay whose relay has no ready pod: the verbs that need the relay fail
    // saying so, with the Ready condition; status still shows what is known.
    let r = plugin(kc, &["queue", "down"]).await;
    assert_eq!(
        r.err(),
        "error: MailRelay mail/down is not ready: its admin API is unreachable: no endpoints available for service \"down-admin\"; condition Ready=False (NoReadyReplicas): 0/2 replicas ready (check `kubectl get pods -n mail -l app.kubernetes.io/instance=down`)\n"
    );
    for args in [
        &["message", "down", "06H29YVZVR66DSV6D7BS"][..],
        &["retry", "down", "--all"],
        &["quota", "--relay", "down"],
    ] {
        let r = plugin(kc, args).await;
        assert!(
            r.err()
                .starts_with("error: MailRelay mail/down is not ready:"),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = plugin(kc, &["status", "down"]).await;
    let text = r.ok();
    assert!(text.contains("Replicas:   2 desired, 0 ready"), "{text}");
    assert!(text.contains("NoReadyReplicas"), "{text}");
    assert!(
        text.contains("Queue:\n  unavailable: MailRelay mail/down is not ready"),
        "{text}"
    );
    assert!(
        text.contains(
            "  last reported by the operator: 7 queued, 3 deferred, 0 in flight, 9000 bytes\n"
        ),
        "{text}"
    );
    let j = plugin(kc, &["status", "down", "-o", "json"]).await.json();
    assert!(j["queue"].is_null());
    assert!(
        j["queueError"]
            .as_str()
            .unwrap()
            .contains("no endpoints available")
    );
    assert_eq!(j["reportedQueue"]["queued"], 7);

    // Namespaces and contexts, like kubectl.
    let r = plugin(kc, &["--context", "elsewhere", "status", "out"]).await;
    assert_eq!(
        r.err(),
        "error: MailRelay \"out\" not found in namespace \"other\"\n"
    );
    let r = plugin(
        kc,
        &["--context", "elsewhere", "-n", "mail", "queue", "out"],
    )
    .await;
    assert_eq!(r.ok(), "Mail queue is empty\n");
    let r = plugin(kc, &["status", "out", "--namespace", "other"]).await;
    assert!(r.err().contains("namespace \"other\""), "{}", r.stderr);
    let r = plugin(kc, &["--context", "missing", "status", "out"]).await;
    assert!(r.err().starts_with("error: kubeconfig:"), "{}", r.stderr);
    let r = plugin(kc, &["quota", "-n", "empty"]).await;
    assert_eq!(r.err(), "error: no MailRelay in namespace \"empty\"\n");

    // --kubeconfig wins over $KUBECONFIG.
    let other = w._dir.path().join("other-kubeconfig");
    std::fs::write(
        &other,
        std::fs::read_to_string(kc)
            .unwrap()
            .replace("current-context: stub", "current-context: elsewhere"),
    )
    .unwrap();
    let r = plugin(
        kc,
        &["--kubeconfig", other.to_str().unwrap(), "status", "out"],
    )
    .await;
    assert!(r.err().contains("namespace \"other\""), "{}", r.stderr);

    // Credentials are sent: a wrong token is refused by the stand-in.
    let bad = w._dir.path().join("bad-kubeconfig");
    std::fs::write(
        &bad,
        std::fs::read_to_string(kc).unwrap().replace(TOKEN, "wrong"),
    )
    .unwrap();
    let r = plugin(&bad, &["status", "out"]).await;
    assert!(r.err().contains("Unauthorized"), "{}", r.stderr);

    // Bad usage is clap's error (exit 2), naming the problem.
    let r = plugin(kc, &["retry", "out"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = plugin(kc, &["queue", "out", "-o", "xml"]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("invalid value 'xml'"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_all_namespaces_and_delete() {
    let w = world().await;
    let kc = &w.kubeconfig;
    swaks(&w.relay, "carol@example.com", "busy3@example.org");
    let listed = wait_deferred(&w.relay, 1, 1).await;
    let id = listed["messages"][0]["id"].as_str().unwrap().to_owned();

    // list: live queue figures; a relay that does not answer shows the operator's
    // last report, marked, with the reason under the table.
    let r = plugin(kc, &["list"]).await;
    let text = r.ok();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "NAME   READY   REPLICAS   QUEUED   DEFERRED   OLDEST"
    );
    assert_eq!(
        lines.next().unwrap(),
        "down   False   0/2        7*       3*         -"
    );
    let out = lines.next().unwrap();
    assert!(
        out.starts_with("out    True    2/2        1        1          "),
        "{text}"
    );
    assert!(
        text.contains("\n* last reported by the operator; no live figures:\n  mail/down: its admin API is unreachable: no endpoints available for service \"down-admin\""),
        "{text}"
    );
    assert!(!text.contains("edge"), "{text}");
    let r = plugin(kc, &["list", "-A"]).await;
    let text = r.ok();
    assert!(
        text.starts_with("NAMESPACE   NAME   READY   REPLICAS   QUEUED   DEFERRED   OLDEST\nmail        down   False"),
        "{text}"
    );
    assert!(
        text.contains("\nops         edge   True    2/2        0        0          -\n"),
        "{text}"
    );
    let j = plugin(kc, &["list", "--all-namespaces", "-o", "json"])
        .await
        .json();
    let items = j["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(
        (items[2]["namespace"].as_str(), items[2]["name"].as_str()),
        (Some("ops"), Some("edge"))
    );
    assert_eq!(items[1]["queue"]["messages"], 1);
    assert_eq!(items[1]["ready"], "True");
    assert!(items[0]["queue"].is_null());
    assert_eq!(items[0]["reportedQueue"]["queued"], 7);
    let r = plugin(kc, &["list", "-n", "empty"]).await;
    assert_eq!(r.ok(), "No MailRelays found in namespace \"empty\".\n");

    // status without a name: every relay, one block each.
    let text = plugin(kc, &["status", "-A"]).await.ok().to_owned();
    for needle in [
        "Name:       down",
        "Name:       out",
        "Name:       edge",
        "Namespace:  ops",
        "messages:   1",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let j = plugin(kc, &["status", "-o", "json"]).await.json();
    let names: Vec<&str> = j["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["down", "out"]);
    let r = plugin(kc, &["status", "out", "-A"]).await;
    assert_eq!(r.code, 2, "a usage error");
    assert_eq!(
        r.stderr,
        "error: -A/--all-namespaces lists relays across namespaces; it cannot be used with the MailRelay name \"out\" (use -n NAMESPACE)\n"
    );

    // queue across relays: one section each, the unready one named with its reason.
    let text = plugin(kc, &["queue", "-A"]).await.ok().to_owned();
    assert!(
        text.starts_with(
            "MailRelay mail/down: MailRelay mail/down is not ready: its admin API is unreachable"
        ),
        "{text}"
    );
    assert!(text.contains("\nMailRelay mail/out:\n-Queue ID-"), "{text}");
    assert!(text.contains(&id), "{text}");
    assert!(
        text.ends_with("\nMailRelay ops/edge:\nMail queue is empty\n"),
        "{text}"
    );
    let j = plugin(kc, &["queue", "-A", "-o", "json"]).await.json();
    assert_eq!(j["messages"].as_array().unwrap().len(), 1);
    assert_eq!(j["messages"][0]["id"], id.as_str());
    assert_eq!(j["messages"][0]["namespace"], "mail");
    assert_eq!(j["messages"][0]["relay"], "out");
    assert_eq!(j["errors"][0]["relay"], "down");

    // quota across namespaces: a NAMESPACE column, as kubectl adds one.
    let text = plugin(kc, &["quota", "-A"]).await.ok().to_owned();
    assert!(text.starts_with("NAMESPACE   RELAY   QUOTA "), "{text}");
    assert!(text.contains("\nmail        out     tenant-a "), "{text}");
    assert!(
        text.contains("\nops         edge    gmail-pacing "),
        "{text}"
    );
    assert!(
        text.contains("relay mail/down: MailRelay mail/down is not ready"),
        "{text}"
    );
    let j = plugin(kc, &["quota", "-A", "-o", "json"]).await.json();
    assert_eq!(j["quotas"].as_array().unwrap().len(), 4);
    assert_eq!(j["quotas"][3]["namespace"], "ops");

    // delete: gone from the relay's queue; a second delete says it is not there.
    let r = plugin(kc, &["delete", "out", &id]).await;
    assert_eq!(
        r.ok(),
        format!("message {id} deleted from the queue of MailRelay mail/out\n")
    );
    assert!(
        w.stub.log.lock().unwrap().iter().any(|l| *l
            == format!("DELETE /api/v1/namespaces/mail/services/out-admin:admin/proxy/api/v1/queue/messages/{id}")),
        "{:#?}",
        w.stub.log.lock().unwrap()
    );
    let left = admin_json(&w.relay, "/api/v1/queue/messages").await;
    assert_eq!(left["messages"], json!([]), "{left:#}");
    let gone = format!(
        "error: message {id} not found in the queue of MailRelay mail/out (already delivered, bounced or deleted?)\n"
    );
    assert_eq!(plugin(kc, &["delete", "out", &id]).await.err(), gone);
    assert_eq!(plugin(kc, &["message", "out", &id]).await.err(), gone);
    let e = plugin(kc, &["delete", "out", "not-an-id"]).await;
    assert!(
        e.err()
            .starts_with("error: mailrelay mail/out: malformed queue id"),
        "{}",
        e.stderr
    );
    let e = plugin(kc, &["delete", "nope", &id]).await;
    assert_eq!(
        e.err(),
        "error: MailRelay \"nope\" not found in namespace \"mail\"\n"
    );
    let e = plugin(kc, &["delete", "down", &id]).await;
    assert!(
        e.err()
            .starts_with("error: MailRelay mail/down is not ready:"),
        "{}",
        e.stderr
    );
}

/// A stand-in API server without the MailRelay CRD, or a plain TCP endpoint.
async fn bare_stub(crd: bool) -> (Stub, SocketAddr) {
    let stub = Stub {
        relays: Arc::default(),
        backends: Arc::default(),
        log: Arc::default(),
        crd,
        secrets: Arc::default(),
        forbid_secrets: Arc::default(),
        review_user: Arc::default(),
    };
    let addr = start_stub(stub.clone()).await;
    (stub, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crd_is_not_a_missing_mailrelay() {
    let dir = tempfile::tempdir().unwrap();
    let (_, api) = bare_stub(false).await;
    let kc = write_kubeconfig(dir.path(), api);
    let crd_missing = format!(
        "error: the MailRelay CRD is not installed (mailrelays.mailrelay.io/v1alpha1 is not served by http://{api}): install the chart, or `kubectl apply --server-side -f crds/`\n"
    );
    for args in [
        &["status", "out"][..],
        &["delete", "out", "06H29YVZVR66DSV6D7BS"],
        &["list"],
        &["list", "-A"],
        &["queue"],
        &["quota"],
    ] {
        assert_eq!(plugin(&kc, args).await.err(), crd_missing, "{args:?}");
    }
    // With the CRD installed, the same 404 is the object's.
    let (_, api) = bare_stub(true).await;
    let kc = write_kubeconfig(dir.path(), api);
    assert_eq!(
        plugin(&kc, &["status", "out"]).await.err(),
        "error: MailRelay \"out\" not found in namespace \"mail\"\n"
    );
    assert_eq!(
        plugin(&kc, &["list"]).await.ok(),
        "No MailRelays found in namespace \"mail\".\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_say_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = |name: &str, server: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                 clusters:\n- name: c\n  cluster: {{server: '{server}'}}\n\
                 contexts:\n- name: c\n  context: {{cluster: c, user: u, namespace: mail}}\n\
                 users:\n- name: u\n  user: {{token: {TOKEN}}}\n"
            ),
        )
        .unwrap();
        p
    };

    // Refused: a port nobody listens on (bound, then closed).
    let closed = free_port();
    let kc = kubeconfig("refused", &format!("http://127.0.0.1:{closed}"));
    assert_eq!(
        plugin(&kc, &["status", "out"]).await.err(),
        format!(
            "error: cannot connect to the Kubernetes API server at http://127.0.0.1:{closed}: connection refused (is the cluster running, and is the kubeconfig's server address right?)\n"
        )
    );

    // DNS: `.invalid` never resolves (RFC 2606).
    let kc = kubeconfig("dns", "https://api.cluster.invalid:6443");
    let e = plugin(&kc, &["list"]).await;
    assert!(
        e.err().starts_with("error: cannot resolve the Kubernetes API server's host name \"api.cluster.invalid\" (https://api.cluster.invalid:6443): "),
        "{}",
        e.stderr
    );
    assert!(
        e.stderr
            .ends_with("(check the server address in the kubeconfig, and DNS or VPN)\n"),
        "{}",
        e.stderr
    );

    // TLS: an https:// server address for a server that speaks plain HTTP.
    let (_, plain) = bare_stub(true).await;
    let kc = kubeconfig("tls", &format!("https://{plain}"));
    let e = plugin(&kc, &["list"]).await;
    assert!(
        e.err().starts_with(&format!(
            "error: TLS with the Kubernetes API server at https://{plain} failed: "
        )),
        "{}",
        e.stderr
    );
    assert!(e.stderr.contains("certificate-authority"), "{}", e.stderr);

    // Timeout: a server that accepts and never answers; --request-timeout bounds
    // the wait, in kubectl's duration syntax (and a bare number is seconds).
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    std::thread::spawn(move || {
        for c in hang.incoming() {
            keep.lock().unwrap().push(c);
        }
    });
    let kc = kubeconfig("hang", &format!("http://{hang_addr}"));
    for (flag, shown) in [("1500ms", "1500ms"), ("1", "1s")] {
        let started = Instant::now();
        let e = plugin(&kc, &["--request-timeout", flag, "status", "out"]).await;
        let took = started.elapsed();
        assert_eq!(
            e.err(),
            format!(
                "error: no answer from the Kubernetes API server at http://{hang_addr} within {shown} (get mailrelays/out; raise --request-timeout to wait longer)\n"
            )
        );
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(10),
            "{flag}: {took:?}"
        );
    }
    let e = plugin(&kc, &["--request-timeout", "5x", "list"]).await;
    assert_eq!(e.code, 2, "{}", e.stderr);
    assert!(
        e.stderr
            .contains("invalid value '5x' for '--request-timeout <DURATION>'"),
        "{}",
        e.stderr
    );
}

#[tokio::test]
async fn completion_scripts_name_every_verb() {
    // No cluster needed: a kubeconfig that does not exist is never read.
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("absent");
    for shell in ["bash", "zsh", "fish"] {
        let r = plugin(&kc, &["completion", shell]).await;
        let script = r.ok();
        assert!(script.contains("kubectl-mailrelay"), "{shell}:\n{script}");
        for verb in [
            "list",
            "status",
            "queue",
            "message",
            "retry",
            "delete",
            "quota",
            "completion",
        ] {
            assert!(script.contains(verb), "{shell}: {verb} missing");
        }
        for flag in [
            "all-namespaces",
            "request-timeout",
            "namespace",
            "context",
            "kubeconfig",
        ] {
            assert!(script.contains(flag), "{shell}: --{flag} missing");
        }
    }
    let r = plugin(&kc, &["completion", "tcsh"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The krew manifest names the archives the release workflow attaches:
/// `kubectl-mailrelay_<version>_<os>_<arch>.tar.gz` at the tag `v<version>`,
/// with the workspace version, for linux and darwin on amd64 and arm64.
#[test]
fn krew_manifest_matches_the_release() {
    let version = env!("CARGO_PKG_VERSION");
    let path = repo_root().join("krew/mailrelay.yaml");
    let m: Value = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        m["apiVersion"],
        "krew.googlecontainertools.github.com/v1alpha2"
    );
    assert_eq!(m["kind"], "Plugin");
    assert_eq!(m["metadata"]["name"], "mailrelay");
    assert_eq!(
        m["spec"]["version"],
        format!("v{version}"),
        "krew/mailrelay.yaml is not at the workspace version"
    );
    assert!(
        m["spec"]["shortDescription"]
            .as_str()
            .is_some_and(|d| !d.is_empty() && d.len() <= 50)
    );
    let mut seen = Vec::new();
    for p in m["spec"]["platforms"].as_array().unwrap() {
        let os = p["selector"]["matchLabels"]["os"].as_str().unwrap();
        let arch = p["selector"]["matchLabels"]["arch"].as_str().unwrap();
        let asset = format!("kubectl-mailrelay_{version}_{os}_{arch}.tar.gz");
        let uri = p["uri"].as_str().unwrap();
        assert!(
            uri.starts_with("https://github.com/")
                && uri.ends_with(&format!("/releases/download/v{version}/{asset}")),
            "{os}/{arch}: {uri}"
        );
        assert!(
            !uri.contains("{{"),
            "{uri}: a literal version, not a template"
        );
        // The release workflow puts each archive's checksum in place of its placeholder.
        assert_eq!(
            p["sha256"],
            format!("SHA256_{}_{}", os.to_uppercase(), arch.to_uppercase()),
            "{os}/{arch}"
        );
        assert_eq!(p["bin"], "kubectl-mailrelay");
        assert!(
            p["files"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["from"] == "kubectl-mailrelay")
        );
        seen.push(format!("{os}/{arch}"));
    }
    seen.sort();
    assert_eq!(
        seen,
        ["darwin/amd64", "darwin/arm64", "linux/amd64", "linux/arm64"]
    );
}

/// `kubectl get sq` / `get mr` show whether each object is Ready, and why not
/// under `-o wide`.
#[test]
fn printer_columns_show_readiness() {
    for (file, before) in [
        ("mailrelay.io_sendquotas.yaml", "Direction"),
        ("mailrelay.io_mailrelays.yaml", "Replicas"),
    ] {
        for dir in ["crds", "charts/mailrelay-operator/files/crds"] {
            let crd: Value = serde_norway::from_str(
                &std::fs::read_to_string(repo_root().join(dir).join(file)).unwrap(),
            )
            .unwrap();
            let cols = crd["spec"]["versions"][0]["additionalPrinterColumns"]
                .as_array()
                .unwrap();
            let names: Vec<&str> = cols.iter().map(|c| c["name"].as_str().unwrap()).collect();
            assert_eq!(&names[..3], ["Ready", "Reason", before], "{dir}/{file}");
            assert_eq!(
                cols[0]["jsonPath"],
                ".status.conditions[?(@.type==\"Ready\")].status"
            );
            assert!(
                cols[0].get("priority").is_none(),
                "Ready shows in plain `kubectl get`"
            );
            assert_eq!(
                cols[1]["jsonPath"],
                ".status.conditions[?(@.type==\"Ready\")].reason"
            );
            assert_eq!(cols[1]["priority"], 1, "Reason is for -o wide");
        }
    }
}

fn set_secret(w: &World, token_text: &str) {
    w.stub.secrets.lock().unwrap().insert(
        ("mail".to_owned(), "out-admin-token".to_owned()),
        token_text.to_owned(),
    );
}

/// Issue 13: the plugin reads the relay's admin token from its `NAME-admin-token`
/// Secret with the user's own credentials and sends it in `X-Mailrelay-Admin-Token`
/// through the service proxy (which does not pass `Authorization` on). A user who
/// may not read the Secret gets an error naming it and the permission, and
/// changes nothing; `list` still works from the reported status. A rotated Secret
/// works whether or not the relay pods have the new token file yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_comes_from_the_secret_the_user_may_read() {
    let w = world().await;
    let kc = &w.kubeconfig;
    swaks(&w.relay, "alice@example.com", "busy1@example.org");
    let listed = wait_deferred(&w.relay, 1, 1).await;
    let id = listed["messages"][0]["id"].as_str().unwrap().to_owned();

    // Readable Secret: works, and the token went through the proxy to the relay.
    let out = plugin(kc, &["queue", "out"]).await;
    assert!(out.ok().contains("alice@example.com"), "{}", out.stdout);
    assert!(
        w.stub
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l == "GET /api/v1/namespaces/mail/secrets/out-admin-token"),
        "the plugin read the Secret"
    );
    plugin(kc, &["quota", "--relay", "out"]).await.ok();

    // The user may not read the Secret: every admin verb fails naming the Secret
    // and the permission; nothing is changed.
    w.stub
        .forbid_secrets
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for args in [
        vec!["queue", "out"],
        vec!["message", "out", &id],
        vec!["retry", "out", "--all"],
        vec!["delete", "out", &id],
        vec!["quota", "--relay", "out"],
    ] {
        let r = plugin(kc, &args).await;
        let e = r.err();
        assert!(
            e.contains("cannot read Secret mail/out-admin-token")
                && e.contains("`get` on secrets/out-admin-token in namespace mail")
                && e.contains("kubectl auth can-i get secret/out-admin-token -n mail"),
            "{args:?}: {e}"
        );
    }
    let after = admin_json(&w.relay, "/api/v1/queue/messages").await;
    assert_eq!(after["messages"].as_array().unwrap().len(), 1);
    assert_eq!(after["messages"][0]["id"], id.as_str(), "not deleted");
    assert_eq!(
        after["messages"][0]["attempts"], listed["messages"][0]["attempts"],
        "not retried"
    );
    // `list` does not need the Secret: the operator's reported figures, with a note.
    let out = plugin(kc, &["list"]).await;
    let text = out.ok();
    assert!(text.contains("out    True"), "{text}");
    assert!(text.contains("7*"), "{text}");
    assert!(
        text.contains("no live figures:") && text.contains("mail/out: cannot read Secret"),
        "{text}"
    );
    w.stub
        .forbid_secrets
        .store(false, std::sync::atomic::Ordering::SeqCst);

    // A token the relay does not accept: said as such.
    set_secret(&w, "not-the-token\n");
    let r = plugin(kc, &["queue", "out"]).await;
    assert!(
        r.err()
            .contains("refused the admin token from Secret mail/out-admin-token"),
        "{}",
        r.stderr
    );

    // Rotation, as the operator writes it: new token first, previous second.
    // The pods have not got the new file yet: the previous token gets through.
    set_secret(&w, &format!("out-token-2\n{}\n", w.relay.token));
    plugin(kc, &["queue", "out"]).await.ok();
    // The kubelet updated the file: both lines work, the new one first.
    std::fs::write(
        &w.relay.token_file,
        format!("out-token-2\n{}\n", w.relay.token),
    )
    .unwrap();
    plugin(kc, &["retry", "out", &id]).await.ok();
    // The grace period is over: only the new token, in the Secret and the file.
    set_secret(&w, "out-token-2\n");
    std::fs::write(&w.relay.token_file, "out-token-2\n").unwrap();
    let out = plugin(kc, &["queue", "out"]).await;
    assert!(out.ok().contains("alice@example.com"));
    let (code, _, _) = http(
        w.relay.admin,
        "GET",
        "/api/v1/queue/stats",
        Some(&w.relay.token),
    )
    .await;
    assert_eq!(code, 401, "the old token is refused by now");
    let (code, _, _) = http(w.relay.admin, "GET", "/api/v1/queue/stats", None).await;
    assert_eq!(code, 401, "no token, no API");
}

/// What the relays of this test process log (they run in process), as text.
fn relay_log() -> String {
    static LOG: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(buf.clone());
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .try_init()
            .expect("the only tracing subscriber of this test binary");
        buf
    });
    String::from_utf8_lossy(&log.lock().unwrap()).into_owned()
}

/// Issue 13: on queue changes the plugin names the user, as a SelfSubjectReview
/// tells it, in `X-Mailrelay-Actor`, and the relay's audit line logs it as
/// `actor` next to the identity of the token. Reads do not ask. When the review is
/// forbidden the command still works, and the line says `actor=-`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_audit_line_names_the_user_of_the_self_subject_review() {
    relay_log();
    let w = world().await;
    let kc = &w.kubeconfig;
    swaks(&w.relay, "carol@example.com", "busy1@example.org");
    let listed = wait_deferred(&w.relay, 1, 1).await;
    let id = listed["messages"][0]["id"].as_str().unwrap().to_owned();
    let reviews = || {
        w.stub
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("POST /apis/authentication.k8s.io/v1/selfsubjectreviews"))
            .count()
    };
    let audit = |action: &str| -> Vec<String> {
        relay_log()
            .lines()
            .filter(|l| l.contains(&format!("admin: queue {action}")) && l.contains(&id))
            .map(str::to_owned)
            .collect()
    };

    // Forbidden: the retry happens all the same, with no claim.
    plugin(kc, &["retry", "out", &id]).await.ok();
    assert_eq!(reviews(), 1, "{:#?}", w.stub.log.lock().unwrap());
    let lines = audit("retry");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains(r#"identity="token:file" actor="-""#),
        "{}",
        lines[0]
    );

    // Reads are not audited: no review.
    plugin(kc, &["queue", "out"]).await.ok();
    plugin(kc, &["message", "out", &id]).await.ok();
    assert_eq!(reviews(), 1, "reads do not ask who the user is");

    *w.stub.review_user.lock().unwrap() = Some("alice@example.com".into());
    plugin(kc, &["retry", "out", &id]).await.ok();
    plugin(kc, &["delete", "out", &id]).await.ok();
    assert_eq!(reviews(), 3, "one review per command");
    let lines = audit("retry");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[1].contains(r#"identity="token:file" actor="alice@example.com""#),
        "{}",
        lines[1]
    );
    let lines = audit("delete");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("removed=true")
            && lines[0].contains(r#"identity="token:file" actor="alice@example.com""#),
        "{}",
        lines[0]
    );

    // A name that is not plain ASCII (OIDC allows any) is percent-encoded, and one
    // with a line break cannot forge a second audit line.
    *w.stub.review_user.lock().unwrap() = Some("Zoë\nINFO admin: queue delete".into());
    let gone = plugin(kc, &["delete", "out", &id]).await;
    assert!(gone.err().contains("not found"), "{}", gone.stderr);
    let lines = audit("delete");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[1].contains("removed=false")
            && lines[1].contains(r#"actor="Zo%C3%AB%0AINFO%20admin:%20queue%20delete""#),
        "{}",
        lines[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppression_through_the_service_proxy() {
    let w = world().await;
    let kc = &w.kubeconfig;
    let added = plugin(
        kc,
        &[
            "-n",
            "mail",
            "suppression",
            "out",
            "add",
            "Gone@Example.net",
            "--scope",
            "domain:example.com",
            "--ttl",
            "7d",
        ],
    )
    .await;
    assert!(
        added
            .ok()
            .contains("added gone@example.net on domain:example.com of MailRelay mail/out"),
        "{}",
        added.stdout
    );
    let listed = plugin(kc, &["-n", "mail", "suppression", "out", "list"]).await;
    assert!(
        listed
            .ok()
            .contains("gone@example.net  domain:example.com  manual  expires"),
        "{}",
        listed.stdout
    );
    let json = plugin(
        kc,
        &["-n", "mail", "suppression", "out", "list", "-o", "json"],
    )
    .await;
    let v: Value = serde_json::from_str(json.ok()).unwrap();
    assert_eq!(v["entries"][0]["address"], "gone@example.net");
    let removed = plugin(
        kc,
        &[
            "-n",
            "mail",
            "suppression",
            "out",
            "remove",
            "gone@example.net",
            "--scope",
            "domain:example.com",
        ],
    )
    .await;
    assert!(
        removed.ok().contains("removed gone@example.net"),
        "{}",
        removed.stdout
    );
    let again = plugin(
        kc,
        &[
            "-n",
            "mail",
            "suppression",
            "out",
            "remove",
            "gone@example.net",
            "--scope",
            "domain:example.com",
        ],
    )
    .await;
    assert!(
        again
            .err()
            .contains("is not on the domain:example.com suppression list"),
        "{}",
        again.stderr
    );
    let bad = plugin(
        kc,
        &[
            "-n",
            "mail",
            "suppression",
            "out",
            "add",
            "x@y.test",
            "--ttl",
            "5w",
        ],
    )
    .await;
    assert!(bad.err().contains("ttl"), "{}", bad.stderr);
}

/// `kubectl mailrelay shaping` list and lift through the service proxy, against a
/// relay whose egress store is a real redis-server holding a suspension and a
/// throttle (written by the relay's own store code, as a rule would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaping_list_and_lift_through_the_service_proxy() {
    use mailrelay::config::RedisConfig;
    use mailrelay::config::rules::RuleAction;
    use mailrelay::quota::egress::Egress;
    use mailrelay::quota::egress::redis::RedisStore;
    use mailrelay::shaping::{Rate, State};

    let redis = crate::support::redis::RedisServer::start();
    let rcfg = RedisConfig {
        url: redis.url(),
        password: None,
        cluster: false,
        cluster_nodes: vec![],
        key_prefix: "mr".into(),
        wait_replicas: 0,
        wait_timeout: mailrelay::config::default_wait_timeout(),
        fresh_list: true,
    };
    let egress = Egress::redis(&rcfg, &[], Duration::from_secs(30))
        .await
        .unwrap();
    let mut reg = prometheus_client::registry::Registry::default();
    let quotas = mailrelay::quota::ingress::engine::Quotas::new(
        &[],
        Arc::new(mailrelay::quota::ingress::memory::MemoryStore::new()),
        mailrelay::quota::ingress::metrics::QuotaMetrics::register(&mut reg),
        Duration::from_secs(5),
    );
    quotas.set_egress_usage(Arc::new(egress));
    let smarthost = Smarthost::start();
    let relay = start_relay_with(
        smarthost.port,
        "out-token-1",
        mailrelay::quota::admin::routes(quotas),
    )
    .await;

    let store = RedisStore::connect(&rcfg).await.unwrap();
    let site = "mx1.provider.test,mx2.provider.test";
    let suspend = State {
        field: "sender_domain:shop.example".into(),
        action: RuleAction::Suspend,
        until_ms: 0,
        factor: 1.0,
        rate: None,
        max_connections: None,
        duration_ms: 1_800_000,
        pause_ms: 0,
        rule: "payments.slow".into(),
        reply: "421 4.7.28 Our system has detected an unusual rate of mail".into(),
    };
    store
        .shaping_set(site, &suspend, 1_800_000, None)
        .await
        .unwrap();
    let throttle = State {
        field: "*".into(),
        action: RuleAction::Throttle,
        factor: 0.5,
        rate: Some(Rate {
            count: 30,
            window_ms: 60_000,
        }),
        max_connections: Some(2),
        duration_ms: 600_000,
        rule: "microsoft-ip-reputation".into(),
        reply: "451 4.7.650 The mail server has been temporarily rate limited".into(),
        ..suspend.clone()
    };
    store
        .shaping_set(site, &throttle, 600_000, None)
        .await
        .unwrap();

    // The stand-in API server: MailRelay mail/out (with this relay behind its
    // admin service) and mail/down (no ready endpoint).
    let mut relays = BTreeMap::new();
    for (name, ready) in [("out", true), ("down", false)] {
        relays.insert(
            ("mail".to_owned(), name.to_owned()),
            mailrelay("mail", name, ready),
        );
    }
    let stub = Stub {
        relays: Arc::new(relays),
        backends: Arc::new(BTreeMap::from([(
            ("mail".to_owned(), "out-admin:admin".to_owned()),
            relay.admin,
        )])),
        log: Arc::default(),
        crd: true,
        secrets: Arc::new(Mutex::new(BTreeMap::from([(
            ("mail".to_owned(), "out-admin-token".to_owned()),
            format!("{}\n", relay.token),
        )]))),
        forbid_secrets: Arc::default(),
        review_user: Arc::new(Mutex::new(Some("jane@example.com".into()))),
    };
    let api = start_stub(stub.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let kc = &write_kubeconfig(dir.path(), api);

    // list: one row per state, the relay without endpoints named after.
    let out = plugin(kc, &["shaping"]).await;
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("RELAY")
            && lines[0].contains("ACTION")
            && lines[0].contains("RULE")
            && lines[0].contains("ID"),
        "{text}"
    );
    let suspend_id = format!("sender_domain:shop.example@{site}");
    let row = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no row with {needle}:\n{text}"))
            .to_string()
    };
    let s = row("payments.slow");
    assert!(s.starts_with("out") && s.contains("suspend"), "{text}");
    assert!(
        s.contains(&suspend_id) && s.contains("421 4.7.28"),
        "{text}"
    );
    assert!(s.contains("29m") || s.contains("30m"), "{text}");
    let t = row("microsoft-ip-reputation");
    assert!(t.contains("throttle x0.5 30/1m max 2 conns"), "{text}");
    assert!(t.contains(&format!("*@{site}")), "{text}");
    assert!(
        text.contains("relay down: ") && text.contains("no endpoints available"),
        "{text}"
    );

    // -o json: every field, per relay.
    let j = plugin(kc, &["shaping", "list", "--relay", "out", "-o", "json"])
        .await
        .json();
    let states = j["relays"][0]["states"].as_array().unwrap();
    assert_eq!(j["relays"][0]["relay"], "out", "{j:#}");
    assert_eq!(states.len(), 2, "{j:#}");
    let th = states.iter().find(|s| s["action"] == "throttle").unwrap();
    assert_eq!(th["rate"], "30/1m", "{j:#}");
    assert_eq!(th["max_connections"], 2, "{j:#}");
    assert_eq!(th["factor"], "0.5", "{j:#}");
    assert!(j.get("errors").is_none(), "{j:#}");

    // lift: the state ends in the store, the relay's audit line names the user.
    let lifted = plugin(kc, &["shaping", "lift", &suspend_id]).await;
    assert_eq!(
        lifted.ok(),
        format!("lifted {suspend_id} on MailRelay mail/out\n")
    );
    let (_, left) = store.shaping_list(None).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].1.field, "*");
    let text = plugin(kc, &["shaping", "--relay", "out"]).await;
    assert!(!text.ok().contains("payments.slow"), "{}", text.stdout);
    assert!(
        stub.log.lock().unwrap().iter().any(|l| l.starts_with(
            "POST /api/v1/namespaces/mail/services/out-admin:admin/proxy/api/v1/shaping/"
        )),
        "{:?}",
        stub.log.lock().unwrap()
    );

    // Again: nothing left to lift; a malformed id is refused before any call.
    let again = plugin(kc, &["shaping", "lift", &suspend_id, "--relay", "out"]).await;
    assert!(
        again
            .err()
            .contains(&format!("no state {suspend_id} in force")),
        "{}",
        again.stderr
    );
    // A usage error: exit 2, like clap's own.
    let bad = plugin(kc, &["shaping", "lift", "no-at-sign"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stdout);
    assert!(
        bad.stderr.contains("is not a state ID like <scope>@<site>"),
        "{}",
        bad.stderr
    );
    let lifted = plugin(kc, &["shaping", "lift", &format!("*@{site}"), "-o", "json"])
        .await
        .json();
    assert_eq!(lifted["lifted"], format!("*@{site}"));
    assert_eq!(lifted["relays"][0]["relay"], "out");
    let empty = plugin(kc, &["shaping", "--relay", "out"]).await;
    assert_eq!(empty.ok(), "No suspension or throttle in force.\n");
}
