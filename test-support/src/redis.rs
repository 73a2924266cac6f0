//! Real `redis-server` processes: one standalone server ([`RedisServer`]), a
//! three-master cluster ([`RedisCluster`]), or a master, a replica and sentinels
//! ([`RedisSentinel`]), each in its own temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use mailrelay::config::{RedisConfig, Secret};
use tempfile::TempDir;

use crate::free_ports;

/// Generous: a loaded CI machine with two cores may take a while to fork and
/// replay an AOF.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `redis-cli` against a local port; `Ok` holds trimmed stdout when it exited
/// successfully (a Redis error reply still counts as success, as redis-cli prints it).
pub fn redis_cli(port: u16, password: Option<&str>, args: &[&str]) -> Result<String, String> {
    redis_cli_tls(port, password, None, args)
}

/// [`redis_cli`] over TLS when `ca` (the CA that signed the server) is given.
pub fn redis_cli_tls(
    port: u16,
    password: Option<&str>,
    ca: Option<&Path>,
    args: &[&str],
) -> Result<String, String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(ca) = ca {
        cmd.arg("--tls").arg("--cacert").arg(ca);
    }
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
    /// The CA of the server's certificate when it speaks only TLS.
    ca: Option<PathBuf>,
    child: Option<Child>,
}

impl Process {
    fn new(port: u16, dir: PathBuf, extra: &[String], password: Option<String>) -> Self {
        Self::new_with_ca(port, dir, extra, password, None)
    }

    fn new_with_ca(
        port: u16,
        dir: PathBuf,
        extra: &[String],
        password: Option<String>,
        ca: Option<PathBuf>,
    ) -> Self {
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
        Self::raw(port, dir, args, password, ca)
    }

    /// A process with exactly `args` (a sentinel: its config file and `--sentinel`).
    fn raw(
        port: u16,
        dir: PathBuf,
        args: Vec<String>,
        password: Option<String>,
        ca: Option<PathBuf>,
    ) -> Self {
        let mut p = Process {
            port,
            dir,
            args,
            password,
            ca,
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
            if redis_cli_tls(
                self.port,
                self.password.as_deref(),
                self.ca.as_deref(),
                &["PING"],
            )
            .as_deref()
                == Ok("PONG")
            {
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
            wait_timeout: mailrelay::config::default_wait_timeout(),
            fresh_list: true,
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
        Self::start_nodes(3, 0, 5000)
    }

    /// Three masters with one replica each (`--cluster-replicas 1`), failure
    /// detection after `node_timeout_ms`.
    pub fn start_replicated(node_timeout_ms: u64) -> Self {
        Self::start_nodes(6, 1, node_timeout_ms)
    }

    fn start_nodes(n: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Data ports and cluster-bus ports; the default bus port (port + 10000) could
        // be taken or out of range.
        let ports = free_ports(2 * n);
        let nodes: Vec<Process> = (0..n)
            .map(|i| {
                let extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &ports[n + i].to_string(),
                    "--cluster-node-timeout",
                    &node_timeout_ms.to_string(),
                    // A replica always stands for election: on a loaded test machine
                    // its last contact with the master can look too old, and then
                    // no replica is ever promoted (the default factor is 10).
                    "--cluster-replica-validity-factor",
                    "0",
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
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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
            wait_timeout: mailrelay::config::default_wait_timeout(),
            fresh_list: true,
        }
    }

    /// The ports of the nodes that are masters now (`CLUSTER NODES` as seen by a
    /// live node), without failed ones.
    pub fn master_ports(&self) -> Vec<u16> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(out) = redis_cli(n.port, None, &["CLUSTER", "NODES"]) else {
                continue;
            };
            let mut masters: Vec<u16> = out
                .lines()
                .filter(|l| l.contains("master") && !l.contains("fail"))
                .filter_map(|l| {
                    let addr = l.split_whitespace().nth(1)?;
                    addr.split(['@', ','])
                        .next()?
                        .rsplit(':')
                        .next()?
                        .parse()
                        .ok()
                })
                .collect();
            masters.sort_unstable();
            return masters;
        }
        Vec::new()
    }

    /// SIGKILL of the node at `port`.
    pub fn kill_node(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.kill();
        }
    }

    /// Starts the node at `port` again (same directory and `nodes.conf`: it rejoins).
    pub fn restart_node(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.stop();
            n.spawn();
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

/// Redis Sentinel: a master, one replica (`--replicaof`) and `n` sentinels
/// (`redis-server <conf> --sentinel`) monitoring them as [`RedisSentinel::MASTER`],
/// all on free loopback ports with short failure detection. Killed on drop.
pub struct RedisSentinel {
    /// The two data nodes; which one is master changes with a failover.
    nodes: Vec<Process>,
    sentinels: Vec<Process>,
    password: Option<String>,
    sentinel_password: Option<String>,
    /// Set when everything speaks TLS.
    ca: Option<PathBuf>,
    _dir: TempDir,
}

impl RedisSentinel {
    pub const MASTER: &'static str = "mymaster";

    /// `password` protects the data nodes (`requirepass`, and `masterauth` so either
    /// can replicate from the other), `sentinel_password` the sentinels. Returns once
    /// the replica is in sync and every sentinel knows the replica (and, with more
    /// than one, the other sentinels), so a failover can start at once.
    pub fn start(
        sentinels: usize,
        password: Option<&str>,
        sentinel_password: Option<&str>,
    ) -> Self {
        Self::start_with(sentinels, password, sentinel_password, None)
    }

    /// [`RedisSentinel::start`], every node and sentinel speaking only TLS with the
    /// certificate of `pki` (which must name `127.0.0.1`); URLs are then
    /// `rediss+sentinel://`.
    pub fn start_tls(sentinels: usize, pki: &crate::pki::Pki) -> Self {
        Self::start_with(sentinels, None, None, Some(pki))
    }

    fn start_with(
        sentinels: usize,
        password: Option<&str>,
        sentinel_password: Option<&str>,
        pki: Option<&crate::pki::Pki>,
    ) -> Self {
        assert!(sentinels >= 1);
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(2 + sentinels);
        // A replica syncs at once rather than after the default 5 s wait for others.
        let mut common: Vec<String> = vec!["--repl-diskless-sync-delay".into(), "0".into()];
        if let Some(pw) = password {
            common.extend(["--masterauth".to_owned(), pw.to_owned()]);
        }
        // The same settings, as config file lines for the sentinels.
        let mut tls_conf = String::new();
        if let Some(pki) = pki {
            let settings = [
                ("tls-cert-file", pki.cert().display().to_string()),
                ("tls-key-file", pki.key().display().to_string()),
                ("tls-ca-cert-file", pki.ca().display().to_string()),
                ("tls-auth-clients", "no".to_owned()),
                ("tls-replication", "yes".to_owned()),
            ];
            for (k, v) in settings {
                common.extend([format!("--{k}"), v.clone()]);
                tls_conf.push_str(&format!("{k} {v}\n"));
            }
        }
        let ca = pki.map(|p| p.ca());
        let node = |i: usize, extra: &[String]| {
            let mut args = common.clone();
            if pki.is_some() {
                // Later arguments win: TLS on the port, plain TCP off.
                args.extend([
                    "--port".to_owned(),
                    "0".to_owned(),
                    "--tls-port".to_owned(),
                    ports[i].to_string(),
                ]);
            }
            args.extend(extra.iter().cloned());
            Process::new_with_ca(
                ports[i],
                dir.path().join(format!("node{i}")),
                &args,
                password.map(str::to_owned),
                ca.clone(),
            )
        };
        let master = node(0, &[]);
        let replica = node(
            1,
            &[
                "--replicaof".to_owned(),
                "127.0.0.1".to_owned(),
                ports[0].to_string(),
            ],
        );
        let mut s = RedisSentinel {
            nodes: vec![master, replica],
            sentinels: Vec::new(),
            password: password.map(str::to_owned),
            sentinel_password: sentinel_password.map(str::to_owned),
            ca: ca.clone(),
            _dir: dir,
        };
        s.wait_replica_synced(ports[0], ports[1]);

        let quorum = sentinels / 2 + 1;
        for (i, port) in ports[2..].iter().enumerate() {
            let sdir = s._dir.path().join(format!("sentinel{i}"));
            std::fs::create_dir_all(&sdir).expect("create sentinel dir");
            let listen = if pki.is_some() {
                format!("port 0\ntls-port {port}\n{tls_conf}")
            } else {
                format!("port {port}\n")
            };
            let mut conf = format!(
                "{listen}bind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/redis.log\n\
                 sentinel monitor {m} 127.0.0.1 {master} {quorum}\n\
                 sentinel down-after-milliseconds {m} 1000\n\
                 sentinel failover-timeout {m} 10000\n\
                 sentinel parallel-syncs {m} 1\n",
                dir = sdir.display(),
                m = Self::MASTER,
                master = ports[0],
            );
            if let Some(pw) = password {
                conf.push_str(&format!("sentinel auth-pass {} {pw}\n", Self::MASTER));
            }
            if let Some(pw) = sentinel_password {
                // Sentinels authenticate to each other with the same password.
                conf.push_str(&format!("requirepass {pw}\nsentinel sentinel-pass {pw}\n"));
            }
            // Sentinel rewrites its configuration file, so it must be its own.
            let conf_path = sdir.join("sentinel.conf");
            std::fs::write(&conf_path, conf).expect("write sentinel.conf");
            s.sentinels.push(Process::raw(
                *port,
                sdir,
                vec![conf_path.display().to_string(), "--sentinel".to_owned()],
                sentinel_password.map(str::to_owned),
                ca.clone(),
            ));
        }
        s.wait_sentinels_ready(ports[0], sentinels);
        s
    }

    /// `redis+sentinel://[:PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,.../mymaster`.
    pub fn url(&self) -> String {
        let auth = self
            .sentinel_password
            .as_ref()
            .map(|pw| format!(":{pw}@"))
            .unwrap_or_default();
        let hosts: Vec<String> = self
            .sentinel_ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let scheme = if self.ca.is_some() {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        format!("{scheme}://{auth}{}/{}", hosts.join(","), Self::MASTER)
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// A queue configuration for this deployment (its sentinel URL, the data
    /// password) with `prefix`.
    pub fn config(&self, prefix: &str) -> RedisConfig {
        RedisConfig {
            url: self.url(),
            password: self.password.clone().map(Secret),
            cluster: false,
            cluster_nodes: vec![],
            key_prefix: prefix.to_owned(),
            wait_replicas: 0,
            wait_timeout: mailrelay::config::default_wait_timeout(),
            fresh_list: true,
        }
    }

    /// A command on a data node (with the data password).
    pub fn node_cli(&self, port: u16, args: &[&str]) -> Result<String, String> {
        redis_cli_tls(port, self.password.as_deref(), self.ca.as_deref(), args)
    }

    /// A command on the `i`-th sentinel (with the sentinel password).
    pub fn sentinel_cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        redis_cli_tls(
            self.sentinels[i].port,
            self.sentinel_password.as_deref(),
            self.ca.as_deref(),
            args,
        )
    }

    /// The master's port as every sentinel names it, once they agree.
    pub fn master_port(&self) -> Option<u16> {
        let mut named = None;
        for i in 0..self.sentinels.len() {
            let out = self
                .sentinel_cli(i, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER])
                .ok()?;
            let port: u16 = out.lines().nth(1)?.trim().parse().ok()?;
            if named.is_some_and(|p| p != port) {
                return None;
            }
            named = Some(port);
        }
        named
    }

    /// The `role` line of a node's `INFO replication`, and the rest of it.
    fn replication(&self, port: u16) -> String {
        self.node_cli(port, &["INFO", "replication"])
            .unwrap_or_default()
    }

    fn wait_replica_synced(&self, master: u16, replica: u16) {
        wait_for(
            &format!("replica {replica} in sync with master {master}"),
            || {
                let r = self.replication(replica);
                let m = self.replication(master);
                r.contains("role:slave")
                    && r.contains(&format!("master_port:{master}"))
                    && r.contains("master_link_status:up")
                    && m.contains("role:master")
                    && m.lines().any(|l| {
                        l.starts_with("slave0:")
                            && l.contains(&format!("port={replica}"))
                            && l.contains("state=online")
                    })
            },
        );
    }

    fn wait_sentinels_ready(&self, master: u16, n: usize) {
        for i in 0..n {
            wait_for(
                &format!("sentinel {i} knowing master {master}, its replica and its peers"),
                || {
                    let Ok(replicas) =
                        self.sentinel_cli(i, &["SENTINEL", "REPLICAS", Self::MASTER])
                    else {
                        return false;
                    };
                    let Ok(masters) = self.sentinel_cli(i, &["SENTINEL", "MASTER", Self::MASTER])
                    else {
                        return false;
                    };
                    // Flat `field\nvalue` lines.
                    let field = |text: &str, name: &str| {
                        let lines: Vec<&str> = text.lines().collect();
                        lines
                            .iter()
                            .position(|l| l.trim() == name)
                            .and_then(|p| lines.get(p + 1).map(|v| v.trim().to_owned()))
                    };
                    field(&masters, "port").as_deref() == Some(&master.to_string())
                        && field(&masters, "flags").as_deref() == Some("master")
                        && field(&masters, "num-other-sentinels").as_deref()
                            == Some(&(n - 1).to_string())
                        && field(&replicas, "flags").as_deref() == Some("slave")
                        && field(&replicas, "master-link-status").as_deref() == Some("ok")
                },
            );
        }
    }

    /// `SENTINEL FAILOVER` (the master is alive: it is demoted and follows the new
    /// one). Returns the new master's port once every sentinel names it, it says it is
    /// master, and the old master replicates from it in sync.
    pub fn failover(&self) -> u16 {
        let old = self.master_port().expect("sentinels agree on a master");
        let new = *self.node_ports().iter().find(|p| **p != old).unwrap();
        let out = self
            .sentinel_cli(0, &["SENTINEL", "FAILOVER", Self::MASTER])
            .expect("SENTINEL FAILOVER");
        assert_eq!(out, "OK", "SENTINEL FAILOVER answered {out:?}");
        wait_for(&format!("sentinels to name {new} master"), || {
            self.master_port() == Some(new)
        });
        self.wait_replica_synced(new, old);
        new
    }

    /// SIGKILL of the current master; returns the new master's port once the
    /// sentinels have promoted the replica and it says it is master.
    pub fn kill_master(&mut self) -> u16 {
        let old = self.master_port().expect("sentinels agree on a master");
        let new = *self.node_ports().iter().find(|p| **p != old).unwrap();
        self.nodes
            .iter_mut()
            .find(|n| n.port == old)
            .unwrap()
            .kill();
        wait_for(
            &format!("sentinels to promote {new} after {old} died"),
            || self.master_port() == Some(new) && self.replication(new).contains("role:master"),
        );
        new
    }

    /// Message keys (`<prefix>:*:m:*`) stored on the node at `port`.
    pub fn message_keys(&self, port: u16, prefix: &str) -> Vec<String> {
        self.node_cli(port, &["KEYS", &format!("{prefix}:*:m:*")])
            .expect("KEYS")
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The last lines of the sentinels' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.sentinels
            .iter()
            .chain(&self.nodes)
            .map(|p| format!("--- {}:\n{}", p.port, log_tail(&p.dir.join("redis.log"))))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Polls `ok` until it holds, for up to a minute.
fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(100));
    }
}
