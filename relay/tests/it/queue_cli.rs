//! `mailrelay queue …` against a real relay (embedded queue, delivery disabled by
//! the harness so the mail stays queued).

use crate::support;

use std::process::{Command, Output};

use support::relay::{Relay, RelayOptions, binary, code, http_request, http_request_with};

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
        .env_remove("MAILRELAY_ADMIN_TOKEN")
        .env_remove("MAILRELAY_ADMIN_TOKEN_FILE")
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

const TOKEN: &str = "t0k3n-Very-Secret-4a1f9c";

/// Issue 13: with `admin.token_file`, every `/api/` endpoint refuses a request
/// without the token or with a wrong one and changes nothing; the probes and
/// metrics stay open; the right token and the CLI (each way of giving it) work;
/// the token never reaches the log.
#[test]
fn admin_api_requires_the_bearer_token() {
    let relay = Relay::start(RelayOptions {
        admin_token: Some(TOKEN.to_owned()),
        ..Default::default()
    });
    send(&relay, "alice@example.com", &["bob@example.org"]);
    let token_file = relay.dir.path().join("admin-token");
    let listed = |token: Option<&str>| {
        let (st, _, body) = http_request(relay.admin, "GET", "/api/v1/queue/messages", token);
        assert_eq!(st, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let ids = listed(Some(TOKEN));
    assert_eq!(ids.len(), 1);
    let id = &ids[0];

    let endpoints = [
        ("GET", "/api/v1/queue/stats".to_owned()),
        ("GET", "/api/v1/queue/messages".to_owned()),
        ("GET", format!("/api/v1/queue/messages/{id}")),
        ("DELETE", format!("/api/v1/queue/messages/{id}")),
        ("POST", format!("/api/v1/queue/messages/{id}/retry")),
        ("POST", "/api/v1/queue/retry?all=true".to_owned()),
        ("GET", "/api/v1/quotas".to_owned()),
        ("GET", "/api/v1/quotas/any".to_owned()),
    ];
    for (method, path) in &endpoints {
        let (st, head, body) = http_request(relay.admin, method, path, None);
        assert_eq!(st, 401, "{method} {path} without token: {body}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        assert!(!body.contains("alice@"), "{method} {path} leaked: {body}");
        for wrong in [
            "wrong",
            "t0k3n-Very-Secret-4a1f9",
            "t0k3n-Very-Secret-4a1f9cX",
        ] {
            let (st, _, body) = http_request(relay.admin, method, path, Some(wrong));
            assert_eq!(st, 401, "{method} {path} with a wrong token: {body}");
            assert!(!body.contains("alice@"), "{body}");
        }
    }
    // Nothing changed: the message is still queued and was never retried.
    assert_eq!(
        listed(Some(TOKEN)),
        ids,
        "refused DELETE/retry left the message"
    );
    let (_, _, detail) = http_request(
        relay.admin,
        "GET",
        &format!("/api/v1/queue/messages/{id}"),
        Some(TOKEN),
    );
    assert!(detail.contains("alice@example.com"), "{detail}");
    assert!(
        !relay.log().contains("admin: queue"),
        "a refused request logged an admin action"
    );

    for open in ["/healthz", "/readyz", "/metrics"] {
        let (st, _, _) = http_request(relay.admin, "GET", open, None);
        assert_eq!(st, 200, "{open} stays open");
    }

    // The CLI: without a token it fails with a hint; each way of giving one works.
    let o = queue(&relay, &["stats"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("HTTP 401") && err.contains("--admin-token-file"),
        "{err}"
    );
    let tf = token_file.to_str().unwrap();
    assert!(
        stdout(&queue(&relay, &["--admin-token-file", tf, "list"])).contains("alice@example.com")
    );
    let cfg = relay.config_path.to_str().unwrap();
    assert!(stdout(&queue(&relay, &["--config", cfg, "stats"])).contains("1"));
    let with_env = |k: &str, v: &str, args: &[&str]| {
        Command::new(binary())
            .arg("queue")
            .arg("--admin")
            .arg(format!("http://{}", relay.admin))
            .args(args)
            .env_remove("MAILRELAY_ADMIN_TOKEN")
            .env_remove("MAILRELAY_ADMIN_TOKEN_FILE")
            .env(k, v)
            .output()
            .unwrap()
    };
    stdout(&with_env("MAILRELAY_ADMIN_TOKEN", TOKEN, &["retry", id]));
    stdout(&with_env("MAILRELAY_ADMIN_TOKEN_FILE", tf, &["stats"]));
    let o = Command::new(binary())
        .args([
            "quota",
            "--admin",
            &format!("http://{}", relay.admin),
            "list",
        ])
        .args(["--admin-token-file", tf])
        .output()
        .unwrap();
    stdout(&o);

    // The other header (what `kubectl mailrelay` sends through the service proxy,
    // which strips `Authorization`): the right token works, a wrong one is refused
    // even next to a right bearer token (the header wins).
    fn header(t: &str) -> [(&'static str, &str); 1] {
        [("X-Mailrelay-Admin-Token", t)]
    }
    let (st, _, body) =
        http_request_with(relay.admin, "GET", "/api/v1/queue/messages", &header(TOKEN));
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("alice@example.com"), "{body}");
    let bearer = format!("Bearer {TOKEN}");
    for (method, path) in &endpoints {
        let (st, _, body) = http_request_with(
            relay.admin,
            method,
            path,
            &[
                ("X-Mailrelay-Admin-Token", "wrong"),
                ("Authorization", &bearer),
            ],
        );
        assert_eq!(st, 401, "{method} {path} with a wrong header token: {body}");
    }
    assert_eq!(listed(Some(TOKEN)), ids, "refused requests changed nothing");

    // Rotation, as the operator does it: the new token first, the previous one on
    // the second line during the grace period; both are accepted.
    std::fs::write(&token_file, format!("rotated-token-value-2\n{TOKEN}\n")).unwrap();
    for t in [TOKEN, "rotated-token-value-2"] {
        let (st, _, _) = http_request(relay.admin, "GET", "/api/v1/queue/stats", Some(t));
        assert_eq!(st, 200, "accepted during the grace period");
    }
    let (st, _, _) = http_request_with(
        relay.admin,
        "POST",
        &format!("/api/v1/queue/messages/{id}/retry"),
        &header(TOKEN),
    );
    assert_eq!(st, 200, "the previous token still acts");
    // The CLI sends the first line of a rotated file.
    stdout(&queue(&relay, &["--admin-token-file", tf, "stats"]));
    // The grace period is over: the previous line is dropped, and the token refused.
    std::fs::write(&token_file, "rotated-token-value-2\n").unwrap();
    let (st, _, _) = http_request(relay.admin, "GET", "/api/v1/queue/stats", Some(TOKEN));
    assert_eq!(st, 401, "the old token is refused after rotation");
    let (st, _, _) = http_request(
        relay.admin,
        "GET",
        "/api/v1/queue/stats",
        Some("rotated-token-value-2"),
    );
    assert_eq!(st, 200);
    stdout(&queue(&relay, &["--admin-token-file", tf, "delete", id]));
    assert!(listed(Some("rotated-token-value-2")).is_empty());

    // The audit lines name the identity; no token appears anywhere in the log.
    let log = relay.log();
    assert!(
        log.lines()
            .any(|l| l.contains("admin: queue delete") && l.contains("token:file")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("admin: queue retry") && l.contains("token:file")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("admin: queue retry") && l.contains("token:file-previous")),
        "the audit line tells a client on the previous token apart:\n{log}"
    );
    for secret in [TOKEN, "rotated-token-value-2"] {
        assert!(!log.contains(secret), "token in the log:\n{log}");
    }
}

/// A configured but missing token file stops the relay at startup, naming the field,
/// instead of starting with the API locked (or open).
#[test]
fn missing_admin_token_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_ports(2);
    let cfg = dir.path().join("relay.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners: [{{name: smtp, address: '127.0.0.1:{}'}}]\nadmin: {{address: '127.0.0.1:{}', token_file: '{}'}}\nqueue: {{path: '{}'}}\ndelivery: {{enabled: false}}\n",
            ports[0],
            ports[1],
            dir.path().join("nope").display(),
            dir.path().join("queue").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(binary())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env_remove("MAILRELAY_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the relay started without its admin token file");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("admin.token_file"), "{err}");
}

/// `MAILRELAY_ADMIN_TOKEN` alone protects the API too, and the audit line says so.
#[test]
fn admin_token_from_the_environment() {
    let relay = Relay::start(RelayOptions {
        env: vec![("MAILRELAY_ADMIN_TOKEN".into(), TOKEN.into())],
        ..Default::default()
    });
    send(&relay, "alice@example.com", &["bob@example.org"]);
    let (st, _, _) = http_request(relay.admin, "POST", "/api/v1/queue/retry?all=true", None);
    assert_eq!(st, 401);
    let (st, _, body) = http_request(
        relay.admin,
        "POST",
        "/api/v1/queue/retry?all=true",
        Some(TOKEN),
    );
    assert_eq!(st, 200, "{body}");
    let log = relay.log();
    assert!(
        log.lines()
            .any(|l| l.contains("admin: queue retry") && l.contains("token:env")),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "token in the log:\n{log}");
}

/// Secure by default: with the admin listener on a non-loopback address and no
/// token configured, every `/api/` endpoint refuses with 403 and a JSON error
/// saying so, and nothing changes; probes and metrics stay open.
#[test]
fn non_loopback_admin_without_a_token_refuses_the_api() {
    let relay = Relay::start(RelayOptions {
        admin_any_address: true,
        env: vec![("MAILRELAY_ADMIN_TOKEN".into(), String::new())],
        ..Default::default()
    });
    send(&relay, "alice@example.com", &["bob@example.org"]);
    let id = "06H29YVZVR66DSV6D7BS";
    let queued = || {
        let (st, _, body) = http_request(relay.admin, "GET", "/metrics", None);
        assert_eq!(st, 200, "/metrics stays open");
        body.lines()
            .find(|l| l.starts_with("mailrelay_queue_messages "))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    assert_eq!(queued(), "mailrelay_queue_messages 1");
    for (method, path) in [
        ("GET", "/api/v1/queue/stats".to_owned()),
        ("GET", "/api/v1/queue/messages".to_owned()),
        ("GET", format!("/api/v1/queue/messages/{id}")),
        ("DELETE", format!("/api/v1/queue/messages/{id}")),
        ("POST", format!("/api/v1/queue/messages/{id}/retry")),
        ("POST", "/api/v1/queue/retry?all=true".to_owned()),
        ("GET", "/api/v1/quotas".to_owned()),
        ("GET", "/api/v1/quotas/any".to_owned()),
    ] {
        for token in [None, Some("anything")] {
            let (st, _, body) = http_request(relay.admin, method, &path, token);
            assert_eq!(st, 403, "{method} {path}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains("no admin token is configured"),
                "{body}"
            );
            assert!(!body.contains("alice@"), "{body}");
        }
    }
    assert_eq!(
        queued(),
        "mailrelay_queue_messages 1",
        "nothing was deleted"
    );
    for open in ["/healthz", "/readyz"] {
        assert_eq!(http_request(relay.admin, "GET", open, None).0, 200);
    }
    let o = queue(&relay, &["list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("403"));
    let log = relay.log();
    assert!(log.contains("admin API /api/ is REFUSED"), "{log}");
    assert!(!log.contains("admin: queue"), "{log}");
}
