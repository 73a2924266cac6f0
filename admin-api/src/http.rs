//! Direct HTTP/1.1 to a relay's admin listener (plain HTTP: loopback or the pod
//! network), for the relay CLI and the operator. One connection per request,
//! through hyper's connection API: the admin API is called a few times per
//! command or reconcile, so a pool would hold sockets for nothing.
//!
//! The token goes in `Authorization: Bearer` (the proxy transport uses
//! [`crate::TOKEN_HEADER`] instead, as the API server consumes `Authorization`).

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::client::{ACTOR_HEADER, Request, Response, Transport};

/// Largest answer read by default (a list of 10,000 messages fits).
pub const DEFAULT_MAX_BODY: usize = 64 << 20;

/// Why a request got no answer. The texts are the ones `mailrelay queue` prints.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach mailrelay admin API at {url}: {}", connect_reason(.source))]
    Connect { url: String, source: std::io::Error },
    #[error("no answer from mailrelay admin API at {url} within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("malformed HTTP answer from mailrelay admin API at {url}: {detail}")]
    Malformed { url: String, detail: String },
}

fn connect_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        _ => e.to_string(),
    }
}

/// A bad admin URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("admin URL {0:?} must start with http:// (the admin API has no TLS)")]
    NotHttp(String),
    #[error("admin URL {0:?} has no host")]
    NoHost(String),
}

/// `http://host[:port]` of a relay's admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTransport {
    /// As given, without a trailing `/` (for messages).
    url: String,
    /// `host:port` to connect to and to send as `Host`.
    authority: String,
    timeout: Duration,
    max_body: usize,
}

impl HttpTransport {
    /// `url` is `http://host[:port][/]`; the port defaults to 80. `timeout`
    /// bounds each request as a whole: connect, send and read.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, UrlError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| UrlError::NotHttp(url.to_owned()))?;
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() {
            return Err(UrlError::NoHost(url.to_owned()));
        }
        let authority = if host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']')) {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        Ok(HttpTransport {
            url: url.trim_end_matches('/').to_owned(),
            authority,
            timeout,
            max_body: DEFAULT_MAX_BODY,
        })
    }

    /// Reads at most `max` bytes of an answer.
    pub fn with_max_body(mut self, max: usize) -> Self {
        self.max_body = max;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    async fn exchange(&self, r: Request<'_>) -> Result<Response, HttpError> {
        let malformed = |e: &dyn std::fmt::Display| HttpError::Malformed {
            url: self.url.clone(),
            detail: e.to_string(),
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|source| HttpError::Connect {
                url: self.url.clone(),
                source,
            })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| malformed(&e))?;
        // The connection is driven beside the request and ends with it.
        let driver = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(r.method.as_str())
            .uri(r.path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(t) = r.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(a) = r.actor {
            req = req.header(ACTOR_HEADER, a);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| malformed(&e))?;
        let result = async {
            let resp = send.send_request(req).await.map_err(|e| malformed(&e))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| malformed(&e))?
                .to_bytes();
            Ok(Response {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        }
        .await;
        driver.abort();
        result
    }
}

impl Transport for HttpTransport {
    type Error = HttpError;

    async fn send(&self, r: Request<'_>) -> Result<Response, HttpError> {
        match tokio::time::timeout(self.timeout, self.exchange(r)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                url: self.url.clone(),
                after: self.timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = HttpTransport::new("http://127.0.0.1:9325/", Duration::from_secs(1)).unwrap();
        assert_eq!(t.authority(), "127.0.0.1:9325");
        assert_eq!(t.url(), "http://127.0.0.1:9325");
        let t = HttpTransport::new("http://admin", Duration::from_secs(1)).unwrap();
        assert_eq!(t.authority(), "admin:80");
        let t = HttpTransport::new("http://[::1]", Duration::from_secs(1)).unwrap();
        assert_eq!(t.authority(), "[::1]:80");
        assert_eq!(
            HttpTransport::new("https://x", Duration::from_secs(1))
                .unwrap_err()
                .to_string(),
            "admin URL \"https://x\" must start with http:// (the admin API has no TLS)"
        );
        assert!(matches!(
            HttpTransport::new("http:///x", Duration::from_secs(1)),
            Err(UrlError::NoHost(_))
        ));
    }

    #[tokio::test]
    async fn a_closed_port_is_a_clear_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let t = HttpTransport::new(&format!("http://{addr}"), Duration::from_secs(5)).unwrap();
        let e = crate::Client::new(t).stats().await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot reach mailrelay admin API at http://{addr}: connection refused")
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_garbage_is_malformed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            // First connection: never answer. Second: not HTTP.
            let (_silent, _) = l.accept().await.unwrap();
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"garbage\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let t = HttpTransport::new(&format!("http://{addr}"), Duration::from_millis(300)).unwrap();
        let c = crate::Client::new(t);
        let e = c.stats().await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!("no answer from mailrelay admin API at http://{addr} within 300ms")
        );
        let e = c.stats().await.unwrap_err().to_string();
        assert!(e.starts_with("malformed HTTP answer"), "{e}");
    }
}
