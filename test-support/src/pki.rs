//! A throw-away certificate authority and a server certificate signed by it, made
//! with openssl: what a `tls: required` client verifies against a configured CA
//! (webpki refuses a self-signed certificate used as an end entity).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA (`ca.pem`) and a leaf (`leaf.pem`, `leaf.key`) for `names` (DNS names, or
    /// IP addresses, which become IP SANs).
    pub fn new(names: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec![
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=Test CA",
        ];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        openssl(&ca, dir.path());
        let san = format!(
            "subjectAltName={}",
            names
                .iter()
                .map(|n| if n.parse::<std::net::IpAddr>().is_ok() {
                    format!("IP:{n}")
                } else {
                    format!("DNS:{n}")
                })
                .collect::<Vec<_>>()
                .join(",")
        );
        let subject = format!("/CN={}", names[0]);
        let mut leaf = vec!["req", "-x509", "-nodes", "-days", "1", "-subj", &subject];
        leaf.extend(["-CA", "ca.pem", "-CAkey", "ca.key"]);
        leaf.extend(ec);
        leaf.extend(["-addext", &san]);
        leaf.extend(["-addext", "basicConstraints=critical,CA:FALSE"]);
        leaf.extend(["-keyout", "leaf.key", "-out", "leaf.pem"]);
        openssl(&leaf, dir.path());
        Pki { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("leaf.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("leaf.key")
    }
}

fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("openssl must be installed: run .ci/install-deps");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
