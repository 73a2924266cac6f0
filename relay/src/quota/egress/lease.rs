//! The connection-cap semaphore, IO-free: leases scored by expiry. Taking one drops
//! the expired ones, counts the rest and adds ours when under the cap; the holder
//! extends it while the connection is open and removes it on close. A relay that dies
//! holding leases stops extending them, so its connections free themselves after one
//! lease time. In Redis the same is a sorted set (`ZREMRANGEBYSCORE`, `ZCARD`, `ZADD`).

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSet {
    /// Lease id → expiry.
    leases: BTreeMap<String, u64>,
}

impl LeaseSet {
    fn drop_expired(&mut self, now: u64) {
        self.leases.retain(|_, &mut exp| exp > now);
    }

    /// Whether `id` could be taken now (it already is ours, or there is room).
    pub fn can_take(&mut self, id: &str, now: u64, max: u32) -> bool {
        self.drop_expired(now);
        self.leases.contains_key(id) || self.leases.len() < max as usize
    }

    /// Takes (or refreshes) `id` until `now + ttl`; false when the cap is reached.
    pub fn take(&mut self, id: &str, now: u64, ttl: u64, max: u32) -> bool {
        if !self.can_take(id, now, max) {
            return false;
        }
        self.leases.insert(id.to_owned(), now + ttl);
        true
    }

    /// Pushes the expiry of a lease still held; false when it has expired meanwhile
    /// (it is then not revived: someone else may hold its place).
    pub fn extend(&mut self, id: &str, now: u64, ttl: u64) -> bool {
        self.drop_expired(now);
        match self.leases.get_mut(id) {
            Some(exp) => {
                *exp = now + ttl;
                true
            }
            None => false,
        }
    }

    pub fn release(&mut self, id: &str) {
        self.leases.remove(id);
    }

    /// Leases not expired at `now`.
    pub fn open(&self, now: u64) -> usize {
        self.leases.values().filter(|&&exp| exp > now).count()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_expiry_extend_release() {
        let mut s = LeaseSet::default();
        assert!(s.take("a", 0, 1_000, 2));
        assert!(s.take("b", 10, 1_000, 2));
        assert!(!s.take("c", 20, 1_000, 2));
        // Taking again what we hold is a refresh, not a second place.
        assert!(s.take("a", 30, 1_000, 2));
        assert_eq!(s.open(30), 2);
        // "b" stops being extended (its holder died): it frees itself.
        assert!(s.extend("a", 900, 1_000));
        assert!(!s.take("c", 1_009, 1_000, 2));
        assert!(s.take("c", 1_010, 1_000, 2));
        assert!(!s.extend("b", 1_010, 1_000));
        s.release("a");
        s.release("c");
        assert_eq!(s.open(1_010), 0);
        assert!(s.is_empty());
    }
}
