//! The MailRelay reconcile: quotas and Secrets in, objects and status out.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use mailrelay::config::{RedisConfig, Secret as RelaySecret};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::conditions::{self, Outcome, READY, Rollout};
use super::ownership::{self, Target};
use super::secrets;
use super::{Context, Error, MANAGER, object_key};
use crate::admin_token;
use crate::crd::rules::ShapingStateStatus;
use crate::crd::{MailRelay, MailRelaySpec, MailRelayStatus, SendQuota, SenderDomain};
use crate::resources::autoscaling::{self, Autoscaler};
use crate::resources::config::{
    SpecError, check_redis, quota_config, quota_reach, select_quota_rules, selects,
};
use crate::resources::network;
use crate::resources::{self, Inputs};
use crate::status::{QueueReport, read_report};

/// Server-side applies `obj` (the operator owns every field it sets; `force` takes
/// over fields someone else changed by hand).
pub async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Applies the relay's NetworkPolicy, or, when `spec.networkPolicy.enabled` is
/// false, deletes the one it rendered before (only if this relay owns it: an
/// object of that name someone else made is not ours to remove).
async fn apply_network_policy(
    client: &kube::Client,
    ns: &str,
    relay: &MailRelay,
    policy: Option<NetworkPolicy>,
) -> Result<(), Error> {
    if let Some(p) = policy {
        apply(client, ns, &p).await?;
        return Ok(());
    }
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let name = relay.name_any();
    let Some(existing) = api.get_opt(&name).await? else {
        return Ok(());
    };
    let ours = existing
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == relay.meta().uid.as_ref());
    if ours {
        match api.delete(&name, &DeleteParams::background()).await {
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

/// Field manager that holds a Deployment's `replicas` for the autoscaler: set once
/// (at creation, or when autoscaling is switched on) so that the field survives the
/// operator's applies leaving it out, until the autoscaler's own writes take it over.
pub const REPLICAS_MANAGER: &str = "mailrelay-operator-replicas";

/// Whether `manager`'s server-side apply owns `spec.replicas` of `d`.
pub fn applies_replicas(d: &Deployment, manager: &str) -> bool {
    d.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(manager)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
    })
}

/// Applies the relay Deployment. Without autoscaling it carries `replicas` (the
/// operator owns them and resets any other change). Under an autoscaler it does
/// not, and [`REPLICAS_MANAGER`] holds the field meanwhile: when the operator
/// stops applying a field nobody else owns, the API server removes it, and a
/// removed `replicas` defaults to 1, which would shrink the relay to one pod until
/// the autoscaler noticed.
pub async fn apply_deployment(
    client: &kube::Client,
    ns: &str,
    dep: &Deployment,
    spec: &MailRelaySpec,
) -> Result<Deployment, Error> {
    if spec.autoscaling.is_none() {
        return apply(client, ns, dep).await;
    }
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let name = dep.name_any();
    let hold = |replicas: i32| {
        serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas},
        })
    };
    let params = PatchParams::apply(REPLICAS_MANAGER);
    let existing = api.get_opt(&name).await?;
    if let Some(d) = &existing
        && applies_replicas(d, MANAGER)
    {
        // Autoscaling was just switched on: keep the current size.
        let current = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        api.patch(&name, &params, &Patch::Apply(hold(current)))
            .await?;
    }
    let applied = apply(client, ns, dep).await?;
    if existing.is_none() {
        return Ok(api
            .patch(
                &name,
                &params,
                &Patch::Apply(hold(autoscaling::initial_replicas(spec))),
            )
            .await?);
    }
    Ok(applied)
}

/// What became of `spec.autoscaling` in one reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoscalerOutcome {
    /// Not asked for (any autoscaler rendered before was removed).
    None,
    /// Applied; the kind.
    Applied(&'static str),
    /// A ScaledObject was asked for but the API server does not serve the KEDA CRD.
    KedaMissing,
}

/// Applies the autoscaler `objs` carry and removes one of another kind rendered
/// before (as `status.autoscaler` records).
async fn apply_autoscaler(
    client: &kube::Client,
    ns: &str,
    name: &str,
    owner: Option<&str>,
    wanted: Option<&Autoscaler>,
    previous: Option<&str>,
) -> Result<AutoscalerOutcome, Error> {
    let wanted_kind = wanted.map(Autoscaler::kind);
    if let Some(prev) = previous
        && Some(prev) != wanted_kind
    {
        let resource = match prev {
            autoscaling::HPA_KIND => Some(ApiResource::erase::<HorizontalPodAutoscaler>(&())),
            autoscaling::SCALED_OBJECT_KIND => Some(autoscaling::scaled_object_resource()),
            _ => None,
        };
        // Gone already, KEDA itself gone, or no longer ours: nothing is deleted.
        if let Some(resource) = resource {
            ownership::delete_if_controlled(client, ns, owner, &Target::named(resource, name))
                .await?;
        }
    }
    match wanted {
        None => Ok(AutoscalerOutcome::None),
        Some(Autoscaler::Hpa(h)) => {
            apply(client, ns, h.as_ref()).await?;
            Ok(AutoscalerOutcome::Applied(autoscaling::HPA_KIND))
        }
        Some(Autoscaler::Keda(so)) => {
            let api = Api::<DynamicObject>::namespaced_with(
                client.clone(),
                ns,
                &autoscaling::scaled_object_resource(),
            );
            match api
                .patch(
                    name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(so),
                )
                .await
            {
                Ok(_) => Ok(AutoscalerOutcome::Applied(autoscaling::SCALED_OBJECT_KIND)),
                // An apply creates what is missing, so a 404 means the resource
                // itself is not served: the KEDA CRD is not installed.
                Err(kube::Error::Api(s)) if s.is_not_found() => Ok(AutoscalerOutcome::KedaMissing),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// The quotas that select `relay`, converted; and those that select it but are
/// invalid or can never match its delivery paths (left out of its config,
/// reported on the SendQuota).
pub fn select_quotas(
    relay: &MailRelay,
    all: &[SendQuota],
) -> (
    Vec<mailrelay::quota::config::QuotaConfig>,
    Vec<(String, SpecError)>,
) {
    let mut chosen: Vec<&SendQuota> = all
        .iter()
        .filter(|q| q.meta().deletion_timestamp.is_none() && selects(q, relay))
        .collect();
    chosen.sort_by_key(|q| q.name_any());
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for q in chosen {
        match quota_config(q).and_then(|c| quota_reach(&c, relay).map(|()| c)) {
            Ok(c) => ok.push(c),
            Err(e) => bad.push((q.name_any(), e)),
        }
    }
    (ok, bad)
}

/// Every object `objs` applies, for the ownership check.
fn targets(objs: &resources::Resources, policy: Option<&NetworkPolicy>) -> Vec<Target> {
    let mut t = vec![
        Target::of(&objs.config_map),
        Target::of(&objs.service_account),
        Target::of(&objs.service),
        Target::of(&objs.admin_service),
        Target::of(&objs.pdb),
        Target::of(&objs.deployment),
    ];
    match &objs.autoscaler {
        Some(Autoscaler::Hpa(h)) => t.push(Target::of(h.as_ref())),
        Some(Autoscaler::Keda(so)) => t.push(Target::named(
            autoscaling::scaled_object_resource(),
            so.name_any(),
        )),
        None => {}
    }
    t.extend(policy.map(Target::of));
    t
}

pub async fn reconcile(relay: Arc<MailRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(skip) = super::claim_gate(relay.as_ref(), &ctx).await? {
        return Ok(skip);
    }
    let started = Instant::now();
    let result = reconcile_inner(&relay, &ctx).await;
    ctx.metrics
        .reconciled("MailRelay", started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.record_success(&object_key(relay.as_ref()));
    }
    result
}

async fn reconcile_inner(relay: &MailRelay, ctx: &Context) -> Result<Action, Error> {
    let ns = relay
        .namespace()
        .ok_or_else(|| Error::NoNamespace(relay.name_any()))?;
    let name = relay.name_any();
    let key = object_key(relay);
    if relay.meta().deletion_timestamp.is_some() {
        // The garbage collector removes the owned objects; only our own state goes.
        ctx.queues.forget(&key).await;
        ctx.metrics.forget_relay(&ns, &name);
        return Ok(Action::await_change());
    }
    let client = &ctx.client;

    let quotas = Api::<SendQuota>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?;
    let (quota_rules, refused_rules) = select_quota_rules(relay, &quotas.items);
    for (q, e) in &refused_rules {
        tracing::info!(relay = %name, quota = %q, error = %e, "quota's response rules left out of the relay config");
    }
    let (quotas, rejected) = select_quotas(relay, &quotas.items);
    for (q, e) in &rejected {
        tracing::info!(relay = %name, quota = %q, error = %e, "quota left out of the relay config");
    }

    let secret_api = Api::<Secret>::namespaced(client.clone(), &ns);
    let mut fetched = BTreeMap::new();
    for need in secrets::needed(&relay.spec) {
        if !fetched.contains_key(&need.name) {
            let s = secret_api.get_opt(&need.name).await?;
            fetched.insert(need.name.clone(), s);
        }
    }

    let quota_names: Vec<String> = quotas.iter().map(|q| q.name.clone()).collect();
    // Which Redis URL is meant comes first: with both `url` and `urlSecret` (a CRD
    // without its CEL rules) the Secret's state would be beside the point.
    // The platform's word on Service types and the NetworkPolicy's peers come
    // before Secrets too: a refused spec holds the whole rollout, so an existing
    // Service stays as it is (never turned into a LoadBalancer) and the pods never
    // run without their policy.
    let network = network::network_policy(relay, &ctx.settings.network);
    let refused = check_redis(&relay.spec.redis)
        .map_err(|e| ("InvalidSpec".to_owned(), e.to_string()))
        .and_then(|()| {
            network::check_service_type(&relay.spec, &ctx.settings.allowed_service_types)
                .map_err(|m| (network::SERVICE_TYPE_NOT_ALLOWED.to_owned(), m))
        })
        .and_then(|()| {
            network
                .as_ref()
                .map(|_| ())
                .map_err(|e| ("InvalidSpec".to_owned(), e.to_string()))
        });
    let resolved = match refused {
        Err((reason, message)) => Err((reason, message, ctx.settings.status_interval * 10)),
        Ok(()) => secrets::resolve(&relay.spec, &fetched).map_err(|p| {
            (
                p.reason().to_owned(),
                p.message(),
                ctx.settings.blocked_retry,
            )
        }),
    };
    let previous_autoscaler = relay.status.as_ref().and_then(|s| s.autoscaler.clone());
    let mut scaled = None;
    let mut shaping = None;
    let (outcome, queue, action) = match resolved {
        Err((reason, message, retry)) => (
            Outcome::Blocked { reason, message },
            None,
            Action::requeue(retry),
        ),
        Ok(resolved) => {
            let built = resources::build(Inputs {
                relay,
                quotas,
                quota_rules,
                secrets: &resolved.secrets,
                default_image: &ctx.settings.relay_image,
            });
            match built {
                Err(e) => (
                    Outcome::Blocked {
                        reason: "InvalidSpec".into(),
                        message: e.to_string(),
                    },
                    None,
                    Action::requeue(ctx.settings.status_interval * 10),
                ),
                Ok(objs) => match ownership::first_conflict(
                    client,
                    &ns,
                    relay.meta().uid.as_deref(),
                    &[
                        targets(&objs, network.as_ref().ok().and_then(Option::as_ref)),
                        vec![Target::named(
                            ApiResource::erase::<Secret>(&()),
                            crate::dkim::bundle_secret_name(&name),
                        )],
                    ]
                    .concat(),
                )
                .await?
                {
                    Some(message) => (
                        Outcome::Blocked {
                            reason: ownership::CONFLICT.into(),
                            message,
                        },
                        None,
                        Action::requeue(ctx.settings.blocked_retry),
                    ),
                    None => {
                        // Before the pods: they mount it, and the relay refuses to
                        // start without its token file.
                        let recheck = ensure_admin_token(ctx, &ns, relay).await?;
                        ensure_dkim_bundle(ctx, &ns, relay).await?;
                        apply(client, &ns, &objs.config_map).await?;
                        apply(client, &ns, &objs.service_account).await?;
                        apply_network_policy(client, &ns, relay, network.ok().flatten()).await?;
                        apply(client, &ns, &objs.service).await?;
                        apply(client, &ns, &objs.admin_service).await?;
                        apply(client, &ns, &objs.pdb).await?;
                        let dep =
                            apply_deployment(client, &ns, &objs.deployment, &relay.spec).await?;
                        scaled = Some(
                            apply_autoscaler(
                                client,
                                &ns,
                                &name,
                                relay.meta().uid.as_deref(),
                                objs.autoscaler.as_ref(),
                                previous_autoscaler.as_deref(),
                            )
                            .await?,
                        );
                        let queue = read_queue(ctx, &key, relay, &resolved).await;
                        if let Ok(report) = &queue {
                            ctx.metrics.set_relay_queue(&ns, &name, &report.queue);
                            shaping = read_shaping(ctx, &key, relay, &resolved).await;
                        }
                        (
                            Outcome::Applied {
                                rollout: Rollout::of(&dep),
                                config_hash: objs.config_hash,
                                quotas: quota_names,
                            },
                            Some(queue),
                            Action::requeue(recheck.map_or(ctx.settings.status_interval, |r| {
                                r.min(ctx.settings.status_interval)
                            })),
                        )
                    }
                },
            }
        }
    };

    let now = conditions::now();
    let mut new = conditions::relay_status(
        relay.status.as_ref(),
        relay.meta().generation,
        &outcome,
        queue.as_ref(),
        &now,
    );
    if let Some(scaled) = &scaled {
        conditions::autoscaling_status(
            &mut new,
            relay.status.as_ref(),
            &name,
            scaled,
            relay.meta().generation,
            &now,
        );
        if *scaled == AutoscalerOutcome::KedaMissing
            && relay
                .status
                .as_ref()
                .and_then(|s| {
                    s.conditions
                        .iter()
                        .find(|c| c.type_ == conditions::AUTOSCALING)
                })
                .is_none_or(|c| c.reason != conditions::KEDA_MISSING)
        {
            tracing::warn!(relay = %name, namespace = %ns, "spec.autoscaling.keda: KEDA is not installed");
            ctx.recorder
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: conditions::KEDA_MISSING.into(),
                        note: Some(conditions::KEDA_MISSING_MESSAGE.into()),
                        action: "Reconcile".into(),
                        secondary: None,
                    },
                    &relay.object_ref(&()),
                )
                .await
                .map_err(Error::Event)?;
        }
    }
    if let Outcome::Blocked { reason, message } = &outcome {
        let old_ready = relay
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
        // One event per new problem; the condition carries it from then on.
        if old_ready.is_none_or(|c| c.reason != *reason || c.message != *message) {
            tracing::warn!(relay = %name, namespace = %ns, %reason, %message, "rollout held");
            ctx.recorder
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: reason.clone(),
                        note: Some(message.clone()),
                        action: "Reconcile".into(),
                        secondary: None,
                    },
                    &relay.object_ref(&()),
                )
                .await
                .map_err(Error::Event)?;
        }
    }
    if let Some(states) = shaping {
        let old = relay
            .status
            .as_ref()
            .map(|s| s.shaping.as_slice())
            .unwrap_or_default();
        announce_states(ctx, relay, old, &states).await?;
        new.shaping = states;
    }
    patch_status_if_changed(ctx, relay, &ns, new).await?;
    Ok(action)
}

/// Writes the relay's DKIM bundle Secret (`NAME-dkim`): `keys.yaml` and the PEM
/// file of every signing key of every SenderDomain selecting the relay. Only
/// this Secret changes with the keys (the pods mount it as a directory), so a
/// key change restarts nothing.
async fn ensure_dkim_bundle(ctx: &Context, ns: &str, relay: &MailRelay) -> Result<(), Error> {
    let mut domains = Api::<SenderDomain>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    domains.sort_by_key(|d| d.name_any());
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let mut cache = BTreeMap::new();
    let mut keys = Vec::new();
    for d in domains.iter().filter(|d| {
        d.meta().deletion_timestamp.is_none()
            && crate::resources::config::relay_selected(d.spec.relay_selector.as_ref(), relay)
    }) {
        keys.extend(super::senderdomain::signing_keys(&secrets, d, &mut cache).await?);
    }
    let secret = crate::resources::dkim::bundle_secret(relay, crate::dkim::bundle(&keys));
    apply(&ctx.client, ns, &secret).await?;
    Ok(())
}

/// Creates the relay's admin token Secret when it is missing, rotates it when the
/// MailRelay's annotation asks, and drops the previous token after the grace
/// period (see [`admin_token::plan`]). Returns when to look again (the end of a
/// grace period). Writes are create and update (with the fetched resourceVersion,
/// so a concurrent edit makes this reconcile fail and retry rather than lose it).
async fn ensure_admin_token(
    ctx: &Context,
    ns: &str,
    relay: &MailRelay,
) -> Result<Option<std::time::Duration>, Error> {
    let api = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let name = admin_token::secret_name(&relay.name_any());
    let existing = api.get_opt(&name).await?;
    let rotate = relay.annotations().get(admin_token::ROTATE_ANNOTATION);
    let plan = admin_token::plan(
        existing.as_ref(),
        rotate.map(String::as_str),
        k8s_openapi::jiff::Timestamp::now(),
        admin_token::generate,
    );
    let (written, recheck) = match plan {
        admin_token::Plan::Keep { recheck } => return Ok(recheck),
        admin_token::Plan::Create(d) => {
            let secret = Secret {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.to_owned()),
                    labels: Some(crate::crd::relay_labels(&relay.name_any())),
                    annotations: (!d.annotations.is_empty()).then(|| d.annotations.clone()),
                    // Goes with the MailRelay (garbage collector).
                    owner_references: relay.controller_owner_ref(&()).map(|o| vec![o]),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                data: Some(d.data()),
                ..Secret::default()
            };
            api.create(&PostParams::default(), &secret).await?;
            (d, None)
        }
        admin_token::Plan::Replace(d) => {
            let Some(existing) = existing else {
                return Ok(None);
            };
            let secret = admin_token::apply_to(existing, &d);
            api.replace(&name, &PostParams::default(), &secret).await?;
            let recheck = (d.tokens.len() > 1).then_some(admin_token::ROTATION_GRACE);
            (d, recheck)
        }
    };
    tracing::info!(relay = %relay.name_any(), namespace = %ns, secret = %name, "admin token {written}");
    ctx.recorder
        .publish(
            &Event {
                type_: EventType::Normal,
                reason: written.event_reason().into(),
                note: Some(format!("Secret {name}: {written}")),
                action: "AdminToken".into(),
                secondary: None,
            },
            &relay.object_ref(&()),
        )
        .await
        .map_err(Error::Event)?;
    Ok(recheck)
}

/// The relay's Redis as the operator reads it (no replica waits).
fn store_config(relay: &MailRelay, secrets: &secrets::Resolved) -> Option<RedisConfig> {
    let r = &relay.spec.redis;
    // `build` succeeded, so exactly one of the two is there.
    let url = r.url.clone().or_else(|| secrets.redis_url.clone())?;
    Some(RedisConfig {
        url,
        password: secrets.redis_password.clone().map(RelaySecret),
        cluster: r.cluster,
        cluster_nodes: r.cluster_nodes.clone(),
        key_prefix: r.key_prefix.clone().unwrap_or_else(|| "mr".into()),
        wait_replicas: 0,
        wait_timeout: mailrelay::config::default_wait_timeout(),
        fresh_list: true,
    })
}

/// Reads the response-rule states in force, bounded in time; `None` when they
/// cannot be read (the status keeps what it showed, and nothing is announced
/// twice).
async fn read_shaping(
    ctx: &Context,
    key: &str,
    relay: &MailRelay,
    secrets: &secrets::Resolved,
) -> Option<Vec<ShapingStateStatus>> {
    let cfg = store_config(relay, secrets)?;
    let read = async {
        let e = ctx.queues.egress(key, &cfg).await?;
        crate::shaping::read(&e).await
    };
    match tokio::time::timeout(ctx.settings.queue_timeout, read).await {
        Ok(Ok(list)) => Some(crate::shaping::states_status(&list)),
        Ok(Err(e)) => {
            tracing::warn!(relay = %relay.name_any(), error = %e, "cannot read response-rule states");
            None
        }
        Err(_) => {
            tracing::warn!(relay = %relay.name_any(), "response-rule states: no answer in time");
            None
        }
    }
}

/// One Event per state that started since the last status (on `obj`).
pub async fn announce_states<K>(
    ctx: &Context,
    obj: &K,
    old: &[ShapingStateStatus],
    new: &[ShapingStateStatus],
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()>,
{
    for s in crate::shaping::started(old, new) {
        let (warning, reason, note) = crate::shaping::event(s);
        tracing::info!(object = %object_key(obj), %reason, %note, "response-rule state");
        ctx.recorder
            .publish(
                &Event {
                    type_: if warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: reason.into(),
                    note: Some(note),
                    action: "Shaping".into(),
                    secondary: None,
                },
                &obj.object_ref(&()),
            )
            .await
            .map_err(Error::Event)?;
    }
    Ok(())
}

/// Reads the queue report, bounded in time; an error is a status (Degraded), not a
/// reconcile failure.
async fn read_queue(
    ctx: &Context,
    key: &str,
    relay: &MailRelay,
    secrets: &secrets::Resolved,
) -> Result<QueueReport, String> {
    let Some(cfg) = store_config(relay, secrets) else {
        return Err("no Redis URL".into());
    };
    let read = async {
        let q = ctx.queues.get(key, &cfg).await?;
        read_report(q.as_ref()).await
    };
    match tokio::time::timeout(ctx.settings.queue_timeout, read).await {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) => {
            ctx.queues.forget(key).await;
            Err(format!("cannot read the queue store: {e}"))
        }
        Err(_) => {
            ctx.queues.forget(key).await;
            Err(format!(
                "the queue store did not answer within {:?}",
                ctx.settings.queue_timeout
            ))
        }
    }
}

async fn patch_status_if_changed(
    ctx: &Context,
    relay: &MailRelay,
    ns: &str,
    new: MailRelayStatus,
) -> Result<(), Error> {
    if relay.status.as_ref() == Some(&new) {
        return Ok(());
    }
    let api = Api::<MailRelay>::namespaced(ctx.client.clone(), ns);
    let body = serde_json::json!({
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "MailRelay",
        "status": new,
    });
    api.patch_status(
        &relay.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    ctx.metrics.status_patched("MailRelay");
    Ok(())
}
