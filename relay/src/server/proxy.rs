//! Reading a PROXY protocol header off the socket, before SMTP or TLS: the parser
//! itself (pure, fuzzed) is [`mailrelay_smtp::proxy`]; this drives it over the
//! socket and never consumes a byte past the header.

use std::time::Duration;

use mailrelay_smtp::proxy::{ProxyHeader, Step, V1_MAX_LEN, step};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use mailrelay_smtp::proxy::ProxyError;

/// Why no PROXY header was read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Parse(#[from] ProxyError),
    #[error("connection closed before the PROXY header was complete")]
    Eof,
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads exactly one PROXY header from `r` — not one byte more, so the stream can be
/// handed on to SMTP or TLS — within `max_wait` (which bounds a peer that connects
/// and trickles or sends nothing).
///
/// `r` should be the raw socket: a buffering wrapper would read ahead past the
/// header and the caller would have to take over its buffer.
pub async fn read_proxy_header<R: AsyncRead + Unpin>(
    r: &mut R,
    max_wait: Duration,
) -> Result<ProxyHeader, ReadError> {
    match tokio::time::timeout(max_wait, read_exactly_header(r)).await {
        Ok(result) => result,
        Err(_) => Err(ReadError::Timeout(max_wait)),
    }
}

async fn read_exactly_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<ProxyHeader, ReadError> {
    let mut buf = Vec::with_capacity(V1_MAX_LEN);
    loop {
        match step(&buf)? {
            Step::Done(header, consumed) => {
                debug_assert_eq!(consumed, buf.len(), "read past the PROXY header");
                return Ok(header);
            }
            Step::Need(n) => {
                let start = buf.len();
                buf.resize(start + n, 0);
                r.read_exact(&mut buf[start..]).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        ReadError::Eof
                    } else {
                        ReadError::Io(e)
                    }
                })?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use mailrelay_smtp::proxy::V2_SIGNATURE;
    use mailrelay_smtp::proxy::samples::{v2, v4_block, v6_block};
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[tokio::test]
    async fn reader_consumes_exactly_the_header() {
        let mut with_tlv = v4_block();
        with_tlv.extend_from_slice(&[0x04, 0x00, 0x02, 0, 0]);
        let cases: Vec<(Vec<u8>, Option<SocketAddr>)> = vec![
            (
                b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n".to_vec(),
                sa("192.0.2.10:40000"),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (v2(1, 0x11, &with_tlv), sa("192.0.2.10:40000")),
            (v2(1, 0x21, &v6_block()), sa("[2001:db8::1]:65535")),
            (v2(0, 0x00, &[]), None),
        ];
        for (header, source) in cases {
            let (mut client, mut server) = tokio::io::duplex(4096);
            let mut wire = header.clone();
            wire.extend_from_slice(b"EHLO client.example\r\n");
            // Sent in one write, so any over-read would swallow the SMTP bytes.
            client.write_all(&wire).await.unwrap();
            drop(client);
            let h = read_proxy_header(&mut server, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(h.source, source);
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"EHLO client.example\r\n");
        }
    }

    #[tokio::test]
    async fn reader_reports_errors_eof_and_timeout() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"EHLO x\r\n").await.unwrap();
        let e = read_proxy_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Parse(ProxyError::NotProxy)), "{e:?}");

        // A short non-PROXY line fails at once, without waiting for more bytes.
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"PING\r\n").await.unwrap();
        let e = read_proxy_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Parse(ProxyError::NotProxy)), "{e:?}");
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"PROXY \r\n").await.unwrap();
        let e = read_proxy_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Parse(ProxyError::V1(_))), "{e:?}");
        drop(client);

        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"PROXY TCP4 192.0.2.10").await.unwrap();
        drop(client);
        let e = read_proxy_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Eof), "{e:?}");

        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&V2_SIGNATURE[..5]).await.unwrap();
        let e = read_proxy_header(&mut server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Timeout(_)), "{e:?}");
        drop(client);
    }
}
