//! The README's Kubernetes quickstart sends its test mail with swaks through
//! `kubectl port-forward`, which reaches the relay from 127.0.0.1 inside the pod.
//! Here the relay config the operator renders for the README's own MailRelay
//! (`relayNetworks: [10.0.0.0/8]`) runs in a real `mailrelay serve` against a real
//! Redis: mail from 127.0.0.1 is accepted; a client outside the relay networks is
//! still refused, and so is a PROXY protocol header that merely claims loopback.
//!
//! TEST SWAPs, each marked: free loopback ports instead of the pod's, a local
//! Redis, no outbound delivery (no network here), and one more listener, a copy of
//! the README's with PROXY protocol on, through which clients from other addresses
//! are played (this machine has no second address that is reliably outside).

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use mailrelay::config::RelayConfig;
use mailrelay_operator::crd::MailRelay;
use mailrelay_operator::resources::{self, Inputs, ResolvedSecrets};
use support::redis::RedisServer;
use support::relay::{RelayProcess, localise};
use support::smtp::swaks;

const REDIS_PASSWORD: &str = "quickstart-password";

/// The MailRelay of the README's "declare the relay yourself" block.
fn readme_mailrelay() -> MailRelay {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("kind: MailRelay"))
        .expect("the README declares a MailRelay in a yaml block");
    let mut mr: MailRelay = serde_norway::from_str(block).unwrap();
    assert_eq!(
        mr.spec.relay_networks,
        ["10.0.0.0/8"],
        "the README's relay networks changed: update this test's outside client"
    );
    mr.metadata.uid = Some("7d3f4c1e-0000-4000-8000-000000000002".into());
    mr
}

/// The relay config in the ConfigMap the operator builds for `mr`.
fn rendered_config(mr: &MailRelay) -> RelayConfig {
    let objs = resources::build(Inputs {
        relay: mr,
        quotas: vec![],
        quota_rules: vec![],
        secrets: &ResolvedSecrets::default(),
        default_image: "mailrelay:test",
    })
    .unwrap();
    let yaml = &objs.config_map.data.as_ref().unwrap()["mailrelay.yaml"];
    RelayConfig::from_yaml(yaml).unwrap()
}

/// The reply code to `RCPT` after an optional PROXY v1 header.
fn rcpt_code(server: SocketAddr, proxy_header: Option<&str>) -> u16 {
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    if let Some(h) = proxy_header {
        s.write_all(h.as_bytes()).unwrap();
    }
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut reply = || {
        let mut last = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.len() >= 4, "connection closed: {last:?} {line:?}");
            let more = line.as_bytes()[3] == b'-';
            last = line;
            if !more {
                return last[..3].parse::<u16>().unwrap();
            }
        }
    };
    assert_eq!(reply(), 220);
    for (cmd, want) in [
        ("EHLO client.test", Some(250)),
        ("MAIL FROM:<test@example.com>", Some(250)),
        ("RCPT TO:<you@example.net>", None),
    ] {
        s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        let code = reply();
        match want {
            Some(w) => assert_eq!(code, w, "{cmd}"),
            None => {
                let _ = s.write_all(b"QUIT\r\n");
                return code;
            }
        }
    }
    unreachable!()
}

#[test]
fn the_readme_relay_takes_port_forwarded_mail_and_refuses_outsiders() {
    let mr = readme_mailrelay();
    let mut cfg = rendered_config(&mr);
    let nets: Vec<String> = cfg.relay_networks.iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, ["10.0.0.0/8", "127.0.0.0/8", "::1/128"]);

    let redis = RedisServer::start_with(Some(REDIS_PASSWORD));
    // ---- TEST SWAP: a PROXY protocol copy of the README's listener, to play
    // clients from elsewhere.
    let mut proxied = cfg.listeners[0].clone();
    proxied.name = "proxied".into();
    proxied.proxy_protocol = true;
    cfg.listeners.push(proxied);
    // ---- TEST SWAP: local ports and Redis; no outbound delivery.
    let (listeners, admin) = localise(&mut cfg, Some(&redis.url()));
    cfg.delivery.enabled = false;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailrelay.yaml");
    std::fs::write(&path, serde_norway::to_string(&cfg).unwrap()).unwrap();
    let relay = RelayProcess::start(
        &path,
        listeners[0],
        admin,
        // The README's `passwordSecret` reaches the pod as this variable.
        &[("MAILRELAY_REDIS_PASSWORD", REDIS_PASSWORD)],
        dir.path().join("relay.log"),
    );

    // The README's own command, from 127.0.0.1 as through a port-forward.
    let out = swaks(listeners[0], "test@example.com", "you@example.net", &[]);
    assert!(out.contains("250 "), "{out}");
    assert_eq!(rcpt_code(listeners[0], None), 250, "{}", relay.log());

    let proxied = listeners[1];
    // A pod network client in relayNetworks may relay...
    assert_eq!(
        rcpt_code(proxied, Some("PROXY TCP4 10.1.2.3 10.0.0.9 40000 2525\r\n")),
        250,
        "{}",
        relay.log()
    );
    // ...one outside is refused, as before,
    for outside in [
        "PROXY TCP4 192.0.2.7 10.0.0.9 40000 2525\r\n",
        "PROXY TCP6 2001:db8::7 fd00::9 40000 2525\r\n",
    ] {
        assert_eq!(rcpt_code(proxied, Some(outside)), 554, "{outside}");
    }
    // ...and claiming loopback in a PROXY header gets no relay rights either:
    // anyone who reaches the listener can write one.
    for claim in [
        "PROXY TCP4 127.0.0.1 127.0.0.1 40000 2525\r\n",
        "PROXY TCP6 ::1 ::1 40000 2525\r\n",
    ] {
        assert_eq!(rcpt_code(proxied, Some(claim)), 554, "{claim}");
    }
    // Only swaks' message was queued (the other sessions never sent DATA).
    let stats = admin_get(admin, "/api/v1/queue/stats");
    assert_eq!(stats["messages"], 1, "{stats}");
}

fn admin_get(addr: SocketAddr, path: &str) -> serde_json::Value {
    use std::io::Read;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    serde_json::from_str(resp.split_once("\r\n\r\n").unwrap().1).unwrap()
}
