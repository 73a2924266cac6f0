#!/usr/bin/env python3
"""Pod Security Standards, profile "restricted" (which includes "baseline"),
checked on Kubernetes objects as plain dicts: a Pod, or any workload with a pod
template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob).

The one checker of the project: the chart test imports it for every rendered
pod template, and the operator's builders test runs it (as a command) on the
relay Deployment the operator builds. The controls follow the Kubernetes
documentation's "Pod Security Standards" page (the latest policy version), the
same list the PodSecurity admission controller enforces:

baseline: HostProcess, host namespaces, privileged, capabilities (add only the
baseline set), hostPath volumes, host ports, AppArmor, SELinux, /proc mount,
seccomp (not Unconfined), sysctls (only the safe set).
restricted: volume types, privilege escalation, running as non-root, non-root
user id, seccomp (RuntimeDefault or Localhost, set), capabilities (drop ALL, add
only NET_BIND_SERVICE).

    python3 charts/tests/pod_security.py FILE...     # JSON or YAML (multi-document)

prints each violation and exits 1 if there is any (2 for a file without pods).
"""

import json
import sys

SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUME_SOURCES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
SECCOMP_OK = ("RuntimeDefault", "Localhost")


def pod_templates(obj):
    """(where, pod metadata, pod spec) of each pod `obj` describes."""
    kind = obj.get("kind")
    name = (obj.get("metadata") or {}).get("name")
    where = f"{kind} {name}"
    if kind == "Pod":
        return [(where, obj.get("metadata") or {}, obj.get("spec") or {})]
    spec = obj.get("spec") or {}
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    tpl = spec.get("template")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob",
                "ReplicationController") and tpl is not None:
        return [(where, tpl.get("metadata") or {}, tpl.get("spec") or {})]
    return []


def _containers(spec):
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(field) or []):
            yield f"spec.{field}[{i}] ({c.get('name')})", c


def pod_violations(meta, spec):
    """Every restricted-profile violation of one pod (spec and metadata)."""
    out = []
    psc = spec.get("securityContext") or {}
    containers = list(_containers(spec))

    def sc(c):
        return c.get("securityContext") or {}

    # --- baseline ---
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("spec.securityContext.windowsOptions.hostProcess must be unset or false")
    for where, c in containers:
        if (sc(c).get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: windowsOptions.hostProcess must be unset or false")
    for ns in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(ns):
            out.append(f"spec.{ns} must be unset or false")
    for where, c in containers:
        if sc(c).get("privileged"):
            out.append(f"{where}: privileged must be unset or false")
    for i, v in enumerate(spec.get("volumes") or []):
        if "hostPath" in v:
            out.append(f"spec.volumes[{i}] ({v.get('name')}): hostPath volumes are not allowed")
    for where, c in containers:
        for p in c.get("ports") or []:
            if p.get("hostPort") not in (None, 0):
                out.append(f"{where}: hostPort {p['hostPort']} is not allowed")
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            out.append(f"annotation {key}: {value!r} (only runtime/default or localhost/*)")
    for where, s in [("spec.securityContext", psc)] + [(w, sc(c)) for w, c in containers]:
        ap = (s.get("appArmorProfile") or {}).get("type")
        if ap not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{where}: appArmorProfile.type {ap!r} (only RuntimeDefault or Localhost)")
        se = s.get("seLinuxOptions") or {}
        if se.get("type") not in (None, *SELINUX_TYPES):
            out.append(f"{where}: seLinuxOptions.type {se['type']!r} is not allowed")
        for f in ("user", "role"):
            if se.get(f) not in (None, ""):
                out.append(f"{where}: seLinuxOptions.{f} must be unset")
        seccomp = (s.get("seccompProfile") or {}).get("type")
        if seccomp is not None and seccomp not in SECCOMP_OK:
            out.append(f"{where}: seccompProfile.type {seccomp!r} (only RuntimeDefault or Localhost)")
    for where, c in containers:
        if sc(c).get("procMount") not in (None, "Default"):
            out.append(f"{where}: procMount must be unset or Default")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            out.append(f"spec.securityContext.sysctls: {s.get('name')!r} is not a safe sysctl")

    # --- restricted ---
    for i, v in enumerate(spec.get("volumes") or []):
        sources = [k for k in v if k != "name"]
        if not sources or any(k not in RESTRICTED_VOLUME_SOURCES for k in sources):
            out.append(f"spec.volumes[{i}] ({v.get('name')}): volume type {sources} is not allowed")
    for where, c in containers:
        if sc(c).get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
    pod_non_root = psc.get("runAsNonRoot")
    if pod_non_root is False:
        out.append("spec.securityContext.runAsNonRoot must not be false")
    for where, c in containers:
        mine = sc(c).get("runAsNonRoot")
        if mine is False or (mine is None and pod_non_root is not True):
            out.append(f"{where}: runAsNonRoot must be true (here or on the pod)")
    for where, s in [("spec.securityContext", psc)] + [(w, sc(c)) for w, c in containers]:
        if s.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser must not be 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    for where, c in containers:
        mine = (sc(c).get("seccompProfile") or {}).get("type")
        if mine is None and pod_seccomp is None:
            out.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (here or on the pod)")
    for where, c in containers:
        caps = sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities.drop must include ALL")
        for cap in caps.get("add") or []:
            # Stricter than baseline's list of addable capabilities, so it covers it.
            if cap != "NET_BIND_SERVICE":
                out.append(f"{where}: capability {cap} may not be added (only NET_BIND_SERVICE)")
    return out


def violations(obj):
    """Every violation of every pod `obj` describes, each prefixed by where."""
    return [
        f"{where}: {v}"
        for where, meta, spec in pod_templates(obj)
        for v in pod_violations(meta, spec)
    ]


def has_pods(obj):
    return bool(pod_templates(obj))


def _load(path):
    text = open(path).read()
    try:
        doc = json.loads(text)
        docs = doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        import yaml

        docs = [d for d in yaml.safe_load_all(text) if d]
    return docs


def main(paths):
    found, bad = 0, []
    for path in paths:
        for obj in _load(path):
            if has_pods(obj):
                found += 1
                bad += [f"{path}: {v}" for v in violations(obj)]
    for b in bad:
        print(b)
    if not found:
        print("no pods or pod templates found", file=sys.stderr)
        return 2
    print(f"{found} pod template(s) checked against Pod Security restricted, {len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
