//! Webhooks: each configured endpoint receives the events of its tenants as
//! CloudEvents-style JSON, signed with HMAC-SHA256, at least once, in order.
//!
//! # One consumer per endpoint, reading the event store
//!
//! Each endpoint has its own task and its own cursor in the event store, so a
//! slow or dead endpoint holds back only its own events: mail never waits for a
//! webhook (events are written by the mail path; consumers only read), and other
//! endpoints read on at their own pace.
//!
//! - **Redis**: a consumer group per endpoint on the events stream, used as the
//!   endpoint's cursor. Exactly one pod delivers an endpoint's events at a time:
//!   it holds the endpoint's lease key (`SET NX PX`, renewed every third of its
//!   length while it works, not per batch). The holder reads with a plain
//!   `XRANGE` from the group's `last-delivered-id` and, once a batch is done,
//!   moves that cursor with one `XGROUP SETID`: two commands per batch, and no
//!   pending entry per event for Redis to add and take out again. When it takes
//!   the lease, a holder first finishes the group's pending entries
//!   (`XAUTOCLAIM` … `XACK`): events a relay read with `XREADGROUP` (older
//!   versions read that way) and did not finish. A holder that dies before it
//!   moved the cursor leaves its batch to the next holder, which sends it again.
//!   One holder delivering in stream order is what keeps one message's events in
//!   order.
//! - **Embedded**: the endpoint's cursor (the last event done) is a row in the
//!   queue's redb file, committed after each batch.
//!
//! An event is acknowledged only after the endpoint answered `2xx` (or after it
//! was dead-lettered), so a relay killed mid-way sends it again after the restart:
//! at least once. Receivers dedupe by the event's `id` (in a batch, each element's).
//!
//! # Batches
//!
//! With `batch.max_events` above 1 (the default is 100) a POST carries up to that
//! many events as a CloudEvents batch: a JSON array of the envelopes, in store
//! order, `Content-Type: application/cloudevents-batch+json`. After a POST that
//! was not full, the consumer waits `batch.linger` before it reads again, so that
//! events gather into fuller POSTs. `max_events: 1` sends each event alone as
//! `application/cloudevents+json` (structured mode), as before batching existed.
//! The stored event is not decoded and encoded again: the envelope's `data` is the
//! stored JSON with the store's `id` put in front.
//!
//! # Retries
//!
//! A failed POST (no connection, timeout, any non-2xx answer) is tried again, the
//! same body, after `retry.initial`, doubling up to `retry.max`; after
//! `retry.max_attempts` tries its events are dead-lettered: counted
//! (`mailrelay_webhook_dead_letters_total` and, with Redis, the key
//! `<prefix>:events:hook:<name>:dead`, both in events) and skipped, so the
//! endpoint's later events flow again. While a POST is retried the endpoint's
//! later events wait (order per message), and only those.
//!
//! # Signature
//!
//! As in the Standard Webhooks scheme (Svix): headers `webhook-id` (the event ID;
//! for a batch of several, `<first ID>..<last ID>`), `webhook-timestamp` (Unix
//! seconds) and `webhook-signature: v1,<base64 of HMAC-SHA256(key,
//! "<webhook-id>.<timestamp>.<body>")>` over the whole body. The key is the
//! configured secret's bytes. Receivers should refuse timestamps more than a few
//! minutes off.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use mailrelay_admin_api::events::EventKind;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use redb::{Durability, ReadableDatabase, ReadableTable};
use redis::Value;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite};

use super::log::{
    CURSORS, EVENTS, EmbeddedEvents, EventError, EventStore, RedisEvents, parse_id,
    parse_raw_entries,
};
use crate::config::WebhookConfig;
use crate::config::events::WebhookUrl;

/// The system's CA bundle (Debian's path), used when `ca_file` is not set.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Events read from the store at a time (more when `batch.max_events` is larger).
const BATCH: usize = 100;
/// `Content-Type` of one event (CloudEvents structured mode).
const SINGLE: &str = "application/cloudevents+json";
/// `Content-Type` of a JSON array of events (CloudEvents batched mode).
const BATCHED: &str = "application/cloudevents-batch+json";
/// How long an idle consumer waits before it looks for new events again.
const POLL: Duration = Duration::from_millis(200);
/// An endpoint's lease (Redis): renewed at a third of this while held.
const LEASE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks[{index}] ({name}): {message}")]
    Setup {
        index: usize,
        name: String,
        message: String,
    },
}

type Label = [(&'static str, String); 1];
type ResultLabel = [(&'static str, String); 2];

/// Counters per endpoint (names are bounded by the config).
#[derive(Clone, Default)]
pub struct WebhookMetrics {
    /// POSTs by endpoint and result (`ok`, `failed`).
    posts: Family<ResultLabel, Counter>,
    delivered: Family<Label, Counter>,
    dead: Family<Label, Counter>,
    /// Events read and not yet acknowledged (being delivered or retried).
    pending: Family<Label, Gauge>,
}

impl WebhookMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = WebhookMetrics::default();
        registry.register(
            "webhook_posts",
            "Webhook POSTs by endpoint and result (ok: 2xx; failed: anything else, retried)",
            m.posts.clone(),
        );
        registry.register(
            "webhook_events_delivered",
            "Events a webhook endpoint acknowledged with 2xx",
            m.delivered.clone(),
        );
        registry.register(
            "webhook_dead_letters",
            "Events given up on after retry.max_attempts failed tries of their POST",
            m.dead.clone(),
        );
        registry.register(
            "webhook_pending_events",
            "Events read for an endpoint and not yet done (delivered or dead-lettered)",
            m.pending.clone(),
        );
        m
    }

    fn label(name: &str) -> Label {
        [("endpoint", name.to_owned())]
    }

    fn post(&self, name: &str, ok: bool) {
        self.posts
            .get_or_create(&[
                ("endpoint", name.to_owned()),
                ("result", if ok { "ok" } else { "failed" }.to_owned()),
            ])
            .inc();
    }

    /// Failed POSTs of `name` so far (tests).
    pub fn failed_posts(&self, name: &str) -> u64 {
        self.posts
            .get_or_create(&[
                ("endpoint", name.to_owned()),
                ("result", "failed".to_owned()),
            ])
            .get()
    }

    pub fn delivered(&self, name: &str) -> u64 {
        self.delivered.get_or_create(&Self::label(name)).get()
    }
}

/// The running consumers; they stop when this is dropped.
pub struct Webhooks {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Webhooks {
    /// Starts one consumer per endpoint. `source` names this relay in the
    /// envelope; `owner` names this process in consumer groups and leases.
    /// Reads secret and CA files: an error names the endpoint.
    pub async fn start(
        hooks: &[WebhookConfig],
        store: EventStore,
        source: &str,
        owner: &str,
        metrics: WebhookMetrics,
    ) -> Result<Webhooks, WebhookError> {
        let mut tasks = Vec::new();
        for (index, cfg) in hooks.iter().enumerate() {
            let setup = |message: String| WebhookError::Setup {
                index,
                name: cfg.name.clone(),
                message,
            };
            let endpoint = Endpoint::new(cfg, source).map_err(setup)?;
            let feed = match &store {
                EventStore::Redis(r) => {
                    Feed::Redis(Box::new(RedisFeed::new(r.clone(), &cfg.name, owner)))
                }
                EventStore::Embedded(e) => Feed::Embedded(
                    EmbeddedFeed::new(e.clone(), &cfg.name).map_err(|e| setup(e.to_string()))?,
                ),
            };
            if let Feed::Redis(f) = &feed {
                f.create_group().await.map_err(|e| setup(e.to_string()))?;
            }
            tracing::info!(webhook = %cfg.name, url = %cfg.url, store = store.backend(), "webhook consumer started");
            tasks.push(tokio::spawn(run(endpoint, feed, metrics.clone())));
        }
        Ok(Webhooks { tasks })
    }
}

// ------------------------------------------------------------ the endpoint

struct Endpoint {
    cfg: WebhookConfig,
    url: WebhookUrl,
    /// `host:port` as the `Host` header and the connect address want it.
    host: String,
    key: ring::hmac::Key,
    tls: Option<tokio_rustls::TlsConnector>,
    /// The envelope's `source`, as a JSON string.
    source_json: Vec<u8>,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Endpoint {
    fn new(cfg: &WebhookConfig, source: &str) -> Result<Self, String> {
        let url = cfg.parsed_url()?;
        let secret = match (&cfg.secret, &cfg.secret_file) {
            (Some(s), _) => s.0.trim().to_owned(),
            (None, Some(p)) => std::fs::read_to_string(p)
                .map_err(|e| format!("secret_file {}: {e}", p.display()))?
                .trim()
                .to_owned(),
            (None, None) => return Err("no secret".into()),
        };
        if secret.is_empty() {
            return Err("the secret is empty".into());
        }
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let tls = if url.https {
            let path = cfg.ca_file.clone().unwrap_or_else(|| SYSTEM_CA_FILE.into());
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("ca_file {}: no certificates", path.display()));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        let host = if url.host.contains(':') {
            format!("[{}]:{}", url.host, url.port)
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let mut source_json = Vec::new();
        json_str(&mut source_json, source);
        Ok(Endpoint {
            cfg: cfg.clone(),
            url,
            host,
            key,
            tls,
            source_json,
            conn: None,
        })
    }

    fn wants(&self, e: &Stored) -> bool {
        self.cfg.wants(e.kind.as_str())
            && self.cfg.tenants.matches(e.auth_user.as_deref(), &e.sender)
    }

    /// Whether POSTs carry a JSON array of events.
    fn batched(&self) -> bool {
        self.cfg.batch.max_events > 1
    }

    /// The CloudEvents envelope of `e`. Keys in the order the relay wrote them
    /// when it built the envelope as a JSON map (sorted).
    fn write_envelope(&self, out: &mut Vec<u8>, e: &Stored) {
        out.extend_from_slice(b"{\"data\":");
        e.write_data(out);
        out.extend_from_slice(b",\"datacontenttype\":\"application/json\",\"id\":");
        json_str(out, &e.id);
        out.extend_from_slice(b",\"source\":");
        out.extend_from_slice(&self.source_json);
        out.extend_from_slice(b",\"specversion\":\"1.0\",\"subject\":");
        json_str(out, &e.queue_id);
        out.extend_from_slice(b",\"time\":\"");
        write_time(out, e.at_ms);
        out.extend_from_slice(b"\",\"type\":\"io.mailrelay.");
        out.extend_from_slice(e.kind.as_str().as_bytes());
        out.extend_from_slice(b"\"}");
    }

    /// The body of one POST: the envelope of the one event, or (batched) the JSON
    /// array of the envelopes of `events`.
    fn body(&self, events: &[&Stored]) -> Vec<u8> {
        let size = events.iter().map(|e| e.json.len() + 256).sum::<usize>() + 2;
        let mut out = Vec::with_capacity(size);
        let batched = self.batched();
        if batched {
            out.push(b'[');
        }
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            self.write_envelope(&mut out, e);
        }
        if batched {
            out.push(b']');
        }
        out
    }

    /// One POST of `body` (signed as `id`); `Err` says why it did not get a 2xx.
    async fn post(&mut self, id: &str, body: &Bytes) -> Result<(), String> {
        let ts = (crate::queue::now_ms() / 1000).to_string();
        let signature = sign(&self.key, id, &ts, body);
        let req = hyper::Request::builder()
            .method("POST")
            .uri(&self.url.path)
            .header(hyper::header::HOST, &self.host)
            .header(
                hyper::header::CONTENT_TYPE,
                if self.batched() { BATCHED } else { SINGLE },
            )
            .header(hyper::header::USER_AGENT, "mailrelay-webhook")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts)
            .header("webhook-signature", signature)
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        let timeout = self.cfg.timeout;
        match tokio::time::timeout(timeout, self.send(req)).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }

    async fn send(&mut self, req: hyper::Request<Full<Bytes>>) -> Result<(), String> {
        let reusable = match &mut self.conn {
            Some(c) => c.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            self.conn = Some(self.connect().await?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let resp = match conn.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                return Err(format!("request failed: {e}"));
            }
        };
        let status = resp.status();
        // Read (and bound) the answer so the connection can carry the next POST.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
        let host = self.host.as_str();
        let tcp = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("connect {host}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some(tls) => {
                let name = ServerName::try_from(self.url.host.clone())
                    .map_err(|e| format!("server name {}: {e}", self.url.host))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}: {e}"))?;
                handshake(stream).await
            }
        }
    }
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

// ------------------------------------------------------------ stored events

/// One event as a consumer reads it from the store: its ID, the stored JSON as it
/// is (the envelope's `data` is made from it without decoding and encoding the
/// event again), and the few fields the consumer decides by.
struct Stored {
    id: String,
    json: Vec<u8>,
    kind: EventKind,
    at_ms: u64,
    queue_id: String,
    sender: String,
    auth_user: Option<String>,
    /// The stored JSON already carries an `id` (not written by this relay): it is
    /// passed on as it is.
    has_id: bool,
}

/// What [`Stored`] reads of an event; every other field is skipped unread.
#[derive(serde::Deserialize)]
struct Head<'a> {
    kind: EventKind,
    at_ms: u64,
    #[serde(borrow)]
    queue_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    sender: std::borrow::Cow<'a, str>,
    #[serde(default)]
    auth_user: Option<String>,
    #[serde(default)]
    id: Option<serde::de::IgnoredAny>,
}

impl Stored {
    fn parse(id: String, json: Vec<u8>) -> Result<Stored, EventError> {
        if let Some(head) = FastHead::read(&json) {
            let (kind, at_ms) = (head.kind, head.at_ms);
            let queue_id = head.queue_id.to_owned();
            let sender = head.sender.to_owned();
            let auth_user = head.auth_user.map(str::to_owned);
            return Ok(Stored {
                id,
                json,
                kind,
                at_ms,
                queue_id,
                sender,
                auth_user,
                has_id: false,
            });
        }
        Self::parse_any(id, json)
    }

    /// Any JSON object with the fields [`Head`] needs (what [`FastHead`] does
    /// not take).
    fn parse_any(id: String, json: Vec<u8>) -> Result<Stored, EventError> {
        let head: Head = serde_json::from_slice(&json)
            .map_err(|e| EventError::Corrupt(format!("event {id}: {e}")))?;
        let (kind, at_ms, has_id) = (head.kind, head.at_ms, head.id.is_some());
        let (queue_id, sender, auth_user) = (
            head.queue_id.into_owned(),
            head.sender.into_owned(),
            head.auth_user,
        );
        Ok(Stored {
            id,
            json,
            kind,
            at_ms,
            queue_id,
            sender,
            auth_user,
            has_id,
        })
    }

    /// The event as the admin API shows it (`data`): the stored object with the
    /// store's `id` put first, as [`mailrelay_admin_api::Event`] serializes it.
    fn write_data(&self, out: &mut Vec<u8>) {
        let body = self.json.trim_ascii();
        match body.strip_prefix(b"{") {
            Some(rest) if !self.has_id => {
                out.extend_from_slice(b"{\"id\":");
                json_str(out, &self.id);
                out.push(b',');
                out.extend_from_slice(rest);
            }
            _ => out.extend_from_slice(body),
        }
    }
}

/// [`Head`] read straight from an event as this relay writes it (the fields in
/// [`mailrelay_admin_api::Event`]'s order, no whitespace, no `id`, no escapes in
/// the strings it takes): a few byte compares instead of a JSON parse of the
/// whole event. Anything else (`None`) goes to serde, which gives the same
/// answer.
struct FastHead<'a> {
    kind: EventKind,
    at_ms: u64,
    queue_id: &'a str,
    sender: &'a str,
    auth_user: Option<&'a str>,
}

impl<'a> FastHead<'a> {
    fn read(json: &'a [u8]) -> Option<FastHead<'a>> {
        let mut r = Reader { s: json, at: 0 };
        r.eat(b"{\"kind\":")?;
        let kind = EventKind::parse(r.plain_str()?)?;
        r.eat(b",\"at_ms\":")?;
        let at_ms = r.number()?;
        r.eat(b",\"queue_id\":")?;
        let queue_id = r.plain_str()?;
        if r.eat(b",\"message_id\":").is_some() {
            r.skip_str()?;
        }
        r.eat(b",\"sender\":")?;
        let sender = r.plain_str()?;
        if r.eat(b",\"recipient\":").is_some() {
            r.skip_str()?;
        }
        let auth_user = match r.eat(b",\"auth_user\":") {
            Some(()) => Some(r.plain_str()?),
            None => None,
        };
        r.eat(b",\"tenant\":")?;
        // Nothing further may be an `id` (then serde decides), and the object must
        // end as a JSON object does.
        let rest = &json[r.at..];
        if memchr::memmem::find(rest, b"\"id\"").is_some() || rest.last() != Some(&b'}') {
            return None;
        }
        Some(FastHead {
            kind,
            at_ms,
            queue_id,
            sender,
            auth_user,
        })
    }
}

/// A cursor over the bytes [`FastHead`] reads.
struct Reader<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn eat(&mut self, lit: &[u8]) -> Option<()> {
        if self.s[self.at..].starts_with(lit) {
            self.at += lit.len();
            Some(())
        } else {
            None
        }
    }

    /// A JSON string without escapes (a backslash: `None`), as its text.
    fn plain_str(&mut self) -> Option<&'a str> {
        self.eat(b"\"")?;
        let rest = &self.s[self.at..];
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        if rest[end] != b'"' {
            return None;
        }
        let text = std::str::from_utf8(&rest[..end]).ok()?;
        if text.bytes().any(|b| b < 0x20) {
            return None;
        }
        self.at += end + 1;
        Some(text)
    }

    /// Steps over a JSON string, escapes and all.
    fn skip_str(&mut self) -> Option<()> {
        self.eat(b"\"")?;
        loop {
            let rest = &self.s[self.at..];
            let i = memchr::memchr2(b'"', b'\\', rest)?;
            if rest[i] == b'"' {
                self.at += i + 1;
                return Some(());
            }
            // A backslash and the character it escapes.
            self.at += i + 2;
            if self.at > self.s.len() {
                return None;
            }
        }
    }

    fn number(&mut self) -> Option<u64> {
        let rest = &self.s[self.at..];
        let len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 || len > 19 || (len > 1 && rest[0] == b'0') {
            return None;
        }
        let n = std::str::from_utf8(&rest[..len]).ok()?.parse().ok()?;
        self.at += len;
        Some(n)
    }
}

/// `s` as a JSON string.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

// ----------------------------------------------------------------- feeds

enum Feed {
    // One per endpoint, for the process's life: its size does not matter.
    Redis(Box<RedisFeed>),
    Embedded(EmbeddedFeed),
}

impl Feed {
    /// The next events to deliver, at most `n` (empty: nothing new, or not ours
    /// to deliver).
    async fn next(&mut self, n: usize) -> Result<Vec<Stored>, EventError> {
        match self {
            Feed::Redis(f) => f.next(n).await,
            Feed::Embedded(f) => f.next(n).await,
        }
    }

    /// Done with `events` (delivered or dead-lettered).
    async fn ack(&mut self, events: &[Stored]) -> Result<(), EventError> {
        match self {
            Feed::Redis(f) => f.ack(events).await,
            Feed::Embedded(f) => f.ack(events).await,
        }
    }

    async fn dead_letter(&mut self, events: usize) {
        if let Feed::Redis(f) = self {
            let mut cmd = redis::cmd("INCRBY");
            cmd.arg(format!("{}:hook:{}:dead", f.events.key(), f.name))
                .arg(events);
            let _ = f.events.redis().query::<i64>(&cmd).await;
        }
    }

    /// Whether this process may still deliver (Redis: it holds the endpoint's lease).
    async fn still_held(&mut self) -> bool {
        match self {
            Feed::Redis(f) => f.hold().await.unwrap_or(false),
            Feed::Embedded(_) => true,
        }
    }
}

struct RedisFeed {
    events: RedisEvents,
    name: String,
    group: String,
    owner: String,
    lease_key: String,
    lease_script: redis::Script,
    /// When this process last confirmed it holds the lease (taken before the call,
    /// so the lease runs at least `LEASE` from then); `None` while not held.
    held_since: Option<tokio::time::Instant>,
    /// The last event done: the group's `last-delivered-id`, read when the lease is
    /// taken and advanced by this holder's acknowledgements.
    cursor: Option<String>,
    /// The group may hold pending entries (read by a consumer that did not finish
    /// them: a holder before this one, or an acknowledgement that failed), which go
    /// first. True until `XAUTOCLAIM` finds none.
    claim: bool,
    /// The last batch came from the pending entries (acknowledged with `XACK`)
    /// rather than from the cursor on (acknowledged by moving the cursor).
    claimed: bool,
}

/// Takes the lease if free, or renews it if ours: 1 when held after the call.
const LEASE_LUA: &str = include_str!("lua/webhook_lease.lua");

/// Every script by name (for the Lua lint).
pub fn lua_scripts() -> Vec<(&'static str, String)> {
    vec![("webhook_lease", LEASE_LUA.to_owned())]
}

impl RedisFeed {
    fn new(events: RedisEvents, name: &str, owner: &str) -> Self {
        let lease_key = format!("{}:hook:{name}:lease", events.key());
        RedisFeed {
            events,
            name: name.to_owned(),
            group: format!("hook:{name}"),
            owner: owner.to_owned(),
            lease_key,
            lease_script: redis::Script::new(LEASE_LUA),
            held_since: None,
            cursor: None,
            claim: true,
            claimed: false,
        }
    }

    /// The endpoint's consumer group, starting at the newest event when new.
    async fn create_group(&self) -> Result<(), EventError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(self.events.key())
            .arg(&self.group)
            .arg("$")
            .arg("MKSTREAM");
        match self.events.redis().query::<()>(&cmd).await {
            Ok(()) => Ok(()),
            Err(e) if e.contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(EventError::Unavailable(e)),
        }
    }

    /// Takes or renews the lease. A holder that is (or becomes) new starts over
    /// from what Redis says: the group's pending entries, then its cursor.
    async fn hold(&mut self) -> Result<bool, EventError> {
        let asked = tokio::time::Instant::now();
        let mut inv = self.lease_script.prepare_invoke();
        inv.key(&self.lease_key)
            .arg(&self.owner)
            .arg(LEASE.as_millis() as u64);
        let held: i64 = match self.events.redis().invoke(&inv).await {
            Ok(h) => h,
            Err(e) => {
                self.lost();
                return Err(EventError::Unavailable(e));
            }
        };
        if held != 1 {
            self.lost();
            return Ok(false);
        }
        if self.held_since.is_none() {
            self.cursor = None;
            self.claim = true;
        }
        self.held_since = Some(asked);
        Ok(true)
    }

    fn lost(&mut self) {
        self.held_since = None;
        self.cursor = None;
    }

    /// Whether the lease is known held for a while yet (confirmed less than a
    /// third of its length ago), so a batch needs no renewal round trip of its own.
    fn fresh(&self) -> bool {
        self.held_since.is_some_and(|t| t.elapsed() < LEASE / 3)
    }

    /// The group's `last-delivered-id` (`XINFO GROUPS`).
    async fn load_cursor(&self) -> Result<String, EventError> {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(self.events.key());
        let reply: Value = self
            .events
            .redis()
            .query(&cmd)
            .await
            .map_err(EventError::Unavailable)?;
        let corrupt = |what: &str| EventError::Corrupt(format!("XINFO GROUPS: {what}"));
        let Value::Array(groups) = reply else {
            return Err(corrupt("not an array"));
        };
        for g in groups {
            // RESP2: [name, v, consumers, v, …]; RESP3: a map.
            let pairs: Vec<(Value, Value)> = match g {
                Value::Array(flat) => {
                    let mut it = flat.into_iter();
                    std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
                }
                Value::Map(m) => m,
                _ => continue,
            };
            let field = |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| value_text(k).as_deref() == Some(name))
                    .and_then(|(_, v)| value_text(v))
            };
            if field("name").as_deref() == Some(self.group.as_str()) {
                return field("last-delivered-id").ok_or_else(|| corrupt("no last-delivered-id"));
            }
        }
        Err(EventError::Unavailable(format!(
            "no consumer group {} on {} (the events stream was deleted?)",
            self.group,
            self.events.key()
        )))
    }

    async fn next(&mut self, n: usize) -> Result<Vec<Stored>, EventError> {
        if !self.fresh() && !self.hold().await? {
            return Ok(Vec::new());
        }
        self.claimed = false;
        if self.claim {
            // First what a previous holder read and did not finish (also our own,
            // after a restart or a failed acknowledgement): only the lease holder
            // reads, so nobody else is on them.
            let mut claim = redis::cmd("XAUTOCLAIM");
            claim
                .arg(self.events.key())
                .arg(&self.group)
                .arg(&self.owner)
                .arg(0)
                .arg("0-0")
                .arg("COUNT")
                .arg(n);
            let reply: Value = self
                .events
                .redis()
                .query(&claim)
                .await
                .map_err(EventError::Unavailable)?;
            if let Value::Array(mut parts) = reply
                && parts.len() >= 2
            {
                let claimed = parse_raw_entries(parts.swap_remove(1))?;
                if !claimed.is_empty() {
                    self.claimed = true;
                    return claimed
                        .into_iter()
                        .map(|(id, json)| Stored::parse(id, json))
                        .collect();
                }
            }
            self.claim = false;
        }
        let cursor = match &self.cursor {
            Some(c) => c.clone(),
            None => {
                let c = self.load_cursor().await?;
                self.cursor = Some(c.clone());
                c
            }
        };
        // A plain range read from the cursor: unlike `XREADGROUP` it adds no
        // pending entry per event that an `XACK` must take out again, and the
        // group's cursor moves once per batch (`XGROUP SETID`) when it is done.
        // Pods that read with `XREADGROUP` (older relays) follow the same cursor.
        let mut read = redis::cmd("XRANGE");
        read.arg(self.events.key())
            .arg(format!("({cursor}"))
            .arg("+")
            .arg("COUNT")
            .arg(n);
        let reply: Value = self
            .events
            .redis()
            .query(&read)
            .await
            .map_err(EventError::Unavailable)?;
        parse_raw_entries(reply)?
            .into_iter()
            .map(|(id, json)| Stored::parse(id, json))
            .collect()
    }

    async fn ack(&mut self, events: &[Stored]) -> Result<(), EventError> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        if self.claimed {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(self.events.key()).arg(&self.group);
            for e in events {
                cmd.arg(&e.id);
            }
            return match self.events.redis().query::<i64>(&cmd).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    self.claim = true;
                    Err(EventError::Unavailable(e))
                }
            };
        }
        // Only a holder moves the cursor, or a relay that lost the lease during a
        // long POST could move it back under the new holder. What it did not record
        // is sent again by the next holder (at least once).
        // A lease taken anew here (it had gone) does not count: another relay may
        // have held it meanwhile and moved the cursor further.
        let renewed = self.fresh() || (self.held_since.is_some() && self.hold().await?);
        if !renewed {
            return Err(EventError::Unavailable(format!(
                "the lease went to another relay before events up to {} were recorded as done",
                last.id
            )));
        }
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("SETID")
            .arg(self.events.key())
            .arg(&self.group)
            .arg(&last.id);
        self.events
            .redis()
            .query::<()>(&cmd)
            .await
            .map_err(EventError::Unavailable)?;
        self.cursor = Some(last.id.clone());
        Ok(())
    }
}

/// A status or bulk reply as text.
fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

struct EmbeddedFeed {
    events: EmbeddedEvents,
    name: String,
    cursor: (u64, u64),
}

impl EmbeddedFeed {
    /// The endpoint's cursor, or the newest event when it has none yet.
    fn new(events: EmbeddedEvents, name: &str) -> Result<Self, EventError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            EventError::Unavailable(format!("embedded webhook cursor: {e}"))
        };
        let txn = events.db().begin_write().map_err(|e| unavailable(&e))?;
        let cursor = {
            let mut cursors = txn.open_table(CURSORS).map_err(|e| unavailable(&e))?;
            let found = cursors
                .get(name)
                .map_err(|e| unavailable(&e))?
                .map(|v| v.value());
            match found {
                Some(c) => c,
                None => {
                    let t = txn.open_table(EVENTS).map_err(|e| unavailable(&e))?;
                    let last = t
                        .last()
                        .map_err(|e| unavailable(&e))?
                        .map_or((0, 0), |(k, _)| k.value());
                    cursors.insert(name, last).map_err(|e| unavailable(&e))?;
                    last
                }
            }
        };
        txn.commit().map_err(|e| unavailable(&e))?;
        Ok(EmbeddedFeed {
            events,
            name: name.to_owned(),
            cursor,
        })
    }

    async fn next(&mut self, n: usize) -> Result<Vec<Stored>, EventError> {
        let db = Arc::clone(self.events.db());
        let after = self.cursor;
        tokio::task::spawn_blocking(move || {
            let err = |e: &dyn std::fmt::Display| {
                EventError::Unavailable(format!("embedded events: {e}"))
            };
            let txn = db.begin_read().map_err(|e| err(&e))?;
            let t = txn.open_table(EVENTS).map_err(|e| err(&e))?;
            let mut out = Vec::new();
            for row in t.range(after..).map_err(|e| err(&e))? {
                let (k, v) = row.map_err(|e| err(&e))?;
                let key = k.value();
                if key <= after {
                    continue;
                }
                out.push(Stored::parse(
                    format!("{}-{}", key.0, key.1),
                    v.value().to_vec(),
                )?);
                if out.len() >= n {
                    break;
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| EventError::Unavailable(e.to_string()))?
    }

    async fn ack(&mut self, events: &[Stored]) -> Result<(), EventError> {
        let Some(last) = events.last().and_then(|e| parse_id(&e.id)) else {
            return Ok(());
        };
        let db = Arc::clone(self.events.db());
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || {
            let err = |e: &dyn std::fmt::Display| {
                EventError::Unavailable(format!("embedded webhook cursor: {e}"))
            };
            let mut txn = db.begin_write().map_err(|e| err(&e))?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| err(&e))?;
            txn.open_table(CURSORS)
                .map_err(|e| err(&e))?
                .insert(name.as_str(), last)
                .map_err(|e| err(&e))?;
            txn.commit().map_err(|e| err(&e))
        })
        .await
        .map_err(|e| EventError::Unavailable(e.to_string()))??;
        self.cursor = last;
        Ok(())
    }
}

// -------------------------------------------------------------- the loop

async fn run(mut endpoint: Endpoint, mut feed: Feed, metrics: WebhookMetrics) {
    let name = endpoint.cfg.name.clone();
    let label = WebhookMetrics::label(&name);
    let max = endpoint.cfg.batch.max_events.max(1);
    let read = max.max(BATCH);
    let linger = if endpoint.batched() {
        endpoint.cfg.batch.linger
    } else {
        Duration::ZERO
    };
    loop {
        let events = match feed.next(read).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(webhook = %name, error = %e, "reading events for the webhook failed");
                tokio::time::sleep(POLL * 5).await;
                continue;
            }
        };
        if events.is_empty() {
            tokio::time::sleep(POLL).await;
            continue;
        }
        let pending = metrics.pending.get_or_create(&label).clone();
        pending.set(events.len() as i64);
        // The endpoint's events, in store order, cut into POSTs; the others are done
        // as they are passed.
        let wanted: Vec<usize> = (0..events.len())
            .filter(|&i| endpoint.wants(&events[i]))
            .collect();
        let mut done = events.len();
        let mut lost = false;
        for group in wanted.chunks(max) {
            let posted: Vec<&Stored> = group.iter().map(|&i| &events[i]).collect();
            let n = posted.len() as u64;
            match deliver(&mut endpoint, &mut feed, &posted, &metrics).await {
                Delivered::Yes => {
                    metrics.delivered.get_or_create(&label).inc_by(n);
                }
                Delivered::Dead => {
                    metrics.dead.get_or_create(&label).inc_by(n);
                    feed.dead_letter(posted.len()).await;
                }
                Delivered::LeaseLost => {
                    done = group[0];
                    lost = true;
                    break;
                }
            }
            let through = group.last().map_or(0, |&i| i + 1);
            pending.set((events.len() - through) as i64);
        }
        // What was done is acknowledged even when the lease went meanwhile: the
        // new holder then skips it (or, if it claimed it first, sends it again).
        if let Err(e) = ack_with_retry(&mut feed, &events[..done]).await {
            tracing::warn!(webhook = %name, error = %e, "acknowledging webhook events failed; they will be sent again");
        }
        pending.set(0);
        if lost {
            tracing::info!(webhook = %name, "webhook lease lost to another relay; standing by");
        } else if events.len() < read && !linger.is_zero() {
            // Caught up: let the next POST gather more than a handful.
            tokio::time::sleep(linger).await;
        }
    }
}

async fn ack_with_retry(feed: &mut Feed, events: &[Stored]) -> Result<(), EventError> {
    let mut last = None;
    for _ in 0..5 {
        match feed.ack(events).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(POLL).await;
            }
        }
    }
    Err(last.expect("tried"))
}

enum Delivered {
    Yes,
    Dead,
    LeaseLost,
}

/// POSTs `events` (one, or a batch) until a 2xx, retrying with backoff; the same
/// body and `webhook-id` each time.
async fn deliver(
    endpoint: &mut Endpoint,
    feed: &mut Feed,
    events: &[&Stored],
    metrics: &WebhookMetrics,
) -> Delivered {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Delivered::Yes;
    };
    let id = if events.len() == 1 {
        first.id.clone()
    } else {
        format!("{}..{}", first.id, last.id)
    };
    let body = Bytes::from(endpoint.body(events));
    let name = endpoint.cfg.name.clone();
    let retry = endpoint.cfg.retry.clone();
    let mut wait = retry.initial;
    for attempt in 1..=retry.max_attempts {
        match endpoint.post(&id, &body).await {
            Ok(()) => {
                metrics.post(&name, true);
                return Delivered::Yes;
            }
            Err(why) => {
                metrics.post(&name, false);
                if attempt == retry.max_attempts {
                    tracing::warn!(webhook = %name, events = %id, count = events.len(), attempts = attempt, error = %why, "webhook events dead-lettered");
                    return Delivered::Dead;
                }
                tracing::debug!(webhook = %name, events = %id, attempt, error = %why, retry_in = ?wait, "webhook POST failed");
                // Sleep in slices, renewing the lease, so a long backoff does not
                // hand the endpoint to another relay.
                let mut left = wait;
                while !left.is_zero() {
                    let slice = left.min(LEASE / 3);
                    tokio::time::sleep(slice).await;
                    left -= slice;
                    if !feed.still_held().await {
                        return Delivered::LeaseLost;
                    }
                }
                wait = (wait * 2).min(retry.max);
            }
        }
    }
    Delivered::Dead
}

/// The `webhook-signature` value of `body` sent as `id` at `timestamp` (what a
/// receiver computes to verify; tests use it).
pub fn signature(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    sign(&key, id, &timestamp.to_string(), body)
}

/// `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, without copying the body.
fn sign(key: &ring::hmac::Key, id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut ctx = ring::hmac::Context::with_key(key);
    for part in [id.as_bytes(), b".", timestamp.as_bytes(), b".", body] {
        ctx.update(part);
    }
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref())
    )
}

/// `ms` since the epoch as RFC 3339 (as the `time` crate writes it: fractional
/// digits only as needed); nothing for a time it cannot write.
fn write_time(out: &mut Vec<u8>, ms: u64) {
    let start = out.len();
    let written = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .map(|t| t.format_into(out, &time::format_description::well_known::Rfc3339));
    if !matches!(written, Some(Ok(_))) {
        out.truncate(start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_scheme() {
        // Computed independently: printf 'msg_1.1700000000.{}' | openssl dgst
        // -sha256 -hmac 'whsec-test-key-0123' -binary | base64
        let s = signature(b"whsec-test-key-0123", "msg_1", 1_700_000_000, b"{}");
        assert_eq!(s, "v1,".to_owned() + &expected_b64());
    }

    fn endpoint(batch: &str) -> Endpoint {
        let cfg = crate::config::RelayConfig::from_yaml(&format!(
            "webhooks:\n  - {{name: t, url: 'http://127.0.0.1:1/h', allow_http: true, \
             secret: 0123456789abcdef0123, tenants: {{all: true}}, batch: {batch}}}\n"
        ))
        .unwrap();
        Endpoint::new(&cfg.webhooks[0], "mailrelay://relay.test").unwrap()
    }

    fn event(kind: EventKind, queue_id: &str) -> mailrelay_admin_api::Event {
        mailrelay_admin_api::Event {
            id: String::new(),
            kind,
            at_ms: 1_700_000_000_120,
            queue_id: queue_id.into(),
            message_id: Some("m\"1@x.test".into()),
            sender: "s@x.test".into(),
            recipient: Some("r@y.test".into()),
            auth_user: Some("alice".into()),
            tenant: "alice".into(),
            category: None,
            reply: Some("250 2.0.0 ok \u{e9}\t<queued>".into()),
            mx: Some("mx.y.test".into()),
            tls_version: Some("TLSv1.3".into()),
            tls_cipher: Some("TLS13_AES_256_GCM_SHA384".into()),
            dsn_id: None,
        }
    }

    /// The envelope as the relay built it before it wrote envelopes itself.
    fn old_envelope(e: &mailrelay_admin_api::Event, id: &str) -> serde_json::Value {
        let mut e = e.clone();
        e.id = id.to_owned();
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(e.at_ms as i128 * 1_000_000)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        serde_json::json!({
            "specversion": "1.0",
            "id": e.id,
            "source": "mailrelay://relay.test",
            "type": format!("io.mailrelay.{}", e.kind.as_str()),
            "subject": e.queue_id,
            "time": time,
            "datacontenttype": "application/json",
            "data": e,
        })
    }

    #[test]
    fn envelopes_read_as_before_alone_and_in_batches() {
        let a = event(EventKind::Accepted, "Q1");
        let d = event(EventKind::Delivered, "Q1");
        let stored = |id: &str, e: &mailrelay_admin_api::Event| {
            Stored::parse(id.into(), serde_json::to_vec(e).unwrap()).unwrap()
        };
        let (sa, sd) = (stored("17-0", &a), stored("17-1", &d));

        let single = endpoint("{max_events: 1}");
        assert!(!single.batched());
        let body = single.body(&[&sd]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, old_envelope(&d, "17-1"));
        assert_eq!(v["time"], "2023-11-14T22:13:20.12Z");
        // The keys come in the order they always came (sorted).
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.starts_with("{\"data\":{\"id\":\"17-1\",\"kind\":\"delivered\""),
            "{text}"
        );
        assert!(
            text.ends_with("\"type\":\"io.mailrelay.delivered\"}"),
            "{text}"
        );

        let batched = endpoint("{max_events: 50}");
        assert!(batched.batched());
        let v: serde_json::Value = serde_json::from_slice(&batched.body(&[&sa, &sd])).unwrap();
        assert_eq!(
            v,
            serde_json::json!([old_envelope(&a, "17-0"), old_envelope(&d, "17-1")])
        );
        // Every event read back from `data` is the stored one with its id.
        let back: mailrelay_admin_api::Event =
            serde_json::from_value(v[1]["data"].clone()).unwrap();
        assert_eq!(
            back,
            mailrelay_admin_api::Event {
                id: "17-1".into(),
                ..d
            }
        );
    }

    #[test]
    fn stored_events_from_elsewhere_pass_as_they_are() {
        // An event that already carries an id, with a field this relay does not know.
        let json = br#" {"id":"x","kind":"bounced","at_ms":5,"queue_id":"Q","sender":"","tenant":"","new":[1]} "#;
        let s = Stored::parse("9-9".into(), json.to_vec()).unwrap();
        assert!(s.has_id);
        let mut out = Vec::new();
        s.write_data(&mut out);
        assert_eq!(out, json.trim_ascii());
        assert!(Stored::parse("9-9".into(), b"{\"kind\":\"sent\"}".to_vec()).is_err());
    }

    /// The quick read of a stored event agrees with serde's on every event shape
    /// this relay writes, and leaves every other shape to serde.
    #[test]
    fn the_quick_read_agrees_with_serde() {
        let mut shapes = Vec::new();
        for kind in [
            EventKind::Accepted,
            EventKind::Delivered,
            EventKind::DsnSent,
        ] {
            let mut e = event(kind, "Q\u{e9}1");
            shapes.push(e.clone());
            e.message_id = None;
            e.recipient = None;
            e.auth_user = None;
            shapes.push(e.clone());
            e.sender = String::new();
            e.category = Some("invalid_recipient".into());
            shapes.push(e);
        }
        for e in &shapes {
            let json = serde_json::to_vec(e).unwrap();
            assert!(
                FastHead::read(&json).is_some(),
                "{}",
                String::from_utf8_lossy(&json)
            );
            let quick = Stored::parse("1-1".into(), json.clone()).unwrap();
            let slow = Stored::parse_any("1-1".into(), json).unwrap();
            assert_eq!(
                (
                    quick.kind,
                    quick.at_ms,
                    &quick.queue_id,
                    &quick.sender,
                    &quick.auth_user,
                    quick.has_id
                ),
                (
                    slow.kind,
                    slow.at_ms,
                    &slow.queue_id,
                    &slow.sender,
                    &slow.auth_user,
                    slow.has_id
                )
            );
            assert_eq!(quick.queue_id, e.queue_id);
            assert_eq!(quick.auth_user, e.auth_user);
        }
        // Escapes in a field it takes, an `id` anywhere, another key order,
        // whitespace, a number it cannot hold: serde reads those.
        let mut escaped = event(EventKind::Delivered, "Q1");
        escaped.sender = "\"odd\"@x.test".into();
        let mut with_id = event(EventKind::Delivered, "Q1");
        with_id.id = "5-5".into();
        for e in [escaped, with_id] {
            let json = serde_json::to_vec(&e).unwrap();
            assert!(
                FastHead::read(&json).is_none(),
                "{}",
                String::from_utf8_lossy(&json)
            );
            let s = Stored::parse("1-1".into(), json).unwrap();
            assert_eq!((s.sender, s.has_id), (e.sender, !e.id.is_empty()));
        }
        // `"id"` inside a string is no key.
        let mut id_in_text = event(EventKind::Delivered, "Q1");
        id_in_text.reply = Some("550 \"id\": unknown".into());
        let json = serde_json::to_vec(&id_in_text).unwrap();
        assert!(FastHead::read(&json).is_some());
        assert!(!Stored::parse_any("1-1".into(), json).unwrap().has_id);
        for odd in [
            &br#"{"at_ms":5,"kind":"bounced","queue_id":"Q","sender":"","tenant":""}"#[..],
            br#"{ "kind":"bounced","at_ms":5,"queue_id":"Q","sender":"","tenant":""}"#,
            br#"{"kind":"bounced","at_ms":99999999999999999999,"queue_id":"Q","sender":"","tenant":""}"#,
            br#"{"kind":"bounced","at_ms":5,"queue_id":"Q","sender":"","tenant":"","x":{"id":1}}"#,
        ] {
            assert!(FastHead::read(odd).is_none(), "{}", String::from_utf8_lossy(odd));
        }
    }

    fn expected_b64() -> String {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("printf 'msg_1.1700000000.{}' | openssl dgst -sha256 -hmac 'whsec-test-key-0123' -binary | base64")
            .output()
            .expect("openssl");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}
