//! End-to-end delivery: swaks → mailrelay → aiosmtpd (`support::mx`), with MX
//! records served by a real dnsmasq and the receiving servers on 127.0.0.2 /
//! 127.0.0.3 (one port for all, which `delivery.dns.port_override` makes the relay
//! use). Delay warnings, expiry and local bounces are in `delivery_dsn.rs`; routes,
//! smarthosts, TLS and AUTH in `delivery_relayhosts.rs`.

use crate::support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mailrelay::queue::{AttemptResult, QueueId, RcptState};
use serde_json::{Value, json};
use support::deliver::{
    api_message, api_stats, metric, queue_cli, relay_with_dns as start_relay, swaks, wait_until,
};
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::mx::{Mx, content, distinct_rcpts, rcpts};
use support::relay::{Relay, RelayOptions};

/// The zone most tests use: `a.test` with MX 10 on 127.0.0.2 and MX 20 on
/// 127.0.0.3; `b.test` on 127.0.0.3 only; `sender.test` (where bounces go) on
/// 127.0.0.3; `v6.test` on ::1 only; `nullmx.test` with a null MX;
/// `servfail.test` answered with SERVFAIL; anything else under `.test` NXDOMAIN.
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
        Record::mx("v6.test", 10, "mx.v6.test"),
        Record::host("mx.v6.test", &["::1"]),
        Record::null_mx("nullmx.test"),
        Record::servfail("servfail.test"),
    ])
}

/// Stops the relay and reads a message's status from its embedded queue.
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
    let mx1 = Mx::plain("127.0.0.2", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let data = "Message-ID: <x1@client.test>\r\nDate: Sun, 29 Nov 2026 03:00:00 +0000\r\n\
                From: <alice@sender.test>\r\nTo: <bob@a.test>\r\nSubject: hi\r\n\r\n\
                line one\r\n.leading dot\r\n\r\nlast line";
    // swaks ends the data with CRLF . CRLF; the CRLF belongs to the message.
    let sent = format!("{data}\r\n");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], Some(data));
    let recs = mx1.wait_for("the message", || relay.log(), |r| !r.is_empty());
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
    let mx2 = Mx::plain("127.0.0.3", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    mx2.wait_for(
        "the message at the second MX",
        || relay.log(),
        |r| r.len() == 1,
    );
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
    let mx = Mx::plain("127.0.0.3", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(
        &relay,
        "alice@sender.test",
        &["ok@b.test", "later1@b.test", "rcpt550@b.test"],
        None,
    );
    // The null sender's bounce must not produce a DSN.
    swaks(&relay, "<>", &["rcpt551@b.test"], None);
    let recs = mx.wait_for(
        "delivery, retry and DSN",
        || relay.log(),
        |r| {
            let all: Vec<String> = r.iter().flat_map(rcpts).collect();
            all.contains(&"ok@b.test".into())
                && all.contains(&"later1@b.test".into())
                && all.contains(&"alice@sender.test".into())
        },
    );
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
    let mx = Mx::plain("127.0.0.3", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(
        &relay,
        "alice@sender.test",
        &["x@nosuch.test", "y@nullmx.test"],
        None,
    );
    let recs = mx.wait_for("the DSN", || relay.log(), |r| !r.is_empty());
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

/// Kill -9 a relay in the middle of a backlog, then start one on the same queue
/// (the same process again for the embedded queue, another one for Redis): every
/// message arrives; a duplicate is possible only for what was in flight.
fn killed_relay_loses_nothing(redis_url: Option<String>) {
    let dns = zone();
    let port = free_ports(1)[0];
    let opts = RelayOptions {
        redis_url,
        ..RelayOptions::default()
    };
    // The backlog is taken at once: five connections of ten messages, 0.3 s each.
    let extra =
        "  retry: {first: 1h, jitter: 0.0}\n  lease: 3s\n  max_messages_per_connection: 10\n";
    let mut relay = support::deliver::relay_with(&dns, port, extra, opts.clone());
    backlog(&relay, 50, |i| format!("m{i}@a.test"));
    let mx = Mx::plain("127.0.0.2", port, 0.3);
    queue_cli(&relay, &["retry", "--all"]);
    mx.wait_for("some deliveries", || relay.log(), |r| r.len() >= 5);
    relay.signal("KILL");
    relay.wait(Duration::from_secs(10));
    let before = mx.records().len();
    assert!(
        before < 50,
        "all delivered before the kill; test too slow to matter"
    );
    let mut next = if opts.redis_url.is_some() {
        support::deliver::relay_with(&dns, port, extra, opts)
    } else {
        relay.restart();
        relay
    };
    let recs = mx.wait_for(
        "every message",
        || next.log(),
        |r| distinct_rcpts(r).len() == 50,
    );
    // Outcomes are written to the queue when their connection ends, so what the
    // killed connections had delivered comes again, plus one in flight on each.
    assert!(recs.len() <= 50 + before + 5, "{} deliveries", recs.len());
    eprintln!(
        "{before} delivered before the kill, {} deliveries in all",
        recs.len()
    );
    next.stop();
}

#[test]
fn killed_relay_loses_nothing_embedded() {
    killed_relay_loses_nothing(None);
}

#[test]
fn killed_relay_loses_nothing_redis() {
    let redis = support::redis::RedisServer::start();
    killed_relay_loses_nothing(Some(redis.url()));
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
    let mx2 = Mx::plain("127.0.0.3", port, 0.0);
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    mx2.wait_for(
        "the message at the second MX",
        || relay.log(),
        |r| r.len() == 1,
    );
    let st = status_of(&mut relay, &id);
    let a = st.rcpts[0].attempts.last().unwrap();
    assert_eq!(a.mx.as_deref(), Some("mx2.a.test"), "{st:?}");
    assert_eq!(st.attempts, 1);
}

#[test]
fn sigterm_drains_and_releases_unfinished_mail() {
    let dns = zone();
    let port = free_ports(1)[0];
    // A long lease: after the restart only a release (not lease expiry) can make
    // the unfinished messages due again within the test's patience. Retries an
    // hour apart: the backlog is made due at once by `queue retry`.
    let mut relay = support::deliver::relay_with(
        &dns,
        port,
        "  retry: {first: 1h, jitter: 0.0}\n  lease: 5m\n  max_messages_per_connection: 10\n",
        RelayOptions {
            shutdown_grace: Some("2s".into()),
            ..RelayOptions::default()
        },
    );
    backlog(&relay, 20, |i| format!("m{i}@a.test"));
    let mx = Mx::plain("127.0.0.2", port, 1.0);
    queue_cli(&relay, &["retry", "--all"]);
    mx.wait_for("the first delivery", || relay.log(), |r| !r.is_empty());
    relay.signal("TERM");
    // Two connections of ten 1-second deliveries would need about 10 s to finish;
    // the drain gives up after the 2 s grace instead (checked below by what
    // arrived, not by the clock).
    let st = relay.wait(Duration::from_secs(60));
    assert!(st.success(), "{st}");
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
    // Within wait_for's minute, far less than the 5 min lease: released, not expired.
    mx.wait_for(
        "every message",
        || relay.log(),
        |r| distinct_rcpts(r).len() == 20,
    );
    relay.stop();
}

/// Two relays take turns on one queue: every message arrives exactly once (nobody
/// dies, and leases outlast every delivery, so there is no window for a duplicate).
fn two_relays_share_the_work(redis_url: String, cluster_nodes: Option<Vec<String>>) {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::plain("127.0.0.2", port, 0.02);
    let start = || {
        Relay::start(RelayOptions {
            redis_url: Some(redis_url.clone()),
            redis_cluster_nodes: cluster_nodes.clone(),
            extra_yaml: format!(
                "delivery:\n  dns: {{nameservers: ['{}'], port_override: {port}}}\n  \
                 lease: 30s\n  max_messages_per_connection: 5\n  poll_interval: 100ms\n",
                dns.addr()
            ),
            ..RelayOptions::default()
        })
    };
    let mut one = start();
    let mut two = start();
    let mut shards = [
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    ];
    for i in 0..100 {
        let via = if i % 2 == 0 { &one } else { &two };
        let id = swaks(via, "alice@sender.test", &[&format!("r{i}@a.test")], None);
        shards[i % 2].insert(mailrelay::queue::redis::shard_of_id(id.as_str()));
    }
    // On one server each relay keeps its new mail in a shard of its own
    // (`Ingest::new_id`); in a cluster it spreads over the shards.
    if cluster_nodes.is_none() {
        assert!(
            shards.iter().all(|s| s.len() == 1),
            "shards per relay: {shards:?}"
        );
    } else {
        assert!(
            shards.iter().all(|s| s.len() > 4),
            "shards per relay: {shards:?}"
        );
    }
    let recs = mx.wait_for(
        "all 100 messages",
        || one.log() + &two.log(),
        |r| distinct_rcpts(r).len() == 100,
    );
    assert_eq!(recs.len(), 100, "duplicates: {}", recs.len() - 100);
    let by = |r: &Relay| r.log().matches(" delivered ").count();
    let (a, b) = (by(&one), by(&two));
    eprintln!("relay one delivered {a}, relay two {b}");
    assert_eq!(a + b, 100);
    wait_until("an empty queue", &one, || {
        (api_stats(&one)["messages"] == 0).then_some(())
    });
    one.stop();
    two.stop();
}

#[test]
fn two_relays_on_one_redis_share_the_work() {
    let redis = support::redis::RedisServer::start();
    two_relays_share_the_work(redis.url(), None);
}

#[test]
fn two_relays_on_a_redis_cluster_share_the_work() {
    let cluster = support::redis::RedisCluster::start();
    let mut urls = cluster.urls();
    let first = urls.remove(0);
    two_relays_share_the_work(first, Some(urls));
    // The messages really were spread over the three masters (hash-tagged per
    // message), not kept on one node.
    let used = cluster
        .ports()
        .iter()
        .filter(|p| cluster.dbsize(**p) > 0)
        .count();
    assert!(used >= 2, "status records on {used} master(s) only");
}

#[test]
fn smarthost_takes_everything() {
    let dns = zone();
    let port = free_ports(1)[0];
    let hub = Mx::plain("127.0.0.2", port, 0.0);
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
    let recs = hub.wait_for(
        "the message at the smarthost",
        || relay.log(),
        |r| !r.is_empty(),
    );
    assert_eq!(recs.len(), 1, "one connection, one transaction: {recs:#?}");
    let mut got = rcpts(&recs[0]);
    got.sort();
    assert_eq!(got, ["x@nosuch.test", "y@b.test", "z@B.TEST"]);
}

#[test]
fn final_status_is_kept_for_its_retention_and_the_body_is_gone() {
    let dns = zone();
    let port = free_ports(1)[0];
    let _mx = Mx::plain("127.0.0.2", port, 0.0);
    let opts = RelayOptions {
        queue: vec!["status_retention: 3s".into()],
        ..RelayOptions::default()
    };
    let mut relay = support::deliver::relay_with(&dns, port, "", opts);
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    wait_until("the delivery to be recorded", &relay, || {
        let m = api_message(&relay, &id)?;
        (support::deliver::rcpt_state(&m, "bob@a.test") == "delivered").then_some(())
    });
    relay.stop();
    let q = relay.open_queue();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert!(
        rt.block_on(q.get(&id)).unwrap().is_none(),
        "the delivered body is still stored"
    );
    let (_, st) = rt.block_on(q.status(&id)).unwrap().expect("status kept");
    assert!(st.final_at_ms.is_some(), "{st:?}");
    drop(q);
    relay.restart();
    // Gone once the retention is over (a read past expiry finds nothing).
    wait_until("the status record to expire", &relay, || {
        api_message(&relay, &id).is_none().then_some(())
    });
    relay.stop();
}

/// `mailrelay_…` series names used below.
const DELIVERED: &str = r#"mailrelay_delivery_recipients_total{result="delivered",reason="ok"}"#;
const CONNECTIONS: &str = "mailrelay_delivery_connections_active";
const QUEUED: &str = "mailrelay_queue_messages";

#[test]
fn metrics_follow_deliveries() {
    let dns = zone();
    let port = free_ports(1)[0];
    // a.test's server takes 2 s per message, so a connection stays open a while.
    let slow = Mx::plain("127.0.0.2", port, 2.0);
    let mx = Mx::plain("127.0.0.3", port, 0.0);
    let relay = start_relay(&dns, port, "");
    let m = |s: &str| metric(&relay, s);
    assert_eq!(m(DELIVERED), Some(0.0));
    assert_eq!(m(CONNECTIONS), Some(0.0));
    assert_eq!(m(QUEUED), Some(0.0));

    swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    wait_until("an open outbound connection", &relay, || {
        (m(CONNECTIONS) == Some(1.0)).then_some(())
    });
    assert_eq!(m(QUEUED), Some(1.0), "in flight, still queued");
    assert_eq!(m("mailrelay_queue_leased"), Some(1.0));
    slow.wait_for("the slow delivery", || relay.log(), |r| r.len() == 1);
    wait_until("delivery counted", &relay, || {
        (m(DELIVERED) == Some(1.0)
            && m(CONNECTIONS) == Some(0.0)
            && m(QUEUED) == Some(0.0)
            && m("mailrelay_delivery_seconds_count") == Some(1.0))
        .then_some(())
    });

    // A remote refusal, a domain that does not exist and a deferral, in one
    // message; then a recipient deferred for good, which stays queued and ages.
    swaks(
        &relay,
        "alice@sender.test",
        &["rcpt550@b.test", "x@nosuch.test", "later1@b.test"],
        None,
    );
    let bounced = |reason: &str| {
        m(&format!(
            r#"mailrelay_delivery_recipients_total{{result="bounced",reason="{reason}"}}"#
        ))
    };
    let deferred = r#"mailrelay_delivery_recipients_total{result="deferred",reason="remote_4xx"}"#;
    // Delivered: bob, later1 on its second try, and the bounce report to alice.
    mx.wait_for(
        "the retry and the bounce report",
        || relay.log(),
        |r| r.len() == 2,
    );
    wait_until("every outcome counted", &relay, || {
        (m(DELIVERED) == Some(3.0)
            && bounced("remote_5xx") == Some(1.0)
            && bounced("nxdomain") == Some(1.0)
            && m(deferred) == Some(1.0)
            && m("mailrelay_delivery_seconds_count") == Some(3.0))
        .then_some(())
    });
    swaks(&relay, "alice@sender.test", &["rcpt451@b.test"], None);
    wait_until("a deferred message that ages", &relay, || {
        let age = m("mailrelay_queue_oldest_age_seconds")?;
        (m(QUEUED) == Some(1.0) && m("mailrelay_queue_deferred") == Some(1.0) && age >= 1.0)
            .then_some(())
    });
    assert!(m(deferred).unwrap() >= 2.0);
}

#[test]
fn helo_fallback_when_the_server_refuses_ehlo() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start(json!({"host": "127.0.0.2", "port": port, "no_ehlo": true}));
    let relay = start_relay(&dns, port, "");
    swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    let recs = mx.wait_for("the message", || relay.log(), |r| r.len() == 1);
    assert_eq!(recs[0]["esmtp"], false, "{recs:#?}");
    assert_eq!(recs[0]["helo"], "relay.test");
    // No SIZE or BODY parameters to a server that announced nothing.
    assert_eq!(recs[0]["mail_options"], json!([]));
}

/// Holds `count` messages (one recipient each, `to(i)`) deferred while their MX is
/// down, then makes them all due at once with `mailrelay queue retry --all`: one
/// lease takes them together, as a relay catching up on a backlog would.
fn backlog(relay: &Relay, count: usize, to: impl Fn(usize) -> String) -> Vec<QueueId> {
    let ids: Vec<QueueId> = (0..count)
        .map(|i| swaks(relay, "alice@sender.test", &[&to(i)], None))
        .collect();
    wait_until("every message deferred", relay, || {
        (api_stats(relay)["deferred"] == count).then_some(())
    });
    ids
}

#[test]
fn connections_are_reused_up_to_the_per_connection_cap() {
    let dns = zone();
    let port = free_ports(1)[0];
    // Retries an hour apart: only `queue retry` brings the backlog back.
    let relay = start_relay(
        &dns,
        port,
        "  retry: {first: 1h, jitter: 0.0}\n  max_messages_per_connection: 3\n",
    );
    backlog(&relay, 7, |i| format!("m{i}@a.test"));
    let mx = Mx::plain("127.0.0.2", port, 0.0);
    let out = queue_cli(&relay, &["retry", "--all"]);
    assert!(out.contains('7'), "{out}");
    let recs = mx.wait_for(
        "all 7 messages",
        || relay.log(),
        |r| distinct_rcpts(r).len() == 7,
    );
    assert_eq!(recs.len(), 7);
    let mut per_conn = std::collections::BTreeMap::new();
    for r in &recs {
        *per_conn.entry(r["conn"].as_u64().unwrap()).or_insert(0) += 1;
    }
    let mut sizes: Vec<u32> = per_conn.into_values().collect();
    sizes.sort();
    assert_eq!(sizes, [1, 3, 3], "{recs:#?}");
    assert_eq!(mx.stats()["opened"], 3);
}

#[test]
fn connections_to_one_destination_are_limited() {
    let dns = zone();
    let port = free_ports(1)[0];
    let relay = start_relay(
        &dns,
        port,
        "  retry: {first: 1h, jitter: 0.0}\n  max_messages_per_connection: 1\n  \
         per_destination_concurrency: 2\n",
    );
    backlog(&relay, 8, |i| format!("m{i}@a.test"));
    // Each delivery takes a second: eight connections would all be open at once
    // without the limit.
    let mx = Mx::plain("127.0.0.2", port, 1.0);
    queue_cli(&relay, &["retry", "--all"]);
    mx.wait_for(
        "all 8 messages",
        || relay.log(),
        |r| distinct_rcpts(r).len() == 8,
    );
    let stats = mx.stats();
    assert_eq!(stats["opened"], 8, "{stats}");
    assert_eq!(stats["max_active"], 2, "{stats}");
}

#[test]
fn ipv6_only_mx_is_reached_over_ipv6() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::start(json!({"host": "::1", "port": port}));
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(&relay, "alice@sender.test", &["bob@v6.test"], None);
    mx.wait_for("the message over IPv6", || relay.log(), |r| r.len() == 1);
    let st = status_of(&mut relay, &id);
    let a = st.rcpts[0].attempts.last().unwrap();
    assert_eq!(
        (a.result, a.mx.as_deref(), a.ip.as_deref()),
        (AttemptResult::Delivered, Some("mx.v6.test"), Some("::1"))
    );
}

#[test]
fn opportunistic_tls_falls_back_to_plain_text_when_the_handshake_fails() {
    let dns = zone();
    let port = free_ports(1)[0];
    let pki = support::pki::Pki::new(&["mx1.a.test"]);
    let mx = Mx::start(json!({
        "host": "127.0.0.2", "port": port,
        "cert": pki.cert(), "key": pki.key(), "tls_broken": true,
    }));
    let mut relay = start_relay(&dns, port, "");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    let recs = mx.wait_for("the message", || relay.log(), |r| r.len() == 1);
    assert_eq!(recs[0]["tls"], false);
    // One connection failed the handshake, a second one delivered.
    assert_eq!(mx.stats()["opened"], 2);
    // The downgrade is visible without debug logging: a counter and a WARN line.
    assert_eq!(
        metric(&relay, "mailrelay_delivery_tls_fallbacks_total"),
        Some(1.0)
    );
    let st = status_of(&mut relay, &id);
    let a = st.rcpts[0].attempts.last().unwrap();
    assert_eq!((a.result, a.tls.clone()), (AttemptResult::Delivered, None));
    let log = relay.log();
    let line = log
        .lines()
        .find(|l| l.contains("falling back to plain text"))
        .unwrap_or_else(|| panic!("no fallback log line:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains("mx1.a.test"),
        "{line}"
    );
}

#[test]
fn a_dns_failure_defers() {
    let dns = zone();
    let port = free_ports(1)[0];
    let relay = start_relay(&dns, port, "");
    let id = swaks(&relay, "alice@sender.test", &["bob@servfail.test"], None);
    let m = wait_until("two deferred attempts", &relay, || {
        let m = api_message(&relay, &id)?;
        (m["status"]["attempts"].as_u64()? >= 2).then_some(m)
    });
    let r = &m["status"]["rcpts"][0];
    assert_eq!(r["state"], "pending", "{m:#}");
    let reply = r["attempts"][0]["reply"].as_str().unwrap();
    assert!(reply.starts_with("451 4.4.3"), "{reply}");
    assert!(
        metric(
            &relay,
            r#"mailrelay_delivery_recipients_total{result="deferred",reason="dns_tempfail"}"#
        )
        .unwrap()
            >= 2.0
    );
}

/// Mail the relay queues wakes its idle delivery: with a poll interval of an hour,
/// messages still go out (the second one certainly after the scheduler went idle).
#[test]
fn queued_mail_wakes_idle_delivery() {
    let dns = zone();
    let port = free_ports(1)[0];
    let hub = Mx::plain("127.0.0.2", port, 0.0);
    let relay = Relay::start(RelayOptions {
        extra_yaml: format!(
            "delivery:\n  dns: {{nameservers: ['{}'], port_override: {port}, timeout: 2s}}\n  \
             poll_interval: 1h\n  smarthost: {{host: 127.0.0.2, port: {port}, tls: disabled}}\n",
            dns.addr()
        ),
        ..Default::default()
    });
    for (n, to) in ["first@b.test", "second@b.test"].iter().enumerate() {
        swaks(&relay, "alice@sender.test", &[to], None);
        let recs = hub.wait_for(
            "the message at the smarthost",
            || relay.log(),
            |r| r.len() > n,
        );
        assert_eq!(rcpts(&recs[n]), [*to]);
    }
}
