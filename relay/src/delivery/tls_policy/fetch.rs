//! Fetching an MTA-STS policy: `GET https://mta-sts.<domain>/.well-known/mta-sts.txt`
//! (RFC 8461 §3.3) with a verified certificate, no redirects, a size cap and one
//! deadline for the whole exchange (DNS, connect, TLS, headers, body).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::mta_sts::{MAX_POLICY_BYTES, WELL_KNOWN_PATH};

/// How a fetch is made; built once at start-up.
#[derive(Clone)]
pub struct Fetcher {
    tls: TlsConnector,
    resolver: hickory_resolver::TokioResolver,
    /// 443, or a test port.
    pub port: u16,
    pub timeout: Duration,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("port", &self.port)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// `roots`: the trust anchors the policy host's certificate must chain to.
    pub fn new(
        roots: rustls::RootCertStore,
        resolver: hickory_resolver::TokioResolver,
        port: u16,
        timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        Ok(Fetcher {
            tls: https_connector(roots)?,
            resolver,
            port,
            timeout,
        })
    }

    /// The policy body of `domain` (lower case, no trailing dot), or why there is
    /// none. The error text goes into logs and attempt records.
    pub async fn fetch(&self, domain: &str) -> Result<Vec<u8>, String> {
        let host = format!("mta-sts.{domain}");
        match tokio::time::timeout(self.timeout, self.fetch_inner(&host)).await {
            Ok(r) => r.map_err(|e| format!("https://{host}{WELL_KNOWN_PATH}: {e}")),
            Err(_) => Err(format!(
                "https://{host}{WELL_KNOWN_PATH}: no complete answer within {:?}",
                self.timeout
            )),
        }
    }

    async fn fetch_inner(&self, host: &str) -> Result<Vec<u8>, String> {
        let (mut send, driver) = https_connect(&self.resolver, &self.tls, host, self.port).await?;
        let req = hyper::Request::builder()
            .method(hyper::Method::GET)
            .uri(WELL_KNOWN_PATH)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"));
        let result = async {
            let resp = resp?;
            let status = resp.status();
            // RFC 8461 §3.3: redirects are not followed, and only 200 is a policy.
            if status.is_redirection() {
                return Err(format!("HTTP {status}: redirects are not followed"));
            }
            if status != hyper::StatusCode::OK {
                return Err(format!("HTTP {status}"));
            }
            let ctype = resp
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let media = ctype.split(';').next().unwrap_or("").trim();
            if !media.eq_ignore_ascii_case("text/plain") {
                return Err(format!("Content-Type {ctype:?} is not text/plain"));
            }
            if let Some(len) = resp
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                && len > MAX_POLICY_BYTES as u64
            {
                return Err(format!(
                    "policy of {len} bytes is larger than {MAX_POLICY_BYTES}"
                ));
            }
            let body = Limited::new(resp.into_body(), MAX_POLICY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("policy body: {e} (limit {MAX_POLICY_BYTES} bytes)"))?;
            Ok(body.to_bytes().to_vec())
        }
        .await;
        driver.abort();
        result
    }
}

/// A TLS client for HTTP/1.1 that trusts `roots`: MTA-STS policy fetches and
/// TLS-report POSTs (RFC 8460 §5.3 asks for the same checks).
pub(crate) fn https_connector(roots: rustls::RootCertStore) -> Result<TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// Resolves `host`, connects to the first of its addresses that answers on
/// `port`, and does the TLS (certificate checked against `host`) and HTTP/1.1
/// handshakes. The caller aborts the returned connection driver when done.
pub(crate) async fn https_connect<B>(
    resolver: &hickory_resolver::TokioResolver,
    tls: &TlsConnector,
    host: &str,
    port: u16,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<B>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ),
    String,
>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let ips = resolver
        .lookup_ip(format!("{}.", host.trim_end_matches('.')))
        .await
        .map_err(|e| format!("address lookup: {e}"))?;
    let mut last = String::from("no address");
    let mut stream = None;
    for ip in ips.iter() {
        match TcpStream::connect(SocketAddr::new(ip, port)).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connect {ip}: {e}"),
        }
    }
    let stream = stream.ok_or(last)?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let tls = tls
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    Ok((send, tokio::spawn(conn)))
}
