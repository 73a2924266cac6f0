//! `SendQuota`: a limit on mail for the relays it selects; one entry of their
//! `quotas:` config, named like the resource.

// Each `printcolumn(...)` repeats `type_ = ...`, which clippy takes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The relay's own quota enums: one definition for the config file (snake_case)
// and the CRD (camelCase, the schema's spelling); see `mailrelay::config::quota`.
pub use mailrelay::config::quota::{Action, Direction, KeyBy, Scope, Unit};

/// A limit like `100/1m`: at most N in any rolling window of s/m/h/d.
pub const LIMIT_PATTERN: &str = r"^[1-9][0-9]{0,17}/([1-9][0-9]{0,5})?[smhd]$";

/// A quota on the mail of the MailRelays it selects (same namespace).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mailrelay.io",
    version = "v1alpha1",
    kind = "SendQuota",
    plural = "sendquotas",
    shortname = "sq",
    namespaced,
    status = "SendQuotaStatus",
    derive = "PartialEq",
    doc = "A send quota: rolling-window limits on accepted (ingress) or delivered (egress) mail of the selected MailRelays.",
    // InvalidSpec, Unmatchable, NoRelays and NotLoaded all leave a quota unenforced: say so
    // in plain `kubectl get sq`, with the reason under `-o wide`.
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
    printcolumn(name = "Direction", type_ = "string", json_path = ".spec.direction"),
    printcolumn(name = "Limit", type_ = "string", json_path = ".status.limit"),
    printcolumn(name = "Used", type_ = "integer", json_path = ".status.used"),
    printcolumn(name = "Remaining", type_ = "integer", json_path = ".status.remaining"),
    // A string, not a date: kubectl shows future dates as `<invalid>`.
    printcolumn(name = "Resets", type_ = "string", json_path = ".status.resetsAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.limits) && size(self.limits) > 0) || has(self.maxConnections)",
        "message": "give at least one limit like 100/1m (or maxConnections for an egress quota)",
        "fieldPath": ".limits"
    },
    {
        "rule": "self.direction == 'ingress' || !has(self.action)",
        "message": "action applies to ingress quotas only (egress quotas always hold mail in the queue)",
        "fieldPath": ".action"
    },
    {
        "rule": "self.direction == 'egress' || !has(self.maxConnections)",
        "message": "maxConnections applies to egress quotas only",
        "fieldPath": ".maxConnections"
    },
    {
        "rule": "self.direction == 'egress' || !has(self.match) || ((!has(self.match.destinationDomains) || size(self.match.destinationDomains) == 0) && (!has(self.match.mxHosts) || size(self.match.mxHosts) == 0) && !(has(self.match.smarthost) && self.match.smarthost))",
        "message": "destinationDomains, mxHosts and smarthost match egress quotas only",
        "fieldPath": ".match"
    },
    {
        "rule": "self.direction == 'ingress' || !has(self.match) || ((!has(self.match.senders) || size(self.match.senders) == 0) && (!has(self.match.authUsers) || size(self.match.authUsers) == 0) && (!has(self.match.clientNetworks) || size(self.match.clientNetworks) == 0) && (!has(self.match.recipientDomains) || size(self.match.recipientDomains) == 0))",
        "message": "senders, authUsers, clientNetworks and recipientDomains match ingress quotas only",
        "fieldPath": ".match"
    },
    {
        "rule": "self.direction == 'egress' || !has(self.key) || !(self.key in ['destinationDomain', 'mxSite'])",
        "message": "destinationDomain and mxSite are keys of egress quotas",
        "fieldPath": ".key"
    },
    {
        "rule": "self.direction == 'ingress' || !has(self.key) || !(self.key in ['sender', 'senderDomain', 'authUser', 'clientIp'])",
        "message": "sender, senderDomain, authUser and clientIp are keys of ingress quotas",
        "fieldPath": ".key"
    },
    {
        "rule": "!has(self.responseRules) || self.responseRules.all(r, (has(r.destination) && ((has(r.destination.mxHosts) && size(r.destination.mxHosts) > 0) || (has(r.destination.destinationDomains) && size(r.destination.destinationDomains) > 0) || (has(r.destination.smarthost) && r.destination.smarthost))) || (self.direction == 'egress' && has(self.match) && ((has(self.match.mxHosts) && size(self.match.mxHosts) > 0) || (has(self.match.destinationDomains) && size(self.match.destinationDomains) > 0) || (has(self.match.smarthost) && self.match.smarthost))))",
        "message": "each response rule needs a destination (mxHosts, destinationDomains or smarthost: true); only the rules of an egress quota whose match names one may leave it out and take the quota's",
        "fieldPath": ".responseRules"
    }
]))]
pub struct SendQuotaSpec {
    /// Which MailRelays (same namespace) enforce this quota; empty: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_selector: Option<LabelSelector>,
    /// `ingress`: mail clients submit to the relay. `egress`: mail the relay delivers.
    pub direction: Direction,
    /// What mail the quota counts: every listed field must match, any entry of a
    /// field may; no `match` counts all mail of its direction.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<QuotaMatch>,
    /// Rolling windows, e.g. `["100/1m", "1000/1h", "10000/1d"]`; all must allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 32, "pattern": LIMIT_PATTERN}))]
    pub limits: Vec<String>,
    /// What one unit is.
    #[serde(default)]
    pub unit: Unit,
    /// `perKey`: a counter per key (each sender gets the full limit). `shared`: one
    /// counter for all matched mail.
    // The schema's default is written out: schemars would print `Scope::default()`
    // with serde, in the config file's spelling (`per_key`), which the enum refuses.
    #[serde(default, skip_serializing_if = "is_per_key")]
    #[schemars(extend("default" = "perKey"))]
    pub scope: Scope,
    /// What tells keys apart under `scope: perKey`.
    #[serde(default)]
    pub key: KeyBy,
    /// Ingress only: `reject` tempfails at SMTP, `defer` accepts and holds the
    /// mail until the window allows it. Default `reject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Egress only: outbound connections open at once per key, over all relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_connections: Option<u32>,
    /// Response rules of this quota's mail (see docs/response-rules.md): what a
    /// remote reply means (suspend, throttle, reclassify, bounce), for the
    /// destination the rule names or, left out, the quota's own (egress `match`).
    /// They reach the selected relays as `<quota>.<rule>`, after the MailRelay's
    /// own rules and before the presets'. With `scope: tenant` and no
    /// `tenantKey`, tenants are told apart as the quota tells them: by AUTH user
    /// for `key: authUser`, else by sender domain. An ingress quota's
    /// `match.senders` / `match.authUsers` limit its rules to that mail: they take
    /// only replies to it and hold only it (then a rule may not set its own
    /// `match.senders` / `match.authUsers`, nor `throttle.maxConnections`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::rules::quota_rules_schema")]
    pub response_rules: Vec<mailrelay::config::rules::ResponseRule>,
}

/// Patterns are case-insensitive globs with `*` and `?`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaMatch {
    /// Ingress: envelope senders (`*@example.com`, `alerts-*@example.com`, `example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 320), regex(pattern = r"^\S+$"))
    )]
    pub senders: Vec<String>,
    /// Ingress: SMTP AUTH user names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 320), regex(pattern = r"^\S+$"))
    )]
    pub auth_users: Vec<String>,
    /// Ingress: client networks (CIDR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 64,
        "x-kubernetes-validations": [{"rule": "isCIDR(self)", "message": "must be a network like 10.1.0.0/16"}]
    }))]
    pub client_networks: Vec<String>,
    /// Ingress: count only recipients in these domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 320), regex(pattern = r"^\S+$"))
    )]
    pub recipient_domains: Vec<String>,
    /// Egress: recipient domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 320), regex(pattern = r"^\S+$"))
    )]
    pub destination_domains: Vec<String>,
    /// Egress: MX host names serving the destination (`*.google.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 320), regex(pattern = r"^\S+$"))
    )]
    pub mx_hosts: Vec<String>,
    /// Egress: mail sent through the smarthost.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub smarthost: bool,
}

fn is_per_key(s: &Scope) -> bool {
    *s == Scope::PerKey
}

/// Usage of the quota as the selected relays count it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendQuotaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: every selected relay reports the quota.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// MailRelays this quota selects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<String>,
    /// The window closest to its limit (over all keys and relays), e.g. `100/1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// Units used in that window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// Units left in that window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// When that window next frees units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Time>,
    /// Usage per relay, key and window; the most used keys first (at most 20 rows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<QuotaWindowStatus>,
    /// Suspensions and throttles the quota's response rules started, in force on
    /// the selected relays (as of their last status).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shaping: Vec<super::rules::ShapingStateStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaWindowStatus {
    pub relay: String,
    /// The counter's key (`*` for a shared quota).
    pub key: String,
    pub limit: String,
    pub used: u64,
    pub remaining: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Time>,
}
