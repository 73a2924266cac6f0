//! TLS reporting (RFC 8460) end to end: dnsmasq publishes MX, `_mta-sts` and
//! `_smtp._tls` records; the MTA-STS test HTTPS server serves the policies;
//! aiosmtpd receives with a certificate that names one MX and not the other. A
//! short report period later the relay mails the aggregate report to the `rua`
//! mailbox (another aiosmtpd) and POSTs it to an `https:` receiver (Python HTTPS
//! with the test CA). Python's `email` and `gzip` modules read what arrived, and
//! dkimpy checks the report's signature.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::mta_sts::{PolicyServer, policy};
use crate::support::deliver::relay_with;
use crate::support::dns::{Dnsmasq, Record};
use crate::support::mx::Mx;
use crate::support::pki::Pki;
use crate::support::redis::RedisServer;
use crate::support::relay::{Relay, RelayOptions};
use crate::support::{free_ports, start_python};

/// Records every POST: path, Content-Type, the TLS-Report-Domain header, body,
/// the status answered. The first `fail_first` POSTs get 500; the first
/// `hang_first` ones wait `hang_secs` before anything (and are marked `hung`).
const RECEIVER: &str = r#"
import base64, http.server, json, ssl, sys, threading, time

cfg = json.loads(sys.argv[1])
lock = threading.Lock()
seen = [0]

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        with lock:
            seen[0] += 1
            k = seen[0]
        with open(cfg["log"] + ".started", "a") as f:
            f.write("%d\n" % k)
        hung = k <= cfg.get("hang_first", 0)
        if hung:
            time.sleep(cfg.get("hang_secs", 30))
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        status = 500 if k <= cfg.get("fail_first", 0) else 201
        with open(cfg["log"], "a") as f:
            f.write(json.dumps({
                "path": self.path,
                "ctype": self.headers.get("Content-Type"),
                "domain": self.headers.get("TLS-Report-Domain"),
                "body": base64.b64encode(body).decode(),
                "status": status,
                "hung": hung,
            }) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

srv = http.server.ThreadingHTTPServer(("127.0.0.1", cfg["port"]), H)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cfg["cert"], cfg["key"])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

/// Reads one report: a mail (argv[1] `mail`) or a POST body (`gzip`) in the file
/// argv[2]; prints the headers that matter, the attachment's type and name, the
/// JSON report, and (mail, with a dnsmasq port in argv[3]) dkimpy's verdict.
const READ: &str = r#"
import email, email.policy, gzip, json, sys

kind, path = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
out = {}
if kind == "mail":
    msg = email.message_from_bytes(data, policy=email.policy.default)
    out["content_type"] = msg.get_content_type()
    out["report_type"] = msg.get_param("report-type")
    out["subject"] = str(msg["Subject"])
    out["domain"] = str(msg["TLS-Report-Domain"])
    out["submitter"] = str(msg["TLS-Report-Submitter"])
    out["message_id"] = str(msg["Message-ID"])
    parts = [p for p in msg.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert len(parts) == 1, [p.get_content_type() for p in msg.iter_parts()]
    out["filename"] = parts[0].get_filename()
    gz = parts[0].get_payload(decode=True)
    if len(sys.argv) > 3:
        import dkim, dns.resolver
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = ["127.0.0.1"]
        res.port = int(sys.argv[3])
        def dnsfunc(name, timeout=5):
            name = name.decode() if isinstance(name, bytes) else name
            for rd in res.resolve(name.rstrip("."), "TXT"):
                return b"".join(rd.strings)
        out["dkim"] = bool(dkim.verify(data, dnsfunc=dnsfunc))
else:
    gz = data
out["report"] = json.loads(gzip.decompress(gz))
print(json.dumps(out))
"#;

fn read_report(kind: &str, bytes: &[u8], dns_port: Option<u16>) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("read.py");
    std::fs::write(&script, READ).unwrap();
    let file = dir.path().join("report");
    std::fs::write(&file, bytes).unwrap();
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(kind).arg(&file);
    if let Some(p) = dns_port {
        cmd.arg(p.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "reading the report failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(bytes)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

struct Receiver {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Receiver {
    fn start(pki: &Pki) -> Self {
        Self::start_with(pki, json!({}))
    }

    /// With `fail_first`, `hang_first`, `hang_secs` (see [`RECEIVER`]).
    fn start_with(pki: &Pki, extra: Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports(1)[0];
        let mut cfg = json!({
            "port": port,
            "cert": pki.cert(),
            "key": pki.key(),
            "log": dir.path().join("posts.jsonl"),
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let (child, line) = start_python(dir.path(), RECEIVER, &cfg);
        assert_eq!(line.trim(), "ready", "report receiver did not start");
        Receiver { child, dir, port }
    }

    fn posts(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("posts.jsonl"))
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Receiver {
    /// How many POSTs have begun (hung ones included).
    fn started(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("posts.jsonl.started"))
            .unwrap_or_default()
            .lines()
            .count()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CERT_NAMES: &[&str] = &[
    "mx.good.test",
    "mta-sts.good.test",
    "mta-sts.bad.test",
    "rua.test",
];

/// `good.test`: enforce, its MX named by the certificate. `bad.test`: testing,
/// its MX not named by the certificate (delivered, reported as failures). Both
/// MX hosts are the TLS sink on 127.0.0.1; reports to `rua.test` go to the sink
/// on 127.0.0.2.
fn zone(rua_https_port: u16, dkim_txt: Option<&str>) -> Vec<Record> {
    let mut r = vec![
        Record::mx("good.test", 10, "mx.good.test"),
        Record::host("mx.good.test", &["127.0.0.1"]),
        Record::mx("bad.test", 10, "mx.bad.test"),
        Record::host("mx.bad.test", &["127.0.0.1"]),
        Record::mx("rua.test", 10, "mx.rua.test"),
        Record::host("mx.rua.test", &["127.0.0.2"]),
        Record::host("rua.test", &["127.0.0.1"]),
    ];
    for d in ["good.test", "bad.test"] {
        r.push(Record::host(&format!("mta-sts.{d}"), &["127.0.0.1"]));
        r.push(Record::txt(&format!("_mta-sts.{d}"), "v=STSv1; id=1"));
    }
    r.push(Record::txt(
        "_smtp._tls.good.test",
        "v=TLSRPTv1; rua=mailto:tlsrpt@rua.test",
    ));
    // One string: dnsmasq's --txt-record would split it at the comma.
    r.push(Record::txt_string(
        "_smtp._tls.bad.test",
        &format!("v=TLSRPTv1; rua=mailto:tlsrpt@rua.test,https://rua.test:{rua_https_port}/tlsrpt"),
    ));
    if let Some(k) = dkim_txt {
        r.push(Record::txt("s1._domainkey.reports.test", k));
    }
    r
}

fn policies() -> Value {
    json!({
        "mta-sts.good.test": {"body": policy("enforce", &["mx.good.test"])},
        "mta-sts.bad.test": {"body": policy("testing", &["mx.bad.test"])},
    })
}

/// An Ed25519 key: (PEM path, DKIM TXT value).
fn ed25519_key(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let pem = dir.join("s1.pem");
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ED25519", "-out"])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(out.status.success());
    let der = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(der.status.success());
    let p = base64::engine::general_purpose::STANDARD.encode(&der.stdout[der.stdout.len() - 32..]);
    (pem, format!("v=DKIM1; k=ed25519; p={p}"))
}

fn relay_cfg(pki: &Pki, sts_port: u16, period: &str, dkim_key: Option<&std::path::Path>) -> String {
    let mut s = format!(
        "  ca_file: {}\n  mta_sts: {{port_override: {sts_port}, fetch_timeout: 5s}}\n\
         tls_reporting:\n  organization_name: Example Relay Org\n  submitter: reports.test\n  \
         contact_info: tls-ops@reports.test\n  period: {period}\n",
        pki.ca().display()
    );
    if let Some(k) = dkim_key {
        s.push_str(&format!(
            "dkim:\n  unsigned_policy: allow\n  domains:\n    - {{domain: reports.test, selectors: [{{selector: s1, algorithm: ed25519-sha256, key_file: '{}'}}]}}\n",
            k.display()
        ));
    }
    s
}

/// Sends one message and waits until `sink` holds `want` messages: one session
/// per message.
fn send_one(relay: &Relay, sink: &Mx, to: &str, want: usize) {
    crate::support::deliver::swaks(relay, "sender@client.test", &[to], None);
    sink.wait_for("a delivery", || relay.log(), |r| r.len() >= want);
}

/// The reports received so far, read: `(kind, parsed)`.
fn reports(rua: &Mx, https: &Receiver, dns_port: Option<u16>) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for r in rua.records() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(r["content"].as_str().unwrap())
            .unwrap();
        out.push(("mail".to_owned(), read_report("mail", &raw, dns_port)));
    }
    for p in https.posts().into_iter().filter(|p| p["hung"] != true) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(p["body"].as_str().unwrap())
            .unwrap();
        let mut v = read_report("gzip", &raw, None);
        v["ctype"] = p["ctype"].clone();
        v["domain"] = p["domain"].clone();
        v["path"] = p["path"].clone();
        v["status"] = p["status"].clone();
        out.push(("https".to_owned(), v));
    }
    out
}

/// Sums, over the reports of `kind` for `domain`: (successes, failures, failed
/// sessions by result type and receiving MX).
fn totals(
    reports: &[(String, Value)],
    kind: &str,
    domain: &str,
) -> (i64, i64, Vec<(String, String, i64)>) {
    let (mut ok, mut failed, mut details) = (0, 0, Vec::new());
    for (k, r) in reports {
        if k != kind {
            continue;
        }
        for p in r["report"]["policies"].as_array().unwrap() {
            if p["policy"]["policy-domain"] != domain {
                continue;
            }
            assert_eq!(p["policy"]["policy-type"], "sts", "{p}");
            ok += p["summary"]["total-successful-session-count"]
                .as_i64()
                .unwrap();
            failed += p["summary"]["total-failure-session-count"]
                .as_i64()
                .unwrap();
            for d in p["failure-details"].as_array().into_iter().flatten() {
                details.push((
                    d["result-type"].as_str().unwrap().to_owned(),
                    d["receiving-mx-hostname"].as_str().unwrap_or("").to_owned(),
                    d["failed-session-count"].as_i64().unwrap(),
                ));
            }
        }
    }
    (ok, failed, details)
}

fn wait_reports(
    what: &str,
    relay: &Relay,
    rua: &Mx,
    https: &Receiver,
    dns_port: Option<u16>,
    done: impl Fn(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = reports(rua, https, dns_port);
        if done(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; have {r:#?}\nrelay log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn reports_with_the_right_counts_reach_mailto_and_https_and_verify() {
    let pki = Pki::new(CERT_NAMES);
    let https = Receiver::start(&pki);
    let keys = tempfile::tempdir().unwrap();
    let (pem, dkim_txt) = ed25519_key(keys.path());
    let dns = Dnsmasq::start(&zone(https.port, Some(&dkim_txt)));
    let sts = PolicyServer::start(&pki, policies());
    let port = free_ports(1)[0];
    let sink = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let rua = Mx::start(json!({"host": "127.0.0.2", "port": port}));
    let relay = relay_with(
        &dns,
        port,
        &relay_cfg(&pki, sts.port, "4s", Some(&pem)),
        RelayOptions::default(),
    );
    // 3 verified sessions to good.test, 2 to bad.test whose MX certificate does
    // not name it (testing mode: delivered anyway).
    let mut n = 0;
    for _ in 0..3 {
        n += 1;
        send_one(&relay, &sink, "user@good.test", n);
    }
    for _ in 0..2 {
        n += 1;
        send_one(&relay, &sink, "user@bad.test", n);
    }
    assert!(sink.records().iter().all(|r| r["tls"] == true));

    let got = wait_reports(
        "reports with every session",
        &relay,
        &rua,
        &https,
        Some(dns.addr().port()),
        |r| {
            totals(r, "mail", "good.test").0 == 3
                && totals(r, "mail", "bad.test").1 == 2
                && totals(r, "https", "bad.test").1 == 2
        },
    );
    let log = relay.log();
    let (ok, failed, details) = totals(&got, "mail", "good.test");
    assert_eq!((ok, failed), (3, 0), "{got:#?}");
    assert!(details.is_empty());
    for kind in ["mail", "https"] {
        let (ok, failed, details) = totals(&got, kind, "bad.test");
        assert_eq!((ok, failed), (0, 2), "{kind}: {got:#?}");
        let mismatch: i64 = details
            .iter()
            .filter(|(t, mx, _)| t == "certificate-host-mismatch" && mx == "mx.bad.test")
            .map(|d| d.2)
            .sum();
        assert_eq!(mismatch, 2, "{kind}: {details:?}\n{log}");
    }
    // good.test asked for mail only.
    assert_eq!(totals(&got, "https", "good.test"), (0, 0, vec![]));

    for (kind, r) in &got {
        let rep = &r["report"];
        assert_eq!(rep["organization-name"], "Example Relay Org");
        assert_eq!(rep["contact-info"], "tls-ops@reports.test");
        assert!(
            rep["report-id"]
                .as_str()
                .unwrap()
                .ends_with("@reports.test"),
            "{rep}"
        );
        let start = rep["date-range"]["start-datetime"].as_str().unwrap();
        let end = rep["date-range"]["end-datetime"].as_str().unwrap();
        assert!(
            start.ends_with('Z') && end.ends_with('Z') && start < end,
            "{rep}"
        );
        let p = &rep["policies"][0]["policy"];
        assert!(
            p["policy-string"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l == "version: STSv1"),
            "{p}"
        );
        if kind == "mail" {
            assert_eq!(r["content_type"], "multipart/report");
            assert_eq!(r["report_type"], "tlsrpt");
            assert_eq!(r["submitter"], "reports.test");
            let domain = r["domain"].as_str().unwrap();
            assert!(
                r["subject"].as_str().unwrap().starts_with(&format!(
                    "Report Domain: {domain} Submitter: reports.test Report-ID: <"
                )),
                "{r}"
            );
            let name = r["filename"].as_str().unwrap();
            assert!(
                name.starts_with(&format!("reports.test!{domain}!")) && name.ends_with(".json.gz"),
                "{name}"
            );
            assert_eq!(r["dkim"], true, "dkimpy refused the report's signature");
        } else {
            assert_eq!(r["ctype"], "application/tlsrpt+gzip");
            assert_eq!(r["path"], "/tlsrpt");
            assert_eq!(r["domain"], "bad.test");
        }
    }
    assert!(log.contains("TLS report sent"), "{log}");

    // The metrics of the same sessions, fetches and reports, from `/metrics`.
    use crate::support::deliver::metric;
    let m = |series: &str| metric(&relay, series).unwrap_or(0.0);
    let all = relay.admin_get("/metrics").1;
    assert_eq!(
        m("mailrelay_tls_report_sessions_total{policy_type=\"sts\",result=\"success\"}"),
        3.0,
        "{all}"
    );
    assert_eq!(
        m("mailrelay_tls_report_sessions_total{policy_type=\"sts\",result=\"failure\"}"),
        2.0,
        "{all}"
    );
    // One fetch per domain; later sessions find the policy in memory.
    assert_eq!(
        m("mailrelay_mta_sts_policy_fetches_total{result=\"ok\"}"),
        2.0,
        "{all}"
    );
    assert!(
        m("mailrelay_mta_sts_cache_lookups_total{source=\"memory\"}") >= 3.0,
        "{all}"
    );
    assert!(
        m("mailrelay_mta_sts_cache_lookups_total{source=\"dns\"}") >= 2.0,
        "{all}"
    );
    assert_eq!(
        m("mailrelay_mta_sts_failures_total{mode=\"testing\"}"),
        2.0,
        "{all}"
    );
    assert_eq!(
        m("mailrelay_mta_sts_failures_total{mode=\"enforce\"}"),
        0.0,
        "{all}"
    );
    // good.test by mail; bad.test by mail and POST.
    assert!(
        m("mailrelay_tls_reports_total{result=\"sent\"}") >= 3.0,
        "{all}"
    );
}

#[test]
fn two_relays_on_one_redis_send_one_report_per_period() {
    let pki = Pki::new(CERT_NAMES);
    let https = Receiver::start(&pki);
    let dns = Dnsmasq::start(&zone(https.port, None));
    let sts = PolicyServer::start(&pki, policies());
    let port = free_ports(1)[0];
    let sink = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let rua = Mx::start(json!({"host": "127.0.0.2", "port": port}));
    let redis = RedisServer::start();
    let opts = RelayOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    };
    let cfg = relay_cfg(&pki, sts.port, "3s", None);
    let a = relay_with(&dns, port, &cfg, opts.clone());
    let b = relay_with(&dns, port, &cfg, opts);
    send_one(&a, &sink, "one@good.test", 1);
    send_one(&b, &sink, "two@good.test", 2);
    send_one(&a, &sink, "three@good.test", 3);
    let got = wait_reports("the reports", &a, &rua, &https, None, |r| {
        totals(r, "mail", "good.test").0 == 3
    });
    // Two more periods: a second report for the same period would have come.
    std::thread::sleep(Duration::from_secs(8));
    let got_later = reports(&rua, &https, None);
    assert_eq!(
        totals(&got_later, "mail", "good.test").0,
        3,
        "{got_later:#?}"
    );
    let mut ids: Vec<&str> = got_later
        .iter()
        .map(|(_, r)| r["report"]["report-id"].as_str().unwrap())
        .collect();
    let all = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all, "one report per period and domain: {got:#?}");
    let sent =
        a.log().matches("TLS report sent").count() + b.log().matches("TLS report sent").count();
    assert_eq!(sent, all, "{}\n{}", a.log(), b.log());
}

/// Per (domain, policy type, MX host): (successes, failures, failed sessions by
/// result type), over every report mail received.
type PolicyTotals = std::collections::BTreeMap<(String, String, String), (i64, i64, Vec<String>)>;

fn by_policy(reports: &[(String, Value)]) -> (PolicyTotals, Vec<Value>) {
    let mut out = PolicyTotals::new();
    let mut policies = Vec::new();
    for (_, r) in reports {
        for p in r["report"]["policies"].as_array().unwrap() {
            let pol = &p["policy"];
            let key = (
                pol["policy-domain"].as_str().unwrap().to_owned(),
                pol["policy-type"].as_str().unwrap().to_owned(),
                pol["mx-host"][0].as_str().unwrap_or("").to_owned(),
            );
            let e = out.entry(key).or_default();
            e.0 += p["summary"]["total-successful-session-count"]
                .as_i64()
                .unwrap();
            e.1 += p["summary"]["total-failure-session-count"]
                .as_i64()
                .unwrap();
            for d in p["failure-details"].as_array().into_iter().flatten() {
                for _ in 0..d["failed-session-count"].as_i64().unwrap() {
                    e.2.push(d["result-type"].as_str().unwrap().to_owned());
                }
            }
            policies.push(pol.clone());
        }
    }
    (out, policies)
}

/// DANE hosts (knot-served signed zones) are reported under `tlsa` policies
/// naming the MX host and its records: matched sessions as successes, a
/// mismatching certificate as `validation-failure`, bogus DNSSEC answers as
/// `dnssec-invalid`; nothing under MTA-STS or no-policy. The metrics of those
/// sessions are read from `/metrics`.
#[test]
fn dane_sessions_are_reported_under_tlsa_policies() {
    use crate::dane::{Kind, Knot, Zone, tlsa_data, zone};
    use crate::support::deliver::{api_message, metric, rcpt_state, swaks, wait_until};
    let pki = Pki::new(&["mx.ee.test", "mx.mismatch.test", "mx.bogus.test"]);
    let ee_hex = tlsa_data(&pki.cert(), 1);
    let ee = format!("3 1 1 {ee_hex}");
    let wrong = format!("3 1 1 {}", "ab".repeat(32));
    let with_rpt = |mut z: Zone| {
        z.records += &format!(
            "_smtp._tls.{} TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@rua.test\"\n",
            z.name
        );
        z
    };
    let knot = Knot::start(&[
        with_rpt(zone("ee.test.", Kind::Signed, &ee)),
        with_rpt(zone("mismatch.test.", Kind::Signed, &wrong)),
        with_rpt(zone("bogus.test.", Kind::Tampered, &ee)),
        Zone {
            name: "rua.test.",
            records: "rua.test. MX 10 mx.rua.test.\nmx.rua.test. A 127.0.0.2\n".into(),
            kind: Kind::Unsigned,
        },
    ]);
    let port = free_ports(1)[0];
    let sink = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let rua = Mx::start(json!({"host": "127.0.0.2", "port": port}));
    let relay = Relay::start(RelayOptions {
        extra_yaml: format!(
            "delivery:\n  dns: {{nameservers: ['{dns}'], port_override: {port}, timeout: 2s}}\n\
             \x20 retry: {{first: 60s, max_backoff: 60s, jitter: 0.0}}\n  poll_interval: 200ms\n\
             \x20 ca_file: {ca}\n  dane: {{trust_anchor: {anchor}}}\n\
             tls_reporting:\n  organization_name: Example Relay Org\n  submitter: reports.test\n  period: 4s\n",
            dns = knot.addr(),
            ca = pki.ca().display(),
            anchor = knot.anchor().display(),
        ),
        ..Default::default()
    });
    for (i, to) in ["one@ee.test", "two@ee.test"].iter().enumerate() {
        let id = swaks(&relay, "sender@client.test", &[to], None);
        wait_until("a DANE delivery", &relay, || {
            api_message(&relay, &id).filter(|m| rcpt_state(m, to) == "delivered")
        });
        assert_eq!(sink.records().len(), i + 1);
    }
    for to in ["user@mismatch.test", "user@bogus.test"] {
        let id = swaks(&relay, "sender@client.test", &[to], None);
        wait_until("an attempt", &relay, || {
            api_message(&relay, &id).filter(|m| {
                m["status"]["rcpts"][0]["attempts"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            })
        });
    }
    let key = |d: &str, mx: &str| (d.to_owned(), "tlsa".to_owned(), mx.to_owned());
    let deadline = Instant::now() + Duration::from_secs(60);
    let (totals, policies) = loop {
        let mut got = Vec::new();
        for r in rua.records() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(r["content"].as_str().unwrap())
                .unwrap();
            got.push(("mail".to_owned(), read_report("mail", &raw, None)));
        }
        let (t, p) = by_policy(&got);
        let n = |k: &(String, String, String)| t.get(k).cloned().unwrap_or_default();
        if n(&key("ee.test", "mx.ee.test")).0 == 2
            && n(&key("mismatch.test", "mx.mismatch.test")).1 >= 1
            && n(&key("bogus.test", "mx.bogus.test")).1 >= 1
        {
            break (t, p);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the reports; have {t:#?}\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for (domain, t, _) in totals.keys() {
        assert_eq!(t, "tlsa", "{domain}: only TLSA policies: {totals:#?}");
    }
    assert_eq!(totals[&key("ee.test", "mx.ee.test")].1, 0, "{totals:#?}");
    let (ok, failed, types) = &totals[&key("mismatch.test", "mx.mismatch.test")];
    assert_eq!(*ok, 0);
    assert_eq!(types.len() as i64, *failed);
    assert!(types.iter().all(|t| t == "validation-failure"), "{types:?}");
    let (ok, failed, types) = &totals[&key("bogus.test", "mx.bogus.test")];
    assert_eq!(*ok, 0);
    assert_eq!(types.len() as i64, *failed);
    assert!(types.iter().all(|t| t == "dnssec-invalid"), "{types:?}");
    // The policy states the records of the MX host (hex as a zone file has it).
    let ee_policy = policies
        .iter()
        .find(|p| p["policy-domain"] == "ee.test")
        .unwrap();
    assert_eq!(
        ee_policy["policy-string"],
        json!([format!("3 1 1 {}", ee_hex.to_uppercase())]),
        "{ee_policy}"
    );
    assert_eq!(ee_policy["mx-host"], json!(["mx.ee.test"]));

    // The same sessions in the metrics.
    let m = |series: &str| metric(&relay, series).unwrap_or(0.0);
    assert!(
        m("mailrelay_tls_report_sessions_total{policy_type=\"tlsa\",result=\"success\"}") >= 2.0,
        "{}",
        relay.admin_get("/metrics").1
    );
    assert!(
        m("mailrelay_tls_report_sessions_total{policy_type=\"tlsa\",result=\"failure\"}") >= 1.0
    );
    assert_eq!(
        m("mailrelay_tls_report_sessions_total{policy_type=\"sts\",result=\"success\"}"),
        0.0
    );
    assert!(m("mailrelay_dane_hosts_total{verdict=\"tlsa\"}") >= 3.0);
    assert!(m("mailrelay_dane_hosts_total{verdict=\"failed\"}") >= 1.0);
    assert!(m("mailrelay_tls_reports_total{result=\"sent\"}") >= 3.0);
}

/// The reports with each report mail once: a mail delivered again (the same
/// Message-ID, the queue's at-least-once delivery across a kill) counts once.
fn once_per_mail(got: Vec<(String, Value)>) -> Vec<(String, Value)> {
    let mut seen = std::collections::HashSet::new();
    got.into_iter()
        .filter(|(k, r)| k != "mail" || seen.insert(r["message_id"].as_str().unwrap().to_owned()))
        .collect()
}

/// Report ids of the reports of `kind` for `domain`, by HTTP status for https
/// (mail: 0).
fn report_ids(reports: &[(String, Value)], kind: &str, domain: &str) -> Vec<(i64, String)> {
    reports
        .iter()
        .filter(|(k, r)| {
            k == kind
                && r["report"]["policies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["policy"]["policy-domain"] == domain)
        })
        .map(|(_, r)| {
            (
                r["status"].as_i64().unwrap_or(0),
                r["report"]["report-id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// An `https:` receiver that answers 500 first: the same report is POSTed again
/// after a short delay and accepted; the `mailto:` copy is not sent twice.
#[test]
fn a_failed_https_report_is_retried_with_backoff() {
    let pki = Pki::new(CERT_NAMES);
    let https = Receiver::start_with(&pki, json!({"fail_first": 1}));
    let dns = Dnsmasq::start(&zone(https.port, None));
    let sts = PolicyServer::start(&pki, policies());
    let port = free_ports(1)[0];
    let sink = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let rua = Mx::start(json!({"host": "127.0.0.2", "port": port}));
    let relay = relay_with(
        &dns,
        port,
        &relay_cfg(&pki, sts.port, "4s", None),
        RelayOptions::default(),
    );
    send_one(&relay, &sink, "one@bad.test", 1);
    send_one(&relay, &sink, "two@bad.test", 2);
    // Failed sessions in the reports the receiver accepted.
    let accepted_failures = |r: &[(String, Value)]| -> i64 {
        r.iter()
            .filter(|(k, r)| k == "https" && r["status"] == 201)
            .flat_map(|(_, r)| r["report"]["policies"].as_array().unwrap().clone())
            .map(|p| {
                p["summary"]["total-failure-session-count"]
                    .as_i64()
                    .unwrap()
            })
            .sum()
    };
    let got = wait_reports("the retried POST", &relay, &rua, &https, None, |r| {
        accepted_failures(r) == 2 && totals(r, "mail", "bad.test").1 == 2
    });
    let posts = report_ids(&got, "https", "bad.test");
    assert_eq!(posts[0].0, 500, "{posts:?}");
    let accepted: Vec<&String> = posts.iter().filter(|p| p.0 == 201).map(|p| &p.1).collect();
    assert!(
        accepted.contains(&&posts[0].1),
        "the refused report came again: {posts:?}"
    );
    // Later periods add no report: nothing is sent twice.
    std::thread::sleep(Duration::from_secs(5));
    let got = reports(&rua, &https, None);
    assert_eq!(accepted_failures(&got), 2, "{got:#?}");
    let mails = report_ids(&got, "mail", "bad.test");
    let mut ids: Vec<&String> = mails.iter().map(|m| &m.1).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a mailto report sent twice: {mails:?}");
    let log = relay.log();
    assert!(log.contains("TLS report not sent; retrying later"), "{log}");
}

/// The embedded queue keeps TLS report counters and sending progress in its
/// file: a relay killed (SIGKILL) in the middle of a period still reports the
/// sessions before the kill, and one killed while POSTing a report (after the
/// `mailto:` copy went out) sends the rest after its restart, once the dead
/// process's lease has run out, and not the `mailto:` copy again.
#[test]
fn embedded_counters_and_unsent_reports_survive_kill_9() {
    let pki = Pki::new(CERT_NAMES);
    let https = Receiver::start_with(&pki, json!({"hang_first": 1, "hang_secs": 40}));
    let dns = Dnsmasq::start(&zone(https.port, None));
    let sts = PolicyServer::start(&pki, policies());
    let port = free_ports(1)[0];
    let sink = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let rua = Mx::start(json!({"host": "127.0.0.2", "port": port}));
    let cfg = relay_cfg(&pki, sts.port, "6s", None) + "  post_timeout: 3s\n";
    let mut relay = relay_with(&dns, port, &cfg, RelayOptions::default());
    send_one(&relay, &sink, "one@bad.test", 1);
    send_one(&relay, &sink, "two@bad.test", 2);
    // Past a flush (every second), then killed and started again at once.
    std::thread::sleep(Duration::from_millis(2500));
    relay.kill();
    relay.restart();
    // The report's POST hangs; the relay dies while it waits.
    let deadline = Instant::now() + Duration::from_secs(60);
    while https.started() == 0 {
        assert!(Instant::now() < deadline, "no POST began\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    relay.kill();
    relay.restart();
    let got = wait_reports(
        "the POST after the restart",
        &relay,
        &rua,
        &https,
        None,
        |r| totals(r, "https", "bad.test").1 >= 2 && totals(r, "mail", "bad.test").1 >= 2,
    );
    // A report mail the queue had delivered but not yet recorded when the relay was
    // killed is delivered again after the restart (at least once): the same
    // Message-ID. A report sent twice would have two Message-IDs.
    let got = once_per_mail(got);
    // Every session before the first kill is in the reports (one per message the
    // sink got: a message whose delivery was not yet recorded when the relay was
    // killed is delivered again, in another session).
    let sessions = sink.records().len() as i64;
    assert!(sessions >= 2);
    for kind in ["mail", "https"] {
        let (ok, failed, _) = totals(&got, kind, "bad.test");
        assert_eq!(
            (ok, failed),
            (0, sessions),
            "{kind}: {got:#?}\n{}",
            relay.log()
        );
    }
    let mails = report_ids(&got, "mail", "bad.test");
    let posts = report_ids(&got, "https", "bad.test");
    assert_eq!(mails.len(), posts.len(), "mail {mails:?}, https {posts:?}");
    let (mut m, mut p): (Vec<_>, Vec<_>) = (
        mails.iter().map(|x| x.1.clone()).collect(),
        posts.iter().map(|x| x.1.clone()).collect(),
    );
    m.sort();
    p.sort();
    assert_eq!(m, p, "each report once by mail and once by POST");
    m.dedup();
    assert_eq!(m.len(), mails.len(), "no report mailed twice: {mails:?}");
}

/// On Redis: a relay killed while its POST hangs leaves the period claimed until
/// its lease runs out; a second relay on the same Redis then sends what is left
/// (the POST), not the `mailto:` copy the first one queued.
#[test]
fn on_redis_another_relay_sends_what_a_killed_one_left() {
    let pki = Pki::new(CERT_NAMES);
    let https = Receiver::start_with(&pki, json!({"hang_first": 1, "hang_secs": 40}));
    let dns = Dnsmasq::start(&zone(https.port, None));
    let sts = PolicyServer::start(&pki, policies());
    let port = free_ports(1)[0];
    let sink = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let rua = Mx::start(json!({"host": "127.0.0.2", "port": port}));
    let redis = RedisServer::start();
    let opts = RelayOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    };
    let cfg = relay_cfg(&pki, sts.port, "4s", None) + "  post_timeout: 3s\n";
    let mut a = relay_with(&dns, port, &cfg, opts.clone());
    send_one(&a, &sink, "one@bad.test", 1);
    send_one(&a, &sink, "two@bad.test", 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while https.started() == 0 {
        assert!(Instant::now() < deadline, "no POST began\n{}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    a.kill();
    let b = relay_with(&dns, port, &cfg, opts);
    let got = wait_reports(
        "the POST by the second relay",
        &b,
        &rua,
        &https,
        None,
        |r| totals(r, "https", "bad.test").1 >= 2 && totals(r, "mail", "bad.test").1 >= 2,
    );
    // A report mail the killed relay had delivered but not recorded is delivered
    // again by the second (the same Message-ID): counted once.
    let got = once_per_mail(got);
    for kind in ["mail", "https"] {
        assert_eq!(
            totals(&got, kind, "bad.test").1,
            2,
            "{kind}: {got:#?}\n{}",
            b.log()
        );
    }
    let mails = report_ids(&got, "mail", "bad.test");
    let mut ids: Vec<&String> = mails.iter().map(|m| &m.1).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a report mailed twice: {mails:?}");
    assert!(b.log().contains("TLS report sent"), "{}", b.log());
}
