//! Finishing a round: each attempt's result written into the message's recipient
//! states, then, once all its destinations are done, the next attempt (or expiry),
//! the DSN it owes, and the queue outcome.
//!
//! Outcomes are recorded per message as soon as its transaction ends (the reply
//! after the content), while the connection goes on:
//! [`OutcomeWriter`](crate::delivery::outcomes::OutcomeWriter) writes them in
//! batches of one queue round trip. A relay killed mid-delivery so sends again only
//! what was in flight: at most one message per open connection plus the outcome
//! batch (`delivery.outcome_batch.max_messages`). A message with recipients at
//! several destinations is recorded when its last destination is done.
//!
//! [`newly_failed`], [`still_delayed`] and [`reason_of`] are pure.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use super::routes::Target;
use super::{Inner, Part, Work};
use crate::delivery::dsn::{self, DsnAction, DsnRecipient};
use crate::delivery::smtp_client::{MessageOutcome, Outcome, Stage};
use crate::events::classify::{Category, LocalFailure, classify_local, classify_reply};
use crate::events::log::{event_for, message_id_of};
use crate::events::suppression::Suppression;
use crate::queue::TransportSecurity;
use crate::queue::{
    Attempt, AttemptResult, FinishResult, MessageStatus, QueueError, QueueId, RcptState, TlsInfo,
    now_ms,
};
use mailrelay_admin_api::EventKind;

/// `name[ip]` of a delivery target, or `none`, for log lines.
struct RelayName<'a>(Option<&'a Target>);

impl std::fmt::Display for RelayName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((n, a)) => write!(f, "{n}[{}]", a.ip()),
            None => f.write_str("none"),
        }
    }
}

impl Inner {
    /// Writes the outcome of one message's part into its status and logs it.
    // Each argument is one part of the attempt record, gathered by the caller from
    // the connection or its gate; a struct for them would only be built to be
    // taken apart here.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record(
        &self,
        part: &Part,
        outcome: &MessageOutcome,
        target: Option<&Target>,
        tls: Option<&TlsInfo>,
        security: Option<&TransportSecurity>,
        reason: Option<&'static str>,
        at_ms: u64,
    ) {
        let mut guard = part.work.status.lock().unwrap();
        // Borrowed field by field (id for the log, rcpts to update) instead of cloning.
        let status = &mut *guard;
        let queue_id = &status.id;
        let with_events = self.outcomes.events_enabled();
        let message_id = with_events
            .then(|| message_id_of(&part.work.message.body))
            .flatten();
        for r in &outcome.recipients {
            let Some(rs) = status
                .rcpts
                .iter_mut()
                .find(|s| s.state == RcptState::Pending && s.address == r.address)
            else {
                continue;
            };
            let (result, state, word) = match r.result {
                Outcome::Delivered => (AttemptResult::Delivered, RcptState::Delivered, "delivered"),
                Outcome::Deferred => (AttemptResult::Deferred, RcptState::Pending, "deferred"),
                Outcome::Bounced => (AttemptResult::Bounced, RcptState::Bounced, "bounced"),
            };
            self.metrics
                .delivery_result(word, reason.unwrap_or_else(|| reason_of(r)));
            let category = (r.result != Outcome::Delivered).then(|| category_of(r));
            if let Some(c) = category {
                self.metrics.delivery_failure(word, c.as_str());
            }
            if r.result == Outcome::Delivered && outcome.dsn_unsupported {
                part.work.relayed.lock().unwrap().push(r.address.clone());
            }
            if r.result == Outcome::Delivered {
                let received = part.work.message.envelope.received_at_ms;
                self.metrics
                    .delivery_latency(Duration::from_millis(at_ms.saturating_sub(received)));
            }
            let reply = r.reply.to_text();
            // Fields are only evaluated when the line is logged: the relay's name is
            // formatted lazily (it was ~1,300 instructions per message at level warn).
            info!(
                queue_id = %queue_id, to = %r.address, relay = %RelayName(target), stage = r.stage.as_str(),
                reply = %reply, category = category.map_or("", Category::as_str), "{word}"
            );
            if r.result == Outcome::Bounced {
                rs.category = category.map(|c| c.as_str().to_owned());
                if let (Some(c), Some(sup)) = (category, self.suppression.get()) {
                    self.suppress(sup, part, &r.address, c, &reply);
                }
            }
            if with_events {
                let kind = match r.result {
                    Outcome::Delivered => EventKind::Delivered,
                    Outcome::Deferred => EventKind::Deferred,
                    Outcome::Bounced => EventKind::Bounced,
                };
                let mut e = event_for(kind, &part.work.message, message_id.as_deref());
                e.at_ms = at_ms;
                e.recipient = Some(r.address.clone());
                e.reply = Some(reply.clone());
                e.mx = target.map(|(n, _)| n.clone());
                e.tls_version = tls.map(|t| t.version.clone());
                e.tls_cipher = tls.map(|t| t.cipher.clone());
                e.category = category.map(|c| c.as_str().to_owned());
                part.work.events.lock().unwrap().push(e);
            }
            rs.state = state;
            rs.record(Attempt {
                at_ms,
                result,
                mx: target.map(|(n, _)| n.clone()),
                ip: target.map(|(_, a)| mailrelay_smtp::session::ip_text(a.ip())),
                tls: tls.cloned(),
                security: security.cloned(),
                reply,
                category: category.map(|c| c.as_str().to_owned()),
            });
        }
    }

    /// Lists a bounced recipient (if its category is one that does), off the
    /// delivery path: a slow suppression store must not hold up the connection.
    fn suppress(
        &self,
        sup: &std::sync::Arc<Suppression>,
        part: &Part,
        address: &str,
        category: Category,
        reply: &str,
    ) {
        let sup = std::sync::Arc::clone(sup);
        let metrics = std::sync::Arc::clone(&self.metrics);
        let envelope = part.work.message.envelope.clone();
        let (address, reply) = (address.to_owned(), reply.to_owned());
        tokio::spawn(async move {
            match sup.on_bounce(&envelope, &address, category, &reply).await {
                Ok(Some(scope)) => {
                    metrics.suppression_added(category.as_str());
                    info!(queue_id = %envelope.id, to = %address, scope = %scope, category = category.as_str(), "recipient added to the suppression list");
                }
                Ok(None) => {}
                Err(e) => {
                    metrics.suppression_added("add_failed");
                    warn!(queue_id = %envelope.id, to = %address, error = %e, "adding the recipient to the suppression list failed");
                }
            }
        });
    }

    /// After every part of a message is done: reschedule, expire, bounce and finish.
    pub(super) async fn finalize(&self, work: &Work) {
        let status = self.conclude(work).await;
        let events = std::mem::take(&mut *work.events.lock().unwrap());
        self.finishing(&work.lease.id);
        let pending = self
            .outcomes
            .submit_with_events(work.lease.clone(), status, events)
            .await;
        self.finished(&work.lease.id, pending.await);
    }

    /// What a finished round leaves a message with: its next attempt, or expired;
    /// the DSN it owes is queued here.
    pub(super) async fn conclude(&self, work: &Work) -> MessageStatus {
        let now = now_ms();
        let mut status = work.status.lock().unwrap().clone();
        // A round that egress held back entirely is no attempt.
        let postponed = *work.postponed_until.lock().unwrap();
        let attempted = work.attempted.load(Ordering::SeqCst) || postponed.is_none();
        if attempted {
            status.attempts = status.attempts.saturating_add(1);
        }
        let pending = status.rcpts.iter().any(|r| r.state == RcptState::Pending);
        status.next_attempt_ms = None;
        if pending {
            let next = match postponed {
                // Held back only: due when egress said, until the lifetime ends.
                Some(due) if !attempted => {
                    let lifetime = self.cfg.retry.max_lifetime.as_millis() as u64;
                    (now < status.created_ms.saturating_add(lifetime)).then_some(due.max(now))
                }
                _ => self
                    .cfg
                    .retry
                    .next_attempt(status.attempts, status.created_ms, now, &mut rand::rng())
                    .map(|t| postponed.map_or(t, |p| t.min(p.max(now)))),
            };
            match next {
                Some(t) => status.next_attempt_ms = Some(t),
                None => {
                    for r in status
                        .rcpts
                        .iter_mut()
                        .filter(|r| r.state == RcptState::Pending)
                    {
                        info!(queue_id = %status.id, to = %r.address, "expired: maximum queue lifetime reached");
                        r.state = RcptState::Expired;
                        r.category =
                            Some(classify_local(LocalFailure::QueueLifetime).as_str().into());
                        if self.outcomes.events_enabled() {
                            let mut e = event_for(
                                EventKind::Expired,
                                &work.message,
                                message_id_of(&work.message.body).as_deref(),
                            );
                            e.recipient = Some(r.address.clone());
                            e.reply = r.attempts.last().map(|a| a.reply.clone());
                            e.category = r.category.clone();
                            work.events.lock().unwrap().push(e);
                        }
                        self.metrics.delivery_result("bounced", "expired");
                        self.metrics.delivery_failure("bounced", "expired");
                    }
                }
            }
        }
        let mut report_on = newly_failed(&status, &work.final_before);
        // RFC 3461 §4.2: a server without DSN took recipients that asked for
        // NOTIFY=SUCCESS; nobody after us will tell the sender, so we say `relayed`.
        // (A server with DSN got the NOTIFY parameter and reports delivery itself.)
        report_on.extend(newly_relayed(
            &status,
            &work.final_before,
            &work.relayed.lock().unwrap(),
        ));
        // One delay warning per message, once it has waited long enough (Postfix's
        // delay_warning_time); it rides along with any failure report of this round.
        let warn_delay = status.next_attempt_ms.is_some()
            && !status.delay_warned
            && self.cfg.retry.delay_warning_due(status.created_ms, now);
        if warn_delay {
            let until = status
                .created_ms
                .saturating_add(self.cfg.retry.max_lifetime.as_millis() as u64);
            report_on.extend(still_delayed(&status, until));
        }
        // `build_dsn` returns nothing for a null sender, NOTIFY=NEVER, or a delay
        // nobody asked to hear about; the warning then counts as given.
        let report = dsn::build_dsn(
            &work.message,
            &report_on,
            &self.hostname,
            time::OffsetDateTime::now_utc(),
        );
        if warn_delay {
            status.delay_warned = true;
        }
        if let Some(mut dsn) = report {
            if let Some(dkim) = self.dsn_signer.get() {
                let now = dsn.envelope.received_at_ms / 1000;
                dkim.sign_bounce(&mut dsn.body, now);
            }
            let sender = &work.message.envelope.mail.from;
            match self.queue.enqueue(&dsn).await {
                Ok(()) => {
                    let kind = if report_on.iter().all(|r| r.action == DsnAction::Delayed) {
                        "delay warning"
                    } else if report_on.iter().all(|r| r.action == DsnAction::Relayed) {
                        "success notice"
                    } else {
                        "bounce report"
                    };
                    info!(queue_id = %status.id, dsn_id = %dsn.envelope.id, to = %sender, "{kind} queued");
                    if self.outcomes.events_enabled() {
                        let mut e = event_for(
                            EventKind::DsnSent,
                            &work.message,
                            message_id_of(&work.message.body).as_deref(),
                        );
                        e.dsn_id = Some(dsn.envelope.id.to_string());
                        e.reply = Some(kind.to_owned());
                        work.events.lock().unwrap().push(e);
                    }
                }
                Err(e) => {
                    // Without the report the sender would never learn. The failed
                    // recipients go back to pending (their attempts stay recorded):
                    // the next round fails them again and retries the report.
                    warn!(queue_id = %status.id, error = %e, "queueing the bounce failed; will retry");
                    status.delay_warned = false;
                    for (i, r) in status.rcpts.iter_mut().enumerate() {
                        if matches!(r.state, RcptState::Bounced | RcptState::Expired)
                            && !work.final_before.get(i).copied().unwrap_or(false)
                        {
                            r.state = RcptState::Pending;
                        }
                    }
                    let retry_in = self.cfg.retry.first.as_millis() as u64;
                    status.next_attempt_ms = Some(
                        status
                            .next_attempt_ms
                            .unwrap_or(now.saturating_add(retry_in)),
                    );
                    status.final_at_ms = None;
                }
            }
        }
        status
    }

    /// The outcome of a message goes to the writer now: from here a renewal that
    /// finds its lease gone is most likely behind its finish (see `renew_loop`).
    pub(super) fn finishing(&self, id: &QueueId) {
        if let Some(h) = self.held.lock().unwrap().get_mut(id) {
            h.finishing = true;
        }
    }

    /// The written outcome of a message: it is no longer ours to renew or release.
    pub(super) fn finished(
        &self,
        id: &QueueId,
        written: Result<Result<FinishResult, QueueError>, impl std::fmt::Debug>,
    ) {
        match written {
            Ok(Ok(FinishResult::LeaseLost)) => warn!(queue_id = %id, "lease lost before finish"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(queue_id = %id, error = %e, "finishing delivery failed"),
            Err(e) => warn!(queue_id = %id, error = ?e, "finishing delivery failed: writer gone"),
        }
        self.held.lock().unwrap().remove(id);
    }
}

/// Recipients that became bounced or expired in this round, for the DSN.
fn newly_failed(status: &MessageStatus, final_before: &[bool]) -> Vec<DsnRecipient> {
    status
        .rcpts
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            matches!(r.state, RcptState::Bounced | RcptState::Expired)
                && !final_before.get(*i).copied().unwrap_or(false)
        })
        .map(|(_, r)| r)
        .map(|r| {
            let last = r.attempts.last();
            let reply = last.map_or("", |a| a.reply.as_str());
            let status = if r.state == RcptState::Expired {
                (4, 4, 7)
            } else {
                enhanced_of(reply).unwrap_or((5, 0, 0))
            };
            DsnRecipient {
                address: r.address.clone(),
                orcpt: None,
                action: DsnAction::Failed,
                status,
                remote_mta: last.and_then(|a| a.mx.clone()),
                diagnostic: (!reply.is_empty()).then(|| format!("smtp; {reply}")),
                last_attempt_ms: last.map(|a| a.at_ms),
                will_retry_until_ms: None,
            }
        })
        .collect()
}

/// Recipients delivered in this round to a server without DSN, for a `relayed`
/// notice (only those that asked for NOTIFY=SUCCESS get one: see `build_dsn`).
fn newly_relayed(
    status: &MessageStatus,
    final_before: &[bool],
    relayed: &[String],
) -> Vec<DsnRecipient> {
    status
        .rcpts
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            r.state == RcptState::Delivered
                && !final_before.get(*i).copied().unwrap_or(false)
                && relayed.iter().any(|a| a == &r.address)
        })
        .map(|(_, r)| {
            let last = r.attempts.last();
            let reply = last.map_or("", |a| a.reply.as_str());
            DsnRecipient {
                address: r.address.clone(),
                orcpt: None,
                action: DsnAction::Relayed,
                status: enhanced_of(reply).filter(|s| s.0 == 2).unwrap_or((2, 0, 0)),
                remote_mta: last.and_then(|a| a.mx.clone()),
                diagnostic: (!reply.is_empty()).then(|| format!("smtp; {reply}")),
                last_attempt_ms: last.map(|a| a.at_ms),
                will_retry_until_ms: None,
            }
        })
        .collect()
}

/// The bounce category of a failed recipient: TLS trouble by its stage, anything
/// else by its reply (the relay's own replies for local failures say what failed).
fn category_of(r: &mailrelay_smtp::client::RecipientOutcome) -> Category {
    if r.stage == Stage::StartTls {
        return classify_local(LocalFailure::Tls);
    }
    classify_reply(r.reply.to_string().trim_end())
}

/// Pending recipients, for a delay warning: status and diagnostic of their last try.
fn still_delayed(status: &MessageStatus, until_ms: u64) -> Vec<DsnRecipient> {
    status
        .rcpts
        .iter()
        .filter(|r| r.state == RcptState::Pending)
        .map(|r| {
            let last = r.attempts.last();
            let reply = last.map_or("", |a| a.reply.as_str());
            DsnRecipient {
                address: r.address.clone(),
                orcpt: None,
                action: DsnAction::Delayed,
                status: enhanced_of(reply).filter(|s| s.0 == 4).unwrap_or((4, 0, 0)),
                remote_mta: last.and_then(|a| a.mx.clone()),
                diagnostic: (!reply.is_empty()).then(|| format!("smtp; {reply}")),
                last_attempt_ms: last.map(|a| a.at_ms),
                will_retry_until_ms: Some(until_ms),
            }
        })
        .collect()
}

/// The metrics reason of a recipient's outcome from a server conversation.
fn reason_of(r: &mailrelay_smtp::client::RecipientOutcome) -> &'static str {
    match (r.result, r.stage, r.remote) {
        (Outcome::Delivered, _, _) => "ok",
        (_, Stage::StartTls, _) => "tls",
        (_, Stage::Auth, _) => "auth",
        (Outcome::Deferred, _, true) => "remote_4xx",
        (Outcome::Bounced, _, true) => "remote_5xx",
        // Our own verdicts: a connection that failed or broke, or a local check.
        (Outcome::Deferred, _, false) => "connect",
        (Outcome::Bounced, _, false) => match r.reply.enhanced.map(|e| (e.0, e.1, e.2)) {
            Some((5, 3, 4)) => "too_big",
            Some((5, 6, 7)) => "smtputf8",
            _ => "other",
        },
    }
}

/// `5.1.1` out of `550 5.1.1 text`.
fn enhanced_of(reply: &str) -> Option<(u8, u16, u16)> {
    let mut it = reply.split_whitespace().nth(1)?.split('.');
    let class = it.next()?.parse().ok()?;
    let subject = it.next()?.parse().ok()?;
    let detail = it.next()?.parse().ok()?;
    (it.next().is_none() && matches!(class, 2 | 4 | 5)).then_some((class, subject, detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::RcptStatus;
    fn rcpt(address: &str, state: RcptState, reply: &str) -> RcptStatus {
        RcptStatus {
            address: address.into(),
            state,
            attempts: vec![Attempt {
                at_ms: 1,
                result: AttemptResult::Bounced,
                mx: Some("mx.b.test".into()),
                ip: None,
                tls: None,
                security: None,
                reply: reply.into(),
                category: None,
            }],
            category: None,
        }
    }

    /// A message after one attempt, with these recipients.
    fn status_of(rcpts: Vec<RcptStatus>) -> MessageStatus {
        MessageStatus {
            id: QueueId::generate(),
            rcpts,
            created_ms: 0,
            next_attempt_ms: None,
            attempts: 1,
            final_at_ms: None,
            leased_until_ms: None,
            delay_warned: false,
        }
    }

    #[test]
    fn only_recipients_failed_in_this_round_are_reported() {
        let status = status_of(vec![
            rcpt("old@b.test", RcptState::Bounced, "550 5.1.1 gone"),
            rcpt("new@b.test", RcptState::Bounced, "550 5.7.1 denied"),
            rcpt("late@b.test", RcptState::Expired, "451 4.4.1 down"),
            rcpt("ok@b.test", RcptState::Delivered, "250 ok"),
            rcpt("wait@b.test", RcptState::Pending, "451 later"),
        ]);
        let failed = newly_failed(&status, &[true, false, false, false, false]);
        let got: Vec<(&str, (u8, u16, u16))> = failed
            .iter()
            .map(|f| (f.address.as_str(), f.status))
            .collect();
        assert_eq!(got, [("new@b.test", (5, 7, 1)), ("late@b.test", (4, 4, 7))]);
        assert_eq!(failed[0].remote_mta.as_deref(), Some("mx.b.test"));
    }

    #[test]
    fn only_recipients_relayed_in_this_round_get_a_success_notice() {
        let status = status_of(vec![
            rcpt("old@b.test", RcptState::Delivered, "250 2.0.0 ok"),
            rcpt("new@b.test", RcptState::Delivered, "250 2.6.0 queued"),
            rcpt("dsn@b.test", RcptState::Delivered, "250 ok"),
            rcpt("no@b.test", RcptState::Bounced, "550 5.1.1 no"),
        ]);
        // dsn@ went to a server with DSN: that server reports it, not us.
        let relayed = ["old@b.test".to_owned(), "new@b.test".to_owned()];
        let got = newly_relayed(&status, &[true, false, false, false], &relayed);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].address, "new@b.test");
        assert_eq!(got[0].action, DsnAction::Relayed);
        assert_eq!(got[0].status, (2, 6, 0));
    }

    #[test]
    fn enhanced_code_is_read_only_when_well_formed() {
        assert_eq!(enhanced_of("550 5.1.1 no"), Some((5, 1, 1)));
        assert_eq!(enhanced_of("556 5.1.10 null MX"), Some((5, 1, 10)));
        assert_eq!(enhanced_of("550 no such user"), None);
        assert_eq!(enhanced_of("550 5..1 x"), None);
    }
}
