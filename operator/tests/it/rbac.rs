//! The chart grants the operator exactly what its code uses, no more, no less.
//!
//! A scenario drives the operator's real code against the in-memory API (which
//! records every request): leader election, the controllers' startup lists and
//! watches, reconciles that apply every object kind, switch autoscalers, hold a
//! rollout on a missing Secret, publish and re-publish Events, and report quota
//! status. Each recorded request is mapped to the RBAC attributes the API server
//! checks (`support/rbac.rs`), and a small RBAC authorizer evaluates them against
//! the Roles, ClusterRoles and bindings the chart renders with the real Helm
//! engine. A request the chart does not allow, or a granted verb no request uses,
//! fails with the exact difference. When the operator starts making a new kind of
//! request, add it to the scenario (if no existing step makes it) and update
//! charts/mailrelay-operator/templates/rbac.yaml to the rules the failure prints.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use mailrelay_operator::claims::ClaimSettings;
use mailrelay_operator::crd::{MailRelay, SendQuota, SenderDomain};
use mailrelay_operator::leader::{ElectorConfig, LeaderElector};
use mailrelay_operator::reconcile::{self, Context, Settings, quota, relay, senderdomain};
use mailrelay_operator::telemetry::Metrics;
use serde_json::{Value, json};
use support::fake_api::{FakeApi, Recorded};
use support::rbac;
use support::redis::RedisServer;

/// The operator's release: `helm install mr … -n ops`.
const RELEASE: &str = "mr";
const OPERATOR_NS: &str = "ops";
const SA: &str = "mr-mailrelay-operator";
/// The leader Lease: the chart names it after the release.
const LEASE: &str = "mr-mailrelay-operator";

/// As the binary runs: claims on, under the install's identity.
fn operator_settings(watch: &[&str]) -> Settings {
    Settings {
        watch_namespaces: watch.iter().map(|s| (*s).to_owned()).collect(),
        claims: Some(ClaimSettings::new(&format!("{OPERATOR_NS}/{LEASE}"))),
        ..Settings::default()
    }
}

fn relay_path(ns: &str, name: &str) -> String {
    format!("/apis/mailrelay.io/v1alpha1/namespaces/{ns}/mailrelays/{name}")
}

fn domain_path(ns: &str, name: &str) -> String {
    format!("/apis/mailrelay.io/v1alpha1/namespaces/{ns}/senderdomains/{name}")
}

fn quota_path(ns: &str, name: &str) -> String {
    format!("/apis/mailrelay.io/v1alpha1/namespaces/{ns}/sendquotas/{name}")
}

fn relay_obj(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
           "metadata": {"name": name, "namespace": ns, "labels": {"team": "payments"}},
           "spec": spec})
}

fn quota_obj(ns: &str, name: &str, limits: &[&str]) -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "SendQuota",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"direction": "ingress", "limits": limits,
                    "relaySelector": {"matchLabels": {"team": "payments"}}}})
}

fn stored<K: serde::de::DeserializeOwned>(api: &FakeApi, path: &str) -> Arc<K> {
    Arc::new(serde_json::from_value(api.get(path).expect("object stored")).unwrap())
}

fn edit_spec(api: &FakeApi, path: &str, change: impl FnOnce(&mut Value)) {
    let mut r = api.get(path).unwrap();
    change(&mut r["spec"]);
    let g = r["metadata"]["generation"].as_i64().unwrap_or(1);
    r["metadata"]["generation"] = json!(g + 1);
    api.put(path, r);
}

/// Runs everything the operator does, with the relays in `namespaces` and the
/// operator watching `settings`' scope; returns the requests it made.
async fn scenario(settings: Settings, namespaces: &[&str]) -> Vec<Recorded> {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    api.set_deployment_status(
        json!({"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
    );
    let port = support::free_ports(1)[0];
    let settings = Settings {
        admin_url_template: format!("http://127.0.0.1:{port}"),
        queue_timeout: Duration::from_secs(20),
        ..settings
    };

    // Leader election: create, renew, release.
    let mut cfg = ElectorConfig::new(OPERATOR_NS, "mr-operator-0");
    cfg.name = LEASE.into();
    let elector = LeaderElector::new(api.client.clone(), cfg);
    assert!(elector.try_lead().await.unwrap());
    assert!(elector.try_lead().await.unwrap());

    for ns in namespaces {
        let spec = json!({"hostname": "relay.example.com", "redis": {"url": redis.url()},
                          "listeners": [{"name": "smtp", "port": 2525}],
                          "autoscaling": {"minReplicas": 1, "maxReplicas": 4,
                                          "queue": {"pendingMessagesPerReplica": 100}}});
        api.put(&relay_path(ns, "relay"), relay_obj(ns, "relay", spec));
        // Held on a Secret that does not exist: a Secret read and a Warning Event.
        let blocked = json!({"hostname": "relay.example.com", "redis": {"url": redis.url()},
                             "tls": {"secretName": "missing-tls"}});
        api.put(
            &relay_path(ns, "blocked"),
            relay_obj(ns, "blocked", blocked),
        );
        api.put(
            &quota_path(ns, "payments"),
            quota_obj(ns, "payments", &["100/1m"]),
        );
        // Invalid: an InvalidSpec Event on the SendQuota.
        api.put(
            &quota_path(ns, "broken"),
            quota_obj(ns, "broken", &["lots"]),
        );
        // A generated DKIM key (Secret created), signing at once (no DNS check).
        api.put(
            &domain_path(ns, "example"),
            json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "SenderDomain",
                   "metadata": {"name": "example", "namespace": ns},
                   "spec": {"domain": "example.com", "dnsCheck": {"enabled": false},
                            "rotation": {"overlap": "0s"},
                            "keys": [{"selector": "s1", "algorithm": "ed25519-sha256"}]}}),
        );
    }

    // The controllers: startup lists and watches, then every reconcile.
    let ctx = Context::new(api.client.clone(), settings, Arc::new(Metrics::new()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(reconcile::run(ctx.clone(), async move {
        let _ = rx.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let done = |api: &FakeApi| {
        namespaces.iter().all(|ns| {
            ["relay", "blocked"]
                .iter()
                .all(|n| api.get(&relay_path(ns, n)).unwrap().get("status").is_some())
                && ["payments", "broken"]
                    .iter()
                    .all(|n| api.get(&quota_path(ns, n)).unwrap().get("status").is_some())
                && api
                    .get(&domain_path(ns, "example"))
                    .unwrap()
                    .get("status")
                    .is_some()
        })
    };
    while !done(&api) {
        assert!(
            std::time::Instant::now() < deadline,
            "the controllers did not reconcile everything: {:?}",
            api.requests()
                .iter()
                .map(|r| format!("{} {}?{} -> {}", r.method, r.path, r.query, r.code))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the controllers stop")
        .unwrap();

    for ns in namespaces {
        let path = relay_path(ns, "relay");
        // HPA -> ScaledObject (the HPA is deleted) -> none (the ScaledObject is).
        edit_spec(&api, &path, |s| {
            s["autoscaling"]["keda"] = json!({"prometheusServerAddress": "http://prom:9090"});
        });
        relay::reconcile(stored::<MailRelay>(&api, &path), ctx.clone())
            .await
            .unwrap();
        edit_spec(&api, &path, |s| {
            s.as_object_mut().unwrap().remove("autoscaling");
        });
        relay::reconcile(stored::<MailRelay>(&api, &path), ctx.clone())
            .await
            .unwrap();
        // The admin token rotated: its Secret is updated.
        let mut r = api.get(&path).unwrap();
        r["metadata"]["annotations"] =
            json!({mailrelay_operator::admin_token::ROTATE_ANNOTATION: "1"});
        api.put(&path, r);
        relay::reconcile(stored::<MailRelay>(&api, &path), ctx.clone())
            .await
            .unwrap();
        // The NetworkPolicy switched off: looked up and deleted.
        edit_spec(&api, &path, |s| {
            s["networkPolicy"] = json!({"enabled": false});
        });
        relay::reconcile(stored::<MailRelay>(&api, &path), ctx.clone())
            .await
            .unwrap();
        // A DKIM rotation: a new key generated, the old one retired at once
        // (overlap 0s): its Secret deleted.
        let sd = domain_path(ns, "example");
        let mut d = api.get(&sd).unwrap();
        d["metadata"]["annotations"] = json!({mailrelay_operator::crd::ROTATE_ANNOTATION: "1"});
        api.put(&sd, d);
        senderdomain::reconcile(stored::<SenderDomain>(&api, &sd), ctx.clone())
            .await
            .unwrap();
        relay::reconcile(stored::<MailRelay>(&api, &path), ctx.clone())
            .await
            .unwrap();
        // A reconcile from a stale cache repeats an Event: it becomes a series
        // (a patch of the Event).
        let blocked = relay_path(ns, "blocked");
        let mut stale = api.get(&blocked).unwrap();
        stale.as_object_mut().unwrap().remove("status");
        let stale: Arc<MailRelay> = Arc::new(serde_json::from_value(stale).unwrap());
        relay::reconcile(stale.clone(), ctx.clone()).await.unwrap();
        relay::reconcile(stale, ctx.clone()).await.unwrap();
        quota::reconcile(
            stored::<SendQuota>(&api, &quota_path(ns, "payments")),
            ctx.clone(),
        )
        .await
        .unwrap();
    }
    elector.release().await;
    api.requests()
}

/// The chart's grants for the operator's ServiceAccount with `values`.
fn chart_grants(values: Value) -> Vec<rbac::Grant> {
    let objects = rbac::render_chart(&values, RELEASE, OPERATOR_NS);
    rbac::grants(&objects, OPERATOR_NS, SA)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_wide_chart_grants_exactly_what_the_operator_uses() {
    let requests = scenario(operator_settings(&[]), &["mail", "shop"]).await;
    let needed = rbac::needed(&requests);
    // The scenario covers what it must (a guard against a scenario that quietly
    // stopped exercising something).
    for line in [
        "watch mailrelay.io/mailrelays across the cluster",
        "list core/secrets across the cluster",
        "get core/secrets \"missing-tls\" in namespace mail",
        "delete autoscaling/horizontalpodautoscalers \"relay\" in namespace mail",
        "delete keda.sh/scaledobjects \"relay\" in namespace shop",
        "delete networking.k8s.io/networkpolicies \"relay\" in namespace mail",
        "get core/services \"relay-admin\" in namespace shop",
        "update core/secrets \"relay-admin-token\" in namespace mail",
        "patch events.k8s.io/events in namespace mail",
        "update coordination.k8s.io/leases \"mr-mailrelay-operator\" in namespace ops",
        "update coordination.k8s.io/leases \"mailrelay-operator-claim\" in namespace shop",
    ] {
        let found = needed.iter().any(|a| {
            let s = a.to_string();
            // Events are patched by their generated name.
            s == line
                || (line.starts_with("patch events")
                    && s.starts_with("patch events.k8s.io/events ")
                    && s.ends_with("in namespace mail"))
        });
        assert!(
            found,
            "the scenario no longer makes `{line}`:\n{}",
            rbac::summary(&needed)
        );
    }
    let grants = chart_grants(json!({}));
    if let Err(diff) = rbac::compare(&needed, &grants) {
        panic!("{diff}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_namespaced_chart_grants_exactly_what_the_operator_uses_and_only_there() {
    let requests = scenario(operator_settings(&["mail", "shop"]), &["mail", "shop"]).await;
    let needed = rbac::needed(&requests);
    // Nothing across the cluster, nothing cluster-scoped.
    let wide: Vec<String> = needed
        .iter()
        .filter(|a| a.namespace.is_none())
        .map(ToString::to_string)
        .collect();
    assert!(
        wide.is_empty(),
        "namespaced mode asks across the cluster: {wide:?}"
    );
    for ns in ["mail", "shop"] {
        let line = format!("watch core/secrets in namespace {ns}");
        assert!(
            needed.iter().any(|a| a.to_string() == line),
            "no `{line}`:\n{}",
            rbac::summary(&needed)
        );
    }
    let values = json!({"watchNamespaces": ["mail", "shop"]});
    let grants = chart_grants(values.clone());
    assert!(
        grants.iter().all(|g| g.namespace.is_some()),
        "namespaced mode grants something cluster-wide: {:?}",
        grants
            .iter()
            .filter(|g| g.namespace.is_none())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );
    if let Err(diff) = rbac::compare(&needed, &grants) {
        panic!("{diff}");
    }
    // The same operator watching fewer namespaces than the chart was told is
    // refused there: Secrets of another namespace are not readable.
    let narrow = chart_grants(json!({"watchNamespaces": ["mail"]}));
    let e = rbac::compare(&needed, &narrow).unwrap_err();
    assert!(
        e.contains("  - get core/secrets \"missing-tls\" in namespace shop\n"),
        "{e}"
    );
}

#[test]
fn the_comparison_catches_a_missing_and_an_extra_grant() {
    // The check itself, on a hand-made chart: one request too many for it, one
    // grant nothing uses.
    let objects = vec![
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "r", "namespace": "mail"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "delete"]},
                         {"apiGroups": [""], "resources": ["leases"], "resourceNames": ["x"], "verbs": ["get"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "r", "namespace": "mail"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
               "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": OPERATOR_NS}]}),
    ];
    let grants = rbac::grants(&objects, OPERATOR_NS, SA);
    assert_eq!(grants.len(), 3);
    let req = |method: &str, path: &str| Recorded {
        method: method.parse().unwrap(),
        path: path.into(),
        query: String::new(),
        body: None,
        content_type: None,
        code: 200,
        who: String::new(),
    };
    let needed = rbac::needed(&[
        req("GET", "/api/v1/namespaces/mail/configmaps/a"),
        req("GET", "/api/v1/namespaces/mail/leases/x"),
        // Another namespace than the Role's, and a name the rule does not list.
        req("GET", "/api/v1/namespaces/other/configmaps/a"),
        req("GET", "/api/v1/namespaces/mail/leases/y"),
    ]);
    let e = rbac::compare(&needed, &grants).unwrap_err();
    assert!(
        e.contains("  - get core/configmaps \"a\" in namespace other\n"),
        "{e}"
    );
    assert!(
        e.contains("  - get core/leases \"y\" in namespace mail\n"),
        "{e}"
    );
    assert!(
        e.contains("  + Role mail/r: delete core/configmaps\n"),
        "{e}"
    );
    assert!(!e.contains("get core/configmaps\n"), "{e}");
    // An apply may create; a blocking owner reference needs the owner's finalizers.
    let mut apply = req("PATCH", "/apis/apps/v1/namespaces/mail/deployments/d");
    apply.content_type = Some("application/apply-patch+yaml".into());
    apply.body = Some(json!({"metadata": {"ownerReferences": [
        {"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay", "name": "r",
         "blockOwnerDeletion": true}]}}));
    let got: Vec<String> = rbac::accesses(&apply)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        [
            "patch apps/deployments \"d\" in namespace mail",
            "create apps/deployments in namespace mail",
            "update mailrelay.io/mailrelays/finalizers \"r\" in namespace mail",
        ]
    );
    let mut status = req(
        "PATCH",
        "/apis/mailrelay.io/v1alpha1/namespaces/mail/mailrelays/r/status",
    );
    status.content_type = Some("application/apply-patch+yaml".into());
    assert_eq!(
        rbac::accesses(&status)[0].to_string(),
        "patch mailrelay.io/mailrelays/status \"r\" in namespace mail"
    );
    let mut watch = req("GET", "/api/v1/secrets");
    watch.query = "labelSelector=x&watch=true&resourceVersion=1".into();
    assert_eq!(
        rbac::accesses(&watch)[0].to_string(),
        "watch core/secrets across the cluster"
    );
}
