//! PROXY protocol v1 (text) and v2 (binary), as specified by HAProxy
//! (`proxy-protocol.txt`), so a relay behind a TCP load balancer sees the real client
//! address — which relay policy depends on.
//!
//! [`parse`] is a pure function over the bytes received so far; [`step`] also says
//! how many bytes to read next, so that the relay's socket reader never consumes a
//! byte past the header, because the bytes after it belong to SMTP or TLS.
//!
//! Choices where the spec leaves room:
//! - v1 is parsed strictly: single spaces, canonical decimal ports (no sign, no
//!   leading zero), addresses of the announced family, `CRLF` within 107 bytes.
//!   After `UNKNOWN` the spec says the rest of the line is ignored, so it is.
//! - v2 `LOCAL` (health checks from the proxy itself) and `PROXY` with `AF_UNSPEC`
//!   yield no addresses; the caller uses the socket peer, as the spec requires.
//! - v2 `PROXY` over `AF_UNIX`, `DGRAM` or an unspecified transport is rejected
//!   rather than accepted with the proxy's own address: an SMTP relay only ever sees
//!   TCP, such a header means a misconfigured balancer, and falling back to the
//!   balancer's address could grant it relay rights meant for its network.
//! - v2 TLVs are skipped unread; the declared length is capped at [`MAX_V2_LEN`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte v2 signature; no valid v1 header or SMTP/TLS stream starts with it.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest v1 header, `CRLF` included (spec section 2.1).
pub const V1_MAX_LEN: usize = 107;

/// Largest v2 address-plus-TLV length accepted. The spec sizes headers to fit in a
/// 536-byte segment; 2 KiB leaves room for cloud balancers' TLVs (AWS VPC endpoint
/// ids, Azure link ids, TLS details) while bounding what an unauthenticated peer
/// can make us buffer.
pub const MAX_V2_LEN: usize = 2048;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_HEADER_LEN: usize = 16;

/// Endpoints announced by the proxy. `None` when the proxy did not relay an address
/// (v1 `UNKNOWN`, v2 `LOCAL`, v2 `AF_UNSPEC`): the caller then uses the socket peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

impl ProxyHeader {
    const UNKNOWN: ProxyHeader = ProxyHeader {
        source: None,
        destination: None,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("connection did not start with a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("PROXY v2 header declares {0} bytes of addresses and TLVs, more than the {max} accepted", max = MAX_V2_LEN)]
    V2TooLong(usize),
    #[error(
        "unsupported PROXY v2 address family/transport byte 0x{0:02x} (only TCP over IPv4 or IPv6)"
    )]
    V2Unsupported(u8),
}

/// What the parser needs next; `Need(n)` never asks for bytes past a valid header,
/// which lets the reader use `read_exact` without over-reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Done(ProxyHeader, usize),
    Need(usize),
}

/// Parses a PROXY header at the start of `buf`.
///
/// `Ok(None)`: `buf` is a valid prefix of a header, feed more bytes.
/// `Ok(Some((header, consumed)))`: the header is the first `consumed` bytes; anything
/// after it belongs to the next protocol.
/// `Err(_)`: `buf` cannot start a valid header; reported as early as possible.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    Ok(match step(buf)? {
        Step::Done(header, consumed) => Some((header, consumed)),
        Step::Need(_) => None,
    })
}

/// [`parse`], and when `buf` is an incomplete prefix, how many more bytes are
/// needed at least (never more than the rest of a valid header).
pub fn step(buf: &[u8]) -> Result<Step, ProxyError> {
    match buf.first() {
        None => Ok(Step::Need(1)),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Step, ProxyError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyError::V1("no CRLF within 107 bytes"));
        }
        // The prefix in one read, then byte by byte: the end of the line is unknown,
        // and a peer that is not speaking PROXY is told so as early as possible.
        return Ok(Step::Need(V1_PREFIX.len().saturating_sub(buf.len()).max(1)));
    };
    if window[cr] == b'\n' {
        return Err(ProxyError::V1("bare LF, CRLF required"));
    }
    match buf.get(cr + 1) {
        // The LF may be byte 107, just outside `window`.
        None if cr + 1 < V1_MAX_LEN => return Ok(Step::Need(1)),
        Some(b'\n') if cr + 1 < V1_MAX_LEN => {}
        None | Some(b'\n') => return Err(ProxyError::V1("no CRLF within 107 bytes")),
        Some(_) => return Err(ProxyError::V1("bare CR, CRLF required")),
    }
    let header = parse_v1_line(&buf[V1_PREFIX.len()..cr])?;
    Ok(Step::Done(header, cr + 2))
}

/// `line` is everything between `PROXY ` and `CRLF`.
fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, ProxyError> {
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return Ok(ProxyHeader::UNKNOWN);
    }
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1("not ASCII"))?;
    let mut fields = line.split(' ');
    let proto = fields.next().unwrap_or_default();
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::V1(
            "expected `TCP4|TCP6 SRC DST SPORT DPORT` separated by single spaces",
        ));
    };
    let (src, dst) = match proto {
        "TCP4" => (
            IpAddr::V4(parse_v1_addr(src)?),
            IpAddr::V4(parse_v1_addr(dst)?),
        ),
        "TCP6" => (
            IpAddr::V6(parse_v1_addr(src)?),
            IpAddr::V6(parse_v1_addr(dst)?),
        ),
        _ => return Err(ProxyError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(ProxyHeader {
        source: Some(SocketAddr::new(src, parse_v1_port(sport)?)),
        destination: Some(SocketAddr::new(dst, parse_v1_port(dport)?)),
    })
}

fn parse_v1_addr<A: std::str::FromStr>(s: &str) -> Result<A, ProxyError> {
    // std rejects leading zeros in IPv4 octets, zone ids and surrounding junk.
    s.parse()
        .map_err(|_| ProxyError::V1("address missing, malformed or not of the announced family"))
}

fn parse_v1_port(s: &str) -> Result<u16, ProxyError> {
    const BAD: ProxyError = ProxyError::V1("port is not a decimal number 0-65535");
    // `u16::from_str` alone would accept `+25` and `0025`.
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD);
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(ProxyError::V1("port has a leading zero"));
    }
    s.parse().map_err(|_| BAD)
}

fn parse_v2(buf: &[u8]) -> Result<Step, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::V2("bad signature"));
    }
    if buf.len() < V2_HEADER_LEN {
        return Ok(Step::Need(V2_HEADER_LEN - buf.len()));
    }
    let version = buf[12] >> 4;
    let command = buf[12] & 0x0f;
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if version != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    if command > 1 {
        return Err(ProxyError::V2("command is neither LOCAL nor PROXY"));
    }
    if len > MAX_V2_LEN {
        return Err(ProxyError::V2TooLong(len));
    }
    let total = V2_HEADER_LEN + len;
    if buf.len() < total {
        return Ok(Step::Need(total - buf.len()));
    }
    let block = &buf[V2_HEADER_LEN..total];
    const LOCAL: u8 = 0;
    const AF_UNSPEC: u8 = 0x00;
    const TCP4: u8 = 0x11;
    const TCP6: u8 = 0x21;
    let header = match (command, family) {
        // Spec: for LOCAL, ignore the address block whatever its family says.
        (LOCAL, _) | (_, AF_UNSPEC) => ProxyHeader::UNKNOWN,
        (_, TCP4) => {
            let a: &[u8; 12] = block
                .get(..12)
                .and_then(|s| s.try_into().ok())
                .ok_or(ProxyError::V2("length too short for IPv4 addresses"))?;
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            ProxyHeader {
                source: Some(SocketAddr::new(ip(0), port(8))),
                destination: Some(SocketAddr::new(ip(4), port(10))),
            }
        }
        (_, TCP6) => {
            let a: &[u8; 36] = block
                .get(..36)
                .and_then(|s| s.try_into().ok())
                .ok_or(ProxyError::V2("length too short for IPv6 addresses"))?;
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            ProxyHeader {
                source: Some(SocketAddr::new(ip(0), port(32))),
                destination: Some(SocketAddr::new(ip(16), port(34))),
            }
        }
        (_, other) => return Err(ProxyError::V2Unsupported(other)),
    };
    Ok(Step::Done(header, total))
}

/// Sample PROXY v2 headers for tests here and in the relay's reader (not part of
/// the protocol API).
#[doc(hidden)]
pub mod samples {
    use std::net::Ipv6Addr;

    use super::V2_SIGNATURE;

    /// A v2 header: `command` (0 LOCAL, 1 PROXY), `family` byte, address block.
    pub fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | command);
        v.push(family);
        v.extend_from_slice(&(block.len() as u16).to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    /// 192.0.2.10:40000 → 198.51.100.1:25.
    pub fn v4_block() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 10, 198, 51, 100, 1];
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&25u16.to_be_bytes());
        b
    }

    /// [2001:db8::1]:65535 → [2001:db8::2]:587.
    pub fn v6_block() -> Vec<u8> {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut b = src.octets().to_vec();
        b.extend_from_slice(&dst.octets());
        b.extend_from_slice(&65535u16.to_be_bytes());
        b.extend_from_slice(&587u16.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn ok(buf: &[u8]) -> (ProxyHeader, usize) {
        parse(buf)
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(buf)))
            .unwrap_or_else(|| panic!("{:?}: incomplete", String::from_utf8_lossy(buf)))
    }

    use super::samples::{v2, v4_block, v6_block};

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let line = "PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n";
        let (h, n) = ok(format!("{line}EHLO x\r\n").as_bytes());
        assert_eq!(n, line.len());
        assert_eq!(h.source, sa("192.0.2.10:40000"));
        assert_eq!(h.destination, sa("198.51.100.1:25"));

        let line = "PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 0 65535\r\n";
        let (h, n) = ok(line.as_bytes());
        assert_eq!(n, line.len());
        assert_eq!(h.source, sa("[2001:db8::1]:0"));
        assert_eq!(h.destination, sa("[::ffff:192.0.2.1]:65535"));

        assert_eq!(ok(b"PROXY UNKNOWN\r\n"), (ProxyHeader::UNKNOWN, 15));
        let line = "PROXY UNKNOWN 2001:db8::1 2001:db8::2 1 2\r\n";
        assert_eq!(
            ok(format!("{line}X").as_bytes()),
            (ProxyHeader::UNKNOWN, line.len())
        );
    }

    #[test]
    fn v1_longest_header_is_accepted_and_one_more_byte_is_not() {
        // The spec's worst case.
        let ff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let long = format!("PROXY UNKNOWN {ff} {ff} 65535 65535\r\n");
        assert_eq!(long.len(), V1_MAX_LEN);
        assert_eq!(ok(long.as_bytes()), (ProxyHeader::UNKNOWN, V1_MAX_LEN));
        let tcp6 = format!("PROXY TCP6 {ff} {ff} 65535 65535\r\n");
        assert_eq!(ok(tcp6.as_bytes()).1, tcp6.len());

        let mut too_long = b"PROXY UNKNOWN ".to_vec();
        too_long.resize(V1_MAX_LEN - 1, b'x');
        too_long.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&too_long), Err(ProxyError::V1(_))));
        assert!(matches!(
            parse(&too_long[..V1_MAX_LEN]),
            Err(ProxyError::V1(_))
        ));
        assert!(matches!(parse(&too_long[..V1_MAX_LEN - 1]), Ok(None)));
    }

    #[test]
    fn v1_malformed() {
        let cases: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\rX",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25 \r\n",
            b"PROXY TCP4  192.0.2.10 198.51.100.1 40000 25\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 65536\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 99999\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 025\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 +25\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 -1\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 \r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.1 40000 25\r\n",
            b"PROXY TCP6 192.0.2.10 2001:db8::2 40000 25\r\n",
            b"PROXY TCP6 fe80::1%eth0 2001:db8::2 40000 25\r\n",
            b"PROXY TCP4 192.0.2.010 198.51.100.1 40000 25\r\n",
            b"PROXY TCP4 192.0.2 198.51.100.1 40000 25\r\n",
            b"PROXY TCP4 192.0.2.256 198.51.100.1 40000 25\r\n",
            b"PROXY UDP4 192.0.2.10 198.51.100.1 40000 25\r\n",
            b"PROXY tcp4 192.0.2.10 198.51.100.1 40000 25\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 \xff.0.2.10 198.51.100.1 40000 25\r\n",
        ];
        for case in cases {
            match parse(case) {
                Err(ProxyError::V1(_)) => {}
                other => panic!(
                    "{:?}: expected a v1 error, got {other:?}",
                    String::from_utf8_lossy(case)
                ),
            }
        }
        for case in [
            &b"PROXY\r\n"[..],
            b"proxy TCP4",
            b"EHLO x\r\n",
            b"\x16\x03\x01",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(matches!(parse(case), Err(ProxyError::NotProxy)), "{case:?}");
        }
    }

    #[test]
    fn v2_proxy_ipv4_and_ipv6_with_tlvs() {
        let mut block = v4_block();
        // PP2_TYPE_AUTHORITY "mx", then PP2_TYPE_NOOP padding.
        block.extend_from_slice(&[0x02, 0x00, 0x02, b'm', b'x', 0x04, 0x00, 0x01, 0x00]);
        let mut wire = v2(1, 0x11, &block);
        let len = wire.len();
        wire.extend_from_slice(b"EHLO");
        let (h, n) = ok(&wire);
        assert_eq!(n, len);
        assert_eq!(h.source, sa("192.0.2.10:40000"));
        assert_eq!(h.destination, sa("198.51.100.1:25"));

        let (h, n) = ok(&v2(1, 0x21, &v6_block()));
        assert_eq!(n, 16 + 36);
        assert_eq!(h.source, sa("[2001:db8::1]:65535"));
        assert_eq!(h.destination, sa("[2001:db8::2]:587"));
    }

    #[test]
    fn v2_local_and_unspec_have_no_addresses() {
        assert_eq!(ok(&v2(0, 0x00, &[])), (ProxyHeader::UNKNOWN, 16));
        // LOCAL ignores whatever address block it carries, even an unsupported one.
        assert_eq!(ok(&v2(0, 0x11, &v4_block())), (ProxyHeader::UNKNOWN, 28));
        assert_eq!(ok(&v2(0, 0x32, &[0; 216])), (ProxyHeader::UNKNOWN, 232));
        assert_eq!(ok(&v2(1, 0x00, &[1, 2, 3])), (ProxyHeader::UNKNOWN, 19));
    }

    #[test]
    fn v2_malformed() {
        let mut bad_sig = v2(1, 0x11, &v4_block());
        bad_sig[6] = b'X';
        assert!(matches!(parse(&bad_sig), Err(ProxyError::V2(_))));
        assert!(
            matches!(parse(&bad_sig[..7]), Err(ProxyError::V2(_))),
            "fails before 16 bytes"
        );

        let mut bad_version = v2(1, 0x11, &v4_block());
        bad_version[12] = 0x11;
        assert!(matches!(parse(&bad_version), Err(ProxyError::V2(_))));
        assert!(
            matches!(parse(&bad_version[..16]), Err(ProxyError::V2(_))),
            "fails at 16 bytes"
        );

        let bad_command = {
            let mut v = v2(1, 0x11, &v4_block());
            v[12] = 0x22;
            v
        };
        assert!(matches!(parse(&bad_command), Err(ProxyError::V2(_))));

        assert!(matches!(
            parse(&v2(1, 0x11, &v4_block()[..11])),
            Err(ProxyError::V2(_))
        ));
        assert!(matches!(
            parse(&v2(1, 0x21, &v4_block())),
            Err(ProxyError::V2(_))
        ));
        for family in [0x12, 0x22, 0x31, 0x32, 0x10, 0x01, 0x41, 0x13] {
            assert!(
                matches!(parse(&v2(1, family, &[0; 216])), Err(ProxyError::V2Unsupported(f)) if f == family),
                "family {family:#x}"
            );
        }

        let mut huge = v2(1, 0x11, &v4_block());
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            parse(&huge[..16]),
            Err(ProxyError::V2TooLong(65535))
        ));
        let at_cap = v2(1, 0x11, &[0; MAX_V2_LEN]);
        assert_eq!(ok(&at_cap).1, 16 + MAX_V2_LEN);
        assert!(matches!(
            parse(&v2(1, 0x11, &[0; MAX_V2_LEN + 1])),
            Err(ProxyError::V2TooLong(_))
        ));
    }

    #[test]
    fn incremental_feeding_yields_none_until_complete() {
        let mut with_tlv = v4_block();
        with_tlv.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]);
        let headers: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2(1, 0x11, &with_tlv),
            v2(1, 0x21, &v6_block()),
            v2(0, 0x00, &[]),
        ];
        for full in headers {
            for k in 0..full.len() {
                assert!(
                    matches!(parse(&full[..k]), Ok(None)),
                    "prefix {k} of {:?}",
                    String::from_utf8_lossy(&full)
                );
            }
            assert_eq!(ok(&full).1, full.len());
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_cafe);
        let seeds: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n".to_vec(),
            b"PROXY UNKNOWN x\r\n".to_vec(),
            v2(1, 0x11, &v4_block()),
            v2(1, 0x21, &v6_block()),
            v2(0, 0x00, &[]),
            V2_SIGNATURE.to_vec(),
        ];
        let check = |buf: &[u8]| {
            if let Ok(Some((_, consumed))) = parse(buf) {
                assert!(
                    consumed <= buf.len(),
                    "consumed {consumed} of {}",
                    buf.len()
                );
            }
        };
        for _ in 0..20_000 {
            let len = rng.random_range(0..300);
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf[..]);
            check(&buf);

            let mut m = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..4) {
                    0 if !m.is_empty() => {
                        let i = rng.random_range(0..m.len());
                        m[i] = rng.random();
                    }
                    1 => m.truncate(rng.random_range(0..=m.len())),
                    2 => {
                        let i = rng.random_range(0..=m.len());
                        m.insert(i, rng.random());
                    }
                    _ => m.extend((0..rng.random_range(0..64)).map(|_| rng.random::<u8>())),
                }
            }
            check(&m);
        }
    }
}
