//! The Redis egress store: pacing, connection leases and back-off shared by every
//! relay process, with one Lua script per check (plain Redis, no modules).
//!
//! # Keys
//!
//! A destination's keys (its MX site's back-off and response-rule states, and the
//! counters of every `scope: per_key` quota a message to it falls under, keyed by
//! MX site or by domain) carry the hash tag of the site's *bucket*: one of 64 tags
//! `{<prefix>:eg:<b>.<n>}`, one per equal share of Redis Cluster's slot range
//! ([`crate::redis_conn::slots`]), picked by a hash of the site's name. So the
//! pacing of different destinations spreads over every master of a cluster, while
//! one script still checks all quotas of a message to one destination and its
//! back-off atomically, as before. The counters of a `scope: shared` quota (one
//! key, `*`, for all mail it matches) are one key whatever the layout; they keep
//! the tag `{<prefix>:eg}`. With the default prefix `mr`, `B` a bucket's tag:
//!
//! | key                                  | type       | content                                   |
//! |--------------------------------------|------------|-------------------------------------------|
//! | `mr:{B}:w:<quota>:<window_ms>:<key>` | hash       | `tat` (GCRA), and units per end bucket     |
//! | `mr:{B}:f:<quota>:<key>`             | sorted set | messages in flight `token|cost` by deadline |
//! | `mr:{B}:c:<quota>:<key>`             | sorted set | connection leases by expiry               |
//! | `mr:{B}:k:<quota>`                   | sorted set | the bucket's keys of the quota by last use (for usage) |
//! | `mr:{B}:bo:<site>`                   | hash       | back-off `level` and `hit` (ms)           |
//! | `mr:{B}:sh:<site>`                   | hash       | response-rule states by scope field       |
//! | `mr:{B}:shi`                         | sorted set | the bucket's sites with states, by latest end |
//!
//! and the same `w:`, `f:`, `c:`, `k:` keys under `mr:{mr:eg}:` for shared quotas.
//! The admin reads (`usage`, `shaping list`) walk the 65 indexes by name (no `SCAN`).
//! A domain-keyed quota's key lives in the bucket of the MX site the domain resolves
//! to; if that changes (an MX move), its counters start afresh in the new bucket
//! (usage adds up both while the old ones last).
//!
//! On a standalone Redis (or Sentinel) there is nothing to spread: every key keeps
//! the one prefix `mr:{mr:eg}:` of the versions before, and every request is one
//! script, exactly as before.
//!
//! ## A message under a shared quota on a cluster: two scripts
//!
//! On a cluster, a request whose keys include a shared
//! quota's is split in two scripts sent at once (one round trip of latency, two
//! `EVALSHA`s): the site's bucket (back-off, states, per-key quotas) and
//! `{<prefix>:eg}` (shared quotas). Granted only if both grant, at the later of
//! the two times; when one refuses, what the other took (its lease, its flight) is
//! given back by `cancel.lua` (a third call, only then). What this gives up, on a
//! cluster only: (1) the shared half does not see the site's back-off level or
//! throttle states, so a backed-off site's shared quotas are not slowed (its pause
//! still holds all its mail, and its per-key quotas are slowed); (2) a refused
//! request's GCRA step in the granting half stays taken (it errs slow: the next
//! slot there comes one interval later); (3) between the two halves another relay
//! can see one half taken. The promise (at most `N` per `W` at the receiver) holds:
//! each half keeps it for its keys. The alternative, every egress key in one slot
//! (the layout before), kept the shared case atomic and put all pacing of every
//! destination on one master; a shared quota is one counter anyway, so only the
//! mail that matches one pays the extra call.
//!
//! ## Upgrading
//!
//! Standalone and Sentinel: nothing changes. Cluster: keys of the layout before
//! (`{<prefix>:eg}` for everything) are not read or migrated. A rolling upgrade
//! starts per-destination pacing, leases and back-off afresh (pacing state lives
//! for a window, leases for a minute; during the roll old and new relays count in
//! different keys, so a destination can get up to twice its rate until the old
//! relays are gone), and response-rule states set before the upgrade are
//! forgotten. Shared quotas keep their keys. Old keys expire by themselves.
//!
//! Every key gets a `PEXPIRE` long enough for what it still has to count (a window
//! hash: its GCRA horizon plus one window; a flight set: the flight deadline plus the
//! longest window, so an expired flight is still charged), so idle destinations
//! leave nothing behind. Times come from Redis `TIME`: relay clocks never matter.

use std::future::Future;
use std::time::Duration;

use redis::{RedisError, Script, Value};

use super::backoff::BackoffPolicy;
use super::pacer::Window;
use super::store::{
    Acquire, AcquireReply, Close, EgressError, Extend, KeyRef, KeyUse, USAGE_SCAN, Verdict,
};
use crate::config::RedisConfig;
use crate::redis_conn::script::{Call, Layout};
use crate::redis_conn::slots;
use crate::redis_conn::{self, Conn, ConnectError, Timeouts, redact};
use crate::shaping::State;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole call, reconnects included: egress waits rather than sends when Redis
/// does not answer, so it must learn that quickly.
const OP_DEADLINE: Duration = Duration::from_secs(4);

/// Shared by the scripts: the clock, and reading one window's state.
const PRELUDE: &str = include_str!("lua/prelude.lua");

const ACQUIRE_LUA: &str = include_str!("lua/acquire.lua");

const EXTEND_LUA: &str = include_str!("lua/extend.lua");

const CLOSE_LUA: &str = include_str!("lua/close.lua");

const RATE_LIMITED_LUA: &str = include_str!("lua/rate_limited.lua");

const USAGE_LUA: &str = include_str!("lua/usage.lua");

const SHAPING_SET_LUA: &str = include_str!("lua/shaping_set.lua");

const SHAPING_LIST_LUA: &str = include_str!("lua/shaping_list.lua");

const SHAPING_LIFT_LUA: &str = include_str!("lua/shaping_lift.lua");

const CANCEL_LUA: &str = include_str!("lua/cancel.lua");

/// Sites whose states `shaping list` reads at most.
const SHAPING_SCAN: usize = 1000;

/// The repeated group of every quota key (see each script's header).
const PER_KEY: &str = "per key..";
/// The repeated group of every window.
const PER_WINDOW: &str = "per window..";

/// KEYS/ARGV of `acquire.lua`; per key: flight set, lease set, key index, a hash
/// per window / key, max connections, cost, commit cost, window count, then per
/// window: window ms, limit.
const ACQUIRE: Layout = Layout {
    keys: &["back-off", "shaping", PER_KEY],
    args: &[
        "now",
        "max wait",
        "flight ttl",
        "lease ttl",
        "token",
        "commit token",
        "commit end",
        "lease id",
        "back-off base",
        "back-off recover",
        "key count",
        PER_KEY,
    ],
};
/// KEYS/ARGV of `extend.lua`; per key: flight set, lease set / max connections,
/// flight member, longest window ms.
const EXTEND: Layout = Layout {
    keys: &[PER_KEY],
    args: &[
        "now",
        "lease id",
        "lease ttl",
        "flight ttl",
        "key count",
        PER_KEY,
    ],
};
/// KEYS/ARGV of `close.lua`; per key: flight set, lease set, a hash per window /
/// commit cost, window count, then per window: window ms, limit.
const CLOSE: Layout = Layout {
    keys: &[PER_KEY],
    args: &[
        "now",
        "lease id",
        "commit token",
        "commit end",
        "key count",
        PER_KEY,
    ],
};
/// KEYS/ARGV of `rate_limited.lua`.
const RATE_LIMITED: Layout = Layout {
    keys: &["back-off"],
    args: &["now", "base", "max level", "recover"],
};
/// KEYS/ARGV of `shaping_set.lua`.
const SHAPING_SET: Layout = Layout {
    keys: &["states", "site index"],
    args: &["now", "site", "field", "value", "duration"],
};
/// KEYS/ARGV of `shaping_list.lua`.
const SHAPING_LIST: Layout = Layout {
    keys: &["site index"],
    args: &["now", "state prefix", "scan"],
};
/// KEYS/ARGV of `shaping_lift.lua`.
const SHAPING_LIFT: Layout = Layout {
    keys: &["states"],
    args: &["field"],
};
/// KEYS/ARGV of `cancel.lua`; per key: flight set, lease set / flight member.
const CANCEL: Layout = Layout {
    keys: &[PER_KEY],
    args: &["lease id", PER_KEY],
};
/// KEYS/ARGV of `usage.lua`; per window: window ms, limit.
const USAGE: Layout = Layout {
    keys: &["key index"],
    args: &[
        "now",
        "key prefix",
        "quota",
        "key",
        "scan",
        "window count",
        PER_WINDOW,
        "flight ttl",
    ],
};

/// Every script as Redis runs it, by name (for the Lua lint).
pub fn lua_scripts() -> Vec<(&'static str, String)> {
    [
        ("egress_acquire", ACQUIRE_LUA),
        ("egress_extend", EXTEND_LUA),
        ("egress_close", CLOSE_LUA),
        ("egress_rate_limited", RATE_LIMITED_LUA),
        ("egress_usage", USAGE_LUA),
        ("egress_shaping_set", SHAPING_SET_LUA),
        ("egress_shaping_list", SHAPING_LIST_LUA),
        ("egress_shaping_lift", SHAPING_LIFT_LUA),
        ("egress_cancel", CANCEL_LUA),
    ]
    .into_iter()
    .map(|(name, body)| (name, [PRELUDE, body].concat()))
    .collect()
}

struct Scripts {
    acquire: Script,
    extend: Script,
    close: Script,
    rate_limited: Script,
    usage: Script,
    shaping_set: Script,
    shaping_list: Script,
    shaping_lift: Script,
    cancel: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&[PRELUDE, body].concat());
        Scripts {
            acquire: s(ACQUIRE_LUA),
            extend: s(EXTEND_LUA),
            close: s(CLOSE_LUA),
            rate_limited: s(RATE_LIMITED_LUA),
            usage: s(USAGE_LUA),
            shaping_set: s(SHAPING_SET_LUA),
            shaping_list: s(SHAPING_LIST_LUA),
            shaping_lift: s(SHAPING_LIFT_LUA),
            cancel: s(CANCEL_LUA),
        }
    }
}

/// Where each egress key lives: the key prefix (`<prefix>:{<tag>}:`) of a
/// destination's bucket, or of the quotas shared by every destination.
#[derive(Debug, Clone)]
pub struct Tags {
    shared: String,
    buckets: Vec<String>,
}

impl Tags {
    /// The shared prefix `<prefix>:{<prefix>:eg}:` and, on a cluster, the buckets
    /// `<prefix>:{<prefix>:eg:<b>.<n>}:` ([`slots::bucket_prefixes`]). A standalone
    /// Redis has nothing to spread: there every key keeps the shared prefix, the
    /// layout of the versions before.
    pub fn new(prefix: &str, cluster: bool) -> Self {
        let shared = format!("{prefix}:{{{prefix}:eg}}:");
        let buckets = if cluster {
            slots::bucket_prefixes(prefix, "eg")
        } else {
            vec![shared.clone()]
        };
        Tags { shared, buckets }
    }

    /// The bucket of a destination (MX site or smarthost).
    pub fn site(&self, site: &str) -> &str {
        &self.buckets[slots::bucket_of(site) % self.buckets.len()]
    }

    /// Where the counters of `k` live when a message to `site` falls under it: a
    /// shared quota's one key (`*`) with the other shared ones, every other key with
    /// its destination's back-off and states, so one script covers them.
    pub fn key(&self, site: &str, k: &KeyRef) -> &str {
        if k.key == SHARED_KEY {
            &self.shared
        } else {
            self.site(site)
        }
    }

    /// Every prefix, the shared one first, each once: what the admin reads walk.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.shared.as_str()).chain(
            self.buckets
                .iter()
                .map(String::as_str)
                .filter(|b| *b != self.shared),
        )
    }
}

/// The key of a `scope: shared` quota (see `route_for`).
const SHARED_KEY: &str = "*";

/// The Redis egress store; cheap to share, all calls multiplex over one connection.
pub struct RedisStore {
    conn: Conn,
    tags: Tags,
    secrets: Vec<String>,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("shared", &self.tags.shared)
            .finish_non_exhaustive()
    }
}

/// One script call's share of a request: the keys (indexes into the request's)
/// that live under one prefix.
struct Group<'t> {
    base: &'t str,
    keys: Vec<usize>,
}

impl RedisStore {
    /// Connects like the Redis queue does (same URL, password, cluster mode, key
    /// prefix). Fails within a few seconds when Redis is unreachable.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, EgressError> {
        let timeouts = Timeouts {
            connect: CONNECT_TIMEOUT,
            response: RESPONSE_TIMEOUT,
            deadline: OP_DEADLINE,
            retries: 2,
        };
        let (conn, secrets) = redis_conn::connect(cfg, &timeouts)
            .await
            .map_err(|e| match e {
                ConnectError::Failed(msg) => EgressError::Unavailable(msg),
                ConnectError::Timeout(d) => EgressError::Timeout(d),
            })?;
        Ok(RedisStore {
            tags: Tags::new(&cfg.key_prefix, conn.is_cluster()),
            conn,
            secrets,
            scripts: Scripts::new(),
        })
    }

    /// The key layout (tests and benches read keys through it).
    pub fn tags(&self) -> &Tags {
        &self.tags
    }

    fn window_key(base: &str, k: &KeyRef, w: &Window) -> String {
        format!("{base}w:{}:{}:{}", k.quota, w.window_ms, k.key)
    }

    fn flight_key(base: &str, k: &KeyRef) -> String {
        format!("{base}f:{}:{}", k.quota, k.key)
    }

    fn conns_key(base: &str, k: &KeyRef) -> String {
        format!("{base}c:{}:{}", k.quota, k.key)
    }

    fn index_key(base: &str, quota: &str) -> String {
        format!("{base}k:{quota}")
    }

    fn backoff_key(&self, site: &str) -> String {
        format!("{}bo:{}", self.tags.site(site), site)
    }

    fn shaping_key(&self, site: &str) -> String {
        format!("{}sh:{}", self.tags.site(site), site)
    }

    /// The index of sites with states in `site`'s bucket.
    fn shaping_index(base: &str) -> String {
        format!("{base}shi")
    }

    /// The calls a request over `keys` takes: one on a standalone Redis (any key
    /// may go with any other there); on a cluster one per prefix, the site's bucket
    /// first (always there: it holds the back-off and states).
    fn groups<'t>(&'t self, site: &str, keys: &[KeyRef]) -> Vec<Group<'t>> {
        let home = self.tags.site(site);
        let mut groups = vec![Group {
            base: home,
            keys: Vec::new(),
        }];
        for (i, k) in keys.iter().enumerate() {
            let base = self.tags.key(site, k);
            match groups
                .iter_mut()
                .find(|g| g.base == base || !self.conn.is_cluster())
            {
                Some(g) => g.keys.push(i),
                None => groups.push(Group {
                    base,
                    keys: vec![i],
                }),
            }
        }
        groups
    }

    /// Runs one script invocation under the deadline. `EVALSHA`, and the script is
    /// loaded when Redis does not know it (start, restart, failover).
    async fn run<T: redis::FromRedisValue, F: Future<Output = Result<T, RedisError>>>(
        &self,
        op: &'static str,
        fut: F,
    ) -> Result<T, EgressError> {
        match tokio::time::timeout(OP_DEADLINE, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let msg = redact(&self.secrets, &format!("redis {op}: {e}"));
                tracing::debug!(op, error = %msg, "egress store call failed");
                Err(EgressError::Unavailable(msg))
            }
            Err(_) => Err(EgressError::Timeout(OP_DEADLINE)),
        }
    }

    /// One check-and-take. On a standalone Redis (and on a cluster when all the
    /// request's keys share the site's bucket) that is one script, all or nothing.
    /// Otherwise the site's bucket and the shared quotas are asked at once, and
    /// what one granted is given back when the other refused.
    pub async fn acquire(&self, req: &Acquire<'_>) -> Result<AcquireReply, EgressError> {
        let groups = self.groups(req.site, req.keys);
        let [home, rest @ ..] = &groups[..] else {
            unreachable!("groups() always has the site's bucket")
        };
        let Some(other) = rest.first() else {
            return self.acquire_group(req, home, true).await;
        };
        let (a, b) = tokio::join!(
            self.acquire_group(req, home, true),
            self.acquire_group(req, other, false)
        );
        let (mut a, b) = (a?, b?);
        let granted = |r: &AcquireReply| match r.verdict {
            Verdict::Granted { at_ms } => Some(at_ms),
            _ => None,
        };
        match (granted(&a), granted(&b)) {
            (Some(x), Some(y)) => {
                a.verdict = Verdict::Granted { at_ms: x.max(y) };
            }
            (Some(_), None) => {
                self.cancel(req, home).await?;
                a.verdict = b.verdict;
            }
            (None, Some(_)) => self.cancel(req, other).await?,
            (None, None) => {}
        }
        Ok(a)
    }

    /// `acquire.lua` on one group's keys; `site` says whether the group holds the
    /// site's back-off and states (else it reads a key of its own slot that nothing
    /// writes, and the site's bucket answers for them).
    async fn acquire_group(
        &self,
        req: &Acquire<'_>,
        g: &Group<'_>,
        site: bool,
    ) -> Result<AcquireReply, EgressError> {
        let mut call = Call::new(&self.scripts.acquire, &ACQUIRE);
        if site {
            call.key("back-off", self.backoff_key(req.site))
                .key("shaping", self.shaping_key(req.site));
        } else {
            call.key("back-off", format!("{}bo:", g.base))
                .key("shaping", format!("{}sh:", g.base));
        }
        call.arg("now", now_arg(req.now_ms))
            .arg("max wait", req.timing.max_wait_ms)
            .arg("flight ttl", req.timing.flight_ttl_ms)
            .arg("lease ttl", req.timing.lease_ttl_ms)
            .arg("token", req.token.unwrap_or(""))
            .arg("commit token", req.commit.map_or("", |c| c.token))
            .arg("commit end", req.commit.map_or(0, |c| c.end_ms))
            .arg("lease id", req.lease.unwrap_or(""))
            .arg("back-off base", req.policy.base_ms)
            .arg("back-off recover", req.policy.recover_ms)
            .arg("key count", g.keys.len());
        for &i in &g.keys {
            let k = &req.keys[i];
            let base = self.tags.key(req.site, k);
            call.key(PER_KEY, Self::flight_key(base, k))
                .key(PER_KEY, Self::conns_key(base, k))
                .key(PER_KEY, Self::index_key(base, &k.quota));
            call.arg(PER_KEY, &k.key)
                .arg(PER_KEY, k.max_connections.unwrap_or(0))
                .arg(PER_KEY, req.costs.get(i).copied().unwrap_or(1))
                .arg(
                    PER_KEY,
                    req.commit
                        .and_then(|c| c.costs.get(i).copied())
                        .unwrap_or(1),
                )
                .arg(PER_KEY, k.windows.len());
            for w in &k.windows {
                call.key(PER_KEY, Self::window_key(base, k, w));
                call.arg(PER_KEY, w.window_ms).arg(PER_KEY, w.limit);
            }
        }
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let v: Vec<Value> = self
            .run("egress acquire", inv.invoke_async(&mut conn))
            .await?;
        let bad = || EgressError::Protocol(format!("acquire returned {v:?}"));
        let int = |x: &Value| match x {
            Value::Int(i) => Some(*i),
            _ => None,
        };
        let (Some(code), Some(at), Some(now), Some(level)) = (
            v.first().and_then(int),
            v.get(1).and_then(int),
            v.get(2).and_then(int),
            v.get(3).and_then(int),
        ) else {
            return Err(bad());
        };
        let mut states = Vec::new();
        for pair in v.get(4..).unwrap_or_default().chunks(2) {
            if let [f, val] = pair
                && let (Some(f), Some(val)) = (text(f), text(val))
                && let Some(s) = State::decode(&f, &val)
            {
                states.push(s);
            }
        }
        // As the embedded store answers: by scope field.
        states.sort_by(|a, b| a.field.cmp(&b.field));
        let (at, now) = (at.max(0) as u64, now.max(0) as u64);
        let verdict = match code {
            0 => Verdict::Granted { at_ms: at },
            1 => Verdict::Later { at_ms: at },
            2 => Verdict::BackedOff { until_ms: at },
            3 => Verdict::Blocked,
            4 => Verdict::NoConnection,
            other => return Err(EgressError::Protocol(format!("acquire verdict {other}"))),
        };
        Ok(AcquireReply {
            verdict,
            now_ms: now,
            level: level.clamp(0, 64) as u32,
            states,
        })
    }

    /// Gives back the flight and lease one group granted (see [`Self::acquire`]).
    async fn cancel(&self, req: &Acquire<'_>, g: &Group<'_>) -> Result<(), EgressError> {
        let mut call = Call::new(&self.scripts.cancel, &CANCEL);
        call.arg("lease id", req.lease.unwrap_or(""));
        for &i in &g.keys {
            let k = &req.keys[i];
            let base = self.tags.key(req.site, k);
            call.key(PER_KEY, Self::flight_key(base, k))
                .key(PER_KEY, Self::conns_key(base, k));
            match req.token {
                Some(t) if k.paced() => call.arg(
                    PER_KEY,
                    format!("{t}|{}", req.costs.get(i).copied().unwrap_or(1)),
                ),
                _ => call.arg(PER_KEY, ""),
            };
        }
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let _: i64 = self
            .run("egress cancel", inv.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    pub async fn extend(&self, req: &Extend<'_>) -> Result<(), EgressError> {
        let groups = self.groups(req.site, req.keys);
        let mut calls = groups.iter().filter(|g| !g.keys.is_empty());
        let (a, b) = (calls.next(), calls.next());
        let (ra, rb) = tokio::join!(self.extend_group(req, a), self.extend_group(req, b));
        ra.and(rb)
    }

    async fn extend_group(
        &self,
        req: &Extend<'_>,
        g: Option<&Group<'_>>,
    ) -> Result<(), EgressError> {
        let Some(g) = g else { return Ok(()) };
        let mut call = Call::new(&self.scripts.extend, &EXTEND);
        call.arg("now", now_arg(req.now_ms))
            .arg("lease id", req.lease.unwrap_or(""))
            .arg("lease ttl", req.timing.lease_ttl_ms)
            .arg("flight ttl", req.timing.flight_ttl_ms)
            .arg("key count", g.keys.len());
        for &i in &g.keys {
            let k = &req.keys[i];
            let base = self.tags.key(req.site, k);
            call.key(PER_KEY, Self::flight_key(base, k))
                .key(PER_KEY, Self::conns_key(base, k));
            call.arg(PER_KEY, k.max_connections.unwrap_or(0));
            match req.flight {
                Some((token, costs)) if k.paced() => call.arg(
                    PER_KEY,
                    format!("{token}|{}", costs.get(i).copied().unwrap_or(1)),
                ),
                _ => call.arg(PER_KEY, ""),
            };
            call.arg(
                PER_KEY,
                k.windows.iter().map(|w| w.window_ms).max().unwrap_or(0),
            );
        }
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let _: i64 = self
            .run("egress extend", inv.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    pub async fn close(&self, req: &Close<'_>) -> Result<(), EgressError> {
        let groups = self.groups(req.site, req.keys);
        let mut calls = groups.iter().filter(|g| !g.keys.is_empty());
        let (a, b) = (calls.next(), calls.next());
        let (ra, rb) = tokio::join!(self.close_group(req, a), self.close_group(req, b));
        ra.and(rb)
    }

    async fn close_group(&self, req: &Close<'_>, g: Option<&Group<'_>>) -> Result<(), EgressError> {
        let Some(g) = g else { return Ok(()) };
        let mut call = Call::new(&self.scripts.close, &CLOSE);
        call.arg("now", now_arg(req.now_ms))
            .arg("lease id", req.lease.unwrap_or(""))
            .arg("commit token", req.commit.map_or("", |c| c.token))
            .arg("commit end", req.commit.map_or(0, |c| c.end_ms))
            .arg("key count", g.keys.len());
        for &i in &g.keys {
            let k = &req.keys[i];
            let base = self.tags.key(req.site, k);
            call.key(PER_KEY, Self::flight_key(base, k))
                .key(PER_KEY, Self::conns_key(base, k));
            call.arg(
                PER_KEY,
                req.commit
                    .and_then(|c| c.costs.get(i).copied())
                    .unwrap_or(1),
            )
            .arg(PER_KEY, k.windows.len());
            for w in &k.windows {
                call.key(PER_KEY, Self::window_key(base, k, w));
                call.arg(PER_KEY, w.window_ms).arg(PER_KEY, w.limit);
            }
        }
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let _: i64 = self
            .run("egress close", inv.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    pub async fn rate_limited(
        &self,
        site: &str,
        policy: BackoffPolicy,
        now_ms: Option<u64>,
    ) -> Result<(u64, u64), EgressError> {
        let mut call = Call::new(&self.scripts.rate_limited, &RATE_LIMITED);
        call.key("back-off", self.backoff_key(site))
            .arg("now", now_arg(now_ms))
            .arg("base", policy.base_ms)
            .arg("max level", policy.max_level)
            .arg("recover", policy.recover_ms);
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .run("egress rate_limited", inv.invoke_async(&mut conn))
            .await?;
        match v[..] {
            [until, now] => Ok((until.max(0) as u64, now.max(0) as u64)),
            _ => Err(EgressError::Protocol(format!(
                "rate_limited returned {v:?}"
            ))),
        }
    }

    pub async fn shaping_set(
        &self,
        site: &str,
        state: &State,
        duration_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<(u64, u64), EgressError> {
        let mut call = Call::new(&self.scripts.shaping_set, &SHAPING_SET);
        call.key("states", self.shaping_key(site))
            .key("site index", Self::shaping_index(self.tags.site(site)))
            .arg("now", now_arg(now_ms))
            .arg("site", site)
            .arg("field", &state.field)
            .arg("value", state.encode_rest())
            .arg("duration", duration_ms);
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .run("egress shaping_set", inv.invoke_async(&mut conn))
            .await?;
        match v[..] {
            [until, now] => Ok((until.max(0) as u64, now.max(0) as u64)),
            _ => Err(EgressError::Protocol(format!("shaping_set returned {v:?}"))),
        }
    }

    /// Walks every bucket's index (a state lives in its site's bucket).
    pub async fn shaping_list(
        &self,
        now_ms: Option<u64>,
    ) -> Result<(u64, Vec<(String, State)>), EgressError> {
        let mut now = 0;
        let mut out = Vec::new();
        for base in self.tags.all() {
            let mut call = Call::new(&self.scripts.shaping_list, &SHAPING_LIST);
            call.key("site index", Self::shaping_index(base))
                .arg("now", now_arg(now_ms))
                .arg("state prefix", format!("{base}sh:"))
                .arg("scan", SHAPING_SCAN);
            let inv = call.invocation();
            let mut conn = self.conn.clone();
            let v: Vec<Value> = self
                .run("egress shaping_list", inv.invoke_async(&mut conn))
                .await?;
            match v.first() {
                Some(Value::Int(i)) => now = now.max((*i).max(0) as u64),
                _ => return Err(EgressError::Protocol("shaping_list reply".into())),
            };
            for t in v[1..].chunks(3) {
                if let [site, f, val] = t
                    && let (Some(site), Some(f), Some(val)) = (text(site), text(f), text(val))
                    && let Some(s) = State::decode(&f, &val)
                {
                    out.push((site, s));
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.field).cmp(&(&b.0, &b.1.field)));
        out.truncate(SHAPING_SCAN);
        Ok((now, out))
    }

    pub async fn shaping_lift(&self, site: &str, field: &str) -> Result<bool, EgressError> {
        let mut call = Call::new(&self.scripts.shaping_lift, &SHAPING_LIFT);
        call.key("states", self.shaping_key(site))
            .arg("field", field);
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let n: i64 = self
            .run("egress shaping_lift", inv.invoke_async(&mut conn))
            .await?;
        Ok(n > 0)
    }

    /// Walks every bucket's key index of `quota` (a key lives in the bucket of the
    /// destination it was used for; a domain whose MX site changed can have counters
    /// in two buckets, which are added up).
    pub async fn usage(
        &self,
        quota: &str,
        windows: &[Window],
        key: Option<&str>,
        flight_ttl_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<(u64, Vec<KeyUse>), EgressError> {
        let mut now = 0;
        let mut out: Vec<KeyUse> = Vec::new();
        for base in self.tags.all() {
            let (n, uses) = self
                .usage_in(base, quota, windows, key, flight_ttl_ms, now_ms)
                .await?;
            now = now.max(n);
            for u in uses {
                match out.iter_mut().find(|o| o.key == u.key) {
                    Some(o) => {
                        for ((used, resets), (u_used, u_resets)) in
                            o.windows.iter_mut().zip(u.windows)
                        {
                            if u_used > 0 {
                                *resets = if *used > 0 {
                                    (*resets).max(u_resets)
                                } else {
                                    u_resets
                                };
                            }
                            *used += u_used;
                        }
                        o.scheduled += u.scheduled;
                        o.open_connections += u.open_connections;
                    }
                    None => out.push(u),
                }
            }
        }
        out.truncate(USAGE_SCAN);
        Ok((now, out))
    }

    async fn usage_in(
        &self,
        base: &str,
        quota: &str,
        windows: &[Window],
        key: Option<&str>,
        flight_ttl_ms: u64,
        now_ms: Option<u64>,
    ) -> Result<(u64, Vec<KeyUse>), EgressError> {
        let mut call = Call::new(&self.scripts.usage, &USAGE);
        call.key("key index", Self::index_key(base, quota))
            .arg("now", now_arg(now_ms))
            .arg("key prefix", base)
            .arg("quota", quota)
            .arg("key", key.unwrap_or(""))
            .arg("scan", USAGE_SCAN)
            .arg("window count", windows.len());
        for w in windows {
            call.arg(PER_WINDOW, w.window_ms).arg(PER_WINDOW, w.limit);
        }
        call.arg("flight ttl", flight_ttl_ms);
        let inv = call.invocation();
        let mut conn = self.conn.clone();
        let v: Vec<Value> = self
            .run("egress usage", inv.invoke_async(&mut conn))
            .await?;
        let bad = || EgressError::Protocol("usage reply".into());
        let int = |v: &Value| -> Result<u64, EgressError> {
            match v {
                Value::Int(i) => Ok((*i).max(0) as u64),
                _ => Err(bad()),
            }
        };
        let mut it = v.iter();
        let now = int(it.next().ok_or_else(bad)?)?;
        let mut out = Vec::new();
        while let Some(k) = it.next() {
            let key = match k {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => return Err(bad()),
            };
            let open = int(it.next().ok_or_else(bad)?)?;
            let scheduled = int(it.next().ok_or_else(bad)?)?;
            let mut ws = Vec::with_capacity(windows.len());
            for _ in windows {
                let used = int(it.next().ok_or_else(bad)?)?;
                let resets = int(it.next().ok_or_else(bad)?)?;
                ws.push((used, resets));
            }
            out.push(KeyUse {
                key,
                windows: ws,
                scheduled,
                open_connections: open as u32,
            });
        }
        Ok((now, out))
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn now_arg(now_ms: Option<u64>) -> String {
    now_ms.map(|n| n.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sites_keys_share_its_bucket_and_shared_keys_their_own() {
        let t = Tags::new("mr", true);
        let k = |key: &str| KeyRef {
            quota: "q".into(),
            key: key.into(),
            windows: vec![],
            max_connections: None,
        };
        let site = "mx1.example,mx2.example";
        assert_eq!(t.key(site, &k(site)), t.site(site));
        assert_eq!(t.key(site, &k("a.example")), t.site(site));
        assert_eq!(t.key(site, &k("*")), "mr:{mr:eg}:");
        assert!(t.site(site).starts_with("mr:{mr:eg:"));
        assert_eq!(t.all().count(), 1 + slots::BUCKETS);
        // Standalone: the layout before, one prefix.
        let t = Tags::new("mr", false);
        assert_eq!(t.key(site, &k(site)), "mr:{mr:eg}:");
        assert_eq!(t.all().collect::<Vec<_>>(), ["mr:{mr:eg}:"]);
    }
}
