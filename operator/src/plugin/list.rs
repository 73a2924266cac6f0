//! `kubectl mailrelay list [-A]`: every MailRelay with its readiness and a queue
//! summary, one line each, like `kubectl get` with live figures.
//!
//! The queue figures come from each relay's admin API (`/api/v1/queue/stats`).
//! A relay that cannot be asked (down, or its admin token Secret not readable by
//! the user) shows the figures the operator last wrote to its status instead, and
//! a note under the table says so and why: `list` works with read access to the
//! MailRelays alone.

use kube::api::DynamicObject;
use mailrelay_admin_api::{Call, StatsBody};

use super::cluster::relay_id;
use super::output::{self, short_duration};
use super::{Cluster, OutputFormat, PluginError};

/// One row of `list`.
#[derive(Debug)]
pub struct Row {
    pub namespace: String,
    pub name: String,
    /// The Ready condition's status (`True`, `False`, `Unknown`), if reported.
    pub ready: Option<String>,
    pub ready_replicas: Option<i64>,
    pub desired_replicas: Option<i64>,
    /// Live stats, or why there are none.
    pub queue: Result<(StatsBody, serde_json::Value), String>,
    /// `status.queue` as the operator last wrote it.
    pub reported_queue: Option<serde_json::Value>,
}

impl Row {
    pub fn from_object(
        relay: &DynamicObject,
        queue: Result<(StatsBody, serde_json::Value), String>,
    ) -> Row {
        let (namespace, name) = relay_id(relay);
        let d = &relay.data;
        let ready = d
            .get("status")
            .and_then(|s| s.get("conditions"))
            .and_then(|c| c.as_array())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready"))
            })
            .and_then(|c| c.get("status"))
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        let int = |a: &str, b: &str| d.get(a).and_then(|v| v.get(b)).and_then(|v| v.as_i64());
        Row {
            namespace,
            name,
            ready,
            ready_replicas: int("status", "readyReplicas"),
            desired_replicas: int("spec", "replicas"),
            queue,
            reported_queue: d.get("status").and_then(|s| s.get("queue")).cloned(),
        }
    }

    fn cells(&self, all_namespaces: bool) -> Vec<String> {
        let dash = |o: Option<i64>| o.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let mut r = Vec::new();
        if all_namespaces {
            r.push(self.namespace.clone());
        }
        r.push(self.name.clone());
        r.push(self.ready.clone().unwrap_or_else(|| "-".to_owned()));
        r.push(format!(
            "{}/{}",
            dash(self.ready_replicas),
            dash(self.desired_replicas)
        ));
        match &self.queue {
            Ok((s, _)) => {
                r.push(s.messages.to_string());
                r.push(s.deferred.to_string());
                r.push(
                    s.oldest_age_seconds
                        .map_or_else(|| "-".to_owned(), short_duration),
                );
            }
            Err(_) => {
                let n = |k: &str| {
                    self.reported_queue
                        .as_ref()
                        .and_then(|q| q.get(k))
                        .and_then(|v| v.as_u64())
                        .map_or_else(|| "-".to_owned(), |n| format!("{n}*"))
                };
                r.push(n("queued"));
                r.push(n("deferred"));
                r.push("-".to_owned());
            }
        }
        r
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "namespace": self.namespace,
            "name": self.name,
            "ready": self.ready,
            "replicas": {"desired": self.desired_replicas, "ready": self.ready_replicas},
            "reportedQueue": self.reported_queue,
        });
        super::status::put_queue(&mut v, &self.queue);
        v
    }
}

/// Renders the rows: a table and, for relays without live figures, a note each.
pub fn render(
    rows: &[Row],
    all_namespaces: bool,
    scope: &str,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    if let Some(f) = format {
        let items: Vec<serde_json::Value> = rows.iter().map(Row::to_json).collect();
        return output::structured(f, &serde_json::json!({ "items": items }));
    }
    if rows.is_empty() {
        return Ok(format!("No MailRelays found in {scope}.\n"));
    }
    let mut header = Vec::new();
    if all_namespaces {
        header.push("NAMESPACE");
    }
    header.extend(["NAME", "READY", "REPLICAS", "QUEUED", "DEFERRED", "OLDEST"]);
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.cells(all_namespaces)).collect();
    let mut out = output::table(&header, &cells);
    let mut notes = rows
        .iter()
        .filter_map(|r| r.queue.as_ref().err().map(|e| (r, e)))
        .peekable();
    if notes.peek().is_some() {
        out.push_str("\n* last reported by the operator; no live figures:\n");
        for (r, e) in notes {
            out.push_str(&format!("  {}/{}: {e}\n", r.namespace, r.name));
        }
    }
    Ok(out)
}

pub async fn run(cluster: &Cluster, format: Option<OutputFormat>) -> Result<String, PluginError> {
    let relays = cluster.list_mailrelays().await?;
    let mut rows = Vec::new();
    for r in &relays {
        let queue = cluster
            .admin_json::<StatsBody>(r, &Call::Stats)
            .await
            .map_err(|e| match e {
                // The Ready condition is in the READY column already.
                PluginError::NotReady { detail, .. } => detail
                    .split("; condition ")
                    .next()
                    .unwrap_or(&detail)
                    .to_owned(),
                e => e.to_string(),
            });
        rows.push(Row::from_object(r, queue));
    }
    render(&rows, cluster.all_namespaces, &cluster.scope(), format)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::cluster::mailrelay_resource;

    #[test]
    fn rows_fall_back_to_the_reported_queue() {
        let mut o = DynamicObject::new("down", &mailrelay_resource()).within("mail");
        o.data = serde_json::json!({
            "spec": {"replicas": 2},
            "status": {"readyReplicas": 0, "queue": {"queued": 7, "deferred": 3},
                       "conditions": [{"type": "Ready", "status": "False"}]}
        });
        let r = Row::from_object(&o, Err("no endpoints".into()));
        let t = render(&[r], true, "any namespace", None).unwrap();
        assert_eq!(
            t,
            "NAMESPACE   NAME   READY   REPLICAS   QUEUED   DEFERRED   OLDEST\n\
             mail        down   False   0/2        7*       3*         -\n\
             \n* last reported by the operator; no live figures:\n  mail/down: no endpoints\n"
        );
        assert_eq!(
            render(&[], false, "namespace \"x\"", None).unwrap(),
            "No MailRelays found in namespace \"x\".\n"
        );
    }
}
