//! One client for the admin API over any [`Transport`]: direct HTTP
//! ([`crate::http::HttpTransport`], the relay CLI and the operator) or the
//! Kubernetes API server's service proxy (the kubectl plugin; that transport lives
//! in the operator crate, so kube never enters the relay's dependency tree).
//!
//! The client owns what every caller did alike: the token and actor headers, the
//! retry with the next token after a relay's 401 (right after a rotation a relay
//! pod may still hold only the previous token: the kubelet updates a mounted
//! Secret within a minute or so), and reading the relay's `{"error": …}` body.
//! How an error is told to the user stays with each caller.

use std::future::Future;

use serde::de::DeserializeOwned;

use crate::path::{Call, Method};
use crate::types::{
    MessageDetail, MessageList, QuotaList, QuotaUsage, Retried, RetrySelector, StatsBody,
};

/// The header carrying the admin token where `Authorization` cannot (the API
/// server's service proxy consumes `Authorization`).
pub const TOKEN_HEADER: &str = "x-mailrelay-admin-token";
/// The header in which a client names the person it acts for; the relay logs it
/// as `actor` on every queue change.
pub const ACTOR_HEADER: &str = "x-mailrelay-actor";

/// One request as a transport sends it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: Method,
    /// Path and query, encoded (see [`Call::path`]).
    pub path: &'a str,
    pub token: Option<&'a str>,
    pub actor: Option<&'a str>,
}

/// The status and body of an answer, whoever gave it (the relay, or a proxy on
/// the way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Whether the body is a Kubernetes `Status` object: the API server's own
    /// answer on the proxy path, not the relay's.
    pub fn is_kubernetes_status(&self) -> bool {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .is_some_and(|v| v.get("kind").and_then(|k| k.as_str()) == Some("Status"))
    }

    /// The relay's message: `error` of its JSON error body, else the body itself
    /// (trimmed).
    pub fn error_message(&self) -> String {
        serde_json::from_str::<crate::types::ErrorBody>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| self.body.trim().to_owned())
    }

    /// The answer as `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.body)
    }
}

/// How requests reach a relay.
pub trait Transport: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    fn send(
        &self,
        request: Request<'_>,
    ) -> impl Future<Output = Result<Response, Self::Error>> + Send;
}

/// A typed call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error<E: std::error::Error + 'static> {
    #[error(transparent)]
    Transport(E),
    /// A non-2xx answer; `message` is the relay's `{"error": …}` text.
    #[error("{message} (HTTP {status})")]
    Status { status: u16, message: String },
    #[error("unexpected answer from the admin API: {0}")]
    Decode(#[source] serde_json::Error),
}

/// The admin API of one relay.
#[derive(Debug, Clone)]
pub struct Client<T> {
    transport: T,
    tokens: Vec<String>,
    actor: Option<String>,
}

impl<T: Transport> Client<T> {
    pub fn new(transport: T) -> Self {
        Client {
            transport,
            tokens: Vec::new(),
            actor: None,
        }
    }

    /// The tokens to try, current first (a relay's token Secret holds the
    /// previous one too during a rotation). None: no token is sent.
    pub fn with_tokens(mut self, tokens: impl IntoIterator<Item = String>) -> Self {
        self.tokens = tokens.into_iter().collect();
        self
    }

    /// Who the requests act for (sent as [`ACTOR_HEADER`]).
    pub fn with_actor(mut self, actor: Option<String>) -> Self {
        self.actor = actor;
        self
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Sends `call` and returns the answer, whatever its status. A 401 from the
    /// relay (not from a proxy on the way) is retried with the next token.
    pub async fn send(&self, call: &Call) -> Result<Response, T::Error> {
        let path = call.path();
        let mut tokens: Vec<Option<&str>> = self.tokens.iter().map(|t| Some(t.as_str())).collect();
        if tokens.is_empty() {
            tokens.push(None);
        }
        let last = tokens.len() - 1;
        for (i, token) in tokens.into_iter().enumerate() {
            let resp = self
                .transport
                .send(Request {
                    method: call.method(),
                    path: &path,
                    token,
                    actor: self.actor.as_deref(),
                })
                .await?;
            if i == last || resp.status != 401 || resp.is_kubernetes_status() {
                return Ok(resp);
            }
        }
        unreachable!("the loop returns on its last token")
    }

    /// Sends `call` and reads a 2xx answer as `R`.
    pub async fn json<R: DeserializeOwned>(&self, call: &Call) -> Result<R, Error<T::Error>> {
        let resp = self.send(call).await.map_err(Error::Transport)?;
        if !resp.is_success() {
            return Err(Error::Status {
                status: resp.status,
                message: resp.error_message(),
            });
        }
        resp.json().map_err(Error::Decode)
    }

    pub async fn stats(&self) -> Result<StatsBody, Error<T::Error>> {
        self.json(&Call::Stats).await
    }

    pub async fn list(&self, q: crate::types::ListQuery) -> Result<MessageList, Error<T::Error>> {
        self.json(&Call::List(q)).await
    }

    pub async fn show(&self, id: &str) -> Result<MessageDetail, Error<T::Error>> {
        self.json(&Call::Show(id.to_owned())).await
    }

    pub async fn retry(&self, sel: RetrySelector) -> Result<Retried, Error<T::Error>> {
        self.json(&Call::Retry(sel)).await
    }

    /// `Ok(())` on the relay's `204 No Content`.
    pub async fn delete(&self, id: &str) -> Result<(), Error<T::Error>> {
        let resp = self
            .send(&Call::Delete(id.to_owned()))
            .await
            .map_err(Error::Transport)?;
        if resp.is_success() {
            Ok(())
        } else {
            Err(Error::Status {
                status: resp.status,
                message: resp.error_message(),
            })
        }
    }

    pub async fn suppressions(
        &self,
        q: crate::types::SuppressionQuery,
    ) -> Result<crate::types::SuppressionList, Error<T::Error>> {
        self.json(&Call::Suppressions(q)).await
    }

    pub async fn suppression_add(
        &self,
        scope: &str,
        address: &str,
        ttl: Option<&str>,
    ) -> Result<crate::types::SuppressionAdded, Error<T::Error>> {
        self.json(&Call::SuppressionAdd {
            scope: scope.to_owned(),
            address: address.to_owned(),
            ttl: ttl.map(str::to_owned),
        })
        .await
    }

    /// `Ok(true)` when the entry was there (`204`), `Ok(false)` on `404`.
    pub async fn suppression_remove(
        &self,
        scope: &str,
        address: &str,
    ) -> Result<bool, Error<T::Error>> {
        let resp = self
            .send(&Call::SuppressionRemove {
                scope: scope.to_owned(),
                address: address.to_owned(),
            })
            .await
            .map_err(Error::Transport)?;
        match resp.status {
            s if (200..300).contains(&s) => Ok(true),
            404 if !resp.is_kubernetes_status() => Ok(false),
            status => Err(Error::Status {
                status,
                message: resp.error_message(),
            }),
        }
    }

    pub async fn events(
        &self,
        q: crate::events::EventQuery,
    ) -> Result<crate::events::EventList, Error<T::Error>> {
        self.json(&Call::Events(q)).await
    }

    pub async fn quotas(&self) -> Result<QuotaList, Error<T::Error>> {
        self.json(&Call::Quotas).await
    }

    pub async fn quota(
        &self,
        name: &str,
        key: Option<&str>,
    ) -> Result<QuotaUsage, Error<T::Error>> {
        self.json(&Call::Quota {
            name: name.to_owned(),
            key: key.map(str::to_owned),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// (method and path, token, actor) of one request.
    type Seen = (String, Option<String>, Option<String>);

    /// Answers from a script and records what it was sent.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<Vec<Response>>,
        seen: Mutex<Vec<Seen>>,
    }

    impl Transport for Scripted {
        type Error = std::io::Error;
        async fn send(&self, r: Request<'_>) -> Result<Response, std::io::Error> {
            self.seen.lock().unwrap().push((
                format!("{} {}", r.method.as_str(), r.path),
                r.token.map(str::to_owned),
                r.actor.map(str::to_owned),
            ));
            Ok(self.answers.lock().unwrap().remove(0))
        }
    }

    fn answer(status: u16, body: &str) -> Response {
        Response {
            status,
            body: body.into(),
        }
    }

    #[tokio::test]
    async fn a_relay_401_tries_the_next_token_a_proxy_401_does_not() {
        let t = Scripted::default();
        *t.answers.lock().unwrap() = vec![
            answer(401, r#"{"error":"bad token"}"#),
            answer(200, r#"{"retried":3}"#),
        ];
        let c = Client::new(t)
            .with_tokens(["new".to_owned(), "old".to_owned()])
            .with_actor(Some("alice".into()));
        assert_eq!(c.retry(RetrySelector::All).await.unwrap().retried, 3);
        let seen = c.transport().seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                (
                    "POST /api/v1/queue/retry?all=true".into(),
                    Some("new".into()),
                    Some("alice".into())
                ),
                (
                    "POST /api/v1/queue/retry?all=true".into(),
                    Some("old".into()),
                    Some("alice".into())
                ),
            ]
        );

        let t = Scripted::default();
        *t.answers.lock().unwrap() = vec![answer(
            401,
            r#"{"kind":"Status","message":"Unauthorized","code":401}"#,
        )];
        let c = Client::new(t).with_tokens(["a".to_owned(), "b".to_owned()]);
        let e = c.stats().await.unwrap_err();
        assert!(matches!(e, Error::Status { status: 401, .. }), "{e}");
        assert_eq!(c.transport().seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_relays_error_body_is_the_message() {
        let t = Scripted::default();
        *t.answers.lock().unwrap() = vec![
            answer(404, r#"{"error":"message 06H29YVZVR66DSV6D7BS not found"}"#),
            answer(500, "boom\n"),
            answer(200, "not json"),
        ];
        let c = Client::new(t);
        assert_eq!(
            c.delete("06H29YVZVR66DSV6D7BS")
                .await
                .unwrap_err()
                .to_string(),
            "message 06H29YVZVR66DSV6D7BS not found (HTTP 404)"
        );
        assert_eq!(c.stats().await.unwrap_err().to_string(), "boom (HTTP 500)");
        assert!(matches!(c.stats().await.unwrap_err(), Error::Decode(_)));
        assert_eq!(
            c.transport().seen.lock().unwrap()[0].1,
            None,
            "no token configured, none sent"
        );
    }
}
