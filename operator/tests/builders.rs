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
        let r = relay(&format!("{MINIMAL}  autoscaling: {change}\n"));
        let e = resources::build(Inputs {
            relay: &r,
            quotas: vec![],
            secrets: &ResolvedSecrets::default(),
            default_image: IMAGE,
        })
        .unwrap_err();
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
    assert_eq!(routes[0].host, "smtp.partner.example");
    assert_eq!(routes[0].port, 587);
    assert_eq!(routes[0].tls, mailrelay::config::TlsPolicy::Required);
    assert_eq!(routes[0].username.as_deref(), Some("relay"));
    assert_eq!(routes[0].password, None);
    assert_eq!(routes[1].port, 25);
    assert_eq!(routes[1].username, None);
    assert_eq!(
        cfg.delivery.retry.delay_warning,
        Some(std::time::Duration::from_secs(4 * 3600))
    );
    assert_eq!(
        cfg.delivery.connect_timeout,
        std::time::Duration::from_secs(10)
    );
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
            .password
            .as_ref()
            .map(|p| p.0.as_str()),
        Some("s3cret")
    );
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
        let r = relay(&format!("{MINIMAL}  delivery: {delivery}\n"));
        let e = resources::build(Inputs {
            relay: &r,
            quotas: vec![],
            secrets: &ResolvedSecrets::default(),
            default_image: IMAGE,
        })
        .unwrap_err();
        assert_eq!(e.field, field, "{delivery}: {e}");
        assert!(e.message.contains(needle), "{delivery}: {e}");
    }
}
