//! Egress matching on names: the quota globs of [`crate::quota::glob`], and how
//! domains and host names are normalised before they are compared.

/// Whether `text` matches `pattern` (case-insensitive `*` and `?`).
pub fn egress_glob_match(pattern: &str, text: &str) -> bool {
    crate::quota::glob::Glob::new(pattern).is_match(text)
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
