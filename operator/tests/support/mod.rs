//! Fixtures of the operator's integration tests (`mod support;`).
//!
//! - [`fake_api`]: an in-memory Kubernetes API behind kube's tower-test mock
//!   transport (no API server can run on these machines).
//! - [`redis`], [`relay`]: a real `redis-server` and a real `mailrelay` process on
//!   free loopback ports (trimmed copies of `relay/tests/support`).

#![allow(dead_code)]

pub mod dns;
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

/// `GET path` over a fresh HTTP/1.1 connection; the whole raw response (status
/// line, headers, body).
pub async fn http_get_text(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut resp = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.read_to_string(&mut resp),
    )
    .await
    .unwrap()
    .unwrap();
    resp
}
