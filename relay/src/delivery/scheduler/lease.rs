//! Leases: a relay takes only what it can send soon. A destination holds at most
//! `per_destination_concurrency × max_messages_per_connection` messages here (one
//! round of its connections), the relay at most `max_concurrency ×
//! max_messages_per_connection`; what a lease batch brought beyond that is given back
//! at once, untouched and due now, for other relays with room. Every
//! held lease is renewed together (one round trip) every third of `delivery.lease`,
//! so the lease can be short: a relay that dies loses its mail to the others after
//! one lease time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, warn};

use super::{Held, Inner, Work};
use crate::queue::{Lease, Leased, QueueId, now_ms};

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
            // Fewer than asked: nothing else was due. Look again when mail is
            // queued here or a connection has room (the doorbell, after
            // `wake_delay`, so that arrivals are taken in batches) or at the poll,
            // as after an empty lease: leasing again at once would take arrivals
            // one or two at a time, each lease costing Redis a call and a read.
            let short = leased.len() < max;
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
                    continue;
                }
            }
            if short {
                self.idle(self.cfg.poll_interval).await;
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
    ///
    /// The renewal reports a lease lost when the queue no longer has it under our
    /// token: another relay took the message (our lease ran out first), it was
    /// removed, or it finished. Renewal takes a snapshot of what we hold and the
    /// queue runs the writes in order, so outcomes written between the two are
    /// always among the "lost": those are marked finishing here and not reported
    /// (their `finish` says whether the lease was still ours). Only the rest is
    /// lost, and the warning tells whether it ran out before this renewal (renewal
    /// late) or was taken while still ours.
    pub(super) async fn renew_loop(self: Arc<Self>) {
        let every = self.cfg.lease / 3;
        // A fixed cadence: a slow renewal does not push the next one later still.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = tick.tick().await;
            let late = due.elapsed();
            if late > every {
                // The runtime did not get to the heartbeat in time: leases may run
                // out before it (a starved or overloaded process).
                warn!(
                    late_ms = late.as_millis() as u64,
                    lease_ms = self.lease_ms(),
                    "lease renewal started late"
                );
            }
            let leases: Vec<Lease> = self
                .held
                .lock()
                .unwrap()
                .values()
                .map(|h| h.lease.clone())
                .collect();
            if leases.is_empty() {
                continue;
            }
            let started = now_ms();
            match self.queue.renew_all(&leases, self.lease_ms()).await {
                Ok(lost) => self.renewed(&leases, lost, started),
                Err(e) => warn!(count = leases.len(), error = %e, "renewing leases failed"),
            }
            let took = now_ms().saturating_sub(started);
            if took > every.as_millis() as u64 {
                warn!(
                    took_ms = took,
                    count = leases.len(),
                    "lease renewal took longer than its interval"
                );
            }
        }
    }

    /// What a renewal started at `started` (relay clock) found: `lost` are the
    /// leases of `renewed` the queue no longer has under our token.
    fn renewed(&self, renewed: &[Lease], lost: Vec<QueueId>, started: u64) {
        let lease_ms = self.lease_ms();
        let (lost, finished) = {
            let mut held = self.held.lock().unwrap();
            sort_renewal(&mut held, renewed, lost, started, lease_ms)
        };
        for l in lost {
            match l {
                LostLease::RanOut { id, expired_ms } => {
                    warn!(queue_id = %id, expired_ms, lease_ms, "lease lost while delivering: it ran out before it was renewed; another relay may send the message too")
                }
                LostLease::Taken { id } => {
                    warn!(queue_id = %id, "lease lost while delivering: taken or removed while still ours; another relay may send the message too")
                }
            }
        }
        if finished > 0 {
            debug!(
                count = finished,
                "leases ended by their own finish during renewal"
            );
        }
    }

    /// Finalises messages held back (by an ingress `defer` quota) until their queue
    /// lifetime ran out: no attempt, so `finalize` expires and bounces them.
    fn expire_untried(self: &Arc<Self>, leased: Vec<Leased>) {
        for l in leased {
            self.held
                .lock()
                .unwrap()
                .insert(l.lease.id.clone(), Held::new(l.lease.clone()));
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

/// A lease a renewal found gone while we were still delivering its message.
#[derive(Debug, PartialEq, Eq)]
enum LostLease {
    /// It had run out (by our clock) that long before the renewal: renewal was late
    /// and another relay took the message meanwhile.
    RanOut { id: QueueId, expired_ms: u64 },
    /// It was still good when the renewal started: another owner or a removal.
    Taken { id: QueueId },
}

/// Applies a renewal's answer to what we hold: the leases renewed get their new
/// expiry; the ones reported gone are dropped, and returned as lost unless their
/// outcome was already on its way (then the finish that ended them is counted).
fn sort_renewal(
    held: &mut HashMap<QueueId, Held>,
    renewed: &[Lease],
    lost: Vec<QueueId>,
    started: u64,
    lease_ms: u64,
) -> (Vec<LostLease>, usize) {
    let lost: HashSet<QueueId> = lost.into_iter().collect();
    let expires = started.saturating_add(lease_ms);
    let (mut out, mut finished) = (Vec::new(), 0);
    for l in renewed {
        if !lost.contains(&l.id) {
            if let Some(h) = held.get_mut(&l.id) {
                h.lease.expires_ms = h.lease.expires_ms.max(expires);
            }
            continue;
        }
        // Not held any more: finished and forgotten meanwhile.
        let Some(h) = held.remove(&l.id) else {
            continue;
        };
        if h.finishing {
            finished += 1;
        } else if started > h.lease.expires_ms {
            out.push(LostLease::RanOut {
                id: l.id.clone(),
                expired_ms: started - h.lease.expires_ms,
            });
        } else {
            out.push(LostLease::Taken { id: l.id.clone() });
        }
    }
    (out, finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(expires_ms: u64) -> Lease {
        Lease {
            id: QueueId::generate(),
            token: "relay.test:1#t".into(),
            expires_ms,
            head: Default::default(),
        }
    }

    #[test]
    fn a_renewal_reports_only_leases_lost_while_delivering() {
        let (kept, finishing, taken, ran_out, gone) = (
            lease(10_000),
            lease(10_000),
            lease(10_000),
            lease(4_000),
            lease(10_000),
        );
        let mut held = HashMap::new();
        for l in [&kept, &finishing, &taken, &ran_out] {
            held.insert(l.id.clone(), Held::new(l.clone()));
        }
        held.get_mut(&finishing.id).unwrap().finishing = true;
        // `gone` finished and was forgotten between the snapshot and the answer.
        let renewed = [
            kept.clone(),
            finishing.clone(),
            taken.clone(),
            ran_out.clone(),
            gone.clone(),
        ];
        let lost = vec![
            finishing.id.clone(),
            taken.id.clone(),
            ran_out.id.clone(),
            gone.id.clone(),
        ];
        let (out, finished) = sort_renewal(&mut held, &renewed, lost, 5_000, 3_000);
        assert_eq!(
            out,
            vec![
                LostLease::Taken {
                    id: taken.id.clone()
                },
                LostLease::RanOut {
                    id: ran_out.id.clone(),
                    expired_ms: 1_000
                },
            ]
        );
        assert_eq!(finished, 1, "its finish ended it: not lost");
        // Only the renewed lease is still held, with the renewal's expiry (never
        // moved back).
        assert_eq!(held.len(), 1);
        assert_eq!(held[&kept.id].lease.expires_ms, 10_000);
        let (out, _) = sort_renewal(
            &mut held,
            std::slice::from_ref(&kept),
            Vec::new(),
            9_000,
            3_000,
        );
        assert!(out.is_empty());
        assert_eq!(held[&kept.id].lease.expires_ms, 12_000);
    }
}
