//! Sending the reports of finished periods: one relay claims a period, builds
//! each counted domain's report, looks up the domain's `_smtp._tls` TXT record
//! and sends the gzipped report to every `rua`: `mailto:` as a mail queued here
//! (delivered by this relay like any other, DKIM-signed when a key for the
//! sender's domain is loaded), `https:` by POST (RFC 8460 §5.2, §5.3).
//!
//! The claim on a period is a lease, renewed before each report goes out, and
//! each report sent (per domain and `rua`) is recorded in the store: a relay
//! that dies while sending leaves the rest to whichever relay claims the period
//! after the lease (itself, after a restart). A report that could not be sent
//! (an HTTP error, a refused connection, a failed enqueue) is tried again with
//! a growing delay until [`retry_window`] after the period ended; the period is
//! finished when every report is sent or given up. Only a relay that dies
//! between sending a report and recording it sends that one twice.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::TlsReporter;
use super::report::{self, Header, Rua};
use super::store::Claim;
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

    /// How long a claim holds without renewal: the longest single step (a
    /// POST) and some slack.
    fn lease(&self) -> Duration {
        self.post_timeout + Duration::from_secs(10)
    }

    /// Runs until the process ends.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let period = self.reporter.period();
            let p = period.as_secs().max(1);
            let tick = (period / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
            let token = format!("{}:{}:{}", self.hostname, std::process::id(), now_ms());
            let ttl = period * 3 + Duration::from_secs(3600);
            // Periods known to be finished (no store call for them again).
            let mut finished: std::collections::BTreeSet<u64> = Default::default();
            loop {
                tokio::time::sleep(tick).await;
                // The last period that ended at least `settle` ago, and the ones
                // before it whose reports may still be retried (or were left by a
                // relay that died).
                let settled = now_ms().saturating_sub(self.settle().as_millis() as u64);
                let current = self.reporter.period_start(settled);
                let window = retry_window(period).as_secs() + p;
                let oldest = current.saturating_sub(window).max(p);
                let candidates: Vec<u64> = (0..MAX_OPEN_PERIODS)
                    .map(|i| current.saturating_sub(p * (i + 1)))
                    .filter(|s| *s >= oldest && !finished.contains(s))
                    .collect();
                finished.retain(|s| *s >= oldest);
                for start in candidates.into_iter().rev() {
                    // A period without sessions needs no claim (nor a write).
                    if self
                        .reporter
                        .store()
                        .domains(start)
                        .await
                        .is_ok_and(|d| d.is_empty())
                    {
                        finished.insert(start);
                        continue;
                    }
                    match self
                        .reporter
                        .store()
                        .claim(start, &token, self.lease())
                        .await
                    {
                        Ok(Claim::Won) => {
                            let done = self.report_period(start, start + p, &token).await;
                            let store = self.reporter.store();
                            if done {
                                if let Err(e) = store.finish(start, ttl).await {
                                    warn!(error = %e, "TLS reports: marking the period finished failed");
                                }
                                finished.insert(start);
                            }
                            let _ = store.release(start, &token).await;
                        }
                        Ok(Claim::Finished) => {
                            finished.insert(start);
                        }
                        Ok(Claim::Busy) => {}
                        Err(e) => {
                            warn!(error = %e, "TLS reports: claiming the period failed; another relay may send them");
                        }
                    }
                }
            }
        })
    }

    /// Sends what is left of the reports of the period `[start, end)`; true when
    /// nothing is (every report sent or given up).
    pub async fn report_period(&self, start: u64, end: u64, token: &str) -> bool {
        let store = self.reporter.store();
        let ttl = self.reporter.period() * 3 + Duration::from_secs(3600);
        let (domains, progress) =
            match tokio::try_join!(store.domains(start), store.progress(start)) {
                Ok(d) => d,
                Err(e) => {
                    warn!(error = %e, "TLS reports: reading the period's domains failed");
                    return false;
                }
            };
        let h = Header {
            organization_name: self.organization_name.clone(),
            contact_info: self.contact_info.clone(),
            submitter: self.submitter.clone(),
            start,
            end,
        };
        let deadline_ms = (end + retry_window(self.reporter.period()).as_secs()) * 1000;
        let mut finished = true;
        for domain in domains {
            if progress.get(&domain).is_some_and(|s| s == DONE) {
                continue;
            }
            let mark_done = |item: String| async move {
                if let Err(e) = store.set_progress(start, &item, DONE, ttl).await {
                    warn!(%item, error = %e, "TLS reports: recording progress failed");
                }
            };
            let fields = match store.fields(start, &domain).await {
                Ok(f) => f,
                Err(e) => {
                    warn!(%domain, error = %e, "TLS report: reading the counters failed");
                    finished = false;
                    continue;
                }
            };
            let Some(json) = report::build(&h, &domain, &fields) else {
                mark_done(domain.clone()).await;
                continue;
            };
            let ruas = match self.rua(&domain).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%domain, reason = %e, "no TLS report wanted");
                    self.metrics.report("not_requested");
                    mark_done(domain.clone()).await;
                    continue;
                }
            };
            let gz = report::gzip(json.to_string().as_bytes());
            let mut all_done = true;
            for rua in ruas {
                let to = match &rua {
                    Rua::Mailto(addr) => format!("mailto:{addr}"),
                    Rua::Https(url) => url.clone(),
                };
                let item = format!("{domain} {to}");
                let tries = match progress.get(&item).map(|s| Step::parse(s)) {
                    Some(Step::Over) => continue,
                    Some(Step::Retry { due_ms, .. }) if due_ms > now_ms() => {
                        all_done = false;
                        continue;
                    }
                    Some(Step::Retry { tries, .. }) => tries,
                    None => 0,
                };
                // Still the holder? (A relay that lost its lease stops here.)
                if !matches!(
                    store.claim(start, token, self.lease()).await,
                    Ok(Claim::Won)
                ) {
                    return false;
                }
                let sent = match &rua {
                    Rua::Mailto(addr) => self.mail(&h, &domain, addr, &gz).await,
                    Rua::Https(url) => self.post(url, &domain, &h, &gz).await,
                };
                let state = match sent {
                    Ok(()) => {
                        info!(%domain, rua = %to, report_id = %h.report_id(&domain), "TLS report sent");
                        self.metrics.report("sent");
                        DONE.to_owned()
                    }
                    Err(e) => {
                        let tries = tries + 1;
                        let due_ms =
                            now_ms() + backoff(self.reporter.period(), tries).as_millis() as u64;
                        if due_ms < deadline_ms {
                            warn!(%domain, rua = %to, error = %e, attempt = tries, "TLS report not sent; retrying later");
                            all_done = false;
                            format!("retry:{tries}:{due_ms}")
                        } else {
                            warn!(%domain, rua = %to, error = %e, attempt = tries, "TLS report not sent; giving up");
                            self.metrics.report("failed");
                            "failed".to_owned()
                        }
                    }
                };
                if let Err(e) = store.set_progress(start, &item, &state, ttl).await {
                    warn!(%item, error = %e, "TLS reports: recording progress failed");
                }
            }
            if all_done {
                mark_done(domain.clone()).await;
            } else {
                finished = false;
            }
        }
        finished
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

/// The progress of one domain's report, or one `rua`'s copy of it.
const DONE: &str = "done";

/// At most this many past periods are looked at per tick.
const MAX_OPEN_PERIODS: u64 = 256;

enum Step {
    /// Sent, or given up.
    Over,
    Retry {
        tries: u32,
        due_ms: u64,
    },
}

impl Step {
    fn parse(s: &str) -> Step {
        let mut it = s
            .strip_prefix("retry:")
            .into_iter()
            .flat_map(|r| r.split(':'));
        match (
            it.next().and_then(|t| t.parse().ok()),
            it.next().and_then(|d| d.parse().ok()),
        ) {
            (Some(tries), Some(due_ms)) => Step::Retry { tries, due_ms },
            _ => Step::Over,
        }
    }
}

/// How long after its period a report is still tried: one more period, at
/// least 15 minutes (a short test period must still leave room for retries).
pub fn retry_window(period: Duration) -> Duration {
    period.max(Duration::from_secs(15 * 60))
}

/// The delay before try `tries + 1`: a hundredth of the period (1 s to 5 min),
/// doubling, at most a quarter of the retry window.
pub fn backoff(period: Duration, tries: u32) -> Duration {
    let base = (period / 100).clamp(Duration::from_secs(1), Duration::from_secs(300));
    let cap = retry_window(period) / 4;
    base.saturating_mul(1u32 << tries.saturating_sub(1).min(16))
        .min(cap)
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
