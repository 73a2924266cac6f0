//! The `providers:` and `response_rules:` sections (provider-aware delivery): rules
//! that turn a remote server's reply into an action (suspend, throttle, reclassify,
//! bounce) for a destination, scoped to the whole MX site or to the tenant the
//! reply concerns; and the shipped provider presets, enabled by name.
//!
//! The shape is fixed in the issue note (RULES-SCHEMA): the config spells fields
//! in snake_case, the CRD in camelCase; serde reads both.
//!
//! Presets are YAML files under `src/shaping/presets/`, embedded at build time
//! (`build.rs` lists the directory), so adding a file needs no code change.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::duration::{format_duration, parse_duration};
use super::quota::Limit;

include!(concat!(env!("OUT_DIR"), "/presets.rs"));

/// The embedded preset files, `(name, YAML text)`, sorted by name.
pub fn preset_files() -> &'static [(&'static str, &'static str)] {
    PRESETS
}

/// Shortest and longest state a rule may set.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);
/// Compiled size limit of one `match.text` regex (the `regex` crate's own guard
/// against patterns that blow up).
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Rules (user and preset together) a relay accepts.
pub const MAX_RULES: usize = 512;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct ProvidersConfig {
    /// Names of shipped presets to enable; `all` enables every one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub presets: Vec<String>,
    /// Per preset name: values replacing the preset's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, PresetOverride>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub struct PresetOverride {
    /// Replaces the preset's connection cap per MX site.
    #[serde(alias = "maxConnections", skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Replaces the preset's limits (`[]` = no rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schemars", schemars(with = "Option<Vec<String>>"))]
    pub limits: Option<Vec<Limit>>,
    /// Per rule name of the preset: fields replacing the rule's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, RuleOverride>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub struct RuleOverride {
    /// `false` turns the preset rule off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<RuleAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<RuleScope>,
    #[serde(alias = "tenantKey", skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<TenantKey>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "schemars", schemars(with = "Option<String>"))]
    pub duration: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclassify: Option<Reclassify>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum RuleAction {
    /// No new attempts for the scope until the state ends; mail waits unattempted.
    Suspend,
    /// The scope is paced slower until the state ends.
    Throttle,
    /// This reply counts as temporary (a `5xx`) or permanent (a `4xx`).
    Reclassify,
    /// Give up on the recipient now.
    Bounce,
}

impl RuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Suspend => "suspend",
            RuleAction::Throttle => "throttle",
            RuleAction::Reclassify => "reclassify",
            RuleAction::Bounce => "bounce",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum RuleScope {
    /// Every tenant's mail to the MX site.
    #[default]
    Site,
    /// Only the mail of the tenant the reply concerns (see `tenant_key`) to the site.
    Tenant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub enum TenantKey {
    /// The domain of the envelope sender.
    #[default]
    #[serde(alias = "senderDomain")]
    SenderDomain,
    /// The domain of the `From:` header.
    #[serde(alias = "fromDomain")]
    FromDomain,
    /// The `d=` of the DKIM signature the relay added (the `From:` domain's key).
    #[serde(alias = "dkimDomain")]
    DkimDomain,
    /// The SMTP AUTH user that submitted the mail.
    #[serde(alias = "authUser")]
    AuthUser,
    /// The key of the first egress quota the destination falls under.
    #[serde(alias = "egressKey")]
    EgressKey,
}

impl TenantKey {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantKey::SenderDomain => "sender_domain",
            TenantKey::FromDomain => "from_domain",
            TenantKey::DkimDomain => "dkim_domain",
            TenantKey::AuthUser => "auth_user",
            TenantKey::EgressKey => "egress_key",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum Reclassify {
    /// A `5xx` is retried as if it were a `4xx`.
    Temporary,
    /// A `4xx` bounces as if it were a `5xx`.
    Permanent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum ReplyStage {
    Connect,
    Greeting,
    Ehlo,
    Mail,
    Rcpt,
    Data,
}

impl ReplyStage {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyStage::Connect => "connect",
            ReplyStage::Greeting => "greeting",
            ReplyStage::Ehlo => "ehlo",
            ReplyStage::Mail => "mail",
            ReplyStage::Rcpt => "rcpt",
            ReplyStage::Data => "data",
        }
    }
}

/// A basic reply code (`421`) or a class (`"4xx"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeMatch {
    Exact(u16),
    Class(u16),
}

impl CodeMatch {
    pub fn is_match(self, code: u16) -> bool {
        match self {
            CodeMatch::Exact(c) => c == code,
            CodeMatch::Class(c) => code / 100 == c,
        }
    }
}

impl Serialize for CodeMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CodeMatch::Exact(c) => s.serialize_u16(*c),
            CodeMatch::Class(c) => s.collect_str(&format_args!("{c}xx")),
        }
    }
}

impl<'de> Deserialize<'de> for CodeMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "{s:?} is not a reply code (200-599) or class like \"4xx\""
            ))
        };
        match Raw::deserialize(d)? {
            Raw::N(n) if (200..=599).contains(&n) => Ok(CodeMatch::Exact(n as u16)),
            Raw::N(n) => Err(bad(&n.to_string())),
            Raw::S(s) => {
                let t = s.trim().to_ascii_lowercase();
                if let Some(c) = t.strip_suffix("xx")
                    && let Ok(c @ 2..=5) = c.parse::<u16>()
                {
                    return Ok(CodeMatch::Class(c));
                }
                match t.parse::<u16>() {
                    Ok(n) if (200..=599).contains(&n) => Ok(CodeMatch::Exact(n)),
                    _ => Err(bad(&s)),
                }
            }
        }
    }
}

#[cfg(feature = "schemars")]
impl schemars::JsonSchema for CodeMatch {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CodeMatch".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "A reply code (421) or a class (\"4xx\")."
        })
    }
}

/// Which destinations a rule is about. At least one field; AND between fields,
/// OR inside one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub struct DestinationSelector {
    /// Globs on the MX host names (`*.google.com`).
    #[serde(alias = "mxHosts", skip_serializing_if = "Vec::is_empty")]
    pub mx_hosts: Vec<String>,
    /// Globs on the recipient domain.
    #[serde(alias = "destinationDomains", skip_serializing_if = "Vec::is_empty")]
    pub destination_domains: Vec<String>,
    /// Mail through the configured smarthost.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub smarthost: bool,
}

impl ProvidersConfig {
    pub fn is_empty(&self) -> bool {
        self.presets.is_empty() && self.overrides.is_empty()
    }
}

impl DestinationSelector {
    pub fn is_empty(&self) -> bool {
        self.mx_hosts.is_empty() && self.destination_domains.is_empty() && !self.smarthost
    }
}

/// What a reply must look like. Every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub struct ReplyMatch {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<CodeMatch>,
    /// Enhanced status code globs (`4.7.28`, `4.7.*`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub enhanced: Vec<String>,
    /// A regex (Rust `regex` syntax) on the reply text, all lines joined by `\n`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Where the reply came (default: any stage).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<ReplyStage>,
    /// Sender filter: only replies to mail of these envelope senders match, and
    /// the state the rule starts holds only their mail. Address globs
    /// (`*@shop.example`), domain globs (`shop.example`) or `<>` (the null sender),
    /// as an ingress quota's `match.senders`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub senders: Vec<String>,
    /// Sender filter: only mail submitted by these SMTP AUTH users (globs). With
    /// `senders` too, both must match.
    #[serde(alias = "authUsers", skip_serializing_if = "Vec::is_empty")]
    pub auth_users: Vec<String>,
}

impl ReplyMatch {
    /// No reply field (the sender filter alone would take every reply).
    fn is_empty(&self) -> bool {
        self.codes.is_empty() && self.enhanced.is_empty() && self.text.is_none()
    }

    /// Whether the rule is limited to some senders' mail.
    pub fn has_sender_filter(&self) -> bool {
        !self.senders.is_empty() || !self.auth_users.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub struct ThrottleSpec {
    /// Multiplies the paced rate (0 < f < 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// An absolute rate like `100/1m`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schemars", schemars(with = "Option<String>"))]
    pub rate: Option<Limit>,
    /// Connections open at once to the site (site scope only).
    #[serde(alias = "maxConnections", skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl Eq for ThrottleSpec {}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub struct ResponseRule {
    /// Unique, 1-63 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Which destinations the rule is about (a preset rule inherits its preset's).
    #[serde(default, skip_serializing_if = "DestinationSelector::is_empty")]
    pub destination: DestinationSelector,
    #[serde(rename = "match", default)]
    pub matcher: ReplyMatch,
    pub action: RuleAction,
    #[serde(default)]
    pub scope: RuleScope,
    /// With `scope: tenant`: what tells tenants apart (default `sender_domain`).
    #[serde(alias = "tenantKey", default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<TenantKey>,
    /// How long a suspend or throttle lasts (1s..7d).
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "schemars", schemars(with = "Option<String>"))]
    pub duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclassify: Option<Reclassify>,
    /// `false`: the rule is kept but never applies.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
}

/// Pacing a preset gives its provider: becomes an egress quota per MX site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresetPacing {
    pub max_connections: Option<u32>,
    pub limits: Vec<Limit>,
}

/// One shipped preset file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub title: String,
    pub destination: DestinationSelector,
    #[serde(default)]
    pub pacing: Option<PresetPacing>,
    #[serde(default)]
    pub rules: Vec<ResponseRule>,
}

mod opt_duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::N(n)) => Ok(Some(Duration::from_secs(n))),
            Some(Raw::S(s)) => parse_duration(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses one embedded preset.
pub fn parse_preset(name: &str, text: &str) -> Result<Preset, (String, String)> {
    let de = serde_norway::Deserializer::from_str(text);
    let p: Preset = serde_path_to_error::deserialize(de).map_err(|e| {
        (
            format!("providers.presets[{name}] ({name}.yaml: {})", e.path()),
            e.into_inner().to_string(),
        )
    })?;
    if p.name != name {
        return Err((
            format!("providers.presets[{name}]"),
            format!("the file {name}.yaml says name: {:?}", p.name),
        ));
    }
    Ok(p)
}

/// The presets `providers.presets` names, parsed, in the order given (`all`: every
/// embedded one, by name).
pub fn enabled_presets(p: &ProvidersConfig) -> Result<Vec<Preset>, (String, String)> {
    let mut names: Vec<&str> = Vec::new();
    for (i, n) in p.presets.iter().enumerate() {
        if n == "all" {
            names.extend(PRESETS.iter().map(|(n, _)| *n));
        } else if PRESETS.iter().chain(TEST_PRESETS).any(|(p, _)| p == n) {
            names.push(n);
        } else {
            let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            return Err((
                format!("providers.presets[{i}]"),
                format!("unknown preset {n:?} (known: {}, or all)", known.join(", ")),
            ));
        }
    }
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(*n));
    names
        .into_iter()
        .map(|n| {
            let text = PRESETS
                .iter()
                .chain(TEST_PRESETS)
                .find(|(p, _)| *p == n)
                .map(|(_, t)| *t)
                .expect("listed");
            parse_preset(n, text)
        })
        .collect()
}

/// The rules in force: user rules first, then each enabled preset's with its
/// overrides applied and its destination inherited. `field` of each names where
/// it came from, for errors.
pub fn effective_rules(
    user: &[ResponseRule],
    providers: &ProvidersConfig,
) -> Result<Vec<(String, ResponseRule)>, (String, String)> {
    let presets = enabled_presets(providers)?;
    for name in providers.overrides.keys() {
        if !presets.iter().any(|p| &p.name == name) {
            return Err((
                format!("providers.overrides.{name}"),
                format!("preset {name:?} is not enabled in providers.presets"),
            ));
        }
    }
    let mut out: Vec<(String, ResponseRule)> = user
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("response_rules[{i}]"), r.clone()))
        .collect();
    for p in presets {
        let ov = providers.overrides.get(&p.name);
        if let Some(ov) = ov {
            for rule in ov.rules.keys() {
                if !p.rules.iter().any(|r| &r.name == rule) {
                    return Err((
                        format!("providers.overrides.{}.rules.{rule}", p.name),
                        format!("preset {:?} has no rule {rule:?}", p.name),
                    ));
                }
            }
        }
        for (i, r) in p.rules.iter().enumerate() {
            let mut r = r.clone();
            if r.destination.is_empty() {
                r.destination = p.destination.clone();
            }
            let mut field = format!("providers.presets[{}].rules[{i}]", p.name);
            if let Some(o) = ov.and_then(|o| o.rules.get(&r.name)) {
                field = format!("providers.overrides.{}.rules.{}", p.name, r.name);
                if let Some(e) = o.enabled {
                    r.enabled = e;
                }
                if let Some(a) = o.action {
                    r.action = a;
                }
                if let Some(s) = o.scope {
                    r.scope = s;
                }
                if let Some(k) = o.tenant_key {
                    r.tenant_key = Some(k);
                }
                if let Some(d) = o.duration {
                    r.duration = Some(d);
                }
                if let Some(t) = o.throttle {
                    r.throttle = Some(t);
                }
                if let Some(c) = o.reclassify {
                    r.reclassify = Some(c);
                }
            }
            out.push((field, r));
        }
    }
    Ok(out)
}

/// `(preset, destination, max_connections, limits)` of one preset's pacing.
pub type PresetPacingOf = (String, DestinationSelector, Option<u32>, Vec<Limit>);

/// The egress pacing presets bring: `(preset, destination, max_connections,
/// limits)` after overrides, for presets that set any.
pub fn preset_pacing(providers: &ProvidersConfig) -> Result<Vec<PresetPacingOf>, (String, String)> {
    let mut out = Vec::new();
    for p in enabled_presets(providers)? {
        let pacing = p.pacing.clone().unwrap_or_default();
        let ov = providers.overrides.get(&p.name);
        let maxc = ov
            .and_then(|o| o.max_connections)
            .or(pacing.max_connections);
        let limits = ov.and_then(|o| o.limits.clone()).unwrap_or(pacing.limits);
        if maxc.is_some() || !limits.is_empty() {
            out.push((p.name.clone(), p.destination.clone(), maxc, limits));
        }
    }
    Ok(out)
}

/// The egress quotas presets' pacing becomes: `preset-<name>`, one counter per
/// MX site (how providers count), matching the preset's destination.
pub fn preset_quotas(providers: &ProvidersConfig) -> Vec<super::quota::QuotaConfig> {
    use super::quota::{Direction, KeyBy, QuotaConfig, QuotaMatch, Scope, Unit};
    preset_pacing(providers)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, d, maxc, limits)| QuotaConfig {
            name: format!("preset-{name}"),
            direction: Direction::Egress,
            matcher: QuotaMatch {
                destination_domains: d.destination_domains,
                mx_hosts: d.mx_hosts,
                smarthost: d.smarthost,
                ..QuotaMatch::default()
            },
            limits,
            unit: Unit::Messages,
            scope: Scope::PerKey,
            key: KeyBy::MxSite,
            action: Default::default(),
            max_connections: maxc,
        })
        .collect()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Whether an enhanced-status glob can ever match `class.subject.detail`.
fn valid_enhanced(p: &str) -> bool {
    let parts: Vec<&str> = p.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|s| {
            *s == "*" || (!s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Compiles a rule's text regex with the size limit.
pub fn compile_text(re: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(re)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regex: {e}"))
}

/// Checks one rule; `f` is where it sits (`response_rules[3]`).
pub fn validate_rule(f: &str, r: &ResponseRule) -> Result<(), (String, String)> {
    let at = |field: &str| format!("{f}.{field}");
    if !valid_name(&r.name) {
        return Err((
            at("name"),
            format!(
                "{:?} must be 1-63 characters of letters, digits, '-', '_' or '.'",
                r.name
            ),
        ));
    }
    if r.destination.is_empty() {
        return Err((
            at("destination"),
            "give at least one of mx_hosts, destination_domains or smarthost: true".into(),
        ));
    }
    for (i, g) in r.destination.mx_hosts.iter().enumerate() {
        if g.trim().is_empty() {
            return Err((
                at(&format!("destination.mx_hosts[{i}]")),
                "empty pattern".into(),
            ));
        }
    }
    for (i, g) in r.destination.destination_domains.iter().enumerate() {
        if g.trim().is_empty() {
            return Err((
                at(&format!("destination.destination_domains[{i}]")),
                "empty pattern".into(),
            ));
        }
    }
    if r.matcher.is_empty() {
        return Err((
            at("match"),
            "give at least one of codes, enhanced or text: an empty match would take every reply"
                .into(),
        ));
    }
    for (i, e) in r.matcher.enhanced.iter().enumerate() {
        if !valid_enhanced(e) {
            return Err((
                at(&format!("match.enhanced[{i}]")),
                format!("{e:?} is not an enhanced status code like 4.7.28 or 4.7.*"),
            ));
        }
    }
    if let Some(t) = &r.matcher.text {
        compile_text(t).map_err(|m| (at("match.text"), m))?;
    }
    for (name, list) in [
        ("senders", &r.matcher.senders),
        ("auth_users", &r.matcher.auth_users),
    ] {
        for (i, g) in list.iter().enumerate() {
            if g.trim().is_empty() || g.chars().any(char::is_whitespace) {
                return Err((
                    at(&format!("match.{name}[{i}]")),
                    format!("{g:?} is not a pattern (empty or with spaces)"),
                ));
            }
        }
    }
    let needs_state = matches!(r.action, RuleAction::Suspend | RuleAction::Throttle);
    match r.duration {
        None if needs_state => {
            return Err((
                at("duration"),
                format!("required for action {}", r.action.as_str()),
            ));
        }
        Some(d) if !(MIN_DURATION..=MAX_DURATION).contains(&d) => {
            return Err((
                at("duration"),
                format!("{} is out of range (1s..7d)", format_duration(d)),
            ));
        }
        _ => {}
    }
    if r.action == RuleAction::Throttle {
        let Some(t) = &r.throttle else {
            return Err((
                at("throttle"),
                "action throttle needs throttle: with factor, rate or max_connections".into(),
            ));
        };
        if t.factor.is_none() && t.rate.is_none() && t.max_connections.is_none() {
            return Err((
                at("throttle"),
                "give at least one of factor, rate or max_connections".into(),
            ));
        }
        if let Some(x) = t.factor
            && !(x > 0.0 && x < 1.0)
        {
            return Err((
                at("throttle.factor"),
                format!("{x} is not between 0 and 1 (exclusive)"),
            ));
        }
        if let Some(l) = t.rate
            && (l.count == 0 || l.window.is_zero())
        {
            return Err((
                at("throttle.rate"),
                format!("{l} allows nothing; use action: suspend"),
            ));
        }
        if let Some(0) = t.max_connections {
            return Err((
                at("throttle.max_connections"),
                "0 allows no connection; use action: suspend".into(),
            ));
        }
        if t.max_connections.is_some() && r.matcher.has_sender_filter() {
            // Same reason: a cap on some senders' connections has nothing to count.
            return Err((
                at("throttle.max_connections"),
                "not with a sender filter (match.senders, match.auth_users): connections carry every tenant's mail".into(),
            ));
        }
        if t.max_connections.is_some() && r.scope == RuleScope::Tenant {
            // A connection carries many tenants' mail: a cap per tenant has nothing
            // to count.
            return Err((
                at("throttle.max_connections"),
                "only with scope: site (connections carry every tenant's mail)".into(),
            ));
        }
    } else if r.throttle.is_some() {
        return Err((at("throttle"), "only with action: throttle".into()));
    }
    if r.action == RuleAction::Reclassify {
        if r.reclassify.is_none() {
            return Err((
                at("reclassify"),
                "action reclassify needs reclassify: temporary or permanent".into(),
            ));
        }
    } else if r.reclassify.is_some() {
        return Err((at("reclassify"), "only with action: reclassify".into()));
    }
    if r.tenant_key.is_some() && r.scope != RuleScope::Tenant {
        return Err((at("tenant_key"), "only with scope: tenant".into()));
    }
    Ok(())
}

/// Checks both sections together (presets expanded).
pub fn validate(
    user: &[ResponseRule],
    providers: &ProvidersConfig,
) -> Result<(), (String, String)> {
    let rules = effective_rules(user, providers)?;
    if rules.len() > MAX_RULES {
        return Err((
            "response_rules".into(),
            format!("{} rules in force; at most {MAX_RULES}", rules.len()),
        ));
    }
    let mut names = HashSet::new();
    for (f, r) in &rules {
        validate_rule(f, r)?;
        if !names.insert(r.name.as_str()) {
            return Err((format!("{f}.name"), format!("{:?} is used twice", r.name)));
        }
    }
    for (name, ov) in &providers.overrides {
        if let Some(0) = ov.max_connections {
            return Err((
                format!("providers.overrides.{name}.max_connections"),
                "0 allows no connection".into(),
            ));
        }
        for (i, l) in ov.limits.iter().flatten().enumerate() {
            if l.count == 0 || l.window.is_zero() {
                return Err((
                    format!("providers.overrides.{name}.limits[{i}]"),
                    format!("{l} allows nothing"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Result<(), String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            #[serde(default)]
            providers: ProvidersConfig,
            #[serde(default)]
            response_rules: Vec<ResponseRule>,
        }
        let d: Doc = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        validate(&d.response_rules, &d.providers).map_err(|(f, m)| format!("{f}: {m}"))
    }

    const OK: &str = "
response_rules:
  - name: my-throttle
    destination: { mx_hosts: ['*.google.com'] }
    match: { codes: [421, '4xx'], enhanced: ['4.7.28', '4.7.*'], text: '(?i)unusual rate', stages: [rcpt, data] }
    action: throttle
    scope: tenant
    tenant_key: dkim_domain
    duration: 10m
    throttle: { factor: 0.5, rate: 100/1m }
  - name: daily
    destination: { destination_domains: [example.net] }
    match: { codes: [550], text: 'daily (sending )?limit' }
    action: reclassify
    reclassify: temporary
  - name: ses
    destination: { smarthost: true }
    match: { codes: [454], text: Throttling }
    action: suspend
    duration: 1m
";

    #[test]
    fn a_full_example_is_accepted() {
        check(OK).unwrap();
        check("providers: { presets: [testprovider] }").unwrap();
        check("providers: { presets: [all] }").unwrap();
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "match: { codes: [421], text: '(unclosed' }",
                "response_rules[0].match.text: invalid regex",
            ),
            (
                "match: { codes: [421] }\n    duration: 0s",
                "response_rules[0].duration: 0s is out of range",
            ),
            (
                "match: { codes: [421] }\n    duration: 8d",
                "response_rules[0].duration: 8d is out of range",
            ),
            (
                "match: { codes: [421] }",
                "response_rules[0].duration: required for action suspend",
            ),
            (
                "match: { enhanced: ['4.7'] }\n    duration: 1m",
                "response_rules[0].match.enhanced[0]",
            ),
            (
                "match: {}\n    duration: 1m",
                "response_rules[0].match: give at least one",
            ),
        ];
        for (body, want) in cases {
            let y = format!(
                "response_rules:\n  - name: r\n    destination: {{ mx_hosts: ['*.x.test'] }}\n    action: suspend\n    {body}\n"
            );
            let e = check(&y).unwrap_err();
            assert!(e.starts_with(want), "{body}: got {e}");
        }
        let e = check("response_rules:\n  - name: r\n    match: { codes: [421] }\n    action: suspend\n    duration: 1m\n").unwrap_err();
        assert!(
            e.starts_with("response_rules[0].destination: give at least one"),
            "{e}"
        );
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [421] }\n    action: throttle\n    duration: 1m\n").unwrap_err();
        assert!(
            e.starts_with("response_rules[0].throttle: action throttle needs"),
            "{e}"
        );
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [421] }\n    action: throttle\n    duration: 1m\n    throttle: {}\n").unwrap_err();
        assert!(
            e.starts_with("response_rules[0].throttle: give at least one"),
            "{e}"
        );
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [421] }\n    action: throttle\n    duration: 1m\n    throttle: { factor: 1.5 }\n").unwrap_err();
        assert!(e.starts_with("response_rules[0].throttle.factor"), "{e}");
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [550] }\n    action: reclassify\n").unwrap_err();
        assert!(
            e.starts_with("response_rules[0].reclassify: action reclassify needs"),
            "{e}"
        );
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [550] }\n    action: bounce\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [551] }\n    action: bounce\n").unwrap_err();
        assert!(
            e.starts_with("response_rules[1].name: \"r\" is used twice"),
            "{e}"
        );
        let e = check("providers: { presets: [nosuch] }").unwrap_err();
        assert!(
            e.starts_with("providers.presets[0]: unknown preset \"nosuch\""),
            "{e}"
        );
        let e = check("providers: { presets: [testprovider], overrides: { testprovider: { rules: { nope: { enabled: false } } } } }").unwrap_err();
        assert!(
            e.starts_with("providers.overrides.testprovider.rules.nope"),
            "{e}"
        );
        let e = check("providers: { overrides: { testprovider: { max_connections: 3 } } }")
            .unwrap_err();
        assert!(
            e.starts_with("providers.overrides.testprovider: preset"),
            "{e}"
        );
        let e = check("providers: { presets: [testprovider], overrides: { testprovider: { rules: { testprovider-rate: { duration: 9d } } } } }").unwrap_err();
        assert!(
            e.starts_with("providers.overrides.testprovider.rules.testprovider-rate.duration"),
            "{e}"
        );
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [421], senders: ['*@a.test', ''] }\n    action: bounce\n").unwrap_err();
        assert!(e.starts_with("response_rules[0].match.senders[1]"), "{e}");
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [421], auth_users: ['a b'] }\n    action: bounce\n").unwrap_err();
        assert!(
            e.starts_with("response_rules[0].match.auth_users[0]"),
            "{e}"
        );
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [421], senders: ['*@a.test'] }\n    action: throttle\n    duration: 1m\n    throttle: { max_connections: 2 }\n").unwrap_err();
        assert!(
            e.starts_with("response_rules[0].throttle.max_connections: not with a sender filter"),
            "{e}"
        );
        // A sender filter alone is no reply match.
        let e = check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { senders: ['*@a.test'] }\n    action: bounce\n").unwrap_err();
        assert!(
            e.starts_with("response_rules[0].match: give at least one"),
            "{e}"
        );
        check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: [421], senders: ['*@a.test', b.test, '<>'], authUsers: [tenant-a] }\n    action: suspend\n    duration: 1m\n").unwrap();
        // Codes are checked while parsing.
        assert!(check("response_rules:\n  - name: r\n    destination: { smarthost: true }\n    match: { codes: ['6xx'] }\n    action: bounce\n").is_err());
    }

    #[test]
    fn every_shipped_preset_parses_and_validates() {
        assert!(!PRESETS.is_empty());
        for (name, text) in PRESETS.iter().chain(TEST_PRESETS) {
            let p = parse_preset(name, text).unwrap_or_else(|(f, m)| panic!("{f}: {m}"));
            assert!(!p.destination.is_empty(), "{name}: no destination");
            for r in &p.rules {
                assert!(
                    r.name.starts_with(&format!("{name}-")),
                    "{name}: rule {} not prefixed",
                    r.name
                );
            }
        }
        let all = ProvidersConfig {
            presets: vec!["all".into()],
            ..Default::default()
        };
        validate(&[], &all).unwrap_or_else(|(f, m)| panic!("{f}: {m}"));
    }

    #[test]
    fn overrides_and_inherited_destinations() {
        let p: ProvidersConfig = serde_norway::from_str(
            "presets: [testprovider]\noverrides:\n  testprovider:\n    max_connections: 7\n    limits: [10/1m]\n    rules:\n      testprovider-rate: { duration: 30m }\n      testprovider-blocked: { enabled: false }\n",
        )
        .unwrap();
        let rules = effective_rules(&[], &p).unwrap();
        let rate = rules
            .iter()
            .find(|(_, r)| r.name == "testprovider-rate")
            .unwrap();
        assert_eq!(rate.1.duration, Some(Duration::from_secs(1800)));
        assert_eq!(
            rate.1.destination.mx_hosts,
            vec!["*.provider.test".to_string()]
        );
        let blocked = rules
            .iter()
            .find(|(_, r)| r.name == "testprovider-blocked")
            .unwrap();
        assert!(!blocked.1.enabled);
        let pacing = preset_pacing(&p).unwrap();
        assert_eq!(pacing.len(), 1);
        assert_eq!(pacing[0].2, Some(7));
        assert_eq!(pacing[0].3[0].to_string(), "10/1m");
        let q = preset_quotas(&p);
        assert_eq!(q[0].name, "preset-testprovider");
        assert_eq!(q[0].key, super::super::quota::KeyBy::MxSite);
        assert_eq!(q[0].matcher.mx_hosts, vec!["*.provider.test".to_string()]);
        assert_eq!(q[0].max_connections, Some(7));
        // No override: the test preset sets no pacing, so no quota.
        let plain = ProvidersConfig {
            presets: vec!["testprovider".into()],
            ..Default::default()
        };
        assert!(preset_quotas(&plain).is_empty());
    }
}
