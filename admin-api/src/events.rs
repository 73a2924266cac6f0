//! Delivery events: the record the relay stores and serves
//! (`GET /api/v1/events`), and the query that selects them.
//!
//! The same [`Event`] is what the relay writes into its event store and what a
//! webhook's CloudEvents envelope carries as `data`, so the three never drift.

use serde::{Deserialize, Serialize};

/// What happened to a message (or one of its recipients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The relay answered `250` to the message (one event per message).
    Accepted,
    /// A recipient's server took it (`2xx`).
    Delivered,
    /// A recipient's server answered `4xx` (or could not be reached); retried later.
    Deferred,
    /// A recipient's server answered `5xx`; final.
    Bounced,
    /// A recipient was still pending at the maximum queue lifetime; final.
    Expired,
    /// A recipient was on a suppression list: refused or dropped, never sent.
    Suppressed,
    /// A delivery status notification was queued for the sender.
    DsnSent,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Accepted,
        EventKind::Delivered,
        EventKind::Deferred,
        EventKind::Bounced,
        EventKind::Expired,
        EventKind::Suppressed,
        EventKind::DsnSent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Bounced => "bounced",
            EventKind::Expired => "expired",
            EventKind::Suppressed => "suppressed",
            EventKind::DsnSent => "dsn_sent",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One delivery event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Given by the store when written (`<ms>-<seq>`, a Redis stream ID); ordered
    /// by write time. Empty before the event is stored.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub kind: EventKind,
    /// When it happened, ms since the Unix epoch.
    pub at_ms: u64,
    pub queue_id: String,
    /// The message's `Message-ID:` header, without angle brackets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Envelope sender (empty for the null sender).
    pub sender: String,
    /// The recipient this event is about (none for `accepted`, `dsn_sent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// The AUTH user that submitted the message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// Whose mail it is: the AUTH user, else the sender's domain.
    pub tenant: String,
    /// Bounce classification of the reply (`invalid_recipient`, `mailbox_full`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The remote server's reply (or why there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The MX host (or smarthost) that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cipher: Option<String>,
    /// For `dsn_sent`: the queue ID of the notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn_id: Option<String>,
}

impl Event {
    /// The domain of the sender, lowercased (empty for the null sender).
    pub fn sender_domain(&self) -> String {
        self.sender
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or_default()
    }
}

/// Most events one request returns.
pub const MAX_EVENT_LIMIT: usize = 1000;
/// Events returned when no limit is given.
pub const DEFAULT_EVENT_LIMIT: usize = 100;
/// Longest value of a text filter (an address is at most 320 bytes, a Message-ID
/// rarely more than 100).
pub const MAX_FILTER_LEN: usize = 998;

/// The query of `GET /api/v1/events`: every given filter must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// With or without angle brackets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Envelope sender (ASCII case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Recipient (ASCII case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// From this time on (ms since the epoch, inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Up to this time (ms since the epoch, inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// At most this many, the newest (default [`DEFAULT_EVENT_LIMIT`], at most
    /// [`MAX_EVENT_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A checked [`EventQuery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter {
    pub queue_id: Option<String>,
    pub message_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub kind: Option<EventKind>,
    pub limit: usize,
}

/// A refused query; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FilterError {
    pub field: &'static str,
    pub message: String,
}

impl EventQuery {
    /// Checks the bounds; an error names the offending field.
    pub fn check(&self) -> Result<EventFilter, FilterError> {
        let text =
            |field: &'static str, v: &Option<String>| -> Result<Option<String>, FilterError> {
                match v {
                    None => Ok(None),
                    Some(s) if s.len() > MAX_FILTER_LEN => Err(FilterError {
                        field,
                        message: format!("{} bytes is longer than {MAX_FILTER_LEN}", s.len()),
                    }),
                    Some(s) if s.is_empty() => Err(FilterError {
                        field,
                        message: "is empty".into(),
                    }),
                    Some(s) => Ok(Some(s.clone())),
                }
            };
        let limit = self.limit.unwrap_or(DEFAULT_EVENT_LIMIT);
        if limit == 0 || limit > MAX_EVENT_LIMIT {
            return Err(FilterError {
                field: "limit",
                message: format!("{limit} is not between 1 and {MAX_EVENT_LIMIT}"),
            });
        }
        if let (Some(s), Some(u)) = (self.since_ms, self.until_ms)
            && s > u
        {
            return Err(FilterError {
                field: "since",
                message: "is after until".into(),
            });
        }
        let kind = match &self.kind {
            None => None,
            Some(k) => Some(EventKind::parse(k).ok_or_else(|| FilterError {
                field: "kind",
                message: format!(
                    "unknown event kind {:?}; known: {}",
                    k.chars().take(40).collect::<String>(),
                    EventKind::ALL.map(|k| k.as_str()).join(", ")
                ),
            })?),
        };
        Ok(EventFilter {
            queue_id: text("queue_id", &self.queue_id)?,
            message_id: text("message_id", &self.message_id)?.map(|m| {
                m.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            }),
            from: text("from", &self.from)?,
            to: text("to", &self.to)?,
            since_ms: self.since_ms,
            until_ms: self.until_ms,
            kind,
            limit,
        })
    }
}

impl EventFilter {
    /// Whether `e` passes every filter but the time range (which the stores
    /// apply by ID).
    pub fn matches(&self, e: &Event) -> bool {
        self.queue_id.as_deref().is_none_or(|q| e.queue_id == q)
            && self
                .message_id
                .as_deref()
                .is_none_or(|m| e.message_id.as_deref() == Some(m))
            && self
                .from
                .as_deref()
                .is_none_or(|f| e.sender.eq_ignore_ascii_case(f))
            && self.to.as_deref().is_none_or(|t| {
                e.recipient
                    .as_deref()
                    .is_some_and(|r| r.eq_ignore_ascii_case(t))
            })
            && self.kind.is_none_or(|k| e.kind == k)
            && self.since_ms.is_none_or(|s| e.at_ms >= s)
            && self.until_ms.is_none_or(|u| e.at_ms <= u)
    }
}

/// `GET /api/v1/events`: oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<Event>,
    /// The store stopped looking before the range was read through (it reads at
    /// most a bounded number of events per request): narrow the time range.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

// ------------------------------------------------ times and text (CLI, plugin)

/// A time given on a command line, as ms since the epoch: a duration back from
/// `now_ms` (`90s`, `15m`, `1h`, `2d`), an RFC 3339 UTC time
/// (`2026-12-07T10:00:00Z`), or ms since the epoch. `flag` names it in errors.
pub fn parse_time(s: &str, now_ms: u64, flag: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "{flag} {s:?}: give a duration back from now (30s, 15m, 1h, 2d), a UTC time (2026-12-07T10:00:00Z) or ms since the epoch"
        )
    };
    if let Some(unit) = s.chars().last().filter(|c| c.is_ascii_alphabetic())
        && s.len() > 1
        && s[..s.len() - 1].bytes().all(|b| b.is_ascii_digit())
    {
        let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
        let secs = match unit {
            's' => n,
            'm' => n.saturating_mul(60),
            'h' => n.saturating_mul(3600),
            'd' => n.saturating_mul(86_400),
            _ => return Err(bad()),
        };
        return Ok(now_ms.saturating_sub(secs.saturating_mul(1000)));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| bad());
    }
    parse_rfc3339_utc(s).ok_or_else(bad)
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
fn parse_rfc3339_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || !s.ends_with(['Z', 'z']) || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = &s[19..s.len() - 1];
    let ms = match frac.strip_prefix('.') {
        None if frac.is_empty() => 0,
        Some(f) if !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()) => {
            format!("{f:0<3}")[..3].parse::<i64>().ok()?
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let t = ((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000) + ms;
    u64::try_from(t).ok()
}

// Howard Hinnant's civil-calendar conversions.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.fffZ`.
pub fn format_time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The human-readable table of `mailrelay events` and `kubectl mailrelay events`.
pub fn format_events(list: &EventList) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if list.events.is_empty() {
        out.push_str("no events match\n");
    }
    for e in &list.events {
        let _ = write!(
            out,
            "{}  {:<10} {}  <{}> -> {}",
            format_time(e.at_ms),
            e.kind.as_str(),
            e.queue_id,
            e.sender,
            e.recipient.as_deref().unwrap_or("-"),
        );
        if let Some(m) = &e.message_id {
            let _ = write!(out, "  message-id=<{m}>");
        }
        if let Some(mx) = &e.mx {
            let _ = write!(out, "  mx={mx}");
        }
        if let (Some(v), Some(c)) = (&e.tls_version, &e.tls_cipher) {
            let _ = write!(out, "  tls={v}/{c}");
        }
        if let Some(c) = &e.category {
            let _ = write!(out, "  category={c}");
        }
        if let Some(d) = &e.dsn_id {
            let _ = write!(out, "  dsn={d}");
        }
        if let Some(r) = &e.reply {
            let _ = write!(out, "  reply=\"{}\"", r.replace('"', "'"));
        }
        out.push('\n');
    }
    if list.truncated {
        out.push_str("(stopped reading before the start of the range: narrow --since/--until)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_format() {
        let now = 1_765_000_000_000;
        assert_eq!(parse_time("1h", now, "--since").unwrap(), now - 3_600_000);
        assert_eq!(
            parse_time("1700000000123", now, "--since").unwrap(),
            1_700_000_000_123
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now, "--since").unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20.5Z", now, "--since").unwrap(),
            1_700_000_000_500
        );
        assert_eq!(format_time(1_700_000_000_500), "2023-11-14T22:13:20.500Z");
        let e = parse_time("yesterday", now, "--since").unwrap_err();
        assert!(e.starts_with("--since \"yesterday\""), "{e}");
        assert!(
            parse_time("1w", now, "--until")
                .unwrap_err()
                .starts_with("--until")
        );
    }

    #[test]
    fn oversized_and_unknown_filters_name_the_field() {
        let q = EventQuery {
            limit: Some(5000),
            ..Default::default()
        };
        assert_eq!(q.check().unwrap_err().field, "limit");
        let q = EventQuery {
            to: Some("x".repeat(2000)),
            ..Default::default()
        };
        let e = q.check().unwrap_err();
        assert_eq!(e.to_string(), "to: 2000 bytes is longer than 998");
        let q = EventQuery {
            kind: Some("sent".into()),
            ..Default::default()
        };
        assert_eq!(q.check().unwrap_err().field, "kind");
        let q = EventQuery {
            since_ms: Some(2),
            until_ms: Some(1),
            ..Default::default()
        };
        assert_eq!(q.check().unwrap_err().field, "since");
        let f = EventQuery {
            message_id: Some("<a@b>".into()),
            ..Default::default()
        }
        .check()
        .unwrap();
        assert_eq!(f.message_id.as_deref(), Some("a@b"));
        assert_eq!(f.limit, DEFAULT_EVENT_LIMIT);
    }

    #[test]
    fn kinds_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
    }
}
