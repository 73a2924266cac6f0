//! `mailrelay-operator`. The controllers arrive with the operator issue; today the
//! binary renders and checks relay configs the way the operator will.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mailrelay-operator",
    version,
    about = "Kubernetes operator for mailrelay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the normalised relay config (every default spelled out) for a YAML file.
    RenderConfig { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::RenderConfig { file } => {
            let cfg = mailrelay::config::RelayConfig::from_file(&file)?;
            print!("{}", mailrelay_operator::render_relay_config(&cfg)?);
        }
    }
    Ok(())
}
