//! Builds `DKIM-Signature:` fields (RFC 6376 §5, RFC 8463 for Ed25519). Pure:
//! message bytes and keys in, header fields out.

use base64::Engine;
use ring::digest::{Context, SHA256, digest};
use ring::signature::RSA_PKCS1_SHA256;

use super::canon::{self, Field};
use super::config::Canonicalization;
use super::keys::{PrivateKey, SigningKey};

/// Signed when present, each instance (RFC 6376 §5.4.1, M3AAWG signing practice);
/// `true`: also listed once more than it occurs ("oversigned"), so a hop cannot
/// add one (a second From:, a forged List-Unsubscribe) without breaking the
/// signature.
const SIGNED: &[(&str, bool)] = &[
    ("from", true),
    ("reply-to", true),
    ("subject", true),
    ("date", true),
    ("to", true),
    ("cc", true),
    ("message-id", true),
    ("in-reply-to", true),
    ("references", true),
    ("mime-version", true),
    ("content-type", true),
    ("content-transfer-encoding", true),
    ("content-id", false),
    ("content-description", false),
    ("resent-date", false),
    ("resent-from", false),
    ("resent-sender", false),
    ("resent-to", false),
    ("resent-cc", false),
    ("resent-message-id", false),
    ("list-id", false),
    ("list-help", false),
    ("list-unsubscribe", true),
    ("list-unsubscribe-post", true),
    ("list-subscribe", false),
    ("list-post", false),
    ("list-owner", false),
    ("list-archive", false),
    ("feedback-id", false),
    ("sender", true),
];

pub struct SignParams<'a> {
    pub domain: &'a str,
    pub canon: Canonicalization,
    /// `t=`, seconds since the epoch.
    pub timestamp: u64,
    /// `x=`, when set.
    pub expires: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("signing with selector {selector} failed")]
pub struct SignError {
    pub selector: String,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The `h=` list for this message's fields, in signing order (one pass over the
/// fields: a message has a dozen, the list thirty names).
fn signed_names(fields: &[Field<'_>]) -> Vec<&'static str> {
    let mut counts = [0usize; SIGNED.len()];
    for f in fields {
        if let Some(i) = SIGNED
            .iter()
            .position(|(n, _)| n.len() == f.name.len() && f.name.eq_ignore_ascii_case(n.as_bytes()))
        {
            counts[i] += 1;
        }
    }
    let mut out = Vec::with_capacity(32);
    for (&(name, over), n) in SIGNED.iter().zip(counts) {
        out.extend(std::iter::repeat_n(name, n + usize::from(over)));
    }
    out
}

/// The canonical header data for `names`: instances of a repeated name are taken
/// from the bottom up; a name listed more often than it occurs adds nothing.
fn header_data(fields: &[Field<'_>], names: &[&str], canon: Canonicalization) -> Vec<u8> {
    // Few distinct names: a short list beats hashing them.
    let mut used: Vec<(&str, usize)> = Vec::with_capacity(names.len());
    let mut out = Vec::with_capacity(fields.iter().map(|f| f.raw.len()).sum());
    for &name in names {
        let skip = match used.iter_mut().find(|(n, _)| *n == name) {
            Some((_, k)) => k,
            None => {
                used.push((name, 0));
                &mut used.last_mut().expect("pushed").1
            }
        };
        let pick = fields
            .iter()
            .rev()
            .filter(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
            .nth(*skip);
        *skip += 1;
        if let Some(f) = pick {
            canon::header(canon.header, f.raw, &mut out);
        }
    }
    out
}

/// Appends `items` joined by `sep`, folding (CRLF TAB) before a line would pass
/// about 76 columns; `col` is the column the first item starts at.
fn fold_list(out: &mut String, items: &[&str], sep: &str, mut col: usize) {
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(sep);
            col += sep.len();
            if col + it.len() > 76 {
                out.push_str("\r\n\t");
                col = 1;
            }
        }
        out.push_str(it);
        col += it.len();
    }
}

/// One `DKIM-Signature:` field (CRLF-terminated) per key, for the message `msg`
/// (headers and body as queued); prepend them, in order, to the message.
pub fn sign(msg: &[u8], keys: &[SigningKey], p: &SignParams<'_>) -> Result<Vec<u8>, SignError> {
    let (fields, body) = canon::split(msg);
    sign_split(&fields, body, keys, p)
}

/// [`sign`] for a message already split by [`canon::split`] (the caller needed
/// its fields too: one parse per message).
pub fn sign_split(
    fields: &[Field<'_>],
    body: &[u8],
    keys: &[SigningKey],
    p: &SignParams<'_>,
) -> Result<Vec<u8>, SignError> {
    let mut bh = Context::new(&SHA256);
    canon::body(p.canon.body, body, |part| bh.update(part));
    let bh = b64(bh.finish().as_ref());
    let names = signed_names(fields);
    let headers = header_data(fields, &names, p.canon);
    let rng = ring::rand::SystemRandom::new();
    let mut out = Vec::with_capacity(600 * keys.len());
    for key in keys {
        let mut h = format!(
            "DKIM-Signature: v=1; a={}; c={}; d={}; s={};\r\n\tt={};",
            key.algorithm.as_str(),
            p.canon.tag(),
            p.domain,
            key.selector,
            p.timestamp
        );
        if let Some(x) = p.expires {
            h.push_str(&format!(" x={x};"));
        }
        h.push_str(&format!(" bh={bh};\r\n\th="));
        fold_list(&mut h, &names, ":", 3);
        h.push_str(";\r\n\tb=");
        let mut data = headers.clone();
        canon::header(p.canon.header, h.as_bytes(), &mut data);
        // The field itself goes in without its final CRLF (RFC 6376 §3.7).
        data.truncate(data.len() - 2);
        let sig = match &key.key {
            PrivateKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, &data, &mut sig)
                    .map_err(|_| SignError {
                        selector: key.selector.clone(),
                    })?;
                sig
            }
            PrivateKey::RsaShort(k) => {
                PrivateKey::sign_rsa_short(k, &data).map_err(|_| SignError {
                    selector: key.selector.clone(),
                })?
            }
            // RFC 8463: Ed25519 signs the SHA-256 hash of the data.
            PrivateKey::Ed25519(k) => k.sign(digest(&SHA256, &data).as_ref()).as_ref().to_vec(),
        };
        let sig = b64(&sig);
        let chunks: Vec<&str> = sig
            .as_bytes()
            .chunks(72)
            .map(|c| std::str::from_utf8(c).expect("base64"))
            .collect();
        fold_list(&mut h, &chunks, "", 3);
        h.push_str("\r\n");
        out.extend_from_slice(h.as_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversigning_and_bottom_up_selection() {
        let msg = b"Received: x\r\nFrom: a@b.c\r\nTo: one@x.y\r\nTo: two@x.y\r\nX-Other: 1\r\n\r\nbody\r\n";
        let (fields, _) = canon::split(msg);
        let names = signed_names(&fields);
        assert_eq!(names.iter().filter(|n| **n == "from").count(), 2);
        assert_eq!(names.iter().filter(|n| **n == "to").count(), 3);
        assert_eq!(names.iter().filter(|n| **n == "subject").count(), 1);
        assert!(!names.contains(&"received") && !names.contains(&"x-other"));
        assert!(!names.contains(&"list-id"));
        let data = header_data(&fields, &["to", "to", "to"], Canonicalization::default());
        assert_eq!(data, b"to:two@x.y\r\nto:one@x.y\r\n");
    }

    #[test]
    fn long_lists_fold_below_78_columns() {
        let mut s = String::from("h=");
        let items = ["content-transfer-encoding"; 8];
        fold_list(&mut s, &items, ":", 3);
        assert!(s.split("\r\n").all(|l| l.len() <= 78), "{s}");
        assert_eq!(s.replace("\r\n\t", "").matches(':').count(), 7);
    }
}
