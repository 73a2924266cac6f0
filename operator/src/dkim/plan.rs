//! The life of a SenderDomain's keys as pure functions of the spec, the previous
//! status, what the Secrets and DNS showed, and the time:
//!
//! 1. [`entries`]: one key per spec selector; a rotation (due by
//!    `spec.rotation.every`, or asked for with the annotation) adds a key under a
//!    new selector, `Pending`.
//! 2. [`advance`]: a `Pending` key starts `Signing` once DNS shows it (at once with
//!    DNS checks off); the key it replaces turns `Retiring` and keeps signing for
//!    the overlap, then is retired (dropped from the relays' Secret).
//! 3. [`conditions`]: Ready, KeysReady, DNSPublished, SPFFound, DMARCFound.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::dns::Verdict;
use super::keys::{self, KeyMaterial};
use crate::crd::{KeyState, SelectorStatus, SenderDomainSpec};
use crate::reconcile::conditions::{READY, condition};

pub const KEYS_READY: &str = "KeysReady";
pub const DNS_PUBLISHED: &str = "DNSPublished";
pub const SPF_FOUND: &str = "SPFFound";
pub const DMARC_FOUND: &str = "DMARCFound";
/// Default of `spec.rotation.overlap`.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(7 * 86400);

/// The secret key a generated key is stored under (PKCS#8 PEM).
pub const GENERATED_KEY: &str = "private.key";

/// Name of the Secret holding a generated key.
pub fn generated_secret_name(sender_domain: &str, selector: &str) -> String {
    format!("dkim-{sender_domain}-{selector}")
}

/// What the spec says about rotation and DNS, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub every: Option<Duration>,
    pub overlap: Duration,
    pub dns_enabled: bool,
    /// Re-check interval once all is published.
    pub interval: Duration,
}

impl Policy {
    pub fn of(spec: &SenderDomainSpec) -> Result<Policy, String> {
        let dur = |field: &str, v: &str| {
            mailrelay::config::parse_duration(v).map_err(|e| format!("{field}: {e}"))
        };
        let rot = spec.rotation.as_ref();
        let dns = spec.dns_check.as_ref();
        Ok(Policy {
            every: rot
                .and_then(|r| r.every.as_deref())
                .map(|v| dur("spec.rotation.every", v))
                .transpose()?,
            overlap: rot
                .and_then(|r| r.overlap.as_deref())
                .map(|v| dur("spec.rotation.overlap", v))
                .transpose()?
                .unwrap_or(DEFAULT_OVERLAP),
            dns_enabled: dns.is_none_or(|d| d.enabled),
            interval: dns
                .and_then(|d| d.interval.as_deref())
                .map(|v| dur("spec.dnsCheck.interval", v))
                .transpose()?
                .unwrap_or(Duration::from_secs(3600)),
        })
    }
}

/// An Event to publish on the SenderDomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

fn normal(reason: &'static str, message: String) -> Note {
    Note {
        warning: false,
        reason,
        message,
    }
}

fn ts(t: &Time) -> Timestamp {
    t.0
}

fn time(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    Timestamp::from_second(t.as_second().saturating_add(d.as_secs() as i64)).unwrap_or(t)
}

/// A selector for a rotation of `base` at `now`: `BASE-YYYYMMDD`, or with `-2`,
/// `-3`… when a key of that name exists already.
pub fn rotated_selector(base: &str, now: Timestamp, taken: &[&str]) -> String {
    let day = now.strftime("%Y%m%d").to_string();
    let first = format!("{base}-{day}");
    if !taken.contains(&first.as_str()) {
        return first;
    }
    (2..)
        .map(|n| format!("{first}-{n}"))
        .find(|s| !taken.contains(&s.as_str()))
        .expect("some suffix is free")
}

/// What [`entries`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Entries {
    pub keys: Vec<SelectorStatus>,
    pub notes: Vec<Note>,
    /// Generated key Secrets no longer needed (their selector left the spec).
    pub drop_secrets: Vec<String>,
    /// The rotation annotation value now acted on.
    pub rotated_for: Option<String>,
}

/// Step 1: the keys the spec asks for, from the old status; rotations started.
pub fn entries(
    name: &str,
    spec: &SenderDomainSpec,
    old: &[SelectorStatus],
    rotate: Option<&str>,
    rotated_for: Option<&str>,
    policy: &Policy,
    now: Timestamp,
) -> Entries {
    let mut notes = Vec::new();
    let mut drop_secrets = Vec::new();
    let rotate_now = rotate.is_some_and(|r| Some(r) != rotated_for);
    let mut out: Vec<SelectorStatus> = Vec::new();
    for old_key in old {
        if !spec
            .keys
            .iter()
            .any(|k| k.selector == old_key.spec_selector)
        {
            notes.push(normal(
                "KeyRetired",
                format!(
                    "selector {} left spec.keys: no longer signing; remove TXT {} once queued mail is delivered",
                    old_key.selector,
                    keys::record_name(&old_key.selector, &spec.domain)
                ),
            ));
            if old_key.generated
                && let Some(s) = &old_key.secret_name
            {
                drop_secrets.push(s.clone());
            }
        }
    }
    for k in &spec.keys {
        let generated = k.secret_ref.is_none();
        let mut mine: Vec<SelectorStatus> = old
            .iter()
            .filter(|o| o.spec_selector == k.selector)
            .cloned()
            .collect();
        if mine.is_empty() {
            mine.push(SelectorStatus {
                selector: k.selector.clone(),
                spec_selector: k.selector.clone(),
                algorithm: k.algorithm,
                state: KeyState::Pending,
                secret_name: None,
                secret_key: None,
                generated,
                bits: None,
                txt: None,
                dns: None,
                dns_message: None,
                created_at: None,
                signing_since: None,
                retire_at: None,
            });
        }
        for m in &mut mine {
            // The spec decides where every key of this selector comes from.
            m.algorithm = k.algorithm;
            m.generated = generated;
            match &k.secret_ref {
                Some(r) => m.secret_name = Some(r.name.clone()),
                None => m.secret_name = Some(generated_secret_name(name, &m.selector)),
            }
        }
        if generated {
            let latest = mine.last().expect("one key at least");
            let due_by_age = match (policy.every, &latest.signing_since) {
                (Some(every), Some(since)) => add(ts(since), every) <= now,
                _ => false,
            };
            if latest.state == KeyState::Signing && (rotate_now || due_by_age) {
                let taken: Vec<&str> = old
                    .iter()
                    .chain(mine.iter())
                    .map(|o| o.selector.as_str())
                    .collect();
                let selector = rotated_selector(&k.selector, now, &taken);
                notes.push(normal(
                    "RotationStarted",
                    format!(
                        "{}: new selector {selector} replaces {}; publish TXT {} (status.keys); signing switches once DNS shows it",
                        if rotate_now {
                            "rotation asked for (mailrelay.io/rotate-dkim)"
                        } else {
                            "rotation due (spec.rotation.every)"
                        },
                        latest.selector,
                        keys::record_name(&selector, &spec.domain)
                    ),
                ));
                mine.push(SelectorStatus {
                    selector: selector.clone(),
                    secret_name: Some(generated_secret_name(name, &selector)),
                    state: KeyState::Pending,
                    bits: None,
                    txt: None,
                    dns: None,
                    dns_message: None,
                    created_at: None,
                    signing_since: None,
                    retire_at: None,
                    ..latest.clone()
                });
            }
        }
        out.extend(mine);
    }
    Entries {
        keys: out,
        notes,
        drop_secrets,
        rotated_for: if rotate_now {
            rotate.map(str::to_owned)
        } else {
            rotated_for.map(str::to_owned)
        },
    }
}

/// What loading one key gave: the key, or the condition reason and a message
/// naming the field.
pub type Loaded = Result<KeyMaterial, (String, String)>;

/// What [`advance`] decided beyond the keys' new states.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Advanced {
    pub notes: Vec<Note>,
    /// Generated key Secrets of retired keys.
    pub drop_secrets: Vec<String>,
}

/// Step 2: states from the keys loaded and DNS (`dns[i]` is `None` when not
/// looked up). Retired keys are removed from `keys`.
pub fn advance(
    domain: &str,
    keys: &mut Vec<SelectorStatus>,
    loaded: &[Loaded],
    dns: &[Option<Verdict>],
    policy: &Policy,
    now: Timestamp,
) -> Advanced {
    let mut out = Advanced::default();
    let mut switched: Vec<(String, String)> = Vec::new();
    for (i, k) in keys.iter_mut().enumerate() {
        match &loaded[i] {
            Err(_) => {
                k.state = KeyState::Invalid;
                k.txt = None;
                k.bits = None;
                k.dns = None;
                k.dns_message = None;
                k.signing_since = None;
                continue;
            }
            Ok(m) => {
                let txt = keys::txt_record(&k.selector, domain, m);
                if k.txt.as_ref().is_some_and(|t| t.value != txt.value)
                    || k.state == KeyState::Invalid
                {
                    // Another key than the one DNS was checked for: start over.
                    k.state = KeyState::Pending;
                    k.signing_since = None;
                    k.retire_at = None;
                }
                k.txt = Some(txt);
                k.bits = m.bits;
                if k.created_at.is_none() {
                    k.created_at = Some(time(now));
                }
            }
        }
        if let Some(v) = &dns[i] {
            if v.state == "Mismatch" && k.dns.as_deref() != Some("Mismatch") {
                out.notes.push(Note {
                    warning: true,
                    reason: "DNSMismatch",
                    message: v.message.clone(),
                });
            }
            k.dns = Some(v.state.to_owned());
            k.dns_message = Some(v.message.clone());
        } else {
            k.dns = Some("Unchecked".into());
            k.dns_message = None;
        }
        let visible = !policy.dns_enabled || dns[i].as_ref().is_some_and(|v| v.ok);
        if k.state == KeyState::Pending && visible {
            k.state = KeyState::Signing;
            k.signing_since = Some(time(now));
            switched.push((k.spec_selector.clone(), k.selector.clone()));
        }
    }
    for (spec_selector, new) in switched {
        let retire_at = add(now, policy.overlap);
        let mut replaced = Vec::new();
        for k in keys.iter_mut() {
            if k.spec_selector == spec_selector && k.selector != new && k.state == KeyState::Signing
            {
                k.state = KeyState::Retiring;
                k.retire_at = Some(time(retire_at));
                replaced.push(k.selector.clone());
            }
        }
        out.notes.push(normal(
            "SigningSwitched",
            if replaced.is_empty() {
                format!("signing {domain} mail with selector {new}")
            } else {
                format!(
                    "signing {domain} mail with selector {new}; {} keeps signing until {retire_at} (overlap), then retires",
                    replaced.join(", ")
                )
            },
        ));
    }
    keys.retain(|k| {
        let due = k.state == KeyState::Retiring && k.retire_at.as_ref().is_some_and(|t| ts(t) <= now);
        if due {
            out.notes.push(normal(
                "KeyRetired",
                format!(
                    "selector {} retired: no longer signing; remove TXT {} once queued mail signed with it is delivered",
                    k.selector,
                    keys::record_name(&k.selector, domain)
                ),
            ));
            if k.generated
                && let Some(s) = &k.secret_name
            {
                out.drop_secrets.push(s.clone());
            }
        }
        !due
    });
    out
}

/// When the reconcile should look again: the next retirement or due rotation,
/// and DNS (`interval` once published; sooner, backing off, while not).
pub fn next_check(
    keys: &[SelectorStatus],
    policy: &Policy,
    dns_false_since: Option<Timestamp>,
    now: Timestamp,
) -> Duration {
    let mut next = policy.interval;
    if policy.dns_enabled
        && let Some(since) = dns_false_since
    {
        // A quarter of how long it has been wrong: 30s right after a change, an
        // hour-old problem every 15 minutes.
        let waited = now.as_second().saturating_sub(since.as_second()).max(0) as u64;
        next = next.min(Duration::from_secs((waited / 4).clamp(30, 900)));
    }
    for k in keys {
        let at = match (k.state, &k.retire_at, &k.signing_since, policy.every) {
            (KeyState::Retiring, Some(r), _, _) => Some(ts(r)),
            (KeyState::Signing, _, Some(s), Some(every)) if k.generated => Some(add(ts(s), every)),
            _ => None,
        };
        if let Some(at) = at {
            let secs = at.as_second().saturating_sub(now.as_second()).max(1) as u64;
            next = next.min(Duration::from_secs(secs));
        }
    }
    next
}

/// Step 3: the conditions and the `DNS` column.
#[allow(clippy::too_many_arguments)]
pub fn conditions(
    old: &[Condition],
    spec_domain: &str,
    keys: &[SelectorStatus],
    problems: &[(String, String)],
    spf: Option<&Verdict>,
    dmarc: Option<&Verdict>,
    relays: &[String],
    policy: &Policy,
    generation: Option<i64>,
    now: &Time,
) -> (Vec<Condition>, String) {
    let keys_ready = match problems.first() {
        Some((reason, _)) => condition(
            old,
            KEYS_READY,
            false,
            reason,
            problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            generation,
            now,
        ),
        None => condition(
            old,
            KEYS_READY,
            true,
            "KeysReady",
            format!("{} key(s) ready", keys.len()),
            generation,
            now,
        ),
    };
    let checked: Vec<&SelectorStatus> = keys
        .iter()
        .filter(|k| k.state != KeyState::Invalid)
        .collect();
    let bad: Vec<&SelectorStatus> = checked
        .iter()
        .copied()
        .filter(|k| k.dns.as_deref() != Some("Published"))
        .collect();
    let (dns_cond, column) = if !policy.dns_enabled {
        let mut c = condition(
            old,
            DNS_PUBLISHED,
            false,
            "CheckDisabled",
            "spec.dnsCheck.enabled is false: keys sign without a DNS check",
            generation,
            now,
        );
        c.status = "Unknown".into();
        (c, "Unchecked".to_owned())
    } else if checked.is_empty() {
        (
            condition(
                old,
                DNS_PUBLISHED,
                false,
                "NoKeys",
                "no usable key to look up (see KeysReady)",
                generation,
                now,
            ),
            "Unchecked".to_owned(),
        )
    } else if bad.is_empty() {
        (
            condition(
                old,
                DNS_PUBLISHED,
                true,
                "Published",
                format!(
                    "DNS publishes every key: {}",
                    checked
                        .iter()
                        .map(|k| keys::record_name(&k.selector, spec_domain))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                generation,
                now,
            ),
            "Published".to_owned(),
        )
    } else {
        let worst = ["Mismatch", "Missing", "Error"]
            .into_iter()
            .find(|s| bad.iter().any(|k| k.dns.as_deref() == Some(*s)))
            .unwrap_or("Unchecked");
        let reason = match worst {
            "Mismatch" => "KeyMismatch",
            "Missing" => "RecordMissing",
            "Error" => "LookupFailed",
            _ => "NotChecked",
        };
        let message = bad
            .iter()
            .map(|k| {
                k.dns_message
                    .clone()
                    .unwrap_or_else(|| format!("{} not checked yet", k.selector))
            })
            .collect::<Vec<_>>()
            .join("; ");
        // Only keys still waiting for DNS: the column says so.
        let column = if bad.iter().all(|k| k.state == KeyState::Pending) && worst == "Missing" {
            "Pending"
        } else {
            worst
        };
        (
            condition(old, DNS_PUBLISHED, false, reason, message, generation, now),
            column.to_owned(),
        )
    };
    let record_cond = |type_: &str, v: Option<&Verdict>| match v {
        None => {
            let mut c = condition(
                old,
                type_,
                false,
                "CheckDisabled",
                "spec.dnsCheck.enabled is false",
                generation,
                now,
            );
            c.status = "Unknown".into();
            c
        }
        Some(v) => condition(
            old,
            type_,
            v.ok,
            match v.state {
                "Error" => "LookupFailed",
                s => s,
            },
            v.message.clone(),
            generation,
            now,
        ),
    };
    let spf_cond = record_cond(SPF_FOUND, spf);
    let dmarc_cond = record_cond(DMARC_FOUND, dmarc);
    let signing: Vec<&SelectorStatus> = keys
        .iter()
        .filter(|k| matches!(k.state, KeyState::Signing | KeyState::Retiring))
        .collect();
    let ready = if !problems.is_empty() {
        condition(
            old,
            READY,
            false,
            "KeysNotReady",
            keys_ready.message.clone(),
            generation,
            now,
        )
    } else if signing.is_empty() {
        condition(
            old,
            READY,
            false,
            "AwaitingDNS",
            format!(
                "waiting for DNS to show {} (the records are in status.keys); signing starts then",
                keys.iter()
                    .map(|k| keys::record_name(&k.selector, spec_domain))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            generation,
            now,
        )
    } else if relays.is_empty() {
        condition(
            old,
            READY,
            false,
            "NoRelays",
            "no MailRelay in this namespace matches relaySelector",
            generation,
            now,
        )
    } else {
        condition(
            old,
            READY,
            true,
            "Signing",
            format!(
                "MailRelay(s) {} sign {spec_domain} mail with {}",
                relays.join(", "),
                signing
                    .iter()
                    .map(|k| format!("{} ({})", k.selector, k.algorithm.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            generation,
            now,
        )
    };
    (
        vec![ready, keys_ready, dns_cond, spf_cond, dmarc_cond],
        column,
    )
}
