//! Leases: a relay takes only what it can send soon. A destination holds at most
//! `per_destination_concurrency × max_messages_per_connection` messages here (one
//! round of its connections), the relay at most `max_concurrency ×
//! max_messages_per_connection`; what a lease batch brought beyond that is given back
//! at once, untouched and due now, for other relays with room. Every
//! held lease is renewed together (one round trip) every third of `delivery.lease`,
//! so the lease can be short: a relay that dies loses its mail to the others after
//! one lease time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, warn};

use super::{Inner, Work};
use crate::queue::{Lease, Leased, now_ms};

/// Messages taken per `lease_due` call, at most.
const LEASE_BATCH: usize = 200;

impl Inner {
    fn lease_ms(&self) -> u64 {
        self.cfg.lease.as_millis() as u64
    }

    /// Parts one destination may hold here: one message per connection slot's
    /// worth of messages, over all the connections it may have at once.
    pub(super) fn destination_capacity(&self) -> usize {
        self.cfg
            .per_destination_concurrency
            .min(self.cfg.max_concurrency)
            .saturating_mul(self.cfg.max_messages_per_connection)
    }

    /// Messages the relay may hold at once: every connection busy, each with a full
    /// connection's worth.
    fn relay_capacity(&self) -> usize {
        self.cfg
            .max_concurrency
            .saturating_mul(self.cfg.max_messages_per_connection)
    }

    pub(super) async fn run(self: Arc<Self>) {
        while !self.stopping.load(Ordering::SeqCst) {
            // Counted from the connection tasks started, not from the semaphore:
            // tasks just spawned have not taken their permits yet, and leasing
            // against the semaphore alone would take the whole queue in a burst
            // and starve the other relays.
            let free = self
                .cfg
                .max_concurrency
                .saturating_sub(self.running.load(Ordering::SeqCst));
            if free == 0 {
                self.idle(Duration::from_millis(50)).await;
                continue;
            }
            let room = self
                .relay_capacity()
                .saturating_sub(self.held.lock().unwrap().len());
            // Due mail is not sorted by destination, so a batch could all be for
            // one: never ask for more than one destination can hold, or a relay
            // would hold (for the moment before giving back) far beyond it.
            let max = (free * self.cfg.max_messages_per_connection)
                .min(room)
                .min(self.destination_capacity())
                .min(LEASE_BATCH);
            if max == 0 {
                self.idle(self.cfg.poll_interval).await;
                continue;
            }
            let leased = match self
                .queue
                .lease_due(now_ms(), self.lease_ms(), max, &self.owner)
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "taking due mail failed");
                    self.idle(self.cfg.poll_interval).await;
                    continue;
                }
            };
            if leased.is_empty() {
                self.idle(self.cfg.poll_interval).await;
                continue;
            }
            debug!(count = leased.len(), "leased due mail");
            let leased = match &self.hook {
                Some(hook) => {
                    let admitted = hook.admit(leased).await;
                    self.expire_untried(admitted.expired);
                    admitted.go
                }
                None => leased,
            };
            let taken = leased.len();
            let excess = self.dispatch(leased);
            if !excess.is_empty() {
                let count = excess.len();
                match self.queue.give_back(&excess).await {
                    Ok(()) => debug!(count, "gave back mail for destinations at capacity"),
                    Err(e) => {
                        warn!(error = %e, count, "giving back mail failed; its leases expire on their own")
                    }
                }
                if count == taken {
                    // Everything due is for destinations busy here: wait for one of
                    // our connections to end (which rings) rather than take the
                    // same mail again at once.
                    self.idle(self.cfg.poll_interval).await;
                }
            }
        }
    }

    async fn idle(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.wake.notified() => {
                // Mail was just queued: let the rest of a burst arrive, so that it
                // is taken (and sent) in batches, not a message per lease.
                if !self.stopping.load(Ordering::SeqCst) {
                    tokio::time::sleep(self.cfg.wake_delay).await;
                }
            }
        }
    }

    /// The heartbeat: every held lease renewed at once, a third of the lease time
    /// apart, so two heartbeats can fail before a lease runs out.
    pub(super) async fn renew_loop(self: Arc<Self>) {
        let every = self.cfg.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let leases: Vec<Lease> = self.held.lock().unwrap().values().cloned().collect();
            if leases.is_empty() {
                continue;
            }
            match self.queue.renew_all(&leases, self.lease_ms()).await {
                Ok(lost) => {
                    let mut held = self.held.lock().unwrap();
                    for id in lost {
                        // Finished meanwhile is not lost: only warn for what we hold.
                        if held.remove(&id).is_some() {
                            warn!(queue_id = %id, "lease lost while delivering");
                        }
                    }
                }
                Err(e) => warn!(count = leases.len(), error = %e, "renewing leases failed"),
            }
        }
    }

    /// Finalises messages held back (by an ingress `defer` quota) until their queue
    /// lifetime ran out: no attempt, so `finalize` expires and bounces them.
    fn expire_untried(self: &Arc<Self>, leased: Vec<Leased>) {
        for l in leased {
            self.held
                .lock()
                .unwrap()
                .insert(l.lease.id.clone(), l.lease.clone());
            let work = Work {
                final_before: l.status.rcpts.iter().map(|r| r.state.is_final()).collect(),
                attempted: AtomicBool::new(false),
                events: Mutex::new(Vec::new()),
                postponed_until: Mutex::new(Some(now_ms())),
                relayed: Mutex::new(Vec::new()),
                parts_left: AtomicUsize::new(0),
                lease: l.lease,
                message: l.message,
                status: Mutex::new(l.status),
            };
            let me = Arc::clone(self);
            self.running.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                me.finalize(&work).await;
                me.running.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }
}
