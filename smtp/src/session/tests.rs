use super::*;

fn cfg() -> SessionConfig {
    SessionConfig {
        hostname: "relay.test".into(),
        max_message_size: 10_000,
        max_recipients: 3,
        max_line_length: 1000,
        max_errors: 5,
        max_messages: 2,
        add_missing_headers: true,
        queue_store: "redis",
    }
}

fn peer(relay_allowed: bool) -> Peer {
    Peer {
        ip: "192.0.2.7".parse().unwrap(),
        port: 40000,
        listener: "smtp".into(),
        relay_allowed,
        starttls_available: true,
        auth_available: true,
        tls: None,
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

fn reply(step: Step) -> Reply {
    match step {
        Step::Reply(r) | Step::Close(r) | Step::StartTls(r) | Step::ReadData(r) => r,
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn code(s: &mut Session, line: &str) -> u16 {
    reply(s.on_line(format!("{line}\r\n").as_bytes())).code
}

/// Runs DATA with `content` (already dot-stuffed, with the terminator) and returns the
/// step after the end of data.
fn send_data(s: &mut Session, content: &[u8]) -> Step {
    assert_eq!(code(s, "DATA"), 354);
    let n = s.data_feed(content).expect("terminator");
    assert_eq!(n, content.len());
    s.data_end(QueueId::generate(), now())
}

#[test]
fn full_transaction_builds_envelope_and_received_header() {
    let mut s = Session::new(cfg(), peer(true));
    assert_eq!(s.greeting().code, 220);
    let ehlo = reply(s.on_line(b"EHLO client.test\r\n"));
    let text = ehlo.lines.join("\n");
    for ext in [
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
        "CHUNKING",
        "DSN",
    ] {
        assert!(text.contains(ext), "{ext} missing from {text}");
    }
    assert!(
        !text.contains("AUTH"),
        "AUTH must not be offered before TLS"
    );
    assert_eq!(
        code(
            &mut s,
            "MAIL FROM:<a@client.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x1"
        ),
        250
    );
    assert_eq!(
        code(
            &mut s,
            "RCPT TO:<b@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@dest.test"
        ),
        250
    );
    let step = send_data(&mut s, b"Subject: hi\r\n\r\nbody\r\n..dot\r\n.\r\n");
    let Step::Enqueue(msg) = step else {
        panic!("{step:?}")
    };
    let env = &msg.envelope;
    assert_eq!(env.mail.from, "a@client.test");
    assert_eq!(env.mail.size, Some(100));
    assert_eq!(env.mail.body, BodyType::EightBitMime);
    assert_eq!(env.mail.ret, Some(DsnRet::Hdrs));
    assert_eq!(env.recipients[0].address, "b@dest.test");
    assert!(env.recipients[0].notify.as_ref().unwrap().success);
    assert_eq!(env.client.helo, "client.test");
    let body = String::from_utf8(msg.body.clone()).unwrap();
    assert!(
        body.starts_with(
            "Received: from client.test ([192.0.2.7])\r\n\tby relay.test (mailrelay) with ESMTP id "
        ),
        "{body}"
    );
    assert!(body.contains("\r\n\tfor <b@dest.test>; "), "{body}");
    assert!(
        body.contains("\r\nDate: ")
            && body.contains(&format!("\r\nMessage-ID: <{}@relay.test>\r\n", env.id))
    );
    assert!(
        body.ends_with("\r\nSubject: hi\r\n\r\nbody\r\n.dot\r\n"),
        "{body}"
    );
    assert_eq!(s.enqueue_result(&env.id, Ok(())).code, 250);
    // The session is ready for the next transaction.
    assert_eq!(code(&mut s, "MAIL FROM:<>"), 250);
}

#[test]
fn existing_date_and_message_id_are_kept() {
    let mut s = Session::new(cfg(), peer(true));
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@c.test>");
    code(&mut s, "RCPT TO:<b@d.test>");
    let Step::Enqueue(msg) = send_data(&mut s, b"date: x\r\nMessage-Id: <m@x>\r\n\r\nb\r\n.\r\n")
    else {
        panic!()
    };
    let body = String::from_utf8(msg.body).unwrap();
    assert_eq!(
        body.matches("Date:").count() + body.matches("date:").count(),
        1
    );
    assert_eq!(body.to_ascii_lowercase().matches("message-id:").count(), 1);
}

#[test]
fn relay_is_denied_outside_relay_networks() {
    let mut s = Session::new(cfg(), peer(false));
    code(&mut s, "EHLO c");
    assert_eq!(code(&mut s, "MAIL FROM:<a@c.test>"), 250);
    let r = reply(s.on_line(b"RCPT TO:<b@d.test>\r\n"));
    assert_eq!(r.code, 554);
    assert_eq!(r.enhanced, Some(super::super::reply::Enhanced(5, 7, 1)));
    assert!(r.lines[0].contains("Relay access denied"));
    assert_eq!(code(&mut s, "DATA"), 554, "no valid recipients");
}

#[test]
fn command_order_is_enforced() {
    let mut s = Session::new(
        SessionConfig {
            max_errors: 10,
            ..cfg()
        },
        peer(true),
    );
    assert_eq!(code(&mut s, "MAIL FROM:<a@c.test>"), 503);
    code(&mut s, "HELO c");
    assert_eq!(code(&mut s, "RCPT TO:<b@d.test>"), 503);
    assert_eq!(code(&mut s, "DATA"), 503);
    assert_eq!(
        code(&mut s, "MAIL FROM:<a@c.test> SIZE=5"),
        555,
        "parameters need EHLO"
    );
    assert_eq!(code(&mut s, "MAIL FROM:<a@c.test>"), 250);
    assert_eq!(code(&mut s, "MAIL FROM:<a@c.test>"), 503);
    assert_eq!(code(&mut s, "RSET"), 250);
    assert_eq!(code(&mut s, "MAIL FROM:<a@c.test>"), 250);
}

#[test]
fn recipients_and_size_are_capped() {
    let mut s = Session::new(cfg(), peer(true));
    code(&mut s, "EHLO c");
    assert_eq!(code(&mut s, "MAIL FROM:<a@c.test> SIZE=10001"), 552);
    assert_eq!(code(&mut s, "MAIL FROM:<a@c.test> SIZE=10000"), 250);
    for i in 0..3 {
        assert_eq!(code(&mut s, &format!("RCPT TO:<r{i}@d.test>")), 250);
    }
    assert_eq!(
        code(&mut s, "RCPT TO:<r0@D.TEST>"),
        250,
        "a duplicate is not a new recipient"
    );
    assert_eq!(code(&mut s, "RCPT TO:<r3@d.test>"), 452);
    let mut big = vec![b'x'; 500];
    big.extend_from_slice(b"\r\n");
    let mut content = big.repeat(21);
    content.extend_from_slice(b".\r\n");
    let r = reply(send_data(&mut s, &content));
    assert_eq!(
        (r.code, r.enhanced),
        (552, Some(super::super::reply::Enhanced(5, 3, 4)))
    );
}

#[test]
fn bare_line_endings_in_commands_and_data_are_refused() {
    let mut s = Session::new(cfg(), peer(true));
    assert_eq!(reply(s.on_line(b"EHLO c\n")).code, 500);
    assert_eq!(reply(s.on_line(b"EHLO c\rX\r\n")).code, 500);
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@c.test>");
    code(&mut s, "RCPT TO:<b@d.test>");
    let r = reply(send_data(
        &mut s,
        b"a\r\n\n.\nMAIL FROM:<x@y.test>\r\n.\r\n",
    ));
    assert_eq!(r.code, 550);
    // Nothing from the refused transaction survives.
    assert_eq!(code(&mut s, "RCPT TO:<b@d.test>"), 503);
}

#[test]
fn too_many_errors_closes() {
    let mut s = Session::new(cfg(), peer(true));
    for _ in 0..4 {
        assert!(matches!(s.on_line(b"BOGUS\r\n"), Step::Reply(_)));
    }
    let Step::Close(r) = s.on_line(b"BOGUS\r\n") else {
        panic!()
    };
    assert_eq!(r.code, 421);
}

#[test]
fn long_command_lines_are_refused_but_auth_may_be_longer() {
    let mut s = Session::new(cfg(), peer(true));
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    assert_eq!(reply(s.on_line(long.as_bytes())).code, 500);
    let long_auth = format!("AUTH PLAIN {}\r\n", "A".repeat(600));
    // Not over TLS, so refused for that reason, not for length.
    assert_eq!(reply(s.on_line(long_auth.as_bytes())).code, 538);
}

#[test]
fn starttls_resets_and_unlocks_auth() {
    let mut s = Session::new(cfg(), peer(false));
    code(&mut s, "EHLO c");
    assert_eq!(code(&mut s, "AUTH PLAIN AGEAYg=="), 538);
    assert!(matches!(s.on_line(b"STARTTLS\r\n"), Step::StartTls(_)));
    s.tls_started(TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_256_GCM_SHA384".into(),
    });
    assert_eq!(
        code(&mut s, "MAIL FROM:<a@c.test>"),
        503,
        "EHLO again after TLS"
    );
    let ehlo = reply(s.on_line(b"EHLO c\r\n")).lines.join(" ");
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    assert_eq!(code(&mut s, "STARTTLS"), 503);
    let Step::CheckCredentials { username, password } = s.on_line(b"AUTH PLAIN AGFsaWNlAHB3\r\n")
    else {
        panic!()
    };
    assert_eq!((username.as_str(), password.as_str()), ("alice", "pw"));
    assert_eq!(reply(s.auth_result(username, true)).code, 235);
    code(&mut s, "MAIL FROM:<a@c.test>");
    assert_eq!(
        code(&mut s, "RCPT TO:<b@d.test>"),
        250,
        "authenticated clients may relay"
    );
    let Step::Enqueue(msg) = send_data(&mut s, b"x\r\n.\r\n") else {
        panic!()
    };
    assert_eq!(msg.envelope.client.auth_user.as_deref(), Some("alice"));
    let body = String::from_utf8(msg.body).unwrap();
    assert!(
        body.contains("(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)")
            && body.contains("with ESMTPSA id"),
        "{body}"
    );
}

#[test]
fn auth_login_exchange_and_failure() {
    let mut p = peer(false);
    p.tls = Some(TlsInfo {
        version: "TLSv1.2".into(),
        cipher: "X".into(),
    });
    let mut s = Session::new(cfg(), p);
    code(&mut s, "EHLO c");
    assert_eq!(code(&mut s, "AUTH LOGIN"), 334);
    assert_eq!(code(&mut s, "YWxpY2U="), 334);
    let Step::CheckCredentials { username, .. } = s.on_line(b"d3Jvbmc=\r\n") else {
        panic!()
    };
    assert_eq!(reply(s.auth_result(username, false)).code, 535);
    assert_eq!(code(&mut s, "AUTH CRAM-MD5"), 504);
    assert_eq!(code(&mut s, "AUTH PLAIN"), 334);
    assert_eq!(code(&mut s, "*"), 501);
}

#[test]
fn bdat_chunks_and_refusals() {
    let mut s = Session::new(cfg(), peer(true));
    code(&mut s, "EHLO c");
    // BDAT without a transaction: the chunk is still read, then refused.
    assert!(matches!(
        s.on_line(b"BDAT 3 LAST\r\n"),
        Step::ReadChunk { size: 3 }
    ));
    s.chunk_feed(b"abc");
    assert_eq!(reply(s.chunk_end(QueueId::generate(), now())).code, 503);
    code(&mut s, "MAIL FROM:<a@c.test>");
    code(&mut s, "RCPT TO:<b@d.test>");
    assert!(matches!(
        s.on_line(b"BDAT 9\r\n"),
        Step::ReadChunk { size: 9 }
    ));
    s.chunk_feed(b"A: b\r\n\r\nx");
    assert_eq!(reply(s.chunk_end(QueueId::generate(), now())).code, 250);
    assert_eq!(
        code(&mut s, "MAIL FROM:<a@c.test>"),
        503,
        "only BDAT may follow BDAT"
    );
    code(&mut s, "MAIL FROM:<a@c.test>");
    code(&mut s, "RCPT TO:<b@d.test>");
    assert!(matches!(s.on_line(b"BDAT 6\r\n"), Step::ReadChunk { .. }));
    s.chunk_feed(b"A: b\r\n");
    s.chunk_end(QueueId::generate(), now());
    assert!(matches!(
        s.on_line(b"BDAT 3 LAST\r\n"),
        Step::ReadChunk { .. }
    ));
    s.chunk_feed(b"\r\nz");
    let Step::Enqueue(msg) = s.chunk_end(QueueId::generate(), now()) else {
        panic!()
    };
    assert!(msg.body.ends_with(b"A: b\r\n\r\nz"));
    assert!(
        matches!(s.on_line(b"BDAT 99999 LAST\r\n"), Step::Close(_)),
        "oversized chunk"
    );
}

#[test]
fn smtputf8_addresses_need_the_parameter() {
    let mut s = Session::new(cfg(), peer(true));
    code(&mut s, "EHLO c");
    assert_eq!(code(&mut s, "MAIL FROM:<用户@例子.测试>"), 553);
    assert_eq!(code(&mut s, "MAIL FROM:<用户@例子.测试> SMTPUTF8"), 250);
    assert_eq!(
        code(
            &mut s,
            "RCPT TO:<收件人@例子.测试> ORCPT=utf-8;收件人@例子.测试"
        ),
        250
    );
    assert_eq!(
        code(&mut s, "RCPT TO:<x@例子.测试> ORCPT=utf-8;bad+plus"),
        501
    );
    let Step::Enqueue(msg) = send_data(&mut s, "Subject: 你好\r\n\r\nx\r\n.\r\n".as_bytes())
    else {
        panic!()
    };
    assert!(msg.envelope.mail.smtputf8);
    assert!(
        String::from_utf8(msg.body)
            .unwrap()
            .contains("with UTF8SMTP id")
    );
}

#[test]
fn vrfy_expn_help_noop_quit() {
    let mut s = Session::new(cfg(), peer(true));
    assert_eq!(code(&mut s, "VRFY root"), 252);
    assert_eq!(code(&mut s, "EXPN staff"), 502);
    assert_eq!(code(&mut s, "HELP"), 214);
    assert_eq!(code(&mut s, "NOOP"), 250);
    assert!(matches!(s.on_line(b"QUIT\r\n"), Step::Close(r) if r.code == 221));
    assert!(matches!(s.on_line(b"GET / HTTP/1.1\r\n"), Step::Close(_)));
}

#[test]
fn message_limit_per_session() {
    let mut s = Session::new(cfg(), peer(true));
    code(&mut s, "EHLO c");
    for _ in 0..2 {
        code(&mut s, "MAIL FROM:<a@c.test>");
        code(&mut s, "RCPT TO:<b@d.test>");
        let Step::Enqueue(m) = send_data(&mut s, b"x\r\n.\r\n") else {
            panic!()
        };
        s.enqueue_result(&m.envelope.id, Ok(()));
    }
    assert!(matches!(s.on_line(b"MAIL FROM:<a@c.test>\r\n"), Step::Close(r) if r.code == 421));
}

#[test]
fn failed_queue_write_is_a_tempfail_naming_the_store_problem_and_session_stays_usable() {
    use super::StoreFailure;
    let mut s = Session::new(cfg(), peer(true));
    code(&mut s, "EHLO c");
    for (failure, enhanced, text) in [
        (StoreFailure::Full, (4, 3, 1), "queue store (redis) full"),
        (
            StoreFailure::Unavailable,
            (4, 3, 0),
            "queue store (redis) unavailable",
        ),
        (
            StoreFailure::Timeout,
            (4, 3, 0),
            "queue store (redis) did not answer in time",
        ),
        (
            StoreFailure::Unreplicated,
            (4, 3, 0),
            "queue store (redis) replicas did not confirm the write in time",
        ),
    ] {
        code(&mut s, "MAIL FROM:<a@c.test>");
        code(&mut s, "RCPT TO:<b@d.test>");
        let Step::Enqueue(m) = send_data(&mut s, b"x\r\n.\r\n") else {
            panic!()
        };
        let r = s.enqueue_result(&m.envelope.id, Err(failure));
        let (a, b, c) = enhanced;
        assert_eq!(
            (r.code, r.enhanced),
            (451, Some(super::super::reply::Enhanced(a, b, c))),
            "{failure:?}"
        );
        let line = r.to_string();
        assert!(line.contains(text), "{failure:?}: {line}");
        assert!(!line.contains("file"), "{failure:?}: {line}");
    }
    assert_eq!(code(&mut s, "MAIL FROM:<a@c.test>"), 250);
}

/// Random command lines never panic the state machine.
#[test]
fn random_lines_do_not_panic() {
    let words: [&[u8]; 16] = [
        b"EHLO x",
        b"MAIL FROM:<a@b.c>",
        b"RCPT TO:<d@e.f>",
        b"DATA",
        b"BDAT 5",
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"STARTTLS",
        b"RSET",
        b"\xff\xfe",
        b"<>",
        b"=",
        b"*",
        b"\r",
        b"\n",
        b"\0",
    ];
    for seed in 0..2000u64 {
        let mut s = Session::new(cfg(), peer(seed % 2 == 0));
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for _ in 0..20 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut line = words[(x >> 33) as usize % words.len()].to_vec();
            if x & 1 == 0 {
                line.extend_from_slice(words[(x >> 40) as usize % words.len()]);
            }
            line.extend_from_slice(b"\r\n");
            match s.on_line(&line) {
                Step::Close(_) => break,
                Step::ReadData(_) => {
                    let _ = s.data_feed(b"x\r\n.\r\n");
                    let _ = s.data_end(QueueId::generate(), now());
                }
                Step::ReadChunk { .. } => {
                    s.chunk_feed(b"abc");
                    let _ = s.chunk_end(QueueId::generate(), now());
                }
                _ => {}
            }
        }
    }
}

/// A policy that refuses sender `full@…` at MAIL, recipient `later@…` at RCPT, and
/// every message whose sender is `data@…` when asked before queueing.
#[derive(Debug)]
struct FakeQuota;

impl IngressPolicy for FakeQuota {
    fn at_mail(&self, f: &IngressFacts, _size: Option<u64>) -> Option<Refusal> {
        f.sender.starts_with("full@").then(|| Refusal {
            reply: r(451, (4, 7, 1), "Sending quota q exceeded"),
            reason: "quota_exceeded",
            quota: Some("q".into()),
        })
    }
    fn at_rcpt(&self, f: &IngressFacts, accepted: &[&str], new: &str) -> Option<Refusal> {
        assert_eq!(f.client_ip, "192.0.2.7".parse::<IpAddr>().unwrap());
        (new.starts_with("later@") && !accepted.is_empty()).then(|| Refusal {
            reply: r(452, (4, 5, 3), "Too many recipients for sending quota q"),
            reason: "quota_recipients",
            quota: Some("q".into()),
        })
    }
    fn check_before_queueing(&self) -> bool {
        true
    }
}

#[test]
fn quota_checks_at_mail_rcpt_and_before_queueing() {
    let mut s = Session::new(cfg(), peer(true));
    s.set_ingress_policy(Arc::new(FakeQuota));
    assert_eq!(code(&mut s, "EHLO c.test"), 250);
    // Refused at MAIL: a temporary answer, not a protocol error, no transaction.
    for _ in 0..10 {
        assert_eq!(code(&mut s, "MAIL FROM:<full@a.test>"), 451);
        assert_eq!(s.take_rejection(), Some("quota_exceeded"));
    }
    assert_eq!(code(&mut s, "RCPT TO:<x@b.test>"), 503);
    assert_eq!(code(&mut s, "MAIL FROM:<data@a.test>"), 250);
    assert_eq!(
        code(&mut s, "RCPT TO:<later@b.test>"),
        250,
        "the first one fits"
    );
    assert_eq!(code(&mut s, "RCPT TO:<later@c.test>"), 452);
    assert_eq!(s.take_rejection(), Some("quota_recipients"));
    assert_eq!(code(&mut s, "RCPT TO:<y@b.test>"), 250);
    let Step::CheckQuota(msg) = send_data(&mut s, b"x\r\n.\r\n") else {
        panic!("the message must be checked before it is queued");
    };
    let recipients: Vec<&str> = msg
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(recipients, ["later@b.test", "y@b.test"]);
    let refusal = FakeQuota.at_mail(
        &IngressFacts {
            sender: "full@x",
            auth_user: None,
            client_ip: "192.0.2.7".parse().unwrap(),
        },
        None,
    );
    let step = s.quota_result(msg, refusal);
    assert_eq!(reply(step).code, 451);
    assert_eq!(s.take_rejection(), Some("quota_exceeded"));
    // The transaction is over; the next one goes through to the queue.
    assert_eq!(code(&mut s, "RCPT TO:<y@b.test>"), 503);
    assert_eq!(code(&mut s, "MAIL FROM:<ok@a.test>"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<y@b.test>"), 250);
    let Step::CheckQuota(msg) = send_data(&mut s, b"x\r\n.\r\n") else {
        panic!()
    };
    let Step::Enqueue(msg) = s.quota_result(msg, None) else {
        panic!("an allowed message is queued")
    };
    assert_eq!(s.enqueue_result(&msg.envelope.id, Ok(())).code, 250);
}

#[test]
fn bare_postmaster_is_the_relays_own_and_reachable_from_anywhere() {
    for relay_allowed in [true, false] {
        let mut s = Session::new(cfg(), peer(relay_allowed));
        code(&mut s, "EHLO c");
        assert_eq!(code(&mut s, "MAIL FROM:<a@c.test>"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<Postmaster>"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<POSTMASTER@Relay.Test>"), 250);
        // Other local parts without a domain stay malformed, and relaying stays closed.
        assert_eq!(code(&mut s, "RCPT TO:<abuse>"), 501);
        if !relay_allowed {
            assert_eq!(code(&mut s, "RCPT TO:<postmaster@d.test>"), 554);
        }
        let Step::Enqueue(m) = send_data(&mut s, b"Subject: x\r\n\r\nhi\r\n.\r\n") else {
            panic!("expected the message to be queued");
        };
        let rcpts: Vec<&str> = m
            .envelope
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        assert_eq!(rcpts, ["postmaster@relay.test"], "duplicates folded");
    }
}

#[test]
fn sender_binding_refuses_at_mail_and_after_data_or_bdat() {
    use crate::sender::SenderBinding;
    let policy = SenderPolicy::new(&SenderBinding {
        required: false,
        check_from_header: true,
        users: Default::default(),
        networks: vec![("192.0.2.0/24".parse().unwrap(), vec!["c.example".into()])],
    });
    let mut s = Session::new(cfg(), peer(true));
    s.set_sender_policy(Arc::new(policy));
    assert_eq!(code(&mut s, "EHLO client.test"), 250);
    let refused = reply(s.on_line(b"MAIL FROM:<x@b.example>\r\n"));
    assert_eq!(
        (refused.code, refused.enhanced),
        (550, Some(super::super::reply::Enhanced(5, 7, 1)))
    );
    assert!(
        refused.lines[0].contains("network 192.0.2.0/24"),
        "{refused}"
    );
    assert_eq!(s.take_rejection(), Some("sender_not_allowed"));
    let r = s.take_sender_refusal().unwrap();
    assert_eq!((r.stage, r.sender.as_str()), ("mail_from", "x@b.example"));
    assert!(!s.in_transaction());

    // The envelope passes but the header does not: refused, nothing to enqueue.
    assert_eq!(code(&mut s, "MAIL FROM:<x@c.example>"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<r@dest.test>"), 250);
    let step = send_data(&mut s, b"From: x@b.example\r\n\r\nhi\r\n.\r\n");
    assert_eq!(reply(step).code, 550);
    assert_eq!(s.take_sender_refusal().unwrap().stage, "from_header");
    assert!(!s.in_transaction());

    // BDAT ends the same way.
    assert_eq!(code(&mut s, "MAIL FROM:<x@c.example>"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<r@dest.test>"), 250);
    let chunk = b"From: Y <y@b.example>\r\n\r\nhi\r\n";
    let step = s.on_line(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
    assert!(matches!(step, Step::ReadChunk { .. }), "{step:?}");
    s.chunk_feed(chunk);
    assert_eq!(reply(s.chunk_end(QueueId::generate(), now())).code, 550);

    // A matching header is queued as usual.
    assert_eq!(code(&mut s, "MAIL FROM:<x@c.example>"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<r@dest.test>"), 250);
    let step = send_data(&mut s, b"From: X <x@c.example>\r\n\r\nhi\r\n.\r\n");
    assert!(matches!(step, Step::Enqueue(_)), "{step:?}");
}

#[test]
fn the_embedded_store_is_named_in_its_451() {
    let mut s = Session::new(
        SessionConfig {
            queue_store: "embedded",
            ..cfg()
        },
        peer(true),
    );
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@c.test>");
    code(&mut s, "RCPT TO:<b@d.test>");
    let Step::Enqueue(m) = send_data(&mut s, b"x\r\n.\r\n") else {
        panic!()
    };
    let r = s.enqueue_result(&m.envelope.id, Err(StoreFailure::Unavailable));
    assert_eq!(
        r.to_string().trim_end(),
        "451 4.3.0 Error: queue store (embedded) unavailable, try again later"
    );
}

#[test]
fn requiretls_is_offered_and_accepted_only_over_tls() {
    // RFC 8689 §4.1: not offered, and refused with 5.7.10, in plain text.
    let mut s = Session::new(cfg(), peer(true));
    let ehlo = reply(s.on_line(b"EHLO c\r\n")).lines.join(" ");
    assert!(!ehlo.contains("REQUIRETLS"), "{ehlo}");
    let refused = reply(s.on_line(b"MAIL FROM:<a@client.test> REQUIRETLS\r\n"));
    assert_eq!(refused.code, 530);
    assert!(refused.to_string().contains("5.7.10"), "{refused}");

    let mut p = peer(true);
    p.tls = Some(TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "X".into(),
    });
    let mut s = Session::new(cfg(), p);
    let ehlo = reply(s.on_line(b"EHLO c\r\n")).lines.join(" ");
    assert!(ehlo.contains("REQUIRETLS"), "{ehlo}");
    assert_eq!(code(&mut s, "MAIL FROM:<a@client.test> REQUIRETLS=1"), 555);
    assert_eq!(code(&mut s, "MAIL FROM:<a@client.test> REQUIRETLS"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<b@d.test>"), 250);
    let Step::Enqueue(msg) = send_data(&mut s, b"x\r\n.\r\n") else {
        panic!()
    };
    assert!(msg.envelope.mail.requiretls);
}

#[test]
fn received_header_ipv4_matches_display() {
    for ip in [
        "0.0.0.0",
        "192.0.2.7",
        "10.20.100.255",
        "255.255.255.255",
        "1.9.99.100",
    ] {
        let ip: std::net::Ipv4Addr = ip.parse().unwrap();
        let mut s = String::new();
        super::push_ipv4(&mut s, ip);
        assert_eq!(s, ip.to_string());
        assert_eq!(super::ip_text(IpAddr::V4(ip)), ip.to_string());
    }
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    assert_eq!(super::ip_text(v6), v6.to_string());
}
