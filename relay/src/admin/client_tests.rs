//! The admin API crate's client against the relay's real handlers and a real
//! (embedded) queue and quota engine: every endpoint, hostile path and query
//! values, the token rotation retry and the error mapping. A field or path that
//! the two sides disagree on fails here.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use mailrelay_admin_api::http::HttpTransport;
use mailrelay_admin_api::{
    Client, Error, ListQuery, QuotaAction, QuotaDirection, QuotaScope, RcptState, RetrySelector,
};

use super::{AdminState, Metrics, auth, serve_with};
use crate::queue::{
    BodyType, ClientInfo, DsnNotify, DsnRet, EmbeddedQueue, Envelope, Ingest, MailParams, QueueId,
    QueuedMessage, Recipient, TlsInfo, now_ms,
};
use crate::quota::Quotas;
use crate::quota::config::QuotaConfig;

const TOKEN: &str = "s3cret";

fn message() -> QueuedMessage {
    QueuedMessage {
        envelope: Envelope {
            id: QueueId::generate(),
            mail: MailParams {
                from: "alice@a.example".into(),
                size: Some(42),
                body: BodyType::EightBitMime,
                smtputf8: true,
                ret: Some(DsnRet::Hdrs),
                envid: Some("env-1".into()),
                requiretls: true,
            },
            recipients: vec![
                Recipient {
                    address: "bob@example.org".into(),
                    notify: Some(DsnNotify {
                        failure: true,
                        delay: true,
                        ..DsnNotify::default()
                    }),
                    orcpt: Some("rfc822;bob@example.org".into()),
                },
                Recipient {
                    address: "carol@other.test".into(),
                    notify: None,
                    orcpt: None,
                },
            ],
            client: ClientInfo {
                ip: "192.0.2.7".parse().unwrap(),
                port: 2525,
                helo: "client.test".into(),
                auth_user: Some("alice".into()),
                tls: Some(TlsInfo {
                    version: "TLSv1.3".into(),
                    cipher: "TLS13_AES_128_GCM_SHA256".into(),
                }),
                listener: "submission".into(),
            },
            received_at_ms: now_ms(),
            received_by: "relay.test".into(),
        },
        body: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
    }
}

struct Relay {
    url: String,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn relay(msg: &QueuedMessage) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(EmbeddedQueue::open(dir.path()).unwrap());
    queue.enqueue(msg).await.unwrap();
    let mut metrics = Metrics::new();
    let quota_metrics =
        crate::quota::ingress::metrics::QuotaMetrics::register(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let cfg: QuotaConfig =
        serde_norway::from_str("{name: tenant-a, direction: ingress, limits: ['100/1m']}").unwrap();
    let quotas = Quotas::new(
        &[cfg],
        Arc::new(crate::quota::ingress::memory::MemoryStore::new()),
        quota_metrics,
        Duration::from_secs(2),
    );
    let state = AdminState {
        queue,
        metrics,
        draining: Arc::new(AtomicBool::new(false)),
        auth: auth::AdminAuth::new(None, Some(TOKEN.into())).unwrap(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_with(
        listener,
        state,
        crate::quota::admin::routes(quotas),
        async {
            let _ = stopped.await;
        },
    ));
    Relay {
        url,
        _dir: dir,
        stop: Some(stop),
    }
}

fn client(r: &Relay, tokens: &[&str]) -> Client<HttpTransport> {
    Client::new(HttpTransport::new(&r.url, Duration::from_secs(10)).unwrap())
        .with_tokens(tokens.iter().map(|t| (*t).to_owned()))
        .with_actor(Some("alice@example".into()))
}

fn status<E: std::error::Error>(r: Result<impl std::fmt::Debug, Error<E>>) -> (u16, String) {
    match r {
        Err(Error::Status { status, message }) => (status, message),
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test]
async fn every_endpoint_round_trips_through_the_shared_client() {
    let msg = message();
    let id = msg.envelope.id.to_string();
    let r = relay(&msg).await;
    // The stale token first, as right after a rotation: the client moves on.
    let c = client(&r, &["stale", TOKEN]);

    let s = c.stats().await.unwrap();
    assert_eq!((s.messages, s.deferred, s.leased), (1, 0, 0));
    assert!(s.bytes > 0 && s.oldest_ms.is_some(), "{s:?}");

    let all = c.list(ListQuery::default()).await.unwrap();
    assert_eq!(all.messages.len(), 1);
    let m = &all.messages[0];
    assert_eq!(
        (m.id.as_str(), m.from.as_str()),
        (id.as_str(), "alice@a.example")
    );
    assert_eq!(m.declared_size, Some(42));
    assert_eq!(m.rcpts.len(), 2);
    assert_eq!(m.rcpts[0].state, RcptState::Pending);
    let by_domain = |d: &str| ListQuery {
        domain: Some(d.to_owned()),
        limit: Some(10),
        ..ListQuery::default()
    };
    assert_eq!(
        c.list(by_domain("example.org"))
            .await
            .unwrap()
            .messages
            .len(),
        1
    );
    // A hostile domain is one value, not extra parameters or path.
    for d in ["example.org&deferred=true", "x y/é%@", "other.test#frag"] {
        assert!(
            c.list(by_domain(d)).await.unwrap().messages.is_empty(),
            "{d}"
        );
    }
    let (code, e) = status(
        c.list(ListQuery {
            limit: Some(0),
            ..ListQuery::default()
        })
        .await,
    );
    assert_eq!(
        (code, e.as_str()),
        (400, "limit must be between 1 and 10000")
    );

    // The detail is the stored record, field for field, in the same JSON.
    let d = c.show(&id).await.unwrap();
    assert_eq!(d.envelope, super::api::wire_envelope(msg.envelope.clone()));
    assert_eq!(
        serde_json::to_value(&d.envelope).unwrap(),
        serde_json::to_value(&msg.envelope).unwrap()
    );
    assert_eq!(d.status.id, id);
    assert_eq!(d.status.rcpts.len(), 2);
    for hostile in ["../stats", "a b", "x%2Fy", "é", "a@b", "..", "%"] {
        let (code, e) = status(c.show(hostile).await);
        assert_eq!(code, 400, "{hostile}: {e}");
        assert!(e.starts_with("malformed queue id"), "{hostile}: {e}");
    }
    let unknown = QueueId::generate().to_string();
    let (code, e) = status(c.show(&unknown).await);
    assert_eq!((code, e), (404, format!("message {unknown} not found")));

    assert!(c.retry(RetrySelector::Id(id.clone())).await.is_ok());
    assert!(
        c.retry(RetrySelector::Domain("x y/é%@".into()))
            .await
            .unwrap()
            .retried
            == 0
    );
    assert!(
        c.retry(RetrySelector::Domain("example.org".into()))
            .await
            .is_ok()
    );
    assert!(c.retry(RetrySelector::All).await.is_ok());
    let (code, _) = status(c.retry(RetrySelector::Id(unknown.clone())).await);
    assert_eq!(code, 404);

    let qs = c.quotas().await.unwrap();
    assert_eq!(qs.quotas.len(), 1);
    let q = &qs.quotas[0];
    assert_eq!(
        (q.name.as_str(), q.direction, q.scope, q.action),
        (
            "tenant-a",
            QuotaDirection::Ingress,
            QuotaScope::PerKey,
            Some(QuotaAction::Reject)
        )
    );
    assert_eq!(q.limits, ["100/1m"]);
    for key in ["al ice+1@exämple/&key=x", "50%@b", "../../x"] {
        let one = c.quota("tenant-a", Some(key)).await.unwrap();
        assert_eq!(one.keys.len(), 1);
        assert_eq!(one.keys[0].key, key, "the relay saw the key as sent");
        assert_eq!(one.keys[0].windows[0].remaining, 100);
    }
    for name in ["a/b c%é@", "..", "tenant-a/../x"] {
        let (code, e) = status(c.quota(name, None).await);
        assert_eq!((code, e), (404, format!("quota {name} not found")));
    }

    c.delete(&id).await.unwrap();
    let (code, _) = status(c.delete(&id).await);
    assert_eq!(code, 404);
    assert_eq!(c.stats().await.unwrap().messages, 0);

    // Without a right token the relay's 401 comes through as such.
    let (code, _) = status(client(&r, &[]).stats().await);
    assert_eq!(code, 401);
    let (code, _) = status(client(&r, &["stale", "older"]).stats().await);
    assert_eq!(code, 401);
}
