//! Prometheus metrics of the relay: the registry that the SMTP server, delivery and
//! quotas record into, and its OpenMetrics text, which the admin server serves on
//! `/metrics`. A leaf: it knows no module that records into it. Quota and egress
//! keep their own families (`quota::metrics`), registered into the same registry
//! with [`Metrics::registry_mut`] before it is shared.
//!
//! Every recording method takes `&self` and touches only atomics (plus a read
//! lock per labelled family), so one `Arc<Metrics>` is shared by all sessions.
//!
//! Label values are kept to a bounded set so a misbehaving client cannot create
//! unbounded series: SMTP verbs outside the known list become `UNKNOWN`, and
//! free-form labels (listener names, reasons) must be short identifiers
//! (`[A-Za-z0-9_.-]`, at most 48 bytes) or are recorded as `other` — pass a fixed
//! reason such as `rate_limited`, never an error message.

use std::borrow::Cow;
use std::time::Duration;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::queue::QueueStats;

/// One `name="value"` pair; the value is borrowed when it is a known constant.
type Label = [(&'static str, Cow<'static, str>); 1];

const PREFIX: &str = "mailrelay";

/// SMTP verbs counted by name; anything else is counted as `UNKNOWN`.
const VERBS: [&str; 16] = [
    "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP", "VRFY", "EXPN",
    "STARTTLS", "AUTH", "FOREIGN", "UNKNOWN",
];
const UNKNOWN_VERB: usize = VERBS.len() - 1;

/// Queue writes are expected in the low milliseconds (Redis round trip, fsync); the
/// upper buckets show a struggling store before the write timeout (10 s default).
const QUEUE_WRITE_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Arrival-to-delivery latency: seconds for a relay hop up to a day of retries.
const DELIVERY_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// Reasons of `mailrelay_queue_write_failures_total`.
const QUEUE_FAILURES: [&str; 3] = ["full", "unavailable", "timeout"];

/// Delivery results counted by `mailrelay_delivery_recipients_total`.
const RESULTS: &[&str] = &["delivered", "deferred", "bounced"];

/// The bounded reason set of delivery results; anything else becomes `other`.
pub const DELIVERY_REASONS: &[&str] = &[
    "ok",
    "remote_4xx",
    "remote_5xx",
    "connect",
    "dns_tempfail",
    "nxdomain",
    "null_mx",
    "tls",
    "auth",
    "too_big",
    "smtputf8",
    "expired",
    "loop",
    "other",
];

/// `result` and `reason` labels of one delivery outcome.
type ResultLabels = [(&'static str, &'static str); 2];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<Label, Counter>,
    connections_active: Gauge,
    connections_refused: Family<Label, Counter>,
    connections_evicted: Family<Label, Counter>,
    commands: Family<Label, Counter>,
    /// One handle per entry of [`VERBS`], resolved on first use: a family lookup
    /// hashes the label set (~450 instructions, 5 commands per message). Lazily, so
    /// a verb never seen still has no series.
    command_counters: [std::sync::OnceLock<Counter>; VERBS.len()],
    /// Handles of `connections` for the first few listener names seen: a family
    /// lookup allocates the label and hashes it, once per connection otherwise.
    listener_counters: std::sync::RwLock<Vec<(String, Counter)>>,
    messages_accepted: Counter,
    messages_rejected: Family<Label, Counter>,
    sender_refused: Family<Label, Counter>,
    received_bytes: Counter,
    queue_write: Histogram,
    queue_write_failures: Family<Label, Counter>,
    tls_handshakes: Family<Label, Counter>,
    delivery_tls_fallbacks: Counter,
    auth_failures: Counter,
    auth_lockouts: Family<Label, Counter>,
    auth_refused: Family<Label, Counter>,
    delivery_recipients: Family<ResultLabels, Counter>,
    /// The `delivered`/`ok` series of `delivery_recipients`, by far the most counted.
    delivered_ok: Counter,
    delivery_latency: Histogram,
    delivery_connections_active: Gauge,
    outcome_flushes: Family<Label, Counter>,
    outcomes_flushed: Counter,
    outcome_flush_failures: Counter,
    // Bounces and suppression (relay/src/events).
    delivery_failures: Family<ResultLabels, Counter>,
    suppression_hits: Family<Label, Counter>,
    suppression_added: Family<Label, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        // Counter names omit `_total`: the encoder appends it.
        let connections = Family::<Label, Counter>::default();
        registry.register(
            "smtp_connections",
            "SMTP connections accepted, by listener",
            connections.clone(),
        );
        let connections_active = Gauge::default();
        registry.register(
            "smtp_connections_active",
            "SMTP connections currently open",
            connections_active.clone(),
        );
        let connections_refused = Family::<Label, Counter>::default();
        registry.register(
            "smtp_connections_refused",
            "SMTP connections refused before the greeting, by reason",
            connections_refused.clone(),
        );
        let connections_evicted = Family::<Label, Counter>::default();
        registry.register(
            "smtp_connections_evicted",
            "Idle SMTP sessions closed to admit a new client, by the limit that was reached",
            connections_evicted.clone(),
        );
        let commands = Family::<Label, Counter>::default();
        registry.register(
            "smtp_commands",
            "SMTP commands received, by verb",
            commands.clone(),
        );
        let messages_accepted = Counter::default();
        registry.register(
            "smtp_messages_accepted",
            "Messages accepted and durably queued",
            messages_accepted.clone(),
        );
        let messages_rejected = Family::<Label, Counter>::default();
        registry.register(
            "smtp_messages_rejected",
            "Messages or transactions rejected, by reason",
            messages_rejected.clone(),
        );
        let received_bytes = Counter::default();
        let sender_refused = Family::<Label, Counter>::default();
        registry.register(
            "smtp_sender_refused",
            "Senders refused by sender_binding, by reason (mail_from, from_header)",
            sender_refused.clone(),
        );
        registry.register_with_unit(
            "smtp_received",
            "Message bytes accepted into the queue",
            Unit::Bytes,
            received_bytes.clone(),
        );
        let queue_write = Histogram::new(QUEUE_WRITE_BUCKETS);
        registry.register_with_unit(
            "queue_write",
            "Time to write one message to the queue, failures included",
            Unit::Seconds,
            queue_write.clone(),
        );
        let queue_write_failures = Family::<Label, Counter>::default();
        registry.register(
            "queue_write_failures",
            "Queue writes that failed, by reason (full, unavailable, timeout)",
            queue_write_failures.clone(),
        );
        // Every reason exists from the start: an alert on `full` works before the
        // first time the store fills up.
        for reason in QUEUE_FAILURES {
            let _ = queue_write_failures.get_or_create(&label("reason", reason));
        }
        let tls_handshakes = Family::<Label, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes, by result (ok or error)",
            tls_handshakes.clone(),
        );
        // Both results exist from the start, so `rate()` over errors works before
        // the first error happens.
        for result in ["ok", "error"] {
            let _ = tls_handshakes.get_or_create(&label("result", result));
        }
        let delivery_tls_fallbacks = Counter::default();
        registry.register(
            "delivery_tls_fallbacks",
            "Opportunistic STARTTLS to a next hop that failed, so the mail went in plain text",
            delivery_tls_fallbacks.clone(),
        );
        let delivery_recipients = Family::<ResultLabels, Counter>::default();
        registry.register(
            "delivery_recipients",
            "Recipient delivery attempts, by result and reason",
            delivery_recipients.clone(),
        );
        // One series per result exists from the start so the family is exposed
        // and `rate()` works before the first delivery.
        for pair in [
            ("delivered", "ok"),
            ("deferred", "remote_4xx"),
            ("bounced", "remote_5xx"),
        ] {
            let _ = delivery_recipients.get_or_create(&[("result", pair.0), ("reason", pair.1)]);
        }
        let delivered_ok = delivery_recipients
            .get_or_create(&[("result", "delivered"), ("reason", "ok")])
            .clone();
        let delivery_latency = Histogram::new(DELIVERY_BUCKETS);
        registry.register_with_unit(
            "delivery",
            "Time from arrival to final delivery of a recipient",
            Unit::Seconds,
            delivery_latency.clone(),
        );
        let delivery_connections_active = Gauge::default();
        registry.register(
            "delivery_connections_active",
            "Open outbound SMTP connections",
            delivery_connections_active.clone(),
        );
        let outcome_flushes = Family::<Label, Counter>::default();
        registry.register(
            "delivery_outcome_flushes",
            "Batches of delivery outcomes written to the queue, by what triggered the write (size, interval, shutdown)",
            outcome_flushes.clone(),
        );
        for trigger in ["size", "interval", "shutdown"] {
            let _ = outcome_flushes.get_or_create(&label("trigger", trigger));
        }
        let outcomes_flushed = Counter::default();
        registry.register(
            "delivery_outcomes_flushed",
            "Message outcomes written to the queue in outcome batches",
            outcomes_flushed.clone(),
        );
        let outcome_flush_failures = Counter::default();
        registry.register(
            "delivery_outcome_flush_failures",
            "Outcome batches the queue store could not take (their messages are delivered again after the lease)",
            outcome_flush_failures.clone(),
        );
        let auth_failures = Counter::default();
        registry.register(
            "smtp_auth_failures",
            "SMTP AUTH attempts with wrong credentials",
            auth_failures.clone(),
        );
        let auth_lockouts = Family::<Label, Counter>::default();
        registry.register(
            "smtp_auth_lockouts",
            "AUTH lockouts begun after too many failures, by scope (address, user)",
            auth_lockouts.clone(),
        );
        let auth_refused = Family::<Label, Counter>::default();
        registry.register(
            "smtp_auth_refused",
            "AUTH attempts answered 454 without checking the credentials, by reason (locked, store_unavailable)",
            auth_refused.clone(),
        );
        let delivery_failures = Family::<ResultLabels, Counter>::default();
        registry.register(
            "delivery_failures",
            "Recipient delivery failures by result (deferred, bounced) and bounce category",
            delivery_failures.clone(),
        );
        let suppression_hits = Family::<Label, Counter>::default();
        registry.register(
            "suppression_hits",
            "Recipients found on a suppression list at RCPT, by action (rejected, dropped), and failed checks (check_failed)",
            suppression_hits.clone(),
        );
        let suppression_added = Family::<Label, Counter>::default();
        registry.register(
            "suppression_added",
            "Recipients added to a suppression list after a bounce, by category; add_failed when the store refused",
            suppression_added.clone(),
        );
        Metrics {
            registry,
            delivery_failures,
            suppression_hits,
            suppression_added,
            delivery_recipients,
            delivered_ok,
            delivery_latency,
            delivery_connections_active,
            outcome_flushes,
            outcomes_flushed,
            outcome_flush_failures,
            connections,
            connections_active,
            connections_refused,
            connections_evicted,
            commands,
            command_counters: Default::default(),
            listener_counters: Default::default(),
            messages_accepted,
            messages_rejected,
            sender_refused,
            received_bytes,
            queue_write,
            queue_write_failures,
            tls_handshakes,
            delivery_tls_fallbacks,
            auth_failures,
            auth_lockouts,
            auth_refused,
        }
    }

    /// One AUTH attempt with wrong credentials.
    pub fn auth_failure(&self) {
        self.auth_failures.inc();
    }

    /// A lockout began; `scope` is `address` or `user`.
    pub fn auth_lockout(&self, scope: &'static str) {
        self.auth_lockouts
            .get_or_create(&label("scope", scope))
            .inc();
    }

    /// An AUTH attempt refused unchecked; `reason` is `locked` or `store_unavailable`.
    pub fn auth_refused(&self, reason: &'static str) {
        self.auth_refused
            .get_or_create(&label("reason", reason))
            .inc();
    }

    pub fn connection_opened(&self, listener: &str) {
        self.listener_connections(listener).inc();
        self.connections_active.inc();
    }

    fn listener_connections(&self, listener: &str) -> Counter {
        /// Listeners are few; names past this many go through the family each time.
        const CACHED: usize = 8;
        let cached = |v: &[(String, Counter)]| {
            v.iter()
                .find(|(n, _)| n == listener)
                .map(|(_, c)| c.clone())
        };
        if let Some(c) = cached(&self.listener_counters.read().unwrap()) {
            return c;
        }
        let c = self
            .connections
            .get_or_create(&bounded("listener", listener))
            .clone();
        let mut w = self.listener_counters.write().unwrap();
        if w.len() < CACHED && cached(&w).is_none() {
            w.push((listener.to_owned(), c.clone()));
        }
        c
    }

    /// Call once for every [`Metrics::connection_opened`].
    pub fn connection_closed(&self) {
        self.connections_active.dec();
    }

    pub fn connection_refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&bounded("reason", reason))
            .inc();
    }

    /// An idle session was closed to admit a client; `reason` is the limit reached.
    pub fn connection_evicted(&self, reason: &str) {
        self.connections_evicted
            .get_or_create(&bounded("reason", reason))
            .inc();
    }

    /// `verb` as the SMTP layer names it (`EHLO`, `MAIL`, …, `UNKNOWN`).
    pub fn command(&self, verb: &str) {
        // The session names verbs by these very constants: an exact match is a
        // word compare each, where a case-blind scan of the list cost ~200
        // instructions per command.
        let i = match verb {
            "EHLO" => 0,
            "HELO" => 1,
            "MAIL" => 2,
            "RCPT" => 3,
            "DATA" => 4,
            "BDAT" => 5,
            "RSET" => 6,
            "QUIT" => 8,
            _ => VERBS
                .iter()
                .position(|v| v.eq_ignore_ascii_case(verb))
                .unwrap_or(UNKNOWN_VERB),
        };
        debug_assert!(VERBS[i].eq_ignore_ascii_case(verb) || i == UNKNOWN_VERB);
        self.command_counters[i]
            .get_or_init(|| {
                self.commands
                    .get_or_create(&label("command", VERBS[i]))
                    .clone()
            })
            .inc();
    }

    /// A message of `bytes` bytes was queued and acknowledged to the client.
    pub fn accepted(&self, bytes: u64) {
        self.messages_accepted.inc();
        self.received_bytes.inc_by(bytes);
    }

    pub fn sender_refused(&self, reason: &'static str) {
        self.sender_refused
            .get_or_create(&label("reason", reason))
            .inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.messages_rejected
            .get_or_create(&bounded("reason", reason))
            .inc();
    }

    /// One message write; `failure` is `None` when it stored the message, else one of
    /// `full`, `unavailable`, `timeout`.
    pub fn queue_write(&self, elapsed: Duration, failure: Option<&str>) {
        self.queue_write.observe(elapsed.as_secs_f64());
        if let Some(reason) = failure {
            let reason = QUEUE_FAILURES
                .iter()
                .find(|r| **r == reason)
                .copied()
                .unwrap_or("unavailable");
            self.queue_write_failures
                .get_or_create(&label("reason", reason))
                .inc();
        }
    }

    pub fn tls_handshake(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.tls_handshakes
            .get_or_create(&label("result", result))
            .inc();
    }

    /// One recipient's delivery attempt ended: `result` is `delivered`, `deferred`
    /// or `bounced`, `reason` one of [`DELIVERY_REASONS`] (others count as `other`).
    pub fn delivery_result(&self, result: &str, reason: &str) {
        if result == "delivered" && reason == "ok" {
            self.delivered_ok.inc();
            return;
        }
        let result = RESULTS
            .iter()
            .find(|r| **r == result)
            .copied()
            .unwrap_or("deferred");
        let reason = DELIVERY_REASONS
            .iter()
            .find(|r| **r == reason)
            .copied()
            .unwrap_or("other");
        self.delivery_recipients
            .get_or_create(&[("result", result), ("reason", reason)])
            .inc();
    }

    /// Arrival-to-delivery time of a delivered recipient.
    pub fn delivery_latency(&self, elapsed: Duration) {
        self.delivery_latency.observe(elapsed.as_secs_f64());
    }

    /// A batch of `messages` delivery outcomes was written (`failed`: the store
    /// refused it), triggered by `trigger` (size, interval, shutdown).
    pub fn outcome_flush(&self, trigger: &'static str, messages: usize, failed: bool) {
        self.outcome_flushes
            .get_or_create(&label("trigger", trigger))
            .inc();
        if failed {
            self.outcome_flush_failures.inc();
        } else {
            self.outcomes_flushed.inc_by(messages as u64);
        }
    }

    /// A recipient's failure (`deferred` or `bounced`) with its bounce category
    /// (a name of `events::classify::Category`).
    pub fn delivery_failure(&self, result: &'static str, category: &'static str) {
        self.delivery_failures
            .get_or_create(&[("result", result), ("category", category)])
            .inc();
    }

    /// A recipient found suppressed at `RCPT`: `rejected`, `dropped`, or
    /// `check_failed` when the store could not answer.
    pub fn suppressed(&self, action: &'static str) {
        self.suppression_hits
            .get_or_create(&label("action", action))
            .inc();
    }

    /// A recipient listed after a bounce of `category` (or `add_failed`).
    pub fn suppression_added(&self, category: &'static str) {
        self.suppression_added
            .get_or_create(&label("category", category))
            .inc();
    }

    /// Opportunistic TLS to a next hop failed; delivery goes on in plain text.
    pub fn tls_fallback(&self) {
        self.delivery_tls_fallbacks.inc();
    }

    pub fn outbound_connection_opened(&self) {
        self.delivery_connections_active.inc();
    }

    /// Call once for every [`Metrics::outbound_connection_opened`].
    pub fn outbound_connection_closed(&self) {
        self.delivery_connections_active.dec();
    }

    /// The registry, for families kept elsewhere (quota checks, egress pacing) to
    /// register into, so that one exposition carries them all. Only before the
    /// `Metrics` is shared: registering takes `&mut`.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The complete OpenMetrics exposition (ending in `# EOF`).
    pub fn encode(&self) -> String {
        self.encode_with_queue_stats(None)
    }

    /// Like [`Metrics::encode`], plus `mailrelay_queue_messages` and
    /// `mailrelay_queue_bytes` when the queue reported its size. They are gauges
    /// read at scrape time rather than kept here, because other relay processes
    /// change the same queue.
    pub fn encode_with_queue_stats(&self, stats: Option<QueueStats>) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(stats) = stats {
            let mut queue = Registry::with_prefix(PREFIX);
            let messages = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
            messages.set(stats.messages);
            queue.register(
                "queue_messages",
                "Messages in the queue (all relay processes sharing it)",
                messages,
            );
            let bytes = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
            bytes.set(stats.bytes);
            queue.register_with_unit(
                "queue",
                "Bytes of queued message bodies (all relay processes sharing it)",
                Unit::Bytes,
                bytes,
            );
            for (name, help, value) in [
                (
                    "queue_leased",
                    "Queued messages currently leased to a delivery worker",
                    stats.leased,
                ),
                (
                    "queue_deferred",
                    "Queued messages that have had at least one delivery attempt",
                    stats.deferred,
                ),
            ] {
                let g = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
                g.set(value);
                queue.register(name, help, g);
            }
            let oldest = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            oldest.set(stats.oldest_ms.map_or(0.0, |ms| {
                crate::queue::now_ms().saturating_sub(ms) as f64 / 1000.0
            }));
            queue.register_with_unit(
                "queue_oldest_age",
                "Age of the oldest queued message (0 when the queue is empty)",
                Unit::Seconds,
                oldest,
            );
            let _ = encode_registry(&mut out, &queue);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

fn label(name: &'static str, value: &'static str) -> Label {
    [(name, Cow::Borrowed(value))]
}

fn bounded(name: &'static str, value: &str) -> Label {
    let ok = !value.is_empty()
        && value.len() <= 48
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        [(name, Cow::Owned(value.to_owned()))]
    } else {
        label(name, "other")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn every_family_is_exposed_with_its_openmetrics_name() {
        let m = Metrics::new();
        m.connection_opened("smtp");
        m.connection_refused("too_many_connections");
        m.command("EHLO");
        m.accepted(100);
        m.rejected("relay_denied");
        m.queue_write(Duration::from_millis(3), None);
        m.tls_handshake(true);
        let text = m.encode();
        for family in [
            "mailrelay_smtp_connections counter",
            "mailrelay_smtp_connections_active gauge",
            "mailrelay_smtp_connections_refused counter",
            "mailrelay_smtp_commands counter",
            "mailrelay_smtp_messages_accepted counter",
            "mailrelay_smtp_messages_rejected counter",
            "mailrelay_smtp_received_bytes counter",
            "mailrelay_queue_write_seconds histogram",
            "mailrelay_queue_write_failures counter",
            "mailrelay_tls_handshakes counter",
            "mailrelay_delivery_tls_fallbacks counter",
            "mailrelay_delivery_recipients counter",
            "mailrelay_delivery_seconds histogram",
            "mailrelay_delivery_connections_active gauge",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family}\n")),
                "{family} missing:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            !text.contains("mailrelay_queue_messages"),
            "no queue stats given"
        );
    }

    #[test]
    fn every_verb_counts_under_its_own_name_in_any_case() {
        let m = Metrics::new();
        for v in VERBS {
            m.command(v);
            m.command(&v.to_ascii_lowercase());
        }
        let text = m.encode();
        for v in VERBS {
            let line = format!("mailrelay_smtp_commands_total{{command=\"{v}\"}} 2");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn recording_updates_the_right_series() {
        let m = Metrics::new();
        m.connection_opened("smtp");
        m.connection_opened("smtp");
        m.connection_opened("submission");
        m.connection_closed();
        m.command("MAIL");
        m.command("mail");
        m.command("XYZZY");
        m.command("UNKNOWN");
        m.accepted(1000);
        m.accepted(24);
        m.queue_write(Duration::from_micros(200), None);
        m.queue_write(Duration::from_secs(20), Some("timeout"));
        m.queue_write(Duration::from_millis(2), Some("full"));
        m.queue_write(Duration::from_millis(2), Some("full"));
        m.queue_write(Duration::from_millis(2), Some("anything else"));
        m.tls_handshake(false);
        let text = m.encode();
        let expect = [
            "mailrelay_smtp_connections_total{listener=\"smtp\"} 2",
            "mailrelay_smtp_connections_total{listener=\"submission\"} 1",
            "mailrelay_smtp_connections_active 2",
            "mailrelay_smtp_commands_total{command=\"MAIL\"} 2",
            "mailrelay_smtp_commands_total{command=\"UNKNOWN\"} 2",
            "mailrelay_smtp_messages_accepted_total 2",
            "mailrelay_smtp_received_bytes_total 1024",
            "mailrelay_queue_write_seconds_count 5",
            "mailrelay_queue_write_seconds_bucket{le=\"0.0005\"} 1",
            "mailrelay_queue_write_seconds_bucket{le=\"10.0\"} 4",
            "mailrelay_queue_write_seconds_bucket{le=\"+Inf\"} 5",
            "mailrelay_queue_write_failures_total{reason=\"timeout\"} 1",
            "mailrelay_queue_write_failures_total{reason=\"full\"} 2",
            "mailrelay_queue_write_failures_total{reason=\"unavailable\"} 1",
            "mailrelay_tls_handshakes_total{result=\"ok\"} 0",
            "mailrelay_tls_handshakes_total{result=\"error\"} 1",
        ];
        for e in expect {
            assert!(text.lines().any(|l| l == e), "{e:?} missing:\n{text}");
        }
        assert!(!text.contains("XYZZY"));
    }

    #[test]
    fn free_form_labels_are_bounded() {
        let m = Metrics::new();
        m.rejected("size_exceeded");
        m.rejected("550 5.7.1 <evil@example.com>: Relay access denied");
        m.connection_refused(&"x".repeat(200));
        m.connection_opened("");
        let text = m.encode();
        assert!(
            line(
                &text,
                "mailrelay_smtp_messages_rejected_total{reason=\"size_exceeded\"} 1"
            )
            .is_some()
        );
        assert!(
            line(
                &text,
                "mailrelay_smtp_messages_rejected_total{reason=\"other\"} 1"
            )
            .is_some()
        );
        assert!(
            line(
                &text,
                "mailrelay_smtp_connections_refused_total{reason=\"other\"} 1"
            )
            .is_some()
        );
        assert!(
            line(
                &text,
                "mailrelay_smtp_connections_total{listener=\"other\"} 1"
            )
            .is_some()
        );
        assert!(!text.contains("evil"));
    }

    #[test]
    fn queue_stats_are_appended_before_eof() {
        let m = Metrics::new();
        let text = m.encode_with_queue_stats(Some(QueueStats {
            messages: 7,
            bytes: 4096,
            ..Default::default()
        }));
        assert!(
            text.contains("# TYPE mailrelay_queue_messages gauge\nmailrelay_queue_messages 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT mailrelay_queue_bytes bytes\n"),
            "{text}"
        );
        assert!(text.contains("\nmailrelay_queue_bytes 4096\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn delivery_metrics_have_bounded_labels() {
        let m = Metrics::new();
        m.delivery_result("delivered", "ok");
        m.delivery_result("deferred", "remote_4xx");
        m.delivery_result("deferred", "remote_4xx");
        m.delivery_result("bounced", "550 5.1.1 <evil@example.com> unknown");
        m.delivery_latency(Duration::from_secs(3));
        m.outbound_connection_opened();
        m.outbound_connection_opened();
        m.outbound_connection_closed();
        let text = m.encode_with_queue_stats(Some(QueueStats {
            messages: 2,
            bytes: 10,
            leased: 1,
            deferred: 1,
            oldest_ms: Some(crate::queue::now_ms() - 5000),
        }));
        for e in [
            "mailrelay_delivery_recipients_total{result=\"delivered\",reason=\"ok\"} 1",
            "mailrelay_delivery_recipients_total{result=\"deferred\",reason=\"remote_4xx\"} 2",
            "mailrelay_delivery_recipients_total{result=\"bounced\",reason=\"other\"} 1",
            "mailrelay_delivery_seconds_count 1",
            "mailrelay_delivery_connections_active 1",
            "mailrelay_queue_leased 1",
            "mailrelay_queue_deferred 1",
        ] {
            assert!(text.lines().any(|l| l == e), "{e:?} missing:\n{text}");
        }
        assert!(text.contains("# TYPE mailrelay_queue_oldest_age_seconds gauge"));
        let age: f64 = line(&text, "mailrelay_queue_oldest_age_seconds ")
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((4.0..60.0).contains(&age), "{age}");
        assert!(!text.contains("evil"));
    }

    #[test]
    fn shared_across_threads() {
        let m = std::sync::Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.command("RCPT");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            m.encode()
                .contains("mailrelay_smtp_commands_total{command=\"RCPT\"} 4000\n")
        );
    }
}
