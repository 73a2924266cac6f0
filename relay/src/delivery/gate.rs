//! What delivery asks before it sends: whether leased mail may go now (ingress
//! `defer` quotas, [`DispatchHook`]) and at what pace a destination may take it
//! (egress quotas, [`Pacing`]). The traits live here, with the scheduler that calls
//! them; the relay's quotas implement them through adapters (`server::quota`), so
//! delivery knows nothing of how limits are counted. The plain data the gates pass
//! (destination, postponement, admitted batch) is the quotas' own, re-exported:
//! delivery sits above quota, so it takes those types as they are instead of
//! keeping copies and converting.

use std::future::Future;
use std::pin::Pin;

use crate::queue::Leased;
use crate::shaping::Tenant;
use mailrelay_smtp::Reply;
use mailrelay_smtp::client::{MessageOutcome, Outcome, Stage};

pub use crate::quota::egress::{Destination, Postponement, Stop};
pub use crate::quota::ingress::gate::Admitted;

/// The futures the gates return: boxed, so the traits stay object safe.
pub type GateFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Looks at leased mail before the scheduler delivers it and says what may go now.
pub trait DispatchHook: Send + Sync + 'static {
    fn admit(&self, leased: Vec<Leased>) -> GateFuture<'_, Admitted>;
}

/// Egress pacing of outbound connections.
pub trait Pacing: Send + Sync + 'static {
    /// Whether mail for `domain` (lower case) must travel on connections of its
    /// own when it goes to a relay host, so that pacing knows the domain of every
    /// message it paces.
    fn names_domain(&self, domain: &str) -> bool;

    /// Which tenant facts the response rules about `dest` scope by (what
    /// [`Tenant::of`] must work out per message); empty when no tenant-scoped
    /// rule selects it.
    fn tenant_keys(&self, _dest: &Destination<'_>) -> Vec<crate::config::rules::TenantKey> {
        Vec::new()
    }

    /// Asks to open a connection to `dest` (after MX resolution) for messages of
    /// the given (recipients, octets), sent by `tenants` (one per message, or
    /// none). `Err` says when the messages are due instead; nothing is attempted
    /// then.
    fn open<'a>(
        &'a self,
        dest: Destination<'a>,
        sizes: &'a [(usize, usize)],
        tenants: Vec<Tenant>,
    ) -> GateFuture<'a, Result<Box<dyn PacedConnection>, Postponement>>;
}

/// One paced connection, asked before each message and told every reply.
pub trait PacedConnection: Send {
    /// Message `index` is ready to start: `Ok` once it may, or the reply with which
    /// it and every later message are left unattempted.
    fn before_message(&mut self, index: usize) -> GateFuture<'_, Result<(), Reply>>;
    /// Every reply read from the server, with the stage it answers.
    fn on_reply(&mut self, reply: &Reply, stage: Stage);
    /// How a response rule reclassifies `reply` to message `index`:
    /// `Some(Bounced)` or `Some(Deferred)`, `None` as its code says.
    fn classify(&self, _index: usize, _reply: &Reply, _stage: Stage) -> Option<Outcome> {
        None
    }
    /// The host failed before any message: whether the next MX host may be tried.
    fn try_next_host(&mut self) -> bool;
    /// Ends the connection; says which messages pacing held back, and until when.
    fn finish(self: Box<Self>) -> GateFuture<'static, Postponement>;
}

/// Pacing that lets everything through at once.
#[derive(Debug, Default)]
pub struct Unpaced;

impl Pacing for Unpaced {
    fn names_domain(&self, _domain: &str) -> bool {
        false
    }

    fn open<'a>(
        &'a self,
        _dest: Destination<'a>,
        _sizes: &'a [(usize, usize)],
        _tenants: Vec<Tenant>,
    ) -> GateFuture<'a, Result<Box<dyn PacedConnection>, Postponement>> {
        Box::pin(std::future::ready(Ok(
            Box::new(Unpaced) as Box<dyn PacedConnection>
        )))
    }
}

impl PacedConnection for Unpaced {
    fn before_message(&mut self, _index: usize) -> GateFuture<'_, Result<(), Reply>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn on_reply(&mut self, _reply: &Reply, _stage: Stage) {}

    fn try_next_host(&mut self) -> bool {
        true
    }

    fn finish(self: Box<Self>) -> GateFuture<'static, Postponement> {
        Box::pin(std::future::ready(Postponement::default()))
    }
}

/// When message `index` with `outcome` is due again, if pacing (`held`) held it
/// back (never for a message that was attempted or decided otherwise).
pub fn due(held: &Postponement, index: usize, outcome: &MessageOutcome) -> Option<u64> {
    let untouched = !outcome.attempted
        && outcome
            .recipients
            .iter()
            .all(|r| r.result == Outcome::Deferred);
    if !untouched {
        return None;
    }
    if let Some((_, until)) = held.held.iter().find(|(i, _)| *i == index) {
        return Some(*until);
    }
    if let Some(s) = held.stop
        && index >= s.index
    {
        return Some(s.due(index));
    }
    held.backoff_until_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueId;
    use mailrelay_smtp::client::{RecipientOutcome, Stage};

    fn outcome(attempted: bool, results: &[Outcome]) -> MessageOutcome {
        MessageOutcome {
            id: QueueId::generate(),
            recipients: results
                .iter()
                .map(|&result| RecipientOutcome {
                    address: "a@x.test".into(),
                    result,
                    reply: Reply::new(451, None, "x"),
                    stage: Stage::Mail,
                    remote: false,
                })
                .collect(),
            attempted,
            dsn_unsupported: false,
            warnings: vec![],
        }
    }

    #[test]
    fn postponed_messages_are_the_unattempted_ones_spread_by_the_spacing() {
        let p = Postponement {
            stop: Some(Stop {
                index: 2,
                until_ms: 10_000,
                spacing_ms: 500,
                recover: None,
            }),
            backoff_until_ms: None,
            held: vec![],
        };
        let waiting = outcome(false, &[Outcome::Deferred, Outcome::Deferred]);
        assert_eq!(due(&p, 0, &outcome(true, &[Outcome::Delivered])), None);
        assert_eq!(due(&p, 1, &waiting), None);
        assert_eq!(due(&p, 2, &waiting), Some(10_000));
        assert_eq!(due(&p, 4, &waiting), Some(11_000));
        // Refused locally (SIZE): decided, never postponed.
        assert_eq!(due(&p, 3, &outcome(false, &[Outcome::Bounced])), None);
        // A rate-limit reply: what was not attempted waits for the pause to end.
        let b = Postponement {
            stop: None,
            backoff_until_ms: Some(7_000),
            held: vec![(2, 9_000)],
        };
        assert_eq!(due(&b, 0, &outcome(true, &[Outcome::Deferred])), None);
        assert_eq!(due(&b, 1, &waiting), Some(7_000));
        // A suspended tenant's message waits for its suspension.
        assert_eq!(due(&b, 2, &waiting), Some(9_000));
        assert_eq!(due(&Postponement::default(), 1, &waiting), None);
    }
}
