//! User docs that are generated or promised: the CRD reference follows crds/,
//! and the README's Kubernetes section covers the whole path.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn crd_reference_is_generated_from_the_current_crds() {
    let out = Command::new("python3")
        .arg(repo().join("docs/gen_crd_reference.py"))
        .arg("--check")
        .output()
        .expect("python3 with pyyaml (from .ci/install-deps)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = std::fs::read_to_string(repo().join("docs/crd-reference.md")).unwrap();
    for needle in [
        "## MailRelay",
        "## SendQuota",
        "`spec.hostname`",
        "`spec.redis.waitReplicas`",
        "`spec.limits`",
    ] {
        assert!(doc.contains(needle), "docs/crd-reference.md lacks {needle}");
    }
}

#[test]
fn readme_and_docs_cover_install_to_uninstall() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for needle in [
        "helm install mailrelay charts/mailrelay-operator",
        "kind: SendQuota",
        "swaks --server",
        "kubectl get mailrelays",
        "kubectl mailrelay -n mail queue outbound",
        "helm upgrade",
        "helm uninstall",
    ] {
        assert!(readme.contains(needle), "README lacks {needle:?}");
    }
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    for needle in [
        "appendfsync everysec",
        "appendfsync always",
        "WAIT",
        "## Scaling out",
        "## DNS",
        "cert-manager",
        "PROXY protocol",
        "## CRDs: install, upgrade, uninstall",
        "helm.sh/resource-policy: keep",
        "redis.auth.existingSecret",
        "maxmemory",
        "## Operator RBAC: exactly what it uses",
        "## Namespaced mode and several installs",
        "mailrelay-operator-claim",
        "mailrelay_operator_namespace_refused",
    ] {
        assert!(ops.contains(needle), "docs/operations.md lacks {needle:?}");
    }
    let versioning = std::fs::read_to_string(repo().join("docs/api-versioning.md")).unwrap();
    for needle in [
        "v1beta1",
        "storage version",
        "conversion webhook",
        "deprecat",
    ] {
        assert!(
            versioning.to_lowercase().contains(&needle.to_lowercase()),
            "docs/api-versioning.md lacks {needle:?}"
        );
    }
    let arch = std::fs::read_to_string(repo().join("docs/architecture.md")).unwrap();
    assert!(arch.contains("## Data flow") && arch.contains("```"));
}

#[test]
fn the_security_model_page_covers_each_protection_and_is_linked() {
    let page = std::fs::read_to_string(repo().join("docs/security.md")).unwrap();
    for needle in [
        "# Security model",
        "## Admin API",
        "NAME-admin-token",
        "## Network exposure",
        "NetworkPolicies",
        "LoadBalancer",
        "## Objects the operator does not own",
        "`Conflict`",
        "## Operator privileges",
        "watchNamespaces",
        "## Tenants bound to their senders",
        "spec.senderBinding",
        "AUTH only over TLS",
        "Smuggling and NUL refused",
        "Bounded sizes and times",
        "Per-network connection caps",
        "AUTH throttling",
        "## Secrets",
        "Pod Security Standards `restricted`",
        "## Admin audit log",
    ] {
        assert!(page.contains(needle), "docs/security.md lacks {needle:?}");
    }
    // The tests it cites exist under those names.
    let tests = |file: &str| std::fs::read_to_string(repo().join(file)).unwrap();
    for (file, name) in [
        (
            "operator/tests/it/reconcile.rs",
            "an_object_someone_else_owns_is_left_untouched_and_reported",
        ),
        (
            "operator/tests/it/builders.rs",
            "the_pod_security_check_fails_a_relay_pod_made_unsafe",
        ),
        (
            "operator/tests/it/builders.rs",
            "bad_sender_bindings_are_refused_naming_the_field",
        ),
    ] {
        assert!(page.contains(name), "docs/security.md does not cite {name}");
        assert!(
            tests(file).contains(&format!("fn {name}(")),
            "{file} has no {name}"
        );
    }
    for (doc, link) in [
        ("README.md", "docs/security.md"),
        ("docs/operations.md", "(security.md)"),
    ] {
        assert!(
            std::fs::read_to_string(repo().join(doc))
                .unwrap()
                .contains(link),
            "{doc} does not link the security model"
        );
    }
}
