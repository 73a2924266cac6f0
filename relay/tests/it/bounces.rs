//! Bounces, suppression and success notices end to end: real aiosmtpd sinks answer
//! RCPT with real providers' reply texts, the relay classifies each, lists the
//! invalid recipients, refuses them at RCPT (across two relay processes sharing one
//! real redis-server), forgets them when their TTL ends or an operator removes them,
//! and sends NOTIFY=SUCCESS senders a `relayed` DSN that Python's email module reads.

use crate::support;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::deliver::{api_message, metric, relay_with, relay_with_dns};
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::mx::{content, rcpts};
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions, binary, code};

/// An aiosmtpd that answers RCPT to `<local>@…` with `replies[local]` (any other
/// recipient: 250) and records accepted messages.
const SINK: &str = r#"
import asyncio, base64, json, sys
from aiosmtpd.smtp import SMTP

cfg = json.loads(sys.argv[1])

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local in cfg["replies"]:
            return cfg["replies"][local]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with open(cfg["record"], "a") as f:
            f.write(json.dumps({
                "from": envelope.mail_from,
                "rcpts": envelope.rcpt_tos,
                "content": base64.b64encode(envelope.original_content).decode(),
            }) + "\n")
        return "250 2.0.0 OK queued"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(), hostname="mx.test", decode_data=False),
        cfg["host"], cfg["port"])
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

struct Sink {
    child: Child,
    dir: tempfile::TempDir,
}

impl Sink {
    fn start(host: &str, port: u16, replies: &[(&str, &str)]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let replies: serde_json::Map<String, Value> = replies
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let cfg = json!({
            "host": host, "port": port, "replies": replies,
            "record": dir.path().join("received.jsonl"),
        });
        let (child, line) = support::start_python(dir.path(), SINK, &cfg);
        assert!(line.starts_with("ready"), "sink did not start: {line:?}");
        Sink { child, dir }
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("received.jsonl"))
            .map(|t| {
                t.lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `b.test` (recipients) on 127.0.0.3, `sender.test` (reports) on 127.0.0.2.
fn zone() -> Dnsmasq {
    Dnsmasq::start(&[
        Record::mx("b.test", 10, "mx.b.test"),
        Record::host("mx.b.test", &["127.0.0.3"]),
        Record::mx("sender.test", 10, "mx.sender.test"),
        Record::host("mx.sender.test", &["127.0.0.2"]),
    ])
}

/// Polls `f` for up to a minute.
fn eventually<T>(what: &str, relays: &[&Relay], mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = relays.iter().map(|r| r.log()).collect();
            panic!(
                "timed out waiting for {what}\nrelay logs:\n{}",
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// MAIL FROM and one RCPT in a fresh session; the RCPT reply.
fn rcpt_reply(relay: &Relay, from: &str, to: &str) -> String {
    let mut c = relay.connect();
    assert_eq!(code(&c.cmd("EHLO client.test")), 250);
    assert_eq!(code(&c.cmd(&format!("MAIL FROM:<{from}>"))), 250);
    let r = c.cmd(&format!("RCPT TO:<{to}>"));
    c.cmd("QUIT");
    r
}

/// Sends one message; returns the queue id.
fn send(relay: &Relay, from: &str, rcpt_params: &str, to: &[&str]) -> String {
    let mut c = relay.connect();
    assert_eq!(code(&c.cmd("EHLO client.test")), 250);
    assert_eq!(code(&c.cmd(&format!("MAIL FROM:<{from}>"))), 250);
    for t in to {
        let r = c.cmd(&format!("RCPT TO:<{t}>{rcpt_params}"));
        assert_eq!(code(&r), 250, "{r}");
    }
    assert_eq!(code(&c.cmd("DATA")), 354);
    c.send(
        format!(
            "From: <{from}>\r\nTo: <{}>\r\nSubject: bounce test\r\nMessage-ID: <b-{}@client.test>\r\n\r\nhello\r\n.\r\n",
            to[0],
            free_ports(1)[0]
        )
        .as_bytes(),
    );
    let r = c.reply();
    assert_eq!(code(&r), 250, "{r}");
    c.cmd("QUIT");
    r.split("queued as ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn admin(relay: &Relay, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = support::relay::http_request(relay.admin, method, path, None);
    (status, body)
}

fn suppression_cli(relay: &Relay, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary())
        .arg("suppression")
        .arg("--admin")
        .arg(format!("http://{}", relay.admin))
        .args(args)
        .env_remove("MAILRELAY_ADMIN")
        .output()
        .expect("run mailrelay suppression");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// One reply per category, each a line of `tests/data/bounce-corpus.txt`.
const CORPUS: &[(&str, &str, &str)] = &[
    (
        "gone",
        "550 5.1.1 <gone@b.test>: Recipient address rejected: User unknown in virtual mailbox table",
        "invalid_recipient",
    ),
    (
        "full",
        "552 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
        "mailbox_full",
    ),
    (
        "big",
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "message_too_large",
    ),
    (
        "spam",
        "550 5.7.1 [CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137",
        "content_rejected",
    ),
    (
        "dmarc",
        "550 5.7.26 Unauthenticated email from sender.test is not accepted due to domain's DMARC policy.",
        "policy_auth",
    ),
    (
        "listed",
        "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using zen.spamhaus.org",
        "reputation",
    ),
    (
        "busy",
        "451 4.3.0 Mail server temporarily rejected message.",
        "transient",
    ),
    (
        "loop",
        "554 5.4.14 Hop count exceeded - possible mail loop",
        "dns_routing",
    ),
    (
        "tls",
        "530 5.7.0 Must issue a STARTTLS command first.",
        "tls_failure",
    ),
    // Last: a 421 closes the connection, and the recipients after it would share it.
    (
        "volume",
        "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        "rate_limited",
    ),
];

const SUPPRESSION: &str = "suppression: {auto_add: true, ttl: 30d, scope: sender_domain}\n";

/// The category of recipient `addr`'s last attempt in an admin API answer.
fn last_category(msg: &Value, addr: &str) -> Option<String> {
    let r = msg["status"]["rcpts"]
        .as_array()?
        .iter()
        .find(|r| r["address"] == addr)?;
    r["attempts"].as_array()?.last()?["category"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn real_provider_replies_get_their_category_and_invalid_recipients_are_refused_next_time() {
    let dns = zone();
    let port = free_ports(1)[0];
    let replies: Vec<(&str, &str)> = CORPUS.iter().map(|(l, r, _)| (*l, *r)).collect();
    let _b = Sink::start("127.0.0.3", port, &replies);
    let _sender = Sink::start("127.0.0.2", port, &[]);
    let relay = relay_with_dns(&dns, port, SUPPRESSION);
    let to: Vec<String> = CORPUS
        .iter()
        .map(|(l, _, _)| format!("{l}@b.test"))
        .collect();
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    let id = send(&relay, "alice@sender.test", "", &to);
    let id = mailrelay::queue::QueueId::parse(&id).unwrap();
    let msg = eventually("a category on every recipient", &[&relay], || {
        let m = api_message(&relay, &id)?;
        to.iter()
            .all(|a| last_category(&m, a).is_some())
            .then_some(m)
    });
    for ((_, reply, want), addr) in CORPUS.iter().zip(&to) {
        assert_eq!(
            last_category(&msg, addr).as_deref(),
            Some(*want),
            "{addr} answered {reply:?}"
        );
    }
    // Metrics count failures by category.
    assert!(
        metric(
            &relay,
            "mailrelay_delivery_failures_total{result=\"bounced\",category=\"invalid_recipient\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    // The invalid recipient is listed for the sender's domain, and only it.
    let listed = eventually("the suppression entry", &[&relay], || {
        let (s, body) = admin(&relay, "GET", "/api/v1/suppression");
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        (!v["entries"].as_array().unwrap().is_empty()).then_some(v)
    });
    let entries = listed["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(entries[0]["address"], "gone@b.test");
    assert_eq!(entries[0]["scope"], "domain:sender.test");
    assert_eq!(entries[0]["reason"], "invalid_recipient");
    // The next RCPT to it from that domain is refused, naming suppression; another
    // sender domain is not affected.
    let r = rcpt_reply(&relay, "alice@sender.test", "gone@b.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(r.contains("suppression"), "{r}");
    let r = rcpt_reply(&relay, "bob@other.test", "gone@b.test");
    assert_eq!(code(&r), 250, "{r}");
    assert_eq!(
        metric(
            &relay,
            "mailrelay_suppression_hits_total{action=\"rejected\"}"
        ),
        Some(1.0)
    );
    // `mailrelay queue show` prints the category.
    let out = support::deliver::queue_cli(&relay, &["show", &id.to_string()]);
    assert!(out.contains("category=invalid_recipient"), "{out}");
}

#[test]
fn suppression_is_shared_by_two_relays_on_one_redis_expires_and_can_be_removed() {
    let dns = zone();
    let port = free_ports(1)[0];
    let _b = Sink::start(
        "127.0.0.3",
        port,
        &[("nobody", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found")],
    );
    let _sender = Sink::start("127.0.0.2", port, &[]);
    let redis = RedisServer::start();
    let opts = || RelayOptions {
        redis_url: Some(redis.url()),
        ..RelayOptions::default()
    };
    // A short TTL, so that expiry is seen within the test.
    let yaml = "suppression: {ttl: 4s, scope: sender_domain}\n";
    let a = relay_with(&dns, port, yaml, opts());
    let b = relay_with(&dns, port, yaml, opts());

    send(&a, "alice@sender.test", "", &["nobody@b.test"]);
    // Relay b refuses it once relay a has seen the bounce.
    let refused = eventually("relay b refusing the bounced recipient", &[&a, &b], || {
        let r = rcpt_reply(&b, "carol@sender.test", "nobody@b.test");
        (code(&r) == 550).then_some(r)
    });
    assert!(
        refused.contains("5.1.1") && refused.contains("suppression"),
        "{refused}"
    );
    // The TTL ends: accepted again (no sleeps: polled until it is).
    eventually("the entry expiring", &[&a, &b], || {
        (code(&rcpt_reply(&b, "carol@sender.test", "nobody@b.test")) == 250).then_some(())
    });

    // Manual entries: added through relay a's CLI, seen by relay b, removed through
    // relay b's admin API, accepted by relay a again.
    let (ok, out) = suppression_cli(
        &a,
        &[
            "add",
            "Manual@B.test",
            "--scope",
            "domain:sender.test",
            "--ttl",
            "1h",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("added manual@b.test on domain:sender.test"),
        "{out}"
    );
    let r = rcpt_reply(&b, "carol@sender.test", "manual@b.test");
    assert_eq!(code(&r), 550, "{r}");
    let (ok, out) = suppression_cli(&b, &["list", "--scope", "domain:sender.test"]);
    assert!(
        ok && out.contains("manual@b.test") && out.contains("manual"),
        "{out}"
    );
    let (s, body) = admin(
        &b,
        "DELETE",
        "/api/v1/suppression/domain%3Asender.test/manual%40b.test",
    );
    assert_eq!(s, 204, "{body}");
    let r = rcpt_reply(&a, "carol@sender.test", "manual@b.test");
    assert_eq!(code(&r), 250, "{r}");
    let (s, _) = admin(
        &b,
        "DELETE",
        "/api/v1/suppression/domain%3Asender.test/manual%40b.test",
    );
    assert_eq!(s, 404);
    // A global entry applies to every sender; `remove` through the CLI.
    let (ok, out) = suppression_cli(&b, &["add", "all@b.test", "--ttl", "never"]);
    assert!(ok, "{out}");
    assert_eq!(code(&rcpt_reply(&a, "x@elsewhere.test", "all@b.test")), 550);
    let (ok, out) = suppression_cli(&a, &["remove", "all@b.test"]);
    assert!(ok, "{out}");
    assert_eq!(code(&rcpt_reply(&b, "x@elsewhere.test", "all@b.test")), 250);

    // Bad input is refused naming the field.
    let (ok, out) = suppression_cli(&a, &["add", "x@b.test", "--ttl", "5w"]);
    assert!(!ok && out.contains("ttl"), "{out}");
    let (ok, out) = suppression_cli(&a, &["add", "not-an-address"]);
    assert!(!ok && out.contains("address"), "{out}");
    let (ok, out) = suppression_cli(&a, &["add", "x@b.test", "--scope", "tenant:x"]);
    assert!(!ok && out.contains("scope"), "{out}");
    let (s, body) = admin(&a, "GET", "/api/v1/suppression?limit=0");
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("limit"), "{body}");
}

/// The embedded queue keeps its lists in its redb file: a bounce-added entry and a
/// manual one are still refused after a kill -9 and restart, and a short-lived
/// entry still expires.
#[test]
fn embedded_suppression_survives_a_restart_and_still_expires() {
    let dns = zone();
    let port = free_ports(1)[0];
    let _b = Sink::start(
        "127.0.0.3",
        port,
        &[(
            "nobody",
            "550 5.1.1 <nobody@b.test>: Recipient address rejected: User unknown in local recipient table",
        )],
    );
    let _sender = Sink::start("127.0.0.2", port, &[]);
    let mut relay = relay_with(&dns, port, SUPPRESSION, RelayOptions::default());
    let log = relay.log();
    assert!(
        log.lines()
            .any(|l| l.contains("suppression lists ready") && l.contains("\"embedded\"")),
        "{log}"
    );
    send(&relay, "alice@sender.test", "", &["nobody@b.test"]);
    eventually("the bounce listing the recipient", &[&relay], || {
        (code(&rcpt_reply(&relay, "carol@sender.test", "nobody@b.test")) == 550).then_some(())
    });
    let (ok, out) = suppression_cli(&relay, &["add", "kept@b.test", "--ttl", "1h"]);
    assert!(ok, "{out}");
    let (ok, out) = suppression_cli(&relay, &["add", "brief@b.test", "--ttl", "3s"]);
    assert!(ok, "{out}");
    assert_eq!(
        code(&rcpt_reply(&relay, "x@sender.test", "brief@b.test")),
        550
    );

    relay.kill();
    relay.restart();
    let r = rcpt_reply(&relay, "carol@sender.test", "nobody@b.test");
    assert!(
        code(&r) == 550 && r.contains("5.1.1") && r.contains("suppression"),
        "{r}"
    );
    assert_eq!(
        code(&rcpt_reply(&relay, "x@elsewhere.test", "kept@b.test")),
        550
    );
    let (ok, out) = suppression_cli(&relay, &["list", "--scope", "domain:sender.test"]);
    assert!(
        ok && out.contains("nobody@b.test") && out.contains("invalid_recipient"),
        "{out}"
    );
    // The short TTL ends after the restart as it would have before.
    eventually("the short entry expiring", &[&relay], || {
        (code(&rcpt_reply(&relay, "x@sender.test", "brief@b.test")) == 250).then_some(())
    });
    // Manual removal is kept too.
    let (ok, out) = suppression_cli(&relay, &["remove", "kept@b.test"]);
    assert!(ok, "{out}");
    relay.stop();
    relay.restart();
    assert_eq!(
        code(&rcpt_reply(&relay, "x@elsewhere.test", "kept@b.test")),
        250
    );
    assert_eq!(
        code(&rcpt_reply(&relay, "carol@sender.test", "nobody@b.test")),
        550
    );
}

#[test]
fn dropped_suppressed_recipients_are_accepted_but_never_sent() {
    let dns = zone();
    let port = free_ports(1)[0];
    let b = Sink::start("127.0.0.3", port, &[]);
    let relay = relay_with_dns(
        &dns,
        port,
        "suppression: {on_suppressed: drop, scope: global}\n",
    );
    let (s, body) = admin(&relay, "POST", "/api/v1/suppression/global/quiet%40b.test");
    assert_eq!(s, 200, "{body}");
    // One suppressed and one deliverable recipient: only the second arrives.
    send(
        &relay,
        "alice@sender.test",
        "",
        &["quiet@b.test", "loud@b.test"],
    );
    let got = eventually("the delivery", &[&relay], || {
        let r = b.records();
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(rcpts(&got[0]), ["loud@b.test"]);
    // Only suppressed recipients: answered 250 at the end of data, nothing queued.
    let mut c = relay.connect();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<alice@sender.test>");
    assert_eq!(code(&c.cmd("RCPT TO:<quiet@b.test>")), 250);
    assert_eq!(code(&c.cmd("DATA")), 354);
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n");
    let r = c.reply();
    assert_eq!(code(&r), 250, "{r}");
    assert!(!r.contains("queued as"), "{r}");
    assert_eq!(
        metric(
            &relay,
            "mailrelay_suppression_hits_total{action=\"dropped\"}"
        ),
        Some(2.0)
    );
}

/// The `Action:` fields of a DSN's delivery-status part, read by Python's email
/// package.
fn dsn_actions(raw: &[u8]) -> Vec<String> {
    let script = r#"
import email, sys
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.compat32)
assert msg.get_content_type() == "multipart/report", msg.get_content_type()
assert msg.get_param("report-type") == "delivery-status"
for part in msg.walk():
    if part.get_content_type() == "message/delivery-status":
        blocks = part.get_payload()
        for b in blocks[1:]:
            print(b["Action"], b["Status"], b["Final-Recipient"])
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(raw).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn notify_success_to_a_server_without_dsn_gets_a_relayed_notice() {
    let dns = zone();
    let port = free_ports(1)[0];
    // aiosmtpd does not offer DSN: the NOTIFY parameter cannot go further.
    let b = Sink::start("127.0.0.3", port, &[]);
    let sender = Sink::start("127.0.0.2", port, &[]);
    let relay = relay_with_dns(&dns, port, "");
    send(
        &relay,
        "alice@sender.test",
        " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;ok@b.test",
        &["ok@b.test"],
    );
    // Not asked: no notice.
    send(&relay, "alice@sender.test", "", &["plain@b.test"]);
    let got = eventually("the success notice", &[&relay], || {
        let r = sender.records();
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(got[0]["from"], "<>", "notices come from the null sender");
    assert_eq!(rcpts(&got[0]), ["alice@sender.test"]);
    let actions = dsn_actions(&content(&got[0]));
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(actions[0].starts_with("relayed 2.0.0"), "{actions:?}");
    assert!(actions[0].contains("ok@b.test"), "{actions:?}");
    eventually("both deliveries", &[&relay], || {
        (b.records().len() == 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sender.records().len(),
        1,
        "only the message that asked got a notice"
    );
    // Never to the null sender.
    send(&relay, "", " NOTIFY=SUCCESS", &["null@b.test"]);
    eventually("the null sender's delivery", &[&relay], || {
        (b.records().len() == 3).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sender.records().len(), 1);
}

#[test]
fn bad_suppression_config_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, field) in [
        (
            "suppression: {categories: [user_unknown]}\n",
            "suppression.categories[0]",
        ),
        ("suppression: {ttl: 0s}\n", "suppression.ttl"),
        ("suppression: {ttl: 400d}\n", "suppression.ttl"),
        ("suppression: {ttl: 3w}\n", "suppression.ttl"),
        ("suppression: {scope: tenant}\n", "suppression.scope"),
        (
            "suppression: {on_suppressed: bounce}\n",
            "suppression.on_suppressed",
        ),
        ("suppression: {max_entries: 0}\n", "suppression.max_entries"),
    ] {
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(binary())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml} was accepted");
        assert!(err.contains(field), "{yaml}: {err}");
    }
}

#[test]
fn the_suppression_api_needs_the_admin_token() {
    let relay = Relay::start(RelayOptions {
        admin_token: Some("s3cret-token".into()),
        extra_yaml: "suppression: {}\n".into(),
        ..RelayOptions::default()
    });
    for (method, path) in [
        ("GET", "/api/v1/suppression"),
        ("POST", "/api/v1/suppression/global/x%40b.test"),
        ("DELETE", "/api/v1/suppression/global/x%40b.test"),
    ] {
        let (s, _) = admin(&relay, method, path);
        assert_eq!(s, 401, "{method} {path}");
    }
    let (s, _, body) = support::relay::http_request(
        relay.admin,
        "GET",
        "/api/v1/suppression",
        Some("s3cret-token"),
    );
    assert_eq!(s, 200, "{body}");
}
