//! The relay container: image and arguments, environment, ports, resources,
//! probes and security context.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Probe,
    ResourceRequirements, SecretKeySelector, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{ADMIN_PORT, MailRelaySpec};
use crate::resources::config::{self, CONFIG_DIR, CONFIG_FILE};
use crate::resources::{CONTAINER, Inputs, RELAY_UID};

pub(super) fn relay_container(inputs: &Inputs<'_>, mounts: Vec<VolumeMount>) -> Container {
    let spec = &inputs.relay.spec;
    let env = env(spec);
    Container {
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
        ports: Some(ports(spec)),
        readiness_probe: Some(readiness_probe()),
        liveness_probe: Some(liveness_probe()),
        resources: Some(resources(spec)),
        security_context: Some(security_context()),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

/// Secrets the relay reads from its environment, then the user's `spec.env`.
fn env(spec: &MailRelaySpec) -> Vec<EnvVar> {
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
    env
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

/// One port per listener, then `admin`.
fn ports(spec: &MailRelaySpec) -> Vec<ContainerPort> {
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
    ports
}

/// `spec.resources`, or a small request.
pub(crate) fn resources(spec: &MailRelaySpec) -> ResourceRequirements {
    spec.resources
        .clone()
        .unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".into())),
                ("memory".to_owned(), Quantity("128Mi".into())),
            ])),
            ..ResourceRequirements::default()
        })
}

fn readiness_probe() -> Probe {
    http_probe("/readyz", 5, 2)
}

fn liveness_probe() -> Probe {
    Probe {
        initial_delay_seconds: Some(5),
        ..http_probe("/healthz", 10, 3)
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

fn security_context() -> SecurityContext {
    SecurityContext {
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
    }
}
