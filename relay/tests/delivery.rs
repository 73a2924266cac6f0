//! End-to-end delivery: swaks → mailrelay → aiosmtpd, with MX records served by a
//! real dnsmasq and the receiving servers on 127.0.0.2 / 127.0.0.3 (one port for
//! all, which `delivery.dns.port_override` makes the relay use).
//!
//! The receiving server is scripted by local part: `rcptNNN@` gets reply NNN to RCPT;
//! `laterN@` gets `450` to its first N RCPTs, then `250`. `sleep` in its config
//! delays every DATA reply (a slow server).

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mailrelay::queue::{AttemptResult, QueueId, RcptState};
use serde_json::{Value, json};
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::relay::{Relay, RelayOptions};

const SERVER: &str = r#"
import asyncio, base64, json, re, sys
from aiosmtpd.smtp import SMTP

cfg = json.loads(sys.argv[1])
seen = {}

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        m = re.search(r"rcpt(\d{3})@", address)
        if m:
            code = m.group(1)
            return f"{code} {code[0]}.1.1 scripted {code}"
        m = re.search(r"later(\d+)@", address)
        if m:
            seen[address] = seen.get(address, 0) + 1
            if seen[address] <= int(m.group(1)):
                return "450 4.2.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(cfg.get("sleep", 0))
        rec = {
            "from": envelope.mail_from,
            "rcpts": envelope.rcpt_tos,
            "content": base64.b64encode(envelope.original_content).decode(),
        }
        with open(cfg["record"], "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 2.0.0 OK queued"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(), hostname="mx.test", decode_data=False),
        cfg["host"], cfg["port"])
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

/// One aiosmtpd process; killed on drop.
struct Mx {
    child: Child,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mx {
    fn start(host: &str, port: u16, sleep_secs: f64) -> Mx {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("mx.py");
        std::fs::write(&script, SERVER).unwrap();
        let record = dir.path().join("received.jsonl");
        let cfg = json!({"host": host, "port": port, "record": record, "sleep": sleep_secs});
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(cfg.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (with aiosmtpd) must be installed");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "aiosmtpd did not start on {host}:{port}"
        );
        Mx {
            child,
            record,
            _dir: dir,
        }
    }

    fn records(&self) -> Vec<Value> {
        match std::fs::read_to_string(&self.record) {
            Ok(text) => text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits until `pred` holds for the records received so far.
    fn wait_for(&self, what: &str, relay: &Relay, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.records();
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received {r:#?}\nrelay log:\n{}",
                relay.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Mx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn content(rec: &Value) -> Vec<u8> {
    STANDARD.decode(rec["content"].as_str().unwrap()).unwrap()
}

fn rcpts(rec: &Value) -> Vec<String> {
    rec["rcpts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The zone every test uses: `a.test` with MX 10 on 127.0.0.2 and MX 20 on
/// 127.0.0.3; `b.test` on 127.0.0.3 only; `sender.test` (where bounces go) on
/// 127.0.0.3; `nullmx.test` with a null MX; anything else under `.test` NXDOMAIN.
fn zone() -> Dnsmasq {
    Dnsmasq::start(&[
        Record::mx("a.test", 10, "mx1.a.test"),
        Record::mx("a.test", 20, "mx2.a.test"),
        Record::host("mx1.a.test", &["127.0.0.2"]),
        Record::host("mx2.a.test", &["127.0.0.3"]),
        Record::mx("b.test", 10, "mx.b.test"),
        Record::host("mx.b.test", &["127.0.0.3"]),
        Record::mx("sender.test", 10, "mx.sender.test"),
        Record::host("mx.sender.test", &["127.0.0.3"]),
        Record::null_mx("nullmx.test"),
    ])
}

fn start_relay(dns: &Dnsmasq, port: u16, extra: &str) -> Relay {
    Relay::start(RelayOptions {
        extra_yaml: format!(
            "delivery:\n  dns: {{nameservers: ['{}'], port_override: {port}, timeout: 2s}}\n  \
             retry: {{first: 1s, max_backoff: 2s, jitter: 0.0}}\n  poll_interval: 200ms\n{extra}",
            dns.addr()
        ),
        ..RelayOptions::default()
    })
}

/// Sends one message with swaks; returns the queue id from the `250` reply.
fn swaks(relay: &Relay, from: &str, to: &[&str], data: Option<&str>) -> QueueId {
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", &relay.smtp.to_string(), "--from", from])
        .args(["--to", &to.join(",")])
        .args(["--helo", "client.test"]);
    if let Some(d) = data {
        cmd.args(["--data", d]);
    }
    let out = cmd.output().expect("swaks must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "swaks failed:\n{text}");
    let id = text
        .split("queued as ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no queue id in:\n{text}"));
    QueueId::parse(id).unwrap()
}

fn status_of(relay: &mut Relay, id: &QueueId) -> mailrelay::queue::MessageStatus {
    relay.stop();
    let q = relay.open_queue();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(q.status(id)).unwrap().expect("status kept").1
}

#[test]
fn message_arrives_byte_for_byte_and_is_recorded() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx1 = Mx::start("127.0.0.2", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let data = "Message-ID: <x1@client.test>\r\nDate: Sun, 29 Nov 2026 03:00:00 +0000\r\n\
                From: <alice@sender.test>\r\nTo: <bob@a.test>\r\nSubject: hi\r\n\r\n\
                line one\r\n.leading dot\r\n\r\nlast line";
    // swaks ends the data with CRLF . CRLF; the CRLF belongs to the message.
    let sent = format!("{data}\r\n");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], Some(data));
    let recs = mx1.wait_for("the message", &relay, |r| !r.is_empty());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["from"], "alice@sender.test");
    assert_eq!(rcpts(&recs[0]), ["bob@a.test"]);
    let got = content(&recs[0]);
    assert!(
        got.starts_with(b"Received: "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        got.ends_with(sent.as_bytes()),
        "body changed:\n{:?}",
        String::from_utf8_lossy(&got)
    );
    // Our Received header is all that precedes the original.
    let prefix = &got[..got.len() - sent.len()];
    assert!(!String::from_utf8_lossy(prefix)[1..].contains("\r\nReceived: "));

    let st = status_of(&mut relay, &id);
    assert!(st.is_final(), "{st:?}");
    assert_eq!(st.rcpts[0].state, RcptState::Delivered);
    let a = st.rcpts[0].attempts.last().unwrap();
    assert_eq!(a.result, AttemptResult::Delivered);
    assert_eq!(a.mx.as_deref(), Some("mx1.a.test"));
    assert_eq!(a.ip.as_deref(), Some("127.0.0.2"));
    assert!(a.reply.starts_with("250"), "{a:?}");
}

#[test]
fn refused_first_mx_falls_back_to_the_second() {
    let dns = zone();
    let port = free_ports(1)[0];
    // Nothing listens on 127.0.0.2: the most preferred MX refuses connections.
    let mx2 = Mx::start("127.0.0.3", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    mx2.wait_for("the message at the second MX", &relay, |r| r.len() == 1);
    let st = status_of(&mut relay, &id);
    let a = st.rcpts[0].attempts.last().unwrap();
    assert_eq!(
        (a.result, a.mx.as_deref(), a.ip.as_deref()),
        (
            AttemptResult::Delivered,
            Some("mx2.a.test"),
            Some("127.0.0.3")
        )
    );
}

#[test]
fn per_recipient_outcomes_retry_and_bounce_with_a_dsn() {
    let dns = zone();
    let port = free_ports(1)[0];
    // b.test and sender.test share 127.0.0.3.
    let mx = Mx::start("127.0.0.3", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(
        &relay,
        "alice@sender.test",
        &["ok@b.test", "later1@b.test", "rcpt550@b.test"],
        None,
    );
    // The null sender's bounce must not produce a DSN.
    swaks(&relay, "<>", &["rcpt551@b.test"], None);
    let recs = mx.wait_for("delivery, retry and DSN", &relay, |r| {
        let all: Vec<String> = r.iter().flat_map(rcpts).collect();
        all.contains(&"ok@b.test".into())
            && all.contains(&"later1@b.test".into())
            && all.contains(&"alice@sender.test".into())
    });
    let dsn: Vec<&Value> = recs
        .iter()
        .filter(|r| rcpts(r) == ["alice@sender.test"])
        .collect();
    assert_eq!(dsn.len(), 1, "{recs:#?}");
    assert_eq!(dsn[0]["from"], "<>");
    let text = String::from_utf8_lossy(&content(dsn[0])).into_owned();
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; rcpt550@b.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(!text.contains("ok@b.test>:"), "{text}");
    // Give a wrongly queued DSN for the null sender time to show up.
    std::thread::sleep(Duration::from_secs(3));
    let total_dsns = mx.records().iter().filter(|r| r["from"] == "<>").count();
    assert_eq!(total_dsns, 1, "{:#?}", mx.records());

    let st = status_of(&mut relay, &id);
    let state = |a: &str| st.rcpts.iter().find(|r| r.address == a).unwrap().clone();
    assert_eq!(state("ok@b.test").state, RcptState::Delivered);
    let later = state("later1@b.test");
    assert_eq!(later.state, RcptState::Delivered);
    assert_eq!(later.attempts[0].result, AttemptResult::Deferred);
    assert!(later.attempts[0].reply.starts_with("450"), "{later:?}");
    assert_eq!(state("rcpt550@b.test").state, RcptState::Bounced);
    assert!(st.is_final());
}

#[test]
fn nxdomain_and_null_mx_bounce_at_once() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.3", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(
        &relay,
        "alice@sender.test",
        &["x@nosuch.test", "y@nullmx.test"],
        None,
    );
    let recs = mx.wait_for("the DSN", &relay, |r| !r.is_empty());
    let text = String::from_utf8_lossy(&content(&recs[0])).into_owned();
    assert!(text.contains("Status: 5.1.2"), "{text}");
    assert!(text.contains("Status: 5.1.10"), "{text}");
    let st = status_of(&mut relay, &id);
    assert!(
        st.rcpts.iter().all(|r| r.state == RcptState::Bounced),
        "{st:?}"
    );
    assert_eq!(st.attempts, 1, "bounced without retrying: {st:?}");
}

#[test]
fn killed_relay_loses_nothing() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.2", port, 0.1);
    let mut relay = start_relay(
        &dns,
        port,
        "  lease: 3s\n  max_messages_per_connection: 10\n",
    );
    for i in 0..50 {
        swaks(
            &relay,
            "alice@sender.test",
            &[&format!("m{i}@a.test")],
            None,
        );
    }
    mx.wait_for("some deliveries", &relay, |r| r.len() >= 5);
    relay.signal("KILL");
    relay.wait(Duration::from_secs(10));
    let before = mx.records().len();
    assert!(
        before < 50,
        "all delivered before the kill; test too slow to matter"
    );
    relay.restart();
    let recs = mx.wait_for("every message", &relay, |r| {
        let mut all: Vec<String> = r.iter().flat_map(rcpts).collect();
        all.sort();
        all.dedup();
        all.len() == 50
    });
    eprintln!(
        "{before} delivered before the kill, {} deliveries in all",
        recs.len()
    );
    relay.stop();
}

/// A server that greets every connection with `421` and hangs up.
struct BusyServer(Child);

impl BusyServer {
    fn start(host: &str, port: u16) -> BusyServer {
        let script = format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('{host}', {port}))\ns.listen(16)\nprint('ready', flush=True)\n\
             while True:\n    c,_=s.accept()\n    c.sendall(b'421 4.3.2 too busy\\r\\n')\n    c.close()\n"
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        BusyServer(child)
    }
}

impl Drop for BusyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn busy_greeting_moves_on_to_the_next_mx() {
    let dns = zone();
    let port = free_ports(1)[0];
    let _busy = BusyServer::start("127.0.0.2", port);
    let mx2 = Mx::start("127.0.0.3", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    mx2.wait_for("the message at the second MX", &relay, |r| r.len() == 1);
    let st = status_of(&mut relay, &id);
    let a = st.rcpts[0].attempts.last().unwrap();
    assert_eq!(a.mx.as_deref(), Some("mx2.a.test"), "{st:?}");
    assert_eq!(st.attempts, 1);
}

#[test]
fn sigterm_drains_and_releases_unfinished_mail() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.2", port, 1.0);
    // A long lease: after the restart only a release (not lease expiry) can make
    // the unfinished messages due again within the test's patience.
    let mut relay = Relay::start(RelayOptions {
        extra_yaml: format!(
            "delivery:\n  dns: {{nameservers: ['{}'], port_override: {port}}}\n  \
             lease: 5m\n  max_messages_per_connection: 10\n  poll_interval: 200ms\n",
            dns.addr()
        ),
        shutdown_grace: Some("2s".into()),
        ..RelayOptions::default()
    });
    for i in 0..20 {
        swaks(
            &relay,
            "alice@sender.test",
            &[&format!("m{i}@a.test")],
            None,
        );
    }
    mx.wait_for("the first delivery", &relay, |r| !r.is_empty());
    let t = Instant::now();
    relay.signal("TERM");
    let st = relay.wait(Duration::from_secs(20));
    assert!(st.success(), "{st}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(
        relay.log().contains("released unfinished deliveries"),
        "{}",
        relay.log()
    );
    let before = mx.records().len();
    assert!(
        before < 20,
        "everything delivered before the drain deadline"
    );
    relay.restart();
    let t = Instant::now();
    mx.wait_for("every message", &relay, |r| {
        let mut all: Vec<String> = r.iter().flat_map(rcpts).collect();
        all.sort();
        all.dedup();
        all.len() == 20
    });
    assert!(t.elapsed() < Duration::from_secs(30));
    relay.stop();
}

#[test]
fn two_relays_on_one_redis_share_the_work() {
    let redis = support::redis::RedisServer::start();
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.2", port, 0.02);
    let start = || {
        Relay::start(RelayOptions {
            redis_url: Some(redis.url()),
            extra_yaml: format!(
                "delivery:\n  dns: {{nameservers: ['{}'], port_override: {port}}}\n  \
                 lease: 10s\n  max_messages_per_connection: 5\n  poll_interval: 100ms\n",
                dns.addr()
            ),
            ..RelayOptions::default()
        })
    };
    let mut one = start();
    let mut two = start();
    for i in 0..100 {
        let via = if i % 2 == 0 { &one } else { &two };
        swaks(via, "alice@sender.test", &[&format!("r{i}@a.test")], None);
    }
    let recs = mx.wait_for("all 100 messages", &one, |r| {
        let mut all: Vec<String> = r.iter().flat_map(rcpts).collect();
        all.sort();
        all.dedup();
        all.len() == 100
    });
    // Nobody died and leases outlast every delivery here, so each message was
    // delivered exactly once.
    assert_eq!(recs.len(), 100, "duplicates: {}", recs.len() - 100);
    let by = |r: &Relay| r.log().matches(" delivered ").count();
    let (a, b) = (by(&one), by(&two));
    eprintln!("relay one delivered {a}, relay two {b}");
    assert_eq!(a + b, 100);
    one.stop();
    two.stop();
}

#[test]
fn smarthost_takes_everything() {
    let dns = zone();
    let port = free_ports(1)[0];
    let hub = Mx::start("127.0.0.2", port, 0.0);
    // No MX lookups in smarthost mode: even a domain that does not exist goes there.
    let relay = start_relay(
        &dns,
        port,
        &format!("  smarthost: {{host: 127.0.0.2, port: {port}, tls: disabled}}\n"),
    );
    swaks(
        &relay,
        "alice@sender.test",
        &["x@nosuch.test", "y@b.test", "z@B.TEST"],
        None,
    );
    let recs = hub.wait_for("the message at the smarthost", &relay, |r| !r.is_empty());
    assert_eq!(recs.len(), 1, "one connection, one transaction: {recs:#?}");
    let mut got = rcpts(&recs[0]);
    got.sort();
    assert_eq!(got, ["x@nosuch.test", "y@b.test", "z@B.TEST"]);
}
