//! The `dkim:` section of the relay config (and the schema of `keys.yaml` in
//! `dkim.keys_dir`). Shape checks only; reading the key files is the loader's job
//! ([`super::keys`]), at startup and on every `keys_dir` reload.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to do with a message whose `From:` domain has no key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum UnsignedPolicy {
    /// Send it unsigned.
    #[default]
    Allow,
    /// Refuse it with `550 5.7.26`, naming the reason.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Algorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Canon {
    Simple,
    #[default]
    Relaxed,
}

impl Canon {
    pub fn as_str(self) -> &'static str {
        match self {
            Canon::Simple => "simple",
            Canon::Relaxed => "relaxed",
        }
    }
}

/// `header/body`, as in the `c=` tag (`relaxed/relaxed` by default; `simple` alone
/// means `simple/simple`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Canonicalization {
    pub header: Canon,
    pub body: Canon,
}

impl Canonicalization {
    pub fn tag(self) -> String {
        format!("{}/{}", self.header.as_str(), self.body.as_str())
    }
}

impl std::str::FromStr for Canonicalization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let one = |p: &str| match p.trim() {
            "simple" => Ok(Canon::Simple),
            "relaxed" => Ok(Canon::Relaxed),
            other => Err(format!(
                "unknown canonicalization {other:?} (use relaxed/relaxed, relaxed/simple, simple/relaxed or simple/simple)"
            )),
        };
        let (h, b) = s.split_once('/').unwrap_or((s, "simple"));
        Ok(Canonicalization {
            header: one(h)?,
            body: one(b)?,
        })
    }
}

impl<'de> Deserialize<'de> for Canonicalization {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Canonicalization {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.tag())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnsignedOverride {
    /// A domain glob: `*` matches any run of characters (`*.bank.example` matches
    /// every subdomain of bank.example, not bank.example itself).
    pub domain: String,
    pub policy: UnsignedPolicy,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorConfig {
    pub selector: String,
    pub algorithm: Algorithm,
    /// PKCS#8 PEM (RSA or Ed25519), or PKCS#1 PEM for RSA. Relative paths in
    /// `keys.yaml` are relative to `keys_dir`.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub domain: String,
    /// Mail from any subdomain (without an entry of its own) is signed with this
    /// domain's key (`d=` this domain, which DMARC's relaxed alignment accepts).
    #[serde(default)]
    pub include_subdomains: bool,
    pub selectors: Vec<SelectorConfig>,
}

/// The file `keys.yaml` in `keys_dir`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub domains: Vec<DomainConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    pub unsigned_policy: UnsignedPolicy,
    /// First match wins.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unsigned_overrides: Vec<UnsignedOverride>,
    pub canonicalization: Canonicalization,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_dir: Option<PathBuf>,
    /// How often `keys_dir` is looked at for a new key set.
    #[serde(with = "crate::config::duration::duration_str")]
    pub reload_interval: Duration,
    /// Whose key signs the DSNs the relay writes (default: the key their `From:`
    /// domain, the relay's hostname, selects).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounce_domain: Option<String>,
    /// Adds `x=` (signature expiry) this long after `t=`; zero (default) adds none.
    #[serde(
        default,
        with = "crate::config::duration::duration_str",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub expire_after: Duration,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            unsigned_policy: UnsignedPolicy::Allow,
            unsigned_overrides: Vec::new(),
            canonicalization: Canonicalization::default(),
            domains: Vec::new(),
            keys_dir: None,
            reload_interval: Duration::from_secs(5),
            bounce_domain: None,
            expire_after: Duration::ZERO,
        }
    }
}

/// An error naming the field it is about (`dkim.domains[0].selectors[1].key_file`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub(crate) fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// A DNS name as DKIM's `d=` needs it: LDH labels (A-labels for IDNs), at least
/// two labels, no trailing dot.
pub fn is_dns_name(d: &str) -> bool {
    d.len() <= 253
        && d.contains('.')
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A selector is one or more dot-separated LDH labels (RFC 6376 §3.1).
fn is_selector(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_glob(g: &str) -> bool {
    let plain = g.replace('*', "a");
    !g.is_empty() && (is_dns_name(&plain) || plain == "a")
}

/// Checks a list of domains (`prefix` is `dkim.domains` or `keys.yaml domains`).
pub fn validate_domains(prefix: &str, domains: &[DomainConfig]) -> Result<(), FieldError> {
    let mut seen = std::collections::HashSet::new();
    for (i, d) in domains.iter().enumerate() {
        let at = format!("{prefix}[{i}]");
        if !is_dns_name(&d.domain) {
            return Err(field_err(
                format!("{at}.domain"),
                format!(
                    "{:?} is not a valid DNS name (letters, digits and '-' in dot-separated labels; an IDN in its xn-- form)",
                    d.domain
                ),
            ));
        }
        if !seen.insert(d.domain.to_ascii_lowercase()) {
            return Err(field_err(
                format!("{at}.domain"),
                format!("{} is listed twice", d.domain),
            ));
        }
        if d.selectors.is_empty() {
            return Err(field_err(
                format!("{at}.selectors"),
                "at least one selector is needed",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (j, s) in d.selectors.iter().enumerate() {
            let sat = format!("{at}.selectors[{j}]");
            if !is_selector(&s.selector) {
                return Err(field_err(
                    format!("{sat}.selector"),
                    format!("{:?} is not a valid selector (DNS labels)", s.selector),
                ));
            }
            if !names.insert(s.selector.to_ascii_lowercase()) {
                return Err(field_err(
                    format!("{sat}.selector"),
                    format!(
                        "selector clash: {} is used twice for {} (one selector names one key in DNS)",
                        s.selector, d.domain
                    ),
                ));
            }
            if s.key_file.as_os_str().is_empty() {
                return Err(field_err(format!("{sat}.key_file"), "must be set"));
            }
        }
    }
    Ok(())
}

/// Shape checks of the `dkim:` section (no file is read).
pub fn validate(cfg: &DkimConfig) -> Result<(), FieldError> {
    for (i, o) in cfg.unsigned_overrides.iter().enumerate() {
        if !is_glob(&o.domain) {
            return Err(field_err(
                format!("dkim.unsigned_overrides[{i}].domain"),
                format!(
                    "{:?} is not a domain glob like \"*.bank.example\"",
                    o.domain
                ),
            ));
        }
    }
    validate_domains("dkim.domains", &cfg.domains)?;
    if let Some(b) = &cfg.bounce_domain
        && !is_dns_name(b)
    {
        return Err(field_err(
            "dkim.bounce_domain",
            format!("{b:?} is not a valid DNS name"),
        ));
    }
    if cfg.reload_interval.is_zero() {
        return Err(field_err("dkim.reload_interval", "must be above zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> DkimConfig {
        serde_norway::from_str(y).unwrap()
    }

    #[test]
    fn contract_shape_parses() {
        let c = parse(
            r#"
unsigned_policy: reject
unsigned_overrides:
  - { domain: "*.bank.example", policy: allow }
canonicalization: simple/relaxed
domains:
  - domain: example.com
    include_subdomains: true
    selectors:
      - { selector: s2026a, algorithm: rsa-sha256, key_file: /k/a.pem }
      - { selector: s2026e, algorithm: ed25519-sha256, key_file: /k/e.pem }
keys_dir: /etc/mailrelay/dkim
bounce_domain: relay.example.com
"#,
        );
        assert_eq!(c.unsigned_policy, UnsignedPolicy::Reject);
        assert_eq!(c.canonicalization.header, Canon::Simple);
        assert_eq!(c.canonicalization.body, Canon::Relaxed);
        assert_eq!(
            c.domains[0].selectors[1].algorithm,
            Algorithm::Ed25519Sha256
        );
        validate(&c).unwrap();
        assert_eq!(
            DkimConfig::default().canonicalization.tag(),
            "relaxed/relaxed"
        );
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let mut c = parse(
            "domains: [{domain: example.com, selectors: [{selector: a, algorithm: rsa-sha256, key_file: a.pem}]}]",
        );
        c.domains[0].domain = "exa mple.com".into();
        let e = validate(&c).unwrap_err();
        assert_eq!(e.field, "dkim.domains[0].domain");
        assert!(e.message.contains("not a valid DNS name"), "{e}");

        c.domains[0].domain = "example.com".into();
        let again = c.domains[0].selectors[0].clone();
        c.domains[0].selectors.push(again);
        let e = validate(&c).unwrap_err();
        assert_eq!(e.field, "dkim.domains[0].selectors[1].selector");
        assert!(e.message.contains("selector clash"), "{e}");

        let e = serde_norway::from_str::<DkimConfig>(
            "domains: [{domain: example.com, selectors: [{selector: a, algorithm: rsa-sha1, key_file: a.pem}]}]",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `rsa-sha1`"), "{e}");

        let e = "relaxed/loose".parse::<Canonicalization>().unwrap_err();
        assert!(e.contains("loose"));

        let mut c = DkimConfig::default();
        c.unsigned_overrides.push(UnsignedOverride {
            domain: "bad domain".into(),
            policy: UnsignedPolicy::Reject,
        });
        assert_eq!(
            validate(&c).unwrap_err().field,
            "dkim.unsigned_overrides[0].domain"
        );
    }
}
