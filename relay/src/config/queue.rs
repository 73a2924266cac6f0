//! `queue:`: where accepted mail is stored (embedded file or Redis).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::duration_str;
pub use super::redis::RedisConfig;
use super::{ConfigError, invalid};

/// How long a backend keeps the status record of a message that reached a final
/// state, unless told otherwise (`queue.status_retention`). A day is enough to
/// answer "what happened to my mail from this morning" without letting records of
/// a busy relay take more Redis memory than its queue does.
pub const DEFAULT_STATUS_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// redb caches up to 1 GiB by default, so a relay's memory grew with every message it
/// ever handled until that ceiling; a queue's working set is the messages due soon,
/// and the OS page cache serves the rest of the file.
pub const DEFAULT_CACHE_SIZE: usize = 32 << 20;

fn is_default_cache_size(n: &usize) -> bool {
    *n == DEFAULT_CACHE_SIZE
}

/// Smallest `queue.cache_size` accepted.
pub const MIN_QUEUE_CACHE_SIZE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackendKind {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `embedded` (default when no Redis is configured) or `redis`.
    pub backend: Option<QueueBackendKind>,
    /// Directory of the embedded queue.
    pub path: PathBuf,
    /// A queue write slower than this answers `451 4.3.0`.
    #[serde(with = "duration_str")]
    pub write_timeout: Duration,
    pub redis: Option<RedisConfig>,
    /// How long the status record of a delivered or bounced message stays readable
    /// (`queue show`).
    #[serde(with = "duration_str")]
    pub status_retention: Duration,
    /// Memory the embedded queue may use to cache its file, in bytes; the relay's
    /// resident memory stays about this much above its baseline however many messages
    /// pass through. Ignored with Redis.
    #[serde(skip_serializing_if = "is_default_cache_size")]
    pub cache_size: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: None,
            path: PathBuf::from("./mailrelay-data"),
            write_timeout: Duration::from_secs(10),
            redis: None,
            status_retention: DEFAULT_STATUS_RETENTION,
            cache_size: DEFAULT_CACHE_SIZE,
        }
    }
}

impl QueueConfig {
    pub fn effective_backend(&self) -> QueueBackendKind {
        self.backend.unwrap_or(if self.redis.is_some() {
            QueueBackendKind::Redis
        } else {
            QueueBackendKind::Embedded
        })
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (field, d) in [
            ("queue.write_timeout", self.write_timeout),
            ("queue.status_retention", self.status_retention),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        if self.cache_size < MIN_QUEUE_CACHE_SIZE {
            return Err(invalid(
                "queue.cache_size",
                format!(
                    "{} bytes is below the minimum of {MIN_QUEUE_CACHE_SIZE} (1 MiB): \
                     every lookup would read the file",
                    self.cache_size
                ),
            ));
        }
        match (self.effective_backend(), &self.redis) {
            (QueueBackendKind::Redis, None) => Err(invalid(
                "queue.redis",
                "backend is redis but queue.redis.url is not set",
            )),
            (QueueBackendKind::Redis, Some(r)) => r.validate(),
            _ => Ok(()),
        }
    }
}
