//! A real standalone `redis-server` on a free loopback port, in a temporary
//! directory; killed on drop (trimmed from `relay/tests/it/support/redis.rs`).

use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::free_ports;

pub struct RedisServer {
    child: Child,
    port: u16,
    password: Option<String>,
    _dir: TempDir,
}

pub fn redis_cli(port: u16, password: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(pw) = password {
        cmd.args(["--no-auth-warning", "-a", pw]);
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && !stdout.starts_with("Could not connect") {
        Ok(stdout)
    } else {
        Err(stdout)
    }
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    pub fn start_with(password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_ports(1)[0];
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        let mut child = cmd
            .spawn()
            .expect("spawn redis-server (is it installed? see .ci/install-deps)");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("redis-server on port {port} exited with {st}");
            }
            if redis_cli(port, password, &["PING"]).as_deref() == Ok("PONG") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not answer PING"
            );
            sleep(Duration::from_millis(50));
        }
        RedisServer {
            child,
            port,
            password: password.map(str::to_owned),
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        redis_cli(self.port, self.password.as_deref(), args)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
