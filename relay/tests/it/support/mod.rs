//! The relay's own fixtures (`crate::support`); what the operator's tests use too
//! (Redis, a CA, plain SMTP, free ports, polling) is in the `mailrelay-test-support`
//! crate and re-exported here under the same paths.
//!
//! Each fixture starts real processes on free loopback ports and stops them on drop,
//! so tests can run in parallel and a failed test leaves nothing behind.

#![allow(dead_code)]

pub mod deliver;
pub mod dns;
pub mod message;
pub mod mx;
pub mod postfix;
pub mod python_server;
pub mod relay;
pub mod webhook;

pub use mailrelay_test_support::{free_ports, pki, redis, start_python};
