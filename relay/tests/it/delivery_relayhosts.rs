//! Relay hosts: the smarthost (everything through one upstream, with STARTTLS
//! verified against a configured CA and AUTH only over TLS) and per-domain routes
//! (the transport map), end to end from swaks through mailrelay to real aiosmtpd
//! servers, some offering STARTTLS and AUTH.

use crate::support;

use serde_json::json;
use support::deliver::{api_message, metric, rcpt_state, relay_with, swaks, wait_until};
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::mx::{Mx, rcpts};
use support::pki::Pki;
use support::relay::{Relay, RelayOptions};

/// `a.test` has an MX (127.0.0.2); routes and smarthosts must take its mail elsewhere.
fn zone() -> Dnsmasq {
    Dnsmasq::start(&[
        Record::mx("a.test", 10, "mx.a.test"),
        Record::host("mx.a.test", &["127.0.0.2"]),
    ])
}

const PASSWORD: &str = "pa55-w0rd-Xq";

/// A relay whose smarthost is `localhost:port` (`localhost` is what the test
/// certificate names), with `settings` inside `smarthost: {…}` and, with a
/// username, the password in the environment.
fn smarthost_relay(dns: &Dnsmasq, port: u16, settings: &str) -> Relay {
    // A password without a username is refused by config validation.
    let env = if settings.contains("username") {
        vec![("MAILRELAY_SMARTHOST_PASSWORD".into(), PASSWORD.into())]
    } else {
        vec![]
    };
    let opts = RelayOptions {
        env,
        ..RelayOptions::default()
    };
    relay_with(
        dns,
        1,
        &format!("  smarthost: {{host: localhost, port: {port}, {settings}}}\n"),
        opts,
    )
}

/// The last attempt's reply for recipient `address` once the message has had one.
fn deferred_reply(relay: &Relay, id: &mailrelay::queue::QueueId, address: &str) -> String {
    wait_until("a deferred attempt", relay, || {
        let m = api_message(relay, id)?;
        let r = m["status"]["rcpts"]
            .as_array()?
            .iter()
            .find(|r| r["address"] == address)?
            .clone();
        let last = r["attempts"].as_array()?.last()?.clone();
        assert_eq!(r["state"], "pending", "{m:#}");
        assert_eq!(last["result"], "deferred", "{m:#}");
        Some(last["reply"].as_str()?.to_owned())
    })
}

#[test]
fn smarthost_with_verified_tls_and_auth() {
    let dns = zone();
    let pki = Pki::new(&["localhost"]);
    let hub = Mx::start(json!({
        "cert": pki.cert(), "key": pki.key(),
        "auth": {"user": "relayuser", "password": PASSWORD},
    }));
    let relay = smarthost_relay(
        &dns,
        hub.port,
        &format!(
            "tls: required, ca_file: '{}', username: relayuser",
            pki.ca().display()
        ),
    );
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    let recs = hub.wait_for(
        "the message at the smarthost",
        || relay.log(),
        |r| !r.is_empty(),
    );
    assert_eq!(rcpts(&recs[0]), ["bob@a.test"]);
    assert_eq!(
        (&recs[0]["tls"], &recs[0]["auth"]),
        (&json!(true), &json!(true))
    );
    let attempts = hub.auth_attempts();
    assert!(!attempts.is_empty());
    assert!(attempts.iter().all(|a| a["tls"] == true), "{attempts:?}");
    let m = wait_until("the delivery recorded", &relay, || {
        let m = api_message(&relay, &id)?;
        (rcpt_state(&m, "bob@a.test") == "delivered").then_some(m)
    });
    let a = &m["status"]["rcpts"][0]["attempts"][0];
    assert_eq!(a["mx"], "localhost", "{m:#}");
    assert!(
        a["tls"]["version"].as_str().unwrap().starts_with("TLSv1."),
        "{m:#}"
    );
    assert!(!relay.log().contains(PASSWORD), "the password was logged");
}

#[test]
fn smarthost_with_an_unknown_certificate_defers() {
    let dns = zone();
    let pki = Pki::new(&["localhost"]);
    let other_ca = Pki::new(&["localhost"]);
    let hub = Mx::start(json!({"cert": pki.cert(), "key": pki.key()}));
    let relay = smarthost_relay(
        &dns,
        hub.port,
        &format!("tls: required, ca_file: '{}'", other_ca.ca().display()),
    );
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    let reply = deferred_reply(&relay, &id, "bob@a.test");
    assert!(reply.contains("TLS"), "{reply}");
    assert!(
        hub.records().is_empty(),
        "sent despite a failed verification"
    );
    assert!(
        metric(
            &relay,
            r#"mailrelay_delivery_recipients_total{result="deferred",reason="tls"}"#
        )
        .unwrap()
            >= 1.0
    );
}

#[test]
fn required_tls_to_a_server_without_starttls_defers_and_sends_nothing() {
    let dns = zone();
    let hub = Mx::start(json!({}));
    let relay = smarthost_relay(&dns, hub.port, "tls: required");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    let reply = deferred_reply(&relay, &id, "bob@a.test");
    assert!(reply.contains("STARTTLS"), "{reply}");
    assert!(hub.stats()["opened"].as_u64().unwrap() >= 1, "never tried");
    assert!(hub.records().is_empty(), "sent in plain text");
}

#[test]
fn auth_is_never_sent_without_tls() {
    let dns = zone();
    // A server that offers AUTH in plain text (and no STARTTLS): a trap.
    let hub = Mx::start(json!({
        "auth": {"user": "relayuser", "password": PASSWORD},
        "auth_require_tls": false,
    }));
    let relay = smarthost_relay(&dns, hub.port, "tls: opportunistic, username: relayuser");
    let id = swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    let reply = deferred_reply(&relay, &id, "bob@a.test");
    assert!(reply.contains("without TLS"), "{reply}");
    assert!(hub.auth_attempts().is_empty(), "credentials sent in clear");
    assert!(hub.records().is_empty());
}

#[test]
fn routes_take_their_domains_before_the_smarthost_and_the_mx() {
    let dns = zone();
    let port = free_ports(1)[0];
    let mx = Mx::plain("127.0.0.2", port, 0.0);
    let routed = Mx::plain("127.0.0.3", port, 0.0);
    let hub = Mx::plain("127.0.0.4", port, 0.0);
    let relay = relay_with(
        &dns,
        port,
        &format!(
            "  smarthost: {{host: 127.0.0.4, port: {port}}}\n  routes:\n    \
             - {{domains: [a.test, .sub.test], host: 127.0.0.3, port: {port}}}\n"
        ),
        RelayOptions::default(),
    );
    swaks(
        &relay,
        "alice@sender.test",
        &[
            "x@a.test",
            "y@deep.sub.test",
            "z@elsewhere.test",
            "w@sub.test",
        ],
        None,
    );
    let recs = routed.wait_for("the routed recipients", || relay.log(), |r| !r.is_empty());
    // Both routed domains share the route's connection and transaction.
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(rcpts(&recs[0]), ["x@a.test", "y@deep.sub.test"]);
    // `.sub.test` covers subdomains only: sub.test itself goes to the smarthost.
    let recs = hub.wait_for(
        "the rest at the smarthost",
        || relay.log(),
        |r| !r.is_empty(),
    );
    assert_eq!(rcpts(&recs[0]), ["z@elsewhere.test", "w@sub.test"]);
    assert!(
        mx.records().is_empty(),
        "a.test's MX was used despite the route"
    );
}

#[test]
fn route_with_verified_tls_and_auth_from_the_environment() {
    let dns = zone();
    let pki = Pki::new(&["localhost"]);
    let partner = Mx::start(json!({
        "cert": pki.cert(), "key": pki.key(),
        "auth": {"user": "partner", "password": PASSWORD},
    }));
    let mx = Mx::plain("127.0.0.2", free_ports(1)[0], 0.0);
    let opts = RelayOptions {
        env: vec![("PARTNER_PASSWORD".into(), PASSWORD.into())],
        ..RelayOptions::default()
    };
    let relay = relay_with(
        &dns,
        mx.port,
        &format!(
            "  routes:\n    - {{domains: [a.test], host: localhost, port: {}, tls: required, \
             ca_file: '{}', username: partner, password_env: PARTNER_PASSWORD}}\n",
            partner.port,
            pki.ca().display()
        ),
        opts,
    );
    swaks(&relay, "alice@sender.test", &["bob@a.test"], None);
    let recs = partner.wait_for("the routed message", || relay.log(), |r| !r.is_empty());
    assert_eq!(
        (&recs[0]["tls"], &recs[0]["auth"]),
        (&json!(true), &json!(true))
    );
    assert!(mx.records().is_empty());
    assert!(!relay.log().contains(PASSWORD));
}
