//! Fixtures of the operator's integration tests (`crate::support`).
//!
//! - [`fake_api`]: an in-memory Kubernetes API behind kube's tower-test mock
//!   transport (no API server can run on these machines); [`rbac`]: what the
//!   operator's requests need of the chart's roles.
//! - [`relay`]: a real `mailrelay` process running a config the operator rendered;
//!   [`smtp`]: the peers around it (aiosmtpd, swaks, smtplib).
//! - [`redis`], free ports, raw HTTP: from `mailrelay-test-support`, which the
//!   relay's tests share.

#![allow(dead_code)]

pub mod dns;
pub mod fake_api;
pub mod rbac;
pub mod redis;
pub mod relay;
pub mod smtp;

pub use mailrelay_test_support::{free_ports, http_get_text};
