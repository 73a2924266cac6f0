//! DKIM metrics, registered into the relay's registry ([`crate::metrics::Metrics::registry_mut`]) at start-up.
//! The `domain` label takes configured names only (a key's domain, an
//! `unsigned_overrides` glob) or `other`, so clients cannot mint series.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = [(&'static str, String); 2];

#[derive(Debug, Clone, Default)]
pub struct DkimMetrics {
    messages: Family<Labels, Counter>,
    signatures: Family<[(&'static str, &'static str); 1], Counter>,
    reloads: Family<[(&'static str, &'static str); 1], Counter>,
    keys: Gauge,
}

impl DkimMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = DkimMetrics::default();
        registry.register(
            "dkim_messages",
            "Messages accepted for relay by DKIM result (signed, unsigned, refused) and From: domain (configured domain, override glob, or other)",
            m.messages.clone(),
        );
        registry.register(
            "dkim_signatures",
            "DKIM signatures added, by algorithm",
            m.signatures.clone(),
        );
        registry.register(
            "dkim_key_reloads",
            "Reloads of the DKIM keys directory, by result (ok, error: the previous keys stay in use)",
            m.reloads.clone(),
        );
        registry.register("dkim_keys", "DKIM signing keys loaded", m.keys.clone());
        m
    }

    pub fn message(&self, result: &'static str, domain: &str) {
        self.messages
            .get_or_create(&[("result", result.to_owned()), ("domain", domain.to_owned())])
            .inc();
    }

    pub fn signature(&self, algorithm: &'static str) {
        self.signatures
            .get_or_create(&[("algorithm", algorithm)])
            .inc();
    }

    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&[("result", result)]).inc();
    }

    pub fn keys_loaded(&self, n: usize) {
        self.keys.set(n as i64);
    }
}
