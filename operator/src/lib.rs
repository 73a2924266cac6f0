//! mailrelay-operator: reconciles `MailRelay` and `SendQuota` resources into running
//! relays and reports queue, delivery and quota status back on them.
//!
//! - [`crd`]: the resource types (the source of `crds/*.yaml`).
//! - [`resources`]: pure builders, MailRelay (+ SendQuotas) -> ConfigMap, Deployment,
//!   Services, PodDisruptionBudget, ServiceAccount. The ConfigMap payload is the
//!   relay's own config type rendered by [`render_relay_config`], so the operator and
//!   the relay can never disagree on it.
//! - [`reconcile`]: the controllers (server-side apply, status, events).
//! - [`status`]: queue and delivery summary read from the relay's queue store;
//!   [`quota_api`]: quota usage read from a relay's admin API.
//! - [`shaping`]: response-rule states (suspensions, throttles) from the queue
//!   store into MailRelay and SendQuota status and Events.
//! - [`claims`]: namespace claims, so overlapping installs never both reconcile.
//! - [`leader`]: Lease-based leader election; [`telemetry`]: `/metrics`, `/healthz`.

pub mod admin_token;
pub mod claims;
pub mod crd;
pub mod dkim;
pub mod leader;
pub mod quota_api;
pub mod reconcile;
pub mod resources;
pub mod shaping;
pub mod status;
pub mod telemetry;

pub mod images;
pub mod plugin;

use mailrelay::config::{ConfigError, RelayConfig};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("relay config is invalid: {0}")]
    Invalid(#[from] ConfigError),
    #[error("cannot serialise relay config: {0}")]
    Serialise(#[from] serde_norway::Error),
}

/// Renders a relay config as the YAML the relay reads (`mailrelay serve --config`).
/// The result is validated by parsing it back exactly as the relay will.
pub fn render_relay_config(cfg: &RelayConfig) -> Result<String, RenderError> {
    cfg.validate()?;
    let yaml = serde_norway::to_string(cfg)?;
    let back = RelayConfig::from_yaml(&yaml)?;
    debug_assert_eq!(&back, cfg);
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_config_round_trips_through_the_relay_parser() {
        let mut cfg = RelayConfig::from_yaml(
            "hostname: relay.example.com\nrelay_networks: [10.0.0.0/8]\nlimits: {max_recipients: 50, command_timeout: 2m}\nqueue: {redis: {url: 'redis://redis:6379'}}\n",
        )
        .unwrap();
        cfg.apply_env(|_| None).unwrap();
        let yaml = render_relay_config(&cfg).unwrap();
        assert!(yaml.contains("command_timeout: 2m"), "{yaml}");
        assert_eq!(RelayConfig::from_yaml(&yaml).unwrap(), cfg);
    }

    #[test]
    fn invalid_config_is_refused_with_the_field() {
        let mut cfg = RelayConfig::default();
        cfg.limits.max_recipients = 0;
        let e = render_relay_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("limits.max_recipients"), "{e}");
    }
}
