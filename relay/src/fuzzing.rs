//! The bodies of the relay's fuzz targets in `fuzz/` (the protocol ones are in
//! `mailrelay_smtp::fuzzing`), kept here so that the test suite replays every
//! committed corpus file through the same code without a nightly toolchain.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::RelayConfig;
use crate::delivery::mx::MAX_MX_HOSTS;
use crate::quota::config::QuotaConfig;
use crate::quota::egress::{Destination, Egress};
use crate::quota::ingress::model::{IngressFacts, QuotaSet};
use crate::quota::ingress::redis::{bucket_field, counter_key, index_key, quota_id, window_tag};

/// The targets and their bodies, by name (and corpus directory).
pub const TARGETS: &[(&str, mailrelay_smtp::fuzzing::Body)] =
    &[("config", config), ("quota_keys", quota_keys)];

/// Longest config text tried: real configs are a few KiB, and YAML alias
/// expansion makes time grow with size.
const MAX_CONFIG: usize = 64 << 10;

/// The config loader: what it accepts is valid and survives a write and a re-read
/// unchanged; what it refuses is refused with a message naming a field.
pub fn config(input: &[u8]) {
    if input.len() > MAX_CONFIG {
        return;
    }
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    match RelayConfig::from_yaml(text) {
        Ok(cfg) => {
            cfg.validate()
                .expect("from_yaml returned an invalid config");
            let written = serde_norway::to_string(&cfg).expect("a loaded config serializes");
            let again = RelayConfig::from_yaml(&written)
                .unwrap_or_else(|e| panic!("written config does not load: {e}\n{written}"));
            assert_eq!(again, cfg, "{written}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

const PREFIX: &str = "mailrelay";

/// Quotas with every key kind, so every way a sender-controlled value becomes a
/// Redis key or argument is exercised.
fn quotas() -> &'static (QuotaSet, Egress) {
    static Q: OnceLock<(QuotaSet, Egress)> = OnceLock::new();
    Q.get_or_init(|| {
        let yaml = "\
- {name: auto, direction: ingress, limits: [10/1m, 100/1h]}
- {name: sender, direction: ingress, key: sender, unit: recipients, limits: [5/1m], match: {recipient_domains: ['*.example', 'b?.test']}}
- {name: domain, direction: ingress, key: sender_domain, unit: bytes, limits: [1000000/1d], match: {senders: ['*.example', '<>', 'x*@*']}}
- {name: user, direction: ingress, key: auth_user, limits: [3/1s], match: {auth_users: ['*']}}
- {name: ip, direction: ingress, key: client_ip, limits: [1/1m], match: {client_networks: ['0.0.0.0/0', '::/0']}}
- {name: shared, direction: ingress, scope: shared, limits: [50/1m]}
- {name: eg-domain, direction: egress, limits: [10/1s], match: {destination_domains: ['*']}}
- {name: eg-site, direction: egress, key: mx_site, limits: [10/1s], max_connections: 3}
- {name: eg-hosts, direction: egress, limits: [1/1s], match: {mx_hosts: ['*.example', 'mx?.*']}}
";
        let q: Vec<QuotaConfig> = serde_norway::from_str(yaml).expect("fuzz quotas parse");
        crate::quota::config::validate(&q).expect("fuzz quotas are valid");
        (
            QuotaSet::compile(&q),
            Egress::embedded(&q, Duration::from_secs(30)),
        )
    })
}

/// Redis Cluster's hash tag of a key: the text between the first `{` and the next
/// `}`, if not empty; all keys of one script call must share it.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

/// The quota keys and script arguments built from what a client controls (sender,
/// AUTH user, recipients, the destination's domain and MX names): case never buys
/// a fresh key, and no value can move a key out of the quota's cluster slot.
pub fn quota_keys(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let mut fields = text.split('\0');
    let sender = fields.next().unwrap_or_default();
    let auth_user = fields.next().filter(|u| !u.is_empty());
    let ip: IpAddr = fields
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(IpAddr::from([192, 0, 2, 1]));
    let rcpts: Vec<&str> = fields.next().unwrap_or_default().split(',').collect();
    let domain = fields.next();
    // Delivery never routes more MX hosts than the resolver keeps; past that, a
    // long input only spends the run sorting thousands of empty names (it was
    // three fifths of the target's time).
    let hosts: Vec<String> = fields.take(MAX_MX_HOSTS).map(str::to_owned).collect();
    let (set, egress) = quotas();

    let facts = IngressFacts {
        sender,
        auth_user,
        client_ip: ip,
    };
    let applies = set.ingress(&facts, &rcpts, input.len() as u64);
    let (up_sender, up_user) = (
        sender.to_ascii_uppercase(),
        auth_user.map(str::to_ascii_uppercase),
    );
    let shouted = IngressFacts {
        sender: &up_sender,
        auth_user: up_user.as_deref(),
        client_ip: ip,
    };
    assert_eq!(
        set.ingress(&shouted, &rcpts, input.len() as u64),
        applies,
        "case changed the quota keys"
    );
    for a in &applies {
        let q = &set.quotas[a.index];
        assert!(a.cost <= (input.len() as u64).max(rcpts.len() as u64).max(1));
        let key = counter_key(PREFIX, false, &a.key);
        assert_eq!(
            hash_tag(&key),
            Some(format!("{PREFIX}:quota").as_str()),
            "{key}"
        );
        let key = counter_key(PREFIX, true, &a.key);
        let index = index_key(PREFIX, true, &a.key);
        assert!(hash_tag(&key).is_some(), "{key}");
        assert_eq!(hash_tag(&key), hash_tag(&index), "{key}");
        assert!(key.ends_with(&a.key));
        let qid = quota_id(q.name());
        assert!(qid < 1 << 46 && (qid as f64) as u64 == qid);
        for w in &q.windows {
            let t = window_tag(q.name(), w);
            assert!(t < 1 << 46);
            assert_eq!(bucket_field(q.name(), w, -1), format!("{t}:-1"));
        }
    }

    let dest = Destination {
        domain,
        mx_hosts: &hosts,
        smarthost: false,
        relay_host: false,
    };
    let route = egress.route(&dest);
    let up_domain = domain.map(|d| format!("{}.", d.to_ascii_uppercase()));
    let up_hosts: Vec<String> = hosts
        .iter()
        .rev()
        .map(|h| format!("{}.", h.to_ascii_uppercase()))
        .collect();
    let same = egress.route(&Destination {
        domain: up_domain.as_deref(),
        mx_hosts: &up_hosts,
        ..dest
    });
    assert_eq!(route, same, "case, order or a root dot changed the route");
    for k in &route.keys {
        assert!(!k.key.chars().any(|c| c.is_ascii_uppercase()), "{}", k.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed corpus file passes its target (see `fuzz/`).
    #[test]
    fn every_corpus_file_passes_its_target() {
        for (name, body) in TARGETS {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus")
                .join(name);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            assert!(files.len() >= 10, "{name}: only {} seeds", files.len());
            for path in files {
                let bytes = std::fs::read(&path).unwrap();
                let r = std::panic::catch_unwind(|| body(&bytes));
                assert!(r.is_ok(), "{name}: {} fails", path.display());
            }
        }
    }
}
