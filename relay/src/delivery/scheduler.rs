//! The delivery service: takes due mail from the queue under a lease, groups it by
//! destination, sends it (one connection carrying up to
//! `max_messages_per_connection` messages), records every attempt, and reschedules,
//! bounces or finalises each message.
//!
//! Concurrency: one semaphore caps connections overall, one per destination caps
//! them per domain (or the smarthost). Leases are renewed by a ticker while a
//! message is held, so a slow delivery does not let another relay take it over.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use super::dsn::{self, DsnAction, DsnRecipient};
use super::mx::{MxResolver, Resolution, ResolverError};
use super::smtp_client::{
    ClientConfig, ClientTimeouts, ClientTls, ClientTlsError, ConnectionResult, Credentials,
    MessageOutcome, Outcome, Stage, connect_failed, deliver,
};
use crate::config::DeliveryConfig;
use crate::queue::{
    Attempt, AttemptResult, FinishResult, Lease, Leased, MessageStatus, Queue, QueueId,
    QueuedMessage, RcptState, now_ms,
};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("delivery DNS resolver: {0}")]
    Resolver(#[from] ResolverError),
    #[error("delivery TLS: {0}")]
    Tls(#[from] ClientTlsError),
}

/// Key of the destination used for the smarthost (a domain cannot contain `[`).
const SMARTHOST_KEY: &str = "[smarthost]";

/// Messages taken per `lease_due` call, at most.
const LEASE_BATCH: usize = 200;

/// A running delivery service; [`Delivery::shutdown`] drains it.
pub struct Delivery {
    inner: Arc<Inner>,
    main: tokio::task::JoinHandle<()>,
    renewer: tokio::task::JoinHandle<()>,
}

struct Inner {
    queue: Arc<dyn Queue>,
    cfg: DeliveryConfig,
    hostname: String,
    owner: String,
    resolver: MxResolver,
    mx_tls: ClientTls,
    smarthost_tls: Option<ClientTls>,
    timeouts: ClientTimeouts,
    total: Arc<Semaphore>,
    per_destination: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Every lease we hold, for renewal and for release on drain.
    held: Mutex<HashMap<QueueId, Lease>>,
    /// Connection tasks spawned and not yet finished.
    running: AtomicUsize,
    stopping: AtomicBool,
    wake: Notify,
}

/// One leased message and what is left to do for it in this round.
struct Work {
    lease: Lease,
    message: QueuedMessage,
    status: Mutex<MessageStatus>,
    /// Destination groups not yet done; the last one to finish finalises the message.
    parts_left: AtomicUsize,
    /// Which recipients were already final when leased, so a DSN reports only the
    /// ones that failed in this round.
    final_before: Vec<bool>,
}

/// Where one connection is made: the name (for SNI and the attempt record) and address.
type Target = (String, SocketAddr);

/// The recipients of one message bound for one destination.
struct Part {
    work: Arc<Work>,
    rcpts: Vec<String>,
}

impl Delivery {
    /// Builds the resolver and TLS clients (blocking file IO: call at start-up) and
    /// starts taking work.
    pub fn start(
        queue: Arc<dyn Queue>,
        cfg: DeliveryConfig,
        hostname: String,
    ) -> Result<Self, DeliveryError> {
        let resolver = MxResolver::new(&cfg.dns)?.with_local_names([hostname.clone()]);
        let mx_tls = load_tls(cfg.ca_file.as_deref())?;
        let smarthost_tls = match &cfg.smarthost {
            Some(s) => Some(load_tls(s.ca_file.as_deref())?),
            None => None,
        };
        let timeouts = ClientTimeouts::default();
        let owner = format!("{hostname}:{}", std::process::id());
        let inner = Arc::new(Inner {
            total: Arc::new(Semaphore::new(cfg.max_concurrency)),
            queue,
            cfg,
            hostname,
            owner,
            resolver,
            mx_tls,
            smarthost_tls,
            timeouts,
            per_destination: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let main = tokio::spawn(Arc::clone(&inner).run());
        let renewer = tokio::spawn(Arc::clone(&inner).renew_loop());
        info!(owner = %inner.owner, "delivery started");
        Ok(Delivery {
            inner,
            main,
            renewer,
        })
    }

    /// Stops taking work, lets deliveries in flight finish until `deadline`, then
    /// gives every message still held back to the queue, due at once.
    pub async fn shutdown(self, deadline: Duration) {
        let inner = self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        inner.wake.notify_waiters();
        let _ = self.main.await;
        let until = tokio::time::Instant::now() + deadline;
        while inner.running.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.renewer.abort();
        let leases: Vec<Lease> = inner.held.lock().unwrap().drain().map(|(_, l)| l).collect();
        if !leases.is_empty() {
            match inner.queue.release(&leases).await {
                Ok(()) => info!(count = leases.len(), "released unfinished deliveries"),
                Err(e) => warn!(error = %e, "releasing leases failed; they expire on their own"),
            }
        }
        info!("delivery stopped");
    }
}

fn load_tls(ca_file: Option<&std::path::Path>) -> Result<ClientTls, ClientTlsError> {
    match ClientTls::new(ca_file) {
        Ok(t) => Ok(t),
        // Without a configured CA file, a missing system store only matters for
        // `required` TLS, which then fails per delivery (and defers) instead of
        // keeping the relay from starting.
        Err(e) if ca_file.is_none() => {
            warn!(error = %e, "no system CA store; verified TLS will fail");
            ClientTls::with_roots(rustls::RootCertStore::empty())
        }
        Err(e) => Err(e),
    }
}

impl Inner {
    fn lease_ms(&self) -> u64 {
        self.cfg.lease.as_millis() as u64
    }

    async fn run(self: Arc<Self>) {
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
            let max = (free * self.cfg.max_messages_per_connection).min(LEASE_BATCH);
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
            self.dispatch(leased);
        }
    }

    async fn idle(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.wake.notified() => {}
        }
    }

    async fn renew_loop(self: Arc<Self>) {
        let every = self.cfg.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let leases: Vec<Lease> = self.held.lock().unwrap().values().cloned().collect();
            for l in leases {
                match self.queue.renew(&l, self.lease_ms()).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(queue_id = %l.id, "lease lost while delivering");
                        self.held.lock().unwrap().remove(&l.id);
                    }
                    Err(e) => warn!(queue_id = %l.id, error = %e, "renewing lease failed"),
                }
            }
        }
    }

    /// Splits leased messages into per-destination groups and starts one task per
    /// connection's worth of messages.
    fn dispatch(self: &Arc<Self>, leased: Vec<Leased>) {
        let mut groups: HashMap<String, Vec<Part>> = HashMap::new();
        for l in leased {
            let mut by_dest: HashMap<String, Vec<String>> = HashMap::new();
            for r in l
                .status
                .rcpts
                .iter()
                .filter(|r| r.state == RcptState::Pending)
            {
                by_dest
                    .entry(self.destination_of(&r.address))
                    .or_default()
                    .push(r.address.clone());
            }
            self.held
                .lock()
                .unwrap()
                .insert(l.lease.id.clone(), l.lease.clone());
            let final_before = l.status.rcpts.iter().map(|r| r.state.is_final()).collect();
            let work = Arc::new(Work {
                final_before,
                parts_left: AtomicUsize::new(by_dest.len()),
                lease: l.lease,
                message: l.message,
                status: Mutex::new(l.status),
            });
            if by_dest.is_empty() {
                // Nothing pending (should not be queued): finalise as it stands.
                let me = Arc::clone(self);
                self.running.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    me.finalize(&work).await;
                    me.running.fetch_sub(1, Ordering::SeqCst);
                });
                continue;
            }
            for (dest, rcpts) in by_dest {
                groups.entry(dest).or_default().push(Part {
                    work: Arc::clone(&work),
                    rcpts,
                });
            }
        }
        for (dest, mut parts) in groups {
            while !parts.is_empty() {
                let rest = parts.split_off(parts.len().min(self.cfg.max_messages_per_connection));
                let chunk = std::mem::replace(&mut parts, rest);
                let me = Arc::clone(self);
                let dest = dest.clone();
                self.running.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    me.deliver_chunk(&dest, chunk).await;
                    me.running.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }

    fn destination_of(&self, address: &str) -> String {
        if self.cfg.smarthost.is_some() {
            return SMARTHOST_KEY.into();
        }
        address
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .trim_end_matches('.')
            .to_ascii_lowercase()
    }

    fn destination_semaphore(&self, dest: &str) -> Arc<Semaphore> {
        let mut map = self.per_destination.lock().unwrap();
        // Drop idle entries so a relay that saw a million domains does not keep a
        // million semaphores.
        if map.len() > 1000 {
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        Arc::clone(
            map.entry(dest.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.cfg.per_destination_concurrency))),
        )
    }

    async fn deliver_chunk(self: &Arc<Self>, dest: &str, parts: Vec<Part>) {
        let per_dest = self.destination_semaphore(dest);
        let Ok(_d) = per_dest.acquire_owned().await else {
            return;
        };
        let Ok(_t) = Arc::clone(&self.total).acquire_owned().await else {
            return;
        };
        if self.stopping.load(Ordering::SeqCst) {
            // Draining: these messages are released untouched.
            return;
        }
        // The SMTP client sends exactly the recipients it is given: only this
        // destination's pending ones.
        let messages: Vec<QueuedMessage> = parts
            .iter()
            .map(|p| {
                let mut m = p.work.message.clone();
                m.envelope
                    .recipients
                    .retain(|r| p.rcpts.contains(&r.address));
                m
            })
            .collect();
        let refs: Vec<&QueuedMessage> = messages.iter().collect();
        let (result, target) = self.send(dest, &refs).await;
        let at_ms = now_ms();
        for (part, outcome) in parts.iter().zip(&result.messages) {
            self.record(part, outcome, target.as_ref(), &result, at_ms);
        }
        // Finished all at once rather than one after another: concurrent writes
        // share a redb group commit (or travel together on the multiplexed Redis
        // connection), where awaiting each in turn pays a commit per message and
        // keeps this connection's slot, and so new leases, waiting meanwhile.
        let mut finishing = tokio::task::JoinSet::new();
        for part in parts {
            if part.work.parts_left.fetch_sub(1, Ordering::SeqCst) == 1 {
                let me = Arc::clone(self);
                finishing.spawn(async move { me.finalize(&part.work).await });
            }
        }
        while finishing.join_next().await.is_some() {}
    }

    /// Resolves and connects in order; returns the outcomes and where they came from.
    async fn send(
        &self,
        dest: &str,
        msgs: &[&QueuedMessage],
    ) -> (ConnectionResult, Option<Target>) {
        let (targets, client) = match self.targets(dest).await {
            Ok(t) => t,
            Err(reply) => return (synthetic(msgs, &reply), None),
        };
        let tls = match (&self.smarthost_tls, dest == SMARTHOST_KEY) {
            (Some(t), true) => t,
            _ => &self.mx_tls,
        };
        let mut last_error = String::from("no address to connect to");
        for (name, addr) in targets {
            let stream = match tokio::time::timeout(
                self.cfg.connect_timeout,
                TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    last_error = format!("{name}[{}]: {e}", addr.ip());
                    debug!(%dest, error = %last_error, "connect failed, trying next host");
                    continue;
                }
                Err(_) => {
                    last_error = format!("{name}[{}]: connect timed out", addr.ip());
                    continue;
                }
            };
            let result = deliver(stream, tls, &name, msgs, &client, &self.timeouts).await;
            if worth_next_host(&result) {
                last_error = format!(
                    "{name}[{}]: {}",
                    addr.ip(),
                    result.error.clone().unwrap_or_default()
                );
                debug!(%dest, error = %last_error, "host unusable before MAIL, trying next");
                continue;
            }
            return (result, Some((name, addr)));
        }
        let res = ConnectionResult {
            messages: connect_failed(msgs, &last_error),
            tls: None,
            capabilities: None,
            error: Some(last_error),
        };
        (res, None)
    }

    /// The hosts to try for `dest`, or the final or temporary reply that ends it.
    async fn targets(&self, dest: &str) -> Result<(Vec<Target>, ClientConfig), crate::smtp::Reply> {
        use crate::smtp::Reply;
        let mut client = ClientConfig::new(self.hostname.clone());
        if dest == SMARTHOST_KEY {
            let s = self.cfg.smarthost.as_ref().expect("smarthost configured");
            client.tls = s.tls;
            client.auth = s.username.as_ref().map(|u| Credentials {
                username: u.clone(),
                password: s.password.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
            });
            let addrs = tokio::net::lookup_host((s.host.as_str(), s.port))
                .await
                .map_err(|e| Reply::status(451, (4, 4, 3), format!("smarthost {}: {e}", s.host)))?;
            return Ok((addrs.map(|a| (s.host.clone(), a)).collect(), client));
        }
        client.tls = self.cfg.tls;
        match self.resolver.resolve(dest).await {
            Resolution::Hosts(hosts) => Ok((
                hosts
                    .into_iter()
                    .flat_map(|h| h.addrs.into_iter().map(move |a| (h.name.clone(), a)))
                    .collect(),
                client,
            )),
            Resolution::NullMx => Err(Reply::status(
                556,
                (5, 1, 10),
                format!("domain {dest} does not accept mail (null MX, RFC 7505)"),
            )),
            Resolution::NoSuchDomain => Err(Reply::status(
                550,
                (5, 1, 2),
                format!("domain {dest} does not exist or has no mail server"),
            )),
            Resolution::LoopsToSelf => Err(Reply::status(
                554,
                (5, 4, 6),
                format!("mail for {dest} loops back to myself"),
            )),
            Resolution::TempFail(why) => Err(Reply::status(451, (4, 4, 3), why)),
        }
    }

    /// Writes the outcome of one message's part into its status and logs it.
    fn record(
        &self,
        part: &Part,
        outcome: &MessageOutcome,
        target: Option<&Target>,
        conn: &ConnectionResult,
        at_ms: u64,
    ) {
        let mut status = part.work.status.lock().unwrap();
        let queue_id = status.id.clone();
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
            let reply = r.reply.to_string().trim_end().to_owned();
            let relay =
                target.map_or_else(|| "none".to_owned(), |(n, a)| format!("{n}[{}]", a.ip()));
            info!(
                queue_id = %queue_id, to = %r.address, relay = %relay, stage = r.stage.as_str(),
                reply = %reply, "{word}"
            );
            rs.state = state;
            rs.record(Attempt {
                at_ms,
                result,
                mx: target.map(|(n, _)| n.clone()),
                ip: target.map(|(_, a)| a.ip().to_string()),
                tls: conn.tls.clone(),
                reply,
            });
        }
    }

    /// After every part of a message is done: reschedule, expire, bounce and finish.
    async fn finalize(&self, work: &Work) {
        let now = now_ms();
        let mut status = work.status.lock().unwrap().clone();
        status.attempts = status.attempts.saturating_add(1);
        let pending = status.rcpts.iter().any(|r| r.state == RcptState::Pending);
        status.next_attempt_ms = None;
        if pending {
            let next = self.cfg.retry.next_attempt(
                status.attempts,
                status.created_ms,
                now,
                &mut rand::rng(),
            );
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
                    }
                }
            }
        }
        let failed = newly_failed(&status, &work.final_before);
        // `build_dsn` returns nothing for a null sender or NOTIFY=NEVER.
        let report = dsn::build_dsn(
            &work.message,
            &failed,
            &self.hostname,
            time::OffsetDateTime::now_utc(),
        );
        if let Some(dsn) = report {
            let sender = &work.message.envelope.mail.from;
            match self.queue.enqueue(&dsn).await {
                Ok(()) => {
                    info!(queue_id = %status.id, dsn_id = %dsn.envelope.id, to = %sender, "bounce report queued")
                }
                Err(e) => {
                    // Without the report the sender would never learn. The failed
                    // recipients go back to pending (their attempts stay recorded):
                    // the next round fails them again and retries the report.
                    warn!(queue_id = %status.id, error = %e, "queueing the bounce failed; will retry");
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
        let id = status.id.clone();
        match self.queue.finish(&work.lease, status).await {
            Ok(FinishResult::LeaseLost) => warn!(queue_id = %id, "lease lost before finish"),
            Ok(_) => {}
            Err(e) => warn!(queue_id = %id, error = %e, "finishing delivery failed"),
        }
        self.held.lock().unwrap().remove(&id);
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

/// `5.1.1` out of `550 5.1.1 text`.
fn enhanced_of(reply: &str) -> Option<(u8, u16, u16)> {
    let mut it = reply.split_whitespace().nth(1)?.split('.');
    let class = it.next()?.parse().ok()?;
    let subject = it.next()?.parse().ok()?;
    let detail = it.next()?.parse().ok()?;
    (it.next().is_none() && matches!(class, 2 | 4 | 5)).then_some((class, subject, detail))
}

/// Outcomes for a destination that got no connection: every recipient gets `reply`.
fn synthetic(msgs: &[&QueuedMessage], reply: &crate::smtp::Reply) -> ConnectionResult {
    let mut messages = connect_failed(msgs, "");
    let result = Outcome::of_code(reply.code);
    for m in &mut messages {
        for r in &mut m.recipients {
            r.reply = reply.clone();
            r.result = result;
        }
    }
    ConnectionResult {
        messages,
        tls: None,
        capabilities: None,
        error: None,
    }
}

/// A host that failed before any message was tried (4xx greeting, EHLO trouble,
/// failed TLS) says nothing about the next host: RFC 5321 §5.1 says try it.
fn worth_next_host(r: &ConnectionResult) -> bool {
    r.messages.iter().all(|m| {
        !m.attempted
            && m.recipients.iter().all(|o| {
                o.result == Outcome::Deferred
                    && matches!(o.stage, Stage::Greeting | Stage::Ehlo | Stage::StartTls)
            })
    })
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
                reply: reply.into(),
            }],
        }
    }

    #[test]
    fn only_recipients_failed_in_this_round_are_reported() {
        let status = MessageStatus {
            id: QueueId::generate(),
            rcpts: vec![
                rcpt("old@b.test", RcptState::Bounced, "550 5.1.1 gone"),
                rcpt("new@b.test", RcptState::Bounced, "550 5.7.1 denied"),
                rcpt("late@b.test", RcptState::Expired, "451 4.4.1 down"),
                rcpt("ok@b.test", RcptState::Delivered, "250 ok"),
                rcpt("wait@b.test", RcptState::Pending, "451 later"),
            ],
            created_ms: 0,
            next_attempt_ms: None,
            attempts: 1,
            final_at_ms: None,
            leased_until_ms: None,
        };
        let failed = newly_failed(&status, &[true, false, false, false, false]);
        let got: Vec<(&str, (u8, u16, u16))> = failed
            .iter()
            .map(|f| (f.address.as_str(), f.status))
            .collect();
        assert_eq!(got, [("new@b.test", (5, 7, 1)), ("late@b.test", (4, 4, 7))]);
        assert_eq!(failed[0].remote_mta.as_deref(), Some("mx.b.test"));
    }

    #[test]
    fn enhanced_code_is_read_only_when_well_formed() {
        assert_eq!(enhanced_of("550 5.1.1 no"), Some((5, 1, 1)));
        assert_eq!(enhanced_of("556 5.1.10 null MX"), Some((5, 1, 10)));
        assert_eq!(enhanced_of("550 no such user"), None);
        assert_eq!(enhanced_of("550 5..1 x"), None);
    }

    #[test]
    fn dns_verdicts_become_per_recipient_replies() {
        let msg = QueuedMessage {
            envelope: crate::queue::Envelope {
                id: QueueId::generate(),
                mail: Default::default(),
                recipients: vec![crate::queue::Recipient {
                    address: "a@nullmx.test".into(),
                    notify: None,
                    orcpt: None,
                }],
                client: crate::queue::ClientInfo {
                    ip: std::net::Ipv4Addr::LOCALHOST.into(),
                    port: 1,
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
        let reply = crate::smtp::Reply::status(556, (5, 1, 10), "null MX");
        let r = synthetic(&[&msg], &reply);
        assert_eq!(r.messages[0].recipients[0].result, Outcome::Bounced);
        assert!(!worth_next_host(&r), "a DNS verdict is not a host failure");
        let temp = synthetic(&[&msg], &crate::smtp::Reply::status(451, (4, 4, 3), "x"));
        assert_eq!(temp.messages[0].recipients[0].result, Outcome::Deferred);
    }
}
