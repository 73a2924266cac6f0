//! `queue.redis:`: the Redis (standalone, Cluster or Sentinel) the queue and the
//! quota counters live in, and the grammar of its URLs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Secret;
use super::duration::{duration_str, format_duration};
use super::{ConfigError, invalid};

#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://…`; for a cluster, any one node (or list
    /// them all in `cluster_nodes`). For Redis Sentinel:
    /// `redis+sentinel://[[user]:password@]host1[:port1][,host2[:port2]...]/MASTER_NAME[/DB]`
    /// (`rediss+sentinel://` for TLS to the sentinels and the master; port 26379 when
    /// omitted); its userinfo authenticates to the sentinels only, and no userinfo
    /// means the sentinels take no `AUTH`. Env: `MAILRELAY_REDIS_URL`.
    pub url: String,
    /// Password of the Redis data nodes (with Sentinel: the master and its
    /// replicas, not the sentinels). Env: `MAILRELAY_REDIS_PASSWORD`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Talk Redis Cluster protocol (not with a sentinel URL).
    #[serde(default)]
    pub cluster: bool,
    /// More seed nodes for cluster mode.
    #[serde(default)]
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key, so several relays can share one Redis.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// After each enqueue, wait for this many replicas to acknowledge (Redis `WAIT`).
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long `WAIT` blocks for those acknowledgements. When they do not come in
    /// time (a failover left a master without replicas), the client gets `451`
    /// naming the replicas, and retries; the message may be stored once more.
    #[serde(
        default = "default_wait_timeout",
        with = "duration_str",
        // Rendered configs (and the operator's config hash) stay as they were.
        skip_serializing_if = "is_default_wait_timeout"
    )]
    pub wait_timeout: Duration,
    /// Enqueues put new message ids on each shard's `fresh` list (about 25 bytes
    /// of Redis memory per message) rather than the `due` sorted set (about 125).
    /// Readers always read both. Relays of releases before this switch read only
    /// `due`: set `false`, and wait until the `fresh` lists are empty, before
    /// rolling back to one (docs/operations.md, "Upgrades").
    /// Env: `MAILRELAY_REDIS_FRESH_LIST` (`true`/`false`).
    #[serde(
        default = "default_fresh_list",
        // Rendered configs (and the operator's config hash) stay as they were.
        skip_serializing_if = "is_default_fresh_list"
    )]
    pub fresh_list: bool,
}

pub fn default_fresh_list() -> bool {
    true
}

fn is_default_fresh_list(b: &bool) -> bool {
    *b == default_fresh_list()
}

/// Longest `wait_timeout`: a command's reply must come within the store's
/// response timeout (5 s), and `WAIT` blocks the reply.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(4);

pub fn default_wait_timeout() -> Duration {
    Duration::from_secs(2)
}

fn is_default_wait_timeout(d: &Duration) -> bool {
    *d == default_wait_timeout()
}

/// Written out by hand so that a password in a URL (a sentinel URL carries the
/// sentinels' one) never reaches `Debug` output.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hide = |url: &str| match url_password(url) {
            Some(pw) => url.replace(pw, "<redacted>"),
            None => url.to_owned(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &hide(&self.url))
            .field("password", &self.password)
            .field("cluster", &self.cluster)
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|u| hide(u))
                    .collect::<Vec<_>>(),
            )
            .field("key_prefix", &self.key_prefix)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("fresh_list", &self.fresh_list)
            .finish()
    }
}

pub(super) fn default_prefix() -> String {
    "mr".into()
}

impl RedisConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
        if r.wait_timeout < Duration::from_millis(10) || r.wait_timeout > MAX_WAIT_TIMEOUT {
            return Err(invalid(
                "queue.redis.wait_timeout",
                format!(
                    "must be between 10ms and {} (a reply must come within the \
                     store's 5 s response timeout)",
                    format_duration(MAX_WAIT_TIMEOUT)
                ),
            ));
        }
        if is_sentinel_url(&r.url) {
            SentinelUrl::parse(&r.url).map_err(|e| invalid("queue.redis.url", e))?;
            if r.cluster {
                return Err(invalid(
                    "queue.redis.url",
                    "a Redis Sentinel URL (redis+sentinel://) cannot be used with \
                     queue.redis.cluster: true",
                ));
            }
        } else if !(r.url.starts_with("redis://")
            || r.url.starts_with("rediss://")
            || r.url.starts_with("redis+unix://")
            || r.url.starts_with("unix://"))
        {
            return Err(invalid(
                "queue.redis.url",
                "must start with redis://, rediss://, unix://, redis+sentinel:// or \
                 rediss+sentinel://",
            ));
        }
        if r.key_prefix.is_empty() || r.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "queue.redis.key_prefix",
                "must be non-empty without braces or spaces",
            ));
        }
        Ok(())
    }
}

// Sentinel URLs:
//
//   redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB]
//   rediss+sentinel://…   (TLS to the sentinels and to the master)
//
// A host without a port means 26379. IPv6 hosts are bracketed (`[::1]:26379`). The
// userinfo authenticates to the sentinels (percent-encoded; absent means the
// sentinels are contacted without `AUTH`); the master and its replicas are
// authenticated with `queue.redis.password`, as a standalone server is.

/// The port of a sentinel listed without one.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// Whether `url` names sentinels rather than a Redis server.
pub fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("redis+sentinel")
            || scheme.eq_ignore_ascii_case("rediss+sentinel")
    })
}

/// A parsed sentinel URL (grammar above).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `rediss+sentinel`: TLS to the sentinels and to the master.
    pub tls: bool,
    /// Host and port of each sentinel, in the order written (asked in that order).
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under.
    pub master: String,
    /// Database number on the master.
    pub db: i64,
    /// For the sentinels' `AUTH`.
    pub username: Option<String>,
    /// For the sentinels' `AUTH`.
    pub password: Option<Secret>,
}

impl SentinelUrl {
    /// Parses a sentinel URL. Pure; the error says what is wrong without echoing the
    /// userinfo (where the password is).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("must start with redis+sentinel:// or rediss+sentinel://")?;
        let tls = if scheme.eq_ignore_ascii_case("rediss+sentinel") {
            true
        } else if scheme.eq_ignore_ascii_case("redis+sentinel") {
            false
        } else {
            return Err("must start with redis+sentinel:// or rediss+sentinel://".into());
        };
        let (authority, path) = rest
            .split_once('/')
            .ok_or("no master name: expected …/MASTER_NAME after the sentinel hosts")?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pw) = u.split_once(':').ok_or(
                    "the userinfo must be `:PASSWORD` or `USER:PASSWORD` (percent-encoded)",
                )?;
                let user = decode(user).map_err(|_| "the sentinel username is not valid UTF-8")?;
                let pw = decode(pw).map_err(|_| "the sentinel password is not valid UTF-8")?;
                (
                    (!user.is_empty()).then_some(user),
                    (!pw.is_empty()).then_some(Secret(pw)),
                )
            }
        };
        if hosts.is_empty() {
            return Err("no sentinel hosts: expected HOST[:PORT][,HOST[:PORT]...]".into());
        }
        let sentinels = hosts
            .split(',')
            .map(parse_host)
            .collect::<Result<Vec<_>, _>>()?;
        if path.contains(['?', '#']) {
            return Err("query strings and fragments are not supported".into());
        }
        let mut segments = path.split('/');
        let master = decode(segments.next().unwrap_or_default())
            .map_err(|_| "the master name is not valid UTF-8")?;
        if master.is_empty() {
            return Err("no master name: expected …/MASTER_NAME after the sentinel hosts".into());
        }
        if master.chars().any(char::is_whitespace) {
            return Err("the master name must not contain whitespace".into());
        }
        let db = match segments.next() {
            None | Some("") => 0,
            Some(d) => d
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| format!("bad database number `{d}` after the master name"))?,
        };
        if segments.next().is_some() {
            return Err("too many path segments: expected /MASTER_NAME[/DB]".into());
        }
        Ok(SentinelUrl {
            tls,
            sentinels,
            master,
            db,
            username,
            password,
        })
    }
}

fn decode(s: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
}

/// `HOST[:PORT]` or `[IPV6][:PORT]`.
fn parse_host(entry: &str) -> Result<(String, u16), String> {
    if entry.is_empty() {
        return Err("empty entry in the sentinel host list".into());
    }
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed `[` in sentinel host `{entry}`"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| {
                    format!("unexpected `{p}` after `]` in sentinel host `{entry}`")
                })?),
            ),
        }
    } else {
        match entry.split_once(':') {
            None => (entry, None),
            Some((h, p)) => (h, Some(p)),
        }
    };
    if host.is_empty() {
        return Err(format!("empty host in sentinel host `{entry}`"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(format!("bad host name in sentinel host `{entry}`"));
    }
    let port = match port {
        None => DEFAULT_SENTINEL_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("bad port in sentinel host `{entry}`: must be 1-65535"))?,
    };
    Ok((host.to_owned(), port))
}

/// The password part of a URL's userinfo, as written (`redis://user:pw@host`).
pub fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    let password = userinfo.split_once(':').map_or(userinfo, |(_, pw)| pw);
    (!password.is_empty()).then_some(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> SentinelUrl {
        SentinelUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn error(url: &str) -> String {
        match SentinelUrl::parse(url) {
            Ok(u) => panic!("{url} parsed as {u:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn sentinel_schemes_are_recognised() {
        assert!(is_sentinel_url("redis+sentinel://h/m"));
        assert!(is_sentinel_url("rediss+sentinel://h/m"));
        assert!(is_sentinel_url("Redis+Sentinel://h/m"));
        assert!(!is_sentinel_url("redis://h:6379"));
        assert!(!is_sentinel_url("rediss://h"));
        assert!(!is_sentinel_url("sentinel"));
    }

    #[test]
    fn full_url_parses() {
        let u = parse("rediss+sentinel://admin:p%40ss%2Fw@s1:26380,10.0.0.2,[::1]:5000/mymaster/3");
        assert_eq!(
            u,
            SentinelUrl {
                tls: true,
                sentinels: vec![
                    ("s1".into(), 26380),
                    ("10.0.0.2".into(), DEFAULT_SENTINEL_PORT),
                    ("::1".into(), 5000),
                ],
                master: "mymaster".into(),
                db: 3,
                username: Some("admin".into()),
                password: Some(Secret("p@ss/w".into())),
            }
        );
    }

    #[test]
    fn minimal_url_and_variants_parse() {
        let u = parse("redis+sentinel://127.0.0.1/mymaster");
        assert!(!u.tls);
        assert_eq!(u.sentinels, vec![("127.0.0.1".into(), 26379)]);
        assert_eq!((u.master.as_str(), u.db), ("mymaster", 0));
        assert_eq!((u.username, u.password), (None, None));
        // Password only; trailing slash means database 0; an `@` in the password.
        let u = parse("redis+sentinel://:s3cr@t@h:1/m/");
        assert_eq!(u.password, Some(Secret("s3cr@t".into())));
        assert_eq!((u.username, u.db), (None, 0));
        assert_eq!(parse("redis+sentinel://h/my%2Dm").master, "my-m");
    }

    #[test]
    fn malformed_urls_are_rejected_with_a_reason() {
        for (url, want) in [
            ("redis+sentinel://", "master name"),
            ("redis+sentinel://h", "master name"),
            ("redis+sentinel://h/", "master name"),
            ("redis+sentinel:///m", "no sentinel hosts"),
            ("redis+sentinel://:pw@/m", "no sentinel hosts"),
            ("redis+sentinel://a,,b/m", "empty entry"),
            ("redis+sentinel://a,/m", "empty entry"),
            ("redis+sentinel://h:0/m", "bad port"),
            ("redis+sentinel://h:65536/m", "bad port"),
            ("redis+sentinel://h:x/m", "bad port"),
            ("redis+sentinel://h:/m", "bad port"),
            ("redis+sentinel://:1/m", "empty host"),
            ("redis+sentinel://[::1/m", "unclosed"),
            ("redis+sentinel://[::1]x/m", "after `]`"),
            ("redis+sentinel://h/m/x", "database"),
            ("redis+sentinel://h/m/-1", "database"),
            ("redis+sentinel://h/m/1/2", "too many"),
            ("redis+sentinel://h/m?x=1", "query"),
            ("redis+sentinel://h/m#insecure", "fragment"),
            ("redis+sentinel://h/m%20x", "whitespace"),
            ("redis+sentinel://h%2F/m", "bad host"),
            ("redis+sentinel://pw@h/m", "userinfo"),
            ("redis://h/m", "must start with"),
            ("nonsense", "must start with"),
        ] {
            let e = error(url);
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn errors_never_echo_the_password() {
        for url in [
            "redis+sentinel://u:hunter2@h:0/m",
            "redis+sentinel://u:hunter2@h/",
            "redis+sentinel://:hunter2@/m",
            "redis+sentinel://:hunter2@h/m/x",
        ] {
            let e = error(url);
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
    }
}
