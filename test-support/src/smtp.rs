//! A raw SMTP client for exact-byte tests, and reading reply codes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A raw SMTP connection for exact-byte tests: what we send is what goes on the wire.
pub struct SmtpConn {
    reader: BufReader<TcpStream>,
    pub greeting: String,
}

impl SmtpConn {
    /// One transaction from `from` to `to` with `content` (header and body, without
    /// the final dot); returns the final reply, or the first refusal (after an RSET
    /// when a transaction was open).
    pub fn transaction(&mut self, from: &str, to: &str, content: &str) -> String {
        let steps = [
            (format!("MAIL FROM:<{from}>"), 250),
            (format!("RCPT TO:<{to}>"), 250),
            ("DATA".to_owned(), 354),
        ];
        for (i, (line, want)) in steps.iter().enumerate() {
            let r = self.cmd(line);
            if code(&r) != *want {
                if i > 0 {
                    self.cmd("RSET");
                }
                return r;
            }
        }
        self.send(format!("{content}\r\n.\r\n").as_bytes());
        self.reply()
    }
}

impl SmtpConn {
    pub fn connect(addr: SocketAddr) -> SmtpConn {
        let s = TcpStream::connect(addr).expect("connect relay");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = SmtpConn {
            reader: BufReader::new(s),
            greeting: String::new(),
        };
        c.greeting = c.reply();
        c
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// Reads one full (possibly multi-line) reply; empty string on EOF.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    /// Sends one command line (CRLF added) and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Whether the server has closed the connection (reads to EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok()
    }
}

/// The reply code at the start of a reply.
pub fn code(reply: &str) -> u16 {
    reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
}

impl SmtpConn {
    /// Connects, sends `preamble` (a PROXY protocol header, say) before anything is
    /// read, then reads the greeting.
    pub fn connect_after(addr: SocketAddr, preamble: &[u8]) -> SmtpConn {
        let mut s = TcpStream::connect(addr).expect("connect relay");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(preamble).unwrap();
        let mut c = SmtpConn {
            reader: BufReader::new(s),
            greeting: String::new(),
        };
        c.greeting = c.reply();
        c
    }

    /// Everything that arrives within `wait` (plus what is already buffered), without
    /// waiting for a complete reply: shows stray or missing replies.
    pub fn arrived_within(&mut self, wait: Duration) -> Vec<u8> {
        let mut out = self.reader.buffer().to_vec();
        self.reader.consume(out.len());
        let s = self.reader.get_mut();
        s.set_read_timeout(Some(wait)).unwrap();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        out
    }

    /// The socket, for a TLS handshake after `220` to STARTTLS. Panics if the server
    /// sent anything after the last reply read (it must not, before the handshake).
    pub fn into_tcp(self) -> TcpStream {
        assert!(
            self.reader.buffer().is_empty(),
            "unread bytes before the TLS handshake: {:?}",
            String::from_utf8_lossy(self.reader.buffer())
        );
        self.reader.into_inner()
    }
}
