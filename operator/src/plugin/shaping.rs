//! `kubectl mailrelay shaping [list] [--relay R]` and `kubectl mailrelay shaping
//! lift ID [--relay R]`: the suspensions and throttles response rules started
//! (`GET /api/v1/shaping` on the admin API; the states live in the shared queue
//! store, so one pod answers for its whole relay), of every MailRelay in the
//! namespace or the one named; and ending one by hand (`POST
//! /api/v1/shaping/{id}/lift`, which needs `create` on `services/proxy` and names
//! the user in the relay's audit line).

use clap::Subcommand;
use mailrelay_admin_api::Call;
use mailrelay_admin_api::types::{ShapingList, ShapingState};

use super::cluster::relay_id;
use super::output::{self, short_duration};
use super::{Cluster, OutputFormat, PluginError};

#[derive(Debug, Clone, Subcommand)]
pub enum Action {
    /// Every state in force: scope, rule, the reply that started it, until when.
    List,
    /// End a state now (its ID as `list` shows it: `<scope>@<site>`).
    Lift { id: String },
}

pub const HEADER: [&str; 6] = ["RELAY", "ACTION", "LEFT", "RULE", "ID", "REPLY"];
/// Reply text shown in the table (the full text is in `-o json`).
const REPLY_WIDTH: usize = 60;

/// States gathered from the relays, with the relays that could not say.
#[derive(Debug, Default)]
pub struct Gathered {
    /// `-A`: rows name the relay's namespace too.
    pub all_namespaces: bool,
    /// (namespace, relay, its states)
    pub lists: Vec<(String, String, ShapingList)>,
    /// (namespace, relay, why it could not say)
    pub errors: Vec<(String, String, PluginError)>,
}

fn row(relay: &str, s: &ShapingState) -> Vec<String> {
    let action = s.action_label();
    let mut reply: String = s.reply.chars().take(REPLY_WIDTH).collect();
    if reply.len() < s.reply.len() {
        reply.push('…');
    }
    vec![
        relay.to_owned(),
        action,
        short_duration(s.remaining_seconds),
        s.rule.clone(),
        s.id.clone(),
        reply,
    ]
}

impl Gathered {
    pub fn render(&self, format: Option<OutputFormat>) -> Result<String, PluginError> {
        if let Some(f) = format {
            let relays: Vec<serde_json::Value> = self
                .lists
                .iter()
                .map(|(ns, r, l)| {
                    serde_json::json!({"namespace": ns, "relay": r, "states": l.states})
                })
                .collect();
            let doc = serde_json::json!({ "relays": relays });
            return output::structured(f, &output::with_relay_errors(doc, &self.errors));
        }
        let rows: Vec<(String, Vec<String>)> = self
            .lists
            .iter()
            .flat_map(|(ns, relay, l)| l.states.iter().map(move |s| (ns.clone(), row(relay, s))))
            .collect();
        Ok(output::relay_table(
            self.all_namespaces,
            &HEADER,
            rows,
            "No suspension or throttle in force.\n",
            &self.errors,
        ))
    }
}

pub async fn run(
    cluster: &Cluster,
    relay: Option<&str>,
    action: Option<&Action>,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    let relays = match relay {
        Some(r) => vec![cluster.mailrelay(r).await?],
        None => cluster.list_mailrelays().await?,
    };
    if relays.is_empty() {
        return Err(PluginError::NoMailRelays(cluster.scope()));
    }
    match action {
        None | Some(Action::List) => {
            let mut g = Gathered {
                all_namespaces: cluster.all_namespaces,
                ..Gathered::default()
            };
            for r in &relays {
                let (ns, rname) = relay_id(r);
                match cluster.admin_json::<ShapingList>(r, &Call::Shaping).await {
                    Ok((l, _)) => g.lists.push((ns, rname, l)),
                    Err(e) => g.errors.push((ns, rname, e)),
                }
            }
            if g.lists.is_empty() && !g.errors.is_empty() {
                return Err(g.errors.remove(0).2);
            }
            g.render(format)
        }
        Some(Action::Lift { id }) => {
            if ShapingState::parse_id(id).is_none() {
                return Err(PluginError::Usage(format!(
                    "{id:?} is not a state ID like <scope>@<site> (see `kubectl mailrelay shaping list`)"
                )));
            }
            // Relays sharing one store share its states: the first that has the
            // state ends it for all of them.
            let mut lifted = Vec::new();
            let mut errors = Vec::new();
            for r in &relays {
                let (ns, rname) = relay_id(r);
                match cluster.admin(r, &Call::ShapingLift(id.clone())).await {
                    Ok(_) => lifted.push((ns, rname)),
                    // The relay's "no state … in force": not on this relay.
                    Err(PluginError::Relay {
                        code: 404, message, ..
                    }) if message.starts_with("no state") => {}
                    Err(e) => errors.push((ns, rname, e)),
                }
            }
            if lifted.is_empty() {
                if let Some((_, _, e)) = errors.into_iter().next() {
                    return Err(e);
                }
                return Err(PluginError::NotFound(format!(
                    "no state {id} in force on {} in {}",
                    relay.map_or("any MailRelay".to_owned(), |r| format!("MailRelay {r}")),
                    cluster.scope()
                )));
            }
            match format {
                Some(f) => output::structured(
                    f,
                    &serde_json::json!({
                        "lifted": id,
                        "relays": lifted.iter().map(|(ns, r)| serde_json::json!({"namespace": ns, "relay": r})).collect::<Vec<_>>(),
                    }),
                ),
                None => Ok(lifted
                    .iter()
                    .map(|(ns, r)| format!("lifted {id} on MailRelay {ns}/{r}\n"))
                    .collect()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(reply: &str) -> ShapingState {
        ShapingState {
            id: ShapingState::id_of("sender_domain:a.test", "mx1.provider.test"),
            site: "mx1.provider.test".into(),
            scope: "sender_domain:a.test".into(),
            rule: "tenant-a.slow-down".into(),
            action: "throttle".into(),
            factor: Some("0.5".into()),
            rate: None,
            max_connections: None,
            until_ms: 1,
            remaining_seconds: 300,
            reply: reply.into(),
        }
    }

    #[test]
    fn states_render_one_row_each_and_errors_after() {
        let g = Gathered {
            all_namespaces: false,
            lists: vec![(
                "mail".into(),
                "out".into(),
                ShapingList {
                    states: vec![state(&format!("421 4.7.28 {}", "x".repeat(100)))],
                },
            )],
            errors: vec![(
                "mail".into(),
                "down".into(),
                PluginError::NotFound("gone".into()),
            )],
        };
        let t = g.render(None).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("RELAY   ACTION"), "{t}");
        assert!(lines[1].contains("throttle x0.5   5m"), "{t}");
        assert!(
            lines[1].contains("tenant-a.slow-down   sender_domain:a.test@mx1.provider.test"),
            "{t}"
        );
        assert!(lines[1].ends_with('…'), "{t}");
        assert_eq!(lines[2], "relay down: gone");
        let j: serde_json::Value =
            serde_json::from_str(&g.render(Some(OutputFormat::Json)).unwrap()).unwrap();
        assert_eq!(j["relays"][0]["states"][0]["rule"], "tenant-a.slow-down");
        assert_eq!(j["errors"][0]["relay"], "down");
        let empty = Gathered::default();
        assert_eq!(
            empty.render(None).unwrap(),
            "No suspension or throttle in force.\n"
        );
    }
}
