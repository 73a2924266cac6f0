//! The Redis queue's compact envelope encoding: length-prefixed fields in a fixed
//! order, no field names, no id (the key names it). About 100 bytes for a
//! one-recipient message where the JSON was about 300, and the envelope is stored
//! twice per message's life (queued, then in the final record), so this is most
//! of what the layout saves in Redis memory (bench/redis-cost.sh).
//!
//! Every struct is taken apart field by field with no `..`, so a field added to
//! the envelope types fails to compile here until it is encoded. A leading `{`
//! means JSON (what the layout before 2026-12 stored, and what a move from it
//! carries over): [`decode`] reads both.

use std::net::IpAddr;

use crate::queue::{
    BodyType, ClientInfo, DsnNotify, DsnRet, Envelope, MailParams, QueueId, Recipient, TlsInfo,
};

/// First byte of this encoding (JSON starts with `{`).
const VERSION: u8 = 1;

pub(crate) fn encode(env: &Envelope) -> Vec<u8> {
    let Envelope {
        id: _,
        mail,
        recipients,
        client,
        received_at_ms,
        received_by,
    } = env;
    let MailParams {
        from,
        size,
        body,
        smtputf8,
        ret,
        envid,
        requiretls,
    } = mail;
    let mut out = Vec::with_capacity(96 + 32 * recipients.len());
    out.push(VERSION);
    put_str(&mut out, from);
    put_u64(&mut out, size.map_or(0, |s| s.saturating_add(1)));
    out.push(match body {
        BodyType::SevenBit => 0,
        BodyType::EightBitMime => 1,
        BodyType::BinaryMime => 2,
    });
    let ret = match ret {
        None => 0,
        Some(DsnRet::Full) => 1,
        Some(DsnRet::Hdrs) => 2,
    };
    out.push(u8::from(*smtputf8) | u8::from(*requiretls) << 1 | ret << 2);
    put_opt(&mut out, envid.as_deref());
    put_u64(&mut out, recipients.len() as u64);
    for Recipient {
        address,
        notify,
        orcpt,
    } in recipients
    {
        put_str(&mut out, address);
        out.push(match notify {
            None => 0,
            Some(DsnNotify {
                never,
                success,
                failure,
                delay,
            }) => {
                0x10 | u8::from(*never)
                    | u8::from(*success) << 1
                    | u8::from(*failure) << 2
                    | u8::from(*delay) << 3
            }
        });
        put_opt(&mut out, orcpt.as_deref());
    }
    let ClientInfo {
        ip,
        port,
        helo,
        auth_user,
        tls,
        listener,
    } = client;
    match ip {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&port.to_le_bytes());
    put_str(&mut out, helo);
    put_opt(&mut out, auth_user.as_deref());
    match tls {
        None => out.push(0),
        Some(TlsInfo { version, cipher }) => {
            out.push(1);
            put_str(&mut out, version);
            put_str(&mut out, cipher);
        }
    }
    put_str(&mut out, listener);
    put_u64(&mut out, *received_at_ms);
    put_str(&mut out, received_by);
    out
}

/// The envelope of message `id` from [`encode`]'s bytes, or from JSON.
pub(crate) fn decode(id: &QueueId, bytes: &[u8]) -> Result<Envelope, String> {
    match bytes.first() {
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Some(&VERSION) => {
            let mut r = Reader { bytes, at: 1 };
            let env = r.envelope(id)?;
            if r.at != bytes.len() {
                return Err(format!("{} bytes left over", bytes.len() - r.at));
            }
            Ok(env)
        }
        other => Err(format!("unknown envelope encoding {other:?}")),
    }
}

fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// `None` as 0, else the length + 1 and the bytes.
fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            put_u64(out, s.len() as u64 + 1);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("overlong number at byte {}", self.at))
    }

    fn len(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64()?).map_err(|e| e.to_string())
    }

    fn str(&mut self) -> Result<String, String> {
        let n = self.len()?;
        let at = self.at;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| format!("not UTF-8 at byte {at}"))
    }

    fn opt(&mut self) -> Result<Option<String>, String> {
        match self.len()? {
            0 => Ok(None),
            n => {
                let at = self.at;
                String::from_utf8(self.take(n - 1)?.to_vec())
                    .map(Some)
                    .map_err(|_| format!("not UTF-8 at byte {at}"))
            }
        }
    }

    fn envelope(&mut self, id: &QueueId) -> Result<Envelope, String> {
        let from = self.str()?;
        let size = self.u64()?.checked_sub(1);
        let body = match self.byte()? {
            0 => BodyType::SevenBit,
            1 => BodyType::EightBitMime,
            2 => BodyType::BinaryMime,
            b => return Err(format!("unknown body type {b}")),
        };
        let flags = self.byte()?;
        let ret = match flags >> 2 {
            0 => None,
            1 => Some(DsnRet::Full),
            2 => Some(DsnRet::Hdrs),
            b => return Err(format!("unknown RET {b}")),
        };
        let envid = self.opt()?;
        let n = self.len()?;
        // Each recipient takes at least 3 bytes: a count past the end is corrupt.
        if n > self.bytes.len() {
            return Err(format!("{n} recipients in {} bytes", self.bytes.len()));
        }
        let mut recipients = Vec::with_capacity(n);
        for _ in 0..n {
            let address = self.str()?;
            let notify = match self.byte()? {
                0 => None,
                b if b & 0xf0 == 0x10 => Some(DsnNotify {
                    never: b & 1 != 0,
                    success: b & 2 != 0,
                    failure: b & 4 != 0,
                    delay: b & 8 != 0,
                }),
                b => return Err(format!("unknown NOTIFY {b}")),
            };
            let orcpt = self.opt()?;
            recipients.push(Recipient {
                address,
                notify,
                orcpt,
            });
        }
        let ip = match self.byte()? {
            4 => IpAddr::from(<[u8; 4]>::try_from(self.take(4)?).expect("4 bytes")),
            6 => IpAddr::from(<[u8; 16]>::try_from(self.take(16)?).expect("16 bytes")),
            b => return Err(format!("unknown address family {b}")),
        };
        let port = u16::from_le_bytes(<[u8; 2]>::try_from(self.take(2)?).expect("2 bytes"));
        let helo = self.str()?;
        let auth_user = self.opt()?;
        let tls = match self.byte()? {
            0 => None,
            1 => Some(TlsInfo {
                version: self.str()?,
                cipher: self.str()?,
            }),
            b => return Err(format!("unknown TLS flag {b}")),
        };
        let listener = self.str()?;
        let received_at_ms = self.u64()?;
        let received_by = self.str()?;
        Ok(Envelope {
            id: id.clone(),
            mail: MailParams {
                from,
                size,
                body,
                smtputf8: flags & 1 != 0,
                ret,
                envid,
                requiretls: flags & 2 != 0,
            },
            recipients,
            client: ClientInfo {
                ip,
                port,
                helo,
                auth_user,
                tls,
                listener,
            },
            received_at_ms,
            received_by,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Envelope {
        Envelope {
            id: QueueId::generate(),
            mail: MailParams {
                from: "sender+tag@example.test".into(),
                size: Some(12345),
                body: BodyType::BinaryMime,
                smtputf8: true,
                ret: Some(DsnRet::Hdrs),
                envid: Some("env-id-ü".into()),
                requiretls: true,
            },
            recipients: vec![
                Recipient {
                    address: "rcpt1@example.test".into(),
                    notify: Some(DsnNotify {
                        never: false,
                        success: true,
                        failure: true,
                        delay: false,
                    }),
                    orcpt: Some("rfc822;rcpt1@example.test".into()),
                },
                Recipient {
                    address: "ü@other.test".into(),
                    notify: Some(DsnNotify {
                        never: true,
                        success: false,
                        failure: false,
                        delay: true,
                    }),
                    orcpt: Some(String::new()),
                },
                Recipient {
                    address: "".into(),
                    notify: None,
                    orcpt: None,
                },
            ],
            client: ClientInfo {
                ip: "2001:db8::25".parse().unwrap(),
                port: 54321,
                helo: "client.example.test".into(),
                auth_user: Some("alice".into()),
                tls: Some(TlsInfo {
                    version: "TLSv1.3".into(),
                    cipher: "TLS13_AES_256_GCM_SHA384".into(),
                }),
                listener: "submission".into(),
            },
            received_at_ms: u64::MAX,
            received_by: "relay-0.example.test".into(),
        }
    }

    #[test]
    fn round_trips_every_field_and_reads_json() {
        let env = full();
        assert_eq!(decode(&env.id, &encode(&env)).unwrap(), env);
        let mut small = env.clone();
        small.mail = MailParams {
            from: String::new(),
            ..MailParams::default()
        };
        small.mail.size = Some(0);
        small.recipients.truncate(1);
        small.client.ip = "192.0.2.1".parse().unwrap();
        small.client.tls = None;
        small.client.auth_user = None;
        small.received_at_ms = 0;
        assert_eq!(decode(&small.id, &encode(&small)).unwrap(), small);
        // The old layout's JSON.
        let json = serde_json::to_vec(&env).unwrap();
        assert_eq!(decode(&env.id, &json).unwrap(), env);
    }

    #[test]
    fn is_small_and_refuses_damage() {
        let mut env = full();
        env.recipients.truncate(1);
        let packed = encode(&env);
        let json = serde_json::to_vec(&env).unwrap();
        assert!(
            packed.len() * 2 < json.len(),
            "{} vs {}",
            packed.len(),
            json.len()
        );
        for cut in 0..packed.len() {
            assert!(decode(&env.id, &packed[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = packed.clone();
        longer.push(0);
        assert!(decode(&env.id, &longer).is_err());
        assert!(decode(&env.id, &[9, 0]).is_err());
    }
}
