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
use hickory_resolver::proto::dnssec::rdata::{DNSSECRData, DS};
use hickory_resolver::proto::dnssec::{Algorithm, DigestType, Proof, TrustAnchors};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
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
    /// `records` sums up their parameters, `tlsa` states them in full (for TLS
    /// reports).
    Verify {
        tls: ClientTls,
        records: String,
        tlsa: Arc<[String]>,
    },
    /// TLSA records exist but none is usable: TLS is mandatory, the certificate is
    /// not checked (RFC 7672 §2.2).
    Mandatory { tls: ClientTls, tlsa: Arc<[String]> },
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

    /// The host's TLSA records in presentation form, and whether any is usable
    /// (`None`: DANE does not apply to the host).
    pub fn tlsa(&self) -> Option<(&Arc<[String]>, bool)> {
        match self {
            HostDane::Verify { tlsa, .. } => Some((tlsa, true)),
            HostDane::Mandatory { tlsa, .. } => Some((tlsa, false)),
            _ => None,
        }
    }
}

struct Entry {
    value: HostDane,
    until: Instant,
}

/// The DANE resolver and its cache, shared by every delivery of the process.
pub struct Dane {
    resolver: Mutex<Validating>,
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

/// A trust anchor file as read: DNSKEY records, trusted as they are, and DS
/// records, whose DNSKEY sets are fetched and checked against them
/// ([`Dane::prepare`]).
#[derive(Clone)]
pub struct AnchorFile {
    pub keys: TrustAnchors,
    pub ds: Vec<(Name, DS)>,
}

impl std::fmt::Debug for AnchorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnchorFile")
            .field("keys", &self.keys.len())
            .field("ds", &self.ds.len())
            .finish()
    }
}

/// Reads a trust anchor file: DNSKEY records in zone-file form (`. IN DNSKEY 257 3
/// 8 AwEAA…`), as `dnssec-keygen`, `keymgr` or `ldns-keygen` write them, and/or DS
/// records (`. IN DS 20326 8 2 E06D…`, as `dig DS`, `ldns-key2ds` or the root
/// zone's published anchors state them).
pub fn load_trust_anchor(path: &Path) -> Result<AnchorFile, DaneError> {
    let err = |reason: String| DaneError::TrustAnchor {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let lines = text.lines().filter(|l| {
        let t = l.trim_start();
        !t.is_empty() && !t.starts_with(';') && !t.starts_with('#')
    });
    let (mut keys, mut ds) = (String::new(), Vec::new());
    for (n, line) in lines.enumerate() {
        match parse_ds(line) {
            Some(Ok(d)) => ds.push(d),
            Some(Err(e)) => return Err(err(format!("DS record {}: {e}", n + 1))),
            None => {
                keys.push_str(line);
                keys.push('\n');
            }
        }
    }
    let anchors: TrustAnchors = if keys.trim().is_empty() {
        TrustAnchors::empty()
    } else {
        keys.parse().map_err(|e| err(format!("{e}")))?
    };
    // The parser keeps keys for names other than the root apart; either counts.
    if ds.is_empty() && anchors.is_empty() && !keys.contains("DNSKEY") {
        return Err(err("no DNSKEY or DS record".into()));
    }
    Ok(AnchorFile { keys: anchors, ds })
}

/// A DS line (`owner [ttl] [class] DS tag algorithm digest-type digest…`);
/// `None` when the line is not a DS record.
fn parse_ds(line: &str) -> Option<Result<(Name, DS), String>> {
    let line = line.split(';').next().unwrap_or("");
    let words: Vec<&str> = line.split_whitespace().collect();
    // The type comes after the owner, an optional TTL and an optional class.
    let at = words
        .iter()
        .take(4)
        .position(|w| w.eq_ignore_ascii_case("DS"))?;
    Some((|| {
        let owner = words.first().filter(|_| at > 0).ok_or("no owner name")?;
        let name = Name::from_ascii(owner).map_err(|e| format!("owner {owner}: {e}"))?;
        let field = |i: usize, what: &str| {
            words
                .get(at + i)
                .ok_or_else(|| format!("no {what}"))
                .and_then(|w| w.parse::<u16>().map_err(|_| format!("{what} {w}")))
        };
        let tag = field(1, "key tag")?;
        let alg = u8::try_from(field(2, "algorithm")?).map_err(|_| "algorithm".to_owned())?;
        let dt = u8::try_from(field(3, "digest type")?).map_err(|_| "digest type".to_owned())?;
        let hex: String = words.get(at + 4..).unwrap_or(&[]).concat();
        if hex.is_empty()
            || !hex.len().is_multiple_of(2)
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(format!("digest {hex:?} is not hex"));
        }
        let digest = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex"))
            .collect();
        let digest_type = DigestType::from(dt);
        if !digest_type.is_supported() {
            return Err(format!("digest type {dt} is not supported (1, 2 or 4)"));
        }
        Ok((
            name.to_lowercase(),
            DS::new(tag, Algorithm::from_u8(alg), digest_type, digest),
        ))
    })())
}

/// The validating resolver, or what is needed to build it once the DNSKEY sets
/// the DS anchors name have been fetched.
enum Validating {
    Ready(Box<TokioResolver>),
    Pending {
        nameservers: Vec<SocketAddr>,
        timeout: Duration,
        attempts: usize,
        anchor: AnchorFile,
        retry_at: Option<Instant>,
    },
}

impl Dane {
    /// A validating resolver asking `nameservers` (empty: `/etc/resolv.conf`),
    /// trusting `anchor` (`None`: the root KSKs). `base` gives the TLS settings
    /// the per-host clients share. DS anchors are turned into keys by
    /// [`Dane::prepare`] (or the first lookup).
    pub fn new(
        nameservers: &[SocketAddr],
        anchor: Option<AnchorFile>,
        timeout: Duration,
        attempts: usize,
        base: ClientTls,
    ) -> Result<Self, DaneError> {
        let resolver = match anchor {
            Some(a) if !a.ds.is_empty() => Validating::Pending {
                nameservers: nameservers.to_vec(),
                timeout,
                attempts,
                anchor: a,
                retry_at: None,
            },
            anchor => Validating::Ready(Box::new(validating_resolver(
                nameservers,
                timeout,
                attempts,
                anchor.map(|a| a.keys).unwrap_or_default(),
            )?)),
        };
        Ok(Dane {
            resolver: Mutex::new(resolver),
            base,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            cache: Mutex::new(HashMap::new()),
            probe: Mutex::new(None),
        })
    }

    /// Turns DS anchors into trusted keys: fetches each anchor zone's DNSKEY set
    /// from the nameservers and trusts the keys a DS record covers (RFC 4034
    /// §5.1.4). Until that succeeds DANE is unavailable (checked again every
    /// minute). Called at start-up; a no-op once done.
    pub async fn prepare(&self) -> Option<TokioResolver> {
        let (nameservers, timeout, attempts, anchor) = {
            let v = self.resolver.lock().unwrap();
            match &*v {
                Validating::Ready(r) => return Some((**r).clone()),
                Validating::Pending {
                    retry_at: Some(t), ..
                } if *t > Instant::now() => return None,
                Validating::Pending {
                    nameservers,
                    timeout,
                    attempts,
                    anchor,
                    ..
                } => (nameservers.clone(), *timeout, *attempts, anchor.clone()),
            }
        };
        let built = async {
            let keys = keys_from_ds(&nameservers, timeout, attempts, anchor).await?;
            validating_resolver(&nameservers, timeout, attempts, keys).map_err(|e| e.to_string())
        }
        .await;
        let mut v = self.resolver.lock().unwrap();
        match built {
            Ok(r) => {
                *v = Validating::Ready(Box::new(r.clone()));
                Some(r)
            }
            Err(e) => {
                warn!(reason = %e, "DANE is off: delivery.dane.trust_anchor: the DS records could not be turned into keys (retrying in a minute)");
                if let Validating::Pending { retry_at, .. } = &mut *v {
                    *retry_at = Some(Instant::now() + PROBE_FAIL_TTL);
                }
                None
            }
        }
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
        let Some(resolver) = self.prepare().await else {
            return HostDane::Skip("unavailable");
        };
        if !self.resolver_passes_dnssec(&resolver).await {
            return HostDane::Skip("unavailable");
        }
        let (value, until) = self.lookup(&resolver, &key.0, port).await;
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
    async fn resolver_passes_dnssec(&self, resolver: &TokioResolver) -> bool {
        let now = Instant::now();
        if let Some((ok, until)) = *self.probe.lock().unwrap()
            && until > now
        {
            return ok;
        }
        let got = resolver.lookup(".", RecordType::DNSKEY).await;
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

    async fn lookup(&self, resolver: &TokioResolver, host: &str, port: u16) -> (HostDane, Instant) {
        let now = Instant::now();
        let fail = |why: String| (HostDane::Fail(why), now + FAILURE_TTL);
        // Fully qualified: no search list applies (a pod's resolv.conf has one).
        let fqdn = format!("{host}.");
        let (a, aaaa) = tokio::join!(
            resolver.lookup(fqdn.as_str(), RecordType::A),
            resolver.lookup(fqdn.as_str(), RecordType::AAAA)
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
        match classify(resolver.lookup(qname.as_str(), RecordType::TLSA).await) {
            Answer::Records(Proof::Secure, valid, records) => {
                let until = until.min(valid);
                let usable: Vec<Tlsa> = records.iter().filter(|r| r.usable()).cloned().collect();
                let tlsa: Arc<[String]> = records.iter().map(Tlsa::presentation).collect();
                if usable.is_empty() {
                    let tls = self.client(records, host);
                    return match tls {
                        Ok(tls) => (HostDane::Mandatory { tls, tlsa }, until),
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
                            tlsa,
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

fn validating_resolver(
    nameservers: &[SocketAddr],
    timeout: Duration,
    attempts: usize,
    keys: TrustAnchors,
) -> Result<TokioResolver, DaneError> {
    crate::delivery::mx::build_resolver_with(
        nameservers,
        |opts| {
            opts.timeout = timeout;
            opts.attempts = attempts.max(1) - 1;
            opts.validate = true;
        },
        Some(Arc::new(keys)),
    )
    .map_err(|e| DaneError::Resolver(e.to_string()))
}

/// The keys of `anchor`: its DNSKEY records, plus each DS zone's DNSKEY records
/// that a DS record covers, fetched without validation (the DS is what makes
/// them trusted; the resolver then checks the set's signatures with them).
async fn keys_from_ds(
    nameservers: &[SocketAddr],
    timeout: Duration,
    attempts: usize,
    anchor: AnchorFile,
) -> Result<TrustAnchors, String> {
    let plain = crate::delivery::mx::build_resolver_with(
        nameservers,
        |opts| {
            opts.timeout = timeout;
            opts.attempts = attempts.max(1) - 1;
        },
        None,
    )
    .map_err(|e| e.to_string())?;
    let mut keys = anchor.keys;
    let mut zones: Vec<&Name> = anchor.ds.iter().map(|(n, _)| n).collect();
    zones.dedup();
    for zone in zones {
        let got = plain
            .lookup(zone.clone(), RecordType::DNSKEY)
            .await
            .map_err(|e| format!("DNSKEY {zone}: {e}"))?;
        let mut matched = 0;
        for r in got.answers() {
            let RData::DNSSEC(DNSSECRData::DNSKEY(key)) = &r.data else {
                continue;
            };
            let covered = anchor
                .ds
                .iter()
                .filter(|(n, _)| n == zone)
                .any(|(_, ds)| ds.covers(zone, key).unwrap_or(false));
            if covered && !key.revoke() {
                keys.insert_with_name(key.public_key(), zone.into());
                matched += 1;
            }
        }
        if matched == 0 {
            return Err(format!(
                "no DNSKEY record of {zone} matches its DS records ({} keys served)",
                got.answers().len()
            ));
        }
        info!(%zone, keys = matched, "DANE trust anchor: DNSKEY records matching the DS records are trusted");
    }
    Ok(keys)
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

    fn anchor(text: &str) -> Result<AnchorFile, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("anchor.key");
        std::fs::write(&p, text).unwrap();
        load_trust_anchor(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn trust_anchors_are_dnskey_or_ds_records_and_bad_files_name_the_field() {
        // As ldns-keygen writes a KSK, comment included.
        let key = ".\tIN\tDNSKEY\t257 3 13 B8jIsBaXppy2dxvIbV8hHBdLZDvt5nS53BGuNKxZsTg9tnpv0JlR0A0wLsCYzjhiz0C7Z9HLCmh4SxTC4UaF8Q== ;{id = 64328 (ksk), size = 256b}\n";
        let a = anchor(&format!("; the test root\n{key}")).unwrap();
        assert_eq!((a.keys.len(), a.ds.len()), (1, 0));
        // `dig DS .` style (TTL, class, digest split in two) and ldns-key2ds style.
        let a = anchor(
            ";; ANSWER SECTION:\n.\t\t86400\tIN\tDS\t20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D084 58E880409BBC683457104237C7F8EC8D\n\
             example.\tIN\tDS\t1234 13 2 0a0b0c0d0a0b0c0d0a0b0c0d0a0b0c0d0a0b0c0d0a0b0c0d0a0b0c0d0a0b0c0d\n",
        )
        .unwrap();
        assert_eq!((a.keys.len(), a.ds.len()), (0, 2));
        let (name, ds) = &a.ds[0];
        assert!(name.is_root());
        assert_eq!((ds.key_tag(), ds.digest().len()), (20326, 32));
        assert_eq!(ds.digest()[0], 0xe0);
        assert_eq!(a.ds[1].0.to_ascii(), "example.");
        // Both kinds in one file.
        let a = anchor(&format!("{key}. IN DS 20326 8 2 E06D44B80B8F1D39\n")).unwrap();
        assert_eq!((a.keys.len(), a.ds.len()), (1, 1));
        for (text, why) in [
            (". IN DS 20326 8 2 XYZ\n", "not hex"),
            (". IN DS 20326 8 7 E06D\n", "digest type 7"),
            (". IN DS 20326 8\n", "no digest type"),
            ("", "no DNSKEY or DS"),
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
