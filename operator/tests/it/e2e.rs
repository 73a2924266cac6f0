//! End to end without a cluster: the example manifests (examples/k8s) go through the
//! reconciler (in-memory API); the ConfigMap it renders runs a real `mailrelay serve`
//! against a real Redis; mail sent with swaks / smtplib is queued, and the status the
//! operator computes counts it.
//!
//! What differs from a pod is swapped in one place each, clearly marked TEST SWAP:
//! listener and admin ports (free loopback ports), the Redis URL (a local server),
//! the Secret files (a temp dir instead of mounted volumes) and outbound delivery
//! (off: no network here). The Redis password reaches the relay through its
//! environment, as in the pod.

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mailrelay::config::RelayConfig;
use mailrelay_operator::crd::{MailRelay, SendQuota};
use mailrelay_operator::reconcile::{Context, Settings, quota, relay};
use mailrelay_operator::telemetry::Metrics;
use serde_json::{Value, json};
use support::fake_api::FakeApi;
use support::redis::RedisServer;
use support::relay::{RelayProcess, localise};
use support::smtp::{make_cert, smtplib_send_many, swaks};

const RELAY: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/mailrelays/relay";
const QUOTAS: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/sendquotas";
const SECRETS: &str = "/api/v1/namespaces/mail/secrets";
const CONFIG_MAP: &str = "/api/v1/namespaces/mail/configmaps/relay-config";
const REDIS_PASSWORD: &str = "redis-example-password";
const USER: &str = "payments";
const USER_PASSWORD: &str = "payments-password";

fn example(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/k8s")
        .join(file);
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                A[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

fn secret(name: &str, data: &[(&str, &[u8])]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(b64(v))))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "mail"}, "data": data})
}

struct Example {
    api: FakeApi,
    ctx: Arc<Context>,
    relay: RelayProcess,
    /// The listeners in spec order: `smtp` (STARTTLS), `smtps` (implicit TLS).
    listeners: Vec<std::net::SocketAddr>,
    /// The admin token the operator generated (its `relay-admin-token` Secret).
    token: String,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

async fn reconcile_relay(api: &FakeApi, ctx: &Arc<Context>) -> Value {
    let obj: MailRelay = serde_json::from_value(api.get(RELAY).unwrap()).unwrap();
    relay::reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    api.get(RELAY).unwrap()
}

async fn start_example() -> Example {
    start_example_with(|_| {}).await
}

/// The example with `change` made to its MailRelay spec first.
async fn start_example_with(change: impl FnOnce(&mut Value)) -> Example {
    let redis = RedisServer::start_with(Some(REDIS_PASSWORD));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    let users = format!("{USER}:{USER_PASSWORD}\n");

    let api = FakeApi::start();
    api.set_deployment_status(
        json!({"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
    );
    let mut mr = example("mailrelay.yaml");
    // ---- TEST SWAP: the example's in-cluster Redis is a local server here.
    mr["spec"]["redis"]["url"] = json!(redis.url());
    change(&mut mr["spec"]);
    api.put(RELAY, mr);
    for (file, name) in [
        ("sendquota-payments.yaml", "payments"),
        ("sendquota-gmail.yaml", "gmail"),
    ] {
        api.put(&format!("{QUOTAS}/{name}"), example(file));
    }
    // The Secrets the example names, as a user would create them.
    api.put(
        &format!("{SECRETS}/relay-tls"),
        secret(
            "relay-tls",
            &[
                ("tls.crt", &std::fs::read(&cert).unwrap()),
                ("tls.key", &std::fs::read(&key).unwrap()),
            ],
        ),
    );
    api.put(
        &format!("{SECRETS}/relay-users"),
        secret("relay-users", &[("users", users.as_bytes())]),
    );
    api.put(
        &format!("{SECRETS}/redis"),
        secret("redis", &[("password", REDIS_PASSWORD.as_bytes())]),
    );

    let ctx = Context::new(
        api.client.clone(),
        Settings::default(),
        Arc::new(Metrics::new()),
    );
    let r = reconcile_relay(&api, &ctx).await;
    let ready = r["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "True", "{r:#}");

    // Exactly the rendered ConfigMap payload...
    let yaml = api.get(CONFIG_MAP).unwrap()["data"]["mailrelay.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut cfg = RelayConfig::from_yaml(&yaml).unwrap();
    let names: Vec<&str> = cfg.quotas.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(
        names,
        ["gmail", "payments"],
        "both example quotas select the example relay"
    );
    // ...with the TEST SWAPs: local ports,
    let (listeners, admin) = localise(&mut cfg, None);
    // ---- TEST SWAP: the Secret volumes' files live in a temp dir,
    let tls = cfg.tls.as_mut().unwrap();
    assert_eq!(
        tls.cert_file,
        PathBuf::from("/var/run/mailrelay/tls/tls.crt")
    );
    tls.cert_file = cert.clone();
    tls.key_file = key.clone();
    let users_file = dir.path().join("users");
    std::fs::write(&users_file, &users).unwrap();
    assert_eq!(
        cfg.auth.as_ref().unwrap().users_file,
        PathBuf::from("/var/run/mailrelay/auth/users")
    );
    cfg.auth.as_mut().unwrap().users_file = users_file;
    // ---- TEST SWAP: the admin token Secret the operator generated, as the pod
    // mounts it.
    assert!(
        yaml.contains("token_file: /var/run/mailrelay/admin-token/token"),
        "{yaml}"
    );
    let token_secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(api.get(&format!("{SECRETS}/relay-admin-token")).unwrap()).unwrap();
    let token = mailrelay_operator::admin_token::tokens(&token_secret)[0].clone();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    cfg.admin.token_file = Some(token_file);
    // ---- TEST SWAP: no outbound delivery (no network here), so mail stays queued.
    cfg.delivery.enabled = false;
    let path = dir.path().join("mailrelay.yaml");
    std::fs::write(&path, serde_norway::to_string(&cfg).unwrap()).unwrap();
    // The pod gets the Redis password from the `redis` Secret as this variable.
    let relay = RelayProcess::start(
        &path,
        listeners[0],
        admin,
        &[("MAILRELAY_REDIS_PASSWORD", REDIS_PASSWORD)],
        dir.path().join("relay.log"),
    );
    Example {
        api,
        ctx,
        relay,
        listeners,
        token,
        _redis: redis,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_relay_queues_mail_and_the_operator_counts_it() {
    let ex = start_example().await;
    let auth = [
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        USER_PASSWORD,
    ];
    for i in 0..3 {
        let mut args = vec!["--tls"];
        args.extend(auth);
        let out = swaks(
            ex.listeners[0],
            "billing@payments.example.com",
            &format!("customer{i}@example.net"),
            &args,
        );
        assert!(out.contains("STARTTLS"), "{out}");
    }
    // The implicit-TLS listener works too.
    let mut args = vec!["--tlsc"];
    args.extend(auth);
    swaks(
        ex.listeners[1],
        "billing@payments.example.com",
        "customer@example.net",
        &args,
    );

    let r = reconcile_relay(&ex.api, &ex.ctx).await;
    let st = &r["status"];
    assert_eq!(
        st["queue"]["queued"],
        4,
        "{st:#}\nrelay log:\n{}",
        ex.relay.log()
    );
    assert_eq!(st["queue"]["deferred"], 0);
    assert_eq!(st["queue"]["inFlight"], 0);
    assert_eq!(st["delivery"]["delivered"], 0);
    assert_eq!(st["quotas"], json!(["gmail", "payments"]));
    // The relay's own view agrees.
    let stats = admin_get(ex.relay.admin, "/api/v1/queue/stats", Some(&ex.token)).await;
    assert_eq!(stats["messages"], 4, "{stats}");
    // Without the operator's token the relay's API is closed.
    let refused = admin_get(ex.relay.admin, "/api/v1/queue/stats", None).await;
    assert!(
        refused["error"].as_str().unwrap().contains("token"),
        "{refused}"
    );
}

async fn admin_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    serde_json::from_str(resp.split_once("\r\n\r\n").unwrap().1).unwrap()
}

/// The example `payments` quota allows 100 messages a minute per AUTH user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_ingress_quota_refuses_the_101st_message() {
    let ex = start_example().await;
    let codes = smtplib_send_many(
        ex.listeners[0],
        USER,
        USER_PASSWORD,
        "billing@payments.example.com",
        "customer@example.net",
        101,
    );
    assert_eq!(codes.len(), 101, "{codes:?}");
    assert!(
        codes[..100].iter().all(|c| *c == 250),
        "{codes:?}\n{}",
        ex.relay.log()
    );
    assert!(
        (400..500).contains(&codes[100]),
        "the 101st is tempfailed: {codes:?}"
    );
    let r = reconcile_relay(&ex.api, &ex.ctx).await;
    assert_eq!(r["status"]["queue"]["queued"], 100);

    // The SendQuota status, read from this relay's admin API.
    let ctx = Context::new(
        ex.api.client.clone(),
        Settings {
            admin_url_template: format!("http://{}", ex.relay.admin),
            ..Settings::default()
        },
        Arc::new(Metrics::new()),
    );
    let q: SendQuota =
        serde_json::from_value(ex.api.get(&format!("{QUOTAS}/payments")).unwrap()).unwrap();
    quota::reconcile(Arc::new(q), ctx).await.unwrap();
    let st = ex.api.get(&format!("{QUOTAS}/payments")).unwrap()["status"].clone();
    assert_eq!(
        (
            st["limit"].as_str(),
            st["used"].as_u64(),
            st["remaining"].as_u64()
        ),
        (Some("100/1m"), Some(100), Some(0)),
        "{st:#}"
    );
}

/// `spec.senderBinding` through the operator to a real relay: the tenant sends as
/// its own domain; as another tenant's it is refused at MAIL, and with a `From:`
/// header that disagrees at DATA; both refusals are logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_bound_by_the_mailrelay_sends_only_as_itself() {
    let ex = start_example_with(|spec| {
        spec["senderBinding"] = json!({
            "checkFromHeader": true,
            "users": [{"user": USER, "senders": ["payments.example.com", "*.payments.example.com"]}],
        });
    })
    .await;
    let send = |from: &str| {
        smtplib_send_many(
            ex.listeners[0],
            USER,
            USER_PASSWORD,
            from,
            "customer@example.net",
            1,
        )
    };
    assert_eq!(
        send("billing@payments.example.com"),
        [250],
        "{}",
        ex.relay.log()
    );
    assert_eq!(send("billing@eu.payments.example.com"), [250]);
    assert_eq!(
        send("ceo@shipping.example.com"),
        [550],
        "another tenant's domain"
    );

    // The envelope is the tenant's own, the From: header is not.
    let out = std::process::Command::new("swaks")
        .args(["--server", &ex.listeners[0].to_string(), "--tls"])
        .args([
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            USER_PASSWORD,
        ])
        .args([
            "--from",
            "billing@payments.example.com",
            "--to",
            "customer@example.net",
        ])
        .args(["--header", "From: CEO <ceo@shipping.example.com>"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("swaks");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("550 5.7.1 From: header address <ceo@shipping.example.com> not allowed for user payments"),
        "{text}"
    );

    let r = reconcile_relay(&ex.api, &ex.ctx).await;
    assert_eq!(
        r["status"]["queue"]["queued"], 2,
        "only the tenant's own mail is queued"
    );
    let metrics = support::http_get_text(ex.relay.admin, "/metrics").await;
    for line in [
        "mailrelay_smtp_sender_refused_total{reason=\"mail_from\"} 1",
        "mailrelay_smtp_sender_refused_total{reason=\"from_header\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    let log = ex.relay.log();
    assert!(
        log.contains("sender not allowed") && log.contains("sender_binding.users.payments"),
        "{log}"
    );
}
