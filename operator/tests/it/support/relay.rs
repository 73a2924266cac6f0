//! A real `mailrelay serve --config FILE` process.
//!
//! The binary belongs to another package of the workspace, so Cargo does not hand
//! its path to these tests; it is built (if needed) into the same target directory
//! with `cargo build -p mailrelay --bin mailrelay`, which is a no-op when
//! `cargo test --workspace` built it already.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `mailrelay` binary of this workspace, built on first use.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // <target>/debug/deps/<test binary> -> <target>/debug/mailrelay
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
        let target_dir = profile_dir.parent().unwrap().to_owned();
        let bin = profile_dir.join("mailrelay");
        // `cargo test --workspace` has built it already (the relay's own tests need
        // it); a nested build would pick other dependency features (only this
        // package selected) and recompile much of the tree for nothing.
        if up_to_date(&bin) {
            return bin;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The test's own CARGO_* variables (package name, manifest dir, ...) would
        // change the build's fingerprints and rebuild the relay's dependencies.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("CARGO_") && k != "CARGO_HOME" {
                cmd.env_remove(&k);
            }
        }
        let st = cmd
            .args(["build", "--quiet", "-p", "mailrelay", "--bin", "mailrelay"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .status()
            .expect("run cargo to build the mailrelay binary");
        assert!(st.success(), "cargo build -p mailrelay failed");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// Whether `bin` is newer than every source it is built from.
fn up_to_date(bin: &Path) -> bool {
    fn newest(p: &Path) -> Option<std::time::SystemTime> {
        let meta = std::fs::metadata(p).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        std::fs::read_dir(p)
            .ok()?
            .filter_map(|e| newest(&e.ok()?.path()))
            .max()
    }
    let Some(built) = std::fs::metadata(bin).and_then(|m| m.modified()).ok() else {
        return false;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ["relay/src", "relay/Cargo.toml", "Cargo.lock", "Cargo.toml"]
        .iter()
        .filter_map(|p| newest(&root.join(p)))
        .all(|t| t <= built)
}

pub struct RelayProcess {
    child: Option<Child>,
    pub smtp: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
}

impl RelayProcess {
    /// Starts `mailrelay serve --config config` with `env`, and waits until the SMTP
    /// listener at `smtp` accepts connections.
    pub fn start(
        config: &Path,
        smtp: SocketAddr,
        admin: SocketAddr,
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> RelayProcess {
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "mailrelay=debug")
            .env_remove("MAILRELAY_REDIS_URL")
            .env_remove("MAILRELAY_REDIS_PASSWORD")
            .env_remove("MAILRELAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn mailrelay");
        let mut p = RelayProcess {
            child: Some(child),
            smtp,
            admin,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(smtp).is_err() {
            if let Some(st) = p.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mailrelay exited with {st} before listening:\n{}", p.log());
            }
            assert!(
                Instant::now() < deadline,
                "mailrelay did not listen in time:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- mailrelay log ----\n{}", self.log());
        }
    }
}

/// ---- TEST SWAP ----
/// A config rendered for a pod listens on `0.0.0.0` with fixed ports and names Redis
/// by its in-cluster address. Tests running several relays side by side on one
/// machine move every listener and the admin port to free `127.0.0.1` ports and, if
/// given, point Redis at a local server. The admin token file (the mounted
/// `NAME-admin-token` Secret in a pod) does not exist here: `admin.token_file` is
/// cleared, which leaves `/api/` open on the loopback admin address; a test about
/// the token writes one and sets it again. Nothing else is changed. Returns the
/// listener addresses (in order) and the admin address.
pub fn localise(
    cfg: &mut mailrelay::config::RelayConfig,
    redis_url: Option<&str>,
) -> (Vec<SocketAddr>, SocketAddr) {
    let ports = super::free_ports(cfg.listeners.len() + 1);
    let mut addrs = Vec::new();
    for (l, port) in cfg.listeners.iter_mut().zip(&ports) {
        l.address = format!("127.0.0.1:{port}").parse().unwrap();
        addrs.push(l.address);
    }
    let admin: SocketAddr = format!("127.0.0.1:{}", ports[ports.len() - 1])
        .parse()
        .unwrap();
    cfg.admin.address = Some(admin);
    cfg.admin.token_file = None;
    if let (Some(url), Some(r)) = (redis_url, cfg.queue.redis.as_mut()) {
        r.url = url.to_owned();
    }
    (addrs, admin)
}
