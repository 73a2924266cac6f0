//! The `quotas:` section: a list of named quotas, each matching some mail in one
//! direction and holding it to a set of rolling windows.
//!
//! The name identifies the counters, so a reload that keeps a quota's name keeps
//! its usage; renaming a quota starts it afresh.
//!
//! The enums here are also the operator's `SendQuota` fields: the config file spells
//! their values in snake_case (`per_key`), the CRD in camelCase (`perKey`). Serde
//! writes snake_case and reads both; with the `schemars` feature the JSON schema
//! (the CRD's) lists the camelCase spelling only. So a `SendQuota` spec must never be
//! written from these types (it would carry the config spelling); the operator only
//! reads specs.

use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::duration::{format_duration, parse_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum Direction {
    /// Mail clients submit to the relay; checked at MAIL/RCPT/DATA.
    Ingress,
    /// Mail the relay sends on; paced by the delivery scheduler.
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum Unit {
    /// One per message (a message to many recipients counts once).
    #[default]
    Messages,
    /// One per recipient.
    Recipients,
    /// The message size in octets.
    Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub enum Scope {
    /// One counter per key (see [`KeyBy`]): each sender gets the full limit.
    #[default]
    #[serde(alias = "perKey")]
    PerKey,
    /// One counter for everything the quota matches.
    Shared,
}

/// What tells keys apart under `scope: per_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "schemars",
    derive(schemars::JsonSchema),
    schemars(rename_all = "camelCase")
)]
pub enum KeyBy {
    /// Ingress: the AUTH user when the client authenticated, else the envelope
    /// sender address. Egress: the destination domain.
    #[default]
    Auto,
    /// Ingress: envelope sender address (lower-cased; `<>` is its own key).
    Sender,
    /// Ingress: the domain of the envelope sender.
    #[serde(alias = "senderDomain")]
    SenderDomain,
    /// Ingress: the AUTH user (unauthenticated mail has the empty key).
    #[serde(alias = "authUser")]
    AuthUser,
    /// Ingress: the client IP address.
    #[serde(alias = "clientIp")]
    ClientIp,
    /// Egress: the recipient domain.
    #[serde(alias = "destinationDomain")]
    DestinationDomain,
    /// Egress: the set of MX hosts serving the destination, so every domain a
    /// provider hosts on the same MX hosts shares one counter — how providers count.
    #[serde(alias = "mxSite")]
    MxSite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum Action {
    /// Tempfail at SMTP: `451 4.7.1` (or `452 4.5.3` for recipients).
    #[default]
    Reject,
    /// Accept, then hold in the queue until the window allows the message.
    Defer,
}

/// `N/window`: at most `count` units in any rolling `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub window: Duration,
}

impl Limit {
    pub fn parse(s: &str) -> Result<Limit, String> {
        let (n, w) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a limit like 100/1m, 1000/h or 50000/1d"))?;
        let count: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {n:?} is not a whole number"))?;
        let w = w.trim();
        // `1000/h` reads naturally; it means one hour.
        let window = if w.starts_with(|c: char| c.is_ascii_digit()) {
            parse_duration(w)?
        } else {
            parse_duration(&format!("1{w}"))?
        };
        Ok(Limit { count, window })
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, format_duration(self.window))
    }
}

impl Serialize for Limit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Limit, D::Error> {
        let s = String::deserialize(d)?;
        Limit::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a quota applies to. Every listed field must match (AND); within a field
/// any entry may match (OR); an empty `match` takes all mail of its direction.
/// Patterns are case-insensitive globs with `*` and `?`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaMatch {
    /// Ingress: envelope sender, as an address glob (`*@example.com`,
    /// `alerts-*@example.com`) or a bare domain glob (`example.com`, `*.example.com`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub senders: Vec<String>,
    /// Ingress: AUTH user names (globs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub auth_users: Vec<String>,
    /// Ingress: client networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_networks: Vec<IpNet>,
    /// Ingress: counts only recipients in these domains (globs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recipient_domains: Vec<String>,
    /// Egress: recipient domains (globs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_domains: Vec<String>,
    /// Egress: MX host names serving the destination (globs, e.g. `*.google.com`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mx_hosts: Vec<String>,
    /// Egress: mail sent through the configured smarthost.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub smarthost: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Unique name; also the identity of the quota's counters.
    pub name: String,
    pub direction: Direction,
    #[serde(rename = "match", default)]
    pub matcher: QuotaMatch,
    /// Rolling windows, e.g. `[100/1m, 1000/1h, 10000/1d]`; all must allow.
    #[serde(default)]
    pub limits: Vec<Limit>,
    #[serde(default)]
    pub unit: Unit,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub key: KeyBy,
    /// Ingress only: what happens to mail over the limit.
    #[serde(default)]
    pub action: Action,
    /// Egress only: outbound connections open at once per key, over all relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// Longest window a quota may use: counters live this long in the store.
pub const MAX_WINDOW: Duration = Duration::from_secs(31 * 86_400);

/// Limits one quota may have.
pub const MAX_LIMITS: usize = 8;

/// Largest count of a limit: counters are exact integers up to 2^53 (Lua numbers).
pub const MAX_COUNT: u64 = 1 << 53;

/// Checks a `quotas:` list; errors name the field as `quotas[i].field`.
pub fn validate(quotas: &[QuotaConfig]) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, q) in quotas.iter().enumerate() {
        let f = |field: &str| format!("quotas[{i}].{field}");
        let name_ok = !q.name.is_empty()
            && q.name.len() <= 63
            && q.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err((
                f("name"),
                format!(
                    "{:?} must be 1-63 characters of letters, digits, '-', '_' or '.'",
                    q.name
                ),
            ));
        }
        if !names.insert(q.name.as_str()) {
            return Err((f("name"), format!("{:?} is used twice", q.name)));
        }
        if q.limits.is_empty() && q.max_connections.is_none() {
            return Err((
                f("limits"),
                "give at least one limit like 1000/1h (or max_connections for egress)".into(),
            ));
        }
        if q.limits.len() > MAX_LIMITS {
            return Err((
                f("limits"),
                format!("at most {MAX_LIMITS} limits per quota"),
            ));
        }
        for (j, l) in q.limits.iter().enumerate() {
            if l.count > MAX_COUNT {
                return Err((
                    format!("quotas[{i}].limits[{j}]"),
                    format!("count must be at most {MAX_COUNT} (2^53)"),
                ));
            }
            if l.count == 0 {
                return Err((
                    format!("quotas[{i}].limits[{j}]"),
                    "count must be at least 1 (remove the quota to stop mail, not a zero limit)"
                        .into(),
                ));
            }
            if l.window < Duration::from_secs(1) || l.window > MAX_WINDOW {
                return Err((
                    format!("quotas[{i}].limits[{j}]"),
                    "window must be between 1s and 31d".into(),
                ));
            }
            if q.limits[..j].iter().any(|o| o.window == l.window) {
                return Err((
                    format!("quotas[{i}].limits[{j}]"),
                    format!("two limits share the window {}", format_duration(l.window)),
                ));
            }
        }
        let m = &q.matcher;
        let has_ingress = !(m.senders.is_empty()
            && m.auth_users.is_empty()
            && m.client_networks.is_empty()
            && m.recipient_domains.is_empty());
        let has_egress =
            !(m.destination_domains.is_empty() && m.mx_hosts.is_empty()) || m.smarthost;
        let ingress_key = matches!(
            q.key,
            KeyBy::Sender | KeyBy::SenderDomain | KeyBy::AuthUser | KeyBy::ClientIp
        );
        let egress_key = matches!(q.key, KeyBy::DestinationDomain | KeyBy::MxSite);
        match q.direction {
            Direction::Ingress => {
                if has_egress {
                    return Err((
                        f("match"),
                        "destination_domains, mx_hosts and smarthost apply to egress quotas only"
                            .into(),
                    ));
                }
                if egress_key {
                    return Err((
                        f("key"),
                        "destination_domain and mx_site are egress keys".into(),
                    ));
                }
                if q.max_connections.is_some() {
                    return Err((f("max_connections"), "applies to egress quotas only".into()));
                }
            }
            Direction::Egress => {
                if has_ingress {
                    return Err((
                        f("match"),
                        "senders, auth_users, client_networks and recipient_domains apply to ingress quotas only"
                            .into(),
                    ));
                }
                if ingress_key {
                    return Err((
                        f("key"),
                        "sender, sender_domain, auth_user and client_ip are ingress keys".into(),
                    ));
                }
                if q.action == Action::Defer {
                    return Err((
                        f("action"),
                        "egress quotas always hold mail in the queue; action applies to ingress"
                            .into(),
                    ));
                }
                if q.max_connections == Some(0) {
                    return Err((f("max_connections"), "must be at least 1".into()));
                }
            }
        }
        for (field, globs) in [
            ("match.senders", &m.senders),
            ("match.auth_users", &m.auth_users),
            ("match.recipient_domains", &m.recipient_domains),
            ("match.destination_domains", &m.destination_domains),
            ("match.mx_hosts", &m.mx_hosts),
        ] {
            for (j, g) in globs.iter().enumerate() {
                if g.is_empty() || g.len() > 320 || g.chars().any(char::is_whitespace) {
                    return Err((
                        format!("quotas[{i}].{field}[{j}]"),
                        format!("{g:?} is not a pattern (no spaces, 1-320 characters)"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// One way egress mail can leave, as far as the delivery config tells.
struct Path<'a> {
    /// Domains it carries: `None` for any domain no route takes; else the route's
    /// patterns (`example.com`, `.example.com`).
    domains: Option<Vec<String>>,
    /// The host it goes to; `None` for the MX hosts, unknown until looked up.
    host: Option<&'a str>,
    smarthost: bool,
}

fn is_literal(pattern: &str) -> bool {
    !pattern.contains(['*', '?'])
}

/// Whether some domain matched by `pattern` (a glob) travels along `path`.
fn may_carry(pattern: &str, path: &Path<'_>, routes: &[crate::config::RouteConfig]) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    match &path.domains {
        // Any domain no route takes: only a plain name a route takes is missed.
        None => !is_literal(&pattern) || crate::config::route_of(routes, &pattern).is_none(),
        Some(listed) => listed.iter().any(|d| match d.strip_prefix('.') {
            Some(parent) => {
                // Some subdomain of `parent`: a pattern with wildcards may match
                // one (erring towards "may"); a plain name must lie below it and
                // be routed here, not elsewhere.
                !is_literal(&pattern) || pattern.ends_with(&format!(".{parent}"))
            }
            None => super::glob::Glob::new(&pattern).is_match(d),
        }),
    }
}

/// Why egress quota `q` can never match any delivery path of `delivery`: the
/// field (relative to the quota, e.g. `match.mx_hosts`) and the reason. `None`
/// when some mail may match, or the quota is not an egress quota.
pub fn never_matches(
    q: &QuotaConfig,
    delivery: &crate::config::DeliveryConfig,
) -> Option<(&'static str, String)> {
    if q.direction != Direction::Egress {
        return None;
    }
    let m = &q.matcher;
    let Some(sh) = &delivery.smarthost else {
        if m.smarthost {
            return Some((
                "match.smarthost",
                "no smarthost is configured (delivery.smarthost), so this quota can never match"
                    .into(),
            ));
        }
        // MX hosts are only known once looked up: anything may match.
        return None;
    };
    let mut paths: Vec<Path<'_>> = delivery
        .routes
        .iter()
        .map(|r| Path {
            domains: Some(r.normalized_domains().collect()),
            host: Some(r.remote.host.as_str()),
            smarthost: false,
        })
        .collect();
    paths.push(Path {
        domains: None,
        host: Some(sh.host.as_str()),
        smarthost: true,
    });
    let host_ok = |p: &Path<'_>| {
        m.mx_hosts.is_empty()
            || p.host.is_none_or(|h| {
                let h = h.trim_end_matches('.').to_ascii_lowercase();
                m.mx_hosts
                    .iter()
                    .any(|g| super::glob::Glob::new(g).is_match(&h))
            })
    };
    let domain_ok = |p: &Path<'_>| {
        m.destination_domains.is_empty()
            || m.destination_domains
                .iter()
                .any(|g| may_carry(g, p, &delivery.routes))
    };
    let kind_ok = |p: &Path<'_>| !m.smarthost || p.smarthost;
    if paths
        .iter()
        .any(|p| kind_ok(p) && host_ok(p) && domain_ok(p))
    {
        return None;
    }
    let hosts: Vec<&str> = paths
        .iter()
        .filter(|p| kind_ok(p))
        .filter_map(|p| p.host)
        .collect();
    let to = hosts.join(", ");
    if !paths.iter().any(|p| kind_ok(p) && host_ok(p)) {
        return Some((
            "match.mx_hosts",
            format!(
                "can never match: with a smarthost no MX host is looked up; this mail goes only to {to} (delivery.smarthost / delivery.routes)"
            ),
        ));
    }
    if !paths.iter().any(|p| kind_ok(p) && domain_ok(p)) {
        return Some((
            "match.destination_domains",
            "can never match: every domain listed goes through delivery.routes, never the smarthost"
                .into(),
        ));
    }
    Some((
        "match",
        format!(
            "can never match: the hosts in mx_hosts never carry the domains in destination_domains (mail goes to {to}: delivery.smarthost / delivery.routes)"
        ),
    ))
}

/// Checks that every egress quota can match some mail along the configured
/// delivery paths; errors name the field as `quotas[i].match.field`. A quota that
/// can never match would look enforced while limiting nothing.
pub fn validate_reach(
    quotas: &[QuotaConfig],
    delivery: &crate::config::DeliveryConfig,
) -> Result<(), (String, String)> {
    for (i, q) in quotas.iter().enumerate() {
        if let Some((field, message)) = never_matches(q, delivery) {
            return Err((format!("quotas[{i}].{field}"), message));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Vec<QuotaConfig>, String> {
        let q: Vec<QuotaConfig> = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        validate(&q).map_err(|(f, m)| format!("{f}: {m}"))?;
        Ok(q)
    }

    #[test]
    fn limits_parse_and_print() {
        let l = Limit::parse("1000/h").unwrap();
        assert_eq!((l.count, l.window), (1000, Duration::from_secs(3600)));
        assert_eq!(Limit::parse("100/1m").unwrap().to_string(), "100/1m");
        assert_eq!(
            Limit::parse("5/10s").unwrap().window,
            Duration::from_secs(10)
        );
        assert!(Limit::parse("100").is_err());
        assert!(Limit::parse("x/1m").is_err());
        assert!(Limit::parse("1/1w").is_err());
    }

    #[test]
    fn a_full_quota_round_trips() {
        let q = parse(
            "- name: tenant-a\n  direction: ingress\n  match: {senders: ['*@a.example'], client_networks: [10.0.0.0/8]}\n  limits: [100/1m, 1000/1h]\n  unit: recipients\n  key: sender_domain\n  action: defer\n\
             - name: gmail\n  direction: egress\n  match: {mx_hosts: ['*.google.com']}\n  limits: [600/1m]\n  key: mx_site\n  max_connections: 5\n",
        )
        .unwrap();
        assert_eq!(q[0].limits[1].window, Duration::from_secs(3600));
        assert_eq!(q[1].max_connections, Some(5));
        let back: Vec<QuotaConfig> =
            serde_norway::from_str(&serde_norway::to_string(&q).unwrap()).unwrap();
        assert_eq!(back, q);
    }

    #[test]
    fn mistakes_name_the_field() {
        for (yaml, field) in [
            ("- {name: a, direction: ingress}", "quotas[0].limits"),
            (
                "- {name: a, direction: ingress, limits: [0/1m]}",
                "quotas[0].limits[0]",
            ),
            (
                "- {name: a, direction: ingress, limits: [1/1m, 2/60s]}",
                "quotas[0].limits[1]",
            ),
            (
                "- {name: 'a b', direction: ingress, limits: [1/1m]}",
                "quotas[0].name",
            ),
            (
                "- {name: a, direction: ingress, limits: [1/1m]}\n- {name: a, direction: egress, limits: [1/1m]}",
                "quotas[1].name",
            ),
            (
                "- {name: a, direction: ingress, limits: [1/1m], match: {mx_hosts: [x]}}",
                "quotas[0].match",
            ),
            (
                "- {name: a, direction: egress, limits: [1/1m], action: defer}",
                "quotas[0].action",
            ),
            (
                "- {name: a, direction: egress, limits: [1/1m], key: sender}",
                "quotas[0].key",
            ),
            (
                "- {name: a, direction: ingress, limits: [1/1m], max_connections: 2}",
                "quotas[0].max_connections",
            ),
            (
                "- {name: a, direction: ingress, limits: [9007199254740993/1d]}",
                "quotas[0].limits[0]",
            ),
            (
                "- {name: a, direction: ingress, limits: [1/1s, 1/2s, 1/3s, 1/4s, 1/5s, 1/6s, 1/7s, 1/8s, 1/9s]}",
                "quotas[0].limits",
            ),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.starts_with(field), "{yaml}: {e}");
        }
        let e =
            parse("- {name: a, direction: ingress, limits: [1/1m], scope: everyone}").unwrap_err();
        assert!(e.contains("scope"), "{e}");
        let e = parse("- {name: a, direction: ingress, limits: [1/1m], match: {sender: [x]}}")
            .unwrap_err();
        assert!(e.contains("sender"), "{e}");
    }

    fn reach(delivery: &str, quota: &str) -> Result<(), String> {
        let cfg = crate::config::RelayConfig::from_yaml(&format!(
            "delivery: {delivery}\nquotas:\n- {quota}\n"
        ));
        cfg.map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn quotas_that_can_never_match_the_delivery_paths_are_refused() {
        let smarthost = "{smarthost: {host: smtp.provider.test}, routes: [{domains: [partner.test, .corp.test], host: mx.partner.test}]}";
        let mx_only = "{routes: [{domains: [partner.test], host: mx.partner.test}]}";
        for (delivery, quota, field) in [
            // No smarthost to match.
            (
                mx_only,
                "{name: q, direction: egress, match: {smarthost: true}, limits: [1/1s]}",
                Some("quotas[0].match.smarthost"),
            ),
            // With a smarthost no MX host is ever looked up.
            (
                smarthost,
                "{name: q, direction: egress, match: {mx_hosts: ['*.google.com']}, limits: [1/1s]}",
                Some("quotas[0].match.mx_hosts"),
            ),
            // ... but the smarthost's and the routes' names match.
            (
                smarthost,
                "{name: q, direction: egress, match: {mx_hosts: ['smtp.*']}, limits: [1/1s]}",
                None,
            ),
            (
                smarthost,
                "{name: q, direction: egress, match: {mx_hosts: ['MX.Partner.Test']}, limits: [1/1s]}",
                None,
            ),
            // Through the smarthost only: the route's host is not the smarthost.
            (
                smarthost,
                "{name: q, direction: egress, match: {smarthost: true, mx_hosts: [mx.partner.test]}, limits: [1/1s]}",
                Some("quotas[0].match.mx_hosts"),
            ),
            // A routed domain never reaches the smarthost.
            (
                smarthost,
                "{name: q, direction: egress, match: {smarthost: true, destination_domains: [partner.test, x.corp.test]}, limits: [1/1s]}",
                Some("quotas[0].match.destination_domains"),
            ),
            (
                smarthost,
                "{name: q, direction: egress, match: {smarthost: true, destination_domains: [partner.test, other.test]}, limits: [1/1s]}",
                None,
            ),
            // A route host only carries its domains.
            (
                smarthost,
                "{name: q, direction: egress, match: {mx_hosts: [mx.partner.test], destination_domains: [other.test]}, limits: [1/1s]}",
                Some("quotas[0].match"),
            ),
            (
                smarthost,
                "{name: q, direction: egress, match: {mx_hosts: [mx.partner.test], destination_domains: ['*.corp.test']}, limits: [1/1s]}",
                None,
            ),
            // Domain patterns match routed and smarthost mail alike.
            (
                smarthost,
                "{name: q, direction: egress, match: {destination_domains: [partner.test]}, limits: [1/1s]}",
                None,
            ),
            (
                mx_only,
                "{name: q, direction: egress, match: {mx_hosts: ['*.google.com']}, limits: [1/1s]}",
                None,
            ),
            // Ingress quotas have nothing to do with delivery paths.
            (
                smarthost,
                "{name: q, direction: ingress, limits: [1/1s]}",
                None,
            ),
        ] {
            let got = reach(delivery, quota);
            match field {
                None => assert!(got.is_ok(), "{quota}: {got:?}"),
                Some(f) => {
                    let e = got.unwrap_err();
                    assert!(e.contains(f) && e.contains("never match"), "{quota}: {e}");
                }
            }
        }
    }
}
