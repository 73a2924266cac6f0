//! Output helpers: `-o json|yaml` and aligned text tables.

use super::{OutputFormat, PluginError};

/// Renders `value` as pretty JSON or YAML (each ends with a newline).
pub fn structured(format: OutputFormat, value: &serde_json::Value) -> Result<String, PluginError> {
    let malformed = |e: &dyn std::fmt::Display| PluginError::Malformed {
        what: "the output".to_owned(),
        detail: e.to_string(),
    };
    match format {
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(value).map_err(|e| malformed(&e))?;
            s.push('\n');
            Ok(s)
        }
        OutputFormat::Yaml => serde_norway::to_string(value).map_err(|e| malformed(&e)),
    }
}

/// Left-aligned columns separated by three spaces, like `kubectl get`.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 3));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Relays that could not answer: (namespace, relay, why).
pub type RelayErrors = [(String, String, PluginError)];

/// What a verb gathered from several relays (`quota`, `shaping`) as a table:
/// `rows` are (namespace, cells); under `-A` a `NAMESPACE` column comes first;
/// `empty` stands for no row; then one line per relay that could not answer.
pub fn relay_table(
    all_namespaces: bool,
    header: &[&str],
    rows: Vec<(String, Vec<String>)>,
    empty: &str,
    errors: &RelayErrors,
) -> String {
    let mut out = if rows.is_empty() {
        empty.to_owned()
    } else {
        let mut h = Vec::with_capacity(header.len() + 1);
        if all_namespaces {
            h.push("NAMESPACE");
        }
        h.extend_from_slice(header);
        let cells: Vec<Vec<String>> = rows
            .into_iter()
            .map(|(ns, mut r)| {
                if all_namespaces {
                    r.insert(0, ns);
                }
                r
            })
            .collect();
        table(&h, &cells)
    };
    for (ns, relay, e) in errors {
        if all_namespaces {
            out.push_str(&format!("relay {ns}/{relay}: {e}\n"));
        } else {
            out.push_str(&format!("relay {relay}: {e}\n"));
        }
    }
    out
}

/// `doc` with an `errors` list naming each relay that could not answer (none:
/// left as it is), for `-o json|yaml`.
pub fn with_relay_errors(mut doc: serde_json::Value, errors: &RelayErrors) -> serde_json::Value {
    if !errors.is_empty() {
        doc["errors"] = errors
            .iter()
            .map(|(ns, r, e)| serde_json::json!({"namespace": ns, "relay": r, "error": e.to_string()}))
            .collect();
    }
    doc
}

/// A short duration like kubectl's ages: `42s`, `5m`, `3h12m`, `2d04h`.
pub fn short_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        s => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["NAME", "USED"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "22".into()],
            ],
        );
        assert_eq!(t, "NAME     USED\na        1\nlonger   22\n");
    }

    #[test]
    fn relay_tables_name_the_namespace_under_all_namespaces_and_errors_after() {
        let rows = || {
            vec![
                ("mail".to_owned(), vec!["out".to_owned(), "1".to_owned()]),
                ("web".to_owned(), vec!["in".to_owned(), "22".to_owned()]),
            ]
        };
        let errors = vec![(
            "mail".to_owned(),
            "down".to_owned(),
            PluginError::NotFound("gone".into()),
        )];
        assert_eq!(
            relay_table(false, &["RELAY", "N"], rows(), "none\n", &errors),
            "RELAY   N\nout     1\nin      22\nrelay down: gone\n"
        );
        assert_eq!(
            relay_table(true, &["RELAY", "N"], rows(), "none\n", &errors),
            "NAMESPACE   RELAY   N\nmail        out     1\nweb         in      22\nrelay mail/down: gone\n"
        );
        assert_eq!(
            relay_table(false, &["RELAY"], vec![], "none\n", &[]),
            "none\n"
        );
        let doc = with_relay_errors(serde_json::json!({"x": 1}), &errors);
        assert_eq!(doc["errors"][0]["relay"], "down");
        assert_eq!(doc["errors"][0]["error"], "gone");
        assert!(
            with_relay_errors(serde_json::json!({}), &[])
                .get("errors")
                .is_none()
        );
    }

    #[test]
    fn durations() {
        assert_eq!(short_duration(31), "31s");
        assert_eq!(short_duration(600), "10m");
        assert_eq!(short_duration(3 * 3600 + 720), "3h12m");
        assert_eq!(short_duration(2 * 86400 + 4 * 3600), "2d04h");
    }

    #[test]
    fn yaml_and_json() {
        let v = serde_json::json!({"retried": 2});
        assert_eq!(
            structured(OutputFormat::Json, &v).unwrap(),
            "{\n  \"retried\": 2\n}\n"
        );
        assert_eq!(structured(OutputFormat::Yaml, &v).unwrap(), "retried: 2\n");
    }
}
