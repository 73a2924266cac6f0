//! `runtime:`: how many threads run the relay's work.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// More would only add scheduling overhead: a thread per core is the most that helps.
pub const MAX_WORKER_THREADS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads that run SMTP sessions, deliveries and queue I/O. Absent:
    /// `TOKIO_WORKER_THREADS` if set, else one per CPU the process may use (a cgroup
    /// CPU limit counts). Where other busy processes share the cores, as many as
    /// the cores reserved for the relay cost less per message: each thread more
    /// means tasks handed between threads and threads woken from sleep
    /// (docs/capacity.md, "Worker threads").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
}

impl RuntimeConfig {
    pub fn is_default(&self) -> bool {
        *self == RuntimeConfig::default()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.worker_threads {
            Some(n) if n == 0 || n > MAX_WORKER_THREADS => Err(invalid(
                "runtime.worker_threads",
                format!("must be 1-{MAX_WORKER_THREADS}, not {n}"),
            )),
            _ => Ok(()),
        }
    }
}
