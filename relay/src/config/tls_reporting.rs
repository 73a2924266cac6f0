//! `tls_reporting:`: SMTP TLS reports (RFC 8460) about this relay's outbound TLS
//! sessions, sent to the domains that ask for them (see
//! `relay/src/delivery/tls_report/`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, duration_str, invalid, is_valid_hostname};

/// Off unless configured: a report speaks for an organisation (its name and a
/// contact go to third parties), so the operator has to say who that is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsReportingConfig {
    /// `false` keeps the section but records and sends nothing.
    pub enabled: bool,
    /// `organization-name` of every report (required).
    pub organization_name: String,
    /// `contact-info` of every report; default `postmaster@<submitter>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_info: Option<String>,
    /// The submitter domain (`TLS-Report-Submitter`, the report id's domain, the
    /// sender address's domain); default: `hostname`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submitter: Option<String>,
    /// Envelope and header sender of mailed reports; default
    /// `noreply-smtp-tls-reporting@<submitter>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The length of one report's date range, aligned on the Unix epoch (a day:
    /// UTC midnight to midnight). Shorter periods are for tests.
    #[serde(with = "duration_str")]
    pub period: Duration,
    /// Trust anchors for `https:` report receivers; default: `delivery.ca_file`,
    /// else the system store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// One `https:` POST must finish within this.
    #[serde(with = "duration_str")]
    pub post_timeout: Duration,
}

impl Default for TlsReportingConfig {
    fn default() -> Self {
        TlsReportingConfig {
            enabled: true,
            organization_name: String::new(),
            contact_info: None,
            submitter: None,
            from: None,
            period: Duration::from_secs(86_400),
            ca_file: None,
            post_timeout: Duration::from_secs(30),
        }
    }
}

impl TlsReportingConfig {
    /// The submitter domain, given the relay's `hostname`.
    pub fn submitter_or(&self, hostname: &str) -> String {
        self.submitter
            .as_deref()
            .unwrap_or(hostname)
            .trim_end_matches('.')
            .to_ascii_lowercase()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.organization_name.trim().is_empty() {
            return Err(invalid(
                "tls_reporting.organization_name",
                "is required: reports name the organisation that sends them",
            ));
        }
        if self.period < Duration::from_secs(1) {
            return Err(invalid("tls_reporting.period", "must be at least 1s"));
        }
        if self.period > Duration::from_secs(7 * 86_400) {
            return Err(invalid("tls_reporting.period", "must be at most 7d"));
        }
        if self.post_timeout.is_zero() {
            return Err(invalid(
                "tls_reporting.post_timeout",
                "must be greater than zero",
            ));
        }
        if let Some(s) = &self.submitter
            && !is_valid_hostname(s.trim_end_matches('.'))
        {
            return Err(invalid(
                "tls_reporting.submitter",
                format!("{s:?} is not a domain name"),
            ));
        }
        if let Some(f) = &self.from
            && !f
                .rsplit_once('@')
                .is_some_and(|(l, d)| !l.is_empty() && is_valid_hostname(d))
        {
            return Err(invalid(
                "tls_reporting.from",
                format!("{f:?} is not an address local@domain"),
            ));
        }
        if let Some(c) = &self.contact_info
            && (c.trim().is_empty() || c.contains(['\r', '\n']))
        {
            return Err(invalid(
                "tls_reporting.contact_info",
                "must be one non-empty line",
            ));
        }
        if self.organization_name.contains(['\r', '\n']) {
            return Err(invalid(
                "tls_reporting.organization_name",
                "must be one line",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigError, RelayConfig};

    fn field_of(yaml: &str) -> String {
        match RelayConfig::from_yaml(yaml) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{yaml}: {other:?}"),
        }
    }

    #[test]
    fn off_by_default_and_bad_fields_are_named() {
        assert!(
            RelayConfig::from_yaml("{}")
                .unwrap()
                .tls_reporting
                .is_none()
        );
        let c = RelayConfig::from_yaml(
            "tls_reporting: {organization_name: Example Org, period: 10s, submitter: Example.COM.}",
        )
        .unwrap();
        let t = c.tls_reporting.unwrap();
        assert!(t.enabled);
        assert_eq!(t.period, std::time::Duration::from_secs(10));
        assert_eq!(t.submitter_or("relay.test"), "example.com");
        for (yaml, field) in [
            ("tls_reporting: {}", "tls_reporting.organization_name"),
            (
                "tls_reporting: {organization_name: O, period: 0s}",
                "tls_reporting.period",
            ),
            (
                "tls_reporting: {organization_name: O, submitter: 'a b'}",
                "tls_reporting.submitter",
            ),
            (
                "tls_reporting: {organization_name: O, from: nobody}",
                "tls_reporting.from",
            ),
            (
                "tls_reporting: {organization_name: O, post_timeout: 0s}",
                "tls_reporting.post_timeout",
            ),
        ] {
            assert_eq!(field_of(yaml), field, "{yaml}");
        }
    }
}
