//! Egress pacing metrics. Registered into the relay's registry with
//! [`EgressMetrics::register`] (prefix `mailrelay`):
//!
//! - `mailrelay_egress_paced_total{quota}`: messages granted a pacing slot.
//! - `mailrelay_egress_waits_total{reason}`: times a message or connection waited
//!   in-process (`slot`, `connection`, `in_flight`, `backoff`, `store`).
//! - `mailrelay_egress_postponed_total{reason}`: messages put back in the queue
//!   for later, unattempted (same reasons).
//! - `mailrelay_egress_connections_open{quota}`: connections this process holds
//!   under a quota's connection cap.
//! - `mailrelay_egress_rate_limited_total`: rate-limit replies (`421`, `4.7.x`)
//!   that backed a destination off.
//!
//! - `mailrelay_shaping_rule_hits_total{rule,action}`: replies a response rule
//!   matched.
//! - `mailrelay_shaping_active_states{action}`: response-rule states in force
//!   across the relays, as last listed (admin API / `mailrelay shaping`).
//!
//! Quota names are bounded by the configuration (1-63 characters of `[A-Za-z0-9._-]`),
//! so they are safe as label values.

use std::borrow::Cow;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Label = [(&'static str, Cow<'static, str>); 1];

/// Why egress held mail back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// The next pacing slot.
    Slot,
    /// A connection cap.
    Connection,
    /// Messages in flight fill a window until one reports its end.
    InFlight,
    /// The destination asked us to slow down.
    Backoff,
    /// The egress store did not answer.
    Store,
    /// A response rule suspended the tenant or the site.
    Suspended,
}

impl WaitReason {
    pub const ALL: [WaitReason; 6] = [
        WaitReason::Suspended,
        WaitReason::Slot,
        WaitReason::Connection,
        WaitReason::InFlight,
        WaitReason::Backoff,
        WaitReason::Store,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::Slot => "slot",
            WaitReason::Connection => "connection",
            WaitReason::InFlight => "in_flight",
            WaitReason::Backoff => "backoff",
            WaitReason::Store => "store",
            WaitReason::Suspended => "suspended",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EgressMetrics {
    paced: Family<Label, Counter>,
    waits: Family<Label, Counter>,
    postponed: Family<Label, Counter>,
    connections_open: Family<Label, Gauge>,
    rate_limited: Counter,
    rule_hits: Family<[(&'static str, Cow<'static, str>); 2], Counter>,
    active_states: Family<Label, Gauge>,
}

fn label(name: &'static str, value: &str) -> Label {
    [(name, Cow::Owned(value.to_owned()))]
}

impl EgressMetrics {
    /// Adds the egress families to `registry` (which should carry the `mailrelay`
    /// prefix). The handles stay shared, so recording works before and after.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "egress_paced",
            "Messages granted an egress pacing slot, by quota",
            self.paced.clone(),
        );
        registry.register(
            "egress_waits",
            "Times outbound mail waited in-process for egress limits, by reason",
            self.waits.clone(),
        );
        registry.register(
            "egress_postponed",
            "Messages put back in the queue unattempted by egress limits, by reason",
            self.postponed.clone(),
        );
        registry.register(
            "egress_connections_open",
            "Outbound connections this process holds under a quota's connection cap",
            self.connections_open.clone(),
        );
        registry.register(
            "egress_rate_limited",
            "Rate-limit replies (421, 4.7.x) that backed a destination off",
            self.rate_limited.clone(),
        );
        registry.register(
            "shaping_rule_hits",
            "Remote replies a response rule matched, by rule and action",
            self.rule_hits.clone(),
        );
        registry.register(
            "shaping_active_states",
            "Response-rule states in force across the relays (as last listed), by action",
            self.active_states.clone(),
        );
        for a in ["suspend", "throttle"] {
            let _ = self.active_states.get_or_create(&label("action", a));
        }
        // Every reason exists from the start: an empty family is not exposed at
        // all, and alerts on `rate(...{reason="store"})` must see the first wait.
        for why in WaitReason::ALL {
            let _ = self.waits.get_or_create(&label("reason", why.as_str()));
            let _ = self.postponed.get_or_create(&label("reason", why.as_str()));
        }
    }

    pub fn paced(&self, quota: &str) {
        self.paced.get_or_create(&label("quota", quota)).inc();
    }

    pub fn waited(&self, why: WaitReason) {
        self.waits
            .get_or_create(&label("reason", why.as_str()))
            .inc();
    }

    pub fn postponed(&self, why: WaitReason, messages: u64) {
        self.postponed
            .get_or_create(&label("reason", why.as_str()))
            .inc_by(messages);
    }

    pub fn connection_opened(&self, quota: &str) {
        self.connections_open
            .get_or_create(&label("quota", quota))
            .inc();
    }

    pub fn connection_closed(&self, quota: &str) {
        self.connections_open
            .get_or_create(&label("quota", quota))
            .dec();
    }

    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    pub fn rule_hit(&self, rule: &str, action: &'static str) {
        self.rule_hits
            .get_or_create(&[
                ("rule", Cow::Owned(rule.to_owned())),
                ("action", Cow::Borrowed(action)),
            ])
            .inc();
    }

    pub fn set_active_states(&self, states: &[super::ActiveState]) {
        for a in ["suspend", "throttle"] {
            let n = states
                .iter()
                .filter(|s| s.state.action.as_str() == a)
                .count();
            self.active_states
                .get_or_create(&label("action", a))
                .set(n as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_encode_under_the_relay_prefix() {
        let m = EgressMetrics::default();
        let mut r = Registry::with_prefix("mailrelay");
        m.register(&mut r);
        m.paced("gmail");
        m.paced("gmail");
        m.waited(WaitReason::Slot);
        m.postponed(WaitReason::Connection, 3);
        m.connection_opened("gmail");
        m.rate_limited();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for want in [
            "mailrelay_egress_paced_total{quota=\"gmail\"} 2",
            "mailrelay_egress_waits_total{reason=\"slot\"} 1",
            "mailrelay_egress_postponed_total{reason=\"connection\"} 3",
            "mailrelay_egress_connections_open{quota=\"gmail\"} 1",
            "mailrelay_egress_rate_limited_total 1",
            "mailrelay_egress_waits_total{reason=\"store\"} 0",
            "mailrelay_egress_postponed_total{reason=\"backoff\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
