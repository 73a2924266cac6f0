//! Bounce classification: what kind of failure a reply (a remote server's, or the
//! relay's own description of a local failure) reports, as one [`Category`].
//!
//! Pure and IO-free. The rule set is the two tables at the top of this file,
//! read in order:
//!
//! 1. [`TEXT_RULES`]: phrases in the reply text. Providers put the precise reason
//!    in words (Gmail's `5.7.1` covers spam, blocklists and policy alike), so the
//!    text decides first.
//! 2. [`STATUS_RULES`]: the RFC 3463 enhanced status code (`subject.detail`), for
//!    replies whose text names nothing known.
//! 3. The reply class: `4xx` is [`Category::Transient`], `5xx` [`Category::Other`].
//!
//! `relay/tests/data/bounce-corpus.txt` holds real reply texts from public
//! provider documentation with the category each must get; the unit test below
//! runs every line of it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a failure was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// The mailbox does not exist, is disabled, or its address is invalid.
    InvalidRecipient,
    /// Over quota.
    MailboxFull,
    MessageTooLarge,
    /// Spam, virus or other content the receiver refused.
    ContentRejected,
    /// SPF, DKIM, DMARC, reverse DNS: the sender failed authentication.
    PolicyAuth,
    /// The sending IP or domain is on a blocklist or has a bad reputation.
    Reputation,
    /// Too much, too fast: volume, connections, recipients per message.
    RateLimited,
    /// No such domain, null MX, no route, a mail loop, DNS failures.
    DnsRouting,
    /// TLS required but not offered, a failed handshake, REQUIRETLS.
    TlsFailure,
    /// Temporary server or network trouble.
    Transient,
    /// The queue lifetime ended before delivery.
    Expired,
    /// A permanent failure nothing above matches.
    Other,
}

impl Category {
    pub const ALL: [Category; 12] = [
        Category::InvalidRecipient,
        Category::MailboxFull,
        Category::MessageTooLarge,
        Category::ContentRejected,
        Category::PolicyAuth,
        Category::Reputation,
        Category::RateLimited,
        Category::DnsRouting,
        Category::TlsFailure,
        Category::Transient,
        Category::Expired,
        Category::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::InvalidRecipient => "invalid_recipient",
            Category::MailboxFull => "mailbox_full",
            Category::MessageTooLarge => "message_too_large",
            Category::ContentRejected => "content_rejected",
            Category::PolicyAuth => "policy_auth",
            Category::Reputation => "reputation",
            Category::RateLimited => "rate_limited",
            Category::DnsRouting => "dns_routing",
            Category::TlsFailure => "tls_failure",
            Category::Transient => "transient",
            Category::Expired => "expired",
            Category::Other => "other",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown bounce category {0:?} (known: invalid_recipient, mailbox_full, message_too_large, content_rejected, policy_auth, reputation, rate_limited, dns_routing, tls_failure, transient, expired, other)"
)]
pub struct UnknownCategory(pub String);

impl FromStr for Category {
    type Err = UnknownCategory;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCategory(s.to_owned()))
    }
}

use Category::*;

/// Phrases (lower case, matched as substrings of the lower-cased reply), first
/// matching rule wins. Order matters where phrases overlap: TLS before expiry
/// ("certificate has expired"), authentication and blocklists before content
/// ("Spamhaus" before "spam"), DNS before unknown users ("domain ... does not
/// exist").
pub const TEXT_RULES: &[(Category, &[&str])] = &[
    (
        TlsFailure,
        &[
            "tls required",
            "tls is required",
            "must issue a starttls",
            "starttls",
            "tls handshake",
            "encryption needed",
            "encryption required",
            "requiretls",
            "without tls",
            "certificate",
        ],
    ),
    (
        Expired,
        &[
            "message expired",
            "delivery time expired",
            "queue lifetime",
            "too long in queue",
        ],
    ),
    (
        PolicyAuth,
        &[
            "spf",
            "dkim",
            "dmarc",
            "unauthenticated",
            "authentication checks",
            "authentication information",
            "authentication level",
            "sender authentication",
            "ptr record",
            "reverse dns",
            "cannot find your hostname",
        ],
    ),
    (
        Reputation,
        &[
            "spamhaus",
            "blocklist",
            "block list",
            "blacklist",
            "black list",
            "blocked using",
            "dnsbl",
            "banned sending ip",
            "reputation",
            "not accepted from this ip",
            "mail sent from your ip address has been blocked",
            "permanently deferred",
            "network is on our block",
        ],
    ),
    (
        RateLimited,
        &[
            "rate limit",
            "rate-limit",
            "too many connections",
            "too many concurrent",
            "too many messages",
            "too many recipients",
            "too quickly",
            "excessive volume",
            "unexpected volume",
            "server busy",
            "throttl",
            "try again in",
        ],
    ),
    (
        ContentRejected,
        &[
            "spam",
            "unsolicited",
            "content",
            "virus",
            "malware",
            "phishing",
            "security issue",
            "policy reasons",
            "policy restrictions",
            "due to local policy",
        ],
    ),
    (
        MessageTooLarge,
        &[
            "too large",
            "too big",
            "size limit",
            "message size",
            "size exceeds",
            "exceeds the maximum size",
        ],
    ),
    (
        MailboxFull,
        &[
            "over quota",
            "quota exceeded",
            "quotaexceeded",
            "mailbox full",
            "mailbox is full",
            "exceeded storage allocation",
            "out of storage",
        ],
    ),
    (
        DnsRouting,
        &[
            "null mx",
            "no mail server",
            "nonexistentdomain",
            "nonexistent domain",
            "domain not found",
            "find the recipient domain",
            "unable to route",
            "relay access denied",
            "loops back to myself",
            "mail loop",
            "hop count exceeded",
            "mx lookup",
            "a lookup",
            "aaaa lookup",
            "no such host",
            "no a or aaaa records",
            "failed to lookup",
        ],
    ),
    (
        InvalidRecipient,
        &[
            "user unknown",
            "unknown user",
            "no such user",
            "no such recipient",
            "unknown recipient",
            "invalid recipient",
            "recipient not found",
            "recipnotfound",
            "recipientnotfound",
            "user not found",
            "mailbox not found",
            "mailbox unavailable",
            "mailbox is unavailable",
            "does not exist",
            "doesn't exist",
            "doesn't have a",
            "unrouteable address",
            "recipient address rejected",
            "is disabled",
            "inactive email address",
            "account has been disabled",
        ],
    ),
    (
        Transient,
        &[
            "try again later",
            "temporar",
            "insufficient system",
            "system problem",
            "local problem",
            "connection failed",
            "connection lost",
            "timed out",
        ],
    ),
];

/// Enhanced status `subject.detail` (either class) to category, for replies whose
/// text matched nothing (RFC 3463 §3, RFC 5248's registry, RFC 7372, RFC 7505).
pub const STATUS_RULES: &[((u16, u16), Category)] = &[
    ((1, 1), InvalidRecipient), // bad destination mailbox address
    ((1, 3), InvalidRecipient), // bad destination mailbox address syntax
    ((1, 6), InvalidRecipient), // destination mailbox has moved
    ((2, 1), InvalidRecipient), // mailbox disabled
    ((1, 2), DnsRouting),       // bad destination system address
    ((1, 10), DnsRouting),      // RFC 7505: recipient domain has a null MX
    ((2, 2), MailboxFull),      // mailbox full
    ((2, 3), MessageTooLarge),  // message length exceeds administrative limit
    ((3, 4), MessageTooLarge),  // message too big for system
    ((3, 1), Transient),        // mail system full
    ((3, 2), Transient),        // system not accepting network messages
    ((4, 1), Transient),        // no answer from host
    ((4, 2), Transient),        // bad connection
    ((4, 3), DnsRouting),       // directory server failure
    ((4, 4), DnsRouting),       // unable to route
    ((4, 6), DnsRouting),       // routing loop detected
    ((4, 5), RateLimited),      // system congestion
    ((4, 7), Expired),          // delivery time expired
    ((5, 3), RateLimited),      // too many recipients
    ((6, 0), ContentRejected),  // other or undefined media error
    ((6, 1), ContentRejected),  // media not supported
    ((7, 1), ContentRejected),  // delivery not authorized, message refused
    ((7, 4), TlsFailure),       // security features not supported
    ((7, 5), TlsFailure),       // cryptographic failure
    ((7, 10), TlsFailure),      // encryption needed
    ((7, 11), TlsFailure),      // encryption required for requested authentication mechanism
    ((7, 20), PolicyAuth),      // RFC 7372: no passing DKIM signature
    ((7, 21), PolicyAuth),      // no acceptable DKIM signature
    ((7, 22), PolicyAuth),      // no valid author-matched DKIM signature
    ((7, 23), PolicyAuth),      // SPF validation failed
    ((7, 24), PolicyAuth),      // SPF validation error
    ((7, 25), PolicyAuth),      // reverse DNS validation failed
    ((7, 26), PolicyAuth),      // multiple authentication checks failed
    ((7, 28), RateLimited),     // mail flood detected
    ((7, 30), TlsFailure),      // RFC 8689: REQUIRETLS support required
];

/// Classifies a reply: `code` (e.g. 550), its enhanced status if any, and its text
/// (every line; case does not matter).
pub fn classify(code: u16, enhanced: Option<(u8, u16, u16)>, text: &str) -> Category {
    let lower = text.to_ascii_lowercase();
    for (category, phrases) in TEXT_RULES {
        if phrases.iter().any(|p| lower.contains(p)) {
            return *category;
        }
    }
    if let Some((_, s, d)) = enhanced
        && let Some((_, c)) = STATUS_RULES.iter().find(|(k, _)| *k == (s, d))
    {
        return *c;
    }
    match code / 100 {
        4 => Transient,
        _ => Other,
    }
}

/// Classifies a reply as stored in an attempt (`550 5.1.1 text`, or the multi-line
/// `550-5.1.1 ...\r\n550 5.1.1 ...`). A line without a code counts as a `5xx`.
pub fn classify_reply(reply: &str) -> Category {
    let (code, enhanced) = parse_codes(reply);
    classify(code, enhanced, reply)
}

/// Failures the relay finds by itself, without a reply from a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFailure {
    /// DNS failed (temporarily or with no such domain) or the domain has a null MX.
    Dns,
    /// Could not connect, or the connection broke.
    Connect,
    /// TLS was required but not offered, or the handshake failed.
    Tls,
    /// The maximum queue lifetime was reached.
    QueueLifetime,
}

pub fn classify_local(f: LocalFailure) -> Category {
    match f {
        LocalFailure::Dns => DnsRouting,
        LocalFailure::Connect => Transient,
        LocalFailure::Tls => TlsFailure,
        LocalFailure::QueueLifetime => Expired,
    }
}

/// The reply code and enhanced status of a reply's first line.
fn parse_codes(reply: &str) -> (u16, Option<(u8, u16, u16)>) {
    let line = reply.lines().next().unwrap_or("").trim_start();
    let code = line
        .get(..3)
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse().ok())
        .unwrap_or(500);
    let rest = line.get(3..).unwrap_or("");
    let rest = rest.strip_prefix(['-', ' ']).unwrap_or(rest);
    let enhanced = rest.split_whitespace().next().and_then(|tok| {
        let mut it = tok.split('.');
        let class: u8 = it.next()?.parse().ok()?;
        let subject: u16 = it.next()?.parse().ok()?;
        let detail: u16 = it.next()?.parse().ok()?;
        (it.next().is_none() && matches!(class, 2 | 4 | 5)).then_some((class, subject, detail))
    });
    (code, enhanced)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of the corpus: `category | reply | source`.
    #[test]
    fn the_corpus_of_real_replies_is_classified_as_expected() {
        let corpus = include_str!("../../tests/data/bounce-corpus.txt");
        let mut wrong = Vec::new();
        let mut n = 0;
        let mut seen = std::collections::BTreeSet::new();
        for (i, line) in corpus.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(3, " | ");
            let (Some(want), Some(reply), Some(source)) =
                (parts.next(), parts.next(), parts.next())
            else {
                panic!("corpus line {}: want `category | reply | source`", i + 1);
            };
            assert!(!source.trim().is_empty(), "line {}: no source", i + 1);
            let want: Category = want.trim().parse().unwrap();
            seen.insert(want);
            n += 1;
            let got = classify_reply(reply);
            if got != want {
                wrong.push(format!("line {}: {reply:?}: want {want}, got {got}", i + 1));
            }
        }
        assert!(n >= 60, "corpus has only {n} replies");
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // Every category but `expired` and `other` (only the relay says those) is
        // seen from real servers.
        for c in Category::ALL {
            if !matches!(c, Other) {
                assert!(seen.contains(&c), "no corpus line for {c}");
            }
        }
    }

    #[test]
    fn codes_are_read_from_the_first_line() {
        assert_eq!(parse_codes("550 5.1.1 x"), (550, Some((5, 1, 1))));
        assert_eq!(
            parse_codes("550-5.1.1 The email\r\n550 5.1.1 more"),
            (550, Some((5, 1, 1)))
        );
        assert_eq!(parse_codes("554 delivery error"), (554, None));
        assert_eq!(parse_codes("nonsense"), (500, None));
        assert_eq!(parse_codes("452 4.5.3.1 x"), (452, None));
    }

    #[test]
    fn the_status_code_decides_when_the_text_says_nothing_known() {
        assert_eq!(classify_reply("550 5.1.1 nope"), InvalidRecipient);
        assert_eq!(classify_reply("452 4.2.2 nope"), MailboxFull);
        assert_eq!(classify_reply("550 5.7.23 nope"), PolicyAuth);
        assert_eq!(classify_reply("451 4.4.7 nope"), Expired);
        assert_eq!(classify_reply("451 nope"), Transient);
        assert_eq!(classify_reply("554 nope"), Other);
    }

    #[test]
    fn local_failures_have_their_category() {
        assert_eq!(classify_local(LocalFailure::Dns), DnsRouting);
        assert_eq!(classify_local(LocalFailure::Connect), Transient);
        assert_eq!(classify_local(LocalFailure::Tls), TlsFailure);
        assert_eq!(classify_local(LocalFailure::QueueLifetime), Expired);
    }

    #[test]
    fn the_config_knows_the_same_category_names() {
        let names: Vec<&str> = Category::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names, crate::config::suppression::CATEGORY_NAMES);
    }

    #[test]
    fn category_names_round_trip_and_unknown_names_are_refused() {
        for c in Category::ALL {
            assert_eq!(c.as_str().parse::<Category>().unwrap(), c);
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
        }
        let e = "user_unknown".parse::<Category>().unwrap_err();
        assert!(e.to_string().contains("user_unknown"), "{e}");
    }
}
