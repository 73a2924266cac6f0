//! Runs the IO-free [`ClientSession`] over a TCP connection: reads replies, writes
//! commands and content, upgrades to TLS, and keeps RFC 5321 §4.5.3.2 time.
//!
//! Everything SMTP decides lives in `smtp::client`; this file only moves octets.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, ProtocolVersion, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use mailrelay_smtp::client::{Action, ClientSession, parse_reply};
pub use mailrelay_smtp::client::{
    Capabilities, ClientConfig, Credentials, MessageOutcome, Outcome, RecipientOutcome, Stage,
    TimeoutKind, TlsPolicy, connect_failed,
};
use mailrelay_smtp::envelope::{QueuedMessage, TlsInfo};

/// Where Debian and most distributions keep the system trust store as one PEM file.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Content is written in blocks of this size, each under the data-block timeout, so
/// a slow but moving server is not cut off in the middle of a large message.
const WRITE_BLOCK: usize = 64 * 1024;

/// RFC 5321 §4.5.3.2 client timeouts. The defaults are the RFC's; tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// Waiting for the 220 greeting.
    pub greeting: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    /// Waiting for the 354 after DATA.
    pub data_init: Duration,
    /// Each write of content (and of any command).
    pub data_block: Duration,
    /// Waiting for the reply after the final dot. Long because the server may be
    /// filtering or storing the message; giving up early invites duplicates.
    pub data_termination: Duration,
    /// EHLO, HELO, STARTTLS, AUTH, RSET (the RFC names none; Postfix uses 5 min).
    pub command: Duration,
    pub tls_handshake: Duration,
    /// Waiting for the reply to QUIT. Short: every outcome is already known, and the
    /// caller gets its results only when this connection is done.
    pub quit: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        ClientTimeouts {
            greeting: min(5),
            mail: min(5),
            rcpt: min(5),
            data_init: min(2),
            data_block: min(3),
            data_termination: min(10),
            command: min(5),
            tls_handshake: min(5),
            quit: Duration::from_secs(30),
        }
    }
}

impl ClientTimeouts {
    fn reply(&self, kind: TimeoutKind) -> Duration {
        match kind {
            TimeoutKind::Greeting => self.greeting,
            TimeoutKind::Command => self.command,
            TimeoutKind::Mail => self.mail,
            TimeoutKind::Rcpt => self.rcpt,
            TimeoutKind::DataInit => self.data_init,
            TimeoutKind::DataTermination => self.data_termination,
            TimeoutKind::Quit => self.quit,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("cannot read CA file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("CA file {}: invalid PEM: {source}", path.display())]
    Pem { path: PathBuf, source: pem::Error },
    #[error("CA file {}: no usable CA certificate", path.display())]
    NoCertificates { path: PathBuf },
    #[error("building the TLS client configuration: {0}")]
    Config(rustls::Error),
}

/// The two TLS client configurations delivery needs.
///
/// Opportunistic TLS (RFC 3207 as practised between MTAs, Postfix's `may`) accepts
/// any certificate: most MX hosts present self-signed, expired or mismatched
/// certificates, and the alternative to an unverified session is a plain-text one,
/// not a refused delivery. Encryption still defeats passive eavesdropping; an active
/// attacker could strip STARTTLS anyway. Handshake signatures are still checked, so
/// the server proves it holds the key of the certificate it shows.
///
/// Required TLS verifies the chain against the configured CAs and the server name.
#[derive(Clone)]
pub struct ClientTls {
    opportunistic: TlsConnector,
    verified: TlsConnector,
    /// Checks, after an opportunistic handshake, what the verified connector would
    /// have said: the attempt record and MTA-STS `testing` report it.
    checker: Arc<rustls::client::WebPkiServerVerifier>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Verification roots from `ca_file` (PEM), or the system store
    /// [`SYSTEM_CA_FILE`] when `None`. Blocking file IO: call at start-up.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, ClientTlsError> {
        let path = ca_file.unwrap_or(Path::new(SYSTEM_CA_FILE));
        Self::with_roots(load_roots(path)?)
    }

    pub fn with_roots(roots: RootCertStore) -> Result<Self, ClientTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = || {
            rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(ClientTlsError::Config)
        };
        let roots = Arc::new(roots);
        let checker = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| ClientTlsError::Config(rustls::Error::General(e.to_string())))?;
        let verified = builder()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let opportunistic = builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(Arc::clone(&provider))))
            .with_no_client_auth();
        Ok(ClientTls {
            opportunistic: TlsConnector::from(Arc::new(opportunistic)),
            verified: TlsConnector::from(Arc::new(verified)),
            checker,
        })
    }

    /// This client with `verifier` in place of the CA check of `required` (DANE:
    /// the TLSA records decide).
    pub fn with_verifier(
        &self,
        verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    ) -> Result<Self, ClientTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(ClientTlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(ClientTls {
            verified: TlsConnector::from(Arc::new(config)),
            ..self.clone()
        })
    }

    pub fn connector(&self, policy: TlsPolicy) -> &TlsConnector {
        match policy {
            TlsPolicy::Required => &self.verified,
            TlsPolicy::Opportunistic | TlsPolicy::Disabled | TlsPolicy::Auto | TlsPolicy::Dane => {
                &self.opportunistic
            }
        }
    }

    /// Whether the chain a server presented verifies against this client's roots
    /// and names `server_name`.
    fn check(
        &self,
        conn: &rustls::ClientConnection,
        server_name: &ServerName<'_>,
    ) -> Result<(), String> {
        let Some((leaf, rest)) = conn.peer_certificates().and_then(|c| c.split_first()) else {
            return Err("no certificate".into());
        };
        self.checker
            .verify_server_cert(leaf, rest, server_name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, ClientTlsError> {
    let pem_err = |e: pem::Error| match e {
        pem::Error::Io(source) => ClientTlsError::Read {
            path: path.to_owned(),
            source,
        },
        source => ClientTlsError::Pem {
            path: path.to_owned(),
            source,
        },
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    let mut roots = RootCertStore::empty();
    // System bundles carry the odd certificate webpki cannot parse; skip those
    // rather than refuse the whole store.
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(ClientTlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// See [`ClientTls`] for why opportunistic TLS does not verify certificates.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What one connection achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionResult {
    /// One per message given, in order; every recipient has an outcome.
    pub messages: Vec<MessageOutcome>,
    /// The TLS session, when STARTTLS succeeded.
    pub tls: Option<TlsInfo>,
    /// What the server announced (after TLS, if any).
    pub capabilities: Option<Capabilities>,
    /// Why the connection ended without a QUIT exchange, if it did.
    pub error: Option<String>,
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only during the TLS upgrade (and after a failed one).
    Gone,
}

impl Conn {
    /// Appends what arrives to `buf`, in its spare capacity: nothing is zeroed or
    /// copied on the way (a zeroed 8 KiB stack chunk per reply cost ~8,000
    /// instructions, about 4 replies per message).
    async fn read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read_buf(buf).await,
            Conn::Tls(s) => s.read_buf(buf).await,
            Conn::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(data).await,
            Conn::Tls(s) => {
                s.write_all(data).await?;
                // tokio-rustls holds records until flushed.
                s.flush().await
            }
            Conn::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Gone => Ok(()),
        };
    }
}

/// Decides, message by message, whether a connection may go on: egress pacing
/// ([`super::gate::Pacing`]) waits here for each message's slot and watches the replies
/// for rate limiting. Used with [`ClientConfig::pace_messages`].
pub trait MessageGate: Send {
    /// Message `index` is ready to start: `Ok` once it may, or the reply with which
    /// it and every later message are left unattempted (the session then ends).
    fn before_message(
        &mut self,
        index: usize,
    ) -> impl std::future::Future<Output = Result<(), mailrelay_smtp::Reply>> + Send;

    /// Every reply read from the server, before the session sees it, with the
    /// stage it answers.
    fn on_reply(&mut self, _reply: &mailrelay_smtp::Reply, _stage: mailrelay_smtp::client::Stage) {}

    /// TLS is up: whether the certificate verified (chain and host name).
    fn on_tls_verified(&mut self, _verified: &Result<(), String>) {}

    /// Message `index`'s transaction ended (see [`ClientSession::take_completed`]):
    /// called before the connection goes on to the next message, so the outcome can
    /// be recorded while the connection is still open. `tls` is the session's.
    fn on_message_done(
        &mut self,
        _index: usize,
        _outcome: MessageOutcome,
        _tls: Option<TlsInfo>,
    ) -> impl std::future::Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// The gate of an unpaced connection: every message may go at once.
pub struct Ungated;

impl MessageGate for Ungated {
    async fn before_message(&mut self, _index: usize) -> Result<(), mailrelay_smtp::Reply> {
        Ok(())
    }
}

/// Delivers `messages` over `stream` (connected to the server, nothing read yet) and
/// reports an outcome for every recipient. `server_name` is the host name the
/// connection was made to (the MX or smarthost name): it is sent as SNI and, with
/// [`TlsPolicy::Required`], the certificate must match it. The caller decides how
/// many messages share a connection; with none, the session just says EHLO and QUIT.
pub async fn deliver(
    stream: TcpStream,
    tls: &ClientTls,
    server_name: &str,
    messages: &[&QueuedMessage],
    cfg: &ClientConfig,
    timeouts: &ClientTimeouts,
) -> ConnectionResult {
    deliver_gated(
        stream,
        tls,
        server_name,
        messages,
        cfg,
        timeouts,
        &mut Ungated,
    )
    .await
}

/// [`deliver`], asking `gate` before each message when `cfg.pace_messages` is set.
pub async fn deliver_gated<G: MessageGate>(
    stream: TcpStream,
    tls: &ClientTls,
    server_name: &str,
    messages: &[&QueuedMessage],
    cfg: &ClientConfig,
    timeouts: &ClientTimeouts,
    gate: &mut G,
) -> ConnectionResult {
    let mut session = ClientSession::new(cfg.clone(), messages);
    let mut conn = Conn::Plain(stream);
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        match session.next_action() {
            Action::Send(bytes) => {
                if let Err(e) = write_blocks(&mut conn, &bytes, timeouts.data_block).await {
                    session.on_connection_error(&e);
                }
            }
            Action::ReadReply => {
                let limit = timeouts.reply(session.timeout_kind());
                match read_reply(&mut conn, &mut buf, limit).await {
                    Ok(reply) => {
                        gate.on_reply(&reply, session.stage());
                        session.on_reply(reply);
                        while let Some((i, outcome)) = session.take_completed() {
                            let tls = session.tls().cloned();
                            gate.on_message_done(i, outcome, tls).await;
                        }
                    }
                    Err(e) => session.on_connection_error(&e),
                }
            }
            Action::StartTls => {
                if !buf.is_empty() {
                    // RFC 3207 §4.2 / CVE-2011-0411 in reverse: octets that came
                    // after the 220 in plain text could be an injected reply to our
                    // first command under TLS. They are dropped unread.
                    tracing::warn!(
                        server = server_name,
                        octets = buf.len(),
                        "discarding plain-text data received after the STARTTLS reply"
                    );
                    buf.clear();
                }
                match upgrade(&mut conn, tls, cfg.tls, server_name, timeouts.tls_handshake).await {
                    Ok((info, verified)) => {
                        gate.on_tls_verified(&verified);
                        session.on_tls_verified(verified);
                        session.on_tls_established(info)
                    }
                    Err(e) => session.on_tls_failed(&e),
                }
            }
            Action::Pace(index) => match gate.before_message(index).await {
                Ok(()) => session.on_paced(),
                Err(reply) => session.on_pace_refused(reply),
            },
            Action::Done(outcomes) => {
                let _ = timeout(timeouts.quit, conn.shutdown()).await;
                return result(&session, outcomes, None);
            }
            Action::Failed { reason, outcomes } => {
                tracing::debug!(server = server_name, %reason, "SMTP connection failed");
                return result(&session, outcomes, Some(reason));
            }
        }
    }
}

fn result(
    session: &ClientSession<'_>,
    messages: Vec<MessageOutcome>,
    error: Option<String>,
) -> ConnectionResult {
    ConnectionResult {
        messages,
        tls: session.tls().cloned(),
        capabilities: session.capabilities().cloned(),
        error,
    }
}

async fn write_blocks(conn: &mut Conn, data: &[u8], limit: Duration) -> Result<(), String> {
    // Commands and small messages fit the socket's send buffer: written straight
    // away, without arming a timer per write. The rest goes out bounded below.
    let mut data = data;
    if let Conn::Plain(s) = conn {
        while !data.is_empty() {
            match s.try_write(data) {
                Ok(0) => return Err("write failed: failed to write whole buffer".into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("write failed: {e}")),
            }
        }
    }
    for block in data.chunks(WRITE_BLOCK) {
        match timeout(limit, conn.write_all(block)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("write failed: {e}")),
            Err(_) => return Err(format!("timeout after {limit:?} writing to the server")),
        }
    }
    Ok(())
}

/// Octets asked for per read of a reply.
const READ_CHUNK: usize = 8192;

/// Reads until `buf` holds a complete reply; leftover octets (pipelined replies)
/// stay in `buf` for the next call.
async fn read_reply(
    conn: &mut Conn,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> Result<mailrelay_smtp::Reply, String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match parse_reply(buf) {
            Ok(Some((reply, n))) => {
                buf.drain(..n);
                return Ok(reply);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("bad reply from server: {e}")),
        }
        // Room for one more read: read_buf would otherwise grow by as little as 64 octets.
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, conn.read_buf(buf)).await {
            Ok(Ok(0)) => return Err("connection closed by the server".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("read failed: {e}")),
            Err(_) => return Err(format!("timeout after {limit:?} waiting for a reply")),
        }
    }
}

async fn upgrade(
    conn: &mut Conn,
    tls: &ClientTls,
    policy: TlsPolicy,
    server_name: &str,
    limit: Duration,
) -> Result<(TlsInfo, Result<(), String>), String> {
    let connector = tls.connector(policy);
    let Conn::Plain(tcp) = std::mem::replace(conn, Conn::Gone) else {
        return Err("TLS requested on a connection that is not plain TCP".into());
    };
    let name = ServerName::try_from(server_name.trim_end_matches('.').to_owned())
        .map_err(|e| format!("invalid server name {server_name:?}: {e}"))?;
    let stream = match timeout(limit, connector.connect(name.clone(), tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("timeout after {limit:?}")),
    };
    let info = tls_info(stream.get_ref().1);
    // The verified connector already refused anything else.
    let verified = if policy == TlsPolicy::Required {
        Ok(())
    } else {
        tls.check(stream.get_ref().1, &name)
    };
    *conn = Conn::Tls(Box::new(stream));
    Ok((info, verified))
}

/// Version and cipher suite, named as the server side names them in `Received:`.
fn tls_info(conn: &rustls::ClientConnection) -> TlsInfo {
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
