//! `mailrelay shaping [list] | lift <id>`: the response-rule states (suspensions
//! and throttles) the relays share, read from and lifted through the admin API
//! (`/api/v1/shaping`).

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use mailrelay_admin_api::Call;
use mailrelay_admin_api::types::{Lifted, ShapingList};

use super::queue::{DEFAULT_ADMIN, client, parse, request};

#[derive(Debug, Args)]
pub struct ShapingArgs {
    /// Admin API of the relay.
    #[arg(long, env = "MAILRELAY_ADMIN", default_value = DEFAULT_ADMIN, global = true)]
    pub admin: String,
    /// Print the API's JSON instead of the human-readable form.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub token: super::TokenArgs,
    #[command(subcommand)]
    pub command: Option<ShapingCommand>,
}

#[derive(Debug, Subcommand)]
pub enum ShapingCommand {
    /// Every state in force: scope, rule, the reply that started it, until when.
    List,
    /// Ends a state now (its id as `list` shows it: `<scope>@<site>`).
    Lift { id: String },
}

pub fn run(args: ShapingArgs) -> ExitCode {
    super::run_printing(execute(&args))
}

pub async fn execute(args: &ShapingArgs) -> Result<String, String> {
    let client = client(&args.admin, &args.token)?;
    match &args.command {
        None | Some(ShapingCommand::List) => {
            let body = request(&client, &Call::Shaping).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let list: ShapingList = parse(&body)?;
            Ok(format_list(&list))
        }
        Some(ShapingCommand::Lift { id }) => {
            let body = request(&client, &Call::ShapingLift(id.clone())).await?;
            if args.json {
                return Ok(body + "\n");
            }
            let l: Lifted = parse(&body)?;
            Ok(if l.lifted {
                format!("lifted {id}\n")
            } else {
                format!("{id}: nothing to lift\n")
            })
        }
    }
}

/// One line per state, then its reply indented.
pub fn format_list(l: &ShapingList) -> String {
    if l.states.is_empty() {
        return "no suspension or throttle in force\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(out, "{:<9} {:>9}  {:<28} ID", "ACTION", "LEFT", "RULE");
    for s in &l.states {
        let action = s.action_label();
        let _ = writeln!(
            out,
            "{:<9} {:>8}s  {:<28} {}",
            action, s.remaining_seconds, s.rule, s.id
        );
        let _ = writeln!(out, "          reply: {}", s.reply);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailrelay_admin_api::types::ShapingState;

    #[test]
    fn states_print_one_line_each_with_their_reply() {
        assert_eq!(
            format_list(&ShapingList::default()),
            "no suspension or throttle in force\n"
        );
        let l = ShapingList {
            states: vec![ShapingState {
                id: ShapingState::id_of("dkim_domain:a.test", "mx.provider.test"),
                site: "mx.provider.test".into(),
                scope: "dkim_domain:a.test".into(),
                rule: "testprovider-rate".into(),
                action: "suspend".into(),
                factor: None,
                rate: None,
                max_connections: None,
                until_ms: 1,
                remaining_seconds: 90,
                reply: "421 4.7.28 slow down".into(),
            }],
        };
        let t = format_list(&l);
        assert!(t.contains("suspend         90s  testprovider-rate"), "{t}");
        assert!(t.contains("dkim_domain:a.test@mx.provider.test"), "{t}");
        assert!(t.contains("reply: 421 4.7.28 slow down"), "{t}");
        assert_eq!(
            ShapingState::parse_id("auth_user:u@x.test@mx.provider.test"),
            Some(("mx.provider.test", "auth_user:u@x.test"))
        );
    }
}
