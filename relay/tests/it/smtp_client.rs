//! The delivery SMTP client against a real server: Python's aiosmtpd, scripted per
//! recipient (a local part ending in `rcptNNN` gets that reply to RCPT, one ending in
//! `dataNNN` makes the reply after the content NNN), recording every accepted message
//! to a JSON-lines file so the test can compare octets.
//!
//! aiosmtpd and openssl come from `.ci/install-deps`; a missing one fails the test.

use crate::support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mailrelay::delivery::smtp_client::{
    ClientConfig, ClientTimeouts, ClientTls, ConnectionResult, Credentials, Outcome, Stage,
    TlsPolicy, deliver,
};
use mailrelay::queue::{
    BodyType, ClientInfo, Envelope, MailParams, QueueId, QueuedMessage, Recipient,
};
use serde_json::{Value, json};
use support::pki::Pki;
use tokio::net::TcpStream;

const SERVER: &str = r#"
import asyncio, base64, json, re, ssl, sys
from aiosmtpd.smtp import SMTP, AuthResult

cfg = json.loads(sys.argv[1])

class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        extra = ["250-" + e for e in cfg.get("extra_ehlo", [])]
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        # With PIPELINING the rest of the group is already waiting in the buffer.
        buffered = bytes(getattr(server._reader, "_buffer", b""))
        session.pipelined = b"RCPT TO" in buffered.upper()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        m = re.search(r"rcpt(\d{3})@", address)
        if m:
            code = m.group(1)
            return f"{code} {code[0]}.1.1 scripted {code}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        for r in envelope.rcpt_tos:
            m = re.search(r"data(\d{3})@", r)
            if m:
                code = m.group(1)
                return f"{code} {code[0]}.3.0 scripted data {code}"
        rec = {
            "from": envelope.mail_from,
            "rcpts": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "content": base64.b64encode(envelope.original_content).decode(),
            "tls": session.ssl is not None,
            "auth": bool(session.authenticated),
            "pipelined": getattr(session, "pipelined", False),
        }
        with open(cfg["record"], "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 2.0.0 OK queued"

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = auth_data.login == b"user" and auth_data.password == b"secret"
    return AuthResult(success=ok, handled=False)

kwargs = dict(
    hostname="mx.test",
    decode_data=False,
    enable_SMTPUTF8=cfg.get("smtputf8", True),
    data_size_limit=cfg.get("size", 33554432),
)
if cfg.get("cert"):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    kwargs.update(tls_context=ctx, require_starttls=cfg.get("require_starttls", False))
if cfg.get("auth"):
    kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=True)

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Handler(), **kwargs), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

/// One aiosmtpd process; killed on drop.
struct Mx {
    child: Child,
    port: u16,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mx {
    fn start(mut cfg: Value) -> Mx {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("received.jsonl");
        cfg["record"] = json!(record);
        let (child, line) = support::start_python(dir.path(), SERVER, &cfg);
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("aiosmtpd did not start (printed {line:?})"));
        Mx {
            child,
            port,
            record,
            _dir: dir,
        }
    }

    fn records(&self) -> Vec<Value> {
        support::python_server::json_lines(&self.record)
    }

    async fn deliver(
        &self,
        tls: &ClientTls,
        server_name: &str,
        messages: &[&QueuedMessage],
        cfg: &ClientConfig,
    ) -> ConnectionResult {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(60),
            deliver(stream, tls, server_name, messages, cfg, &timeouts()),
        )
        .await
        .expect("delivery finishes")
    }
}

impl Drop for Mx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Short enough that a hang fails the test quickly, long enough for a slow CI box.
fn timeouts() -> ClientTimeouts {
    let t = Duration::from_secs(15);
    ClientTimeouts {
        greeting: t,
        mail: t,
        rcpt: t,
        data_init: t,
        data_block: t,
        data_termination: t,
        command: t,
        tls_handshake: t,
        quit: t,
    }
}

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

fn content(record: &Value) -> Vec<u8> {
    STANDARD
        .decode(record["content"].as_str().unwrap())
        .unwrap()
}

fn results(r: &ConnectionResult, m: usize) -> Vec<(Outcome, Stage, u16)> {
    r.messages[m]
        .recipients
        .iter()
        .map(|o| (o.result, o.stage, o.reply.code))
        .collect()
}

/// A throw-away CA and a leaf for `mx.test` signed by it (webpki refuses a
/// self-signed certificate as an end entity).
fn mx_pki() -> Pki {
    Pki::new(&["mx.test"])
}

/// The server side of `pki` for the aiosmtpd script.
fn server_cfg(pki: &Pki) -> Value {
    json!({"cert": pki.cert(), "key": pki.key()})
}

/// A client that trusts `pki`'s CA.
fn client_tls(pki: &Pki) -> ClientTls {
    ClientTls::new(Some(&pki.ca())).unwrap()
}

fn system_tls() -> ClientTls {
    ClientTls::new(None).expect("system CA store")
}

fn cfg() -> ClientConfig {
    ClientConfig::new("relay.test")
}

const DOTTY: &[u8] = b"From: a@src.test\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n \r\nx.\r\n.\r\n.end\r\n";

#[tokio::test]
async fn plain_delivery_is_byte_exact_and_splits_mixed_outcomes() {
    let mx = Mx::start(json!({}));
    let a = message(
        "a@src.test",
        &[
            "ok@dst.test",
            "busy-rcpt450@dst.test",
            "gone-rcpt550@dst.test",
        ],
        DOTTY,
    );
    // A body that does not end with CRLF arrives with one.
    let b = message("", &["ok2@dst.test"], b"Subject: x\r\n\r\nno final newline");
    let r = mx
        .deliver(&system_tls(), "mx.test", &[&a, &b], &cfg())
        .await;
    assert_eq!(r.error, None);
    assert_eq!(r.tls, None);
    let caps = r.capabilities.as_ref().unwrap();
    assert!(caps.esmtp && !caps.pipelining && caps.eight_bit_mime);
    assert_eq!(
        results(&r, 0),
        vec![
            (Outcome::Delivered, Stage::Message, 250),
            (Outcome::Deferred, Stage::Rcpt, 450),
            (Outcome::Bounced, Stage::Rcpt, 550),
        ]
    );
    assert_eq!(r.messages[0].recipients[2].reply.lines, ["scripted 550"]);
    assert_eq!(
        results(&r, 1),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    let recs = mx.records();
    assert_eq!(recs.len(), 2);
    assert_eq!(content(&recs[0]), DOTTY);
    assert_eq!(recs[0]["rcpts"], json!(["ok@dst.test"]));
    assert_eq!(recs[0]["from"], "a@src.test");
    assert_eq!(recs[0]["pipelined"], false);
    assert_eq!(content(&recs[1]), b"Subject: x\r\n\r\nno final newline\r\n");
    assert_eq!(recs[1]["from"], "<>");
}

#[tokio::test]
async fn pipelined_messages_share_a_connection_with_rset_after_refusals() {
    let mx = Mx::start(json!({"extra_ehlo": ["PIPELINING"]}));
    let m1 = message("a@s.test", &["one@d.test", "two@d.test"], DOTTY);
    let m2 = message(
        "a@s.test",
        &["x-rcpt550@d.test", "y-rcpt451@d.test"],
        b"m2\r\n",
    );
    let m3 = message("a@s.test", &["fine@d.test", "z-data451@d.test"], b"m3\r\n");
    let m4 = message("b@s.test", &["four@d.test"], b"m4\r\n");
    let r = mx
        .deliver(&system_tls(), "mx.test", &[&m1, &m2, &m3, &m4], &cfg())
        .await;
    assert_eq!(r.error, None);
    assert!(r.capabilities.as_ref().unwrap().pipelining);
    assert_eq!(
        results(&r, 0),
        vec![(Outcome::Delivered, Stage::Message, 250); 2]
    );
    // aiosmtpd answers the pipelined DATA with 503; that must not override the RCPT
    // replies.
    assert_eq!(
        results(&r, 1),
        vec![
            (Outcome::Bounced, Stage::Rcpt, 550),
            (Outcome::Deferred, Stage::Rcpt, 451)
        ]
    );
    assert_eq!(
        results(&r, 2),
        vec![(Outcome::Deferred, Stage::Message, 451); 2]
    );
    assert_eq!(
        results(&r, 3),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    let recs = mx.records();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(content(&recs[0]), DOTTY);
    assert_eq!(recs[0]["rcpts"], json!(["one@d.test", "two@d.test"]));
    assert_eq!(content(&recs[1]), b"m4\r\n");
    assert_eq!(recs[1]["from"], "b@s.test");
    assert!(
        recs.iter().all(|r| r["pipelined"] == true),
        "MAIL, RCPT and DATA went as one group: {recs:?}"
    );
}

#[tokio::test]
async fn opportunistic_starttls_satisfies_a_server_that_requires_it() {
    let pki = mx_pki();
    let mut scfg = server_cfg(&pki);
    scfg["require_starttls"] = json!(true);
    let mx = Mx::start(scfg);
    // A few MB with dot lines: content is written in blocks through TLS.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 3 << 20 {
        big.extend_from_slice(b".dot line\r\nand a plain one that is a bit longer than that\r\n");
    }
    let m = message("a@s.test", &["t@d.test"], &big);
    // Opportunistic does not verify: the system store does not know our CA.
    let r = mx.deliver(&system_tls(), "mx.test", &[&m], &cfg()).await;
    assert_eq!(r.error, None);
    assert_eq!(
        results(&r, 0),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    let tls = r.tls.expect("TLS was used");
    assert!(tls.version.starts_with("TLSv1."), "{tls:?}");
    assert!(!tls.cipher.is_empty() && tls.cipher != "unknown", "{tls:?}");
    let recs = mx.records();
    assert_eq!(recs[0]["tls"], true);
    assert!(content(&recs[0]) == big, "large body arrived intact");
}

#[tokio::test]
async fn required_tls_verifies_the_certificate() {
    let pki = mx_pki();
    let mx = Mx::start(server_cfg(&pki));
    let m = message("a@s.test", &["t@d.test"], b"x\r\n");
    let mut c = cfg();
    c.tls = TlsPolicy::Required;
    let r = mx.deliver(&client_tls(&pki), "mx.test", &[&m], &c).await;
    assert_eq!(
        results(&r, 0),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    assert!(r.tls.is_some());
    // Unknown CA, and a name the certificate does not carry: deferred at STARTTLS.
    for (tls, name) in [(system_tls(), "mx.test"), (client_tls(&pki), "other.test")] {
        let r = mx.deliver(&tls, name, &[&m], &c).await;
        let o = &r.messages[0].recipients[0];
        assert_eq!(
            (o.result, o.stage),
            (Outcome::Deferred, Stage::StartTls),
            "{name}"
        );
        assert!(
            r.error.as_deref().unwrap().contains("TLS handshake failed"),
            "{:?}",
            r.error
        );
    }
    assert_eq!(mx.records().len(), 1);
}

#[tokio::test]
async fn required_tls_to_a_server_without_starttls_defers() {
    let mx = Mx::start(json!({}));
    let m = message("a@s.test", &["t@d.test"], b"x\r\n");
    let mut c = cfg();
    c.tls = TlsPolicy::Required;
    let r = mx.deliver(&system_tls(), "mx.test", &[&m], &c).await;
    let o = &r.messages[0].recipients[0];
    assert_eq!((o.result, o.stage), (Outcome::Deferred, Stage::StartTls));
    assert!(o.reply.lines[0].contains("STARTTLS not offered"), "{o:?}");
    assert_eq!(r.error, None, "ended politely with QUIT");
    assert!(mx.records().is_empty());
}

#[tokio::test]
async fn auth_to_a_smarthost_over_tls() {
    let pki = mx_pki();
    let mut scfg = server_cfg(&pki);
    scfg["auth"] = json!(true);
    let mx = Mx::start(scfg);
    let m = message("a@s.test", &["t@d.test"], b"x\r\n");
    let mut c = cfg();
    c.auth = Some(Credentials {
        username: "user".into(),
        password: "secret".into(),
    });
    let r = mx.deliver(&system_tls(), "mx.test", &[&m], &c).await;
    assert_eq!(
        results(&r, 0),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    let recs = mx.records();
    assert_eq!(
        (recs[0]["auth"].clone(), recs[0]["tls"].clone()),
        (json!(true), json!(true))
    );
    // Wrong password: deferred, never bounced.
    c.auth.as_mut().unwrap().password = "wrong".into();
    let r = mx.deliver(&system_tls(), "mx.test", &[&m], &c).await;
    let o = &r.messages[0].recipients[0];
    assert_eq!(
        (o.result, o.stage, o.reply.code),
        (Outcome::Deferred, Stage::Auth, 535)
    );
    assert_eq!(mx.records().len(), 1);
}

#[tokio::test]
async fn size_and_smtputf8_are_checked_before_sending() {
    let mx = Mx::start(json!({"size": 1000, "smtputf8": false}));
    let big = message("a@s.test", &["t@d.test"], &[b'x'; 1500]);
    let mut utf = message("jösé@s.test", &["t@d.test"], b"x\r\n");
    utf.envelope.mail.smtputf8 = true;
    let mut eight = message(
        "a@s.test",
        &["t@d.test"],
        "Subject: ü\r\n\r\nGrüße\r\n".as_bytes(),
    );
    eight.envelope.mail.body = BodyType::EightBitMime;
    let r = mx
        .deliver(&system_tls(), "mx.test", &[&big, &utf, &eight], &cfg())
        .await;
    let o = &r.messages[0].recipients[0];
    assert_eq!(
        (o.result, o.stage, o.remote),
        (Outcome::Bounced, Stage::Mail, false)
    );
    assert_eq!(
        (o.reply.code, o.reply.enhanced.map(|e| (e.0, e.1, e.2))),
        (552, Some((5, 3, 4)))
    );
    let o = &r.messages[1].recipients[0];
    assert_eq!(
        (o.result, o.reply.enhanced.map(|e| (e.0, e.1, e.2))),
        (Outcome::Bounced, Some((5, 6, 7)))
    );
    assert!(!r.messages[0].attempted && !r.messages[1].attempted);
    assert_eq!(
        results(&r, 2),
        vec![(Outcome::Delivered, Stage::Message, 250)]
    );
    let recs = mx.records();
    assert_eq!(recs.len(), 1);
    let size = format!("SIZE={}", eight.body.len());
    assert_eq!(recs[0]["mail_options"], json!([size, "BODY=8BITMIME"]));
    assert_eq!(content(&recs[0]), eight.body);
}

#[tokio::test]
async fn a_silent_server_times_out_at_the_greeting() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(sock);
    });
    let m = message("a@s.test", &["t@d.test"], b"x\r\n");
    let mut t = timeouts();
    t.greeting = Duration::from_millis(300);
    let stream = TcpStream::connect(addr).await.unwrap();
    let r = deliver(stream, &system_tls(), "mx.test", &[&m], &cfg(), &t).await;
    let o = &r.messages[0].recipients[0];
    assert_eq!((o.result, o.stage), (Outcome::Deferred, Stage::Greeting));
    assert!(
        r.error.as_deref().unwrap().contains("timeout"),
        "{:?}",
        r.error
    );
    hold.abort();
}
