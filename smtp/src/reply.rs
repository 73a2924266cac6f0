//! SMTP replies (RFC 5321 §4.2) with RFC 3463 enhanced status codes (RFC 2034).

/// An RFC 3463 enhanced status code `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    /// One entry per reply line; never empty.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, enhanced: Option<Enhanced>, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced,
            lines: vec![text.into()],
        }
    }

    /// A reply with an enhanced code, written `code x.y.z text`.
    pub fn status(
        code: u16,
        class_subject_detail: (u8, u16, u16),
        text: impl Into<String>,
    ) -> Self {
        let (c, s, d) = class_subject_detail;
        Self::new(code, Some(Enhanced(c, s, d)), text)
    }

    pub fn multiline(code: u16, lines: Vec<String>) -> Self {
        debug_assert!(!lines.is_empty());
        Reply {
            code,
            enhanced: None,
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_permanent_failure(&self) -> bool {
        self.code >= 500
    }

    /// Wire form: every line `code-text` but the last `code text`, each ending CRLF.
    /// Text is sanitised so a reply can never inject a CR or LF of its own.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // Written straight into `out`: every session writes 6-7 replies (one of them the
        // multi-line EHLO), and going through `fmt` and a `String` per char was ~1,400
        // instructions per line. The code and enhanced code are rendered once per reply
        // and `out` grows once: per line they were ~500 instructions of a 1 KB message's
        // ~185,000 (callgrind, bench/redis-cost.sh).
        let mut head = [0u8; 32];
        let mut len = put_number(&mut head, 0, u32::from(self.code));
        let sep = len;
        len += 1;
        if let Some(Enhanced(c, sub, d)) = self.enhanced {
            len = put_number(&mut head, len, u32::from(c));
            head[len] = b'.';
            len = put_number(&mut head, len + 1, u32::from(sub));
            head[len] = b'.';
            len = put_number(&mut head, len + 1, u32::from(d));
            head[len] = b' ';
            len += 1;
        }
        let n = self.lines.len();
        out.reserve(self.lines.iter().map(|l| len + l.len() + 2).sum());
        for (i, line) in self.lines.iter().enumerate() {
            head[sep] = if i + 1 == n { b' ' } else { b'-' };
            out.extend_from_slice(&head[..len]);
            push_sanitised(out, line);
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }

    /// The wire form without its trailing line break (and trailing blanks): what
    /// `to_string().trim_end()` gives, in one allocation instead of three, for the
    /// status record and event of every delivered recipient.
    pub fn to_text(&self) -> String {
        let mut s = match String::from_utf8(self.to_bytes()) {
            Ok(s) => s,
            // Not reached: the lines are `String`s and sanitising keeps UTF-8.
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        let n = s.trim_end().len();
        s.truncate(n);
        s
    }
}

/// Writes `v` in decimal at `buf[at..]` (room for 10 digits), returning where it ends.
fn put_number(buf: &mut [u8; 32], at: usize, v: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    let mut v = v;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let end = at + digits.len() - i;
    buf[at..end].copy_from_slice(&digits[i..]);
    end
}

/// `line` with every control character (`char::is_control`: C0, DEL, C1) made a
/// space, so a reply can never carry a CR or LF of its own.
fn push_sanitised(out: &mut Vec<u8>, line: &str) {
    // C0 and DEL are single bytes; C1 (U+0080..U+009F) is encoded 0xC2 0x80..0x9F.
    // No early exit: a fold the compiler can check many bytes at a time with.
    let dirty = line
        .bytes()
        .fold(false, |d, b| d | (b < 0x20) | (b == 0x7f) | (b == 0xc2));
    if !dirty {
        out.extend_from_slice(line.as_bytes());
        return;
    }
    let mut tmp = [0u8; 4];
    for c in line.chars() {
        let c = if c.is_control() { ' ' } else { c };
        out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(String::from_utf8_lossy(&self.to_bytes()).trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_text_is_the_display_form() {
        for r in [
            Reply::status(250, (2, 0, 0), "Ok"),
            Reply::status(550, (5, 1, 1), "no such user   "),
            Reply::multiline(250, vec!["host".into(), "PIPELINING".into()]),
            Reply::new(421, None, "bad\r\nline \u{85}"),
        ] {
            assert_eq!(r.to_text(), r.to_string().trim_end());
        }
    }

    #[test]
    fn single_and_multiline_wire_form() {
        assert_eq!(
            Reply::status(250, (2, 0, 0), "Ok").to_bytes(),
            b"250 2.0.0 Ok\r\n"
        );
        let r = Reply::multiline(
            250,
            vec!["host".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(
            r.to_bytes(),
            b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }

    /// The former `fmt`-based writer, kept as the reference.
    fn reference(r: &Reply) -> Vec<u8> {
        use std::fmt::Write as _;
        let n = r.lines.len();
        let mut s = String::new();
        for (i, line) in r.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let _ = write!(s, "{}{}", r.code, sep);
            if let Some(Enhanced(c, sub, d)) = r.enhanced {
                let _ = write!(s, "{c}.{sub}.{d} ");
            }
            s.extend(line.chars().map(|c| if c.is_control() { ' ' } else { c }));
            s.push_str("\r\n");
        }
        s.into_bytes()
    }

    #[test]
    fn wire_form_matches_the_fmt_reference() {
        let texts = [
            "",
            "Ok",
            "tab\there",
            "nul\0x",
            "del\u{7f}",
            "c1\u{85}nel",
            "c1 end\u{9f}",
            "latin \u{e9}\u{c2}\u{a0}",
            "\u{c0}\u{c2}",
            "emoji \u{1f600}",
            "bad\r\n250 ok",
        ];
        for code in [0u16, 7, 99, 220, 250, 554, 65535] {
            for enhanced in [None, Some(Enhanced(2, 0, 0)), Some(Enhanced(5, 710, 65535))] {
                for t in texts {
                    let one = Reply::new(code, enhanced, t);
                    assert_eq!(one.to_bytes(), reference(&one), "{code} {enhanced:?} {t:?}");
                }
                let many = Reply {
                    code,
                    enhanced,
                    lines: texts.iter().map(|t| t.to_string()).collect(),
                };
                assert_eq!(many.to_bytes(), reference(&many));
            }
        }
    }

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::status(550, (5, 1, 1), "bad\r\n250 ok");
        assert_eq!(r.to_bytes(), b"550 5.1.1 bad  250 ok\r\n");
    }
}
