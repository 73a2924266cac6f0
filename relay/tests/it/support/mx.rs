//! A real receiving SMTP server for delivery tests: Python's aiosmtpd, scripted by
//! the recipient's local part and by a JSON config, recording what it receives.
//!
//! Scripting by local part: `rcptNNN@` gets reply NNN to RCPT (always); `laterN@`
//! gets `450` to its first N RCPTs, then `250`.
//!
//! Config keys (all optional): `host` (`127.0.0.1`; `::1` for IPv6), `port` (0: any
//! free one), `sleep` (seconds before every DATA reply), `no_ehlo` (refuse EHLO with
//! `502`, so clients fall back to HELO), `size` (SIZE limit), `smtputf8` (offer it;
//! default true), `cert` / `key` (offer STARTTLS), `tls_broken` (offer STARTTLS,
//! but fail every handshake), `require_starttls`, `auth`
//! (`{"user": .., "password": ..}`: offer AUTH and require it before MAIL),
//! `auth_require_tls` (default true; false offers AUTH in plain text too, as a trap),
//! `requiretls` (offer RFC 8689 REQUIRETLS inside TLS and accept the MAIL parameter,
//! recorded as `requiretls`).
//!
//! Records: every accepted message (`records()`), counts of connections and RSETs
//! (`stats()`), and every AUTH attempt (`auth_attempts()`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::python_server::{PythonServer, wait_for};

const SERVER: &str = r#"
import asyncio, base64, itertools, json, os, re, ssl, sys
from aiosmtpd.smtp import SMTP, AuthResult

cfg = json.loads(sys.argv[1])
seen = {}
stats = {"opened": 0, "active": 0, "max_active": 0, "rsets": 0}
ids = itertools.count(1)

def write_stats():
    tmp = cfg["stats"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, cfg["stats"])

def append(path, value):
    with open(path, "a") as f:
        f.write(json.dumps(value) + "\n")

class Server(SMTP):
    # connection_made runs again after STARTTLS (same connection): count it once.
    def connection_made(self, transport):
        if getattr(self, "conn_id", None) is None:
            self.conn_id = next(ids)
            stats["opened"] += 1
            stats["active"] += 1
            stats["max_active"] = max(stats["max_active"], stats["active"])
            write_stats()
        super().connection_made(transport)

    def connection_lost(self, exc):
        if not getattr(self, "lost", False):
            self.lost = True
            stats["active"] -= 1
            write_stats()
        super().connection_lost(exc)

    async def smtp_EHLO(self, arg):
        if cfg.get("no_ehlo"):
            await self.push("502 5.5.1 EHLO not implemented here")
            return
        await super().smtp_EHLO(arg)

    async def smtp_MAIL(self, arg):
        # aiosmtpd knows no REQUIRETLS: take it off before its parameter check.
        self.requiretls = False
        if cfg.get("requiretls") and arg and re.search(r"\sREQUIRETLS\b", arg, re.I):
            self.requiretls = True
            arg = re.sub(r"\s+REQUIRETLS\b", "", arg, flags=re.I)
        await super().smtp_MAIL(arg)

class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if cfg.get("requiretls") and session.ssl is not None:
            responses.insert(len(responses) - 1, "250-REQUIRETLS")
        return responses

    async def handle_RSET(self, server, session, envelope):
        stats["rsets"] += 1
        write_stats()
        return "250 2.0.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        m = re.search(r"rcpt(\d{3})@", address)
        if m:
            code = m.group(1)
            return f"{code} {code[0]}.1.1 scripted {code}"
        m = re.search(r"later(\d+)@", address)
        if m:
            seen[address] = seen.get(address, 0) + 1
            if seen[address] <= int(m.group(1)):
                return "450 4.2.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(cfg.get("sleep", 0))
        append(cfg["record"], {
            "conn": server.conn_id,
            "from": envelope.mail_from,
            "rcpts": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "content": base64.b64encode(envelope.original_content).decode(),
            "tls": session.ssl is not None,
            "auth": bool(session.authenticated),
            "esmtp": bool(session.extended_smtp),
            "helo": session.host_name,
            "requiretls": getattr(server, "requiretls", False),
        })
        return "250 2.0.0 OK queued"

def authenticator(server, session, envelope, mechanism, auth_data):
    append(cfg["auth_log"], {"mechanism": mechanism, "tls": session.ssl is not None})
    want = cfg["auth"]
    ok = (auth_data.login == want["user"].encode()
          and auth_data.password == want["password"].encode())
    return AuthResult(success=ok, handled=False)

kwargs = dict(
    hostname="mx.test",
    decode_data=False,
    enable_SMTPUTF8=cfg.get("smtputf8", True),
    data_size_limit=cfg.get("size", 33554432),
)
if cfg.get("cert"):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    if cfg.get("tls_broken"):
        # Only TLS 1.1 and older, which neither side may use any more: every
        # handshake fails, as with a badly configured or ancient server.
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    kwargs.update(tls_context=ctx, require_starttls=cfg.get("require_starttls", False))
if cfg.get("auth"):
    kwargs.update(authenticator=authenticator, auth_required=True,
                  auth_require_tls=cfg.get("auth_require_tls", True))

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Server(Handler(), **kwargs), cfg.get("host", "127.0.0.1"), cfg.get("port", 0))
    write_stats()
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"#;

/// One aiosmtpd process; killed on drop.
pub struct Mx {
    server: PythonServer,
    /// The port it listens on.
    pub port: u16,
}

impl Mx {
    /// Starts a server with `cfg` (see the module docs); panics if it cannot listen.
    pub fn start(mut cfg: Value) -> Mx {
        let dir = tempfile::tempdir().unwrap();
        cfg["record"] = json!(dir.path().join("received.jsonl"));
        cfg["stats"] = json!(dir.path().join("stats.json"));
        cfg["auth_log"] = json!(dir.path().join("auth.jsonl"));
        let server = PythonServer::start("aiosmtpd", dir, SERVER, &cfg);
        Mx {
            port: server.port,
            server,
        }
    }

    /// A plain server on `host:port` that sleeps `sleep_secs` before each DATA reply.
    pub fn plain(host: &str, port: u16, sleep_secs: f64) -> Mx {
        Mx::start(json!({"host": host, "port": port, "sleep": sleep_secs}))
    }

    /// Every message accepted so far, in order.
    pub fn records(&self) -> Vec<Value> {
        self.server.lines("received.jsonl")
    }

    /// Every AUTH attempt so far: `{"mechanism", "tls"}`.
    pub fn auth_attempts(&self) -> Vec<Value> {
        self.server.lines("auth.jsonl")
    }

    /// `{"opened", "active", "max_active", "rsets"}`: connections so far, open now,
    /// most open at once, and RSET commands.
    pub fn stats(&self) -> Value {
        let text = std::fs::read_to_string(self.server.dir.path().join("stats.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Waits (up to a minute) until `pred` holds for the records received so far;
    /// `log` is shown when it never does.
    pub fn wait_for(
        &self,
        what: &str,
        log: impl Fn() -> String,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        wait_for(what, "received", log, || self.records(), pred)
    }
}

/// The message content of a record, as the server received it.
pub fn content(rec: &Value) -> Vec<u8> {
    STANDARD.decode(rec["content"].as_str().unwrap()).unwrap()
}

/// The accepted recipients of a record.
pub fn rcpts(rec: &Value) -> Vec<String> {
    rec["rcpts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Distinct recipients over all records, sorted.
pub fn distinct_rcpts(recs: &[Value]) -> Vec<String> {
    let mut all: Vec<String> = recs.iter().flat_map(rcpts).collect();
    all.sort();
    all.dedup();
    all
}
