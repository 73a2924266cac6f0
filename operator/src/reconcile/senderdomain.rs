//! The SenderDomain reconcile: keys into Secrets, DNS looked at, rotation moved
//! on, status and Events out. The selected MailRelays' reconciles deliver the
//! signing keys to their pods (see [`crate::dkim`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::conditions::{READY, condition};
use super::ownership::{self, Target};
use super::{Context, Error, MANAGER, object_key};
use crate::crd::{
    DkimAlgorithm, KeyState, MAX_SELECTOR_LEN, MailRelay, ROTATE_ANNOTATION, SelectorStatus,
    SenderDomain, SenderDomainSpec, SenderDomainStatus,
};
use crate::dkim::dns::{self, TxtAnswer, TxtResolver, Verdict};
use crate::dkim::keys::{self, DEFAULT_RSA_BITS, KeyMaterial, WARN_RSA_BITS};
use crate::dkim::plan::{self, DNS_PUBLISHED, GENERATED_KEY, KEYS_READY, Loaded, Note, Policy};
use crate::resources::config::relay_selected;

/// Keys a key Secret given by `secretRef` may hold the PEM under, in order.
pub const SECRET_KEYS: [&str; 2] = ["private.key", "tls.key"];
/// Label on generated key Secrets: the SenderDomain they belong to.
pub const SENDER_DOMAIN_LABEL: &str = "mailrelay.io/sender-domain";

/// One lower-case DNS label (the schema's `SELECTOR_PATTERN`).
fn is_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// A DNS name of two labels or more (the schema's `DOMAIN_PATTERN`).
fn is_domain(d: &str) -> bool {
    let labels: Vec<&str> = d.split('.').collect();
    d.len() <= 253 && labels.len() >= 2 && labels.iter().all(|l| is_label(l))
}

/// The backstop of the CRD's schema and CEL rules (a CRD installed without them
/// must not make the operator write nonsense); the message names the field.
pub fn check_spec(spec: &SenderDomainSpec) -> Result<(), String> {
    if !is_domain(&spec.domain) {
        return Err(format!(
            "spec.domain: {:?} is not a DNS name (lower-case labels of letters, digits and '-', like example.com)",
            spec.domain
        ));
    }
    if spec.keys.is_empty() {
        return Err("spec.keys: give at least one key".into());
    }
    for (i, k) in spec.keys.iter().enumerate() {
        if !is_label(&k.selector) || k.selector.len() > MAX_SELECTOR_LEN {
            return Err(format!(
                "spec.keys[{i}].selector: {:?} is not a DNS label of at most {MAX_SELECTOR_LEN} lower-case letters, digits and '-'",
                k.selector
            ));
        }
        if spec.keys[..i].iter().any(|o| o.selector == k.selector) {
            return Err(format!(
                "spec.keys[{i}].selector: {:?} is given twice",
                k.selector
            ));
        }
        if let Some(b) = k.rsa_bits {
            if k.algorithm != DkimAlgorithm::RsaSha256 {
                return Err(format!(
                    "spec.keys[{i}].rsaBits: applies to rsa-sha256 keys only"
                ));
            }
            if !(keys::MIN_RSA_BITS..=4096).contains(&b) {
                return Err(format!(
                    "spec.keys[{i}].rsaBits: {b} is out of range (1024 to 4096; 2048 recommended)"
                ));
            }
        }
    }
    Policy::of(spec).map(|_| ())
}

pub async fn reconcile(sd: Arc<SenderDomain>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(skip) = super::claim_gate(sd.as_ref(), &ctx).await? {
        return Ok(skip);
    }
    let started = Instant::now();
    let result = reconcile_inner(&sd, &ctx).await;
    ctx.metrics
        .reconciled("SenderDomain", started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.record_success(&object_key(sd.as_ref()));
    }
    result
}

fn second(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

async fn publish(ctx: &Context, sd: &SenderDomain, note: &Note) -> Result<(), Error> {
    ctx.recorder
        .publish(
            &Event {
                type_: if note.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: note.reason.into(),
                note: Some(note.message.clone()),
                action: "Reconcile".into(),
                secondary: None,
            },
            &sd.object_ref(&()),
        )
        .await
        .map_err(Error::Event)
}

async fn reconcile_inner(sd: &SenderDomain, ctx: &Context) -> Result<Action, Error> {
    let ns = sd
        .namespace()
        .ok_or_else(|| Error::NoNamespace(sd.name_any()))?;
    if sd.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = sd.name_any();
    let now = ctx.settings.clock.now();
    let now_t = second(now);
    let generation = sd.meta().generation;
    let old = sd.status.clone().unwrap_or_default();

    if let Err(msg) = check_spec(&sd.spec) {
        let oc = &old.conditions;
        let new = SenderDomainStatus {
            observed_generation: generation,
            conditions: vec![
                condition(oc, READY, false, "InvalidSpec", &msg, generation, &now_t),
                condition(
                    oc,
                    KEYS_READY,
                    false,
                    "InvalidSpec",
                    &msg,
                    generation,
                    &now_t,
                ),
            ],
            ..old.clone()
        };
        let first = old
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .is_none_or(|c| c.reason != "InvalidSpec" || c.message != msg);
        if first {
            publish(
                ctx,
                sd,
                &Note {
                    warning: true,
                    reason: "InvalidSpec",
                    message: msg,
                },
            )
            .await?;
        }
        patch_status(ctx, sd, &ns, &old, new).await?;
        return Ok(Action::requeue(ctx.settings.status_interval * 10));
    }
    let policy = Policy::of(&sd.spec).expect("checked by check_spec");

    let rotate = sd.annotations().get(ROTATE_ANNOTATION).map(String::as_str);
    let entries = plan::entries(
        &name,
        &sd.spec,
        &old.keys,
        rotate,
        old.rotated_for.as_deref(),
        &policy,
        now,
    );
    let mut notes = entries.notes;
    let mut drop_secrets = entries.drop_secrets;
    let mut keys_status = entries.keys;

    // Keys: generated into our Secrets, or read from the user's.
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let mut loaded: Vec<Loaded> = Vec::new();
    for k in &mut keys_status {
        let (i, spec_key) = sd
            .spec
            .keys
            .iter()
            .enumerate()
            .find(|(_, s)| s.selector == k.spec_selector)
            .expect("entries keep spec selectors only");
        let field = format!("spec.keys[{i}]");
        let result = if k.generated {
            let bits = spec_key.rsa_bits.unwrap_or(DEFAULT_RSA_BITS);
            ensure_generated(sd, &secrets, k, bits, &mut notes).await?
        } else {
            load_referenced(&secrets, k, &field).await?
        };
        if let Ok(m) = &result
            && k.created_at.is_none()
            && let Some(b) = m.bits
            && b < WARN_RSA_BITS
        {
            notes.push(Note {
                warning: true,
                reason: "KeyTooShort",
                message: format!(
                    "{field}: selector {} has a {b}-bit RSA key; receivers expect 2048 bits",
                    k.selector
                ),
            });
        }
        loaded.push(result);
    }

    // DNS.
    let mut dkim_verdicts: Vec<Option<Verdict>> = vec![None; keys_status.len()];
    let (mut spf, mut dmarc) = (None, None);
    if policy.dns_enabled {
        match TxtResolver::new(&ctx.settings.dns_servers) {
            Ok(r) => {
                for (i, k) in keys_status.iter().enumerate() {
                    if let Ok(m) = &loaded[i] {
                        let n = keys::record_name(&k.selector, &sd.spec.domain);
                        dkim_verdicts[i] = Some(dns::judge_dkim(&n, &m.public, &r.txt(&n).await));
                    }
                }
                spf = Some(dns::judge_spf(
                    &sd.spec.domain,
                    &r.txt(&sd.spec.domain).await,
                ));
                dmarc = Some(look_up_dmarc(&r, &sd.spec.domain).await);
            }
            Err(e) => {
                let failed = |what: &str| Verdict {
                    state: "Error",
                    ok: false,
                    message: format!("cannot look up {what}: {e}"),
                };
                for (i, k) in keys_status.iter().enumerate() {
                    if loaded[i].is_ok() {
                        dkim_verdicts[i] =
                            Some(failed(&keys::record_name(&k.selector, &sd.spec.domain)));
                    }
                }
                spf = Some(failed(&sd.spec.domain));
                dmarc = Some(failed(&format!("_dmarc.{}", sd.spec.domain)));
            }
        }
    }

    let advanced = plan::advance(
        &sd.spec.domain,
        &mut keys_status,
        &loaded,
        &dkim_verdicts,
        &policy,
        now,
    );
    notes.extend(advanced.notes);
    drop_secrets.extend(advanced.drop_secrets);
    for s in &drop_secrets {
        ownership::delete_if_controlled(
            &ctx.client,
            &ns,
            sd.meta().uid.as_deref(),
            &Target::named(ApiResource::erase::<Secret>(&()), s.clone()),
        )
        .await?;
    }

    let problems: Vec<(String, String)> = loaded
        .iter()
        .filter_map(|l| l.as_ref().err().cloned())
        .collect();
    let relays = Api::<MailRelay>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?;
    let mut relay_names: Vec<String> = relays
        .items
        .iter()
        .filter(|r| relay_selected(sd.spec.relay_selector.as_ref(), r))
        .map(ResourceExt::name_any)
        .collect();
    relay_names.sort();
    let (conds, dns_column) = plan::conditions(
        &old.conditions,
        &sd.spec.domain,
        &keys_status,
        &problems,
        spf.as_ref(),
        dmarc.as_ref(),
        &relay_names,
        &policy,
        generation,
        &now_t,
    );
    let dns_false_since = conds
        .iter()
        .find(|c| c.type_ == DNS_PUBLISHED && c.status == "False")
        .map(|c| c.last_transition_time.0);
    let requeue = plan::next_check(&keys_status, &policy, dns_false_since, now);
    let new = SenderDomainStatus {
        observed_generation: generation,
        conditions: conds,
        selector_list: Some(
            keys_status
                .iter()
                .map(|k| k.selector.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        dns: Some(dns_column),
        keys: keys_status,
        relays: relay_names,
        rotated_for: entries.rotated_for,
        last_dns_check: old.last_dns_check.clone(),
    };
    // Only with another change: a status written on every look would wake the
    // controller's own watch and look again at once, forever.
    let mut new = new;
    if policy.dns_enabled && new != old {
        new.last_dns_check = Some(now_t.clone());
    }
    // One Event per reason: the recorder folds repeats of a reason into a
    // series, which would drop the later notes.
    let mut merged: Vec<Note> = Vec::new();
    for n in notes {
        match merged
            .iter_mut()
            .find(|m| m.reason == n.reason && m.warning == n.warning)
        {
            Some(m) => {
                m.message.push_str("; ");
                m.message.push_str(&n.message);
            }
            None => merged.push(n),
        }
    }
    for n in &merged {
        if n.warning {
            tracing::warn!(sender_domain = %name, namespace = %ns, reason = n.reason, message = %n.message, "dkim");
        } else {
            tracing::info!(sender_domain = %name, namespace = %ns, reason = n.reason, message = %n.message, "dkim");
        }
        publish(ctx, sd, n).await?;
    }
    patch_status(ctx, sd, &ns, &old, new).await?;
    Ok(Action::requeue(requeue))
}

/// DMARC at `_dmarc.DOMAIN`, else at a parent's (receivers fall back to the
/// organisational domain); the first name with an answer decides.
async fn look_up_dmarc(r: &TxtResolver, domain: &str) -> Verdict {
    let names = dns::dmarc_names(domain);
    for n in &names {
        let answer = r.txt(n).await;
        let found = match &answer {
            TxtAnswer::Records(rs) => rs
                .iter()
                .any(|x| x.trim_start().to_ascii_lowercase().starts_with("v=dmarc1")),
            TxtAnswer::Failed(_) => true,
            TxtAnswer::None => false,
        };
        if found {
            return dns::judge_dmarc(n, &answer);
        }
    }
    dns::judge_dmarc(&names[0], &TxtAnswer::None)
}

fn generated_matches(m: &KeyMaterial, k: &SelectorStatus, bits: u32) -> bool {
    m.algorithm == k.algorithm && (m.algorithm != DkimAlgorithm::RsaSha256 || m.bits == Some(bits))
}

/// The generated key of `k`: read from its Secret, or generated into it when the
/// Secret is missing or holds another kind of key than the spec now asks for.
async fn ensure_generated(
    sd: &SenderDomain,
    secrets: &Api<Secret>,
    k: &mut SelectorStatus,
    bits: u32,
    notes: &mut Vec<Note>,
) -> Result<Loaded, Error> {
    let secret_name = k.secret_name.clone().expect("entries name the Secret");
    k.secret_key = Some(GENERATED_KEY.into());
    let existing = secrets.get_opt(&secret_name).await?;
    if let Some(s) = &existing {
        if !ownership::controlled_by(&s.metadata, sd.meta().uid.as_deref()) {
            return Ok(Err((
                ownership::CONFLICT.into(),
                format!(
                    "selector {}: Secret {secret_name:?} exists and is not this SenderDomain's; delete or rename it, or give the key with secretRef",
                    k.selector
                ),
            )));
        }
        let current = s
            .data
            .as_ref()
            .and_then(|d| d.get(GENERATED_KEY))
            .and_then(|v| keys::parse(&v.0, k.algorithm).ok());
        if let Some(m) = current
            && generated_matches(&m, k, bits)
        {
            return Ok(Ok(m));
        }
    }
    let algorithm = k.algorithm;
    let generated = tokio::task::spawn_blocking(move || keys::generate(algorithm, bits))
        .await
        .map_err(|e| keys::KeyError::Generate(e.to_string()));
    let m = match generated.and_then(|r| r) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Err((
                e.reason().into(),
                format!("selector {}: {e}", k.selector),
            )));
        }
    };
    let data = BTreeMap::from([(
        GENERATED_KEY.to_owned(),
        ByteString(m.pem.clone().into_bytes()),
    )]);
    let annotations = BTreeMap::from([
        (
            "mailrelay.io/dkim-domain".to_owned(),
            sd.spec.domain.clone(),
        ),
        ("mailrelay.io/dkim-selector".to_owned(), k.selector.clone()),
        (
            "mailrelay.io/dkim-algorithm".to_owned(),
            algorithm.as_str().to_owned(),
        ),
    ]);
    match existing {
        None => {
            let mut labels = BTreeMap::from([(SENDER_DOMAIN_LABEL.to_owned(), sd.name_any())]);
            labels.insert(
                "app.kubernetes.io/managed-by".into(),
                "mailrelay-operator".into(),
            );
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(secret_name.clone()),
                    namespace: sd.namespace(),
                    labels: Some(labels),
                    annotations: Some(annotations),
                    // Goes with the SenderDomain (garbage collector).
                    owner_references: sd.controller_owner_ref(&()).map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".into()),
                data: Some(data),
                ..Secret::default()
            };
            secrets.create(&PostParams::default(), &secret).await?;
        }
        Some(mut s) => {
            s.data = Some(data);
            s.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .extend(annotations);
            secrets
                .replace(&secret_name, &PostParams::default(), &s)
                .await?;
        }
    }
    notes.push(Note {
        warning: false,
        reason: "KeyGenerated",
        message: format!(
            "generated {}{} key for selector {} into Secret {secret_name}; publish TXT {} (status.keys)",
            m.bits.map(|b| format!("{b}-bit ")).unwrap_or_default(),
            algorithm.as_str(),
            k.selector,
            keys::record_name(&k.selector, &sd.spec.domain)
        ),
    });
    Ok(Ok(m))
}

/// The key of `k` from the Secret its `secretRef` names.
async fn load_referenced(
    secrets: &Api<Secret>,
    k: &mut SelectorStatus,
    field: &str,
) -> Result<Loaded, Error> {
    let secret_name = k.secret_name.clone().expect("entries name the Secret");
    let Some(s) = secrets.get_opt(&secret_name).await? else {
        k.secret_key = None;
        return Ok(Err((
            "SecretNotFound".into(),
            format!("{field}.secretRef: Secret {secret_name:?} not found"),
        )));
    };
    let data = s.data.unwrap_or_default();
    let Some((key, value)) = SECRET_KEYS
        .iter()
        .find_map(|key| data.get(*key).map(|v| (*key, v)))
    else {
        k.secret_key = None;
        return Ok(Err((
            "SecretKeyMissing".into(),
            format!(
                "{field}.secretRef: Secret {secret_name:?} has neither private.key nor tls.key"
            ),
        )));
    };
    k.secret_key = Some(key.to_owned());
    Ok(keys::parse(&value.0, k.algorithm).map_err(|e| {
        (
            e.reason().to_owned(),
            format!("{field}.secretRef: Secret {secret_name:?}, key {key}: {e}"),
        )
    }))
}

async fn patch_status(
    ctx: &Context,
    sd: &SenderDomain,
    ns: &str,
    old: &SenderDomainStatus,
    new: SenderDomainStatus,
) -> Result<(), Error> {
    if sd.status.is_some() && *old == new {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": "mailrelay.io/v1alpha1",
        "kind": "SenderDomain",
        "status": new,
    });
    Api::<SenderDomain>::namespaced(ctx.client.clone(), ns)
        .patch_status(
            &sd.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    ctx.metrics.status_patched("SenderDomain");
    Ok(())
}

/// The signing keys of `sd` (Signing and Retiring) as the MailRelay bundle
/// wants them, read from their Secrets; keys that cannot be read are left out
/// (the SenderDomain's KeysReady says why).
pub async fn signing_keys(
    secrets: &Api<Secret>,
    sd: &SenderDomain,
    cache: &mut BTreeMap<String, Option<Secret>>,
) -> Result<Vec<crate::dkim::BundleKey>, Error> {
    let mut out = Vec::new();
    let Some(st) = &sd.status else {
        return Ok(out);
    };
    for k in &st.keys {
        if !matches!(k.state, KeyState::Signing | KeyState::Retiring) {
            continue;
        }
        let (Some(name), Some(key)) = (&k.secret_name, &k.secret_key) else {
            continue;
        };
        if !cache.contains_key(name) {
            cache.insert(name.clone(), secrets.get_opt(name).await?);
        }
        let Some(Some(secret)) = cache.get(name) else {
            continue;
        };
        let Some(value) = secret.data.as_ref().and_then(|d| d.get(key)) else {
            continue;
        };
        if let Ok(m) = keys::parse(&value.0, k.algorithm) {
            // The key DNS was checked for, not one swapped in since.
            if k.txt.as_ref().is_some_and(|t| t.value.ends_with(&m.public)) {
                out.push(crate::dkim::BundleKey {
                    domain: sd.spec.domain.clone(),
                    include_subdomains: sd.spec.include_subdomains,
                    selector: k.selector.clone(),
                    algorithm: k.algorithm.as_str(),
                    pem: m.pem,
                });
            }
        }
    }
    Ok(out)
}
