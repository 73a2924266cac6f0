//! Client subcommands of the `mailrelay` binary that talk to a running relay.

pub mod queue;
pub mod quota;
