//! The CRDs: the checked-in YAML is what the types generate; the examples pass the
//! schemas; bad specs are refused with a message naming the field.
//!
//! Two real validators stand in for the API server: Python's `jsonschema` for the
//! OpenAPI part (types, ranges, patterns, enums, required fields, and unknown
//! fields refused as `kubectl apply`'s strict field validation does), and kube's
//! CEL evaluator (`kube::core::cel`, the Kubernetes CEL libraries) for the
//! `x-kubernetes-validations` rules.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kube::core::cel::{Validator, compile_schema};
use mailrelay_operator::crd::{all_crds, crd_yaml};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schema(kind: &str) -> Value {
    let crd = all_crds()
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

const STRICT_CHECK: &str = r#"
import json, sys
import jsonschema

def strict(s):
    # kubectl's strict field validation: unknown fields are errors.
    if isinstance(s, dict):
        if s.get("type") == "object" and "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s.setdefault("additionalProperties", False)
        for v in s.values():
            strict(v)
    elif isinstance(s, list):
        for v in s:
            strict(v)
    return s

cases = json.load(sys.stdin)
out = []
for schema, obj in cases:
    # apiVersion, kind and metadata are the API server's own: only spec and status
    # are the CRD's to check strictly.
    for part in ("spec", "status"):
        if part in schema.get("properties", {}):
            strict(schema["properties"][part])
    v = jsonschema.Draft7Validator(schema)
    out.append(["%s: %s" % ("/".join(str(p) for p in e.absolute_path), e.message) for e in v.iter_errors(obj)])
print(json.dumps(out))
"#;

/// OpenAPI errors per object (Python jsonschema).
fn openapi_errors(cases: &[(Value, Value)]) -> Vec<Vec<String>> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(STRICT_CHECK)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with jsonschema (see .ci/install-deps)");
    serde_json::to_writer(child.stdin.take().unwrap(), &json!(cases)).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "schema check failed to run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// CEL errors (the object's metadata must carry a name for the root rules).
fn cel_errors(kind: &str, obj: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(kind), obj, None) {
        Ok(()) => vec![],
        Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
    }
}

fn errors(objs: &[Value]) -> Vec<Vec<String>> {
    let cases: Vec<(Value, Value)> = objs
        .iter()
        .map(|o| (schema(o["kind"].as_str().unwrap()), o.clone()))
        .collect();
    let mut all = openapi_errors(&cases);
    for (errs, o) in all.iter_mut().zip(objs) {
        errs.extend(cel_errors(o["kind"].as_str().unwrap(), o));
    }
    all
}

/// Both outputs of `crdgen`: the plain manifests and the copy the chart's CRD
/// templates load.
#[test]
fn checked_in_crds_are_the_generated_ones() {
    for dir in ["crds", "charts/mailrelay-operator/files/crds"] {
        for (file, crd) in all_crds() {
            let path = root().join(dir).join(file);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == crd_yaml(&crd),
                "{} is stale: run `cargo run -p mailrelay-operator -- crdgen`",
                path.display()
            );
        }
    }
    // Helm installs a chart's crds/ before its templates: with the CRD templates
    // also there, the install would fail on CRDs that "exist and cannot be imported".
    let helm_crds = root().join("charts/mailrelay-operator/crds");
    assert!(
        !helm_crds.exists(),
        "{} must not exist: the chart renders its CRDs from files/crds/",
        helm_crds.display()
    );
}

#[test]
fn every_cel_rule_compiles() {
    for kind in ["MailRelay", "SendQuota", "SenderDomain"] {
        fn walk(c: &kube::core::cel::CompiledSchema, at: &str, errs: &mut Vec<String>) {
            for e in c.compilation_errors() {
                errs.push(format!("{at}: {e:?}"));
            }
            for (k, v) in &c.properties {
                walk(v, &format!("{at}.{k}"), errs);
            }
            if let Some(i) = &c.items {
                walk(i, &format!("{at}[]"), errs);
            }
        }
        let mut errs = Vec::new();
        walk(&compile_schema(&schema(kind)), kind, &mut errs);
        assert!(errs.is_empty(), "{errs:#?}");
    }
}

fn example_docs() -> Vec<(String, Value)> {
    let dir = root().join("examples/k8s");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            out.push((f.display().to_string(), v));
        }
    }
    out
}

#[test]
fn examples_pass_the_schemas_and_parse_as_the_operator_reads_them() {
    let docs = example_docs();
    let kinds: Vec<&str> = docs
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "MailRelay").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "SendQuota").count(),
        2,
        "{kinds:?}"
    );
    let objs: Vec<Value> = docs.iter().map(|(_, d)| d.clone()).collect();
    for ((file, _), errs) in docs.iter().zip(errors(&objs)) {
        assert!(errs.is_empty(), "{file}: {errs:#?}");
    }
    for (file, d) in &docs {
        match d["kind"].as_str().unwrap() {
            "MailRelay" => {
                serde_json::from_value::<mailrelay_operator::crd::MailRelay>(d.clone())
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
            }
            "SenderDomain" => {
                let d: mailrelay_operator::crd::SenderDomain =
                    serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
                mailrelay_operator::reconcile::senderdomain::check_spec(&d.spec)
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
            }
            _ => {
                let q: mailrelay_operator::crd::SendQuota =
                    serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
                mailrelay_operator::resources::config::quota_config(&q)
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
            }
        }
    }
}

fn relay(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "MailRelay",
           "metadata": {"name": name, "namespace": "mail"}, "spec": spec})
}

fn quota(spec: Value) -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "SendQuota",
           "metadata": {"name": "q", "namespace": "mail"}, "spec": spec})
}

fn base() -> Value {
    json!({"hostname": "relay.example.com", "redis": {"url": "redis://redis:6379"}})
}

fn with(mut v: Value, patch: Value) -> Value {
    for (k, val) in patch.as_object().unwrap() {
        v[k] = val.clone();
    }
    v
}

#[test]
fn bad_specs_are_refused_naming_the_field() {
    let cases: Vec<(Value, &str)> = vec![
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"listeners": [{"name": "smtp", "port": 70000}]}),
                ),
            ),
            "port",
        ),
        (
            relay(
                "r",
                with(base(), json!({"listeners": [{"name": "SMTP", "port": 25}]})),
            ),
            "name",
        ),
        (
            relay("r", with(base(), json!({"relayNetworks": ["0.0.0.0/0"]}))),
            "open relay",
        ),
        (
            relay("r", with(base(), json!({"relayNetworks": ["::/8"]}))),
            "open relay",
        ),
        (
            relay("r", with(base(), json!({"relayNetworks": ["not-a-net"]}))),
            "network like",
        ),
        (
            relay("r", with(base(), json!({"auth": {"secretName": "u"}}))),
            "spec.auth needs spec.tls",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"senderBinding": {"users": [{"user": "a", "senders": ["<ceo@b.example>"]}]}}),
                ),
            ),
            "senderBinding/users/0/senders/0",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"senderBinding": {"users": [{"user": "a", "senders": []}]}}),
                ),
            ),
            "senderBinding/users/0/senders",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"senderBinding": {"networks": [{"network": "10.1.2.0", "senders": ["b.example"]}]}}),
                ),
            ),
            "network like",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"listeners": [{"name": "smtps", "port": 465, "tls": "implicit"}]}),
                ),
            ),
            "tls: implicit needs spec.tls",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"listeners": [{"name": "a", "port": 25}, {"name": "b", "port": 25}]}),
                ),
            ),
            "ports must be unique",
        ),
        (
            relay(
                "r",
                with(base(), json!({"listeners": [{"name": "a", "port": 9325}]})),
            ),
            "admin port",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"listeners": [{"name": "admin", "port": 25}]}),
                ),
            ),
            "reserved",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"delivery": {"tls": "required", "smarthost": {"host": "smtp.example.net"}}}),
                ),
            ),
            "with a smarthost, set delivery.smarthost.tls",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"delivery": {"smarthost": {"host": "s", "tls": "disabled", "credentialsSecret": {"name": "c"}}}}),
                ),
            ),
            "tls cannot be disabled",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"delivery": {"retry": {"first": "5 minutes"}}}),
                ),
            ),
            "first",
        ),
        (
            relay("r", with(base(), json!({"redis": {"url": "http://redis"}}))),
            "url",
        ),
        (
            relay("r", with(base(), json!({"redis": {"cluster": true}}))),
            "set exactly one of spec.redis.url (inline) and spec.redis.urlSecret",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"redis": {"url": "redis://r:6379", "urlSecret": {"name": "u", "key": "url"}}}),
                ),
            ),
            "set exactly one of spec.redis.url (inline) and spec.redis.urlSecret",
        ),
        (
            relay(
                "r",
                with(base(), json!({"redis": {"urlSecret": {"name": "u"}}})),
            ),
            "key",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"redis": {"url": "redis+sentinel://s1:26379,s2:26379/main", "cluster": true}}),
                ),
            ),
            "Sentinel-managed primary: it cannot be combined with cluster: true",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"redis": {"url": "rediss+sentinel://s1:26379/main", "clusterNodes": ["redis://n:6379"]}}),
                ),
            ),
            "Sentinel-managed primary",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"redis": {"url": "redis+sentinal://s1:26379/main"}}),
                ),
            ),
            "url",
        ),
        (relay("r", with(base(), json!({"replicaz": 2}))), "replicaz"),
        (
            relay("r", json!({"redis": {"url": "redis://r"}})),
            "hostname",
        ),
        (relay(&"r".repeat(58), base()), "at most 57"),
        (relay("9relay", base()), "starting with a letter"),
        (quota(json!({"direction": "ingress"})), "at least one limit"),
        (
            quota(json!({"direction": "ingress", "limits": ["100/1w"]})),
            "limits",
        ),
        (
            quota(json!({"direction": "ingress", "limits": ["0/1m"]})),
            "limits",
        ),
        (
            quota(json!({"direction": "sideways", "limits": ["1/1m"]})),
            "direction",
        ),
        (
            quota(json!({"direction": "egress", "limits": ["1/1m"], "action": "defer"})),
            "ingress quotas only",
        ),
        (
            quota(json!({"direction": "ingress", "limits": ["1/1m"], "maxConnections": 3})),
            "egress quotas only",
        ),
        (
            quota(
                json!({"direction": "ingress", "limits": ["1/1m"], "match": {"mxHosts": ["*.google.com"]}}),
            ),
            "match egress quotas only",
        ),
        (
            quota(
                json!({"direction": "egress", "limits": ["1/1m"], "match": {"senders": ["*@a.example"]}}),
            ),
            "match ingress quotas only",
        ),
        (
            quota(json!({"direction": "egress", "limits": ["1/1m"], "key": "authUser"})),
            "keys of ingress",
        ),
        (
            quota(json!({"direction": "ingress", "limits": ["1/1m"], "key": "mxSite"})),
            "keys of egress",
        ),
        (
            quota(
                json!({"direction": "ingress", "limits": ["1/1m"], "match": {"clientNetworks": ["10.1.0.0"]}}),
            ),
            "network like",
        ),
    ];
    let objs: Vec<Value> = cases.iter().map(|(o, _)| o.clone()).collect();
    for ((obj, expect), errs) in cases.iter().zip(errors(&objs)) {
        assert!(
            errs.iter().any(|e| e.contains(expect)),
            "{} was not refused with {expect:?}: {errs:#?}",
            obj["spec"]
        );
    }
}

#[test]
fn good_specs_pass_including_smarthost_and_egress_forms() {
    let objs = vec![
        relay("r", base()),
        relay(
            "r",
            with(
                base(),
                json!({"tls": {"secretName": "t"}, "auth": {"secretName": "u"},
                       "listeners": [{"name": "smtp", "port": 25}, {"name": "smtps", "port": 465, "tls": "implicit", "proxyProtocol": true}],
                       "relayNetworks": ["10.0.0.0/8", "fd00::/16", "192.168.1.7/32"],
                       "delivery": {"smarthost": {"host": "smtp.provider.example", "port": 587, "tls": "required",
                                                  "credentialsSecret": {"name": "provider"}},
                                    "retry": {"first": "1m", "max": "2h", "maxLifetime": "3d"}},
                       "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"},
                       "senderBinding": {"required": true, "checkFromHeader": true,
                                         "users": [{"user": "alice", "senders": ["a.example", "*.a.example", "app-?@b.example", "<>"]}],
                                         "networks": [{"network": "10.1.2.0/24", "senders": ["*@c.example"]}]}}),
            ),
        ),
        relay(
            "r",
            with(
                base(),
                json!({"redis": {"urlSecret": {"name": "redis-url", "key": "url"},
                                 "passwordSecret": {"name": "redis", "key": "password"}}}),
            ),
        ),
        // Whether a URL from a Secret is Sentinel is the operator's to check.
        relay(
            "r",
            with(
                base(),
                json!({"redis": {"urlSecret": {"name": "redis-url", "key": "url"}, "cluster": true}}),
            ),
        ),
        relay(
            "r",
            with(
                base(),
                json!({"redis": {"url": "redis+sentinel://s1:26379,s2:26379/main/2",
                                 "passwordSecret": {"name": "redis", "key": "password"}}}),
            ),
        ),
        relay(
            "r",
            with(
                base(),
                json!({"redis": {"url": "rediss+sentinel://s1:26379/main", "cluster": false, "waitReplicas": 1}}),
            ),
        ),
        relay(
            "r",
            with(
                base(),
                json!({"redis": {"url": "redis://r:6379", "cluster": true, "clusterNodes": ["redis://s:6379"]}}),
            ),
        ),
        quota(json!({"direction": "egress", "maxConnections": 5})),
        quota(
            json!({"direction": "egress", "limits": ["600/1m"], "match": {"smarthost": true}, "scope": "shared"}),
        ),
        quota(
            json!({"direction": "ingress", "limits": ["1/1s", "1000/h"], "match": {"clientNetworks": ["10.1.0.0/16"]},
                     "key": "clientIp", "action": "defer", "unit": "bytes"}),
        ),
    ];
    for (o, errs) in objs.iter().zip(errors(&objs)) {
        assert!(errs.is_empty(), "{}: {errs:#?}", o["spec"]);
    }
}

fn autoscaling(a: Value) -> Value {
    relay("r", with(base(), json!({"autoscaling": a})))
}

fn routes(r: Value) -> Value {
    relay("r", with(base(), json!({"delivery": {"routes": r}})))
}

#[test]
fn autoscaling_and_routes_are_checked_naming_the_field() {
    let good = [
        autoscaling(json!({"maxReplicas": 5, "targetCPUUtilization": 70})),
        autoscaling(json!({"minReplicas": 2, "maxReplicas": 2,
            "queue": {"pendingMessagesPerReplica": 500, "oldestMessageAgeSeconds": 600}})),
        autoscaling(json!({"minReplicas": 0, "maxReplicas": 4,
            "queue": {"pendingMessagesPerReplica": 100},
            "keda": {"prometheusServerAddress": "http://prometheus.monitoring.svc:9090", "cooldownPeriod": 600}})),
        routes(json!([
            {"domains": ["partner.example", ".partner.example"], "host": "10.0.0.5", "port": 2525,
             "tls": "required", "auth": {"username": "relay", "passwordSecret": {"name": "partner", "key": "password"}}},
            {"domains": ["Intranet.Example."], "host": "mx.intranet.example"}
        ])),
        relay(
            "r",
            with(
                base(),
                json!({"delivery": {"delayWarning": "4h", "connectTimeout": "10s"}}),
            ),
        ),
    ];
    for (o, errs) in good.iter().zip(errors(&good)) {
        assert!(errs.is_empty(), "{o}: {errs:#?}");
        serde_json::from_value::<mailrelay_operator::crd::MailRelay>(o.clone()).unwrap();
    }
    let bad: Vec<(Value, &str)> = vec![
        (
            autoscaling(json!({"minReplicas": 6, "maxReplicas": 5, "targetCPUUtilization": 70})),
            "autoscaling.minReplicas must not be greater than autoscaling.maxReplicas",
        ),
        (
            autoscaling(json!({"minReplicas": 0, "maxReplicas": 5, "targetCPUUtilization": 70})),
            "minReplicas: 0 (scale to zero) needs autoscaling.keda",
        ),
        (
            autoscaling(json!({"maxReplicas": 5})),
            "set autoscaling.targetCPUUtilization, autoscaling.queue or both",
        ),
        (
            autoscaling(json!({"maxReplicas": 5, "queue": {}})),
            "autoscaling.queue needs pendingMessagesPerReplica",
        ),
        (
            autoscaling(json!({"maxReplicas": 5, "targetCPUUtilization": 70,
                "keda": {"prometheusServerAddress": "http://p:9090"}})),
            "autoscaling.keda scales on the shared queue",
        ),
        (
            autoscaling(
                json!({"maxReplicas": 5, "queue": {"pendingMessagesPerReplica": 1},
                "keda": {"prometheusServerAddress": "prometheus:9090"}}),
            ),
            "prometheusServerAddress",
        ),
        (
            autoscaling(json!({"targetCPUUtilization": 70})),
            "maxReplicas",
        ),
        (
            autoscaling(json!({"maxReplicas": 5, "targetCpuUtilization": 70})),
            "targetCpuUtilization",
        ),
        (routes(json!([{"domains": [], "host": "h"}])), "domains"),
        (
            routes(json!([{"domains": ["a b"], "host": "h"}])),
            "domains/0",
        ),
        (
            routes(json!([{"domains": ["a.example"], "host": ""}])),
            "host",
        ),
        (
            routes(json!([{"domains": ["a.example"], "host": "h", "port": 0}])),
            "port",
        ),
        (
            routes(
                json!([{"domains": ["a.example"], "host": "h", "tls": "disabled",
                "auth": {"username": "u", "passwordSecret": {"name": "s", "key": "pw"}}}]),
            ),
            "tls cannot be disabled with auth",
        ),
        (
            routes(json!([{"domains": ["a.example"], "host": "h", "auth": {"username": "u"}}])),
            "passwordSecret",
        ),
        (
            relay(
                "r",
                with(base(), json!({"delivery": {"delayWarning": "four hours"}})),
            ),
            "delayWarning",
        ),
    ];
    let objs: Vec<Value> = bad.iter().map(|(o, _)| o.clone()).collect();
    for ((o, needle), errs) in bad.iter().zip(errors(&objs)) {
        assert!(
            errs.iter().any(|e| e.contains(needle)),
            "{o}: expected an error containing {needle:?}, got {errs:#?}"
        );
    }
}

#[test]
fn the_scale_subresource_points_at_replicas_and_the_selector() {
    let crd = all_crds()
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c.spec.names.kind == "MailRelay")
        .unwrap();
    let scale = crd.spec.versions[0]
        .subresources
        .as_ref()
        .and_then(|s| s.scale.as_ref())
        .expect("a scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    // The paths exist in the schema, as the API server requires.
    let s = schema("MailRelay");
    assert_eq!(
        s["properties"]["spec"]["properties"]["replicas"]["type"],
        "integer"
    );
    assert_eq!(
        s["properties"]["status"]["properties"]["replicas"]["type"],
        "integer"
    );
    assert_eq!(
        s["properties"]["status"]["properties"]["selector"]["type"],
        "string"
    );
}
/// The relay pod and Service settings (issue #12, items 8 and 9): good values pass,
/// bad ones are refused with the field or the rule named.
#[test]
fn pod_service_and_shutdown_settings_are_checked() {
    let good = with(
        base(),
        json!({
            "listeners": [{"name": "smtp", "port": 2525, "servicePort": 25},
                          {"name": "submission", "port": 2587, "servicePort": 587}],
            "imagePullSecrets": [{"name": "registry"}],
            "priorityClassName": "mail-critical",
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                 "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "r"}}}}]}},
            "podLabels": {"team": "mail"},
            "env": [{"name": "RUST_LOG", "value": "debug"},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
            "envFrom": [{"secretRef": {"name": "extra"}}],
            "volumes": [{"name": "scratch", "emptyDir": {}},
                        {"name": "certs", "projected": {"sources": [{"secret": {"name": "a"}}]}}],
            "volumeMounts": [{"name": "scratch", "mountPath": "/var/lib/scratch"},
                             {"name": "certs", "mountPath": "/etc/certs", "readOnly": true}],
            "delivery": {"smarthost": {"host": "smtp.corp.example", "tls": "required"},
                         "caBundle": {"configMap": {"name": "corp-ca", "key": "ca.pem"}}},
            "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                        "labels": {"exposure": "internal"},
                        "loadBalancerSourceRanges": ["203.0.113.0/24", "2001:db8::/32"]},
            "shutdown": {"settle": "10s", "grace": "30s"}
        }),
    );
    let secret_ca = with(
        base(),
        json!({"delivery": {"caBundle": {"secret": {"name": "ca", "key": "ca.crt"}}},
               "shutdown": {"settle": "500ms", "grace": "1h"}}),
    );
    let objs = vec![relay("r", good.clone()), relay("r", secret_ca)];
    for (o, errs) in objs.iter().zip(errors(&objs)) {
        assert!(errs.is_empty(), "{}: {errs:#?}", o["spec"]);
    }

    let patch = |p: Value| relay("r", with(good.clone(), p));
    let cases: Vec<(Value, &str)> = vec![
        (
            patch(
                json!({"listeners": [{"name": "a", "port": 2525, "servicePort": 25},
                                       {"name": "b", "port": 2587, "servicePort": 25}]}),
            ),
            "service ports",
        ),
        // A service port that collides with another listener's port left as is.
        (
            patch(
                json!({"listeners": [{"name": "a", "port": 2525, "servicePort": 25},
                                       {"name": "b", "port": 25}]}),
            ),
            "service ports",
        ),
        (
            patch(json!({"listeners": [{"name": "a", "port": 2525, "servicePort": 0}]})),
            "servicePort",
        ),
        (
            patch(json!({"priorityClassName": "Mail_Critical"})),
            "priorityClassName",
        ),
        (
            patch(json!({"podLabels": {"app.kubernetes.io/instance": "other"}})),
            "the operator's labels",
        ),
        (
            patch(json!({"env": [{"name": "MAILRELAY_REDIS_URL", "value": "redis://x"}]})),
            "MAILRELAY_",
        ),
        (
            patch(json!({"volumes": [{"name": "tls", "emptyDir": {}}], "volumeMounts": []})),
            "volume names",
        ),
        (
            patch(
                json!({"volumes": [{"name": "host", "hostPath": {"path": "/"}}], "volumeMounts": []}),
            ),
            "hostPath",
        ),
        (
            patch(json!({"volumes": [{"name": "v"}], "volumeMounts": []})),
            "exactly one source",
        ),
        (
            patch(
                json!({"volumes": [{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}],
                         "volumeMounts": []}),
            ),
            "exactly one source",
        ),
        (
            patch(json!({"volumeMounts": [{"name": "missing", "mountPath": "/data"}]})),
            "must name a volume of spec.volumes",
        ),
        (
            patch(json!({"volumeMounts": [{"name": "scratch", "mountPath": "/etc/mailrelay"}]})),
            "mountPath must not be",
        ),
        (
            patch(
                json!({"volumeMounts": [{"name": "scratch", "mountPath": "/var/run/mailrelay/tls"}]}),
            ),
            "mountPath must not be",
        ),
        (
            patch(json!({"delivery": {"caBundle": {}}})),
            "exactly one of caBundle.configMap and caBundle.secret",
        ),
        (
            patch(
                json!({"delivery": {"caBundle": {"secret": {"name": "a", "key": "k"}, "configMap": {"name": "b", "key": "k"}}}}),
            ),
            "exactly one of caBundle.configMap and caBundle.secret",
        ),
        (
            patch(json!({"delivery": {"caBundle": {"secret": {"name": "a"}}}})),
            "key",
        ),
        (
            patch(
                json!({"service": {"type": "ClusterIP", "loadBalancerSourceRanges": ["10.0.0.0/8"]}}),
            ),
            "loadBalancerSourceRanges needs type LoadBalancer",
        ),
        (
            patch(json!({"service": {"externalTrafficPolicy": "Local"}})),
            "externalTrafficPolicy needs type NodePort or LoadBalancer",
        ),
        (
            patch(
                json!({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["everyone"]}}),
            ),
            "loadBalancerSourceRanges",
        ),
        (
            patch(
                json!({"service": {"type": "LoadBalancer", "labels": {"app.kubernetes.io/name": "x"}}}),
            ),
            "the operator's labels",
        ),
        (patch(json!({"shutdown": {"settle": "10 s"}})), "settle"),
        (patch(json!({"shutdown": {"settle": "10"}})), "settle"),
        (
            patch(json!({"shutdown": {"settle": "6m"}})),
            "settle is at most 5m",
        ),
        (
            patch(json!({"shutdown": {"grace": "2h"}})),
            "grace is at most 1h",
        ),
        (patch(json!({"shutdown": {"grace": "1d"}})), "grace"),
    ];
    let objs: Vec<Value> = cases.iter().map(|(o, _)| o.clone()).collect();
    for ((obj, expect), errs) in cases.iter().zip(errors(&objs)) {
        assert!(
            errs.iter().any(|e| e.contains(expect)),
            "{} was not refused with {expect:?}: {errs:#?}",
            obj["spec"]
        );
    }
}

fn sender_domain(spec: Value) -> Value {
    json!({"apiVersion": "mailrelay.io/v1alpha1", "kind": "SenderDomain",
           "metadata": {"name": "example", "namespace": "mail"}, "spec": spec})
}

/// SenderDomain (issue 17): the domain a DNS name, selectors DNS labels and
/// unique, the algorithm one of two, RSA keys of 1024 bits or more.
#[test]
fn sender_domains_are_checked_naming_the_field() {
    let good = sender_domain(json!({"domain": "example.com", "keys": [
        {"selector": "s2026a", "rsaBits": 2048},
        {"selector": "s2026e", "algorithm": "ed25519-sha256"},
        {"selector": "own", "secretRef": {"name": "my-key"}}],
        "rotation": {"every": "90d", "overlap": "7d"}, "dnsCheck": {"interval": "30m"}}));
    let cases: Vec<(Value, &str)> = vec![
        (
            sender_domain(json!({"domain": "not a domain", "keys": [{"selector": "s1"}]})),
            "domain",
        ),
        (
            sender_domain(json!({"domain": "example.com.", "keys": [{"selector": "s1"}]})),
            "domain",
        ),
        (
            sender_domain(json!({"domain": "example.com", "keys": [{"selector": "s_1"}]})),
            "selector",
        ),
        (
            sender_domain(json!({"domain": "example.com", "keys": [{"selector": "a.b"}]})),
            "selector",
        ),
        (
            sender_domain(
                json!({"domain": "example.com", "keys": [{"selector": "s1", "algorithm": "dsa"}]}),
            ),
            "algorithm",
        ),
        (
            sender_domain(
                json!({"domain": "example.com", "keys": [{"selector": "s1", "rsaBits": 512}]}),
            ),
            "rsaBits",
        ),
        (
            sender_domain(json!({"domain": "example.com", "keys": [
                {"selector": "s1", "algorithm": "ed25519-sha256", "rsaBits": 2048}]})),
            "rsaBits applies to rsa-sha256 keys only",
        ),
        (
            sender_domain(json!({"domain": "example.com", "keys": [
                {"selector": "s1"}, {"selector": "s1", "algorithm": "ed25519-sha256"}]})),
            "selectors must be unique",
        ),
        (
            sender_domain(json!({"domain": "example.com", "keys": []})),
            "keys",
        ),
        (
            sender_domain(
                json!({"domain": "example.com", "keys": [{"selector": "s1"}],
                                 "rotation": {"every": "soon"}}),
            ),
            "every",
        ),
    ];
    let mut objs: Vec<Value> = cases.iter().map(|(o, _)| o.clone()).collect();
    objs.push(good.clone());
    let all = errors(&objs);
    assert!(all.last().unwrap().is_empty(), "{:#?}", all.last());
    for ((obj, expect), errs) in cases.iter().zip(&all) {
        assert!(
            errs.iter().any(|e| e.contains(expect)),
            "{} was not refused with {expect:?}: {errs:#?}",
            obj["spec"]
        );
    }
    // The operator's own check agrees (a CRD installed without its rules).
    for (obj, _) in &cases[..8] {
        let d: mailrelay_operator::crd::SenderDomain = match serde_json::from_value(obj.clone()) {
            Ok(d) => d,
            Err(_) => continue, // an unknown algorithm does not even parse
        };
        assert!(
            mailrelay_operator::reconcile::senderdomain::check_spec(&d.spec).is_err(),
            "{}",
            obj["spec"]
        );
    }
}

/// A response rule; `null` in `extra` drops the field.
fn rule(extra: Value) -> Value {
    let mut r = with(
        json!({"name": "slow", "match": {"codes": [421]}, "action": "suspend", "duration": "10m"}),
        extra,
    );
    r.as_object_mut().unwrap().retain(|_, v| !v.is_null());
    r
}

#[test]
fn response_rules_webhook_and_event_fields_are_checked_naming_the_field() {
    let egress = |rules: Value| {
        quota(json!({"direction": "egress", "limits": ["100/1m"],
                     "match": {"mxHosts": ["*.provider.test"]}, "responseRules": rules}))
    };
    let ingress = |rules: Value| {
        quota(json!({"direction": "ingress", "limits": ["100/1m"], "responseRules": rules}))
    };
    let dest = json!({"mxHosts": ["*.provider.test"]});
    let hook = json!({"name": "h", "url": "https://hooks.example/e",
                      "secretRef": {"name": "s", "key": "k"}, "tenants": {"all": true}});
    let hook_one = hook.clone();
    let bad: Vec<(Value, &str)> = vec![
        // An ingress quota has no destination to lend.
        (
            ingress(json!([rule(json!({}))])),
            "each response rule needs a destination",
        ),
        (
            egress(json!([rule(json!({"match": {}}))])),
            "give at least one of match.codes",
        ),
        (
            egress(json!([rule(json!({"duration": null}))])),
            "need a duration",
        ),
        (
            egress(json!([rule(json!({"duration": "soon"}))])),
            "responseRules/0/duration",
        ),
        (
            egress(json!([rule(json!({"action": "throttle"}))])),
            "action throttle needs throttle.factor",
        ),
        (
            egress(json!([rule(
                json!({"action": "throttle", "throttle": {"factor": 1.5}})
            )])),
            "responseRules/0/throttle/factor",
        ),
        (
            egress(json!([rule(json!({"throttle": {"factor": 0.5}}))])),
            "throttle applies to action throttle only",
        ),
        (
            egress(json!([rule(
                json!({"action": "throttle", "scope": "tenant", "throttle": {"maxConnections": 2}})
            )])),
            "throttle.maxConnections only with scope: site",
        ),
        (
            egress(json!([rule(
                json!({"action": "reclassify", "duration": null})
            )])),
            "reclassify (temporary or permanent) goes with action reclassify",
        ),
        (
            egress(json!([rule(json!({"tenantKey": "authUser"}))])),
            "tenantKey only with scope: tenant",
        ),
        (
            egress(json!([rule(
                json!({"action": "throttle", "throttle": {"maxConnections": 2},
                       "match": {"codes": [421], "senders": ["*@a.test"]}})
            )])),
            "throttle.maxConnections not with a sender filter",
        ),
        (
            egress(json!([rule(
                json!({"match": {"codes": [421], "authUsers": ["has space"]}})
            )])),
            "responseRules/0/match/authUsers/0",
        ),
        (
            egress(json!([rule(json!({"name": "has space"}))])),
            "responseRules/0/name",
        ),
        (
            egress(json!([rule(json!({"match": {"enhanced": ["4.7"]}}))])),
            "responseRules/0/match/enhanced/0",
        ),
        // Two rules of one name: the API server refuses them (list-type map);
        // the client-side validators here do not check list keys.
        (
            relay(
                "r",
                with(base(), json!({"responseRules": [rule(json!({}))]})),
            ),
            "give at least one of destination.mxHosts",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"webhooks": [with(hook.clone(), json!({"timeout": "0s"}))]}),
                ),
            ),
            "timeout must be greater than zero",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"webhooks": [with(hook.clone(), json!({"timeout": "2d"}))]}),
                ),
            ),
            "webhooks/0/timeout",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"webhooks": [with(hook.clone(), json!({"retry": {"maxAttempts": 0}}))]}),
                ),
            ),
            "webhooks/0/retry/maxAttempts",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"webhooks": [with(hook.clone(), json!({"retry": {"initial": "0ms"}}))]}),
                ),
            ),
            "initial must be greater than zero",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"webhooks": [with(hook.clone(), json!({"batch": {"maxEvents": 0}}))]}),
                ),
            ),
            "webhooks/0/batch/maxEvents",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"webhooks": [with(hook.clone(), json!({"batch": {"maxEvents": 1001}}))]}),
                ),
            ),
            "webhooks/0/batch/maxEvents",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"webhooks": [with(hook.clone(), json!({"batch": {"linger": "11s"}}))]}),
                ),
            ),
            "linger is at most 10s",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"webhooks": [with(hook.clone(), json!({"batch": {"linger": "50"}}))]}),
                ),
            ),
            "webhooks/0/batch/linger",
        ),
        (
            relay("r", with(base(), json!({"events": {"maxLen": 0}}))),
            "events/maxLen",
        ),
        (
            relay(
                "r",
                with(
                    base(),
                    json!({"events": {"enabled": false}, "webhooks": [hook.clone()]}),
                ),
            ),
            "spec.events.enabled is false, but spec.webhooks read the event log",
        ),
    ];
    let objs: Vec<Value> = bad.iter().map(|(o, _)| o.clone()).collect();
    for ((obj, expect), errs) in bad.iter().zip(errors(&objs)) {
        assert!(
            errs.iter().any(|e| e.contains(expect)),
            "{} was not refused with {expect:?}: {errs:#?}",
            obj["spec"]
        );
    }
    // The relay's name for a quota's rule is `<quota>.<rule>`: it must fit 63.
    let mut long = egress(json!([rule(json!({"name": "r".repeat(62)}))]));
    long["metadata"]["name"] = json!("quota");
    assert!(
        cel_errors("SendQuota", &long)
            .iter()
            .any(|e| e.contains("<SendQuota name>.<rule name>")),
        "{long}"
    );

    let good = vec![
        egress(json!([
            rule(json!({})),
            rule(
                json!({"name": "tenant", "scope": "tenant", "tenantKey": "dkimDomain",
                                  "match": {"codes": [421, "4xx"], "enhanced": ["4.7.28", "4.7.*"], "text": "(?i)rate"}})
            ),
            rule(
                json!({"name": "thr", "action": "throttle", "throttle": {"factor": 0.5, "rate": "10/1m"}})
            ),
            rule(
                json!({"name": "daily", "action": "reclassify", "reclassify": "temporary", "duration": null,
                                  "match": {"codes": [550], "text": "daily limit"}})
            )
        ])),
        ingress(json!([rule(
            json!({"destination": dest.clone(), "scope": "tenant"})
        )])),
        relay(
            "r",
            with(
                base(),
                json!({"responseRules": [rule(json!({"destination": dest}))],
                                         "events": {"enabled": true, "maxLen": 50000},
                                         "webhooks": [with(hook, json!({"timeout": "5s",
                                             "retry": {"initial": "500ms", "max": "10m", "maxAttempts": 20},
                                             "batch": {"maxEvents": 1000, "linger": "10s"}}))]}),
            ),
        ),
        relay("r", with(base(), json!({"events": {"enabled": false}}))),
        relay(
            "r",
            with(
                base(),
                json!({"webhooks": [with(hook_one, json!({"batch": {"maxEvents": 1, "linger": "0s"}}))]}),
            ),
        ),
    ];
    for (o, errs) in good.iter().zip(errors(&good)) {
        assert!(errs.is_empty(), "{}: {errs:#?}", o["spec"]);
    }
}
