//! Password guessing against real `mailrelay` processes: failed AUTH attempts slow
//! the next ones down and then lock the client address and the user name out,
//! across relays sharing one real Redis; the lockout answer is the same for real
//! and unknown users and for right and wrong passwords, and it ends on time.
//!
//! Clients appear to come from TEST-NET addresses by a PROXY protocol header, so
//! one test host can play attacker and bystanders.

use crate::support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions, SmtpConn, TlsSmtpConn, code, http_get};

const USERS: &str = "alice:correct-horse\nbob:battery-staple\n";

fn relay(redis_url: Option<String>, throttle: &str) -> Relay {
    Relay::start(RelayOptions {
        relay_networks: Some(vec!["10.99.0.0/16".into()]),
        tls: true,
        proxy_protocol: true,
        auth_users: Some(USERS.into()),
        auth_throttle: Some(throttle.into()),
        redis_url,
        ..Default::default()
    })
}

/// One session from `src` (as the PROXY header says): STARTTLS, then one
/// `AUTH PLAIN`. Returns the AUTH reply and how long it took.
fn attempt(relay: &Relay, src: &str, user: &str, password: &str) -> (String, Duration) {
    let header = format!("PROXY TCP4 {src} 127.0.0.1 40000 25\r\n");
    let mut c = SmtpConn::connect_after(relay.smtp, header.as_bytes());
    assert_eq!(code(&c.greeting), 220, "{:?}", c.greeting);
    assert_eq!(code(&c.cmd("EHLO client.test")), 250);
    assert_eq!(code(&c.cmd("STARTTLS")), 220);
    let mut t = TlsSmtpConn::handshake(c.into_tcp(), relay.cert_path.as_ref().unwrap());
    let r = t.cmd("EHLO client.test");
    assert!(r.contains("AUTH PLAIN"), "{r}");
    let blob = STANDARD.encode(format!("\0{user}\0{password}"));
    let started = Instant::now();
    let reply = t.cmd(&format!("AUTH PLAIN {blob}"));
    let took = started.elapsed();
    let _ = t.cmd("QUIT");
    (reply, took)
}

#[track_caller]
fn expect(reply: &str, want: u16, enhanced: &str) {
    assert_eq!(code(reply), want, "expected {want}, got {reply:?}");
    assert!(
        reply[4..].starts_with(&format!("{enhanced} ")),
        "expected {want} {enhanced}, got {reply:?}"
    );
}

/// The value of one metric series summed over relays (0 when absent).
fn metric(relays: &[&Relay], series: &str) -> f64 {
    relays
        .iter()
        .map(|r| {
            let (status, body) = http_get(r.admin, "/metrics");
            assert_eq!(status, 200);
            body.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0)
        })
        .sum()
}

#[test]
fn guesses_are_slowed_then_locked_out_across_relays_on_one_redis() {
    let redis = RedisServer::start();
    let throttle = "delay: 100ms, max_delay: 400ms, max_failures: 4, window: 1m, lockout: 4s";
    let a = relay(Some(redis.url()), throttle);
    let b = relay(Some(redis.url()), throttle);

    // An unknown user is locked by failures spread over addresses and relays (no
    // address collects enough to be locked itself).
    for (i, src) in [
        "198.51.100.20",
        "198.51.100.21",
        "198.51.100.22",
        "198.51.100.23",
    ]
    .iter()
    .enumerate()
    {
        let r = if i % 2 == 0 { &a } else { &b };
        expect(&attempt(r, src, "mallory", "guess").0, 535, "5.7.8");
    }

    // One attacker address guesses alice's password, alternating relays: each
    // failure makes the next attempt wait longer, whichever relay it reaches.
    let attacker = "198.51.100.7";
    let mut took = Vec::new();
    for (i, r) in [&a, &b, &a, &b].into_iter().enumerate() {
        let (reply, t) = attempt(r, attacker, "alice", &format!("wrong-guess-{i}"));
        expect(&reply, 535, "5.7.8");
        took.push(t);
    }
    // After three failures the wait is 100 ms doubled twice: 400 ms.
    assert!(
        took[3] >= Duration::from_millis(350),
        "the fourth guess was not slowed down: {took:?}"
    );

    // Four failures locked the address and the user, on the other relay too; even
    // the right password is refused, with the answer an unknown user gets.
    let (locked_real, _) = attempt(&a, "198.51.100.8", "alice", "correct-horse");
    expect(&locked_real, 454, "4.7.0");
    let (locked_unknown, _) = attempt(&b, "198.51.100.8", "mallory", "correct-horse");
    assert_eq!(locked_real, locked_unknown);
    let (locked_addr, _) = attempt(&b, attacker, "bob", "battery-staple");
    assert_eq!(locked_real, locked_addr);

    // Another user from another address logs in at once.
    let (ok, _) = attempt(&b, "198.51.100.9", "bob", "battery-staple");
    expect(&ok, 235, "2.7.0");

    // Metrics show the defence acting (summed over both relays).
    assert_eq!(metric(&[&a, &b], "mailrelay_smtp_auth_failures_total"), 8.0);
    assert_eq!(
        metric(
            &[&a, &b],
            "mailrelay_smtp_auth_lockouts_total{scope=\"user\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &[&a, &b],
            "mailrelay_smtp_auth_lockouts_total{scope=\"address\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &[&a, &b],
            "mailrelay_smtp_auth_refused_total{reason=\"locked\"}"
        ),
        3.0
    );

    // Every throttle key in Redis expires by itself.
    let keys = redis
        .cli(&["--scan", "--pattern", "mrtest:{mrtest:auth}:*"])
        .unwrap();
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert!(keys.len() >= 3, "{keys:?}");
    for k in &keys {
        let ttl: i64 = redis.cli(&["PTTL", k]).unwrap().trim().parse().unwrap();
        assert!(ttl > 0, "{k} has no expiry ({ttl})");
    }

    // The lockout ends after its configured 4 s; then the right password works.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (r, _) = attempt(&a, "198.51.100.8", "alice", "correct-horse");
        if code(&r) == 235 {
            break;
        }
        expect(&r, 454, "4.7.0");
        assert!(Instant::now() < deadline, "the lockout did not end");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Passwords never reach a log line.
    for r in [&a, &b] {
        let log = r.log();
        assert!(log.contains("authentication failed"), "{log}");
        assert!(!log.contains("wrong-guess"), "a password was logged");
        assert!(!log.contains("correct-horse"), "a password was logged");
    }
}

#[test]
fn embedded_queue_relay_locks_out_in_process() {
    let r = relay(None, "delay: 0s, max_failures: 3, window: 1m, lockout: 2s");
    for _ in 0..3 {
        expect(&attempt(&r, "203.0.113.5", "bob", "nope").0, 535, "5.7.8");
    }
    expect(
        &attempt(&r, "203.0.113.6", "bob", "battery-staple").0,
        454,
        "4.7.0",
    );
    expect(
        &attempt(&r, "203.0.113.5", "alice", "correct-horse").0,
        454,
        "4.7.0",
    );
    expect(
        &attempt(&r, "203.0.113.7", "alice", "correct-horse").0,
        235,
        "2.7.0",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while code(&attempt(&r, "203.0.113.6", "bob", "battery-staple").0) != 235 {
        assert!(Instant::now() < deadline, "the lockout did not end");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn lockout_is_shared_on_a_redis_cluster() {
    let cluster = support::redis::RedisCluster::start();
    let mut urls = cluster.urls();
    let first = urls.remove(0);
    let throttle = "delay: 0s, max_failures: 2, window: 1m, lockout: 1m";
    let start = || {
        Relay::start(RelayOptions {
            relay_networks: Some(vec!["10.99.0.0/16".into()]),
            tls: true,
            proxy_protocol: true,
            auth_users: Some(USERS.into()),
            auth_throttle: Some(throttle.into()),
            redis_url: Some(first.clone()),
            redis_cluster_nodes: Some(urls.clone()),
            ..Default::default()
        })
    };
    let (a, b) = (start(), start());
    expect(&attempt(&a, "192.0.2.50", "alice", "x").0, 535, "5.7.8");
    expect(&attempt(&b, "192.0.2.51", "alice", "y").0, 535, "5.7.8");
    expect(
        &attempt(&a, "192.0.2.52", "alice", "correct-horse").0,
        454,
        "4.7.0",
    );
    expect(
        &attempt(&b, "192.0.2.52", "bob", "battery-staple").0,
        235,
        "2.7.0",
    );
}

#[test]
fn auth_fails_closed_while_the_counters_are_out_of_reach() {
    let mut redis = RedisServer::start();
    let r = relay(Some(redis.url()), "delay: 0s, max_failures: 5");
    expect(
        &attempt(&r, "192.0.2.60", "bob", "battery-staple").0,
        235,
        "2.7.0",
    );
    redis.stop();
    // Without its counters the relay cannot brake guesses: it refuses to check any.
    expect(
        &attempt(&r, "192.0.2.60", "bob", "battery-staple").0,
        454,
        "4.7.0",
    );
    assert_eq!(
        metric(
            &[&r],
            "mailrelay_smtp_auth_refused_total{reason=\"store_unavailable\"}"
        ),
        1.0
    );
}
