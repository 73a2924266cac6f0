//! What one message is, as the SMTP session builds it and the queue stores it:
//! the envelope (MAIL/RCPT parameters, client facts) and its queue id. The session
//! and the client state machine need these, so they live in the protocol crate
//! and the queue stores them as they are.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A queue identifier: 20 upper-case Crockford base-32 characters, time-ordered
/// (48-bit milliseconds then 52 random bits), so ids sort by arrival and never collide
/// across relay processes sharing one store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct QueueId(String);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// `DIGIT[b]` = the value of octet `b` as a Crockford digit, or `NOT_A_DIGIT`: ids are
/// checked several times per message, and a search of `CROCKFORD` per octet cost
/// ~700 instructions per check.
const NOT_A_DIGIT: u8 = 0xff;
const DIGIT: [u8; 256] = {
    let mut t = [NOT_A_DIGIT; 256];
    let mut i = 0;
    while i < CROCKFORD.len() {
        t[CROCKFORD[i] as usize] = i as u8;
        i += 1;
    }
    t
};

impl QueueId {
    pub fn generate() -> Self {
        let ms = now_ms() & ((1 << 48) - 1);
        let rnd: u64 = rand::random::<u64>() & ((1 << 52) - 1);
        let v: u128 = ((ms as u128) << 52) | rnd as u128;
        let mut s = String::with_capacity(20);
        for i in (0..20).rev() {
            s.push(CROCKFORD[((v >> (i * 5)) & 31) as usize] as char);
        }
        QueueId(s)
    }

    /// The 32 digits of an id, in order of value.
    pub const DIGITS: &'static [u8; 32] = CROCKFORD;

    /// [`QueueId::generate`] with its last two digits (10 of its 52 random bits)
    /// chosen by `tail`, given the 18 digits before them and the two drawn at
    /// random: lets a store place the id (the Redis queue keeps a relay's new mail
    /// in one shard of a single server). What `tail` returns must be two of
    /// [`QueueId::DIGITS`]; anything else keeps the random ones.
    pub fn generate_with_tail(tail: impl FnOnce(&[u8], [u8; 2]) -> [u8; 2]) -> Self {
        let mut id = Self::generate();
        let b = id.0.as_bytes();
        let chosen = tail(&b[..18], [b[18], b[19]]);
        if chosen.iter().all(|d| DIGIT[usize::from(*d)] != NOT_A_DIGIT) {
            id.0.truncate(18);
            id.0.extend(chosen.map(char::from));
        }
        id
    }

    /// Parses an id given by a user or read from a store; rejects anything that could
    /// not have come from [`QueueId::generate`] (keys are built from ids).
    pub fn parse(s: &str) -> Option<Self> {
        Self::is_valid(s).then(|| QueueId(s.to_owned()))
    }

    /// Whether [`QueueId::parse`] would accept `s` (without building the id).
    pub fn is_valid(s: &str) -> bool {
        s.len() == 20 && s.bytes().all(|b| DIGIT[usize::from(b)] != NOT_A_DIGIT)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The millisecond in which the id was generated (its top 48 bits): the arrival
    /// time of the message it names.
    pub fn timestamp_ms(&self) -> u64 {
        // The first 10 characters carry the top 50 of the 100 bits; the last 2 of
        // those are random.
        let top = self.0.bytes().take(10).fold(0u64, |acc, b| {
            let digit = match DIGIT[usize::from(b)] {
                NOT_A_DIGIT => 0,
                d => u64::from(d),
            };
            (acc << 5) | digit
        });
        top >> 2
    }
}

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 1652 / RFC 6152 body type declared at MAIL FROM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BodyType {
    #[default]
    #[serde(rename = "7bit")]
    SevenBit,
    #[serde(rename = "8bitmime")]
    EightBitMime,
    #[serde(rename = "binarymime")]
    BinaryMime,
}

/// RFC 3461 RET parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DsnRet {
    Full,
    Hdrs,
}

/// RFC 3461 NOTIFY parameter of one recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DsnNotify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

/// Everything the client declared at MAIL FROM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailParams {
    /// Reverse-path without angle brackets; empty for the null sender `<>`.
    pub from: String,
    pub size: Option<u64>,
    pub body: BodyType,
    pub smtputf8: bool,
    pub ret: Option<DsnRet>,
    pub envid: Option<String>,
    /// RFC 8689 REQUIRETLS: every hop must use TLS with a verified certificate, or
    /// the message bounces. Accepted only over TLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requiretls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// Forward-path without angle brackets.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<DsnNotify>,
    /// RFC 3461 ORCPT as given: `addr-type;xtext`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// Who handed us the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// The client address that relay policy saw (after PROXY protocol, if any).
    pub ip: IpAddr,
    pub port: u16,
    /// The EHLO/HELO argument.
    pub helo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
    /// The listener that accepted the connection (its configured name).
    pub listener: String,
}

/// The envelope and metadata of a queued message; the body is stored beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    pub mail: MailParams,
    pub recipients: Vec<Recipient>,
    pub client: ClientInfo,
    /// Milliseconds since the Unix epoch when the message was accepted.
    pub received_at_ms: u64,
    /// Relay hostname (EHLO name) of the process that accepted it.
    pub received_by: String,
}

/// One message as stored: envelope plus the exact message bytes (with our added
/// headers, dot-unstuffed, CRLF line endings, no terminating `.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sortable_and_parse_back() {
        let a = QueueId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = QueueId::generate();
        assert_ne!(a, b);
        assert!(a < b, "{a} should sort before {b}");
        assert_eq!(QueueId::parse(a.as_str()), Some(a.clone()));
        assert_eq!(QueueId::parse("short"), None);
        assert_eq!(
            QueueId::parse("0123456789ABCDEFGHJU"),
            None,
            "U is not Crockford"
        );
        assert_eq!(QueueId::parse("{bad}6789ABCDEFGHJKMN"), None);
    }

    #[test]
    fn an_id_octet_is_valid_exactly_when_it_is_a_crockford_digit() {
        for b in 0..=255u8 {
            let id: String = std::iter::repeat_n(char::from(b), 20).collect();
            let want = CROCKFORD.contains(&b);
            assert_eq!(QueueId::is_valid(&id), want, "octet {b}");
            assert_eq!(QueueId::parse(&id).is_some(), want, "octet {b}");
        }
    }

    #[test]
    fn a_chosen_tail_ends_the_id_and_anything_but_two_digits_is_ignored() {
        let mut seen = None;
        let before = now_ms();
        let id = QueueId::generate_with_tail(|head, random| {
            seen = Some((head.to_vec(), random));
            *b"ZZ"
        });
        let (head, random) = seen.expect("tail called");
        assert_eq!(id.as_str().as_bytes()[..18], head[..]);
        assert!(id.as_str().ends_with("ZZ"), "{id}");
        assert!(QueueId::is_valid(id.as_str()), "{id}");
        assert!(id.timestamp_ms() >= before, "the time digits stay");
        assert!(random.iter().all(|d| CROCKFORD.contains(d)), "{random:?}");

        let id = QueueId::generate_with_tail(|_, _| *b"ZU");
        assert!(QueueId::is_valid(id.as_str()), "U is not a digit: {id}");
        assert!(!id.as_str().ends_with("ZU"), "{id}");
    }

    #[test]
    fn id_timestamp_is_the_generation_millisecond() {
        let before = now_ms();
        let id = QueueId::generate();
        let after = now_ms();
        assert!((before..=after).contains(&id.timestamp_ms()), "{id}");
        assert_eq!(QueueId("00000000000000000000".into()).timestamp_ms(), 0);
    }
}
