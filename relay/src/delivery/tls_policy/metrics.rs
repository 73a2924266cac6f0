//! Metrics of published transport-security policies (MTA-STS) and TLS reports,
//! registered into the relay's registry ([`crate::metrics::Metrics::registry_mut`])
//! at start-up. Every label takes a fixed set of values.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type One = [(&'static str, &'static str); 1];
type Two = [(&'static str, &'static str); 2];

#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    sts_fetches: Family<One, Counter>,
    sts_cache: Family<One, Counter>,
    sts_failures: Family<One, Counter>,
    rpt_sessions: Family<Two, Counter>,
    rpt_reports: Family<One, Counter>,
    dane_hosts: Family<One, Counter>,
}

impl TlsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = TlsMetrics::default();
        registry.register(
            "mta_sts_policy_fetches",
            "MTA-STS policy fetches over HTTPS, by result (ok, failed: HTTP/TLS/DNS trouble or timeout, invalid: the body did not parse)",
            m.sts_fetches.clone(),
        );
        registry.register(
            "mta_sts_cache_lookups",
            "MTA-STS policy lookups by where the answer came from (memory: no DNS or HTTP; shared: another relay's fetch in the queue's Redis; dns: a TXT lookup was made)",
            m.sts_cache.clone(),
        );
        registry.register(
            "mta_sts_failures",
            "Sessions or destinations that failed an MTA-STS policy, by mode (enforce: the mail was held back; testing: delivered anyway)",
            m.sts_failures.clone(),
        );
        registry.register(
            "tls_report_sessions",
            "Outbound TLS sessions counted for TLS reports (RFC 8460), by policy type and result (success, failure)",
            m.rpt_sessions.clone(),
        );
        registry.register(
            "tls_reports",
            "TLS reports (RFC 8460) by outcome (sent: queued or POSTed, failed, not_requested: the domain publishes no usable _smtp._tls record)",
            m.rpt_reports.clone(),
        );
        registry.register(
            "dane_hosts",
            "MX and relay hosts looked at by DANE before connecting, by verdict (tlsa: usable records, matched in the handshake; unusable: TLS required, certificate unchecked; insecure, no_tlsa, unavailable: not a DANE host; failed: bogus or failed DNSSEC lookups, host not used)",
            m.dane_hosts.clone(),
        );
        m
    }

    pub fn dane_host(&self, said: &super::dane::HostDane) {
        use super::dane::HostDane;
        let verdict = match said {
            HostDane::Verify { .. } => "tlsa",
            HostDane::Mandatory { .. } => "unusable",
            HostDane::Skip("insecure") => "insecure",
            HostDane::Skip("no TLSA") => "no_tlsa",
            HostDane::Skip(_) => "unavailable",
            HostDane::Fail(_) => "failed",
        };
        self.dane_hosts.get_or_create(&[("verdict", verdict)]).inc();
    }

    pub fn sts_fetch(&self, result: &'static str) {
        self.sts_fetches.get_or_create(&[("result", result)]).inc();
    }

    pub fn sts_lookup(&self, source: &'static str) {
        self.sts_cache.get_or_create(&[("source", source)]).inc();
    }

    pub fn sts_failure(&self, mode: &'static str) {
        self.sts_failures.get_or_create(&[("mode", mode)]).inc();
    }

    pub fn report_session(&self, policy_type: &str, ok: bool) {
        let t = match policy_type {
            "sts" => "sts",
            "tlsa" => "tlsa",
            _ => "no-policy-found",
        };
        let r = if ok { "success" } else { "failure" };
        self.rpt_sessions
            .get_or_create(&[("policy_type", t), ("result", r)])
            .inc();
    }

    pub fn report(&self, outcome: &'static str) {
        self.rpt_reports.get_or_create(&[("result", outcome)]).inc();
    }
}
