//! `mailrelay events`: "where is my mail?" — delivery events of a running relay,
//! read from its admin API (`/api/v1/events`).

use std::process::ExitCode;

use clap::Args;
use mailrelay_admin_api::Call;
use mailrelay_admin_api::events::{EventList, EventQuery, format_events, parse_time};

use super::queue::{DEFAULT_ADMIN, client, parse, request};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Admin API of the relay.
    #[arg(long, env = "MAILRELAY_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    /// Print the API's JSON instead of one line per event.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub token: super::TokenArgs,
    /// Only this queue ID.
    #[arg(long)]
    pub queue_id: Option<String>,
    /// Only this Message-ID (with or without angle brackets).
    #[arg(long)]
    pub message_id: Option<String>,
    /// Only this envelope sender.
    #[arg(long)]
    pub from: Option<String>,
    /// Only this recipient.
    #[arg(long)]
    pub to: Option<String>,
    /// From this time: a duration back (30s, 15m, 1h, 2d), a UTC time
    /// (2026-12-07T10:00:00Z) or ms since the epoch.
    #[arg(long)]
    pub since: Option<String>,
    /// Up to this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Only this kind: accepted, delivered, deferred, bounced, expired,
    /// suppressed, dsn_sent.
    #[arg(long)]
    pub kind: Option<String>,
    /// At most this many, the newest (default 100, at most 1000).
    #[arg(long)]
    pub limit: Option<usize>,
}

impl EventsArgs {
    /// The API query; times are resolved against `now_ms`, and the same bounds
    /// the relay applies are checked here first (an error names the flag).
    pub fn query(&self, now_ms: u64) -> Result<EventQuery, String> {
        let q = EventQuery {
            queue_id: self.queue_id.clone(),
            message_id: self.message_id.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            since_ms: self
                .since
                .as_deref()
                .map(|s| parse_time(s, now_ms, "--since"))
                .transpose()?,
            until_ms: self
                .until
                .as_deref()
                .map(|s| parse_time(s, now_ms, "--until"))
                .transpose()?,
            kind: self.kind.clone(),
            limit: self.limit,
        };
        q.check()
            .map_err(|e| format!("--{}", e.to_string().replace('_', "-")))?;
        Ok(q)
    }
}

pub fn run(args: EventsArgs) -> ExitCode {
    super::run_printing(execute(&args))
}

pub async fn execute(args: &EventsArgs) -> Result<String, String> {
    let query = args.query(crate::queue::now_ms())?;
    let client = client(&args.admin, &args.token)?;
    let body = request(&client, &Call::Events(query)).await?;
    if args.json {
        return Ok(body + "\n");
    }
    let list: EventList = parse(&body)?;
    Ok(format_events(&list))
}
