//! Operating the real `mailrelay` binary: graceful shutdown, readiness while the
//! queue store is down, metrics, the command line, and structured logs.

use crate::support;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use mailrelay::queue::{EmbeddedQueue, Inspect, QueueId, QueuedMessage, RedisQueue};
use support::redis::RedisServer;
use support::relay::{Relay, RelayOptions, SmtpConn, TlsSmtpConn, binary, code, http_get};

// ---------------------------------------------------------------------------------
// Helpers

#[track_caller]
fn expect(reply: &str, want: u16, enhanced: Option<&str>) {
    assert_eq!(code(reply), want, "expected {want}, got {reply:?}");
    if let Some(e) = enhanced {
        assert!(
            reply
                .get(4..)
                .is_some_and(|t| t.starts_with(&format!("{e} "))),
            "expected {want} {e}, got {reply:?}"
        );
    }
}

/// A message carrying its own `Date:` and `Message-ID:`, so the stored body is one
/// `Received:` header followed by exactly these octets.
fn content(tag: &str) -> Vec<u8> {
    format!(
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{tag}@client.test>\r\n\
         Subject: {tag}\r\n\r\nbody of {tag}\r\n"
    )
    .into_bytes()
}

fn queue_id(reply: &str) -> String {
    reply
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// MAIL, RCPT, DATA and `body`; returns the reply to the end of data.
fn transaction(c: &mut SmtpConn, body: &[u8]) -> String {
    expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    expect(&c.cmd("DATA"), 354, None);
    c.send(body);
    c.send(b".\r\n");
    c.reply()
}

#[track_caller]
fn assert_body(m: &QueuedMessage, sent: &[u8]) {
    assert!(
        m.body.starts_with(b"Received: ") && m.body.ends_with(sent),
        "stored body differs from what was sent:\n{}",
        String::from_utf8_lossy(&m.body)
    );
    let head = &m.body[..m.body.len() - sent.len()];
    assert_eq!(
        head.windows(10).filter(|w| w == b"Received: ").count(),
        1,
        "{}",
        String::from_utf8_lossy(head)
    );
}

/// Polls `path` on the admin port until it answers `status`.
#[track_caller]
fn wait_for_status(relay: &Relay, path: &str, status: u16, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (got, body) = relay.admin_get(path);
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {got} ({body:?}) after {limit:?}, expected {status}"
        );
        sleep(Duration::from_millis(100));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------
// Graceful shutdown

#[test]
fn sigterm_drains_idle_sessions_and_lets_transactions_finish() {
    // A grace longer than the client's read timeout: B's 421 can only come from
    // draining idle sessions, not from the grace running out.
    let mut relay = Relay::start(RelayOptions {
        shutdown_grace: Some("60s".into()),
        ..Default::default()
    });
    let mut a = relay.connect();
    expect(&a.cmd("EHLO a.client.test"), 250, None);
    expect(&a.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&a.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    let mut b = relay.connect();
    expect(&b.cmd("EHLO b.client.test"), 250, None);
    assert_eq!(relay.admin_get("/readyz").0, 200);

    relay.signal("TERM");
    // B is idle: told at once, while A is still mid-transaction.
    expect(&b.reply(), 421, Some("4.3.2"));
    assert!(b.is_closed());
    let body = wait_for_status(&relay, "/readyz", 503, Duration::from_secs(10));
    assert!(body.contains("draining"), "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(relay.smtp).is_ok() {
        assert!(
            Instant::now() < deadline,
            "SMTP port still accepts connections during shutdown"
        );
        sleep(Duration::from_millis(50));
    }

    expect(&a.cmd("DATA"), 354, None);
    let sent = content("finished-during-shutdown");
    a.send(&sent);
    a.send(b".\r\n");
    let r = a.reply();
    expect(&r, 250, Some("2.0.0"));
    // With its transaction done A is idle, so it may be drained before its QUIT.
    let bye = a.cmd("QUIT");
    assert!(
        code(&bye) == 221 || bye.starts_with("421 4.3.2 "),
        "{bye:?}"
    );
    assert!(a.is_closed());
    let status = relay.wait(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].envelope.id.as_str(), queue_id(&r));
    assert_eq!(msgs[0].envelope.client.helo, "a.client.test");
    assert_body(&msgs[0], &sent);
}

#[test]
fn sessions_still_open_when_shutdown_grace_ends_get_421() {
    let mut relay = Relay::start(RelayOptions {
        shutdown_grace: Some("3s".into()),
        ..Default::default()
    });
    let mut in_tx = relay.connect();
    expect(&in_tx.cmd("EHLO a.client.test"), 250, None);
    expect(&in_tx.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&in_tx.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    let mut in_data = relay.connect();
    expect(&in_data.cmd("EHLO b.client.test"), 250, None);
    expect(&in_data.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&in_data.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    expect(&in_data.cmd("DATA"), 354, None);
    in_data.send(b"Subject: never finished\r\n\r\nhalf a");

    relay.signal("TERM");
    wait_for_status(&relay, "/readyz", 503, Duration::from_secs(10));
    // Within the grace period the session is still served.
    expect(&in_tx.cmd("NOOP"), 250, None);
    for c in [&mut in_tx, &mut in_data] {
        expect(&c.reply(), 421, Some("4.3.2"));
        assert!(c.is_closed());
    }
    let status = relay.wait(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    let msgs = relay.queued_messages();
    assert!(msgs.is_empty(), "{msgs:#?}");
}

/// Polls until the SMTP port refuses connections; returns when that was seen.
#[track_caller]
fn wait_until_refused(relay: &Relay, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if TcpStream::connect(relay.smtp).is_err() {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "SMTP port still accepts connections after {limit:?}"
        );
        sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_with_shutdown_settle_serves_new_clients_while_readiness_fails() {
    // Long enough to be unmistakable next to the few milliseconds the clients need.
    const SETTLE: Duration = Duration::from_secs(6);
    let mut relay = Relay::start(RelayOptions {
        shutdown_grace: Some("3s".into()),
        extra_yaml: "shutdown_settle: 6s\n".into(),
        ..Default::default()
    });
    let mut early = relay.connect();
    expect(&early.cmd("EHLO early.client.test"), 250, None);
    assert_eq!(relay.admin_get("/readyz").0, 200);

    let signalled = Instant::now();
    relay.signal("TERM");
    let body = wait_for_status(&relay, "/readyz", 503, Duration::from_secs(5));
    assert!(body.contains("draining"), "{body}");
    // A client a balancer still routes here after readiness failed: served in full.
    let mut late = relay.connect();
    expect(&late.greeting, 220, None);
    expect(&late.cmd("EHLO late.client.test"), 250, None);
    let late_body = content("connected-during-settle");
    let late_reply = transaction(&mut late, &late_body);
    expect(&late_reply, 250, Some("2.0.0"));
    expect(&late.cmd("QUIT"), 221, None);
    // A session that was idle when the signal came is not drained yet either.
    let early_body = content("early-session-during-settle");
    let early_reply = transaction(&mut early, &early_body);
    expect(&early_reply, 250, Some("2.0.0"));
    assert!(
        signalled.elapsed() < SETTLE,
        "too slow to observe the settle period ({:?})",
        signalled.elapsed()
    );

    // Then the graceful shutdown as without a settle period: the idle session is
    // told 421, the listeners close, and the process exits.
    expect(&early.reply(), 421, Some("4.3.2"));
    assert!(
        signalled.elapsed() >= SETTLE,
        "drained before the settle period ended"
    );
    assert!(early.is_closed());
    let closed = wait_until_refused(&relay, Duration::from_secs(15));
    assert!(closed - signalled >= SETTLE);
    let status = relay.wait(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");

    let log = relay.log();
    for phase in [
        "readiness now fails; still accepting connections for shutdown_settle",
        "settle period over",
        "listeners closed",
        "SMTP server stopped",
        "shutdown complete",
    ] {
        assert!(log.contains(phase), "no {phase:?} in the log:\n{log}");
    }
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 2, "{msgs:#?}");
    for (reply, body) in [(&late_reply, &late_body), (&early_reply, &early_body)] {
        let m = msgs
            .iter()
            .find(|m| m.envelope.id.as_str() == queue_id(reply))
            .unwrap_or_else(|| panic!("{reply:?} answered 250 but is not queued"));
        assert_body(m, body);
    }
}

#[test]
fn a_second_signal_cuts_the_settle_period_short() {
    let mut relay = Relay::start(RelayOptions {
        extra_yaml: "shutdown_settle: 5m\n".into(),
        ..Default::default()
    });
    relay.signal("TERM");
    wait_for_status(&relay, "/readyz", 503, Duration::from_secs(5));
    // The settle period runs: new clients are still served.
    let mut c = relay.connect();
    expect(&c.cmd("EHLO client.test"), 250, None);
    relay.signal("INT");
    // Straight to the graceful shutdown, not five minutes later.
    expect(&c.reply(), 421, Some("4.3.2"));
    wait_until_refused(&relay, Duration::from_secs(10));
    let status = relay.wait(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    let log = relay.log();
    assert!(log.contains("second signal"), "{log}");
}

#[test]
fn shutdown_settle_beyond_its_bound_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.yaml");
    std::fs::write(&file, "shutdown_settle: 1h\n").unwrap();
    let out = check_config(&file, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shutdown_settle") && err.contains("5m"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------
// Queue store outage

#[test]
fn redis_outage_fails_readiness_and_answers_451_without_losing_the_session() {
    let mut redis = RedisServer::start();
    let mut relay = Relay::start(RelayOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    });
    assert_eq!(relay.admin_get("/readyz"), (200, "ok".to_owned()));
    let mut accepted: Vec<(String, Vec<u8>)> = Vec::new();
    let mut c = relay.connect();
    expect(&c.cmd("EHLO client.test"), 250, None);
    let body = content("before-outage");
    let r = transaction(&mut c, &body);
    expect(&r, 250, Some("2.0.0"));
    accepted.push((queue_id(&r), body));

    redis.kill();
    let why = wait_for_status(&relay, "/readyz", 503, Duration::from_secs(15));
    assert!(why.contains("queue"), "{why}");
    let refused = content("during-outage");
    let r = transaction(&mut c, &refused);
    expect(&r, 451, Some("4.3.0"));
    // The reply names the store that failed (the operator reading the client's
    // log must know to look at Redis).
    assert!(r.contains("queue store (redis)"), "{r:?}");
    // A temporary queue failure is no reason to drop the client.
    expect(&c.cmd("RSET"), 250, None);
    expect(&c.cmd("NOOP"), 250, None);
    expect(&c.cmd("MAIL FROM:<sender@client.test>"), 250, None);
    expect(&c.cmd("RSET"), 250, None);

    redis.restart();
    wait_for_status(&relay, "/readyz", 200, Duration::from_secs(30));
    let body = content("after-outage-same-session");
    let r = transaction(&mut c, &body);
    expect(&r, 250, Some("2.0.0"));
    accepted.push((queue_id(&r), body));
    expect(&c.cmd("QUIT"), 221, None);
    let mut c = relay.connect();
    expect(&c.cmd("EHLO client.test"), 250, None);
    let body = content("after-outage-new-session");
    let r = transaction(&mut c, &body);
    expect(&r, 250, Some("2.0.0"));
    accepted.push((queue_id(&r), body));
    expect(&c.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());

    let stored = runtime().block_on(async {
        let q = RedisQueue::connect(&redis.config("mrtest")).await.unwrap();
        let ids = q.list_ids(usize::MAX).await.unwrap();
        let mut out = Vec::new();
        for id in &ids {
            out.push(q.get(id).await.unwrap().expect("listed message exists"));
        }
        out
    });
    for (id, body) in &accepted {
        let m = stored
            .iter()
            .find(|m| m.envelope.id.as_str() == id)
            .unwrap_or_else(|| panic!("message {id} was answered 250 but is not in Redis"));
        assert_body(m, body);
    }
    assert_eq!(stored.len(), accepted.len(), "{stored:#?}");
    assert!(
        !stored
            .iter()
            .any(|m| m.body.windows(13).any(|w| w == b"during-outage")),
        "the message answered 451 was stored"
    );
    // No record outside the index either (a half-written message).
    let keys = redis.cli(&["KEYS", "mrtest:*:m:*"]).unwrap();
    assert_eq!(keys.lines().count(), accepted.len(), "{keys}");
}

/// A message of about `size` bytes carrying `Message-ID: <tag@client.test>`.
fn sized_content(tag: &str, size: usize) -> Vec<u8> {
    let mut m = content(tag);
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while m.len() < size {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// The `Message-ID:` tag of a message as the sink received it.
fn message_tag(rec: &serde_json::Value) -> String {
    let text = String::from_utf8_lossy(&support::mx::content(rec)).into_owned();
    text.split("Message-ID: <")
        .nth(1)
        .and_then(|rest| rest.split('@').next())
        .unwrap_or_else(|| panic!("no Message-ID in {text}"))
        .to_owned()
}

#[test]
fn full_redis_answers_451_recovers_once_delivery_frees_memory_and_loses_nothing() {
    // The bundled Redis's setting: a memory limit and no eviction (evicting would
    // silently drop queued mail). 4 MB holds a few dozen of the messages below.
    let redis = RedisServer::start_with(
        None,
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
    );
    // The smarthost is down at first, so nothing frees memory until it comes up.
    let sink_port = support::free_ports(1)[0];
    let relay = Relay::start(RelayOptions {
        redis_url: Some(redis.url()),
        extra_yaml: format!(
            "delivery:\n  smarthost: {{host: 127.0.0.1, port: {sink_port}}}\n  \
             retry: {{first: 1s, max_backoff: 2s, jitter: 0.0}}\n  poll_interval: 200ms\n"
        ),
        ..Default::default()
    });
    let mut accepted: Vec<String> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let mut c = relay.connect();
    expect(&c.cmd("EHLO client.test"), 250, None);
    for i in 0..400 {
        let tag = format!("fill-{i}");
        let r = transaction(&mut c, &sized_content(&tag, 64 * 1024));
        match code(&r) {
            250 => accepted.push(tag),
            451 => {
                expect(&r, 451, Some("4.3.1"));
                assert!(r.contains("queue store (redis) full"), "{r:?}");
                refused.push(tag);
                if refused.len() == 3 {
                    break;
                }
            }
            _ => panic!("a full Redis must be answered 451, got {r:?}"),
        }
    }
    assert_eq!(
        refused.len(),
        3,
        "Redis never filled up: {} accepted",
        accepted.len()
    );
    assert!(accepted.len() >= 5, "only {} accepted", accepted.len());
    let used = redis.cli(&["INFO", "memory"]).unwrap();
    assert!(used.contains("maxmemory:4194304"), "{used}");
    // The session stays usable, and the pod stays ready: the store answers, and a
    // 451 from every relay beats connections refused by pods taken out of service.
    expect(&c.cmd("NOOP"), 250, None);
    assert_eq!(relay.admin_get("/readyz").0, 200);
    let series = |name: &str| support::deliver::metric(&relay, name).unwrap_or(-1.0);
    assert_eq!(
        series("mailrelay_queue_write_failures_total{reason=\"full\"}"),
        refused.len() as f64
    );
    assert_eq!(
        series("mailrelay_smtp_messages_rejected_total{reason=\"queue_full\"}"),
        refused.len() as f64
    );
    assert_eq!(
        series("mailrelay_queue_write_failures_total{reason=\"unavailable\"}"),
        0.0
    );

    // Delivery drains the queue once the smarthost is back, freeing the memory, and
    // the same relay accepts mail again without a restart.
    let sink = support::mx::Mx::plain("127.0.0.1", sink_port, 0.0);
    support::deliver::wait_until("the queue to drain", &relay, || {
        (support::deliver::api_stats(&relay)["messages"] == 0).then_some(())
    });
    let after = "after-drain".to_owned();
    let r = transaction(&mut c, &sized_content(&after, 64 * 1024));
    expect(&r, 250, Some("2.0.0"));
    accepted.push(after);
    expect(&c.cmd("QUIT"), 221, None);

    let recs = sink.wait_for(
        "every accepted message at the sink",
        || relay.log(),
        |recs| {
            let tags: Vec<String> = recs.iter().map(message_tag).collect();
            accepted.iter().all(|t| tags.contains(t))
        },
    );
    let tags: Vec<String> = recs.iter().map(message_tag).collect();
    for t in &refused {
        assert!(!tags.contains(t), "{t} was answered 451 but delivered");
    }
    let mut unique = tags.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), accepted.len(), "{unique:?}");
}

// ---------------------------------------------------------------------------------
// Metrics

/// `name{labels} value` lines of an OpenMetrics exposition.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn metrics_count_accepted_and_rejected_messages() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    expect(&c.cmd("EHLO client.test"), 250, None);
    for i in 0..2 {
        expect(&transaction(&mut c, &content(&format!("m{i}"))), 250, None);
    }
    expect(
        &c.cmd("MAIL FROM:<a@client.test> SIZE=999999999999"),
        552,
        None,
    );
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 503, None);
    expect(&c.cmd("XYZZY"), 500, None);
    expect(&c.cmd("MAIL FROM:<a@client.test>"), 250, None);
    expect(&c.cmd("RCPT TO:<b@dest.test>"), 250, None);
    expect(&c.cmd("DATA"), 354, None);
    c.send(b"Subject: bare\nLF\r\n.\r\n");
    expect(&c.reply(), 550, None);
    expect(&c.cmd("QUIT"), 221, None);
    assert!(c.is_closed());
    // The gauge drops just after the close the client sees.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = relay.admin_get("/metrics");
        assert_eq!(status, 200);
        if samples(&text).get("mailrelay_smtp_connections_active") == Some(&0.0)
            || Instant::now() > deadline
        {
            break text;
        }
        sleep(Duration::from_millis(50));
    };
    let s = samples(&text);
    let get = |k: &str| {
        *s.get(k)
            .unwrap_or_else(|| panic!("{k} missing from /metrics:\n{text}"))
    };
    assert_eq!(get("mailrelay_smtp_messages_accepted_total"), 2.0);
    assert_eq!(get("mailrelay_smtp_connections_active"), 0.0);
    for reason in [
        "message_too_big",
        "bad_sequence",
        "unknown_command",
        "bare_lf",
    ] {
        assert_eq!(
            get(&format!(
                "mailrelay_smtp_messages_rejected_total{{reason=\"{reason}\"}}"
            )),
            1.0,
            "{reason}:\n{text}"
        );
    }
    let rejected: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with("mailrelay_smtp_messages_rejected_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(rejected, 4.0, "each refusal counted once:\n{text}");
    assert_eq!(get("mailrelay_queue_write_seconds_count"), 2.0);
    assert!(text.contains("mailrelay_queue_write_seconds_bucket{le=\""));
    assert_eq!(get("mailrelay_smtp_commands_total{command=\"DATA\"}"), 3.0);
    let received = get("mailrelay_smtp_received_bytes_total");
    assert!(text.ends_with("# EOF\n"));

    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    let bytes: usize = msgs.iter().map(|m| m.body.len()).sum();
    assert_eq!(received, bytes as f64);
}

// ---------------------------------------------------------------------------------
// Command line

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mailrelay.yaml")
}

/// `mailrelay ARGS` with no `MAILRELAY_*` from the test's own environment.
fn mailrelay(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    for k in [
        "MAILRELAY_CONFIG",
        "MAILRELAY_REDIS_URL",
        "MAILRELAY_REDIS_PASSWORD",
        "MAILRELAY_HOSTNAME",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied()).stdin(Stdio::null());
    cmd
}

fn check_config(file: &Path, env: &[(&str, &str)]) -> Output {
    mailrelay(&["check-config", file.to_str().unwrap()], env)
        .output()
        .expect("run mailrelay check-config")
}

#[test]
fn check_config_accepts_the_example_and_names_bad_fields() {
    let out = check_config(&example_config(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    for (yaml, names) in [
        (
            "limits: {max_mesage_size: 1}\n",
            &["limits", "max_mesage_size"][..],
        ),
        (
            "limits: {command_timeout: 5 parsecs}\n",
            &["limits.command_timeout"][..],
        ),
        (
            "limits: {max_message_size: 10}\n",
            &["limits.max_message_size"][..],
        ),
        ("relay_networks: [0.0.0.0/0]\n", &["relay_networks[0]"][..]),
        (
            "listeners: [{name: smtp, address: 'nope'}]\n",
            &["listeners[0].address"][..],
        ),
        (
            "queue: {redis: {url: 'redis://127.0.0.1:6379', wait_replicas: 1, wait_timeout: 10s}}\n",
            &["queue.redis.wait_timeout"][..],
        ),
        // Egress quotas that the delivery paths can never match.
        (
            "delivery: {smarthost: {host: smtp.provider.test}}\n\
             quotas: [{name: gmail, direction: egress, match: {mx_hosts: ['*.google.com']}, limits: [10/1s]}]\n",
            &[
                "quotas[0].match.mx_hosts",
                "never match",
                "smtp.provider.test",
            ][..],
        ),
        (
            "quotas: [{name: sh, direction: egress, match: {smarthost: true}, limits: [10/1s]}]\n",
            &["quotas[0].match.smarthost", "never match"][..],
        ),
    ] {
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = check_config(&file, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml:?} accepted");
        for n in names {
            assert!(
                err.contains(n),
                "error for {yaml:?} does not name {n}: {err}"
            );
        }
    }

    let missing = check_config(&dir.path().join("absent.yaml"), &[]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("absent.yaml"));
}

#[test]
fn redis_password_without_redis_is_a_named_error() {
    const PW: &str = "hunter2-not-for-logs";
    let env = [("MAILRELAY_REDIS_PASSWORD", PW)];
    let out = check_config(&example_config(), &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("MAILRELAY_REDIS_PASSWORD"), "{err}");
    assert!(!err.contains(PW), "password echoed: {err}");

    // `serve` refuses to start the same way, before it listens anywhere.
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_ports(2);
    let cfg = dir.path().join("relay.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners: [{{name: smtp, address: '127.0.0.1:{}'}}]\nadmin: {{address: '127.0.0.1:{}'}}\nqueue: {{path: '{}'}}\n",
            ports[0],
            ports[1],
            dir.path().join("q").display()
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(
        mailrelay(&["serve", "--config", cfg.to_str().unwrap()], &env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = wait_exit(&mut child.0, Duration::from_secs(15))
        .expect("serve with a stray MAILRELAY_REDIS_PASSWORD kept running");
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("MAILRELAY_REDIS_PASSWORD"), "{err}");
    assert!(!err.contains(PW), "password echoed: {err}");
    assert!(!dir.path().join("q").exists(), "queue opened anyway");
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        sleep(Duration::from_millis(20));
    }
    None
}

/// Tests that need the fixed default ports take this first.
static DEFAULT_PORTS: Mutex<()> = Mutex::new(());

#[test]
fn serve_without_arguments_runs_a_local_relay_in_the_working_directory() {
    let _ports = DEFAULT_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    for port in [2525, 9325] {
        if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
            panic!(
                "this test needs 127.0.0.1:{port} free (the built-in default), but it is in use: {e}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("relay.log")).unwrap();
    let mut child = KillOnDrop(
        mailrelay(&["serve"], &[("RUST_LOG", "mailrelay=debug")])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect("127.0.0.1:2525").is_err() {
        if let Some(st) = child.0.try_wait().unwrap() {
            panic!("mailrelay serve exited with {st}:\n{}", log());
        }
        assert!(Instant::now() < deadline, "not listening:\n{}", log());
        sleep(Duration::from_millis(25));
    }
    let admin = "127.0.0.1:9325".parse().unwrap();
    assert_eq!(http_get(admin, "/healthz").0, 200, "{}", log());
    assert_eq!(http_get(admin, "/readyz").0, 200, "{}", log());
    assert!(dir.path().join("mailrelay-data").is_dir(), "{}", log());

    let mut c = SmtpConn::connect("127.0.0.1:2525".parse().unwrap());
    expect(&c.greeting, 220, None);
    expect(&c.cmd("EHLO client.test"), 250, None);
    let sent = content("defaults");
    let r = transaction(&mut c, &sent);
    expect(&r, 250, Some("2.0.0"));
    expect(&c.cmd("QUIT"), 221, None);

    let st = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = wait_exit(&mut child.0, Duration::from_secs(15)).expect("exit after SIGTERM");
    assert!(status.success(), "exit status {status}:\n{}", log());

    let msgs = runtime().block_on(async {
        let q = EmbeddedQueue::open(&dir.path().join("mailrelay-data")).unwrap();
        let ids: Vec<QueueId> = q.list_ids(usize::MAX).await.unwrap();
        let mut out = Vec::new();
        for id in &ids {
            out.push(q.get(id).await.unwrap().unwrap());
        }
        out
    });
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].envelope.id.as_str(), queue_id(&r));
    assert_body(&msgs[0], &sent);
}

// ---------------------------------------------------------------------------------
// Logs

#[test]
fn json_logs_are_json_and_never_contain_auth_secrets() {
    const PW: &str = "Tr0ub4dor&3-horse";
    const WRONG: &str = "wrong-guess-42";
    let mut relay = Relay::start(RelayOptions {
        tls: true,
        auth_users: Some(format!("alice:{PW}\n")),
        extra_yaml: "log: {format: json}\n".into(),
        ..Default::default()
    });
    let cert = relay.cert_path.clone().unwrap();
    let plain_blob = B64.encode(format!("\0alice\0{PW}"));
    let wrong_blob = B64.encode(format!("\0alice\0{WRONG}"));

    // Credentials sent in the clear are refused, and must not be logged either.
    let mut c = relay.connect();
    expect(&c.cmd("EHLO client.test"), 250, None);
    expect(&c.cmd(&format!("AUTH PLAIN {plain_blob}")), 538, None);
    expect(&c.cmd("STARTTLS"), 220, None);
    let mut t = TlsSmtpConn::handshake(c.into_tcp(), &cert);
    expect(&t.cmd("EHLO client.test"), 250, None);
    expect(
        &t.cmd(&format!("AUTH PLAIN {wrong_blob}")),
        535,
        Some("5.7.8"),
    );
    expect(&t.cmd("AUTH LOGIN"), 334, None);
    expect(&t.cmd(&B64.encode("alice")), 334, None);
    expect(&t.cmd(&B64.encode(PW)), 235, Some("2.7.0"));
    expect(&t.cmd("MAIL FROM:<alice@client.test>"), 250, None);
    expect(&t.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    expect(&t.cmd("DATA"), 354, None);
    t.send(&content("json-log"));
    t.send(b".\r\n");
    expect(&t.reply(), 250, None);
    // Client-chosen text full of JSON metacharacters ends up in log fields.
    expect(
        &t.cmd(r#"MAIL FROM:<"q\"}{\\\",x"@client.test>"#),
        250,
        None,
    );
    expect(&t.cmd("RCPT TO:<rcpt@dest.test>"), 250, None);
    expect(&t.cmd("DATA"), 354, None);
    t.send(&content("json-metachars"));
    t.send(b".\r\n");
    expect(&t.reply(), 250, None);
    expect(&t.cmd("QUIT"), 221, None);

    let mut c = relay.connect();
    expect(&c.cmd("EHLO client.test"), 250, None);
    expect(&c.cmd("STARTTLS"), 220, None);
    let mut t = TlsSmtpConn::handshake(c.into_tcp(), &cert);
    expect(&t.cmd("EHLO client.test"), 250, None);
    expect(&t.cmd("AUTH PLAIN"), 334, None);
    expect(&t.cmd(&plain_blob), 235, None);
    expect(&t.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());

    let log = relay.log();
    let mut messages = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
        if let Some(m) = v.pointer("/fields/message").and_then(|m| m.as_str()) {
            messages.push(m.to_owned());
        }
    }
    assert_eq!(
        messages.iter().filter(|m| *m == "queued").count(),
        2,
        "expected two `queued` events in:\n{log}"
    );
    assert!(
        log.lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.pointer("/fields/from").and_then(|f| f.as_str())
                == Some(r#""q\"}{\\\",x"@client.test"#)
        }),
        "the odd sender is not logged verbatim:\n{log}"
    );
    assert!(
        messages.iter().any(|m| m == "authenticated"),
        "no `authenticated` event in:\n{log}"
    );
    for secret in [
        PW.to_owned(),
        WRONG.to_owned(),
        plain_blob,
        wrong_blob,
        B64.encode(PW),
    ] {
        assert!(!log.contains(&secret), "{secret:?} appears in the log");
    }
}

#[test]
fn redis_write_stall_answers_451_and_never_leaves_a_partial_record() {
    let redis = RedisServer::start();
    let mut relay = Relay::start(RelayOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    });
    let mut c = relay.connect();
    expect(&c.cmd("EHLO client.test"), 250, None);
    // Writes (and scripts) hang for 6 s, longer than the relay's 3 s write timeout;
    // reads and PING go on.
    redis.cli(&["CLIENT", "PAUSE", "6000", "WRITE"]).unwrap();
    let stalled = content("stalled-write");
    let r = transaction(&mut c, &stalled);
    expect(&r, 451, Some("4.3.0"));
    expect(&c.cmd("NOOP"), 250, None);
    redis.cli(&["CLIENT", "UNPAUSE"]).unwrap();
    let body = content("after-stall");
    let r = transaction(&mut c, &body);
    expect(&r, 250, Some("2.0.0"));
    let id = queue_id(&r);
    expect(&c.cmd("QUIT"), 221, None);
    assert!(relay.stop().success());

    let stored = runtime().block_on(async {
        let q = RedisQueue::connect(&redis.config("mrtest")).await.unwrap();
        let mut out = Vec::new();
        for id in q.list_ids(usize::MAX).await.unwrap() {
            out.push(q.get(&id).await.unwrap().expect("listed message exists"));
        }
        out
    });
    let m = stored
        .iter()
        .find(|m| m.envelope.id.as_str() == id)
        .expect("message answered 250 is in Redis");
    assert_body(m, &body);
    // The stalled script may still have run once Redis resumed (the relay cannot
    // take back a command it sent), which at worst duplicates a message the client
    // will retry; but then it is whole and indexed, never partial.
    for m in &stored {
        if m.envelope.id.as_str() != id {
            assert_body(m, &stalled);
        }
    }
    let keys = redis.cli(&["KEYS", "mrtest:*:m:*"]).unwrap();
    assert_eq!(keys.lines().count(), stored.len(), "{keys}");
}

#[test]
fn runtime_worker_threads_sets_the_threads_the_relay_runs() {
    for threads in [1, 3] {
        let relay = Relay::start(RelayOptions {
            extra_yaml: format!("runtime:\n  worker_threads: {threads}\n"),
            ..Default::default()
        });
        let mut c = relay.connect();
        expect(&c.cmd("EHLO client.test"), 250, None);
        let reply = transaction(&mut c, &content("threads"));
        expect(&reply, 250, Some("2.0.0"));
        let log = relay.log();
        // What tokio reports of the runtime it built, not what the config asked for.
        let want = format!("worker_threads={threads}");
        assert!(
            log.lines()
                .any(|l| l.contains("runtime ready") && l.trim_end().ends_with(&want)),
            "{want}: {log}"
        );
    }
}
