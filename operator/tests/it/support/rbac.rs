//! What the operator needs from Kubernetes RBAC, derived from the requests the
//! in-memory API recorded, and a small RBAC authorizer over the objects the chart
//! renders, so that a test can say "the chart grants exactly this".
//!
//! A request becomes one or more [`Access`]es (the attributes the API server's
//! authorizer sees): GET of a name is `get`, of a collection `list`, with
//! `watch=true` `watch`; POST `create`; PUT `update`; PATCH `patch`, and a
//! server-side apply to an object (not a subresource) also `create`, since an
//! apply that creates is authorized as `create` too. An object written with an
//! owner reference that blocks owner deletion also needs `update` on the
//! owner's `finalizers` (OwnerReferencesPermissionEnforcement).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::fake_api::Recorded;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    /// `None`: a cluster-scoped request (or a list/watch across namespaces).
    pub namespace: Option<String>,
    pub group: String,
    /// `plural` or `plural/subresource`.
    pub resource: String,
    pub verb: String,
    pub name: Option<String>,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if let Some(n) = &self.name {
            write!(f, " {n:?}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => write!(f, " across the cluster"),
        }
    }
}

/// `/api/v1/namespaces/ns/configmaps/x/status` -> (namespace, group, resource, name).
fn parse_path(path: &str) -> (Option<String>, String, String, Option<String>) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = if parts[0] == "api" {
        (String::new(), &parts[2..])
    } else {
        (parts[1].to_owned(), &parts[3..])
    };
    let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_owned()), &rest[2..])
    } else {
        (None, rest)
    };
    let resource = match rest.get(2) {
        Some(sub) => format!("{}/{sub}", rest[0]),
        None => rest[0].to_owned(),
    };
    (ns, group, resource, rest.get(1).map(|s| (*s).to_owned()))
}

/// Lower-case plural of a kind, as the operator's resources spell it.
fn plural(kind: &str) -> String {
    let k = kind.to_lowercase();
    if k.ends_with('s') {
        format!("{k}es")
    } else {
        format!("{k}s")
    }
}

/// What one recorded request needs.
pub fn accesses(r: &Recorded) -> Vec<Access> {
    let (namespace, group, resource, name) = parse_path(&r.path);
    let watch = r.query.split('&').any(|kv| kv == "watch=true");
    let verbs: Vec<&str> = match (r.method.as_str(), &name) {
        ("GET", Some(_)) => vec!["get"],
        ("GET", None) if watch => vec!["watch"],
        ("GET", None) => vec!["list"],
        ("POST", _) => vec!["create"],
        ("PUT", _) => vec!["update"],
        ("PATCH", _) => {
            let apply = r
                .content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/apply-patch"));
            if apply && !resource.contains('/') {
                vec!["patch", "create"]
            } else {
                vec!["patch"]
            }
        }
        ("DELETE", Some(_)) => vec!["delete"],
        ("DELETE", None) => vec!["deletecollection"],
        (m, _) => panic!("unexpected method {m} {}", r.path),
    };
    let mut out: Vec<Access> = verbs
        .into_iter()
        .map(|verb| Access {
            namespace: namespace.clone(),
            group: group.clone(),
            resource: resource.clone(),
            verb: verb.into(),
            // A create names no object the authorizer can restrict by name.
            name: if verb == "create" { None } else { name.clone() },
        })
        .collect();
    if matches!(r.method.as_str(), "POST" | "PUT" | "PATCH")
        && let Some(refs) = r
            .body
            .as_ref()
            .and_then(|b| b.pointer("/metadata/ownerReferences"))
            .and_then(Value::as_array)
    {
        for o in refs
            .iter()
            .filter(|o| o["blockOwnerDeletion"] == Value::Bool(true))
        {
            let api_version = o["apiVersion"].as_str().unwrap_or_default();
            let owner_group = api_version
                .rsplit_once('/')
                .map_or("", |(g, _)| g)
                .to_owned();
            out.push(Access {
                namespace: namespace.clone(),
                group: owner_group,
                resource: format!("{}/finalizers", plural(o["kind"].as_str().unwrap_or("?"))),
                verb: "update".into(),
                name: o["name"].as_str().map(str::to_owned),
            });
        }
    }
    out
}

/// Every access the recorded requests needed (answered or not: a 404 for a
/// missing object still needed the permission to ask).
pub fn needed(requests: &[Recorded]) -> BTreeSet<Access> {
    requests.iter().flat_map(accesses).collect()
}

/// One rule element as granted: where it applies, and what it allows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// `ClusterRole NAME` or `Role NS/NAME` (through which binding it is held).
    pub via: String,
    /// `None`: every namespace (and cluster-scoped objects).
    pub namespace: Option<String>,
    pub group: String,
    pub resource: String,
    pub verb: String,
    /// Empty: any name.
    pub names: Vec<String>,
}

impl Grant {
    fn allows(&self, a: &Access) -> bool {
        let ns_ok = match (&self.namespace, &a.namespace) {
            (None, _) => true,
            (Some(g), Some(n)) => g == n,
            (Some(_), None) => false,
        };
        let name_ok =
            self.names.is_empty() || a.name.as_ref().is_some_and(|n| self.names.contains(n));
        ns_ok
            && name_ok
            && (self.group == a.group || self.group == "*")
            && (self.resource == a.resource || self.resource == "*")
            && (self.verb == a.verb || self.verb == "*")
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{}: {} {group}/{}", self.via, self.verb, self.resource)?;
        if !self.names.is_empty() {
            write!(f, " (resourceNames {:?})", self.names)?;
        }
        Ok(())
    }
}

/// The rules the rendered objects grant the ServiceAccount `sa_ns/sa_name`,
/// expanded to one [`Grant`] per group, resource and verb.
pub fn grants(objects: &[Value], sa_ns: &str, sa_name: &str) -> Vec<Grant> {
    let find = |kind: &str, ns: Option<&str>, name: &str| -> Option<&Value> {
        objects.iter().find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && o["metadata"]["namespace"].as_str() == ns
        })
    };
    let mut out = Vec::new();
    for b in objects {
        let kind = b["kind"].as_str().unwrap_or_default();
        if kind != "ClusterRoleBinding" && kind != "RoleBinding" {
            continue;
        }
        let bound = b["subjects"].as_array().into_iter().flatten().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == sa_name && s["namespace"] == sa_ns
        });
        if !bound {
            continue;
        }
        let binding_ns = b["metadata"]["namespace"].as_str();
        let role_kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = b["roleRef"]["name"].as_str().unwrap_or_default();
        let role = if role_kind == "ClusterRole" {
            find("ClusterRole", None, role_name)
        } else {
            find("Role", binding_ns, role_name)
        };
        let role = role.unwrap_or_else(|| {
            panic!(
                "{kind} {} refers to {role_kind} {role_name}, which is not rendered",
                b["metadata"]["name"]
            )
        });
        let via = match binding_ns {
            Some(ns) => format!("{role_kind} {ns}/{role_name}"),
            None => format!("{role_kind} {role_name}"),
        };
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        for rule in role["rules"].as_array().into_iter().flatten() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        out.push(Grant {
                            via: via.clone(),
                            namespace: binding_ns.map(str::to_owned),
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                            names: strings(&rule["resourceNames"]),
                        });
                    }
                }
            }
        }
    }
    out
}

/// Compares what was needed with what is granted: every access must be allowed
/// by some grant, and every grant must allow some access. The error lists both
/// differences, and the rules that would be exact.
pub fn compare(needed: &BTreeSet<Access>, grants: &[Grant]) -> Result<(), String> {
    let missing: Vec<&Access> = needed
        .iter()
        .filter(|a| !grants.iter().any(|g| g.allows(a)))
        .collect();
    let extra: BTreeSet<&Grant> = grants
        .iter()
        .filter(|g| !needed.iter().any(|a| g.allows(a)))
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let mut msg = String::from(
        "the chart's RBAC differs from what the operator's requests need \
         (charts/mailrelay-operator/templates/rbac.yaml):\n",
    );
    if !missing.is_empty() {
        msg.push_str("MISSING (requests the chart does not allow):\n");
        for a in &missing {
            msg.push_str(&format!("  - {a}\n"));
        }
    }
    if !extra.is_empty() {
        msg.push_str("EXTRA (granted, used by no request: remove):\n");
        for g in &extra {
            msg.push_str(&format!("  + {g}\n"));
        }
    }
    msg.push_str("what the requests need, by group and resource:\n");
    msg.push_str(&summary(needed));
    Err(msg)
}

/// `group/resource: verbs` lines (`core` for the empty group).
pub fn summary(needed: &BTreeSet<Access>) -> String {
    let mut by: BTreeMap<(String, String), BTreeSet<&str>> = BTreeMap::new();
    for a in needed {
        by.entry((a.group.clone(), a.resource.clone()))
            .or_default()
            .insert(&a.verb);
    }
    by.iter()
        .map(|((g, r), verbs)| {
            let g = if g.is_empty() { "core" } else { g };
            format!(
                "    {g}/{r}: {}\n",
                verbs.iter().copied().collect::<Vec<_>>().join(", ")
            )
        })
        .collect()
}

/// The chart rendered by the real Helm engine (`charts/tests/render.py`, the
/// same helm-python-sdk the chart tests use) with `values`.
pub fn render_chart(values: &Value, release: &str, namespace: &str) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tests/render.py");
    let o = Command::new("python3")
        .arg(&script)
        .args(["--name", release, "--namespace", namespace, "--values"])
        .arg(values.to_string())
        .output()
        .expect("python3 (with helm-python-sdk and pyyaml from .ci/install-deps)");
    assert!(
        o.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("render.py prints a JSON list")
}
