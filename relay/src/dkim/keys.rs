//! Private keys: PEM files read at the edge (startup, `keys_dir` reloads) into
//! ring key pairs. Errors name the config field and never print key material.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::config::dkim::{
    Algorithm, DomainConfig, FieldError, KeysFile, field_err, validate_domains,
};

/// RFC 8301 forbids signing with fewer RSA bits than this.
pub const RSA_MIN_BITS: usize = 1024;
/// RFC 8301 recommends at least this; shorter keys sign with a warning.
pub const RSA_WARN_BITS: usize = 2048;

pub enum PrivateKey {
    Rsa(RsaKeyPair),
    /// 1024-2047 bits: ring signs with 2048 bits and up only, so these go through
    /// RustCrypto's `rsa`, with blinding (see [`PrivateKey::sign_rsa_short`]).
    RsaShort(Box<rsa::pkcs1v15::SigningKey<rsa::sha2::Sha256>>),
    Ed25519(Ed25519KeyPair),
}

impl PrivateKey {
    /// RSASSA-PKCS1-v1_5 with SHA-256 over `data` with a short key. Blinded
    /// (`sign_with_rng`): the private operation runs on a random multiple of the
    /// input, so its timing says nothing about the key (the Marvin attack,
    /// RUSTSEC-2023-0071, needs unblinded decryption timings).
    pub fn sign_rsa_short(
        key: &rsa::pkcs1v15::SigningKey<rsa::sha2::Sha256>,
        data: &[u8],
    ) -> Result<Vec<u8>, rsa::signature::Error> {
        use rsa::signature::{RandomizedSigner, SignatureEncoding};
        key.try_sign_with_rng(&mut rsa::rand_core::OsRng, data)
            .map(|s| s.to_vec())
    }
}

pub struct SigningKey {
    pub selector: String,
    pub algorithm: Algorithm,
    pub key: PrivateKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The `p=` value of this key's DNS record (base64 of the SubjectPublicKeyInfo
    /// for RSA, of the raw 32-octet key for Ed25519, RFC 8463).
    pub fn public_key_b64(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        match &self.key {
            PrivateKey::Rsa(k) => b64.encode(rsa_spki(k.public().as_ref())),
            PrivateKey::RsaShort(k) => {
                use rsa::pkcs1::EncodeRsaPublicKey;
                let public = rsa::RsaPublicKey::from(k.as_ref().as_ref());
                let der = public
                    .to_pkcs1_der()
                    .expect("an RSA public key encodes as DER");
                b64.encode(rsa_spki(der.as_bytes()))
            }
            PrivateKey::Ed25519(k) => b64.encode(k.public_key().as_ref()),
        }
    }

    /// The TXT record to publish at `<selector>._domainkey.<domain>`.
    pub fn dns_record(&self) -> String {
        let k = match self.algorithm {
            Algorithm::RsaSha256 => "rsa",
            Algorithm::Ed25519Sha256 => "ed25519",
        };
        format!("v=DKIM1; k={k}; p={}", self.public_key_b64())
    }
}

#[derive(Debug)]
pub struct DomainKeys {
    /// Lower case, the `d=` of its signatures.
    pub domain: String,
    pub include_subdomains: bool,
    pub keys: Vec<SigningKey>,
}

/// Every loaded key, by domain (lower case).
#[derive(Debug, Default)]
pub struct KeySet {
    pub domains: HashMap<String, DomainKeys>,
    /// What loaded but deserves a warning (an RSA key under 2048 bits), each
    /// naming its field: logged once per load (start-up, each `keys_dir` reload).
    pub warnings: Vec<String>,
}

impl KeySet {
    /// The keys for a `From:` domain: its own entry, else the nearest parent
    /// entry that includes subdomains.
    pub fn lookup(&self, from_domain: &str) -> Option<&DomainKeys> {
        let d = from_domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.domains.get(&d) {
            return Some(k);
        }
        let mut rest = d.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(k) = self.domains.get(parent)
                && k.include_subdomains
            {
                return Some(k);
            }
            rest = parent;
        }
        None
    }

    pub fn key_count(&self) -> usize {
        self.domains.values().map(|d| d.keys.len()).sum()
    }
}

/// Loads the keys of `domains` (`prefix` names them in errors); relative key
/// paths are taken relative to `base`. Warnings go to `into.warnings`.
pub fn load_domains(
    prefix: &str,
    domains: &[DomainConfig],
    base: Option<&Path>,
    into: &mut KeySet,
) -> Result<(), FieldError> {
    validate_domains(prefix, domains)?;
    for (i, d) in domains.iter().enumerate() {
        let name = d.domain.to_ascii_lowercase();
        if into.domains.contains_key(&name) {
            return Err(field_err(
                format!("{prefix}[{i}].domain"),
                format!("{name} already has keys (listed both in dkim.domains and keys_dir)"),
            ));
        }
        let mut keys = Vec::new();
        for (j, s) in d.selectors.iter().enumerate() {
            let field = format!("{prefix}[{i}].selectors[{j}].key_file");
            let path = match base {
                Some(b) if s.key_file.is_relative() => b.join(&s.key_file),
                _ => s.key_file.clone(),
            };
            let key = load_key(&path, s.algorithm).map_err(|m| field_err(&field, m))?;
            if let Some(bits) = key.short_rsa_bits() {
                into.warnings.push(format!(
                    "{field}: the RSA key of selector {} for {name} has {bits} bits; RFC 8301 recommends 2048 (receivers may treat shorter keys as weak): it signs, but replace it",
                    s.selector
                ));
            }
            keys.push(SigningKey {
                selector: s.selector.clone(),
                algorithm: s.algorithm,
                key,
            });
        }
        into.domains.insert(
            name.clone(),
            DomainKeys {
                domain: name,
                include_subdomains: d.include_subdomains,
                keys,
            },
        );
    }
    Ok(())
}

/// Reads `keys.yaml` of a keys directory; `Ok(None)` when there is none yet.
pub fn read_keys_file(dir: &Path) -> Result<Option<(KeysFile, Vec<u8>)>, FieldError> {
    let path = dir.join("keys.yaml");
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(field_err(
                "dkim.keys_dir",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    };
    let de = serde_norway::Deserializer::from_slice(&text);
    let file: KeysFile = serde_path_to_error::deserialize(de).map_err(|e| {
        field_err(
            format!("{}: {}", path.display(), e.path()),
            e.into_inner().to_string(),
        )
    })?;
    Ok(Some((file, text)))
}

/// A fingerprint of a keys directory's content (keys.yaml and every key file it
/// names), so a reload happens when anything in it changes, whatever the file
/// times (a Secret volume swaps a symlink).
pub fn fingerprint(dir: &Path) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let yaml = std::fs::read(dir.join("keys.yaml")).unwrap_or_default();
    ctx.update(&yaml);
    if let Ok(file) = serde_norway::from_slice::<KeysFile>(&yaml) {
        for d in &file.domains {
            for s in &d.selectors {
                let p: PathBuf = dir.join(&s.key_file);
                ctx.update(&std::fs::read(p).unwrap_or_default());
                ctx.update(b"\0");
            }
        }
    }
    ctx.finish().as_ref().to_vec()
}

/// One key file, as the selector's algorithm needs it.
pub fn load_key(path: &Path, algorithm: Algorithm) -> Result<PrivateKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        format!(
            "malformed key: no PEM private key in {} (expected PKCS#8 \"BEGIN PRIVATE KEY\", or for RSA PKCS#1 \"BEGIN RSA PRIVATE KEY\")",
            path.display()
        )
    })?;
    let at = path.display();
    match (algorithm, &der) {
        (Algorithm::RsaSha256, PrivateKeyDer::Pkcs1(k)) => {
            let der = k.secret_pkcs1_der();
            match check_rsa_bits(rsa_bits_pkcs1(der), &at)? {
                RsaSigner::Ring => RsaKeyPair::from_der(der)
                    .map(PrivateKey::Rsa)
                    .map_err(|e| format!("malformed RSA key in {at}: {e}")),
                RsaSigner::RustCrypto => {
                    use rsa::pkcs1::DecodeRsaPrivateKey;
                    rsa::RsaPrivateKey::from_pkcs1_der(der)
                        .map_err(|e| format!("malformed RSA key in {at}: {e}"))
                        .and_then(|k| short_rsa(k, &at))
                }
            }
        }
        (Algorithm::RsaSha256, PrivateKeyDer::Pkcs8(k)) => {
            let der = k.secret_pkcs8_der();
            if Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).is_ok() {
                return Err(format!(
                    "{at} holds an Ed25519 key but the selector's algorithm is rsa-sha256"
                ));
            }
            match check_rsa_bits(pkcs8_inner(der).and_then(rsa_bits_pkcs1), &at)? {
                RsaSigner::Ring => RsaKeyPair::from_pkcs8(der)
                    .map(PrivateKey::Rsa)
                    .map_err(|e| format!("malformed RSA key in {at}: {e}")),
                RsaSigner::RustCrypto => {
                    use rsa::pkcs8::DecodePrivateKey;
                    rsa::RsaPrivateKey::from_pkcs8_der(der)
                        .map_err(|e| format!("malformed RSA key in {at}: {e}"))
                        .and_then(|k| short_rsa(k, &at))
                }
            }
        }
        (Algorithm::Ed25519Sha256, PrivateKeyDer::Pkcs8(k)) => {
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(k.secret_pkcs8_der())
                .map(PrivateKey::Ed25519)
                .map_err(|_| {
                    format!(
                        "{at} holds no Ed25519 key (PKCS#8) but the selector's algorithm is ed25519-sha256"
                    )
                })
        }
        (Algorithm::Ed25519Sha256, _) => Err(format!(
            "{at} holds no Ed25519 key (PKCS#8) but the selector's algorithm is ed25519-sha256"
        )),
        (Algorithm::RsaSha256, _) => Err(format!(
            "{at} holds no RSA key (PKCS#8 or PKCS#1) but the selector's algorithm is rsa-sha256"
        )),
    }
}

/// Which implementation signs with an RSA key of this size.
enum RsaSigner {
    Ring,
    RustCrypto,
}

fn check_rsa_bits(bits: Option<usize>, at: &impl std::fmt::Display) -> Result<RsaSigner, String> {
    match bits {
        Some(b) if b < RSA_MIN_BITS => Err(format!(
            "RSA key of {b} bits in {at} is too short: verifiers ignore keys under 1024 bits (RFC 8301); use 2048"
        )),
        Some(b) if b < RSA_WARN_BITS => Ok(RsaSigner::RustCrypto),
        _ => Ok(RsaSigner::Ring),
    }
}

fn short_rsa(k: rsa::RsaPrivateKey, at: &impl std::fmt::Display) -> Result<PrivateKey, String> {
    k.validate()
        .map_err(|e| format!("malformed RSA key in {at}: {e}"))?;
    Ok(PrivateKey::RsaShort(Box::new(
        rsa::pkcs1v15::SigningKey::new(k),
    )))
}

impl PrivateKey {
    /// The modulus size of an RSA key under 2048 bits (the ones to warn about).
    pub fn short_rsa_bits(&self) -> Option<usize> {
        match self {
            PrivateKey::RsaShort(k) => {
                use rsa::traits::PublicKeyParts;
                Some(k.as_ref().as_ref().n().bits())
            }
            _ => None,
        }
    }
}

/// One DER TLV: (tag, content, rest).
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&l0, d) = d.split_first()?;
    let (len, d) = if l0 < 0x80 {
        (l0 as usize, d)
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let len = d[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &d[n..])
    };
    (d.len() >= len).then(|| (tag, &d[..len], &d[len..]))
}

/// The PKCS#1 key inside a PKCS#8 PrivateKeyInfo.
fn pkcs8_inner(der: &[u8]) -> Option<&[u8]> {
    let (0x30, seq, _) = tlv(der)? else {
        return None;
    };
    let (0x02, _, rest) = tlv(seq)? else {
        return None;
    };
    let (0x30, _, rest) = tlv(rest)? else {
        return None;
    };
    let (0x04, inner, _) = tlv(rest)? else {
        return None;
    };
    Some(inner)
}

/// The modulus length of a PKCS#1 RSAPrivateKey.
fn rsa_bits_pkcs1(der: &[u8]) -> Option<usize> {
    let (0x30, seq, _) = tlv(der)? else {
        return None;
    };
    let (0x02, _, rest) = tlv(seq)? else {
        return None;
    };
    let (0x02, n, _) = tlv(rest)? else {
        return None;
    };
    let n = &n[n.iter().position(|&b| b != 0)?..];
    Some(n.len() * 8 - n[0].leading_zeros() as usize)
}

/// Wraps a PKCS#1 RSAPublicKey into a SubjectPublicKeyInfo (what `openssl
/// rsa -pubout` prints and every verifier reads).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    fn der_len(n: usize, out: &mut Vec<u8>) {
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let bytes = n.to_be_bytes();
            let skip = bytes
                .iter()
                .position(|&b| b != 0)
                .unwrap_or(bytes.len() - 1);
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    // SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bits);
    bits.push(0);
    bits.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(ALG.len() + bits.len(), &mut out);
    out.extend_from_slice(ALG);
    out.extend_from_slice(&bits);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openssl(args: &[&str]) -> bool {
        std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn rsa_and_ed25519_keys_load_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let s = |n: &str| p(n).to_str().unwrap().to_owned();
        assert!(openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &s("rsa.pem")
        ]));
        assert!(openssl(&[
            "rsa",
            "-in",
            &s("rsa.pem"),
            "-traditional",
            "-out",
            &s("rsa1.pem")
        ]));
        assert!(openssl(&[
            "genpkey",
            "-algorithm",
            "ED25519",
            "-out",
            &s("ed.pem")
        ]));
        assert!(openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
            &s("rsa1024.pem")
        ]));
        assert!(openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:768",
            "-out",
            &s("rsa768.pem")
        ]));
        assert!(
            std::fs::read_to_string(p("rsa1.pem"))
                .unwrap()
                .contains("BEGIN RSA PRIVATE KEY")
        );

        assert!(matches!(
            load_key(&p("rsa.pem"), Algorithm::RsaSha256),
            Ok(PrivateKey::Rsa(_))
        ));
        assert!(matches!(
            load_key(&p("rsa1.pem"), Algorithm::RsaSha256),
            Ok(PrivateKey::Rsa(_))
        ));
        assert!(matches!(
            load_key(&p("ed.pem"), Algorithm::Ed25519Sha256),
            Ok(PrivateKey::Ed25519(_))
        ));

        // 1024-2047 bits: loaded (RustCrypto signs them), flagged for a warning.
        let short = load_key(&p("rsa1024.pem"), Algorithm::RsaSha256).unwrap();
        assert_eq!(short.short_rsa_bits(), Some(1024));
        assert_eq!(
            load_key(&p("rsa.pem"), Algorithm::RsaSha256)
                .unwrap()
                .short_rsa_bits(),
            None
        );
        assert!(openssl(&[
            "rsa",
            "-in",
            &s("rsa1024.pem"),
            "-traditional",
            "-out",
            &s("rsa1024-1.pem")
        ]));
        assert!(matches!(
            load_key(&p("rsa1024-1.pem"), Algorithm::RsaSha256),
            Ok(PrivateKey::RsaShort(_))
        ));
        // Its published key is what openssl derives.
        assert!(openssl(&[
            "pkey",
            "-in",
            &s("rsa1024.pem"),
            "-pubout",
            "-outform",
            "DER",
            "-out",
            &s("rsa1024.pub")
        ]));
        let k = SigningKey {
            selector: "s".into(),
            algorithm: Algorithm::RsaSha256,
            key: short,
        };
        {
            use base64::Engine;
            let want = base64::engine::general_purpose::STANDARD
                .encode(std::fs::read(p("rsa1024.pub")).unwrap());
            assert_eq!(k.public_key_b64(), want);
        }
        let e = load_key(&p("rsa768.pem"), Algorithm::RsaSha256)
            .err()
            .unwrap();
        assert!(e.contains("768 bits") && e.contains("RFC 8301"), "{e}");
        let e = load_key(&p("ed.pem"), Algorithm::RsaSha256).err().unwrap();
        assert!(e.contains("Ed25519 key"), "{e}");
        let e = load_key(&p("rsa.pem"), Algorithm::Ed25519Sha256)
            .err()
            .unwrap();
        assert!(e.contains("no Ed25519 key"), "{e}");
        let e = load_key(&p("missing.pem"), Algorithm::RsaSha256)
            .err()
            .unwrap();
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        std::fs::write(
            p("junk.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = load_key(&p("junk.pem"), Algorithm::RsaSha256)
            .err()
            .unwrap();
        assert!(e.contains("malformed"), "{e}");
        std::fs::write(p("empty.pem"), "not a key").unwrap();
        let e = load_key(&p("empty.pem"), Algorithm::Ed25519Sha256)
            .err()
            .unwrap();
        assert!(e.contains("malformed key: no PEM private key"), "{e}");

        // The published key is what openssl derives from the private key.
        assert!(openssl(&[
            "pkey",
            "-in",
            &s("rsa.pem"),
            "-pubout",
            "-outform",
            "DER",
            "-out",
            &s("rsa.pub")
        ]));
        let k = SigningKey {
            selector: "s".into(),
            algorithm: Algorithm::RsaSha256,
            key: load_key(&p("rsa.pem"), Algorithm::RsaSha256).unwrap(),
        };
        use base64::Engine;
        let want =
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(p("rsa.pub")).unwrap());
        assert_eq!(k.public_key_b64(), want);
        assert!(k.dns_record().starts_with("v=DKIM1; k=rsa; p=MIIBIjAN"));

        // A short key loads with a warning naming its field; a 2048-bit one without.
        let domains: Vec<DomainConfig> = serde_norway::from_str(
            "[{domain: example.com, selectors: [{selector: a, algorithm: rsa-sha256, key_file: rsa.pem}, {selector: old, algorithm: rsa-sha256, key_file: rsa1024.pem}]}]",
        )
        .unwrap();
        let mut set = KeySet::default();
        load_domains("dkim.domains", &domains, Some(dir.path()), &mut set).unwrap();
        assert_eq!(set.key_count(), 2);
        assert_eq!(set.warnings.len(), 1, "{:?}", set.warnings);
        let w = &set.warnings[0];
        assert!(
            w.starts_with("dkim.domains[0].selectors[1].key_file: ")
                && w.contains("1024 bits")
                && w.contains("selector old"),
            "{w}"
        );
        // Under 1024 bits: refused, naming the field.
        let domains: Vec<DomainConfig> = serde_norway::from_str(
            "[{domain: example.com, selectors: [{selector: tiny, algorithm: rsa-sha256, key_file: rsa768.pem}]}]",
        )
        .unwrap();
        let e = load_domains(
            "dkim.domains",
            &domains,
            Some(dir.path()),
            &mut KeySet::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "dkim.domains[0].selectors[0].key_file");
        assert!(e.to_string().contains("768 bits"), "{e}");

        // A missing file in a domain list names the field.
        let domains: Vec<DomainConfig> = serde_norway::from_str(
            "[{domain: example.com, selectors: [{selector: a, algorithm: rsa-sha256, key_file: rsa.pem}, {selector: b, algorithm: ed25519-sha256, key_file: nope.pem}]}]",
        )
        .unwrap();
        let e = load_domains(
            "dkim.domains",
            &domains,
            Some(dir.path()),
            &mut KeySet::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "dkim.domains[0].selectors[1].key_file");
    }

    #[test]
    fn lookup_by_domain_and_parent() {
        let mut set = KeySet::default();
        for (d, inc) in [("example.com", true), ("other.org", false)] {
            set.domains.insert(
                d.into(),
                DomainKeys {
                    domain: d.into(),
                    include_subdomains: inc,
                    keys: vec![],
                },
            );
        }
        assert_eq!(set.lookup("Example.COM.").unwrap().domain, "example.com");
        assert_eq!(
            set.lookup("mail.news.example.com").unwrap().domain,
            "example.com"
        );
        assert!(set.lookup("sub.other.org").is_none());
        assert!(set.lookup("notexample.com").is_none());
    }
}
