//! Response-rule states (suspensions and throttles) in Kubernetes: read from a
//! relay's queue store with the relay's own reader (the per-site hashes the
//! egress scripts keep, `<prefix>:{<prefix>:eg}:sh:<site>`, listed through the
//! `…:shi` index), shown in MailRelay and SendQuota status, and announced by one
//! Event each when they start.
//!
//! Everything here but [`read`] is pure. Which states were announced already is
//! what the previous status shows: a state whose id, rule and action the old
//! status lists is not new. A state that starts and ends between two status
//! reads is never seen (the status interval, 30 s by default, bounds that).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mailrelay::quota::egress::Egress;
use mailrelay::quota::ingress::engine::EgressUsage as _;
use mailrelay_admin_api::types::ShapingList;

use crate::crd::rules::ShapingStateStatus;
use crate::crd::{MailRelay, SendQuota};
use crate::resources::config::quota_rule_name;
use crate::status::time_from_ms;

/// States a status lists at most (the latest ending first).
pub const MAX_STATES: usize = 50;
/// Event reason when a suspension starts.
pub const SUSPENDED: &str = "ShapingSuspended";
/// Event reason when a throttle starts.
pub const THROTTLED: &str = "ShapingThrottled";
/// Longest reply quoted in an Event note (the API server caps notes at 1 KiB).
const MAX_REPLY: usize = 400;

/// Every state in force in the store `egress` reads.
pub async fn read(egress: &Egress) -> Result<ShapingList, String> {
    egress.shaping().await.map_err(|e| e.to_string())
}

/// The states as status rows, the latest ending first, at most [`MAX_STATES`].
pub fn states_status(list: &ShapingList) -> Vec<ShapingStateStatus> {
    let mut states: Vec<&mailrelay_admin_api::types::ShapingState> = list.states.iter().collect();
    states.sort_by(|a, b| b.until_ms.cmp(&a.until_ms).then_with(|| a.id.cmp(&b.id)));
    states
        .into_iter()
        .take(MAX_STATES)
        .map(|s| ShapingStateStatus {
            relay: None,
            id: s.id.clone(),
            site: s.site.clone(),
            scope: s.scope.clone(),
            rule: s.rule.clone(),
            action: s.action.clone(),
            factor: s.factor.clone(),
            rate: s.rate.clone(),
            max_connections: s.max_connections,
            reply: s.reply.clone(),
            until: time_from_ms(s.until_ms).unwrap_or_else(|| Time(Default::default())),
        })
        .collect()
}

fn same(a: &ShapingStateStatus, b: &ShapingStateStatus) -> bool {
    a.relay == b.relay && a.id == b.id && a.rule == b.rule && a.action == b.action
}

/// The states of `new` the `old` status did not list: those to announce.
pub fn started<'a>(
    old: &[ShapingStateStatus],
    new: &'a [ShapingStateStatus],
) -> Vec<&'a ShapingStateStatus> {
    new.iter()
        .filter(|n| !old.iter().any(|o| same(o, n)))
        .collect()
}

/// The Event of a state that started: `(warning?, reason, note)`. A suspension
/// holds mail (a warning); a throttle only slows it.
pub fn event(s: &ShapingStateStatus) -> (bool, &'static str, String) {
    let (warning, reason) = if s.action == "suspend" {
        (true, SUSPENDED)
    } else {
        (false, THROTTLED)
    };
    let what = mailrelay_admin_api::types::action_label(
        &s.action,
        s.factor.as_deref(),
        s.rate.as_deref(),
        s.max_connections,
    );
    let scope = if s.scope == mailrelay::shaping::SITE {
        "every tenant".to_owned()
    } else {
        s.scope.clone()
    };
    let mut reply: String = s.reply.chars().take(MAX_REPLY).collect();
    if reply.len() < s.reply.len() {
        reply.push('…');
    }
    let relay = s
        .relay
        .as_ref()
        .map(|r| format!(" (MailRelay {r})"))
        .unwrap_or_default();
    let note = format!(
        "{what} of {scope} at {} until {} by rule {}{relay}: {reply}",
        s.site, s.until.0, s.rule,
    );
    (warning, reason, note)
}

/// The states `quota`'s rules started, on the relays it selects (as their status
/// lists them), each with its relay named.
pub fn quota_states(quota: &SendQuota, relays: &[&MailRelay]) -> Vec<ShapingStateStatus> {
    let name = kube::ResourceExt::name_any(quota);
    let rules: Vec<String> = quota
        .spec
        .response_rules
        .iter()
        .map(|r| quota_rule_name(&name, &r.name))
        .collect();
    if rules.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<ShapingStateStatus> = relays
        .iter()
        .flat_map(|r| {
            let relay = kube::ResourceExt::name_any(*r);
            r.status
                .iter()
                .flat_map(|s| s.shaping.iter())
                .filter(|s| rules.contains(&s.rule))
                .map(move |s| ShapingStateStatus {
                    relay: Some(relay.clone()),
                    ..s.clone()
                })
        })
        .collect();
    out.sort_by(|a, b| b.until.0.cmp(&a.until.0).then_with(|| a.id.cmp(&b.id)));
    out.truncate(MAX_STATES);
    out
}
