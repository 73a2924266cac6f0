//! `--request-timeout`, read as kubectl reads it: a Go duration (`30s`, `1m30s`,
//! `500ms`, `1.5h`) or a bare number of seconds; `0` means no timeout.

use std::time::Duration;

const UNITS: [(&str, f64); 8] = [
    ("ns", 1e-9),
    ("us", 1e-6),
    ("µs", 1e-6),
    ("μs", 1e-6),
    ("ms", 1e-3),
    ("s", 1.0),
    ("m", 60.0),
    ("h", 3600.0),
];

const HINT: &str = "expected a duration like 30s, 2m, 1m30s or 500ms, or a number of seconds";

/// Parses the flag's value. Clap names the flag in its error.
pub fn parse(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(HINT.to_owned());
    }
    if v.starts_with('-') {
        return Err(format!("a timeout cannot be negative; {HINT}"));
    }
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut rest = v.strip_prefix('+').unwrap_or(v);
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(n);
        let number: f64 = num.parse().map_err(|_| format!("\"{value}\": {HINT}"))?;
        let (unit, scale) = UNITS
            .iter()
            .filter(|(u, _)| tail.starts_with(u))
            // "ms" before "m", "ns" before nothing shorter: the longest unit wins.
            .max_by_key(|(u, _)| u.len())
            .ok_or_else(|| format!("\"{value}\": missing or unknown unit; {HINT}"))?;
        total += number * scale;
        rest = &tail[unit.len()..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err(format!("\"{value}\" is too long"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// A duration for messages, as the user would write it (`1s`, `1m30s`, `250ms`).
pub fn show(d: Duration) -> String {
    if d.subsec_nanos() != 0 && d.as_secs() < 60 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_durations() {
        assert_eq!(parse("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2h45m"), Ok(Duration::from_secs(9900)));
        assert_eq!(parse("10us"), Ok(Duration::from_micros(10)));
        for bad in ["", "5x", "s", "-1s", "1m30", "abc"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse("-1s").unwrap_err().contains("negative"));
    }

    #[test]
    fn shown_as_written() {
        assert_eq!(show(Duration::from_secs(1)), "1s");
        assert_eq!(show(Duration::from_secs(90)), "1m30s");
        assert_eq!(show(Duration::from_secs(3600)), "1h");
        assert_eq!(show(Duration::from_millis(250)), "250ms");
    }
}
