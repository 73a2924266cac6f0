//! Real `redis-server` processes: one standalone server ([`RedisServer`]) or a
//! three-master cluster ([`RedisCluster`]), each in its own temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use mailrelay::config::{RedisConfig, Secret};
use tempfile::TempDir;

use super::free_ports;

/// Generous: a loaded CI machine with two cores may take a while to fork and
/// replay an AOF.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `redis-cli` against a local port; `Ok` holds trimmed stdout when it exited
/// successfully (a Redis error reply still counts as success, as redis-cli prints it).
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
        Err(format!(
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One `redis-server` process and what it takes to start it again.
struct Process {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    password: Option<String>,
    child: Option<Child>,
}

impl Process {
    fn new(port: u16, dir: PathBuf, extra: &[String], password: Option<String>) -> Self {
        std::fs::create_dir_all(&dir).expect("create redis dir");
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            dir.to_str().expect("utf-8 temp path"),
            "--logfile",
            dir.join("redis.log").to_str().unwrap(),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(pw) = &password {
            args.extend(["--requirepass".to_owned(), pw.clone()]);
        }
        args.extend(extra.iter().cloned());
        let mut p = Process {
            port,
            dir,
            args,
            password,
            child: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "redis on port {} is already running",
            self.port
        );
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed? see .ci/install-deps)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "redis-server on port {} exited with {status}:\n{}",
                    self.port,
                    log_tail(&self.dir.join("redis.log"))
                );
            }
            if redis_cli(self.port, self.password.as_deref(), &["PING"]).as_deref() == Ok("PONG") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING:\n{}",
                self.port,
                log_tail(&self.dir.join("redis.log"))
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, so Redis flushes and fsyncs its AOF as in an orderly pod shutdown.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL: a crash; Redis gets no chance to flush.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A standalone `redis-server` on a free loopback port, with AOF (`everysec`) and no
/// RDB snapshots, in a temporary directory. Killed on drop.
pub struct RedisServer {
    process: Process,
    // Declared after `process` so the directory outlives the server.
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(None, &[])
    }

    /// A server that requires `AUTH <password>`.
    pub fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password), &[])
    }

    /// `extra` is appended to the command line (e.g. `["--appendfsync", "always"]`).
    pub fn start_with(password: Option<&str>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_ports(1)[0];
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let process = Process::new(
            port,
            dir.path().to_owned(),
            &extra,
            password.map(str::to_owned),
        );
        RedisServer { process, _dir: dir }
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
    }

    pub fn dir(&self) -> &Path {
        &self.process.dir
    }

    /// A queue configuration for this server (standalone, no password) with `prefix`.
    pub fn config(&self, prefix: &str) -> RedisConfig {
        RedisConfig {
            url: self.url(),
            password: self.process.password.clone().map(Secret),
            cluster: false,
            cluster_nodes: vec![],
            key_prefix: prefix.to_owned(),
            wait_replicas: 0,
        }
    }

    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        redis_cli(self.port(), self.process.password.as_deref(), args)
    }

    /// Orderly shutdown (SIGTERM); waits until the process has exited.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Crash (SIGKILL); acknowledged writes newer than the last fsync may be lost.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port and directory (so it replays its AOF);
    /// stops it first if it is running. Returns once it answers PING.
    pub fn restart(&mut self) {
        self.process.stop();
        self.process.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.process.child.is_some()
    }
}

/// Three Redis Cluster masters on free loopback ports, no replicas, all 16384 slots
/// assigned. Killed on drop.
pub struct RedisCluster {
    nodes: Vec<Process>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Data ports and cluster-bus ports; the default bus port (port + 10000) could
        // be taken or out of range.
        let ports = free_ports(6);
        let nodes: Vec<Process> = (0..3)
            .map(|i| {
                let extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &ports[3 + i].to_string(),
                    "--cluster-node-timeout",
                    "5000",
                ]
                .map(str::to_owned);
                Process::new(ports[i], dir.path().join(format!("node{i}")), &extra, None)
            })
            .collect();
        let cluster = RedisCluster { nodes, _dir: dir };

        let addrs: Vec<String> = cluster
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let deadline = Instant::now() + READY_TIMEOUT;
        for port in cluster.ports() {
            loop {
                let info = redis_cli(port, None, &["CLUSTER", "INFO"]).unwrap_or_default();
                if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster node {port} not ok:\n{info}"
                );
                sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// A cluster queue configuration: the first node as `url`, the others as seeds.
    pub fn config(&self, prefix: &str) -> RedisConfig {
        let mut urls = self.urls();
        let url = urls.remove(0);
        RedisConfig {
            url,
            password: None,
            cluster: true,
            cluster_nodes: urls,
            key_prefix: prefix.to_owned(),
            wait_replicas: 0,
        }
    }

    /// Number of keys stored on the master at `port` (`DBSIZE`).
    pub fn dbsize(&self, port: u16) -> u64 {
        let out = redis_cli(port, None, &["DBSIZE"]).expect("DBSIZE");
        out.parse()
            .unwrap_or_else(|_| panic!("DBSIZE on {port} answered {out:?}"))
    }

    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, String> {
        redis_cli(port, None, args)
    }
}
