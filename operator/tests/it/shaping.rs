//! Response rules in SendQuota, webhook and event-log fields (pure builders), and
//! response-rule states in Kubernetes: written into a real Redis by the relay's
//! own egress store, read by the MailRelay reconcile into its status with one
//! Event per state, and carried into the status of the SendQuota whose rule
//! started them (in-memory API).

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use mailrelay::config::RedisConfig;
use mailrelay::config::rules::{RuleAction, TenantKey};
use mailrelay::quota::egress::redis::RedisStore;
use mailrelay::shaping::State;
use mailrelay_operator::crd::{MailRelay, SendQuota};
use mailrelay_operator::reconcile::{Context, Settings, quota, relay};
use mailrelay_operator::resources::config::{quota_rules, select_quota_rules};
use mailrelay_operator::resources::{self, Inputs, ResolvedSecrets};
use mailrelay_operator::telemetry::Metrics;
use serde_json::{Value, json};
use support::fake_api::FakeApi;
use support::redis::RedisServer;

fn mailrelay(yaml: &str) -> MailRelay {
    serde_norway::from_str(yaml).unwrap()
}

fn sendquota(yaml: &str) -> SendQuota {
    serde_norway::from_str(yaml).unwrap()
}

const RELAY: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: out, namespace: mail, labels: {team: payments}}
spec:
  hostname: relay.example.com
  redis: {url: 'redis://redis:6379'}
";

const EGRESS: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: SendQuota
metadata: {name: payments, namespace: mail}
spec:
  direction: egress
  limits: [100/1m]
  match: {mxHosts: ['*.provider.test']}
  responseRules:
    - name: slow
      match: {codes: [421], enhanced: ['4.7.28']}
      action: suspend
      scope: tenant
      duration: 10m
    - name: daily
      destination: {destinationDomains: [example.net]}
      match: {codes: [550], text: 'daily (sending )?limit'}
      action: reclassify
      reclassify: temporary
";

const INGRESS: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: SendQuota
metadata: {name: users, namespace: mail}
spec:
  direction: ingress
  key: authUser
  limits: [100/1m]
  responseRules:
    - name: slow
      destination: {mxHosts: ['*.provider.test']}
      match: {codes: [421]}
      action: suspend
      scope: tenant
      duration: 1m
";

fn build(r: &MailRelay, quotas: &[SendQuota]) -> resources::Resources {
    let (rules, refused) = select_quota_rules(r, quotas);
    assert!(refused.is_empty(), "{refused:?}");
    resources::build(Inputs {
        relay: r,
        quotas: vec![],
        quota_rules: rules,
        secrets: &ResolvedSecrets::default(),
        default_image: "mailrelay:test",
    })
    .unwrap()
}

fn rendered(o: &resources::Resources) -> mailrelay::config::RelayConfig {
    mailrelay::config::RelayConfig::from_yaml(
        &o.config_map.data.as_ref().unwrap()["mailrelay.yaml"],
    )
    .unwrap()
}

#[test]
fn quota_rules_are_prefixed_inherit_the_egress_match_and_the_tenant_key() {
    let r = quota_rules(&sendquota(EGRESS)).unwrap();
    assert_eq!(r[0].name, "payments.slow");
    assert_eq!(r[0].destination.mx_hosts, ["*.provider.test"]);
    // Scope tenant with the quota's default key: the relay's default (sender domain).
    assert_eq!(r[0].tenant_key, None);
    assert_eq!(r[1].name, "payments.daily");
    assert_eq!(r[1].destination.destination_domains, ["example.net"]);
    assert!(r[1].destination.mx_hosts.is_empty());
    let u = quota_rules(&sendquota(INGRESS)).unwrap();
    assert_eq!(u[0].name, "users.slow");
    assert_eq!(u[0].tenant_key, Some(TenantKey::AuthUser));

    // Bad rules are refused naming the SendQuota's field.
    for (from, to, field, needle) in [
        (
            "      destination: {mxHosts: ['*.provider.test']}\n",
            "",
            "spec.responseRules[0].destination",
            "only an egress quota",
        ),
        (
            "match: {codes: [421]}",
            "match: {codes: [421], text: '(unclosed'}",
            "spec.responseRules[0].match.text",
            "invalid regex",
        ),
        (
            "duration: 1m",
            "duration: 9d",
            "spec.responseRules[0].duration",
            "out of range",
        ),
        (
            "- name: slow",
            "- name: a-rule-name-long-enough-that-with-the-quota-name-it-overflows-x",
            "spec.responseRules[0].name",
            "63 characters",
        ),
    ] {
        assert!(INGRESS.contains(from), "{from}");
        let e = quota_rules(&sendquota(&INGRESS.replacen(from, to, 1))).unwrap_err();
        assert_eq!(e.field, field, "{to}: {e}");
        assert!(e.message.contains(needle), "{to}: {e}");
    }
}

/// An ingress quota's `match.senders` / `match.authUsers` become every rule's
/// sender filter; a rule that names its own, or a connection cap, is refused
/// naming the field. An egress quota's rules carry none.
#[test]
fn an_ingress_quotas_senders_limit_its_rules() {
    let tenant = INGRESS.replace(
        "  key: authUser\n",
        "  key: authUser\n  match: {senders: ['*@a.test'], authUsers: [tenant-a]}\n",
    );
    let r = quota_rules(&sendquota(&tenant)).unwrap();
    assert_eq!(r[0].matcher.senders, ["*@a.test"]);
    assert_eq!(r[0].matcher.auth_users, ["tenant-a"]);
    assert!(
        !quota_rules(&sendquota(INGRESS)).unwrap()[0]
            .matcher
            .has_sender_filter()
    );
    assert!(
        !quota_rules(&sendquota(EGRESS)).unwrap()[0]
            .matcher
            .has_sender_filter()
    );
    for (to, field, needle) in [
        (
            "match: {codes: [421], senders: ['*@b.test']}",
            "spec.responseRules[0].match.senders",
            "already limit",
        ),
        (
            "match: {codes: [421], authUsers: [tenant-b]}",
            "spec.responseRules[0].match.authUsers",
            "already limit",
        ),
    ] {
        let e =
            quota_rules(&sendquota(&tenant.replacen("match: {codes: [421]}", to, 1))).unwrap_err();
        assert_eq!(e.field, field, "{to}: {e}");
        assert!(e.message.contains(needle), "{to}: {e}");
    }
    let capped = tenant.replacen(
        "      action: suspend\n      scope: tenant\n      duration: 1m\n",
        "      action: throttle\n      duration: 1m\n      throttle: {maxConnections: 2}\n",
        1,
    );
    assert_ne!(capped, tenant);
    let e = quota_rules(&sendquota(&capped)).unwrap_err();
    assert_eq!(
        e.field, "spec.responseRules[0].throttle.maxConnections",
        "{e}"
    );
    // The relay's own check, for a MailRelay's rule: the field in camelCase.
    let own = sendquota(
        &INGRESS
            .replacen(
                "      action: suspend\n      scope: tenant\n      duration: 1m\n",
                "      action: throttle\n      duration: 1m\n      throttle: {maxConnections: 2}\n",
                1,
            )
            .replacen(
                "match: {codes: [421]}",
                "match: {codes: [421], senders: ['*@a.test']}",
                1,
            ),
    );
    let e = quota_rules(&own).unwrap_err();
    assert_eq!(
        e.field, "spec.responseRules[0].throttle.maxConnections",
        "{e}"
    );
    assert!(e.message.contains("match.authUsers"), "{e}");
}

#[test]
fn quota_rules_follow_the_relays_own_and_roll_no_pods() {
    let relay = mailrelay(&format!(
        "{RELAY}  responseRules:\n    - {{name: own, destination: {{smarthost: true}}, match: {{codes: [454]}}, action: suspend, duration: 1m}}\n"
    ));
    let without = build(&relay, &[]);
    let with = build(&relay, &[sendquota(EGRESS), sendquota(INGRESS)]);
    let names: Vec<String> = rendered(&with)
        .response_rules
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(
        names,
        ["own", "payments.slow", "payments.daily", "users.slow"]
    );
    // The relay reloads its rules: a SendQuota's rules change the ConfigMap only.
    assert_eq!(without.config_hash, with.config_hash);
    assert_ne!(without.config_map, with.config_map);

    // A quota selecting another team's relays brings nothing.
    let other = EGRESS.replace(
        "spec:\n",
        "spec:\n  relaySelector: {matchLabels: {team: web}}\n",
    );
    assert!(
        select_quota_rules(&relay, &[sendquota(&other)])
            .0
            .is_empty()
    );

    // A name the relay has already: that quota's rules are left out whole, named.
    let clash = mailrelay(&format!(
        "{RELAY}  responseRules:\n    - {{name: payments.slow, destination: {{smarthost: true}}, match: {{codes: [454]}}, action: suspend, duration: 1m}}\n"
    ));
    let (rules, refused) = select_quota_rules(&clash, &[sendquota(EGRESS), sendquota(INGRESS)]);
    assert_eq!(
        rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["users.slow"]
    );
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, "payments");
    assert_eq!(refused[0].1.field, "spec.responseRules[0].name");
    assert!(
        refused[0].1.message.contains("on MailRelay out")
            && refused[0].1.message.contains("used twice"),
        "{:?}",
        refused[0].1
    );
}

#[test]
fn webhook_retry_timeout_and_the_event_log_reach_the_relay_config() {
    let hook = "  webhooks:\n    - name: shop\n      url: https://hooks.shop.example/mail\n      secretRef: {name: shop-hooks, key: hmac}\n      tenants: {senderDomains: [shop.example]}\n";
    let yaml = format!(
        "{RELAY}{hook}      timeout: 3s\n      retry: {{initial: 500ms, max: 2m, maxAttempts: 5}}\n  events: {{maxLen: 5000}}\n"
    );
    let cfg = rendered(&build(&mailrelay(&yaml), &[]));
    let w = &cfg.webhooks[0];
    assert_eq!(w.timeout, Duration::from_secs(3));
    assert_eq!(w.retry.initial, Duration::from_millis(500));
    assert_eq!(w.retry.max, Duration::from_secs(120));
    assert_eq!(w.retry.max_attempts, 5);
    assert_eq!(cfg.events.max_len, 5000);
    assert!(cfg.events.enabled);
    // Left out: the relay's defaults.
    let cfg = rendered(&build(&mailrelay(&format!("{RELAY}{hook}")), &[]));
    assert_eq!(cfg.webhooks[0].timeout, Duration::from_secs(10));
    assert_eq!(
        cfg.webhooks[0].retry,
        mailrelay::config::events::WebhookRetry::default()
    );
    let cfg = rendered(&build(
        &mailrelay(&format!("{RELAY}  events: {{enabled: false}}\n")),
        &[],
    ));
    assert!(!cfg.events.enabled);

    let err = |yaml: String| {
        resources::build(Inputs {
            relay: &mailrelay(&yaml),
            quotas: vec![],
            quota_rules: vec![],
            secrets: &ResolvedSecrets::default(),
            default_image: "mailrelay:test",
        })
        .unwrap_err()
    };
    let e = err(format!(
        "{RELAY}{hook}      retry: {{initial: 10m, max: 1m}}\n"
    ));
    assert_eq!(e.field, "spec.webhooks[0].retry.max", "{e}");
    let e = err(format!("{RELAY}{hook}      timeout: soon\n"));
    assert_eq!(e.field, "spec.webhooks[0].timeout", "{e}");
    let e = err(format!("{RELAY}  events: {{maxLen: 0}}\n"));
    assert_eq!(e.field, "spec.events.maxLen", "{e}");
    let e = err(format!("{RELAY}{hook}  events: {{enabled: false}}\n"));
    assert_eq!(e.field, "spec.events.enabled", "{e}");
}

// ---------------------------------------------------------------------------
// States in status and Events (in-memory API, real Redis).

const RELAY_PATH: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/mailrelays/out";
const QUOTAS: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/sendquotas";

fn events(api: &FakeApi, reason: &str) -> Vec<(String, String, String)> {
    api.requests()
        .iter()
        .filter(|r| r.is("POST", "/events"))
        .filter_map(|r| {
            let b = r.body.as_ref()?;
            (b["reason"] == reason).then(|| {
                (
                    b["type"].as_str().unwrap_or_default().to_owned(),
                    b["regarding"]["kind"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    b["note"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect()
}

fn condition<'a>(obj: &'a Value, type_: &str) -> &'a Value {
    obj["status"]["conditions"]
        .as_array()
        .unwrap_or_else(|| panic!("no conditions: {obj}"))
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_}: {obj}"))
}

async fn reconcile_relay(api: &FakeApi, ctx: &Arc<Context>) {
    let r: MailRelay = serde_json::from_value(api.get(RELAY_PATH).unwrap()).unwrap();
    relay::reconcile(Arc::new(r), ctx.clone()).await.unwrap();
}

async fn reconcile_quota(api: &FakeApi, ctx: &Arc<Context>, name: &str) {
    let q: SendQuota =
        serde_json::from_value(api.get(&format!("{QUOTAS}/{name}")).unwrap()).unwrap();
    quota::reconcile(Arc::new(q), ctx.clone()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_reach_status_with_one_event_each() {
    let redis = RedisServer::start();
    let api = FakeApi::start();
    api.set_deployment_status(
        json!({"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}),
    );
    let mut relay_obj = serde_json::to_value(mailrelay(RELAY)).unwrap();
    relay_obj["spec"]["redis"]["url"] = json!(redis.url());
    api.put(RELAY_PATH, relay_obj);
    api.put(
        &format!("{QUOTAS}/payments"),
        serde_json::to_value(sendquota(EGRESS)).unwrap(),
    );
    let ctx = Context::new(
        api.client.clone(),
        Settings {
            // No relay admin API here: quota usage is not what this test is about.
            admin_url_template: "http://127.0.0.1:1".into(),
            queue_timeout: Duration::from_secs(20),
            ..Settings::default()
        },
        Arc::new(Metrics::new()),
    );
    reconcile_relay(&api, &ctx).await;
    let cm = api
        .get("/api/v1/namespaces/mail/configmaps/out-config")
        .unwrap();
    let cfg =
        mailrelay::config::RelayConfig::from_yaml(cm["data"]["mailrelay.yaml"].as_str().unwrap())
            .unwrap();
    assert_eq!(cfg.response_rules[0].name, "payments.slow");
    assert!(
        api.get(RELAY_PATH).unwrap()["status"]
            .get("shaping")
            .is_none()
    );

    // A relay's rule starts a state, as the egress store records it.
    let store = RedisStore::connect(&RedisConfig {
        url: redis.url(),
        password: None,
        cluster: false,
        cluster_nodes: vec![],
        key_prefix: "mr".into(),
        wait_replicas: 0,
        wait_timeout: mailrelay::config::default_wait_timeout(),
        fresh_list: true,
    })
    .await
    .unwrap();
    let site = "mx1.provider.test,mx2.provider.test";
    let state = State {
        field: "sender_domain:shop.example".into(),
        action: RuleAction::Suspend,
        until_ms: 0,
        factor: 1.0,
        rate: None,
        max_connections: None,
        duration_ms: 600_000,
        pause_ms: 0,
        rule: "payments.slow".into(),
        reply: "421 4.7.28 Our system has detected an unusual rate of mail".into(),
    };
    store
        .shaping_set(site, &state, 600_000, None)
        .await
        .unwrap();

    api.clear_requests();
    reconcile_relay(&api, &ctx).await;
    let st = &api.get(RELAY_PATH).unwrap()["status"]["shaping"];
    assert_eq!(st.as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(st[0]["scope"], "sender_domain:shop.example");
    assert_eq!(st[0]["rule"], "payments.slow");
    assert_eq!(st[0]["action"], "suspend");
    assert_eq!(st[0]["site"], site);
    assert_eq!(st[0]["id"], format!("sender_domain:shop.example@{site}"));
    assert!(st[0]["reply"].as_str().unwrap().starts_with("421 4.7.28"));
    let until: k8s_openapi::jiff::Timestamp = st[0]["until"].as_str().unwrap().parse().unwrap();
    let left = until.as_second() - k8s_openapi::jiff::Timestamp::now().as_second();
    assert!((500..=601).contains(&left), "ends in {left}s");
    let ev = events(&api, "ShapingSuspended");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].0, "Warning");
    assert_eq!(ev[0].1, "MailRelay");
    assert!(
        ev[0]
            .2
            .contains("suspend of sender_domain:shop.example at mx1.provider.test")
            && ev[0].2.contains("rule payments.slow")
            && ev[0].2.contains("421 4.7.28"),
        "{}",
        ev[0].2
    );

    // Still in force: no second Event.
    api.clear_requests();
    reconcile_relay(&api, &ctx).await;
    assert!(events(&api, "ShapingSuspended").is_empty());

    // The SendQuota whose rule started it shows it, names the relay, announces it once.
    reconcile_quota(&api, &ctx, "payments").await;
    let q = api.get(&format!("{QUOTAS}/payments")).unwrap();
    assert_eq!(q["status"]["shaping"][0]["relay"], "out");
    assert_eq!(q["status"]["shaping"][0]["rule"], "payments.slow");
    let c = condition(&q, "ResponseRules");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("Applied"))
    );
    let ev = events(&api, "ShapingSuspended");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].1, "SendQuota");
    assert!(ev[0].2.contains("(MailRelay out)"), "{}", ev[0].2);
    api.clear_requests();
    reconcile_quota(&api, &ctx, "payments").await;
    assert!(events(&api, "ShapingSuspended").is_empty());

    // Lifted by hand: gone from both statuses.
    assert!(store.shaping_lift(site, &state.field).await.unwrap());
    reconcile_relay(&api, &ctx).await;
    assert!(
        api.get(RELAY_PATH).unwrap()["status"]
            .get("shaping")
            .is_none()
    );
    reconcile_quota(&api, &ctx, "payments").await;
    let q = api.get(&format!("{QUOTAS}/payments")).unwrap();
    assert!(q["status"].get("shaping").is_none(), "{}", q["status"]);

    // A throttle shows its factor, rate and connection cap, in status and Event.
    let throttle = State {
        field: "*".into(),
        action: RuleAction::Throttle,
        factor: 0.5,
        rate: Some(mailrelay::shaping::Rate {
            count: 30,
            window_ms: 60_000,
        }),
        max_connections: Some(2),
        pause_ms: 15_000,
        reply: "451 4.7.650 The mail server has been temporarily rate limited".into(),
        ..state.clone()
    };
    store
        .shaping_set(site, &throttle, 600_000, None)
        .await
        .unwrap();
    api.clear_requests();
    reconcile_relay(&api, &ctx).await;
    let st = &api.get(RELAY_PATH).unwrap()["status"]["shaping"];
    assert_eq!(st.as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(st[0]["action"], "throttle", "{st}");
    assert_eq!(st[0]["factor"], "0.5", "{st}");
    assert_eq!(st[0]["rate"], "30/1m", "{st}");
    assert_eq!(st[0]["maxConnections"], 2, "{st}");
    let ev = events(&api, "ShapingThrottled");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(
        ev[0]
            .2
            .starts_with("throttle x0.5 30/1m max 2 conns of every tenant at"),
        "{}",
        ev[0].2
    );
    assert!(store.shaping_lift(site, "*").await.unwrap());

    // A rule the relay cannot take is refused on the SendQuota, with an Event.
    let mut bad = serde_json::to_value(sendquota(EGRESS)).unwrap();
    bad["spec"]["responseRules"][0]["match"]["text"] = json!("(unclosed");
    api.put(&format!("{QUOTAS}/payments"), bad);
    api.clear_requests();
    reconcile_quota(&api, &ctx, "payments").await;
    let q = api.get(&format!("{QUOTAS}/payments")).unwrap();
    let c = condition(&q, "ResponseRules");
    assert_eq!(c["reason"], "InvalidRule");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.responseRules[0].match.text: invalid regex"),
        "{c}"
    );
    assert_eq!(events(&api, "ResponseRulesRefused").len(), 1);
    // The relay keeps running without them.
    reconcile_relay(&api, &ctx).await;
    let cm = api
        .get("/api/v1/namespaces/mail/configmaps/out-config")
        .unwrap();
    let cfg =
        mailrelay::config::RelayConfig::from_yaml(cm["data"]["mailrelay.yaml"].as_str().unwrap())
            .unwrap();
    assert!(cfg.response_rules.is_empty());
}
