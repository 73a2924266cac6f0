//! The durable message queue: what an accepted message is, and the [`Queue`] trait
//! its two backends implement ([`redis`] for production, [`embedded`] on local disk).
//!
//! A backend's `enqueue` returns only once the message is durable by that backend's
//! definition (Redis acknowledged the write; redb committed with fsync). The SMTP
//! server answers `250` only after that.
//!
//! # Life of a message
//!
//! ```text
//! enqueue ──> due ──lease_due──> leased ──finish(next_attempt)──> due (later)
//!              ^                  │  │
//!              └──release/expiry──┘  └──finish(final)──> final record (TTL) ──> gone
//! ```
//!
//! A message is *queued* from `enqueue` until its final `finish` (or `remove`):
//! either *due* (scheduled at `next_attempt_ms`) or *leased* to one delivery worker
//! until the lease expires. Leasing is atomic, so two workers never hold one message
//! at once; a worker that dies simply lets its lease run out and the message becomes
//! due again (at-least-once delivery: a duplicate is possible only when a worker
//! delivered but died, or lost its lease, before `finish`).
//!
//! Every lease carries a fresh token. `finish`, `renew` and `release` act only while
//! the message still carries that token, so a worker whose lease expired and was
//! taken over cannot overwrite the newer worker's result. A lease that expired but
//! was *not* taken over keeps its token: a slow worker may still finish, which saves
//! a duplicate delivery.
//!
//! A message whose every recipient reached a final state keeps a status record
//! (envelope and [`MessageStatus`], no body) for the backend's status retention, so
//! `queue show` can explain what happened after the fact.

pub mod embedded;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::embedded::EmbeddedQueue;
pub use self::redis::RedisQueue;

/// Boxed future returned by [`Queue`] methods, so the trait stays object safe.
pub type QueueFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, QueueError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue store unavailable: {0}")]
    Unavailable(String),
    /// The store is reachable but refuses to grow (Redis at `maxmemory` with
    /// `noeviction`, a full disk): it recovers by itself once delivery frees space.
    #[error("queue store full: {0}")]
    Full(String),
    #[error("queue store timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Written, but fewer replicas than `wait_replicas` confirmed it within
    /// `wait_timeout` (a failover left the master without replicas): not durable
    /// as configured, so the client is told to try again.
    #[error("queue store replicas did not confirm: {0}")]
    Unreplicated(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("queue store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The caller asked for something the queue must refuse (a status that would
    /// lose mail, a lease and status of different messages): a bug in the caller,
    /// not a store failure.
    #[error("invalid queue request: {0}")]
    Invalid(String),
}

impl QueueError {
    /// The failure behind this error, as the SMTP session words it to its client.
    pub fn store_failure(&self) -> mailrelay_smtp::StoreFailure {
        use mailrelay_smtp::StoreFailure;
        match self {
            QueueError::Full(_) => StoreFailure::Full,
            QueueError::Timeout(_) => StoreFailure::Timeout,
            QueueError::Unreplicated(_) => StoreFailure::Unreplicated,
            _ => StoreFailure::Unavailable,
        }
    }
}

pub use mailrelay_smtp::envelope::{
    BodyType, ClientInfo, DsnNotify, DsnRet, Envelope, MailParams, QueueId, QueuedMessage,
    Recipient, TlsInfo, now_ms,
};

/// Counts a backend can report cheaply (for `/metrics`, status and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Queued messages: due, deferred and in flight (not final ones).
    pub messages: u64,
    /// Body bytes of the queued messages.
    pub bytes: u64,
    /// Queued messages currently leased to a delivery worker. Includes leases that
    /// expired but that no `lease_due` has swept back to due yet.
    pub leased: u64,
    /// Queued messages that have had at least one delivery attempt.
    pub deferred: u64,
    /// Arrival time (ms since the epoch, read from the id) of the oldest queued
    /// message; `None` when the queue is empty. Its age is `now - oldest_ms`.
    pub oldest_ms: Option<u64>,
}

/// Recipients of finished messages by final state, counted since the store was
/// created (over every relay sharing it): the delivery counters of the operator's
/// status. A message's recipients are counted when its last recipient becomes final
/// (so a message still waiting for one recipient counts none of them yet); messages
/// removed with `queue delete` are not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryTotals {
    pub delivered: u64,
    pub bounced: u64,
    pub expired: u64,
}

impl DeliveryTotals {
    /// The recipients of a final status, by state.
    pub fn of(status: &MessageStatus) -> Self {
        let mut t = DeliveryTotals::default();
        for r in &status.rcpts {
            match r.state {
                RcptState::Delivered => t.delivered += 1,
                RcptState::Bounced => t.bounced += 1,
                RcptState::Expired => t.expired += 1,
                RcptState::Pending => {}
            }
        }
        t
    }
}

use crate::config::queue::{DEFAULT_CACHE_SIZE, DEFAULT_STATUS_RETENTION};

/// Backend settings beyond where the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// How long a final message's status record (envelope and [`MessageStatus`],
    /// no body) stays readable through [`Inspect::status`].
    pub status_retention: Duration,
    /// Page cache of the embedded queue, in bytes (Redis ignores it).
    pub cache_size: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            status_retention: DEFAULT_STATUS_RETENTION,
            cache_size: DEFAULT_CACHE_SIZE,
        }
    }
}

// The per-recipient records are the admin API's types (one definition, the same
// JSON in the store and on the wire).
pub use mailrelay_admin_api::types::{
    Attempt, AttemptResult, MAX_ATTEMPTS_KEPT, RcptState, RcptStatus, TransportSecurity,
};

/// Delivery status of one message, kept beside it in the queue and, once every
/// recipient is final, as a status record for the status retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatus {
    pub id: QueueId,
    pub rcpts: Vec<RcptStatus>,
    /// When the message was accepted (its envelope's `received_at_ms`).
    pub created_ms: u64,
    /// When the message is next due; `None` once it is final. For a queued message
    /// the backend's schedule is authoritative: reads fill this in from it (so
    /// `retry_now` shows); while leased it keeps the time the message became due.
    pub next_attempt_ms: Option<u64>,
    /// Delivery attempts of the message as a whole (one per lease that tried).
    pub attempts: u32,
    /// When the last recipient became final; set by `finish` if the caller did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_at_ms: Option<u64>,
    /// Filled in by reads while the message is leased: when that lease expires.
    /// Ignored on writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_until_ms: Option<u64>,
    /// The sender was sent the one delay warning (`delivery.retry.delay_warning`), or
    /// was not to get one (null sender, NOTIFY without DELAY).
    #[serde(default, skip_serializing_if = "is_false")]
    pub delay_warned: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl MessageStatus {
    /// The status of a message just accepted: every recipient pending, due at once.
    pub fn new(envelope: &Envelope) -> Self {
        MessageStatus {
            id: envelope.id.clone(),
            rcpts: envelope
                .recipients
                .iter()
                .map(|r| RcptStatus {
                    address: r.address.clone(),
                    state: RcptState::Pending,
                    attempts: Vec::new(),
                    category: None,
                })
                .collect(),
            created_ms: envelope.received_at_ms,
            next_attempt_ms: Some(envelope.received_at_ms),
            attempts: 0,
            final_at_ms: None,
            leased_until_ms: None,
            delay_warned: false,
        }
    }

    /// Whether every recipient reached a final state.
    pub fn is_final(&self) -> bool {
        self.rcpts.iter().all(|r| r.state.is_final())
    }

    /// Whether a recipient in `domain` (ASCII case-insensitive) is still pending:
    /// what `queue list --domain` and `queue retry --domain` select on.
    pub fn has_pending_in(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        self.rcpts.iter().any(|r| {
            r.state == RcptState::Pending
                && r.domain()
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(domain)
        })
    }

    /// What the backends store for a `finish`: checked against the lease, attempts
    /// trimmed, the final time set. Refuses a status that would lose mail (no next
    /// attempt while a recipient is still pending).
    pub(crate) fn prepared_for_finish(
        mut self,
        lease: &Lease,
        now_ms: u64,
    ) -> Result<Self, QueueError> {
        if self.id != lease.id {
            return Err(QueueError::Invalid(format!(
                "status of {} given to finish the lease of {}",
                self.id, lease.id
            )));
        }
        if self.next_attempt_ms.is_none()
            && let Some(r) = self.rcpts.iter().find(|r| !r.state.is_final())
        {
            return Err(QueueError::Invalid(format!(
                "message {} has no next attempt but recipient {} is still pending",
                self.id, r.address
            )));
        }
        for r in &mut self.rcpts {
            r.trim_attempts();
        }
        self.leased_until_ms = None;
        if self.next_attempt_ms.is_some() {
            self.final_at_ms = None;
        } else if self.final_at_ms.is_none() {
            self.final_at_ms = Some(now_ms);
        }
        Ok(self)
    }
}

/// A claim on one message for delivery, valid until `expires_ms` unless renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: QueueId,
    /// Unique to this grant; names the owner for debugging (`<owner>#<random>`).
    pub token: String,
    /// ms since the epoch, on the clock of whoever took the lease.
    pub expires_ms: u64,
    /// What the queue read with the lease and uses again to finish it.
    pub head: LeaseHead,
}

/// A leased message's stored envelope, kept by the queue that read it for the
/// lease's finish: the Redis queue builds the final record from it, rather than
/// reading the envelope again inside the finish script (a value read in Lua is
/// copied and hashed byte by byte). Empty where a queue has no use for it, or for
/// a lease made by hand: the finish then reads what it needs itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseHead(pub(crate) Option<Arc<StoredHead>>);

/// See [`LeaseHead`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StoredHead {
    /// The envelope as stored, byte for byte.
    pub envelope: Vec<u8>,
    /// The stored body's length (what the queue's `bytes` counter holds for it).
    pub body_len: u64,
}

/// A message taken for delivery by [`Queue::lease_due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    pub lease: Lease,
    pub message: QueuedMessage,
    pub status: MessageStatus,
}

/// Outcome of [`Queue::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishResult {
    /// Stored; the message is due again at the status's `next_attempt_ms`.
    Rescheduled,
    /// Stored as final: body gone, status record kept for the retention.
    Finalized,
    /// The lease no longer holds (taken over after expiry, released, or the message
    /// was deleted): nothing was changed.
    LeaseLost,
}

/// What [`Queue::list`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// Only messages that have had at least one attempt.
    pub deferred_only: bool,
    /// Only messages with a pending recipient in this domain.
    pub domain: Option<String>,
    /// At most this many, in arrival order.
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            deferred_only: false,
            domain: None,
            limit: 1000,
        }
    }
}

impl ListFilter {
    pub fn matches(&self, status: &MessageStatus) -> bool {
        (!self.deferred_only || status.attempts > 0)
            && self
                .domain
                .as_deref()
                .is_none_or(|d| status.has_pending_in(d))
    }
}

/// Which messages [`Inspect::retry_now`] makes due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetrySelector {
    Id(QueueId),
    All,
    /// Messages with a pending recipient in this domain.
    Domain(String),
}

/// Token of a new lease: unique per grant, and saying whose it is when read in Redis.
pub(crate) fn lease_token(owner: &str) -> String {
    format!("{owner}#{:032x}", rand::random::<u128>())
}

/// The durable queue, in three roles so that each caller holds only what it uses
/// and a backend that lacks a method does not compile:
///
/// - [`Ingest`]: the SMTP side stores accepted mail;
/// - [`Leasing`]: delivery takes due mail, renews, finishes and gives back;
/// - [`Inspect`]: the admin API and the operator read and steer the queue.
///
/// All three share [`Store`] (the backend's name, a liveness probe). Both real
/// backends implement every role and share one conformance suite
/// (`tests/it/queue_conformance.rs`); [`Queue`] is the three together.
pub trait Store: Send + Sync + 'static {
    /// Short backend name for logs and metrics labels.
    fn backend(&self) -> &'static str;

    /// Cheap liveness probe of the store, for `/readyz`.
    fn ping(&self) -> QueueFuture<'_, ()>;
}

/// Storing accepted mail.
pub trait Ingest: Store {
    /// The id for a message about to be accepted: where the backend keeps mail
    /// in parts, one it can store cheaply beside this relay's other new mail.
    fn new_id(&self) -> QueueId {
        QueueId::generate()
    }

    /// Stores a message atomically and durably: either all of it is stored, or none.
    fn enqueue<'a>(&'a self, msg: &'a QueuedMessage) -> QueueFuture<'a, ()>;

    /// [`Ingest::enqueue`], writing the message's `accepted` event (`event`, JSON,
    /// for an event log capped at `max_len`) in the same atomic write where this
    /// backend can, so that a crash after the `250` cannot lose it. Returns whether
    /// it did; when not, the caller records the event through the event batch.
    fn enqueue_with_event<'a>(
        &'a self,
        msg: &'a QueuedMessage,
        event: &'a [u8],
        max_len: u64,
    ) -> QueueFuture<'a, bool> {
        let _ = (event, max_len);
        Box::pin(async move { self.enqueue(msg).await.map(|()| false) })
    }
}

/// Delivery's side: leases on due mail and the outcomes written under them.
pub trait Leasing: Store {
    /// Atomically takes up to `max` messages whose next attempt is at or before
    /// `now_ms`, leasing each to `owner` until `now_ms + lease_ms`. Leases that expired
    /// by `now_ms` are first returned to due, so a dead worker's messages come back.
    /// Earliest due first within a backend's unit of atomicity (Redis: a shard).
    fn lease_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        max: usize,
        owner: &str,
    ) -> QueueFuture<'_, Vec<Leased>>;

    /// Records the outcome of a leased delivery, if the lease still holds. With
    /// `status.next_attempt_ms` set, the message is due again then; without, every
    /// recipient is final: the body goes and a status record stays for the retention.
    fn finish<'a>(
        &'a self,
        lease: &'a Lease,
        status: MessageStatus,
    ) -> QueueFuture<'a, FinishResult>;

    /// [`Leasing::finish`] for several leases in one round trip (one Redis pipeline,
    /// one embedded write transaction), each checked against its own lease. The
    /// outer error means the store could not be asked (none of them may have been
    /// stored, or some); the inner ones are per item (an invalid status).
    fn finish_batch(
        &self,
        items: Vec<(Lease, MessageStatus)>,
    ) -> QueueFuture<'_, Vec<Result<FinishResult, QueueError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (lease, status) in items {
                match self.finish(&lease, status).await {
                    Err(QueueError::Invalid(m)) => out.push(Err(QueueError::Invalid(m))),
                    Err(e) => return Err(e),
                    Ok(r) => out.push(Ok(r)),
                }
            }
            Ok(out)
        })
    }

    /// Whether [`Leasing::finish_batch_with_events`] writes a batch's outcome events
    /// with its outcomes (into the event log beside this queue: the embedded
    /// queue's file, the Redis queue's stream). When not, the caller appends them
    /// itself, before [`Leasing::finish_batch`].
    fn writes_outcome_events(&self) -> bool {
        false
    }

    /// [`Leasing::finish_batch`], also writing the batch's outcome events (`events`,
    /// grouped by item: `events.of_item(i)` belong to `items[i]`) with the outcomes
    /// of their items: in the same atomic write (embedded), or ahead of them in the
    /// same round trip (standalone Redis and Sentinel), so that a crash cannot store
    /// an outcome without its events (the events without the outcomes at worst: a
    /// duplicate once the messages are delivered again). A backend that stores the outcomes but cannot append the events
    /// (a full Redis refuses the `XADD`, while the finishes free memory) says so
    /// with `events.mark_unwritten()`, and the caller appends them on their own.
    /// Events are written whatever their item's answer (a lost
    /// lease, an invalid status): they report deliveries that happened. Only for a
    /// backend whose [`Leasing::writes_outcome_events`] is true; the others refuse
    /// (`Invalid`) and write nothing.
    fn finish_batch_with_events<'a>(
        &'a self,
        items: Vec<(Lease, MessageStatus)>,
        events: &'a crate::events::log::OutcomeEvents,
    ) -> QueueFuture<'a, Vec<Result<FinishResult, QueueError>>> {
        let _ = (items, events);
        Box::pin(async move {
            Err(QueueError::Invalid(format!(
                "the {} queue does not write outcome events",
                self.backend()
            )))
        })
    }

    /// Extends a lease to `lease_ms` from now (local clock) while delivery goes on;
    /// false if the lease was lost.
    fn renew<'a>(&'a self, lease: &'a Lease, lease_ms: u64) -> QueueFuture<'a, bool>;

    /// Extends many leases at once to `lease_ms` from now (local clock): the heartbeat
    /// of a worker holding a batch. One round trip per batch (Redis: one pipeline on a
    /// single server, one request per shard at once in a cluster; embedded: one
    /// commit). Returns the ids whose lease was lost; every other one was renewed.
    fn renew_all<'a>(
        &'a self,
        leases: &'a [Lease],
        lease_ms: u64,
    ) -> QueueFuture<'a, Vec<QueueId>> {
        Box::pin(async move {
            let mut lost = Vec::new();
            for lease in leases {
                if !self.renew(lease, lease_ms).await? {
                    lost.push(lease.id.clone());
                }
            }
            Ok(lost)
        })
    }

    /// Gives leased messages back, due at once, their status unchanged (drain on
    /// shutdown). Leases already lost are skipped.
    fn release<'a>(&'a self, leases: &'a [Lease]) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let now = now_ms();
            let back: Vec<(Lease, u64)> = leases.iter().map(|l| (l.clone(), now)).collect();
            self.give_back(&back).await
        })
    }

    /// Gives leased messages back untouched, each due at the time given with it: a
    /// message taken but never started goes back to its place in line (the time it
    /// was due when leased), so giving back does not reorder the queue. Leases
    /// already lost are skipped, and so are leases that expired and were swept back
    /// to due (they are due already).
    fn give_back<'a>(&'a self, leases: &'a [(Lease, u64)]) -> QueueFuture<'a, ()>;
}

/// Reading and steering the queue: `queue show|list|delete|retry`, stats, status.
pub trait Inspect: Store {
    /// Reads back one message by id.
    fn get<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, Option<QueuedMessage>>;

    /// Lists queued ids in arrival order, at most `limit`.
    fn list_ids(&self, limit: usize) -> QueueFuture<'_, Vec<QueueId>>;

    /// Queued (due, deferred or in-flight) messages matching `filter`, in arrival
    /// order. Reads every queued status when filtering: an operator's tool.
    fn list(&self, filter: ListFilter) -> QueueFuture<'_, Vec<(Envelope, MessageStatus)>>;

    /// Envelope and status of a queued, in-flight or recently final message.
    fn status<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, Option<(Envelope, MessageStatus)>>;

    fn stats(&self) -> QueueFuture<'_, QueueStats>;

    /// Recipients of finished messages by final state (see [`DeliveryTotals`]).
    fn delivery_totals(&self) -> QueueFuture<'_, DeliveryTotals>;

    /// Removes a queued message (whether due or leased, so a worker holding it gets
    /// `LeaseLost` on finish) and any status record of it; returns whether a queued
    /// message existed. This is `queue delete`.
    fn remove<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, bool>;

    /// Makes the selected queued messages due now. Messages in flight are left
    /// alone. Returns how many were moved forward (already due ones do not count).
    fn retry_now(&self, sel: RetrySelector) -> QueueFuture<'_, u64>;
}

/// Every role at once, for what opens a backend and hands out the roles (and for
/// delivery, which also queues its own bounces).
pub trait Queue: Ingest + Leasing + Inspect {}

impl<T: Ingest + Leasing + Inspect + ?Sized> Queue for T {}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(rcpts: &[(&str, RcptState)]) -> MessageStatus {
        MessageStatus {
            id: QueueId::generate(),
            rcpts: rcpts
                .iter()
                .map(|(a, s)| RcptStatus {
                    address: (*a).into(),
                    state: *s,
                    attempts: Vec::new(),
                    category: None,
                })
                .collect(),
            created_ms: 1,
            next_attempt_ms: Some(1),
            attempts: 0,
            final_at_ms: None,
            leased_until_ms: None,
            delay_warned: false,
        }
    }

    #[test]
    fn domain_selection_sees_only_pending_recipients() {
        let s = status(&[
            ("a@Alpha.Test", RcptState::Pending),
            ("b@beta.test", RcptState::Delivered),
        ]);
        assert!(s.has_pending_in("alpha.test"));
        assert!(s.has_pending_in("ALPHA.TEST."));
        assert!(!s.has_pending_in("beta.test"));
        assert!(!s.has_pending_in("test"));
        assert!(!s.is_final());
    }

    #[test]
    fn finish_keeps_recent_attempts_and_refuses_to_lose_mail() {
        let mut s = status(&[("a@x.test", RcptState::Pending)]);
        for i in 0..30 {
            s.rcpts[0].attempts.push(Attempt {
                at_ms: i,
                result: AttemptResult::Deferred,
                mx: None,
                ip: None,
                tls: None,
                security: None,
                reply: format!("451 {i}"),
                category: None,
            });
        }
        let lease = Lease {
            id: s.id.clone(),
            token: "t".into(),
            expires_ms: 0,
            head: Default::default(),
        };
        let prepared = s.clone().prepared_for_finish(&lease, 99).unwrap();
        assert_eq!(prepared.rcpts[0].attempts.len(), MAX_ATTEMPTS_KEPT);
        assert_eq!(prepared.rcpts[0].attempts[0].at_ms, 10);
        assert_eq!(prepared.final_at_ms, None);

        s.next_attempt_ms = None;
        assert!(matches!(
            s.clone().prepared_for_finish(&lease, 99),
            Err(QueueError::Invalid(_))
        ));
        s.rcpts[0].state = RcptState::Expired;
        let done = s.clone().prepared_for_finish(&lease, 99).unwrap();
        assert_eq!(done.final_at_ms, Some(99));

        let other = Lease {
            id: QueueId::generate(),
            ..lease
        };
        assert!(matches!(
            s.prepared_for_finish(&other, 99),
            Err(QueueError::Invalid(_))
        ));
    }

    #[test]
    fn status_json_is_stable() {
        let mut s = status(&[("a@x.test", RcptState::Bounced)]);
        s.id = QueueId::parse("06H2AAMFWWNZ5B3JQCBB").unwrap();
        s.rcpts[0].record(Attempt {
            at_ms: 5,
            result: AttemptResult::Bounced,
            mx: Some("mx.x.test".into()),
            ip: Some("192.0.2.1".into()),
            tls: None,
            security: None,
            reply: "550 5.1.1 no".into(),
            category: None,
        });
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"id":"06H2AAMFWWNZ5B3JQCBB","rcpts":[{"address":"a@x.test","state":"bounced","attempts":[{"at_ms":5,"result":"bounced","mx":"mx.x.test","ip":"192.0.2.1","reply":"550 5.1.1 no"}]}],"created_ms":1,"next_attempt_ms":1,"attempts":0}"#
        );
        assert_eq!(serde_json::from_str::<MessageStatus>(&json).unwrap(), s);
    }
}
