//! A real HTTPS webhook receiver: Python's `http.server` behind `ssl`, with a
//! certificate from a test CA made for the test. It checks each POST's signature
//! itself (HMAC-SHA256 over `id.timestamp.body`, the whole body, as the Standard
//! Webhooks scheme says, written independently of the relay's code) and the shape
//! of the body: one CloudEvents envelope (`application/cloudevents+json`,
//! `webhook-id` its `id`) or a batch (`application/cloudevents-batch+json`, a JSON
//! array, `webhook-id` the one `id` or `<first id>..<last id>`). It records every
//! request.
//!
//! Config: `fail_first` (answer `500` to the first N requests); the mode file
//! (`ok` or `fail`, read on every request) switches it to failing and back.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::python_server::{PythonServer, wait_for};

const SERVER: &str = r#"
import base64, hashlib, hmac, http.server, json, ssl, sys, threading, time
cfg = json.loads(sys.argv[1])
secret = cfg["secret"].encode()
lock = threading.Lock()
count = [0]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(n)
        wid = self.headers.get("webhook-id", "")
        ts = self.headers.get("webhook-timestamp", "0")
        sig = self.headers.get("webhook-signature", "")
        mac = hmac.new(secret, wid.encode() + b"." + ts.encode() + b"." + body, hashlib.sha256).digest()
        sig_ok = hmac.compare_digest(sig, "v1," + base64.b64encode(mac).decode()) and abs(time.time() - int(ts)) < 300
        with open(cfg["mode"]) as f:
            mode = f.read().strip()
        with lock:
            count[0] += 1
            status = 500 if mode == "fail" or count[0] <= cfg.get("fail_first", 0) else 200
            try:
                envelope = json.loads(body)
            except ValueError:
                envelope = None
            ctype = self.headers.get("content-type")
            if isinstance(envelope, list):
                ids = [e.get("id") for e in envelope]
                shape_ok = (ctype == "application/cloudevents-batch+json" and len(ids) > 0
                            and wid == (ids[0] if len(ids) == 1 else ids[0] + ".." + ids[-1]))
            else:
                shape_ok = (ctype == "application/cloudevents+json" and isinstance(envelope, dict)
                            and wid == envelope.get("id"))
            with open(cfg["log"], "a") as f:
                f.write(json.dumps({"status": status, "sig_ok": sig_ok, "shape_ok": shape_ok,
                                    "id": wid, "content_type": ctype,
                                    "envelope": envelope}) + "\n")
        self.send_response(status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", cfg.get("port", 0)), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cfg["cert"], cfg["key"])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", srv.server_address[1], flush=True)
srv.serve_forever()
"#;

pub const SECRET: &str = "whsec-test-0123456789abcdef";

pub struct Receiver {
    server: PythonServer,
    pub port: u16,
    pki: super::pki::Pki,
}

impl Receiver {
    /// Starts a receiver that answers `500` to its first `fail_first` requests.
    pub fn start(fail_first: u32) -> Receiver {
        let pki = super::pki::Pki::new(&["127.0.0.1"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mode"), "ok").unwrap();
        let cfg = json!({
            "secret": SECRET,
            "fail_first": fail_first,
            "mode": dir.path().join("mode"),
            "log": dir.path().join("log.jsonl"),
            "cert": pki.cert(),
            "key": pki.key(),
        });
        let server = PythonServer::start("webhook receiver", dir, SERVER, &cfg);
        Receiver {
            port: server.port,
            server,
            pki,
        }
    }

    /// Makes every later request fail (`true`) or succeed.
    pub fn set_failing(&self, failing: bool) {
        std::fs::write(
            self.server.dir.path().join("mode"),
            if failing { "fail" } else { "ok" },
        )
        .unwrap();
    }

    pub fn ca(&self) -> PathBuf {
        self.pki.ca()
    }

    /// One `webhooks:` entry for this receiver (YAML, indented as a list item),
    /// with the relay's default batching.
    pub fn config(&self, name: &str, tenants: &str) -> String {
        self.config_with(name, tenants, "")
    }

    /// [`Receiver::config`] with more keys of the entry (`extra`: YAML lines
    /// indented by four, e.g. `"    batch: {max_events: 1}\n"`).
    pub fn config_with(&self, name: &str, tenants: &str, extra: &str) -> String {
        format!(
            "  - name: {name}\n    url: https://127.0.0.1:{}/hook\n    secret: {SECRET}\n    \
             ca_file: '{}'\n    tenants: {tenants}\n    \
             retry: {{initial: 50ms, max: 400ms, max_attempts: 1000}}\n{extra}",
            self.port,
            self.ca().display()
        )
    }

    /// Every request so far: `{"status", "sig_ok", "shape_ok", "id",
    /// "content_type", "envelope"}` (`envelope`: one, or the array of a batch).
    pub fn requests(&self) -> Vec<Value> {
        self.server.lines("log.jsonl")
    }

    /// Events answered `200`, each once (by event ID), in the order received: a
    /// batch's events one by one, as if they had come alone.
    pub fn delivered(&self) -> Vec<Value> {
        let mut seen = std::collections::HashSet::new();
        self.requests()
            .into_iter()
            .filter(|r| r["status"] == 200)
            .flat_map(|r| match r["envelope"].clone() {
                Value::Array(batch) => batch,
                one => vec![one],
            })
            .filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_owned()))
            .collect()
    }

    /// Waits (up to 60 s) until `pred` holds for [`Receiver::delivered`].
    pub fn wait_for(
        &self,
        what: &str,
        log: impl Fn() -> String,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        wait_for(what, "delivered", log, || self.delivered(), pred)
    }
}
