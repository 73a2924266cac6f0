//! The pacing model, IO-free: evenly spaced GCRA with a small burst, plus a sliding
//! cap that counts messages still in flight. The embedded store runs exactly this;
//! the Redis store runs the same steps in Lua (`redis.rs`), and a test drives both
//! with the same sequence to check they agree.
//!
//! All times are milliseconds on the store's clock (Redis `TIME`, or the process
//! clock for the embedded store).
//!
//! # Why two mechanisms
//!
//! GCRA alone (emission interval `T = W/N`, tolerance `τ = (b-1)·T`) lets through at
//! most `N + b - 1` messages in any half-open window of length `W` at the sender,
//! and even with `b = 1` one more (`N + 1`) lands inside a closed window `W` at the
//! receiver as soon as the time between our decision and the server's timestamp
//! varies (the fencepost: `N + 1` sends spaced exactly `T` span exactly `W`).
//!
//! So every grant is also checked against a sliding cap that counts what the
//! receiver may have seen: a message is charged from the moment it is granted
//! (*in flight*, counted in every window) until the sender reports when its
//! transaction ended; then it is charged to the bucket of that end time. A grant at
//! `s` needs, per window, `in_flight + Σ buckets ending at or after s - W` plus the
//! new message to stay within `N`. Since a message reaches the server after its
//! grant and before the end time reported, any `N + 1` messages at the server lie
//! more than `W` apart, whatever the network or the server did in between. The
//! oldest bucket (`W/60` wide) counts in full, so the cap errs on the safe side by at
//! most 1/60 of the window. A message granted but never reported (a crashed relay)
//! stays in flight until its deadline, then is charged at its deadline.
//!
//! GCRA keeps the traffic evenly spaced (what providers like to see); the cap is
//! what keeps the promise. In steady state the cap adds the transaction time to each
//! window: a limit of `N/W` delivers `N` per `W + transaction time + W/60`.

use std::collections::BTreeMap;

use crate::quota::config::Limit;

/// Buckets per window of the sliding cap.
pub const BUCKETS: u64 = 60;
/// Largest GCRA burst (messages that may leave back to back after a quiet spell).
pub const MAX_BURST: u64 = 10;

/// One `N/W` limit as the pacer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub window_ms: u64,
    pub limit: u64,
}

impl Window {
    pub fn from_limit(l: &Limit) -> Window {
        Window {
            window_ms: (l.window.as_millis() as u64).max(1),
            limit: l.count.max(1),
        }
    }

    /// GCRA emission interval, stretched by `factor` while a destination is backed off.
    pub fn spacing_ms(&self, factor: f64) -> f64 {
        self.window_ms as f64 * factor / self.limit as f64
    }

    /// A tenth of the limit, between 1 and [`MAX_BURST`].
    pub fn burst(&self) -> u64 {
        self.limit.div_ceil(10).clamp(1, MAX_BURST)
    }

    pub fn granularity_ms(&self) -> u64 {
        (self.window_ms / BUCKETS).max(1)
    }

    fn bucket_of(&self, t: u64) -> u64 {
        t / self.granularity_ms()
    }

    /// The first bucket still counted for a grant at `t`: every message that ended
    /// at or after `t - W` is in it or a later one.
    fn first_counted(&self, t: u64) -> u64 {
        t.saturating_sub(self.window_ms) / self.granularity_ms()
    }
}

/// GCRA and cap state of one window of one quota key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowState {
    /// Theoretical arrival time of the next unit.
    pub tat: f64,
    /// Units by the bucket of their transaction's end.
    pub buckets: BTreeMap<u64, u64>,
}

/// A granted message whose end is not known yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flight {
    pub deadline: u64,
    pub cost: u64,
}

/// Everything the pacer keeps for one quota key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyState {
    /// By window length, so a reload that keeps a window keeps its state.
    pub windows: BTreeMap<u64, WindowState>,
    pub inflight: BTreeMap<String, Flight>,
}

impl KeyState {
    /// Charges `cost` units ending at `at` to every window.
    fn charge(&mut self, at: u64, cost: u64, windows: &[Window]) {
        for w in windows {
            let st = self.windows.entry(w.window_ms).or_default();
            *st.buckets.entry(w.bucket_of(at)).or_default() += cost;
        }
    }

    /// In-flight messages past their deadline are charged at their deadline (their
    /// sender died or lost the store; the message reached the server by then, if
    /// ever), and buckets no grant can count any more are dropped.
    pub fn sweep(&mut self, now: u64, windows: &[Window]) {
        let expired: Vec<(String, Flight)> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(t, f)| (t.clone(), *f))
            .collect();
        for (token, f) in expired {
            self.inflight.remove(&token);
            self.charge(f.deadline, f.cost, windows);
        }
        for w in windows {
            if let Some(st) = self.windows.get_mut(&w.window_ms) {
                let first = w.first_counted(now);
                st.buckets.retain(|&b, _| b >= first);
            }
        }
    }

    /// The message granted under `token` ended at `end` (an upper bound of when the
    /// server saw it). Charged even when its flight already expired and was charged
    /// at the deadline: counting twice only errs on the safe side.
    pub fn commit(&mut self, token: &str, cost: u64, end: u64, windows: &[Window]) {
        self.inflight.remove(token);
        self.charge(end, cost, windows);
    }

    pub fn inflight_units(&self) -> u64 {
        self.inflight.values().map(|f| f.cost).sum()
    }

    /// Units granted for a time after `now` and not sent yet: flights whose deadline
    /// lies beyond `now + flight_ttl` (a grant at `at` starts with the deadline
    /// `at + flight_ttl`, and renewals never move a deadline beyond `now +
    /// flight_ttl`). They are reserved, not seen by the receiver.
    pub fn scheduled_units(&self, now: u64, flight_ttl: u64) -> u64 {
        self.inflight
            .values()
            .filter(|f| f.deadline > now.saturating_add(flight_ttl))
            .map(|f| f.cost)
            .sum()
    }

    /// Units counted against `w` for a grant at `t` (in flight included).
    pub fn used(&self, w: &Window, t: u64) -> u64 {
        let first = w.first_counted(t);
        self.inflight_units()
            + self.windows.get(&w.window_ms).map_or(0, |st| {
                st.buckets.range(first..).map(|(_, c)| c).sum::<u64>()
            })
    }

    /// When the count of `w` drops, as seen at `now`: the end of the oldest counted
    /// bucket's window, or `now` when nothing is counted.
    pub fn resets_at(&self, w: &Window, now: u64) -> u64 {
        let first = w.first_counted(now);
        match self
            .windows
            .get(&w.window_ms)
            .and_then(|st| st.buckets.range(first..).next())
        {
            Some((&b, _)) => (b + 1) * w.granularity_ms() + w.window_ms,
            None => now,
        }
    }

    /// Earliest time `>= from` at which `cost` more units conform to GCRA and the
    /// cap of every window; `None` while in-flight units alone leave no room (only a
    /// report of an end can change that).
    pub fn earliest(&self, from: u64, windows: &[Window], cost: u64, factor: f64) -> Option<u64> {
        let mut s = from;
        for w in windows {
            let Some(st) = self.windows.get(&w.window_ms) else {
                continue;
            };
            let t = w.spacing_ms(factor);
            let tau = (w.burst() - 1) as f64 * t;
            // A message of several units needs room for all of them; one bigger than
            // the burst needs the bucket drained (else it could never go).
            let need = st
                .tat
                .min(st.tat - tau + (cost.saturating_sub(1)) as f64 * t);
            if need > s as f64 {
                s = need.ceil() as u64;
            }
        }
        let inflight = self.inflight_units();
        for w in windows {
            // A message bigger than the whole limit goes alone into an empty window:
            // the only way it can ever leave.
            let room = w.limit.saturating_sub(cost);
            if inflight > room {
                return None;
            }
            let Some(st) = self.windows.get(&w.window_ms) else {
                continue;
            };
            let counted: Vec<(u64, u64)> = st
                .buckets
                .range(w.first_counted(s)..)
                .map(|(&b, &c)| (b, c))
                .collect();
            let mut total = inflight + counted.iter().map(|(_, c)| c).sum::<u64>();
            for (b, c) in counted {
                if total <= room {
                    break;
                }
                total -= c;
                // The first grant time that no longer counts bucket `b`.
                s = s.max((b + 1) * w.granularity_ms() + w.window_ms);
            }
        }
        Some(s)
    }

    /// Grants `cost` units at `at`: advances every window's GCRA and puts the message
    /// in flight until `deadline`.
    pub fn take(
        &mut self,
        at: u64,
        windows: &[Window],
        cost: u64,
        factor: f64,
        token: &str,
        deadline: u64,
    ) {
        for w in windows {
            let st = self.windows.entry(w.window_ms).or_default();
            // Whole milliseconds (rounded up), exactly as the Redis script stores it.
            st.tat = (st.tat.max(at as f64) + cost as f64 * w.spacing_ms(factor)).ceil();
        }
        self.inflight
            .insert(token.to_owned(), Flight { deadline, cost });
    }

    /// Nothing left that could delay or count a future grant.
    pub fn is_idle(&self, now: u64) -> bool {
        self.inflight.is_empty()
            && self
                .windows
                .values()
                .all(|st| st.buckets.is_empty() && st.tat <= now as f64)
    }
}

/// What a grant needs for one quota key.
#[derive(Debug)]
pub struct Demand<'a> {
    pub state: &'a mut KeyState,
    pub windows: &'a [Window],
    pub cost: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Granted; send at or after this time.
    Grant(u64),
    /// Not before this time (further than the caller wanted to wait); nothing taken.
    Later(u64),
    /// In-flight messages fill a window; ask again after one reports its end.
    Blocked,
}

/// Decides one message for every quota key it falls under, all or nothing: the
/// earliest time all of them allow (never before `not_before`), granted when it is
/// at most `max_wait` ahead of `now`.
pub fn decide(
    demands: &mut [Demand<'_>],
    now: u64,
    not_before: u64,
    factor: f64,
    max_wait: u64,
    token: &str,
    flight_ttl: u64,
) -> Decision {
    let mut at = now.max(not_before);
    for d in demands.iter() {
        match d.state.earliest(at, d.windows, d.cost, factor) {
            Some(t) => at = at.max(t),
            None => return Decision::Blocked,
        }
    }
    if at - now > max_wait {
        return Decision::Later(at);
    }
    for d in demands.iter_mut() {
        d.state
            .take(at, d.windows, d.cost, factor, token, at + flight_ttl);
    }
    Decision::Grant(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn w(limit: u64, window_ms: u64) -> Window {
        Window { window_ms, limit }
    }

    /// Grants as fast as allowed, one message at a time, each taking `delay(i)` from
    /// grant to end; returns (grant, end) per message.
    fn run(windows: &[Window], n: usize, mut delay: impl FnMut(usize) -> u64) -> Vec<(u64, u64)> {
        let mut st = KeyState::default();
        let mut now = 1_000_000;
        let mut out = Vec::new();
        for i in 0..n {
            let token = format!("t{i}");
            st.sweep(now, windows);
            let mut d = [Demand {
                state: &mut st,
                windows,
                cost: 1,
            }];
            let at = match decide(&mut d, now, 0, 1.0, u64::MAX / 4, &token, 600_000) {
                Decision::Grant(at) => at,
                other => panic!("{other:?}"),
            };
            let end = at + delay(i);
            st.commit(&token, 1, end, windows);
            out.push((at, end));
            now = end;
        }
        out
    }

    /// At most `limit` of `times` in any closed interval of length `window`.
    fn max_in_window(times: &[u64], window: u64) -> usize {
        let mut t = times.to_vec();
        t.sort_unstable();
        (0..t.len())
            .map(|i| t[i..].iter().take_while(|&&x| x <= t[i] + window).count())
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn evenly_spaced_after_the_burst() {
        let win = [w(100, 60_000)];
        assert_eq!(win[0].burst(), 10);
        let g = run(&win, 30, |_| 0);
        // The burst leaves at once, then one every W/N = 600 ms.
        assert!(g[..10].iter().all(|(at, _)| *at == g[0].0));
        for pair in g[10..].windows(2) {
            assert_eq!(pair[1].0 - pair[0].0, 600, "{g:?}");
        }
    }

    #[test]
    fn the_fencepost_is_closed_even_with_exact_spacing() {
        // b = 1, N = 10, W = 5 s: GCRA alone would allow 11 in a closed 5 s window
        // at the receiver (sends 0, 500, ..., 5000). The cap pushes the 11th out.
        let win = [w(10, 5_000)];
        assert_eq!(win[0].burst(), 1);
        let g = run(&win, 40, |_| 0);
        let ends: Vec<u64> = g.iter().map(|x| x.1).collect();
        assert!(max_in_window(&ends, 5_000) <= 10, "{g:?}");
    }

    #[test]
    fn receiver_never_sees_more_than_n_whatever_the_delays() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..200 {
            let limit = rng.random_range(1..30);
            let window = rng.random_range(1_000..20_000);
            let win = [w(limit, window), w(limit * 3, window * 5)];
            let mut delays = Vec::new();
            let g = run(&win, 150, |_| {
                let d = if rng.random_bool(0.1) {
                    rng.random_range(0..window)
                } else {
                    rng.random_range(0..200)
                };
                delays.push(d);
                d
            });
            // The server sees each message somewhere between its grant and its end.
            let mut rng2 = rand::rngs::StdRng::seed_from_u64(round);
            let seen: Vec<u64> = g
                .iter()
                .map(|&(at, end)| rng2.random_range(at..=end))
                .collect();
            for x in &win {
                assert!(
                    max_in_window(&seen, x.window_ms) as u64 <= x.limit,
                    "round {round}: {x:?} {g:?}"
                );
            }
        }
    }

    #[test]
    fn concurrent_senders_share_the_limit_through_in_flight_counting() {
        // Three connections; each message is in flight for a random time, and the
        // connections interleave: grants are only ever made against what is known.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let win = [w(7, 3_000)];
        let mut st = KeyState::default();
        let mut now = 10_000u64;
        // (connection busy until, token, grant)
        let mut busy: Vec<Option<(u64, String, u64)>> = vec![None; 3];
        let mut seen = Vec::new();
        let mut n = 0;
        while seen.len() < 300 {
            // Finish whatever ended by now.
            for b in busy.iter_mut() {
                if let Some((end, token, at)) = b.clone()
                    && end <= now
                {
                    st.commit(&token, 1, end, &win);
                    seen.push(rng.random_range(at..=end));
                    *b = None;
                }
            }
            st.sweep(now, &win);
            for b in busy.iter_mut().filter(|b| b.is_none()) {
                n += 1;
                let token = format!("t{n}");
                let mut d = [Demand {
                    state: &mut st,
                    windows: &win,
                    cost: 1,
                }];
                if let Decision::Grant(at) = decide(&mut d, now, 0, 1.0, 0, &token, 60_000) {
                    *b = Some((at + rng.random_range(0..900), token, at));
                }
            }
            now += rng.random_range(1..120);
        }
        assert!(max_in_window(&seen, 3_000) <= 7);
    }

    #[test]
    fn denial_takes_nothing_and_names_the_time() {
        let win = [w(2, 10_000)];
        let mut st = KeyState::default();
        for i in 0..2 {
            let mut d = [Demand {
                state: &mut st,
                windows: &win,
                cost: 1,
            }];
            let got = decide(&mut d, 0, 0, 1.0, 100_000, &format!("a{i}"), 60_000);
            assert!(matches!(got, Decision::Grant(_)), "{got:?}");
        }
        // Two in flight fill the window.
        let before = st.clone();
        let mut d = [Demand {
            state: &mut st,
            windows: &win,
            cost: 1,
        }];
        assert_eq!(
            decide(&mut d, 0, 0, 1.0, 100_000, "x", 60_000),
            Decision::Blocked
        );
        assert_eq!(st, before);
        st.commit("a0", 1, 100, &win);
        st.commit("a1", 1, 5_200, &win);
        // Now the oldest end decides: its bucket (166 ms wide) must leave the window.
        let mut d = [Demand {
            state: &mut st,
            windows: &win,
            cost: 1,
        }];
        assert_eq!(
            decide(&mut d, 5_300, 0, 1.0, 1_000, "x", 60_000),
            Decision::Later(10_166)
        );
        assert_eq!(st.used(&win[0], 5_300), 2);
        assert_eq!(st.resets_at(&win[0], 5_300), 10_166);
    }

    #[test]
    fn backoff_factor_stretches_the_spacing_and_not_before_holds() {
        let win = [w(10, 1_000)];
        let mut st = KeyState::default();
        let mut grants = Vec::new();
        for i in 0..3 {
            let mut d = [Demand {
                state: &mut st,
                windows: &win,
                cost: 1,
            }];
            if let Decision::Grant(at) =
                decide(&mut d, 0, 500, 4.0, 10_000, &format!("t{i}"), 60_000)
            {
                grants.push(at);
            }
        }
        assert_eq!(grants, [500, 900, 1300]);
    }

    #[test]
    fn big_messages_need_room_for_every_unit() {
        // Recipients as the unit: a message to 5 recipients under 4/1s goes alone
        // into an empty window; one to 3 waits for 3 units of room.
        let win = [w(4, 1_000)];
        let mut st = KeyState::default();
        let mut d = [Demand {
            state: &mut st,
            windows: &win,
            cost: 5,
        }];
        assert_eq!(
            decide(&mut d, 0, 0, 1.0, 0, "big", 60_000),
            Decision::Grant(0)
        );
        st.commit("big", 5, 10, &win);
        let mut d = [Demand {
            state: &mut st,
            windows: &win,
            cost: 3,
        }];
        let Decision::Later(t) = decide(&mut d, 20, 0, 1.0, 0, "m", 60_000) else {
            panic!()
        };
        assert!(t >= 1_010, "{t}");
    }

    #[test]
    fn expired_flights_are_charged_at_their_deadline() {
        let win = [w(1, 1_000)];
        let mut st = KeyState::default();
        let mut d = [Demand {
            state: &mut st,
            windows: &win,
            cost: 1,
        }];
        assert_eq!(
            decide(&mut d, 0, 0, 1.0, 0, "dead", 5_000),
            Decision::Grant(0)
        );
        st.sweep(4_999, &win);
        assert_eq!(st.inflight.len(), 1);
        st.sweep(5_000, &win);
        assert!(st.inflight.is_empty());
        assert_eq!(st.used(&win[0], 5_100), 1);
        assert!(!st.is_idle(5_100));
        st.sweep(7_000, &win);
        assert!(st.is_idle(7_000));
    }
}
