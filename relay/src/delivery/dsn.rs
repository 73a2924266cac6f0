//! Delivery status notifications: RFC 3464 `message/delivery-status` inside an
//! RFC 3462 `multipart/report`, honouring the sender's RFC 3461 NOTIFY, RET, ENVID and
//! ORCPT, and RFC 6533 (`message/global*`) when the original was SMTPUTF8.
//!
//! Pure: the caller decides which recipients to report and when; this only decides
//! whether anyone wants the notice and builds the message to queue.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use crate::queue::{
    BodyType, ClientInfo, DsnRet, Envelope, MailParams, QueueId, QueuedMessage, Recipient,
};
use mailrelay_smtp::Reply;

/// Largest original body returned in full; beyond it only the headers go back (a
/// bounce of a huge message must not be as huge, nor exceed the sender's size limit).
pub const MAX_RETURNED_BODY: usize = 1024 * 1024;

/// Lines we generate are folded near this width (RFC 5322 §2.1.1 "SHOULD 78").
const FOLD_AT: usize = 76;
/// Hard split for a run without whitespace, well below the 998-octet limit.
const HARD_SPLIT: usize = 900;

/// RFC 3464 §2.3.3 action-value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnAction {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl DsnAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
            DsnAction::Relayed => "relayed",
            DsnAction::Expanded => "expanded",
        }
    }
}

/// One recipient to report on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The envelope recipient (forward-path without angle brackets).
    pub address: String,
    /// RFC 3461 ORCPT as received (`addr-type;xtext`); when `None` the original
    /// envelope recipient's ORCPT, if any, is used.
    pub orcpt: Option<String>,
    pub action: DsnAction,
    /// RFC 3463 enhanced status `class.subject.detail`.
    pub status: (u8, u16, u16),
    /// Host name of the remote MTA that gave the diagnostic.
    pub remote_mta: Option<String>,
    /// `diagnostic-type; text`, e.g. `smtp; 550 5.1.1 user unknown` (see
    /// [`diagnostic_from`]).
    pub diagnostic: Option<String>,
    pub last_attempt_ms: Option<u64>,
    /// For `Delayed`: when the message will be given up on.
    pub will_retry_until_ms: Option<u64>,
}

/// `smtp; <code> <x.y.z> <text>` for a `Diagnostic-Code:` field, reply lines joined
/// by a space, control characters removed so it can never break the header.
pub fn diagnostic_from(reply: &Reply) -> String {
    let mut s = format!("smtp; {}", reply.code);
    if let Some(e) = reply.enhanced {
        let _ = write!(s, " {}.{}.{}", e.0, e.1, e.2);
    }
    for line in &reply.lines {
        s.push(' ');
        s.push_str(line.trim());
    }
    sanitize(&s)
}

/// Builds the DSN for `recipients` of `original`, or `None` when none is due: the
/// original has the null sender (never bounce a bounce, RFC 5321 §4.5.5), or no
/// listed recipient asked for this kind of notice (RFC 3461 §4.1: NEVER wants none;
/// failures and delays are reported unless NOTIFY was given without FAILURE / DELAY;
/// successes only when asked for by SUCCESS).
pub fn build_dsn(
    original: &QueuedMessage,
    recipients: &[DsnRecipient],
    reporting_mta: &str,
    now: OffsetDateTime,
) -> Option<QueuedMessage> {
    let env = &original.envelope;
    if env.mail.from.is_empty() {
        return None;
    }
    let wanted: Vec<&DsnRecipient> = recipients
        .iter()
        .filter(|r| wants_notice(original_rcpt(env, &r.address), r.action))
        .collect();
    if wanted.is_empty() {
        return None;
    }

    let reporting_mta = sanitize(reporting_mta);
    let utf8 = env.mail.smtputf8;
    let any_failed = wanted.iter().any(|r| r.action == DsnAction::Failed);
    let all_delayed = wanted.iter().all(|r| r.action == DsnAction::Delayed);

    // Full content only with a failure (the sender may need it back to resend);
    // delay and success notices carry headers, as does RET=HDRS, and so does a
    // BINARYMIME original, which a MIME part cannot carry unencoded.
    let (orig_headers, _) = split_headers(&original.body);
    let return_full = any_failed
        && env.mail.ret != Some(DsnRet::Hdrs)
        && env.mail.body != BodyType::BinaryMime
        && original.body.len() <= MAX_RETURNED_BODY;
    let returned: &[u8] = if return_full {
        &original.body
    } else {
        orig_headers
    };

    let human = human_part(env, &wanted, &reporting_mta);
    let status = status_part(env, &wanted, &reporting_mta, utf8);

    let boundary = pick_boundary(&env.id, &[human.as_bytes(), status.as_bytes(), returned]);

    let subject = if any_failed {
        "Undelivered Mail Returned to Sender"
    } else if all_delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    };
    let id = QueueId::generate();
    let mut out = String::new();
    let _ = write!(
        out,
        "From: \"Mail Delivery System\" <MAILER-DAEMON@{reporting_mta}>\r\n\
         To: <{}>\r\n\
         Subject: {subject}\r\n\
         Date: {}\r\n\
         Message-ID: <{id}.dsn@{reporting_mta}>\r\n\
         MIME-Version: 1.0\r\n\
         Auto-Submitted: auto-replied\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n \
         boundary=\"{boundary}\"\r\n",
        sanitize(&env.mail.from),
        rfc2822(now),
    );
    let eight_bit = !human.is_ascii() || !status.is_ascii() || !returned.is_ascii();
    if eight_bit {
        out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    out.push_str("\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    // 1: human-readable.
    let _ = write!(
        out,
        "--{boundary}\r\nContent-Description: Notification\r\n\
         Content-Type: text/plain; charset={}\r\n",
        if human.is_ascii() {
            "us-ascii"
        } else {
            "utf-8"
        }
    );
    if !human.is_ascii() {
        out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    let _ = write!(out, "\r\n{human}\r\n");

    // 2: machine-readable.
    let _ = write!(
        out,
        "--{boundary}\r\nContent-Description: Delivery report\r\n\
         Content-Type: {}\r\n",
        if utf8 {
            "message/global-delivery-status"
        } else {
            "message/delivery-status"
        }
    );
    if !status.is_ascii() {
        out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    let _ = write!(out, "\r\n{status}\r\n");

    // 3: the original (or its headers).
    let ctype = match (return_full, utf8) {
        (true, false) => "message/rfc822",
        (true, true) => "message/global",
        (false, false) => "text/rfc822-headers",
        (false, true) => "message/global-headers",
    };
    let _ = write!(
        out,
        "--{boundary}\r\nContent-Description: {}\r\nContent-Type: {ctype}\r\n",
        if return_full {
            "Undelivered Message"
        } else {
            "Message Headers"
        }
    );
    if !returned.is_ascii() {
        out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    out.push_str("\r\n");
    let mut body = out.into_bytes();
    body.extend_from_slice(returned);
    if !returned.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let now_ms = (now.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    Some(QueuedMessage {
        envelope: Envelope {
            id,
            mail: MailParams {
                from: String::new(),
                size: Some(body.len() as u64),
                body: if body.is_ascii() {
                    BodyType::SevenBit
                } else {
                    BodyType::EightBitMime
                },
                smtputf8: utf8,
                ret: None,
                envid: None,
                requiretls: false,
            },
            recipients: vec![Recipient {
                address: env.mail.from.clone(),
                notify: None,
                orcpt: None,
            }],
            client: ClientInfo {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 0,
                helo: reporting_mta.clone(),
                auth_user: None,
                tls: None,
                listener: "dsn".into(),
            },
            received_at_ms: now_ms,
            received_by: reporting_mta,
        },
        body,
    })
}

fn original_rcpt<'a>(env: &'a Envelope, address: &str) -> Option<&'a Recipient> {
    env.recipients
        .iter()
        .find(|r| r.address.eq_ignore_ascii_case(address))
}

/// RFC 3461 §4.1 leaves the default without NOTIFY to the MTA: "FAILURE" or
/// "FAILURE,DELAY". Like Postfix we take the latter, so a sender who said nothing gets
/// delay warnings when the relay sends any (`delivery.retry.delay_warning`, off by
/// default); one who gave NOTIFY without DELAY does not.
fn wants_notice(rcpt: Option<&Recipient>, action: DsnAction) -> bool {
    let notify = rcpt.and_then(|r| r.notify.as_ref());
    match (notify, action) {
        (Some(n), _) if n.never => false,
        (None, DsnAction::Failed | DsnAction::Delayed) => true,
        (Some(n), DsnAction::Failed) => n.failure,
        (Some(n), DsnAction::Delayed) => n.delay,
        (Some(n), _) => n.success,
        (None, _) => false,
    }
}

fn human_part(env: &Envelope, wanted: &[&DsnRecipient], reporting_mta: &str) -> String {
    let mut s = String::new();
    let mut para = |text: &str| {
        wrap_into(&mut s, text, "");
        s.push_str("\r\n");
    };
    para(&format!(
        "This is the mail system at host {reporting_mta}. This report concerns \
         your message with queue id {}; the status of each recipient follows.",
        env.id
    ));
    for r in wanted {
        let what = match r.action {
            DsnAction::Failed => "delivery failed permanently; the message will not be retried",
            DsnAction::Delayed => "delivery is delayed; the mail system will keep trying",
            DsnAction::Delivered => "the message was delivered",
            DsnAction::Relayed => {
                "the message was relayed to a system that does not send delivery notices"
            }
            DsnAction::Expanded => "the message was delivered to a list or alias",
        };
        let mut line = format!("<{}>: {what}", sanitize(&r.address));
        if let Some(h) = &r.remote_mta {
            let _ = write!(line, "; host {} said: ", sanitize(h));
        } else if r.diagnostic.is_some() {
            line.push_str(": ");
        }
        if let Some(d) = &r.diagnostic {
            let d = sanitize(d);
            // Drop the "smtp; " type prefix for humans.
            line.push_str(d.split_once("; ").map_or(d.as_str(), |x| x.1));
        }
        para(&line);
    }
    s
}

fn status_part(
    env: &Envelope,
    wanted: &[&DsnRecipient],
    reporting_mta: &str,
    utf8: bool,
) -> String {
    let mut s = String::new();
    field(&mut s, "Reporting-MTA", &format!("dns; {reporting_mta}"));
    if let Some(envid) = &env.mail.envid {
        field(&mut s, "Original-Envelope-Id", &xtext_decode(envid));
    }
    field(
        &mut s,
        "Arrival-Date",
        &rfc2822(ms_to_time(env.received_at_ms)),
    );
    for r in wanted {
        s.push_str("\r\n");
        let orcpt = r
            .orcpt
            .as_deref()
            .or_else(|| original_rcpt(env, &r.address).and_then(|o| o.orcpt.as_deref()));
        if let Some(o) = orcpt {
            field(&mut s, "Original-Recipient", &orcpt_field(o));
        }
        // RFC 6533 §3: non-ASCII addresses use the utf-8 address type, which is only
        // allowed in message/global-delivery-status.
        let addr = sanitize(&r.address);
        let kind = if !addr.is_ascii() && utf8 {
            "utf-8"
        } else {
            "rfc822"
        };
        field(&mut s, "Final-Recipient", &format!("{kind}; {addr}"));
        field(&mut s, "Action", r.action.as_str());
        let (c, sub, d) = r.status;
        field(&mut s, "Status", &format!("{c}.{sub}.{d}"));
        if let Some(h) = &r.remote_mta {
            field(&mut s, "Remote-MTA", &format!("dns; {}", sanitize(h)));
        }
        if let Some(d) = &r.diagnostic {
            field(&mut s, "Diagnostic-Code", &sanitize(d));
        }
        if let Some(t) = r.last_attempt_ms {
            field(&mut s, "Last-Attempt-Date", &rfc2822(ms_to_time(t)));
        }
        if r.action == DsnAction::Delayed
            && let Some(t) = r.will_retry_until_ms
        {
            field(&mut s, "Will-Retry-Until", &rfc2822(ms_to_time(t)));
        }
    }
    s
}

/// `Original-Recipient: addr-type; decoded-address` from an ORCPT `addr-type;xtext`
/// (RFC 3464 §2.3.1 carries the decoded address).
fn orcpt_field(orcpt: &str) -> String {
    match orcpt.split_once(';') {
        Some((t, a)) => format!("{}; {}", sanitize(t.trim()), xtext_decode(a.trim())),
        None => format!("rfc822; {}", xtext_decode(orcpt.trim())),
    }
}

/// RFC 3461 §4 xtext: `+XX` is a hex-encoded octet. Undecodable input, or a decoded
/// value with control characters, is returned (sanitised) as given.
fn xtext_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => return sanitize(s),
            }
        }
        out.push(b[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(d) if !d.chars().any(char::is_control) => d,
        _ => sanitize(s),
    }
}

/// Removes CR, LF and other control characters (a hostile reply or address must not
/// be able to inject header lines or MIME boundaries).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Appends `Name: value` folded at whitespace (RFC 5322 §2.2.3) so no line exceeds
/// [`FOLD_AT`] where possible and 998 octets ever.
fn field(out: &mut String, name: &str, value: &str) {
    let mut line = format!("{name}: ");
    let mut first = true;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        for chunk in split_long(word) {
            if !first && line.len() + 1 + chunk.len() > FOLD_AT {
                out.push_str(&line);
                out.push_str("\r\n");
                line = String::from(" ");
            } else if !first {
                line.push(' ');
            }
            line.push_str(chunk);
            first = false;
        }
    }
    out.push_str(&line);
    out.push_str("\r\n");
}

/// Wraps plain text at whitespace into CRLF lines.
fn wrap_into(out: &mut String, text: &str, indent: &str) {
    let mut line = String::from(indent);
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        for chunk in split_long(word) {
            if line.len() > indent.len() && line.len() + 1 + chunk.len() > FOLD_AT {
                out.push_str(&line);
                out.push_str("\r\n");
                line = String::from(indent);
            } else if line.len() > indent.len() {
                line.push(' ');
            }
            line.push_str(chunk);
        }
    }
    out.push_str(&line);
    out.push_str("\r\n");
}

/// Splits a run without whitespace into pieces of at most [`HARD_SPLIT`] bytes on
/// char boundaries; unfolding then inserts a space, a lesser evil than a line the
/// next MTA must reject or truncate.
fn split_long(word: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = word;
    while rest.len() > HARD_SPLIT {
        let mut cut = HARD_SPLIT;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (a, b) = rest.split_at(cut);
        parts.push(a);
        rest = b;
    }
    parts.push(rest);
    parts
}

/// The header section of a message including the CRLF of its last line, and the rest.
fn split_headers(msg: &[u8]) -> (&[u8], &[u8]) {
    if msg.starts_with(b"\r\n") {
        return (&[], &msg[2..]);
    }
    match memchr::memmem::find(msg, b"\r\n\r\n") {
        Some(i) => (&msg[..i + 2], &msg[i + 4..]),
        None => (msg, &[]),
    }
}

/// A boundary (RFC 2046 §5.1.1: ≤ 70 chars) that occurs in none of the parts.
fn pick_boundary(id: &QueueId, parts: &[&[u8]]) -> String {
    loop {
        let b = format!("{id}.{:016x}/dsn", rand::random::<u64>());
        if !parts
            .iter()
            .any(|p| memchr::memmem::find(p, b.as_bytes()).is_some())
        {
            return b;
        }
    }
}

fn ms_to_time(ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn rfc2822(t: OffsetDateTime) -> String {
    // Rfc2822 fails only for years outside 1900..=9999; the epoch is a safe stand-in.
    t.format(&Rfc2822)
        .or_else(|_| OffsetDateTime::UNIX_EPOCH.format(&Rfc2822))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::DsnNotify;

    const NOW_MS: u64 = 1_780_000_000_000;

    fn original(from: &str, notify: Option<DsnNotify>) -> QueuedMessage {
        QueuedMessage {
            envelope: Envelope {
                id: QueueId::generate(),
                mail: MailParams {
                    from: from.into(),
                    ..MailParams::default()
                },
                recipients: vec![
                    Recipient {
                        address: "bob@example.net".into(),
                        notify: notify.clone(),
                        orcpt: Some("rfc822;Bob+2BX@example.net".into()),
                    },
                    Recipient {
                        address: "carol@example.org".into(),
                        notify,
                        orcpt: None,
                    },
                ],
                client: ClientInfo {
                    ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port: 1234,
                    helo: "client".into(),
                    auth_user: None,
                    tls: None,
                    listener: "smtp".into(),
                },
                received_at_ms: NOW_MS - 3_600_000,
                received_by: "relay.example.com".into(),
            },
            body: b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nSECRET BODY LINE\r\n".to_vec(),
        }
    }

    fn failed(addr: &str) -> DsnRecipient {
        DsnRecipient {
            address: addr.into(),
            orcpt: None,
            action: DsnAction::Failed,
            status: (5, 1, 1),
            remote_mta: Some("mx.example.net".into()),
            diagnostic: Some(diagnostic_from(&Reply::status(
                550,
                (5, 1, 1),
                "<bob@example.net>: user unknown",
            ))),
            last_attempt_ms: Some(NOW_MS),
            will_retry_until_ms: None,
        }
    }

    fn delayed(addr: &str) -> DsnRecipient {
        DsnRecipient {
            action: DsnAction::Delayed,
            status: (4, 4, 1),
            will_retry_until_ms: Some(NOW_MS + 86_400_000),
            ..failed(addr)
        }
    }

    fn now() -> OffsetDateTime {
        ms_to_time(NOW_MS)
    }

    fn text(m: &QueuedMessage) -> String {
        String::from_utf8(m.body.clone()).unwrap()
    }

    fn boundary(body: &str) -> String {
        let i = body.find("boundary=\"").unwrap() + 10;
        body[i..].split('"').next().unwrap().to_owned()
    }

    /// Splits into (top headers, parts) checking the boundary structure.
    fn parts(body: &str) -> Vec<String> {
        let b = boundary(body);
        let delim = format!("\r\n--{b}");
        assert_eq!(body.matches(&format!("--{b}--")).count(), 1, "one close");
        let close = body
            .find(&format!("{delim}--\r\n"))
            .expect("close delimiter");
        assert!(body.ends_with(&format!("{delim}--\r\n")));
        let inner = &body[..close];
        let mut it = inner.split(&delim);
        it.next(); // preamble + headers
        it.map(|p| p.strip_prefix("\r\n").unwrap().to_owned())
            .collect()
    }

    /// The delivery-status part as field groups (unfolded).
    fn status_groups(part: &str) -> Vec<Vec<(String, String)>> {
        let (_, body) = part.split_once("\r\n\r\n").unwrap();
        body.trim_end()
            .split("\r\n\r\n")
            .map(|g| {
                let unfolded = g.replace("\r\n ", " ");
                unfolded
                    .split("\r\n")
                    .map(|l| {
                        let (k, v) = l.split_once(": ").unwrap();
                        (k.to_owned(), v.to_owned())
                    })
                    .collect()
            })
            .collect()
    }

    fn get<'a>(g: &'a [(String, String)], k: &str) -> Option<&'a str> {
        g.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn assert_wire_clean(body: &[u8]) {
        let s = String::from_utf8_lossy(body);
        for line in s.split("\r\n") {
            assert!(line.len() <= 998, "line too long");
            assert!(!line.contains('\r') && !line.contains('\n'), "bare CR/LF");
        }
    }

    #[test]
    fn failure_dsn_structure() {
        let orig = original("alice@example.com", None);
        let dsn = build_dsn(
            &orig,
            &[failed("bob@example.net"), failed("carol@example.org")],
            "relay.example.com",
            now(),
        )
        .unwrap();
        let env = &dsn.envelope;
        assert_eq!(env.mail.from, "");
        assert_eq!(env.recipients.len(), 1);
        assert_eq!(env.recipients[0].address, "alice@example.com");
        assert_eq!(env.client.listener, "dsn");
        assert_eq!(env.client.helo, "relay.example.com");
        assert_ne!(env.id, orig.envelope.id);
        assert_eq!(env.mail.size, Some(dsn.body.len() as u64));
        assert_wire_clean(&dsn.body);

        let body = text(&dsn);
        let (headers, _) = body.split_once("\r\n\r\n").unwrap();
        for h in [
            "From: \"Mail Delivery System\" <MAILER-DAEMON@relay.example.com>",
            "To: <alice@example.com>",
            "Subject: Undelivered Mail Returned to Sender",
            "Date: ",
            "Message-ID: <",
            "MIME-Version: 1.0",
            "Auto-Submitted: auto-replied",
            "Content-Type: multipart/report; report-type=delivery-status;",
        ] {
            assert!(headers.contains(h), "missing {h} in {headers}");
        }
        let p = parts(&body);
        assert_eq!(p.len(), 3);
        assert!(p[0].starts_with("Content-Description: Notification\r\nContent-Type: text/plain"));
        assert!(p[0].contains("<bob@example.net>: delivery failed"));
        assert!(p[1].contains("Content-Type: message/delivery-status\r\n"));
        assert!(p[2].contains("Content-Type: message/rfc822\r\n"));
        assert!(p[2].contains("SECRET BODY LINE"), "RET absent returns full");

        let g = status_groups(&p[1]);
        assert_eq!(g.len(), 3);
        assert_eq!(get(&g[0], "Reporting-MTA"), Some("dns; relay.example.com"));
        assert!(get(&g[0], "Arrival-Date").is_some());
        assert_eq!(get(&g[0], "Original-Envelope-Id"), None);
        for (grp, addr) in g[1..].iter().zip(["bob@example.net", "carol@example.org"]) {
            assert_eq!(
                get(grp, "Final-Recipient"),
                Some(&*format!("rfc822; {addr}"))
            );
            assert_eq!(get(grp, "Action"), Some("failed"));
            assert_eq!(get(grp, "Status"), Some("5.1.1"));
            assert_eq!(get(grp, "Remote-MTA"), Some("dns; mx.example.net"));
            assert!(
                get(grp, "Diagnostic-Code")
                    .unwrap()
                    .starts_with("smtp; 550 5.1.1 ")
            );
            assert!(get(grp, "Last-Attempt-Date").is_some());
            assert_eq!(get(grp, "Will-Retry-Until"), None);
        }
        // ORCPT echoed, xtext-decoded; only bob had one.
        assert_eq!(
            get(&g[1], "Original-Recipient"),
            Some("rfc822; Bob+X@example.net")
        );
        assert_eq!(get(&g[2], "Original-Recipient"), None);
    }

    #[test]
    fn null_sender_never_bounced() {
        let orig = original("", None);
        assert!(build_dsn(&orig, &[failed("bob@example.net")], "r", now()).is_none());
    }

    #[test]
    fn notify_never_and_success_only_suppress_failure() {
        let never = DsnNotify {
            never: true,
            ..DsnNotify::default()
        };
        let orig = original("alice@example.com", Some(never));
        assert!(build_dsn(&orig, &[failed("bob@example.net")], "r", now()).is_none());
        assert!(build_dsn(&orig, &[delayed("bob@example.net")], "r", now()).is_none());

        let success = DsnNotify {
            success: true,
            ..DsnNotify::default()
        };
        let orig = original("alice@example.com", Some(success));
        assert!(build_dsn(&orig, &[failed("bob@example.net")], "r", now()).is_none());
        let ok = DsnRecipient {
            action: DsnAction::Delivered,
            status: (2, 0, 0),
            ..failed("bob@example.net")
        };
        let dsn = build_dsn(&orig, &[ok], "r", now()).unwrap();
        let body = text(&dsn);
        assert!(body.contains("Action: delivered"));
        assert!(body.contains("Content-Type: text/rfc822-headers"));
    }

    #[test]
    fn delay_only_when_asked_and_headers_only() {
        // NOTIFY absent: failures and delays (the caller sends delays only when
        // configured to); NOTIFY=FAILURE alone: no delays.
        let orig = original("alice@example.com", None);
        assert!(build_dsn(&orig, &[delayed("bob@example.net")], "r", now()).is_some());
        let failure_only = DsnNotify {
            failure: true,
            ..DsnNotify::default()
        };
        let orig = original("alice@example.com", Some(failure_only));
        assert!(build_dsn(&orig, &[delayed("bob@example.net")], "r", now()).is_none());

        let delay = DsnNotify {
            delay: true,
            failure: true,
            ..DsnNotify::default()
        };
        let orig = original("alice@example.com", Some(delay));
        let dsn = build_dsn(&orig, &[delayed("bob@example.net")], "r", now()).unwrap();
        let body = text(&dsn);
        assert!(body.contains("Subject: Delayed Mail (still being retried)"));
        let p = parts(&body);
        assert!(p[2].contains("Content-Type: text/rfc822-headers"));
        assert!(p[2].contains("Subject: hi"));
        assert!(!p[2].contains("SECRET BODY LINE"));
        let g = status_groups(&p[1]);
        assert_eq!(get(&g[1], "Action"), Some("delayed"));
        assert_eq!(get(&g[1], "Status"), Some("4.4.1"));
        assert!(get(&g[1], "Will-Retry-Until").is_some());
    }

    #[test]
    fn ret_hdrs_and_size_cap_return_headers_only() {
        let mut orig = original("alice@example.com", None);
        orig.envelope.mail.ret = Some(DsnRet::Hdrs);
        let body = text(&build_dsn(&orig, &[failed("bob@example.net")], "r", now()).unwrap());
        assert!(body.contains("text/rfc822-headers"));
        assert!(!body.contains("SECRET BODY LINE"));

        let mut orig = original("alice@example.com", None);
        orig.envelope.mail.ret = Some(DsnRet::Full);
        let line = "x".repeat(100) + "\r\n";
        orig.body
            .extend(line.repeat(MAX_RETURNED_BODY / 100).into_bytes());
        let dsn = build_dsn(&orig, &[failed("bob@example.net")], "r", now()).unwrap();
        let body = text(&dsn);
        assert!(body.contains("text/rfc822-headers"));
        assert!(dsn.body.len() < 10_000);
    }

    #[test]
    fn envid_and_explicit_orcpt_echoed() {
        let mut orig = original("alice@example.com", None);
        orig.envelope.mail.envid = Some("QQ314159+2Bx".into());
        let r = DsnRecipient {
            orcpt: Some("rfc822;list@example.org".into()),
            ..failed("carol@example.org")
        };
        let body = text(&build_dsn(&orig, &[r], "r", now()).unwrap());
        let g = status_groups(&parts(&body)[1]);
        assert_eq!(get(&g[0], "Original-Envelope-Id"), Some("QQ314159+x"));
        assert_eq!(
            get(&g[1], "Original-Recipient"),
            Some("rfc822; list@example.org")
        );
    }

    #[test]
    fn long_diagnostics_folded_and_sanitised() {
        let orig = original("alice@example.com", None);
        let long = "word ".repeat(300) + &"y".repeat(2500);
        let mut r = failed("bob@example.net");
        r.diagnostic = Some(format!("smtp; 550 5.7.1 {long}\r\nInjected: yes"));
        let dsn = build_dsn(&orig, &[r], "r", now()).unwrap();
        assert_wire_clean(&dsn.body);
        let body = text(&dsn);
        let p = parts(&body);
        // The CRLF is gone: no header-like line of its own in the status part (in the
        // text/plain part a wrapped line may start with it; that is just prose).
        assert!(!p[1].contains("\r\nInjected: yes"));
        let g = status_groups(&p[1]);
        let diag = get(&g[1], "Diagnostic-Code").unwrap();
        assert!(diag.starts_with("smtp; 550 5.7.1 word word"));
        assert!(diag.contains("Injected: yes"));
        // Folded: the raw part has many continuation lines.
        assert!(p[1].matches("\r\n ").count() > 10);
    }

    #[test]
    fn diagnostic_from_reply() {
        let r = Reply::multiline(451, vec!["try".into(), "later\r\nX".into()]);
        assert_eq!(diagnostic_from(&r), "smtp; 451 try later  X");
        let r = Reply::status(550, (5, 1, 1), "no such user");
        assert_eq!(diagnostic_from(&r), "smtp; 550 5.1.1 no such user");
    }

    #[test]
    fn smtputf8_uses_global_types() {
        let mut orig = original("alïce@exämple.com", None);
        orig.envelope.mail.smtputf8 = true;
        orig.envelope.recipients[0].address = "bøb@example.net".into();
        orig.body = "Subject: héllo\r\n\r\nbödy\r\n".as_bytes().to_vec();
        let dsn = build_dsn(&orig, &[failed("bøb@example.net")], "r", now()).unwrap();
        assert!(dsn.envelope.mail.smtputf8);
        assert_eq!(dsn.envelope.mail.body, BodyType::EightBitMime);
        let body = text(&dsn);
        assert!(body.contains("Content-Type: message/global-delivery-status"));
        assert!(body.contains("Content-Type: message/global\r\n"));
        assert!(body.contains("Final-Recipient: utf-8; bøb@example.net"));
        assert!(body.contains("Content-Transfer-Encoding: 8bit"));
    }

    #[test]
    fn boundary_avoids_content() {
        let orig = original("alice@example.com", None);
        let dsn = build_dsn(&orig, &[failed("bob@example.net")], "r", now()).unwrap();
        let body = text(&dsn);
        let b = boundary(&body);
        assert!(b.len() <= 70);
        // Exactly: 3 part delimiters + 1 close delimiter.
        assert_eq!(body.matches(&format!("--{b}")).count(), 4);
    }

    /// An independent parser: Python's `email` package must see the same structure.
    #[test]
    fn python_email_parser_agrees() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};

        let mut orig = original("alice@example.com", None);
        orig.envelope.mail.envid = Some("ENV1".into());
        let dsn = build_dsn(
            &orig,
            &[failed("bob@example.net"), failed("carol@example.org")],
            "relay.example.com",
            now(),
        )
        .unwrap();
        let script = r#"
import sys, email
from email import policy
m = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.compat32)
assert not m.defects, m.defects
print(m.get_content_type(), m.get_param('report-type'))
for p in m.walk():
    assert not p.defects, (p.get_content_type(), p.defects)
    print(p.get_content_type())
ds = [p for p in m.walk() if p.get_content_type() == 'message/delivery-status'][0]
blocks = ds.get_payload()
print('blocks', len(blocks))
print('mta', blocks[0]['Reporting-MTA'])
print('envid', blocks[0]['Original-Envelope-Id'])
for b in blocks[1:]:
    print('rcpt', b['Final-Recipient'], b['Action'], b['Status'])
"#;
        let mut child = match Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("python3 is required for this test: {e}"),
        };
        child.stdin.take().unwrap().write_all(&dsn.body).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines,
            vec![
                "multipart/report delivery-status",
                "multipart/report",
                "text/plain",
                "message/delivery-status",
                // compat32 walks into message/* parts: the status blocks, then the
                // encapsulated original.
                "text/plain",
                "text/plain",
                "text/plain",
                "message/rfc822",
                "text/plain",
                "blocks 3",
                "mta dns; relay.example.com",
                "envid ENV1",
                "rcpt rfc822; bob@example.net failed 5.1.1",
                "rcpt rfc822; carol@example.org failed 5.1.1",
            ],
            "{stdout}"
        );
    }
}
