//! When to try a deferred message again, and when to give up on it.
//!
//! The schedule is Postfix's: the first retry comes `first` after a temporary
//! failure (`minimal_backoff_time`), each later one `multiplier` times further out,
//! capped at `max_backoff` (`maximal_backoff_time`), and a message older than
//! `max_lifetime` (`maximal_queue_lifetime`) is bounced instead of retried. A random
//! jitter spreads retries so that a burst of mail deferred by one outage does not come
//! back as one burst. Everything here is pure: the caller supplies the clock and rng.

use std::time::Duration;

use crate::config::RetryPolicy;

impl RetryPolicy {
    /// The un-jittered delay after `attempts_so_far` failed attempts:
    /// `min(first * multiplier^(n-1), max_backoff)`; `n = 0` is treated as 1.
    pub fn base_delay(&self, attempts_so_far: u32) -> Duration {
        let exp = attempts_so_far.saturating_sub(1);
        // Computed in f64 seconds: powi saturates to infinity instead of overflowing,
        // and the `min` below brings it back.
        let secs = self.first.as_secs_f64() * self.multiplier.powi(exp.min(i32::MAX as u32) as i32);
        let cap = self.max_backoff.as_secs_f64();
        if secs.is_finite() && secs < cap {
            Duration::from_secs_f64(secs)
        } else {
            self.max_backoff
        }
    }

    /// When (ms since the epoch) to try again after `attempts_so_far` failed attempts
    /// of a message received at `received_at_ms`, or `None` when its lifetime is over
    /// and it must be bounced.
    ///
    /// The result is `now + base_delay` scaled by the jitter, always after `now`, and
    /// clamped to the end of the lifetime: a message whose next retry would fall after
    /// expiry gets one final attempt exactly at expiry (rather than being bounced
    /// early, or being retried late); the call made after that attempt returns `None`.
    pub fn next_attempt(
        &self,
        attempts_so_far: u32,
        received_at_ms: u64,
        now_ms: u64,
        rng: &mut impl rand::Rng,
    ) -> Option<u64> {
        let expires_ms = received_at_ms
            .saturating_add(self.max_lifetime.as_millis().min(u64::MAX as u128) as u64);
        if now_ms >= expires_ms {
            return None;
        }
        let base_ms = self.base_delay(attempts_so_far).as_secs_f64() * 1000.0;
        let factor = if self.jitter > 0.0 {
            1.0 + rng.random_range(-self.jitter..=self.jitter)
        } else {
            1.0
        };
        // At least 1 ms so a retry is always strictly in the future.
        let delay_ms = (base_ms * factor).max(1.0) as u64;
        Some(now_ms.saturating_add(delay_ms).min(expires_ms))
    }

    /// True when a delay warning is due for a message received at `received_at_ms`.
    pub fn delay_warning_due(&self, received_at_ms: u64, now_ms: u64) -> bool {
        self.delay_warning.is_some_and(|w| {
            now_ms >= received_at_ms.saturating_add(w.as_millis().min(u64::MAX as u128) as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const MIN: u64 = 60_000;

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_postfix_like() {
        let p = RetryPolicy::default();
        p.validate().unwrap();
        assert_eq!(p.first, Duration::from_secs(300));
        assert_eq!(p.max_lifetime, Duration::from_secs(5 * 86400));
    }

    #[test]
    fn growth_is_exponential() {
        let p = no_jitter();
        let mut rng = StdRng::seed_from_u64(1);
        let now = 1_000_000;
        let d: Vec<u64> = (1..=4)
            .map(|n| p.next_attempt(n, now, now, &mut rng).unwrap() - now)
            .collect();
        assert_eq!(d, vec![5 * MIN, 10 * MIN, 20 * MIN, 40 * MIN]);
        // n = 0 behaves like the first failure.
        assert_eq!(p.next_attempt(0, now, now, &mut rng), Some(now + 5 * MIN));
    }

    #[test]
    fn delay_is_capped() {
        let p = no_jitter();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(p.base_delay(7), Duration::from_secs(4 * 3600)); // 5m*64 > 4h
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(4 * 3600));
        assert_eq!(
            p.next_attempt(50, 0, 1000, &mut rng),
            Some(1000 + 240 * MIN)
        );
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let p = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(42);
        let (mut lo, mut hi) = (u64::MAX, 0);
        for _ in 0..2000 {
            let d = p.next_attempt(1, 0, 0, &mut rng).unwrap();
            lo = lo.min(d);
            hi = hi.max(d);
        }
        assert!(lo >= 4 * MIN, "{lo}");
        assert!(hi <= 6 * MIN, "{hi}");
        // It actually spreads.
        assert!(hi - lo > MIN, "{lo}..{hi}");
    }

    #[test]
    fn expiry_bounces_and_final_attempt_is_at_expiry() {
        let p = no_jitter();
        let mut rng = StdRng::seed_from_u64(1);
        let life = 5 * 24 * 60 * MIN;
        assert_eq!(p.next_attempt(3, 0, life, &mut rng), None);
        assert_eq!(p.next_attempt(3, 0, life + 1, &mut rng), None);
        // Four hours would pass expiry: the last try is exactly at expiry.
        assert_eq!(p.next_attempt(20, 0, life - MIN, &mut rng), Some(life));
    }

    #[test]
    fn schedule_is_monotonic() {
        let p = RetryPolicy::default();
        let mut prev = Duration::ZERO;
        for n in 1..40 {
            let d = p.base_delay(n);
            assert!(d >= prev);
            prev = d;
        }
        // Simulated queue life: each retry is after the previous, then expiry.
        let mut rng = StdRng::seed_from_u64(7);
        let (mut now, mut n) = (0u64, 1u32);
        while let Some(t) = p.next_attempt(n, 0, now, &mut rng) {
            assert!(t > now);
            now = t;
            n += 1;
            assert!(n < 100);
        }
        assert_eq!(now, 5 * 24 * 60 * MIN);
    }

    #[test]
    fn seeded_rng_is_deterministic() {
        let p = RetryPolicy::default();
        let run = || {
            let mut rng = StdRng::seed_from_u64(99);
            (1..10)
                .map(|n| p.next_attempt(n, 0, 1000, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn validate_names_the_field() {
        let bad = |f: fn(&mut RetryPolicy), field: &str| {
            let mut p = RetryPolicy::default();
            f(&mut p);
            let e = p.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        };
        bad(|p| p.first = Duration::ZERO, "first");
        bad(|p| p.max_backoff = Duration::from_secs(1), "max_backoff");
        bad(|p| p.multiplier = 0.5, "multiplier");
        bad(|p| p.multiplier = f64::NAN, "multiplier");
        bad(|p| p.jitter = 1.0, "jitter");
        bad(|p| p.jitter = -0.1, "jitter");
        bad(|p| p.max_lifetime = Duration::ZERO, "max_lifetime");
        bad(
            |p| p.delay_warning = Some(Duration::from_secs(6 * 86400)),
            "delay_warning",
        );
    }

    #[test]
    fn serde_round_trip_and_unknown_fields() {
        let p: RetryPolicy =
            serde_json::from_str(r#"{"first":"1m","delay_warning":"4h"}"#).unwrap();
        assert_eq!(p.first, Duration::from_secs(60));
        assert_eq!(p.delay_warning, Some(Duration::from_secs(4 * 3600)));
        assert_eq!(p.max_backoff, RetryPolicy::default().max_backoff);
        let back: RetryPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<RetryPolicy>(r#"{"bogus":1}"#).is_err());
        assert!(p.delay_warning_due(0, 4 * 3600 * 1000));
        assert!(!p.delay_warning_due(0, 4 * 3600 * 1000 - 1));
    }
}
