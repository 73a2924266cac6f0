//! Provider presets (relay/src/shaping/presets/*.yaml, issue 18) checked without the
//! shaping engine: the Python checker (shape, sources, sample replies; see its
//! docstring) and its self-test, then the parts only Rust can judge — the YAML as
//! serde_norway reads it, every `text` regex compiled by the `regex` crate the
//! engine uses, durations and limits through the relay's own parsers, and the
//! MX-host globs through the relay's glob matcher against host names from the
//! sources.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use mailrelay::config::glob::Glob;
use mailrelay::config::parse_duration;
use mailrelay::config::quota::Limit;
use serde_norway::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn presets() -> Vec<(String, Value)> {
    let dir = repo().join("relay/src/shaping/presets");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value = serde_norway::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: serde_norway: {e}", p.display()));
            (p.file_stem().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn checker(args: &[&str]) {
    let script = repo().join("relay/tests/presets_check.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("python3 with PyYAML (.ci/install-deps)");
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn checker_passes_on_the_shipped_presets() {
    checker(&[]);
}

#[test]
fn checker_reports_broken_presets() {
    checker(&["--self-test"]);
}

#[test]
fn the_issue_names_a_preset_for_every_provider() {
    let names: BTreeSet<String> = presets().into_iter().map(|(n, _)| n).collect();
    for want in [
        "gmail",
        "yahoo",
        "microsoft",
        "icloud",
        "gmx",
        "comcast",
        "orange",
        "mailru",
        "yandex",
        "qq",
        "netease",
        "ses",
    ] {
        assert!(names.contains(want), "no preset {want}.yaml: {names:?}");
    }
}

#[test]
fn regexes_durations_and_limits_parse_as_the_relay_parses_them() {
    let mut regexes = 0;
    for (name, doc) in presets() {
        assert_eq!(doc["name"].as_str(), Some(name.as_str()), "{name}: name");
        for lim in doc["pacing"]["limits"].as_sequence().into_iter().flatten() {
            Limit::parse(lim.as_str().expect("limit string"))
                .unwrap_or_else(|e| panic!("{name}: pacing.limits: {e}"));
        }
        for rule in doc["rules"].as_sequence().expect("rules list") {
            let rname = rule["name"].as_str().expect("rule name");
            if let Some(text) = rule["match"]["text"].as_str() {
                regex::RegexBuilder::new(text)
                    .size_limit(1 << 20)
                    .build()
                    .unwrap_or_else(|e| panic!("{rname}: match.text: {e}"));
                regexes += 1;
            }
            if let Some(d) = rule["duration"].as_str() {
                let d = parse_duration(d).unwrap_or_else(|e| panic!("{rname}: duration: {e}"));
                assert!(
                    d.as_secs() >= 1 && d.as_secs() <= 7 * 86_400,
                    "{rname}: duration {d:?} outside 1s..7d"
                );
            }
            if let Some(rate) = rule["throttle"]["rate"].as_str() {
                Limit::parse(rate).unwrap_or_else(|e| panic!("{rname}: throttle.rate: {e}"));
            }
        }
    }
    assert!(regexes >= 30, "only {regexes} regexes: presets not read?");
}

#[test]
fn mx_globs_select_the_hosts_named_in_the_sources() {
    let docs = presets();
    let globs = |preset: &str| -> Vec<Glob> {
        let (_, doc) = docs.iter().find(|(n, _)| n == preset).unwrap();
        doc["destination"]["mx_hosts"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{preset}: no mx_hosts"))
            .iter()
            .map(|g| Glob::new(g.as_str().unwrap()))
            .collect()
    };
    let selects = |preset: &str, host: &str| globs(preset).iter().any(|g| g.is_match(host));
    // Host names as they appear in the transcripts each preset cites.
    for host in [
        "aspmx.l.google.com",
        "alt1.aspmx.l.google.com",
        "gmail-smtp-in.l.google.com",
    ] {
        assert!(selects("gmail", host), "gmail: {host}");
    }
    for host in [
        "hotmail-com.olc.protection.outlook.com",
        "eur.olc.protection.outlook.com",
        "example-com.mail.protection.outlook.com",
    ] {
        assert!(selects("microsoft", host), "microsoft: {host}");
    }
    assert!(selects("yahoo", "mta5.am0.yahoodns.net"));
    for host in ["mx01.mail.icloud.com", "mx02.mail.icloud.com"] {
        assert!(selects("icloud", host), "icloud: {host}");
    }
    for host in [
        "email-smtp.us-east-1.amazonaws.com",
        "email-smtp.eu-central-1.amazonaws.com",
    ] {
        assert!(selects("ses", host), "ses: {host}");
    }
    // The SES glob must not catch the SES API endpoint or other AWS hosts.
    assert!(!selects("ses", "email.us-east-1.amazonaws.com"));
    assert!(!selects("ses", "inbound-smtp.us-east-1.amazonaws.com"));
    assert!(!selects("gmail", "google.com.example.net"));
}
