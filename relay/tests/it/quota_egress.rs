//! Egress pacing end to end: mailrelay processes on one real Redis (or the embedded
//! store) deliver through real dnsmasq to real aiosmtpd servers, which timestamp
//! every message and count their open connections. The assertions are invariants at
//! the receiver (never more than N in any rolling window, never more connections
//! than the cap), not durations.
//!
//! The receiving server is scripted through its JSON config: `greet421` (that many
//! first connections get `421` and are closed), `mail451` (that many first MAIL
//! commands get `451 4.7.1`), and a recipient starting with `stall` makes the first
//! DATA of the run hang forever.

use crate::support;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use mailrelay::config::RedisConfig;
use mailrelay::quota::egress::backoff::BackoffPolicy;
use mailrelay::quota::egress::memory::MemoryStore;
use mailrelay::quota::egress::pacer::Window;
use mailrelay::quota::egress::redis::RedisStore;
use mailrelay::quota::egress::store::{Acquire, Close, Commit, Extend, KeyRef, Timing, Verdict};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::redis::{RedisCluster, RedisServer};
use support::relay::{Relay, RelayOptions};

const SERVER: &str = r#"
import asyncio, json, sys, time
from aiosmtpd.smtp import SMTP

cfg = json.loads(sys.argv[1])
state = {"conns": 0, "open": 0, "mails": 0, "stalled": False}

def log(rec):
    rec["t"] = time.time()
    with open(cfg["record"], "a") as f:
        f.write(json.dumps(rec) + "\n")

class Handler:
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        state["mails"] += 1
        if state["mails"] <= cfg.get("mail451", 0):
            log({"ev": "mail451", "from": address})
            return "451 4.7.1 rate limited, slow down"
        log({"ev": "mail", "from": address})
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_DATA(self, server, session, envelope):
        if any(r.startswith("stall") for r in envelope.rcpt_tos) and not state["stalled"]:
            state["stalled"] = True
            log({"ev": "stall"})
            await asyncio.sleep(3600)
        log({"ev": "msg", "from": envelope.mail_from, "rcpts": envelope.rcpt_tos})
        return "250 2.0.0 OK"

class Counting(SMTP):
    def connection_made(self, transport):
        state["open"] += 1
        log({"ev": "open", "open": state["open"]})
        super().connection_made(transport)

    def connection_lost(self, exc):
        state["open"] -= 1
        log({"ev": "close", "open": state["open"]})
        super().connection_lost(exc)

class Reject(asyncio.Protocol):
    def connection_made(self, transport):
        log({"ev": "reject421"})
        transport.write(b"421 4.7.0 too many connections, slow down\r\n")
        transport.close()

def factory():
    state["conns"] += 1
    if state["conns"] <= cfg.get("greet421", 0):
        return Reject()
    return Counting(Handler(), hostname="mx.test", decode_data=False)

async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(factory, cfg["host"], cfg["port"])
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

/// One scripted aiosmtpd process; killed on drop.
struct Mx {
    child: Child,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mx {
    fn start(host: &str, port: u16, script: Value) -> Mx {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("events.jsonl");
        let mut cfg = script;
        cfg["host"] = json!(host);
        cfg["port"] = json!(port);
        cfg["record"] = json!(record);
        let (child, line) = support::start_python(dir.path(), SERVER, &cfg);
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

    fn events(&self) -> Vec<Value> {
        support::python_server::json_lines(&self.record)
    }

    fn of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["ev"] == kind)
            .collect()
    }

    /// Receiver timestamps (seconds) of the messages accepted.
    fn message_times(&self) -> Vec<f64> {
        self.of("msg")
            .iter()
            .map(|e| e["t"].as_f64().unwrap())
            .collect()
    }

    /// The most connections ever open at once.
    fn max_open(&self) -> u64 {
        self.of("open")
            .iter()
            .map(|e| e["open"].as_u64().unwrap())
            .max()
            .unwrap_or(0)
    }

    /// Waits (generously) until `n` messages arrived.
    fn wait_messages(&self, n: usize, relays: &[&Relay]) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let got = self.of("msg").len();
            if got >= n {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = relays.iter().map(|r| r.log()).collect();
                panic!(
                    "only {got} of {n} messages arrived; events {:#?}\nrelay logs:\n{}",
                    self.events(),
                    logs.join("\n-----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Mx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The most of `times` (seconds) inside any closed interval of `window` seconds.
fn max_in_window(times: &[f64], window: f64) -> usize {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    (0..t.len())
        .map(|i| t[i..].iter().take_while(|&&x| x <= t[i] + window).count())
        .max()
        .unwrap_or(0)
}

/// `paced.test` on 127.0.0.2; `c.test` and `d.test` both on the one MX host
/// `mx.shared.test` (127.0.0.3); `slow.test` on 127.0.0.4; `sender.test`, where
/// bounces would go, on 127.0.0.5.
fn zone() -> Dnsmasq {
    Dnsmasq::start(&[
        Record::mx("paced.test", 10, "mx.paced.test"),
        Record::host("mx.paced.test", &["127.0.0.2"]),
        Record::mx("c.test", 10, "mx.shared.test"),
        Record::mx("d.test", 10, "mx.shared.test"),
        Record::host("mx.shared.test", &["127.0.0.3"]),
        Record::mx("slow.test", 10, "mx.slow.test"),
        Record::host("mx.slow.test", &["127.0.0.4"]),
        Record::mx("sender.test", 10, "mx.sender.test"),
        Record::host("mx.sender.test", &["127.0.0.5"]),
    ])
}

fn relay(
    dns: &Dnsmasq,
    port: u16,
    redis: Option<&RedisServer>,
    delivery: &str,
    quotas: &str,
) -> Relay {
    Relay::start(RelayOptions {
        redis_url: redis.map(RedisServer::url),
        extra_yaml: format!(
            "delivery:\n  dns: {{nameservers: ['{}'], port_override: {port}, timeout: 2s}}\n  \
             retry: {{first: 1s, max_backoff: 2s, jitter: 0.0}}\n  poll_interval: 200ms\n{delivery}\
             quotas:\n{quotas}",
            dns.addr()
        ),
        ..RelayOptions::default()
    })
}

/// Submits one message per recipient over one SMTP session; returns the queue ids.
fn submit(relay: &Relay, rcpts: &[String]) -> Vec<String> {
    let mut c = relay.connect();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let mut ids = Vec::new();
    for (i, r) in rcpts.iter().enumerate() {
        assert!(c.cmd("MAIL FROM:<alice@sender.test>").starts_with("250"));
        let reply = c.cmd(&format!("RCPT TO:<{r}>"));
        assert!(reply.starts_with("250"), "{reply}");
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Subject: egress {i}\r\n\r\nmessage {i} to {r}\r\n.\r\n").as_bytes());
        let reply = c.reply();
        assert!(reply.starts_with("250"), "{reply}");
        ids.push(reply.split("queued as ").nth(1).unwrap().trim().to_owned());
    }
    c.cmd("QUIT");
    ids
}

/// The relay's log without terminal colour codes.
fn plain_log(relay: &Relay) -> String {
    let mut out = String::new();
    let mut rest = relay.log();
    while let Some(i) = rest.find('\u{1b}') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let skip = after.find('m').map_or(after.len(), |m| m + 1);
        rest = after[skip..].to_owned();
    }
    out.push_str(&rest);
    out
}

fn delivered_lines(relay: &Relay) -> usize {
    plain_log(relay).matches(" delivered queue_id=").count()
}

/// The status of message `id` through the admin API.
fn status(relay: &Relay, id: &str) -> Value {
    let (code, body) = relay.admin_get(&format!("/api/v1/queue/messages/{id}"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["status"].clone()
}

/// The status once the relay has recorded the message as final: the receiver may
/// have the mail a moment before the relay has written the outcome.
fn final_status(relay: &Relay, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let st = status(relay, id);
        if !st["final_at_ms"].is_null() || std::time::Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn two_relays_on_one_redis_keep_the_rate_and_the_connection_cap_at_the_receiver() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.2", port, json!({}));
    let bounces = Mx::start("127.0.0.5", port, json!({}));
    let redis = RedisServer::start();
    // Small batches, so that both relays take part.
    let delivery = "  max_concurrency: 2\n  max_messages_per_connection: 4\n";
    let quotas = "  - {name: paced, direction: egress, match: {destination_domains: [paced.test]}, \
                  limits: [10/5s], max_connections: 2}\n";
    let a = relay(&dns, port, Some(&redis), delivery, quotas);
    let b = relay(&dns, port, Some(&redis), delivery, quotas);
    let rcpts: Vec<String> = (0..36).map(|i| format!("r{i}@paced.test")).collect();
    submit(&a, &rcpts[..18]);
    submit(&b, &rcpts[18..]);
    mx.wait_messages(36, &[&a, &b]);

    let times = mx.message_times();
    assert_eq!(times.len(), 36);
    let worst = max_in_window(&times, 5.0);
    assert!(
        worst <= 10,
        "{worst} messages within 5 s at the receiver: {times:?}"
    );
    assert!(
        mx.max_open() <= 2,
        "connection cap exceeded: {:#?}",
        mx.events()
    );
    // Both relays delivered: the limit held across processes, not within one.
    let (da, db) = (delivered_lines(&a), delivered_lines(&b));
    assert_eq!(da + db, 36);
    assert!(da > 0 && db > 0, "a delivered {da}, b {db}");
    // Held-back mail waited in the queue: nothing bounced.
    assert!(bounces.of("msg").is_empty(), "{:?}", bounces.events());
    // Every egress key expires on its own.
    let keys = redis
        .cli(&["--scan", "--pattern", "mrtest:{mrtest:eg*}:*"])
        .unwrap();
    for k in keys.lines().filter(|k| !k.is_empty()) {
        let ttl: i64 = redis.cli(&["PTTL", k]).unwrap().parse().unwrap();
        assert!(ttl > 0, "{k} has no expiry ({ttl})");
    }
}

#[test]
fn domains_on_one_mx_site_share_a_limit() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.3", port, json!({}));
    let quotas = "  - {name: site, direction: egress, match: {mx_hosts: ['mx.shared.*']}, \
                  limits: [5/4s], key: mx_site}\n";
    // The embedded store: one relay, its own queue.
    let r = relay(&dns, port, None, "", quotas);
    let mut rcpts: Vec<String> = (0..10).map(|i| format!("c{i}@c.test")).collect();
    rcpts.extend((0..10).map(|i| format!("d{i}@d.test")));
    submit(&r, &rcpts);
    mx.wait_messages(20, &[&r]);
    let times = mx.message_times();
    let worst = max_in_window(&times, 4.0);
    assert!(
        worst <= 5,
        "{worst} messages for one MX site within 4 s: {times:?}"
    );
    let per_domain = |d: &str| {
        mx.of("msg")
            .iter()
            .filter(|e| e["rcpts"][0].as_str().unwrap().ends_with(d))
            .count()
    };
    assert_eq!((per_domain("@c.test"), per_domain("@d.test")), (10, 10));
    // Usage is keyed by the site, and reads from the admin of the store.
    assert!(plain_log(&r).contains("egress pacing ready"));
}

/// `slow.test` answers its first connection with `421`: the relay backs off, and
/// the mail arrives later, attempted only when it was really tried.
#[test]
fn a_421_greeting_backs_the_site_off_and_the_mail_arrives_later() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.4", port, json!({"greet421": 1}));
    let bounces = Mx::start("127.0.0.5", port, json!({}));
    let r = relay(
        &dns,
        port,
        None,
        "  per_destination_concurrency: 1\n",
        "  []\n",
    );
    let ids = submit(&r, &["x1@slow.test".into(), "x2@slow.test".into()]);
    mx.wait_messages(2, &[&r]);
    let rejected = mx.of("reject421");
    assert_eq!(rejected.len(), 1);
    let t421 = rejected[0]["t"].as_f64().unwrap();
    // Nothing reached the site again before the pause (15 s) was over.
    let next_open = mx.of("open")[0]["t"].as_f64().unwrap();
    assert!(
        next_open - t421 >= 14.0,
        "reconnected {}s after the 421",
        next_open - t421
    );
    // The 421 was no attempt: each message has exactly its one delivery.
    for id in &ids {
        let st = final_status(&r, id);
        let attempts = st["rcpts"][0]["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{st:#}");
        assert_eq!(attempts[0]["result"], "delivered", "{st:#}");
        assert_eq!(st["attempts"], 1, "{st:#}");
    }
    assert!(bounces.of("msg").is_empty());
    assert!(plain_log(&r).contains("backing off"), "{}", r.log());
}

/// `slow.test` refuses the first MAIL with `451 4.7.1`: that message is deferred
/// (one attempt), the others wait unattempted, and everything arrives.
#[test]
fn a_451_4_7_1_backs_the_site_off_for_every_message() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.4", port, json!({"mail451": 1}));
    let bounces = Mx::start("127.0.0.5", port, json!({}));
    let r = relay(
        &dns,
        port,
        None,
        "  per_destination_concurrency: 1\n",
        "  []\n",
    );
    let ids = submit(
        &r,
        &[
            "y1@slow.test".into(),
            "y2@slow.test".into(),
            "y3@slow.test".into(),
        ],
    );
    mx.wait_messages(3, &[&r]);
    let refused = mx.of("mail451");
    assert_eq!(refused.len(), 1);
    let t451 = refused[0]["t"].as_f64().unwrap();
    let later: Vec<f64> = mx
        .of("mail")
        .iter()
        .map(|e| e["t"].as_f64().unwrap())
        .filter(|&t| t > t451)
        .collect();
    assert_eq!(later.len(), 3);
    assert!(
        later.iter().all(|t| t - t451 >= 14.0),
        "MAIL again {:?}s after the 451",
        later.iter().map(|t| t - t451).collect::<Vec<_>>()
    );
    let attempts: usize = ids
        .iter()
        .map(|id| {
            final_status(&r, id)["rcpts"][0]["attempts"]
                .as_array()
                .unwrap()
                .len()
        })
        .sum();
    // Three deliveries and the one 451: nothing else was counted as a try.
    assert_eq!(attempts, 4);
    assert!(bounces.of("msg").is_empty());
}

#[test]
fn a_killed_relay_frees_its_connection_leases_after_they_expire() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start("127.0.0.2", port, json!({}));
    let redis = RedisServer::start();
    let delivery = "  lease: 3s\n";
    let quotas = "  - {name: one, direction: egress, match: {destination_domains: [paced.test]}, \
                  max_connections: 1}\n";
    let mut a = relay(&dns, port, Some(&redis), delivery, quotas);
    submit(&a, &["stall@paced.test".into()]);
    // `a` holds the only connection, stuck in DATA.
    let deadline = Instant::now() + Duration::from_secs(60);
    while mx.of("stall").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no stalled delivery:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The lease set lives in the bucket of the site (see egress::redis::Tags).
    let leases = redis
        .cli(&[
            "--scan",
            "--pattern",
            "mrtest:{mrtest:eg*}:c:one:paced.test",
        ])
        .unwrap();
    let leases = leases.trim();
    assert!(!leases.is_empty() && !leases.contains('\n'), "{leases:?}");
    assert_eq!(redis.cli(&["ZCARD", leases]).unwrap(), "1");
    let b = relay(&dns, port, Some(&redis), delivery, quotas);
    submit(&b, &["ok@paced.test".into()]);
    a.kill(); // SIGKILL: no chance to give anything back

    // `b` delivers both: its own, and the one `a` died with, once the dead
    // relay's connection lease (and message lease) ran out.
    mx.wait_messages(2, &[&b]);
    assert!(mx.max_open() <= 1, "{:#?}", mx.events());
    let deadline = Instant::now() + Duration::from_secs(30);
    while redis.cli(&["ZCARD", leases]).unwrap() != "0" {
        assert!(Instant::now() < deadline, "leases left behind");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mail that goes to a relay host named in the config (a route, the smarthost)
/// rather than to its MX is still paced by the quotas naming its recipient domain:
/// the first run of this test let 509 messages through a `10/1s` quota in 0.26 s.
/// Domains no quota names keep sharing the relay host's connections, unpaced.
#[test]
fn destination_domains_pace_mail_through_a_route_and_the_smarthost() {
    let dns = zone();
    let port = free_ports(1)[0];
    let routed = Mx::start("127.0.0.6", port, json!({}));
    let smarthost = Mx::start("127.0.0.7", port, json!({}));
    let bounces = Mx::start("127.0.0.5", port, json!({}));
    let redis = RedisServer::start();
    let delivery = format!(
        "  routes: [{{domains: [partner.test, free.test], host: 127.0.0.6, port: {port}, tls: disabled}}]\n  \
         smarthost: {{host: 127.0.0.7, port: {port}, tls: disabled}}\n"
    );
    let quotas = "  - {name: partners, direction: egress, match: {destination_domains: [partner.test, far.test]}, \
                  limits: [10/1s]}\n";
    let r = relay(&dns, port, Some(&redis), &delivery, quotas);
    let mut rcpts: Vec<String> = (0..40).map(|i| format!("p{i}@partner.test")).collect();
    rcpts.extend((0..30).map(|i| format!("f{i}@far.test")));
    rcpts.extend((0..20).map(|i| format!("u{i}@free.test")));
    submit(&r, &rcpts);
    routed.wait_messages(60, &[&r]);
    smarthost.wait_messages(30, &[&r]);

    let times_of = |mx: &Mx, domain: &str| -> Vec<f64> {
        mx.of("msg")
            .iter()
            .filter(|e| e["rcpts"][0].as_str().unwrap().ends_with(domain))
            .map(|e| e["t"].as_f64().unwrap())
            .collect()
    };
    let partner = times_of(&routed, "@partner.test");
    let far = times_of(&smarthost, "@far.test");
    assert_eq!((partner.len(), far.len()), (40, 30));
    assert_eq!(times_of(&routed, "@free.test").len(), 20);
    for (domain, times) in [("partner.test", &partner), ("far.test", &far)] {
        let worst = max_in_window(times, 1.0);
        assert!(
            worst <= 10,
            "{worst} messages for {domain} within 1 s at the receiver: {times:?}"
        );
        // Paced, not merely slow: 40 at 10/s take more than 3 s.
        let spread = times.iter().copied().fold(f64::MIN, f64::max)
            - times.iter().copied().fold(f64::MAX, f64::min);
        assert!(
            spread >= (times.len() as f64 / 10.0) - 1.0 - 0.2,
            "{domain}: {} messages over only {spread:.2} s",
            times.len()
        );
    }
    // The quota counted them under each domain.
    let (code, body) = r.admin_get("/api/v1/quotas/partners");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("partner.test") && body.contains("far.test"),
        "{body}"
    );
    assert!(bounces.of("msg").is_empty(), "{:?}", bounces.events());
}

/// The Lua scripts and the in-process store are the same state machine: a random
/// sequence of requests on a shared clock gets the same answers from both.
#[test]
fn redis_scripts_agree_with_the_embedded_store() {
    let redis = RedisServer::start();
    agree_with_the_embedded_store(redis.config("conf"), "*");
}

/// On a cluster too, as long as a request's keys share its site's bucket (a shared
/// quota's key lives elsewhere: `scripts_split_over_slots_give_back_...` covers it).
#[test]
fn redis_cluster_scripts_agree_with_the_embedded_store() {
    let cluster = RedisCluster::start();
    agree_with_the_embedded_store(cluster.config("conf"), "site1");
}

fn agree_with_the_embedded_store(cfg: RedisConfig, b_key: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = RedisStore::connect(&cfg).await.unwrap();
        let m = MemoryStore::new();
        let w = |limit, window_ms| Window { window_ms, limit };
        let keys = [
            KeyRef {
                quota: "a".into(),
                key: "site1".into(),
                windows: vec![w(5, 2_000), w(12, 10_000)],
                max_connections: Some(2),
            },
            KeyRef {
                quota: "b".into(),
                key: b_key.into(),
                windows: vec![w(3, 1_000)],
                max_connections: None,
            },
            KeyRef {
                quota: "c".into(),
                key: "site1".into(),
                windows: vec![],
                max_connections: Some(1),
            },
        ];
        let timing = Timing {
            max_wait_ms: 1_500,
            flight_ttl_ms: 4_000,
            lease_ttl_ms: 3_000,
        };
        let policy = BackoffPolicy {
            base_ms: 2_000,
            max_level: 3,
            recover_ms: 3_000,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut now = 1_700_000_000_000u64;
        // Tokens granted and not reported yet, with the keys they were taken on.
        let mut flying: Vec<(String, usize, Vec<u64>)> = Vec::new();
        let mut leases: Vec<(String, usize)> = Vec::new();
        let mut grants = 0;
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for step in 0..600 {
            now += rng.random_range(0..400);
            let pick = rng.random_range(0..keys.len());
            let subset = &keys[pick..(pick + rng.random_range(1..=2)).min(keys.len())];
            let ki = pick;
            match rng.random_range(0..10) {
                0..=5 => {
                    let token = format!("t{step}");
                    let costs: Vec<u64> = subset.iter().map(|_| rng.random_range(1..3)).collect();
                    let lease = rng.random_bool(0.3).then(|| format!("l{step}"));
                    let commit = (!flying.is_empty() && rng.random_bool(0.5))
                        .then(|| flying.swap_remove(rng.random_range(0..flying.len())))
                        .filter(|(_, k, _)| *k == ki);
                    let req = Acquire {
                        site: "site1",
                        keys: subset,
                        costs: &costs,
                        token: Some(&token),
                        commit: commit.as_ref().map(|(t, _, c)| Commit {
                            token: t,
                            costs: c,
                            end_ms: now - rng.random_range(0..50),
                        }),
                        lease: lease.as_deref(),
                        timing,
                        policy,
                        now_ms: Some(now),
                    };
                    let (a, b) = (m.acquire(&req), r.acquire(&req).await.unwrap());
                    assert_eq!(a, b, "step {step}: {req:?}");
                    *seen
                        .entry(
                            format!("{:?}", a.verdict)
                                .split([' ', '{'])
                                .next()
                                .unwrap()
                                .to_owned(),
                        )
                        .or_insert(0) += 1;
                    if matches!(a.verdict, Verdict::Granted { .. }) {
                        grants += 1;
                        flying.push((token, ki, costs));
                        if let Some(l) = lease {
                            leases.push((l, ki));
                        }
                    }
                }
                6 => {
                    let a = m.rate_limited("site1", policy, Some(now));
                    let b = r.rate_limited("site1", policy, Some(now)).await.unwrap();
                    assert_eq!(a, b, "step {step}");
                }
                7 => {
                    if let Some((l, k)) = leases.pop() {
                        let end = keys.len().min(k + 2);
                        let req = Close {
                            site: "site1",
                            keys: &keys[k..end],
                            lease: Some(&l),
                            commit: None,
                            now_ms: Some(now),
                        };
                        m.close(&req);
                        r.close(&req).await.unwrap();
                    }
                }
                8 => {
                    if let Some((t, k, c)) = flying.last() {
                        let end = (k + c.len()).min(keys.len());
                        let req = Extend {
                            site: "site1",
                            keys: &keys[*k..end],
                            lease: leases.last().map(|(l, _)| l.as_str()),
                            flight: Some((t, c)),
                            timing,
                            now_ms: Some(now),
                        };
                        m.extend(&req);
                        r.extend(&req).await.unwrap();
                    }
                }
                _ => {
                    for k in &keys {
                        let a =
                            m.usage(&k.quota, &k.windows, None, timing.flight_ttl_ms, Some(now));
                        let b = r
                            .usage(&k.quota, &k.windows, None, timing.flight_ttl_ms, Some(now))
                            .await
                            .unwrap();
                        let (mut a, mut b) = (a.1, b.1);
                        a.sort_by(|x, y| x.key.cmp(&y.key));
                        b.sort_by(|x, y| x.key.cmp(&y.key));
                        assert_eq!(a, b, "step {step}: usage of {}", k.quota);
                    }
                }
            }
        }
        assert!(
            grants > 50,
            "the sequence must exercise grants, got {grants}"
        );
        // Every verdict came up, so every branch of the script was compared.
        for v in ["Granted", "Later", "BackedOff", "Blocked", "NoConnection"] {
            assert!(
                seen.get(v).copied().unwrap_or(0) > 0,
                "{v} never seen: {seen:?}"
            );
        }
    });
}

/// On a cluster a shared quota's key lives in its own slot, so a request under a
/// site quota and a shared one is two scripts: when the shared one refuses, what
/// the site's bucket granted (lease, flight) is given back, and the answers are the
/// embedded store's.
#[test]
fn redis_cluster_split_requests_give_back_what_one_slot_granted() {
    let cluster = RedisCluster::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = RedisStore::connect(&cluster.config("split")).await.unwrap();
        let m = MemoryStore::new();
        let w = |limit, window_ms| Window { window_ms, limit };
        let keys = [
            KeyRef {
                quota: "site".into(),
                key: "mx.a.example".into(),
                windows: vec![w(100, 10_000)],
                max_connections: Some(2),
            },
            KeyRef {
                quota: "all".into(),
                key: "*".into(),
                windows: vec![w(1, 10_000)],
                max_connections: None,
            },
        ];
        let timing = Timing {
            max_wait_ms: 1_000,
            flight_ttl_ms: 4_000,
            lease_ttl_ms: 3_000,
        };
        let policy = BackoffPolicy {
            base_ms: 2_000,
            max_level: 3,
            recover_ms: 3_000,
        };
        let now = 1_700_000_000_000u64;
        let req = |token, lease, now| Acquire {
            site: "mx.a.example",
            keys: &keys,
            costs: &[1, 1],
            token: Some(token),
            commit: None,
            lease: Some(lease),
            timing,
            policy,
            now_ms: Some(now),
        };
        let (a, b) = (
            m.acquire(&req("t1", "l1", now)),
            r.acquire(&req("t1", "l1", now)).await.unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(b.verdict, Verdict::Granted { at_ms: now });
        // The shared window is full (t1 in flight): refused, nothing kept.
        let (a, b) = (
            m.acquire(&req("t2", "l2", now + 10)),
            r.acquire(&req("t2", "l2", now + 10)).await.unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(b.verdict, Verdict::Blocked);
        for k in &keys {
            let a = m.usage(
                &k.quota,
                &k.windows,
                None,
                timing.flight_ttl_ms,
                Some(now + 20),
            );
            let b = r
                .usage(
                    &k.quota,
                    &k.windows,
                    None,
                    timing.flight_ttl_ms,
                    Some(now + 20),
                )
                .await
                .unwrap();
            assert_eq!(a.1, b.1, "usage of {}", k.quota);
            assert_eq!(b.1.len(), 1);
            assert_eq!(b.1[0].windows[0].0, 1, "only t1 counts in {}", k.quota);
        }
        let site = r
            .usage("site", &keys[0].windows, None, 4_000, Some(now + 20))
            .await;
        assert_eq!(site.unwrap().1[0].open_connections, 1, "l2 was given back");
        // The site's and the shared keys are in different slots on this cluster.
        let tags = r.tags();
        assert_ne!(
            tags.key("mx.a.example", &keys[0]),
            tags.key("mx.a.example", &keys[1])
        );
        // Closing l1 and reporting t1 frees both sides (two scripts, one call).
        let close = Close {
            site: "mx.a.example",
            keys: &keys,
            lease: Some("l1"),
            commit: Some(Commit {
                token: "t1",
                costs: &[1, 1],
                end_ms: now + 30,
            }),
            now_ms: Some(now + 40),
        };
        m.close(&close);
        r.close(&close).await.unwrap();
        for k in &keys {
            let a = m.usage(
                &k.quota,
                &k.windows,
                None,
                timing.flight_ttl_ms,
                Some(now + 50),
            );
            let b = r
                .usage(
                    &k.quota,
                    &k.windows,
                    None,
                    timing.flight_ttl_ms,
                    Some(now + 50),
                )
                .await
                .unwrap();
            assert_eq!(a.1, b.1, "usage of {} after close", k.quota);
            assert_eq!(b.1[0].open_connections, 0);
        }
    });
}
