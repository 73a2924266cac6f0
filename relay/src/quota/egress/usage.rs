//! Egress usage in the shape of the admin API's `QuotaUsage`
//! (`GET /api/v1/quotas[/{name}]`): per key and window `used`, `remaining` and the
//! reset time, and `connections: {max, open}` for quotas with a connection cap.

use super::pacer::Window;
use super::store::KeyUse;
use crate::quota::config::{Direction, Limit, QuotaConfig, Scope};
use crate::quota::usage::rfc3339;

/// Keys listed per quota at most (most used first).
pub const MAX_KEYS: usize = 100;

// The admin API's types: ingress and egress quotas answer in one shape.
pub use crate::quota::usage::{Connections, KeyUsage, QuotaUsage, WindowUsage};

/// Builds the API view of `q` from what the store read at `now_ms`. Keys are sorted
/// by use of the longest window, most used first, at most [`MAX_KEYS`]; a shared
/// quota always shows its one key `*`.
pub fn quota_usage(q: &QuotaConfig, now_ms: u64, mut uses: Vec<KeyUse>) -> QuotaUsage {
    let limits: Vec<&Limit> = q.limits.iter().collect();
    let windows: Vec<Window> = limits.iter().map(|l| Window::from_limit(l)).collect();
    let longest = windows
        .iter()
        .enumerate()
        .max_by_key(|(_, w)| w.window_ms)
        .map(|(i, _)| i);
    if q.scope == Scope::Shared && uses.is_empty() {
        uses.push(KeyUse {
            key: "*".into(),
            windows: windows.iter().map(|_| (0, now_ms)).collect(),
            scheduled: 0,
            open_connections: 0,
        });
    }
    let used_of = |u: &KeyUse| longest.and_then(|i| u.windows.get(i)).map_or(0, |w| w.0);
    // Without windows, a connection-only quota sorts by open connections.
    uses.sort_by(|a, b| {
        (used_of(b), b.open_connections, &a.key).cmp(&(used_of(a), a.open_connections, &b.key))
    });
    uses.truncate(MAX_KEYS);
    QuotaUsage {
        name: q.name.clone(),
        direction: Direction::Egress.into(),
        scope: q.scope.into(),
        action: q.action.into(),
        limits: q.limits.iter().map(ToString::to_string).collect(),
        keys: uses
            .into_iter()
            .map(|u| KeyUsage {
                windows: limits
                    .iter()
                    .zip(&u.windows)
                    .map(|(l, &(counted, resets))| {
                        let resets = resets.max(now_ms);
                        // The pacer counts grants for a later time in every window
                        // at once; the receiver has not seen them.
                        let scheduled = u.scheduled.min(counted);
                        WindowUsage {
                            limit: l.to_string(),
                            window_seconds: l.window.as_secs(),
                            used: counted - scheduled,
                            remaining: l.count.saturating_sub(counted),
                            scheduled: Some(scheduled),
                            resets_at: rfc3339(resets),
                            resets_in_seconds: (resets - now_ms).div_ceil(1000),
                        }
                    })
                    .collect(),
                connections: q.max_connections.map(|max| Connections {
                    max,
                    open: u.open_connections,
                }),
                key: u.key,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_matches_the_agreed_json() {
        let q: QuotaConfig = serde_norway::from_str(
            "{name: gmail, direction: egress, limits: [100/1m, 1000/1h], key: mx_site, max_connections: 5}",
        )
        .unwrap();
        // 2026-11-29T05:00:29Z
        let now = 1_795_928_429_000;
        let uses = vec![
            KeyUse {
                key: "small.site".into(),
                windows: vec![(1, now + 1_000), (1, now + 2_000)],
                scheduled: 0,
                open_connections: 0,
            },
            KeyUse {
                key: "mx1.google.com,mx2.google.com".into(),
                windows: vec![(12, now + 31_000), (40, now + 3_000_000)],
                // Two granted for a later time: counted, not yet sent.
                scheduled: 2,
                open_connections: 2,
            },
        ];
        let u = quota_usage(&q, now, uses);
        let json = serde_json::to_value(&u).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "gmail", "direction": "egress", "scope": "per_key", "action": "reject",
                "limits": ["100/1m", "1000/1h"],
                "keys": [
                    {"key": "mx1.google.com,mx2.google.com",
                     "windows": [
                        {"limit": "100/1m", "window_seconds": 60, "used": 10, "remaining": 88, "scheduled": 2,
                         "resets_at": "2026-11-29T05:01:00Z", "resets_in_seconds": 31},
                        {"limit": "1000/1h", "window_seconds": 3600, "used": 38, "remaining": 960, "scheduled": 2,
                         "resets_at": "2026-11-29T05:50:29Z", "resets_in_seconds": 3000}],
                     "connections": {"max": 5, "open": 2}},
                    {"key": "small.site",
                     "windows": [
                        {"limit": "100/1m", "window_seconds": 60, "used": 1, "remaining": 99, "scheduled": 0,
                         "resets_at": "2026-11-29T05:00:30Z", "resets_in_seconds": 1},
                        {"limit": "1000/1h", "window_seconds": 3600, "used": 1, "remaining": 999, "scheduled": 0,
                         "resets_at": "2026-11-29T05:00:31Z", "resets_in_seconds": 2}],
                     "connections": {"max": 5, "open": 0}}
                ]
            })
        );
    }

    #[test]
    fn a_shared_quota_always_has_its_one_key() {
        let q: QuotaConfig = serde_norway::from_str(
            "{name: all, direction: egress, limits: [10/1s], scope: shared}",
        )
        .unwrap();
        let u = quota_usage(&q, 5_000, vec![]);
        assert_eq!(u.keys.len(), 1);
        assert_eq!(u.keys[0].key, "*");
        assert_eq!(u.keys[0].windows[0].remaining, 10);
        assert_eq!(u.keys[0].windows[0].resets_in_seconds, 0);
        assert!(u.keys[0].connections.is_none());
    }
}
