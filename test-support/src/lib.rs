//! Fixtures shared by the relay's and the operator's integration tests: real
//! `redis-server` processes ([`redis`]), a throwaway CA ([`pki`]), a raw SMTP client
//! ([`smtp`]), free loopback ports, a Python helper process, and polling a condition
//! with a deadline ([`wait_until`]) instead of sleeping for a guessed time.
//!
//! Each fixture starts real processes on free loopback ports and stops them on drop,
//! so tests can run in parallel and a failed test leaves nothing behind.

pub mod pki;
pub mod redis;
pub mod smtp;
mod wait;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub use wait::{wait_for, wait_until, wait_until_async};

/// Ports that were free a moment ago, on every address (several fixtures listen on
/// the same port at 127.0.0.2, 127.0.0.3, ...). They are taken below the kernel's
/// ephemeral range (32768-60999 by default), so that no outgoing connection and no
/// port-0 listener of a test running alongside can take one before its server binds
/// it: with ports from the ephemeral range, that race failed a test now and then
/// (`address already in use`). A counter, started at a place that depends on the
/// process id, keeps the parallel tests of one binary (and other binaries) apart.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    let mut ports = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if ports.len() == n {
            break;
        }
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        // Free on the wildcard address means free on every loopback address.
        if let Ok(l) = TcpListener::bind(("0.0.0.0", port)) {
            held.push(l);
            ports.push(port);
        }
    }
    assert_eq!(
        ports.len(),
        n,
        "no {n} free ports in {FIRST}..{}",
        FIRST + SPAN
    );
    ports
}

/// Writes `script` to `dir` and starts it with `python3`, `cfg` (JSON) as its one
/// argument; returns once it printed its first line (its ready line), with that
/// line. Its stderr goes to the test's.
pub fn start_python(dir: &Path, script: &str, cfg: &serde_json::Value) -> (Child, String) {
    let path = dir.join("server.py");
    std::fs::write(&path, script).unwrap();
    let mut child = Command::new("python3")
        .arg(&path)
        .arg(cfg.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 (with aiosmtpd) must be installed: run .ci/install-deps");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
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
