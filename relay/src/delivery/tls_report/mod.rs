//! SMTP TLS reporting (RFC 8460): every outbound TLS session to an MX host is
//! counted, per recipient (policy) domain and report period, as a success or as a
//! failure of one RFC 8460 result type; once a period is over, one relay of the
//! cluster builds each domain's aggregate report and sends it to the `rua`
//! addresses of its `_smtp._tls` TXT record ([`send`]).
//!
//! Counting is cheap on the delivery path: a session adds to a map in this
//! process ([`TlsReporter::record`]); a background task adds the map to the shared
//! counters ([`store`]) about once a second, one store call per domain.

pub mod report;
pub mod send;
pub mod store;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;

use self::store::ReportStore;
use crate::delivery::tls_policy::Decision;
use crate::delivery::tls_policy::mta_sts::Mode;

/// `policy-type` of RFC 8460 §4.4.
pub const POLICY_STS: &str = "sts";
pub const POLICY_TLSA: &str = "tlsa";
pub const POLICY_NONE: &str = "no-policy-found";

/// RFC 8460 §4.3 result types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureType {
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    TlsaInvalid,
    DnssecInvalid,
    DaneRequired,
    StsPolicyFetchError,
    StsPolicyInvalid,
    StsWebpkiInvalid,
}

impl FailureType {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureType::StarttlsNotSupported => "starttls-not-supported",
            FailureType::CertificateHostMismatch => "certificate-host-mismatch",
            FailureType::CertificateExpired => "certificate-expired",
            FailureType::CertificateNotTrusted => "certificate-not-trusted",
            FailureType::ValidationFailure => "validation-failure",
            FailureType::TlsaInvalid => "tlsa-invalid",
            FailureType::DnssecInvalid => "dnssec-invalid",
            FailureType::DaneRequired => "dane-required",
            FailureType::StsPolicyFetchError => "sts-policy-fetch-error",
            FailureType::StsPolicyInvalid => "sts-policy-invalid",
            FailureType::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }

    /// The type of a certificate check's error text (rustls' wording).
    pub fn of_certificate_error(e: &str) -> Self {
        let e = e.to_ascii_lowercase();
        if e.contains("expired") {
            FailureType::CertificateExpired
        } else if e.contains("notvalidforname") || e.contains("not valid for name") {
            FailureType::CertificateHostMismatch
        } else if e.contains("unknownissuer")
            || e.contains("unknown issuer")
            || e.contains("self-signed")
            || e.contains("selfsigned")
        {
            FailureType::CertificateNotTrusted
        } else {
            FailureType::ValidationFailure
        }
    }

    /// The type of a DANE handshake failure: a DANE-TA chain's name or dates, else
    /// no record matching the certificate (a general validation failure: the
    /// records themselves were valid).
    pub fn of_dane_error(e: &str) -> Self {
        match Self::of_certificate_error(e) {
            t @ (FailureType::CertificateHostMismatch | FailureType::CertificateExpired) => t,
            _ => FailureType::ValidationFailure,
        }
    }

    /// The type of a DANE lookup that made the host unusable (bogus or failed
    /// DNSSEC answers: §4.3.2.1 `dnssec-invalid`).
    pub fn of_dane_lookup(why: &str) -> Self {
        if why.contains("bogus") || why.contains("lookup") {
            FailureType::DnssecInvalid
        } else {
            FailureType::TlsaInvalid
        }
    }
}

/// The policy a session ran under, as a report states it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDesc {
    /// `sts`, `tlsa` or `no-policy-found`.
    pub policy_type: String,
    /// The policy's text, one string per line (`policy-string`).
    #[serde(default)]
    pub strings: Vec<String>,
    /// MX patterns of an MTA-STS policy, or the MX host a TLSA policy belongs to
    /// (`mx-host`).
    #[serde(default)]
    pub mx_host: Vec<String>,
}

impl PolicyDesc {
    /// The key its counters are kept under: the policy type, and for TLSA the MX
    /// host too (each MX host publishes its own records, so one domain can have
    /// several TLSA policies in one report).
    pub fn key(&self) -> String {
        match self.mx_host.first() {
            Some(mx) if self.policy_type == POLICY_TLSA => format!("{POLICY_TLSA}/{mx}"),
            _ => self.policy_type.clone(),
        }
    }

    /// A TLSA policy of `mx` with `records` (`3 1 1 <hex>`, RFC 8460 §4.4:
    /// the TLSA records as presented).
    pub fn tlsa(mx: &str, records: &[String]) -> Self {
        PolicyDesc {
            policy_type: POLICY_TLSA.into(),
            strings: records.to_vec(),
            mx_host: vec![mx.trim_end_matches('.').to_ascii_lowercase()],
        }
    }
}

/// What DANE said about the host of a session (RFC 7672 §2.2).
#[derive(Debug, Clone, Copy)]
pub enum DaneSession<'a> {
    /// Usable TLSA records (presentation form): the certificate had to match one.
    Usable(&'a [String]),
    /// TLSA records, none usable: TLS was mandatory, the certificate unchecked.
    Unusable(&'a [String]),
}

/// A failed session's `failure-details` key (RFC 8460 §4.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FailureDetail {
    #[serde(rename = "result-type")]
    pub result_type: String,
    #[serde(rename = "sending-mta-ip", skip_serializing_if = "Option::is_none")]
    pub sending_mta_ip: Option<String>,
    #[serde(
        rename = "receiving-mx-hostname",
        skip_serializing_if = "Option::is_none"
    )]
    pub receiving_mx_hostname: Option<String>,
    #[serde(rename = "receiving-mx-helo", skip_serializing_if = "Option::is_none")]
    pub receiving_mx_helo: Option<String>,
    #[serde(rename = "receiving-ip", skip_serializing_if = "Option::is_none")]
    pub receiving_ip: Option<String>,
}

/// One session to one MX host, as seen by the delivery code.
#[derive(Debug, Clone, Default)]
pub struct Session<'a> {
    pub mx: &'a str,
    pub sending_ip: Option<IpAddr>,
    pub receiving_ip: Option<IpAddr>,
    /// The server's EHLO name, when it answered EHLO.
    pub helo: Option<&'a str>,
    /// The session reached EHLO (a greeting refused or a dropped connection is
    /// no TLS session to report).
    pub ehlo: bool,
    /// TLS was established.
    pub tls: bool,
    /// The handshake failed with this error.
    pub handshake_error: Option<&'a str>,
    /// What checking the certificate said (opportunistic and `testing` sessions).
    pub verified: Option<&'a Result<(), String>>,
    /// The host's TLSA records, when DANE set this session's TLS (it wins over
    /// MTA-STS: the session is reported under the `tlsa` policy).
    pub dane: Option<DaneSession<'a>>,
}

/// The policy and verdict of a session under `decision` (`None`: nothing to
/// report, e.g. a relay host or a configured policy).
pub fn classify(decision: &Decision, s: &Session<'_>) -> Option<(PolicyDesc, Option<FailureType>)> {
    if !matches!(
        decision.source,
        "mta-sts" | "mta-sts-relaxed" | "opportunistic"
    ) {
        return None;
    }
    let tls_verdict = |checked: bool| -> Option<FailureType> {
        if let Some(e) = s.handshake_error {
            return Some(FailureType::of_certificate_error(e));
        }
        if !s.tls {
            return Some(FailureType::StarttlsNotSupported);
        }
        match s.verified {
            Some(Err(e)) if checked => Some(FailureType::of_certificate_error(e)),
            _ => None,
        }
    };
    if !s.ehlo && s.handshake_error.is_none() {
        return None;
    }
    if let Some(dane) = s.dane {
        let (records, usable) = match dane {
            DaneSession::Usable(r) => (r, true),
            DaneSession::Unusable(r) => (r, false),
        };
        let verdict = if let Some(e) = s.handshake_error {
            Some(FailureType::of_dane_error(e))
        } else if !s.tls {
            Some(FailureType::StarttlsNotSupported)
        } else if !usable {
            // §4.3.2.1: none of the records was valid (for SMTP).
            Some(FailureType::TlsaInvalid)
        } else {
            None
        };
        return Some((PolicyDesc::tlsa(s.mx, records), verdict));
    }
    if let Some(c) = decision
        .sts
        .as_ref()
        .filter(|c| c.policy.mode != Mode::None)
    {
        let p = &c.policy;
        let mut strings = vec![
            "version: STSv1".to_owned(),
            format!("mode: {}", p.mode.as_str()),
        ];
        strings.extend(p.mx.iter().map(|m| format!("mx: {m}")));
        strings.push(format!("max_age: {}", p.max_age));
        let desc = PolicyDesc {
            policy_type: POLICY_STS.into(),
            strings,
            mx_host: p.mx.clone(),
        };
        let verdict = if !p.allows_mx(s.mx) {
            Some(FailureType::ValidationFailure)
        } else {
            tls_verdict(true)
        };
        return Some((desc, verdict));
    }
    // A published policy that could not be used: a policy failure (RFC 8460
    // §4.3.2.2), whatever the session then did.
    if let Some(note) = &decision.note
        && note.starts_with("MTA-STS")
        && !note.contains("TLS-Required: No")
    {
        let t = if note.contains(": TLS: ") {
            FailureType::StsWebpkiInvalid
        } else if note.contains("TXT record") || note.contains(": policy: ") {
            FailureType::StsPolicyInvalid
        } else {
            FailureType::StsPolicyFetchError
        };
        let desc = PolicyDesc {
            policy_type: POLICY_STS.into(),
            ..Default::default()
        };
        return Some((desc, Some(t)));
    }
    let desc = PolicyDesc {
        policy_type: POLICY_NONE.into(),
        ..Default::default()
    };
    Some((desc, tls_verdict(false)))
}

/// What one process counted for one domain in one period.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counts {
    /// Hash field → increment (see [`store`] for the field names).
    pub add: HashMap<String, i64>,
    /// Hash field → value (policy descriptions).
    pub set: HashMap<String, String>,
}

/// Counts sessions and hands them to the shared store.
pub struct TlsReporter {
    period: Duration,
    store: Arc<dyn ReportStore>,
    pending: Mutex<HashMap<(u64, String), Counts>>,
}

impl std::fmt::Debug for TlsReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReporter")
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

/// How often counts go to the shared store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

impl TlsReporter {
    pub fn new(period: Duration, store: Arc<dyn ReportStore>) -> Arc<Self> {
        Arc::new(TlsReporter {
            period,
            store,
            pending: Mutex::new(HashMap::new()),
        })
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    pub fn store(&self) -> &Arc<dyn ReportStore> {
        &self.store
    }

    /// The start (Unix seconds) of the period `unix_ms` falls in.
    pub fn period_start(&self, unix_ms: u64) -> u64 {
        let p = self.period.as_secs().max(1);
        unix_ms / 1000 / p * p
    }

    /// Counts one session with `domain`'s policy `policy`: a success (`failure`
    /// `None`) or a failure with its details. DANE and MTA-STS call this alike.
    pub fn record(&self, domain: &str, policy: &PolicyDesc, failure: Option<FailureDetail>) {
        let start = self.period_start(crate::queue::now_ms());
        let t = &policy.key();
        let mut map = self.pending.lock().unwrap();
        // Bounded: a store that stays down must not grow this without end.
        if map.len() > 100_000 && !map.contains_key(&(start, domain.to_owned())) {
            return;
        }
        let c = map.entry((start, domain.to_owned())).or_default();
        // A TLSA policy seen only through failed lookups has no records to
        // state; it must not overwrite one that has them (the report names the
        // type and host from the key).
        if !(policy.policy_type == POLICY_TLSA && policy.strings.is_empty()) {
            c.set
                .entry(store::policy_field(t))
                .or_insert_with(|| serde_json::to_string(policy).expect("a policy serialises"));
        }
        match failure {
            None => *c.add.entry(store::success_field(t)).or_default() += 1,
            Some(d) => {
                *c.add.entry(store::failure_field(t)).or_default() += 1;
                *c.add.entry(store::detail_field(t, &d)).or_default() += 1;
            }
        }
    }

    /// Records a delivery session under `decision` (see [`classify`]); returns
    /// the policy type and whether the session succeeded, for the metrics.
    pub fn record_session(
        &self,
        domain: &str,
        decision: &Decision,
        s: &Session<'_>,
    ) -> Option<(String, bool)> {
        let (policy, verdict) = classify(decision, s)?;
        let failure = verdict.map(|t| FailureDetail {
            result_type: t.as_str().to_owned(),
            sending_mta_ip: s.sending_ip.map(|i| i.to_string()),
            receiving_mx_hostname: Some(s.mx.trim_end_matches('.').to_owned()),
            receiving_mx_helo: s.helo.map(str::to_owned),
            receiving_ip: s.receiving_ip.map(|i| i.to_string()),
        });
        let ok = failure.is_none();
        self.record(domain, &policy, failure);
        Some((policy.policy_type, ok))
    }

    /// Records an MX host DANE made unusable before any session (bogus or
    /// failed DNSSEC lookups, `why`): a failed session of its `tlsa` policy.
    pub fn record_dane_refusal(&self, domain: &str, mx: &str, why: &str) {
        let policy = PolicyDesc::tlsa(mx, &[]);
        let failure = FailureDetail {
            result_type: FailureType::of_dane_lookup(why).as_str().to_owned(),
            receiving_mx_hostname: policy.mx_host.first().cloned(),
            ..Default::default()
        };
        self.record(domain, &policy, Some(failure));
    }

    /// Adds what was counted to the shared store; what could not be added is kept
    /// for the next flush.
    pub async fn flush(&self) {
        let batch: Vec<(u64, String, Counts)> = self
            .pending
            .lock()
            .unwrap()
            .drain()
            .map(|((s, d), c)| (s, d, c))
            .collect();
        if batch.is_empty() {
            return;
        }
        let ttl = self.period * 3 + Duration::from_secs(3600);
        let results = match self.store.add_batch(&batch, ttl).await {
            Ok(r) => r,
            Err(e) => vec![Err(e); batch.len()],
        };
        for ((start, domain, counts), result) in batch.into_iter().zip(results) {
            if let Err(e) = result {
                warn!(%domain, error = %e, "TLS report counters not stored; retrying");
                let mut map = self.pending.lock().unwrap();
                let c = map.entry((start, domain)).or_default();
                for (k, v) in counts.add {
                    *c.add.entry(k).or_default() += v;
                }
                for (k, v) in counts.set {
                    c.set.entry(k).or_insert(v);
                }
            }
        }
    }

    /// Flushes every [`FLUSH_EVERY`] until the process ends.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.flush().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::tls_policy::cache::{Cached, Lookup};
    use crate::delivery::tls_policy::mta_sts::Policy;

    fn sts(mode: Mode) -> Decision {
        Decision::from_sts(Lookup {
            policy: Some(Arc::new(Cached {
                id: "id1".into(),
                policy: Policy {
                    mode,
                    mx: vec!["mx.a.test".into()],
                    max_age: 600,
                },
                expires_at_ms: u64::MAX,
            })),
            note: None,
        })
    }

    fn session<'a>(
        mx: &'a str,
        tls: bool,
        verified: Option<&'a Result<(), String>>,
    ) -> Session<'a> {
        Session {
            mx,
            ehlo: true,
            tls,
            verified,
            ..Default::default()
        }
    }

    #[test]
    fn sts_sessions_are_classified_by_rfc8460_result_types() {
        let d = sts(Mode::Enforce);
        let ok = Ok(());
        let (p, v) = classify(&d, &session("mx.a.test", true, Some(&ok))).unwrap();
        assert_eq!(p.policy_type, "sts");
        assert_eq!(
            p.strings,
            [
                "version: STSv1",
                "mode: enforce",
                "mx: mx.a.test",
                "max_age: 600"
            ]
        );
        assert_eq!(p.mx_host, ["mx.a.test"]);
        assert_eq!(v, None);
        let (_, v) = classify(&d, &session("mx.a.test", false, None)).unwrap();
        assert_eq!(v, Some(FailureType::StarttlsNotSupported));
        let hs = Session {
            handshake_error: Some("invalid peer certificate: NotValidForName"),
            ..session("mx.a.test", false, None)
        };
        assert_eq!(
            classify(&d, &hs).unwrap().1,
            Some(FailureType::CertificateHostMismatch)
        );
        let t = sts(Mode::Testing);
        let bad = Err("invalid peer certificate: UnknownIssuer".to_owned());
        assert_eq!(
            classify(&t, &session("mx.a.test", true, Some(&bad)))
                .unwrap()
                .1,
            Some(FailureType::CertificateNotTrusted)
        );
        assert_eq!(
            classify(&t, &session("mx.b.test", true, Some(&ok)))
                .unwrap()
                .1,
            Some(FailureType::ValidationFailure)
        );
        let exp = Err(
            "invalid peer certificate: certificate expired: verification time 1 > 0".to_owned(),
        );
        assert_eq!(
            classify(&t, &session("mx.a.test", true, Some(&exp)))
                .unwrap()
                .1,
            Some(FailureType::CertificateExpired)
        );
    }

    #[test]
    fn no_policy_and_policy_failures() {
        let d = Decision::from_sts(Lookup::default());
        let bad = Err("UnknownIssuer".to_owned());
        let (p, v) = classify(&d, &session("mx.x.test", true, Some(&bad))).unwrap();
        assert_eq!((p.policy_type.as_str(), v), ("no-policy-found", None));
        assert_eq!(
            classify(&d, &session("mx.x.test", false, None)).unwrap().1,
            Some(FailureType::StarttlsNotSupported)
        );
        let failed = Decision::from_sts(Lookup {
            policy: None,
            note: Some("MTA-STS policy fetch failed (no policy cached): HTTP 404".into()),
        });
        let (p, v) = classify(&failed, &session("mx.x.test", true, None)).unwrap();
        assert_eq!(
            (p.policy_type.as_str(), v),
            ("sts", Some(FailureType::StsPolicyFetchError))
        );
        let webpki = Decision::from_sts(Lookup {
            policy: None,
            note: Some("MTA-STS policy fetch failed (x): https://mta-sts.x.test/.well-known/mta-sts.txt: TLS: invalid peer certificate".into()),
        });
        assert_eq!(
            classify(&webpki, &session("mx.x.test", true, None))
                .unwrap()
                .1,
            Some(FailureType::StsWebpkiInvalid)
        );
        // Configured policies and sessions that never reached EHLO: not reported.
        assert!(
            classify(
                &Decision::fixed(crate::config::TlsPolicy::Required),
                &session("m", true, None)
            )
            .is_none()
        );
        let greeting = Session {
            ehlo: false,
            ..session("mx.x.test", false, None)
        };
        assert!(classify(&d, &greeting).is_none());
    }

    #[test]
    fn dane_sessions_are_tlsa_policies_with_their_own_failure_types() {
        // An MTA-STS enforce domain whose MX host has TLSA records: DANE wins.
        let d = sts(Mode::Enforce);
        let records = vec!["3 1 1 AB".to_owned()];
        let dane = |usable: bool| {
            Some(if usable {
                DaneSession::Usable(&records)
            } else {
                DaneSession::Unusable(&records)
            })
        };
        let ok = Ok(());
        let s = Session {
            dane: dane(true),
            ..session("MX.b.test.", true, Some(&ok))
        };
        let (p, v) = classify(&d, &s).unwrap();
        assert_eq!(p.policy_type, "tlsa");
        assert_eq!(p.strings, ["3 1 1 AB"]);
        assert_eq!(p.mx_host, ["mx.b.test"]);
        assert_eq!(p.key(), "tlsa/mx.b.test");
        assert_eq!(v, None, "not an MTA-STS validation failure");
        let mismatch = Session {
            handshake_error: Some(
                "invalid peer certificate: Other(DANE: no TLSA record (3 1 1) matches the server's certificate chain)",
            ),
            ..s.clone()
        };
        assert_eq!(
            classify(&d, &mismatch).unwrap().1,
            Some(FailureType::ValidationFailure)
        );
        let ta_name = Session {
            handshake_error: Some(
                "DANE: a DANE-TA record matches a certificate of the chain, but the leaf does not verify against it: invalid peer certificate: NotValidForName",
            ),
            ..s.clone()
        };
        assert_eq!(
            classify(&d, &ta_name).unwrap().1,
            Some(FailureType::CertificateHostMismatch)
        );
        let unusable = Session {
            dane: dane(false),
            ..s.clone()
        };
        assert_eq!(
            classify(&d, &unusable).unwrap().1,
            Some(FailureType::TlsaInvalid)
        );
        let plain = Session {
            tls: false,
            ..s.clone()
        };
        assert_eq!(
            classify(&d, &plain).unwrap().1,
            Some(FailureType::StarttlsNotSupported)
        );
        assert_eq!(
            FailureType::of_dane_lookup(
                "DANE: TLSA lookup of _25._tcp.mx.b.test. is bogus (DNSSEC)"
            ),
            FailureType::DnssecInvalid
        );
    }

    #[tokio::test]
    async fn dane_refusals_and_sessions_share_one_tlsa_policy_per_mx() {
        let store = Arc::new(store::MemoryReports::default());
        let r = TlsReporter::new(Duration::from_secs(60), store.clone());
        let records = vec!["3 1 1 AB".to_owned()];
        r.record("a.test", &PolicyDesc::tlsa("mx1.a.test", &records), None);
        r.flush().await;
        // A later refusal does not wipe the records stated by the session.
        r.record_dane_refusal(
            "a.test",
            "mx1.a.test",
            "DANE: address records of mx1.a.test are bogus (DNSSEC)",
        );
        r.record_dane_refusal(
            "a.test",
            "mx2.a.test",
            "DANE: TLSA lookup of _25._tcp.mx2.a.test. failed: timeout",
        );
        r.flush().await;
        let start = r.period_start(crate::queue::now_ms());
        let fields = store.fields(start, "a.test").await.unwrap();
        let h = report::Header {
            organization_name: "O".into(),
            contact_info: "c@x.test".into(),
            submitter: "x.test".into(),
            start,
            end: start + 60,
        };
        let rep = report::build(&h, "a.test", &fields).unwrap();
        let pols = rep["policies"].as_array().unwrap();
        assert_eq!(pols.len(), 2, "{rep}");
        let of = |mx: &str| {
            pols.iter()
                .find(|p| p["policy"]["mx-host"][0] == mx)
                .unwrap_or_else(|| panic!("{mx}: {rep}"))
        };
        let p1 = of("mx1.a.test");
        assert_eq!(p1["policy"]["policy-type"], "tlsa");
        assert_eq!(p1["policy"]["policy-string"][0], "3 1 1 AB");
        assert_eq!(p1["summary"]["total-successful-session-count"], 1);
        assert_eq!(p1["summary"]["total-failure-session-count"], 1);
        assert_eq!(p1["failure-details"][0]["result-type"], "dnssec-invalid");
        let p2 = of("mx2.a.test");
        assert_eq!(p2["policy"]["policy-type"], "tlsa");
        assert!(p2["policy"].get("policy-string").is_none(), "{p2}");
        assert_eq!(
            p2["failure-details"][0]["receiving-mx-hostname"],
            "mx2.a.test"
        );
    }

    #[tokio::test]
    async fn counts_accumulate_per_period_and_domain() {
        let store = Arc::new(store::MemoryReports::default());
        let r = TlsReporter::new(Duration::from_secs(60), store.clone());
        let p = PolicyDesc {
            policy_type: "sts".into(),
            ..Default::default()
        };
        r.record("a.test", &p, None);
        r.record("a.test", &p, None);
        let d = FailureDetail {
            result_type: "certificate-expired".into(),
            receiving_mx_hostname: Some("mx.a.test".into()),
            ..Default::default()
        };
        r.record("a.test", &p, Some(d.clone()));
        r.flush().await;
        r.record("a.test", &p, Some(d));
        r.flush().await;
        let start = r.period_start(crate::queue::now_ms());
        let fields = store.fields(start, "a.test").await.unwrap();
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        assert_eq!(get(&store::success_field("sts")), "2");
        assert_eq!(get(&store::failure_field("sts")), "2");
        assert_eq!(
            store.domains(start).await.unwrap(),
            vec!["a.test".to_owned()]
        );
    }
}
