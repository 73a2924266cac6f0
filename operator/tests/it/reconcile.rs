//! The reconcile loops against an in-memory Kubernetes API (kube's tower-test mock
//! transport, see `support/fake_api.rs`) and a real Redis: create, update, quotas
//! added and removed, a missing Secret, deletion, API errors, and SendQuota status
//! from a relay admin API (a local HTTP server serving the agreed JSON).

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use mailrelay_operator::crd::{MailRelay, SendQuota};
use mailrelay_operator::reconcile::{self, Context, Settings, quota, relay};
use mailrelay_operator::telemetry::Metrics;
use serde_json::{Value, json};
use support::fake_api::FakeApi;
use support::redis::RedisServer;

const NS: &str = "/api/v1/namespaces/mail";
const RELAY: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/mailrelays/relay";
const QUOTAS: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/sendquotas";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/mail/deployments/relay";
const CONFIG_MAP: &str = "/api/v1/namespaces/mail/configmaps/relay-config";
const ADMIN_TOKEN: &str = "/api/v1/namespaces/mail/secrets/relay-admin-token";

fn settings() -> Settings {
    Settings {
        status_interval: Duration::from_secs(30),
        queue_timeout: Duration::from_secs(20),
        ..Settings::default()
    }
}

fn context(api: &FakeApi, settings: Settings) -> Arc<Context> {
    Context::new(api.client.clone(), settings, Arc::new(Metrics::new()))
}

fn relay_obj(spec: Value) -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
           "metadata": {"name": "relay", "namespace": "mail", "labels": {"team": "payments"}},
           "spec": spec})
}

fn spec(redis: &RedisServer) -> Value {
    json!({"hostname": "relay.example.com", "redis": {"url": redis.url()},
           "listeners": [{"name": "smtp", "port": 2525}]})
}

fn quota_obj(name: &str, limits: &[&str]) -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "SendQuota",
           "metadata": {"name": name, "namespace": "mail"},
           "spec": {"direction": "ingress", "limits": limits,
                    "relaySelector": {"matchLabels": {"team": "payments"}}}})
}

fn stored_relay(api: &FakeApi) -> Arc<MailRelay> {
    Arc::new(serde_json::from_value(api.get(RELAY).expect("relay stored")).unwrap())
}

async fn reconcile_relay(api: &FakeApi, ctx: &Arc<Context>) -> Result<Action, reconcile::Error> {
    relay::reconcile(stored_relay(api), ctx.clone()).await
}

fn ready_deployments(api: &FakeApi) {
    api.set_deployment_status(
        json!({"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
    );
}

fn condition<'a>(obj: &'a Value, type_: &str) -> &'a Value {
    obj["status"]["conditions"]
        .as_array()
        .unwrap_or_else(|| panic!("no conditions: {obj}"))
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

fn config_hash(api: &FakeApi) -> String {
    api.get(DEPLOYMENT).unwrap()["spec"]["template"]["metadata"]["annotations"]["mailrelay.io/config-hash"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn relay_config(api: &FakeApi) -> mailrelay::config::RelayConfig {
    let cm = api.get(CONFIG_MAP).unwrap();
    mailrelay::config::RelayConfig::from_yaml(cm["data"]["mailrelay.yaml"].as_str().unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_applies_every_object_and_reports_status() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(RELAY, relay_obj(spec(&redis)));
    let ctx = context(&api, settings());

    let action = reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));

    let reqs = api.requests();
    let patched: Vec<&str> = reqs
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(
        patched,
        [
            "/api/v1/namespaces/mail/secrets/relay-dkim",
            "/api/v1/namespaces/mail/configmaps/relay-config",
            "/api/v1/namespaces/mail/serviceaccounts/relay",
            "/apis/networking.k8s.io/v1/namespaces/mail/networkpolicies/relay",
            "/api/v1/namespaces/mail/services/relay",
            "/api/v1/namespaces/mail/services/relay-admin",
            "/apis/policy/v1/namespaces/mail/poddisruptionbudgets/relay",
            "/apis/apps/v1/namespaces/mail/deployments/relay",
            "/apis/mailrelay.io/v1alpha1/namespaces/mail/mailrelays/relay/status",
        ]
    );
    for r in reqs.iter().filter(|r| r.method == "PATCH") {
        assert!(
            r.query.contains("fieldManager=mailrelay-operator") && r.query.contains("force=true"),
            "server-side apply with our field manager: {} ?{}",
            r.path,
            r.query
        );
    }
    assert!(reqs[0].is("GET", "/sendquotas"), "{:?}", reqs[0]);
    let dep = api.get(DEPLOYMENT).unwrap();
    assert_eq!(dep["metadata"]["ownerReferences"][0]["kind"], "MailRelay");
    assert_eq!(dep["metadata"]["ownerReferences"][0]["controller"], true);

    let r = api.get(RELAY).unwrap();
    let ready = condition(&r, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("Available"))
    );
    assert_eq!(ready["observedGeneration"], 1);
    assert_eq!(condition(&r, "Progressing")["status"], "False");
    assert_eq!(condition(&r, "Degraded")["status"], "False");
    assert_eq!(r["status"]["observedGeneration"], 1);
    assert_eq!(r["status"]["readyReplicas"], 2);
    assert_eq!(r["status"]["queue"]["queued"], 0);
    assert_eq!(r["status"]["delivery"]["delivered"], 0);
    assert_eq!(
        r["status"]["configHash"].as_str().unwrap(),
        config_hash(&api)
    );

    // Nothing changed: the objects are applied again (idempotent), the status is not.
    api.clear_requests();
    reconcile_relay(&api, &ctx).await.unwrap();
    assert!(
        !api.requests().iter().any(|r| r.path.ends_with("/status")),
        "an unchanged status is not patched: {:?}",
        api.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_rolls_the_pods() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(RELAY, relay_obj(spec(&redis)));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    let before = config_hash(&api);

    let mut r = api.get(RELAY).unwrap();
    r["spec"]["limits"] = json!({"maxRecipients": 10});
    r["metadata"]["generation"] = json!(2);
    api.put(RELAY, r);
    reconcile_relay(&api, &ctx).await.unwrap();

    let after = config_hash(&api);
    assert_ne!(before, after, "a config change changes the pod template");
    assert_eq!(relay_config(&api).limits.max_recipients, 10);
    let r = api.get(RELAY).unwrap();
    assert_eq!(r["status"]["observedGeneration"], 2);
    assert_eq!(condition(&r, "Ready")["observedGeneration"], 2);
    assert_eq!(r["status"]["configHash"].as_str(), Some(after.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_added_and_removed_change_the_config_map_not_the_pods() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(RELAY, relay_obj(spec(&redis)));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    let hash = config_hash(&api);
    let template = api.get(DEPLOYMENT).unwrap()["spec"]["template"].clone();
    assert!(relay_config(&api).quotas.is_empty());

    api.put(
        &format!("{QUOTAS}/payments"),
        quota_obj("payments", &["100/1m"]),
    );
    // Selects nothing here: another team's relays.
    let mut other = quota_obj("other-team", &["5/1m"]);
    other["spec"]["relaySelector"]["matchLabels"]["team"] = json!("web");
    api.put(&format!("{QUOTAS}/other-team"), other);
    reconcile_relay(&api, &ctx).await.unwrap();
    let cfg = relay_config(&api);
    assert_eq!(cfg.quotas.len(), 1);
    assert_eq!(cfg.quotas[0].name, "payments");
    assert_eq!(cfg.quotas[0].limits[0].to_string(), "100/1m");
    assert_eq!(config_hash(&api), hash, "quota changes do not roll pods");
    assert_eq!(api.get(DEPLOYMENT).unwrap()["spec"]["template"], template);
    assert_eq!(
        api.get(RELAY).unwrap()["status"]["quotas"],
        json!(["payments"])
    );

    // An invalid quota is left out; the relay keeps the valid ones.
    api.put(
        &format!("{QUOTAS}/broken"),
        quota_obj("broken", &["1/1m", "2/60s"]),
    );
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(relay_config(&api).quotas.len(), 1);

    api.remove(&format!("{QUOTAS}/payments"));
    reconcile_relay(&api, &ctx).await.unwrap();
    assert!(relay_config(&api).quotas.is_empty());
    assert_eq!(config_hash(&api), hash);
    assert_eq!(api.get(RELAY).unwrap()["status"].get("quotas"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_holds_the_rollout_with_a_reason_and_an_event() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    let mut s = spec(&redis);
    s["tls"] = json!({"secretName": "relay-tls"});
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());

    let action = reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(30)),
        "retried, not a crash loop"
    );
    let reqs = api.requests();
    assert!(reqs.iter().any(|r| r.is("GET", "/secrets/relay-tls")));
    assert!(
        !reqs
            .iter()
            .any(|r| r.method == "PATCH" && !r.path.ends_with("/status")),
        "nothing applied while a Secret is missing"
    );
    let events: Vec<_> = reqs.iter().filter(|r| r.is("POST", "/events")).collect();
    assert_eq!(events.len(), 1);
    let ev = events[0].body.as_ref().unwrap();
    assert_eq!(ev["reason"], "SecretNotFound");
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["regarding"]["name"], "relay");
    let r = api.get(RELAY).unwrap();
    let ready = condition(&r, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "SecretNotFound");
    assert!(
        ready["message"].as_str().unwrap().contains("relay-tls"),
        "{ready}"
    );
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.tls.secretName"),
        "{ready}"
    );

    // Same problem again: no second event, no status change.
    api.clear_requests();
    reconcile_relay(&api, &ctx).await.unwrap();
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.is("POST", "/events") || r.path.ends_with("/status"))
    );

    // A Secret without the keys is named as such.
    api.put(
        &format!("{NS}/secrets/relay-tls"),
        secret("relay-tls", &[("tls.crt", "cert")]),
    );
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(
        condition(&api.get(RELAY).unwrap(), "Ready")["reason"],
        "SecretKeyMissing"
    );

    // Once the Secret is complete the relay rolls out.
    api.put(
        &format!("{NS}/secrets/relay-tls"),
        secret("relay-tls", &[("tls.crt", "cert"), ("tls.key", "key")]),
    );
    reconcile_relay(&api, &ctx).await.unwrap();
    assert!(api.get(DEPLOYMENT).is_some());
    assert_eq!(
        condition(&api.get(RELAY).unwrap(), "Ready")["status"],
        "True"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_secrets_roll_the_pods_when_they_change() {
    let redis = RedisServer::start_with(Some("first-password"));
    let api = FakeApi::start();
    ready_deployments(&api);
    let mut s = spec(&redis);
    s["redis"]["passwordSecret"] = json!({"name": "redis", "key": "password"});
    api.put(RELAY, relay_obj(s));
    let password = |pw: &str| secret("redis", &[("password", pw)]);
    api.put(&format!("{NS}/secrets/redis"), password("first-password"));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    let r = api.get(RELAY).unwrap();
    assert_eq!(
        condition(&r, "Degraded")["status"],
        "False",
        "the password reached the queue read: {r}"
    );
    let annotation = |api: &FakeApi| {
        api.get(DEPLOYMENT).unwrap()["spec"]["template"]["metadata"]["annotations"]["mailrelay.io/secret-hash"].clone()
    };
    let before = annotation(&api);
    assert!(before.is_string());
    let env = &api.get(DEPLOYMENT).unwrap()["spec"]["template"]["spec"]["containers"][0]["env"][0];
    assert_eq!(env["name"], "MAILRELAY_REDIS_PASSWORD");
    assert_eq!(env["valueFrom"]["secretKeyRef"]["name"], "redis");

    api.put(&format!("{NS}/secrets/redis"), password("second-password"));
    redis
        .cli(&["CONFIG", "SET", "requirepass", "second-password"])
        .unwrap();
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_ne!(annotation(&api), before);
    assert_eq!(
        condition(&api.get(RELAY).unwrap(), "Degraded")["status"],
        "False"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_url_from_a_secret_is_required_checked_used_and_rolls_the_pods() {
    let redis = RedisServer::start_with(Some("url-password"));
    let api = FakeApi::start();
    ready_deployments(&api);
    let mut s = spec(&redis);
    s["redis"] = json!({"urlSecret": {"name": "redis-url", "key": "url"}});
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());
    let url_secret = |url: &str| secret("redis-url", &[("url", url)]);
    let ready = |api: &FakeApi| condition(&api.get(RELAY).unwrap(), "Ready").clone();

    // Missing: the same hold as a missing password Secret.
    let action = reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    assert!(
        api.requests()
            .iter()
            .any(|r| r.is("GET", "/secrets/redis-url"))
    );
    assert!(api.get(DEPLOYMENT).is_none(), "nothing applied");
    let r = ready(&api);
    assert_eq!(
        (r["status"].as_str(), r["reason"].as_str()),
        (Some("False"), Some("SecretNotFound"))
    );
    let m = r["message"].as_str().unwrap();
    assert!(
        m.contains("\"redis-url\"") && m.contains("spec.redis.urlSecret"),
        "{m}"
    );
    let events: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.is("POST", "/events"))
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body.as_ref().unwrap()["reason"], "SecretNotFound");

    // A value the relay would refuse: named, never quoted (it may hold a password).
    api.put(
        &format!("{NS}/secrets/redis-url"),
        url_secret("http://:url-password@127.0.0.1:1"),
    );
    reconcile_relay(&api, &ctx).await.unwrap();
    let r = ready(&api);
    assert_eq!(r["reason"], "SecretValueInvalid");
    let m = r["message"].as_str().unwrap();
    assert!(
        m.contains("spec.redis.urlSecret") && m.contains("redis://"),
        "{m}"
    );
    assert!(!m.contains("url-password"), "{m}");
    assert!(api.get(DEPLOYMENT).is_none());

    // A good one: rolled out, and the operator reads the queue through it.
    let first = format!("redis://:url-password@127.0.0.1:{}", redis.port());
    api.put(&format!("{NS}/secrets/redis-url"), url_secret(&first));
    reconcile_relay(&api, &ctx).await.unwrap();
    let r = api.get(RELAY).unwrap();
    assert_eq!(condition(&r, "Ready")["status"], "True", "{r}");
    assert_eq!(
        condition(&r, "Degraded")["status"],
        "False",
        "the URL from the Secret reached the queue read: {r}"
    );
    assert_eq!(r["status"]["queue"]["queued"], 0);
    let dep = api.get(DEPLOYMENT).unwrap();
    let env = &dep["spec"]["template"]["spec"]["containers"][0]["env"][0];
    assert_eq!(env["name"], "MAILRELAY_REDIS_URL");
    assert_eq!(
        env["valueFrom"]["secretKeyRef"],
        json!({"name": "redis-url", "key": "url", "optional": false})
    );
    assert_eq!(
        relay_config(&api).queue.redis.unwrap().url,
        mailrelay_operator::resources::config::REDIS_URL_PLACEHOLDER
    );
    let cm = api.get(CONFIG_MAP).unwrap().to_string();
    assert!(
        !cm.contains("url-password"),
        "the URL stays out of the ConfigMap"
    );
    let annotation = |api: &FakeApi| {
        api.get(DEPLOYMENT).unwrap()["spec"]["template"]["metadata"]["annotations"]
            ["mailrelay.io/secret-hash"]
            .clone()
    };
    let before = annotation(&api);
    assert!(before.is_string());

    // A new URL in the Secret rolls the pods, and the operator follows it.
    redis
        .cli(&["CONFIG", "SET", "requirepass", "new-password"])
        .unwrap();
    let second = format!("redis://:new-password@127.0.0.1:{}", redis.port());
    api.put(&format!("{NS}/secrets/redis-url"), url_secret(&second));
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_ne!(annotation(&api), before, "a changed URL rolls the pods");
    assert_eq!(
        condition(&api.get(RELAY).unwrap(), "Degraded")["status"],
        "False"
    );
}

/// A Secret in the test namespace with `data` (values base64-encoded as the API
/// server stores them).
fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine as _;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            let v = base64::engine::general_purpose::STANDARD.encode(v);
            (k.to_string(), json!(v))
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": "mail"}, "data": data})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_relay_is_left_to_the_garbage_collector() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let mut obj = relay_obj(spec(&redis));
    obj["metadata"]["deletionTimestamp"] = json!("2026-11-29T05:00:00Z");
    api.put(RELAY, obj);
    let ctx = context(&api, settings());
    let action = reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(api.requests().is_empty(), "{:?}", api.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_requeue_with_growing_backoff_and_reset_on_success() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(RELAY, relay_obj(spec(&redis)));
    let ctx = context(&api, settings());
    let mut delays = Vec::new();
    for _ in 0..3 {
        api.fail_next("PATCH", "/configmaps/relay-config", 500);
        let err = reconcile_relay(&api, &ctx).await.unwrap_err();
        assert!(matches!(err, reconcile::Error::Kube(_)), "{err}");
        delays.push(reconcile::error_policy(
            stored_relay(&api),
            &err,
            ctx.clone(),
        ));
    }
    assert_eq!(
        delays,
        [5, 10, 20].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    reconcile_relay(&api, &ctx).await.unwrap();
    api.fail_next("PATCH", "/configmaps/relay-config", 500);
    let err = reconcile_relay(&api, &ctx).await.unwrap_err();
    assert_eq!(
        reconcile::error_policy(stored_relay(&api), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5)),
        "a success resets the backoff"
    );
    assert!(
        ctx.metrics.encode().contains(
            "mailrelay_operator_reconcile_errors_total{controller=\"MailRelay\",error=\"kube\"} 4"
        ),
        "{}",
        ctx.metrics.encode()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_queue_store_degrades_without_failing() {
    let mut redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(RELAY, relay_obj(spec(&redis)));
    redis.kill();
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    let r = api.get(RELAY).unwrap();
    let d = condition(&r, "Degraded");
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("True"), Some("QueueStoreUnreachable"))
    );
    assert!(
        api.get(DEPLOYMENT).is_some(),
        "the objects are applied all the same"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_reported_not_applied() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let mut s = spec(&redis);
    // What the CRD's CEL rule refuses; the operator checks again.
    s["relayNetworks"] = json!(["0.0.0.0/0"]);
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    let r = api.get(RELAY).unwrap();
    let ready = condition(&r, "Ready");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.relayNetworks"),
        "{ready}"
    );
    assert!(api.get(DEPLOYMENT).is_none());
    assert!(api.requests().iter().any(|r| r.is("POST", "/events")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_redis_url_forms_are_an_invalid_spec_before_any_secret() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    let mut s = spec(&redis);
    // What the CRD's CEL rule refuses; the operator checks again.
    s["redis"]["urlSecret"] = json!({"name": "redis-url", "key": "url"});
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    let ready = condition(&api.get(RELAY).unwrap(), "Ready").clone();
    assert_eq!(
        ready["reason"], "InvalidSpec",
        "not SecretNotFound: {ready}"
    );
    let m = ready["message"].as_str().unwrap();
    assert!(
        m.starts_with("spec.redis.urlSecret:") && m.contains("not both"),
        "{m}"
    );
    assert!(api.get(DEPLOYMENT).is_none());
}

/// The agreed admin API answer for quota `payments` (crd-shape.md).
const PAYMENTS_USAGE: &str = r#"{"name": "payments", "direction": "ingress", "scope": "per_key", "action": "reject",
 "limits": ["100/1m", "1000/1h"],
 "keys": [ {"key": "alice@a.example",
            "windows": [ {"limit": "100/1m", "window_seconds": 60, "used": 12, "remaining": 88,
                          "resets_at": "2026-11-29T05:01:00Z", "resets_in_seconds": 31},
                         {"limit": "1000/1h", "window_seconds": 3600, "used": 950, "remaining": 50,
                          "resets_at": "2026-11-29T05:40:00Z", "resets_in_seconds": 2300} ]} ]}"#;

/// The tokens the stand-in relay admin API accepts (what its mounted file holds).
type Accepted = Arc<std::sync::Mutex<Vec<String>>>;

/// A local relay admin API: `/api/v1/quotas/payments` answers the agreed JSON,
/// any other quota 404 `{"error": ...}`; without one of the `accepted` bearer
/// tokens, 401 as the relay answers.
async fn admin_server(accepted: Accepted) -> std::net::SocketAddr {
    use axum::extract::Path;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/api/v1/quotas/{name}",
        get(|Path(name): Path<String>, headers: HeaderMap| async move {
            let presented = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_owned();
            if !accepted.lock().unwrap().contains(&presented) {
                return (
                    StatusCode::UNAUTHORIZED,
                    r#"{"error": "admin API: invalid admin token"}"#.to_owned(),
                );
            }
            if name == "payments" {
                (StatusCode::OK, PAYMENTS_USAGE.to_owned())
            } else {
                (
                    StatusCode::NOT_FOUND,
                    format!(r#"{{"error": "quota {name} not found"}}"#),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn reconcile_quota(api: &FakeApi, ctx: &Arc<Context>, name: &str) {
    let q: SendQuota =
        serde_json::from_value(api.get(&format!("{QUOTAS}/{name}")).unwrap()).unwrap();
    let action = quota::reconcile(Arc::new(q), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendquota_status_comes_from_the_relay_admin_api() {
    let accepted: Accepted = Arc::new(std::sync::Mutex::new(vec!["tok-1".into()]));
    let admin = admin_server(accepted.clone()).await;
    let redis = RedisServer::start();
    let api = FakeApi::start();
    api.put(RELAY, relay_obj(spec(&redis)));
    api.put(
        ADMIN_TOKEN,
        secret("relay-admin-token", &[("token", "tok-1\n")]),
    );
    api.put(
        &format!("{QUOTAS}/payments"),
        quota_obj("payments", &["100/1m", "1000/1h"]),
    );
    api.put(&format!("{QUOTAS}/fresh"), quota_obj("fresh", &["10/1m"]));
    let ctx = context(
        &api,
        Settings {
            admin_url_template: format!("http://{admin}"),
            ..settings()
        },
    );

    reconcile_quota(&api, &ctx, "payments").await;
    let q = api.get(&format!("{QUOTAS}/payments")).unwrap();
    let st = &q["status"];
    assert_eq!(st["relays"], json!(["relay"]));
    assert_eq!(
        (
            st["limit"].as_str(),
            st["used"].as_u64(),
            st["remaining"].as_u64()
        ),
        (Some("1000/1h"), Some(950), Some(50)),
        "the fullest window is the summary: {st}"
    );
    assert_eq!(st["resetsAt"], "2026-11-29T05:40:00Z");
    assert_eq!(st["windows"].as_array().unwrap().len(), 2);
    assert_eq!(st["windows"][0]["key"], "alice@a.example");
    assert_eq!(condition(&q, "Ready")["reason"], "Enforced");

    // Unchanged usage: no second status write.
    api.clear_requests();
    reconcile_quota(&api, &ctx, "payments").await;
    assert!(!api.requests().iter().any(|r| r.path.ends_with("/status")));

    reconcile_quota(&api, &ctx, "fresh").await;
    let q = api.get(&format!("{QUOTAS}/fresh")).unwrap();
    assert_eq!(condition(&q, "Ready")["reason"], "NotLoaded");
    assert_eq!(q["status"].get("used"), None);

    // An invalid quota says why, with an event; no relay is asked.
    api.put(
        &format!("{QUOTAS}/broken"),
        quota_obj("broken", &["1/1m", "2/60s"]),
    );
    api.clear_requests();
    reconcile_quota(&api, &ctx, "broken").await;
    let q = api.get(&format!("{QUOTAS}/broken")).unwrap();
    let ready = condition(&q, "Ready");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.limits[1]"),
        "{ready}"
    );
    assert!(api.requests().iter().any(|r| r.is("POST", "/events")));

    // The operator sends the token from the Secret. Right after a rotation the
    // pods may still hold only the previous token: the second line gets through.
    api.put(
        ADMIN_TOKEN,
        secret("relay-admin-token", &[("token", "tok-2\ntok-1\n")]),
    );
    api.remove(&format!("{QUOTAS}/payments"));
    api.put(
        &format!("{QUOTAS}/payments"),
        quota_obj("payments", &["100/1m", "1000/1h"]),
    );
    reconcile_quota(&api, &ctx, "payments").await;
    let q = api.get(&format!("{QUOTAS}/payments")).unwrap();
    assert_eq!(condition(&q, "Ready")["reason"], "Enforced", "{q}");
    // A token the relay does not accept: the relay's 401 is the reason shown.
    accepted.lock().unwrap().clear();
    reconcile_quota(&api, &ctx, "payments").await;
    let q = api.get(&format!("{QUOTAS}/payments")).unwrap();
    let ready = condition(&q, "Ready");
    assert_eq!(ready["reason"], "RelayUnreachable");
    assert!(
        ready["message"].as_str().unwrap().contains("401"),
        "{ready}"
    );
}

fn secret_tokens(api: &FakeApi) -> Vec<String> {
    let s: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(api.get(ADMIN_TOKEN).expect("admin token Secret")).unwrap();
    mailrelay_operator::admin_token::tokens(&s)
}

fn secret_writes(api: &FakeApi) -> Vec<String> {
    api.requests()
        .iter()
        // The DKIM bundle (`relay-dkim`) is applied on every reconcile.
        .filter(|r| {
            r.path.contains("/secrets") && r.method != "GET" && !r.path.ends_with("/relay-dkim")
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// Issue 13: the operator creates `NAME-admin-token` once (owned by the MailRelay,
/// before the pods that mount it), never overwrites a valid one, rotates it on
/// the MailRelay's annotation keeping the previous token as the second line,
/// and drops that line when the grace period is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_secret_is_created_once_kept_and_rotated() {
    use mailrelay_operator::admin_token::{PREVIOUS_EXPIRES_ANNOTATION, ROTATE_ANNOTATION};
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(RELAY, relay_obj(spec(&redis)));
    let ctx = context(&api, settings());

    reconcile_relay(&api, &ctx).await.unwrap();
    let reqs = api.requests();
    let created = reqs
        .iter()
        .position(|r| r.is("POST", "/api/v1/namespaces/mail/secrets"))
        .expect("the Secret is created");
    let deployed = reqs
        .iter()
        .position(|r| r.is("PATCH", "/deployments/relay"))
        .unwrap();
    assert!(
        created < deployed,
        "the Secret exists before the pods mount it"
    );
    let s = api.get(ADMIN_TOKEN).unwrap();
    assert_eq!(s["metadata"]["ownerReferences"][0]["kind"], "MailRelay");
    assert_eq!(s["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(s["type"], "Opaque");
    assert_eq!(token_events(&api), ["AdminTokenCreated"]);
    let first = secret_tokens(&api);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].len(), 64, "32 random bytes, hex");
    assert_eq!(
        relay_config(&api).admin.token_file.unwrap().to_str(),
        Some("/var/run/mailrelay/admin-token/token")
    );

    // Reconciled again: not written, the token stays.
    api.clear_requests();
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(secret_writes(&api), Vec::<String>::new());
    assert_eq!(secret_tokens(&api), first);
    assert_eq!(token_events(&api), Vec::<String>::new());

    // A token someone put there by hand is valid: kept as it is.
    let mut mine = api.get(ADMIN_TOKEN).unwrap();
    mine["data"]["token"] = json!(b64("my-own-token\n"));
    api.put(ADMIN_TOKEN, mine);
    api.clear_requests();
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(secret_writes(&api), Vec::<String>::new());
    assert_eq!(secret_tokens(&api), ["my-own-token"]);

    // Rotation: the annotation with a new value; the previous token stays second.
    edit_metadata(&api, |m| {
        m["annotations"] = json!({ROTATE_ANNOTATION: "2026-12-06"});
    });
    api.clear_requests();
    let action = reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(
        secret_writes(&api),
        ["PUT /api/v1/namespaces/mail/secrets/relay-admin-token"]
    );
    let rotated = secret_tokens(&api);
    assert_eq!(rotated.len(), 2);
    assert_ne!(rotated[0], "my-own-token");
    assert_eq!(rotated[1], "my-own-token");
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    assert_eq!(token_events(&api), ["AdminTokenRotated"]);
    let s = api.get(ADMIN_TOKEN).unwrap();
    assert_eq!(
        s["metadata"]["annotations"]["mailrelay.io/rotated-for"],
        "2026-12-06"
    );
    assert!(s["metadata"]["annotations"][PREVIOUS_EXPIRES_ANNOTATION].is_string());
    assert_eq!(s["metadata"]["ownerReferences"][0]["kind"], "MailRelay");

    // The same annotation again: done already, nothing written.
    api.clear_requests();
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(secret_writes(&api), Vec::<String>::new());
    assert_eq!(secret_tokens(&api), rotated);

    // The grace period is over: the previous token is dropped.
    let mut s = api.get(ADMIN_TOKEN).unwrap();
    s["metadata"]["annotations"][PREVIOUS_EXPIRES_ANNOTATION] = json!("2020-01-01T00:00:00Z");
    api.put(ADMIN_TOKEN, s);
    api.clear_requests();
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(secret_tokens(&api), [rotated[0].clone()]);
    assert_eq!(token_events(&api), ["AdminTokenPreviousDropped"]);
    let s = api.get(ADMIN_TOKEN).unwrap();
    assert!(
        s["metadata"]["annotations"]
            .get(PREVIOUS_EXPIRES_ANNOTATION)
            .is_none()
    );

    // A Secret left without a usable token is regenerated (the relay would refuse
    // every client otherwise).
    let mut s = api.get(ADMIN_TOKEN).unwrap();
    s["data"]["token"] = json!(b64("\n"));
    api.put(ADMIN_TOKEN, s);
    api.clear_requests();
    reconcile_relay(&api, &ctx).await.unwrap();
    let regenerated = secret_tokens(&api);
    assert_eq!(regenerated.len(), 1);
    assert_ne!(regenerated[0], rotated[0]);
    assert_eq!(token_events(&api), ["AdminTokenRegenerated"]);
}

/// Reasons of the admin-token Events recorded since the last `clear_requests`;
/// their notes never carry a token.
fn token_events(api: &FakeApi) -> Vec<String> {
    let tokens = secret_tokens(api);
    api.requests()
        .iter()
        .filter(|r| r.is("POST", "/events"))
        .filter_map(|r| r.body.clone())
        .filter(|b| {
            b["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("AdminToken"))
        })
        .map(|b| {
            let note = b["note"].as_str().unwrap_or_default();
            assert!(note.contains("relay-admin-token"), "{note}");
            assert!(!tokens.iter().any(|t| note.contains(t.as_str())), "{note}");
            b["reason"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn b64(s: &str) -> String {
    serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec()))
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn edit_metadata(api: &FakeApi, change: impl FnOnce(&mut Value)) {
    let mut r = api.get(RELAY).unwrap();
    change(&mut r["metadata"]);
    api.put(RELAY, r);
}

/// An egress SendQuota that the selected relay's delivery paths can never match
/// (all mail goes through a smarthost, the quota names MX hosts) is not silently
/// shown as enforced: `Ready=False`, reason `Unmatchable`, naming the field; the
/// relay is not given it (it would refuse its config), and keeps its other quotas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_quota_the_delivery_paths_can_never_match_is_flagged_and_left_out() {
    let accepted: Accepted = Arc::new(std::sync::Mutex::new(vec!["tok-1".into()]));
    let admin = admin_server(accepted).await;
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(
        ADMIN_TOKEN,
        secret("relay-admin-token", &[("token", "tok-1\n")]),
    );
    let mut s = spec(&redis);
    s["delivery"] = json!({"smarthost": {"host": "smtp.provider.example", "port": 587},
                           "routes": [{"domains": ["partner.example"], "host": "mx.partner.example"}]});
    api.put(RELAY, relay_obj(s));
    let egress = |name: &str, m: Value| {
        json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "SendQuota",
               "metadata": {"name": name, "namespace": "mail"},
               "spec": {"direction": "egress", "limits": ["10/1s"], "match": m}})
    };
    api.put(
        &format!("{QUOTAS}/gmail"),
        egress("gmail", json!({"mxHosts": ["*.google.com"]})),
    );
    // Routed: paced by the recipient domain, so it matches.
    api.put(
        &format!("{QUOTAS}/partner"),
        egress(
            "partner",
            json!({"destinationDomains": ["partner.example"]}),
        ),
    );
    let ctx = context(
        &api,
        Settings {
            admin_url_template: format!("http://{admin}"),
            ..settings()
        },
    );

    reconcile_quota(&api, &ctx, "gmail").await;
    let q = api.get(&format!("{QUOTAS}/gmail")).unwrap();
    let ready = condition(&q, "Ready");
    assert_eq!(ready["status"], "False", "{ready}");
    assert_eq!(ready["reason"], "Unmatchable", "{ready}");
    let msg = ready["message"].as_str().unwrap();
    assert!(
        msg.starts_with("spec.match.mxHosts")
            && msg.contains("MailRelay relay")
            && msg.contains("smtp.provider.example"),
        "{msg}"
    );
    assert_eq!(q["status"]["relays"], json!(["relay"]));

    // The matchable one is asked about as usual (the relay does not know it).
    reconcile_quota(&api, &ctx, "partner").await;
    let q = api.get(&format!("{QUOTAS}/partner")).unwrap();
    assert_eq!(condition(&q, "Ready")["reason"], "NotLoaded");

    reconcile_relay(&api, &ctx).await.unwrap();
    let names: Vec<String> = relay_config(&api)
        .quotas
        .iter()
        .map(|q| q.name.clone())
        .collect();
    assert_eq!(names, ["partner"]);

    // Without the smarthost the MX hosts are looked up: the quota matches again.
    edit_spec(&api, |s| {
        s["delivery"].as_object_mut().unwrap().remove("smarthost");
    });
    reconcile_quota(&api, &ctx, "gmail").await;
    let q = api.get(&format!("{QUOTAS}/gmail")).unwrap();
    assert_eq!(condition(&q, "Ready")["reason"], "NotLoaded");
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(relay_config(&api).quotas.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendquota_without_relays_or_with_an_unreachable_one() {
    let api = FakeApi::start();
    let mut q = quota_obj("payments", &["100/1m"]);
    q["spec"]["relaySelector"]["matchLabels"]["team"] = json!("nobody");
    api.put(&format!("{QUOTAS}/payments"), q);
    let port = support::free_ports(1)[0];
    let ctx = context(
        &api,
        Settings {
            admin_url_template: format!("http://127.0.0.1:{port}"),
            ..settings()
        },
    );
    reconcile_quota(&api, &ctx, "payments").await;
    assert_eq!(
        condition(&api.get(&format!("{QUOTAS}/payments")).unwrap(), "Ready")["reason"],
        "NoRelays"
    );

    api.put(
        RELAY,
        relay_obj(json!({"hostname": "r.example", "redis": {"url": "redis://127.0.0.1:1"}})),
    );
    api.put(
        &format!("{QUOTAS}/payments"),
        quota_obj("payments", &["100/1m"]),
    );
    reconcile_quota(&api, &ctx, "payments").await;
    let ready = condition(&api.get(&format!("{QUOTAS}/payments")).unwrap(), "Ready").clone();
    assert_eq!(ready["reason"], "RelayUnreachable");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("MailRelay relay"),
        "{ready}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_run_reconcile_what_they_list_and_stop_on_shutdown() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(RELAY, relay_obj(spec(&redis)));
    api.put(
        &format!("{QUOTAS}/payments"),
        quota_obj("payments", &["100/1m"]),
    );
    let port = support::free_ports(1)[0];
    let ctx = context(
        &api,
        Settings {
            admin_url_template: format!("http://127.0.0.1:{port}"),
            ..settings()
        },
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(reconcile::run(ctx, async move {
        let _ = rx.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let relay_done = api.get(RELAY).unwrap().get("status").is_some();
        let quota_done = api
            .get(&format!("{QUOTAS}/payments"))
            .unwrap()
            .get("status")
            .is_some();
        if relay_done && quota_done && api.get(DEPLOYMENT).is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the controllers did not reconcile: {:?}",
            api.requests()
                .iter()
                .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relay_config(&api).quotas.len(), 1);
    let watched: Vec<String> = api
        .requests()
        .iter()
        .filter(|r| r.query.contains("watch=true"))
        .map(|r| r.path.clone())
        .collect();
    for path in [
        "/apis/mailrelay.io/v1alpha1/mailrelays",
        "/apis/mailrelay.io/v1alpha1/sendquotas",
        "/apis/apps/v1/deployments",
        "/api/v1/configmaps",
        "/api/v1/services",
        "/api/v1/secrets",
    ] {
        assert!(
            watched.iter().any(|w| w == path),
            "no watch on {path}: {watched:?}"
        );
    }
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the controllers stop on shutdown")
        .unwrap();
}

#[test]
fn watch_events_map_to_the_objects_they_concern() {
    use mailrelay_operator::reconcile::{quotas_for_relay, relays_for_quota, relays_for_secret};
    let relay = |ns: &str, name: &str, tls: Option<&str>| -> Arc<MailRelay> {
        let mut spec = json!({"hostname": "r.example", "redis": {"url": "redis://r:6379"}});
        if let Some(t) = tls {
            spec["tls"] = json!({"secretName": t});
        }
        let mut r: MailRelay = serde_json::from_value(relay_obj(spec)).unwrap();
        r.metadata.namespace = Some(ns.into());
        r.metadata.name = Some(name.into());
        Arc::new(r)
    };
    let relays = vec![
        relay("mail", "a", Some("tls-a")),
        relay("mail", "b", None),
        relay("other", "c", Some("tls-a")),
    ];
    let names = |refs: Vec<kube::runtime::reflector::ObjectRef<MailRelay>>| -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    };
    let sq: SendQuota = serde_json::from_value(quota_obj("q", &["1/1m"])).unwrap();
    assert_eq!(names(relays_for_quota(&relays, &sq)), ["a", "b"]);
    assert_eq!(
        names(relays_for_secret(&relays, Some("mail"), "tls-a")),
        ["a"]
    );
    assert!(relays_for_secret(&relays, Some("mail"), "unrelated").is_empty());
    let mut d: MailRelay = serde_json::from_value(relay_obj(
        json!({"hostname": "r.example", "redis": {"urlSecret": {"name": "redis-url", "key": "url"}}}),
    ))
    .unwrap();
    d.metadata.name = Some("d".into());
    let with_url = [relays.clone(), vec![Arc::new(d)]].concat();
    assert_eq!(
        names(relays_for_secret(&with_url, Some("mail"), "redis-url")),
        ["d"],
        "a change of the URL Secret reconciles the relay"
    );
    let quotas = vec![Arc::new(sq)];
    assert_eq!(quotas_for_relay(&quotas, &relays[0]).len(), 1);
    assert!(quotas_for_relay(&quotas, &relays[2]).is_empty());
}

const HPA: &str = "/apis/autoscaling/v2/namespaces/mail/horizontalpodautoscalers/relay";
const SCALED_OBJECT: &str = "/apis/keda.sh/v1alpha1/namespaces/mail/scaledobjects/relay";

fn replicas(api: &FakeApi) -> i64 {
    api.get(DEPLOYMENT).unwrap()["spec"]["replicas"]
        .as_i64()
        .unwrap()
}

/// What an autoscaler (or `kubectl scale`) does: a write that is not an apply.
fn scale_by_hand(api: &FakeApi, n: i64) {
    api.update_by(DEPLOYMENT, "kube-controller-manager", |d| {
        d["spec"]["replicas"] = json!(n);
    });
}

fn edit_spec(api: &FakeApi, change: impl FnOnce(&mut Value)) {
    let mut r = api.get(RELAY).unwrap();
    change(&mut r["spec"]);
    let g = r["metadata"]["generation"].as_i64().unwrap_or(1);
    r["metadata"]["generation"] = json!(g + 1);
    api.put(RELAY, r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_autoscaling_the_operator_resets_replicas_changed_by_others() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    let mut s = spec(&redis);
    s["replicas"] = json!(3);
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(replicas(&api), 3);
    assert_eq!(
        api.owners_of(DEPLOYMENT, "/spec/replicas"),
        ["mailrelay-operator"]
    );

    scale_by_hand(&api, 7);
    assert_eq!(replicas(&api), 7);
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(
        replicas(&api),
        3,
        "spec.replicas is the truth without autoscaling"
    );
    assert!(api.get(HPA).is_none());
    let r = api.get(RELAY).unwrap();
    assert_eq!(r["status"]["replicas"], 3);
    assert_eq!(
        r["status"]["selector"],
        "app.kubernetes.io/instance=relay,app.kubernetes.io/name=mailrelay"
    );
    assert!(
        r["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["type"] != "Autoscaling")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_autoscaling_replicas_are_left_to_the_autoscaler() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    let mut s = spec(&redis);
    s["replicas"] = json!(1);
    s["autoscaling"] = json!({"minReplicas": 2, "maxReplicas": 10, "targetCPUUtilization": 70});
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();

    // Created at spec.replicas kept within the bounds, held by the hand-off manager.
    assert_eq!(replicas(&api), 2);
    assert_eq!(
        api.owners_of(DEPLOYMENT, "/spec/replicas"),
        ["mailrelay-operator-replicas"]
    );
    let applied: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| {
            r.is("PATCH", "/deployments/relay")
                && r.query
                    .split('&')
                    .any(|p| p == "fieldManager=mailrelay-operator")
        })
        .collect();
    assert!(!applied.is_empty());
    for r in &applied {
        assert_eq!(
            r.body.as_ref().unwrap()["spec"].get("replicas"),
            None,
            "the operator's apply leaves replicas out"
        );
    }
    assert!(
        ctx.metrics.encode().contains(
            "mailrelay_operator_relay_queue_pending_messages{relay_namespace=\"mail\",relay=\"relay\"} 0"
        ),
        "the gauge the autoscaler reads is exported"
    );
    let hpa = api.get(HPA).expect("an HPA is applied");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "relay");
    assert_eq!(hpa["spec"]["minReplicas"], 2);
    assert_eq!(hpa["metadata"]["ownerReferences"][0]["kind"], "MailRelay");
    let r = api.get(RELAY).unwrap();
    assert_eq!(r["status"]["autoscaler"], "HorizontalPodAutoscaler");
    let cond = condition(&r, "Autoscaling");
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("True"), Some("HorizontalPodAutoscalerApplied"))
    );

    // The autoscaler scales; reconciles (a spec change included) leave it be.
    scale_by_hand(&api, 6);
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(replicas(&api), 6);
    edit_spec(&api, |s| s["limits"] = json!({"maxRecipients": 10}));
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(
        replicas(&api),
        6,
        "a spec change does not reset the autoscaler's size"
    );
    assert_eq!(relay_config(&api).limits.max_recipients, 10);
    assert_eq!(api.get(RELAY).unwrap()["status"]["replicas"], 6);

    // Autoscaling off: spec.replicas rules again and the HPA goes.
    edit_spec(&api, |s| {
        s.as_object_mut().unwrap().remove("autoscaling");
        s["replicas"] = json!(4);
    });
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(replicas(&api), 4);
    assert!(api.get(HPA).is_none(), "the HPA is deleted");
    let r = api.get(RELAY).unwrap();
    assert_eq!(r["status"].get("autoscaler"), None);
    scale_by_hand(&api, 9);
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(replicas(&api), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_autoscaling_on_keeps_the_current_size() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    let mut s = spec(&redis);
    s["replicas"] = json!(3);
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(replicas(&api), 3);

    edit_spec(&api, |s| {
        s["autoscaling"] = json!({"minReplicas": 1, "maxReplicas": 5, "targetCPUUtilization": 60});
    });
    reconcile_relay(&api, &ctx).await.unwrap();
    // Without the hand-off the API server would drop the field the operator
    // stopped applying, and the Deployment would fall back to 1 pod.
    assert_eq!(replicas(&api), 3);
    assert_eq!(
        api.owners_of(DEPLOYMENT, "/spec/replicas"),
        ["mailrelay-operator-replicas"]
    );
    scale_by_hand(&api, 5);
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(replicas(&api), 5);
    assert_eq!(
        api.owners_of(DEPLOYMENT, "/spec/replicas"),
        ["kube-controller-manager"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_without_its_crd_is_a_condition_not_a_crash_loop() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.unserve("/apis/keda.sh/");
    let mut s = spec(&redis);
    s["autoscaling"] = json!({"minReplicas": 0, "maxReplicas": 4,
        "queue": {"pendingMessagesPerReplica": 100},
        "keda": {"prometheusServerAddress": "http://prometheus.monitoring:9090"}});
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());
    let action = reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let r = api.get(RELAY).unwrap();
    let cond = condition(&r, "Autoscaling");
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("KedaNotInstalled"))
    );
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("spec.autoscaling.keda")
    );
    assert_eq!(
        condition(&r, "Ready")["status"],
        "True",
        "the relay itself runs"
    );
    assert!(api.get(HPA).is_none());
    // Besides the admin token's creation (first reconcile), one Warning.
    let events: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.is("POST", "/events"))
        .filter(|r| r.body.as_ref().unwrap()["reason"] != "AdminTokenCreated")
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].body.as_ref().unwrap()["reason"],
        "KedaNotInstalled"
    );
    // Once told, not again.
    api.clear_requests();
    reconcile_relay(&api, &ctx).await.unwrap();
    assert!(!api.requests().iter().any(|r| r.is("POST", "/events")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_object_replaces_the_hpa_and_goes_with_autoscaling() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    let mut s = spec(&redis);
    s["autoscaling"] = json!({"minReplicas": 1, "maxReplicas": 4,
        "queue": {"pendingMessagesPerReplica": 100}});
    api.put(RELAY, relay_obj(s));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    assert!(api.get(HPA).is_some());

    edit_spec(&api, |s| {
        s["autoscaling"]["keda"] = json!({"prometheusServerAddress": "http://prom:9090"});
        s["autoscaling"]["minReplicas"] = json!(0);
    });
    reconcile_relay(&api, &ctx).await.unwrap();
    assert!(api.get(HPA).is_none(), "KEDA makes its own HPA; ours goes");
    let so = api.get(SCALED_OBJECT).expect("a ScaledObject");
    assert_eq!(so["spec"]["minReplicaCount"], 0);
    assert_eq!(so["spec"]["scaleTargetRef"]["name"], "relay");
    assert_eq!(
        api.get(RELAY).unwrap()["status"]["autoscaler"],
        "ScaledObject"
    );

    edit_spec(&api, |s| {
        s.as_object_mut().unwrap().remove("autoscaling");
    });
    reconcile_relay(&api, &ctx).await.unwrap();
    assert!(api.get(SCALED_OBJECT).is_none());
    assert_eq!(replicas(&api), 2, "back to spec.replicas");
}

const SERVICE: &str = "/api/v1/namespaces/mail/services/relay";

/// Objects a team made by hand, named like the relay's: a Service nobody controls,
/// a ConfigMap another MailRelay controls, a Deployment another controller runs.
fn foreign_objects() -> Vec<(&'static str, Value)> {
    vec![
        (
            SERVICE,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "relay", "namespace": "mail", "labels": {"team": "web"}},
                   "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}}),
        ),
        (
            CONFIG_MAP,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "relay-config", "namespace": "mail",
                                "ownerReferences": [{"apiVersion": "mailrelay.io/v1alpha1",
                                    "kind": "MailRelay", "name": "other", "uid": "uid-other",
                                    "controller": true}]},
                   "data": {"mailrelay.yaml": "hostname: other.example.com\n"}}),
        ),
        (
            DEPLOYMENT,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "relay", "namespace": "mail",
                                "ownerReferences": [{"apiVersion": "argoproj.io/v1alpha1",
                                    "kind": "Rollout", "name": "relay", "uid": "uid-rollout",
                                    "controller": true}]},
                   "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                            "template": {"metadata": {"labels": {"app": "web"}},
                                         "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_someone_else_owns_is_left_untouched_and_reported() {
    let redis = RedisServer::start();
    for (path, obj) in foreign_objects() {
        let api = FakeApi::start();
        ready_deployments(&api);
        api.put(RELAY, relay_obj(spec(&redis)));
        let stored = api.put(path, obj);
        let kind = stored["kind"].as_str().unwrap();
        let name = stored["metadata"]["name"].as_str().unwrap();
        let ctx = context(&api, settings());

        let action = reconcile_relay(&api, &ctx).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(30)));
        assert_eq!(
            api.get(path).unwrap(),
            stored,
            "{kind} {name} must stay byte for byte as it was"
        );
        let writes: Vec<String> = api
            .requests()
            .iter()
            .filter(|r| {
                r.method != "GET" && !r.is("POST", "/events") && !r.path.ends_with("/status")
            })
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert!(writes.is_empty(), "nothing is applied: {writes:?}");
        assert!(
            api.requests().iter().any(|r| r.is("GET", path)),
            "the object is looked up before any apply"
        );

        let r = api.get(RELAY).unwrap();
        let ready = condition(&r, "Ready");
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("Conflict"))
        );
        let m = ready["message"].as_str().unwrap();
        assert!(m.contains(&format!("{kind} \"{name}\"")), "{m}");
        let events: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.is("POST", "/events"))
            .collect();
        assert_eq!(events.len(), 1, "{kind}");
        let ev = events[0].body.as_ref().unwrap();
        assert_eq!(ev["reason"], "Conflict");
        assert_eq!(ev["type"], "Warning");
        assert!(ev["note"].as_str().unwrap().contains(name), "{ev}");

        // Still there: still untouched, no second Event.
        api.clear_requests();
        reconcile_relay(&api, &ctx).await.unwrap();
        assert_eq!(api.get(path).unwrap(), stored);
        assert!(!api.requests().iter().any(|r| r.is("POST", "/events")));

        // Gone: the relay's own objects are applied and it becomes ready.
        api.remove(path);
        reconcile_relay(&api, &ctx).await.unwrap();
        let ours = api
            .get(path)
            .expect("applied once the foreign object is gone");
        assert_eq!(ours["metadata"]["ownerReferences"][0]["kind"], "MailRelay");
        assert_eq!(
            ours["metadata"]["ownerReferences"][0]["uid"],
            api.get(RELAY).unwrap()["metadata"]["uid"]
        );
        let r = api.get(RELAY).unwrap();
        assert_eq!(condition(&r, "Ready")["status"], "True", "{kind}");
        assert!(api.get(DEPLOYMENT).is_some() && api.get(SERVICE).is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_left_by_an_earlier_relay_of_the_same_name_are_not_taken_over() {
    // A MailRelay deleted and created again gets a new uid; until the garbage
    // collector removes the old objects they are not this relay's.
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    api.put(RELAY, relay_obj(spec(&redis)));
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    let old = api.get(DEPLOYMENT).unwrap();

    let mut r = api.get(RELAY).unwrap();
    r["metadata"]["uid"] = json!("uid-recreated");
    r.as_object_mut().unwrap().remove("status");
    api.put(RELAY, r);
    reconcile_relay(&api, &ctx).await.unwrap();
    let r = api.get(RELAY).unwrap();
    assert_eq!(condition(&r, "Ready")["reason"], "Conflict");
    assert!(
        condition(&r, "Ready")["message"]
            .as_str()
            .unwrap()
            .contains("controlled by MailRelay \"relay\""),
        "{r}"
    );
    assert_eq!(api.get(DEPLOYMENT).unwrap(), old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_autoscaler_is_neither_taken_over_nor_deleted() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    ready_deployments(&api);
    let hpa = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "relay", "namespace": "mail"},
        "spec": {"minReplicas": 1, "maxReplicas": 3,
                 "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}}});
    let mut s = spec(&redis);
    s["autoscaling"] = json!({"minReplicas": 2, "maxReplicas": 10, "targetCPUUtilization": 70});
    api.put(RELAY, relay_obj(s));
    let stored = api.put(HPA, hpa);
    let ctx = context(&api, settings());
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(api.get(HPA).unwrap(), stored);
    let r = api.get(RELAY).unwrap();
    assert_eq!(condition(&r, "Ready")["reason"], "Conflict");
    assert!(api.get(DEPLOYMENT).is_none(), "nothing applied");

    // Autoscaling off while the status says an HPA was rendered: the foreign one
    // (made after ours went) is not deleted.
    api.remove(HPA);
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(
        api.get(RELAY).unwrap()["status"]["autoscaler"],
        "HorizontalPodAutoscaler"
    );
    let stored = api.put(HPA, stored);
    edit_spec(&api, |s| {
        s.as_object_mut().unwrap().remove("autoscaling");
    });
    reconcile_relay(&api, &ctx).await.unwrap();
    assert_eq!(api.get(HPA).unwrap(), stored, "not ours: not deleted");
    assert!(!api.requests().iter().any(|r| r.method == "DELETE"));
    assert_eq!(
        condition(&api.get(RELAY).unwrap(), "Ready")["status"],
        "True"
    );
}
