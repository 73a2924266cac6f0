//! Which transport security one destination gets, decided per delivery:
//!
//! 1. a configured override (`tls` of a route or the smarthost, or the first
//!    `delivery.tls_policies` entry matching the recipient domain) that is not
//!    `auto` wins;
//! 2. otherwise (`auto`, the default for MX delivery) the destination's published
//!    policy: DANE per MX host ([`dane`], asked first and winning over MTA-STS,
//!    RFC 8461 §2), then MTA-STS ([`mta_sts`], fetched by [`fetch`] and cached by
//!    [`cache`]); `dane` is DANE then opportunistic;
//! 3. with no published policy, opportunistic STARTTLS.
//!
//! The answer ([`Decision`]) tells the scheduler which MX hosts it may use and which
//! TLS client policy to run; after the attempt it turns into the
//! [`TransportSecurity`] record kept with the attempt.

pub mod cache;
pub mod dane;
pub mod dane_verify;
pub mod fetch;
pub mod metrics;
pub mod mta_sts;

use std::sync::Arc;

pub use self::cache::{SharedPolicies, StsCache};
use self::mta_sts::Mode;
use crate::config::TlsPolicy;
pub use crate::queue::TransportSecurity;

/// The transport security of one destination for one delivery round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What the SMTP client runs: `Required` verifies the certificate chain and the
    /// host name; never `Auto`.
    pub client: TlsPolicy,
    /// The MTA-STS policy in force (mode `enforce` or `testing`), if any.
    pub sts: Option<Arc<cache::Cached>>,
    /// Why a published policy could not be used (fetch or syntax trouble with
    /// nothing cached): recorded with the attempt.
    pub note: Option<String>,
    /// Where the decision came from, for the record: `opportunistic`, `required`,
    /// `disabled` (configured) or `mta-sts`.
    pub source: &'static str,
    /// Whether each host's TLSA records are asked first ([`dane`]): `auto` and
    /// `dane`.
    pub dane: bool,
}

impl Decision {
    /// A configured policy, as is (`auto` has been resolved before).
    pub fn fixed(p: TlsPolicy) -> Self {
        let source = match p {
            TlsPolicy::Required => "required",
            TlsPolicy::Disabled => "disabled",
            TlsPolicy::Opportunistic | TlsPolicy::Auto | TlsPolicy::Dane => "opportunistic",
        };
        let client = if matches!(p, TlsPolicy::Auto | TlsPolicy::Dane) {
            TlsPolicy::Opportunistic
        } else {
            p
        };
        Decision {
            client,
            sts: None,
            note: None,
            source,
            dane: p == TlsPolicy::Dane,
        }
    }

    /// For `auto`: what the MTA-STS lookup found.
    pub fn from_sts(found: cache::Lookup) -> Self {
        match found.policy {
            Some(c) if c.policy.mode != Mode::None => Decision {
                client: if c.policy.mode == Mode::Enforce {
                    TlsPolicy::Required
                } else {
                    TlsPolicy::Opportunistic
                },
                sts: Some(c),
                note: found.note,
                source: "mta-sts",
                dane: false,
            },
            _ => Decision {
                note: found.note,
                ..Decision::fixed(TlsPolicy::Opportunistic)
            },
        }
    }

    /// RFC 8689 §5 `TLS-Required: No` on every message of the connection: the
    /// published policy is recorded but not enforced (TLS is still used when
    /// offered, its certificate unchecked, and every MX host is tried).
    pub fn relaxed(mut self) -> Self {
        self.dane = false;
        if self.source == "mta-sts" {
            self.client = TlsPolicy::Opportunistic;
            self.source = "mta-sts-relaxed";
            let why = "TLS-Required: No: the published policy is not enforced".to_owned();
            self.note = Some(match self.note.take() {
                Some(n) => format!("{n}; {why}"),
                None => why,
            });
        }
        self
    }

    fn mode(&self) -> Option<Mode> {
        self.sts.as_ref().map(|c| c.policy.mode)
    }

    /// With an `enforce` policy, the MX hosts it allows are kept (in order) and the
    /// others named in the error when none is left. Other policies keep all hosts.
    pub fn filter_mx<T>(&self, hosts: Vec<T>, name: impl Fn(&T) -> &str) -> Result<Vec<T>, String> {
        let Some(c) = self
            .sts
            .as_ref()
            .filter(|c| c.policy.mode == Mode::Enforce && self.client == TlsPolicy::Required)
        else {
            return Ok(hosts);
        };
        let (keep, drop): (Vec<T>, Vec<T>) =
            hosts.into_iter().partition(|h| c.policy.allows_mx(name(h)));
        if keep.is_empty() {
            let mut names: Vec<&str> = drop.iter().map(&name).collect();
            names.dedup();
            return Err(format!(
                "MTA-STS: {} not in policy {} (enforce)",
                if names.is_empty() {
                    "no MX host".to_owned()
                } else {
                    names.join(", ")
                },
                c.id
            ));
        }
        Ok(keep)
    }

    /// The record of an attempt under this decision: `mx` the host tried (if one
    /// answered), `verified` what checking its certificate chain and name against
    /// the trust store said (`None`: no TLS session).
    pub fn outcome(
        &self,
        mx: Option<&str>,
        verified: Option<&Result<(), String>>,
    ) -> TransportSecurity {
        let mut failures: Vec<String> = self.note.iter().cloned().collect();
        if let (Some(c), Some(mx)) = (&self.sts, mx)
            && !c.policy.allows_mx(mx)
        {
            failures.push(format!("MTA-STS: {mx} not in policy {}", c.id));
        }
        if self.mode() == Some(Mode::Testing) || self.mode() == Some(Mode::Enforce) {
            match verified {
                None if mx.is_some() => failures.push("MTA-STS: no TLS session".into()),
                Some(Err(e)) => failures.push(format!("MTA-STS: certificate not valid: {e}")),
                _ => {}
            }
        }
        TransportSecurity {
            policy: self.source.to_owned(),
            mode: self.mode().map(|m| m.as_str().to_owned()),
            policy_id: self.sts.as_ref().map(|c| c.id.clone()),
            verified: verified.map(|v| v.is_ok()),
            failure: (!failures.is_empty()).then(|| failures.join("; ")),
            dane: None,
        }
    }
}

/// Whether the message's header section has `TLS-Required: No` (RFC 8689 §5),
/// the sender's wish that delivery not fail for want of authenticated TLS.
pub fn tls_required_no(message: &[u8]) -> bool {
    let end = memchr::memmem::find(message, b"\r\n\r\n").map_or(message.len(), |e| e + 2);
    message[..end]
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&b| b == b':')?;
            line[..colon]
                .eq_ignore_ascii_case(b"TLS-Required")
                .then(|| &line[colon + 1..])
        })
        .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"No"))
}

/// Domain patterns of `delivery.tls_policies`: exact names, and `.parent` for every
/// subdomain (the same form as routes); the first entry that matches wins.
pub fn override_for(entries: &[crate::config::TlsPolicyEntry], domain: &str) -> Option<TlsPolicy> {
    entries
        .iter()
        .find(|e| {
            e.domains.iter().any(|d| {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                match d.strip_prefix('.') {
                    Some(parent) => domain
                        .strip_suffix(parent)
                        .is_some_and(|head| head.ends_with('.') && head.len() > 1),
                    None => d == domain,
                }
            })
        })
        .map(|e| e.tls)
}

/// The values of the TXT records among `answers`, each record's strings joined
/// into one value (RFC 8461 §3.1, RFC 8460 §3: a record may be split into
/// strings anywhere).
pub(crate) fn txt_values(answers: &[hickory_resolver::proto::rr::Record]) -> Vec<Vec<u8>> {
    answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_resolver::proto::rr::RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mta_sts::Policy;

    fn sts(mode: Mode) -> Decision {
        Decision::from_sts(cache::Lookup {
            policy: Some(Arc::new(cache::Cached {
                id: "id1".into(),
                policy: Policy {
                    mode,
                    mx: vec!["mx.a.test".into(), "*.b.test".into()],
                    max_age: 60,
                },
                expires_at_ms: u64::MAX,
            })),
            note: None,
        })
    }

    #[test]
    fn enforce_keeps_only_matching_hosts_and_requires_verified_tls() {
        let d = sts(Mode::Enforce);
        assert_eq!(d.client, TlsPolicy::Required);
        let hosts = vec!["evil.test", "x.b.test", "mx.a.test"];
        assert_eq!(
            d.filter_mx(hosts, |h| h).unwrap(),
            vec!["x.b.test", "mx.a.test"]
        );
        let err = d.filter_mx(vec!["mx.evil.test"], |h| h).unwrap_err();
        assert_eq!(err, "MTA-STS: mx.evil.test not in policy id1 (enforce)");
        let ok = d.outcome(Some("mx.a.test"), Some(&Ok(())));
        assert_eq!(ok.failure, None);
        assert_eq!(ok.verified, Some(true));
        assert_eq!(
            (ok.policy.as_str(), ok.mode.as_deref()),
            ("mta-sts", Some("enforce"))
        );
    }

    #[test]
    fn testing_keeps_every_host_and_records_failures() {
        let d = sts(Mode::Testing);
        assert_eq!(d.client, TlsPolicy::Opportunistic);
        assert_eq!(
            d.filter_mx(vec!["evil.test"], |h| h).unwrap(),
            vec!["evil.test"]
        );
        let r = d.outcome(Some("evil.test"), Some(&Err("bad name".into())));
        let f = r.failure.unwrap();
        assert!(
            f.contains("evil.test not in policy id1") && f.contains("bad name"),
            "{f}"
        );
        let plain = d.outcome(Some("mx.a.test"), None);
        assert!(plain.failure.unwrap().contains("no TLS session"));
    }

    #[test]
    fn none_mode_and_no_policy_are_opportunistic() {
        let d = sts(Mode::None);
        assert_eq!(
            (d.client, d.source),
            (TlsPolicy::Opportunistic, "opportunistic")
        );
        assert_eq!(
            Decision::fixed(TlsPolicy::Auto).client,
            TlsPolicy::Opportunistic
        );
    }

    #[test]
    fn tls_required_no_relaxes_published_policies_only() {
        assert!(tls_required_no(
            b"Subject: x\r\ntls-required:  no \r\n\r\nbody"
        ));
        assert!(!tls_required_no(b"Subject: x\r\n\r\nTLS-Required: No\r\n"));
        assert!(!tls_required_no(b"TLS-Required: Yes\r\n\r\n"));
        let d = sts(Mode::Enforce).relaxed();
        assert_eq!(d.client, TlsPolicy::Opportunistic);
        assert_eq!(
            d.filter_mx(vec!["evil.test"], |h| h).unwrap(),
            vec!["evil.test"]
        );
        let r = d.outcome(Some("evil.test"), Some(&Err("x".into())));
        assert_eq!(r.policy, "mta-sts-relaxed");
        assert!(r.failure.unwrap().contains("TLS-Required: No"));
        assert_eq!(
            Decision::fixed(TlsPolicy::Required).relaxed().client,
            TlsPolicy::Required,
            "a configured policy stays"
        );
    }

    #[test]
    fn overrides_match_exact_then_parent_patterns() {
        let e = vec![
            crate::config::TlsPolicyEntry {
                domains: vec!["Bank.test.".into()],
                tls: TlsPolicy::Required,
            },
            crate::config::TlsPolicyEntry {
                domains: vec![".old.test".into()],
                tls: TlsPolicy::Disabled,
            },
        ];
        assert_eq!(override_for(&e, "bank.test"), Some(TlsPolicy::Required));
        assert_eq!(override_for(&e, "a.old.test"), Some(TlsPolicy::Disabled));
        assert_eq!(override_for(&e, "old.test"), None);
        assert_eq!(override_for(&e, "xold.test"), None);
        assert_eq!(override_for(&e, "other.test"), None);
    }
}
