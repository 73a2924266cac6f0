//! `admin:`: the admin HTTP listener (health, metrics, `/api/`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin HTTP (`/healthz`, `/readyz`, `/metrics`); `null` disables it.
    pub address: Option<SocketAddr>,
    /// A file holding the bearer token `/api/` requires (a mounted Secret: it is
    /// re-read when it changes). `MAILRELAY_ADMIN_TOKEN` works as well.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: Some("127.0.0.1:9325".parse().unwrap()),
            token_file: None,
        }
    }
}
