//! Fixtures of the operator's integration tests (`mod support;`).
//!
//! - [`fake_api`]: an in-memory Kubernetes API behind kube's tower-test mock
//!   transport (no API server can run on these machines).
//! - [`redis`], [`relay`]: a real `redis-server` and a real `mailrelay` process on
//!   free loopback ports (trimmed copies of `relay/tests/support`).

#![allow(dead_code)]

pub mod fake_api;
pub mod rbac;
pub mod redis;
pub mod relay;
pub mod smtp;

use std::net::TcpListener;

/// Ports that were free a moment ago (all bound at once, so never the same twice).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}
