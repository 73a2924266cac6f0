//! What the session asks of an ingress policy (send quotas) while a transaction
//! runs. The trait lives with the protocol so that the session knows nothing of
//! how limits are counted; the relay plugs its quotas in through an adapter.

use std::net::IpAddr;

use crate::reply::Reply;

/// What ingress matching looks at. The recipients are passed separately because
/// they grow during a transaction.
#[derive(Debug, Clone, Copy)]
pub struct IngressFacts<'a> {
    /// Reverse-path without brackets; empty for the null sender.
    pub sender: &'a str,
    pub auth_user: Option<&'a str>,
    pub client_ip: IpAddr,
}

/// A refusal and its metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    /// `quota_exceeded`, `quota_recipients`, `quota_size`, `quota_unavailable` or
    /// `queue_full`.
    pub reason: &'static str,
    /// The quota that refused, for per-quota metrics.
    pub quota: Option<String>,
}

/// What the session may ask before the message is in: checks against limits
/// alone and against what the policy last learned. The authoritative
/// check-and-charge happens when the message is complete ([`crate::session::Step::CheckQuota`]).
pub trait IngressPolicy: Send + Sync + std::fmt::Debug {
    /// At MAIL FROM, with the `SIZE=` the client declared.
    fn at_mail(&self, f: &IngressFacts, declared_size: Option<u64>) -> Option<Refusal>;
    /// At RCPT TO: `accepted` are the recipients of this transaction so far.
    fn at_rcpt(&self, f: &IngressFacts, accepted: &[&str], new: &str) -> Option<Refusal>;
    /// Whether complete messages must be checked before they are queued.
    fn check_before_queueing(&self) -> bool;
}
