//! `limits:`: per-session and per-client limits of the SMTP server.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::duration_str;
use super::{ConfigError, invalid};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted, in bytes (advertised as SIZE).
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Longest text line in DATA, in octets including CRLF (RFC 5321: 1000).
    pub max_line_length: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Open sessions per client network (see the prefixes); 0 turns it off.
    /// Clients inside `relay_networks` are not counted.
    pub max_connections_per_network: usize,
    pub network_prefix_v4: u8,
    pub network_prefix_v6: u8,
    /// Slots of `max_connections` kept for clients inside `relay_networks` and
    /// addresses that authenticated lately; at most half of `max_connections` is
    /// kept, so a small `max_connections` needs no matching change here.
    pub reserved_connections: usize,
    /// When the relay is full, a session idle (outside a transaction) this long may
    /// be closed to admit a new client, the one idle longest first; 0 turns it off.
    #[serde(with = "duration_str")]
    pub evict_idle_after: Duration,
    /// Protocol errors in one session before `421` and close.
    pub max_errors: u32,
    /// Messages in one session before `421`.
    pub max_messages_per_connection: u32,
    /// Waiting for the next command (RFC 5321 4.5.3.2.7: at least 5 minutes).
    #[serde(with = "duration_str")]
    pub command_timeout: Duration,
    /// Waiting for the next chunk of message data (RFC 5321 4.5.3.2.6: 10 minutes
    /// for the terminator, 3 minutes per block).
    #[serde(with = "duration_str")]
    pub data_timeout: Duration,
    /// Whole-session ceiling, so a trickling client cannot hold a slot forever.
    #[serde(with = "duration_str")]
    pub session_timeout: Duration,
    /// Message content (DATA or BDAT chunks) must arrive at this many bytes per
    /// second or more, averaged over each `data_rate_window`; 0 turns it off.
    pub data_min_rate: u64,
    #[serde(with = "duration_str")]
    pub data_rate_window: Duration,
    /// One message's content, from `354` (or the first BDAT) to its end, must
    /// arrive within this.
    #[serde(with = "duration_str")]
    pub data_deadline: Duration,
    /// Octets of DATA read past `max_message_size` (to find the end and answer
    /// `552` in sync) before the connection is cut instead.
    pub data_oversize_drain: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_line_length: 1000,
            max_connections: 1000,
            max_connections_per_ip: 100,
            max_connections_per_network: 250,
            network_prefix_v4: 24,
            network_prefix_v6: 64,
            reserved_connections: 50,
            evict_idle_after: Duration::from_secs(10),
            max_errors: 10,
            max_messages_per_connection: 1000,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            session_timeout: Duration::from_secs(3600),
            data_min_rate: 256,
            data_rate_window: Duration::from_secs(60),
            data_deadline: Duration::from_secs(1800),
            data_oversize_drain: 1024 * 1024,
        }
    }
}

impl Limits {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let l = self;
        if l.max_line_length < 80 || l.max_line_length > 1_000_000 {
            return Err(invalid(
                "limits.max_line_length",
                "must be between 80 and 1000000",
            ));
        }
        if l.max_message_size < 1024 {
            return Err(invalid(
                "limits.max_message_size",
                "must be at least 1024 bytes",
            ));
        }
        for (field, v) in [
            ("limits.max_recipients", l.max_recipients),
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if l.max_errors == 0 || l.max_messages_per_connection == 0 {
            return Err(invalid(
                "limits",
                "max_errors and max_messages_per_connection must be at least 1",
            ));
        }
        if !(1..=32).contains(&l.network_prefix_v4) {
            return Err(invalid(
                "limits.network_prefix_v4",
                "must be between 1 and 32",
            ));
        }
        if !(1..=128).contains(&l.network_prefix_v6) {
            return Err(invalid(
                "limits.network_prefix_v6",
                "must be between 1 and 128",
            ));
        }
        if l.data_min_rate > 0 && l.data_rate_window.is_zero() {
            return Err(invalid(
                "limits.data_rate_window",
                "must be greater than zero while limits.data_min_rate is set",
            ));
        }
        for (field, d) in [
            ("limits.data_deadline", l.data_deadline),
            ("limits.command_timeout", l.command_timeout),
            ("limits.data_timeout", l.data_timeout),
            ("limits.session_timeout", l.session_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        Ok(())
    }
}
