//! Never take over what the operator does not own.
//!
//! Every object of a MailRelay is written with a forced server-side apply, which
//! takes over the fields it sets whoever owned them before. Applied to an object
//! of the same name that someone else made (a team's own Service `api`, a
//! Deployment another controller runs), that would hand the object to whoever can
//! create a MailRelay: its selector, ports or pod template rewritten. So before
//! any apply, each object the relay is made of is looked up by name, metadata
//! only, and the reconcile stops with reason [`CONFLICT`] when one exists that
//! this MailRelay (its uid) does not control.
//!
//! A GET per object is the cheapest correct check: the operator's watches only see
//! objects with its own labels (a foreign object has none), a label-selected list
//! would miss exactly those, and an apply has no precondition on owner references.
//! What remains is the window between the GET and the apply, in which someone
//! would have to create the object; that needs the right to create it anyway.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Preconditions};
use kube::{Resource, ResourceExt};

/// Condition reason (and Event reason) of a relay blocked by a foreign object.
pub const CONFLICT: &str = "Conflict";

/// One object of a relay, by kind and name.
#[derive(Debug, Clone)]
pub struct Target {
    pub resource: ApiResource,
    pub name: String,
}

impl Target {
    pub fn of<K: Resource<DynamicType = ()>>(obj: &K) -> Target {
        Target {
            resource: ApiResource::erase::<K>(&()),
            name: obj.name_any(),
        }
    }

    pub fn named(resource: ApiResource, name: impl Into<String>) -> Target {
        Target {
            resource,
            name: name.into(),
        }
    }
}

/// Whether `meta` names the object with uid `owner` as its controller.
pub fn controlled_by(meta: &ObjectMeta, owner: Option<&str>) -> bool {
    let Some(owner) = owner else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == owner)
}

/// Who controls the object, for the message.
fn controller_of(meta: &ObjectMeta) -> String {
    match meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
    {
        Some(r) => format!("controlled by {} {:?}", r.kind, r.name),
        None => "not controlled by any object".into(),
    }
}

/// The message of a conflict with `target` as found (`meta`).
pub fn conflict_message(target: &Target, meta: &ObjectMeta) -> String {
    format!(
        "{} {:?} already exists and is {}, not by this MailRelay; the operator leaves it \
         untouched: delete or rename it, or give the MailRelay another name",
        target.resource.kind,
        target.name,
        controller_of(meta)
    )
}

/// The first of `targets` in namespace `ns` that exists and is not controlled by
/// the object with uid `owner`, as the condition message. An object kind the API
/// server does not serve (a CRD not installed) has no objects to conflict with.
pub async fn first_conflict(
    client: &kube::Client,
    ns: &str,
    owner: Option<&str>,
    targets: &[Target],
) -> Result<Option<String>, kube::Error> {
    for t in targets {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &t.resource);
        if let Some(found) = api.get_metadata_opt(&t.name).await?
            && !controlled_by(&found.metadata, owner)
        {
            return Ok(Some(conflict_message(t, &found.metadata)));
        }
    }
    Ok(None)
}

/// Deletes `target` only if the object with uid `owner` controls it, with the uid
/// found as a precondition (so that an object recreated by someone else in
/// between is not deleted either). Absent or foreign: nothing is deleted.
pub async fn delete_if_controlled(
    client: &kube::Client,
    ns: &str,
    owner: Option<&str>,
    target: &Target,
) -> Result<(), kube::Error> {
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &target.resource);
    let Some(found) = api.get_metadata_opt(&target.name).await? else {
        return Ok(());
    };
    if !controlled_by(&found.metadata, owner) {
        tracing::warn!(
            namespace = %ns,
            object = %format!("{}/{}", target.resource.kind, target.name),
            "not deleting an object this MailRelay does not control"
        );
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: found.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(&target.name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}
