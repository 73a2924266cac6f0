//! DKIM private keys: generation, parsing a Secret's PEM, and the public half as
//! the TXT record publishes it. Key bytes never reach a log: [`KeyMaterial`]'s
//! `Debug` leaves them out.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rsa::RsaPrivateKey;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use rsa::traits::PublicKeyParts as _;

use crate::crd::{DkimAlgorithm, TxtRecord};

/// RSA keys shorter than this are refused (RFC 8301).
pub const MIN_RSA_BITS: u32 = 1024;
/// RSA keys shorter than this are warned about: receivers expect 2048.
pub const WARN_RSA_BITS: u32 = 2048;
pub const DEFAULT_RSA_BITS: u32 = 2048;
/// Largest TXT string (RFC 1035 character-string).
const TXT_CHUNK: usize = 255;

/// A usable private key: PKCS#8 PEM and the public key as `p=` carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial {
    pub algorithm: DkimAlgorithm,
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub pem: String,
    /// Base64 of the public key: SubjectPublicKeyInfo DER for RSA (what
    /// opendkim-genkey publishes), the raw 32 bytes for Ed25519 (RFC 8463).
    pub public: String,
    /// RSA modulus size.
    pub bits: Option<u32>,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("algorithm", &self.algorithm)
            .field("public", &self.public)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// Why a key cannot be used; the message names what is wrong, never the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM block (-----BEGIN PRIVATE KEY-----) found")]
    NoPem,
    #[error("the PEM block is not valid base64")]
    BadBase64,
    #[error("an encrypted private key: give it unencrypted (openssl pkcs8 -topk8 -nocrypt)")]
    Encrypted,
    #[error("a {0:?} PEM block: give a PKCS#8 private key (-----BEGIN PRIVATE KEY-----)")]
    UnsupportedLabel(String),
    #[error("not an RSA or Ed25519 PKCS#8 private key")]
    Unparsable,
    #[error("an {found} key, but the algorithm is {wanted}")]
    AlgorithmMismatch {
        found: &'static str,
        wanted: &'static str,
    },
    #[error("an RSA key of {0} bits: at least 1024 are needed (2048 recommended)")]
    TooShort(u32),
    #[error("cannot generate the key: {0}")]
    Generate(String),
}

impl KeyError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::AlgorithmMismatch { .. } => "AlgorithmMismatch",
            KeyError::TooShort(_) => "KeyTooShort",
            KeyError::Generate(_) => "KeyGenerationFailed",
            _ => "KeyInvalid",
        }
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The first PEM block: its label and DER bytes.
fn pem_decode(text: &str) -> Result<(String, Vec<u8>), KeyError> {
    let mut lines = text.lines().map(str::trim);
    let label = loop {
        let line = lines.next().ok_or(KeyError::NoPem)?;
        if let Some(l) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            break l.to_owned();
        }
    };
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    for line in lines.by_ref() {
        if line == end {
            let der = B64
                .decode(body.as_bytes())
                .map_err(|_| KeyError::BadBase64)?;
            return Ok((label, der));
        }
        // Headers of old-style encrypted PEM (`Proc-Type: 4,ENCRYPTED`).
        if line.contains(':') {
            return Err(KeyError::Encrypted);
        }
        body.push_str(line);
    }
    Err(KeyError::NoPem)
}

fn rsa_material(key: &RsaPrivateKey) -> Result<KeyMaterial, KeyError> {
    let bits = (key.size() * 8) as u32;
    if bits < MIN_RSA_BITS {
        return Err(KeyError::TooShort(bits));
    }
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Generate(e.to_string()))?
        .to_string();
    let spki = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    Ok(KeyMaterial {
        algorithm: DkimAlgorithm::RsaSha256,
        pem,
        public: B64.encode(spki.as_bytes()),
        bits: Some(bits),
    })
}

/// PKCS#8 v1 of an Ed25519 seed (RFC 8410), as `openssl genpkey` writes it: the
/// form every DKIM library reads.
fn ed25519_v1_der(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

fn ed25519_material(der: &[u8]) -> Result<KeyMaterial, KeyError> {
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|_| KeyError::Unparsable)?;
    // The seed sits right after the fixed 16-byte prefix in both v1 and v2.
    let seed: [u8; 32] = der
        .get(16..48)
        .and_then(|s| s.try_into().ok())
        .ok_or(KeyError::Unparsable)?;
    let v1 = ed25519_v1_der(&seed);
    // The normalised form must be the same key.
    let again =
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&v1).map_err(|_| KeyError::Unparsable)?;
    if again.public_key().as_ref() != pair.public_key().as_ref() {
        return Err(KeyError::Unparsable);
    }
    Ok(KeyMaterial {
        algorithm: DkimAlgorithm::Ed25519Sha256,
        pem: pem_encode("PRIVATE KEY", &v1),
        public: B64.encode(pair.public_key().as_ref()),
        bits: None,
    })
}

/// A fresh key (OS randomness).
pub fn generate(algorithm: DkimAlgorithm, rsa_bits: u32) -> Result<KeyMaterial, KeyError> {
    match algorithm {
        DkimAlgorithm::RsaSha256 => {
            if rsa_bits < MIN_RSA_BITS {
                return Err(KeyError::TooShort(rsa_bits));
            }
            let key = RsaPrivateKey::new(&mut rand_core::OsRng, rsa_bits as usize)
                .map_err(|e| KeyError::Generate(e.to_string()))?;
            rsa_material(&key)
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| KeyError::Generate("the OS random number generator".into()))?;
            ed25519_material(doc.as_ref())
        }
    }
}

/// Reads a PEM private key (PKCS#8, or PKCS#1 `RSA PRIVATE KEY`, which is
/// converted) and checks it against the algorithm the spec names.
pub fn parse(pem: &[u8], wanted: DkimAlgorithm) -> Result<KeyMaterial, KeyError> {
    let text = String::from_utf8_lossy(pem);
    let (label, der) = pem_decode(&text)?;
    let material = match label.as_str() {
        "PRIVATE KEY" => match RsaPrivateKey::from_pkcs8_der(&der) {
            Ok(k) => rsa_material(&k)?,
            Err(_) => ed25519_material(&der)?,
        },
        "RSA PRIVATE KEY" => {
            rsa_material(&RsaPrivateKey::from_pkcs1_der(&der).map_err(|_| KeyError::Unparsable)?)?
        }
        "ENCRYPTED PRIVATE KEY" => return Err(KeyError::Encrypted),
        other => return Err(KeyError::UnsupportedLabel(other.to_owned())),
    };
    if material.algorithm != wanted {
        return Err(KeyError::AlgorithmMismatch {
            found: material.algorithm.as_str(),
            wanted: wanted.as_str(),
        });
    }
    Ok(material)
}

/// `SELECTOR._domainkey.DOMAIN`
pub fn record_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{domain}")
}

/// The TXT record publishing `key` under `selector`.
pub fn txt_record(selector: &str, domain: &str, key: &KeyMaterial) -> TxtRecord {
    let value = format!("v=DKIM1; k={}; p={}", key.algorithm.key_type(), key.public);
    TxtRecord {
        name: record_name(selector, domain),
        zone_value: zone_strings(&value),
        value,
    }
}

/// `"…" "…"`: the value cut into strings of at most 255 bytes (it is ASCII).
pub fn zone_strings(value: &str) -> String {
    value
        .as_bytes()
        .chunks(TXT_CHUNK)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_round_trips_and_publishes_the_raw_key() {
        let k = generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap();
        assert!(k.pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{k:?}");
        assert_eq!(B64.decode(&k.public).unwrap().len(), 32);
        let back = parse(k.pem.as_bytes(), DkimAlgorithm::Ed25519Sha256).unwrap();
        assert_eq!(back, k);
        let e = parse(k.pem.as_bytes(), DkimAlgorithm::RsaSha256).unwrap_err();
        assert_eq!(e.reason(), "AlgorithmMismatch");
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }

    #[test]
    fn zone_strings_split_at_255_bytes() {
        let v = "x".repeat(600);
        let z = zone_strings(&v);
        let parts: Vec<&str> = z.split(' ').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].len(), 257);
        assert_eq!(parts[2].len(), 90 + 2);
    }

    #[test]
    fn refuses_what_is_not_a_plain_private_key() {
        assert_eq!(
            parse(b"hello", DkimAlgorithm::RsaSha256),
            Err(KeyError::NoPem)
        );
        let enc =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert_eq!(
            parse(enc.as_bytes(), DkimAlgorithm::RsaSha256),
            Err(KeyError::Encrypted)
        );
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(
            parse(cert.as_bytes(), DkimAlgorithm::RsaSha256)
                .unwrap_err()
                .reason(),
            "KeyInvalid"
        );
        let junk = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            parse(junk.as_bytes(), DkimAlgorithm::RsaSha256),
            Err(KeyError::Unparsable)
        );
    }
}
