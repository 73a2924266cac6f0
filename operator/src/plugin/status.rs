//! `kubectl mailrelay status NAME`: the MailRelay's conditions and replicas (from
//! its status, written by the operator) with the live queue summary and quota usage
//! (from the relay's admin API). A relay that cannot be reached still gets its
//! conditions shown, with the reason its live figures are missing.

use kube::api::DynamicObject;
use mailrelay::cli::queue::format_stats;
use mailrelay_admin_api::{Call, StatsBody};

use super::quota::{self, QuotaUsage};
use super::{Cluster, OutputFormat, PluginError, output};

/// Everything `status` shows.
#[derive(Debug)]
pub struct StatusView {
    pub namespace: String,
    pub name: String,
    pub hostname: Option<String>,
    pub desired_replicas: Option<i64>,
    pub ready_replicas: Option<i64>,
    /// `status.conditions` as the operator wrote them.
    pub conditions: Vec<serde_json::Value>,
    /// `status.queue`: the operator's last summary, shown when the relay cannot be asked.
    pub reported_queue: Option<serde_json::Value>,
    pub queue: Result<(StatsBody, serde_json::Value), String>,
    pub quotas: Result<Vec<(QuotaUsage, serde_json::Value)>, String>,
}

/// The live queue figures as `queue`, or why there are none as `queueError` (JSON
/// and YAML output of `status` and `list`).
pub(super) fn put_queue(
    v: &mut serde_json::Value,
    queue: &Result<(StatsBody, serde_json::Value), String>,
) {
    match queue {
        Ok((_, raw)) => v["queue"] = raw.clone(),
        Err(e) => {
            v["queue"] = serde_json::Value::Null;
            v["queueError"] = e.clone().into();
        }
    }
}

fn str_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn int_at(v: &serde_json::Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_i64()
}

impl StatusView {
    /// The parts read from the MailRelay object itself.
    pub fn from_object(
        namespace: &str,
        relay: &DynamicObject,
        queue: Result<(StatsBody, serde_json::Value), String>,
        quotas: Result<Vec<(QuotaUsage, serde_json::Value)>, String>,
    ) -> StatusView {
        let d = &relay.data;
        StatusView {
            namespace: namespace.to_owned(),
            name: relay.metadata.name.clone().unwrap_or_default(),
            hostname: str_at(d, &["spec", "hostname"]).map(str::to_owned),
            // The CRD defaults spec.replicas to 2; an object read back carries it.
            desired_replicas: int_at(d, &["spec", "replicas"]),
            ready_replicas: int_at(d, &["status", "readyReplicas"]),
            conditions: d
                .get("status")
                .and_then(|s| s.get("conditions"))
                .and_then(|c| c.as_array())
                .cloned()
                .unwrap_or_default(),
            reported_queue: d.get("status").and_then(|s| s.get("queue")).cloned(),
            queue,
            quotas,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "namespace": self.namespace,
            "hostname": self.hostname,
            "replicas": {"desired": self.desired_replicas, "ready": self.ready_replicas},
            "conditions": self.conditions,
            "reportedQueue": self.reported_queue,
        });
        put_queue(&mut v, &self.queue);
        match &self.quotas {
            Ok(qs) => v["quotas"] = qs.iter().map(|(_, raw)| raw.clone()).collect(),
            Err(e) => {
                v["quotas"] = serde_json::Value::Null;
                v["quotaError"] = e.clone().into();
            }
        }
        v
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let or_dash = |o: Option<i64>| o.map_or_else(|| "-".to_owned(), |n| n.to_string());
        out.push_str(&format!("Name:       {}\n", self.name));
        out.push_str(&format!("Namespace:  {}\n", self.namespace));
        if let Some(h) = &self.hostname {
            out.push_str(&format!("Hostname:   {h}\n"));
        }
        out.push_str(&format!(
            "Replicas:   {} desired, {} ready\n",
            or_dash(self.desired_replicas),
            or_dash(self.ready_replicas)
        ));
        out.push_str("Conditions:\n");
        if self.conditions.is_empty() {
            out.push_str("  none reported yet (is the operator running?)\n");
        } else {
            let rows: Vec<Vec<String>> = self
                .conditions
                .iter()
                .map(|c| {
                    ["type", "status", "reason", "message", "lastTransitionTime"]
                        .iter()
                        .map(|k| str_at(c, &[k]).unwrap_or("").to_owned())
                        .collect()
                })
                .collect();
            let t = output::table(&["TYPE", "STATUS", "REASON", "MESSAGE", "SINCE"], &rows);
            out.push_str(&indent(&t));
        }
        out.push_str("Queue:\n");
        match &self.queue {
            Ok((s, _)) => out.push_str(&indent(&format_stats(s))),
            Err(e) => {
                out.push_str(&format!("  unavailable: {e}\n"));
                if let Some(q) = &self.reported_queue {
                    let n = |k: &str| q.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                    out.push_str(&format!(
                        "  last reported by the operator: {} queued, {} deferred, {} in flight, {} bytes\n",
                        n("queued"),
                        n("deferred"),
                        n("inFlight"),
                        n("bytes")
                    ));
                }
            }
        }
        out.push_str("Quotas:\n");
        match &self.quotas {
            Ok(qs) if qs.is_empty() => out.push_str("  none\n"),
            Ok(qs) => {
                let rows: Vec<Vec<String>> = qs
                    .iter()
                    .flat_map(|(q, _)| quota::rows("", q))
                    .map(|mut r| r.split_off(1))
                    .collect();
                out.push_str(&indent(&output::table(&quota::HEADER[1..], &rows)));
            }
            Err(e) => out.push_str(&format!("  unavailable: {e}\n")),
        }
        out
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

/// Gathers one relay's view: the object, then its live figures.
async fn view(cluster: &Cluster, relay: &DynamicObject) -> StatusView {
    let queue = cluster
        .admin_json::<StatsBody>(relay, &Call::Stats)
        .await
        .map_err(|e| e.to_string());
    // Only worth asking when the relay answered at all; a second identical
    // "not ready" line would add nothing.
    let quotas = match &queue {
        Ok(_) => quota::fetch(cluster, relay, None)
            .await
            .map(Option::unwrap_or_default)
            .map_err(|e| e.to_string()),
        Err(_) => Err("relay unreachable (see Queue)".to_owned()),
    };
    let namespace = relay
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| cluster.namespace.clone());
    StatusView::from_object(&namespace, relay, queue, quotas)
}

/// One MailRelay, or with no NAME every one in the namespace (all namespaces with
/// `-A`), one block each as `kubectl describe` shows several objects.
pub async fn run(
    cluster: &Cluster,
    name: Option<&str>,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    if let Some(name) = name {
        let relay = cluster.mailrelay(name).await?;
        let v = view(cluster, &relay).await;
        return match format {
            Some(f) => output::structured(f, &v.to_json()),
            None => Ok(v.to_text()),
        };
    }
    let relays = cluster.list_mailrelays().await?;
    if relays.is_empty() {
        return Err(PluginError::NoMailRelays(cluster.scope()));
    }
    let mut views = Vec::new();
    for r in &relays {
        views.push(view(cluster, r).await);
    }
    match format {
        Some(f) => {
            let items: Vec<serde_json::Value> = views.iter().map(StatusView::to_json).collect();
            output::structured(f, &serde_json::json!({ "items": items }))
        }
        None => Ok(views
            .iter()
            .map(StatusView::to_text)
            .collect::<Vec<_>>()
            .join("\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::cluster::mailrelay_resource;

    #[test]
    fn text_of_an_unreachable_relay_keeps_the_conditions() {
        let mut o = DynamicObject::new("out", &mailrelay_resource()).within("mail");
        o.data = serde_json::json!({
            "spec": {"hostname": "relay.example.com", "replicas": 2},
            "status": {"readyReplicas": 0, "conditions": [
                {"type": "Ready", "status": "False", "reason": "NoReadyReplicas",
                 "message": "0/2 ready", "lastTransitionTime": "2026-11-29T05:00:00Z"}]}
        });
        let v = StatusView::from_object(
            "mail",
            &o,
            Err("MailRelay mail/out is not ready: x".into()),
            Err("relay unreachable (see Queue)".into()),
        );
        let t = v.to_text();
        assert!(t.contains("Replicas:   2 desired, 0 ready"), "{t}");
        assert!(
            t.contains("Ready   False    NoReadyReplicas   0/2 ready"),
            "{t}"
        );
        assert!(
            t.contains("Queue:\n  unavailable: MailRelay mail/out is not ready: x"),
            "{t}"
        );
        let j = v.to_json();
        assert_eq!(j["replicas"], serde_json::json!({"desired": 2, "ready": 0}));
        assert!(j["queue"].is_null());
        assert_eq!(j["queueError"], "MailRelay mail/out is not ready: x");
    }
}
