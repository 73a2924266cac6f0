//! REQUIRETLS (RFC 8689) end to end: a client asks for it over STARTTLS (refused in
//! plain text), the relay queues the flag and delivers only over verified TLS to a
//! receiving MTA (aiosmtpd) that offers REQUIRETLS, and bounces with a 5.7.30 DSN
//! when no MX host offers STARTTLS (an unsuitable one is passed over for the next).

use serde_json::json;

use crate::support::deliver::{api_message, rcpt_state, relay_with, wait_until};
use crate::support::dns::{Dnsmasq, Record};
use crate::support::free_ports;
use crate::support::mx::{Mx, content};
use crate::support::pki::Pki;
use crate::support::relay::{Relay, RelayOptions, TlsSmtpConn, code};

/// Sends one message over STARTTLS with `MAIL FROM:<from> REQUIRETLS`; returns the
/// queue id.
fn send_requiretls(relay: &Relay, from: &str, to: &str) -> mailrelay::queue::QueueId {
    let mut c = relay.connect();
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        !ehlo.contains("REQUIRETLS"),
        "offered in plain text: {ehlo}"
    );
    assert_eq!(code(&c.cmd("STARTTLS")), 220);
    let mut t = TlsSmtpConn::handshake(c.into_tcp(), relay.cert_path.as_ref().unwrap());
    let ehlo = t.cmd("EHLO client.test");
    assert!(ehlo.contains("REQUIRETLS"), "{ehlo}");
    assert_eq!(code(&t.cmd(&format!("MAIL FROM:<{from}> REQUIRETLS"))), 250);
    assert_eq!(code(&t.cmd(&format!("RCPT TO:<{to}>"))), 250);
    assert_eq!(code(&t.cmd("DATA")), 354);
    let reply = t.cmd("Subject: secret\r\nFrom: <s@client.test>\r\n\r\nfor TLS only\r\n.");
    assert_eq!(code(&reply), 250, "{reply}");
    let _ = t.cmd("QUIT");
    let id = reply
        .split("queued as ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    mailrelay::queue::QueueId::parse(id).unwrap()
}

#[test]
fn requiretls_refused_in_plain_text_delivered_over_verified_tls_bounced_otherwise() {
    let pki = Pki::new(&["mx.secure.test", "mx2.two.test"]);
    let port = free_ports(1)[0];
    // secure.test: TLS with a certificate naming its MX, REQUIRETLS offered.
    // plain.test: no STARTTLS. client.test (the sender's domain) gets the DSNs.
    let dns = Dnsmasq::start(&[
        Record::mx("secure.test", 10, "mx.secure.test"),
        Record::host("mx.secure.test", &["127.0.0.1"]),
        Record::mx("plain.test", 10, "mx.plain.test"),
        Record::host("mx.plain.test", &["127.0.0.2"]),
        Record::mx("client.test", 10, "mx.client.test"),
        // two.test: the preferred MX offers no STARTTLS, the second is secure.
        Record::mx("two.test", 10, "mx1.two.test"),
        Record::host("mx1.two.test", &["127.0.0.2"]),
        Record::mx("two.test", 20, "mx2.two.test"),
        Record::host("mx2.two.test", &["127.0.0.1"]),
        Record::host("mx.client.test", &["127.0.0.2"]),
    ]);
    let secure = Mx::start(json!({
        "port": port, "cert": pki.cert(), "key": pki.key(), "requiretls": true,
    }));
    let plain = Mx::start(json!({"host": "127.0.0.2", "port": port}));
    let relay = relay_with(
        &dns,
        port,
        &format!("  ca_file: {}\n", pki.ca().display()),
        RelayOptions {
            tls: true,
            ..Default::default()
        },
    );

    // Plain text: refused with 5.7.10 (RFC 8689 §4.1).
    let mut c = relay.connect();
    c.cmd("EHLO client.test");
    let refused = c.cmd("MAIL FROM:<s@client.test> REQUIRETLS");
    assert!(refused.starts_with("530 5.7.10"), "{refused}");
    let _ = c.cmd("QUIT");

    // Verified TLS to a server offering REQUIRETLS: delivered, parameter passed on.
    let id = send_requiretls(&relay, "s@client.test", "user@secure.test");
    let recs = secure.wait_for("the REQUIRETLS message", || relay.log(), |r| !r.is_empty());
    assert_eq!(recs[0]["tls"], true);
    assert_eq!(recs[0]["requiretls"], true, "{:?}", recs[0]);
    let msg = wait_until("the delivery record", &relay, || {
        api_message(&relay, &id).filter(|m| rcpt_state(m, "user@secure.test") == "delivered")
    });
    assert_eq!(msg["envelope"]["mail"]["requiretls"], true);
    let attempt = &msg["status"]["rcpts"][0]["attempts"][0];
    assert_eq!(attempt["security"]["verified"], true, "{attempt}");

    // No STARTTLS at the next hop: bounced at once with 5.7.30, never sent.
    let id = send_requiretls(&relay, "s@client.test", "user@plain.test");
    let msg = wait_until("the bounce", &relay, || {
        api_message(&relay, &id).filter(|m| rcpt_state(m, "user@plain.test") == "bounced")
    });
    let reply = msg["status"]["rcpts"][0]["attempts"][0]["reply"]
        .as_str()
        .unwrap();
    assert!(
        reply.contains("5.7.30") && reply.contains("REQUIRETLS"),
        "{reply}"
    );
    // The DSN reaches the sender's MX; the message itself never went in plain text.
    let recs = plain.wait_for("the DSN", || relay.log(), |r| !r.is_empty());
    assert_eq!(recs.len(), 1, "only the DSN: {recs:?}");
    assert_eq!(recs[0]["from"], "<>");
    assert_eq!(recs[0]["rcpts"][0], "s@client.test");
    let dsn = String::from_utf8_lossy(&content(&recs[0])).into_owned();
    assert!(dsn.contains("Status: 5.7.30"), "{dsn}");

    // An unsuitable first MX is passed over for the next one (RFC 8689 §4.2.1).
    let id = send_requiretls(&relay, "s@client.test", "user@two.test");
    let msg = wait_until("delivery through the second MX", &relay, || {
        api_message(&relay, &id).filter(|m| rcpt_state(m, "user@two.test") != "pending")
    });
    assert_eq!(rcpt_state(&msg, "user@two.test"), "delivered", "{msg}");
    let recs = secure.wait_for("the second MX's copy", || relay.log(), |r| r.len() == 2);
    assert_eq!(recs[1]["rcpts"][0], "user@two.test");
    assert_eq!(recs[1]["requiretls"], true);
    assert_eq!(plain.records().len(), 1, "nothing more in plain text");
}
