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
    let mut fields: Vec<Field<'_>> = Vec::with_capacity(16);
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
            let mut value = trim_wsp_end(trim_wsp_start(value));
            // Unfold (drop CR and LF), then squeeze every WSP run to one space;
            // the text between such runs is copied whole.
            let is_gap = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
            while !value.is_empty() {
                let text = value.iter().position(is_gap).unwrap_or(value.len());
                out.extend_from_slice(&value[..text]);
                let gap = value[text..].iter().take_while(|b| is_gap(b)).count();
                if value[text..text + gap].iter().any(|&b| is_wsp(b)) {
                    out.push(b' ');
                }
                value = &value[text + gap..];
            }
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Whether a line (without its line end) is already in relaxed canonical form:
/// no tab, no run of two spaces, no trailing space (a lone space between words,
/// or leading, stays as it is).
fn relaxed_verbatim(line: &[u8], no_tab_or_double_space: bool) -> bool {
    match line.last() {
        None | Some(b' ') => false,
        Some(_) => {
            no_tab_or_double_space
                || (memchr::memchr(b'\t', line).is_none()
                    && memchr::memmem::find(line, b"  ").is_none())
        }
    }
}

/// Feeds the canonical body to `sink`, as slices of `body` wherever the
/// canonical form is the original bytes (runs of CRLF-terminated lines that need
/// no change go in one piece), so a typical body is hashed without a copy and
/// with a handful of `sink` calls.
pub fn body(canon: Canon, body: &[u8], mut sink: impl FnMut(&[u8])) {
    // One vectorised scan of the whole body usually spares the per-line checks.
    let clean = canon == Canon::Simple
        || (memchr::memchr(b'\t', body).is_none() && memchr::memmem::find(body, b"  ").is_none());
    // `body[span..upto]` is canonical as it stands and not yet fed; empty lines
    // are held back until a non-empty line follows (trailing ones are dropped),
    // and `held_verbatim` says they are exact CRLFs right after `upto`.
    let (mut span, mut upto) = (0usize, 0usize);
    let (mut held, mut held_verbatim) = (0usize, true);
    let mut any = false;
    let mut scratch = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let (line, next, crlf) = match memchr::memchr(b'\n', &body[pos..]) {
            Some(i) => {
                let nl = pos + i;
                match body[pos..nl].strip_suffix(b"\r") {
                    Some(l) => (l, nl + 1, true),
                    None => (&body[pos..nl], nl + 1, false),
                }
            }
            None => {
                let l = &body[pos..];
                (l.strip_suffix(b"\r").unwrap_or(l), body.len(), false)
            }
        };
        let start = pos;
        pos = next;
        let empty = match canon {
            Canon::Simple => line.is_empty(),
            Canon::Relaxed => line.iter().all(|&b| is_wsp(b)),
        };
        if empty {
            held += 1;
            held_verbatim &= crlf && line.is_empty();
            continue;
        }
        if held > 0 && !held_verbatim {
            if upto > span {
                sink(&body[span..upto]);
            }
            for _ in 0..held {
                sink(b"\r\n");
            }
            span = start;
        }
        // The held empty lines, if any, are exact CRLFs between `upto` and here.
        upto = start;
        held = 0;
        held_verbatim = true;
        any = true;
        let verbatim = crlf
            && match canon {
                Canon::Simple => true,
                Canon::Relaxed => relaxed_verbatim(line, clean),
            };
        if verbatim {
            upto = next;
            continue;
        }
        if upto > span {
            sink(&body[span..upto]);
        }
        match canon {
            Canon::Simple => sink(line),
            Canon::Relaxed => {
                scratch.clear();
                squeeze_wsp(line, &mut scratch);
                sink(&scratch);
            }
        }
        sink(b"\r\n");
        span = next;
        upto = next;
    }
    if upto > span {
        sink(&body[span..upto]);
    }
    // An empty body is one CRLF in simple, nothing in relaxed (RFC 6376 §3.4.3, §3.4.4).
    if !any && canon == Canon::Simple {
        sink(b"\r\n");
    }
}

/// Relaxed body line: every WSP run becomes one space, trailing WSP goes.
fn squeeze_wsp(line: &[u8], out: &mut Vec<u8>) {
    let mut in_wsp = false;
    for &b in line {
        if is_wsp(b) {
            in_wsp = true;
        } else {
            if in_wsp {
                out.push(b' ');
                in_wsp = false;
            }
            out.push(b);
        }
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

    /// The line-by-line canonicaliser this module used before the streaming one:
    /// the reference the streaming one must agree with, octet for octet.
    fn body_reference(canon: Canon, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
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
                    squeeze_wsp(line, &mut line_buf);
                    &line_buf
                }
            };
            if content.is_empty() {
                held_empty += 1;
                continue;
            }
            for _ in 0..held_empty {
                out.extend_from_slice(b"\r\n");
            }
            held_empty = 0;
            out.extend_from_slice(content);
            out.extend_from_slice(b"\r\n");
            any = true;
        }
        if !any && canon == Canon::Simple {
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn agrees(b: &[u8]) {
        for c in [Canon::Simple, Canon::Relaxed] {
            assert_eq!(
                body_of(c, b),
                body_reference(c, b),
                "{c:?} on {:?}",
                String::from_utf8_lossy(b)
            );
        }
    }

    #[test]
    fn streaming_body_equals_the_line_by_line_reference() {
        let tricky: &[&[u8]] = &[
            b"",
            b"\r\n",
            b"\r\n\r\n\r\n",
            b"a",
            b"a\r\n",
            b"a \r\n",
            b"a\t\r\n",
            b" a\r\n",
            b"  a\r\n",
            b"a  b\r\n",
            b"a\t \tb \r\n\r\n",
            b"a\r\n\r\n\r\nb\r\n\r\n",
            b"a\r\n  \r\n\t\r\nb\r\n",
            b"a\r\n \r\n",
            b"a\r\n\r\n",
            b"line one\r\n.\r\nline after a lone dot\r\n..two dots\r\n\r\n\r\n",
            b"a\r\n.\r\n",
            b"bare\nlf\n\nend\n",
            b"mixed\r\nends\nhere\r\n\n\r\n",
            b"cr\r\r\nin\rthe middle\r\n",
            b"no final newline",
            b"ends in cr\r",
            b"trailing blanks then text   \r\n\r\n x \r\n",
            "Grüße\t aus Zürich \r\n日本語  テキスト\r\n\r\n".as_bytes(),
            b"\xff\xfe 8-bit \x80\x81\r\n\xc3\r\n",
            b"\r\n\r\nleading empty lines\r\n",
        ];
        for b in tricky {
            agrees(b);
        }
        // Every short string over the octets that matter, and longer random ones.
        let alphabet: &[u8] = b"a \t\r\n.\xc3";
        for len in 0..=6u32 {
            for n in 0..alphabet.len().pow(len) {
                let mut m = n;
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        let c = alphabet[m % alphabet.len()];
                        m /= alphabet.len();
                        c
                    })
                    .collect();
                agrees(&b);
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 300) as usize;
            let b: Vec<u8> = (0..len)
                .map(|i| {
                    let r = x.rotate_left(i as u32 * 7) ^ (i as u64).wrapping_mul(0x2545_f491);
                    alphabet[(r % alphabet.len() as u64) as usize]
                })
                .collect();
            agrees(&b);
        }
    }

    #[test]
    fn a_clean_body_is_fed_in_one_piece() {
        let b = b"one line\r\nanother line\r\n\r\nafter an empty line\r\n\r\n\r\n";
        for c in [Canon::Simple, Canon::Relaxed] {
            let mut pieces = Vec::new();
            body(c, b, |p| pieces.push(p.to_vec()));
            assert_eq!(pieces, [b[..b.len() - 4].to_vec()], "{c:?}");
        }
    }

    #[test]
    fn relaxed_header_unfolds_and_squeezes() {
        for (raw, want) in [
            (&b"Subject: a\r\n\tb\r\n"[..], &b"subject:a b\r\n"[..]),
            (b"Subject:a\r\nb\r\n", b"subject:ab\r\n"),
            (b"X:  a \t b\t\r\n", b"x:a b\r\n"),
            (b"X : \r\n", b"x:\r\n"),
            (b"X", b"x:\r\n"),
            (b"To: a,\r\n  b ,\r\n\tc\r\n", b"to:a, b , c\r\n"),
            (
                "Subject: Gr\u{fc}\u{df}e  aus\r\n".as_bytes(),
                "subject:Gr\u{fc}\u{df}e aus\r\n".as_bytes(),
            ),
        ] {
            assert_eq!(
                header_of(Canon::Relaxed, raw),
                want,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn headers_only_message() {
        let (f, b) = split(b"From: a@b.c\r\nTo: d@e.f\r\n");
        assert_eq!(f.len(), 2);
        assert!(b.is_empty());
    }
}
