//! MTA-STS (RFC 8461) without IO: the `_mta-sts` TXT record, the policy file, and
//! which MX hosts a policy allows. Every function here is pure, so the parsers can
//! be fuzzed and tested without DNS or HTTPS.
//!
//! The parsers are strict where the RFC leaves room: a policy whose required fields
//! are missing, repeated or malformed is rejected as a whole (RFC 8461 §3.2 makes
//! such a policy "not valid"; the sender then behaves as if there were none, or
//! keeps a cached one), while unknown fields are ignored as the RFC requires.

/// RFC 8461 §3.2: `max_age` is at most 31557600 seconds (about a year).
pub const MAX_MAX_AGE: u64 = 31_557_600;

/// RFC 8461 §3.3: senders should not read more than 64 KiB of policy.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// The path every policy is published at (RFC 8461 §3.3).
pub const WELL_KNOWN_PATH: &str = "/.well-known/mta-sts.txt";

/// What a policy asks senders to do (RFC 8461 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to matching MX hosts over TLS with a valid certificate.
    Enforce,
    /// Deliver as usual, report what would have failed.
    Testing,
    /// The domain withdrew its policy.
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    pub mode: Mode,
    /// `mx` patterns in lower case, without trailing dots; `*.example.net` matches
    /// exactly one leftmost label.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

/// Why a TXT record or policy file was not accepted; the text names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("no TXT record starting with v=STSv1")]
    NoRecord,
    #[error("{0} TXT records start with v=STSv1 (exactly one is allowed)")]
    ManyRecords(usize),
    #[error("TXT record: {0}")]
    Txt(String),
    #[error("policy: {0}")]
    Policy(String),
}

/// Picks and parses the one `v=STSv1` record among the TXT strings of
/// `_mta-sts.<domain>` (each record's strings already joined), returning its `id`.
/// RFC 8461 §3.1: records not starting with `v=STSv1;` are ignored; zero or several
/// of them mean the domain has no usable policy record.
pub fn parse_txt_records<'a>(
    records: impl IntoIterator<Item = &'a [u8]>,
) -> Result<String, StsError> {
    let ours: Vec<&[u8]> = records
        .into_iter()
        .filter(|r| r.starts_with(b"v=STSv1;") || *r == b"v=STSv1")
        .collect();
    match ours.len() {
        0 => Err(StsError::NoRecord),
        1 => parse_txt(ours[0]),
        n => Err(StsError::ManyRecords(n)),
    }
}

/// Parses one record: `v=STSv1; id=<1-32 alphanumerics>;` with optional spaces
/// around the separators and extension fields ignored.
pub fn parse_txt(record: &[u8]) -> Result<String, StsError> {
    let text = std::str::from_utf8(record).map_err(|_| StsError::Txt("not ASCII".into()))?;
    let mut fields = text.split(';').map(|f| f.trim_matches([' ', '\t']));
    if fields.next() != Some("v=STSv1") {
        return Err(StsError::Txt("must start with v=STSv1".into()));
    }
    let mut id = None;
    for field in fields {
        if field.is_empty() {
            continue;
        }
        let Some((name, value)) = field.split_once('=') else {
            return Err(StsError::Txt(format!("field {field:?} has no `=`")));
        };
        // RFC 8461 §3.1 field names: 1*32(ALPHA / DIGIT / "_" / "-" / ".")
        if name.is_empty()
            || name.len() > 32
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(StsError::Txt(format!("bad field name {name:?}")));
        }
        if name == "id" {
            if id.is_some() {
                return Err(StsError::Txt("id given twice".into()));
            }
            if value.is_empty()
                || value.len() > 32
                || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(StsError::Txt(format!(
                    "id {value:?} must be 1 to 32 letters or digits"
                )));
            }
            id = Some(value.to_owned());
        } else if value
            .bytes()
            .any(|b| !(0x21..=0x7e).contains(&b) || b == b';' || b == b'=')
        {
            return Err(StsError::Txt(format!("field {name} has a bad value")));
        }
    }
    id.ok_or_else(|| StsError::Txt("no id field".into()))
}

/// Parses a policy file (`version`, `mode`, `mx`, `max_age`; RFC 8461 §3.2). Lines
/// end in LF or CRLF; unknown fields are ignored; every known field but `mx` must
/// appear exactly once.
pub fn parse_policy(body: &[u8]) -> Result<Policy, StsError> {
    let bad = |m: String| StsError::Policy(m);
    if body.len() > MAX_POLICY_BYTES {
        return Err(bad(format!("larger than {MAX_POLICY_BYTES} bytes")));
    }
    let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8".into()))?;
    let (mut version, mut mode, mut max_age) = (None, None, None);
    let mut mx = Vec::new();
    for (n, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("line {}: no `:`", n + 1)));
        };
        let value = value.trim_matches([' ', '\t']);
        let once = |slot: &mut Option<String>, field: &str| -> Result<(), StsError> {
            if slot.replace(value.to_owned()).is_some() {
                return Err(StsError::Policy(format!("{field} given twice")));
            }
            Ok(())
        };
        match name {
            "version" => once(&mut version, "version")?,
            "mode" => once(&mut mode, "mode")?,
            "max_age" => once(&mut max_age, "max_age")?,
            "mx" => mx.push(parse_mx_pattern(value)?),
            // RFC 8461 §3.2: extension fields are ignored, but their names are
            // still 1*32(ALPHA / DIGIT / "_" / "-" / ".").
            other => {
                if other.is_empty()
                    || other.len() > 32
                    || !other
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                {
                    return Err(bad(format!("line {}: bad field name {other:?}", n + 1)));
                }
            }
        }
    }
    match version.as_deref() {
        Some("STSv1") => {}
        Some(v) => return Err(bad(format!("version {v:?} is not STSv1"))),
        None => return Err(bad("no version field".into())),
    }
    let mode = match mode.as_deref() {
        Some("enforce") => Mode::Enforce,
        Some("testing") => Mode::Testing,
        Some("none") => Mode::None,
        Some(m) => return Err(bad(format!("mode {m:?} is not enforce, testing or none"))),
        None => return Err(bad("no mode field".into())),
    };
    let max_age = match max_age {
        None => return Err(bad("no max_age field".into())),
        Some(a) => {
            if a.is_empty() || a.len() > 10 || !a.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!("max_age {a:?} is not a number of seconds")));
            }
            let v: u64 = a.parse().map_err(|_| bad(format!("max_age {a:?}")))?;
            if v > MAX_MAX_AGE {
                return Err(bad(format!("max_age {v} is above {MAX_MAX_AGE}")));
            }
            v
        }
    };
    if mx.is_empty() && mode != Mode::None {
        return Err(bad(format!(
            "mode {} needs at least one mx field",
            mode.as_str()
        )));
    }
    Ok(Policy { mode, mx, max_age })
}

/// An `mx` value: a host name, or `*.` and a host name (the wildcard stands for
/// exactly one label).
fn parse_mx_pattern(value: &str) -> Result<String, StsError> {
    let v = value.trim_end_matches('.').to_ascii_lowercase();
    let host = v.strip_prefix("*.").unwrap_or(&v);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !ok {
        return Err(StsError::Policy(format!(
            "mx {value:?} is not a host name or *.host"
        )));
    }
    Ok(v)
}

impl Policy {
    /// Whether MX host `host` (any case, trailing dot allowed) matches one of the
    /// `mx` patterns (RFC 8461 §4.1).
    pub fn allows_mx(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
            None => *p == host,
        })
    }
}

/// For fuzzing: both parsers and the matcher on arbitrary input; never panics.
pub fn fuzz_one(data: &[u8]) {
    let _ = parse_txt_records([data]);
    if let Ok(p) = parse_policy(data) {
        assert!(p.max_age <= MAX_MAX_AGE);
        for pattern in &p.mx {
            let probe = pattern.replace('*', "x");
            assert!(p.allows_mx(&probe), "{pattern} must match {probe}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n";

    #[test]
    fn parses_the_rfc_example() {
        let p = parse_policy(GOOD.as_bytes()).unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 604800);
        assert_eq!(p.mx.len(), 3);
        // LF-only lines and surrounding blanks are fine too.
        let lf = GOOD.replace("\r\n", "\n").replace(": ", ":  ");
        assert_eq!(parse_policy(lf.as_bytes()).unwrap(), p);
    }

    #[test]
    fn wildcard_matches_exactly_one_leftmost_label() {
        let p = parse_policy(GOOD.as_bytes()).unwrap();
        assert!(p.allows_mx("mail.example.com"));
        assert!(p.allows_mx("MAIL.Example.COM."));
        assert!(p.allows_mx("a.example.net"));
        assert!(!p.allows_mx("example.net"));
        assert!(!p.allows_mx("a.b.example.net"));
        assert!(!p.allows_mx("mx.example.org"));
        assert!(!p.allows_mx("xmail.example.com"));
        assert!(!p.allows_mx(".example.net"));
    }

    #[test]
    fn rejects_bad_policies_naming_the_field() {
        for (body, want) in [
            ("mode: enforce\nmx: a.b\nmax_age: 1\n", "no version"),
            (
                "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n",
                "version",
            ),
            ("version: STSv1\nmode: on\nmx: a.b\nmax_age: 1\n", "mode"),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx field"),
            ("version: STSv1\nmode: enforce\nmx: a.b\n", "no max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 31557601\n",
                "above",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
                "max_age",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 12345678901\n",
                "max_age",
            ),
            (
                "version: STSv1\nmode: enforce\nmode: none\nmx: a.b\nmax_age: 1\n",
                "mode given twice",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 1\n",
                "mx",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 1\n",
                "mx",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1\ngarbage\n",
                "line 5",
            ),
            ("<html>\n", "line 1"),
        ] {
            let err = parse_policy(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{body:?}: {err}");
        }
        let big = format!("{GOOD}{}", "x: y\n".repeat(MAX_POLICY_BYTES / 5));
        assert!(
            parse_policy(big.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("larger")
        );
    }

    #[test]
    fn none_mode_needs_no_mx_and_unknown_fields_are_ignored() {
        let p =
            parse_policy(b"version: STSv1\nmode: none\nmax_age: 0\nfuture_field: x y\n").unwrap();
        assert_eq!((p.mode, p.max_age, p.mx.len()), (Mode::None, 0, 0));
        assert!(!p.allows_mx("anything.example"));
    }

    #[test]
    fn txt_records() {
        assert_eq!(
            parse_txt(b"v=STSv1; id=20160831085700Z;").unwrap(),
            "20160831085700Z"
        );
        assert_eq!(parse_txt(b"v=STSv1;id=abc").unwrap(), "abc");
        assert_eq!(parse_txt(b"v=STSv1; id=abc; ext=1").unwrap(), "abc");
        for bad in [
            &b"v=STSv1;"[..],
            b"v=STSv1; id=",
            b"v=STSv1; id=a-b",
            b"v=STSv1; id=123456789012345678901234567890123",
            b"v=STSv1; id=a; id=b",
            b"v=STSv2; id=a",
            b"id=a; v=STSv1",
        ] {
            assert!(
                parse_txt(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let other: &[u8] = b"google-site-verification=x";
        assert_eq!(
            parse_txt_records([other, &b"v=STSv1; id=x1"[..]]).unwrap(),
            "x1"
        );
        assert_eq!(parse_txt_records([other]), Err(StsError::NoRecord));
        assert_eq!(
            parse_txt_records([&b"v=STSv1; id=a"[..], b"v=STSv1; id=b"]),
            Err(StsError::ManyRecords(2))
        );
    }

    #[test]
    fn fuzz_entry_survives_odd_input() {
        for d in [
            &b""[..],
            b"\xff\xfe",
            b"mx: *.\n",
            b"version: STSv1\nmode: testing\nmx: *.a\nmax_age: 0",
            b"v=STSv1; id=\xff",
        ] {
            fuzz_one(d);
        }
    }
}
