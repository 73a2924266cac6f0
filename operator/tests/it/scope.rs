//! Several operator installs on one cluster (one in-memory API, one client each):
//! a namespaced install touches only its namespaces; installs with disjoint scopes
//! both work; of two with overlapping scopes (namespaced or cluster-wide) exactly
//! one reconciles each shared namespace, the other refuses it (metric, Event) and
//! takes it over once the first is gone.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use mailrelay_operator::claims::ClaimSettings;
use mailrelay_operator::reconcile::{self, Context, Settings};
use mailrelay_operator::telemetry::Metrics;
use serde_json::{Value, json};
use support::fake_api::{FakeApi, Recorded};
use support::redis::RedisServer;

fn relay_path(ns: &str) -> String {
    format!("/apis/mailrelay.io/v1alpha1/namespaces/{ns}/mailrelays/relay")
}

fn claim_path(ns: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/mailrelay-operator-claim")
}

fn put_relay(api: &FakeApi, redis: &RedisServer, ns: &str) {
    api.put(
        &relay_path(ns),
        json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
               "metadata": {"name": "relay", "namespace": ns},
               "spec": {"hostname": "relay.example.com", "redis": {"url": redis.url()}}}),
    );
}

struct Install {
    who: &'static str,
    metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: tokio::task::JoinHandle<()>,
}

impl Install {
    /// Starts install `who` (its identity `ops-WHO/mailrelay-operator`) watching
    /// `namespaces` (none: every namespace).
    fn start(api: &FakeApi, who: &'static str, namespaces: &[&str]) -> Install {
        let metrics = Arc::new(Metrics::new());
        let claims = ClaimSettings {
            renew_every: Duration::from_millis(200),
            lease_duration: Duration::from_secs(15),
            ..ClaimSettings::new(&format!("ops-{who}/mailrelay-operator"))
        };
        let settings = Settings {
            watch_namespaces: namespaces.iter().map(|s| (*s).to_owned()).collect(),
            claims: Some(claims),
            admin_url_template: format!("http://127.0.0.1:{}", support::free_ports(1)[0]),
            ..Settings::default()
        };
        let ctx = Context::new(api.client_as(who), settings, metrics.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(reconcile::run(ctx, async move {
            let _ = rx.await;
        }));
        Install {
            who,
            metrics,
            stop: Some(tx),
            running,
        }
    }

    fn refused(&self, ns: &str) -> bool {
        self.metrics.encode().contains(&format!(
            "mailrelay_operator_namespace_refused{{watched_namespace=\"{ns}\"}} 1"
        ))
    }

    /// Its requests that change something (not its claims, not Events).
    fn writes_in(&self, api: &FakeApi, ns: &str) -> Vec<String> {
        api.requests()
            .iter()
            .filter(|r| r.who == self.who && r.method != "GET")
            .filter(|r| r.path.contains(&format!("/namespaces/{ns}/")))
            .filter(|r| !r.path.contains("/leases/") && !r.path.ends_with("/leases"))
            .filter(|r| !r.path.contains("/events"))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.running)
            .await
            .expect("the install stops")
            .unwrap();
    }
}

async fn wait_for(what: &str, api: &FakeApi, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            api.requests()
                .iter()
                .map(|r| format!(
                    "{} {} {}?{} -> {}",
                    r.who, r.method, r.path, r.query, r.code
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn reconciled(api: &FakeApi, ns: &str) -> bool {
    api.get(&relay_path(ns))
        .is_some_and(|r| r.get("status").is_some())
        && api
            .get(&format!("/apis/apps/v1/namespaces/{ns}/deployments/relay"))
            .is_some()
}

fn claim_holder(api: &FakeApi, ns: &str) -> Value {
    api.get(&claim_path(ns))
        .map_or(Value::Null, |l| l["spec"]["holderIdentity"].clone())
}

fn namespaces_asked(api: &FakeApi, who: &str) -> Vec<Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| r.who == who)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disjoint_installs_both_work_and_touch_only_their_namespaces() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    for ns in ["a", "b", "other"] {
        put_relay(&api, &redis, ns);
    }
    let a = Install::start(&api, "A", &["a"]);
    let b = Install::start(&api, "B", &["b"]);
    wait_for("both relays reconciled", &api, || {
        reconciled(&api, "a") && reconciled(&api, "b")
    })
    .await;
    assert_eq!(claim_holder(&api, "a"), "ops-A/mailrelay-operator");
    assert_eq!(claim_holder(&api, "b"), "ops-B/mailrelay-operator");
    assert!(!a.refused("a") && !b.refused("b"));
    for (who, ns) in [("A", "a"), ("B", "b")] {
        for r in namespaces_asked(&api, who) {
            assert!(
                r.path.contains(&format!("/namespaces/{ns}/")),
                "install {who} (namespace {ns}) asked {} {}?{}",
                r.method,
                r.path,
                r.query
            );
        }
    }
    assert!(
        !reconciled(&api, "other"),
        "a namespace nobody watches is left alone"
    );
    a.stop().await;
    b.stop().await;
    assert_eq!(
        claim_holder(&api, "a"),
        Value::Null,
        "claims are released on shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_overlapping_installs_the_second_refuses_the_shared_namespace_until_the_first_is_gone()
 {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    for ns in ["a", "b", "c"] {
        put_relay(&api, &redis, ns);
    }
    let a = Install::start(&api, "A", &["a", "b"]);
    wait_for("A reconciled a and b", &api, || {
        reconciled(&api, "a") && reconciled(&api, "b")
    })
    .await;
    let b = Install::start(&api, "B", &["b", "c"]);
    wait_for("B reconciled c and refused b", &api, || {
        reconciled(&api, "c") && b.refused("b")
    })
    .await;
    // Give B's controller time to have looked at the relay in b more than once.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        b.writes_in(&api, "b"),
        Vec::<String>::new(),
        "B must not touch b"
    );
    assert_eq!(claim_holder(&api, "b"), "ops-A/mailrelay-operator");
    assert!(!b.refused("c"));
    let events: Vec<Value> = api
        .requests()
        .iter()
        .filter(|r| r.who == "B" && r.is("POST", "/namespaces/b/events"))
        .filter_map(|r| r.body.clone())
        .collect();
    assert_eq!(events.len(), 1, "one Event per skipped object: {events:?}");
    assert_eq!(events[0]["reason"], "NamespaceClaimed");
    assert_eq!(events[0]["regarding"]["name"], "relay");
    assert!(
        events[0]["note"]
            .as_str()
            .unwrap()
            .contains("ops-A/mailrelay-operator"),
        "{}",
        events[0]
    );

    // A goes away (a clean shutdown releases its claims): B takes b over.
    a.stop().await;
    wait_for("B took b over", &api, || {
        claim_holder(&api, "b") == "ops-B/mailrelay-operator" && !b.writes_in(&api, "b").is_empty()
    })
    .await;
    assert!(!b.refused("b"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_and_a_namespaced_install_never_both_reconcile_a_namespace() {
    let redis = RedisServer::start();

    // The namespaced install came first: the cluster-wide one leaves b alone.
    let api = FakeApi::start();
    for ns in ["a", "b"] {
        put_relay(&api, &redis, ns);
    }
    let n = Install::start(&api, "N", &["b"]);
    wait_for("N reconciled b", &api, || reconciled(&api, "b")).await;
    let c = Install::start(&api, "C", &[]);
    wait_for("C reconciled a and refused b", &api, || {
        reconciled(&api, "a") && c.refused("b")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(c.writes_in(&api, "b"), Vec::<String>::new());
    assert_eq!(claim_holder(&api, "a"), "ops-C/mailrelay-operator");
    n.stop().await;
    c.stop().await;

    // The cluster-wide install came first: the namespaced one refuses b.
    let api = FakeApi::start();
    for ns in ["a", "b"] {
        put_relay(&api, &redis, ns);
    }
    let c = Install::start(&api, "C", &[]);
    wait_for("C reconciled a and b", &api, || {
        reconciled(&api, "a") && reconciled(&api, "b")
    })
    .await;
    let n = Install::start(&api, "N", &["b"]);
    wait_for("N refused b", &api, || n.refused("b")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(n.writes_in(&api, "b"), Vec::<String>::new());
    assert_eq!(claim_holder(&api, "b"), "ops-C/mailrelay-operator");
    c.stop().await;
    n.stop().await;
}
