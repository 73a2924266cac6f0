//! The Helm chart `charts/mailrelay-operator`, rendered by the real Helm engine.
//!
//! `charts/tests/test_chart.py` (PyPI `helm-python-sdk`, installed by
//! `.ci/install-deps`) lints, schema-checks and renders the chart for several
//! value sets, refuses bad ones, and validates MailRelay/SendQuota objects against
//! the CRD schemas. It writes every rendered object to a directory; here each core,
//! apps, rbac and apiextensions object is deserialized into its k8s-openapi type
//! and serialized back: any field the type does not know (a typo, a field at the
//! wrong level) is dropped on the way and the comparison fails. Custom resources
//! also get the CRDs' CEL rules (`x-kubernetes-validations`) evaluated, which the
//! script's JSON Schema check cannot do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::Validator;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// JSON `null` means "absent" to the API server; the typed round trip drops it too.
fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_nulls).collect()),
        v => v.clone(),
    }
}

/// Paths where `a` (the original) and `b` (the round trip) differ.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => diff(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: unknown field (dropped by the type)")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the type"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                diff(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} became {b}")),
        _ => {}
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(v: &Value) -> Result<(), String> {
    let orig = strip_nulls(v);
    let typed: T = serde_json::from_value(orig.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut d = Vec::new();
    diff(&orig, &back, "", &mut d);
    if d.is_empty() {
        Ok(())
    } else {
        Err(d.join("; "))
    }
}

/// Strictly checks one object of a kind that k8s-openapi knows. `None`: a kind
/// checked elsewhere (custom resources, against their schema, by the script).
fn strict(v: &Value) -> Option<Result<(), String>> {
    let api = v["apiVersion"].as_str().unwrap_or_default();
    let kind = v["kind"].as_str().unwrap_or_default();
    Some(match (api, kind) {
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(v),
        ("v1", "Service") => round_trip::<Service>(v),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(v),
        ("v1", "Secret") => round_trip::<Secret>(v),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(v),
        ("apps/v1", "StatefulSet") => round_trip::<StatefulSet>(v),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(v),
        ("networking.k8s.io/v1", "NetworkPolicy") => round_trip::<NetworkPolicy>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(v)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(v),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(v),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(v)
        }
        ("mailrelay.io/v1alpha1", "MailRelay" | "SendQuota")
        | ("monitoring.coreos.com/v1", "ServiceMonitor" | "PodMonitor" | "PrometheusRule") => {
            return None;
        }
        _ => Err(format!("no check for {api} {kind}: add one")),
    })
}

/// openAPIV3Schema of each CRD in the chart, by kind.
fn crd_schemas() -> BTreeMap<String, Value> {
    let dir = repo().join("charts/mailrelay-operator/files/crds");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let crd: Value =
            serde_norway::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).expect("CRD YAML");
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_owned();
        out.insert(
            kind,
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
        );
    }
    out
}

/// The CEL rules of the object's CRD, as the API server evaluates them on create.
fn cel(schemas: &BTreeMap<String, Value>, o: &Value) -> Result<(), String> {
    let kind = o["kind"].as_str().unwrap_or_default();
    let schema = schemas
        .get(kind)
        .ok_or_else(|| format!("no CRD for {kind}"))?;
    Validator::new().validate(schema, o, None).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

fn run_script(out: &Path) -> String {
    let script = repo().join("charts/tests/test_chart.py");
    let o = Command::new("python3")
        .arg(&script)
        .arg("--out")
        .arg(out)
        .output()
        .expect("python3 (with helm-python-sdk, jsonschema, pyyaml from .ci/install-deps)");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{} failed:\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

#[test]
fn chart_renders_for_every_value_set_and_every_object_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let report = run_script(dir.path());
    println!("{report}");
    assert!(report.contains(" passed, 0 failed"), "{report}");

    let mut cases = BTreeMap::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        let objects: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cases.insert(
            p.file_stem().unwrap().to_string_lossy().into_owned(),
            objects,
        );
    }
    for case in [
        "defaults",
        "bundled-redis",
        "bundled-redis-existing-secret",
        "first-relay-and-quotas",
        "external-redis-secret-relay",
        "external-redis-url-from-secret",
        "external-redis-sentinel",
        "external-redis-sentinel-url-from-secret",
        "metrics",
        "ha-operator",
        "relay-monitoring",
        "relay-monitoring-with-operator",
        "network-policy-options",
        "network-policies-off",
        "namespaced",
        "no-aggregated-roles",
    ] {
        assert!(cases.contains_key(case), "case {case} not rendered");
    }
    let schemas = crd_schemas();
    let mut errors = Vec::new();
    let mut checked = 0;
    let mut custom = 0;
    for (case, objects) in &cases {
        for o in objects {
            if o["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .starts_with("mailrelay.io/")
            {
                custom += 1;
                if let Err(e) = cel(&schemas, o) {
                    errors.push(format!(
                        "{case}: {} {}: CEL: {e}",
                        o["kind"], o["metadata"]["name"]
                    ));
                }
            }
            if let Some(r) = strict(o) {
                checked += 1;
                if let Err(e) = r {
                    errors.push(format!(
                        "{case}: {} {}: {e}",
                        o["kind"], o["metadata"]["name"]
                    ));
                }
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked > 40, "only {checked} objects checked");
    assert!(custom >= 4, "only {custom} custom resources checked");
}

#[test]
fn cel_rules_are_enforced_on_custom_resources() {
    // The check itself: a relay offering AUTH without TLS breaks a CRD rule.
    let schemas = crd_schemas();
    let mut mr = serde_json::json!({
        "apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
        "metadata": {"name": "outbound", "namespace": "mail"},
        "spec": {"hostname": "relay.example.com", "redis": {"url": "redis://r:6379"},
                 "tls": {"secretName": "t"}, "auth": {"secretName": "u"}}
    });
    assert_eq!(cel(&schemas, &mr), Ok(()));
    mr["spec"].as_object_mut().unwrap().remove("tls");
    let e = cel(&schemas, &mr).unwrap_err();
    assert!(e.contains("AUTH"), "{e}");
}

#[test]
fn a_misplaced_field_fails_the_strict_check() {
    // The check itself: a typo inside a Deployment must not pass.
    let mut d = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "x", "labels": {"a": "b"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "i",
                                  "securityContext": {"readOnlyRootFilesystem": true}}]}}}
    });
    assert_eq!(strict(&d), Some(Ok(())));
    d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] =
        true.into();
    let e = strict(&d).unwrap().unwrap_err();
    assert_eq!(
        e,
        ".spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem: unknown field (dropped by the type)"
    );
    d["spec"]["template"]["spec"]["containers"][0]["securityContext"] = serde_json::json!({});
    d["spec"]["replicas"] = "1".into();
    assert!(strict(&d).unwrap().is_err(), "a string for an integer");
}

/// The chart installs exactly the CRDs the operator generates (`mailrelay-operator
/// crdgen` writes crds/ and the copy in the chart's files/crds/ that its CRD
/// templates load; test_chart.py checks the rendered CRDs against crds/).
#[test]
fn chart_crds_are_identical_to_the_generated_crds() {
    let list = |d: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| {
                let p = e.unwrap().path();
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect()
    };
    let generated = list(&repo().join("crds"));
    let chart = list(&repo().join("charts/mailrelay-operator/files/crds"));
    assert!(!generated.is_empty(), "crds/ is empty");
    let regen = "run `cargo run -p mailrelay-operator -- crdgen`";
    for name in generated.keys() {
        assert!(
            chart.contains_key(name),
            "charts/mailrelay-operator/files/crds/{name} is missing: {regen}"
        );
    }
    for (name, bytes) in &chart {
        match generated.get(name) {
            None => panic!(
                "charts/mailrelay-operator/files/crds/{name} is not in crds/ (stale copy: remove it)"
            ),
            Some(g) => assert!(
                g == bytes,
                "charts/mailrelay-operator/files/crds/{name} differs from crds/{name}: {regen}"
            ),
        }
    }
    assert!(
        !repo().join("charts/mailrelay-operator/crds").exists(),
        "the chart must not carry a crds/ directory besides its CRD templates"
    );
    // And each is a valid CustomResourceDefinition.
    for (name, bytes) in &generated {
        let v: Value = serde_norway::from_slice(bytes).unwrap();
        if let Some(Err(e)) = strict(&v) {
            panic!("crds/{name}: {e}");
        }
    }
}
