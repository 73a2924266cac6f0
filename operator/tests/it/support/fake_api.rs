//! An in-memory Kubernetes API server for reconcile tests, served through kube's
//! tower-test mock transport (as kube-rs/controller-rs tests do), so the operator's
//! real `kube::Client` code runs unchanged.
//!
//! It keeps objects by path and answers GET (object or list), POST (create),
//! PUT (replace, with resourceVersion conflicts), PATCH (server-side apply, see
//! below; `/status` replaces the status) and DELETE, and records every request for
//! the tests to check. It is a fake of the API's storage, not of its validation.
//!
//! Server-side apply keeps field ownership as the API server does, simplified:
//! each field manager owns the leaf fields it applied (lists count as one leaf,
//! where the real server merges some by key); an apply merges the body into the
//! object, removes the fields the manager applied last time and no longer does
//! (unless another manager owns them too), takes over fields changed against
//! another owner only with `force` (409 Conflict otherwise), and shows the result
//! in `metadata.managedFields`. [`FakeApi::update_by`] is a non-apply write (what
//! `kubectl scale` or an autoscaler does): it takes over the fields it changes. A
//! Deployment created without `replicas` gets 1, the API server's default.

use std::collections::{BTreeMap, BTreeSet};
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
    /// The request's `content-type` (`application/apply-patch+yaml` for a
    /// server-side apply, `application/merge-patch+json` for a merge patch).
    pub content_type: Option<String>,
    /// The status answered (0 for a watch, answered later).
    pub code: u16,
    /// Which client asked (see [`FakeApi::client_as`]; empty: `FakeApi::client`).
    pub who: String,
}

impl Recorded {
    pub fn is(&self, method: &str, path_suffix: &str) -> bool {
        self.method.as_str() == method && self.path.ends_with(path_suffix)
    }
}

/// Leaf paths (JSON pointers) each manager owns, with its operation.
type Owners = BTreeMap<String, (String, BTreeSet<String>)>;

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    owners: BTreeMap<String, Owners>,
    requests: Vec<Recorded>,
    rv: u64,
    /// Status the "deployment controller" gives every applied Deployment.
    deployment_status: Option<Value>,
    /// Injected failures: (method, path suffix, HTTP status), used once each.
    failures: Vec<(String, String, u16)>,
    /// Path prefixes of API groups not served (a CRD not installed): 404 to all.
    unserved: Vec<String>,
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
        let state = Arc::new(Mutex::new(State::default()));
        FakeApi {
            client: serve(state.clone(), ""),
            state,
        }
    }

    /// Another client of the same API server, whose requests are recorded with
    /// `who` (say, a second operator install).
    pub fn client_as(&self, who: &str) -> kube::Client {
        serve(self.state.clone(), who)
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

    /// A write by `manager` that is not an apply (like `kubectl scale` or an
    /// autoscaler's): `change` edits the stored object, and `manager` takes over
    /// every leaf field it changed.
    pub fn update_by(&self, path: &str, manager: &str, change: impl FnOnce(&mut Value)) {
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let mut obj = st.objects.get(path).cloned().expect("object stored");
        let before = obj.clone();
        change(&mut obj);
        let changed: BTreeSet<String> = leaves(&obj)
            .into_iter()
            .filter(|p| obj.pointer(p) != before.pointer(p))
            .collect();
        let owners = st.owners.entry(path.to_owned()).or_default();
        for (_, set) in owners.values_mut() {
            set.retain(|p| !changed.contains(p));
        }
        owners
            .entry(manager.to_owned())
            .or_insert_with(|| ("Update".into(), BTreeSet::new()))
            .1
            .extend(changed);
        owners.retain(|_, (_, set)| !set.is_empty());
        if before.get("spec") != obj.get("spec") {
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        obj["metadata"]["managedFields"] = managed_fields(owners);
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(path.to_owned(), obj);
    }

    /// The managers owning the field at JSON pointer `pointer` of the object at `path`.
    pub fn owners_of(&self, path: &str, pointer: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.owners
            .get(path)
            .into_iter()
            .flatten()
            .filter(|(_, (_, set))| set.contains(pointer))
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// What the Deployment controller reports for every applied Deployment.
    pub fn set_deployment_status(&self, status: Value) {
        self.state.lock().unwrap().deployment_status = Some(status);
    }

    /// Every request under `prefix` (like `/apis/keda.sh/`) gets 404, as for a
    /// resource whose CRD is not installed.
    pub fn unserve(&self, prefix: &str) {
        self.state.lock().unwrap().unserved.push(prefix.into());
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

/// Serves `state` to a new client whose requests are recorded with `who`.
fn serve(state: Arc<Mutex<State>>, who: &str) -> kube::Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let st = state;
    let who = who.to_owned();
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
                    content_type: None,
                    code: 0,
                    who: who.clone(),
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
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let (code, value) =
                handle_request(&st, &parts.method, &parts.uri, body, content_type, &who);
            let resp = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&value).unwrap()))
                .unwrap();
            send.send_response(resp);
        }
    });
    kube::Client::new(svc, "default")
}

fn handle_request(
    st: &Mutex<State>,
    method: &Method,
    uri: &http::Uri,
    body: Option<Value>,
    content_type: Option<String>,
    who: &str,
) -> (StatusCode, Value) {
    let mut guard = st.lock().unwrap();
    let at = guard.requests.len();
    guard.requests.push(Recorded {
        method: method.clone(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        body: body.clone(),
        content_type,
        code: 0,
        who: who.to_owned(),
    });
    let (code, value) = answer(&mut guard, method, uri, body);
    guard.requests[at].code = code.as_u16();
    (code, value)
}

fn answer(
    st: &mut State,
    method: &Method,
    uri: &http::Uri,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let path = uri.path().to_owned();
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
    if st.unserved.iter().any(|p| path.starts_with(p.as_str())) {
        return (
            StatusCode::NOT_FOUND,
            status_body(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
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
            let body = body.unwrap_or_default();
            let query = uri.query().unwrap_or_default();
            let param = |name: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned)
            };
            let manager = param("fieldManager").unwrap_or_default();
            let force = param("force").as_deref() == Some("true");
            let old = st.objects.get(&key).cloned();
            let mut owners = st.owners.get(&key).cloned().unwrap_or_default();
            let mut obj = old.clone().unwrap_or_else(|| json!({}));
            let applied = leaves(&body);
            // Conflicts: a changed value someone else owns.
            for p in &applied {
                if obj.pointer(p) == body.pointer(p) {
                    continue;
                }
                let others: Vec<String> = owners
                    .iter()
                    .filter(|(m, (_, set))| **m != manager && set.contains(p))
                    .map(|(m, _)| m.clone())
                    .collect();
                if !others.is_empty() && !force {
                    return (
                        StatusCode::CONFLICT,
                        status_body(
                            409,
                            "Conflict",
                            &format!(
                                "Apply failed with 1 conflict: conflict with {:?}: {p}",
                                others[0]
                            ),
                        ),
                    );
                }
                for m in others {
                    owners.get_mut(&m).unwrap().1.remove(p);
                }
            }
            // Fields this manager applied before and no longer does, owned by
            // nobody else, are removed.
            let before = owners
                .get(&manager)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            for p in before.difference(&applied) {
                let shared = owners
                    .iter()
                    .any(|(m, (_, set))| *m != manager && set.contains(p));
                if !shared {
                    remove_pointer(&mut obj, p);
                }
            }
            merge(&mut obj, &body);
            owners.insert(manager.clone(), ("Apply".into(), applied));
            owners.retain(|_, (_, set)| !set.is_empty());
            if coll.ends_with("/deployments") && obj["spec"].get("replicas").is_none() {
                obj["spec"]["replicas"] = json!(1);
            }
            obj["metadata"]["managedFields"] = managed_fields(&owners);
            st.owners.insert(key.clone(), owners);
            st.rv += 1;
            let rv = st.rv.to_string();
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
        ("DELETE", Some(key)) => match st.objects.remove(&key).inspect(|_| {
            st.owners.remove(&key);
        }) {
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

/// The leaf fields of an applied object as JSON pointers; what the API server
/// sets itself (identity, metadata it keeps, status) is nobody's.
fn leaves(v: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, at: String, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    walk(
                        v,
                        format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                        out,
                    );
                }
            }
            _ => {
                out.insert(at);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, String::new(), &mut out);
    out.retain(|p| {
        ![
            "/apiVersion",
            "/kind",
            "/metadata/name",
            "/metadata/namespace",
            "/metadata/uid",
            "/metadata/resourceVersion",
            "/metadata/generation",
        ]
        .contains(&p.as_str())
            && !p.starts_with("/metadata/managedFields")
            && !p.starts_with("/status")
    });
    out
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (into, from) => *into = from.clone(),
    }
}

fn remove_pointer(v: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    if let Some(Value::Object(m)) = v.pointer_mut(parent) {
        m.remove(&last);
    }
}

/// `metadata.managedFields` in the API's `FieldsV1` form (`{"f:spec": {"f:replicas": {}}}`).
fn managed_fields(owners: &Owners) -> Value {
    Value::Array(
        owners
            .iter()
            .map(|(manager, (operation, set))| {
                let mut fields = json!({});
                for p in set {
                    let mut at = &mut fields;
                    for part in p.trim_start_matches('/').split('/') {
                        let k = format!("f:{}", part.replace("~1", "/").replace("~0", "~"));
                        at = at
                            .as_object_mut()
                            .unwrap()
                            .entry(k)
                            .or_insert_with(|| json!({}));
                    }
                }
                json!({"manager": manager, "operation": operation, "apiVersion": "v1",
                       "fieldsType": "FieldsV1", "fieldsV1": fields})
            })
            .collect(),
    )
}

fn not_found(name: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        status_body(404, "NotFound", &format!("{name:?} not found")),
    )
}
