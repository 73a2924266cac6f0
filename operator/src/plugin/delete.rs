//! `kubectl mailrelay delete NAME ID`: remove one message from the queue, with no
//! delivery and no bounce (`DELETE /api/v1/queue/messages/{id}`, like
//! `postsuper -d`).
//!
//! Like `kubectl delete` it does not ask first: scripts and runbooks call it, and a
//! prompt would hang them. What was deleted is said plainly, and a second delete of
//! the same ID says the message is not there.

use mailrelay_admin_api::Call;

use super::cluster::{no_such_message, relay_id};
use super::{Cluster, OutputFormat, PluginError, output};

pub async fn run(
    cluster: &Cluster,
    name: &str,
    id: &str,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let relay = cluster.mailrelay(name).await?;
    cluster
        .admin(&relay, &Call::Delete(id.to_owned()))
        .await
        .map_err(|e| no_such_message(e, &relay, id))?;
    let (namespace, name) = relay_id(&relay);
    match format {
        Some(f) => output::structured(
            f,
            &serde_json::json!({"deleted": id, "namespace": namespace, "relay": name}),
        ),
        None => Ok(format!(
            "message {id} deleted from the queue of MailRelay {namespace}/{name}\n"
        )),
    }
}
