//! The SMTP replies quotas give and read, as plain values: the protocol layer's
//! reply type stays the protocol's, and the adapters in `server::quota` convert.

/// A reply: code, RFC 3463 enhanced status code, one line of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: (u8, u16, u16),
    pub text: String,
}

impl Reply {
    pub fn status(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced,
            text: text.into(),
        }
    }
}

/// `code x.y.z text`, as on the wire.
impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (c, s, d) = self.enhanced;
        write!(f, "{} {c}.{s}.{d} {}", self.code, self.text)
    }
}
