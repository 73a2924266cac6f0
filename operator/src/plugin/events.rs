//! `kubectl mailrelay events [NAME] [--to …] [--since 1h] …`: "where is my mail?"
//! — delivery events (`GET /api/v1/events` on the admin API), of one MailRelay or
//! of every MailRelay in the namespace, merged oldest first. One pod answers for
//! its whole relay: the events live in the shared queue store.

use mailrelay_admin_api::Call;
use mailrelay_admin_api::events::{Event, EventList, EventQuery, format_events, parse_time};

use super::cluster::relay_id;
use super::{Cluster, OutputFormat, PluginError, output};

/// The filters as typed (times still relative).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub queue_id: Option<String>,
    pub message_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub kind: Option<String>,
    pub limit: Option<usize>,
}

impl Filter {
    /// The API query, times resolved against `now_ms`; the relay's bounds are
    /// checked here first, so an error names the flag.
    pub fn query(&self, now_ms: u64) -> Result<EventQuery, PluginError> {
        let time = |v: &Option<String>, flag: &str| {
            v.as_deref()
                .map(|s| parse_time(s, now_ms, flag))
                .transpose()
                .map_err(PluginError::Usage)
        };
        let q = EventQuery {
            queue_id: self.queue_id.clone(),
            message_id: self.message_id.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            since_ms: time(&self.since, "--since")?,
            until_ms: time(&self.until, "--until")?,
            kind: self.kind.clone(),
            limit: self.limit,
        };
        q.check()
            .map_err(|e| PluginError::Usage(format!("--{}", e.to_string().replace('_', "-"))))?;
        Ok(q)
    }
}

/// Events of several relays as one list: oldest first, each relay's newest
/// `limit` kept, at most `limit` in all (the newest).
pub fn merge(lists: Vec<(String, EventList)>, limit: usize) -> EventList {
    let mut all: Vec<Event> = Vec::new();
    let mut truncated = false;
    for (_, l) in lists {
        truncated |= l.truncated;
        all.extend(l.events);
    }
    all.sort_by(|a, b| a.at_ms.cmp(&b.at_ms).then_with(|| a.id.cmp(&b.id)));
    if all.len() > limit {
        all.drain(..all.len() - limit);
    }
    EventList {
        events: all,
        truncated,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn run(
    cluster: &Cluster,
    name: Option<&str>,
    filter: &Filter,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let query = filter.query(now_ms())?;
    let limit = query
        .limit
        .unwrap_or(mailrelay_admin_api::events::DEFAULT_EVENT_LIMIT);
    let relays = match name {
        Some(n) => vec![cluster.mailrelay(n).await?],
        None => cluster.list_mailrelays().await?,
    };
    if relays.is_empty() {
        return Err(PluginError::NoMailRelays(cluster.scope()));
    }
    let mut lists = Vec::new();
    let mut errors = Vec::new();
    for r in &relays {
        let (ns, rname) = relay_id(r);
        match cluster
            .admin_json::<EventList>(r, &Call::Events(query.clone()))
            .await
        {
            Ok((l, _)) => lists.push((format!("{ns}/{rname}"), l)),
            Err(e) => errors.push((ns, rname, e)),
        }
    }
    if lists.is_empty() && !errors.is_empty() {
        return Err(errors.remove(0).2);
    }
    let merged = merge(lists, limit);
    match format {
        Some(f) => {
            let mut doc = serde_json::to_value(&merged).map_err(|e| PluginError::Malformed {
                what: "events".into(),
                detail: e.to_string(),
            })?;
            if !errors.is_empty() {
                doc["errors"] = errors
                    .iter()
                    .map(|(ns, r, e)| serde_json::json!({"namespace": ns, "relay": r, "error": e.to_string()}))
                    .collect();
            }
            output::structured(f, &doc)
        }
        None => {
            let mut out = format_events(&merged);
            for (ns, r, e) in &errors {
                out.push_str(&format!("relay {ns}/{r}: {e}\n"));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailrelay_admin_api::EventKind;

    fn ev(at: u64, q: &str) -> Event {
        Event {
            id: format!("{at}-0"),
            kind: EventKind::Delivered,
            at_ms: at,
            queue_id: q.into(),
            message_id: None,
            sender: "s@a.test".into(),
            recipient: Some("user@example.net".into()),
            auth_user: None,
            tenant: "a.test".into(),
            category: None,
            reply: Some("250 ok".into()),
            mx: Some("mx.example.net".into()),
            tls_version: None,
            tls_cipher: None,
            dsn_id: None,
        }
    }

    #[test]
    fn relays_merge_oldest_first_keeping_the_newest() {
        let a = EventList {
            events: vec![ev(1, "A1"), ev(5, "A5")],
            truncated: false,
        };
        let b = EventList {
            events: vec![ev(3, "B3")],
            truncated: true,
        };
        let m = merge(vec![("x".into(), a), ("y".into(), b)], 2);
        let ids: Vec<_> = m.events.iter().map(|e| e.queue_id.as_str()).collect();
        assert_eq!(ids, ["B3", "A5"]);
        assert!(m.truncated);
    }

    #[test]
    fn bad_flags_are_named() {
        let f = Filter {
            since: Some("soon".into()),
            ..Filter::default()
        };
        let e = f.query(1_000_000).unwrap_err().to_string();
        assert!(e.starts_with("--since"), "{e}");
        let f = Filter {
            limit: Some(100_000),
            ..Filter::default()
        };
        assert!(f.query(1).unwrap_err().to_string().starts_with("--limit"));
        let f = Filter {
            to: Some("user@example.net".into()),
            since: Some("1h".into()),
            ..Filter::default()
        };
        let q = f.query(10_000_000).unwrap();
        assert_eq!(q.since_ms, Some(10_000_000 - 3_600_000));
    }
}
