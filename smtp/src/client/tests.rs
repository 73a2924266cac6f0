use std::net::{IpAddr, Ipv4Addr};

use rand::{Rng, SeedableRng};

use super::*;
use crate::envelope::{ClientInfo, Envelope, MailParams, Recipient};

// ---------------------------------------------------------------------------
// Fixtures

fn message(from: &str, rcpts: &[&str], body: &[u8]) -> QueuedMessage {
    QueuedMessage {
        envelope: Envelope {
            id: QueueId::generate(),
            mail: MailParams {
                from: from.into(),
                ..MailParams::default()
            },
            recipients: rcpts
                .iter()
                .map(|a| Recipient {
                    address: (*a).into(),
                    notify: None,
                    orcpt: None,
                })
                .collect(),
            client: ClientInfo {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 1,
                helo: "c.test".into(),
                auth_user: None,
                tls: None,
                listener: "smtp".into(),
            },
            received_at_ms: 0,
            received_by: "relay.test".into(),
        },
        body: body.to_vec(),
    }
}

fn simple(rcpts: &[&str]) -> QueuedMessage {
    message("a@src.test", rcpts, b"Subject: t\r\n\r\nhello\r\n")
}

fn cfg() -> ClientConfig {
    ClientConfig::new("relay.test")
}

/// A wire-form EHLO reply announcing `exts`.
fn ehlo(exts: &[&str]) -> String {
    let mut lines = vec!["mx.test greets relay.test".to_owned()];
    lines.extend(exts.iter().map(|s| (*s).to_owned()));
    let n = lines.len();
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i + 1 == n { ' ' } else { '-' }))
        .collect()
}

fn tls_info() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
    }
}

#[derive(Debug)]
enum End {
    Done,
    Failed(String),
}

#[derive(Debug)]
struct Run {
    /// Each `Send`, as text.
    sent: Vec<String>,
    end: End,
    outcomes: Vec<MessageOutcome>,
    tls: bool,
}

impl Run {
    fn commands(&self) -> Vec<String> {
        self.sent
            .iter()
            .flat_map(|s| s.split_inclusive("\r\n").map(str::to_owned))
            .collect()
    }

    fn outcome(&self, m: usize, r: usize) -> &RecipientOutcome {
        &self.outcomes[m].recipients[r]
    }

    fn results(&self, m: usize) -> Vec<(Outcome, Stage, u16)> {
        self.outcomes[m]
            .recipients
            .iter()
            .map(|o| (o.result, o.stage, o.reply.code))
            .collect()
    }

    fn sent_quit(&self) -> bool {
        self.sent.last().is_some_and(|s| s == "QUIT\r\n")
    }
}

/// Drives a session with scripted server replies (wire form, possibly several per
/// string, parsed with [`parse_reply`] as a driver would). Running out of script is a
/// lost connection; the TLS handshake always succeeds.
fn drive(cfg: ClientConfig, messages: &[&QueuedMessage], script: &[&str]) -> Run {
    drive_with(cfg, messages, script, Ok(()))
}

/// [`drive`], the TLS session's certificate check saying `verified`.
fn drive_with(
    cfg: ClientConfig,
    messages: &[&QueuedMessage],
    script: &[&str],
    verified: Result<(), String>,
) -> Run {
    let mut wire: Vec<u8> = script.concat().into_bytes();
    let mut s = ClientSession::new(cfg, messages);
    let mut sent = Vec::new();
    for _ in 0..10_000 {
        match s.next_action() {
            Action::Send(b) => sent.push(String::from_utf8_lossy(&b).into_owned()),
            Action::ReadReply => match parse_reply(&wire).expect("script parses") {
                Some((reply, n)) => {
                    wire.drain(..n);
                    s.on_reply(reply);
                }
                None => s.on_connection_error("script exhausted"),
            },
            Action::StartTls => {
                s.on_tls_verified(verified.clone());
                s.on_tls_established(tls_info())
            }
            Action::Pace(_) => s.on_paced(),
            Action::Done(outcomes) => {
                assert!(
                    wire.is_empty(),
                    "unused script: {:?}",
                    String::from_utf8_lossy(&wire)
                );
                let tls = s.tls().is_some();
                return Run {
                    sent,
                    end: End::Done,
                    outcomes,
                    tls,
                };
            }
            Action::Failed { reason, outcomes } => {
                let tls = s.tls().is_some();
                return Run {
                    sent,
                    end: End::Failed(reason),
                    outcomes,
                    tls,
                };
            }
        }
    }
    panic!("session did not end");
}

const GREET: &str = "220 mx.test ESMTP\r\n";
const OK: &str = "250 2.0.0 Ok\r\n";
const GO: &str = "354 End data with <CR><LF>.<CR><LF>\r\n";
const BYE: &str = "221 2.0.0 Bye\r\n";

// ---------------------------------------------------------------------------
// Reply parser

#[test]
fn parses_single_and_multiline_replies_with_enhanced_codes() {
    let (r, n) = parse_reply(b"250 2.1.0 Sender ok\r\nrest")
        .unwrap()
        .unwrap();
    assert_eq!(n, 21);
    assert_eq!(r.code, 250);
    assert_eq!(r.enhanced, Some(Enhanced(2, 1, 0)));
    assert_eq!(r.lines, vec!["Sender ok"]);

    let wire =
        b"550-5.7.1 Service unavailable;\r\n550-5.7.1 see https://x\r\n550 5.7.1 blocked\r\n";
    let (r, n) = parse_reply(wire).unwrap().unwrap();
    assert_eq!(n, wire.len());
    assert_eq!(r.enhanced, Some(Enhanced(5, 7, 1)));
    assert_eq!(
        r.lines,
        vec!["Service unavailable;", "see https://x", "blocked"]
    );

    // Class must match the code; otherwise it is just text.
    let (r, _) = parse_reply(b"250 5.1.1 odd\r\n").unwrap().unwrap();
    assert_eq!(r.enhanced, None);
    assert_eq!(r.lines, vec!["5.1.1 odd"]);
    // Three-digit subject and detail; a lone code with no text.
    let (r, _) = parse_reply(b"451 4.123.999\r\n").unwrap().unwrap();
    assert_eq!(r.enhanced, Some(Enhanced(4, 123, 999)));
    assert_eq!(r.lines, vec![""]);
    // Not a code: four digits, or glued to text.
    for text in ["2.1.2000 x", "2.1.0x", "2..0 x", "2.1. x"] {
        let wire = format!("250 {text}\r\n");
        let (r, _) = parse_reply(wire.as_bytes()).unwrap().unwrap();
        assert_eq!(r.enhanced, None, "{text}");
        assert_eq!(r.lines, vec![text]);
    }
}

#[test]
fn parser_is_liberal_in_what_servers_send() {
    // Bare LF, a bare code, an empty continuation.
    let (r, n) = parse_reply(b"250-a\n250-\n250\nX").unwrap().unwrap();
    assert_eq!(n, 15);
    assert_eq!(r.lines, vec!["a", "", ""]);
    // Non-UTF-8 text.
    let (r, _) = parse_reply(b"550 caf\xe9 \xff\r\n").unwrap().unwrap();
    assert_eq!(r.lines, vec!["caf\u{fffd} \u{fffd}"]);
    // Two replies in one buffer come out one at a time.
    let buf = b"250 ok\r\n354 go\r\n";
    let (a, n) = parse_reply(buf).unwrap().unwrap();
    let (b, m) = parse_reply(&buf[n..]).unwrap().unwrap();
    assert_eq!((a.code, b.code, n + m), (250, 354, buf.len()));
}

#[test]
fn parser_waits_for_the_last_line() {
    for partial in [
        &b""[..],
        b"25",
        b"250",
        b"250-a\r\n",
        b"250-a\r\n250 b",
        b"250 b\r",
    ] {
        assert_eq!(parse_reply(partial), Ok(None), "{partial:?}");
    }
}

#[test]
fn parser_refuses_what_would_desynchronise() {
    assert!(matches!(
        parse_reply(b"250-a\r\n550 b\r\n"),
        Err(ReplyError::InconsistentCode {
            first: 250,
            found: 550
        })
    ));
    for bad in [
        &b"hello\r\n"[..],
        b"25\r\n",
        b"2500 x\r\n",
        b"250x\r\n",
        b"650 x\r\n",
        b"099 x\r\n",
        b"2a0 x\r\n",
    ] {
        assert!(
            matches!(parse_reply(bad), Err(ReplyError::Syntax(_))),
            "{bad:?}"
        );
    }
    let many = "250-x\r\n".repeat(MAX_REPLY_LINES) + "250 x\r\n";
    assert_eq!(parse_reply(many.as_bytes()), Err(ReplyError::TooManyLines));
    // Even before the last line arrives.
    let many = "250-x\r\n".repeat(MAX_REPLY_LINES + 1);
    assert_eq!(parse_reply(many.as_bytes()), Err(ReplyError::TooManyLines));
    let exactly = "250-x\r\n".repeat(MAX_REPLY_LINES - 1) + "250 x\r\n";
    assert_eq!(
        parse_reply(exactly.as_bytes())
            .unwrap()
            .unwrap()
            .0
            .lines
            .len(),
        MAX_REPLY_LINES
    );
    let long = vec![b'x'; MAX_REPLY_BYTES + 1];
    assert_eq!(parse_reply(&long), Err(ReplyError::TooLong));
    let mut long_line = b"250 ".to_vec();
    long_line.extend(vec![b'x'; MAX_REPLY_BYTES]);
    long_line.extend_from_slice(b"\r\n");
    assert_eq!(parse_reply(&long_line), Err(ReplyError::TooLong));
}

#[test]
fn capabilities_from_ehlo() {
    let wire = ehlo(&[
        "pipelining",
        "SIZE 10240000",
        "8BITMIME",
        "SMTPUTF8",
        "STARTTLS",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "REQUIRETLS",
        "AUTH PLAIN login",
        "AUTH=LOGIN CRAM-MD5",
        "X-UNKNOWN 1",
    ]);
    let (r, _) = parse_reply(wire.as_bytes()).unwrap().unwrap();
    let c = Capabilities::from_ehlo(&r);
    assert_eq!(
        c,
        Capabilities {
            esmtp: true,
            hostname: "mx.test".into(),
            pipelining: true,
            size: Some(10_240_000),
            eight_bit_mime: true,
            smtputf8: true,
            starttls: true,
            dsn: true,
            enhanced_status_codes: true,
            chunking: true,
            requiretls: true,
            auth: vec!["PLAIN".into(), "LOGIN".into(), "CRAM-MD5".into()],
        }
    );
    let (r, _) = parse_reply(ehlo(&["SIZE"]).as_bytes()).unwrap().unwrap();
    assert_eq!(Capabilities::from_ehlo(&r).size, Some(0));
    // The greeting line is a name, never a keyword.
    let (r, _) = parse_reply(b"250 STARTTLS\r\n").unwrap().unwrap();
    assert!(!Capabilities::from_ehlo(&r).starttls);
}

// ---------------------------------------------------------------------------
// Dot-stuffing

fn naive_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

#[test]
fn dot_stuffing_and_termination() {
    assert_eq!(encode_data(b""), b".\r\n");
    assert_eq!(encode_data(b"a\r\n"), b"a\r\n.\r\n");
    assert_eq!(encode_data(b"a"), b"a\r\n.\r\n");
    assert_eq!(encode_data(b"."), b"..\r\n.\r\n");
    assert_eq!(encode_data(b".\r\n"), b"..\r\n.\r\n");
    assert_eq!(
        encode_data(b".a\r\nb\r\n..\r\n.\r\nx.y\r\n. \r\n"),
        b"..a\r\nb\r\n...\r\n..\r\nx.y\r\n.. \r\n.\r\n"
    );
    // A bare LF followed by a dot is stuffed too: no lenient server may see an end.
    assert_eq!(encode_data(b"a\n.\nb\r\n"), b"a\n..\nb\r\n.\r\n");
    assert_eq!(encode_data(b"a\r\n."), b"a\r\n..\r\n.\r\n");
}

#[test]
fn dot_stuffing_matches_a_naive_encoder_on_random_and_large_bodies() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2000 {
        let len = rng.random_range(0..40);
        let body: Vec<u8> = (0..len)
            .map(|_| {
                *[b'.', b'\r', b'\n', b'a']
                    .get(rng.random_range(0..4))
                    .unwrap()
            })
            .collect();
        let mut out = Vec::new();
        dot_stuff_into(&body, &mut out);
        assert_eq!(out, naive_stuff(&body), "{body:?}");
    }
    // A 4 MB body with a dot line every so often round-trips through the strict
    // server-side decoder.
    let mut body = Vec::with_capacity(4 << 20);
    let mut i = 0u32;
    while body.len() < 4 << 20 {
        if i.is_multiple_of(17) {
            body.extend_from_slice(b".leading dot line\r\n");
        }
        body.extend_from_slice(
            b"an ordinary line of about seventy-six octets, give or take a few ....\r\n",
        );
        i += 1;
    }
    let wire = encode_data(&body);
    let mut d = crate::data::DataDecoder::for_data(1000, 8 << 20);
    assert_eq!(d.feed(&wire), Some(wire.len()));
    assert_eq!(d.into_result().unwrap(), body);
}

// ---------------------------------------------------------------------------
// Sessions

#[test]
fn single_message_without_pipelining() {
    let m = simple(&["b@dst.test"]);
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["SIZE 1000", "8BITMIME"]),
            OK,
            "250 2.1.5 Ok\r\n",
            GO,
            "250 2.0.0 queued as X\r\n",
            BYE,
        ],
    );
    assert_eq!(
        run.commands(),
        vec![
            "EHLO relay.test\r\n",
            "MAIL FROM:<a@src.test> SIZE=21\r\n",
            "RCPT TO:<b@dst.test>\r\n",
            "DATA\r\n",
            "Subject: t\r\n",
            "\r\n",
            "hello\r\n",
            ".\r\n",
            "QUIT\r\n",
        ]
    );
    assert!(matches!(run.end, End::Done));
    let o = run.outcome(0, 0);
    assert_eq!(
        (o.result, o.stage, o.remote),
        (Outcome::Delivered, Stage::Message, true)
    );
    assert_eq!(o.reply.lines, vec!["queued as X"]);
    assert_eq!(o.status(), Enhanced(2, 0, 0));
    assert!(run.outcomes[0].attempted);
    assert!(run.outcomes[0].warnings.is_empty());
}

#[test]
fn pipelining_sends_mail_rcpt_data_as_one_group() {
    let m = simple(&["b@dst.test", "c@dst.test"]);
    let run = drive(
        cfg(),
        &[&m],
        &[GREET, &ehlo(&["PIPELINING"]), OK, OK, OK, GO, OK, BYE],
    );
    assert_eq!(
        run.sent[1],
        "MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<c@dst.test>\r\nDATA\r\n"
    );
    assert_eq!(run.sent[2], "Subject: t\r\n\r\nhello\r\n.\r\n");
    assert_eq!(
        run.results(0),
        vec![(Outcome::Delivered, Stage::Message, 250); 2]
    );
    // Replies arriving all in one segment work the same.
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["PIPELINING"]),
            &[OK, OK, OK, GO].concat(),
            OK,
            BYE,
        ],
    );
    assert_eq!(
        run.results(0),
        vec![(Outcome::Delivered, Stage::Message, 250); 2]
    );
    // Turned off in our config: one command at a time.
    let mut c = cfg();
    c.pipelining = false;
    let run = drive(
        c,
        &[&m],
        &[GREET, &ehlo(&["PIPELINING"]), OK, OK, OK, GO, OK, BYE],
    );
    assert_eq!(run.sent[1], "MAIL FROM:<a@src.test>\r\n");
    assert_eq!(run.sent[2], "RCPT TO:<b@dst.test>\r\n");
}

#[test]
fn mixed_rcpt_outcomes_are_split() {
    let m = simple(&["ok@d.test", "later@d.test", "gone@d.test"]);
    let rcpt = [
        OK,
        "450 4.2.0 Mailbox busy\r\n",
        "550 5.1.1 No such user\r\n",
    ];
    for exts in [&[][..], &["PIPELINING"][..]] {
        let mut script = vec![GREET];
        let e = ehlo(exts);
        script.push(&e);
        script.push(OK);
        script.extend(rcpt);
        script.extend([GO, "250 2.0.0 queued\r\n", BYE]);
        let run = drive(cfg(), &[&m], &script);
        assert_eq!(
            run.results(0),
            vec![
                (Outcome::Delivered, Stage::Message, 250),
                (Outcome::Deferred, Stage::Rcpt, 450),
                (Outcome::Bounced, Stage::Rcpt, 550),
            ],
            "{exts:?}"
        );
        assert_eq!(run.outcome(0, 2).reply.enhanced, Some(Enhanced(5, 1, 1)));
        assert_eq!(run.outcome(0, 2).reply.lines, vec!["No such user"]);
        assert_eq!(run.outcome(0, 1).address, "later@d.test");
    }
}

#[test]
fn data_failure_applies_to_every_accepted_recipient_only() {
    let m = simple(&["a@d.test", "b@d.test", "c@d.test"]);
    // 451 to DATA itself.
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["PIPELINING"]),
            OK,
            OK,
            OK,
            "550 5.1.1 unknown\r\n",
            "451 4.3.0 try later\r\n",
            BYE,
        ],
    );
    assert_eq!(
        run.results(0),
        vec![
            (Outcome::Deferred, Stage::Data, 451),
            (Outcome::Deferred, Stage::Data, 451),
            (Outcome::Bounced, Stage::Rcpt, 550),
        ]
    );
    assert_eq!(run.commands().last().unwrap(), "QUIT\r\n");
    // 451 and 554 after the content.
    for (code, outcome) in [(451, Outcome::Deferred), (554, Outcome::Bounced)] {
        let after = format!("{code} {}.6.0 content refused\r\n", code / 100);
        let run = drive(
            cfg(),
            &[&m],
            &[
                GREET,
                &ehlo(&[]),
                OK,
                OK,
                OK,
                "550 5.1.1 unknown\r\n",
                GO,
                &after,
                BYE,
            ],
        );
        assert_eq!(
            run.results(0),
            vec![
                (outcome, Stage::Message, code),
                (outcome, Stage::Message, code),
                (Outcome::Bounced, Stage::Rcpt, 550),
            ]
        );
    }
}

#[test]
fn all_rcpts_refused_with_pipelining_ignores_the_data_reply_and_resets() {
    let a = simple(&["x@d.test", "y@d.test"]);
    let b = simple(&["z@d.test"]);
    for data_reply in [
        "554 5.5.1 Error: no valid recipients\r\n",
        "503 5.5.1 Error: need RCPT command\r\n",
    ] {
        let run = drive(
            cfg(),
            &[&a, &b],
            &[
                GREET,
                &ehlo(&["PIPELINING"]),
                OK,
                "550 5.1.1 unknown x\r\n",
                "450 4.1.1 try y later\r\n",
                data_reply,
                OK, // RSET
                OK,
                OK,
                GO,
                OK,
                BYE,
            ],
        );
        // The DATA refusal decided nothing: RCPT replies stand.
        assert_eq!(
            run.results(0),
            vec![
                (Outcome::Bounced, Stage::Rcpt, 550),
                (Outcome::Deferred, Stage::Rcpt, 450)
            ]
        );
        assert_eq!(
            run.results(1),
            vec![(Outcome::Delivered, Stage::Message, 250)]
        );
        assert_eq!(run.sent[2], "RSET\r\n");
        assert!(run.sent[3].starts_with("MAIL FROM:"));
    }
    // Without PIPELINING, DATA is never sent when no recipient was accepted.
    let run = drive(
        cfg(),
        &[&a],
        &[GREET, &ehlo(&[]), OK, "550 no\r\n", "550 no\r\n", BYE],
    );
    assert!(!run.commands().contains(&"DATA\r\n".to_owned()));
    assert!(
        !run.commands().contains(&"RSET\r\n".to_owned()),
        "no RSET before QUIT"
    );
    assert_eq!(
        run.results(0),
        vec![(Outcome::Bounced, Stage::Rcpt, 550); 2]
    );
}

#[test]
fn a_server_accepting_data_without_recipients_gets_a_lone_dot() {
    let a = simple(&["x@d.test"]);
    let b = simple(&["z@d.test"]);
    let run = drive(
        cfg(),
        &[&a, &b],
        &[
            GREET,
            &ehlo(&["PIPELINING"]),
            OK,
            "550 no\r\n",
            GO,
            "554 no recipients\r\n",
            OK,
            OK,
            OK,
            GO,
            OK,
            BYE,
        ],
    );
    assert_eq!(run.sent[2], ".\r\n");
    assert_eq!(run.sent[3], "RSET\r\n");
    assert_eq!(run.results(0), vec![(Outcome::Bounced, Stage::Rcpt, 550)]);
    assert_eq!(
        run.results(1),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
}

#[test]
fn refused_mail_from_decides_every_recipient() {
    let m = simple(&["x@d.test", "y@d.test"]);
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["PIPELINING"]),
            "553 5.7.1 sender rejected\r\n",
            "503 need MAIL\r\n",
            "503 need MAIL\r\n",
            "503 need RCPT\r\n",
            BYE,
        ],
    );
    assert_eq!(
        run.results(0),
        vec![(Outcome::Bounced, Stage::Mail, 553); 2]
    );
    let run = drive(
        cfg(),
        &[&m],
        &[GREET, &ehlo(&[]), "451 4.3.0 later\r\n", BYE],
    );
    assert_eq!(
        run.results(0),
        vec![(Outcome::Deferred, Stage::Mail, 451); 2]
    );
    assert_eq!(run.commands().len(), 3, "{:?}", run.commands());
}

#[test]
fn message_larger_than_server_size_bounces_without_sending() {
    let big = message("a@s.test", &["b@d.test", "c@d.test"], &[b'x'; 2000]);
    let small = simple(&["e@d.test"]);
    let run = drive(
        cfg(),
        &[&big, &small],
        &[GREET, &ehlo(&["SIZE 1000"]), OK, OK, GO, OK, BYE],
    );
    for o in &run.outcomes[0].recipients {
        assert_eq!(
            (o.result, o.stage, o.remote),
            (Outcome::Bounced, Stage::Mail, false)
        );
        assert_eq!(o.reply.enhanced, Some(Enhanced(5, 3, 4)));
        assert!(o.reply.lines[0].contains("2002"), "{:?}", o.reply);
    }
    assert!(!run.outcomes[0].attempted);
    // Nothing of it went out; the next message did, with no RSET in between.
    assert_eq!(run.sent[1], "MAIL FROM:<a@src.test> SIZE=21\r\n");
    assert_eq!(
        run.results(1),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    // SIZE without a limit: the parameter is sent, nothing is checked.
    let run = drive(
        cfg(),
        &[&big],
        &[GREET, &ehlo(&["SIZE"]), OK, OK, OK, GO, OK, BYE],
    );
    assert_eq!(run.sent[1], "MAIL FROM:<a@s.test> SIZE=2002\r\n");
}

#[test]
fn smtputf8_needed_but_not_offered_bounces_with_5_6_7() {
    let mut utf = message("jösé@s.test", &["b@d.test"], b"Subject: x\r\n\r\nb\r\n");
    utf.envelope.mail.smtputf8 = true;
    let run = drive(cfg(), &[&utf], &[GREET, &ehlo(&["8BITMIME"]), BYE]);
    let o = run.outcome(0, 0);
    assert_eq!((o.result, o.stage), (Outcome::Bounced, Stage::Mail));
    assert_eq!(o.reply.enhanced, Some(Enhanced(5, 6, 7)));
    assert_eq!(run.commands(), vec!["EHLO relay.test\r\n", "QUIT\r\n"]);
    // Offered: the parameter goes with MAIL.
    let run = drive(
        cfg(),
        &[&utf],
        &[GREET, &ehlo(&["SMTPUTF8"]), OK, OK, GO, OK, BYE],
    );
    assert_eq!(run.sent[1], "MAIL FROM:<jösé@s.test> SMTPUTF8\r\n");
    // UTF-8 in a header also needs it.
    let mut hdr = message(
        "a@s.test",
        &["b@d.test"],
        "Subject: Grüße\r\n\r\nb\r\n".as_bytes(),
    );
    hdr.envelope.mail.smtputf8 = true;
    let run = drive(cfg(), &[&hdr], &[GREET, &ehlo(&[]), BYE]);
    assert_eq!(run.outcome(0, 0).reply.enhanced, Some(Enhanced(5, 6, 7)));
    // Flagged, but only the body has UTF-8 (RFC 6531 §3.2): sent without SMTPUTF8.
    let mut body_only = message(
        "a@s.test",
        &["b@d.test"],
        "Subject: x\r\n\r\nGrüße\r\n".as_bytes(),
    );
    body_only.envelope.mail.smtputf8 = true;
    body_only.envelope.mail.body = BodyType::EightBitMime;
    let run = drive(
        cfg(),
        &[&body_only],
        &[GREET, &ehlo(&["8BITMIME"]), OK, OK, GO, OK, BYE],
    );
    assert_eq!(run.sent[1], "MAIL FROM:<a@s.test> BODY=8BITMIME\r\n");
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
}

#[test]
fn eight_bit_body_to_a_seven_bit_server_is_sent_with_a_warning() {
    let mut m = message(
        "a@s.test",
        &["b@d.test"],
        "Subject: x\r\n\r\nGrüße\r\n".as_bytes(),
    );
    m.envelope.mail.body = BodyType::EightBitMime;
    let run = drive(
        cfg(),
        &[&m],
        &[GREET, &ehlo(&["PIPELINING"]), OK, OK, GO, OK, BYE],
    );
    assert!(run.sent[1].starts_with("MAIL FROM:<a@s.test>\r\n"));
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
    assert_eq!(run.outcomes[0].warnings.len(), 1);
    assert!(
        run.outcomes[0].warnings[0].contains("8BITMIME"),
        "{:?}",
        run.outcomes[0].warnings
    );
}

#[test]
fn dsn_parameters_only_when_offered() {
    let mut m = simple(&["b@d.test", "c@d.test"]);
    m.envelope.mail.ret = Some(DsnRet::Hdrs);
    m.envelope.mail.envid = Some("QQ+2B1".into());
    m.envelope.recipients[0].notify = Some(DsnNotify {
        success: true,
        failure: true,
        ..DsnNotify::default()
    });
    m.envelope.recipients[0].orcpt = Some("rfc822;b@d.test".into());
    m.envelope.recipients[1].notify = Some(DsnNotify {
        never: true,
        ..DsnNotify::default()
    });
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["DSN", "PIPELINING"]),
            OK,
            OK,
            OK,
            GO,
            OK,
            BYE,
        ],
    );
    assert_eq!(
        run.sent[1],
        "MAIL FROM:<a@src.test> RET=HDRS ENVID=QQ+2B1\r\n\
         RCPT TO:<b@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@d.test\r\n\
         RCPT TO:<c@d.test> NOTIFY=NEVER\r\n\
         DATA\r\n"
    );
    assert!(!run.outcomes[0].dsn_unsupported);
    let run = drive(
        cfg(),
        &[&m],
        &[GREET, &ehlo(&["PIPELINING"]), OK, OK, OK, GO, OK, BYE],
    );
    assert_eq!(
        run.sent[1],
        "MAIL FROM:<a@src.test>\r\nRCPT TO:<b@d.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
    );
    assert!(run.outcomes[0].dsn_unsupported);
    // Nothing asked, nothing owed.
    let plain = simple(&["b@d.test"]);
    let run = drive(cfg(), &[&plain], &[GREET, &ehlo(&[]), OK, OK, GO, OK, BYE]);
    assert!(!run.outcomes[0].dsn_unsupported);
}

#[test]
fn starttls_required_but_not_offered_defers() {
    let m = simple(&["b@d.test"]);
    let mut c = cfg();
    c.tls = TlsPolicy::Required;
    let run = drive(c.clone(), &[&m], &[GREET, &ehlo(&["PIPELINING"]), BYE]);
    let o = run.outcome(0, 0);
    assert_eq!(
        (o.result, o.stage, o.remote),
        (Outcome::Deferred, Stage::StartTls, false)
    );
    assert!(
        o.reply.lines[0].contains("STARTTLS not offered"),
        "{:?}",
        o.reply
    );
    assert_eq!(run.commands(), vec!["EHLO relay.test\r\n", "QUIT\r\n"]);
    assert!(matches!(run.end, End::Done));
    assert!(!run.outcomes[0].attempted);
    // Offered but refused: deferred with the server's reply, even a 5xx.
    let run = drive(
        c,
        &[&m],
        &[
            GREET,
            &ehlo(&["STARTTLS"]),
            "554 5.7.0 no TLS for you\r\n",
            BYE,
        ],
    );
    let o = run.outcome(0, 0);
    assert_eq!(
        (o.result, o.stage, o.reply.code),
        (Outcome::Deferred, Stage::StartTls, 554)
    );
}

#[test]
fn starttls_upgrades_and_asks_ehlo_again() {
    let m = simple(&["b@d.test"]);
    for policy in [TlsPolicy::Opportunistic, TlsPolicy::Required] {
        let mut c = cfg();
        c.tls = policy;
        let run = drive(
            c,
            &[&m],
            &[
                GREET,
                &ehlo(&["STARTTLS"]),
                "220 2.0.0 Ready to start TLS\r\n",
                &ehlo(&["PIPELINING", "SIZE 100"]),
                OK,
                OK,
                GO,
                OK,
                BYE,
            ],
        );
        assert!(run.tls);
        assert_eq!(run.sent[1], "STARTTLS\r\n");
        assert_eq!(run.sent[2], "EHLO relay.test\r\n");
        // Capabilities after TLS are the ones used.
        assert_eq!(
            run.sent[3],
            "MAIL FROM:<a@src.test> SIZE=21\r\nRCPT TO:<b@d.test>\r\nDATA\r\n"
        );
        assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
    }
    // Opportunistic: a refused STARTTLS goes on in plain text; no STARTTLS offered
    // goes on in plain text.
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["STARTTLS"]),
            "454 4.7.0 TLS not available\r\n",
            OK,
            OK,
            GO,
            OK,
            BYE,
        ],
    );
    assert!(!run.tls);
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
    let run = drive(cfg(), &[&m], &[GREET, &ehlo(&[]), OK, OK, GO, OK, BYE]);
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
    // Disabled: never asked.
    let mut c = cfg();
    c.tls = TlsPolicy::Disabled;
    let run = drive(
        c,
        &[&m],
        &[GREET, &ehlo(&["STARTTLS"]), OK, OK, GO, OK, BYE],
    );
    assert!(!run.commands().contains(&"STARTTLS\r\n".to_owned()));
}

#[test]
fn tls_handshake_failure_defers_everything() {
    let m = simple(&["b@d.test"]);
    let mut s = ClientSession::new(cfg(), &[&m]);
    fn feed(s: &mut ClientSession<'_>, wire: &str) {
        assert_eq!(s.next_action(), Action::ReadReply);
        s.on_reply(parse_reply(wire.as_bytes()).unwrap().unwrap().0);
    }
    feed(&mut s, GREET);
    assert!(matches!(s.next_action(), Action::Send(_)));
    feed(&mut s, &ehlo(&["STARTTLS"]));
    assert_eq!(s.next_action(), Action::Send(b"STARTTLS\r\n".to_vec()));
    feed(&mut s, "220 go\r\n");
    assert_eq!(s.next_action(), Action::StartTls);
    s.on_tls_failed("certificate expired");
    let Action::Failed { outcomes, .. } = s.next_action() else {
        panic!()
    };
    let o = &outcomes[0].recipients[0];
    assert_eq!((o.result, o.stage), (Outcome::Deferred, Stage::StartTls));
    assert!(o.reply.lines[0].contains("certificate expired"));
    assert!(s.is_finished());
    assert!(matches!(s.next_action(), Action::Failed { outcomes, .. } if outcomes.is_empty()));
}

#[test]
fn helo_fallback_when_ehlo_is_refused() {
    let mut m = message("a@s.test", &["b@d.test"], b"x\r\n");
    m.envelope.mail.body = BodyType::EightBitMime;
    m.envelope.mail.ret = Some(DsnRet::Full);
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            "502 5.5.2 Command not recognized\r\n",
            "250 mx.test\r\n",
            OK,
            OK,
            GO,
            OK,
            BYE,
        ],
    );
    assert_eq!(
        run.commands()[..5],
        [
            "EHLO relay.test\r\n",
            "HELO relay.test\r\n",
            "MAIL FROM:<a@s.test>\r\n",
            "RCPT TO:<b@d.test>\r\n",
            "DATA\r\n"
        ]
    );
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
    assert!(run.outcomes[0].dsn_unsupported);
    assert_eq!(run.outcomes[0].warnings.len(), 1);
    // HELO refused too: per its code.
    let run = drive(
        cfg(),
        &[&m],
        &[GREET, "500 what\r\n", "550 go away\r\n", BYE],
    );
    assert_eq!(run.results(0), vec![(Outcome::Bounced, Stage::Ehlo, 550)]);
    // 4xx to EHLO: no fallback, deferred.
    let run = drive(cfg(), &[&m], &[GREET, "451 later\r\n", BYE]);
    assert_eq!(run.results(0), vec![(Outcome::Deferred, Stage::Ehlo, 451)]);
}

#[test]
fn bad_greetings() {
    let m = simple(&["b@d.test"]);
    let run = drive(cfg(), &[&m], &["554 5.3.2 no SMTP service here\r\n", BYE]);
    assert_eq!(
        run.results(0),
        vec![(Outcome::Bounced, Stage::Greeting, 554)]
    );
    assert_eq!(run.commands(), vec!["QUIT\r\n"]);
    let run = drive(cfg(), &[&m], &["450 busy\r\n", BYE]);
    assert_eq!(
        run.results(0),
        vec![(Outcome::Deferred, Stage::Greeting, 450)]
    );
    assert!(!run.outcomes[0].attempted);
}

#[test]
fn several_messages_share_a_connection_with_rset_only_when_needed() {
    let a = simple(&["a1@d.test"]);
    let b = simple(&["b1@d.test", "b2@d.test"]);
    let c = simple(&["c1@d.test"]);
    let d = simple(&["d1@d.test"]);
    let run = drive(
        cfg(),
        &[&a, &b, &c, &d],
        &[
            GREET,
            &ehlo(&[]),
            // a: delivered, no RSET needed afterwards
            OK,
            OK,
            GO,
            OK,
            // b: DATA refused, transaction left open
            OK,
            OK,
            OK,
            "452 4.3.1 full\r\n",
            // RSET, then c: content refused (transaction complete, no RSET)
            OK,
            OK,
            OK,
            GO,
            "554 5.7.1 spam\r\n",
            // d
            OK,
            OK,
            GO,
            OK,
            BYE,
        ],
    );
    let verbs: Vec<String> = run
        .commands()
        .iter()
        .filter(|l| {
            l.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !l.starts_with("Subject")
        })
        .map(|l| l.split([' ', ':', '\r']).next().unwrap().to_owned())
        .collect();
    assert_eq!(
        verbs,
        [
            "EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "MAIL", "RCPT",
            "DATA", "MAIL", "RCPT", "DATA", "QUIT"
        ]
    );
    assert_eq!(
        run.results(0),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    assert_eq!(
        run.results(1),
        vec![(Outcome::Deferred, Stage::Data, 452); 2]
    );
    assert_eq!(
        run.results(2),
        vec![(Outcome::Bounced, Stage::Message, 554)]
    );
    assert_eq!(
        run.results(3),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    assert!(run.outcomes.iter().all(|o| o.attempted));
    // A refused RSET leaves the server in an unknown state: stop, defer the rest.
    let run = drive(
        cfg(),
        &[&b, &d],
        &[
            GREET,
            &ehlo(&[]),
            OK,
            "550 no\r\n",
            "550 no\r\n",
            "500 what\r\n",
            BYE,
        ],
    );
    assert_eq!(
        run.results(0),
        vec![(Outcome::Bounced, Stage::Rcpt, 550); 2]
    );
    assert_eq!(run.results(1), vec![(Outcome::Deferred, Stage::Mail, 500)]);
    assert!(!run.outcomes[1].attempted);
}

#[test]
fn dot_stuffing_on_the_wire() {
    let m = message(
        "a@s.test",
        &["b@d.test"],
        b".first\r\nmid\r\n.\r\n..two\r\nlast",
    );
    let run = drive(
        cfg(),
        &[&m],
        &[GREET, &ehlo(&["SIZE 0"]), OK, OK, GO, OK, BYE],
    );
    // SIZE counts the CRLF we append, not stuffing.
    assert_eq!(run.sent[1], "MAIL FROM:<a@s.test> SIZE=29\r\n");
    assert_eq!(
        run.sent[4],
        "..first\r\nmid\r\n..\r\n...two\r\nlast\r\n.\r\n"
    );
}

/// One complete script per mode, every reply positive.
fn happy_script(pipelining: bool) -> Vec<String> {
    let exts: &[&str] = if pipelining { &["PIPELINING"] } else { &[] };
    [
        GREET,
        &ehlo(exts),
        OK,
        OK,
        "550 5.1.1 no\r\n",
        GO,
        OK,
        OK,
        OK,
        GO,
        OK,
        BYE,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

#[test]
fn a_421_anywhere_defers_the_rest_and_closes() {
    let a = simple(&["a1@d.test", "a2@d.test"]);
    let b = simple(&["b1@d.test"]);
    for pipelining in [false, true] {
        let script = happy_script(pipelining);
        let clean = drive(
            cfg(),
            &[&a, &b],
            &script.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert!(matches!(clean.end, End::Done), "{clean:?}");
        for k in 0..script.len() - 1 {
            let mut s = script.clone();
            s[k] = "421 4.3.2 shutting down\r\n".into();
            s.truncate(k + 1);
            let run = drive(
                cfg(),
                &[&a, &b],
                &s.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            assert!(
                matches!(&run.end, End::Failed(r) if r.contains("421")),
                "k={k} {:?}",
                run.end
            );
            assert!(!run.sent_quit(), "no QUIT after 421");
            for (m, mo) in run.outcomes.iter().enumerate() {
                for (r, o) in mo.recipients.iter().enumerate() {
                    let before = &clean.outcomes[m].recipients[r];
                    // What was decided before the 421 stands; the rest is deferred by it.
                    if o.reply.code == 421 {
                        assert_eq!(o.result, Outcome::Deferred);
                        assert!(o.remote);
                    } else {
                        assert_eq!(o, before, "k={k} m={m} r={r}");
                    }
                }
            }
        }
    }
    // Spot check: 421 to the final dot of the first message.
    let s = happy_script(false);
    let mut s: Vec<&str> = s.iter().map(String::as_str).collect();
    s[6] = "421 4.4.2 timeout\r\n";
    s.truncate(7);
    let run = drive(cfg(), &[&a, &b], &s);
    assert_eq!(
        run.results(0),
        vec![
            (Outcome::Deferred, Stage::Message, 421),
            (Outcome::Bounced, Stage::Rcpt, 550)
        ]
    );
    assert_eq!(run.results(1), vec![(Outcome::Deferred, Stage::Mail, 421)]);
    assert!(!run.outcomes[1].attempted);
}

#[test]
fn lost_connection_defers_undecided_recipients() {
    let a = simple(&["a1@d.test", "a2@d.test"]);
    // Script ends right after the 354: the connection is gone during the content.
    let run = drive(cfg(), &[&a], &[GREET, &ehlo(&[]), OK, OK, "550 no\r\n", GO]);
    let End::Failed(reason) = &run.end else {
        panic!()
    };
    assert!(reason.contains("message"), "{reason}");
    assert_eq!(
        run.results(0),
        vec![
            (Outcome::Deferred, Stage::Message, 421),
            (Outcome::Bounced, Stage::Rcpt, 550)
        ]
    );
    assert!(!run.outcome(0, 0).remote);
    // Lost while waiting for the QUIT reply: all was decided, so it is a clean end.
    let run = drive(cfg(), &[&a], &[GREET, &ehlo(&[]), OK, OK, OK, GO, OK]);
    assert!(matches!(run.end, End::Done));
    assert_eq!(
        run.results(0),
        vec![(Outcome::Delivered, Stage::Message, 250); 2]
    );
}

#[test]
fn unexpected_replies_are_protocol_errors_not_deliveries() {
    let a = simple(&["a1@d.test"]);
    // 250 to DATA: the server is out of step; nothing is known to be delivered.
    let run = drive(cfg(), &[&a], &[GREET, &ehlo(&[]), OK, OK, OK]);
    assert!(matches!(&run.end, End::Failed(r) if r.contains("protocol error")));
    assert_eq!(run.results(0), vec![(Outcome::Deferred, Stage::Data, 451)]);
    // 354 to RCPT counts as a (temporary) refusal.
    let run = drive(cfg(), &[&a], &[GREET, &ehlo(&[]), OK, GO, BYE]);
    assert_eq!(run.results(0), vec![(Outcome::Deferred, Stage::Rcpt, 354)]);
}

#[test]
fn auth_plain_and_login_only_over_tls() {
    let m = simple(&["b@d.test"]);
    let mut c = cfg();
    c.auth = Some(Credentials {
        username: "user".into(),
        password: "secret".into(),
    });
    let tls_then = |auth: &str| -> Vec<String> {
        vec![
            GREET.into(),
            ehlo(&["STARTTLS"]),
            "220 go\r\n".into(),
            ehlo(&[auth]),
        ]
    };
    // PLAIN preferred.
    let mut s = tls_then("AUTH LOGIN PLAIN");
    s.extend(["235 2.7.0 ok\r\n", OK, OK, GO, OK, BYE].map(String::from));
    let run = drive(
        c.clone(),
        &[&m],
        &s.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        run.sent[3],
        format!("AUTH PLAIN {}\r\n", STANDARD.encode("\0user\0secret"))
    );
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
    // LOGIN.
    let mut s = tls_then("AUTH LOGIN");
    s.extend(
        [
            "334 VXNlcm5hbWU6\r\n",
            "334 UGFzc3dvcmQ6\r\n",
            "235 ok\r\n",
            OK,
            OK,
            GO,
            OK,
            BYE,
        ]
        .map(String::from),
    );
    let run = drive(
        c.clone(),
        &[&m],
        &s.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        run.sent[3..6],
        ["AUTH LOGIN\r\n", "dXNlcg==\r\n", "c2VjcmV0\r\n"]
    );
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
    // Refused credentials defer, even with 5xx.
    let mut s = tls_then("AUTH PLAIN");
    s.extend(["535 5.7.8 bad credentials\r\n", BYE].map(String::from));
    let run = drive(
        c.clone(),
        &[&m],
        &s.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(run.results(0), vec![(Outcome::Deferred, Stage::Auth, 535)]);
    // A challenge we cannot answer is cancelled with `*`.
    let mut s = tls_then("AUTH PLAIN");
    s.extend(["334 \r\n", "501 5.7.0 cancelled\r\n", BYE].map(String::from));
    let run = drive(
        c.clone(),
        &[&m],
        &s.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(run.sent[4], "*\r\n");
    assert_eq!(run.results(0), vec![(Outcome::Deferred, Stage::Auth, 334)]);
    // No common mechanism.
    let mut s = tls_then("AUTH CRAM-MD5");
    s.push(BYE.into());
    let run = drive(
        c.clone(),
        &[&m],
        &s.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(run.outcome(0, 0).stage, Stage::Auth);
    assert!(!run.outcome(0, 0).remote);
    // Never in clear text, whatever is offered.
    let run = drive(c, &[&m], &[GREET, &ehlo(&["AUTH PLAIN LOGIN"]), BYE]);
    assert!(run.commands().iter().all(|l| !l.starts_with("AUTH")));
    let o = run.outcome(0, 0);
    assert_eq!((o.result, o.stage), (Outcome::Deferred, Stage::Auth));
    assert!(o.reply.lines[0].contains("without TLS"));
}

#[test]
fn damaged_addresses_cannot_inject_commands() {
    let m = simple(&["ok@d.test", "evil@d.test>\r\nRCPT TO:<x@y.test"]);
    let run = drive(cfg(), &[&m], &[GREET, &ehlo(&[]), OK, OK, GO, OK, BYE]);
    assert_eq!(run.results(0)[1], (Outcome::Bounced, Stage::Rcpt, 553));
    assert!(run.commands().iter().all(|l| !l.contains("x@y.test")));
    let bad_from = message("a@s\r\nRSET", &["b@d.test"], b"x\r\n");
    let run = drive(cfg(), &[&bad_from], &[GREET, &ehlo(&[]), BYE]);
    assert_eq!(run.results(0), vec![(Outcome::Bounced, Stage::Mail, 553)]);
}

#[test]
fn empty_message_list_just_quits() {
    let run = drive(cfg(), &[], &[GREET, &ehlo(&[]), BYE]);
    assert!(matches!(run.end, End::Done));
    assert_eq!(run.commands(), vec!["EHLO relay.test\r\n", "QUIT\r\n"]);
}

#[test]
fn timeout_kinds_follow_the_conversation() {
    let m = simple(&["b@d.test"]);
    let mut s = ClientSession::new(cfg(), &[&m]);
    let mut kinds = Vec::new();
    let script = [
        GREET.to_owned(),
        ehlo(&["PIPELINING"]),
        OK.into(),
        OK.into(),
        GO.into(),
        OK.into(),
        BYE.into(),
    ];
    let mut replies = script.iter();
    loop {
        match s.next_action() {
            Action::ReadReply => {
                kinds.push(s.timeout_kind());
                let wire = replies.next().unwrap();
                s.on_reply(parse_reply(wire.as_bytes()).unwrap().unwrap().0);
            }
            Action::Send(_) => {}
            _ => break,
        }
    }
    use TimeoutKind::*;
    assert_eq!(
        kinds,
        [
            Greeting,
            Command,
            Mail,
            Rcpt,
            DataInit,
            DataTermination,
            Quit
        ]
    );
}

#[test]
fn random_conversations_never_panic_and_settle_every_recipient() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC11E47);
    let mut utf = message("ü@s.test", &["x@d.test"], b"x\r\n");
    utf.envelope.mail.smtputf8 = true;
    let msgs = [
        simple(&["a@d.test", "b@d.test", "c@d.test"]),
        simple(&["d@d.test"]),
        message("", &["e@d.test", "f@d.test"], &[b'.'; 300]),
        utf,
        message("a@s.test", &[], b""),
    ];
    let refs: Vec<&QueuedMessage> = msgs.iter().collect();
    let codes = [
        220, 221, 235, 250, 251, 334, 354, 421, 450, 451, 452, 500, 501, 503, 535, 550, 554, 999,
    ];
    let ext_pool = [
        "PIPELINING",
        "SIZE 500",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "STARTTLS",
        "DSN",
        "AUTH PLAIN",
        "AUTH LOGIN",
    ];
    for round in 0..3000 {
        let mut c = cfg();
        c.tls = [
            TlsPolicy::Opportunistic,
            TlsPolicy::Required,
            TlsPolicy::Disabled,
        ][round % 3];
        c.pipelining = rng.random_bool(0.5);
        c.pace_messages = rng.random_bool(0.3);
        if rng.random_bool(0.3) {
            c.auth = Some(Credentials {
                username: "u".into(),
                password: "p".into(),
            });
        }
        let n = rng.random_range(0..=refs.len());
        let mut s = ClientSession::new(c, &refs[..n]);
        let mut steps = 0;
        let outcomes = loop {
            steps += 1;
            assert!(steps < 500, "round {round}: no end");
            match s.next_action() {
                Action::Send(b) => assert!(!b.is_empty()),
                Action::ReadReply => match rng.random_range(0..20) {
                    0 => s.on_connection_error("boom"),
                    1 => s.on_tls_established(tls_info()),
                    2 => {
                        let exts: Vec<&str> = ext_pool
                            .iter()
                            .copied()
                            .filter(|_| rng.random_bool(0.5))
                            .collect();
                        s.on_reply(parse_reply(ehlo(&exts).as_bytes()).unwrap().unwrap().0);
                    }
                    _ => {
                        let code = codes[rng.random_range(0..codes.len())];
                        s.on_reply(Reply::new(code, None, "random"));
                    }
                },
                Action::StartTls => match rng.random_range(0..3) {
                    0 => s.on_tls_failed("nope"),
                    1 => s.on_reply(Reply::new(250, None, "confused")),
                    _ => s.on_tls_established(tls_info()),
                },
                Action::Pace(_) => match rng.random_range(0..5) {
                    0 => s.on_pace_refused(Reply::new(451, None, "paced")),
                    _ => s.on_paced(),
                },
                Action::Done(o) => break o,
                Action::Failed { outcomes, .. } => break outcomes,
            }
        };
        assert_eq!(outcomes.len(), n);
        for (mo, m) in outcomes.iter().zip(&refs) {
            assert_eq!(mo.id, m.envelope.id);
            assert_eq!(
                mo.recipients.len(),
                m.envelope.recipients.len(),
                "round {round}"
            );
            for (o, r) in mo.recipients.iter().zip(&m.envelope.recipients) {
                assert_eq!(o.address, r.address);
                assert!(
                    !o.reply.lines[0].contains("no reply decided"),
                    "round {round}: {o:?}"
                );
                if o.result == Outcome::Delivered {
                    assert_eq!(o.stage, Stage::Message, "round {round}: {o:?}");
                    assert!(mo.attempted);
                }
            }
        }
        assert!(s.is_finished());
    }
    // Random bytes through the parser: never a panic, and a complete reply never
    // claims more than it was given.
    for _ in 0..20_000 {
        let len = rng.random_range(0..64);
        let pool = b"0123456789 -\r\n.ab\xff";
        let buf: Vec<u8> = (0..len)
            .map(|_| pool[rng.random_range(0..pool.len())])
            .collect();
        if let Ok(Some((r, n))) = parse_reply(&buf) {
            assert!(n <= buf.len() && !r.lines.is_empty());
        }
    }
}

#[test]
fn paced_sessions_ask_before_each_message_and_stop_where_refused() {
    let (m1, m2, m3) = (
        simple(&["a@dst.test"]),
        simple(&["b@dst.test"]),
        simple(&["c@dst.test", "d@dst.test"]),
    );
    let mut c = cfg();
    c.pace_messages = true;
    let mut s = ClientSession::new(c, &[&m1, &m2, &m3]);
    let mut wire = [GREET, &ehlo(&["PIPELINING"]), OK, OK, GO, OK, BYE]
        .concat()
        .into_bytes();
    let mut paced = Vec::new();
    let mut sent = Vec::new();
    let outcomes = loop {
        match s.next_action() {
            Action::Send(b) => sent.push(String::from_utf8_lossy(&b).into_owned()),
            Action::ReadReply => {
                let (reply, n) = parse_reply(&wire).unwrap().unwrap();
                wire.drain(..n);
                s.on_reply(reply);
            }
            Action::Pace(m) => {
                paced.push(m);
                // Nothing of the message goes out before the pacer answers.
                assert!(!sent.last().unwrap().starts_with("MAIL"));
                if m == 0 {
                    s.on_paced();
                } else {
                    s.on_pace_refused(Reply::status(451, (4, 7, 0), "egress pacing"));
                }
            }
            Action::Done(o) => break o,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(paced, [0, 1]);
    assert!(wire.is_empty());
    assert_eq!(sent.last().unwrap(), "QUIT\r\n");
    assert!(sent.iter().filter(|s| s.starts_with("MAIL")).count() == 1);
    assert!(outcomes[0].attempted);
    assert_eq!(outcomes[0].recipients[0].result, Outcome::Delivered);
    for o in &outcomes[1..] {
        assert!(!o.attempted);
        for r in &o.recipients {
            assert_eq!(
                (r.result, r.stage, r.remote),
                (Outcome::Deferred, Stage::Mail, false)
            );
            assert_eq!(r.reply.code, 451);
        }
    }
    assert_eq!(outcomes[2].recipients.len(), 2);
}

// ---------------------------------------------------------------------------
// Outcomes as transactions end

/// Message 0's outcome is handed out as soon as the reply after its content is read,
/// before message 1's MAIL goes out; a connection lost later does not change it, and
/// the connection's result repeats it.
#[test]
fn each_outcome_is_available_when_its_transaction_ends() {
    let a = simple(&["x@dst.test"]);
    let b = simple(&["y@dst.test", "z@dst.test"]);
    let mut s = ClientSession::new(cfg(), &[&a, &b]);
    let mut wire: Vec<u8> = [
        GREET,
        &ehlo(&["PIPELINING"]),
        OK,
        OK,
        GO,
        "250 2.0.0 queued as A\r\n",
        // Message 1: MAIL accepted, then the server goes away.
        OK,
    ]
    .concat()
    .into_bytes();
    let mut completed = Vec::new();
    let mut sent_after_first = Vec::new();
    let end = loop {
        match s.next_action() {
            Action::Send(b) => {
                if !completed.is_empty() {
                    sent_after_first.push(String::from_utf8_lossy(&b).into_owned());
                }
            }
            Action::ReadReply => match parse_reply(&wire).unwrap() {
                Some((reply, n)) => {
                    wire.drain(..n);
                    s.on_reply(reply);
                    while let Some(c) = s.take_completed() {
                        // Handed out before anything for message 1 was sent.
                        assert!(sent_after_first.is_empty(), "{sent_after_first:?}");
                        completed.push(c);
                    }
                }
                None => s.on_connection_error("gone"),
            },
            Action::Failed { outcomes, .. } | Action::Done(outcomes) => break outcomes,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(completed.len(), 1, "{completed:?}");
    let (index, first) = &completed[0];
    assert_eq!(*index, 0);
    assert!(first.attempted);
    assert_eq!(first.recipients[0].result, Outcome::Delivered);
    assert_eq!(first.recipients[0].reply.code, 250);
    assert_eq!(&end[0], first, "the connection's result repeats it");
    // Message 1 never completed a transaction: only in the connection's result.
    assert!(
        end[1]
            .recipients
            .iter()
            .all(|r| r.result == Outcome::Deferred)
    );
    assert!(sent_after_first.iter().any(|c| c.starts_with("MAIL FROM")));
}

#[test]
fn requiretls_goes_only_over_verified_tls_to_a_server_offering_it() {
    let mut m = simple(&["b@d.test"]);
    m.envelope.mail.requiretls = true;
    // Verified TLS and REQUIRETLS offered: the parameter is sent.
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["STARTTLS"]),
            "220 2.0.0 Ready\r\n",
            &ehlo(&["REQUIRETLS"]),
            OK,
            OK,
            GO,
            OK,
            BYE,
        ],
    );
    assert_eq!(run.sent[3], "MAIL FROM:<a@src.test> REQUIRETLS\r\n");
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);

    // Refused: the host is given up on (deferred at STARTTLS, not by the server)
    // so the caller tries the next MX and bounces with this reply when none is left.
    let bounced = |run: &Run, why: &str| {
        let o = run.outcome(0, 0);
        assert_eq!((o.result, o.stage), (Outcome::Deferred, Stage::StartTls));
        assert!(!o.remote);
        assert_eq!(o.reply.code, 550);
        let text = o.reply.to_string();
        assert!(text.contains("5.7.30") && text.contains(why), "{text}");
        assert!(
            !run.commands().iter().any(|c| c.starts_with("MAIL")),
            "nothing sent: {:?}",
            run.commands()
        );
    };
    // No STARTTLS offered: refused (RFC 8689 §4.2.1), never sent in plain text.
    let run = drive(cfg(), &[&m], &[GREET, &ehlo(&["REQUIRETLS"]), BYE]);
    bounced(&run, "offers no TLS session");
    // TLS, but the server does not offer REQUIRETLS.
    let run = drive(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["STARTTLS"]),
            "220 2.0.0 Ready\r\n",
            &ehlo(&[]),
            BYE,
        ],
    );
    bounced(&run, "does not offer REQUIRETLS");
    // TLS whose certificate did not verify.
    let run = drive_with(
        cfg(),
        &[&m],
        &[
            GREET,
            &ehlo(&["STARTTLS"]),
            "220 2.0.0 Ready\r\n",
            &ehlo(&["REQUIRETLS"]),
            BYE,
        ],
        Err("certificate not valid for name".into()),
    );
    bounced(&run, "not verified");
    // A message without the flag on the same kind of server is unaffected.
    let plain = simple(&["b@d.test"]);
    let run = drive(cfg(), &[&plain], &[GREET, &ehlo(&[]), OK, OK, GO, OK, BYE]);
    assert_eq!(run.outcome(0, 0).result, Outcome::Delivered);
}
