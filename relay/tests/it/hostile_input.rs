//! Hostile and broken SMTP clients against the real `mailrelay` binary: exact bytes
//! on the wire, the exact reply codes back, and afterwards a look into the queue to
//! prove that nothing was stored that should not have been, and that legitimate
//! mail sent alongside the attack is stored byte for byte.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use mailrelay::queue::QueuedMessage;
use support::relay::{Relay, RelayOptions, SmtpConn, TlsSmtpConn, code};

// ---------------------------------------------------------------------------------
// Helpers

/// Asserts a single reply with `want` and, when given, that enhanced status code.
#[track_caller]
fn expect(reply: &str, want: u16, enhanced: Option<&str>) {
    assert_eq!(code(reply), want, "expected {want}, got {reply:?}");
    assert!(
        reply.ends_with("\r\n") && reply.len() > 4,
        "incomplete reply {reply:?}"
    );
    if let Some(e) = enhanced {
        for line in reply.lines() {
            assert!(
                line[4..].starts_with(&format!("{e} ")),
                "expected {want} {e}, got {reply:?}"
            );
        }
    }
}

/// A message whose own `Date:` and `Message-ID:` keep the relay from adding any, so
/// the stored body must be exactly one `Received:` header followed by these octets.
fn content(tag: &str) -> Vec<u8> {
    format!(
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{tag}@client.test>\r\n\
         From: <sender@client.test>\r\nSubject: {tag}\r\n\r\nbody of {tag}\r\n"
    )
    .into_bytes()
}

/// Like [`content`], padded with text lines to exactly `n` octets.
fn sized_content(tag: &str, n: usize) -> Vec<u8> {
    let mut v = format!(
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{tag}@client.test>\r\n\
         Subject: {tag}\r\n\r\n"
    )
    .into_bytes();
    assert!(v.len() + 3 <= n, "{n} octets is too small");
    while n - v.len() > 80 {
        v.extend_from_slice(&[b'z'; 76]);
        v.extend_from_slice(b"\r\n");
    }
    let last = n - v.len();
    v.extend(std::iter::repeat_n(b'z', last - 2));
    v.extend_from_slice(b"\r\n");
    assert_eq!(v.len(), n);
    v
}

/// The queue id at the end of `250 2.0.0 Ok: queued as ID`.
fn queue_id(reply: &str) -> String {
    reply
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// One complete DATA transaction; returns the queue id from the `250`.
#[track_caller]
fn send_message(c: &mut SmtpConn, from: &str, rcpts: &[&str], body: &[u8]) -> String {
    expect(&c.cmd(&format!("MAIL FROM:<{from}>")), 250, Some("2.1.0"));
    for r in rcpts {
        expect(&c.cmd(&format!("RCPT TO:<{r}>")), 250, Some("2.1.5"));
    }
    expect(&c.cmd("DATA"), 354, None);
    c.send(body);
    c.send(b".\r\n");
    let r = c.reply();
    expect(&r, 250, Some("2.0.0"));
    queue_id(&r)
}

/// Finds message `id` and checks that its body is our `Received:` header and then
/// exactly `sent`.
#[track_caller]
fn assert_stored<'a>(msgs: &'a [QueuedMessage], id: &str, sent: &[u8]) -> &'a QueuedMessage {
    let m = msgs
        .iter()
        .find(|m| m.envelope.id.as_str() == id)
        .unwrap_or_else(|| panic!("message {id} (answered 250) is not in the queue"));
    let head_len = m
        .body
        .len()
        .checked_sub(sent.len())
        .unwrap_or_else(|| panic!("stored body of {id} is shorter than what was sent"));
    assert_eq!(
        String::from_utf8_lossy(&m.body[head_len..]),
        String::from_utf8_lossy(sent),
        "stored content of {id} differs from what was sent"
    );
    let head = std::str::from_utf8(&m.body[..head_len]).unwrap();
    assert!(
        head.starts_with("Received: ")
            && head.ends_with("\r\n")
            && head.matches("Received: ").count() == 1
            && head
                .trim_end()
                .split("\r\n")
                .all(|l| l.starts_with("Received: ") || l.starts_with('\t')),
        "only our Received: header may precede the content: {head:?}"
    );
    m
}

#[track_caller]
fn assert_nothing_queued(relay: &mut Relay) {
    assert!(relay.stop().success(), "relay did not exit cleanly");
    let msgs = relay.queued_messages();
    assert!(msgs.is_empty(), "nothing may be queued, found {msgs:#?}");
}

fn ehlo(c: &mut SmtpConn) {
    expect(&c.cmd("EHLO client.test"), 250, None);
}

// ---------------------------------------------------------------------------------
// SMTP smuggling

/// A complete second transaction hidden behind a fake end of data. It ends with
/// the real `<CR><LF>.<CR><LF>` appended by the test.
const SMUGGLED: &[u8] = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n\
From: <ceo@bank.test>\r\nSubject: smuggled\r\n\r\nsmuggled payload";

/// End-of-data look-alikes that some SMTP implementation somewhere accepts.
const FAKE_ENDS: &[(&str, &[u8])] = &[
    ("<LF>.<LF>", b"\n.\n"),
    ("<CR>.<CR>", b"\r.\r"),
    ("<LF>.<CR><LF>", b"\n.\r\n"),
    ("<CR><LF>.<LF>", b"\r\n.\n"),
    ("<CR><LF>.<CR>", b"\r\n.\r"),
    ("<CR>.<CR><LF>", b"\r.\r\n"),
    ("<LF>.", b"\n."),
];

#[test]
fn smuggling_behind_fake_end_of_data_is_refused_and_not_executed() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut legit = Vec::new();
    for (name, fake) in FAKE_ENDS {
        for split in [false, true] {
            let ctx = format!("{name}, {}", if split { "split" } else { "one write" });
            let mut c = relay.connect();
            c.stream().set_nodelay(true).unwrap();
            ehlo(&mut c);
            expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
            expect(&c.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
            expect(&c.cmd("DATA"), 354, None);
            let head: &[u8] = b"From: <sender@client.test>\r\nSubject: cover\r\n\r\ncover text";
            let end: &[u8] = b"\r\n.\r\n";
            if split {
                // Every boundary the attacker controls lands in its own segment, so
                // the relay sees the fake end and the real end cut apart.
                let mut pieces: Vec<&[u8]> = vec![head];
                pieces.extend(fake.chunks(1));
                pieces.push(SMUGGLED);
                pieces.extend(end.chunks(1));
                for p in pieces {
                    c.send(p);
                    sleep(Duration::from_millis(15));
                }
            } else {
                c.send(&[head, fake, SMUGGLED, end].concat());
            }
            let r = c.reply();
            assert_eq!(code(&r), 550, "{ctx}: {r:?}");
            expect(&r, 550, Some("5.5.2"));
            // Had the smuggled MAIL/RCPT/DATA run, their replies would come first.
            let r = c.cmd("VRFY postmaster");
            assert_eq!(code(&r), 252, "{ctx}: stray reply {r:?}");
            let stray = c.arrived_within(Duration::from_millis(100));
            assert!(
                stray.is_empty(),
                "{ctx}: stray output {:?}",
                String::from_utf8_lossy(&stray)
            );
            let body = content(&format!("legit-{}", legit.len()));
            let id = send_message(&mut c, "sender@client.test", &["rcpt@dest.test"], &body);
            legit.push((id, body));
            expect(&c.cmd("QUIT"), 221, None);
            assert!(c.is_closed(), "{ctx}");
        }
    }
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    for (id, body) in &legit {
        let m = assert_stored(&msgs, id, body);
        assert_eq!(m.envelope.mail.from, "sender@client.test");
    }
    assert_eq!(msgs.len(), legit.len(), "unexpected messages: {msgs:#?}");
    for m in &msgs {
        assert!(
            !m.body.windows(8).any(|w| w == b"smuggled"),
            "smuggled content queued: {m:#?}"
        );
    }
}

#[test]
fn bare_line_endings_in_bdat_chunks_are_refused() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    ehlo(&mut c);
    // No terminator to fake in BDAT, but a bare LF still poisons the message, so
    // it is never relayed to a server that would split it.
    for chunk in [
        [
            b"Subject: x\r\n\r\ncover\n.\n".as_slice(),
            SMUGGLED,
            b"\r\n",
        ]
        .concat(),
        [
            b"Subject: x\r\n\r\ncover\r.\r".as_slice(),
            SMUGGLED,
            b"\r\n",
        ]
        .concat(),
        b"Subject: x\r\n\r\nends in a bare CR\r".to_vec(),
    ] {
        expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
        expect(&c.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
        c.send(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
        c.send(&chunk);
        expect(&c.reply(), 550, Some("5.5.2"));
    }
    // A chunk without a transaction is read and refused once; its octets are never
    // taken for commands.
    c.send(b"BDAT 14 LAST\r\nNOOP\r\nHELP\r\n\r\n");
    expect(&c.reply(), 503, Some("5.5.1"));
    expect(&c.cmd("VRFY x"), 252, None);
    assert!(c.arrived_within(Duration::from_millis(100)).is_empty());
    expect(&c.cmd("QUIT"), 221, None);
    assert_nothing_queued(&mut relay);
}

/// Value of one metric line (name with labels, exactly as exposed), if present.
fn metric(relay: &Relay, name: &str) -> Option<u64> {
    let (status, text) = relay.admin_get("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Fake ends of data hidden with NUL: a next hop that drops NUL before it looks for
/// `<CR><LF>.<CR><LF>` would split the message there.
const NUL_ENDS: &[(&str, &[u8])] = &[
    ("<CR><LF><NUL>.<CR><LF>", b"\r\n\x00.\r\n"),
    ("<CR><LF><NUL>.<NUL><CR><LF>", b"\r\n\x00.\x00\r\n"),
    ("<CR><LF>.<NUL><CR><LF>", b"\r\n.\x00\r\n"),
];

#[test]
fn nul_octets_in_data_and_bdat_are_refused_and_nothing_is_smuggled() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut legit = Vec::new();
    let head: &[u8] = b"From: <sender@client.test>\r\nSubject: cover\r\n\r\ncover text";
    for (name, fake) in NUL_ENDS {
        for bdat in [false, true] {
            let ctx = format!("{name} in {}", if bdat { "BDAT" } else { "DATA" });
            let mut c = relay.connect();
            ehlo(&mut c);
            expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
            expect(&c.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
            if bdat {
                let chunk = [head, fake, SMUGGLED, b"\r\n"].concat();
                c.send(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
                c.send(&chunk);
            } else {
                expect(&c.cmd("DATA"), 354, None);
                c.send(&[head, fake, SMUGGLED, b"\r\n.\r\n"].concat());
            }
            let r = c.reply();
            expect(&r, 550, Some("5.6.0"));
            assert!(r.contains("NUL"), "{ctx}: the reply must say why: {r:?}");
            // Had the smuggled MAIL/RCPT/DATA run, their replies would come first.
            expect(&c.cmd("VRFY postmaster"), 252, None);
            let stray = c.arrived_within(Duration::from_millis(100));
            assert!(
                stray.is_empty(),
                "{ctx}: stray output {:?}",
                String::from_utf8_lossy(&stray)
            );
            // The session stays usable: RSET and a clean transaction on it.
            expect(&c.cmd("RSET"), 250, None);
            let body = content(&format!("after-nul-{}", legit.len()));
            let id = send_message(&mut c, "sender@client.test", &["rcpt@dest.test"], &body);
            legit.push((id, body));
            expect(&c.cmd("QUIT"), 221, None);
            assert!(c.is_closed(), "{ctx}");
        }
    }
    assert_eq!(
        metric(
            &relay,
            "mailrelay_smtp_messages_rejected_total{reason=\"nul_octet\"}"
        ),
        Some(2 * NUL_ENDS.len() as u64)
    );
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(
        msgs.len(),
        legit.len(),
        "only the clean messages: {msgs:#?}"
    );
    for (id, body) in &legit {
        assert_stored(&msgs, id, body);
    }
    assert!(
        msgs.iter().all(|m| !m.body.contains(&0)
            && !String::from_utf8_lossy(&m.body).contains("smuggled")),
        "no NUL and nothing smuggled may be queued"
    );
}

/// A next hop that drops NUL octets before it looks for the end of data: the weak
/// server the NUL smuggling variants aim at. It reads SMTP, deletes every NUL from
/// what it reads, and records each message it takes (one JSON line per message).
const NUL_STRIPPING_SINK: &str = r#"
import json, socket, sys, threading

cfg = json.loads(sys.argv[1])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(16)
lock = threading.Lock()

def record(msg):
    with lock, open(cfg["out"], "a") as f:
        f.write(json.dumps(msg) + "\n")

def serve(conn):
    f = conn.makefile("rb")
    def line():
        l = f.readline()
        return l.replace(b"\x00", b"") if l else None
    conn.sendall(b"220 weak.test ESMTP\r\n")
    env = {"from": None, "to": []}
    while True:
        l = line()
        if l is None:
            return
        cmd = l.strip().upper()
        if cmd.startswith(b"EHLO") or cmd.startswith(b"HELO"):
            conn.sendall(b"250 weak.test\r\n")
        elif cmd.startswith(b"MAIL FROM:"):
            env = {"from": l.strip()[10:].decode("latin-1"), "to": []}
            conn.sendall(b"250 ok\r\n")
        elif cmd.startswith(b"RCPT TO:"):
            env["to"].append(l.strip()[8:].decode("latin-1"))
            conn.sendall(b"250 ok\r\n")
        elif cmd == b"DATA":
            conn.sendall(b"354 go\r\n")
            body = []
            while True:
                d = line()
                if d is None:
                    return
                if d == b".\r\n":
                    break
                body.append(d)
            record({"from": env["from"], "to": env["to"], "body": b"".join(body).decode("latin-1")})
            conn.sendall(b"250 queued\r\n")
        elif cmd == b"QUIT":
            conn.sendall(b"221 bye\r\n")
            return
        else:
            conn.sendall(b"250 ok\r\n")

print(srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The point of refusing NUL: a next hop that strips NUL before looking for the end
/// of data would turn `<CR><LF><NUL>.<CR><LF>` into an end of data and run the rest
/// as a second, smuggled transaction under the relay's name. Through the relay, that
/// hop receives the clean messages and nothing else.
#[test]
fn a_next_hop_that_strips_nul_receives_nothing_smuggled() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("received.jsonl");
    let (mut sink, ready) = support::start_python(
        tmp.path(),
        NUL_STRIPPING_SINK,
        &serde_json::json!({"out": out}),
    );
    let port: u16 = ready.trim().parse().expect("the sink's port");
    let mut relay = Relay::start(RelayOptions {
        extra_yaml: format!(
            "delivery:\n  smarthost: {{host: 127.0.0.1, port: {port}, tls: disabled}}\n  poll_interval: 100ms\n"
        ),
        ..RelayOptions::default()
    });
    let head: &[u8] = b"From: <sender@client.test>\r\nSubject: cover\r\n\r\ncover text";
    let mut clean = 0;
    for (name, fake) in NUL_ENDS {
        let mut c = relay.connect();
        ehlo(&mut c);
        expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
        expect(&c.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
        expect(&c.cmd("DATA"), 354, None);
        c.send(&[head, fake, SMUGGLED, b"\r\n.\r\n"].concat());
        let r = c.reply();
        expect(&r, 550, Some("5.6.0"));
        expect(&c.cmd("RSET"), 250, None);
        send_message(
            &mut c,
            "sender@client.test",
            &["rcpt@dest.test"],
            &content(&format!("clean after {name}")),
        );
        clean += 1;
        expect(&c.cmd("QUIT"), 221, None);
    }
    // Every clean message reaches the weak hop; then nothing more comes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let received = loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= clean {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "the sink got {} of {clean} messages\nrelay log:\n{}",
            lines.len(),
            relay.log()
        );
        sleep(Duration::from_millis(100));
    };
    sleep(Duration::from_millis(500));
    let again = std::fs::read_to_string(&out).unwrap().lines().count();
    assert_eq!(again, clean, "only the clean messages reach the next hop");
    for m in &received {
        assert_eq!(m["from"], "<sender@client.test>", "{m}");
        let body = m["body"].as_str().unwrap();
        assert!(
            !body.contains("smuggled") && !body.contains("evil@attacker.test"),
            "{m}"
        );
    }
    assert!(relay.stop().success());
    sink.kill().ok();
    sink.wait().ok();
}

#[test]
fn pipelined_transactions_and_dot_stuffing_round_trip_exactly() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    ehlo(&mut c);
    // Lines that start with dots, an empty line, trailing spaces and 8-bit text.
    let body: &[u8] = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <dots@client.test>\r\n\
Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n\r\ntrailing  \r\n\xc3\xa9t\xc3\xa9\r\n";
    let wire: &[u8] = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <dots@client.test>\r\n\
Subject: dots\r\n\r\n..\r\n...\r\n..leading\r\n\r\ntrailing  \r\n\xc3\xa9t\xc3\xa9\r\n.\r\n";
    // RFC 2920: everything up to DATA in one write, then the content after 354.
    c.send(
        b"MAIL FROM:<a@client.test> BODY=8BITMIME\r\nRCPT TO:<b@dest.test>\r\n\
RCPT TO:<c@dest.test>\r\nDATA\r\n",
    );
    for _ in 0..3 {
        expect(&c.reply(), 250, None);
    }
    expect(&c.reply(), 354, None);
    // Content, end of data and the next transaction in one write.
    c.send(&[wire, b"RSET\r\nNOOP\r\n"].concat());
    let r = c.reply();
    expect(&r, 250, Some("2.0.0"));
    expect(&c.reply(), 250, None);
    expect(&c.reply(), 250, None);
    expect(&c.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = assert_stored(&msgs, &queue_id(&r), body);
    assert_eq!(m.envelope.recipients.len(), 2);
}

// ---------------------------------------------------------------------------------
// Command lines

#[test]
fn bare_line_endings_in_commands_are_refused() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    ehlo(&mut c);
    c.send(b"NOOP\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    c.send(b"\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    c.send(b"MAIL FROM:<a@client.test>\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    // The refused MAIL did not start a transaction.
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 503, Some("5.5.1"));
    c.send(b"NOOP\rVRFY x\r\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    c.send(b"NOOP\r\r\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    c.send(b"NOOP\0\r\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    c.send(b"MAIL FROM:<\xff\xfe@client.test>\r\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 250, None);
    // A DATA with a bare LF must not switch to message mode: RSET is answered at once.
    c.send(b"DATA\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    expect(&c.cmd("RSET"), 250, None);
    expect(&c.cmd("VRFY x"), 252, None);
    assert!(c.arrived_within(Duration::from_millis(100)).is_empty());
    expect(&c.cmd("QUIT"), 221, None);
    assert_nothing_queued(&mut relay);
}

/// `NOOP xxx…` of exactly `octets` octets including CRLF (NOOP ignores arguments).
fn noop_line(octets: usize) -> Vec<u8> {
    let mut l = b"NOOP ".to_vec();
    l.resize(octets - 2, b'x');
    l.extend_from_slice(b"\r\n");
    l
}

#[test]
fn overlong_command_lines_are_refused_and_the_session_stays_in_sync() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    ehlo(&mut c);
    c.send(&noop_line(512));
    expect(&c.reply(), 250, None);
    c.send(&noop_line(513));
    expect(&c.reply(), 500, Some("5.5.2"));
    c.send(&noop_line(20_000));
    expect(&c.reply(), 500, Some("5.5.2"));
    // A megabyte without a line end: one refusal once it ends, then back in step.
    c.send(&vec![b'A'; 1 << 20]);
    c.send(b"\r\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    let mut mail = b"MAIL FROM:<".to_vec();
    mail.resize(600, b'a');
    mail.extend_from_slice(b"@client.test>\r\n");
    c.send(&mail);
    expect(&c.reply(), 500, Some("5.5.2"));
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 503, None);
    expect(&c.cmd("NOOP"), 250, None);
    assert!(c.arrived_within(Duration::from_millis(100)).is_empty());
    expect(&c.cmd("QUIT"), 221, None);
    assert_nothing_queued(&mut relay);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn an_endless_line_does_not_grow_memory() {
    let relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    ehlo(&mut c);
    let before = rss_kib(relay.pid());
    let chunk = vec![b'A'; 1 << 20];
    for _ in 0..64 {
        c.send(&chunk);
    }
    c.send(b"\r\n");
    expect(&c.reply(), 500, Some("5.5.2"));
    expect(&c.cmd("NOOP"), 250, None);
    let after = rss_kib(relay.pid());
    // Buffering the line would cost at least its 64 MiB.
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB while reading one 64 MiB line"
    );
}

// ---------------------------------------------------------------------------------
// Message limits

/// A text line of exactly `octets` octets including CRLF.
fn text_line(octets: usize) -> Vec<u8> {
    let mut l = vec![b'y'; octets - 2];
    l.extend_from_slice(b"\r\n");
    l
}

#[test]
fn text_lines_longer_than_max_line_length_are_refused() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec!["max_line_length: 200".into()],
        ..Default::default()
    });
    let mut c = relay.connect();
    ehlo(&mut c);
    let mut too_long = content("too-long");
    too_long.extend_from_slice(&text_line(201));
    too_long.extend_from_slice(b"after\r\n");
    expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    expect(&c.cmd("DATA"), 354, None);
    c.send(&too_long);
    c.send(b".\r\n");
    let r = c.reply();
    expect(&r, 550, Some("5.5.2"));
    assert!(r.contains("200"), "{r}");
    // The refused message also ended its transaction.
    expect(&c.cmd("DATA"), 503, None);

    let mut longest = content("longest");
    longest.extend_from_slice(&text_line(200));
    let id = send_message(&mut c, "sender@client.test", &["rcpt@dest.test"], &longest);
    expect(&c.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_stored(&msgs, &id, &longest);
}

#[test]
fn messages_over_max_message_size_are_refused() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec!["max_message_size: 2048".into()],
        ..Default::default()
    });
    let mut stored = Vec::new();
    let mut c = relay.connect();
    let r = c.cmd("EHLO client.test");
    assert!(r.contains("250-SIZE 2048\r\n"), "{r}");
    expect(
        &c.cmd("MAIL FROM:<a@client.test> SIZE=999999"),
        552,
        Some("5.3.4"),
    );
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 503, None);
    expect(
        &c.cmd("MAIL FROM:<a@client.test> SIZE=2049"),
        552,
        Some("5.3.4"),
    );
    expect(&c.cmd("MAIL FROM:<a@client.test> SIZE=2048"), 250, None);
    expect(&c.cmd("RSET"), 250, None);

    // DATA one octet over: refused once the data is in; exactly at the limit: taken.
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&c.cmd("DATA"), 354, None);
    c.send(&sized_content("over", 2049));
    c.send(b".\r\n");
    expect(&c.reply(), 552, Some("5.3.4"));
    let body = sized_content("at-limit", 2048);
    stored.push((
        send_message(&mut c, "a@client.test", &["b@dest.test"], &body),
        body,
    ));
    // Far over the limit: still read to the end, still refused, session in step.
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&c.cmd("DATA"), 354, None);
    c.send(&sized_content("far-over", 200_000));
    c.send(b".\r\n");
    expect(&c.reply(), 552, Some("5.3.4"));
    expect(&c.cmd("VRFY x"), 252, None);
    expect(&c.cmd("QUIT"), 221, None);

    // BDAT announcing more than the limit is refused before its octets are read.
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&c.cmd("BDAT 3000 LAST"), 552, Some("5.3.4"));
    assert!(c.is_closed());

    // Chunks that add up to more than the limit.
    let over = sized_content("bdat-over", 2049);
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 250, None);
    c.send(&[b"BDAT 1024\r\n", &over[..1024]].concat());
    expect(&c.reply(), 250, None);
    expect(&c.cmd("BDAT 1025 LAST"), 552, Some("5.3.4"));
    assert!(c.is_closed());

    // Chunks that add up to exactly the limit.
    let body = sized_content("bdat-at-limit", 2048);
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 250, None);
    c.send(&[b"BDAT 1000\r\n", &body[..1000]].concat());
    expect(&c.reply(), 250, None);
    c.send(&[b"BDAT 1048 LAST\r\n", &body[1000..]].concat());
    let r = c.reply();
    expect(&r, 250, Some("2.0.0"));
    stored.push((queue_id(&r), body));
    expect(&c.cmd("QUIT"), 221, None);

    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), stored.len(), "{msgs:#?}");
    for (id, body) in &stored {
        assert_stored(&msgs, id, body);
    }
}

#[test]
fn recipients_beyond_max_recipients_are_refused_with_452() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec!["max_recipients: 3".into()],
        ..Default::default()
    });
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    for i in 1..=3 {
        expect(&c.cmd(&format!("RCPT TO:<r{i}@dest.test>")), 250, None);
    }
    expect(&c.cmd("RCPT TO:<r4@dest.test>"), 452, Some("4.5.3"));
    expect(&c.cmd("RCPT TO:<r5@dest.test>"), 452, Some("4.5.3"));
    expect(&c.cmd("DATA"), 354, None);
    let body = content("three");
    c.send(&body);
    c.send(b".\r\n");
    let r = c.reply();
    expect(&r, 250, Some("2.0.0"));
    expect(&c.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = assert_stored(&msgs, &queue_id(&r), &body);
    let rcpts: Vec<&str> = m
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(rcpts, ["r1@dest.test", "r2@dest.test", "r3@dest.test"]);
}

// ---------------------------------------------------------------------------------
// STARTTLS and AUTH

#[test]
fn commands_pipelined_after_starttls_are_discarded() {
    let mut relay = Relay::start(RelayOptions {
        tls: true,
        auth_users: Some("alice:correct-horse\n".into()),
        ..Default::default()
    });
    let cert = relay.cert_path.clone().unwrap();

    // Before TLS: STARTTLS offered, AUTH neither offered nor accepted.
    let mut c = relay.connect();
    let r = c.cmd("EHLO client.test");
    assert!(r.contains("250-STARTTLS\r\n") || r.contains("250 STARTTLS\r\n"));
    assert!(!r.contains("AUTH"), "AUTH offered in the clear: {r}");
    expect(
        &c.cmd("AUTH PLAIN AGFsaWNlAGNvcnJlY3QtaG9yc2U="),
        538,
        Some("5.7.11"),
    );
    expect(&c.cmd("QUIT"), 221, None);

    // CVE-2011-0411: a MAIL injected in the same segment as STARTTLS.
    let mut c = relay.connect();
    c.send(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n");
    expect(&c.reply(), 250, None);
    expect(&c.reply(), 220, Some("2.0.0"));
    let mut t = TlsSmtpConn::handshake(c.into_tcp(), &cert);
    let r = t.cmd("EHLO x");
    expect(&r, 250, None);
    assert!(
        r.contains("AUTH PLAIN LOGIN"),
        "AUTH not offered in TLS: {r}"
    );
    assert!(!r.contains("STARTTLS"), "{r}");
    expect(&t.cmd("RCPT TO:<a@b.test>"), 503, Some("5.5.1"));
    expect(&t.cmd("STARTTLS"), 503, None);
    expect(
        &t.cmd("AUTH PLAIN AGFsaWNlAGNvcnJlY3QtaG9yc2U="),
        235,
        Some("2.7.0"),
    );
    expect(&t.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&t.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    expect(&t.cmd("DATA"), 354, None);
    let body = content("inside-tls");
    t.send(&body);
    t.send(b".\r\n");
    let r = t.reply();
    expect(&r, 250, Some("2.0.0"));
    expect(&t.cmd("QUIT"), 221, None);

    // Not TLS after 220: the handshake fails and the connection is closed.
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("STARTTLS"), 220, None);
    c.send(b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<a@b.test>\r\n");
    let got = c.arrived_within(Duration::from_secs(5));
    assert!(
        !got.starts_with(b"250") && !got.starts_with(b"503"),
        "plain text after STARTTLS was executed: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(c.is_closed());

    // Without the injection STARTTLS also forgets the EHLO given in the clear.
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("STARTTLS"), 220, None);
    let mut t = TlsSmtpConn::handshake(c.into_tcp(), &cert);
    expect(&t.cmd("MAIL FROM:<sender@client.test>"), 503, None);
    expect(&t.cmd("QUIT"), 221, None);

    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    let m = assert_stored(&msgs, &queue_id(&r), &body);
    assert_eq!(m.envelope.mail.from, "sender@client.test");
    assert!(m.envelope.client.tls.is_some());
    assert_eq!(m.envelope.client.auth_user.as_deref(), Some("alice"));
}

// ---------------------------------------------------------------------------------
// Relay policy and error limit

/// RFC 5321 §4.5.1: `RCPT TO:<Postmaster>` without a domain must be accepted, even
/// from a client that may not relay; it reaches `postmaster@<hostname>`.
#[test]
fn bare_postmaster_is_accepted_even_from_outside_relay_networks() {
    let mut relay = Relay::start(RelayOptions {
        relay_networks: Some(vec!["10.99.0.0/16".into()]),
        ..Default::default()
    });
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<reporter@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<Postmaster>"), 250, Some("2.1.5"));
    expect(
        &c.cmd("RCPT TO:<victim@elsewhere.test>"),
        554,
        Some("5.7.1"),
    );
    expect(&c.cmd("RCPT TO:<abuse>"), 501, None);
    expect(&c.cmd("DATA"), 354, None);
    let body = content("to-postmaster");
    c.send(&body);
    let r = c.cmd(".");
    expect(&r, 250, Some("2.0.0"));
    expect(&c.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    let m = assert_stored(&msgs, &queue_id(&r), &body);
    let rcpts: Vec<&str> = m
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(rcpts, ["postmaster@relay.test"]);
}

#[test]
fn clients_outside_relay_networks_are_denied_and_cut_off_after_max_errors() {
    let mut relay = Relay::start(RelayOptions {
        relay_networks: Some(vec!["10.99.0.0/16".into()]),
        limits: vec!["max_errors: 3".into()],
        ..Default::default()
    });
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    let r = c.cmd("RCPT TO:<victim@elsewhere.test>");
    expect(&r, 554, Some("5.7.1"));
    assert!(r.contains("Relay access denied"), "{r}");
    expect(&c.cmd("DATA"), 554, None);
    let r = c.cmd("RCPT TO:<victim@elsewhere.test>");
    expect(&r, 421, Some("4.7.0"));
    assert!(c.is_closed());

    // The error count is per session.
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(
        &c.cmd("RCPT TO:<victim@elsewhere.test>"),
        554,
        Some("5.7.1"),
    );
    expect(&c.cmd("QUIT"), 221, None);
    assert_nothing_queued(&mut relay);
}

#[test]
fn authenticated_clients_may_relay_from_outside_relay_networks() {
    let mut relay = Relay::start(RelayOptions {
        relay_networks: Some(vec!["10.99.0.0/16".into()]),
        tls: true,
        implicit_tls: true,
        auth_users: Some("alice:correct-horse\n".into()),
        ..Default::default()
    });
    let cert = relay.cert_path.clone().unwrap();
    let (mut t, greeting) = TlsSmtpConn::connect_implicit(relay.smtps.unwrap(), &cert);
    expect(&greeting, 220, None);
    let r = t.cmd("EHLO client.test");
    assert!(r.contains("AUTH PLAIN LOGIN"), "{r}");
    assert!(!r.contains("STARTTLS"), "{r}");
    expect(&t.cmd("MAIL FROM:<alice@client.test>"), 250, None);
    expect(&t.cmd("RCPT TO:<b@dest.test>"), 554, Some("5.7.1"));
    expect(&t.cmd("RSET"), 250, None);
    expect(&t.cmd("AUTH PLAIN AGFsaWNlAHdyb25n"), 535, Some("5.7.8"));
    expect(
        &t.cmd("AUTH PLAIN AGFsaWNlAGNvcnJlY3QtaG9yc2U="),
        235,
        Some("2.7.0"),
    );
    expect(&t.cmd("MAIL FROM:<alice@client.test>"), 250, None);
    expect(&t.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&t.cmd("DATA"), 354, None);
    let body = content("authenticated");
    t.send(&body);
    t.send(b".\r\n");
    let r = t.reply();
    expect(&r, 250, Some("2.0.0"));
    expect(&t.cmd("QUIT"), 221, None);

    // Plain text on the implicit-TLS port: no greeting, no session.
    let mut s = TcpStream::connect(relay.smtps.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"EHLO client.test\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"220"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = assert_stored(&msgs, &queue_id(&r), &body);
    assert_eq!(m.envelope.client.auth_user.as_deref(), Some("alice"));
    assert_eq!(m.envelope.client.listener, "smtps");
}

#[test]
fn messages_beyond_max_messages_per_connection_get_421() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec!["max_messages_per_connection: 2".into()],
        ..Default::default()
    });
    let mut c = relay.connect();
    ehlo(&mut c);
    let mut sent = Vec::new();
    for i in 0..2 {
        let body = content(&format!("per-conn-{i}"));
        sent.push((
            send_message(&mut c, "a@client.test", &["b@dest.test"], &body),
            body,
        ));
    }
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 421, Some("4.7.0"));
    assert!(c.is_closed());
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 2);
    for (id, body) in &sent {
        assert_stored(&msgs, id, body);
    }
}

// ---------------------------------------------------------------------------------
// Slow, idle and vanishing clients

#[test]
fn idle_and_stalled_clients_time_out_with_421() {
    let mut relay = Relay::start(RelayOptions {
        tls: true,
        limits: vec![
            "command_timeout: 1s".into(),
            "data_timeout: 1s".into(),
            "session_timeout: 4s".into(),
        ],
        ..Default::default()
    });
    // All three wait at once; each then finds its 421 waiting.
    let mut idle = relay.connect();
    let mut after_ehlo = relay.connect();
    ehlo(&mut after_ehlo);
    let mut mid_data = relay.connect();
    ehlo(&mut mid_data);
    expect(&mid_data.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&mid_data.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&mid_data.cmd("DATA"), 354, None);
    mid_data.send(b"Subject: half\r\n\r\nfirst half of the mess");
    // Silent after STARTTLS: no plain-text 421 is possible, just the close.
    let mut in_handshake = relay.connect();
    ehlo(&mut in_handshake);
    expect(&in_handshake.cmd("STARTTLS"), 220, None);
    for c in [&mut idle, &mut after_ehlo, &mut mid_data] {
        expect(&c.reply(), 421, Some("4.4.2"));
        assert!(c.is_closed());
    }
    assert!(
        in_handshake
            .arrived_within(Duration::from_secs(15))
            .is_empty()
    );
    assert!(in_handshake.is_closed());

    // A client trickling a byte at a time defeats per-read timeouts, not the session
    // ceiling.
    let mut slow = relay.connect();
    ehlo(&mut slow);
    expect(&slow.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&slow.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&slow.cmd("DATA"), 354, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        assert!(Instant::now() < deadline, "trickling client never cut off");
        // The relay may already have closed; the reply below is what counts.
        let _ = slow.stream().write_all(b"x");
        let got = slow.arrived_within(Duration::from_millis(250));
        if !got.is_empty() {
            break got;
        }
    };
    let got = String::from_utf8_lossy(&got).into_owned();
    expect(&got, 421, Some("4.4.2"));
    assert_nothing_queued(&mut relay);
}

/// The session keeps one read timer that later reads leave armed and that re-arms
/// itself when it fires before the current read's deadline: a client that keeps
/// talking must outlive the timeout of its first read, a silent one must be cut one
/// full timeout after its last command (not at a stale, earlier deadline), and a
/// shorter limit (DATA's) must still take effect at once.
#[test]
fn busy_clients_outlive_the_idle_timeout_and_silent_ones_are_cut_on_time() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec![
            "command_timeout: 3s".into(),
            "data_timeout: 1s".into(),
            "session_timeout: 60s".into(),
        ],
        ..Default::default()
    });
    let mut busy = relay.connect();
    ehlo(&mut busy);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(5000) {
        sleep(Duration::from_millis(500));
        expect(&busy.cmd("NOOP"), 250, None);
    }
    let last = Instant::now();
    let got = busy.reply();
    let waited = last.elapsed();
    expect(&got, 421, Some("4.4.2"));
    assert!(got.contains("timeout exceeded"), "{got:?}");
    assert!(busy.is_closed());
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(8),
        "silent after its last command, cut after {waited:?} (command_timeout 3s)"
    );

    // The long command timeout armed first; DATA's shorter one must still hold.
    let mut mid_data = relay.connect();
    ehlo(&mut mid_data);
    expect(&mid_data.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&mid_data.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&mid_data.cmd("DATA"), 354, None);
    let since = Instant::now();
    mid_data.send(b"Subject: half\r\n\r\nfirst half");
    let got = mid_data.reply();
    let waited = since.elapsed();
    expect(&got, 421, Some("4.4.2"));
    assert!(got.contains("timeout exceeded"), "{got:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2500),
        "silent in DATA, cut after {waited:?} (data_timeout 1s)"
    );
    assert_nothing_queued(&mut relay);
}

#[test]
fn abrupt_disconnects_mid_transaction_queue_nothing() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut mid_data = relay.connect();
    ehlo(&mut mid_data);
    expect(&mid_data.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&mid_data.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&mid_data.cmd("DATA"), 354, None);
    mid_data.send(b"Subject: half\r\n\r\nfirst half\r\n");
    drop(mid_data);

    let mut mid_bdat = relay.connect();
    ehlo(&mut mid_bdat);
    expect(&mid_bdat.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&mid_bdat.cmd("RCPT TO:<b@dest.test>"), 250, None);
    mid_bdat.send(b"BDAT 100 LAST\r\nSubject: half\r\n\r\n");
    drop(mid_bdat);

    // A crashed client (RST, not FIN) one octet short of the end of data: the
    // message must not count as complete.
    let mut reset = relay.connect();
    ehlo(&mut reset);
    expect(&reset.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&reset.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&reset.cmd("DATA"), 354, None);
    reset.send(b"Subject: half\r\n\r\nbody\r\n.\r");
    let s = reset.stream().try_clone().unwrap();
    drop(reset);
    set_linger_zero(&s);
    drop(s);

    sleep(Duration::from_millis(200));
    assert!(relay.is_running());
    let mut c = relay.connect();
    ehlo(&mut c);
    let body = content("after-disconnects");
    let id = send_message(&mut c, "a@client.test", &["b@dest.test"], &body);
    expect(&c.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_stored(&msgs, &id, &body);
}

unsafe extern "C" {
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const u8, len: u32) -> i32;
}

const SOL_SOCKET: i32 = 1;

fn set_sockopt<T>(s: &TcpStream, name: i32, val: &T) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket fd and a value of the size the option expects.
    let rc = unsafe {
        setsockopt(
            s.as_raw_fd(),
            SOL_SOCKET,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    assert_eq!(rc, 0, "setsockopt({name})");
}

/// `SO_LINGER` 0: closing then sends RST instead of FIN, like a crashed client.
fn set_linger_zero(s: &TcpStream) {
    const SO_LINGER: i32 = 13;
    // struct linger { int l_onoff; int l_linger; }
    set_sockopt(s, SO_LINGER, &[1i32, 0i32]);
}

/// A tiny receive buffer, so a client that does not read stalls the relay's writes
/// after a few kilobytes.
fn set_small_rcvbuf(s: &TcpStream) {
    const SO_RCVBUF: i32 = 8;
    set_sockopt(s, SO_RCVBUF, &4096i32);
}

#[test]
fn a_client_that_never_reads_cannot_hold_its_slot_past_session_timeout() {
    let relay = Relay::start(RelayOptions {
        limits: vec![
            "command_timeout: 1s".into(),
            "data_timeout: 1s".into(),
            "session_timeout: 3s".into(),
            "max_connections_per_ip: 1".into(),
        ],
        ..Default::default()
    });
    let mut hog = connect_admitted(&relay);
    set_small_rcvbuf(hog.stream());
    let mut w = hog.stream().try_clone().unwrap();
    // Pipelined HELPs whose replies are never read: the relay's writes stall once
    // the socket buffers are full.
    let writer = std::thread::spawn(move || {
        let batch = b"HELP\r\n".repeat(10_000);
        for _ in 0..200 {
            if w.write_all(&batch).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let freed = loop {
        let c = relay.connect();
        if code(&c.greeting) == 220 {
            break true;
        }
        expect(&c.greeting, 421, Some("4.7.0"));
        if Instant::now() > deadline {
            break false;
        }
        sleep(Duration::from_millis(200));
    };
    let _ = hog.stream().shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    assert!(
        freed,
        "a client that stopped reading replies still holds its connection slot over 10 s \
         after connecting, with session_timeout 3s: writes are not bounded by any timeout"
    );
}

/// Connects until admitted: a slot is released only just after the close its client
/// sees, and `Relay::start` itself probes the port with a connection.
fn connect_admitted(relay: &Relay) -> SmtpConn {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = relay.connect();
        if code(&c.greeting) == 220 || Instant::now() > deadline {
            expect(&c.greeting, 220, None);
            return c;
        }
        sleep(Duration::from_millis(50));
    }
}

#[test]
fn connections_per_ip_are_limited() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec!["max_connections_per_ip: 2".into()],
        ..Default::default()
    });
    // Both admitted by retrying: the start-up probe's session may not have ended
    // yet, and it counts against the per-IP limit until it has.
    let mut a = connect_admitted(&relay);
    let mut b = connect_admitted(&relay);
    expect(&a.greeting, 220, None);
    expect(&b.greeting, 220, None);
    let mut third = relay.connect();
    expect(&third.greeting, 421, Some("4.7.0"));
    assert!(third.is_closed());
    expect(&a.cmd("QUIT"), 221, None);
    assert!(a.is_closed());
    let mut next = connect_admitted(&relay);
    expect(&b.cmd("NOOP"), 250, None);
    ehlo(&mut next);
    let body = content("per-ip");
    let id = send_message(&mut next, "a@client.test", &["b@dest.test"], &body);
    expect(&next.cmd("QUIT"), 221, None);
    expect(&b.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    assert_stored(&msgs, &id, &body);
}

// ---------------------------------------------------------------------------------
// Probing commands and other protocols

#[test]
fn probing_commands_and_foreign_protocols() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("VRFY root"), 252, None);
    expect(&c.cmd("EXPN staff"), 502, None);
    expect(&c.cmd("XYZZY plugh"), 500, Some("5.5.2"));
    expect(&c.cmd("HELP"), 214, None);
    expect(&c.cmd("QUIT"), 221, None);
    assert!(c.is_closed());

    let mut c = relay.connect();
    c.send(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n");
    let r = c.reply();
    assert!(
        r.is_empty() || code(&r) >= 500,
        "HTTP request answered {r:?}"
    );
    assert!(c.is_closed(), "connection left open after an HTTP request");

    let mut c = relay.connect();
    c.send(b"POST /submit HTTP/1.1\r\nContent-Length: 4\r\n\r\nMAIL");
    let r = c.reply();
    assert!(r.is_empty() || code(&r) >= 500, "{r:?}");
    assert!(c.is_closed());
    assert_nothing_queued(&mut relay);
}

// ---------------------------------------------------------------------------------
// PROXY protocol

/// A PROXY v2 header: `PROXY` over TCP/IPv4 from `src:sport` to 127.0.0.1:25 with
/// one TLV the relay must skip, or `LOCAL` when `src` is `None`.
fn proxy_v2(src: Option<([u8; 4], u16)>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match src {
        None => h.extend_from_slice(&[0x20, 0x00, 0, 0]),
        Some((ip, port)) => {
            h.extend_from_slice(&[0x21, 0x11]);
            h.extend_from_slice(&(12u16 + 7).to_be_bytes());
            h.extend_from_slice(&ip);
            h.extend_from_slice(&[127, 0, 0, 1]);
            h.extend_from_slice(&port.to_be_bytes());
            h.extend_from_slice(&25u16.to_be_bytes());
            // PP2_TYPE_AUTHORITY "abcd".
            h.extend_from_slice(&[0x02, 0, 4]);
            h.extend_from_slice(b"abcd");
        }
    }
    h
}

#[track_caller]
fn assert_relay_denied(relay: &Relay, header: &[u8]) {
    let mut c = SmtpConn::connect_after(relay.smtp, header);
    expect(&c.greeting, 220, None);
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 554, Some("5.7.1"));
    expect(&c.cmd("QUIT"), 221, None);
}

#[track_caller]
fn assert_no_greeting(relay: &Relay, bytes: &[u8]) {
    let mut s = TcpStream::connect(relay.smtp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    // A reset (unread input at close) is as good as an orderly close here.
    let _ = s.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "{:?} was answered {:?}",
        String::from_utf8_lossy(bytes),
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn proxy_protocol_decides_relay_rights_by_the_proxied_client() {
    let mut relay = Relay::start(RelayOptions {
        proxy_protocol: true,
        relay_networks: Some(
            ["127.0.0.0/8", "::1/128", "10.9.0.0/16", "fd00:9::/32"]
                .map(String::from)
                .to_vec(),
        ),
        ..Default::default()
    });
    // The TCP peer is loopback (allowed to relay); the proxied client is not.
    assert_relay_denied(&relay, b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 25\r\n");
    assert_relay_denied(&relay, &proxy_v2(Some(([10, 1, 2, 4], 5556))));
    // No client address: never the balancer's own relay rights.
    assert_relay_denied(&relay, b"PROXY UNKNOWN\r\n");
    assert_relay_denied(&relay, b"PROXY UNKNOWN TCP4 127.0.0.1 127.0.0.1 1 2\r\n");
    assert_relay_denied(&relay, &proxy_v2(None));
    // An IPv4-mapped IPv6 address is the IPv4 client it maps.
    assert_relay_denied(&relay, b"PROXY TCP6 ::ffff:10.1.2.3 ::1 5555 25\r\n");
    // A loopback source in a header proves nothing (anyone reaching the listener
    // can write one), though loopback itself is in relay_networks.
    assert_relay_denied(&relay, b"PROXY TCP4 127.0.0.9 127.0.0.1 5555 25\r\n");
    assert_relay_denied(&relay, &proxy_v2(Some(([127, 0, 0, 10], 6000))));
    assert_relay_denied(&relay, b"PROXY TCP6 ::1 ::1 7000 25\r\n");
    assert_relay_denied(&relay, b"PROXY TCP6 ::ffff:127.0.0.1 ::1 7000 25\r\n");

    let mut stored = Vec::new();
    // SMTP pipelined right behind the header must not be eaten by it.
    let mut c = SmtpConn::connect_after(
        relay.smtp,
        b"PROXY TCP4 10.9.0.9 127.0.0.1 5555 25\r\nEHLO v1.client.test\r\n",
    );
    expect(&c.greeting, 220, None);
    expect(&c.reply(), 250, None);
    let body = content("proxy-v1");
    stored.push((
        send_message(&mut c, "a@client.test", &["b@dest.test"], &body),
        body,
        "10.9.0.9",
        5555,
    ));
    expect(&c.cmd("QUIT"), 221, None);

    let mut c = SmtpConn::connect_after(relay.smtp, &proxy_v2(Some(([10, 9, 0, 10], 6000))));
    expect(&c.greeting, 220, None);
    ehlo(&mut c);
    let body = content("proxy-v2");
    stored.push((
        send_message(&mut c, "a@client.test", &["b@dest.test"], &body),
        body,
        "10.9.0.10",
        6000,
    ));
    expect(&c.cmd("QUIT"), 221, None);

    let mut c = SmtpConn::connect_after(relay.smtp, b"PROXY TCP6 fd00:9::1 ::1 7000 25\r\n");
    expect(&c.greeting, 220, None);
    ehlo(&mut c);
    let body = content("proxy-v1-ipv6");
    stored.push((
        send_message(&mut c, "a@client.test", &["b@dest.test"], &body),
        body,
        "fd00:9::1",
        7000,
    ));
    expect(&c.cmd("QUIT"), 221, None);

    // Without a valid header the connection is dropped before any greeting.
    assert_no_greeting(&relay, b"EHLO client.test\r\n");
    assert_no_greeting(&relay, b"PROXY TCP4 10.1.2.3 nonsense\r\n");
    assert_no_greeting(&relay, b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 25\n");
    assert_no_greeting(&relay, b"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\x0c");

    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), stored.len(), "{msgs:#?}");
    for (id, body, ip, port) in &stored {
        let m = assert_stored(&msgs, id, body);
        assert_eq!(m.envelope.client.ip.to_string(), *ip);
        assert_eq!(m.envelope.client.port, *port);
        let received = String::from_utf8_lossy(&m.body);
        let shown = if ip.contains(':') {
            format!("([IPv6:{ip}])")
        } else {
            format!("([{ip}])")
        };
        assert!(received.contains(&shown), "{received}");
    }
}

// ---------------------------------------------------------------------------------
// Deadlines and minimum rates (slow clients)

/// Sends `line` one octet per `gap` until the relay answers; returns the answer.
/// Bounded: gives up (empty answer) after the whole line was sent.
fn trickle(c: &mut SmtpConn, line: &[u8], gap: Duration) -> String {
    for b in line {
        // The relay may already have closed; the reply is what counts.
        let _ = c.stream().write_all(std::slice::from_ref(b));
        let got = c.arrived_within(gap);
        if !got.is_empty() {
            return String::from_utf8_lossy(&got).into_owned();
        }
    }
    String::new()
}

/// The peer closed: EOF or reset (a reset when our unread octets were discarded).
fn is_gone(c: &mut SmtpConn) -> bool {
    let mut rest = Vec::new();
    match c.stream().read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn trickled_command_lines_are_cut_at_their_deadline_and_free_their_slots() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec![
            "command_timeout: 1s".into(),
            "session_timeout: 60s".into(),
            "max_connections: 3".into(),
        ],
        ..Default::default()
    });
    // Every octet comes well within command_timeout, so an idle timer that restarts
    // on each octet would keep these lines open for 60 × 0.2 s.
    let line = [b"NOOP ".as_slice(), &[b'x'; 55], b"\r\n"].concat();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let mut c = connect_admitted(&relay);
            let line = line.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let got = trickle(&mut c, &line, Duration::from_millis(200));
                (got, started.elapsed(), is_gone(&mut c))
            })
        })
        .collect();
    // The three slots are taken; a normal client gets in once the tricklers are cut.
    let mut c = connect_admitted(&relay);
    ehlo(&mut c);
    let body = content("while-trickled");
    let id = send_message(&mut c, "sender@client.test", &["rcpt@dest.test"], &body);
    expect(&c.cmd("QUIT"), 221, None);
    for t in slow {
        let (got, elapsed, gone) = t.join().unwrap();
        expect(&got, 421, Some("4.4.2"));
        assert!(got.contains("not completed in time"), "{got:?}");
        assert!(gone, "the trickling connection must be closed");
        // The line would take 12 s; generous bound well under that.
        assert!(
            elapsed < Duration::from_secs(9),
            "cut only after {elapsed:?}"
        );
    }
    assert_eq!(
        metric(
            &relay,
            "mailrelay_smtp_messages_rejected_total{reason=\"command_deadline\"}"
        ),
        Some(3)
    );
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    assert_stored(&msgs, &id, &body);
}

/// Starts a transaction and returns after `354`.
fn start_data(c: &mut SmtpConn) {
    ehlo(c);
    expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    expect(&c.cmd("DATA"), 354, None);
}

/// Sends `piece` every `gap` until the relay answers (at most `limit`).
fn stream_until_answer(c: &mut SmtpConn, piece: &[u8], gap: Duration, limit: Duration) -> String {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if c.stream().write_all(piece).is_err() {
            break;
        }
        let got = c.arrived_within(gap);
        if !got.is_empty() {
            return String::from_utf8_lossy(&got).into_owned();
        }
    }
    String::from_utf8_lossy(&c.arrived_within(Duration::from_secs(2))).into_owned()
}

#[test]
fn slow_and_endless_data_is_cut_while_a_slow_honest_client_gets_through() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec![
            "data_min_rate: 1000".into(),
            "data_rate_window: 1s".into(),
            "data_deadline: 4s".into(),
            "data_timeout: 30s".into(),
            "session_timeout: 60s".into(),
        ],
        ..Default::default()
    });
    // Below the rate: 10 octets per 100 ms is 100 octets/s.
    let mut slow = relay.connect();
    start_data(&mut slow);
    let got = stream_until_answer(
        &mut slow,
        b"slowslow\r\n",
        Duration::from_millis(100),
        Duration::from_secs(20),
    );
    expect(&got, 421, Some("4.4.2"));
    assert!(got.contains("too slowly"), "{got:?}");
    assert!(is_gone(&mut slow));

    // Above the rate but never ending: cut at the data deadline.
    let mut endless = relay.connect();
    start_data(&mut endless);
    let started = Instant::now();
    let got = stream_until_answer(
        &mut endless,
        &text_line(500),
        Duration::from_millis(100),
        Duration::from_secs(30),
    );
    expect(&got, 421, Some("4.4.2"));
    assert!(got.contains("not completed in time"), "{got:?}");
    assert!(started.elapsed() >= Duration::from_secs(3), "cut too early");
    assert!(is_gone(&mut endless));

    // Slow but honest: about 4000 octets/s with pauses, over two rate windows.
    let mut honest = relay.connect();
    start_data(&mut honest);
    let body = sized_content("slow-honest", 8000);
    for piece in body.chunks(400) {
        honest.send(piece);
        sleep(Duration::from_millis(100));
    }
    let r = honest.cmd(".");
    expect(&r, 250, Some("2.0.0"));
    expect(&honest.cmd("QUIT"), 221, None);

    for reason in ["data_too_slow", "data_deadline"] {
        assert_eq!(
            metric(
                &relay,
                &format!("mailrelay_smtp_messages_rejected_total{{reason=\"{reason}\"}}")
            ),
            Some(1),
            "{reason}"
        );
    }
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_stored(&msgs, &queue_id(&r), &body);
}

#[test]
fn slow_bdat_chunks_are_cut_by_the_rate_across_the_transaction() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec![
            "data_min_rate: 1000".into(),
            "data_rate_window: 1s".into(),
            "command_timeout: 30s".into(),
            "session_timeout: 60s".into(),
        ],
        ..Default::default()
    });
    let mut c = relay.connect();
    ehlo(&mut c);
    expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    // Tiny chunks, each complete and each command prompt: only the rate over the
    // whole transaction catches them.
    let end = Instant::now() + Duration::from_secs(20);
    let got = loop {
        assert!(Instant::now() < end, "slow BDAT never cut");
        let _ = c.stream().write_all(b"BDAT 4\r\nabcd");
        let got = c.arrived_within(Duration::from_millis(300));
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(i) = text.find("421") {
            break text[i..].to_owned();
        }
        assert!(text.is_empty() || text.starts_with("250"), "{text:?}");
    };
    expect(&got, 421, Some("4.4.2"));
    assert!(got.contains("too slowly"), "{got:?}");
    assert_nothing_queued(&mut relay);
}

#[test]
fn endless_data_past_the_size_limit_is_cut_after_a_bounded_drain() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec![
            "max_message_size: 10000".into(),
            "data_oversize_drain: 20000".into(),
        ],
        ..Default::default()
    });
    let mut c = relay.connect();
    start_data(&mut c);
    let started = Instant::now();
    let got = stream_until_answer(
        &mut c,
        &text_line(1000).repeat(8),
        Duration::from_millis(5),
        Duration::from_secs(20),
    );
    expect(&got, 552, Some("5.3.4"));
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(is_gone(&mut c));
    // An oversized message that does end within the drain is answered in sync.
    let mut c = relay.connect();
    start_data(&mut c);
    c.send(&text_line(1000).repeat(15));
    expect(&c.cmd("."), 552, Some("5.3.4"));
    expect(&c.cmd("NOOP"), 250, None);
    expect(&c.cmd("QUIT"), 221, None);
    assert_nothing_queued(&mut relay);
}

// ---------------------------------------------------------------------------------
// Accountability

/// One raw HTTP request to the admin API, claiming to act for `actor` (raw header
/// value bytes); returns the status code.
fn admin_request(relay: &Relay, method: &str, path: &str, actor: &[u8]) -> u16 {
    let mut s = TcpStream::connect(relay.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nUser-Agent: audit-test/1\r\n\
         Content-Length: 0\r\nConnection: close\r\n"
    )
    .into_bytes();
    if !actor.is_empty() {
        req.extend_from_slice(b"X-Mailrelay-Actor: ");
        req.extend_from_slice(actor);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// The relay's log without ANSI colour codes.
fn plain_log(relay: &Relay) -> String {
    let mut out = String::new();
    let log = relay.log();
    let mut rest = log.as_str();
    while let Some(i) = rest.find('\u{1b}') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        rest = &after[after.find('m').map_or(after.len(), |m| m + 1)..];
    }
    out.push_str(rest);
    out
}

#[test]
fn admin_deletes_and_retries_are_logged_with_who_did_them() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    ehlo(&mut c);
    let id = send_message(
        &mut c,
        "sender@client.test",
        &["rcpt@dest.test"],
        &content("audited"),
    );
    expect(&c.cmd("QUIT"), 221, None);
    let retry = format!("/api/v1/queue/messages/{id}/retry");
    assert_eq!(
        admin_request(&relay, "POST", &retry, b"alice@example.com"),
        200
    );
    // A hostile claim: fake fields, a tab, bytes that are not ASCII, and a size
    // far past the bound. (CR, LF and other control bytes cannot reach a handler:
    // the HTTP parser refuses them in a header.)
    let mut hostile = b"mallory identity=token:file\tactor=alice \xc3\xa9\xff".to_vec();
    hostile.extend_from_slice(&[b'x'; 5000]);
    assert_eq!(
        admin_request(
            &relay,
            "POST",
            "/api/v1/queue/retry?domain=dest.test",
            &hostile
        ),
        200
    );
    let msg = format!("/api/v1/queue/messages/{id}");
    assert_eq!(admin_request(&relay, "DELETE", &msg, b""), 204);
    // Deleting what is gone is logged too: the attempt says who tried.
    assert_eq!(admin_request(&relay, "DELETE", &msg, b"bob"), 404);
    assert!(relay.stop().success());
    let log = plain_log(&relay);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("admin: queue")).collect();
    assert_eq!(lines.len(), 4, "{log}");
    for l in &lines {
        assert!(l.contains("127.0.0.1:"), "peer address missing: {l}");
        assert!(l.contains("audit-test/1"), "user agent missing: {l}");
        assert!(l.len() < 1000, "the claimed actor is bounded: {l}");
        assert!(
            l.chars().all(|c| c.is_ascii() && !c.is_ascii_control()),
            "{l:?}"
        );
        // The claim never displaces the identity that passed authentication.
        assert_eq!(l.matches(" identity=").count(), 1, "{l}");
    }
    assert!(
        lines[0].contains("retry") && lines[0].contains(&id),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(r#"actor="alice@example.com""#),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("domain=dest.test"), "{}", lines[1]);
    assert!(
        lines[1].contains(
            r#"identity="anonymous" actor="mallory%20identity=token:file%09actor=alice%20%C3%A9%FFxxx"#
        ),
        "the hostile claim is one escaped field: {}",
        lines[1]
    );
    assert!(
        lines[2].contains("delete") && lines[2].contains(&id),
        "{}",
        lines[2]
    );
    assert!(lines[2].contains("removed=true"), "{}", lines[2]);
    assert!(lines[2].contains(r#"actor="-""#), "no claim: {}", lines[2]);
    assert!(lines[3].contains("removed=false"), "{}", lines[3]);
    assert!(lines[3].contains(r#"actor="bob""#), "{}", lines[3]);
    assert!(relay.queued_messages().is_empty());
}

// ---------------------------------------------------------------------------------
// Fair share of connection slots

/// Connects from source address `src` (any 127/8 address works on loopback) and
/// returns the socket and the greeting line.
fn connect_from(relay: &Relay, src: &str) -> (TcpStream, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let s = rt.block_on(sock.connect(relay.smtp)).unwrap();
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(s.try_clone().unwrap()),
        &mut greeting,
    )
    .unwrap();
    (s, greeting)
}

#[test]
fn one_network_cannot_take_every_slot_by_spreading_over_addresses() {
    let relay = Relay::start(RelayOptions {
        // Loopback clients are outside relay_networks here, so the cap applies.
        relay_networks: Some(vec!["10.99.0.0/16".into()]),
        limits: vec![
            "max_connections: 10".into(),
            "max_connections_per_ip: 5".into(),
            "max_connections_per_network: 3".into(),
        ],
        ..Default::default()
    });
    let mut held = Vec::new();
    for src in ["127.0.5.1", "127.0.5.2", "127.0.5.3"] {
        let (s, g) = connect_from(&relay, src);
        expect(&g, 220, None);
        held.push(s);
    }
    // A fourth address of the same /24 is refused; another /24 is not.
    let (_s, g) = connect_from(&relay, "127.0.5.4");
    expect(&g, 421, Some("4.7.0"));
    let (s, g) = connect_from(&relay, "127.0.6.1");
    expect(&g, 220, None);
    held.push(s);
    let m = |reason: &str| {
        metric(
            &relay,
            &format!("mailrelay_smtp_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(m("max_connections_per_network"), Some(1));
    // Closing one frees its network's share.
    drop(held.remove(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, g) = connect_from(&relay, "127.0.5.4");
        if code(&g) == 220 {
            held.push(s);
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {g:?}");
        sleep(Duration::from_millis(50));
    }
}
