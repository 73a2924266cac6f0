//! What live DNS shows for a sending domain: the DKIM TXT record of each selector
//! (present, and its `p=` the key's), SPF on the domain, DMARC on `_dmarc`.
//! Lookups go through [`TxtResolver`]; judging the answers is pure.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{Name, RData};
use mailrelay::delivery::mx::build_resolver;

/// The TXT records at a name: each record's strings joined, as RFC 6376 3.6.2.2
/// and RFC 7208 3.3 read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxtAnswer {
    Records(Vec<String>),
    /// NXDOMAIN or no TXT records.
    None,
    /// SERVFAIL, timeout, refused: nothing is known.
    Failed(String),
}

/// Looks TXT records up through the cluster's resolver or given nameservers.
#[derive(Clone)]
pub struct TxtResolver {
    resolver: TokioResolver,
}

impl std::fmt::Debug for TxtResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxtResolver").finish_non_exhaustive()
    }
}

impl TxtResolver {
    /// `servers` empty: `/etc/resolv.conf` (in a pod: the cluster DNS).
    pub fn new(servers: &[SocketAddr]) -> Result<TxtResolver, String> {
        let resolver = build_resolver(servers, |opts| {
            opts.timeout = Duration::from_secs(5);
            opts.attempts = 1;
            // A record just published must be seen at the next check, not after the
            // negative TTL of the previous answer.
            opts.cache_size = 0;
        })
        .map_err(|e| e.to_string())?;
        Ok(TxtResolver { resolver })
    }

    pub async fn txt(&self, name: &str) -> TxtAnswer {
        let Ok(n) = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))) else {
            return TxtAnswer::Failed(format!("{name} is not a DNS name"));
        };
        match self.resolver.txt_lookup(n).await {
            Ok(lookup) => {
                let records: Vec<String> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(t) => Some(
                            t.txt_data
                                .iter()
                                .map(|s| String::from_utf8_lossy(s).into_owned())
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    TxtAnswer::None
                } else {
                    TxtAnswer::Records(records)
                }
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => TxtAnswer::None,
            Err(e) => TxtAnswer::Failed(e.to_string()),
        }
    }
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `Published`/`Found`/`FoundPolicyNone` or the problem (`Missing`,
    /// `Mismatch`, `Multiple`, `Invalid`, `Error`).
    pub state: &'static str,
    pub ok: bool,
    pub message: String,
}

fn verdict(state: &'static str, ok: bool, message: String) -> Verdict {
    Verdict { state, ok, message }
}

/// `tag=value` pairs of a DKIM or DMARC record (white space around them dropped;
/// folding white space inside `p=` removed).
fn tags(record: &str) -> Vec<(String, String)> {
    record
        .split(';')
        .filter_map(|t| {
            let (k, v) = t.split_once('=')?;
            Some((
                k.trim().to_ascii_lowercase(),
                v.split_whitespace().collect::<String>(),
            ))
        })
        .collect()
}

fn tag<'a>(tags: &'a [(String, String)], name: &str) -> Option<&'a str> {
    tags.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn short(p: &str) -> String {
    if p.len() <= 24 {
        p.to_owned()
    } else {
        format!("{}…{}", &p[..12], &p[p.len() - 8..])
    }
}

/// The DKIM record at `name` against the public key `public` (base64).
pub fn judge_dkim(name: &str, public: &str, answer: &TxtAnswer) -> Verdict {
    let records = match answer {
        TxtAnswer::Failed(e) => {
            return verdict("Error", false, format!("cannot look up TXT {name}: {e}"));
        }
        TxtAnswer::None => {
            return verdict(
                "Missing",
                false,
                format!("no TXT record at {name}: publish the record in status.keys"),
            );
        }
        TxtAnswer::Records(r) => r,
    };
    let mut seen = Vec::new();
    for r in records {
        let t = tags(r);
        let Some(p) = tag(&t, "p") else { continue };
        if p == public {
            return verdict("Published", true, format!("{name} publishes the key"));
        }
        seen.push(p.to_owned());
    }
    match seen.first() {
        Some(p) if p.is_empty() => verdict(
            "Mismatch",
            false,
            format!("{name} has a revoked key (empty p=): publish the record in status.keys"),
        ),
        Some(p) => verdict(
            "Mismatch",
            false,
            format!(
                "{name} publishes a different key (p={}, this key is p={}): replace the record with the one in status.keys",
                short(p),
                short(public)
            ),
        ),
        None => verdict(
            "Mismatch",
            false,
            format!("TXT at {name} is not a DKIM key record (no p= tag)"),
        ),
    }
}

/// The SPF record of `domain` (RFC 7208: exactly one TXT starting `v=spf1`).
pub fn judge_spf(domain: &str, answer: &TxtAnswer) -> Verdict {
    let records = match answer {
        TxtAnswer::Failed(e) => {
            return verdict("Error", false, format!("cannot look up TXT {domain}: {e}"));
        }
        TxtAnswer::None => Vec::new(),
        TxtAnswer::Records(r) => r.clone(),
    };
    let spf: Vec<&String> = records
        .iter()
        .filter(|r| {
            let l = r.to_ascii_lowercase();
            l == "v=spf1" || l.starts_with("v=spf1 ")
        })
        .collect();
    match spf.as_slice() {
        [] => verdict(
            "Missing",
            false,
            format!(
                "no SPF record (TXT \"v=spf1 …\") at {domain}: publish one that includes the relays' outbound addresses"
            ),
        ),
        [one] => verdict("Found", true, format!("{domain}: {one}")),
        many => verdict(
            "Multiple",
            false,
            format!(
                "{} SPF records at {domain}: receivers treat that as an error (RFC 7208 4.5); merge them into one",
                many.len()
            ),
        ),
    }
}

/// The DMARC record found for `domain` (at `_dmarc.DOMAIN`, else at a parent's,
/// as receivers fall back to the organisational domain).
pub fn judge_dmarc(at: &str, answer: &TxtAnswer) -> Verdict {
    let records = match answer {
        TxtAnswer::Failed(e) => {
            return verdict("Error", false, format!("cannot look up TXT {at}: {e}"));
        }
        TxtAnswer::None => Vec::new(),
        TxtAnswer::Records(r) => r.clone(),
    };
    let dmarc: Vec<&String> = records
        .iter()
        .filter(|r| r.trim_start().to_ascii_lowercase().starts_with("v=dmarc1"))
        .collect();
    match dmarc.as_slice() {
        [] => verdict(
            "Missing",
            false,
            format!("no DMARC record (TXT \"v=DMARC1; p=…\") at {at}"),
        ),
        [one] => {
            let t = tags(one);
            match tag(&t, "p").map(str::to_ascii_lowercase).as_deref() {
                Some("none") => verdict(
                    "FoundPolicyNone",
                    true,
                    format!(
                        "{at}: {one} (p=none: receivers only report failing mail; consider p=quarantine or p=reject once reports are clean)"
                    ),
                ),
                Some("quarantine") | Some("reject") => {
                    verdict("Found", true, format!("{at}: {one}"))
                }
                _ => verdict(
                    "Invalid",
                    false,
                    format!("{at}: {one} has no valid p= (none, quarantine or reject)"),
                ),
            }
        }
        many => verdict(
            "Multiple",
            false,
            format!(
                "{} DMARC records at {at}: receivers ignore them all (RFC 7489 6.6.3); keep one",
                many.len()
            ),
        ),
    }
}

/// Where DMARC is looked for: `_dmarc.DOMAIN`, then the parents' down to two labels.
pub fn dmarc_names(domain: &str) -> Vec<String> {
    let labels: Vec<&str> = domain.split('.').collect();
    (0..labels.len().saturating_sub(1))
        .map(|i| format!("_dmarc.{}", labels[i..].join(".")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(r: &[&str]) -> TxtAnswer {
        TxtAnswer::Records(r.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn dkim_verdicts() {
        let n = "s1._domainkey.example.com";
        assert!(judge_dkim(n, "AAAA", &recs(&["v=DKIM1; k=rsa; p=AAAA"])).ok);
        assert!(judge_dkim(n, "AAAA", &recs(&["v=DKIM1; k=rsa; p=AA AA"])).ok);
        let m = judge_dkim(n, "AAAA", &recs(&["v=DKIM1; k=rsa; p=BBBB"]));
        assert_eq!(m.state, "Mismatch");
        assert!(m.message.contains("different key"), "{}", m.message);
        assert_eq!(judge_dkim(n, "AAAA", &TxtAnswer::None).state, "Missing");
        assert_eq!(
            judge_dkim(n, "AAAA", &recs(&["v=DKIM1; p="])).state,
            "Mismatch"
        );
    }

    #[test]
    fn spf_and_dmarc_verdicts() {
        assert_eq!(
            judge_spf("e.com", &recs(&["google-site=x"])).state,
            "Missing"
        );
        assert_eq!(judge_spf("e.com", &recs(&["v=spf1 -all"])).state, "Found");
        assert_eq!(
            judge_spf("e.com", &recs(&["v=spf1 -all", "v=spf1 mx -all"])).state,
            "Multiple"
        );
        let d = judge_dmarc("_dmarc.e.com", &recs(&["v=DMARC1; p=none"]));
        assert!(d.ok && d.state == "FoundPolicyNone", "{d:?}");
        assert_eq!(
            judge_dmarc("_dmarc.e.com", &recs(&["v=DMARC1; rua=mailto:x@e.com"])).state,
            "Invalid"
        );
        assert_eq!(
            dmarc_names("a.b.example.com"),
            [
                "_dmarc.a.b.example.com",
                "_dmarc.b.example.com",
                "_dmarc.example.com"
            ]
        );
    }
}
