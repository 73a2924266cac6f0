//! The pure builders: golden YAML for representative MailRelays, and the
//! properties the reconciler relies on (what rolls the pods and what does not).
//!
//! `UPDATE_GOLDEN=1 cargo test -p mailrelay-operator --test builders` rewrites
//! `tests/golden/*.yaml`; review the diff before committing it.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use mailrelay::config::RelayConfig;
use mailrelay_operator::crd::{MailRelay, SendQuota};
use mailrelay_operator::reconcile::relay::select_quotas;
use mailrelay_operator::resources::{
    self, CONFIG_HASH_ANNOTATION, Inputs, ResolvedSecrets, Resources, SECRET_HASH_ANNOTATION,
};

const IMAGE: &str = "ghcr.io/mailrelay-dev/mailrelay:0.1.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

fn relay(yaml: &str) -> MailRelay {
    let mut r: MailRelay = serde_norway::from_str(yaml).unwrap();
    r.metadata.uid = Some("7d3f4c1e-0000-4000-8000-000000000001".into());
    r
}

fn example(file: &str) -> String {
    std::fs::read_to_string(root().join("../examples/k8s").join(file)).unwrap()
}

fn example_quotas() -> Vec<SendQuota> {
    ["sendquota-payments.yaml", "sendquota-gmail.yaml"]
        .iter()
        .map(|f| serde_norway::from_str(&example(f)).unwrap())
        .collect()
}

fn build(r: &MailRelay, quotas: &[SendQuota], secrets: &ResolvedSecrets) -> Resources {
    let (ok, bad) = select_quotas(r, quotas);
    assert!(bad.is_empty(), "{bad:?}");
    resources::build(Inputs {
        relay: r,
        quotas: ok,
        secrets,
        default_image: IMAGE,
    })
    .unwrap()
}

const MINIMAL: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: minimal, namespace: mail}
spec:
  hostname: relay.example.com
  redis: {url: 'redis://redis:6379'}
";

const SMARTHOST: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: provider, namespace: apps, labels: {team: web}}
spec:
  replicas: 3
  image: registry.example.com/mailrelay:custom
  hostname: mail.apps.example.com
  listeners:
    - {name: smtp, port: 25, tls: none, proxyProtocol: true}
  relayNetworks: [10.20.0.0/16]
  redis:
    url: 'redis://redis-0.redis:6379'
    cluster: true
    clusterNodes: ['redis://redis-1.redis:6379']
    keyPrefix: apps
    waitReplicas: 1
  delivery:
    smarthost:
      host: smtp.provider.example
      port: 587
      tls: required
      credentialsSecret: {name: provider-creds}
    maxMessagesPerConnection: 20
  limits: {maxRecipients: 50}
  service:
    type: LoadBalancer
    externalTrafficPolicy: Local
    annotations: {service.beta.kubernetes.io/aws-load-balancer-type: nlb}
  resources:
    requests: {cpu: 250m, memory: 256Mi}
    limits: {memory: 1Gi}
  nodeSelector: {pool: mail}
  tolerations:
    - {key: dedicated, operator: Equal, value: mail, effect: NoSchedule}
";

/// The Redis URL from a Secret (a Redis Cluster, so `cluster` is rendered too).
const URL_SECRET: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: secret-url, namespace: mail}
spec:
  hostname: relay.example.com
  redis:
    urlSecret: {name: redis-url, key: url}
    passwordSecret: {name: redis-auth, key: password}
    cluster: true
";

const SENTINEL: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: sentinel, namespace: mail}
spec:
  hostname: relay.example.com
  redis:
    url: 'redis+sentinel://sentinel-0.db:26379,sentinel-1.db:26379/main/2'
    passwordSecret: {name: redis-auth, key: password}
    waitReplicas: 1
";

fn golden(name: &str, actual: &str) {
    let path = root().join("tests/golden").join(format!("{name}.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (e, a))| e != a)
            .take(10)
            .map(|(i, (e, a))| format!("line {}:\n  golden: {e}\n  actual: {a}", i + 1))
            .collect();
        panic!(
            "{} differs from the builders' output (UPDATE_GOLDEN=1 to accept):\n{}\n(golden {} lines, actual {} lines)",
            path.display(),
            diff.join("\n"),
            expected.lines().count(),
            actual.lines().count()
        );
    }
}

#[test]
fn golden_minimal() {
    golden(
        "minimal",
        &build(&relay(MINIMAL), &[], &ResolvedSecrets::default()).to_yaml(),
    );
}

#[test]
fn golden_example_with_quotas() {
    let r = relay(&example("mailrelay.yaml"));
    let secrets = ResolvedSecrets {
        env_digest: Some(resources::secret_digest(&[b"redis-password"])),
    };
    golden("example", &build(&r, &example_quotas(), &secrets).to_yaml());
}

#[test]
fn golden_smarthost() {
    let secrets = ResolvedSecrets {
        env_digest: Some(resources::secret_digest(&[b"user", b"password"])),
    };
    golden(
        "smarthost",
        &build(&relay(SMARTHOST), &example_quotas(), &secrets).to_yaml(),
    );
}

#[test]
fn golden_url_from_secret() {
    let secrets = ResolvedSecrets {
        env_digest: Some(resources::secret_digest(&[b"redis://r:6379", b"pw"])),
    };
    golden(
        "url-secret",
        &build(&relay(URL_SECRET), &[], &secrets).to_yaml(),
    );
}

fn container(o: &Resources) -> &k8s_openapi::api::core::v1::Container {
    &o.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

#[test]
fn a_url_from_a_secret_reaches_the_relay_through_its_environment() {
    let o = build(&relay(URL_SECRET), &[], &ResolvedSecrets::default());
    let env = container(&o).env.as_ref().unwrap();
    let refs: Vec<(&str, &str, &str)> = env
        .iter()
        .map(|e| {
            let r = e
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            (e.name.as_str(), r.name.as_str(), r.key.as_str())
        })
        .collect();
    assert_eq!(
        refs,
        [
            ("MAILRELAY_REDIS_URL", "redis-url", "url"),
            ("MAILRELAY_REDIS_PASSWORD", "redis-auth", "password"),
        ]
    );
    // The ConfigMap holds a placeholder the relay accepts and the variable replaces.
    let yaml = &o.config_map.data.as_ref().unwrap()["mailrelay.yaml"];
    let mut cfg = RelayConfig::from_yaml(yaml).unwrap();
    let r = cfg.queue.redis.as_ref().unwrap();
    assert_eq!(r.url, resources::config::REDIS_URL_PLACEHOLDER);
    assert!(r.cluster);
    let with_env = |cfg: &RelayConfig, url: &str| {
        let mut c = cfg.clone();
        c.apply_env(|k| match k {
            "MAILRELAY_REDIS_URL" => Some(url.into()),
            "MAILRELAY_REDIS_PASSWORD" => Some("pw".into()),
            _ => None,
        })
        .map(|()| c)
    };
    let url = "redis://:secret@redis-0.db:6379";
    assert_eq!(with_env(&cfg, url).unwrap().queue.redis.unwrap().url, url);
    // A Sentinel URL from the Secret: the relay takes it, unless the spec also says
    // `cluster: true` (as this one does), which it refuses naming the field.
    let sentinel = "redis+sentinel://:spw@s1:26379,s2:26379/main";
    let e = with_env(&cfg, sentinel).unwrap_err().to_string();
    assert!(
        e.contains("queue.redis.url") && e.contains("cluster"),
        "{e}"
    );
    let mut single = cfg.clone();
    single.queue.redis.as_mut().unwrap().cluster = false;
    let c = with_env(&single, sentinel).unwrap();
    assert_eq!(c.queue.redis.unwrap().url, sentinel);
    cfg.apply_env(|_| None).unwrap();
    assert!(
        cfg.queue.redis.unwrap().url.contains(".invalid:"),
        "without the variable the placeholder can reach no real host"
    );
}

#[test]
fn a_sentinel_url_is_rendered_as_given() {
    let o = build(&relay(SENTINEL), &[], &ResolvedSecrets::default());
    let yaml = &o.config_map.data.as_ref().unwrap()["mailrelay.yaml"];
    let cfg = RelayConfig::from_yaml(yaml).unwrap();
    let r = cfg.queue.redis.as_ref().unwrap();
    assert_eq!(
        r.url,
        "redis+sentinel://sentinel-0.db:26379,sentinel-1.db:26379/main/2"
    );
    assert!(!r.cluster);
    assert_eq!(r.wait_replicas, 1);
    let env = container(&o).env.as_ref().unwrap();
    assert_eq!(
        env.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["MAILRELAY_REDIS_PASSWORD"]
    );
}

#[test]
fn a_bad_redis_spec_is_refused_naming_the_field() {
    for (yaml, field) in [
        (
            SENTINEL.replace("waitReplicas: 1", "cluster: true"),
            "spec.redis.cluster",
        ),
        (
            URL_SECRET.replace("cluster: true", "url: 'redis://r:6379'"),
            "spec.redis.urlSecret",
        ),
        (
            MINIMAL.replace("{url: 'redis://redis:6379'}", "{keyPrefix: x}"),
            "spec.redis.url",
        ),
    ] {
        let r = relay(&yaml);
        let e = resources::build(Inputs {
            relay: &r,
            quotas: vec![],
            secrets: &ResolvedSecrets::default(),
            default_image: IMAGE,
        })
        .unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
}

fn template_annotation(d: &Deployment, key: &str) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(key)
        .cloned()
}

#[test]
fn quota_changes_reach_the_config_map_without_rolling_pods() {
    let r = relay(&example("mailrelay.yaml"));
    let s = ResolvedSecrets::default();
    let none = build(&r, &[], &s);
    let quotas = example_quotas();
    let both = build(&r, &quotas, &s);
    let mut edited = quotas.clone();
    edited[0].spec.limits = vec!["5/1m".into()];
    let changed = build(&r, &edited, &s);
    for other in [&both, &changed] {
        assert_ne!(other.config_map, none.config_map);
        assert_eq!(other.config_hash, none.config_hash);
        assert_eq!(other.deployment, none.deployment, "the pods must not roll");
    }
    assert_ne!(both.config_map, changed.config_map);
    let yaml = &both.config_map.data.as_ref().unwrap()["mailrelay.yaml"];
    let cfg = RelayConfig::from_yaml(yaml).unwrap();
    let names: Vec<&str> = cfg.quotas.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["gmail", "payments"]);
}

#[test]
fn config_changes_roll_pods_and_so_do_env_secrets() {
    let r = relay(&example("mailrelay.yaml"));
    let s = ResolvedSecrets::default();
    let before = build(&r, &[], &s);
    let mut r2 = r.clone();
    r2.spec.limits.as_mut().unwrap().max_recipients = Some(10);
    let after = build(&r2, &[], &s);
    assert_ne!(after.config_hash, before.config_hash);
    assert_eq!(
        template_annotation(&after.deployment, CONFIG_HASH_ANNOTATION),
        Some(after.config_hash.clone())
    );
    assert_ne!(after.deployment, before.deployment);

    let s1 = ResolvedSecrets {
        env_digest: Some(resources::secret_digest(&[b"one"])),
    };
    let s2 = ResolvedSecrets {
        env_digest: Some(resources::secret_digest(&[b"two"])),
    };
    let a = build(&r, &[], &s1);
    let b = build(&r, &[], &s2);
    assert_eq!(a.config_map, b.config_map);
    assert_ne!(
        template_annotation(&a.deployment, SECRET_HASH_ANNOTATION),
        template_annotation(&b.deployment, SECRET_HASH_ANNOTATION)
    );
}

#[test]
fn every_object_is_owned_labelled_and_named_as_agreed() {
    let r = relay(&example("mailrelay.yaml"));
    let o = build(&r, &example_quotas(), &ResolvedSecrets::default());
    let metas = [
        (&o.config_map.metadata, "relay-config"),
        (&o.service_account.metadata, "relay"),
        (&o.service.metadata, "relay"),
        (&o.admin_service.metadata, "relay-admin"),
        (&o.pdb.metadata, "relay"),
        (&o.deployment.metadata, "relay"),
    ];
    for (m, name) in metas {
        assert_eq!(m.name.as_deref(), Some(name));
        assert_eq!(m.namespace.as_deref(), Some("mail"));
        let owner = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("MailRelay", "relay", Some(true))
        );
        let labels = m.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], "mailrelay");
        assert_eq!(labels["app.kubernetes.io/instance"], "relay");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "mailrelay-operator");
    }
    let admin_port = &o
        .admin_service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        (admin_port.name.as_deref(), admin_port.port),
        (Some("admin"), 9325)
    );
    let c = &o
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(
        c.args.as_ref().unwrap(),
        &["serve", "--config", "/etc/mailrelay/mailrelay.yaml"]
    );
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert_eq!(o.service.name_any(), "relay");
}

#[test]
fn the_rendered_config_is_what_the_relay_accepts_with_the_pod_env() {
    let r = relay(SMARTHOST);
    let o = build(&r, &[], &ResolvedSecrets::default());
    let yaml = &o.config_map.data.as_ref().unwrap()["mailrelay.yaml"];
    let mut cfg = RelayConfig::from_yaml(yaml).unwrap();
    // No secret in the ConfigMap: they come from the pod's environment.
    assert_eq!(cfg.delivery.smarthost.as_ref().unwrap().password, None);
    assert_eq!(cfg.delivery.smarthost.as_ref().unwrap().username, None);
    assert_eq!(cfg.queue.redis.as_ref().unwrap().password, None);
    cfg.apply_env(|k| match k {
        "MAILRELAY_SMARTHOST_USERNAME" => Some("user".into()),
        "MAILRELAY_SMARTHOST_PASSWORD" => Some("pw".into()),
        _ => None,
    })
    .unwrap();
    let sh = cfg.delivery.smarthost.as_ref().unwrap();
    assert_eq!(sh.username.as_deref(), Some("user"));
    assert_eq!(cfg.queue.redis.as_ref().unwrap().key_prefix, "apps");
    assert_eq!(cfg.listeners[0].address.to_string(), "0.0.0.0:25");
    assert_eq!(cfg.admin.address.unwrap().to_string(), "0.0.0.0:9325");
}

#[test]
fn a_bad_quota_is_left_out_and_named() {
    let r = relay(&example("mailrelay.yaml"));
    let mut quotas = example_quotas();
    quotas[0].spec.limits = vec!["10/1m".into(), "20/60s".into()];
    let (ok, bad) = select_quotas(&r, &quotas);
    assert_eq!(ok.len(), 1);
    assert_eq!(bad[0].0, "payments");
    assert!(
        bad[0].1.to_string().starts_with("spec.limits[1]"),
        "{}",
        bad[0].1
    );
}

#[test]
fn selectors_pick_relays_by_label() {
    let r = relay(&example("mailrelay.yaml"));
    let mut other = relay(MINIMAL);
    other.metadata.labels = None;
    let quotas = example_quotas();
    assert_eq!(select_quotas(&r, &quotas).0.len(), 2);
    let (ok, _) = select_quotas(&other, &quotas);
    assert_eq!(
        ok.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
        ["gmail"]
    );
}
