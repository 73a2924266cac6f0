//! What the Python test servers (`mx`, `webhook`) share: starting the script, the
//! `ready <port>` handshake, reading the JSON lines it records, polling them, and
//! killing the process on drop.

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A Python server started by [`super::start_python`] that prints `ready <port>`
/// once it listens; killed on drop.
pub struct PythonServer {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    /// Its files (script, config files, the records it writes).
    pub dir: tempfile::TempDir,
}

impl PythonServer {
    /// Runs `script` with `cfg`; panics naming `what` if it does not report ready.
    pub fn start(what: &str, dir: tempfile::TempDir, script: &str, cfg: &Value) -> Self {
        let (child, line) = super::start_python(dir.path(), script, cfg);
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{what} did not start with {cfg} (printed {line:?})"));
        PythonServer { child, port, dir }
    }

    /// The JSON lines of the server's file `name`. The server may be writing a line
    /// right now: only complete lines (ended by a newline) count; the rest is read
    /// next time.
    pub fn lines(&self, name: &str) -> Vec<Value> {
        json_lines(&self.dir.path().join(name))
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON lines of the record file `path` (none while it does not exist). Its
/// writer may be mid-line: only complete lines (ended by a newline) count; the rest
/// is read next time.
pub fn json_lines(path: &std::path::Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Polls `read` (every 100 ms, up to a minute) until `pred` holds for what it
/// returns; on timeout panics with `what`, the records (`seen`: what they are) and
/// `log` (the relay's).
pub fn wait_for(
    what: &str,
    seen: &str,
    log: impl Fn() -> String,
    read: impl Fn() -> Vec<Value>,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = read();
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; {seen} {r:#?}\nrelay log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
