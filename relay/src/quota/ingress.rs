//! Which ingress quotas a message falls under, with what key and what cost, and the
//! SMTP replies that say no. Pure functions of the config and the envelope.
//!
//! Matching: every field a quota's `match` lists must match (AND); within a field any
//! entry may (OR); an empty `match` takes all mail. `senders` entries with an `@`
//! are address globs, entries without are domain globs (`<>` names the null
//! sender); `recipient_domains` makes the quota apply to a message with at least
//! one recipient there, and with `unit: recipients` only those recipients count.

use std::borrow::Cow;
use std::net::IpAddr;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::config::{Action, Direction, KeyBy, Limit, QuotaConfig, Scope, Unit};
use super::glob::Glob;
use super::window::WindowSpec;
use mailrelay_smtp::Reply;
pub use mailrelay_smtp::policy::{IngressFacts, IngressPolicy, Refusal};

/// [`IngressFacts`] prepared for matching many quotas: lower-cased once.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Lower-cased reverse-path; empty for the null sender.
    sender: String,
    /// Where the domain starts in `sender` (after the last `@`), if it has one.
    domain_at: Option<usize>,
    auth_user: Option<String>,
    ip: IpAddr,
}

impl Subject {
    pub fn new(f: &IngressFacts) -> Self {
        let sender = f.sender.to_lowercase();
        let domain_at = sender.rfind('@').map(|i| i + 1);
        Subject {
            sender,
            domain_at,
            auth_user: f.auth_user.map(str::to_lowercase),
            ip: f.client_ip.to_canonical(),
        }
    }

    fn domain(&self) -> Option<&str> {
        self.domain_at
            .map(|i| self.sender[i..].trim_end_matches('.'))
    }
}

#[derive(Debug, Clone)]
enum SenderPattern {
    Address(Glob),
    Domain(Glob),
    Null,
}

/// A quota ready for matching: globs compiled, limits in milliseconds.
#[derive(Debug, Clone)]
pub struct CompiledQuota {
    pub cfg: QuotaConfig,
    pub windows: Vec<WindowSpec>,
    senders: Vec<SenderPattern>,
    auth_users: Vec<Glob>,
    recipient_domains: Vec<Glob>,
}

/// The shared key of `scope: shared` quotas (and what the usage API shows).
pub const SHARED_KEY: &str = "*";

fn domain_of(address: &str) -> Option<&str> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.'))
}

impl CompiledQuota {
    pub fn new(cfg: &QuotaConfig) -> Self {
        let m = &cfg.matcher;
        CompiledQuota {
            windows: cfg.limits.iter().map(WindowSpec::of).collect(),
            senders: m
                .senders
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
            auth_users: m.auth_users.iter().map(|p| Glob::new(p)).collect(),
            recipient_domains: m.recipient_domains.iter().map(|p| Glob::new(p)).collect(),
            cfg: cfg.clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn is_ingress(&self) -> bool {
        self.cfg.direction == Direction::Ingress
    }

    /// Whether the quota looks at recipients at all (else it is decided at MAIL).
    pub fn needs_recipients(&self) -> bool {
        !self.recipient_domains.is_empty()
    }

    /// Sender, AUTH user and client network all match.
    pub fn matches_client(&self, s: &Subject) -> bool {
        let m = &self.cfg.matcher;
        let sender_ok = self.senders.is_empty()
            || self.senders.iter().any(|p| match p {
                SenderPattern::Null => s.sender.is_empty(),
                SenderPattern::Address(g) => !s.sender.is_empty() && g.is_match_lower(&s.sender),
                SenderPattern::Domain(g) => s.domain().is_some_and(|d| g.is_match_lower(d)),
            });
        let auth_ok = self.auth_users.is_empty()
            || s.auth_user
                .as_deref()
                .is_some_and(|u| self.auth_users.iter().any(|g| g.is_match_lower(u)));
        let net_ok =
            m.client_networks.is_empty() || m.client_networks.iter().any(|n| n.contains(&s.ip));
        sender_ok && auth_ok && net_ok
    }

    /// Whether this recipient is one the quota counts.
    pub fn counts_recipient(&self, rcpt: &str) -> bool {
        self.recipient_domains.is_empty()
            || domain_of(rcpt).is_some_and(|d| self.recipient_domains.iter().any(|g| g.is_match(d)))
    }

    /// The counter key for this sender: see [`KeyBy`]; lower-cased so that case
    /// games do not buy a fresh quota.
    pub fn key<'s>(&self, s: &'s Subject) -> Cow<'s, str> {
        if self.cfg.scope == Scope::Shared {
            return Cow::Borrowed(SHARED_KEY);
        }
        let sender = || {
            Cow::Borrowed(if s.sender.is_empty() {
                "<>"
            } else {
                s.sender.as_str()
            })
        };
        match self.cfg.key {
            KeyBy::Auto => s.auth_user.as_deref().map_or_else(sender, Cow::Borrowed),
            KeyBy::Sender => sender(),
            KeyBy::SenderDomain => s.domain().map_or_else(sender, Cow::Borrowed),
            KeyBy::AuthUser => Cow::Borrowed(s.auth_user.as_deref().unwrap_or_default()),
            KeyBy::ClientIp => Cow::Owned(s.ip.to_string()),
            // Egress keys are refused for ingress quotas by validation.
            KeyBy::DestinationDomain | KeyBy::MxSite => Cow::Borrowed(SHARED_KEY),
        }
    }

    /// What a message costs against this quota, or `None` when the quota does not
    /// apply to it.
    pub fn cost(&self, f: &Subject, rcpts: &[&str], size: u64) -> Option<u64> {
        if !self.is_ingress() || !self.matches_client(f) {
            return None;
        }
        let counted = rcpts.iter().filter(|r| self.counts_recipient(r)).count() as u64;
        if self.needs_recipients() && counted == 0 {
            return None;
        }
        Some(match self.cfg.unit {
            Unit::Messages => 1,
            Unit::Recipients => counted,
            Unit::Bytes => size,
        })
    }
}

/// The quotas in force, compiled. Replaced whole on reload.
#[derive(Debug, Clone, Default)]
pub struct QuotaSet {
    pub quotas: Vec<CompiledQuota>,
    /// Names of the quotas with `unit: recipients` (what is learned from a check
    /// differs for them).
    recipients_unit: std::collections::HashSet<String>,
}

/// One ingress quota a message falls under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applies {
    /// Index into [`QuotaSet::quotas`].
    pub index: usize,
    pub key: String,
    pub cost: u64,
    pub action: Action,
}

impl QuotaSet {
    pub fn compile(cfgs: &[QuotaConfig]) -> Self {
        QuotaSet {
            quotas: cfgs.iter().map(CompiledQuota::new).collect(),
            recipients_unit: cfgs
                .iter()
                .filter(|q| q.unit == Unit::Recipients)
                .map(|q| q.name.clone())
                .collect(),
        }
    }

    /// Whether the quota of this name counts recipients.
    pub fn counts_recipients(&self, name: &str) -> bool {
        !self.recipients_unit.is_empty() && self.recipients_unit.contains(name)
    }

    pub fn get(&self, name: &str) -> Option<&CompiledQuota> {
        self.quotas.iter().find(|q| q.name() == name)
    }

    pub fn has_ingress(&self) -> bool {
        self.quotas.iter().any(CompiledQuota::is_ingress)
    }

    /// Every ingress quota the message falls under, in config order.
    pub fn ingress(&self, f: &IngressFacts, rcpts: &[&str], size: u64) -> Vec<Applies> {
        let s = Subject::new(f);
        self.quotas
            .iter()
            .enumerate()
            .filter_map(|(index, q)| {
                q.cost(&s, rcpts, size).map(|cost| Applies {
                    index,
                    key: q.key(&s).into_owned(),
                    cost,
                    action: q.cfg.action,
                })
            })
            .collect()
    }

    /// The first limit the cost alone exceeds: such a message can never pass.
    pub fn oversized<'a>(&'a self, a: &Applies) -> Option<(&'a CompiledQuota, &'a Limit)> {
        let q = &self.quotas[a.index];
        q.cfg
            .limits
            .iter()
            .find(|l| a.cost > l.count)
            .map(|l| (q, l))
    }
}

/// `2026-11-29T05:01:00Z` (rounded up to the second).
pub fn rfc3339(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp(ms.div_ceil(1000) as i64)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// `451 4.7.1`: over the limit; says which and when to come back.
pub fn exceeded(q: &CompiledQuota, limit: &Limit, retry_at_ms: u64, now_ms: u64) -> Refusal {
    let secs = retry_at_ms.saturating_sub(now_ms).div_ceil(1000).max(1);
    Refusal {
        reply: Reply::status(
            451,
            (4, 7, 1),
            format!(
                "Sending quota {} exceeded ({limit}); try again in {secs}s (resets at {})",
                q.name(),
                rfc3339(retry_at_ms)
            ),
        ),
        reason: "quota_exceeded",
        quota: Some(q.name().to_owned()),
    }
}

/// `452 4.5.3`: more recipients than the quota allows now; the client sends the
/// others in another transaction.
pub fn too_many_recipients(q: &CompiledQuota, limit: &Limit, allowed_now: u64) -> Refusal {
    Refusal {
        reply: Reply::status(
            452,
            (4, 5, 3),
            format!(
                "Too many recipients for sending quota {} ({limit}); {allowed_now} allowed now",
                q.name()
            ),
        ),
        reason: "quota_recipients",
        quota: Some(q.name().to_owned()),
    }
}

/// `552 5.3.4`: the message alone is more than a bytes quota allows in a window.
pub fn too_big(q: &CompiledQuota, limit: &Limit) -> Refusal {
    Refusal {
        reply: Reply::status(
            552,
            (5, 3, 4),
            format!(
                "Message size exceeds sending quota {} ({limit} bytes)",
                q.name()
            ),
        ),
        reason: "quota_size",
        quota: Some(q.name().to_owned()),
    }
}

/// `451 4.3.0`: the counters in the `store` backend (`redis`, `embedded`) could
/// not be read; nothing is accepted unchecked.
pub fn unavailable(store: &str) -> Refusal {
    Refusal {
        reply: Reply::status(
            451,
            (4, 3, 0),
            format!(
                "Sending quota check unavailable: quota store ({store}) unavailable, try again later"
            ),
        ),
        reason: "quota_unavailable",
        quota: None,
    }
}

/// `451 4.3.1`: the message and its charge were to be stored in one call, and the
/// queue store is full; the same words as a plain enqueue into a full store.
pub fn queue_full() -> Refusal {
    Refusal {
        // Only the Redis store checks and stores in one call.
        reply: Reply::status(
            451,
            (4, 3, 1),
            "Error: queue store (redis) full, try again later",
        ),
        reason: "queue_full",
        quota: None,
    }
}

/// The refusal for a message whose cost alone exceeds a limit.
pub fn never_fits(q: &CompiledQuota, limit: &Limit) -> Refusal {
    match q.cfg.unit {
        Unit::Bytes => too_big(q, limit),
        Unit::Recipients => too_many_recipients(q, limit, limit.count),
        // A message costs 1 and limits are at least 1.
        Unit::Messages => too_many_recipients(q, limit, limit.count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(yaml: &str) -> CompiledQuota {
        let cfg: QuotaConfig = serde_norway::from_str(yaml).unwrap();
        CompiledQuota::new(&cfg)
    }

    fn facts(sender: &str, user: Option<&str>, ip: &str) -> Subject {
        Subject::new(&IngressFacts {
            sender,
            auth_user: user,
            client_ip: ip.parse().unwrap(),
        })
    }

    #[test]
    fn fields_and_within_or() {
        let q = quota(
            "{name: a, direction: ingress, limits: [1/1m], match: {senders: ['*@a.example', 'b.example', '<>'], client_networks: [10.0.0.0/8, '::1/128']}}",
        );
        assert!(q.matches_client(&facts("x@A.example", None, "10.1.2.3")));
        assert!(!q.matches_client(&facts("x@sub.b.example", None, "10.1.2.3")));
        assert!(q.matches_client(&facts("x@B.EXAMPLE", None, "10.1.2.3")));
        assert!(q.matches_client(&facts("", None, "::1")));
        assert!(!q.matches_client(&facts("x@a.example", None, "192.0.2.1")));
        assert!(!q.matches_client(&facts("x@c.example", None, "10.0.0.1")));
        // IPv4-mapped IPv6 clients are their IPv4 address.
        assert!(q.matches_client(&facts("x@a.example", None, "::ffff:10.0.0.1")));

        let u =
            quota("{name: u, direction: ingress, limits: [1/1m], match: {auth_users: ['pay*']}}");
        assert!(u.matches_client(&facts("x@y", Some("Payments"), "127.0.0.1")));
        assert!(!u.matches_client(&facts("x@y", None, "127.0.0.1")));
        assert!(!u.matches_client(&facts("x@y", Some("ops"), "127.0.0.1")));

        let all = quota("{name: all, direction: ingress, limits: [1/1m]}");
        assert!(all.matches_client(&facts("", None, "192.0.2.1")));
        let null_is_not_a_domain =
            quota("{name: d, direction: ingress, limits: [1/1m], match: {senders: ['*']}}");
        assert!(!null_is_not_a_domain.matches_client(&facts("", None, "127.0.0.1")));
        assert!(null_is_not_a_domain.matches_client(&facts("a@b", None, "127.0.0.1")));
    }

    #[test]
    fn keys() {
        let f = facts("Alice@Example.COM", Some("Svc"), "::ffff:192.0.2.9");
        let anon = facts("Alice@Example.COM", None, "192.0.2.9");
        let key = |k: &str, f: &Subject| {
            quota(&format!(
                "{{name: a, direction: ingress, limits: [1/1m], key: {k}}}"
            ))
            .key(f)
            .into_owned()
        };
        assert_eq!(key("auto", &f), "svc");
        assert_eq!(key("auto", &anon), "alice@example.com");
        assert_eq!(key("sender", &f), "alice@example.com");
        assert_eq!(key("sender_domain", &f), "example.com");
        assert_eq!(key("auth_user", &anon), "");
        assert_eq!(key("client_ip", &f), "192.0.2.9");
        assert_eq!(key("sender", &facts("", None, "127.0.0.1")), "<>");
        let shared = quota("{name: a, direction: ingress, limits: [1/1m], scope: shared}");
        assert_eq!(shared.key(&f), SHARED_KEY);
    }

    #[test]
    fn costs_and_recipient_domains() {
        let raw = IngressFacts {
            sender: "a@s.example",
            auth_user: None,
            client_ip: "127.0.0.1".parse().unwrap(),
        };
        let f = Subject::new(&raw);
        let rcpts = ["x@gmail.com", "y@GMAIL.com", "z@other.example"];
        let msgs = quota("{name: m, direction: ingress, limits: [5/1m]}");
        assert_eq!(msgs.cost(&f, &rcpts, 900), Some(1));
        let r = quota("{name: r, direction: ingress, limits: [5/1m], unit: recipients}");
        assert_eq!(r.cost(&f, &rcpts, 900), Some(3));
        let b = quota("{name: b, direction: ingress, limits: [5/1m], unit: bytes}");
        assert_eq!(b.cost(&f, &rcpts, 900), Some(900));
        let g = quota(
            "{name: g, direction: ingress, limits: [5/1m], unit: recipients, match: {recipient_domains: [gmail.com]}}",
        );
        assert_eq!(g.cost(&f, &rcpts, 900), Some(2));
        assert_eq!(g.cost(&f, &["z@other.example"], 900), None);
        let e = quota("{name: e, direction: egress, limits: [5/1m]}");
        assert_eq!(
            e.cost(&f, &rcpts, 900),
            None,
            "egress quotas never apply to ingress"
        );

        let set = QuotaSet {
            quotas: vec![msgs, g, e],
            ..QuotaSet::default()
        };
        let applies = set.ingress(&raw, &rcpts, 900);
        assert_eq!(
            applies,
            vec![
                Applies {
                    index: 0,
                    key: "a@s.example".into(),
                    cost: 1,
                    action: Action::Reject
                },
                Applies {
                    index: 1,
                    key: "a@s.example".into(),
                    cost: 2,
                    action: Action::Reject
                },
            ]
        );
        assert!(set.oversized(&applies[1]).is_none());
        let big = Applies {
            cost: 6,
            ..applies[1].clone()
        };
        assert_eq!(set.oversized(&big).unwrap().1.count, 5);
    }

    #[test]
    fn replies_name_the_quota_and_the_reset() {
        let q = quota("{name: tenant-a, direction: ingress, limits: [100/1m]}");
        let l = &q.cfg.limits[0];
        let r = exceeded(&q, l, 1_800_000_031_500, 1_800_000_000_000);
        assert_eq!(r.reply.code, 451);
        let text = r.reply.lines[0].clone();
        assert_eq!(
            text,
            "Sending quota tenant-a exceeded (100/1m); try again in 32s (resets at 2027-01-15T08:00:32Z)"
        );
        assert_eq!(too_many_recipients(&q, l, 3).reply.code, 452);
        assert_eq!(too_big(&q, l).reply.code, 552);
        let u = unavailable("redis");
        assert_eq!(u.reply.code, 451);
        assert!(
            u.reply
                .to_string()
                .contains("quota store (redis) unavailable")
        );
    }
}
