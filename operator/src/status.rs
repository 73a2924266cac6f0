//! Queue and delivery status of a relay, read from its queue store.
//!
//! The operator reads the store directly (the same Redis the relay pods share)
//! through the relay's own queue API, so it sees every pod's mail at once.
//! [`top_deferring`] is pure: it summarises a sample of deferred messages.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use mailrelay::queue::{
    AttemptResult, Envelope, Inspect, ListFilter, MessageStatus, QueueError, RcptState,
};

use crate::crd::{DeferredDestination, DeliveryCounters, QueueSummary};

/// Deferred messages read per report to find the top deferring destinations: a
/// sample, so a huge backlog costs a bounded read.
pub const DEFERRED_SAMPLE: usize = 500;
/// Destinations listed in `status.topDeferred`.
pub const TOP_DEFERRED: usize = 5;
/// Longest last-error text kept in the status.
const MAX_ERROR_LEN: usize = 200;

/// What the status shows about a relay's queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueReport {
    pub queue: QueueSummary,
    pub delivery: DeliveryCounters,
    /// `None` when the sample could not be read (a huge queue can take longer
    /// than the store's deadline to scan): the status keeps what it showed.
    pub top_deferred: Option<Vec<DeferredDestination>>,
}

/// Milliseconds since the epoch as a Kubernetes `Time` (whole seconds, as the API
/// server stores them, so that a status read back compares equal).
pub fn time_from_ms(ms: u64) -> Option<Time> {
    let secs = i64::try_from(ms / 1000).ok()?;
    Timestamp::from_second(secs).ok().map(Time)
}

/// Reads counts, delivery totals and a sample of deferred mail.
pub async fn read_report(queue: &dyn Inspect) -> Result<QueueReport, QueueError> {
    let stats = queue.stats().await?;
    let totals = queue.delivery_totals().await?;
    let deferred = if stats.deferred > 0 {
        let sample = queue
            .list(ListFilter {
                deferred_only: true,
                domain: None,
                limit: DEFERRED_SAMPLE,
            })
            .await;
        match sample {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot sample deferred mail for the status");
                None
            }
        }
    } else {
        Some(Vec::new())
    };
    Ok(QueueReport {
        queue: QueueSummary {
            queued: stats.messages,
            deferred: stats.deferred,
            in_flight: stats.leased,
            bytes: stats.bytes,
            oldest_queued_at: stats.oldest_ms.and_then(time_from_ms),
        },
        delivery: DeliveryCounters {
            delivered: totals.delivered,
            bounced: totals.bounced,
            expired: totals.expired,
        },
        top_deferred: deferred.map(|d| top_deferring(&d, TOP_DEFERRED)),
    })
}

/// The destinations (recipient domains) with the most pending recipients that have
/// been deferred at least once, most first (ties by name), each with the most recent
/// error reply among them.
pub fn top_deferring(
    messages: &[(Envelope, MessageStatus)],
    top: usize,
) -> Vec<DeferredDestination> {
    #[derive(Default)]
    struct Acc {
        recipients: u64,
        last: Option<(u64, String)>,
    }
    let mut by_domain: BTreeMap<String, Acc> = BTreeMap::new();
    for (_, status) in messages {
        for r in &status.rcpts {
            if r.state != RcptState::Pending {
                continue;
            }
            let Some(last) = r
                .attempts
                .iter()
                .filter(|a| a.result == AttemptResult::Deferred)
                .max_by_key(|a| a.at_ms)
            else {
                continue;
            };
            let domain = r.domain().trim_end_matches('.').to_ascii_lowercase();
            let acc = by_domain.entry(domain).or_default();
            acc.recipients += 1;
            if acc.last.as_ref().is_none_or(|(at, _)| last.at_ms > *at) {
                acc.last = Some((last.at_ms, last.reply.clone()));
            }
        }
    }
    let mut out: Vec<DeferredDestination> = by_domain
        .into_iter()
        .map(|(destination, acc)| DeferredDestination {
            destination,
            recipients: acc.recipients,
            last_error: acc.last.as_ref().map(|(_, e)| truncate(e, MAX_ERROR_LEN)),
            last_attempt_at: acc.last.and_then(|(at, _)| time_from_ms(at)),
        })
        .collect();
    out.sort_by(|a, b| {
        b.recipients
            .cmp(&a.recipients)
            .then_with(|| a.destination.cmp(&b.destination))
    });
    out.truncate(top);
    out
}

fn truncate(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailrelay::queue::{Attempt, ClientInfo, MailParams, QueueId, RcptStatus};

    type Rcpt<'a> = (&'a str, RcptState, &'a [(u64, AttemptResult, &'a str)]);

    fn msg(rcpts: &[Rcpt<'_>]) -> (Envelope, MessageStatus) {
        let env = Envelope {
            id: QueueId::generate(),
            mail: MailParams::default(),
            recipients: vec![],
            client: ClientInfo {
                ip: "127.0.0.1".parse().unwrap(),
                port: 1,
                helo: "h".into(),
                auth_user: None,
                tls: None,
                listener: "smtp".into(),
            },
            received_at_ms: 0,
            received_by: "r".into(),
        };
        let status = MessageStatus {
            id: env.id.clone(),
            rcpts: rcpts
                .iter()
                .map(|(a, s, atts)| RcptStatus {
                    address: (*a).into(),
                    state: *s,
                    attempts: atts
                        .iter()
                        .map(|(at, r, reply)| Attempt {
                            at_ms: *at,
                            result: *r,
                            mx: None,
                            ip: None,
                            tls: None,
                            security: None,
                            reply: (*reply).into(),
                            category: None,
                        })
                        .collect(),
                    category: None,
                })
                .collect(),
            created_ms: 0,
            next_attempt_ms: Some(1),
            attempts: 1,
            final_at_ms: None,
            leased_until_ms: None,
            delay_warned: false,
        };
        (env, status)
    }

    #[test]
    fn destinations_are_ranked_with_their_latest_error() {
        use AttemptResult::Deferred;
        use RcptState::Pending;
        let msgs = vec![
            msg(&[
                ("a@Slow.Example", Pending, &[(1_000, Deferred, "451 busy")]),
                ("b@slow.example", Pending, &[(5_000, Deferred, "421 later")]),
                (
                    "c@done.example",
                    RcptState::Delivered,
                    &[(5_000, AttemptResult::Delivered, "250 ok")],
                ),
            ]),
            msg(&[
                (
                    "d@other.example",
                    Pending,
                    &[(9_000, Deferred, "450 greylisted")],
                ),
                ("e@fresh.example", Pending, &[]),
            ]),
            msg(&[("f@slow.example", Pending, &[(3_000, Deferred, "451 busy")])]),
        ];
        let top = top_deferring(&msgs, 5);
        assert_eq!(top.len(), 2, "{top:?}");
        assert_eq!(top[0].destination, "slow.example");
        assert_eq!(top[0].recipients, 3);
        assert_eq!(top[0].last_error.as_deref(), Some("421 later"));
        assert_eq!(top[0].last_attempt_at, time_from_ms(5_000));
        assert_eq!(top[1].destination, "other.example");
        assert_eq!(top_deferring(&msgs, 1).len(), 1);
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let e = "é".repeat(300);
        let t = truncate(&e, 201);
        assert!(t.len() <= 204 && t.ends_with('…'));
    }
}
