//! `kubectl mailrelay suppression NAME list|add|remove`: a relay's suppression
//! lists through its admin API (`/api/v1/suppression`), as `mailrelay suppression`
//! shows them. `add` and `remove` change state: they need `create`/`delete` on
//! `services/proxy`, and name the user in the relay's audit line.

use mailrelay_admin_api::types::{SuppressionAdded, SuppressionList};

use super::cluster::relay_id;
use super::{Cluster, OutputFormat, PluginError, output};

/// The subcommands and their admin API calls are `mailrelay suppression`'s.
pub use mailrelay::cli::suppression::{SuppressionCommand as Action, call};

pub async fn run(
    cluster: &Cluster,
    name: &str,
    action: &Action,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let relay = cluster.mailrelay(name).await?;
    let (namespace, relay_name) = relay_id(&relay);
    let call = call(action);
    match action {
        Action::List { .. } => {
            let (list, raw): (SuppressionList, _) = cluster.admin_json(&relay, &call).await?;
            match format {
                Some(f) => output::structured(f, &raw),
                None => Ok(render_list(&list)),
            }
        }
        Action::Add { .. } => {
            let (added, raw): (SuppressionAdded, _) = cluster.admin_json(&relay, &call).await?;
            match format {
                Some(f) => output::structured(f, &raw),
                None => Ok(format!(
                    "{} {} on {} of MailRelay {namespace}/{relay_name}\n",
                    if added.new { "added" } else { "renewed" },
                    added.entry.address,
                    added.entry.scope
                )),
            }
        }
        Action::Remove { address, scope } => {
            cluster.admin(&relay, &call).await.map_err(|e| match e {
                PluginError::Relay { code: 404, .. } => PluginError::NotFound(format!(
                    "{address} is not on the {scope} suppression list of MailRelay {namespace}/{relay_name}"
                )),
                other => other,
            })?;
            match format {
                Some(f) => output::structured(
                    f,
                    &serde_json::json!({"removed": address, "scope": scope, "namespace": namespace, "relay": relay_name}),
                ),
                None => Ok(format!(
                    "removed {address} from {scope} of MailRelay {namespace}/{relay_name}\n"
                )),
            }
        }
    }
}

/// The format of `mailrelay suppression list`.
pub fn render_list(list: &SuppressionList) -> String {
    mailrelay::cli::suppression::format_list(&list.entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailrelay_admin_api::types::SuppressionEntry;

    #[test]
    fn actions_call_the_suppression_endpoints() {
        let add = call(&Action::Add {
            address: "x@b.test".into(),
            scope: "domain:a.test".into(),
            ttl: Some("never".into()),
        });
        assert_eq!(add.method().as_str(), "POST");
        assert_eq!(
            add.path(),
            "/api/v1/suppression/domain%3Aa.test/x%40b.test?ttl=never"
        );
        let rm = call(&Action::Remove {
            address: "x@b.test".into(),
            scope: "global".into(),
        });
        assert_eq!(rm.method().as_str(), "DELETE");
        assert_eq!(rm.path(), "/api/v1/suppression/global/x%40b.test");
    }

    #[test]
    fn entries_render_one_per_line() {
        let list = SuppressionList {
            entries: vec![SuppressionEntry {
                scope: "domain:a.test".into(),
                address: "x@b.test".into(),
                expires_ms: None,
                reason: "invalid_recipient".into(),
                detail: None,
                queue_id: None,
                added_ms: 0,
            }],
        };
        assert!(
            render_list(&list)
                .contains("x@b.test  domain:a.test  invalid_recipient  never expires")
        );
        assert_eq!(
            render_list(&SuppressionList { entries: vec![] }),
            "no suppressed recipients\n"
        );
    }
}
