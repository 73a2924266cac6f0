//! Connection admission: a ceiling on open sessions overall, per client address,
//! and per client network (an IPv4 /24 or IPv6 /64 by default), so one provider's
//! address block cannot take every slot by spreading over many addresses.
//!
//! The last `reserved` slots are kept for clients that are ours (inside
//! `relay_networks`, or from an address that authenticated lately), so a crowd of
//! strangers cannot lock them out. And when the relay is full, the session idle
//! longest (outside a transaction, for at least `evict_idle_after`) is closed to
//! let the newcomer in, as Postfix shortens its timeouts under stress: a slot held
//! by a client that does nothing is worth less than one a client wants to use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Session {
    ip: IpAddr,
    net: Option<IpAddr>,
    /// Since when the session has waited for a command outside a transaction
    /// ([`ConnLimits::idle_since`]); 0 while it works on one (or is inside a
    /// transaction). Shared with its [`ConnSlot`], which sets it without the lock:
    /// a session changes it several times per message.
    idle: Arc<AtomicU64>,
    privileged: bool,
    evict: Arc<super::wake::Wake>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Sessions of clients that may not use the reserve.
    strangers: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_net: HashMap<IpAddr, usize>,
    sessions: HashMap<u64, Session>,
    next_id: u64,
    /// Addresses that authenticated lately, and when.
    authenticated: HashMap<IpAddr, Instant>,
}

#[derive(Debug)]
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    /// 0: no per-network cap.
    max_per_net: usize,
    prefix_v4: u8,
    prefix_v6: u8,
    /// Slots of `max_total` only privileged clients may take.
    reserved: usize,
    /// Idle time before a session may be closed for a newcomer; `None`: never.
    evict_after: Option<Duration>,
    /// What idle times count from.
    epoch: Instant,
    open: Mutex<Open>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    /// Only reserved slots are left, and the client is not privileged.
    Reserved,
    PerIp,
    PerNetwork,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::Reserved => "reserved_connections",
            Refusal::PerIp => "max_connections_per_ip",
            Refusal::PerNetwork => "max_connections_per_network",
        }
    }
}

/// How long an address counts as one that authenticated, for the reserve.
const AUTHENTICATED_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// Addresses remembered as authenticated at most (the oldest are forgotten first).
const AUTHENTICATED_MAX: usize = 10_000;

/// Holds one admitted connection's slot until dropped.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    id: u64,
    /// Its session's `idle` word (see `Session`).
    idle: Arc<AtomicU64>,
    /// Raised ([`super::wake::EVICTED`]) when the session is closed to admit another.
    pub evicted: Arc<super::wake::Wake>,
    /// The limit that made room by closing another (idle) session, if one did.
    pub made_room: Option<Refusal>,
}

/// `ip` with all bits past `prefix` cleared.
fn network(ip: IpAddr, prefix_v4: u8, prefix_v6: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix_v4)).unwrap_or(0);
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_v6))
                .unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

fn release(map: &mut HashMap<IpAddr, usize>, key: &IpAddr) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Open {
    fn remove(&mut self, id: u64) -> Option<Session> {
        let s = self.sessions.remove(&id)?;
        self.total -= 1;
        if !s.privileged {
            self.strangers -= 1;
        }
        release(&mut self.per_ip, &s.ip);
        if let Some(net) = &s.net {
            release(&mut self.per_net, net);
        }
        Some(s)
    }
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Self::with_networks(max_total, max_per_ip, 0, 24, 64)
    }

    pub fn with_networks(
        max_total: usize,
        max_per_ip: usize,
        max_per_net: usize,
        prefix_v4: u8,
        prefix_v6: u8,
    ) -> Arc<Self> {
        Self::with_fairness(
            max_total,
            max_per_ip,
            max_per_net,
            prefix_v4,
            prefix_v6,
            0,
            None,
        )
    }

    pub fn with_fairness(
        max_total: usize,
        max_per_ip: usize,
        max_per_net: usize,
        prefix_v4: u8,
        prefix_v6: u8,
        reserved: usize,
        evict_after: Option<Duration>,
    ) -> Arc<Self> {
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            max_per_net,
            prefix_v4,
            prefix_v6,
            reserved: reserved.min(max_total / 2),
            evict_after,
            epoch: Instant::now(),
            open: Mutex::new(Open::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `ip`; `per_network` is false for clients that are
    /// not subject to the network cap (those inside `relay_networks`: pods on one
    /// node share a /24, and they are ours); `privileged` ones may take the
    /// reserved slots. When the limit that applies is reached, the session idle
    /// longest (see [`ConnSlot`] and [`ConnLimits::set_idle`]) is evicted to make
    /// room, if one has been idle long enough.
    pub fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        per_network: bool,
        privileged: bool,
    ) -> Result<ConnSlot, Refusal> {
        let mut g = self.lock();
        let privileged = privileged || self.authenticated_lately(&mut g, ip);
        if g.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        let net = (per_network && self.max_per_net > 0)
            .then(|| network(ip, self.prefix_v4, self.prefix_v6));
        if let Some(net) = net
            && g.per_net.get(&net).copied().unwrap_or(0) >= self.max_per_net
        {
            return Err(Refusal::PerNetwork);
        }
        let mut made_room = None;
        if !privileged && self.reserved > 0 && g.strangers >= self.max_total - self.reserved {
            // Only a stranger's slot helps a stranger: ours keep the reserve.
            if !self.evict_idlest(&mut g, true) {
                return Err(Refusal::Reserved);
            }
            made_room = Some(Refusal::Reserved);
        } else if g.total >= self.max_total {
            if !self.evict_idlest(&mut g, false) {
                return Err(Refusal::Total);
            }
            made_room = Some(Refusal::Total);
        }
        *g.per_ip.entry(ip).or_insert(0) += 1;
        if let Some(net) = net {
            *g.per_net.entry(net).or_insert(0) += 1;
        }
        g.total += 1;
        if !privileged {
            g.strangers += 1;
        }
        let id = g.next_id;
        g.next_id += 1;
        let evicted = Arc::new(super::wake::Wake::new());
        let idle = Arc::new(AtomicU64::new(0));
        g.sessions.insert(
            id,
            Session {
                ip,
                net,
                idle: Arc::clone(&idle),
                privileged,
                evict: Arc::clone(&evicted),
            },
        );
        Ok(ConnSlot {
            limits: Arc::clone(self),
            id,
            idle,
            evicted,
            made_room,
        })
    }

    /// Closes the session idle longest, if one has been idle for `evict_after`:
    /// its slot is free at once, and the session is told to say goodbye.
    fn evict_idlest(&self, g: &mut Open, strangers_only: bool) -> bool {
        let Some(after) = self.evict_after else {
            return false;
        };
        let now = Instant::now();
        let victim = g
            .sessions
            .iter()
            .filter(|(_, s)| !(strangers_only && s.privileged))
            .filter_map(|(id, s)| Some((*id, self.idle_since(&s.idle)?)))
            .filter(|(_, since)| now.saturating_duration_since(*since) >= after)
            .min_by_key(|(_, since)| *since)
            .map(|(id, _)| id);
        match victim.and_then(|id| g.remove(id)) {
            Some(s) => {
                s.evict.raise(super::wake::EVICTED);
                true
            }
            None => false,
        }
    }

    /// When a session's `idle` word says it became idle, if it is.
    fn idle_since(&self, idle: &AtomicU64) -> Option<Instant> {
        match idle.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.epoch + Duration::from_nanos(n - 1)),
        }
    }

    fn authenticated_lately(&self, g: &mut Open, ip: IpAddr) -> bool {
        match g.authenticated.get(&ip) {
            Some(t) if t.elapsed() < AUTHENTICATED_MEMORY => true,
            Some(_) => {
                g.authenticated.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// `ip` authenticated: for a while its connections may use the reserve.
    pub fn note_authenticated(&self, ip: IpAddr) {
        let mut g = self.lock();
        if g.authenticated.len() >= AUTHENTICATED_MAX && !g.authenticated.contains_key(&ip) {
            g.authenticated
                .retain(|_, t| t.elapsed() < AUTHENTICATED_MEMORY);
            if g.authenticated.len() >= AUTHENTICATED_MAX
                && let Some(oldest) = g
                    .authenticated
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(ip, _)| *ip)
            {
                g.authenticated.remove(&oldest);
            }
        }
        g.authenticated.insert(ip, Instant::now());
    }

    pub fn open_connections(&self) -> usize {
        self.lock().total
    }
}

impl ConnSlot {
    /// The session waits for a command outside a transaction (`true`, from now on
    /// it may be evicted once idle long enough) or works (`false`).
    pub fn set_idle(&self, idle: bool) {
        if !idle {
            self.idle.store(0, Ordering::Relaxed);
        } else if self.idle.load(Ordering::Relaxed) == 0 {
            // +1: 0 means working. Saturating: ~584 years of uptime.
            let since = self.limits.epoch.elapsed().as_nanos();
            let since = u64::try_from(since).unwrap_or(u64::MAX - 1) + 1;
            self.idle.store(since, Ordering::Relaxed);
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        // An evicted session's slot was freed when it was evicted.
        self.limits.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_and_per_ip_limits_release_on_drop() {
        let l = ConnLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.try_acquire(a, true, false).unwrap();
        let _s2 = l.try_acquire(a, true, false).unwrap();
        assert_eq!(l.try_acquire(a, true, false).unwrap_err(), Refusal::PerIp);
        let _s3 = l.try_acquire(b, true, false).unwrap();
        assert_eq!(l.try_acquire(b, true, false).unwrap_err(), Refusal::Total);
        drop(s1);
        assert_eq!(l.open_connections(), 2);
        let _s4 = l.try_acquire(a, true, false).unwrap();
    }

    #[test]
    fn per_network_caps_ipv4_24_and_ipv6_64() {
        let l = ConnLimits::with_networks(100, 10, 2, 24, 64);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let s1 = l.try_acquire(ip("198.51.100.1"), true, false).unwrap();
        let _s2 = l.try_acquire(ip("198.51.100.200"), true, false).unwrap();
        assert_eq!(
            l.try_acquire(ip("198.51.100.77"), true, false).unwrap_err(),
            Refusal::PerNetwork
        );
        // The next /24, and clients exempt from the cap, still get in.
        let _s3 = l.try_acquire(ip("198.51.101.1"), true, false).unwrap();
        let _s4 = l.try_acquire(ip("198.51.100.77"), false, false).unwrap();
        drop(s1);
        let _s5 = l.try_acquire(ip("198.51.100.78"), true, false).unwrap();

        let _v1 = l.try_acquire(ip("2001:db8:1:2::1"), true, false).unwrap();
        let _v2 = l
            .try_acquire(ip("2001:db8:1:2:ffff::9"), true, false)
            .unwrap();
        assert_eq!(
            l.try_acquire(ip("2001:db8:1:2::3"), true, false)
                .unwrap_err(),
            Refusal::PerNetwork
        );
        let _v3 = l.try_acquire(ip("2001:db8:1:3::1"), true, false).unwrap();
        assert_eq!(network(ip("10.1.2.3"), 32, 64), ip("10.1.2.3"));
        assert_eq!(network(ip("10.1.2.3"), 8, 64), ip("10.0.0.0"));
    }

    async fn rung(w: &super::super::wake::Wake) -> bool {
        w.raised() & super::super::wake::EVICTED != 0
    }

    #[tokio::test]
    async fn reserve_is_for_privileged_clients_and_idle_sessions_make_room() {
        let l = ConnLimits::with_fairness(3, 10, 0, 24, 64, 1, Some(Duration::ZERO));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let pause = || std::thread::sleep(Duration::from_millis(5));
        let s1 = l.try_acquire(ip("192.0.2.1"), true, false).unwrap();
        let s2 = l.try_acquire(ip("192.0.2.2"), true, false).unwrap();
        // Nobody idle: a stranger finds only the reserve left; one of ours gets it.
        let stranger = ip("192.0.2.3");
        assert_eq!(
            l.try_acquire(stranger, true, false).unwrap_err(),
            Refusal::Reserved
        );
        let p = l.try_acquire(ip("10.0.0.1"), false, true).unwrap();
        assert!(p.made_room.is_none());
        assert_eq!(
            l.try_acquire(ip("10.0.0.2"), false, true).unwrap_err(),
            Refusal::Total
        );
        // An idle session of ours does not give way to a stranger.
        p.set_idle(true);
        pause();
        assert_eq!(
            l.try_acquire(stranger, true, false).unwrap_err(),
            Refusal::Reserved
        );
        // The stranger idle longest does.
        s2.set_idle(true);
        pause();
        s1.set_idle(true);
        let s3 = l.try_acquire(stranger, true, false).unwrap();
        assert_eq!(s3.made_room, Some(Refusal::Reserved));
        assert!(rung(&s2.evicted).await);
        assert!(!rung(&s1.evicted).await);
        assert_eq!(l.open_connections(), 3);
        drop(s2);
        assert_eq!(l.open_connections(), 3, "an evicted slot is freed once");
        // Full for ours too: the idlest of all gives way.
        let p2 = l.try_acquire(ip("10.0.0.2"), false, true).unwrap();
        assert_eq!(p2.made_room, Some(Refusal::Total));
        assert!(rung(&p.evicted).await);
        // An address that authenticated counts as ours.
        l.note_authenticated(ip("192.0.2.9"));
        let s4 = l.try_acquire(ip("192.0.2.9"), true, false).unwrap();
        assert_eq!(s4.made_room, Some(Refusal::Total));
        assert!(rung(&s1.evicted).await);
        drop((s1, p, p2, s3, s4));
        assert_eq!(l.open_connections(), 0);
    }
}
