//! Quota reload without a restart: on SIGHUP, and whenever the config file's
//! contents change (checked every [`POLL_INTERVAL`], or as set by the environment
//! variable `MAILRELAY_RELOAD_INTERVAL`, `0` for SIGHUP only; a Kubernetes
//! ConfigMap update swaps the file behind a symlink, which this sees too).
//!
//! The whole file is parsed and validated as at start-up; an invalid file is logged
//! and ignored, and the quotas and rules in force stay. Only `quotas:`,
//! `response_rules:` and `providers:` are applied: other changes need a restart
//! (and are logged as such). Counters are keyed by quota
//! name, so reloading never resets usage.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::ingress::engine::Quotas;
use crate::config::{ConfigError, RelayConfig};

/// How often the config file is read for changes, by default.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The poll interval from `MAILRELAY_RELOAD_INTERVAL` (a duration such as `500ms`
/// or `10s`); `None` when polling is off (`0`).
pub fn poll_interval(env: Option<&str>) -> Result<Option<Duration>, String> {
    match env.map(str::trim) {
        None | Some("") => Ok(Some(POLL_INTERVAL)),
        Some(v) => {
            let d = crate::config::parse_duration(v)
                .map_err(|e| format!("MAILRELAY_RELOAD_INTERVAL: {e}"))?;
            Ok((!d.is_zero()).then_some(d))
        }
    }
}

/// Parses a config file's text as `serve` does (environment overrides included).
pub fn parse(text: &[u8]) -> Result<RelayConfig, ConfigError> {
    let text = std::str::from_utf8(text).map_err(|e| ConfigError::Invalid {
        field: "(root)".into(),
        message: format!("not UTF-8: {e}"),
    })?;
    let mut cfg = RelayConfig::from_yaml(text)?;
    cfg.apply_env(|k| std::env::var(k).ok())?;
    Ok(cfg)
}

/// Applies a new file's quotas if it is valid; returns whether the quotas changed.
pub fn apply(quotas: &Quotas, running: &RelayConfig, text: &[u8], path: &str) -> bool {
    match parse(text) {
        Ok(cfg) => {
            let mut changed = quotas.reload(&cfg.effective_quotas());
            if changed {
                info!(file = path, quotas = cfg.quotas.len(), "quotas reloaded");
            }
            // Validated with the file; compiled here for the egress side. The file
            // changed (or SIGHUP): rules are cheap to put in force again.
            match (crate::shaping::Rules::from_config(&cfg), quotas.egress()) {
                (Ok(rules), Some(e)) => {
                    info!(file = path, rules = rules.len(), "response rules in force");
                    e.set_rules(rules);
                    changed = true;
                }
                (Ok(_), None) => {}
                (Err((f, m)), _) => {
                    warn!(file = path, field = %f, error = %m, "response rules invalid; keeping the rules in force");
                }
            }
            let mut rest = cfg;
            rest.quotas = running.quotas.clone();
            rest.response_rules = running.response_rules.clone();
            rest.providers = running.providers.clone();
            if &rest != running {
                info!(
                    file = path,
                    "config changes outside `quotas` take effect after a restart"
                );
            }
            changed
        }
        Err(e) => {
            warn!(file = path, error = %e, "config file is invalid; keeping the quotas in force");
            false
        }
    }
}

/// Starts watching `path` (if any) and SIGHUP. Must be called inside the runtime
/// before anything could send SIGHUP: the handler also keeps the signal from
/// terminating the process.
pub fn spawn(
    quotas: Arc<Quotas>,
    running: RelayConfig,
    path: Option<PathBuf>,
) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot handle SIGHUP; quotas reload on file changes only");
            None
        }
    };
    let poll = match poll_interval(std::env::var("MAILRELAY_RELOAD_INTERVAL").ok().as_deref()) {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, default = ?POLL_INTERVAL, "ignoring a bad reload interval");
            Some(POLL_INTERVAL)
        }
    };
    tokio::spawn(async move {
        let shown = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut last = match &path {
            Some(p) => tokio::fs::read(p).await.ok(),
            None => None,
        };
        loop {
            let forced = tokio::select! {
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                _ = async { match poll { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => false,
            };
            let Some(p) = &path else {
                if forced {
                    info!("SIGHUP: running without a config file; nothing to reload");
                }
                continue;
            };
            let text = match tokio::fs::read(p).await {
                Ok(t) => t,
                Err(e) => {
                    if forced || last.is_some() {
                        warn!(file = %shown, error = %e, "cannot read the config file; keeping the quotas in force");
                    }
                    last = None;
                    continue;
                }
            };
            if !forced && last.as_ref() == Some(&text) {
                continue;
            }
            if forced {
                info!(file = %shown, "SIGHUP: reloading quotas");
            }
            apply(&quotas, &running, &text, &shown);
            last = Some(text);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::ingress::memory::MemoryStore;
    use crate::quota::ingress::metrics::QuotaMetrics;

    #[test]
    fn poll_interval_from_the_environment() {
        assert_eq!(poll_interval(None), Ok(Some(POLL_INTERVAL)));
        assert_eq!(
            poll_interval(Some("500ms")),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(poll_interval(Some("0")), Ok(None));
        assert!(poll_interval(Some("soon")).is_err());
    }

    #[test]
    fn invalid_files_change_nothing() {
        let mut reg = prometheus_client::registry::Registry::default();
        let running =
            RelayConfig::from_yaml("quotas: [{name: a, direction: ingress, limits: [1/1m]}]\n")
                .unwrap();
        let q = Quotas::new(
            &running.quotas,
            Arc::new(MemoryStore::new()),
            QuotaMetrics::register(&mut reg),
            Duration::from_secs(1),
        );
        assert!(!apply(
            &q,
            &running,
            b"quotas: [{name: a, direction: ingress, limits: [0/1m]}]\n",
            "f"
        ));
        assert!(!apply(&q, &running, b"\xff\xfe", "f"));
        assert!(!apply(
            &q,
            &running,
            b"quotas: [{name: a, direction: ingress, limits: [1/1m]}]\n",
            "f"
        ));
        assert_eq!(q.configs(), running.quotas);
        assert!(apply(
            &q,
            &running,
            b"quotas: [{name: a, direction: ingress, limits: [2/1m]}, {name: b, direction: egress, limits: [5/1s]}]\n",
            "f"
        ));
        assert_eq!(q.configs().len(), 2);
        assert_eq!(q.configs()[0].limits[0].count, 2);
    }

    /// The egress side as reload sees it: records the rules put in force.
    #[derive(Default)]
    struct RulesSeen(std::sync::Mutex<Vec<usize>>);

    impl crate::quota::ingress::engine::EgressUsage for RulesSeen {
        fn usage<'a>(
            &'a self,
            _quota: &'a crate::quota::config::QuotaConfig,
            _key: Option<&'a str>,
        ) -> crate::quota::ingress::store::StoreFuture<'a, Vec<crate::quota::usage::KeyUsage>>
        {
            Box::pin(std::future::ready(Ok(Vec::new())))
        }

        fn set_rules(&self, rules: crate::shaping::Rules) {
            self.0.lock().unwrap().push(rules.len());
        }
    }

    #[test]
    fn a_bad_rules_reload_keeps_the_rules_in_force() {
        let mut reg = prometheus_client::registry::Registry::default();
        let running = RelayConfig::from_yaml("hostname: relay.test\n").unwrap();
        let q = Quotas::new(
            &running.quotas,
            Arc::new(MemoryStore::new()),
            QuotaMetrics::register(&mut reg),
            Duration::from_secs(1),
        );
        let seen = Arc::new(RulesSeen::default());
        q.set_egress_usage(Arc::clone(&seen) as Arc<dyn crate::quota::ingress::engine::EgressUsage>);
        let rule = |text: &str| {
            format!(
                "hostname: relay.test\nresponse_rules:\n  - name: r\n    destination: {{ mx_hosts: ['*.x.test'] }}\n    match: {{ codes: [421], text: '{text}' }}\n    action: suspend\n    duration: 1m\n"
            )
        };
        assert!(apply(&q, &running, rule("slow down").as_bytes(), "f"));
        assert_eq!(*seen.0.lock().unwrap(), [1]);
        // An invalid regex, an unknown preset, a duration out of range: nothing
        // changes.
        assert!(!apply(&q, &running, rule("(unclosed").as_bytes(), "f"));
        assert!(!apply(
            &q,
            &running,
            b"hostname: relay.test\nproviders: { presets: [nosuch] }\n",
            "f"
        ));
        assert!(!apply(
            &q,
            &running,
            rule("x").replace("1m", "8d").as_bytes(),
            "f"
        ));
        assert_eq!(*seen.0.lock().unwrap(), [1]);
        assert!(apply(
            &q,
            &running,
            b"hostname: relay.test\nproviders: { presets: [testprovider] }\n",
            "f"
        ));
        assert_eq!(*seen.0.lock().unwrap(), [1, 2]);
    }
}
