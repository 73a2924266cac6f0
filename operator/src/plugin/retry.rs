//! `kubectl mailrelay retry NAME ID|--all|--domain D`: make messages due now
//! (like `postqueue -i` / `-f`).

use mailrelay::admin::api::Retried;

use super::cluster::{encode, no_such_message};
use super::{Cluster, OutputFormat, PluginError, output};

/// Which messages to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Id(String),
    All,
    Domain(String),
}

impl Selector {
    /// From the parsed flags (clap already made them exclusive; an ID wins).
    pub fn from_args(id: Option<&str>, all: bool, domain: Option<&str>) -> Selector {
        match (id, all, domain) {
            (Some(id), _, _) => Selector::Id(id.to_owned()),
            (None, false, Some(d)) => Selector::Domain(d.to_owned()),
            _ => Selector::All,
        }
    }

    pub fn path(&self) -> String {
        match self {
            Selector::Id(id) => format!("/api/v1/queue/messages/{}/retry", encode(id)),
            Selector::All => "/api/v1/queue/retry?all=true".to_owned(),
            Selector::Domain(d) => format!("/api/v1/queue/retry?domain={}", encode(d)),
        }
    }
}

pub async fn run(
    cluster: &Cluster,
    name: &str,
    sel: Selector,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let relay = cluster.mailrelay(name).await?;
    let (r, raw): (Retried, _) = cluster
        .admin_json(&relay, "POST", &sel.path())
        .await
        .map_err(|e| match &sel {
            Selector::Id(id) => no_such_message(e, &relay, id),
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
            Selector::from_args(Some("X"), false, None).path(),
            "/api/v1/queue/messages/X/retry"
        );
        assert_eq!(
            Selector::from_args(None, true, None).path(),
            "/api/v1/queue/retry?all=true"
        );
        assert_eq!(
            Selector::from_args(None, false, Some("example.org")).path(),
            "/api/v1/queue/retry?domain=example.org"
        );
    }
}
