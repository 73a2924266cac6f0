//! `delivery:`: outbound delivery of queued mail — concurrency, leases, DNS, the
//! smarthost and routes, the retry schedule.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, invalid, is_valid_hostname};
use crate::config::duration::duration_str;

pub use mailrelay_smtp::client::TlsPolicy;

/// Default `delivery.lease`: short, because it is renewed while held, and it is how
/// long the mail a killed relay held waits before the others take it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Run delivery workers in this process; `false` makes a receive-only relay
    /// (another process delivers from the shared queue).
    pub enabled: bool,
    /// Outbound SMTP connections open at once, over all destinations.
    pub max_concurrency: usize,
    /// Outbound connections open at once to one destination (domain or smarthost).
    pub per_destination_concurrency: usize,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: usize,
    /// TCP connect timeout per address.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// How long a taken message stays ours without renewal. Delivery renews every
    /// lease it holds a third of this apart (one round trip for all of them), and
    /// takes only what its connections can send soon; a relay that dies loses its
    /// messages to the other relays after this (the failover time of held mail).
    #[serde(with = "duration_str")]
    pub lease: Duration,
    /// How often to look for due mail when the queue had none. Mail this relay
    /// queues itself is looked at sooner (see `wake_delay`); mail queued by other
    /// relays on the same Redis, and retries coming due, within this.
    #[serde(with = "duration_str")]
    pub poll_interval: Duration,
    /// When this relay queues mail while delivery is idle, delivery looks for it
    /// after this pause (instead of at the next poll), so that a burst is taken in
    /// batches of many messages per connection rather than one by one; `0s` looks
    /// at once.
    #[serde(with = "duration_str")]
    pub wake_delay: Duration,
    /// MX lookups.
    pub dns: ResolverConfig,
    /// Send everything through this host instead of the recipients' MX.
    pub smarthost: Option<RemoteHost>,
    /// Per-domain routes (a transport map): mail for these domains goes to the given
    /// host instead of their MX, and ahead of any smarthost.
    pub routes: Vec<RouteConfig>,
    /// STARTTLS policy towards MX hosts: `auto` (the default) follows what each
    /// domain publishes (MTA-STS) and is opportunistic where it publishes nothing.
    pub tls: TlsPolicy,
    /// Per recipient domain overrides of `tls` for MX delivery (first match wins).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_policies: Vec<TlsPolicyEntry>,
    /// PEM trust anchors for verified TLS (`required`, MTA-STS); default: the
    /// system store.
    pub ca_file: Option<PathBuf>,
    /// MTA-STS policy fetches (RFC 8461).
    pub mta_sts: MtaStsConfig,
    /// DANE TLSA lookups (RFC 7672).
    #[serde(skip_serializing_if = "DaneConfig::is_default")]
    pub dane: DaneConfig,
    /// When to retry deferred mail and when to give up.
    pub retry: RetryPolicy,
    /// How delivery outcomes are written to the queue while connections are open.
    pub outcome_batch: OutcomeBatchConfig,
}

/// `delivery.tls_policies[]`: the TLS policy of MX delivery to some domains.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPolicyEntry {
    /// `example.com` (that domain) or `.example.com` (every subdomain of it).
    pub domains: Vec<String>,
    pub tls: TlsPolicy,
}

/// `delivery.mta_sts`: how MTA-STS policies are fetched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtaStsConfig {
    /// PEM trust anchors for the policy hosts' HTTPS certificates; default:
    /// `delivery.ca_file`, else the system store.
    pub ca_file: Option<PathBuf>,
    /// The whole fetch (DNS, connect, TLS, response) must finish within this.
    #[serde(with = "duration_str")]
    pub fetch_timeout: Duration,
    /// Fetch from this port instead of 443. For tests; never set it in production.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_override: Option<u16>,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            ca_file: None,
            fetch_timeout: Duration::from_secs(20),
            port_override: None,
        }
    }
}

/// `delivery.dane`: DNSSEC-validated TLSA lookups for `tls: auto` and `tls: dane`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaneConfig {
    /// `false` leaves DANE out of `auto` (MTA-STS, then opportunistic); `tls: dane`
    /// is refused then.
    pub enabled: bool,
    /// DNSKEY and/or DS records (zone-file lines, `dig DS` output) to trust
    /// instead of the root KSKs: a private root, or a test root. The DNSKEY sets
    /// that DS records name are fetched at start-up and the keys they cover
    /// trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_anchor: Option<PathBuf>,
    /// Resolvers (`ip:port`) that pass DNSSEC records, asked for DANE lookups
    /// only; empty: `delivery.dns.nameservers`, else `/etc/resolv.conf`. Set it when
    /// the cluster resolver strips RRSIGs (see docs/transport-security.md).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<SocketAddr>,
}

impl DaneConfig {
    fn is_default(&self) -> bool {
        *self == DaneConfig::default()
    }
}

impl Default for DaneConfig {
    fn default() -> Self {
        DaneConfig {
            enabled: true,
            trust_anchor: None,
            nameservers: Vec::new(),
        }
    }
}

/// Outcomes (delivered, deferred, bounced) are written per message as their
/// transactions end, in batches of one queue round trip: a batch is written once it
/// holds `max_messages` or its first outcome waited `max_delay`, whichever comes
/// first. At most `max_messages` outcomes wait unwritten at any time (a connection
/// whose outcome finds the batch full waits), so a relay killed mid-delivery sends
/// again at most one message per open connection plus `max_messages`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutcomeBatchConfig {
    pub max_messages: usize,
    #[serde(with = "duration_str")]
    pub max_delay: Duration,
}

impl Default for OutcomeBatchConfig {
    fn default() -> Self {
        OutcomeBatchConfig {
            max_messages: 32,
            max_delay: Duration::from_millis(50),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            enabled: true,
            max_concurrency: 50,
            per_destination_concurrency: 10,
            max_messages_per_connection: 100,
            connect_timeout: Duration::from_secs(30),
            lease: DEFAULT_LEASE,
            poll_interval: Duration::from_secs(1),
            wake_delay: Duration::from_millis(20),
            dns: Default::default(),
            smarthost: None,
            routes: Vec::new(),
            tls: TlsPolicy::Auto,
            tls_policies: Vec::new(),
            ca_file: None,
            mta_sts: Default::default(),
            dane: Default::default(),
            retry: Default::default(),
            outcome_batch: Default::default(),
        }
    }
}

impl DeliveryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let d = self;
        for (field, t) in [
            ("delivery.connect_timeout", d.connect_timeout),
            ("delivery.lease", d.lease),
            ("delivery.poll_interval", d.poll_interval),
        ] {
            if t.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        for (field, v) in [
            ("delivery.max_concurrency", d.max_concurrency),
            (
                "delivery.per_destination_concurrency",
                d.per_destination_concurrency,
            ),
            (
                "delivery.max_messages_per_connection",
                d.max_messages_per_connection,
            ),
            ("delivery.dns.attempts", d.dns.attempts),
            (
                "delivery.outcome_batch.max_messages",
                d.outcome_batch.max_messages,
            ),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        // A lease shorter than a few seconds expires under a normal delivery and
        // invites duplicates; renewal runs at a third of it.
        if d.lease < Duration::from_secs(2) {
            return Err(invalid("delivery.lease", "must be at least 2s"));
        }
        // Outcomes must be written long before the lease that covers them runs out,
        // or another relay may take the message and send it again.
        if d.outcome_batch.max_delay.is_zero() || d.outcome_batch.max_delay * 3 > d.lease {
            return Err(invalid(
                "delivery.outcome_batch.max_delay",
                "must be greater than zero and at most a third of delivery.lease",
            ));
        }
        if d.wake_delay > d.poll_interval {
            return Err(invalid(
                "delivery.wake_delay",
                "must not be longer than delivery.poll_interval",
            ));
        }
        d.retry
            .validate()
            .map_err(|m| invalid("delivery.retry", m))?;
        if d.mta_sts.fetch_timeout.is_zero() {
            return Err(invalid(
                "delivery.mta_sts.fetch_timeout",
                "must be greater than zero",
            ));
        }
        if !d.dane.enabled {
            let dane_in = |t: TlsPolicy| t == TlsPolicy::Dane;
            let field = if dane_in(d.tls) {
                Some("delivery.tls".to_owned())
            } else {
                d.tls_policies
                    .iter()
                    .position(|e| dane_in(e.tls))
                    .map(|i| format!("delivery.tls_policies[{i}].tls"))
                    .or_else(|| {
                        d.routes
                            .iter()
                            .position(|r| dane_in(r.remote.tls))
                            .map(|i| format!("delivery.routes[{i}].tls"))
                    })
                    .or_else(|| {
                        d.smarthost
                            .as_ref()
                            .filter(|s| dane_in(s.tls))
                            .map(|_| "delivery.smarthost.tls".to_owned())
                    })
            };
            if let Some(field) = field {
                return Err(invalid(
                    &field,
                    "is `dane` but delivery.dane.enabled is false",
                ));
            }
        }
        for (i, e) in d.tls_policies.iter().enumerate() {
            if e.domains.is_empty() {
                return Err(invalid(
                    format!("delivery.tls_policies[{i}].domains"),
                    "at least one domain is required",
                ));
            }
            for dom in &e.domains {
                let name = dom.trim_end_matches('.');
                if !is_valid_hostname(name.strip_prefix('.').unwrap_or(name)) {
                    return Err(invalid(
                        format!("delivery.tls_policies[{i}].domains"),
                        format!("{dom:?} is not a domain name or `.domain` pattern"),
                    ));
                }
            }
        }
        if let Some(s) = &d.smarthost {
            s.validate(|f| format!("delivery.smarthost.{f}"), s.password.is_some())?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in d.routes.iter().enumerate() {
            let field = |f: &str| format!("delivery.routes[{i}].{f}");
            if r.domains.is_empty() {
                return Err(invalid(field("domains"), "at least one domain is required"));
            }
            for dom in r.normalized_domains() {
                let name = dom.strip_prefix('.').unwrap_or(&dom);
                if !is_valid_hostname(name) {
                    return Err(invalid(
                        field("domains"),
                        format!("{dom:?} is not a domain name or `.domain` pattern"),
                    ));
                }
                if !seen.insert(dom.clone()) {
                    return Err(invalid(
                        field("domains"),
                        format!("{dom} is already routed by an earlier route"),
                    ));
                }
            }
            r.remote.validate(
                field,
                r.remote.password.is_some() || r.password_env.is_some(),
            )?;
        }
        Ok(())
    }
}

/// A host delivery hands mail to directly, without an MX lookup: the smarthost, or
/// the host of a route. In the file a smarthost is exactly this (`port` defaulting
/// to 587, submission); a route writes these fields next to its `domains`, its port
/// defaulting to 25.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteHost {
    /// Connected to directly: its addresses, no MX lookup (Postfix's `[host]`).
    pub host: String,
    #[serde(default = "default_smarthost_port")]
    pub port: u16,
    /// STARTTLS policy; `required` verifies the certificate against `ca_file`.
    #[serde(default)]
    pub tls: TlsPolicy,
    /// PEM trust anchors for this host; default: the system store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// AUTH user (sent only over TLS).
    #[serde(default)]
    pub username: Option<String>,
    /// Smarthost env: `MAILRELAY_SMARTHOST_PASSWORD`; a route's is better kept out of
    /// the file (see its `password_env`).
    #[serde(default)]
    pub password: Option<Secret>,
}

fn default_smarthost_port() -> u16 {
    587
}

impl RemoteHost {
    /// `field` names a field of this host in the file; `has_password` whether a
    /// password is given in any form.
    fn validate(
        &self,
        field: impl Fn(&str) -> String,
        has_password: bool,
    ) -> Result<(), ConfigError> {
        if self.host.is_empty() {
            return Err(invalid(field("host"), "must not be empty"));
        }
        if self.port == 0 {
            return Err(invalid(field("port"), "must not be 0"));
        }
        if has_password && self.username.is_none() {
            return Err(invalid(
                field("username"),
                "a password is set but no username",
            ));
        }
        if self.username.is_some() && self.tls == TlsPolicy::Disabled {
            return Err(invalid(
                field("tls"),
                "AUTH is only sent over TLS; it cannot be `disabled` with a username",
            ));
        }
        Ok(())
    }
}

/// One entry of the transport map: where mail for some domains goes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(from = "RouteFile", into = "RouteFile")]
pub struct RouteConfig {
    /// `example.com` (that domain) or `.example.com` (every subdomain of it). A domain
    /// listed exactly wins over a subdomain pattern; a longer pattern over a shorter.
    pub domains: Vec<String>,
    /// Where that mail goes.
    pub remote: RemoteHost,
    /// Name of an environment variable holding the password, read at start-up.
    pub password_env: Option<String>,
}

/// A route as written: the remote host's fields flat beside `domains`. (Serde's
/// `flatten` would lose `deny_unknown_fields`, so the two forms convert instead.)
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    domains: Vec<String>,
    host: String,
    #[serde(default = "default_route_port")]
    port: u16,
    #[serde(default)]
    tls: TlsPolicy,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password_env: Option<String>,
}

fn default_route_port() -> u16 {
    25
}

impl From<RouteFile> for RouteConfig {
    fn from(f: RouteFile) -> Self {
        RouteConfig {
            domains: f.domains,
            remote: RemoteHost {
                host: f.host,
                port: f.port,
                tls: f.tls,
                ca_file: f.ca_file,
                username: f.username,
                password: f.password,
            },
            password_env: f.password_env,
        }
    }
}

impl From<RouteConfig> for RouteFile {
    fn from(r: RouteConfig) -> Self {
        let h = r.remote;
        RouteFile {
            domains: r.domains,
            host: h.host,
            port: h.port,
            tls: h.tls,
            ca_file: h.ca_file,
            username: h.username,
            password: h.password,
            password_env: r.password_env,
        }
    }
}

impl RouteConfig {
    /// The patterns in canonical form: lower case, no trailing dot.
    pub fn normalized_domains(&self) -> impl Iterator<Item = String> + '_ {
        self.domains
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
    }
}

/// The route (index into `routes`) that takes `domain` (lower case, no trailing
/// dot): one listing it exactly, else the one listing its nearest parent as
/// `.parent`. The delivery scheduler's transport map answers the same, faster.
pub fn route_of(routes: &[RouteConfig], domain: &str) -> Option<usize> {
    let find = |want: &str| {
        routes
            .iter()
            .position(|r| r.normalized_domains().any(|d| d == want))
    };
    find(domain).or_else(|| {
        domain
            .match_indices('.')
            .find_map(|(at, _)| find(&format!(".{}", &domain[at + 1..])))
    })
}

/// DNS settings for delivery (`delivery.dns`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// Recursive resolvers as `ip:port` (the port is required), queried over UDP and
    /// TCP. Empty means the system's `/etc/resolv.conf` (in a pod: the cluster DNS).
    pub nameservers: Vec<SocketAddr>,
    /// Connect to this port instead of 25 on every resolved host. For tests, whose
    /// SMTP peers cannot bind port 25; never set it in production.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_override: Option<u16>,
    /// How long one query may take before it counts as failed. One [`MxResolver::resolve`]
    /// makes two rounds of queries (MX, then all addresses at once), so it can wait up
    /// to about `2 × timeout × attempts` before it gives up.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// Tries per query (like `attempts:` in resolv.conf), at least 1. A query that
    /// still fails defers the delivery.
    pub attempts: usize,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        // The resolv.conf defaults (glibc and hickory agree on 5s; 2 tries).
        ResolverConfig {
            nameservers: Vec::new(),
            port_override: None,
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

/// When to retry deferred mail and when to give up (`delivery.retry`); the schedule
/// itself is computed in `delivery::retry`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Delay before the first retry (Postfix `minimal_backoff_time`, 300s).
    #[serde(with = "duration_str")]
    pub first: Duration,
    /// Upper bound of any single delay (Postfix `maximal_backoff_time`, 4000s; we use 4h).
    #[serde(with = "duration_str")]
    pub max_backoff: Duration,
    /// Growth factor between consecutive delays; 1.0 gives a fixed interval.
    pub multiplier: f64,
    /// Relative jitter: each delay is scaled by a uniform factor in
    /// `[1 - jitter, 1 + jitter]`.
    pub jitter: f64,
    /// Age after which a message is bounced (Postfix `maximal_queue_lifetime`, 5d).
    #[serde(with = "duration_str")]
    pub max_lifetime: Duration,
    /// Age after which the sender gets one "delayed" DSN (Postfix
    /// `delay_warning_time`); `None` sends none, as Postfix does by default.
    #[serde(with = "opt_duration_str", skip_serializing_if = "Option::is_none")]
    pub delay_warning: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first: Duration::from_secs(300),
            max_backoff: Duration::from_secs(4 * 3600),
            multiplier: 2.0,
            jitter: 0.2,
            max_lifetime: Duration::from_secs(5 * 24 * 3600),
            delay_warning: None,
        }
    }
}

impl RetryPolicy {
    /// Checks the values a config file could get wrong; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.first.is_zero() {
            return Err("retry.first must be greater than zero".into());
        }
        if self.max_backoff < self.first {
            return Err("retry.max_backoff must be at least retry.first".into());
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err("retry.multiplier must be a finite number >= 1.0".into());
        }
        // jitter < 1 keeps every delay strictly positive.
        if !self.jitter.is_finite() || !(0.0..1.0).contains(&self.jitter) {
            return Err("retry.jitter must be in [0, 1)".into());
        }
        if self.max_lifetime.is_zero() {
            return Err("retry.max_lifetime must be greater than zero".into());
        }
        if let Some(w) = self.delay_warning
            && (w.is_zero() || w >= self.max_lifetime)
        {
            return Err(
                "retry.delay_warning must be greater than zero and less than retry.max_lifetime"
                    .into(),
            );
        }
        Ok(())
    }
}

/// `Option<Duration>` in the same human form as [`duration_str`].
mod opt_duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => crate::config::duration::duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "crate::config::duration::duration_str")] Duration);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}
