//! SMTP replies (RFC 5321 §4.2) with RFC 3463 enhanced status codes (RFC 2034).

use std::fmt::Write as _;

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
        let n = self.lines.len();
        let mut s = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let _ = write!(s, "{}{}", self.code, sep);
            if let Some(Enhanced(c, sub, d)) = self.enhanced {
                let _ = write!(s, "{c}.{sub}.{d} ");
            }
            s.extend(line.chars().map(|c| if c.is_control() { ' ' } else { c }));
            s.push_str("\r\n");
        }
        out.extend_from_slice(s.as_bytes());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
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

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::status(550, (5, 1, 1), "bad\r\n250 ok");
        assert_eq!(r.to_bytes(), b"550 5.1.1 bad  250 ok\r\n");
    }
}
