//! The pure builders: golden YAML for representative MailRelays, and the
//! properties the reconciler relies on (what rolls the pods and what does not).
//!
//! `UPDATE_GOLDEN=1 cargo test -p mailrelay-operator --test it builders::` rewrites
//! `tests/golden/*.yaml`; review the diff before committing it.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use mailrelay::config::RelayConfig;
use mailrelay::config::events::WebhookBatch;
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
        quota_rules: vec![],
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
        panic!(
            "{} differs from the builders' output:\n{}",
            path.display(),
            golden_mismatch(name, &expected, actual)
        );
    }
}

/// What a golden mismatch reports: a unified diff (an inserted line shows as one
/// `+`, not as every later line differing) and how to accept the change.
fn golden_mismatch(name: &str, expected: &str, actual: &str) -> String {
    let diff = similar::TextDiff::from_lines(expected, actual)
        .unified_diff()
        .context_radius(3)
        .header(&format!("golden/{name}.yaml"), "builders' output")
        .to_string();
    format!(
        "{diff}\nIf the change is intended, regenerate the golden files and review their diff:\n  \
         UPDATE_GOLDEN=1 cargo test -p mailrelay-operator --test it builders::"
    )
}

#[test]
fn a_golden_mismatch_shows_a_unified_diff_and_how_to_regenerate() {
    let golden = "a: 1\nb: 2\nc: 3\nd: 4\n";
    let actual = "a: 1\ninserted: 0\nb: 2\nc: 3\nd: 5\n";
    let report = golden_mismatch("example", golden, actual);
    assert!(report.contains("--- golden/example.yaml"), "{report}");
    assert!(report.contains("+++ builders' output"), "{report}");
    assert!(report.contains("\n+inserted: 0\n"), "{report}");
    assert!(report.contains("\n-d: 4\n+d: 5\n"), "{report}");
    // The lines after the insertion are context, not differences.
    assert!(report.contains("\n b: 2\n c: 3\n"), "{report}");
    assert!(!report.contains("-b: 2"), "{report}");
    assert!(
        report.contains("UPDATE_GOLDEN=1 cargo test -p mailrelay-operator --test it builders::"),
        "{report}"
    );
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
    let r = relay(SMARTHOST);
    // The example's gmail quota names MX hosts, which a relay sending everything
    // through a smarthost never looks up: it is left out (and flagged on the
    // SendQuota).
    let (_, bad) = select_quotas(&r, &example_quotas());
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].1.to_string().starts_with("spec.match.mxHosts"),
        "{bad:?}"
    );
    let quotas: Vec<SendQuota> = example_quotas()
        .into_iter()
        .filter(|q| q.metadata.name.as_deref() != Some(bad[0].0.as_str()))
        .collect();
    golden("smarthost", &build(&r, &quotas, &secrets).to_yaml());
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

/// The NetworkPolicies of the minimal relay (defaults: SMTP from its own
/// namespace) and of the smarthost relay opened to peers, as the operator of a
/// chart install (release `mr` in `mailrelay-system`) renders them.
#[test]
fn golden_network_policies() {
    use mailrelay_operator::resources::network::{NetworkSettings, network_policy};
    let settings = NetworkSettings {
        operator_namespace: "mailrelay-system".into(),
        operator_pod_labels: [
            ("app.kubernetes.io/name", "mailrelay-operator"),
            ("app.kubernetes.io/instance", "mr"),
            ("app.kubernetes.io/component", "operator"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        api_server_cidrs: vec!["172.18.0.2/32".into()],
        monitoring_namespace_labels: Some(
            [(
                "kubernetes.io/metadata.name".to_owned(),
                "monitoring".to_owned(),
            )]
            .into(),
        ),
    };
    let opened = format!(
        "{SMARTHOST}  networkPolicy:\n    smtpFrom:\n      - namespaceSelector: {{matchLabels: {{team: web}}}}\n      - cidr: 10.20.0.0/16\n"
    );
    let docs: Vec<String> = [relay(MINIMAL), relay(&opened)]
        .iter()
        .map(|r| serde_norway::to_string(&network_policy(r, &settings).unwrap().unwrap()).unwrap())
        .collect();
    golden("network-policies", &docs.join("---\n"));
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
        let e = build_err(&yaml);
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

/// An HPA on CPU and both queue gauges, with routes and a delay warning.
const AUTOSCALED: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: scaled, namespace: mail}
spec:
  replicas: 3
  hostname: relay.example.com
  redis: {url: 'redis://redis:6379'}
  autoscaling:
    minReplicas: 2
    maxReplicas: 12
    targetCPUUtilization: 70
    queue: {pendingMessagesPerReplica: 500, oldestMessageAgeSeconds: 900}
  delivery:
    delayWarning: 4h
    connectTimeout: 10s
    lease: 20s
    retry: {maxLifetime: 3d}
    routes:
      - domains: [partner.example, .partner.example]
        host: smtp.partner.example
        port: 587
        tls: required
        auth: {username: relay, passwordSecret: {name: partner-smtp, key: password}}
      - domains: [intranet.example]
        host: 10.0.0.25
";

/// KEDA, scaling delivery to zero while the queue is empty.
const KEDA: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: keda, namespace: mail}
spec:
  hostname: relay.example.com
  redis: {url: 'redis://redis:6379'}
  autoscaling:
    minReplicas: 0
    maxReplicas: 8
    targetCPUUtilization: 80
    queue: {pendingMessagesPerReplica: 200}
    keda: {prometheusServerAddress: 'http://prometheus-operated.monitoring.svc:9090', cooldownPeriod: 600}
";

#[test]
fn golden_autoscaled_with_routes() {
    let secrets = ResolvedSecrets {
        env_digest: Some(resources::secret_digest(&[b"partner-password"])),
    };
    golden(
        "autoscaled",
        &build(&relay(AUTOSCALED), &[], &secrets).to_yaml(),
    );
}

#[test]
fn golden_keda() {
    golden(
        "keda",
        &build(&relay(KEDA), &[], &ResolvedSecrets::default()).to_yaml(),
    );
}

#[test]
fn under_autoscaling_the_deployment_has_no_replicas_and_an_hpa_targets_it() {
    let o = build(&relay(AUTOSCALED), &[], &ResolvedSecrets::default());
    assert_eq!(o.deployment.spec.as_ref().unwrap().replicas, None);
    let Some(resources::autoscaling::Autoscaler::Hpa(hpa)) = &o.autoscaler else {
        panic!("an HPA: {:?}", o.autoscaler);
    };
    assert_eq!(hpa.owner_references()[0].kind, "MailRelay");
    let spec = hpa.spec.as_ref().unwrap();
    assert_eq!(spec.scale_target_ref.kind, "Deployment");
    assert_eq!(spec.scale_target_ref.name, "scaled");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 12));
    let metrics = spec.metrics.as_ref().unwrap();
    let types: Vec<&str> = metrics.iter().map(|m| m.type_.as_str()).collect();
    assert_eq!(types, ["Resource", "External", "External"]);
    let pending = metrics[1].external.as_ref().unwrap();
    assert_eq!(
        pending.metric.name,
        mailrelay_operator::telemetry::QUEUE_PENDING_METRIC
    );
    assert_eq!(pending.target.type_, "AverageValue");
    let age = metrics[2].external.as_ref().unwrap();
    assert_eq!(age.target.type_, "Value");
    assert_eq!(
        resources::autoscaling::initial_replicas(&relay(AUTOSCALED).spec),
        3
    );

    // Without autoscaling: replicas are the operator's, and nothing else is made.
    let plain = build(&relay(MINIMAL), &[], &ResolvedSecrets::default());
    assert_eq!(plain.deployment.spec.as_ref().unwrap().replicas, Some(2));
    assert!(plain.autoscaler.is_none());
}

#[test]
fn a_scaled_object_queries_the_operators_gauges_with_max() {
    let o = build(&relay(KEDA), &[], &ResolvedSecrets::default());
    let Some(resources::autoscaling::Autoscaler::Keda(so)) = &o.autoscaler else {
        panic!("a ScaledObject: {:?}", o.autoscaler);
    };
    let v = serde_json::to_value(so).unwrap();
    assert_eq!(v["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(v["kind"], "ScaledObject");
    assert_eq!(v["spec"]["minReplicaCount"], 0);
    let triggers = v["spec"]["triggers"].as_array().unwrap();
    let queries: Vec<&str> = triggers
        .iter()
        .filter_map(|t| t["metadata"]["query"].as_str())
        .collect();
    assert_eq!(
        queries,
        [
            "max(mailrelay_operator_relay_queue_pending_messages{relay_namespace=\"mail\",relay=\"keda\"})",
            // Scaled to zero, anything queued (deferred mail too) wakes one pod.
            "max(mailrelay_operator_relay_queue_messages{relay_namespace=\"mail\",relay=\"keda\"}) > bool 0",
        ]
    );
    assert_eq!(triggers.last().unwrap()["type"], "cpu");
    // Without scale to zero, no wake-up trigger.
    let mut r = relay(KEDA);
    r.spec.autoscaling.as_mut().unwrap().min_replicas = 1;
    let o = build(&r, &[], &ResolvedSecrets::default());
    let Some(resources::autoscaling::Autoscaler::Keda(so)) = &o.autoscaler else {
        panic!();
    };
    let v = serde_json::to_value(so).unwrap();
    assert!(
        v["spec"]["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["name"] != "mail-queued")
    );
}

#[test]
fn bad_autoscaling_without_cel_rules_is_refused_naming_the_field() {
    for (change, field, needle) in [
        (
            "{minReplicas: 5, maxReplicas: 2, targetCPUUtilization: 50}",
            "spec.autoscaling.minReplicas",
            "maxReplicas",
        ),
        (
            "{minReplicas: 0, maxReplicas: 2, targetCPUUtilization: 50}",
            "spec.autoscaling.minReplicas",
            "scale to zero",
        ),
        (
            "{maxReplicas: 2}",
            "spec.autoscaling.targetCPUUtilization",
            "something to scale on",
        ),
        (
            "{maxReplicas: 2, queue: {}}",
            "spec.autoscaling.queue",
            "pendingMessagesPerReplica",
        ),
        (
            "{maxReplicas: 2, targetCPUUtilization: 50, keda: {prometheusServerAddress: 'http://p'}}",
            "spec.autoscaling.queue",
            "shared queue",
        ),
    ] {
        let e = build_err(&format!("{MINIMAL}  autoscaling: {change}\n"));
        assert_eq!(e.field, field, "{change}: {e}");
        assert!(e.message.contains(needle), "{change}: {e}");
    }
}

#[test]
fn routes_reach_the_relay_with_their_password_from_the_pod_env() {
    let o = build(&relay(AUTOSCALED), &[], &ResolvedSecrets::default());
    let yaml = &o.config_map.data.as_ref().unwrap()["mailrelay.yaml"];
    assert!(!yaml.contains("partner-smtp"), "{yaml}");
    let mut cfg = RelayConfig::from_yaml(yaml).unwrap();
    let routes = &cfg.delivery.routes;
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[0].remote.host, "smtp.partner.example");
    assert_eq!(routes[0].remote.port, 587);
    assert_eq!(routes[0].remote.tls, mailrelay::config::TlsPolicy::Required);
    assert_eq!(routes[0].remote.username.as_deref(), Some("relay"));
    assert_eq!(routes[0].remote.password, None);
    assert_eq!(routes[1].remote.port, 25);
    assert_eq!(routes[1].remote.username, None);
    assert_eq!(
        cfg.delivery.retry.delay_warning,
        Some(std::time::Duration::from_secs(4 * 3600))
    );
    assert_eq!(
        cfg.delivery.connect_timeout,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(cfg.delivery.lease, std::time::Duration::from_secs(20));
    // The pod gets the password from the Secret under the name the config expects.
    let env = container(&o).env.clone().unwrap();
    let var = env
        .iter()
        .find(|e| e.name == "MAILRELAY_ROUTE_0_PASSWORD")
        .expect("the route's password variable");
    let sel = var
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (sel.name.as_str(), sel.key.as_str()),
        ("partner-smtp", "password")
    );
    cfg.apply_env(|k| (k == "MAILRELAY_ROUTE_0_PASSWORD").then(|| "s3cret".into()))
        .unwrap();
    assert_eq!(
        cfg.delivery.routes[0]
            .remote
            .password
            .as_ref()
            .map(|p| p.0.as_str()),
        Some("s3cret")
    );
}

/// Every pod and Service setting a real cluster asks for (issue #12, item 8), and a
/// drain longer than the default (item 9).
const POD_SETTINGS: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: tuned, namespace: mail}
spec:
  hostname: relay.example.com
  listeners:
    - {name: smtp, port: 2525, servicePort: 25}
    - {name: submission, port: 2587, servicePort: 587}
  relayNetworks: [10.0.0.0/8]
  redis: {url: 'redis://redis:6379'}
  delivery:
    smarthost: {host: smtp.corp.example, port: 587, tls: required}
    caBundle:
      configMap: {name: corp-ca, key: ca-bundle.pem}
  service:
    type: LoadBalancer
    externalTrafficPolicy: Local
    annotations: {service.beta.kubernetes.io/aws-load-balancer-scheme: internal}
    labels: {exposure: internal}
    loadBalancerSourceRanges: [10.0.0.0/8, 'fd00::/16']
  imagePullSecrets: [{name: registry-creds}]
  priorityClassName: mail-critical
  nodeSelector: {pool: mail}
  tolerations:
    - {key: dedicated, operator: Equal, value: mail, effect: NoSchedule}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions:
              - {key: kubernetes.io/arch, operator: In, values: [amd64, arm64]}
  podAnnotations: {team.example.com/owner: mail}
  podLabels: {team: mail}
  env:
    - {name: RUST_LOG, value: 'mailrelay=debug'}
    - name: NODE
      valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
  envFrom:
    - configMapRef: {name: relay-extra-env}
  volumes:
    - name: scratch
      emptyDir: {sizeLimit: 16Mi}
    - name: extra-certs
      secret: {secretName: extra-certs}
  volumeMounts:
    - {name: scratch, mountPath: /var/lib/scratch}
    - {name: extra-certs, mountPath: /etc/extra-certs, readOnly: true}
  shutdown: {settle: 20s, grace: 2m}
";

#[test]
fn golden_pod_settings() {
    golden(
        "pod-settings",
        &build(&relay(POD_SETTINGS), &[], &ResolvedSecrets::default()).to_yaml(),
    );
}

fn pod_spec(o: &Resources) -> &k8s_openapi::api::core::v1::PodSpec {
    o.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn rendered(o: &Resources) -> RelayConfig {
    RelayConfig::from_yaml(&o.config_map.data.as_ref().unwrap()["mailrelay.yaml"]).unwrap()
}

fn build_err(yaml: &str) -> resources::config::SpecError {
    let r = relay(yaml);
    resources::build(Inputs {
        relay: &r,
        quotas: vec![],
        quota_rules: vec![],
        secrets: &ResolvedSecrets::default(),
        default_image: IMAGE,
    })
    .unwrap_err()
}

#[test]
fn pod_settings_reach_the_pod_template() {
    let o = build(&relay(POD_SETTINGS), &[], &ResolvedSecrets::default());
    let pod = pod_spec(&o);
    let names = |v: &[k8s_openapi::api::core::v1::LocalObjectReference]| {
        v.iter().map(|s| s.name.clone()).collect::<Vec<_>>()
    };
    assert_eq!(
        names(pod.image_pull_secrets.as_deref().unwrap()),
        ["registry-creds"]
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("mail-critical"));
    assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "mail");
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some("dedicated")
    );
    let terms = &pod
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms;
    assert_eq!(
        terms[0].match_expressions.as_ref().unwrap()[0].key,
        "kubernetes.io/arch"
    );
    // The operator's own spread constraints stay.
    assert_eq!(pod.topology_spread_constraints.as_ref().unwrap().len(), 2);

    let meta = o
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap();
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels["team"], "mail");
    assert_eq!(labels["app.kubernetes.io/instance"], "tuned");
    assert_eq!(
        meta.annotations.as_ref().unwrap()["team.example.com/owner"],
        "mail"
    );

    let c = &pod.containers[0];
    let env: Vec<&str> = c
        .env
        .as_deref()
        .unwrap()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(env, ["RUST_LOG", "NODE"]);
    assert_eq!(
        c.env_from.as_ref().unwrap()[0]
            .config_map_ref
            .as_ref()
            .unwrap()
            .name,
        "relay-extra-env"
    );
    let volumes: Vec<&str> = pod
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volumes,
        [
            "config",
            "tmp",
            "admin-token",
            "dkim",
            "ca-bundle",
            "scratch",
            "extra-certs"
        ]
    );
    let mounts: Vec<(&str, &str)> = c
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("config", "/etc/mailrelay"),
            ("tmp", "/tmp"),
            ("admin-token", "/var/run/mailrelay/admin-token"),
            ("dkim", "/var/run/mailrelay/dkim"),
            ("ca-bundle", "/var/run/mailrelay/ca"),
            ("scratch", "/var/lib/scratch"),
            ("extra-certs", "/etc/extra-certs"),
        ]
    );
}

/// Issue 13: every relay mounts its `NAME-admin-token` Secret as a whole directory
/// (so a rotation reaches the running pods) and its config points
/// `admin.token_file` there, so the admin API on 0.0.0.0 requires the token.
#[test]
fn the_admin_token_secret_is_mounted_and_configured() {
    let r = relay(SMARTHOST);
    let name = r.metadata.name.clone().unwrap();
    let o = build(&r, &[], &ResolvedSecrets::default());
    let cfg = rendered(&o);
    assert_eq!(
        cfg.admin.token_file.as_deref(),
        Some(std::path::Path::new("/var/run/mailrelay/admin-token/token"))
    );
    assert_eq!(cfg.admin.address.unwrap().to_string(), "0.0.0.0:9325");
    let pod = pod_spec(&o);
    let vol = pod
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == "admin-token")
        .expect("admin-token volume");
    let s = vol.secret.as_ref().unwrap();
    assert_eq!(
        s.secret_name.as_deref(),
        Some(format!("{name}-admin-token").as_str())
    );
    assert_eq!(s.optional, Some(false), "no pod without its token");
    assert_eq!(s.default_mode, Some(0o440));
    let items = s.items.as_deref().unwrap();
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("token", "token")
    );
    let m = pod.containers[0]
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|m| m.name == "admin-token")
        .unwrap();
    assert_eq!(m.mount_path, "/var/run/mailrelay/admin-token");
    assert_eq!(m.read_only, Some(true));
    assert_eq!(
        m.sub_path, None,
        "a subPath mount would never see a rotation"
    );
    // The token itself is never in the ConfigMap, nor in the environment.
    let env = pod.containers[0].env.clone().unwrap_or_default();
    assert!(!env.iter().any(|e| e.name == "MAILRELAY_ADMIN_TOKEN"));
    // The name is the operator's: a user volume may not take it.
    let mut spec = serde_json::to_value(&r.spec).unwrap();
    spec["volumes"] = serde_json::json!([{"name": "admin-token", "emptyDir": {}}]);
    let mut bad = r.clone();
    bad.spec = serde_json::from_value(spec).unwrap();
    let e = resources::build(Inputs {
        relay: &bad,
        quotas: vec![],
        quota_rules: vec![],
        secrets: &ResolvedSecrets::default(),
        default_image: IMAGE,
    })
    .unwrap_err();
    assert_eq!(e.field, "spec.volumes[0].name", "{e}");
}

#[test]
fn bad_routes_and_delay_warnings_are_refused_naming_the_field() {
    for (delivery, field, needle) in [
        (
            "{delayWarning: 6d}",
            "spec.delivery.delayWarning",
            "shorter than spec.delivery.retry.maxLifetime (5d)",
        ),
        (
            "{delayWarning: 2d, retry: {maxLifetime: 1d}}",
            "spec.delivery.delayWarning",
            "(1d)",
        ),
        ("{delayWarning: 4x}", "spec.delivery.delayWarning", ""),
        ("{connectTimeout: soon}", "spec.delivery.connectTimeout", ""),
        ("{lease: 1s}", "spec.delivery.lease", "at least 2s"),
        ("{lease: later}", "spec.delivery.lease", ""),
        (
            "{routes: [{domains: [a.example], host: h}, {domains: [b.example, A.Example.], host: h}]}",
            "spec.delivery.routes[1].domains",
            "already routed",
        ),
        (
            "{routes: [{domains: ['a b'], host: h}]}",
            "spec.delivery.routes[0].domains",
            "not a domain",
        ),
        (
            "{routes: [{domains: [a.example], host: h, port: 70000}]}",
            "spec.delivery.routes[0].port",
            "1-65535",
        ),
        (
            "{routes: [{domains: [a.example], host: h, tls: disabled, auth: {username: u, passwordSecret: {name: s, key: k}}}]}",
            "spec.delivery.routes[0].tls",
            "only ever sent over TLS",
        ),
        (
            "{routes: [{domains: [a.example], host: ''}]}",
            "spec.delivery.routes[0].host",
            "empty",
        ),
    ] {
        let e = build_err(&format!("{MINIMAL}  delivery: {delivery}\n"));
        assert_eq!(e.field, field, "{delivery}: {e}");
        assert!(e.message.contains(needle), "{delivery}: {e}");
    }
}

#[test]
fn service_ports_are_separate_from_container_ports() {
    let o = build(&relay(POD_SETTINGS), &[], &ResolvedSecrets::default());
    let svc = o.service.spec.as_ref().unwrap();
    let ports: Vec<(i32, String)> = svc
        .ports
        .as_deref()
        .unwrap()
        .iter()
        .map(|p| {
            let target = match p.target_port.as_ref().unwrap() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
                other => panic!("{other:?}"),
            };
            (p.port, target)
        })
        .collect();
    assert_eq!(
        ports,
        [(25, "smtp".to_owned()), (587, "submission".to_owned())]
    );
    let c = container(&o);
    let container_ports: Vec<(Option<&str>, i32)> = c
        .ports
        .as_deref()
        .unwrap()
        .iter()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(
        container_ports,
        [
            (Some("smtp"), 2525),
            (Some("submission"), 2587),
            (Some("admin"), 9325)
        ]
    );
    // The relay binds the container ports, unprivileged: no sysctl needed.
    let addrs: Vec<String> = rendered(&o)
        .listeners
        .iter()
        .map(|l| l.address.to_string())
        .collect();
    assert_eq!(addrs, ["0.0.0.0:2525", "0.0.0.0:2587"]);
    assert_eq!(
        pod_spec(&o)
            .security_context
            .as_ref()
            .unwrap()
            .sysctls
            .as_ref(),
        None
    );
    // Below 1024 the pod lowers the first unprivileged port instead of running as
    // root or with NET_BIND_SERVICE.
    let o = build(&relay(SMARTHOST), &[], &ResolvedSecrets::default());
    let sysctls = pod_spec(&o)
        .security_context
        .as_ref()
        .unwrap()
        .sysctls
        .clone()
        .unwrap();
    assert_eq!(sysctls[0].name, "net.ipv4.ip_unprivileged_port_start");
    assert_eq!(sysctls[0].value, "25");
}

#[test]
fn service_settings_reach_the_service() {
    let o = build(&relay(POD_SETTINGS), &[], &ResolvedSecrets::default());
    let meta = &o.service.metadata;
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels["exposure"], "internal");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "mailrelay-operator");
    assert_eq!(
        meta.annotations.as_ref().unwrap()["service.beta.kubernetes.io/aws-load-balancer-scheme"],
        "internal"
    );
    let spec = o.service.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(
        spec.load_balancer_source_ranges.as_deref().unwrap(),
        ["10.0.0.0/8", "fd00::/16"]
    );
    // The admin Service is never exposed, whatever the SMTP one is.
    let admin = o.admin_service.spec.as_ref().unwrap();
    assert_eq!(admin.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(admin.load_balancer_source_ranges, None);
    assert!(
        !o.admin_service
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .contains_key("exposure")
    );
}

#[test]
fn a_ca_bundle_is_mounted_and_is_the_smarthosts_ca_file() {
    let o = build(&relay(POD_SETTINGS), &[], &ResolvedSecrets::default());
    let cfg = rendered(&o);
    let sh = cfg.delivery.smarthost.as_ref().unwrap();
    assert_eq!(
        sh.ca_file.as_deref(),
        Some(Path::new("/var/run/mailrelay/ca/ca.crt"))
    );
    // MX hosts keep the public CAs: a ca_file would replace them.
    assert_eq!(cfg.delivery.ca_file, None);
    let vol = pod_spec(&o)
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == "ca-bundle")
        .unwrap();
    let cm = vol.config_map.as_ref().unwrap();
    assert_eq!(cm.name, "corp-ca");
    let items = cm.items.as_deref().unwrap();
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("ca-bundle.pem", "ca.crt")
    );

    // From a Secret instead.
    let yaml = POD_SETTINGS.replace(
        "configMap: {name: corp-ca, key: ca-bundle.pem}",
        "secret: {name: corp-ca-tls, key: ca.crt}",
    );
    let o = build(&relay(&yaml), &[], &ResolvedSecrets::default());
    let vol = pod_spec(&o)
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == "ca-bundle")
        .unwrap();
    assert!(vol.config_map.is_none());
    let s = vol.secret.as_ref().unwrap();
    assert_eq!(s.secret_name.as_deref(), Some("corp-ca-tls"));
    assert_eq!(s.items.as_deref().unwrap()[0].path, "ca.crt");

    // Without one: no volume, and the system store (ca_file unset).
    let o = build(&relay(SMARTHOST), &[], &ResolvedSecrets::default());
    assert_eq!(
        rendered(&o).delivery.smarthost.as_ref().unwrap().ca_file,
        None
    );
    assert!(
        !pod_spec(&o)
            .volumes
            .as_deref()
            .unwrap()
            .iter()
            .any(|v| v.name == "ca-bundle")
    );
}

#[test]
fn shutdown_settle_and_grace_reach_the_relay_and_the_termination_grace() {
    // Defaults: settle 10s, grace 30s, plus a 15s margin.
    let o = build(&relay(MINIMAL), &[], &ResolvedSecrets::default());
    let cfg = rendered(&o);
    assert_eq!(cfg.shutdown_settle, std::time::Duration::from_secs(10));
    assert_eq!(cfg.shutdown_grace, std::time::Duration::from_secs(30));
    assert_eq!(pod_spec(&o).termination_grace_period_seconds, Some(55));
    // No preStop hook: the image has no shell, and the relay settles by itself.
    assert!(container(&o).lifecycle.is_none());

    let o = build(&relay(POD_SETTINGS), &[], &ResolvedSecrets::default());
    let cfg = rendered(&o);
    assert_eq!(cfg.shutdown_settle, std::time::Duration::from_secs(20));
    assert_eq!(cfg.shutdown_grace, std::time::Duration::from_secs(120));
    assert_eq!(pod_spec(&o).termination_grace_period_seconds, Some(155));

    // Sub-second parts round the pod's grace up, never down.
    let yaml = MINIMAL.to_owned() + "  shutdown: {settle: 1500ms, grace: 0s}\n";
    let o = build(&relay(&yaml), &[], &ResolvedSecrets::default());
    assert_eq!(pod_spec(&o).termination_grace_period_seconds, Some(17));
}

#[test]
fn loopback_may_always_relay_so_port_forwarded_mail_is_taken() {
    for (yaml, want) in [
        (MINIMAL.to_owned(), vec!["127.0.0.0/8", "::1/128"]),
        (
            MINIMAL.to_owned() + "  relayNetworks: [10.0.0.0/8]\n",
            vec!["10.0.0.0/8", "127.0.0.0/8", "::1/128"],
        ),
        // Already covered: not repeated.
        (
            MINIMAL.to_owned() + "  relayNetworks: [127.0.0.0/8, '::1/128']\n",
            vec!["127.0.0.0/8", "::1/128"],
        ),
    ] {
        let o = build(&relay(&yaml), &[], &ResolvedSecrets::default());
        let nets: Vec<String> = rendered(&o)
            .relay_networks
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, want, "{yaml}");
    }
    // A mesh sidecar intercepting the SMTP ports would make every client loopback.
    let o = build(&relay(POD_SETTINGS), &[], &ResolvedSecrets::default());
    let ann = template_annotation(
        &o.deployment,
        "traffic.sidecar.istio.io/excludeInboundPorts",
    );
    assert_eq!(ann.as_deref(), Some("2525,2587"));
    for key in resources::MESH_SKIP_INBOUND {
        assert_eq!(
            template_annotation(&o.deployment, key).as_deref(),
            Some("2525,2587"),
            "{key}"
        );
    }
    // ...and a user's pod annotation cannot turn interception back on.
    let yaml = POD_SETTINGS.replace(
        "podAnnotations: {team.example.com/owner: mail}",
        "podAnnotations: {config.linkerd.io/skip-inbound-ports: ''}",
    );
    let o = build(&relay(&yaml), &[], &ResolvedSecrets::default());
    assert_eq!(
        template_annotation(&o.deployment, "config.linkerd.io/skip-inbound-ports").as_deref(),
        Some("2525,2587")
    );
}

/// Runs the project's one Pod Security checker (`charts/tests/pod_security.py`,
/// which the chart test uses too) on `deployments`; its exit status and output.
fn pod_security(deployments: &[Deployment]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = deployments
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let f = dir.path().join(format!("{i}-{}.json", d.name_any()));
            std::fs::write(&f, serde_json::to_vec(d).unwrap()).unwrap();
            f
        })
        .collect();
    let out = std::process::Command::new("python3")
        .arg(root().join("../charts/tests/pod_security.py"))
        .args(&files)
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn pods_stay_within_pod_security_restricted() {
    let built: Vec<Deployment> = [
        MINIMAL,
        SMARTHOST,
        URL_SECRET,
        SENTINEL,
        POD_SETTINGS,
        SENDER_BINDING,
        &example("mailrelay.yaml"),
    ]
    .iter()
    .map(|yaml| build(&relay(yaml), &[], &ResolvedSecrets::default()).deployment)
    .collect();
    let (ok, out) = pod_security(&built);
    assert!(ok, "{out}");
    assert!(out.contains("7 pod template(s) checked"), "{out}");
}

#[test]
fn the_pod_security_check_fails_a_relay_pod_made_unsafe() {
    let good = build(&relay(MINIMAL), &[], &ResolvedSecrets::default()).deployment;
    let mut bad = serde_json::to_value(&good).unwrap();
    let pod = &mut bad["spec"]["template"]["spec"];
    pod["hostNetwork"] = true.into();
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = true.into();
    pod["containers"][0]["securityContext"]["capabilities"]["add"] =
        serde_json::json!(["NET_ADMIN"]);
    pod["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "host", "hostPath": {"path": "/var/run"}}));
    let bad: Deployment = serde_json::from_value(bad).unwrap();
    let (ok, out) = pod_security(&[good, bad]);
    assert!(!ok, "{out}");
    for needle in [
        "spec.hostNetwork",
        "allowPrivilegeEscalation must be false",
        "capability NET_ADMIN",
        "hostPath volumes are not allowed",
    ] {
        assert!(out.contains(needle), "{needle} not reported:\n{out}");
    }
    assert!(out.contains("Deployment minimal"), "{out}");
}

#[test]
fn bad_pod_settings_are_refused_naming_the_field() {
    for (from, to, field) in [
        (
            "name: RUST_LOG",
            "name: MAILRELAY_REDIS_URL",
            "spec.env[0].name",
        ),
        (
            "- name: scratch\n",
            "- name: config\n",
            "spec.volumes[0].name",
        ),
        (
            "{name: scratch, mountPath: /var/lib/scratch}",
            "{name: nowhere, mountPath: /var/lib/scratch}",
            "spec.volumeMounts[0].name",
        ),
        (
            "mountPath: /var/lib/scratch",
            "mountPath: /etc/mailrelay/x",
            "spec.volumeMounts[0].mountPath",
        ),
        (
            "mountPath: /var/lib/scratch",
            "mountPath: /tmp",
            "spec.volumeMounts[0].mountPath",
        ),
        (
            "[10.0.0.0/8, 'fd00::/16']",
            "[10.0.0.0/8, 'fd00::/300']",
            "spec.service.loadBalancerSourceRanges[1]",
        ),
        ("settle: 20s", "settle: 20 seconds", "spec.shutdown.settle"),
        ("settle: 20s", "settle: 6m", "spec.shutdown.settle"),
        ("grace: 2m", "grace: 2h", "spec.shutdown.grace"),
    ] {
        assert!(POD_SETTINGS.contains(from), "{from}");
        let e = build_err(&POD_SETTINGS.replacen(from, to, 1));
        assert_eq!(e.field, field, "{to}: {e}");
    }
}

/// Tenants bound to their senders: two AUTH users and one relay network.
const SENDER_BINDING: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: shared, namespace: mail}
spec:
  hostname: relay.example.com
  redis: {url: 'redis://redis:6379'}
  tls: {secretName: relay-tls}
  auth: {secretName: relay-users}
  relayNetworks: [10.1.0.0/16]
  senderBinding:
    required: true
    checkFromHeader: true
    users:
      - {user: payments, senders: [payments.example, '*.payments.example', '<>']}
      - {user: alerts, senders: ['alerts-?@ops.example']}
    networks:
      - {network: 10.1.2.0/24, senders: ['*@batch.example']}
";

#[test]
fn golden_sender_binding() {
    golden(
        "sender-binding",
        &build(&relay(SENDER_BINDING), &[], &ResolvedSecrets::default()).to_yaml(),
    );
}

#[test]
fn the_sender_binding_reaches_the_relay_config_as_the_relay_reads_it() {
    let o = build(&relay(SENDER_BINDING), &[], &ResolvedSecrets::default());
    // `rendered` parses the ConfigMap with the relay's own loader (which validates).
    let b = rendered(&o)
        .sender_binding
        .expect("sender_binding rendered");
    assert!(b.required && b.check_from_header);
    assert_eq!(
        b.users["payments"],
        ["payments.example", "*.payments.example", "<>"]
    );
    assert_eq!(b.users["alerts"], ["alerts-?@ops.example"]);
    assert_eq!(b.networks.len(), 1);
    assert_eq!(b.networks[0].network.to_string(), "10.1.2.0/24");
    assert_eq!(b.networks[0].senders, ["*@batch.example"]);

    // The policy the relay builds from it decides as the spec says.
    let policy = mailrelay_smtp::sender::SenderPolicy::new(&b.binding());
    let check = |user: &str, sender: &str| policy.check(Some(user), None, sender, "mail_from");
    assert_eq!(check("payments", "billing@payments.example"), None);
    assert_eq!(check("payments", "x@eu.payments.example"), None);
    assert_eq!(
        check("payments", ""),
        None,
        "<> (an empty reverse-path) where listed"
    );
    let refused = check("payments", "ceo@other-tenant.example").expect("refused");
    assert_eq!(refused.rule, "sender_binding.users.payments");
    assert!(check("alerts", "").is_some(), "<> only where listed");
    let net = policy.check(
        None,
        Some("10.1.2.9".parse().unwrap()),
        "a@batch.example",
        "mail_from",
    );
    assert_eq!(net, None);
    assert!(
        policy
            .check(
                None,
                Some("10.1.3.9".parse().unwrap()),
                "a@batch.example",
                "mail_from"
            )
            .is_some(),
        "required: an unbound relay network is refused"
    );

    // Absent: no binding, any sender (as before the field existed).
    let o = build(&relay(MINIMAL), &[], &ResolvedSecrets::default());
    assert_eq!(rendered(&o).sender_binding, None);
}

#[test]
fn bad_sender_bindings_are_refused_naming_the_field() {
    for (from, to, field) in [
        (
            "'alerts-?@ops.example'",
            "'a@b@ops.example'",
            "spec.senderBinding.users[1].senders[0]",
        ),
        (
            "'*.payments.example'",
            "'<ceo@payments.example>'",
            "spec.senderBinding.users[0].senders[1]",
        ),
        (
            "senders: ['*@batch.example']",
            "senders: []",
            "spec.senderBinding.networks[0].senders",
        ),
        (
            "network: 10.1.2.0/24",
            "network: 10.9.0.0/24",
            "spec.senderBinding.networks[0].network",
        ),
        (
            "network: 10.1.2.0/24",
            "network: 10.1.2.0",
            "spec.senderBinding.networks[0].network",
        ),
        (
            "{user: alerts,",
            "{user: payments,",
            "spec.senderBinding.users[1].user",
        ),
    ] {
        assert!(SENDER_BINDING.contains(from), "{from}");
        let e = build_err(&SENDER_BINDING.replacen(from, to, 1));
        assert_eq!(e.field, field, "{to}: {e}");
    }
}

const RULES: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: rules, namespace: mail}
spec:
  hostname: relay.example.com
  redis: {url: 'redis://redis:6379'}
  providers:
    presets: [testprovider]
    overrides:
      testprovider:
        rules:
          testprovider-rate: {duration: 30m}
  responseRules:
    - name: yahoo-tss04
      destination: {mxHosts: ['*.yahoodns.net']}
      match: {codes: [421, '4xx'], enhanced: ['4.7.0'], text: '\\[TSS04\\]', stages: [mail, rcpt]}
      action: suspend
      scope: tenant
      tenantKey: dkimDomain
      duration: 10m
";

/// `spec.responseRules` and `spec.providers` reach the relay config as written;
/// bad ones are refused naming the MailRelay field.
#[test]
fn response_rules_and_presets_reach_the_relay_config() {
    let o = build(&relay(RULES), &[], &ResolvedSecrets::default());
    let cfg = rendered(&o);
    assert_eq!(cfg.response_rules.len(), 1);
    let r = &cfg.response_rules[0];
    assert_eq!(r.name, "yahoo-tss04");
    assert_eq!(
        r.tenant_key,
        Some(mailrelay::config::rules::TenantKey::DkimDomain)
    );
    assert_eq!(r.duration, Some(std::time::Duration::from_secs(600)));
    assert_eq!(cfg.providers.presets, ["testprovider"]);
    for (from, to, field) in [
        (
            "'\\[TSS04\\]'",
            "'(unclosed'",
            "spec.responseRules[0].match.text",
        ),
        (
            "duration: 10m",
            "duration: 8d",
            "spec.responseRules[0].duration",
        ),
        (
            "presets: [testprovider]",
            "presets: [nosuch]",
            "spec.providers.presets[0]",
        ),
        (
            "destination: {mxHosts: ['*.yahoodns.net']}",
            "destination: {}",
            "spec.responseRules[0].destination",
        ),
    ] {
        assert!(RULES.contains(from), "{from}");
        let e = build_err(&RULES.replacen(from, to, 1));
        assert_eq!(e.field, field, "{to}: {e}");
    }
}

#[test]
fn webhooks_reach_the_relay_with_their_keys_projected_from_secrets() {
    let yaml = format!(
        "{SMARTHOST}  webhooks:\n\
         \x20   - name: shop\n\
         \x20     url: https://hooks.shop.example/mail\n\
         \x20     secretRef: {{name: shop-hooks, key: hmac}}\n\
         \x20     tenants: {{senderDomains: [shop.example]}}\n\
         \x20     kinds: [delivered, bounced, dsn_sent]\n\
         \x20   - name: ops\n\
         \x20     url: https://ops.example/events\n\
         \x20     secretRef: {{name: ops-hooks, key: key}}\n\
         \x20     tenants: {{all: true}}\n\
         \x20     batch: {{maxEvents: 500, linger: 2s}}\n"
    );
    let o = build(&relay(&yaml), &[], &ResolvedSecrets::default());
    let cfg = rendered(&o);
    assert_eq!(cfg.webhooks.len(), 2);
    let shop = &cfg.webhooks[0];
    // No batch field: the relay's defaults; a batch field: what it says.
    assert_eq!(shop.batch, WebhookBatch::default());
    assert_eq!(
        cfg.webhooks[1].batch,
        WebhookBatch {
            max_events: 500,
            linger: std::time::Duration::from_secs(2),
        }
    );
    assert_eq!(shop.url, "https://hooks.shop.example/mail");
    assert_eq!(
        shop.secret_file.as_deref(),
        Some(Path::new("/var/run/mailrelay/webhooks/shop"))
    );
    assert_eq!(shop.tenants.sender_domains, ["shop.example"]);
    assert_eq!(shop.kinds, ["delivered", "bounced", "dsn_sent"]);
    assert!(cfg.webhooks[1].tenants.all);
    let vol = pod_spec(&o)
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == "webhooks")
        .unwrap();
    let sources = vol.projected.as_ref().unwrap().sources.as_deref().unwrap();
    let s = sources[0].secret.as_ref().unwrap();
    assert_eq!(s.name, "shop-hooks");
    let item = &s.items.as_deref().unwrap()[0];
    assert_eq!((item.key.as_str(), item.path.as_str()), ("hmac", "shop"));
    assert_eq!(sources[1].secret.as_ref().unwrap().name, "ops-hooks");
    let mount = container(&o)
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|m| m.name == "webhooks")
        .unwrap();
    assert_eq!(mount.mount_path, "/var/run/mailrelay/webhooks");

    // Without webhooks: no volume.
    let o = build(&relay(SMARTHOST), &[], &ResolvedSecrets::default());
    assert!(
        pod_spec(&o)
            .volumes
            .as_deref()
            .unwrap()
            .iter()
            .all(|v| v.name != "webhooks")
    );

    // Plain HTTP and tenants naming nobody are refused, naming the field (the
    // CRD's rule refuses http:// too, where CEL runs).
    let e = build_err(&format!(
        "{SMARTHOST}  webhooks:\n    - {{name: a, url: 'http://x/', secretRef: {{name: s, key: k}}, tenants: {{all: true}}}}\n"
    ));
    assert_eq!(e.field, "spec.webhooks[0].url", "{e:?}");
    assert!(e.message.contains("not HTTPS"), "{e:?}");
    let e = build_err(&format!(
        "{SMARTHOST}  webhooks:\n    - {{name: a, url: 'https://x/', secretRef: {{name: s, key: k}}, tenants: {{}}}}\n"
    ));
    assert_eq!(e.field, "spec.webhooks[0].tenants", "{e:?}");
}

#[test]
fn webhook_batches_reach_the_relay_and_bad_ones_name_the_field() {
    let hook = |batch: &str| {
        format!(
            "{SMARTHOST}  webhooks:\n    - {{name: a, url: 'https://x/', secretRef: {{name: s, key: k}}, \
             tenants: {{all: true}}, batch: {batch}}}\n"
        )
    };
    let build_ok = |batch: &str| build(&relay(&hook(batch)), &[], &ResolvedSecrets::default());
    // One event per POST with no linger.
    let cfg = rendered(&build_ok("{maxEvents: 1, linger: 0s}"));
    assert_eq!(cfg.webhooks[0].batch.max_events, 1);
    assert!(cfg.webhooks[0].batch.linger.is_zero());
    // One field alone keeps the other's default.
    let cfg = rendered(&build_ok("{linger: 250ms}"));
    assert_eq!(cfg.webhooks[0].batch.max_events, 100);
    assert_eq!(
        cfg.webhooks[0].batch.linger,
        std::time::Duration::from_millis(250)
    );
    let o = build_ok("{maxEvents: 20}");
    let text = &o.config_map.data.as_ref().unwrap()["mailrelay.yaml"];
    assert!(text.contains("max_events: 20"), "{text}");
    assert_eq!(
        rendered(&o).webhooks[0].batch.linger,
        WebhookBatch::default().linger
    );

    // Where the CRD's schema did not run, the operator refuses the same bounds,
    // naming the field as the spec spells it.
    for (batch, field, says) in [
        (
            "{maxEvents: 0}",
            "spec.webhooks[0].batch.maxEvents",
            "not between 1 and 1000",
        ),
        (
            "{maxEvents: 1001}",
            "spec.webhooks[0].batch.maxEvents",
            "not between 1 and 1000",
        ),
        (
            "{linger: 11s}",
            "spec.webhooks[0].batch.linger",
            "at most 10s",
        ),
        ("{linger: soon}", "spec.webhooks[0].batch.linger", ""),
    ] {
        let e = build_err(&hook(batch));
        assert_eq!(e.field, field, "{batch}: {e:?}");
        assert!(e.message.contains(says), "{batch}: {e:?}");
    }
}

const TENANT_QUOTA: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: SendQuota
metadata: {name: tenant-a, namespace: mail}
spec:
  direction: ingress
  limits: [1000/1h]
  match: {senders: ['*@a.example', 'alerts-*@b.example'], authUsers: [tenant-a]}
  responseRules:
    - name: gmail-rate
      destination: {mxHosts: ['*.google.com']}
      match: {codes: [421], enhanced: ['4.7.28']}
      action: suspend
      duration: 30m
";

/// An ingress SendQuota's senders and AUTH users become its rules' sender
/// filter in the relay config (golden), which the relay reads and compiles.
#[test]
fn golden_quota_rules_carry_the_quotas_senders() {
    let r = relay(MINIMAL);
    let quotas: Vec<SendQuota> = vec![serde_norway::from_str(TENANT_QUOTA).unwrap()];
    let (ok, bad) = select_quotas(&r, &quotas);
    assert!(bad.is_empty(), "{bad:?}");
    let (rules, refused) = resources::config::select_quota_rules(&r, &quotas);
    assert!(refused.is_empty(), "{refused:?}");
    let o = resources::build(Inputs {
        relay: &r,
        quotas: ok,
        quota_rules: rules,
        secrets: &ResolvedSecrets::default(),
        default_image: IMAGE,
    })
    .unwrap();
    golden("quota-rules", &o.to_yaml());
    let cfg = rendered(&o);
    let rule = &cfg.response_rules[0];
    assert_eq!(rule.name, "tenant-a.gmail-rate");
    assert_eq!(rule.matcher.senders, ["*@a.example", "alerts-*@b.example"]);
    assert_eq!(rule.matcher.auth_users, ["tenant-a"]);
    mailrelay::shaping::Rules::from_config(&cfg).unwrap();
}
