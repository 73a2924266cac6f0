//! Ingress send quotas end to end: real relay processes, a real `redis-server`,
//! Python smtplib clients, dnsmasq for MX records and aiosmtpd as the receiving
//! server.
//!
//! - `reject`: three relays on one Redis, 10,000 attempts from 48 concurrent
//!   clients against a 1,000-per-hour quota: exactly 1,000 queued, every other
//!   attempt `451 4.7.1`. The same in one embedded-queue relay (smaller).
//! - `defer`: every message accepted, then released no faster than the window
//!   allows (checked on the release times, which are Redis `TIME` readings) and
//!   all delivered; mail outside the quota and the relay's own bounces pass.
//! - Redis down: `451 4.3.0`; back up: accepted again.
//! - Recipients quotas: `452 4.5.3` at RCPT.
//! - Reload on file change and on SIGHUP, counters kept, bad files ignored.
//! - Usage over the admin API and `mailrelay quota`.

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions, SmtpConn, code};

/// Sends `total` messages from `threads` concurrent smtplib clients spread over
/// `targets`, each client keeping its connection; prints a JSON summary: how many
/// got each `code x.y.z` answer (`250` for accepted), and one sample text of each.
const LOAD: &str = r#"
import json, smtplib, sys, threading
cfg = json.loads(sys.argv[1])
lock = threading.Lock()
state = {"next": 0, "counts": {}, "samples": {}}

def take():
    with lock:
        if state["next"] >= cfg["total"]:
            return None
        state["next"] += 1
        return state["next"]

def note(key, text):
    with lock:
        state["counts"][key] = state["counts"].get(key, 0) + 1
        state["samples"].setdefault(key, text)

def answer(code, text):
    text = text.decode() if isinstance(text, bytes) else str(text)
    parts = text.split()
    return f"{code} {parts[0] if parts else ''}", text

def worker(n):
    host, port = cfg["targets"][n % len(cfg["targets"])]
    conn = None
    while True:
        i = take()
        if i is None:
            break
        msg = f"Subject: {cfg['subject']} {i}\r\nMessage-ID: <{cfg['subject']}.{i}@load.test>\r\n\r\nmessage {i}\r\n"
        for attempt in range(3):
            try:
                if conn is None:
                    conn = smtplib.SMTP(host, port, timeout=120)
                    conn.ehlo("load.test")
                refused = conn.sendmail(cfg["sender"], cfg["rcpts"], msg)
                note("250", "")
                for code, text in refused.values():
                    note(*answer(code, text))
                break
            except smtplib.SMTPSenderRefused as e:
                note(*answer(e.smtp_code, e.smtp_error))
                break
            except smtplib.SMTPDataError as e:
                note(*answer(e.smtp_code, e.smtp_error))
                break
            except smtplib.SMTPRecipientsRefused as e:
                code, text = list(e.recipients.values())[0]
                note(*answer(code, text))
                break
            except (smtplib.SMTPException, OSError) as e:
                conn = None
                note("reconnect", repr(e))
        else:
            note("gave_up", "")
    if conn is not None:
        try:
            conn.quit()
        except Exception:
            pass

threads = [threading.Thread(target=worker, args=(n,)) for n in range(cfg["threads"])]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"counts": state["counts"], "samples": state["samples"]}))
"#;

/// Answer counts of a load run.
struct Load {
    counts: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
}

impl Load {
    fn get(&self, k: &str) -> u64 {
        self.counts.get(k).copied().unwrap_or(0)
    }
}

fn load(relays: &[&Relay], total: usize, threads: usize, sender: &str, subject: &str) -> Load {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("load.py");
    std::fs::write(&script, LOAD).unwrap();
    let targets: Vec<Value> = relays
        .iter()
        .map(|r| json!([r.smtp.ip().to_string(), r.smtp.port()]))
        .collect();
    let cfg = json!({
        "targets": targets, "total": total, "threads": threads, "sender": sender,
        "rcpts": ["someone@dest.test"], "subject": subject,
    });
    let out = Command::new("python3")
        .arg(&script)
        .arg(cfg.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("python3 must be installed");
    assert!(out.status.success(), "load client failed");
    let v: Value = serde_json::from_slice(&out.stdout).expect("load summary");
    let counts = v["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect();
    let samples = v["samples"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.clone(), s.as_str().unwrap().to_owned()))
        .collect();
    Load { counts, samples }
}

fn queue_messages(relay: &Relay) -> u64 {
    let (status, body) = relay.admin_get("/api/v1/queue/stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["messages"]
        .as_u64()
        .unwrap()
}

fn admin_json(relay: &Relay, path: &str) -> (u16, Value) {
    let (status, body) = relay.admin_get(path);
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}")),
    )
}

/// The 10,000 attempts against 1,000: three processes, one Redis.
#[test]
fn reject_three_relays_one_redis_exactly_n_accepted() {
    let redis = RedisServer::start();
    let quotas = "quotas:\n\
        - {name: tenant, direction: ingress, match: {senders: ['*@tenant.test']}, limits: [1000/1h, 100000/1d]}\n\
        - {name: unrelated, direction: ingress, match: {senders: ['*@elsewhere.test']}, limits: [1/1h]}\n";
    let relays: Vec<Relay> = (0..3)
        .map(|_| {
            Relay::start(RelayOptions {
                redis_url: Some(redis.url()),
                extra_yaml: quotas.into(),
                ..Default::default()
            })
        })
        .collect();
    let refs: Vec<&Relay> = relays.iter().collect();
    let started = Instant::now();
    let l = load(&refs, 10_000, 48, "bulk@tenant.test", "reject");
    eprintln!("10,000 attempts in {:?}: {:?}", started.elapsed(), l.counts);
    assert_eq!(l.get("250"), 1000, "{:?}", l.counts);
    assert_eq!(l.get("451 4.7.1"), 9000, "{:?}", l.counts);
    assert_eq!(
        l.counts.len(),
        2,
        "nothing else: {:?} {:?}",
        l.counts,
        l.samples
    );
    let sample = &l.samples["451 4.7.1"];
    assert!(
        sample.contains("Sending quota tenant exceeded (1000/1h)") && sample.contains("resets at"),
        "{sample}"
    );
    assert_eq!(queue_messages(&relays[0]), 1000);

    // Every relay sees the shared usage.
    for r in &relays {
        let (status, v) = admin_json(r, "/api/v1/quotas/tenant");
        assert_eq!(status, 200);
        assert_eq!(v["keys"][0]["key"], "bulk@tenant.test");
        assert_eq!(v["keys"][0]["windows"][0]["used"], 1000);
        assert_eq!(v["keys"][0]["windows"][0]["remaining"], 0);
        assert_eq!(v["keys"][0]["windows"][1]["used"], 1000);
    }
    // Another sender of the tenant has its own counter.
    let mut c = relays[1].connect();
    c.cmd("EHLO c.test");
    assert_eq!(code(&c.cmd("MAIL FROM:<other@tenant.test>")), 250);
    let (_, metrics) = relays[0].admin_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mailrelay_quota_rejections_total{quota=\"tenant\"} ")),
        "{metrics}"
    );
    assert!(metrics.contains("mailrelay_quota_check_seconds_count"));
    assert!(metrics.contains("mailrelay_smtp_messages_rejected_total{reason=\"quota_exceeded\"}"));
}

/// The same semantics with the embedded queue and in-process counters.
#[test]
fn reject_embedded_exactly_n_accepted_and_usage_is_shown() {
    let relay = Relay::start(RelayOptions {
        extra_yaml: "quotas:\n\
            - {name: tenant, direction: ingress, match: {senders: ['tenant.test']}, limits: [100/1h]}\n\
            - {name: everyone, direction: ingress, scope: shared, limits: [100000/1d]}\n"
            .into(),
        ..Default::default()
    });
    let l = load(&[&relay], 400, 12, "bulk@tenant.test", "embedded");
    assert_eq!(l.get("250"), 100, "{:?}", l.counts);
    assert_eq!(l.get("451 4.7.1"), 300, "{:?} {:?}", l.counts, l.samples);
    assert_eq!(queue_messages(&relay), 100);

    let (status, v) = admin_json(&relay, "/api/v1/quotas");
    assert_eq!(status, 200);
    let quotas = v["quotas"].as_array().unwrap();
    assert_eq!(quotas.len(), 2);
    let t = &quotas[0];
    assert_eq!(
        (
            &t["name"],
            &t["direction"],
            &t["scope"],
            &t["action"],
            &t["limits"]
        ),
        (
            &json!("tenant"),
            &json!("ingress"),
            &json!("per_key"),
            &json!("reject"),
            &json!(["100/1h"])
        )
    );
    let w = &t["keys"][0]["windows"][0];
    assert_eq!(
        (
            &w["limit"],
            &w["window_seconds"],
            &w["used"],
            &w["remaining"]
        ),
        (&json!("100/1h"), &json!(3600), &json!(100), &json!(0))
    );
    let resets_in = w["resets_in_seconds"].as_u64().unwrap();
    assert!((3500..=3700).contains(&resets_in), "{w}");
    assert!(w["resets_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(quotas[1]["keys"][0]["key"], "*");
    assert_eq!(quotas[1]["keys"][0]["windows"][0]["used"], 100);

    let (status, v) = admin_json(&relay, "/api/v1/quotas/tenant?key=BULK@tenant.test");
    assert_eq!(status, 200);
    assert_eq!(v["keys"][0]["windows"][0]["used"], 100);
    let (status, v) = admin_json(&relay, "/api/v1/quotas/nope");
    assert_eq!(status, 404);
    assert_eq!(v["error"], "quota nope not found");

    // The CLI reads the same API.
    let admin = format!("http://{}", relay.admin);
    let out = Command::new(support::relay::binary())
        .args(["quota", "list", "--admin", &admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("tenant (ingress, per_key, reject): 100/1h"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("bulk@tenant.test") && l.contains("100/1h") && l.contains(" 100 ")),
        "{text}"
    );
    let out = Command::new(support::relay::binary())
        .args(["quota", "show", "everyone", "--json", "--admin", &admin])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "everyone");
    let out = Command::new(support::relay::binary())
        .args(["quota", "show", "nope", "--admin", &admin])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "mailrelay: quota nope not found (HTTP 404)"
    );
}

/// Sends one message over a raw connection; returns the final reply.
fn send_one(c: &mut SmtpConn, from: &str, rcpts: &[&str]) -> String {
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    if code(&r) != 250 {
        return r;
    }
    let mut ok = 0;
    for to in rcpts {
        if code(&c.cmd(&format!("RCPT TO:<{to}>"))) == 250 {
            ok += 1;
        }
    }
    if ok == 0 {
        c.cmd("RSET");
        return "no recipients".into();
    }
    assert_eq!(code(&c.cmd("DATA")), 354);
    c.cmd("Subject: one\r\n\r\nhello\r\n.")
}

#[test]
fn redis_down_is_a_tempfail_then_recovers() {
    let mut redis = RedisServer::start();
    let relay = Relay::start(RelayOptions {
        redis_url: Some(redis.url()),
        extra_yaml: "quotas: [{name: t, direction: ingress, limits: [10/1h]}]\n".into(),
        ..Default::default()
    });
    let mut c = relay.connect();
    c.cmd("EHLO c.test");
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 250);
    redis.stop();
    let r = send_one(&mut c, "a@s.test", &["r@d.test"]);
    assert!(
        r.starts_with("451 4.3.0 Sending quota check unavailable: quota store (redis) unavailable"),
        "{r}"
    );
    redis.restart();
    // The connection to Redis comes back by itself; the client simply retries.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = send_one(&mut c, "a@s.test", &["r@d.test"]);
        if code(&r) == 250 {
            break;
        }
        assert!(r.starts_with("451 4.3.0"), "{r}");
        assert!(Instant::now() < deadline, "relay did not recover: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, metrics) = relay.admin_get("/metrics");
    assert!(
        metrics.contains("mailrelay_smtp_messages_rejected_total{reason=\"quota_unavailable\"}"),
        "{metrics}"
    );
}

#[test]
fn full_redis_under_a_quota_says_the_queue_store_is_full_and_charges_nothing() {
    // With a quota and standalone Redis, check, charge and enqueue are one script:
    // when Redis is full it is refused before any write, counters included.
    let redis = RedisServer::start_with(
        None,
        &["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"],
    );
    let relay = Relay::start(RelayOptions {
        redis_url: Some(redis.url()),
        extra_yaml: "quotas: [{name: t, direction: ingress, limits: [100000/1h]}]\n".into(),
        ..Default::default()
    });
    let body = format!(
        "Subject: big\r\n\r\n{}.",
        "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n".repeat(900)
    );
    let mut c = relay.connect();
    c.cmd("EHLO c.test");
    let send = |c: &mut SmtpConn| {
        assert_eq!(code(&c.cmd("MAIL FROM:<a@s.test>")), 250);
        assert_eq!(code(&c.cmd("RCPT TO:<r@d.test>")), 250);
        assert_eq!(code(&c.cmd("DATA")), 354);
        c.cmd(&body)
    };
    let mut accepted = 0;
    let refusal = loop {
        let r = send(&mut c);
        match code(&r) {
            250 => accepted += 1,
            _ => break r,
        }
        assert!(accepted < 200, "Redis never filled up");
    };
    assert!(
        refusal.starts_with("451 4.3.1 Error: queue store (redis) full"),
        "{refusal}"
    );
    let (_, v) = admin_json(&relay, "/api/v1/quotas/t");
    assert_eq!(v["keys"][0]["windows"][0]["used"], accepted, "{v}");
    let (_, metrics) = relay.admin_get("/metrics");
    for series in [
        "mailrelay_smtp_messages_rejected_total{reason=\"queue_full\"} 1",
        "mailrelay_queue_write_failures_total{reason=\"full\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == series), "{series}:\n{metrics}");
    }
    // Room again (here: more memory), and the same session goes on.
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).unwrap();
    assert_eq!(code(&send(&mut c)), 250);
    let (_, v) = admin_json(&relay, "/api/v1/quotas/t");
    assert_eq!(v["keys"][0]["windows"][0]["used"], accepted + 1, "{v}");
}

#[test]
fn recipients_quota_answers_452_at_rcpt() {
    let relay = Relay::start(RelayOptions {
        extra_yaml:
            "quotas: [{name: fanout, direction: ingress, unit: recipients, limits: [3/1h]}]\n"
                .into(),
        ..Default::default()
    });
    let mut c = relay.connect();
    c.cmd("EHLO c.test");
    assert_eq!(code(&c.cmd("MAIL FROM:<a@s.test>")), 250);
    for i in 0..3 {
        assert_eq!(code(&c.cmd(&format!("RCPT TO:<r{i}@d.test>"))), 250);
    }
    let r = c.cmd("RCPT TO:<r3@d.test>");
    assert!(
        r.starts_with("452 4.5.3 Too many recipients for sending quota fanout (3/1h)"),
        "{r}"
    );
    assert_eq!(code(&c.cmd("DATA")), 354);
    assert_eq!(code(&c.cmd("Subject: x\r\n\r\nhi\r\n.")), 250);
    // All three are used up: the next sender is told at MAIL.
    let r = c.cmd("MAIL FROM:<a@s.test>");
    assert!(
        r.starts_with("451 4.7.1 Sending quota fanout exceeded (3/1h)"),
        "{r}"
    );
}

fn wait_for(what: &str, relay: &Relay, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn limits_of(relay: &Relay, quota: &str) -> Value {
    admin_json(relay, &format!("/api/v1/quotas/{quota}")).1["limits"].clone()
}

#[test]
fn reload_on_file_change_keeps_counters_and_ignores_bad_files() {
    let relay = Relay::start(RelayOptions {
        extra_yaml: "quotas: [{name: t, direction: ingress, limits: [2/1h]}]\n".into(),
        env: vec![("MAILRELAY_RELOAD_INTERVAL".into(), "200ms".into())],
        ..Default::default()
    });
    let mut c = relay.connect();
    c.cmd("EHLO c.test");
    for _ in 0..2 {
        assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 250);
    }
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 451);

    let original = std::fs::read_to_string(&relay.config_path).unwrap();
    let edit = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&relay.config_path).unwrap();
        assert!(text.contains(from));
        // Written whole and renamed into place, as a ConfigMap update does.
        let tmp = relay.config_path.with_extension("new");
        std::fs::write(&tmp, text.replace(from, to)).unwrap();
        std::fs::rename(&tmp, &relay.config_path).unwrap();
    };
    edit("limits: [2/1h]", "limits: [3/1h]");
    wait_for("the new limit", &relay, || {
        limits_of(&relay, "t") == json!(["3/1h"])
    });
    // The two sent before still count: one more fits, not three.
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 250);
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 451);

    edit("limits: [3/1h]", "limits: [0/1h]");
    wait_for("the invalid file to be noticed", &relay, || {
        relay
            .log()
            .contains("config file is invalid; keeping the quotas in force")
    });
    assert_eq!(limits_of(&relay, "t"), json!(["3/1h"]));
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 451);

    // Removing the quota lifts it; nothing else in the file changed.
    std::fs::write(
        &relay.config_path,
        original.replace(
            "quotas: [{name: t, direction: ingress, limits: [2/1h]}]\n",
            "",
        ),
    )
    .unwrap();
    wait_for("the quota to go", &relay, || {
        admin_json(&relay, "/api/v1/quotas").1["quotas"] == json!([])
    });
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 250);
    assert!(
        !relay.log().contains("take effect after a restart"),
        "{}",
        relay.log()
    );
}

#[test]
fn reload_on_sighup() {
    let relay = Relay::start(RelayOptions {
        extra_yaml: "quotas: [{name: t, direction: ingress, limits: [1/1h]}]\n".into(),
        // No polling: only the signal reloads.
        env: vec![("MAILRELAY_RELOAD_INTERVAL".into(), "0".into())],
        ..Default::default()
    });
    let mut c = relay.connect();
    c.cmd("EHLO c.test");
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 250);
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 451);
    let text = std::fs::read_to_string(&relay.config_path).unwrap();
    std::fs::write(&relay.config_path, text.replace("[1/1h]", "[2/1h]")).unwrap();
    relay.signal("HUP");
    wait_for("the reload", &relay, || {
        limits_of(&relay, "t") == json!(["2/1h"])
    });
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 250);
    assert_eq!(code(&send_one(&mut c, "a@s.test", &["r@d.test"])), 451);
    // A bad file on SIGHUP is ignored, and the relay keeps running.
    std::fs::write(&relay.config_path, "quotas: [{name: t}]\n").unwrap();
    relay.signal("HUP");
    wait_for("the bad file to be noticed", &relay, || {
        relay.log().contains("config file is invalid")
    });
    assert_eq!(limits_of(&relay, "t"), json!(["2/1h"]));
    let mut again = relay.connect();
    assert_eq!(code(&again.cmd("EHLO c.test")), 250);
}

// ---------------------------------------------------------------------------------
// defer: held in the queue, released as the window allows, delivered

/// aiosmtpd that records every message it accepts (arrival time, sender,
/// recipients, subject); `rcpt550@…` gets `550` (to make bounces).
const RECEIVER: &str = r#"
import asyncio, json, sys, time
from aiosmtpd.smtp import SMTP
cfg = json.loads(sys.argv[1])

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("rcpt550@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        subject = ""
        for line in envelope.original_content.split(b"\r\n"):
            if not line:
                break
            if line.lower().startswith(b"subject:"):
                subject = line[8:].strip().decode(errors="replace")
        rec = {"t": time.time(), "from": envelope.mail_from, "rcpts": envelope.rcpt_tos,
               "subject": subject,
               "content": envelope.original_content.decode(errors="replace")}
        with open(cfg["record"], "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 2.0.0 OK"

async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: SMTP(Handler(), hostname="mx.test", decode_data=False),
                             cfg["host"], cfg["port"])
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

struct Receiver {
    child: Child,
    record: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start(host: &str) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("received.jsonl");
        let port = free_ports(1)[0];
        let cfg = json!({"host": host, "port": port, "record": record});
        let (child, line) = support::start_python(dir.path(), RECEIVER, &cfg);
        assert_eq!(line.trim(), "ready");
        Receiver {
            child,
            record,
            port,
            _dir: dir,
        }
    }

    fn records(&self) -> Vec<Value> {
        support::python_server::json_lines(&self.record)
    }

    fn subjects(&self) -> Vec<String> {
        self.records()
            .iter()
            .map(|r| r["subject"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dest.test` and `sender.test` (where bounces go) on 127.0.0.2.
fn zone() -> Dnsmasq {
    Dnsmasq::start(&[
        Record::mx("dest.test", 10, "mx.dest.test"),
        Record::host("mx.dest.test", &["127.0.0.2"]),
        Record::mx("sender.test", 10, "mx.sender.test"),
        Record::host("mx.sender.test", &["127.0.0.2"]),
    ])
}

fn delivery_yaml(dns: &Dnsmasq, rx: &Receiver, quotas: &str) -> String {
    format!(
        "delivery:\n  dns: {{nameservers: ['{}'], port_override: {}, timeout: 2s}}\n  \
         retry: {{first: 1s, max_backoff: 2s, jitter: 0.0}}\n  poll_interval: 200ms\n{quotas}",
        dns.addr(),
        rx.port
    )
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The store-clock times at which held messages were released, from the logs.
fn release_times(relays: &[&Relay]) -> Vec<u64> {
    let mut times = Vec::new();
    for r in relays {
        for line in strip_ansi(&r.log()).lines() {
            if line.contains("quota hold released") {
                let at = line
                    .split("charged_at_ms=")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .unwrap_or_else(|| panic!("no charge time in {line}"));
                times.push(at.parse().unwrap());
            }
        }
    }
    times.sort_unstable();
    times
}

/// Never more than `n` releases in any rolling `window_ms`.
fn assert_rolling_window(times: &[u64], n: usize, window_ms: u64) {
    for (i, t) in times.iter().enumerate() {
        let in_window = times[..=i].iter().filter(|s| *s + window_ms > *t).count();
        assert!(
            in_window <= n,
            "{in_window} releases in the {window_ms} ms up to {t}: {times:?}"
        );
    }
}

#[test]
fn defer_three_relays_release_within_the_window_and_deliver_everything() {
    let redis = RedisServer::start();
    let dns = zone();
    let rx = Receiver::start("127.0.0.2");
    let quotas = "quotas:\n\
        - {name: burst, direction: ingress, action: defer, scope: shared, match: {senders: ['*@bulk.test']}, limits: [20/2s]}\n";
    let relays: Vec<Relay> = (0..3)
        .map(|_| {
            Relay::start(RelayOptions {
                redis_url: Some(redis.url()),
                extra_yaml: delivery_yaml(&dns, &rx, quotas),
                ..Default::default()
            })
        })
        .collect();
    let refs: Vec<&Relay> = relays.iter().collect();
    let sent = 120;
    let l = load(&refs, sent, 12, "news@bulk.test", "defer");
    assert_eq!(
        l.get("250"),
        sent as u64,
        "all accepted: {:?} {:?}",
        l.counts,
        l.samples
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    while rx.records().len() < sent {
        assert!(
            Instant::now() < deadline,
            "only {} of {sent} delivered\n{}",
            rx.records().len(),
            relays[0].log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut subjects = rx.subjects();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), sent, "every message exactly once");
    let times = release_times(&refs);
    assert_eq!(times.len(), sent, "one release per message");
    assert_rolling_window(&times, 20, 2000);
    // It took the window's pace: 120 at 20 per 2 s cannot take less than 10 s.
    assert!(times[sent - 1] - times[0] >= 10_000, "{times:?}");
    let deferrals: u64 = refs
        .iter()
        .map(|r| {
            let (_, m) = r.admin_get("/metrics");
            m.lines()
                .find_map(|l| l.strip_prefix("mailrelay_quota_deferrals_total{quota=\"burst\"} "))
                .map_or(0, |n| n.parse().unwrap())
        })
        .sum();
    assert!(deferrals > 0, "messages waited for their window");
}

#[test]
fn defer_embedded_holds_only_the_quota_s_mail_and_never_bounces() {
    let dns = zone();
    let rx = Receiver::start("127.0.0.2");
    let quotas = "quotas:\n\
        - {name: slow, direction: ingress, action: defer, match: {senders: ['*@sender.test']}, limits: [5/2s]}\n\
        - {name: tiny, direction: ingress, action: defer, match: {senders: ['once@sender.test']}, limits: [1/1h]}\n";
    let relay = Relay::start(RelayOptions {
        extra_yaml: delivery_yaml(&dns, &rx, quotas),
        ..Default::default()
    });
    let mut c = relay.connect();
    c.cmd("EHLO c.test");
    // `once@` gets one message per hour: the first goes (and bounces), the second waits.
    let r = c.cmd("MAIL FROM:<once@sender.test>");
    assert_eq!(code(&r), 250);
    assert_eq!(code(&c.cmd("RCPT TO:<rcpt550@dest.test>")), 250);
    assert_eq!(code(&c.cmd("DATA")), 354);
    assert_eq!(code(&c.cmd("Subject: first\r\n\r\nhi\r\n.")), 250);
    // The bounce of the first must not wait for the sender's quota.
    wait_for("the bounce", &relay, || {
        rx.records().iter().any(|r| {
            (r["from"] == "<>" || r["from"] == "") && r["rcpts"] == json!(["once@sender.test"])
        })
    });
    assert_eq!(
        code(&send_one(&mut c, "once@sender.test", &["held@dest.test"])),
        250
    );
    // Mail outside the quotas is not slowed by them.
    assert_eq!(
        code(&send_one(&mut c, "free@other.test", &["free@dest.test"])),
        250
    );
    wait_for("the unquoted message", &relay, || {
        rx.records()
            .iter()
            .any(|r| r["rcpts"] == json!(["free@dest.test"]))
    });
    // The held one is in the queue, untried, due in about an hour.
    let (_, v) = admin_json(&relay, "/api/v1/queue/messages");
    let held: Vec<&Value> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["rcpts"][0]["address"] == "held@dest.test")
        .collect();
    assert_eq!(held.len(), 1, "{v}");
    assert_eq!(held[0]["attempts"], 0);
    let due_in =
        held[0]["next_attempt_ms"].as_u64().unwrap() as i64 - mailrelay::queue::now_ms() as i64;
    assert!(due_in > 3_000_000, "due in {due_in} ms");
    assert!(
        !rx.records()
            .iter()
            .any(|r| r["rcpts"] == json!(["held@dest.test"]))
    );

    // The embedded pace: 25 messages at 5 per 2 s, all delivered, no burst.
    let l = load(&[&relay], 25, 5, "batch@sender.test", "pace");
    assert_eq!(l.get("250"), 25, "{:?}", l.counts);
    let deadline = Instant::now() + Duration::from_secs(120);
    while rx
        .subjects()
        .iter()
        .filter(|s| s.starts_with("pace "))
        .count()
        < 25
    {
        assert!(
            Instant::now() < deadline,
            "not all delivered\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let times = release_times(&[&relay]);
    // The first `once@` message plus the 25.
    assert_eq!(times.len(), 26);
    assert_rolling_window(&times[1..], 5, 2000);
    let per_subject: HashMap<String, usize> =
        rx.subjects().into_iter().fold(HashMap::new(), |mut m, s| {
            *m.entry(s).or_default() += 1;
            m
        });
    assert!(per_subject.values().all(|n| *n == 1), "{per_subject:?}");
}

/// Held mail waits no longer than the queue lifetime: then it expires untried and
/// its sender gets a bounce (4.4.7), as mail that could not be delivered in time.
#[test]
fn defer_holds_no_longer_than_the_queue_lifetime() {
    let dns = zone();
    let rx = Receiver::start("127.0.0.2");
    let quotas = "quotas:\n\
        - {name: hourly, direction: ingress, action: defer, match: {senders: ['once@sender.test']}, limits: [1/1h]}\n";
    let yaml = delivery_yaml(&dns, &rx, quotas).replace(
        "retry: {first: 1s, max_backoff: 2s, jitter: 0.0}",
        "retry: {first: 1s, max_backoff: 2s, jitter: 0.0, max_lifetime: 4s}",
    );
    let relay = Relay::start(RelayOptions {
        extra_yaml: yaml,
        ..Default::default()
    });
    let mut c = relay.connect();
    c.cmd("EHLO c.test");
    assert_eq!(
        code(&send_one(&mut c, "once@sender.test", &["first@dest.test"])),
        250
    );
    wait_for("the first message", &relay, || {
        rx.records()
            .iter()
            .any(|r| r["rcpts"] == json!(["first@dest.test"]))
    });
    // The hour's one message is spent: the next is held, then expires.
    let reply = send_one(&mut c, "once@sender.test", &["held@dest.test"]);
    assert_eq!(code(&reply), 250);
    let id = reply.trim().rsplit(' ').next().unwrap().to_owned();
    wait_for("the bounce of the held message", &relay, || {
        rx.records().iter().any(|r| {
            (r["from"] == "<>" || r["from"] == "")
                && r["rcpts"] == json!(["once@sender.test"])
                && r["content"]
                    .as_str()
                    .unwrap_or("")
                    .contains("held@dest.test")
        })
    });
    let bounce = rx
        .records()
        .into_iter()
        .find(|r| {
            r["content"]
                .as_str()
                .unwrap_or("")
                .contains("held@dest.test")
        })
        .unwrap();
    let text = bounce["content"].as_str().unwrap();
    assert!(text.contains("Status: 4.4.7"), "{text}");
    assert!(text.contains("Action: failed"), "{text}");
    // Never sent, never tried.
    assert!(
        !rx.records()
            .iter()
            .any(|r| r["rcpts"] == json!(["held@dest.test"]))
    );
    let (status, m) = admin_json(&relay, &format!("/api/v1/queue/messages/{id}"));
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["status"]["attempts"], 0, "{m}");
    assert_eq!(m["status"]["rcpts"][0]["state"], "expired", "{m}");
    assert_eq!(m["status"]["rcpts"][0]["attempts"], json!([]), "{m}");
}
