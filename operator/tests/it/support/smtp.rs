//! SMTP peers for the tests: a scripted aiosmtpd server (the relay's smarthost) and
//! clients (swaks, Python's smtplib); and a self-signed certificate.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Replies to RCPT by local part: `rcptNNN@` gets NNN, anything else 250.
const SINK: &str = r#"
import asyncio, json, re, sys
from aiosmtpd.smtp import SMTP

host, port, record = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        m = re.search(r"rcpt(\d{3})@", address)
        if m:
            code = m.group(1)
            return f"{code} {code[0]}.1.1 scripted {code}"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with open(record, "a") as f:
            f.write(json.dumps({"from": envelope.mail_from, "rcpts": envelope.rcpt_tos}) + "\n")
        return "250 2.0.0 OK queued"

async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: SMTP(Handler(), hostname="sink.test"), host, port)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

pub struct Sink {
    child: Child,
    pub addr: SocketAddr,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sink {
    pub fn start() -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("sink.py");
        std::fs::write(&script, SINK).unwrap();
        let record = dir.path().join("received.jsonl");
        let port = super::free_ports(1)[0];
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["127.0.0.1", &port.to_string()])
            .arg(&record)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with aiosmtpd (see .ci/install-deps)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "aiosmtpd did not start");
        Sink {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            record,
            _dir: dir,
        }
    }

    pub fn received(&self) -> usize {
        std::fs::read_to_string(&self.record)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one message with swaks (plain, from a relay network); returns swaks' output.
pub fn swaks(server: SocketAddr, from: &str, to: &str, extra: &[&str]) -> String {
    let out = Command::new("swaks")
        .args(["--server", &server.to_string(), "--from", from, "--to", to])
        .args(["--helo", "client.test"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("swaks must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "swaks failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("queued as"), "not queued:\n{text}");
    text
}

const SEND_MANY: &str = r#"
import json, smtplib, ssl, sys
host, port, user, password, sender, rcpt, count = sys.argv[1:8]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP(host, int(port), timeout=30)
s.ehlo("client.test")
s.starttls(context=ctx)
s.ehlo("client.test")
if user:
    s.login(user, password)
codes = []
for i in range(int(count)):
    msg = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: message {i}\r\n\r\nhello {i}\r\n"
    try:
        s.sendmail(sender, [rcpt], msg)
        codes.append(250)
    except smtplib.SMTPSenderRefused as e:
        codes.append(e.smtp_code)
    except smtplib.SMTPRecipientsRefused as e:
        codes.append(list(e.recipients.values())[0][0])
    except smtplib.SMTPDataError as e:
        codes.append(e.smtp_code)
    except smtplib.SMTPResponseException as e:
        codes.append(e.smtp_code)
        break
try:
    s.quit()
except Exception:
    pass
print(json.dumps(codes))
"#;

/// Sends `count` messages in one session (STARTTLS, then AUTH when `user` is not
/// empty) with smtplib; returns the final reply code of each (250 = queued).
pub fn smtplib_send_many(
    server: SocketAddr,
    user: &str,
    password: &str,
    from: &str,
    to: &str,
    count: usize,
) -> Vec<u16> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(SEND_MANY)
        .args([
            &server.ip().to_string(),
            &server.port().to_string(),
            user,
            password,
            from,
            to,
            &count.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "smtplib client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Sends a message with the null sender (`MAIL FROM:<>`) with smtplib, plain.
pub fn smtplib_null_sender(server: SocketAddr, to: &str) {
    let script = r#"
import smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=30)
s.sendmail("", [sys.argv[3]], "Subject: bounce test\r\n\r\nhi\r\n")
s.quit()
"#;
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([&server.ip().to_string(), &server.port().to_string(), to])
        .status()
        .expect("python3");
    assert!(st.success());
}

/// A self-signed certificate and key for `relay.example.com` in `dir`.
pub fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=relay.example.com"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(st.success(), "openssl req failed");
    (cert, key)
}
