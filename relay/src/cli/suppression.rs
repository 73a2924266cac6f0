//! `mailrelay suppression list|add|remove`: a running relay's suppression lists,
//! through its admin API (`/api/v1/suppression`). The subcommands, their admin API
//! call ([`call`]) and the list format are also `kubectl mailrelay suppression`'s.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use mailrelay_admin_api::Call;
use mailrelay_admin_api::types::{
    SuppressionAdded, SuppressionEntry, SuppressionList, SuppressionQuery,
};

use super::queue::{DEFAULT_ADMIN, client, parse, request};

#[derive(Debug, Args)]
pub struct SuppressionArgs {
    /// Admin API of the relay.
    #[arg(long, env = "MAILRELAY_ADMIN", default_value = DEFAULT_ADMIN, global = true)]
    pub admin: String,
    /// Print the API's JSON instead of the human-readable form.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub token: super::TokenArgs,
    #[command(subcommand)]
    pub command: SuppressionCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SuppressionCommand {
    /// Suppressed recipients, latest expiry first.
    List {
        /// Only this list: global, domain:<sender domain> or user:<AUTH user>.
        #[arg(long)]
        scope: Option<String>,
        /// Only this address.
        #[arg(long)]
        address: Option<String>,
        /// At most this many entries per list (1-10000; default 100).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Suppress a recipient.
    Add {
        address: String,
        /// The list: global, domain:<sender domain> or user:<AUTH user>.
        #[arg(long, default_value = "global")]
        scope: String,
        /// How long (30d, 12h, …) or `never`; the relay's suppression.ttl by default.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Take a recipient off a list.
    Remove {
        address: String,
        #[arg(long, default_value = "global")]
        scope: String,
    },
}

pub fn run(args: SuppressionArgs) -> ExitCode {
    super::run_printing(execute(&args))
}

/// The admin API call of a subcommand.
pub fn call(command: &SuppressionCommand) -> Call {
    match command {
        SuppressionCommand::List {
            scope,
            address,
            limit,
        } => Call::Suppressions(SuppressionQuery {
            scope: scope.clone(),
            address: address.clone(),
            limit: *limit,
        }),
        SuppressionCommand::Add {
            address,
            scope,
            ttl,
        } => Call::SuppressionAdd {
            scope: scope.clone(),
            address: address.clone(),
            ttl: ttl.clone(),
        },
        SuppressionCommand::Remove { address, scope } => Call::SuppressionRemove {
            scope: scope.clone(),
            address: address.clone(),
        },
    }
}

/// Performs the command and returns what to print on stdout.
pub async fn execute(args: &SuppressionArgs) -> Result<String, String> {
    let client = client(&args.admin, &args.token)?;
    let call = call(&args.command);
    match &args.command {
        SuppressionCommand::List { .. } => {
            let body = request(&client, &call).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let list: SuppressionList = parse(&body)?;
            Ok(format_list(&list.entries))
        }
        SuppressionCommand::Add { .. } => {
            let body = request(&client, &call).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let a: SuppressionAdded = parse(&body)?;
            Ok(format!(
                "{} {} on {} ({})\n",
                if a.new { "added" } else { "renewed" },
                a.entry.address,
                a.entry.scope,
                expiry(a.entry.expires_ms)
            ))
        }
        SuppressionCommand::Remove { address, scope } => {
            request(&client, &call).await?;
            Ok(format!("removed {address} from {scope}\n"))
        }
    }
}

fn expiry(ms: Option<u64>) -> String {
    match ms {
        None => "never expires".into(),
        Some(ms) => format!("expires {}", super::queue::when(ms)),
    }
}

/// One line per entry: address, list, reason, expiry.
pub fn format_list(entries: &[SuppressionEntry]) -> String {
    if entries.is_empty() {
        return "no suppressed recipients\n".into();
    }
    let mut out = String::new();
    for e in entries {
        let _ = writeln!(
            out,
            "{}  {}  {}  {}",
            e.address,
            e.scope,
            e.reason,
            expiry(e.expires_ms)
        );
    }
    out
}
