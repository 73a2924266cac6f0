//! Parsing of SMTP command lines (RFC 5321 §4.1) and their parameters
//! (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 DSN, RFC 3030 BDAT).
//! Input is one line without its CRLF; nothing here does IO.

use super::reply::Reply;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        path: String,
        params: Vec<Param>,
    },
    Rcpt {
        path: String,
        params: Vec<Param>,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy,
    Expn,
    StartTls,
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    /// Something that is not SMTP at all (an HTTP request, say): drop the connection.
    ForeignProtocol,
}

impl Command {
    /// Upper-case verb, for metrics labels (bounded set).
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Bdat { .. } => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Help => "HELP",
            Command::Vrfy => "VRFY",
            Command::Expn => "EXPN",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
            Command::ForeignProtocol => "FOREIGN",
        }
    }
}

/// A MAIL or RCPT parameter `KEYWORD[=value]`, keyword upper-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub keyword: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    Unrecognized,
    /// Syntax error in parameters or arguments: the reply to send.
    Syntax(Reply),
}

impl CommandError {
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::Unrecognized => {
                Reply::status(500, (5, 5, 2), "Error: command not recognized")
            }
            CommandError::Syntax(r) => r.clone(),
        }
    }
}

fn syntax(code: u16, esc: (u8, u16, u16), text: &str) -> CommandError {
    CommandError::Syntax(Reply::status(code, esc, text))
}

pub fn parse(line: &str) -> Result<Command, CommandError> {
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let upper = verb.to_ascii_uppercase();
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(syntax(
                501,
                (5, 5, 4),
                "Syntax error: no parameters allowed",
            ))
        }
    };
    match upper.as_str() {
        "EHLO" | "HELO" => {
            let arg = rest.trim();
            let name = arg.split_whitespace().next().unwrap_or("");
            if name.is_empty() {
                return Err(syntax(501, (5, 5, 4), &format!("Syntax: {upper} hostname")));
            }
            if !name
                .chars()
                .all(|c| c.is_alphanumeric() || "-._:[]".contains(c))
            {
                return Err(syntax(501, (5, 5, 4), "Syntax error: invalid hostname"));
            }
            Ok(if upper == "EHLO" {
                Command::Ehlo(name.to_owned())
            } else {
                Command::Helo(name.to_owned())
            })
        }
        "MAIL" => {
            let arg = strip_prefix_ci(rest, "FROM:")
                .ok_or_else(|| syntax(501, (5, 5, 4), "Syntax: MAIL FROM:<address>"))?;
            let (path, params) = split_path(arg)?;
            Ok(Command::Mail { path, params })
        }
        "RCPT" => {
            let arg = strip_prefix_ci(rest, "TO:")
                .ok_or_else(|| syntax(501, (5, 5, 4), "Syntax: RCPT TO:<address>"))?;
            let (path, params) = split_path(arg)?;
            Ok(Command::Rcpt { path, params })
        }
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        // RFC 5321 allows an argument to NOOP and HELP; both are ignored.
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "STARTTLS" => no_args(Command::StartTls),
        "BDAT" => {
            let mut it = rest.split_whitespace();
            let size = it
                .next()
                .filter(|s| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| syntax(501, (5, 5, 4), "Syntax: BDAT chunk-size [LAST]"))?;
            let last = match it.next() {
                None => false,
                Some(l) if l.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Err(syntax(501, (5, 5, 4), "Syntax: BDAT chunk-size [LAST]")),
            };
            if it.next().is_some() {
                return Err(syntax(501, (5, 5, 4), "Syntax: BDAT chunk-size [LAST]"));
            }
            Ok(Command::Bdat { size, last })
        }
        "AUTH" => {
            let mut it = rest.split_whitespace();
            let mechanism = it
                .next()
                .ok_or_else(|| syntax(501, (5, 5, 4), "Syntax: AUTH mechanism [initial-response]"))?
                .to_ascii_uppercase();
            let initial = it.next().map(str::to_owned);
            if it.next().is_some() {
                return Err(syntax(
                    501,
                    (5, 5, 4),
                    "Syntax: AUTH mechanism [initial-response]",
                ));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        // Cross-protocol requests (a browser or proxy pointed at the SMTP port).
        "GET" | "POST" | "PUT" | "HEAD" | "CONNECT" | "OPTIONS" | "DELETE" | "USER" => {
            Ok(Command::ForeignProtocol)
        }
        _ => Err(CommandError::Unrecognized),
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits `<path> PARAM=VALUE ...`; tolerates a space after the colon as most MTAs do.
fn split_path(arg: &str) -> Result<(String, Vec<Param>), CommandError> {
    let arg = arg.trim_start();
    if !arg.starts_with('<') {
        return Err(syntax(
            501,
            (5, 1, 7),
            "Syntax error: address must be enclosed in <>",
        ));
    }
    let end = find_path_end(arg)
        .ok_or_else(|| syntax(501, (5, 1, 7), "Syntax error: unterminated address"))?;
    let path = &arg[1..end];
    let mut params = Vec::new();
    for p in arg[end + 1..].split(' ').filter(|p| !p.is_empty()) {
        let (k, v) = match p.find('=') {
            Some(i) => (&p[..i], Some(p[i + 1..].to_owned())),
            None => (p, None),
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(syntax(555, (5, 5, 4), "Syntax error in parameters"));
        }
        params.push(Param {
            keyword: k.to_ascii_uppercase(),
            value: v,
        });
    }
    if params.len() > 16 {
        return Err(syntax(555, (5, 5, 4), "Too many parameters"));
    }
    Ok((strip_source_route(path).to_owned(), params))
}

/// Index of the `>` closing the path, skipping over quoted local parts.
fn find_path_end(s: &str) -> Option<usize> {
    let mut in_quote = false;
    let mut escaped = false;
    // Bytes, not chars: the three that matter are ASCII, and no byte of a
    // multi-byte UTF-8 character is ASCII, so the answer is the same.
    for (i, &c) in s.as_bytes().iter().enumerate().skip(1) {
        if escaped {
            escaped = false;
        } else if in_quote && c == b'\\' {
            escaped = true;
        } else if c == b'"' {
            in_quote = !in_quote;
        } else if c == b'>' && !in_quote {
            return Some(i);
        }
    }
    None
}

/// RFC 5321 §4.1.2: a source route (`@a,@b:user@d`) must be accepted and ignored.
fn strip_source_route(path: &str) -> &str {
    match path.find(':') {
        Some(i) if path.starts_with('@') => &path[i + 1..],
        _ => path,
    }
}

/// Checks a mailbox (`local@domain`) as RFC 5321 §4.1.2 and RFC 6531 define it.
/// Returns the reply to give when it is not acceptable.
pub fn validate_mailbox(addr: &str, smtputf8: bool) -> Result<(), Reply> {
    let bad = |t: &str| Err(Reply::status(501, (5, 1, 3), t));
    if addr.len() > 254 {
        return bad("Address too long");
    }
    if !addr.is_ascii() && !smtputf8 {
        return Err(Reply::status(
            553,
            (5, 6, 7),
            "Non-ASCII address requires SMTPUTF8",
        ));
    }
    let at = match addr.rfind('@') {
        Some(i) => i,
        None => return bad("Bad address syntax: missing domain"),
    };
    let (local, domain) = (&addr[..at], &addr[at + 1..]);
    if local.is_empty() || local.len() > 64 {
        return bad("Bad address syntax: local part");
    }
    if local.starts_with('"') {
        if local.len() < 2
            || !local.ends_with('"')
            || local[1..local.len() - 1].chars().any(|c| c.is_control())
        {
            return bad("Bad address syntax: quoted local part");
        }
    } else {
        let atext = |c: char| {
            c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || (!c.is_ascii() && smtputf8)
        };
        if local
            .split('.')
            .any(|atom| atom.is_empty() || !atom.chars().all(atext))
        {
            return bad("Bad address syntax: local part");
        }
    }
    if domain.starts_with('[') {
        let inner = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']'));
        let ok = match inner {
            // Compare bytes: a multi-byte character may straddle byte 5, where a
            // `str` slice would panic (found by the `command` fuzz target).
            Some(i) if i.len() > 5 && i.as_bytes()[..5].eq_ignore_ascii_case(b"IPv6:") => {
                i[5..].parse::<std::net::Ipv6Addr>().is_ok()
            }
            Some(i) => i.parse::<std::net::Ipv4Addr>().is_ok(),
            None => false,
        };
        return if ok {
            Ok(())
        } else {
            bad("Bad address syntax: address literal")
        };
    }
    if domain.is_empty() || domain.len() > 253 {
        return bad("Bad address syntax: domain");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| {
                c.is_ascii_alphanumeric()
                    || c == '-'
                    || (!c.is_ascii() && smtputf8 && c.is_alphanumeric())
            })
    };
    if !domain.split('.').all(label_ok) {
        return bad("Bad address syntax: domain");
    }
    Ok(())
}

/// RFC 3461 xtext: printable ASCII except `+` and `=`, which appear as `+XX`.
pub fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                if !(b.get(i + 1).is_some_and(|c| c.is_ascii_hexdigit())
                    && b.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit()))
                {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path's end, found by bytes, against the char-by-char form it replaced,
    /// and the local-part check, over every character class.
    #[test]
    fn local_parts_and_path_ends_match_the_char_forms() {
        let old_atext = |c: char, utf8: bool| {
            c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || (!c.is_ascii() && utf8)
        };
        let old_end = |s: &str| {
            let (mut in_quote, mut escaped) = (false, false);
            for (i, c) in s.char_indices().skip(1) {
                if escaped {
                    escaped = false;
                } else if in_quote && c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_quote = !in_quote;
                } else if c == '>' && !in_quote {
                    return Some(i);
                }
            }
            None
        };
        let chars = (0u32..0x250)
            .chain([0x3000, 0x4e2d, 0x1f600, 0xfeff])
            .filter_map(char::from_u32);
        for c in chars {
            for utf8 in [false, true] {
                let addr = format!("a{c}b@example.com");
                let want = addr.is_ascii() || utf8;
                let want = want && (old_atext(c, utf8) || c == '.');
                assert_eq!(
                    validate_mailbox(&addr, utf8).is_ok(),
                    want,
                    "{c:?} utf8={utf8}"
                );
            }
            for s in [
                format!("<a{c}b>"),
                format!("<\"a{c}>\">x>"),
                format!("<\"a\\{c}\">"),
                format!("<{c}\"\\\">\">"),
            ] {
                assert_eq!(find_path_end(&s), old_end(&s), "{s:?}");
            }
        }
    }

    fn p(k: &str, v: Option<&str>) -> Param {
        Param {
            keyword: k.into(),
            value: v.map(Into::into),
        }
    }

    #[test]
    fn parses_envelope_commands() {
        assert_eq!(
            parse("EHLO client.example").unwrap(),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(
            parse("helo [127.0.0.1]").unwrap(),
            Command::Helo("[127.0.0.1]".into())
        );
        assert_eq!(
            parse("MAIL FROM:<a@b.example> SIZE=1000 body=8BITMIME").unwrap(),
            Command::Mail {
                path: "a@b.example".into(),
                params: vec![p("SIZE", Some("1000")), p("BODY", Some("8BITMIME"))]
            }
        );
        assert_eq!(
            parse("mail from: <>").unwrap(),
            Command::Mail {
                path: "".into(),
                params: vec![]
            }
        );
        assert_eq!(
            parse("RCPT TO:<@relay.example:\"odd >user\"@d.example> NOTIFY=NEVER").unwrap(),
            Command::Rcpt {
                path: "\"odd >user\"@d.example".into(),
                params: vec![p("NOTIFY", Some("NEVER"))]
            }
        );
        assert_eq!(
            parse("BDAT 100 LAST").unwrap(),
            Command::Bdat {
                size: 100,
                last: true
            }
        );
        assert_eq!(
            parse("bdat 0").unwrap(),
            Command::Bdat {
                size: 0,
                last: false
            }
        );
        assert_eq!(
            parse("AUTH plain AGZvbwBiYXI=").unwrap(),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGZvbwBiYXI=".into())
            }
        );
        assert_eq!(parse("GET / HTTP/1.1").unwrap(), Command::ForeignProtocol);
    }

    #[test]
    fn rejects_malformed_commands() {
        assert_eq!(parse("FROB"), Err(CommandError::Unrecognized));
        for bad in [
            "EHLO",
            "MAIL TO:<a@b>",
            "MAIL FROM:a@b",
            "MAIL FROM:<a@b",
            "RCPT TO:<a@b> =x",
            "DATA now",
            "BDAT",
            "BDAT x",
            "BDAT 10 FIRST",
            "BDAT 99999999999999999999",
            "STARTTLS please",
            "EHLO bad\u{7}host",
        ] {
            assert!(matches!(parse(bad), Err(CommandError::Syntax(_))), "{bad}");
        }
    }

    #[test]
    fn mailbox_validation() {
        assert!(validate_mailbox("user@example.com", false).is_ok());
        assert!(validate_mailbox("first.last+tag@sub.example.co", false).is_ok());
        assert!(validate_mailbox("\"quoted local\"@example.com", false).is_ok());
        assert!(validate_mailbox("u@[127.0.0.1]", false).is_ok());
        assert!(validate_mailbox("u@[IPv6:::1]", false).is_ok());
        assert_eq!(
            validate_mailbox("用户@例子.测试", false).unwrap_err().code,
            553
        );
        assert!(validate_mailbox("用户@例子.测试", true).is_ok());
        for bad in [
            "nodomain",
            "@example.com",
            "a..b@example.com",
            "a@-x.example",
            "a@",
            "a@[1.2.3]",
            "a@exa mple.com",
        ] {
            assert!(validate_mailbox(bad, true).is_err(), "{bad}");
        }
        assert!(validate_mailbox(&format!("{}@example.com", "a".repeat(65)), false).is_err());
    }

    #[test]
    fn address_literal_with_multibyte_char_at_tag_boundary_is_refused() {
        // Byte 5 of the literal falls inside '¬' (2 bytes): no panic, a syntax
        // error (and without SMTPUTF8 the non-ASCII refusal comes first).
        for addr in [
            "u@[\u{c}\u{c}\u{c}\u{c}¬\u{c}I]",
            "u@[IPv6¬::1]",
            "u@[IPv¬6:::1]",
        ] {
            let err = validate_mailbox(addr, true).unwrap_err();
            assert_eq!(err.code, 501, "{addr:?}");
            assert!(
                err.to_string().contains("address literal"),
                "{addr:?}: {err}"
            );
            assert_eq!(
                validate_mailbox(addr, false).unwrap_err().code,
                553,
                "{addr:?}"
            );
        }
        // The path of the fuzzer's input, as the session validates it after parse().
        let Ok(Command::Rcpt { path, .. }) =
            parse("RCPT TO:<\u{17a}n1r1@[\u{c}\u{c}\u{c}\u{c}¬\u{c}I\u{c}\u{c}]>")
        else {
            panic!("RCPT did not parse");
        };
        assert_eq!(validate_mailbox(&path, true).unwrap_err().code, 501);
    }

    #[test]
    fn xtext() {
        assert!(is_xtext("rfc822;user+2Bx@example.com"));
        assert!(!is_xtext("bad=thing"));
        assert!(!is_xtext("trailing+2"));
        assert!(!is_xtext("sp ace"));
    }
}
