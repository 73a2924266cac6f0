//! Network exposure (issue 13, item 2): the NetworkPolicy each MailRelay gets,
//! its CRD rules, and the platform's say over NodePort/LoadBalancer Services,
//! through the pure builders and the reconcile against the in-memory API.

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyIngressRule};
use kube::core::cel::Validator;
use mailrelay_operator::crd::{MailRelay, ServiceType, all_crds};
use mailrelay_operator::reconcile::{Context, Settings, relay};
use mailrelay_operator::resources::network::{
    self, NetworkSettings, check_service_type, network_policy,
};
use mailrelay_operator::telemetry::Metrics;
use serde_json::{Value, json};
use support::fake_api::FakeApi;
use support::redis::RedisServer;

fn relay_yaml(extra: &str) -> MailRelay {
    let mut r: MailRelay = serde_norway::from_str(&format!(
        "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {{name: outbound, namespace: tenant-a}}
spec:
  hostname: relay.example.com
  redis: {{url: 'redis://redis:6379'}}
  listeners:
    - {{name: smtp, port: 2525}}
    - {{name: submission, port: 2587, servicePort: 587}}
{extra}"
    ))
    .unwrap();
    r.metadata.uid = Some("7d3f4c1e-0000-4000-8000-000000000001".into());
    r
}

fn platform() -> NetworkSettings {
    NetworkSettings {
        operator_namespace: "mailrelay-system".into(),
        operator_pod_labels: BTreeMap::from([
            ("app.kubernetes.io/name".into(), "mailrelay-operator".into()),
            ("app.kubernetes.io/instance".into(), "mr".into()),
        ]),
        api_server_cidrs: vec!["172.18.0.0/16".into()],
        monitoring_namespace_labels: Some(BTreeMap::from([(
            "kubernetes.io/metadata.name".into(),
            "monitoring".into(),
        )])),
    }
}

fn policy(r: &MailRelay) -> NetworkPolicy {
    network_policy(r, &platform())
        .unwrap()
        .expect("a policy by default")
}

fn rules(p: &NetworkPolicy) -> Vec<Value> {
    let spec = p.spec.as_ref().unwrap();
    spec.ingress
        .as_ref()
        .unwrap()
        .iter()
        .map(|r: &NetworkPolicyIngressRule| serde_json::to_value(r).unwrap())
        .collect()
}

/// Every rule names its sources: a rule without `from` (or with an empty one)
/// admits every address, which only `smtpFromAnywhere` may ask for.
fn assert_no_open_rule(p: &NetworkPolicy) {
    for r in rules(p) {
        let from = r.get("from").and_then(Value::as_array);
        assert!(
            from.is_some_and(|f| !f.is_empty()),
            "a rule open to every source: {r}"
        );
    }
}

#[test]
fn by_default_smtp_is_open_to_the_own_namespace_and_admin_to_the_operator() {
    let p = policy(&relay_yaml(""));
    assert_eq!(p.metadata.name.as_deref(), Some("outbound"));
    assert_eq!(p.metadata.namespace.as_deref(), Some("tenant-a"));
    let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("MailRelay", Some(true))
    );
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(
        serde_json::to_value(&spec.pod_selector).unwrap(),
        json!({"matchLabels": {"app.kubernetes.io/name": "mailrelay", "app.kubernetes.io/instance": "outbound"}})
    );
    // Ingress only: relays must reach any MX host.
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    assert!(spec.egress.is_none());
    assert_no_open_rule(&p);
    assert_eq!(
        rules(&p),
        [
            json!({"ports": [{"port": 2525, "protocol": "TCP"}, {"port": 2587, "protocol": "TCP"}],
                   "from": [{"podSelector": {}}]}),
            json!({"ports": [{"port": 9325, "protocol": "TCP"}],
            "from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mailrelay-system"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "mailrelay-operator",
                                                 "app.kubernetes.io/instance": "mr"}}},
                {"ipBlock": {"cidr": "172.18.0.0/16"}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            ]}),
        ]
    );
}

#[test]
fn without_api_server_cidrs_or_monitoring_only_the_operator_reaches_the_admin_port() {
    let settings = NetworkSettings {
        api_server_cidrs: vec![],
        monitoring_namespace_labels: None,
        ..platform()
    };
    let p = network_policy(&relay_yaml(""), &settings).unwrap().unwrap();
    let admin = &rules(&p)[1];
    assert_eq!(admin["from"].as_array().unwrap().len(), 1, "{admin}");
    assert_eq!(
        admin["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "mailrelay-system"
    );
}

#[test]
fn smtp_from_replaces_the_default_with_the_declared_peers() {
    let p = policy(&relay_yaml(
        "  networkPolicy:
    smtpFrom:
      - namespaceSelector: {matchLabels: {team: payments}}
      - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: web}}
        podSelector: {matchLabels: {app: shop}}
      - cidr: 203.0.113.7/24
        except: [203.0.113.128/25]
",
    ));
    assert_no_open_rule(&p);
    assert_eq!(
        rules(&p)[0]["from"],
        json!([
            {"namespaceSelector": {"matchLabels": {"team": "payments"}}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}},
             "podSelector": {"matchLabels": {"app": "shop"}}},
            {"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}},
        ])
    );
}

#[test]
fn an_empty_smtp_from_admits_nobody_rather_than_everybody() {
    // In a NetworkPolicy an empty `from` matches every source: the rule must go.
    let p = policy(&relay_yaml("  networkPolicy: {smtpFrom: []}\n"));
    assert_no_open_rule(&p);
    let r = rules(&p);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["ports"], json!([{"port": 9325, "protocol": "TCP"}]));
}

#[test]
fn smtp_from_anywhere_opens_only_the_smtp_ports() {
    let p = policy(&relay_yaml("  networkPolicy: {smtpFromAnywhere: true}\n"));
    let r = rules(&p);
    assert_eq!(
        r[0],
        json!({"ports": [{"port": 2525, "protocol": "TCP"}, {"port": 2587, "protocol": "TCP"}]})
    );
    assert!(r[1]["from"].as_array().is_some_and(|f| !f.is_empty()));
}

#[test]
fn a_disabled_policy_is_not_rendered() {
    let r = relay_yaml("  networkPolicy: {enabled: false}\n");
    assert_eq!(network_policy(&r, &platform()).unwrap(), None);
}

#[test]
fn bad_peers_are_refused_naming_the_field() {
    for (extra, field, words) in [
        (
            "smtpFrom: [{cidr: 'not-a-net'}]",
            "spec.networkPolicy.smtpFrom[0].cidr",
            "not a network",
        ),
        (
            "smtpFrom: [{podSelector: {}}, {cidr: 10.0.0.0/8, podSelector: {}}]",
            "spec.networkPolicy.smtpFrom[1]",
            "either cidr",
        ),
        (
            "smtpFrom: [{}]",
            "spec.networkPolicy.smtpFrom[0]",
            "empty peer",
        ),
        (
            "smtpFrom: [{cidr: 10.0.0.0/8, except: [192.168.0.0/24]}]",
            "spec.networkPolicy.smtpFrom[0].except[0]",
            "not inside",
        ),
        (
            "smtpFrom: [{podSelector: {}, except: [10.0.0.0/8]}]",
            "spec.networkPolicy.smtpFrom[0].except",
            "needs cidr",
        ),
        (
            "{smtpFromAnywhere: true, smtpFrom: [{podSelector: {}}]}",
            "spec.networkPolicy.smtpFrom",
            "leave smtpFrom out",
        ),
    ] {
        let body = if extra.starts_with('{') {
            format!("  networkPolicy: {extra}\n")
        } else {
            format!("  networkPolicy: {{{extra}}}\n")
        };
        let e = network_policy(&relay_yaml(&body), &platform()).unwrap_err();
        assert_eq!(e.field, field, "{extra}: {e}");
        assert!(e.message.contains(words), "{extra}: {e}");
    }
}

fn cel_errors(spec_extra: Value) -> Vec<String> {
    let crd = all_crds()
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c.spec.names.kind == "MailRelay")
        .unwrap();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    let mut spec = json!({"hostname": "relay.example.com", "redis": {"url": "redis://r:6379"}});
    spec.as_object_mut()
        .unwrap()
        .extend(spec_extra.as_object().unwrap().clone());
    let obj = json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
                     "metadata": {"name": "r", "namespace": "n"}, "spec": spec});
    match Validator::new().validate(&schema, &obj, None) {
        Ok(()) => vec![],
        Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn the_crd_refuses_ambiguous_peers() {
    let good = json!({"networkPolicy": {"smtpFrom": [
        {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}},
        {"cidr": "2001:db8::/32"},
        {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]},
    ]}});
    assert_eq!(cel_errors(good), Vec::<String>::new());
    assert_eq!(
        cel_errors(json!({"networkPolicy": {"enabled": false}})),
        Vec::<String>::new()
    );
    for (bad, words) in [
        (json!({"smtpFrom": [{}]}), "either cidr"),
        (
            json!({"smtpFrom": [{"cidr": "10.0.0.0/8", "podSelector": {}}]}),
            "either cidr",
        ),
        (
            json!({"smtpFrom": [{"cidr": "10.0.0.0/33"}]}),
            "network like",
        ),
        (
            json!({"smtpFrom": [{"podSelector": {}, "except": ["10.0.0.0/8"]}]}),
            "except needs cidr",
        ),
        (
            json!({"smtpFromAnywhere": true, "smtpFrom": []}),
            "leave smtpFrom out",
        ),
    ] {
        let errs = cel_errors(json!({ "networkPolicy": bad }));
        assert!(
            errs.iter().any(|e| e.contains(words)),
            "{bad}: expected {words:?} in {errs:?}"
        );
    }
}

#[test]
fn only_the_service_types_the_platform_allows_pass() {
    let lb = relay_yaml("  service: {type: LoadBalancer}\n");
    let e = check_service_type(&lb.spec, &[ServiceType::ClusterIP]).unwrap_err();
    assert!(
        e.contains("spec.service.type: LoadBalancer is not allowed") && e.contains("ClusterIP"),
        "{e}"
    );
    assert!(
        check_service_type(
            &lb.spec,
            &[ServiceType::ClusterIP, ServiceType::LoadBalancer]
        )
        .is_ok()
    );
    let np = relay_yaml("  service: {type: NodePort}\n");
    assert!(
        check_service_type(
            &np.spec,
            &[ServiceType::ClusterIP, ServiceType::LoadBalancer]
        )
        .is_err()
    );
    // No service section is a ClusterIP.
    assert!(check_service_type(&relay_yaml("").spec, &[ServiceType::ClusterIP]).is_ok());
    assert!(check_service_type(&relay_yaml("").spec, &[]).is_err());
    assert_eq!(
        network::parse_service_type("NodePort"),
        Ok(ServiceType::NodePort)
    );
    assert!(network::parse_service_type("External").is_err());
    assert_eq!(
        network::parse_labels("a=b, c=d").unwrap(),
        BTreeMap::from([("a".into(), "b".into()), ("c".into(), "d".into())])
    );
    assert!(network::parse_labels("a").is_err());
    assert!(network::parse_labels("").unwrap().is_empty());
}

// --- the reconcile, against the in-memory API ----------------------------------

const RELAY: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/mailrelays/relay";
const POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/mail/networkpolicies/relay";
const SERVICE: &str = "/api/v1/namespaces/mail/services/relay";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/mail/deployments/relay";

fn context(api: &FakeApi, settings: Settings) -> Arc<Context> {
    api.set_deployment_status(
        json!({"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
    );
    Context::new(api.client.clone(), settings, Arc::new(Metrics::new()))
}

fn settings() -> Settings {
    Settings {
        queue_timeout: Duration::from_secs(20),
        network: platform(),
        ..Settings::default()
    }
}

fn relay_obj(redis: &RedisServer, extra: Value) -> Value {
    let mut spec = json!({"hostname": "relay.example.com", "redis": {"url": redis.url()},
                          "listeners": [{"name": "smtp", "port": 2525}]});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
           "metadata": {"name": "relay", "namespace": "mail", "uid": "relay-uid"},
           "spec": spec})
}

async fn reconcile(api: &FakeApi, ctx: &Arc<Context>) {
    let r: MailRelay = serde_json::from_value(api.get(RELAY).unwrap()).unwrap();
    relay::reconcile(Arc::new(r), ctx.clone()).await.unwrap();
}

fn edit_spec(api: &FakeApi, change: impl FnOnce(&mut Value)) {
    let mut r = api.get(RELAY).unwrap();
    change(&mut r["spec"]);
    let g = r["metadata"]["generation"].as_i64().unwrap_or(1);
    r["metadata"]["generation"] = json!(g + 1);
    api.put(RELAY, r);
}

fn ready(api: &FakeApi) -> Value {
    api.get(RELAY).unwrap()["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_applied_before_the_pods_and_removed_when_disabled() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    api.put(RELAY, relay_obj(&redis, json!({})));
    let ctx = context(&api, settings());
    reconcile(&api, &ctx).await;

    let patched: Vec<String> = api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path.clone())
        .collect();
    let at = |p: &str| patched.iter().position(|x| x == p).unwrap();
    assert!(at(POLICY) < at(DEPLOYMENT), "{patched:?}");
    let p = api.get(POLICY).expect("policy applied");
    assert_eq!(p["metadata"]["ownerReferences"][0]["uid"], "relay-uid");
    assert_eq!(
        p["spec"]["ingress"][0]["from"],
        json!([{"podSelector": {}}])
    );
    assert_eq!(
        p["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "mailrelay-system"
    );

    // Opened to another namespace: the policy follows the spec.
    edit_spec(
        &api,
        |s| {
            s["networkPolicy"] =
                json!({"smtpFrom": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]})
        },
    );
    reconcile(&api, &ctx).await;
    assert_eq!(
        api.get(POLICY).unwrap()["spec"]["ingress"][0]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"team": "web"}}}])
    );

    edit_spec(&api, |s| s["networkPolicy"] = json!({"enabled": false}));
    api.clear_requests();
    reconcile(&api, &ctx).await;
    assert!(api.get(POLICY).is_none(), "a disabled policy is deleted");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.is("DELETE", "/networkpolicies/relay"))
    );
    assert!(api.get(DEPLOYMENT).is_some());
    assert_eq!(ready(&api)["reason"], "Available", "{}", ready(&api));

    // Nothing left to delete: the next reconcile only looks.
    api.clear_requests();
    reconcile(&api, &ctx).await;
    assert!(!api.requests().iter().any(|r| r.method == "DELETE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_of_the_same_name_owned_by_someone_else_is_not_deleted() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    api.put(
        RELAY,
        relay_obj(&redis, json!({"networkPolicy": {"enabled": false}})),
    );
    api.put(
        POLICY,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "relay", "namespace": "mail"},
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
    );
    let ctx = context(&api, settings());
    reconcile(&api, &ctx).await;
    assert!(
        api.get(POLICY).is_some(),
        "the namespace's own policy stays"
    );
    assert!(!api.requests().iter().any(|r| r.method == "DELETE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_open_a_load_balancer_the_platform_did_not_allow() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    api.put(
        RELAY,
        relay_obj(&redis, json!({"service": {"type": "LoadBalancer"}})),
    );
    let ctx = context(&api, settings());
    reconcile(&api, &ctx).await;

    // Refused: nothing applied, Ready=False with the reason, one Event.
    let reqs = api.requests();
    assert!(
        !reqs
            .iter()
            .any(|r| r.method == "PATCH" && !r.path.ends_with("/status")),
        "nothing is applied: {:?}",
        reqs.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    assert!(api.get(SERVICE).is_none());
    let c = ready(&api);
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("ServiceTypeNotAllowed"))
    );
    assert!(
        c["message"].as_str().unwrap().contains("LoadBalancer"),
        "{c}"
    );
    let events: Vec<_> = reqs.iter().filter(|r| r.is("POST", "/events")).collect();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].body.as_ref().unwrap()["reason"],
        "ServiceTypeNotAllowed"
    );

    // Allowed by the platform: the same MailRelay gets its LoadBalancer.
    let ctx = context(
        &api,
        Settings {
            allowed_service_types: vec![ServiceType::ClusterIP, ServiceType::LoadBalancer],
            ..settings()
        },
    );
    reconcile(&api, &ctx).await;
    assert_eq!(api.get(SERVICE).unwrap()["spec"]["type"], "LoadBalancer");
    assert_eq!(ready(&api)["status"], "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_a_running_relay_to_node_port_leaves_its_service_as_it_was() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    api.put(RELAY, relay_obj(&redis, json!({})));
    let ctx = context(&api, settings());
    reconcile(&api, &ctx).await;
    let before = api.get(SERVICE).unwrap();
    assert_eq!(before["spec"]["type"], "ClusterIP");

    edit_spec(&api, |s| s["service"] = json!({"type": "NodePort"}));
    api.clear_requests();
    reconcile(&api, &ctx).await;
    assert_eq!(
        api.get(SERVICE).unwrap(),
        before,
        "the Service is untouched"
    );
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.path.contains("/services/")),
        "no Service apply"
    );
    assert_eq!(ready(&api)["reason"], "ServiceTypeNotAllowed");
}
