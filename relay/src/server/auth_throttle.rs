//! Brakes on SMTP AUTH password guessing: failures slow the next attempts down
//! (a delay doubling per failure) and, past `max_failures` within `window`, lock
//! the client address or the user name out for `lockout`. Address (an IPv6
//! client's /64, which one host usually owns whole) and user are counted apart, so
//! neither many users from one address nor one user from many addresses escapes.
//!
//! The counters live in the queue store ([`RedisFailures`] beside a Redis queue,
//! [`MemoryFailures`] with the embedded one), so guesses spread over replicas add
//! up. The answer to a locked attempt is the same whether the user exists or not,
//! and is given before the password is looked at, so a right password during a
//! lockout is refused too: a lockout says nothing about the guess.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;

use crate::config::AuthThrottleConfig;
use crate::metrics::Metrics;
use crate::queue::redis::SharedRedis;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// The counter keys of one attempt: the client's address and the user name as
/// given (whether it exists or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    pub address: String,
    pub user: String,
}

/// Failures counted in the current window, and whether a lockout holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    pub address_failures: u64,
    pub user_failures: u64,
    pub address_locked: bool,
    pub user_locked: bool,
}

/// Lockouts a failure started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    pub address_locked: bool,
    pub user_locked: bool,
}

/// Where failure counters live. Implementations must expire what they keep.
pub trait FailureStore: Send + Sync {
    fn standing<'a>(&'a self, s: &'a Subjects) -> StoreFuture<'a, Standing>;
    /// Counts one failure of both subjects; starts a lockout of a subject whose
    /// count reached `max_failures` (and forgets its count).
    fn record_failure<'a>(
        &'a self,
        s: &'a Subjects,
        cfg: &'a AuthThrottleConfig,
    ) -> StoreFuture<'a, Recorded>;
    /// A successful login forgets the user's failures (not the address's: a client
    /// with one account of its own must not wipe its record of guessing others).
    fn forget_user<'a>(&'a self, s: &'a Subjects) -> StoreFuture<'a, ()>;
    fn backend(&self) -> &'static str;
}

/// What to do with an attempt before its credentials are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check the credentials after waiting this long.
    Proceed(Duration),
    /// Answer `454` without checking.
    Locked,
    /// The counters cannot be read: answer `454` (failing open would let guesses
    /// run unbraked while the store is down).
    Unavailable,
}

pub struct AuthThrottle {
    cfg: AuthThrottleConfig,
    store: Arc<dyn FailureStore>,
    metrics: Arc<Metrics>,
    /// Bound on each store round trip.
    timeout: Duration,
}

/// User names longer than this, or with bytes outside printable ASCII, are keyed by
/// a hash: keys stay short and log-safe whatever a client sends.
const MAX_PLAIN_USER: usize = 64;

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Subjects {
    pub fn new(ip: IpAddr, user: &str) -> Self {
        let address = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => {
                let net = u128::from(v6) & (u128::MAX << 64);
                format!("{}/64", std::net::Ipv6Addr::from(net))
            }
        };
        let plain =
            user.len() <= MAX_PLAIN_USER && user.bytes().all(|b| b.is_ascii_graphic() && b != b'%');
        let user = if plain {
            user.to_owned()
        } else {
            format!("%{:016x}", fnv1a64(user.as_bytes()))
        };
        Subjects { address, user }
    }
}

impl AuthThrottle {
    pub fn new(
        cfg: AuthThrottleConfig,
        store: Arc<dyn FailureStore>,
        metrics: Arc<Metrics>,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(AuthThrottle {
            cfg,
            store,
            metrics,
            timeout,
        })
    }

    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// The wait before checking an attempt after `failures` failures.
    pub fn delay_after(&self, failures: u64) -> Duration {
        if failures == 0 || self.cfg.delay.is_zero() {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(32) as u32;
        self.cfg
            .delay
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.cfg.max_delay)
    }

    async fn bounded<T>(&self, f: StoreFuture<'_, T>) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    pub async fn before(&self, s: &Subjects) -> Verdict {
        match self.bounded(self.store.standing(s)).await {
            Ok(st) if st.address_locked || st.user_locked => {
                self.metrics.auth_refused("locked");
                Verdict::Locked
            }
            Ok(st) => Verdict::Proceed(self.delay_after(st.address_failures.max(st.user_failures))),
            Err(e) => {
                self.metrics.auth_refused("store_unavailable");
                tracing::warn!(error = %e, "AUTH failure counters unavailable; answering 454");
                Verdict::Unavailable
            }
        }
    }

    /// Counts a failed attempt; returns the lockouts it started.
    pub async fn failed(&self, s: &Subjects) -> Recorded {
        self.metrics.auth_failure();
        match self.bounded(self.store.record_failure(s, &self.cfg)).await {
            Ok(r) => {
                if r.address_locked {
                    self.metrics.auth_lockout("address");
                }
                if r.user_locked {
                    self.metrics.auth_lockout("user");
                }
                r
            }
            Err(e) => {
                tracing::warn!(error = %e, "AUTH failure not counted");
                Recorded::default()
            }
        }
    }

    pub async fn succeeded(&self, s: &Subjects) {
        if let Err(e) = self.bounded(self.store.forget_user(s)).await {
            tracing::debug!(error = %e, "AUTH failures of the user not cleared");
        }
    }
}

// ---------------------------------------------------------------------------------
// In this process (embedded queue: a single relay)

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u64,
    window_end: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        now < self.window_end || self.locked_until.is_some_and(|t| now < t)
    }
}

/// Failure counters in a map, bounded: past `capacity` entries, expired ones go
/// first, then the ones whose window ends soonest (never a running lockout unless
/// nothing else is left).
pub struct MemoryFailures {
    entries: Mutex<HashMap<String, Entry>>,
    capacity: usize,
}

impl Default for MemoryFailures {
    fn default() -> Self {
        Self::with_capacity(100_000)
    }
}

impl MemoryFailures {
    pub fn with_capacity(capacity: usize) -> Self {
        MemoryFailures {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(2),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(map: &HashMap<String, Entry>, key: &str, now: Instant) -> (u64, bool) {
        match map.get(key) {
            Some(e) => (
                if now < e.window_end { e.failures } else { 0 },
                e.locked_until.is_some_and(|t| now < t),
            ),
            None => (0, false),
        }
    }

    fn make_room(map: &mut HashMap<String, Entry>, capacity: usize, now: Instant) {
        if map.len() < capacity {
            return;
        }
        map.retain(|_, e| e.live(now));
        while map.len() >= capacity {
            let victim = map
                .iter()
                .min_by_key(|(_, e)| (e.locked_until.is_some(), e.window_end))
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
    }

    fn fail(
        map: &mut HashMap<String, Entry>,
        capacity: usize,
        key: String,
        cfg: &AuthThrottleConfig,
        now: Instant,
    ) -> bool {
        if !map.contains_key(&key) {
            Self::make_room(map, capacity, now);
        }
        let e = map.entry(key).or_insert(Entry {
            failures: 0,
            window_end: now + cfg.window,
            locked_until: None,
        });
        if now >= e.window_end {
            e.failures = 0;
            e.window_end = now + cfg.window;
        }
        e.failures += 1;
        if cfg.max_failures > 0 && e.failures >= u64::from(cfg.max_failures) {
            e.failures = 0;
            e.locked_until = Some(now + cfg.lockout);
            return true;
        }
        false
    }
}

impl FailureStore for MemoryFailures {
    fn standing<'a>(&'a self, s: &'a Subjects) -> StoreFuture<'a, Standing> {
        Box::pin(async move {
            let now = Instant::now();
            let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let (af, al) = Self::get(&map, &format!("a:{}", s.address), now);
            let (uf, ul) = Self::get(&map, &format!("u:{}", s.user), now);
            Ok(Standing {
                address_failures: af,
                user_failures: uf,
                address_locked: al,
                user_locked: ul,
            })
        })
    }

    fn record_failure<'a>(
        &'a self,
        s: &'a Subjects,
        cfg: &'a AuthThrottleConfig,
    ) -> StoreFuture<'a, Recorded> {
        Box::pin(async move {
            let now = Instant::now();
            let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let a = Self::fail(
                &mut map,
                self.capacity,
                format!("a:{}", s.address),
                cfg,
                now,
            );
            let u = Self::fail(&mut map, self.capacity, format!("u:{}", s.user), cfg, now);
            Ok(Recorded {
                address_locked: a,
                user_locked: u,
            })
        })
    }

    fn forget_user<'a>(&'a self, s: &'a Subjects) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = map.get_mut(&format!("u:{}", s.user)) {
                e.failures = 0;
                if e.locked_until.is_none() {
                    map.remove(&format!("u:{}", s.user));
                }
            }
            Ok(())
        })
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}

// ---------------------------------------------------------------------------------
// In Redis (shared by every relay on it)

/// KEYS: address count, address lock, user count, user lock.
const STANDING_LUA: &str = r#"
local function n(k) return tonumber(redis.call('GET', k) or '0') or 0 end
return {n(KEYS[1]), redis.call('EXISTS', KEYS[2]), n(KEYS[3]), redis.call('EXISTS', KEYS[4])}
"#;

/// KEYS as above; ARGV: window ms, max failures (0: no lockouts), lockout ms.
/// A count lives one window from its first failure (a fixed window); reaching the
/// limit sets the lock with its own expiry and drops the count.
const FAIL_LUA: &str = r#"
local out = {}
local max = tonumber(ARGV[2])
for i = 1, 3, 2 do
  local c = redis.call('INCR', KEYS[i])
  if c == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
  local locked = 0
  if max > 0 and c >= max then
    redis.call('SET', KEYS[i + 1], '1', 'PX', ARGV[3])
    redis.call('DEL', KEYS[i])
    locked = 1
  end
  out[#out + 1] = locked
end
return out
"#;

const FORGET_LUA: &str = "redis.call('DEL', KEYS[1]) return 0";

/// Keys (with `key_prefix: mr`): `mr:{mr:auth}:n:a:<address>` and
/// `mr:{mr:auth}:n:u:<user>` count failures and expire one `window` after the
/// first; `mr:{mr:auth}:l:a:…`/`l:u:…` are lockouts, expiring after `lockout`. One
/// hash tag keeps the four keys of an attempt in one cluster slot for the scripts.
pub struct RedisFailures {
    redis: SharedRedis,
    standing: Script,
    fail: Script,
    forget: Script,
}

impl RedisFailures {
    pub async fn new(redis: SharedRedis) -> Result<Self, String> {
        let f = RedisFailures {
            redis,
            standing: Script::new(STANDING_LUA),
            fail: Script::new(FAIL_LUA),
            forget: Script::new(FORGET_LUA),
        };
        for s in [&f.standing, &f.fail, &f.forget] {
            f.redis.load(s).await?;
        }
        Ok(f)
    }

    fn key(&self, kind: &str, scope: &str, id: &str) -> String {
        let p = self.redis.prefix();
        format!("{p}:{{{p}:auth}}:{kind}:{scope}:{id}")
    }

    fn keys(&self, s: &Subjects) -> [String; 4] {
        [
            self.key("n", "a", &s.address),
            self.key("l", "a", &s.address),
            self.key("n", "u", &s.user),
            self.key("l", "u", &s.user),
        ]
    }
}

impl FailureStore for RedisFailures {
    fn standing<'a>(&'a self, s: &'a Subjects) -> StoreFuture<'a, Standing> {
        Box::pin(async move {
            let mut inv = self.standing.prepare_invoke();
            for k in self.keys(s) {
                inv.key(k);
            }
            let v: Vec<u64> = self.redis.invoke(&inv).await?;
            match v[..] {
                [af, al, uf, ul] => Ok(Standing {
                    address_failures: af,
                    user_failures: uf,
                    address_locked: al != 0,
                    user_locked: ul != 0,
                }),
                _ => Err(format!("unexpected AUTH standing reply {v:?}")),
            }
        })
    }

    fn record_failure<'a>(
        &'a self,
        s: &'a Subjects,
        cfg: &'a AuthThrottleConfig,
    ) -> StoreFuture<'a, Recorded> {
        Box::pin(async move {
            let mut inv = self.fail.prepare_invoke();
            for k in self.keys(s) {
                inv.key(k);
            }
            inv.arg(cfg.window.as_millis().max(1) as u64)
                .arg(cfg.max_failures)
                .arg(cfg.lockout.as_millis().max(1) as u64);
            let v: Vec<u64> = self.redis.invoke(&inv).await?;
            match v[..] {
                [a, u] => Ok(Recorded {
                    address_locked: a != 0,
                    user_locked: u != 0,
                }),
                _ => Err(format!("unexpected AUTH failure reply {v:?}")),
            }
        })
    }

    fn forget_user<'a>(&'a self, s: &'a Subjects) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut inv = self.forget.prepare_invoke();
            inv.key(self.key("n", "u", &s.user));
            let _: i64 = self.redis.invoke(&inv).await?;
            Ok(())
        })
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AuthThrottleConfig {
        AuthThrottleConfig {
            delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(700),
            max_failures: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_millis(200),
        }
    }

    #[test]
    fn delay_doubles_up_to_the_cap() {
        let t = AuthThrottle::new(
            cfg(),
            Arc::new(MemoryFailures::default()),
            Arc::new(Metrics::new()),
            Duration::from_secs(1),
        );
        let ms = |n| t.delay_after(n).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(4), ms(100)],
            [0, 100, 200, 400, 700, 700]
        );
    }

    #[test]
    fn subjects_bound_user_names_and_group_ipv6_by_64() {
        let s = Subjects::new("2001:db8:1:2:3:4:5:6".parse().unwrap(), "alice");
        assert_eq!(s.address, "2001:db8:1:2::/64");
        assert_eq!(s.user, "alice");
        let s = Subjects::new("::ffff:192.0.2.7".parse().unwrap(), &"x".repeat(5000));
        assert_eq!(s.address, "192.0.2.7");
        assert!(s.user.starts_with('%') && s.user.len() == 17, "{}", s.user);
        let odd = Subjects::new("192.0.2.7".parse().unwrap(), "a\r\nb");
        assert!(odd.user.starts_with('%'));
    }

    #[tokio::test]
    async fn memory_store_locks_each_subject_and_expires() {
        let m = MemoryFailures::default();
        let c = cfg();
        let a = Subjects::new("192.0.2.1".parse().unwrap(), "alice");
        let b = Subjects::new("192.0.2.2".parse().unwrap(), "bob");
        assert_eq!(m.record_failure(&a, &c).await.unwrap(), Recorded::default());
        m.record_failure(&a, &c).await.unwrap();
        let st = m.standing(&a).await.unwrap();
        assert_eq!((st.address_failures, st.user_failures), (2, 2));
        let locked_at = Instant::now();
        let r = m.record_failure(&a, &c).await.unwrap();
        assert!(r.address_locked && r.user_locked);
        assert!(m.standing(&a).await.unwrap().user_locked);
        // Another address and user are untouched; the same user from elsewhere is locked.
        assert_eq!(m.standing(&b).await.unwrap(), Standing::default());
        let elsewhere = Subjects::new("192.0.2.3".parse().unwrap(), "alice");
        let st = m.standing(&elsewhere).await.unwrap();
        assert!(st.user_locked && !st.address_locked);
        // The lock lifts once the lockout has run, not before.
        while m.standing(&a).await.unwrap() != Standing::default() {
            assert!(
                locked_at.elapsed() < Duration::from_secs(5),
                "never unlocked"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            locked_at.elapsed() >= c.lockout,
            "{:?}",
            locked_at.elapsed()
        );
    }

    #[tokio::test]
    async fn memory_store_stays_bounded() {
        let m = MemoryFailures::with_capacity(10);
        let c = cfg();
        for i in 0..50 {
            let s = Subjects::new("192.0.2.1".parse().unwrap(), &format!("u{i}"));
            m.record_failure(&s, &c).await.unwrap();
        }
        assert!(m.len() <= 10, "{}", m.len());
    }
}
