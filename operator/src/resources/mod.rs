//! Pure builders: a MailRelay (with its SendQuotas and what the operator learnt
//! about its Secrets) becomes the objects that run it. No IO here: the reconciler
//! applies what these return, and golden tests pin them down.

pub mod autoscaling;
pub mod config;
pub mod dkim;
pub mod network;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec as CoreServiceSpec, Sysctl,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use mailrelay::quota::config::QuotaConfig;
use sha2::{Digest, Sha256};

use self::config::{
    AUTH_DIR, CA_DIR, CA_FILE, CONFIG_DIR, CONFIG_FILE, SpecError, TERMINATION_MARGIN, TLS_DIR,
    relay_config, shutdown_durations,
};
use crate::crd::{ADMIN_PORT, ExtraVolume, MailRelay, ServiceType, TrafficPolicy, relay_labels};

/// Pod-template annotation: hash of the relay config without its quotas. A change
/// rolls the pods; a quota-only change does not (the relay reloads the mounted file).
pub const CONFIG_HASH_ANNOTATION: &str = "mailrelay.io/config-hash";
/// Pod-template annotation: hash of the Secret values the pods get as environment
/// variables (which, unlike mounted Secrets, only a restart picks up).
pub const SECRET_HASH_ANNOTATION: &str = "mailrelay.io/secret-hash";
/// The relay container's name.
pub const CONTAINER: &str = "mailrelay";
/// The relay image's numeric user (the Dockerfile's `USER`); set explicitly so that
/// `runAsNonRoot` can be checked by the kubelet.
pub const RELAY_UID: i64 = 65532;
/// Pod annotations (one per service mesh) that keep a mesh's sidecar from
/// intercepting the listed inbound ports. An intercepting sidecar connects to the
/// relay from loopback on every client's behalf, which would make every client a
/// loopback client (loopback may relay, see `config::LOOPBACK_NETWORKS`) and hide
/// the real address from `relayNetworks`, quotas and `Received:` headers.
pub const MESH_SKIP_INBOUND: [&str; 3] = [
    "traffic.sidecar.istio.io/excludeInboundPorts",
    "config.linkerd.io/skip-inbound-ports",
    "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports",
];

/// What the reconciler learnt about the Secrets a relay references.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedSecrets {
    /// Digest of the values that reach the pods as environment variables (Redis
    /// URL and password, smarthost credentials); `None` when there are none.
    pub env_digest: Option<String>,
}

/// Everything one MailRelay is made of.
pub struct Inputs<'a> {
    pub relay: &'a MailRelay,
    /// Its quotas, already converted and checked, in name order.
    pub quotas: Vec<QuotaConfig>,
    pub secrets: &'a ResolvedSecrets,
    /// Image when the spec names none.
    pub default_image: &'a str,
}

/// The objects of one relay, in the order they are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub service: Service,
    pub admin_service: Service,
    pub pdb: PodDisruptionBudget,
    /// Without `replicas` under `spec.autoscaling`: the autoscaler owns them.
    pub deployment: Deployment,
    /// What sizes the Deployment when `spec.autoscaling` asks for it.
    pub autoscaler: Option<autoscaling::Autoscaler>,
    /// The value of [`CONFIG_HASH_ANNOTATION`].
    pub config_hash: String,
}

impl Resources {
    /// All objects as YAML documents (for golden files and `--dry-run` style output).
    pub fn to_yaml(&self) -> String {
        let docs = [
            serde_norway::to_string(&self.config_map),
            serde_norway::to_string(&self.service_account),
            serde_norway::to_string(&self.service),
            serde_norway::to_string(&self.admin_service),
            serde_norway::to_string(&self.pdb),
            serde_norway::to_string(&self.deployment),
        ];
        docs.into_iter()
            .map(|d| d.expect("k8s objects serialise"))
            .chain(self.autoscaler.as_ref().map(|a| a.to_yaml()))
            .collect::<Vec<_>>()
            .join("---\n")
    }
}

/// Name of the ConfigMap holding the relay config.
pub fn config_map_name(relay: &str) -> String {
    format!("{relay}-config")
}

/// Name of the admin Service (port `admin`, 9325).
pub fn admin_service_name(relay: &str) -> String {
    format!("{relay}-admin")
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Digest of Secret values (for [`ResolvedSecrets::env_digest`]); never the values.
pub fn secret_digest(values: &[&[u8]]) -> String {
    sha256_hex(values)
}

pub fn build(inputs: Inputs<'_>) -> Result<Resources, SpecError> {
    let relay = inputs.relay;
    let name = relay.name_any();
    let cfg = relay_config(relay, inputs.quotas.clone())?;
    let yaml = crate::render_relay_config(&cfg).map_err(|e| SpecError {
        field: "spec".into(),
        message: e.to_string(),
    })?;
    let mut without_quotas = cfg.clone();
    without_quotas.quotas.clear();
    let hash_input = crate::render_relay_config(&without_quotas).map_err(|e| SpecError {
        field: "spec".into(),
        message: e.to_string(),
    })?;
    let config_hash = sha256_hex(&[hash_input.as_bytes()]);

    let meta = |object_name: String| ObjectMeta {
        name: Some(object_name),
        namespace: relay.namespace(),
        labels: Some(relay_labels(&name)),
        owner_references: relay.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    };

    let config_map = ConfigMap {
        metadata: meta(config_map_name(&name)),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), yaml)])),
        ..ConfigMap::default()
    };
    let service_account = ServiceAccount {
        metadata: meta(name.clone()),
        // The relay never talks to the API server.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };
    let svc = relay.spec.service.clone().unwrap_or_default();
    for (i, r) in svc.load_balancer_source_ranges.iter().enumerate() {
        if r.parse::<ipnet::IpNet>().is_err() {
            return Err(SpecError {
                field: format!("spec.service.loadBalancerSourceRanges[{i}]"),
                message: format!("{r:?} is not a network like 203.0.113.0/24"),
            });
        }
    }
    check_pod_extras(&relay.spec)?;
    let service_meta = meta(name.clone());
    let mut service_labels = svc.labels.clone();
    // The operator's labels win: its watches and selectors rely on them.
    service_labels.extend(service_meta.labels.clone().unwrap_or_default());
    let service = Service {
        metadata: ObjectMeta {
            annotations: (!svc.annotations.is_empty()).then(|| svc.annotations.clone()),
            labels: Some(service_labels),
            ..service_meta
        },
        spec: Some(CoreServiceSpec {
            type_: Some(
                match svc.type_ {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .to_owned(),
            ),
            external_traffic_policy: svc.external_traffic_policy.map(|p| {
                match p {
                    TrafficPolicy::Cluster => "Cluster",
                    TrafficPolicy::Local => "Local",
                }
                .to_owned()
            }),
            load_balancer_source_ranges: (!svc.load_balancer_source_ranges.is_empty())
                .then(|| svc.load_balancer_source_ranges.clone()),
            selector: Some(selector_labels(&name)),
            ports: Some(
                relay
                    .spec
                    .listeners
                    .iter()
                    .map(|l| ServicePort {
                        name: Some(l.name.clone()),
                        port: l.service_port.unwrap_or(l.port),
                        target_port: Some(IntOrString::String(l.name.clone())),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..CoreServiceSpec::default()
        }),
        ..Service::default()
    };
    let admin_service = Service {
        metadata: meta(admin_service_name(&name)),
        spec: Some(CoreServiceSpec {
            // Never exposed outside the cluster: the probes and metrics on it are open
            // (the `/api/` part needs the admin token).
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("admin".into()),
                port: ADMIN_PORT,
                target_port: Some(IntOrString::String("admin".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..CoreServiceSpec::default()
        }),
        ..Service::default()
    };
    let pdb = PodDisruptionBudget {
        metadata: meta(name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            // One pod at a time: a draining relay finishes its sessions and hands
            // its leases back, the others keep accepting.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    let (settle, grace) = shutdown_durations(relay)?;
    let termination_grace = (settle + grace + TERMINATION_MARGIN).as_secs_f64().ceil() as i64;
    let deployment = deployment(
        &inputs,
        &name,
        meta(name.clone()),
        &config_hash,
        termination_grace,
    );
    let autoscaler = autoscaling::build(
        &relay.spec,
        &name,
        &relay.namespace().unwrap_or_default(),
        meta(name.clone()),
    )?;
    Ok(Resources {
        autoscaler,
        config_map,
        service_account,
        service,
        admin_service,
        pdb,
        deployment,
        config_hash,
    })
}

/// The labels that select a relay's pods (a subset of [`relay_labels`] that never
/// changes, as a Deployment's selector is immutable).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "mailrelay".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
    ])
}

fn secret_env(var: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: var.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// Volume names the operator gives its own volumes.
const RESERVED_VOLUMES: [&str; 7] = [
    "config",
    "tmp",
    "tls",
    "auth",
    "ca-bundle",
    "admin-token",
    dkim::VOLUME,
];

/// The backstop of the schema's rules on `env`, `volumes` and `volumeMounts`.
fn check_pod_extras(spec: &crate::crd::MailRelaySpec) -> Result<(), SpecError> {
    let err = |field: String, message: &str| SpecError {
        field,
        message: message.into(),
    };
    for (i, e) in spec.env.iter().enumerate() {
        if e.name.starts_with("MAILRELAY_") {
            return Err(err(
                format!("spec.env[{i}].name"),
                "names starting with MAILRELAY_ override the relay config: set the MailRelay field instead",
            ));
        }
    }
    for (i, v) in spec.volumes.iter().enumerate() {
        if RESERVED_VOLUMES.contains(&v.name.as_str()) {
            return Err(err(
                format!("spec.volumes[{i}].name"),
                "config, tmp, tls, auth, ca-bundle, admin-token and dkim are the operator's volume names",
            ));
        }
    }
    for (i, m) in spec.volume_mounts.iter().enumerate() {
        if !spec.volumes.iter().any(|v| v.name == m.name) {
            return Err(err(
                format!("spec.volumeMounts[{i}].name"),
                "must name a volume of spec.volumes",
            ));
        }
        let p = m.mount_path.trim_end_matches('/');
        let under = |dir: &str| p == dir || p.starts_with(&format!("{dir}/"));
        if p.is_empty()
            || p == "/etc"
            || p == "/var/run"
            || under("/tmp")
            || under(CONFIG_DIR)
            || under("/var/run/mailrelay")
        {
            return Err(err(
                format!("spec.volumeMounts[{i}].mountPath"),
                "must not be /, /etc, /var/run, or at or under /tmp, /etc/mailrelay or /var/run/mailrelay",
            ));
        }
    }
    Ok(())
}

fn extra_volume(v: &ExtraVolume) -> Volume {
    Volume {
        name: v.name.clone(),
        config_map: v.config_map.clone(),
        secret: v.secret.clone(),
        empty_dir: v.empty_dir.clone(),
        projected: v.projected.clone(),
        downward_api: v.downward_api.clone(),
        persistent_volume_claim: v.persistent_volume_claim.clone(),
        csi: v.csi.clone(),
        ..Volume::default()
    }
}

fn deployment(
    inputs: &Inputs<'_>,
    name: &str,
    meta: ObjectMeta,
    config_hash: &str,
    termination_grace_seconds: i64,
) -> Deployment {
    let spec = &inputs.relay.spec;
    let mut env = Vec::new();
    if let Some(u) = &spec.redis.url_secret {
        // Replaces the placeholder URL of the ConfigMap (`REDIS_URL_PLACEHOLDER`).
        env.push(secret_env("MAILRELAY_REDIS_URL", &u.name, &u.key));
    }
    if let Some(p) = &spec.redis.password_secret {
        env.push(secret_env("MAILRELAY_REDIS_PASSWORD", &p.name, &p.key));
    }
    if let Some(s) = spec.delivery.as_ref().and_then(|d| d.smarthost.as_ref())
        && let Some(c) = &s.credentials_secret
    {
        env.push(secret_env(
            "MAILRELAY_SMARTHOST_USERNAME",
            &c.name,
            "username",
        ));
        env.push(secret_env(
            "MAILRELAY_SMARTHOST_PASSWORD",
            &c.name,
            "password",
        ));
    }
    // The user's own (`build` refused `MAILRELAY_` names, which would override the
    // relay config behind the operator's back).
    env.extend(spec.env.iter().cloned());

    let routes = spec.delivery.as_ref().map(|d| d.routes.as_slice());
    for (i, r) in routes.unwrap_or_default().iter().enumerate() {
        if let Some(a) = &r.auth {
            env.push(secret_env(
                &config::route_password_env(i),
                &a.password_secret.name,
                &a.password_secret.key,
            ));
        }
    }

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            // A whole-directory mount (no subPath), so the kubelet updates the file
            // in place when the ConfigMap changes and the relay reloads its quotas.
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    for (vol, secret, dir) in [
        ("tls", spec.tls.as_ref(), TLS_DIR),
        ("auth", spec.auth.as_ref(), AUTH_DIR),
    ] {
        if let Some(s) = secret {
            volumes.push(Volume {
                name: vol.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(s.secret_name.clone()),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name: vol.into(),
                mount_path: dir.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }

    // The admin token the operator generates: a whole-directory mount (no subPath)
    // so a rotation reaches the running relay, which re-reads the file.
    volumes.push(Volume {
        name: "admin-token".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(crate::admin_token::secret_name(name)),
            items: Some(vec![KeyToPath {
                key: crate::admin_token::KEY.into(),
                path: crate::admin_token::KEY.into(),
                mode: None,
            }]),
            default_mode: Some(0o440),
            optional: Some(false),
        }),
        ..Volume::default()
    });
    mounts.push(VolumeMount {
        name: "admin-token".into(),
        mount_path: crate::admin_token::DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });

    // SenderDomain keys: the bundle Secret, refreshed in place by the kubelet.
    dkim::add_volume(name, &mut volumes, &mut mounts);

    if let Some(ca) = spec.delivery.as_ref().and_then(|d| d.ca_bundle.as_ref()) {
        // Only the one key, under a fixed name: the config's `ca_file` points at it.
        let items = |key: &str| {
            Some(vec![KeyToPath {
                key: key.to_owned(),
                path: CA_FILE.into(),
                mode: None,
            }])
        };
        volumes.push(Volume {
            name: "ca-bundle".into(),
            config_map: ca.config_map.as_ref().map(|r| ConfigMapVolumeSource {
                name: r.name.clone(),
                items: items(&r.key),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            secret: ca.secret.as_ref().map(|r| SecretVolumeSource {
                secret_name: Some(r.name.clone()),
                items: items(&r.key),
                default_mode: Some(0o440),
                optional: Some(false),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "ca-bundle".into(),
            mount_path: CA_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    volumes.extend(spec.volumes.iter().map(extra_volume));
    mounts.extend(spec.volume_mounts.iter().cloned());

    let mut ports: Vec<ContainerPort> = spec
        .listeners
        .iter()
        .map(|l| ContainerPort {
            name: Some(l.name.clone()),
            container_port: l.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some("admin".into()),
        container_port: ADMIN_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });

    let resources = spec
        .resources
        .clone()
        .unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".into())),
                ("memory".to_owned(), Quantity("128Mi".into())),
            ])),
            ..ResourceRequirements::default()
        });

    let mut annotations = spec.pod_annotations.clone();
    let smtp_ports = spec
        .listeners
        .iter()
        .map(|l| l.port.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for key in MESH_SKIP_INBOUND {
        annotations.insert(key.into(), smtp_ports.clone());
    }
    annotations.insert(CONFIG_HASH_ANNOTATION.into(), config_hash.into());
    if let Some(d) = &inputs.secrets.env_digest {
        annotations.insert(SECRET_HASH_ANNOTATION.into(), d.clone());
    }

    let container = Container {
        name: CONTAINER.into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| inputs.default_image.to_owned()),
        ),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec![
            "serve".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ]),
        env: (!env.is_empty()).then_some(env),
        env_from: (!spec.env_from.is_empty()).then(|| spec.env_from.clone()),
        ports: Some(ports),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(5),
            ..http_probe("/healthz", 10, 3)
        }),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RELAY_UID),
            run_as_group: Some(RELAY_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let spread = |topology_key: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: topology_key.into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(name)),
            ..LabelSelector::default()
        }),
        // Count only pods of the same revision, so a rollout does not skew.
        match_label_keys: Some(vec!["pod-template-hash".into()]),
        ..TopologySpreadConstraint::default()
    };

    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            // Under an autoscaler the field is left out, so that server-side apply
            // neither owns nor resets it (see reconcile::relay::apply_deployment).
            replicas: spec.autoscaling.is_none().then_some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(name)),
                ..LabelSelector::default()
            },
            // Keep full capacity during a rollout: a new pod is ready before an old
            // one starts draining.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some({
                        let mut labels = spec.pod_labels.clone();
                        // The operator's win: they select the pods.
                        labels.extend(relay_labels(name));
                        labels
                    }),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.to_owned()),
                    automount_service_account_token: Some(false),
                    // Settle, then grace, then a margin to close and hand leases back
                    // (`spec.shutdown`). No preStop hook: the relay itself keeps
                    // serving through the settle period (and its image has no shell
                    // for an exec `sleep`).
                    termination_grace_period_seconds: Some(termination_grace_seconds),
                    priority_class_name: spec.priority_class_name.clone(),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                        .then(|| spec.image_pull_secrets.clone()),
                    affinity: spec.affinity.clone(),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RELAY_UID),
                        run_as_group: Some(RELAY_UID),
                        fs_group: Some(RELAY_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        sysctls: unprivileged_port_start(spec),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: (!spec.node_selector.is_empty())
                        .then(|| spec.node_selector.clone()),
                    tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
                    topology_spread_constraints: Some(vec![
                        spread("topology.kubernetes.io/zone"),
                        spread("kubernetes.io/hostname"),
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// For a listener below 1024: the relay runs as non-root without capabilities, so
/// the pod lowers the first unprivileged port to it instead (a namespaced sysctl
/// that Pod Security `baseline` and `restricted` allow). Better: a port from 1024
/// up with `servicePort` for the Service.
fn unprivileged_port_start(spec: &crate::crd::MailRelaySpec) -> Option<Vec<Sysctl>> {
    let lowest = spec.listeners.iter().map(|l| l.port).min()?;
    (lowest < 1024).then(|| {
        vec![Sysctl {
            name: "net.ipv4.ip_unprivileged_port_start".into(),
            value: lowest.to_string(),
        }]
    })
}

/// The owner reference every object of `relay` carries.
pub fn owner_ref(relay: &MailRelay) -> Option<OwnerReference> {
    relay.controller_owner_ref(&())
}
