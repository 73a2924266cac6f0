//! The schema of `spec.responseRules` (MailRelay and SendQuota): the relay's own
//! `ResponseRule` type, with the bounds and CEL rules the API server needs to
//! refuse a bad rule at `kubectl apply`, naming the field. The relay's derive
//! knows nothing of Kubernetes (no lengths, no CEL), so they are added here.
//!
//! What CEL cannot check (a regex that does not compile, a duration outside
//! 1s..7d, a name used twice across resources) the operator checks when it renders
//! the relay config, and reports on the resource.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Value, json};

use super::sendquota::LIMIT_PATTERN;
use mailrelay::config::rules::ResponseRule;

/// Rules one SendQuota may carry.
pub const MAX_QUOTA_RULES: usize = 64;
/// Rules one MailRelay may carry.
pub const MAX_RELAY_RULES: usize = 256;
/// A rule's name: what the relay accepts.
pub const RULE_NAME_PATTERN: &str = r"^[A-Za-z0-9._-]{1,63}$";
/// `4.7.28`, `4.7.*`.
const ENHANCED_PATTERN: &str = r"^([0-9]{1,3}|\*)\.([0-9]{1,3}|\*)\.([0-9]{1,3}|\*)$";
/// A duration like `30s`, `10m`, `1h`, `2d`.
const DURATION_PATTERN: &str = r"^[0-9]+(ms|s|m|h|d)?$";

/// At least one destination selector (a rule about no destination is refused).
pub const HAS_DESTINATION: &str = "has(r.destination) && ((has(r.destination.mxHosts) && size(r.destination.mxHosts) > 0) || (has(r.destination.destinationDomains) && size(r.destination.destinationDomains) > 0) || (has(r.destination.smarthost) && r.destination.smarthost))";

/// `spec.responseRules` of a MailRelay: each rule names its destination.
pub fn relay_rules_schema(generator: &mut SchemaGenerator) -> Schema {
    rules_schema(generator, MAX_RELAY_RULES, true)
}

/// `spec.responseRules` of a SendQuota: a rule without destination takes the
/// quota's (an egress quota's `match`), checked by a rule on the spec.
pub fn quota_rules_schema(generator: &mut SchemaGenerator) -> Schema {
    rules_schema(generator, MAX_QUOTA_RULES, false)
}

fn rules_schema(generator: &mut SchemaGenerator, max: usize, need_destination: bool) -> Schema {
    let mut item: Value = ResponseRule::json_schema(generator).to_value();
    harden(&mut item);
    if need_destination {
        push_rule(
            &mut item,
            &HAS_DESTINATION.replace("r.", "self."),
            "give at least one of destination.mxHosts, destination.destinationDomains or destination.smarthost: true",
            ".destination",
        );
    }
    let schema = json!({
        "type": "array",
        "items": item,
        "maxItems": max,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    });
    Schema::try_from(schema).expect("an object is a schema")
}

fn prop<'a>(v: &'a mut Value, path: &[&str]) -> &'a mut Value {
    let mut v = v;
    for p in path {
        v = &mut v["properties"][*p];
    }
    v
}

fn set(v: &mut Value, extra: Value) {
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
}

fn push_rule(v: &mut Value, rule: &str, message: &str, field: &str) {
    let entry = json!({"rule": rule, "message": message, "fieldPath": field});
    match v
        .get_mut("x-kubernetes-validations")
        .and_then(Value::as_array_mut)
    {
        Some(a) => a.push(entry),
        None => v["x-kubernetes-validations"] = json!([entry]),
    }
}

/// Bounds (which also keep the CEL rules' cost estimate within the API server's
/// budget) and the rules spanning fields of one rule.
fn harden(item: &mut Value) {
    let globs =
        json!({"maxItems": 64, "items": {"type": "string", "minLength": 1, "maxLength": 253}});
    set(
        prop(item, &["name"]),
        json!({"maxLength": 63, "pattern": RULE_NAME_PATTERN}),
    );
    set(prop(item, &["destination", "mxHosts"]), globs.clone());
    set(prop(item, &["destination", "destinationDomains"]), globs);
    set(prop(item, &["match", "codes"]), json!({"maxItems": 16}));
    set(
        prop(item, &["match", "enhanced"]),
        json!({"maxItems": 16, "items": {"type": "string", "maxLength": 11, "pattern": ENHANCED_PATTERN}}),
    );
    set(prop(item, &["match", "text"]), json!({"maxLength": 1024}));
    set(prop(item, &["match", "stages"]), json!({"maxItems": 6}));
    let patterns = json!({"maxItems": 256, "items": {"type": "string", "minLength": 1, "maxLength": 320, "pattern": r"^\S+$"}});
    set(prop(item, &["match", "senders"]), patterns.clone());
    set(prop(item, &["match", "authUsers"]), patterns);
    set(
        prop(item, &["duration"]),
        json!({"maxLength": 16, "pattern": DURATION_PATTERN}),
    );
    set(
        prop(item, &["throttle", "factor"]),
        json!({"minimum": 0.0, "maximum": 1.0}),
    );
    set(
        prop(item, &["throttle", "rate"]),
        json!({"maxLength": 32, "pattern": LIMIT_PATTERN}),
    );
    set(
        prop(item, &["throttle", "maxConnections"]),
        json!({"minimum": 1, "maximum": 100000}),
    );
    for (rule, message, field) in [
        (
            "has(self.match) && ((has(self.match.codes) && size(self.match.codes) > 0) || (has(self.match.enhanced) && size(self.match.enhanced) > 0) || has(self.match.text))",
            "give at least one of match.codes, match.enhanced or match.text: an empty match would take every reply",
            ".match",
        ),
        (
            "!(self.action in ['suspend', 'throttle']) || has(self.duration)",
            "actions suspend and throttle need a duration (1s..7d)",
            ".duration",
        ),
        (
            "self.action == 'throttle' || !has(self.throttle)",
            "throttle applies to action throttle only",
            ".throttle",
        ),
        (
            "self.action != 'throttle' || (has(self.throttle) && (has(self.throttle.factor) || has(self.throttle.rate) || has(self.throttle.maxConnections)))",
            "action throttle needs throttle.factor, throttle.rate or throttle.maxConnections",
            ".throttle",
        ),
        (
            "!has(self.throttle) || !has(self.throttle.maxConnections) || !has(self.scope) || self.scope == 'site'",
            "throttle.maxConnections only with scope: site (a connection carries every tenant's mail)",
            ".throttle.maxConnections",
        ),
        (
            // Bounds exclusive: 0 would stop the mail (suspend says so), 1 slows nothing.
            "!has(self.throttle) || !has(self.throttle.factor) || (self.throttle.factor > 0.0 && self.throttle.factor < 1.0)",
            "throttle.factor must be between 0 and 1, both excluded",
            ".throttle.factor",
        ),
        (
            "(self.action == 'reclassify') == has(self.reclassify)",
            "reclassify (temporary or permanent) goes with action reclassify, and only with it",
            ".reclassify",
        ),
        (
            "!has(self.throttle) || !has(self.throttle.maxConnections) || !has(self.match) || ((!has(self.match.senders) || size(self.match.senders) == 0) && (!has(self.match.authUsers) || size(self.match.authUsers) == 0))",
            "throttle.maxConnections not with a sender filter (match.senders, match.authUsers): a connection carries every tenant's mail",
            ".throttle.maxConnections",
        ),
        (
            "!has(self.tenantKey) || (has(self.scope) && self.scope == 'tenant')",
            "tenantKey only with scope: tenant",
            ".tenantKey",
        ),
    ] {
        push_rule(item, rule, message, field);
    }
}

/// One suspension or throttle a response rule started (`mailrelay shaping`), in
/// MailRelay and SendQuota status.
#[derive(
    serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ShapingStateStatus {
    /// The MailRelay whose store holds it (SendQuota status only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// What `kubectl mailrelay shaping lift` takes: `<scope>@<site>`.
    pub id: String,
    /// The MX site (its MX host names joined by `,`), or the smarthost.
    pub site: String,
    /// `*` (every tenant's mail to the site) or `<tenantKey>:<value>`.
    pub scope: String,
    /// The rule that started it.
    pub rule: String,
    /// `suspend` or `throttle`.
    pub action: String,
    /// Rate factor of a throttle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<String>,
    /// Absolute pace of a throttle (`100/1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Connections open at once to the site under a throttle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// The remote reply that started it.
    pub reply: String,
    /// When it ends.
    pub until: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}
