//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz), kept here so that the
//! normal test suite replays every committed corpus file through exactly the same
//! code (see the tests below) without a nightly toolchain.
//!
//! Each body takes arbitrary bytes and asserts properties beyond "no panic": what
//! is parsed renders back to input that parses to the same value, incremental
//! feeding agrees with all-at-once, and what is consumed or kept stays bounded.
//! A failed assertion is a finding.

use std::net::SocketAddr;

use crate::client::{self, Capabilities, MAX_REPLY_BYTES, MAX_REPLY_LINES};
use crate::command::{self, Command, validate_mailbox};
use crate::data::DataDecoder;
use crate::proxy::{self, ProxyHeader, V2_SIGNATURE};
use crate::reply::Reply;
use crate::session::MAX_AUTH_LINE;

/// A fuzz target's body: takes any bytes, panics on a finding.
pub type Body = fn(&[u8]);

/// The fuzz targets and their bodies, by the name of the target (and of its
/// corpus directory, `fuzz/corpus/<name>/`).
pub const TARGETS: &[(&str, Body)] = &[
    ("command", command),
    ("data", data),
    ("bdat", bdat),
    ("proxy", proxy),
    ("client_reply", client_reply),
    ("ehlo", ehlo),
];

/// One command line as the session hands it over (UTF-8, without CRLF): a parsed
/// command renders to a line that parses to the same command; a refused one is
/// answered with a 5xx.
pub fn command(input: &[u8]) {
    let Ok(line) = std::str::from_utf8(input) else {
        return;
    };
    if line.len() > MAX_AUTH_LINE || line.contains(['\r', '\n']) {
        return;
    }
    match command::parse(line) {
        Ok(cmd) => {
            assert!(!cmd.verb().is_empty());
            if let Some(again) = render_command(&cmd) {
                assert_eq!(
                    command::parse(&again),
                    Ok(cmd.clone()),
                    "{line:?} parsed to {cmd:?}, rendered as {again:?}"
                );
            }
        }
        Err(e) => {
            let r = e.reply();
            assert!((500..600).contains(&r.code), "{line:?}: {r}");
        }
    }
}

/// The canonical line of a command; `None` for what has no SMTP form (a foreign
/// protocol) or for a path the session refuses anyway (the parser leaves mailbox
/// syntax to [`validate_mailbox`]).
fn render_command(cmd: &Command) -> Option<String> {
    let path_line = |verb: &str, path: &str, params: &[command::Param]| {
        if !path.is_empty() && validate_mailbox(path, true).is_err() {
            return None;
        }
        let mut s = format!("{verb}:<{path}>");
        for p in params {
            s.push(' ');
            s.push_str(&p.keyword);
            if let Some(v) = &p.value {
                s.push('=');
                s.push_str(v);
            }
        }
        Some(s)
    };
    Some(match cmd {
        Command::Ehlo(h) => format!("EHLO {h}"),
        Command::Helo(h) => format!("HELO {h}"),
        Command::Mail { path, params } => path_line("MAIL FROM", path, params)?,
        Command::Rcpt { path, params } => path_line("RCPT TO", path, params)?,
        Command::Data => "DATA".into(),
        Command::Bdat { size, last } => format!("BDAT {size}{}", if *last { " LAST" } else { "" }),
        Command::Rset => "RSET".into(),
        Command::Noop => "NOOP".into(),
        Command::Quit => "QUIT".into(),
        Command::Help => "HELP".into(),
        Command::Vrfy => "VRFY".into(),
        Command::Expn => "EXPN".into(),
        Command::StartTls => "STARTTLS".into(),
        Command::Auth { mechanism, initial } => match initial {
            Some(i) => format!("AUTH {mechanism} {i}"),
            None => format!("AUTH {mechanism}"),
        },
        Command::ForeignProtocol => return None,
    })
}

/// Limits for the decoders, from the first input byte, so that the fuzzer reaches
/// the line and size limits with short inputs too.
fn limits(ctl: u8) -> (usize, u64) {
    (
        8 + usize::from(ctl & 0x0f) * 16,
        16 + u64::from(ctl >> 4) * 512,
    )
}

/// Chunk lengths from a control byte: the same input fed in pieces of 1 to 16
/// octets, varying along the input.
fn chunks(input: &[u8], ctl: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut at, mut k) = (0, usize::from(ctl));
    while at < input.len() {
        let n = (1 + (k % 16)).min(input.len() - at);
        out.push(&input[at..at + n]);
        at += n;
        k = k.wrapping_mul(31).wrapping_add(7);
    }
    out
}

struct Decoded {
    consumed: Option<usize>,
    size: u64,
    result: Result<Vec<u8>, crate::data::DataError>,
}

fn decode(mut d: DataDecoder, pieces: &[&[u8]], bdat: bool) -> Decoded {
    let mut consumed = None;
    let mut offset = 0;
    for p in pieces {
        if let Some(n) = d.feed(p) {
            assert!(n <= p.len());
            consumed = Some(offset + n);
            break;
        }
        offset += p.len();
    }
    if bdat {
        d.finish_bdat();
    }
    assert_eq!(consumed.is_some(), d.is_done());
    Decoded {
        consumed,
        size: d.size(),
        result: d.into_result(),
    }
}

/// Every LF is preceded by CR and every CR followed by LF: the decoders never pass
/// on a bare line ending.
fn only_crlf(out: &[u8]) -> bool {
    out.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && out[i - 1] == b'\r',
        b'\r' => out.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

/// DATA content: fed whole or in pieces, the decoder ends at the same octet with the
/// same message; what it accepts has only CRLF line endings, no NUL, no line over
/// the limit, is no longer than its input, and survives the client's own
/// dot-stuffing ([`client::encode_data`]) unchanged.
pub fn data(input: &[u8]) {
    let Some((&ctl, body)) = input.split_first() else {
        return;
    };
    let (max_line, max_size) = limits(ctl);
    let whole = decode(DataDecoder::for_data(max_line, max_size), &[body], false);
    let pieces = decode(
        DataDecoder::for_data(max_line, max_size),
        &chunks(body, ctl),
        false,
    );
    assert_eq!(whole.consumed, pieces.consumed);
    assert_eq!(whole.size, pieces.size);
    assert_eq!(whole.result, pieces.result);
    let Ok(out) = whole.result else { return };
    let Some(consumed) = whole.consumed else {
        assert!(out.len() <= body.len());
        return;
    };
    assert!(out.len() + 3 <= consumed, "{out:?} from {consumed} octets");
    assert!(only_crlf(&out), "{out:?}");
    assert!(!out.contains(&0));
    assert!(out.split(|&b| b == b'\n').all(|l| l.len() <= max_line + 1));
    assert_eq!(out.len() as u64, whole.size);
    // What we accept, we can relay: our client's encoding decodes to the same bytes.
    let wire = client::encode_data(&out);
    let again = decode(
        DataDecoder::for_data(max_line + 2, u64::MAX),
        &[&wire],
        false,
    );
    assert_eq!(again.consumed, Some(wire.len()));
    assert_eq!(again.result.as_deref(), Ok(&out[..]));
}

/// BDAT content: taken as-is, so an accepted message equals its input; chunking
/// never changes the outcome.
pub fn bdat(input: &[u8]) {
    let Some((&ctl, body)) = input.split_first() else {
        return;
    };
    let (max_line, max_size) = limits(ctl);
    let whole = decode(DataDecoder::for_bdat(max_line, max_size), &[body], true);
    let pieces = decode(
        DataDecoder::for_bdat(max_line, max_size),
        &chunks(body, ctl),
        true,
    );
    assert_eq!(whole.consumed, None);
    assert_eq!(pieces.consumed, None);
    assert_eq!(whole.result, pieces.result);
    assert!(whole.size <= body.len() as u64);
    if let Ok(out) = whole.result {
        assert_eq!(out, body);
        assert_eq!(whole.size, body.len() as u64);
        assert!(only_crlf(&out));
        assert!(body.len() as u64 <= max_size);
    }
}

/// PROXY v1/v2 headers: the parser agrees with the incremental reader (which asks
/// for exactly what it needs), never claims more than it was given, and a parsed
/// header written back as v1 and as v2 parses to itself.
pub fn proxy(input: &[u8]) {
    let parsed = proxy::parse(input);
    // The socket reader's loop, over `input` as the stream.
    let mut buf: Vec<u8> = Vec::new();
    let read = loop {
        match proxy::step(&buf) {
            Ok(proxy::Step::Done(h, n)) => break Ok(Some((h, n))),
            Ok(proxy::Step::Need(n)) => {
                assert!(n >= 1);
                if buf.len() + n > input.len() {
                    break Ok(None);
                }
                buf.extend_from_slice(&input[buf.len()..buf.len() + n]);
            }
            Err(e) => break Err(e),
        }
    };
    match (&parsed, &read) {
        (Ok(Some((h, n))), Ok(Some((h2, n2)))) => {
            assert_eq!((h, n), (h2, n2));
            assert_eq!(*n2, buf.len(), "the reader read past the header");
            assert!(*n <= input.len() && *n <= proxy::V1_MAX_LEN.max(16 + proxy::MAX_V2_LEN));
            assert_eq!(proxy::parse(&input[..*n]).ok(), Some(Some((*h, *n))));
            for wire in render_proxy(h) {
                let again = proxy::parse(&wire);
                assert_eq!(
                    again.as_ref().ok(),
                    Some(&Some((*h, wire.len()))),
                    "{h:?} as {wire:?}: {again:?}"
                );
            }
        }
        // Incomplete for both, or refused by both (the reader may refuse earlier,
        // on a prefix, but never something the parser accepts). The reader asks
        // for whole fields (`read_exact`): input that ends inside one leaves it
        // waiting, while the parser may already see the error in the partial field.
        (Ok(None), Ok(None)) | (Err(_), Err(_)) | (Err(_), Ok(None)) => {}
        (Ok(None), Err(e)) => panic!("reader refused a valid prefix: {e}"),
        _ => panic!("parser {parsed:?} and reader {read:?} disagree"),
    }
}

/// The v1 and v2 forms of a header.
fn render_proxy(h: &ProxyHeader) -> Vec<Vec<u8>> {
    match (h.source, h.destination) {
        (None, None) => {
            let mut local = V2_SIGNATURE.to_vec();
            local.extend_from_slice(&[0x20, 0x00, 0, 0]);
            vec![b"PROXY UNKNOWN\r\n".to_vec(), local]
        }
        (Some(SocketAddr::V4(s)), Some(SocketAddr::V4(d))) => {
            let v1 = format!(
                "PROXY TCP4 {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            );
            let mut v2 = V2_SIGNATURE.to_vec();
            v2.extend_from_slice(&[0x21, 0x11, 0, 12]);
            v2.extend_from_slice(&s.ip().octets());
            v2.extend_from_slice(&d.ip().octets());
            v2.extend_from_slice(&s.port().to_be_bytes());
            v2.extend_from_slice(&d.port().to_be_bytes());
            vec![v1.into_bytes(), v2]
        }
        (Some(SocketAddr::V6(s)), Some(SocketAddr::V6(d))) => {
            let v1 = format!(
                "PROXY TCP6 {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            );
            let mut v2 = V2_SIGNATURE.to_vec();
            v2.extend_from_slice(&[0x21, 0x21, 0, 36]);
            v2.extend_from_slice(&s.ip().octets());
            v2.extend_from_slice(&d.ip().octets());
            v2.extend_from_slice(&s.port().to_be_bytes());
            v2.extend_from_slice(&d.port().to_be_bytes());
            vec![v1.into_bytes(), v2]
        }
        other => panic!("a header with mixed or half addresses: {other:?}"),
    }
}

/// A server's reply as the delivery client reads it: bounded, and what it parses
/// is written back (as our server writes replies) to a reply that parses the same.
pub fn client_reply(input: &[u8]) {
    let Ok(Some((r, n))) = client::parse_reply(input) else {
        return;
    };
    assert!(n <= input.len() && n <= MAX_REPLY_BYTES);
    assert!(!r.lines.is_empty() && r.lines.len() <= MAX_REPLY_LINES);
    assert!((100..600).contains(&r.code), "{r:?}");
    // Parsing only what was consumed gives the same reply.
    assert_eq!(client::parse_reply(&input[..n]), Ok(Some((r.clone(), n))));
    let wire = r.to_bytes();
    let (again, n2) = client::parse_reply(&wire)
        .unwrap_or_else(|e| panic!("{r:?} as {wire:?}: {e}"))
        .unwrap_or_else(|| panic!("{r:?} as {wire:?}: incomplete"));
    assert_eq!(n2, wire.len());
    assert_eq!((again.code, again.lines.len()), (r.code, r.lines.len()));
    if r.lines.iter().all(|l| !l.chars().any(char::is_control)) {
        assert_eq!(again, r, "{wire:?}");
    } else {
        // Our writer blanks control characters, which can turn the text into an
        // enhanced code (`2.0.0<CR>x` is written `2.0.0 x`); from then on it is stable.
        let wire2 = again.to_bytes();
        assert_eq!(client::parse_reply(&wire2), Ok(Some((again, wire2.len()))));
    }
}

/// EHLO capabilities: keywords are case-insensitive, and the capabilities written
/// back as an EHLO reply read the same.
pub fn ehlo(input: &[u8]) {
    let Ok(Some((r, _))) = client::parse_reply(input) else {
        return;
    };
    let caps = Capabilities::from_ehlo(&r);
    let mut shouted = r.clone();
    for l in shouted.lines.iter_mut().skip(1) {
        *l = l.to_ascii_uppercase();
    }
    let mut whispered = r.clone();
    for l in whispered.lines.iter_mut().skip(1) {
        *l = l.to_ascii_lowercase();
    }
    assert_eq!(Capabilities::from_ehlo(&shouted), caps);
    assert_eq!(Capabilities::from_ehlo(&whispered), caps);
    assert!(caps.auth.len() < r.lines.iter().map(|l| l.len()).sum::<usize>().max(1));
    assert_eq!(Capabilities::from_ehlo(&render_ehlo(&caps)), caps);
}

fn render_ehlo(c: &Capabilities) -> Reply {
    let mut lines = vec![c.hostname.clone()];
    let flags = [
        (c.pipelining, "PIPELINING"),
        (c.eight_bit_mime, "8BITMIME"),
        (c.smtputf8, "SMTPUTF8"),
        (c.starttls, "STARTTLS"),
        (c.dsn, "DSN"),
        (c.enhanced_status_codes, "ENHANCEDSTATUSCODES"),
        (c.chunking, "CHUNKING"),
    ];
    lines.extend(flags.iter().filter(|f| f.0).map(|f| f.1.to_owned()));
    if let Some(n) = c.size {
        lines.push(format!("SIZE {n}"));
    }
    if !c.auth.is_empty() {
        lines.push(format!("AUTH {}", c.auth.join(" ")));
    }
    Reply::multiline(250, lines)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// `fuzz/corpus/<target>/` of the workspace.
    fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        files.sort();
        files
    }

    /// Every committed corpus file (the seeds and what fuzzing found) goes through
    /// its target's body, so a regression shows in the normal suite.
    #[test]
    fn every_corpus_file_passes_its_target() {
        for (name, body) in TARGETS {
            let files = corpus(name);
            assert!(files.len() >= 10, "{name}: only {} seeds", files.len());
            for (path, bytes) in files {
                let r = std::panic::catch_unwind(|| body(&bytes));
                assert!(r.is_ok(), "{name}: {} fails", path.display());
            }
        }
    }
}
