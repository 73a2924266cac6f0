//! `mailrelay queue …`: inspect and act on the queue of a running relay through
//! its admin HTTP API, in the manner of `postqueue -p`, `qshape` and `postsuper`.
//!
//! Requests go through the admin API crate's client over direct HTTP (one
//! request per connection: the admin API is on loopback or the pod network).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use mailrelay_admin_api::http::HttpTransport;
use mailrelay_admin_api::{Call, Client, ListQuery, Response, RetrySelector};

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
    let client = client(&args.admin, &args.token)?;
    match &args.command {
        QueueCommand::List {
            deferred,
            domain,
            limit,
        } => {
            let call = Call::List(ListQuery {
                deferred: *deferred,
                domain: domain.clone(),
                limit: *limit,
            });
            let body = request(&client, &call).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let list: MessageList = parse(&body)?;
            Ok(format_list(&list))
        }
        QueueCommand::Show { id } => {
            let body = request(&client, &Call::Show(id.clone())).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let d: MessageDetail = parse(&body)?;
            Ok(format_detail(&d))
        }
        QueueCommand::Retry { id, all, domain } => {
            let sel = match (id, all, domain) {
                (Some(id), _, _) => RetrySelector::Id(id.clone()),
                (None, true, _) => RetrySelector::All,
                (None, false, Some(d)) => RetrySelector::Domain(d.clone()),
                (None, false, None) => return Err("retry needs ID, --all or --domain".into()),
            };
            let body = request(&client, &Call::Retry(sel)).await?;
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
            request(&client, &Call::Delete(id.clone())).await?;
            if args.json {
                return Ok(format!("{}\n", serde_json::json!({ "deleted": id })));
            }
            Ok(format!("{id}: deleted\n"))
        }
        QueueCommand::Stats => {
            let body = request(&client, &Call::Stats).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let s: StatsBody = parse(&body)?;
            Ok(format_stats(&s))
        }
    }
}

/// The admin API at `url`, with the token the flags name (if any).
pub(crate) fn client(url: &str, token: &super::TokenArgs) -> Result<Client<HttpTransport>, String> {
    let transport = HttpTransport::new(url, TIMEOUT).map_err(|e| e.to_string())?;
    Ok(Client::new(transport).with_tokens(token.token()?))
}

/// The body of a 2xx answer to `call`, else the API's `error` message.
pub(crate) async fn request(client: &Client<HttpTransport>, call: &Call) -> Result<String, String> {
    let resp = client.send(call).await.map_err(|e| e.to_string())?;
    ok(resp)
}

fn ok(resp: Response) -> Result<String, String> {
    if resp.is_success() {
        return Ok(resp.body);
    }
    let msg = resp.error_message();
    if resp.status == 401 {
        return Err(format!(
            "{msg} (HTTP 401; give --admin-token-file, MAILRELAY_ADMIN_TOKEN or --config)"
        ));
    }
    Err(format!("{msg} (HTTP {})", resp.status))
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, String> {
    serde_json::from_str(body).map_err(|e| format!("unexpected answer from the admin API: {e}"))
}

pub(crate) fn when(ms: u64) -> String {
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
            let _ = writeln!(out, "{indent}{} [{}]", r.address, r.state.as_str());
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
        match &r.category {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "Recipient:    {} [{}: {c}]",
                    r.address,
                    r.state.as_str()
                );
            }
            None => {
                let _ = writeln!(out, "Recipient:    {} [{}]", r.address, r.state.as_str());
            }
        }
        for a in &r.attempts {
            let mut line = format!("  {} {}", when(a.at_ms), a.result.as_str());
            if let Some(mx) = &a.mx {
                let _ = write!(line, " mx={mx}");
            }
            if let Some(ip) = &a.ip {
                let _ = write!(line, " ip={ip}");
            }
            if let Some(tls) = &a.tls {
                let _ = write!(line, " tls={}/{}", tls.version, tls.cipher);
            }
            if let Some(c) = &a.category {
                let _ = write!(line, " category={c}");
            }
            if let Some(sec) = &a.security {
                let _ = write!(line, " policy={}", sec.policy);
                if let Some(mode) = &sec.mode {
                    let _ = write!(line, "/{mode}");
                }
                if let Some(id) = &sec.policy_id {
                    let _ = write!(line, " policy_id={id}");
                }
                if let Some(v) = sec.verified {
                    let _ = write!(line, " verified={}", if v { "yes" } else { "no" });
                }
                if let Some(f) = &sec.failure {
                    let _ = write!(line, " tls_failure={f:?}");
                }
                if let Some(d) = &sec.dane {
                    let _ = write!(line, " dane={d:?}");
                }
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
    fn error_answers_show_the_relays_message() {
        let r = |status, body: &str| Response {
            status,
            body: body.to_owned(),
        };
        assert_eq!(
            ok(r(404, r#"{"error":"message not found"}"#)).unwrap_err(),
            "message not found (HTTP 404)"
        );
        let e = ok(r(401, r#"{"error":"missing or invalid admin token"}"#)).unwrap_err();
        assert!(e.contains("HTTP 401; give --admin-token-file"), "{e}");
        assert_eq!(ok(r(204, "")).unwrap(), "");
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
