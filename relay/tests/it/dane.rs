//! DANE (RFC 7672) end to end: a real authoritative server (Knot DNS, Debian's
//! `knot`) serves a DNSSEC-signed test root, a signed `test.` and below it signed,
//! unsigned (no DS) and deliberately broken zones, all signed with ldns tools
//! (`ldnsutils`). The relay validates from the test root's key (its trust anchor)
//! and delivers to aiosmtpd presenting a certificate chain the TLSA records match,
//! or do not.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::mta_sts::PolicyServer;
use crate::support::deliver::{api_message, queue_cli, rcpt_state, swaks, wait_until};
use crate::support::free_ports;
use crate::support::mx::Mx;
use crate::support::pki::Pki;
use crate::support::relay::{Relay, RelayOptions};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?}: {e}; install knot, knot-dnsutils and ldnsutils (.ci/install-deps)")
    });
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One zone: its name, its records (zone-file lines), and how it is published.
pub(crate) struct Zone {
    pub(crate) name: &'static str,
    pub(crate) records: String,
    pub(crate) kind: Kind,
}

#[derive(PartialEq)]
pub(crate) enum Kind {
    Signed,
    /// Served without signatures and without a DS in the parent: insecure.
    Unsigned,
    /// Signed, then a TLSA record changed under its signature: bogus.
    Tampered,
}

/// A Knot DNS server on 127.0.0.1 and a free port, serving `.`, `test.` and
/// `zones` (children of `test.`), killed on drop.
pub(crate) struct Knot {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Knot {
    pub(crate) fn start(zones: &[Zone]) -> Knot {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let header = |zone: &str| {
            format!(
                "$TTL 300\n{zone} SOA ns.test. hostmaster.test. 1 3600 600 86400 60\n{zone} NS ns.test.\n"
            )
        };
        let mut test_zone = header("test.") + "ns.test. A 127.0.0.1\n";
        let mut conf_zones = String::new();
        for z in zones {
            let file = format!("{}.zone", z.name);
            std::fs::write(d.join(&file), header(z.name) + &z.records).unwrap();
            test_zone.push_str(&format!("{} NS ns.test.\n", z.name));
            let served = if z.kind == Kind::Unsigned {
                file
            } else {
                let ds = sign(d, z.name, &file);
                test_zone.push_str(&ds);
                test_zone.push('\n');
                if z.kind == Kind::Tampered {
                    let signed = d.join(format!("{file}.signed"));
                    let text = std::fs::read_to_string(&signed).unwrap();
                    let tampered: String = text
                        .lines()
                        .map(|l| {
                            if l.contains("\tTLSA\t") {
                                // The last hex digit of the data, flipped.
                                let (head, last) = l.split_at(l.len() - 1);
                                let flipped = if last == "0" { "1" } else { "0" };
                                format!("{head}{flipped}\n")
                            } else {
                                format!("{l}\n")
                            }
                        })
                        .collect();
                    assert_ne!(text, tampered, "no TLSA record to tamper with");
                    std::fs::write(&signed, tampered).unwrap();
                }
                format!("{file}.signed")
            };
            conf_zones.push_str(&format!("  - domain: {}\n    file: {served}\n", z.name));
        }
        std::fs::write(d.join("test.zone"), test_zone).unwrap();
        let test_ds = sign(d, "test.", "test.zone");
        std::fs::write(
            d.join("root.zone"),
            header(".") + "test. NS ns.test.\n" + &test_ds + "\n",
        )
        .unwrap();
        let root_key = run(Command::new("ldns-keygen")
            .args(["-a", "ECDSAP256SHA256", "-k", "."])
            .current_dir(d));
        run(Command::new("ldns-signzone")
            .args(["-f", "root.zone.signed", "root.zone", &root_key])
            .current_dir(d));
        std::fs::copy(d.join(format!("{root_key}.key")), d.join("anchor.key")).unwrap();
        // The same key as a DS record (SHA-256), as a root-anchors file states it.
        let ds = run(Command::new("ldns-key2ds")
            .args(["-n", "-2", &format!("{root_key}.key")])
            .current_dir(d));
        std::fs::write(d.join("anchor.ds"), format!("; the test root\n{ds}\n")).unwrap();

        let port = free_ports(1)[0];
        std::fs::create_dir(d.join("db")).unwrap();
        let conf = format!(
            "server:\n  listen: 127.0.0.1@{port}\n  rundir: {db}\n\
             log:\n  - target: stderr\n    any: warning\n\
             database:\n  storage: {db}\n\
             template:\n  - id: default\n    storage: {dir}\n    journal-content: none\n    zonefile-sync: -1\n\
             zone:\n  - domain: .\n    file: root.zone.signed\n  - domain: test.\n    file: test.zone.signed\n{conf_zones}",
            db = d.join("db").display(),
            dir = d.display(),
        );
        std::fs::write(d.join("knot.conf"), conf).unwrap();
        let log = std::fs::File::create(d.join("knot.log")).unwrap();
        let child = Command::new("knotd")
            .arg("-c")
            .arg(d.join("knot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("knotd must be installed: run .ci/install-deps");
        let knot = Knot { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = Command::new("kdig")
                .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "+time=1"])
                .args(["SOA", "."])
                .output()
                .expect("kdig (knot-dnsutils)");
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return knot;
            }
            assert!(
                Instant::now() < deadline,
                "knotd did not answer: {}",
                std::fs::read_to_string(d_of(&knot).join("knot.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn anchor(&self) -> PathBuf {
        self.dir.path().join("anchor.key")
    }

    /// The test root's KSK as a DS record.
    pub(crate) fn anchor_ds(&self) -> PathBuf {
        self.dir.path().join("anchor.ds")
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn d_of(k: &Knot) -> &Path {
    k.dir.path()
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Signs `file` for `zone` with a fresh ECDSA key; returns the DS for the parent.
fn sign(dir: &Path, zone: &str, file: &str) -> String {
    let key = run(Command::new("ldns-keygen")
        .args(["-a", "ECDSAP256SHA256", "-k", zone])
        .current_dir(dir));
    run(Command::new("ldns-signzone")
        .args(["-f", &format!("{file}.signed"), file, &key])
        .current_dir(dir));
    std::fs::read_to_string(dir.join(format!("{key}.ds"))).unwrap()
}

/// `3 1 1` (SHA-256 of the SPKI) or `2 0 1` (SHA-256 of the certificate) data of
/// the first certificate in a PEM file.
pub(crate) fn tlsa_data(pem: &Path, selector: u8) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::from_pem_file(pem).unwrap();
    let selected = if selector == 1 {
        mailrelay::delivery::tls_policy::dane_verify::spki(&cert).unwrap()
    } else {
        &cert[..]
    };
    ring::digest::digest(&ring::digest::SHA256, selected)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn zone(name: &'static str, kind: Kind, tlsa: &str) -> Zone {
    let mx = format!("mx.{name}");
    Zone {
        name,
        records: format!("{name} MX 10 {mx}\n{mx} A 127.0.0.1\n_25._tcp.{mx} TLSA {tlsa}\n"),
        kind,
    }
}

fn security(msg: &Value) -> &Value {
    &msg["status"]["rcpts"][0]["attempts"][0]["security"]
}

#[test]
fn tlsa_match_mismatch_insecure_bogus_and_dane_over_mta_sts() {
    // The MX certificate names every host but mx.sts.test: under MTA-STS alone
    // that one would be refused.
    let pki = Pki::new(&[
        "mx.ee.test",
        "mx.ta.test",
        "mx.mismatch.test",
        "mx.insec.test",
        "mx.bogus.test",
        "mx.unusable.test",
        "mta-sts.sts.test",
    ]);
    let ee = format!("3 1 1 {}", tlsa_data(&pki.cert(), 1));
    let ta = format!("2 0 1 {}", tlsa_data(&pki.ca(), 0));
    let wrong = format!("3 1 1 {}", "ab".repeat(32));
    let knot = Knot::start(&[
        zone("ee.test.", Kind::Signed, &ee),
        zone("ta.test.", Kind::Signed, &ta),
        zone("mismatch.test.", Kind::Signed, &wrong),
        zone("insec.test.", Kind::Unsigned, &wrong),
        zone("bogus.test.", Kind::Tampered, &ee),
        // PKIX-TA(0): unusable for SMTP; TLS is still mandatory.
        zone(
            "unusable.test.",
            Kind::Signed,
            &format!("0 0 1 {}", "cd".repeat(32)),
        ),
        Zone {
            records: zone("sts.test.", Kind::Signed, &ee).records
                + "_mta-sts.sts.test. TXT \"v=STSv1; id=1\"\nmta-sts.sts.test. A 127.0.0.1\n",
            ..zone("sts.test.", Kind::Signed, &ee)
        },
    ]);
    let https = PolicyServer::start(
        &pki,
        json!({"mta-sts.sts.test": {"body": "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmax_age: 86400\r\n"}}),
    );
    // The server sends its leaf and the CA (DANE-TA needs the anchor in the chain).
    let chain = knot.dir.path().join("chain.pem");
    std::fs::write(
        &chain,
        std::fs::read_to_string(pki.cert()).unwrap() + &std::fs::read_to_string(pki.ca()).unwrap(),
    )
    .unwrap();
    let port = free_ports(1)[0];
    let mx = Mx::start(json!({"port": port, "cert": chain, "key": pki.key()}));
    let relay = Relay::start(RelayOptions {
        extra_yaml: format!(
            "delivery:\n  dns: {{nameservers: ['{dns}'], port_override: {port}, timeout: 2s}}\n\
             \x20 retry: {{first: 30s, max_backoff: 60s, jitter: 0.0}}\n  poll_interval: 200ms\n\
             \x20 ca_file: {ca}\n  mta_sts: {{port_override: {sts}, fetch_timeout: 2s}}\n\
             \x20 dane: {{trust_anchor: {anchor}}}\n",
            dns = knot.addr(),
            ca = pki.ca().display(),
            sts = https.port,
            anchor = knot.anchor().display(),
        ),
        ..Default::default()
    });
    let domains = [
        "ee.test",
        "ta.test",
        "mismatch.test",
        "insec.test",
        "bogus.test",
        "unusable.test",
        "sts.test",
    ];
    let ids: Vec<_> = domains
        .iter()
        .map(|d| swaks(&relay, "sender@client.test", &[&format!("user@{d}")], None))
        .collect();
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
    let got = |d: &str| {
        mx.records()
            .iter()
            .any(|r| r["rcpts"][0] == format!("user@{d}"))
    };

    // A matching DANE-EE or DANE-TA record: delivered over TLS, DANE recorded.
    for (d, records) in [("ee.test", "tlsa 3 1 1"), ("ta.test", "tlsa 2 0 1")] {
        let m = msg(d);
        assert_eq!(
            rcpt_state(m, &format!("user@{d}")),
            "delivered",
            "{d}\n{log}"
        );
        let s = security(m);
        assert_eq!(s["policy"], "dane", "{d}: {s}");
        assert_eq!(s["verified"], true, "{d}: {s}");
        assert_eq!(s["dane"], records, "{d}: {s}");
        assert!(s.get("failure").is_none(), "{d}: {s}");
    }
    // DANE wins over MTA-STS enforce, whose check (the name) this host fails.
    let s = security(msg("sts.test"));
    assert_eq!(
        rcpt_state(msg("sts.test"), "user@sts.test"),
        "delivered",
        "{s}\n{log}"
    );
    assert_eq!(
        (s["policy"].as_str(), s["verified"].as_bool()),
        (Some("dane"), Some(true)),
        "{s}"
    );

    // No record matches, or the TLSA answer is bogus: deferred, nothing sent.
    for (d, why) in [
        ("mismatch.test", "DANE: no TLSA record (3 1 1) matches"),
        ("bogus.test", "bogus"),
    ] {
        assert!(!got(d), "{d} must not be delivered");
        let m = msg(d);
        assert_eq!(rcpt_state(m, &format!("user@{d}")), "pending", "{d}");
        let reply = m["status"]["rcpts"][0]["attempts"][0]["reply"]
            .as_str()
            .unwrap();
        assert!(
            reply.contains(why) && reply.contains("DANE"),
            "{d}: {reply}"
        );
    }
    let s = security(msg("bogus.test"));
    assert!(s["dane"].as_str().unwrap().contains("bogus"), "{s}");

    // Unsigned zone: its (wrong) TLSA record is not trusted; opportunistic TLS.
    let s = security(msg("insec.test"));
    assert_eq!(
        rcpt_state(msg("insec.test"), "user@insec.test"),
        "delivered",
        "{s}\n{log}"
    );
    assert_eq!(
        (s["policy"].as_str(), s["dane"].as_str()),
        (Some("opportunistic"), Some("insecure")),
        "{s}"
    );

    // Only unusable records: TLS, unauthenticated, delivered.
    let s = security(msg("unusable.test"));
    assert_eq!(
        rcpt_state(msg("unusable.test"), "user@unusable.test"),
        "delivered",
        "{s}\n{log}"
    );
    assert_eq!(
        (s["policy"].as_str(), s["verified"].as_bool()),
        (Some("dane"), Some(false)),
        "{s}"
    );
    assert!(
        mx.records().iter().all(|r| r["tls"] == true),
        "nothing in plain text"
    );

    // A warm cache: another message to ee.test makes no DANE lookup.
    let again = swaks(&relay, "sender@client.test", &["again@ee.test"], None);
    let m = wait_until("the second delivery", &relay, || {
        api_message(&relay, &again).filter(|m| rcpt_state(m, "again@ee.test") == "delivered")
    });
    assert_eq!(security(&m)["policy"], "dane");
    let lookups = relay
        .log()
        .lines()
        .filter(|l| l.contains("DANE lookup") && l.contains("mx.ee.test"))
        .count();
    assert_eq!(lookups, 1, "{}", relay.log());

    let shown = queue_cli(&relay, &["show", &ids[0].to_string()]);
    assert!(
        shown.contains("policy=dane") && shown.contains("dane=\"tlsa 3 1 1\""),
        "{shown}"
    );
}

/// dnsmasq passes no DNSSEC records: DANE is off (warned, recorded), mail flows.
#[test]
fn a_resolver_without_dnssec_turns_dane_off_and_mail_still_flows() {
    use crate::support::deliver::relay_with_dns;
    use crate::support::dns::{Dnsmasq, Record};
    let dns = Dnsmasq::start(&[
        Record::mx("plain.test", 10, "mx.plain.test"),
        Record::host("mx.plain.test", &["127.0.0.1"]),
    ]);
    let port = free_ports(1)[0];
    let pki = Pki::new(&["mx.plain.test"]);
    let mx = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let relay = relay_with_dns(&dns, port, "");
    let id = swaks(&relay, "sender@client.test", &["user@plain.test"], None);
    let m = wait_until("the delivery", &relay, || {
        api_message(&relay, &id).filter(|m| rcpt_state(m, "user@plain.test") == "delivered")
    });
    let s = security(&m);
    assert_eq!(
        (s["policy"].as_str(), s["dane"].as_str()),
        (Some("opportunistic"), Some("unavailable")),
        "{s}"
    );
    assert!(relay.log().contains("DANE is off"), "{}", relay.log());
    assert_eq!(mx.records().len(), 1);
}

/// A DS trust anchor (the test root's KSK digest, from ldns-key2ds): the root's
/// DNSKEY set is fetched at start-up and the key the DS covers trusted, so DANE
/// works as with the DNSKEY file. A DS that covers no served key turns DANE off
/// with a warning (mail still flows).
#[test]
fn ds_trust_anchors_are_matched_against_the_served_dnskey_set() {
    let pki = Pki::new(&["mx.ee.test"]);
    let ee = format!("3 1 1 {}", tlsa_data(&pki.cert(), 1));
    let knot = Knot::start(&[zone("ee.test.", Kind::Signed, &ee)]);
    let ds = std::fs::read_to_string(knot.anchor_ds()).unwrap();
    assert!(ds.contains("\tDS\t") || ds.contains(" DS "), "{ds}");
    let port = free_ports(1)[0];
    let mx = Mx::start(json!({"port": port, "cert": pki.cert(), "key": pki.key()}));
    let start = |anchor: &Path| {
        Relay::start(RelayOptions {
            extra_yaml: format!(
                "delivery:\n  dns: {{nameservers: ['{dns}'], port_override: {port}, timeout: 2s}}\n\
                 \x20 retry: {{first: 30s, max_backoff: 60s, jitter: 0.0}}\n  poll_interval: 200ms\n\
                 \x20 ca_file: {ca}\n  dane: {{trust_anchor: {anchor}}}\n",
                dns = knot.addr(),
                ca = pki.ca().display(),
                anchor = anchor.display(),
            ),
            ..Default::default()
        })
    };
    let relay = start(&knot.anchor_ds());
    let id = swaks(&relay, "sender@client.test", &["user@ee.test"], None);
    let m = wait_until("the DANE delivery", &relay, || {
        api_message(&relay, &id).filter(|m| rcpt_state(m, "user@ee.test") == "delivered")
    });
    let s = security(&m);
    assert_eq!(
        (
            s["policy"].as_str(),
            s["verified"].as_bool(),
            s["dane"].as_str()
        ),
        (Some("dane"), Some(true), Some("tlsa 3 1 1")),
        "{s}\n{}",
        relay.log()
    );
    assert!(
        relay
            .log()
            .contains("DNSKEY records matching the DS records are trusted"),
        "{}",
        relay.log()
    );
    drop(relay);

    // The digest changed: no served key matches.
    let bad = knot.dir.path().join("bad.ds");
    let line = ds.lines().find(|l| !l.starts_with(';')).unwrap();
    let (head, last) = line.trim_end().split_at(line.trim_end().len() - 1);
    let flipped = if last == "0" { "1" } else { "0" };
    std::fs::write(&bad, format!("{head}{flipped}\n")).unwrap();
    let relay = start(&bad);
    let id = swaks(&relay, "sender@client.test", &["other@ee.test"], None);
    let m = wait_until("the delivery without DANE", &relay, || {
        api_message(&relay, &id).filter(|m| rcpt_state(m, "other@ee.test") == "delivered")
    });
    let s = security(&m);
    assert_eq!(
        (s["policy"].as_str(), s["dane"].as_str()),
        (Some("opportunistic"), Some("unavailable")),
        "{s}"
    );
    let log = relay.log();
    assert!(
        log.contains("DANE is off") && log.contains("matches its DS records"),
        "{log}"
    );
    assert_eq!(mx.records().len(), 2);
}
