//! `mailrelay queue …` against a real relay (embedded queue, delivery disabled by
//! the harness so the mail stays queued).

mod support;

use std::process::{Command, Output};

use support::relay::{Relay, RelayOptions, binary, code};

fn send(relay: &Relay, from: &str, to: &[&str]) -> String {
    let mut c = relay.connect();
    assert_eq!(code(&c.cmd("EHLO client.test")), 250);
    assert_eq!(code(&c.cmd(&format!("MAIL FROM:<{from}> SIZE=300"))), 250);
    for r in to {
        assert_eq!(code(&c.cmd(&format!("RCPT TO:<{r}>"))), 250);
    }
    assert_eq!(code(&c.cmd("DATA")), 354);
    c.send(b"Subject: queue cli test\r\n\r\nhello\r\n.\r\n");
    let reply = c.reply();
    assert_eq!(code(&reply), 250, "{reply}");
    c.cmd("QUIT");
    reply
}

fn queue(relay: &Relay, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("queue")
        .arg("--admin")
        .arg(format!("http://{}", relay.admin))
        .args(args)
        .env_remove("MAILRELAY_ADMIN")
        .output()
        .expect("run mailrelay queue")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn ids(relay: &Relay) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&stdout(&queue(relay, &["--json", "list"])))
        .expect("--json list prints JSON");
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn queue_commands_against_a_real_relay() {
    let relay = Relay::start(RelayOptions::default());
    send(&relay, "alice@example.com", &["bob@example.org"]);
    send(
        &relay,
        "carol@example.com",
        &["dave@example.net", "erin@example.org"],
    );
    send(&relay, "", &["frank@example.net"]);

    // Human list, postqueue -p style.
    let out = stdout(&queue(&relay, &["list"]));
    assert!(out.contains("-Queue ID-"), "{out}");
    for addr in [
        "alice@example.com",
        "bob@example.org",
        "erin@example.org",
        "<>",
        "frank@example.net",
    ] {
        assert!(out.contains(addr), "{addr} missing:\n{out}");
    }
    assert!(out.contains("[pending]"), "{out}");
    assert!(out.trim_end().ends_with("in 3 Requests."), "{out}");

    // JSON list, filters.
    let all = ids(&relay);
    assert_eq!(all.len(), 3, "{all:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&queue(
        &relay,
        &["--json", "list", "--domain", "example.org"],
    )))
    .unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 2, "{v}");
    let out = stdout(&queue(&relay, &["list", "--deferred"]));
    assert!(out.contains("Mail queue is empty"), "{out}");

    // Show one message.
    let out = stdout(&queue(&relay, &["show", &all[0]]));
    assert!(out.contains(&format!("Queue ID:     {}", all[0])), "{out}");
    assert!(out.contains("Recipient:"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&queue(&relay, &["--json", "show", &all[0]]))).unwrap();
    assert_eq!(v["status"]["id"], all[0].as_str(), "{v}");
    assert!(v["envelope"]["recipients"].is_array(), "{v}");

    // Retry.
    let out = stdout(&queue(&relay, &["retry", "--all"]));
    assert!(
        out.contains("message(s) scheduled for immediate retry"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&queue(
        &relay,
        &["--json", "retry", "--domain", "example.net"],
    )))
    .unwrap();
    assert!(v["retried"].is_u64(), "{v}");
    stdout(&queue(&relay, &["retry", &all[1]]));

    // Stats.
    let out = stdout(&queue(&relay, &["stats"]));
    assert!(out.contains("messages:   3"), "{out}");
    assert!(out.contains("in flight:"), "{out}");
    assert!(out.contains("oldest age:"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&queue(&relay, &["--json", "stats"]))).unwrap();
    assert_eq!(v["messages"], 3, "{v}");
    assert!(v["oldest_age_seconds"].is_u64(), "{v}");

    // Delete, then it is gone.
    let out = stdout(&queue(&relay, &["delete", &all[0]]));
    assert!(out.contains("deleted"), "{out}");
    let left = ids(&relay);
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&all[0]));
    let (status, body) = relay.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("mailrelay_queue_messages 2\n"), "{body}");
    assert!(
        body.contains("mailrelay_queue_oldest_age_seconds"),
        "{body}"
    );

    // Unknown and malformed ids: exit 1 with a clear message.
    let o = queue(&relay, &["show", &all[0]]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not found"), "{err}");
    let o = queue(&relay, &["delete", &all[0]]);
    assert_eq!(o.status.code(), Some(1));
    let o = queue(&relay, &["show", "nonsense"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("malformed"));
}

#[test]
fn unreachable_relay_is_a_clear_error() {
    let port = support::free_ports(1)[0];
    let o = Command::new(binary())
        .args([
            "queue",
            "--admin",
            &format!("http://127.0.0.1:{port}"),
            "stats",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "cannot reach mailrelay admin API at http://127.0.0.1:{port}: connection refused"
        )),
        "{err}"
    );
}
