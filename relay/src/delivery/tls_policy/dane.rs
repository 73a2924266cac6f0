//! DANE for SMTP (RFC 7672): DNSSEC-validated TLSA lookups per MX host, and the
//! TLS client each host gets from them.
//!
//! The relay validates DNSSEC itself (hickory, ring) from a trust anchor: the root
//! KSKs by default, or `delivery.dane.trust_anchor`. It needs a resolver that passes
//! DNSSEC records (asks with the DO bit and returns RRSIGs); one that strips them
//! makes every answer unverifiable. Rather than defer all mail then, DANE is
//! switched off while the resolver cannot show a signed root DNSKEY set, with a
//! warning and `dane: unavailable` in the attempt records (the same outcome as
//! Postfix on a resolver that does not set the AD bit).
//!
//! Per host (RFC 7672 §2.2):
//! - its A/AAAA answers must be secure, else it is not a DANE host (insecure);
//! - then `_<port>._tcp.<host>` TLSA: secure and usable → TLS required and matched
//!   ([`super::dane_verify`]); secure but none usable → TLS required, certificate not
//!   checked; secure denial or insecure → not DANE;
//! - a bogus answer, or a failed lookup for a secure host → this host is not used
//!   (the next MX is tried, else the delivery is deferred); never plain text.
//!
//! Answers are kept in process until their TTL runs out, so a warm cache adds no
//! DNS round trip per message; the TLS client built for a host is kept with them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::rr::{RData, RecordType};
use tracing::{debug, info, warn};

use super::dane_verify::{DaneVerifier, Tlsa};
use crate::delivery::smtp_client::ClientTls;

/// How long a negative answer (no TLSA, secure or insecure denial) is kept: the
/// resolver does not hand out the SOA minimum with it.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// How long a failed lookup is kept before it is asked again.
const FAILURE_TTL: Duration = Duration::from_secs(30);
/// How long the resolver check (a signed root DNSKEY set) holds, either way.
const PROBE_OK_TTL: Duration = Duration::from_secs(3600);
const PROBE_FAIL_TTL: Duration = Duration::from_secs(60);
/// Bounds the in-process cache; the oldest half goes when it is full.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DaneError {
    #[error("delivery.dane.trust_anchor {}: {reason}", path.display())]
    TrustAnchor { path: PathBuf, reason: String },
    #[error("delivery.dane: {0}")]
    Resolver(String),
}

/// What DANE says about one host.
#[derive(Debug, Clone)]
pub enum HostDane {
    /// Usable TLSA records: TLS with this client (its verifier matches them).
    Verify { tls: ClientTls, records: String },
    /// TLSA records exist but none is usable: TLS is mandatory, the certificate is
    /// not checked (RFC 7672 §2.2).
    Mandatory { tls: ClientTls },
    /// Not a DANE host (`insecure`, `no TLSA`, `unavailable`): the other policies
    /// apply.
    Skip(&'static str),
    /// Bogus or failed lookups for a secure host: not used.
    Fail(String),
}

impl HostDane {
    /// The `dane` field of the attempt record before the handshake's verdict.
    pub fn label(&self) -> String {
        match self {
            HostDane::Verify { records, .. } => format!("tlsa {records}"),
            HostDane::Mandatory { .. } => "tlsa unusable: unauthenticated TLS required".into(),
            HostDane::Skip(why) => (*why).to_owned(),
            HostDane::Fail(why) => why.clone(),
        }
    }
}

struct Entry {
    value: HostDane,
    until: Instant,
}

/// The DANE resolver and its cache, shared by every delivery of the process.
pub struct Dane {
    resolver: TokioResolver,
    base: ClientTls,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cache: Mutex<HashMap<(String, u16), Entry>>,
    probe: Mutex<Option<(bool, Instant)>>,
}

impl std::fmt::Debug for Dane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dane").finish_non_exhaustive()
    }
}

/// Reads a trust anchor file: DNSKEY records in zone-file form (`. IN DNSKEY 257 3
/// 8 AwEAA…`), as `dnssec-keygen`, `keymgr` or `ldns-keygen` write them.
pub fn load_trust_anchor(path: &Path) -> Result<TrustAnchors, DaneError> {
    let err = |reason: String| DaneError::TrustAnchor {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    // Comments and DS records are for people and other tools; the parser takes
    // DNSKEY lines only.
    let keys: String = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.is_empty() && !t.starts_with(';') && !t.starts_with('#')
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if keys
        .split_whitespace()
        .any(|w| w.eq_ignore_ascii_case("DS"))
    {
        return Err(err(
            "DS records are not supported: give the DNSKEY records of the anchor".into(),
        ));
    }
    let anchors: TrustAnchors = keys.parse().map_err(|e| err(format!("{e}")))?;
    // The parser keeps keys for names other than the root apart; either counts.
    if anchors.is_empty() && !keys.contains("DNSKEY") {
        return Err(err("no DNSKEY record".into()));
    }
    Ok(anchors)
}

impl Dane {
    /// A validating resolver asking `nameservers` (empty: `/etc/resolv.conf`),
    /// trusting `anchor` (`None`: the root KSKs). `base` gives the TLS settings
    /// the per-host clients share.
    pub fn new(
        nameservers: &[SocketAddr],
        anchor: Option<TrustAnchors>,
        timeout: Duration,
        attempts: usize,
        base: ClientTls,
    ) -> Result<Self, DaneError> {
        let resolver = crate::delivery::mx::build_resolver_with(
            nameservers,
            |opts| {
                opts.timeout = timeout;
                opts.attempts = attempts.max(1) - 1;
                opts.validate = true;
            },
            Some(Arc::new(anchor.unwrap_or_default())),
        )
        .map_err(|e| DaneError::Resolver(e.to_string()))?;
        Ok(Dane {
            resolver,
            base,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            cache: Mutex::new(HashMap::new()),
            probe: Mutex::new(None),
        })
    }

    /// What DANE says about `host` (an MX or relay host name) reached on `port`.
    pub async fn host(&self, host: &str, port: u16) -> HostDane {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let key = (host, port);
        let now = Instant::now();
        if let Some(e) = self.cache.lock().unwrap().get(&key)
            && e.until > now
        {
            return e.value.clone();
        }
        if !self.resolver_passes_dnssec().await {
            return HostDane::Skip("unavailable");
        }
        let (value, until) = self.lookup(&key.0, port).await;
        debug!(host = %key.0, port, verdict = %value.label(), "DANE lookup");
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_ENTRIES {
            let mut ages: Vec<Instant> = cache.values().map(|e| e.until).collect();
            ages.sort();
            let cut = ages[ages.len() / 2];
            cache.retain(|_, e| e.until > cut);
        }
        cache.insert(
            key,
            Entry {
                value: value.clone(),
                until,
            },
        );
        value
    }

    /// Whether the resolver hands out a root DNSKEY set that validates against the
    /// trust anchor; checked once an hour (once a minute while it fails).
    async fn resolver_passes_dnssec(&self) -> bool {
        let now = Instant::now();
        if let Some((ok, until)) = *self.probe.lock().unwrap()
            && until > now
        {
            return ok;
        }
        let got = self.resolver.lookup(".", RecordType::DNSKEY).await;
        let ok = match &got {
            Ok(l) => proof_of(l.answers().iter().map(|r| r.proof)) == Some(Proof::Secure),
            Err(_) => false,
        };
        let was = self.probe.lock().unwrap().map(|(ok, _)| ok);
        if !ok && was != Some(false) {
            let why = match got {
                Ok(_) => "the root DNSKEY set does not validate against the trust anchor".into(),
                Err(e) => e.to_string(),
            };
            warn!(reason = %why, "DANE is off: the resolver does not pass DNSSEC records (set delivery.dane.nameservers to a resolver that does)");
        } else if ok && was != Some(true) {
            info!("DANE on: the resolver passes DNSSEC records");
        }
        let ttl = if ok { PROBE_OK_TTL } else { PROBE_FAIL_TTL };
        *self.probe.lock().unwrap() = Some((ok, now + ttl));
        ok
    }

    async fn lookup(&self, host: &str, port: u16) -> (HostDane, Instant) {
        let now = Instant::now();
        let fail = |why: String| (HostDane::Fail(why), now + FAILURE_TTL);
        // Fully qualified: no search list applies (a pod's resolv.conf has one).
        let fqdn = format!("{host}.");
        let (a, aaaa) = tokio::join!(
            self.resolver.lookup(fqdn.as_str(), RecordType::A),
            self.resolver.lookup(fqdn.as_str(), RecordType::AAAA)
        );
        let mut until = now + PROBE_OK_TTL;
        let mut secure = false;
        for got in [a, aaaa] {
            match classify(got) {
                Answer::Records(proof, valid, _) => {
                    until = until.min(valid);
                    match proof {
                        Proof::Secure => secure = true,
                        Proof::Bogus => {
                            return fail(format!(
                                "DANE: address records of {host} are bogus (DNSSEC)"
                            ));
                        }
                        _ => return (HostDane::Skip("insecure"), until),
                    }
                }
                Answer::None(Proof::Secure) => {}
                Answer::None(Proof::Bogus) | Answer::Bogus => {
                    return fail(format!("DANE: address lookup of {host} is bogus (DNSSEC)"));
                }
                Answer::None(_) => return (HostDane::Skip("insecure"), now + NEGATIVE_TTL),
                Answer::Failed(e) => {
                    return fail(format!("DANE: address lookup of {host} failed: {e}"));
                }
            }
        }
        if !secure {
            return (HostDane::Skip("insecure"), now + NEGATIVE_TTL);
        }
        let qname = format!("_{port}._tcp.{host}.");
        match classify(self.resolver.lookup(qname.as_str(), RecordType::TLSA).await) {
            Answer::Records(Proof::Secure, valid, records) => {
                let until = until.min(valid);
                let usable: Vec<Tlsa> = records.iter().filter(|r| r.usable()).cloned().collect();
                if usable.is_empty() {
                    let tls = self.client(records, host);
                    return match tls {
                        Ok(tls) => (HostDane::Mandatory { tls }, until),
                        Err(e) => fail(e),
                    };
                }
                let summary = usable
                    .iter()
                    .map(Tlsa::params)
                    .collect::<Vec<_>>()
                    .join(", ");
                match self.client(usable, host) {
                    Ok(tls) => (
                        HostDane::Verify {
                            tls,
                            records: summary,
                        },
                        until,
                    ),
                    Err(e) => fail(e),
                }
            }
            Answer::Records(Proof::Bogus, ..) | Answer::None(Proof::Bogus) | Answer::Bogus => {
                fail(format!("DANE: TLSA lookup of {qname} is bogus (DNSSEC)"))
            }
            Answer::Records(_, valid, _) => (HostDane::Skip("insecure"), until.min(valid)),
            Answer::None(Proof::Secure) => (HostDane::Skip("no TLSA"), now + NEGATIVE_TTL),
            Answer::None(_) => (HostDane::Skip("insecure"), now + NEGATIVE_TTL),
            // RFC 7672 §2.2: a secure host whose TLSA lookup fails is not used.
            Answer::Failed(e) => fail(format!("DANE: TLSA lookup of {qname} failed: {e}")),
        }
    }

    fn client(&self, records: Vec<Tlsa>, host: &str) -> Result<ClientTls, String> {
        // RFC 7672 §3.2.2: the reference identifier is the MX host name (the TLSA
        // base domain; CNAMEs are not followed here, so they are the same).
        let verifier =
            DaneVerifier::new(records, vec![host.to_owned()], Arc::clone(&self.provider));
        self.base
            .with_verifier(Arc::new(verifier))
            .map_err(|e| format!("DANE: {e}"))
    }
}

enum Answer {
    Records(Proof, Instant, Vec<Tlsa>),
    /// No records, with the proof of the denial.
    None(Proof),
    Bogus,
    Failed(String),
}

/// The weakest proof of a set of records (`None` without records).
fn proof_of(proofs: impl Iterator<Item = Proof>) -> Option<Proof> {
    proofs.min_by_key(|p| match p {
        Proof::Bogus => 0,
        Proof::Indeterminate => 1,
        Proof::Insecure => 2,
        Proof::Secure => 3,
    })
}

fn classify(got: Result<hickory_resolver::lookup::Lookup, NetError>) -> Answer {
    match got {
        Ok(l) => {
            let Some(proof) = proof_of(l.answers().iter().map(|r| r.proof)) else {
                return Answer::None(Proof::Indeterminate);
            };
            let tlsa = l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TLSA(t) => Some(Tlsa {
                        usage: t.cert_usage.into(),
                        selector: t.selector.into(),
                        matching: t.matching.into(),
                        data: t.cert_data.clone(),
                    }),
                    _ => None,
                })
                .collect();
            Answer::Records(proof, l.valid_until(), tlsa)
        }
        Err(NetError::Dns(DnsError::DnssecBogus)) => Answer::Bogus,
        Err(NetError::Dns(DnsError::Nsec { proof, .. })) => Answer::None(proof),
        // A validated denial (NSEC/NSEC3 proving no such record) comes back as
        // "no records" like an unsigned zone's: the proofs of the authority
        // section (SOA, NSEC) tell them apart.
        Err(NetError::Dns(DnsError::NoRecordsFound(n))) => Answer::None(
            proof_of(
                n.authorities
                    .iter()
                    .flat_map(|a| a.iter())
                    .map(|r| r.proof)
                    .chain(n.soa.iter().map(|s| s.proof)),
            )
            .unwrap_or(Proof::Indeterminate),
        ),
        Err(e) => Answer::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchor(text: &str) -> Result<TrustAnchors, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("anchor.key");
        std::fs::write(&p, text).unwrap();
        load_trust_anchor(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn trust_anchors_are_dnskey_records_and_bad_files_name_the_field() {
        // As ldns-keygen writes a KSK, comment included.
        let key = ".\tIN\tDNSKEY\t257 3 13 B8jIsBaXppy2dxvIbV8hHBdLZDvt5nS53BGuNKxZsTg9tnpv0JlR0A0wLsCYzjhiz0C7Z9HLCmh4SxTC4UaF8Q== ;{id = 64328 (ksk), size = 256b}\n";
        let a = anchor(&format!("; the test root\n{key}")).unwrap();
        assert_eq!(a.len(), 1);
        for (text, why) in [
            (
                ". IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n",
                "DS records are not supported",
            ),
            ("", "no DNSKEY"),
            (". IN DNSKEY 257 3 13 !!!\n", "delivery.dane.trust_anchor"),
        ] {
            let Err(e) = anchor(text) else {
                panic!("{text}: accepted")
            };
            assert!(
                e.contains("delivery.dane.trust_anchor") && e.contains(why),
                "{text}: {e}"
            );
        }
        let Err(e) = load_trust_anchor(Path::new("/nonexistent/anchor.key")) else {
            panic!("a missing file was accepted")
        };
        assert!(e.to_string().contains("/nonexistent/anchor.key"), "{e}");
    }

    #[test]
    fn the_weakest_proof_decides() {
        use Proof::*;
        assert_eq!(proof_of([Secure, Secure].into_iter()), Some(Secure));
        assert_eq!(proof_of([Secure, Insecure].into_iter()), Some(Insecure));
        assert_eq!(proof_of([Insecure, Bogus, Secure].into_iter()), Some(Bogus));
        assert_eq!(
            proof_of([Secure, Indeterminate].into_iter()),
            Some(Indeterminate)
        );
        assert_eq!(proof_of(std::iter::empty()), None);
    }
}
