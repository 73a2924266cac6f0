//! `kubectl mailrelay retry NAME ID|--all|--domain D`: make messages due now
//! (like `postqueue -i` / `-f`).

use mailrelay_admin_api::{Call, Retried, RetrySelector};

use super::cluster::no_such_message;
use super::{Cluster, OutputFormat, PluginError, output};

/// Which messages to retry, from the parsed flags (clap already made them
/// exclusive; an ID wins).
pub fn selector(id: Option<&str>, all: bool, domain: Option<&str>) -> RetrySelector {
    match (id, all, domain) {
        (Some(id), _, _) => RetrySelector::Id(id.to_owned()),
        (None, false, Some(d)) => RetrySelector::Domain(d.to_owned()),
        _ => RetrySelector::All,
    }
}

pub async fn run(
    cluster: &Cluster,
    name: &str,
    sel: RetrySelector,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let relay = cluster.mailrelay(name).await?;
    let (r, raw): (Retried, _) = cluster
        .admin_json(&relay, &Call::Retry(sel.clone()))
        .await
        .map_err(|e| match &sel {
            RetrySelector::Id(id) => no_such_message(e, &relay, id),
            _ => e,
        })?;
    match format {
        Some(f) => output::structured(f, &raw),
        None => Ok(format!(
            "{} message(s) scheduled for immediate retry\n",
            r.retried
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(
            Call::Retry(selector(Some("X"), false, None)).path(),
            "/api/v1/queue/messages/X/retry"
        );
        assert_eq!(
            Call::Retry(selector(None, true, None)).path(),
            "/api/v1/queue/retry?all=true"
        );
        assert_eq!(
            Call::Retry(selector(None, false, Some("example.org"))).path(),
            "/api/v1/queue/retry?domain=example.org"
        );
    }
}
