//! `sender_binding:`: which senders each AUTH user and relay network may use.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// Binds AUTH users and `relay_networks` clients to the senders they may use.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SenderBindingConfig {
    /// Refuse every sender of an AUTH user or relay-network client that has no
    /// binding (default: such clients may use any sender, as without this section).
    pub required: bool,
    /// Also check the addresses of the `From:` header after DATA.
    pub check_from_header: bool,
    /// User name to patterns: `a.example` / `*.a.example` (domain globs),
    /// `*@a.example` / `app@a.example` (address globs), `<>` (the null sender).
    pub users: std::collections::BTreeMap<String, Vec<String>>,
    /// The same for clients inside `relay_networks`; the most specific network wins.
    pub networks: Vec<NetworkSenders>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSenders {
    pub network: IpNet,
    pub senders: Vec<String>,
}

impl SenderBindingConfig {
    /// The plain data the SMTP session's sender policy is built from.
    pub fn binding(&self) -> mailrelay_smtp::sender::SenderBinding {
        mailrelay_smtp::sender::SenderBinding {
            required: self.required,
            check_from_header: self.check_from_header,
            users: self.users.clone(),
            networks: self
                .networks
                .iter()
                .map(|n| (n.network, n.senders.clone()))
                .collect(),
        }
    }

    pub(super) fn validate(&self, relay_networks: &[IpNet]) -> Result<(), ConfigError> {
        let check = |field: String, patterns: &[String]| {
            if patterns.is_empty() {
                return Err(invalid(field, "needs at least one sender pattern"));
            }
            for (i, p) in patterns.iter().enumerate() {
                let ok = p == mailrelay_smtp::sender::NULL_SENDER
                    || (!p.is_empty()
                        && !p.contains(['<', '>', ' ', ','])
                        && p.matches('@').count() <= 1);
                if !ok {
                    return Err(invalid(
                        format!("{field}[{i}]"),
                        format!("{p:?} is not a domain or address glob (or \"<>\")"),
                    ));
                }
            }
            Ok(())
        };
        for (user, patterns) in &self.users {
            check(format!("sender_binding.users.{user}"), patterns)?;
        }
        for (i, n) in self.networks.iter().enumerate() {
            check(format!("sender_binding.networks[{i}].senders"), &n.senders)?;
            // A binding for clients that may not relay would never apply.
            if !relay_networks.iter().any(|r| r.contains(&n.network)) {
                return Err(invalid(
                    format!("sender_binding.networks[{i}].network"),
                    format!("{} is not inside relay_networks", n.network),
                ));
            }
        }
        Ok(())
    }
}
