//! The bucketed sliding window: the counting rule behind every quota limit, as pure
//! functions of a clock reading. The embedded store runs this code; the Redis store
//! runs the same rule in Lua (`redis.rs`), and a test checks that both agree.
//!
//! # The promise: never more than N in ANY rolling window
//!
//! A limit `N/W` admits a charge at time `t` (whole milliseconds) only if the units
//! already counted plus the charge stay within `N`, where *counted* means every unit
//! charged in a bucket that overlaps the rolling window `[t-W+1, t]`. Time is cut
//! into buckets of `b = ceil(W / 60)` ms; the oldest bucket usually overlaps the
//! window only in part and is counted in full. So every unit charged inside the
//! window is counted, and after each admission the window ending then holds at most
//! `N`: for any window `[s-W+1, s]`, look at the last admission `t <= s` in it — its
//! own window contained everything the later one does.
//!
//! Why not the usual alternatives: a fixed window (counter reset every `W`) lets `N`
//! through just before the reset and `N` more just after, `2N` in one rolling window;
//! a token bucket or GCRA with burst `N` admits `N` at once and then refills at `N/W`,
//! again up to `2N` in one window. The sliding window's price is that a unit stops
//! counting up to one bucket (`W/60`) after it left the rolling window: for a full
//! quota the next unit frees at most `W/60` later than an exact log would allow.
//!
//! # State per counter
//!
//! `counts`: bucket index (`t / b`) to units charged in it; `lo`: the lowest bucket
//! index that may still hold units (everything below was dropped); `total`: the sum of
//! `counts`. Dropping old buckets walks up from `lo`, so it costs one step per bucket
//! of elapsed time — at most `span() + 2` steps, because a counter idle for longer
//! than a window is dropped whole.

use std::collections::BTreeMap;

use crate::quota::config::Limit;

/// Buckets per window.
pub const BUCKETS: u64 = 60;

/// One limit in the form the stores use: whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    pub limit: u64,
    pub window_ms: u64,
    pub bucket_ms: u64,
}

impl WindowSpec {
    pub fn new(limit: u64, window_ms: u64) -> Self {
        let window_ms = window_ms.max(1);
        WindowSpec {
            limit,
            window_ms,
            bucket_ms: window_ms.div_ceil(BUCKETS).max(1),
        }
    }

    pub fn of(l: &Limit) -> Self {
        Self::new(
            l.count,
            u64::try_from(l.window.as_millis()).unwrap_or(u64::MAX / 4),
        )
    }

    /// The bucket a charge at `now` goes into.
    pub fn bucket(&self, now: u64) -> i64 {
        (now / self.bucket_ms) as i64
    }

    /// The oldest bucket counted at `now`: the one holding `now - W + 1`, the first
    /// millisecond of the rolling window (negative before the epoch plus `W`; it
    /// holds nothing then).
    pub fn lower(&self, now: u64) -> i64 {
        (now as i64 + 1 - self.window_ms as i64).div_euclid(self.bucket_ms as i64)
    }

    /// When units charged in bucket `j` stop counting: the first `now` whose
    /// [`lower`](Self::lower) is above `j`.
    pub fn frees_at(&self, j: i64) -> u64 {
        ((j + 1) * self.bucket_ms as i64 + self.window_ms as i64 - 1).max(0) as u64
    }

    /// Buckets a window spans, rounded up.
    pub fn span(&self) -> i64 {
        self.window_ms.div_ceil(self.bucket_ms) as i64
    }

    /// How long a counter must outlive its last charge: after this, every bucket of
    /// it has stopped counting.
    pub fn ttl_ms(&self) -> u64 {
        self.window_ms + self.bucket_ms
    }
}

/// One counter (one quota, one key, one window).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowState {
    /// `None` until the first charge: nothing stored.
    lo: Option<i64>,
    total: u64,
    counts: BTreeMap<i64, u64>,
}

/// The verdict on one window for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCheck {
    /// Units counted now (after the charge, when it was made).
    pub used: u64,
    /// When the request would fit: `Some(0)` fits now; `None` never (the cost
    /// alone exceeds the limit).
    pub retry_at: Option<u64>,
    /// When at least one unit is free again, if none is now (after the charge);
    /// `0` when one is free now.
    pub free_at: u64,
}

impl WindowCheck {
    pub fn fits(&self) -> bool {
        self.retry_at == Some(0)
    }
}

impl WindowState {
    pub fn is_empty(&self) -> bool {
        self.lo.is_none()
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Drops the buckets that no longer count at `now`.
    pub fn roll(&mut self, spec: &WindowSpec, now: u64) {
        let Some(lo) = self.lo else {
            return;
        };
        let lower = spec.lower(now);
        if lower <= lo {
            return;
        }
        if lower - lo > spec.span() + 2 {
            // Idle for longer than a window: everything is stale.
            *self = WindowState::default();
            return;
        }
        let keep = self.counts.split_off(&lower);
        let dropped: u64 = self.counts.values().sum();
        self.counts = keep;
        self.total -= dropped;
        self.lo = Some(lower);
    }

    /// When units `need` more than fit would have left: walks the counted buckets
    /// from the oldest until `need` units have freed.
    fn frees(&self, spec: &WindowSpec, need: u64) -> Option<u64> {
        let mut acc = 0;
        for (&j, &c) in &self.counts {
            acc += c;
            if acc >= need {
                return Some(spec.frees_at(j));
            }
        }
        None
    }

    /// Rolls to `now`, then checks whether `cost` more units fit; see [`WindowCheck`].
    pub fn check(&mut self, spec: &WindowSpec, now: u64, cost: u64) -> WindowCheck {
        self.roll(spec, now);
        let retry_at = if cost > spec.limit {
            None
        } else if self.total + cost <= spec.limit {
            Some(0)
        } else {
            self.frees(spec, self.total + cost - spec.limit)
        };
        WindowCheck {
            used: self.total,
            retry_at,
            free_at: self.free_at(spec),
        }
    }

    fn free_at(&self, spec: &WindowSpec) -> u64 {
        if self.total < spec.limit {
            0
        } else {
            self.frees(spec, self.total + 1 - spec.limit).unwrap_or(0)
        }
    }

    /// Adds `cost` at `now` (after a [`check`](Self::check) at the same `now`) and
    /// returns the check as it stands after the charge.
    pub fn charge(&mut self, spec: &WindowSpec, now: u64, cost: u64) -> WindowCheck {
        let lo = *self.lo.get_or_insert_with(|| spec.lower(now));
        // A clock that stepped back by more than the buckets kept: the charge counts
        // in the oldest bucket kept, so it stops counting later than its own would
        // have, never sooner.
        *self.counts.entry(spec.bucket(now).max(lo)).or_default() += cost;
        self.total += cost;
        WindowCheck {
            used: self.total,
            retry_at: Some(0),
            free_at: self.free_at(spec),
        }
    }

    /// Takes back `cost` units charged at `charged_at`, as far as they still count.
    pub fn refund(&mut self, spec: &WindowSpec, charged_at: u64, cost: u64) {
        let j = spec.bucket(charged_at);
        if let Some(c) = self.counts.get_mut(&j) {
            let back = cost.min(*c);
            *c -= back;
            self.total -= back;
            if *c == 0 {
                self.counts.remove(&j);
            }
        }
    }

    /// Units counted at `now` and when the oldest of them stops counting (`now`
    /// when none is counted), without changing anything.
    pub fn usage(&self, spec: &WindowSpec, now: u64) -> (u64, u64) {
        let lower = spec.lower(now);
        let mut used = 0;
        let mut resets = None;
        for (&j, &c) in self.counts.range(lower..) {
            if c > 0 {
                used += c;
                resets.get_or_insert(spec.frees_at(j));
            }
        }
        (used, resets.unwrap_or(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn bucket_arithmetic() {
        let s = WindowSpec::new(10, 60_000);
        assert_eq!(s.bucket_ms, 1000);
        assert_eq!(s.span(), 60);
        assert_eq!(s.lower(59_999), 0);
        assert_eq!(s.lower(60_000), 0, "window [1, 60000] starts in bucket 0");
        assert_eq!(s.lower(60_999), 1);
        // A unit charged at 500 (bucket 0) counts until 60 999 inclusive.
        assert_eq!(s.frees_at(0), 60_999);
        assert_eq!(s.lower(s.frees_at(0)), 1);
        let odd = WindowSpec::new(3, 1000);
        assert_eq!(odd.bucket_ms, 17);
        assert_eq!(odd.span(), 59);
        assert_eq!(WindowSpec::new(1, 1).bucket_ms, 1);
    }

    #[test]
    fn a_full_window_frees_its_oldest_bucket_first() {
        let s = WindowSpec::new(3, 60_000);
        let mut w = WindowState::default();
        for t in [1_000, 2_000, 30_000] {
            assert!(w.check(&s, t, 1).fits());
            w.charge(&s, t, 1);
        }
        let c = w.check(&s, 40_000, 1);
        assert_eq!(c.used, 3);
        // The unit from t=1000 (bucket 1) stops counting at 2*1000 + 60000 - 1.
        assert_eq!(c.retry_at, Some(61_999));
        assert_eq!(c.free_at, 61_999);
        assert_eq!(w.check(&s, 40_000, 2).retry_at, Some(62_999));
        assert_eq!(w.check(&s, 40_000, 4).retry_at, None);
        assert!(!w.check(&s, 61_998, 1).fits());
        assert!(w.check(&s, 61_999, 1).fits());
        assert_eq!(w.usage(&s, 61_999), (2, 62_999));
        // Long idle: the counter starts afresh.
        assert_eq!(w.check(&s, 10_000_000, 1).used, 0);
        assert!(w.is_empty());
        assert_eq!(w.usage(&s, 10_000_000), (0, 10_000_000));
    }

    #[test]
    fn refunds_take_back_only_what_still_counts() {
        let s = WindowSpec::new(2, 10_000);
        let mut w = WindowState::default();
        w.check(&s, 100, 1);
        w.charge(&s, 100, 1);
        w.check(&s, 5_000, 1);
        w.charge(&s, 5_000, 1);
        assert!(!w.check(&s, 6_000, 1).fits());
        w.refund(&s, 5_000, 1);
        assert_eq!(w.check(&s, 6_000, 1).used, 1);
        w.roll(&s, 20_000);
        w.refund(&s, 100, 1);
        assert_eq!(w.total(), 0);
    }

    /// Random arrivals against several windows: whatever is admitted, no rolling
    /// window ever holds more than its limit; whatever is refused would have
    /// broken a window at most one bucket longer (the price of bucketing); and the
    /// retry time given is exactly when the request fits.
    #[test]
    fn never_more_than_n_in_any_rolling_window() {
        for seed in 0..40u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let specs = [
                WindowSpec::new(rng.random_range(1..20), rng.random_range(1..5_000)),
                WindowSpec::new(rng.random_range(5..60), rng.random_range(5_000..60_000)),
            ];
            let mut states = [WindowState::default(), WindowState::default()];
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            let mut now = rng.random_range(0..100_000u64);
            for _ in 0..3000 {
                // Bursts and lulls.
                now += match rng.random_range(0..10) {
                    0 => rng.random_range(0..30_000),
                    1..=4 => 0,
                    _ => rng.random_range(0..300),
                };
                let cost = rng.random_range(1..4);
                let checks: Vec<WindowCheck> = specs
                    .iter()
                    .zip(states.iter_mut())
                    .map(|(s, w)| w.check(s, now, cost))
                    .collect();
                if checks.iter().all(WindowCheck::fits) {
                    for (s, w) in specs.iter().zip(states.iter_mut()) {
                        w.charge(s, now, cost);
                    }
                    admitted.push((now, cost));
                    for s in &specs {
                        let in_window: u64 = admitted
                            .iter()
                            .filter(|(t, _)| t + s.window_ms > now)
                            .map(|(_, c)| c)
                            .sum();
                        assert!(in_window <= s.limit, "seed {seed}: {in_window} > {s:?}");
                    }
                } else {
                    // Refused: some window, widened by one bucket, is too full.
                    let too_full = specs.iter().any(|s| {
                        let wide: u64 = admitted
                            .iter()
                            .filter(|(t, _)| t + s.window_ms + s.bucket_ms > now)
                            .map(|(_, c)| c)
                            .sum();
                        wide + cost > s.limit
                    });
                    assert!(too_full, "seed {seed}: refused at {now} without cause");
                    for ((s, w), c) in specs.iter().zip(states.iter()).zip(&checks) {
                        if let Some(at) = c.retry_at.filter(|at| *at > 0) {
                            let mut later = w.clone();
                            assert!(later.check(s, at, cost).fits(), "seed {seed}");
                            let mut before = w.clone();
                            assert!(!before.check(s, at - 1, cost).fits(), "seed {seed}");
                        }
                    }
                }
            }
            assert!(!admitted.is_empty());
        }
    }
}
