//! `auth:`: SMTP AUTH users and the brakes on password guessing.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::duration_str;
use super::{ConfigError, invalid};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File of `username:password` lines (a mounted Secret); re-read on change.
    pub users_file: PathBuf,
    /// Brakes on password guessing, shared by every relay on the same queue store.
    #[serde(default)]
    pub throttle: AuthThrottleConfig,
}

/// Failed AUTH attempts slow down and then lock out a client address (an IPv6
/// client's /64) and a user name, each counted on its own.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthThrottleConfig {
    /// Wait before checking an attempt after one earlier failure; doubles with each
    /// further failure of the address or user within `window`. 0 turns delays off.
    #[serde(with = "duration_str")]
    pub delay: Duration,
    #[serde(with = "duration_str")]
    pub max_delay: Duration,
    /// Failures within `window` that lock the address or the user out; 0 turns
    /// lockouts off.
    pub max_failures: u32,
    #[serde(with = "duration_str")]
    pub window: Duration,
    #[serde(with = "duration_str")]
    pub lockout: Duration,
}

impl Default for AuthThrottleConfig {
    fn default() -> Self {
        AuthThrottleConfig {
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_failures: 10,
            window: Duration::from_secs(15 * 60),
            lockout: Duration::from_secs(15 * 60),
        }
    }
}

impl AuthThrottleConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_delay < self.delay {
            return Err(invalid(
                "auth.throttle.max_delay",
                "must not be shorter than auth.throttle.delay",
            ));
        }
        if self.window.is_zero() {
            return Err(invalid("auth.throttle.window", "must be longer than 0"));
        }
        if self.max_failures > 0 && self.lockout.is_zero() {
            return Err(invalid("auth.throttle.lockout", "must be longer than 0"));
        }
        Ok(())
    }
}
