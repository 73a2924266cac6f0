//! `mailrelay quota list|show`: send quota usage of a running relay, read from its
//! admin API (`/api/v1/quotas`), in the style of `mailrelay queue`.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use mailrelay_admin_api::Call;

use super::queue::{DEFAULT_ADMIN, client, parse, request};
use crate::quota::usage::{QuotaList, QuotaUsage};

/// Keys `quota list` shows per quota (`quota show` shows all the API returns).
const LIST_KEYS: usize = 5;

#[derive(Debug, Args)]
pub struct QuotaArgs {
    /// Admin API of the relay.
    #[arg(long, env = "MAILRELAY_ADMIN", default_value = DEFAULT_ADMIN, global = true)]
    pub admin: String,
    /// Print the API's JSON instead of the human-readable form.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub token: super::TokenArgs,
    #[command(subcommand)]
    pub command: QuotaCommand,
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Every quota with its limits and its busiest keys.
    List,
    /// One quota: usage of every key counted in its longest window (up to 100).
    Show {
        name: String,
        /// Only this key (sender, AUTH user, domain or client address, as the
        /// quota's `key` says).
        #[arg(long)]
        key: Option<String>,
    },
}

/// Runs the command; prints errors to stderr and returns exit code 1 on failure.
pub fn run(args: QuotaArgs) -> ExitCode {
    super::run_printing(execute(&args))
}

/// Performs the command and returns what to print on stdout.
pub async fn execute(args: &QuotaArgs) -> Result<String, String> {
    let client = client(&args.admin, &args.token)?;
    match &args.command {
        QuotaCommand::List => {
            let body = request(&client, &Call::Quotas).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let list: QuotaList = parse(&body)?;
            Ok(format_list(&list))
        }
        QuotaCommand::Show { name, key } => {
            let call = Call::Quota {
                name: name.clone(),
                key: key.clone(),
            };
            let body = request(&client, &call).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let q: QuotaUsage = parse(&body)?;
            Ok(format_quota(&q, usize::MAX))
        }
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 2 * 86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        s => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

/// One quota: a header line, then a table of keys and windows.
pub fn format_quota(q: &QuotaUsage, max_keys: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({}, {}, {}): {}",
        q.name,
        q.direction,
        q.scope,
        q.action.map_or("", |a| a.as_str()),
        if q.limits.is_empty() {
            "no rate limits".to_owned()
        } else {
            q.limits.join(", ")
        }
    );
    if q.keys.is_empty() {
        let _ = writeln!(out, "  (nothing counted)");
        return out;
    }
    let width = q
        .keys
        .iter()
        .take(max_keys)
        .map(|k| k.key.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(3, 48);
    let _ = writeln!(
        out,
        "  {:<width$}  {:<10} {:>10} {:>10}  RESETS IN",
        "KEY", "LIMIT", "USED", "LEFT"
    );
    for k in q.keys.iter().take(max_keys) {
        for (i, w) in k.windows.iter().enumerate() {
            let name = if i == 0 { k.key.as_str() } else { "" };
            let resets = if w.used == 0 {
                "-".to_owned()
            } else {
                format!("{} ({})", duration(w.resets_in_seconds), w.resets_at)
            };
            let _ = writeln!(
                out,
                "  {name:<width$}  {:<10} {:>10} {:>10}  {resets}",
                w.limit, w.used, w.remaining
            );
        }
        if let Some(c) = &k.connections {
            let name = if k.windows.is_empty() {
                k.key.as_str()
            } else {
                ""
            };
            let _ = writeln!(out, "  {name:<width$}  connections {} of {}", c.open, c.max);
        }
    }
    if q.keys.len() > max_keys {
        let _ = writeln!(
            out,
            "  … {} more (mailrelay quota show {})",
            q.keys.len() - max_keys,
            q.name
        );
    }
    out
}

/// Every quota, a few keys each.
pub fn format_list(list: &QuotaList) -> String {
    if list.quotas.is_empty() {
        return "No quotas configured\n".to_owned();
    }
    list.quotas
        .iter()
        .map(|q| format_quota(q, LIST_KEYS))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_read_well() {
        let q: QuotaUsage = serde_json::from_value(serde_json::json!({
            "name": "tenant-a", "direction": "ingress", "scope": "per_key", "action": "reject",
            "limits": ["100/1m", "1000/1h"],
            "keys": [{"key": "alice@a.example", "windows": [
                {"limit": "100/1m", "window_seconds": 60, "used": 12, "remaining": 88,
                 "resets_at": "2026-11-29T05:01:00Z", "resets_in_seconds": 31},
                {"limit": "1000/1h", "window_seconds": 3600, "used": 0, "remaining": 1000,
                 "resets_at": "2026-11-29T05:00:29Z", "resets_in_seconds": 0}]}]
        }))
        .unwrap();
        let text = format_quota(&q, 5);
        assert_eq!(
            text,
            "tenant-a (ingress, per_key, reject): 100/1m, 1000/1h\n\
             \x20 KEY              LIMIT            USED       LEFT  RESETS IN\n\
             \x20 alice@a.example  100/1m             12         88  31s (2026-11-29T05:01:00Z)\n\
             \x20                  1000/1h             0       1000  -\n"
        );
        let empty = QuotaList { quotas: vec![] };
        assert_eq!(format_list(&empty), "No quotas configured\n");
        assert_eq!(duration(3725), "62m05s");
        assert_eq!(duration(7300), "2h01m");
    }
}
