//! MTA-STS (RFC 8461) end to end: dnsmasq publishes `_mta-sts` TXT and MX records, a
//! real Python HTTPS server with a test CA serves the policies (and counts the
//! requests), and aiosmtpd receives, with STARTTLS presenting a certificate that
//! names some MX hosts and not others, or without STARTTLS at all.

use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::deliver::{api_message, queue_cli, rcpt_state, relay_with, swaks, wait_until};
use crate::support::dns::{Dnsmasq, Record};
use crate::support::mx::Mx;
use crate::support::pki::Pki;
use crate::support::redis::RedisServer;
use crate::support::relay::RelayOptions;
use crate::support::{free_ports, start_python};

/// Serves `/.well-known/mta-sts.txt` per `Host` from `cfg.policies[host]`:
/// `{"body", "status", "ctype", "sleep", "location"}`; appends each request's host
/// to `cfg.log`.
const HTTPS: &str = r#"
import http.server, json, ssl, sys, time

cfg = json.loads(sys.argv[1])

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        host = (self.headers.get("Host") or "").split(":")[0]
        with open(cfg["log"], "a") as f:
            f.write(host + " " + self.path + "\n")
        p = cfg["policies"].get(host)
        if p is None or self.path != "/.well-known/mta-sts.txt":
            self.send_response(404)
            self.end_headers()
            return
        time.sleep(p.get("sleep", 0))
        body = p.get("body", "").encode()
        self.send_response(p.get("status", 200))
        self.send_header("Content-Type", p.get("ctype", "text/plain"))
        if "location" in p:
            self.send_header("Location", p["location"])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

srv = http.server.ThreadingHTTPServer(("127.0.0.1", cfg["port"]), H)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cfg["cert"], cfg["key"])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

pub(crate) struct PolicyServer {
    child: Child,
    dir: tempfile::TempDir,
    pub(crate) port: u16,
}

impl PolicyServer {
    pub(crate) fn start(pki: &Pki, policies: Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports(1)[0];
        let cfg = json!({
            "port": port,
            "cert": pki.cert(),
            "key": pki.key(),
            "log": dir.path().join("requests.log"),
            "policies": policies,
        });
        let (child, line) = start_python(dir.path(), HTTPS, &cfg);
        assert_eq!(line.trim(), "ready", "policy server did not start");
        PolicyServer { child, dir, port }
    }

    /// How many requests asked for `host`'s policy.
    fn requests(&self, host: &str) -> usize {
        std::fs::read_to_string(self.dir.path().join("requests.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').next() == Some(host))
            .count()
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn policy(mode: &str, mx: &[&str]) -> String {
    let mut p = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        p.push_str(&format!("mx: {m}\r\n"));
    }
    p + "max_age: 86400\r\n"
}

/// Every name the test certificate covers: the good MX hosts and every policy host.
const CERT_NAMES: &[&str] = &[
    "mx.enf.test",
    "mx.plain.test",
    "mx.other.test",
    "mta-sts.enf.test",
    "mta-sts.wrongcert.test",
    "mta-sts.plain.test",
    "mta-sts.notlisted.test",
    "mta-sts.tst.test",
    "mta-sts.none.test",
    "mta-sts.badsyntax.test",
    "mta-sts.big.test",
    "mta-sts.slow.test",
    "mta-sts.redirect.test",
];

/// One zone for every scenario: `<d>.test` has MX `mx.<d>.test`, and `_mta-sts`.
fn zone(domains: &[&str], plain_ip: &str) -> Vec<Record> {
    let mut records = Vec::new();
    for d in domains {
        let mx = format!("mx.{d}");
        let ip = if *d == "plain.test" {
            plain_ip
        } else {
            "127.0.0.1"
        };
        records.push(Record::mx(d, 10, &mx));
        records.push(Record::host(&mx, &[ip]));
        records.push(Record::host(&format!("mta-sts.{d}"), &["127.0.0.1"]));
        records.push(Record::txt(
            &format!("_mta-sts.{d}"),
            "v=STSv1; id=20261207T1",
        ));
    }
    records
}

fn security<'a>(msg: &'a Value, address: &str) -> Vec<&'a Value> {
    msg["status"]["rcpts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == address)
        .unwrap()["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["security"])
        .collect()
}

#[test]
fn enforce_testing_none_and_broken_policies_against_real_peers() {
    let pki = Pki::new(CERT_NAMES);
    let domains = [
        "enf.test",
        "wrongcert.test",
        "plain.test",
        "notlisted.test",
        "tst.test",
        "none.test",
        "badsyntax.test",
        "big.test",
        "slow.test",
        "redirect.test",
    ];
    let dns = Dnsmasq::start(&zone(&domains, "127.0.0.2"));
    let https = PolicyServer::start(
        &pki,
        json!({
            "mta-sts.enf.test": {"body": policy("enforce", &["mx.enf.test"])},
            // Listed, but its certificate does not name it.
            "mta-sts.wrongcert.test": {"body": policy("enforce", &["mx.wrongcert.test"])},
            // Listed, but the host offers no STARTTLS.
            "mta-sts.plain.test": {"body": policy("enforce", &["*.plain.test"])},
            "mta-sts.notlisted.test": {"body": policy("enforce", &["mx.other.test"])},
            // Wrong certificate and not listed: delivered anyway, both recorded.
            "mta-sts.tst.test": {"body": policy("testing", &["mx.elsewhere.test"])},
            "mta-sts.none.test": {"body": policy("none", &[])},
            "mta-sts.badsyntax.test": {"body": "version: STSv1\nmode: enforce\nmx: mx.badsyntax.test\nmax_age: forever\n"},
            "mta-sts.big.test": {"body": format!("{}{}", policy("enforce", &["nowhere.test"]), "x: y\r\n".repeat(14000))},
            "mta-sts.slow.test": {"body": policy("enforce", &["nowhere.test"]), "sleep": 6},
            "mta-sts.redirect.test": {"status": 301, "location": "https://mta-sts.enf.test/.well-known/mta-sts.txt"},
        }),
    );
    let port = free_ports(1)[0];
    // One receiving MTA with the test certificate on 127.0.0.1, one without TLS on
    // 127.0.0.2, both on the port every MX connection goes to.
    let tls_mx = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let plain_mx = Mx::start(json!({"host": "127.0.0.2", "port": port}));
    let relay = relay_with(
        &dns,
        port,
        &format!(
            "  ca_file: {}\n  mta_sts: {{port_override: {}, fetch_timeout: 2s}}\n  retry: {{first: 30s, max_backoff: 60s, jitter: 0.0}}\n",
            pki.ca().display(),
            https.port
        ),
        RelayOptions::default(),
    );
    let rcpts: Vec<String> = domains.iter().map(|d| format!("user@{d}")).collect();
    let ids: Vec<_> = rcpts
        .iter()
        .map(|r| swaks(&relay, "sender@client.test", &[r], None))
        .collect();
    let id_of = |d: &str| &ids[domains.iter().position(|x| *x == d).unwrap()];

    // Every message was tried once (delivered or deferred).
    let msgs: Vec<Value> = ids
        .iter()
        .map(|id| {
            wait_until("an attempt", &relay, || {
                api_message(&relay, id).filter(|m| {
                    m["status"]["rcpts"][0]["attempts"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                })
            })
        })
        .collect();
    let msg = |d: &str| &msgs[domains.iter().position(|x| *x == d).unwrap()];
    let log = relay.log();
    let delivered = tls_mx.records();
    let got = |d: &str| {
        delivered
            .iter()
            .chain(plain_mx.records().iter())
            .any(|r| r["rcpts"][0] == format!("user@{d}"))
    };

    // enforce + matching certificate: delivered over verified TLS.
    assert_eq!(
        rcpt_state(msg("enf.test"), "user@enf.test"),
        "delivered",
        "{log}"
    );
    let s = security(msg("enf.test"), "user@enf.test")[0];
    assert_eq!(s["policy"], "mta-sts");
    assert_eq!(s["mode"], "enforce");
    assert_eq!(s["policy_id"], "20261207T1");
    assert_eq!(s["verified"], true);
    assert!(s.get("failure").is_none(), "{s}");
    assert!(
        delivered
            .iter()
            .any(|r| r["rcpts"][0] == "user@enf.test" && r["tls"] == true)
    );

    // enforce + certificate not naming the MX / no STARTTLS / MX not listed:
    // nothing delivered, deferred with the reason.
    for (d, why) in [
        ("wrongcert.test", "certificate"),
        ("plain.test", "STARTTLS"),
        (
            "notlisted.test",
            "MTA-STS: mx.notlisted.test not in policy 20261207T1 (enforce)",
        ),
    ] {
        assert!(!got(d), "{d} must not be delivered");
        let m = msg(d);
        assert_eq!(rcpt_state(m, &format!("user@{d}")), "pending", "{d}");
        let reply = m["status"]["rcpts"][0]["attempts"][0]["reply"]
            .as_str()
            .unwrap();
        assert!(reply.contains(why), "{d}: {reply}");
    }
    assert!(plain_mx.records().is_empty(), "nothing goes in plain text");

    // testing: delivered (opportunistic TLS), both failures recorded.
    assert_eq!(rcpt_state(msg("tst.test"), "user@tst.test"), "delivered");
    let s = security(msg("tst.test"), "user@tst.test")[0];
    assert_eq!(
        (s["policy"].as_str(), s["mode"].as_str()),
        (Some("mta-sts"), Some("testing"))
    );
    assert_eq!(s["verified"], false);
    let failure = s["failure"].as_str().unwrap();
    assert!(
        failure.contains("mx.tst.test not in policy") && failure.contains("certificate not valid"),
        "{failure}"
    );

    // none, and policies that cannot be used: delivered as without MTA-STS; the
    // trouble is in the attempt record.
    for (d, note) in [
        ("none.test", None),
        ("badsyntax.test", Some("max_age")),
        ("big.test", Some("larger than 65536")),
        ("slow.test", Some("within")),
        ("redirect.test", Some("redirects are not followed")),
    ] {
        let m = msg(d);
        assert_eq!(
            rcpt_state(m, &format!("user@{d}")),
            "delivered",
            "{d}\n{log}"
        );
        let s = security(m, &format!("user@{d}"))[0];
        assert_eq!(s["policy"], "opportunistic", "{d}: {s}");
        match note {
            None => assert!(s.get("failure").is_none(), "{d}: {s}"),
            Some(n) => {
                let f = s["failure"].as_str().unwrap_or_default();
                assert!(f.contains(n), "{d}: {f}");
            }
        }
    }
    // A redirect is not followed: enf.test's policy was fetched once, for enf.test.
    assert_eq!(https.requests("mta-sts.enf.test"), 1);

    // `mailrelay queue show` shows the policy and the verification.
    let shown = queue_cli(&relay, &["show", &id_of("tst.test").to_string()]);
    assert!(
        shown.contains("policy=mta-sts/testing") && shown.contains("verified=no"),
        "{shown}"
    );
    let shown = queue_cli(&relay, &["show", &id_of("enf.test").to_string()]);
    assert!(shown.contains("verified=yes"), "{shown}");

    // A warm cache: a second message to enf.test fetches nothing more.
    let again = swaks(&relay, "sender@client.test", &["again@enf.test"], None);
    wait_until("the second delivery", &relay, || {
        api_message(&relay, &again).filter(|m| rcpt_state(m, "again@enf.test") == "delivered")
    });
    assert_eq!(https.requests("mta-sts.enf.test"), 1);
}

#[test]
fn one_fetch_serves_two_relays_sharing_redis() {
    let pki = Pki::new(CERT_NAMES);
    let dns = Dnsmasq::start(&zone(&["enf.test"], "127.0.0.2"));
    let https = PolicyServer::start(
        &pki,
        json!({"mta-sts.enf.test": {"body": policy("enforce", &["mx.enf.test"])}}),
    );
    let port = free_ports(1)[0];
    let mx = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let redis = RedisServer::start();
    let extra = format!(
        "  ca_file: {}\n  mta_sts: {{port_override: {}, fetch_timeout: 5s}}\n",
        pki.ca().display(),
        https.port
    );
    let opts = RelayOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    };
    let mut first = relay_with(&dns, port, &extra, opts.clone());
    swaks(&first, "s@client.test", &["one@enf.test"], None);
    mx.wait_for("the first message", || first.log(), |r| r.len() == 1);
    assert_eq!(https.requests("mta-sts.enf.test"), 1);
    first.stop();
    // The policy sits in Redis, expiring with its max_age.
    let ttl: u64 = redis
        .cli(&["PTTL", "mrtest:sts:enf.test"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 86_000_000 && ttl <= 86_400_000, "PTTL {ttl}");

    // A second relay process (a fresh memory cache) takes it from Redis.
    let second = relay_with(&dns, port, &extra, opts);
    swaks(&second, "s@client.test", &["two@enf.test"], None);
    let recs = mx.wait_for("the second message", || second.log(), |r| r.len() == 2);
    assert!(recs.iter().all(|r| r["tls"] == true));
    assert_eq!(
        https.requests("mta-sts.enf.test"),
        1,
        "one fetch for the cluster"
    );
    assert!(
        !second.log().contains("MTA-STS policy fetched"),
        "{}",
        second.log()
    );
    std::thread::sleep(Duration::from_millis(10));
}

/// Postfix as the receiving MTA (its own STARTTLS, OpenSSL): under an `enforce`
/// policy the mail goes over verified TLS when Postfix presents a certificate
/// naming the MX host, and not at all when it presents one that does not.
#[test]
fn enforce_against_postfix_with_matching_and_mismatching_certificates() {
    let pki = Pki::new(&["mx.enf.test", "mta-sts.enf.test"]);
    let wrong = Pki::new(&["somewhere-else.test"]);
    let dns = Dnsmasq::start(&zone(&["enf.test"], "127.0.0.2"));
    let https = PolicyServer::start(
        &pki,
        json!({"mta-sts.enf.test": {"body": policy("enforce", &["mx.enf.test"])}}),
    );
    // Postfix relays what it accepts on to this sink.
    let sink = Mx::start(json!({}));
    let tls_cf = |p: &Pki| {
        format!(
            "smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_loglevel = 1\nsmtp_tls_security_level = none\n",
            p.cert().display(),
            p.key().display()
        )
    };
    let extra = |pf_port: u16| {
        format!(
            "  ca_file: {}\n  mta_sts: {{port_override: {}, fetch_timeout: 5s}}\n  retry: {{first: 30s, max_backoff: 60s, jitter: 0.0}}\n# Postfix on {pf_port}\n",
            pki.ca().display(),
            https.port
        )
    };

    // Matching certificate: delivered through Postfix, TLS verified.
    {
        let pf = crate::support::postfix::Postfix::start_with(sink.port, &tls_cf(&pki));
        let relay = relay_with(&dns, pf.port, &extra(pf.port), RelayOptions::default());
        let id = swaks(&relay, "s@client.test", &["user@enf.test"], None);
        let msg = wait_until("delivery to Postfix", &relay, || {
            api_message(&relay, &id).filter(|m| rcpt_state(m, "user@enf.test") != "pending")
        });
        assert_eq!(
            rcpt_state(&msg, "user@enf.test"),
            "delivered",
            "{msg}\n{}",
            pf.maillog()
        );
        let s = security(&msg, "user@enf.test")[0];
        assert_eq!(
            (s["policy"].as_str(), s["verified"].as_bool()),
            (Some("mta-sts"), Some(true)),
            "{s}"
        );
        sink.wait_for(
            "the mail through Postfix",
            || pf.maillog(),
            |r| r.len() == 1,
        );
        assert!(
            pf.maillog().contains("TLS connection established from"),
            "{}",
            pf.maillog()
        );
    }
    // A certificate that does not name the MX host (nor chain to a trusted CA):
    // nothing is sent; the mail waits.
    {
        let pf = crate::support::postfix::Postfix::start_with(sink.port, &tls_cf(&wrong));
        let relay = relay_with(&dns, pf.port, &extra(pf.port), RelayOptions::default());
        let id = swaks(&relay, "s@client.test", &["other@enf.test"], None);
        let msg = wait_until("the deferral", &relay, || {
            api_message(&relay, &id).filter(|m| {
                m["status"]["rcpts"][0]["attempts"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            })
        });
        assert_eq!(rcpt_state(&msg, "other@enf.test"), "pending", "{msg}");
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(sink.records().len(), 1, "nothing more went through Postfix");
        let log = pf.maillog();
        assert_eq!(log.matches("from=<s@client.test>").count(), 0, "{log}");
    }
}
