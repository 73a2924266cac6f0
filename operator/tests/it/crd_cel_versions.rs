//! Every CEL function the CRDs' `x-kubernetes-validations` rules call is accepted by
//! the oldest Kubernetes the chart claims (`kubeVersion` in Chart.yaml).
//!
//! An API server compiles a *new or changed* CRD rule with the CEL environment of its
//! compatibility version, which is one minor below its own (n-1, for rollback safety):
//! a library introduced in 1.N is therefore refused in CRDs written to a 1.N server
//! and accepted from 1.(N+1) on. The IP/CIDR library (introduced in 1.30) is the case
//! that broke the chart's former `>=1.29` claim.
//!
//! Source of the "introduced" versions: the `IntroducedVersion` of each library in
//! kubernetes/kubernetes `staging/src/k8s.io/apiserver/pkg/cel/environment/base.go`
//! (its `baseOptsWithoutStrictCost` table), and the function names of each library in
//! `staging/src/k8s.io/apiserver/pkg/cel/library/*.go` and cel-go's `ext` package.
//! The n-1 rule: `DefaultCompatibilityVersion()` in the same file.
//!
//! A function not in the table fails the test: add it with its source before using it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (function, minor version of Kubernetes that introduced it in the CEL base
/// environment). Core CEL and the macros count as 1.0 (there since CRD rules exist).
/// Namespaced functions are written with their namespace (`sets.contains`).
const INTRODUCED: &[(&str, u32)] = &[
    // Core CEL (cel-spec standard definitions) and macros.
    ("size", 0),
    ("has", 0),
    ("matches", 0),
    ("startsWith", 0),
    ("endsWith", 0),
    ("contains", 0),
    ("exists", 0),
    ("exists_one", 0),
    ("all", 0),
    ("map", 0),
    ("filter", 0),
    ("int", 0),
    ("uint", 0),
    ("double", 0),
    ("string", 0),
    ("bytes", 0),
    ("bool", 0),
    ("duration", 0),
    ("timestamp", 0),
    ("type", 0),
    ("dyn", 0),
    // library.URLs, library.Regex, library.Lists: 1.0 (CEL's epoch in Kubernetes).
    ("url", 0),
    ("isURL", 0),
    ("getScheme", 0),
    ("getHost", 0),
    ("getHostname", 0),
    ("getPort", 0),
    ("getEscapedPath", 0),
    ("getQuery", 0),
    ("find", 0),
    ("findAll", 0),
    ("isSorted", 0),
    ("sum", 0),
    ("min", 0),
    ("max", 0),
    ("indexOf", 0),
    ("lastIndexOf", 0),
    // ext.Strings version 0: 1.0.
    ("charAt", 0),
    ("lowerAscii", 0),
    ("upperAscii", 0),
    ("replace", 0),
    ("split", 0),
    ("substring", 0),
    ("trim", 0),
    // 1.28: library.Quantity and optional types.
    ("quantity", 28),
    ("isQuantity", 28),
    ("isGreaterThan", 28),
    ("isLessThan", 28),
    ("compareTo", 28),
    ("asApproximateFloat", 28),
    ("asInteger", 28),
    ("isInteger", 28),
    ("sign", 28),
    ("add", 28),
    ("sub", 28),
    ("optional.of", 28),
    ("optional.ofNonZeroValue", 28),
    ("optional.none", 28),
    ("hasValue", 28),
    ("value", 28),
    ("orValue", 28),
    // 1.29: ext.Strings version 2 (format, quote, join), ext.Sets.
    ("quote", 29),
    ("join", 29),
    ("format", 29),
    ("sets.contains", 29),
    ("sets.equivalent", 29),
    ("sets.intersects", 29),
    // 1.30: library.IP, library.CIDR.
    ("ip", 30),
    ("isIP", 30),
    ("isCanonical", 30),
    ("family", 30),
    ("isUnspecified", 30),
    ("isLoopback", 30),
    ("isLinkLocalMulticast", 30),
    ("isLinkLocalUnicast", 30),
    ("isGlobalUnicast", 30),
    ("cidr", 30),
    ("isCIDR", 30),
    ("containsIP", 30),
    ("containsCIDR", 30),
    ("prefixLength", 30),
    ("masked", 30),
    // 1.31: library.Format.
    ("format.named", 31),
    ("format.dns1123Label", 31),
    ("format.dns1123Subdomain", 31),
    ("format.qualifiedName", 31),
    ("format.uri", 31),
    ("format.uuid", 31),
    ("validate", 31),
    // 1.32: ext.TwoVarComprehensions.
    ("transformList", 32),
    ("transformMap", 32),
    ("transformMapEntry", 32),
    // 1.33: library.SemverLib.
    ("semver", 33),
    ("isSemver", 33),
    ("major", 33),
    ("minor", 33),
    ("patch", 33),
];

/// The minor version from which a CRD may use a function introduced in `introduced`.
fn usable_from(introduced: u32) -> u32 {
    if introduced == 0 { 0 } else { introduced + 1 }
}

/// The rule with its string literals blanked, so `'cidr('` in a message is no call.
fn without_strings(rule: &str) -> String {
    let mut out = String::with_capacity(rule.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in rule.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                }
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

/// The functions a rule calls: `name(` and `.name(`, with the namespace kept for
/// namespaced library functions (`sets.contains(`), dropped for receiver calls
/// (`self.url.startsWith(` is `startsWith`).
fn calls(rule: &str) -> BTreeSet<String> {
    let s = without_strings(rule);
    let b = s.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'(' {
            let mut j = i;
            while j > 0 && (b[j - 1].is_ascii_alphanumeric() || b[j - 1] == b'_') {
                j -= 1;
            }
            if j < i {
                let name = &s[j..i];
                let ns = if j >= 1 && b[j - 1] == b'.' {
                    let mut k = j - 1;
                    while k > 0 && (b[k - 1].is_ascii_alphanumeric() || b[k - 1] == b'_') {
                        k -= 1;
                    }
                    Some(&s[k..j - 1])
                } else {
                    None
                };
                match ns {
                    Some(ns @ ("sets" | "optional" | "format")) => {
                        out.insert(format!("{ns}.{name}"));
                    }
                    _ => {
                        out.insert(name.to_owned());
                    }
                }
            }
        }
        i += 1;
    }
    out
}

fn collect_rules(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Array(rules)) = m.get("x-kubernetes-validations") {
                for r in rules {
                    if let Some(rule) = r.get("rule").and_then(Value::as_str) {
                        out.push((path.to_owned(), rule.to_owned()));
                    }
                }
            }
            for (k, v) in m {
                collect_rules(v, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                collect_rules(v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The minor version of the chart's `kubeVersion: ">=1.N.0-0"`.
fn chart_min_minor() -> u32 {
    let chart =
        std::fs::read_to_string(root().join("charts/mailrelay-operator/Chart.yaml")).unwrap();
    let chart: Value = serde_norway::from_str(&chart).unwrap();
    let kv = chart["kubeVersion"]
        .as_str()
        .expect("Chart.yaml has kubeVersion");
    let v = kv
        .strip_prefix(">=")
        .unwrap_or_else(|| panic!("kubeVersion {kv:?}: expected a lower bound `>=1.N.0-0`"))
        .trim();
    let mut parts = v.split('.');
    assert_eq!(parts.next(), Some("1"), "kubeVersion {kv:?}");
    parts
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("kubeVersion {kv:?}"))
}

fn crd_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no CRDs in crds/");
    files
}

#[test]
fn every_cel_function_is_accepted_by_the_charts_minimum_kubernetes() {
    let min = chart_min_minor();
    let mut problems = Vec::new();
    let mut seen = 0;
    for file in crd_files() {
        let crd: Value = serde_norway::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let mut rules = Vec::new();
        collect_rules(&crd, "", &mut rules);
        for (path, rule) in rules {
            seen += 1;
            for f in calls(&rule) {
                match INTRODUCED.iter().find(|(n, _)| *n == f) {
                    None => problems.push(format!(
                        "{}{path}: `{f}` is not in the table of CEL functions per Kubernetes version (add it, with its source)",
                        file.display()
                    )),
                    Some((_, introduced)) if usable_from(*introduced) > min => problems.push(format!(
                        "{}{path}: `{f}` needs Kubernetes >= 1.{} in CRD rules, but the chart claims kubeVersion >= 1.{min}: rule `{rule}`",
                        file.display(),
                        usable_from(*introduced)
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    assert!(
        seen > 0,
        "the CRDs have no CEL rules: the check would prove nothing"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The check finds what it must: a CIDR rule needs 1.31, a receiver call is seen
/// without its receiver, and string literals hide no calls.
#[test]
fn the_rule_scanner_sees_calls_not_strings() {
    let c = calls("isCIDR(self) && cidr(self).prefixLength() >= 8 && self.matches('ip(')");
    assert_eq!(
        c.into_iter().collect::<Vec<_>>(),
        ["cidr", "isCIDR", "matches", "prefixLength"]
    );
    assert_eq!(
        calls("sets.contains(self.a, ['x']) && self.url.startsWith('redis')")
            .into_iter()
            .collect::<Vec<_>>(),
        ["sets.contains", "startsWith"]
    );
    let intro = |f: &str| INTRODUCED.iter().find(|(n, _)| *n == f).unwrap().1;
    assert_eq!(usable_from(intro("isCIDR")), 31);
    assert_eq!(usable_from(intro("size")), 0);
    // A claim of 1.29 with the CIDR rules in the CRDs must fail.
    assert!(usable_from(intro("cidr")) > 29);
}

/// README and operations docs state the same minimum as the chart.
#[test]
fn docs_state_the_charts_minimum_kubernetes() {
    let min = chart_min_minor();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let want = format!("Kubernetes 1.{min}");
    assert!(
        readme.contains(&want),
        "README.md should state the minimum Kubernetes version ({want})"
    );
}
