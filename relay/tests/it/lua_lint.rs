//! The Redis scripts pass luacheck (Debian's `lua-check`, config in the repository's
//! `.luacheckrc`): each script is linted as Redis runs it, its `.lua` files put
//! together, and every `.lua` file under `src/` is part of one (loaded with
//! `include_str!`, none orphaned).

use std::path::{Path, PathBuf};
use std::process::Command;

fn scripts() -> Vec<(&'static str, String)> {
    let mut all = mailrelay::queue::redis::lua_scripts();
    all.extend(mailrelay::quota::ingress::redis::lua_scripts());
    all.extend(mailrelay::quota::egress::redis::lua_scripts());
    all.extend(mailrelay::events::suppression::lua_scripts());
    all.extend(mailrelay::events::webhook::lua_scripts());
    all.extend(mailrelay::delivery::tls_policy::cache::lua_scripts());
    all.extend(mailrelay::delivery::tls_report::store::lua_scripts());
    all
}

fn lua_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            lua_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "lua") {
            out.push(p);
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_script_passes_luacheck() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let config = root.join(".luacheckrc");
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, text) in scripts() {
        let p = dir.path().join(format!("{name}.lua"));
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("luacheck")
        .arg("--config")
        .arg(&config)
        .arg("--no-color")
        .arg("--codes")
        .args(&paths)
        .output()
        .expect("luacheck runs (apt-get install lua-check; see .ci/install-deps)");
    assert!(
        out.status.success(),
        "luacheck found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!("0 warnings / 0 errors in {} files", paths.len())),
        "{report}"
    );
}

#[test]
fn every_lua_file_is_loaded_and_linted() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut lua = Vec::new();
    lua_files(&src, &mut lua);
    assert!(lua.len() > 20, "{lua:?}");
    let mut rs = Vec::new();
    rust_files(&src, &mut rs);
    let rust: Vec<(PathBuf, String)> = rs
        .into_iter()
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    let linted: Vec<String> = scripts().into_iter().map(|(_, t)| t).collect();
    for file in &lua {
        let text = std::fs::read_to_string(file).unwrap();
        let dir = file.parent().unwrap().parent().unwrap();
        let rel = file.strip_prefix(dir).unwrap().to_str().unwrap().to_owned();
        let included = rust.iter().any(|(p, t)| {
            p.parent() == Some(dir) && t.contains(&format!("include_str!(\"{rel}\")"))
        });
        assert!(
            included,
            "{} is not loaded by an include_str! beside it",
            file.display()
        );
        assert!(
            linted.iter().any(|s| s.contains(text.as_str())),
            "{} is in no script the lint sees",
            file.display()
        );
    }
}
