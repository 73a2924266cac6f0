//! Fixtures shared by the integration tests: `mod support;` in a test file.
//!
//! Each fixture starts real processes on free loopback ports and stops them on drop,
//! so tests can run in parallel and a failed test leaves nothing behind.

#![allow(dead_code)]

pub mod deliver;
pub mod dns;
pub mod mx;
pub mod pki;
pub mod postfix;
pub mod redis;

use std::net::TcpListener;

/// Ports that were free a moment ago. All are taken at once so that one call never
/// returns the same port twice; another process may still grab one before it is used.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

pub mod relay;
