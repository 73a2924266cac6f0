//! `mailrelay queue …`: inspect and act on the queue of a running relay through
//! its admin HTTP API, in the manner of `postqueue -p`, `qshape` and `postsuper`.
//!
//! The HTTP client is a deliberately tiny HTTP/1.1 one (one request per
//! connection, `Connection: close`): the admin API is on loopback or the pod
//! network and answers with `Content-Length` bodies.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::admin::api::{MessageDetail, MessageList, Retried, StatsBody};
use crate::queue::now_ms;

/// Default admin API address (the relay's default admin listener).
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9325";

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Admin API of the relay.
    #[arg(long, env = "MAILRELAY_ADMIN", default_value = DEFAULT_ADMIN, global = true)]
    pub admin: String,
    /// Print the API's JSON instead of the human-readable form.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub token: super::TokenArgs,
    #[command(subcommand)]
    pub command: QueueCommand,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued messages, like `postqueue -p`.
    List {
        /// Only messages that have had at least one delivery attempt.
        #[arg(long)]
        deferred: bool,
        /// Only messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// At most this many messages.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one message: envelope, recipients and every delivery attempt.
    Show { id: String },
    /// Make messages due now.
    Retry {
        /// One message.
        #[arg(required_unless_present_any = ["all", "domain"], conflicts_with_all = ["all", "domain"])]
        id: Option<String>,
        /// Every queued message.
        #[arg(long, conflicts_with = "domain")]
        all: bool,
        /// Messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Delete one message from the queue (no bounce is sent).
    Delete { id: String },
    /// Queue depth, bytes, deferred, in flight and oldest age, like `qshape`.
    Stats,
}

/// Runs the command; prints errors to stderr and returns exit code 1 on failure.
pub fn run(args: QueueArgs) -> ExitCode {
    super::run_printing(execute(&args))
}

/// Performs the command and returns what to print on stdout.
pub async fn execute(args: &QueueArgs) -> Result<String, String> {
    let base = Endpoint::parse(&args.admin)?.with_token(args.token.token()?);
    match &args.command {
        QueueCommand::List {
            deferred,
            domain,
            limit,
        } => {
            let mut q = Vec::new();
            if *deferred {
                q.push("deferred=true".to_owned());
            }
            if let Some(d) = domain {
                q.push(format!("domain={}", encode(d)));
            }
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            let mut path = "/api/v1/queue/messages".to_owned();
            if !q.is_empty() {
                path.push('?');
                path.push_str(&q.join("&"));
            }
            let body = base.request("GET", &path).await?.ok()?;
            if args.json {
                return Ok(body + "\n");
            }
            let list: MessageList = parse(&body)?;
            Ok(format_list(&list))
        }
        QueueCommand::Show { id } => {
            let path = format!("/api/v1/queue/messages/{}", encode(id));
            let body = base.request("GET", &path).await?.ok()?;
            if args.json {
                return Ok(body + "\n");
            }
            let d: MessageDetail = parse(&body)?;
            Ok(format_detail(&d))
        }
        QueueCommand::Retry { id, all, domain } => {
            let path = match (id, all, domain) {
                (Some(id), _, _) => format!("/api/v1/queue/messages/{}/retry", encode(id)),
                (None, true, _) => "/api/v1/queue/retry?all=true".to_owned(),
                (None, false, Some(d)) => format!("/api/v1/queue/retry?domain={}", encode(d)),
                (None, false, None) => return Err("retry needs ID, --all or --domain".into()),
            };
            let body = base.request("POST", &path).await?.ok()?;
            if args.json {
                return Ok(body + "\n");
            }
            let r: Retried = parse(&body)?;
            Ok(format!(
                "{} message(s) scheduled for immediate retry\n",
                r.retried
            ))
        }
        QueueCommand::Delete { id } => {
            let path = format!("/api/v1/queue/messages/{}", encode(id));
            base.request("DELETE", &path).await?.ok()?;
            if args.json {
                return Ok(format!("{}\n", serde_json::json!({ "deleted": id })));
            }
            Ok(format!("{id}: deleted\n"))
        }
        QueueCommand::Stats => {
            let body = base.request("GET", "/api/v1/queue/stats").await?.ok()?;
            if args.json {
                return Ok(body + "\n");
            }
            let s: StatsBody = parse(&body)?;
            Ok(format_stats(&s))
        }
    }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, String> {
    serde_json::from_str(body).map_err(|e| format!("unexpected answer from the admin API: {e}"))
}

/// Percent-encodes everything but unreserved characters.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `http://host:port` of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    url: String,
    host: String,
    /// Bearer token sent with every request.
    token: Option<String>,
}

pub(crate) struct HttpResponse {
    status: u16,
    body: String,
}

impl HttpResponse {
    /// The body of a 2xx answer, else the API's `error` message.
    pub(crate) fn ok(self) -> Result<String, String> {
        if (200..300).contains(&self.status) {
            return Ok(self.body);
        }
        let msg = serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| self.body.trim().to_owned());
        if self.status == 401 {
            return Err(format!(
                "{msg} (HTTP 401; give --admin-token-file, MAILRELAY_ADMIN_TOKEN or --config)"
            ));
        }
        Err(format!("{msg} (HTTP {})", self.status))
    }
}

impl Endpoint {
    pub(crate) fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("admin URL {url:?} must start with http:// (the admin API has no TLS)")
        })?;
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() {
            return Err(format!("admin URL {url:?} has no host"));
        }
        let host = if host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']')) {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        Ok(Endpoint {
            url: url.trim_end_matches('/').to_owned(),
            host,
            token: None,
        })
    }

    pub(crate) fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    pub(crate) async fn request(&self, method: &str, path: &str) -> Result<HttpResponse, String> {
        match tokio::time::timeout(TIMEOUT, self.exchange(method, path)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer from mailrelay admin API at {} within {TIMEOUT:?}",
                self.url
            )),
        }
    }

    async fn exchange(&self, method: &str, path: &str) -> Result<HttpResponse, String> {
        let unreachable = |e: std::io::Error| {
            let reason = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                _ => e.to_string(),
            };
            format!("cannot reach mailrelay admin API at {}: {reason}", self.url)
        };
        let mut s = tokio::net::TcpStream::connect(&self.host)
            .await
            .map_err(unreachable)?;
        let auth = match &self.token {
            Some(t) => format!("Authorization: Bearer {t}\r\n"),
            None => String::new(),
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.host
        );
        s.write_all(req.as_bytes()).await.map_err(unreachable)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(unreachable)?;
        parse_response(&raw).ok_or_else(|| {
            format!(
                "malformed HTTP answer from mailrelay admin API at {}",
                self.url
            )
        })
    }
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = memchr::memmem::find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().ok()?;
                body = body.get(..n)?;
            } else if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                // Not produced by the admin API for its JSON answers.
                return None;
            }
        }
    }
    Some(HttpResponse {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

fn when(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        s => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

fn sender(from: &str) -> &str {
    if from.is_empty() { "<>" } else { from }
}

/// `postqueue -p` style.
pub fn format_list(list: &MessageList) -> String {
    if list.messages.is_empty() {
        return "Mail queue is empty\n".to_owned();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<21} {:>8} {:<20} -Sender/Recipient-------",
        "-Queue ID-", "--Size--", "----Arrival Time----"
    );
    // Recipients line up under the sender, as in `postqueue -p`.
    let indent = " ".repeat(52);
    let mut bytes = 0u64;
    for m in &list.messages {
        // The declared size (the list does not load bodies); `?` when none was given.
        bytes += m.declared_size.unwrap_or(0);
        let size = m
            .declared_size
            .map_or_else(|| "?".to_owned(), |s| s.to_string());
        // `*`: in delivery now; `!`: deferred (tried before).
        let flag = if m.leased_until_ms.is_some() {
            '*'
        } else if m.attempts > 0 {
            '!'
        } else {
            ' '
        };
        let _ = writeln!(
            out,
            "{:<20}{flag} {size:>8} {:<20} {}",
            m.id,
            when(m.received_at_ms),
            sender(&m.from)
        );
        if m.attempts > 0 {
            let next = m.next_attempt_ms.map_or_else(|| "-".to_owned(), when);
            let _ = writeln!(
                out,
                "{indent}(attempts: {}, next attempt: {next})",
                m.attempts
            );
        }
        for r in &m.rcpts {
            if let Some(reply) = &r.last_reply {
                let _ = writeln!(out, "{indent}({reply})");
            }
            let _ = writeln!(out, "{indent}{} [{}]", r.address, show_state(r.state));
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "-- {} Kbytes in {} Request{}.",
        bytes.div_ceil(1024),
        list.messages.len(),
        if list.messages.len() == 1 { "" } else { "s" }
    );
    out
}

fn show_state<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub fn format_detail(d: &MessageDetail) -> String {
    let e = &d.envelope;
    let s = &d.status;
    let mut out = String::new();
    let _ = writeln!(out, "Queue ID:     {}", e.id);
    let _ = writeln!(out, "Sender:       {}", sender(&e.mail.from));
    if let Some(size) = e.mail.size {
        let _ = writeln!(out, "Declared size: {size}");
    }
    let _ = writeln!(
        out,
        "Arrival:      {} (by {})",
        when(e.received_at_ms),
        e.received_by
    );
    let _ = writeln!(
        out,
        "Client:       {} [{}] via {}",
        e.client.helo, e.client.ip, e.client.listener
    );
    let _ = writeln!(out, "Attempts:     {}", s.attempts);
    match s.next_attempt_ms {
        Some(n) => {
            let _ = writeln!(out, "Next attempt: {}", when(n));
        }
        None => {
            let _ = writeln!(out, "Next attempt: none (final)");
        }
    }
    if let Some(l) = s.leased_until_ms {
        let _ = writeln!(out, "In delivery:  lease until {}", when(l));
    }
    for r in &s.rcpts {
        let _ = writeln!(out, "Recipient:    {} [{}]", r.address, show_state(r.state));
        for a in &r.attempts {
            let mut line = format!("  {} {}", when(a.at_ms), show_state(a.result));
            if let Some(mx) = &a.mx {
                let _ = write!(line, " mx={mx}");
            }
            if let Some(ip) = &a.ip {
                let _ = write!(line, " ip={ip}");
            }
            if let Some(tls) = &a.tls {
                let _ = write!(line, " tls={}/{}", tls.version, tls.cipher);
            }
            let _ = writeln!(out, "{line}: {}", a.reply);
        }
    }
    out
}

/// `qshape`-like summary.
pub fn format_stats(s: &StatsBody) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "messages:   {}", s.messages);
    let _ = writeln!(out, "bytes:      {}", s.bytes);
    let _ = writeln!(out, "deferred:   {}", s.deferred);
    let _ = writeln!(out, "in flight:  {}", s.leased);
    let oldest = match (s.oldest_age_seconds, s.oldest_ms) {
        (Some(a), Some(ms)) => format!("{} ({})", age(a), when(ms)),
        (None, Some(ms)) => age(now_ms().saturating_sub(ms) / 1000),
        _ => "-".to_owned(),
    };
    let _ = writeln!(out, "oldest age: {oldest}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_and_encoding() {
        let e = Endpoint::parse("http://127.0.0.1:9325/").unwrap();
        assert_eq!(e.host, "127.0.0.1:9325");
        assert_eq!(e.url, "http://127.0.0.1:9325");
        assert_eq!(Endpoint::parse("http://admin").unwrap().host, "admin:80");
        assert!(Endpoint::parse("https://x").is_err());
        assert_eq!(encode("a b/é"), "a%20b%2F%C3%A9");
    }

    #[test]
    fn responses_are_parsed() {
        let body = r#"{"error":"message not found"}"#;
        let raw = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = parse_response(raw.as_bytes()).unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.ok().unwrap_err(), "message not found (HTTP 404)");
        assert!(parse_response(b"garbage").is_none());
    }

    #[tokio::test]
    async fn unreachable_admin_is_a_clear_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let args = QueueArgs {
            admin: format!("http://{addr}"),
            json: false,
            token: Default::default(),
            command: QueueCommand::Stats,
        };
        let err = execute(&args).await.unwrap_err();
        assert_eq!(
            err,
            format!("cannot reach mailrelay admin API at http://{addr}: connection refused")
        );
    }
}
