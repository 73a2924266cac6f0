//! Adaptive back-off of a destination that answered with a rate-limit reply
//! (`421`, or a `4xx` with enhanced status `4.7.x`), IO-free.
//!
//! Level `L` (0 = normal) pauses all traffic to the site for `base · 2^(L-1)` after
//! the reply that raised it; after the pause, paced quotas send at `2^-L` of their
//! rate, and the level drops by one every `recover` without another such reply
//! (back off, then recover). A reply received during a pause does not raise the
//! level again: it comes from a connection that started before the pause, not from
//! a new complaint. The state is one small record per site, shared through the
//! store, so every relay process backs off together.

use mailrelay_smtp::Reply;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub base_ms: u64,
    pub max_level: u32,
    pub recover_ms: u64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base_ms: 15_000,
            // 15 s, 30 s, 1 min, 2 min, 4 min, 8 min.
            max_level: 6,
            recover_ms: 60_000,
        }
    }
}

/// The shared record of one site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackoffState {
    pub level: u32,
    /// When the reply that set `level` was reported.
    pub hit_ms: u64,
}

impl BackoffPolicy {
    /// End of the pause (0 when there is none).
    pub fn until(&self, s: &BackoffState) -> u64 {
        if s.level == 0 {
            return 0;
        }
        s.hit_ms + self.base_ms.saturating_mul(1 << (s.level - 1).min(30))
    }

    /// The level in force at `now`, after recovery.
    pub fn level_at(&self, s: &BackoffState, now: u64) -> u32 {
        let until = self.until(s);
        if s.level == 0 || now < until {
            return s.level;
        }
        let steps = (now - until) / self.recover_ms.max(1);
        s.level
            .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX))
    }

    /// How much slower paced quotas go at `now` (1 = normal).
    pub fn factor(&self, s: &BackoffState, now: u64) -> f64 {
        f64::from(1u32 << self.level_at(s, now).min(30))
    }

    /// A rate-limit reply reported at `now`.
    pub fn on_rate_limited(&self, s: &BackoffState, now: u64) -> BackoffState {
        if s.level > 0 && now < self.until(s) {
            return *s;
        }
        BackoffState {
            level: (self.level_at(s, now) + 1).min(self.max_level.max(1)),
            hit_ms: now,
        }
    }

    /// How long the record matters: after this it reads as level 0.
    pub fn expires_at(&self, s: &BackoffState) -> u64 {
        self.until(s) + u64::from(s.level) * self.recover_ms
    }
}

/// Whether a reply from the server says "slow down": `421` (closing, most often
/// "too many connections" or "rate limited") or any `4.7.x` temporary refusal
/// (`450 4.7.0`, `451 4.7.1`, Gmail's `421 4.7.28`, …). Greylisting that uses
/// `4.7.x` backs off too, which is what greylisting asks for anyway.
pub fn is_rate_limit_reply(reply: &Reply) -> bool {
    reply.code == 421
        || (reply.code / 100 == 4 && reply.enhanced.is_some_and(|e| e.0 == 4 && e.1 == 7))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_then_recover() {
        let p = BackoffPolicy::default();
        let s0 = BackoffState::default();
        assert_eq!(
            (p.until(&s0), p.level_at(&s0, 5), p.factor(&s0, 5)),
            (0, 0, 1.0)
        );
        let s1 = p.on_rate_limited(&s0, 1_000);
        assert_eq!(
            s1,
            BackoffState {
                level: 1,
                hit_ms: 1_000
            }
        );
        assert_eq!(p.until(&s1), 16_000);
        // More complaints during the pause change nothing.
        assert_eq!(p.on_rate_limited(&s1, 10_000), s1);
        // After the pause: half rate until one recovery period passes.
        assert_eq!(p.factor(&s1, 16_000), 2.0);
        assert_eq!(p.factor(&s1, 75_999), 2.0);
        assert_eq!(p.factor(&s1, 76_000), 1.0);
        // A complaint right after the pause doubles it.
        let s2 = p.on_rate_limited(&s1, 17_000);
        assert_eq!(s2.level, 2);
        assert_eq!(p.until(&s2), 47_000);
        assert_eq!(p.expires_at(&s2), 167_000);
        assert_eq!(p.level_at(&s2, 167_000), 0);
        // Capped.
        let mut s = s2;
        for i in 0..20 {
            s = p.on_rate_limited(&s, p.until(&s) + i);
        }
        assert_eq!(s.level, p.max_level);
        assert_eq!(p.until(&s) - s.hit_ms, 15_000 << 5);
    }

    #[test]
    fn which_replies_mean_slow_down() {
        for (code, esc, yes) in [
            (421, None, true),
            (421, Some((4, 7, 28)), true),
            (450, Some((4, 7, 0)), true),
            (451, Some((4, 7, 1)), true),
            (452, Some((4, 5, 3)), false),
            (451, None, false),
            (450, Some((4, 2, 0)), false),
            (550, Some((5, 7, 1)), false),
            (250, None, false),
        ] {
            let r = match esc {
                Some(e) => Reply::status(code, e, "x"),
                None => Reply::new(code, None, "x"),
            };
            assert_eq!(is_rate_limit_reply(&r), yes, "{code} {esc:?}");
        }
    }
}
