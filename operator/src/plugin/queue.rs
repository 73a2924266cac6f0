//! `kubectl mailrelay queue NAME [--deferred] [--domain D] [--limit N]`: the queue
//! like `postqueue -p`, in the same format as `mailrelay queue list`.

use mailrelay::cli::queue::format_list;
use mailrelay_admin_api::{Call, ListQuery, MessageList};

use super::cluster::relay_id;
use super::{Cluster, OutputFormat, PluginError, output};

/// The admin API call for a listing.
pub fn list_call(filter: &Filter) -> Call {
    Call::List(ListQuery {
        deferred: filter.deferred,
        domain: filter.domain.clone(),
        limit: filter.limit,
    })
}

/// `--deferred`, `--domain`, `--limit`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub deferred: bool,
    pub domain: Option<String>,
    pub limit: Option<usize>,
}

/// One relay's queue, or with no NAME every relay's (in the namespace, or all
/// namespaces with `-A`): one section per relay; a relay that cannot be asked is
/// named with the reason and does not hide the others.
pub async fn run(
    cluster: &Cluster,
    name: Option<&str>,
    filter: &Filter,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let call = list_call(filter);
    if let Some(name) = name {
        let relay = cluster.mailrelay(name).await?;
        let (list, raw): (MessageList, _) = cluster.admin_json(&relay, &call).await?;
        return match format {
            Some(f) => output::structured(f, &raw),
            None => Ok(format_list(&list)),
        };
    }
    let relays = cluster.list_mailrelays().await?;
    if relays.is_empty() {
        return Err(PluginError::NoMailRelays(cluster.scope()));
    }
    let mut text = String::new();
    let mut messages = Vec::new();
    let mut errors = Vec::new();
    for r in &relays {
        let (ns, rname) = relay_id(r);
        if !text.is_empty() {
            text.push('\n');
        }
        match cluster.admin_json::<MessageList>(r, &call).await {
            Ok((list, raw)) => {
                text.push_str(&format!("MailRelay {ns}/{rname}:\n{}", format_list(&list)));
                for mut m in raw
                    .get("messages")
                    .and_then(|m| m.as_array())
                    .cloned()
                    .unwrap_or_default()
                {
                    if let Some(o) = m.as_object_mut() {
                        o.insert("namespace".into(), ns.clone().into());
                        o.insert("relay".into(), rname.clone().into());
                    }
                    messages.push(m);
                }
            }
            Err(e) => {
                text.push_str(&format!("MailRelay {ns}/{rname}: {e}\n"));
                errors.push((ns, rname, e));
            }
        }
    }
    // Nothing but errors: the (first) error is the answer, as for one relay.
    if errors.len() == relays.len() {
        return Err(errors.remove(0).2);
    }
    match format {
        Some(f) => {
            let mut doc = serde_json::json!({ "messages": messages });
            if !errors.is_empty() {
                doc["errors"] = errors
                    .iter()
                    .map(|(ns, r, e)| {
                        serde_json::json!({"namespace": ns, "relay": r, "error": e.to_string()})
                    })
                    .collect();
            }
            output::structured(f, &doc)
        }
        None => Ok(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_paths() {
        let path = |deferred, domain: Option<&str>, limit| {
            list_call(&Filter {
                deferred,
                domain: domain.map(str::to_owned),
                limit,
            })
            .path()
        };
        assert_eq!(path(false, None, None), "/api/v1/queue/messages");
        assert_eq!(
            path(true, Some("example.org"), Some(5)),
            "/api/v1/queue/messages?deferred=true&domain=example.org&limit=5"
        );
    }
}
