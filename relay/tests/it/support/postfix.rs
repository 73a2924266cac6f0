//! A private Postfix instance for tests, run as root from a temporary config and
//! queue directory, so the machine's own Postfix configuration is neither read nor
//! changed; `/etc/postfix/main.cf` need not even exist. (`alternate_config_directories`
//! there only restricts non-root users of the set-gid commands; root may use
//! `postfix -c DIR` and `postqueue -c DIR` freely. A fresh queue directory needs no
//! `postfix check` or `set-permissions`: `postfix start` creates its subdirectories.)
//!
//! Postfix instances never overlap, within a test binary (a mutex) or across test
//! processes (a lock file). Postfix starts in about 0.3 s and stops in about 1 s.

use std::fs::File;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::free_ports;

/// Where an external program lives. Panics (fails the test) when it is missing: CI
/// installs every client these tests drive (.ci/install-deps), and a skip would hide
/// a lost scenario.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed; run .ci/install-deps (CI installs every program these tests drive)"
            )
        })
}

pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn text(&self) -> String {
        format!(
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a command to completion, killing it (and failing) if it hangs.
pub fn run(cmd: &mut Command, limit: Duration) -> Run {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: String::from_utf8_lossy(&out_t.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap()).into_owned(),
    }
}

static POSTFIX_LOCK: Mutex<()> = Mutex::new(());

/// A private Postfix instance, by default relaying everything to
/// `[127.0.0.1]:relay_port`.
pub struct Postfix {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Postfix's own smtpd.
    pub port: u16,
    master_pid: Option<u32>,
    _lock_file: File,
    _guard: MutexGuard<'static, ()>,
}

impl Postfix {
    pub fn start(relay_port: u16) -> Postfix {
        Self::start_with(relay_port, "")
    }

    /// `extra` is appended to main.cf (a later setting overrides an earlier one).
    pub fn start_with(relay_port: u16, extra: &str) -> Postfix {
        Self::start_inner(Some(relay_port), extra)
    }

    /// A Postfix that relays nowhere (no `relayhost`); `extra` (appended to main.cf)
    /// says what it delivers itself.
    pub fn start_final(extra: &str) -> Postfix {
        Self::start_inner(None, extra)
    }

    fn start_inner(relay_port: Option<u16>, extra: &str) -> Postfix {
        // A test that panicked while holding the lock has already stopped its Postfix.
        let guard = POSTFIX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let lock_file = File::create(std::env::temp_dir().join("mailrelay-postfix-tests.lock"))
            .expect("create the Postfix test lock file");
        lock_file.lock().expect("lock the Postfix test lock file");

        let postfix = tool("postfix");
        let postconf = tool("postconf");
        let master_dist = Path::new("/usr/share/postfix/master.cf.dist");
        assert!(
            master_dist.is_file(),
            "{} is missing; is the postfix package installed?",
            master_dist.display()
        );
        let dir = tempfile::tempdir().unwrap();
        // Postfix daemons drop root privileges and must still reach the queue and
        // the log file below this directory.
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(dir.path(), mode).unwrap();
        let config = dir.path().join("etc");
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&config).unwrap();
        // Postfix creates the queue's subdirectories, but not the queue directory.
        std::fs::create_dir_all(&spool).unwrap();
        let port = free_ports(1)[0];
        let d = dir.path().display();
        let relayhost = relay_port.map_or(String::new(), |p| format!("[127.0.0.1]:{p}"));
        std::fs::write(
            config.join("main.cf"),
            format!(
                "compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
myhostname = pf.test
mydomain = pf.test
myorigin = $myhostname
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = {relayhost}
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
append_dot_mydomain = no
biff = no
# No syslog in a container: postlogd writes here (the prefix list must allow it).
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
# A refused or failed delivery must show up as a test failure, not wait in the queue.
maximal_queue_lifetime = 0
bounce_queue_lifetime = 0
{extra}"
            ),
        )
        .unwrap();
        std::fs::copy(master_dist, config.join("master.cf")).unwrap();
        let listen = format!("127.0.0.1:{port}");
        for args in [
            vec!["-M#".to_owned(), "smtp/inet".to_owned()],
            vec![
                "-M".to_owned(),
                format!("{listen}/inet={listen} inet n - n - - smtpd"),
            ],
            // Debian chroots some daemons, which would need copies of /etc files.
            vec!["-F".to_owned(), "*/*/chroot = n".to_owned()],
        ] {
            let r = run(
                Command::new(&postconf).arg("-c").arg(&config).args(&args),
                Duration::from_secs(30),
            );
            assert!(r.status.success(), "postconf {args:?}: {}", r.text());
        }
        let mut pf = Postfix {
            dir,
            config,
            port,
            master_pid: None,
            _lock_file: lock_file,
            _guard: guard,
        };
        // Postfix reports to syslog or its log file, not to a non-terminal stderr.
        let r = run(
            Command::new(&postfix)
                .arg("-c")
                .arg(&pf.config)
                .arg("start"),
            Duration::from_secs(60),
        );
        assert!(
            r.status.success(),
            "postfix start failed: {}\n--- maillog ---\n{}",
            r.text(),
            pf.maillog()
        );
        let pid_file = spool.join("pid/master.pid");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if pid.is_some() && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                pf.master_pid = pid;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Postfix did not listen on {listen}:\n{}",
                pf.maillog()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pf
    }

    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    pub fn queue_listing(&self) -> String {
        run(
            Command::new(tool("postqueue"))
                .arg("-c")
                .arg(&self.config)
                .arg("-p"),
            Duration::from_secs(30),
        )
        .text()
    }

    pub fn stop(&mut self) {
        let Some(pid) = self.master_pid.take() else {
            return;
        };
        let _ = run(
            Command::new(tool("postfix"))
                .arg("-c")
                .arg(&self.config)
                .arg("stop"),
            Duration::from_secs(60),
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while alive(pid) {
            if Instant::now() > deadline {
                // Our own master process, by its pid; its children follow it.
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- postfix maillog ----\n{}", self.maillog());
        }
    }
}

/// Whether a process exists and is not a zombie (the daemonized master is reparented,
/// and nobody may reap it in a container).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(|c| c != 'Z'))
        })
        .unwrap_or(false)
}
