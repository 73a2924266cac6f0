//! The relay Deployment, built from small parts: the container ([`container`]), the
//! volumes and their mounts ([`volumes`]), and here the pod around them (labels and
//! annotations, security context, scheduling) and the rollout.

mod container;
pub(crate) use container::resources as container_resources;
mod volumes;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile, Sysctl,
    TopologySpreadConstraint, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use self::volumes::OPERATOR_VOLUMES;
use super::config::{CONFIG_DIR, SpecError};
use super::{
    CONFIG_HASH_ANNOTATION, Inputs, MESH_SKIP_INBOUND, RELAY_UID, SECRET_HASH_ANNOTATION,
    selector_labels,
};
use crate::crd::{MailRelaySpec, relay_labels};

pub(super) fn deployment(
    inputs: &Inputs<'_>,
    name: &str,
    meta: ObjectMeta,
    config_hash: &str,
    termination_grace_seconds: i64,
) -> Deployment {
    let spec = &inputs.relay.spec;
    let (volumes, mounts) = volumes::volumes_and_mounts(name, spec);
    let container = container::relay_container(inputs, mounts);
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
            strategy: Some(rollout()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(spec, name)),
                    annotations: Some(pod_annotations(inputs, config_hash)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(
                    spec,
                    name,
                    container,
                    volumes,
                    termination_grace_seconds,
                )),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Keep full capacity during a rollout: a new pod is ready before an old one starts
/// draining.
fn rollout() -> DeploymentStrategy {
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(1)),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    }
}

fn pod_labels(spec: &MailRelaySpec, name: &str) -> BTreeMap<String, String> {
    let mut labels = spec.pod_labels.clone();
    // The operator's win: they select the pods.
    labels.extend(relay_labels(name));
    labels
}

/// The user's `spec.podAnnotations`, the service meshes' inbound-port exclusions,
/// and the hashes whose change rolls the pods.
fn pod_annotations(inputs: &Inputs<'_>, config_hash: &str) -> BTreeMap<String, String> {
    let spec = &inputs.relay.spec;
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
    annotations
}

fn pod_spec(
    spec: &MailRelaySpec,
    name: &str,
    container: Container,
    volumes: Vec<Volume>,
    termination_grace_seconds: i64,
) -> PodSpec {
    PodSpec {
        service_account_name: Some(name.to_owned()),
        automount_service_account_token: Some(false),
        // Settle, then grace, then a margin to close and hand leases back
        // (`spec.shutdown`). No preStop hook: the relay itself keeps
        // serving through the settle period (and its image has no shell
        // for an exec `sleep`).
        termination_grace_period_seconds: Some(termination_grace_seconds),
        image_pull_secrets: (!spec.image_pull_secrets.is_empty())
            .then(|| spec.image_pull_secrets.clone()),
        security_context: Some(pod_security_context(spec)),
        containers: vec![container],
        volumes: Some(volumes),
        ..scheduling(spec, name)
    }
}

/// Where the pods may run and how they spread: the user's knobs, and a spread over
/// zones and nodes.
fn scheduling(spec: &MailRelaySpec, name: &str) -> PodSpec {
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
    PodSpec {
        priority_class_name: spec.priority_class_name.clone(),
        affinity: spec.affinity.clone(),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        topology_spread_constraints: Some(vec![
            spread("topology.kubernetes.io/zone"),
            spread("kubernetes.io/hostname"),
        ]),
        ..PodSpec::default()
    }
}

fn pod_security_context(spec: &MailRelaySpec) -> PodSecurityContext {
    PodSecurityContext {
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
    }
}

/// For a listener below 1024: the relay runs as non-root without capabilities, so
/// the pod lowers the first unprivileged port to it instead (a namespaced sysctl
/// that Pod Security `baseline` and `restricted` allow). Better: a port from 1024
/// up with `servicePort` for the Service.
fn unprivileged_port_start(spec: &MailRelaySpec) -> Option<Vec<Sysctl>> {
    let lowest = spec.listeners.iter().map(|l| l.port).min()?;
    (lowest < 1024).then(|| {
        vec![Sysctl {
            name: "net.ipv4.ip_unprivileged_port_start".into(),
            value: lowest.to_string(),
        }]
    })
}

/// The backstop of the schema's rules on `env`, `volumes` and `volumeMounts`.
pub(super) fn check_pod_extras(spec: &MailRelaySpec) -> Result<(), SpecError> {
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
        if OPERATOR_VOLUMES.iter().any(|(name, _)| *name == v.name) {
            let names: Vec<&str> = OPERATOR_VOLUMES.iter().map(|(name, _)| *name).collect();
            let (last, rest) = names.split_last().expect("the operator has volumes");
            return Err(err(
                format!("spec.volumes[{i}].name"),
                &format!(
                    "{} and {last} are the operator's volume names",
                    rest.join(", ")
                ),
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
