//! The whole chain with real programs at both ends: swaks → mailrelay → a real
//! Postfix as the final MTA, which stores the message in a Maildir (Postfix's
//! `virtual` delivery agent, mailboxes in a temp dir, no system users needed).
//! The message must arrive byte for byte: what swaks sent, after the headers each
//! hop adds, with Postfix's Maildir line ends (LF) in place of CRLF.
//!
//! MX records come from a real dnsmasq; mailrelay's MX port override points at
//! Postfix's private smtpd.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::deliver::{api_message, rcpt_state, relay_with_dns, wait_until};
use support::dns::{Dnsmasq, Record};
use support::postfix::{Postfix, run, tool};
use support::relay::make_cert;

/// The mailbox owner: `nobody`/`nogroup` on Debian (Postfix refuses uids below 100).
const MAIL_UID: u32 = 65534;

/// The Maildir files delivered to `user` so far.
fn maildir(base: &Path, user: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(base.join(user).join("new"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Header field names of `prefix` (the headers added in front of the original), in
/// order, continuation lines folded into their field.
fn field_names(prefix: &str) -> Vec<String> {
    prefix
        .lines()
        .filter(|l| !l.starts_with([' ', '\t']))
        .map(|l| l.split(':').next().unwrap().to_owned())
        .collect()
}

#[test]
fn swaks_to_mailrelay_to_postfix_maildir_byte_for_byte() {
    // Mailboxes and the mailbox map live outside Postfix's own temp dir; its
    // daemons (and the mailbox owner) must be able to reach them.
    let mail = tempfile::tempdir().unwrap();
    std::fs::set_permissions(mail.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = mail.path().join("mail");
    std::fs::create_dir(&base).unwrap();
    std::os::unix::fs::chown(&base, Some(MAIL_UID), Some(MAIL_UID)).unwrap();
    let map = mail.path().join("vmailbox");
    std::fs::write(&map, "bob@final.test bob/\ncarol@final.test carol/\n").unwrap();
    let (cert, key) = make_cert(mail.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut pf = Postfix::start_final(&format!(
        "virtual_mailbox_domains = final.test
virtual_mailbox_base = {base}
virtual_mailbox_maps = texthash:{map}
virtual_uid_maps = static:{MAIL_UID}
virtual_gid_maps = static:{MAIL_UID}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
",
        base = base.display(),
        map = map.display(),
        cert = cert.display(),
        key = key.display(),
    ));
    let dns = Dnsmasq::start(&[
        Record::mx("final.test", 10, "mx.final.test"),
        Record::host("mx.final.test", &["127.0.0.1"]),
    ]);
    let relay = relay_with_dns(&dns, pf.port, "");

    // 8-bit text, a line that is only a dot, one that starts with one, a long
    // folded header and trailing white space: all must survive both hops.
    let original = "From: Alice <alice@sender.test>\r\n\
                    To: Bob <bob@final.test>, Carol <carol@final.test>\r\n\
                    Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= through the whole chain\r\n\
                    Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
                    Message-ID: <chain-1@sender.test>\r\n\
                    X-Long: one two three four five six seven eight nine ten eleven\r\n\
                    \ttwelve thirteen\r\n\
                    MIME-Version: 1.0\r\n\
                    Content-Type: text/plain; charset=utf-8\r\n\
                    Content-Transfer-Encoding: 8bit\r\n\
                    \r\n\
                    Grüße — 日本語\r\n\
                    .\r\n\
                    .leading dot\r\n\
                    trailing space   \r\n\
                    \r\n\
                    last line\r\n";
    // swaks ends the data with CRLF . CRLF itself, the CRLF being the message's.
    let file = mail.path().join("msg.eml");
    std::fs::write(&file, original.strip_suffix("\r\n").unwrap()).unwrap();
    let r = run(
        std::process::Command::new(tool("swaks"))
            .args(["--server", &relay.smtp.to_string()])
            .args(["--from", "alice@sender.test"])
            .args(["--to", "bob@final.test,carol@final.test"])
            .args(["--helo", "client.test"])
            .arg("--data")
            .arg(&file),
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "swaks into mailrelay: {}", r.text());
    let id = r
        .stdout
        .split("queued as ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(mailrelay::queue::QueueId::parse)
        .unwrap_or_else(|| panic!("no queue id: {}", r.text()));

    let deadline = Instant::now() + Duration::from_secs(60);
    while maildir(&base, "bob").is_empty() || maildir(&base, "carol").is_empty() {
        assert!(
            Instant::now() < deadline,
            "not delivered to both Maildirs\n--- postfix queue ---\n{}\n--- maillog ---\n{}\n--- relay ---\n{}",
            pf.queue_listing(),
            pf.maillog(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Postfix stores lines with LF; everything else is as sent.
    let want = original.replace("\r\n", "\n");
    for user in ["bob", "carol"] {
        let files = maildir(&base, user);
        assert_eq!(files.len(), 1, "{user}: {files:?}");
        let got = std::fs::read(&files[0]).unwrap();
        let got = String::from_utf8(got).expect("stored as UTF-8, not re-encoded");
        assert!(
            got.ends_with(&want),
            "{user}: original not intact\n--- stored ---\n{got}\n--- sent ---\n{want}"
        );
        let prefix = &got[..got.len() - want.len()];
        assert_eq!(
            field_names(prefix),
            [
                "Return-Path",
                "X-Original-To",
                "Delivered-To",
                "Received",
                "Received"
            ],
            "{user}: only the hops' headers come first:\n{prefix}"
        );
        assert!(prefix.starts_with("Return-Path: <alice@sender.test>\n"));
        assert!(prefix.contains(&format!("Delivered-To: {user}@final.test\n")));
        // Postfix's hop: from mailrelay, over the TLS mailrelay chose by itself.
        assert!(
            prefix.contains("from relay.test (") && prefix.contains("with ESMTPS id "),
            "{prefix}"
        );
        // mailrelay's hop: from swaks.
        assert!(
            prefix.contains("from client.test (") && prefix.contains("by relay.test (mailrelay)"),
            "{prefix}"
        );
    }

    let msg = wait_until("the delivery recorded", &relay, || {
        let m = api_message(&relay, &id)?;
        m["status"]["final_at_ms"].is_u64().then_some(m)
    });
    for user in ["bob@final.test", "carol@final.test"] {
        assert_eq!(rcpt_state(&msg, user), "delivered", "{msg:#}");
    }
    let attempt = &msg["status"]["rcpts"][0]["attempts"][0];
    assert_eq!(attempt["mx"], "mx.final.test");
    assert!(attempt["tls"]["version"].is_string(), "{msg:#}");
    // Both recipients in one transaction: one Postfix queue id, one delivery each.
    let log = pf.maillog();
    assert_eq!(
        log.matches("status=sent (delivered to maildir)").count(),
        2,
        "{log}"
    );
    pf.stop();
}
