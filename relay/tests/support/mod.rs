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

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};

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

pub mod relay;
