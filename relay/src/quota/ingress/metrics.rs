//! Quota metrics, registered into the relay's registry ([`crate::metrics::Metrics::registry_mut`]).
//!
//! The `quota` label takes quota names, which come from the config (validated to
//! at most 63 characters of `[A-Za-z0-9_.-]`), so the series are bounded by the
//! config, never by clients.

use std::borrow::Cow;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

type Label = [(&'static str, Cow<'static, str>); 1];

/// Results of a counter check.
pub const CHECK_RESULTS: &[&str] = &["allowed", "denied", "cached", "error"];

/// One check is one Redis round trip (or a map lookup embedded).
const CHECK_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Debug, Clone)]
pub struct QuotaMetrics {
    checks: Family<Label, Counter>,
    check_seconds: Histogram,
    rejections: Family<Label, Counter>,
    held: Family<Label, Counter>,
    deferrals: Family<Label, Counter>,
    released: Family<Label, Counter>,
}

fn quota(name: &str) -> Label {
    [("quota", Cow::Owned(name.to_owned()))]
}

impl QuotaMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = QuotaMetrics {
            checks: Family::default(),
            check_seconds: Histogram::new(CHECK_BUCKETS),
            rejections: Family::default(),
            held: Family::default(),
            deferrals: Family::default(),
            released: Family::default(),
        };
        registry.register(
            "quota_checks",
            "Quota counter checks, by result (allowed, denied, cached: refused from what this process last learned, error)",
            m.checks.clone(),
        );
        for r in CHECK_RESULTS {
            let _ = m.checks.get_or_create(&[("result", Cow::Borrowed(*r))]);
        }
        registry.register_with_unit(
            "quota_check",
            "Time of one quota check-and-charge against the counter store",
            Unit::Seconds,
            m.check_seconds.clone(),
        );
        registry.register(
            "quota_rejections",
            "SMTP commands or messages refused by an ingress quota (action reject), by quota",
            m.rejections.clone(),
        );
        registry.register(
            "quota_held",
            "Messages accepted and held by an ingress quota with action defer, by quota",
            m.held.clone(),
        );
        registry.register(
            "quota_deferrals",
            "Held messages sent back to wait because their quota window was full, by quota",
            m.deferrals.clone(),
        );
        registry.register(
            "quota_released",
            "Held messages released for delivery, by quota",
            m.released.clone(),
        );
        m
    }

    pub fn check(&self, result: &'static str, elapsed: Option<Duration>) {
        self.checks
            .get_or_create(&[("result", Cow::Borrowed(result))])
            .inc();
        if let Some(e) = elapsed {
            self.check_seconds.observe(e.as_secs_f64());
        }
    }

    pub fn rejected(&self, name: &str) {
        self.rejections.get_or_create(&quota(name)).inc();
    }

    pub fn held(&self, name: &str) {
        self.held.get_or_create(&quota(name)).inc();
    }

    pub fn deferred(&self, name: &str) {
        self.deferrals.get_or_create(&quota(name)).inc();
    }

    pub fn released(&self, name: &str) {
        self.released.get_or_create(&quota(name)).inc();
    }
}
