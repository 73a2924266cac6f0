//! The adapters that plug the send quotas into the layers that call them: the
//! SMTP session's ingress policy ([`mailrelay_smtp::policy`]) and delivery's dispatch
//! hook and pacing ([`crate::delivery::gate`]). Conversions only: every decision
//! is made in [`crate::quota`], which knows neither the protocol nor delivery.

use std::sync::Arc;

use crate::delivery::gate::{self, GateFuture, PacedConnection};
use crate::queue::Leased;
use crate::quota::Quotas;
use crate::quota::egress::{Egress, EgressConn};
use crate::quota::ingress::gate::DeferGate;
use crate::quota::ingress::model::{self, IngressFacts};
use mailrelay_smtp::Reply;
use mailrelay_smtp::client::{Outcome, Stage};
use mailrelay_smtp::policy::{self, IngressPolicy};

fn reply(r: crate::quota::reply::Reply) -> Reply {
    Reply::status(r.code, r.enhanced, r.text)
}

/// A quota refusal as the session answers it.
pub fn refusal(r: model::Refusal) -> policy::Refusal {
    policy::Refusal {
        reply: reply(r.reply),
        reason: r.reason,
        quota: r.quota,
    }
}

fn facts<'a>(f: &policy::IngressFacts<'a>) -> IngressFacts<'a> {
    IngressFacts {
        sender: f.sender,
        auth_user: f.auth_user,
        client_ip: f.client_ip,
    }
}

/// The ingress quotas as the session's [`IngressPolicy`].
#[derive(Debug)]
pub struct QuotaPolicy(pub Arc<Quotas>);

impl IngressPolicy for QuotaPolicy {
    fn at_mail(
        &self,
        f: &policy::IngressFacts,
        declared_size: Option<u64>,
    ) -> Option<policy::Refusal> {
        self.0.at_mail(&facts(f), declared_size).map(refusal)
    }

    fn at_rcpt(
        &self,
        f: &policy::IngressFacts,
        accepted: &[&str],
        new: &str,
    ) -> Option<policy::Refusal> {
        self.0.at_rcpt(&facts(f), accepted, new).map(refusal)
    }

    fn check_before_queueing(&self) -> bool {
        self.0.check_before_queueing()
    }
}

/// `action: defer` quotas as delivery's dispatch hook.
pub struct DeferHook(pub DeferGate);

impl gate::DispatchHook for DeferHook {
    fn admit(&self, leased: Vec<Leased>) -> GateFuture<'_, gate::Admitted> {
        Box::pin(self.0.admit(leased))
    }
}

/// Egress quotas as delivery's [`gate::Pacing`].
pub struct EgressPacing(pub Egress);

impl gate::Pacing for EgressPacing {
    fn names_domain(&self, domain: &str) -> bool {
        self.0.names_domain(domain)
    }

    fn tenant_keys(&self, d: &gate::Destination<'_>) -> Vec<crate::config::rules::TenantKey> {
        self.0.tenant_keys(d)
    }

    fn open<'a>(
        &'a self,
        d: gate::Destination<'a>,
        sizes: &'a [(usize, usize)],
        tenants: Vec<crate::shaping::Tenant>,
    ) -> GateFuture<'a, Result<Box<dyn PacedConnection>, gate::Postponement>> {
        Box::pin(async move {
            let route = self.0.route(&d);
            let conn = self.0.open(route, sizes, tenants).await?;
            Ok(Box::new(PacedConn(conn)) as Box<dyn PacedConnection>)
        })
    }
}

struct PacedConn(EgressConn);

impl PacedConnection for PacedConn {
    fn before_message(&mut self, index: usize) -> GateFuture<'_, Result<(), Reply>> {
        Box::pin(async move { self.0.before_message(index).await.map_err(reply) })
    }

    fn on_reply(&mut self, r: &Reply, stage: Stage) {
        let enhanced = r.enhanced.map(|e| (e.0, e.1, e.2));
        self.0.on_reply(
            r.code,
            enhanced,
            || r.to_string().trim_end().to_owned(),
            crate::shaping::stage_of(stage),
        );
    }

    fn classify(&self, index: usize, r: &Reply, stage: Stage) -> Option<Outcome> {
        let enhanced = r.enhanced.map(|e| (e.0, e.1, e.2));
        let text = r.to_string();
        self.0
            .classify(
                index,
                r.code,
                enhanced,
                text.trim_end(),
                crate::shaping::stage_of(stage),
            )
            .map(|permanent| {
                if permanent {
                    Outcome::Bounced
                } else {
                    Outcome::Deferred
                }
            })
    }

    fn try_next_host(&mut self) -> bool {
        self.0.try_next_host()
    }

    fn finish(self: Box<Self>) -> GateFuture<'static, gate::Postponement> {
        Box::pin(self.0.finish())
    }
}

#[cfg(test)]
mod tests {
    use crate::delivery::dsn;
    use crate::queue::{ClientInfo, Envelope, MailParams, QueueId, QueuedMessage, Recipient};
    use crate::quota::ingress::gate::is_relay_generated;

    #[test]
    fn the_relays_own_reports_are_recognised() {
        let original = QueuedMessage {
            envelope: Envelope {
                id: QueueId::generate(),
                mail: MailParams {
                    from: "sender@a.test".into(),
                    ..MailParams::default()
                },
                recipients: vec![Recipient {
                    address: "r@b.test".into(),
                    notify: None,
                    orcpt: None,
                }],
                client: ClientInfo {
                    ip: "192.0.2.1".parse().unwrap(),
                    port: 5000,
                    helo: "c".into(),
                    auth_user: None,
                    tls: None,
                    listener: "smtp".into(),
                },
                received_at_ms: 0,
                received_by: "relay.test".into(),
            },
            body: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
        };
        assert!(!is_relay_generated(&original.envelope));
        let failed = [dsn::DsnRecipient {
            address: "r@b.test".into(),
            orcpt: None,
            action: dsn::DsnAction::Failed,
            status: (5, 1, 1),
            remote_mta: None,
            diagnostic: None,
            last_attempt_ms: None,
            will_retry_until_ms: None,
        }];
        let report = dsn::build_dsn(
            &original,
            &failed,
            "relay.test",
            time::OffsetDateTime::now_utc(),
        )
        .expect("a report to the sender");
        assert!(is_relay_generated(&report.envelope));
    }
}
