//! Network exposure of a relay: its NetworkPolicy, and which Service types the
//! platform lets a MailRelay ask for. Pure functions; the reconciler applies
//! (or, when switched off, deletes) what they return.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec as CoreNetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::config::SpecError;
use super::selector_labels;
use crate::crd::{ADMIN_PORT, MailRelay, MailRelaySpec, NetworkPeer, ServiceType, relay_labels};

/// Label every namespace carries with its own name (set by the API server since
/// Kubernetes 1.22), so a namespaceSelector can name one namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What the platform (the operator's flags, from the chart) says about who may
/// reach the relays' admin port. Every relay gets the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    /// Namespace of the operator's pods (from the downward API, `POD_NAMESPACE`).
    pub operator_namespace: String,
    /// Labels of the operator's pods (the chart's selector labels).
    pub operator_pod_labels: BTreeMap<String, String>,
    /// Where the API server's connections come from: `kubectl mailrelay` reaches
    /// the admin port through the API server's service proxy, and the API server
    /// runs outside the pod network (host network or a managed control plane), so
    /// it can only be named by address. Empty: the plugin cannot get through.
    pub api_server_cidrs: Vec<String>,
    /// Labels of the namespace(s) whose pods scrape metrics (Prometheus); the
    /// relay serves them on the admin port, so these pods reach the admin API too
    /// (which still wants its bearer token). `None`: nobody scrapes.
    pub monitoring_namespace_labels: Option<BTreeMap<String, String>>,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            operator_namespace: "default".into(),
            operator_pod_labels: BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "mailrelay-operator".to_owned(),
            )]),
            api_server_cidrs: Vec::new(),
            monitoring_namespace_labels: None,
        }
    }
}

/// Parses `k=v,k2=v2` (the flags' form of matchLabels); empty gives an empty map.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(format!("{p:?} is not a label like key=value")),
        })
        .collect()
}

/// Parses a Service type as the CRD spells it.
pub fn parse_service_type(s: &str) -> Result<ServiceType, String> {
    match s.trim() {
        "ClusterIP" => Ok(ServiceType::ClusterIP),
        "NodePort" => Ok(ServiceType::NodePort),
        "LoadBalancer" => Ok(ServiceType::LoadBalancer),
        other => Err(format!(
            "{other:?} is not a Service type: ClusterIP, NodePort or LoadBalancer"
        )),
    }
}

fn type_name(t: ServiceType) -> &'static str {
    match t {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    }
}

/// Reason of the Ready condition when a MailRelay asks for a Service type the
/// platform does not allow.
pub const SERVICE_TYPE_NOT_ALLOWED: &str = "ServiceTypeNotAllowed";

/// Whether the platform allows the Service type `spec` asks for. A NodePort or
/// LoadBalancer Service opens the relay outside the cluster (and costs money),
/// which whoever may create a MailRelay in some namespace should not decide alone.
pub fn check_service_type(spec: &MailRelaySpec, allowed: &[ServiceType]) -> Result<(), String> {
    let wanted = spec.service.as_ref().map(|s| s.type_).unwrap_or_default();
    if allowed.contains(&wanted) {
        return Ok(());
    }
    let list = allowed
        .iter()
        .map(|t| type_name(*t))
        .collect::<Vec<_>>()
        .join(", ");
    Err(format!(
        "spec.service.type: {} is not allowed by the platform (the operator allows {}; \
         its --allowed-service-types, chart value allowedServiceTypes); nothing was applied",
        type_name(wanted),
        if list.is_empty() { "none" } else { &list }
    ))
}

fn err(field: String, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

fn parse_net(field: String, s: &str) -> Result<ipnet::IpNet, SpecError> {
    s.parse::<ipnet::IpNet>()
        .map_err(|_| err(field, format!("{s:?} is not a network like 203.0.113.0/24")))
}

/// One SMTP peer, checked (the backstop of the CRD's CEL rules).
fn peer(i: usize, p: &NetworkPeer) -> Result<NetworkPolicyPeer, SpecError> {
    let field = format!("spec.networkPolicy.smtpFrom[{i}]");
    let selects = p.namespace_selector.is_some() || p.pod_selector.is_some();
    match &p.cidr {
        Some(_) if selects => Err(err(
            field,
            "set either cidr or namespaceSelector/podSelector, not both",
        )),
        None if !selects => Err(err(
            field,
            "set cidr or namespaceSelector/podSelector: an empty peer would be ambiguous",
        )),
        None if !p.except.is_empty() => Err(err(format!("{field}.except"), "except needs cidr")),
        None => Ok(NetworkPolicyPeer {
            namespace_selector: p.namespace_selector.clone(),
            pod_selector: p.pod_selector.clone(),
            ..NetworkPolicyPeer::default()
        }),
        Some(cidr) => {
            let net = parse_net(format!("{field}.cidr"), cidr)?;
            for (j, e) in p.except.iter().enumerate() {
                let ex = parse_net(format!("{field}.except[{j}]"), e)?;
                if !net.contains(&ex) {
                    return Err(err(
                        format!("{field}.except[{j}]"),
                        format!("{e} is not inside {cidr}"),
                    ));
                }
            }
            Ok(NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: net.trunc().to_string(),
                    except: (!p.except.is_empty()).then(|| p.except.clone()),
                }),
                ..NetworkPolicyPeer::default()
            })
        }
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

fn match_labels(labels: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone()),
        ..LabelSelector::default()
    }
}

/// The relay's NetworkPolicy (named like the relay), or `None` when
/// `spec.networkPolicy.enabled` is false.
///
/// It selects the relay's pods and restricts ingress only:
/// - the SMTP listeners (pod ports) from `smtpFrom`; unset, from the pods of the
///   relay's own namespace, so that in a shared cluster another tenant's pods
///   cannot submit mail through it; `smtpFromAnywhere` leaves the sources open;
/// - the admin port (health, metrics, the admin API) from the operator's pods,
///   the API server (its CIDRs, for `kubectl mailrelay`) and the monitoring
///   namespaces.
///
/// Egress stays open: a relay delivers to whatever MX host a recipient domain
/// names, anywhere on the Internet, plus Redis, DNS and smarthosts; a list of
/// allowed destinations would have to be the whole Internet. Kubelet probes are
/// not affected: NetworkPolicy never blocks a pod's own node.
pub fn network_policy(
    relay: &MailRelay,
    settings: &NetworkSettings,
) -> Result<Option<NetworkPolicy>, SpecError> {
    let spec = relay.spec.network_policy.clone().unwrap_or_default();
    if !spec.enabled {
        return Ok(None);
    }
    let name = relay.name_any();
    if spec.smtp_from_anywhere && spec.smtp_from.is_some() {
        return Err(err(
            "spec.networkPolicy.smtpFrom".into(),
            "smtpFromAnywhere admits every source already: leave smtpFrom out",
        ));
    }
    let smtp_ports: Vec<NetworkPolicyPort> =
        relay.spec.listeners.iter().map(|l| tcp(l.port)).collect();
    let mut ingress = Vec::new();
    if spec.smtp_from_anywhere {
        // No `from`: every source.
        ingress.push(NetworkPolicyIngressRule {
            ports: Some(smtp_ports),
            from: None,
        });
    } else {
        let peers = match &spec.smtp_from {
            // A bare podSelector selects pods in the policy's own namespace.
            None => vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector::default()),
                ..NetworkPolicyPeer::default()
            }],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, p)| peer(i, p))
                .collect::<Result<_, _>>()?,
        };
        // An empty `from` would admit every source: `smtpFrom: []` means nobody,
        // so the rule is left out instead.
        if !peers.is_empty() {
            ingress.push(NetworkPolicyIngressRule {
                ports: Some(smtp_ports),
                from: Some(peers),
            });
        }
    }
    let mut admin_from = vec![NetworkPolicyPeer {
        namespace_selector: Some(match_labels(&BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_owned(),
            settings.operator_namespace.clone(),
        )]))),
        pod_selector: Some(match_labels(&settings.operator_pod_labels)),
        ..NetworkPolicyPeer::default()
    }];
    admin_from.extend(settings.api_server_cidrs.iter().map(|c| NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: c.clone(),
            except: None,
        }),
        ..NetworkPolicyPeer::default()
    }));
    if let Some(labels) = &settings.monitoring_namespace_labels {
        admin_from.push(NetworkPolicyPeer {
            namespace_selector: Some(match_labels(labels)),
            ..NetworkPolicyPeer::default()
        });
    }
    ingress.push(NetworkPolicyIngressRule {
        ports: Some(vec![tcp(ADMIN_PORT)]),
        from: Some(admin_from),
    });
    Ok(Some(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: relay.namespace(),
            labels: Some(relay_labels(&name)),
            owner_references: relay.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(CoreNetworkPolicySpec {
            pod_selector: Some(match_labels(&selector_labels(&name))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }))
}
