//! DKIM signing end to end, checked by a verifier nobody here wrote: the relay
//! signs what it accepts, an aiosmtpd sink (or real Postfix) receives it, and
//! Python's dkimpy verifies every signature, fetching the public keys from a real
//! dnsmasq (`--txt-record`). Keys come from `openssl genpkey`.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::deliver::{metric, relay_with, relay_with_dns, wait_until};
use support::dns::{Dnsmasq, Record};
use support::mx::{Mx, content};
use support::relay::{Relay, RelayOptions, binary};

/// Verifies every DKIM-Signature of the message in argv[2] with dkimpy, resolving
/// keys at the dnsmasq on port argv[1]; prints one JSON object per signature.
const VERIFY: &str = r#"
import json, logging, sys
import dkim, dns.resolver

port, path = int(sys.argv[1]), sys.argv[2]
msg = open(path, "rb").read()
res = dns.resolver.Resolver(configure=False)
res.nameservers = ["127.0.0.1"]
res.port = port
res.lifetime = 5

def dnsfunc(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    try:
        answer = res.resolve(name.rstrip("."), "TXT")
    except Exception:
        return None
    for rd in answer:
        return b"".join(rd.strings)

class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

headers, _ = dkim.rfc822_parse(msg)
count = sum(1 for k, _ in headers if k.lower() == b"dkim-signature")
out = []
for i in range(count):
    log = logging.getLogger("dkim%d" % i)
    h = Collect()
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    d = dkim.DKIM(msg, logger=log)
    try:
        ok = d.verify(idx=i, dnsfunc=dnsfunc)
        err = ""
    except Exception as e:
        ok, err = False, repr(e)
    sig = d.signature_fields or {}
    out.append({
        "ok": bool(ok),
        "d": sig.get(b"d", b"").decode(),
        "s": sig.get(b"s", b"").decode(),
        "a": sig.get(b"a", b"").decode(),
        "c": sig.get(b"c", b"").decode(),
        "h": sig.get(b"h", b"").decode(),
        "err": err + " | " + " / ".join(h.lines[-3:]),
    })
print(json.dumps(out))
"#;

/// Sends one message with smtplib (which dot-stuffs, so a line with a lone dot
/// travels as `..`); prints `{"code", "reply"}` of the end of data.
const SEND: &str = r#"
import json, smtplib, sys
host, port, sender, rcpts, path, opts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(","), sys.argv[5], sys.argv[6]
msg = open(path, "rb").read()
s = smtplib.SMTP(host, port, local_hostname="client.test")
s.ehlo()
try:
    s.sendmail(sender, rcpts, msg, mail_options=[o for o in opts.split(",") if o])
    print(json.dumps({"code": 250, "reply": ""}))
except smtplib.SMTPDataError as e:
    print(json.dumps({"code": e.smtp_code, "reply": e.smtp_error.decode()}))
except smtplib.SMTPRecipientsRefused as e:
    print(json.dumps({"code": 0, "reply": repr(e)}))
s.quit()
"#;

struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Generates `name.pem` (`rsa:BITS` or `ed25519`) in `dir`; returns the DNS
    /// TXT text of its public key (split into 255-octet strings for dnsmasq).
    fn generate_in(dir: &Path, name: &str, kind: &str) -> String {
        let pem = dir.join(format!("{name}.pem"));
        let mut cmd = Command::new("openssl");
        cmd.arg("genpkey");
        let k = match kind.strip_prefix("rsa:") {
            Some(bits) => {
                cmd.args(["-algorithm", "RSA", "-pkeyopt"])
                    .arg(format!("rsa_keygen_bits:{bits}"));
                "rsa"
            }
            None => {
                cmd.args(["-algorithm", "ED25519"]);
                "ed25519"
            }
        };
        let out = cmd.arg("-out").arg(&pem).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let der = Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&pem)
            .output()
            .unwrap();
        assert!(der.status.success());
        // Ed25519's p= is the bare 32-octet key (RFC 8463), the end of its SPKI.
        let key = if k == "ed25519" {
            der.stdout[der.stdout.len() - 32..].to_vec()
        } else {
            der.stdout
        };
        let p = base64::engine::general_purpose::STANDARD.encode(key);
        let text = format!("v=DKIM1; k={k}; p={p}");
        text.as_bytes()
            .chunks(255)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn generate(&self, name: &str, kind: &str) -> String {
        Self::generate_in(self.dir.path(), name, kind)
    }
}

#[derive(Debug)]
struct Sig {
    ok: bool,
    d: String,
    s: String,
    a: String,
    c: String,
    h: String,
    err: String,
}

fn verify(dns: &Dnsmasq, msg: &[u8]) -> Vec<Sig> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("verify.py");
    std::fs::write(&script, VERIFY).unwrap();
    let file = dir.path().join("msg.eml");
    std::fs::write(&file, msg).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(dns.addr().port().to_string())
        .arg(&file)
        .output()
        .expect("python3 with dkimpy (.ci/install-deps)");
    assert!(
        out.status.success(),
        "dkimpy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| Sig {
            ok: s["ok"].as_bool().unwrap(),
            d: s["d"].as_str().unwrap().into(),
            s: s["s"].as_str().unwrap().into(),
            a: s["a"].as_str().unwrap().into(),
            c: s["c"].as_str().unwrap().into(),
            h: s["h"].as_str().unwrap().into(),
            err: s["err"].as_str().unwrap().into(),
        })
        .collect()
}

/// Every signature verifies; returns them.
fn verified(dns: &Dnsmasq, msg: &[u8]) -> Vec<Sig> {
    let sigs = verify(dns, msg);
    assert!(
        !sigs.is_empty(),
        "no DKIM-Signature in\n{}",
        String::from_utf8_lossy(msg)
    );
    for s in &sigs {
        assert!(
            s.ok,
            "dkimpy refused ({}) {s:?} on\n{}",
            s.err,
            String::from_utf8_lossy(msg)
        );
    }
    sigs
}

fn send(relay: &Relay, from: &str, to: &[&str], msg: &str, opts: &str) -> (u16, String) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("send.py");
    std::fs::write(&script, SEND).unwrap();
    let file = dir.path().join("msg.eml");
    std::fs::write(&file, msg).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .args([
            "127.0.0.1",
            &relay.smtp.port().to_string(),
            from,
            &to.join(","),
        ])
        .arg(&file)
        .arg(opts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "smtplib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["code"].as_u64().unwrap() as u16,
        v["reply"].as_str().unwrap().to_owned(),
    )
}

/// The delivered message whose Message-ID is `id`.
fn delivered(mx: &Mx, relay: &Relay, id: &str) -> Vec<u8> {
    let needle = format!("Message-ID: <{id}>");
    let recs = mx.wait_for(
        id,
        || relay.log(),
        |r| {
            r.iter()
                .any(|m| String::from_utf8_lossy(&content(m)).contains(&needle))
        },
    );
    recs.iter()
        .map(content)
        .find(|c| String::from_utf8_lossy(c).contains(&needle))
        .unwrap()
}

fn message(from: &str, id: &str, extra: &str, body: &str) -> String {
    format!(
        "From: Sender <{from}>\r\nTo: Bob <bob@dest.test>\r\nSubject: test {id}\r\n\
         Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{id}>\r\nMIME-Version: 1.0\r\n\
         {extra}\r\n{body}"
    )
}

#[test]
fn relay_signatures_verify_with_dkimpy_and_break_when_tampered() {
    let keys = Keys::new();
    let rsa = keys.generate("rsa", "rsa:2048");
    let ed = keys.generate("ed", "ed25519");
    let mx = Mx::start(json!({}));
    let dns = Dnsmasq::start(&[
        Record::mx("dest.test", 10, "mx.dest.test"),
        Record::mx("rsa.test", 10, "mx.dest.test"),
        Record::host("mx.dest.test", &["127.0.0.1"]),
        Record::txt("r1._domainkey.rsa.test", &rsa),
        Record::txt("e1._domainkey.ed.test", &ed),
        Record::txt("r1._domainkey.both.test", &rsa),
        Record::txt("e1._domainkey.both.test", &ed),
        Record::txt("r1._domainkey.parent.test", &rsa),
    ]);
    let k = |n: &str| keys.path(n).display().to_string();
    let cfg = format!(
        "dkim:
  unsigned_policy: allow
  bounce_domain: both.test
  domains:
    - {{domain: rsa.test, selectors: [{{selector: r1, algorithm: rsa-sha256, key_file: '{rsa}'}}]}}
    - {{domain: ed.test, selectors: [{{selector: e1, algorithm: ed25519-sha256, key_file: '{ed}'}}]}}
    - domain: both.test
      selectors:
        - {{selector: r1, algorithm: rsa-sha256, key_file: '{rsa}'}}
        - {{selector: e1, algorithm: ed25519-sha256, key_file: '{ed}'}}
    - {{domain: parent.test, include_subdomains: true, selectors: [{{selector: r1, algorithm: rsa-sha256, key_file: '{rsa}'}}]}}
",
        rsa = k("rsa.pem"),
        ed = k("ed.pem"),
    );
    let relay = relay_with_dns(&dns, mx.port, &cfg);

    // Plain ASCII, rsa-sha256.
    let plain = message(
        "alice@rsa.test",
        "plain@rsa.test",
        "",
        "Hello,\r\nplain text.\r\n",
    );
    assert_eq!(
        send(&relay, "alice@rsa.test", &["bob@dest.test"], &plain, "").0,
        250
    );
    let got = delivered(&mx, &relay, "plain@rsa.test");
    let sigs = verified(&dns, &got);
    assert_eq!(sigs.len(), 1);
    assert_eq!(
        (sigs[0].d.as_str(), sigs[0].s.as_str(), sigs[0].a.as_str()),
        ("rsa.test", "r1", "rsa-sha256")
    );
    assert_eq!(sigs[0].c, "relaxed/relaxed");
    // Oversigned: From and Subject listed once more than present.
    let h: Vec<&str> = sigs[0].h.split(':').map(str::trim).collect();
    assert_eq!(h.iter().filter(|n| **n == "from").count(), 2, "{h:?}");
    assert_eq!(h.iter().filter(|n| **n == "subject").count(), 2, "{h:?}");
    assert!(
        h.contains(&"list-unsubscribe") && !h.contains(&"received"),
        "{h:?}"
    );
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        text.starts_with("DKIM-Signature: "),
        "signature on top:\n{text}"
    );
    assert!(
        !text.contains(" l=") && !text.contains(";l="),
        "never l=:\n{text}"
    );
    assert!(text.contains("t="), "{text}");

    // 8-bit body, ed25519-sha256.
    let eight = message(
        "alice@ed.test",
        "eight@ed.test",
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
        "Grüße aus Zürich — 日本語\r\n\ttabbed   spaces  \r\n",
    );
    assert_eq!(
        send(
            &relay,
            "alice@ed.test",
            &["bob@dest.test"],
            &eight,
            "BODY=8BITMIME"
        )
        .0,
        250
    );
    let got = delivered(&mx, &relay, "eight@ed.test");
    let sigs = verified(&dns, &got);
    assert_eq!((sigs.len(), sigs[0].a.as_str()), (1, "ed25519-sha256"));

    // SMTPUTF8: UTF-8 in addresses and headers; both algorithms on one message.
    let utf8 = message(
        "jörg@both.test",
        "utf8@both.test",
        "Content-Type: text/plain; charset=utf-8\r\n",
        "Ünïcödé body\r\n",
    )
    .replace("Subject: test", "Subject: Grüße test");
    assert_eq!(
        send(
            &relay,
            "jörg@both.test",
            &["bob@dest.test"],
            &utf8,
            "SMTPUTF8,BODY=8BITMIME"
        )
        .0,
        250
    );
    let got = delivered(&mx, &relay, "utf8@both.test");
    let sigs = verified(&dns, &got);
    let mut algs: Vec<&str> = sigs.iter().map(|s| s.a.as_str()).collect();
    algs.sort();
    assert_eq!(algs, ["ed25519-sha256", "rsa-sha256"]);
    assert!(sigs.iter().all(|s| s.d == "both.test"));

    // Long folded headers, a subdomain signed with its parent's key, and a body
    // with CRLF.CRLF in it (dot-stuffed on the wire, a lone dot once queued).
    let many: Vec<String> = (0..12)
        .map(|i| format!("Person {i} <p{i}@dest.test>"))
        .collect();
    let folded = message(
        "news@mail.parent.test",
        "folded@parent.test",
        &format!(
            "Cc: {}\r\nX-Long: {}\r\n",
            many.join(",\r\n "),
            vec!["one two three four five six seven eight nine ten"; 30].join("\r\n ")
        ),
        "line one\r\n.\r\nline after a lone dot\r\n..two dots\r\n\r\n\r\n",
    )
    .replace(
        "Subject: test folded@parent.test",
        "Subject: a subject long enough to be folded by its writer, once\r\n\tand twice,\r\n  and three times folded@parent.test",
    );
    assert_eq!(
        send(
            &relay,
            "news@mail.parent.test",
            &["bob@dest.test"],
            &folded,
            ""
        )
        .0,
        250
    );
    let got = delivered(&mx, &relay, "folded@parent.test");
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        text.contains("\r\n.\r\nline after a lone dot\r\n"),
        "{text}"
    );
    let sigs = verified(&dns, &got);
    assert_eq!(
        sigs[0].d, "parent.test",
        "aligned with the parent (relaxed DMARC)"
    );
    assert!(
        text.split("\r\n").all(|l| l.len() <= 998),
        "no line over 998 octets"
    );

    // A downstream hop re-wraps: folds a header differently, turns runs of blanks
    // into a tab, adds trailing blanks and blank lines at the end. Relaxed verifies.
    let plain_got = delivered(&mx, &relay, "plain@rsa.test");
    let text = String::from_utf8(plain_got.clone()).unwrap();
    let rewrapped = text
        .replace("To: Bob <bob@dest.test>", "To: Bob\r\n\t <bob@dest.test>  ")
        .replace("Subject: test", "Subject:   test")
        .replace("Hello,\r\n", "Hello, \t\r\n")
        + "\r\n\r\n";
    assert_ne!(rewrapped, text);
    verified(&dns, rewrapped.as_bytes());

    // Tampering breaks it: a signed header, the body, an added From: (oversigned).
    for (what, bad) in [
        ("subject", text.replace("Subject: test", "Subject: tset")),
        ("body", text.replace("plain text.", "plain texts")),
        (
            "added From",
            text.replace(
                "MIME-Version: 1.0\r\n",
                "MIME-Version: 1.0\r\nFrom: evil@rsa.test\r\n",
            ),
        ),
        (
            "removed Date",
            text.replace("Date: Sun, 06 Dec 2026 10:00:00 +0000\r\n", ""),
        ),
    ] {
        assert_ne!(bad, text, "{what}: the edit applies");
        let sigs = verify(&dns, bad.as_bytes());
        assert_eq!(sigs.len(), 1);
        assert!(
            !sigs[0].ok,
            "{what}: dkimpy should refuse the tampered message"
        );
    }

    // The relay's own bounce (a 550 from the MX) is signed with bounce_domain's keys.
    let bounced = message("alice@rsa.test", "bounce@rsa.test", "", "bounce me\r\n");
    assert_eq!(
        send(
            &relay,
            "alice@rsa.test",
            &["rcpt550@dest.test"],
            &bounced,
            ""
        )
        .0,
        250
    );
    let recs = mx.wait_for(
        "the DSN",
        || relay.log(),
        |r| r.iter().any(|m| m["rcpts"][0] == "alice@rsa.test"),
    );
    let dsn = content(
        recs.iter()
            .find(|m| m["rcpts"][0] == "alice@rsa.test")
            .unwrap(),
    );
    assert!(String::from_utf8_lossy(&dsn).contains("MAILER-DAEMON@relay.test"));
    let sigs = verified(&dns, &dsn);
    assert_eq!(sigs.len(), 2);
    assert!(sigs.iter().all(|s| s.d == "both.test"));

    assert_eq!(
        metric(
            &relay,
            "mailrelay_dkim_messages_total{result=\"signed\",domain=\"rsa.test\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &relay,
            "mailrelay_dkim_signatures_total{algorithm=\"ed25519-sha256\"}"
        ),
        Some(3.0),
        "ed.test, both.test and the DSN"
    );
}

#[test]
fn simple_canonicalization_verifies_and_a_rewrap_breaks_it() {
    let keys = Keys::new();
    let rsa = keys.generate("rsa", "rsa:2048");
    let mx = Mx::start(json!({}));
    let dns = Dnsmasq::start(&[
        Record::mx("dest.test", 10, "mx.dest.test"),
        Record::host("mx.dest.test", &["127.0.0.1"]),
        Record::txt("r1._domainkey.rsa.test", &rsa),
    ]);
    let cfg = format!(
        "dkim:
  canonicalization: simple/simple
  expire_after: 7d
  domains:
    - {{domain: rsa.test, selectors: [{{selector: r1, algorithm: rsa-sha256, key_file: '{}'}}]}}
",
        keys.path("rsa.pem").display()
    );
    let relay = relay_with_dns(&dns, mx.port, &cfg);
    let msg = message(
        "a@rsa.test",
        "simple@rsa.test",
        "",
        "text  with  blanks\r\n",
    );
    assert_eq!(
        send(&relay, "a@rsa.test", &["bob@dest.test"], &msg, "").0,
        250
    );
    let got = delivered(&mx, &relay, "simple@rsa.test");
    let sigs = verified(&dns, &got);
    assert_eq!(sigs[0].c, "simple/simple");
    let text = String::from_utf8(got).unwrap();
    assert!(text.contains(" x="), "expiry set:\n{text}");
    let rewrapped = text.replace("text  with  blanks", "text with blanks");
    assert!(
        !verify(&dns, rewrapped.as_bytes())[0].ok,
        "simple body: any change breaks it"
    );
}

#[test]
fn through_real_postfix_the_signature_still_verifies() {
    use support::postfix::{Postfix, run, tool};
    const MAIL_UID: u32 = 65534;
    let mail = tempfile::tempdir().unwrap();
    std::fs::set_permissions(mail.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = mail.path().join("mail");
    std::fs::create_dir(&base).unwrap();
    std::os::unix::fs::chown(&base, Some(MAIL_UID), Some(MAIL_UID)).unwrap();
    let map = mail.path().join("vmailbox");
    std::fs::write(&map, "bob@final.test bob/\n").unwrap();
    let mut pf = Postfix::start_final(&format!(
        "virtual_mailbox_domains = final.test
virtual_mailbox_base = {base}
virtual_mailbox_maps = texthash:{map}
virtual_uid_maps = static:{MAIL_UID}
virtual_gid_maps = static:{MAIL_UID}
",
        base = base.display(),
        map = map.display(),
    ));
    let keys = Keys::new();
    let rsa = keys.generate("rsa", "rsa:2048");
    let ed = keys.generate("ed", "ed25519");
    let dns = Dnsmasq::start(&[
        Record::mx("final.test", 10, "mx.final.test"),
        Record::host("mx.final.test", &["127.0.0.1"]),
        Record::txt("r1._domainkey.sender.test", &rsa),
        Record::txt("e1._domainkey.sender.test", &ed),
    ]);
    let cfg = format!(
        "dkim:
  domains:
    - domain: sender.test
      selectors:
        - {{selector: r1, algorithm: rsa-sha256, key_file: '{}'}}
        - {{selector: e1, algorithm: ed25519-sha256, key_file: '{}'}}
",
        keys.path("rsa.pem").display(),
        keys.path("ed.pem").display()
    );
    let relay = relay_with_dns(&dns, pf.port, &cfg);
    let original = message(
        "alice@sender.test",
        "pf@sender.test",
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
        "Grüße\r\n.\r\n.leading dot\r\ntrailing   \r\n",
    );
    let file = mail.path().join("msg.eml");
    std::fs::write(&file, original.strip_suffix("\r\n").unwrap()).unwrap();
    let r = run(
        Command::new(tool("swaks"))
            .args(["--server", &relay.smtp.to_string()])
            .args(["--from", "alice@sender.test", "--to", "bob@final.test"])
            .args(["--helo", "client.test"])
            .arg("--data")
            .arg(&file),
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "swaks: {}", r.text());
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let dir = base.join("bob").join("new");
        if let Some(f) = std::fs::read_dir(&dir)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
        {
            break std::fs::read(f.path()).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "not delivered\n{}\n{}",
            pf.maillog(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Postfix stores LF line ends; on the wire (and to the verifier) it is CRLF.
    let text = String::from_utf8(stored).unwrap().replace('\n', "\r\n");
    assert!(text.contains("Received: from relay.test"), "{text}");
    let sigs = verified(&dns, text.as_bytes());
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    pf.stop();
}

#[test]
fn unsigned_policy_refuses_or_allows_by_domain() {
    let keys = Keys::new();
    keys.generate("ed", "ed25519");
    let cfg = format!(
        "dkim:
  unsigned_policy: reject
  unsigned_overrides:
    - {{domain: '*.free.test', policy: allow}}
  domains:
    - {{domain: signed.test, selectors: [{{selector: e1, algorithm: ed25519-sha256, key_file: '{}'}}]}}
",
        keys.path("ed.pem").display()
    );
    let mut relay = Relay::start(RelayOptions {
        extra_yaml: cfg,
        ..Default::default()
    });
    let (code, reply) = send(
        &relay,
        "a@nokey.test",
        &["b@dest.test"],
        &message("a@nokey.test", "1@nokey.test", "", "x\r\n"),
        "",
    );
    assert_eq!(code, 550, "{reply}");
    assert!(
        reply.contains("5.7.26") && reply.contains("no DKIM key for From: domain nokey.test"),
        "{reply}"
    );
    let (code, reply) = send(
        &relay,
        "a@nokey.test",
        &["b@dest.test"],
        "Subject: no from\r\n\r\nx\r\n",
        "",
    );
    assert_eq!(code, 550, "{reply}");
    assert!(reply.contains("no From: header"), "{reply}");
    let (code, reply) = send(
        &relay,
        "a@nokey.test",
        &["b@dest.test"],
        "From: a@one.test, b@two.test\r\nSubject: two\r\n\r\nx\r\n",
        "",
    );
    assert_eq!(code, 550, "{reply}");
    assert!(reply.contains("more than one address"), "{reply}");
    // The override lets a subdomain of free.test through, unsigned.
    let (code, _) = send(
        &relay,
        "a@x.free.test",
        &["b@dest.test"],
        &message("a@x.free.test", "2@x.free.test", "", "x\r\n"),
        "",
    );
    assert_eq!(code, 250);
    let (code, _) = send(
        &relay,
        "a@signed.test",
        &["b@dest.test"],
        &message("a@signed.test", "3@signed.test", "", "x\r\n"),
        "",
    );
    assert_eq!(code, 250);
    let series = |r: &str, d: &str| {
        metric(
            &relay,
            &format!("mailrelay_dkim_messages_total{{result=\"{r}\",domain=\"{d}\"}}"),
        )
    };
    assert_eq!(series("refused", "other"), Some(3.0));
    assert_eq!(series("unsigned", "*.free.test"), Some(1.0));
    assert_eq!(series("signed", "signed.test"), Some(1.0));
    relay.stop();
    let queued = relay.queued_messages();
    assert_eq!(queued.len(), 2, "refused mail is not queued");
    for m in &queued {
        let t = String::from_utf8_lossy(&m.body);
        assert_eq!(
            t.contains("DKIM-Signature:"),
            t.contains("signed.test>"),
            "{t}"
        );
    }
}

/// Points `dir/keys.yaml` (through `dir/..data`) at a fresh versioned directory,
/// the way the kubelet updates a Secret volume: one atomic symlink swap.
fn publish(dir: &Path, version: &str, keys_yaml: &str, pems: &[(&str, &Path)]) {
    let v = dir.join(format!("..{version}"));
    std::fs::create_dir(&v).unwrap();
    std::fs::write(v.join("keys.yaml"), keys_yaml).unwrap();
    for (name, src) in pems {
        std::fs::copy(src, v.join(name)).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in std::iter::once("keys.yaml").chain(pems.iter().map(|p| p.0)) {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[test]
fn keys_dir_reloads_without_restart_and_keeps_old_keys_on_a_bad_set() {
    let keys = Keys::new();
    let old = keys.generate("old", "rsa:2048");
    let new = keys.generate("new", "ed25519");
    let mx = Mx::start(json!({}));
    let dns = Dnsmasq::start(&[
        Record::mx("dest.test", 10, "mx.dest.test"),
        Record::host("mx.dest.test", &["127.0.0.1"]),
        Record::txt("old._domainkey.tenant.test", &old),
        Record::txt("new._domainkey.tenant.test", &new),
    ]);
    let kdir = tempfile::tempdir().unwrap();
    publish(
        kdir.path(),
        "v1",
        "domains:\n  - {domain: tenant.test, selectors: [{selector: old, algorithm: rsa-sha256, key_file: key.pem}]}\n",
        &[("key.pem", &keys.path("old.pem"))],
    );
    let cfg = format!(
        "dkim:\n  keys_dir: '{}'\n  reload_interval: 200ms\n",
        kdir.path().display()
    );
    let relay = relay_with(&dns, mx.port, &cfg, RelayOptions::default());
    let pid = relay.pid();
    let m1 = message("a@tenant.test", "r1@tenant.test", "", "one\r\n");
    assert_eq!(
        send(&relay, "a@tenant.test", &["bob@dest.test"], &m1, "").0,
        250
    );
    let sigs = verified(&dns, &delivered(&mx, &relay, "r1@tenant.test"));
    assert_eq!(sigs[0].s, "old");

    publish(
        kdir.path(),
        "v2",
        "domains:\n  - {domain: tenant.test, selectors: [{selector: new, algorithm: ed25519-sha256, key_file: key.pem}]}\n",
        &[("key.pem", &keys.path("new.pem"))],
    );
    wait_until("the reload", &relay, || {
        metric(&relay, "mailrelay_dkim_key_reloads_total{result=\"ok\"}").filter(|v| *v >= 1.0)
    });
    let m2 = message("a@tenant.test", "r2@tenant.test", "", "two\r\n");
    assert_eq!(
        send(&relay, "a@tenant.test", &["bob@dest.test"], &m2, "").0,
        250
    );
    let sigs = verified(&dns, &delivered(&mx, &relay, "r2@tenant.test"));
    assert_eq!(
        (sigs[0].s.as_str(), sigs[0].a.as_str()),
        ("new", "ed25519-sha256")
    );

    // A bad set (a selector clash) is refused, logged with its field, and the
    // keys in use stay.
    publish(
        kdir.path(),
        "v3",
        "domains:\n  - {domain: tenant.test, selectors: [{selector: new, algorithm: ed25519-sha256, key_file: key.pem}, {selector: new, algorithm: ed25519-sha256, key_file: key.pem}]}\n",
        &[("key.pem", &keys.path("new.pem"))],
    );
    wait_until("the refused reload", &relay, || {
        metric(&relay, "mailrelay_dkim_key_reloads_total{result=\"error\"}").filter(|v| *v >= 1.0)
    });
    let log = relay.log();
    assert!(
        log.contains("selector clash") && log.contains("selectors[1].selector"),
        "{log}"
    );
    let m3 = message("a@tenant.test", "r3@tenant.test", "", "three\r\n");
    assert_eq!(
        send(&relay, "a@tenant.test", &["bob@dest.test"], &m3, "").0,
        250
    );
    let sigs = verified(&dns, &delivered(&mx, &relay, "r3@tenant.test"));
    assert_eq!(sigs[0].s, "new");
    assert_eq!(relay.pid(), pid, "no restart");
}

#[test]
fn bad_keys_are_refused_at_startup_naming_the_field() {
    let keys = Keys::new();
    keys.generate("short", "rsa:1024");
    keys.generate("tiny", "rsa:768");
    keys.generate("ed", "ed25519");
    std::fs::write(
        keys.path("junk.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let check = |dkim: &str| -> String {
        let file = keys.path("cfg.yaml");
        std::fs::write(&file, format!("hostname: relay.test\ndkim:\n{dkim}")).unwrap();
        let out = Command::new(binary())
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "check-config accepted:\n{dkim}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let sel = |alg: &str, file: &str| {
        format!(
            "  domains:\n    - {{domain: a.test, selectors: [{{selector: s1, algorithm: {alg}, key_file: '{}'}}]}}\n",
            keys.path(file).display()
        )
    };
    let e = check(&sel("rsa-sha256", "tiny.pem"));
    assert!(
        e.contains("dkim.domains[0].selectors[0].key_file")
            && e.contains("768 bits")
            && e.contains("RFC 8301"),
        "{e}"
    );
    // 1024-2047 bits: accepted, with a warning naming the field.
    let file = keys.path("cfg-short.yaml");
    std::fs::write(
        &file,
        format!(
            "hostname: relay.test\ndkim:\n{}",
            sel("rsa-sha256", "short.pem")
        ),
    )
    .unwrap();
    let out = Command::new(binary())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a 1024-bit key is refused: {e}");
    assert!(
        e.contains("warning: dkim.domains[0].selectors[0].key_file") && e.contains("1024 bits"),
        "{e}"
    );
    let e = check(&sel("rsa-sha256", "missing.pem"));
    assert!(
        e.contains("dkim.domains[0].selectors[0].key_file") && e.contains("cannot read"),
        "{e}"
    );
    let e = check(&sel("rsa-sha256", "junk.pem"));
    assert!(e.contains("key_file") && e.contains("malformed"), "{e}");
    let e = check(&sel("rsa-sha256", "ed.pem"));
    assert!(
        e.contains("Ed25519 key but the selector's algorithm is rsa-sha256"),
        "{e}"
    );
    let e = check(&sel("rsa-sha1", "ed.pem"));
    assert!(
        e.contains("dkim.domains[0].selectors[0].algorithm") && e.contains("rsa-sha1"),
        "{e}"
    );
    let e = check(&sel("ed25519-sha256", "ed.pem").replace("a.test", "not_a domain"));
    assert!(
        e.contains("dkim.domains[0].domain") && e.contains("not a valid DNS name"),
        "{e}"
    );
}

/// RSA keys of 1024-2047 bits sign (RFC 8301 only discourages them), with a
/// warning naming the field in the log; dkimpy (which refuses keys under 1024
/// bits) verifies the signature.
#[test]
fn a_1024_bit_rsa_key_signs_with_a_warning() {
    let keys = Keys::new();
    let short = keys.generate("short", "rsa:1024");
    let mx = Mx::start(json!({}));
    let dns = Dnsmasq::start(&[
        Record::mx("dest.test", 10, "mx.dest.test"),
        Record::host("mx.dest.test", &["127.0.0.1"]),
        Record::txt("old._domainkey.short.test", &short),
    ]);
    let cfg = format!(
        "dkim:
  domains:
    - {{domain: short.test, selectors: [{{selector: old, algorithm: rsa-sha256, key_file: '{}'}}]}}
",
        keys.path("short.pem").display()
    );
    let relay = relay_with_dns(&dns, mx.port, &cfg);
    let msg = message(
        "a@short.test",
        "short@short.test",
        "",
        "signed with a short key\r\n",
    );
    assert_eq!(
        send(&relay, "a@short.test", &["bob@dest.test"], &msg, "").0,
        250
    );
    let got = delivered(&mx, &relay, "short@short.test");
    let sigs = verified(&dns, &got);
    assert_eq!(
        (sigs.len(), sigs[0].d.as_str(), sigs[0].a.as_str()),
        (1, "short.test", "rsa-sha256")
    );
    let text = String::from_utf8(got).unwrap();
    let tampered = text.replace("signed with a short key", "signed with a shorter key");
    assert!(!verify(&dns, tampered.as_bytes())[0].ok);
    let log = relay.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("DKIM key accepted with a warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "once, at start-up:\n{log}");
    assert!(
        warnings[0].contains("dkim.domains[0].selectors[0].key_file")
            && warnings[0].contains("1024 bits"),
        "{log}"
    );
}

/// A bounce the quota defer gate causes (mail held past the queue lifetime
/// expires untried, 4.4.7) is signed with the relay's own domain like every DSN.
#[test]
fn dsns_of_mail_the_defer_gate_held_too_long_are_signed() {
    let keys = Keys::new();
    let ed = keys.generate("ed", "ed25519");
    let mx = Mx::start(json!({}));
    let dns = Dnsmasq::start(&[
        Record::mx("dest.test", 10, "mx.dest.test"),
        Record::mx("sender.test", 10, "mx.dest.test"),
        Record::host("mx.dest.test", &["127.0.0.1"]),
        Record::txt("e1._domainkey.relay-own.test", &ed),
    ]);
    let cfg = format!(
        "  retry: {{first: 1s, max_backoff: 2s, jitter: 0.0, max_lifetime: 4s}}
dkim:
  unsigned_policy: allow
  bounce_domain: relay-own.test
  domains:
    - {{domain: relay-own.test, selectors: [{{selector: e1, algorithm: ed25519-sha256, key_file: '{}'}}]}}
quotas:
  - {{name: hourly, direction: ingress, action: defer, match: {{senders: ['once@sender.test']}}, limits: [1/1h]}}
",
        keys.path("ed.pem").display()
    );
    let relay = relay_with_dns(&dns, mx.port, &cfg);
    let first = message("once@sender.test", "first@sender.test", "", "first\r\n");
    assert_eq!(
        send(&relay, "once@sender.test", &["first@dest.test"], &first, "").0,
        250
    );
    delivered(&mx, &relay, "first@sender.test");
    // The hour's one message is spent: the next is held, then expires.
    let held = message("once@sender.test", "held@sender.test", "", "held\r\n");
    assert_eq!(
        send(&relay, "once@sender.test", &["held@dest.test"], &held, "").0,
        250
    );
    let recs = mx.wait_for(
        "the DSN of the held message",
        || relay.log(),
        |r| r.iter().any(|m| m["rcpts"][0] == "once@sender.test"),
    );
    let dsn = content(
        recs.iter()
            .find(|m| m["rcpts"][0] == "once@sender.test")
            .unwrap(),
    );
    let text = String::from_utf8_lossy(&dsn).into_owned();
    assert!(
        text.contains("Status: 4.4.7") && text.contains("held@dest.test"),
        "{text}"
    );
    // Never tried: the gate held it to the end.
    assert!(
        !mx.records()
            .iter()
            .any(|m| m["rcpts"][0] == "held@dest.test"),
        "the held message was sent"
    );
    let sigs = verified(&dns, &dsn);
    assert_eq!(
        (sigs.len(), sigs[0].d.as_str(), sigs[0].a.as_str()),
        (1, "relay-own.test", "ed25519-sha256")
    );
}
