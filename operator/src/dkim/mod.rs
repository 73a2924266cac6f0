//! DKIM for SenderDomains: keys ([`keys`]), DNS checks ([`dns`]), their life
//! cycle ([`plan`]), and the key bundle a MailRelay's pods mount ([`bundle`]).
//!
//! The bundle is a Secret `NAME-dkim` per MailRelay holding the relay's
//! `keys.yaml` and one PEM file per signing key. The pods mount it as a whole
//! directory (no subPath), so the kubelet updates the files in place and the
//! relay re-reads them: a key change never touches the pod template.

pub mod dns;
pub mod keys;
pub mod plan;

use std::collections::BTreeMap;

use serde::Serialize;

/// Where relay pods mount their bundle (`dkim.keys_dir`).
pub const DIR: &str = "/var/run/mailrelay/dkim";
/// The index file in the bundle.
pub const KEYS_FILE: &str = "keys.yaml";

/// Name of the bundle Secret of MailRelay `relay`.
pub fn bundle_secret_name(relay: &str) -> String {
    format!("{relay}-dkim")
}

/// One signing key for the bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleKey {
    pub domain: String,
    pub include_subdomains: bool,
    pub selector: String,
    pub algorithm: &'static str,
    /// PKCS#8 PEM.
    pub pem: String,
}

#[derive(Serialize)]
struct KeysYaml<'a> {
    domains: Vec<DomainYaml<'a>>,
}

#[derive(Serialize)]
struct DomainYaml<'a> {
    domain: &'a str,
    include_subdomains: bool,
    selectors: Vec<SelectorYaml<'a>>,
}

#[derive(Serialize)]
struct SelectorYaml<'a> {
    selector: &'a str,
    algorithm: &'a str,
    key_file: String,
}

/// The file a key is stored as: `DOMAIN.SELECTOR.pem` (valid as a Secret key).
pub fn key_file(domain: &str, selector: &str) -> String {
    format!("{domain}.{selector}.pem")
}

/// The bundle's data: `keys.yaml` and the PEM files. Keys of one domain (from
/// several SenderDomains) share its entry; a selector given twice for one domain
/// keeps the first (the callers order SenderDomains by name).
pub fn bundle(keys: &[BundleKey]) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    let mut domains: Vec<DomainYaml<'_>> = Vec::new();
    for k in keys {
        let file = key_file(&k.domain, &k.selector);
        if data.contains_key(&file) {
            continue;
        }
        let entry = match domains.iter_mut().position(|d| d.domain == k.domain) {
            Some(i) => &mut domains[i],
            None => {
                domains.push(DomainYaml {
                    domain: &k.domain,
                    include_subdomains: k.include_subdomains,
                    selectors: Vec::new(),
                });
                domains.last_mut().expect("just pushed")
            }
        };
        entry.include_subdomains |= k.include_subdomains;
        entry.selectors.push(SelectorYaml {
            selector: &k.selector,
            algorithm: k.algorithm,
            key_file: file.clone(),
        });
        data.insert(file, k.pem.clone());
    }
    let index = serde_norway::to_string(&KeysYaml { domains }).expect("keys.yaml serialises");
    data.insert(KEYS_FILE.to_owned(), index);
    data
}
