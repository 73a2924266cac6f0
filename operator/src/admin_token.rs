//! The admin token of a MailRelay: a Secret `NAME-admin-token` the operator
//! generates, mounts into the relay pods (`admin.token_file`), sends on its own
//! admin API calls, and rotates on request. `kubectl mailrelay` reads the same
//! Secret with the user's credentials, so Kubernetes RBAC on that one Secret
//! decides who may use a relay's admin API.
//!
//! The Secret's key `token` holds one token per line: the current one first and,
//! for [`ROTATION_GRACE`] after a rotation, the previous one second. The relay
//! accepts every line; clients send the first (and try the second when the first
//! is refused: the kubelet takes up to a minute or so to update a mounted Secret).
//!
//! Pure: the reconciler fetches the Secret and writes what [`plan`] decides.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;

/// The key of the Secret holding the token(s).
pub const KEY: &str = "token";
/// Where the relay pods mount the Secret (a whole-directory mount, so the kubelet
/// updates the file in place on rotation and the relay re-reads it).
pub const DIR: &str = "/var/run/mailrelay/admin-token";
/// The header clients send the token in through the API server's service proxy,
/// which keeps `Authorization` for itself.
pub const HEADER: &str = mailrelay::admin::auth::TOKEN_HEADER;
/// On a MailRelay: set it to a new value (any) to rotate the admin token, as
/// `kubectl rollout restart` does with its annotation:
/// `kubectl annotate mailrelay NAME mailrelay.io/rotate-admin-token="$(date +%s)" --overwrite`.
pub const ROTATE_ANNOTATION: &str = "mailrelay.io/rotate-admin-token";
/// On the Secret: the value of [`ROTATE_ANNOTATION`] last acted on.
pub const ROTATED_FOR_ANNOTATION: &str = "mailrelay.io/rotated-for";
/// On the Secret: when the previous token (second line) is dropped.
pub const PREVIOUS_EXPIRES_ANNOTATION: &str = "mailrelay.io/previous-token-expires-at";
/// How long the previous token keeps working after a rotation: long enough for
/// the kubelet to update the mounted file in every pod (its sync period plus
/// cache TTL, about a minute by default) and for clients to pick up the new one.
pub const ROTATION_GRACE: Duration = Duration::from_secs(10 * 60);

/// Name of the Secret holding the admin token of MailRelay `relay`.
pub fn secret_name(relay: &str) -> String {
    format!("{relay}-admin-token")
}

/// The path of the token file inside relay pods (`admin.token_file`).
pub fn token_file() -> String {
    format!("{DIR}/{KEY}")
}

/// A fresh token: 32 random bytes from the OS, hex encoded (64 characters, safe
/// in any header and in a file).
pub fn generate() -> String {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).expect("the OS random number generator");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The tokens in a Secret's value: one per line, surrounding white space dropped.
pub fn parse_tokens(raw: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(raw)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The tokens of a fetched Secret (empty when the key is missing).
pub fn tokens(secret: &Secret) -> Vec<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY))
        .map(|v| parse_tokens(&v.0))
        .unwrap_or_default()
}

/// Whether every token can travel in an HTTP header (visible ASCII, no spaces).
fn usable(tokens: &[String]) -> bool {
    !tokens.is_empty()
        && tokens
            .iter()
            .all(|t| t.bytes().all(|b| b.is_ascii_graphic()))
}

/// What the Secret should hold.
#[derive(Clone, PartialEq, Eq)]
pub struct Desired {
    /// Current token first, then the previous one during a grace period.
    pub tokens: Vec<String>,
    /// The operator's annotations on the Secret ([`ROTATED_FOR_ANNOTATION`],
    /// [`PREVIOUS_EXPIRES_ANNOTATION`]); one left out is removed.
    pub annotations: BTreeMap<String, String>,
    /// For the log: why it is written.
    pub why: &'static str,
}

impl Desired {
    /// The Secret's `data`.
    pub fn data(&self) -> BTreeMap<String, ByteString> {
        let mut text = self.tokens.join("\n");
        text.push('\n');
        BTreeMap::from([(KEY.to_owned(), ByteString(text.into_bytes()))])
    }
}

// Never print tokens, neither in logs nor in a failed assertion.
impl Desired {
    /// The reason of the Normal Event the write is announced with, so that
    /// `kubectl describe mailrelay` shows when the token changed (never the token).
    pub fn event_reason(&self) -> &'static str {
        match self.why {
            "created" => "AdminTokenCreated",
            "rotated" => "AdminTokenRotated",
            w if w.starts_with("grace period") => "AdminTokenPreviousDropped",
            _ => "AdminTokenRegenerated",
        }
    }
}

impl std::fmt::Display for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} token(s))", self.why, self.tokens.len())
    }
}

impl std::fmt::Debug for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desired")
            .field("tokens", &self.tokens.len())
            .field("annotations", &self.annotations)
            .field("why", &self.why)
            .finish()
    }
}

/// What to do with the admin token Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Leave it; look again within `recheck` (a previous token to drop then).
    Keep { recheck: Option<Duration> },
    /// It does not exist: create it.
    Create(Desired),
    /// Write it (rotation, end of a grace period, or no usable token in it).
    Replace(Desired),
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Decides the Secret's next state from the one fetched (`None`: not found), the
/// MailRelay's [`ROTATE_ANNOTATION`], the time, and a token source.
///
/// - Missing: created with a new token. The rotation annotation already on the
///   MailRelay counts as done (creating is as good as rotating).
/// - Present with a usable token: never overwritten, except by a rotation the
///   annotation asks for (a value not yet acted on): the new token goes first,
///   the current one second until [`ROTATION_GRACE`] is over, then it is dropped.
///   A Secret someone filled by hand (one token, or several lines without the
///   operator's expiry annotation) is kept as it is.
/// - Present without a usable token (no key, empty, or characters a header cannot
///   carry): replaced by a new token; the relay would refuse every request otherwise.
pub fn plan(
    existing: Option<&Secret>,
    rotate: Option<&str>,
    now: Timestamp,
    fresh: impl FnOnce() -> String,
) -> Plan {
    let rotated_for = |v: Option<&str>| {
        v.map(|v| BTreeMap::from([(ROTATED_FOR_ANNOTATION.to_owned(), v.to_owned())]))
            .unwrap_or_default()
    };
    let Some(secret) = existing else {
        return Plan::Create(Desired {
            tokens: vec![fresh()],
            annotations: rotated_for(rotate),
            why: "created",
        });
    };
    let current = tokens(secret);
    let done = annotation(secret, ROTATED_FOR_ANNOTATION);
    if !usable(&current) {
        return Plan::Replace(Desired {
            tokens: vec![fresh()],
            annotations: rotated_for(rotate.or(done)),
            why: "regenerated: the Secret held no usable token",
        });
    }
    if let Some(r) = rotate
        && Some(r) != done
    {
        let expires = Timestamp::from_second(now.as_second() + ROTATION_GRACE.as_secs() as i64)
            .unwrap_or(now);
        let mut annotations = rotated_for(Some(r));
        annotations.insert(PREVIOUS_EXPIRES_ANNOTATION.into(), expires.to_string());
        return Plan::Replace(Desired {
            tokens: vec![fresh(), current[0].clone()],
            annotations,
            why: "rotated",
        });
    }
    let Some(expires) = annotation(secret, PREVIOUS_EXPIRES_ANNOTATION) else {
        return Plan::Keep { recheck: None };
    };
    let expires: Option<Timestamp> = expires.parse().ok();
    match expires {
        Some(t) if t > now && current.len() > 1 => {
            let left = t.as_second() - now.as_second();
            Plan::Keep {
                recheck: Some(Duration::from_secs(left.max(1) as u64)),
            }
        }
        // Over (or unreadable): only the current token stays.
        _ => Plan::Replace(Desired {
            tokens: vec![current[0].clone()],
            annotations: rotated_for(done),
            why: "grace period over: previous token dropped",
        }),
    }
}

/// `existing` with the desired data and annotations (the operator's own
/// annotations replaced, everything else kept), for a replace.
pub fn apply_to(mut existing: Secret, desired: &Desired) -> Secret {
    existing.data = Some(desired.data());
    existing.string_data = None;
    let mut ann = existing.metadata.annotations.take().unwrap_or_default();
    ann.remove(ROTATED_FOR_ANNOTATION);
    ann.remove(PREVIOUS_EXPIRES_ANNOTATION);
    ann.extend(desired.annotations.clone());
    existing.metadata.annotations = (!ann.is_empty()).then_some(ann);
    existing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(token: &str, ann: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(BTreeMap::from([(
                KEY.to_owned(),
                ByteString(token.as_bytes().to_vec()),
            )])),
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Secret::default()
        }
    }

    fn now() -> Timestamp {
        "2026-12-06T20:00:00Z".parse().unwrap()
    }

    #[test]
    fn generated_tokens_are_random_hex() {
        let (a, b) = (generate(), generate());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn created_once_then_kept() {
        let p = plan(None, Some("r1"), now(), || "fresh".into());
        let Plan::Create(d) = p else { panic!("{p:?}") };
        assert_eq!(d.tokens, ["fresh"]);
        assert_eq!(d.annotations[ROTATED_FOR_ANNOTATION], "r1");
        assert_eq!(d.data()[KEY].0, b"fresh\n");
        // A valid Secret is never overwritten, also one made by hand.
        let s = secret("mine\n", &[]);
        assert_eq!(
            plan(Some(&s), None, now(), || unreachable!()),
            Plan::Keep { recheck: None }
        );
        let s = secret("mine\nother\n", &[(ROTATED_FOR_ANNOTATION, "r1")]);
        assert_eq!(
            plan(Some(&s), Some("r1"), now(), || unreachable!()),
            Plan::Keep { recheck: None }
        );
    }

    #[test]
    fn rotation_keeps_the_previous_token_for_the_grace_period() {
        let s = secret("old\n", &[(ROTATED_FOR_ANNOTATION, "r1")]);
        let Plan::Replace(d) = plan(Some(&s), Some("r2"), now(), || "new".into()) else {
            panic!()
        };
        assert_eq!(d.tokens, ["new", "old"]);
        assert_eq!(d.annotations[ROTATED_FOR_ANNOTATION], "r2");
        assert_eq!(
            d.annotations[PREVIOUS_EXPIRES_ANNOTATION],
            "2026-12-06T20:10:00Z"
        );
        let rotated = apply_to(s, &d);
        assert_eq!(tokens(&rotated), ["new", "old"]);
        // Within the grace period: kept, with a recheck when it ends.
        let later: Timestamp = "2026-12-06T20:04:00Z".parse().unwrap();
        assert_eq!(
            plan(Some(&rotated), Some("r2"), later, || unreachable!()),
            Plan::Keep {
                recheck: Some(Duration::from_secs(360))
            }
        );
        // After it: the previous token goes, the expiry annotation too.
        let after: Timestamp = "2026-12-06T20:10:00Z".parse().unwrap();
        let Plan::Replace(d) = plan(Some(&rotated), Some("r2"), after, || unreachable!()) else {
            panic!()
        };
        assert_eq!(d.tokens, ["new"]);
        let done = apply_to(rotated, &d);
        assert_eq!(tokens(&done), ["new"]);
        let ann = done.metadata.annotations.unwrap();
        assert_eq!(ann[ROTATED_FOR_ANNOTATION], "r2");
        assert!(!ann.contains_key(PREVIOUS_EXPIRES_ANNOTATION));
    }

    #[test]
    fn a_secret_without_a_usable_token_is_regenerated() {
        for bad in ["", " \n", "has space\n", "tab\there"] {
            let s = secret(bad, &[]);
            let p = plan(Some(&s), None, now(), || "fresh".into());
            assert!(
                matches!(&p, Plan::Replace(d) if d.tokens == ["fresh"]),
                "{bad:?}: {p:?}"
            );
        }
        let no_key = Secret::default();
        assert!(matches!(
            plan(Some(&no_key), None, now(), || "fresh".into()),
            Plan::Replace(_)
        ));
    }

    #[test]
    fn display_never_shows_tokens() {
        let d = Desired {
            tokens: vec!["s3cret".into()],
            annotations: BTreeMap::new(),
            why: "created",
        };
        assert!(!d.to_string().contains("s3cret"));
        assert!(!format!("{:?}", Plan::Create(d)).contains("s3cret"));
    }
}
