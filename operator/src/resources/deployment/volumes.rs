//! The relay pod's volumes and the container's mounts of them: the operator's own
//! (one builder each, listed in [`OPERATOR_VOLUMES`]), then the user's
//! `spec.volumes` and `spec.volumeMounts`.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, EmptyDirVolumeSource, KeyToPath, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::{ExtraVolume, MailRelaySpec, SecretName};
use crate::resources::config::{AUTH_DIR, CA_DIR, CA_FILE, CONFIG_DIR, TLS_DIR};
use crate::resources::config_map_name;

/// Builds one operator volume (its name left out: the list gives it) and the
/// container's mount of it, or nothing when the spec does not ask for it.
type VolumeBuilder = fn(relay: &str, spec: &MailRelaySpec) -> Option<(Volume, VolumeMount)>;

/// The operator's volumes, in pod order. A new one is a builder below plus its line
/// here; its name is then refused in `spec.volumes` (and the CRD's rule on
/// `spec.volumes` must list it: a test checks).
pub(super) const OPERATOR_VOLUMES: [(&str, VolumeBuilder); 8] = [
    ("config", config),
    ("tmp", tmp),
    ("tls", tls),
    ("auth", auth),
    ("admin-token", admin_token),
    (crate::resources::dkim::VOLUME, dkim_keys),
    ("ca-bundle", ca_bundle),
    ("webhooks", webhook_keys),
];

/// The pod's volumes and the relay container's mounts: the operator's, then the user's.
pub(super) fn volumes_and_mounts(
    relay: &str,
    spec: &MailRelaySpec,
) -> (Vec<Volume>, Vec<VolumeMount>) {
    let (mut volumes, mut mounts): (Vec<Volume>, Vec<VolumeMount>) = OPERATOR_VOLUMES
        .iter()
        .filter_map(|(name, build)| {
            let (mut volume, mut mount) = build(relay, spec)?;
            volume.name = (*name).into();
            mount.name = (*name).into();
            Some((volume, mount))
        })
        .unzip();
    volumes.extend(spec.volumes.iter().map(extra_volume));
    mounts.extend(spec.volume_mounts.iter().cloned());
    (volumes, mounts)
}

fn read_only_at(dir: &str) -> VolumeMount {
    VolumeMount {
        mount_path: dir.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The relay config. A whole-directory mount (no subPath), so the kubelet updates
/// the file in place when the ConfigMap changes and the relay reloads its quotas.
fn config(relay: &str, _: &MailRelaySpec) -> Option<(Volume, VolumeMount)> {
    let volume = Volume {
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(relay),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    };
    Some((volume, read_only_at(CONFIG_DIR)))
}

/// `/tmp` on a read-only root file system.
fn tmp(_: &str, _: &MailRelaySpec) -> Option<(Volume, VolumeMount)> {
    let volume = Volume {
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("64Mi".into())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    };
    let mount = VolumeMount {
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    };
    Some((volume, mount))
}

/// The listeners' certificate and key (`spec.tls`).
fn tls(_: &str, spec: &MailRelaySpec) -> Option<(Volume, VolumeMount)> {
    secret_dir(spec.tls.as_ref()?, TLS_DIR)
}

/// The AUTH users file (`spec.auth`).
fn auth(_: &str, spec: &MailRelaySpec) -> Option<(Volume, VolumeMount)> {
    secret_dir(spec.auth.as_ref()?, AUTH_DIR)
}

fn secret_dir(secret: &SecretName, dir: &str) -> Option<(Volume, VolumeMount)> {
    let volume = Volume {
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.secret_name.clone()),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    Some((volume, read_only_at(dir)))
}

/// The admin token the operator generates: a whole-directory mount (no subPath)
/// so a rotation reaches the running relay, which re-reads the file.
fn admin_token(relay: &str, _: &MailRelaySpec) -> Option<(Volume, VolumeMount)> {
    let volume = Volume {
        secret: Some(SecretVolumeSource {
            secret_name: Some(crate::admin_token::secret_name(relay)),
            items: Some(vec![KeyToPath {
                key: crate::admin_token::KEY.into(),
                path: crate::admin_token::KEY.into(),
                mode: None,
            }]),
            default_mode: Some(0o440),
            optional: Some(false),
        }),
        ..Volume::default()
    };
    Some((volume, read_only_at(crate::admin_token::DIR)))
}

/// The DKIM key bundle the operator keeps per relay (its SenderDomains' keys).
fn dkim_keys(relay: &str, _: &MailRelaySpec) -> Option<(Volume, VolumeMount)> {
    Some(crate::resources::dkim::volume(relay))
}

/// The signing keys of `spec.webhooks`: each entry's Secret key projected to a
/// file named like the webhook (the config's `secret_file`).
fn webhook_keys(_: &str, spec: &MailRelaySpec) -> Option<(Volume, VolumeMount)> {
    use k8s_openapi::api::core::v1::{ProjectedVolumeSource, SecretProjection, VolumeProjection};
    if spec.webhooks.is_empty() {
        return None;
    }
    let sources = spec
        .webhooks
        .iter()
        .map(|w| VolumeProjection {
            secret: Some(SecretProjection {
                name: w.secret_ref.name.clone(),
                items: Some(vec![KeyToPath {
                    key: w.secret_ref.key.clone(),
                    path: w.name.clone(),
                    mode: None,
                }]),
                optional: Some(false),
            }),
            ..VolumeProjection::default()
        })
        .collect();
    let volume = Volume {
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            default_mode: Some(0o440),
        }),
        ..Volume::default()
    };
    Some((volume, read_only_at(crate::resources::config::WEBHOOK_DIR)))
}

/// The CA bundle of `spec.delivery.caBundle`: only the one key, under a fixed name
/// (the config's `ca_file` points at it).
fn ca_bundle(_: &str, spec: &MailRelaySpec) -> Option<(Volume, VolumeMount)> {
    let ca = spec.delivery.as_ref()?.ca_bundle.as_ref()?;
    let items = |key: &str| {
        Some(vec![KeyToPath {
            key: key.to_owned(),
            path: CA_FILE.into(),
            mode: None,
        }])
    };
    let volume = Volume {
        config_map: ca.config_map.as_ref().map(|r| ConfigMapVolumeSource {
            name: r.name.clone(),
            items: items(&r.key),
            optional: Some(false),
            ..ConfigMapVolumeSource::default()
        }),
        secret: ca.secret.as_ref().map(|r| SecretVolumeSource {
            secret_name: Some(r.name.clone()),
            items: items(&r.key),
            default_mode: Some(0o440),
            optional: Some(false),
        }),
        ..Volume::default()
    };
    Some((volume, read_only_at(CA_DIR)))
}

fn extra_volume(v: &ExtraVolume) -> Volume {
    Volume {
        name: v.name.clone(),
        config_map: v.config_map.clone(),
        secret: v.secret.clone(),
        empty_dir: v.empty_dir.clone(),
        projected: v.projected.clone(),
        downward_api: v.downward_api.clone(),
        persistent_volume_claim: v.persistent_volume_claim.clone(),
        csi: v.csi.clone(),
        ..Volume::default()
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn the_crd_refuses_every_operator_volume_name() {
        let crd = serde_json::to_string(&crate::crd::MailRelay::crd()).unwrap();
        let rule = crd
            .split_once("!(v.name in [")
            .and_then(|(_, rest)| rest.split_once(']'))
            .expect("the CRD's rule on spec.volumes names")
            .0;
        let reserved: Vec<&str> = rule.split(", ").map(|n| n.trim_matches('\'')).collect();
        let ours: Vec<&str> = OPERATOR_VOLUMES.iter().map(|(name, _)| *name).collect();
        for name in &ours {
            assert!(
                reserved.contains(name),
                "the CRD's rule on spec.volumes does not reserve {name}: {rule}"
            );
        }
        assert_eq!(reserved.len(), ours.len(), "{rule}");
    }
}
