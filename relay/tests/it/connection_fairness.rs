//! Fair shares of connection slots with real sockets against the real binary: the
//! reserved headroom of `max_connections` stays free for our own clients, and when
//! the relay is full the session idle longest (not the oldest, not one inside a
//! transaction) is closed so a new client gets in.
//!
//! Clients appear to come from TEST-NET addresses (and one from a relay network)
//! by a PROXY protocol header.

use crate::support;

use std::thread::sleep;
use std::time::Duration;

use support::relay::{Relay, RelayOptions, SmtpConn, code, http_get};

fn from(relay: &Relay, src: &str) -> SmtpConn {
    let header = format!("PROXY TCP4 {src} 127.0.0.1 40000 25\r\n");
    SmtpConn::connect_after(relay.smtp, header.as_bytes())
}

#[track_caller]
fn expect(reply: &str, want: u16, enhanced: Option<&str>) {
    assert_eq!(code(reply), want, "expected {want}, got {reply:?}");
    if let Some(e) = enhanced {
        assert!(reply[4..].starts_with(&format!("{e} ")), "{reply:?}");
    }
}

fn metric(relay: &Relay, series: &str) -> f64 {
    let (status, body) = http_get(relay.admin, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn reserve_admits_our_clients_and_the_idlest_session_makes_room() {
    let relay = Relay::start(RelayOptions {
        relay_networks: Some(vec!["10.99.0.0/16".into()]),
        proxy_protocol: true,
        limits: vec![
            "max_connections: 4".into(),
            "reserved_connections: 1".into(),
            "evict_idle_after: 2s".into(),
            "max_connections_per_network: 0".into(),
        ],
        ..Default::default()
    });

    // In a transaction: never evicted.
    let mut busy = from(&relay, "198.51.100.1");
    expect(&busy.greeting, 220, None);
    expect(&busy.cmd("EHLO busy.test"), 250, None);
    expect(&busy.cmd("MAIL FROM:<a@busy.test>"), 250, None);
    // Connected before `trickler`, but it will be active later.
    let mut older = from(&relay, "198.51.100.2");
    expect(&older.greeting, 220, None);
    // Connected later, and then sends only part of a command: no progress.
    let mut trickler = from(&relay, "198.51.100.3");
    expect(&trickler.greeting, 220, None);
    trickler.send(b"NOO");

    // Three of four slots taken, one reserved: a stranger is refused while nobody
    // has been idle long enough to give way...
    let refused = from(&relay, "198.51.100.10");
    expect(&refused.greeting, 421, Some("4.7.0"));
    // ...and a client from a relay network takes the reserved slot.
    let mut ours = from(&relay, "10.99.0.5");
    expect(&ours.greeting, 220, None);

    sleep(Duration::from_secs(1));
    expect(&older.cmd("NOOP"), 250, None);
    sleep(Duration::from_millis(2500));

    // Full: a newcomer gets in, and the session idle longest (the trickler, though
    // `older` connected first) is told why and closed.
    let mut newcomer = from(&relay, "198.51.100.11");
    expect(&newcomer.greeting, 220, None);
    let bye = trickler.reply();
    expect(&bye, 421, Some("4.7.0"));
    assert!(bye.contains("idle"), "{bye:?}");
    assert!(trickler.is_closed());

    // Everyone else is still served.
    expect(&newcomer.cmd("EHLO new.test"), 250, None);
    expect(&busy.cmd("RSET"), 250, None);
    expect(&older.cmd("NOOP"), 250, None);
    expect(&ours.cmd("NOOP"), 250, None);

    assert_eq!(
        metric(
            &relay,
            "mailrelay_smtp_connections_refused_total{reason=\"reserved_connections\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &relay,
            "mailrelay_smtp_connections_evicted_total{reason=\"reserved_connections\"}"
        ),
        1.0
    );
    let log = relay.log();
    assert!(
        log.contains("idle session closed to admit a new client"),
        "{log}"
    );
}
