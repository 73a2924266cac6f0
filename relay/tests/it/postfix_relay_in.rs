//! A real Postfix, configured to relay everything to mailrelay as its smarthost,
//! forwards mail that clients hand to it: the way most existing mail systems would
//! feed a relay.
//!
//! Each test runs a private Postfix instance (`support::postfix`). Timing on two
//! cores: about 2.5 s per test, 7 to 11 s for the file depending on the machine's load.

use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use mailrelay::queue::{BodyType, QueuedMessage};
use support::postfix::{Postfix, run, tool};
use support::relay::{Relay, RelayOptions};

fn metric(relay: &Relay, name: &str) -> Option<u64> {
    let (status, text) = relay.admin_get("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The message swaks hands to Postfix. Even ones are 8-bit MIME; every one has a
/// line that is only "." and one that starts with a dot, which both hops stuff.
fn message(i: usize, to: &str) -> Vec<u8> {
    let mut m = format!(
        "From: Sender <sender@swaks.test>\r\n\
         To: {to}\r\n\
         Subject: through postfix {i}\r\n\
         Date: Sun, 29 Nov 2026 10:00:{i:02} +0000\r\n\
         Message-ID: <pf-{i}@swaks.test>\r\n"
    );
    if i.is_multiple_of(2) {
        m.push_str(
            "MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n\
             Grüße {i} — 日本語\r\n",
        );
    } else {
        m.push_str("\r\nplain ascii\r\n");
    }
    m.push_str(".\r\n.leading dot\r\nlast line");
    m.into_bytes()
}

#[test]
fn postfix_relays_20_messages_into_mailrelay() {
    const N: usize = 20;
    let mut relay = Relay::start(RelayOptions::default());
    let pf = Postfix::start(relay.smtp.port());
    let swaks = tool("swaks");

    let mut expected = Vec::new();
    for i in 0..N {
        // The first message has two recipients: Postfix must deliver both in one go.
        let to: Vec<String> = if i == 0 {
            vec!["a0@dest.test".into(), "b0@other.test".into()]
        } else {
            vec![format!("r{i}@dest.test")]
        };
        let file = pf.dir.path().join(format!("msg{i}.eml"));
        let content = message(i, &to.join(", "));
        std::fs::write(&file, &content).unwrap();
        let r = run(
            Command::new(&swaks)
                .args(["--server", &format!("127.0.0.1:{}", pf.port)])
                .args(["--helo", "swaks.client.test"])
                .args(["--from", "sender@swaks.test"])
                .args(["--to", &to.join(",")])
                .arg("--data")
                .arg(format!("@{}", file.display())),
            Duration::from_secs(30),
        );
        assert!(r.status.success(), "swaks into Postfix: {}", r.text());
        // swaks ends the last line itself.
        expected.push((to, [content.as_slice(), b"\r\n"].concat()));
    }

    // Postfix logs a delivery just after mailrelay's `250`, so wait for both.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&relay, "mailrelay_smtp_messages_accepted_total") != Some(N as u64)
        || pf.maillog().matches(" status=sent ").count() < N + 1
    {
        assert!(
            Instant::now() < deadline,
            "mailrelay accepted {:?} of {N} messages\n--- postfix queue ---\n{}\n--- maillog ---\n{}",
            metric(&relay, "mailrelay_smtp_messages_accepted_total"),
            pf.queue_listing(),
            pf.maillog()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let maillog = pf.maillog();
    let mut sent_ids: Vec<String> = maillog
        .lines()
        .filter(|l| l.contains(" status=sent "))
        .filter_map(|l| {
            let i = l.find("queued as ")? + "queued as ".len();
            Some(l[i..].chars().take(20).collect())
        })
        .collect();
    // One line per recipient (N + 1), one mailrelay queue id per message.
    assert_eq!(sent_ids.len(), N + 1, "{maillog}");
    sent_ids.dedup();
    assert_eq!(sent_ids.len(), N, "{maillog}");
    // ("lost connection after CONNECT" is our own readiness probe of Postfix.)
    for bad in ["status=deferred", "status=bounced", "lost connection with"] {
        assert!(!maillog.contains(bad), "Postfix logged {bad:?}:\n{maillog}");
    }
    // The client side that talked to mailrelay complained about nothing. (Other
    // daemons' warnings depend on the machine, e.g. its host name.)
    assert!(
        !maillog
            .lines()
            .any(|l| l.contains("postfix/smtp[") && l.contains("warning:")),
        "{maillog}"
    );

    assert!(relay.stop().success());
    drop(pf);
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), N);
    for id in &sent_ids {
        assert!(
            msgs.iter().any(|m| m.envelope.id.as_str() == id),
            "Postfix got `queued as {id}`, but it is not in the queue"
        );
    }
    for (i, (to, content)) in expected.iter().enumerate() {
        let needle = format!("\r\nMessage-ID: <pf-{i}@swaks.test>\r\n");
        let found: Vec<&QueuedMessage> = msgs
            .iter()
            .filter(|m| lossy(&m.body).contains(&needle))
            .collect();
        assert_eq!(found.len(), 1, "message {i} stored {} times", found.len());
        check_relayed(found[0], i, to, content);
    }
}

/// The stored body must be our Received header, Postfix's, then exactly what swaks
/// gave Postfix.
fn check_relayed(m: &QueuedMessage, i: usize, to: &[String], content: &[u8]) {
    assert!(
        m.body.ends_with(content),
        "message {i}: original content not intact\n--- stored ---\n{}\n--- sent to Postfix ---\n{}",
        lossy(&m.body),
        lossy(content)
    );
    let head = lossy(&m.body[..m.body.len() - content.len()]);
    let received: Vec<&str> = head.split("Received: ").filter(|s| !s.is_empty()).collect();
    assert!(head.starts_with("Received: "), "{head}");
    assert_eq!(received.len(), 2, "message {i}: two trace headers\n{head}");
    let (ours, theirs) = (received[0], received[1]);
    assert!(
        ours.starts_with(
            "from pf.test ([127.0.0.1])\r\n\tby relay.test (mailrelay) with ESMTP id "
        ),
        "{head}"
    );
    assert!(
        theirs.starts_with(
            "from swaks.client.test (unknown [127.0.0.1])\r\n\tby pf.test (Postfix) with ESMTP id "
        ),
        "{head}"
    );
    // The message has Date and Message-ID: neither hop may add its own.
    assert!(
        !head.contains("\r\nDate: ") && !head.contains("Message-ID"),
        "{head}"
    );

    let e = &m.envelope;
    assert_eq!(e.mail.from, "sender@swaks.test");
    let rcpts: Vec<&str> = e.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, to, "message {i}");
    assert_eq!(e.client.helo, "pf.test");
    assert_eq!(e.client.ip.to_string(), "127.0.0.1");
    // Postfix declares the size (RFC 1870) and, for 8-bit MIME content, BODY=8BITMIME.
    assert!(e.mail.size.is_some(), "{e:?}");
    let body = if i.is_multiple_of(2) {
        BodyType::EightBitMime
    } else {
        BodyType::SevenBit
    };
    assert_eq!(e.mail.body, body, "message {i}");
}

/// What Postfix forwards that swaks cannot originate: an SMTPUTF8 message and the
/// DSN parameters (RET, ENVID, NOTIFY, ORCPT), both from Python's smtplib.
const PY_INTO_POSTFIX: &str = r#"
import smtplib, sys
from email.message import EmailMessage

s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='py.client.test', timeout=20)
m = EmailMessage()
m['From'] = 'Jörg <jörg@exämple.test>'
m['To'] = '用户@例子.广告'
m['Subject'] = 'Grüße über Postfix'
m['Message-ID'] = '<pf-utf8@py.test>'
m.set_content('Grüße aus Köln\n')
assert s.send_message(m) == {}
dsn = (b'Subject: dsn via postfix\r\nMessage-ID: <pf-dsn@py.test>\r\n'
       b'Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nnotify me\r\n')
assert s.sendmail('bounces@py.test', ['dsn@dest.test'], dsn,
                  mail_options=['RET=HDRS', 'ENVID=pf-envid-1'],
                  rcpt_options=['NOTIFY=SUCCESS,FAILURE', 'ORCPT=rfc822;original@dest.test']) == {}
s.quit()
"#;

#[test]
fn postfix_forwards_smtputf8_and_dsn_parameters() {
    let mut relay = Relay::start(RelayOptions::default());
    let pf = Postfix::start(relay.smtp.port());
    let script = pf.dir.path().join("client.py");
    std::fs::write(&script, PY_INTO_POSTFIX).unwrap();
    let r = run(
        Command::new(tool("python3"))
            .arg(&script)
            .arg(pf.port.to_string()),
        Duration::from_secs(30),
    );
    assert!(r.status.success(), "python into Postfix: {}", r.text());

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = pf.maillog();
        let done = log.matches(" status=").count();
        if done >= 2 {
            assert_eq!(
                log.matches(" status=sent ").count(),
                2,
                "Postfix could not relay both messages to mailrelay:\n{log}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Postfix did not finish\n--- postfix queue ---\n{}\n--- maillog ---\n{log}",
            pf.queue_listing()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(relay.stop().success());
    drop(pf);
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 2);

    let find = |needle: &str| {
        msgs.iter()
            .find(|m| lossy(&m.body).contains(needle))
            .unwrap_or_else(|| panic!("no stored message contains {needle:?}"))
    };
    let utf8 = find("Message-ID: <pf-utf8@py.test>");
    let e = &utf8.envelope;
    assert!(e.mail.smtputf8, "{e:?}");
    assert_eq!(e.mail.body, BodyType::EightBitMime, "{e:?}");
    assert_eq!(e.mail.from, "jörg@exämple.test");
    assert_eq!(e.recipients.len(), 1);
    assert_eq!(e.recipients[0].address, "用户@例子.广告");
    let body = lossy(&utf8.body);
    assert!(body.contains(" with UTF8SMTP id "), "{body}");
    assert!(body.contains("\r\nTo: 用户@例子.广告\r\n"), "{body}");
    assert!(body.ends_with("\r\n\r\nGrüße aus Köln\r\n"), "{body}");

    let dsn = find("Message-ID: <pf-dsn@py.test>");
    let e = &dsn.envelope;
    assert_eq!(e.mail.from, "bounces@py.test");
    assert_eq!(e.mail.ret, Some(mailrelay::queue::DsnRet::Hdrs), "{e:?}");
    assert_eq!(e.mail.envid.as_deref(), Some("pf-envid-1"), "{e:?}");
    let rcpt = &e.recipients[0];
    assert_eq!(rcpt.address, "dsn@dest.test");
    assert_eq!(rcpt.orcpt.as_deref(), Some("rfc822;original@dest.test"));
    let notify = rcpt.notify.as_ref().expect("NOTIFY forwarded");
    assert!(notify.success && notify.failure && !notify.delay && !notify.never);
    assert!(lossy(&dsn.body).ends_with("\r\n\r\nnotify me\r\n"));
}

/// Postfix's usual way into a relay that does not trust its network: STARTTLS, then
/// SASL AUTH with a password from `smtp_sasl_password_maps` (Cyrus SASL client).
#[test]
fn postfix_relays_over_starttls_with_sasl_auth() {
    const N: usize = 3;
    let mut relay = Relay::start(RelayOptions {
        tls: true,
        auth_users: Some("alice:s3cret\n".into()),
        // Loopback is outside these: without AUTH, Postfix would be refused.
        relay_networks: Some(vec!["10.99.0.0/16".into()]),
        ..RelayOptions::default()
    });
    let pf = Postfix::start_with(
        relay.smtp.port(),
        "smtp_tls_security_level = encrypt
smtp_tls_loglevel = 1
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = static:alice:s3cret
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
",
    );
    let swaks = tool("swaks");
    let mut expected = Vec::new();
    for i in 0..N {
        let to = format!("tls{i}@dest.test");
        let file = pf.dir.path().join(format!("msg{i}.eml"));
        let content = message(i + 1, &to);
        std::fs::write(&file, &content).unwrap();
        let r = run(
            Command::new(&swaks)
                .args(["--server", &format!("127.0.0.1:{}", pf.port)])
                .args(["--helo", "swaks.client.test"])
                .args(["--from", "sender@swaks.test", "--to", &to])
                .arg("--data")
                .arg(format!("@{}", file.display())),
            Duration::from_secs(30),
        );
        assert!(r.status.success(), "swaks into Postfix: {}", r.text());
        expected.push((vec![to], [content.as_slice(), b"\r\n"].concat()));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = pf.maillog();
        if log.matches(" status=").count() >= N {
            assert_eq!(log.matches(" status=sent ").count(), N, "{log}");
            assert!(
                log.contains("TLS connection established to 127.0.0.1[127.0.0.1]"),
                "{log}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Postfix did not finish\n--- postfix queue ---\n{}\n--- maillog ---\n{log}",
            pf.queue_listing()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(relay.stop().success());
    drop(pf);
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), N);
    for (i, (to, content)) in expected.iter().enumerate() {
        let m = msgs
            .iter()
            .find(|m| m.body.ends_with(content))
            .unwrap_or_else(|| panic!("message {i} not stored intact"));
        let c = &m.envelope.client;
        assert_eq!(c.auth_user.as_deref(), Some("alice"), "{c:?}");
        let tls = c.tls.as_ref().expect("TLS info stored");
        assert!(tls.version.starts_with("TLSv1."), "{tls:?}");
        assert_eq!(c.helo, "pf.test");
        let rcpts: Vec<&str> = m
            .envelope
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        assert_eq!(rcpts, *to);
        let head = lossy(&m.body[..m.body.len() - content.len()]);
        assert!(
            head.starts_with(&format!(
                "Received: from pf.test ([127.0.0.1])\r\n\t(using {} with cipher {})\r\n\tby relay.test (mailrelay) with ESMTPSA id ",
                tls.version, tls.cipher
            )),
            "{head}"
        );
        assert_eq!(head.matches("Received: ").count(), 2, "{head}");
    }
}
