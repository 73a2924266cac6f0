//! Which envelope senders (and `From:` addresses) a client may use: each SMTP AUTH
//! user and each relay network can be bound to address/domain globs, so one tenant
//! cannot send as another. Pure data; the session asks it at MAIL and after DATA.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

/// The literal pattern that allows the null sender `<>` (bounces).
pub const NULL_SENDER: &str = "<>";

/// The bindings as configured (the relay's `sender_binding` section): the plain
/// data [`SenderPolicy`] is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderBinding {
    /// Refuse every sender of a user or relay-network client without a binding.
    pub required: bool,
    /// Also check the addresses of the `From:` header after DATA.
    pub check_from_header: bool,
    /// User name to patterns: domain globs, address globs (with `@`), `<>`.
    pub users: BTreeMap<String, Vec<String>>,
    /// The same per relay network; the most specific network wins.
    pub networks: Vec<(IpNet, Vec<String>)>,
}

/// The senders one user or network may use.
#[derive(Debug, Clone)]
pub struct Binding {
    /// `(pattern as written, lower-cased pattern, whole address?)`: a pattern with
    /// `@` matches the whole address, one without matches the domain part.
    patterns: Vec<(String, Vec<char>, bool)>,
    null_sender: bool,
}

impl Binding {
    pub fn new(patterns: &[String]) -> Self {
        let mut b = Binding {
            patterns: Vec::new(),
            null_sender: false,
        };
        for p in patterns {
            if p == NULL_SENDER {
                b.null_sender = true;
            } else {
                b.patterns.push((
                    p.clone(),
                    p.to_lowercase().chars().collect(),
                    p.contains('@'),
                ));
            }
        }
        b
    }

    /// Whether `sender` (empty for `<>`) is allowed.
    pub fn allows(&self, sender: &str) -> bool {
        if sender.is_empty() {
            return self.null_sender;
        }
        let sender: Vec<char> = sender.to_lowercase().chars().collect();
        let domain = match sender.iter().rposition(|&c| c == '@') {
            Some(at) => &sender[at + 1..],
            None => &[][..],
        };
        self.patterns.iter().any(|(_, g, whole)| {
            if *whole {
                glob_match(g, &sender)
            } else {
                !domain.is_empty() && glob_match(g, domain)
            }
        })
    }
}

/// Who a sender decision is about, for the refusal text and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User(String),
    Network(IpNet),
    /// A relay-network client with no binding while bindings are required.
    UnboundNetwork(IpAddr),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::User(u) => write!(f, "user {u}"),
            Subject::Network(n) => write!(f, "network {n}"),
            Subject::UnboundNetwork(ip) => write!(f, "client {ip}"),
        }
    }
}

/// A refused sender, for the reply, the log and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderRefusal {
    pub subject: Subject,
    pub sender: String,
    /// `mail_from` or `from_header`: the metric's `reason` label.
    pub stage: &'static str,
    /// The binding that decided (`sender_binding.users.alice`), or why none did.
    pub rule: String,
}

/// All bindings of a relay.
#[derive(Debug, Clone, Default)]
pub struct SenderPolicy {
    required: bool,
    check_from_header: bool,
    users: HashMap<String, Binding>,
    networks: Vec<(IpNet, Binding)>,
}

impl SenderPolicy {
    pub fn new(cfg: &SenderBinding) -> Self {
        SenderPolicy {
            required: cfg.required,
            check_from_header: cfg.check_from_header,
            users: cfg
                .users
                .iter()
                .map(|(u, p)| (u.clone(), Binding::new(p)))
                .collect(),
            networks: cfg
                .networks
                .iter()
                .map(|(n, senders)| (*n, Binding::new(senders)))
                .collect(),
        }
    }

    pub fn check_from_header(&self) -> bool {
        self.check_from_header
    }

    /// Decides one sender for an authenticated user, or else for a client inside
    /// `relay_networks` (`relay_client`); anyone else is not bound (it may only
    /// reach the postmaster). `None` means allowed.
    pub fn check(
        &self,
        auth_user: Option<&str>,
        relay_client: Option<IpAddr>,
        sender: &str,
        stage: &'static str,
    ) -> Option<SenderRefusal> {
        let refuse = |subject, rule: String| {
            Some(SenderRefusal {
                subject,
                sender: sender.to_owned(),
                stage,
                rule,
            })
        };
        if let Some(user) = auth_user {
            return match self.users.get(user) {
                Some(b) if b.allows(sender) => None,
                Some(_) => refuse(
                    Subject::User(user.to_owned()),
                    format!("sender_binding.users.{user}"),
                ),
                None if self.required => refuse(
                    Subject::User(user.to_owned()),
                    "sender_binding.required (user has no binding)".into(),
                ),
                None => None,
            };
        }
        let ip = relay_client?.to_canonical();
        // The most specific network wins, so a /24 can narrow a /16.
        let bound = self
            .networks
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| n.contains(&ip))
            .max_by_key(|(i, (n, _))| (n.prefix_len(), std::cmp::Reverse(*i)));
        match bound {
            Some((_, (_, b))) if b.allows(sender) => None,
            Some((i, (n, _))) => refuse(
                Subject::Network(*n),
                format!("sender_binding.networks[{i}]"),
            ),
            None if self.required => refuse(
                Subject::UnboundNetwork(ip),
                "sender_binding.required (network has no binding)".into(),
            ),
            None => None,
        }
    }
}

/// Case-folded glob match: `*` is any run of characters (also none), `?` exactly
/// one. On a mismatch after a `*`, that star swallows one more character: only the
/// last star needs remembering, so there is no exponential backtracking. The
/// relay's config globs (quota `match` patterns) match with this one too.
pub fn glob_match(p: &[char], t: &[char]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The addresses of the `From:` header(s) of a message, lower-level than a full
/// RFC 5322 parser: enough to compare mailboxes (`"Name" <a@b>`, `a@b (c)`, lists).
pub fn from_addresses(content: &[u8]) -> Vec<String> {
    let mut values: Vec<String> = Vec::new();
    let mut in_from = false;
    for line in content.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            if in_from && let Some(v) = values.last_mut() {
                v.push(' ');
                v.push_str(text.trim());
            }
            continue;
        }
        let Some((name, value)) = text.split_once(':') else {
            break;
        };
        in_from = name.trim_end().eq_ignore_ascii_case("From");
        if in_from {
            values.push(value.trim().to_owned());
        }
    }
    let mut out = Vec::new();
    for v in values {
        for part in split_outside_quotes(&v) {
            let part = strip_comments(&part);
            let addr = match (part.rfind('<'), part.rfind('>')) {
                (Some(a), Some(b)) if a < b => part[a + 1..b].trim().to_owned(),
                _ => part.trim().to_owned(),
            };
            if !addr.is_empty() {
                out.push(addr);
            }
        }
    }
    out
}

fn split_outside_quotes(v: &str) -> Vec<String> {
    let (mut parts, mut cur, mut quoted, mut angle) = (Vec::new(), String::new(), false, false);
    for c in v.chars() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
}

fn strip_comments(v: &str) -> String {
    let (mut out, mut depth, mut quoted) = (String::new(), 0usize, false);
    for c in v.chars() {
        match c {
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => {
                depth += 1;
                continue;
            }
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    fn policy(required: bool) -> SenderPolicy {
        SenderPolicy::new(&SenderBinding {
            required,
            check_from_header: true,
            users: [
                (
                    "alice".to_owned(),
                    vec!["a.example".into(), "*.a.example".into()],
                ),
                ("bob".to_owned(), vec!["bob@b.example".into(), "<>".into()]),
            ]
            .into(),
            networks: vec![
                ("10.1.0.0/16".parse().unwrap(), vec!["*@c.example".into()]),
                ("10.1.2.0/24".parse().unwrap(), vec!["app@d.example".into()]),
            ],
        })
    }

    #[test]
    fn users_are_bound_to_their_domains_and_addresses() {
        let p = policy(false);
        assert!(
            p.check(Some("alice"), None, "x@A.example", "mail_from")
                .is_none()
        );
        assert!(
            p.check(Some("alice"), None, "x@mx.a.example", "mail_from")
                .is_none()
        );
        let r = p
            .check(Some("alice"), None, "x@b.example", "mail_from")
            .unwrap();
        assert_eq!(r.subject, Subject::User("alice".into()));
        assert_eq!(r.rule, "sender_binding.users.alice");
        // A domain pattern does not match a look-alike.
        assert!(
            p.check(Some("alice"), None, "x@evila.example", "mail_from")
                .is_some()
        );
        assert!(
            p.check(Some("bob"), None, "bob@b.example", "mail_from")
                .is_none()
        );
        assert!(
            p.check(Some("bob"), None, "eve@b.example", "mail_from")
                .is_some()
        );
        // `<>` only where listed.
        assert!(p.check(Some("bob"), None, "", "mail_from").is_none());
        assert!(p.check(Some("alice"), None, "", "mail_from").is_some());
        // Unbound users keep any sender unless bindings are required.
        assert!(
            p.check(Some("carol"), None, "x@b.example", "mail_from")
                .is_none()
        );
        assert!(
            policy(true)
                .check(Some("carol"), None, "x@b.example", "mail_from")
                .is_some()
        );
    }

    #[test]
    fn networks_bind_by_most_specific_match() {
        let p = policy(false);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(
            p.check(None, ip("10.1.9.9"), "x@c.example", "mail_from")
                .is_none()
        );
        assert!(
            p.check(None, ip("10.1.2.3"), "x@c.example", "mail_from")
                .is_some()
        );
        let r = p
            .check(None, ip("10.1.2.3"), "y@c.example", "mail_from")
            .unwrap();
        assert_eq!(r.rule, "sender_binding.networks[1]");
        assert!(
            p.check(None, ip("10.1.2.3"), "app@d.example", "mail_from")
                .is_none()
        );
        assert!(
            p.check(None, ip("127.0.0.1"), "x@z.example", "mail_from")
                .is_none()
        );
        assert!(
            policy(true)
                .check(None, ip("127.0.0.1"), "x@z.example", "mail_from")
                .is_some()
        );
        // Clients outside relay_networks are not bound (they reach only the postmaster).
        assert!(
            policy(true)
                .check(None, None, "x@z.example", "mail_from")
                .is_none()
        );
    }

    #[test]
    fn from_header_addresses_are_extracted() {
        let msg = b"Subject: x\r\nFROM: \"Doe, J\" <j@a.example>,\r\n\tk@b.example (K)\r\nTo: t@x\r\n\r\nFrom: body@z\r\n";
        assert_eq!(from_addresses(msg), vec!["j@a.example", "k@b.example"]);
        assert!(from_addresses(b"Subject: x\r\n\r\n").is_empty());
    }

    #[test]
    fn globs_match_like_the_quota_globs() {
        let b = Binding::new(&["*@Example.COM".into(), "alerts-?@ops.example".into()]);
        assert!(b.allows("ALICE@example.com"));
        assert!(!b.allows("alice@example.com.evil"));
        assert!(b.allows("alerts-1@ops.example"));
        assert!(!b.allows("alerts-12@ops.example"));
        let d = Binding::new(&["*.a.example".into(), "ÉTÉ.example".into()]);
        assert!(d.allows("x@mx.A.example"));
        assert!(!d.allows("x@a.example"));
        assert!(d.allows("x@été.example"));
        assert!(
            !d.allows("été.example"),
            "a domain pattern needs an address"
        );

        // The naive recursive definition, for small inputs.
        fn naive(p: &[char], t: &[char]) -> bool {
            match p.first() {
                None => t.is_empty(),
                Some('*') => (0..=t.len()).any(|i| naive(&p[1..], &t[i..])),
                Some(c) => !t.is_empty() && (*c == '?' || *c == t[0]) && naive(&p[1..], &t[1..]),
            }
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = ['a', 'b', '*', '?'];
        for _ in 0..20_000 {
            let p: Vec<char> = (0..rng.random_range(0..7))
                .map(|_| alphabet[rng.random_range(0..4)])
                .collect();
            let t: Vec<char> = (0..rng.random_range(0..8))
                .map(|_| alphabet[rng.random_range(0..2)])
                .collect();
            assert_eq!(glob_match(&p, &t), naive(&p, &t), "{p:?} {t:?}");
        }
    }
}
