//! `kubectl mailrelay quota [NAME] [--relay R]`: used and remaining per window of
//! each SendQuota, as the relays count it (`GET /api/v1/quotas[/{name}]` on the
//! admin API; the counters live in the shared queue store, so one pod of a relay
//! answers for all of them).

use mailrelay_admin_api::Call;
pub use mailrelay_admin_api::{QuotaList, QuotaUsage};

use super::cluster::relay_id;
use super::output::{self, short_duration};
use super::{Cluster, OutputFormat, PluginError};

pub const HEADER: [&str; 9] = [
    "RELAY",
    "QUOTA",
    "DIRECTION",
    "KEY",
    "LIMIT",
    "USED",
    "REMAINING",
    "RESETS IN",
    "CONNECTIONS",
];

/// Table rows for one quota on one relay: one per key and window. A quota with
/// no usage yet shows each limit once, unused.
pub fn rows(relay: &str, q: &QuotaUsage) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let base = |key: &str| {
        vec![
            relay.to_owned(),
            q.name.clone(),
            q.direction.to_string(),
            key.to_owned(),
        ]
    };
    if q.keys.is_empty() {
        for l in &q.limits {
            let total = l.split('/').next().unwrap_or("-").to_owned();
            let mut r = base("-");
            r.extend([l.clone(), "0".into(), total, "-".into(), "-".into()]);
            out.push(r);
        }
        return out;
    }
    for k in &q.keys {
        let conns = k
            .connections
            .as_ref()
            .map_or_else(|| "-".to_owned(), |c| format!("{}/{}", c.open, c.max));
        for w in &k.windows {
            let mut r = base(&k.key);
            r.extend([
                w.limit.clone(),
                w.used.to_string(),
                w.remaining.to_string(),
                short_duration(w.resets_in_seconds),
                conns.clone(),
            ]);
            out.push(r);
        }
    }
    out
}

/// Usage gathered from the relays, with the relays that could not say.
#[derive(Debug, Default)]
pub struct Gathered {
    /// `-A`: rows name the relay's namespace too.
    pub all_namespaces: bool,
    /// (namespace, relay, typed, raw JSON of the quota)
    pub quotas: Vec<(String, String, QuotaUsage, serde_json::Value)>,
    /// (namespace, relay, why it could not say)
    pub errors: Vec<(String, String, PluginError)>,
}

impl Gathered {
    pub fn render(&self, format: Option<OutputFormat>) -> Result<String, PluginError> {
        match format {
            Some(f) => {
                let quotas: Vec<serde_json::Value> = self
                    .quotas
                    .iter()
                    .map(|(ns, relay, _, raw)| {
                        let mut v = raw.clone();
                        if let Some(o) = v.as_object_mut() {
                            o.insert("namespace".into(), ns.clone().into());
                            o.insert("relay".into(), relay.clone().into());
                        }
                        v
                    })
                    .collect();
                let doc = serde_json::json!({ "quotas": quotas });
                output::structured(f, &output::with_relay_errors(doc, &self.errors))
            }
            None => {
                let rows: Vec<(String, Vec<String>)> = self
                    .quotas
                    .iter()
                    .flat_map(|(ns, relay, q, _)| {
                        rows(relay, q).into_iter().map(move |r| (ns.clone(), r))
                    })
                    .collect();
                Ok(output::relay_table(
                    self.all_namespaces,
                    &HEADER,
                    rows,
                    "No quotas.\n",
                    &self.errors,
                ))
            }
        }
    }
}

/// Fetches one relay's quotas (all, or the one named; `Ok(None)` when this relay
/// does not apply that quota).
pub async fn fetch(
    cluster: &Cluster,
    relay: &kube::api::DynamicObject,
    name: Option<&str>,
) -> Result<Option<Vec<(QuotaUsage, serde_json::Value)>>, PluginError> {
    match name {
        Some(n) => {
            let call = Call::Quota {
                name: n.to_owned(),
                key: None,
            };
            match cluster.admin_json::<QuotaUsage>(relay, &call).await {
                Ok((q, raw)) => Ok(Some(vec![(q, raw)])),
                Err(PluginError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }
        None => {
            let (_, raw): (QuotaList, serde_json::Value) =
                cluster.admin_json(relay, &Call::Quotas).await?;
            let mut out = Vec::new();
            for v in raw
                .get("quotas")
                .and_then(|q| q.as_array())
                .cloned()
                .unwrap_or_default()
            {
                let q: QuotaUsage =
                    serde_json::from_value(v.clone()).map_err(|e| PluginError::Malformed {
                        what: "the admin API (/api/v1/quotas)".into(),
                        detail: e.to_string(),
                    })?;
                out.push((q, v));
            }
            Ok(Some(out))
        }
    }
}

pub async fn run(
    cluster: &Cluster,
    name: Option<&str>,
    relay: Option<&str>,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let relays = match relay {
        Some(r) => vec![cluster.mailrelay(r).await?],
        None => cluster.list_mailrelays().await?,
    };
    if relays.is_empty() {
        return Err(PluginError::NoMailRelays(cluster.scope()));
    }
    let mut g = Gathered {
        all_namespaces: cluster.all_namespaces,
        ..Gathered::default()
    };
    for r in &relays {
        let (ns, rname) = relay_id(r);
        match fetch(cluster, r, name).await {
            Ok(Some(qs)) => g.quotas.extend(
                qs.into_iter()
                    .map(|(q, raw)| (ns.clone(), rname.clone(), q, raw)),
            ),
            Ok(None) => {}
            Err(e) => g.errors.push((ns, rname, e)),
        }
    }
    // Nothing to show but errors: the errors are the answer.
    if g.quotas.is_empty() && g.errors.len() == relays.len() {
        return Err(g.errors.remove(0).2);
    }
    if let (Some(n), true, true) = (name, g.quotas.is_empty(), g.errors.is_empty()) {
        let by = match relay {
            Some(r) => format!("MailRelay {r}"),
            None => "any MailRelay".to_owned(),
        };
        return Err(PluginError::NotFound(format!(
            "SendQuota {n} is not applied by {by} in {} (is it declared, and does its relaySelector match?)",
            cluster.scope()
        )));
    }
    g.render(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_rows() {
        let q: QuotaUsage = serde_json::from_value(serde_json::json!({
            "name": "tenant-a", "direction": "egress", "scope": "per_key", "action": null,
            "limits": ["100/1m", "1000/1h"],
            "keys": [{"key": "gmail.com", "connections": {"max": 5, "open": 2}, "windows": [
                {"limit": "100/1m", "window_seconds": 60, "used": 12, "remaining": 88,
                 "resets_at": "2026-11-29T05:01:00Z", "resets_in_seconds": 31}]}]
        }))
        .unwrap();
        assert_eq!(
            rows("out", &q),
            vec![vec![
                "out",
                "tenant-a",
                "egress",
                "gmail.com",
                "100/1m",
                "12",
                "88",
                "31s",
                "2/5"
            ]]
        );
        let empty: QuotaUsage = serde_json::from_value(serde_json::json!({
            "name": "b", "direction": "ingress", "scope": "shared", "limits": ["10/1d"], "keys": []
        }))
        .unwrap();
        assert_eq!(
            rows("out", &empty),
            vec![vec![
                "out", "b", "ingress", "-", "10/1d", "0", "10", "-", "-"
            ]]
        );
    }
}
