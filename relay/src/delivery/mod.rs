//! Outbound delivery: where mail for a domain goes and how it gets there.
//!
//! [`mx`] turns a recipient domain into an ordered list of hosts and addresses
//! (RFC 5321 §5.1, RFC 7505).

pub mod mx;
pub mod smtp_client;
