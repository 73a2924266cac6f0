//! The plugin's view of the cluster: the kubeconfig, `MailRelay` objects, and
//! requests to a relay's admin API through the API server's service proxy (the
//! admin API crate's client over [`Proxy`], a transport that needs kube and so
//! lives here rather than in that crate, which the relay binary links).

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use mailrelay_admin_api::{Call, Request, Response, Transport};
use serde::de::DeserializeOwned;

use super::{GROUP, GlobalArgs, MAILRELAY_KIND, MAILRELAY_PLURAL, PluginError, VERSION};
use crate::admin_token;

/// The header naming the user on queue changes; the relay logs it as `actor`.
pub use mailrelay_admin_api::ACTOR_HEADER;
/// Longest wait for the SelfSubjectReview: a label is not worth more.
const ACTOR_REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Name of the admin Service of a MailRelay and of its port (see crd-shape).
pub fn admin_service(relay: &str) -> String {
    format!("{relay}-admin")
}

/// The API server path that proxies to `path` (starting with `/`) on a relay's
/// admin port. The port is named, so the proxy follows the Service's targetPort.
pub fn proxy_path(namespace: &str, relay: &str, path: &str) -> String {
    format!(
        "/api/v1/namespaces/{namespace}/services/{}:admin/proxy{path}",
        admin_service(relay)
    )
}

pub fn mailrelay_resource() -> ApiResource {
    ApiResource {
        group: GROUP.to_owned(),
        version: VERSION.to_owned(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: MAILRELAY_KIND.to_owned(),
        plural: MAILRELAY_PLURAL.to_owned(),
    }
}

/// A connected client and the namespace commands act in.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub namespace: String,
    /// `-A`: listing verbs cover every namespace.
    pub all_namespaces: bool,
    /// The API server's URL, for messages.
    pub server: String,
    /// `--request-timeout`, per request (`None`: no limit).
    pub timeout: Option<Duration>,
    /// Admin tokens read so far, per (namespace, MailRelay): one Secret read per
    /// relay and command.
    tokens: Arc<Mutex<TokenCache>>,
    /// The user's name from a SelfSubjectReview, asked once per command (and only
    /// by one that changes a queue); `None` when the review failed.
    actor: Arc<tokio::sync::OnceCell<Option<String>>>,
}

/// (namespace, MailRelay) -> the tokens of its admin token Secret.
type TokenCache = BTreeMap<(String, String), Vec<String>>;

/// A raw answer from the API server.
struct Answer {
    code: u16,
    body: String,
}

impl Cluster {
    /// Loads the kubeconfig like kubectl does: `--kubeconfig`, else `$KUBECONFIG`
    /// or `~/.kube/config`, else the in-cluster service account.
    pub async fn connect(g: &GlobalArgs) -> Result<Cluster, PluginError> {
        let opts = KubeConfigOptions {
            context: g.context.clone(),
            cluster: g.cluster.clone(),
            user: g.user.clone(),
        };
        let kc = |e: &dyn std::fmt::Display| PluginError::Kubeconfig(e.to_string());
        let config = if let Some(path) = &g.kubeconfig {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| PluginError::Kubeconfig(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(file, &opts)
                .await
                .map_err(|e| kc(&e))?
        } else if opts.context.is_some() || opts.cluster.is_some() || opts.user.is_some() {
            Config::from_kubeconfig(&opts).await.map_err(|e| kc(&e))?
        } else {
            Config::infer().await.map_err(|e| kc(&e))?
        };
        // kube retries 503s for up to minutes by default, which suits controllers; for
        // a command a 503 from the service proxy means "no ready relay pod", and the
        // user should hear that at once.
        let mut config = config;
        config.default_retry = false;
        let timeout = g.request_timeout.filter(|d| !d.is_zero());
        if let Some(t) = timeout {
            // Also bound the connect itself, so a black-holed address ends as a
            // timeout of the request rather than of kube's 30 s connect default.
            config.connect_timeout = Some(t);
        }
        let namespace = g
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let server = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let client = Client::try_from(config).map_err(|e| kc(&e))?;
        Ok(Cluster {
            client,
            namespace,
            all_namespaces: g.all_namespaces,
            server,
            timeout,
            tokens: Arc::default(),
            actor: Arc::default(),
        })
    }

    /// Where listings look: "namespace \"x\"" or "any namespace".
    pub fn scope(&self) -> String {
        if self.all_namespaces {
            "any namespace".to_owned()
        } else {
            format!("namespace \"{}\"", self.namespace)
        }
    }

    /// Runs one request under `--request-timeout`.
    async fn within<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, PluginError> {
        match self.timeout {
            Some(d) => tokio::time::timeout(d, fut)
                .await
                .map_err(|_| PluginError::Timeout {
                    server: self.server.clone(),
                    after: super::timeout::show(d),
                    what: what.to_owned(),
                }),
            None => Ok(fut.await),
        }
    }

    fn mailrelays(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &mailrelay_resource())
    }

    /// The MailRelay `name`, or a "not found" that says whether the object or the
    /// whole CRD is missing.
    pub async fn mailrelay(&self, name: &str) -> Result<DynamicObject, PluginError> {
        let what = format!("get mailrelays/{name}");
        match self.within(&what, self.mailrelays().get(name)).await? {
            Ok(o) => Ok(o),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.crd_served().await?;
                Err(PluginError::MailRelayNotFound {
                    namespace: self.namespace.clone(),
                    name: name.to_owned(),
                })
            }
            Err(e) => Err(self.api_error(e, &what)),
        }
    }

    /// Every MailRelay in the namespace (all namespaces with `-A`), sorted by
    /// namespace and name.
    pub async fn list_mailrelays(&self) -> Result<Vec<DynamicObject>, PluginError> {
        let api = if self.all_namespaces {
            Api::all_with(self.client.clone(), &mailrelay_resource())
        } else {
            self.mailrelays()
        };
        let mut items = match self
            .within("list mailrelays", api.list(&ListParams::default()))
            .await?
        {
            Ok(l) => l.items,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.crd_served().await?;
                return Err(PluginError::Api(format!(
                    "list mailrelays: {} (HTTP 404)",
                    s.message
                )));
            }
            Err(e) => return Err(self.api_error(e, "list mailrelays")),
        };
        items.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        Ok(items)
    }

    /// `Ok` when the API server serves `mailrelays.mailrelay.io/v1alpha1`;
    /// [`PluginError::CrdMissing`] when discovery says it does not. A 404 on a
    /// MailRelay means either, and only discovery tells them apart reliably.
    async fn crd_served(&self) -> Result<(), PluginError> {
        let a = self
            .send("GET", &format!("/apis/{GROUP}/{VERSION}"))
            .await?;
        let missing = match a.code {
            404 => true,
            200..=299 => {
                let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
                !v.get("resources")
                    .and_then(|r| r.as_array())
                    .is_some_and(|r| {
                        r.iter().any(|x| {
                            x.get("name").and_then(|n| n.as_str()) == Some(MAILRELAY_PLURAL)
                        })
                    })
            }
            // Discovery is open to every authenticated user; any other answer says
            // nothing about the CRD, so the object's own 404 stands.
            _ => false,
        };
        if missing {
            Err(PluginError::CrdMissing {
                server: self.server.clone(),
            })
        } else {
            Ok(())
        }
    }

    async fn send(&self, method: &str, path: &str) -> Result<Answer, PluginError> {
        self.send_with(method, path, None, None).await
    }

    /// Who the API server says the user is (`status.userInfo.username` of a
    /// SelfSubjectReview, which every authenticated user may create; GA in
    /// Kubernetes 1.28), made fit for a header by
    /// [`mailrelay::admin::auth::audit_text`]. Asked once per command. Any failure
    /// (an older cluster, a policy forbidding it, a slow answer) gives `None`:
    /// the name only labels the relay's audit line, so it never stops a command.
    async fn actor(&self) -> Option<String> {
        self.actor
            .get_or_init(|| async {
                use k8s_openapi::api::authentication::v1::SelfSubjectReview;
                let api: Api<SelfSubjectReview> = Api::all(self.client.clone());
                let limit = self
                    .timeout
                    .map_or(ACTOR_REVIEW_TIMEOUT, |t| t.min(ACTOR_REVIEW_TIMEOUT));
                let review = tokio::time::timeout(
                    limit,
                    api.create(&Default::default(), &SelfSubjectReview::default()),
                )
                .await
                .ok()?
                .ok()?;
                let name = review.status?.user_info?.username?;
                let value = mailrelay::admin::auth::audit_text(
                    name.as_bytes(),
                    mailrelay::admin::auth::MAX_ACTOR_LEN,
                );
                (!value.is_empty()).then_some(value)
            })
            .await
            .clone()
    }

    /// One request, with the relay's admin token in [`admin_token::HEADER`] (not
    /// `Authorization`: that carries the user's own credentials, which the API
    /// server consumes and does not pass through the service proxy), and the
    /// user's name in [`ACTOR_HEADER`] when known.
    async fn send_with(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        actor: Option<&str>,
    ) -> Result<Answer, PluginError> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::ACCEPT, "application/json");
        if let Some(t) = token {
            req = req.header(admin_token::HEADER, t);
        }
        if let Some(a) = actor {
            req = req.header(ACTOR_HEADER, a);
        }
        let req = req
            .body(kube::client::Body::empty())
            .map_err(|e| PluginError::Api(format!("building request {path}: {e}")))?;
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        self.within(&what, async {
            let res = self
                .client
                .send(req)
                .await
                .map_err(|e| self.api_error(e, &what))?;
            let code = res.status().as_u16();
            let bytes = res
                .into_body()
                .collect()
                .await
                .map_err(|e| PluginError::Api(format!("reading the answer to {path}: {e}")))?
                .to_bytes();
            Ok(Answer {
                code,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        })
        .await?
    }

    /// Calls the admin API of `relay` (which must exist: the caller fetched it) and
    /// returns the body of a 2xx answer. The client tries each token of the relay's
    /// Secret in turn on the relay's own 401 (a rotation in progress).
    pub async fn admin(&self, relay: &DynamicObject, call: &Call) -> Result<String, PluginError> {
        let name = relay.metadata.name.clone().unwrap_or_default();
        let namespace = relay
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| self.namespace.clone());
        let tokens = self.admin_tokens(&namespace, &name).await?;
        // Only changes are audited by the relay, so only they pay for the review.
        let actor = if call.method().is_change() {
            self.actor().await
        } else {
            None
        };
        let client = mailrelay_admin_api::Client::new(Proxy {
            cluster: self,
            namespace: namespace.clone(),
            relay: name.clone(),
        })
        .with_tokens(tokens.iter().cloned())
        .with_actor(actor);
        let a = client.send(call).await?;
        if a.is_success() {
            return Ok(a.body);
        }
        let path = call.route();
        if a.status == 404 && a.body.trim().is_empty() {
            // The relay's router answers unknown routes with an empty 404.
            return Err(PluginError::Relay {
                namespace,
                name,
                code: 404,
                message: format!(
                    "{path} is not served by this relay (is it older than the plugin?)"
                ),
            });
        }
        if a.status == 401 && !a.is_kubernetes_status() {
            let secret = admin_token::secret_name(&name);
            let why = if tokens.is_empty() {
                format!(
                    "there is no Secret {namespace}/{secret} with its admin token (the operator creates it: is it running, and recent enough?)"
                )
            } else {
                format!(
                    "it refused the admin token from Secret {namespace}/{secret} (rotated just now? try again in a minute)"
                )
            };
            return Err(PluginError::Relay {
                namespace,
                name,
                code: 401,
                message: why,
            });
        }
        Err(classify_proxy_error(
            &namespace, &name, relay, a.status, &a.body,
        ))
    }

    /// The admin token(s) of MailRelay `namespace/name`, read from its
    /// `NAME-admin-token` Secret with the user's own credentials: Kubernetes RBAC
    /// on that Secret decides who may use the relay's admin API. A missing Secret
    /// gives no token (a relay from before the operator made them may be open).
    async fn admin_tokens(&self, namespace: &str, name: &str) -> Result<Vec<String>, PluginError> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(t) = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(t.clone());
        }
        let secret = admin_token::secret_name(name);
        let a = self
            .send(
                "GET",
                &format!("/api/v1/namespaces/{namespace}/secrets/{secret}"),
            )
            .await?;
        let tokens = match a.code {
            200..=299 => {
                let s: k8s_openapi::api::core::v1::Secret =
                    serde_json::from_str(&a.body).map_err(|e| PluginError::Malformed {
                        what: format!("Secret {namespace}/{secret}"),
                        detail: e.to_string(),
                    })?;
                admin_token::tokens(&s)
            }
            404 => Vec::new(),
            401 | 403 => {
                return Err(PluginError::Forbidden(format!(
                    "cannot read Secret {namespace}/{secret} (HTTP {}): it holds the admin token of MailRelay {namespace}/{name}, and using the relay's admin API needs `get` on secrets/{secret} in namespace {namespace} (check: kubectl auth can-i get secret/{secret} -n {namespace})",
                    a.code
                )));
            }
            code => {
                let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
                let msg = v.get("message").and_then(|m| m.as_str()).unwrap_or("");
                return Err(PluginError::Api(format!(
                    "get secrets/{secret} in namespace {namespace}: {msg} (HTTP {code})"
                )));
            }
        };
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, tokens.clone());
        Ok(tokens)
    }

    /// Like [`Cluster::admin`], parsing the JSON answer.
    pub async fn admin_json<T: DeserializeOwned>(
        &self,
        relay: &DynamicObject,
        call: &Call,
    ) -> Result<(T, serde_json::Value), PluginError> {
        let body = self.admin(relay, call).await?;
        let path = call.path();
        let raw: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| PluginError::Malformed {
                what: format!("the admin API ({path})"),
                detail: e.to_string(),
            })?;
        let typed = T::deserialize(&raw).map_err(|e| PluginError::Malformed {
            what: format!("the admin API ({path})"),
            detail: e.to_string(),
        })?;
        Ok((typed, raw))
    }

    fn api_error(&self, e: kube::Error, what: &str) -> PluginError {
        match e {
            kube::Error::Api(s) if s.code == 401 || s.code == 403 => {
                PluginError::Forbidden(format!("{what}: {}", s.message))
            }
            kube::Error::Api(s) => {
                PluginError::Api(format!("{what}: {} (HTTP {})", s.message, s.code))
            }
            e => transport_error(&self.server, &e),
        }
    }
}

/// Names the cause of a failed connection to the API server, found in the
/// error's cause chain (kube and hyper wrap it several times over, and their own
/// text says only "client error (Connect)").
pub fn transport_error(server: &str, e: &(dyn StdError + 'static)) -> PluginError {
    let mut chain: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    let mut dns = false;
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return PluginError::Tls {
                server: server.to_owned(),
                detail: tls.to_string(),
            };
        }
        let text = err.to_string();
        // hyper-util's connector labels resolver failures "dns error"; the cause
        // below it carries the resolver's own words.
        dns |= text == "dns error";
        let mut next = err.source();
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return PluginError::ConnectionRefused {
                        server: server.to_owned(),
                    };
                }
                std::io::ErrorKind::TimedOut => {
                    return PluginError::ConnectTimeout {
                        server: server.to_owned(),
                    };
                }
                _ => {}
            }
            // An io::Error's `source()` skips the error it wraps (rustls's, say).
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                    return PluginError::Tls {
                        server: server.to_owned(),
                        detail: tls.to_string(),
                    };
                }
                next = Some(inner);
            }
        }
        if chain.last() != Some(&text) && !chain.iter().any(|c| c.contains(&text)) {
            chain.push(text);
        }
        cur = next;
    }
    if dns {
        let host = server
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_else(|| server.to_owned());
        let detail = chain
            .iter()
            .skip_while(|c| c.as_str() != "dns error")
            .nth(1)
            .cloned()
            .unwrap_or_else(|| "lookup failed".to_owned());
        return PluginError::Dns {
            server: server.to_owned(),
            host,
            detail,
        };
    }
    PluginError::Transport {
        server: server.to_owned(),
        detail: chain.join(": "),
    }
}

/// The admin API transport through the API server's service proxy: each request
/// goes to `/api/v1/namespaces/NS/services/NAME-admin:admin/proxy/…` with the
/// user's own credentials, the relay's token in [`admin_token::HEADER`].
pub struct Proxy<'a> {
    cluster: &'a Cluster,
    namespace: String,
    relay: String,
}

impl Transport for Proxy<'_> {
    type Error = PluginError;

    async fn send(&self, r: Request<'_>) -> Result<Response, PluginError> {
        let full = proxy_path(&self.namespace, &self.relay, r.path);
        let a = self
            .cluster
            .send_with(r.method.as_str(), &full, r.token, r.actor)
            .await?;
        Ok(Response {
            status: a.code,
            body: a.body,
        })
    }
}

/// Tells apart the API server's own errors on the proxy path (a `Status` object:
/// no admin Service, no ready endpoint, pod unreachable, forbidden) from the
/// relay's answers (`{"error": …}`), and says which one it is.
pub fn classify_proxy_error(
    namespace: &str,
    name: &str,
    relay: &DynamicObject,
    code: u16,
    body: &str,
) -> PluginError {
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let is_status = json
        .as_ref()
        .is_some_and(|v| v.get("kind").and_then(|k| k.as_str()) == Some("Status"));
    if is_status {
        let v = json.as_ref().unwrap();
        let message = v
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_owned();
        if code == 401 || code == 403 {
            return PluginError::Forbidden(format!(
                "{message} (the plugin needs get/create on services/proxy in namespace {namespace})"
            ));
        }
        let mut detail = if code == 404 {
            format!(
                "its admin Service {} does not exist (the operator creates it: is the operator running?)",
                admin_service(name)
            )
        } else if message.is_empty() {
            format!("its admin API is unreachable (HTTP {code})")
        } else {
            format!("its admin API is unreachable: {message}")
        };
        if let Some(c) = ready_condition(relay) {
            detail.push_str(&format!("; condition {c}"));
        }
        detail.push_str(&format!(
            " (check `kubectl get pods -n {namespace} -l app.kubernetes.io/instance={name}`)"
        ));
        return PluginError::NotReady {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            detail,
        };
    }
    let message = json
        .as_ref()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned());
    let message = if message.is_empty() {
        "no message".to_owned()
    } else {
        message
    };
    if code == 404 && message.contains("not found") {
        return PluginError::NotFound(message);
    }
    PluginError::Relay {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        code,
        message,
    }
}

/// Namespace and name of a MailRelay read from the API.
pub fn relay_id(relay: &DynamicObject) -> (String, String) {
    (
        relay.metadata.namespace.clone().unwrap_or_default(),
        relay.metadata.name.clone().unwrap_or_default(),
    )
}

/// The relay's own 404 for a queue ID, said as such: the MailRelay exists, the
/// message does not (any more).
pub fn no_such_message(e: PluginError, relay: &DynamicObject, id: &str) -> PluginError {
    match e {
        PluginError::NotFound(_) => {
            let (namespace, name) = relay_id(relay);
            PluginError::MessageNotFound {
                namespace,
                name,
                id: id.to_owned(),
            }
        }
        e => e,
    }
}

/// `Ready=False (Reason): message` from the MailRelay's status, when set.
pub fn ready_condition(relay: &DynamicObject) -> Option<String> {
    let conds = relay.data.get("status")?.get("conditions")?.as_array()?;
    let c = conds
        .iter()
        .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready"))?;
    let s = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let mut out = format!("Ready={}", s("status"));
    if !s("reason").is_empty() {
        out.push_str(&format!(" ({})", s("reason")));
    }
    if !s("message").is_empty() {
        out.push_str(&format!(": {}", s("message")));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(status: serde_json::Value) -> DynamicObject {
        let mut o = DynamicObject::new("out", &mailrelay_resource()).within("mail");
        o.data = serde_json::json!({ "status": status });
        o
    }

    #[test]
    fn proxy_path_uses_the_named_admin_port() {
        assert_eq!(
            proxy_path("mail", "out", "/api/v1/queue/stats"),
            "/api/v1/namespaces/mail/services/out-admin:admin/proxy/api/v1/queue/stats"
        );
        assert_eq!(
            proxy_path("mail", "out", &Call::Show("a b/é".into()).path()),
            "/api/v1/namespaces/mail/services/out-admin:admin/proxy/api/v1/queue/messages/a%20b%2F%C3%A9"
        );
    }

    #[test]
    fn api_server_errors_on_the_proxy_mean_not_ready() {
        let r = relay(serde_json::json!({"conditions": [
            {"type": "Ready", "status": "False", "reason": "NoReadyReplicas", "message": "0/2 pods ready"}
        ]}));
        let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"no endpoints available for service \"out-admin\"","reason":"ServiceUnavailable","code":503}"#;
        let e = classify_proxy_error("mail", "out", &r, 503, body).to_string();
        assert!(e.starts_with("MailRelay mail/out is not ready: its admin API is unreachable: no endpoints available for service \"out-admin\"; condition Ready=False (NoReadyReplicas): 0/2 pods ready"), "{e}");
        assert!(
            e.contains("kubectl get pods -n mail -l app.kubernetes.io/instance=out"),
            "{e}"
        );

        let body = r#"{"kind":"Status","message":"services \"out-admin:admin\" is forbidden","reason":"Forbidden","code":403}"#;
        let e = classify_proxy_error("mail", "out", &r, 403, body).to_string();
        assert!(
            e.contains("forbidden") && e.contains("services/proxy"),
            "{e}"
        );
    }

    #[test]
    fn relay_errors_are_passed_on() {
        let r = relay(serde_json::json!({}));
        let e = classify_proxy_error(
            "mail",
            "out",
            &r,
            404,
            r#"{"error":"message 06H29YVZVR66DSV6D7BS not found"}"#,
        );
        assert_eq!(e.to_string(), "message 06H29YVZVR66DSV6D7BS not found");
        let e = classify_proxy_error("mail", "out", &r, 400, r#"{"error":"malformed queue id"}"#);
        assert_eq!(
            e.to_string(),
            "mailrelay mail/out: malformed queue id (HTTP 400)"
        );
        let e = classify_proxy_error("mail", "out", &r, 500, "boom\n");
        assert_eq!(e.to_string(), "mailrelay mail/out: boom (HTTP 500)");
    }
}
