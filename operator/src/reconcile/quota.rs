//! The SendQuota reconcile: which relays it applies to and how much of it is used.

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::conditions::{self, READY, condition};
use super::{Context, Error, MANAGER, object_key};
use crate::admin_token;
use crate::crd::{MailRelay, SendQuota, SendQuotaStatus};
use crate::quota_api::{QuotaApiError, QuotaUsage, summarise};
use crate::resources::config::{
    SpecError, quota_config, quota_reach, quota_rules, select_quota_rules, selects,
};

/// What asking one relay for the quota gave.
#[derive(Debug)]
pub enum RelayAnswer {
    Usage(QuotaUsage),
    /// The relay does not know the quota (yet: it reloads its config shortly after
    /// the ConfigMap changes).
    Unknown,
    Failed(String),
    /// The quota can never match the relay's delivery paths (`field: reason`):
    /// the relay was not given it.
    Unmatchable(String),
}

/// Pure: the new status from the spec check and the relays' answers.
pub fn quota_status(
    old: Option<&SendQuotaStatus>,
    generation: Option<i64>,
    invalid: Option<&str>,
    answers: &[(String, RelayAnswer)],
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> SendQuotaStatus {
    let old = old.cloned().unwrap_or_default();
    let oc = &old.conditions;
    let reports: Vec<(String, QuotaUsage)> = answers
        .iter()
        .filter_map(|(r, a)| match a {
            RelayAnswer::Usage(u) => Some((r.clone(), u.clone())),
            _ => None,
        })
        .collect();
    let summary = summarise(&reports);
    let ready = if let Some(msg) = invalid {
        condition(oc, READY, false, "InvalidSpec", msg, generation, now)
    } else if let Some((_, RelayAnswer::Unmatchable(msg))) = answers
        .iter()
        .find(|(_, a)| matches!(a, RelayAnswer::Unmatchable(_)))
    {
        condition(oc, READY, false, "Unmatchable", msg, generation, now)
    } else if answers.is_empty() {
        condition(
            oc,
            READY,
            false,
            "NoRelays",
            "no MailRelay in this namespace matches relaySelector",
            generation,
            now,
        )
    } else if let Some((r, RelayAnswer::Failed(e))) = answers
        .iter()
        .find(|(_, a)| matches!(a, RelayAnswer::Failed(_)))
    {
        condition(
            oc,
            READY,
            false,
            "RelayUnreachable",
            format!("MailRelay {r}: {e}"),
            generation,
            now,
        )
    } else if let Some((r, _)) = answers
        .iter()
        .find(|(_, a)| matches!(a, RelayAnswer::Unknown))
    {
        condition(
            oc,
            READY,
            false,
            "NotLoaded",
            format!("MailRelay {r} has not loaded the quota yet"),
            generation,
            now,
        )
    } else {
        condition(
            oc,
            READY,
            true,
            "Enforced",
            format!("enforced by {} relay(s)", answers.len()),
            generation,
            now,
        )
    };
    SendQuotaStatus {
        observed_generation: generation,
        conditions: vec![ready],
        relays: answers.iter().map(|(r, _)| r.clone()).collect(),
        limit: summary.tightest.as_ref().map(|t| t.limit.clone()),
        used: summary.tightest.as_ref().map(|t| t.used),
        remaining: summary.tightest.as_ref().map(|t| t.remaining),
        resets_at: summary.tightest.and_then(|t| t.resets_at),
        windows: summary.rows,
        // Filled in by the reconcile, from the selected relays' status.
        shaping: old.shaping.clone(),
    }
}

/// Condition type of a SendQuota with `spec.responseRules`: whether the selected
/// relays' config carries them.
pub const RESPONSE_RULES: &str = "ResponseRules";

/// Pure: the `ResponseRules` condition. `refusals` are the selected relays'
/// reasons to leave the rules out ([`select_quota_rules`]).
pub fn rules_condition(
    old: &[Condition],
    sq: &SendQuota,
    quota_valid: bool,
    refusals: &[SpecError],
    relays: usize,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Condition {
    let g = sq.meta().generation;
    let c = |ok: bool, reason: &str, msg: String| {
        condition(old, RESPONSE_RULES, ok, reason, msg, g, now)
    };
    if !quota_valid {
        return c(
            false,
            "NotApplied",
            "the SendQuota is invalid (see Ready): its rules are left out too".into(),
        );
    }
    if let Err(e) = quota_rules(sq) {
        return c(false, "InvalidRule", e.to_string());
    }
    if let Some(e) = refusals.first() {
        return c(false, "Refused", e.to_string());
    }
    if relays == 0 {
        return c(
            false,
            "NoRelays",
            "no MailRelay in this namespace matches relaySelector".into(),
        );
    }
    c(
        true,
        "Applied",
        format!(
            "{} rule(s) in the config of {relays} relay(s), named {}.<rule>",
            sq.spec.response_rules.len(),
            sq.name_any()
        ),
    )
}

pub async fn reconcile(sq: Arc<SendQuota>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(skip) = super::claim_gate(sq.as_ref(), &ctx).await? {
        return Ok(skip);
    }
    let started = Instant::now();
    let result = reconcile_inner(&sq, &ctx).await;
    ctx.metrics
        .reconciled("SendQuota", started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.record_success(&object_key(sq.as_ref()));
    }
    result
}

async fn reconcile_inner(sq: &SendQuota, ctx: &Context) -> Result<Action, Error> {
    let ns = sq
        .namespace()
        .ok_or_else(|| Error::NoNamespace(sq.name_any()))?;
    if sq.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = sq.name_any();
    let converted = quota_config(sq);
    let invalid = converted.as_ref().err().map(|e| e.to_string());
    let mut answers = Vec::new();
    let mut selected_relays: Vec<MailRelay> = Vec::new();
    if let Ok(cfg) = &converted {
        let relays = Api::<MailRelay>::namespaced(ctx.client.clone(), &ns)
            .list(&ListParams::default())
            .await?;
        let mut selected: Vec<&MailRelay> =
            relays.items.iter().filter(|r| selects(sq, r)).collect();
        selected.sort_by_key(|r| r.name_any());
        selected_relays = selected.iter().map(|r| (*r).clone()).collect();
        let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
        for relay in selected {
            if let Err(e) = quota_reach(cfg, relay) {
                answers.push((relay.name_any(), RelayAnswer::Unmatchable(e.to_string())));
                continue;
            }
            let base = ctx.settings.admin_url(&ns, &relay.name_any());
            // The relay's admin token, from the Secret the MailRelay reconcile keeps.
            // Missing (not created yet): asked without one, and the relay's 401
            // becomes the status message until it exists.
            let tokens = secrets
                .get_opt(&admin_token::secret_name(&relay.name_any()))
                .await?
                .map(|s| admin_token::tokens(&s))
                .unwrap_or_default();
            let answer = match ctx.admin.quota(&base, &name, &tokens).await {
                Ok(Some(u)) => RelayAnswer::Usage(u),
                Ok(None) => RelayAnswer::Unknown,
                Err(e @ QuotaApiError::Request { .. })
                | Err(e @ QuotaApiError::Status { .. })
                | Err(e @ QuotaApiError::Decode { .. }) => RelayAnswer::Failed(e.to_string()),
            };
            answers.push((relay.name_any(), answer));
        }
    }
    let now = conditions::now();
    let mut new = quota_status(
        sq.status.as_ref(),
        sq.meta().generation,
        invalid.as_deref(),
        &answers,
        &now,
    );
    if !sq.spec.response_rules.is_empty() {
        let refusals = if converted.is_ok() && quota_rules(sq).is_ok() {
            let all = Api::<SendQuota>::namespaced(ctx.client.clone(), &ns)
                .list(&ListParams::default())
                .await?;
            selected_relays
                .iter()
                .flat_map(|r| {
                    select_quota_rules(r, &all.items)
                        .1
                        .into_iter()
                        .filter(|(q, _)| *q == name)
                        .map(|(_, e)| e)
                })
                .collect()
        } else {
            Vec::new()
        };
        let old = sq.status.as_ref().map(|s| s.conditions.as_slice());
        let c = rules_condition(
            old.unwrap_or_default(),
            sq,
            converted.is_ok(),
            &refusals,
            selected_relays.len(),
            &now,
        );
        let changed = old
            .and_then(|o| o.iter().find(|x| x.type_ == RESPONSE_RULES))
            .is_none_or(|o| o.reason != c.reason || o.message != c.message);
        if c.status == "False" && c.reason != "NotApplied" && changed {
            ctx.recorder
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: "ResponseRulesRefused".into(),
                        note: Some(c.message.clone()),
                        action: "Reconcile".into(),
                        secondary: None,
                    },
                    &sq.object_ref(&()),
                )
                .await
                .map_err(Error::Event)?;
        }
        new.conditions.push(c);
    }
    let selected_refs: Vec<&MailRelay> = selected_relays.iter().collect();
    new.shaping = crate::shaping::quota_states(sq, &selected_refs);
    let old_states = sq
        .status
        .as_ref()
        .map(|s| s.shaping.as_slice())
        .unwrap_or_default();
    super::relay::announce_states(ctx, sq, old_states, &new.shaping).await?;
    if let Some(msg) = &invalid {
        let old_ready = sq
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
        if old_ready.is_none_or(|c| c.reason != "InvalidSpec" || c.message != *msg) {
            ctx.recorder
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: "InvalidSpec".into(),
                        note: Some(msg.clone()),
                        action: "Reconcile".into(),
                        secondary: None,
                    },
                    &sq.object_ref(&()),
                )
                .await
                .map_err(Error::Event)?;
        }
    }
    if sq.status.as_ref() != Some(&new) {
        let body = serde_json::json!({
            "apiVersion": "mailrelay.io/v1alpha1",
            "kind": "SendQuota",
            "status": new,
        });
        Api::<SendQuota>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        ctx.metrics.status_patched("SendQuota");
    }
    Ok(Action::requeue(ctx.settings.status_interval))
}
