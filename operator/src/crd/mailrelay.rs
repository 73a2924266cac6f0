//! `MailRelay`: one relay deployment (pods, Services, config) sharing one Redis.

// Each `printcolumn(...)` repeats `type_ = ...`, which clippy takes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{SecretKeyRef, SecretName, SecretRef};

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
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
}

fn default_replicas() -> i32 {
    2
}

fn default_listeners() -> Vec<ListenerSpec> {
    vec![ListenerSpec {
        name: "smtp".into(),
        port: 2525,
        tls: ListenerTls::Starttls,
        proxy_protocol: false,
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
    /// Port in the pod and on the Service.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    pub tls: ListenerTls,
    /// Expect a PROXY protocol v1/v2 header first (behind a load balancer that sends one).
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// TLS mode of a listener.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// Never TLS.
    None,
    /// Plain SMTP, STARTTLS offered when `spec.tls` is set.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 style); needs `spec.tls`.
    Implicit,
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
    /// STARTTLS towards recipients' MX hosts; default `opportunistic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsPolicy>,
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

/// STARTTLS policy of outbound connections.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// STARTTLS when offered, certificate not verified.
    #[default]
    Opportunistic,
    /// Only over TLS with a verified certificate; defer otherwise.
    Required,
    /// Never STARTTLS.
    Disabled,
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
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
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
