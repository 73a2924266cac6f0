//! The relay on a Redis deployed with Redis Sentinel: real `redis-server` data nodes
//! (a master and a replica) and real sentinels (`redis-server --sentinel`), the real
//! `mailrelay` binary, swaks and a raw SMTP client.
//!
//! - Mail is accepted and stored on the master the sentinels name; ingress quotas
//!   (checked inside the enqueue script) work over it.
//! - `SENTINEL FAILOVER` while clients send: every `250` is on the new master, the
//!   rest got `4xx`, and mail after the failover is accepted on the new master.
//! - The master killed: the relay follows the promoted replica.
//! - Passwords for the data nodes and for the sentinels; wrong ones fail without
//!   either password in an error or a log line.

use crate::support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mailrelay::config::{RedisConfig, Secret};
use mailrelay::queue::RedisQueue;
use mailrelay_test_support::wait_until;
use support::deliver::swaks;
use support::redis::RedisSentinel;
use support::relay::{Relay, RelayOptions, SmtpConn, code};

const PREFIX: &str = "mrtest";

/// A relay on `url`; `queue_extra` adds to the inline `redis:` map (`, wait_replicas: 1`).
fn relay_on(url: &str, queue_extra: &str, data_password: Option<&str>, extra_yaml: &str) -> Relay {
    Relay::start(RelayOptions {
        queue: vec![format!(
            "redis: {{url: '{url}', key_prefix: '{PREFIX}'{queue_extra}}}"
        )],
        env: data_password
            .map(|pw| vec![("MAILRELAY_REDIS_PASSWORD".to_owned(), pw.to_owned())])
            .unwrap_or_default(),
        extra_yaml: extra_yaml.into(),
        ..Default::default()
    })
}

/// One transaction on an open session; returns the reply to the end of data.
fn send_one(c: &mut SmtpConn, subject: &str) -> String {
    send_from(c, "app@client.test", subject)
}

/// [`send_one`] from `from`; returns the first reply that refused, if one did.
fn send_from(c: &mut SmtpConn, from: &str, subject: &str) -> String {
    c.transaction(
        from,
        "user@dest.test",
        &format!("Subject: {subject}\r\n\r\nhello"),
    )
}

fn queue_id(reply: &str) -> String {
    reply
        .split("queued as ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no queue id in {reply:?}"))
        .to_owned()
}

/// Whether message `id` is stored on the node at `port`.
fn stored_on(s: &RedisSentinel, port: u16, id: &str) -> bool {
    s.message_keys(port, PREFIX)
        .iter()
        .any(|k| k.ends_with(&format!(":m:{id}")))
}

fn wait_ready(relay: &Relay) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.admin_get("/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "relay not ready:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `mailrelay serve` on `url` with `env`; asserts that it exits with an error
/// and returns what it printed.
fn start_fails(url: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_ports(2);
    let conf = dir.path().join("relay.yaml");
    std::fs::write(
        &conf,
        format!(
            "listeners: [{{name: smtp, address: '127.0.0.1:{}'}}]\nadmin: {{address: '127.0.0.1:{}'}}\n\
             queue: {{redis: {{url: '{url}', key_prefix: {PREFIX}}}}}\n",
            ports[0], ports[1]
        ),
    )
    .unwrap();
    let out = Command::new(support::relay::binary())
        .args(["serve", "--config"])
        .arg(&conf)
        .env("RUST_LOG", "mailrelay=debug")
        .env_remove("MAILRELAY_REDIS_URL")
        .env_remove("MAILRELAY_REDIS_PASSWORD")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run mailrelay");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "started with {url}:\n{text}");
    text
}

#[test]
fn sentinel_url_accepts_mail_on_the_master_with_quotas() {
    let s = RedisSentinel::start(1, None, None);
    let master = s.master_port().unwrap();
    let relay = relay_on(
        &s.url(),
        "",
        None,
        "quotas: [{name: tenant, direction: ingress, match: {senders: ['*@tenant.test']}, limits: [3/1h]}]\n",
    );
    wait_ready(&relay);
    let id = swaks(&relay, "app@client.test", &["user@dest.test"], None);
    assert!(
        stored_on(&s, master, id.as_str()),
        "{id} not on the master {master}:\n{}",
        relay.log()
    );

    // The quota check runs inside the enqueue script, on the master.
    let mut c = relay.connect();
    c.cmd("EHLO client.test");
    for i in 0..3 {
        let r = send_from(&mut c, "bulk@tenant.test", &format!("q{i}"));
        assert_eq!(code(&r), 250, "message {i}: {r}");
        assert!(stored_on(&s, master, &queue_id(&r)));
    }
    let r = send_from(&mut c, "bulk@tenant.test", "over");
    assert!(r.starts_with("451 4.7.1"), "{r}");
    let counters = s
        .node_cli(master, &["KEYS", &format!("{PREFIX}:*")])
        .unwrap();
    assert!(
        counters.lines().count() > s.message_keys(master, PREFIX).len(),
        "no quota counters beside the messages on the master:\n{counters}"
    );
    assert!(relay.log().contains("sentinel"), "{}", relay.log());
}

#[test]
fn failover_under_load_loses_nothing_answered_250_and_follows_the_new_master() {
    let s = RedisSentinel::start(3, None, None);
    let old = s.master_port().unwrap();
    // WAIT for the replica: a 250 means the replica that may be promoted has the
    // message, so a failover cannot lose it.
    let relay = Arc::new(relay_on(&s.url(), ", wait_replicas: 1", None, ""));
    wait_ready(&relay);
    let mut c = relay.connect();
    c.cmd("EHLO client.test");
    let r = send_one(&mut c, "before");
    assert_eq!(code(&r), 250, "{r}");
    let mut accepted = vec![queue_id(&r)];
    assert!(stored_on(&s, old, &accepted[0]));

    // Clients keep sending while the sentinels switch masters.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..2)
        .map(|t| {
            let relay = Arc::clone(&relay);
            let stop = Arc::clone(&stop);
            let answered = Arc::clone(&answered);
            std::thread::spawn(move || {
                let mut replies = Vec::new();
                let mut c = relay.connect();
                c.cmd("EHLO client.test");
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    replies.push(send_one(&mut c, &format!("during-{t}-{n}")));
                    answered.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    // Pacing, not a condition: keeps the log readable.
                    std::thread::sleep(Duration::from_millis(20));
                }
                replies
            })
        })
        .collect();
    // Let some mail through before the switch.
    wait_until(
        "mail flowing before the switch",
        Duration::from_secs(30),
        || answered.load(Ordering::Relaxed) >= 4,
    );
    let new = s.failover();
    assert_ne!(new, old);
    stop.store(true, Ordering::Relaxed);
    let mut during = Vec::new();
    for t in senders {
        during.extend(t.join().unwrap());
    }
    assert!(!during.is_empty());
    for r in &during {
        match code(r) {
            250 => accepted.push(queue_id(r)),
            400..=499 => {}
            _ => panic!("during the failover a client got {r:?}"),
        }
    }

    // After the failover completed: accepted, and stored on the new master.
    let r = send_one(&mut c, "after-same-session");
    assert_eq!(code(&r), 250, "{r}\n{}", relay.log());
    let after = queue_id(&r);
    assert!(stored_on(&s, new, &after), "{after} not on the new master");
    accepted.push(after);
    let mut c2 = relay.connect();
    c2.cmd("EHLO client.test");
    let r = send_one(&mut c2, "after-new-session");
    assert_eq!(code(&r), 250, "{r}");
    accepted.push(queue_id(&r));

    // Nothing answered 250 is missing on the new master.
    let keys = s.message_keys(new, PREFIX);
    for id in &accepted {
        assert!(
            keys.iter().any(|k| k.ends_with(&format!(":m:{id}"))),
            "{id} was answered 250 but is not on the new master {new}\n{}\n{}",
            relay.log(),
            s.logs()
        );
    }
    let refused = during.iter().filter(|r| code(r) != 250).count();
    let log = relay.log();
    eprintln!(
        "failover {old} -> {new}: {} accepted during the switch, {refused} answered 4xx; \
         relay log: {} reconnects, {} failed lookups",
        during.len() - refused,
        log.matches("reconnected to the current master").count(),
        log.matches("no master to reconnect to yet").count()
            + log.matches("master lookup timed out").count(),
    );
}

#[test]
fn master_killed_the_relay_follows_the_promoted_replica() {
    let mut s = RedisSentinel::start(1, None, None);
    let old = s.master_port().unwrap();
    let relay = relay_on(&s.url(), "", None, "");
    wait_ready(&relay);
    let mut c = relay.connect();
    c.cmd("EHLO client.test");
    let r = send_one(&mut c, "before");
    assert_eq!(code(&r), 250, "{r}");
    assert!(stored_on(&s, old, &queue_id(&r)));

    let new = s.kill_master();
    // The first attempts may still meet the dead master (4xx); the relay then finds
    // the new one by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let r = send_one(&mut c, "after");
        match code(&r) {
            250 => break queue_id(&r),
            400..=499 => {}
            _ => panic!("{r}"),
        }
        assert!(
            Instant::now() < deadline,
            "relay did not follow the new master: {r}\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(stored_on(&s, new, &id), "{id} not on the new master {new}");
    wait_ready(&relay);
}

const DATA_PW: &str = "data-Pw-4f1b9c";
const SENTINEL_PW: &str = "sentinel-Pw-93ae07";

#[test]
fn passwords_for_data_nodes_and_sentinels() {
    let s = RedisSentinel::start(1, Some(DATA_PW), Some(SENTINEL_PW));
    let master = s.master_port().unwrap();
    assert!(s.url().contains(SENTINEL_PW));
    let relay = relay_on(&s.url(), "", Some(DATA_PW), "");
    wait_ready(&relay);
    let id = swaks(&relay, "app@client.test", &["user@dest.test"], None);
    assert!(stored_on(&s, master, id.as_str()));
    let log = relay.log();
    assert!(
        !log.contains(DATA_PW) && !log.contains(SENTINEL_PW),
        "{log}"
    );

    let sentinel = s.sentinel_ports()[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cases = [
        // Wrong sentinel password.
        (
            format!("redis+sentinel://:wrong-{SENTINEL_PW}@127.0.0.1:{sentinel}/mymaster"),
            Some(DATA_PW),
        ),
        // No sentinel password at all.
        (
            format!("redis+sentinel://127.0.0.1:{sentinel}/mymaster"),
            Some(DATA_PW),
        ),
        // Right sentinel password, wrong data password.
        (s.url(), Some("wrong-data-pw-77")),
        // Right sentinel password, no data password.
        (s.url(), None),
    ];
    for (url, data_pw) in cases {
        let cfg = RedisConfig {
            url: url.clone(),
            password: data_pw.map(|p| Secret(p.to_owned())),
            cluster: false,
            cluster_nodes: vec![],
            key_prefix: PREFIX.into(),
            wait_replicas: 0,
            wait_timeout: mailrelay::config::default_wait_timeout(),
            fresh_list: true,
        };
        let e = rt
            .block_on(RedisQueue::connect(&cfg))
            .expect_err(&format!("connected with {url} / {data_pw:?}"))
            .to_string();
        for secret in [DATA_PW, SENTINEL_PW, "wrong-data-pw-77"] {
            assert!(!e.contains(secret), "error leaks a password: {e}");
        }

        // The binary fails at start, and says why without the passwords either.
        let mut env = vec![];
        if let Some(pw) = data_pw {
            env.push(("MAILRELAY_REDIS_PASSWORD", pw));
        }
        let text = start_fails(&url, &env);
        assert!(text.contains("Redis"), "{text}");
        for secret in [DATA_PW, SENTINEL_PW, "wrong-data-pw-77"] {
            assert!(!text.contains(secret), "output leaks a password:\n{text}");
        }
    }
}

#[test]
fn tls_to_the_sentinels_and_the_master() {
    let pki = support::pki::Pki::new(&["127.0.0.1"]);
    let s = RedisSentinel::start_tls(1, &pki);
    let master = s.master_port().unwrap();
    assert!(s.url().starts_with("rediss+sentinel://"));
    // The CA comes from the trust store; SSL_CERT_FILE replaces it.
    let relay = Relay::start(RelayOptions {
        queue: vec![format!(
            "redis: {{url: '{}', key_prefix: '{PREFIX}'}}",
            s.url()
        )],
        env: vec![("SSL_CERT_FILE".to_owned(), pki.ca().display().to_string())],
        ..Default::default()
    });
    wait_ready(&relay);
    let id = swaks(&relay, "app@client.test", &["user@dest.test"], None);
    assert!(stored_on(&s, master, id.as_str()));

    // Without that CA the certificates are refused: TLS is verified, not just used.
    let empty = tempfile::tempdir().unwrap();
    let text = start_fails(
        &s.url(),
        &[
            ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
            ("SSL_CERT_DIR", empty.path().to_str().unwrap()),
        ],
    );
    assert!(
        text.contains("Redis") && text.contains("certificate"),
        "{text}"
    );
}

/// The egress store connects through the same code: it reaches the master the
/// sentinels name and follows a failover.
#[test]
fn egress_store_follows_a_failover() {
    use mailrelay::quota::egress::backoff::BackoffPolicy;
    use mailrelay::quota::egress::redis::RedisStore;

    let s = RedisSentinel::start(1, None, None);
    let old = s.master_port().unwrap();
    let cfg = RedisConfig {
        url: s.url(),
        password: None,
        cluster: false,
        cluster_nodes: vec![],
        key_prefix: PREFIX.into(),
        wait_replicas: 0,
        wait_timeout: mailrelay::config::default_wait_timeout(),
        fresh_list: true,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(RedisStore::connect(&cfg)).unwrap();
    let policy = BackoffPolicy::default();
    rt.block_on(store.rate_limited("before.test", policy, None))
        .unwrap();
    let backoff_keys = |port: u16, site: &str| {
        s.node_cli(port, &["KEYS", &format!("{PREFIX}:*:bo:{site}")])
            .unwrap()
    };
    assert!(!backoff_keys(old, "before.test").is_empty());

    let new = s.failover();
    // The first call may meet the old connection (an error: egress then waits); the
    // store finds the new master by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = rt.block_on(store.rate_limited("after.test", policy, None)) {
        assert!(Instant::now() < deadline, "egress store stuck: {e}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!backoff_keys(new, "after.test").is_empty());
}
