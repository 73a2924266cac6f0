//! DKIM signing (RFC 6376; Ed25519 per RFC 8463) of accepted mail, once, before
//! the `250`: the queued bytes carry the signature, so every pod delivers the
//! same message. The `From:` domain picks the key (DMARC alignment); a domain
//! without one is sent unsigned or refused, as `unsigned_policy` says.
//!
//! Canonicalisation, signing and key selection are pure ([`canon`], [`sign`]);
//! key files are read at the edge ([`keys`]: startup and `keys_dir` reloads).
//! Cryptography is ring's (already the TLS stack's provider).

pub mod canon;
/// The `dkim:` section lives with the rest of the config (a leaf).
pub use crate::config::dkim as config;
pub mod keys;
pub mod metrics;
pub mod sign;

use std::sync::{Arc, Mutex, RwLock};

use config::{DkimConfig, FieldError, UnsignedPolicy, field_err};
use keys::KeySet;
use metrics::DkimMetrics;

/// What happened to one accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Signed with this many keys of this domain.
    Signed { domain: String, signatures: usize },
    /// Sent without a signature (policy `allow`).
    Unsigned { reason: String },
    /// Refused; the reply text (after `550 5.7.26`) names the reason.
    Refused { reason: String },
}

pub struct Dkim {
    cfg: DkimConfig,
    keys: RwLock<Arc<KeySet>>,
    /// keys_dir content last looked at (loaded or refused), so a bad set is
    /// reported once, not at every poll.
    seen: Mutex<Vec<u8>>,
    metrics: DkimMetrics,
}

impl std::fmt::Debug for Dkim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dkim").finish_non_exhaustive()
    }
}

/// Loads the inline keys and the keys directory (when it has a keys.yaml yet).
pub fn load_keys(cfg: &DkimConfig) -> Result<KeySet, FieldError> {
    config::validate(cfg)?;
    let mut set = KeySet::default();
    keys::load_domains("dkim.domains", &cfg.domains, None, &mut set)?;
    if let Some(dir) = &cfg.keys_dir
        && let Some((file, _)) = keys::read_keys_file(dir)?
    {
        let prefix = format!("{}: domains", dir.join("keys.yaml").display());
        keys::load_domains(&prefix, &file.domains, Some(dir), &mut set)?;
    }
    if let Some(b) = &cfg.bounce_domain
        && set.lookup(b).is_none()
        && cfg.keys_dir.is_none()
    {
        return Err(field_err(
            "dkim.bounce_domain",
            format!("{b} has no key in dkim.domains"),
        ));
    }
    Ok(set)
}

/// Once per load of a key set (start-up, each reload that changed something).
fn log_warnings(set: &KeySet) {
    for w in &set.warnings {
        tracing::warn!("DKIM key accepted with a warning: {w}");
    }
}

/// Whether the section asks for anything (no section: no signing, no metrics).
pub fn configured(cfg: &DkimConfig) -> bool {
    !cfg.domains.is_empty()
        || cfg.keys_dir.is_some()
        || cfg.unsigned_policy == UnsignedPolicy::Reject
        || !cfg.unsigned_overrides.is_empty()
}

fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&s[si]) {
            pi += 1;
            si += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The domain of the one mailbox of the one `From:` field, lower case; the error
/// says why there is none.
pub fn from_domain(msg: &[u8]) -> Result<String, String> {
    from_domain_in(&canon::split(msg).0)
}

/// [`from_domain`] over the fields [`canon::split`] found.
fn from_domain_in(fields: &[canon::Field<'_>]) -> Result<String, String> {
    let froms: Vec<_> = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(b"from"))
        .collect();
    let f = match froms.as_slice() {
        [] => return Err("message has no From: header".into()),
        [one] => one,
        _ => return Err("message has more than one From: header".into()),
    };
    let raw = String::from_utf8_lossy(&f.raw[f.name.len()..]);
    let value = raw.trim_start_matches([' ', '\t']).trim_start_matches(':');
    // Comments out, quoted strings kept whole, mailboxes split at top-level commas.
    let (mut parts, mut cur) = (Vec::new(), String::new());
    let (mut depth, mut quoted, mut angle, mut escaped) = (0usize, false, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                cur.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => {
                depth += 1;
                continue;
            }
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                continue;
            }
            '<' if !quoted && depth == 0 => angle = true,
            '>' if !quoted && depth == 0 => angle = false,
            ',' if !quoted && !angle && depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            cur.push(c);
        }
    }
    parts.push(cur);
    let parts: Vec<&str> = parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect();
    let one = match parts.as_slice() {
        [one] => *one,
        [] => return Err("the From: header names no address".into()),
        _ => return Err("the From: header names more than one address".into()),
    };
    let addr = match (one.rfind('<'), one.rfind('>')) {
        (Some(a), Some(b)) if a < b => &one[a + 1..b],
        _ => one,
    };
    let domain = addr
        .rsplit_once('@')
        .map(|(_, d)| d.trim().trim_end_matches('.'))
        .filter(|d| !d.is_empty() && !d.contains([' ', '\t', '"', '<', '>', ';', ':']))
        .ok_or_else(|| "the From: header has no parseable address".to_string())?;
    Ok(domain.to_lowercase())
}

impl Dkim {
    /// Loads every key; an error names the field (startup refuses to run with it).
    pub fn load(cfg: &DkimConfig, metrics: DkimMetrics) -> Result<Arc<Self>, FieldError> {
        let set = load_keys(cfg)?;
        log_warnings(&set);
        let seen = cfg
            .keys_dir
            .as_deref()
            .map(keys::fingerprint)
            .unwrap_or_default();
        metrics.keys_loaded(set.key_count());
        Ok(Arc::new(Dkim {
            cfg: cfg.clone(),
            keys: RwLock::new(Arc::new(set)),
            seen: Mutex::new(seen),
            metrics,
        }))
    }

    pub fn keys(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().expect("dkim keys lock"))
    }

    fn policy_for(&self, domain: Option<&str>) -> (UnsignedPolicy, String) {
        if let Some(d) = domain {
            for o in &self.cfg.unsigned_overrides {
                if glob_match(&o.domain, d) {
                    return (o.policy, o.domain.clone());
                }
            }
        }
        (self.cfg.unsigned_policy, "other".into())
    }

    /// The signature fields for a message split by [`canon::split`].
    fn signatures(
        &self,
        fields: &[canon::Field<'_>],
        rest: &[u8],
        domain: &keys::DomainKeys,
        now_unix: u64,
    ) -> Result<Vec<u8>, sign::SignError> {
        let expires =
            (!self.cfg.expire_after.is_zero()).then(|| now_unix + self.cfg.expire_after.as_secs());
        let params = sign::SignParams {
            domain: &domain.domain,
            canon: self.cfg.canonicalization,
            timestamp: now_unix,
            expires,
        };
        sign::sign_split(fields, rest, &domain.keys, &params)
    }

    /// Puts the signature fields on top: one allocation of the final size and one
    /// copy of the message (inserting in place would grow, then move it).
    fn prepend(&self, body: &mut Vec<u8>, head: &[u8], domain: &keys::DomainKeys) {
        let mut signed = Vec::with_capacity(head.len() + body.len());
        signed.extend_from_slice(head);
        signed.extend_from_slice(body);
        *body = signed;
        for k in &domain.keys {
            self.metrics.signature(k.algorithm.as_str());
        }
    }

    /// Signs an accepted message in place (the signature fields go on top), or
    /// says why it is not signed. The header is parsed once, for the `From:`
    /// domain and the signature both.
    pub fn sign_accepted(&self, body: &mut Vec<u8>, now_unix: u64) -> Outcome {
        let set = self.keys();
        let (fields, rest) = canon::split(body);
        let from = from_domain_in(&fields);
        let mut head = None;
        if let Ok(d) = &from
            && let Some(keys) = set.lookup(d)
        {
            match self.signatures(&fields, rest, keys, now_unix) {
                Ok(h) => head = Some((h, keys)),
                Err(e) => {
                    // ring fails only on an internal error; the message goes as
                    // the policy says, like one without a key.
                    tracing::error!(domain = %keys.domain, error = %e, "DKIM signing failed");
                }
            }
        }
        if let Some((h, keys)) = head {
            self.prepend(body, &h, keys);
            self.metrics.message("signed", &keys.domain);
            return Outcome::Signed {
                domain: keys.domain.clone(),
                signatures: keys.keys.len(),
            };
        }
        let reason = match &from {
            Ok(d) => format!("no DKIM key for From: domain {d}"),
            Err(e) => format!("no DKIM key chosen: {e}"),
        };
        let (policy, label) = self.policy_for(from.as_deref().ok());
        match policy {
            UnsignedPolicy::Allow => {
                self.metrics.message("unsigned", &label);
                Outcome::Unsigned { reason }
            }
            UnsignedPolicy::Reject => {
                self.metrics.message("refused", &label);
                Outcome::Refused { reason }
            }
        }
    }

    /// Signs a DSN the relay wrote: with `bounce_domain`'s key when set, else the
    /// key its `From:` domain selects; never refused.
    pub fn sign_bounce(&self, body: &mut Vec<u8>, now_unix: u64) -> bool {
        let set = self.keys();
        let (fields, rest) = canon::split(body);
        let domain = match &self.cfg.bounce_domain {
            Some(b) => Some(b.to_ascii_lowercase()),
            None => from_domain_in(&fields).ok(),
        };
        let Some(keys) = domain.as_deref().and_then(|d| set.lookup(d)) else {
            return false;
        };
        match self.signatures(&fields, rest, keys, now_unix) {
            Ok(h) => {
                self.prepend(body, &h, keys);
                self.metrics.message("signed", &keys.domain);
                true
            }
            Err(e) => {
                tracing::error!(domain = %keys.domain, error = %e, "DKIM signing of a DSN failed");
                false
            }
        }
    }

    /// Loads `keys_dir` again when its content changed. `Ok(true)`: new keys in
    /// use; an error leaves the previous keys in use.
    pub fn reload_if_changed(&self) -> Result<bool, FieldError> {
        let Some(dir) = &self.cfg.keys_dir else {
            return Ok(false);
        };
        let print = keys::fingerprint(dir);
        {
            let mut seen = self.seen.lock().expect("dkim seen lock");
            if *seen == print {
                return Ok(false);
            }
            *seen = print;
        }
        match load_keys(&self.cfg) {
            Ok(set) => {
                log_warnings(&set);
                self.metrics.keys_loaded(set.key_count());
                self.metrics.reload("ok");
                *self.keys.write().expect("dkim keys lock") = Arc::new(set);
                Ok(true)
            }
            Err(e) => {
                self.metrics.reload("error");
                Err(e)
            }
        }
    }

    /// Polls `keys_dir` (a Secret volume swaps its `..data` symlink atomically,
    /// so a read sees the old or the new set, never half of each).
    pub fn spawn_reloader(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let dir = self.cfg.keys_dir.clone()?;
        let me = Arc::clone(self);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.cfg.reload_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let m = Arc::clone(&me);
                match tokio::task::spawn_blocking(move || m.reload_if_changed()).await {
                    Ok(Ok(true)) => {
                        let set = me.keys();
                        let mut domains: Vec<&str> =
                            set.domains.keys().map(String::as_str).collect();
                        domains.sort_unstable();
                        tracing::info!(dir = %dir.display(), keys = set.key_count(), domains = %domains.join(","), "reloaded DKIM keys");
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(dir = %dir.display(), error = %e, "DKIM keys directory refused; the previous keys stay in use")
                    }
                    Err(e) => tracing::error!(error = %e, "DKIM reload task failed"),
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domain_needs_exactly_one_mailbox() {
        let f = |h: &str| from_domain(format!("{h}\r\nTo: x@y.z\r\n\r\nbody\r\n").as_bytes());
        assert_eq!(f("From: a@Example.COM").unwrap(), "example.com");
        assert_eq!(
            f("From: \"Doe, Jane (sales)\" <jane@mail.example.org> (work)").unwrap(),
            "mail.example.org"
        );
        assert_eq!(f("From: Jane\r\n <j@ex.org>").unwrap(), "ex.org");
        assert_eq!(f("FROM:jörg@example.net").unwrap(), "example.net");
        assert!(
            f("From: a@b.c, d@e.f")
                .unwrap_err()
                .contains("more than one")
        );
        assert!(
            f("From: undisclosed:;")
                .unwrap_err()
                .contains("no parseable")
        );
        assert!(
            f("From: a@b.c\r\nFrom: d@e.f")
                .unwrap_err()
                .contains("more than one From")
        );
        assert!(
            from_domain(b"Subject: x\r\n\r\n")
                .unwrap_err()
                .contains("no From")
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.bank.example", "eu.bank.example"));
        assert!(glob_match("*.bank.example", "A.B.BANK.example"));
        assert!(!glob_match("*.bank.example", "bank.example"));
        assert!(!glob_match("*.bank.example", "evilbank.example"));
        assert!(glob_match("*", "anything.org"));
        assert!(glob_match("example.*", "example.org"));
    }
}
