//! `kubectl mailrelay message NAME ID`: envelope, recipients and every delivery
//! attempt with the remote server's reply (the format of `mailrelay queue show`).

use mailrelay::cli::queue::format_detail;
use mailrelay_admin_api::{Call, MessageDetail};

use super::cluster::no_such_message;
use super::{Cluster, OutputFormat, PluginError, output};

pub async fn run(
    cluster: &Cluster,
    name: &str,
    id: &str,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let relay = cluster.mailrelay(name).await?;
    let (detail, raw): (MessageDetail, _) = cluster
        .admin_json(&relay, &Call::Show(id.to_owned()))
        .await
        .map_err(|e| no_such_message(e, &relay, id))?;
    match format {
        Some(f) => output::structured(f, &raw),
        None => Ok(format_detail(&detail)),
    }
}
