//! Case-insensitive globs with `*` (any run of characters, also none) and `?`
//! (exactly one character), as used by quota `match` patterns (senders and AUTH
//! users for ingress, destination domains and MX hosts for egress).

// One matcher for every glob of the relay: the protocol crate's (sender binding).
use mailrelay_smtp::sender::glob_match;

/// A compiled pattern: lower-cased once, matched many times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    chars: Vec<char>,
    /// The pattern as bytes when it is ASCII (the usual case): matched without
    /// allocating.
    ascii: Option<Vec<u8>>,
    /// No `*` or `?`: a plain case-insensitive comparison.
    literal: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        let chars: Vec<char> = pattern.to_lowercase().chars().collect();
        let literal = !chars.iter().any(|c| matches!(c, '*' | '?'));
        let ascii = chars
            .iter()
            .all(char::is_ascii)
            .then(|| chars.iter().map(|&c| c as u8).collect());
        Glob {
            chars,
            ascii,
            literal,
        }
    }

    pub fn is_match(&self, text: &str) -> bool {
        if text.chars().any(char::is_uppercase) {
            self.is_match_lower(&text.to_lowercase())
        } else {
            self.is_match_lower(text)
        }
    }

    /// [`Glob::is_match`] for text already lower-cased: no allocation for ASCII.
    pub fn is_match_lower(&self, text: &str) -> bool {
        if self.literal {
            return text.chars().eq(self.chars.iter().copied());
        }
        if let Some(p) = &self.ascii
            && text.is_ascii()
        {
            return glob_match_bytes(p, text.as_bytes());
        }
        let text: Vec<char> = text.chars().collect();
        glob_match(&self.chars, &text)
    }
}

/// Domains and host names compare without a trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// [`glob_match`] over bytes, for ASCII pattern and text.
fn glob_match_bytes(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == b'?' || *c == t[ti] => {
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
    p[pi..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Glob::new(p).is_match(t)
    }

    #[test]
    fn stars_and_questions() {
        assert!(m("*@example.com", "alice@example.com"));
        assert!(m("*@example.com", "@example.com"));
        assert!(!m("*@example.com", "alice@example.com.evil"));
        assert!(m("alerts-*@example.com", "alerts-db@example.com"));
        assert!(!m("alerts-*@example.com", "alert@example.com"));
        assert!(m("*.example.com", "mail.example.com"));
        assert!(!m("*.example.com", "example.com"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*", ""));
        assert!(m("**a**", "bab"));
        assert!(m("*a*b*c*", "xxaxxbxxcxx"));
        assert!(!m("*a*b*c*", "xxaxxcxxbxx"));
        assert!(!m("", "x"));
        assert!(m("", ""));
    }

    #[test]
    fn host_and_domain_patterns() {
        for (p, t, want) in [
            ("gmail.com", "GMail.Com", true),
            ("gmail.com", "xgmail.com", false),
            ("*.google.com", "alt1.gmail-smtp-in.l.google.com", true),
            ("*.google.com", "google.com", false),
            ("mx*.example.*", "mx10.example.net", true),
        ] {
            assert_eq!(m(p, t), want, "{p:?} vs {t:?}");
        }
        assert_eq!(normalize_name("MX.Example.COM."), "mx.example.com");
        // An adversarial pattern stays fast (linear backtracking).
        let text = "a".repeat(5000);
        assert!(!m(&format!("{}b", "*a".repeat(50)), &text));
    }

    #[test]
    fn case_does_not_matter() {
        assert!(m("*@Example.COM", "ALICE@example.com"));
        assert!(m("Payments", "payments"));
        assert!(m("ÉTÉ*", "été@x"));
    }

    #[test]
    fn agrees_with_a_naive_matcher_on_random_input() {
        // The naive recursive definition, for small inputs.
        fn naive(p: &[char], t: &[char]) -> bool {
            match p.first() {
                None => t.is_empty(),
                Some('*') => (0..=t.len()).any(|i| naive(&p[1..], &t[i..])),
                Some(c) => !t.is_empty() && (*c == '?' || *c == t[0]) && naive(&p[1..], &t[1..]),
            }
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = ['a', 'b', '*', '?'];
        for _ in 0..20_000 {
            let p: Vec<char> = (0..rng.random_range(0..7))
                .map(|_| alphabet[rng.random_range(0..4)])
                .collect();
            let t: Vec<char> = (0..rng.random_range(0..8))
                .map(|_| alphabet[rng.random_range(0..2)])
                .collect();
            assert_eq!(glob_match(&p, &t), naive(&p, &t), "{p:?} {t:?}");
            let (ps, ts): (String, String) = (p.iter().collect(), t.iter().collect());
            assert_eq!(Glob::new(&ps).is_match(&ts), naive(&p, &t), "{p:?} {t:?}");
        }
    }
}
