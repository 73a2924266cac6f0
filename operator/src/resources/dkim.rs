//! The relay side of SenderDomains: `spec.dkim` into the relay's `dkim:` config
//! section, the bundle Secret `NAME-dkim`, and its mount. The mount is always
//! there (optional, so a pod starts before the first bundle is written), and the
//! config only names the directory: key changes reach the pods through the
//! kubelet's Secret refresh, never through the pod template.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, SecretVolumeSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use mailrelay::config::dkim::{DkimConfig, UnsignedOverride};

use super::config::SpecError;
use crate::crd::{MailRelay, MailRelaySpec, relay_labels};
use crate::dkim::{DIR, bundle_secret_name};

/// The volume name (reserved: users' volumes may not take it).
pub const VOLUME: &str = "dkim";

/// The relay's `dkim:` section for `spec.dkim`.
pub fn relay_dkim(spec: &MailRelaySpec) -> Result<DkimConfig, SpecError> {
    let d = spec.dkim.clone().unwrap_or_default();
    let mut overrides = Vec::new();
    for (i, o) in d.unsigned_overrides.iter().enumerate() {
        let pattern = o.domain.strip_prefix("*.").unwrap_or(&o.domain);
        let ok = pattern.contains('.')
            && pattern.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(SpecError {
                field: format!("spec.dkim.unsignedOverrides[{i}].domain"),
                message: format!(
                    "{:?} is not a domain or *.domain (like *.bank.example)",
                    o.domain
                ),
            });
        }
        overrides.push(UnsignedOverride {
            domain: o.domain.to_ascii_lowercase(),
            policy: o.policy,
        });
    }
    Ok(DkimConfig {
        unsigned_policy: d.unsigned_policy,
        unsigned_overrides: overrides,
        keys_dir: Some(PathBuf::from(DIR)),
        ..DkimConfig::default()
    })
}

/// The bundle's volume and mount (one of the Deployment builder's operator volumes;
/// the table there gives it its name, [`VOLUME`]). Always present, so that keys come
/// and go by a Secret update without a new pod template.
pub fn volume(name: &str) -> (Volume, VolumeMount) {
    let volume = Volume {
        secret: Some(SecretVolumeSource {
            secret_name: Some(bundle_secret_name(name)),
            default_mode: Some(0o440),
            // A relay starts before its first bundle exists (and signs nothing).
            optional: Some(true),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    let mount = VolumeMount {
        mount_path: DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    (volume, mount)
}

/// The bundle Secret of `relay` holding `data` (see [`crate::dkim::bundle`]).
pub fn bundle_secret(relay: &MailRelay, data: BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(bundle_secret_name(&relay.name_any())),
            namespace: relay.namespace(),
            labels: Some(relay_labels(&relay.name_any())),
            owner_references: relay.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}
