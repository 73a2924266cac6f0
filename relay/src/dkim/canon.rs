//! RFC 6376 §3.4 canonicalisation, over the message as queued (CRLF line ends,
//! octets opaque: 8-bit and UTF-8 text pass through unchanged).

use super::config::Canon;

/// One header field as it appears in the message: `raw` includes its folded
/// continuation lines and the final CRLF.
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub raw: &'a [u8],
}

/// Splits a message into its header fields and its body (what follows the empty
/// line; empty when there is none).
pub fn split(msg: &[u8]) -> (Vec<Field<'_>>, &[u8]) {
    let mut fields: Vec<Field<'_>> = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let end = memchr::memchr(b'\n', &msg[pos..]).map_or(msg.len(), |i| pos + i + 1);
        let line = &msg[pos..end];
        if line == b"\r\n" || line == b"\n" {
            return (fields, &msg[end..]);
        }
        if (line[0] == b' ' || line[0] == b'\t') && !fields.is_empty() {
            let last = fields.last_mut().expect("checked");
            let start = last.raw.as_ptr() as usize - msg.as_ptr() as usize;
            last.raw = &msg[start..end];
        } else {
            let colon = memchr::memchr(b':', line).unwrap_or(line.len());
            let name = trim_wsp_end(&line[..colon]);
            fields.push(Field { name, raw: line });
        }
        pos = end;
    }
    (fields, &msg[msg.len()..])
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_wsp_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., last] = s {
        if is_wsp(*last) || *last == b'\r' || *last == b'\n' {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn trim_wsp_start(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if is_wsp(*first) || *first == b'\r' || *first == b'\n' {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Appends the canonical form of one header field, CRLF-terminated.
pub fn header(canon: Canon, raw: &[u8], out: &mut Vec<u8>) {
    match canon {
        Canon::Simple => {
            out.extend_from_slice(raw);
            if !raw.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
        Canon::Relaxed => {
            let colon = memchr::memchr(b':', raw).unwrap_or(raw.len());
            let name = trim_wsp_end(&raw[..colon]);
            out.extend(name.iter().map(u8::to_ascii_lowercase));
            out.push(b':');
            let value = if colon < raw.len() {
                &raw[colon + 1..]
            } else {
                &[][..]
            };
            let value = trim_wsp_end(trim_wsp_start(value));
            // Unfold (drop CR and LF), then squeeze every WSP run to one space.
            let mut in_wsp = false;
            for &b in value {
                match b {
                    b'\r' | b'\n' => {}
                    b' ' | b'\t' => in_wsp = true,
                    _ => {
                        if in_wsp {
                            out.push(b' ');
                            in_wsp = false;
                        }
                        out.push(b);
                    }
                }
            }
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Feeds the canonical body to `sink` in pieces (no copy of the whole body).
pub fn body(canon: Canon, body: &[u8], mut sink: impl FnMut(&[u8])) {
    // Empty lines are held back until a non-empty line follows: trailing ones
    // are dropped (both algorithms).
    let mut held_empty = 0usize;
    let mut any = false;
    let mut line_buf = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let nl = memchr::memchr(b'\n', &body[pos..]).map(|i| pos + i);
        let (line, next) = match nl {
            Some(i) => (&body[pos..i], i + 1),
            None => (&body[pos..], body.len()),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos = next;
        let content: &[u8] = match canon {
            Canon::Simple => line,
            Canon::Relaxed => {
                line_buf.clear();
                let mut in_wsp = false;
                for &b in line {
                    if is_wsp(b) {
                        in_wsp = true;
                    } else {
                        if in_wsp {
                            line_buf.push(b' ');
                            in_wsp = false;
                        }
                        line_buf.push(b);
                    }
                }
                &line_buf
            }
        };
        if content.is_empty() {
            held_empty += 1;
            continue;
        }
        for _ in 0..held_empty {
            sink(b"\r\n");
        }
        held_empty = 0;
        sink(content);
        sink(b"\r\n");
        any = true;
    }
    // An empty body is one CRLF in simple, nothing in relaxed (RFC 6376 §3.4.3, §3.4.4).
    if !any && canon == Canon::Simple {
        sink(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(c: Canon, b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        body(c, b, |p| out.extend_from_slice(p));
        out
    }

    fn header_of(c: Canon, raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        header(c, raw, &mut out);
        out
    }

    #[test]
    fn rfc6376_section_3_4_6_example() {
        let msg = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n";
        let (fields, b) = split(msg);
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[1].name, b"B");
        let relaxed: Vec<u8> = fields
            .iter()
            .flat_map(|f| header_of(Canon::Relaxed, f.raw))
            .collect();
        assert_eq!(relaxed, b"a:X\r\nb:Y Z\r\n");
        assert_eq!(body_of(Canon::Relaxed, b), b" C\r\nD E\r\n");
        let simple: Vec<u8> = fields
            .iter()
            .flat_map(|f| header_of(Canon::Simple, f.raw))
            .collect();
        assert_eq!(simple, b"A: X\r\nB : Y\t\r\n\tZ  \r\n");
        assert_eq!(body_of(Canon::Simple, b), b" C \r\nD \t E\r\n");
    }

    #[test]
    fn empty_and_unterminated_bodies() {
        assert_eq!(body_of(Canon::Simple, b""), b"\r\n");
        assert_eq!(body_of(Canon::Simple, b"\r\n\r\n"), b"\r\n");
        assert_eq!(body_of(Canon::Relaxed, b""), b"");
        assert_eq!(body_of(Canon::Relaxed, b"  \r\n\r\n"), b"");
        assert_eq!(body_of(Canon::Relaxed, b"x"), b"x\r\n");
        assert_eq!(body_of(Canon::Simple, b"a\r\n\r\nb"), b"a\r\n\r\nb\r\n");
    }

    #[test]
    fn eight_bit_octets_pass_through() {
        let b = "Grüße\t aus Zürich \r\n".as_bytes();
        assert_eq!(
            body_of(Canon::Relaxed, b),
            "Grüße aus Zürich\r\n".as_bytes()
        );
        assert_eq!(
            header_of(Canon::Relaxed, "Subject:  Grüße \r\n".as_bytes()),
            "subject:Grüße\r\n".as_bytes()
        );
    }

    #[test]
    fn headers_only_message() {
        let (f, b) = split(b"From: a@b.c\r\nTo: d@e.f\r\n");
        assert_eq!(f.len(), 2);
        assert!(b.is_empty());
    }
}
