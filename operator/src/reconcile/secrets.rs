//! Which Secrets a MailRelay needs, and whether what the API server has satisfies it.
//! Pure: the reconciler fetches, these functions judge.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

use crate::crd::{MailRelaySpec, SecretKeyRef};
use crate::resources::config::redis_url_problem;
use crate::resources::{ResolvedSecrets, secret_digest};

/// One Secret a relay references, the keys it must hold, and the field that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretNeed {
    pub name: String,
    pub keys: Vec<String>,
    /// The spec field referencing it, for messages.
    pub field: String,
    /// Whether its values reach the pods as environment variables (and so need a
    /// restart when they change).
    pub env: bool,
}

/// The Secrets `spec` references, in a fixed order.
pub fn needed(spec: &MailRelaySpec) -> Vec<SecretNeed> {
    let mut out = Vec::new();
    if let Some(t) = &spec.tls {
        out.push(SecretNeed {
            name: t.secret_name.clone(),
            keys: vec!["tls.crt".into(), "tls.key".into()],
            field: "spec.tls.secretName".into(),
            env: false,
        });
    }
    if let Some(a) = &spec.auth {
        out.push(SecretNeed {
            name: a.secret_name.clone(),
            keys: vec!["users".into()],
            field: "spec.auth.secretName".into(),
            env: false,
        });
    }
    if let Some(u) = &spec.redis.url_secret {
        out.push(SecretNeed {
            name: u.name.clone(),
            keys: vec![u.key.clone()],
            field: "spec.redis.urlSecret".into(),
            env: true,
        });
    }
    if let Some(p) = &spec.redis.password_secret {
        out.push(SecretNeed {
            name: p.name.clone(),
            keys: vec![p.key.clone()],
            field: "spec.redis.passwordSecret".into(),
            env: true,
        });
    }
    if let Some(c) = spec
        .delivery
        .as_ref()
        .and_then(|d| d.smarthost.as_ref())
        .and_then(|s| s.credentials_secret.as_ref())
    {
        out.push(SecretNeed {
            name: c.name.clone(),
            keys: vec!["username".into(), "password".into()],
            field: "spec.delivery.smarthost.credentialsSecret".into(),
            env: true,
        });
    }
    let routes = spec.delivery.as_ref().map(|d| d.routes.as_slice());
    for (i, r) in routes.unwrap_or_default().iter().enumerate() {
        if let Some(a) = &r.auth {
            out.push(SecretNeed {
                name: a.password_secret.name.clone(),
                keys: vec![a.password_secret.key.clone()],
                field: format!("spec.delivery.routes[{i}].auth.passwordSecret"),
                env: true,
            });
        }
    }
    out
}

/// Why a relay cannot be rolled out with its Secrets as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretProblem {
    NotFound {
        secret: String,
        field: String,
    },
    KeyMissing {
        secret: String,
        key: String,
        field: String,
    },
    /// The value is there but unusable; `problem` never quotes it.
    InvalidValue {
        secret: String,
        key: String,
        field: String,
        problem: String,
    },
}

impl SecretProblem {
    /// Condition and event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SecretProblem::NotFound { .. } => "SecretNotFound",
            SecretProblem::KeyMissing { .. } => "SecretKeyMissing",
            SecretProblem::InvalidValue { .. } => "SecretValueInvalid",
        }
    }

    pub fn message(&self) -> String {
        match self {
            SecretProblem::NotFound { secret, field } => {
                format!("Secret {secret:?} (referenced by {field}) does not exist")
            }
            SecretProblem::KeyMissing { secret, key, field } => {
                format!("Secret {secret:?} (referenced by {field}) has no key {key:?}")
            }
            SecretProblem::InvalidValue {
                secret,
                key,
                field,
                problem,
            } => format!("Secret {secret:?} key {key:?} (referenced by {field}): {problem}"),
        }
    }
}

/// What the reconciler needs from the Secrets: the digest for the pods, and the
/// Redis URL (when it comes from a Secret) and password for reading the queue store
/// (never logged: a URL may carry credentials too).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub secrets: ResolvedSecrets,
    pub redis_url: Option<String>,
    pub redis_password: Option<String>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("secrets", &self.secrets)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<redacted>"))
            .field(
                "redis_password",
                &self.redis_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn value<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
}

/// Checks the fetched Secrets (`None`: not found) against the needs.
pub fn resolve(
    spec: &MailRelaySpec,
    fetched: &BTreeMap<String, Option<Secret>>,
) -> Result<Resolved, SecretProblem> {
    let mut env_values: Vec<&[u8]> = Vec::new();
    for need in needed(spec) {
        let Some(Some(secret)) = fetched.get(&need.name) else {
            return Err(SecretProblem::NotFound {
                secret: need.name,
                field: need.field,
            });
        };
        for key in &need.keys {
            match value(secret, key) {
                Some(v) if need.env => env_values.push(v),
                Some(_) => {}
                None => {
                    return Err(SecretProblem::KeyMissing {
                        secret: need.name.clone(),
                        key: key.clone(),
                        field: need.field.clone(),
                    });
                }
            }
        }
    }
    let lookup = |r: &SecretKeyRef| {
        fetched
            .get(&r.name)
            .and_then(Option::as_ref)
            .and_then(|s| value(s, &r.key))
    };
    let redis_url = match &spec.redis.url_secret {
        None => None,
        Some(u) => {
            let invalid = |problem: String| SecretProblem::InvalidValue {
                secret: u.name.clone(),
                key: u.key.clone(),
                field: "spec.redis.urlSecret".into(),
                problem,
            };
            let raw = lookup(u).unwrap_or_default();
            let url = std::str::from_utf8(raw)
                .map_err(|_| invalid("the Redis URL is not UTF-8".into()))?;
            // The relay takes the variable as it is; a file made with `echo` ends
            // in a newline, which is better named here than failing in every pod.
            if url.trim() != url {
                return Err(invalid(
                    "the Redis URL has leading or trailing white space (a newline at the end of the file it was created from?)".into(),
                ));
            }
            if let Some(problem) = redis_url_problem(url, &spec.redis) {
                return Err(invalid(format!("the Redis URL {problem}")));
            }
            Some(url.to_owned())
        }
    };
    let redis_password = spec
        .redis
        .password_secret
        .as_ref()
        .and_then(lookup)
        .map(|v| String::from_utf8_lossy(v).into_owned());
    Ok(Resolved {
        secrets: ResolvedSecrets {
            env_digest: (!env_values.is_empty()).then(|| secret_digest(&env_values)),
        },
        redis_url,
        redis_password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn spec(yaml: &str) -> MailRelaySpec {
        serde_norway::from_str(yaml).unwrap()
    }

    fn secret(pairs: &[(&str, &str)]) -> Option<Secret> {
        Some(Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        })
    }

    #[test]
    fn missing_secrets_and_keys_are_named() {
        let s = spec(
            "hostname: r.example\nredis: {url: 'redis://r:6379', passwordSecret: {name: redis, key: password}}\ntls: {secretName: relay-tls}\n",
        );
        let mut fetched = BTreeMap::from([("relay-tls".to_owned(), None)]);
        let p = resolve(&s, &fetched).unwrap_err();
        assert_eq!(p.reason(), "SecretNotFound");
        assert!(
            p.message().contains("\"relay-tls\"") && p.message().contains("spec.tls.secretName")
        );
        fetched.insert("relay-tls".into(), secret(&[("tls.crt", "c")]));
        let p = resolve(&s, &fetched).unwrap_err();
        assert_eq!(p.reason(), "SecretKeyMissing");
        assert!(p.message().contains("tls.key"), "{}", p.message());
        fetched.insert(
            "relay-tls".into(),
            secret(&[("tls.crt", "c"), ("tls.key", "k")]),
        );
        fetched.insert("redis".into(), secret(&[("password", "hunter2")]));
        let r = resolve(&s, &fetched).unwrap();
        assert_eq!(r.redis_password.as_deref(), Some("hunter2"));
        assert!(!format!("{r:?}").contains("hunter2"));
        let d1 = r.secrets.env_digest.unwrap();
        fetched.insert("redis".into(), secret(&[("password", "changed")]));
        let d2 = resolve(&s, &fetched).unwrap().secrets.env_digest.unwrap();
        assert_ne!(d1, d2, "a new password rolls the pods");
    }

    #[test]
    fn route_passwords_are_needed_named_by_route_and_roll_the_pods() {
        let s = spec(
            "hostname: r.example\nredis: {url: 'redis://r:6379'}\ndelivery:\n  routes:\n    - {domains: [a.example], host: h}\n    - {domains: [b.example], host: h, tls: required, auth: {username: u, passwordSecret: {name: partner, key: pw}}}\n",
        );
        let needs = needed(&s);
        assert_eq!(needs.len(), 1);
        assert_eq!(
            needs[0].field,
            "spec.delivery.routes[1].auth.passwordSecret"
        );
        assert!(needs[0].env);
        let mut fetched = BTreeMap::from([("partner".to_owned(), None)]);
        let p = resolve(&s, &fetched).unwrap_err();
        assert!(
            p.message()
                .contains("spec.delivery.routes[1].auth.passwordSecret"),
            "{}",
            p.message()
        );
        fetched.insert("partner".into(), secret(&[("pw", "one")]));
        let d1 = resolve(&s, &fetched).unwrap().secrets.env_digest.unwrap();
        fetched.insert("partner".into(), secret(&[("pw", "two")]));
        let d2 = resolve(&s, &fetched).unwrap().secrets.env_digest.unwrap();
        assert_ne!(d1, d2, "a new route password rolls the pods");
    }

    #[test]
    fn a_url_secret_is_needed_checked_and_rolls_the_pods() {
        let s = spec(
            "hostname: r.example\nredis: {urlSecret: {name: redis-url, key: url}, passwordSecret: {name: redis-url, key: password}}\n",
        );
        let needs = needed(&s);
        assert_eq!(
            needs.iter().map(|n| n.field.as_str()).collect::<Vec<_>>(),
            ["spec.redis.urlSecret", "spec.redis.passwordSecret"]
        );
        assert!(needs.iter().all(|n| n.env && n.name == "redis-url"));
        let mut fetched = BTreeMap::from([("redis-url".to_owned(), None)]);
        let p = resolve(&s, &fetched).unwrap_err();
        assert_eq!(p.reason(), "SecretNotFound");
        assert!(
            p.message().contains("spec.redis.urlSecret"),
            "{}",
            p.message()
        );

        fetched.insert("redis-url".into(), secret(&[("password", "pw")]));
        let p = resolve(&s, &fetched).unwrap_err();
        assert_eq!(p.reason(), "SecretKeyMissing");
        assert!(p.message().contains("\"url\""), "{}", p.message());

        for (bad, needle) in [
            ("http://:hunter2@r:6379", "starting with redis://"),
            ("redis://:hunter2@r:6379\n", "trailing white space"),
        ] {
            fetched.insert(
                "redis-url".into(),
                secret(&[("url", bad), ("password", "pw")]),
            );
            let p = resolve(&s, &fetched).unwrap_err();
            assert_eq!(p.reason(), "SecretValueInvalid");
            let m = p.message();
            assert!(
                m.contains(needle) && m.contains("spec.redis.urlSecret"),
                "{m}"
            );
            assert!(!m.contains("hunter2"), "the URL is never quoted: {m}");
        }

        fetched.insert(
            "redis-url".into(),
            secret(&[
                ("url", "redis+sentinel://:spw@s1:26379,s2:26379/main"),
                ("password", "pw"),
            ]),
        );
        let r = resolve(&s, &fetched).unwrap();
        assert_eq!(
            r.redis_url.as_deref(),
            Some("redis+sentinel://:spw@s1:26379,s2:26379/main")
        );
        assert!(!format!("{r:?}").contains("spw"), "{r:?}");
        let d1 = r.secrets.env_digest.unwrap();
        fetched.insert(
            "redis-url".into(),
            secret(&[
                ("url", "redis+sentinel://:spw@s3:26379/main"),
                ("password", "pw"),
            ]),
        );
        let d2 = resolve(&s, &fetched).unwrap().secrets.env_digest.unwrap();
        assert_ne!(d1, d2, "a new URL rolls the pods");

        // Sentinel and cluster: known only once the Secret is read.
        let mut c = s.clone();
        c.redis.cluster = true;
        let p = resolve(&c, &fetched).unwrap_err();
        assert_eq!(p.reason(), "SecretValueInvalid");
        assert!(p.message().contains("cluster"), "{}", p.message());
    }
}
