//! Sending: leased messages split into per-destination groups, one task per
//! connection's worth of messages, each trying the destination's hosts in order.
//!
//! Concurrency: one semaphore caps connections overall, one per destination caps
//! them per domain (or relay host).
//!
//! Egress pacing ([`Pacing`], the egress quotas) hooks in twice: after MX resolution
//! and before connecting ([`Pacing::open`]: connection caps, back-off, the first slot), and before each message on the connection (the
//! connection is the session's [`MessageGate`]). Messages it holds back are
//! postponed: put back in the queue, due when egress says, with no attempt recorded
//! or counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::routes::{Target, relay_domain, relay_index};
use super::{Held, Inner, Part, Work};
use crate::config::TlsPolicy;
use crate::delivery::gate::{self, Destination, PacedConnection, Postponement};
use crate::delivery::outcomes::Pending;
use crate::delivery::smtp_client::{
    ClientConfig, ClientTls, ConnectionResult, MessageGate, MessageOutcome, Outcome, Stage,
    connect_failed, deliver_gated,
};
use crate::delivery::tls_policy::dane::HostDane;
use crate::delivery::tls_policy::{Decision, TransportSecurity, tls_required_no};
use crate::metrics::Metrics;
use crate::queue::{Lease, Leased, QueueId, QueuedMessage, RcptState, TlsInfo, now_ms};
use crate::shaping::Tenant;

/// Outcomes a connection recorded while it was open.
struct Early {
    /// By part: recorded (and finished, if it was the message's last part) as its
    /// transaction ended, so the connection's result must not record it again.
    recorded: Vec<bool>,
    /// Finishes submitted, to await before the connection's task ends.
    pending: Vec<(QueueId, Pending)>,
    /// The destination's transport security, and what the connection's
    /// certificate check said, for the attempt records.
    security: Option<Decision>,
    verified: Option<Result<(), String>>,
    /// What DANE said about the host of the conversation under way.
    dane: Option<DaneUse>,
}

struct DaneUse {
    label: String,
    /// The host's TLSA records set the TLS client (the policy is `dane`).
    applied: bool,
    /// No usable record: TLS was mandatory, the certificate unchecked.
    unauthenticated: bool,
    /// The host's TLSA records (presentation form) when they set the TLS client,
    /// for TLS reports.
    tlsa: Option<std::sync::Arc<[String]>>,
}

impl Early {
    fn new(parts: usize) -> Self {
        Early {
            recorded: vec![false; parts],
            pending: Vec::new(),
            security: None,
            verified: None,
            dane: None,
        }
    }

    /// The record of an attempt on `target` (the host that answered, if any).
    fn security(&self, target: Option<&Target>, tls: bool) -> Option<TransportSecurity> {
        let verified = if tls { self.verified.as_ref() } else { None };
        let mut record = self
            .security
            .as_ref()
            .map(|d| d.outcome(target.map(|(n, _)| n.as_str()), verified))?;
        if let Some(d) = &self.dane {
            record.dane = Some(d.label.clone());
            if d.applied {
                // DANE wins over MTA-STS (RFC 8461 §2): its verdict is the record.
                record.policy = "dane".into();
                record.mode = None;
                record.policy_id = None;
                record.verified = if d.unauthenticated {
                    Some(false)
                } else {
                    verified.map(|v| v.is_ok())
                };
                record.failure = (target.is_some() && !tls)
                    .then(|| "DANE: no TLS session with a matching certificate".to_owned());
            }
        }
        Some(record)
    }
}

/// The gate of a delivery connection: egress pacing, plus recording each message's
/// outcome as soon as its transaction ends.
struct Recorder<'a> {
    inner: &'a Arc<Inner>,
    egress: &'a mut dyn PacedConnection,
    /// In the order of the messages given to the connection.
    parts: &'a [Part],
    /// The host of the conversation under way.
    target: Option<Target>,
    early: &'a mut Early,
}

impl MessageGate for Recorder<'_> {
    async fn before_message(&mut self, index: usize) -> Result<(), mailrelay_smtp::Reply> {
        self.egress.before_message(index).await
    }

    fn on_reply(&mut self, reply: &mailrelay_smtp::Reply, stage: Stage) {
        self.egress.on_reply(reply, stage);
    }

    fn on_tls_verified(&mut self, verified: &Result<(), String>) {
        self.early.verified = Some(verified.clone());
    }

    async fn on_message_done(
        &mut self,
        index: usize,
        mut outcome: MessageOutcome,
        tls: Option<TlsInfo>,
    ) {
        reclassify(&*self.egress, index, &mut outcome);
        let (Some(part), Some(recorded)) =
            (self.parts.get(index), self.early.recorded.get_mut(index))
        else {
            return;
        };
        if *recorded {
            return;
        }
        *recorded = true;
        part.work.attempted.store(true, Ordering::SeqCst);
        let security = self.early.security(self.target.as_ref(), tls.is_some());
        self.inner.record(
            part,
            &outcome,
            self.target.as_ref(),
            tls.as_ref(),
            security.as_ref(),
            None,
            now_ms(),
        );
        if part.work.parts_left.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Awaited here, not spawned: while the batch window is full the
            // connection waits, which is what bounds the unwritten outcomes.
            let status = self.inner.conclude(&part.work).await;
            let events = std::mem::take(&mut *part.work.events.lock().unwrap());
            self.inner.finishing(&part.work.lease.id);
            let pending = self
                .inner
                .outcomes
                .submit_with_events(part.work.lease.clone(), status, events)
                .await;
            self.early
                .pending
                .push((part.work.lease.id.clone(), pending));
        }
    }
}

impl Inner {
    /// Splits leased messages into per-destination groups and starts one task per
    /// connection's worth of messages. Returns what would take a destination beyond
    /// its capacity here, to give back (with the time it is due again).
    pub(super) fn dispatch(self: &Arc<Self>, leased: Vec<Leased>) -> Vec<(Lease, u64)> {
        let mut groups: HashMap<String, Vec<Part>> = HashMap::new();
        let mut excess = Vec::new();
        let capacity = self.destination_capacity();
        let now = now_ms();
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
            {
                // A message goes back whole if any of its destinations is full: the
                // relay that takes it can send all of it.
                let mut in_hand = self.in_hand.lock().unwrap();
                // Counts this batch too: accepted parts are added as they come.
                if by_dest
                    .keys()
                    .any(|d| in_hand.get(d).copied().unwrap_or(0) >= capacity)
                {
                    // Due now, behind the mail already due: kept in its place, a
                    // backlog for a busy destination would be at the head of every
                    // batch and hide other destinations' mail behind it.
                    excess.push((l.lease, now));
                    continue;
                }
                for d in by_dest.keys() {
                    *in_hand.entry(d.clone()).or_default() += 1;
                }
            }
            self.held
                .lock()
                .unwrap()
                .insert(l.lease.id.clone(), Held::new(l.lease.clone()));
            let final_before = l.status.rcpts.iter().map(|r| r.state.is_final()).collect();
            let work = Arc::new(Work {
                final_before,
                attempted: AtomicBool::new(false),
                events: Mutex::new(Vec::new()),
                postponed_until: Mutex::new(None),
                relayed: Mutex::new(Vec::new()),
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
                    let parts = chunk.len();
                    me.deliver_chunk(&dest, chunk).await;
                    me.running.fetch_sub(1, Ordering::SeqCst);
                    {
                        let mut in_hand = me.in_hand.lock().unwrap();
                        if let Some(n) = in_hand.get_mut(&dest) {
                            *n = n.saturating_sub(parts);
                            if *n == 0 {
                                in_hand.remove(&dest);
                            }
                        }
                    }
                    // Room for more: look for due mail now rather than at the poll.
                    me.wake.notify_one();
                });
            }
        }
        excess
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
        let mut early = Early::new(parts.len());
        let (result, target, reason, held) = self.send(dest, &refs, &parts, &mut early).await;
        let at_ms = now_ms();
        for (i, (part, outcome)) in parts.iter().zip(&result.messages).enumerate() {
            if early.recorded[i] {
                continue;
            }
            // Held back by egress: no attempt; due again when egress said.
            if let Some(due) = gate::due(&held, i, outcome) {
                debug!(queue_id = %part.work.lease.id, %dest, due_in_ms = due.saturating_sub(at_ms), "postponed by egress limits");
                let mut p = part.work.postponed_until.lock().unwrap();
                *p = Some(p.map_or(due, |t| t.min(due)));
                continue;
            }
            part.work.attempted.store(true, Ordering::SeqCst);
            let security = early.security(target.as_ref(), result.tls.is_some());
            self.record(
                part,
                outcome,
                target.as_ref(),
                result.tls.as_ref(),
                security.as_ref(),
                reason,
                at_ms,
            );
        }
        // Finished all at once rather than one after another: they share outcome
        // batches, where awaiting each in turn would pay a batch window per message
        // and keep this connection's slot, and so new leases, waiting meanwhile.
        let mut finishing = tokio::task::JoinSet::new();
        for (i, part) in parts.into_iter().enumerate() {
            if !early.recorded[i] && part.work.parts_left.fetch_sub(1, Ordering::SeqCst) == 1 {
                let me = Arc::clone(self);
                finishing.spawn(async move { me.finalize(&part.work).await });
            }
        }
        // This task counts as running until its outcomes are written, so a drain
        // does not release messages whose outcome is on its way.
        for (id, pending) in early.pending {
            self.finished(&id, pending.await);
        }
        while finishing.join_next().await.is_some() {}
    }

    /// Resolves and connects in order; returns the outcomes, where they came from,
    /// the metrics reason when no server was reached (DNS verdict, connect), and
    /// which messages egress held back.
    async fn send(
        self: &Arc<Self>,
        dest: &str,
        msgs: &[&QueuedMessage],
        parts: &[Part],
        early: &mut Early,
    ) -> (
        ConnectionResult,
        Option<Target>,
        Option<&'static str>,
        Postponement,
    ) {
        // A REQUIRETLS message on the connection keeps every policy in force.
        let relax = msgs
            .iter()
            .all(|m| !m.envelope.mail.requiretls && tls_required_no(&m.body));
        let (targets, mut client) = match self.targets(dest, relax).await {
            Ok((targets, client, decision)) => {
                early.security = Some(decision);
                (targets, client)
            }
            Err((reply, reason)) => {
                return (
                    synthetic(msgs, &reply),
                    None,
                    Some(reason),
                    Postponement::default(),
                );
            }
        };
        // Egress: the quotas of this destination can only be known after MX
        // resolution (mx_hosts patterns, the mx_site key). A relay host is known
        // by its name, and by the recipient domain when its connection carries
        // only that one.
        let mut hosts: Vec<String> = targets.iter().map(|(n, _)| n.clone()).collect();
        hosts.dedup();
        let relay = relay_index(dest);
        let to = Destination {
            domain: if relay.is_some() {
                relay_domain(dest)
            } else {
                Some(dest)
            },
            mx_hosts: &hosts,
            smarthost: relay.is_some() && relay == self.smarthost,
            relay_host: relay.is_some(),
        };
        let sizes: Vec<(usize, usize)> = msgs
            .iter()
            .map(|m| (m.envelope.recipients.len(), m.body.len()))
            .collect();
        let keys = self.egress.tenant_keys(&to);
        let tenants: Vec<Tenant> = if keys.is_empty() {
            Vec::new()
        } else {
            msgs.iter()
                .map(|m| {
                    Tenant::of(
                        &m.envelope.mail.from,
                        m.envelope.client.auth_user.as_deref(),
                        &m.body,
                        &keys,
                    )
                })
                .collect()
        };
        let mut egress = match self.egress.open(to, &sizes, tenants).await {
            Ok(g) => g,
            Err(held) => {
                let res = ConnectionResult {
                    messages: connect_failed(msgs, "held back by egress limits"),
                    tls: None,
                    capabilities: None,
                    error: None,
                };
                return (res, None, None, held);
            }
        };
        client.pace_messages = true;
        let mut gate = Recorder {
            inner: self,
            egress: &mut *egress,
            parts,
            target: None,
            early,
        };
        let (mut result, target, reason) = self
            .connect_and_deliver(dest, msgs, targets, &client, &mut gate)
            .await;
        for (i, m) in result.messages.iter_mut().enumerate() {
            reclassify(&*egress, i, m);
        }
        (result, target, reason, egress.finish().await)
    }

    async fn connect_and_deliver(
        &self,
        dest: &str,
        msgs: &[&QueuedMessage],
        targets: Vec<Target>,
        client: &ClientConfig,
        gate: &mut Recorder<'_>,
    ) -> (ConnectionResult, Option<Target>, Option<&'static str>) {
        let relay = relay_index(dest).and_then(|i| self.relays.get(i));
        let tls = match relay {
            Some(r) => &r.tls,
            None => &self.mx_tls,
        };
        // RFC 7672 §2.2: TLSA records of the port connected to (25 for MX hosts,
        // whatever a test's port override says).
        let dane_port = relay.map_or(25, |r| r.port);
        let dane = self
            .dane
            .as_ref()
            .filter(|_| gate.early.security.as_ref().is_some_and(|d| d.dane));
        let mut last_error = String::from("no address to connect to");
        // The last host that answered but could not take mail (4xx greeting, TLS
        // trouble): its reply says more than a later host's refused connection.
        let mut unusable: Option<(ConnectionResult, Target)> = None;
        for (name, addr) in targets {
            let (mut host_tls, mut host_client) = (None, None);
            gate.early.dane = None;
            if let Some(dane) = dane.filter(|_| !name.starts_with('[')) {
                let said = dane.host(&name, dane_port).await;
                if let Some(m) = self.tls_metrics.get() {
                    m.dane_host(&said);
                }
                let (applied, unauthenticated) = match &said {
                    HostDane::Fail(why) => {
                        last_error = format!("{name}: {why}");
                        warn!(%dest, host = %name, reason = %why, "DANE: host not used");
                        if relay.is_none()
                            && let Some(r) = self.tls_report.get()
                        {
                            r.record_dane_refusal(dest, &name, why);
                        }
                        gate.early.dane = Some(DaneUse {
                            label: why.clone(),
                            applied: false,
                            unauthenticated: false,
                            tlsa: None,
                        });
                        continue;
                    }
                    HostDane::Verify { tls, .. } => {
                        host_tls = Some(tls.clone());
                        (true, false)
                    }
                    HostDane::Mandatory { tls, .. } => {
                        host_tls = Some(tls.clone());
                        (true, true)
                    }
                    HostDane::Skip(_) => (false, false),
                };
                if applied {
                    // Never plain text, never another certificate check.
                    let mut c = client.clone();
                    c.tls = TlsPolicy::Required;
                    host_client = Some(c);
                }
                gate.early.dane = Some(DaneUse {
                    label: said.label(),
                    applied,
                    unauthenticated,
                    tlsa: said.tlsa().map(|(t, _)| std::sync::Arc::clone(t)),
                });
            }
            let tls = host_tls.as_ref().unwrap_or(tls);
            let client = host_client.as_ref().unwrap_or(client);
            let stream = match self.connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    last_error = format!("{name}[{}]: {e}", addr.ip());
                    debug!(%dest, error = %last_error, "connect failed, trying next host");
                    continue;
                }
            };
            gate.target = Some((name.clone(), addr));
            gate.early.verified = None;
            let local = stream.local_addr().ok().map(|a| a.ip());
            let mut result = self.converse(stream, tls, &name, msgs, client, gate).await;
            // The first session only: a plain-text retry after a failed handshake
            // is not another TLS session.
            if relay_index(dest).is_none() {
                self.observe_tls(dest, &name, addr, local, &result, gate.early);
            }
            if client.tls == TlsPolicy::Opportunistic
                && tls_failed(&result)
                && !requiretls_refused(&result)
            {
                // Like Postfix at security level `may`: a server whose TLS cannot
                // be agreed on gets the mail in plain text, over a new connection.
                // WARN: the mail loses its transport encryption; operators should see
                // it (and the metric) without turning on debug logs.
                warn!(%dest, host = %name, ip = %addr.ip(), reason = result.error.as_deref().unwrap_or("unknown"), "opportunistic STARTTLS failed; falling back to plain text");
                self.metrics.tls_fallback();
                let mut plain = client.clone();
                plain.tls = TlsPolicy::Disabled;
                if let Ok(stream) = self.connect(addr).await {
                    result = self.converse(stream, tls, &name, msgs, &plain, gate).await;
                }
            }
            // A rate-limit reply speaks for the provider, not this one host.
            if worth_next_host(&result) && gate.egress.try_next_host() {
                debug!(%dest, host = %name, ip = %addr.ip(), error = ?result.error, "host unusable before MAIL, trying next");
                unusable = Some((result, (name, addr)));
                continue;
            }
            bounce_requiretls(&mut result);
            return (result, Some((name, addr)), None);
        }
        if let Some((mut result, target)) = unusable {
            // RFC 8689 §4.2.1: no MX host was suitable for REQUIRETLS mail: it
            // bounces (each host was given up on as deferred, to try the next).
            bounce_requiretls(&mut result);
            return (result, Some(target), None);
        }
        let res = ConnectionResult {
            messages: connect_failed(msgs, &last_error),
            tls: None,
            capabilities: None,
            error: Some(last_error),
        };
        (res, None, Some("connect"))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, String> {
        match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }

    /// One SMTP conversation, counted in the open-connections gauge while it lasts.
    async fn converse(
        &self,
        stream: TcpStream,
        tls: &ClientTls,
        name: &str,
        msgs: &[&QueuedMessage],
        client: &ClientConfig,
        gate: &mut Recorder<'_>,
    ) -> ConnectionResult {
        let _open = OpenConnection::new(&self.metrics);
        deliver_gated(stream, tls, name, msgs, client, &self.timeouts, gate).await
    }
}

impl Inner {
    /// Counts an MX session for TLS reports and the MTA-STS metrics.
    fn observe_tls(
        &self,
        dest: &str,
        mx: &str,
        addr: SocketAddr,
        local: Option<std::net::IpAddr>,
        result: &ConnectionResult,
        early: &Early,
    ) {
        use crate::delivery::tls_report::{DaneSession, Session, classify};
        let Some(decision) = &early.security else {
            return;
        };
        let reporter = self.tls_report.get();
        if reporter.is_none() && decision.sts.is_none() {
            return;
        }
        let s = Session {
            mx,
            sending_ip: local,
            receiving_ip: Some(addr.ip()),
            helo: result.capabilities.as_ref().map(|c| c.hostname.as_str()),
            ehlo: result.capabilities.is_some(),
            tls: result.tls.is_some(),
            handshake_error: result
                .error
                .as_deref()
                .and_then(|e| e.strip_prefix("TLS handshake failed: ")),
            verified: early.verified.as_ref(),
            dane: early.dane.as_ref().filter(|d| d.applied).and_then(|d| {
                let t = d.tlsa.as_deref()?;
                Some(if d.unauthenticated {
                    DaneSession::Unusable(t)
                } else {
                    DaneSession::Usable(t)
                })
            }),
        };
        if let (Some(m), Some(c)) = (self.tls_metrics.get(), &decision.sts)
            && s.dane.is_none()
            && let Some((_, Some(_))) = classify(decision, &s)
        {
            m.sts_failure(c.policy.mode.as_str());
        }
        if let Some(r) = reporter
            && let Some((policy_type, ok)) = r.record_session(dest, decision, &s)
            && let Some(m) = self.tls_metrics.get()
        {
            m.report_session(&policy_type, ok);
        }
    }
}

/// Keeps the open-outbound-connections gauge right however the delivery ends.
struct OpenConnection<'a>(&'a Metrics);

impl<'a> OpenConnection<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.outbound_connection_opened();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.outbound_connection_closed();
    }
}

/// Applies response rules that turn a remote `5xx` to message `index` into a
/// retry or a `4xx` into a bounce.
fn reclassify(egress: &dyn PacedConnection, index: usize, m: &mut MessageOutcome) {
    for r in &mut m.recipients {
        if r.remote
            && r.result != Outcome::Delivered
            && let Some(o) = egress.classify(index, &r.reply, r.stage)
            && o != r.result
        {
            debug!(rcpt = %r.address, reply = %r.reply, from = ?r.result, to = ?o, "reply reclassified by a response rule");
            r.result = o;
        }
    }
}

/// Outcomes for a destination that got no connection: every recipient gets `reply`.
fn synthetic(msgs: &[&QueuedMessage], reply: &mailrelay_smtp::Reply) -> ConnectionResult {
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

/// The TLS handshake failed (not a refusal of STARTTLS, which goes on in plain
/// text by itself): every recipient deferred at STARTTLS by our own verdict.
fn tls_failed(r: &ConnectionResult) -> bool {
    r.messages.iter().all(|m| {
        !m.attempted
            && m.recipients
                .iter()
                .all(|o| o.result == Outcome::Deferred && o.stage == Stage::StartTls && !o.remote)
    }) && r.messages.iter().any(|m| !m.recipients.is_empty())
}

/// When no host was left to try for REQUIRETLS mail refused by the last one.
fn bounce_requiretls(result: &mut ConnectionResult) {
    if requiretls_refused(result) {
        for r in result.messages.iter_mut().flat_map(|m| &mut m.recipients) {
            r.result = Outcome::Bounced;
            r.stage = Stage::Mail;
        }
    }
}

/// The host was given up on because it cannot carry REQUIRETLS mail (see
/// `mailrelay_smtp::client`: deferred locally with `5.7.30`).
fn requiretls_refused(r: &ConnectionResult) -> bool {
    r.messages.iter().any(|m| !m.recipients.is_empty())
        && r.messages.iter().all(|m| {
            !m.attempted
                && m.recipients.iter().all(|o| {
                    o.result == Outcome::Deferred
                        && !o.remote
                        && o.reply.enhanced == Some(mailrelay_smtp::reply::Enhanced(5, 7, 30))
                })
        })
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
        let reply = mailrelay_smtp::Reply::status(556, (5, 1, 10), "null MX");
        let r = synthetic(&[&msg], &reply);
        assert_eq!(r.messages[0].recipients[0].result, Outcome::Bounced);
        assert!(!worth_next_host(&r), "a DNS verdict is not a host failure");
        let temp = synthetic(&[&msg], &mailrelay_smtp::Reply::status(451, (4, 4, 3), "x"));
        assert_eq!(temp.messages[0].recipients[0].result, Outcome::Deferred);
    }
}
