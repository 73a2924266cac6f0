//! SenderDomain (issue 17): keys generated into Secrets and parsed back, the TXT
//! records in status, DNS conditions against a real dnsmasq (published, wrong
//! key, SPF and DMARC missing or p=none), rotation with an injected clock, keys
//! from users' Secrets, and key delivery to a relay that changes only its
//! bundle Secret (never the pod template).

use crate::support;

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use k8s_openapi::jiff::Timestamp;
use mailrelay_operator::crd::{DkimAlgorithm, SenderDomain};
use mailrelay_operator::dkim::keys;
use mailrelay_operator::reconcile::{Clock, Context, Settings, relay, senderdomain};
use mailrelay_operator::telemetry::Metrics;
use serde_json::{Value, json};
use support::dns::Dnsmasq;
use support::fake_api::FakeApi;

const SD: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/senderdomains/example";
const RELAY: &str = "/apis/mailrelay.io/v1alpha1/namespaces/mail/mailrelays/relay";
const SECRETS: &str = "/api/v1/namespaces/mail/secrets";
const DOMAIN: &str = "example.test";

struct Time(Arc<Mutex<Timestamp>>);

impl Time {
    fn start() -> Time {
        Time(Arc::new(Mutex::new(
            "2026-03-01T12:00:00Z".parse::<Timestamp>().unwrap(),
        )))
    }
    fn clock(&self) -> Clock {
        let t = self.0.clone();
        Clock(Arc::new(move || *t.lock().unwrap()))
    }
    fn advance(&self, days: i64) {
        let mut t = self.0.lock().unwrap();
        *t = Timestamp::from_second(t.as_second() + days * 86400).unwrap();
    }
}

fn context(api: &FakeApi, dns: &Dnsmasq, time: &Time) -> Arc<Context> {
    Context::new(
        api.client.clone(),
        Settings {
            dns_servers: vec![dns.addr()],
            clock: time.clock(),
            ..Settings::default()
        },
        Arc::new(Metrics::new()),
    )
}

fn sd_obj(spec: Value) -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "SenderDomain",
           "metadata": {"name": "example", "namespace": "mail"}, "spec": spec})
}

fn relay_obj() -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
           "metadata": {"name": "relay", "namespace": "mail", "labels": {"team": "payments"}},
           "spec": {"hostname": "relay.example.com", "redis": {"url": "redis://127.0.0.1:1"},
                    "listeners": [{"name": "smtp", "port": 2525}]}})
}

async fn reconcile(api: &FakeApi, ctx: &Arc<Context>) -> Value {
    let sd: SenderDomain = serde_json::from_value(api.get(SD).unwrap()).unwrap();
    senderdomain::reconcile(Arc::new(sd), ctx.clone())
        .await
        .unwrap();
    api.get(SD).unwrap()
}

fn cond<'a>(obj: &'a Value, type_: &str) -> &'a Value {
    obj["status"]["conditions"]
        .as_array()
        .unwrap_or_else(|| panic!("no conditions: {obj}"))
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_}: {obj}"))
}

fn reason(obj: &Value, type_: &str) -> (String, String) {
    let c = cond(obj, type_);
    (
        c["status"].as_str().unwrap().to_owned(),
        c["reason"].as_str().unwrap().to_owned(),
    )
}

fn key<'a>(obj: &'a Value, selector: &str) -> &'a Value {
    obj["status"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["selector"] == selector)
        .unwrap_or_else(|| panic!("no key {selector}: {obj}"))
}

fn txt(obj: &Value, selector: &str) -> (String, String) {
    let t = &key(obj, selector)["txt"];
    (
        t["name"].as_str().unwrap().to_owned(),
        t["value"].as_str().unwrap().to_owned(),
    )
}

fn secret_pem(api: &FakeApi, name: &str, key: &str) -> Vec<u8> {
    let s = api
        .get(&format!("{SECRETS}/{name}"))
        .unwrap_or_else(|| panic!("Secret {name}"));
    base64::engine::general_purpose::STANDARD
        .decode(s["data"][key].as_str().unwrap())
        .unwrap()
}

fn events(api: &FakeApi) -> Vec<(String, String, String)> {
    api.requests()
        .iter()
        .filter(|r| r.is("POST", "/events"))
        .map(|r| {
            let b = r.body.as_ref().unwrap();
            (
                b["type"].as_str().unwrap_or_default().to_owned(),
                b["reason"].as_str().unwrap_or_default().to_owned(),
                b["note"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn has_event(api: &FakeApi, reason: &str) -> bool {
    events(api).iter().any(|(_, r, _)| r == reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_keys_parse_back_and_status_has_their_txt_records() {
    let api = FakeApi::start();
    let empty = Dnsmasq::start(&[]);
    let time = Time::start();
    api.put(
        SD,
        sd_obj(json!({"domain": DOMAIN, "keys": [
            {"selector": "rsa1"},
            {"selector": "ed1", "algorithm": "ed25519-sha256"}]})),
    );
    let ctx = context(&api, &empty, &time);
    let st = reconcile(&api, &ctx).await;

    for (sel, alg) in [
        ("rsa1", DkimAlgorithm::RsaSha256),
        ("ed1", DkimAlgorithm::Ed25519Sha256),
    ] {
        let secret = api.get(&format!("{SECRETS}/dkim-example-{sel}")).unwrap();
        assert_eq!(
            secret["metadata"]["ownerReferences"][0]["kind"],
            "SenderDomain"
        );
        assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
        let pem = secret_pem(&api, &format!("dkim-example-{sel}"), "private.key");
        assert!(pem.starts_with(b"-----BEGIN PRIVATE KEY-----\n"));
        let parsed = keys::parse(&pem, alg).expect("the generated key parses back");
        let (name, value) = txt(&st, sel);
        assert_eq!(name, format!("{sel}._domainkey.{DOMAIN}"));
        assert_eq!(
            value,
            format!("v=DKIM1; k={}; p={}", alg.key_type(), parsed.public)
        );
        let zone = key(&st, sel)["txt"]["zoneValue"].as_str().unwrap();
        let strings: Vec<&str> = zone.split("\" \"").collect();
        assert!(
            strings.iter().all(|s| s.trim_matches('"').len() <= 255),
            "{zone}"
        );
        assert_eq!(zone.replace("\" \"", "").trim_matches('"'), value);
        assert_eq!(key(&st, sel)["state"], "Pending");
    }
    assert_eq!(parsed_bits(&st, "rsa1"), Some(2048));
    let rsa_zone = key(&st, "rsa1")["txt"]["zoneValue"].as_str().unwrap();
    assert!(
        rsa_zone.matches('"').count() >= 4,
        "RSA 2048 needs two strings: {rsa_zone}"
    );

    assert_eq!(
        reason(&st, "KeysReady"),
        ("True".into(), "KeysReady".into())
    );
    assert_eq!(
        reason(&st, "DNSPublished"),
        ("False".into(), "RecordMissing".into())
    );
    let msg = cond(&st, "DNSPublished")["message"].as_str().unwrap();
    assert!(
        msg.contains("no TXT record at rsa1._domainkey.example.test"),
        "{msg}"
    );
    assert_eq!(reason(&st, "SPFFound"), ("False".into(), "Missing".into()));
    assert_eq!(
        reason(&st, "DMARCFound"),
        ("False".into(), "Missing".into())
    );
    assert_eq!(reason(&st, "Ready"), ("False".into(), "AwaitingDNS".into()));
    assert_eq!(st["status"]["dns"], "Pending");
    assert_eq!(st["status"]["selectorList"], "rsa1,ed1");
    assert_eq!(st["status"]["observedGeneration"], 1);
    let generated: Vec<_> = events(&api)
        .into_iter()
        .filter(|(_, r, _)| r == "KeyGenerated")
        .collect();
    assert_eq!(generated.len(), 1, "one Event per reason: {generated:?}");
    assert!(
        generated[0].2.contains("selector rsa1") && generated[0].2.contains("selector ed1"),
        "{generated:?}"
    );

    // Keys never reach Events or status.
    let pem = String::from_utf8(secret_pem(&api, "dkim-example-rsa1", "private.key")).unwrap();
    let body_line = pem.lines().nth(1).unwrap();
    for r in api.requests() {
        if r.path.contains("/secrets") {
            continue;
        }
        let text = r.body.map(|b| b.to_string()).unwrap_or_default();
        assert!(!text.contains(body_line), "{} carries the key", r.path);
    }

    // Nothing changed: nothing regenerated.
    api.clear_requests();
    reconcile(&api, &ctx).await;
    assert!(!has_event(&api, "KeyGenerated"));
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.path.contains("/secrets") && r.method != "GET")
    );
}

fn parsed_bits(st: &Value, sel: &str) -> Option<u64> {
    key(st, sel)["bits"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_conditions_follow_what_dnsmasq_serves() {
    let api = FakeApi::start();
    let time = Time::start();
    api.put(
        SD,
        sd_obj(json!({"domain": DOMAIN, "keys": [{"selector": "s1"}]})),
    );
    api.put(RELAY, relay_obj());
    let empty = Dnsmasq::start(&[]);
    let st = reconcile(&api, &context(&api, &empty, &time)).await;
    let (name, value) = txt(&st, "s1");

    // A record with another key: Mismatch, a Warning, not signing.
    let other = keys::generate(DkimAlgorithm::RsaSha256, 1024).unwrap();
    let wrong = Dnsmasq::start(&[
        (&name, &format!("v=DKIM1; k=rsa; p={}", other.public)),
        (DOMAIN, "v=spf1 ip4:192.0.2.0/24 -all"),
        (
            "_dmarc.example.test",
            "v=DMARC1; p=none; rua=mailto:d@example.test",
        ),
    ]);
    api.clear_requests();
    let st = reconcile(&api, &context(&api, &wrong, &time)).await;
    assert_eq!(
        reason(&st, "DNSPublished"),
        ("False".into(), "KeyMismatch".into())
    );
    let msg = cond(&st, "DNSPublished")["message"].as_str().unwrap();
    assert!(msg.contains("publishes a different key"), "{msg}");
    assert_eq!(st["status"]["dns"], "Mismatch");
    assert_eq!(key(&st, "s1")["state"], "Pending");
    assert!(
        events(&api)
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "DNSMismatch")
    );
    assert_eq!(reason(&st, "SPFFound"), ("True".into(), "Found".into()));
    assert_eq!(
        reason(&st, "DMARCFound"),
        ("True".into(), "FoundPolicyNone".into())
    );
    let dmarc = cond(&st, "DMARCFound")["message"].as_str().unwrap();
    assert!(dmarc.contains("p=none"), "{dmarc}");

    // The right record (split into 255-byte strings): published, signing.
    let right = Dnsmasq::start(&[
        (&name, &value),
        ("_dmarc.example.test", "v=DMARC1; p=reject"),
    ]);
    api.clear_requests();
    let st = reconcile(&api, &context(&api, &right, &time)).await;
    assert_eq!(
        reason(&st, "DNSPublished"),
        ("True".into(), "Published".into())
    );
    assert_eq!(key(&st, "s1")["state"], "Signing");
    assert_eq!(st["status"]["dns"], "Published");
    assert_eq!(reason(&st, "SPFFound"), ("False".into(), "Missing".into()));
    let spf = cond(&st, "SPFFound")["message"].as_str().unwrap();
    assert!(
        spf.contains("no SPF record") && spf.contains(DOMAIN),
        "{spf}"
    );
    assert_eq!(reason(&st, "DMARCFound"), ("True".into(), "Found".into()));
    assert_eq!(reason(&st, "Ready"), ("True".into(), "Signing".into()));
    assert_eq!(st["status"]["relays"], json!(["relay"]));
    assert!(has_event(&api, "SigningSwitched"));

    // The record removed later: the key keeps signing (mail signed meanwhile
    // fails verification either way), and the condition says what is missing.
    let st = reconcile(&api, &context(&api, &empty, &time)).await;
    assert_eq!(key(&st, "s1")["state"], "Signing");
    assert_eq!(
        reason(&st, "DNSPublished"),
        ("False".into(), "RecordMissing".into())
    );
}

/// The relay's bundle Secret: `keys.yaml` and the PEM files.
fn bundle(api: &FakeApi) -> (Value, Vec<String>) {
    let s = api
        .get(&format!("{SECRETS}/relay-dkim"))
        .expect("bundle Secret");
    let data = s["data"].as_object().unwrap();
    let yaml = base64::engine::general_purpose::STANDARD
        .decode(data["keys.yaml"].as_str().unwrap())
        .unwrap();
    let index: Value = serde_norway::from_slice(&yaml).unwrap();
    let mut files: Vec<String> = data.keys().cloned().collect();
    files.sort();
    (index, files)
}

fn selectors(index: &Value) -> Vec<String> {
    index["domains"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["selectors"].as_array().unwrap().iter())
        .map(|s| s["selector"].as_str().unwrap().to_owned())
        .collect()
}

async fn reconcile_relay(api: &FakeApi, ctx: &Arc<Context>) {
    let r = serde_json::from_value(api.get(RELAY).unwrap()).unwrap();
    relay::reconcile(Arc::new(r), ctx.clone()).await.unwrap();
}

fn pod_template(api: &FakeApi) -> Value {
    api.get("/apis/apps/v1/namespaces/mail/deployments/relay")
        .unwrap()["spec"]["template"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_publishes_first_switches_on_dns_and_retires_after_the_overlap() {
    let api = FakeApi::start();
    let time = Time::start();
    api.put(
        SD,
        sd_obj(
            json!({"domain": DOMAIN, "keys": [{"selector": "s1", "algorithm": "ed25519-sha256"}],
                      "rotation": {"every": "90d", "overlap": "7d"}}),
        ),
    );
    api.put(RELAY, relay_obj());
    let empty = Dnsmasq::start(&[]);
    let st = reconcile(&api, &context(&api, &empty, &time)).await;
    let s1 = txt(&st, "s1");
    let dns1 = Dnsmasq::start(&[(&s1.0, &s1.1)]);
    let ctx = context(&api, &dns1, &time);
    let st = reconcile(&api, &ctx).await;
    assert_eq!(key(&st, "s1")["state"], "Signing");
    reconcile_relay(&api, &ctx).await;
    let (index, files) = bundle(&api);
    assert_eq!(selectors(&index), ["s1"]);
    assert_eq!(index["domains"][0]["domain"], DOMAIN);
    assert_eq!(
        index["domains"][0]["selectors"][0]["algorithm"],
        "ed25519-sha256"
    );
    assert_eq!(
        index["domains"][0]["selectors"][0]["key_file"],
        "example.test.s1.pem"
    );
    assert_eq!(files, ["example.test.s1.pem", "keys.yaml"]);
    let template = pod_template(&api);

    // 91 days on: a new selector, published in status, not signing yet.
    time.advance(91);
    api.clear_requests();
    let st = reconcile(&api, &ctx).await;
    let new_sel = "s1-20260531";
    assert_eq!(key(&st, new_sel)["state"], "Pending");
    assert_eq!(key(&st, "s1")["state"], "Signing");
    assert!(has_event(&api, "RotationStarted"));
    assert!(has_event(&api, "KeyGenerated"));
    assert!(
        api.get(&format!("{SECRETS}/dkim-example-{new_sel}"))
            .is_some()
    );
    reconcile_relay(&api, &ctx).await;
    assert_eq!(
        selectors(&bundle(&api).0),
        ["s1"],
        "not signing before DNS shows it"
    );

    // DNS shows it: signing switches, the old key signs on for the overlap.
    let s2 = txt(&st, new_sel);
    let dns2 = Dnsmasq::start(&[(&s1.0, &s1.1), (&s2.0, &s2.1)]);
    let ctx = context(&api, &dns2, &time);
    api.clear_requests();
    let st = reconcile(&api, &ctx).await;
    assert_eq!(key(&st, new_sel)["state"], "Signing");
    assert_eq!(key(&st, "s1")["state"], "Retiring");
    assert_eq!(key(&st, "s1")["retireAt"], "2026-06-07T12:00:00Z");
    assert!(has_event(&api, "SigningSwitched"));
    reconcile_relay(&api, &ctx).await;
    assert_eq!(selectors(&bundle(&api).0), ["s1", new_sel]);
    assert_eq!(
        pod_template(&api),
        template,
        "key changes never restart pods"
    );

    // After the overlap: retired, its Secret gone, the bundle without it.
    time.advance(8);
    api.clear_requests();
    let st = reconcile(&api, &ctx).await;
    assert!(
        st["status"]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["selector"] != "s1"),
        "{st}"
    );
    assert!(has_event(&api, "KeyRetired"));
    assert!(api.get(&format!("{SECRETS}/dkim-example-s1")).is_none());
    reconcile_relay(&api, &ctx).await;
    let (index, files) = bundle(&api);
    assert_eq!(selectors(&index), [new_sel]);
    assert_eq!(
        files,
        [format!("example.test.{new_sel}.pem"), "keys.yaml".into()]
    );
    assert_eq!(
        pod_template(&api),
        template,
        "key changes never restart pods"
    );

    // On request: the annotation rotates at once, once per value.
    let mut obj = api.get(SD).unwrap();
    obj["metadata"]["annotations"] = json!({"mailrelay.io/rotate-dkim": "1"});
    api.put(SD, obj);
    let st = reconcile(&api, &ctx).await;
    assert_eq!(key(&st, "s1-20260608")["state"], "Pending");
    assert_eq!(st["status"]["rotatedFor"], "1");
    let st = reconcile(&api, &ctx).await;
    assert_eq!(st["status"]["keys"].as_array().unwrap().len(), 2, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_secrets_are_checked_with_messages_naming_the_field() {
    let api = FakeApi::start();
    let time = Time::start();
    let off = json!({"enabled": false});
    api.put(
        SD,
        sd_obj(json!({"domain": DOMAIN, "dnsCheck": off,
                      "keys": [{"selector": "s1", "secretRef": {"name": "my-key"}}]})),
    );
    let empty = Dnsmasq::start(&[]);
    let ctx = context(&api, &empty, &time);
    let st = reconcile(&api, &ctx).await;
    assert_eq!(
        reason(&st, "KeysReady"),
        ("False".into(), "SecretNotFound".into())
    );
    let msg = cond(&st, "KeysReady")["message"].as_str().unwrap();
    assert!(
        msg.contains("spec.keys[0].secretRef") && msg.contains("my-key"),
        "{msg}"
    );
    assert_eq!(
        reason(&st, "Ready"),
        ("False".into(), "KeysNotReady".into())
    );

    let put_key = |k: &str, pem: &str| {
        api.put(
            &format!("{SECRETS}/my-key"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "my-key", "namespace": "mail"},
                   "type": "kubernetes.io/tls",
                   "data": {k: base64::engine::general_purpose::STANDARD.encode(pem)}}),
        );
    };
    let ed = keys::generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap();
    put_key("tls.key", &ed.pem);
    let st = reconcile(&api, &ctx).await;
    assert_eq!(
        reason(&st, "KeysReady"),
        ("False".into(), "AlgorithmMismatch".into())
    );

    let rsa = keys::generate(DkimAlgorithm::RsaSha256, 1024).unwrap();
    put_key("tls.key", &rsa.pem);
    api.clear_requests();
    let st = reconcile(&api, &ctx).await;
    assert_eq!(
        reason(&st, "KeysReady"),
        ("True".into(), "KeysReady".into())
    );
    assert!(
        events(&api)
            .iter()
            .any(|(t, r, m)| t == "Warning" && r == "KeyTooShort" && m.contains("1024"))
    );
    // DNS checks off: signing at once, DNS conditions Unknown.
    assert_eq!(key(&st, "s1")["state"], "Signing");
    assert_eq!(key(&st, "s1")["secretKey"], "tls.key");
    assert_eq!(cond(&st, "DNSPublished")["status"], "Unknown");
    assert_eq!(st["status"]["dns"], "Unchecked");
    assert_eq!(
        txt(&st, "s1").1,
        format!("v=DKIM1; k=rsa; p={}", rsa.public)
    );
    // Never a Secret of its own for a referenced key.
    assert!(api.get(&format!("{SECRETS}/dkim-example-s1")).is_none());

    put_key(
        "private.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let st = reconcile(&api, &ctx).await;
    assert_eq!(
        reason(&st, "KeysReady"),
        ("False".into(), "KeyInvalid".into())
    );
    assert_eq!(key(&st, "s1")["state"], "Invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_refused_naming_the_field() {
    let api = FakeApi::start();
    let time = Time::start();
    api.put(
        SD,
        sd_obj(json!({"domain": "Not A Domain", "keys": [{"selector": "s1"}]})),
    );
    let empty = Dnsmasq::start(&[]);
    let st = reconcile(&api, &context(&api, &empty, &time)).await;
    assert_eq!(reason(&st, "Ready"), ("False".into(), "InvalidSpec".into()));
    let msg = cond(&st, "Ready")["message"].as_str().unwrap();
    assert!(msg.starts_with("spec.domain:"), "{msg}");
    assert!(api.get(&format!("{SECRETS}/dkim-example-s1")).is_none());
    assert!(has_event(&api, "InvalidSpec"));
}

/// The bundle mount and the config never depend on the keys: the pod template
/// of the built Deployment is the same whatever the bundle holds.
#[test]
fn the_bundle_mount_is_always_there_and_optional() {
    let relay: mailrelay_operator::crd::MailRelay = serde_json::from_value(relay_obj()).unwrap();
    let objs = mailrelay_operator::resources::build(mailrelay_operator::resources::Inputs {
        relay: &relay,
        quotas: vec![],
        quota_rules: vec![],
        secrets: &Default::default(),
        default_image: "img",
    })
    .unwrap();
    let pod = objs.deployment.spec.unwrap().template.spec.unwrap();
    let v = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "dkim")
        .unwrap();
    let s = v.secret.unwrap();
    assert_eq!(s.secret_name.as_deref(), Some("relay-dkim"));
    assert_eq!(s.optional, Some(true));
    assert!(
        s.items.is_none(),
        "a whole-directory mount, updated in place"
    );
    let cfg =
        mailrelay::config::RelayConfig::from_yaml(&objs.config_map.data.unwrap()["mailrelay.yaml"])
            .unwrap();
    let dkim = cfg.dkim.unwrap();
    assert_eq!(
        dkim.keys_dir.as_deref(),
        Some(std::path::Path::new("/var/run/mailrelay/dkim"))
    );
    assert_eq!(
        dkim.unsigned_policy,
        mailrelay::config::dkim::UnsignedPolicy::Allow
    );
}
