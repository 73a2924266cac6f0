//! SMTP clients that nobody on this project wrote (swaks, Python's smtplib, Postfix's
//! smtp-source) talk to a real relay; each test then reads the embedded queue and
//! compares what the client put on the wire with what was stored.
//!
//! The clients come from `.ci/install-deps`. A missing one fails the test instead of
//! skipping it, so a broken CI image cannot quietly drop a scenario.

use crate::support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailrelay::queue::{BodyType, QueuedMessage};
use support::postfix::{Run, run, tool};
use support::relay::{Relay, RelayOptions, code};

// ---------------------------------------------------------------------------------
// Running the external clients

fn swaks(args: &[&str]) -> Run {
    let mut cmd = Command::new(tool("swaks"));
    cmd.args(args);
    run(&mut cmd, Duration::from_secs(30))
}

/// swaks without Net::SSLeay silently lacks `--tls`; say so rather than report a
/// confusing protocol failure.
fn require_swaks_tls() {
    let r = swaks(&["--support"]);
    assert!(
        (r.stdout.clone() + &r.stderr).contains("TLS supported"),
        "swaks has no TLS support (install libnet-ssleay-perl; .ci/install-deps does):\n{}",
        r.text()
    );
}

/// Queue ids from every `250 … queued as ID` in a transcript, in order.
fn queued_ids(transcript: &str) -> Vec<String> {
    transcript
        .match_indices("queued as ")
        .map(|(i, m)| transcript[i + m.len()..].chars().take(20).collect())
        .collect()
}

fn only_queued_id(r: &Run) -> String {
    let ids = queued_ids(&r.stdout);
    assert_eq!(ids.len(), 1, "expected one queued message:\n{}", r.text());
    ids.into_iter().next().unwrap()
}

// ---------------------------------------------------------------------------------
// Seeing what a client really sent

/// A TCP pass-through that keeps every byte each client sent, so a test compares the
/// stored message with what a real client put on the wire, not with what we believe
/// the client does.
struct Recorder {
    addr: SocketAddr,
    sessions: Arc<Mutex<Vec<SessionLog>>>,
}

/// The bytes one client connection has sent so far.
type SessionLog = Arc<Mutex<Vec<u8>>>;

impl Recorder {
    fn start(target: SocketAddr) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sessions: Arc<Mutex<Vec<SessionLog>>> = Arc::default();
        let all = Arc::clone(&sessions);
        // The accept loop lives until the test process ends; it holds nothing but
        // its own socket.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let log = Arc::new(Mutex::new(Vec::new()));
                all.lock().unwrap().push(Arc::clone(&log));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, Some(log)));
                std::thread::spawn(move || pump(s2, c2, None));
            }
        });
        Recorder { addr, sessions }
    }

    /// The bytes each client connection sent, in the order the connections arrived.
    fn client_streams(&self) -> Vec<Vec<u8>> {
        self.sessions
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.lock().unwrap().clone())
            .collect()
    }

    /// Every message content the clients sent with DATA, dot-unstuffed: what the relay
    /// must store after its own headers.
    fn data_contents(&self) -> Vec<Vec<u8>> {
        self.client_streams()
            .iter()
            .flat_map(|s| data_contents(s))
            .collect()
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, log: Option<SessionLog>) {
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Recorded before forwarding, so by the time the client has its reply
                // the bytes are in the log.
                if let Some(l) = &log {
                    l.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Splits a client's byte stream into the contents of its DATA transactions, undoing
/// the dot-stuffing (RFC 5321 4.5.2). Written independently of the relay's decoder.
fn data_contents(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let mut rest = stream;
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(rest.len(), |p| p + 2);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        match current.as_mut() {
            None => {
                if line.eq_ignore_ascii_case(b"DATA\r\n") {
                    current = Some(Vec::new());
                }
            }
            Some(content) => {
                if line == b".\r\n" {
                    out.push(current.take().unwrap());
                } else {
                    content.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
                }
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks that `m.body` is exactly the relay's own trace headers followed by
/// `content`, and returns those headers.
fn added_headers<'a>(m: &'a QueuedMessage, content: &[u8]) -> &'a str {
    assert!(
        m.body.ends_with(content),
        "stored body does not end with the content the client sent\n--- stored ---\n{}\n--- sent ---\n{}",
        lossy(&m.body),
        lossy(content)
    );
    let head = std::str::from_utf8(&m.body[..m.body.len() - content.len()])
        .expect("added headers are UTF-8");
    assert!(head.starts_with("Received: from "), "{head}");
    assert!(head.ends_with("\r\n"), "{head:?}");
    assert_eq!(head.matches("Received: ").count(), 1, "{head}");
    for line in head.split_terminator("\r\n") {
        assert!(
            line.starts_with('\t')
                || line.starts_with("Received: ")
                || line.starts_with("Date: ")
                || line.starts_with("Message-ID: "),
            "unexpected line {line:?} before the client's content:\n{head}"
        );
    }
    head
}

fn by_id<'a>(msgs: &'a [QueuedMessage], id: &str) -> &'a QueuedMessage {
    msgs.iter()
        .find(|m| m.envelope.id.as_str() == id)
        .unwrap_or_else(|| panic!("message {id} is not in the queue"))
}

fn rcpts(m: &QueuedMessage) -> Vec<&str> {
    m.envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect()
}

fn assert_nothing_queued(relay: &mut Relay) {
    assert!(relay.stop().success(), "{}", relay.log());
    let msgs = relay.queued_messages();
    assert!(
        msgs.is_empty(),
        "nothing should be queued, found {:?}",
        msgs.iter().map(|m| &m.envelope).collect::<Vec<_>>()
    );
}

fn metric(relay: &Relay, name: &str) -> Option<u64> {
    let (status, text) = relay.admin_get("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn tls_relay() -> RelayOptions {
    RelayOptions {
        tls: true,
        auth_users: Some("alice:s3cret\n".into()),
        // Loopback is outside these, so the tests' clients must authenticate to relay.
        relay_networks: Some(vec!["10.99.0.0/16".into()]),
        ..RelayOptions::default()
    }
}

// ---------------------------------------------------------------------------------
// swaks

/// Dot-stuffing matters here: a line that is only "." would end the message early,
/// and lines starting with "." must come back with exactly one dot less.
const SWAKS_FILE: &[u8] = b"From: Sender <sender@swaks.test>\r\n\
To: a@x.test, b@y.test\r\n\
Subject: swaks plain\r\n\
\r\n\
first line\r\n\
.\r\n\
.leading dot\r\n\
..two dots\r\n\
trailing spaces   \r\n\
\tindented\r\n\
\r\n\
last line";

#[test]
fn swaks_data_file_is_stored_byte_exact() {
    let mut relay = Relay::start(RelayOptions::default());
    let rec = Recorder::start(relay.smtp);
    let file = relay.dir.path().join("message.eml");
    std::fs::write(&file, SWAKS_FILE).unwrap();
    let r = swaks(&[
        "--server",
        &rec.addr.to_string(),
        "--helo",
        "swaks.client.test",
        "--from",
        "sender@swaks.test",
        "--to",
        "a@x.test,b@y.test",
        "--data",
        &format!("@{}", file.display()),
    ]);
    assert!(r.status.success(), "{}", r.text());
    let id = only_queued_id(&r);

    let streams = rec.client_streams();
    assert_eq!(streams.len(), 1);
    assert!(
        contains(&streams[0], b"\r\n..\r\n..leading dot\r\n...two dots\r\n"),
        "swaks did not dot-stuff as expected:\n{}",
        lossy(&streams[0])
    );
    let sent = data_contents(&streams[0]);
    // swaks ends the last line itself when the file does not.
    let expected = [SWAKS_FILE, b"\r\n"].concat();
    assert_eq!(sent, vec![expected.clone()], "what swaks sent");

    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = by_id(&msgs, &id);
    let head = added_headers(m, &expected);
    assert!(
        head.starts_with("Received: from swaks.client.test ([127.0.0.1])\r\n\tby relay.test (mailrelay) with ESMTP id "),
        "{head}"
    );
    assert!(head.contains(&format!(" id {id}; ")), "{head}");
    assert!(!head.contains("for <"), "two recipients: no `for`\n{head}");
    // The file has neither, so the relay adds both.
    assert!(head.contains("\r\nDate: "), "{head}");
    assert!(
        head.ends_with(&format!("\r\nMessage-ID: <{id}@relay.test>\r\n")),
        "{head}"
    );
    let e = &m.envelope;
    assert_eq!(e.mail.from, "sender@swaks.test");
    assert_eq!(rcpts(m), ["a@x.test", "b@y.test"]);
    assert_eq!(e.client.ip.to_string(), "127.0.0.1");
    assert_eq!(e.client.helo, "swaks.client.test");
    assert_eq!(e.client.listener, "smtp");
    assert_eq!(e.client.auth_user, None);
    assert_eq!(e.client.tls, None);
    assert_eq!(e.mail.body, BodyType::SevenBit);
    assert!(!e.mail.smtputf8);
    assert_eq!(e.received_by, "relay.test");
}

#[test]
fn swaks_header_and_body_options() {
    let mut relay = Relay::start(RelayOptions::default());
    let rec = Recorder::start(relay.smtp);
    let r = swaks(&[
        "--server",
        &rec.addr.to_string(),
        "--helo",
        "swaks.client.test",
        "--from",
        "sender@swaks.test",
        "--to",
        "a@x.test,b@y.test",
        "--header",
        "Subject: built by swaks",
        "--header",
        "X-Test: one",
        "--body",
        "hello\n.dot line\nbye",
    ]);
    assert!(r.status.success(), "{}", r.text());
    let id = only_queued_id(&r);
    let sent = rec.data_contents();
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert!(contains(sent, b"\r\nX-Test: one\r\n"), "{}", lossy(sent));
    assert!(contains(sent, b"\r\n.dot line\r\n"), "{}", lossy(sent));

    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = by_id(&msgs, &id);
    let head = added_headers(m, sent);
    // swaks writes Date: and Message-Id: itself; nothing may be added twice.
    assert!(!head.contains("Date: "), "{head}");
    assert!(!head.contains("Message-ID: "), "{head}");
    assert_eq!(rcpts(m), ["a@x.test", "b@y.test"]);
    assert_eq!(m.envelope.mail.from, "sender@swaks.test");
    assert_eq!(m.envelope.client.helo, "swaks.client.test");
}

#[test]
fn swaks_starttls_auth_plain() {
    require_swaks_tls();
    let mut relay = Relay::start(tls_relay());
    let r = swaks(&[
        "--server",
        &relay.smtp.to_string(),
        "--helo",
        "tls.client.test",
        "--from",
        "alice@client.test",
        "--to",
        "r@dest.test",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "s3cret",
    ]);
    assert!(r.status.success(), "{}", r.text());
    assert!(r.stdout.contains("235 2.7.0"), "{}", r.text());
    let id = only_queued_id(&r);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = by_id(&msgs, &id);
    let c = &m.envelope.client;
    assert_eq!(c.auth_user.as_deref(), Some("alice"));
    // RFC 3207: the EHLO that counts is the one after the handshake.
    assert_eq!(c.helo, "tls.client.test");
    let tls = c.tls.as_ref().expect("TLS info stored");
    assert!(
        tls.version == "TLSv1.3" || tls.version == "TLSv1.2",
        "{tls:?}"
    );
    assert!(!tls.cipher.is_empty());
    let head = lossy(&m.body[..m.body.len().min(400)]);
    assert!(
        head.contains(&format!(
            "\r\n\t(using {} with cipher {})\r\n",
            tls.version, tls.cipher
        )),
        "{head}"
    );
    assert!(head.contains(" with ESMTPSA id "), "{head}");
    assert!(head.contains("\r\n\tfor <r@dest.test>; "), "{head}");
}

#[test]
fn swaks_starttls_tls12_auth_login() {
    require_swaks_tls();
    let mut relay = Relay::start(tls_relay());
    let r = swaks(&[
        "--server",
        &relay.smtp.to_string(),
        "--from",
        "alice@client.test",
        "--to",
        "r@dest.test",
        "--tls",
        "--tls-protocol",
        "tlsv1_2",
        "--auth",
        "LOGIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "s3cret",
    ]);
    assert!(r.status.success(), "{}", r.text());
    // LOGIN really was the mechanism: the two base64 prompts.
    assert!(r.stdout.contains("334 VXNlcm5hbWU6"), "{}", r.text());
    assert!(r.stdout.contains("334 UGFzc3dvcmQ6"), "{}", r.text());
    let id = only_queued_id(&r);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    let m = by_id(&msgs, &id);
    assert_eq!(m.envelope.client.auth_user.as_deref(), Some("alice"));
    let tls = m.envelope.client.tls.as_ref().expect("TLS info stored");
    assert_eq!(tls.version, "TLSv1.2");
    let head = lossy(&m.body[..m.body.len().min(400)]);
    assert!(head.contains("(using TLSv1.2 with cipher "), "{head}");
    assert!(head.contains(" with ESMTPSA id "), "{head}");
}

#[test]
fn swaks_wrong_password_is_refused() {
    require_swaks_tls();
    let mut relay = Relay::start(tls_relay());
    let r = swaks(&[
        "--server",
        &relay.smtp.to_string(),
        "--from",
        "alice@client.test",
        "--to",
        "r@dest.test",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "wrong",
    ]);
    assert!(!r.status.success(), "{}", r.text());
    assert!(
        r.stdout.contains("535 5.7.8"),
        "expected 535 5.7.8:\n{}",
        r.text()
    );
    assert!(!r.stdout.contains("MAIL FROM"), "{}", r.text());
    assert_nothing_queued(&mut relay);
}

#[test]
fn swaks_without_auth_is_relay_denied() {
    require_swaks_tls();
    let mut relay = Relay::start(tls_relay());
    let r = swaks(&[
        "--server",
        &relay.smtp.to_string(),
        "--from",
        "alice@client.test",
        "--to",
        "r@dest.test",
        "--tls",
    ]);
    assert!(!r.status.success(), "{}", r.text());
    assert!(
        r.stdout
            .contains("554 5.7.1 <r@dest.test>: Relay access denied"),
        "{}",
        r.text()
    );
    assert!(!r.stdout.contains("354 "), "{}", r.text());
    assert_nothing_queued(&mut relay);
}

#[test]
fn swaks_auth_without_tls_fails() {
    let mut relay = Relay::start(tls_relay());
    let r = swaks(&[
        "--server",
        &relay.smtp.to_string(),
        "--from",
        "alice@client.test",
        "--to",
        "r@dest.test",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "s3cret",
    ]);
    assert!(!r.status.success(), "{}", r.text());
    // AUTH is not even advertised before TLS, so swaks gives up on its own.
    assert!(!r.stdout.contains("AUTH PLAIN LOGIN"), "{}", r.text());
    assert!(!r.stdout.contains("235 "), "{}", r.text());
    // A client that tries anyway is told that encryption is required.
    let mut c = relay.connect();
    assert_eq!(code(&c.cmd("EHLO raw.client.test")), 250);
    let reply = c.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==");
    assert!(reply.starts_with("538 5.7.11"), "{reply}");
    assert_eq!(code(&c.cmd("MAIL FROM:<alice@client.test>")), 250);
    let reply = c.cmd("RCPT TO:<r@dest.test>");
    assert!(reply.starts_with("554 5.7.1"), "{reply}");
    assert_eq!(code(&c.cmd("QUIT")), 221);
    assert_nothing_queued(&mut relay);
}

#[test]
fn swaks_pipelining() {
    let mut relay = Relay::start(RelayOptions {
        limits: vec!["max_recipients: 2".into()],
        ..RelayOptions::default()
    });
    let rec = Recorder::start(relay.smtp);
    let r = swaks(&[
        "--server",
        &rec.addr.to_string(),
        "--pipeline",
        "--from",
        "p@client.test",
        "--to",
        "one@dest.test,two@dest.test,three@dest.test",
        "--body",
        "pipelined",
    ]);
    // swaks reports the refused third recipient but still sends to the other two.
    assert!(r.stdout.contains("452 4.5.3"), "{}", r.text());
    let id = only_queued_id(&r);
    let streams = rec.client_streams();
    assert_eq!(streams.len(), 1);
    let s = lossy(&streams[0]);
    // swaks sent MAIL, every RCPT and DATA as one group (RFC 2920), so the relay had
    // to answer a pipelined group, refusal included, in order.
    assert!(
        s.contains("MAIL FROM:<p@client.test>\r\nRCPT TO:<one@dest.test>\r\nRCPT TO:<two@dest.test>\r\nRCPT TO:<three@dest.test>\r\nDATA\r\n"),
        "swaks did not pipeline:\n{s}"
    );
    let sent = rec.data_contents();
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = by_id(&msgs, &id);
    added_headers(m, &sent[0]);
    assert_eq!(rcpts(m), ["one@dest.test", "two@dest.test"]);
}

#[test]
fn swaks_pipelining_over_implicit_tls() {
    require_swaks_tls();
    let mut relay = Relay::start(RelayOptions {
        tls: true,
        implicit_tls: true,
        ..RelayOptions::default()
    });
    let smtps = relay.smtps.unwrap();
    let r = swaks(&[
        "--server",
        &smtps.to_string(),
        "--tlsc",
        "--pipeline",
        "--helo",
        "tlsc.client.test",
        "--from",
        "s@client.test",
        "--to",
        "r1@dest.test,r2@dest.test",
    ]);
    assert!(r.status.success(), "{}", r.text());
    // No STARTTLS on a listener that is already encrypted.
    assert!(!r.stdout.contains("STARTTLS"), "{}", r.text());
    let id = only_queued_id(&r);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = by_id(&msgs, &id);
    let c = &m.envelope.client;
    assert_eq!(c.listener, "smtps");
    assert_eq!(c.helo, "tlsc.client.test");
    assert_eq!(c.auth_user, None);
    assert!(c.tls.is_some());
    assert_eq!(rcpts(m), ["r1@dest.test", "r2@dest.test"]);
    let head = lossy(&m.body[..m.body.len().min(400)]);
    assert!(head.contains(" with ESMTPS id "), "{head}");
    assert!(head.contains("\r\n\t(using TLSv1."), "{head}");
}

// ---------------------------------------------------------------------------------
// Python smtplib

const PY_CLIENT: &str = r#"
import base64, json, smtplib, ssl, sys
from email.message import EmailMessage

port, case = int(sys.argv[1]), sys.argv[2]
out = {}
def reply(t):
    return [t[0], t[1].decode('utf-8', 'replace')]

s = smtplib.SMTP('127.0.0.1', port, local_hostname='py.client.test', timeout=20)
out['ehlo'] = reply(s.ehlo())
out['features'] = sorted(s.esmtp_features)
if case == 'multi':
    m = EmailMessage()
    m['From'] = 'Sender <sender@py.test>'
    m['To'] = 'One <one@a.test>, two@b.test'
    m['Cc'] = 'three@c.test'
    m['Bcc'] = 'hidden@d.test'
    m['Subject'] = 'several recipients'
    m.set_content('hello all\n')
    out['refused'] = s.send_message(m)
elif case == 'smtputf8':
    m = EmailMessage()
    m['From'] = 'Jörg <jörg@exämple.test>'
    m['To'] = '用户@例子.广告'
    m['Subject'] = 'Grüße'
    m.set_content('Grüße aus Köln\n')
    out['refused'] = s.send_message(m)
else:
    body = {
        'eightbit': ('Subject: 8bit\r\nMIME-Version: 1.0\r\n'
                     'Content-Type: text/plain; charset=utf-8\r\n'
                     'Content-Transfer-Encoding: 8bit\r\n\r\n'
                     'Grüße aus Köln — 日本語\r\n').encode(),
        'dots': b'Subject: dots\r\n\r\n.\r\n.leading dot\r\n..two dots\r\nmiddle . dot\r\n.\r\nlast\r\n',
        'orcpt_unitext': 'Subject: unitext ORCPT\r\n\r\nhi\r\n'.encode(),
        'starttls_auth': b'Subject: verified TLS\r\n\r\nsecret\r\n',
    }[case]
    opts, rcpt, rcpt_opts = [], 'r@a.test', []
    if case == 'eightbit':
        opts = ['BODY=8BITMIME']
    if case == 'orcpt_unitext':
        # RFC 6533 3: with SMTPUTF8 the original recipient may go in unitext form.
        opts, rcpt = ['SMTPUTF8'], '用户@例子.广告'
        rcpt_opts = ['NOTIFY=FAILURE', 'ORCPT=utf-8;用户@例子.广告']
    if case == 'starttls_auth':
        ctx = ssl.create_default_context(cafile=sys.argv[3])
        out['starttls'] = reply(s.starttls(context=ctx))
        out['tls_version'] = s.sock.version()
        out['ehlo_tls'] = reply(s.ehlo())
        out['auth'] = reply(s.login('alice', 's3cret'))
    out['mail'] = reply(s.mail('sender@py.test', opts))
    out['rcpt'] = reply(s.rcpt(rcpt, rcpt_opts))
    try:
        out['data'] = reply(s.data(body))
    except smtplib.SMTPResponseException as e:
        out['data'] = [e.smtp_code, e.smtp_error.decode('utf-8', 'replace')]
    out['sent'] = base64.b64encode(body).decode()
out['quit'] = reply(s.quit())
print(json.dumps(out))
"#;

/// Runs one case of [`PY_CLIENT`] through a [`Recorder`]; returns its JSON output and
/// the recording.
fn python_case(relay: &Relay, case: &str, args: &[&str]) -> (serde_json::Value, Recorder) {
    let rec = Recorder::start(relay.smtp);
    let script = relay.dir.path().join("client.py");
    std::fs::write(&script, PY_CLIENT).unwrap();
    let r = run(
        Command::new(tool("python3"))
            .arg(&script)
            .arg(rec.addr.port().to_string())
            .arg(case)
            .args(args),
        Duration::from_secs(30),
    );
    assert!(r.status.success(), "{}", r.text());
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("bad output ({e}):\n{}", r.text()));
    assert_eq!(v["quit"][0], 221, "{v}");
    (v, rec)
}

fn py_queued_id(v: &serde_json::Value) -> String {
    let data = &v["data"];
    assert_eq!(data[0], 250, "{v}");
    let ids = queued_ids(data[1].as_str().unwrap());
    assert_eq!(ids.len(), 1, "{v}");
    ids[0].clone()
}

fn b64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn python_send_message_to_several_recipients() {
    let mut relay = Relay::start(RelayOptions::default());
    let (v, rec) = python_case(&relay, "multi", &[]);
    let sent = rec.data_contents();
    let streams = rec.client_streams();
    assert_eq!(streams.len(), 1);
    // smtplib orders recipients To, Bcc, Cc; the relay must keep the client's order.
    let on_wire: Vec<String> = lossy(&streams[0])
        .lines()
        .filter(|l| l.to_ascii_uppercase().starts_with("RCPT TO:<"))
        .filter_map(|l| Some(l[9..].split('>').next()?.to_owned()))
        .collect();
    assert_eq!(
        on_wire,
        ["one@a.test", "two@b.test", "hidden@d.test", "three@c.test"]
    );
    assert_eq!(v["refused"], serde_json::json!({}), "{v}");
    for f in ["pipelining", "8bitmime", "smtputf8", "size"] {
        assert!(
            v["features"].as_array().unwrap().iter().any(|x| x == f),
            "{v}"
        );
    }
    assert_eq!(sent.len(), 1);
    // smtplib keeps Bcc out of the message and puts it only in the envelope.
    assert!(!contains(&sent[0], b"hidden@d.test"), "{}", lossy(&sent[0]));
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    added_headers(m, &sent[0]);
    assert_eq!(rcpts(m), on_wire);
    assert_eq!(m.envelope.mail.from, "sender@py.test");
    assert_eq!(m.envelope.client.helo, "py.client.test");
    assert!(!contains(&m.body, b"hidden@d.test"));
}

#[test]
fn python_8bitmime_body() {
    let mut relay = Relay::start(RelayOptions::default());
    let (v, rec) = python_case(&relay, "eightbit", &[]);
    let wire = rec.data_contents();
    assert_eq!(v["mail"][0], 250, "{v}");
    assert_eq!(v["rcpt"][0], 250, "{v}");
    let id = py_queued_id(&v);
    let sent = b64_decode(v["sent"].as_str().unwrap());
    assert_eq!(wire, vec![sent.clone()]);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    let m = by_id(&msgs, &id);
    added_headers(m, &sent);
    assert!(contains(&m.body, "Grüße aus Köln — 日本語\r\n".as_bytes()));
    assert_eq!(m.envelope.mail.body, BodyType::EightBitMime);
    assert!(!m.envelope.mail.smtputf8);
}

#[test]
fn python_smtputf8_address() {
    let mut relay = Relay::start(RelayOptions::default());
    let (v, rec) = python_case(&relay, "smtputf8", &[]);
    let sent = rec.data_contents();
    assert_eq!(v["refused"], serde_json::json!({}), "{v}");
    assert_eq!(sent.len(), 1);
    assert!(
        contains(&sent[0], "To: 用户@例子.广告\r\n".as_bytes()),
        "{}",
        lossy(&sent[0])
    );
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    let head = added_headers(m, &sent[0]);
    assert!(head.contains(" with UTF8SMTP id "), "{head}");
    assert!(head.contains("\r\n\tfor <用户@例子.广告>; "), "{head}");
    let mail = &m.envelope.mail;
    assert!(mail.smtputf8, "{mail:?}");
    // smtplib declares 8BITMIME along with SMTPUTF8 for an internationalized message.
    assert_eq!(mail.body, BodyType::EightBitMime);
    assert_eq!(mail.from, "jörg@exämple.test");
    assert_eq!(rcpts(m), ["用户@例子.广告"]);
}

#[test]
fn python_lines_starting_with_dots() {
    let mut relay = Relay::start(RelayOptions::default());
    let (v, rec) = python_case(&relay, "dots", &[]);
    let wire = rec.data_contents();
    assert!(
        contains(
            &rec.client_streams()[0],
            b"\r\n\r\n..\r\n..leading dot\r\n...two dots\r\n"
        ),
        "smtplib did not dot-stuff"
    );
    let id = py_queued_id(&v);
    let sent = b64_decode(v["sent"].as_str().unwrap());
    // Our independent unstuffing of the wire gives back exactly the script's message…
    assert_eq!(wire, vec![sent.clone()]);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    let m = by_id(&msgs, &id);
    // …and so must the relay's.
    added_headers(m, &sent);
    assert!(
        m.body
            .ends_with(b"\r\n\r\n.\r\n.leading dot\r\n..two dots\r\nmiddle . dot\r\n.\r\nlast\r\n")
    );
}

#[test]
fn python_starttls_verified_and_login() {
    let mut relay = Relay::start(tls_relay());
    let cert = relay.cert_path.clone().unwrap();
    let (v, _) = python_case(&relay, "starttls_auth", &[cert.to_str().unwrap()]);
    assert_eq!(v["starttls"][0], 220, "{v}");
    assert_eq!(v["auth"][0], 235, "{v}");
    let id = py_queued_id(&v);
    let sent = b64_decode(v["sent"].as_str().unwrap());
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    let m = by_id(&msgs, &id);
    let head = added_headers(m, &sent);
    let c = &m.envelope.client;
    assert_eq!(c.auth_user.as_deref(), Some("alice"));
    // What Python's ssl module negotiated is what the relay recorded.
    assert_eq!(
        c.tls.as_ref().map(|t| t.version.as_str()),
        v["tls_version"].as_str(),
        "{v}"
    );
    assert!(head.contains(" with ESMTPSA id "), "{head}");
}

/// RFC 6533 3: when SMTPUTF8 is in use, the ORCPT of a UTF-8 address may be sent as
/// `utf-8;` + utf-8-addr-unitext, which is raw UTF-8 rather than xtext. A relay that
/// advertises both SMTPUTF8 and DSN has to take it.
#[test]
fn python_smtputf8_orcpt_in_unitext_form() {
    let mut relay = Relay::start(RelayOptions::default());
    let (v, rec) = python_case(&relay, "orcpt_unitext", &[]);
    assert_eq!(v["mail"][0], 250, "{v}");
    assert_eq!(
        v["rcpt"][0], 250,
        "RCPT with ORCPT=utf-8;<UTF-8 address> refused: {v}"
    );
    let id = py_queued_id(&v);
    let sent = rec.data_contents();
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    let m = by_id(&msgs, &id);
    added_headers(m, &sent[0]);
    let r = &m.envelope.recipients[0];
    assert_eq!(r.address, "用户@例子.广告");
    assert_eq!(r.orcpt.as_deref(), Some("utf-8;用户@例子.广告"));
}

// ---------------------------------------------------------------------------------
// Postfix smtp-source

/// The `-l LEN` payload smtp-source generates: 80-octet lines (a digit, X's, CRLF) and
/// a last partial line that it terminates with CRLF.
fn smtp_source_payload(len: usize) -> Vec<u8> {
    let mut d = vec![b'X'; len];
    let mut i = 80;
    while i < len {
        d[i - 80] = b"0123456789"[(i / 80) % 10];
        d[i - 2] = b'\r';
        d[i - 1] = b'\n';
        i += 80;
    }
    if !d.ends_with(b"\r\n") {
        d.extend_from_slice(b"\r\n");
    }
    d
}

/// Checks one smtp-source message: the relay's Received header only (smtp-source
/// sends Date and Message-Id itself), smtp-source's headers, the exact payload.
/// Returns the Message-Id.
fn check_smtp_source_message(m: &QueuedMessage, subject: Option<&str>, len: usize) -> String {
    let body = &m.body;
    let split = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header/body separator");
    let (head, payload) = (
        std::str::from_utf8(&body[..split + 2]).unwrap(),
        &body[split + 4..],
    );
    assert_eq!(
        payload,
        smtp_source_payload(len).as_slice(),
        "payload of {} differs (truncated or altered?):\n{}",
        m.envelope.id,
        lossy(body)
    );
    let client = head
        .find("\r\nFrom: ")
        .map(|i| &head[i + 2..])
        .unwrap_or_else(|| panic!("no From: in\n{head}"));
    added_headers(m, &body[head.len() - client.len()..]);
    let mut lines = client.split_terminator("\r\n");
    assert_eq!(lines.next(), Some("From: <sender@example.com>"), "{head}");
    assert_eq!(lines.next(), Some("To: <rcpt@example.net>"), "{head}");
    assert!(lines.next().unwrap().starts_with("Date: "), "{head}");
    let msgid = lines.next().unwrap();
    assert!(msgid.starts_with("Message-Id: <"), "{head}");
    if let Some(s) = subject {
        assert_eq!(lines.next(), Some(format!("Subject: {s}").as_str()));
    }
    assert_eq!(lines.next(), None, "{head}");
    msgid.to_owned()
}

#[test]
fn smtp_source_500_messages_in_20_parallel_sessions() {
    let mut relay = Relay::start(RelayOptions::default());
    let r = run(
        Command::new(tool("smtp-source")).args([
            "-s",
            "20",
            "-m",
            "500",
            "-l",
            "1024",
            "-M",
            "source.client.test",
            "-f",
            "sender@example.com",
            "-t",
            "rcpt@example.net",
            &relay.smtp.to_string(),
        ]),
        Duration::from_secs(120),
    );
    // smtp-source aborts on the first reply it did not expect, so success means 500
    // times 250 after DATA.
    assert!(r.status.success(), "{}", r.text());
    assert_eq!(
        metric(&relay, "mailrelay_smtp_messages_accepted_total"),
        Some(500)
    );
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 500);
    let ids: HashSet<_> = msgs.iter().map(|m| m.envelope.id.clone()).collect();
    assert_eq!(ids.len(), 500, "queue ids must be distinct");
    let mut msgids = HashSet::new();
    for m in &msgs {
        assert_eq!(m.envelope.mail.from, "sender@example.com");
        assert_eq!(rcpts(m), ["rcpt@example.net"]);
        assert_eq!(m.envelope.client.helo, "source.client.test");
        let id = check_smtp_source_message(m, None, 1024);
        assert!(
            msgids.insert(id.clone()),
            "duplicate {id}: a message stored twice?"
        );
        // smtp-source says HELO, not EHLO.
        assert!(lossy(&m.body).contains(" with SMTP id "));
    }
}

#[test]
fn smtp_source_several_messages_per_session_and_recipients() {
    let mut relay = Relay::start(RelayOptions::default());
    let r = run(
        Command::new(tool("smtp-source")).args([
            "-d",
            "-c",
            "-s",
            "4",
            "-m",
            "60",
            "-r",
            "3",
            "-l",
            "4000",
            "-S",
            "reused session",
            "-M",
            "source.client.test",
            "-f",
            "sender@example.com",
            "-t",
            "rcpt@example.net",
            &relay.smtp.to_string(),
        ]),
        Duration::from_secs(120),
    );
    assert!(r.status.success(), "{}", r.text());
    // -c prints the running count of completed DATA commands.
    assert!(r.stdout.trim_end().ends_with("60"), "{}", r.text());
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 60);
    let mut msgids = HashSet::new();
    let mut ports = HashSet::new();
    for m in &msgs {
        let mut r = rcpts(m);
        r.sort();
        assert_eq!(
            r,
            ["2rcpt@example.net", "3rcpt@example.net", "rcpt@example.net"]
        );
        assert!(msgids.insert(check_smtp_source_message(m, Some("reused session"), 4000)));
        ports.insert(m.envelope.client.port);
    }
    // -d: four sessions carried all sixty messages.
    assert!(ports.len() <= 4, "{} client ports", ports.len());
}

#[test]
fn smtp_source_preformatted_file_with_dot_lines() {
    let mut relay = Relay::start(RelayOptions::default());
    let file = relay.dir.path().join("source.eml");
    // LF line ends on purpose: smtp-source turns them into CRLF and dot-stuffs.
    std::fs::write(
        &file,
        "Subject: from a file\n\n.\n.hidden\nplain\n..\nend\n",
    )
    .unwrap();
    let rec = Recorder::start(relay.smtp);
    let r = run(
        Command::new(tool("smtp-source"))
            .args(["-s", "2", "-m", "4", "-F"])
            .arg(&file)
            .args(["-f", "s@example.com", "-t", "r@example.net"])
            .arg(rec.addr.to_string()),
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "{}", r.text());
    // smtp-source sends CRLF before the final dot even after a complete last line.
    let expected: &[u8] = b"Subject: from a file\r\n\r\n.\r\n.hidden\r\nplain\r\n..\r\nend\r\n\r\n";
    let streams = rec.client_streams();
    // Without -d, one session per message.
    assert_eq!(streams.len(), 4);
    assert!(
        streams
            .iter()
            .all(|s| contains(s, b"\r\n\r\n..\r\n..hidden\r\nplain\r\n...\r\n")),
        "smtp-source did not dot-stuff: {:?}",
        streams.iter().map(|s| lossy(s)).collect::<Vec<_>>()
    );
    let sent = rec.data_contents();
    assert_eq!(sent.len(), 4);
    assert!(
        sent.iter().all(|s| s == expected),
        "{:?}",
        sent.iter().map(|s| lossy(s)).collect::<Vec<_>>()
    );
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 4);
    for m in &msgs {
        let head = added_headers(m, expected);
        // A file without Date/Message-ID gets both, each once.
        assert_eq!(head.matches("\r\nDate: ").count(), 1, "{head}");
        assert_eq!(head.matches("\r\nMessage-ID: ").count(), 1, "{head}");
    }
}

#[test]
fn smtp_source_large_messages() {
    const LEN: usize = 3_000_000;
    let mut relay = Relay::start(RelayOptions::default());
    let r = run(
        Command::new(tool("smtp-source")).args([
            "-s",
            "2",
            "-m",
            "4",
            "-l",
            &LEN.to_string(),
            "-M",
            "source.client.test",
            "-f",
            "sender@example.com",
            "-t",
            "rcpt@example.net",
            &relay.smtp.to_string(),
        ]),
        Duration::from_secs(120),
    );
    assert!(r.status.success(), "{}", r.text());
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 4);
    for m in &msgs {
        check_smtp_source_message(m, None, LEN);
    }
}

// ---------------------------------------------------------------------------------
// Sender binding: tenants may send only as their own senders

/// alice owns `a.example`, bob owns `bob@b.example` and may send bounces; clients on
/// loopback (a relay network) may send only as `app@c.example`.
fn bound_relay() -> Relay {
    Relay::start(RelayOptions {
        tls: true,
        auth_users: Some("alice:s3cret\nbob:b0b\n".into()),
        relay_networks: Some(vec!["127.0.0.0/8".into()]),
        extra_yaml: "sender_binding:\n  check_from_header: true\n  users:\n    alice: [a.example, '*.a.example']\n    bob: ['bob@b.example', '<>']\n  networks:\n    - {network: 127.0.0.0/8, senders: ['app@c.example']}\n".into(),
        ..RelayOptions::default()
    })
}

fn swaks_as(relay: &Relay, user: Option<(&str, &str)>, from: &str, extra: &[&str]) -> Run {
    let server = relay.smtp.to_string();
    let mut args = vec!["--server", &server, "--from", from, "--to", "r@dest.test"];
    if let Some((u, p)) = user {
        args.extend([
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            u,
            "--auth-password",
            p,
        ]);
    }
    args.extend(extra);
    swaks(&args)
}

#[test]
fn swaks_users_and_networks_are_bound_to_their_senders() {
    require_swaks_tls();
    let mut relay = bound_relay();
    let alice = Some(("alice", "s3cret"));

    // Her own domain and its subdomains pass (swaks writes `From:` as the sender).
    let own = swaks_as(&relay, alice, "ann@a.example", &[]);
    let own_id = only_queued_id(&own);
    let sub = swaks_as(&relay, alice, "ann@eu.a.example", &[]);
    let sub_id = only_queued_id(&sub);

    // Another tenant's domain is refused at MAIL, naming the rule.
    let other = swaks_as(&relay, alice, "ceo@b.example", &[]);
    assert!(
        other.stdout.contains(
            "550 5.7.1 Sender address <ceo@b.example> not allowed for user alice (rule sender_binding.users.alice)"
        ),
        "{}",
        other.text()
    );
    assert!(queued_ids(&other.stdout).is_empty(), "{}", other.text());

    // The envelope is hers but the `From:` header is not: refused after DATA.
    let header = swaks_as(
        &relay,
        alice,
        "ann@a.example",
        &["--header", "From: CEO <ceo@b.example>"],
    );
    assert!(
        header
            .stdout
            .contains("550 5.7.1 From: header address <ceo@b.example> not allowed for user alice"),
        "{}",
        header.text()
    );
    assert!(queued_ids(&header.stdout).is_empty(), "{}", header.text());

    // The relay network's binding: its one address passes, its domain does not.
    let app = swaks_as(&relay, None, "app@c.example", &[]);
    let app_id = only_queued_id(&app);
    let net = swaks_as(&relay, None, "other@c.example", &[]);
    assert!(
        net.stdout.contains(
            "550 5.7.1 Sender address <other@c.example> not allowed for network 127.0.0.0/8 (rule sender_binding.networks[0])"
        ),
        "{}",
        net.text()
    );

    assert_eq!(
        metric(
            &relay,
            "mailrelay_smtp_sender_refused_total{reason=\"mail_from\"}"
        ),
        Some(2)
    );
    assert_eq!(
        metric(
            &relay,
            "mailrelay_smtp_sender_refused_total{reason=\"from_header\"}"
        ),
        Some(1)
    );
    assert!(relay.stop().success(), "{}", relay.log());
    let log = relay.log();
    assert!(
        log.contains("sender not allowed")
            && log.contains("ceo@b.example")
            && log.contains("sender_binding.networks[0]"),
        "{log}"
    );
    let mut queued: Vec<String> = relay
        .queued_messages()
        .iter()
        .map(|m| m.envelope.mail.from.clone())
        .collect();
    queued.sort();
    assert_eq!(
        queued,
        ["ann@a.example", "ann@eu.a.example", "app@c.example"],
        "{own_id} {sub_id} {app_id}"
    );
}

const PY_SENDER: &str = r#"
import json, smtplib, ssl, sys
port, cafile, user, password, sender = sys.argv[1:6]
s = smtplib.SMTP('127.0.0.1', int(port), local_hostname='py.client.test', timeout=20)
s.ehlo()
s.starttls(context=ssl.create_default_context(cafile=cafile))
s.ehlo()
s.login(user, password)
out = {'mail': list(s.mail(sender))}
if out['mail'][0] == 250:
    out['rcpt'] = list(s.rcpt('r@dest.test'))
    try:
        out['data'] = list(s.data(b'Subject: bounce\r\n\r\nreport\r\n'))
    except smtplib.SMTPResponseException as e:
        out['data'] = [e.smtp_code, e.smtp_error]
s.quit()
print(json.dumps({k: [v[0], v[1].decode()] for k, v in out.items()}))
"#;

#[test]
fn python_null_sender_only_where_the_binding_allows_it() {
    let mut relay = bound_relay();
    let script = relay.dir.path().join("sender.py");
    std::fs::write(&script, PY_SENDER).unwrap();
    let send = |user: &str, password: &str, sender: &str| -> serde_json::Value {
        let r = run(
            Command::new(tool("python3"))
                .arg(&script)
                .arg(relay.smtp.port().to_string())
                .arg(relay.cert_path.as_ref().unwrap())
                .args([user, password, sender]),
            Duration::from_secs(30),
        );
        assert!(r.status.success(), "{}", r.text());
        serde_json::from_str(r.stdout.trim()).unwrap()
    };
    // bob lists `<>`: his bounce is queued.
    let bob = send("bob", "b0b", "");
    assert_eq!(bob["data"][0], 250, "{bob}");
    // alice does not: `<>` is refused like any sender outside her binding.
    let alice = send("alice", "s3cret", "");
    assert_eq!(alice["mail"][0], 550, "{alice}");
    assert!(
        alice["mail"][1]
            .as_str()
            .unwrap()
            .starts_with("5.7.1 Sender address <> not allowed for user alice"),
        "{alice}"
    );
    // bob's address pattern is exact: another b.example address is refused.
    let eve = send("bob", "b0b", "eve@b.example");
    assert_eq!(eve["mail"][0], 550, "{eve}");
    assert!(relay.stop().success(), "{}", relay.log());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].envelope.mail.from, "");
    assert_eq!(msgs[0].envelope.client.auth_user.as_deref(), Some("bob"));
}
