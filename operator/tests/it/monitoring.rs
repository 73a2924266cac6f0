//! Monitoring of relays: the alert rules and the Grafana dashboard the chart ships
//! (`charts/mailrelay-operator/files/`), checked against what really runs.
//!
//! - `promtool` (Debian's `prometheus` package, from `.ci/install-deps`) checks the
//!   rules file and runs its unit tests (`charts/tests/monitoring/alerts_test.yaml`),
//!   where every alert fires on some series and stays silent on others.
//! - Every dashboard query is valid PromQL (promtool checks it as a recording rule).
//! - Every metric the alerts and the dashboard use, and every label they match on,
//!   exists in what a real `mailrelay serve` (configured by the operator's builder,
//!   with Redis, a smarthost that delivers, defers and bounces, and quotas) exports
//!   on `/metrics` after real mail, or in the operator's own exposition.
//! - The chart's PodMonitor selects exactly the pods the operator builds, on the
//!   port that serves `/metrics`.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use mailrelay::config::RelayConfig;
use mailrelay_operator::crd::{ADMIN_PORT, MailRelay, SendQuota};
use mailrelay_operator::reconcile::relay::select_quotas;
use mailrelay_operator::resources::{self, Inputs, ResolvedSecrets};
use serde_json::Value;
use support::redis::RedisServer;
use support::relay::{RelayProcess, localise};
use support::smtp::{Sink, swaks};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rules_file() -> PathBuf {
    repo().join("charts/mailrelay-operator/files/mailrelay-alerts.yaml")
}

fn dashboard_file() -> PathBuf {
    repo().join("charts/mailrelay-operator/files/mailrelay-dashboard.json")
}

fn yaml_file(p: &Path) -> Value {
    serde_norway::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs promtool; its output on failure.
fn promtool(args: &[&str], dir: &Path) -> Result<String, String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("promtool (Debian package prometheus, installed by .ci/install-deps)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// (group, alert, expr) of every rule.
fn alert_rules() -> Vec<(String, String, String)> {
    let rules = yaml_file(&rules_file());
    let mut out = Vec::new();
    for g in rules["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            out.push((
                g["name"].as_str().unwrap().to_owned(),
                r["alert"].as_str().expect("only alerting rules").to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    promtool(&["check", "rules", rules_file().to_str().unwrap()], &repo())
        .unwrap_or_else(|e| panic!("promtool check rules:\n{e}"));

    // promtool compares annotations exactly: the unit tests run on a copy without
    // them (the check above has parsed their templates).
    let dir = tempfile::tempdir().unwrap();
    let mut rules = yaml_file(&rules_file());
    for g in rules["groups"].as_array_mut().unwrap() {
        for r in g["rules"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(
        dir.path().join("mailrelay-alerts.yaml"),
        serde_norway::to_string(&rules).unwrap(),
    )
    .unwrap();
    let tests = repo().join("charts/tests/monitoring/alerts_test.yaml");
    std::fs::copy(&tests, dir.path().join("alerts_test.yaml")).unwrap();
    let out = promtool(&["test", "rules", "alerts_test.yaml"], dir.path())
        .unwrap_or_else(|e| panic!("promtool test rules:\n{e}"));
    assert!(out.contains("SUCCESS"), "{out}");

    // Each alert is seen firing and seen silent.
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in yaml_file(&tests)["tests"].as_array().unwrap() {
        for a in t["alert_rule_test"].as_array().unwrap() {
            let name = a["alertname"].as_str().unwrap().to_owned();
            match a["exp_alerts"].as_array() {
                Some(e) if !e.is_empty() => fired.insert(name),
                _ => silent.insert(name),
            };
        }
    }
    for (_, alert, _) in alert_rules() {
        assert!(fired.contains(&alert), "{alert}: no test where it fires");
        assert!(
            silent.contains(&alert),
            "{alert}: no test where it stays silent"
        );
    }
}

/// A test that can fail: a rule summing a queue-wide gauge over pods alerts on a
/// relay whose pods each report a harmless value.
#[test]
fn the_unit_tests_catch_a_sum_over_queue_wide_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(rules_file()).unwrap();
    let wrong = text.replace(
        "max by (namespace, mailrelay) (mailrelay_queue_oldest_age_seconds) > 3600",
        "sum by (namespace, mailrelay) (mailrelay_queue_oldest_age_seconds) > 3600",
    );
    assert_ne!(wrong, text);
    let mut rules: Value = serde_norway::from_str(&wrong).unwrap();
    for g in rules["groups"].as_array_mut().unwrap() {
        for r in g["rules"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(
        dir.path().join("mailrelay-alerts.yaml"),
        serde_norway::to_string(&rules).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        repo().join("charts/tests/monitoring/alerts_test.yaml"),
        dir.path().join("alerts_test.yaml"),
    )
    .unwrap();
    let e = promtool(&["test", "rules", "alerts_test.yaml"], dir.path()).unwrap_err();
    assert!(e.contains("mailrelay=\"shared\""), "{e}");
}

/// Every PromQL expression of the dashboard (panel targets and variable queries
/// that are PromQL), with Grafana's variables as they are interpolated.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dashboard_file()).unwrap();
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(d["uid"], "mailrelay-overview");
    let mut out = Vec::new();
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap().to_owned();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            out.push((title.clone(), t["expr"].as_str().unwrap().to_owned()));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().unwrap();
            // label_values(SELECTOR, LABEL) is Grafana's, not PromQL: its selector is.
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.to_owned())
                .unwrap_or_else(|| panic!("variable query {q}"));
            out.push((format!("variable {}", v["name"]), inner));
        }
    }
    out
}

fn interpolate(expr: &str) -> String {
    expr.replace("$__rate_interval", "2m")
        .replace("$namespace", ".*")
        .replace("$mailrelay", ".*")
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let queries = dashboard_queries();
    assert!(queries.len() > 20, "{queries:?}");
    for (title, expr) in &queries {
        let left = interpolate(expr);
        assert!(!left.contains('$'), "{title}: unknown variable in {expr}");
    }
    // promtool parses each as a recording rule.
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": interpolate(e)}))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.rules.yaml");
    std::fs::write(
        &file,
        serde_norway::to_string(
            &serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}),
        )
        .unwrap(),
    )
    .unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()], dir.path())
        .unwrap_or_else(|e| panic!("dashboard queries:\n{e}"));
}

// ---------------------------------------------------------------------------
// Metric names in PromQL.

/// A metric selector in an expression: its name and the label names it matches on.
#[derive(Debug)]
struct Selector {
    metric: String,
    labels: Vec<String>,
}

const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index of the bracket closing the one at `open`.
fn closing(chars: &[char], open: usize) -> usize {
    let (o, c) = (
        chars[open],
        match chars[open] {
            '(' => ')',
            '[' => ']',
            '{' => '}',
            _ => unreachable!(),
        },
    );
    let mut depth = 0;
    let mut i = open;
    let mut quote = None;
    while i < chars.len() {
        let ch = chars[i];
        match quote {
            Some(_) if ch == '\\' => i += 1,
            Some(q) if ch == q => quote = None,
            Some(_) => {}
            None if ch == '"' || ch == '\'' || ch == '`' => quote = Some(ch),
            None if ch == o => depth += 1,
            None if ch == c => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            None => {}
        }
        i += 1;
    }
    panic!("unbalanced {o} in {}", chars.iter().collect::<String>())
}

/// Label names of a `{...}` matcher list (without the braces).
fn matcher_labels(inner: &str) -> Vec<String> {
    let chars: Vec<char> = inner.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i += 1;
            while i < chars.len() && chars[i] != ch {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if is_ident_start(ch) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else {
            i += 1;
        }
    }
    out
}

/// Every metric selector of a PromQL expression.
fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let next_non_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut out: Vec<Selector> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if ch == '"' || ch == '\'' || ch == '`' || ch == '[' {
            // Strings and range/subquery durations hold no metric.
            i = if ch == '[' {
                closing(&chars, i) + 1
            } else {
                let mut j = i + 1;
                while chars[j] != ch {
                    j += if chars[j] == '\\' { 2 } else { 1 };
                }
                j + 1
            };
        } else if ch == '{' {
            // A selector without a name ({__name__=...}) is not used here.
            panic!("a label matcher without a metric name in {expr}");
        } else if ch.is_ascii_digit() || ch == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(ch) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_space(i);
            let next = chars.get(after).copied();
            if LABEL_LISTS.contains(&word.as_str()) && next == Some('(') {
                i = closing(&chars, after) + 1;
            } else if KEYWORDS.contains(&word.as_str()) || next == Some('(') {
                // An operator, or a function or aggregation call.
            } else if AGGREGATIONS.contains(&word.as_str()) && {
                let rest: String = chars[after..].iter().collect();
                rest.starts_with("by") || rest.starts_with("without")
            } {
                // `sum by (...) (...)`.
            } else {
                let mut labels = Vec::new();
                if next == Some('{') {
                    let close = closing(&chars, after);
                    labels = matcher_labels(&chars[after + 1..close].iter().collect::<String>());
                    i = close + 1;
                }
                out.push(Selector {
                    metric: word,
                    labels,
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_promql_scanner_finds_metrics_and_only_metrics() {
    let s = selectors(
        r#"sum by (namespace, mailrelay) (rate(mailrelay_delivery_recipients_total{result="deferred", reason=~"a|b"}[15m])) / on (pod) group_left (x) max without (le) (foo:bar) > bool 0.25 and histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m] offset 1h))) unless absent(up{job="mailrelay"} == 1) or count(x{a="}{"}) > 1e3"#,
    );
    let got: Vec<(&str, Vec<&str>)> = s
        .iter()
        .map(|s| {
            (
                s.metric.as_str(),
                s.labels.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "mailrelay_delivery_recipients_total",
                vec!["result", "reason"]
            ),
            ("foo:bar", vec![]),
            ("h_bucket", vec![]),
            ("up", vec!["job"]),
            ("x", vec!["a"]),
        ]
    );
}

// ---------------------------------------------------------------------------
// The real exposition.

/// Series names (with their label names) an exposition makes Prometheus store:
/// counters as NAME_total, histograms as NAME_bucket/_sum/_count, gauges as NAME.
/// Families declared without samples yet count with no label names.
fn exposition_series(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            };
            for n in names {
                out.entry(n).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap();
            let name = &line[..end];
            let entry = out.entry(name.to_owned()).or_default();
            if line[end..].starts_with('{') {
                let close = line.find('}').unwrap();
                entry.extend(matcher_labels(&line[end + 1..close]));
            }
        }
    }
    out
}

/// Labels Prometheus adds to every target of the chart's PodMonitor (and the
/// operator's ServiceMonitor), besides the relabelled `mailrelay`.
const TARGET_LABELS: &[&str] = &[
    "job",
    "namespace",
    "pod",
    "container",
    "endpoint",
    "instance",
    "service",
    "mailrelay",
];

const RELAY: &str = "
apiVersion: mailrelay.io/v1alpha1
kind: MailRelay
metadata: {name: outbound, namespace: mail}
spec:
  hostname: relay.example.com
  listeners: [{name: smtp, port: 2525, tls: none}]
  relayNetworks: [127.0.0.0/8]
  redis: {url: 'redis://redis:6379'}
  delivery:
    smarthost: {host: 127.0.0.1, port: SMARTHOST_PORT, tls: disabled}
";

/// An ingress quota that refuses the second message of one sender, one that holds
/// the second message of another back, and an egress quota that lets one message
/// an hour through the smarthost.
const QUOTAS: &[&str] = &[
    "
apiVersion: mailrelay.io/v1alpha1
kind: SendQuota
metadata: {name: per-sender, namespace: mail}
spec:
  direction: ingress
  match: {senders: ['*@limited.example']}
  limits: ['1/1h']
  scope: perKey
  key: sender
  action: reject
",
    "
apiVersion: mailrelay.io/v1alpha1
kind: SendQuota
metadata: {name: held, namespace: mail}
spec:
  direction: ingress
  match: {senders: ['*@held.example']}
  limits: ['1/1h']
  scope: shared
  action: defer
",
    "
apiVersion: mailrelay.io/v1alpha1
kind: SendQuota
metadata: {name: provider, namespace: mail}
spec:
  direction: egress
  match: {smarthost: true}
  limits: ['1/1h']
  scope: shared
  maxConnections: 2
",
];

fn relay_and_quotas(smarthost_port: u16) -> (MailRelay, Vec<SendQuota>) {
    let mut relay: MailRelay =
        serde_norway::from_str(&RELAY.replace("SMARTHOST_PORT", &smarthost_port.to_string()))
            .unwrap();
    relay.metadata.uid = Some("00000000-0000-4000-8000-00000000000a".into());
    let quotas = QUOTAS
        .iter()
        .map(|q| serde_norway::from_str(q).unwrap())
        .collect();
    (relay, quotas)
}

fn build(relay: &MailRelay, quotas: &[SendQuota]) -> resources::Resources {
    let (ok, bad) = select_quotas(relay, quotas);
    assert!(bad.is_empty(), "{bad:?}");
    resources::build(Inputs {
        relay,
        quotas: ok,
        quota_rules: vec![],
        secrets: &ResolvedSecrets::default(),
        default_image: "mailrelay:test",
    })
    .unwrap()
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    // axum answers with Content-Length here, never chunked.
    (status, body.to_owned())
}

fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// The `/metrics` text of a real relay after real traffic: one message to three
/// recipients the smarthost accepts, defers and refuses; two from a sender whose
/// ingress quota allows one, two from a sender whose quota holds the second back;
/// the egress quota paces delivery.
fn real_relay_exposition() -> String {
    let redis = RedisServer::start();
    let sink = Sink::start();
    let (relay, quotas) = relay_and_quotas(sink.addr.port());
    let res = build(&relay, &quotas);
    let yaml = res.config_map.data.as_ref().unwrap()["mailrelay.yaml"].clone();
    let mut cfg = RelayConfig::from_yaml(&yaml).unwrap();
    // ---- TEST SWAP: local ports and the local Redis.
    let (listeners, admin) = localise(&mut cfg, Some(&redis.url()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailrelay.yaml");
    std::fs::write(&path, serde_norway::to_string(&cfg).unwrap()).unwrap();
    let proc = RelayProcess::start(
        &path,
        listeners[0],
        admin,
        &[],
        dir.path().join("relay.log"),
    );

    swaks(
        listeners[0],
        "app@example.com",
        "ok@dest.example,rcpt450@dest.example,rcpt550@dest.example",
        &[],
    );
    swaks(
        listeners[0],
        "batch@limited.example",
        "ok@dest.example",
        &[],
    );
    for _ in 0..2 {
        swaks(listeners[0], "news@held.example", "ok@dest.example", &[]);
    }
    let refused = Command::new("swaks")
        .args(["--server", &listeners[0].to_string()])
        .args(["--from", "batch@limited.example", "--to", "ok@dest.example"])
        .args(["--helo", "client.test"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let refused = String::from_utf8_lossy(&refused.stdout);
    assert!(
        !refused.contains("queued as"),
        "over quota, yet:\n{refused}"
    );

    // Delivery runs on its own: wait for the three results.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = http_get(admin, "/metrics");
        assert_eq!(status, 200, "{text}");
        let done = ["delivered", "deferred", "bounced"].iter().all(|r| {
            sample(
                &text,
                &format!("mailrelay_delivery_recipients_total{{result=\"{r}\""),
            ) >= 1.0
        });
        if done && text.contains("mailrelay_quota_deferrals_total{") {
            drop(proc);
            drop(sink);
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "delivery results missing:\n{text}\nrelay log:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The operator's exposition, with a series in each family.
fn operator_exposition() -> String {
    let m = mailrelay_operator::telemetry::Metrics::new();
    m.reconciled("MailRelay", 0.01);
    m.reconcile_error("MailRelay", "spec");
    m.status_patched("MailRelay");
    m.set_leader(true);
    m.set_namespace_refused("team-b", true);
    m.encode()
}

#[test]
fn every_metric_of_the_alerts_and_the_dashboard_is_exported() {
    let relay = real_relay_exposition();
    let mut series = exposition_series(&relay);
    assert!(
        series.contains_key("mailrelay_queue_oldest_age_seconds"),
        "the queue gauges are exported with Redis up:\n{relay}"
    );
    for (name, labels) in exposition_series(&operator_exposition()) {
        series.entry(name).or_default().extend(labels);
    }
    // `up` is Prometheus' own, per target.
    series.entry("up".into()).or_default();

    let mut uses: Vec<(String, String)> = alert_rules()
        .into_iter()
        .map(|(_, alert, expr)| (format!("alert {alert}"), expr))
        .collect();
    uses.extend(
        dashboard_queries()
            .into_iter()
            .map(|(t, e)| (format!("dashboard {t}"), e)),
    );
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (place, expr) in &uses {
        let found = selectors(expr);
        assert!(!found.is_empty(), "{place}: no metric in {expr}");
        for s in found {
            seen.insert(s.metric.clone());
            let Some(labels) = series.get(&s.metric) else {
                problems.push(format!("{place}: {} is not exported", s.metric));
                continue;
            };
            for l in &s.labels {
                if !labels.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                    problems.push(format!(
                        "{place}: {} has no label {l} (it has {labels:?})",
                        s.metric
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // What the issue asks to watch is covered.
    for m in [
        "mailrelay_queue_messages",
        "mailrelay_queue_oldest_age_seconds",
        "mailrelay_smtp_messages_accepted_total",
        "mailrelay_delivery_recipients_total",
        "mailrelay_quota_rejections_total",
        "mailrelay_queue_write_failures_total",
        "mailrelay_quota_checks_total",
        "up",
    ] {
        assert!(seen.contains(m), "{m} is used nowhere");
    }
}

/// A test that can fail: a misspelt metric is reported.
#[test]
fn a_metric_that_does_not_exist_is_caught() {
    let series = exposition_series(
        "# TYPE mailrelay_delivery_recipients counter\nmailrelay_delivery_recipients_total{result=\"ok\",reason=\"ok\"} 1\n# EOF\n",
    );
    assert!(series.contains_key("mailrelay_delivery_recipients_total"));
    assert!(!series.contains_key("mailrelay_delivery_recipients"));
    let s = selectors("rate(mailrelay_delivery_recipient_total{result=\"x\"}[5m])");
    assert!(!series.contains_key(&s[0].metric));
    assert_eq!(
        series["mailrelay_delivery_recipients_total"],
        BTreeSet::from(["reason".to_owned(), "result".to_owned()])
    );
}

// ---------------------------------------------------------------------------
// The chart's PodMonitor against the pods the operator builds.

const RENDER: &str = r#"
import json, sys, yaml, helm_python
chart = helm_python.Chart.load(sys.argv[1])
values = json.loads(sys.argv[2])
out = chart.render(values, name="mr", namespace="mail-system", is_install=True)
docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
print(json.dumps(docs))
"#;

fn render_chart(values: Value) -> Vec<Value> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(RENDER)
        .arg(repo().join("charts/mailrelay-operator"))
        .arg(values.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("python3 with helm-python-sdk (.ci/install-deps)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    selector["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

#[test]
fn the_pod_monitor_scrapes_the_pods_the_operator_builds() {
    let docs = render_chart(serde_json::json!({
        "relayMonitoring": {"podMonitor": {"enabled": true}}
    }));
    let pm = docs
        .iter()
        .find(|d| d["kind"] == "PodMonitor")
        .expect("a PodMonitor");
    let spec = &pm["spec"];

    let (relay, quotas) = relay_and_quotas(2525);
    let d: Deployment = build(&relay, &quotas).deployment;
    let pod = d.spec.unwrap().template;
    let labels = pod.metadata.unwrap().labels.unwrap();
    assert!(selects(&spec["selector"], &labels), "{labels:?}");
    // The job label the alerts select `up` by.
    let job = spec["jobLabel"].as_str().unwrap();
    assert_eq!(labels[job], "mailrelay");
    for (_, _, expr) in alert_rules() {
        for s in selectors(&expr) {
            if s.metric == "up" {
                assert!(expr.contains("up{job=\"mailrelay\"}"), "{expr}");
            }
        }
    }
    // `mailrelay` is the MailRelay's name.
    let relabel = &spec["podMetricsEndpoints"][0]["relabelings"][0];
    assert_eq!(relabel["targetLabel"], "mailrelay");
    let source = relabel["sourceLabels"][0].as_str().unwrap();
    let pod_label = labels
        .keys()
        .find(|k| {
            format!(
                "__meta_kubernetes_pod_label_{}",
                k.replace(['.', '/', '-'], "_")
            ) == source
        })
        .unwrap_or_else(|| panic!("{source}: no such pod label in {labels:?}"));
    assert_eq!(labels[pod_label], "outbound");
    // The named port is the admin port, which serves /metrics (scraped above).
    let ep = &spec["podMetricsEndpoints"][0];
    assert_eq!(ep["path"], "/metrics");
    let ports = pod.spec.unwrap().containers[0].ports.clone().unwrap();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == ep["port"].as_str())
        .unwrap_or_else(|| panic!("no container port {}", ep["port"]));
    assert_eq!(port.container_port, ADMIN_PORT);
    assert_eq!(spec["namespaceSelector"], serde_json::json!({"any": true}));

    // The chart's own pods (the operator, Redis) are not relays.
    let docs = render_chart(serde_json::json!({
        "redis": {"enabled": true, "auth": {"password": "test"}},
        "relayMonitoring": {"podMonitor": {"enabled": true, "namespaces": ["mail"]}}
    }));
    let pm = docs.iter().find(|d| d["kind"] == "PodMonitor").unwrap();
    assert_eq!(
        pm["spec"]["namespaceSelector"],
        serde_json::json!({"matchNames": ["mail"]})
    );
    let mut others = 0;
    for d in &docs {
        if let Some(l) = d["spec"]["template"]["metadata"]["labels"].as_object() {
            others += 1;
            let l: BTreeMap<String, String> = l
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            assert!(!selects(&pm["spec"]["selector"], &l), "{l:?}");
        }
    }
    assert_eq!(others, 2, "the operator and Redis pods");
}

// ---------------------------------------------------------------------------
// Queue-wide gauges are max()ed, never summed.

/// The gauges every pod reads from the shared queue: `mailrelay_queue_*` gauges.
fn queue_wide_gauges(exposition: &str) -> Vec<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" gauge"))
        .filter(|n| n.starts_with("mailrelay_queue_"))
        .map(str::to_owned)
        .collect()
}

/// The word that applies to the selector at `at`: the function or aggregation whose
/// parenthesis encloses it (looking past a `by (...)` clause), or the set operator
/// modifier (`on (...)`) right before it.
fn enclosing_word(expr: &str, at: usize) -> String {
    let chars: Vec<char> = expr[..at].chars().collect();
    let mut i = chars.len();
    let skip_space = |i: &mut usize| {
        while *i > 0 && chars[*i - 1].is_whitespace() {
            *i -= 1;
        }
    };
    skip_space(&mut i);
    let word_before = |mut i: usize| {
        while i > 0 && chars[i - 1].is_whitespace() {
            i -= 1;
        }
        let end = i;
        while i > 0 && is_ident(chars[i - 1]) {
            i -= 1;
        }
        (i, chars[i..end].iter().collect::<String>())
    };
    if i > 0 && chars[i - 1] == '(' {
        let (start, w) = word_before(i - 1);
        if !w.is_empty() {
            return w;
        }
        // `sum by (x) (` : the parenthesis follows a label list.
        let mut j = start;
        skip_space(&mut j);
        if j > 0 && chars[j - 1] == ')' {
            let mut depth = 0;
            while j > 0 {
                j -= 1;
                match chars[j] {
                    ')' => depth += 1,
                    '(' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let (k, clause) = word_before(j);
            assert!(LABEL_LISTS.contains(&clause.as_str()), "{expr}");
            return word_before(k).1;
        }
        return String::new();
    }
    if i > 0 && chars[i - 1] == ')' {
        // `unless on (namespace, pod) mailrelay_queue_messages`.
        let mut j = i - 1;
        let mut depth = 0;
        loop {
            match chars[j] {
                ')' => depth += 1,
                '(' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            j -= 1;
        }
        return word_before(j).1;
    }
    word_before(i).1
}

#[test]
fn queue_wide_gauges_are_never_summed_and_the_docs_say_so() {
    let m = mailrelay::metrics::Metrics::new();
    let text = m.encode_with_queue_stats(Some(mailrelay::queue::QueueStats::default()));
    let gauges = queue_wide_gauges(&text);
    assert_eq!(gauges.len(), 5, "{gauges:?}");

    let mut uses: Vec<(String, String)> = alert_rules()
        .into_iter()
        .map(|(_, a, e)| (format!("alert {a}"), e))
        .collect();
    uses.extend(dashboard_queries());
    let mut checked = 0;
    for (place, expr) in &uses {
        for g in &gauges {
            let mut from = 0;
            while let Some(pos) = expr[from..].find(g.as_str()) {
                let at = from + pos;
                from = at + g.len();
                // Only whole names.
                if expr[from..].starts_with(|c: char| is_ident(c)) {
                    continue;
                }
                let w = enclosing_word(expr, at);
                // max/min of equal values is the value; count counts pods; a set
                // operator only asks whether the pod reports it.
                assert!(
                    ["max", "min", "count", "on", "ignoring", "label_values"].contains(&w.as_str()),
                    "{place}: {g} under {w:?} in {expr}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked}");
    assert_eq!(
        enclosing_word("sum by (a) (mailrelay_queue_bytes)", 12),
        "sum"
    );

    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let (_, max_part) = ops
        .split_once("**Queue-wide gauges: take `max()`")
        .expect("docs/operations.md: the Monitoring section");
    let max_part = max_part.split("**Per-pod series").next().unwrap();
    for g in &gauges {
        assert!(
            max_part.contains(&format!("`{g}`")),
            "docs/operations.md does not list {g} as queue-wide"
        );
    }
}
