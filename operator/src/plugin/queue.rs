//! `kubectl mailrelay queue NAME [--deferred] [--domain D] [--limit N]`: the queue
//! like `postqueue -p`, in the same format as `mailrelay queue list`.

use mailrelay::admin::api::MessageList;
use mailrelay::cli::queue::format_list;

use super::cluster::encode;
use super::{Cluster, OutputFormat, PluginError, output};

/// The admin API path for a listing.
pub fn list_path(deferred: bool, domain: Option<&str>, limit: Option<usize>) -> String {
    let mut q = Vec::new();
    if deferred {
        q.push("deferred=true".to_owned());
    }
    if let Some(d) = domain {
        q.push(format!("domain={}", encode(d)));
    }
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    let mut path = "/api/v1/queue/messages".to_owned();
    if !q.is_empty() {
        path.push('?');
        path.push_str(&q.join("&"));
    }
    path
}

pub async fn run(
    cluster: &Cluster,
    name: &str,
    deferred: bool,
    domain: Option<&str>,
    limit: Option<usize>,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let relay = cluster.mailrelay(name).await?;
    let path = list_path(deferred, domain, limit);
    let (list, raw): (MessageList, _) = cluster.admin_json(&relay, "GET", &path).await?;
    match format {
        Some(f) => output::structured(f, &raw),
        None => Ok(format_list(&list)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_paths() {
        assert_eq!(list_path(false, None, None), "/api/v1/queue/messages");
        assert_eq!(
            list_path(true, Some("example.org"), Some(5)),
            "/api/v1/queue/messages?deferred=true&domain=example.org&limit=5"
        );
    }
}
