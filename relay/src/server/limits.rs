//! Connection admission: a ceiling on open sessions overall, per client address,
//! and per client network (an IPv4 /24 or IPv6 /64 by default), so one provider's
//! address block cannot take every slot by spreading over many addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_net: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    /// 0: no per-network cap.
    max_per_net: usize,
    prefix_v4: u8,
    prefix_v6: u8,
    open: Mutex<Open>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
    PerNetwork,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerIp => "max_connections_per_ip",
            Refusal::PerNetwork => "max_connections_per_network",
        }
    }
}

/// Holds one admitted connection's slot until dropped.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
    net: Option<IpAddr>,
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
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            max_per_net,
            prefix_v4,
            prefix_v6,
            open: Mutex::new(Open::default()),
        })
    }

    /// Admits a connection from `ip`; `per_network` is false for clients that are
    /// not subject to the network cap (those inside `relay_networks`: pods on one
    /// node share a /24, and they are ours).
    pub fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        per_network: bool,
    ) -> Result<ConnSlot, Refusal> {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if g.total >= self.max_total {
            return Err(Refusal::Total);
        }
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
        *g.per_ip.entry(ip).or_insert(0) += 1;
        if let Some(net) = net {
            *g.per_net.entry(net).or_insert(0) += 1;
        }
        g.total += 1;
        Ok(ConnSlot {
            limits: Arc::clone(self),
            ip,
            net,
        })
    }

    pub fn open_connections(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
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

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut g = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        g.total -= 1;
        release(&mut g.per_ip, &self.ip);
        if let Some(net) = &self.net {
            release(&mut g.per_net, net);
        }
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
        let s1 = l.try_acquire(a, true).unwrap();
        let _s2 = l.try_acquire(a, true).unwrap();
        assert_eq!(l.try_acquire(a, true).unwrap_err(), Refusal::PerIp);
        let _s3 = l.try_acquire(b, true).unwrap();
        assert_eq!(l.try_acquire(b, true).unwrap_err(), Refusal::Total);
        drop(s1);
        assert_eq!(l.open_connections(), 2);
        let _s4 = l.try_acquire(a, true).unwrap();
    }

    #[test]
    fn per_network_caps_ipv4_24_and_ipv6_64() {
        let l = ConnLimits::with_networks(100, 10, 2, 24, 64);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let s1 = l.try_acquire(ip("198.51.100.1"), true).unwrap();
        let _s2 = l.try_acquire(ip("198.51.100.200"), true).unwrap();
        assert_eq!(
            l.try_acquire(ip("198.51.100.77"), true).unwrap_err(),
            Refusal::PerNetwork
        );
        // The next /24, and clients exempt from the cap, still get in.
        let _s3 = l.try_acquire(ip("198.51.101.1"), true).unwrap();
        let _s4 = l.try_acquire(ip("198.51.100.77"), false).unwrap();
        drop(s1);
        let _s5 = l.try_acquire(ip("198.51.100.78"), true).unwrap();

        let _v1 = l.try_acquire(ip("2001:db8:1:2::1"), true).unwrap();
        let _v2 = l.try_acquire(ip("2001:db8:1:2:ffff::9"), true).unwrap();
        assert_eq!(
            l.try_acquire(ip("2001:db8:1:2::3"), true).unwrap_err(),
            Refusal::PerNetwork
        );
        let _v3 = l.try_acquire(ip("2001:db8:1:3::1"), true).unwrap();
        assert_eq!(network(ip("10.1.2.3"), 32, 64), ip("10.1.2.3"));
        assert_eq!(network(ip("10.1.2.3"), 8, 64), ip("10.0.0.0"));
    }
}
