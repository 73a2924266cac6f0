//! An in-memory Kubernetes API server for reconcile tests, served through kube's
//! tower-test mock transport (as kube-rs/controller-rs tests do), so the operator's
//! real `kube::Client` code runs unchanged.
//!
//! It keeps objects by path and answers GET (object or list), POST (create),
//! PUT (replace, with resourceVersion conflicts), PATCH (server-side apply: the
//! body replaces the object, keeping uid; `/status` replaces the status) and
//! DELETE, and records every request for the tests to check. It is a fake of the
//! API's storage, not of its validation or field ownership.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

impl Recorded {
    pub fn is(&self, method: &str, path_suffix: &str) -> bool {
        self.method.as_str() == method && self.path.ends_with(path_suffix)
    }
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    rv: u64,
    /// Status the "deployment controller" gives every applied Deployment.
    deployment_status: Option<Value>,
    /// Injected failures: (method, path suffix, HTTP status), used once each.
    failures: Vec<(String, String, u16)>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    pub client: kube::Client,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// `/api/v1/namespaces/ns/configmaps/x` -> (`/api/v1/namespaces/ns/configmaps`, Some(x), sub)
fn split(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Collections sit at an even depth after the group/version prefix:
    // api/v1/namespaces/NS/PLURAL or apis/G/V/namespaces/NS/PLURAL.
    let prefix = if parts.first() == Some(&"api") { 2 } else { 3 };
    let coll_len = if parts.get(prefix) == Some(&"namespaces") {
        prefix + 3
    } else {
        prefix + 1
    };
    let coll = format!("/{}", parts[..coll_len.min(parts.len())].join("/"));
    let name = parts.get(coll_len).map(|s| (*s).to_owned());
    let sub = parts.get(coll_len + 1).map(|s| (*s).to_owned());
    (coll, name, sub)
}

impl FakeApi {
    pub fn start() -> FakeApi {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                if parts.uri.query().is_some_and(|q| q.contains("watch=true")) {
                    // A watch: held open a while with no events, then closed (the
                    // watcher opens the next one). Answered on the side so that
                    // other requests are not held up.
                    st.lock().unwrap().requests.push(Recorded {
                        method: parts.method.clone(),
                        path: parts.uri.path().to_owned(),
                        query: parts.uri.query().unwrap_or_default().to_owned(),
                        body: None,
                    });
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        send.send_response(
                            Response::builder()
                                .status(200)
                                .header("content-type", "application/json")
                                .body(Body::from(Vec::new()))
                                .unwrap(),
                        );
                    });
                    continue;
                }
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Option<Value> = serde_json::from_slice(&bytes).ok();
                let (code, value) = handle_request(&st, &parts.method, &parts.uri, body);
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap();
                send.send_response(resp);
            }
        });
        FakeApi {
            state,
            client: kube::Client::new(svc, "default"),
        }
    }

    /// Stores an object as if created by a user; returns it as stored.
    pub fn put(&self, path: &str, mut obj: Value) -> Value {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv.to_string();
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("resourceVersion".into(), json!(rv));
        meta.entry("uid").or_insert(json!(format!("uid-{rv}")));
        meta.entry("generation").or_insert(json!(1));
        st.objects.insert(path.to_owned(), obj.clone());
        obj
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    pub fn remove(&self, path: &str) {
        self.state.lock().unwrap().objects.remove(path);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    /// What the Deployment controller reports for every applied Deployment.
    pub fn set_deployment_status(&self, status: Value) {
        self.state.lock().unwrap().deployment_status = Some(status);
    }

    /// The next `method` request whose path ends with `suffix` fails with `code`.
    pub fn fail_next(&self, method: &str, suffix: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .failures
            .push((method.into(), suffix.into(), code));
    }
}

fn handle_request(
    st: &Mutex<State>,
    method: &Method,
    uri: &http::Uri,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut st = st.lock().unwrap();
    let path = uri.path().to_owned();
    st.requests.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: uri.query().unwrap_or_default().to_owned(),
        body: body.clone(),
    });
    if let Some(i) = st
        .failures
        .iter()
        .position(|(m, s, _)| m == method.as_str() && path.ends_with(s.as_str()))
    {
        let (_, _, code) = st.failures.remove(i);
        return (
            StatusCode::from_u16(code).unwrap(),
            status_body(code, "InternalError", "injected failure"),
        );
    }
    let (coll, name, sub) = split(&path);
    let key = name.as_ref().map(|n| format!("{coll}/{n}"));
    match (method.as_str(), key) {
        ("GET", None) => {
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| in_collection(k, &coll))
                .map(|(_, v)| v.clone())
                .collect();
            let rv = st.rv.to_string();
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        ("GET", Some(key)) => match st.objects.get(&key) {
            Some(o) => (StatusCode::OK, o.clone()),
            None => not_found(&name.unwrap()),
        },
        ("POST", None) => {
            let mut obj = body.unwrap_or_default();
            let n = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let key = format!("{coll}/{n}");
            if st.objects.contains_key(&key) {
                return (
                    StatusCode::CONFLICT,
                    status_body(409, "AlreadyExists", &format!("{n} already exists")),
                );
            }
            st.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            obj["metadata"]["uid"] = json!(format!("uid-{}", st.rv));
            st.objects.insert(key, obj.clone());
            (StatusCode::CREATED, obj)
        }
        ("PUT", Some(key)) => {
            let mut obj = body.unwrap_or_default();
            let Some(old) = st.objects.get(&key) else {
                return not_found(&name.unwrap());
            };
            if obj["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                return (
                    StatusCode::CONFLICT,
                    status_body(409, "Conflict", "the object has been modified"),
                );
            }
            st.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.insert(key, obj.clone());
            (StatusCode::OK, obj)
        }
        ("PATCH", Some(key)) if sub.as_deref() == Some("status") => {
            let status = body.unwrap_or_default()["status"].clone();
            st.rv += 1;
            let rv = st.rv.to_string();
            let Some(obj) = st.objects.get_mut(&key) else {
                return not_found(&name.unwrap());
            };
            obj["status"] = status;
            obj["metadata"]["resourceVersion"] = json!(rv);
            (StatusCode::OK, obj.clone())
        }
        ("PATCH", Some(key)) => {
            let mut obj = body.unwrap_or_default();
            st.rv += 1;
            let rv = st.rv.to_string();
            let old = st.objects.get(&key).cloned();
            let generation = match &old {
                Some(o) if o.get("spec") == obj.get("spec") => {
                    o["metadata"]["generation"].as_i64().unwrap_or(1)
                }
                Some(o) => o["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
                None => 1,
            };
            obj["metadata"]["resourceVersion"] = json!(rv);
            obj["metadata"]["generation"] = json!(generation);
            obj["metadata"]["uid"] = old.as_ref().map_or_else(
                || json!(format!("uid-{rv}")),
                |o| o["metadata"]["uid"].clone(),
            );
            if coll.ends_with("/deployments")
                && let Some(s) = &st.deployment_status
            {
                let mut s = s.clone();
                s["observedGeneration"] = json!(generation);
                obj["status"] = s;
            }
            st.objects.insert(key, obj.clone());
            (StatusCode::OK, obj)
        }
        ("DELETE", Some(key)) => match st.objects.remove(&key) {
            Some(o) => (StatusCode::OK, o),
            None => not_found(&name.unwrap()),
        },
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            status_body(405, "MethodNotAllowed", "not supported by the fake API"),
        ),
    }
}

/// Whether the object at `key` belongs to the list at `coll`, which is either
/// namespaced (`.../namespaces/NS/PLURAL`) or across namespaces (`.../PLURAL`).
fn in_collection(key: &str, coll: &str) -> bool {
    let (kcoll, name, sub) = split(key);
    if name.is_none() || sub.is_some() {
        return false;
    }
    if kcoll == coll {
        return true;
    }
    // `/apis/G/V/namespaces/NS/PLURAL` is in `/apis/G/V/PLURAL`.
    let parts: Vec<&str> = kcoll.trim_matches('/').split('/').collect();
    match parts.iter().position(|p| *p == "namespaces") {
        Some(i) if parts.len() == i + 3 => {
            let cluster = [&parts[..i], &parts[i + 2..]].concat().join("/");
            format!("/{cluster}") == coll
        }
        _ => false,
    }
}

fn not_found(name: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        status_body(404, "NotFound", &format!("{name:?} not found")),
    )
}
