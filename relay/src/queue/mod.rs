//! The durable message queue: what an accepted message is, and the [`Queue`] trait
//! its two backends implement ([`redis`] for production, [`embedded`] on local disk).
//!
//! A backend's `enqueue` returns only once the message is durable by that backend's
//! definition (Redis acknowledged the write; redb committed with fsync). The SMTP
//! server answers `250` only after that.

pub mod embedded;
pub mod redis;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use self::embedded::EmbeddedQueue;
pub use self::redis::RedisQueue;

/// Boxed future returned by [`Queue`] methods, so the trait stays object safe.
pub type QueueFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, QueueError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue store unavailable: {0}")]
    Unavailable(String),
    #[error("queue store timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("queue store I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A queue identifier: 20 upper-case Crockford base-32 characters, time-ordered
/// (48-bit milliseconds then 52 random bits), so ids sort by arrival and never collide
/// across relay processes sharing one store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct QueueId(String);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

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

    /// Parses an id given by a user or read from a store; rejects anything that could
    /// not have come from [`QueueId::generate`] (keys are built from ids).
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 20 && s.bytes().all(|b| CROCKFORD.contains(&b))).then(|| QueueId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
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

/// Counts a backend can report cheaply (for `/metrics`, status and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub messages: u64,
    pub bytes: u64,
}

/// The write side of the queue (the read side arrives with delivery).
pub trait Queue: Send + Sync + 'static {
    /// Short backend name for logs and metrics labels.
    fn backend(&self) -> &'static str;

    /// Stores a message atomically and durably: either all of it is stored, or none.
    fn enqueue<'a>(&'a self, msg: &'a QueuedMessage) -> QueueFuture<'a, ()>;

    /// Reads back one message by id.
    fn get<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, Option<QueuedMessage>>;

    /// Lists queued ids in arrival order, at most `limit`.
    fn list_ids(&self, limit: usize) -> QueueFuture<'_, Vec<QueueId>>;

    /// Removes a message; returns whether it existed.
    fn remove<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, bool>;

    fn stats(&self) -> QueueFuture<'_, QueueStats>;

    /// Cheap liveness probe of the store, for `/readyz`.
    fn ping(&self) -> QueueFuture<'_, ()>;
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
}
