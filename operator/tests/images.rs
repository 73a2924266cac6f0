//! Image names and tags agree everywhere: the Dockerfile's targets, the Helm
//! chart's defaults, and the operator's default relay image; and the Dockerfile's
//! cargo build succeeds.
//!
//! No container engine runs on these machines, so the Dockerfile is checked as
//! text, and its build command is run here: the same command with the same package
//! set and `--locked`, in the debug profile (a release build costs minutes of CI
//! time and compiles the same code; `--release` is checked to be in the Dockerfile).

use std::path::{Path, PathBuf};
use std::process::Command;

use mailrelay_operator::images::{
    OPERATOR_IMAGE, OPERATOR_REPOSITORY, RELAY_IMAGE, RELAY_REPOSITORY,
};
use serde_json::Value;

/// The build command of the Dockerfile's builder stage.
const DOCKER_BUILD: &str = "cargo build --release --locked -p mailrelay -p mailrelay-operator";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Joins the Dockerfile's continuation lines (`\` at the end) into logical lines.
fn dockerfile_lines() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if cur.is_empty() && (t.starts_with('#') || t.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head.trim());
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

/// Instructions of each stage, by stage name.
fn stages() -> Vec<(String, String, Vec<String>)> {
    let mut out: Vec<(String, String, Vec<String>)> = Vec::new();
    for l in dockerfile_lines() {
        if let Some(rest) = l.strip_prefix("FROM ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(parts.len(), 3, "FROM without AS: {l}");
            assert_eq!(parts[1], "AS", "{l}");
            out.push((parts[2].to_owned(), parts[0].to_owned(), Vec::new()));
        } else if let Some(s) = out.last_mut() {
            s.2.push(l);
        }
    }
    out
}

#[test]
fn image_constants_are_repository_and_workspace_version() {
    assert_eq!(RELAY_REPOSITORY, "ghcr.io/mailrelay/mailrelay");
    assert_eq!(OPERATOR_REPOSITORY, "ghcr.io/mailrelay/mailrelay-operator");
    assert_eq!(
        RELAY_IMAGE,
        format!("ghcr.io/mailrelay/mailrelay:{VERSION}")
    );
    assert_eq!(
        OPERATOR_IMAGE,
        format!("ghcr.io/mailrelay/mailrelay-operator:{VERSION}")
    );
    // Any other spelling of the default images in the operator's source (the
    // reconciler's default relay image) must use the same version.
    let mut found = 0;
    let mut stack = vec![repo().join("operator/src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for repo_name in [RELAY_REPOSITORY, OPERATOR_REPOSITORY] {
                let needle = format!("{repo_name}:");
                for (at, _) in text.match_indices(&needle) {
                    found += 1;
                    let rest = &text[at + needle.len()..];
                    let squeezed: String = rest
                        .chars()
                        .take(80)
                        .filter(|c| !c.is_whitespace())
                        .collect();
                    let literal = rest.strip_prefix(VERSION).is_some_and(|after| {
                        !after.starts_with(|c: char| {
                            c.is_ascii_alphanumeric() || c == '.' || c == '-'
                        })
                    });
                    let ok = literal || squeezed.starts_with("\",env!(\"CARGO_PKG_VERSION\")");
                    assert!(
                        ok,
                        "{}: {needle} is followed by {:?}, not the workspace version",
                        p.display(),
                        &rest[..rest.len().min(40)]
                    );
                }
            }
        }
    }
    assert!(
        found >= 2,
        "the image constants were not found in operator/src"
    );
}

#[test]
fn chart_defaults_match_the_images_and_version() {
    let chart = yaml("charts/mailrelay-operator/Chart.yaml");
    assert_eq!(chart["version"], VERSION, "Chart.yaml version");
    assert_eq!(chart["appVersion"], VERSION, "Chart.yaml appVersion");
    let values = yaml("charts/mailrelay-operator/values.yaml");
    // An empty tag means the appVersion (see templates/_helpers.tpl).
    assert_eq!(values["image"]["repository"], OPERATOR_REPOSITORY);
    assert_eq!(values["image"]["tag"], "");
    assert_eq!(values["image"]["digest"], "");
    assert_eq!(values["relayImage"]["repository"], RELAY_REPOSITORY);
    assert_eq!(values["relayImage"]["tag"], "");
    let helpers = read("charts/mailrelay-operator/templates/_helpers.tpl");
    for needle in [
        r#"printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag)"#,
        r#"printf "%s:%s" .Values.relayImage.repository (default .Chart.AppVersion .Values.relayImage.tag)"#,
    ] {
        assert!(helpers.contains(needle), "_helpers.tpl lacks {needle}");
    }
    let deployment = read("charts/mailrelay-operator/templates/deployment.yaml");
    assert!(
        deployment.contains(r#"--relay-image={{ include "mailrelay-operator.relayImage" . }}"#)
    );
}

#[test]
fn dockerfile_targets_match_the_images() {
    let text = read("Dockerfile");
    let lines = dockerfile_lines();
    assert!(
        lines.contains(&format!("ARG VERSION={VERSION}")),
        "Dockerfile: ARG VERSION={VERSION} (the workspace version)"
    );
    let rust_version = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version in Cargo.toml");
    assert!(
        lines.contains(&format!("ARG RUST_VERSION={rust_version}")),
        "Dockerfile: ARG RUST_VERSION={rust_version} (the workspace rust-version)"
    );
    // The documented build commands name the images the chart and operator use.
    for (target, image) in [
        ("mailrelay", RELAY_IMAGE),
        ("mailrelay-operator", OPERATOR_IMAGE),
    ] {
        let cmd = format!("docker build --target {target} -t {image} .");
        assert!(text.contains(&cmd), "Dockerfile does not document `{cmd}`");
    }

    let stages = stages();
    let names: Vec<&str> = stages.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["builder", "mailrelay", "mailrelay-operator"]);
    let builder = &stages[0];
    assert!(
        builder
            .1
            .starts_with("docker.io/library/rust:${RUST_VERSION}"),
        "{}",
        builder.1
    );
    let run = builder
        .2
        .iter()
        .find(|l| l.starts_with("RUN "))
        .expect("builder RUN");
    assert!(
        run.starts_with(&format!("RUN {DOCKER_BUILD} &&")),
        "the builder must run exactly `{DOCKER_BUILD}`: {run}"
    );
    for (stage, bins) in [
        (&stages[1], &["mailrelay"][..]),
        (&stages[2], &["mailrelay-operator", "kubectl-mailrelay"]),
    ] {
        let (name, base, instr) = stage;
        assert_eq!(
            base, "gcr.io/distroless/cc-debian12:nonroot",
            "{name}: minimal runtime"
        );
        assert!(
            instr.contains(&"USER 65532:65532".to_owned()),
            "{name}: runs as non-root 65532"
        );
        for bin in bins {
            assert!(
                instr.contains(&format!(
                    "COPY --from=builder /out/{bin} /usr/local/bin/{bin}"
                )),
                "{name}: copies {bin}"
            );
        }
        assert!(
            instr.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{}\"]", bins[0])),
            "{name}: entrypoint"
        );
        assert!(
            instr.iter().any(
                |l| l.contains("org.opencontainers.image.version=\"${VERSION}\"")
                    && l.contains(&format!("org.opencontainers.image.title=\"{name}\""))
            ),
            "{name}: OCI labels"
        );
        assert!(run.contains(&format!("target/release/{}", bins[0])));
    }
}

/// The Dockerfile's build, in the debug profile (see the module comment).
#[test]
fn the_dockerfile_build_command_succeeds() {
    let debug = DOCKER_BUILD.replace(" --release", "");
    let mut args = debug.split_whitespace();
    assert_eq!(args.next(), Some("cargo"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "`{debug}` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
