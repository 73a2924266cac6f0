//! DANE certificate matching for SMTP (RFC 7672 §3, RFC 6698 §2.1).
//!
//! Only DANE-TA(2) and DANE-EE(3) are usable between MTAs: the PKIX usages 0 and 1
//! need a CA set that SMTP peers do not agree on (RFC 7672 §3.1.3), and records
//! with parameters this code does not know are skipped, never guessed at.
//! [`matches`] is pure (certificates in, verdict out) so it is tested without a
//! handshake; [`DaneVerifier`] runs it inside rustls.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// One TLSA record (`usage selector matching data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// Whether RFC 7672 lets an SMTP client use this record: DANE-TA(2) or
    /// DANE-EE(3), full certificate(0) or SPKI(1), exact(0), SHA-256(1) or
    /// SHA-512(2) with a digest of the right length.
    pub fn usable(&self) -> bool {
        let len_ok = match self.matching {
            0 => !self.data.is_empty(),
            1 => self.data.len() == 32,
            2 => self.data.len() == 64,
            _ => false,
        };
        matches!(self.usage, 2 | 3) && matches!(self.selector, 0 | 1) && len_ok
    }

    /// `3 1 1` style, for logs and attempt records.
    pub fn params(&self) -> String {
        format!("{} {} {}", self.usage, self.selector, self.matching)
    }

    /// `3 1 1 0A1B…`: the record's data as a zone file and RFC 8460 reports
    /// state it.
    pub fn presentation(&self) -> String {
        let hex: String = self.data.iter().map(|b| format!("{b:02X}")).collect();
        format!("{} {hex}", self.params())
    }

    /// Whether `cert` (DER) is the one this record describes.
    fn describes(&self, cert: &[u8]) -> bool {
        let selected = match self.selector {
            0 => cert,
            1 => match spki(cert) {
                Some(s) => s,
                None => return false,
            },
            _ => return false,
        };
        match self.matching {
            0 => selected == self.data.as_slice(),
            1 => ring::digest::digest(&ring::digest::SHA256, selected).as_ref() == self.data,
            2 => ring::digest::digest(&ring::digest::SHA512, selected).as_ref() == self.data,
            _ => false,
        }
    }
}

/// Which record matched, for the attempt record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub tlsa: Tlsa,
}

/// Checks the server's `chain` (leaf first) against the usable `records`:
/// - DANE-EE(3) matches the leaf alone; neither its names nor its validity dates
///   are looked at (RFC 7672 §3.1.1);
/// - DANE-TA(2) matches a certificate the server sent after its leaf (the server
///   must include its trust anchor, RFC 7672 §3.1.2), and the leaf must chain to it
///   and name one of `names` (the MX host name, the TLSA base domain) and be
///   within its validity dates (§3.2.3).
///
/// Unusable records are skipped; with no usable record nothing matches (the caller
/// decides what "all unusable" means: RFC 7672 §2.2 makes that mandatory but
/// unauthenticated TLS).
pub fn matches(
    records: &[Tlsa],
    chain: &[CertificateDer<'_>],
    names: &[String],
    now: UnixTime,
    provider: &Arc<CryptoProvider>,
) -> Result<Matched, String> {
    let Some((leaf, rest)) = chain.split_first() else {
        return Err("DANE: the server sent no certificate".into());
    };
    let usable: Vec<&Tlsa> = records.iter().filter(|r| r.usable()).collect();
    if usable.is_empty() {
        return Err("DANE: no usable TLSA record".into());
    }
    if let Some(r) = usable.iter().find(|r| r.usage == 3 && r.describes(leaf)) {
        return Ok(Matched { tlsa: (*r).clone() });
    }
    let mut why = Vec::new();
    for r in usable.iter().filter(|r| r.usage == 2) {
        for ta in rest.iter().filter(|c| r.describes(c)) {
            match chains_to(leaf, rest, ta, names, now, provider) {
                Ok(()) => return Ok(Matched { tlsa: (*r).clone() }),
                Err(e) => why.push(e),
            }
        }
    }
    let tried: Vec<String> = usable.iter().map(|r| r.params()).collect();
    Err(if why.is_empty() {
        format!(
            "DANE: no TLSA record ({}) matches the server's certificate chain",
            tried.join(", ")
        )
    } else {
        format!(
            "DANE: a DANE-TA record matches a certificate of the chain, but the leaf does not verify against it: {}",
            why.join("; ")
        )
    })
}

/// The leaf chains to `ta` (as the only root) and names one of `names`.
fn chains_to(
    leaf: &CertificateDer<'_>,
    rest: &[CertificateDer<'_>],
    ta: &CertificateDer<'_>,
    names: &[String],
    now: UnixTime,
    provider: &Arc<CryptoProvider>,
) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ta.clone().into_owned())
        .map_err(|e| format!("trust anchor: {e}"))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(provider),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let mut last = String::from("no name to check");
    for name in names {
        let Ok(server) = ServerName::try_from(name.trim_end_matches('.').to_owned()) else {
            continue;
        };
        match verifier.verify_server_cert(leaf, rest, &server, &[], now) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// The DER of a certificate's SubjectPublicKeyInfo (tag and length included), by
/// walking `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
/// OPTIONAL, serial, signature, issuer, validity, subject, spki, … } … }`.
pub fn spki(cert: &[u8]) -> Option<&[u8]> {
    let (_, cert_body, _) = der_item(cert)?;
    let (_, tbs, _) = der_item(cert_body)?;
    let mut rest = tbs;
    let (tag, _, after) = der_item(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serial, signature, issuer, validity, subject
    for _ in 0..5 {
        rest = der_item(rest)?.2;
    }
    let len = rest.len() - der_item(rest)?.2.len();
    (rest.first() == Some(&0x30)).then(|| &rest[..len])
}

/// One DER item: (tag, contents, what follows). Only the definite-length forms DER
/// allows.
fn der_item(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    (end <= b.len()).then(|| (tag, &b[head..end], &b[end..]))
}

/// A rustls verifier that accepts exactly what [`matches`] accepts; with no usable
/// record it accepts any certificate (RFC 7672 §2.2: TLS is still mandatory, the
/// caller never falls back to plain text). Handshake signatures are always checked.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<Tlsa>,
    names: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl DaneVerifier {
    pub fn new(records: Vec<Tlsa>, names: Vec<String>, provider: Arc<CryptoProvider>) -> Self {
        DaneVerifier {
            records: records.into_iter().filter(Tlsa::usable).collect(),
            names,
            provider,
        }
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.records.is_empty() {
            return Ok(ServerCertVerified::assertion());
        }
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        matches(&self.records, &chain, &self.names, now, &self.provider)
            .map(|_| ServerCertVerified::assertion())
            .map_err(rustls::Error::General)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn der(dir: &Path, pem: &str) -> CertificateDer<'static> {
        let f = dir.join(pem);
        CertificateDer::from(
            rustls::pki_types::pem::PemObject::from_pem_file(&f)
                .map(|c: CertificateDer<'static>| c.to_vec())
                .unwrap(),
        )
    }

    /// A CA (ten years), a leaf it signed for `mx.a.test` (30 days), and an
    /// unrelated self-signed certificate.
    struct Certs {
        ca: CertificateDer<'static>,
        leaf: CertificateDer<'static>,
        other: CertificateDer<'static>,
        _dir: tempfile::TempDir,
    }

    fn certs() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "3650", "-subj", "/CN=Test TA"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        openssl(d, &ca);
        {
            let name = "leaf";
            let mut req = vec!["req", "-subj", "/CN=mx.a.test"];
            req.extend(ec);
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            req.extend(["-keyout", &key, "-out", &csr]);
            openssl(d, &req);
            std::fs::write(
                d.join("ext"),
                "subjectAltName=DNS:mx.a.test\nbasicConstraints=CA:FALSE\n",
            )
            .unwrap();
            let pem = format!("{name}.pem");
            let mut sign = vec!["x509", "-req", "-in", &csr, "-CA", "ca.pem"];
            sign.extend(["-CAkey", "ca.key", "-CAcreateserial", "-extfile", "ext"]);
            sign.extend(["-out", &pem, "-days", "30"]);
            openssl(d, &sign);
        }
        let mut other = vec!["req", "-x509", "-days", "30", "-subj", "/CN=other"];
        other.extend(ec);
        other.extend(["-keyout", "other.key", "-out", "other.pem"]);
        openssl(d, &other);
        Certs {
            ca: der(d, "ca.pem"),
            leaf: der(d, "leaf.pem"),
            other: der(d, "other.pem"),
            _dir: dir,
        }
    }

    fn tlsa(usage: u8, selector: u8, matching: u8, cert: &[u8]) -> Tlsa {
        let selected = if selector == 1 {
            spki(cert).unwrap()
        } else {
            cert
        };
        let data = match matching {
            1 => ring::digest::digest(&ring::digest::SHA256, selected)
                .as_ref()
                .to_vec(),
            2 => ring::digest::digest(&ring::digest::SHA512, selected)
                .as_ref()
                .to_vec(),
            _ => selected.to_vec(),
        };
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Sixty days from now: the leaf (30 days) has expired, the CA has not.
    fn later() -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            UnixTime::now().as_secs() + 60 * 86_400,
        ))
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn spki_is_the_public_key_openssl_sees() {
        let c = certs();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.der"), c.leaf.as_ref()).unwrap();
        openssl(
            dir.path(),
            &[
                "x509", "-inform", "DER", "-in", "c.der", "-pubkey", "-noout", "-out", "pub.pem",
            ],
        );
        openssl(
            dir.path(),
            &[
                "pkey", "-pubin", "-in", "pub.pem", "-outform", "DER", "-out", "pub.der",
            ],
        );
        let want = std::fs::read(dir.path().join("pub.der")).unwrap();
        assert_eq!(spki(&c.leaf).unwrap(), want.as_slice());
        assert_eq!(spki(b"\x30\x03\x02\x01"), None, "truncated DER");
    }

    #[test]
    fn dane_ee_matches_every_selector_and_matching_type_without_name_or_date_checks() {
        let c = certs();
        let p = provider();
        let now = UnixTime::now();
        for cert in [&c.leaf, &c.other] {
            for s in [0, 1] {
                for m in [0, 1, 2] {
                    let r = tlsa(3, s, m, cert);
                    // Another name, and long after the leaf expired: still a match.
                    let got = matches(
                        std::slice::from_ref(&r),
                        std::slice::from_ref(cert),
                        &names(&["x.test"]),
                        later(),
                        &p,
                    );
                    assert_eq!(got, Ok(Matched { tlsa: r }), "3 {s} {m}");
                }
            }
        }
        let err = matches(
            &[tlsa(3, 1, 1, &c.other)],
            std::slice::from_ref(&c.leaf),
            &[],
            now,
            &p,
        )
        .unwrap_err();
        assert!(err.contains("3 1 1") && err.starts_with("DANE:"), "{err}");
    }

    #[test]
    fn dane_ta_needs_the_anchor_in_the_chain_a_valid_leaf_and_the_name() {
        let c = certs();
        let p = provider();
        let now = UnixTime::now();
        let mx = names(&["mx.a.test"]);
        for (s, m) in [(0, 0), (0, 1), (1, 1), (1, 2)] {
            let r = tlsa(2, s, m, &c.ca);
            let chain = [c.leaf.clone(), c.ca.clone()];
            assert_eq!(
                matches(std::slice::from_ref(&r), &chain, &mx, now, &p),
                Ok(Matched { tlsa: r.clone() })
            );
            // The anchor not sent by the server: no match (RFC 7672 §3.1.2).
            assert!(matches(std::slice::from_ref(&r), &chain[..1], &mx, now, &p).is_err());
            // Wrong name.
            let e = matches(
                std::slice::from_ref(&r),
                &chain,
                &names(&["mx.b.test"]),
                now,
                &p,
            )
            .unwrap_err();
            assert!(e.contains("does not verify"), "{e}");
            // The leaf expired (the anchor has not).
            assert!(matches(std::slice::from_ref(&r), &chain, &mx, later(), &p).is_err());
            // A DANE-TA record naming the leaf itself is not a trust anchor.
            let leaf_as_ta = tlsa(2, s, m, &c.leaf);
            assert!(matches(&[leaf_as_ta], &chain, &mx, now, &p).is_err());
        }
        // The second name (the TLSA base domain) is accepted too.
        let r = tlsa(2, 1, 1, &c.ca);
        let chain = [c.leaf.clone(), c.ca.clone()];
        assert!(matches(&[r], &chain, &names(&["other.test", "mx.a.test"]), now, &p).is_ok());
    }

    #[test]
    fn pkix_usages_and_unknown_parameters_are_ignored() {
        let c = certs();
        let p = provider();
        let now = UnixTime::now();
        let chain = [c.leaf.clone(), c.ca.clone()];
        let mut bad = vec![
            tlsa(0, 0, 1, &c.ca),
            tlsa(1, 1, 1, &c.leaf),
            Tlsa {
                selector: 7,
                ..tlsa(3, 1, 1, &c.leaf)
            },
            Tlsa {
                matching: 9,
                ..tlsa(3, 1, 1, &c.leaf)
            },
            Tlsa {
                data: vec![1, 2, 3],
                ..tlsa(3, 1, 1, &c.leaf)
            },
            Tlsa {
                usage: 4,
                ..tlsa(3, 1, 1, &c.leaf)
            },
        ];
        assert!(bad.iter().all(|r| !r.usable()));
        let e = matches(&bad, &chain, &names(&["mx.a.test"]), now, &p).unwrap_err();
        assert_eq!(e, "DANE: no usable TLSA record");
        // One good record among them wins.
        bad.push(tlsa(3, 1, 2, &c.leaf));
        assert!(matches(&bad, &chain, &names(&["mx.a.test"]), now, &p).is_ok());
        assert!(matches(&bad, &[], &[], now, &p).is_err());
    }

    #[test]
    fn the_verifier_accepts_any_certificate_when_no_record_is_usable() {
        let c = certs();
        let p = provider();
        let v = DaneVerifier::new(vec![tlsa(1, 1, 1, &c.ca)], names(&["mx.a.test"]), p.clone());
        let name = ServerName::try_from("mx.a.test").unwrap();
        assert!(
            v.verify_server_cert(&c.other, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        let v = DaneVerifier::new(vec![tlsa(3, 1, 1, &c.leaf)], names(&["mx.a.test"]), p);
        assert!(
            v.verify_server_cert(&c.leaf, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        let e = v
            .verify_server_cert(&c.other, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(e.to_string().contains("DANE"), "{e}");
    }
}
