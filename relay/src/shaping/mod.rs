//! Provider-aware delivery: response rules turn a remote server's reply into an
//! action for the destination it came from (`suspend`, `throttle`, `reclassify`,
//! `bounce`), scoped to the whole MX site or to the tenant the reply concerns.
//!
//! This module is pure: compiled rules and matching (evaluated in-process, no
//! store round trip), the tenant facts of a message, and the shape of a shared
//! state record. Egress ([`crate::quota::egress`]) keeps the states in its store,
//! read in the same script call that paces each message, so every relay process
//! agrees; delivery asks the rules how to classify a reply.
//!
//! A state is one field of a per-site hash: `*` for the whole site, or
//! `<tenant_key>:<value>` (e.g. `dkim_domain:shop.example`) for one tenant, so one
//! tenant's suspension never stops another tenant's mail to the same site.
//!
//! A rule with a sender filter (`match.senders`, `match.auth_users`: a SendQuota's
//! rules carry the quota's) matches only replies to its senders' mail, and its
//! state holds only their mail: a tenant-scoped one as usual, narrowed by the
//! filter; a site-scoped one gets the field `rule:<rule name>` instead of `*`,
//! "the mail this rule's filter takes at the site", so the store treats it like a
//! tenant's and the relay applies it per message.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::RelayConfig;
use crate::config::glob::{Glob, normalize_name};
use crate::config::rules::{
    CodeMatch, Reclassify, ReplyStage, ResponseRule, RuleAction, RuleScope, TenantKey,
    compile_text, effective_rules,
};

/// The site-wide scope field.
pub const SITE: &str = "*";
/// Prefix of the scope field of a site-scoped rule with a sender filter.
pub const RULE_FIELD: &str = "rule:";

/// A rule's sender filter, compiled (see [`ReplyMatch`](crate::config::rules::ReplyMatch)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderFilter {
    senders: Vec<SenderPattern>,
    auth_users: Vec<Glob>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SenderPattern {
    Address(Glob),
    Domain(Glob),
    Null,
}

impl SenderFilter {
    fn of(senders: &[String], auth_users: &[String]) -> Option<SenderFilter> {
        if senders.is_empty() && auth_users.is_empty() {
            return None;
        }
        Some(SenderFilter {
            senders: senders
                .iter()
                .map(|p| {
                    if p == "<>" {
                        SenderPattern::Null
                    } else if p.contains('@') {
                        SenderPattern::Address(Glob::new(p))
                    } else {
                        SenderPattern::Domain(Glob::new(p))
                    }
                })
                .collect(),
            auth_users: auth_users.iter().map(|p| Glob::new(p)).collect(),
        })
    }

    /// Whether `t`'s mail passes the filter (as an ingress quota's `match` would
    /// take it).
    pub fn matches(&self, t: &Tenant) -> bool {
        let sender_ok = self.senders.is_empty()
            || self.senders.iter().any(|p| match p {
                SenderPattern::Null => t.sender.is_empty(),
                SenderPattern::Address(g) => !t.sender.is_empty() && g.is_match_lower(&t.sender),
                SenderPattern::Domain(g) => {
                    t.sender_domain.as_deref().is_some_and(|d| g.is_match(d))
                }
            });
        let auth_ok = self.auth_users.is_empty()
            || t.auth_user
                .as_deref()
                .is_some_and(|u| self.auth_users.iter().any(|g| g.is_match(u)));
        sender_ok && auth_ok
    }
}

/// The sender filters of the rules in force, by rule name (only rules that have
/// one): what tells whether a state concerns a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderFilters(Arc<HashMap<Arc<str>, SenderFilter>>);

impl SenderFilters {
    pub fn get(&self, rule: &str) -> Option<&SenderFilter> {
        if self.0.is_empty() {
            return None;
        }
        self.0.get(rule)
    }

    /// Whether a state `rule` started may concern `tenant`'s mail: always without
    /// a filter; with one, only mail it takes (none when the tenant is unknown).
    pub fn admits(&self, rule: &str, tenant: Option<&Tenant>) -> bool {
        match self.get(rule) {
            None => true,
            Some(f) => tenant.is_some_and(|t| f.matches(t)),
        }
    }
}

/// One rule, compiled.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    mx_hosts: Vec<Glob>,
    domains: Vec<Glob>,
    smarthost: bool,
    codes: Vec<CodeMatch>,
    /// Per pattern: class, subject, detail (`None` = `*`).
    enhanced: Vec<[Option<u16>; 3]>,
    text: Option<regex::Regex>,
    stages: Vec<ReplyStage>,
    pub action: RuleAction,
    pub scope: RuleScope,
    pub tenant_key: TenantKey,
    pub duration_ms: u64,
    /// `throttle.factor` (1 = none).
    pub factor: f64,
    /// `throttle.rate` and `throttle.max_connections`.
    pub rate: Option<Rate>,
    pub max_connections: Option<u32>,
    pub reclassify: Option<Reclassify>,
    /// `match.senders` / `match.auth_users`.
    pub filter: Option<SenderFilter>,
}

/// Where a reply came from, as rules select destinations.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    /// The recipient domain (lower case), when the connection carries one.
    pub domain: Option<&'a str>,
    /// The MX host names of the site (lower case).
    pub hosts: &'a [String],
    pub smarthost: bool,
}

/// A reply as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct ReplyFacts<'a> {
    pub code: u16,
    pub enhanced: Option<(u8, u16, u16)>,
    /// The reply's text, lines joined by `\n`.
    pub text: &'a str,
    pub stage: ReplyStage,
}

impl Rule {
    fn compile(r: &ResponseRule) -> Result<Rule, String> {
        let enhanced = r
            .matcher
            .enhanced
            .iter()
            .map(|p| {
                let mut out = [None; 3];
                for (i, part) in p.split('.').take(3).enumerate() {
                    out[i] = part.parse().ok();
                }
                out
            })
            .collect();
        Ok(Rule {
            name: Arc::from(r.name.as_str()),
            mx_hosts: r
                .destination
                .mx_hosts
                .iter()
                .map(|g| Glob::new(g))
                .collect(),
            domains: r
                .destination
                .destination_domains
                .iter()
                .map(|g| Glob::new(g))
                .collect(),
            smarthost: r.destination.smarthost,
            codes: r.matcher.codes.clone(),
            enhanced,
            text: r.matcher.text.as_deref().map(compile_text).transpose()?,
            stages: r.matcher.stages.clone(),
            action: r.action,
            scope: r.scope,
            tenant_key: r.tenant_key.unwrap_or_default(),
            duration_ms: r.duration.map_or(0, |d| d.as_millis() as u64),
            factor: r.throttle.and_then(|t| t.factor).unwrap_or(1.0),
            rate: r.throttle.and_then(|t| t.rate).map(|l| Rate {
                count: l.count.max(1),
                window_ms: (l.window.as_millis() as u64).max(1),
            }),
            max_connections: r.throttle.and_then(|t| t.max_connections),
            reclassify: r.reclassify,
            filter: SenderFilter::of(&r.matcher.senders, &r.matcher.auth_users),
        })
    }

    /// Whether the rule may take a reply to `tenant`'s mail (its sender filter).
    pub fn takes(&self, tenant: Option<&Tenant>) -> bool {
        match &self.filter {
            None => true,
            Some(f) => tenant.is_some_and(|t| f.matches(t)),
        }
    }

    /// The scope field of the state this rule starts for `tenant`'s mail
    /// (`egress_key`: the destination's first egress quota key); `None` when a
    /// tenant-scoped rule's tenant is unknown.
    pub fn field(&self, tenant: Option<&Tenant>, egress_key: Option<&str>) -> Option<String> {
        match self.scope {
            RuleScope::Site if self.filter.is_some() => Some(format!("{RULE_FIELD}{}", self.name)),
            RuleScope::Site => Some(SITE.to_owned()),
            RuleScope::Tenant => tenant?.field(self.tenant_key, egress_key),
        }
    }

    /// Whether the rule is about `d`.
    pub fn selects(&self, d: &Dest<'_>) -> bool {
        if self.smarthost && !d.smarthost {
            return false;
        }
        if !self.domains.is_empty()
            && !d
                .domain
                .is_some_and(|dom| self.domains.iter().any(|g| g.is_match(dom)))
        {
            return false;
        }
        if !self.mx_hosts.is_empty()
            && !d
                .hosts
                .iter()
                .any(|h| self.mx_hosts.iter().any(|g| g.is_match(h)))
        {
            return false;
        }
        true
    }

    /// Whether the reply fits `match` (the destination aside).
    pub fn fits(&self, r: &ReplyFacts<'_>) -> bool {
        if !self.codes.is_empty() && !self.codes.iter().any(|c| c.is_match(r.code)) {
            return false;
        }
        if !self.enhanced.is_empty() {
            let Some((a, b, c)) = r.enhanced else {
                return false;
            };
            let got = [u16::from(a), b, c];
            if !self.enhanced.iter().any(|p| {
                p.iter()
                    .zip(got)
                    .all(|(want, g)| want.is_none_or(|w| w == g))
            }) {
                return false;
            }
        }
        if !self.stages.is_empty() && !self.stages.contains(&r.stage) {
            return false;
        }
        // Last: the only costly test.
        if let Some(re) = &self.text
            && !re.is_match(r.text)
        {
            return false;
        }
        true
    }
}

/// The rules in force, in evaluation order (user rules, then presets').
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    /// Tenant keys some enabled rule scopes by (what delivery must work out per
    /// message; `sender_domain` also when a rule has a sender filter, whose facts
    /// come from the envelope).
    pub tenant_keys: Vec<TenantKey>,
    filters: SenderFilters,
}

impl Rules {
    /// Compiles the config's rules (user and presets, overrides applied). The
    /// config was validated: an error here names the field all the same.
    pub fn from_config(cfg: &RelayConfig) -> Result<Rules, (String, String)> {
        let all = effective_rules(&cfg.response_rules, &cfg.providers)?;
        let mut rules = Vec::new();
        for (field, r) in all.iter().filter(|(_, r)| r.enabled) {
            rules.push(Rule::compile(r).map_err(|m| (format!("{field}.match.text"), m))?);
        }
        let mut tenant_keys: Vec<TenantKey> = rules
            .iter()
            .filter_map(|r| match (r.scope, &r.filter) {
                (RuleScope::Tenant, _) => Some(r.tenant_key),
                (RuleScope::Site, Some(_)) => Some(TenantKey::SenderDomain),
                (RuleScope::Site, None) => None,
            })
            .collect();
        tenant_keys.sort_by_key(|k| k.as_str());
        tenant_keys.dedup();
        let filters = rules
            .iter()
            .filter_map(|r| Some((Arc::clone(&r.name), r.filter.clone()?)))
            .collect();
        Ok(Rules {
            rules,
            tenant_keys,
            filters: SenderFilters(Arc::new(filters)),
        })
    }

    /// The sender filters by rule name.
    pub fn filters(&self) -> SenderFilters {
        self.filters.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Tenant keys of the tenant-scoped rules that select `d`: what delivery
    /// works out per message for a connection there (nothing for a destination
    /// no such rule is about, so presets cost nothing elsewhere).
    pub fn tenant_keys_for(&self, d: &Dest<'_>) -> Vec<TenantKey> {
        let mut keys: Vec<TenantKey> = Vec::new();
        for r in &self.rules {
            // A sender filter reads the envelope, which every key brings.
            let key = match (r.scope, &r.filter) {
                (RuleScope::Tenant, _) => r.tenant_key,
                (RuleScope::Site, Some(_)) => TenantKey::SenderDomain,
                (RuleScope::Site, None) => continue,
            };
            if !keys.contains(&key) && r.selects(d) {
                keys.push(key);
            }
        }
        keys
    }

    /// The first rule that selects `d`, fits `r` and takes a reply to `tenant`'s
    /// mail (`None`: no message, or tenant facts not worked out).
    pub fn first_match(
        &self,
        d: &Dest<'_>,
        r: &ReplyFacts<'_>,
        tenant: Option<&Tenant>,
    ) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|rule| rule.takes(tenant) && rule.selects(d) && rule.fits(r))
    }

    /// How a reply to `tenant`'s mail changes its outcome: `Some(true)` permanent
    /// (bounce), `Some(false)` temporary (retry), `None` as the code says.
    pub fn classify(
        &self,
        d: &Dest<'_>,
        r: &ReplyFacts<'_>,
        tenant: Option<&Tenant>,
    ) -> Option<bool> {
        let rule = self.first_match(d, r, tenant)?;
        match (rule.action, rule.reclassify) {
            (RuleAction::Bounce, _) => Some(true),
            (RuleAction::Reclassify, Some(Reclassify::Permanent)) => Some(true),
            (RuleAction::Reclassify, Some(Reclassify::Temporary)) => Some(false),
            _ => None,
        }
    }
}

/// Who sent a message, as tenant-scoped rules tell tenants apart (lower case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenant {
    /// The envelope sender (empty for the null sender).
    pub sender: String,
    pub sender_domain: Option<String>,
    pub from_domain: Option<String>,
    pub dkim_domain: Option<String>,
    pub auth_user: Option<String>,
}

fn domain_of(addr: &str) -> Option<String> {
    let addr = addr.trim().trim_start_matches('<').trim_end_matches('>');
    let (_, d) = addr.rsplit_once('@')?;
    let d = normalize_name(d.trim());
    (!d.is_empty()).then_some(d)
}

impl Tenant {
    /// The facts of a queued message: envelope sender, AUTH user, and (when some
    /// rule keys on them) the `From:` domain and the `d=` of the first
    /// `DKIM-Signature:` (the relay signs at acceptance and puts its signature
    /// first), read from the header block only.
    pub fn of(mail_from: &str, auth_user: Option<&str>, body: &[u8], keys: &[TenantKey]) -> Self {
        let need_from = keys.contains(&TenantKey::FromDomain);
        let need_dkim = keys.contains(&TenantKey::DkimDomain);
        let mut t = Tenant {
            sender: mail_from
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_lowercase(),
            sender_domain: domain_of(mail_from),
            auth_user: auth_user.map(str::to_owned),
            ..Tenant::default()
        };
        if need_from || need_dkim {
            let (from, dkim) = header_domains(body);
            if need_from {
                t.from_domain = from;
            }
            if need_dkim {
                t.dkim_domain = dkim;
            }
        }
        t
    }

    /// The scope field for a tenant-scoped rule keyed by `key`; `egress_key` is
    /// the destination's first egress quota key.
    pub fn field(&self, key: TenantKey, egress_key: Option<&str>) -> Option<String> {
        let v = match key {
            TenantKey::SenderDomain => self.sender_domain.as_deref(),
            TenantKey::FromDomain => self.from_domain.as_deref(),
            TenantKey::DkimDomain => self.dkim_domain.as_deref(),
            TenantKey::AuthUser => self.auth_user.as_deref(),
            TenantKey::EgressKey => egress_key,
        }?;
        Some(format!("{}:{v}", key.as_str()))
    }
}

/// `From:` domain and first DKIM `d=` of a message's header block (unfolded).
fn header_domains(body: &[u8]) -> (Option<String>, Option<String>) {
    let end = memchr::memmem::find(body, b"\r\n\r\n").unwrap_or(body.len().min(64 * 1024));
    let head = String::from_utf8_lossy(&body[..end]);
    let mut fields: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push_str(line);
            }
        } else {
            fields.push(line.to_owned());
        }
    }
    let mut from = None;
    let mut dkim = None;
    for f in &fields {
        let Some((name, value)) = f.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if from.is_none() && name.eq_ignore_ascii_case("from") {
            // `Name <a@b>` or a bare address: the last `@` before a `>`.
            let v = value.rsplit_once('<').map_or(value, |(_, a)| a);
            let v = v.split('>').next().unwrap_or(v);
            from = domain_of(v);
        } else if dkim.is_none() && name.eq_ignore_ascii_case("dkim-signature") {
            dkim = value.split(';').find_map(|tag| {
                let (k, v) = tag.split_once('=')?;
                (k.trim() == "d").then(|| normalize_name(v.trim()))
            });
        }
    }
    (from, dkim)
}

/// An absolute rate: `count` units per `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub window_ms: u64,
}

/// A rate as the config writes it (`100/1m`).
pub fn rate_text(r: Rate) -> String {
    crate::config::quota::Limit {
        count: r.count,
        window: std::time::Duration::from_millis(r.window_ms),
    }
    .to_string()
}

/// How long a throttle holds its scope's mail before pacing it: the built-in
/// back-off's first step (what a rate-limit reply cost before rules existed), so a
/// provider that complains gets a breather, then the slower pace.
pub const THROTTLE_PAUSE_MS: u64 = 15_000;

/// A shared state: what a `suspend` or `throttle` rule left for a scope.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// `*` or `<tenant_key>:<value>`.
    pub field: String,
    pub action: RuleAction,
    /// Store clock, ms.
    pub until_ms: u64,
    /// `throttle.factor` (1 = none).
    pub factor: f64,
    /// `throttle.rate`.
    pub rate: Option<Rate>,
    /// `throttle.max_connections` (site scope).
    pub max_connections: Option<u32>,
    /// How long the state lasts in all (its start is `until_ms - duration_ms`).
    pub duration_ms: u64,
    /// A throttle's pause from its start (0 = none).
    pub pause_ms: u64,
    pub rule: String,
    /// The reply that started it.
    pub reply: String,
}

impl State {
    /// A state `rule` starts for `field`, before the store gives it an end.
    pub fn started_by(rule: &Rule, field: String, reply: String) -> State {
        let throttle = rule.action == RuleAction::Throttle;
        State {
            field,
            action: rule.action,
            until_ms: 0,
            factor: rule.factor,
            rate: rule.rate,
            max_connections: rule.max_connections,
            duration_ms: rule.duration_ms,
            pause_ms: if throttle {
                THROTTLE_PAUSE_MS.min(rule.duration_ms)
            } else {
                0
            },
            rule: rule.name.to_string(),
            reply,
        }
    }

    /// The store's value: `until|s or t|limits|rule|reply`, where `limits` is the
    /// factor alone, or `factor;count/window_ms;max_connections;duration;pause`
    /// (empty parts for none). The scripts read the first three fields; a value
    /// written before rates existed (the factor alone) still reads.
    pub fn encode(&self) -> String {
        let a = if self.action == RuleAction::Suspend {
            "s"
        } else {
            "t"
        };
        let mut limits = self.factor.to_string();
        if self.rate.is_some()
            || self.max_connections.is_some()
            || self.pause_ms > 0
            || self.duration_ms > 0
        {
            let rate = self
                .rate
                .map(|r| format!("{}/{}", r.count, r.window_ms))
                .unwrap_or_default();
            let maxc = self
                .max_connections
                .map(|m| m.to_string())
                .unwrap_or_default();
            limits = format!(
                "{limits};{rate};{maxc};{};{}",
                self.duration_ms, self.pause_ms
            );
        }
        format!(
            "{}|{a}|{limits}|{}|{}",
            self.until_ms, self.rule, self.reply
        )
    }

    /// The value without its end: what the store prefixes with the end it
    /// computes on its own clock.
    pub fn encode_rest(&self) -> String {
        let e = self.encode();
        e.split_once('|').map(|(_, r)| r.to_owned()).unwrap_or(e)
    }

    pub fn decode(field: &str, v: &str) -> Option<State> {
        let mut it = v.splitn(5, '|');
        let until_ms = it.next()?.parse().ok()?;
        let action = match it.next()? {
            "s" => RuleAction::Suspend,
            "t" => RuleAction::Throttle,
            _ => return None,
        };
        let mut limits = it.next()?.split(';');
        let factor = limits.next()?.parse().ok()?;
        let rate = match limits.next().unwrap_or("") {
            "" => None,
            r => {
                let (c, w) = r.split_once('/')?;
                Some(Rate {
                    count: c.parse::<u64>().ok()?.max(1),
                    window_ms: w.parse::<u64>().ok()?.max(1),
                })
            }
        };
        let max_connections = match limits.next().unwrap_or("") {
            "" => None,
            m => Some(m.parse().ok()?),
        };
        let duration_ms = limits.next().unwrap_or("0").parse().unwrap_or(0);
        let pause_ms = limits.next().unwrap_or("0").parse().unwrap_or(0);
        let rule = it.next()?.to_owned();
        let reply = it.next().unwrap_or("").to_owned();
        Some(State {
            field: field.to_owned(),
            action,
            until_ms,
            factor,
            rate,
            max_connections,
            duration_ms,
            pause_ms,
            rule,
            reply,
        })
    }

    pub fn suspends(&self, now: u64) -> bool {
        self.action == RuleAction::Suspend && self.until_ms > now
    }

    /// Until when the state holds its scope's mail: a suspension to its end, a
    /// throttle during its pause. `None` when it holds nothing at `now`.
    pub fn holds_until(&self, now: u64) -> Option<u64> {
        let until = match self.action {
            RuleAction::Suspend => self.until_ms,
            RuleAction::Throttle if self.pause_ms == 0 => 0,
            RuleAction::Throttle => self
                .until_ms
                .saturating_sub(self.duration_ms)
                .saturating_add(self.pause_ms)
                .min(self.until_ms),
            _ => 0,
        };
        (until > now).then_some(until)
    }

    /// A throttle that paces (a rate, or a factor of the route's own rate) or caps
    /// connections, in force at `now`.
    pub fn throttles(&self, now: u64) -> bool {
        self.action == RuleAction::Throttle
            && self.until_ms > now
            && (self.rate.is_some() || self.max_connections.is_some() || self.factor < 1.0)
    }
}

/// The smtp client's stage as rules name it.
pub fn stage_of(s: mailrelay_smtp::client::Stage) -> ReplyStage {
    use mailrelay_smtp::client::Stage;
    match s {
        Stage::Connect => ReplyStage::Connect,
        Stage::Greeting => ReplyStage::Greeting,
        Stage::Ehlo | Stage::StartTls | Stage::Auth => ReplyStage::Ehlo,
        Stage::Mail => ReplyStage::Mail,
        Stage::Rcpt => ReplyStage::Rcpt,
        Stage::Data | Stage::Message => ReplyStage::Data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> Rules {
        let cfg = RelayConfig::from_yaml(yaml).unwrap();
        Rules::from_config(&cfg).unwrap()
    }

    const GMAIL: &[String] = &[];

    #[test]
    fn first_match_wins_and_every_field_counts() {
        let r = rules(
            "response_rules:
  - name: tss04
    destination: { mx_hosts: ['*.yahoodns.net'] }
    match: { codes: [421], enhanced: ['4.7.0'], text: '\\[TSS04\\]', stages: [mail, rcpt, data] }
    action: suspend
    scope: tenant
    tenant_key: sender_domain
    duration: 10m
  - name: any-421
    destination: { mx_hosts: ['*.yahoodns.net'] }
    match: { codes: ['4xx'], enhanced: ['4.7.*'] }
    action: throttle
    duration: 5m
    throttle: { factor: 0.5 }
  - name: daily
    destination: { destination_domains: ['*.example'] }
    match: { codes: ['5xx'], text: '(?i)daily.*limit' }
    action: reclassify
    reclassify: temporary
  - name: ses
    destination: { smarthost: true }
    match: { codes: [454], text: 'Throttling failure' }
    action: suspend
    duration: 30s
",
        );
        let hosts = vec!["mta5.am0.yahoodns.net".to_string()];
        let yahoo = Dest {
            domain: Some("yahoo.com"),
            hosts: &hosts,
            smarthost: false,
        };
        let reply = |code, enhanced, text, stage| ReplyFacts {
            code,
            enhanced,
            text,
            stage,
        };
        let tss = reply(
            421,
            Some((4, 7, 0)),
            "[TSS04] Messages from 192.0.2.1 temporarily deferred",
            ReplyStage::Rcpt,
        );
        assert_eq!(&*r.first_match(&yahoo, &tss, None).unwrap().name, "tss04");
        // Same reply at the greeting: the stage rules the first one out.
        let at_greeting = ReplyFacts {
            stage: ReplyStage::Greeting,
            ..tss
        };
        assert_eq!(
            &*r.first_match(&yahoo, &at_greeting, None).unwrap().name,
            "any-421"
        );
        let other = reply(451, Some((4, 3, 0)), "try later", ReplyStage::Rcpt);
        assert!(r.first_match(&yahoo, &other, None).is_none());
        // Elsewhere: not selected.
        let gmail = Dest {
            domain: Some("gmail.com"),
            hosts: GMAIL,
            smarthost: false,
        };
        assert!(r.first_match(&gmail, &tss, None).is_none());
        let d = Dest {
            domain: Some("shop.example"),
            hosts: GMAIL,
            smarthost: false,
        };
        let limit = reply(
            550,
            Some((5, 4, 5)),
            "Daily sending LIMIT exceeded",
            ReplyStage::Data,
        );
        assert_eq!(r.classify(&d, &limit, None), Some(false));
        assert_eq!(
            r.classify(
                &d,
                &reply(550, None, "no such user", ReplyStage::Rcpt),
                None
            ),
            None
        );
        let ses = Dest {
            domain: None,
            hosts: GMAIL,
            smarthost: true,
        };
        let thr = reply(
            454,
            None,
            "Throttling failure: Maximum sending rate exceeded.",
            ReplyStage::Mail,
        );
        assert_eq!(&*r.first_match(&ses, &thr, None).unwrap().name, "ses");
        assert!(r.first_match(&d, &thr, None).is_none());
        assert_eq!(r.tenant_keys, vec![TenantKey::SenderDomain]);
        // Only where a tenant-scoped rule selects the destination.
        assert_eq!(r.tenant_keys_for(&yahoo), vec![TenantKey::SenderDomain]);
        assert!(r.tenant_keys_for(&gmail).is_empty());
    }

    #[test]
    fn a_sender_filter_limits_which_mail_a_rule_takes_and_its_state_holds() {
        let r = rules(
            "response_rules:
  - name: shop.tss04
    destination: { mx_hosts: ['*.provider.test'] }
    match: { codes: [421], senders: ['*@a.test', 'b.test', '<>'] }
    action: suspend
    duration: 1m
  - name: shop.by-user
    destination: { mx_hosts: ['*.provider.test'] }
    match: { codes: [451], auth_users: ['tenant-*'], senders: ['*@c.test'] }
    action: suspend
    scope: tenant
    duration: 1m
  - name: anyone
    destination: { mx_hosts: ['*.provider.test'] }
    match: { codes: [421] }
    action: bounce
",
        );
        let hosts = vec!["mx1.provider.test".to_string()];
        let d = Dest {
            domain: Some("inbox.test"),
            hosts: &hosts,
            smarthost: false,
        };
        let facts = |code| ReplyFacts {
            code,
            enhanced: None,
            text: "",
            stage: ReplyStage::Rcpt,
        };
        let t = |from: &str, user: Option<&str>| Tenant::of(from, user, b"", &[]);
        let a = t("News@A.test", None);
        let b = t("x@sub.b.test", None);
        let b_exact = t("x@B.test", None);
        let null = t("<>", None);
        let other = t("x@z.test", None);
        let name = |tenant: Option<&Tenant>, code| {
            r.first_match(&d, &facts(code), tenant)
                .map(|m| m.name.to_string())
        };
        assert_eq!(name(Some(&a), 421).as_deref(), Some("shop.tss04"));
        assert_eq!(name(Some(&b_exact), 421).as_deref(), Some("shop.tss04"));
        assert_eq!(name(Some(&null), 421).as_deref(), Some("shop.tss04"));
        // Another tenant's reply, or no message at all: the next rule.
        assert_eq!(name(Some(&other), 421).as_deref(), Some("anyone"));
        assert_eq!(name(Some(&b), 421).as_deref(), Some("anyone"));
        assert_eq!(name(None, 421).as_deref(), Some("anyone"));
        assert_eq!(r.classify(&d, &facts(421), Some(&a)), None);
        assert_eq!(r.classify(&d, &facts(421), Some(&other)), Some(true));
        // Both filter fields must match.
        let c = t("x@c.test", Some("Tenant-C"));
        assert_eq!(name(Some(&c), 451).as_deref(), Some("shop.by-user"));
        assert_eq!(name(Some(&t("x@c.test", None)), 451), None);
        assert_eq!(name(Some(&t("x@a.test", Some("tenant-c"))), 451), None);
        // A site-scoped filtered rule's state is the rule's, not the site's.
        let tss = r.first_match(&d, &facts(421), Some(&a)).unwrap();
        assert_eq!(
            tss.field(Some(&a), None).as_deref(),
            Some("rule:shop.tss04")
        );
        let by_user = r.first_match(&d, &facts(451), Some(&c)).unwrap();
        assert_eq!(
            by_user.field(Some(&c), None).as_deref(),
            Some("sender_domain:c.test")
        );
        let f = r.filters();
        assert!(f.admits("shop.tss04", Some(&a)) && !f.admits("shop.tss04", Some(&other)));
        assert!(!f.admits("shop.tss04", None));
        assert!(f.admits("anyone", None));
        // The envelope facts a filter reads come with any tenant key.
        assert_eq!(r.tenant_keys_for(&d), vec![TenantKey::SenderDomain]);
    }

    #[test]
    fn tenant_facts_come_from_the_envelope_and_headers() {
        let body = b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n\td=Shop.Example; s=sel;\r\nFrom: \"Shop\" <News@Mail.Shop.Example>\r\nSubject: x\r\n\r\nFrom: nobody@else.test\r\n";
        let t = Tenant::of(
            "bounce@Tenant-A.test",
            Some("user-a"),
            body,
            &[TenantKey::DkimDomain, TenantKey::FromDomain],
        );
        assert_eq!(t.sender_domain.as_deref(), Some("tenant-a.test"));
        assert_eq!(t.dkim_domain.as_deref(), Some("shop.example"));
        assert_eq!(t.from_domain.as_deref(), Some("mail.shop.example"));
        assert_eq!(
            t.field(TenantKey::DkimDomain, None).as_deref(),
            Some("dkim_domain:shop.example")
        );
        assert_eq!(
            t.field(TenantKey::AuthUser, None).as_deref(),
            Some("auth_user:user-a")
        );
        assert_eq!(t.field(TenantKey::EgressKey, None), None);
        // Only what rules need is parsed.
        let lean = Tenant::of("a@b.test", None, body, &[]);
        assert_eq!(lean.dkim_domain, None);
        assert_eq!(Tenant::of("", None, b"", &[]).sender_domain, None);
    }

    #[test]
    fn states_round_trip_through_the_store_encoding() {
        let s = State {
            field: "dkim_domain:shop.example".into(),
            action: RuleAction::Suspend,
            until_ms: 123_456,
            factor: 1.0,
            rate: None,
            max_connections: None,
            duration_ms: 0,
            pause_ms: 0,
            rule: "gmail-rate".into(),
            reply: "421 4.7.28 a|b".into(),
        };
        assert_eq!(State::decode(&s.field, &s.encode()), Some(s.clone()));
        assert!(s.suspends(1));
        assert!(!s.suspends(123_456));
        assert_eq!(State::decode("*", "x|s|1|r|"), None);
        // A throttle with every limit, and its pause.
        let t = State {
            field: "*".into(),
            action: RuleAction::Throttle,
            until_ms: 100_000,
            factor: 0.5,
            rate: Some(Rate {
                count: 1,
                window_ms: 60_000,
            }),
            max_connections: Some(2),
            duration_ms: 90_000,
            pause_ms: 15_000,
            rule: "microsoft-ip-reputation".into(),
            reply: "451 4.7.650 x|y".into(),
        };
        assert_eq!(
            t.encode(),
            "100000|t|0.5;1/60000;2;90000;15000|microsoft-ip-reputation|451 4.7.650 x|y"
        );
        assert_eq!(State::decode("*", &t.encode()), Some(t.clone()));
        // Started at 10 000: held until 25 000, then paced until 100 000.
        assert_eq!(t.holds_until(10_000), Some(25_000));
        assert_eq!(t.holds_until(25_000), None);
        assert!(t.throttles(25_000) && !t.throttles(100_000));
        assert_eq!(rate_text(t.rate.unwrap()), "1/1m");
        assert_eq!(
            rate_text(Rate {
                count: 100,
                window_ms: 90_000
            }),
            "100/90s"
        );
        // A value written before rates existed.
        let old = State::decode("dkim_domain:a", "5|t|0.5|r|x").unwrap();
        assert_eq!((old.factor, old.rate, old.pause_ms), (0.5, None, 0));
        assert_eq!(old.holds_until(0), None);
    }
}
