//! Pure builders: a MailRelay (with its SendQuotas and what the operator learnt
//! about its Secrets) becomes the objects that run it. No IO here: the reconciler
//! applies what these return, and golden tests pin them down.

pub mod autoscaling;
pub mod config;
pub mod deployment;
pub mod dkim;
pub mod network;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Service, ServiceAccount, ServicePort, ServiceSpec as CoreServiceSpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use mailrelay::quota::config::QuotaConfig;
use sha2::{Digest, Sha256};

use self::config::{CONFIG_FILE, SpecError, TERMINATION_MARGIN, shutdown_durations};
use self::deployment::{check_pod_extras, deployment};
use crate::crd::{ADMIN_PORT, MailRelay, ServiceType, TrafficPolicy, relay_labels};

/// Pod-template annotation: hash of the relay config without its quotas, response
/// rules and presets. A change rolls the pods; a change of those does not (the
/// relay reloads the mounted file).
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
    /// The response rules of the SendQuotas selecting it, after its own
    /// (`config::select_quota_rules`).
    pub quota_rules: Vec<mailrelay::config::rules::ResponseRule>,
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
    let cfg =
        config::relay_config_with_rules(relay, inputs.quotas.clone(), inputs.quota_rules.clone())?;
    let yaml = crate::render_relay_config(&cfg).map_err(|e| SpecError {
        field: "spec".into(),
        message: e.to_string(),
    })?;
    // What the relay reloads on its own stays out, so changing it rolls no pod.
    let mut without_quotas = cfg.clone();
    without_quotas.quotas.clear();
    without_quotas.response_rules.clear();
    without_quotas.providers = Default::default();
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

/// The owner reference every object of `relay` carries.
pub fn owner_ref(relay: &MailRelay) -> Option<OwnerReference> {
    relay.controller_owner_ref(&())
}
