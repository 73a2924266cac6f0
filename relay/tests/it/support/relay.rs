//! A real `mailrelay serve` process on free loopback ports, configured per test.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailrelay::queue::{EmbeddedQueue, Queue, QueuedMessage};

use super::free_ports;

// Plain SMTP lives in the shared test crate; its TLS twin stays here with rustls.
pub use mailrelay_test_support::smtp::{SmtpConn, code};

/// How to configure a relay under test. Unset fields keep the relay's defaults,
/// except that ports are free ones and the queue lives in a temp dir.
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// `relay_networks`; `None` keeps the default (loopback).
    pub relay_networks: Option<Vec<String>>,
    /// Generate a self-signed certificate (CN and SAN `relay.test`, IP 127.0.0.1)
    /// and configure it; STARTTLS is then offered.
    pub tls: bool,
    /// Also open an implicit-TLS listener (needs `tls`).
    pub implicit_tls: bool,
    /// `username:password` lines for SMTP AUTH.
    pub auth_users: Option<String>,
    /// With `auth_users`: the body of `auth.throttle` as flow-mapping entries
    /// (`delay: 100ms, max_failures: 3`).
    pub auth_throttle: Option<String>,
    /// Use the Redis backend at this URL instead of the embedded queue.
    pub redis_url: Option<String>,
    /// With `redis_url`: speak Redis Cluster, with these further seed nodes.
    pub redis_cluster_nodes: Option<Vec<String>>,
    /// The main listener expects a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Extra lines inside `limits:` (each like `max_recipients: 5`).
    pub limits: Vec<String>,
    /// Extra lines inside `queue:` (each like `status_retention: 2s`).
    pub queue: Vec<String>,
    /// Environment variables for the relay process (`MAILRELAY_SMARTHOST_PASSWORD`…).
    pub env: Vec<(String, String)>,
    /// Extra top-level YAML, appended verbatim.
    pub extra_yaml: String,
    /// `shutdown_grace` (e.g. `2s`); `None` keeps the harness's `5s`.
    pub shutdown_grace: Option<String>,
    /// Written to `DIR/admin-token` and configured as `admin.token_file`.
    pub admin_token: Option<String>,
    /// The admin listener binds `0.0.0.0` (the test still connects to 127.0.0.1).
    pub admin_any_address: bool,
}

pub struct Relay {
    child: Option<Child>,
    env: Vec<(String, String)>,
    pub smtp: SocketAddr,
    /// The implicit-TLS listener, when requested.
    pub smtps: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// PEM of the generated certificate (trust anchor for clients), when `tls`.
    pub cert_path: Option<PathBuf>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_mailrelay")
}

/// Writes a self-signed certificate and key for `relay.test` / 127.0.0.1.
pub fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=relay.test",
        ])
        .args(["-addext", "subjectAltName=DNS:relay.test,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(st.success(), "openssl req failed");
    (cert, key)
}

impl Relay {
    pub fn start(opts: RelayOptions) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = free_ports(3);
        let smtp: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
        let smtps = opts
            .implicit_tls
            .then(|| format!("127.0.0.1:{}", ports[2]).parse().unwrap());
        let mut y = String::new();
        writeln!(y, "hostname: relay.test").unwrap();
        writeln!(y, "listeners:").unwrap();
        writeln!(
            y,
            "  - {{name: smtp, address: '{smtp}', proxy_protocol: {}}}",
            opts.proxy_protocol
        )
        .unwrap();
        if let Some(a) = smtps {
            writeln!(y, "  - {{name: smtps, address: '{a}', tls: implicit}}").unwrap();
        }
        let admin_bind = if opts.admin_any_address {
            format!("0.0.0.0:{}", admin.port())
        } else {
            admin.to_string()
        };
        match &opts.admin_token {
            Some(t) => {
                let p = dir.path().join("admin-token");
                std::fs::write(&p, format!("{t}\n")).unwrap();
                writeln!(
                    y,
                    "admin: {{address: '{admin_bind}', token_file: '{}'}}",
                    p.display()
                )
                .unwrap();
            }
            None => writeln!(y, "admin: {{address: '{admin_bind}'}}").unwrap(),
        }
        if let Some(nets) = &opts.relay_networks {
            writeln!(
                y,
                "relay_networks: [{}]",
                nets.iter()
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
            .unwrap();
        }
        let mut cert_path = None;
        if opts.tls {
            let (cert, key) = make_cert(dir.path());
            writeln!(
                y,
                "tls: {{cert_file: '{}', key_file: '{}', reload_interval: 1s}}",
                cert.display(),
                key.display()
            )
            .unwrap();
            cert_path = Some(cert);
        }
        if let Some(users) = &opts.auth_users {
            let p = dir.path().join("users");
            std::fs::write(&p, users).unwrap();
            let throttle = opts
                .auth_throttle
                .as_ref()
                .map(|t| format!(", throttle: {{{t}}}"))
                .unwrap_or_default();
            writeln!(y, "auth: {{users_file: '{}'{throttle}}}", p.display()).unwrap();
        }
        writeln!(y, "queue:").unwrap();
        writeln!(y, "  path: '{}'", dir.path().join("queue").display()).unwrap();
        writeln!(y, "  write_timeout: 3s").unwrap();
        for l in &opts.queue {
            writeln!(y, "  {l}").unwrap();
        }
        if let Some(url) = &opts.redis_url {
            let cluster = match &opts.redis_cluster_nodes {
                Some(nodes) => format!(
                    ", cluster: true, cluster_nodes: [{}]",
                    nodes
                        .iter()
                        .map(|n| format!("'{n}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => String::new(),
            };
            writeln!(
                y,
                "  redis: {{url: '{url}', key_prefix: 'mrtest'{cluster}}}"
            )
            .unwrap();
        }
        if !opts.limits.is_empty() {
            writeln!(y, "limits:").unwrap();
            for l in &opts.limits {
                writeln!(y, "  {l}").unwrap();
            }
        }
        writeln!(
            y,
            "shutdown_grace: {}",
            opts.shutdown_grace.as_deref().unwrap_or("5s")
        )
        .unwrap();
        // Tests that do not exercise delivery keep their mail queued (and make no
        // DNS queries), so what they enqueued can be inspected afterwards.
        if !opts.extra_yaml.contains("delivery:") {
            writeln!(y, "delivery: {{enabled: false}}").unwrap();
        }
        y.push_str(&opts.extra_yaml);
        let config_path = dir.path().join("mailrelay.yaml");
        std::fs::write(&config_path, y).unwrap();
        let mut relay = Relay {
            env: opts.env.clone(),
            child: None,
            smtp,
            smtps,
            admin,
            dir,
            config_path,
            cert_path,
        };
        relay.spawn();
        relay
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(binary())
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "mailrelay=debug")
            .env_remove("MAILRELAY_REDIS_URL")
            .env_remove("MAILRELAY_REDIS_PASSWORD")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mailrelay");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.smtp).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "mailrelay exited with {st} before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mailrelay did not listen in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Starts the relay again with the same config and queue (after `stop`/`kill`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "relay still running");
        self.spawn();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("relay.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, …).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// SIGTERM and wait for the process to exit; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(30))
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mailrelay did not exit in time:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Opens the embedded queue directory (the relay must be stopped: redb locks it).
    pub fn open_queue(&self) -> Arc<dyn Queue> {
        assert!(
            self.child.is_none(),
            "stop the relay before opening its embedded queue"
        );
        Arc::new(EmbeddedQueue::open(&self.dir.path().join("queue")).expect("open embedded queue"))
    }

    /// Every message in the embedded queue, in arrival order (stops nothing itself).
    pub fn queued_messages(&self) -> Vec<QueuedMessage> {
        let q = self.open_queue();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ids = q.list_ids(usize::MAX).await.unwrap();
            let mut out = Vec::new();
            for id in ids {
                out.push(q.get(&id).await.unwrap().expect("listed message exists"));
            }
            out
        })
    }

    /// A plain HTTP GET against the admin port: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// Connects a raw SMTP client and reads the greeting.
    pub fn connect(&self) -> SmtpConn {
        SmtpConn::connect(self.smtp)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- mailrelay log ----\n{}", self.log());
        }
    }
}

/// Any admin request, optionally with `Authorization: Bearer TOKEN`:
/// (status, lower-cased head, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    http_request_with(addr, method, path, &headers)
}

/// One admin request with the given extra headers: (status, lower-cased head, body).
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// A GET to the admin port without credentials: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, "GET", path, None);
    (status, body)
}

/// Accepts exactly one certificate (the relay's generated one) and checks the
/// handshake signatures with it; the test certificate is its own issuer, which the
/// usual WebPKI path validation would refuse as a CA used as an end entity.
#[derive(Debug)]
struct PinnedCert {
    cert: rustls::pki_types::CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "unexpected server certificate".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// An SMTP session inside TLS (after STARTTLS, or on an implicit-TLS listener).
pub struct TlsSmtpConn {
    reader: BufReader<TlsStream>,
    /// The negotiated protocol version, e.g. `TLSv1_3`.
    pub version: String,
}

impl TlsSmtpConn {
    /// Completes a TLS handshake as `relay.test`, trusting only the certificate in
    /// `cert_pem`.
    pub fn handshake(tcp: TcpStream, cert_pem: &Path) -> TlsSmtpConn {
        use rustls::pki_types::pem::PemObject;
        let cert = rustls::pki_types::CertificateDer::from_pem_file(cert_pem)
            .expect("read the relay certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert { cert, provider }))
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .unwrap_or_else(|e| panic!("TLS handshake with the relay failed: {e}"));
        }
        let version = format!("{:?}", stream.conn.protocol_version().unwrap());
        TlsSmtpConn {
            reader: BufReader::new(stream),
            version,
        }
    }

    /// Connects to an implicit-TLS listener and reads the greeting.
    pub fn connect_implicit(addr: SocketAddr, cert_pem: &Path) -> (TlsSmtpConn, String) {
        let s = TcpStream::connect(addr).expect("connect relay");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = TlsSmtpConn::handshake(s, cert_pem);
        let greeting = c.reply();
        (c, greeting)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let s = self.reader.get_mut();
        s.write_all(bytes).unwrap();
        s.flush().unwrap();
    }

    /// Reads one full (possibly multi-line) reply; empty string on EOF or error.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    /// Sends one command line (CRLF added) and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }
}
