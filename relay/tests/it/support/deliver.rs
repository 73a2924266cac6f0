//! Helpers for end-to-end delivery tests: hand mail to a relay with swaks, start a
//! relay that resolves through a test DNS server, and read what it reports (admin
//! API, metrics, `mailrelay queue`).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mailrelay::queue::QueueId;
use serde_json::Value;

use super::dns::Dnsmasq;
use super::relay::{Relay, RelayOptions, binary};

/// A relay whose MX lookups go to `dns` and whose MX connections go to `port`, with
/// fast retries (1 s, then 2 s); `extra` is more YAML inside `delivery:` (each line
/// indented by two spaces).
pub fn relay_with_dns(dns: &Dnsmasq, port: u16, extra: &str) -> Relay {
    relay_with(dns, port, extra, RelayOptions::default())
}

/// Like [`relay_with_dns`], with other options set in `opts`.
pub fn relay_with(dns: &Dnsmasq, port: u16, extra: &str, opts: RelayOptions) -> Relay {
    let retry = if extra.contains("retry:") {
        ""
    } else {
        "  retry: {first: 1s, max_backoff: 2s, jitter: 0.0}\n"
    };
    Relay::start(RelayOptions {
        extra_yaml: format!(
            "delivery:\n  dns: {{nameservers: ['{}'], port_override: {port}, timeout: 2s}}\n\
             {retry}  poll_interval: 200ms\n{extra}",
            dns.addr()
        ),
        ..opts
    })
}

/// Sends one message with swaks; returns the queue id from the `250` reply.
pub fn swaks(relay: &Relay, from: &str, to: &[&str], data: Option<&str>) -> QueueId {
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", &relay.smtp.to_string(), "--from", from])
        .args(["--to", &to.join(",")])
        .args(["--helo", "client.test"]);
    if let Some(d) = data {
        cmd.args(["--data", d]);
    }
    let out = cmd
        .output()
        .expect("swaks must be installed: run .ci/install-deps");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "swaks failed:\n{text}");
    let id = text
        .split("queued as ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no queue id in:\n{text}"));
    QueueId::parse(id).unwrap()
}

/// Polls `f` until it returns `Some`, for up to a minute; panics with `what` and the
/// relay's log otherwise.
pub fn wait_until<T>(what: &str, relay: &Relay, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nrelay log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of one series from `/metrics`, e.g.
/// `mailrelay_delivery_recipients_total{result="delivered",reason="ok"}`.
pub fn metric(relay: &Relay, series: &str) -> Option<f64> {
    let (status, text) = relay.admin_get("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `GET /api/v1/queue/messages/{id}`: `{"envelope", "status"}`, or `None` on 404.
pub fn api_message(relay: &Relay, id: &QueueId) -> Option<Value> {
    let (status, body) = relay.admin_get(&format!("/api/v1/queue/messages/{id}"));
    match status {
        200 => Some(serde_json::from_str(&body).unwrap()),
        404 => None,
        s => panic!("admin API answered {s}: {body}"),
    }
}

/// `GET /api/v1/queue/stats`.
pub fn api_stats(relay: &Relay) -> Value {
    let (status, body) = relay.admin_get("/api/v1/queue/stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Runs `mailrelay queue ARGS` against the relay's admin API; panics on failure.
pub fn queue_cli(relay: &Relay, args: &[&str]) -> String {
    let out: Output = Command::new(binary())
        .arg("queue")
        .arg("--admin")
        .arg(format!("http://{}", relay.admin))
        .args(args)
        .env_remove("MAILRELAY_ADMIN")
        .output()
        .expect("run mailrelay queue");
    assert!(
        out.status.success(),
        "mailrelay queue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The state of recipient `address` in an [`api_message`] answer.
pub fn rcpt_state(msg: &Value, address: &str) -> String {
    msg["status"]["rcpts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == address)
        .unwrap_or_else(|| panic!("no recipient {address} in {msg:#}"))["state"]
        .as_str()
        .unwrap()
        .to_owned()
}
