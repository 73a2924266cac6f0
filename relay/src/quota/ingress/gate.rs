//! The delivery side of `action: defer`: a message accepted under a defer quota
//! waits in the queue until its windows allow it. The scheduler hands every batch
//! it leased to its dispatch hook before sending (an adapter in `server::quota`
//! calls [`DeferGate::admit`]); [`DeferGate`] checks and charges
//! each held message there, and sends the ones that must wait back to the queue,
//! due when their window frees, without counting a delivery attempt.
//!
//! Which messages are held is decided again at dispatch from the envelope (sender,
//! AUTH user, client address, recipients, as stored) against the quotas in force, so
//! a reload applies to mail already waiting. A message is charged once, before its
//! first delivery attempt; retries after a temporary failure are not charged again.
//! If the relay stops after the charge but before the attempt is recorded (a crash,
//! or a drain that gives the message back), the next dispatch charges it again: the
//! error is on the safe side (fewer than N sent in that window).
//!
//! Bounces and delay reports the relay writes itself are never held: they are not
//! the sender's mail. Mail the relay merely sends on, unmatched by any defer
//! quota, passes untouched.
//!
//! Held mail is held no longer than the queue lifetime (`delivery.retry.max_lifetime`,
//! Postfix's `maximal_queue_lifetime`): a wait is cut at the end of it, and a message
//! still held then is handed back to expire, untried, with a bounce to its sender
//! (4.4.7), as mail that could not be delivered in time is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::engine::{Quotas, Release};
use crate::queue::{Envelope, Leased, Leasing, now_ms};

/// What [`DeferGate::admit`] made of a leased batch; the rest it put back to wait.
#[derive(Default)]
pub struct Admitted {
    /// To deliver now.
    pub go: Vec<Leased>,
    /// Held until the queue lifetime ran out: to expire untried.
    pub expired: Vec<Leased>,
}

/// While the counters cannot be read, held mail is looked at again this often.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(5);

/// Listener name of the messages the relay generates itself (delivery's DSNs;
/// `server::quota`'s tests hold the two together).
const GENERATED_LISTENER: &str = "dsn";

/// Whether the relay wrote this message itself (a bounce or delay report).
pub fn is_relay_generated(e: &Envelope) -> bool {
    e.mail.from.is_empty() && e.client.listener == GENERATED_LISTENER && e.client.port == 0
}

pub struct DeferGate {
    quotas: Arc<Quotas>,
    queue: Arc<dyn Leasing>,
    /// The queue lifetime: no message is held past it.
    lifetime: Duration,
}

impl DeferGate {
    pub fn new(quotas: Arc<Quotas>, queue: Arc<dyn Leasing>, lifetime: Duration) -> Self {
        DeferGate {
            quotas,
            queue,
            lifetime,
        }
    }

    /// When a message's queue lifetime ends (ms).
    fn expires(&self, l: &Leased) -> u64 {
        l.status
            .created_ms
            .saturating_add(self.lifetime.as_millis() as u64)
    }

    /// Sends a leased message back to wait until `until` (local ms), its status and
    /// attempts unchanged.
    async fn postpone(&self, l: Leased, until: u64) {
        let mut status = l.status;
        status.next_attempt_ms = Some(until);
        match self.queue.finish(&l.lease, status).await {
            Ok(_) => {}
            // The lease runs out and the message comes back by itself; it is only
            // looked at again sooner.
            Err(e) => {
                warn!(queue_id = %l.lease.id, error = %e, "putting a held message back failed")
            }
        }
    }
}

impl DeferGate {
    /// Says which of `leased` may go now; sends the rest back to wait (or to
    /// expire, held past the queue lifetime).
    pub async fn admit(&self, leased: Vec<Leased>) -> Admitted {
        if !self.quotas.holds_mail() {
            return Admitted {
                go: leased,
                expired: Vec::new(),
            };
        }
        let mut go = Vec::with_capacity(leased.len());
        let mut expired = Vec::new();
        // Messages of this batch sent back to wait, per quota and key: each later one is
        // due one quota-rate gap after the one before, so a backlog wakes at the
        // pace it can be released instead of all at once (each wake-up costs a
        // lease and a queue write).
        let mut waiting: HashMap<(String, String), u64> = HashMap::new();
        for l in leased {
            // Charged at its first attempt already, or not the sender's mail.
            if l.status.attempts > 0 || is_relay_generated(&l.message.envelope) {
                go.push(l);
                continue;
            }
            match self.quotas.release(&l.message).await {
                Release::Go {
                    charged_at: Some(at),
                    quotas,
                } => {
                    info!(queue_id = %l.lease.id, quotas = %quotas.join(","), charged_at_ms = at, "quota hold released");
                    go.push(l);
                }
                Release::Go { .. } => go.push(l),
                Release::Wait {
                    until,
                    quota,
                    key,
                    spacing_ms,
                } => {
                    let expires = self.expires(&l);
                    if now_ms() >= expires {
                        info!(queue_id = %l.lease.id, %quota, "held by quota until the queue lifetime ran out: expiring");
                        expired.push(l);
                        continue;
                    }
                    let ahead = waiting.entry((quota.clone(), key)).or_default();
                    let until = until
                        .saturating_add(ahead.saturating_mul(spacing_ms))
                        .min(expires);
                    *ahead += 1;
                    debug!(queue_id = %l.lease.id, %quota, wait_ms = until.saturating_sub(now_ms()), "held by quota");
                    self.postpone(l, until).await;
                }
                Release::Unavailable => {
                    let expires = self.expires(&l);
                    if now_ms() >= expires {
                        expired.push(l);
                        continue;
                    }
                    let until = (now_ms() + UNAVAILABLE_RETRY.as_millis() as u64).min(expires);
                    self.postpone(l, until).await;
                }
            }
        }
        Admitted { go, expired }
    }
}
