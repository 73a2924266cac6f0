//! Where mail goes. A destination is a recipient domain (its MX hosts), or a relay
//! host: a route of the transport map (`delivery.routes`, checked first) or the
//! smarthost. [`RouteTable`] and the destination keys are pure; [`Inner::targets`]
//! resolves a destination to the hosts to try.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::Inner;
use crate::config::{RemoteHost, TlsPolicy};
use crate::delivery::mx::Resolution;
use crate::delivery::smtp_client::{ClientConfig, ClientTls, Credentials};
use crate::delivery::tls_policy::{Decision, override_for};

/// Destination key of relay host `i` (a domain cannot contain `[`), followed by
/// the recipient domain when its mail travels on connections of its own (an
/// egress quota names it: see [`Pacing::names_domain`](crate::delivery::gate::Pacing::names_domain)).
pub(super) fn relay_key(i: usize, domain: Option<&str>) -> String {
    format!("[relay:{i}]{}", domain.unwrap_or(""))
}

pub(super) fn relay_index(dest: &str) -> Option<usize> {
    dest.strip_prefix("[relay:")?
        .split_once(']')?
        .0
        .parse()
        .ok()
}

/// The one recipient domain of a relay host destination, if it has one.
pub(super) fn relay_domain(dest: &str) -> Option<&str> {
    dest.strip_prefix("[relay:")?
        .split_once(']')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
}

/// The transport map: which route (by index in `delivery.routes`) a domain takes.
#[derive(Debug, Default)]
pub(super) struct RouteTable {
    exact: HashMap<String, usize>,
    /// By parent domain, for `.parent` patterns.
    parent: HashMap<String, usize>,
}

impl RouteTable {
    pub(super) fn new(routes: &[crate::config::RouteConfig]) -> Self {
        let mut t = RouteTable::default();
        for (i, r) in routes.iter().enumerate() {
            for d in r.normalized_domains() {
                match d.strip_prefix('.') {
                    Some(parent) => t.parent.insert(parent.to_owned(), i),
                    None => t.exact.insert(d, i),
                };
            }
        }
        t
    }

    /// The route for `domain` (lower case, no trailing dot): listed exactly, else the
    /// nearest parent listed as `.parent` (`.example.com` covers `a.b.example.com`,
    /// not `example.com` itself).
    fn route_of(&self, domain: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(domain) {
            return Some(i);
        }
        if self.parent.is_empty() {
            return None;
        }
        domain
            .match_indices('.')
            .find_map(|(at, _)| self.parent.get(&domain[at + 1..]).copied())
    }
}

/// A host mail is handed to directly, without an MX lookup: a route or the smarthost.
pub(super) struct RelayHost {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls_policy: TlsPolicy,
    pub(super) tls: ClientTls,
    pub(super) auth: Option<Credentials>,
}

impl RelayHost {
    /// `tls`: the client for the host's `ca_file`.
    pub(super) fn new(h: &RemoteHost, tls: ClientTls) -> Self {
        RelayHost {
            host: h.host.clone(),
            port: h.port,
            tls_policy: h.tls,
            tls,
            auth: h.username.as_ref().map(|u| Credentials {
                username: u.clone(),
                password: h.password.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
            }),
        }
    }
}

/// Where one connection is made: the name (for SNI and the attempt record) and address.
pub(super) type Target = (String, SocketAddr);

impl Inner {
    pub(super) fn destination_of(&self, address: &str) -> String {
        let domain = address
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let Some(i) = self.routes.route_of(&domain).or(self.smarthost) {
            let own = self.egress.names_domain(&domain);
            return relay_key(i, own.then_some(domain.as_str()));
        }
        domain
    }

    /// The hosts to try for `dest` and its transport security, or the final or
    /// temporary reply that ends it (with its metrics reason).
    /// `relax`: every message carries `TLS-Required: No` (RFC 8689 §5).
    pub(super) async fn targets(
        &self,
        dest: &str,
        relax: bool,
    ) -> Result<(Vec<Target>, ClientConfig, Decision), (mailrelay_smtp::Reply, &'static str)> {
        use mailrelay_smtp::Reply;
        let mut client = ClientConfig::new(self.hostname.clone());
        if let Some(r) = relay_index(dest).and_then(|i| self.relays.get(i)) {
            // A relay host is not an MX: no published policy names it, so `auto`
            // is opportunistic there.
            let decision = Decision::fixed(r.tls_policy);
            client.tls = decision.client;
            client.auth = r.auth.clone();
            // The system resolver, not the MX resolver: a relay host is often a
            // short cluster-internal name that needs resolv.conf's search list.
            let addrs = tokio::net::lookup_host((r.host.as_str(), r.port))
                .await
                .map_err(|e| {
                    let reply =
                        Reply::status(451, (4, 4, 3), format!("relay host {}: {e}", r.host));
                    (reply, "dns_tempfail")
                })?;
            return Ok((
                addrs.map(|a| (r.host.clone(), a)).collect(),
                client,
                decision,
            ));
        }
        match self.resolver.resolve(dest).await {
            Resolution::Hosts(hosts) => {
                let mut decision = self.tls_decision(dest).await;
                if relax {
                    decision = decision.relaxed();
                }
                client.tls = decision.client;
                let hosts = decision.filter_mx(hosts, |h| &h.name).map_err(|why| {
                    if let Some(m) = self.tls_metrics.get() {
                        m.sts_failure("enforce");
                    }
                    (Reply::status(451, (4, 7, 5), why), "mta_sts")
                })?;
                Ok((
                    hosts
                        .into_iter()
                        .flat_map(|h| h.addrs.into_iter().map(move |a| (h.name.clone(), a)))
                        .collect(),
                    client,
                    decision,
                ))
            }
            Resolution::NullMx => Err((
                Reply::status(
                    556,
                    (5, 1, 10),
                    format!("domain {dest} does not accept mail (null MX, RFC 7505)"),
                ),
                "null_mx",
            )),
            Resolution::NoSuchDomain => Err((
                Reply::status(
                    550,
                    (5, 1, 2),
                    format!("domain {dest} does not exist or has no mail server"),
                ),
                "nxdomain",
            )),
            Resolution::LoopsToSelf => Err((
                Reply::status(
                    554,
                    (5, 4, 6),
                    format!("mail for {dest} loops back to myself"),
                ),
                "loop",
            )),
            Resolution::TempFail(why) => Err((Reply::status(451, (4, 4, 3), why), "dns_tempfail")),
        }
    }
}

impl Inner {
    /// MX delivery to `dest`: a `delivery.tls_policies` entry, else `delivery.tls`;
    /// `auto` asks the domain's published policy.
    async fn tls_decision(&self, dest: &str) -> Decision {
        let configured = override_for(&self.cfg.tls_policies, dest).unwrap_or(self.cfg.tls);
        // An address literal has no domain to publish a policy.
        if configured != TlsPolicy::Auto || dest.starts_with('[') {
            return Decision::fixed(configured);
        }
        let mut d = Decision::from_sts(self.sts.lookup(dest).await);
        // Each MX host's TLSA records are asked first, and win (RFC 8461 §2).
        d.dane = true;
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_exact_domains_then_the_nearest_parent() {
        let cfg = crate::config::RelayConfig::from_yaml(
            "delivery: {routes: [\
             {domains: [example.com, .example.com], host: a}, \
             {domains: [.deep.example.com], host: b}, \
             {domains: [Other.TEST.], host: c}]}",
        )
        .unwrap();
        let t = RouteTable::new(&cfg.delivery.routes);
        for (domain, want) in [
            ("example.com", Some(0)),
            ("x.example.com", Some(0)),
            ("x.deep.example.com", Some(1)),
            ("deep.example.com", Some(0)),
            ("a.b.deep.example.com", Some(1)),
            ("other.test", Some(2)),
            ("x.other.test", None),
            ("notexample.com", None),
            ("com", None),
        ] {
            assert_eq!(t.route_of(domain), want, "{domain}");
        }
        assert_eq!(relay_index(&relay_key(7, None)), Some(7));
        assert_eq!(relay_index(&relay_key(7, Some("a.test"))), Some(7));
        assert_eq!(relay_domain(&relay_key(7, Some("a.test"))), Some("a.test"));
        assert_eq!(relay_domain(&relay_key(7, None)), None);
        assert_eq!(relay_domain("a.test"), None);
        assert_eq!(relay_index("example.com"), None);
    }
}
