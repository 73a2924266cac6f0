//! A real DNS server for delivery tests: `dnsmasq` serving throwaway `.test` names
//! from its command line (no config file), plus two stand-ins for broken resolvers.
//!
//! dnsmasq answers every name under `.test` itself (`--local=/test/`): names it was
//! given records for get them, others get NXDOMAIN, and a name it knows with another
//! type gets NOERROR without records (NODATA). Its records have TTL 0, so a caching
//! resolver asks again every time.

use std::io::{Read, Seek};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{JoinHandle, sleep};
use std::time::{Duration, Instant};

use super::free_ports;

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// One thing the test zone should say.
#[derive(Debug, Clone)]
pub enum Record {
    /// `domain. MX preference exchange.`
    Mx {
        domain: String,
        preference: u16,
        exchange: String,
    },
    /// `domain. MX 0 .` — RFC 7505 null MX.
    NullMx { domain: String },
    /// A and/or AAAA records for `name`.
    Host { name: String, addrs: Vec<IpAddr> },
    /// A TXT record: makes `name` exist without MX or address records.
    Txt { name: String, text: String },
    /// Every query at or below `domain` gets SERVFAIL: dnsmasq forwards them to a
    /// stub that answers nothing else, and relays its SERVFAIL.
    ServFail { domain: String },
    /// Every query at or below `domain` gets REFUSED: dnsmasq is told to use its
    /// upstream servers for it, and it has none (`--no-resolv`).
    Refused { domain: String },
    /// Any record, as RR type number and RDATA in hex (dnsmasq `--dns-rr`).
    Raw {
        name: String,
        rrtype: u16,
        hex: String,
    },
}

impl Record {
    pub fn mx(domain: &str, preference: u16, exchange: &str) -> Self {
        Record::Mx {
            domain: domain.into(),
            preference,
            exchange: exchange.into(),
        }
    }

    pub fn null_mx(domain: &str) -> Self {
        Record::NullMx {
            domain: domain.into(),
        }
    }

    /// `addrs` as text, IPv4 and IPv6 mixed: `host("mx.a.test", &["127.0.0.2", "::2"])`.
    pub fn host(name: &str, addrs: &[&str]) -> Self {
        Record::Host {
            name: name.into(),
            addrs: addrs
                .iter()
                .map(|a| a.parse().expect("an IP address"))
                .collect(),
        }
    }

    pub fn txt(name: &str, text: &str) -> Self {
        Record::Txt {
            name: name.into(),
            text: text.into(),
        }
    }

    /// A TXT record of one string that may hold commas (which `--txt-record`
    /// takes as string separators).
    pub fn txt_string(name: &str, text: &str) -> Self {
        assert!(text.len() < 256, "one TXT string holds at most 255 octets");
        let mut hex = format!("{:02x}", text.len());
        for b in text.bytes() {
            hex.push_str(&format!("{b:02x}"));
        }
        Record::Raw {
            name: name.into(),
            rrtype: 16,
            hex,
        }
    }

    pub fn servfail(domain: &str) -> Self {
        Record::ServFail {
            domain: domain.into(),
        }
    }

    pub fn refused(domain: &str) -> Self {
        Record::Refused {
            domain: domain.into(),
        }
    }
}

/// A `dnsmasq` on a free loopback port (UDP and TCP), killed on drop.
pub struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    _stubs: Vec<ServFailStub>,
}

impl Dnsmasq {
    /// Starts dnsmasq with `records` and waits until it answers a query.
    pub fn start(records: &[Record]) -> Self {
        let mut stubs = Vec::new();
        let mut args: Vec<String> = Vec::new();
        for record in records {
            match record {
                Record::Mx {
                    domain,
                    preference,
                    exchange,
                } => args.push(format!("--mx-host={domain},{exchange},{preference}")),
                // dnsmasq writes the exchange `.` as the root name: exactly RFC 7505.
                Record::NullMx { domain } => args.push(format!("--mx-host={domain},.,0")),
                Record::Host { name, addrs } => {
                    let addrs: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
                    args.push(format!("--host-record={name},{}", addrs.join(",")));
                }
                Record::Txt { name, text } => args.push(format!("--txt-record={name},{text}")),
                Record::ServFail { domain } => {
                    let stub = ServFailStub::start();
                    args.push(format!("--server=/{domain}/127.0.0.1#{}", stub.port));
                    stubs.push(stub);
                }
                Record::Refused { domain } => args.push(format!("--server=/{domain}/#")),
                Record::Raw { name, rrtype, hex } => {
                    args.push(format!("--dns-rr={name},{rrtype},{hex}"))
                }
            }
        }

        // The port was free a moment ago; if another process took it since, dnsmasq
        // exits at once and we try another.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_ports(1)[0];
            match spawn(port, &args) {
                Ok(child) => {
                    return Dnsmasq {
                        child,
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        _stubs: stubs,
                    };
                }
                Err(e) => last_error = e,
            }
        }
        panic!("dnsmasq did not start: {last_error}");
    }

    /// Where to send queries (`ip:port`).
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

fn spawn(port: u16, records: &[String]) -> Result<Child, String> {
    // stderr goes to an unnamed temporary file: a pipe nobody reads could fill up
    // and stall dnsmasq, and the file is still there to quote when it fails.
    let mut log = tempfile::tempfile().map_err(|e| format!("temp file: {e}"))?;
    let mut child = Command::new(DNSMASQ)
        .args([
            "--keep-in-foreground".to_string(),
            format!("--port={port}"),
            "--listen-address=127.0.0.1".into(),
            "--bind-interfaces".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--conf-file=/dev/null".into(),
            // No PID file: parallel tests would all write /run/dnsmasq.pid.
            "--pid-file".into(),
            "--log-facility=-".into(),
            "--local=/test/".into(),
        ])
        .args(records)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone().map_err(|e| format!("temp file: {e}"))?)
        .spawn()
        .map_err(|e| {
            format!("cannot run {DNSMASQ} ({e}); install Debian's dnsmasq-base (.ci/install-deps)")
        })?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait for dnsmasq") {
            let mut text = String::new();
            let _ = log.rewind();
            let _ = log.read_to_string(&mut text);
            return Err(format!(
                "dnsmasq on port {port} exited with {status}: {text}"
            ));
        }
        // Any answer (NXDOMAIN here) means it is serving.
        if query(port, "dnsmasq-ready.test", 1).is_some() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "dnsmasq on port {port} did not answer within {READY_TIMEOUT:?}"
            ));
        }
        sleep(Duration::from_millis(20));
    }
}

/// Sends one UDP query (`qtype` 1 = A, 15 = MX, ...) to 127.0.0.1:`port` and returns
/// the response code, or `None` when nothing came back within 200 ms.
pub fn query(port: u16, name: &str, qtype: u16) -> Option<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let id: u16 = rand::random();
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.').filter(|l| !l.is_empty()) {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
    packet.extend_from_slice(&qtype.to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes()); // class IN
    socket.send_to(&packet, ("127.0.0.1", port)).ok()?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        if n >= 12 && buf[..2] == id.to_be_bytes() {
            return Some(buf[3] & 0x0f);
        }
    }
}

/// Answers every UDP query with SERVFAIL, from a thread; stopped on drop.
struct ServFailStub {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServFailStub {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the SERVFAIL stub");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let port = socket.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = servfail_reply(&buf[..n]) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        ServFailStub {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ServFailStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The query's header and question with QR, RA and RCODE 2 set and every other
/// section dropped (including the query's EDNS record).
fn servfail_reply(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[4..6] != [0, 1] {
        return None;
    }
    let mut end = 12;
    loop {
        let len = *query.get(end)? as usize;
        end += 1 + len;
        if len == 0 {
            break;
        }
    }
    end += 4; // QTYPE, QCLASS
    let question = query.get(12..end)?;
    let mut reply = Vec::with_capacity(end);
    reply.extend_from_slice(&query[..2]);
    reply.push(0x80 | (query[2] & 0x79)); // QR, opcode and RD from the query
    reply.push(0x80 | 0x02); // RA, SERVFAIL
    reply.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    Some(reply)
}

/// A nameserver address that accepts packets and connections but never answers:
/// UDP queries and TCP connections both go unanswered until the client times out
/// (a closed port would instead be refused at once over TCP).
pub struct SilentNameserver {
    _udp: UdpSocket,
    _tcp: TcpListener,
    addr: SocketAddr,
}

impl SilentNameserver {
    pub fn start() -> Self {
        // Both sockets on one port; retried because the port is picked by UDP alone.
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr) {
                return SilentNameserver {
                    _udp: udp,
                    _tcp: tcp,
                    addr,
                };
            }
        }
        panic!("no port free for both UDP and TCP");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
