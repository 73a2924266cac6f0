//! Case-insensitive globs for egress matching (`*` any run, `?` one character).
//!
//! Egress-only for now so the two quota halves could be built apart; the ingress
//! matcher has the same semantics and the two are meant to be merged into one.

/// Whether `text` matches `pattern` (ASCII case-insensitive; `*` matches any run of
/// characters including none, `?` exactly one). Linear backtracking on the last `*`,
/// so a hostile pattern cannot make it exponential.
pub fn egress_glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().map(|c| c.to_ascii_lowercase()).collect();
    let t: Vec<char> = text.chars().map(|c| c.to_ascii_lowercase()).collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was and how much of the text it has swallowed so far.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Domains and host names compare without a trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("gmail.com", "gmail.com", true),
            ("gmail.com", "GMail.Com", true),
            ("gmail.com", "xgmail.com", false),
            ("*.google.com", "alt1.gmail-smtp-in.l.google.com", true),
            ("*.google.com", "google.com", false),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*a*b*c", "xxaxxbxxc", true),
            ("*a*b*c", "xxaxxcxxb", false),
            ("mx*.example.*", "mx10.example.net", true),
            ("**", "anything", true),
        ] {
            assert_eq!(egress_glob_match(p, t), m, "{p:?} vs {t:?}");
        }
        // Adversarial pattern stays fast (linear backtracking).
        let text = "a".repeat(5000);
        assert!(!egress_glob_match(&format!("{}b", "*a".repeat(50)), &text));
    }
}
