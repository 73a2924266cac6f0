//! What senders are told: expiry after the maximum queue lifetime, delay warnings
//! (once per message, never to the null sender, only when enabled), and bounces
//! decided before sending (SIZE, SMTPUTF8), each as an RFC 3464 DSN delivered
//! through the relay like any mail, to a real aiosmtpd behind a real dnsmasq.

use crate::support;

use mailrelay::queue::QueueId;
use serde_json::{Value, json};
use support::deliver::{api_message, metric, rcpt_state, relay_with_dns, swaks, wait_until};
use support::dns::{Dnsmasq, Record};
use support::free_ports;
use support::mx::{Mx, content, rcpts};
use support::relay::{Relay, code};

/// `b.test` (the recipients) on 127.0.0.3; `sender.test` (where reports go) on
/// 127.0.0.2.
fn zone() -> Dnsmasq {
    Dnsmasq::start(&[
        Record::mx("b.test", 10, "mx.b.test"),
        Record::host("mx.b.test", &["127.0.0.3"]),
        Record::mx("sender.test", 10, "mx.sender.test"),
        Record::host("mx.sender.test", &["127.0.0.2"]),
    ])
}

/// Hands one message to the relay over a raw SMTP session, with the exact MAIL and
/// RCPT parameters given; returns its queue id.
fn send_raw(relay: &Relay, mail: &str, rcpts: &[&str], body: &str) -> QueueId {
    let mut c = relay.connect();
    assert_eq!(code(&c.cmd("EHLO client.test")), 250);
    let r = c.cmd(&format!("MAIL FROM:{mail}"));
    assert_eq!(code(&r), 250, "{r}");
    for rcpt in rcpts {
        let r = c.cmd(&format!("RCPT TO:{rcpt}"));
        assert_eq!(code(&r), 250, "{r}");
    }
    assert_eq!(code(&c.cmd("DATA")), 354);
    c.send(format!("{body}.\r\n").as_bytes());
    let r = c.reply();
    assert_eq!(code(&r), 250, "{r}");
    c.cmd("QUIT");
    let id = r
        .split("queued as ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next();
    QueueId::parse(id.unwrap()).unwrap()
}

fn text(rec: &Value) -> String {
    String::from_utf8_lossy(&content(rec)).into_owned()
}

/// Records addressed to `to` (reports to a sender).
fn to<'a>(recs: &'a [Value], to: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| rcpts(r) == [to]).collect()
}

const BODY: &str = "From: <alice@sender.test>\r\nTo: <x@b.test>\r\nSubject: will it arrive\r\n\
                    Message-ID: <dsn-test@client.test>\r\n\r\nSECRET BODY LINE\r\n";

#[test]
fn mail_deferred_past_its_lifetime_bounces_with_a_failed_dsn() {
    let dns = zone();
    let port = free_ports(1)[0];
    let _b = Mx::plain("127.0.0.3", port, 0.0);
    let sender = Mx::plain("127.0.0.2", port, 0.0);
    let relay = relay_with_dns(
        &dns,
        port,
        "  retry: {first: 1s, max_backoff: 1s, jitter: 0.0, max_lifetime: 5s}\n",
    );
    // b.test answers 451 to this recipient forever.
    let id = send_raw(&relay, "<alice@sender.test>", &["<rcpt451@b.test>"], BODY);
    let recs = sender.wait_for("the expiry report", || relay.log(), |r| !r.is_empty());
    let dsn = &recs[0];
    assert_eq!(dsn["from"], "<>", "reports come from the null sender");
    assert_eq!(rcpts(dsn), ["alice@sender.test"]);
    let t = text(dsn);
    for want in [
        "Subject: Undelivered Mail Returned to Sender",
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Content-Type: message/delivery-status",
        "Reporting-MTA: dns; relay.test",
        "Final-Recipient: rfc822; rcpt451@b.test",
        "Action: failed",
        // RFC 3463 4.4.7: delivery time expired (a persistent transient failure).
        "Status: 4.4.7",
        "Remote-MTA: dns; mx.b.test",
        "Diagnostic-Code: smtp; 451 4.1.1 scripted 451",
        "Content-Type: message/rfc822",
        "SECRET BODY LINE",
    ] {
        assert!(t.contains(want), "{want:?} missing:\n{t}");
    }
    let msg = wait_until("the message to be final", &relay, || {
        let m = api_message(&relay, &id)?;
        m["status"]["final_at_ms"].is_u64().then_some(m)
    });
    assert_eq!(rcpt_state(&msg, "rcpt451@b.test"), "expired");
    let attempts = msg["status"]["attempts"].as_u64().unwrap();
    assert!(attempts >= 2, "retried before giving up: {msg:#}");
    // One report, and no delay warning (off by default).
    assert_eq!(sender.records().len(), 1, "{:#?}", sender.records());
    assert_eq!(
        metric(
            &relay,
            r#"mailrelay_delivery_recipients_total{result="bounced",reason="expired"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn delay_warning_is_sent_once_and_only_to_who_wants_it() {
    let dns = zone();
    let port = free_ports(1)[0];
    let _b = Mx::plain("127.0.0.3", port, 0.0);
    let sender = Mx::plain("127.0.0.2", port, 0.0);
    let relay = relay_with_dns(
        &dns,
        port,
        "  retry: {first: 1s, max_backoff: 1s, jitter: 0.0, delay_warning: 2s, max_lifetime: 1h}\n",
    );
    // Wants one: no NOTIFY (the default includes DELAY).
    let alice = swaks(
        &relay,
        "alice@sender.test",
        &["rcpt451@b.test"],
        Some(BODY.trim_end()),
    );
    // Never: a bounce itself (null sender), and a sender who asked for failures only.
    let null = send_raw(&relay, "<>", &["<rcpt452@b.test>"], BODY);
    let carol = send_raw(
        &relay,
        "<carol@sender.test>",
        &["<rcpt453@b.test> NOTIFY=FAILURE"],
        BODY,
    );
    let recs = sender.wait_for("the delay warning", || relay.log(), |r| !r.is_empty());
    let warning = &recs[0];
    assert_eq!(warning["from"], "<>");
    assert_eq!(rcpts(warning), ["alice@sender.test"]);
    let t = text(warning);
    for want in [
        "Subject: Delayed Mail (still being retried)",
        "Final-Recipient: rfc822; rcpt451@b.test",
        "Action: delayed",
        "Status: 4.1.1",
        "Will-Retry-Until: ",
        "Content-Type: text/rfc822-headers",
        "Subject: will it arrive",
    ] {
        assert!(t.contains(want), "{want:?} missing:\n{t}");
    }
    assert!(
        !t.contains("SECRET BODY LINE"),
        "a warning returns headers only"
    );

    // Three more rounds for every message after each was due its warning: none
    // brings another one.
    let attempts = |id: &QueueId| -> Option<u64> {
        let m = api_message(&relay, id)?;
        (m["status"]["delay_warned"] == true).then(|| m["status"]["attempts"].as_u64().unwrap())
    };
    let mut since = Vec::new();
    for id in [&alice, &null, &carol] {
        since.push(wait_until("the warning decided", &relay, || attempts(id)));
    }
    for (id, n) in [&alice, &null, &carol].into_iter().zip(since) {
        wait_until("three more attempts", &relay, || {
            attempts(id).filter(|a| *a >= n + 3)
        });
    }
    let recs = sender.records();
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert!(to(&recs, "carol@sender.test").is_empty());
    assert_eq!(relay.log().matches("delay warning queued").count(), 1);
    // Still pending: a warning is not a bounce.
    let m = api_message(&relay, &alice).unwrap();
    assert_eq!(rcpt_state(&m, "rcpt451@b.test"), "pending");
}

#[test]
fn size_and_smtputf8_refusals_bounce_before_sending() {
    let dns = zone();
    let port = free_ports(1)[0];
    // b.test: a 1000-octet limit and no SMTPUTF8.
    let b = Mx::start(json!({"host": "127.0.0.3", "port": port, "size": 1000, "smtputf8": false}));
    let sender = Mx::plain("127.0.0.2", port, 0.0);
    let relay = relay_with_dns(&dns, port, "");
    let big = format!(
        "Subject: big\r\n\r\n{}",
        format!("{}\r\n", "x".repeat(70)).repeat(40)
    );
    send_raw(&relay, "<alice@sender.test>", &["<big@b.test>"], &big);
    // Needs SMTPUTF8 (a non-ASCII mailbox): RFC 6531 §3.2 leaves only a bounce.
    send_raw(
        &relay,
        "<alice@sender.test> SMTPUTF8",
        &["<jösé@b.test>"],
        "Subject: hi\r\n\r\nx\r\n",
    );
    // Declared SMTPUTF8 but all ASCII: may be sent without it (RFC 6531 §3.4).
    send_raw(
        &relay,
        "<alice@sender.test> SMTPUTF8",
        &["<plain@b.test>"],
        "Subject: ascii\r\n\r\nx\r\n",
    );
    let recs = sender.wait_for("two reports", || relay.log(), |r| r.len() == 2);
    let all: String = recs.iter().map(text).collect();
    for want in [
        "Final-Recipient: rfc822; big@b.test",
        "Status: 5.3.4",
        "Final-Recipient: utf-8; jösé@b.test",
        "Status: 5.6.7",
        "Content-Type: message/global-delivery-status",
    ] {
        assert!(all.contains(want), "{want:?} missing:\n{all}");
    }
    let got = b.wait_for("the ASCII message", || relay.log(), |r| !r.is_empty());
    assert_eq!(got.len(), 1);
    assert_eq!(rcpts(&got[0]), ["plain@b.test"]);
    let bounced = |reason: &str| {
        metric(
            &relay,
            &format!(
                r#"mailrelay_delivery_recipients_total{{result="bounced",reason="{reason}"}}"#
            ),
        )
    };
    assert_eq!(bounced("too_big"), Some(1.0));
    assert_eq!(bounced("smtputf8"), Some(1.0));
}
