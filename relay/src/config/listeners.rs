//! `listeners:` and `tls:`: where the relay accepts SMTP and with which certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::duration_str;
use super::{ConfigError, invalid};

/// TLS mode of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum TlsMode {
    /// Plain SMTP; STARTTLS offered when a certificate is configured.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Implicit,
    /// Never TLS on this listener.
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Name used in logs, metrics and the stored client info.
    pub name: String,
    pub address: SocketAddr,
    pub tls: TlsMode,
    /// Expect a PROXY protocol v1 or v2 header first (behind a load balancer).
    pub proxy_protocol: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "smtp".into(),
            address: "127.0.0.1:2525".parse().unwrap(),
            tls: TlsMode::Starttls,
            proxy_protocol: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; re-read when the file changes.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often to check the files for changes.
    #[serde(default = "default_reload", with = "duration_str")]
    pub reload_interval: Duration,
}

fn default_reload() -> Duration {
    Duration::from_secs(10)
}

/// Names unique and non-empty; implicit TLS only with a certificate.
pub(super) fn validate(
    listeners: &[ListenerConfig],
    tls: Option<&TlsConfig>,
) -> Result<(), ConfigError> {
    if listeners.is_empty() {
        return Err(invalid("listeners", "at least one listener is required"));
    }
    let mut names = std::collections::HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        if l.name.is_empty() || !names.insert(&l.name) {
            return Err(invalid(
                format!("listeners[{i}].name"),
                "must be non-empty and unique",
            ));
        }
        if l.tls == TlsMode::Implicit && tls.is_none() {
            return Err(invalid(
                format!("listeners[{i}].tls"),
                "implicit TLS needs a certificate: set tls.cert_file and tls.key_file",
            ));
        }
    }
    Ok(())
}
