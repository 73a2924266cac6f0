//! Where mail for a domain goes: MX resolution (RFC 5321 §5.1, RFC 7505).
//!
//! The ordering rules are pure functions ([`order_mx`], [`route_mx`]) so they can be
//! tested without DNS; [`MxResolver`] does the lookups with hickory and turns every
//! DNS outcome into a [`Resolution`] the delivery scheduler can act on directly:
//! deliver, bounce, or defer.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use rand::Rng;
use rand::seq::SliceRandom;
// Re-exported: the integration tests build resolvers from this path.
pub use crate::config::ResolverConfig;
use tokio::task::JoinSet;

/// The SMTP port (RFC 5321 §4.5.4.2) used unless [`ResolverConfig::port_override`] says
/// otherwise.
pub const SMTP_PORT: u16 = 25;

/// At most this many MX hosts (the most preferred ones) are resolved to addresses.
/// A domain can publish hundreds of MX records; resolving them all would let one
/// hostile zone make every delivery attempt cost hundreds of queries, and no real
/// delivery gets past the first few hosts anyway (Postfix stops at 5 addresses).
pub const MAX_MX_HOSTS: usize = 10;

/// One host to try, with every address it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Exchange name in lower-case ASCII (A-labels), without the trailing dot; for an
    /// implicit MX the domain itself, for an address literal the literal as given.
    pub name: String,
    pub preference: u16,
    /// IPv4 addresses first, then IPv6, each family shuffled; port 25 or the override.
    pub addrs: Vec<SocketAddr>,
    /// True when the domain has no MX records and this is the domain's own A/AAAA
    /// (RFC 5321 §5.1 "implicit MX"), or an address literal.
    pub implicit: bool,
}

/// What the delivery scheduler does with a recipient domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Try these hosts in order (never empty).
    Hosts(Vec<MxHost>),
    /// The domain publishes a null MX (RFC 7505): it accepts no mail. Bounce at once
    /// (`5.1.10`).
    NullMx,
    /// NXDOMAIN, a name that cannot exist (invalid syntax or address literal), or a
    /// domain that exists but has neither MX nor address records, so there is no
    /// implicit MX either (RFC 5321 §5.1: "MUST be reported as an error"). Bounce
    /// (`5.1.2`).
    NoSuchDomain,
    /// The most preferred MX host is this relay itself (RFC 5321 §5.1); delivering
    /// would loop. A configuration error on the receiving side: bounce (`5.4.6`, as
    /// Postfix's "mail for ... loops back to myself").
    LoopsToSelf,
    /// SERVFAIL, REFUSED, a timeout, or no MX host with an address: defer and retry
    /// (`4.4.3`). The text says which lookup failed and how.
    TempFail(String),
}

/// What the MX records say before any address is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `(preference, exchange)` in the order to try. Empty only when there were no
    /// records at all: the caller then falls back to the implicit MX.
    Hosts(Vec<(u16, String)>),
    /// Only exchanges of `.`: RFC 7505 null MX.
    NullMx,
    /// A local name was the most preferred exchange.
    LoopsToSelf,
}

/// Orders MX exchanges: ascending preference, random order among equal preference
/// (RFC 5321 §5.1, so load spreads over equal hosts), each name once. Names are
/// lower-cased and lose their trailing dot.
pub fn order_mx(records: Vec<(u16, String)>, rng: &mut impl Rng) -> Vec<String> {
    order_records(records, rng)
        .into_iter()
        .map(|(_, host)| host)
        .collect()
}

/// Applies the MX rules that can refuse delivery outright, then orders what is left:
///
/// - only `.` exchanges → [`Route::NullMx`]. RFC 7505 allows exactly one such record;
///   a `.` next to real exchanges is ignored (nothing listens at the root), so a
///   misconfigured domain still gets its mail.
/// - a name in `local_names` (this relay's own hostnames) is dropped together with
///   every exchange of equal or higher preference value (RFC 5321 §5.1), so a backup
///   MX never hands mail to an equal or worse host and loops; nothing left →
///   [`Route::LoopsToSelf`].
pub fn route_mx(records: Vec<(u16, String)>, local_names: &[String], rng: &mut impl Rng) -> Route {
    if records.is_empty() {
        return Route::Hosts(Vec::new());
    }
    let mut hosts: Vec<(u16, String)> = records
        .into_iter()
        .map(|(pref, host)| (pref, normalize_host(&host)))
        .filter(|(_, host)| !host.is_empty())
        .collect();
    if hosts.is_empty() {
        return Route::NullMx;
    }
    let local: HashSet<String> = local_names.iter().map(|n| normalize_host(n)).collect();
    if let Some(own) = hosts
        .iter()
        .filter(|(_, host)| local.contains(host))
        .map(|(pref, _)| *pref)
        .min()
    {
        hosts.retain(|(pref, _)| *pref < own);
        if hosts.is_empty() {
            return Route::LoopsToSelf;
        }
    }
    Route::Hosts(order_records(hosts, rng))
}

fn order_records(records: Vec<(u16, String)>, rng: &mut impl Rng) -> Vec<(u16, String)> {
    let mut records: Vec<(u16, String)> = records
        .into_iter()
        .map(|(pref, host)| (pref, normalize_host(&host)))
        .collect();
    records.sort_by_key(|(pref, _)| *pref);
    for group in records.chunk_by_mut(|a, b| a.0 == b.0) {
        group.shuffle(rng);
    }
    // A host listed twice keeps its best (first) position only: trying it again
    // further down would repeat a connection that just failed.
    let mut seen = HashSet::new();
    records.retain(|(_, host)| seen.insert(host.clone()));
    records
}

/// Lower-case, no trailing dot: the form names are compared and shown in. The root
/// name `.` becomes the empty string.
fn normalize_host(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Parses `[192.0.2.1]` and `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3). `None`: not a
/// literal; `Some(None)`: a literal we cannot route (malformed, or a general
/// `[tag:...]` literal).
fn parse_address_literal(domain: &str) -> Option<Option<IpAddr>> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    // The "IPv6:" tag is case-insensitive like every ABNF literal string.
    let ip = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
            inner[5..].parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        }
        _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    Some(ip)
}

/// The domain as a fully qualified DNS name, IDNA-mapped (U-labels become A-labels,
/// via hickory's UTS #46 support), or `None` if it cannot be a domain name.
fn dns_name(domain: &str) -> Option<Name> {
    let bare = domain.strip_suffix('.').unwrap_or(domain);
    if bare.is_empty() {
        return None;
    }
    let mut name = Name::from_utf8(bare).ok()?;
    // Fully qualified, so the resolv.conf search list never applies: in a pod
    // (`ndots:5`, `search <ns>.svc.cluster.local ...`) `example.com` would otherwise
    // first be tried as `example.com.<ns>.svc.cluster.local`, and a wildcard there
    // would steer mail to the wrong place.
    name.set_fqdn(true);
    Some(name)
}

/// Addresses a connection must never be made to, whatever DNS says: connecting to
/// 0.0.0.0 or :: reaches this very machine on Linux, and multicast or broadcast
/// cannot carry TCP. Loopback stays allowed: tests and sidecar setups rely on it.
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// Outcome of the A + AAAA lookups for one name.
enum Addrs {
    Found(Vec<IpAddr>),
    /// Neither family has a usable record. `nxdomain`: the name does not exist at all.
    None {
        nxdomain: bool,
    },
    TempFail(String),
}

/// Resolves recipient domains to the hosts and addresses to deliver to.
///
/// Cheap to clone: clones share one answer cache (hickory's, honouring TTLs) and the
/// nameserver connections, so build one per process and hand clones to workers.
#[derive(Clone)]
pub struct MxResolver {
    resolver: TokioResolver,
    port: u16,
    local_names: Vec<String>,
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver")
            .field("port", &self.port)
            .field("local_names", &self.local_names)
            .finish_non_exhaustive()
    }
}

/// Building the resolver failed (only possible at startup).
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("cannot use the system DNS configuration (/etc/resolv.conf): {source}")]
    SystemConfig { source: NetError },
    #[error("no nameservers: none configured and none in /etc/resolv.conf")]
    NoNameservers,
    #[error("cannot build the DNS resolver: {source}")]
    Build { source: NetError },
}

/// A DNS resolver asking `nameservers`, or those of `/etc/resolv.conf` when none are
/// given; `tune` sets its timeout, attempts and caching. `/etc/hosts` is never
/// consulted. Shared with the operator's DNS checks of sending domains.
pub fn build_resolver(
    nameservers: &[SocketAddr],
    tune: impl FnOnce(&mut ResolverOpts),
) -> Result<TokioResolver, ResolverError> {
    build_resolver_with(nameservers, tune, None)
}

/// [`build_resolver`], validating DNSSEC from `anchor` when one is given (DANE).
pub fn build_resolver_with(
    nameservers: &[SocketAddr],
    tune: impl FnOnce(&mut ResolverOpts),
    anchor: Option<std::sync::Arc<hickory_resolver::proto::dnssec::TrustAnchors>>,
) -> Result<TokioResolver, ResolverError> {
    let (config, mut opts) = if nameservers.is_empty() {
        hickory_resolver::system_conf::read_system_conf()
            .map_err(|source| ResolverError::SystemConfig { source })?
    } else {
        let servers = nameservers
            .iter()
            .map(|addr| {
                // UDP first, TCP for truncated answers; both on the given port
                // (test resolvers do not listen on 53).
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        (
            HickoryConfig::from_name_servers(servers),
            ResolverOpts::default(),
        )
    };
    if config.name_servers().is_empty() {
        return Err(ResolverError::NoNameservers);
    }
    opts.use_hosts_file = ResolveHosts::Never;
    tune(&mut opts);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts);
    if let Some(anchor) = anchor {
        builder = builder.with_trust_anchor(anchor);
    }
    builder
        .build()
        .map_err(|source| ResolverError::Build { source })
}

impl MxResolver {
    /// Builds a resolver from `cfg`. Timeout and attempts from `cfg` apply even when
    /// the nameservers come from `/etc/resolv.conf`, so one config controls how long
    /// a delivery may wait on DNS. `/etc/hosts` is never consulted: mail routing
    /// follows DNS only, as Postfix's default `smtp_host_lookup = dns`.
    pub fn new(cfg: &ResolverConfig) -> Result<Self, ResolverError> {
        let resolver = build_resolver(&cfg.nameservers, |opts| {
            opts.timeout = cfg.timeout;
            // hickory counts retries after the first try; the config counts tries.
            opts.attempts = cfg.attempts.max(1) - 1;
        })?;
        Ok(MxResolver {
            resolver,
            port: cfg.port_override.unwrap_or(SMTP_PORT),
            local_names: Vec::new(),
        })
    }

    /// The resolver behind the MX lookups, for the other lookups of delivery
    /// (MTA-STS TXT records and policy hosts) on the same servers.
    pub fn dns(&self) -> &TokioResolver {
        &self.resolver
    }

    /// This relay's own names (its EHLO hostname and aliases). An MX list naming one
    /// of them is cut below it (see [`route_mx`]); an implicit MX naming one loops.
    pub fn with_local_names<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.local_names = names
            .into_iter()
            .map(|n| normalize_host(n.as_ref()))
            .filter(|n| !n.is_empty())
            .collect();
        self
    }

    /// Resolves a recipient domain (as it appears after `@`: a domain name, possibly
    /// with U-labels, or an address literal) to the hosts to try.
    pub async fn resolve(&self, domain: &str) -> Resolution {
        if let Some(literal) = parse_address_literal(domain) {
            return match literal {
                Some(ip) if usable(&ip) => Resolution::Hosts(vec![MxHost {
                    name: domain.to_owned(),
                    preference: 0,
                    addrs: vec![SocketAddr::new(ip, self.port)],
                    implicit: true,
                }]),
                _ => Resolution::NoSuchDomain,
            };
        }
        let Some(name) = dns_name(domain) else {
            return Resolution::NoSuchDomain;
        };
        let shown = normalize_host(&name.to_ascii());

        let records: Vec<(u16, String)> = match self.resolver.mx_lookup(name.clone()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => return Resolution::NoSuchDomain,
            // NOERROR without MX records (NODATA): the implicit MX applies.
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Resolution::TempFail(format!("MX lookup for {shown}: {e}")),
        };

        if records.is_empty() {
            return self.implicit_mx(name, shown).await;
        }
        // The RNG is not Send; it must be gone before the next await.
        let route = route_mx(records, &self.local_names, &mut rand::rng());
        match route {
            Route::NullMx => Resolution::NullMx,
            Route::LoopsToSelf => Resolution::LoopsToSelf,
            Route::Hosts(hosts) => self.resolve_exchanges(&shown, hosts).await,
        }
    }

    async fn implicit_mx(&self, name: Name, shown: String) -> Resolution {
        if self.local_names.contains(&shown) {
            return Resolution::LoopsToSelf;
        }
        match lookup_addrs(&self.resolver, name, &shown).await {
            Addrs::Found(ips) => Resolution::Hosts(vec![MxHost {
                name: shown,
                preference: 0,
                addrs: self.socket_addrs(ips),
                implicit: true,
            }]),
            Addrs::None { .. } => Resolution::NoSuchDomain,
            Addrs::TempFail(reason) => Resolution::TempFail(reason),
        }
    }

    /// Looks up all exchanges at once (A and AAAA each), keeps the order, and skips
    /// exchanges without an address.
    async fn resolve_exchanges(&self, domain: &str, hosts: Vec<(u16, String)>) -> Resolution {
        let hosts: Vec<(u16, String)> = hosts.into_iter().take(MAX_MX_HOSTS).collect();
        let mut tasks = JoinSet::new();
        for (index, (_, host)) in hosts.iter().enumerate() {
            let resolver = self.resolver.clone();
            let host = host.clone();
            tasks.spawn(async move {
                // Exchange names come from the wire as A-labels; from_ascii keeps them
                // exactly (no IDNA mapping, no STD3 rejection of odd but legal names).
                let outcome = match Name::from_ascii(format!("{host}.")) {
                    Ok(name) => lookup_addrs(&resolver, name, &host).await,
                    Err(_) => Addrs::None { nxdomain: true },
                };
                (index, outcome)
            });
        }
        let mut outcomes: Vec<Option<Addrs>> = hosts.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((index, outcome)) => outcomes[index] = Some(outcome),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Tasks are only cancelled when `tasks` is dropped, i.e. never here.
                Err(_) => {}
            }
        }

        let mut seen = HashSet::new();
        let mut found = Vec::new();
        let mut first_tempfail = None;
        let mut missing = Vec::new();
        for ((preference, host), outcome) in hosts.into_iter().zip(outcomes) {
            match outcome {
                Some(Addrs::Found(ips)) => {
                    // An address shared by two exchanges is tried once, with the
                    // better one: a second connection to it would fail the same way.
                    let ips: Vec<IpAddr> = ips.into_iter().filter(|ip| seen.insert(*ip)).collect();
                    if !ips.is_empty() {
                        found.push(MxHost {
                            name: host,
                            preference,
                            addrs: self.socket_addrs(ips),
                            implicit: false,
                        });
                    }
                }
                Some(Addrs::TempFail(reason)) => {
                    first_tempfail.get_or_insert(reason);
                }
                Some(Addrs::None { nxdomain: true }) | None => {
                    missing.push(format!("{host}: no such host"));
                }
                Some(Addrs::None { nxdomain: false }) => {
                    missing.push(format!("{host}: no A or AAAA records"));
                }
            }
        }
        if !found.is_empty() {
            return Resolution::Hosts(found);
        }
        // MX records exist but none leads anywhere. Postfix defers here rather than
        // bouncing: a half-updated zone is usually fixed within the queue lifetime.
        Resolution::TempFail(first_tempfail.unwrap_or_else(|| {
            format!(
                "no MX host of {domain} has an address ({})",
                missing.join("; ")
            )
        }))
    }

    fn socket_addrs(&self, ips: Vec<IpAddr>) -> Vec<SocketAddr> {
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect()
    }
}

/// A and AAAA for `name`, concurrently. Both families are kept, IPv4 first: cluster
/// egress is often IPv4-only, and a blackholed IPv6 route costs a whole connect
/// timeout before the client moves on. Within a family the order is shuffled so
/// multi-address hosts share the load.
async fn lookup_addrs(resolver: &TokioResolver, name: Name, shown: &str) -> Addrs {
    let (v4, v6) = tokio::join!(
        resolver.ipv4_lookup(name.clone()),
        resolver.ipv6_lookup(name)
    );
    let mut v4_ips = Vec::new();
    let mut v6_ips = Vec::new();
    let mut nxdomain = true;
    let mut tempfail = None;
    for (rtype, result) in [("A", v4), ("AAAA", v6)] {
        match result {
            Ok(lookup) => {
                nxdomain = false;
                for record in lookup.answers() {
                    match &record.data {
                        RData::A(a) => v4_ips.push(IpAddr::V4(a.0)),
                        RData::AAAA(aaaa) => v6_ips.push(IpAddr::V6(aaaa.0)),
                        // CNAMEs on the way to the address.
                        _ => {}
                    }
                }
            }
            Err(e) if e.is_nx_domain() => {}
            Err(e) if e.is_no_records_found() => nxdomain = false,
            Err(e) => {
                nxdomain = false;
                tempfail.get_or_insert_with(|| format!("{rtype} lookup for {shown}: {e}"));
            }
        }
    }
    let mut rng = rand::rng();
    v4_ips.shuffle(&mut rng);
    v6_ips.shuffle(&mut rng);
    let mut ips: Vec<IpAddr> = v4_ips.into_iter().chain(v6_ips).filter(usable).collect();
    let mut seen = HashSet::new();
    ips.retain(|ip| seen.insert(*ip));
    // An address in one family is enough to deliver; a failure in the other family
    // only matters when nothing was found.
    match (ips.is_empty(), tempfail) {
        (false, _) => Addrs::Found(ips),
        (true, Some(reason)) => Addrs::TempFail(reason),
        (true, None) => Addrs::None { nxdomain },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::time::Duration;

    fn recs(list: &[(u16, &str)]) -> Vec<(u16, String)> {
        list.iter().map(|(p, h)| (*p, h.to_string())).collect()
    }

    #[test]
    fn orders_by_preference() {
        let mut rng = StdRng::seed_from_u64(1);
        let order = order_mx(
            recs(&[(30, "c.example."), (10, "a.example."), (20, "B.Example.")]),
            &mut rng,
        );
        assert_eq!(order, ["a.example", "b.example", "c.example"]);
    }

    #[test]
    fn shuffles_within_equal_preference_only() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut firsts = HashSet::new();
        for _ in 0..200 {
            let order = order_mx(
                recs(&[(20, "z"), (10, "a"), (10, "b"), (10, "c"), (5, "first")]),
                &mut rng,
            );
            assert_eq!(order[0], "first");
            assert_eq!(order[4], "z");
            let mut middle = order[1..4].to_vec();
            firsts.insert(middle[0].clone());
            middle.sort();
            assert_eq!(middle, ["a", "b", "c"]);
        }
        assert_eq!(
            firsts.len(),
            3,
            "every equal-preference host comes first sometimes"
        );
    }

    #[test]
    fn duplicate_exchange_keeps_best_position() {
        let mut rng = StdRng::seed_from_u64(3);
        let order = order_mx(recs(&[(20, "a"), (10, "b"), (10, "A.")]), &mut rng);
        assert_eq!(order.len(), 2);
        assert_eq!(order.iter().filter(|h| *h == "a").count(), 1);
    }

    #[test]
    fn null_mx_only_when_no_real_exchange() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(route_mx(recs(&[(0, ".")]), &[], &mut rng), Route::NullMx);
        assert_eq!(route_mx(recs(&[(10, ".")]), &[], &mut rng), Route::NullMx);
        assert_eq!(
            route_mx(recs(&[(0, "."), (10, "mx.example.")]), &[], &mut rng),
            Route::Hosts(vec![(10, "mx.example".into())])
        );
        assert_eq!(route_mx(vec![], &[], &mut rng), Route::Hosts(vec![]));
    }

    #[test]
    fn own_name_cuts_equal_and_worse_exchanges() {
        let mut rng = StdRng::seed_from_u64(0);
        let local = vec!["Relay.Example.".to_string()];
        let route = route_mx(
            recs(&[
                (10, "primary.example"),
                (20, "relay.example."),
                (20, "peer.example"),
                (30, "worse.example"),
            ]),
            &local,
            &mut rng,
        );
        assert_eq!(route, Route::Hosts(vec![(10, "primary.example".into())]));
        assert_eq!(
            route_mx(
                recs(&[(10, "relay.example"), (20, "other.example")]),
                &local,
                &mut rng
            ),
            Route::LoopsToSelf
        );
    }

    #[test]
    fn address_literals() {
        assert_eq!(
            parse_address_literal("[127.0.0.1]"),
            Some(Some("127.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            parse_address_literal("[IPv6:::1]"),
            Some(Some("::1".parse().unwrap()))
        );
        assert_eq!(
            parse_address_literal("[ipv6:2001:db8::1]"),
            Some(Some("2001:db8::1".parse().unwrap()))
        );
        assert_eq!(parse_address_literal("[::1]"), Some(None));
        assert_eq!(parse_address_literal("[1.2.3]"), Some(None));
        assert_eq!(parse_address_literal("[x-tag:foo]"), Some(None));
        assert_eq!(parse_address_literal("example.com"), None);
        assert_eq!(parse_address_literal("[127.0.0.1"), None);
    }

    #[test]
    fn domain_names_become_fqdn_a_labels() {
        let name = dns_name("Bücher.Example").unwrap();
        assert!(name.is_fqdn());
        assert_eq!(name.to_ascii(), "xn--bcher-kva.example.");
        assert_eq!(dns_name("example.com.").unwrap().to_ascii(), "example.com.");
        assert!(dns_name("").is_none());
        assert!(dns_name(".").is_none());
        assert!(dns_name("bad..example").is_none());
    }

    #[test]
    fn unusable_addresses() {
        for bad in ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "ff02::1"] {
            assert!(!usable(&bad.parse().unwrap()), "{bad}");
        }
        for good in ["127.0.0.1", "::1", "192.0.2.1", "2001:db8::1"] {
            assert!(usable(&good.parse().unwrap()), "{good}");
        }
    }

    #[test]
    fn config_defaults_and_strictness() {
        let cfg: ResolverConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, ResolverConfig::default());
        let cfg: ResolverConfig = serde_json::from_str(
            r#"{"nameservers":["127.0.0.1:5353","[::1]:53"],"port_override":2525,"timeout":"1500ms","attempts":3}"#,
        )
        .unwrap();
        assert_eq!(cfg.nameservers.len(), 2);
        assert_eq!(cfg.port_override, Some(2525));
        assert_eq!(cfg.timeout, Duration::from_millis(1500));
        assert!(serde_json::from_str::<ResolverConfig>(r#"{"nameserver":[]}"#).is_err());
        assert!(
            serde_json::from_str::<ResolverConfig>(r#"{"nameservers":["127.0.0.1"]}"#).is_err(),
            "a nameserver needs its port"
        );
    }

    #[tokio::test]
    async fn literal_needs_no_dns() {
        // A nameserver address nothing listens on: any query would time out.
        let cfg = ResolverConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            port_override: Some(2525),
            timeout: Duration::from_millis(100),
            attempts: 1,
        };
        let resolver = MxResolver::new(&cfg).unwrap();
        assert_eq!(
            resolver.resolve("[IPv6:::1]").await,
            Resolution::Hosts(vec![MxHost {
                name: "[IPv6:::1]".into(),
                preference: 0,
                addrs: vec!["[::1]:2525".parse().unwrap()],
                implicit: true,
            }])
        );
        assert_eq!(
            resolver.resolve("[0.0.0.0]").await,
            Resolution::NoSuchDomain
        );
        assert_eq!(resolver.resolve("[1.2.3]").await, Resolution::NoSuchDomain);
        assert_eq!(resolver.resolve("a..b").await, Resolution::NoSuchDomain);
    }
}
