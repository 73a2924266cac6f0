//! A real `dnsmasq` serving TXT records under `.test` from its command line
//! (trimmed from relay/tests/support/dns.rs): names it has no record for get
//! NXDOMAIN. Records have TTL 0.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_ports;

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// A `dnsmasq` on a free loopback port, killed on drop.
pub struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Dnsmasq {
    /// Serves `(name, value)` TXT records; a value longer than 255 bytes is
    /// split into several strings of one record, as a zone file would.
    pub fn start(txt: &[(&str, &str)]) -> Dnsmasq {
        let args: Vec<String> = txt
            .iter()
            .map(|(name, value)| {
                let parts: Vec<String> = value
                    .as_bytes()
                    .chunks(255)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect();
                format!("--txt-record={name},{}", parts.join(","))
            })
            .collect();
        for _ in 0..5 {
            let port = free_ports(1)[0];
            let mut child = Command::new(DNSMASQ)
                .args([
                    "--keep-in-foreground".to_string(),
                    format!("--port={port}"),
                    "--listen-address=127.0.0.1".into(),
                    "--bind-interfaces".into(),
                    "--no-resolv".into(),
                    "--no-hosts".into(),
                    "--conf-file=/dev/null".into(),
                    "--pid-file".into(),
                    "--log-facility=-".into(),
                    "--local=/test/".into(),
                ])
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dnsmasq (Debian dnsmasq-base, see .ci/install-deps)");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if answers(port) {
                    return Dnsmasq {
                        child,
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("dnsmasq did not start");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether anything answers a TXT query on `port`.
fn answers(port: u16) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // ID 1, RD, one question: ready.test TXT IN.
    let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["ready", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 16, 0, 1]);
    if sock.send_to(&q, ("127.0.0.1", port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    sock.recv_from(&mut buf).is_ok()
}
