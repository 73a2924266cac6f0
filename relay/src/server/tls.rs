//! The server certificate for STARTTLS and implicit TLS, reloaded from disk while
//! the relay runs.
//!
//! The `ServerConfig` is built once; its certificate resolver hands out whatever
//! `CertifiedKey` is current, so a reload affects only handshakes that start after
//! it and live sessions keep the keys they negotiated. A failed reload leaves the
//! previous certificate in place: serving a certificate that is about to expire
//! beats refusing every handshake because a renewal was half-written.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ProtocolVersion, ServerConfig};

use crate::config::TlsConfig;
use mailrelay_smtp::envelope::TlsInfo;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid PEM: {source}", path.display())]
    Pem { path: PathBuf, source: pem::Error },
    #[error("{}: no certificate found (expected PEM `CERTIFICATE` blocks, end-entity first)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key found (expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unusable private key: {source}", path.display())]
    BadKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: unusable certificate: {source}", path.display())]
    BadCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("private key {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("building the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// A certificate and key loaded from two PEM files, swappable at run time.
#[derive(Debug)]
pub struct TlsSource {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Arc<CurrentCert>,
    config: Arc<ServerConfig>,
    /// Stamps of the files behind the certificate now served.
    loaded: Mutex<(FileStamp, FileStamp)>,
}

/// The resolver installed in the `ServerConfig`.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A panic elsewhere cannot leave a half-written Arc behind, so a poisoned
        // lock still holds a usable certificate.
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// What identifies one version of a file. Kubernetes updates a mounted Secret by
/// writing a new timestamped directory and swapping the `..data` symlink, which
/// can keep length and even mtime equal (a renewed certificate is often exactly as
/// long as the old one); the resolved path changes with every such update.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    resolved: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Result<Self, TlsError> {
        let read_err = |source| TlsError::Read {
            path: path.to_owned(),
            source,
        };
        let resolved = std::fs::canonicalize(path).map_err(read_err)?;
        let meta = std::fs::metadata(&resolved).map_err(read_err)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileStamp {
            resolved,
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        })
    }
}

impl TlsSource {
    /// Loads the certificate chain and key; fails if either is unusable, so a bad
    /// configuration stops the relay at start-up rather than at the first STARTTLS.
    pub fn load(cfg: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = (
            FileStamp::of(&cfg.cert_file)?,
            FileStamp::of(&cfg.key_file)?,
        );
        let key = load_certified_key(&cfg.cert_file, &cfg.key_file, &provider)?;
        let current = Arc::new(CurrentCert(RwLock::new(Arc::new(key))));
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        // Our suite order (AES-256-GCM first, then AES-128-GCM, then ChaCha20), not
        // the client's: every suite offered is AEAD with forward secrecy, but a
        // client listing a weaker one first should not get to pick it.
        config.ignore_client_order = true;
        Ok(Arc::new(TlsSource {
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            provider,
            current,
            config: Arc::new(config),
            loaded: Mutex::new(stamps),
        }))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// Reloads when either file changed since the last successful load. `Ok(true)`:
    /// new handshakes now get the new certificate. `Err`: the files changed but are
    /// unusable (retried on every call until fixed); the previous certificate stays.
    ///
    /// Blocking file IO: call it from a blocking context.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        // Stat before reading: if the files change in between, the next call sees
        // a newer stamp and reloads again instead of missing the change.
        let stamps = (
            FileStamp::of(&self.cert_file)?,
            FileStamp::of(&self.key_file)?,
        );
        if *loaded == stamps {
            return Ok(false);
        }
        let key = load_certified_key(&self.cert_file, &self.key_file, &self.provider)?;
        *self
            .current
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        *loaded = stamps;
        Ok(true)
    }

    /// Checks the files every `interval` (at least 100 ms) until the task is
    /// aborted; failures are logged and the previous certificate keeps serving.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        let interval = interval.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick fires at once; the files were just loaded.
            ticker.tick().await;
            // A broken file is retried on every tick; say so once per distinct error.
            let mut last_error: Option<String> = None;
            loop {
                ticker.tick().await;
                let source = Arc::clone(&this);
                let outcome = tokio::task::spawn_blocking(move || source.reload_if_changed()).await;
                match outcome {
                    Ok(Ok(true)) => {
                        last_error = None;
                        tracing::info!(
                            cert_file = %this.cert_file.display(),
                            "reloaded TLS certificate; new handshakes use it"
                        );
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        let message = e.to_string();
                        if last_error.as_deref() != Some(&message) {
                            tracing::warn!(
                                error = %message,
                                "TLS certificate reload failed; still serving the previous certificate"
                            );
                            last_error = Some(message);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "TLS certificate reload task failed"),
                }
            }
        })
    }
}

fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let pem_err = |path: &Path, e: pem::Error| match e {
        pem::Error::Io(source) => TlsError::Read {
            path: path.to_owned(),
            source,
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| pem_err(cert_file, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert_file, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: key_file.to_owned(),
        },
        e => pem_err(key_file, e),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: key_file.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(certs, signing_key);
    // Also parses the end-entity certificate, so garbage inside a valid PEM block
    // is caught here rather than at the first handshake.
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert_file.to_owned(),
            key: key_file.to_owned(),
        }),
        Err(source) => Err(TlsError::BadCertificate {
            path: cert_file.to_owned(),
            source,
        }),
    }
}

/// What a finished handshake negotiated, for `Received:` headers and the queue.
pub fn tls_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_owned(),
    };
    let cipher = match conn.negotiated_cipher_suite() {
        Some(suite) => suite
            .suite()
            .as_str()
            .map_or_else(|| format!("{:?}", suite.suite()), str::to_owned),
        None => "unknown".to_owned(),
    };
    TlsInfo { version, cipher }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A throw-away CA whose leaves all carry `DNS:mail.test` (webpki refuses a
    /// self-signed CA certificate as an end-entity, so leaves are CA-signed).
    struct Pki {
        dir: tempfile::TempDir,
        roots: Arc<rustls::RootCertStore>,
    }

    fn openssl(args: &[&str], cwd: &Path) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(cwd)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let mut args = vec![
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=Test CA",
            ];
            args.extend(EC);
            args.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
            openssl(&args, dir.path());
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(dir.path().join("ca.pem")).unwrap())
                .unwrap();
            Pki {
                dir,
                roots: Arc::new(roots),
            }
        }

        /// Issues `<name>.pem` / `<name>.key` with common name `name`.
        fn leaf(&self, name: &str) -> (PathBuf, PathBuf) {
            let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
            let subj = format!("/CN={name}");
            let mut args = vec!["req", "-x509", "-nodes", "-days", "1", "-subj", &subj];
            args.extend(["-CA", "ca.pem", "-CAkey", "ca.key"]);
            args.extend(EC);
            args.extend(["-addext", "subjectAltName=DNS:mail.test"]);
            args.extend(["-addext", "basicConstraints=critical,CA:FALSE"]);
            args.extend(["-keyout", &key, "-out", &cert]);
            openssl(&args, self.dir.path());
            (self.path(&cert), self.path(&key))
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn config(&self) -> TlsConfig {
            TlsConfig {
                cert_file: self.path("tls.crt"),
                key_file: self.path("tls.key"),
                reload_interval: Duration::from_secs(10),
            }
        }

        /// Installs a leaf as `tls.crt`/`tls.key` the way careful tools do: write a
        /// temporary file, then rename over the old one.
        fn install(&self, (cert, key): &(PathBuf, PathBuf)) {
            for (from, to) in [(cert, "tls.crt"), (key, "tls.key")] {
                let tmp = self.path(&format!(".{to}.tmp"));
                std::fs::copy(from, &tmp).unwrap();
                std::fs::rename(&tmp, self.path(to)).unwrap();
            }
        }
    }

    fn der(cert: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(cert).unwrap()
    }

    struct Handshake {
        server_cert: CertificateDer<'static>,
        info: TlsInfo,
        client: tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
        server: tokio_rustls::server::TlsStream<tokio::io::DuplexStream>,
    }

    async fn handshake(
        src: &TlsSource,
        pki: &Pki,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Handshake {
        let client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(Arc::clone(&pki.roots))
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("mail.test").unwrap();
        let (client, server) = tokio::join!(connector.connect(name, c), src.acceptor().accept(s));
        let (client, server) = (
            client.expect("client handshake"),
            server.expect("server handshake"),
        );
        Handshake {
            server_cert: client.get_ref().1.peer_certificates().unwrap()[0].clone(),
            info: tls_info(server.get_ref().1),
            client,
            server,
        }
    }

    use rustls::ALL_VERSIONS as ANY;

    #[tokio::test]
    async fn the_server_picks_the_cipher_suite_by_its_own_preference() {
        use rustls::crypto::ring::cipher_suite as cs;
        let pki = Pki::new();
        pki.install(&pki.leaf("first"));
        let src = TlsSource::load(&pki.config()).unwrap();
        // A client that prefers ChaCha20 and lists AES-256 last.
        for (version, client_order, want) in [
            (
                &rustls::version::TLS13,
                vec![
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                    cs::TLS13_AES_128_GCM_SHA256,
                    cs::TLS13_AES_256_GCM_SHA384,
                ],
                "TLS13_AES_256_GCM_SHA384",
            ),
            (
                &rustls::version::TLS12,
                vec![
                    cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                    cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                ],
                "AES_256_GCM_SHA384",
            ),
        ] {
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: client_order,
                ..rustls::crypto::ring::default_provider()
            };
            let client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(Arc::clone(&pki.roots))
                .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
            let (c, s) = tokio::io::duplex(64 * 1024);
            let name = rustls::pki_types::ServerName::try_from("mail.test").unwrap();
            let (client, server) =
                tokio::join!(connector.connect(name, c), src.acceptor().accept(s));
            client.expect("client handshake");
            let server = server.expect("server handshake");
            let suite = server.get_ref().1.negotiated_cipher_suite().unwrap();
            let got = format!("{:?}", suite.suite());
            assert!(got.ends_with(want), "{version:?}: negotiated {got}");
        }
    }

    #[tokio::test]
    async fn handshakes_with_tls13_and_tls12_and_reports_them() {
        let pki = Pki::new();
        let first = pki.leaf("first");
        pki.install(&first);
        let src = TlsSource::load(&pki.config()).unwrap();

        let h = handshake(&src, &pki, ANY).await;
        assert_eq!(h.server_cert, der(&first.0));
        assert_eq!(h.info.version, "TLSv1.3");
        assert!(h.info.cipher.starts_with("TLS13_"), "{}", h.info.cipher);

        let h = handshake(&src, &pki, &[&rustls::version::TLS12]).await;
        assert_eq!(h.info.version, "TLSv1.2");
        assert!(
            h.info.cipher.starts_with("TLS_ECDHE_ECDSA_"),
            "{}",
            h.info.cipher
        );
    }

    #[tokio::test]
    async fn reload_swaps_the_certificate_for_new_handshakes_only() {
        let pki = Pki::new();
        let (first, second) = (pki.leaf("first"), pki.leaf("second"));
        pki.install(&first);
        let src = TlsSource::load(&pki.config()).unwrap();
        assert!(!src.reload_if_changed().unwrap(), "nothing changed yet");
        let mut live = handshake(&src, &pki, ANY).await;

        pki.install(&second);
        assert!(src.reload_if_changed().unwrap());
        assert!(!src.reload_if_changed().unwrap());
        assert_eq!(handshake(&src, &pki, ANY).await.server_cert, der(&second.0));

        // The session opened before the reload still carries data.
        assert_eq!(live.server_cert, der(&first.0));
        live.client.write_all(b"NOOP\r\n").await.unwrap();
        live.client.flush().await.unwrap();
        let mut buf = [0u8; 6];
        live.server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"NOOP\r\n");
    }

    #[tokio::test]
    async fn broken_replacement_keeps_the_old_certificate() {
        let pki = Pki::new();
        let (first, other) = (pki.leaf("first"), pki.leaf("other"));
        pki.install(&first);
        let src = TlsSource::load(&pki.config()).unwrap();

        std::fs::write(pki.path("tls.crt"), "not a certificate\n").unwrap();
        let e = src.reload_if_changed().unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        assert_eq!(handshake(&src, &pki, ANY).await.server_cert, der(&first.0));

        // New certificate, old key: a half-finished renewal.
        std::fs::copy(&other.0, pki.path("tls.crt")).unwrap();
        let e = src.reload_if_changed().unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert_eq!(handshake(&src, &pki, ANY).await.server_cert, der(&first.0));

        // Failures are retried until the files are consistent again.
        std::fs::copy(&other.1, pki.path("tls.key")).unwrap();
        assert!(src.reload_if_changed().unwrap());
        assert_eq!(handshake(&src, &pki, ANY).await.server_cert, der(&other.0));
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let pki = Pki::new();
        let (first, other) = (pki.leaf("first"), pki.leaf("other"));
        let cfg = |cert: &Path, key: &Path| TlsConfig {
            cert_file: cert.to_owned(),
            key_file: key.to_owned(),
            reload_interval: Duration::from_secs(1),
        };
        let err = |cert: &Path, key: &Path| TlsSource::load(&cfg(cert, key)).unwrap_err();

        let missing = pki.path("missing.pem");
        let e = err(&missing, &first.1);
        assert!(matches!(e, TlsError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.pem"), "{e}");

        let e = err(&first.1, &first.1);
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
        assert!(e.to_string().contains("first.key"), "{e}");

        let e = err(&first.0, &first.0);
        assert!(matches!(e, TlsError::NoKey { .. }), "{e:?}");
        assert!(e.to_string().contains("first.pem: no private key"), "{e}");

        let e = err(&first.0, &other.1);
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("other.key") && msg.contains("first.pem"),
            "{msg}"
        );

        let garbage = pki.path("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = err(&garbage, &first.1);
        assert!(matches!(e, TlsError::BadCertificate { .. }), "{e:?}");

        let truncated = pki.path("truncated.pem");
        std::fs::write(&truncated, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let e = err(&truncated, &first.1);
        assert!(matches!(e, TlsError::Pem { .. }), "{e:?}");

        let bad_key = pki.path("bad.key");
        std::fs::write(
            &bad_key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = err(&first.0, &bad_key);
        assert!(matches!(e, TlsError::BadKey { .. }), "{e:?}");
        assert!(!e.to_string().contains("AAAA"), "{e}");
    }

    /// A mounted Secret: `tls.crt -> ..data/tls.crt`, `..data -> ..<timestamp>`,
    /// updated by swapping `..data` in one rename.
    #[cfg(unix)]
    #[tokio::test]
    async fn kubernetes_secret_symlink_swap_is_detected() {
        use std::os::unix::fs::symlink;
        let pki = Pki::new();
        let (first, second) = (pki.leaf("first"), pki.leaf("second"));
        let mount = pki.path("mount");
        let publish = |version: &str, (cert, key): &(PathBuf, PathBuf)| {
            let dir = mount.join(version);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(cert, dir.join("tls.crt")).unwrap();
            std::fs::copy(key, dir.join("tls.key")).unwrap();
            let tmp = mount.join("..data_tmp");
            symlink(version, &tmp).unwrap();
            std::fs::rename(&tmp, mount.join("..data")).unwrap();
        };
        publish("..2026_01_01_00_00_00.1", &first);
        for name in ["tls.crt", "tls.key"] {
            symlink(format!("..data/{name}"), mount.join(name)).unwrap();
        }
        let src = TlsSource::load(&TlsConfig {
            cert_file: mount.join("tls.crt"),
            key_file: mount.join("tls.key"),
            reload_interval: Duration::from_secs(1),
        })
        .unwrap();
        assert_eq!(handshake(&src, &pki, ANY).await.server_cert, der(&first.0));

        publish("..2026_01_01_00_00_00.2", &second);
        assert!(src.reload_if_changed().unwrap());
        assert_eq!(handshake(&src, &pki, ANY).await.server_cert, der(&second.0));
    }

    #[tokio::test]
    async fn reloader_task_picks_up_new_files() {
        let pki = Pki::new();
        let (first, second) = (pki.leaf("first"), pki.leaf("second"));
        pki.install(&first);
        let src = TlsSource::load(&pki.config()).unwrap();
        let task = src.spawn_reloader(Duration::from_millis(100));

        pki.install(&second);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while handshake(&src, &pki, ANY).await.server_cert != der(&second.0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reloader never swapped"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
    }
}
