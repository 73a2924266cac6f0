//! Sending the reports of finished periods: one relay claims a period, builds
//! each counted domain's report, looks up the domain's `_smtp._tls` TXT record
//! and sends the gzipped report to every `rua`: `mailto:` as a mail queued here
//! (delivered by this relay like any other, DKIM-signed when a key for the
//! sender's domain is loaded), `https:` by POST (RFC 8460 §5.2, §5.3).
//!
//! A relay that dies while sending loses the rest of that period's reports: the
//! claim is not handed over (reports are advisory; a duplicate report would be
//! worse for the receivers' aggregations than a missing one).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::TlsReporter;
use super::report::{self, Header, Rua};
use crate::config::tls_reporting::TlsReportingConfig;
use crate::delivery::tls_policy::fetch::{https_connect, https_connector};
use crate::delivery::tls_policy::txt_values;
use crate::queue::{
    BodyType, ClientInfo, Envelope, MailParams, QueueId, QueuedMessage, Recipient, now_ms,
};

/// Everything the sender needs; built once at start-up.
pub struct Sender {
    pub reporter: Arc<TlsReporter>,
    pub queue: Arc<dyn crate::queue::Queue>,
    pub resolver: hickory_resolver::TokioResolver,
    pub dkim: Option<Arc<crate::dkim::Dkim>>,
    pub metrics: crate::delivery::tls_policy::metrics::TlsMetrics,
    /// Rung after a report is queued, so delivery takes it at once.
    pub doorbell: Option<crate::delivery::scheduler::Doorbell>,
    pub organization_name: String,
    pub contact_info: String,
    pub submitter: String,
    pub from: String,
    pub hostname: String,
    pub tls: TlsConnector,
    pub post_timeout: Duration,
}

impl Sender {
    pub fn new(
        cfg: &TlsReportingConfig,
        hostname: &str,
        roots: rustls::RootCertStore,
        parts: SenderParts,
    ) -> Result<Self, rustls::Error> {
        let submitter = cfg.submitter_or(hostname);
        Ok(Sender {
            reporter: parts.reporter,
            queue: parts.queue,
            resolver: parts.resolver,
            dkim: parts.dkim,
            metrics: parts.metrics,
            doorbell: parts.doorbell,
            organization_name: cfg.organization_name.clone(),
            contact_info: cfg
                .contact_info
                .clone()
                .unwrap_or_else(|| format!("postmaster@{submitter}")),
            from: cfg
                .from
                .clone()
                .unwrap_or_else(|| format!("noreply-smtp-tls-reporting@{submitter}")),
            submitter,
            hostname: hostname.to_owned(),
            tls: https_connector(roots)?,
            post_timeout: cfg.post_timeout,
        })
    }

    /// After a period ends, how long to wait before reporting it: every relay
    /// flushes its counts within [`super::FLUSH_EVERY`], plus slack for a slow
    /// store.
    fn settle(&self) -> Duration {
        (self.reporter.period() / 10).clamp(Duration::from_secs(3), Duration::from_secs(300))
    }

    /// Runs until the process ends.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let period = self.reporter.period();
            let tick = (period / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
            let mut done: Option<u64> = None;
            loop {
                tokio::time::sleep(tick).await;
                // The last period that ended at least `settle` ago.
                let settled = now_ms().saturating_sub(self.settle().as_millis() as u64);
                let current = self.reporter.period_start(settled);
                let last = current.saturating_sub(period.as_secs().max(1));
                if done == Some(last) || last == 0 {
                    continue;
                }
                done = Some(last);
                let claim_ttl = period * 3 + Duration::from_secs(3600);
                match self.reporter.store().claim(last, claim_ttl).await {
                    Ok(true) => self.report_period(last, current).await,
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "TLS reports: claiming the period failed; another relay may send them");
                    }
                }
            }
        })
    }

    /// Sends the reports of the period `[start, end)`.
    pub async fn report_period(&self, start: u64, end: u64) {
        let domains = match self.reporter.store().domains(start).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "TLS reports: listing the period's domains failed");
                return;
            }
        };
        let h = Header {
            organization_name: self.organization_name.clone(),
            contact_info: self.contact_info.clone(),
            submitter: self.submitter.clone(),
            start,
            end,
        };
        for domain in domains {
            let fields = match self.reporter.store().fields(start, &domain).await {
                Ok(f) => f,
                Err(e) => {
                    warn!(%domain, error = %e, "TLS report: reading the counters failed");
                    continue;
                }
            };
            let Some(json) = report::build(&h, &domain, &fields) else {
                continue;
            };
            let ruas = match self.rua(&domain).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%domain, reason = %e, "no TLS report wanted");
                    self.metrics.report("not_requested");
                    continue;
                }
            };
            let gz = report::gzip(json.to_string().as_bytes());
            for rua in ruas {
                let (to, sent) = match &rua {
                    Rua::Mailto(addr) => (addr.clone(), self.mail(&h, &domain, addr, &gz).await),
                    Rua::Https(url) => (url.clone(), self.post(url, &domain, &h, &gz).await),
                };
                match sent {
                    Ok(()) => {
                        info!(%domain, rua = %to, report_id = %h.report_id(&domain), "TLS report sent");
                        self.metrics.report("sent");
                    }
                    Err(e) => {
                        warn!(%domain, rua = %to, error = %e, "TLS report not sent");
                        self.metrics.report("failed");
                    }
                }
            }
        }
    }

    async fn rua(&self, domain: &str) -> Result<Vec<Rua>, String> {
        let lookup = self
            .resolver
            .txt_lookup(format!("_smtp._tls.{domain}."))
            .await
            .map_err(|e| format!("_smtp._tls.{domain}: {e}"))?;
        let records = txt_values(lookup.answers());
        report::parse_txt(records.iter().map(Vec::as_slice))
    }

    async fn mail(&self, h: &Header, domain: &str, to: &str, gz: &[u8]) -> Result<(), String> {
        let id = QueueId::generate();
        let message_id = format!("tlsrpt.{id}@{}", self.submitter);
        let mut body = report::mail(h, domain, &self.from, to, gz, &message_id);
        if let Some(dkim) = &self.dkim {
            // Signs with the key of the From domain when one is loaded.
            dkim.sign_bounce(&mut body, now_ms() / 1000);
        }
        let msg = QueuedMessage {
            envelope: Envelope {
                id,
                mail: MailParams {
                    from: self.from.clone(),
                    size: Some(body.len() as u64),
                    body: BodyType::SevenBit,
                    smtputf8: false,
                    ret: None,
                    envid: None,
                    requiretls: false,
                },
                recipients: vec![Recipient {
                    address: to.to_owned(),
                    notify: None,
                    orcpt: None,
                }],
                client: ClientInfo {
                    ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port: 0,
                    helo: self.hostname.clone(),
                    auth_user: None,
                    tls: None,
                    listener: "tls-report".into(),
                },
                received_at_ms: now_ms(),
                received_by: self.hostname.clone(),
            },
            body,
        };
        self.queue
            .enqueue(&msg)
            .await
            .map_err(|e| format!("queueing the report: {e}"))?;
        if let Some(d) = &self.doorbell {
            d.ring();
        }
        Ok(())
    }

    async fn post(&self, url: &str, domain: &str, h: &Header, gz: &[u8]) -> Result<(), String> {
        match tokio::time::timeout(self.post_timeout, self.post_inner(url, domain, h, gz)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.post_timeout)),
        }
    }

    async fn post_inner(
        &self,
        url: &str,
        domain: &str,
        h: &Header,
        gz: &[u8],
    ) -> Result<(), String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
        let host = uri.host().ok_or("URL without a host")?.to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        let (mut send, driver) = https_connect(&self.resolver, &self.tls, &host, port).await?;
        let req = hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/tlsrpt+gzip")
            .header(hyper::header::CONNECTION, "close")
            .header("TLS-Report-Domain", domain)
            .header("TLS-Report-Submitter", &h.submitter)
            .body(Full::new(Bytes::copy_from_slice(gz)))
            .map_err(|e| e.to_string())?;
        let result = async {
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            let status = resp.status();
            // Read (a little of) the body so the connection ends cleanly.
            let _ = Limited::new(resp.into_body(), 64 * 1024).collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {status}"))
            }
        }
        .await;
        driver.abort();
        result
    }
}

/// What [`Sender::new`] takes besides the config.
pub struct SenderParts {
    pub reporter: Arc<TlsReporter>,
    pub queue: Arc<dyn crate::queue::Queue>,
    pub resolver: hickory_resolver::TokioResolver,
    pub dkim: Option<Arc<crate::dkim::Dkim>>,
    pub metrics: crate::delivery::tls_policy::metrics::TlsMetrics,
    pub doorbell: Option<crate::delivery::scheduler::Doorbell>,
}
