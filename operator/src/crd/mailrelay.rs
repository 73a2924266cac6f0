//! `MailRelay`: one relay deployment (pods, Services, config) sharing one Redis.

// Each `printcolumn(...)` repeats `type_ = ...`, which clippy takes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, CSIVolumeSource, ConfigMapVolumeSource, DownwardAPIVolumeSource,
    EmptyDirVolumeSource, EnvFromSource, EnvVar, LocalObjectReference,
    PersistentVolumeClaimVolumeSource, ProjectedVolumeSource, ResourceRequirements,
    SecretVolumeSource, Toleration, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{SecretKeyRef, SecretName, SecretRef};

// The relay's own enums, one definition for its config file and these resources.
pub use mailrelay::config::{TlsMode, TlsPolicy};

/// Port of the relay's admin HTTP (health, metrics, queue and quota API) in pods.
pub const ADMIN_PORT: i32 = 9325;

/// Desired state of a mail relay.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mailrelay.io",
    version = "v1alpha1",
    kind = "MailRelay",
    plural = "mailrelays",
    shortname = "mr",
    namespaced,
    status = "MailRelayStatus",
    // `kubectl scale mailrelay/x` and an HPA pointed at the MailRelay change
    // spec.replicas; the selector lets an HPA find the pods to average over.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    derive = "PartialEq",
    doc = "A Kubernetes-native SMTP relay: pods that accept mail, queue it durably in Redis and deliver it.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = "1",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(name = "Queued", type_ = "integer", json_path = ".status.queue.queued"),
    printcolumn(
        name = "Deferred",
        type_ = "integer",
        json_path = ".status.queue.deferred"
    ),
    printcolumn(
        name = "Delivered",
        type_ = "integer",
        json_path = ".status.delivery.delivered"
    ),
    printcolumn(
        name = "Bounced",
        type_ = "integer",
        json_path = ".status.delivery.bounced"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.listeners) || !self.listeners.exists(l, has(l.tls) && l.tls == 'implicit') || has(self.tls)",
        "message": "a listener with tls: implicit needs spec.tls (a certificate Secret)",
        "fieldPath": ".listeners"
    },
    {
        "rule": "!has(self.auth) || has(self.tls)",
        "message": "spec.auth needs spec.tls: SMTP AUTH is offered only over TLS",
        "fieldPath": ".auth"
    },
    {
        "rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
        "message": "each of spec.volumeMounts must name a volume of spec.volumes",
        "fieldPath": ".volumeMounts"
    },
    {
        "rule": "!has(self.events) || !has(self.events.enabled) || self.events.enabled || !has(self.webhooks) || size(self.webhooks) == 0",
        "message": "spec.events.enabled is false, but spec.webhooks read the event log",
        "fieldPath": ".events.enabled"
    }
]))]
pub struct MailRelaySpec {
    /// Relay pods. Each accepts and delivers mail; they share the queue in Redis.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Relay image; default: the operator's (`--relay-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Host name in the greeting, EHLO and `Received:` headers.
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = r"^[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*$"
        )
    )]
    pub hostname: String,
    /// SMTP listeners; each becomes a port of the Service named like the relay.
    #[serde(default = "default_listeners")]
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
        "x-kubernetes-validations" = [
            {"rule": "self.all(a, self.exists_one(b, b.port == a.port))", "message": "listener ports must be unique"},
            {"rule": "self.all(a, self.exists_one(b, (has(b.servicePort) ? b.servicePort : b.port) == (has(a.servicePort) ? a.servicePort : a.port)))", "message": "listener service ports (servicePort, or port when unset) must be unique"},
            {"rule": "self.all(l, l.port != 9325)", "message": "port 9325 is the relay's admin port"},
            {"rule": "self.all(l, l.name != 'admin')", "message": "the listener name 'admin' is reserved for the admin port"}
        ]
    ))]
    pub listeners: Vec<ListenerSpec>,
    /// Certificate for STARTTLS and implicit TLS: a `kubernetes.io/tls` Secret
    /// (`tls.crt`, `tls.key`). Renewals are picked up without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SecretName>,
    /// SMTP AUTH users: a Secret whose key `users` holds `username:password` lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<SecretName>,
    /// Client networks that may relay without authenticating. Empty: only
    /// authenticated clients may relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 64,
        "x-kubernetes-validations": [{
            "rule": "isCIDR(self) && cidr(self).prefixLength() >= (cidr(self).ip().family() == 4 ? 8 : 16)",
            "message": "must be a network like 10.0.0.0/8, no wider than /8 (IPv4) or /16 (IPv6): a wider one would make an open relay"
        }]
    }))]
    pub relay_networks: Vec<String>,
    /// The queue store. Relay pods are stateless: accepted mail lives in Redis.
    pub redis: RedisSpec,
    /// Outbound delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
    /// Message and connection limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// The SMTP Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,
    /// Resources of the relay container; default: requests of 100m CPU and 128Mi.
    /// The relay runs a worker thread per CPU of the CPU limit, else of the request,
    /// rounded up (the default: one thread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the relay pods must run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the relay pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Extra annotations on the relay pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Let an autoscaler size the relay Deployment: the operator renders a
    /// HorizontalPodAutoscaler (or, with `keda`, a KEDA ScaledObject) and stops
    /// setting the Deployment's replicas; `replicas`, kept within `minReplicas` and
    /// `maxReplicas`, is then only its size at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Extra labels on the relay pods (not the operator's own `app.kubernetes.io/`
    /// name, instance and managed-by labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!('app.kubernetes.io/name' in self) && !('app.kubernetes.io/instance' in self) && !('app.kubernetes.io/managed-by' in self)",
        "message": "app.kubernetes.io/name, instance and managed-by are the operator's labels (they select the relay's pods)"
    }]))]
    pub pod_labels: BTreeMap<String, String>,
    /// Secrets (same namespace) with the credentials to pull the relay image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Scheduling constraints of the relay pods. The operator already spreads them
    /// over zones and nodes (topology spread, best effort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub priority_class_name: Option<String>,
    /// Extra environment variables of the relay container (e.g. `RUST_LOG`). Names
    /// starting with `MAILRELAY_` override the relay config and are the operator's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(e, !e.name.startsWith('MAILRELAY_'))",
        "message": "names starting with MAILRELAY_ override the relay config: set the MailRelay field instead"
    }]))]
    pub env: Vec<EnvVar>,
    /// Extra environment of the relay container from ConfigMaps or Secrets; `env`
    /// and the operator's own variables win over it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub env_from: Vec<EnvFromSource>,
    /// Extra volumes of the relay pods, of the types Pod Security `restricted`
    /// allows. The names `config`, `tmp`, `tls`, `auth`, `ca-bundle`,
    /// `admin-token`, `dkim` and `webhooks` are the operator's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
        "x-kubernetes-validations" = [{
            "rule": "self.all(v, !(v.name in ['config', 'tmp', 'tls', 'auth', 'ca-bundle', 'admin-token', 'dkim', 'webhooks']))",
            "message": "the volume names config, tmp, tls, auth, ca-bundle, admin-token, dkim and webhooks are the operator's"
        }, {
            "rule": "self.all(v, [has(v.configMap), has(v.secret), has(v.emptyDir), has(v.projected), has(v.downwardAPI), has(v.persistentVolumeClaim), has(v.csi)].filter(x, x).size() == 1)",
            "message": "each volume has exactly one source: configMap, secret, emptyDir, projected, downwardAPI, persistentVolumeClaim or csi"
        }]
    ))]
    pub volumes: Vec<ExtraVolume>,
    /// Where the relay container mounts `volumes` (not over `/etc/mailrelay`,
    /// `/tmp` or `/var/run/mailrelay`, which are the operator's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(m, m.mountPath != '/' && m.mountPath != '/tmp' && !m.mountPath.startsWith('/tmp/') && m.mountPath != '/etc' && m.mountPath != '/etc/mailrelay' && !m.mountPath.startsWith('/etc/mailrelay/') && m.mountPath != '/var/run' && m.mountPath != '/var/run/mailrelay' && !m.mountPath.startsWith('/var/run/mailrelay/'))",
        "message": "mountPath must not be /, /etc, /var/run, or at or under /tmp, /etc/mailrelay or /var/run/mailrelay: the operator mounts the relay's config and Secrets there"
    }]))]
    pub volume_mounts: Vec<VolumeMount>,
    /// How a relay pod stops (rollouts, scale-in, node drains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<ShutdownSpec>,
    /// Who may connect to the relay pods, as a NetworkPolicy the operator renders
    /// (named like the relay). Default: on, SMTP from this namespace only. Only
    /// enforced where the cluster's network plugin enforces NetworkPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,
    /// Which senders each SMTP AUTH user and each `relayNetworks` client may use:
    /// any other `MAIL FROM` (and, with `checkFromHeader`, `From:` address) is
    /// refused with `550 5.7.1` naming the rule. Absent: any sender, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_binding: Option<SenderBindingSpec>,
    /// DKIM: what happens to mail whose `From:` domain no SenderDomain signs for.
    /// The keys come from the SenderDomains selecting this relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim: Option<RelayDkimSpec>,
    /// Shipped provider presets to enable (`[gmail, yahoo]` or `[all]`) and
    /// overrides of their values; see docs/response-rules.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub providers: Option<mailrelay::config::rules::ProvidersConfig>,
    /// Response rules: what a remote reply means for a destination (suspend,
    /// throttle, reclassify, bounce), scoped to the site or to the tenant it
    /// concerns; evaluated before the presets' rules, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::rules::relay_rules_schema")]
    pub response_rules: Vec<mailrelay::config::rules::ResponseRule>,
    /// HTTPS endpoints that receive this relay's delivery events (accepted,
    /// delivered, deferred, bounced, …) of the tenants they name, as
    /// CloudEvents-style JSON signed with HMAC-SHA256 (the key from a Secret).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub webhooks: Vec<WebhookSpec>,
    /// The delivery event log: on or off, and how many events it keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsSpec>,
}

/// One entry of `spec.webhooks`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Names the endpoint in metrics and its cursor in the event store.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub name: String,
    /// `https://host[:port]/path`.
    #[schemars(length(min = 9, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.startsWith('https://')",
        "message": "webhook URLs must be https://: events and their signatures must not travel in clear"
    }]))]
    pub url: String,
    /// The Secret key holding the HMAC-SHA256 signing key (at least 16 characters).
    pub secret_ref: SecretKeyRef,
    /// Whose events the endpoint receives.
    pub tenants: WebhookTenantsSpec,
    /// Only these kinds (default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub kinds: Vec<EventKindSpec>,
    /// One POST, from connecting to the answer, like `10s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = r"^[0-9]+(ms|s|m|h)?$"))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.matches('^0+(ms|s|m|h)?$')",
        "message": "timeout must be greater than zero"
    }]))]
    pub timeout: Option<String>,
    /// Retries of an event the endpoint did not take (no answer, or not 2xx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<WebhookRetrySpec>,
    /// How events are grouped into POSTs; default up to 100 events per POST,
    /// lingering `50ms`. Retries and dead-lettering apply to a POST as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<WebhookBatchSpec>,
}

/// `spec.webhooks[].batch`: events per POST, and how long a consumer that caught
/// up waits so that the next POST carries more than a handful.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookBatchSpec {
    /// Most events per POST; default 100. Above 1 the body is a CloudEvents batch
    /// (a JSON array, `application/cloudevents-batch+json`); 1 posts each event
    /// alone (`application/cloudevents+json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_events: Option<u32>,
    /// After a POST that was not full, wait this long before reading again, like
    /// `50ms` (the default): the latency it adds to an event at most. `0s` to
    /// read again at once; at most `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = SHUTDOWN_DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('10s')",
        "message": "linger is at most 10s"
    }]))]
    pub linger: Option<String>,
}

/// `spec.webhooks[].retry`: the wait doubles from `initial` up to `max`; after
/// `maxAttempts` tries the event is dead-lettered (counted in
/// `mailrelay_webhook_dead_letters_total`, then skipped so later events flow).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookRetrySpec {
    /// Wait before the first retry; default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.matches('^0+(ms|s|m|h|d)?$')",
        "message": "initial must be greater than zero"
    }]))]
    pub initial: Option<String>,
    /// Longest wait between two tries; default `5m`; at least `initial`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    pub max: Option<String>,
    /// Tries of one event before it is dead-lettered; default 12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: Option<u32>,
}

/// `spec.events`: the delivery event log in the queue store (`kubectl mailrelay
/// events`, and what webhooks read).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventsSpec {
    /// Record delivery events; default true. `false` needs no `spec.webhooks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// About how many events are kept (the oldest go first); default 200000
    /// (about 470 bytes of Redis memory each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000000))]
    pub max_len: Option<u64>,
}

/// `spec.webhooks[].tenants`: AUTH users and sender domains, or all.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookTenantsSpec {
    /// Every tenant (an operator's own endpoint).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Mail submitted by these SMTP AUTH users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub auth_users: Vec<String>,
    /// Mail whose envelope sender is in one of these domains (exact, ASCII
    /// case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub sender_domains: Vec<String>,
}

/// A delivery event kind.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKindSpec {
    Accepted,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Suppressed,
    DsnSent,
}

impl EventKindSpec {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKindSpec::Accepted => "accepted",
            EventKindSpec::Delivered => "delivered",
            EventKindSpec::Deferred => "deferred",
            EventKindSpec::Bounced => "bounced",
            EventKindSpec::Expired => "expired",
            EventKindSpec::Suppressed => "suppressed",
            EventKindSpec::DsnSent => "dsn_sent",
        }
    }
}

/// `spec.dkim` of a MailRelay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayDkimSpec {
    /// Mail whose `From:` domain has no key: `allow` (sent unsigned, the
    /// default) or `reject` (`550 5.7.x`), so only aligned mail leaves.
    #[serde(default)]
    pub unsigned_policy: UnsignedPolicy,
    /// Exceptions per `From:` domain (`example.com`, `*.bank.example`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub unsigned_overrides: Vec<UnsignedOverrideSpec>,
}

/// The relay config's own enum: one definition for the CRD and the config file.
pub use mailrelay::config::dkim::UnsignedPolicy;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct UnsignedOverrideSpec {
    /// A domain, or `*.domain` for its subdomains.
    #[schemars(
        length(min = 3, max = 255),
        regex(
            pattern = r"^(\*\.)?([a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?$"
        )
    )]
    pub domain: String,
    pub policy: UnsignedPolicy,
}

/// The relay's NetworkPolicy: SMTP from the peers listed here; the admin port
/// (health, metrics, admin API) only from the operator, the API server's service
/// proxy and the monitoring namespace the platform configured on the operator.
/// Egress is left open: relays deliver to any MX host on the Internet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.smtpFromAnywhere) && self.smtpFromAnywhere && has(self.smtpFrom))",
    "message": "smtpFromAnywhere admits every source already: leave smtpFrom out",
    "fieldPath": ".smtpFrom"
}]))]
pub struct NetworkPolicySpec {
    /// Render the NetworkPolicy; false removes it (every source may then connect
    /// to every port of the relay pods).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Who may connect to the SMTP listeners. Unset: pods of the MailRelay's own
    /// namespace only (the safe default in a shared cluster: other tenants' pods
    /// cannot reach it). Set, it replaces that default: list `{podSelector: {}}`
    /// to keep the own namespace. An empty list admits nobody. Clients of a
    /// `LoadBalancer` or `NodePort` Service come from outside the cluster: list
    /// their networks (`cidr`), or set `smtpFromAnywhere`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub smtp_from: Option<Vec<NetworkPeer>>,
    /// Admit every source to the SMTP listeners (a relay facing the Internet).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub smtp_from_anywhere: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        NetworkPolicySpec {
            enabled: true,
            smtp_from: None,
            smtp_from_anywhere: false,
        }
    }
}

fn default_true() -> bool {
    true
}

/// One source of SMTP clients: namespaces and/or pods (by label), or a network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.cidr) != (has(self.namespaceSelector) || has(self.podSelector))",
        "message": "set either cidr or namespaceSelector/podSelector (both selectors together mean those pods in those namespaces)"
    },
    {
        "rule": "!has(self.except) || size(self.except) == 0 || has(self.cidr)",
        "message": "except needs cidr",
        "fieldPath": ".except"
    }
]))]
pub struct NetworkPeer {
    /// Namespaces whose pods may connect (`{}`: every namespace); with
    /// `podSelector`, only those pods in those namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods that may connect: in the MailRelay's namespace, or with
    /// `namespaceSelector` in the namespaces it selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// A client network, like `203.0.113.0/24` (`0.0.0.0/0` and `::/0` are every
    /// address; how a network plugin treats pod addresses under an ipBlock
    /// varies: use selectors for pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isCIDR(self)",
        "message": "must be a network like 203.0.113.0/24 or 2001:db8::/32"
    }]))]
    pub cidr: Option<String>,
    /// Networks inside `cidr` that may not connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 64,
        "x-kubernetes-validations": [{
            "rule": "isCIDR(self)",
            "message": "must be a network like 203.0.113.0/28"
        }]
    }))]
    pub except: Vec<String>,
}

/// Sender patterns: `a.example` and `*.a.example` (domains), `*@a.example` and
/// `app@a.example` (addresses, `*` and `?` globs, case-insensitive), or `<>` for the
/// null sender (bounces), which no other pattern allows.
const SENDER_PATTERN: &str = r"^(<>|[^<>\s,@]*@?[^<>\s,@]*)$";

/// Binds AUTH users and relay-network clients to their senders.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SenderBindingSpec {
    /// Refuse every sender of an AUTH user or `relayNetworks` client that has no
    /// binding here (default: such clients may use any sender).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    /// Also check the addresses of the `From:` header after DATA against the same
    /// binding (a message without `From:` is bound by its envelope only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_from_header: bool,
    /// Per AUTH user (the names of the `spec.auth` Secret's `users` lines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["user"]
    ))]
    pub users: Vec<UserSenders>,
    /// Per client network inside `spec.relayNetworks`; the most specific one wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["network"]
    ))]
    pub networks: Vec<NetworkSenders>,
}

/// The senders one AUTH user may use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserSenders {
    /// The AUTH user name.
    #[schemars(length(min = 1, max = 320), regex(pattern = r"^[^:\s]+$"))]
    pub user: String,
    /// Its sender patterns (at least one).
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 320), regex(pattern = SENDER_PATTERN))
    )]
    pub senders: Vec<String>,
}

/// The senders the clients of one network may use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSenders {
    /// A network inside `spec.relayNetworks` (CIDR).
    #[schemars(extend(
        "maxLength" = 64,
        "x-kubernetes-validations" = [{"rule": "isCIDR(self)", "message": "must be a network like 10.1.0.0/16"}]
    ))]
    pub network: String,
    /// Its sender patterns (at least one).
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 320), regex(pattern = SENDER_PATTERN))
    )]
    pub senders: Vec<String>,
}

/// An extra volume: a name and exactly one source, of the kinds Pod Security
/// `restricted` allows (so no hostPath).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtraVolume {
    /// Volume name (a DNS label), as `volumeMounts` refer to it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected: Option<ProjectedVolumeSource>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "downwardAPI"
    )]
    pub downward_api: Option<DownwardAPIVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CSIVolumeSource>,
}

/// A duration the relay and the API server both read: `10s`, `500ms`, `2m`, `1h`.
const SHUTDOWN_DURATION_PATTERN: &str = r"^[0-9]{1,6}(ms|s|m|h)$";

/// How a relay pod stops. On SIGTERM it first fails its readiness probe while
/// still accepting mail for `settle`, so that Services and load balancers stop
/// sending it new connections before it closes its listeners; then open sessions
/// get `grace` to finish. `terminationGracePeriodSeconds` is set to
/// `settle + grace + 15s` (the rest: handing leases back and closing sessions).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShutdownSpec {
    /// How long listeners keep accepting after SIGTERM while readiness fails;
    /// default `10s`. At most `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = SHUTDOWN_DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('5m')",
        "message": "settle is at most 5m"
    }]))]
    pub settle: Option<String>,
    /// How long open sessions may run on after the listeners close, before they
    /// are told `421`; default `30s`. At most `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = SHUTDOWN_DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('1h')",
        "message": "grace is at most 1h"
    }]))]
    pub grace: Option<String>,
}

fn default_replicas() -> i32 {
    2
}

fn default_listeners() -> Vec<ListenerSpec> {
    vec![ListenerSpec {
        name: "smtp".into(),
        port: 2525,
        tls: TlsMode::Starttls,
        proxy_protocol: false,
        service_port: None,
    }]
}

/// Autoscaling of the relay Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.minReplicas) ? self.minReplicas : 1) <= self.maxReplicas",
        "message": "autoscaling.minReplicas must not be greater than autoscaling.maxReplicas",
        "fieldPath": ".minReplicas"
    },
    {
        "rule": "!has(self.minReplicas) || self.minReplicas > 0 || has(self.keda)",
        "message": "autoscaling.minReplicas: 0 (scale to zero) needs autoscaling.keda: a HorizontalPodAutoscaler cannot scale to zero",
        "fieldPath": ".minReplicas"
    },
    {
        "rule": "has(self.targetCPUUtilization) || has(self.queue)",
        "message": "autoscaling needs something to scale on: set autoscaling.targetCPUUtilization, autoscaling.queue or both",
        "fieldPath": ".targetCPUUtilization"
    },
    {
        "rule": "!has(self.keda) || has(self.queue)",
        "message": "autoscaling.keda scales on the shared queue: set autoscaling.queue",
        "fieldPath": ".queue"
    }
]))]
pub struct AutoscalingSpec {
    /// Fewest relay pods; 0 (only with `keda`) stops delivery while the queue is
    /// empty, and SMTP ingress with it (see docs/operations.md).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub min_replicas: i32,
    /// Most relay pods.
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Average CPU use, in percent of the relay container's CPU request, to keep
    /// the pods at.
    #[serde(
        default,
        rename = "targetCPUUtilization",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1000))]
    pub target_cpu_utilization: Option<i32>,
    /// Scale on the shared queue, as the operator exports it per relay on its
    /// `/metrics` (`mailrelay_operator_relay_queue_*`, see docs/operations.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueScalingSpec>,
    /// Render a KEDA ScaledObject (keda.sh/v1alpha1) querying Prometheus instead of
    /// a HorizontalPodAutoscaler; needs KEDA installed in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keda: Option<KedaSpec>,
}

fn default_min_replicas() -> i32 {
    1
}

/// Queue targets. Every relay pod reports the same gauges of the shared queue, so
/// they are read with `max()` over the pods, never `sum()`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.pendingMessagesPerReplica) || has(self.oldestMessageAgeSeconds)",
    "message": "autoscaling.queue needs pendingMessagesPerReplica, oldestMessageAgeSeconds or both"
}]))]
pub struct QueueScalingSpec {
    /// Messages waiting for their first delivery attempt (queued minus deferred,
    /// `mailrelay_operator_relay_queue_pending_messages`) per relay pod. Deferred
    /// mail waits for its retry time, which more pods would not shorten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000))]
    pub pending_messages_per_replica: Option<i64>,
    /// Age in seconds of the oldest queued message
    /// (`mailrelay_operator_relay_queue_oldest_age_seconds`) to keep below, scaling
    /// in proportion. Mail deferred by an unreachable
    /// destination ages too and holds the relay at `maxReplicas`: prefer
    /// `pendingMessagesPerReplica` unless deferrals are rare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub oldest_message_age_seconds: Option<i64>,
}

/// KEDA's ScaledObject with Prometheus triggers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KedaSpec {
    /// The Prometheus that scrapes the operator's `/metrics`, like
    /// `http://prometheus-operated.monitoring.svc:9090`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^https?://[^\s]+$"))]
    pub prometheus_server_address: String,
    /// Seconds after the last active trigger before scaling to `minReplicas` (KEDA's
    /// `cooldownPeriod`); default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub cooldown_period: Option<i32>,
}

/// One SMTP listener.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSpec {
    /// Port name (an IANA service name: lower-case letters, digits and '-', at
    /// most 15 characters); used in logs, metrics and the Service.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Port the relay listens on in the pod; also the Service's port unless
    /// `servicePort` is set. Prefer one from 1024 up (e.g. 2525, 2587): the relay
    /// runs as non-root (below 1024 the operator lowers the pod's
    /// `net.ipv4.ip_unprivileged_port_start`).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    pub tls: TlsMode,
    /// Expect a PROXY protocol v1/v2 header first (behind a load balancer that sends one).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Port on the Service (e.g. 25 or 587 in front of container port 2525 or
    /// 2587); default: `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub service_port: Option<i32>,
}

/// Where the queue lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.url) != has(self.urlSecret)",
        "message": "set exactly one of spec.redis.url (inline) and spec.redis.urlSecret (the URL from a Secret)"
    },
    {
        "rule": "!has(self.url) || !(self.url.startsWith('redis+sentinel://') || self.url.startsWith('rediss+sentinel://')) || ((!has(self.cluster) || !self.cluster) && (!has(self.clusterNodes) || size(self.clusterNodes) == 0))",
        "message": "a redis+sentinel:// URL names a Sentinel-managed primary: it cannot be combined with cluster: true or clusterNodes",
        "fieldPath": ".cluster"
    }
]))]
pub struct RedisSpec {
    /// The Redis URL, inline. Exactly one of `url` and `urlSecret` is set.
    /// `redis://host:port/db`, `rediss://…` (TLS) or `unix://…`; for a Redis Cluster
    /// one node, with `cluster: true`; for Redis Sentinel
    /// `redis+sentinel://[[user]:password@]host1:port1[,host2:port2,…]/MASTER_NAME[/DB]`
    /// (`rediss+sentinel://` with TLS): the sentinels, the name of the primary they
    /// watch and the database (the user and password there are the sentinels' own;
    /// not with `cluster` or `clusterNodes`). The data nodes' password goes in
    /// `passwordSecret`; a URL that carries credentials belongs in `urlSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 1024),
        regex(
            pattern = r"^(redis|rediss|unix|redis\+unix|redis\+sentinel|rediss\+sentinel)://.+$"
        )
    )]
    pub url: Option<String>,
    /// The Redis URL from a Secret (passed to the relay as the environment variable
    /// `MAILRELAY_REDIS_URL`), in any of the forms `url` takes; instead of `url`.
    /// A change of the value restarts the relay pods. `cluster` cannot be checked
    /// against a Sentinel URL here: the operator checks it when it reads the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret: Option<SecretKeyRef>,
    /// The Redis password (with Sentinel: the data nodes' password), from a Secret
    /// (passed to the relay as an environment variable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
    /// Speak the Redis Cluster protocol.
    #[serde(default)]
    pub cluster: bool,
    /// More cluster seed nodes (URLs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key, so several relays can share one Redis; default `mr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[^{} ]+$"))]
    pub key_prefix: Option<String>,
    /// After each accepted message, wait for this many Redis replicas to confirm.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub wait_replicas: u32,
    /// How long to wait for those confirmations (`10ms`–`4s`, default `2s`); when
    /// they do not come in time (a failover left a master without replicas), the
    /// client is answered `451` and retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    pub wait_timeout: Option<String>,
}

/// Outbound delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.smarthost) || !has(self.tls)",
    "message": "delivery.tls is the policy towards MX hosts; with a smarthost, set delivery.smarthost.tls instead",
    "fieldPath": ".tls"
}]))]
pub struct DeliverySpec {
    /// STARTTLS towards recipients' MX hosts; default `auto`: what each MX host
    /// (DANE) or domain (MTA-STS) publishes decides, opportunistic where nothing is
    /// published; `dane`: DANE, else opportunistic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsPolicy>,
    /// PEM trust anchors (a private CA, say) for the smarthost and routes with
    /// `tls: required`, instead of the image's public CAs; mounted into the pods.
    /// MX hosts are always verified against the public CAs. A change takes effect
    /// when the pods restart (`kubectl rollout restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundle>,
    /// Send all mail through this host instead of the recipients' MX hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<SmarthostSpec>,
    /// Outbound connections at once per pod; default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrency: Option<u32>,
    /// Outbound connections at once per destination per pod; default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub per_destination_concurrency: Option<u32>,
    /// Messages sent over one connection; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_messages_per_connection: Option<u32>,
    /// Retry schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Age after which the sender of still undelivered mail gets one "delayed"
    /// notice (a DSN, like Postfix's `delay_warning_time`), like `4h`; shorter than
    /// `retry.maxLifetime`. Default: none is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    pub delay_warning: Option<String>,
    /// TCP connect timeout per outbound address; default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    pub connect_timeout: Option<String>,
    /// How long mail taken for delivery stays a pod's unrenewed (renewed every third
    /// of it while held): the mail of a pod that died goes to the others after this;
    /// default `30s`, at least `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    pub lease: Option<String>,
    /// Per-domain routes (a transport map): mail for these domains goes to the
    /// route's host instead of their MX hosts, ahead of any smarthost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub routes: Vec<RouteSpec>,
}

/// Mail for some domains to a fixed host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.auth) || !has(self.tls) || self.tls != 'disabled'",
    "message": "credentials are only ever sent over TLS: tls cannot be disabled with auth",
    "fieldPath": ".tls"
}]))]
pub struct RouteSpec {
    /// `example.com` (that domain) or `.example.com` (every subdomain of it). A
    /// domain listed exactly wins over a subdomain pattern, a longer pattern over a
    /// shorter; a pattern may appear in one route only.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 254,
        "pattern": r"^\.?[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*\.?$"
    }))]
    pub domains: Vec<String>,
    /// Connected to directly (its addresses, no MX lookup).
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    #[serde(default = "default_route_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// STARTTLS policy towards this host; default `opportunistic`.
    #[serde(default)]
    pub tls: TlsPolicy,
    /// SMTP AUTH towards this host (only over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RouteAuthSpec>,
}

fn default_route_port() -> i32 {
    25
}

/// Credentials of a route: the user inline, the password from a Secret (passed
/// to the relay as an environment variable; a change restarts the pods).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteAuthSpec {
    #[schemars(length(min = 1, max = 256))]
    pub username: String,
    pub password_secret: SecretKeyRef,
}

/// Where a CA bundle comes from: one key of a ConfigMap or of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.configMap) != has(self.secret)",
    "message": "set exactly one of caBundle.configMap and caBundle.secret"
}]))]
pub struct CaBundle {
    /// A ConfigMap key holding PEM certificates (e.g. from trust-manager).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<KeyRef>,
    /// A Secret key holding PEM certificates (e.g. `ca.crt` of a cert-manager Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<KeyRef>,
}

/// One key of a ConfigMap or Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct KeyRef {
    /// Name of the object (same namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in its data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A smarthost (an email provider's submission server, say).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.credentialsSecret) || !has(self.tls) || self.tls != 'disabled'",
    "message": "credentials are only ever sent over TLS: tls cannot be disabled with credentialsSecret",
    "fieldPath": ".tls"
}]))]
pub struct SmarthostSpec {
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    #[serde(default = "default_smarthost_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    pub tls: TlsPolicy,
    /// Secret with keys `username` and `password` for AUTH (only over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretRef>,
}

fn default_smarthost_port() -> i32 {
    587
}

/// A duration like `30s`, `5m`, `4h`, `5d`.
const DURATION_PATTERN: &str = r"^[0-9]+(ms|s|m|h|d)?$";

/// When deferred mail is retried.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Delay before the first retry; default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    pub first: Option<String>,
    /// Longest delay between attempts; default `4h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    pub max: Option<String>,
    /// Age after which undelivered mail is bounced; default `5d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = DURATION_PATTERN))]
    pub max_lifetime: Option<String>,
}

/// Message and connection limits (per pod).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Largest message in bytes; default 26214400 (25 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024))]
    pub max_message_size: Option<u64>,
    /// Recipients per message; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_recipients: Option<u32>,
    /// Open SMTP sessions per pod; default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: Option<u32>,
}

/// The SMTP Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.externalTrafficPolicy) || (has(self.type) && self.type != 'ClusterIP')",
        "message": "externalTrafficPolicy needs type NodePort or LoadBalancer",
        "fieldPath": ".externalTrafficPolicy"
    },
    {
        "rule": "!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0 || (has(self.type) && self.type == 'LoadBalancer')",
        "message": "loadBalancerSourceRanges needs type LoadBalancer",
        "fieldPath": ".loadBalancerSourceRanges"
    }
]))]
pub struct ServiceSpec {
    /// `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations of the SMTP Service (e.g. for the load balancer controller).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra labels of the SMTP Service (not the operator's `app.kubernetes.io/`
    /// name, instance and managed-by labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!('app.kubernetes.io/name' in self) && !('app.kubernetes.io/instance' in self) && !('app.kubernetes.io/managed-by' in self)",
        "message": "app.kubernetes.io/name, instance and managed-by are the operator's labels"
    }]))]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    /// Client networks a `LoadBalancer` Service admits (where the cloud supports it),
    /// like `203.0.113.0/24`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 64,
        "pattern": r"^(([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/[0-9]{1,3})$"
    }))]
    pub load_balancer_source_ranges: Vec<String>,
}

/// Kubernetes Service type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// `Local` keeps the client address visible to the relay (relay networks) without
/// PROXY protocol, for NodePort and LoadBalancer Services.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrafficPolicy {
    /// Spread over all nodes; the client address is the node's.
    Cluster,
    /// Only to relay pods on the receiving node; the client address is kept.
    Local,
}

/// Observed state: rollout, queue and delivery, as of the last reconcile.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailRelayStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`; `Autoscaling` with `spec.autoscaling`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Relay pods wanted (the Deployment's replicas; the `scale` subresource's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Label selector of the relay pods, as a string (the `scale` subresource's,
    /// for a HorizontalPodAutoscaler pointed at the MailRelay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Kind of the autoscaler the operator rendered (`HorizontalPodAutoscaler` or
    /// `ScaledObject`), so that it can remove it when `spec.autoscaling` changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<String>,
    /// Relay pods ready to take mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Hash of the relay config without its quotas (the pods' `mailrelay.io/config-hash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// SendQuotas in the relay config, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<String>,
    /// The queue, read from the queue store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSummary>,
    /// Recipients of finished messages since the queue store was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryCounters>,
    /// Destinations with the most deferred recipients, with their last error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_deferred: Vec<DeferredDestination>,
    /// Suspensions and throttles response rules started, in force across the
    /// relay's pods (read from the queue store; at most 50, the latest ending first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shaping: Vec<super::rules::ShapingStateStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueSummary {
    /// Messages in the queue: due, deferred and in flight.
    pub queued: u64,
    /// Queued messages that have had at least one delivery attempt.
    pub deferred: u64,
    /// Queued messages being delivered right now.
    pub in_flight: u64,
    /// Message bytes in the queue store.
    pub bytes: u64,
    /// Arrival time of the oldest queued message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_queued_at: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCounters {
    pub delivered: u64,
    pub bounced: u64,
    /// Gave up after the maximum queue lifetime.
    pub expired: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeferredDestination {
    /// Recipient domain.
    pub destination: String,
    /// Deferred recipients in this domain (in the sample read).
    pub recipients: u64,
    /// The most recent error reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<Time>,
}
