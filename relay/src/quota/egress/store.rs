//! What the egress stores are asked, and what they answer. Both stores implement the
//! same steps; [`super::memory`] is the reference the Redis scripts are tested
//! against.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::backoff::BackoffPolicy;
use super::memory::MemoryStore;
use super::pacer::Window;
use super::redis::RedisStore;
use crate::shaping::State;

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("egress store unavailable: {0}")]
    Unavailable(String),
    #[error("egress store timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("egress store answered something unexpected: {0}")]
    Protocol(String),
}

/// One counter set a message falls under: a quota and the key it has there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub quota: Arc<str>,
    pub key: String,
    /// Empty for a quota that only caps connections.
    pub windows: Vec<Window>,
    pub max_connections: Option<u32>,
}

impl KeyRef {
    pub fn paced(&self) -> bool {
        !self.windows.is_empty()
    }
}

/// Time limits of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Grant only slots at most this far ahead; later ones are reported, not taken.
    pub max_wait_ms: u64,
    /// How long a granted message stays in flight without news from its sender.
    pub flight_ttl_ms: u64,
    /// How long a connection lease lives without being extended.
    pub lease_ttl_ms: u64,
}

/// The end of the previous message on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit<'a> {
    pub token: &'a str,
    /// Per key of the request, what that message cost there.
    pub costs: &'a [u64],
    /// Upper bound of when the server saw it, on the store's clock.
    pub end_ms: u64,
}

/// One check-and-take, all or nothing: the site's back-off, a connection lease for
/// every key with a cap (when `lease` is set), and a pacing slot in every paced key
/// (when `token` is set). `commit` is applied whatever the verdict.
#[derive(Debug, Clone, Copy)]
pub struct Acquire<'a> {
    /// Back-off record: the MX site (or smarthost) the connection goes to.
    pub site: &'a str,
    pub keys: &'a [KeyRef],
    /// Per key: what the message to be granted costs there.
    pub costs: &'a [u64],
    pub token: Option<&'a str>,
    pub commit: Option<Commit<'a>>,
    pub lease: Option<&'a str>,
    pub timing: Timing,
    pub policy: BackoffPolicy,
    /// Tests only: the store's clock at this request (else Redis `TIME` / the
    /// process clock).
    pub now_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Everything asked was taken; send at or after `at_ms`.
    Granted { at_ms: u64 },
    /// The site is paused until `until_ms` (further than `max_wait_ms`).
    BackedOff { until_ms: u64 },
    /// The next slot is at `at_ms` (further than `max_wait_ms`); nothing taken.
    Later { at_ms: u64 },
    /// Messages in flight fill a window; nothing taken.
    Blocked,
    /// A connection cap is reached; nothing taken.
    NoConnection,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AcquireReply {
    pub verdict: Verdict,
    /// The store's clock when it decided.
    pub now_ms: u64,
    /// The site's back-off level in force (0 = normal).
    pub level: u32,
    /// The site's response-rule states in force (read in the same call, so rules
    /// cost no extra round trip). A site-wide suspension already shows as
    /// `BackedOff`, a site-wide throttle factor in the pacing.
    pub states: Vec<State>,
}

/// Keeps a connection's lease and its message in flight alive.
#[derive(Debug, Clone, Copy)]
pub struct Extend<'a> {
    /// The connection's MX site or smarthost (where its keys live in Redis).
    pub site: &'a str,
    pub keys: &'a [KeyRef],
    pub lease: Option<&'a str>,
    /// The message in flight, with its cost per key.
    pub flight: Option<(&'a str, &'a [u64])>,
    pub timing: Timing,
    pub now_ms: Option<u64>,
}

/// A connection ends: its last message's end and its lease.
#[derive(Debug, Clone, Copy)]
pub struct Close<'a> {
    /// The connection's MX site or smarthost (where its keys live in Redis).
    pub site: &'a str,
    pub keys: &'a [KeyRef],
    pub lease: Option<&'a str>,
    pub commit: Option<Commit<'a>>,
    pub now_ms: Option<u64>,
}

/// Usage of one key of a quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    pub key: String,
    /// Per window of the request: units counted now (in flight included), and
    /// when that count drops.
    pub windows: Vec<(u64, u64)>,
    /// Of the units in flight, those granted for a later time and not sent yet
    /// (counted in every window above).
    pub scheduled: u64,
    pub open_connections: u32,
}

/// Keys whose usage one request reads at most (the most recently used ones).
pub const USAGE_SCAN: usize = 1000;

/// What a store call returns: the same shape as the ingress counter store's.
pub type PacingFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, EgressError>> + Send + 'a>>;

/// The store behind egress pacing: in-process ([`MemoryStore`]) or Redis shared by
/// every relay ([`RedisStore`]), the same trait shape as the ingress
/// `CounterStore`.
pub trait PacingStore: Send + Sync + 'static {
    /// `embedded` or `redis`.
    fn backend(&self) -> &'static str;

    fn acquire<'a>(&'a self, req: &'a Acquire<'_>) -> PacingFuture<'a, AcquireReply>;

    fn extend<'a>(&'a self, req: &'a Extend<'_>) -> PacingFuture<'a, ()>;

    fn close<'a>(&'a self, req: &'a Close<'_>) -> PacingFuture<'a, ()>;

    /// Records a rate-limit reply from `site`; returns the end of its pause and the
    /// store's clock.
    fn rate_limited<'a>(
        &'a self,
        site: &'a str,
        policy: BackoffPolicy,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, u64)>;

    /// Records a response-rule state for `site` (replacing the scope's previous
    /// one unless that lasts longer); returns the store's clock.
    /// (`state.until_ms` is ignored: the store sets it `duration_ms` from its
    /// clock.) Returns the state's end and the store's clock.
    fn shaping_set<'a>(
        &'a self,
        site: &'a str,
        state: &'a State,
        duration_ms: u64,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, u64)>;

    /// Every state in force, by site (at most [`USAGE_SCAN`] sites), with the
    /// store's clock.
    fn shaping_list<'a>(
        &'a self,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, Vec<(String, State)>)>;

    /// Ends a state by hand; whether there was one.
    fn shaping_lift<'a>(&'a self, site: &'a str, field: &'a str) -> PacingFuture<'a, bool>;

    /// Usage of `quota`'s keys (or of `key` alone), read at the store's `now`.
    fn usage<'a>(
        &'a self,
        quota: &'a str,
        windows: &'a [Window],
        key: Option<&'a str>,
        flight_ttl_ms: u64,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, Vec<KeyUse>)>;
}

impl PacingStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn acquire<'a>(&'a self, req: &'a Acquire<'_>) -> PacingFuture<'a, AcquireReply> {
        Box::pin(std::future::ready(Ok(MemoryStore::acquire(self, req))))
    }

    fn extend<'a>(&'a self, req: &'a Extend<'_>) -> PacingFuture<'a, ()> {
        MemoryStore::extend(self, req);
        Box::pin(std::future::ready(Ok(())))
    }

    fn close<'a>(&'a self, req: &'a Close<'_>) -> PacingFuture<'a, ()> {
        MemoryStore::close(self, req);
        Box::pin(std::future::ready(Ok(())))
    }

    fn rate_limited<'a>(
        &'a self,
        site: &'a str,
        policy: BackoffPolicy,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, u64)> {
        let r = MemoryStore::rate_limited(self, site, policy, now_ms);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn shaping_set<'a>(
        &'a self,
        site: &'a str,
        state: &'a State,
        duration_ms: u64,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, u64)> {
        Box::pin(std::future::ready(Ok(MemoryStore::shaping_set(
            self,
            site,
            state,
            duration_ms,
            now_ms,
        ))))
    }

    fn shaping_list<'a>(
        &'a self,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, Vec<(String, State)>)> {
        Box::pin(std::future::ready(Ok(MemoryStore::shaping_list(
            self, now_ms,
        ))))
    }

    fn shaping_lift<'a>(&'a self, site: &'a str, field: &'a str) -> PacingFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(MemoryStore::shaping_lift(
            self, site, field,
        ))))
    }

    fn usage<'a>(
        &'a self,
        quota: &'a str,
        windows: &'a [Window],
        key: Option<&'a str>,
        flight_ttl_ms: u64,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, Vec<KeyUse>)> {
        let r = MemoryStore::usage(self, quota, windows, key, flight_ttl_ms, now_ms);
        Box::pin(std::future::ready(Ok(r)))
    }
}

impl PacingStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn acquire<'a>(&'a self, req: &'a Acquire<'_>) -> PacingFuture<'a, AcquireReply> {
        Box::pin(RedisStore::acquire(self, req))
    }

    fn extend<'a>(&'a self, req: &'a Extend<'_>) -> PacingFuture<'a, ()> {
        Box::pin(RedisStore::extend(self, req))
    }

    fn close<'a>(&'a self, req: &'a Close<'_>) -> PacingFuture<'a, ()> {
        Box::pin(RedisStore::close(self, req))
    }

    fn rate_limited<'a>(
        &'a self,
        site: &'a str,
        policy: BackoffPolicy,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, u64)> {
        Box::pin(RedisStore::rate_limited(self, site, policy, now_ms))
    }

    fn shaping_set<'a>(
        &'a self,
        site: &'a str,
        state: &'a State,
        duration_ms: u64,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, u64)> {
        Box::pin(RedisStore::shaping_set(
            self,
            site,
            state,
            duration_ms,
            now_ms,
        ))
    }

    fn shaping_list<'a>(
        &'a self,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, Vec<(String, State)>)> {
        Box::pin(RedisStore::shaping_list(self, now_ms))
    }

    fn shaping_lift<'a>(&'a self, site: &'a str, field: &'a str) -> PacingFuture<'a, bool> {
        Box::pin(RedisStore::shaping_lift(self, site, field))
    }

    fn usage<'a>(
        &'a self,
        quota: &'a str,
        windows: &'a [Window],
        key: Option<&'a str>,
        flight_ttl_ms: u64,
        now_ms: Option<u64>,
    ) -> PacingFuture<'a, (u64, Vec<KeyUse>)> {
        Box::pin(RedisStore::usage(
            self,
            quota,
            windows,
            key,
            flight_ttl_ms,
            now_ms,
        ))
    }
}
